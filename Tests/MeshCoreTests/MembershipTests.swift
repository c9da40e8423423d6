import Testing
@testable import MeshCore

func meta(_ name: String, role: NodeRole = .peer) -> NodeMetadata {
    NodeMetadata(name: name, role: role, tcpEndpoint: "\(name):7000", quicEndpoint: "\(name):7001", certificateCN: name)
}

func node(_ name: String) -> NodeID { NodeID(name: name, uid: UInt64(name.utf8.reduce(7) { $0 &* 31 &+ UInt64($1) })) }

func alive(_ id: NodeID, incarnation: UInt64 = 0) -> MemberUpdate {
    MemberUpdate(node: id, incarnation: incarnation, status: .alive, metadata: meta(id.name))
}

/// Member events of `subject` seen anywhere in a simulated mesh.
func events(about subject: Int, in mesh: SimulatedMesh) -> [(time: Duration, observer: Int, event: MemberEvent)] {
    mesh.events.filter { $0.event.node == mesh.ids[subject] }
}

let seeds: [UInt64] = [1, 2, 3, 4, 5, 6, 7, 8]

@Suite("Membership")
struct MembershipTests {
    @Test("probe → ack happy path measures RTT and nobody is suspected")
    func probeAckHappyPath() {
        let a = node("a"), b = node("b")
        var ma = Membership(myself: a, metadata: meta("a"), initialMembers: [alive(b)], seed: 1)
        var mb = Membership(myself: b, metadata: meta("b"), initialMembers: [alive(a)], seed: 2)
        var now = Duration.zero
        var ping: (Message, NodeID)?
        while now < .seconds(2) {
            for case .send(let m, let to) in ma.tick(now: now) {
                if case .ping = m { ping = (m, to) }
            }
            if ping != nil { break }
            now += .milliseconds(10)
        }
        let (pingMessage, target) = try! #require(ping)
        #expect(target == b)
        guard case .ping(let seq, let pingTarget, _) = pingMessage else { Issue.record("not a ping"); return }
        #expect(pingTarget == b)

        let replies = mb.receive(pingMessage, from: a, now: now + .microseconds(200))
        let acks = replies.compactMap { action -> Message? in
            if case .send(let m, let to) = action, to == a, case .ack(let s, _) = m, s == seq { return m }
            return nil
        }
        #expect(acks.count == 1)

        let result = ma.receive(acks[0], from: b, now: now + .microseconds(400))
        #expect(result == [.rttMeasured(b, .microseconds(400))])
        // Keep running the two for a while with instant delivery: nobody is ever suspected.
        var queue: [(Message, NodeID, NodeID)] = []
        var changes: [MemberEvent] = []
        for _ in 0..<1000 {
            now += .milliseconds(10)
            for act in ma.tick(now: now) { if case .send(let m, let to) = act { queue.append((m, a, to)) } else if case .memberChanged(let e) = act { changes.append(e) } }
            for act in mb.tick(now: now) { if case .send(let m, let to) = act { queue.append((m, b, to)) } else if case .memberChanged(let e) = act { changes.append(e) } }
            while !queue.isEmpty {
                let (m, from, to) = queue.removeFirst()
                let acts = to == a ? ma.receive(m, from: from, now: now) : mb.receive(m, from: from, now: now)
                for act in acts { if case .send(let m2, let to2) = act { queue.append((m2, to, to2)) } else if case .memberChanged(let e) = act { changes.append(e) } }
            }
        }
        #expect(changes.isEmpty)
        #expect(ma.status(of: b) == .alive)
        #expect(mb.status(of: a) == .alive)
    }

