import CGnuTLS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Incremental SHA-256 backed by GnuTLS (`gnutls_hash_*`).
///
/// The hasher owns a GnuTLS hash handle and is therefore non-copyable; the
/// handle is released when the value goes away.
///
/// ```swift
/// var h = SHA256Hasher()
/// h.update(bytes: [1, 2, 3])
/// let hex = h.finalize()   // 64 lowercase hex characters
/// ```
public struct SHA256Hasher: ~Copyable {
    private let handle: gnutls_hash_hd_t

    /// Creates a hasher over the empty message.
    public init() {
        var hd: gnutls_hash_hd_t?
        let rc = gnutls_hash_init(&hd, GNUTLS_DIG_SHA256)
        // Only fails on memory exhaustion or a broken GnuTLS build; nothing sensible to recover.
        guard rc == 0, let hd else { fatalError("gnutls_hash_init(SHA256) failed with \(rc)") }
        handle = hd
    }

    deinit {
        gnutls_hash_deinit(handle, nil)
    }

    /// Feeds raw bytes into the hash.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        let rc = gnutls_hash(handle, base, bytes.count)
        precondition(rc == 0, "gnutls_hash failed with \(rc)")
    }

    /// Feeds an array of bytes into the hash.
    public mutating func update(bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// Feeds any byte sequence into the hash. Contiguous collections are hashed
    /// in place; other sequences are gathered into 64 KiB chunks first.
    public mutating func update(bytes: some Sequence<UInt8>) {
        let handled: Void? = bytes.withContiguousStorageIfAvailable { update(UnsafeRawBufferPointer($0)) }
        if handled != nil { return }
        let chunkSize = 64 * 1024
        var chunk = [UInt8]()
        chunk.reserveCapacity(chunkSize)
        for byte in bytes {
            chunk.append(byte)
            if chunk.count == chunkSize {
                update(bytes: chunk)
                chunk.removeAll(keepingCapacity: true)
            }
        }
        update(bytes: chunk)
    }

    /// Returns the lowercase hex digest of everything fed so far and resets the
    /// hasher to the empty message (so it may be reused).
    public mutating func finalize() -> String {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { gnutls_hash_output(handle, $0.baseAddress) }
        return HexEncoding.encode(out)
    }
}

enum HexEncoding {
    private static let digits: [UInt8] = Array("0123456789abcdef".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        String(unsafeUninitializedCapacity: bytes.count * 2) { out in
            var i = 0
            for b in bytes {
                out[i] = digits[Int(b >> 4)]
                out[i + 1] = digits[Int(b & 0x0f)]
                i += 2
            }
            return i
        }
    }
}

/// One-shot SHA-256 helpers.
public enum SHA256 {
    /// Lowercase hex SHA-256 of a buffer.
    public static func hex(_ bytes: UnsafeRawBufferPointer) -> String {
        var h = SHA256Hasher()
        h.update(bytes)
        return h.finalize()
    }

    /// Lowercase hex SHA-256 of a byte array.
    public static func hex(_ bytes: [UInt8]) -> String {
        bytes.withUnsafeBytes { hex($0) }
    }

    /// Hashes a file in 256 KiB chunks.
    /// - Returns: the lowercase hex SHA-256 and the number of bytes read.
    /// - Throws: ``BlobStoreError/io(_:)`` if the file cannot be opened or read.
    public static func hexOfFile(path: String) throws -> (hash: String, size: Int64) {
        let fd = try Posix.openForReading(path)
        defer { Posix.closeQuietly(fd) }
        var h = SHA256Hasher()
        var total: Int64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let n = try Posix.pread(fd, buffer, offset: total, path: path)
            if n == 0 { break }
            h.update(UnsafeRawBufferPointer(rebasing: buffer[..<n]))
            total += Int64(n)
        }
        return (h.finalize(), total)
    }
}
