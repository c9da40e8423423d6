#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Which namespace an entry belongs to.
enum EntryKind: UInt8, Hashable, Sendable {
    case cas
    case ac
}

/// A SHA-256 in binary: four 64-bit words, most significant first (`w0` holds hex digits 0–15).
struct HashBytes: Hashable, Sendable {
    var w0: UInt64
    var w1: UInt64
    var w2: UInt64
    var w3: UInt64

    /// Parses 64 lowercase hex digits; nil for anything else.
    init?(hex bytes: UnsafeBufferPointer<UInt8>) {
        guard bytes.count == 64 else { return nil }
        var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        for w in 0..<4 {
            var v: UInt64 = 0
            for i in 0..<16 {
                let c = bytes[w * 16 + i]
                let d: UInt8
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = c &- UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = c &- UInt8(ascii: "a") &+ 10
                default: return nil
                }
                v = v << 4 | UInt64(d)
            }
            switch w {
            case 0: words.0 = v
            case 1: words.1 = v
            case 2: words.2 = v
            default: words.3 = v
            }
        }
        (w0, w1, w2, w3) = words
    }

    init?(hex: String) {
        var s = hex
        guard let parsed = s.withUTF8({ HashBytes(hex: $0) }) else { return nil }
        self = parsed
    }

    init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        (self.w0, self.w1, self.w2, self.w3) = (w0, w1, w2, w3)
    }

    /// The 64 lowercase hex digits.
    var hex: String {
        String(unsafeUninitializedCapacity: 64) { buffer in
            let digits: StaticString = "0123456789abcdef"
            digits.withUTF8Buffer { table in
                for (w, word) in [w0, w1, w2, w3].enumerated() {
                    for i in 0..<16 {
                        buffer[w * 16 + i] = table[Int((word >> UInt64(60 - 4 * i)) & 0xF)]
                    }
                }
            }
            return 64
        }
    }

    /// The first byte (the `XX` directory of the layout).
    var prefixByte: UInt8 { UInt8(truncatingIfNeeded: w0 >> 56) }
}

/// Identifies an entry: namespace + binary hash.
struct EntryKey: Hashable, Sendable {
    var kind: EntryKind
    var digest: HashBytes

    init(kind: EntryKind, digest: HashBytes) {
        self.kind = kind
        self.digest = digest
    }

    /// `hash` must be a validated 64-hex hash.
    init(kind: EntryKind, hash: String) {
        guard let d = HashBytes(hex: hash) else { preconditionFailure("EntryKey from an unvalidated hash") }
        self.init(kind: kind, digest: d)
    }

    var hash: String { digest.hex }
}

/// The in-memory index, built to hold ten million entries in well under a gigabyte.
///
/// Every entry is one 56-byte ``Slot`` in flat, paged storage (pages of 65,536 slots, allocated as
/// needed and never moved): the binary hash, size and kind, the LRU links and the hash-chain link as
/// 32-bit slot numbers, and the persisted mtime in seconds. Lookup is a chained hash table of
/// 32-bit slot numbers (2 to 4 bytes per entry: it doubles when the chains average two). Pins
/// (open readers, dedup uploads — a few hundred at most) live in a small side table. No
/// per-entry String, class or dictionary entry, so ~60 bytes per entry all told.
///
/// The LRU list runs from least (`head`) to most (`tail`) recently used. Entries found by the
/// background scan are inserted at the head, marked *unsorted*; ``sortUnsorted()`` orders that
/// prefix by mtime once the scan is done. Entries written or used meanwhile go to the tail as
/// usual, so the unsorted ones always form a prefix of the list.
final class LRUIndex: @unchecked Sendable {
    struct Slot {
        var w0: UInt64
        var w1: UInt64
        var w2: UInt64
        var w3: UInt64
        /// Size in the low 61 bits; flag bits above.
        var sizeFlags: UInt64
        var prev: Int32
        var next: Int32
        /// Next slot in the same hash bucket, or in the free list.
        var chain: Int32
        /// Seconds since the epoch last written to disk as the file's mtime.
        var mtime: UInt32
    }

    static let none = -1
    static let pageShift = 16
    static let pageSize = 1 << pageShift
    private static let sizeMask: UInt64 = (1 << 61) - 1
    private static let acFlag: UInt64 = 1 << 63
    private static let unsortedFlag: UInt64 = 1 << 62
    private static let freeFlag: UInt64 = 1 << 61

    private var pages: [UnsafeMutablePointer<Slot>] = []
    /// Slots ever handed out (live or free).
    private var highWater: Int32 = 0
    private var freeHead: Int32 = -1
    /// Bucket heads, slot + 1 (0 = empty), `bucketMask + 1` of them.
    private var buckets: UnsafeMutablePointer<Int32>
    private var bucketMask: Int
    private var pinCounts: [Int32: Int32] = [:]

