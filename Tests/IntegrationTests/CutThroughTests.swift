import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import MeshHTTP
import NIOCore
import Testing
import TestSupport

/// Cut-through mesh fetches between real nodes: the body streams to the caller while it is
/// verified; a corrupt holder never completes a body at the caller, and a holder killed
/// mid-body is followed by the next source from the same offset.
@Suite("Cut-through mesh fetch", .serialized)
struct CutThroughTests {
    /// A client of `n` over `transport` (the node's HTTP/2 or HTTP/3 endpoint).
    func client(_ mesh: TestMesh, _ n: String, _ transport: String) async throws -> CacheClient {
        var o = ClientOptions(server: HostPort(host: "127.0.0.1", port: mesh.ports[n]!),
                              certificate: mesh.certs.path("client.pem"), privateKey: mesh.certs.path("client.key"), ca: mesh.certs.ca)
        o.transport = transport == "quic" ? .quic : .tcp
        return try await CacheClient.connect(o)
    }

    /// Reads a response body to its end: the bytes, and the error that ended it early (if any).
    func read(_ body: HTTPInboundBody, onProgress: (Int) -> Void = { _ in }) async -> ([UInt8], (any Error)?) {
        var out: [UInt8] = []
        do {
            for try await chunk in body {
                out += chunk.readableBytesView
                onProgress(out.count)
            }
            return (out, nil)
        } catch {
            return (out, error)
        }
    }

    @Test("a holder serving wrong bytes for a digest: the caller (HTTP/2 and HTTP/3, legs over TCP and QUIC) gets 200 and a reset stream before the last byte, nothing is stored, the node keeps serving",
          .timeLimit(.minutes(4)), arguments: ["tcp", "quic"])
    func corruptHolderNeverCompletesABody(transport: String) async throws {
        let mesh = try await TestMesh(.init(strategy: "peers-only", transport: transport, repairEnabled: false))
        defer { mesh.stopAll() }
        try await mesh.converge()
        let data = randomBytes(6_000_000)
        let d = try await mesh.place(data, on: ["peer1"])
        try await mesh.waitForLocality("peer3", entries: 1)
        // peer1's copy goes bad on disk (same size, last byte flipped): it serves wrong bytes
        // under the blob's name.
        let path = mesh.dir.file("peer1/cas/\(d.hash.prefix(2))/\(d.hash)")
        let fh = try #require(FileHandle(forUpdatingAtPath: path))
        try fh.seek(toOffset: UInt64(data.count - 1))
        try fh.write(contentsOf: [data[data.count - 1] ^ 0xFF])
        try fh.close()

        let c = try await client(mesh, "peer3", transport)
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
        #expect(r.status == 200)
        #expect(r.headers["x-cachemesh-source"]?.hasPrefix("peer:peer1 via \(transport)") == true, "\(r.headers["x-cachemesh-source"] ?? "-")")
        #expect(r.headers["content-length"] == String(data.count))
        let (got, error) = await read(r.body)
        #expect(got.count < data.count, "the caller received \(got.count) of \(data.count) bytes")
        #expect(got == Array(data.prefix(got.count)))
        #expect(error as? HTTPTransportError == .streamReset(errorCode: transport == "quic" ? 0x102 : 2), "\(String(describing: error))")
        // Nothing stored at the reader, no upload left behind.
        #expect(!mesh.holds("peer3", d.hash))
        let clean = await eventually(timeout: 10) { ((try? FileManager.default.contentsOfDirectory(atPath: mesh.dir.file("peer3/tmp"))) ?? ["?"]).isEmpty }
        #expect(clean)
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_corrupt_bodies_total") == 1)
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_wins_total{source=\"peer\"}") == 0)
        #expect(try await mesh.meshStatus("peer2").localityEntries == 1, "peer3 must not announce the blob")
        // The node keeps serving: a good blob from the same holder arrives whole.
        let good = randomBytes(3_000_000)
        let g = try await mesh.place(good, on: ["peer1"])
        try await mesh.waitForLocality("peer3", entries: 2)
        let r2 = try await c.connection.request(.init(method: "GET", path: "/cas/\(g.hash)"))
        #expect(r2.status == 200)
        let (got2, error2) = await read(r2.body)
        #expect(error2 == nil)
        #expect(got2 == good)
        await c.close()
    }

    @Test("the holder is killed mid-body (behind a 40 Mbit/s relay): the caller (HTTP/2 and HTTP/3, legs over TCP and QUIC) still gets the whole blob, the rest from the origin by a Range request",
          .timeLimit(.minutes(4)), arguments: ["tcp", "quic"])
    func holderKilledMidBodyIsResumed(transport: String) async throws {
        let holderPort = try TestMesh.freePort()
        // 5 MB/s: the 32 MB body takes ~6 s from the holder, so the kill lands mid-body (what the
        // holder had sent into the relay's 1 MiB queue and the sockets' buffers still arrives).
        let relay = try await TestRelay.start(targetPort: holderPort, profile: ["--rate", "40mbit", "--queue-limit", "1MiB"])
        defer { relay.child.killAndWait() }
        let mesh = try await TestMesh(.init(strategy: "peers-only", transport: transport, extra: [
            "peer1": "advertise_tcp = \"\(relay.address)\"\nadvertise_quic = \"\(relay.address)\"",
        ], ports: ["peer1": holderPort], repairEnabled: false))
        defer { mesh.stopAll() }
        try await mesh.converge()
        let data = randomBytes(32_000_000)
        let d = try await mesh.place(data, on: ["peer1", "origin"])
        try await mesh.waitForLocality("peer3", entries: 2)

        let c = try await client(mesh, "peer3", transport)
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
        #expect(r.status == 200)
        #expect(r.headers["x-cachemesh-source"]?.hasPrefix("peer:peer1 via \(transport)") == true, "\(r.headers["x-cachemesh-source"] ?? "-")")
        var killedAt: Int?
        let (got, error) = await read(r.body) { n in
            if killedAt == nil && n >= 2_000_000 {
                killedAt = n
                mesh.children["peer1"]!.killAndWait()
            }
        }
        let k = try #require(killedAt, "the body ended before the holder could be killed")
        #expect(error == nil, "\(String(describing: error))\n\(mesh.logs())")
        #expect(got.count == data.count)
        #expect(got == data)
        // The caller had more than it needed before the kill; the relay carried only part of the blob.
        #expect(k < data.count)
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_resumed_total") == 1)
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_wins_total{source=\"origin\"}") == 1)
        #expect(mesh.holds("peer3", d.hash))
        #expect(try await mesh.metric("origin", "cachemesh_http_range_requests_total") == 1)
        await c.close()
    }
}
