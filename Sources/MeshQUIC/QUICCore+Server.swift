import CGnuTLS
import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension QUICCore {
    // MARK: server side

    func serverRequest(_ s: H3Stream, fin: Bool) {
        guard case .server(_, let service) = role else { return }
        var head = HTTPRequestHead(fields: s.headerFields)
        head.protocolName = "h3"
        s.isHead = head.method == "HEAD"
        guard let peer else {
            ngtcp2_conn_shutdown_stream(conn, s.id, UInt64(NGHTTP3_H3_INTERNAL_ERROR))
            return
        }
        if fin, let immediate = service.immediateResponse(head, peer: peer) {
            s.inboundEnded = true
            respond(s.id, immediate)
            return
        }
        if !fin, bodyBudget == nil, let budget = settings.requestBodyBudget { bodyBudget = budget.connection() }
        let budgeted = !fin && bodyBudget != nil
        let slot = BodyCreditSlot()
        var open: (@Sendable () -> Void)?
        var held: (@Sendable () -> Bool)?
        if budgeted {
            let opener = NIOLoopBound(weakSelf, eventLoop: loop)
            let coreLoop = self.loop
            let sid = s.id
            open = { coreLoop.execute { opener.value.core?.openBudgetedStream(sid, slot: slot) } }
            held = { slot.waiting }
        }
        let body = HTTPInboundBody(onConsumed: makeCredit(s.id), idleTimeout: fin ? nil : settings.requestBodyIdleTimeout,
                                   minimumRate: settings.requestBodyMinRate, onFirstRead: open, heldBack: held)
        s.body = body
        if fin {
            s.inboundEnded = true
            body.finish()
        }
        let request = HTTPServerRequest(head: head, body: body, peer: peer, remoteAddress: "\(remoteAddress.endpoint)")
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        let loop = self.loop
        let sid = s.id
        s.handler = Task {
            let response = await service.handle(request)
            loop.execute {
                if let core = bound.value.core {
                    core.respond(sid, response)
                } else {
                    response.body.discard()
                }
            }
        }
    }

    func respond(_ sid: Int64, _ response: HTTPResponse) {
        guard isActive, let h3, let s = streams[sid], !s.responseSubmitted else {
            response.body.discard()
            return
        }
        s.lastProgress = .now
        startStallCheck()
        s.responseSubmitted = true
        let head = ResponseHead(response, framing: .frames)
        var hasBody = true
        if s.isHead {
            response.body.discard()
            hasBody = false
        } else {
            setBody(s, response.body, trailers: response.trailers)
            hasBody = !s.pump.isEmpty
        }
        var dr = nghttp3_data_reader(read_data: Self.readData)
        let rv = withHeaderFields(head.fields, nghttp3NV) { nva, n in
            hasBody ? nghttp3_conn_submit_response(h3, sid, nva, n, &dr) : nghttp3_conn_submit_response(h3, sid, nva, n, nil)
        }
        if rv != 0 {
            s.closeSource()
            ngtcp2_conn_shutdown_stream(conn, sid, UInt64(NGHTTP3_H3_INTERNAL_ERROR))
        } else if !hasBody {
            stopUploadIfUnfinished(s)
        }
        // Coalesced: responses completed in the same loop turn share packets and one send.
        scheduleWrite()
    }

    /// The response is complete but the client is still uploading (e.g. an early 4xx): ask it
    /// to stop (STOP_SENDING H3_NO_ERROR, RFC 9114 §4.1) so the stream can close.
    func stopUploadIfUnfinished(_ s: H3Stream) {
        guard !s.inboundEnded else { return }
        let sid = s.id
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.isActive, let s = self.streams[sid], !s.inboundEnded else { return }
            if let h3 = self.h3 { _ = nghttp3_conn_shutdown_stream_read(h3, sid) }
            ngtcp2_conn_shutdown_stream_read(self.conn, sid, UInt64(NGHTTP3_H3_NO_ERROR))
            self.scheduleWrite()
        }
    }


    /// Server drain (`ConnectionDrain`): GOAWAY notice now, final GOAWAY `goawayGap` later,
    /// CONNECTION_CLOSE once the requests in flight completed (or `gracePeriod` ran out).
    func startGracefulShutdown(gracePeriod: TimeAmount) {
        guard isServer, isActive else { return }
        // No HTTP/3 yet (handshake): no request can be in flight; close.
        switch drain.begin(canSendGoaway: h3 != nil, inFlight: h3 == nil ? 0 : activeRequestStreams) {
        case .sendNotice:
            _ = nghttp3_conn_submit_shutdown_notice(h3)
            writePackets()
        case .close:
            closeApplication()
            return
        default:
            return
        }
        loop.assumeIsolated().scheduleTask(in: ConnectionDrain.goawayGap) { [weak self] in
            guard let self, self.isActive, let h3 = self.h3, self.drain.finalGoawayDue() == .sendFinalGoaway else { return }
            _ = nghttp3_conn_shutdown(h3)
            self.writePackets()
            self.scheduleDrainCheck()
        }
        loop.assumeIsolated().scheduleTask(in: gracePeriod) { [weak self] in
            guard let self, self.isActive else { return }
            if case .cut(let inFlight) = self.drain.graceEnded(inFlight: self.activeRequestStreams) {
                self.settings.drainCuts?.add(inFlight)
                self.logger.warning("\(ConnectionDrain.cutMessage(gracePeriod: gracePeriod, inFlight: inFlight, connection: "QUIC connection"))",
                                    metadata: ["peer": "\(self.peer?.commonName ?? "-")", "remote": "\(self.remoteAddress.endpoint)"])
            }
            self.closeApplication()
        }
    }

    /// After the final GOAWAY: close once no request stream is left (checked on the next loop
    /// turn, after what is being written went out).
    func scheduleDrainCheck() {
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.isActive else { return }
            if self.drain.requestEnded(inFlight: self.activeRequestStreams) == .close {
                self.closeApplication()
            }
        }
    }

    var activeRequestStreams: Int { streams.keys.reduce(0) { $0 + (ngtcp2_is_bidi_stream($1) != 0 ? 1 : 0) } }

    /// Server side, about once a second: responses whose stream (or connection) flow-control
    /// window stayed closed for longer than the stall timeout are reset, giving back their file
    /// and read slot (a zero-window reader must not hold them for the connection's lifetime).
    func startStallCheck() {
        guard isServer, stallCheck == nil, let timeout = settings.responseStallTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        stallCheck = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.isActive else { return }
            let now = ContinuousClock.now
            let connectionBlocked = ngtcp2_conn_get_max_data_left(self.conn) == 0
            let stalled = self.streams.values.filter { s in
                s.responseSubmitted && !s.sourceClosed && now - s.lastProgress > timeout
                    && (connectionBlocked || ngtcp2_conn_get_max_stream_data_left(self.conn, s.id) == 0)
            }
            guard !stalled.isEmpty else { return }
            for _ in stalled { TransportRefusals.count("response_stalled", transport: "h3") }
            self.logger.notice("HTTP/3 client stopped reading: resetting \(stalled.count) stream(s)", metadata: [
                "timeout": "\(timeout)", "peer": "\(self.peer?.commonName ?? "-")", "remote": "\(self.remoteAddress.endpoint)",
            ])
            for s in stalled { ngtcp2_conn_shutdown_stream(self.conn, s.id, UInt64(NGHTTP3_H3_REQUEST_CANCELLED)) }
            self.writePackets()
        }
    }

    /// Once a second while request heads are incomplete: those older than the request-headers
    /// timeout are reset (a client that opens streams and never finishes their HEADERS frame).
    func startHeadCheck() {
        guard headCheck == nil, let timeout = settings.requestHeadersTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        headCheck = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.isActive else { return }
            let now = ContinuousClock.now
            let late = self.pendingHeads.filter { now - $0.value > timeout }.map(\.key)
            guard !late.isEmpty else { return }
            for sid in late {
                self.pendingHeads[sid] = nil
                TransportRefusals.count("request_headers_timeout", transport: "h3")
                ngtcp2_conn_shutdown_stream(self.conn, sid, UInt64(NGHTTP3_H3_REQUEST_INCOMPLETE))
            }
            self.logger.notice("HTTP/3 request headers not complete in time: resetting \(late.count) stream(s)", metadata: [
                "timeout": "\(timeout)", "peer": "\(self.peer?.commonName ?? "-")", "remote": "\(self.remoteAddress.endpoint)",
            ])
            self.writePackets()
        }
    }
}
