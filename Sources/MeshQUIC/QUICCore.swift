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

/// Tunables of a QUIC connection (both roles). Defaults are sized for a LAN.
public struct QUICSettings: Sendable {
    /// Counts requests cut when a server's drain grace period ends (nil: not counted).
    public var drainCuts: DrainCuts?
    /// Initial (and auto-tuning maximum) per-stream receive window.
    public var streamWindow: UInt64 = 16 << 20
    /// Initial connection receive window; auto-tuning may grow it to `maxConnectionWindow`.
    public var connectionWindow: UInt64 = 64 << 20
    public var maxConnectionWindow: UInt64 = 128 << 20
    /// Concurrent request streams a client may open (server side).
    public var maxConcurrentStreams: UInt64 = 128
    public var idleTimeout: TimeAmount = .seconds(30)
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// A client whose requests are outstanding PINGs a server it has not heard from for this
    /// long (zero: never). The ACK proves the path alive and makes both sides write whatever
    /// they hold (a response or flow-control credit) instead of waiting out the idle timeout.
    public var keepAliveWhileBusy: TimeAmount = .seconds(2)
    /// A client whose requests are outstanding and that has heard nothing from the server for
    /// this long (at least 3 PTOs, with at least two probe timeouts in a row) closes the
    /// connection with `QUICError.pathDark` instead of waiting out the idle timeout: with
    /// keep-alive PINGs every `keepAliveWhileBusy`, any live peer on a working path answers well
    /// within it, so silence means the path (UDP dropped somewhere) or the peer is gone. Time
    /// the client's own event loop did not run does not count. nil: never.
    public var darkPathTimeout: TimeAmount? = .seconds(3)
    /// RTT assumed before the first sample: a LAN, not the Internet's 333 ms.
    public var initialRTT: TimeAmount = .milliseconds(1)
    /// Advertised max_ack_delay (not below ~5 ms: fewer ACK-only packets under load).
    public var maxAckDelay: TimeAmount = .milliseconds(5)
    /// Send runs of equal-size packets with UDP GSO (one syscall per up to 64 packets).
    public var gso: Bool = true
    /// Receive coalesced datagrams (UDP GRO) where the kernel supports it.
    public var gro: Bool = true
    /// Congestion control.
    public var congestionControl: CongestionControl = .cubic
    /// The largest UDP payload this side sends, for paths known to carry it (a LAN with jumbo
    /// frames: 8952 for a 9000-byte MTU; loopback). nil: start at 1200 bytes and let path MTU
    /// discovery grow it to at most 1452 (ngtcp2 0.12.1 probes no further). When set, every
    /// packet may be this large from the handshake on, as with `gtlsserver
    /// --max-udp-payload-size` (the peer's max_udp_payload_size still bounds it): on a path with
    /// a smaller MTU the kernel fragments them, so set it only where the path takes it.
    public var maxDatagramSize: Int?
    /// Largest decoded request (or response) header list, RFC 9114 §4.2.2 size; a larger request
    /// gets 431, repeated ones close the connection with H3_EXCESSIVE_LOAD.
    public var maxHeaderListSize: Int = 64 * 1024
    /// A request body from which nothing arrives for this long fails (server side; 408, the
    /// stream is stopped). nil: never.
    public var requestBodyIdleTimeout: Duration? = .seconds(30)
    /// With the idle timeout: a request body slower than this (bytes/s) fails too. 0: no minimum.
    public var requestBodyMinRate: Int = 16 * 1024
    /// A response whose flow-control window the client keeps closed for this long is reset
    /// (server side), giving back its read slot. nil: never.
    public var responseStallTimeout: Duration? = .seconds(30)
    /// The node's request-body budget (server side; see `RequestBodyBudget`): the connection
    /// window starts at `budgetBaseWindow` and grows only within the budget.
    public var requestBodyBudget: RequestBodyBudget?
    /// A request stream whose header section is not complete this long after its first byte is
    /// reset (H3_REQUEST_INCOMPLETE; server side). nil: never.
    public var requestHeadersTimeout: Duration? = .seconds(20)
    public static let budgetBaseWindow = 256 * 1024
    /// With a budget, request streams start with this window and grow (doubling as their body is
    /// read, up to `streamWindow`) only while read: a stream waiting for a write slot holds little.
    public static let budgetStreamWindow = 64 * 1024

    /// The secret stateless-reset tokens are derived from (nil: one random secret per process).
    /// A server should be given a stable one (the node derives it from its private key), so that
    /// after a restart it can reset the connections its previous run had.
    public var statelessResetSecret: StatelessResetSecret?

    /// The secret in use: the one given, else the process's.
    var resetSecret: StatelessResetSecret { statelessResetSecret ?? .process }

    /// Values `maxDatagramSize` may take (RFC 9000: at least 1200; a UDP payload at most 65527).
    public static let datagramSizeRange = 1200...65_527

    public enum CongestionControl: Sendable {
        case cubic, bbr, bbr2, reno
    }

    public init() {}
}

/// Errors of a QUIC connection as a whole (handshake, timeouts).
public enum QUICError: Error, Sendable, CustomStringConvertible, Equatable {
    case handshakeFailed(String)
    case closedByPeer
    case timeout
    /// The peer sent a Stateless Reset: it no longer knows this connection (it restarted).
    case statelessReset
    /// Nothing arrived from the peer for the dark-path timeout while requests were outstanding.
    case pathDark(String)
    case internalError(String)

    public var description: String {
        switch self {
        case .handshakeFailed(let s): "QUIC handshake failed: \(s)"
        case .closedByPeer: "QUIC connection closed by peer"
        case .timeout: "QUIC connection timed out"
        case .statelessReset: "QUIC connection reset by the peer (stateless reset: it lost the connection, e.g. restarted)"
        case .pathDark(let s): "QUIC path went dark: \(s)"
        case .internalError(let s): "QUIC internal error: \(s)"
        }
    }
}

/// GnuTLS priorities for QUIC: TLS 1.3 only (ngtcp2_crypto_gnutls requires it), no middlebox
/// compatibility mode (forbidden by RFC 9001), AES-GCM first.
final class QUICTLSContext: @unchecked Sendable {
    static let priorityString =
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:%DISABLE_TLS13_COMPAT_MODE"
    let credentials: TLSCredentials
    let priority: gnutls_priority_t

    init(credentials: TLSCredentials) throws {
        var prio: gnutls_priority_t?
        let rc = gnutls_priority_init(&prio, Self.priorityString, nil)
        guard rc >= 0, let prio else { throw TLSError(code: rc, context: "QUIC priority string") }
        self.credentials = credentials
        self.priority = prio
    }

