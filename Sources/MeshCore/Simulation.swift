#if canImport(FoundationEssentials)
import FoundationEssentials  // JSONEncoder only (wire-size accounting)
#else
import Foundation
#endif
import HeapModule

/// A mesh of real `MeshNode`s on a simulated network in virtual time (no sockets, no clocks).
///
/// Messages are delivered after `oneWayLatency` ± `jitter` (uniform), optionally lost at `lossRate`;
/// nodes can be crashed (silent: no ticks, no messages in or out), links blocked in one direction and
/// healed. Nodes are ticked every `tickStep` in index order; everything is seeded, so a run is
/// deterministic. Wire bytes are counted by JSON-encoding each sent `Envelope` (when `countBytes`).
public struct SimulatedMesh {
    public struct Configuration: Sendable {
        public var nodeCount: Int
        public var seed: UInt64 = 1
        public var oneWayLatency: Duration = .microseconds(250)
        public var jitter: Duration = .microseconds(100)
        public var lossRate: Double = 0
        public var tickStep: Duration = .milliseconds(10)
        public var membership: Membership.Configuration = .lan
        public var locality: LocalityMap.Configuration = LocalityMap.Configuration()
        /// Every node starts knowing every other as alive (a converged mesh); otherwise node 0 is
        /// the seed that everybody joins through.
        public var startConverged: Bool = true
        public var countBytes: Bool = true

        public init(nodeCount: Int) { self.nodeCount = nodeCount }
    }

    struct Delivery: Comparable {
        var time: Duration
        var seq: UInt64
        var from: Int
        var to: Int
        var message: Message

        static func < (a: Delivery, b: Delivery) -> Bool { (a.time, a.seq) < (b.time, b.seq) }
        static func == (a: Delivery, b: Delivery) -> Bool { a.time == b.time && a.seq == b.seq }
    }

    struct Link: Hashable { var from: Int; var to: Int }

    public let configuration: Configuration
    public private(set) var nodes: [MeshNode] = []
    public private(set) var ids: [NodeID] = []
    public private(set) var now: Duration = .zero
    private var index: [NodeID: Int] = [:]
    private var addressIndex: [String: Int] = [:]
    private var queue = Heap<Delivery>()
    private var seq: UInt64 = 0
    private var rng: SplitMix64
    private var crashed = Set<Int>()
    private var blocked = Set<Link>()
    private let encoder = JSONEncoder()

    /// Bytes and messages sent per node (all message kinds), and push-pull bytes separately.
    public private(set) var bytesSent: [Int] = []
    public private(set) var pushPullBytesSent: [Int] = []
    public private(set) var messagesSent: [Int] = []
    /// Messages sent per kind ("ping", "ack", "pingReq", "gossip", "pushPull").
    public private(set) var sentKinds: [String: Int] = [:]
    /// Every member event observed: (time, observer index, event).
    public private(set) var events: [(time: Duration, observer: Int, event: MemberEvent)] = []
    /// How many `rttMeasured` actions the nodes emitted.
    public private(set) var rttSamples = 0
    public var recordEvents = true

    public init(_ configuration: Configuration) {
        self.configuration = configuration
        rng = SplitMix64(seed: configuration.seed)
        let n = configuration.nodeCount
        var updates: [MemberUpdate] = []
        for i in 0..<n {
            let id = NodeID(name: "n\(i)", uid: rng.next())
            let meta = SimulatedMesh.metadata(i)
            ids.append(id)
            index[id] = i
            addressIndex[meta.tcpEndpoint] = i
            updates.append(MemberUpdate(node: id, incarnation: 0, status: .alive, metadata: meta))
        }
        for i in 0..<n {
            nodes.append(MeshNode(myself: ids[i], metadata: updates[i].metadata,
                                  membershipConfiguration: configuration.membership,
                                  localityConfiguration: configuration.locality,
                                  initialMembers: configuration.startConverged ? updates : [],
                                  seed: configuration.seed &+ UInt64(i) &* 0x9E37_79B9))
        }
        bytesSent = Array(repeating: 0, count: n)
        pushPullBytesSent = Array(repeating: 0, count: n)
        messagesSent = Array(repeating: 0, count: n)
        if !configuration.startConverged {
            for i in 1..<max(1, n) {
                let actions = nodes[i].join(seeds: [SimulatedMesh.metadata(0).tcpEndpoint], now: now)
                perform(actions, by: i)
            }
        }
    }

