import MeshCore

/// The mesh's placement computed from node names alone (as every node computes it): what the
/// tests check the real nodes against.
enum PlacementOracle {
    /// The `replicas` owners of the blob `hash` among the live nodes `names`, best first.
    static func owners(of hash: String, among names: [String], replicas: Int) -> [String] {
        guard let key = Digest(hex: hash, sizeBytes: 0) else { return [] }
        return Placement.owners(of: key, live: names.map { NodeID(name: $0, uid: 1) }, replicas: replicas).map(\.name)
    }
}
