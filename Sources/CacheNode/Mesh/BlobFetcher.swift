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
    /// A request expected to move about `expectedBytes` (an upload's size, or a blob's known size):
    /// an adaptive transport chooses by it.
    func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody, expectedBytes: Int64?) async throws -> MeshReply
    /// `bytes` of a response body from `source` arrived over `transport` in `duration` (measured goodput).
    func transferred(from source: FetchSource, via transport: MeshTransportKind, bytes: Int64, duration: Duration)
}

extension MeshRequester {
    public func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async {}
    public func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody, expectedBytes: Int64?) async throws -> MeshReply {
        try await request(to: source, head, body: body)
    }
    public func transferred(from source: FetchSource, via transport: MeshTransportKind, bytes: Int64, duration: Duration) {}
}

/// Every source was asked and not all of them said 404 (a connection failed, a source answered
/// 5xx or 503 while draining, a leg stalled): the blob may well exist — not a final miss.
public struct FetchUnavailable: Error, CustomStringConvertible {
    public var hash: String
    public var tried: [String]
    public var description: String { "\(hash) not fetched (tried \(tried.joined(separator: "; ")))" }
}

/// A source answered 404.
struct LegNotFound: Error, CustomStringConvertible {
    var hash: String
    var source: FetchSource
    var description: String { "not found (HTTP 404)" }
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
    /// The same counts as the metrics above, for `/status`.
    private let tally = Mutex<(originWins: Int64, peerWins: Int64, failures: Int64)>((0, 0, 0))

