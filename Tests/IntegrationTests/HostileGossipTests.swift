import CacheNode
import Foundation
import MeshHTTP
import NIOCore
import Testing
import TestSupport

/// Crafted gossip against a real mesh (four processes, mTLS): a forged incarnation, a node
/// certificate the topology does not name, updates about strangers. The nodes refuse, say why,
/// count it, keep serving, and their view of the mesh is untouched.
@Suite("Hostile gossip against real nodes", .serialized)
struct HostileGossipTests {
    /// A wire envelope as an attacker writes it (JSON, by hand: no help from our encoder).
    static func envelope(from: String, members: [(name: String, incarnation: String, status: String, role: String, tcp: String)],
                         locality: [(holder: String, size: Int)] = [], pushPull: Bool = false) -> String {
        let ms = members.map { m in
            #"{"node":{"name":"\#(m.name)","uid":77},"incarnation":\#(m.incarnation),"status":"\#(m.status)","metadata":{"name":"\#(m.name)","role":"\#(m.role)","tcpEndpoint":"\#(m.tcp)","quicEndpoint":"","certificateCN":"\#(m.name)"}}"#
        }.joined(separator: ",")
        let ls = locality.map { l in
            #"{"holder":{"name":"\#(l.holder)","uid":77},"digest":{"hash":"\#(String(repeating: "ab", count: 32))","size":\#(l.size)},"present":true,"version":1,"ageMs":0}"#
        }.joined(separator: ",")
        let body = pushPull ? #"{"pushPull":{"_0":{"members":[\#(ms)],"locality":[\#(ls)]},"isReply":false}}"#
                            : #"{"gossip":{"_0":{"members":[\#(ms)],"locality":[\#(ls)]}}}"#
        return #"{"from":{"name":"\#(from)","uid":77},"message":\#(body)}"#
    }

    static func post(_ mesh: TestMesh, to n: String, as who: String, _ json: String) async throws -> (status: Int, body: String) {
        let c = try await mesh.client(n, as: who)
        defer { Task { await c.close() } }
        let r = try await c.connection.request(.init(method: "POST", path: "/mesh/gossip", headers: ["content-type": "application/json"]),
                                               body: .bytes(ByteBuffer(string: json)))
        let body = try await r.body.collect(upTo: 1 << 20)
        return (r.status, String(buffer: body))
    }

    @Test("forged incarnations, a stranger's node certificate and updates about strangers are refused; the mesh keeps its members and serves",
          .timeLimit(.minutes(4)))
    func hostileGossip() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        // A node certificate from the mesh's own CA whose name the topology does not list.
        try await NodeCertificates.shared.ensure(["mallory"], in: mesh.certs.dir)
        try await mesh.converge()

        let data = randomBytes(100_000)
        let stored = try await mesh.client("peer1").put(bytes: data)

        // 1. An incarnation of 2^64−1 about the receiver itself and about another member: 400 with
        //    the reason; no node dies (before, the receiver trapped, and so did the node the rumour
        //    was about once it heard it).
        for (subject, status) in [("origin", "dead"), ("peer2", "alive"), ("peer3", "suspect")] {
            let role = subject == "origin" ? "origin" : "peer"
            let json = Self.envelope(from: "peer1", members: [(subject, "18446744073709551615", status, role, "127.0.0.1:\(mesh.ports[subject]!)")])
            let r = try await Self.post(mesh, to: "origin", as: "peer1", json)
            #expect(r.status == 400, "\(r)")
            #expect(r.body.contains("incarnation") && r.body.contains("out of range"), "\(r.body)")
        }
        // A count beyond the limit.
        let many = (0..<5000).map { _ in (name: "peer2", incarnation: "0", status: "alive", role: "peer", tcp: "127.0.0.1:\(mesh.ports["peer2"]!)") }
        let rMany = try await Self.post(mesh, to: "peer2", as: "peer1", Self.envelope(from: "peer1", members: many))
        #expect(rMany.status == 400 && rMany.body.contains("at most"), "\(rMany)")
        // Blob sizes out of range in a locality fact: negative (the decoder refuses it) and 2^60.
        let rNegative = try await Self.post(mesh, to: "peer3", as: "peer1", Self.envelope(from: "peer1", members: [], locality: [("peer1", -5)]))
        #expect(rNegative.status == 400 && rNegative.body.contains("bad gossip message"), "\(rNegative)")
        let rSize = try await Self.post(mesh, to: "peer3", as: "peer1", Self.envelope(from: "peer1", members: [], locality: [("peer1", 1 << 60)]))
        #expect(rSize.status == 400 && rSize.body.contains("blob size"), "\(rSize)")

        // 2. A valid node certificate whose name is not in the topology: refused with 403, and its
        //    push-pull gets no member list back.
        let hello = Self.envelope(from: "mallory", members: [("mallory", "0", "alive", "peer", "127.0.0.1:1")], pushPull: true)
        let rStranger = try await Self.post(mesh, to: "peer1", as: "mallory", hello)
        #expect(rStranger.status == 403, "\(rStranger)")
        #expect(rStranger.body.contains("not a member") && !rStranger.body.contains("peer2"), "\(rStranger.body)")

        // 3. A member relaying facts about a stranger, and claiming to be the origin from another
        //    address: those updates are dropped (204 for the rest), counted and logged.
        let relay = Self.envelope(from: "peer1", members: [("mallory", "0", "alive", "peer", "127.0.0.1:1"),
                                                            ("peer3", "5", "alive", "origin", "203.0.113.9:443")],
                                  locality: [("mallory", 10)])
        let rRelay = try await Self.post(mesh, to: "peer2", as: "peer1", relay)
        #expect(rRelay.status == 204, "\(rRelay)")

        // Every node is still running, nobody learnt mallory, peer3 is still a peer at its own address.
        try await Task.sleep(for: .seconds(1))
        for n in mesh.names {
            #expect(!mesh.children[n]!.hasExited, "\(n) exited: \(mesh.children[n]!.stderr.suffix(2000))")
            let s = try await mesh.status(n)
            #expect(try await mesh.meshStatus(n).alive.count == 4, "\(n): \(s)")
            #expect(!s.contains("mallory"), "\(n): \(s)")
        }
        // Every refusal counted, exactly: origin the three incarnation envelopes; peer1 mallory's
        // hello; peer2 the oversized member list and the three dropped updates of the relay;
        // peer3 the negative size (undecodable) and the 2^60 size.
        for (n, refused) in [("origin", 3.0), ("peer1", 1), ("peer2", 4), ("peer3", 2)] {
            #expect(try await mesh.metric(n, "cachemesh_gossip_refused_total") == refused, "\(n)")
        }
        #expect(mesh.children["peer1"]!.stderr.contains("is not a member of this mesh"), "\(mesh.children["peer1"]!.stderr.suffix(1500))")
        #expect(mesh.children["peer2"]!.stderr.contains("dropped 3 update(s)"), "\(mesh.children["peer2"]!.stderr.suffix(1500))")

        // The legitimate client is still served, and what was stored is still there.
        let c = try await mesh.client("peer3")
        let tmp = mesh.dir.file("back")
        _ = try await c.get(hash: stored.hash, to: tmp)
        #expect(try await sha256sum(tmp) == stored.hash)
        await c.close()
    }
}
