import Logging
import MeshTLS
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// One HTTP/1.1 connection to the S3 endpoint, owned by a task that runs one exchange at a time
/// (`submit`); kept open between exchanges (keep-alive) by `S3ConnectionPool`. Closing the channel
/// (a deadline, a cancelled caller) ends the exchange in progress with an error.
final class S3Connection: Sendable {
    typealias Inbound = NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    typealias Outbound = NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    /// One request/response exchange; returns whether the connection may be reused.
    typealias Exchange = @Sendable (inout Inbound, Outbound) async throws -> Bool

    private struct State {
        var alive = true
        var reusable = true
        var pending: CheckedContinuation<Void, any Error>?
    }

    let channel: any Channel
    private let state = Mutex(State())
    private let jobs: AsyncStream<Exchange>.Continuation
    private let stream: AsyncStream<Exchange>

    private init(channel: any Channel) {
        self.channel = channel
        (stream, jobs) = AsyncStream.makeStream(of: Exchange.self)
    }

    static func connect(host: String, port: Int, timeout: Duration, tls: S3ConnectionPool.TLS?, group: any EventLoopGroup) async throws -> S3Connection {
        let ms = Int64(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        let async = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            // Large reads: every body part is a hop to the task consuming it, so 2 KiB parts (NIO's
            // starting size) held a cold read to ~40% of boto3's GET throughput.
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 16 << 10, initial: 256 << 10, maximum: 1 << 20))
            .connectTimeout(.milliseconds(ms))
            .connect(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            GnuTLSHandler(credentials: tls.credentials, mode: .client(serverName: tls.serverName), alpn: [],
                                          handshakeTimeout: .milliseconds(ms), logger: tls.logger))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(backPressureStrategy: .init(lowWatermark: 4, highWatermark: 16)))
                }
            }
        let c = S3Connection(channel: async.channel)
        Task { await c.run(async) }
        return c
    }

    private func run(_ async: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>) async {
        _ = try? await async.executeThenClose { inbound, outbound in
            var it = inbound.makeAsyncIterator()
            for await job in stream {
                let result: Result<Bool, any Error>
                do { result = .success(try await job(&it, outbound)) } catch { result = .failure(error) }
                let keep = (try? result.get()) ?? false
                let cont = state.withLock { s -> CheckedContinuation<Void, any Error>? in
                    s.reusable = keep
                    if !keep { s.alive = false }
                    defer { s.pending = nil }
                    return s.pending
                }
                switch result {
                case .success: cont?.resume()
                case .failure(let e): cont?.resume(throwing: e)
                }
                if !keep { break }
            }
        }
        let cont = state.withLock { s -> CheckedContinuation<Void, any Error>? in
            s.alive = false
            s.reusable = false
            defer { s.pending = nil }
            return s.pending
        }
        jobs.finish()
        cont?.resume(throwing: S3ConnectionClosed())
        channel.close(promise: nil)
    }

    /// Whether another exchange may run on this connection.
    var isReusable: Bool { state.withLock { $0.alive && $0.reusable && $0.pending == nil } && channel.isActive }

    /// Runs `exchange` on the connection's task and waits for it; a cancelled caller closes the
    /// connection (the exchange then fails).
    func submit(_ exchange: @escaping Exchange) async throws {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Void, any Error>) in
                let ok = state.withLock { s -> Bool in
                    guard s.alive, s.pending == nil else { return false }
                    s.pending = cont
                    return true
                }
                guard ok else { return cont.resume(throwing: S3ConnectionClosed()) }
                jobs.yield(exchange)
            }
        } onCancel: {
            close()
        }
    }

    func close() {
        state.withLock { $0.reusable = false }
        channel.close(promise: nil)
    }
}

struct S3ConnectionClosed: Error, CustomStringConvertible {
    var description: String { "the connection closed" }
}

/// Keep-alive connections to one endpoint, at most `max` in use at once (callers beyond that wait
/// their turn, FIFO).
final class S3ConnectionPool: Sendable {
    /// TLS to the endpoint: whom to trust, the name to check its certificate against.
    struct TLS: Sendable {
        var credentials: TLSCredentials
        var serverName: String
        var logger: Logger
    }

    let host: String
    let port: Int
    let max: Int
    let connectTimeout: Duration
    let tls: TLS?
    let group: any EventLoopGroup
    private struct State {
        var idle: [S3Connection] = []
        var inUse = 0
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    init(host: String, port: Int, max: Int, connectTimeout: Duration, tls: TLS? = nil, group: any EventLoopGroup) {
        self.host = host
        self.port = port
        self.max = max
        self.connectTimeout = connectTimeout
        self.tls = tls
        self.group = group
    }

    /// Connections open (idle and in use), for tests and metrics.
    var inUse: Int { state.withLock { $0.inUse } }

    private func acquirePermit() async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.inUse < max {
                    s.inUse += 1
                    return true
                }
                s.waiters.append(cont)
                return false
            }
            if now { cont.resume() }
        }
    }

    private func releasePermit() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if !s.waiters.isEmpty { return s.waiters.removeFirst() }
            s.inUse -= 1
            return nil
        }
        next?.resume()
    }

    /// Runs `body` with a connection (an idle one, or a new one); puts it back when it stays reusable.
    func withConnection<T: Sendable>(_ body: (S3Connection) async throws -> T) async throws -> T {
        await acquirePermit()
        defer { releasePermit() }
        var conn: S3Connection?
        while conn == nil, let c = state.withLock({ $0.idle.popLast() }) {
            if c.isReusable { conn = c } else { c.close() }
        }
        let c: S3Connection
        if let conn { c = conn } else { c = try await S3Connection.connect(host: host, port: port, timeout: connectTimeout, tls: tls, group: group) }
        do {
            let r = try await body(c)
            if c.isReusable { state.withLock { $0.idle.append(c) } } else { c.close() }
            return r
        } catch {
            c.close()
            throw error
        }
    }

    func closeAll() {
        let idle = state.withLock { s -> [S3Connection] in
            defer { s.idle = [] }
            return s.idle
        }
        for c in idle { c.close() }
    }
}
