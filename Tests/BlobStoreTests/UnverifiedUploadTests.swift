import Testing
@testable import BlobStore

/// Uploads that are not verified yet may not wipe the cache: space is reserved as bytes arrive
/// (never for a declared size), and eviction on their behalf is bounded by maxUnverifiedBytes.
@Suite struct UnverifiedUploadTests {
    @Test("a declared size evicts nothing until bytes arrive")
    func declaredSizeReservesNothing() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1000)
            let a = blob(1, size: 600)
            try await store.put(bytes: a, hash: hashOf(a))
            let w = try await store.beginWrite(hash: hashOf(blob(2, size: 1000)), expectedSize: 1000)
            #expect(store.stats.reservedBytes == 0)
            #expect(store.size(of: hashOf(a)) == 600)
            w.abort()
            #expect(store.stats.evictions == 0)
        }
    }

    @Test("a lying upload evicts at most maxUnverifiedBytes, and only for bytes it sent")
    func evictionForUnverifiedBytesIsBounded() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1000) { $0.maxUnverifiedBytes = 300 }
            let a = blob(3, size: 400), b = blob(4, size: 400)
            try await store.put(bytes: a, hash: hashOf(a))
            try await store.put(bytes: b, hash: hashOf(b))
            // An upload of unknown size (no Content-Length) under some hash; sends 250: 200 are free,
            // so a (LRU) is evicted.
            let liar = try await store.beginWrite(hash: hashOf(blob(5, size: 600)), expectedSize: nil)
            try liar.write(blob(6, size: 250))
            #expect(store.size(of: hashOf(a)) == nil)
            try liar.write(blob(7, size: 100))   // fits in the space a left
            // More would need eviction beyond the bound: refused, b survives.
            await expectStoreError({ $0 == .unverifiedLimit(inFlight: 350, limit: 300) }) { try liar.write(blob(8, size: 300)) }
            #expect(store.size(of: hashOf(b)) == 400)
            #expect(store.stats.reservedBytes == 0 && dir.tmpContents().isEmpty)
            // A declared size that could only be met by evicting beyond the bound is refused at once.
            let big = blob(9, size: 700)
            await expectStoreError({ $0 == .unverifiedLimit(inFlight: 0, limit: 300) }) {
                _ = try await store.beginWrite(hash: hashOf(big), expectedSize: 700)
            }
            #expect(store.size(of: hashOf(b)) == 400)
            // An honest upload within the bound still evicts what it must.
            let c = blob(10, size: 300)
            try await store.put(bytes: c, hash: hashOf(c))
            #expect(store.size(of: hashOf(c)) == 300)
            #expect(store.stats.usedBytes + store.stats.reservedBytes <= 1000)
        }
    }
}
