import Logging
import Metrics
import Synchronization
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A size-bounded, content-addressed blob store (CAS) plus an action cache (AC)
/// on the local file system.
///
/// ## Layout
/// ```
/// <directory>/cas/XX/<sha256>   committed blobs (XX = first two hex digits)
/// <directory>/ac/XX/<key>       action-cache values
/// <directory>/tmp/<random>.tmp  uploads in progress (wiped on start)
/// ```
/// Every path component below `<directory>` is either fixed, random, or a
/// validated 64-character lowercase hex string: raw client input never reaches
/// the file system.
///
/// ## Guarantees
/// * **Nothing partial is ever readable.** Uploads stream into `tmp/`, are hashed
///   while written, and are atomically `rename(2)`d into `cas/` only after the hash
///   (and size, if declared) has been verified.
/// * **Hard size limit.** `usedBytes + reservedBytes <= maxBytes` at all times.
///   Writers reserve space *before* writing (all at once when the size is known,
///   incrementally otherwise); room is made by evicting least recently used
///   entries that are not pinned by an open reader. If no room can be made the
///   write fails with ``BlobStoreError/insufficientStorage(needed:available:)``.
/// * **LRU in O(1).** Recency lives in memory (an intrusive doubly-linked list);
///   it is persisted lazily as the file mtime (at most once per
///   ``BlobStoreConfiguration/recencyPersistInterval`` per entry), which orders
///   the index when the store is reopened.
/// * **Bounded concurrency without failures.** Writers and readers take a slot
///   from FIFO async semaphores; when the pools are busy callers wait.
///
/// ## Durability
/// ``BlobStoreConfiguration/durability``: with ``Durability/fsync`` a commit syncs the file's data
/// before the rename and the directory after (concurrent commits share the syncs, see
/// ``GroupCommitter``); with ``Durability/none`` a crash of the *process* still cannot expose
/// partial data (page cache + atomic rename), but a power loss may lose or truncate the newest
/// blobs. A file whose size is not the indexed one is dropped when opened, never served.
///
/// All methods are thread-safe. File system mutations that must agree with the
/// index (commit renames, eviction unlinks) happen under the store lock.
public final class BlobStore: Sendable {
    // MARK: State

    struct State {
        var index = LRUIndex()
        var usedBytes: Int64 = 0
        var reservedBytes: Int64 = 0
        var pinnedBytes: Int64 = 0
        var blobCount = 0
        var actionCount = 0
        var hits: Int64 = 0
        var misses: Int64 = 0
        var evictions: Int64 = 0
        var rejectedWrites: Int64 = 0
        /// The startup scan has indexed every file (until then a lookup that misses asks the disk).
        var scanComplete = false
        /// Prefix directories (of 512) the scan has finished.
        var scannedDirectories = 0
        /// Entries the scan has added (the rest of the index came from lookups and writes).
        var scannedEntries = 0
        var scanWaiters: [CheckedContinuation<Void, Never>] = []
        /// While the scan runs: an upper bound on the bytes of files not indexed yet (the file
        /// system's used space at start, less what has been indexed since), so writes before the
        /// scan completes never take the store past `maxBytes`. 0 once the scan is done.
        var unscannedEstimate: Int64 = 0
        /// Set when the file system ran out of space before `maxBytes`: what it holds (bytes
        /// stored + reserved + free on the file system), rechecked at every reservation; nil
        /// once the file system has room for `maxBytes` again.
        var diskLimit: Int64?
        /// Evictions of entries used within `minTTLSeconds`.
        var ttlEvictions: Int64 = 0
    }

    /// Label values of the `reason` dimension of `cachemesh_store_rejected_writes_total`.
    enum RejectReason: String, CaseIterable, Sendable {
        case digestMismatch = "digest_mismatch"
        case sizeMismatch = "size_mismatch"
        case tooLarge = "too_large"
        case insufficientStorage = "insufficient_storage"
        case unverifiedLimit = "unverified_limit"
        case indexing = "indexing"
        case diskFull = "disk_full"
        case aborted = "aborted"
    }

    struct StoreMetrics: Sendable {
        let usedBytes: Gauge
        let limitBytes: Gauge
        let reservedBytes: Gauge
        let blobs: Gauge
        let actions: Gauge
        let hits: Counter
        let misses: Counter
        let evictions: Counter
        let bytesIn: Counter
        let bytesOut: Counter
        let rejected: [RejectReason: Counter]
        let unreadable: Counter
        let ttlEvictions: Counter

