// libFuzzer target: gossip decoding + membership apply.
//
// Input: JSON, as POST /mesh/gossip receives it. Either one `Envelope` or a JSON array of them
// (a short conversation applied in order to the same node). Each envelope goes through the same
// path as MeshService.handleMeshRequest: JSONDecoder → MeshNode.receive(_:now:) (validate,
// admission, membership + locality), then the node ticks past its probe/suspicion timers so the
// state the message left behind is exercised too. Two nodes see every message: one that admits
// only a small topology (peer1, peer2, peer3, origin) and one that admits anyone.
import FuzzSupport
import Foundation
import MeshCore

private func meta(_ name: String, _ role: NodeRole = .peer) -> NodeMetadata {
    NodeMetadata(name: name, role: role, tcpEndpoint: "\(name):7443", quicEndpoint: "\(name):7443", certificateCN: name)
}

private let topology: [String: NodeMetadata] = [
    "peer1": meta("peer1"), "peer2": meta("peer2"), "peer3": meta("peer3"), "origin": meta("origin", .origin),
]

private func makeNode(admission: Admission) -> MeshNode {
    var config = Membership.Configuration.lan
    config.admission = admission
    let initial = [
        MemberUpdate(node: NodeID(name: "peer2", uid: 2), incarnation: 1, status: .alive, metadata: meta("peer2")),
        MemberUpdate(node: NodeID(name: "origin", uid: 9), incarnation: 3, status: .suspect, metadata: meta("origin", .origin)),
    ]
    return MeshNode(myself: NodeID(name: "peer1", uid: 1), metadata: meta("peer1"),
                    membershipConfiguration: config, initialMembers: initial, seed: 0x5eed)
}

private func apply(_ envelopes: [Envelope], admission: Admission) {
    var node = makeNode(admission: admission)
    var now = Duration.seconds(10)
    _ = node.tick(now: now)
    node.gained(Digest(w0: 1, w1: 2, w2: 3, w3: 4, size: 5), now: now)
    for e in envelopes {
        now += .milliseconds(250)
        do {
            _ = try node.receive(e, now: now)
        } catch {
            _ = error.description  // the reason is logged and sent back: must be formattable
        }
    }
    // Let timers fire: probes, suspicion → dead, gossip, push-pull, tombstones.
    for step in [Duration.milliseconds(600), .seconds(5), .seconds(31), .seconds(400)] {
        _ = node.tick(now: now + step)
    }
    let d = Digest(w0: 1, w1: 2, w2: 3, w3: 4, size: 5)
    _ = node.holders(of: d, now: now + .seconds(400))
    _ = node.mirrorCandidates(for: d)
    _ = node.leave(now: now + .seconds(401))
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Data(bytes: data, count: size)
    let decoder = JSONDecoder()
    let envelopes: [Envelope]
    if let list = try? decoder.decode([Envelope].self, from: bytes) {
        envelopes = Array(list.prefix(16))
    } else if let one = try? decoder.decode(Envelope.self, from: bytes) {
        envelopes = [one]
    } else {
        return 0
    }
    apply(envelopes, admission: Admission(expected: topology))
    apply(envelopes, admission: .anyone)
    return 0
}

@main
enum FuzzMain {
    static func main() {
        runLibFuzzer { data, size in
            guard let data else { return 0 }
            return fuzz(data, size)
        }
    }
}
