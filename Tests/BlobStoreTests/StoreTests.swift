import Synchronization
import Foundation
import Testing
import MetricsTestKit
@testable import BlobStore

@Suite struct VerificationTests {
    @Test func wrongHashIsRejected() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1 << 20, metrics: metrics)
            let claimed = blob(1, size: 1000), actual = blob(2, size: 1000)
            let hash = hashOf(claimed)
            let writer = try await store.beginWrite(hash: hash, expectedSize: 1000)
            try writer.write(actual)
            #expect(dir.tmpContents().count == 1)
            await expectStoreError({ $0 == .digestMismatch(expected: hash, actual: hashOf(actual)) }) {
                _ = try writer.commit()
            }
            #expect(dir.tmpContents().isEmpty)
            #expect(!dir.exists(dir.casPath(hash)))
            #expect(store.size(of: hash) == nil)
            let stats = store.stats
            #expect(stats.reservedBytes == 0 && stats.usedBytes == 0 && stats.blobCount == 0)
            #expect(stats.rejectedWrites == 1)
            #expect(stats.activeWrites == 0)
            #expect(try metrics.expectCounter("cachemesh_store_rejected_writes_total", [("reason", "digest_mismatch")]).totalValue == 1)
            // A second commit/abort is harmless.
            await expectStoreError({ $0 == .closed }) { _ = try writer.commit() }
            writer.abort()
            #expect(store.stats.rejectedWrites == 1)
        }
    }

    @Test func wrongSizeIsRejected() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1 << 20, metrics: metrics)
            let data = blob(3, size: 500)
            let hash = hashOf(data)
            // Too short.
            let short = try await store.beginWrite(hash: hash, expectedSize: 600)
            try short.write(data)
            await expectStoreError({ $0 == .sizeMismatch(expected: 600, actual: 500) }) { _ = try short.commit() }
            // Too long: rejected as soon as the excess arrives.
            let long = try await store.beginWrite(hash: hash, expectedSize: 400)
            await expectStoreError({ $0 == .sizeMismatch(expected: 400, actual: 500) }) { try long.write(data) }
            #expect(!long.isOpen)
            await expectStoreError({ $0 == .closed }) { try long.write([1]) }
            #expect(dir.tmpContents().isEmpty)
            #expect(store.size(of: hash) == nil)
            #expect(store.stats.reservedBytes == 0)
            #expect(try metrics.expectCounter("cachemesh_store_rejected_writes_total", [("reason", "size_mismatch")]).totalValue == 2)
            // The right size and content go through.
            let digest = try await store.put(bytes: data, hash: hash)
            #expect(digest == Digest(hash: hash, size: 500))
            #expect(try await store.readAll(hash: hash) == data)
        }
    }

    @Test func invalidHashesNeverReachTheFileSystem() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            for bad in ["../../etc/passwd", String(repeating: "A", count: 64), "", String(repeating: "a", count: 63) + "/"] {
                await expectStoreError({ if case .invalidHash = $0 { true } else { false } }) {
                    _ = try await store.beginWrite(hash: bad, expectedSize: nil)
                }
                await expectStoreError({ if case .invalidHash = $0 { true } else { false } }) {
                    _ = try await store.openRead(hash: bad)
                }
                await expectStoreError({ if case .invalidHash = $0 { true } else { false } }) {
                    try await store.putAction(key: bad, value: [1])
                }
                #expect(store.size(of: bad) == nil)
            }
        }
    }
}

