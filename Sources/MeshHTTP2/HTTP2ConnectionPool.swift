import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix

/// One long-lived, multiplexed connection per peer (`host:port`), re-opened when the peer sent
/// GOAWAY or the connection died. Concurrent callers for the same peer share one connect.
public actor HTTP2ConnectionPool {
    private let credentials: TLSCredentials?
    private let group: any EventLoopGroup
    private let logger: Logger
    private var connections: [String: HTTP2Connection] = [:]
    private var connecting: [String: Task<HTTP2Connection, any Error>] = [:]

    public init(credentials: TLSCredentials?, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                logger: Logger = Logger(label: "cachemesh.h2pool")) {
        self.credentials = credentials
        self.group = group
        self.logger = logger
    }

    /// A usable connection to `host:port`, opening one if needed.
    public func connection(host: String, port: Int, serverName: String? = nil) async throws -> HTTP2Connection {
        let key = "\(host):\(port)"
        if let c = connections[key], c.isUsable { return c }
        connections[key] = nil
        if let t = connecting[key] { return try await t.value }
        let (creds, group, logger) = (credentials, self.group, self.logger)
        let t = Task { try await HTTP2Connection.connect(host: host, port: port, credentials: creds, serverName: serverName, group: group, logger: logger) }
        connecting[key] = t
        defer { connecting[key] = nil }
        let c = try await t.value
        connections[key] = c
        return c
    }

    /// Send a request; if the peer refuses it with GOAWAY (not processed) and the body can be
    /// replayed (`.empty`/`.bytes`), retry once on a fresh connection.
    public nonisolated func request(host: String, port: Int, _ head: HTTPRequestHead, body: HTTPOutboundBody = .empty) async throws -> HTTPClientResponse {
        var replayable = false
        switch body {
        case .empty, .bytes: replayable = true
        case .file, .stream: replayable = false
        }
        let c = try await connection(host: host, port: port)
        do {
            return try await c.request(head, body: body)
        } catch let e as HTTPTransportError where e.isRetryable && replayable {
            let fresh = try await connection(host: host, port: port)
            return try await fresh.request(head, body: body)
        }
    }

    public func closeAll() async {
        let all = Array(connections.values)
        connections = [:]
        for c in all { await c.close() }
    }
}
