import Logging
import MeshHTTP
import MeshTLS
import NIOCore

/// Serves HTTP/2 on one connection: every request stream is handed to the `HTTPService` in a
/// task; the response (bytes or a file read at the pace of flow control) goes back on the loop.
final class HTTP2ServerHandler: HTTP2ChannelHandler {
    private struct Stream {
        var body: HTTPInboundBody
        var requestEnded = false
        var isHead = false
        /// The service handling the request; cancelled when the stream goes away first (a reset
        /// GET stops its mesh fetch, an abandoned upload stops waiting for a slot).
        var task: Task<Void, Never>?
        /// The response ended before the request body (an early 4xx): the rest of the body is
        /// read and dropped, up to `lingerLimit` bytes.
        var lingering = 0
    }

    /// After an early response, a request body of up to this many more bytes (arriving within
    /// `lingerTime`) is read and dropped instead of resetting the stream at once: curl 7.88 (Debian
    /// 12) reports RST_STREAM(NO_ERROR) after a complete response as a framing error (exit 92)
    /// instead of showing the 403/413. Beyond either bound the stream is reset (RFC 9113 §8.1).
    static let lingerLimit = 256 * 1024
    static let lingerTime: TimeAmount = .seconds(1)

    private let service: any HTTPService
    private let plaintext: Bool
    /// Who a plaintext connection's requests come from (no certificate to tell).
    private let plaintextPeer: PeerIdentity
    private var peer: PeerIdentity?
    private var remoteAddress: String?
    private var streams: [Int32: Stream] = [:]
    /// The graceful close when the node drains (GOAWAY notice, final GOAWAY, close).
    private var drain = ConnectionDrain()
    private let gracePeriod: TimeAmount
    private let bodyIdleTimeout: Duration?
    private let bodyMinRate: Int
    private let responseStallTimeout: Duration?
    private let idleTimeout: Duration?
    private let limiter: ConnectionLimiter?
    private let drainCuts: DrainCuts?
    private let bodyBudget: RequestBodyBudget?
    private let headersTimeout: Duration?
    private var stallCheck: RepeatedTask?
    /// Since when no stream has been open (nil: streams are open).
    private var idleSince: ContinuousClock.Instant? = .now

    init(service: any HTTPService, plaintext: Bool, plaintextPeer: PeerIdentity = .insecure, settings: NGHTTP2Session.Settings, gracePeriod: TimeAmount = .seconds(30),
         bodyIdleTimeout: Duration? = nil, bodyMinRate: Int = 0, responseStallTimeout: Duration? = nil, idleTimeout: Duration? = nil,
         limiter: ConnectionLimiter? = nil, drainCuts: DrainCuts? = nil, bodyBudget: RequestBodyBudget? = nil,
         headersTimeout: Duration? = nil, logger: Logger) {
        self.bodyBudget = bodyBudget
        self.headersTimeout = headersTimeout
        self.idleTimeout = idleTimeout
        self.drainCuts = drainCuts
        self.limiter = limiter
        self.service = service
        self.bodyIdleTimeout = bodyIdleTimeout
        self.bodyMinRate = bodyMinRate
        self.responseStallTimeout = responseStallTimeout
        self.plaintext = plaintext
        self.plaintextPeer = plaintextPeer
        self.gracePeriod = gracePeriod
        var settings = settings
        // With a body budget, request streams get no window until their handler reads
        // (SETTINGS_INITIAL_WINDOW_SIZE 0; `openStream`), then one charged to the budget that
        // grows up to the usual initial window. Bodies nobody reads take no memory and no
        // connection window, so a stream being read is never starved by streams waiting for a
        // write slot.
        if bodyBudget != nil {
            settings.streamWindowCap = settings.initialWindowSize
            settings.initialWindowSize = 0
        }
        super.init(settings: settings, logger: logger)
    }

