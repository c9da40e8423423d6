/// Something that rides on membership messages: the locality map piggybacks its deltas on every
/// gossip/ping/ack and adds its full state to push-pull exchanges.
public protocol PiggybackProvider {
    /// Add piggybacked items to an outgoing message. `clusterSize` = live members including self.
    mutating func piggyback(into gossip: inout Gossip, now: Duration, clusterSize: Int)
    /// Add full state to an outgoing push-pull.
    mutating func fullState(into state: inout PushPullState, now: Duration)
}

/// A provider that adds nothing.
public struct NoPiggyback: PiggybackProvider {
    public init() {}
    public mutating func piggyback(into gossip: inout Gossip, now: Duration, clusterSize: Int) {}
    public mutating func fullState(into state: inout PushPullState, now: Duration) {}
}

/// SWIM-family membership and failure detection as a pure state machine.
///
/// * Time: `now` is a `Duration` since an arbitrary epoch of a monotonic clock (see Core.swift).
///   Call `tick(now:)` often (every ≤ 50 ms is plenty with the LAN defaults); all timers are checked
///   there. Messages go to `receive(_:from:now:)`.
/// * Probing: every `probeInterval` the next member of a random permutation is pinged; without an ack
///   after `probeTimeout`, `indirectChecks` other members are asked to ping it (ping-req); without any
///   ack by the end of the probe interval it becomes suspect.
/// * Suspicion: a suspect is declared dead after
///   `suspicionMultiplier × max(1, log10(n)) × probeInterval` (memberlist's formula, n = live members),
///   unless it refutes by gossiping an alive update with a higher incarnation.
/// * Gossip: every `gossipInterval`, pending updates go to `gossipNodes` random live members; each
///   update is transmitted at most `retransmitMultiplier × ceil(log10(n + 1))` times by each node.
///   Updates also ride on pings and acks.
/// * Push-pull: every `pushPullInterval`, the full member list is exchanged with one random member.
/// * Leave: `leave(now:)` gossips `left` with a bumped incarnation; `left` beats `dead` at equal or
///   higher incarnation, so a leaver is never reported dead. Keep ticking for a few gossip intervals
///   after `leave` (the node still answers pings and gossips, but no longer probes).
/// * Recently dead members still get gossip for `gossipToTheDeadTime`, so a member declared dead by
///   mistake hears it and refutes.
/// * Not done (memberlist has them): Lifeguard's suspicion confirmations/awareness, nacks, a TCP
///   fallback ping.
public struct Membership: Sendable {
    public struct Configuration: Sendable, Hashable {
        public var probeInterval: Duration = .seconds(1)
        public var probeTimeout: Duration = .milliseconds(500)
        public var indirectChecks: Int = 3
        public var suspicionMultiplier: Int = 4
        public var retransmitMultiplier: Int = 4
        public var gossipInterval: Duration = .milliseconds(200)
        public var gossipNodes: Int = 3
        public var pushPullInterval: Duration = .seconds(30)
        /// At most this many member updates ride on one message.
        public var maxPiggybackedMembers: Int = 16
        /// Dead members keep receiving gossip this long, so a member wrongly declared dead hears
        /// it and refutes (memberlist's GossipToTheDeadTime).
        public var gossipToTheDeadTime: Duration = .seconds(30)
        /// Dead and left members are forgotten after this long.
        public var tombstoneRetention: Duration = .seconds(300)
        /// How many members `leave` notifies directly (in addition to normal gossip).
        public var leaveFanout: Int = 8
        /// Which nodes may be members (default: anyone; a node from a topology: its nodes).
        public var admission: Admission = .anyone
        /// Bounds on what a message may carry (see `Envelope.validate`).
        public var limits = GossipLimits()

        public init() {}

        /// hashicorp/memberlist's DefaultLANConfig values.
        public static let lan = Configuration()
    }

    public struct Member: Hashable, Sendable {
        public var node: NodeID
        public var metadata: NodeMetadata
        public var status: MemberStatus
        public var incarnation: UInt64
        public var statusChangedAt: Duration

        var update: MemberUpdate { MemberUpdate(node: node, incarnation: incarnation, status: status, metadata: metadata) }
    }

    struct PendingProbe: Sendable {
        var target: NodeID
        var seq: UInt64
        var startedAt: Duration
        var indirectSent: Bool
        var acked: Bool
    }

    struct Relay: Sendable {
        var origin: NodeID
        var originSeq: UInt64
        var deadline: Duration
    }

