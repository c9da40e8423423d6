import Foundation
import Testing
import MetricsTestKit
@testable import BlobStore

/// Runs `body` with a fresh tmpfs of `kib` KiB mounted on a temp directory (needs root, as CI has).
func withTmpfs<T>(kib: Int, _ body: (String) async throws -> T) async throws -> T {
    let dir = try TempDir()
    defer { dir.remove() }
    func run(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/" + args[0])
        p.arguments = Array(args.dropFirst())
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw BlobStoreError.io("\(args.joined(separator: " ")) failed") }
    }
    try run(["mount", "-t", "tmpfs", "-o", "size=\(kib)k", "tmpfs", dir.path])
    defer { try? run(["umount", dir.path]) }
    return try await body(dir.path)
}

/// A file system smaller than `max_bytes` (a real tmpfs, real ENOSPC).
@Suite(.serialized) struct FullDiskTests {
    @Test func aWriteThatCannotFitIsRefusedWholeAndTheLimitShrinksToTheFileSystem() async throws {
        try await withTmpfs(kib: 1024) { path in
            let metrics = TestMetrics()
            let store = try BlobStore(configuration: BlobStoreConfiguration(directory: path + "/store", maxBytes: 64 << 20),
                                      metricsFactory: metrics)
            var stored: [[UInt8]] = []
            var failure: BlobStoreError?
            for i in 0..<40 {
                let b = blob(UInt64(500 + i), size: 100 << 10)
                do {
                    try await store.put(bytes: b, hash: hashOf(b))
                    stored.append(b)
                } catch let e as BlobStoreError {
                    failure = e
                    break
                }
            }
            // The 1 MiB file system filled long before max_bytes (64 MiB).
            guard case .diskFull = failure else { Issue.record("expected diskFull, got \(String(describing: failure))"); return }
            #expect(stored.count >= 5 && stored.count <= 10)
            #expect(try FileManager.default.contentsOfDirectory(atPath: path + "/store/tmp").isEmpty)   // nothing partial
            #expect(store.stats.reservedBytes == 0)
            #expect(metrics.counterTotal(label: "cachemesh_store_rejected_writes_total") == 1)
            // Reads go on.
            for b in stored { #expect(try await store.readAll(hash: hashOf(b)) == b) }
            // The limit is now what the file system holds: the next write evicts the oldest blob
            // instead of failing.
            let next = blob(999, size: 100 << 10)
            try await store.put(bytes: next, hash: hashOf(next))
            #expect(store.stats.evictions >= 1)
            #expect(store.size(of: hashOf(stored[0])) == nil)
            #expect(try await store.readAll(hash: hashOf(next)) == next)
            #expect(try metrics.expectGauge("cachemesh_store_limit_bytes").lastValue! < Double(2 << 20))
        }
    }

    @Test func writesSucceedAgainOnceSpaceIsFreed() async throws {
        try await withTmpfs(kib: 1024) { path in
            let store = try BlobStore(configuration: BlobStoreConfiguration(directory: path + "/store", maxBytes: 64 << 20))
            // Something else fills the file system.
            let hog = path + "/hog"
            FileManager.default.createFile(atPath: hog, contents: Data(count: 900 << 10))
            let b = blob(7, size: 200 << 10)
            await #expect(throws: BlobStoreError.self) { try await store.put(bytes: b, hash: hashOf(b)) }
            #expect(try FileManager.default.contentsOfDirectory(atPath: path + "/store/tmp").isEmpty)
            #expect(store.stats.blobCount == 0 && store.stats.reservedBytes == 0)
            try FileManager.default.removeItem(atPath: hog)
            try await store.put(bytes: b, hash: hashOf(b))
            #expect(try await store.readAll(hash: hashOf(b)) == b)
            #expect(store.stats.evictions == 0)
        }
    }
}

/// A blob that cannot be read back intact is dropped, never served. The fault is injected by
/// truncating the file underneath the store (real EIO cannot be produced without a faulty device
/// or a device-mapper target): the size check at open, or the short read, catches it.
@Suite struct UnreadableBlobTests {
    @Test func aTruncatedBlobIsDroppedAtOpen() async throws {
        try await withTempDir { dir in
            let metrics = TestMetrics()
            let store = try makeStore(dir, maxBytes: 1 << 20, metrics: metrics)
            let b = blob(1, size: 10_000)
            try await store.put(bytes: b, hash: hashOf(b))
            #expect(truncate(dir.casPath(hashOf(b)), 5_000) == 0)
            await expectStoreError({ $0 == .notFound(hashOf(b)) }) { _ = try await store.readAll(hash: hashOf(b)) }
            #expect(store.size(of: hashOf(b)) == nil && store.stats.blobCount == 0 && store.stats.usedBytes == 0)
            #expect(!dir.exists(dir.casPath(hashOf(b))))
            #expect(try metrics.expectCounter("cachemesh_store_unreadable_total").totalValue == 1)
            // Stored again (as the mesh would), it is served.
            try await store.put(bytes: b, hash: hashOf(b))
            #expect(try await store.readAll(hash: hashOf(b)) == b)
        }
    }

    @Test func aBlobTruncatedWhileOpenFailsTheReadAndIsDropped() async throws {
        try await withTempDir { dir in
            let store = try makeStore(dir, maxBytes: 1 << 20)
            let b = blob(2, size: 10_000)
            try await store.put(bytes: b, hash: hashOf(b))
            let reader = try await store.openRead(hash: hashOf(b))
            #expect(truncate(dir.casPath(hashOf(b)), 100) == 0)
            #expect(throws: BlobStoreError.self) { _ = try reader.readAll() }
            #expect(store.size(of: hashOf(b)) == nil && store.stats.pinnedBytes == 0)
            reader.close()   // unpins nothing: the entry is gone
            try await store.put(bytes: b, hash: hashOf(b))
            let again = try await store.openRead(hash: hashOf(b))
            #expect(try again.readAll() == b)
            again.close()
        }
    }
}
