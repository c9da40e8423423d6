import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A TCP connection that could not be made, said in words:
/// `cannot connect to 127.0.0.1:1: connection refused`.
public struct ConnectionFailure: Error, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int
    /// Why, e.g. "connection refused", "no answer within 10 s".
    public var reason: String

    public init(host: String, port: Int, reason: String) {
        self.host = host
        self.port = port
        self.reason = reason
    }

    public var description: String { "cannot connect to \(host.contains(":") ? "[\(host)]" : host):\(port): \(reason)" }
}

/// Socket errors (NIO's `IOError`, `NIOConnectionError`, …) in words, without library internals:
/// "address already in use", "connection refused", "unknown host nowhere.example".
public enum SocketErrorText {
    public static func describe(_ error: any Error) -> String {
        switch error {
        case let e as IOError:
            return errnoText(e.errnoCode)
        case let e as NIOConnectionError:
            // One reason per address tried (127.0.0.1 and ::1 may fail differently).
            var reasons: [String] = []
            for f in e.connectionErrors {
                let r = describe(f.error)
                if !reasons.contains(r) { reasons.append(r) }
            }
            if !reasons.isEmpty { return reasons.joined(separator: "; ") }
            if let dns = e.dnsAError ?? e.dnsAAAAError { return "cannot resolve \(e.host): \(describe(dns))" }
            return "no address found for \(e.host)"
        case let e as ChannelError:
            if case .connectTimeout(let t) = e { return "no answer within \(Double(t.nanoseconds) / 1e9) s (connect timeout)" }
            return "\(e)"
        case let e as SocketAddressError.UnknownHost:
            return "unknown host \(e.host)"
        default:
            return "\(error)"
        }
    }

    /// `strerror` with a lower-case first letter: "connection refused".
    public static func errnoText(_ code: Int32) -> String {
        let s = String(cString: strerror(code))
        return s.prefix(1).lowercased() + s.dropFirst()
    }
}

/// One multiplexed HTTP/2 connection to a server (TLS by default).
///
/// Requests are cancellable (task cancellation → RST_STREAM CANCEL). When the server sends
/// GOAWAY, requests it will not process fail with `HTTPTransportError.goaway` (retryable) and
/// `isGoingAway` becomes true so pools open a new connection.
public final class HTTP2Connection: HTTPClientTransport {
    public let channel: any Channel
    public let peer: PeerIdentity
    private let handler: NIOLoopBound<HTTP2ClientHandler>
    private let flags: H2ConnectionFlags
    public let authority: String

    private init(channel: any Channel, peer: PeerIdentity, handler: NIOLoopBound<HTTP2ClientHandler>, flags: H2ConnectionFlags, authority: String) {
        self.channel = channel
        self.peer = peer
        self.handler = handler
        self.flags = flags
        self.authority = authority
    }

    /// Connect, handshake (verifying the server certificate against the CA in `credentials`
    /// and the host name / IP), and start HTTP/2.
    public static func connect(
        host: String, port: Int, credentials: TLSCredentials?, serverName: String? = nil,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        connectTimeout: TimeAmount = .seconds(10),
        logger: Logger = Logger(label: "cachemesh.h2client")
    ) async throws -> HTTP2Connection {
        // Receive windows open only as the caller consumes, so large ones cost memory only when a
        // consumer lags; 16 MiB per stream keeps a 64 MiB GET at full speed across a 20-80 ms WAN RTT.
        let settings = NGHTTP2Session.Settings(maxConcurrentStreams: 128, initialWindowSize: 16 << 20, connectionWindowSize: 64 << 20)
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: .init(low: 256 * 1024, high: 1024 * 1024))
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: host, port: port).get()
        } catch {
            throw ConnectionFailure(host: host, port: port, reason: SocketErrorText.describe(error))
        }
        do {
            let (handler, ready) = try await channel.eventLoop.submit { () -> (NIOLoopBound<HTTP2ClientHandler>, EventLoopFuture<PeerIdentity>) in
                let promise = channel.eventLoop.makePromise(of: PeerIdentity.self)
                let h = HTTP2ClientHandler(plaintext: credentials == nil, ready: promise, settings: settings, logger: logger)
                do {
                    if let credentials {
                        try channel.pipeline.syncOperations.addHandler(
                            GnuTLSHandler(credentials: credentials, mode: .client(serverName: serverName ?? host), alpn: ["h2"], logger: logger))
                    }
                    try channel.pipeline.syncOperations.addHandler(h)
                } catch {
                    // The connection closed before the pipeline was set up (e.g. reset at once).
                    promise.fail(error)
                    throw error
                }
                if credentials == nil { h.channelActiveIfNeeded(channel: channel) }
                // A peer that accepts the TCP connection but never finishes the TLS/HTTP/2
                // handshake must not hold the caller forever: the same bound as the TCP connect.
                let deadline = channel.eventLoop.scheduleTask(in: connectTimeout) {
                    promise.fail(HTTPTransportError.protocolError(
                        "TLS/HTTP/2 handshake with \(host):\(port) did not finish within \(connectTimeout.nanoseconds / 1_000_000) ms"))
                    channel.close(promise: nil)
                }
                promise.futureResult.whenComplete { _ in deadline.cancel() }
                return (NIOLoopBound(h, eventLoop: channel.eventLoop), promise.futureResult)
            }.get()
            let peer = try await ready.get()
            let flags = try await channel.eventLoop.submit { handler.value.flags }.get()
            return HTTP2Connection(channel: channel, peer: peer, handler: handler, flags: flags, authority: "\(host):\(port)")
        } catch {
            try? await channel.close()
            throw error
        }
    }

    /// True once the server sent GOAWAY or the connection closed: open a new one for new work.
    public var isUsable: Bool {
        channel.isActive && !flags.goingAway.withLock { $0 }
    }

    /// True once the server sent GOAWAY (a graceful shutdown; a connection that merely closed or
    /// was reset never sets it).
    public var receivedGoaway: Bool { flags.goingAway.withLock { $0 } }

    /// Send a request; returns when the response head arrived. The response body streams.
    public func request(_ head: HTTPRequestHead, body: HTTPOutboundBody = .empty) async throws -> HTTPClientResponse {
        var head = head
        if head.authority.isEmpty { head.authority = authority }
        let token = RequestToken()
        let handler = self.handler
        let loop = channel.eventLoop
        let sendableHead = head
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<HTTPClientResponse, any Error>) in
                loop.execute { handler.value.start(head: sendableHead, body: body, token: token, continuation: cont) }
            }
        } onCancel: {
            token.cancelled.withLock { $0 = true }
            loop.execute { handler.value.cancel(token: token) }
        }
    }

    public func close() async {
        try? await channel.close()
    }
}

extension HTTP2ClientHandler {
    /// Plaintext connections are already active when the handler is added.
    func channelActiveIfNeeded(channel: any Channel) {
        guard channel.isActive, session == nil else { return }
        startSession(role: .client)
        ready.succeed(.insecure)
    }
}