    static func metadata(_ i: Int) -> NodeMetadata {
        let host = "10.\(i / 65536).\((i / 256) % 256).\(i % 256)"
        return NodeMetadata(name: "n\(i)", role: i == 0 ? .origin : .peer,
                            tcpEndpoint: "\(host):7000", quicEndpoint: "\(host):7001", certificateCN: "n\(i)")
    }

    public func indexOf(_ id: NodeID) -> Int? { index[id] }

    public func isCrashed(_ i: Int) -> Bool { crashed.contains(i) }

    // MARK: - Faults

    /// The node stops: no ticks, every message to or from it is dropped.
    public mutating func crash(_ i: Int) { crashed.insert(i) }

    /// Drop messages from `a` to `b` (one direction).
    public mutating func block(from a: Int, to b: Int) { blocked.insert(Link(from: a, to: b)) }

    /// Drop messages between `a` and `b` in both directions.
    public mutating func partition(_ a: Int, _ b: Int) {
        block(from: a, to: b)
        block(from: b, to: a)
    }

    public mutating func healAllLinks() { blocked.removeAll() }

    // MARK: - Driving

    public mutating func gained(_ digest: Digest, at i: Int) { nodes[i].gained(digest, now: now) }

    public mutating func lost(_ digest: Digest, at i: Int) { nodes[i].lost(digest, now: now) }

    public mutating func leave(_ i: Int) {
        let actions = nodes[i].leave(now: now)
        perform(actions, by: i)
    }

    /// Advance virtual time by one tick step: deliver due messages, then tick every running node.
    public mutating func step() {
        let target = now + configuration.tickStep
        while let next = queue.min, next.time <= target {
            let d = queue.removeMin()
            now = d.time
            guard !crashed.contains(d.to) else { continue }
            let actions = nodes[d.to].receive(d.message, from: ids[d.from], now: now)
            perform(actions, by: d.to)
        }
        now = target
        for i in nodes.indices where !crashed.contains(i) {
            let actions = nodes[i].tick(now: now)
            perform(actions, by: i)
        }
    }

    /// Steps until `time`, or until `stop` returns true (checked after every step).
    public mutating func run(until time: Duration, stop: ((SimulatedMesh) -> Bool)? = nil) {
        while now < time {
            step()
            if let stop, stop(self) { return }
        }
    }

    // MARK: - Observation

    /// Running nodes (other than the holder) whose map lists `holder` for `digest`.
    public func nodesKnowing(_ digest: Digest, heldBy holder: Int) -> Int {
        var count = 0
        for i in nodes.indices where i != holder && !crashed.contains(i) {
            if nodes[i].locality.holders(of: digest, now: now).contains(ids[holder]) { count += 1 }
        }
        return count
    }

    /// The status node `observer` has for node `subject`.
    public func status(of subject: Int, seenBy observer: Int) -> MemberStatus? {
        nodes[observer].membership.status(of: ids[subject])
    }

    private mutating func perform(_ actions: [MeshAction], by i: Int) {
        for action in actions {
            switch action {
            case .send(let message, let to):
                guard let j = index[to] else { continue }
                send(message, from: i, to: j)
            case .sendToAddress(let message, let address):
                guard let j = addressIndex[address] else { continue }
                send(message, from: i, to: j)
            case .memberChanged(let event):
                if recordEvents { events.append((now, i, event)) }
            case .rttMeasured:
                rttSamples += 1
            }
        }
    }

