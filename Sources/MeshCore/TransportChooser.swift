/// Which transport a request to one peer takes when both are up (`[fetch] transport = "adaptive"`):
/// what the last requests to that peer measured decides, per peer (issue 13).
///
/// * Two signals per peer and transport, each an exponentially weighted moving average:
///   the **latency** to a response head (every request), and the **goodput** of transfers of at
///   least `goodputMinBytes` (a fetched body, or a copy's upload).
/// * A request expected to carry at least `largeBytes` goes where goodput is higher; a smaller one
///   (or one of unknown size, unless goodput differs by more than `decisiveGoodputRatio`) goes
///   where latency is lower. A transport without a sample yet is tried first (the preferred one
///   before the other), so both get measured.
/// * The current choice changes only when the other transport is better by `margin` (no flapping
///   on noise), and one decision in `exploreEvery` takes the other transport, so an estimate that
///   went stale (a path that got better) is refreshed.
/// * Pure and deterministic: the caller passes the time and records the outcomes.
public struct TransportChooser: Sendable {
    public enum Kind: String, Sendable, Hashable, CaseIterable {
        case quic, tcp
        var other: Kind { self == .quic ? .tcp : .quic }
    }

    public enum Reason: String, Sendable, Hashable, CaseIterable {
        /// Nothing measured yet for this transport: trying it.
        case unmeasured
        /// The measured better one (or the current one, not beaten by the margin).
        case measured
        /// The periodic try of the other transport.
        case explore
    }

    public struct Configuration: Sendable, Hashable {
        /// Requests expected to move at least this many bytes are decided by goodput.
        public var largeBytes: Int64 = 256 * 1024
        /// Transfers of at least this many bytes give a goodput sample.
        public var goodputMinBytes: Int64 = 256 * 1024
        /// For a request of unknown size, goodput decides when one transport's is this many times the other's.
        public var decisiveGoodputRatio: Double = 1.5
        /// Weight of a new sample in the moving averages.
        public var weight: Double = 0.25
        /// How much better the other transport must be to take over.
        public var margin: Double = 0.15
        /// One decision in this many (per peer and size class) goes to the other transport.
        public var exploreEvery: Int = 32
        public init() {}
    }

    struct Estimate: Sendable {
        var latency: Double?   // seconds
        var goodput: Double?   // bytes per second
    }

    struct Peer: Sendable {
        var estimates: [Kind: Estimate] = [:]
        var current: [Bool: Kind] = [:]   // by size class (large?)
        var decisions: [Bool: Int] = [:]
    }

    public let configuration: Configuration
    public let preferred: Kind
    private var peers: [String: Peer] = [:]

    public init(preferred: Kind = .quic, configuration: Configuration = Configuration()) {
        self.preferred = preferred
        self.configuration = configuration
    }

    /// The transport for a request to `peer` expected to move `expectedBytes` (nil: unknown).
    public mutating func choose(peer: String, expectedBytes: Int64?) -> (Kind, Reason) {
        var p = peers[peer] ?? Peer()
        defer { peers[peer] = p }
        let large = (expectedBytes ?? 0) >= configuration.largeBytes
        let q = p.estimates[.quic] ?? Estimate(), t = p.estimates[.tcp] ?? Estimate()
        // Measure what has not been measured yet (the signal this request would give).
        let signal: (Estimate) -> Double? = large ? { $0.goodput } : { $0.latency }
        let (mine, other) = preferred == .quic ? (q, t) : (t, q)
        if signal(mine) == nil { return (preferred, .unmeasured) }
        if signal(other) == nil { return (preferred.other, .unmeasured) }
        let n = (p.decisions[large] ?? 0) + 1
        p.decisions[large] = n
        let best = better(q, t, large: large, unknownSize: expectedBytes == nil, current: p.current[large] ?? preferred)
        p.current[large] = best
        if configuration.exploreEvery > 0, n % configuration.exploreEvery == 0 { return (best.other, .explore) }
        return (best, .measured)
    }

    /// The better of the two for this size class; `current` keeps its place unless beaten by the margin.
    private func better(_ q: Estimate, _ t: Estimate, large: Bool, unknownSize: Bool, current: Kind) -> Kind {
        let m = 1 + configuration.margin
        func byGoodput() -> Kind? {
            guard let gq = q.goodput, let gt = t.goodput, gq > 0, gt > 0 else { return nil }
            let (mine, theirs) = current == .quic ? (gq, gt) : (gt, gq)
            return theirs > mine * m ? current.other : current
        }
        func byLatency() -> Kind? {
            guard let lq = q.latency, let lt = t.latency else { return nil }
            let (mine, theirs) = current == .quic ? (lq, lt) : (lt, lq)
            return theirs * m < mine ? current.other : current
        }
        if large { return byGoodput() ?? byLatency() ?? current }
        if unknownSize, let gq = q.goodput, let gt = t.goodput, gq > 0, gt > 0,
           max(gq, gt) / min(gq, gt) >= configuration.decisiveGoodputRatio {
            return gq > gt ? .quic : .tcp
        }
        return byLatency() ?? current
    }

    /// Records a request to `peer` over `kind`: the time to its response head, and (for a
    /// transfer of at least `goodputMinBytes`) how many bytes moved in how long.
    public mutating func record(peer: String, kind: Kind, headLatency: Duration?, bytes: Int64 = 0, transferTime: Duration? = nil) {
        var p = peers[peer] ?? Peer()
        var e = p.estimates[kind] ?? Estimate()
        let w = configuration.weight
        func blend(_ old: Double?, _ new: Double) -> Double { old.map { $0 * (1 - w) + new * w } ?? new }
        if let headLatency { e.latency = blend(e.latency, headLatency.seconds) }
        if bytes >= configuration.goodputMinBytes, let transferTime, transferTime > .zero {
            e.goodput = blend(e.goodput, Double(bytes) / transferTime.seconds)
        }
        p.estimates[kind] = e
        peers[peer] = p
    }

    /// Forget a peer (it died or left; a new incarnation starts unmeasured).
    public mutating func forget(peer: String) { peers[peer] = nil }

    /// What is known about `peer` (for `/status` and tests): latency in seconds, goodput in bytes/s.
    public func estimates(of peer: String) -> [Kind: (latency: Double?, goodput: Double?)] {
        (peers[peer]?.estimates ?? [:]).mapValues { ($0.latency, $0.goodput) }
    }
}
