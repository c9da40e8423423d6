import Logging
import MeshHTTP
import MeshTLS
import NIOCore

/// Sent down a server pipeline to start a graceful shutdown of that connection.
public struct HTTP2GracefulShutdownEvent: Sendable {
    public init() {}
}

/// What server and client connection handlers share: the nghttp2 session, feeding input,
/// writing output at the pace the socket takes it, and window credits from consumers.
class HTTP2ChannelHandler: ChannelInboundHandler, NGHTTP2SessionDelegate {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let logger: Logger
    let settings: NGHTTP2Session.Settings
    var session: NGHTTP2Session?
    var context: ChannelHandlerContext?
    private var flushScheduled = false
    /// Completes when the last frame handed to the channel was written.
    private var pendingWrite: EventLoopFuture<Void>?
    var closing = false

    init(settings: NGHTTP2Session.Settings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Create the nghttp2 session (once the transport is ready) and send our SETTINGS.
    func startSession(role: NGHTTP2Session.Role) {
        guard session == nil else { return }
        session = NGHTTP2Session(role: role, settings: settings, delegate: self)
        flushOutput()
    }

    // Declared here so subclasses can override them (protocol witnesses are fixed at the base class).
    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let session, !closing else { return }
        do {
            try session.receive(unwrapInboundIn(data))
        } catch {
            logger.debug("HTTP/2 connection error", metadata: ["error": "\(error)"])
            flushOutput()
            connectionFailed(error)
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushOutput()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { flushOutput() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("connection error", metadata: ["error": "\(error)"])
        connectionFailed(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
        connectionFailed(HTTPTransportError.connectionClosed)
        session = nil
        context.fireChannelInactive()
    }

    /// Write what nghttp2 has to send, stopping while the channel is not writable.
    func flushOutput() {
        guard let context, let session else { return }
        var lastWrite: EventLoopFuture<Void>?
        do {
            while true {
                var buf = context.channel.allocator.buffer(capacity: 16 * 1024)
                let more = try session.produce(into: &buf, limit: 256 * 1024)
                if buf.readableBytes > 0 {
                    let promise = context.eventLoop.makePromise(of: Void.self)
                    context.write(wrapOutboundOut(buf), promise: promise)
                    lastWrite = promise.futureResult
                }
                if !more || !context.channel.isWritable { break }
            }
        } catch {
            logger.debug("HTTP/2 send error", metadata: ["error": "\(error)"])
            connectionFailed(error)
            context.close(promise: nil)
            return
        }
        if lastWrite != nil {
            context.flush()
            pendingWrite = lastWrite
        }
        if !session.wantsRead && !session.wantsWrite && !closing {
            // Done (e.g. after GOAWAY): close only once everything written so far left the
            // socket, or a slow reader would lose the tail of its response.
            closing = true
            if let last = pendingWrite {
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                last.whenComplete { _ in bound.value.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
        }
    }

    /// Coalesce flushes requested from outside the read path.
    func scheduleFlush() {
        guard let context, !flushScheduled else { return }
        flushScheduled = true
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            bound.value.flushScheduled = false
            bound.value.flushOutput()
        }
    }

    /// A closure for `HTTPInboundBody` that credits the stream window from any thread.
    func makeConsumedCallback(stream: Int32) -> @Sendable (Int) -> Void {
        guard let context else { return { _ in } }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        return { n in
            loop.execute {
                let me = bound.value
                me.session?.consumed(stream: stream, bytes: n)
                me.scheduleFlush()
            }
        }
    }

    func makeResumeCallback(stream: Int32) -> @Sendable () -> Void {
        guard let context else { return {} }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        return {
            loop.execute {
                let me = bound.value
                me.session?.resume(stream: stream)
                me.scheduleFlush()
            }
        }
    }

    /// Run `body` on this handler's event loop from any thread.
    func onLoop(_ body: @escaping (HTTP2ChannelHandler) -> Void) -> (@Sendable () -> Void) {
        guard let context else { return {} }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        nonisolated(unsafe) let body = body
        return { loop.execute { body(bound.value) } }
    }

    // MARK: overridable

    func connectionFailed(_ error: any Error) {}
    func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool) {}
    func dataReceived(stream: Int32, data: ByteBuffer) {}
    func endOfStreamReceived(stream: Int32) {}
    func streamClosed(stream: Int32, errorCode: UInt32) {}
    func goawayReceived(lastStreamID: Int32, errorCode: UInt32) {}
    func endOfStreamSent(stream: Int32) {}
    /// A header block over the limit. Default (a client reading a response): reset the stream,
    /// which fails the request with `streamReset(ENHANCE_YOUR_CALM)`.
    func headerListTooLarge(stream: Int32, bytes: Int, isTrailers: Bool, endStream: Bool, closing: Bool) {
        logger.warning("HTTP/2 response header list of \(bytes) bytes is over the limit of \(session?.maxHeaderListSize ?? 0): stream reset")
        session?.resetStream(stream, errorCode: 0xb)
    }
}
