import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOHTTP1

/// The budgets of one HTTP/1.1 connection (the same meaning as the HTTP/2 server's).
public struct HTTP1Limits: Sendable {
    /// Largest request head (name + value + 32 per field, as for HTTP/2); larger gets 431 and close.
    public var maxHeaderListBytes = 64 * 1024
    public var bodyIdleTimeout: Duration? = .seconds(30)
    public var bodyMinRate = 16 * 1024
    /// A response the client takes nothing of (the socket stays unwritable) for this long: close.
    public var responseStallTimeout: Duration? = .seconds(30)
    /// A connection without a request in progress for this long is closed (also bounds a client
    /// that sends a request head a byte at a time).
    public var idleTimeout: Duration? = .seconds(300)
    /// Request body bytes received and not yet taken by the service before reading pauses.
    public var maxBufferedBody = 1 << 20
    /// After an early response (4xx before the body was read) the connection's output is shut
    /// down and up to this many more body bytes, arriving within `lingerTime`, are read and
    /// dropped before it is closed: closing with unread bytes makes the kernel send a reset that
    /// can reach the client before it read the status (curl then reports "Connection reset").
    public var lingerLimit = 16 << 20
    public var lingerTime: TimeAmount = .seconds(5)
    /// After a drain began, a request in flight gets this long before the connection is closed.
    public var drainGracePeriod: TimeAmount = .seconds(30)
    /// The node's request-body budget: reading pauses while the body bytes not yet taken reach
    /// 64 KiB, plus — once the handler reads — the window the budget gives the body (up to
    /// `maxBufferedBody`).
    public var bodyBudget: RequestBodyBudget?
    /// A request head whose first byte arrived this long ago and that is still not complete
    /// gets 408 and the connection is closed. nil: only the idle timeout bounds it.
    public var headersTimeout: Duration? = .seconds(20)
    public init() {}
}

