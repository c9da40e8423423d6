import BlobStore
import CacheNode
import MeshHTTP
import Foundation
import NIOCore
import TestSupport
import Testing

/// The origin backed by S3 on a real Ceph RADOS Gateway (Tests/tools/ceph/ceph.sh), the bucket
/// checked with boto3 (Tests/tools/ceph/s3.py). Serial in .ci/test (the gateway is stopped and
/// paused by some tests).
@Suite("S3-backed origin on Ceph RGW", .serialized)
struct S3OriginTests {
    /// `[origin]` for a topology or node config, with a credentials file in `dir`.
    static func originTable(_ ceph: CephCluster, bucket: String, dir: String, secret: String? = nil, idle: Int = 2,
                            endpoint: String? = nil, extra: String = "") throws -> String {
        let creds = (dir as NSString).appendingPathComponent("s3-credentials-\(UUID().uuidString.prefix(6))")
        try "[default]\naws_access_key_id = \(ceph.accessKey)\naws_secret_access_key = \(secret ?? ceph.secretKey)\n"
            .write(toFile: creds, atomically: true, encoding: .utf8)
        return """

        [origin]
        backend = "s3"
        endpoint = "\(endpoint ?? ceph.endpoint)"
        bucket = "\(bucket)"
        credentials_file = "\(creds)"
        idle_timeout_seconds = \(idle)
        multipart_threshold = "8M"
        part_size = "5M"
        \(extra)

        """
    }

    static func mesh(_ ceph: CephCluster, bucket: String, origins: Set<String> = ["origin"], tls: Bool = false) async throws -> TestMesh {
        let dir = try TempDir("s3creds")
        var o = TestMesh.Options()
        o.writeThrough = true
        o.origins = origins
        o.tables = try tls ? originTable(ceph, bucket: bucket, dir: dir.path, endpoint: ceph.tlsEndpoint, extra: "ca_file = \"\(ceph.caFile)\"")
                           : originTable(ceph, bucket: bucket, dir: dir.path)
        return try await TestMesh(o)
    }

    struct Answer {
        var status: Int
        var source: String
        var body: [UInt8]
        var text: String { String(decoding: body.prefix(500), as: UTF8.self) }
    }

    static func request(_ mesh: TestMesh, _ n: String, _ method: String, _ path: String, body: [UInt8]? = nil) async throws -> Answer {
        let c = try await mesh.client(n)
        defer { Task { await c.close() } }
        let headers = HTTPHeaders(body.map { [(name: "content-length", value: String($0.count))] } ?? [])
        let r = try await c.connection.request(.init(method: method, path: path, headers: headers),
                                               body: body.map { .bytes(ByteBuffer(bytes: $0)) } ?? .empty)
        return Answer(status: r.status, source: r.headers["x-cachemesh-source"] ?? "-",
                      body: Array(try await r.body.collect(upTo: 64 << 20).readableBytesView))
    }

    @Test("PUT through a peer → the object is in the bucket (boto3); the origin restarted with an empty disk serves every blob from S3 (verified: bytes that do not hash to the key are refused, counted); AC entries go to ac/<key>",
          .timeLimit(.minutes(5)))
    func writesLandInTheBucketAndSurviveAnEmptyDisk() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("origin")
        let mesh = try await Self.mesh(ceph, bucket: bucket)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let c = try await mesh.client("peer2")
        var blobs: [(Digest, [UInt8])] = []
        // 12 MB goes up in parts (multipart_threshold 8M).
        for size in [10_000, 1_500_000, 300_000, 12_000_000] {
            let data = randomBytes(size)
            blobs.append((try await c.put(bytes: data), data))
        }
        await c.close()
        // Acknowledged means durable in S3: boto3 lists every blob at cas/<sha256> with its size.
        let listed = try ceph.list(bucket)
        for (d, data) in blobs {
            #expect(listed["cas/\(d.hash)"] == d.size)
            let (st, got, _) = ceph.s3(["get", bucket, "cas/\(d.hash)"])
            #expect(st == 0 && [UInt8](got) == data)
        }
        // The action cache too.
        let acKey = SHA256.hex(randomBytes(16))
        let acValue = randomBytes(500)
        #expect(try await Self.request(mesh, "origin", "PUT", "/ac/\(acKey)", body: acValue).status == 201)
        #expect(try ceph.list(bucket, prefix: "ac/")["ac/\(acKey)"] == 500)

