import Testing
@testable import BlobStore

@Suite struct MappedReadTests {
    @Test func mappedBytesMatchTheFileAndHonourTheRange() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 8 << 20) { $0.mapMinimumBytes = 4096 }
            let data = blob(90, size: 100_000)
            let hash = hashOf(data)
            try await store.put(bytes: data, hash: hash)
            let r = try await store.openRead(hash: hash, offset: 5_000, limit: 20_000)
            // Chunks are bounded by `max` and by the reader's range, positions are absolute.
            let first = try #require(r.mappedBytes(at: 5_000, max: 12_000))
            #expect(Array(first) == Array(data[5_000..<17_000]))
            let tail = try #require(r.mappedBytes(at: 17_000, max: 1 << 20))
            #expect(Array(tail) == Array(data[17_000..<25_000]))
            #expect(r.mappedBytes(at: 25_000, max: 10) == nil)
            #expect(r.mappedBytes(at: 4_999, max: 10) == nil)
            #expect(store.stats.bytesOut == 20_000)
            r.close()
            #expect(r.mappedBytes(at: 5_000, max: 10) == nil)
            #expect(store.stats.activeReads == 0 && store.stats.pinnedBytes == 0)
        }
    }

    @Test func smallBlobsAreNotMapped() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 8 << 20) { $0.mapMinimumBytes = 1 << 20 }
            let data = blob(91, size: 4096)
            try await store.put(bytes: data, hash: hashOf(data))
            let r = try await store.openRead(hash: hashOf(data))
            defer { r.close() }
            #expect(r.mappedBytes(at: 0, max: 4096) == nil)
            // The pread path still works.
            #expect(try r.readAll() == data)
        }
    }

    @Test func readersShareOneCachedMappingUntilTheBlobIsEvicted() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 300_000) { $0.mapMinimumBytes = 4096 }
            let a = blob(92, size: 200_000)
            try await store.put(bytes: a, hash: hashOf(a))
            let r1 = try await store.openRead(hash: hashOf(a))
            let r2 = try await store.openRead(hash: hashOf(a), offset: 100)
            let p1 = try #require(r1.mappedBytes(at: 100, max: 10))
            let p2 = try #require(r2.mappedBytes(at: 100, max: 10))
            #expect(p1.baseAddress == p2.baseAddress)
            r1.close()
            r2.close()
            // Kept mapped for the next reader…
            #expect(store.mappedBlobCount == 1)
            // …until the blob leaves the store.
            let b = blob(93, size: 200_000)
            try await store.put(bytes: b, hash: hashOf(b))  // evicts a
            #expect(!dir.exists(dir.casPath(hashOf(a))))
            #expect(store.mappedBlobCount == 0)
            let r3 = try await store.openRead(hash: hashOf(b))
            defer { r3.close() }
            #expect(Array(try #require(r3.mappedBytes(at: 0, max: 200_000))) == b)
        }
    }

    @Test func aZeroCacheBudgetStillMapsPerReader() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20) {
                $0.mapMinimumBytes = 4096
                $0.mappedCacheBytes = 0
            }
            let a = blob(94, size: 50_000)
            try await store.put(bytes: a, hash: hashOf(a))
            let r = try await store.openRead(hash: hashOf(a))
            #expect(Array(try #require(r.mappedBytes(at: 0, max: 50_000))) == a)
            #expect(store.mappedBlobCount == 0)
            r.close()
        }
    }
}

@Suite struct MappingLRUTests {
    @Test func dropsTheLeastRecentlyUsedToStayWithinBytes() {
        var lru = MappingLRU<String>(maxBytes: 100)
        #expect(lru.insert("a", "A", size: 40).isEmpty)
        #expect(lru.insert("b", "B", size: 40).isEmpty)
        #expect(lru.get("a") == "A")  // b is now the least recently used
        #expect(lru.insert("c", "C", size: 40) == ["B"])
        #expect(lru.get("b") == nil)
        #expect(lru.bytes == 80 && lru.count == 2)
        // Too large to keep at all: nothing else is dropped for it.
        #expect(lru.insert("huge", "H", size: 101).isEmpty)
        #expect(lru.get("huge") == nil && lru.count == 2)
        // Replacing a key hands back the old value.
        #expect(lru.insert("a", "A2", size: 10) == ["A"])
        #expect(lru.bytes == 50)
        #expect(lru.remove("c") == "C")
        #expect(lru.remove("c") == nil)
        #expect(lru.bytes == 10)
    }

    @Test func aZeroBudgetKeepsNothing() {
        var lru = MappingLRU<Int>(maxBytes: 0)
        #expect(lru.insert("a", 1, size: 1).isEmpty)
        #expect(lru.count == 0 && lru.bytes == 0)
    }
}