    private mutating func send(_ message: Message, from i: Int, to j: Int) {
        messagesSent[i] += 1
        let kind: String
        switch message {
        case .ping: kind = "ping"
        case .ack: kind = "ack"
        case .pingReq: kind = "pingReq"
        case .gossip: kind = "gossip"
        case .pushPull: kind = "pushPull"
        }
        sentKinds[kind, default: 0] += 1
        if configuration.countBytes {
            let size = (try? encoder.encode(Envelope(from: ids[i], message: message)).count) ?? 0
            bytesSent[i] += size
            if case .pushPull = message { pushPullBytesSent[i] += size }
        }
        if crashed.contains(i) || crashed.contains(j) || blocked.contains(Link(from: i, to: j)) { return }
        if configuration.lossRate > 0, Double.random(in: 0..<1, using: &rng) < configuration.lossRate { return }
        var delay = configuration.oneWayLatency
        if configuration.jitter > .zero {
            delay += configuration.jitter * Double.random(in: -1...1, using: &rng)
        }
        seq &+= 1
        queue.insert(Delivery(time: now + max(.zero, delay), seq: seq, from: i, to: j, message: message))
    }
}

/// The gossip convergence experiment: one node gains a digest in a converged mesh; how long until
/// 99% (and 100%) of the other nodes list it as a holder, and what the mesh sends meanwhile.
public enum GossipConvergence {
    public struct Result: Sendable, CustomStringConvertible {
        public var nodeCount: Int
        /// Gossip intervals from the gain until 99% of the other nodes knew (nil: not within the run):
        /// `ceil(time / gossipInterval)`. Node timers are not synchronised and facts also ride on
        /// pings and acks, so a fact can travel more than one hop per interval.
        public var roundsTo99: Int?
        public var timeTo99: Duration?
        public var roundsToAll: Int?
        /// All mesh traffic (probes, acks, ping-reqs, gossip, push-pull) in the measurement window.
        public var bytesPerNodePerSecond: Double
        /// The push-pull share of `bytesPerNodePerSecond`.
        public var pushPullBytesPerNodePerSecond: Double
        public var messagesPerNodePerSecond: Double
        /// `LocalityMap.approximateBytes / entryCount` for a map of `scaleDigests` digests with
        /// `scaleHoldersPerDigest` holders each (the per-(digest, holder) memory cost).
        public var bytesPerEntry: Double
        /// Encoded size of one locality fact on the wire (JSON).
        public var wireBytesPerLocalityUpdate: Int

        public var description: String {
            let r99 = roundsTo99.map(String.init) ?? "-"
            let rAll = roundsToAll.map(String.init) ?? "-"
            return "n=\(nodeCount) rounds99=\(r99) roundsAll=\(rAll) bytes/node/s=\(Int(bytesPerNodePerSecond)) (push-pull \(Int(pushPullBytesPerNodePerSecond))) msgs/node/s=\((messagesPerNodePerSecond * 10).rounded() / 10) bytes/entry=\(Int(bytesPerEntry)) wire/update=\(wireBytesPerLocalityUpdate)"
        }
    }

    public struct Parameters: Sendable {
        public var nodeCount: Int
        public var seed: UInt64 = 42
        /// Time before the gain (so probe and gossip phases are random and settled).
        public var warmUp: Duration = .seconds(3)
        /// Traffic is measured over this window starting at the gain.
        public var measureWindow: Duration = .seconds(10)
        /// Give up waiting for convergence after this long.
        public var maximumWait: Duration = .seconds(60)
        public var scaleDigests: Int = 10_000
        public var scaleHoldersPerDigest: Int = 3
        public var mesh: SimulatedMesh.Configuration

        public init(nodeCount: Int) {
            self.nodeCount = nodeCount
            self.mesh = SimulatedMesh.Configuration(nodeCount: nodeCount)
            self.mesh.seed = seed
        }
    }

