import BlobStore
import Foundation
import Logging
import Testing
@testable import CacheNode
@testable import CacheRoutes

@Suite struct PartialUploadsTests {
    /// A store in a fresh temp directory with `writeSlots` write slots.
    static func store(writeSlots: Int) throws -> (URL, BlobStore) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-parked-\(UUID().uuidString.prefix(8))")
        var config = BlobStoreConfiguration(directory: dir.path, maxBytes: 64 << 20)
        config.maxConcurrentWrites = writeSlots
        return (dir, try BlobStore(configuration: config, logger: Logger(label: "t")))
    }

    @Test("a parked ByteStream upload expires on a timer and gives back its slot, space and temp file (no other upload needed)")
    func parkedUploadsExpireOnTheirOwn() async throws {
        let (dir, store) = try Self.store(writeSlots: 1)
        defer { try? FileManager.default.removeItem(at: dir) }
        let uploads = PartialUploads(logger: Logger(label: "t"), ttl: .milliseconds(300), sweepInterval: .milliseconds(100))
        let digest = try #require(Digest(hash: String(repeating: "ab", count: 32), size: 60_000_000))
        let u = try await uploads.resume("uploads/x/blobs/\(digest.hash)/\(digest.size)", digest: digest, offset: 0, store: store)
        try u.writer.write([1])
        uploads.park("uploads/x/blobs/\(digest.hash)/\(digest.size)", u)
        #expect(uploads.parkedCount == 1)
        #expect(store.stats.activeWrites == 1)
        // Declared 60 MB, sent one byte: only what it sent (a chunk at most) is reserved.
        #expect(store.stats.reservedBytes <= 1 << 20)
        // Generous: a loaded CI machine may run the sweeper late; it returns as soon as it holds.
        let expired = await eventually(timeout: 60) { uploads.parkedCount == 0 && store.stats.activeWrites == 0 }
        #expect(expired)
        #expect(store.stats.reservedBytes == 0)
        let tmp = try FileManager.default.contentsOfDirectory(atPath: dir.appendingPathComponent("tmp").path)
        #expect(tmp.isEmpty)
    }

    @Test("parked uploads hold at most a quarter of the write slots: the oldest is dropped to stay within it")
    func parkedShareOfSlots() async throws {
        let (dir, store) = try Self.store(writeSlots: 8)
        defer { try? FileManager.default.removeItem(at: dir) }
        #expect(PartialUploads.maxParked(writeSlots: 8) == 2 && PartialUploads.maxParked(writeSlots: 64) == 16 && PartialUploads.maxParked(writeSlots: 2) == 1)
        let uploads = PartialUploads(logger: Logger(label: "t"), maxParked: PartialUploads.maxParked(writeSlots: 8))
        for i in 0..<5 {
            let digest = try #require(Digest(hash: String(repeating: String(format: "%02x", i), count: 32), size: 1000))
            let u = try await uploads.resume("uploads/\(i)/blobs/\(digest.hash)/1000", digest: digest, offset: 0, store: store)
            try u.writer.write([1])
            uploads.park("uploads/\(i)/blobs/\(digest.hash)/1000", u)
        }
        #expect(uploads.parkedCount == 2)
        #expect(store.stats.activeWrites == 2)   // 6 of the 8 slots stay free for everyone else
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` seconds pass.
private func eventually(timeout: Double, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return condition()
}
