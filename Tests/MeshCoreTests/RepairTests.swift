import Testing
@testable import MeshCore

@Suite("Restoring R after a death")
struct RepairTests {
    let nodes = (1...6).map { node("n\($0)") }

    func key(_ i: UInt64) -> Digest { Digest(w0: i &* 0x9E37_79B9_7F4A_7C15, w1: i, w2: ~i, w3: i << 7, sizeBytes: 0) }

    @Test("exactly one surviving holder copies, to the best-ranked member without a copy, for blobs wherever they were placed", arguments: 0..<50)
    func oneHolderCopies(_ i: Int) {
        let k = key(UInt64(i) + 1)
        // A blob on two nodes that need not be its rendezvous owners (a writer keeps its own copy).
        let a = nodes[i % 6], dead = nodes[(i % 6 + 1 + (i / 6) % 5) % 6]
        let live = nodes.filter { $0 != dead }
        // Before the death both hold it: nobody copies.
        #expect(Repair.targets(for: k, me: a, holders: [dead], live: nodes, replicas: 2).isEmpty)
        // After: the one survivor holds it alone and must copy it once.
        let targets = Repair.targets(for: k, me: a, holders: [], live: live, replicas: 2)
        #expect(targets.count == 1)
        #expect(!targets.contains(a) && !targets.contains(dead))
        #expect(targets == Rendezvous.top(1, for: k, over: live.filter { $0 != a }))
    }

    @Test("with several survivors only the one ranked first copies; the others leave it")
    func onlyTheFirstRankedHolderCopies() {
        let k = key(42)
        let dead = nodes[5]
        let live = Array(nodes.prefix(5))
        let holders = [nodes[0], nodes[1]]   // R = 3: two survivors, one copy missing
        var copiers: [NodeID] = []
        for h in holders {
            let t = Repair.targets(for: k, me: h, holders: holders.filter { $0 != h }, live: live, replicas: 3)
            if !t.isEmpty {
                copiers.append(h)
                #expect(t.count == 1 && !holders.contains(t[0]) && t[0] != dead)
            }
        }
        #expect(copiers == [Rendezvous.top(1, for: k, over: holders).first!])
    }

    @Test("a live member list that already includes this node (as Membership.liveMembers does) still yields targets")
    func selfInLiveList() {
        let me = nodes[0]
        let t = Repair.targets(for: key(7), me: me, holders: [], live: nodes, replicas: 2)
        #expect(t.count == 1 && t[0] != me)
    }

    @Test("nothing to do when R copies are live, or when no other member exists")
    func nothingToDo() {
        #expect(Repair.targets(for: key(9), me: nodes[0], holders: [nodes[1]], live: nodes, replicas: 2).isEmpty)
        #expect(Repair.targets(for: key(9), me: nodes[0], holders: [], live: [nodes[0]], replicas: 2).isEmpty)
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
            let d = Digest(w0: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, w1: 1, w2: 2, w3: UInt64(i), sizeBytes: 0)
            #expect(Rendezvous.rank(d, over: before).map(\.name) == Rendezvous.rank(d, over: after).map(\.name))
        }
    }
}
