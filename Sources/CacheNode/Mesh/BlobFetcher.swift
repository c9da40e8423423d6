import BlobStore
import Logging
import MeshCore
import MeshHTTP
import Metrics
import Synchronization

/// Where a blob may be fetched from: a peer the locality map names, or the origin.
public struct FetchSource: Sendable, Hashable, CustomStringConvertible {
    public var name: String
    /// HTTP/2 over TLS/TCP (always there).
    public var endpoint: HostPort
    /// HTTP/3 over QUIC, if the node advertises one.
    public var quicEndpoint: HostPort?
    public var isOrigin: Bool

    public init(name: String, endpoint: HostPort, quicEndpoint: HostPort? = nil, isOrigin: Bool) {
        self.name = name
        self.endpoint = endpoint
        self.quicEndpoint = quicEndpoint
        self.isOrigin = isOrigin
    }

    public var description: String { isOrigin ? "origin:\(name)" : "peer:\(name)" }
}

public struct FetchResult: Sendable {
    public var digest: StoreDigest
    /// The leg that won.
    public var source: FetchSource
    /// The transport the winning leg used.
    public var transport: MeshTransportKind
    public var legsStarted: Int
    public var legsCancelled: Int
    /// From the start of the race until the winner's response head arrived.
    public var timeToFirstByte: Duration
}

public enum MeshTransportKind: String, Sendable {
    case quic, tcp
}

/// A response from another node and the transport that carried it.
public struct MeshReply: Sendable {
    public var response: HTTPClientResponse
    public var transport: MeshTransportKind
    public init(_ response: HTTPClientResponse, via transport: MeshTransportKind) {
        self.response = response
        self.transport = transport
    }
}

/// Opens a request to another node (HTTP/3 preferred, HTTP/2 as fallback: `MeshTransport`).
public protocol MeshRequester: Sendable {
    func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> MeshReply
    /// A request to `source` over `transport` (nil: not known which) stalled: stop using that
    /// connection for new work.
    func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async
}

extension MeshRequester {
    public func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async {}
}

/// A leg that made no progress (no response head, or no body bytes) for the stall timeout.
public struct LegStalled: Error, CustomStringConvertible {
    public var source: FetchSource
    public var after: Duration
    public var description: String { "\(source) made no progress for \(after)" }
}

/// The worker role: fetch a blob this node lacks by racing the sources that should hold it.
///
/// Concurrent fetches of one digest share one race (singleflight). Legs start in the given order
/// (best first); the next leg starts when the hedge delay passes without a winner, or at once when
/// a leg fails (`LegSpacing`: all at once, hedged, or failover only). Each leg streams into its own
/// store writer, so the first *complete, digest-verified* body wins and is what gets stored; the
/// losers are cancelled (RST_STREAM) and their temp files dropped. Nothing reaches a caller before
/// the blob is verified and stored.
public final class BlobFetcher: Sendable {
    /// Header on mesh-internal fetches: the answering node serves from its own store only (no re-race).
    public static let hopHeader = "x-cachemesh-hop"

    let store: BlobStore
    let requester: any MeshRequester
    let logger: Logger
    let spacing: @Sendable () -> LegSpacing
    /// A leg with no response head, or no body bytes, for this long fails (the next source starts).
    let stallTimeout: Duration
    private let inflight = Mutex<[String: Task<FetchResult, any Error>]>([:])
    private let wins: (origin: Counter, peer: Counter)
    private let hedges = Counter(label: "cachemesh_fetch_hedges_fired_total")
    private let cancelled = Counter(label: "cachemesh_fetch_legs_cancelled_total")
    private let failures = Counter(label: "cachemesh_fetch_failures_total")
    private let latency = Metrics.Timer(label: "cachemesh_fetch_duration_seconds")

