import DequeModule

/// Per-peer smoothed RTT (EWMA) and a sliding window of recent fetch latencies.
public struct LatencyTracker: Sendable {
    public struct Configuration: Sendable, Hashable {
        /// EWMA weight of a new RTT sample (TCP's SRTT uses 1/8).
        public var rttAlpha: Double = 0.125
        /// Recent fetch latencies kept for percentiles (oldest dropped first).
        public var windowSize: Int = 512

        public init() {}
    }

    public let configuration: Configuration
    private var rtts: [NodeID: Duration] = [:]
    private var window = Deque<Duration>()

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
    }

    public mutating func recordRTT(_ rtt: Duration, for node: NodeID) {
        if let old = rtts[node] {
            rtts[node] = old * (1 - configuration.rttAlpha) + rtt * configuration.rttAlpha
        } else {
            rtts[node] = rtt
        }
    }

    public func rtt(of node: NodeID) -> Duration? { rtts[node] }

    public mutating func forget(_ node: NodeID) { rtts[node] = nil }

    public mutating func recordFetchLatency(_ latency: Duration) {
        window.append(latency)
        if window.count > configuration.windowSize { window.removeFirst() }
    }

    public var sampleCount: Int { window.count }

    /// Nearest-rank percentile (`p` in 0...1) of the recent fetch latencies; nil without samples.
    public func percentile(_ p: Double) -> Duration? {
        guard !window.isEmpty else { return nil }
        let sorted = window.sorted()
        let clamped = Swift.min(1, Swift.max(0, p))
        let rank = Int((clamped * Double(sorted.count)).rounded(.up))
        return sorted[Swift.max(0, Swift.min(sorted.count - 1, rank - 1))]
    }
}

public enum RaceSource: Hashable, Sendable, CustomStringConvertible {
    case peer(NodeID)
    case origin(NodeID)

    public var node: NodeID {
        switch self {
        case .peer(let n), .origin(let n): return n
        }
    }

    public var description: String {
        switch self {
        case .peer(let n): return "peer:\(n.name)"
        case .origin(let n): return "origin:\(n.name)"
        }
    }
}

public struct RaceLeg: Hashable, Sendable {
    public var source: RaceSource
    /// Offset from the start of the race at which this leg starts (unless an earlier leg fails
    /// first); nil: only when the legs before it failed.
    public var startAfter: Duration?

    public init(source: RaceSource, startAfter: Duration?) {
        self.source = source
        self.startAfter = startAfter
    }
}

/// How the legs of a race are spaced.
public enum LegSpacing: Sendable, Hashable {
    /// Every leg at once.
    case allAtOnce
    /// Leg k at k × delay (unless an earlier one failed first).
    case hedged(Duration)
    /// One leg at a time: the next starts only when the running one fails.
    case failoverOnly
}

public struct RacePlan: Hashable, Sendable {
    public var legs: [RaceLeg]
    /// The hedge delay used (nil unless hedged).
    public var hedgeDelay: Duration?

    public init(legs: [RaceLeg], hedgeDelay: Duration?) {
        self.legs = legs
        self.hedgeDelay = hedgeDelay
    }

    /// `sources` (best first) spaced as `spacing` says.
    public init(sources: [RaceSource], spacing: LegSpacing) {
        switch spacing {
        case .allAtOnce:
            self.init(legs: sources.map { RaceLeg(source: $0, startAfter: .zero) }, hedgeDelay: nil)
        case .hedged(let delay):
            self.init(legs: sources.enumerated().map { RaceLeg(source: $1, startAfter: delay * $0) }, hedgeDelay: delay)
        case .failoverOnly:
            self.init(legs: sources.enumerated().map { RaceLeg(source: $1, startAfter: $0 == 0 ? .zero : nil) }, hedgeDelay: nil)
        }
    }
}

