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
    // MARK: client side

    func startRequest(head: HTTPRequestHead, body: HTTPOutboundBody, token: RequestToken, continuation: CheckedContinuation<HTTPClientResponse, any Error>) {
        guard isActive, h3 != nil else {
            body.discard()
            continuation.resume(throwing: HTTPTransportError.connectionClosed)
            return
        }
        if let g = goawayID {
            body.discard()
            continuation.resume(throwing: HTTPTransportError.goaway(lastStreamID: Int32(clamping: g), errorCode: 0))
            return
        }
        if token.cancelled.withLock({ $0 }) {
            body.discard()
            continuation.resume(throwing: CancellationError())
            return
        }
        var sid: Int64 = -1
        let rv = ngtcp2_conn_open_bidi_stream(conn, &sid, nil)
        if rv == NGTCP2_ERR_STREAM_ID_BLOCKED {
            pending.append((head, body, token, continuation))
            return
        }
        guard rv == 0, let h3 else {
            body.discard()
            continuation.resume(throwing: HTTPTransportError.protocolError("cannot open stream: \(Self.errString(rv))"))
            return
        }
        let s = H3Stream(id: sid, maxHeaderListSize: settings.maxHeaderListSize)
        ngtcp2_conn_set_keep_alive_timeout(conn, UInt64(max(0, settings.keepAliveWhileBusy.nanoseconds)))
        if activeRequestStreams == 0 { busySince = ContinuousClock.now }
        startDarkCheck()
        s.continuation = continuation
        s.token = token
        s.isHead = head.method == "HEAD"
        streams[sid] = s
        var fields: [(name: String, value: String)] = [
            (":method", head.method), (":scheme", head.scheme), (":authority", head.authority), (":path", head.path),
        ]
        for (n, v) in head.headers where !ResponseHead.isHopByHop(n) { fields.append((n, v)) }
        if head.headers["content-length"] == nil, let n = body.knownLength, n > 0 || head.method == "PUT" || head.method == "POST" {
            fields.append(("content-length", String(n)))
        }
        setBody(s, body)
        let hasBody = !s.pump.isEmpty
        var dr = nghttp3_data_reader(read_data: Self.readData)
        let srv = withHeaderFields(fields, nghttp3NV) { nva, n in
            hasBody ? nghttp3_conn_submit_request(h3, sid, nva, n, &dr, nil) : nghttp3_conn_submit_request(h3, sid, nva, n, nil, nil)
        }
        if srv != 0 {
            streams[sid] = nil
            s.closeSource()
            continuation.resume(throwing: HTTPTransportError.protocolError("nghttp3_conn_submit_request: \(srv)"))
            ngtcp2_conn_shutdown_stream(conn, sid, UInt64(NGHTTP3_H3_INTERNAL_ERROR))
        }
        // Coalesced: requests started in the same loop turn share packets and one send.
        scheduleWrite()
    }

    func scheduleStartPending() {
        guard !pending.isEmpty else { return }
        loop.assumeIsolated().execute { [weak self] in
            guard let self else { return }
            let p = self.pending
            self.pending = []
            for r in p { self.startRequest(head: r.head, body: r.body, token: r.token, continuation: r.cont) }
        }
    }

    func clientResponseHead(_ s: H3Stream, fin: Bool) {
        let status = s.headerFields.first { $0.name == ":status" }.flatMap { Int($0.value) } ?? 0
        if (100..<200).contains(status) {
            s.headerBlock = InboundHeaderBlock(limit: settings.maxHeaderListSize)
            return
        }
        guard let cont = s.continuation else { return }
        s.continuation = nil
        var headers = HTTPHeaders()
        for (n, v) in s.headerFields where !n.hasPrefix(":") { headers.add(n, v) }
        let body = HTTPInboundBody(onConsumed: makeCredit(s.id))
        s.body = body
        if fin {
            s.inboundEnded = true
            body.finish()
        }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        let loop = self.loop
        let sid = s.id
        cont.resume(returning: HTTPClientResponse(status: status, headers: headers, body: body, cancel: {
            loop.execute { bound.value.core?.cancelStream(sid) }
        }))
    }

    /// Reset our request stream (RESET_STREAM + STOP_SENDING, H3_REQUEST_CANCELLED).
    func cancelStream(_ sid: Int64) {
        guard isActive, let s = streams[sid] else { return }
        ngtcp2_conn_shutdown_stream(conn, sid, UInt64(NGHTTP3_H3_REQUEST_CANCELLED))
        dropPendingInbound(s)
        if !s.inboundEnded {
            s.inboundEnded = true
            creditConnection(s.body?.fail(HTTPTransportError.streamReset(errorCode: UInt32(NGHTTP3_H3_REQUEST_CANCELLED))) ?? 0)
        }
        if let c = s.continuation {
            s.continuation = nil
            c.resume(throwing: CancellationError())
        }
        s.closeSource()
        writePackets()
    }

    func cancel(token: RequestToken) {
        if let i = pending.firstIndex(where: { $0.token === token }) {
            let r = pending.remove(at: i)
            r.body.discard()
            r.cont.resume(throwing: CancellationError())
            return
        }
        if let s = streams.values.first(where: { $0.token === token }) {
            cancelStream(s.id)
        }
    }

    func goawayReceived(_ id: Int64) {
        guard !isServer else { return }
        goawayID = id
        flags.goingAway.withLock { $0 = true }
        // Requests the server will not process: retry elsewhere.
        let err = HTTPTransportError.goaway(lastStreamID: Int32(clamping: id), errorCode: 0)
        for (sid, s) in streams where sid >= id && ngtcp2_is_bidi_stream(sid) != 0 {
            if let c = s.continuation {
                s.continuation = nil
                c.resume(throwing: err)
            }
        }
        let p = pending
        pending = []
        for r in p {
            r.body.discard()
            r.cont.resume(throwing: err)
        }
    }

    /// Client side, four times a second while the connection lives: outstanding requests and
    /// silence from the server for `darkPathTimeout` (≥ 3 PTOs) close the connection with
    /// `QUICError.pathDark`, failing those requests now so that callers can go over TCP or to
    /// another node (the idle timeout would hold them for 30 s).
    func startDarkCheck() {
        guard !isServer, darkCheck == nil, let timeout = settings.darkPathTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        darkCheckTick = ContinuousClock.now
        darkCheck = loop.scheduleRepeatedTask(initialDelay: .milliseconds(250), delay: .milliseconds(250)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.isActive else { return }
            let now = ContinuousClock.now
            defer { self.darkCheckTick = now }
            // This loop did not run for a while (a starved process): datagrams may be waiting
            // in the socket, unread. Silence then proves nothing; count it from now.
            if now - self.darkCheckTick > .seconds(1) { self.lastHeard = max(self.lastHeard, now) }
            let outstanding = self.activeRequestStreams
            guard outstanding > 0 else { return }
            let pto = Duration.nanoseconds(Int64(clamping: ngtcp2_conn_get_pto(self.conn)))
            let limit = max(Duration.nanoseconds(timeout.nanoseconds), pto * 3)
            let silent = now - max(self.lastHeard, self.busySince)
            guard silent > limit else { return }
            // And the protocol agrees: probes (keep-alive PINGs, data) went unanswered.
            var st = ngtcp2_conn_stat()
            cm_ngtcp2_conn_get_conn_stat(self.conn, &st)
            guard st.pto_count >= 2 else { return }
            let why = "nothing from \(self.remoteAddress.endpoint) for \(silent.components.seconds).\(silent.components.attoseconds / 100_000_000_000_000_000) s while \(outstanding) request(s) were outstanding"
            self.logger.notice("QUIC path went dark: closing the connection", metadata: ["why": "\(why)"])
            var e = ngtcp2_connection_close_error()
            ngtcp2_connection_close_error_set_application_error(&e, UInt64(NGHTTP3_H3_NO_ERROR), nil, 0)
            self.closeWith(e, error: QUICError.pathDark(why))
        }
    }
}
