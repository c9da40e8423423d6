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

protocol QUICCoreDelegate: AnyObject {
    /// Send `sends` (slices of `buffer`) to `remote` and flush.
    func quicCore(_ core: QUICCore, send buffer: ByteBuffer, sends: [GSOBatcher.Send], to remote: SocketAddress)
    func quicCore(_ core: QUICCore, didIssue cid: ConnectionID)
    func quicCore(_ core: QUICCore, didRetire cid: ConnectionID)
    func quicCoreHandshakeCompleted(_ core: QUICCore)
    func quicCoreDidClose(_ core: QUICCore, error: (any Error)?)
}

/// One QUIC connection: ngtcp2_conn + GnuTLS session + nghttp3_conn, driven on one event loop.
/// Owns its C objects; callbacks find it through `user_data` (unretained: the owner — a server
/// routing table or a client handler — keeps it alive while the C objects exist).
final class QUICCore {
    enum Role {
        case server(ClientAuthentication, any HTTPService)
        case client(serverName: String)
    }


    let role: Role
    let isServer: Bool
    let loop: any EventLoop
    let settings: QUICSettings
    let logger: Logger
    weak var delegate: QUICCoreDelegate?
    let localAddress: SocketAddress
    /// Where packets go: the handshake's address until ngtcp2 writes for another path (the
    /// peer's address changed — NAT rebinding — and ngtcp2 validates the new one, RFC 9000 §9).
    var remoteAddress: SocketAddress
    let scid: ConnectionID
    var originalDCID: ConnectionID?

    // The C objects this connection owns (freed in deinit).
    private(set) var conn: OpaquePointer!
    private(set) var h3: OpaquePointer?
    private(set) var tls: OpaquePointer!
    let connRef: UnsafeMutablePointer<ngtcp2_crypto_conn_ref>
    let tlsContext: QUICTLSContext
    private(set) var nameCheck: ServerNameCheck?

    var streams: [Int64: H3Stream] = [:]
    /// Active, closing, draining, closed (RFC 9000 §10): see `QUICCloseState`.
    var closeState: QUICCloseState
    var isActive: Bool { closeState.isActive }
    var timer: Scheduled<Void>?
    var timerState = ExpiryTimerState()
    var inlineExpiries = 0
    /// The CONNECTION_CLOSE we sent, repeated to a peer that goes on sending.
    var closePacket: ByteBuffer?
    var peer: PeerIdentity?
    var handshakeCompleted = false
    /// Client: HANDSHAKE_DONE received (the server accepted us).
    var handshakeConfirmed = false
    var processedAnyPacket = false
    /// Client: a Stateless Reset matched one of the peer's tokens.
    var statelessResetReceived = false
    var writeScheduled = false
    var needsWrite = false
    /// Streams with `pendingInbound` bytes in this read burst.
    var inboundDirty: [H3Stream] = []
    /// Packets written so far (a server connection that answers nothing to its first Initial
    /// was not a real handshake: it is dropped at once instead of lingering until the timeout).
    var packetsSent = 0
    var inWrite = false
    let allocator = ByteBufferAllocator()
    var failure: (any Error)?

    /// Server: the graceful close when the node drains (GOAWAY notice, final GOAWAY, close).
    var drain = ConnectionDrain()
    // client
    var pending: [(head: HTTPRequestHead, body: HTTPOutboundBody, token: RequestToken, cont: CheckedContinuation<HTTPClientResponse, any Error>)] = []
    var goawayID: Int64?
    /// Set from the loop; read from any thread by the client wrapper.
    let flags = QUICConnectionFlags()

    lazy var weakSelf = WeakCore(self)

