import BlobStore
import Logging
import MeshHTTP
import MeshHTTP2
import MeshTLS
import Metrics
import Synchronization

/// Requests to other nodes over long-lived multiplexed connections (one per peer), with the
/// node's own certificate (role `node`).
public final class PoolRequester: MeshRequester {
    let pool: HTTP2ConnectionPool

    public init(pool: HTTP2ConnectionPool) {
        self.pool = pool
    }

    public func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> HTTPClientResponse {
        try await pool.request(host: source.endpoint.host, port: source.endpoint.port, head, body: body)
    }
}

/// Copies blobs written here to other nodes (`PUT /cas/{hash}` with the mirror header, so the
/// receiver does not mirror again). `replicate` returns once `quorum` copies elsewhere are durable;
/// the remaining copies finish in the background and are tracked until `flush()`.
public final class Mirror: Sendable {
    let store: BlobStore
    let requester: any MeshRequester
    let logger: Logger
    private let pending = PendingCounter()
    private let copies = Counter(label: "cachemesh_mirror_copies_total")
    private let failures = Counter(label: "cachemesh_mirror_failures_total")

    public init(store: BlobStore, requester: any MeshRequester, logger: Logger) {
        self.store = store
        self.requester = requester
        self.logger = logger
    }

    /// Copy `digest` to `targets`; wait for `quorum` successes (0 = do not wait).
    public func replicate(_ digest: Digest, to targets: [FetchSource], quorum: Int) async throws {
        guard !targets.isEmpty else {
            if quorum > 0 { throw BlobStoreError.io("no live mirror target for \(digest) (need \(quorum))") }
            return
        }
        let (stream, continuation) = AsyncStream<Bool>.makeStream()
        for t in targets {
            pending.add(1)
            Task {
                defer { pending.add(-1) }
                let ok = await copy(digest, to: t)
                continuation.yield(ok)
            }
        }
        guard quorum > 0 else { return }
        var ok = 0, done = 0
        for await success in stream {
            done += 1
            if success { ok += 1 }
            if ok >= quorum { return }
            if done == targets.count { break }
        }
        throw BlobStoreError.io("only \(ok) of \(quorum) required mirror copies of \(digest) succeeded")
    }

    func copy(_ digest: Digest, to target: FetchSource) async -> Bool {
        do {
            let reader = try await store.openRead(hash: digest.hash)
            let r = try await requester.request(
                to: target,
                HTTPRequestHead(method: "PUT", path: "/cas/\(digest.hash)",
                                headers: ["content-length": String(digest.size), CacheService.mirrorHeader: "1"]),
                body: .file(reader))
            _ = try? await r.body.collect(upTo: 64 * 1024)
            guard r.status == 201 || r.status == 200 else {
                throw BlobStoreError.io("HTTP \(r.status)")
            }
            copies.increment()
            return true
        } catch {
            failures.increment()
            logger.warning("mirror copy failed", metadata: ["digest": "\(digest)", "to": "\(target)", "error": "\(error)"])
            return false
        }
    }

    /// Copies still in flight.
    public var inFlight: Int { pending.value }

    /// Wait (bounded) until every background copy finished.
    public func flush(timeout: Duration) async {
        let deadline = ContinuousClock.now + timeout
        while pending.value > 0 && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }
}

final class PendingCounter: Sendable {
    private let count = Synchronization.Mutex(0)
    func add(_ n: Int) { count.withLock { $0 += n } }
    var value: Int { count.withLock { $0 } }
}
