/// Which node holds which digest, learned by gossip.
///
/// * Each (holder, digest) pair is a last-writer-wins register ordered by the holder's own
///   monotonically increasing `version` counter: `gained`/`lost` bump it, so a later fact always
///   replaces an earlier one wherever the two meet. `lost` facts are kept as tombstones until they
///   expire, so an old `present` fact relayed late cannot resurrect the entry.
/// * Deltas: `gained`/`lost` and every newly learned fact are queued for piggybacking on membership
///   messages, each transmitted at most `retransmitMultiplier × ceil(log10(n + 1))` times by each node
///   (epidemic spread, like membership updates).
/// * Anti-entropy: push-pull carries one page of this node's own holdings (`HoldingsPage`, 40
///   bytes per blob; successive push-pulls rotate through the whole store, re-asserting each blob
///   and refreshing its TTL) plus the freshest relayed facts, both bounded. Facts merged from
///   push-pull are not re-gossiped (that would flood the mesh every 30 s). A node that starts on
///   a full store loads it with `loadOwn` (no per-blob deltas) and announces it in pages.
/// * Ageing: a fact is dropped `ttl` after its holder asserted it (ages travel with the facts).
/// * Memory: at most `maxEntries` (digest, holder) entries; beyond that the oldest are evicted down to
///   `(1 − evictionSlack) × maxEntries`. `entryCount` and `approximateBytes` report usage. This node's
///   own holdings are kept separately (`ownCount`): they mirror the local store.
/// * A stale entry costs one wasted race leg, never a wrong answer; the map is never used to claim
///   that a blob exists.
public struct LocalityMap: Sendable {
    public struct Configuration: Sendable, Hashable {
        public var ttl: Duration = .seconds(600)
        public var maxEntries: Int = 1_000_000
        public var evictionSlack: Double = 0.1
        public var retransmitMultiplier: Int = 4
        /// Locality facts per piggybacked message.
        public var maxUpdatesPerMessage: Int = 64
        /// Own holdings per push-pull page (pages rotate through the store).
        public var holdingsPageSize: Int = 32_768
        /// Relayed facts per push-pull (freshest first).
        public var pushPullRelayLimit: Int = 4096
        /// How often `expire` sweeps the whole map.
        public var sweepInterval: Duration = .seconds(10)

        public init() {}
    }

    struct Holding: Sendable, Hashable {
        var holder: NodeID
        var present: Bool
        var version: UInt64
        var assertedAt: Duration
    }

    struct Key: Hashable, Sendable {
        var holder: NodeID
        var digest: Digest
    }

    struct Pending: Sendable {
        var holder: NodeID
        var digest: Digest
        var present: Bool
        var version: UInt64
        var assertedAt: Duration
    }

    public let configuration: Configuration
    public let myself: NodeID

    private var own: [Digest: UInt64] = [:]
    private var ownVersion: UInt64 = 0
    /// The own holdings being paged through (a snapshot taken when the previous rotation ended).
    private var pageSnapshot: [Digest] = []
    private var pageCursor = 0
    private var entries: [Digest: [Holding]] = [:]
    public private(set) var entryCount = 0
    private var broadcasts = BroadcastQueue<Key, Pending>()
    private var nextSweep: Duration = .zero
    /// Holders whose facts are refused (dead or left members).
    private var excluded: Set<NodeID> = []
    public private(set) var evictedCount = 0
    public private(set) var expiredCount = 0

    public init(myself: NodeID, configuration: Configuration = Configuration()) {
        self.myself = myself
        self.configuration = configuration
    }

    // MARK: - Local changes

    /// This node now holds `digest`.
    public mutating func gained(_ digest: Digest, now: Duration) {
        if own[digest] != nil { return }
        ownVersion += 1
        own[digest] = ownVersion
        broadcasts.enqueue(Pending(holder: myself, digest: digest, present: true, version: ownVersion, assertedAt: now),
                           for: Key(holder: myself, digest: digest))
    }

    /// This node holds all of `digests` already (a store found on disk at start): recorded without
    /// a delta per blob; push-pull pages announce them.
    public mutating func loadOwn(_ digests: [Digest]) {
        for d in digests where own[d] == nil {
            ownVersion += 1
            own[d] = ownVersion
        }
        pageCursor = pageSnapshot.count   // the next page starts a rotation that includes them
    }

