import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Testing
@testable import MeshQUIC

/// Interop with Debian's ngtcp2 example programs (packages ngtcp2-client / ngtcp2-server).
@Suite(.serialized) struct QUICInteropTests {
    static let gtlsclient = "/usr/bin/gtlsclient"
    static let gtlsserver = "/usr/sbin/gtlsserver"

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
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: gtlsclient)), arguments: [false, true])
    func gtlsclientFetchesFromOurServer(retry: Bool) async throws {
        try await QUICTestServer.with(addressValidation: retry ? .always : .never) { server, port, service in
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quic-interop-\(getpid())-\(port)").path
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let n = 3_000_000
            let args = ["-q", "--key", QUICTestCerts.path("client.key"), "--cert", QUICTestCerts.path("client.pem"),
                        "--download", dir, "--exit-on-all-streams-close", "--timeout", "5s",
                        "127.0.0.1", String(port), "https://127.0.0.1:\(port)/pattern/\(n)"]
            let (status, output) = try await Self.run(Self.gtlsclient, args, timeout: 30)
            #expect(status == 0, "gtlsclient: \(output.suffix(2000))")
            let data = FileManager.default.contents(atPath: "\(dir)/\(n)") ?? Data()
            #expect(data.count == n)
            #expect(PatternFile.matches(ByteBuffer(bytes: data), at: 0))
            // It presented the client certificate: the service saw the client role.
            #expect(service.started.withLock { $0 } >= 1)
            // (gtlsclient may re-send its first Initial before the Retry arrives: one Retry each.)
            #expect(retry ? server.stats.retriesSent >= 1 : server.stats.retriesSent == 0)
            #expect(server.stats.connectionsAccepted == 1)
        }
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: gtlsclient)))
    func gtlsclientWithoutCertificateIsRefused() async throws {
        try await QUICTestServer.with { _, port, service in
            let args = ["-q", "--exit-on-all-streams-close", "--timeout", "3s",
                        "127.0.0.1", String(port), "https://127.0.0.1:\(port)/pattern/10"]
            _ = try await Self.run(Self.gtlsclient, args, timeout: 20)
            #expect(service.started.withLock { $0 } == 0)
        }
    }

    /// Also against `gtlsserver --validate-addr` (a Retry before every connection): our client follows it.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: gtlsserver)), arguments: [false, true])
    func ourClientFetchesFromGtlsserver(validateAddress: Bool) async throws {
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
        p.executableURL = URL(fileURLWithPath: Self.gtlsserver)
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
    }
}