    @Test("a member that stops answering goes suspect, then dead after the scaled suspicion timeout", arguments: seeds)
    func suspectThenDead(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 8)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(3))
        let timeout = mesh.nodes[0].membership.suspicionTimeout
        // memberlist: 4 × max(1, log10(8)) × 1 s = 4 s
        #expect(timeout == .seconds(4))
        mesh.crash(3)
        let crashAt = mesh.now
        mesh.run(until: .seconds(30))
        let evs = events(about: 3, in: mesh)
        let firstSuspect = try! #require(evs.first { $0.event.status == .suspect })
        let firstDead = try! #require(evs.first { $0.event.status == .dead })
        #expect(firstSuspect.time > crashAt)
        #expect(firstSuspect.time - crashAt <= .seconds(8) + .milliseconds(100))  // within one probe cycle of 7 members + slack
        #expect(firstDead.time - firstSuspect.time >= timeout)
        #expect(firstDead.time - firstSuspect.time <= timeout + .milliseconds(20))
        for i in mesh.nodes.indices where i != 3 {
            #expect(mesh.status(of: 3, seenBy: i) == .dead)
        }
    }

    @Test("the suspicion timeout scales with log10 of the cluster size")
    func suspicionScales() {
        let me = node("me")
        let small = Membership(myself: me, metadata: meta("me"), initialMembers: (0..<9).map { alive(node("s\($0)")) }, seed: 1)
        let large = Membership(myself: me, metadata: meta("me"), initialMembers: (0..<99).map { alive(node("l\($0)")) }, seed: 1)
        let huge = Membership(myself: me, metadata: meta("me"), initialMembers: (0..<999).map { alive(node("h\($0)")) }, seed: 1)
        let tiny = Membership(myself: me, metadata: meta("me"), initialMembers: (0..<2).map { alive(node("t\($0)")) }, seed: 1)
        let between = Membership(myself: me, metadata: meta("me"), initialMembers: (0..<315).map { alive(node("b\($0)")) }, seed: 1)
        #expect(small.clusterSize == 10)
        #expect(large.clusterSize == 100)
        #expect(huge.clusterSize == 1000)
        #expect(tiny.clusterSize == 3)
        #expect(between.clusterSize == 316)
        // Below 10 members the factor clamps to 1 (n = 3 and n = 10 share the floor); above it the
        // timeout grows with log10(n) — n = 10 alone cannot tell scaling from a constant.
        #expect(tiny.suspicionTimeout == .seconds(4))    // 4 × max(1, log10(3)) × 1 s
        #expect(small.suspicionTimeout == .seconds(4))   // 4 × log10(10) × 1 s
        #expect(large.suspicionTimeout == .seconds(8))   // 4 × log10(100) × 1 s
        #expect(huge.suspicionTimeout == .seconds(12))   // 4 × log10(1000) × 1 s
        #expect(between.suspicionTimeout == .milliseconds(9999))   // 4 × log10(316) = 9.9991 s, whole ms
        #expect(small.retransmitLimit == 8)              // 4 × ceil(log10(11))
        #expect(large.retransmitLimit == 12)             // 4 × ceil(log10(101))
        #expect(huge.retransmitLimit == 16)              // 4 × ceil(log10(1001))
    }

    @Test("a suspect refutes with a higher incarnation and becomes alive again")
    func refutation() {
        let a = node("a"), b = node("b")
        var ma = Membership(myself: a, metadata: meta("a"), initialMembers: [alive(b)], seed: 1)
        var mb = Membership(myself: b, metadata: meta("b"), initialMembers: [alive(a)], seed: 2)
        let suspicion = Gossip(members: [MemberUpdate(node: b, incarnation: 0, status: .suspect, metadata: meta("b"))])
        let atA = ma.receive(.gossip(suspicion), from: node("c"), now: .seconds(1))
        #expect(ma.status(of: b) == .suspect)
        #expect(atA.contains(.memberChanged(MemberEvent(node: b, metadata: meta("b"), previous: .alive, status: .suspect, incarnation: 0))))

        _ = mb.receive(.gossip(suspicion), from: node("c"), now: .seconds(1))
        #expect(mb.incarnation == 1)
        // B's next gossip carries its refutation.
        var refutation: Message?
        var now = Duration.seconds(1)
        while refutation == nil, now < .seconds(3) {
            now += .milliseconds(10)
            for case .send(let m, let to) in mb.tick(now: now) where to == a {
                if let g = m.gossip, g.members.contains(where: { $0.node == b && $0.status == .alive && $0.incarnation == 1 }) { refutation = m }
            }
        }
        let m = try! #require(refutation)
        let atA2 = ma.receive(m, from: b, now: now)
        #expect(ma.status(of: b) == .alive)
        #expect(ma.member(b)?.incarnation == 1)
        #expect(atA2.contains(.memberChanged(MemberEvent(node: b, metadata: meta("b"), previous: .suspect, status: .alive, incarnation: 1))))
        // A stale suspicion (old incarnation) no longer applies.
        _ = ma.receive(.gossip(suspicion), from: node("c"), now: now)
        #expect(ma.status(of: b) == .alive)
    }

    @Test("in a mesh, a node cut off briefly is suspected and refutes; everyone ends with it alive", arguments: seeds)
    func refutationInMesh(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 8)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(2))
        // Nothing reaches node 1 for 3 s (less than the 4 s suspicion timeout).
        for i in mesh.nodes.indices where i != 1 { mesh.block(from: i, to: 1) }
        mesh.run(until: .seconds(5))
        mesh.healAllLinks()
        mesh.run(until: .seconds(25))
        let evs = events(about: 1, in: mesh)
        #expect(evs.contains { $0.event.status == .suspect })
        for i in mesh.nodes.indices where i != 1 {
            #expect(mesh.status(of: 1, seenBy: i) == .alive)
            #expect((mesh.nodes[i].membership.member(mesh.ids[1])?.incarnation ?? 0) >= 1)
        }
        #expect(mesh.nodes[1].membership.incarnation >= 1)
    }

    @Test("an indirect probe rescues a member that is reachable through others but not directly", arguments: seeds)
    func indirectProbeRescues(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 5)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.partition(0, 2)
        mesh.run(until: .seconds(40))
        #expect(mesh.sentKinds["pingReq", default: 0] > 0)
        #expect(!events(about: 2, in: mesh).contains { $0.event.status != .alive })
        #expect(!events(about: 0, in: mesh).contains { $0.event.status != .alive })
        for i in mesh.nodes.indices {
            for j in mesh.nodes.indices { #expect(mesh.status(of: j, seenBy: i) == .alive) }
        }
    }

    @Test("without helpers the same cut makes the member suspect (control for the rescue test)")
    func noHelpersNoRescue() {
        var config = SimulatedMesh.Configuration(nodeCount: 2)
        config.seed = 3
        var mesh = SimulatedMesh(config)
        mesh.partition(0, 1)
        mesh.run(until: .seconds(5))
        #expect(events(about: 1, in: mesh).contains { $0.event.status == .suspect && $0.observer == 0 })
    }

    @Test("leave propagates as left and the leaver is never marked dead", arguments: seeds)
    func leavePropagates(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 6)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.gained(digest(8), at: 2)
        mesh.run(until: .seconds(2))
        #expect(mesh.nodesKnowing(digest(8), heldBy: 2) == 5)
        mesh.leave(2)
        mesh.run(until: .seconds(3))  // the leaver keeps gossiping for a second, then stops
        mesh.crash(2)
        mesh.run(until: .seconds(40))
        for i in mesh.nodes.indices where i != 2 {
            #expect(mesh.status(of: 2, seenBy: i) == .left)
        }
        let evs = events(about: 2, in: mesh)
        #expect(!evs.contains { $0.event.status == .dead || $0.event.status == .suspect })
        #expect(evs.filter { $0.event.status == .left }.count == 6)  // itself + 5 others
        #expect(mesh.nodesKnowing(digest(8), heldBy: 2) == 0)  // a leaver's locality entries are dropped
    }

    @Test("each update is transmitted at most retransmitMult × ceil(log10(n+1)) times by a node")
    func retransmitLimit() {
        let me = node("me")
        let others = (0..<10).map { node("o\($0)") }
        var m = Membership(myself: me, metadata: meta("me"), initialMembers: others.map { alive($0) }, seed: 9)
        #expect(m.retransmitLimit == 8)
        var now = Duration.zero
        _ = m.updateMetadata(meta("me-v2"), now: now)
        var carried = 0
        var sends = 0
        for _ in 0..<1000 {
            now += .milliseconds(10)
            for case .send(let msg, _) in m.tick(now: now) {
                sends += 1
                if let g = msg.gossip, g.members.contains(where: { $0.node == me && $0.metadata.name == "me-v2" }) { carried += 1 }
            }
        }
        #expect(sends > 20)
        #expect(carried == 8)
        #expect(m.pendingBroadcasts == 0)
    }

    @Test("push-pull merges both members lists")
    func pushPullMerges() {
        let a = node("a"), b = node("b"), c = node("c"), d = node("d")
        var ma = Membership(myself: a, metadata: meta("a"), initialMembers: [alive(c)], seed: 1)
        var mb = Membership(myself: b, metadata: meta("b"), initialMembers: [alive(d, incarnation: 3)], seed: 2)
        let join = ma.join(seeds: ["b:7000"], now: .zero)
        guard case .sendToAddress(let pp, let address) = join.first else { Issue.record("no push-pull"); return }
        #expect(address == "b:7000")
        let replies = mb.receive(pp, from: a, now: .milliseconds(1))
        #expect(mb.status(of: a) == .alive)
        #expect(mb.status(of: c) == .alive)
        guard let reply = replies.compactMap({ act -> Message? in
            if case .send(let m, to: a) = act, case .pushPull(_, true) = m { return m }
            return nil
        }).first else { Issue.record("no reply"); return }
        _ = ma.receive(reply, from: b, now: .milliseconds(2))
        #expect(ma.liveMembers == [a, b, c, d].sorted())
        #expect(mb.liveMembers == [a, b, c, d].sorted())
        #expect(ma.member(d)?.incarnation == 3)
        // A reply is not answered again.
        #expect(!ma.receive(reply, from: b, now: .milliseconds(3)).contains { if case .send(.pushPull, _) = $0 { return true }; return false })
    }

    @Test("nodes joining through a seed converge to one view", arguments: seeds)
    func joinThroughSeed(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 12)
        config.startConverged = false
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(15))
        for i in mesh.nodes.indices {
            #expect(mesh.nodes[i].membership.liveMembers.count == 12)
        }
    }

    @Test("after a partition heals and a crash is detected, all alive nodes agree", arguments: seeds)
    func agreeAfterFailuresHeal(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 16)
        config.seed = seed
        config.lossRate = 0.01
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(2))
        mesh.crash(7)
        for i in 0..<8 { for j in 8..<16 where i != 7 && j != 7 { mesh.partition(i, j) } }
        mesh.run(until: .seconds(3))
        mesh.healAllLinks()
        mesh.run(until: .seconds(40))
        let reference = Dictionary(uniqueKeysWithValues: mesh.ids.map { ($0, mesh.status(of: mesh.indexOf($0)!, seenBy: 0)) })
        #expect(reference[mesh.ids[7]] == .dead)
        for i in mesh.nodes.indices where i != 7 {
            for (j, id) in mesh.ids.enumerated() {
                #expect(mesh.status(of: j, seenBy: i) == reference[id]!, "node \(i) on \(j)")
            }
        }
    }

    @Test("a ping for an earlier process with the same name is not answered (restarts get new uids)")
    func pingForOtherIncarnationIgnored() {
        let a = node("a")
        let bNew = NodeID(name: "b", uid: 2), bOld = NodeID(name: "b", uid: 1)
        var mb = Membership(myself: bNew, metadata: meta("b"), initialMembers: [alive(a)], seed: 1)
        #expect(mb.receive(.ping(seq: 1, target: bOld, gossip: Gossip()), from: a, now: .zero).isEmpty)
        #expect(mb.receive(.ping(seq: 2, target: bNew, gossip: Gossip()), from: a, now: .zero) == [.send(.ack(seq: 2, gossip: Gossip()), to: a)])
    }

    @Test("messages survive a JSON round trip")
    func codableRoundTrip() throws {
        let a = node("a")
        let digest = Digest(hex: String(repeating: "ab", count: 32), size: 42)!
        let gossip = Gossip(members: [alive(a, incarnation: 2)],
                            locality: [LocalityUpdate(holder: a, digest: digest, present: true, version: 3, ageMs: 10)])
        let messages: [Message] = [
            .ping(seq: 1, target: a, gossip: gossip), .ack(seq: 2, gossip: Gossip()),
            .pingReq(seq: 3, target: a, gossip: gossip), .gossip(gossip),
            .pushPull(PushPullState(members: gossip.members, locality: gossip.locality), isReply: true),
        ]
        for m in messages {
            let data = try JSONEncoder().encode(Envelope(from: a, message: m))
            let back = try JSONDecoder().decode(Envelope.self, from: data)
            #expect(back == Envelope(from: a, message: m))
        }
    }
}

import Foundation