    public let configuration: Configuration
    public let myself: NodeID
    public private(set) var metadata: NodeMetadata
    public private(set) var incarnation: UInt64 = 0
    public private(set) var isLeaving = false
    /// Member updates dropped: about nodes that are not admitted (or with metadata not theirs).
    public private(set) var refusedUpdates = 0

    private var members: [NodeID: Member] = [:]
    private var rng: SplitMix64
    private var broadcasts = BroadcastQueue<NodeID, MemberUpdate>()
    private var probeOrder: [NodeID] = []
    private var probeIndex = 0
    private var pendingProbe: PendingProbe?
    private var relays: [UInt64: Relay] = [:]
    private var suspicionDeadlines: [NodeID: Duration] = [:]
    private var sequence: UInt64 = 0
    private var started = false
    private var nextProbeAt: Duration = .zero
    private var nextGossipAt: Duration = .zero
    private var nextPushPullAt: Duration = .zero
    private var nextTombstoneSweep: Duration = .zero
    /// Live members other than self, cached for random picks.
    private var liveCache: [NodeID] = []
    private var liveCacheValid = false

    /// - Parameters:
    ///   - initialMembers: members known from configuration (e.g. a topology that knows node uids),
    ///     added as given without events. Usually empty: join through `join(seeds:now:)`.
    ///   - seed: RNG seed (probe order, gossip targets, ping-req helpers).
    public init(
        myself: NodeID,
        metadata: NodeMetadata,
        configuration: Configuration = .lan,
        initialMembers: [MemberUpdate] = [],
        seed: UInt64
    ) {
        self.myself = myself
        self.metadata = metadata
        self.configuration = configuration
        self.rng = SplitMix64(seed: seed ^ myself.stableHash)
        members[myself] = Member(node: myself, metadata: metadata, status: .alive, incarnation: 0, statusChangedAt: .zero)
        for u in initialMembers where u.node != myself {
            members[u.node] = Member(node: u.node, metadata: u.metadata, status: u.status, incarnation: u.incarnation, statusChangedAt: .zero)
        }
    }

    // MARK: - Queries

    /// All known members including self and dead/left tombstones, sorted by NodeID.
    public var allMembers: [Member] { members.values.sorted { $0.node < $1.node } }

    public func member(_ node: NodeID) -> Member? { members[node] }

    public func status(of node: NodeID) -> MemberStatus? { members[node]?.status }

    /// Alive and suspect members, including self unless leaving.
    public var liveMembers: [NodeID] {
        members.values.filter { $0.status.isLive }.map(\.node).sorted()
    }

    /// Number of live members including self (the `n` of the scaling formulas).
    public var clusterSize: Int {
        var n = 0
        for m in members.values where m.status.isLive { n += 1 }
        return n
    }

    /// Current suspicion timeout for this cluster size.
    public var suspicionTimeout: Duration {
        let n = Double(Swift.max(1, clusterSize))
        let scale = Swift.max(1.0, log10Approx(n))
        let raw = configuration.probeInterval * (Double(configuration.suspicionMultiplier) * scale)
        // Whole milliseconds (keeps the arithmetic exact and the value readable).
        return .milliseconds(Int64((raw.seconds * 1000).rounded()))
    }

    public var retransmitLimit: Int {
        BroadcastQueue<NodeID, MemberUpdate>.retransmitLimit(multiplier: configuration.retransmitMultiplier, clusterSize: clusterSize)
    }

    public var pendingBroadcasts: Int { broadcasts.count }

    // MARK: - Entry points

    public mutating func tick(now: Duration) -> [MeshAction] {
        var none = NoPiggyback()
        return tick(now: now, piggyback: &none)
    }

