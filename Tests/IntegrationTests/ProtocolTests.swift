import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import Testing

/// Round trips and request validation through real HTTP/2 clients (curl, nghttp) and our client.
@Suite("HTTP/2 protocol with real clients", .serialized, .timeLimit(.minutes(3)))
struct ProtocolTests {
    @Test("PUT, GET and HEAD round-trip with curl over HTTP/2")
    func curlRoundTrip() async throws {
        try await withNode { node in
            let dir = try TempDir("curl-rt")
            defer { dir.remove() }
            let bytes = randomBytes(300_000)
            let hash = SHA256.hex(bytes)
            let file = dir.file("blob")
            try Data(bytes).write(to: URL(fileURLWithPath: file))

            let head0 = try await curl(node, .client, ["-I", "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(head0.httpCode == "404", "HEAD before PUT: \(head0)")

            let put = try await curl(node, .client, ["-T", file, node.url("/cas/\(hash)")])
            #expect(put.exitCode == 0, "\(put)")
            #expect(put.httpCode == "201", "\(put)")
            #expect(put.httpVersion == "2", "\(put)")

            let out = dir.file("out")
            let get = try await curl(node, .client, ["-o", out, node.url("/cas/\(hash)")])
            #expect(get.exitCode == 0, "\(get)")
            #expect(get.httpCode == "200", "\(get)")
            #expect(get.httpVersion == "2", "\(get)")
            #expect(FileManager.default.contents(atPath: out) == Data(bytes), "GET returned different bytes")

            let headers = dir.file("headers")
            let head = try await curl(node, .client, ["-I", "-D", headers, "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(head.exitCode == 0, "\(head)")
            #expect(head.httpCode == "200", "\(head)")
            #expect(head.httpVersion == "2", "\(head)")
            let headerText = (try? String(contentsOfFile: headers, encoding: .utf8))?.lowercased() ?? ""
            #expect(headerText.contains("content-length: \(bytes.count)"), "HEAD headers: \(headerText)")
        }
    }

    @Test("GET and PUT with nghttp")
    func nghttpRoundTrip() async throws {
        try await withNode { node in
            let dir = try TempDir("nghttp")
            defer { dir.remove() }
            let certs = node.certs
            let tls = ["--cert", certs.path("client.pem"), "--key", certs.path("client.key")]

            // GET of a blob stored with our client.
            let bytes = randomBytes(200_000)
            let hash = try await withClient(node) { try await $0.put(bytes: bytes).hash }
            let get = try await run(["nghttp"] + tls + [node.url("/cas/\(hash)")], timeout: 60)
            #expect(get.status == 0, "\(get)")
            #expect(get.stdoutData == Data(bytes), "nghttp GET body differs (\(get.stdoutData.count) bytes, expected \(bytes.count))")

            // PUT with nghttp: -d uploads the file, the :method pseudo-header is overridden.
            let upload = randomBytes(150_000)
            let uploadHash = SHA256.hex(upload)
            let file = dir.file("upload")
            try Data(upload).write(to: URL(fileURLWithPath: file))
            let put = try await run(["nghttp", "-v", "-H", ":method: PUT", "-d", file] + tls + [node.url("/cas/\(uploadHash)")], timeout: 60)
            #expect(put.status == 0, "\(put)")
            #expect(put.stdout.contains(":status: 201"), "nghttp PUT response: \(put.stdout.suffix(1500))")

            let back = try await withClient(node) { try await $0.fetch("/cas/\(uploadHash)") }
            #expect(back.status == 200)
            #expect(back.body == upload, "blob uploaded with nghttp reads back different bytes")
        }
    }

    @Test("PUT under the wrong hash is refused with 400 and nothing is stored")
    func wrongHashPut() async throws {
        try await withNode { node in
            let dir = try TempDir("wrong-hash")
            defer { dir.remove() }
            let body = randomBytes(64 * 1024)
            let actual = SHA256.hex(body)
            let claimed = SHA256.hex(randomBytes(32))
            let file = dir.file("body")
            try Data(body).write(to: URL(fileURLWithPath: file))

            let put = try await curl(node, .client, ["-T", file, node.url("/cas/\(claimed)")])
            #expect(put.httpCode == "400", "\(put)")
            #expect(put.body.contains("hash mismatch"), "\(put)")
            #expect(put.body.contains(claimed) && put.body.contains(actual), "message should name both hashes: \(put.body)")

            // The same through our client: it surfaces the status and the message.
            try await withClient(node) { c in
                do {
                    _ = try await c.put(bytes: body, hash: claimed)
                    Issue.record("PUT under a wrong hash succeeded")
                } catch let CacheClientError.http(status, message) {
                    #expect(status == 400)
                    #expect(message.contains("hash mismatch"), "\(message)")
                }
                for h in [claimed, actual] {
                    let get = try await c.fetch("/cas/\(h)")
                    #expect(get.status == 404, "GET /cas/\(h) after rejected PUT")
                    let head = try await c.fetch("/cas/\(h)", method: "HEAD")
                    #expect(head.status == 404, "HEAD /cas/\(h) after rejected PUT")
                }
            }
            let getCurl = try await curl(node, .client, ["-o", "/dev/null", node.url("/cas/\(claimed)")])
            #expect(getCurl.httpCode == "404", "\(getCurl)")
        }
    }

    static let validHash = String(repeating: "ab", count: 32)

    /// (description, path, expected status)
    static let badPaths: [(String, String, String)] = [
        ("dot-dot segment", "/cas/../x", "400"),
        ("dot-dot before a valid hash", "/cas/../cas/\(validHash)", "400"),
        ("dot segment", "/./cas/\(validHash)", "400"),
        ("non-hex digest", "/cas/" + String(repeating: "zz", count: 32), "400"),
        ("short digest", "/cas/abc123", "400"),
        ("long digest", "/cas/" + validHash + "00", "400"),
        ("uppercase hex", "/cas/" + validHash.uppercased(), "400"),
        ("empty segment", "/cas//\(validHash)", "400"),
        ("empty digest", "/cas/", "400"),
        ("trailing segment after the digest", "/cas/\(validHash)/extra", "400"),
        ("bad action key", "/ac/not-a-digest", "400"),
        ("unknown top-level route", "/nope", "404"),
        ("unknown nested route", "/foo/bar", "404"),
    ]

    @Test("Malformed paths answer 400 and unknown routes 404, each with a message")
    func malformedPaths() async throws {
        try await withNode { node in
            for (what, path, expected) in Self.badPaths {
                let r = try await curl(node, .client, ["--path-as-is", node.url(path)])
                #expect(r.exitCode == 0, "\(what) \(path): \(r)")
                #expect(r.httpCode == expected, "\(what) \(path): \(r)")
                #expect(!r.body.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "\(what) \(path): empty body")
            }
            // The instance prefix form is valid (404 = simply absent, not a malformed path).
            let prefixed = try await curl(node, .client, [node.url("/main-instance/cas/\(Self.validHash)")])
            #expect(prefixed.httpCode == "404", "\(prefixed)")
            #expect(prefixed.body.contains("not found"), "\(prefixed)")
            // The node is still healthy after all of that.
            let health = try await curl(node, .client, [node.url("/healthz")])
            #expect(health.httpCode == "200" && health.body.contains("ok"), "\(health)")
        }
    }
}