    // MARK: state the extensions keep
    /// Set when this side refused the peer's certificate after the handshake (role rules,
    /// optional-mode verification): the alert the connection close carries.
    var refusalAlert: UInt8?
    /// Header blocks over the limit on this connection (431 first, then H3_EXCESSIVE_LOAD).
    var headerPolicy = HeaderLimitPolicy()
    var stallCheck: RepeatedTask?
    /// This connection's share of the node's request-body budget (server side).
    var bodyBudget: BodyBudgetConnection?
    /// Request streams whose header section has not ended, since their first byte (server).
    var pendingHeads: [Int64: ContinuousClock.Instant] = [:]
    var headCheck: RepeatedTask?
    /// Client side: when a packet from the server last arrived, and since when requests are
    /// outstanding (silence counts from the later of the two).
    var lastHeard = ContinuousClock.now
    var busySince = ContinuousClock.now
    var darkCheck: RepeatedTask?
    var darkCheckTick = ContinuousClock.now

    // MARK: creation

    /// Server side: `hd` is the accepted client Initial (`ngtcp2_accept`); `retry` is set when
    /// that Initial carried a valid Retry token of ours (the client's address is validated).
    convenience init(server hd: ngtcp2_pkt_hd, retry: ValidatedRetry? = nil, authentication: ClientAuthentication, service: any HTTPService,
                     tls tlsContext: QUICTLSContext, settings: QUICSettings, local: SocketAddress, remote: SocketAddress,
                     loop: any EventLoop, logger: Logger) throws {
        try self.init(side: .server(hd, retry, authentication, service), tls: tlsContext, settings: settings, local: local, remote: remote,
                      loop: loop, logger: logger)
    }

    /// What a valid Retry token proved: the DCID of the client's first Initial and the token.
    struct ValidatedRetry {
        var originalDCID: ngtcp2_cid
        var token: [UInt8]
    }

    /// Client side.
    convenience init(clientServerName serverName: String, tls tlsContext: QUICTLSContext, settings: QUICSettings,
                     local: SocketAddress, remote: SocketAddress, loop: any EventLoop, logger: Logger) throws {
        try self.init(side: .client(serverName), tls: tlsContext, settings: settings, local: local, remote: remote, loop: loop, logger: logger)
    }

    private enum Side {
        case server(ngtcp2_pkt_hd, ValidatedRetry?, ClientAuthentication, any HTTPService)
        case client(String)
    }

    /// Both sides: the same state, crypto conn_ref, TLS session and callbacks; they differ in the
    /// transport parameters, the connection IDs and the ngtcp2 constructor.
    private init(side: Side, tls tlsContext: QUICTLSContext, settings: QUICSettings, local: SocketAddress, remote: SocketAddress,
                 loop: any EventLoop, logger: Logger) throws {
        switch side {
        case .server(let hd, _, let authentication, let service):
            self.role = .server(authentication, service)
            self.isServer = true
            self.originalDCID = ConnectionID(hd.dcid)
        case .client(let serverName):
            self.role = .client(serverName: serverName)
            self.isServer = false
        }
        self.loop = loop
        self.closeState = QUICCloseState(isServer: isServer)
        self.settings = settings
        self.logger = logger
        self.localAddress = local
        self.remoteAddress = remote
        self.scid = .random()
        self.tlsContext = tlsContext
        self.connRef = .allocate(capacity: 1)
        connRef.initialize(to: ngtcp2_crypto_conn_ref(get_conn: { ref in
            Unmanaged<QUICCore>.fromOpaque(ref!.pointee.user_data!).takeUnretainedValue().conn
        }, user_data: nil))
        connRef.pointee.user_data = Unmanaged.passUnretained(self).toOpaque()
        (tls, nameCheck) = try tlsContext.makeSession(role: role, connRef: connRef)
        var callbacks = Self.makeCallbacks(server: isServer)
        var st = makeSettings()
        var params = makeTransportParams()
        var ourSCID = scid.ngtcp2
        var c: OpaquePointer?
        let user = Unmanaged.passUnretained(self).toOpaque()
        let rv: Int32
        let constructor: String
        switch side {
        case .server(let hd, let retry, _, _):
            if let retry {
                // RFC 9000 §7.3: the first Initial's DCID, and the SCID our Retry gave the client.
                params.original_dcid = retry.originalDCID
                params.retry_scid = hd.dcid
                params.retry_scid_present = 1
            } else {
                params.original_dcid = hd.dcid
            }
            params.stateless_reset_token_present = 1
            withUnsafeMutableBytes(of: &params.stateless_reset_token) {
                settings.resetSecret.write(token: $0.baseAddress!.assumingMemoryBound(to: UInt8.self), for: scid)
            }
            params.disable_active_migration = 1
            var dcid = hd.scid
            constructor = "ngtcp2_conn_server_new"
            let token = retry?.token ?? []
            rv = token.withUnsafeBufferPointer { t in
                // ngtcp2 copies the token: a validated one lifts the 3x amplification limit.
                if !t.isEmpty { st.token = ngtcp2_vec(base: UnsafeMutablePointer(mutating: t.baseAddress), len: t.count) }
                return withPath(remote: remote) { path in
                    cm_ngtcp2_conn_server_new(&c, &dcid, &ourSCID, path, hd.version, &callbacks, &st, &params, user)
                }
            }
        case .client:
            var dcid = ConnectionID.random().ngtcp2
            constructor = "ngtcp2_conn_client_new"
            rv = withPath(remote: remote) { path in
                cm_ngtcp2_conn_client_new(&c, &dcid, &ourSCID, path, NGTCP2_PROTO_VER_V1, &callbacks, &st, &params, user)
            }
        }
        guard rv == 0, let c else {
            // Every stored property is set, so `deinit` runs after this throw and frees the TLS
            // session and conn_ref (freeing them here too was a double free).
            throw QUICError.internalError("\(constructor): \(Self.errString(rv))")
        }
        conn = c
        ngtcp2_conn_set_tls_native_handle(c, UnsafeMutableRawPointer(tls))
    }

