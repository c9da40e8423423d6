import Logging
import Metrics
import Synchronization
import Foundation
import Glibc

/// Counters and gauges (hits, misses, rejections, bytes in and out) and the limit in force,
/// which shrinks to what the file system holds while it is full.
extension BlobStore {
    func countLookupLocked(_ s: inout State, hit: Bool) {
        if hit {
            s.hits += 1
            metrics.hits.increment()
        } else {
            s.misses += 1
            metrics.misses.increment()
        }
    }

    func recordLookup(hit: Bool) {
        state.withLock { countLookupLocked(&$0, hit: hit) }
    }

    func recordRejection(_ reason: RejectReason) {
        let shrunk = state.withLock { s -> Int64? in
            s.rejectedWrites += 1
            metrics.rejected[reason]?.increment()
            guard reason == .diskFull else { return nil }
            // The file system holds no more than what is stored now: evict to make room from here on.
            let limit = min(maxBytes, s.usedBytes + s.reservedBytes)
            s.diskLimit = limit
            metrics.limitBytes.record(limit)
            return limit
        }
        if let shrunk {
            logger.warning("the file system is full before max_bytes: the store's limit shrinks to what it holds", metadata: [
                "directory": "\(configuration.directory)", "limit_bytes": "\(shrunk)", "max_bytes": "\(maxBytes)",
            ])
        }
    }

    /// The limit in force: `maxBytes`, or less while the file system is full (``State/diskLimit``).
    func limitLocked(_ s: inout State) -> Int64 {
        guard let shrunk = s.diskLimit else { return maxBytes }
        // One statvfs per reservation, only while the file system is full.
        guard let space = Posix.fileSystemSpace(configuration.directory) else { return shrunk }
        let holds = s.usedBytes + s.reservedBytes + space.free
        if holds >= maxBytes {
            s.diskLimit = nil
            metrics.limitBytes.record(maxBytes)
            logger.notice("the file system has room again: the store's limit is max_bytes", metadata: ["max_bytes": "\(maxBytes)"])
            return maxBytes
        }
        // Grows as space is freed on the file system; never above what it holds.
        s.diskLimit = max(holds, 0)
        metrics.limitBytes.record(s.diskLimit!)
        return s.diskLimit!
    }

    func recordBytesIn(_ bytes: Int64) {
        guard bytes > 0 else { return }
        bytesInTotal.add(bytes, ordering: .relaxed)
        metrics.bytesIn.increment(by: bytes)
    }

    /// Bytes served from a copy of a blob held elsewhere (e.g. a memory tier in front of the store).
    public func recordBytesOut(_ bytes: Int64) {
        guard bytes > 0 else { return }
        bytesOutTotal.add(bytes, ordering: .relaxed)
        metrics.bytesOut.increment(by: bytes)
    }

    /// Updates the gauges; called under the lock so that they never go backwards in time.
    func publishLocked(_ s: inout State) {
        metrics.usedBytes.record(s.usedBytes)
        metrics.reservedBytes.record(s.reservedBytes)
        metrics.blobs.record(s.blobCount)
        metrics.actions.record(s.actionCount)
    }
}
