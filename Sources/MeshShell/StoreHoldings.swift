import BlobStore
import MeshCore
import MeshHTTP

/// The locality map's view of this node's holdings: the store's index, paged by its cursor
/// (`BlobStore.blobPage`), binary digests only. Takes the store lock under the mesh core's lock
/// (the store never calls into the mesh while holding its own, so the order is safe).
struct StoreHoldings: HoldingsProvider {
    let store: BlobStore

    var heldCount: Int { store.blobCount }

    func holds(_ digest: Digest) -> Bool {
        store.holdsBlob(w0: digest.w0, w1: digest.w1, w2: digest.w2, w3: digest.w3)
    }

    func holdingsPage(from cursor: Int, limit: Int) -> (digests: [Digest], next: Int?) {
        let (blobs, next) = store.blobPage(from: cursor, limit: limit)
        return (blobs, next)
    }
}

extension BlobStore {
    /// Walks every CAS blob of the index in pages of `batch` (`blobPage`), calling `body` with
    /// each page of `Digest`s until it returns false.
    /// Returns how many blobs were visited.
    @discardableResult
    func forEachBlobPage(batch: Int, _ body: ([Digest]) async -> Bool) async -> Int {
        var cursor: Int? = 0
        var visited = 0
        while let c = cursor {
            let (blobs, next) = blobPage(from: c, limit: batch)
            cursor = next
            guard !blobs.isEmpty else { continue }
            visited += blobs.count
            if await !body(blobs) { break }
        }
        return visited
    }
}

/// A stored blob sent as a body (routes answering `GET /cas`, mirrors and hand-offs uploading it).
extension BlobReader: FileBodySource {
    public var start: Int64 { offset }
}
