/// A client connection a pool can keep: usable until the peer sent GOAWAY or it closed.
public protocol PooledHTTPConnection: HTTPClientTransport {
    var isUsable: Bool { get }
    func close() async
}

/// One long-lived, multiplexed connection per peer (`host:port`), re-opened when the peer sent
/// GOAWAY or the connection died. Concurrent callers for the same peer share one connect.
/// The same pool serves HTTP/2 (TLS/TCP) and HTTP/3 (QUIC); `connect` opens one connection.
public actor HTTPConnectionPool<Connection: PooledHTTPConnection> {
    public typealias Connect = @Sendable (_ host: String, _ port: Int) async throws -> Connection
    private let connect: Connect
    private var connections: [String: Connection] = [:]
    private var connecting: [String: Task<Connection, any Error>] = [:]

    public init(connect: @escaping Connect) {
        self.connect = connect
    }

    /// A usable connection to `host:port`, opening one if needed.
    public func connection(host: String, port: Int) async throws -> Connection {
        let key = "\(host):\(port)"
        if let c = connections[key], c.isUsable { return c }
        connections[key] = nil
        if let t = connecting[key] { return try await t.value }
        let connect = self.connect
        let t = Task { try await connect(host, port) }
        connecting[key] = t
        defer { connecting[key] = nil }
        let c = try await t.value
        connections[key] = c
        return c
    }

    /// Send a request; if the peer refuses it with GOAWAY (not processed) and the body can be
    /// replayed (`.empty`/`.bytes`), retry once on a fresh connection.
    public nonisolated func request(host: String, port: Int, _ head: HTTPRequestHead, body: HTTPOutboundBody = .empty) async throws -> HTTPClientResponse {
        let c = try await connection(host: host, port: port)
        do {
            return try await c.request(head, body: body)
        } catch let e as HTTPTransportError where e.isRetryable && body.isReplayable {
            let fresh = try await connection(host: host, port: port)
            return try await fresh.request(head, body: body)
        }
    }

    /// Stop using the connection to `host:port` (it stalled): new requests open a fresh one; the
    /// old one is closed, failing whatever still waits on it.
    public func discard(host: String, port: Int) async {
        guard let c = connections.removeValue(forKey: "\(host):\(port)") else { return }
        await c.close()
    }

    public func closeAll() async {
        let all = Array(connections.values)
        connections = [:]
        for c in all { await c.close() }
    }
}

extension HTTPOutboundBody {
    /// Whether the same value can be sent again (files and streams are consumed by sending).
    public var isReplayable: Bool {
        switch self {
        case .empty, .bytes: return true
        case .file, .stream: return false
        }
    }
}
