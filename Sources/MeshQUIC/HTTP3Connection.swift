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

/// One HTTP/3 connection (QUIC, mutual TLS) to a server, on its own UDP socket.
///
/// Requests are cancellable (task cancellation or `HTTPClientResponse.cancel` → RESET_STREAM +
/// STOP_SENDING with H3_REQUEST_CANCELLED). When the server sends GOAWAY, requests it will not
/// process fail with `HTTPTransportError.goaway` (retryable) and `isUsable` becomes false.
public final class HTTP3Connection: HTTPClientTransport {
    public let channel: any Channel
    /// The server's identity from its verified certificate.
    public let peer: PeerIdentity
    public let authority: String
    private let core: NIOLoopBound<QUICCore>
    private let flags: QUICConnectionFlags

    private init(channel: any Channel, peer: PeerIdentity, core: NIOLoopBound<QUICCore>, flags: QUICConnectionFlags, authority: String) {
        self.channel = channel
        self.peer = peer
        self.core = core
        self.flags = flags
        self.authority = authority
    }

    /// Connect and handshake, verifying the server certificate against the CA of `credentials`
    /// and `serverName` (default: `host`; a DNS name or an IP address SAN). ALPN h3.
    public static func connect(
        host: String, port: Int, credentials: TLSCredentials, serverName: String? = nil,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        settings: QUICSettings = QUICSettings(),
        connectTimeout: TimeAmount = .seconds(10),
        logger: Logger = Logger(label: "cachemesh.h3client")
    ) async throws -> HTTP3Connection {
        let remote = try SocketAddress.makeAddressResolvingHost(host, port: port)
        let tls = try QUICTLSContext(credentials: credentials)
        var settings = settings
        settings.handshakeTimeout = connectTimeout
        // A connected UDP socket: the kernel then reports an ICMP port unreachable (nothing
        // listens on that UDP port) as ECONNREFUSED, and the handshake fails at once instead of
        // after `connectTimeout`.
        let channel = try await QUICDatagramWriter.bootstrap(group: group, settings: settings)
            .connect(to: remote).get()
        do { try await QUICDatagramWriter.forbidFragmentation(channel) } catch {
            try? await channel.close()
            throw error
        }
        let name = serverName ?? host
        let settingsCopy = settings
        do {
            let (core, ready, flags) = try await channel.eventLoop.submit { () -> (NIOLoopBound<QUICCore>, EventLoopFuture<PeerIdentity>, QUICConnectionFlags) in
                guard let local = channel.localAddress else { throw HTTPTransportError.connectionClosed }
                let promise = channel.eventLoop.makePromise(of: PeerIdentity.self)
                let handler = QUICClientHandler(ready: promise, logger: logger)
                try channel.pipeline.syncOperations.addHandler(handler)
                let core = try QUICCore(clientServerName: name, tls: tls, settings: settingsCopy, local: local, remote: remote,
                                        loop: channel.eventLoop, logger: logger)
                handler.core = core
                core.delegate = handler
                core.start()
                return (NIOLoopBound(core, eventLoop: channel.eventLoop), promise.futureResult, core.flags)
            }.get()
            let peer = try await ready.get()
            return HTTP3Connection(channel: channel, peer: peer, core: core, flags: flags, authority: "\(host):\(port)")
        } catch {
            try? await channel.close()
            throw error
        }
    }

    /// False once the server sent GOAWAY or the connection closed: open a new one for new work.
    public var isUsable: Bool {
        channel.isActive && !flags.goingAway.withLock { $0 } && !flags.closed.withLock { $0 }
    }

    /// Why the connection closed, when QUIC says more than "closed" (requests on it fail with
    /// `HTTPTransportError.connectionClosed`): `.statelessReset` (the server lost it, e.g.
    /// restarted), `.timeout` (idle or handshake), `.closedByPeer`. nil while open.
    public var closeReason: QUICError? { flags.closeReason.withLock { $0 } }

