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
    func recvStreamData(_ sid: Int64, _ data: UnsafePointer<UInt8>?, _ len: Int, fin: Bool) -> Int32 {
        guard let h3 else { return NGTCP2_ERR_CALLBACK_FAILURE }
        if isServer, settings.requestHeadersTimeout != nil, ngtcp2_is_bidi_stream(sid) != 0, pendingHeads[sid] == nil,
           streams[sid].map({ $0.body == nil && !$0.responseSubmitted }) ?? true {
            pendingHeads[sid] = .now
            startHeadCheck()
        }
        let consumed = nghttp3_conn_read_stream(h3, sid, data, len, fin ? 1 : 0)
        if consumed < 0 {
            logger.debug("nghttp3_conn_read_stream failed", metadata: ["error": "\(consumed)"])
            if nghttp3_err_is_fatal(Int32(consumed)) != 0 {
                ngtcp2_conn_set_tls_error(conn, Int32(consumed))
                return NGTCP2_ERR_CALLBACK_FAILURE
            }
            // A stream-level problem: reset that stream only.
            ngtcp2_conn_shutdown_stream(conn, sid, nghttp3_err_infer_quic_app_error_code(Int32(consumed)))
            return 0
        }
        // Framing (and anything not handed to the body) is credited at once; body bytes only
        // when the consumer takes them (`credit`).
        ngtcp2_conn_extend_max_stream_offset(conn, sid, UInt64(consumed))
        ngtcp2_conn_extend_max_offset(conn, UInt64(consumed))
        return 0
    }

    /// Body bytes consumed: open the stream and connection windows by that much (under a budget,
    /// the stream's window also grows as the budget allows; the connection was credited on arrival).
    func credit(_ sid: Int64, _ n: Int) {
        guard isActive, n > 0 else { return }
        let grow = bodyBudget != nil ? (streams[sid]?.credit?.consumed(n) ?? 0) : 0
        ngtcp2_conn_extend_max_stream_offset(conn, sid, UInt64(n + grow))
        creditConnection(n)
        scheduleWrite()
    }

    /// Body bytes left memory: give them back to the connection window. Under a request-body
    /// budget the connection window was credited as they arrived (the streams' windows, charged
    /// to the budget, bound what may arrive), so nothing is left to do.
    func creditConnection(_ n: Int) {
        guard isActive, n > 0, bodyBudget == nil else { return }
        ngtcp2_conn_extend_max_offset(conn, UInt64(n))
    }

    /// The handler of `sid` began reading its body: ask the budget for the stream's window.
    func openBudgetedStream(_ sid: Int64, slot: BodyCreditSlot) {
        guard isActive, let b = bodyBudget, let s = streams[sid], s.credit == nil, !s.inboundEnded else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        let loop = self.loop
        let credit = b.open(cap: Int(clamping: settings.streamWindow)) { n in
            loop.execute {
                guard let core = bound.value.core, core.isActive, core.streams[sid]?.credit != nil else { return }
                ngtcp2_conn_extend_max_stream_offset(core.conn, sid, UInt64(n))
                core.scheduleWrite()
            }
        }
        s.credit = credit
        slot.set(credit)
    }

    func makeCredit(_ sid: Int64) -> @Sendable (Int) -> Void {
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        let loop = self.loop
        return { n in
            if loop.inEventLoop {
                bound.value.core?.credit(sid, n)
            } else {
                loop.execute { bound.value.core?.credit(sid, n) }
            }
        }
    }

    func peerReset(_ sid: Int64, code: UInt64) {
        if let h3 { _ = nghttp3_conn_shutdown_stream_read(h3, sid) }
        guard let s = streams[sid], !s.inboundEnded else { return }
        dropPendingInbound(s)
        s.inboundEnded = true
        let err = Self.resetError(code)
        if let c = s.continuation {
            s.continuation = nil
            c.resume(throwing: err)
        }
        creditConnection(s.body?.fail(err) ?? 0)
    }

    func peerStopSending(_ sid: Int64, code: UInt64) {
        if let h3 { _ = nghttp3_conn_shutdown_stream_read(h3, sid) }
        ngtcp2_conn_shutdown_stream_write(conn, sid, code)
        streams[sid]?.closeSource()
    }

    /// HTTP/3 codes mapped to what callers test: REQUEST_REJECTED is retryable like HTTP/2's
    /// REFUSED_STREAM (7).
    static func resetError(_ code: UInt64) -> HTTPTransportError {
        if code == UInt64(NGHTTP3_H3_REQUEST_REJECTED) { return .streamReset(errorCode: 7) }
        return .streamReset(errorCode: UInt32(truncatingIfNeeded: code))
    }

    func streamClosed(_ sid: Int64, code: UInt64) {
        pendingHeads[sid] = nil
        guard let s = streams.removeValue(forKey: sid) else { return }
        s.credit?.release()
        s.credit = nil
        dropPendingInbound(s)
        if !s.inboundEnded {
            s.inboundEnded = true
            creditConnection(s.body?.fail(Self.resetError(code)) ?? 0)
        }
        s.handler?.cancel()
        if let c = s.continuation {
            s.continuation = nil
            if let g = goawayID, sid >= g {
                c.resume(throwing: HTTPTransportError.goaway(lastStreamID: Int32(clamping: g), errorCode: 0))
            } else {
                c.resume(throwing: Self.resetError(code))
            }
        }
        s.closeSource()
        s.held.removeAll()
        if isServer, ngtcp2_is_bidi_stream(sid) != 0 {
            ngtcp2_conn_extend_max_streams_bidi(conn, 1)
            if drain.isDraining { scheduleDrainCheck() }
        }
        if !isServer, isActive, activeRequestStreams == 0 {
            // Idle again: let the idle timeout close a connection nobody uses.
            ngtcp2_conn_set_keep_alive_timeout(conn, 0)
        }
    }

    func recvData(_ sid: Int64, _ data: UnsafePointer<UInt8>?, _ len: Int) {
        guard len > 0, let data else { return }
        // Under a budget the connection window is credited on arrival (see `creditConnection`).
        if bodyBudget != nil { ngtcp2_conn_extend_max_offset(conn, UInt64(len)) }
        guard let s = streams[sid], let body = s.body, !s.inboundEnded else {
            credit(sid, len)
            return
        }
        _ = body
        // Gather the body bytes of a whole read burst and hand them over in one piece at its end
        // (`deliverInbound`): one consumer wake-up per burst instead of one per packet.
        if s.pendingInbound == nil {
            s.pendingInbound = allocator.buffer(capacity: max(len, 64 * 1024))
            inboundDirty.append(s)
        }
        s.pendingInbound!.writeBytes(UnsafeRawBufferPointer(start: data, count: len))
    }

    /// Hand gathered body bytes to their consumers.
    func deliverInbound() {
        guard !inboundDirty.isEmpty else { return }
        let dirty = inboundDirty
        inboundDirty = []
        for s in dirty { deliverInbound(s) }
    }

    func deliverInbound(_ s: H3Stream) {
        guard let buf = s.pendingInbound else { return }
        s.pendingInbound = nil
        let n = buf.readableBytes
        guard n > 0 else { return }
        if s.inboundEnded && s.body == nil || !(s.body?.append(buf) ?? false) {
            if isActive {
                ngtcp2_conn_extend_max_stream_offset(conn, s.id, UInt64(n))
                creditConnection(n)
            }
        }
    }

    /// Bytes gathered but never delivered (stream reset/closed): give the connection window back.
    func dropPendingInbound(_ s: H3Stream) {
        guard let buf = s.pendingInbound else { return }
        s.pendingInbound = nil
        creditConnection(buf.readableBytes)
    }

    func endStream(_ sid: Int64) {
        guard let s = streams[sid], !s.inboundEnded else { return }
        deliverInbound(s)
        s.inboundEnded = true
        s.credit?.release()
        s.body?.finish(trailers: s.trailerBlock.fields.isEmpty ? nil : HTTPHeaders(s.trailerBlock.fields))
    }

    /// A header or trailer block decoded to more than `maxHeaderListSize` (its fields were
    /// dropped as they arrived). Server: 431 for a request head, a stream reset for trailers, and
    /// on repeat the connection closes with H3_EXCESSIVE_LOAD. Client: the request fails.
    func headerListTooLarge(_ s: H3Stream, bytes: Int, isTrailers: Bool, fin: Bool) {
        let limit = settings.maxHeaderListSize
        guard isServer else {
            ngtcp2_conn_shutdown_stream(conn, s.id, UInt64(NGHTTP3_H3_EXCESSIVE_LOAD))
            let error = HTTPTransportError.protocolError("response header list of \(bytes) bytes is over the limit of \(limit)")
            s.continuation?.resume(throwing: error)
            s.continuation = nil
            s.body?.fail(error)
            return
        }
        TransportRefusals.count("header_list_too_large", transport: "h3")
        let closing = headerPolicy.tooLarge() == .closeConnection
        logger.notice("HTTP/3 request header list too large", metadata: [
            "bytes": "\(bytes)", "limit": "\(limit)", "peer": "\(peer?.commonName ?? "-")", "remote": "\(remoteAddress.endpoint)",
            "action": "\(closing ? "H3_EXCESSIVE_LOAD" : isTrailers ? "stream reset" : "431")",
        ])
        if closing {
            loop.assumeIsolated().execute { [weak self] in self?.closeApplication(code: UInt64(NGHTTP3_H3_EXCESSIVE_LOAD)) }
        } else if isTrailers {
            ngtcp2_conn_shutdown_stream(conn, s.id, UInt64(NGHTTP3_H3_EXCESSIVE_LOAD))
            s.body?.fail(HTTPTransportError.streamReset(errorCode: UInt32(NGHTTP3_H3_EXCESSIVE_LOAD)))
        } else {
            s.inboundEnded = fin
            respond(s.id, TransportRefusals.headerListTooLarge(bytes: bytes, limit: limit))
        }
    }

    func endHeaders(_ sid: Int64, fin: Bool) -> Int32 {
        pendingHeads[sid] = nil
        guard let s = streams[sid] else { return 0 }
        if s.inTrailers { return 0 }
        if s.headerBlock.isTooLarge {
            headerListTooLarge(s, bytes: s.headerBlock.bytes, isTrailers: false, fin: fin)
            return 0
        }
        if isServer {
            serverRequest(s, fin: fin)
        } else {
            clientResponseHead(s, fin: fin)
        }
        return 0
    }
}
