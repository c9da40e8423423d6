import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import MeshHTTP
import NIOCore
import Testing
#if canImport(Glibc)
import Glibc
import TestSupport
#endif

/// The bounded store seen through the node: aborted uploads, eviction, restart, metrics.
@Suite("Bounded store behind the node", .serialized, .timeLimit(.minutes(3)))
struct StoreTests {
    @Test("A client killed mid-upload leaves nothing stored and releases its reservation")
    func abortedUpload() async throws {
        try await withNode(maxBytes: "512M") { node in
            let dir = try TempDir("abort")
            defer { dir.remove() }
            let file = dir.file("big")
            try await makeRandomFile(file, size: 48 << 20)
            let hash = try await sha256sum(file)

            // 48 MiB at 1 MiB/s: it cannot finish before we kill it.
            let upload = try ChildProcess(node.curl(.client) + ["--limit-rate", "1M", "-T", file, "-o", "/dev/null", node.url("/cas/\(hash)")])
            defer {
                upload.killAndWait()
                upload.removeOutputFiles()
            }
            try await withClient(node) { c in
                // The upload has started once the node reserved space for its declared length.
                let started = try await eventually(timeout: 30) {
                    (try await c.metrics().value("cachemesh_store_reserved_bytes") ?? 0) > 0
                }
                try #require(started, "the upload never showed up as reserved bytes; curl: \(upload.stderr)\nnode log:\n\(node.logExcerpt())")
                try #require(!upload.hasExited, "curl finished a rate-limited 48 MiB upload unexpectedly: \(upload.stdout) \(upload.stderr)")

                upload.signal(SIGKILL)
                #expect(await upload.waitForExit(timeout: 10) != nil)

                let head = try await c.fetch("/cas/\(hash)", method: "HEAD")
                #expect(head.status == 404, "a partial upload must not be visible")

                var reserved: Double = -1
                let released = try await eventually(timeout: 30) {
                    reserved = try await c.metrics().value("cachemesh_store_reserved_bytes") ?? -1
                    return reserved == 0
                }
                #expect(released, "cachemesh_store_reserved_bytes stayed at \(reserved) after the client died\nnode log:\n\(node.logExcerpt())")

                let health = try await c.getText("/healthz")
                #expect(health.status == 200)

                let small = randomBytes(10_000)
                let d = try await c.put(bytes: small)
                #expect(d.hash == SHA256.hex(small))
                #expect(try await c.fetch("/cas/\(hash)", method: "HEAD").status == 404)
            }
            // The full blob can still be uploaded afterwards (over a fresh connection, at full speed).
            let put = try await curl(node, .client, ["-T", file, node.url("/cas/\(hash)")])
            #expect(put.httpCode == "201", "\(put)\nnode log:\n\(node.logExcerpt())")
            let head = try await curl(node, .client, ["-I", "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(head.httpCode == "200", "\(head)")
        }
    }

    @Test("A body shorter than its declared content-length stores nothing and releases its reservation")
    func truncatedBody() async throws {
        try await withNode { node in
            try await withClient(node) { c in
                let body = randomBytes(100_000)
                let hash = SHA256.hex(body)
                // Declare 1 MiB, send 100 kB, end the stream: nghttp2 checks the declared length
                // and resets the stream with PROTOCOL_ERROR (RFC 9113 §8.1.1) before the service
                // could answer — exactly that, not any 4xx or any error.
                let outcome = "RST_STREAM PROTOCOL_ERROR"
                await #expect(throws: HTTPTransportError.streamReset(errorCode: 1)) {
                    let r = try await c.connection.request(
                        HTTPRequestHead(method: "PUT", path: "/cas/\(hash)", headers: ["content-length": String(1 << 20)]),
                        body: .bytes(ByteBuffer(bytes: body)))
                    _ = try await r.body.collect(upTo: 1 << 16)
                }
                let c2 = try await node.client()
                defer { Task { await c2.close() } }
                #expect(try await c2.fetch("/cas/\(hash)", method: "HEAD").status == 404, "after \(outcome)")
                var reserved: Double = -1
                let released = try await eventually(timeout: 30) {
                    reserved = try await c2.metrics().value("cachemesh_store_reserved_bytes") ?? -1
                    return reserved == 0
                }
                #expect(released, "reserved bytes stuck at \(reserved) after \(outcome)")
                #expect(try await c2.put(bytes: body).hash == hash)
            }
        }
    }

    @Test("Writing more than --max-bytes evicts old blobs; a blob larger than the store is 413")
    func eviction() async throws {
        try await withNode(maxBytes: "1M") { node in
            try await withClient(node) { c in
                var hashes: [String] = []
                var last: [UInt8] = []
                for _ in 0..<20 {
                    let b = randomBytes(100 * 1024)
                    do {
                        hashes.append(try await c.put(bytes: b).hash)
                    } catch {
                        Issue.record("PUT \(hashes.count + 1) of 20 failed: \(error)\nnode log:\n\(node.logExcerpt())")
                        throw error
                    }
                    last = b
                }
                let m = try await c.metrics()
                let used = try #require(m.value("cachemesh_store_used_bytes"))
                let limit = try #require(m.value("cachemesh_store_limit_bytes"))
                let evictions = try #require(m.value("cachemesh_store_evictions_total"))
                #expect(limit == 1_048_576)
                #expect(used <= 1_048_576, "used \(used) exceeds the limit")
                // 20 × 100 KiB cannot fit in 1 MiB: at most 10 remain, so at least 10 were evicted.
                #expect(evictions >= 10, "evictions_total = \(evictions)")
                let newest = try await c.fetch("/cas/\(hashes.last!)")
                #expect(newest.status == 200)
                #expect(newest.body == last, "the most recent blob must still be readable intact")
                var present = 0
                for h in hashes where try await c.fetch("/cas/\(h)", method: "HEAD").status == 200 { present += 1 }
                #expect(present <= 10, "\(present) blobs of 100 KiB claim to be stored in 1 MiB")
                #expect(present >= 1)

                // Larger than the whole store: refused up front.
                let huge = randomBytes(2 << 20)
                do {
                    _ = try await c.put(bytes: huge)
                    Issue.record("a 2 MiB PUT into a 1 MiB store succeeded")
                } catch let CacheClientError.http(status, message) {
                    #expect(status == 413, "\(message)")
                }
                #expect(try await c.fetch("/cas/\(SHA256.hex(huge))", method: "HEAD").status == 404)
                let after = try await c.metrics()
                #expect((after.value("cachemesh_store_used_bytes") ?? .infinity) <= 1_048_576)
                #expect(after.value("cachemesh_store_reserved_bytes") == 0)
            }
            // A real HTTP/2 client sees the same early 413. (Not curl 7.88: it reports the
            // RFC 9113 §8.1 early response + RST_STREAM(NO_ERROR) as error 92 instead of the status.)
            let dir = try TempDir("413")
            defer { dir.remove() }
            let file = dir.file("huge")
            try await makeRandomFile(file, size: 2 << 20)
            let hash = try await sha256sum(file)
            let tls = ["--cert", node.certs.path("client.pem"), "--key", node.certs.path("client.key")]
            let put = try await run(["nghttp", "-v", "-H", ":method: PUT", "-d", file] + tls + [node.url("/cas/\(hash)")], timeout: 60)
            #expect(put.stdout.contains(":status: 413"), "nghttp PUT of 2 MiB: \(put.stdout.suffix(1500))")
            #expect(!put.stdout.contains(":status: 201"))
        }
    }

    @Test("Blobs survive a graceful restart on the same data directory")
    func restartKeepsBlobs() async throws {
        let data = try TempDir("restart-data")
        defer { data.remove() }
        var blobs: [String: [UInt8]] = [:]
        do {
            let node = try await TestNode.start(dataDir: data.path)
            defer { node.cleanUp() }
            try await withClient(node) { c in
                for size in [0, 1, 1000, 65_536, 1_000_003] {
                    let b = randomBytes(size)
                    blobs[try await c.put(bytes: b).hash] = b
                }
            }
            let exit = await node.terminate(timeout: 60)
            #expect(exit != nil, "node did not exit within 60 s of SIGTERM")
            if let exit {
                #expect(exit.status == 0 && !exit.signalled, "exit after SIGTERM: \(exit)\nnode log:\n\(node.logExcerpt())")
            }
        }
        let node2 = try await TestNode.start(dataDir: data.path)
        defer { node2.cleanUp() }
        try await withClient(node2) { c in
            for (hash, bytes) in blobs {
                let r = try await c.fetch("/cas/\(hash)")
                #expect(r.status == 200, "blob \(hash) (\(bytes.count) bytes) missing after restart\nnode log:\n\(node2.logExcerpt())")
                #expect(r.body == bytes, "blob \(hash) differs after restart")
            }
            let m = try await c.metrics()
            // Exactly the non-empty blobs: the empty blob is answered without being stored.
            #expect(m.value("cachemesh_store_blobs") == Double(blobs.values.filter { !$0.isEmpty }.count), "blob count after restart")
        }
        let exit2 = await node2.terminate()
        #expect(exit2.map { $0.status == 0 && !$0.signalled } == true, "second node exit: \(String(describing: exit2))")
    }

    @Test("/metrics is well-formed Prometheus text and counts new blobs")
    func metrics() async throws {
        // The parser itself rejects malformed input (so passing below means something).
        for bad in ["metric{a=b} 1", "metric one", "9metric 1", "# TYPE metric sometimes", "metric{a=\"x\" 1", "metric 1 2 3"] {
            #expect(throws: PrometheusText.ParseError.self, "\(bad)") { try PrometheusText(parsing: bad) }
        }
        try await withNode { node in
            try await withClient(node) { c in
                let (status, text) = try await c.getText("/metrics")
                #expect(status == 200)
                let before = try PrometheusText(parsing: text)
                for name in ["cachemesh_store_used_bytes", "cachemesh_store_blobs", "cachemesh_store_limit_bytes",
                             "cachemesh_store_evictions_total", "cachemesh_store_bytes_in_total",
                             "cachemesh_store_hits_total", "cachemesh_store_misses_total", "cachemesh_store_rejected_writes_total"] {
                    #expect(before.value(name) != nil, "\(name) missing from /metrics")
                    #expect(before.types[name] != nil, "\(name) has no # TYPE line")
                }
                #expect(before.types["cachemesh_store_bytes_in_total"] == "counter")
                #expect(before.types["cachemesh_store_used_bytes"] == "gauge")
                #expect(before.samples.contains { $0.name == "cachemesh_store_rejected_writes_total" && $0.labels["reason"] != nil })
                #expect(before.value("cachemesh_store_limit_bytes") == Double(256 << 20))

                let sizes = [3000, 40_000, 123_457]
                for s in sizes { _ = try await c.put(bytes: randomBytes(s)) }
                let missing = try await c.fetch("/cas/\(SHA256.hex(randomBytes(16)))")
                #expect(missing.status == 404)

                let after = try await c.metrics()
                let blobs0 = before.value("cachemesh_store_blobs") ?? .nan, blobs1 = after.value("cachemesh_store_blobs") ?? .nan
                #expect(blobs1 == blobs0 + Double(sizes.count), "blobs \(blobs0) → \(blobs1)")
                let in0 = before.value("cachemesh_store_bytes_in_total") ?? .nan, in1 = after.value("cachemesh_store_bytes_in_total") ?? .nan
                #expect(in1 - in0 >= Double(sizes.reduce(0, +)), "bytes_in \(in0) → \(in1)")
                let used0 = before.value("cachemesh_store_used_bytes") ?? .nan, used1 = after.value("cachemesh_store_used_bytes") ?? .nan
                #expect(used1 - used0 == Double(sizes.reduce(0, +)), "used_bytes \(used0) → \(used1)")
                #expect((after.value("cachemesh_store_misses_total") ?? 0) > (before.value("cachemesh_store_misses_total") ?? 0))
            }
        }
    }
}
