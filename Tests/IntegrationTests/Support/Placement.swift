import MeshCore

/// Rendezvous placement as every node computes it: it depends on the blob's hash and the member
/// names only (no per-process uid), so a test can tell which members a node will guess for a hash.
enum Placement {
    /// `names` ranked for `hash`, best first (a node's fetch guesses are the first R of all live
    /// members; its mirror targets the best of the others).
    static func rank(_ hash: String, over names: [String]) -> [String] {
        guard let key = MeshCore.Digest(hex: hash, sizeBytes: 0) else { return [] }
        return Rendezvous.rank(key, over: names.map { NodeID(name: $0, uid: 0) }).map(\.name)
    }
}
