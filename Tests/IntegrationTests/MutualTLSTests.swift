import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import Testing

/// Mutual TLS and roles, from the outside: curl presenting (or not) each kind of certificate.
@Suite("Mutual TLS and roles", .serialized, .timeLimit(.minutes(3)))
struct MutualTLSTests {
    /// A refused TLS client gets no HTTP response at all: curl fails and reports code 000.
    private func expectRefused(_ r: CurlResult, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.exitCode != 0, "\(what) should fail: \(r)", sourceLocation: sourceLocation)
        #expect(r.httpCode == "000" || r.httpCode.isEmpty, "\(what) should get no HTTP response: \(r)", sourceLocation: sourceLocation)
    }

    @Test("Without a client certificate, or with one from another CA, the node refuses the connection")
    func refusedIdentities() async throws {
        try await withNode { node in
            let hash = try await withClient(node) { try await $0.put(bytes: randomBytes(1000)).hash }
            for path in ["/healthz", "/cas/\(hash)"] {
                expectRefused(try await curl(node, .anonymous, [node.url(path)], timeout: 60), "GET \(path) without a client certificate")
                expectRefused(try await curl(node, .stranger, [node.url(path)], timeout: 60), "GET \(path) with the stranger certificate (other CA, OU=client)")
            }
            // Our own client with the stranger certificate must not get a response either.
            let outcome: String = try await withDeadline(30, "stranger client request") {
                do {
                    let c = try await node.client(.stranger)
                    defer { Task { await c.close() } }
                    let r = try await c.getText("/healthz")
                    return "answered \(r.status) \(r.body)"
                } catch {
                    return "refused"
                }
            }
            #expect(outcome == "refused", "stranger certificate via CacheClient: \(outcome)")
            // The node survives the failed handshakes.
            let ok = try await curl(node, .client, [node.url("/healthz")])
            #expect(ok.httpCode == "200", "\(ok)\nnode log:\n\(node.logExcerpt())")
        }
    }

    @Test("The reader role may GET and HEAD but PUT is 403")
    func readerRole() async throws {
        try await withNode { node in
            let dir = try TempDir("reader")
            defer { dir.remove() }
            let stored = randomBytes(5000)
            let hash = try await withClient(node) { try await $0.put(bytes: stored).hash }

            let out = dir.file("out")
            let get = try await curl(node, .reader, ["-o", out, node.url("/cas/\(hash)")])
            #expect(get.httpCode == "200", "\(get)")
            #expect(FileManager.default.contents(atPath: out) == Data(stored))
            let head = try await curl(node, .reader, ["-I", "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(head.httpCode == "200", "\(head)")

            let newBytes = randomBytes(5000)
            let newHash = SHA256.hex(newBytes)
            let file = dir.file("new")
            try Data(newBytes).write(to: URL(fileURLWithPath: file))
            let put = try await curl(node, .reader, ["-T", file, node.url("/cas/\(newHash)")])
            #expect(put.httpCode == "403", "\(put)")
            #expect(put.body.contains("forbidden"), "\(put)")
            let after = try await curl(node, .client, ["-I", "-o", "/dev/null", node.url("/cas/\(newHash)")])
            #expect(after.httpCode == "404", "the reader's PUT must not store anything: \(after)")

            // The same through our client with the reader certificate.
            try await withClient(node, .reader) { c in
                await #expect(throws: CacheClientError.self) { _ = try await c.put(bytes: newBytes) }
                let got = try await c.fetch("/cas/\(hash)")
                #expect(got.status == 200 && got.body == stored)
            }
        }
    }

    @Test("With --allow-unauthenticated-reads, no certificate may GET (200) but not PUT (403)")
    func unauthenticatedReads() async throws {
        try await withNode(allowUnauthenticatedReads: true) { node in
            let dir = try TempDir("anon")
            defer { dir.remove() }
            let stored = randomBytes(7000)
            let hash = try await withClient(node) { try await $0.put(bytes: stored).hash }

            let out = dir.file("out")
            let get = try await curl(node, .anonymous, ["-o", out, node.url("/cas/\(hash)")])
            #expect(get.exitCode == 0, "\(get)")
            #expect(get.httpCode == "200", "\(get)")
            #expect(get.httpVersion == "2", "\(get)")
            #expect(FileManager.default.contents(atPath: out) == Data(stored))

            let newBytes = randomBytes(7000)
            let newHash = SHA256.hex(newBytes)
            let file = dir.file("new")
            try Data(newBytes).write(to: URL(fileURLWithPath: file))
            let put = try await curl(node, .anonymous, ["-T", file, node.url("/cas/\(newHash)")])
            #expect(put.httpCode == "403", "\(put)")
            let after = try await curl(node, .client, ["-I", "-o", "/dev/null", node.url("/cas/\(newHash)")])
            #expect(after.httpCode == "404", "anonymous PUT must not store anything: \(after)")

            // A certificate from another CA is still refused: optional client auth is not "any cert".
            expectRefused(try await curl(node, .stranger, [node.url("/cas/\(hash)")], timeout: 60), "stranger certificate with unauthenticated reads on")
            // And an authenticated client may still write.
            let put2 = try await curl(node, .client, ["-T", file, node.url("/cas/\(newHash)")])
            #expect(put2.httpCode == "201", "\(put2)")
        }
    }
}
