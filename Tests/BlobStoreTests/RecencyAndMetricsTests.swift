import Foundation
import Testing
import MetricsTestKit
@testable import BlobStore

@Suite struct RecencyAndMetricsTests {
    private func mtime(_ path: String) throws -> Date {
        try #require(FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date)
    }

    @Test func accessPersistsRecencyLazily() async throws {
        try await withTempDir { dir in
            let data = blob(100, size: 10)
            let hash = hashOf(data)
            // Default interval (10 minutes): a fresh entry's mtime is not rewritten on access.
            do {
                let store = try makeStore(dir, maxBytes: 1000)
                try await store.put(bytes: data, hash: hash)
                try dir.setMTime(dir.casPath(hash), secondsAgo: 5000)
                #expect(store.size(of: hash) == 10)
                #expect(try mtime(dir.casPath(hash)) < Date(timeIntervalSinceNow: -4000))
            }
            // Reopened: the persisted mtime is old, so the first access bumps it, the next ones do not.
            let store = try makeStore(dir, maxBytes: 1000)
            #expect(store.contains(Digest(hash: hash, size: 10)!))
            let bumped = try mtime(dir.casPath(hash))
            #expect(bumped > Date(timeIntervalSinceNow: -60))
            try dir.setMTime(dir.casPath(hash), secondsAgo: 100)
            _ = try await store.readAll(hash: hash)
            #expect(try mtime(dir.casPath(hash)) < Date(timeIntervalSinceNow: -90))
            // Action cache entries too.
            let key = hashOf([42])
            try await store.putAction(key: key, value: [1])
            try dir.setMTime(dir.acPath(key), secondsAgo: 5000)
            let reopened = try makeStore(dir, maxBytes: 1000)
            #expect(try await reopened.getAction(key: key) == [1])
            #expect(try mtime(dir.acPath(key)) > Date(timeIntervalSinceNow: -60))
        }
    }

    @Test func metricsMatchStats() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 2000, metrics: metrics)
            let a = blob(110, size: 700), b = blob(111, size: 700), c = blob(112, size: 700)
            try await store.put(bytes: a, hash: hashOf(a))
            try await store.put(bytes: b, hash: hashOf(b))
            _ = store.size(of: hashOf(a))
            _ = store.size(of: hashOf([0]))
            try await store.put(bytes: c, hash: hashOf(c))  // evicts b
            _ = try await store.readAll(hash: hashOf(c))
            try await store.putAction(key: hashOf([1]), value: [1, 2, 3])
            _ = try await store.getAction(key: hashOf([1]))
            _ = try await store.getAction(key: hashOf([2]))
            let w = try await store.beginWrite(hash: hashOf([3]), expectedSize: 100)
            try w.write(blob(113, size: 100))  // space is reserved as bytes arrive (never for the declared size alone)
            #expect(try metrics.expectGauge("cachemesh_store_reserved_bytes").lastValue == 100)
            w.abort()

            let s = store.stats
            func counter(_ label: String) throws -> Int64 { try metrics.expectCounter(label).totalValue }
            func gauge(_ label: String) throws -> Double? { try metrics.expectGauge(label).lastValue }
            #expect(try counter("cachemesh_store_hits_total") == s.hits)
            #expect(try counter("cachemesh_store_misses_total") == s.misses)
            #expect(try counter("cachemesh_store_evictions_total") == s.evictions)
            #expect(try counter("cachemesh_store_bytes_in_total") == s.bytesIn)
            #expect(try counter("cachemesh_store_bytes_out_total") == s.bytesOut)
            #expect(metrics.counterTotal(label: "cachemesh_store_rejected_writes_total") == s.rejectedWrites)
            #expect(try gauge("cachemesh_store_used_bytes") == Double(s.usedBytes))
            #expect(try gauge("cachemesh_store_reserved_bytes") == Double(s.reservedBytes))
            #expect(try gauge("cachemesh_store_limit_bytes") == 2000)
            #expect(try gauge("cachemesh_store_blobs") == Double(s.blobCount))
            #expect(try gauge("cachemesh_store_actions") == Double(s.actionCount))
            #expect(s.hits == 3 && s.misses == 2 && s.evictions == 1)
            #expect(s.bytesIn == 2203 && s.bytesOut == 703)
            #expect(s.usedBytes == 1403 && s.reservedBytes == 0 && s.rejectedWrites == 1)
        }
    }
}
