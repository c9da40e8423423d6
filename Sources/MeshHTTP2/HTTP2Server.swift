import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization

/// An HTTP/2 server over TLS (or plaintext with `credentials == nil`) on SwiftNIO sockets.
public final class HTTP2Server: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// nil = plaintext h2c (prior knowledge), only for local experiments.
        public var credentials: TLSCredentials?
        public var clientAuthentication: ClientAuthentication
        public var handshakeTimeout: TimeAmount
        public var maxConcurrentStreams: UInt32
        public var initialStreamWindow: UInt32
        public var connectionWindow: Int32
        public var drainGracePeriod: TimeAmount
        /// Largest decoded request header list (RFC 9113 §6.5.2 size); larger ones get 431.
        public var maxHeaderListBytes: Int = 64 * 1024
        /// A request body from which nothing arrives for this long fails (408; the stream is
        /// reset): a stalled upload does not keep its write slot and reserved space. nil: never.
        public var requestBodyIdleTimeout: Duration? = .seconds(30)
        /// With the idle timeout: a request body slower than this (bytes/s, over half the idle
        /// timeout) fails too (a trickling upload). 0: no minimum.
        public var requestBodyMinRate: Int = 16 * 1024
        /// A response the client takes no bytes of for this long (its window stays closed, or
        /// its socket takes nothing) is reset, giving back its read slot. nil: never.
        public var responseStallTimeout: Duration? = .seconds(30)
        /// Open connections at once (see `ConnectionLimiter`: the longest-idle one makes room
        /// for a new one; when all are busy, accepting pauses).
        public var maxConnections: Int = 4096
        /// Counts requests cut when the drain grace period ends (nil: not counted).
        public var drainCuts: DrainCuts?
        /// A connection without an open stream for this long is closed (GOAWAY). nil: never.
        public var idleTimeout: Duration? = .seconds(300)
        /// The node-wide budget of request-body bytes held in memory (shared by every server of
        /// the node; see `RequestBodyBudget`). nil: each connection's windows alone bound it.
        public var requestBodyBudget: RequestBodyBudget?
        /// A request head begun and not finished this long after (HTTP/2: a header block without
        /// its END_HEADERS; HTTP/1.1: a partial request head) closes the connection. nil: never.
        public var requestHeadersTimeout: Duration? = .seconds(20)

        public init(host: String, port: Int, credentials: TLSCredentials?, clientAuthentication: ClientAuthentication = .require,
                    handshakeTimeout: TimeAmount = .seconds(10), maxConcurrentStreams: UInt32 = 128,
                    initialStreamWindow: UInt32 = 256 * 1024, connectionWindow: Int32 = 16 << 20,
                    drainGracePeriod: TimeAmount = .seconds(30)) {
            self.host = host
            self.port = port
            self.credentials = credentials
            self.clientAuthentication = clientAuthentication
            self.handshakeTimeout = handshakeTimeout
            self.maxConcurrentStreams = maxConcurrentStreams
            self.initialStreamWindow = initialStreamWindow
            self.connectionWindow = connectionWindow
            self.drainGracePeriod = drainGracePeriod
        }
    }

    public let configuration: Configuration
    private let service: any HTTPService
    private let group: any EventLoopGroup
    private let logger: Logger
    private let connections = ServerConnections()

    public init(configuration: Configuration, service: any HTTPService, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger) {
        self.configuration = configuration
        self.service = service
        self.group = group
        self.logger = logger
    }

    /// Bind and start accepting. Returns the bound address (port 0 picks a free port).
    @discardableResult
    public func start() async throws -> SocketAddress {
        let config = configuration
        let service = self.service
        let logger = self.logger
        let limiter = ConnectionLimiter(maxConnections: max(1, config.maxConnections), logger: logger)
        self.limiter.withLock { $0 = limiter }
        let bootstrap = connections.bootstrap(group: group, backlog: 4096, limiter: limiter) { channel in
            try channel.syncOptions?.setOption(.tcpOption(.tcp_nodelay), value: 1)
            let h1 = config.http1Limits
            let makeH2 = { (peer: PeerIdentity) in
                config.makeHTTP2Handler(service: service, plaintext: config.credentials == nil, plaintextPeer: peer, limiter: limiter, logger: logger)
            }
            if let creds = config.credentials {
                // ALPN h2 → HTTP/2; http/1.1 or none → HTTP/1.1 (curl --http1.1, Bazel's
                // HTTP cache client, ccache-like tools), with the certificate's role.
                try channel.pipeline.syncOperations.addHandler(GnuTLSHandler(
                    credentials: creds, mode: .server(config.clientAuthentication), alpn: ["h2", "http/1.1"],
                    handshakeTimeout: config.handshakeTimeout, logger: logger))
                try channel.pipeline.syncOperations.addHandler(ALPNSwitch { pipeline, event in
                    if event.alpn == "h2" {
                        try pipeline.addHandler(makeH2(.insecure))
                    } else {
                        try addHTTP1Handlers(to: pipeline, service: service, peer: event.peer, tls: true, limits: h1,
                                             limiter: limiter, drainCuts: config.drainCuts, logger: logger)
                    }
                })
            } else {
                // --insecure: h2c with prior knowledge, or HTTP/1.1, told apart on the first bytes.
                try channel.pipeline.syncOperations.addHandler(ProtocolSniffer { pipeline, isH2 in
                    if isH2 {
                        try pipeline.addHandler(makeH2(.insecure))
                    } else {
                        try addHTTP1Handlers(to: pipeline, service: service, peer: .insecure, tls: false, limits: h1,
                                             limiter: limiter, drainCuts: config.drainCuts, logger: logger)
                    }
                })
            }
        }
        let channel = try await bootstrap.bind(host: config.host, port: config.port).get()
        connections.listening(on: channel)
        guard let addr = channel.localAddress else { throw HTTPTransportError.connectionClosed }
        logger.info("HTTP/2 listening", metadata: ["address": "\(addr.endpoint)", "tls": "\(config.credentials != nil)"])
        return addr
    }

    public var connectionCount: Int { connections.count }

    private let limiter = Mutex<ConnectionLimiter?>(nil)

    /// Stop accepting, send GOAWAY (notice, then final) on every connection, and wait until
    /// they closed (in-flight streams finish, bounded by the drain grace period).
    public func shutdownGracefully() async {
        await connections.shutdownGracefully()
    }

    /// Start a graceful GOAWAY on every open connection but keep accepting new ones
    /// (tests, and a drain phase that hands clients to fresh connections).
    public func goawayAllConnections() {
        connections.goawayAll()
    }

    /// Close the listener and every connection now.
    public func close() async {
        await connections.close()
    }
}

/// After the TLS handshake, installs the protocol ALPN chose (HTTP/2 for `h2`, HTTP/1.1 for
/// `http/1.1` or no ALPN) behind itself, hands it the handshake's event and leaves.
final class ALPNSwitch: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    private let install: (ChannelPipeline.SynchronousOperations, TLSEstablishedEvent) throws -> Void

    init(install: @escaping (ChannelPipeline.SynchronousOperations, TLSEstablishedEvent) throws -> Void) {
        self.install = install
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is HTTP2GracefulShutdownEvent {
            // Draining before the handshake finished: no request can be in flight.
            context.close(promise: nil)
            return
        }
        guard let e = event as? TLSEstablishedEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        do {
            try install(context.pipeline.syncOperations, e)
        } catch {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
