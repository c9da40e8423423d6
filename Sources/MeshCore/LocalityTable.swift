/// The locality map's storage: (digest, holder) facts in flat arrays, about 20–30 bytes per fact.
///
/// Why this shape (issue 12 asks ≤ 32 bytes per (digest, holder); a `[Digest: [Holding]]` took 88):
/// * A digest is keyed by its first 64 bits (`Digest.w0`), not its 40-byte value. Two digests that
///   share those bits share an entry; at a million digests that happens to about one pair in ten
///   million lookups and costs one wasted race leg (the fetch verifies every body against the full
///   hash; the map never claims that a blob exists). Holdings pages and deltas carry full digests.
/// * Holders are interned to a 15-bit index (`HolderTable` below); the `present` bit shares its word.
/// * Versions are kept as 32 bits and compared in serial-number arithmetic (RFC 1982): two versions
///   of one holder's fact about one digest are never 2^31 events apart while the fact lives.
/// * Times are milliseconds since `epoch`, 32 bits; `LocalityMap` rebases them every ~49 days.
///
/// Layout: an open-addressing index (linear probing, backward-shift deletion, seeded hashing so a
/// peer cannot choose colliding keys) maps a key to the head of a chain of entries — one entry per
/// holder of that digest — stored as parallel arrays (holder+present, version, stamp, next) that grow
/// by a quarter and are compacted when half of them are free. `allocatedBytes` counts capacities,
/// not elements, so the figure it reports is what the process actually holds.
struct LocalityTable: Sendable {
    static let none = UInt32.max

    // Index (one slot per digest key).
    private var slotKey: [UInt64] = []
    private var slotHead: [UInt32] = []
    private var slotUsed = 0
    private let seed: Int

    // Entries (parallel arrays; a free entry is on the free list through `next`).
    private(set) var holderBits: [UInt16] = []   // holder index << 1 | present
    private(set) var version: [UInt32] = []
    private(set) var stamp: [UInt32] = []
    private var next: [UInt32] = []
    private var freeHead = LocalityTable.none
    private(set) var count = 0

    init(seed: Int = Int.random(in: .min ... .max)) {
        self.seed = seed
    }

    var digestCount: Int { slotUsed }

    var allocatedBytes: Int {
        slotKey.capacity * 8 + slotHead.capacity * 4
            + holderBits.capacity * 2 + version.capacity * 4 + stamp.capacity * 4 + next.capacity * 4
    }

    // MARK: Index

    private func home(_ key: UInt64, slots: Int) -> Int {
        var h = Hasher()
        h.combine(seed)
        h.combine(key)
        let x = UInt64(bitPattern: Int64(h.finalize()))
        return Int(x.multipliedFullWidth(by: UInt64(slots)).high)
    }

    private func slot(of key: UInt64) -> Int? {
        let n = slotKey.count
        guard n > 0 else { return nil }
        var i = home(key, slots: n)
        while slotHead[i] != Self.none {
            if slotKey[i] == key { return i }
            i += 1
            if i == n { i = 0 }
        }
        return nil
    }

    /// Places `key` → `head` in a free slot (the key is not present).
    private mutating func placeKey(_ key: UInt64, head: UInt32) {
        let n = slotKey.count
        var i = home(key, slots: n)
        while slotHead[i] != Self.none {
            i += 1
            if i == n { i = 0 }
        }
        slotKey[i] = key
        slotHead[i] = head
        slotUsed += 1
    }

    private mutating func resizeIndex(to slots: Int) {
        let oldKeys = slotKey, oldHeads = slotHead
        slotKey = []
        slotHead = []
        slotUsed = 0
        guard slots > 0 else { return }
        slotKey.reserveCapacity(slots)
        slotHead.reserveCapacity(slots)
        slotKey.append(contentsOf: repeatElement(0, count: slots))
        slotHead.append(contentsOf: repeatElement(Self.none, count: slots))
        for i in oldKeys.indices where oldHeads[i] != Self.none { placeKey(oldKeys[i], head: oldHeads[i]) }
    }