    private(set) var count = 0
    /// Least recently used.
    private(set) var head = LRUIndex.none
    /// Most recently used.
    private(set) var tail = LRUIndex.none
    /// Entries inserted by ``insertUnsortedIfAbsent(_:size:persistedMtime:)`` not yet ordered or used.
    private(set) var unsortedCount = 0

    init() {
        bucketMask = 1023
        buckets = UnsafeMutablePointer<Int32>(OpaquePointer(calloc(bucketMask + 1, MemoryLayout<Int32>.stride)!))
    }

    deinit {
        for page in pages { page.deallocate() }
        free(buckets)
    }

    /// Bytes of memory the index has allocated (slot pages, bucket table, pin table).
    var allocatedBytes: Int {
        pages.count * LRUIndex.pageSize * MemoryLayout<Slot>.stride
            + (bucketMask + 1) * MemoryLayout<Int32>.stride
            + pages.capacity * MemoryLayout<UnsafeMutablePointer<Slot>>.stride
            + pinCounts.capacity * 16
    }

    @inline(__always)
    private func slotPointer(_ slot: Int32) -> UnsafeMutablePointer<Slot> {
        pages[Int(slot) >> LRUIndex.pageShift] + (Int(slot) & (LRUIndex.pageSize - 1))
    }

    @inline(__always)
    private func bucket(_ key: EntryKey) -> Int {
        Int(truncatingIfNeeded: (key.digest.w3 ^ (key.digest.w1 >> 7)) &+ UInt64(key.kind.rawValue)) & bucketMask
    }

    @inline(__always)
    private func matches(_ p: UnsafeMutablePointer<Slot>, _ key: EntryKey) -> Bool {
        p.pointee.w3 == key.digest.w3 && p.pointee.w0 == key.digest.w0 && p.pointee.w1 == key.digest.w1
            && p.pointee.w2 == key.digest.w2 && ((p.pointee.sizeFlags & LRUIndex.acFlag != 0) == (key.kind == .ac))
    }

    func lookup(_ key: EntryKey) -> Int? {
        var cursor = buckets[bucket(key)] - 1
        while cursor >= 0 {
            let p = slotPointer(cursor)
            if matches(p, key) { return Int(cursor) }
            cursor = p.pointee.chain
        }
        return nil
    }

    func key(_ slot: Int) -> EntryKey {
        let p = slotPointer(Int32(slot))
        return EntryKey(kind: p.pointee.sizeFlags & LRUIndex.acFlag != 0 ? .ac : .cas,
                        digest: HashBytes(w0: p.pointee.w0, w1: p.pointee.w1, w2: p.pointee.w2, w3: p.pointee.w3))
    }

    func size(_ slot: Int) -> Int64 { Int64(slotPointer(Int32(slot)).pointee.sizeFlags & LRUIndex.sizeMask) }
    func next(_ slot: Int) -> Int { Int(slotPointer(Int32(slot)).pointee.next) }
    func prev(_ slot: Int) -> Int { Int(slotPointer(Int32(slot)).pointee.prev) }
    func isUnsorted(_ slot: Int) -> Bool { slotPointer(Int32(slot)).pointee.sizeFlags & LRUIndex.unsortedFlag != 0 }

    func persistedMtime(_ slot: Int) -> Int64 { Int64(slotPointer(Int32(slot)).pointee.mtime) }
    func setPersistedMtime(_ slot: Int, _ seconds: Int64) {
        slotPointer(Int32(slot)).pointee.mtime = UInt32(clamping: seconds)
    }

    func pins(_ slot: Int) -> Int { Int(pinCounts[Int32(slot)] ?? 0) }

    /// Adds a pin; returns the new count.
    @discardableResult
    func pin(_ slot: Int) -> Int {
        let n = (pinCounts[Int32(slot)] ?? 0) + 1
        pinCounts[Int32(slot)] = n
        return Int(n)
    }

    /// Removes a pin; returns the new count.
    @discardableResult
    func unpin(_ slot: Int) -> Int {
        let n = (pinCounts[Int32(slot)] ?? 0) - 1
        precondition(n >= 0, "unbalanced unpin")
        pinCounts[Int32(slot)] = n == 0 ? nil : n
        return Int(n)
    }

    /// Inserts a new entry as most recently used. The key must not be present.
    @discardableResult
    func insert(_ key: EntryKey, size: Int64, persistedMtime: Int64) -> Int {
        let slot = allocate(key, size: size, persistedMtime: persistedMtime, unsorted: false)
        linkAtTail(slot)
        return Int(slot)
    }

