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
    private let evictionHandler = Mutex<(@Sendable (Digest) -> Void)?>(nil)
    private let mappings: Mutex<MappingLRU<BlobMapping>>
    let metrics: StoreMetrics
    private let bytesInTotal = Atomic<Int64>(0)
    private let bytesOutTotal = Atomic<Int64>(0)
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

    // MARK: CAS lookups

    /// Size of the blob `hash`, or `nil` if it is absent (or `hash` is not a valid hash).
    /// The empty blob always has size 0. Counts a hit or miss and marks the blob as recently used.
    public func size(of hash: String) -> Int64? {
        guard Digest.isValidHash(hash) else { return nil }
        if hash == Digest.emptyHash {
            recordLookup(hit: true)
            return 0
        }
        let now = Posix.nowSeconds()
        let (size, touchPath) = state.withLock { s -> (Int64?, String?) in
            guard let slot = findLocked(&s, EntryKey(kind: .cas, hash: hash), now: now) else {
                countLookupLocked(&s, hit: false)
                return (nil, nil)
            }
            countLookupLocked(&s, hit: true)
            return (s.index.size(slot), touchLocked(&s, slot, now: now))
        }
        if let touchPath { Posix.touch(touchPath) }
        return size
    }

    /// Size of the blob `hash` if it is stored, without counting a hit or miss or touching its
    /// recency (mesh bookkeeping — another node asking whether this one holds it — is not use).
    public func peekSize(of hash: String) -> Int64? {
        guard Digest.isValidHash(hash) else { return nil }
        if hash == Digest.emptyHash { return 0 }
        return state.withLock { s in findLocked(&s, EntryKey(kind: .cas, hash: hash), now: Posix.nowSeconds()).map { s.index.size($0) } }
    }

    /// `true` if the blob is present with exactly `digest.size` bytes. The empty digest is always present.
    /// Counts a hit or miss and marks the blob as recently used.
    public func contains(_ digest: Digest) -> Bool {
        if digest.hash == Digest.emptyHash {
            let hit = digest.size == 0
            recordLookup(hit: hit)
            return hit
        }
        let now = Posix.nowSeconds()
        let (hit, touchPath) = state.withLock { s -> (Bool, String?) in
            guard let slot = findLocked(&s, EntryKey(kind: .cas, hash: digest.hash), now: now), s.index.size(slot) == digest.size else {
                countLookupLocked(&s, hit: false)
                return (false, nil)
            }
            countLookupLocked(&s, hit: true)
            return (true, touchLocked(&s, slot, now: now))
        }
        if let touchPath { Posix.touch(touchPath) }
        return hit
    }

    // MARK: CAS writes

    enum WritePlan: Sendable {
        /// The blob already exists (and is pinned, unless it is the virtual empty blob):
        /// the upload is only hashed, not stored.
        case dedup(pinned: Bool)
        /// Stream into a temp file; `Int64` bytes are already reserved.
        case store(reserved: Int64)
    }

    /// Starts an upload of the blob `hash`.
    ///
    /// Waits (FIFO) for a write slot. If `expectedSize` is given, the write is
    /// rejected with ``BlobStoreError/tooLarge(size:limit:)`` when it exceeds
    /// `maxBytes`, and otherwise the whole size is reserved immediately (evicting
    /// LRU entries; ``BlobStoreError/insufficientStorage(needed:available:)`` if
    /// that is impossible). Without `expectedSize`, space is reserved as bytes
    /// arrive. If the blob already exists, the upload is verified but not stored
    /// (and the existing blob is pinned until the writer finishes).
    ///
    /// - Throws: ``BlobStoreError/invalidHash(_:)``, `tooLarge`, `insufficientStorage`,
    ///   `io`, or `CancellationError` if cancelled while waiting for a slot.
    public func beginWrite(hash: String, expectedSize: Int64?) async throws -> BlobWriter {
        guard Digest.isValidHash(hash) else { throw BlobStoreError.invalidHash(hash) }
        if let expectedSize {
            if expectedSize < 0 {
                recordRejection(.sizeMismatch)
                throw BlobStoreError.sizeMismatch(expected: expectedSize, actual: 0)
            }
            if expectedSize > maxBytes {
                recordRejection(.tooLarge)
                throw BlobStoreError.tooLarge(size: expectedSize, limit: maxBytes)
            }
        }
        // While the startup scan runs nothing is evicted: an upload that may need room waits for it.
        let mayNeedRoom = state.withLock { s in
            !s.scanComplete && s.usedBytes + s.reservedBytes + s.unscannedEstimate + max(expectedSize ?? reservationChunk, 1) > limitLocked(&s)
        }
        if mayNeedRoom { await waitUntilIndexed() }
        try await writeSlots.acquire()
        let plan: WritePlan
        do {
            plan = try prepareWrite(hash: hash, expectedSize: expectedSize)
        } catch {
            writeSlots.release()
            if case .insufficientStorage = error { recordRejection(.insufficientStorage) }
            if case .unverifiedLimit = error { recordRejection(.unverifiedLimit) }
            if case .indexing = error { recordRejection(.indexing) }
            throw error
        }
        switch plan {
        case .dedup(let pinned):
            return BlobWriter(store: self, hash: hash, expectedSize: expectedSize, sink: .discard(pinned: pinned), reserved: 0)
        case .store(let reserved):
            do {
                let temp = try Posix.createTempFile(in: tmpDirectory)
                return BlobWriter(store: self, hash: hash, expectedSize: expectedSize,
                                  sink: .file(fd: temp.fd, path: temp.path), reserved: reserved)
            } catch {
                releaseReservation(reserved)
                writeSlots.release()
                recordRejection(.aborted)
                logger.warning("cannot create temp file for upload", metadata: ["error": "\(error)"])
                throw error
            }
        }
    }

    private func prepareWrite(hash: String, expectedSize: Int64?) throws(BlobStoreError) -> WritePlan {
        if hash == Digest.emptyHash { return .dedup(pinned: false) }
        var evicted: [Evicted] = []
        let result = state.withLock { s -> Result<WritePlan, BlobStoreError> in
            if let slot = findLocked(&s, EntryKey(kind: .cas, hash: hash), now: Posix.nowSeconds()) {
                pinLocked(&s, slot)
                return .success(.dedup(pinned: true))
            }
            // Space is reserved as bytes arrive (`reserveAdditional`), never for the declared size up
            // front: a client that declares gigabytes and sends nothing must not evict anything.
            // What can already be told is refused now.
            if let expectedSize, expectedSize > 0 {
                let limit = limitLocked(&s)
                let free = limit - s.usedBytes - s.reservedBytes
                if expectedSize > limit - s.pinnedBytes {
                    return .failure(.insufficientStorage(needed: expectedSize, available: max(0, limit - s.pinnedBytes)))
                }
                if expectedSize > free, s.reservedBytes + expectedSize > maxUnverifiedBytes {
                    return .failure(.unverifiedLimit(inFlight: s.reservedBytes, limit: maxUnverifiedBytes))
                }
            }
            return .success(.store(reserved: 0))
        }
        logEvictions(evicted)
        return try result.get()
    }

    /// Reserves more space for a writer of unknown size: `preferred` bytes if they
    /// fit without evicting, else exactly `minimum` (evicting as needed).
    /// - Returns: the number of bytes reserved.
    func reserveAdditional(minimum: Int64, preferred: Int64) throws(BlobStoreError) -> Int64 {
        var evicted: [Evicted] = []
        let result = state.withLock { s -> Result<Int64, BlobStoreError> in
            var amount = minimum
            if s.usedBytes + s.reservedBytes + s.unscannedEstimate + preferred <= limitLocked(&s) {
                amount = preferred
                s.reservedBytes += preferred
            } else {
                do throws(BlobStoreError) {
                    try reserveLocked(&s, minimum, &evicted)
                } catch {
                    return .failure(error)
                }
            }
            publishLocked(&s)
            return .success(amount)
        }
        logEvictions(evicted)
        return try result.get()
    }

    /// Gives back reserved bytes (aborted or deduplicated uploads).
    func releaseReservation(_ bytes: Int64) {
        guard bytes > 0 else { return }
        state.withLock { s in
            s.reservedBytes -= bytes
            precondition(s.reservedBytes >= 0, "reservation accounting underflow")
            publishLocked(&s)
        }
    }

    /// Moves a verified temp file into the CAS.
    /// - Returns: `true` if the blob was already present (the temp file was discarded).
    func commitFile(hash: String, size: Int64, tempPath: String, reserved: Int64) throws(BlobStoreError) -> Bool {
        precondition(reserved >= size, "writer committed more bytes than it reserved")
        let key = EntryKey(kind: .cas, hash: hash)
        let destination = path(for: key)
        let now = Posix.nowSeconds()
        let result = state.withLock { s -> Result<(deduplicated: Bool, touch: String?), BlobStoreError> in
            s.reservedBytes -= reserved
            defer { publishLocked(&s) }
            if let slot = s.index.lookup(key) {
                return .success((true, touchLocked(&s, slot, now: now)))
            }
            if rename(tempPath, destination) != 0 {
                return .failure(Posix.writeError("rename into", destination))
            }
            s.usedBytes += size
            s.blobCount += 1
            s.index.insert(key, size: size, persistedMtime: now)
            return .success((false, nil))
        }
        switch result {
        case .success(let outcome):
            if outcome.deduplicated { Posix.unlinkIfPresent(tempPath) }
            if let touch = outcome.touch { Posix.touch(touch) }
            return outcome.deduplicated
        case .failure(let error):
            Posix.unlinkIfPresent(tempPath)
            logger.warning("cannot commit blob", metadata: ["hash": "\(hash)", "error": "\(error)"])
            throw error
        }
    }

    /// Publishes a verified upload on the calling thread: with ``Durability/fsync`` the file's data
    /// is synced before the rename and the directory after. Owns `fd` and `reserved`.
    func commitVerified(hash: String, size: Int64, fd: Int32, tempPath: String, reserved: Int64) throws(BlobStoreError) {
        func fail(_ error: BlobStoreError) -> BlobStoreError {
            Posix.unlinkIfPresent(tempPath)
            releaseReservation(reserved)
            recordRejection(error.rejectReason)
            logger.warning("cannot commit blob", metadata: ["hash": "\(hash)", "error": "\(error)"])
            return error
        }
        let durable = configuration.durability == .fsync
        if durable, fdatasync(fd) != 0 {
            let error = Posix.writeError("fdatasync", tempPath)
            Posix.closeQuietly(fd)
            throw fail(error)
        }
        if close(fd) != 0 { throw fail(Posix.writeError("close", tempPath)) }
        let deduplicated: Bool
        do throws(BlobStoreError) {
            deduplicated = try commitFile(hash: hash, size: size, tempPath: tempPath, reserved: reserved)
        } catch {
            recordRejection(.aborted)
            throw error
        }
        if durable && !deduplicated {
            let directory = casDirectory + "/" + hash.prefix(2)
            if let error = Posix.syncDirectory(directory) {
                recordRejection(.aborted)
                logger.warning("cannot sync the directory of a committed blob", metadata: ["hash": "\(hash)", "error": "\(error)"])
                throw error
            }
        }
    }

    /// Publishes a verified upload through the group committer (``Durability/fsync``).
    func commitDurably(hash: String, size: Int64, fd: Int32, tempPath: String, reserved: Int64) async throws(BlobStoreError) {
        let published = Atomic<Bool>(false)
        let result = await committer.commit(fd: fd, path: tempPath) { [self] in
            published.store(true, ordering: .relaxed)
            do throws(BlobStoreError) {
                let deduplicated = try commitFile(hash: hash, size: size, tempPath: tempPath, reserved: reserved)
                return .success(deduplicated ? nil : casDirectory + "/" + hash.prefix(2))
            } catch {
                return .failure(error)
            }
        }
        if case .failure(let error) = result {
            // A failed data sync never reached the rename: the reservation is still held.
            if !published.load(ordering: .relaxed) { releaseReservation(reserved) }
            recordRejection(error.rejectReason)
            logger.warning("cannot commit blob", metadata: ["hash": "\(hash)", "error": "\(error)"])
            throw error
        }
    }

    /// Marks the existing blob `hash` as used after a verified duplicate upload and drops the writer's pin.
    func finishDeduplicatedWrite(hash: String, pinned: Bool) {
        guard pinned else { return }
        let now = Posix.nowSeconds()
        let touchPath = state.withLock { s -> String? in
            guard let slot = s.index.lookup(EntryKey(kind: .cas, hash: hash)) else { return nil }
            unpinLocked(&s, slot)
            return touchLocked(&s, slot, now: now)
        }
        if let touchPath { Posix.touch(touchPath) }
    }

    /// Convenience: uploads `bytes` as blob `hash` (begin + write + commit).
    /// - Returns: the digest of the stored (or already present) blob.
    @discardableResult
    public func put(bytes: [UInt8], hash: String) async throws -> Digest {
        let writer = try await beginWrite(hash: hash, expectedSize: Int64(bytes.count))
        try writer.write(bytes)
        return try await writer.commit()
    }

    // MARK: CAS reads

    /// Opens the blob `hash` for reading `[offset, offset + min(limit, size - offset))`.
    ///
    /// Waits (FIFO) for a read slot. The blob is pinned (cannot be evicted) until
    /// the reader is closed. The empty blob yields a zero-length reader without
    /// touching the file system (and without taking a slot).
    ///
    /// - Throws: ``BlobStoreError/invalidHash(_:)``, ``BlobStoreError/notFound(_:)``,
    ///   ``BlobStoreError/offsetOutOfRange(offset:size:)`` if `offset > size`, `io`,
    ///   or `CancellationError` if cancelled while waiting for a slot.
    public func openRead(hash: String, offset: Int64 = 0, limit: Int64? = nil) async throws -> BlobReader {
        guard Digest.isValidHash(hash) else { throw BlobStoreError.invalidHash(hash) }
        if hash == Digest.emptyHash {
            recordLookup(hit: true)
            guard offset == 0 else { throw BlobStoreError.offsetOutOfRange(offset: offset, size: 0) }
            return BlobReader(store: nil, hash: hash, fd: -1, path: "", offset: 0, length: 0, blobSize: 0)
        }
        try await readSlots.acquire()
        let key = EntryKey(kind: .cas, hash: hash)
        let now = Posix.nowSeconds()
        let lookup = state.withLock { s -> Result<(size: Int64, touch: String?), BlobStoreError> in
            guard let slot = findLocked(&s, key, now: now) else {
                countLookupLocked(&s, hit: false)
                return .failure(.notFound(hash))
            }
            countLookupLocked(&s, hit: true)
            let size = s.index.size(slot)
            guard offset >= 0, offset <= size else { return .failure(.offsetOutOfRange(offset: offset, size: size)) }
            pinLocked(&s, slot)
            return .success((size, touchLocked(&s, slot, now: now)))
        }
        let blobSize: Int64
        switch lookup {
        case .failure(let error):
            readSlots.release()
            throw error
        case .success(let found):
            blobSize = found.size
            if let touch = found.touch { Posix.touch(touch) }
        }
        let path = path(for: key)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            let code = errno
            unpin(key)
            readSlots.release()
            if code == ENOENT {
                // Deleted behind our back: drop it from the index.
                dropVanished(key)
                throw BlobStoreError.notFound(hash)
            }
            let error = Posix.ioError("open", path, code)
            logger.warning("cannot open blob", metadata: ["hash": "\(hash)", "error": "\(error)"])
            throw error
        }
        // A file whose size is not the indexed one (truncated or replaced underneath, a torn write
        // after a power loss) is never served: dropped, so the blob is fetched again elsewhere.
        var st = stat()
        if fstat(fd, &st) != 0 || Int64(st.st_size) != blobSize {
            let actual = Int64(st.st_size)
            close(fd)
            unpin(key)
            readSlots.release()
            dropUnreadable(hash: hash, reason: "file has \(actual) bytes, the index says \(blobSize)")
            throw BlobStoreError.notFound(hash)
        }
        var length = blobSize - offset
        if let limit { length = min(length, max(0, limit)) }
        return BlobReader(store: self, hash: hash, fd: fd, path: path, offset: offset, length: length, blobSize: blobSize)
    }

    /// Convenience: reads a whole blob into memory (small blobs, tests).
    public func readAll(hash: String) async throws -> [UInt8] {
        let reader = try await openRead(hash: hash)
        defer { reader.close() }
        return try reader.readAll()
    }

    /// Called by ``BlobReader/close()``.
    func readerClosed(hash: String, owner: String?) {
        unpin(EntryKey(kind: .cas, hash: hash))
        readSlots.release(owner: owner)
    }

    // MARK: Action cache

    /// The action-cache value for `key`, or `nil` on a miss. Marks the entry as recently used.
    /// - Throws: ``BlobStoreError/invalidHash(_:)``, `io`, or `CancellationError` while waiting for a read slot.
    public func getAction(key: String) async throws -> [UInt8]? {
        guard Digest.isValidHash(key) else { throw BlobStoreError.invalidHash(key) }
        try await readSlots.acquire()
        defer { readSlots.release() }
        let entryKey = EntryKey(kind: .ac, hash: key)
        let path = path(for: entryKey)
        let now = Posix.nowSeconds()
        // The file is opened under the lock, so a concurrent eviction cannot race with it.
        let opened = state.withLock { s -> Result<(fd: Int32, size: Int64, touch: String?)?, BlobStoreError> in
            guard let slot = findLocked(&s, entryKey, now: now) else {
                countLookupLocked(&s, hit: false)
                return .success(nil)
            }
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd < 0 {
                let code = errno
                if code == ENOENT {
                    removeEntryLocked(&s, slot)
                    countLookupLocked(&s, hit: false)
                    publishLocked(&s)
                    return .success(nil)
                }
                return .failure(Posix.ioError("open", path, code))
            }
            countLookupLocked(&s, hit: true)
            return .success((fd, s.index.size(slot), touchLocked(&s, slot, now: now)))
        }
        let found: (fd: Int32, size: Int64, touch: String?)?
        do {
            found = try opened.get()
        } catch {
            logger.warning("cannot open action cache entry", metadata: ["key": "\(key)", "error": "\(error)"])
            throw error
        }
        guard let found else { return nil }
        defer { Posix.closeQuietly(found.fd) }
        if let touch = found.touch { Posix.touch(touch) }
        do {
            let bytes = try Posix.readFully(found.fd, size: found.size, path: path)
            recordBytesOut(Int64(bytes.count))
            return bytes
        } catch {
            logger.warning("cannot read action cache entry", metadata: ["key": "\(key)", "error": "\(error)"])
            throw error
        }
    }

    /// Stores `value` under `key`, atomically replacing any previous value (last writer wins).
    /// The value counts toward `maxBytes` and is evicted by the same LRU as CAS blobs.
    /// - Throws: ``BlobStoreError/invalidHash(_:)``, `tooLarge`, `insufficientStorage`, `io`,
    ///   or `CancellationError` while waiting for a write slot.
    public func putAction(key: String, value: [UInt8]) async throws {
        guard Digest.isValidHash(key) else { throw BlobStoreError.invalidHash(key) }
        let size = Int64(value.count)
        guard size <= maxBytes else {
            recordRejection(.tooLarge)
            throw BlobStoreError.tooLarge(size: size, limit: maxBytes)
        }
        try await writeSlots.acquire()
        defer { writeSlots.release() }

        var evicted: [Evicted] = []
        let reserved = state.withLock { s -> Result<Void, BlobStoreError> in
            do throws(BlobStoreError) {
                try reserveLocked(&s, size, &evicted)
            } catch {
                return .failure(error)
            }
            publishLocked(&s)
            return .success(())
        }
        logEvictions(evicted)
        if case .failure(let error) = reserved {
            recordRejection(error.rejectReason)
            throw error
        }

        let temp: (fd: Int32, path: String)
        let durable = configuration.durability == .fsync
        do throws(BlobStoreError) {
            temp = try Posix.createTempFile(in: tmpDirectory)
            let failure = value.withUnsafeBytes { buffer -> BlobStoreError? in
                do throws(BlobStoreError) {
                    try Posix.writeAll(temp.fd, buffer, path: temp.path)
                    return nil
                } catch {
                    return error
                }
            }
            if let failure {
                Posix.closeQuietly(temp.fd)
                Posix.unlinkIfPresent(temp.path)
                throw failure
            }
            if !durable, close(temp.fd) != 0 {
                let error = Posix.writeError("close", temp.path)
                Posix.unlinkIfPresent(temp.path)
                throw error
            }
        } catch {
            releaseReservation(size)
            recordRejection(error.rejectReason)
            logger.warning("cannot write action cache entry", metadata: ["key": "\(key)", "error": "\(error)"])
            throw error
        }
        recordBytesIn(size)

        let entryKey = EntryKey(kind: .ac, hash: key)
        let destination = path(for: entryKey)
        let now = Posix.nowSeconds()
        let published = Atomic<Bool>(false)
        let publish = { @Sendable [self] () -> Result<String?, BlobStoreError> in
            published.store(true, ordering: .relaxed)
            let renamed = state.withLock { s -> Result<Void, BlobStoreError> in
                s.reservedBytes -= size
                defer { publishLocked(&s) }
                if rename(temp.path, destination) != 0 {
                    return .failure(Posix.writeError("rename into", destination))
                }
                if let old = s.index.lookup(entryKey) { removeEntryLocked(&s, old) }
                s.index.insert(entryKey, size: size, persistedMtime: now)
                s.usedBytes += size
                s.actionCount += 1
                return .success(())
            }
            if case .failure(let e) = renamed {
                Posix.unlinkIfPresent(temp.path)
                return .failure(e)
            }
            return .success(acDirectory + "/" + key.prefix(2))
        }
        let result: Result<Void, BlobStoreError>
        if durable {
            result = await committer.commit(fd: temp.fd, path: temp.path, publish: publish)
        } else {
            result = publish().map { _ in () }
        }
        if case .failure(let error) = result {
            if !published.load(ordering: .relaxed) { releaseReservation(size) }
            recordRejection(error.rejectReason)
            logger.warning("cannot commit action cache entry", metadata: ["key": "\(key)", "error": "\(error)"])
            throw error
        }
    }

    /// Removes the action-cache entry for `key` (ccache deletes entries it finds stale).
    /// Returns whether there was one. The file is unlinked under the lock, like the rename that
    /// stores an entry, so a concurrent `putAction` is either removed whole or kept whole.
    /// - Throws: ``BlobStoreError/invalidHash(_:)``, `io`.
    @discardableResult
    public func deleteAction(key: String) throws -> Bool {
        guard Digest.isValidHash(key) else { throw BlobStoreError.invalidHash(key) }
        let entryKey = EntryKey(kind: .ac, hash: key)
        let path = path(for: entryKey)
        let result = state.withLock { s -> Result<Bool, BlobStoreError> in
            guard let slot = findLocked(&s, entryKey, now: Posix.nowSeconds()) else { return .success(false) }
            if let code = Posix.unlinkIfPresent(path) { return .failure(Posix.ioError("unlink", path, code)) }
            removeEntryLocked(&s, slot)
            publishLocked(&s)
            return .success(true)
        }
        return try result.get()
    }

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

    /// Drops a blob that cannot be read back intact (I/O error, wrong size): out of the index
    /// even if readers hold it (they fail), its file deleted, counted and logged.
    func dropUnreadable(hash: String, reason: String) {
        let key = EntryKey(kind: .cas, hash: hash)
        let dropped = state.withLock { s -> Int64? in
            guard let slot = s.index.lookup(key) else { return nil }
            let size = removeEntryLocked(&s, slot).size
            Posix.unlinkIfPresent(path(for: key))
            publishLocked(&s)
            return size
        }
        guard let size = dropped else { return }
        metrics.unreadable.increment()
        dropMapping(key)
        logger.error("blob cannot be read back intact; dropped from the store (it is fetched again from the mesh)", metadata: [
            "hash": "\(hash)", "reason": "\(reason)",
        ])
        // The mesh stops announcing it, as for an eviction.
        if let handler = evictionHandler.withLock({ $0 }), let d = Digest(hash: hash, size: size) { handler(d) }
    }

    /// Drops an entry whose file disappeared from disk (unless it is pinned).
    private func dropVanished(_ key: EntryKey) {
        let dropped = state.withLock { s -> Bool in
            guard let slot = s.index.lookup(key), s.index.pins(slot) == 0 else { return false }
            removeEntryLocked(&s, slot)
            publishLocked(&s)
            return true
        }
        if dropped {
            dropMapping(key)
            logger.warning("blob file vanished from disk; dropped from index", metadata: ["hash": "\(key.hash)"])
        }
    }

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

    /// Called (outside the store lock) with every blob the store evicts to make room, so a mesh
    /// can stop announcing it.
    public func onEviction(_ handler: @escaping @Sendable (Digest) -> Void) {
        evictionHandler.withLock { $0 = handler }
    }

    /// A read-only mapping of the blob file open as `fd` (`size` bytes), shared by the readers of
    /// a hot blob and kept while `mappedCacheBytes` allows; nil if the blob is below
    /// `mapMinimumBytes` or cannot be mapped.
    func mapping(hash: String, fd: Int32, size: Int64) -> BlobMapping? {
        guard size >= configuration.mapMinimumBytes else { return nil }
        if let m = mappings.withLock({ $0.get(hash) }), m.size == size { return m }
        guard let m = BlobMapping(fd: fd, size: size) else { return nil }
        // The mappings this pushes out are released (unmapped, unless a reader still sends from
        // them) here, after the lock.
        _ = mappings.withLock { $0.insert(hash, m, size: size) }
        return m
    }

    /// Blobs whose mapping is kept for reuse (tests, diagnostics).
    var mappedBlobCount: Int { mappings.withLock { $0.count } }

    /// Forget the cached mapping of a blob that left the store (its pages are released once the
    /// readers still sending from it are done).
    func dropMapping(_ key: EntryKey) {
        guard key.kind == .cas else { return }
        _ = mappings.withLock { $0.remove(key.hash) }
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