    deinit {
        timer?.cancel()
        stallCheck?.cancel()
        headCheck?.cancel()
        for (_, s) in streams { s.closeSource() }
        if let h3 { nghttp3_conn_del(h3) }
        if let conn { ngtcp2_conn_del(conn) }
        if let tls { gnutls_deinit(tls) }
        connRef.deallocate()
    }

    func makeSettings() -> ngtcp2_settings {
        var st = ngtcp2_settings()
        cm_ngtcp2_settings_default(&st)
        st.initial_ts = QUICClock.now()
        st.initial_rtt = UInt64(settings.initialRTT.nanoseconds)
        st.max_window = settings.maxConnectionWindow
        st.max_stream_window = settings.streamWindow
        st.handshake_timeout = UInt64(settings.handshakeTimeout.nanoseconds)
        switch settings.congestionControl {
        case .cubic: st.cc_algo = NGTCP2_CC_ALGO_CUBIC
        case .bbr: st.cc_algo = NGTCP2_CC_ALGO_BBR
        case .bbr2: st.cc_algo = NGTCP2_CC_ALGO_BBR2
        case .reno: st.cc_algo = NGTCP2_CC_ALGO_RENO
        }
        if let n = settings.maxDatagramSize {
            let r = QUICSettings.datagramSizeRange
            st.max_tx_udp_payload_size = min(max(n, r.lowerBound), r.upperBound)
            st.no_tx_udp_payload_size_shaping = 1
        } else {
            st.max_tx_udp_payload_size = 1452
        }
        return st
    }

    func makeTransportParams() -> ngtcp2_transport_params {
        var p = ngtcp2_transport_params()
        cm_ngtcp2_transport_params_default(&p)
        p.initial_max_stream_data_bidi_local = settings.streamWindow
        p.initial_max_stream_data_bidi_remote = isServer && settings.requestBodyBudget != nil ? UInt64(QUICSettings.budgetStreamWindow) : settings.streamWindow
        p.initial_max_stream_data_uni = 1 << 20
        p.initial_max_data = settings.connectionWindow
        p.initial_max_streams_bidi = isServer ? settings.maxConcurrentStreams : 0
        p.initial_max_streams_uni = 8
        p.max_idle_timeout = UInt64(settings.idleTimeout.nanoseconds)
        p.max_ack_delay = UInt64(settings.maxAckDelay.nanoseconds)
        p.active_connection_id_limit = 4
        return p
    }