    deinit { gnutls_priority_deinit(priority) }
}

protocol QUICCoreDelegate: AnyObject {
    /// Send `sends` (slices of `buffer`) to `remote` and flush.
    func quicCore(_ core: QUICCore, send buffer: ByteBuffer, sends: [GSOBatcher.Send], to remote: SocketAddress)
    func quicCore(_ core: QUICCore, didIssue cid: ConnectionID)
    func quicCore(_ core: QUICCore, didRetire cid: ConnectionID)
    func quicCoreHandshakeCompleted(_ core: QUICCore)
    func quicCoreDidClose(_ core: QUICCore, error: (any Error)?)
}

/// Identifies a client request until it has a stream (cancellation before/after open).
final class RequestToken: Sendable {
    let cancelled = Mutex(false)
}

/// Weak reference usable from @Sendable closures (hopping back onto the loop).
final class WeakCore {
    weak var core: QUICCore?
    init(_ c: QUICCore) { core = c }
}

/// One HTTP/3 request stream (either role).
final class H3Stream {
    enum Source {
        case none
        case bytes(ByteBuffer)
        case file(any FileBodySource, next: Int64, end: Int64)
        /// A file whose bytes are handed to nghttp3 straight from memory (`mappedBytes`): nothing
        /// is copied or held, and the source stays open until the stream closes, because ngtcp2
        /// points into it until the peer acknowledged the data.
        case mapped(any FileBodySource, next: Int64, end: Int64)
        case stream(HTTPOutboundStream)
    }

    let id: Int64
    /// The header block and the trailer block, each counted against the header-list limit as
    /// nghttp3 decodes it (QPACK lets a small block decode to a huge one).
    var headerBlock: InboundHeaderBlock
    var trailerBlock: InboundHeaderBlock
    var headerFields: [(name: String, value: String)] { headerBlock.fields }
    var inTrailers = false
    var body: HTTPInboundBody?
    var inboundEnded = false
    var source: Source = .none
    var sourceClosed = false
    var pendingTrailers: HTTPHeaders?
    var held = AckedBufferQueue()
    /// Body bytes of the current read burst, not yet handed to `body`.
    var pendingInbound: ByteBuffer?
    var isHead = false
    var responseSubmitted = false
    /// Server, under a request-body budget: the stream's receive window and what was read of it.
    var budgetWindow = (window: QUICSettings.budgetStreamWindow, taken: 0)
    /// When the peer last acknowledged response bytes (or the response began).
    var lastProgress = ContinuousClock.now
    var continuation: CheckedContinuation<HTTPClientResponse, any Error>?
    var token: RequestToken?
    /// Server side: the service handling the request, cancelled when the stream goes away first.
    var handler: Task<Void, Never>?

    init(id: Int64, maxHeaderListSize: Int) {
        self.id = id
        headerBlock = InboundHeaderBlock(limit: maxHeaderListSize)
        trailerBlock = InboundHeaderBlock(limit: maxHeaderListSize)
    }

    func closeSource() {
        guard !sourceClosed else { return }
        sourceClosed = true
        switch source {
        case .file(let f, _, _), .mapped(let f, _, _): f.close()
        case .stream(let s): s.cancel(HTTPTransportError.streamReset(errorCode: UInt32(NGHTTP3_H3_REQUEST_CANCELLED)))
        case .none, .bytes: break
        }
        source = .none
    }
}

/// One QUIC connection: ngtcp2_conn + GnuTLS session + nghttp3_conn, driven on one event loop.
/// Owns its C objects; callbacks find it through `user_data` (unretained: the owner — a server
/// routing table or a client handler — keeps it alive while the C objects exist).
final class QUICCore {
    enum Role {
        case server(ClientAuthentication, any HTTPService)
        case client(serverName: String)
    }

    enum Phase { case active, closing, draining, closed }

    let role: Role
    let isServer: Bool
    let loop: any EventLoop
    let settings: QUICSettings
    let logger: Logger
    weak var delegate: QUICCoreDelegate?
    let localAddress: SocketAddress
    /// Where packets go: the handshake's address until ngtcp2 writes for another path (the
    /// peer's address changed — NAT rebinding — and ngtcp2 validates the new one, RFC 9000 §9).
    private(set) var remoteAddress: SocketAddress
    let scid: ConnectionID
    private(set) var originalDCID: ConnectionID?

    private var conn: OpaquePointer!
    private(set) var h3: OpaquePointer?
    private var tls: OpaquePointer!
    private let connRef: UnsafeMutablePointer<ngtcp2_crypto_conn_ref>
    private let tlsContext: QUICTLSContext
    private var nameCheck: ServerNameCheck?

    private(set) var streams: [Int64: H3Stream] = [:]
    /// This connection's share of the node's request-body budget (server side).
    private var bodyBudget: BodyBudgetConnection?
    private(set) var phase = Phase.active
    private var timer: Scheduled<Void>?
    private var timerState = ExpiryTimerState()
    private var inlineExpiries = 0
    private var closePacket: ByteBuffer?
    private var closeResends = 0
    private(set) var peer: PeerIdentity?
    private(set) var handshakeCompleted = false
    /// Client: HANDSHAKE_DONE received (the server accepted us).
    private(set) var handshakeConfirmed = false
    private var processedAnyPacket = false
    /// Client: a Stateless Reset matched one of the peer's tokens.
    private var statelessResetReceived = false
    private var writeScheduled = false
    private var needsWrite = false
    /// Streams with `pendingInbound` bytes in this read burst.
    private var inboundDirty: [H3Stream] = []
    /// Packets written so far (a server connection that answers nothing to its first Initial
    /// was not a real handshake: it is dropped at once instead of lingering until the timeout).
    private(set) var packetsSent = 0
    private var inWrite = false
    private let allocator = ByteBufferAllocator()
    private(set) var failure: (any Error)?

    // server drain
    private(set) var draining = false
    private var finalGoawaySent = false
    // client
    private var pending: [(head: HTTPRequestHead, body: HTTPOutboundBody, token: RequestToken, cont: CheckedContinuation<HTTPClientResponse, any Error>)] = []
    private(set) var goawayID: Int64?
    /// Set from the loop; read from any thread by the client wrapper.
    let flags = QUICConnectionFlags()

    private lazy var weakSelf = WeakCore(self)

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
        try makeTLS()
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

