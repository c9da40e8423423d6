import Logging
import Metrics
import Synchronization
import Foundation
import Glibc

/// Writing the CAS: starting an upload, reserving space as bytes arrive, and publishing a
/// verified upload (rename; with `durability = "fsync"` the data and directory syncs, grouped).
extension BlobStore {
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
}