    func withPath<R>(remote: SocketAddress, _ body: (UnsafeMutablePointer<ngtcp2_path>) -> R) -> R {
        var ps = ngtcp2_path_storage()
        return withUnsafeMutablePointer(to: &ps) { p in
            localAddress.withSockAddr { lp, ll in
                remote.withSockAddr { rp, rl in
                    ngtcp2_path_storage_init(p, lp, ngtcp2_socklen(ll), rp, ngtcp2_socklen(rl), nil)
                }
            }
            // `path` is the first member of ngtcp2_path_storage.
            return body(UnsafeMutableRawPointer(p).assumingMemoryBound(to: ngtcp2_path.self))
        }
    }

    static func errString(_ rv: Int32) -> String {
        String(cString: ngtcp2_strerror(rv))
    }

    static let gsoSupported = System.supportsUDPSegmentationOffload

    /// The connection behind a C callback's `user_data`, borrowed for the call without a
    /// retain/release pair (QUICCore has weak references, so every retain of it goes through its
    /// side table: ~3% of the CPU of a transfer when each callback did one).
    @inline(__always)
    static func with<R>(_ p: UnsafeMutableRawPointer?, _ body: (QUICCore) -> R) -> R {
        Unmanaged<QUICCore>.fromOpaque(p!)._withUnsafeGuaranteedRef(body)
    }

    func setupHTTP3() -> Int32 {
        guard h3 == nil else { return 0 }
        var cb = Self.makeH3Callbacks()
        var st = nghttp3_settings()
        cm_nghttp3_settings_default(&st)
        st.qpack_max_dtable_capacity = 4096
        st.max_field_section_size = UInt64(settings.maxHeaderListSize)
        st.qpack_blocked_streams = 100
        var c: OpaquePointer?
        let ud = Unmanaged.passUnretained(self).toOpaque()
        let rv = isServer ? cm_nghttp3_conn_server_new(&c, &cb, &st, ud) : cm_nghttp3_conn_client_new(&c, &cb, &st, ud)
        guard rv == 0, let c else { return NGTCP2_ERR_CALLBACK_FAILURE }
        h3 = c
        if isServer { nghttp3_conn_set_max_client_streams_bidi(c, settings.maxConcurrentStreams) }
        guard ngtcp2_conn_get_streams_uni_left(conn) >= 3 else { return NGTCP2_ERR_CALLBACK_FAILURE }
        var ctrl: Int64 = -1, qenc: Int64 = -1, qdec: Int64 = -1
        guard ngtcp2_conn_open_uni_stream(conn, &ctrl, nil) == 0,
              nghttp3_conn_bind_control_stream(c, ctrl) == 0,
              ngtcp2_conn_open_uni_stream(conn, &qenc, nil) == 0,
              ngtcp2_conn_open_uni_stream(conn, &qdec, nil) == 0,
              nghttp3_conn_bind_qpack_streams(c, qenc, qdec) == 0 else { return NGTCP2_ERR_CALLBACK_FAILURE }
        return 0
    }