/// Serves HTTP/1.1 on one connection (plaintext local endpoint, or behind TLS with ALPN
/// `http/1.1`): NIOHTTP1 parses, `HTTPServerPipelineHandler` serialises pipelined requests (it
/// stops reading while a response is outstanding, so pipelining is bounded by one socket read),
/// and every request goes to the same `HTTPService` as HTTP/2 and HTTP/3.
///
/// Request bodies stream to the service with backpressure (reading pauses while more than
/// `maxBufferedBody` bytes wait for it); response bodies (files, streams) are written while the
/// socket is writable. Anything ambiguous about where a request ends — Content-Length with
/// Transfer-Encoding, a transfer coding other than chunked, bad chunk sizes, obs-fold, a
/// malformed head — is answered 400 and the connection closed (no smuggling through a proxy).
final class HTTP1ServerHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = Never
    typealias OutboundOut = HTTPServerResponsePart

    private struct Exchange {
        var id: Int
        var body: HTTPInboundBody
        var isHead: Bool
        var keepAlive: Bool
        var version: HTTPVersion
        var requestEnded: Bool
        var hasBody = true
        var task: Task<Void, Never>?
        /// The response has been fully written.
        var responseDone = false
        /// Bytes dropped after an early response (nil: not lingering).
        var lingered: Int?
    }

    private let service: any HTTPService
    private let peer: PeerIdentity
    private let tls: Bool
    private let limits: HTTP1Limits
    private let limiter: ConnectionLimiter?
    private let drainCuts: DrainCuts?
    private let logger: Logger
    private let headClock: HTTP1HeadClock?
    private var context: ChannelHandlerContext?
    private var remoteAddress: String?
    private var current: Exchange?
    private var nextID = 0
    private var readPending = false
    private var closing = false
    /// The graceful close when the node drains (no GOAWAY: `connection: close`, or a cut).
    private var drain = ConnectionDrain()
    private var idleSince: ContinuousClock.Instant? = .now
    private var unwritableSince: ContinuousClock.Instant?
    private var timer: RepeatedTask?
    /// The response body being written (resumed when the socket becomes writable again).
    private var pump: (() -> Void)?
    private var pumpClose: (() -> Void)?

    static let transport = "http1"

    init(service: any HTTPService, peer: PeerIdentity, tls: Bool, limits: HTTP1Limits, limiter: ConnectionLimiter?,
         drainCuts: DrainCuts?, headClock: HTTP1HeadClock? = nil, logger: Logger) {
        self.headClock = headClock
        self.service = service
        self.peer = peer
        self.tls = tls
        self.limits = limits
        self.limiter = limiter
        self.drainCuts = drainCuts
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        remoteAddress = context.remoteAddress.map(\.endpoint)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in bound.value.tick() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        teardown(HTTPTransportError.connectionClosed)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        teardown(HTTPTransportError.connectionClosed)
        context.fireChannelInactive()
    }

    private func teardown(_ error: any Error) {
        timer?.cancel()
        timer = nil
        bodyWindow?.close()
        pumpClose?()
        pumpClose = nil
        pump = nil
        if let c = current {
            current = nil
            if !c.requestEnded { c.body.fail(error) }
            c.task?.cancel()
        }
    }

    /// Once a second: the idle timeout, and a client that stopped reading its response.
    private func tick() {
        guard let context, !closing else { return }
        let now = ContinuousClock.now
        if let idle = limits.idleTimeout, let since = idleSince, now - since > idle {
            logger.debug("closing an idle HTTP/1.1 connection", metadata: ["remote": "\(remoteAddress ?? "-")"])
            close(context)
            return
        }
        if current == nil, let limit = limits.headersTimeout, let since = headClock?.started, now - since > limit {
            TransportRefusals.count("request_headers_timeout", transport: Self.transport)
            logger.notice("HTTP/1.1 request head not complete in time: closing the connection", metadata: [
                "timeout": "\(limit)", "remote": "\(remoteAddress ?? "-")",
            ])
            closing = true
            headClock?.timedOut("request head not complete within \(limit) (request_headers_timeout_seconds)\n")
            return
        }
        if let stall = limits.responseStallTimeout, let since = unwritableSince, now - since > stall {
            TransportRefusals.count("response_stalled", transport: Self.transport)
            logger.notice("HTTP/1.1 client stopped reading: closing the connection", metadata: [
                "timeout": "\(stall)", "remote": "\(remoteAddress ?? "-")",
            ])
            close(context)
        }
    }

    private func close(_ context: ChannelHandlerContext) {
        guard !closing else { return }
        closing = true
        context.close(promise: nil)
    }

    private func setIdle(_ idle: Bool) {
        guard idle != (idleSince != nil) else { return }
        idleSince = idle ? .now : nil
        if let limiter, let channel = context?.channel { limiter.update(channel, idle: idle) }
    }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case .head(let head): received(head: head, context: context)
        case .body(let chunk): received(body: chunk, context: context)
        case .end: receivedEnd(context: context)
        }
    }

    private func received(head h: HTTPRequestHead_, context: ChannelHandlerContext) {
        guard current == nil else {
            // HTTPServerPipelineHandler delivers one request at a time; anything else is a bug.
            refuse(400, "bad request: a request arrived before the previous one was answered", context: context)
            return
        }
        setIdle(false)
        headClock?.headReceived()
        // The head's size, counted as for HTTP/2 (name + value + 32 per field).
        var bytes = h.uri.utf8.count + h.method.rawValue.utf8.count
        for (n, v) in h.headers { bytes += n.utf8.count + v.utf8.count + InboundHeaderBlock.fieldOverhead }
        if bytes > limits.maxHeaderListBytes {
            TransportRefusals.count("header_list_too_large", transport: Self.transport)
            respondAndClose(TransportRefusals.headerListTooLarge(bytes: bytes, limit: limits.maxHeaderListBytes), version: h.version, context: context)
            return
        }
        if let why = Self.framingProblem(h) {
            TransportRefusals.count("malformed_request", transport: Self.transport)
            logger.notice("HTTP/1.1 request refused", metadata: ["reason": "\(why)", "remote": "\(remoteAddress ?? "-")"])
            refuse(400, "bad request: \(why)", context: context)
            return
        }
        var fields = MeshHTTP.HTTPHeaders()
        for (n, v) in h.headers where !Self.hopByHop.contains(n.lowercased()) { fields.add(n, v) }
        var head = MeshHTTP.HTTPRequestHead(method: h.method.rawValue, path: h.uri, scheme: tls ? "https" : "http",
                                            authority: h.headers.first(name: "host") ?? "", headers: fields)
        head.protocolName = Self.transport
        let chunked = h.headers.contains(name: "transfer-encoding")
        let length = h.headers.first(name: "content-length").flatMap { Int64($0) } ?? 0
        let hasBody = chunked || length > 0
        let keepAlive = h.isKeepAlive && !drain.isDraining
        let isHead = h.method == .HEAD
        nextID += 1
        let id = nextID

        if !hasBody, let immediate = service.immediateResponse(head, peer: peer) {
            current = Exchange(id: id, body: .complete(nil), isHead: isHead, keepAlive: keepAlive, version: h.version, requestEnded: false, hasBody: false)
            respond(id: id, immediate)
            return
        }
        if hasBody, let early = service.earlyRefusal(head, peer: peer) {
            // Known before a byte of the body: answer now and close (Expect: 100-continue gets this
            // instead of 100, so the client sends no body at all).
            current = Exchange(id: id, body: .complete(nil), isHead: isHead, keepAlive: false, version: h.version, requestEnded: false)
            respond(id: id, early)
            return
        }
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        if hasBody, bodyWindow == nil, let budget = limits.bodyBudget { bodyWindow = budget.connection() }
        let budgeted = hasBody && bodyWindow != nil
        let credit = BodyCreditHolder()
        var open: (@Sendable () -> Void)?
        if budgeted { open = { loop.execute { bound.value.openBodyCredit(id, credit) } } }
        let body = HTTPInboundBody(onConsumed: { n in
                                       _ = credit.consumed(n)
                                       loop.execute { bound.value.bodyConsumed() }
                                   },
                                   idleTimeout: hasBody ? limits.bodyIdleTimeout : nil, minimumRate: limits.bodyMinRate,
                                   onFirstRead: open)
        bodyCredit = budgeted ? credit : nil
        if !hasBody { body.finish() }
        current = Exchange(id: id, body: body, isHead: isHead, keepAlive: keepAlive, version: h.version, requestEnded: false, hasBody: hasBody)
        if hasBody, h.headers.first(name: "expect")?.lowercased() == "100-continue" {
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .continue))), promise: nil)
        }
        let request = HTTPServerRequest(head: head, body: body, peer: peer, remoteAddress: remoteAddress)
        let service = self.service
        current?.task = Task {
            let response = await service.handle(request)
            loop.execute { bound.value.respond(id: id, response) }
        }
    }

    /// Headers that describe this hop, not the request (not handed to the service).
    static let hopByHop: Set<String> = ["connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host"]

    /// Why the request's framing is ambiguous or broken (nil: fine). NIOHTTP1 (llhttp) already
    /// refuses bad chunk sizes and most malformed heads; these are checked again here so the
    /// rule does not depend on the parser's leniency.
    static func framingProblem(_ h: HTTPRequestHead_) -> String? {
        let te = h.headers["transfer-encoding"]
        let cl = h.headers["content-length"]
        if !te.isEmpty && !cl.isEmpty { return "Content-Length together with Transfer-Encoding" }
        if !te.isEmpty {
            let codings = te.flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
            if codings != ["chunked"] { return "Transfer-Encoding \(te.joined(separator: ", ")) (only chunked is accepted)" }
            if h.version.minor == 0 && h.version.major == 1 { return "Transfer-Encoding in an HTTP/1.0 request" }
        }
        if !cl.isEmpty {
            let values = Set(cl.flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) })
            guard values.count == 1, let v = values.first, !v.isEmpty, v.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), Int64(v) != nil else {
                return "invalid Content-Length \(cl.joined(separator: ", "))"
            }
        }
        for (n, v) in h.headers {
            if n.isEmpty || n.utf8.contains(where: { $0 <= 32 || $0 == 127 || $0 == UInt8(ascii: ":") }) { return "invalid header name" }
            // obs-fold (a line starting with a space continues the previous one) or a bare CR/LF.
            if v.utf8.contains(where: { $0 == 13 || $0 == 10 || $0 == 0 }) { return "obs-fold or a control character in header \(n)" }
        }
        if h.version.major != 1 { return "HTTP version \(h.version.major).\(h.version.minor)" }
        if h.version.minor >= 1, h.headers.first(name: "host") == nil { return "no Host header (required in HTTP/1.1)" }
        return nil
    }

    private func received(body chunk: ByteBuffer, context: ChannelHandlerContext) {
        guard var c = current, !c.requestEnded else { return }
        if let l = c.lingered {
            c.lingered = l + chunk.readableBytes
            current = c
            if l + chunk.readableBytes > limits.lingerLimit { close(context) }
            return
        }
        c.body.append(chunk)
    }

    /// This connection's share of the node's request-body budget (made with its first body).
    private var bodyWindow: BodyBudgetConnection?
    /// The current body's window under the budget (given once its handler reads).
    private var bodyCredit: BodyCreditHolder?
    static let bodyWindowBase = 64 * 1024

    /// The handler of exchange `id` began reading its body: ask the budget for a window.
    private func openBodyCredit(_ id: Int, _ holder: BodyCreditHolder) {
        guard let w = bodyWindow, current?.id == id, let c = current, !c.requestEnded, c.lingered == nil else { return }
        let loop = context?.eventLoop
        let bound = context.map { NIOLoopBound(self, eventLoop: $0.eventLoop) }
        holder.set(w.open(cap: max(0, limits.maxBufferedBody - Self.bodyWindowBase)) { _ in
            loop?.execute { bound?.value.bodyConsumed() }
        })
    }

    /// Whether the body being received has as many bytes waiting for the service as reading may
    /// run ahead (64 KiB + the budget's window for it, or `maxBufferedBody` without a budget).
    private func bodyFull(_ body: HTTPInboundBody) -> Bool {
        if let credit = bodyCredit { return body.bufferedBytes >= min(limits.maxBufferedBody, Self.bodyWindowBase + credit.window) }
        return body.bufferedBytes >= limits.maxBufferedBody
    }

    private func receivedEnd(context: ChannelHandlerContext) {
        bodyCredit?.release()
        guard var c = current else { return }
        c.requestEnded = true
        current = c
        if c.lingered == nil { c.body.finish() }
        if c.responseDone { finish(context: context) }
    }

    /// The service took body bytes: read again if reading paused for it.
    private func bodyConsumed() {
        guard readPending, let context, let c = current else { return }
        if c.requestEnded || c.lingered != nil || !bodyFull(c.body) {
            readPending = false
            context.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if let c = current, !c.requestEnded, c.lingered == nil, bodyFull(c.body) {
            readPending = true
            return
        }
        readPending = false
        context.read()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is HTTPParserError {
            TransportRefusals.count("malformed_request", transport: Self.transport)
            logger.notice("HTTP/1.1 request refused", metadata: ["reason": "\(error)", "remote": "\(remoteAddress ?? "-")"])
            refuse(400, "bad request: \(error)", context: context)
            return
        }
        logger.debug("HTTP/1.1 connection error", metadata: ["error": "\(error)", "remote": "\(remoteAddress ?? "-")"])
        close(context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is HTTP2GracefulShutdownEvent {
            switch drain.begin(canSendGoaway: false, inFlight: current == nil ? 0 : 1) {
            case .close:
                close(context)
            case .awaitRequests:
                let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
                let grace = limits.drainGracePeriod
                context.eventLoop.scheduleTask(in: grace) {
                    let me = bound.value
                    guard !me.closing, let context = me.context else { return }
                    if case .cut(let inFlight) = me.drain.graceEnded(inFlight: me.current == nil ? 0 : 1) {
                        me.drainCuts?.add(inFlight)
                        me.logger.warning("\(ConnectionDrain.cutMessage(gracePeriod: grace, inFlight: inFlight))",
                                          metadata: ["remote": "\(me.remoteAddress ?? "-")"])
                    }
                    me.close(context)
                }
            default:
                break
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// A 400 (or other) before or instead of a request: the answer, then close.
    private func refuse(_ status: Int, _ message: String, context: ChannelHandlerContext) {
        if let c = current, c.responseDone || pump != nil {
            // A response is on the wire: nothing sensible can follow it.
            close(context)
            return
        }
        respondAndClose(.text(status, message), version: current?.version ?? .http1_1, context: context)
    }

    private func respondAndClose(_ response: HTTPResponse, version: HTTPVersion, context: ChannelHandlerContext) {
        current?.task?.cancel()
        if let c = current, !c.requestEnded { c.body.fail(HTTPTransportError.connectionClosed) }
        current = nil
        closing = true
        var headers = NIOHTTP1.HTTPHeaders()
        for (n, v) in response.headers where n != "content-length" { headers.add(name: n, value: v) }
        headers.replaceOrAdd(name: "content-length", value: String(response.body.knownLength ?? 0))
        headers.replaceOrAdd(name: "connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .init(statusCode: response.status), headers: headers))), promise: nil)
        if case .bytes(let b) = response.body { context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil) } else { response.body.discard() }
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }

    // MARK: outbound

    private func respond(id: Int, _ response: HTTPResponse) {
        guard let context, !closing, var c = current, c.id == id else {
            response.body.discard()
            return
        }
        c.task = nil
        // An answer before the whole body arrived: drop the rest (bounded), then close.
        let early = !c.requestEnded && c.hasBody
        if early {
            c.keepAlive = false
            c.lingered = 0
            c.body.fail(HTTPTransportError.streamReset(errorCode: 0))
            bodyCredit?.release()
            if readPending { readPending = false; context.read() }
        }
        current = c
        let head = ResponseHead(response, framing: .http1(isHead: c.isHead))
        var headers = NIOHTTP1.HTTPHeaders()
        for (n, v) in head.fields { headers.add(name: n, value: v) }
        var chunked = false
        if head.lengthUnknown {
            if c.version.minor >= 1 {
                headers.add(name: "transfer-encoding", value: "chunked")
                chunked = true
            } else {
                c.keepAlive = false   // HTTP/1.0 without a length: the close ends the body.
                current = c
            }
        }
        if !c.keepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: c.version, status: .init(statusCode: response.status), headers: headers))), promise: nil)
        if c.isHead || ResponseHead.forbidsBody(status: response.status) {
            response.body.discard()
            end(id: id, trailers: nil, context: context)
            return
        }
        sendBody(OutboundBodyPump(response.body, trailers: response.trailers), id: id, chunked: chunked, context: context)
    }

    private static let chunk = 256 * 1024

    /// Writes the body while the socket takes it (`pump` resumes it when it is writable again,
    /// or when a streamed body's producer has more), then the end with trailers if chunked.
    private func sendBody(_ body: OutboundBodyPump, id: Int, chunked: Bool, context: ChannelHandlerContext) {
        var body = body
        let allocator = context.channel.allocator
        pumpClose = { body.close(HTTPTransportError.connectionClosed) }
        pump = { [unowned self] in
            while context.channel.isWritable {
                switch body.next(max: Self.chunk, allocator: allocator) {
                case .buffer(let b, let last):
                    context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil)
                    guard last else { continue }
                    fallthrough
                case .end:
                    pump = nil
                    pumpClose = nil
                    let trailers: NIOHTTP1.HTTPHeaders? = chunked ? body.trailers.map { t in
                        var h = NIOHTTP1.HTTPHeaders()
                        for (n, v) in t { h.add(name: n, value: v) }
                        return h
                    } : nil
                    self.end(id: id, trailers: trailers, context: context)
                    return
                case .wouldBlock:
                    context.flush()
                    return
                case .failed(let why):
                    if let why { logger.warning("HTTP/1.1 response body failed; closing", metadata: ["error": "\(why)"]) }
                    pump = nil
                    pumpClose = nil
                    body.close(HTTPTransportError.connectionClosed)
                    close(context)
                    return
                case .mapped:
                    preconditionFailure("no mapping was asked for")
                }
            }
            context.flush()
        }
        if let s = body.stream {
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let loop = context.eventLoop
            s.setOnReadable { loop.execute { bound.value.pump?() } }
        }
        pump?()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            unwritableSince = nil
            pump?()
        } else if unwritableSince == nil {
            unwritableSince = .now
        }
        context.fireChannelWritabilityChanged()
    }

    /// The response's last part. The exchange is settled before `.end` is written: the pipeline
    /// handler delivers a pipelined next request from inside that write.
    private func end(id: Int, trailers: NIOHTTP1.HTTPHeaders?, context: ChannelHandlerContext) {
        guard var c = current, c.id == id else { return }
        c.responseDone = true
        if c.requestEnded {
            current = nil
            let closeAfter = !c.keepAlive || c.lingered != nil || drain.isDraining
            if closeAfter {
                closing = true
                context.writeAndFlush(wrapOutboundOut(.end(trailers))).whenComplete { _ in context.close(promise: nil) }
                return
            }
            setIdle(true)
            context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
            if readPending, !closing {
                readPending = false
                context.read()
            }
            return
        }
        current = c
        if c.lingered != nil {
            // Early answer: let the client take it (the rest of its body is dropped, bounded)
            // before the connection closes.
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(.end(trailers))).whenComplete { _ in
                // FIN after the answer: the client sees the whole response and the end.
                context.close(mode: .output, promise: nil)
                context.eventLoop.scheduleTask(in: bound.value.limits.lingerTime) {
                    let me = bound.value
                    guard let context = me.context else { return }
                    me.close(context)
                }
            }
        } else {
            context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
        }
    }

    /// The request ended after its response was complete: next request, or close.
    private func finish(context: ChannelHandlerContext) {
        guard let c = current else { return }
        current = nil
        bodyCredit?.release()
        bodyCredit = nil
        if !c.keepAlive || c.lingered != nil || drain.isDraining {
            close(context)
            return
        }
        setIdle(true)
        headClock?.awaitHead()
        if readPending {
            readPending = false
            context.read()
        }
    }
}