    public static func run(_ parameters: Parameters) -> Result {
        var config = parameters.mesh
        config.nodeCount = parameters.nodeCount
        var mesh = SimulatedMesh(config)
        mesh.recordEvents = false
        mesh.run(until: parameters.warmUp)

        let digest = Digest(w0: 0xC0FFEE, w1: UInt64(parameters.nodeCount), w2: parameters.seed, w3: 1, size: 4096)
        let holder = 0
        let start = mesh.now
        let bytesBefore = mesh.bytesSent.reduce(0, +)
        let pushPullBefore = mesh.pushPullBytesSent.reduce(0, +)
        let messagesBefore = mesh.messagesSent.reduce(0, +)
        mesh.gained(digest, at: holder)

        let others = parameters.nodeCount - 1
        let need99 = Int((Double(others) * 0.99).rounded(.up))
        var t99: Duration?
        var tAll: Duration?
        let end = start + max(parameters.maximumWait, parameters.measureWindow)
        while mesh.now < end {
            mesh.step()
            if t99 == nil || tAll == nil {
                let knowing = mesh.nodesKnowing(digest, heldBy: holder)
                if t99 == nil, knowing >= need99 { t99 = mesh.now - start }
                if tAll == nil, knowing >= others { tAll = mesh.now - start }
            }
            if mesh.now >= start + parameters.measureWindow, t99 != nil, tAll != nil { break }
        }
        // Traffic is averaged over the whole span from the gain to the end (at least the window).
        let span = (mesh.now - start).seconds
        let n = Double(parameters.nodeCount)
        let bytes = Double(mesh.bytesSent.reduce(0, +) - bytesBefore)
        let pushPull = Double(mesh.pushPullBytesSent.reduce(0, +) - pushPullBefore)
        let messages = Double(mesh.messagesSent.reduce(0, +) - messagesBefore)
        let interval = config.membership.gossipInterval
        func rounds(_ t: Duration?) -> Int? {
            t.map { Int(($0 / interval).rounded(.up)) }
        }
        let update = LocalityUpdate(holder: mesh.ids[holder], digest: digest, present: true, version: 1, ageMs: 120)
        let wire = (try? JSONEncoder().encode(update).count) ?? 0
        return Result(
            nodeCount: parameters.nodeCount,
            roundsTo99: rounds(t99),
            timeTo99: t99,
            roundsToAll: rounds(tAll),
            bytesPerNodePerSecond: bytes / n / span,
            pushPullBytesPerNodePerSecond: pushPull / n / span,
            messagesPerNodePerSecond: messages / n / span,
            bytesPerEntry: bytesPerEntry(digests: parameters.scaleDigests, holdersPerDigest: parameters.scaleHoldersPerDigest),
            wireBytesPerLocalityUpdate: wire
        )
    }

    /// Fills a map with `digests × holdersPerDigest` entries and reports its approximate bytes per entry.
    public static func bytesPerEntry(digests: Int, holdersPerDigest: Int) -> Double {
        var map = LocalityMap(myself: NodeID(name: "self", uid: 0))
        let holders = (0..<holdersPerDigest).map { NodeID(name: "n\($0)", uid: UInt64($0) + 1) }
        var updates: [LocalityUpdate] = []
        updates.reserveCapacity(digests * holdersPerDigest)
        for d in 0..<digests {
            let digest = Digest(w0: SplitMix64.mix(UInt64(d)), w1: UInt64(d), w2: 0, w3: 0, size: 1024)
            for h in holders { updates.append(LocalityUpdate(holder: h, digest: digest, present: true, version: 1, ageMs: 0)) }
        }
        map.merge(updates, now: .seconds(1), rebroadcast: false)
        return map.entryCount == 0 ? 0 : Double(map.approximateBytes) / Double(map.entryCount)
    }
}

extension GossipConvergence {
    /// A Markdown table of results (for the benchmark report).
    public static func markdownTable(_ results: [Result]) -> String {
        var out = "| nodes | rounds to 99% | time to 99% | rounds to 100% | bytes/node/s (all) | of which push-pull | msgs/node/s | bytes per (digest, holder) |\n"
        out += "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        for r in results {
            let t99 = r.timeTo99.map { "\(Int(($0.seconds * 1000).rounded())) ms" } ?? "-"
            out += "| \(r.nodeCount) | \(r.roundsTo99.map(String.init) ?? "-") | \(t99) | \(r.roundsToAll.map(String.init) ?? "-") | "
            out += "\(Int(r.bytesPerNodePerSecond.rounded())) | \(Int(r.pushPullBytesPerNodePerSecond.rounded())) | "
            out += "\((r.messagesPerNodePerSecond * 10).rounded() / 10) | \(Int(r.bytesPerEntry.rounded())) |\n"
        }
        return out
    }
}
