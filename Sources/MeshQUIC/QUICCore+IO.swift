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
    // MARK: driving loop

    /// Client: send the first flight.
    func start() {
        writePackets()
    }

    /// A datagram for this connection.
    func receive(_ buffer: ByteBuffer, from remote: SocketAddress) {
        switch closeState.packetArrived(haveClosePacket: closePacket != nil) {
        case .process: break
        case .drop: return
        case .resendClose:
            // Answer (a few times) with the CONNECTION_CLOSE we already sent.
            if let p = closePacket {
                delegate?.quicCore(self, send: p, sends: [.init(offset: 0, length: p.readableBytes, segmentSize: nil)], to: remoteAddress)
            }
            return
        }
        let ts = QUICClock.now()
        inlineExpiries = 0
        // Answer once per read burst (the handler calls `flushAfterRead`), not per datagram;
        // set before reading so that writes asked for by callbacks join that flush.
        needsWrite = true
        let rv = withPath(remote: remote) { path in
            buffer.withUnsafeReadableBytes { b in
                cm_ngtcp2_conn_read_pkt(conn, path, b.baseAddress?.assumingMemoryBound(to: UInt8.self), b.count, ts)
            }
        }
        if rv != 0 {
            handleLibraryError(rv)
            return
        }
        processedAnyPacket = true
        lastHeard = ContinuousClock.now
    }

    /// End of a read burst: write what the datagrams just read made necessary (ACKs, data).
    func flushAfterRead() {
        deliverInbound()
        guard needsWrite else { return }
        needsWrite = false
        writePackets()
    }

    /// Coalesce write requests from callbacks and other tasks into one write loop.
    func scheduleWrite() {
        // In a read burst the burst's flush (`flushAfterRead`) writes anyway.
        guard !writeScheduled, !needsWrite, isActive else { return }
        writeScheduled = true
        loop.assumeIsolated().execute {
            self.writeScheduled = false
            self.writePackets()
        }
    }

    /// Sends packets `from...` of a burst (their sizes in `sizes`, laid out back to back in `out`).
    func sendBatch(_ out: ByteBuffer, sizes: [Int], from: Int, to destination: SocketAddress) {
        let offset = sizes[..<from].reduce(0, +)
        let slice = out.getSlice(at: out.readerIndex + offset, length: sizes[from...].reduce(0, +)) ?? out
        delegate?.quicCore(self, send: slice, sends: GSOBatcher.batches(sizes: Array(sizes[from...]), enabled: settings.gso && Self.gsoSupported),
                           to: destination)
    }

    /// The address in `addr` when it is not `current` (nil when it is: the common case, without
    /// building an address).
    static func differentRemote(_ addr: ngtcp2_addr, from current: SocketAddress) -> SocketAddress? {
        guard let sa = addr.addr else { return nil }
        let same = current.withSockAddr { p, len in
            len == Int(addr.addrlen) && memcmp(p, sa, len) == 0
        }
        if same { return nil }
        switch Int32(sa.pointee.sa_family) {
        case AF_INET:
            return UnsafeRawPointer(sa).withMemoryRebound(to: sockaddr_in.self, capacity: 1) { SocketAddress($0.pointee, host: "") }
        case AF_INET6:
            return UnsafeRawPointer(sa).withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { SocketAddress($0.pointee, host: "") }
        default:
            return nil
        }
    }

    /// Drain everything ngtcp2/nghttp3 want to send (bounded by the send quantum: pacing
    /// continues from the expiry timer), then re-arm the timer.
    func writePackets() {
        guard isActive, !inWrite else { return }
        inWrite = true
        defer { inWrite = false }
        let ts = QUICClock.now()
        let mtu = max(1200, ngtcp2_conn_get_max_tx_udp_payload_size(conn))
        let quantum = ngtcp2_conn_get_send_quantum(conn)
        let maxPackets = max(1, min(Self.maxBurstPackets, quantum / mtu))
        // The whole burst in one buffer sized up front (no regrowth copies mid-burst).
        var out = allocator.buffer(capacity: mtu * maxPackets)
        var sizes: [Int] = []
        sizes.reserveCapacity(maxPackets)
        var vecs = [nghttp3_vec](repeating: nghttp3_vec(), count: 16)
        var fatal: Int32 = 0
        var fatalIsH3 = false
        var ps = ngtcp2_path_storage()
        ngtcp2_path_storage_zero(&ps)
        // The path of the packets gathered so far; a packet for another path (a PATH_CHALLENGE
        // to a peer's new address, then everything once it is validated) sends what is gathered
        // first and switches.
        var destination = remoteAddress
        var batchStart = 0
        outer: while sizes.count < maxPackets {
            var sid: Int64 = -1
            var fin: Int32 = 0
            var count = 0
            if let h3, ngtcp2_conn_get_max_data_left(conn) > 0 {
                let n = nghttp3_conn_writev_stream(h3, &sid, &fin, &vecs, vecs.count)
                if n < 0 {
                    logger.debug("nghttp3_conn_writev_stream failed", metadata: ["error": "\(n)"])
                    fatal = Int32(truncatingIfNeeded: n)
                    fatalIsH3 = true
                    break
                }
                count = n
            }
            var flags = UInt32(NGTCP2_WRITE_STREAM_FLAG_MORE)
            if fin != 0 { flags |= UInt32(NGTCP2_WRITE_STREAM_FLAG_FIN) }
            var ndatalen: ngtcp2_ssize = -1
            var nwrite = 0
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: mtu) { dest in
                let r = vecs.withUnsafeBufferPointer { v in
                    v.baseAddress!.withMemoryRebound(to: ngtcp2_vec.self, capacity: v.count) { nv in
                        withUnsafeMutablePointer(to: &ps.path) { path in
                            cm_ngtcp2_conn_writev_stream(conn, path, dest.baseAddress!.assumingMemoryBound(to: UInt8.self), mtu,
                                                         &ndatalen, flags, sid, count > 0 ? nv : nil, count, ts)
                        }
                    }
                }
                nwrite = r
                return r > 0 ? r : 0
            }
            if nwrite < 0 {
                switch Int32(nwrite) {
                case NGTCP2_ERR_STREAM_DATA_BLOCKED:
                    if let h3 { nghttp3_conn_block_stream(h3, sid) }
                    continue outer
                case NGTCP2_ERR_STREAM_SHUT_WR:
                    if let h3 { nghttp3_conn_shutdown_stream_write(h3, sid) }
                    continue outer
                case NGTCP2_ERR_WRITE_MORE:
                    if let h3, nghttp3_conn_add_write_offset(h3, sid, Int(ndatalen)) != 0 { fatal = -1; fatalIsH3 = true; break outer }
                    continue outer
                default:
                    fatal = Int32(nwrite)
                    break outer
                }
            }
            if ndatalen >= 0, let h3, sid >= 0 {
                if nghttp3_conn_add_write_offset(h3, sid, Int(ndatalen)) != 0 { fatal = -1; fatalIsH3 = true; break }
            }
            if nwrite == 0 { break }
            if let other = Self.differentRemote(ps.path.remote, from: destination) {
                if sizes.count > batchStart {
                    sendBatch(out, sizes: sizes, from: batchStart, to: destination)
                }
                batchStart = sizes.count
                destination = other
                if remoteAddress != other {
                    logger.debug("QUIC peer address changed", metadata: ["from": "\(remoteAddress.endpoint)", "to": "\(other.endpoint)"])
                    remoteAddress = other
                }
            }
            sizes.append(nwrite)
        }
        if !sizes.isEmpty {
            packetsSent += sizes.count
            if sizes.count > batchStart { sendBatch(out, sizes: sizes, from: batchStart, to: destination) }
            ngtcp2_conn_update_pkt_tx_time(conn, ts)
        }
        if fatal != 0 {
            var e = ngtcp2_connection_close_error()
            if !fatalIsH3 {
                ngtcp2_connection_close_error_set_transport_error_liberr(&e, fatal, nil, 0)
            } else {
                ngtcp2_connection_close_error_set_application_error(&e, UInt64(NGHTTP3_H3_INTERNAL_ERROR), nil, 0)
            }
            inWrite = false
            closeWith(e, error: QUICError.internalError("write: \(fatal)"))
            return
        }
        if sizes.count >= maxPackets {
            // Stopped by the send quantum, not by congestion, flow control or pacing: go on
            // with the next burst on the next loop turn (after pending reads, e.g. ACKs)
            // instead of waiting for the pacing timer. ngtcp2 refuses (writes 0) when pacing
            // really holds us back, and that write re-arms the expiry timer.
            scheduleWrite()
        } else {
            inWrite = false  // updateTimer may write again (after handling an expiry inline)
            updateTimer()
        }
    }

    /// Packets per write burst (one GSO send when they are of one size): the send quantum
    /// allows ~45 full-size packets; Linux takes up to 64 segments per GSO send.
    static let maxBurstPackets = 64

    func updateTimer() {
        guard isActive else { return }
        let now = QUICClock.now()
        let expiry = ngtcp2_conn_get_expiry(conn)
        if expiry < now + ExpiryTimerState.minimumDelay, inlineExpiries < Self.maxInlineExpiries {
            // Almost always the pacing deadline of the burst just sent: ngtcp2 clears it only in
            // handle_expiry (and lets packets go up to 1 ms before it anyway). Handling it here
            // saves a timer task, an epoll wake-up and a timerfd update per burst. Then write
            // again, always: data held back by pacing is no longer held back (and nothing would
            // wake us for it now that the deadline is gone: skipping this write stalled
            // transfers), and a deadline that was really due (loss detection, ACK delay) may
            // have queued packets. That write ends by coming back here (bounded).
            inlineExpiries += 1
            guard handleExpiry(now: now) else { return }
            writePackets()
            return
        }
        if case .schedule(let at) = timerState.update(expiry: expiry, now: now) {
            armTimer(at: at)
        }
    }

    /// Inline expiry handling in a row without a packet read or a timer firing in between
    /// (bounds `updateTimer` → `writePackets` → `updateTimer`; beyond it the timer takes over).
    static let maxInlineExpiries = 4

    func armTimer(at deadline: UInt64) {
        timer?.cancel()
        timer = loop.assumeIsolated().scheduleTask(deadline: .uptimeNanoseconds(deadline)) { [weak self] in
            self?.onTimer()
        }
    }

    func onTimer() {
        timer = nil
        inlineExpiries = 0
        guard isActive else { return }
        let now = QUICClock.now()
        switch timerState.fired(now: now, expiry: ngtcp2_conn_get_expiry(conn)) {
        case .idle: return
        case .rearm(let at):
            armTimer(at: at)
            return
        case .handleExpiry: break
        }
        if handleExpiry(now: now) { writePackets() }
    }

    /// `ngtcp2_conn_handle_expiry`; false if that ended the connection.
    func handleExpiry(now: UInt64) -> Bool {
        let rv = ngtcp2_conn_handle_expiry(conn, now)
        guard rv != 0 else { return true }
        switch rv {
        case NGTCP2_ERR_IDLE_CLOSE:
            finalize(error: QUICError.timeout)
        case NGTCP2_ERR_HANDSHAKE_TIMEOUT:
            let after = "\(settings.handshakeTimeout.nanoseconds / 1_000_000) ms"
            finalize(error: QUICError.handshakeFailed(isServer
                ? "handshake timed out after \(after)"
                : "no answer over UDP from \(remoteAddress.endpoint) within \(after) (is UDP blocked on the way, or is the node running without --quic-listen?)"))
        default:
            var e = ngtcp2_connection_close_error()
            ngtcp2_connection_close_error_set_transport_error_liberr(&e, rv, nil, 0)
            closeWith(e, error: QUICError.internalError(Self.errString(rv)))
        }
        return false
    }

    /// Congestion/RTT figures for logs.
    var statsDescription: String {
        guard let conn else { return "-" }
        var st = ngtcp2_conn_stat()
        cm_ngtcp2_conn_get_conn_stat(conn, &st)
        return "cwnd=\(st.cwnd) ssthresh=\(st.ssthresh) srtt=\(st.smoothed_rtt / 1000)us minrtt=\(st.min_rtt / 1000)us inflight=\(st.bytes_in_flight) pto_count=\(st.pto_count) rate=\(st.delivery_rate_sec)"
    }
}
