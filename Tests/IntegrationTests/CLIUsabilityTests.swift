import BlobStore
import CacheNode
import CacheRoutes
import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The real `cachemesh` binary as a person meets it: help texts, log lines, progress on a
/// terminal (and none in a pipe), QUIC without a listener, a drain cut short.
@Suite("cachemesh for people", .serialized, .timeLimit(.minutes(5)))
struct CLIUsabilityTests {
    func cachemesh(_ args: [String], timeout: Double = 60) async throws -> ProcessResult {
        try await run([try Paths.cachemesh()] + args, timeout: timeout)
    }

    /// Runs the command on a pseudo-terminal (`script`): stdout and stderr are a TTY; returns
    /// what the terminal received.
    func onTerminal(_ args: [String], timeout: Double = 120) async throws -> ProcessResult {
        let command = ([try Paths.cachemesh()] + args).map { "'\($0)'" }.joined(separator: " ")
        return try await run(["script", "-qefc", command, "/dev/null"], timeout: timeout)
    }

    @Test("--help: benchmark and driver subcommands hidden (still runnable), defaults shown, --log-level described")
    func helpTexts() async throws {
        let top = try await cachemesh(["--help"])
        #expect(top.status == 0, "\(top)")
        for shown in ["node", "put", "get", "status", "demo"] { #expect(top.stdout.contains("  \(shown) "), "\(shown): \(top.stdout)") }
        for hidden in ["bench-fetch", "bench-mesh-driver", "simulate-gossip", "relay"] {
            #expect(!top.stdout.contains(hidden), "\(hidden) listed: \(top.stdout)")
            let h = try await cachemesh([hidden, "--help"])
            #expect(h.status == 0 && h.stdout.contains("USAGE: cachemesh \(hidden)"), "\(hidden) --help: \(h)")
        }
        let node = try await cachemesh(["node", "--help"])
        let text = node.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        for d in ["(default: 127.0.0.1:8443)", "(default: ./cachemesh-data)", "(default: 10G)", "(default: auto)",
                  "--log-level <log-level> Least severe log messages written to stderr", "default: info)"] {
            #expect(text.contains(d), "'\(d)' missing: \(node.stdout)")
        }
        let put = try await cachemesh(["put", "--help"])
        let putText = put.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(putText.contains("default: warning)") && putText.contains("default: 127.0.0.1:8443)"), "\(put.stdout)")
    }

    @Test("Log lines: the message before the metadata; addresses as 127.0.0.1:PORT and [::1]:PORT")
    func logFormat() async throws {
        let node = try await TestNode.start()
        defer { node.cleanUp() }
        let ready = try #require(node.child.stderr.split(separator: "\n").first { $0.contains("cachemesh node ready") }, "\(node.logExcerpt())")
        #expect(ready.contains(" notice cachemesh.node.node: cachemesh node ready "), "\(ready)")
        #expect(ready.contains(" tcp=127.0.0.1:\(node.port)"), "\(ready)")
        #expect(!node.child.stderr.contains("[IPv4]") && !node.child.stderr.contains("[IPv6]"), "\(node.logExcerpt())")

        let v6 = try await TestNode.start(extraArguments: ["--listen", "[::1]:0"])
        defer { v6.cleanUp() }
        #expect(v6.child.stdout.contains("cachemesh: listening tcp=[::1]:\(v6.port)"), "\(v6.child.stdout)")
        let line = v6.child.stderr.split(separator: "\n").first { $0.contains("HTTP/2 listening") } ?? ""
        #expect(line.contains("address=[::1]:\(v6.port)"), "\(v6.logExcerpt())")
        let s = try await cachemesh(["status", "--json", "--server", "[::1]:\(v6.port)", "--ca", v6.certs.ca,
                                     "--cert", v6.certs.path("client.pem"), "--key", v6.certs.path("client.key")])
        let status = try NodeStatus.decoder().decode(NodeStatus.self, from: Data(s.stdout.utf8))
        #expect(status.listen.tcp == "[::1]:\(v6.port)", "\(s)")
    }

    @Test("A normal QUIC client exit leaves no warning (and no congestion figures) in the node's log")
    func quicClientExitIsQuiet() async throws {
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        let dir = try TempDir("quic-quiet")
        defer { dir.remove() }
        try await makeRandomFile(dir.file("blob"), size: 3_000_000)
        let quic = ["--transport", "quic", "--server", "127.0.0.1:\(node.quicPort!)", "--ca", node.certs.ca,
                    "--cert", node.certs.path("client.pem"), "--key", node.certs.path("client.key")]
        let put = try await cachemesh(["put", dir.file("blob")] + quic)
        #expect(put.status == 0, "\(put)")
        let digest = put.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        for _ in 0..<3 {
            let get = try await cachemesh(["get", digest, "-o", dir.file("out")] + quic)
            #expect(get.status == 0, "\(get)")
        }
        try await Task.sleep(for: .seconds(1)) // the node notices the closes
        let noisy = node.child.stderr.split(separator: "\n").filter {
            ($0.contains(" warning ") || $0.contains(" error ")) || ($0.contains("cwnd=") && !$0.contains(" debug "))
        }
        #expect(noisy.isEmpty, "\(noisy)")
    }

    @Test("put --transport quic to a node without a QUIC listener fails at once with the cause in words (ICMP port unreachable)")
    func quicWithoutListener() async throws {
        let node = try await TestNode.start()
        defer { node.cleanUp() }
        let dir = try TempDir("quic-none")
        defer { dir.remove() }
        try Data("x".utf8).write(to: URL(fileURLWithPath: dir.file("f")))
        let r = try await cachemesh(["put", dir.file("f"), "--transport", "quic"] + node.cli())
        // The handshake-timeout path says "no answer over UDP … within"; this one is the refusal.
        #expect(r.status == 1 && r.stderr == "Error: cannot connect to \(node.address): QUIC handshake failed: nothing listens on UDP \(node.address) (port unreachable); is the node running with --quic-listen?\n", "\(r)")
    }

    /// The progress segments (between `\r`s) of a terminal transcript for `label`.
    func progressSegments(_ output: String, _ label: String) -> [Substring] {
        output.split(whereSeparator: \.isNewline).filter { $0.hasPrefix(label + " ") }
    }

    @Test("Progress: on a terminal only for big transfers, ending on a current 100% line; never in a pipe")
    func progress() async throws {
        let node = try await TestNode.start()
        defer { node.cleanUp() }
        let dir = try TempDir("progress")
        defer { dir.remove() }
        try await makeRandomFile(dir.file("big"), size: 20_000_000)
        try Data("tiny!\n".utf8).write(to: URL(fileURLWithPath: dir.file("tiny")))

        let bigPut = try await onTerminal(["put", dir.file("big")] + node.cli())
        #expect(bigPut.status == 0, "\(bigPut)")
        let up = progressSegments(bigPut.stdout, "upload")
        #expect(!up.isEmpty, "no progress on a terminal: \(bigPut.stdout.debugDescription)")
        #expect(up.last?.contains("100%") == true && up.last?.contains("19.1 MiB / 19.1 MiB") == true, "last: \(up.last ?? "-")")
        let digest = try #require(bigPut.stdout.split(whereSeparator: \.isNewline).first { $0.contains("/20000000") })
            .trimmingCharacters(in: .whitespaces)

        let bigGet = try await onTerminal(["get", digest, "-o", dir.file("out")] + node.cli())
        #expect(bigGet.status == 0, "\(bigGet)")
        let down = progressSegments(bigGet.stdout, "download")
        #expect(down.last?.contains("100%") == true && down.last?.contains("19.1 MiB / 19.1 MiB") == true, "last: \(down.last ?? "-") in \(bigGet.stdout.debugDescription)")
        #expect(bigGet.stdout.contains("wrote 20000000 bytes"), "\(bigGet)")

        // A 6-byte blob: no progress at all, up or down (size known or not).
        let tinyPut = try await onTerminal(["put", dir.file("tiny")] + node.cli())
        #expect(tinyPut.status == 0, "\(tinyPut)")
        #expect(progressSegments(tinyPut.stdout, "upload").isEmpty, "\(tinyPut.stdout.debugDescription)")
        let tinyDigest = try #require(tinyPut.stdout.split(whereSeparator: \.isNewline).first { $0.contains("/6") })
            .trimmingCharacters(in: .whitespaces)
        let tinyHash = String(tinyDigest.prefix(64))
        let tinyGet = try await onTerminal(["get", tinyHash, "-o", dir.file("tiny.out")] + node.cli())
        #expect(tinyGet.status == 0 && progressSegments(tinyGet.stdout, "download").isEmpty, "\(tinyGet.stdout.debugDescription)")

        // Not a terminal: no \r anywhere, the same results.
        let piped = try await run([try Paths.cachemesh(), "get", digest, "-o", dir.file("out2")] + node.cli())
        #expect(piped.status == 0 && !piped.stderr.contains("\r") && !piped.stderr.contains("download"), "\(piped)")
        let pipedPut = try await run([try Paths.cachemesh(), "put", dir.file("big")] + node.cli())
        #expect(pipedPut.status == 0 && !pipedPut.stderr.contains("\r"), "\(pipedPut)")
    }

    @Test("demo into a pipe: no \\r progress lines, durations like '2.17 s'", .timeLimit(.minutes(5)))
    func demoInAPipe() async throws {
        let dir = try TempDir("demo-pipe")
        defer { dir.remove() }
        let r = try await run([try Paths.cachemesh(), "demo", "--blobs", "3", "--mkcerts", RepositoryCertificates.script], timeout: 240)
        #expect(r.status == 0, "\(r)")
        #expect(!r.stdout.contains("\r"), "\(r.stdout.debugDescription)")
        let line = try #require(r.stdout.split(separator: "\n").first { $0.contains("converged after") }, "\(r.stdout)")
        let value = line.split(separator: " ").suffix(2)
        let number = value.first.map(String.init) ?? ""
        let unit = value.last.map(String.init) ?? ""
        // "2.17 s" (two decimals) or "850 ms"; never "2.165109465 seconds".
        let ok = (unit == "s" && number.split(separator: ".").last?.count == 2 && Double(number) != nil) || (unit == "ms" && Int(number) != nil)
        #expect(ok, "\(line)")
        #expect(r.stdout.contains("alive members seen: origin=4 peer1=4 peer2=4 peer3=4"), "\(r.stdout)")
        #expect(r.stdout.contains("origin sees peer2 as: left"), "\(r.stdout)")
    }

    /// A node with `drain_seconds` and one slow upload (curl, 400 KiB/s of 20 MB) in flight once
    /// it is asked to stop.
    func drainingNode(drainSeconds: Int, in dir: TempDir) async throws -> (TestNode, ChildProcess) {
        let config = dir.file("node.toml")
        try "drain_seconds = \(drainSeconds)\n".write(toFile: config, atomically: true, encoding: .utf8)
        let node = try await TestNode.start(extraArguments: ["--config", config])
        try await makeRandomFile(dir.file("upload"), size: 20_000_000)
        let hash = try await sha256sum(dir.file("upload"))
        let upload = try ChildProcess(node.curl(.client) + ["--limit-rate", "400K", "-T", dir.file("upload"), node.url("/cas/\(hash)")])
        // The upload is under way once the store has taken some of it.
        _ = await eventually(timeout: 20) { node.child.stderr.contains("PUT") || (try? FileManager.default.contentsOfDirectory(atPath: node.dataDir + "/tmp").isEmpty == false) == true }
        try await Task.sleep(for: .milliseconds(500))
        return (node, upload)
    }

    @Test("Drain: a second SIGINT/SIGTERM stops at once, says so, exits 128+signal")
    func secondSignalStops() async throws {
        let dir = try TempDir("drain-second")
        defer { dir.remove() }
        let (node, upload) = try await drainingNode(drainSeconds: 120, in: dir)
        defer {
            upload.killAndWait()
            node.cleanUp()
        }
        node.child.signal(SIGTERM)
        let draining = await eventually(timeout: 20) { node.child.stderr.contains("draining: GOAWAY") }
        #expect(draining, "\(node.logExcerpt())")
        #expect(!node.child.hasExited, "the node did not wait for the upload: \(node.logExcerpt())")
        node.child.signal(SIGINT)
        // drain_seconds is 120: only the second signal can end it within this wait.
        let exit = await node.child.waitForExit(timeout: 60)
        #expect(exit?.status == 130 && exit?.signalled == false, "\(String(describing: exit)) \(node.logExcerpt())")
        #expect(node.child.stderr.contains("cachemesh: SIGINT again during the drain: stopping now; requests in flight are cut (exit 130)"), "\(node.logExcerpt())")
    }

    @Test("Drain: when the grace period ends with a transfer in flight, it is cut, logged, and the node exits 3")
    func graceEndsWithCut() async throws {
        let dir = try TempDir("drain-cut")
        defer { dir.remove() }
        let (node, upload) = try await drainingNode(drainSeconds: 2, in: dir)
        defer {
            upload.killAndWait()
            node.cleanUp()
        }
        node.child.signal(SIGTERM)
        let exit = await node.child.waitForExit(timeout: 60)
        #expect(exit?.status == 3 && exit?.signalled == false, "\(String(describing: exit)) \(node.logExcerpt())")
        let log = node.child.stderr
        #expect(log.contains("drain: the grace period (2.0 s) ended with 1 request(s) in flight; closing the connection under them"), "\(node.logExcerpt())")
        #expect(log.contains("Error: the drain grace period (2 s, drain_seconds) ended with 1 request(s) still in flight; they were cut"), "\(node.logExcerpt())")
    }
}