@Suite struct AtomicityTests {
    @Test func blobIsInvisibleBeforeCommit() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let data = blob(4, size: 10_000)
            let hash = hashOf(data)
            let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
            try writer.write(Array(data[..<5000]))
            #expect(store.size(of: hash) == nil)
            #expect(!store.contains(Digest(hash: hash, size: 10_000)!))
            await expectStoreError({ $0 == .notFound(hash) }) { _ = try await store.openRead(hash: hash) }
            #expect(!dir.exists(dir.casPath(hash)))
            try writer.write(Array(data[5000...]))
            #expect(store.size(of: hash) == nil)
            let digest = try await writer.commit()
            #expect(digest.size == 10_000)
            #expect(store.size(of: hash) == 10_000)
            #expect(dir.exists(dir.casPath(hash)))
            #expect(try await store.readAll(hash: hash) == data)
            #expect(dir.tmpContents().isEmpty)
            #expect(store.stats.reservedBytes == 0)
            #expect(store.stats.usedBytes == 10_000)
        }
    }

    @Test(.timeLimit(.minutes(1))) func concurrentReadersSeeAllOrNothing() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 16 << 20)
            let data = blob(5, size: 2 << 20)
            let hash = hashOf(data)
            // Half the blob is written before any reader starts: the "nothing" side is certain to
            // be exercised, not left to scheduling.
            let writer = try await store.beginWrite(hash: hash, expectedSize: Int64(data.count))
            let half = data.count / 2
            try writer.write(Array(data[..<half]))
            await expectStoreError({ $0 == .notFound(hash) }) { _ = try await store.readAll(hash: hash) }
            let outcome = try await withThrowingTaskGroup(of: (complete: Int, absent: Int).self) { group in
                group.addTask {
                    var i = half
                    while i < data.count {
                        try writer.write(Array(data[i..<min(data.count, i + 65_536)]))
                        i += 65_536
                        await Task.yield()
                    }
                    _ = try await writer.commit()
                    return (0, 0)
                }
                for _ in 0..<4 {
                    group.addTask {
                        // Every read is either "not found" or the whole blob, until three whole
                        // reads (the writer commits in finite time, so this loop ends).
                        var complete = 0, absent = 0
                        while complete < 3 {
                            do {
                                let bytes = try await store.readAll(hash: hash)
                                #expect(bytes.count == data.count)
                                #expect(bytes == data)
                                complete += 1
                            } catch BlobStoreError.notFound {
                                absent += 1
                            }
                            await Task.yield()
                        }
                        return (complete, absent)
                    }
                }
                var total = (complete: 0, absent: 0)
                for try await r in group {
                    total.complete += r.complete
                    total.absent += r.absent
                }
                return total
            }
            // Each reader saw the whole blob exactly three times (any torn read failed above).
            #expect(outcome.complete == 12)
            #expect(try await store.readAll(hash: hash) == data)
        }
    }
}

@Suite struct DedupAndEmptyTests {
    @Test func duplicateUploadsAreDeduplicated() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let data = blob(6, size: 4096)
            let hash = hashOf(data)
            let first = try await store.put(bytes: data, hash: hash)
            let second = try await store.put(bytes: data, hash: hash)
            #expect(first == second)
            // Unknown size, streamed.
            let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
            try writer.write(data)
            #expect(try await writer.commit() == first)
            #expect(store.stats.blobCount == 1)
            #expect(store.stats.usedBytes == 4096)
            #expect(store.stats.reservedBytes == 0)
            #expect(store.stats.pinnedBytes == 0)
            #expect(dir.tmpContents().isEmpty)
            // A bogus re-upload of an existing hash is still verified and rejected.
            let bogus = blob(60, size: 4096)
            await expectStoreError({ $0 == .digestMismatch(expected: hash, actual: hashOf(bogus)) }) {
                _ = try await store.put(bytes: bogus, hash: hash)
            }
            #expect(try await store.readAll(hash: hash) == data)
            #expect(store.stats.pinnedBytes == 0)
        }
    }

    @Test func emptyBlobIsAlwaysPresent() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 0)
            #expect(store.size(of: Digest.emptyHash) == 0)
            #expect(store.contains(.empty))
            #expect(!store.contains(Digest(hash: Digest.emptyHash, size: 1)!))
            #expect(try await store.readAll(hash: Digest.emptyHash) == [])
            let reader = try await store.openRead(hash: Digest.emptyHash)
            #expect(reader.length == 0 && reader.blobSize == 0)
            reader.close()
            #expect(try await store.put(bytes: [], hash: Digest.emptyHash) == .empty)
            await expectStoreError({ $0 == .offsetOutOfRange(offset: 1, size: 0) }) {
                _ = try await store.openRead(hash: Digest.emptyHash, offset: 1)
            }
            #expect(!dir.exists(dir.casPath(Digest.emptyHash)))
            #expect(store.stats.blobCount == 0 && store.stats.activeReads == 0 && store.stats.activeWrites == 0)
        }
    }
}

