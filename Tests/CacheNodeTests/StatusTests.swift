import BlobStore
import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import Testing
@testable import CacheNode
@testable import MeshShell
@testable import CacheRoutes

/// `/status`: a JSON document built by JSONEncoder (names and certificate subjects escaped), with
/// the documented fields; the member list only for callers with a certificate.
@Suite struct StatusTests {
    /// A mesh that answers `status(members:)` with a fixed member list and records what was asked.
    final class FakeMesh: MeshHooks, @unchecked Sendable {
        var askedForMembers: [Bool] = []
        func fetchMissing(hash: String) async -> MeshFetchOutcome { .notFound }
        func stored(_ digest: Digest) async throws {}
        func received(_ digest: Digest) {}
        func storedAction(key: String, value: [UInt8]) async throws {}
        func fetchAction(key: String) async -> MeshActionOutcome { .notFound }
        func deletedAction(key: String) async -> ActionDeletion { ActionDeletion() }
        func handleMeshRequest(_ request: HTTPServerRequest) async -> HTTPResponse { .text(404, "no") }
        func status(members: Bool) -> (role: String, mesh: MeshStatus) {
            askedForMembers.append(members)
            let list = [MeshStatus.Member(name: "peer\"1\\", role: "peer", status: "alive", incarnation: 3, tcp: "127.0.0.1:1",
                                          quic: "[::1]:1", transport: "quic")]
            return ("peer", MeshStatus(topology: "t", replication: 2, writeQuorum: 2, fetchStrategy: "hedged", transport: "quic",
                                            liveMembers: 1, members: members ? list : nil, localityEntries: 5, localityBytes: 100,
                                            fetch: .init(peerWins: 3, originWins: 1, failures: 0, peerRatio: 0.75)))
        }
    }

    func withService(_ body: (CacheService, FakeMesh) async throws -> Void) async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-status-\(UUID())")
        defer { try? FileManager.default.removeItem(at: dir) }
        let store = try BlobStore(configuration: BlobStoreConfiguration(directory: dir.path, maxBytes: 64 << 20), logger: Logger(label: "t"))
        let mesh = FakeMesh()
        let service = CacheService(store: store, registry: nil, info: .init(name: "n\"ode\u{1b}[31m", listen: ["tcp": "[::1]:8443"]),
                                   mesh: mesh, logger: Logger(label: "t"))
        try await body(service, mesh)
    }

    func get(_ service: CacheService, as peer: PeerIdentity) async throws -> (json: [String: Any], status: NodeStatus) {
        let r = await service.handle(HTTPServerRequest(head: HTTPRequestHead(method: "GET", path: "/status"), body: .complete(nil),
                                                       peer: peer, remoteAddress: nil))
        #expect(r.status == 200)
        #expect(r.headers["content-type"] == "application/json")
        guard case .bytes(let b) = r.body else { throw StatusTestError("not a bytes body") }
        let data = Data(b.readableBytesView)
        // Any JSON parser reads it (not only our decoder).
        let json = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        return (json, try NodeStatus.decoder().decode(NodeStatus.self, from: data))
    }

    struct StatusTestError: Error { let s: String; init(_ s: String) { self.s = s } }

    @Test("A subject with quotes, backslashes and control characters is escaped; every documented field is there")
    func escapedAndComplete() async throws {
        try await withService { service, _ in
            let cn = "evil\",\"role\":\"node\\\n\u{7}"
            let (json, status) = try await get(service, as: PeerIdentity(commonName: cn, role: .client, authenticated: true))
            #expect(status.you.commonName == cn)
            #expect(status.you.role == "client")
            #expect(status.name == "n\"ode\u{1b}[31m")
            #expect(Set(json.keys) == ["name", "role", "listen", "uptime_seconds", "draining", "you", "store", "mesh"])
            let store = try #require(json["store"] as? [String: Any])
            #expect(Set(store.keys) == ["used_bytes", "reserved_bytes", "max_bytes", "blobs", "actions", "hits", "misses", "evictions",
                                        "bytes_in", "bytes_out", "rejected_writes", "index"]) // hit_ratio: absent before the first lookup
            let mesh = try #require(json["mesh"] as? [String: Any])
            #expect(Set(mesh.keys) == ["topology", "replication", "write_quorum", "fetch_strategy", "transport", "live_members",
                                       "members", "locality_entries", "locality_bytes", "fetch"])
            let member = try #require((mesh["members"] as? [[String: Any]])?.first)
            #expect(Set(member.keys) == ["name", "role", "status", "incarnation", "tcp", "quic", "transport"])
            #expect(member["name"] as? String == "peer\"1\\")
            #expect(Set((mesh["fetch"] as? [String: Any] ?? [:]).keys) == ["peer_wins", "origin_wins", "failures", "peer_ratio"])
            #expect(status.role == "peer" && status.listen.tcp == "[::1]:8443" && status.listen.quic == nil)
        }
    }

    @Test("Node, client and reader certificates see the members; a caller without a certificate sees counts only")
    func membersForCertificateHolders() async throws {
        try await withService { service, mesh in
            for role in [PeerRole.node, .client, .reader] {
                let (_, s) = try await get(service, as: PeerIdentity(commonName: "x", role: role, authenticated: true))
                #expect(s.mesh?.members?.count == 1, "\(role)")
            }
            let (json, anonymous) = try await get(service, as: .anonymousReader)
            #expect(anonymous.mesh?.members == nil && anonymous.mesh?.liveMembers == 1)
            #expect((json["mesh"] as? [String: Any])?["members"] == nil)
            #expect(mesh.askedForMembers == [true, true, true, false])
        }
    }

    @Test("The hit ratio appears after lookups")
    func hitRatio() async throws {
        try await withService { service, _ in
            _ = service.store.size(of: String(repeating: "a", count: 64)) // a miss
            let (_, s) = try await get(service, as: PeerIdentity(commonName: "x", role: .client, authenticated: true))
            #expect(s.store.misses == 1 && s.store.hitRatio == 0)
        }
    }
}
