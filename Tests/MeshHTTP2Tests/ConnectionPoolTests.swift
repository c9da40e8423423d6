import MeshHTTP
import Synchronization
import Testing

/// `HTTPConnectionPool`: one connection per peer, and one connect however many callers wait —
/// when a peer's connection dies under a dozen waiting requests they must not start a dozen
/// handshakes.
@Suite("Connection pool: one connect per peer")
struct ConnectionPoolTests {
    final class FakeConnection: PooledHTTPConnection, Sendable {
        let usable = Mutex(true)
        var isUsable: Bool { usable.withLock { $0 } }
        func close() async { usable.withLock { $0 = false } }
        func request(_ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> HTTPClientResponse {
            throw HTTPTransportError.connectionClosed
        }
    }

    /// A connect that counts its calls and completes only when released.
    final class SlowConnect: Sendable {
        let calls = Mutex(0)
        let release = AsyncStream<Void>.makeStream()
        func connect(_ host: String, _ port: Int) async throws -> FakeConnection {
            calls.withLock { $0 += 1 }
            for await _ in release.stream { break }
            return FakeConnection()
        }
    }

    @Test("twelve callers waiting for a peer share one connect; after the connection dies, twelve more share one new connect")
    func concurrentCallersShareOneConnect() async throws {
        let slow = SlowConnect()
        let pool = HTTPConnectionPool<FakeConnection>(connect: { try await slow.connect($0, $1) })
        func twelve() async throws -> [FakeConnection] {
            try await withThrowingTaskGroup(of: FakeConnection.self) { group in
                for _ in 0..<12 { group.addTask { try await pool.connection(host: "peer", port: 1) } }
                // Let every caller reach the pool before the handshake completes.
                try await Task.sleep(for: .milliseconds(200))
                slow.release.continuation.yield()
                return try await group.reduce(into: []) { $0.append($1) }
            }
        }
        let first = try await twelve()
        #expect(slow.calls.withLock { $0 } == 1)
        #expect(first.allSatisfy { $0 === first[0] })
        // The connection dies (GOAWAY, a dark path, a reset): the next wave opens exactly one more.
        await pool.discard(host: "peer", port: 1)
        let second = try await twelve()
        #expect(slow.calls.withLock { $0 } == 2)
        #expect(second.allSatisfy { $0 === second[0] } && second[0] !== first[0])
    }
}