        init(factory: any MetricsFactory) {
            usedBytes = Gauge(label: "cachemesh_store_used_bytes", factory: factory)
            limitBytes = Gauge(label: "cachemesh_store_limit_bytes", factory: factory)
            reservedBytes = Gauge(label: "cachemesh_store_reserved_bytes", factory: factory)
            blobs = Gauge(label: "cachemesh_store_blobs", factory: factory)
            actions = Gauge(label: "cachemesh_store_actions", factory: factory)
            hits = Counter(label: "cachemesh_store_hits_total", factory: factory)
            misses = Counter(label: "cachemesh_store_misses_total", factory: factory)
            evictions = Counter(label: "cachemesh_store_evictions_total", factory: factory)
            bytesIn = Counter(label: "cachemesh_store_bytes_in_total", factory: factory)
            bytesOut = Counter(label: "cachemesh_store_bytes_out_total", factory: factory)
            var rejected: [RejectReason: Counter] = [:]
            for reason in RejectReason.allCases {
                rejected[reason] = Counter(label: "cachemesh_store_rejected_writes_total",
                                           dimensions: [("reason", reason.rawValue)], factory: factory)
            }
            self.rejected = rejected
            unreadable = Counter(label: "cachemesh_store_unreadable_total", factory: factory)
            ttlEvictions = Counter(label: "cachemesh_store_ttl_evictions_total", factory: factory)
        }
    }

    /// An entry removed to make room (logged after the lock is released).
    struct Evicted {
        var key: EntryKey
        var size: Int64
        var unlinkErrno: Int32?
        var withinTTL = false
        var lastUse: Int64 = 0
    }

    /// The configuration the store was opened with.
    public let configuration: BlobStoreConfiguration
    let logger: Logger
    let casDirectory: String
    let acDirectory: String
    let tmpDirectory: String
    let writeSlots: AsyncSemaphore
    let readSlots: AsyncSemaphore
    let state: Mutex<State>
    let evictionHandler = Mutex<(@Sendable (Digest) -> Void)?>(nil)
    let mappings: Mutex<MappingLRU<BlobMapping>>
    let metrics: StoreMetrics
    let bytesInTotal = Atomic<Int64>(0)
    let bytesOutTotal = Atomic<Int64>(0)
    let removedTempFiles: Int
    /// Shares the syncs of concurrent commits (``Durability/fsync``; its thread starts on first use).
    var committer: GroupCommitter { groupCommitter! }
    private let groupCommitter: GroupCommitter?

    var maxBytes: Int64 { configuration.maxBytes }
    var maxUnverifiedBytes: Int64 { min(configuration.maxUnverifiedBytes ?? configuration.maxBytes, configuration.maxBytes) }

    /// Granularity of incremental reservations for uploads of unknown size: at most
    /// 1 MiB, and small enough that all concurrent writers together over-reserve
    /// at most a quarter of `maxBytes` (so over-reservation cannot starve others).
    let reservationChunk: Int64

    // MARK: Opening

