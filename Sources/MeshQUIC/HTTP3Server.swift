import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import Metrics
import NIOCore
import NIOPosix
import Synchronization

/// Counters of the UDP front door (tests and metrics).
public struct QUICServerStats: Sendable, Equatable {
    public var datagramsReceived = 0
    /// The largest datagram received (bytes): shows the datagram size peers actually use.
    public var largestDatagramReceived = 0
    /// Datagrams that could not be parsed or routed (garbage, unknown short-header CIDs, …).
    public var datagramsDropped = 0
    public var versionNegotiationsSent = 0
    public var connectionsAccepted = 0
    /// New connections refused because of the handshake/connection limits.
    public var connectionsRefused = 0
    /// Stateless Resets sent for short-header packets of connections we do not know.
    public var statelessResetsSent = 0
    /// Retry packets sent (address validation).
    public var retriesSent = 0
    /// Initials whose Retry token was forged, expired or for another address (dropped).
    public var retryTokensRejected = 0
    /// Connections that closed before their handshake completed (e.g. a client without an
    /// acceptable certificate, a handshake timeout, a forged Initial that was accepted).
    public var handshakesFailed = 0
    public init() {}
}

/// An HTTP/3 server over QUIC (ngtcp2 + nghttp3 + GnuTLS) on one SwiftNIO UDP socket.
///
/// Datagrams are routed to connections by destination connection ID (every CID a connection
/// uses: the client's original DCID, our SCID, the ones issued with NEW_CONNECTION_ID). A
/// datagram for no known CID may only start a connection if it is a long-header packet that
/// `ngtcp2_accept` takes as an Initial (>= 1200 bytes); anything else is counted and dropped.
///
/// Against hostile input and amplification:
/// - unknown versions get Version Negotiation only for datagrams >= 1200 bytes;
/// - ngtcp2's 3x anti-amplification limit applies to every unvalidated client address;
/// - a new connection whose first Initial produces no answer (forged or corrupt: nothing
///   decrypted) is dropped at once instead of lingering until the handshake timeout;
/// - at most `maxHandshakes` connections may be in the handshake and `maxConnections` open;
///   beyond that new Initials are dropped (`stats.connectionsRefused`);
/// - handshakes time out after `quic.handshakeTimeout`, idle connections after `quic.idleTimeout`;
/// - a short-header packet for a connection we do not know (we restarted, or dropped it) gets a
///   Stateless Reset, always shorter than the packet and at most ~200 a second
///   (`StatelessResetPolicy`); tokens come from `quic.statelessResetSecret`, so a restarted node
///   with the same secret resets its previous run's connections and peers fail over at once;
/// - address validation with Retry while more than 64 handshakes run (`addressValidation`);
/// - not enabled: connection migration (`disable_active_migration`), NEW_TOKEN, 0-RTT.
///
/// Mutual TLS: with `.require` the client's chain is verified against the mesh CA inside the
/// handshake (a client without a valid certificate never gets HANDSHAKE_DONE); the role comes
/// from the certificate (`TLSSession.peerIdentity(of:)`) and reaches the service per request.
public final class HTTP3Server: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        public var credentials: TLSCredentials
        public var clientAuthentication: ClientAuthentication
        public var quic: QUICSettings
        public var drainGracePeriod: TimeAmount
        /// Connections at once; beyond this new Initials are dropped.
        public var maxConnections: Int
        /// Connections still in the handshake at once (handshake-flood bound).
        public var maxHandshakes: Int
        /// When a client must prove its address with a Retry round trip first.
        public var addressValidation: AddressValidation

        public init(host: String, port: Int, credentials: TLSCredentials, clientAuthentication: ClientAuthentication = .require,
                    quic: QUICSettings = QUICSettings(), drainGracePeriod: TimeAmount = .seconds(30),
                    maxConnections: Int = 10_000, maxHandshakes: Int = 1_000,
                    addressValidation: AddressValidation = .whenHandshakesExceed(64)) {
            self.host = host
            self.port = port
            self.credentials = credentials
            self.clientAuthentication = clientAuthentication
            self.quic = quic
            self.drainGracePeriod = drainGracePeriod
            self.maxConnections = maxConnections
            self.maxHandshakes = maxHandshakes
            self.addressValidation = addressValidation
        }
    }

    /// When the server makes a client prove it owns its source address (RFC 9000 §8.1.2) before
    /// it keeps any state for it: a Retry packet with a token (bound to the address and the
    /// client's first DCID, valid 10 s); the client repeats its Initial with the token. Costs
    /// one round trip per new connection; an Initial with a forged source then costs the server
    /// one small stateless packet and no handshake (and lifts the 3x amplification limit for
    /// the validated client).
    public enum AddressValidation: Sendable, Equatable {
        case never
        case always
        /// Only while more than this many handshakes are under way (a flood, real or forged):
        /// ordinary clients pay nothing.
        case whenHandshakesExceed(Int)

        func requiresRetry(handshaking: Int) -> Bool {
            switch self {
            case .never: false
            case .always: true
            case .whenHandshakesExceed(let n): handshaking > n
            }
        }
    }

    public let configuration: Configuration
    private let service: any HTTPService
    private let group: any EventLoopGroup
    private let logger: Logger
    private let state = Mutex<(channel: (any Channel)?, handler: NIOLoopBound<QUICServerHandler>?)>((nil, nil))
    let statsBox = StatsBox()
    /// Set by `shutdownGracefully`/`close`: the socket closing is then expected.
    private let stopping = Mutex(false)
    private let socketRestarts = Counter(label: "cachemesh_quic_socket_restarts_total")

    public init(configuration: Configuration, service: any HTTPService, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger) {
        self.configuration = configuration
        self.service = service
        self.group = group
        self.logger = logger
    }

    /// Bind the UDP socket. Returns the bound address (port 0 picks a free port).
    @discardableResult
    public func start() async throws -> SocketAddress {
        let addr = try await open(configuration)
        logger.info("HTTP/3 listening", metadata: ["address": "\(addr.endpoint)"])
        return addr
    }

    /// Binds the socket (don't-fragment set), installs the handler, and watches the socket.
    private func open(_ config: Configuration) async throws -> SocketAddress {
        let tlsContext = try QUICTLSContext(credentials: config.credentials)
        let service = self.service
        let logger = self.logger
        let channel = try await QUICDatagramWriter.bootstrap(group: group, settings: config.quic)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: config.host, port: config.port).get()
        do { try await QUICDatagramWriter.forbidFragmentation(channel) } catch {
            try? await channel.close()
            throw error
        }
        let handler = try await channel.eventLoop.submit { [statsBox] in
            let h = QUICServerHandler(config: config, tls: tlsContext, service: service, stats: statsBox, logger: logger)
            try channel.pipeline.syncOperations.addHandler(h)
            return NIOLoopBound(h, eventLoop: channel.eventLoop)
        }.get()
        state.withLock { $0 = (channel, handler) }
        guard let addr = channel.localAddress else { throw HTTPTransportError.connectionClosed }
        supervise(channel, port: addr.port ?? config.port)
        return addr
    }

    /// SwiftNIO closes a UDP channel on any send error but EMSGSIZE and EHOSTUNREACH — EPERM
    /// from a local firewall rule toward one peer, ENETUNREACH when one client's route goes,
    /// EINVAL — which would end HTTP/3 for every client of this node. When the socket closes
    /// while the server is not stopping, it is opened again on the same port (its connections
    /// are lost: their clients see silence and reconnect or fall back), with a growing pause
    /// between attempts.
    private func supervise(_ channel: any Channel, port: Int) {
        channel.closeFuture.whenComplete { [weak self] _ in
            guard let self, !self.stopping.withLock({ $0 }) else { return }
            self.socketRestarts.increment()
            self.logger.error("HTTP/3 socket on \(self.configuration.host):\(port) closed by a send error: opening it again (its connections are lost)")
            Task {
                var pause = Duration.milliseconds(100)
                while !self.stopping.withLock({ $0 }) {
                    try? await Task.sleep(for: pause)
                    do {
                        var again = self.configuration
                        again.port = port
                        let addr = try await self.open(again)
                        self.logger.notice("HTTP/3 listening again", metadata: ["address": "\(addr.endpoint)"])
                        return
                    } catch {
                        self.logger.error("HTTP/3 socket on \(self.configuration.host):\(port) cannot be opened again: \(error) (retrying)")
                        pause = min(pause * 2, .seconds(5))
                    }
                }
            }
        }
    }

    public var stats: QUICServerStats { statsBox.value.withLock { $0 } }

    /// Open connections (including those closing).
    public func connectionCount() async -> Int {
        guard let (channel, handler) = state.withLock({ s in s.channel.flatMap { c in s.handler.map { (c, $0) } } }) else { return 0 }
        return (try? await channel.eventLoop.submit { handler.value.cores.count }.get()) ?? 0
    }

    /// HTTP/3 GOAWAY on every connection (notice, then final), keep accepting new connections.
    public func goawayAllConnections() {
        guard let (channel, handler) = state.withLock({ s in s.channel.flatMap { c in s.handler.map { (c, $0) } } }) else { return }
        let grace = configuration.drainGracePeriod
        channel.eventLoop.execute { handler.value.goawayAll(gracePeriod: grace, stopAccepting: false) }
    }

    /// Stop accepting, GOAWAY every connection, wait until they closed after their in-flight
    /// requests (bounded by the drain grace period), then close the socket.
    public func shutdownGracefully() async {
        stopping.withLock { $0 = true }
        guard let (channel, handler) = state.withLock({ s in s.channel.flatMap { c in s.handler.map { (c, $0) } } }) else { return }
        let grace = configuration.drainGracePeriod
        let done = try? await channel.eventLoop.submit { () -> EventLoopFuture<Void> in
            handler.value.goawayAll(gracePeriod: grace, stopAccepting: true)
            return handler.value.allClosed()
        }.get()
        try? await done?.get()
        try? await channel.close()
    }

    /// Close the socket now (connections are dropped without a word).
    public func close() async {
        stopping.withLock { $0 = true }
        let channel = state.withLock { $0.channel }
        try? await channel?.close()
    }
}