@Suite struct EvictionTests {
    @Test func evictsLeastRecentlyUsedIncludingAccessRefresh() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1000, metrics: metrics)
            let a = blob(10, size: 300), b = blob(11, size: 300), c = blob(12, size: 300)
            let d = blob(13, size: 300), e = blob(14, size: 300)
            for x in [a, b, c] { try await store.put(bytes: x, hash: hashOf(x)) }
            #expect(store.size(of: hashOf(a)) == 300)  // order now: b, c, a
            try await store.put(bytes: d, hash: hashOf(d))  // evicts b
            #expect(!dir.exists(dir.casPath(hashOf(b))))
            #expect([a, c, d].allSatisfy { dir.exists(dir.casPath(hashOf($0))) })
            #expect(store.contains(Digest(hash: hashOf(c), size: 300)!))  // order: a, d, c
            try await store.put(bytes: e, hash: hashOf(e))  // evicts a
            #expect(!dir.exists(dir.casPath(hashOf(a))))
            #expect([c, d, e].allSatisfy { dir.exists(dir.casPath(hashOf($0))) })
            #expect(store.size(of: hashOf(b)) == nil)
            #expect(store.size(of: hashOf(a)) == nil)
            let stats = store.stats
            #expect(stats.evictions == 2)
            #expect(stats.usedBytes == 900 && stats.blobCount == 3)
            #expect(try metrics.expectCounter("cachemesh_store_evictions_total").totalValue == 2)
            #expect(try metrics.expectGauge("cachemesh_store_used_bytes").lastValue == 900)
            #expect(try metrics.expectGauge("cachemesh_store_blobs").lastValue == 3)
            #expect(try metrics.expectGauge("cachemesh_store_limit_bytes").lastValue == 1000)
        }
    }

    @Test func evictedBlobsAreReportedButActionsAreNot() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1000)
            let seen = Mutex<[Digest]>([])
            store.onEviction { d in seen.withLock { $0.append(d) } }
            let key = hashOf(Array("action-e".utf8))
            let a = blob(30, size: 400)
            try await store.put(bytes: a, hash: hashOf(a))
            try await store.putAction(key: key, value: blob(31, size: 400))
            let b = blob(32, size: 400), c = blob(33, size: 400)
            try await store.put(bytes: b, hash: hashOf(b))  // evicts a
            try await store.put(bytes: c, hash: hashOf(c))  // evicts the action: not a blob, not reported
            #expect(seen.withLock { $0 } == [Digest(hash: hashOf(a), size: 400)!])
        }
    }

    @Test("a blob file deleted behind the store's back: the read is a 404, the entry leaves the index, and the mesh is told (as for an eviction)")
    func vanishedBlobIsReportedLikeAnEviction() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let seen = Mutex<[Digest]>([])
            store.onEviction { d in seen.withLock { $0.append(d) } }
            let a = blob(34, size: 500)
            try await store.put(bytes: a, hash: hashOf(a))
            try FileManager.default.removeItem(atPath: dir.casPath(hashOf(a)))
            await expectStoreError({ $0 == .notFound(hashOf(a)) }) { _ = try await store.openRead(hash: hashOf(a)) }
            #expect(store.size(of: hashOf(a)) == nil)
            #expect(store.stats.blobCount == 0 && store.stats.usedBytes == 0)
            #expect(seen.withLock { $0 } == [Digest(hash: hashOf(a), size: 500)!])
        }
    }

    @Test func deleteActionRemovesTheEntryAndItsBytes() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1000)
            let key = hashOf(Array("action-d".utf8))
            try await store.putAction(key: key, value: blob(40, size: 300))
            #expect(store.stats.actionCount == 1 && store.stats.usedBytes == 300)
            #expect(try store.deleteAction(key: key))
            #expect(try await store.getAction(key: key) == nil)
            #expect(store.stats.actionCount == 0 && store.stats.usedBytes == 0)
            #expect(try store.deleteAction(key: key) == false)
            #expect(throws: BlobStoreError.self) { try store.deleteAction(key: "nope") }
            // After a restart the entry stays gone (the file was removed, not only the index entry).
            let reopened = try makeStore(dir, maxBytes: 1000)
            #expect(try await reopened.getAction(key: key) == nil)
        }
    }

    @Test func actionCacheSharesTheLRU() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1000)
            let key = hashOf(Array("action".utf8))
            try await store.putAction(key: key, value: blob(20, size: 400))
            let x = blob(21, size: 400), y = blob(22, size: 400)
            try await store.put(bytes: x, hash: hashOf(x))
            try await store.put(bytes: y, hash: hashOf(y))  // evicts the action (oldest)
            #expect(try await store.getAction(key: key) == nil)
            #expect(store.stats.actionCount == 0)
            #expect(store.stats.usedBytes == 800)
        }
    }

    @Test func pinnedBlobsAreNotEvicted() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1000, metrics: metrics)
            let a = blob(30, size: 600), b = blob(31, size: 600)
            try await store.put(bytes: a, hash: hashOf(a))
            let reader = try await store.openRead(hash: hashOf(a))
            #expect(store.stats.pinnedBytes == 600)
            await expectStoreError({ $0 == .insufficientStorage(needed: 600, available: 400) }) {
                _ = try await store.put(bytes: b, hash: hashOf(b))
            }
            // Unknown size: fails once it grows beyond what can be freed.
            let w = try await store.beginWrite(hash: hashOf(b), expectedSize: nil)
            try w.write(Array(b[..<400]))
            await expectStoreError({ if case .insufficientStorage = $0 { true } else { false } }) {
                try w.write(Array(b[400...]))
            }
            #expect(dir.tmpContents().isEmpty)
            #expect(try reader.readAll() == a)
            #expect(store.stats.usedBytes + store.stats.reservedBytes <= 1000)
            #expect(try metrics.expectCounter("cachemesh_store_rejected_writes_total", [("reason", "insufficient_storage")]).totalValue == 2)
            reader.close()
            reader.close()  // idempotent
            #expect(store.stats.pinnedBytes == 0)
            #expect(store.stats.activeReads == 0)
            try await store.put(bytes: b, hash: hashOf(b))
            #expect(store.size(of: hashOf(a)) == nil)
            #expect(try await store.readAll(hash: hashOf(b)) == b)
        }
    }

    @Test func tooLarge() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1000, metrics: metrics)
            let big = blob(40, size: 1001)
            await expectStoreError({ $0 == .tooLarge(size: 1001, limit: 1000) }) {
                _ = try await store.beginWrite(hash: hashOf(big), expectedSize: 1001)
            }
            let w = try await store.beginWrite(hash: hashOf(big), expectedSize: nil)
            try w.write(Array(big[..<1000]))
            await expectStoreError({ $0 == .tooLarge(size: 1001, limit: 1000) }) { try w.write([big[1000]]) }
            await expectStoreError({ $0 == .tooLarge(size: 1001, limit: 1000) }) {
                try await store.putAction(key: hashOf(big), value: big)
            }
            #expect(try metrics.expectCounter("cachemesh_store_rejected_writes_total", [("reason", "too_large")]).totalValue == 3)
            #expect(store.stats.reservedBytes == 0 && store.stats.activeWrites == 0)
            #expect(dir.tmpContents().isEmpty)
            // Exactly maxBytes fits.
            let fits = Array(big[..<1000])
            try await store.put(bytes: fits, hash: hashOf(fits))
            #expect(store.stats.usedBytes == 1000)
        }
    }

    @Test func hardLimitHoldsUnderConcurrentWriters() async throws {
        try await withTempDir { dir in
            let maxBytes: Int64 = 64 * 1024
            let store = try makeStore(dir, maxBytes: maxBytes) { $0.maxConcurrentWrites = 8 }
            let violations = try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<120 {
                    group.addTask {
                        let data = blob(UInt64(1000 + i), size: 1 + (i * 2_654_435) % 6000)
                        let writer = try await store.beginWrite(hash: hashOf(data), expectedSize: i % 2 == 0 ? Int64(data.count) : nil)
                        var offset = 0
                        var bad = 0
                        while offset < data.count {
                            try writer.write(Array(data[offset..<min(data.count, offset + 1000)]))
                            offset += 1000
                            let s = store.stats
                            if s.usedBytes + s.reservedBytes > maxBytes { bad += 1 }
                            await Task.yield()
                        }
                        _ = try await writer.commit()
                        let s = store.stats
                        if s.usedBytes + s.reservedBytes > maxBytes { bad += 1 }
                        return bad
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(violations == 0)
            let stats = store.stats
            #expect(stats.reservedBytes == 0)
            #expect(stats.usedBytes <= maxBytes)
            #expect(stats.rejectedWrites == 0)
            #expect(stats.evictions > 0)
            let files = dir.casFiles()
            #expect(files.count == stats.blobCount)
            #expect(files.values.reduce(0, +) == stats.usedBytes)
            #expect(dir.tmpContents().isEmpty)
        }
    }
}

@Suite struct RestartTests {
    @Test func reopenRecoversBlobsActionsAndOrder() async throws {
        try await withTempDir { dir in
            let a = blob(50, size: 300), b = blob(51, size: 300), c = blob(52, size: 300)
            let key = hashOf(Array("k".utf8))
            let value = blob(53, size: 50)
            do {
                let store = try makeStore(dir, maxBytes: 1000)
                for x in [a, b, c] { try await store.put(bytes: x, hash: hashOf(x)) }
                try await store.putAction(key: key, value: value)
            }
            // Oldest first: b, c, a, action.
            try dir.setMTime(dir.casPath(hashOf(b)), secondsAgo: 4000)
            try dir.setMTime(dir.casPath(hashOf(c)), secondsAgo: 3000)
            try dir.setMTime(dir.casPath(hashOf(a)), secondsAgo: 2000)
            try dir.setMTime(dir.acPath(key), secondsAgo: 1000)

            let store = try makeStore(dir, maxBytes: 1000)
            var stats = store.stats
            #expect(stats.blobCount == 3 && stats.actionCount == 1 && stats.usedBytes == 950)
            let d = blob(54, size: 100)
            try await store.put(bytes: d, hash: hashOf(d))  // must evict exactly the oldest: b
            #expect(!dir.exists(dir.casPath(hashOf(b))))
            #expect([a, c, d].allSatisfy { dir.exists(dir.casPath(hashOf($0))) })
            stats = store.stats
            #expect(stats.evictions == 1 && stats.usedBytes == 750)
            #expect(try await store.getAction(key: key) == value)
            #expect(try await store.readAll(hash: hashOf(a)) == a)
            let e = blob(55, size: 300)
            try await store.put(bytes: e, hash: hashOf(e))  // next oldest: c
            #expect(!dir.exists(dir.casPath(hashOf(c))))
            #expect(dir.exists(dir.casPath(hashOf(a))))
        }
    }

    @Test func startupCleansTempAndStrayFiles() async throws {
        try await withTempDir { dir in
            let data = blob(60, size: 123)
            do {
                let store = try makeStore(dir, maxBytes: 10_000)
                try await store.put(bytes: data, hash: hashOf(data))
                // Leave an uncommitted upload behind (simulated crash: the temp file stays).
                let writer = try await store.beginWrite(hash: hashOf(blob(61, size: 10)), expectedSize: nil)
                try writer.write(blob(61, size: 10))
                #expect(dir.tmpContents().count == 1)
                // Copy it so it survives the writer's deinit.
                let leftover = dir.path + "/tmp/" + dir.tmpContents()[0]
                try FileManager.default.copyItem(atPath: leftover, toPath: dir.path + "/tmp/crashed.tmp")
            }
            let fm = FileManager.default
            try Data([1, 2, 3]).write(to: URL(fileURLWithPath: dir.path + "/cas/ab/not-a-hash"))
            try Data([1, 2, 3]).write(to: URL(fileURLWithPath: dir.path + "/cas/stray"))
            let misplaced = String(repeating: "c", count: 64)
            try Data([1, 2, 3]).write(to: URL(fileURLWithPath: dir.path + "/cas/ab/" + misplaced))
            try Data().write(to: URL(fileURLWithPath: dir.casPath(String(repeating: "d", count: 64))))
            try fm.createDirectory(atPath: dir.path + "/tmp/subdir", withIntermediateDirectories: true)
            #expect(!dir.tmpContents().isEmpty)

            let store = try makeStore(dir, maxBytes: 10_000)
            #expect(dir.tmpContents().isEmpty)
            #expect(!dir.exists(dir.path + "/cas/ab/not-a-hash"))
            #expect(!dir.exists(dir.path + "/cas/stray"))
            #expect(!dir.exists(dir.path + "/cas/ab/" + misplaced))
            #expect(!dir.exists(dir.casPath(String(repeating: "d", count: 64))))
            #expect(store.stats.blobCount == 1)
            #expect(store.stats.usedBytes == 123)
            #expect(try await store.readAll(hash: hashOf(data)) == data)
        }
    }

    @Test func shrinkingTheLimitEvictsOnOpen() async throws {
        try await withTempDir { dir in
            let xs = (0..<4).map { blob(70 + UInt64($0), size: 100) }
            do {
                let store = try makeStore(dir, maxBytes: 1000)
                for x in xs { try await store.put(bytes: x, hash: hashOf(x)) }
            }
            for (i, x) in xs.enumerated() { try dir.setMTime(dir.casPath(hashOf(x)), secondsAgo: Double(1000 - i * 10)) }
            let store = try makeStore(dir, maxBytes: 250)
            #expect(store.stats.usedBytes == 200)
            #expect(!dir.exists(dir.casPath(hashOf(xs[0]))) && !dir.exists(dir.casPath(hashOf(xs[1]))))
            #expect(dir.exists(dir.casPath(hashOf(xs[2]))) && dir.exists(dir.casPath(hashOf(xs[3]))))
        }
    }
}

@Suite struct ReadTests {
    @Test func offsetAndLimit() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let data = blob(80, size: 1000)
            let hash = hashOf(data)
            try await store.put(bytes: data, hash: hash)

            let r1 = try await store.openRead(hash: hash, offset: 100, limit: 50)
            #expect(r1.offset == 100 && r1.length == 50 && r1.blobSize == 1000)
            #expect(try r1.readAll() == Array(data[100..<150]))
            // Reads are clamped to the range and use absolute positions.
            var buffer = [UInt8](repeating: 0, count: 100)
            let n = try buffer.withUnsafeMutableBytes { try r1.read(at: 120, into: $0) }
            #expect(n == 30)
            #expect(Array(buffer[..<30]) == Array(data[120..<150]))
            #expect(try buffer.withUnsafeMutableBytes { try r1.read(at: 150, into: $0) } == 0)
            r1.close()
            await expectStoreError({ $0 == .closed }) {
                _ = try buffer.withUnsafeMutableBytes { try r1.read(at: 100, into: $0) }
            }

            let r2 = try await store.openRead(hash: hash, offset: 990, limit: 50)
            #expect(r2.length == 10)
            #expect(try r2.readAll() == Array(data[990...]))
            let r3 = try await store.openRead(hash: hash, offset: 1000)
            #expect(r3.length == 0)
            #expect(try r3.readAll() == [])
            let r4 = try await store.openRead(hash: hash, offset: 10)
            #expect(r4.length == 990)
            #expect(try r4.readAll() == Array(data[10...]))
            await expectStoreError({ $0 == .offsetOutOfRange(offset: 1001, size: 1000) }) {
                _ = try await store.openRead(hash: hash, offset: 1001)
            }
            await expectStoreError({ $0 == .notFound(hashOf([9])) }) { _ = try await store.openRead(hash: hashOf([9])) }
            #expect(store.stats.activeReads == 3)
            #expect(store.stats.pinnedBytes == 1000)
            for r in [r2, r3, r4] { r.close() }
            #expect(store.stats.activeReads == 0)
            #expect(store.stats.pinnedBytes == 0)
            #expect(store.stats.bytesOut == 50 + 30 + 10 + 990)
            #expect(store.stats.bytesIn == 1000)
        }
    }

    @Test func readerDeinitUnpins() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20) { $0.maxOpenReads = 1 }
            let data = blob(81, size: 10)
            try await store.put(bytes: data, hash: hashOf(data))
            for _ in 0..<3 {
                // Dropped without close(): deinit must release the slot, or the next iteration hangs.
                let bytes = try await withTimeout(10) {
                    let r = try await store.openRead(hash: hashOf(data))
                    return r.length
                }
                #expect(bytes == 10)
            }
            #expect(store.stats.pinnedBytes == 0 && store.stats.activeReads == 0)
        }
    }
}