    /// Inserts an entry found on disk before its place in the order is known: at the head (evicted
    /// first), marked unsorted until ``sortUnsorted()``. nil (and nothing changed) when the key is
    /// already present — written or looked up since the scan began. One hash-chain walk per entry:
    /// the startup scan calls this a million times a second.
    @discardableResult
    func insertUnsortedIfAbsent(_ key: EntryKey, size: Int64, persistedMtime: Int64) -> Int? {
        guard lookup(key) == nil else { return nil }
        let slot = allocate(key, size: size, persistedMtime: persistedMtime, unsorted: true, knownAbsent: true)
        linkAtHead(slot)
        unsortedCount += 1
        return Int(slot)
    }

    /// Marks an entry as most recently used.
    func touch(_ slot: Int) {
        clearUnsorted(Int32(slot))
        guard slot != tail else { return }
        unlink(Int32(slot))
        linkAtTail(Int32(slot))
    }

    /// Removes an entry; returns its key, size and pin count (its pins are dropped).
    @discardableResult
    func remove(_ slot: Int) -> (key: EntryKey, size: Int64, pins: Int) {
        let s = Int32(slot)
        let result = (key(slot), size(slot), pins(slot))
        clearUnsorted(s)
        unlink(s)
        // Out of its hash chain.
        let b = bucket(result.0)
        var previousInChain: Int32 = -1
        var cursor = buckets[b] - 1
        while cursor != s {
            precondition(cursor >= 0, "LRU index chain corrupt")
            previousInChain = cursor
            cursor = slotPointer(cursor).pointee.chain
        }
        let p = slotPointer(s)
        if previousInChain < 0 { buckets[b] = p.pointee.chain + 1 } else { slotPointer(previousInChain).pointee.chain = p.pointee.chain }
        // `chain` of a live slot is stored as a slot number (-1: end); bucket heads as slot + 1.
        p.pointee.sizeFlags = LRUIndex.freeFlag
        p.pointee.chain = freeHead
        freeHead = s
        pinCounts[s] = nil
        count -= 1
        return result
    }

    /// Orders the unsorted prefix (entries found by the scan and not used since) by persisted
    /// mtime, oldest first, and clears their marks. Takes 4 bytes per unsorted entry meanwhile.
    func sortUnsorted() {
        guard unsortedCount > 0 else { return }
        var slots: [Int32] = []
        slots.reserveCapacity(unsortedCount)
        var cursor = Int32(head)
        while cursor >= 0, slotPointer(cursor).pointee.sizeFlags & LRUIndex.unsortedFlag != 0 {
            slots.append(cursor)
            cursor = slotPointer(cursor).pointee.next
        }
        precondition(slots.count == unsortedCount, "unsorted entries are not a prefix of the LRU list")
        // Equal mtimes (one second holds many files) are ordered by hash, then kind: the order
        // depends on the files only, not on the order the scan's threads inserted them.
        slots.sort { a, b in
            let pa = slotPointer(a), pb = slotPointer(b)
            if pa.pointee.mtime != pb.pointee.mtime { return pa.pointee.mtime < pb.pointee.mtime }
            if pa.pointee.w0 != pb.pointee.w0 { return pa.pointee.w0 < pb.pointee.w0 }
            if pa.pointee.w1 != pb.pointee.w1 { return pa.pointee.w1 < pb.pointee.w1 }
            if pa.pointee.w2 != pb.pointee.w2 { return pa.pointee.w2 < pb.pointee.w2 }
            if pa.pointee.w3 != pb.pointee.w3 { return pa.pointee.w3 < pb.pointee.w3 }
            return pa.pointee.sizeFlags & LRUIndex.acFlag < pb.pointee.sizeFlags & LRUIndex.acFlag
        }
        // `cursor` is the first sorted entry (or none): rebuild the prefix in front of it.
        var previous: Int32 = -1
        for s in slots {
            let p = slotPointer(s)
            p.pointee.sizeFlags &= ~LRUIndex.unsortedFlag
            p.pointee.prev = previous
            if previous >= 0 { slotPointer(previous).pointee.next = s } else { head = Int(s) }
            previous = s
        }
        slotPointer(previous).pointee.next = cursor
        if cursor >= 0 { slotPointer(cursor).pointee.prev = previous } else { tail = Int(previous) }
        unsortedCount = 0
    }

    /// Slots from least to most recently used (for tests and diagnostics).
    func slotsInOrder() -> [Int] {
        var result: [Int] = []
        result.reserveCapacity(count)
        var cursor = head
        while cursor != LRUIndex.none {
            result.append(cursor)
            cursor = next(cursor)
        }
        return result
    }