    private func makeTLS() throws {
        var s: gnutls_session_t?
        try tlsCheck(cm_gnutls_init_quic(&s, isServer ? 1 : 0), "gnutls_init (QUIC)")
        guard let s else { throw TLSError(code: 0, context: "gnutls_init (QUIC)") }
        tls = s
        do {
            try tlsCheck(gnutls_priority_set(s, tlsContext.priority), "QUIC priority")
            let rc = isServer ? ngtcp2_crypto_gnutls_configure_server_session(s) : ngtcp2_crypto_gnutls_configure_client_session(s)
            if rc != 0 { throw QUICError.internalError("ngtcp2_crypto_gnutls_configure_*_session failed") }
            gnutls_session_set_ptr(s, UnsafeMutableRawPointer(connRef))
            try tlsCheck(gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(tlsContext.credentials.credentials)), "credentials")
            var h3 = Array("h3".utf8)
            try h3.withUnsafeMutableBufferPointer { b in
                var d = gnutls_datum_t(data: b.baseAddress, size: UInt32(b.count))
                try tlsCheck(gnutls_alpn_set_protocols(s, &d, 1, isServer ? UInt32(GNUTLS_ALPN_MANDATORY.rawValue) : 0), "ALPN")
            }
            switch role {
            case .server(let auth, _):
                gnutls_certificate_server_set_request(s, auth == .require ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST)
                // No acceptable-CA list: a client with a certificate from another CA sends it anyway,
                // and is told why it is refused (unknown_ca) instead of "certificate required".
                gnutls_certificate_send_x509_rdn_sequence(s, 1)
                // mTLS: the client chain is verified against the mesh CA inside the handshake.
                if auth == .require { gnutls_session_set_verify_cert(s, nil, 0) }
            case .client(let serverName):
                nameCheck = ServerNameCheck(session: s, serverName: serverName)
            }
        } catch {
            gnutls_deinit(s)
            tls = nil
            throw error
        }
    }


    private func makeSettings() -> ngtcp2_settings {
        var st = ngtcp2_settings()
        cm_ngtcp2_settings_default(&st)
        st.initial_ts = QUICClock.now()
        st.initial_rtt = UInt64(settings.initialRTT.nanoseconds)
        st.max_window = isServer && settings.requestBodyBudget != nil ? UInt64(QUICSettings.budgetBaseWindow) : settings.maxConnectionWindow
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

    private func makeTransportParams() -> ngtcp2_transport_params {
        var p = ngtcp2_transport_params()
        cm_ngtcp2_transport_params_default(&p)
        p.initial_max_stream_data_bidi_local = settings.streamWindow
        p.initial_max_stream_data_bidi_remote = isServer && settings.requestBodyBudget != nil ? UInt64(QUICSettings.budgetStreamWindow) : settings.streamWindow
        p.initial_max_stream_data_uni = 1 << 20
        p.initial_max_data = isServer && settings.requestBodyBudget != nil ? UInt64(QUICSettings.budgetBaseWindow) : settings.connectionWindow
        p.initial_max_streams_bidi = isServer ? settings.maxConcurrentStreams : 0
        p.initial_max_streams_uni = 8
        p.max_idle_timeout = UInt64(settings.idleTimeout.nanoseconds)
        p.max_ack_delay = UInt64(settings.maxAckDelay.nanoseconds)
        p.active_connection_id_limit = 4
        return p
    }

    private func withPath<R>(remote: SocketAddress, _ body: (UnsafeMutablePointer<ngtcp2_path>) -> R) -> R {
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

    // MARK: driving loop

    /// Client: send the first flight.
    func start() {
        writePackets()
    }

    /// A datagram for this connection.
    func receive(_ buffer: ByteBuffer, from remote: SocketAddress) {
        switch phase {
        case .closed, .draining: return
        case .closing:
            // Answer (a few times) with the CONNECTION_CLOSE we already sent.
            if let p = closePacket, closeResends < 8 {
                closeResends += 1
                delegate?.quicCore(self, send: p, sends: [.init(offset: 0, length: p.readableBytes, segmentSize: nil)], to: remoteAddress)
            }
            return
        case .active: break
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

    private func handleLibraryError(_ rv: Int32) {
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

    /// Set when this side refused the peer's certificate after the handshake (role rules,
    /// optional-mode verification): the alert the connection close carries.
    private var refusalAlert: UInt8?

    /// Why GnuTLS failed the handshake, if it was the peer's certificate: it did not verify, or
    /// (server requiring one) none was sent.
    private func certificateRefusal() -> PeerCertificateRejected? {
        guard let tls else { return nil }
        let status = gnutls_session_get_verify_cert_status(tls)
        if status != 0, status != PeerCertificateRejected.notVerified {
            return PeerCertificateRejected.verificationFailed(status: status, subject: TLSVerifyStatus.peerSubject(tls), weAreClient: !isServer)
        }
        if case .server(let auth, _) = role, auth == .require {
            var count: UInt32 = 0
            if gnutls_certificate_get_peers(tls, &count) == nil || count == 0 { return PeerCertificateRejected.noClientCertificate() }
        }
        return nil
    }

    private func verifyStatusDescription() -> String {
        guard let tls else { return "" }
        let status = gnutls_session_get_verify_cert_status(tls)
        guard status != 0 else { return "" }
        var out = gnutls_datum_t()
        guard gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0, let d = out.data else {
            return " (certificate verification status \(status))"
        }
        defer { cm_gnutls_free(d) }
        return " (" + String(decoding: UnsafeRawBufferPointer(start: d, count: Int(out.size)), as: UTF8.self) + ")"
    }

    /// Coalesce write requests from callbacks and other tasks into one write loop.
    func scheduleWrite() {
        // In a read burst the burst's flush (`flushAfterRead`) writes anyway.
        guard !writeScheduled, !needsWrite, phase == .active else { return }
        writeScheduled = true
        loop.assumeIsolated().execute {
            self.writeScheduled = false
            self.writePackets()
        }
    }

    /// Sends packets `from...` of a burst (their sizes in `sizes`, laid out back to back in `out`).
    private func sendBatch(_ out: ByteBuffer, sizes: [Int], from: Int, to destination: SocketAddress) {
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
        guard phase == .active, !inWrite else { return }
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

    private func updateTimer() {
        guard phase == .active else { return }
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

    private func armTimer(at deadline: UInt64) {
        timer?.cancel()
        timer = loop.assumeIsolated().scheduleTask(deadline: .uptimeNanoseconds(deadline)) { [weak self] in
            self?.onTimer()
        }
    }

    private func onTimer() {
        timer = nil
        inlineExpiries = 0
        guard phase == .active else { return }
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
    private func handleExpiry(now: UInt64) -> Bool {
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

    // MARK: closing

    /// Close with an application error code (HTTP/3 code), e.g. H3_NO_ERROR after a drain.
    func closeApplication(code: UInt64 = UInt64(NGHTTP3_H3_NO_ERROR), error: any Error = HTTPTransportError.connectionClosed) {
        var e = ngtcp2_connection_close_error()
        ngtcp2_connection_close_error_set_application_error(&e, code, nil, 0)
        closeWith(e, error: error)
    }

    private func closeWith(_ ccerr: ngtcp2_connection_close_error, error: any Error) {
        guard phase == .active else { return }
        if ngtcp2_conn_is_in_closing_period(conn) != 0 || ngtcp2_conn_is_in_draining_period(conn) != 0 {
            enterDraining(error: error)
            return
        }
        var e = ccerr
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
        phase = .closing
        failure = failure ?? error
        failAll(error)
        if buf.readableBytes > 0 {
            closePacket = buf
            delegate?.quicCore(self, send: buf, sends: [.init(offset: 0, length: buf.readableBytes, segmentSize: nil)], to: remoteAddress)
        }
        // A client has nothing more to say; a server lingers to repeat the close for stragglers.
        scheduleFinalize(after: isServer ? closingPeriod() : .milliseconds(1), error: error)
    }

    private func closingPeriod() -> TimeAmount {
        let pto = ngtcp2_conn_get_pto(conn)
        return .nanoseconds(Int64(clamping: min(pto * 3, 3_000_000_000)))
    }

    private func enterDraining(error: any Error) {
        guard phase == .active || phase == .closing else { return }
        phase = .draining
        failure = failure ?? error
        failAll(error)
        scheduleFinalize(after: isServer ? closingPeriod() : .zero, error: error)
    }

    private func scheduleFinalize(after: TimeAmount, error: any Error) {
        timer?.cancel()
        timerState = ExpiryTimerState()
        timer = loop.assumeIsolated().scheduleTask(in: after) { [weak self] in
            self?.finalize(error: error)
        }
    }

    /// Gone for good: the owner drops its routes and its reference.
    func finalize(error: (any Error)?) {
        guard phase != .closed else { return }
        logger.debug("QUIC connection closed", metadata: ["stats": "\(statsDescription)", "server": "\(isServer)"])
        phase = .closed
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

    private func failAll(_ error: any Error) {
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

    // MARK: handshake

    /// The client's identity; nil (logged, `refusalAlert` set) when its certificate is refused.
    private func peerIdentityOrRefuse() -> PeerIdentity? {
        do {
            if let p = try TLSSession.authenticatedPeer(of: tls) { return p }
            let refusal = PeerCertificateRejected.noClientCertificate()
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic alert \(refusal.alert)", "\(refusal) (QUIC)")
            refusalAlert = UInt8(refusal.alert)
        } catch let refused as PeerCertificateRefused {
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic role \(refused.subject)", "\(refused) (alert: \(refused.alertName)) (QUIC)")
            refusalAlert = UInt8(refused.alert.rawValue)
        } catch {
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic other", "\(error) (QUIC)")
            refusalAlert = UInt8(GNUTLS_A_BAD_CERTIFICATE.rawValue)
        }
        return nil
    }

    fileprivate func onHandshakeCompleted() -> Int32 {
        switch role {
        case .server(let auth, _):
            if auth == .optionalReadOnly {
                var count: UInt32 = 0
                if gnutls_certificate_get_peers(tls, &count) != nil, count > 0 {
                    var status: UInt32 = 0
                    if gnutls_certificate_verify_peers3(tls, nil, &status) < 0 || status != 0 {
                        let refusal = PeerCertificateRejected.verificationFailed(status: status, subject: TLSVerifyStatus.peerSubject(tls), weAreClient: false)
                        TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic alert \(refusal.alert)", "\(refusal) (QUIC)")
                        refusalAlert = UInt8(refusal.alert)
                        return NGTCP2_ERR_CALLBACK_FAILURE
                    }
                    guard let p = peerIdentityOrRefuse() else { return NGTCP2_ERR_CALLBACK_FAILURE }
                    peer = p
                } else {
                    peer = .anonymousReader
                }
            } else {
                guard let p = peerIdentityOrRefuse() else { return NGTCP2_ERR_CALLBACK_FAILURE }
                peer = p
            }
        case .client:
            var d = gnutls_datum_t()
            guard gnutls_alpn_get_selected_protocol(tls, &d) == 0, let p = d.data,
                  String(decoding: UnsafeRawBufferPointer(start: p, count: Int(d.size)), as: UTF8.self) == "h3" else {
                failure = QUICError.handshakeFailed("server did not select ALPN h3")
                return NGTCP2_ERR_CALLBACK_FAILURE
            }
            peer = TLSSession.peerIdentity(of: tls)
        }
        handshakeCompleted = true
        // A client is ready only once the handshake is confirmed (HANDSHAKE_DONE): in TLS 1.3 the
        // server verifies our certificate after we finished, and may still refuse it.
        if isServer { delegate?.quicCoreHandshakeCompleted(self) }
        return 0
    }

    fileprivate func setupHTTP3() -> Int32 {
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

    // MARK: ngtcp2 callbacks

    static func makeCallbacks(server: Bool) -> ngtcp2_callbacks {
        var cb = ngtcp2_callbacks()
        if server {
            cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb
        } else {
            cb.client_initial = ngtcp2_crypto_client_initial_cb
            cb.recv_retry = ngtcp2_crypto_recv_retry_cb
            cb.handshake_confirmed = { _, ud in
                QUICCore.with(ud) { core in
                    core.handshakeConfirmed = true
                    core.delegate?.quicCoreHandshakeCompleted(core)
                }
                return 0
            }
            cb.extend_max_local_streams_bidi = { _, _, ud in
                QUICCore.with(ud) { $0.scheduleStartPending() }
                return 0
            }
        }
        cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb
        cb.encrypt = ngtcp2_crypto_encrypt_cb
        cb.decrypt = ngtcp2_crypto_decrypt_cb
        cb.hp_mask = ngtcp2_crypto_hp_mask_cb
        cb.update_key = ngtcp2_crypto_update_key_cb
        cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb
        cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb
        cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb
        cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb
        cb.rand = { dest, len, _ in cm_gnutls_rnd(dest, len) }
        cb.get_new_connection_id = { _, cid, token, cidlen, ud in
            withUnsafeMutableBytes(of: &cid!.pointee.data) { cm_gnutls_rnd($0.baseAddress!.assumingMemoryBound(to: UInt8.self), min(cidlen, $0.count)) }
            cid!.pointee.datalen = cidlen
            let id = ConnectionID(cid!.pointee)
            QUICCore.with(ud) { core in
                core.settings.resetSecret.write(token: token!, for: id)
                core.delegate?.quicCore(core, didIssue: id)
            }
            return 0
        }
        cb.recv_stateless_reset = { _, _, ud in
            // ngtcp2 checked the token; read_pkt now returns NGTCP2_ERR_DRAINING.
            QUICCore.with(ud) { $0.statelessResetReceived = true }
            return 0
        }
        cb.remove_connection_id = { _, cid, ud in
            QUICCore.with(ud) { core in core.delegate?.quicCore(core, didRetire: ConnectionID(cid!.pointee)) }
            return 0
        }
        cb.handshake_completed = { _, ud in QUICCore.with(ud) { $0.onHandshakeCompleted() } }
        cb.recv_rx_key = { _, level, ud in
            guard level == NGTCP2_CRYPTO_LEVEL_APPLICATION else { return 0 }
            return QUICCore.with(ud) { $0.setupHTTP3() }
        }
        cb.recv_stream_data = { _, flags, sid, _, data, len, ud, _ in
            QUICCore.with(ud) { $0.recvStreamData(sid, data, len, fin: flags & UInt32(NGTCP2_STREAM_DATA_FLAG_FIN) != 0) }
        }
        cb.acked_stream_data_offset = { _, sid, _, len, ud, _ in
            guard let h3 = QUICCore.with(ud, { $0.h3 }) else { return 0 }
            return nghttp3_conn_add_ack_offset(h3, sid, len) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE
        }
        cb.stream_close = { _, flags, sid, code, ud, _ in
            let appCode = flags & UInt32(NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET) != 0 ? code : UInt64(NGHTTP3_H3_NO_ERROR)
            return QUICCore.with(ud) { core in
                if let h3 = core.h3 {
                    let rv = nghttp3_conn_close_stream(h3, sid, appCode)
                    if rv != 0 && rv != NGHTTP3_ERR_STREAM_NOT_FOUND { return NGTCP2_ERR_CALLBACK_FAILURE }
                }
                core.streamClosed(sid, code: appCode)
                return 0
            }
        }
        cb.stream_reset = { _, sid, _, code, ud, _ in
            QUICCore.with(ud) { $0.peerReset(sid, code: code) }
            return 0
        }
        cb.stream_stop_sending = { _, sid, code, ud, _ in
            QUICCore.with(ud) { $0.peerStopSending(sid, code: code) }
            return 0
        }
        cb.extend_max_remote_streams_bidi = { _, maxStreams, ud in
            if let h3 = QUICCore.with(ud, { $0.h3 }) { nghttp3_conn_set_max_client_streams_bidi(h3, maxStreams) }
            return 0
        }
        cb.extend_max_stream_data = { _, sid, _, ud, _ in
            if let h3 = QUICCore.with(ud, { $0.h3 }) { _ = nghttp3_conn_unblock_stream(h3, sid) }
            return 0
        }
        return cb
    }

    private func recvStreamData(_ sid: Int64, _ data: UnsafePointer<UInt8>?, _ len: Int, fin: Bool) -> Int32 {
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

    /// Body bytes consumed: open the stream and connection windows by that much.
    func credit(_ sid: Int64, _ n: Int) {
        guard phase == .active, n > 0 else { return }
        ngtcp2_conn_extend_max_stream_offset(conn, sid, UInt64(n + growStreamWindow(sid, n)))
        creditConnection(n)
        scheduleWrite()
    }

    /// Body bytes left memory: give them back to the connection window, as far as the node's
    /// request-body budget lets this connection keep its window (see `RequestBodyBudget`).
    private func creditConnection(_ n: Int) {
        guard phase == .active, n > 0 else { return }
        let credit = bodyBudget?.consumed(n) ?? n
        if credit > 0 { ngtcp2_conn_extend_max_offset(conn, UInt64(credit)) }
    }

    /// Request streams under a budget: how much more than `n` to open `sid`'s window by.
    private func growStreamWindow(_ sid: Int64, _ n: Int) -> Int {
        guard bodyBudget != nil, let s = streams[sid] else { return 0 }
        s.budgetWindow.taken += n
        let cap = Int(clamping: settings.streamWindow)
        guard s.budgetWindow.taken >= s.budgetWindow.window, s.budgetWindow.window < cap else { return 0 }
        let grown = min(cap, s.budgetWindow.window * 2)
        defer { s.budgetWindow = (grown, 0) }
        return grown - s.budgetWindow.window
    }

    /// The budget let this connection's window grow.
    func growConnectionWindow(_ n: Int) {
        guard phase == .active, n > 0 else { return }
        ngtcp2_conn_extend_max_offset(conn, UInt64(n))
        scheduleWrite()
    }

    private func makeCredit(_ sid: Int64) -> @Sendable (Int) -> Void {
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

    private func peerReset(_ sid: Int64, code: UInt64) {
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

    private func peerStopSending(_ sid: Int64, code: UInt64) {
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

    private func streamClosed(_ sid: Int64, code: UInt64) {
        pendingHeads[sid] = nil
        guard let s = streams.removeValue(forKey: sid) else { return }
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
            if draining { scheduleDrainCheck() }
        }
        if !isServer, phase == .active, activeRequestStreams == 0 {
            // Idle again: let the idle timeout close a connection nobody uses.
            ngtcp2_conn_set_keep_alive_timeout(conn, 0)
        }
    }

    // MARK: nghttp3 callbacks

    static func makeH3Callbacks() -> nghttp3_callbacks {
        var cb = nghttp3_callbacks()
        cb.acked_stream_data = { _, sid, len, ud, _ in
            QUICCore.with(ud) { core in
                guard let s = core.streams[sid] else { return }
                _ = s.held.ack(Int(len))
                s.lastProgress = .now
            }
            return 0
        }
        cb.stream_close = { _, sid, code, ud, _ in
            QUICCore.with(ud) { $0.streamClosed(sid, code: code) }
            return 0
        }
        cb.recv_data = { _, sid, data, len, ud, _ in
            QUICCore.with(ud) { $0.recvData(sid, data, len) }
            return 0
        }
        cb.deferred_consume = { _, sid, n, ud, _ in
            let conn = QUICCore.with(ud) { $0.conn }
            ngtcp2_conn_extend_max_stream_offset(conn, sid, UInt64(n))
            ngtcp2_conn_extend_max_offset(conn, UInt64(n))
            return 0
        }
        cb.begin_headers = { _, sid, ud, _ in
            QUICCore.with(ud) { core in
                if core.isServer, core.streams[sid] == nil { core.streams[sid] = H3Stream(id: sid, maxHeaderListSize: core.settings.maxHeaderListSize) }
                core.streams[sid]?.headerBlock = InboundHeaderBlock(limit: core.settings.maxHeaderListSize)
            }
            return 0
        }
        cb.recv_header = { _, sid, _, name, value, _, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.headerBlock.add(name: QUICCore.bytes(name), value: QUICCore.bytes(value)) }
            return 0
        }
        cb.end_headers = { _, sid, fin, ud, _ in
            QUICCore.with(ud) { $0.endHeaders(sid, fin: fin != 0) }
        }
        cb.begin_trailers = { _, sid, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.inTrailers = true }
            return 0
        }
        cb.recv_trailer = { _, sid, _, name, value, _, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.trailerBlock.add(name: QUICCore.bytes(name), value: QUICCore.bytes(value)) }
            return 0
        }
        cb.end_trailers = { _, sid, _, ud, _ in
            QUICCore.with(ud) { core in
                if let s = core.streams[sid], s.trailerBlock.isTooLarge { core.headerListTooLarge(s, bytes: s.trailerBlock.bytes, isTrailers: true, fin: true) }
            }
            return 0
        }
        cb.stop_sending = { _, sid, code, ud, _ in
            ngtcp2_conn_shutdown_stream_read(QUICCore.with(ud) { $0.conn }, sid, code)
            return 0
        }
        cb.end_stream = { _, sid, ud, _ in
            QUICCore.with(ud) { $0.endStream(sid) }
            return 0
        }
        cb.reset_stream = { _, sid, code, ud, _ in
            ngtcp2_conn_shutdown_stream_write(QUICCore.with(ud) { $0.conn }, sid, code)
            return 0
        }
        cb.shutdown = { _, id, ud in
            QUICCore.with(ud) { $0.goawayReceived(id) }
            return 0
        }
        return cb
    }

    /// The bytes of an nghttp3 buffer (valid for the callback's duration).
    static func bytes(_ rc: OpaquePointer?) -> UnsafeRawBufferPointer {
        let v = nghttp3_rcbuf_get_buf(rc)
        return UnsafeRawBufferPointer(start: v.base, count: v.base == nil ? 0 : v.len)
    }

    static func string(_ rc: OpaquePointer?) -> String {
        let v = nghttp3_rcbuf_get_buf(rc)
        guard let base = v.base, v.len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: base, count: v.len), as: UTF8.self)
    }

    private func recvData(_ sid: Int64, _ data: UnsafePointer<UInt8>?, _ len: Int) {
        guard len > 0, let data else { return }
        bodyBudget?.received(len)
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
    private func deliverInbound() {
        guard !inboundDirty.isEmpty else { return }
        let dirty = inboundDirty
        inboundDirty = []
        for s in dirty { deliverInbound(s) }
    }

    private func deliverInbound(_ s: H3Stream) {
        guard let buf = s.pendingInbound else { return }
        s.pendingInbound = nil
        let n = buf.readableBytes
        guard n > 0 else { return }
        if s.inboundEnded && s.body == nil || !(s.body?.append(buf) ?? false) {
            if phase == .active {
                ngtcp2_conn_extend_max_stream_offset(conn, s.id, UInt64(n))
                creditConnection(n)
            }
        }
    }

    /// Bytes gathered but never delivered (stream reset/closed): give the connection window back.
    private func dropPendingInbound(_ s: H3Stream) {
        guard let buf = s.pendingInbound else { return }
        s.pendingInbound = nil
        creditConnection(buf.readableBytes)
    }

    private func endStream(_ sid: Int64) {
        guard let s = streams[sid], !s.inboundEnded else { return }
        deliverInbound(s)
        s.inboundEnded = true
        s.body?.finish(trailers: s.trailerBlock.fields.isEmpty ? nil : HTTPHeaders(s.trailerBlock.fields))
    }

    /// Header blocks over the limit on this connection (431 first, then H3_EXCESSIVE_LOAD).
    private var headerPolicy = HeaderLimitPolicy()
    private var stallCheck: RepeatedTask?
    /// Request streams whose header section has not ended, since their first byte (server).
    private var pendingHeads: [Int64: ContinuousClock.Instant] = [:]
    private var headCheck: RepeatedTask?

    /// Once a second while request heads are incomplete: those older than the request-headers
    /// timeout are reset (a client that opens streams and never finishes their HEADERS frame).
    private func startHeadCheck() {
        guard headCheck == nil, let timeout = settings.requestHeadersTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        headCheck = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.phase == .active else { return }
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

    /// Server side, about once a second: responses whose stream (or connection) flow-control
    /// window stayed closed for longer than the stall timeout are reset, giving back their file
    /// and read slot (a zero-window reader must not hold them for the connection's lifetime).
    private func startStallCheck() {
        guard isServer, stallCheck == nil, let timeout = settings.responseStallTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        stallCheck = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.phase == .active else { return }
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

    /// Client side: when a packet from the server last arrived, and since when requests are
    /// outstanding (silence counts from the later of the two).
    private var lastHeard = ContinuousClock.now
    private var busySince = ContinuousClock.now
    private var darkCheck: RepeatedTask?
    private var darkCheckTick = ContinuousClock.now

    /// Client side, four times a second while the connection lives: outstanding requests and
    /// silence from the server for `darkPathTimeout` (≥ 3 PTOs) close the connection with
    /// `QUICError.pathDark`, failing those requests now so that callers can go over TCP or to
    /// another node (the idle timeout would hold them for 30 s).
    private func startDarkCheck() {
        guard !isServer, darkCheck == nil, let timeout = settings.darkPathTimeout else { return }
        let bound = NIOLoopBound(weakSelf, eventLoop: loop)
        darkCheckTick = ContinuousClock.now
        darkCheck = loop.scheduleRepeatedTask(initialDelay: .milliseconds(250), delay: .milliseconds(250)) { (_: RepeatedTask) in
            guard let self = bound.value.core, self.phase == .active else { return }
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

    /// A header or trailer block decoded to more than `maxHeaderListSize` (its fields were
    /// dropped as they arrived). Server: 431 for a request head, a stream reset for trailers, and
    /// on repeat the connection closes with H3_EXCESSIVE_LOAD. Client: the request fails.
    private func headerListTooLarge(_ s: H3Stream, bytes: Int, isTrailers: Bool, fin: Bool) {
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

    private func endHeaders(_ sid: Int64, fin: Bool) -> Int32 {
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

    // MARK: server side

    private func serverRequest(_ s: H3Stream, fin: Bool) {
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
        if !fin, bodyBudget == nil, let budget = settings.requestBodyBudget {
            let bound = NIOLoopBound(weakSelf, eventLoop: loop)
            let loop = self.loop
            bodyBudget = budget.connection(base: QUICSettings.budgetBaseWindow) { n in
                loop.execute { bound.value.core?.growConnectionWindow(n) }
            }
        }
        let body = HTTPInboundBody(onConsumed: makeCredit(s.id), idleTimeout: fin ? nil : settings.requestBodyIdleTimeout,
                                  minimumRate: settings.requestBodyMinRate, budget: fin ? nil : bodyBudget)
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
        guard phase == .active, let h3, let s = streams[sid], !s.responseSubmitted else {
            response.body.discard()
            return
        }
        s.lastProgress = .now
        startStallCheck()
        s.responseSubmitted = true
        var fields: [(name: String, value: String)] = [(":status", String(response.status))]
        for (n, v) in response.headers where !Self.connectionSpecific(n) { fields.append((n, v)) }
        if response.headers["content-length"] == nil, let n = response.body.knownLength, response.status != 204, response.status != 304 {
            fields.append(("content-length", String(n)))
        }
        var hasBody = true
        if s.isHead {
            response.body.discard()
            hasBody = false
        } else {
            setSource(s, response.body)
            s.pendingTrailers = response.trailers
            if case .none = s.source, response.trailers == nil { hasBody = false }
        }
        var dr = nghttp3_data_reader(read_data: Self.readData)
        let rv = Self.withNV(fields) { nva, n in
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
    private func stopUploadIfUnfinished(_ s: H3Stream) {
        guard !s.inboundEnded else { return }
        let sid = s.id
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.phase == .active, let s = self.streams[sid], !s.inboundEnded else { return }
            if let h3 = self.h3 { _ = nghttp3_conn_shutdown_stream_read(h3, sid) }
            ngtcp2_conn_shutdown_stream_read(self.conn, sid, UInt64(NGHTTP3_H3_NO_ERROR))
            self.scheduleWrite()
        }
    }

    static func connectionSpecific(_ n: String) -> Bool {
        n == "connection" || n == "transfer-encoding" || n == "keep-alive" || n == "upgrade" || n == "proxy-connection" || n == "host"
    }

    private func setSource(_ s: H3Stream, _ body: HTTPOutboundBody) {
        switch body {
        case .empty: s.source = .none
        case .bytes(let b): s.source = b.readableBytes > 0 ? .bytes(b) : .none
        case .file(let f):
            s.source = .file(f, next: f.start, end: f.start + f.length)
        case .stream(let st):
            s.source = .stream(st)
            let bound = NIOLoopBound(weakSelf, eventLoop: loop)
            let loop = self.loop
            let sid = s.id
            st.setOnReadable {
                loop.execute { bound.value.core?.resumeStream(sid) }
            }
        }
    }

    private func resumeStream(_ sid: Int64) {
        guard phase == .active, let h3, streams[sid] != nil else { return }
        _ = nghttp3_conn_resume_stream(h3, sid)
        scheduleWrite()
    }

    /// Server drain: GOAWAY notice now, final GOAWAY shortly after, CONNECTION_CLOSE once the
    /// requests in flight completed (or `gracePeriod` ran out).
    func startGracefulShutdown(gracePeriod: TimeAmount) {
        guard isServer, !draining, phase == .active else { return }
        draining = true
        guard let h3 else {
            closeApplication()
            return
        }
        _ = nghttp3_conn_submit_shutdown_notice(h3)
        writePackets()
        loop.assumeIsolated().scheduleTask(in: .milliseconds(100)) { [weak self] in
            guard let self, self.phase == .active, let h3 = self.h3 else { return }
            _ = nghttp3_conn_shutdown(h3)
            self.finalGoawaySent = true
            self.writePackets()
            self.scheduleDrainCheck()
        }
        loop.assumeIsolated().scheduleTask(in: gracePeriod) { [weak self] in
            guard let self, self.phase == .active else { return }
            let inFlight = self.activeRequestStreams
            if inFlight > 0 {
                self.settings.drainCuts?.add(inFlight)
                self.logger.warning("drain: the grace period (\(Double(gracePeriod.nanoseconds) / 1e9) s) ended with \(inFlight) request(s) in flight; closing the QUIC connection under them",
                                    metadata: ["peer": "\(self.peer?.commonName ?? "-")", "remote": "\(self.remoteAddress.endpoint)"])
            }
            self.closeApplication()
        }
    }

    private func scheduleDrainCheck() {
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.draining, self.finalGoawaySent, self.phase == .active else { return }
            if !self.streams.keys.contains(where: { ngtcp2_is_bidi_stream($0) != 0 }) {
                self.closeApplication()
            }
        }
    }

    var activeRequestStreams: Int { streams.keys.reduce(0) { $0 + (ngtcp2_is_bidi_stream($1) != 0 ? 1 : 0) } }

    // MARK: outbound bodies (both roles)

    static let readData: nghttp3_read_data_callback = { _, sid, vec, veccnt, pflags, ud, _ in
        QUICCore.with(ud) { $0.readData(sid, vec!, veccnt, pflags!) }
    }

    static let chunk = 256 * 1024
    /// Bytes of a mapped file per `read_data` answer (one DATA frame each; nothing is copied).
    static let mappedChunk = 4 << 20

    private func readData(_ sid: Int64, _ vec: UnsafeMutablePointer<nghttp3_vec>, _ veccnt: Int, _ pflags: UnsafeMutablePointer<UInt32>) -> nghttp3_ssize {
        guard let s = streams[sid], veccnt > 0 else {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            return 0
        }
        func give(_ b: ByteBuffer) -> nghttp3_ssize {
            s.held.hold(b)
            b.withUnsafeReadableBytes { p in
                vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: p.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: p.count)
            }
            return 1
        }
        func eof(_ trailers: HTTPHeaders?) -> nghttp3_ssize {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            if isServer { stopUploadIfUnfinished(s) }
            if let t = trailers ?? s.pendingTrailers, let h3, t.fields.count > 0 {
                let rv = Self.withNV(t.fields) { nva, n in nghttp3_conn_submit_trailers(h3, sid, nva, n) }
                if rv == 0 { pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_NO_END_STREAM) }
            }
            return 0
        }
        /// The next chunk straight from the source's memory; nil if it has none to give.
        func giveMapped(_ f: any FileBodySource, next: Int64, end: Int64) -> nghttp3_ssize? {
            guard let m = f.mappedBytes(at: next, max: Int(min(Int64(Self.mappedChunk), end - next))) else { return nil }
            vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: m.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: m.count)
            let newNext = next + Int64(m.count)
            s.source = .mapped(f, next: newNext, end: end)
            if newNext >= end { _ = eof(nil) }
            return 1
        }
        switch s.source {
        case .none:
            return eof(nil)
        case .bytes(var b):
            let n = min(b.readableBytes, Self.chunk)
            let slice = b.readSlice(length: n)!
            s.source = b.readableBytes > 0 ? .bytes(b) : .none
            let r = give(slice)
            if b.readableBytes == 0 { _ = eof(nil) }
            return r
        case .mapped(let f, let next, let end):
            // At the end the source stays open (see `Source.mapped`); `streamClosed` closes it.
            guard next < end else { return eof(nil) }
            return giveMapped(f, next: next, end: end) ?? failBody(s, sid, "file body mapping unavailable")
        case .file(let f, let next, let end):
            // A source that can map its bytes is sent from the mapping from the first chunk on.
            if next == f.start, next < end, let r = giveMapped(f, next: next, end: end) { return r }
            if next >= end {
                s.closeSource()
                return eof(nil)
            }
            let n = Int(min(Int64(Self.chunk), end - next))
            var buf = allocator.buffer(capacity: n)
            var failed = false
            buf.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { dest in
                var got = 0
                while got < n {
                    guard let r = try? f.read(at: next + Int64(got), into: UnsafeMutableRawBufferPointer(rebasing: dest[got..<n])), r > 0 else {
                        failed = true
                        break
                    }
                    got += r
                }
                return got
            }
            if failed { return failBody(s, sid, "file body read failed") }
            let newNext = next + Int64(buf.readableBytes)
            s.source = .file(f, next: newNext, end: end)
            let r = give(buf)
            if newNext >= end {
                s.closeSource()
                _ = eof(nil)
            }
            return r
        case .stream(let st):
            switch st.read(max: Self.chunk) {
            case .data(let b):
                return give(b)
            case .wouldBlock:
                return nghttp3_ssize(NGHTTP3_ERR_WOULDBLOCK)
            case .end(let trailers):
                s.sourceClosed = true
                s.source = .none
                return eof(trailers)
            case .failed:
                return failBody(s, sid, nil)
            }
        }
    }

    /// The body cannot be produced: release the source and reset the stream (after this
    /// callback returns: nghttp3 is in the middle of a write).
    private func failBody(_ s: H3Stream, _ sid: Int64, _ reason: String?) -> nghttp3_ssize {
        if let reason { logger.warning("QUIC: \(reason); resetting stream", metadata: ["stream": "\(sid)"]) }
        s.closeSource()
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.phase == .active else { return }
            ngtcp2_conn_shutdown_stream(self.conn, sid, UInt64(NGHTTP3_H3_INTERNAL_ERROR))
            self.writePackets()
        }
        return nghttp3_ssize(NGHTTP3_ERR_WOULDBLOCK)
    }

    /// Header fields as an `nghttp3_nv` array for one call (nghttp3 copies what it keeps): the
    /// names and values share one temporary arena (the per-field copies were 5% of the CPU of
    /// small requests).
    static func withNV<R>(_ fields: [(name: String, value: String)], _ body: (UnsafePointer<nghttp3_nv>, Int) -> R) -> R {
        var total = 0
        for (n, v) in fields { total += n.utf8.count + v.utf8.count }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: max(1, total)) { arena in
            withUnsafeTemporaryAllocation(of: nghttp3_nv.self, capacity: max(1, fields.count)) { nva in
                var at = 0
                func place(_ s: String) -> (UnsafeMutablePointer<UInt8>, Int) {
                    let start = at
                    for byte in s.utf8 {
                        arena[at] = byte
                        at += 1
                    }
                    return (arena.baseAddress! + start, at - start)
                }
                for (i, (n, v)) in fields.enumerated() {
                    let (np, nl) = place(n)
                    let (vp, vl) = place(v)
                    nva.initializeElement(at: i, to: nghttp3_nv(name: np, value: vp, namelen: nl, valuelen: vl, flags: UInt8(NGHTTP3_NV_FLAG_NONE)))
                }
                return body(UnsafePointer(nva.baseAddress!), fields.count)
            }
        }
    }

    // MARK: client side

    func startRequest(head: HTTPRequestHead, body: HTTPOutboundBody, token: RequestToken, continuation: CheckedContinuation<HTTPClientResponse, any Error>) {
        guard phase == .active, h3 != nil else {
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
        for (n, v) in head.headers where !Self.connectionSpecific(n) { fields.append((n, v)) }
        if head.headers["content-length"] == nil, let n = body.knownLength, n > 0 || head.method == "PUT" || head.method == "POST" {
            fields.append(("content-length", String(n)))
        }
        setSource(s, body)
        let hasBody: Bool
        if case .none = s.source { hasBody = false } else { hasBody = true }
        var dr = nghttp3_data_reader(read_data: Self.readData)
        let srv = Self.withNV(fields) { nva, n in
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

    private func scheduleStartPending() {
        guard !pending.isEmpty else { return }
        loop.assumeIsolated().execute { [weak self] in
            guard let self else { return }
            let p = self.pending
            self.pending = []
            for r in p { self.startRequest(head: r.head, body: r.body, token: r.token, continuation: r.cont) }
        }
    }

    private func clientResponseHead(_ s: H3Stream, fin: Bool) {
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
        guard phase == .active, let s = streams[sid] else { return }
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

    private func goawayReceived(_ id: Int64) {
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
}

func tlsCheck(_ rc: Int32, _ context: @autoclosure () -> String) throws {
    if rc < 0 { throw TLSError(code: rc, context: context()) }
}

/// Connection state readable from any thread.
final class QUICConnectionFlags: Sendable {
    let goingAway = Mutex(false)
    let closed = Mutex(false)
    let closeReason = Mutex<QUICError?>(nil)
}
