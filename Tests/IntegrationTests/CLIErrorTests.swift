import CacheNode
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The real `cachemesh` binary: exit codes (0 ok, 1 runtime failure with one `Error:` line and no
/// usage, 2 usage errors), `--version`, strict sizes, and errors that name the thing and the cause
/// in words (address, path) instead of library internals.
@Suite("cachemesh exit codes and error messages", .serialized, .timeLimit(.minutes(5)))
struct CLIErrorTests {
    func cachemesh(_ args: [String], timeout: Double = 60) async throws -> ProcessResult {
        try await run([try Paths.cachemesh()] + args, timeout: timeout)
    }

    static let hash = String(repeating: "0", count: 64)

    /// A runtime failure: exit 1, exactly one line on stderr, `Error: ` + `message`, no usage text.
    func expectRuntimeFailure(_ r: ProcessResult, _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 1 && !r.signalled, "\(r)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n").filter { !$0.contains(" info ") && !$0.contains(" notice ") && !$0.contains(" debug ") }
        #expect(lines == ["Error: \(message)"[...]], "\(r)", sourceLocation: sourceLocation)
        for internals in ["Usage:", "errno", "SingleConnectionFailure", "[IPv4]", "bind(descriptor", "(-64)", "Error while reading file"] {
            #expect(!r.stderr.contains(internals), "\(internals) in \(r)", sourceLocation: sourceLocation)
        }
    }

    /// A usage error: exit 2 (not ArgumentParser's 64), the message, never a crash.
    func expectUsageError(_ r: ProcessResult, _ words: [String], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 2 && !r.signalled, "\(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.hasPrefix("Error: "), "\(r)", sourceLocation: sourceLocation)
        for w in words { #expect(r.stderr.contains(w), "'\(w)' missing: \(r)", sourceLocation: sourceLocation) }
        #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("Backtrac"), "\(r)", sourceLocation: sourceLocation)
    }

    @Test("--version prints the version and exits 0; --help exits 0 and documents the exit codes")
    func versionAndHelp() async throws {
        let v = try await cachemesh(["--version"])
        #expect(v.status == 0 && v.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0.3.0", "\(v)")
        let h = try await cachemesh(["--help"])
        let help = h.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ") // wrapped to the terminal width
        #expect(h.status == 0 && help.contains("Exit status: 0 ok; 1 a runtime failure") && help.contains("2 a usage error"), "\(h)")
    }

    @Test("Usage errors exit 2 with the subcommand's usage, not the top-level one")
    func usageErrorsExitTwo() async throws {
        let unknown = try await cachemesh(["nosuch"])
        expectUsageError(unknown, ["Unexpected argument 'nosuch'"])
        let badDigest = try await cachemesh(["get", "zz", "--server", "127.0.0.1:1", "--insecure"])
        expectUsageError(badDigest, ["digest must be 64 lowercase hex characters", "See 'cachemesh get --help'"])
        #expect(!badDigest.stderr.contains("cachemesh <subcommand>"), "\(badDigest)")
        let badServer = try await cachemesh(["get", Self.hash, "--server", "nowhere", "--insecure"])
        expectUsageError(badServer, ["--server must be host:port, got nowhere"])
        let missingValue = try await cachemesh(["node", "--listen"])
        expectUsageError(missingValue, ["Missing value for '--listen"])
        let certWithoutKey = try await cachemesh(["get", Self.hash, "--server", "127.0.0.1:1", "--ca", "/x/ca.pem", "--cert", "/x/c.pem"])
        expectUsageError(certWithoutKey, ["--cert needs --key"])
    }

    @Test("--max-bytes: overflow, inf, exponents, fractions and negatives are usage errors that say why (no crash)")
    func strictSizes() async throws {
        let dir = try TempDir("cli-sizes")
        defer { dir.remove() }
        let node = ["node", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", dir.file("data")]
        let cases: [(String, String)] = [
            ("99999999999T", "too large; the largest size is 8388607T"),
            ("9223372036854775808", "too large"),
            ("infG", "is not a size"),
            ("nan", "is not a size"),
            ("1e30K", "exponents are not accepted"),
            ("1.5G", "use a whole number"),
            ("-1", "a size cannot be negative"),
            ("10Q", "unknown unit 'Q'"),
        ]
        for (value, reason) in cases {
            let r = try await cachemesh(node + ["--max-bytes", value])
            // Where the value is not a size at all, the error lists the units.
            let listsUnits = !reason.contains("too large") && !reason.contains("negative")
            expectUsageError(r, ["--max-bytes: '\(value)' is not a size", reason] + (listsUnits ? ["K, M, G or T (powers of 1024"] : []))
            #expect(!r.stderr.contains("Missing value"), "\(value): \(r)")
        }
        // A number without a unit is bytes: 10 bytes is no store, and the message says so.
        let bare = try await cachemesh(node + ["--max-bytes", "10"])
        expectUsageError(bare, ["max_bytes (--max-bytes) is 10 bytes; a store needs at least 1 MiB", "a size without a unit is bytes"])
        #expect(FileManager.default.fileExists(atPath: dir.file("data")) == false, "a refused node created its data directory")
    }

    @Test("A typo or a wrong type in a topology or config file stops the node with the line (exit 2)")
    func configTypos() async throws {
        let dir = try TempDir("cli-config")
        defer { dir.remove() }
        let topology = dir.file("t.toml")
        try """
        name = "t"
        ca = "ca.pem"
        replicaton = 2
        [[nodes]]
        name = "a"
        tcp = "127.0.0.1:0"
        data_dir = "a"
        cert = "a.pem"
        key = "a.key"
        """.write(toFile: topology, atomically: true, encoding: .utf8)
        let t = try await cachemesh(["node", "--topology", topology, "--name", "a"])
        expectUsageError(t, ["topology \(topology), line 3: unknown key 'replicaton' (known: ca, fetch, limits, name, nodes, origin, quic, repair, replication, write_quorum)"])

        let config = dir.file("n.toml")
        try "insecure = true\nlisten = \"127.0.0.1:0\"\nmax_bytes = \"1G\"\ndrain_seconds = \"5\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        let c = try await cachemesh(["node", "--config", config])
        expectUsageError(c, ["config \(config), line 4: 'drain_seconds' must be an integer, got a string (\"5\")"])
    }

    @Test("A node refuses to start with a certificate clients or peers would refuse: a client certificate, another node's name (exit 2, the reason)")
    func ownCertificateChecked() async throws {
        let dir = try TempDir("cli-own-cert")
        defer { dir.remove() }
        let certs = try Certs.shared()
        let client = try await cachemesh(["node", "--listen", "127.0.0.1:0", "--data-dir", dir.file("d"), "--max-bytes", "1G",
                                          "--cert", certs.path("client.pem"), "--key", certs.path("client.key"), "--ca", certs.ca])
        expectUsageError(client, ["has the role client, not node", "certs/mkcerts.sh node"])
        #expect(!client.stdout.contains("listening"), "\(client)")

        // A mesh node "a" started with the certificate of a node called "node".
        let topology = dir.file("t.toml")
        try """
        name = "t"
        ca = "\(certs.ca)"
        [[nodes]]
        name = "a"
        tcp = "127.0.0.1:0"
        data_dir = "\(dir.file("a"))"
        max_bytes = "1G"
        cert = "\(certs.nodeCert)"
        key = "\(certs.nodeKey)"
        """.write(toFile: topology, atomically: true, encoding: .utf8)
        let other = try await cachemesh(["node", "--topology", topology, "--name", "a"])
        expectUsageError(other, ["is for \"node\", but this node is \"a\""])
    }

    @Test("Connection refused and missing certificate files: exit 1, one line naming the address or file and the cause")
    func runtimeFailuresInWords() async throws {
        let certs = try Certs.shared()
        let refused = try await cachemesh(["get", Self.hash, "--server", "127.0.0.1:1", "--ca", certs.ca])
        expectRuntimeFailure(refused, "cannot connect to 127.0.0.1:1: connection refused")
        let refusedPlain = try await cachemesh(["status", "--server", "127.0.0.1:1", "--insecure"])
        expectRuntimeFailure(refusedPlain, "cannot connect to 127.0.0.1:1: connection refused")

        let noCA = try await cachemesh(["get", Self.hash, "--server", "127.0.0.1:1", "--ca", "/nonexistent/ca.pem"])
        expectRuntimeFailure(noCA, "cannot read CA certificate file /nonexistent/ca.pem: no such file or directory")
        let noCert = try await cachemesh(["get", Self.hash, "--server", "127.0.0.1:1", "--ca", certs.ca,
                                          "--cert", "/x/y.pem", "--key", certs.path("client.key")])
        expectRuntimeFailure(noCert, "cannot read certificate file /x/y.pem: no such file or directory")

        let dir = try TempDir("cli-nocert")
        defer { dir.remove() }
        let node = try await cachemesh(["node", "--listen", "127.0.0.1:0", "--data-dir", dir.file("data"),
                                        "--cert", certs.nodeCert, "--key", dir.file("missing.key"), "--ca", certs.ca])
        expectRuntimeFailure(node, "cannot read private key file \(dir.file("missing.key")): no such file or directory")
        let dirAsCA = try await cachemesh(["get", Self.hash, "--server", "127.0.0.1:1", "--ca", dir.path])
        expectRuntimeFailure(dirAsCA, "cannot read CA certificate file \(dir.path): it is a directory")
    }

    @Test("An unusable data directory stops the node at start (exit 1, the path and the cause), never 'listening': a regular file, an immutable tmp/ or cas/ab (chattr +i: refused even to root)")
    func unwritableDataDirectory() async throws {
        let dir = try TempDir("cli-datadir")
        let data = dir.file("data")
        defer {
            for d in ["\(data)/tmp", "\(data)/cas/ab", data] { _ = try? Process.run(URL(fileURLWithPath: "/usr/bin/chattr"), arguments: ["-i", d]).waitUntilExit() }
            dir.remove()
        }
        let certs = try Certs.shared()
        func node(_ path: String) async throws -> ProcessResult {
            try await cachemesh(["node", "--listen", "127.0.0.1:0", "--data-dir", path, "--max-bytes", "1G",
                                 "--cert", certs.nodeCert, "--key", certs.nodeKey, "--ca", certs.ca])
        }
        func chattr(_ flag: String, _ path: String) async throws {
            let r = try await run(["chattr", flag, path])
            try #require(r.status == 0, "chattr \(flag) \(path) (the test needs a file system with the immutable flag): \(r)")
        }
        // A regular file where the directory should be.
        let file = dir.file("file")
        try Data("x".utf8).write(to: URL(fileURLWithPath: file))
        let r1 = try await node(file)
        expectRuntimeFailure(r1, "cannot use the data directory \(file): \(file) exists and is not a directory")
        #expect(!r1.stdout.contains("listening"), "\(r1)")

        // No file can be created in tmp/ (where every upload starts): the write probe finds it.
        try FileManager.default.createDirectory(atPath: "\(data)/tmp", withIntermediateDirectories: true)
        try await chattr("+i", "\(data)/tmp")
        let r2 = try await node(data)
        expectRuntimeFailure(r2, "cannot use the data directory \(data): cannot create a file in \(data)/tmp: operation not permitted")
        #expect(!r2.stdout.contains("listening"), "\(r2)")
        try await chattr("-i", "\(data)/tmp")

        // One of the 512 blob directories is not writable.
        try await chattr("+i", "\(data)/cas/ab")
        let r3 = try await node(data)
        expectRuntimeFailure(r3, "cannot use the data directory \(data): cannot write to \(data)/cas/ab: operation not permitted")
        try await chattr("-i", "\(data)/cas/ab")

        // The data directory itself cannot take its layout.
        let fresh = dir.file("fresh")
        try FileManager.default.createDirectory(atPath: fresh, withIntermediateDirectories: true)
        try await chattr("+i", fresh)
        let r4 = try await node(fresh)
        try await chattr("-i", fresh)
        expectRuntimeFailure(r4, "cannot use the data directory \(fresh): cannot create the directory \(fresh)/cas: operation not permitted")

        // Writable again: it starts.
        let ok = try await TestNode.start(dataDir: data)
        ok.cleanUp()
    }

    @Test("A port in use: exit 1, 'cannot listen on ADDRESS: address already in use'")
    func addressInUse() async throws {
        try await withNode { first in
            let dir = try TempDir("cli-bind")
            defer { dir.remove() }
            let r = try await cachemesh(["node", "--listen", first.address, "--data-dir", dir.file("data"),
                                         "--cert", first.certs.nodeCert, "--key", first.certs.nodeKey, "--ca", first.certs.ca])
            expectRuntimeFailure(r, "cannot listen on \(first.address): address already in use")
            // The first node is unharmed.
            #expect(try await withClient(first) { try await $0.getText("/healthz").status } == 200)
        }
    }
}
