#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Errors reported by ``BlobStore``, ``BlobWriter`` and ``BlobReader``.
///
/// The `description`s are meant to be sent to clients verbatim (HTTP bodies,
/// gRPC status messages), so they are short, precise and never contain
/// unbounded client input.
public enum BlobStoreError: Error, Sendable, CustomStringConvertible, Equatable {
    /// The given string is not 64 lowercase hex characters.
    case invalidHash(String)
    /// The uploaded body does not hash to the hash it was uploaded under.
    case digestMismatch(expected: String, actual: String)
    /// The uploaded body's length differs from the declared size.
    case sizeMismatch(expected: Int64, actual: Int64)
    /// A single blob is larger than the whole store (`maxBytes`); maps to HTTP 413.
    case tooLarge(size: Int64, limit: Int64)
    /// Not enough space can be freed (the rest is pinned or reserved); maps to HTTP 507.
    case insufficientStorage(needed: Int64, available: Int64)
    /// Unverified uploads already hold all the space they may take by eviction
    /// (``BlobStoreConfiguration/maxUnverifiedBytes``) and the store has no free space left; a
    /// transient condition: maps to HTTP 503 / gRPC UNAVAILABLE.
    case unverifiedLimit(inFlight: Int64, limit: Int64)
    /// The store is full and its index is still being rebuilt after a start (nothing can be evicted
    /// before the LRU order is known); transient: HTTP 503 / gRPC UNAVAILABLE.
    case indexing(scannedDirectories: Int, totalDirectories: Int)
    /// The file system holding the store ran out of space (ENOSPC/EDQUOT) before `maxBytes` was
    /// reached; nothing partial is kept and the store's effective limit shrinks: HTTP 507.
    case diskFull(String)
    /// No blob / action with this hash.
    case notFound(String)
    /// A read was requested past the end of the blob.
    case offsetOutOfRange(offset: Int64, size: Int64)
    /// A file system operation failed; the text includes the `errno` description.
    case io(String)
    /// The writer (or reader) was already committed, aborted or closed.
    case closed

    public var description: String {
        switch self {
        case .invalidHash(let s):
            return "invalid hash \"\(BlobStoreError.truncate(s))\": expected 64 lowercase hex characters"
        case .digestMismatch(let expected, let actual):
            return "hash mismatch: path says \(expected), body hashes to \(actual)"
        case .sizeMismatch(let expected, let actual):
            return "size mismatch: expected \(expected) bytes, received \(actual)"
        case .tooLarge(let size, let limit):
            return "blob too large: \(size) bytes exceeds the store capacity of \(limit) bytes"
        case .insufficientStorage(let needed, let available):
            return "insufficient storage: need \(needed) bytes but only \(available) can be freed (the rest is in use by readers or pending uploads)"
        case .unverifiedLimit(let inFlight, let limit):
            return "the store is full and uploads in progress already hold \(inFlight) unverified bytes (limit \(limit), max_unverified_bytes); retry later"
        case .indexing(let done, let total):
            return "the store is full and its index is still being rebuilt after a restart (\(done) of \(total) directories scanned); retry later"
        case .diskFull(let text):
            return "insufficient storage: the file system is full (\(text))"
        case .notFound(let hash):
            return "not found: \(BlobStoreError.truncate(hash))"
        case .offsetOutOfRange(let offset, let size):
            return "offset \(offset) is out of range for a blob of \(size) bytes"
        case .io(let text):
            return "I/O error: \(text)"
        case .closed:
            return "the writer or reader is already committed, aborted or closed"
        }
    }

    private static func truncate(_ s: String) -> String {
        let limit = 80
        let clean = String(String.UnicodeScalarView(s.unicodeScalars.prefix(limit + 1).map {
            ($0.value < 0x20 || $0 == "\"" || $0 == "\\") ? "?" : $0
        }))
        return clean.unicodeScalars.count > limit ? String(clean.prefix(limit)) + "…" : clean
    }
}

extension BlobStoreError {
    /// The text of an `.io` error without the "I/O error: " prefix; else the description.
    public var ioText: String {
        if case .io(let text) = self { return text }
        return description
    }
}

/// The store's directory cannot be used: it cannot be created, or files cannot be created,
/// renamed and removed in it. Thrown by `BlobStore.init`, so a node stops at start with the path
/// and the cause instead of answering every PUT with a 500.
public struct DataDirectoryError: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var reason: String

    public var description: String { "cannot use the data directory \(path): \(reason)" }

    /// Creates, writes, renames and removes a file in `temporary` (what every upload does), and
    /// asks the kernel whether each of `written` may be written to (`access(2)` refuses even root
    /// for an immutable directory or a read-only file system).
    static func probe(directory: String, temporary: String, written: [String]) throws(DataDirectoryError) {
        let probe = temporary + "/.write-probe-\(getpid())"
        let fd = open(probe, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DataDirectoryError(path: directory, reason: "cannot create a file in \(temporary): \(Posix.errnoWords(errno))") }
        var byte: UInt8 = 0
        let n = write(fd, &byte, 1)
        let writeErrno = errno
        close(fd)
        defer { unlink(probe) }
        guard n == 1 else { throw DataDirectoryError(path: directory, reason: "cannot write to a file in \(temporary): \(Posix.errnoWords(writeErrno))") }
        guard rename(probe, probe + ".renamed") == 0 else {
            throw DataDirectoryError(path: directory, reason: "cannot rename a file in \(temporary): \(Posix.errnoWords(errno))")
        }
        guard unlink(probe + ".renamed") == 0 else {
            throw DataDirectoryError(path: directory, reason: "cannot remove a file in \(temporary): \(Posix.errnoWords(errno))")
        }
        for d in written where access(d, W_OK | X_OK) != 0 {
            throw DataDirectoryError(path: directory, reason: "cannot write to \(d): \(Posix.errnoWords(errno))")
        }
    }
}
