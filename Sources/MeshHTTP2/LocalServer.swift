import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization

/// The local worker endpoint: plaintext on loopback (or a unix domain socket) for the build tools
/// on this machine — Bazel's HTTP and gRPC caches, ccache — which cannot do our mTLS. One port
/// speaks HTTP/1.1, h2c with prior knowledge and gRPC over h2c, told apart on the first bytes
/// (the HTTP/2 connection preface or not). Every request gets `peer` (no certificate to tell) and
/// goes to the same service, with the same budgets, as the TLS port.
public final class LocalServer: Sendable {
    public enum Address: Sendable, CustomStringConvertible {
        case tcp(host: String, port: Int)
        /// A unix domain socket, made mode 0660 after binding.
        case unix(path: String)

        public var description: String {
            switch self {
            case .tcp(let h, let p): h.contains(":") ? "[\(h)]:\(p)" : "\(h):\(p)"
            case .unix(let p): "unix:\(p)"
            }
        }
    }

    public struct Configuration: Sendable {
        public var address: Address
        public var peer: PeerIdentity
        /// Budgets, drain grace period and HTTP/2 settings as on the TLS port (its credentials
        /// are not used).
        public var base: HTTP2Server.Configuration
        public init(address: Address, peer: PeerIdentity, base: HTTP2Server.Configuration) {
            self.address = address
            self.peer = peer
            self.base = base
        }
    }

    public let configuration: Configuration
    private let service: any HTTPService
    private let group: any EventLoopGroup
    private let logger: Logger
    private let state = Mutex<(server: (any Channel)?, connections: [ObjectIdentifier: any Channel])>((nil, [:]))

    public init(configuration: Configuration, service: any HTTPService, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger) {
        self.configuration = configuration
        self.service = service
        self.group = group
        self.logger = logger
    }

    /// The role a local endpoint's requests get.
    public static func peer(role: PeerRole) -> PeerIdentity {
        PeerIdentity(commonName: "local", role: role, authenticated: false)
    }

    /// Bind and start accepting; returns the bound address (port 0 picks a free port).
    @discardableResult
    public func start() async throws -> SocketAddress {
        let config = configuration
        let base = config.base
        let service = self.service
        let logger = self.logger
        let limiter = ConnectionLimiter(maxConnections: max(1, base.maxConnections), logger: logger)
        let settings = NGHTTP2Session.Settings(maxConcurrentStreams: base.maxConcurrentStreams, initialWindowSize: base.initialStreamWindow,
                                               connectionWindowSize: base.connectionWindow, maxHeaderListSize: UInt32(clamping: base.maxHeaderListBytes))
        let h1 = base.http1Limits
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AcceptBackoffHandler())
                    try channel.pipeline.syncOperations.addHandler(limiter)
                }
            }
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 * 1024, high: 1024 * 1024))
            .childChannelInitializer { [weak self] channel in
                self?.track(channel)
                return channel.eventLoop.makeCompletedFuture {
                    if case .tcp = config.address {
                        try channel.syncOptions?.setOption(.tcpOption(.tcp_nodelay), value: 1)
                    }
                    try channel.pipeline.syncOperations.addHandler(ProtocolSniffer { pipeline, isH2 in
                        if isH2 {
                            try pipeline.addHandler(HTTP2ServerHandler(
                                service: service, plaintext: true, plaintextPeer: config.peer, settings: settings,
                                gracePeriod: base.drainGracePeriod, bodyIdleTimeout: base.requestBodyIdleTimeout, bodyMinRate: base.requestBodyMinRate,
                                responseStallTimeout: base.responseStallTimeout, idleTimeout: base.idleTimeout,
                                limiter: limiter, drainCuts: base.drainCuts, bodyBudget: base.requestBodyBudget,
                                headersTimeout: base.requestHeadersTimeout, logger: logger))
                        } else {
                            try addHTTP1Handlers(to: pipeline, service: service, peer: config.peer, tls: false, limits: h1,
                                                 limiter: limiter, drainCuts: base.drainCuts, logger: logger)
                        }
                    })
                }
            }
        let channel: any Channel
        switch config.address {
        case .tcp(let host, let port):
            channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            guard chmod(path, 0o660) == 0 else {
                let code = errno
                try? await channel.close()
                throw IOError(errnoCode: code, reason: "chmod 0660 \(path)")
            }
        }
        state.withLock { $0.server = channel }
        guard let addr = channel.localAddress else { throw HTTPTransportError.connectionClosed }
        logger.info("local endpoint listening", metadata: ["address": "\(config.address)", "role": "\(config.peer.role?.rawValue ?? "-")"])
        return addr
    }

    private func track(_ channel: any Channel) {
        let id = ObjectIdentifier(channel)
        state.withLock { $0.connections[id] = channel }
        channel.closeFuture.whenComplete { [weak self] _ in
            self?.state.withLock { _ = $0.connections.removeValue(forKey: id) }
        }
    }

    public var connectionCount: Int { state.withLock { $0.connections.count } }

    /// Stop accepting; HTTP/2 connections get GOAWAY, HTTP/1.1 ones close after the response in
    /// flight (or at once when idle); waits until every connection closed.
    public func shutdownGracefully() async {
        let (server, conns) = state.withLock { ($0.server, Array($0.connections.values)) }
        try? await server?.close()
        if case .unix(let path) = configuration.address { unlink(path) }
        for c in conns { c.pipeline.fireUserInboundEventTriggered(HTTP2GracefulShutdownEvent()) }
        for c in conns { try? await c.closeFuture.get() }
    }

    public func close() async {
        let (server, conns) = state.withLock { ($0.server, Array($0.connections.values)) }
        try? await server?.close()
        if case .unix(let path) = configuration.address { unlink(path) }
        for c in conns { try? await c.close() }
    }
}