    public mutating func tick<P: PiggybackProvider>(now: Duration, piggyback: inout P) -> [MeshAction] {
        var actions: [MeshAction] = []
        if !started {
            started = true
            // Random phases so that nodes started together do not tick in lockstep.
            nextProbeAt = now + configuration.probeInterval * Double.random(in: 0..<1, using: &rng)
            nextGossipAt = now + configuration.gossipInterval * Double.random(in: 0..<1, using: &rng)
            nextPushPullAt = now + configuration.pushPullInterval * Double.random(in: 0..<1, using: &rng)
            nextTombstoneSweep = now + configuration.tombstoneRetention
        }

        // 1. The probe in flight: indirect checks after the timeout, suspicion at the end of the interval.
        if var probe = pendingProbe {
            if probe.acked {
                pendingProbe = nil
            } else if now >= probe.startedAt + configuration.probeInterval {
                pendingProbe = nil
                if let m = members[probe.target], m.status == .alive {
                    suspect(probe.target, incarnation: m.incarnation, now: now, actions: &actions)
                }
            } else if !probe.indirectSent, now >= probe.startedAt + configuration.probeTimeout {
                probe.indirectSent = true
                pendingProbe = probe
                let helpers = randomLive(count: configuration.indirectChecks, excluding: probe.target)
                for helper in helpers {
                    var g = Gossip()
                    fillGossip(&g, now: now, piggyback: &piggyback)
                    actions.append(.send(.pingReq(seq: probe.seq, target: probe.target, gossip: g), to: helper))
                }
            }
        }

        // 2. Start the next probe.
        if now >= nextProbeAt {
            nextProbeAt = Swift.max(nextProbeAt + configuration.probeInterval, now)
            if nextProbeAt == now { nextProbeAt = now + configuration.probeInterval }
            if !isLeaving, pendingProbe == nil, let target = nextProbeTarget() {
                sequence &+= 1
                pendingProbe = PendingProbe(target: target, seq: sequence, startedAt: now, indirectSent: false, acked: false)
                var g = Gossip()
                fillGossip(&g, now: now, piggyback: &piggyback)
                actions.append(.send(.ping(seq: sequence, target: target, gossip: g), to: target))
            }
        }

        // 3. Suspicion timeouts.
        if !suspicionDeadlines.isEmpty {
            for (node, deadline) in suspicionDeadlines.sorted(by: { $0.key < $1.key }) where now >= deadline {
                suspicionDeadlines[node] = nil
                if var m = members[node], m.status == .suspect {
                    m.status = .dead
                    m.statusChangedAt = now
                    setMember(m, previous: .suspect, now: now, actions: &actions)
                }
            }
        }

        // 4. Expired relays.
        if !relays.isEmpty {
            relays = relays.filter { $0.value.deadline > now }
        }

        // 5. Gossip.
        if now >= nextGossipAt {
            nextGossipAt = Swift.max(nextGossipAt + configuration.gossipInterval, now)
            if nextGossipAt == now { nextGossipAt = now + configuration.gossipInterval }
            var pool = liveOthers()
            for m in members.values where m.status == .dead && now - m.statusChangedAt < configuration.gossipToTheDeadTime {
                pool.append(m.node)
            }
            if pool.count > liveCache.count { pool[liveCache.count...].sort() }
            for target in randomSample(pool, count: configuration.gossipNodes, using: &rng) {
                var g = Gossip()
                fillGossip(&g, now: now, piggyback: &piggyback)
                if g.isEmpty { break }
                actions.append(.send(.gossip(g), to: target))
            }
        }

        // 6. Push-pull anti-entropy.
        if now >= nextPushPullAt {
            nextPushPullAt = now + configuration.pushPullInterval
            if !isLeaving, let partner = randomLive(count: 1, excluding: nil).first {
                actions.append(.send(.pushPull(localState(now: now, piggyback: &piggyback), isReply: false), to: partner))
            }
        }

        // 7. Forget old tombstones.
        if now >= nextTombstoneSweep {
            nextTombstoneSweep = now + configuration.tombstoneRetention / 10
            let cutoff = now - configuration.tombstoneRetention
            let old = members.values.filter { !$0.status.isLive && $0.node != myself && $0.statusChangedAt <= cutoff }
            for m in old { members[m.node] = nil; broadcasts.remove(m.node) }
            if !old.isEmpty { liveCacheValid = false }
        }
        return actions
    }

    public mutating func receive(_ message: Message, from sender: NodeID, now: Duration) -> [MeshAction] {
        var none = NoPiggyback()
        return receive(message, from: sender, now: now, piggyback: &none)
    }

