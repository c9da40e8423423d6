/// A content address: SHA-256 (64 lowercase hex characters) plus size in bytes.
///
/// The `description` is `"hash/size"`, the form used in Bazel remote-cache URLs.
public struct Digest: Hashable, Sendable, CustomStringConvertible {
    /// Exactly 64 lowercase hex characters.
    public let hash: String
    /// Size of the blob in bytes (>= 0).
    public let size: Int64

    /// Returns `nil` unless `hash` is 64 lowercase hex characters and `size >= 0`.
    public init?(hash: String, size: Int64) {
        guard size >= 0, Digest.isValidHash(hash) else { return nil }
        self.hash = hash
        self.size = size
    }

    /// For hashes already validated (or computed) by this module.
    init(validatedHash hash: String, size: Int64) {
        self.hash = hash
        self.size = size
    }

    public var description: String { "\(hash)/\(size)" }

    /// SHA-256 of the empty string.
    public static let emptyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    /// The digest of the empty blob, which every store always contains.
    public static let empty = Digest(validatedHash: emptyHash, size: 0)

    /// `true` iff `s` is exactly 64 characters from `[0-9a-f]` (uppercase is rejected).
    public static func isValidHash(_ s: Substring) -> Bool {
        // Hot path (every request): scan contiguous UTF-8 without String index checks.
        if let r = s.utf8.withContiguousStorageIfAvailable(isValidHashBytes) { return r }
        return isValidHashBytes(Array(s.utf8).withUnsafeBufferPointer { $0 })
    }

    private static func isValidHashBytes(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        guard bytes.count == 64 else { return false }
        for c in bytes {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "a")...UInt8(ascii: "f"): continue
            default: return false
            }
        }
        return true
    }

    /// `true` iff `s` is exactly 64 characters from `[0-9a-f]` (uppercase is rejected).
    public static func isValidHash(_ s: String) -> Bool {
        if let r = s.utf8.withContiguousStorageIfAvailable(isValidHashBytes) { return r }
        return isValidHash(s[...])
    }
}
