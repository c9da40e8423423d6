// The HTTP/1.1 pipeline around `HTTP1ServerHandler`: the head clock before the decoder (for the
// request-headers timeout) and the function that installs the handlers on a connection.

import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOHTTP1

/// Sits before the HTTP/1.1 decoder and notes when the first byte of a request head arrives
/// (`HTTP1ServerHandler` says when a head is awaited), for the request-headers timeout.
final class HTTP1HeadClock: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private var awaiting = true
    /// When the first byte of the awaited head arrived (nil: none yet, or no head awaited).
    private(set) var started: ContinuousClock.Instant?

    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if awaiting, started == nil { started = .now }
        context.fireChannelRead(data)
    }

    /// 408 and close. Written from here, below `HTTPServerPipelineHandler` (which knows of no
    /// request, since its head never arrived, and would refuse a response).
    func timedOut(_ message: String) {
        started = nil
        awaiting = false
        guard let context else { return }
        var headers = NIOHTTP1.HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: String(message.utf8.count))
        headers.add(name: "connection", value: "close")
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .requestTimeout, headers: headers))), promise: nil)
        context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: message)))), promise: nil)
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }

    /// A head arrived whole.
    func headReceived() {
        awaiting = false
        started = nil
    }

    /// The exchange is over: the next bytes begin a new head.
    func awaitHead() { awaiting = true }
}

typealias HTTPRequestHead_ = NIOHTTP1.HTTPRequestHead

/// Adds the HTTP/1.1 server handlers to a pipeline (after `position`).
func addHTTP1Handlers(to pipeline: ChannelPipeline.SynchronousOperations, position: ChannelPipeline.SynchronousOperations.Position = .last,
                      service: any HTTPService, peer: PeerIdentity, tls: Bool, limits: HTTP1Limits, limiter: ConnectionLimiter?,
                      drainCuts: DrainCuts?, logger: Logger) throws {
    let clock = limits.headersTimeout == nil ? nil : HTTP1HeadClock()
    let handlers: [any ChannelHandler] = [HTTPResponseEncoder()] + (clock.map { [$0] } ?? []) + [
        ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes)),
        HTTPServerPipelineHandler(),
        HTTP1ServerHandler(service: service, peer: peer, tls: tls, limits: limits, limiter: limiter, drainCuts: drainCuts,
                           headClock: clock, logger: logger),
    ]
    try pipeline.addHandlers(handlers, position: position)
}
