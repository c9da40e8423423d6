import Foundation
import Testing

/// Bazel 4.2.3 (Debian's bazel-bootstrap) as a real REAPI client over grpcs:// with mTLS.
@Suite("Bazel remote cache over gRPC + mTLS", .serialized)
struct BazelTests {
    /// Bazel needs ALPN from netty-tcnative: a *copy* named libnetty_tcnative.so on java.library.path.
    static func jniDir(_ root: TempDir) throws -> String {
        let src = "/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so"
        guard FileManager.default.fileExists(atPath: src) else {
            throw HarnessError("\(src) missing: apt-get install libnetty-tcnative-jni (.ci/install-deps does)")
        }
        let dir = root.file("jni")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: src, toPath: dir + "/libnetty_tcnative.so")
        return dir
    }

    /// A workspace of genrules: small and multi-MB outputs, a dependent action, multiple outputs.
    static func workspace(_ root: TempDir) throws -> String {
        let ws = root.file("ws")
        try FileManager.default.createDirectory(atPath: ws, withIntermediateDirectories: true)
        try "".write(toFile: ws + "/WORKSPACE", atomically: true, encoding: .utf8)
        try """
        genrule(name = "small", outs = ["small.txt"], cmd = "echo hello from a genrule > $@")
        genrule(name = "big", outs = ["big.bin"], cmd = "head -c 5000000 /dev/urandom > $@")
        genrule(name = "derived", srcs = [":small", ":big"], outs = ["derived.txt"],
                cmd = "cat $(location :small) > $@; sha256sum $(location :big) >> $@")
        genrule(name = "multi", outs = ["m1.bin", "m2.txt"],
                cmd = "head -c 3000000 /dev/urandom > $(location m1.bin); echo two > $(location m2.txt)")
        """.write(toFile: ws + "/BUILD", atomically: true, encoding: .utf8)
        return ws
    }

    struct Bazel {
        let ws: String
        let startup: [String]
        /// The node Bazel talks to (host:port) and the certificates it uses.
        let address: String
        let certs: Certs

        init(ws: String, startup: [String], address: String, certs: Certs) {
            self.ws = ws
            self.startup = startup
            self.address = address
            self.certs = certs
        }

        init(ws: String, startup: [String], node: TestNode) {
            self.init(ws: ws, startup: startup, address: node.address, certs: node.certs)
        }

        func run(_ args: [String]) async throws -> ProcessResult {
            // --batch: no Bazel server is left running after the test.
            try await IntegrationTests.run(["/bin/sh", "-c", "cd '\(ws)' && exec bazel " + (startup + args).map { "'\($0)'" }.joined(separator: " ")],
                                           timeout: 300)
        }

        func build(_ who: Identity, extra: [String] = []) async throws -> ProcessResult {
            var flags = ["build", "//:all", "--remote_cache=grpcs://\(address)", "--tls_certificate=\(certs.ca)",
                         "--nosandbox_debug", "--spawn_strategy=local", "--remote_timeout=60"]
            if who != .anonymous {
                flags += ["--tls_client_certificate=\(certs.path("\(who.rawValue).pem"))",
                          "--tls_client_key=\(certs.path("\(who.rawValue).pkcs8.key"))"]
            }
            return try await run(flags + extra)
        }

        func clean() async throws {
            let r = try await run(["clean"])
            try #require(r.status == 0, "bazel clean: \(r)")
        }
    }

    /// "INFO: 5 processes: 4 remote cache hit, 1 internal." → 4
    static func remoteHits(_ output: String) -> Int? {
        guard let line = output.split(separator: "\n").last(where: { $0.contains(" processes: ") }) else { return nil }
        if !line.contains("remote cache hit") { return 0 }
        let parts = line.components(separatedBy: "processes: ")[1].components(separatedBy: ", ")
        return parts.first { $0.contains("remote cache hit") }.flatMap { Int($0.split(separator: " ")[0]) }
    }

    @Test("build, clean, rebuild: every action is a remote cache hit; reader gets hits but cannot upload; no/foreign certificate refused",
          .timeLimit(.minutes(10)))
    func bazelBuildHitsTheCache() async throws {
        try await withNode(maxBytes: "512M") { node in
            let root = try TempDir("bazel")
            defer { root.remove() }
            let bazel = Bazel(ws: try Self.workspace(root),
                              startup: ["--batch", "--output_user_root=\(root.file("out"))",
                                        "--host_jvm_args=-Djava.library.path=\(try Self.jniDir(root))"],
                              node: node)

            let first = try await bazel.build(.client)
            try #require(first.status == 0, "first build failed: \(first)\nnode log:\n\(node.logExcerpt())")
            #expect(Self.remoteHits(first.stderr) == 0, "cold cache: \(first.stderr.suffix(500))")
            let m = try await withClient(node) { try await $0.getText("/metrics").body }
            #expect(try PrometheusText(parsing: m).value("cachemesh_store_actions") == 4, "4 action results stored:\n\(m)")

            try await bazel.clean()
            let second = try await bazel.build(.client)
            try #require(second.status == 0, "rebuild failed: \(second)")
            #expect(Self.remoteHits(second.stderr) == 4, "every genrule must be a remote cache hit: \(second.stderr.suffix(800))")
            // The outputs really came back (multi-MB ones included).
            let derived = try String(contentsOfFile: bazel.ws + "/bazel-bin/derived.txt", encoding: .utf8)
            #expect(derived.hasPrefix("hello from a genrule"))
            #expect(fileSize(bazel.ws + "/bazel-bin/big.bin") == 5_000_000)
            #expect(fileSize(bazel.ws + "/bazel-bin/m1.bin") == 3_000_000)

            // reader: hits, but Bazel learns from GetCapabilities that it may not upload.
            try await bazel.clean()
            let readerHits = try await bazel.build(.reader, extra: ["--noremote_upload_local_results"])
            #expect(readerHits.status == 0, "\(readerHits)")
            #expect(Self.remoteHits(readerHits.stderr) == 4, "\(readerHits.stderr.suffix(800))")
            try await bazel.clean()
            let readerUpload = try await bazel.build(.reader)
            // Exit 34: Bazel's "remote error" (the cache refused), not some other failure.
            #expect(readerUpload.status == 34, "\(readerUpload.stderr.suffix(800))")
            #expect(readerUpload.stderr.contains("not authorized to write"), "\(readerUpload.stderr.suffix(800))")

            // No client certificate / a certificate from another CA: refused.
            let anonymous = try await bazel.build(.anonymous)
            #expect(anonymous.status == 34, "\(anonymous.stderr.suffix(800))")
            #expect(anonymous.stderr.contains("Failed to query remote execution capabilities"), "\(anonymous.stderr.suffix(800))")
            #expect(Self.remoteHits(anonymous.stderr) == nil || Self.remoteHits(anonymous.stderr) == 0)
            let stranger = try await bazel.build(.stranger)
            #expect(stranger.status == 34, "\(stranger.stderr.suffix(800))")
            #expect(stranger.stderr.contains("Failed to query remote execution capabilities"), "\(stranger.stderr.suffix(800))")

            // The node is still serving.
            #expect(try await withClient(node) { try await $0.getText("/healthz").status } == 200)
        }
    }
}
