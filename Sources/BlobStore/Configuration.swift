import Synchronization

/// Settings of a ``BlobStore``.
public struct BlobStoreConfiguration: Sendable {
    /// Root directory; the store uses `cas/`, `ac/` and `tmp/` below it.
    public var directory: String
    /// Hard limit on stored bytes (CAS blobs + AC values + bytes reserved by uploads in progress).
    public var maxBytes: Int64
    /// Maximum number of uploads (CAS writers and `putAction`) in progress. Excess writers wait (FIFO), they never fail.
    public var maxConcurrentWrites: Int = 64
    /// Maximum number of open readers (and `getAction` calls). Excess readers wait (FIFO), they never fail.
    public var maxOpenReads: Int = 512
    /// The share of the read and write slots one connection (`SlotShare.owner`) may hold at once,
    /// in percent of each (at least one slot); its further requests wait while others find slots.
    public var connectionSlotSharePercent: Int = 25

    /// One connection's share of `slots` slots.
    public func slotShare(of slots: Int) -> Int { max(1, slots * min(100, max(1, connectionSlotSharePercent)) / 100) }
    /// How often (seconds) the recency of an entry is persisted to disk by bumping its mtime.
    /// Recency in memory is always exact; the mtime only orders the index after a restart.
    public var recencyPersistInterval: Int64 = 600
    /// Blobs at least this large are sent from a read-only mapping of their file (no copy into a
    /// buffer) where the transport can use one (HTTP/3); smaller ones are read with pread.
    public var mapMinimumBytes: Int64 = 1 << 20
    /// Address space of the mappings kept for reuse (least recently used unmapped first);
    /// 0 maps and unmaps per response.
    public var mappedCacheBytes: Int64 = 2 << 30
    /// Bound on the space uploads still being verified may free by evicting verified entries
    /// (nil: `maxBytes`, no bound beyond the store's). Space is reserved as bytes arrive, never for
    /// a declared size up front; while the reservations of all unverified uploads together exceed
    /// this, an upload that needs more space gets it only from free space, never by eviction
    /// (``BlobStoreError/unverifiedLimit(inFlight:limit:)`` otherwise). A node sets a quarter of
    /// `maxBytes`: an upload that stalls, lies about its hash or about its size can then cost the
    /// cache at most that much, and only for bytes it actually sent.
    public var maxUnverifiedBytes: Int64?

    /// Index the files on disk on a background thread (``BlobStore/indexProgress``) instead of in
    /// `init`. Meanwhile a lookup that misses the index checks the disk (and indexes what it
    /// finds), and an upload that would need eviction waits for the scan to finish.
    public var scanInBackground = false
    /// Files the startup scan examines per second at most (0: no bound): bounds its I/O.
    public var scanRate = 250_000
    /// Threads of the startup scan (each takes the next prefix directory): 0 = the CPUs this
    /// process may run on. At most 8. The index (contents and LRU order) does not depend on it.
    public var scanThreads = 0

    /// What an acknowledged write means on disk: ``Durability/fsync`` (data synced before the
    /// rename, directory after; concurrent commits share the syncs) or ``Durability/none``.
    public var durability: Durability = .none
    /// Builds without the Bytes (Bazel's `--experimental_remote_cache_ttl`, 3 h) assumes the blobs it
    /// was told about stay for a while. A blob used (HEAD, FindMissingBlobs, a GetActionResult that
    /// names it, a read, a write) within this many seconds is evicted only after every blob unused
    /// for longer (LRU order), and evicting one is counted (`cachemesh_store_ttl_evictions_total`)
    /// and logged. 0: no accounting.
    public var minTTLSeconds: Int64 = 3 * 3600
    /// Tests: holds the scan before each directory while closed.
    var scanGate: ScanGate?
    /// Tests: holds the group committer while closed.
    var commitGate: ScanGate?

    public init(directory: String, maxBytes: Int64) {
        self.directory = directory
        self.maxBytes = maxBytes
    }
}

/// A consistent snapshot of the store's accounting (taken under the store lock).
public struct BlobStoreStats: Sendable, Equatable, CustomStringConvertible {
    /// Bytes of committed CAS blobs and AC values.
    public var usedBytes: Int64
    /// Bytes reserved by uploads in progress.
    public var reservedBytes: Int64
    /// The configured limit; `usedBytes + reservedBytes <= maxBytes` always holds.
    public var maxBytes: Int64
    /// Number of CAS blobs (the virtual empty blob is not counted).
    public var blobCount: Int
    /// Number of action-cache entries.
    public var actionCount: Int
    /// Lookups that found the entry (CAS `size(of:)`, `contains`, `openRead`, AC `getAction`).
    public var hits: Int64
    /// Lookups that did not find the entry.
    public var misses: Int64
    /// Entries deleted to make room.
    public var evictions: Int64
    /// Bytes received by writers and `putAction`.
    public var bytesIn: Int64
    /// Bytes delivered by readers and `getAction`.
    public var bytesOut: Int64
    /// Writes that did not end in a commit (all reasons).
    public var rejectedWrites: Int64
    /// Bytes of entries currently pinned (by open readers or dedup-uploads); these cannot be evicted.
    public var pinnedBytes: Int64
    /// Write slots in use.
    public var activeWrites: Int
    /// Read slots in use.
    public var activeReads: Int

    public var description: String {
        "used=\(usedBytes) reserved=\(reservedBytes) max=\(maxBytes) blobs=\(blobCount) actions=\(actionCount) "
            + "hits=\(hits) misses=\(misses) evictions=\(evictions) in=\(bytesIn) out=\(bytesOut) rejected=\(rejectedWrites) "
            + "pinned=\(pinnedBytes) writes=\(activeWrites) reads=\(activeReads)"
    }
}

/// Holds the startup scan (tests that check what a store does while its index is incomplete).
final class ScanGate: Sendable {
    private let closed = Mutex(true)
    func open() { closed.withLock { $0 = false } }
    var isClosed: Bool { closed.withLock { $0 } }
}
