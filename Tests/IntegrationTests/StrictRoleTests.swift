import CacheNode
import CacheRoutes
import CacheMeshClient
import Foundation
import MeshHTTP
import TestSupport
import Testing

/// Strict roles against a real node: certificates signed by the mesh CA (so the chain verifies)
/// but with several OUs, a differently cased or unknown OU, no OU, or a missing extended key
/// usage are refused — over TCP (curl, our client) and QUIC, with mTLS required and with
/// `--allow-unauthenticated-reads` (a refused certificate is not downgraded to an anonymous
/// reader) — and each refusal is logged with the certificate subject and the reason.
@Suite("Strict roles (OU and EKU) on a real node", .serialized, .timeLimit(.minutes(6)))
struct StrictRoleTests {
    let dir: String

    init() throws {
        dir = try CraftedCertificates.issueAllInTemporaryDirectory()
    }

    func files(_ name: String) -> (cert: String, key: String) {
        ("\(dir)/\(name).pem", "\(dir)/\(name).key")
    }

    /// curl GET `path` presenting the crafted certificate `name`.
    func curlAs(_ node: TestNode, _ name: String, _ path: String = "/healthz") async throws -> CurlResult {
        let (cert, key) = files(name)
        let marker = "\n@@CURL@@ "
        let r = try await run(node.curl(.anonymous) + ["--cert", cert, "--key", key, node.url(path), "-w", "\(marker)%{http_code}"], timeout: 60)
        let code = r.stdout.range(of: marker, options: .backwards).map { String(r.stdout[$0.upperBound...]) } ?? ""
        let body = r.stdout.range(of: marker, options: .backwards).map { String(r.stdout[..<$0.lowerBound]) } ?? r.stdout
        return CurlResult(exitCode: r.status, httpCode: code, httpVersion: "", body: body, stderr: r.stderr)
    }

    /// Our client (HTTP/2 over TLS or HTTP/3 over QUIC) with the crafted certificate `name`:
    /// "answered STATUS" or "refused".
    func clientAs(_ node: TestNode, _ name: String, quic: Bool) async throws -> String {
        let (cert, key) = files(name)
        var options = ClientOptions(server: HostPort(host: "127.0.0.1", port: quic ? node.quicPort! : node.port),
                                    certificate: cert, privateKey: key, ca: node.certs.ca)
        if quic { options.transport = .quic }
        let fixed = options
        return try await withDeadline(45, "\(name) via \(quic ? "QUIC" : "TCP")") {
            do {
                let c = try await CacheClient.connect(fixed)
                defer { Task { await c.close() } }
                let r = try await c.connection.request(HTTPRequestHead(method: "GET", path: "/healthz"))
                return "answered \(r.status)"
            } catch {
                return "refused"
            }
        }
    }

    /// The node logged a refusal naming `name`'s subject and containing `reason`.
    func refusalLogged(_ node: TestNode, _ name: String, _ reason: String) async -> Bool {
        await eventually(timeout: 10) {
            node.child.stderr.split(separator: "\n").contains {
                $0.contains("peer certificate \"CN=\(name),") && $0.contains("refused:") && $0.contains(reason)
            }
        }
    }

    func checkRefusals(_ node: TestNode, mode: String) async throws {
        for (spec, reason) in CraftedCertificates.refused {
            let r = try await curlAs(node, spec.name)
            #expect(r.exitCode != 0 && (r.httpCode == "000" || r.httpCode.isEmpty), "\(mode): curl with \(spec) must get no HTTP response: \(r)")
            #expect(await refusalLogged(node, spec.name, reason), "\(mode): no log line refusing \(spec) (\(reason))\n\(node.logExcerpt())")
            #expect(try await clientAs(node, spec.name, quic: false) == "refused", "\(mode): \(spec) via our client over TCP")
            #expect(try await clientAs(node, spec.name, quic: true) == "refused", "\(mode): \(spec) via our client over QUIC")
        }
        // Issued the same way but as mkcerts.sh writes them: accepted, so the refusals above are
        // down to the attribute that differs.
        for (spec, role) in CraftedCertificates.accepted {
            let r = try await curlAs(node, spec.name, "/status")
            #expect(r.httpCode == "200", "\(mode): \(spec): \(r)\n\(node.logExcerpt())")
            let you = (try? NodeStatus.decoder().decode(NodeStatus.self, from: Data(r.body.utf8)))?.you
            #expect(you == NodeStatus.Caller(commonName: spec.name, role: role, authenticated: true), "\(mode): \(spec): \(r.body)")
            #expect(try await clientAs(node, spec.name, quic: false) == "answered 200", "\(mode): \(spec) via TCP")
            #expect(try await clientAs(node, spec.name, quic: true) == "answered 200", "\(mode): \(spec) via QUIC")
        }
        // The node survived every refusal and still serves the real certificates.
        let ok = try await curl(node, .client, [node.url("/healthz")])
        #expect(ok.httpCode == "200", "\(mode): \(ok)\n\(node.logExcerpt())")
    }

    @Test("mTLS required: every crafted certificate is refused (TCP and QUIC) and logged with subject and reason")
    func refusedWithMutualTLS() async throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        try await checkRefusals(node, mode: "mTLS")
    }

    @Test("--allow-unauthenticated-reads: a refused certificate is not downgraded to an anonymous reader (TCP and QUIC)")
    func refusedWithUnauthenticatedReads() async throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let node = try await TestNode.start(allowUnauthenticatedReads: true, quic: true)
        defer { node.cleanUp() }
        // No certificate at all is still an anonymous reader here.
        let anon = try await curl(node, .anonymous, [node.url("/healthz")])
        #expect(anon.httpCode == "200", "\(anon)")
        try await checkRefusals(node, mode: "optional client auth")
    }
}
