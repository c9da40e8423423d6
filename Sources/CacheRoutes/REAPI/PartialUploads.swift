import BlobStore
import Foundation
import Logging
import MeshGRPC
import Synchronization

/// ByteStream uploads whose stream broke, kept for a while so the client can resume at
/// `committed_size` (QueryWriteStatus) instead of starting over.
final class PartialUploads: Sendable {
    final class Upload: Sendable {
        let writer: BlobWriter
        let digest: Digest
        init(writer: BlobWriter, digest: Digest) {
            self.writer = writer
            self.digest = digest
        }
    }

    private struct Parked {
        var upload: Upload
        var since: ContinuousClock.Instant
    }

    /// How long a broken upload waits for its client (Bazel resumes within seconds).
    static let ttl: Duration = .seconds(120)
    /// How many broken uploads may be parked at most (each holds a write slot and a temp file).
    static let maxParkedLimit = 16

    /// A quarter of the store's write slots, at most `maxParkedLimit`: parked uploads never hold
    /// more than that share of the slots (with 16 slots, 16 parked uploads blocked every write).
    static func maxParked(writeSlots: Int) -> Int { min(maxParkedLimit, max(1, writeSlots / 4)) }

    private let parked = Mutex<[String: Parked]>([:])
    /// Whether the expiry sweeper runs (one task, only while uploads are parked).
    private let sweeping = Mutex(false)
    /// How often parked uploads are checked for expiry.
    let sweepInterval: Duration
    let ttl: Duration
    private let active = Mutex<Set<String>>([])
    private let logger: Logger

    let maxParked: Int

    init(logger: Logger, ttl: Duration = PartialUploads.ttl, sweepInterval: Duration = .seconds(10), maxParked: Int = PartialUploads.maxParkedLimit) {
        self.logger = logger
        self.maxParked = maxParked
        self.ttl = ttl
        self.sweepInterval = sweepInterval
    }

    /// Parked uploads (each holds a write slot, a temp file and the space its bytes took).
    var parkedCount: Int { parked.withLock { $0.count } }

    /// Expires parked uploads on a timer, not only when another upload happens to arrive.
    private func startSweeper() {
        guard sweeping.withLock({ s in defer { s = true }; return !s }) else { return }
        Task.detached { [weak self] in
            while let me = self {
                try? await Task.sleep(for: me.sweepInterval)
                me.expire()
                let done = me.parked.withLock { p in me.sweeping.withLock { s in
                    if p.isEmpty { s = false }
                    return !s
                } }
                if done { return }
            }
        }
    }

    /// Start, or resume a parked upload of `resource` at `offset`.
    func resume(_ resource: String, digest: Digest, offset: Int64, store: BlobStore) async throws -> Upload {
        expire()
        let taken = active.withLock { $0.insert(resource).inserted }
        guard taken else { throw GRPCStatus(.aborted, "another Write to \(resource.prefix(200)) is in progress") }
        if let p = parked.withLock({ $0.removeValue(forKey: resource) }) {
            if offset == p.upload.writer.bytesWritten { return p.upload }
            if offset != 0 {
                parked.withLock { $0[resource] = p }
                active.withLock { _ = $0.remove(resource) }
                throw GRPCStatus(.invalidArgument, "write_offset \(offset) does not match committed size \(p.upload.writer.bytesWritten)")
            }
            p.upload.writer.abort()   // the client starts over
        } else if offset != 0 {
            active.withLock { _ = $0.remove(resource) }
            throw GRPCStatus(.invalidArgument, "write_offset \(offset) for an upload that is not in progress")
        }
        do {
            let writer = try await store.beginWrite(hash: digest.hash, expectedSize: digest.size)
            return Upload(writer: writer, digest: digest)
        } catch {
            active.withLock { _ = $0.remove(resource) }
            throw error
        }
    }

    func park(_ resource: String, _ upload: Upload) {
        active.withLock { _ = $0.remove(resource) }
        let evicted: [Upload] = parked.withLock { p in
            p[resource] = Parked(upload: upload, since: .now)
            var out: [Upload] = []
            while p.count > maxParked, let oldest = p.min(by: { $0.value.since < $1.value.since }) {
                out.append(oldest.value.upload)
                p.removeValue(forKey: oldest.key)
            }
            return out
        }
        evicted.forEach { $0.writer.abort() }
        startSweeper()
    }

    func finished(_ resource: String) {
        active.withLock { _ = $0.remove(resource) }
    }

    func discard(_ resource: String) {
        parked.withLock { $0.removeValue(forKey: resource) }?.upload.writer.abort()
    }

    func committed(_ resource: String) -> Int64? {
        parked.withLock { $0[resource]?.upload.writer.bytesWritten }
    }

    private func expire() {
        let now = ContinuousClock.now
        let old: [Upload] = parked.withLock { p in
            let expired = p.filter { now - $0.value.since > ttl }
            for k in expired.keys { p.removeValue(forKey: k) }
            return expired.values.map(\.upload)
        }
        if !old.isEmpty { logger.debug("expired \(old.count) parked upload(s)") }
        old.forEach { $0.writer.abort() }
    }
}