/// How a racing fetch starts its legs.
public struct HedgePolicy: Sendable, Hashable {
    public enum Mode: Sendable, Hashable {
        /// Start the best leg; start leg k at k × delay, delay = percentile of recent fetch latencies.
        case hedged
        /// Start every leg at once.
        case immediate
    }

    public var mode: Mode = .hedged
    /// Percentile of recent fetch latencies used as the hedge delay (0.95 = p95).
    public var percentile: Double = 0.95
    public var minimumDelay: Duration = .milliseconds(2)
    public var maximumDelay: Duration = .milliseconds(500)
    /// Delay used until `minimumSamples` latencies have been observed.
    public var initialDelay: Duration = .milliseconds(50)
    public var minimumSamples: Int = 10
    /// Upper bound on legs, the origin included.
    public var maximumLegs: Int = 3

    public init() {}

    public init(mode: Mode, percentile: Double = 0.95, minimumDelay: Duration = .milliseconds(2),
                maximumDelay: Duration = .milliseconds(500), initialDelay: Duration = .milliseconds(50),
                minimumSamples: Int = 10, maximumLegs: Int = 3) {
        self.mode = mode
        self.percentile = percentile
        self.minimumDelay = minimumDelay
        self.maximumDelay = maximumDelay
        self.initialDelay = initialDelay
        self.minimumSamples = minimumSamples
        self.maximumLegs = maximumLegs
    }

    /// The adaptive hedge delay: the configured percentile of recent latencies clamped to
    /// [minimumDelay, maximumDelay]; `initialDelay` (clamped) while there are too few samples.
    public func hedgeDelay(_ tracker: LatencyTracker) -> Duration {
        let raw: Duration
        if tracker.sampleCount >= minimumSamples, let p = tracker.percentile(percentile) {
            raw = p
        } else {
            raw = initialDelay
        }
        return Swift.min(maximumDelay, Swift.max(minimumDelay, raw))
    }

    /// Candidates: `holders` ranked by smoothed RTT (unmeasured ones after measured ones, then by
    /// NodeID), then the origin last. At most `maximumLegs` legs; the origin always gets one when given.
    public func plan(holders: [NodeID], origin: NodeID?, tracker: LatencyTracker) -> RacePlan {
        var peers = Array(Set(holders.filter { $0 != origin }))
        peers.sort { a, b in
            switch (tracker.rtt(of: a), tracker.rtt(of: b)) {
            case let (x?, y?): return x != y ? x < y : a < b
            case (.some, nil): return true
            case (nil, .some): return false
            case (nil, nil): return a < b
            }
        }
        let peerLegs = Swift.max(0, maximumLegs - (origin == nil ? 0 : 1))
        var sources = peers.prefix(peerLegs).map(RaceSource.peer)
        if let origin { sources.append(.origin(origin)) }
        return RacePlan(sources: sources, spacing: spacing(tracker))
    }

    /// The leg spacing this policy gives now.
    public func spacing(_ tracker: LatencyTracker) -> LegSpacing {
        mode == .immediate ? .allAtOnce : .hedged(hedgeDelay(tracker))
    }
}

public enum RaceAction: Hashable, Sendable {
    case startLeg(Int, RaceSource)
    case cancelLeg(Int, RaceSource)
    /// `winner` delivered a complete, verified body.
    case finished(winner: Int, RaceSource)
    /// Every leg failed.
    case failed
}

/// One racing fetch as a state machine over a `RacePlan`. The shell starts/cancels legs as told and
/// reports leg outcomes; `nextDeadline` says when to call `tick` next.
///
/// * Legs start at their planned offsets (`hedgesFired` counts legs started by timer, not the first).
/// * A failed leg makes the next pending leg start at once (a fallback, not a hedge).
/// * `legResponded(leg)`: a running leg answered (its body is arriving): hedging stops — no timer
///   starts another leg — because a hedge is against a source that does not answer, not against a
///   large body taking its time. Failures still start the next leg.
/// * `commit(leg)`: bytes of that leg went to the caller; every other leg is cancelled and no further
///   leg starts (never switch source mid-body). If a committed leg then fails, the race fails.
/// * The first `succeeded` leg wins; all other running legs are cancelled.
public struct RaceDecision: Sendable {
    public enum LegState: Hashable, Sendable { case pending, running, failed, cancelled, won }

