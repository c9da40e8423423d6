import MeshCore

/// The mesh's placement computed from node names alone, as every node computes it (rendezvous
/// over names, no per-process uid): what the tests check the real nodes against.
enum PlacementOracle {
    /// `names` ranked for `hash`, best first (a node's fetch guesses are the first R of all live
    /// members; its mirror targets the best of the others).
    static func rank(_ hash: String, over names: [String]) -> [String] {
        guard let key = Digest(hex: hash, size: 0) else { return [] }
        return Rendezvous.rank(key, over: names.map { NodeID(name: $0, uid: 0) }).map(\.name)
    }

    /// The `replicas` owners of the blob `hash` among the live nodes `names`, best first.
    static func owners(of hash: String, among names: [String], replicas: Int) -> [String] {
        guard let key = Digest(hex: hash, size: 0) else { return [] }
        return MeshCore.Placement.owners(of: key, live: names.map { NodeID(name: $0, uid: 0) }, replicas: replicas).map(\.name)
    }
}