    /// This node no longer holds `digest`.
    public mutating func lost(_ digest: Digest, now: Duration) {
        guard own.removeValue(forKey: digest) != nil else { return }
        ownVersion += 1
        broadcasts.enqueue(Pending(holder: myself, digest: digest, present: false, version: ownVersion, assertedAt: now),
                           for: Key(holder: myself, digest: digest))
    }

    public func holdsLocally(_ digest: Digest) -> Bool { own[digest] != nil }

    public var ownCount: Int { own.count }

    // MARK: - Queries

    /// Other nodes believed to hold `digest` (unexpired `present` facts), sorted by NodeID.
    public func holders(of digest: Digest, now: Duration) -> [NodeID] {
        guard let list = entries[digest] else { return [] }
        return list.filter { $0.present && $0.assertedAt + configuration.ttl > now }.map(\.holder).sorted()
    }

    /// Approximate heap bytes used by the map's entries (excluding own holdings): per entry the
    /// holding record, per digest the key, array header and hash-table slack.
    public var approximateBytes: Int {
        let perHolding = MemoryLayout<Holding>.stride
        let perDigest = (MemoryLayout<Digest>.stride + MemoryLayout<[Holding]>.stride) * 4 / 3 + 32
        return entryCount * perHolding + entries.count * perDigest
    }

    public var digestCount: Int { entries.count }

    public var pendingBroadcasts: Int { broadcasts.count }

    // MARK: - Membership coupling

    /// Drops every fact about `holder` and refuses new ones (a dead or left member).
    public mutating func removeHolder(_ holder: NodeID) {
        excluded.insert(holder)
        var emptied: [Digest] = []
        for (digest, list) in entries {
            if list.contains(where: { $0.holder == holder }) {
                let kept = list.filter { $0.holder != holder }
                entryCount -= list.count - kept.count
                if kept.isEmpty { emptied.append(digest) } else { entries[digest] = kept }
            }
        }
        for d in emptied { entries[d] = nil }
        broadcasts.removeAll { key, _ in key.holder == holder }
    }

    /// Accept facts about `holder` again (it rejoined as alive).
    public mutating func readmitHolder(_ holder: NodeID) {
        excluded.remove(holder)
    }

    // MARK: - Merging

    /// Merges received facts. Returns how many changed the map. Facts from gossip are re-gossiped
    /// when new (`rebroadcast`); facts from push-pull are not.
    @discardableResult
    public mutating func merge(_ updates: [LocalityUpdate], now: Duration, rebroadcast: Bool) -> Int {
        var changed = 0
        for u in updates {
            guard u.holder != myself, !excluded.contains(u.holder) else { continue }
            let assertedAt = now - .milliseconds(Int64(u.ageMs))
            guard assertedAt + configuration.ttl > now else { continue }
            var list = entries[u.digest] ?? []
            var isNew = false
            if let i = list.firstIndex(where: { $0.holder == u.holder }) {
                if u.version > list[i].version {
                    list[i] = Holding(holder: u.holder, present: u.present, version: u.version, assertedAt: assertedAt)
                    isNew = true
                } else if u.version == list[i].version, assertedAt > list[i].assertedAt {
                    list[i].assertedAt = assertedAt  // a refresh: extends the TTL, not re-gossiped
                } else {
                    continue
                }
            } else {
                list.append(Holding(holder: u.holder, present: u.present, version: u.version, assertedAt: assertedAt))
                entryCount += 1
                isNew = true
            }
            entries[u.digest] = list
            if isNew {
                changed += 1
                if rebroadcast {
                    broadcasts.enqueue(Pending(holder: u.holder, digest: u.digest, present: u.present, version: u.version, assertedAt: assertedAt),
                                       for: Key(holder: u.holder, digest: u.digest))
                }
            }
        }
        if entryCount > configuration.maxEntries { evictOldest() }
        return changed
    }

    /// Drops expired facts (a full sweep at most every `sweepInterval`; `holders` filters in between).
    public mutating func expire(now: Duration, force: Bool = false) {
        guard force || now >= nextSweep else { return }
        nextSweep = now + configuration.sweepInterval
        let cutoff = now - configuration.ttl
        var emptied: [Digest] = []
        var updates: [(Digest, [Holding])] = []
        for (digest, list) in entries where list.contains(where: { $0.assertedAt <= cutoff }) {
            let kept = list.filter { $0.assertedAt > cutoff }
            expiredCount += list.count - kept.count
            entryCount -= list.count - kept.count
            if kept.isEmpty { emptied.append(digest) } else { updates.append((digest, kept)) }
        }
        for d in emptied { entries[d] = nil }
        for (d, l) in updates { entries[d] = l }
    }

