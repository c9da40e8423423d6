import BlobStore
import CacheNode
import Foundation
import MeshHTTP
import NIOCore
import Testing
import TestSupport

/// The placement invariant and announcements on real processes (four nodes, mTLS, loopback):
/// blobs converge onto their R rendezvous owners, and a node restarted on its data directory is
/// routed to at once.
@Suite("Placement and anti-entropy on four real nodes", .serialized)
struct PlacementTests {
    /// Random data whose `replicas` owners over `names` satisfy `accept`.
    func data(ownedBy accept: ([String]) -> Bool, among names: [String], replicas: Int, size: Int = 200_000) -> [UInt8] {
        while true {
            let d = randomBytes(size)
            if accept(PlacementOracle.owners(of: SHA256.hex(d), among: names, replicas: replicas)) { return d }
        }
    }

    @Test("a blob held only outside its owners (a writer's or reader's copy) is copied onto both owners by the next anti-entropy pass; the extra copy stays; nothing else is copied",
          .timeLimit(.minutes(3)))
    func blobsConvergeOntoTheirOwners() async throws {
        var options = TestMesh.Options()
        options.repairInterval = 2
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        await mesh.converge()
        let bytes = data(ownedBy: { !$0.contains("peer1") }, among: mesh.names, replicas: 2)
        let d = try await mesh.place(bytes, on: ["peer1"])
        let owners = PlacementOracle.owners(of: d.hash, among: mesh.names, replicas: 2)
        let moved = await eventually(timeout: 30) { owners.allSatisfy { mesh.holds($0, d.hash) } }
        #expect(moved, "holders: \(mesh.names.filter { mesh.holds($0, d.hash) }), owners \(owners)\n\(mesh.logs())")
        #expect(mesh.names.filter { mesh.holds($0, d.hash) }.sorted() == (owners + ["peer1"]).sorted())
        // peer1 (no owner held it) made both copies; later passes find the owners holding it.
        let counted = await eventually(timeout: 10) { (try? await mesh.metric("peer1", "cachemesh_antientropy_copies_total")) == 2 }
        let copiesAtWriter = (try? await mesh.metric("peer1", "cachemesh_antientropy_copies_total")) ?? -1
        #expect(counted, "copies at peer1: \(copiesAtWriter)")
        try await Task.sleep(for: .seconds(5))   // two more passes
        #expect(try await mesh.metric("peer1", "cachemesh_antientropy_copies_total") == 2)
        for o in owners { #expect(try await mesh.metric(o, "cachemesh_antientropy_copies_total") == 0) }
        // The bytes on the owners are the blob.
        for o in owners {
            #expect(try await sha256sum(mesh.dir.file("\(o)/cas/\(d.hash.prefix(2))/\(d.hash)")) == d.hash)
        }
    }

    @Test("kill -9 and restart of a node on its data directory: a node that is not its seed routes a GET to the blob on its disk as soon as it sees it alive (R = 1: no copy elsewhere, and its owner is another node)",
          .timeLimit(.minutes(3)))
    func restartedNodeIsRoutedToAtOnce() async throws {
        var options = TestMesh.Options()
        options.replication = 1
        options.writeQuorum = 1
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        await mesh.converge()
        // Held by peer3 alone; its owner (where a guess would look) is someone else.
        let bytes = data(ownedBy: { $0 != ["peer3"] }, among: mesh.names, replicas: 1)
        let d = try await mesh.place(bytes, on: ["peer3"])
        mesh.children["peer3"]!.signal(SIGKILL)
        _ = await mesh.children["peer3"]!.waitForExit(timeout: 10)
        let dead = await eventually(timeout: 30) { ((try? await mesh.status("peer2")) ?? "").contains("\"name\": \"peer3\", \"status\": \"dead\"") }
        #expect(dead)
        // While it is down nobody can serve it: peer2 answers 404 (its guesses and the origin lack it).
        let reader = try await mesh.client("peer2")
        let before = try await reader.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
        _ = try? await before.body.collect(upTo: 1 << 20)
        #expect(before.status == 404)
        // Restart on the same data directory; peer2 is not its seed (origin and peer1 are).
        try mesh.start("peer3")
        let up = await eventually(timeout: 30) { mesh.children["peer3"]!.stdout.contains("listening tcp=") }
        try #require(up, "\(mesh.children["peer3"]!.stderr.suffix(1500))")
        let alive = await eventually(timeout: 30) {
            ((try? await mesh.status("peer2")) ?? "").contains("\"name\": \"peer3\", \"status\": \"alive\"")
        }
        try #require(alive, "\(mesh.logs())")
        // Push-pull with a random partner comes every 30 s; the welcome comes at once.
        var source = "-", status = 0
        let routed = await eventually(timeout: 5) {
            guard let r = try? await reader.connection.request(.init(method: "GET", path: "/cas/\(d.hash)")) else { return false }
            status = r.status
            source = r.headers["x-cachemesh-source"] ?? "-"
            let body = try? await r.body.collect(upTo: 1 << 20)
            return r.status == 200 && body.map { Array($0.readableBytesView) } == bytes
        }
        #expect(routed, "GET at peer2: \(status) from \(source)\n\(mesh.logs())")
        #expect(source.hasPrefix("peer:peer3"), "source \(source)")
        await reader.close()
    }
}
