import Logging
import Metrics
import Synchronization
import Foundation
import Glibc

/// LRU bookkeeping and eviction: recency, reservations that evict, pins, `min_ttl` accounting
/// and the log lines and mesh notices of evicted entries.
extension BlobStore {
    // MARK: Bookkeeping (callers hold the lock for *Locked functions)

    /// Marks `slot` as most recently used. Returns the file path whose mtime should
    /// be bumped (outside the lock) if the persisted recency is stale.
    func touchLocked(_ s: inout State, _ slot: Int, now: Int64) -> String? {
        s.index.touch(slot)
        guard now - s.index.persistedMtime(slot) >= configuration.recencyPersistInterval else { return nil }
        s.index.setPersistedMtime(slot, now)
        return path(for: s.index.key(slot))
    }

    /// Reserves `needed` bytes, evicting least recently used unpinned entries first if necessary.
    func reserveLocked(_ s: inout State, _ needed: Int64, _ evicted: inout [Evicted]) throws(BlobStoreError) {
        let limit = limitLocked(&s)
        if s.usedBytes + s.reservedBytes + s.unscannedEstimate + needed > limit {
            // Eviction on behalf of unverified bytes is bounded node-wide.
            guard s.reservedBytes + needed <= maxUnverifiedBytes else {
                throw .unverifiedLimit(inFlight: s.reservedBytes, limit: maxUnverifiedBytes)
            }
            // Before the scan is done the LRU order is unknown (and so is the size of what is not
            // scanned yet): evict nothing. `beginWrite` waits for the scan when space is short; a
            // writer that still gets here is told to come back.
            guard s.scanComplete else {
                throw .indexing(scannedDirectories: s.scannedDirectories, totalDirectories: BlobStore.scanDirectoryCount)
            }
            // Everything that is neither reserved nor pinned can be freed.
            let obtainable = limit - s.reservedBytes - s.pinnedBytes
            guard needed <= obtainable else {
                throw .insufficientStorage(needed: needed, available: max(0, obtainable))
            }
            var cursor = s.index.head
            while s.usedBytes + s.reservedBytes + needed > limit && cursor != LRUIndex.none {
                let next = s.index.next(cursor)
                if s.index.pins(cursor) == 0 { evictLocked(&s, cursor, &evicted) }
                cursor = next
            }
            guard s.usedBytes + s.reservedBytes + needed <= limit else {
                throw .insufficientStorage(needed: needed, available: max(0, limit - s.usedBytes - s.reservedBytes))
            }
        }
        s.reservedBytes += needed
    }

    func evictLocked(_ s: inout State, _ slot: Int, _ evicted: inout [Evicted]) {
        // Used within min_ttl? The persisted mtime lags the last use by up to the persist interval,
        // so that much is added: a blob counted as outside its TTL really is.
        let lastUse = s.index.persistedMtime(slot)
        let withinTTL = configuration.minTTLSeconds > 0
            && Posix.nowSeconds() - lastUse < configuration.minTTLSeconds + configuration.recencyPersistInterval
        let node = removeEntryLocked(&s, slot)
        s.evictions += 1
        metrics.evictions.increment()
        if withinTTL {
            s.ttlEvictions += 1
            metrics.ttlEvictions.increment()
        }
        evicted.append(Evicted(key: node.key, size: node.size, unlinkErrno: Posix.unlinkIfPresent(path(for: node.key)),
                               withinTTL: withinTTL, lastUse: lastUse))
    }

    /// Removes an entry from the index and the accounting (not from disk).
    @discardableResult
    func removeEntryLocked(_ s: inout State, _ slot: Int) -> (key: EntryKey, size: Int64) {
        let node = s.index.remove(slot)
        s.usedBytes -= node.size
        if node.pins > 0 { s.pinnedBytes -= node.size }
        if node.key.kind == .cas { s.blobCount -= 1 } else { s.actionCount -= 1 }
        return (node.key, node.size)
    }

    func pinLocked(_ s: inout State, _ slot: Int) {
        if s.index.pin(slot) == 1 { s.pinnedBytes += s.index.size(slot) }
    }

    func unpinLocked(_ s: inout State, _ slot: Int) {
        if s.index.unpin(slot) == 0 { s.pinnedBytes -= s.index.size(slot) }
    }

    func unpin(_ key: EntryKey) {
        state.withLock { s in
            // Not pinned: the entry was dropped (unreadable) and stored again meanwhile.
            if let slot = s.index.lookup(key), s.index.pins(slot) > 0 { unpinLocked(&s, slot) }
        }
    }

    /// Called (outside the store lock) with every blob the store evicts to make room, so a mesh
    /// can stop announcing it.
    public func onEviction(_ handler: @escaping @Sendable (Digest) -> Void) {
        evictionHandler.withLock { $0 = handler }
    }

    func logEvictions(_ evicted: [Evicted]) {
        for entry in evicted { dropMapping(entry.key) }
        if !evicted.isEmpty, let handler = evictionHandler.withLock({ $0 }) {
            for entry in evicted where entry.key.kind == .cas {
                if let d = Digest(hash: entry.key.hash, size: entry.size) { handler(d) }
            }
        }
        let now = Posix.nowSeconds()
        for entry in evicted where entry.withinTTL {
            logger.warning("evicted a blob used within min_ttl: the store is too small for what builds use (Builds without the Bytes may miss it)", metadata: [
                "kind": "\(entry.key.kind)", "hash": "\(entry.key.hash)", "size": "\(entry.size)",
                "last_use_s_ago_at_most": "\(now - entry.lastUse + configuration.recencyPersistInterval)",
                "min_ttl_s": "\(configuration.minTTLSeconds)",
            ])
        }
        for entry in evicted {
            if let code = entry.unlinkErrno {
                logger.warning("cannot delete evicted entry", metadata: [
                    "path": "\(path(for: entry.key))", "error": "\(Posix.errnoText(code))",
                ])
            } else {
                logger.debug("evicted", metadata: [
                    "kind": "\(entry.key.kind)", "hash": "\(entry.key.hash)", "size": "\(entry.size)",
                ])
            }
        }
    }
}
