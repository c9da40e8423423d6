import Foundation
import Testing

/// The build tools people already run, unmodified, against a real node's local endpoint:
/// ccache (Debian 4.7, HTTP storage with layout=bazel) and Bazel 4.2.3 (HTTP cache over
/// HTTP/1.1, and REAPI gRPC over h2c). Heavy (Bazel's JVM): run serially (.ci/test SERIAL).
@Suite("Build tools on the local endpoint: ccache and Bazel (http://, grpc://)", .serialized)
struct LocalBuildToolTests {
    /// A small C project: two translation units and a header.
    static func cProject(_ dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "int add(int a, int b);\n".write(toFile: dir + "/util.h", atomically: true, encoding: .utf8)
        try "#include \"util.h\"\nint add(int a, int b) { return a + b; }\n".write(toFile: dir + "/util.c", atomically: true, encoding: .utf8)
        try "#include <stdio.h>\n#include \"util.h\"\nint main(void) { printf(\"%d\\n\", add(2, 3)); return 0; }\n"
            .write(toFile: dir + "/main.c", atomically: true, encoding: .utf8)
    }

    /// `ccache --print-stats` as a dictionary.
    static func ccacheStats(_ env: [String: String]) async throws -> [String: Int] {
        let r = try await run(["ccache", "--print-stats"], environment: env)
        try #require(r.status == 0, "ccache --print-stats: \(r)")
        var stats: [String: Int] = [:]
        for line in r.stdout.split(separator: "\n") {
            let parts = line.split(separator: "\t")
            if parts.count == 2, let v = Int(parts[1]) { stats[String(parts[0])] = v }
        }
        return stats
    }

    @Test("ccache: a C project compiled in two directories with separate local caches; the second is served from the node",
          .timeLimit(.minutes(5)))
    func ccacheRemoteHits() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let root = try TempDir("ccache")
        defer { root.remove() }
        var objects: [String: [String: Data]] = [:]
        for (i, name) in ["first", "second"].enumerated() {
            let src = root.file(name)
            try Self.cProject(src)
            var env = ProcessInfo.processInfo.environment
            env["CCACHE_DIR"] = root.file("ccache-\(name)")
            env["CCACHE_REMOTE_STORAGE"] = "http://127.0.0.1:\(node.localPort!)|layout=bazel"
            env["CCACHE_REMOTE_ONLY"] = nil
            // Paths differ between the two trees: let ccache rewrite them so the keys match.
            env["CCACHE_BASEDIR"] = src
            for unit in ["util", "main"] {
                let r = try await run(["/bin/sh", "-c", "cd '\(src)' && exec ccache gcc -O1 -c \(unit).c -o \(unit).o"], environment: env)
                try #require(r.status == 0, "ccache gcc \(unit).c in \(name): \(r)")
                objects[name, default: [:]][unit] = FileManager.default.contents(atPath: "\(src)/\(unit).o")
            }
            let link = try await run(["/bin/sh", "-c", "cd '\(src)' && gcc util.o main.o -o prog && ./prog"], environment: env)
            #expect(link.status == 0 && link.stdout == "5\n", "\(name): \(link)")
            let stats = try await Self.ccacheStats(env)
            if i == 0 {
                #expect(stats["remote_storage_hit"] == 0 && stats["remote_storage_miss"] == 2, "first tree: \(stats.filter { $0.key.hasPrefix("remote") })")
                #expect((stats["remote_storage_write"] ?? 0) >= 2, "first tree writes its results to the node: \(stats.filter { $0.key.hasPrefix("remote") })")
                #expect(stats["remote_storage_error"] == 0)
            } else {
                #expect(stats["remote_storage_hit"] == 2 && stats["remote_storage_miss"] == 0, "second tree: every compile a remote hit: \(stats.filter { $0.key.hasPrefix("remote") })")
                #expect(stats["remote_storage_error"] == 0 && stats["local_storage_hit"] == 0, "\(stats)")
            }
        }
        #expect(objects["first"] == objects["second"], "objects from the node equal the compiled ones")
        // What ccache stored are action-cache entries, over HTTP/1.1.
        let m = try await withClient(node) { try await $0.metrics() }
        #expect((m.value("cachemesh_store_actions") ?? 0) >= 2)
        #expect((m.value("cachemesh_http_requests_total", labels: ["protocol": "http1"]) ?? 0) >= 6)
    }

    struct Bazel {
        let ws: String
        let root: TempDir
        let cache: String

        func run(_ args: [String]) async throws -> ProcessResult {
            // --batch: no Bazel server is left running after the test.
            try await IntegrationTests.run(["/bin/sh", "-c", "cd '\(ws)' && exec bazel --batch --output_user_root='\(root.file("out"))' "
                                            + args.map { "'\($0)'" }.joined(separator: " ")], timeout: 300)
        }

        func build() async throws -> ProcessResult {
            try await run(["build", "//:all", "--remote_cache=\(cache)", "--spawn_strategy=local", "--remote_timeout=60"])
        }

        func clean() async throws {
            let r = try await run(["clean"])
            try #require(r.status == 0, "bazel clean: \(r)")
        }
    }

    /// Build, `bazel clean`, rebuild: every genrule a remote cache hit, outputs intact.
    func buildCleanRebuild(cache: (TestNode) -> String, label: String) async throws {
        // A fresh node per protocol: the hits must come from what this protocol uploaded.
        let node = try await TestNode.startWithLocal(maxBytes: "512M")
        defer { node.cleanUp() }
        let root = try TempDir("bazel-local-\(label)")
        defer { root.remove() }
        let bazel = Bazel(ws: try BazelTests.workspace(root), root: root, cache: cache(node))
        let first = try await bazel.build()
        try #require(first.status == 0, "\(label) first build: \(first)\nnode log:\n\(node.logExcerpt())")
        #expect(BazelTests.remoteHits(first.stderr) == 0, "cold cache: \(first.stderr.suffix(500))")
        let m = try await withClient(node) { try await $0.metrics() }
        #expect(m.value("cachemesh_store_actions") == 4, "4 action results stored over \(label)")
        try await bazel.clean()
        let second = try await bazel.build()
        try #require(second.status == 0, "\(label) rebuild: \(second)")
        #expect(BazelTests.remoteHits(second.stderr) == 4, "\(label): every genrule a remote cache hit: \(second.stderr.suffix(800))")
        let derived = try String(contentsOfFile: bazel.ws + "/bazel-bin/derived.txt", encoding: .utf8)
        #expect(derived.hasPrefix("hello from a genrule"))
        #expect(fileSize(bazel.ws + "/bazel-bin/big.bin") == 5_000_000)
        #expect(fileSize(bazel.ws + "/bazel-bin/m1.bin") == 3_000_000)
        _ = try? await bazel.run(["shutdown"])
    }

    @Test("Bazel --remote_cache=http://127.0.0.1:PORT (HTTP/1.1): build, clean, rebuild with every action a remote hit", .timeLimit(.minutes(10)))
    func bazelHTTPCache() async throws {
        try await buildCleanRebuild(cache: { "http://127.0.0.1:\($0.localPort!)" }, label: "http")
    }

    @Test("Bazel --remote_cache=grpc://127.0.0.1:PORT (REAPI over h2c): build, clean, rebuild with every action a remote hit", .timeLimit(.minutes(10)))
    func bazelGRPCCache() async throws {
        try await buildCleanRebuild(cache: { "grpc://127.0.0.1:\($0.localPort!)" }, label: "grpc")
    }
}
