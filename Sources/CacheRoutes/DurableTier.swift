import BlobStore
import MeshHTTP

/// The origin's durable tier behind its disk (`[origin] backend = "s3"`): the disk is a bounded
/// cache in front of it. CacheService and REAPIService consult it when the local store misses
/// and acknowledge writes only once it holds them.
public protocol DurableTier: Sendable {
    /// Brings blob `hash` into the local store, verified. true: it is local now; false: the tier
    /// does not have it. Throws when the tier cannot tell (down, slow) or answered bytes that do
    /// not hash to `hash` (`S3CorruptObject`).
    func fetch(hash: String) async throws -> Bool
    /// The blob's size in the tier, or nil.
    func size(of hash: String) async throws -> Int64?
    /// Makes the local blob `digest` durable in the tier. `checkFirst`: ask first and skip the
    /// upload when the tier has it already.
    func persist(_ digest: Digest, checkFirst: Bool) async throws
    func getAction(key: String) async throws -> [UInt8]?
    func putAction(key: String, value: [UInt8]) async throws
    func deleteAction(key: String) async throws
    /// Checks at start-up that the tier is usable (reachable, credentials, bucket).
    func check() async throws
    /// Like `fetch`, but a blob larger than `streamAbove` bytes may be answered while it arrives.
    func read(hash: String, streamAbove: Int64) async throws -> TierRead
}

/// What `DurableTier.read` found.
public enum TierRead: Sendable {
    /// Now in the local store.
    case local
    /// Not in the tier.
    case absent
    /// Arriving: a body that forwards it while it is stored and verified (`FillingBlob`), and
    /// its size if known.
    case arriving(HTTPOutboundStream, size: Int64?)
}

extension DurableTier {
    public func read(hash: String, streamAbove: Int64) async throws -> TierRead {
        try await fetch(hash: hash) ? .local : .absent
    }
}

/// S3 answered bytes for `cas/<hash>` that do not hash to `hash`: never stored, never served.
public struct S3CorruptObject: Error, CustomStringConvertible {
    public var hash: String
    public var reason: String
    package init(hash: String, reason: String) {
        self.hash = hash
        self.reason = reason
    }
    public var description: String { "S3 object cas/\(hash) does not hash to its key (\(reason)); not served" }
}