@Suite struct ActionCacheTests {
    @Test func replaceAndLastWriterWins() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let key = hashOf(Array("action-1".utf8))
            #expect(try await store.getAction(key: key) == nil)
            try await store.putAction(key: key, value: [1, 2, 3])
            #expect(try await store.getAction(key: key) == [1, 2, 3])
            try await store.putAction(key: key, value: [4, 5])
            #expect(try await store.getAction(key: key) == [4, 5])
            #expect(store.stats.actionCount == 1 && store.stats.usedBytes == 2)

            let values = (0..<40).map { blob(UInt64(200 + $0), size: 100 + $0) }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for v in values { group.addTask { try await store.putAction(key: key, value: v) } }
                try await group.waitForAll()
            }
            let final = try #require(try await store.getAction(key: key))
            #expect(values.contains(final))
            #expect(store.stats.actionCount == 1)
            #expect(store.stats.usedBytes == Int64(final.count))
            #expect(store.stats.reservedBytes == 0)
            #expect(dir.tmpContents().isEmpty)
            let onDisk = try Data(contentsOf: URL(fileURLWithPath: dir.acPath(key)))
            #expect([UInt8](onDisk) == final)
            let s = store.stats
            #expect(s.hits == 3 && s.misses == 1)
        }
    }
}