    /// The index size for `used` keys: unchanged while between a quarter and three quarters full;
    /// otherwise grown by half (so a grown index is about half used) or shrunk to half full.
    private func fittedSlots(for used: Int, current n: Int) -> Int {
        if used == 0 { return 0 }
        if used * 4 > n * 3 { return max(8, n + n / 2, used * 3 / 2) }
        if n > 8, used * 4 <= n { return max(8, used * 2) }
        return n
    }

    private mutating func fitIndex(adding: Int) {
        let n = slotKey.count
        let want = fittedSlots(for: slotUsed + adding, current: n)
        if want != n { resizeIndex(to: want) }
    }

    // MARK: Entries

    /// The entry for (`key`, `holder`), if any.
    func find(_ key: UInt64, holder: UInt16) -> Int? {
        guard let s = slot(of: key) else { return nil }
        var e = slotHead[s]
        while e != Self.none {
            if holderBits[Int(e)] >> 1 == holder { return Int(e) }
            e = next[Int(e)]
        }
        return nil
    }

    /// Calls `body` with each entry of `key`.
    func forEach(of key: UInt64, _ body: (Int) -> Void) {
        guard let s = slot(of: key) else { return }
        var e = slotHead[s]
        while e != Self.none {
            body(Int(e))
            e = next[Int(e)]
        }
    }

    func holder(_ e: Int) -> UInt16 { holderBits[e] >> 1 }
    func isPresent(_ e: Int) -> Bool { holderBits[e] & 1 == 1 }

    mutating func set(_ e: Int, present: Bool, version v: UInt32, stamp s: UInt32) {
        holderBits[e] = holderBits[e] & ~1 | (present ? 1 : 0)
        version[e] = v
        stamp[e] = s
    }

    mutating func setStamp(_ e: Int, _ s: UInt32) { stamp[e] = s }

    /// Adds an entry (the caller checked that (`key`, `holder`) has none).
    mutating func insert(_ key: UInt64, holder: UInt16, present: Bool, version v: UInt32, stamp s: UInt32) {
        let bits = holder << 1 | (present ? 1 : 0)
        let e: UInt32
        if freeHead != Self.none {
            e = freeHead
            freeHead = next[Int(e)]
            holderBits[Int(e)] = bits
            version[Int(e)] = v
            stamp[Int(e)] = s
        } else {
            // Grow all four by a quarter before any is full (an append to a full array would double it).
            let room = min(holderBits.capacity, version.capacity, stamp.capacity, next.capacity)
            if holderBits.count == room {
                let grown = room + room / 4 + 16
                holderBits.reserveCapacity(grown)
                version.reserveCapacity(grown)
                stamp.reserveCapacity(grown)
                next.reserveCapacity(grown)
            }
            e = UInt32(holderBits.count)
            holderBits.append(bits)
            version.append(v)
            stamp.append(s)
            next.append(Self.none)
        }
        count += 1
        if let sl = slot(of: key) {
            next[Int(e)] = slotHead[sl]
            slotHead[sl] = e
        } else {
            fitIndex(adding: 1)
            next[Int(e)] = Self.none
            placeKey(key, head: e)
        }
    }

    /// One entry's fields, for predicates.
    struct Entry {
        var key: UInt64
        var holder: UInt16
        var present: Bool
        var version: UInt32
        var stamp: UInt32
    }

    private func entry(_ key: UInt64, _ e: Int) -> Entry {
        Entry(key: key, holder: holderBits[e] >> 1, present: holderBits[e] & 1 == 1, version: version[e], stamp: stamp[e])
    }

