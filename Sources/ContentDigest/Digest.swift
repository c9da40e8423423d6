/// A content address: SHA-256 (four 64-bit words, 32 bytes) plus the blob's size in bytes. The
/// one digest type of the store, the mesh and the routes.
///
/// `hash` is its 64 lowercase hex characters; `description` is `"hash/size"`, the form used in
/// Bazel remote-cache URLs. Encoded (gossip, `/mesh/has`) as `{"hash": "<64 hex>", "size": N}`.
public struct Digest: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public var w0: UInt64
    public var w1: UInt64
    public var w2: UInt64
    public var w3: UInt64
    /// Size of the blob in bytes (>= 0).
    public var size: Int64

    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64, size: Int64) {
        self.w0 = w0
        self.w1 = w1
        self.w2 = w2
        self.w3 = w3
        self.size = size
    }

    /// Returns `nil` unless `hash` is 64 lowercase hex characters and `size >= 0`.
    public init?(hash: String, size: Int64) {
        guard size >= 0, Digest.isValidHash(hash) else { return nil }
        self.init(validatedHash: hash, size: size)
    }

    /// Parses 64 hex digits of either case (gossip accepts both). Returns nil for anything else.
    public init?(hex: String, size: Int64) {
        guard size >= 0, let w = Self.words(hex, upperCase: true) else { return nil }
        self.init(w0: w.0, w1: w.1, w2: w.2, w3: w.3, size: size)
    }

    /// For hashes already validated (or computed) by the caller: 64 lowercase hex characters.
    package init(validatedHash hash: String, size: Int64) {
        guard let w = Self.words(hash, upperCase: false) else { preconditionFailure("not a validated hash: \(hash)") }
        self.init(w0: w.0, w1: w.1, w2: w.2, w3: w.3, size: size)
    }

    /// The SHA-256 as 64 lowercase hex characters.
    public var hash: String {
        String(unsafeUninitializedCapacity: 64) { out in
            func put(_ w: UInt64, at base: Int) {
                for i in 0..<16 {
                    let nibble = UInt8(truncatingIfNeeded: w >> UInt64(60 - 4 * i)) & 0xf
                    out[base + i] = nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10
                }
            }
            put(w0, at: 0)
            put(w1, at: 16)
            put(w2, at: 32)
            put(w3, at: 48)
            return 64
        }
    }

    public var description: String { "\(hash)/\(size)" }

    public static func < (lhs: Digest, rhs: Digest) -> Bool {
        (lhs.w0, lhs.w1, lhs.w2, lhs.w3, lhs.size) < (rhs.w0, rhs.w1, rhs.w2, rhs.w3, rhs.size)
    }

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

    /// The four words of 64 hex digits (lowercase, or either case with `upperCase`), or nil.
    private static func words(_ hex: String, upperCase: Bool) -> (UInt64, UInt64, UInt64, UInt64)? {
        var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        var count = 0
        for c in hex.utf8 {
            let nibble: UInt64
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = UInt64(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): nibble = UInt64(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F") where upperCase: nibble = UInt64(c - UInt8(ascii: "A") + 10)
            default: return nil
            }
            guard count < 64 else { return nil }
            switch count / 16 {
            case 0: words.0 = words.0 << 4 | nibble
            case 1: words.1 = words.1 << 4 | nibble
            case 2: words.2 = words.2 << 4 | nibble
            default: words.3 = words.3 << 4 | nibble
            }
            count += 1
        }
        return count == 64 ? words : nil
    }

    private enum CodingKeys: String, CodingKey { case hash, size }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let hex = try c.decode(String.self, forKey: .hash)
        let size = try c.decode(Int64.self, forKey: .size)
        guard let d = Digest(hex: hex, size: size) else {
            throw DecodingError.dataCorruptedError(forKey: .hash, in: c, debugDescription: "not a 64-hex digest with size >= 0")
        }
        self = d
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(hash, forKey: .hash)
        try c.encode(size, forKey: .size)
    }
}
