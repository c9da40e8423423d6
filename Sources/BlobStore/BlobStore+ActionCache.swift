import Logging
import Metrics
import Synchronization
import Foundation
import Glibc

/// The action cache: get, put (atomic replace, durable like CAS commits) and delete.
extension BlobStore {
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
}