    /// Removes every entry for which `shouldRemove` holds; returns how many.
    @discardableResult
    mutating func removeAll(where shouldRemove: (Entry) -> Bool) -> Int {
        guard count > 0 else { return 0 }
        var removed = 0, emptied = 0
        for s in slotKey.indices where slotHead[s] != Self.none {
            let key = slotKey[s]
            var prev = Self.none
            var e = slotHead[s]
            while e != Self.none {
                let following = next[Int(e)]
                if shouldRemove(entry(key, Int(e))) {
                    if prev == Self.none { slotHead[s] = following } else { next[Int(prev)] = following }
                    next[Int(e)] = freeHead
                    freeHead = e
                    count -= 1
                    removed += 1
                } else {
                    prev = e
                }
                e = following
            }
            if slotHead[s] == Self.none { emptied += 1 }
        }
        if emptied > 0 {
            // Emptied slots break the probe runs behind them: rebuild the index (same cost as the pass).
            slotUsed -= emptied
            resizeIndex(to: fittedSlots(for: slotUsed, current: slotKey.count))
        }
        if removed > 0 { compactIfSparse() }
        return removed
    }

    /// Rebuilds the entries densely when at least half of the allocated ones are free, and fits the
    /// index to the digests left.
    private mutating func compactIfSparse() {
        if count == 0 {
            slotKey = []; slotHead = []; slotUsed = 0
            holderBits = []; version = []; stamp = []; next = []
            freeHead = Self.none
            return
        }
        fitIndex(adding: 0)
        guard holderBits.capacity >= 256, count * 2 <= holderBits.capacity else { return }
        var hb: [UInt16] = [], ve: [UInt32] = [], st: [UInt32] = [], nx: [UInt32] = []
        let cap = count + count / 4 + 16
        hb.reserveCapacity(cap); ve.reserveCapacity(cap); st.reserveCapacity(cap); nx.reserveCapacity(cap)
        for s in slotKey.indices where slotHead[s] != Self.none {
            var e = slotHead[s]
            var newHead = Self.none
            while e != Self.none {
                let i = Int(e)
                hb.append(holderBits[i]); ve.append(version[i]); st.append(stamp[i]); nx.append(newHead)
                newHead = UInt32(hb.count - 1)
                e = next[i]
            }
            slotHead[s] = newHead
        }
        holderBits = hb; version = ve; stamp = st; next = nx
        freeHead = Self.none
    }

    /// Every entry.
    func forEachEntry(_ body: (Entry) -> Void) {
        for s in slotKey.indices where slotHead[s] != Self.none {
            var e = slotHead[s]
            while e != Self.none {
                body(entry(slotKey[s], Int(e)))
                e = next[Int(e)]
            }
        }
    }

    /// Subtracts `delta` from every stamp (a rebase of the epoch); entries older than it go.
    @discardableResult
    mutating func rebase(by delta: UInt32) -> Int {
        let gone = removeAll { $0.stamp < delta }
        for i in stamp.indices { stamp[i] = stamp[i] >= delta ? stamp[i] - delta : 0 }   // free entries too: harmless
        return gone
    }
}

/// Interned holder names: a 15-bit index per `NodeID`, reused once a holder is dropped.
struct HolderTable: Sendable {
    static let capacity = 1 << 15
    private var ids: [NodeID?] = []
    private var index: [NodeID: UInt16] = [:]
    private var free: [UInt16] = []

    func lookup(_ id: NodeID) -> UInt16? { index[id] }

    func id(_ i: UInt16) -> NodeID { ids[Int(i)]! }

    /// The index of `id`, interning it if new (nil when 2^15 holders are interned at once).
    mutating func intern(_ id: NodeID) -> UInt16? {
        if let i = index[id] { return i }
        let i: UInt16
        if let f = free.popLast() {
            i = f
            ids[Int(i)] = id
        } else {
            guard ids.count < Self.capacity else { return nil }
            i = UInt16(ids.count)
            ids.append(id)
        }
        index[id] = i
        return i
    }

    mutating func release(_ id: NodeID) {
        guard let i = index.removeValue(forKey: id) else { return }
        ids[Int(i)] = nil
        free.append(i)
    }
}