@Suite struct ConcurrencyLimitTests {
    @Test func manyWritersWithTwoSlotsAllSucceed() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 24) { $0.maxConcurrentWrites = 2 }
            let maxActive = try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<200 {
                    group.addTask {
                        let data = blob(UInt64(5000 + i), size: 64 + i)
                        let writer = try await store.beginWrite(hash: hashOf(data), expectedSize: Int64(data.count))
                        let active = store.stats.activeWrites
                        try writer.write(Array(data[..<32]))
                        await Task.yield()
                        try writer.write(Array(data[32...]))
                        _ = try await writer.commit()
                        return active
                    }
                }
                return try await group.reduce(0, max)
            }
            #expect(maxActive <= 2)
            #expect(store.stats.blobCount == 200)
            #expect(store.stats.activeWrites == 0)
            #expect(store.stats.rejectedWrites == 0)
        }
    }

    @Test func writerDeinitReleasesSlotReservationAndTempFile() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1 << 20, metrics: metrics) { $0.maxConcurrentWrites = 1 }
            let data = blob(90, size: 5000)
            do {
                let w = try await store.beginWrite(hash: hashOf(data), expectedSize: 5000)
                try w.write(Array(data[..<100]))
                #expect(store.stats.reservedBytes == 5000)
                #expect(dir.tmpContents().count == 1)
            }
            #expect(store.stats.reservedBytes == 0)
            #expect(store.stats.activeWrites == 0)
            #expect(dir.tmpContents().isEmpty)
            #expect(try metrics.expectCounter("cachemesh_store_rejected_writes_total", [("reason", "aborted")]).totalValue == 1)
            // The only slot is free again.
            let digest = try await withTimeout(10) { try await store.put(bytes: data, hash: hashOf(data)) }
            #expect(digest.size == 5000)
        }
    }

    @Test func cancelledWaiterDoesNotLeakASlot() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20) { $0.maxConcurrentWrites = 1 }
            let hash = hashOf([1])
            let holder = try await store.beginWrite(hash: hash, expectedSize: nil)
            let waiter = Task { try await store.beginWrite(hash: hash, expectedSize: nil) }
            // Give the waiter time to queue up.
            while store.writeSlots.waiting == 0 { try await Task.sleep(nanoseconds: 1_000_000) }
            waiter.cancel()
            do {
                _ = try await waiter.value
                Issue.record("cancelled waiter acquired a slot")
            } catch {
                #expect(error is CancellationError)
            }
            #expect(store.stats.activeWrites == 1)
            holder.abort()
            #expect(store.stats.activeWrites == 0)
            let again = try await withTimeout(10) { try await store.beginWrite(hash: hash, expectedSize: nil).hash }
            #expect(again == hash)
        }
    }

    @Test func waitersAreServedInOrder() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let order = OrderRecorder()
        var tasks: [Task<Void, any Error>] = []
        for i in 0..<5 {
            tasks.append(Task {
                try await semaphore.acquire()
                order.append(i)
                semaphore.release()
            })
            while semaphore.waiting < i + 1 { try await Task.sleep(nanoseconds: 1_000_000) }
        }
        semaphore.release()
        for t in tasks { try await t.value }
        #expect(order.values == [0, 1, 2, 3, 4])
        #expect(semaphore.inUse == 0)
    }
}