    func handleLibraryError(_ rv: Int32) {
        switch rv {
        case NGTCP2_ERR_DRAINING where statelessResetReceived:
            enterDraining(error: QUICError.statelessReset)
        case NGTCP2_ERR_DRAINING:
            // The peer closed (CONNECTION_CLOSE received); during the handshake, a CRYPTO_ERROR
            // says which TLS alert (e.g. the server refused our certificate: unknown CA).
            if handshakeConfirmed || (isServer && handshakeCompleted) {
                enterDraining(error: QUICError.closedByPeer)
            } else {
                var ccerr = ngtcp2_connection_close_error()
                ngtcp2_conn_get_connection_close_error(conn, &ccerr)
                let code = ccerr.error_code
                if ccerr.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_TRANSPORT, code >= UInt64(NGTCP2_CRYPTO_ERROR), code <= UInt64(NGTCP2_CRYPTO_ERROR) + 0xff {
                    let alert = TLSAlertReceived(alert: UInt32(code - UInt64(NGTCP2_CRYPTO_ERROR)), weAreClient: !isServer)
                    enterDraining(error: QUICError.handshakeFailed("\(alert)"))
                } else {
                    enterDraining(error: QUICError.handshakeFailed("the peer closed the connection during the handshake (transport error \(code))"))
                }
            }
        case NGTCP2_ERR_RETRY, NGTCP2_ERR_DROP_CONN:
            finalize(error: QUICError.closedByPeer)
        case NGTCP2_ERR_CRYPTO:
            // GnuTLS refused the handshake: say why (the peer's certificate did not verify, or
            // none was sent) with the matching alert, as CRYPTO_ERROR 0x100 + alert.
            var alert = ngtcp2_conn_get_tls_alert(conn)
            var why = "TLS alert \(alert)\(verifyStatusDescription())"
            if let refusal = certificateRefusal() {
                alert = UInt8(refusal.alert)
                why = refusal.description
                if isServer { TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic alert \(refusal.alert)", "\(refusal) (QUIC)") }
            }
            var e = ngtcp2_connection_close_error()
            ngtcp2_connection_close_error_set_transport_error_tls_alert(&e, alert, nil, 0)
            closeWith(e, error: QUICError.handshakeFailed(why))
        case NGTCP2_ERR_CALLBACK_FAILURE where refusalAlert != nil:
            // onHandshakeCompleted refused the peer's certificate (logged there): tell it with the alert.
            var e = ngtcp2_connection_close_error()
            ngtcp2_connection_close_error_set_transport_error_tls_alert(&e, refusalAlert!, nil, 0)
            closeWith(e, error: QUICError.handshakeFailed("peer certificate refused (TLS alert \(refusalAlert!))"))
        default:
            if isServer && !processedAnyPacket {
                // A bogus first packet: forget it without a word.
                finalize(error: QUICError.internalError(Self.errString(rv)))
                return
            }
            var e = ngtcp2_connection_close_error()
            ngtcp2_connection_close_error_set_transport_error_liberr(&e, rv, nil, 0)
            closeWith(e, error: QUICError.internalError(Self.errString(rv)))
        }
    }

    // MARK: closing

    /// Close with an application error code (HTTP/3 code), e.g. H3_NO_ERROR after a drain.
    func closeApplication(code: UInt64 = UInt64(NGHTTP3_H3_NO_ERROR), error: any Error = HTTPTransportError.connectionClosed) {
        var e = ngtcp2_connection_close_error()
        ngtcp2_connection_close_error_set_application_error(&e, code, nil, 0)
        closeWith(e, error: error)
    }

    func closeWith(_ ccerr: ngtcp2_connection_close_error, error: any Error) {
        guard isActive else { return }
        let libraryClosing = ngtcp2_conn_is_in_closing_period(conn) != 0 || ngtcp2_conn_is_in_draining_period(conn) != 0
        perform(closeState.close(libraryClosing: libraryClosing, pto: ngtcp2_conn_get_pto(conn)), ccerr: ccerr, error: error)
    }

    /// The peer closed (CONNECTION_CLOSE, a Stateless Reset): the draining period.
    func enterDraining(error: any Error) {
        perform(closeState.peerClosed(pto: ngtcp2_conn_get_pto(conn)), ccerr: nil, error: error)
    }

    private func perform(_ action: QUICCloseState.Close, ccerr: ngtcp2_connection_close_error?, error: any Error) {
        switch action {
        case .none:
            return
        case .drain(let after):
            failure = failure ?? error
            failAll(error)
            scheduleFinalize(after: after, error: error)
        case .sendClose(let after):
            var e = ccerr ?? ngtcp2_connection_close_error()
            var buf = allocator.buffer(capacity: 1500)
            var ps = ngtcp2_path_storage()
            ngtcp2_path_storage_zero(&ps)
            let ts = QUICClock.now()
            buf.writeWithUnsafeMutableBytes(minimumWritableBytes: 1452) { dest in
                let r = withUnsafeMutablePointer(to: &ps.path) { path in
                    cm_ngtcp2_conn_write_connection_close(conn, path, dest.baseAddress!.assumingMemoryBound(to: UInt8.self), 1452, &e, ts)
                }
                return r > 0 ? r : 0
            }
            failure = failure ?? error
            failAll(error)
            if buf.readableBytes > 0 {
                closePacket = buf
                delegate?.quicCore(self, send: buf, sends: [.init(offset: 0, length: buf.readableBytes, segmentSize: nil)], to: remoteAddress)
            }
            // A client has nothing more to say; a server lingers to repeat the close for stragglers.
            scheduleFinalize(after: after, error: error)
        }
    }

    func scheduleFinalize(after: TimeAmount, error: any Error) {
        timer?.cancel()
        timerState = ExpiryTimerState()
        timer = loop.assumeIsolated().scheduleTask(in: after) { [weak self] in
            self?.finalize(error: error)
        }
    }

    /// Gone for good: the owner drops its routes and its reference.
    func finalize(error: (any Error)?) {
        guard closeState.finalize() else { return }
        logger.debug("QUIC connection closed", metadata: ["stats": "\(statsDescription)", "server": "\(isServer)"])
        bodyBudget?.close()
        failure = failure ?? error
        timer?.cancel()
        timer = nil
        stallCheck?.cancel()
        stallCheck = nil
        headCheck?.cancel()
        headCheck = nil
        darkCheck?.cancel()
        darkCheck = nil
        failAll(error ?? HTTPTransportError.connectionClosed)
        flags.closed.withLock { $0 = true }
        delegate?.quicCoreDidClose(self, error: failure)
    }

    func failAll(_ error: any Error) {
        flags.closed.withLock { $0 = true }
        if let q = error as? QUICError { flags.closeReason.withLock { $0 = $0 ?? q } }
        let transportError: any Error = (error as? HTTPTransportError) ?? HTTPTransportError.connectionClosed
        let inFlight = activeRequestStreams
        if inFlight > 0, !(error is HTTPTransportError) {
            // A client that closes its connection (it has what it wanted, or it gave up) may leave
            // streams the server still counts: its choice, not a failure worth a warning. Anything
            // else: callers only see "connection closed", so say here why it closed under them.
            // Congestion figures are for debugging only.
            if isServer, (error as? QUICError) == .closedByPeer {
                logger.debug("QUIC client closed its connection with \(inFlight) request stream(s) open", metadata: [
                    "remote": "\(remoteAddress.endpoint)", "stats": "\(statsDescription)",
                ])
            } else {
                logger.warning("QUIC connection failed with \(inFlight) request(s) in flight: \(error)", metadata: [
                    "remote": "\(remoteAddress.endpoint)", "peer": "\(peer?.commonName ?? "-")",
                ])
                logger.debug("QUIC connection stats at the failure", metadata: ["remote": "\(remoteAddress.endpoint)", "stats": "\(statsDescription)"])
            }
        }
        let all = streams
        streams = [:]
        inboundDirty = []
        for (_, s) in all {
            s.pendingInbound = nil
            if !s.inboundEnded { s.body?.fail(transportError) }
            s.inboundEnded = true
            s.handler?.cancel()
            if let c = s.continuation {
                s.continuation = nil
                c.resume(throwing: error is QUICError && !handshakeCompleted ? error : transportError)
            }
            s.closeSource()
            s.held.removeAll()
        }
        let p = pending
        pending = []
        for r in p {
            r.body.discard()
            r.cont.resume(throwing: transportError)
        }
    }

}
