import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One upload into the CAS, created by ``BlobStore/beginWrite(hash:expectedSize:)``.
///
/// Bytes are hashed (SHA-256) while they stream into a temp file in
/// `<directory>/tmp`; ``commit()`` verifies size and hash and atomically renames
/// the file into place, so a partial or corrupt upload is never visible.
///
/// The writer holds a write slot (and possibly a space reservation, and a pin on
/// an existing blob when deduplicating) until it is committed or aborted. If it
/// is dropped without either, `deinit` aborts it, so nothing leaks.
///
/// A writer is meant to be used by one task at a time; its methods are
/// nevertheless serialized internally, so concurrent misuse cannot corrupt state.
public final class BlobWriter: Sendable {
    enum Sink {
        /// Stream into a temp file.
        case file(fd: Int32, path: String)
        /// The blob already exists: only hash the bytes. `pinned` tells whether the existing blob was pinned.
        case discard(pinned: Bool)
    }

    struct State: ~Copyable {
        var hasher = SHA256Hasher()
        var sink: Sink
        var isOpen = true
        var bytesWritten: Int64 = 0
        /// Bytes reserved in the store for this upload (always >= bytesWritten for file sinks).
        var reserved: Int64
    }

    /// The hash the upload claims to have (validated).
    public let hash: String
    /// Whose write slot this writer holds (see `SlotShare`), captured where it was begun.
    let slotOwner = SlotShare.owner
    /// The declared size, if any.
    public let expectedSize: Int64?
    private let store: BlobStore
    private let state: Mutex<State>

    init(store: BlobStore, hash: String, expectedSize: Int64?, sink: Sink, reserved: Int64) {
        self.store = store
        self.hash = hash
        self.expectedSize = expectedSize
        self.state = Mutex(State(sink: sink, reserved: reserved))
    }

    deinit {
        abort()
    }

    /// Number of bytes accepted so far.
    public var bytesWritten: Int64 {
        state.withLock { $0.bytesWritten }
    }

    /// `true` until the writer is committed or aborted.
    public var isOpen: Bool {
        state.withLock { $0.isOpen }
    }

