// Prints placement test vectors from the product's own code, for bench/mesh_scale.py's Python port
// of rendezvous placement (its --self-test checks the port against the vectors it embeds).
// Compiled together with the two MeshCore files that define placement, nothing else:
//   swiftc -parse-as-library Sources/MeshCore/Core.swift Sources/MeshCore/Rendezvous.swift \
//     bench/placement_vectors.swift -o /tmp/placement-vectors && /tmp/placement-vectors
@main
struct PlacementVectors {
    static func main() {
        let names = ["origin"] + (1...23).map { $0 < 10 ? "peer0\($0)" : "peer\($0)" }
        for name in ["origin", "peer01", "peer23", ""] {
            print("namehash \(name.isEmpty ? "-" : name) \(NodeID(name: name, uid: 1).nameHash)")
        }
        // Digests as the product keys placement (MeshService.placementKey: size 0).
        let hashes = [
            String(repeating: "0", count: 64),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "ffffffffffffffff0000000000000001aaaaaaaaaaaaaaaa5555555555555555",
        ]
        for h in hashes {
            let d = Digest(hex: h, sizeBytes: 0)!
            print("weight \(h) peer07 \(Rendezvous.weight(of: d, on: NodeID(name: "peer07", uid: 9)))")
            let live = names.map { NodeID(name: $0, uid: 1) }
            print("owners24 \(h) \(Placement.owners(of: d, live: live, replicas: 2).map(\.name).joined(separator: ","))")
            let some = Array(live.dropFirst(5).prefix(7))
            print("owners7 \(h) \(Placement.owners(of: d, live: some, replicas: 2).map(\.name).joined(separator: ","))")
        }
    }
}