    private mutating func evictOldest() {
        let target = Int(Double(configuration.maxEntries) * (1 - configuration.evictionSlack))
        let toRemove = entryCount - target
        guard toRemove > 0 else { return }
        var all: [(Duration, Digest, NodeID)] = []
        all.reserveCapacity(entryCount)
        for (digest, list) in entries { for h in list { all.append((h.assertedAt, digest, h.holder)) } }
        all.sort { $0 < $1 }
        var victims: [Digest: Set<NodeID>] = [:]
        for (_, digest, holder) in all.prefix(toRemove) { victims[digest, default: []].insert(holder) }
        for (digest, holders) in victims {
            let list = entries[digest]!
            let kept = list.filter { !holders.contains($0.holder) }
            entryCount -= list.count - kept.count
            evictedCount += list.count - kept.count
            entries[digest] = kept.isEmpty ? nil : kept
        }
    }

    // MARK: - Wire

    /// Pending deltas for one outgoing message (counts one transmission each).
    public mutating func takeBroadcasts(now: Duration, clusterSize: Int) -> [LocalityUpdate] {
        let limit = BroadcastQueue<Key, Pending>.retransmitLimit(multiplier: configuration.retransmitMultiplier, clusterSize: clusterSize)
        return broadcasts.take(max: configuration.maxUpdatesPerMessage, limit: limit).map {
            LocalityUpdate(holder: $0.holder, digest: $0.digest, present: $0.present, version: $0.version,
                           ageMs: (now - $0.assertedAt).clampedMilliseconds)
        }
    }

    /// The next page of own holdings (nil when this node holds nothing). Pages rotate through a
    /// snapshot of the store taken when the previous rotation ended; blobs gained since are
    /// announced by their deltas and included in the next rotation.
    public mutating func nextHoldingsPage() -> HoldingsPage? {
        if pageCursor >= pageSnapshot.count {
            pageSnapshot = own.keys.sorted()
            pageCursor = 0
        }
        guard !pageSnapshot.isEmpty else { return nil }
        let size = max(1, configuration.holdingsPageSize)
        let end = min(pageCursor + size, pageSnapshot.count)
        let page = pageSnapshot[pageCursor..<end].filter { own[$0] != nil }
        let number = pageCursor / size
        pageCursor = end
        return HoldingsPage(version: ownVersion, page: number, pages: (pageSnapshot.count + size - 1) / size, digests: page)
    }

    /// Merges a holdings page from `holder` (its own store): each blob a `present` fact at the
    /// page's version. Not re-gossiped. Returns how many changed the map.
    @discardableResult
    public mutating func merge(_ page: HoldingsPage, from holder: NodeID, now: Duration) -> Int {
        guard let digests = page.digests() else { return 0 }
        return merge(digests.map { LocalityUpdate(holder: holder, digest: $0, present: true, version: page.version, ageMs: 0) },
                     now: now, rebroadcast: false)
    }

    /// Bounded relayed state for push-pull: the freshest relayed present facts.
    public func fullStateUpdates(now: Duration) -> [LocalityUpdate] {
        var out: [LocalityUpdate] = []
        var relayed: [(Digest, Holding)] = []
        let cutoff = now - configuration.ttl
        for (digest, list) in entries {
            for h in list where h.present && h.assertedAt > cutoff { relayed.append((digest, h)) }
        }
        relayed.sort { a, b in
            a.1.assertedAt != b.1.assertedAt ? a.1.assertedAt > b.1.assertedAt : (a.0, a.1.holder) < (b.0, b.1.holder)
        }
        for (digest, h) in relayed.prefix(configuration.pushPullRelayLimit) {
            out.append(LocalityUpdate(holder: h.holder, digest: digest, present: true, version: h.version,
                                      ageMs: (now - h.assertedAt).clampedMilliseconds))
        }
        return out
    }
}

extension LocalityMap: PiggybackProvider {
    public mutating func piggyback(into gossip: inout Gossip, now: Duration, clusterSize: Int) {
        gossip.locality = takeBroadcasts(now: now, clusterSize: clusterSize)
    }

    public mutating func fullState(into state: inout PushPullState, now: Duration) {
        state.locality = fullStateUpdates(now: now)
        state.holdings = nextHoldingsPage()
    }
}
