import Foundation
import Testing
@testable import MeshCore

/// Hostile gossip: everything a message carries is bounded before it reaches membership, only
/// admitted nodes become members, and incarnation arithmetic saturates instead of trapping.
@Suite("Gossip admission and limits")
struct AdmissionTests {
    let a = node("a"), b = node("b"), c = node("c")

    func topologyAdmission(_ names: [String]) -> Membership.Configuration {
        var config = Membership.Configuration()
        config.admission = Admission(expected: Dictionary(uniqueKeysWithValues: names.map { ($0, meta($0)) }))
        return config
    }

    func mesh(_ config: Membership.Configuration, myself: NodeID, members: [NodeID]) -> MeshNode {
        MeshNode(myself: myself, metadata: meta(myself.name), membershipConfiguration: config,
                 initialMembers: members.map { alive($0) }, seed: 9)
    }

    @Test("an incarnation of 2^64−1 is refused whole, before it reaches membership")
    func maximalIncarnationRefused() throws {
        var na = mesh(topologyAdmission(["a", "b", "c"]), myself: a, members: [b, c])
        let forged = Envelope(from: b, message: .gossip(Gossip(members: [MemberUpdate(node: a, incarnation: .max, status: .dead, metadata: meta("a"))])))
        #expect(throws: GossipRejection.outOfRange("incarnation of a", value: "\(UInt64.max)")) { try na.receive(forged, now: .seconds(1)) }
        #expect(na.membership.incarnation == 0)
        #expect(na.membership.status(of: a) == .alive)
    }

    @Test("a claim about this node at the largest accepted incarnation is refuted without passing it")
    func refutationSaturates() throws {
        var config = topologyAdmission(["a", "b", "c"])
        config.limits.maxIncarnation = 1000
        var na = mesh(config, myself: a, members: [b, c])
        let atLimit = Envelope(from: b, message: .gossip(Gossip(members: [MemberUpdate(node: a, incarnation: 1000, status: .suspect, metadata: meta("a"))])))
        _ = try na.receive(atLimit, now: .seconds(1))
        #expect(na.membership.incarnation == 1000)
        // Again: still no trap and no overflow.
        _ = try na.receive(atLimit, now: .seconds(2))
        #expect(na.membership.incarnation == 1000)
        #expect(na.membership.status(of: a) == .alive)
    }

    @Test("the raw state machine never traps on UInt64.max either (the network path refuses it earlier)")
    func rawPathSaturates() {
        var ma = Membership(myself: a, metadata: meta("a"), initialMembers: [alive(b)], seed: 1)
        _ = ma.receive(.gossip(Gossip(members: [MemberUpdate(node: a, incarnation: .max, status: .dead, metadata: meta("a"))])), from: b, now: .seconds(1))
        #expect(ma.incarnation == GossipLimits().maxIncarnation)
        _ = ma.leave(now: .seconds(2))
        #expect(ma.incarnation == GossipLimits().maxIncarnation)
    }

    @Test("a node that only heard the rumour passes it on, and the subject refutes without trapping")
    func rumourSpreads() throws {
        // c tells b that a is dead at the largest valid incarnation; b gossips it to a.
        let config = topologyAdmission(["a", "b", "c"])
        var nb = mesh(config, myself: b, members: [a, c])
        var na = mesh(config, myself: a, members: [b, c])
        let limit = config.limits.maxIncarnation
        _ = try nb.receive(Envelope(from: c, message: .gossip(Gossip(members: [MemberUpdate(node: a, incarnation: limit, status: .dead, metadata: meta("a"))]))), now: .seconds(1))
        #expect(nb.membership.status(of: a) == .dead)
        var relayed: [Message] = []
        var now = Duration.seconds(1)
        while relayed.isEmpty, now < .seconds(5) {
            now += .milliseconds(50)
            for case .send(let m, let to) in nb.tick(now: now) where to == a { relayed.append(m) }
        }
        let message = try #require(relayed.first { $0.gossip?.members.contains { $0.node == a } ?? false })
        _ = try na.receive(Envelope(from: b, message: message), now: now)
        #expect(na.membership.incarnation == limit)
        #expect(na.membership.status(of: a) == .alive)
    }

    @Test("a sender the topology does not name is refused, and its push-pull gets no reply")
    func strangerRefused() {
        var na = mesh(topologyAdmission(["a", "b"]), myself: a, members: [b])
        let stranger = NodeID(name: "mallory", uid: 5)
        let hello = Envelope(from: stranger, message: .pushPull(PushPullState(members: [MemberUpdate(node: stranger, incarnation: 0, status: .alive, metadata: meta("mallory"))]), isReply: false))
        #expect(throws: GossipRejection.senderNotAdmitted("mallory")) { try na.receive(hello, now: .seconds(1)) }
        #expect(na.membership.member(stranger) == nil)
        #expect(na.membership.liveMembers == [a, b])
    }

