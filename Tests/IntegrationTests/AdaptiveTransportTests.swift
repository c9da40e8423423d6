import BlobStore
import CacheNode
import Foundation
import Testing
import TestSupport

/// `[fetch] transport = "adaptive"` on four real nodes (issue 13): per peer, the measured latency
/// and goodput of both transports pick the one a request takes; the QUIC fallback rules stay.
@Suite("Adaptive transport between nodes (four real nodes)", .serialized, .timeLimit(.minutes(4)))
struct AdaptiveTransportTests {
    @Test("both transports are measured and chosen by measurement, every fetch is right, /status says adaptive; a node whose UDP is blocked is reached over TCP as before")
    func adaptiveMesh() async throws {
        var options = TestMesh.Options()
        options.transport = "adaptive"
        options.quicBlocked = ["peer3"]
        options.repairEnabled = false   // blobs stay on the node they are placed on
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        try await mesh.converge()
        // Blobs large enough to give goodput samples, each on peer2 alone; one on peer3 alone.
        var onPeer2: [(Digest, [UInt8])] = []
        for _ in 0..<6 {
            let bytes = randomBytes(400_000)
            onPeer2.append((try await mesh.place(bytes, on: ["peer2"]), bytes))
        }
        let lone = randomBytes(400_000)
        let loneDigest = try await mesh.place(lone, on: ["peer3"])
        try await mesh.waitForLocality("peer1", entries: onPeer2.count + 1)

        let c = try await mesh.client("peer1")
        var sources: [String] = []
        for (d, bytes) in onPeer2 {
            let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
            #expect(r.status == 200)
            #expect(Array(try await r.body.collect(upTo: 1 << 20).readableBytesView) == bytes)
            sources.append(r.headers["x-cachemesh-source"] ?? "-")
        }
        #expect(sources.allSatisfy { $0 == "peer:peer2 via quic" || $0 == "peer:peer2 via tcp" }, "\(sources)")
        // The blob on the node whose QUIC port nobody listens on: TCP, as with transport = "quic".
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(loneDigest.hash)"))
        #expect(r.status == 200)
        #expect(r.headers["x-cachemesh-source"] == "peer:peer3 via tcp")
        #expect(Array(try await r.body.collect(upTo: 1 << 20).readableBytesView) == lone)
        await c.close()

        // The chooser ran: both transports were tried unmeasured, then measurements decided.
        let m = { (kind: String, reason: String) in
            try await mesh.metric("peer1", "cachemesh_mesh_transport_choices_total{reason=\"\(reason)\",transport=\"\(kind)\"}")
        }
        #expect(try await m("quic", "unmeasured") >= 1)
        #expect(try await m("tcp", "unmeasured") >= 1)
        #expect(try await m("quic", "measured") + m("tcp", "measured") >= Double(onPeer2.count))
        let status = try await mesh.meshStatus("peer1")
        #expect(status.transport == "adaptive")
    }
}
