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
///   a full store announces it in pages without per-blob deltas (`loadOwn`, or a `HoldingsProvider`
///   reading the store's index).
/// * Ageing: a fact is dropped `ttl` after its holder asserted it (ages travel with the facts).
/// * Memory: facts live in a `LocalityTable` (flat arrays, ~20–30 bytes per (digest, holder); digests
///   keyed by their first 64 bits — see there). At most `maxEntries` entries; beyond that the oldest
///   are evicted down to `(1 − evictionSlack) × maxEntries`. `entryCount` and `approximateBytes` (the
///   arrays' allocated capacity) report usage. Push-pull relays come from a fixed ring of the last
///   `pushPullRelayLimit` facts learned (full digests), not from the table. This node's own holdings
///   are kept separately (`ownCount`): by default in the map (simulations, tests), or — in a node —
///   read from the store's own index through a `HoldingsProvider` (`readHoldings(from:)`), so a
///   node with ten million blobs keeps no second copy of them.
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
    /// When set, own holdings come from here (the store's index) and `own`/`pageSnapshot` stay empty.
    private var provider: (any HoldingsProvider)?
    /// The provider's page number within the current rotation.
    private var providerPage = 0
    private var ownVersion: UInt64 = 0
    /// The own holdings being paged through (a snapshot taken when the previous rotation ended).
    private var pageSnapshot: [Digest] = []
    private var pageCursor = 0
    private var table = LocalityTable()
    private var holderIDs = HolderTable()
    /// Stamps are milliseconds after `epoch` (set at the first fact, rebased every ~49 days).
    private var epoch: Duration?
    /// The last facts learned, full digests, for push-pull relays (a ring).
    private var recent: [Pending] = []
    private var recentNext = 0
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

    /// Own holdings are read from `provider` from now on (the map keeps no copy of them): counts,
    /// `holdsLocally` and holdings pages come from it, and every `gained`/`lost` is announced (the
    /// store has already changed when it is called, so a repeated `gained` is not recognised: it
    /// re-announces the blob). Holdings recorded in the map before are dropped.
    public mutating func readHoldings(from provider: any HoldingsProvider) {
        self.provider = provider
        own = [:]
        pageSnapshot = []
        pageCursor = 0
        providerPage = 0
    }

    /// This node now holds `digest`.
    public mutating func gained(_ digest: Digest, now: Duration) {
        if provider == nil {
            if own[digest] != nil { return }
            own[digest] = ownVersion + 1
        }
        ownVersion += 1
        broadcasts.enqueue(Pending(holder: myself, digest: digest, present: true, version: ownVersion, assertedAt: now),
                           for: Key(holder: myself, digest: digest))
    }

    /// This node holds all of `digests` already (a store found on disk at start): recorded without
    /// a delta per blob; push-pull pages announce them.
    public mutating func loadOwn(_ digests: [Digest]) {
        guard provider == nil else { return }   // the provider holds them already
        for d in digests where own[d] == nil {
            ownVersion += 1
            own[d] = ownVersion
        }
        pageCursor = pageSnapshot.count   // the next page starts a rotation that includes them
    }

    /// This node no longer holds `digest`.
    public mutating func lost(_ digest: Digest, now: Duration) {
        if provider == nil {
            guard own.removeValue(forKey: digest) != nil else { return }
        }
        ownVersion += 1
        broadcasts.enqueue(Pending(holder: myself, digest: digest, present: false, version: ownVersion, assertedAt: now),
                           for: Key(holder: myself, digest: digest))
    }

    public func holdsLocally(_ digest: Digest) -> Bool { provider?.holds(digest) ?? (own[digest] != nil) }

    public var ownCount: Int { provider?.heldCount ?? own.count }

    // MARK: - Queries

    /// Other nodes believed to hold `digest` (unexpired `present` facts), sorted by NodeID. Matches
    /// on the digest's first 64 bits (see `LocalityTable`); the size is not compared.
    public func holders(of digest: Digest, now: Duration) -> [NodeID] {
        guard let epoch else { return [] }
        let live = Self.stamp(now - configuration.ttl, epoch: epoch)
        var out: [NodeID] = []
        table.forEach(of: digest.w0) { e in
            if table.isPresent(e), table.stamp[e] > live {
                out.append(holderIDs.id(table.holder(e)))
            }
        }
        return out.sorted()
    }

    public var entryCount: Int { table.count }

    /// Heap bytes the map's entries hold (the table's allocated capacity; own holdings and the
    /// fixed relay ring are not included).
    public var approximateBytes: Int { table.allocatedBytes }

    public var digestCount: Int { table.digestCount }

    public var pendingBroadcasts: Int { broadcasts.count }

    // MARK: - Membership coupling

    /// Drops every fact about `holder` and refuses new ones (a dead or left member).
    public mutating func removeHolder(_ holder: NodeID) {
        excluded.insert(holder)
        if let h = holderIDs.lookup(holder) {
            table.removeAll { $0.holder == h }
            holderIDs.release(holder)
        }
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
        let epoch = prepareEpoch(now: now)
        for u in updates {
            guard u.holder != myself, !excluded.contains(u.holder) else { continue }
            let assertedAt = now - .milliseconds(Int64(u.ageMs))
            guard assertedAt + configuration.ttl > now, let h = holderIDs.intern(u.holder) else { continue }
            let stamp = Self.stamp(assertedAt, epoch: epoch)
            let version = UInt32(truncatingIfNeeded: u.version)
            if let e = table.find(u.digest.w0, holder: h) {
                if Self.isNewer(version, than: table.version[e]) {
                    table.set(e, present: u.present, version: version, stamp: stamp)
                } else if version == table.version[e], stamp > table.stamp[e] {
                    table.setStamp(e, stamp)   // a refresh: extends the TTL, not re-gossiped
                    continue
                } else {
                    continue
                }
            } else {
                table.insert(u.digest.w0, holder: h, present: u.present, version: version, stamp: stamp)
            }
            changed += 1
            let fact = Pending(holder: u.holder, digest: u.digest, present: u.present, version: u.version, assertedAt: assertedAt)
            if rebroadcast { broadcasts.enqueue(fact, for: Key(holder: u.holder, digest: u.digest)) }
            if u.present { remember(fact) }
        }
        if table.count > configuration.maxEntries { evictOldest() }
        return changed
    }

    /// Drops expired facts (a full sweep at most every `sweepInterval`; `holders` filters in between).
    public mutating func expire(now: Duration, force: Bool = false) {
        guard force || now >= nextSweep else { return }
        nextSweep = now + configuration.sweepInterval
        guard let epoch else { return }
        let cutoff = now - configuration.ttl
        guard cutoff >= epoch else { return }
        let limit = Self.stamp(cutoff, epoch: epoch)
        expiredCount += table.removeAll { $0.stamp <= limit }
    }

    private mutating func evictOldest() {
        let target = Int(Double(configuration.maxEntries) * (1 - configuration.evictionSlack))
        var toRemove = table.count - target
        guard toRemove > 0 else { return }
        var live: [UInt32] = []
        live.reserveCapacity(table.count)
        table.forEachEntry { live.append($0.stamp) }
        live.sort()
        let cutoff = live[toRemove - 1]
        let below = table.removeAll { $0.stamp < cutoff }
        toRemove -= below
        let atCutoff = toRemove > 0 ? table.removeAll {
            guard toRemove > 0, $0.stamp == cutoff else { return false }
            toRemove -= 1
            return true
        } : 0
        evictedCount += below + atCutoff
    }

    // MARK: - Time and versions

    /// The epoch, set on first use so every live stamp is ≥ 0, and moved forward (stamps rebased)
    /// before milliseconds since it would overflow 32 bits.
    private mutating func prepareEpoch(now: Duration) -> Duration {
        guard let e = epoch else {
            let e = now - configuration.ttl - .seconds(1)
            epoch = e
            return e
        }
        if (now - e) > .milliseconds(Int64(UInt32.max) - 3_600_000) {
            let moved = now - configuration.ttl - .seconds(1)
            if moved - e >= .milliseconds(Int64(UInt32.max)) {
                expiredCount += table.removeAll { _ in true }   // all of it expired long ago
                epoch = moved
            } else {
                let delta = (moved - e).clampedMilliseconds
                expiredCount += table.rebase(by: delta)
                epoch = e + .milliseconds(Int64(delta))
            }
            return epoch!
        }
        return e
    }

    static func stamp(_ t: Duration, epoch: Duration) -> UInt32 {
        t <= epoch ? 0 : UInt32(clamping: (t - epoch).clampedMilliseconds)
    }

    /// Serial-number comparison (RFC 1982) of 32-bit versions.
    static func isNewer(_ a: UInt32, than b: UInt32) -> Bool { Int32(bitPattern: a &- b) > 0 }

    private mutating func remember(_ fact: Pending) {
        let limit = configuration.pushPullRelayLimit
        guard limit > 0 else { return }
        if recent.count < limit {
            recent.append(fact)
        } else {
            recent[recentNext] = fact
        }
        recentNext = (recentNext + 1) % limit
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
        if let provider { return nextProvidedPage(provider) }
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

    /// A page from the provider: a rotation walks its cursor from 0 to the end, then starts over.
    /// Blobs gained during a rotation are announced by their deltas, and paged in this rotation or
    /// the next.
    private mutating func nextProvidedPage(_ provider: any HoldingsProvider) -> HoldingsPage? {
        let size = max(1, configuration.holdingsPageSize)
        var (digests, next) = provider.holdingsPage(from: pageCursor, limit: size)
        if digests.isEmpty && pageCursor != 0 {   // the rest of the rotation was empty: start over
            pageCursor = 0
            providerPage = 0
            (digests, next) = provider.holdingsPage(from: 0, limit: size)
        }
        guard !digests.isEmpty else { return nil }
        let number = providerPage
        if let next {
            pageCursor = next
            providerPage += 1
        } else {
            pageCursor = 0
            providerPage = 0
        }
        let pages = max(number + 1, (provider.heldCount + size - 1) / size)
        return HoldingsPage(version: ownVersion, page: number, pages: pages, digests: digests)
    }

    /// Merges a holdings page from `holder` (its own store): each blob a `present` fact at the
    /// page's version. Not re-gossiped. Returns how many changed the map.
    @discardableResult
    public mutating func merge(_ page: HoldingsPage, from holder: NodeID, now: Duration) -> Int {
        guard let digests = page.digests() else { return 0 }
        return merge(digests.map { LocalityUpdate(holder: holder, digest: $0, present: true, version: page.version, ageMs: 0) },
                     now: now, rebroadcast: false)
    }

    /// Bounded relayed state for push-pull: the freshest relayed present facts that still hold,
    /// from the ring of facts learned last.
    public func fullStateUpdates(now: Duration) -> [LocalityUpdate] {
        guard let epoch else { return [] }
        let live = Self.stamp(now - configuration.ttl, epoch: epoch)
        var seen: Set<Key> = []
        var relayed: [(Pending, UInt32)] = []
        for fact in recent {
            guard !excluded.contains(fact.holder), let h = holderIDs.lookup(fact.holder),
                  let e = table.find(fact.digest.w0, holder: h), table.isPresent(e),
                  table.version[e] == UInt32(truncatingIfNeeded: fact.version), table.stamp[e] > live,
                  seen.insert(Key(holder: fact.holder, digest: fact.digest)).inserted else { continue }
            relayed.append((fact, table.stamp[e]))
        }
        relayed.sort { a, b in
            a.1 != b.1 ? a.1 > b.1 : (a.0.digest, a.0.holder) < (b.0.digest, b.0.holder)
        }
        return relayed.prefix(configuration.pushPullRelayLimit).map { fact, stamp in
            LocalityUpdate(holder: fact.holder, digest: fact.digest, present: true, version: fact.version,
                           ageMs: (now - (epoch + .milliseconds(Int64(stamp)))).clampedMilliseconds)
        }
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

/// Where a node's own holdings live when the locality map does not keep them (`LocalityMap.readHoldings`):
/// the store's index, read a page at a time. Called under the mesh core's lock, so it must be
/// quick (one page) and must never call back into the mesh.
public protocol HoldingsProvider: Sendable {
    /// Blobs held now.
    var heldCount: Int { get }
    /// Whether `digest` is held (by hash).
    func holds(_ digest: Digest) -> Bool
    /// Up to `limit` held blobs from `cursor` on (0 starts a walk) and the cursor to continue from
    /// (nil: the walk reached the end). Every blob held for a whole walk appears in it exactly once.
    func holdingsPage(from cursor: Int, limit: Int) -> (digests: [Digest], next: Int?)
}