        // kill -9 the origin, empty its disk, start it again: every blob comes from S3.
        mesh.children["origin"]!.killAndWait()
        try FileManager.default.removeItem(atPath: mesh.dir.file("origin"))
        try mesh.start("origin")
        #expect(await eventually(timeout: 30) { mesh.children["origin"]!.stdout.contains("listening tcp=") })
        for (d, data) in blobs {
            #expect(!mesh.holds("origin", d.hash))
            let head = try await Self.request(mesh, "origin", "HEAD", "/cas/\(d.hash)")
            #expect(head.status == 200)
            let a = try await Self.request(mesh, "origin", "GET", "/cas/\(d.hash)")
            #expect(a.status == 200 && a.body == data, "GET \(d) at the restarted origin: \(a.status) \(a.text)")
            #expect(a.source == "s3")
            // A large blob's response ends once it verified; the commit (sync, publish) may still be under way.
            #expect(try await eventually(timeout: 10) { mesh.holds("origin", d.hash) }, "read-through keeps a local copy")
        }
        let ac = try await Self.request(mesh, "origin", "GET", "/ac/\(acKey)")
        #expect(ac.status == 200 && ac.body == acValue)
        // An unknown blob is a 404 (once the restarted origin has met the mesh again: before, it
        // cannot tell and answers 503).
        let unknown = SHA256.hex(randomBytes(8))
        #expect(try await eventually(timeout: 30) { try await Self.request(mesh, "origin", "GET", "/cas/\(unknown)").status == 404 })