    /// Send a request; returns when the response head arrived. The response body streams.
    public func request(_ head: HTTPRequestHead, body: HTTPOutboundBody = .empty) async throws -> HTTPClientResponse {
        var head = head
        if head.authority.isEmpty { head.authority = authority }
        let token = RequestToken()
        let core = self.core
        let loop = channel.eventLoop
        let sendableHead = head
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<HTTPClientResponse, any Error>) in
                loop.execute { core.value.startRequest(head: sendableHead, body: body, token: token, continuation: cont) }
            }
        } onCancel: {
            token.cancelled.withLock { $0 = true }
            loop.execute { core.value.cancel(token: token) }
        }
    }

    /// CONNECTION_CLOSE (H3_NO_ERROR) and close the socket.
    public func close() async {
        let core = self.core
        channel.eventLoop.execute { core.value.closeApplication() }
        try? await channel.closeFuture.get()
    }
}

final class QUICClientHandler: ChannelInboundHandler, QUICCoreDelegate {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    var core: QUICCore?
    private var ready: EventLoopPromise<PeerIdentity>?
    private var context: ChannelHandlerContext?
    private let logger: Logger

    init(ready: EventLoopPromise<PeerIdentity>, logger: Logger) {
        self.ready = ready
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        core?.finalize(error: HTTPTransportError.connectionClosed)
        self.context = nil
        // Removed before a core existed (its set-up threw): nobody else will answer the caller.
        if let r = ready {
            ready = nil
            r.fail(HTTPTransportError.connectionClosed)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = unwrapInboundIn(data)
        guard let core else { return }
        // Only the server we dialled talks to this socket.
        guard env.remoteAddress == core.remoteAddress else { return }
        QUICDatagramWriter.forEachDatagram(env) { core.receive($0, from: env.remoteAddress) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        core?.flushAfterRead()
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("QUIC client socket error", metadata: ["error": "\(error)"])
        socketFailed(error)
    }

    /// ICMP port unreachable on the connected socket (reported by a read or by a send, which
    /// also closes the channel): no QUIC listener at that address.
    private func socketFailed(_ error: any Error) {
        guard let io = error as? IOError, io.errnoCode == ECONNREFUSED, let core, !core.handshakeCompleted else { return }
        core.finalize(error: QUICError.handshakeFailed(
            "nothing listens on UDP \(core.remoteAddress.endpoint) (port unreachable); is the node running with --quic-listen?"))
    }

    func channelInactive(context: ChannelHandlerContext) {
        core?.finalize(error: HTTPTransportError.connectionClosed)
        context.fireChannelInactive()
    }

    func quicCore(_ core: QUICCore, send buffer: ByteBuffer, sends: [GSOBatcher.Send], to remote: SocketAddress) {
        guard let context else { return }
        // Until the handshake is done, a failed send may be the port-unreachable answer.
        var promise: EventLoopPromise<Void>?
        if !core.handshakeCompleted {
            let p = context.eventLoop.makePromise(of: Void.self)
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            p.futureResult.whenFailure { bound.value.socketFailed($0) }
            promise = p
        }
        QUICDatagramWriter.write(context: context, buffer: buffer, sends: sends, to: remote, promise: promise)
    }

    func quicCore(_ core: QUICCore, didIssue cid: ConnectionID) {}
    func quicCore(_ core: QUICCore, didRetire cid: ConnectionID) {}

    func quicCoreHandshakeCompleted(_ core: QUICCore) {
        guard let r = ready else { return }
        ready = nil
        // The server's certificate was verified by GnuTLS during the handshake.
        r.succeed(core.peer ?? PeerIdentity(commonName: nil, role: nil, authenticated: true))
    }

    func quicCoreDidClose(_ core: QUICCore, error: (any Error)?) {
        if let r = ready {
            ready = nil
            r.fail(error ?? QUICError.closedByPeer)
        }
        context?.close(promise: nil)
    }
}

extension HTTP3Connection: PooledHTTPConnection {}

/// HTTP/3 connections over QUIC (mutual TLS), one per peer.
public typealias HTTP3ConnectionPool = HTTPConnectionPool<HTTP3Connection>

extension HTTPConnectionPool where Connection == HTTP3Connection {
    /// `connectTimeout` bounds the handshake: a peer whose UDP is blocked fails this fast.
    public init(credentials: TLSCredentials, connectTimeout: TimeAmount = .seconds(10), settings: QUICSettings = QUICSettings(),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                logger: Logger = Logger(label: "cachemesh.h3pool")) {
        self.init { host, port in
            try await HTTP3Connection.connect(host: host, port: port, credentials: credentials, group: group, settings: settings,
                                              connectTimeout: connectTimeout, logger: logger)
        }
    }
}
