import CacheNode
import CacheMeshClient
import Foundation
import MeshHTTP
import MeshQUIC
import Testing
import TestSupport

/// The real node with a QUIC listener beside TCP: the same routes over HTTP/3, driven by our CLI.
@Suite("Node over QUIC + HTTP/3", .serialized)
struct QUICNodeTests {
    @Test("put/get/status over QUIC with mTLS; reader PUT 403; foreign certificate refused; TCP still serves the same blob",
          .timeLimit(.minutes(3)))
    func quicThroughTheCLI() async throws {
        let dir = try TempDir("quic-node")
        defer { dir.remove() }
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        let certs = node.certs
        let (tcp, udp) = (String(node.port), String(node.quicPort!))
        func cli(_ who: String, _ args: [String], quicPort: String? = nil) async throws -> ProcessResult {
            try await run([try Paths.cachemesh()] + args + ["--server", "127.0.0.1:\(quicPort ?? udp)", "--transport", "quic",
                                                           "--cert", certs.path("\(who).pem"), "--key", certs.path("\(who).key"), "--ca", certs.ca])
        }
        let file = dir.file("blob")
        try await makeRandomFile(file, size: 16 << 20)
        let hash = try await sha256sum(file)
        let put = try await cli("client", ["put", file])
        #expect(put.status == 0, "\(put)")
        #expect(put.stdout.hasPrefix(hash), "\(put)")
        let out = dir.file("out")
        let get = try await cli("client", ["get", hash, "-o", out])
        #expect(get.status == 0, "\(get)")
        #expect(try await sha256sum(out) == hash)
        let status = try await cli("client", ["status"])
        #expect(status.stdout.contains("quic 127.0.0.1:\(udp)\n"), "\(status)")

        let small = dir.file("small")
        try "hello".write(toFile: small, atomically: true, encoding: .utf8)
        let readerPut = try await cli("reader", ["put", small])
        // Exit 1: the server refused (README's exit codes), with its 403.
        #expect(readerPut.status == 1 && readerPut.stderr.contains("403"), "\(readerPut)")
        let stranger = try await cli("stranger", ["status"])
        #expect(stranger.status == 1, "\(stranger)")

        // The same blob over TCP (one router behind both transports).
        let tcpGet = try await run(["curl", "-sS", "--http2", "--cacert", certs.ca, "--cert", certs.path("client.pem"), "--key", certs.path("client.key"),
                                    "-o", dir.file("tcp-out"), "-w", "%{http_code}", "https://127.0.0.1:\(tcp)/cas/\(hash)"])
        #expect(tcpGet.stdout == "200")
        #expect(try await sha256sum(dir.file("tcp-out")) == hash)
        // Requests are counted by the protocol they came over.
        let metrics = try await withClient(node) { try await $0.metrics() }
        #expect((metrics.value("cachemesh_http_requests_total", labels: ["protocol": "h3"]) ?? 0) >= 3, "h3 requests (put, get, status)")
        #expect((metrics.value("cachemesh_http_requests_total", labels: ["protocol": "h2"]) ?? 0) >= 1, "the curl GET over h2")

        let exit = await node.terminate()
        #expect(exit?.status == 0 && exit?.signalled == false, "\(String(describing: exit)) \(node.logExcerpt())")
    }

    @Test("kill -9 and a restart on the same ports: a client's old QUIC connection gets a stateless reset at once (not a 30 s idle timeout); a new connection works",
          .timeLimit(.minutes(2)))
    func aRestartedNodeResetsItsPreviousConnections() async throws {
        let node = try await TestNode.start(quic: true)
        var restarted: TestNode?
        defer {
            restarted?.cleanUp()
            node.cleanUp()
        }
        let udp = node.quicPort!
        var options = ClientOptions(server: HostPort(host: "127.0.0.1", port: udp), certificate: node.certs.path("client.pem"),
                                    privateKey: node.certs.path("client.key"), ca: node.certs.ca)
        options.transport = .quic
        let old = try await CacheClient.connect(options)
        #expect(try await old.connection.request(HTTPRequestHead(method: "GET", path: "/healthz")).status == 200)

        node.kill()
        // Same data, same key (so the same reset secret), same UDP port: a crash and a restart.
        let again = try await TestNode.start(dataDir: node.dataDir, extraArguments: ["--quic-listen", "127.0.0.1:\(udp)"])
        restarted = again
        let started = ContinuousClock.now
        do {
            _ = try await old.connection.request(HTTPRequestHead(method: "GET", path: "/healthz"))
            Issue.record("a request on a connection the restarted node never had should fail")
        } catch {
            #expect(error as? HTTPTransportError == .connectionClosed, "\(error)")
            // Not a timeout: the restarted node recognised the connection's token and reset it.
            #expect((old.connection as? HTTP3Connection)?.closeReason == .statelessReset,
                    "closed by \(String(describing: (old.connection as? HTTP3Connection)?.closeReason)) after \(ContinuousClock.now - started)\n\(again.logExcerpt())")
        }
        await old.close()

        let fresh = try await CacheClient.connect(options)
        #expect(try await fresh.connection.request(HTTPRequestHead(method: "GET", path: "/healthz")).status == 200)
        await fresh.close()
    }
}
