import Logging
import MeshHTTP
import NIOCore
import NIOPosix
import Synchronization

/// What the TCP servers (`HTTP2Server` on the TLS port, `LocalServer` on the local endpoint)
/// share: the listener, the connections it accepted, and their shutdown — graceful (every
/// connection runs its `ConnectionDrain`) or at once.
final class ServerConnections: Sendable {
    private let state = Mutex<(server: (any Channel)?, connections: [ObjectIdentifier: any Channel])>((nil, [:]))

    /// A bootstrap with the servers' common options: a backlog, SO_REUSEADDR, a second's back-off
    /// on EMFILE/ENFILE instead of spinning, the connection limit, the write watermarks; each
    /// accepted connection is tracked before `initialize` sets up its pipeline.
    func bootstrap(group: any EventLoopGroup, backlog: Int32, limiter: ConnectionLimiter,
                   initialize: @escaping @Sendable (any Channel) throws -> Void) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: backlog)
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
                return channel.eventLoop.makeCompletedFuture { try initialize(channel) }
            }
    }

    func listening(on channel: any Channel) {
        state.withLock { $0.server = channel }
    }

    private func track(_ channel: any Channel) {
        let id = ObjectIdentifier(channel)
        state.withLock { $0.connections[id] = channel }
        channel.closeFuture.whenComplete { [weak self] _ in
            self?.state.withLock { _ = $0.connections.removeValue(forKey: id) }
        }
    }

    var count: Int { state.withLock { $0.connections.count } }

    /// Stop accepting (then `afterListenerClosed`), start a graceful close on every connection
    /// and wait until they all closed.
    func shutdownGracefully(afterListenerClosed: () -> Void = {}) async {
        let (server, conns) = state.withLock { ($0.server, Array($0.connections.values)) }
        try? await server?.close()
        afterListenerClosed()
        for c in conns { c.pipeline.fireUserInboundEventTriggered(HTTP2GracefulShutdownEvent()) }
        for c in conns { try? await c.closeFuture.get() }
    }

    /// A graceful close on every open connection; new ones are still accepted.
    func goawayAll() {
        let conns = state.withLock { Array($0.connections.values) }
        for c in conns { c.pipeline.fireUserInboundEventTriggered(HTTP2GracefulShutdownEvent()) }
    }

    /// Close the listener (then `afterListenerClosed`) and every connection now.
    func close(afterListenerClosed: () -> Void = {}) async {
        let (server, conns) = state.withLock { ($0.server, Array($0.connections.values)) }
        try? await server?.close()
        afterListenerClosed()
        for c in conns { try? await c.close() }
    }
}

extension HTTP2Server.Configuration {
    /// The nghttp2 settings of a server connection.
    var sessionSettings: NGHTTP2Session.Settings {
        NGHTTP2Session.Settings(maxConcurrentStreams: maxConcurrentStreams, initialWindowSize: initialStreamWindow,
                                connectionWindowSize: connectionWindow, maxHeaderListSize: UInt32(clamping: maxHeaderListBytes))
    }

    /// An HTTP/2 server connection with these budgets (`plaintextPeer`: who a plaintext
    /// connection's requests come from; a TLS one takes the certificate's identity).
    func makeHTTP2Handler(service: any HTTPService, plaintext: Bool, plaintextPeer: PeerIdentity, limiter: ConnectionLimiter,
                          logger: Logger) -> HTTP2ServerHandler {
        HTTP2ServerHandler(
            service: service, plaintext: plaintext, plaintextPeer: plaintextPeer, settings: sessionSettings,
            gracePeriod: drainGracePeriod, bodyIdleTimeout: requestBodyIdleTimeout, bodyMinRate: requestBodyMinRate,
            responseStallTimeout: responseStallTimeout, idleTimeout: idleTimeout,
            limiter: limiter, drainCuts: drainCuts, bodyBudget: requestBodyBudget,
            headersTimeout: requestHeadersTimeout, logger: logger)
    }

    /// The same budgets for an HTTP/1.1 connection.
    public var http1Limits: HTTP1Limits {
        var l = HTTP1Limits()
        l.maxHeaderListBytes = maxHeaderListBytes
        l.bodyIdleTimeout = requestBodyIdleTimeout
        l.bodyMinRate = requestBodyMinRate
        l.responseStallTimeout = responseStallTimeout
        l.idleTimeout = idleTimeout
        l.bodyBudget = requestBodyBudget
        l.headersTimeout = requestHeadersTimeout
        l.drainGracePeriod = drainGracePeriod
        return l
    }
}
