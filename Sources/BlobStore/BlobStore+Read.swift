import Logging
import Metrics
import Synchronization
import Foundation
import Glibc

/// Reading the CAS: lookups (size, contains), opening a blob for reading, and dropping blobs
/// whose file vanished or cannot be read back intact; shared mappings of hot blobs.
extension BlobStore {
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
        let dropped = state.withLock { s -> Int64? in
            guard let slot = s.index.lookup(key), s.index.pins(slot) == 0 else { return nil }
            let size = removeEntryLocked(&s, slot).size
            publishLocked(&s)
            return size
        }
        guard let size = dropped else { return }
        dropMapping(key)
        logger.warning("blob file vanished from disk; dropped from index", metadata: ["hash": "\(key.hash)"])
        // The mesh stops announcing it (a loss delta), as for an eviction.
        if key.kind == .cas, let handler = evictionHandler.withLock({ $0 }), let d = Digest(hash: key.hash, size: size) { handler(d) }
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
}
