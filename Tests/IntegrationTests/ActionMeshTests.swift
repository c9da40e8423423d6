import BlobStore
import CacheNode
import Foundation
import MeshGRPC
import MeshHTTP
import NIOCore
import REAPI
import Testing
import TestSupport

/// The action cache across the mesh: a result written at one node is found at every other node,
/// survives the death of the node it was written at, reaches the origin, and a DELETE removes it
/// everywhere (ccache) — over the HTTP cache protocol and over REAPI.
@Suite("Action cache across the mesh", .serialized)
struct ActionMeshTests {
    static func key(_ label: String) -> String { SHA256.hex(Array("action-\(label)-\(UUID())".utf8)) }

    func put(_ mesh: TestMesh, _ n: String, _ key: String, _ value: [UInt8]) async throws -> Int {
        let c = try await mesh.client(n)
        defer { Task { await c.close() } }
        let r = try await c.connection.request(.init(method: "PUT", path: "/ac/\(key)", headers: ["content-length": String(value.count)]),
                                               body: .bytes(ByteBuffer(bytes: value)))
        _ = try? await r.body.collect(upTo: 1 << 16)
        return r.status
    }

    func get(_ mesh: TestMesh, _ n: String, _ key: String) async throws -> (status: Int, body: [UInt8], source: String?) {
        let c = try await mesh.client(n)
        defer { Task { await c.close() } }
        let r = try await c.connection.request(.init(method: "GET", path: "/ac/\(key)"), body: .empty)
        let body = try await r.body.collect(upTo: 1 << 20)
        return (r.status, Array(body.readableBytesView), r.headers["x-cachemesh-source"])
    }

    func holdsAction(_ mesh: TestMesh, _ n: String, _ key: String) -> Bool {
        FileManager.default.fileExists(atPath: mesh.dir.file("\(n)/ac/\(key.prefix(2))/\(key)"))
    }

    @Test("an action result PUT at one peer: W copies before the 201 (the key's owners), the origin gets one, every other node answers it (and keeps a copy), and it outlives kill -9 of the writer",
          .timeLimit(.minutes(3)))
    func writtenAnywhereFoundEverywhere() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        let key = Self.key("put")
        let value = Array("result of \(key)".utf8)
        #expect(try await put(mesh, "peer1", key, value) == 201)
        // Acknowledged with W = 2: the writer and at least one other copy, on the key's owners.
        let owners = PlacementOracle.owners(of: key, among: mesh.names, replicas: 2)
        let others = mesh.names.filter { $0 != "peer1" && holdsAction(mesh, $0, key) }
        #expect(!others.isEmpty, "no copy besides the writer's right after the 201")
        // The origin's copy (and the owners') may finish after the acknowledgement.
        #expect(await eventually(timeout: 10) { holdsAction(mesh, "origin", key) }, "the origin never got a copy\n\(mesh.logs())")
        for o in owners where o != "peer1" {
            #expect(await eventually(timeout: 10) { holdsAction(mesh, o, key) }, "owner \(o) never got a copy")
        }
        // Every other node answers it; a node that had no copy says where it came from, and keeps one.
        for n in ["peer2", "peer3"] {
            let hadCopy = holdsAction(mesh, n, key)
            let r = try await get(mesh, n, key)
            #expect(r.status == 200 && r.body == value, "\(n): \(r.status)")
            #expect(hadCopy ? r.source == "local" : r.source?.hasPrefix("peer:") == true, "\(n): source \(r.source ?? "none")")
            #expect(holdsAction(mesh, n, key))
        }

        // A second result, written at peer1 which then dies at once: still found at a node that had no copy.
        let key2 = Self.key("kill")
        #expect(try await put(mesh, "peer1", key2, value) == 201)
        mesh.children["peer1"]!.killAndWait()
        let reader = mesh.names.first { $0 != "peer1" && !holdsAction(mesh, $0, key2) } ?? "peer3"
        let r = try await get(mesh, reader, key2)
        #expect(r.status == 200 && r.body == value, "\(reader) after kill -9 of the writer: \(r.status)\n\(mesh.logs())")

        // A key nobody wrote is a plain 404 (no node invents it).
        #expect(try await get(mesh, "peer2", Self.key("never")).status == 404)
    }

    @Test("DELETE /ac at one node deletes every copy (every live member and the origin), so no node brings it back",
          .timeLimit(.minutes(3)))
    func deleteRemovesEveryCopy() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        let key = Self.key("delete")
        #expect(try await put(mesh, "peer1", key, [1, 2, 3]) == 201)
        #expect(await eventually(timeout: 10) { holdsAction(mesh, "origin", key) })
        // peer3 deletes it (it may hold no copy itself).
        let c = try await mesh.client("peer3")
        let d = try await c.connection.request(.init(method: "DELETE", path: "/ac/\(key)"), body: .empty)
        let msg = String(decoding: (try await d.body.collect(upTo: 1 << 16)).readableBytesView, as: UTF8.self)
        await c.close()
        #expect(d.status == 200, "\(msg)")
        for n in mesh.names { #expect(!holdsAction(mesh, n, key), "\(n) still holds it") }
        for n in mesh.names { #expect(try await get(mesh, n, key).status == 404, "\(n)") }
    }

    @Test("REAPI: UpdateActionResult at one peer, GetActionResult at another is a hit (with its output blob fetched through the mesh)",
          .timeLimit(.minutes(3)))
    func reapiResultSharedAcrossNodes() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        typealias D = Build_Bazel_Remote_Execution_V2_Digest
        let output = Array("output of a build action \(UUID())".utf8)
        let outHash = SHA256.hex(output)
        let actionKey = Self.key("reapi")
        let writer = try await mesh.client("peer1")
        _ = try await writer.put(bytes: output)
        let result = Build_Bazel_Remote_Execution_V2_ActionResult.with {
            $0.outputFiles = [.with { $0.path = "out.txt"; $0.digest = D.with { $0.hash = outHash; $0.sizeBytes = Int64(output.count) } }]
            $0.exitCode = 0
        }
        let actionDigest = D.with { $0.hash = actionKey; $0.sizeBytes = 140 }
        _ = try await GRPCClient(transport: writer.connection).unary(
            "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
            Build_Bazel_Remote_Execution_V2_UpdateActionResultRequest.with { $0.actionDigest = actionDigest; $0.actionResult = result },
            as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        await writer.close()
        for n in ["peer2", "peer3"] {
            let c = try await mesh.client(n)
            let got = try await GRPCClient(transport: c.connection).unary(
                "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                Build_Bazel_Remote_Execution_V2_GetActionResultRequest.with { $0.actionDigest = actionDigest },
                as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
            await c.close()
            #expect(got == result, "\(n)")
            #expect(mesh.holds(n, outHash), "\(n) answered a hit without its output blob")
        }
    }
}