    public let plan: RacePlan
    public let startedAt: Duration
    public private(set) var states: [LegState]
    public private(set) var hedgesFired = 0
    public private(set) var legsCancelled = 0
    public private(set) var committedLeg: Int?
    public private(set) var isDone = false
    private var respondedLegs: Set<Int> = []
    /// A running leg answered: no more legs start by timer (until it fails).
    public var answered: Bool { respondedLegs.contains { states[$0] == .running } }

    public init(plan: RacePlan, now: Duration) {
        self.plan = plan
        self.startedAt = now
        self.states = Array(repeating: .pending, count: plan.legs.count)
    }

    /// Starts what is due now (at least the first leg). Fails at once with no legs.
    public mutating func start(now: Duration) -> [RaceAction] {
        guard !plan.legs.isEmpty else { isDone = true; return [.failed] }
        var actions: [RaceAction] = []
        states[0] = .running
        actions.append(.startLeg(0, plan.legs[0].source))
        actions += tick(now: now)
        return actions
    }

    public mutating func tick(now: Duration) -> [RaceAction] {
        guard !isDone, committedLeg == nil, !answered else { return [] }
        var actions: [RaceAction] = []
        for i in plan.legs.indices where states[i] == .pending {
            guard let after = plan.legs[i].startAfter, now >= startedAt + after else { continue }
            states[i] = .running
            if i > 0 && after > .zero { hedgesFired += 1 }
            actions.append(.startLeg(i, plan.legs[i].source))
        }
        return actions
    }

    /// When the next pending leg is due (nil if none).
    public var nextDeadline: Duration? {
        guard !isDone, committedLeg == nil, !answered else { return nil }
        return plan.legs.indices.filter { states[$0] == .pending }.compactMap { plan.legs[$0].startAfter.map { startedAt + $0 } }.min()
    }

    /// Leg `i` answered with a body on its way.
    public mutating func legResponded(_ i: Int, now: Duration) {
        guard !isDone, states.indices.contains(i), states[i] == .running else { return }
        respondedLegs.insert(i)
    }

    public mutating func legFailed(_ i: Int, now: Duration) -> [RaceAction] {
        guard !isDone, states.indices.contains(i), states[i] == .running else { return [] }
        states[i] = .failed
        if committedLeg == i {
            isDone = true
            return [.failed]
        }
        var actions: [RaceAction] = []
        if !states.contains(.running) {
            if let next = states.firstIndex(of: .pending) {
                states[next] = .running
                actions.append(.startLeg(next, plan.legs[next].source))
            } else {
                isDone = true
                actions.append(.failed)
            }
        }
        return actions
    }

    public mutating func commit(_ i: Int, now: Duration) -> [RaceAction] {
        guard !isDone, committedLeg == nil, states.indices.contains(i), states[i] == .running else { return [] }
        committedLeg = i
        return cancelOthers(than: i)
    }

    public mutating func legSucceeded(_ i: Int, now: Duration) -> [RaceAction] {
        guard !isDone, states.indices.contains(i), states[i] == .running else { return [] }
        if let c = committedLeg, c != i { return [] }
        states[i] = .won
        isDone = true
        var actions = cancelOthers(than: i)
        actions.append(.finished(winner: i, plan.legs[i].source))
        return actions
    }

    private mutating func cancelOthers(than winner: Int) -> [RaceAction] {
        var actions: [RaceAction] = []
        for j in states.indices where j != winner {
            switch states[j] {
            case .running:
                states[j] = .cancelled
                legsCancelled += 1
                actions.append(.cancelLeg(j, plan.legs[j].source))
            case .pending:
                states[j] = .cancelled
            default:
                break
            }
        }
        return actions
    }
}
