import Foundation
import Testing
@testable import BlobStore

/// A store opened with `scanInBackground` serves at once: what is on disk but not indexed yet is
/// found by looking at the disk, and eviction waits for the scan (and then follows mtime order).
/// The scan is held by a gate, so "before the index is done" is a state, not a race.
@Suite struct BackgroundScanTests {
    private func fill(_ dir: TempDir, count: Int, size: Int) async throws -> [[UInt8]] {
        let store = try makeStore(dir, maxBytes: 1 << 30)
        var blobs: [[UInt8]] = []
        for i in 0..<count {
            let b = blob(UInt64(1000 + i), size: size)
            try await store.put(bytes: b, hash: hashOf(b))
            blobs.append(b)
        }
        return blobs
    }

    @Test func servesFromDiskBeforeTheScanAndIndexesEverythingAfter() async throws {
        try await withTempDir { dir in
            let blobs = try await fill(dir, count: 300, size: 100)
            let key = hashOf(Array("action".utf8))
            do {
                let store = try makeStore(dir, maxBytes: 1 << 30)
                try await store.putAction(key: key, value: [7, 7])
            }
            let gate = ScanGate()
            let store = try makeStore(dir, maxBytes: 1 << 50) { $0.scanInBackground = true; $0.scanGate = gate }
            var progress = store.indexProgress
            #expect(!progress.complete && progress.scannedDirectories == 0 && progress.indexedEntries == 0)

            // Not indexed yet, but on disk: served, and indexed by the lookup.
            #expect(try await store.readAll(hash: hashOf(blobs[0])) == blobs[0])
            #expect(store.size(of: hashOf(blobs[1])) == 100)
            #expect(store.contains(Digest(hash: hashOf(blobs[2]), size: 100)!))
            #expect(try await store.getAction(key: key) == [7, 7])
            #expect(store.size(of: hashOf(blob(1, size: 5))) == nil)   // absent stays absent
            progress = store.indexProgress
            #expect(!progress.complete && progress.indexedEntries == 4 && progress.scannedEntries == 0)
            // A write that fits needs no eviction and is not held up.
            let fresh = blob(5, size: 100)
            try await store.put(bytes: fresh, hash: hashOf(fresh))
            #expect(store.stats.blobCount == 4)

            gate.open()
            await store.waitUntilIndexed()
            progress = store.indexProgress
            #expect(progress.complete && progress.scannedDirectories == 512)
            #expect(progress.scannedEntries == 301 - 4)   // 300 blobs + 1 action, minus the 4 found by lookups
            let stats = store.stats
            #expect(stats.blobCount == 301 && stats.actionCount == 1)
            #expect(stats.usedBytes == 301 * 100 + 2)
            #expect(dir.casFiles().values.reduce(0, +) == stats.usedBytes - 2)
        }
    }

    @Test func evictionWaitsForTheScanThenFollowsMtimeOrder() async throws {
        try await withTempDir { dir in
            let blobs = try await fill(dir, count: 10, size: 100)
            // Oldest first: 3, 7, then the rest.
            for (i, b) in blobs.enumerated() {
                let age: Double = i == 3 ? 9000 : i == 7 ? 8000 : Double(1000 - i)
                try dir.setMTime(dir.casPath(hashOf(b)), secondsAgo: age)
            }
            let gate = ScanGate()
            let store = try makeStore(dir, maxBytes: 1000) { $0.scanInBackground = true; $0.scanGate = gate }
            // Blob 0 is used before the scan: it must not be taken for an old one.
            #expect(store.size(of: hashOf(blobs[0])) == 100)
            let incoming = blob(77, size: 200)
            let put = Task { try await store.put(bytes: incoming, hash: hashOf(incoming)) }
            // The store is full and its order unknown: the write waits instead of evicting.
            for _ in 0..<20 { await Task.yield() }
            #expect(store.stats.evictions == 0)
            gate.open()
            try await put.value
            #expect(store.stats.evictions == 2)
            #expect(!dir.exists(dir.casPath(hashOf(blobs[3]))) && !dir.exists(dir.casPath(hashOf(blobs[7]))))
            #expect(dir.exists(dir.casPath(hashOf(blobs[0]))))
            #expect(store.stats.usedBytes == 1000)
        }
    }

    @Test func aLoweredLimitIsEnforcedWhenTheScanEnds() async throws {
        try await withTempDir { dir in
            _ = try await fill(dir, count: 20, size: 100)
            let gate = ScanGate()
            let store = try makeStore(dir, maxBytes: 1000) { $0.scanInBackground = true; $0.scanGate = gate }
            gate.open()
            await store.waitUntilIndexed()
            #expect(store.stats.usedBytes == 1000 && store.stats.evictions == 10)
            #expect(dir.casFiles().count == 10)
        }
    }
}
