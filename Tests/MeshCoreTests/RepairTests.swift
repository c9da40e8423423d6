import Testing
@testable import MeshCore

@Suite("Placement: blobs converge onto their R owners")
struct PlacementTests {
    let nodes = (1...6).map { node("n\($0)") }

    func key(_ i: UInt64) -> Digest { Digest(w0: i &* 0x9E37_79B9_7F4A_7C15, w1: i, w2: ~i, w3: i << 7, size: 0) }

    /// One round of anti-entropy with exact knowledge: every holder asks the owners and copies
    /// where `copyTargets` says. Returns the holders afterwards and the number of copies made.
    func round(_ k: Digest, holders: Set<NodeID>, live: [NodeID], replicas: Int) -> (Set<NodeID>, Int) {
        let owners = Placement.owners(of: k, live: live, replicas: replicas)
        var after = holders, copies = 0
        for h in holders.sorted() where live.contains(h) {
            let targets = Placement.copyTargets(owners: owners, me: h, holding: holders.subtracting([h]))
            copies += targets.count
            after.formUnion(targets)
        }
        return (after, copies)
    }

    @Test("owners are the R best-ranked live members, this node included, the same from every member", arguments: [1, 2, 3])
    func ownersAreTheTopR(_ r: Int) {
        for i in 1...50 {
            let k = key(UInt64(i))
            let owners = Placement.owners(of: k, live: nodes, replicas: r)
            #expect(owners == Rendezvous.top(r, for: k, over: nodes))
            #expect(owners.count == r && Set(owners).count == r)
            #expect(Placement.owners(of: k, live: nodes.reversed() + [nodes[0]], replicas: r) == owners)
        }
    }

    @Test("after any death, one round puts every blob on all of its R live owners; copies only go to owners that lacked it",
          arguments: 0..<60)
    func oneRoundRestoresTheInvariant(_ i: Int) {
        let k = key(UInt64(i) + 1)
        let replicas = 2 + i % 2
        // Copies on any two or three nodes (the writer need not be an owner), then one of them dies.
        var picked: [NodeID] = []
        for j in 0..<36 where picked.count < replicas {
            let n = nodes[(i + j * (1 + i % 5)) % 6]
            if !picked.contains(n) { picked.append(n) }
        }
        let holders = Set(picked)
        let dead = holders.sorted()[i % holders.count]
        let live = nodes.filter { $0 != dead }
        let survivors = holders.subtracting([dead])
        let (after, copies) = round(k, holders: survivors, live: live, replicas: replicas)
        let owners = Set(Placement.owners(of: k, live: live, replicas: replicas))
        #expect(owners.isSubset(of: after), "owners \(owners) not all holding: \(after)")
        #expect(!after.contains(dead))
        let missing = owners.subtracting(survivors).count
        if !survivors.isDisjoint(with: owners) {
            // An owner held it: that owner alone copied, once per missing owner.
            #expect(copies == missing)
        } else {
            // No owner held it: each survivor copied to every owner (duplicates are harmless).
            #expect(copies == missing * survivors.count)
        }
        // A second round with everything in place copies nothing.
        #expect(round(k, holders: after, live: live, replicas: replicas).1 == 0)
    }

    @Test("the best-ranked owner that holds it copies; a lower-ranked owner and bonus copies outside the owners leave it")
    func responsibility() {
        let k = key(42)
        let ranked = Rendezvous.rank(k, over: nodes)
        let owners = Array(ranked.prefix(3))
        let outsider = ranked[4]
        // The second owner and an outsider hold it: the second owner copies to owners 1 and 3.
        #expect(Placement.copyTargets(owners: owners, me: owners[1], holding: [outsider]) == [owners[0], owners[2]])
        #expect(Placement.copyTargets(owners: owners, me: outsider, holding: [owners[1]]).isEmpty)
        // Owner 1 also holds it: it is responsible, owner 2 does nothing.
        #expect(Placement.copyTargets(owners: owners, me: owners[1], holding: [owners[0]]).isEmpty)
        #expect(Placement.copyTargets(owners: owners, me: owners[0], holding: [owners[1]]) == [owners[2]])
        // Only an outsider holds it: it copies to all three owners.
        #expect(Placement.copyTargets(owners: owners, me: outsider, holding: []) == owners)
        // Everything in place: nothing to do, for anyone.
        for n in owners + [outsider] {
            #expect(Placement.copyTargets(owners: owners, me: n, holding: Set(owners + [outsider]).subtracting([n])).isEmpty)
        }
    }

    @Test("alone in the mesh a node is its blobs' only owner: nothing to copy")
    func alone() {
        let me = nodes[0]
        let owners = Placement.owners(of: key(9), live: [me], replicas: 2)
        #expect(owners == [me])
        #expect(Placement.copyTargets(owners: owners, me: me, holding: []).isEmpty)
    }
}

@Suite("Placement follows names")
struct PlacementByNameTests {
    @Test("a restarted node (same name, new uid) ranks exactly where it did before its restart")
    func restartKeepsPlacement() {
        let before = (1...5).map { NodeID(name: "n\($0)", uid: UInt64($0)) }
        var after = before
        after[2] = NodeID(name: "n3", uid: 0xDEAD_BEEF)   // n3 restarted
        for i in 0..<200 {
            let d = Digest(w0: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, w1: 1, w2: 2, w3: UInt64(i), size: 0)
            #expect(Rendezvous.rank(d, over: before).map(\.name) == Rendezvous.rank(d, over: after).map(\.name))
        }
    }
}
