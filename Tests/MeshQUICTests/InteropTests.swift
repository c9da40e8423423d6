import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Testing
import TestSupport
@testable import MeshQUIC

/// Interop with Debian's ngtcp2 example programs (packages ngtcp2-client / ngtcp2-server, which
/// `.ci/install-deps` installs and checks). A missing program fails these tests: a suite that
/// skips its interop tests and stays green claims interop nobody checked.
@Suite(.serialized) struct QUICInteropTests {
    static let gtlsclient = "/usr/bin/gtlsclient"
    static let gtlsserver = "/usr/sbin/gtlsserver"

    /// The program at `path`, or a failed test naming the package to install.
    static func tool(_ path: String, package: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        try #require(FileManager.default.isExecutableFile(atPath: path),
                     "\(path) is missing: install \(package) (bash .ci/install-deps)", sourceLocation: sourceLocation)
        return path
    }

    /// Runs a program to its end (SIGKILL after `timeout` seconds) without holding a thread of
    /// the cooperative pool: on a 2-core machine that pool has two threads, and a test blocking
    /// one of them for the seconds gtlsclient takes starves every other test running beside it.
    static func run(_ path: String, _ args: [String], timeout: TimeInterval) async throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        let (exited, exit) = AsyncStream<Void>.makeStream()
        p.terminationHandler = { _ in exit.finish() }
        try p.run()
        let data = LockedData()
        // The pipe is drained on a thread of its own (so a chatty child never blocks on a full pipe).
        Thread { data.set(out.fileHandleForReading.readDataToEndOfFile()) }.start()
        let killer = Task {
            try await Task.sleep(for: .milliseconds(Int(timeout * 1000)))
            kill(p.processIdentifier, SIGKILL)
        }
        for await _ in exited {}
        killer.cancel()
        while !data.done { try await Task.sleep(for: .milliseconds(10)) }
        return (p.terminationStatus, String(decoding: data.value, as: UTF8.self))
    }

    final class LockedData: @unchecked Sendable {
        private let lock = NSLock()
        private var d = Data()
        private var finished = false
        func set(_ x: Data) { lock.lock(); d = x; finished = true; lock.unlock() }
        var done: Bool { lock.lock(); defer { lock.unlock() }; return finished }
        var value: Data { lock.lock(); defer { lock.unlock() }; return d }
    }

    /// Also with address validation on every connection: gtlsclient follows our Retry.
    @Test(arguments: [false, true])
    func gtlsclientFetchesFromOurServer(retry: Bool) async throws {
        let gtlsclient = try Self.tool(Self.gtlsclient, package: "ngtcp2-client")
        try await QUICTestServer.with(addressValidation: retry ? .always : .never) { server, port, service in
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quic-interop-\(getpid())-\(port)").path
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let n = 3_000_000
            let args = ["-q", "--key", QUICTestCerts.path("client.key"), "--cert", QUICTestCerts.path("client.pem"),
                        // gtlsclient's idle timeout: generous, a starved 2-core CI run once
                        // left the connection silent for 5 s and gtlsclient gave up (exit 0,
                        // nothing downloaded).
                        "--download", dir, "--exit-on-all-streams-close", "--timeout", "30s",
                        "127.0.0.1", String(port), "https://127.0.0.1:\(port)/pattern/\(n)"]
            let (status, output) = try await Self.run(gtlsclient, args, timeout: 90)
            #expect(status == 0, "gtlsclient: \(output.suffix(2000))")
            let data = FileManager.default.contents(atPath: "\(dir)/\(n)") ?? Data()
            #expect(data.count == n)
            #expect(PatternFile.matches(ByteBuffer(bytes: data), at: 0))
            // It presented the client certificate: the service saw the client role.
            #expect(service.started.withLock { $0 } >= 1)
            // (gtlsclient may re-send its first Initial before the Retry arrives: one Retry each.)
            #expect(retry ? server.stats.retriesSent >= 1 : server.stats.retriesSent == 0)
            #expect(server.stats.connectionsAccepted == 1)
            #expect(server.stats.handshakesFailed == 0)
        }
    }

    @Test func gtlsclientWithoutCertificateIsRefused() async throws {
        let gtlsclient = try Self.tool(Self.gtlsclient, package: "ngtcp2-client")
        try await QUICTestServer.with { server, port, service in
            let args = ["-q", "--exit-on-all-streams-close", "--timeout", "20s",
                        "127.0.0.1", String(port), "https://127.0.0.1:\(port)/pattern/10"]
            let (status, output) = try await Self.run(gtlsclient, args, timeout: 60)
            // gtlsclient ran to its end (it exits 0 when the peer closes the connection; killed
            // by our timeout it would be 9) and saw our CONNECTION_CLOSE (its connection went to
            // the draining state) — not a timeout of a server it never reached. The server took
            // its Initial and counted the handshake that ended without completing.
            #expect(status == 0, "gtlsclient: \(output.suffix(2000))")
            #expect(output.contains("ERR_DRAINING"), "gtlsclient: \(output.suffix(2000))")
            #expect(server.stats.connectionsAccepted == 1)
            let counted = await eventually(timeout: 10) { server.stats.handshakesFailed == 1 }
            #expect(counted, "stats: \(server.stats)")
            #expect(service.started.withLock { $0 } == 0)
        }
    }

    /// Also against `gtlsserver --validate-addr` (a Retry before every connection): our client follows it.
    @Test(arguments: [false, true])
    func ourClientFetchesFromGtlsserver(validateAddress: Bool) async throws {
        let gtlsserver = try Self.tool(Self.gtlsserver, package: "ngtcp2-server")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quic-htdocs-\(getpid())-\(validateAddress)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let n: Int64 = 5_000_000
        var blob = [UInt8](repeating: 0, count: Int(n))
        _ = try blob.withUnsafeMutableBytes { try PatternFile(length: n).read(at: 0, into: $0) }
        #expect(FileManager.default.createFile(atPath: "\(dir)/blob", contents: Data(blob)))

        // A free UDP port (bound and released; a race with another process is harmless here).
        let probe = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
        let port = probe.localAddress!.port!
        try await probe.close()

        let p = Process()
        p.executableURL = URL(fileURLWithPath: gtlsserver)
        p.arguments = ["-q", "-d", dir, "--verify-client"] + (validateAddress ? ["--validate-addr"] : []) + ["127.0.0.1", String(port),
                       QUICTestCerts.path("node.key"), QUICTestCerts.path("node.pem")]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }

        var conn: HTTP3Connection?
        for _ in 0..<50 where conn == nil {
            conn = try? await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"),
                                                      connectTimeout: .milliseconds(500))
            if conn == nil { try await Task.sleep(for: .milliseconds(100)) }
        }
        let c = try #require(conn)
        #expect(c.peer.role == .node)   // we verified gtlsserver's certificate (mesh CA, IP SAN)
        let r = try await c.request(HTTPRequestHead(method: "GET", path: "/blob"))
        #expect(r.status == 200)
        let (got, ok) = try await PatternFile.receive(r.body)
        #expect(got == n)
        #expect(ok)
        let missing = try await c.request(HTTPRequestHead(method: "GET", path: "/no-such-file"))
        #expect(missing.status == 404)
        _ = try await missing.body.collect(upTo: 1 << 20)
        await c.close()
        #expect(p.isRunning, "gtlsserver exited during the test (status \(p.isRunning ? 0 : p.terminationStatus))")
    }
}