/// Looks at the first bytes of a plaintext connection: the HTTP/2 connection preface means h2c
/// with prior knowledge (and gRPC), anything else HTTP/1.1. At most 24 bytes are held while it
/// decides; then it installs the protocol's handlers after itself and leaves the pipeline.
final class ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    private var buffered: ByteBuffer?
    private var decided = false
    private let install: (ChannelPipeline.SynchronousOperations, Bool) throws -> Void

    init(install: @escaping (ChannelPipeline.SynchronousOperations, Bool) throws -> Void) {
        self.install = install
    }

    /// true: HTTP/2 preface, false: something else, nil: cannot tell yet.
    static func classify(_ bytes: ByteBufferView) -> Bool? {
        let n = min(bytes.count, preface.count)
        guard bytes.prefix(n).elementsEqual(preface.prefix(n)) else { return false }
        return n == preface.count ? true : nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var chunk = unwrapInboundIn(data)
        guard !decided else {
            context.fireChannelRead(data)
            return
        }
        if buffered == nil { buffered = chunk } else { buffered!.writeBuffer(&chunk) }
        guard let isH2 = Self.classify(buffered!.readableBytesView) else { return }
        decided = true
        do {
            try install(context.pipeline.syncOperations, isH2)
        } catch {
            context.close(promise: nil)
            return
        }
        let bytes = buffered!
        buffered = nil
        context.fireChannelRead(wrapInboundOut(bytes))
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is HTTP2GracefulShutdownEvent, !decided {
            // Draining before the client said anything: nothing is in flight.
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

extension HTTP2Server.Configuration {
    /// The same budgets for an HTTP/1.1 connection.
    public var http1Limits: HTTP1Limits {
        var l = HTTP1Limits()
        l.maxHeaderListBytes = maxHeaderListBytes
        l.bodyIdleTimeout = requestBodyIdleTimeout
        l.bodyMinRate = requestBodyMinRate
        l.responseStallTimeout = responseStallTimeout
        l.idleTimeout = idleTimeout
        l.drainGracePeriod = drainGracePeriod
        l.bodyBudget = requestBodyBudget
        l.headersTimeout = requestHeadersTimeout
        return l
    }
}
