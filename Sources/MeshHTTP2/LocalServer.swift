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
    private let connections = ServerConnections()

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
        let h1 = base.http1Limits
        let bootstrap = connections.bootstrap(group: group, backlog: 1024, limiter: limiter) { channel in
            if case .tcp = config.address {
                try channel.syncOptions?.setOption(.tcpOption(.tcp_nodelay), value: 1)
            }
            try channel.pipeline.syncOperations.addHandler(ProtocolSniffer(timeout: base.requestHeadersTimeout, logger: logger) { pipeline, isH2 in
                if isH2 {
                    try pipeline.addHandler(base.makeHTTP2Handler(service: service, plaintext: true, plaintextPeer: config.peer,
                                                                  limiter: limiter, logger: logger))
                } else {
                    try addHTTP1Handlers(to: pipeline, service: service, peer: config.peer, tls: false, limits: h1,
                                         limiter: limiter, drainCuts: base.drainCuts, logger: logger)
                }
            })
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
        connections.listening(on: channel)
        guard let addr = channel.localAddress else { throw HTTPTransportError.connectionClosed }
        logger.info("local endpoint listening", metadata: ["address": "\(config.address)", "role": "\(config.peer.role?.rawValue ?? "-")"])
        return addr
    }

    public var connectionCount: Int { connections.count }

    /// Stop accepting; HTTP/2 connections get GOAWAY, HTTP/1.1 ones close after the response in
    /// flight (or at once when idle); waits until every connection closed.
    public func shutdownGracefully() async {
        await connections.shutdownGracefully(afterListenerClosed: removeSocketFile)
    }

    public func close() async {
        await connections.close(afterListenerClosed: removeSocketFile)
    }

    private func removeSocketFile() {
        if case .unix(let path) = configuration.address { unlink(path) }
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
    /// A connection that has not said which protocol it speaks this long after it opened (no
    /// byte, or a prefix of the HTTP/2 preface) is closed: neither protocol's head timeout has
    /// started yet, and it would otherwise hold its descriptor for as long as the client likes.
    private let timeout: Duration?
    private let logger: Logger?
    private var deadline: Scheduled<Void>?

    init(timeout: Duration? = nil, logger: Logger? = nil, install: @escaping (ChannelPipeline.SynchronousOperations, Bool) throws -> Void) {
        self.install = install
        self.timeout = timeout
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        guard let timeout else { return }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000)) {
            let (me, context) = bound.value
            guard !me.decided else { return }
            TransportRefusals.count("request_headers_timeout", transport: "local")
            me.logger?.notice("local endpoint: no request head in time (\(me.buffered?.readableBytes ?? 0) byte(s) received): closing the connection",
                              metadata: ["timeout": "\(timeout)"])
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
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