    @Test("updates about nodes not in the topology, or with metadata not theirs, are dropped and counted")
    func foreignUpdatesDropped() throws {
        var na = mesh(topologyAdmission(["a", "b", "c"]), myself: a, members: [b])
        let stranger = NodeID(name: "mallory", uid: 5)
        var fakeOrigin = meta("c", role: .origin)
        fakeOrigin.tcpEndpoint = "203.0.113.9:443"
        let d = Digest(w0: 1, w1: 2, w2: 3, w3: 4, size: 10)
        let g = Gossip(members: [MemberUpdate(node: stranger, incarnation: 0, status: .alive, metadata: meta("mallory")),
                                 MemberUpdate(node: c, incarnation: 0, status: .alive, metadata: fakeOrigin)],
                       locality: [LocalityUpdate(holder: stranger, digest: d, present: true, version: 1, ageMs: 0),
                                  LocalityUpdate(holder: b, digest: d, present: true, version: 1, ageMs: 0)])
        _ = try na.receive(Envelope(from: b, message: .gossip(g)), now: .seconds(1))
        #expect(na.membership.member(stranger) == nil)
        #expect(na.membership.member(c) == nil)
        #expect(na.membership.refusedUpdates == 2)
        #expect(na.refusedLocality == 1)
        #expect(na.holders(of: d, now: .seconds(1)) == [b])
        // The genuine metadata is accepted.
        _ = try na.receive(Envelope(from: b, message: .gossip(Gossip(members: [alive(c)]))), now: .seconds(2))
        #expect(na.membership.status(of: c) == .alive)
    }

    @Test("counts, sizes, versions and names are bounded", arguments: [
        "members", "locality", "version", "size", "name", "control", "endpoint",
    ])
    func bounds(_ what: String) {
        var limits = GossipLimits()
        limits.maxMembers = 3
        limits.maxLocality = 3
        let d = Digest(w0: 1, w1: 2, w2: 3, w3: 4, size: 10)
        var g = Gossip()
        switch what {
        case "members": g.members = (0..<4).map { alive(node("n\($0)")) }
        case "locality": g.locality = (0..<4).map { LocalityUpdate(holder: b, digest: d, present: true, version: UInt64($0), ageMs: 0) }
        case "version": g.locality = [LocalityUpdate(holder: b, digest: d, present: true, version: limits.maxVersion + 1, ageMs: 0)]
        case "size": g.locality = [LocalityUpdate(holder: b, digest: Digest(w0: 1, w1: 2, w2: 3, w3: 4, size: -1), present: true, version: 1, ageMs: 0)]
        case "name": g.members = [alive(NodeID(name: String(repeating: "x", count: 254), uid: 1))]
        case "control": g.members = [alive(NodeID(name: "a\nb", uid: 1))]
        default:
            var m = meta("b")
            m.tcpEndpoint = String(repeating: "9", count: 301)
            g.members = [MemberUpdate(node: b, incarnation: 0, status: .alive, metadata: m)]
        }
        // The rejection for exactly this bound, not just any rejection.
        let expected: [String: GossipRejection] = [
            "members": .tooMany("member updates", count: 4, limit: 3),
            "locality": .tooMany("locality facts", count: 4, limit: 3),
            "version": .outOfRange("locality version", value: "\(limits.maxVersion + 1)"),
            "size": .outOfRange("blob size", value: "-1"),
            "name": .badString("node name \(String(reflecting: String(repeating: "x", count: 64)))"),
            "control": .badString("node name \(String(reflecting: "a\nb"))"),
            "endpoint": .badString("endpoint of b"),
        ]
        #expect(throws: expected[what]!) { try Envelope(from: b, message: .gossip(g)).validate(limits) }
        // The same message within bounds passes.
        #expect(throws: Never.self) { try Envelope(from: b, message: .gossip(Gossip(members: [alive(c)], locality: [LocalityUpdate(holder: b, digest: d, present: true, version: 1, ageMs: 0)]))).validate(limits) }
    }

    @Test("an incarnation that JSON carries as 2^64−1 decodes, and is refused by validation")
    func jsonRoundTrip() throws {
        let json = #"{"from":{"name":"b","uid":1},"message":{"gossip":{"_0":{"members":[{"node":{"name":"a","uid":2},"incarnation":18446744073709551615,"status":"dead","metadata":{"name":"a","role":"peer","tcpEndpoint":"a:7000","quicEndpoint":"","certificateCN":"a"}}],"locality":[]}}}}"#
        let envelope = try JSONDecoder().decode(Envelope.self, from: Data(json.utf8))
        #expect(envelope.message.gossip?.members.first?.incarnation == .max)
        #expect(throws: GossipRejection.outOfRange("incarnation of a", value: "18446744073709551615")) { try envelope.validate(GossipLimits()) }
    }
}
