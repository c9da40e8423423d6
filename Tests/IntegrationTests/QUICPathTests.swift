import Foundation
import Testing
import TestSupport

/// A client whose address changes under an established connection (NAT rebinding: same
/// connection IDs, a new source port). RFC 9000 §9: the server validates the new path and sends
/// there. Before, the node kept sending to the handshake address — the client heard nothing
/// until its idle timeout.
@Suite("QUIC: a client's address changes mid-transfer (NAT rebinding)", .serialized, .timeLimit(.minutes(3)))
struct QUICPathTests {
    @Test("a 16 MB GET over HTTP/3 through a forwarder that switches to a new source port mid-transfer completes, verified")
    func rebindingMidTransfer() async throws {
        let node = try await TestNode.start(quic: true)
        defer { node.kill(); node.cleanUp() }
        let dir = try TempDir("rebind")
        defer { dir.remove() }
        let blob = dir.file("blob")
        try await makeRandomFile(blob, size: 16_000_000)
        let hash = try await sha256sum(blob)
        let put = try await run([try Paths.cachemesh(), "put", blob] + node.cli(), timeout: 60)
        try #require(put.status == 0, "\(put)")
        let front = try TestMesh.freePort(udp: true)
        let proxy = try ChildProcess(["/usr/bin/python3", "\(Paths.packageRoot)/Tests/tools/rebinding_proxy.py",
                                      "--listen", "\(front)", "--server", "\(node.quicPort!)", "--after", "300", "--seconds", "40"])
        defer { proxy.killAndWait() }
        try #require(await eventually(timeout: 10) { proxy.stdout.contains("ready") }, "\(proxy.stderr)")
        let out = dir.file("got")
        let get = try await run([try Paths.cachemesh(), "get", hash, "-o", out, "--transport", "quic",
                                 "--server", "127.0.0.1:\(front)", "--ca", node.certs.ca,
                                 "--cert", node.certs.path("client.pem"), "--key", node.certs.path("client.key")], timeout: 30)
        #expect(proxy.stdout.contains("rebound"), "the forwarder never switched ports: \(proxy.stdout)")
        #expect(get.status == 0, "\(get)\n\(node.child.stderr.suffix(1500))")
        #expect(try await sha256sum(out) == hash)
    }
}