    /// Appends bytes to the upload.
    ///
    /// May reserve more space (for uploads of unknown size). On any error the
    /// writer is aborted (temp file deleted, reservation and slot released).
    ///
    /// - Throws: ``BlobStoreError/sizeMismatch(expected:actual:)`` if more bytes than
    ///   declared arrive, ``BlobStoreError/tooLarge(size:limit:)`` if the upload grows
    ///   beyond `maxBytes`, ``BlobStoreError/insufficientStorage(needed:available:)``,
    ///   ``BlobStoreError/io(_:)``, or ``BlobStoreError/closed`` after commit/abort.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        let address = UInt(bitPattern: bytes.baseAddress)
        let count = bytes.count
        try state.withLock { s throws(BlobStoreError) in
            guard s.isOpen else { throw .closed }
            guard bytes.count > 0 else { return }
            let newTotal = s.bytesWritten + Int64(bytes.count)
            if let expectedSize, newTotal > expectedSize {
                finishLocked(&s, rejection: .sizeMismatch)
                throw .sizeMismatch(expected: expectedSize, actual: newTotal)
            }
            if newTotal > store.maxBytes {
                finishLocked(&s, rejection: .tooLarge)
                throw .tooLarge(size: newTotal, limit: store.maxBytes)
            }
            if case .file(let fd, let path) = s.sink {
                if newTotal > s.reserved {
                    let deficit = newTotal - s.reserved
                    // A chunk at a time (fewer lock round trips), never beyond the declared size.
                    let preferred = max(deficit, min(store.reservationChunk, (expectedSize ?? .max) - s.reserved))
                    do throws(BlobStoreError) {
                        s.reserved += try store.reserveAdditional(minimum: deficit, preferred: preferred)
                    } catch {
                        finishLocked(&s, rejection: error.rejectReason)
                        throw error
                    }
                }
                do throws(BlobStoreError) {
                    try Posix.writeAll(fd, bytes, path: path)
                } catch {
                    store.logger.warning("upload write failed", metadata: ["hash": "\(hash)", "error": "\(error)"])
                    finishLocked(&s, rejection: error.rejectReason)
                    throw error
                }
            }
            // Rebuild the buffer from Sendable parts: region-based isolation would otherwise treat
            // the caller's buffer as flowing into the hasher (it is only read during this call).
            s.hasher.update(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: address), count: count))
            s.bytesWritten = newTotal
            store.recordBytesIn(Int64(bytes.count))
        }
    }

    /// Appends bytes to the upload. See ``write(_:)-(UnsafeRawBufferPointer)``.
    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    /// Verifies and publishes the upload.
    ///
    /// Checks the size (if declared) and the SHA-256; on success the temp file is
    /// atomically renamed to `cas/XX/<hash>` (with ``Durability/fsync`` its data is synced
    /// first and the directory after: see ``BlobStore``'s durability notes). If the blob
    /// already exists, the temp file is discarded and the existing blob's digest is returned
    /// (deduplication). On mismatch the temp file is deleted and the reservation and slot are
    /// released. This synchronous form syncs on the calling thread; `await commit()` shares the
    /// syncs with the other writers committing at the same time (group commit).
    ///
    /// - Returns: the digest of the blob.
    /// - Throws: ``BlobStoreError/sizeMismatch(expected:actual:)``,
    ///   ``BlobStoreError/digestMismatch(expected:actual:)``, `diskFull`, `io`, or `closed`.
    public func commit() throws -> Digest {
        switch try verify() {
        case .deduplicated(let digest):
            return digest
        case .file(let digest, let fd, let path, let reserved):
            defer { store.writeSlots.release(owner: slotOwner) }
            try store.commitVerified(hash: hash, size: digest.size, fd: fd, tempPath: path, reserved: reserved)
            return digest
        }
    }

    /// Verifies and publishes the upload, like ``commit()-(Void)``; with ``Durability/fsync`` the
    /// syncs are shared with the other writers committing at the same time (group commit) and
    /// the caller's thread is not blocked meanwhile.
    public func commit() async throws -> Digest {
        try await commit(verified: {})
    }

    /// Like `await commit()`, calling `verified` once the size and hash have checked out, before
    /// the data is synced and published (a reader forwarding the upload may then send its end).
    public func commit(verified: () -> Void) async throws -> Digest {
        switch try verify() {
        case .deduplicated(let digest):
            verified()
            return digest
        case .file(let digest, let fd, let path, let reserved):
            verified()
            defer { store.writeSlots.release(owner: slotOwner) }
            if store.configuration.durability == .fsync {
                try await store.commitDurably(hash: hash, size: digest.size, fd: fd, tempPath: path, reserved: reserved)
            } else {
                try store.commitVerified(hash: hash, size: digest.size, fd: fd, tempPath: path, reserved: reserved)
            }
            return digest
        }
    }

    private enum Verified {
        case deduplicated(Digest)
        /// The caller now owns the open temp file, the reservation and the write slot.
        case file(Digest, fd: Int32, path: String, reserved: Int64)
    }

    /// Checks size and hash; closes the writer either way.
    private func verify() throws(BlobStoreError) -> Verified {
        try state.withLock { s throws(BlobStoreError) -> Verified in
            guard s.isOpen else { throw .closed }
            if let expectedSize, s.bytesWritten != expectedSize {
                finishLocked(&s, rejection: .sizeMismatch)
                throw .sizeMismatch(expected: expectedSize, actual: s.bytesWritten)
            }
            let actual = s.hasher.finalize()
            guard actual == hash else {
                finishLocked(&s, rejection: .digestMismatch)
                throw .digestMismatch(expected: hash, actual: actual)
            }
            let digest = Digest(validatedHash: hash, size: s.bytesWritten)
            switch s.sink {
            case .discard(let pinned):
                s.isOpen = false
                store.finishDeduplicatedWrite(hash: hash, pinned: pinned)
                store.writeSlots.release(owner: slotOwner)
                return .deduplicated(digest)
            case .file(let fd, let path):
                s.isOpen = false
                let reserved = s.reserved
                s.reserved = 0
                return .file(digest, fd: fd, path: path, reserved: reserved)
            }
        }
    }

    /// Reads bytes already accepted, `[offset, offset + buffer.count)` clipped to
    /// ``bytesWritten``, back from the temp file: lets a reader forward an upload while it is
    /// still arriving (unverified: the reader must not finish before ``commit()`` succeeds).
    /// Returns 0 at or past the bytes written; throws ``BlobStoreError/closed`` once the writer
    /// is committed or aborted (read the committed blob instead), and when its bytes go nowhere
    /// (the blob existed: nothing is written to a file).
    public func readWritten(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try state.withLock { s throws(BlobStoreError) -> Int in
            guard s.isOpen, case .file(let fd, let path) = s.sink else { throw .closed }
            let n = Int(min(Int64(buffer.count), max(0, s.bytesWritten - offset)))
            guard n > 0 else { return 0 }
            return try Posix.pread(fd, UnsafeMutableRawBufferPointer(rebasing: buffer.prefix(n)), offset: offset, path: path)
        }
    }

    /// Abandons the upload: deletes the temp file and releases the reservation,
    /// the pin and the write slot. Idempotent; a no-op after ``commit()``.
    public func abort() {
        state.withLock { s in
            guard s.isOpen else { return }
            finishLocked(&s, rejection: .aborted)
        }
    }

    /// Ends an unsuccessful upload and records why.
    private func finishLocked(_ s: inout State, rejection: BlobStore.RejectReason) {
        guard s.isOpen else { return }
        s.isOpen = false
        switch s.sink {
        case .file(let fd, let path):
            Posix.closeQuietly(fd)
            if let code = Posix.unlinkIfPresent(path) {
                store.logger.warning("cannot delete temp file", metadata: ["path": "\(path)", "error": "\(Posix.errnoText(code))"])
            }
        case .discard(let pinned):
            if pinned { store.unpin(EntryKey(kind: .cas, hash: hash)) }
        }
        store.releaseReservation(s.reserved)
        s.reserved = 0
        store.recordRejection(rejection)
        store.writeSlots.release(owner: slotOwner)
    }
}

extension BlobStoreError {
    /// The metrics label for a write that failed with this error.
    var rejectReason: BlobStore.RejectReason {
        switch self {
        case .digestMismatch: return .digestMismatch
        case .sizeMismatch: return .sizeMismatch
        case .tooLarge: return .tooLarge
        case .insufficientStorage: return .insufficientStorage
        case .unverifiedLimit: return .unverifiedLimit
        case .indexing: return .indexing
        case .diskFull: return .diskFull
        default: return .aborted
        }
    }
}