    /// Races won by the origin and by peers, and fetches that failed, since the start.
    public var counts: (originWins: Int64, peerWins: Int64, failures: Int64) { tally.withLock { $0 } }

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
        case responded(Int)
        case won(Int, StoreDigest, MeshTransportKind)
        case failed(Int, any Error)
        case timer
    }

    /// What the race loop knows of one running leg: progress (bumped on the response head and
    /// every body chunk), the transport it answered on, and how to reset its stream.
    final class Leg: Sendable {
        let progress = Atomic<Int64>(0)
        let answer = Mutex<(cancel: @Sendable () -> Void, via: MeshTransportKind)?>(nil)
        let task = Mutex<Task<Void, Never>?>(nil)

        func stop() {
            task.withLock { $0 }?.cancel()
            answer.withLock { $0 }?.cancel()
        }
    }

    /// Runs MeshCore's `RaceDecision` (the pure race state machine) over real legs: it says which
    /// leg starts when and which are cancelled; this shell runs them and reports outcomes. Each
    /// leg is one task (request, then the body into a store writer) reporting to one event stream;
    /// an answering leg stops the hedging (a large body is not a slow source), and a leg without
    /// progress for the stall timeout is stopped and counts as failed.
    func race(hash: String, sources: [FetchSource], spacing: LegSpacing) async throws -> FetchResult {
        guard !sources.isEmpty else { throw BlobStoreError.notFound(hash) }
        let start = ContinuousClock.now
        func now() -> Duration { ContinuousClock.now - start }
        let plan = RacePlan(sources: sources.map { s in
            let id = NodeID(name: s.name, uid: 0)
            return s.isOrigin ? .origin(id) : .peer(id)
        }, spacing: spacing)
        var decision = RaceDecision(plan: plan, now: .zero)
        let (events, sink) = AsyncStream<Event>.makeStream()
        var legs: [Int: Leg] = [:]
        var seen: [Int: (progress: Int64, at: Duration)] = [:]
        var stalled: Set<Int> = []
        var timer: (task: Task<Void, Never>, due: Duration)?
        var errors: [String] = []
        /// Whether every failed leg failed with a 404 (then the race's failure is a final miss).
        var allSaidNotFound = true
        var started = 0
        var firstByte: [Int: Duration] = [:]
        defer {
            for l in legs.values { l.stop() }
            timer?.task.cancel()
            sink.finish()   // late events of stopped legs are dropped
        }

        func startLeg(_ i: Int) {
            started += 1
            let leg = Leg()
            legs[i] = leg
            seen[i] = (0, now())
            leg.task.withLock { $0 = Task {
                do {
                    let (d, via) = try await self.leg(i, hash: hash, source: sources[i], leg: leg, events: sink)
                    sink.yield(.won(i, d, via))
                } catch {
                    sink.yield(.failed(i, error))
                }
            } }
        }
        /// One timer for both the next hedge and the next stall check.
        func armTimer() {
            let running = decision.states.contains(.running)
            let due = [decision.nextDeadline, running ? now() + stallTimeout / 2 : nil].compactMap { $0 }.min()
            guard let due else { return }
            if let t = timer, t.due <= due { return }
            timer?.task.cancel()
            timer = (Task {
                try? await Task.sleep(until: start + due)
                if !Task.isCancelled { sink.yield(.timer) }
            }, due)
        }
        /// Start the legs the decision asks for; the outcome if the race is over.
        func apply(_ actions: [RaceAction]) -> Result<FetchResult, any Error>? {
            for a in actions {
                switch a {
                case .startLeg(let i, _): startLeg(i)
                case .cancelLeg(let i, _): legs[i]?.stop()
                case .finished: break
                case .failed:
                    failures.increment()
        tally.withLock { $0.failures += 1 }
                    tally.withLock { $0.failures += 1 }
                    hedges.increment(by: Int64(decision.hedgesFired))
                    return .failure(allSaidNotFound ? BlobStoreError.notFound("\(hash) (tried \(errors.joined(separator: "; ")))")
                                                    : FetchUnavailable(hash: hash, tried: errors))
                }
            }
            armTimer()
            return nil
        }

        if let done = apply(decision.start(now: now())) { return try done.get() }
        for await event in events {
            switch event {
            case .responded(let i):
                firstByte[i] = now()
                decision.legResponded(i, now: now())
            case .won(let i, let digest, let via):
                _ = apply(decision.legSucceeded(i, now: now()))
                hedges.increment(by: Int64(decision.hedgesFired))
                cancelled.increment(by: Int64(decision.legsCancelled))
                (sources[i].isOrigin ? wins.origin : wins.peer).increment()
                tally.withLock { if sources[i].isOrigin { $0.originWins += 1 } else { $0.peerWins += 1 } }
                let took = now()
                latency.recordNanoseconds(took.components.seconds * 1_000_000_000 + took.components.attoseconds / 1_000_000_000)
                logger.debug("fetched", metadata: ["hash": "\(hash)", "from": "\(sources[i])", "via": "\(via.rawValue)",
                                                   "legs": "\(started)", "cancelled": "\(decision.legsCancelled)"])
                return FetchResult(digest: digest, source: sources[i], transport: via, legsStarted: started,
                                   legsCancelled: decision.legsCancelled, timeToFirstByte: firstByte[i] ?? took)
            case .failed(let i, let error):
                if stalled.contains(i) || !(error is LegNotFound) { allSaidNotFound = false }
                if stalled.contains(i) {
                    let via = legs[i]?.answer.withLock { $0?.via }
                    await requester.connectionStalled(to: sources[i], via: via)
                    errors.append("\(LegStalled(source: sources[i], after: stallTimeout))")
                } else {
                    errors.append("\(sources[i]): \(error)")
                }
                if let done = apply(decision.legFailed(i, now: now())) { return try done.get() }
            case .timer:
                timer = nil
                let t = now()
                for (i, leg) in legs where decision.states[i] == .running && !stalled.contains(i) {
                    let p = leg.progress.load(ordering: .relaxed)
                    if let last = seen[i], p == last.progress {
                        if t - last.at >= stallTimeout {
                            stalled.insert(i)
                            leg.stop()
                        }
                    } else {
                        seen[i] = (p, t)
                    }
                }
                if let done = apply(decision.tick(now: t)) { return try done.get() }
            }
        }
        failures.increment()
        tally.withLock { $0.failures += 1 }
        throw BlobStoreError.notFound(hash)
    }

    /// One leg: GET from `source`, then stream the body into a store writer; commit only if the
    /// digest verifies. Stopped (lost the race, or stalled) → the stream is reset, nothing stored.
    private func leg(_ i: Int, hash: String, source: FetchSource, leg: Leg, events: AsyncStream<Event>.Continuation) async throws -> (StoreDigest, MeshTransportKind) {
        let reply = try await requester.request(
            to: source, HTTPRequestHead(method: "GET", path: "/cas/\(hash)", headers: [Self.hopHeader: "1"]), body: .empty)
        let response = reply.response
        var done = false
        defer { if !done { response.cancel() } }
        leg.answer.withLock { $0 = (response.cancel, reply.transport) }
        leg.progress.add(1, ordering: .relaxed)
        try Task.checkCancellation()
        guard response.status == 200 else {
            if response.status == 404 { throw LegNotFound(hash: hash, source: source) }
            throw BlobStoreError.io("\(hash) at \(source): HTTP \(response.status)")
        }
        events.yield(.responded(i))
        let bodyStarted = ContinuousClock.now
        let size = response.headers["content-length"].flatMap { Int64($0) }
        let writer = try await store.beginWrite(hash: hash, expectedSize: size)
        do {
            for try await chunk in response.body {
                try Task.checkCancellation()
                try chunk.withUnsafeReadableBytes { try writer.write($0) }
                leg.progress.add(1, ordering: .relaxed)
            }
            try Task.checkCancellation()
            let d = try await writer.commit()
            done = true
            requester.transferred(from: source, via: reply.transport, bytes: d.size, duration: ContinuousClock.now - bodyStarted)
            return (d, reply.transport)
        } catch {
            writer.abort()
            throw error
        }
    }
}