    /// Opens (creating if needed) a store in `configuration.directory`.
    ///
    /// Creates `cas/`, `ac/` and `tmp/`, deletes everything in `tmp/` (leftovers of
    /// a crash), and rebuilds the index from disk, ordering entries by file mtime
    /// (oldest = first to evict). Files whose names are not valid hashes are
    /// removed. If the directory holds more than `maxBytes`, the oldest entries are
    /// evicted right away.
    ///
    /// - Parameters:
    ///   - metricsFactory: the swift-metrics factory to use; `nil` means the
    ///     process-wide `MetricsSystem.factory`.
    /// - Throws: ``BlobStoreError/io(_:)`` if the directories cannot be created.
    public init(configuration: BlobStoreConfiguration,
                logger: Logger = Logger(label: "cachemesh.store"),
                metricsFactory: (any MetricsFactory)? = nil) throws {
        guard configuration.maxBytes >= 0 else {
            throw BlobStoreError.io("invalid configuration: maxBytes must not be negative")
        }
        var directory = configuration.directory
        while directory.count > 1 && directory.hasSuffix("/") { directory.removeLast() }
        guard !directory.isEmpty else { throw BlobStoreError.io("invalid configuration: empty directory") }

        self.configuration = configuration
        self.mappings = Mutex(MappingLRU(maxBytes: configuration.mappedCacheBytes))
        self.logger = logger
        casDirectory = directory + "/cas"
        acDirectory = directory + "/ac"
        tmpDirectory = directory + "/tmp"
        writeSlots = AsyncSemaphore(permits: configuration.maxConcurrentWrites, perOwner: configuration.slotShare(of: configuration.maxConcurrentWrites),
                                    onShareLimit: Self.shareLimitNotice(kind: "write", logger: logger))
        reservationChunk = max(1, min(1 << 20, configuration.maxBytes / Int64(4 * max(1, configuration.maxConcurrentWrites))))
        readSlots = AsyncSemaphore(permits: configuration.maxOpenReads, perOwner: configuration.slotShare(of: configuration.maxOpenReads),
                                   onShareLimit: Self.shareLimitNotice(kind: "read", logger: logger))
        metrics = StoreMetrics(factory: metricsFactory ?? MetricsSystem.factory)

        // The layout, then a write probe: a directory the node cannot write to (read-only mount,
        // immutable flag, permissions) stops it here, named, instead of failing every PUT later.
        var prefixDirectories: [String] = []
        for prefix in 0..<256 {
            let xx = BlobStore.hexPrefix(prefix)
            prefixDirectories += [casDirectory + "/" + xx, acDirectory + "/" + xx]
        }
        do {
            try Posix.makeDirectories(directory)
            for sub in [casDirectory, acDirectory, tmpDirectory] + prefixDirectories { try Posix.makeDirectory(sub) }
        } catch {
            throw DataDirectoryError(path: directory, reason: error.ioText)
        }
        try DataDirectoryError.probe(directory: directory, temporary: tmpDirectory,
                                     written: [directory, casDirectory, acDirectory] + prefixDirectories)

        removedTempFiles = BlobStore.wipe(directory: tmpDirectory, logger: logger)
        groupCommitter = configuration.durability == .fsync ? GroupCommitter(gate: configuration.commitGate) : nil
        var initial = State()
        // Allocated blocks are never fewer than the bytes of the files in them.
        initial.unscannedEstimate = Posix.fileSystemSpace(directory).map { $0.total - $0.free } ?? configuration.maxBytes
        state = Mutex(initial)
        metrics.limitBytes.record(configuration.maxBytes)
        state.withLock { publishLocked(&$0) }
        if configuration.scanInBackground {
            // Requests are served meanwhile: a blob not indexed yet is looked up on disk.
            Posix.startThread { [self] in self.runScan() }
        } else {
            runScan()
        }
    }

    static func hexPrefix(_ value: Int) -> String {
        let s = String(value, radix: 16)
        return s.count == 1 ? "0" + s : s
    }

    static func isHexPrefix(_ s: String) -> Bool {
        s.utf8.count == 2 && s.utf8.allSatisfy {
            ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "f"))
        }
    }

    /// Deletes everything inside `directory`; returns the number of items removed.
    private static func wipe(directory: String, logger: Logger) -> Int {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var removed = 0
        for name in names {
            do {
                try FileManager.default.removeItem(atPath: directory + "/" + name)
                removed += 1
            } catch {
                logger.warning("cannot remove leftover temp file", metadata: ["path": "\(directory)/\(name)", "error": "\(error)"])
            }
        }
        return removed
    }

    // MARK: Paths

    /// Path of a committed entry. `key.hash` is always a validated hash.
    func path(for key: EntryKey) -> String {
        let base = key.kind == .cas ? casDirectory : acDirectory
        return "\(base)/\(key.hash.prefix(2))/\(key.hash)"
    }

    // MARK: Statistics

    /// A snapshot of the store's accounting; consistent with the exported metrics.
    public var stats: BlobStoreStats {
        // Copy only scalars: holding a copy of the index arrays would force copy-on-write of the whole index.
        var stats = state.withLock { s in
            BlobStoreStats(usedBytes: s.usedBytes, reservedBytes: s.reservedBytes, maxBytes: maxBytes,
                           blobCount: s.blobCount, actionCount: s.actionCount, hits: s.hits, misses: s.misses,
                           evictions: s.evictions, bytesIn: 0, bytesOut: 0, rejectedWrites: s.rejectedWrites,
                           pinnedBytes: s.pinnedBytes, activeWrites: 0, activeReads: 0)
        }
        stats.bytesIn = bytesInTotal.load(ordering: .relaxed)
        stats.bytesOut = bytesOutTotal.load(ordering: .relaxed)
        stats.activeWrites = writeSlots.inUse
        stats.activeReads = readSlots.inUse
        return stats
    }
}