final class QUICServerHandler: ChannelInboundHandler, QUICCoreDelegate {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    static let scidLength = 18

    private let config: HTTP3Server.Configuration
    private let tls: QUICTLSContext
    private let service: any HTTPService
    private let stats: StatsBox
    private let logger: Logger
    private var context: ChannelHandlerContext?
    private var table = CIDRoutingTable<QUICCore>()
    private(set) var cores: [ObjectIdentifier: QUICCore] = [:]
    private var handshaking = 0
    private var accepting = true
    private var closeWaiters: [EventLoopPromise<Void>] = []
    /// Connections that read datagrams in the current read burst.
    private var dirty: [ObjectIdentifier: QUICCore] = [:]
    private var resetPolicy = StatelessResetPolicy()
    private var retiredRoutes = CircularBuffer<RetiredRoute>()
    private struct RetiredRoute {
        let cid: ConnectionID
        weak var core: QUICCore?
    }
    /// Retry tokens are only ever checked by this server within seconds: a per-run secret.
    private let retrySecret = randomBytes(32)
    static let retryTokenLifetime: UInt64 = 10_000_000_000

    init(config: HTTP3Server.Configuration, tls: QUICTLSContext, service: any HTTPService, stats: StatsBox, logger: Logger) {
        self.config = config
        self.tls = tls
        self.service = service
        self.stats = stats
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        let all = Array(cores.values)
        for c in all { c.finalize(error: HTTPTransportError.connectionClosed) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = unwrapInboundIn(data)
        QUICDatagramWriter.forEachDatagram(env) { route($0, from: env.remoteAddress) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        let d = dirty
        dirty = [:]
        for (_, c) in d { c.flushAfterRead() }
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // UDP errors (ICMP unreachable and the like) concern one peer, never the socket.
        logger.debug("QUIC socket error", metadata: ["error": "\(error)"])
    }

    private enum Decision {
        case drop
        case versionNegotiation(dcid: [UInt8], scid: [UInt8])
        case existing(QUICCore)
        case new
        case statelessReset(ConnectionID)
    }

    func route(_ buffer: ByteBuffer, from remote: SocketAddress) {
        var dropped = false
        defer {
            stats.value.withLock {
                $0.datagramsReceived += 1
                $0.largestDatagramReceived = max($0.largestDatagramReceived, buffer.readableBytes)
                if dropped { $0.datagramsDropped += 1 }
            }
        }
        let decision: Decision = buffer.withUnsafeReadableBytes { b in
            guard let base = b.baseAddress?.assumingMemoryBound(to: UInt8.self), b.count > 0 else { return .drop }
            var vc = ngtcp2_version_cid()
            let rv = ngtcp2_pkt_decode_version_cid(&vc, base, b.count, Self.scidLength)
            if rv == NGTCP2_ERR_VERSION_NEGOTIATION {
                // Only for datagrams big enough to be an Initial (no amplification).
                guard b.count >= 1200 else { return .drop }
                return .versionNegotiation(dcid: Array(UnsafeBufferPointer(start: vc.dcid, count: vc.dcidlen)),
                                           scid: Array(UnsafeBufferPointer(start: vc.scid, count: vc.scidlen)))
            }
            guard rv == 0 else { return .drop }
            let dcid = ConnectionID(pointer: vc.dcid, count: vc.dcidlen)
            if let core = table.lookup(dcid) { return .existing(core) }
            // Unknown DCID: only a long-header packet (an Initial) may start a connection; a
            // short-header one is for a connection we lost (a CID of ours has our length).
            guard b[0] & 0x80 != 0 else { return vc.dcidlen == Self.scidLength ? .statelessReset(dcid) : .drop }
            return .new
        }
        switch decision {
        case .drop:
            dropped = true
        case .versionNegotiation(let dcid, let scid):
            sendVersionNegotiation(dcid: dcid, scid: scid, to: remote)
        case .existing(let core):
            core.receive(buffer, from: remote)
            dirty[ObjectIdentifier(core)] = core
        case .new:
            if !accept(buffer, from: remote) { dropped = true }
        case .statelessReset(let dcid):
            dropped = true
            sendStatelessReset(for: dcid, triggerLength: buffer.readableBytes, to: remote)
        }
    }

    private func sendStatelessReset(for dcid: ConnectionID, triggerLength: Int, to remote: SocketAddress) {
        guard context != nil, let length = resetPolicy.resetLength(forTrigger: triggerLength, now: QUICClock.now()) else { return }
        var token = config.quic.resetSecret.token(for: dcid)
        // Random bytes (the first gets a short header's fixed bits), then the token.
        var random = randomBytes(length - token.count)
        sendStateless(capacity: length, to: remote, counting: \.statelessResetsSent) { dest in
            ngtcp2_pkt_write_stateless_reset(dest, length, &token, &random, random.count)
        }
    }

    /// A packet no connection sends (Version Negotiation, Retry, Stateless Reset): `write` fills
    /// at most `capacity` bytes and returns how many (≤ 0: nothing to send). Counted in `stat`.
    /// Returns whether it went out.
    @discardableResult
    private func sendStateless(capacity: Int, to remote: SocketAddress, counting stat: WritableKeyPath<QUICServerStats, Int>,
                               _ write: (UnsafeMutablePointer<UInt8>) -> Int) -> Bool {
        guard let context else { return false }
        var out = context.channel.allocator.buffer(capacity: capacity)
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: capacity) { dest in
            max(0, write(dest.baseAddress!.assumingMemoryBound(to: UInt8.self)))
        }
        guard out.readableBytes > 0 else { return false }
        stats.value.withLock { $0[keyPath: stat] += 1 }
        context.writeAndFlush(wrapOutboundOut(AddressedEnvelope(remoteAddress: remote, data: out)), promise: nil)
        return true
    }

    private func accept(_ buffer: ByteBuffer, from remote: SocketAddress) -> Bool {
        guard let context, let local = context.channel.localAddress else { return false }
        guard accepting, cores.count < config.maxConnections, handshaking < config.maxHandshakes else {
            stats.value.withLock { $0.connectionsRefused += 1 }
            return false
        }
        var retried = false
        let created: QUICCore? = buffer.withUnsafeReadableBytes { b -> QUICCore? in
            var hd = ngtcp2_pkt_hd()
            let arv = ngtcp2_accept(&hd, b.baseAddress!.assumingMemoryBound(to: UInt8.self), b.count)
            guard arv == 0 else {
                logger.trace("QUIC: ngtcp2_accept refused a packet", metadata: ["error": "\(arv)", "size": "\(b.count)"])
                return nil
            }
            var retry: QUICCore.ValidatedRetry?
            if hd.token.len > 0, hd.token.base[0] == UInt8(NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY) {
                guard let v = verifyRetryToken(hd, from: remote) else {
                    stats.value.withLock { $0.retryTokensRejected += 1 }
                    return nil
                }
                retry = v
            }
            // Other tokens (NEW_TOKEN: we issue none) are ignored, as if absent.
            if retry == nil, config.addressValidation.requiresRetry(handshaking: handshaking) {
                retried = sendRetry(hd, to: remote, triggerLength: b.count)
                return nil
            }
            do { return try QUICCore(server: hd, retry: retry, authentication: config.clientAuthentication, service: service, tls: tls,
                                     settings: config.quic, local: local, remote: remote, loop: context.eventLoop, logger: logger)
            } catch {
                logger.debug("QUIC: cannot create connection", metadata: ["error": "\(error)"])
                return nil
            }
        }
        guard let core = created else { return retried }
        core.delegate = self
        cores[ObjectIdentifier(core)] = core
        table.add(core.scid, for: core)
        if let o = core.originalDCID { table.add(o, for: core) }
        handshaking += 1
        stats.value.withLock { $0.connectionsAccepted += 1 }
        core.receive(buffer, from: remote)
        core.flushAfterRead()
        if core.packetsSent == 0 {
            // Nothing decrypted (forged or corrupted Initial): forget it now.
            core.finalize(error: nil)
            return false
        }
        return true
    }

    /// A Retry for this Initial: a fresh SCID and a token binding the client's address and first
    /// DCID to it. No state is kept. Returns whether it went out.
    private func sendRetry(_ hd: ngtcp2_pkt_hd, to remote: SocketAddress, triggerLength: Int) -> Bool {
        var h = hd
        var scid = ConnectionID.random(length: Self.scidLength).ngtcp2
        var token = [UInt8](repeating: 0, count: cm_max_retry_tokenlen)
        let tokenLength = remote.withSockAddr { sa, salen in
            retrySecret.withUnsafeBufferPointer { s in
                ngtcp2_crypto_generate_retry_token(&token, s.baseAddress, s.count, h.version, sa, ngtcp2_socklen(salen), &scid, &h.dcid, QUICClock.now())
            }
        }
        guard tokenLength > 0 else { return false }
        // Never more than the Initial that drew it (which was at least 1200 bytes).
        let capacity = min(triggerLength, 1200)
        return sendStateless(capacity: capacity, to: remote, counting: \.retriesSent) { dest in
            ngtcp2_crypto_write_retry(dest, capacity, h.version, &h.scid, &scid, &h.dcid, token, Int(tokenLength))
        }
    }

    /// The client's first DCID if `hd` carries a Retry token we made for this address and for
    /// the SCID of our Retry (the DCID of this Initial), less than 10 s ago.
    private func verifyRetryToken(_ hd: ngtcp2_pkt_hd, from remote: SocketAddress) -> QUICCore.ValidatedRetry? {
        var h = hd
        var odcid = ngtcp2_cid()
        let rv = remote.withSockAddr { sa, salen in
            retrySecret.withUnsafeBufferPointer { s in
                ngtcp2_crypto_verify_retry_token(&odcid, h.token.base, h.token.len, s.baseAddress, s.count, h.version,
                                                 sa, ngtcp2_socklen(salen), &h.dcid, Self.retryTokenLifetime, QUICClock.now())
            }
        }
        guard rv == 0 else { return nil }
        return QUICCore.ValidatedRetry(originalDCID: odcid, token: Array(UnsafeBufferPointer(start: hd.token.base, count: hd.token.len)))
    }

    private func sendVersionNegotiation(dcid: [UInt8], scid: [UInt8], to remote: SocketAddress) {
        var versions: [UInt32] = [NGTCP2_PROTO_VER_V1]
        let random = randomBytes(1)[0]
        sendStateless(capacity: 256, to: remote, counting: \.versionNegotiationsSent) { dest in
            // The reply swaps the CIDs: its DCID is the client's SCID.
            ngtcp2_pkt_write_version_negotiation(dest, 256, random, scid, scid.count, dcid, dcid.count, &versions, versions.count)
        }
    }

    // MARK: QUICCoreDelegate

    func quicCore(_ core: QUICCore, send buffer: ByteBuffer, sends: [GSOBatcher.Send], to remote: SocketAddress) {
        guard let context else { return }
        QUICDatagramWriter.write(context: context, buffer: buffer, sends: sends, to: remote)
    }

    func quicCore(_ core: QUICCore, didIssue cid: ConnectionID) {
        table.add(cid, for: core)
    }

    /// A retired CID keeps routing to its connection for a while: a packet the peer sent with it
    /// before it switched (reordered, or in flight) must not draw a Stateless Reset, which the
    /// peer would match against the retired CID's token and close a live connection. The
    /// newest `retiredRouteLimit` retired routes are kept (all go when their connection closes).
    func quicCore(_ core: QUICCore, didRetire cid: ConnectionID) {
        retiredRoutes.append(RetiredRoute(cid: cid, core: core))
        while retiredRoutes.count > Self.retiredRouteLimit {
            let old = retiredRoutes.removeFirst()
            if let c = old.core { table.remove(old.cid, for: c) }
        }
    }

    static let retiredRouteLimit = 1024

    func quicCoreHandshakeCompleted(_ core: QUICCore) {
        handshaking -= 1
        logger.debug("QUIC connection established", metadata: ["peer": "\(core.peer?.description ?? "-")", "remote": "\(core.remoteAddress.endpoint)"])
    }

    func quicCoreDidClose(_ core: QUICCore, error: (any Error)?) {
        if !core.handshakeCompleted {
            handshaking -= 1
            stats.value.withLock { $0.handshakesFailed += 1 }
        }
        table.removeAll(for: core)
        cores[ObjectIdentifier(core)] = nil
        if cores.isEmpty {
            let w = closeWaiters
            closeWaiters = []
            w.forEach { $0.succeed(()) }
        }
    }

    // MARK: drain

    func goawayAll(gracePeriod: TimeAmount, stopAccepting: Bool) {
        if stopAccepting { accepting = false }
        for c in cores.values {
            if c.handshakeCompleted {
                c.startGracefulShutdown(gracePeriod: gracePeriod)
            } else {
                c.closeApplication()
            }
        }
    }

    func allClosed() -> EventLoopFuture<Void> {
        guard let context else { return MultiThreadedEventLoopGroup.singleton.any().makeSucceededVoidFuture() }
        if cores.isEmpty { return context.eventLoop.makeSucceededVoidFuture() }
        let p = context.eventLoop.makePromise(of: Void.self)
        closeWaiters.append(p)
        return p.futureResult
    }
}

final class StatsBox: Sendable {
    let value = Mutex(QUICServerStats())
}

enum QUICDatagramWriter {
    /// Every message of a vector read gets a buffer for the largest UDP payload (64 KiB): a
    /// peer may send datagrams of any size up to its max_udp_payload_size setting — even its
    /// first Initial, before it knows ours — and a datagram larger than its buffer arrives
    /// truncated and is lost. With GRO the kernel fills it with up to 64 KiB of coalesced datagrams.
    static let receiveSlot = 65_536

