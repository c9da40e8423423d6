import Foundation
import TestSupport
import Testing

/// A refused certificate is explained on both ends: the node sends a TLS alert (over TCP, and as
/// QUIC CRYPTO_ERROR 0x100 + alert), logs the peer address, the certificate subject and the
/// reason at warning level; the `cachemesh` client says in words who refused which certificate.
@Suite("TLS refusals in words, with alerts", .serialized, .timeLimit(.minutes(5)))
struct TLSRefusalTests {
    struct Case {
        var label: String
        /// Client certificate and key (nil: none).
        var credentials: (String, String)?
        /// What the client must print.
        var client: String
        /// What the node's warning line must contain (besides the client address).
        var logged: [String]
        /// The alert number `openssl s_client` reports: the alert really went over the wire.
        var alertNumber: Int
    }

    @Test("Other CA, expired, none: the client prints the cause, the node logs address + subject + reason, an alert is sent (TCP and QUIC)")
    func refusedClientCertificates() async throws {
        let dir = try TempDir("tls-refusals")
        defer { dir.remove() }
        let expired = try CraftedCertificates.issue(CraftedCertificates.expiredClient, in: dir.path)
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        let certs = node.certs
        let file = dir.file("blob")
        try Data("hello".utf8).write(to: URL(fileURLWithPath: file))
        let cases = [
            Case(label: "another CA", credentials: (certs.path("stranger.pem"), certs.path("stranger.key")),
                 client: "the server refused our certificate: unknown CA (it was not issued by the CA the server trusts)",
                 logged: ["client certificate (\"CN=stranger,OU=client,O=CacheMesh\") refused: it was not issued by the mesh CA this node trusts (alert sent: unknown CA)"],
                 alertNumber: 48),
            Case(label: "expired", credentials: (expired.certificate, expired.key),
                 client: "the server refused our certificate: certificate expired",
                 logged: ["client certificate (\"CN=expired-client,OU=client,O=CacheMesh\") refused: it has expired (alert sent: certificate expired)"],
                 alertNumber: 45),
            Case(label: "no certificate", credentials: nil,
                 client: "the server refused our certificate: certificate required (no certificate was sent; give --cert and --key)",
                 logged: ["client certificate refused: no client certificate was sent and this node requires one (alert sent: certificate required)"],
                 alertNumber: 116),
        ]
        for c in cases {
            let creds = c.credentials.map { ["--cert", $0.0, "--key", $0.1] } ?? []
            for transport in ["tcp", "quic"] {
                let port = transport == "tcp" ? node.port : node.quicPort!
                let r = try await run([try Paths.cachemesh(), "put", file, "--server", "127.0.0.1:\(port)", "--ca", certs.ca, "--transport", transport] + creds)
                #expect(r.status == 1, "\(c.label) over \(transport): \(r)")
                #expect(r.stderr.hasPrefix("Error: ") && r.stderr.contains(c.client), "\(c.label) over \(transport): \(r)")
                #expect(!r.stderr.contains("connection closed"), "\(c.label) over \(transport): \(r)")
                // One warning line naming the client's address (the port differs per connection),
                // the subject and the reason; QUIC's says so.
                let logged = await eventually(timeout: 10) {
                    node.child.stderr.split(separator: "\n").contains { line in
                        line.contains(" warning ") && line.contains("TLS: connection from 127.0.0.1:") &&
                            c.logged.allSatisfy { line.contains($0) } && (transport == "quic") == line.hasSuffix("(QUIC)")
                    }
                }
                #expect(logged, "\(c.label) over \(transport): no warning with \(c.logged)\n\(node.logExcerpt())")
            }
            // Another TLS stack (OpenSSL) receives the alert itself.
            let s = try await run(["openssl", "s_client", "-ign_eof", "-connect", node.address, "-CAfile", certs.ca, "-alpn", "h2"] +
                                  (c.credentials.map { ["-cert", $0.0, "-key", $0.1] } ?? []), timeout: 30)
            #expect((s.stdout + s.stderr).contains("SSL alert number \(c.alertNumber)"), "\(c.label): \(s)")
        }
        // The node kept serving.
        let ok = try await run([try Paths.cachemesh(), "put", file] + node.cli(.client))
        #expect(ok.status == 0, "\(ok)")
    }

    @Test("The client refuses a node certificate from another CA and says so; the node logs that the client refused it")
    func clientRefusesServer() async throws {
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        let certs = node.certs
        let client = ["--cert", certs.path("client.pem"), "--key", certs.path("client.key"), "--ca", certs.path("otherca.pem")]
        let words = "we refused the server's certificate (\"CN=node,OU=node,O=CacheMesh\"): it was not issued by the CA we trust (--ca) (alert sent: unknown CA)"
        let tcp = try await run([try Paths.cachemesh(), "status", "--server", node.address] + client)
        #expect(tcp.status == 1 && tcp.stderr == "Error: cannot connect to \(node.address): \(words)\n", "\(tcp)")
        let quic = try await run([try Paths.cachemesh(), "status", "--transport", "quic", "--server", "127.0.0.1:\(node.quicPort!)"] + client)
        #expect(quic.status == 1 && quic.stderr.hasPrefix("Error: cannot connect to 127.0.0.1:\(node.quicPort!): ") && quic.stderr.contains(words), "\(quic)")
        let logged = await eventually(timeout: 10) {
            node.child.stderr.contains("closed: the client refused our certificate: unknown CA")
        }
        #expect(logged, "\(node.logExcerpt())")
    }
}