    override func handlerAdded(context: ChannelHandlerContext) {
        super.handlerAdded(context: context)
        remoteAddress = context.remoteAddress.map(\.endpoint)
        if plaintext, context.channel.isActive { begin(peer: plaintextPeer) }
    }

    override func channelActive(context: ChannelHandlerContext) {
        remoteAddress = context.remoteAddress.map(\.endpoint)
        if plaintext { begin(peer: plaintextPeer) }
        context.fireChannelActive()
    }

    private func begin(peer: PeerIdentity) {
        guard self.peer == nil else { return }
        self.peer = peer
        startSession(role: .server)
        if let bodyBudget { session?.bodyBudget = bodyBudget.connection() }
        startStallCheck()
    }

    /// About once a second: responses the client stopped reading for longer than the stall
    /// timeout are reset (CANCEL), which closes their file and gives back their read slot; a
    /// connection whose socket takes nothing at all is closed.
    private func startStallCheck() {
        guard responseStallTimeout != nil || idleTimeout != nil || headersTimeout != nil, let context else { return }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        stallCheck = context.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
            let me = bound.value
            guard let session = me.session, let context = me.context, !me.closing else { return }
            if let limit = me.headersTimeout, let since = session.oldestOpenHeaderBlock, ContinuousClock.now - since > limit {
                // A header block begun and never finished (HEADERS without END_HEADERS, then
                // nothing or a CONTINUATION trickle): the connection can do nothing else meanwhile.
                TransportRefusals.count("request_headers_timeout", transport: "h2")
                me.logger.notice("HTTP/2 request headers not complete in time: closing the connection", metadata: [
                    "timeout": "\(limit)", "peer": "\(me.peer?.commonName ?? "-")", "remote": "\(me.remoteAddress ?? "-")",
                ])
                session.terminate(errorCode: 0xb)
                me.flushOutput()
                context.close(promise: nil)
                return
            }
            if let idle = me.idleTimeout, let since = me.idleSince, ContinuousClock.now - since > idle, !me.drain.isDraining {
                me.logger.debug("closing an idle HTTP/2 connection", metadata: ["remote": "\(me.remoteAddress ?? "-")"])
                me.initiateGracefulShutdown()
                return
            }
            guard let timeout = me.responseStallTimeout else { return }
            let blocked = !context.channel.isWritable
            let stalled = session.stalledResponses(now: .now, timeout: timeout, socketBlocked: blocked)
            guard !stalled.isEmpty else { return }
            for _ in stalled { TransportRefusals.count("response_stalled", transport: "h2") }
            me.logger.notice("HTTP/2 client stopped reading: \(blocked ? "closing the connection" : "resetting \(stalled.count) stream(s)")", metadata: [
                "timeout": "\(timeout)", "peer": "\(me.peer?.commonName ?? "-")", "remote": "\(me.remoteAddress ?? "-")",
            ])
            if blocked {
                context.close(promise: nil)
            } else {
                for id in stalled { session.resetStream(id, errorCode: 8) }
                me.flushOutput()
            }
        }
    }

    /// Tells the idle timer and the connection limiter whether streams are open.
    private func streamsChanged() {
        let idle = streams.isEmpty
        guard idle != (idleSince != nil) else { return }
        idleSince = idle ? .now : nil
        if let limiter, let channel = context?.channel { limiter.update(channel, idle: idle) }
    }

    override func channelInactive(context: ChannelHandlerContext) {
        stallCheck?.cancel()
        stallCheck = nil
        session?.bodyBudget?.close()
        session?.bodyBudget = nil
        super.channelInactive(context: context)
    }

    override func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? TLSEstablishedEvent {
            begin(peer: e.peer)
        } else if event is HTTP2GracefulShutdownEvent {
            initiateGracefulShutdown()
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// GOAWAY in two steps (`ConnectionDrain`): a shutdown notice now, the final GOAWAY (last
    /// processed stream id) `goawayGap` later; nghttp2 ends the session once the streams in
    /// flight finished, or the grace period ends and the connection closes under them.
    func initiateGracefulShutdown() {
        guard let context else { return }
        // No session yet (plaintext before the preface, TLS before the handshake): close.
        switch drain.begin(canSendGoaway: session != nil, inFlight: session == nil ? 0 : streams.count) {
        case .sendNotice:
            session?.submitShutdownNotice()
            flushOutput()
        case .close:
            context.close(promise: nil)
            return
        default:
            return
        }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: ConnectionDrain.goawayGap) {
            let me = bound.value
            guard me.drain.finalGoawayDue() == .sendFinalGoaway else { return }
            me.session?.submitGoaway()
            me.flushOutput()
        }
        let grace = gracePeriod
        context.eventLoop.scheduleTask(in: grace) {
            let me = bound.value
            guard !me.closing, let context = me.context else { return }
            if case .cut(let inFlight) = me.drain.graceEnded(inFlight: me.streams.count) {
                me.drainCuts?.add(inFlight)
                me.logger.warning("\(ConnectionDrain.cutMessage(gracePeriod: grace, inFlight: inFlight))",
                                  metadata: ["peer": "\(me.peer?.commonName ?? "-")", "remote": "\(me.remoteAddress ?? "-")"])
            }
            context.close(promise: nil)
        }
    }

    override func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool) {
        guard !isTrailers, let peer, let context else { return }
        let head = HTTPRequestHead(fields: headers)
        let fields = head.headers
        if endStream, let immediate = service.immediateResponse(head, peer: peer) {
            streams[stream] = Stream(body: .complete(nil), requestEnded: true, isHead: head.method == "HEAD")
            streamsChanged()
            respond(stream: stream, response: immediate)
            return
        }
        let budgeted = !endStream && session?.bodyBudget != nil
        let body = HTTPInboundBody(onConsumed: makeConsumedCallback(stream: stream), idleTimeout: endStream ? nil : bodyIdleTimeout,
                                   minimumRate: bodyMinRate, onFirstRead: budgeted ? onLoop { ($0 as? HTTP2ServerHandler)?.openStream(stream) } : nil,
                                   heldBack: budgeted ? waitsForBudget(stream) : nil)
        streams[stream] = Stream(body: body, requestEnded: endStream, isHead: head.method == "HEAD")
        streamsChanged()
        if endStream {
            body.finish()
        } else if fields["expect"]?.lowercased() == "100-continue" {
            session?.submitInformational(stream: stream, status: 100)
        }
        let request = HTTPServerRequest(head: head, body: body, peer: peer, remoteAddress: remoteAddress)
        let service = self.service
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        streams[stream]?.task = Task {
            let response = await service.handle(request)
            loop.execute { bound.value.respond(stream: stream, response: response) }
        }
    }

    /// The request's header list decoded to more than the limit: 431 (its fields were dropped as
    /// they arrived); too-large trailers reset the stream; on repeat the session already sent
    /// GOAWAY ENHANCE_YOUR_CALM and the connection closes once the answers are out.
    override func headerListTooLarge(stream: Int32, bytes: Int, isTrailers: Bool, endStream: Bool, closing: Bool) {
        guard let session else { return }
        TransportRefusals.count("header_list_too_large", transport: "h2")
        logger.notice("HTTP/2 request header list too large", metadata: [
            "bytes": "\(bytes)", "limit": "\(session.maxHeaderListSize)", "peer": "\(peer?.commonName ?? "-")",
            "remote": "\(remoteAddress ?? "-")", "action": "\(closing ? "GOAWAY ENHANCE_YOUR_CALM" : isTrailers ? "RST_STREAM" : "431")",
        ])
        if isTrailers {
            session.resetStream(stream, errorCode: 0xb)
            scheduleFlush()
            return
        }
        streams[stream] = Stream(body: .complete(nil), requestEnded: endStream, isHead: false)
        streamsChanged()
        respond(stream: stream, response: TransportRefusals.headerListTooLarge(bytes: bytes, limit: session.maxHeaderListSize))
    }

    /// The handler of `stream` began reading its body: ask the budget for its window.
    private func openStream(_ stream: Int32) {
        guard streams[stream] != nil, let context else { return }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        let credit = session?.openStream(stream) { n in
            loop.execute {
                let me = bound.value
                me.session?.grantStream(stream, bytes: n)
                me.scheduleFlush()
            }
        }
        if let credit { waitFlags[stream]?.set(credit) }
        scheduleFlush()
    }

    /// Whether the budget keeps `stream` waiting for a window (any thread; a stale answer only
    /// delays an idle verdict by a second).
    private func waitsForBudget(_ stream: Int32) -> @Sendable () -> Bool {
        let slot = BodyCreditSlot()
        waitFlags[stream] = slot
        return { slot.waiting }
    }

    private var waitFlags: [Int32: BodyCreditSlot] = [:]

    private func respond(stream: Int32, response: HTTPResponse) {
        guard let s = streams[stream], let session else {
            // The stream died (reset, connection closed) while the service worked.
            response.body.discard()
            return
        }
        let head = ResponseHead(response, framing: .frames)
        if !session.submitResponse(stream: stream, head: head, body: response.body, trailers: response.trailers, headOnly: s.isHead) {
            session.resetStream(stream, errorCode: 2)
        }
        scheduleFlush()
    }

    override func dataReceived(stream: Int32, data: ByteBuffer) {
        if var s = streams[stream], s.lingering > 0 {
            session?.consumed(stream: stream, bytes: data.readableBytes)
            s.lingering += data.readableBytes
            streams[stream] = s
            if s.lingering > Self.lingerLimit + 1 {
                session?.resetStream(stream, errorCode: 0)
                scheduleFlush()
            }
            return
        }
        guard let s = streams[stream], s.body.append(data) else {
            // Nobody will read it: give the stream window back at once.
            session?.consumed(stream: stream, bytes: data.readableBytes)
            return
        }
    }

    override func endOfStreamReceived(stream: Int32) {
        session?.releaseStream(stream)
        waitFlags[stream] = nil
        guard var s = streams[stream] else { return }
        s.requestEnded = true
        streams[stream] = s
        s.body.finish()
    }

    override func endOfStreamSent(stream: Int32) {
        // The response is complete but the client is still uploading (e.g. an early 4xx): let a
        // small rest of the body arrive (dropped), then tell it to stop (RST_STREAM NO_ERROR, RFC
        // 9113 §8.1) if it has not finished by then (see `lingerLimit`).
        guard var s = streams[stream], !s.requestEnded, let context else { return }
        s.lingering = 1
        streams[stream] = s
        // Let the rest of the body come (to be dropped) as the linger allows.
        openStream(stream)
        // Nobody reads the body any more: drop what is buffered and give its window back.
        let dropped = s.body.fail(HTTPTransportError.streamReset(errorCode: 0))
        if dropped > 0 { session?.consumed(stream: stream, bytes: dropped) }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: Self.lingerTime) {
            let me = bound.value
            guard let s = me.streams[stream], s.lingering > 0, !s.requestEnded else { return }
            me.session?.resetStream(stream, errorCode: 0)
            me.flushOutput()
        }
        scheduleFlush()
    }

    override func streamClosed(stream: Int32, errorCode: UInt32) {
        waitFlags[stream] = nil
        guard let s = streams.removeValue(forKey: stream) else { return }
        streamsChanged()
        // The body first, so a handler reading it learns the real reason; then the handler.
        if !s.requestEnded {
            s.body.fail(HTTPTransportError.streamReset(errorCode: errorCode))
        }
        s.task?.cancel()
    }

    override func connectionFailed(_ error: any Error) {
        let all = streams
        streams = [:]
        for (_, s) in all {
            if !s.requestEnded { s.body.fail(HTTPTransportError.connectionClosed) }
            s.task?.cancel()
        }
    }
}