    /// A UDP bootstrap with large socket buffers, vector reads and (where available) GRO.
    static func bootstrap(group: any EventLoopGroup, settings: QUICSettings) -> DatagramBootstrap {
        let gro = settings.gro && System.supportsUDPReceiveOffload
        var b = DatagramBootstrap(group: group)
            .channelOption(.socketOption(.so_rcvbuf), value: 8 << 20)
            .channelOption(.socketOption(.so_sndbuf), value: 8 << 20)
        if gro {
            b = b.channelOption(.datagramReceiveOffload, value: true)
                .channelOption(.datagramReceiveSegmentSize, value: true)
        }
        return b.channelOption(.datagramVectorReadMessageCount, value: 8)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 8 * receiveSlot))
    }

    /// Sets "don't fragment" on a bound UDP socket (IPv4 and, for IPv6 sockets, both families).
    ///
    /// Without it the kernel fragments a datagram larger than the link MTU: a path-MTU probe of
    /// 1452 bytes on a 1400-byte link then *arrives* (in fragments), ngtcp2 takes 1452 as the
    /// path's size, and every full-size packet after it is sent in GSO batches whose segments do
    /// not fit the MTU — which Linux refuses whole (EINVAL) — so data stalls while the
    /// handshake (≤ 1200-byte packets) worked. With DF a too-large probe is simply lost (EMSGSIZE
    /// locally, or dropped with ICMP on the way) and path MTU discovery settles on what the path
    /// carries, the way RFC 9000 §14 expects.
    static func forbidFragmentation(_ channel: any Channel) async throws {
        guard let local = channel.localAddress else { return }
        let v4 = ChannelOptions.Types.SocketOption(level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_IP)),
                                                   name: NIOBSDSocket.Option(rawValue: CInt(IP_MTU_DISCOVER)))
        if local.protocol == .inet6 {
            let v6 = ChannelOptions.Types.SocketOption(level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_IPV6)),
                                                       name: NIOBSDSocket.Option(rawValue: CInt(IPV6_MTU_DISCOVER)))
            try await channel.setOption(v6, value: Int(IPV6_PMTUDISC_DO)).get()
            // A dual-stack socket also carries IPv4 (mapped) traffic.
            try? await channel.setOption(v4, value: Int(IP_PMTUDISC_DO)).get()
        } else {
            try await channel.setOption(v4, value: Int(IP_PMTUDISC_DO)).get()
        }
    }

    /// The datagrams of one read: a GRO-coalesced buffer is split at its segment size.
    static func forEachDatagram(_ env: AddressedEnvelope<ByteBuffer>, _ body: (ByteBuffer) -> Void) {
        var data = env.data
        guard let seg = env.metadata?.segmentSize, seg > 0, data.readableBytes > seg else {
            body(data)
            return
        }
        while data.readableBytes > 0, let slice = data.readSlice(length: min(seg, data.readableBytes)) {
            body(slice)
        }
    }

    /// `promise` (optional) completes with the last datagram's write.
    static func write(context: ChannelHandlerContext, buffer: ByteBuffer, sends: [GSOBatcher.Send], to remote: SocketAddress,
                      promise: EventLoopPromise<Void>? = nil) {
        var pending = promise
        for (i, s) in sends.enumerated() {
            guard let slice = buffer.getSlice(at: buffer.readerIndex + s.offset, length: s.length) else { continue }
            let metadata = s.segmentSize.map {
                AddressedEnvelope<ByteBuffer>.Metadata(ecnState: .transportNotCapable, packetInfo: nil, segmentSize: $0)
            }
            let p = i == sends.count - 1 ? pending : nil
            if p != nil { pending = nil }
            context.write(NIOAny(AddressedEnvelope(remoteAddress: remote, data: slice, metadata: metadata)), promise: p)
        }
        pending?.succeed(())
        context.flush()
    }
}
