import BlobStore
import Logging
import MeshHTTP
import Metrics
import Synchronization

/// Where a blob may be fetched from: a peer the locality map names, or the origin.
public struct FetchSource: Sendable, Hashable, CustomStringConvertible {
    public var name: String
    public var endpoint: HostPort
    public var isOrigin: Bool

    public init(name: String, endpoint: HostPort, isOrigin: Bool) {
        self.name = name
        self.endpoint = endpoint
        self.isOrigin = isOrigin
    }

    public var description: String { isOrigin ? "origin:\(name)" : "peer:\(name)" }
}

public struct FetchResult: Sendable {
    public var digest: Digest
    /// The leg that won.
    public var source: FetchSource
    public var legsStarted: Int
    public var legsCancelled: Int
}

/// Opens a request to a source (a transport: HTTP/2 today, HTTP/3 when it lands).
public protocol MeshRequester: Sendable {
    func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> HTTPClientResponse
}

/// The worker role: fetch a blob this node lacks by racing the sources that should hold it.
///
/// Concurrent fetches of one digest share one race (singleflight). Legs start in the given order
/// (best first); the next leg starts when the hedge delay passes without a winner, or at once when
/// a leg fails; `hedgeDelay == nil` starts every leg at once. Each leg streams into its own
/// store writer, so the first *complete, digest-verified* body wins and is what gets stored; the
/// losers are cancelled (RST_STREAM) and their temp files dropped. Nothing reaches a caller before
/// the blob is verified and stored.
public final class BlobFetcher: Sendable {
    /// Header on mesh-internal fetches: the answering node serves from its own store only (no re-race).
    public static let hopHeader = "x-cachemesh-hop"

    let store: BlobStore
    let requester: any MeshRequester
    let logger: Logger
    let hedgeDelay: @Sendable () -> Duration?
    private let inflight = Mutex<[String: Task<FetchResult, any Error>]>([:])
    private let wins: (origin: Counter, peer: Counter)
    private let hedges = Counter(label: "cachemesh_fetch_hedges_fired_total")
    private let cancelled = Counter(label: "cachemesh_fetch_legs_cancelled_total")
    private let failures = Counter(label: "cachemesh_fetch_failures_total")
    private let latency = Metrics.Timer(label: "cachemesh_fetch_duration_seconds")

    public init(store: BlobStore, requester: any MeshRequester, logger: Logger, hedgeDelay: @escaping @Sendable () -> Duration?) {
        self.store = store
        self.requester = requester
        self.logger = logger
        self.hedgeDelay = hedgeDelay
        self.wins = (Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "origin")]),
                     Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "peer")]))
    }

    /// Fetch `hash` into the local store from `sources` (best first).
    public func fetch(hash: String, sources: [FetchSource]) async throws -> FetchResult {
        let (task, isNew) = inflight.withLock { m -> (Task<FetchResult, any Error>, Bool) in
            if let t = m[hash] { return (t, false) }
            let t = Task { try await self.race(hash: hash, sources: sources) }
            m[hash] = t
            return (t, true)
        }
        defer { if isNew { inflight.withLock { _ = $0.removeValue(forKey: hash) } } }
        return try await task.value
    }

    private enum Event: Sendable {
        case won(Int, Digest)
        case failed(Int, any Error)
        case hedgeTimer
    }

    func race(hash: String, sources: [FetchSource]) async throws -> FetchResult {
        guard !sources.isEmpty else { throw BlobStoreError.notFound(hash) }
        let start = ContinuousClock.now
        let delay = hedgeDelay()
        return try await withThrowingTaskGroup(of: Event.self) { group in
            var next = 0
            var running = 0
            var errors: [String] = []
            func startLeg() {
                let i = next
                next += 1
                running += 1
                group.addTask {
                    do { return .won(i, try await self.leg(hash: hash, source: sources[i])) } catch { return .failed(i, error) }
                }
            }
            func armTimer() {
                guard let delay, next < sources.count else { return }
                group.addTask {
                    try? await Task.sleep(for: delay)
                    return .hedgeTimer
                }
            }
            startLeg()
            if delay == nil { while next < sources.count { startLeg() } } else { armTimer() }
            while let event = try await group.next() {
                switch event {
                case .won(let i, let digest):
                    let losers = running - 1
                    group.cancelAll()
                    cancelled.increment(by: Int64(losers))
                    (sources[i].isOrigin ? wins.origin : wins.peer).increment()
                    let took = ContinuousClock.now - start
                    latency.recordNanoseconds(took.components.seconds * 1_000_000_000 + took.components.attoseconds / 1_000_000_000)
                    logger.debug("fetched", metadata: ["hash": "\(hash)", "from": "\(sources[i])", "legs": "\(next)", "cancelled": "\(losers)"])
                    return FetchResult(digest: digest, source: sources[i], legsStarted: next, legsCancelled: losers)
                case .failed(let i, let error):
                    running -= 1
                    errors.append("\(sources[i]): \(error)")
                    if next < sources.count {
                        startLeg()   // fail over at once
                    } else if running == 0 {
                        failures.increment()
                        throw BlobStoreError.notFound("\(hash) (tried \(errors.joined(separator: "; ")))")
                    }
                case .hedgeTimer:
                    if next < sources.count {
                        hedges.increment()
                        startLeg()
                        armTimer()
                    }
                }
            }
            failures.increment()
            throw BlobStoreError.notFound(hash)
        }
    }

    /// One leg: GET from `source`, stream into a store writer, commit only if the digest verifies.
    func leg(hash: String, source: FetchSource) async throws -> Digest {
        let response = try await requester.request(
            to: source, HTTPRequestHead(method: "GET", path: "/cas/\(hash)", headers: [Self.hopHeader: "1"]), body: .empty)
        var done = false
        defer { if !done { response.cancel() } }
        guard response.status == 200 else {
            throw BlobStoreError.notFound("\(hash) at \(source) (HTTP \(response.status))")
        }
        let size = response.headers["content-length"].flatMap { Int64($0) }
        let writer = try await store.beginWrite(hash: hash, expectedSize: size)
        do {
            for try await chunk in response.body {
                try Task.checkCancellation()
                try chunk.withUnsafeReadableBytes { try writer.write($0) }
            }
            try Task.checkCancellation()
            let d = try writer.commit()
            done = true
            return d
        } catch {
            writer.abort()
            throw error
        }
    }
}
