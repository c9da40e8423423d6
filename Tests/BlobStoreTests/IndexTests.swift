import Foundation
import Testing
@testable import BlobStore

/// A deterministic generator (tests must be reproducible).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private func key(_ n: UInt64, _ kind: EntryKind = .cas) -> EntryKey {
    var g = SplitMix64(state: n)
    return EntryKey(kind: kind, digest: HashBytes(w0: g.next(), w1: g.next(), w2: g.next(), w3: g.next()))
}

@Suite struct CompactIndexTests {
    @Test func slotIsFiftySixBytes() {
        #expect(MemoryLayout<LRUIndex.Slot>.stride == 56)
    }

    @Test func hexRoundTrip() throws {
        let hex = "00ff10aa" + String(repeating: "0123456789abcdef", count: 3) + "deadbeef"
        let d = try #require(HashBytes(hex: hex))
        #expect(d.hex == hex)
        #expect(d.prefixByte == 0)
        #expect(HashBytes(hex: String(hex.dropLast()) + "G") == nil)
        #expect(HashBytes(hex: String(hex.dropLast())) == nil)
        #expect(EntryKey(kind: .cas, hash: Digest.emptyHash).hash == Digest.emptyHash)
    }

    @Test func insertLookupRemoveAndOrder() {
        let index = LRUIndex()
        let a = index.insert(key(1), size: 10, persistedMtime: 100)
        let b = index.insert(key(2), size: 20, persistedMtime: 200)
        let c = index.insert(key(2, .ac), size: 30, persistedMtime: 300)   // same hash, other namespace
        #expect(index.count == 3)
        #expect(index.lookup(key(1)) == a && index.lookup(key(2)) == b && index.lookup(key(2, .ac)) == c)
        #expect(index.key(c) == key(2, .ac) && index.size(c) == 30 && index.persistedMtime(c) == 300)
        #expect(index.slotsInOrder() == [a, b, c])
        index.touch(a)
        #expect(index.slotsInOrder() == [b, c, a])
        #expect(index.head == b && index.tail == a)
        let removed = index.remove(c)
        #expect(removed.key == key(2, .ac) && removed.size == 30)
        #expect(index.lookup(key(2, .ac)) == nil && index.lookup(key(2)) == b)
        #expect(index.slotsInOrder() == [b, a])
        // The freed slot is reused.
        let d = index.insert(key(4), size: 40, persistedMtime: 0)
        #expect(d == c)
        #expect(index.slotsInOrder() == [b, a, d])
    }

    @Test func pinsAreCountedPerSlotAndDroppedOnRemove() {
        let index = LRUIndex()
        let a = index.insert(key(1), size: 10, persistedMtime: 0)
        #expect(index.pins(a) == 0)
        #expect(index.pin(a) == 1 && index.pin(a) == 2)
        #expect(index.unpin(a) == 1)
        #expect(index.remove(a).pins == 1)
        let b = index.insert(key(2), size: 10, persistedMtime: 0)
        #expect(b == a && index.pins(b) == 0)   // a reused slot starts unpinned
    }

    /// Random inserts, removes and touches against a plain model (dictionary + ordered list),
    /// through several growths of the bucket table and many slot reuses.
    @Test func matchesAModelUnderRandomOperations() {
        let index = LRUIndex()
        var rng = SplitMix64(state: 42)
        var order: [UInt64] = []          // model: LRU order of key numbers
        var sizes: [UInt64: Int64] = [:]
        var slots: [UInt64: Int] = [:]
        for step in 0..<30_000 {
            let r = rng.next() % 10
            if r < 5 || order.isEmpty {
                let n = rng.next() % 6_000
                if sizes[n] == nil {
                    let size = Int64(rng.next() % 1_000_000)
                    slots[n] = index.insert(key(n), size: size, persistedMtime: Int64(step))
                    sizes[n] = size
                    order.append(n)
                }
            } else if r < 8 {
                let n = order[Int(rng.next() % UInt64(order.count))]
                let removed = index.remove(slots[n]!)
                #expect(removed.key == key(n) && removed.size == sizes[n])
                order.removeAll { $0 == n }
                sizes[n] = nil
                slots[n] = nil
            } else {
                let n = order[Int(rng.next() % UInt64(order.count))]
                index.touch(slots[n]!)
                order.removeAll { $0 == n }
                order.append(n)
            }
        }
        #expect(index.count == order.count)
        #expect(index.slotsInOrder().map { index.key($0) } == order.map { key($0) })
        for n in UInt64(0)..<6_000 {
            let found = index.lookup(key(n))
            if let size = sizes[n] {
                #expect(found == slots[n] && index.size(found!) == size)
            } else if found != nil {
                Issue.record("key \(n) found after removal")
            }
        }
    }

    @Test func theScanDoesNotInsertWhatIsAlreadyIndexed() {
        let index = LRUIndex()
        // Written while the scan ran, then found on disk by the scan: kept as written.
        let w = index.insert(key(7), size: 5, persistedMtime: 50)
        #expect(index.insertUnsortedIfAbsent(key(7), size: 9, persistedMtime: 10) == nil)
        #expect(index.count == 1 && index.unsortedCount == 0 && index.size(w) == 5)
        #expect(index.insertUnsortedIfAbsent(key(8), size: 9, persistedMtime: 10) != nil)
        #expect(index.count == 2 && index.unsortedCount == 1)
    }

