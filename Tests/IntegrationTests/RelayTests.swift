import Foundation
import Testing
import TestSupport

/// `cachemesh relay` in front of a real node: TCP (H2) and QUIC (H3) through one relay port.
@Suite("Node behind the link emulator", .serialized)
struct RelayTests {
    @Test("a 20 ms relay adds ≥ 40 ms per round trip over TCP and QUIC; SIGTERM prints counters and exits 0",
          .timeLimit(.minutes(3)))
    func nodeBehindADelayingRelay() async throws {
        let node = try await TestNode.start(maxBytes: "64M", quic: true)
        defer { node.cleanUp() }
        let certs = node.certs
        let relay = try await TestRelay.start(targetPort: node.port, udpPort: node.quicPort!, profile: ["--delay", "20ms"])
        for transport in ["tcp", "quic"] {
            let t0 = Date()
            let r = try await run([try Paths.cachemesh(), "status", "--server", relay.address, "--transport", transport,
                                   "--cert", certs.path("client.pem"), "--key", certs.path("client.key"), "--ca", certs.ca])
            let took = Date().timeIntervalSince(t0)
            #expect(r.status == 0, "\(transport): \(r)")
            #expect(r.stdout.contains(", healthy\n"), "\(transport): \(r)")
            // Handshake + /healthz + /status: at least three round trips of ≥ 40 ms each.
            #expect(took >= 0.12, "\(transport): \(took) s")
        }
        let (status, counters) = await relay.stop()
        #expect(status == 0)
        #expect(TestRelay.counter("connections", section: "tcp", in: counters) == 1, "\(counters)")
        #expect(TestRelay.counter("mappings", section: "udp", in: counters) == 1, "\(counters)")
    }
}