    /// Visits the live slots from `start` on in storage order (slot numbers, which never move),
    /// calling `body` with each until it returns false. Returns the slot to continue from, or nil
    /// once the last slot was visited. A cursor over the whole index that allocates nothing: an
    /// entry live from the first call to the last is visited exactly once; one inserted meanwhile
    /// into a freed slot behind the cursor is not (it waits for the next walk).
    func forEachLiveSlot(from start: Int, _ body: (_ slot: Int, _ isAction: Bool) -> Bool) -> Int? {
        var s = Int32(clamping: max(0, start))
        while s < highWater {
            let flags = slotPointer(s).pointee.sizeFlags
            s += 1
            guard flags & LRUIndex.freeFlag == 0 else { continue }
            if !body(Int(s - 1), flags & LRUIndex.acFlag != 0) { return s < highWater ? Int(s) : nil }
        }
        return nil
    }

    /// The binary hash of a slot (no `EntryKey`).
    func words(_ slot: Int) -> (UInt64, UInt64, UInt64, UInt64) {
        let p = slotPointer(Int32(slot))
        return (p.pointee.w0, p.pointee.w1, p.pointee.w2, p.pointee.w3)
    }

    // MARK: Storage

    private func allocate(_ key: EntryKey, size: Int64, persistedMtime: Int64, unsorted: Bool, knownAbsent: Bool = false) -> Int32 {
        precondition(knownAbsent || lookup(key) == nil, "duplicate key in LRU index")
        precondition(size >= 0 && UInt64(size) <= LRUIndex.sizeMask, "entry size out of range")
        let slot: Int32
        if freeHead >= 0 {
            slot = freeHead
            freeHead = slotPointer(slot).pointee.chain
        } else {
            precondition(highWater < Int32.max, "LRU index full")
            if Int(highWater) >> LRUIndex.pageShift == pages.count {
                pages.append(UnsafeMutablePointer<Slot>.allocate(capacity: LRUIndex.pageSize))
            }
            slot = highWater
            highWater += 1
        }
        var flags = UInt64(size)
        if key.kind == .ac { flags |= LRUIndex.acFlag }
        if unsorted { flags |= LRUIndex.unsortedFlag }
        let b = bucket(key)
        slotPointer(slot).initialize(to: Slot(w0: key.digest.w0, w1: key.digest.w1, w2: key.digest.w2, w3: key.digest.w3,
                                              sizeFlags: flags, prev: -1, next: -1, chain: buckets[b] - 1,
                                              mtime: UInt32(clamping: persistedMtime)))
        buckets[b] = slot + 1
        count += 1
        if count > 2 * (bucketMask + 1) { grow() }
        return slot
    }

    /// Doubles the bucket table and rehashes the live slots (in storage order).
    private func grow() {
        let newMask = bucketMask * 2 + 1
        let newBuckets = UnsafeMutablePointer<Int32>(OpaquePointer(calloc(newMask + 1, MemoryLayout<Int32>.stride)!))
        free(buckets)
        buckets = newBuckets
        bucketMask = newMask
        for s in 0..<highWater {
            let p = slotPointer(s)
            guard p.pointee.sizeFlags & LRUIndex.freeFlag == 0 else { continue }
            let b = bucket(key(Int(s)))
            p.pointee.chain = buckets[b] - 1
            buckets[b] = s + 1
        }
    }

    private func clearUnsorted(_ slot: Int32) {
        let p = slotPointer(slot)
        if p.pointee.sizeFlags & LRUIndex.unsortedFlag != 0 {
            p.pointee.sizeFlags &= ~LRUIndex.unsortedFlag
            unsortedCount -= 1
        }
    }

    private func unlink(_ slot: Int32) {
        let p = slotPointer(slot)
        let prev = p.pointee.prev, next = p.pointee.next
        if prev >= 0 { slotPointer(prev).pointee.next = next } else { head = Int(next) }
        if next >= 0 { slotPointer(next).pointee.prev = prev } else { tail = Int(prev) }
        p.pointee.prev = -1
        p.pointee.next = -1
    }

    private func linkAtTail(_ slot: Int32) {
        let p = slotPointer(slot)
        p.pointee.prev = Int32(tail)
        p.pointee.next = -1
        if tail >= 0 { slotPointer(Int32(tail)).pointee.next = slot } else { head = Int(slot) }
        tail = Int(slot)
    }

    private func linkAtHead(_ slot: Int32) {
        let p = slotPointer(slot)
        p.pointee.next = Int32(head)
        p.pointee.prev = -1
        if head >= 0 { slotPointer(Int32(head)).pointee.prev = slot } else { tail = Int(slot) }
        head = Int(slot)
    }
}