    @Test func unsortedEntriesAreOrderedByMtimeAfterTheScan() {
        let index = LRUIndex()
        // The scan finds 1 (mtime 30), 2 (10), 3 (20); meanwhile 4 is written and 2 is used.
        let s1 = index.insertUnsortedIfAbsent(key(1), size: 1, persistedMtime: 30)!
        let s2 = index.insertUnsortedIfAbsent(key(2), size: 1, persistedMtime: 10)!
        let w4 = index.insert(key(4), size: 1, persistedMtime: 50)
        let s3 = index.insertUnsortedIfAbsent(key(3), size: 1, persistedMtime: 20)!
        #expect(index.unsortedCount == 3)
        index.touch(s2)
        #expect(index.unsortedCount == 2 && !index.isUnsorted(s2) && index.isUnsorted(s1))
        index.sortUnsorted()
        #expect(index.unsortedCount == 0)
        // Unused scanned entries oldest first, then what was written or used, in that order.
        #expect(index.slotsInOrder() == [s3, s1, w4, s2])
        #expect(index.head == s3 && index.tail == s2)
        // Removing one of them keeps the list whole.
        index.remove(s1)
        #expect(index.slotsInOrder() == [s3, w4, s2])
    }

    @Test func sortWithNothingButScannedEntries() {
        let index = LRUIndex()
        let slots = (0..<100).map { index.insertUnsortedIfAbsent(key(UInt64($0)), size: 1, persistedMtime: Int64(1000 - $0))! }
        index.sortUnsorted()
        #expect(index.slotsInOrder() == slots.reversed())
        #expect(index.tail == slots[0])
    }

    /// The memory budget: at most 64 bytes per entry (slot pages, bucket table, pins) with a
    /// million entries — 10 million therefore fit in 640 MB.
    @Test func aMillionEntriesTakeAtMost64BytesEach() {
        let index = LRUIndex()
        let n = 1_000_000
        for i in 0..<n { index.insertUnsortedIfAbsent(key(UInt64(i)), size: Int64(i), persistedMtime: Int64(i % 977)) }
        for i in 0..<100 { index.pin(i) }
        let perEntry = Double(index.allocatedBytes) / Double(n)
        print("compact index: \(index.allocatedBytes) bytes for \(n) entries = \(String(format: "%.1f", perEntry)) bytes/entry")
        #expect(perEntry <= 64)
        index.sortUnsorted()
        #expect(index.count == n)
        #expect(index.lookup(key(123_456)).map { index.size($0) } == 123_456)
    }
}

/// The cursor walk the mesh pages this node's holdings and anti-entropy through (`blobPage`):
/// no list of the whole store, no String per blob.
@Suite struct HoldingsWalkTests {
    @Test("a cursor walk visits every entry live from its first page to its last exactly once, whatever is removed or added meanwhile")
    func walkSurvivesChurn() {
        let index = LRUIndex()
        var live: [Int: EntryKey] = [:]
        for i in 0..<5000 { live[index.insert(key(UInt64(i), i % 10 == 0 ? .ac : .cas), size: Int64(i), persistedMtime: 0)] = key(UInt64(i), i % 10 == 0 ? .ac : .cas) }
        let stable = Set(live.filter { $0.key % 3 != 0 }.map(\.value))   // never touched below
        var g = SplitMix64(state: 42)
        var seen: [EntryKey] = []
        var cursor: Int? = 0
        var added = 5000
        while let c = cursor {
            var n = 0
            cursor = index.forEachLiveSlot(from: c) { slot, isAction in
                #expect(isAction == (index.key(slot).kind == .ac))
                seen.append(index.key(slot))
                n += 1
                return n < 97
            }
            // Churn between pages: remove some of the slots ≡ 0 mod 3, add new entries (reusing freed slots).
            for _ in 0..<20 {
                let victims = live.keys.filter { $0 % 3 == 0 }
                if let v = victims.randomElement(using: &g) {
                    index.remove(v)
                    live[v] = nil
                }
                let k = key(UInt64(added))
                added += 1
                live[index.insert(k, size: 1, persistedMtime: 0)] = k
            }
        }
        #expect(Set(seen).isSuperset(of: stable))
        #expect(seen.count == Set(seen).count, "an entry was visited twice")
        // A walk with nothing changing visits exactly the live entries.
        var all: [EntryKey] = []
        _ = index.forEachLiveSlot(from: 0) { slot, _ in all.append(index.key(slot)); return true }
        #expect(Set(all) == Set(live.values) && all.count == live.count)
    }

    @Test("BlobStore.blobPage walks the CAS blobs (not the action cache) in pages, binary digests that match the hashes")
    func storePages() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 30)
            await store.waitUntilIndexed()
            var hashes: Set<String> = []
            for i in 0..<250 {
                let b = blob(UInt64(i), size: 100 + i)
                hashes.insert(hashOf(b))
                _ = try await store.put(bytes: b, hash: hashOf(b))
                if i % 25 == 0 { try await store.putAction(key: hashOf(blob(UInt64(i) + 10_000, size: 8)), value: [1, 2, 3]) }
            }
            #expect(store.blobCount == 250)
            var seen: [Digest] = []
            var cursor: Int? = 0
            var pages = 0
            while let c = cursor {
                let (page, next) = store.blobPage(from: c, limit: 16)
                #expect(page.count <= 16)
                seen += page
                cursor = next
                pages += 1
            }
            #expect(Set(seen.map(\.hash)) == hashes && seen.count == 250)
            #expect(pages >= 16)
            for r in seen.prefix(20) {
                #expect(store.size(of: r.hash) == r.size)
                #expect(store.holdsBlob(w0: r.w0, w1: r.w1, w2: r.w2, w3: r.w3))
            }
            #expect(!store.holdsBlob(w0: 1, w1: 2, w2: 3, w3: 4))
        }
    }
}