    public init(store: BlobStore, requester: any MeshRequester, logger: Logger, stallTimeout: Duration = .seconds(10),
                spacing: @escaping @Sendable () -> LegSpacing) {
        self.store = store
        self.requester = requester
        self.logger = logger
        self.spacing = spacing
        self.stallTimeout = stallTimeout
        self.wins = (Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "origin")]),
                     Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "peer")]))
    }

    /// Fetch `hash` into the local store from `sources` (best first).
    /// `spacing` overrides the fetcher's own leg spacing for this fetch.
    public func fetch(hash: String, sources: [FetchSource], spacing: LegSpacing? = nil) async throws -> FetchResult {
        let (task, isNew) = inflight.withLock { m -> (Task<FetchResult, any Error>, Bool) in
            if let t = m[hash] { return (t, false) }
            let t = Task { try await self.race(hash: hash, sources: sources, spacing: spacing ?? self.spacing()) }
            m[hash] = t
            return (t, true)
        }
        defer { if isNew { inflight.withLock { _ = $0.removeValue(forKey: hash) } } }
        return try await task.value
    }

    private enum Event: Sendable {
        case responded(Int, MeshReply)
        case won(Int, StoreDigest, MeshTransportKind)
        case failed(Int, any Error)
        case timer
    }

    /// Runs MeshCore's `RaceDecision` (the pure race state machine) over real legs: it says which
    /// leg starts when and which are cancelled; this shell runs them and reports outcomes. A leg
    /// runs in two steps — the request until the response head, then the body into a store
    /// writer — so an answering source stops the hedging (a large body is not a slow source).
    func race(hash: String, sources: [FetchSource], spacing: LegSpacing) async throws -> FetchResult {
        guard !sources.isEmpty else { throw BlobStoreError.notFound(hash) }
        let start = ContinuousClock.now
        func now() -> Duration { ContinuousClock.now - start }
        let plan = RacePlan(sources: sources.map { s in
            let id = NodeID(name: s.name, uid: 0)
            return s.isOrigin ? .origin(id) : .peer(id)
        }, spacing: spacing)
        var decision = RaceDecision(plan: plan, now: .zero)
        return try await withThrowingTaskGroup(of: Event.self) { group in
            var errors: [String] = []
            var timerArmed = false
            var started = 0
            var firstByte: [Int: Duration] = [:]
            func armTimer() {
                guard !timerArmed, let due = decision.nextDeadline else { return }
                timerArmed = true
                group.addTask {
                    try? await Task.sleep(until: start + due)
                    return .timer
                }
            }
            /// Start the legs the decision asks for; the outcome if the race is over.
            func apply(_ actions: [RaceAction]) -> Result<FetchResult, any Error>? {
                for a in actions {
                    switch a {
                    case .startLeg(let i, _):
                        started += 1
                        group.addTask {
                            do { return .responded(i, try await self.ask(hash: hash, source: sources[i])) } catch { return .failed(i, error) }
                        }
                    case .cancelLeg:
                        break   // every other leg is cancelled below, with the group
                    case .finished:
                        break
                    case .failed:
                        failures.increment()
                        return .failure(BlobStoreError.notFound("\(hash) (tried \(errors.joined(separator: "; ")))"))
                    }
                }
                armTimer()
                return nil
            }
            if let done = apply(decision.start(now: now())) { return try done.get() }
            while let event = try await group.next() {
                switch event {
                case .responded(let i, let reply):
                    firstByte[i] = now()
                    decision.legResponded(i, now: now())
                    group.addTask {
                        do {
                            return .won(i, try await self.receive(hash: hash, reply, from: sources[i]), reply.transport)
                        } catch { return .failed(i, error) }
                    }
                case .won(let i, let digest, let via):
                    _ = decision.legSucceeded(i, now: now())
                    group.cancelAll()
                    hedges.increment(by: Int64(decision.hedgesFired))
                    cancelled.increment(by: Int64(decision.legsCancelled))
                    (sources[i].isOrigin ? wins.origin : wins.peer).increment()
                    let took = now()
                    latency.recordNanoseconds(took.components.seconds * 1_000_000_000 + took.components.attoseconds / 1_000_000_000)
                    logger.debug("fetched", metadata: ["hash": "\(hash)", "from": "\(sources[i])", "via": "\(via.rawValue)",
                                                       "legs": "\(started)", "cancelled": "\(decision.legsCancelled)"])
                    return FetchResult(digest: digest, source: sources[i], transport: via, legsStarted: started,
                                       legsCancelled: decision.legsCancelled, timeToFirstByte: firstByte[i] ?? took)
                case .failed(let i, let error):
                    errors.append("\(sources[i]): \(error)")
                    if let done = apply(decision.legFailed(i, now: now())) {
                        hedges.increment(by: Int64(decision.hedgesFired))
                        return try done.get()
                    }
                case .timer:
                    timerArmed = false
                    if let done = apply(decision.tick(now: now())) { return try done.get() }
                }
            }
            failures.increment()
            throw BlobStoreError.notFound(hash)
        }
    }

    /// A leg's first step: GET from `source` until the response head (a 200, or it failed).
    func ask(hash: String, source: FetchSource) async throws -> MeshReply {
        let (requester, stall) = (self.requester, stallTimeout)
        let reply = try await withThrowingTaskGroup(of: MeshReply?.self) { group in
            group.addTask {
                try await requester.request(
                    to: source, HTTPRequestHead(method: "GET", path: "/cas/\(hash)", headers: [Self.hopHeader: "1"]), body: .empty)
            }
            group.addTask {
                try await Task.sleep(for: stall)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let reply = first else {
                await requester.connectionStalled(to: source, via: nil)
                throw LegStalled(source: source, after: stall)
            }
            return reply
        }
        guard reply.response.status == 200 else {
            reply.response.cancel()
            throw BlobStoreError.notFound("\(hash) at \(source) (HTTP \(reply.response.status))")
        }
        return reply
    }

    /// A leg's second step: stream the body into a store writer; commit only if the digest verifies.
    /// Cancelled (the race was won elsewhere) → the stream is reset and nothing is stored.
    func receive(hash: String, _ reply: MeshReply, from source: FetchSource) async throws -> StoreDigest {
        let response = reply.response
        var done = false
        defer { if !done { response.cancel() } }
        // Watchdog: no body bytes for the stall timeout → reset the stream (the loop below then
        // fails) and tell the transport, so new work does not queue behind a stuck connection.
        let progress = Atomic<Int64>(0)
        let stalled = Atomic<Bool>(false)
        let stall = stallTimeout
        let watchdog = Task {
            var last = progress.load(ordering: .relaxed)
            while !Task.isCancelled {
                try? await Task.sleep(for: stall)
                let now = progress.load(ordering: .relaxed)
                if now == last && !Task.isCancelled {
                    stalled.store(true, ordering: .relaxed)
                    response.cancel()
                    return
                }
                last = now
            }
        }
        defer { watchdog.cancel() }
        let size = response.headers["content-length"].flatMap { Int64($0) }
        let writer = try await store.beginWrite(hash: hash, expectedSize: size)
        do {
            for try await chunk in response.body {
                try Task.checkCancellation()
                try chunk.withUnsafeReadableBytes { try writer.write($0) }
                progress.add(1, ordering: .relaxed)
            }
            try Task.checkCancellation()
            let d = try writer.commit()
            done = true
            return d
        } catch {
            writer.abort()
            if stalled.load(ordering: .relaxed) {
                await requester.connectionStalled(to: source, via: reply.transport)
                throw LegStalled(source: source, after: stall)
            }
            throw error
        }
    }
}
