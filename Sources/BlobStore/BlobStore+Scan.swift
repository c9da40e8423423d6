import CMeshSystem
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// How far the startup scan of the store has come (``BlobStore/indexProgress``).
public struct IndexProgress: Sendable, Equatable {
    /// Every file on disk is indexed; eviction follows the full LRU order.
    public var complete: Bool
    /// Prefix directories scanned, of ``totalDirectories`` (256 for `cas/`, 256 for `ac/`).
    public var scannedDirectories: Int
    public var totalDirectories: Int
    /// Entries the scan has indexed so far.
    public var scannedEntries: Int
    /// Entries in the index now (scanned, written, or found on disk by a lookup).
    public var indexedEntries: Int
}

extension BlobStore {
    static let scanDirectoryCount = 512
    /// Entries inserted under one acquisition of the store lock.
    static let scanBatch = 2048

    /// How far the startup scan has come.
    public var indexProgress: IndexProgress {
        state.withLock { s in
            IndexProgress(complete: s.scanComplete, scannedDirectories: s.scannedDirectories,
                          totalDirectories: BlobStore.scanDirectoryCount, scannedEntries: s.scannedEntries,
                          indexedEntries: s.index.count)
        }
    }

    /// Returns once the startup scan has indexed every file.
    public func waitUntilIndexed() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let done = state.withLock { s -> Bool in
                if s.scanComplete { return true }
                s.scanWaiters.append(c)
                return false
            }
            if done { c.resume() }
        }
    }

    /// While the scan runs: the entry `key` if its file is on disk but not indexed yet (it is
    /// indexed now, as just used). One `lstat` under the lock; only before the scan completes.
    func indexFromDiskLocked(_ s: inout State, _ key: EntryKey, now: Int64) -> Int? {
        guard !s.scanComplete, let info = Posix.fileInfo(path(for: key)), info.isRegularFile else { return nil }
        if key.kind == .cas && info.size == 0 { return nil }
        let slot = s.index.insert(key, size: info.size, persistedMtime: info.mtimeSeconds)
        s.usedBytes += info.size
        s.unscannedEstimate = max(0, s.unscannedEstimate - info.size)
        if key.kind == .cas { s.blobCount += 1 } else { s.actionCount += 1 }
        publishLocked(&s)
        return slot
    }

    /// `lookup`, falling back to the disk while the scan runs.
    func findLocked(_ s: inout State, _ key: EntryKey, now: Int64) -> Int? {
        if let slot = s.index.lookup(key) { return slot }
        return indexFromDiskLocked(&s, key, now: now)
    }

    /// Indexes every file of `cas/` and `ac/` (at most `scanRate` files a second), removing stray
    /// files, then orders the scanned entries by mtime and shrinks the store to its limit.
    /// ``BlobStoreConfiguration/scanThreads`` threads take the 512 prefix directories in turn;
    /// each indexes its files in batches under the store lock, and the final order depends only
    /// on the files (mtime, then hash), not on which thread found what first.
    func runScan() {
        let started = Posix.monotonicSeconds()
        let removedAtTop = removeStrayTopLevelFiles(casDirectory) + removeStrayTopLevelFiles(acDirectory)
        let shared = ScanShared(startedMillis: Int(started * 1000))
        let threads = BlobStore.scanThreadCount(configuration.scanThreads)
        Posix.runThreads(threads) { [self] _ in
            while true {
                let directory = shared.nextDirectory.wrappingAdd(1, ordering: .relaxed).oldValue
                guard directory < BlobStore.scanDirectoryCount else { return }
                while configuration.scanGate?.isClosed == true { Posix.sleep(seconds: 0.001) }
                let kind: EntryKind = directory < 256 ? .cas : .ac
                let strays = scanDirectory(kind: kind, base: kind == .cas ? casDirectory : acDirectory,
                                           prefix: directory & 255, started: started, shared: shared)
                shared.removed.wrappingAdd(strays, ordering: .relaxed)
                let (done, total) = state.withLock { s -> (Int, Int) in
                    s.scannedDirectories += 1
                    return (s.scannedDirectories, s.scannedEntries)
                }
                // One progress line every 5 s, from whichever thread passes the mark first.
                let now = Posix.monotonicSeconds()
                let last = shared.lastLogMillis.load(ordering: .relaxed)
                if Int(now * 1000) - last >= 5000,
                   shared.lastLogMillis.compareExchange(expected: last, desired: Int(now * 1000), ordering: .relaxed).exchanged {
                    logger.info("blob store index: scanning", metadata: [
                        "directories": "\(done)/\(BlobStore.scanDirectoryCount)", "entries": "\(total)",
                        "elapsed_s": "\(Int(now - started))",
                    ])
                }
            }
        }
        let removed = removedAtTop + shared.removed.load(ordering: .relaxed)
        var evicted: [Evicted] = []
        let (summary, waiters) = state.withLock { s -> ((blobs: Int, actions: Int, used: Int64, scanned: Int), [CheckedContinuation<Void, Never>]) in
            s.index.sortUnsorted()
            s.scanComplete = true
            s.unscannedEstimate = 0
            // Shrink to the (possibly lowered) limit, oldest first.
            var cursor = s.index.head
            while s.usedBytes + s.reservedBytes > limitLocked(&s) && cursor != LRUIndex.none {
                let next = s.index.next(cursor)
                if s.index.pins(cursor) == 0 { evictLocked(&s, cursor, &evicted) }
                cursor = next
            }
            publishLocked(&s)
            let w = s.scanWaiters
            s.scanWaiters = []
            return ((s.blobCount, s.actionCount, s.usedBytes, s.scannedEntries), w)
        }
        logEvictions(evicted)
        for w in waiters { w.resume() }
        logger.info("blob store index rebuilt", metadata: [
            "directory": "\(configuration.directory)",
            "blobs": "\(summary.blobs)",
            "actions": "\(summary.actions)",
            "scanned_entries": "\(summary.scanned)",
            "used_bytes": "\(summary.used)",
            "max_bytes": "\(maxBytes)",
            "evicted_over_limit": "\(evicted.count)",
            "removed_temp_files": "\(removedTempFiles)",
            "removed_stray_files": "\(removed)",
            "scan_threads": "\(threads)",
            "elapsed_ms": "\(Int((Posix.monotonicSeconds() - started) * 1000))",
        ])
    }

    /// Threads for the scan: `configured`, or (0) the CPUs this process may run on; 1…8.
    static func scanThreadCount(_ configured: Int) -> Int {
        let wanted = configured > 0 ? configured : Int(cm_affinity_cpu_count())
        return min(max(wanted, 1), 8)
    }

    /// Regular files directly in `cas/` or `ac/` do not belong there; unknown directories are left alone.
    private func removeStrayTopLevelFiles(_ base: String) -> Int {
        var removed = 0
        Posix.forEachDirectoryEntry(base) { dfd, name, _ in
            var st = stat()
            guard fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) != S_IFDIR else { return }
            if unlinkat(dfd, name, 0) == 0 { removed += 1 }
        }
        return removed
    }

    /// Indexes `base/XX`; returns the stray files removed.
    private func scanDirectory(kind: EntryKind, base: String, prefix: Int, started: Double, shared: ScanShared) -> Int {
        let directory = base + "/" + BlobStore.hexPrefix(prefix)
        var batch: [(HashBytes, Int64, Int64)] = []
        batch.reserveCapacity(BlobStore.scanBatch)
        var removed = 0
        let rate = configuration.scanRate
        func flush() {
            guard !batch.isEmpty else { return }
            state.withLock { s in
                for (digest, size, mtime) in batch {
                    let key = EntryKey(kind: kind, digest: digest)
                    // Written, or found by a lookup, since the scan began: already indexed.
                    guard s.index.insertUnsortedIfAbsent(key, size: size, persistedMtime: mtime) != nil else { continue }
                    s.usedBytes += size
                    s.unscannedEstimate = max(0, s.unscannedEstimate - size)
                    s.scannedEntries += 1
                    if kind == .cas { s.blobCount += 1 } else { s.actionCount += 1 }
                }
                publishLocked(&s)
            }
            let files = shared.files.wrappingAdd(batch.count, ordering: .relaxed).newValue
            batch.removeAll(keepingCapacity: true)
            // The bound on the scan's I/O: at most `rate` files a second on average, all threads together.
            if rate > 0 {
                let due = Double(files) / Double(rate)
                let ahead = due - (Posix.monotonicSeconds() - started)
                if ahead > 0.001 { Posix.sleep(seconds: ahead) }
            }
        }
        Posix.forEachDirectoryEntry(directory) { dfd, name, length in
            let digest = HashBytes(hex: UnsafeBufferPointer(start: UnsafeRawPointer(name).assumingMemoryBound(to: UInt8.self), count: length))
            var st = stat()
            guard fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { return }
            let isRegular = (st.st_mode & S_IFMT) == S_IFREG
            let reason: String?
            if let digest, isRegular, Int(digest.prefixByte) == prefix {
                if kind == .cas && (st.st_size == 0 || digest == BlobStore.emptyHashBytes) {
                    // The empty blob is virtual; any other zero-length blob is a torn write.
                    reason = st.st_size == 0 ? "zero-length blob" : "empty blob is virtual"
                } else {
                    #if os(Linux)
                    let mtime = Int64(st.st_mtim.tv_sec)
                    #else
                    let mtime = Int64(st.st_mtimespec.tv_sec)
                    #endif
                    batch.append((digest, Int64(st.st_size), mtime))
                    if batch.count >= BlobStore.scanBatch { flush() }
                    return
                }
            } else {
                reason = "not a valid hash file"
            }
            let isDirectory = (st.st_mode & S_IFMT) == S_IFDIR
            if unlinkat(dfd, name, isDirectory ? AT_REMOVEDIR : 0) == 0 {
                removed += 1
                logger.debug("removed stray file from blob store", metadata: ["path": "\(directory)/\(String(cString: name))", "reason": "\(reason ?? "")"])
            } else {
                logger.warning("cannot remove stray file from blob store", metadata: [
                    "path": "\(directory)/\(String(cString: name))", "error": "\(Posix.errnoText(errno))",
                ])
            }
        }
        flush()
        return removed
    }

    static let emptyHashBytes = HashBytes(hex: Digest.emptyHash)!
}

/// What the scan's threads share: the next prefix directory to take, files indexed (for the rate
/// bound), stray files removed, and when progress was last logged.
final class ScanShared: Sendable {
    let nextDirectory = Atomic<Int>(0)
    let files = Atomic<Int>(0)
    let removed = Atomic<Int>(0)
    let lastLogMillis: Atomic<Int>

    init(startedMillis: Int) { lastLogMillis = Atomic(startedMillis) }
}
