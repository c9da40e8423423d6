import Foundation
import Testing
import MetricsTestKit
@testable import BlobStore

@Suite struct DurabilityTests {
    /// Writers that commit while the committer is busy share its syncs: twenty commits held at
    /// the committer's door go through as one group of two syncs (data, then directories).
    @Test func concurrentCommitsShareTheirSyncs() async throws {
        try await withTempDir { dir in
            let gate = ScanGate()
            let store = try makeStore(dir, maxBytes: 1 << 20) { $0.durability = .fsync; $0.commitGate = gate }
            let blobs = (0..<20).map { blob(UInt64(300 + $0), size: 4096) }
            let puts = blobs.map { b in Task { try await store.put(bytes: b, hash: hashOf(b)) } }
            // By state, not by time: every commit is queued before the committer may start.
            while store.committer.pending < blobs.count { try await Task.sleep(for: .milliseconds(2)) }
            #expect(store.stats.blobCount == 0)   // nothing acknowledged or visible before its sync
            gate.open()
            for p in puts { _ = try await p.value }
            #expect(store.committer.groups.load(ordering: .relaxed) == 1)
            #expect(store.committer.syncs.load(ordering: .relaxed) == 2)
            #expect(store.stats.blobCount == 20)
            for b in blobs { #expect(try await store.readAll(hash: hashOf(b)) == b) }
            #expect(dir.tmpContents().isEmpty)
        }
    }

    @Test func fsyncModeStoresBlobsAndActionsThatSurviveAReopen() async throws {
        try await withTempDir { dir in
            let a = blob(1, size: 5000), b = blob(2, size: 100)
            let key = hashOf(Array("k".utf8))
            do {
                let store = try makeStore(dir, maxBytes: 1 << 20) { $0.durability = .fsync }
                try await store.put(bytes: a, hash: hashOf(a))
                // The synchronous commit syncs on the caller's thread.
                let writer = try await store.beginWrite(hash: hashOf(b), expectedSize: 100)
                try writer.write(b)
                _ = try commitOnThisThread(writer)
                try await store.putAction(key: key, value: [1, 2, 3])
                try await store.put(bytes: a, hash: hashOf(a))   // dedup: nothing to sync
                #expect(store.committer.groups.load(ordering: .relaxed) == 2)   // a, the action
            }
            let store = try makeStore(dir, maxBytes: 1 << 20) { $0.durability = .fsync }
            #expect(try await store.readAll(hash: hashOf(a)) == a)
            #expect(try await store.readAll(hash: hashOf(b)) == b)
            #expect(try await store.getAction(key: key) == [1, 2, 3])
            #expect(store.stats.blobCount == 2 && dir.tmpContents().isEmpty)
        }
    }

    @Test func aMismatchIsRejectedBeforeAnySync() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20) { $0.durability = .fsync }
            let writer = try await store.beginWrite(hash: hashOf(blob(1, size: 10)), expectedSize: 10)
            try writer.write(blob(2, size: 10))
            await #expect(throws: BlobStoreError.self) { _ = try await writer.commit() }
            #expect(store.committer.syncs.load(ordering: .relaxed) == 0)
            #expect(store.stats.reservedBytes == 0 && store.stats.blobCount == 0 && dir.tmpContents().isEmpty)
        }
    }
}

/// The synchronous `commit()` (an async caller would get the async overload).
private func commitOnThisThread(_ writer: BlobWriter) throws -> Digest { try writer.commit() }

/// Builds without the Bytes: evicting a blob used within min_ttl is counted and logged.
@Suite struct MinTTLTests {
    @Test func evictingARecentlyUsedBlobIsCountedAndAnOldOneIsNot() async throws {
        try await withTempDir { dir in
            let a = blob(1, size: 400), b = blob(2, size: 400), c = blob(3, size: 400)
            do {
                let store = try makeStore(dir, maxBytes: 1000)
                try await store.put(bytes: a, hash: hashOf(a))
                try await store.put(bytes: b, hash: hashOf(b))
            }
            // a was last used 5 hours ago (past the 3 h TTL and the persist interval), b just now.
            try dir.setMTime(dir.casPath(hashOf(a)), secondsAgo: 5 * 3600)
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1000, metrics: metrics)
            try await store.put(bytes: c, hash: hashOf(c))   // evicts a: outside its TTL
            #expect(store.stats.evictions == 1 && store.size(of: hashOf(a)) == nil)
            #expect(try metrics.expectCounter("cachemesh_store_ttl_evictions_total").totalValue == 0)
            let d = blob(4, size: 400)
            try await store.put(bytes: d, hash: hashOf(d))   // nothing else can go: evicts b, used now
            #expect(store.stats.evictions == 2 && store.size(of: hashOf(b)) == nil)
            #expect(try metrics.expectCounter("cachemesh_store_ttl_evictions_total").totalValue == 1)
        }
    }

    @Test func zeroTurnsTheAccountingOff() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1000, metrics: metrics) { $0.minTTLSeconds = 0 }
            for i in 0..<4 { let x = blob(UInt64(10 + i), size: 400); try await store.put(bytes: x, hash: hashOf(x)) }
            #expect(store.stats.evictions == 2)
            #expect(try metrics.expectCounter("cachemesh_store_ttl_evictions_total").totalValue == 0)
        }
    }
}
