/// A CAS blob as the index holds it: the SHA-256 in binary (four words, most significant first:
/// `w0` is hex digits 0–15) and the size. What the mesh pages through to announce and repair this
/// node's holdings without a String, or any other copy, per blob.
public struct BlobRecord: Hashable, Sendable {
    public var w0: UInt64
    public var w1: UInt64
    public var w2: UInt64
    public var w3: UInt64
    public var size: Int64

    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64, size: Int64) {
        (self.w0, self.w1, self.w2, self.w3, self.size) = (w0, w1, w2, w3, size)
    }

    /// The 64 lowercase hex digits.
    public var hash: String { HashBytes(w0: w0, w1: w1, w2: w2, w3: w3).hex }

    /// As a `Digest`.
    public var digest: Digest { Digest(w0: w0, w1: w1, w2: w2, w3: w3, size: size) }
}

extension BlobStore {
    /// Up to `limit` CAS blobs of the index from `cursor` on (start with 0) and the cursor to
    /// continue from (nil: the walk reached the end). A walk visits every blob held from its first
    /// page to its last exactly once; a blob stored or evicted during it may or may not appear
    /// (the mesh announces those by their own deltas). Entries are in storage order (not sorted,
    /// not LRU order); one lock acquisition per page, no allocation beyond the page itself.
    public func blobPage(from cursor: Int, limit: Int) -> (blobs: [BlobRecord], next: Int?) {
        let limit = max(1, limit)
        return state.withLock { s in
            var out: [BlobRecord] = []
            out.reserveCapacity(min(limit, s.blobCount))
            let next = s.index.forEachLiveSlot(from: cursor) { slot, isAction in
                guard !isAction else { return true }
                let (w0, w1, w2, w3) = s.index.words(slot)
                out.append(BlobRecord(w0: w0, w1: w1, w2: w2, w3: w3, size: s.index.size(slot)))
                return out.count < limit
            }
            return (out, next)
        }
    }

    /// Whether the index holds the CAS blob with this binary hash (no disk lookup, no String).
    public func holdsBlob(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) -> Bool {
        let key = EntryKey(kind: .cas, digest: HashBytes(w0: w0, w1: w1, w2: w2, w3: w3))
        return state.withLock { $0.index.lookup(key) != nil }
    }

    /// CAS blobs in the index now.
    public var blobCount: Int { state.withLock { $0.blobCount } }
}