final class OrderRecorder: Sendable {
    private let storage = Mutex<[Int]>([])
    func append(_ v: Int) { storage.withLock { $0.append(v) } }
    var values: [Int] { storage.withLock { $0 } }
}

@Suite struct SlotShareTests {
    @Test func anOwnerBeyondItsShareWaitsWhileOthersFindSlots() async throws {
        let limited = Mutex<[String]>([])
        let semaphore = AsyncSemaphore(permits: 4, perOwner: 2, onShareLimit: { o in limited.withLock { $0.append(o) } })
        try await semaphore.acquire(owner: "a")
        try await semaphore.acquire(owner: "a")
        let third = Task { try await semaphore.acquire(owner: "a") }
        while semaphore.waiting < 1 { try await Task.sleep(nanoseconds: 1_000_000) }
        // Two permits are free, but "a" holds its share: it waits, "b" does not.
        #expect(semaphore.inUse == 2)
        try await withTimeout(5) { try await semaphore.acquire(owner: "b") }
        try await withTimeout(5) { try await semaphore.acquire(owner: nil) }
        #expect(semaphore.held(by: "a") == 2 && semaphore.held(by: "b") == 1)
        #expect(limited.withLock { $0 } == ["a"])
        semaphore.release(owner: "a")
        try await third.value
        #expect(semaphore.held(by: "a") == 2)
        for o in ["a", "a", "b", nil] as [String?] { semaphore.release(owner: o) }
        #expect(semaphore.inUse == 0)
    }

    @Test func waitersAreServedRoundRobinBetweenOwners() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire(owner: "x")
        let order = OrderRecorder()
        var tasks: [Task<Void, any Error>] = []
        // Owner "a" queues three requests before owner "b" queues one.
        for (i, owner) in [(0, "a"), (1, "a"), (2, "a"), (3, "b")] {
            tasks.append(Task {
                try await semaphore.acquire(owner: owner)
                order.append(i)
                semaphore.release(owner: owner)
            })
            while semaphore.waiting < i + 1 { try await Task.sleep(nanoseconds: 1_000_000) }
        }
        semaphore.release(owner: "x")
        for t in tasks { try await t.value }
        // "b" goes second, not last.
        #expect(order.values == [0, 3, 1, 2])
        #expect(semaphore.inUse == 0)
    }
}