    /// Handles a membership message. Locality content is not touched here (see `MeshNode`).
    public mutating func receive<P: PiggybackProvider>(_ message: Message, from sender: NodeID, now: Duration, piggyback: inout P) -> [MeshAction] {
        var actions: [MeshAction] = []
        if let g = message.gossip {
            for u in g.members { apply(u, now: now, actions: &actions) }
        }
        switch message {
        case .ping(let seq, let target, _):
            guard target == myself else { break }
            var g = Gossip()
            fillGossip(&g, now: now, piggyback: &piggyback)
            actions.append(.send(.ack(seq: seq, gossip: g), to: sender))

        case .ack(let seq, _):
            if var probe = pendingProbe, probe.seq == seq, !probe.acked {
                probe.acked = true
                pendingProbe = probe
                if sender == probe.target {
                    actions.append(.rttMeasured(sender, now - probe.startedAt))
                }
            } else if let relay = relays.removeValue(forKey: seq) {
                var g = Gossip()
                fillGossip(&g, now: now, piggyback: &piggyback)
                actions.append(.send(.ack(seq: relay.originSeq, gossip: g), to: relay.origin))
            }

        case .pingReq(let seq, let target, _):
            guard target != myself else {
                // Asked to probe ourselves: just answer.
                var g = Gossip()
                fillGossip(&g, now: now, piggyback: &piggyback)
                actions.append(.send(.ack(seq: seq, gossip: g), to: sender))
                break
            }
            sequence &+= 1
            relays[sequence] = Relay(origin: sender, originSeq: seq, deadline: now + configuration.probeInterval)
            var g = Gossip()
            fillGossip(&g, now: now, piggyback: &piggyback)
            actions.append(.send(.ping(seq: sequence, target: target, gossip: g), to: target))

        case .gossip:
            break

        case .pushPull(let state, let isReply):
            // Full-state merge: every entry is treated like a gossiped update.
            for u in state.members { apply(u, now: now, actions: &actions) }
            if !isReply {
                actions.append(.send(.pushPull(localState(now: now, piggyback: &piggyback), isReply: true), to: sender))
            }
        }
        return actions
    }

    /// Join through seed addresses: a push-pull to each (the reply merges the seed's view).
    public mutating func join<P: PiggybackProvider>(seeds: [String], now: Duration, piggyback: inout P) -> [MeshAction] {
        seeds.map { .sendToAddress(.pushPull(localState(now: now, piggyback: &piggyback), isReply: false), address: $0) }
    }

    public mutating func join(seeds: [String], now: Duration) -> [MeshAction] {
        var none = NoPiggyback()
        return join(seeds: seeds, now: now, piggyback: &none)
    }

    /// Graceful leave: announce `left` (bumped incarnation) directly to a few members and through gossip.
    public mutating func leave(now: Duration) -> [MeshAction] {
        var none = NoPiggyback()
        return leave(now: now, piggyback: &none)
    }

    public mutating func leave<P: PiggybackProvider>(now: Duration, piggyback: inout P) -> [MeshAction] {
        var actions: [MeshAction] = []
        guard !isLeaving else { return actions }
        isLeaving = true
        incarnation = incarnation.incremented(upTo: configuration.limits.maxIncarnation)
        pendingProbe = nil
        var me = members[myself]!
        me.status = .left
        me.incarnation = incarnation
        me.statusChangedAt = now
        setMember(me, previous: .alive, now: now, actions: &actions)
        for target in randomLive(count: configuration.leaveFanout, excluding: nil) {
            var g = Gossip()
            fillGossip(&g, now: now, piggyback: &piggyback)
            actions.append(.send(.gossip(g), to: target))
        }
        return actions
    }

    /// Changes this node's metadata (gossiped with a bumped incarnation).
    public mutating func updateMetadata(_ newMetadata: NodeMetadata, now: Duration) -> [MeshAction] {
        var actions: [MeshAction] = []
        metadata = newMetadata
        incarnation = incarnation.incremented(upTo: configuration.limits.maxIncarnation)
        var me = members[myself]!
        me.metadata = newMetadata
        me.incarnation = incarnation
        setMember(me, previous: me.status, now: now, actions: &actions)
        return actions
    }

    // MARK: - Internals

    private mutating func fillGossip<P: PiggybackProvider>(_ g: inout Gossip, now: Duration, piggyback: inout P) {
        // Live members including self, from the cache (clusterSize iterates every member).
        let n = liveOthers().count + (members[myself]!.status.isLive ? 1 : 0)
        let limit = BroadcastQueue<NodeID, MemberUpdate>.retransmitLimit(multiplier: configuration.retransmitMultiplier, clusterSize: n)
        g.members = broadcasts.take(max: configuration.maxPiggybackedMembers, limit: limit)
        piggyback.piggyback(into: &g, now: now, clusterSize: n)
    }

    func localState<P: PiggybackProvider>(now: Duration, piggyback: inout P) -> PushPullState {
        var state = PushPullState(members: members.values.map(\.update).sorted { $0.node < $1.node })
        piggyback.fullState(into: &state, now: now)
        return state
    }

    private mutating func liveOthers() -> [NodeID] {
        if !liveCacheValid {
            liveCache = members.values.filter { $0.status.isLive && $0.node != myself }.map(\.node).sorted()
            liveCacheValid = true
        }
        return liveCache
    }