        // Bytes in the bucket that do not hash to their key: never served, counted, nothing stored.
        // (A small blob is answered once verified: a 502. Large ones: see streamsColdReads.)
        let liar = SHA256.hex(randomBytes(32))
        let file = mesh.dir.file("liar")
        try Data(randomBytes(50_000)).write(to: URL(fileURLWithPath: file))
        #expect(ceph.s3(["put", bucket, "cas/\(liar)", file]).0 == 0)
        let bad = try await Self.request(mesh, "origin", "GET", "/cas/\(liar)")
        #expect(bad.status == 502, "\(bad.status) \(bad.text)")
        #expect(bad.text.contains("does not hash"))
        #expect(!mesh.holds("origin", liar))
        #expect(try await mesh.metric("origin", "cachemesh_s3_corrupt_objects_total") == 1)
        #expect(try await mesh.metric("origin", "cachemesh_s3_requests_total{op=\"GET\",result=\"2xx\"}") >= 4)
    }

    @Test("S3 down: blobs on the origin's disk are still served, writes get 503 saying why, uncached blobs 503; a hung gateway (SIGSTOP): writes and cold reads meet the deadline; all is well again once it is back",
          .timeLimit(.minutes(5)))
    func gatewayDownAndHung() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("down")
        let mesh = try await Self.mesh(ceph, bucket: bucket)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let cached = randomBytes(200_000)
        let cachedHash = SHA256.hex(cached)
        #expect(try await Self.request(mesh, "origin", "PUT", "/cas/\(cachedHash)", body: cached).status == 201)
        let uncachedHash = SHA256.hex(randomBytes(10))

        ceph.stopGateway()
        do {
            let a = try await Self.request(mesh, "origin", "GET", "/cas/\(cachedHash)")
            #expect(a.status == 200 && a.body == cached)
            let fresh = randomBytes(50_000)
            let w = try await Self.request(mesh, "origin", "PUT", "/cas/\(SHA256.hex(fresh))", body: fresh)
            #expect(w.status == 503, "\(w.status) \(w.text)")
            #expect(w.text.contains("not durable in S3"))
            let m = try await Self.request(mesh, "origin", "GET", "/cas/\(uncachedHash)")
            #expect(m.status == 503, "\(m.status) \(m.text)")
            #expect(m.text.contains("S3 tier is unavailable"))
        }
        try ceph.startGateway()
        ceph.pauseGateway()
        do {
            // Hung: the request ends (idle_timeout_seconds = 2, a few attempts) instead of hanging.
            let fresh = randomBytes(20_000)
            let w = try await Self.request(mesh, "origin", "PUT", "/cas/\(SHA256.hex(fresh))", body: fresh)
            #expect(w.status == 503, "\(w.status) \(w.text)")
            #expect(w.text.contains("deadline"))
            #expect(try await mesh.metric("origin", "cachemesh_s3_errors_total{op=\"PUT\",kind=\"timeout\"}") >= 1)
            // A cold read ends too: 503 naming the deadline, not a hung request.
            let r = try await Self.request(mesh, "origin", "GET", "/cas/\(uncachedHash)")
            #expect(r.status == 503 && r.text.contains("deadline"), "\(r.status) \(r.text)")
            #expect(try await mesh.metric("origin", "cachemesh_s3_errors_total{op=\"GET\",kind=\"timeout\"}") >= 1)
        }
        ceph.resumeGateway()
        let fresh = randomBytes(30_000)
        #expect(try await Self.request(mesh, "origin", "PUT", "/cas/\(SHA256.hex(fresh))", body: fresh).status == 201)
        #expect(try ceph.list(bucket)["cas/\(SHA256.hex(fresh))"] == 30_000)
    }

    @Test("Wrong credentials or a missing bucket: the node refuses to start and says why (exit 2)", .timeLimit(.minutes(2)))
    func refusesToStartWithoutAUsableBucket() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("refuse")
        let dir = try TempDir("s3refuse")
        defer { dir.remove() }
        for (name, table, expected) in [
            ("wrong-secret", try Self.originTable(ceph, bucket: bucket, dir: dir.path, secret: "wrong"), "refused the credentials"),
            ("no-bucket", try Self.originTable(ceph, bucket: "no-such-bucket-\(UUID().uuidString.prefix(6).lowercased())", dir: dir.path), "does not exist"),
        ] {
            let r = try await Self.startRefused(name, dir: dir, origin: table)
            #expect(r.stderr.contains(expected), "\(name): \(r.stderr.suffix(800))")
        }
    }

    @Test("Two origins on one bucket: writes through a peer; kill -9 of one origin → the other serves every blob (from S3), also through a peer",
          .timeLimit(.minutes(5)))
    func twoOriginsShareABucket() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("shared")
        let mesh = try await Self.mesh(ceph, bucket: bucket, origins: ["origin", "peer1"])
        defer { mesh.stopAll() }
        try await mesh.converge()
        let c = try await mesh.client("peer2")
        var blobs: [(Digest, [UInt8])] = []
        for _ in 0..<6 {
            let data = randomBytes(Int.random(in: 1_000...400_000))
            blobs.append((try await c.put(bytes: data), data))
        }
        await c.close()
        let listed = try ceph.list(bucket)
        for (d, _) in blobs { #expect(listed["cas/\(d.hash)"] == d.size) }
        // The origin that took the writes dies; the other one still serves everything.
        let writer = blobs.allSatisfy { mesh.holds("origin", $0.0.hash) } ? "origin" : "peer1"
        let other = writer == "origin" ? "peer1" : "origin"
        mesh.children[writer]!.killAndWait()
        for (d, data) in blobs {
            let a = try await Self.request(mesh, other, "GET", "/cas/\(d.hash)")
            #expect(a.status == 200 && a.body == data, "GET \(d) at \(other): \(a.status) \(a.text)")
        }
        // Through a peer: every blob, once membership has noticed the death (503s until then).
        for (d, data) in blobs {
            var last = Answer(status: 0, source: "", body: [])
            let ok = try await eventually(timeout: 40) {
                last = try await Self.request(mesh, "peer3", "GET", "/cas/\(d.hash)")
                return last.status == 200
            }
            #expect(ok && last.body == data, "GET \(d) at peer3: \(last.status) \(last.text)")
        }
    }

    @Test("Cold reads of large blobs are forwarded while they arrive from S3: concurrent readers share one S3 GET and all get the blob, which is stored; a large object that does not hash to its key is reset before its last byte, counted, not stored",
          .timeLimit(.minutes(5)))
    func streamsColdReads() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("stream")
        // Objects put straight into the bucket (boto3): the origin's disk has never seen them.
        let data = randomBytes(24_000_000)
        let hash = SHA256.hex(data)
        let dir = try TempDir("s3stream")
        defer { dir.remove() }
        try Data(data).write(to: URL(fileURLWithPath: dir.file("blob")))
        #expect(ceph.s3(["put", bucket, "cas/\(hash)", dir.file("blob")]).0 == 0)
        let liar = SHA256.hex(randomBytes(32))
        try Data(randomBytes(3_000_000)).write(to: URL(fileURLWithPath: dir.file("liar")))
        #expect(ceph.s3(["put", bucket, "cas/\(liar)", dir.file("liar")]).0 == 0)

        let mesh = try await Self.mesh(ceph, bucket: bucket)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let getsBefore = try await mesh.metric("origin", "cachemesh_s3_requests_total{op=\"GET\",result=\"2xx\"}")
        // Four readers at once (the gateway paused for a moment, less than idle_timeout_seconds,
        // so that all four miss while the download has not begun); each reads the whole body.
        ceph.pauseGateway()
        let answers = try await withThrowingTaskGroup(of: Answer.self) { group in
            for _ in 0..<4 { group.addTask { try await Self.request(mesh, "origin", "GET", "/cas/\(hash)") } }
            try await Task.sleep(for: .milliseconds(1000))
            ceph.resumeGateway()
            var all: [Answer] = []
            for try await a in group { all.append(a) }
            return all
        }
        for a in answers {
            #expect(a.status == 200 && a.body.count == data.count && a.body == data, "\(a.status) \(a.body.count) bytes: \(a.text)")
            #expect(a.source == "s3")
        }
        #expect(try await mesh.metric("origin", "cachemesh_s3_requests_total{op=\"GET\",result=\"2xx\"}") - getsBefore == 1,
                "one S3 GET for every concurrent reader")
        #expect(try await mesh.metric("origin", "cachemesh_s3_streamed_reads_total") >= 1)
        #expect(try await eventually(timeout: 10) { mesh.holds("origin", hash) }, "the read-through keeps a verified local copy")
        // Now local: served from disk.
        #expect(try await Self.request(mesh, "origin", "GET", "/cas/\(hash)").source == "local")

        // The liar: the response has started (200), but its body is cut before the end.
        let c = try await mesh.client("origin")
        defer { Task { await c.close() } }
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(liar)"), body: .empty)
        #expect(r.status == 200)
        do {
            let got = try await r.body.collect(upTo: 64 << 20)
            Issue.record("a body that does not hash to its key was delivered whole (\(got.readableBytes) bytes)")
        } catch {
            // Reset before the last byte.
        }
        #expect(try await mesh.metric("origin", "cachemesh_s3_corrupt_objects_total") == 1)
        #expect(!mesh.holds("origin", liar))
        // The origin goes on serving.
        #expect(try await Self.request(mesh, "origin", "GET", "/cas/\(hash)").status == 200)
    }

    @Test("TLS to the S3 endpoint (https://, [origin] ca_file): writes land in the bucket and cold reads come back over it; a CA that did not issue the gateway's certificate, or the system trust store, → the node refuses to start and says why",
          .timeLimit(.minutes(5)))
    func tlsToTheEndpoint() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("tls")
        let mesh = try await Self.mesh(ceph, bucket: bucket, tls: true)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let data = randomBytes(9_000_000)   // multipart (8M threshold) over TLS
        let hash = SHA256.hex(data)
        let w = try await Self.request(mesh, "origin", "PUT", "/cas/\(hash)", body: data)
        #expect(w.status == 201, "\(w.status) \(w.text)")
        #expect(try ceph.list(bucket)["cas/\(hash)"] == Int64(data.count))
        // A blob only in the bucket: read through over TLS (streamed: over 64 KiB).
        let cold = randomBytes(3_000_000)
        let coldHash = SHA256.hex(cold)
        try Data(cold).write(to: URL(fileURLWithPath: mesh.dir.file("cold")))
        #expect(ceph.s3(["put", bucket, "cas/\(coldHash)", mesh.dir.file("cold")]).0 == 0)
        let r = try await Self.request(mesh, "origin", "GET", "/cas/\(coldHash)")
        #expect(r.status == 200 && r.body == cold && r.source == "s3", "\(r.status) \(r.text)")
        #expect(try await mesh.metric("origin", "cachemesh_s3_errors_total{op=\"GET\",kind=\"tls\"}") == 0)

        // Another CA (made here with certtool), or none (the system's trust store): refused at start.
        let dir = try TempDir("s3tls")
        defer { dir.remove() }
        let otherCA = dir.file("other-ca.pem")
        #expect(try await run(["/usr/bin/certtool", "--generate-privkey", "--key-type", "ecdsa", "--outfile", dir.file("other-ca.key")], timeout: 30).status == 0)
        try "cn = \"another CA\"\nca\ncert_signing_key\n".write(toFile: dir.file("ca.tmpl"), atomically: true, encoding: .utf8)
        #expect(try await run(["/usr/bin/certtool", "--generate-self-signed", "--load-privkey", dir.file("other-ca.key"),
                               "--template", dir.file("ca.tmpl"), "--outfile", otherCA], timeout: 30).status == 0)
        for (name, extra, expected) in [("wrong-ca", "ca_file = \"\(otherCA)\"", "ca_file \(otherCA)"),
                                        ("system-trust", "", "system's trust store")] {
            let r = try await Self.startRefused(name, dir: dir,
                                                origin: try Self.originTable(ceph, bucket: bucket, dir: dir.path, endpoint: ceph.tlsEndpoint, extra: extra))
            #expect(r.stderr.contains("TLS to the S3 origin tier at \(ceph.tlsEndpoint)"), "\(name): \(r.stderr.suffix(800))")
            #expect(r.stderr.contains(expected) && r.stderr.contains("it was not issued by"),
                    "\(name): \(r.stderr.suffix(800))")
        }
    }

    /// A standalone node whose config holds `origin` (an `[origin]` table) and must refuse to
    /// start: exit 2 (a configuration error) before it listens. The caller checks the reason.
    static func startRefused(_ name: String, dir: TempDir, origin: String) async throws -> ProcessResult {
        let config = dir.file("\(name).toml")
        try """
        name = "\(name)"
        listen = "127.0.0.1:0"
        data_dir = "\(dir.file(name))"
        max_bytes = "64M"
        insecure = true
        \(origin)
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let r = try await run([try Paths.cachemesh(), "node", "--config", config], timeout: 60)
        #expect(r.status == 2, "\(name): \(r)")
        #expect(!r.stdout.contains("listening tcp="), "\(name)")
        return r
    }

    @Test("Bazel against a peer of a mesh whose origin is S3-backed: build, clean, rebuild (the origin restarted with an empty disk meanwhile) → every action a remote cache hit; the outputs are in the bucket",
          .timeLimit(.minutes(8)))
    func bazelAgainstAnS3BackedMesh() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("bazel")
        let mesh = try await Self.mesh(ceph, bucket: bucket)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let root = try TempDir("bazel-s3")
        defer { root.remove() }
        let ws = try BazelTests.workspace(root)
        let startup = ["--batch", "--output_user_root=\(root.file("out"))",
                       "--host_jvm_args=-Djava.library.path=\(try BazelTests.jniDir(root))"]
        func bazel(at n: String) -> BazelTests.Bazel {
            BazelTests.Bazel(ws: ws, startup: startup, address: "127.0.0.1:\(mesh.ports[n]!)", certs: mesh.certs)
        }
        let first = try await bazel(at: "peer2").build(.client)
        try #require(first.status == 0, "first build failed: \(first)\n\(mesh.logs().suffix(3000))")
        #expect(BazelTests.remoteHits(first.stderr) == 0, "cold cache: \(first.stderr.suffix(500))")
        // Write-through: the outputs (5 files) are durable in the bucket. (Action results stay on
        // the peer that took them: the mesh does not share the action cache.)
        #expect(try ceph.list(bucket, prefix: "cas/").count >= 5)

        try await bazel(at: "peer2").clean()
        mesh.children["origin"]!.killAndWait()
        try FileManager.default.removeItem(atPath: mesh.dir.file("origin"))
        try mesh.start("origin")
        #expect(await eventually(timeout: 30) { mesh.children["origin"]!.stdout.contains("listening tcp=") })
        try await mesh.converge()
        let second = try await bazel(at: "peer2").build(.client)
        try #require(second.status == 0, "rebuild failed: \(second)\n\(mesh.logs().suffix(3000))")
        #expect(BazelTests.remoteHits(second.stderr) == 4, "every genrule must be a remote cache hit: \(second.stderr.suffix(800))")
        #expect(fileSize(ws + "/bazel-bin/big.bin") == 5_000_000)
        #expect(fileSize(ws + "/bazel-bin/m1.bin") == 3_000_000)
    }
}
