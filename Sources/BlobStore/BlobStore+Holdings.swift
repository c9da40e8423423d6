extension BlobStore {
    /// Up to `limit` CAS blobs of the index from `cursor` on (start with 0) and the cursor to
    /// continue from (nil: the walk reached the end). A walk visits every blob held from its first
    /// page to its last exactly once; a blob stored or evicted during it may or may not appear
    /// (the mesh announces those by their own deltas). Entries are in storage order (not sorted,
    /// not LRU order); one lock acquisition per page, no allocation beyond the page itself (a
    /// `Digest` is the binary hash and the size: no String per blob).
    public func blobPage(from cursor: Int, limit: Int) -> (blobs: [Digest], next: Int?) {
        let limit = max(1, limit)
        return state.withLock { s in
            var out: [Digest] = []
            out.reserveCapacity(min(limit, s.blobCount))
            let next = s.index.forEachLiveSlot(from: cursor) { slot, isAction in
                guard !isAction else { return true }
                let (w0, w1, w2, w3) = s.index.words(slot)
                out.append(Digest(w0: w0, w1: w1, w2: w2, w3: w3, size: s.index.size(slot)))
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