    private mutating func randomLive(count: Int, excluding: NodeID?) -> [NodeID] {
        var pool = liveOthers()
        if let excluding, let i = pool.firstIndex(of: excluding) { pool.remove(at: i) }
        return randomSample(pool, count: count, using: &rng)
    }

    private mutating func nextProbeTarget() -> NodeID? {
        for _ in 0..<2 {
            while probeIndex < probeOrder.count {
                let candidate = probeOrder[probeIndex]
                probeIndex += 1
                if candidate != myself, let m = members[candidate], m.status.isLive { return candidate }
            }
            // End of the permutation: a fresh random order.
            probeOrder = liveOthers()
            probeOrder.shuffle(using: &rng)
            probeIndex = 0
            if probeOrder.isEmpty { return nil }
        }
        return nil
    }

    private mutating func suspect(_ node: NodeID, incarnation inc: UInt64, now: Duration, actions: inout [MeshAction]) {
        guard var m = members[node], m.status == .alive else { return }
        let previous = m.status
        m.status = .suspect
        m.incarnation = Swift.max(m.incarnation, inc)
        m.statusChangedAt = now
        setMember(m, previous: previous, now: now, actions: &actions)
    }

    /// Stores a changed member, schedules its broadcast and reports the event.
    private mutating func setMember(_ m: Member, previous: MemberStatus?, now: Duration, actions: inout [MeshAction]) {
        members[m.node] = m
        liveCacheValid = false
        broadcasts.enqueue(m.update, for: m.node)
        if m.status == .suspect {
            if suspicionDeadlines[m.node] == nil { suspicionDeadlines[m.node] = now + suspicionTimeout }
        } else {
            suspicionDeadlines[m.node] = nil
        }
        if previous != m.status || previous == nil {
            actions.append(.memberChanged(MemberEvent(node: m.node, metadata: m.metadata, previous: previous, status: m.status, incarnation: m.incarnation)))
        }
        if m.node != myself, m.status.isLive, previous == nil || !(previous!.isLive) {
            // New live member: insert at a random position of the current probe order.
            let at = Int.random(in: probeIndex...probeOrder.count, using: &rng)
            probeOrder.insert(m.node, at: at)
        }
    }

    /// The SWIM merge rules for one update.
    private mutating func apply(_ u: MemberUpdate, now: Duration, actions: inout [MeshAction]) {
        guard configuration.admission.admits(u) else {
            refusedUpdates += 1
            return
        }
        if u.node == myself {
            // Refute anything that contradicts our own view, or an update with a newer incarnation
            // (only a forger issues ours, but the rest of the mesh believes it until refuted).
            // Saturating: a claim at the limit leaves us at the limit, never past it.
            let contradicts: Bool
            if isLeaving {
                contradicts = u.status != .left && u.incarnation >= incarnation
            } else {
                contradicts = u.status != .alive && u.incarnation >= incarnation
            }
            if contradicts || u.incarnation > incarnation {
                incarnation = Swift.max(incarnation, u.incarnation).incremented(upTo: configuration.limits.maxIncarnation)
                var me = members[myself]!
                me.incarnation = incarnation
                me.metadata = metadata
                setMember(me, previous: me.status, now: now, actions: &actions)
            }
            return
        }
        guard let current = members[u.node] else {
            // Unknown member: learn it only from alive/suspect facts (dead/left of strangers is noise).
            guard u.status.isLive else { return }
            let m = Member(node: u.node, metadata: u.metadata, status: u.status, incarnation: u.incarnation, statusChangedAt: now)
            setMember(m, previous: nil, now: now, actions: &actions)
            return
        }
        var accept = false
        switch u.status {
        case .alive:
            // Alive beats alive/suspect/dead only with a strictly newer incarnation; never beats left.
            accept = current.status != .left && u.incarnation > current.incarnation
        case .suspect:
            accept = (current.status == .alive && u.incarnation >= current.incarnation)
                || (current.status == .suspect && u.incarnation > current.incarnation)
        case .dead:
            accept = current.status.isLive && u.incarnation >= current.incarnation
        case .left:
            accept = current.status != .left && u.incarnation >= current.incarnation
        }
        guard accept else { return }
        let previous = current.status
        var m = current
        m.status = u.status
        m.incarnation = u.incarnation
        m.metadata = u.metadata
        if previous != u.status { m.statusChangedAt = now }
        setMember(m, previous: previous, now: now, actions: &actions)
    }
}
