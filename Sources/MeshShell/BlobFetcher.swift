import BlobStore
import Logging
import MeshCore
import MeshHTTP
import Metrics
import NIOCore
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
    public var digest: Digest
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
    /// The time hedge delays, stall timeouts and transfer durations are measured on.
    let time: Timebase
    private let inflight = Mutex<[String: Task<FetchResult, any Error>]>([:])
    private let wins: (origin: Counter, peer: Counter)
    private let hedges = Counter(label: "cachemesh_fetch_hedges_fired_total")
    private let cancelled = Counter(label: "cachemesh_fetch_legs_cancelled_total")
    private let failures = Counter(label: "cachemesh_fetch_failures_total")
    private let latency = Metrics.Timer(label: "cachemesh_fetch_duration_seconds")
    /// Bodies continued from another source after the winning one died mid-body.
    private let resumed = Counter(label: "cachemesh_fetch_resumed_total")
    /// Bodies that did not verify (wrong digest or size): never stored, the caller's stream reset.
    private let corruptBodies = Counter(label: "cachemesh_fetch_corrupt_bodies_total")
    /// The same counts as the metrics above, for `/status`.
    private let tally = Mutex<(originWins: Int64, peerWins: Int64, failures: Int64)>((0, 0, 0))

    /// Races won by the origin and by peers, and fetches that failed, since the start.
    public var counts: (originWins: Int64, peerWins: Int64, failures: Int64) { tally.withLock { $0 } }

    /// `clock`: what hedge delays and stall timeouts run on (a test passes one it advances itself).
    public init<C: Clock>(store: BlobStore, requester: any MeshRequester, logger: Logger, stallTimeout: Duration = .seconds(10),
                          clock: C = ContinuousClock(), spacing: @escaping @Sendable () -> LegSpacing) where C.Duration == Duration {
        self.time = Timebase(clock)
        self.store = store
        self.requester = requester
        self.logger = logger
        self.spacing = spacing
        self.stallTimeout = stallTimeout
        self.wins = (Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "origin")]),
                     Counter(label: "cachemesh_fetch_wins_total", dimensions: [("source", "peer")]))
    }

    /// Fetch `hash` into the local store from `sources` (best first).
    /// `spacing` overrides the fetcher's own leg spacing for this fetch. `tap`: a caller that
    /// takes the body as it arrives (cut-through); it is used only if this call starts the race
    /// (a caller joining a running race waits for the stored blob), and always begun or ended.
    public func fetch(hash: String, sources: [FetchSource], spacing: LegSpacing? = nil, tap: CutThroughTap? = nil) async throws -> FetchResult {
        let (task, isNew) = inflight.withLock { m -> (Task<FetchResult, any Error>, Bool) in
            if let t = m[hash] { return (t, false) }
            let t = Task { try await self.race(hash: hash, sources: sources, spacing: spacing ?? self.spacing(), tap: tap) }
            m[hash] = t
            return (t, true)
        }
        defer {
            if isNew { inflight.withLock { _ = $0.removeValue(forKey: hash) } }
            tap?.end()
        }
        return try await task.value
    }

    /// A clock reduced to what the race needs: time since the fetcher was made, and a sleep
    /// until a point of that time (cancellable).
    struct Timebase: Sendable {
        let now: @Sendable () -> Duration
        let sleep: @Sendable (Duration) async throws -> Void

        init<C: Clock>(_ clock: C) where C.Duration == Duration {
            let epoch = clock.now
            now = { epoch.duration(to: clock.now) }
            sleep = { try await clock.sleep(until: epoch.advanced(by: $0), tolerance: nil) }
        }

        func sleep(until t: Duration) async throws { try await sleep(t) }
    }

    private enum Event: Sendable {
        case answered(Int, MeshReply)
        case failed(Int, any Error)
        case timer
    }

    /// What the race loop knows of one running leg: progress (bumped on the response head),
    /// the transport it answered on, and how to reset its stream.
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
    /// leg is one task (the request up to its response head) reporting to one event stream; a leg
    /// without a response head for the stall timeout is stopped and counts as failed. The first
    /// leg to answer 200 is committed (`RaceDecision.commit`: the others are cancelled) and its
    /// body is relayed by `relayBody` (cut-through, verified, resumed from the next source if
    /// the leg dies mid-body).
    func race(hash: String, sources: [FetchSource], spacing: LegSpacing, tap: CutThroughTap? = nil) async throws -> FetchResult {
        guard !sources.isEmpty else { throw BlobStoreError.notFound(hash) }
        let time = self.time
        let start = time.now()
        func now() -> Duration { time.now() - start }
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
                    sink.yield(.answered(i, try await self.leg(i, hash: hash, source: sources[i], leg: leg)))
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
                try? await time.sleep(until: start + due)
                if !Task.isCancelled { sink.yield(.timer) }
            }, due)
        }
        func fail() -> any Error {
            failures.increment()
            tally.withLock { $0.failures += 1 }
            hedges.increment(by: Int64(decision.hedgesFired))
            return allSaidNotFound ? BlobStoreError.notFound("\(hash) (tried \(errors.joined(separator: "; ")))")
                                   : FetchUnavailable(hash: hash, tried: errors)
        }
        /// Start the legs the decision asks for; the outcome if the race is over.
        func apply(_ actions: [RaceAction]) -> (any Error)? {
            for a in actions {
                switch a {
                case .startLeg(let i, _): startLeg(i)
                case .cancelLeg(let i, _): legs[i]?.stop()
                case .finished: break
                case .failed: return fail()
                }
            }
            armTimer()
            return nil
        }

        if let e = apply(decision.start(now: now())) { throw e }
        for await event in events {
            switch event {
            case .answered(let i, let reply):
                guard decision.states[i] == .running else {
                    reply.response.cancel()
                    continue
                }
                let firstByte = now()
                decision.legResponded(i, now: firstByte)
                _ = apply(decision.commit(i, now: firstByte))
                timer?.task.cancel()
                timer = nil
                let excluded = Set(decision.states.indices.filter { decision.states[$0] == .failed })
                let relayed: (digest: Digest, source: Int, via: MeshTransportKind)
                do {
                    relayed = try await relayBody(hash: hash, sources: sources, first: i, reply: reply, excluded: excluded, tap: tap)
                } catch let e as RelayFailed {
                    allSaidNotFound = false
                    errors += e.failures
                    throw fail()
                }
                _ = decision.legSucceeded(i, now: now())
                hedges.increment(by: Int64(decision.hedgesFired))
                cancelled.increment(by: Int64(decision.legsCancelled))
                let winner = sources[relayed.source]
                (winner.isOrigin ? wins.origin : wins.peer).increment()
                tally.withLock { if winner.isOrigin { $0.originWins += 1 } else { $0.peerWins += 1 } }
                let took = now()
                latency.recordNanoseconds(took.components.seconds * 1_000_000_000 + took.components.attoseconds / 1_000_000_000)
                logger.debug("fetched", metadata: ["hash": "\(hash)", "from": "\(winner)", "via": "\(relayed.via.rawValue)",
                                                   "legs": "\(started)", "cancelled": "\(decision.legsCancelled)"])
                return FetchResult(digest: relayed.digest, source: winner, transport: relayed.via, legsStarted: started,
                                   legsCancelled: decision.legsCancelled, timeToFirstByte: firstByte)
            case .failed(let i, let error):
                if stalled.contains(i) || !(error is LegNotFound) { allSaidNotFound = false }
                if stalled.contains(i) {
                    let via = legs[i]?.answer.withLock { $0?.via }
                    await requester.connectionStalled(to: sources[i], via: via)
                    errors.append("\(LegStalled(source: sources[i], after: stallTimeout))")
                } else {
                    errors.append("\(sources[i]): \(error)")
                }
                if let e = apply(decision.legFailed(i, now: now())) { throw e }
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
                if let e = apply(decision.tick(now: t)) { throw e }
            }
        }
        failures.increment()
        tally.withLock { $0.failures += 1 }
        throw BlobStoreError.notFound(hash)
    }

    /// One leg: GET from `source` up to its response head. 200 → the reply (its body not yet
    /// read); stopped (lost the race, or stalled) → the stream is reset.
    private func leg(_ i: Int, hash: String, source: FetchSource, leg: Leg) async throws -> MeshReply {
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
        // A source declaring more bytes than this store could ever hold (a bug, or a lie) is a
        // failed leg: the race goes on with the others instead of the fetch failing on its word.
        if let declared = response.headers["content-length"].flatMap({ Int64($0) }), declared > store.configuration.maxBytes {
            throw BlobStoreError.io("\(hash) at \(source): declares \(declared) bytes, more than this store holds (\(store.configuration.maxBytes))")
        }
        done = true
        return reply
    }

    /// The relay could not complete the body from any source.
    struct RelayFailed: Error {
        var failures: [String]
    }

    /// Watches one body for progress: a body with no bytes for the stall timeout (while the
    /// relay waits on the source, not on its caller) is reset.
    final class BodyWatch: Sendable {
        let progress = Atomic<Int64>(0)
        /// The relay is waiting on its caller (flow control), not on the source.
        let waitingOnCaller = Atomic<Bool>(false)
        let stalled = Atomic<Bool>(false)
    }

    /// The body phase (the I/O shell of `CutThroughRelay`): `reply`'s body (source `first`)
    /// streams into one store writer and, through `tap` (if it wants this size), to the caller,
    /// one chunk behind; the blob is committed only if it verifies. A source that dies mid-body
    /// is followed by the next one from the same offset (`Range: bytes=N-`); a body that does not
    /// verify resets the caller and starts over from the next source.
    private func relayBody(hash: String, sources: [FetchSource], first: Int, reply: MeshReply, excluded: Set<Int>,
                           tap: CutThroughTap?) async throws -> (digest: Digest, source: Int, via: MeshTransportKind) {
        let size = reply.response.headers["content-length"].flatMap { Int64($0) }
        let cut = tap.map { $0.wants(size: size) } ?? false
        var relay = CutThroughRelay<ByteBuffer>(sourceCount: sources.count, first: first, size: size, excluded: excluded, caller: cut)
        if cut, let tap { tap.begin(size: size, source: "\(sources[first]) via \(reply.transport.rawValue)") }
        var writer: BlobWriter
        do {
            writer = try await store.beginWrite(hash: hash, expectedSize: size)
        } catch {
            reply.response.cancel()
            if cut { tap?.reset("\(error)") }
            throw error
        }
        var active: MeshReply? = reply
        var via = reply.transport
        var digest: Digest?
        var todo = relay.start()[...]
        var finished = false
        defer {
            if !finished { writer.abort() }
            active?.response.cancel()
        }
        func report(_ actions: [CutThroughRelay<ByteBuffer>.Action]) { todo.append(contentsOf: actions) }

        while let action = todo.popFirst() {
            switch action {
            case .readBody(let i):
                guard let r = active else { preconditionFailure("readBody without a source") }
                let watch = BodyWatch()
                let timeout = stallTimeout
                let watchdog = Task {
                    var last: (Int64, Duration) = (-1, time.now())
                    while !Task.isCancelled {
                        try? await time.sleep(until: time.now() + timeout / 4)
                        let p = watch.progress.load(ordering: .relaxed)
                        if p != last.0 || watch.waitingOnCaller.load(ordering: .relaxed) {
                            last = (p, time.now())
                        } else if time.now() - last.1 >= timeout {
                            watch.stalled.store(true, ordering: .relaxed)
                            r.response.cancel()
                            return
                        }
                    }
                }
                let bodyStarted = time.now()
                let before = relay.received
                let resumesBefore = relay.resumes
                var outcome: [CutThroughRelay<ByteBuffer>.Action]
                do {
                    var corrupt: String?
                    chunks: for try await chunk in r.response.body {
                        watch.progress.add(1, ordering: .relaxed)
                        for a in relay.chunk(chunk) {
                            switch a {
                            case .write(let c):
                                do {
                                    try c.withUnsafeReadableBytes { try writer.write($0) }
                                } catch BlobStoreError.sizeMismatch(let expected, let actual) {
                                    corrupt = "more bytes than the \(expected) declared (\(actual))"
                                    break chunks
                                }
                            case .forward(let c):
                                guard let tap else { continue }
                                watch.waitingOnCaller.store(true, ordering: .relaxed)
                                do { try await tap.forward(c) } catch { relay.callerGone() }
                                watch.waitingOnCaller.store(false, ordering: .relaxed)
                            default:
                                preconditionFailure("unexpected relay action \(a) for a chunk")
                            }
                        }
                    }
                    watchdog.cancel()
                    if let corrupt {
                        corruptBodies.increment()
                        logger.warning("mesh fetch: a source sent more bytes than it declared", metadata: ["hash": "\(hash)", "source": "\(sources[i])"])
                        r.response.cancel()
                        outcome = relay.corrupt(corrupt)
                    } else {
                        requester.transferred(from: sources[i], via: r.transport, bytes: relay.received - before,
                                              duration: time.now() - bodyStarted)
                        outcome = relay.bodyEnded()
                    }
                } catch let e as BlobStoreError {
                    // The store cannot take it (disk full, I/O): no source can help.
                    watchdog.cancel()
                    if cut { tap?.reset("\(e)") }
                    throw e
                } catch {
                    watchdog.cancel()
                    r.response.cancel()
                    if watch.stalled.load(ordering: .relaxed) {
                        await requester.connectionStalled(to: sources[i], via: r.transport)
                        outcome = relay.sourceFailed("\(LegStalled(source: sources[i], after: stallTimeout))")
                    } else {
                        outcome = relay.sourceFailed("\(error)")
                    }
                    if relay.received > before {
                        logger.info("mesh fetch: a source died mid-body; continuing from the next source",
                                    metadata: ["hash": "\(hash)", "source": "\(sources[i])", "offset": "\(relay.received)", "error": "\(error)"])
                    }
                }
                active = nil
                if relay.resumes > resumesBefore { resumed.increment() }
                report(outcome)
            case .commit:
                do {
                    digest = try await writer.commit()
                    finished = true
                    report(relay.committed())
                } catch BlobStoreError.digestMismatch(let expected, let actual) {
                    corruptBodies.increment()
                    logger.warning("mesh fetch: a source sent a body that does not match its digest",
                                   metadata: ["hash": "\(expected)", "got": "\(actual)", "source": "\(sources[relay.current])"])
                    report(relay.corrupt("digest mismatch (got \(actual))"))
                } catch BlobStoreError.sizeMismatch(let expected, let actual) {
                    corruptBodies.increment()
                    logger.warning("mesh fetch: a source sent a body of the wrong size",
                                   metadata: ["hash": "\(hash)", "declared": "\(expected)", "got": "\(actual)", "source": "\(sources[relay.current])"])
                    report(relay.corrupt("size mismatch (\(actual) bytes, \(expected) declared)"))
                } catch {
                    if relay.caller == .attached { tap?.reset("\(error)") }
                    throw error
                }
            case .forward(let c):
                guard let tap else { continue }
                do { try await tap.forward(c) } catch { relay.callerGone() }
            case .finishCaller:
                tap?.finish()
            case .resetCaller(let why):
                logger.warning("mesh fetch: resetting the caller's stream", metadata: ["hash": "\(hash)", "why": "\(why)"])
                tap?.reset(why)
            case .restartWriter:
                writer.abort()
                writer = try await store.beginWrite(hash: hash, expectedSize: nil)
            case .request(let j, let from):
                var headers: HTTPHeaders = [Self.hopHeader: "1"]
                if from > 0 { headers.add("range", "bytes=\(from)-") }
                do {
                    let r = try await requester.request(to: sources[j], HTTPRequestHead(method: "GET", path: "/cas/\(hash)", headers: headers),
                                                        body: .empty, expectedBytes: relay.size.map { $0 - from })
                    active = r
                    via = r.transport
                    let cr = r.response.status == 206 ? r.response.headers["content-range"].flatMap(Self.parseContentRange) : nil
                    let total = r.response.status == 206 ? cr?.total : r.response.headers["content-length"].flatMap { Int64($0) }
                    let next = relay.answered(status: r.response.status, rangeStart: cr?.start, total: total)
                    if case .readBody = next.first {} else {
                        r.response.cancel()
                        active = nil
                    }
                    report(next)
                } catch {
                    report(relay.sourceFailed("\(error)"))
                }
            case .done(let i):
                guard let digest else { preconditionFailure("done before commit") }
                return (digest, i, via)
            case .fail:
                throw RelayFailed(failures: relay.failures)
            case .write:
                preconditionFailure("write outside a body")
            }
        }
        throw RelayFailed(failures: relay.failures)
    }

    /// `bytes N-M/T` → (N, T).
    static func parseContentRange(_ value: String) -> (start: Int64, total: Int64?)? {
        guard value.hasPrefix("bytes ") else { return nil }
        let rest = value.dropFirst(6)
        guard let dash = rest.firstIndex(of: "-"), let slash = rest.firstIndex(of: "/"), let start = Int64(rest[..<dash]) else { return nil }
        return (start, Int64(rest[rest.index(after: slash)...]))
    }
}
