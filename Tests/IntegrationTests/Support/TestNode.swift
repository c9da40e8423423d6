import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import TestSupport
import MeshHTTP
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Locations

enum Paths {
    /// The package root (…/Tests/IntegrationTests/Support/TestNode.swift → root).
    static var packageRoot: String { RepositoryCertificates.repositoryRoot }

    /// The `cachemesh` binary: $CACHEMESH_BIN, else next to the running test executable.
    static func cachemesh() throws -> String {
        if let env = ProcessInfo.processInfo.environment["CACHEMESH_BIN"], !env.isEmpty {
            guard FileManager.default.isExecutableFile(atPath: env) else {
                throw HarnessError("CACHEMESH_BIN=\(env) is not an executable file")
            }
            return env
        }
        var candidates: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            candidates.append(exe)
        }
        candidates.append(CommandLine.arguments[0])
        for exe in candidates {
            var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
            // The test binary may sit inside a bundle directory (…/debug/X.xctest[/…]); walk up a little.
            for _ in 0..<4 {
                let p = dir.appendingPathComponent("cachemesh").path
                var isDir: ObjCBool = false
                if FileManager.default.fileExists(atPath: p, isDirectory: &isDir), !isDir.boolValue,
                   FileManager.default.isExecutableFile(atPath: p) {
                    return p
                }
                dir.deleteLastPathComponent()
            }
        }
        throw HarnessError("the cachemesh binary was not found next to the test executable (\(candidates)); run `swift build` first or set CACHEMESH_BIN")
    }
}

// MARK: - Certificates (made once per test process)

struct Certs: Sendable {
    let dir: String
    func path(_ name: String) -> String { (dir as NSString).appendingPathComponent(name) }
    var ca: String { path("ca.pem") }
    var nodeCert: String { path("node.pem") }
    var nodeKey: String { path("node.key") }

    static func shared() throws -> Certs {
        do { return Certs(dir: try RepositoryCertificates.directory()) } catch { throw HarnessError("\(error)") }
    }
}

/// Who a client claims to be.
enum Identity: String, Sendable, CaseIterable {
    case client, reader, node, stranger
    /// No client certificate at all.
    case anonymous
}

// MARK: - A node process

final class TestNode: @unchecked Sendable {
    let child: ChildProcess
    let port: Int
    /// The UDP (QUIC) port, for a node started with `quic: true`.
    let quicPort: Int?
    let dataDir: String
    let certs: Certs
    let binary: String
    private let ownsDataDir: Bool

    var pid: Int32 { child.pid }
    var address: String { "127.0.0.1:\(port)" }
    var baseURL: String { "https://127.0.0.1:\(port)" }

    private init(child: ChildProcess, port: Int, quicPort: Int?, dataDir: String, certs: Certs, binary: String, ownsDataDir: Bool) {
        self.child = child
        self.port = port
        self.quicPort = quicPort
        self.dataDir = dataDir
        self.certs = certs
        self.binary = binary
        self.ownsDataDir = ownsDataDir
    }

    /// Starts `cachemesh node` on 127.0.0.1:0 (and a QUIC listener on UDP 127.0.0.1:0 with
    /// `quic`) and waits for its "listening" lines.
    static func start(
        dataDir: String? = nil, maxBytes: String = "256M", allowUnauthenticatedReads: Bool = false,
        openFilesLimit: Int? = nil, quic: Bool = false, extraArguments: [String] = [], startupTimeout: Double = 60
    ) async throws -> TestNode {
        let certs = try Certs.shared()
        let bin = try Paths.cachemesh()
        let ownsDir = dataDir == nil
        let dir = try dataDir ?? TempDir("data").path
        var args = [bin, "node", "--listen", "127.0.0.1:0", "--data-dir", dir, "--max-bytes", maxBytes,
                    "--cert", certs.nodeCert, "--key", certs.nodeKey, "--ca", certs.ca, "--log-level", "debug"]
        if allowUnauthenticatedReads { args.append("--allow-unauthenticated-reads") }
        if quic { args += ["--quic-listen", "127.0.0.1:0"] }
        args += extraArguments
        let argv: [String]
        if let limit = openFilesLimit {
            let quoted = args.map { "'\($0)'" }.joined(separator: " ")
            argv = ["/bin/sh", "-c", "ulimit -n \(limit) && exec \(quoted)"]
        } else {
            argv = args
        }
        let child = try ChildProcess(argv)
        func listening(_ kind: String) -> Int? {
            child.stdout.split(separator: "\n").first { $0.hasPrefix("cachemesh: listening \(kind)=") }
                .flatMap { $0.split(separator: ":").last }.flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        }
        var port: Int?
        var quicPort: Int?
        _ = await eventually(timeout: startupTimeout) {
            port = listening("tcp")
            quicPort = quic ? listening("quic") : nil
            return (port != nil && (!quic || quicPort != nil)) || child.hasExited
        }
        guard let port, port > 0, !quic || quicPort != nil else {
            child.killAndWait()
            let status = child.exitStatus.map { "exited \($0.status)" } ?? "still silent after \(startupTimeout) s (killed)"
            throw HarnessError("node did not report its port (\(status)): `\(child.commandLine)`\nstdout: \(child.stdout)\nstderr: \(child.stderr.suffix(3000))")
        }
        return TestNode(child: child, port: port, quicPort: quicPort, dataDir: dir, certs: certs, binary: bin, ownsDataDir: ownsDir)
    }

    /// `curl` with HTTP/2, TLS verification against the mesh CA and the given identity.
    func curl(_ who: Identity = .client) -> [String] {
        ["curl", "--http2", "-sS", "--max-time", "120", "--cacert", certs.ca] + credentialArguments(who, cert: "--cert", key: "--key")
    }

    /// Arguments for the `cachemesh` client commands.
    func cli(_ who: Identity = .client) -> [String] {
        ["--server", address, "--ca", certs.ca] + credentialArguments(who, cert: "--cert", key: "--key")
    }

    func credentialArguments(_ who: Identity, cert: String, key: String) -> [String] {
        switch who {
        case .anonymous: []
        default: [cert, certs.path("\(who.rawValue).pem"), key, certs.path("\(who.rawValue).key")]
        }
    }

    func url(_ path: String) -> String { baseURL + path }

    func client(_ who: Identity = .client) async throws -> CacheClient {
        let cert = who == .anonymous ? nil : certs.path("\(who.rawValue).pem")
        let key = who == .anonymous ? nil : certs.path("\(who.rawValue).key")
        return try await CacheClient.connect(ClientOptions(
            server: HostPort(host: "127.0.0.1", port: port), certificate: cert, privateKey: key, ca: certs.ca))
    }

    /// SIGTERM and wait (bounded) for the exit. Returns the exit status, nil on timeout (then killed).
    @discardableResult
    func terminate(timeout: Double = 60) async -> (status: Int32, signalled: Bool)? {
        child.signal(SIGTERM)
        let e = await child.waitForExit(timeout: timeout)
        if e == nil { child.killAndWait() }
        return e
    }

    /// SIGKILL + reap; safe in `defer` and repeatable.
    func kill() { child.killAndWait() }

    /// The last lines of the node's log (stderr), for failure messages.
    func logExcerpt(lines: Int = 30) -> String {
        child.stderr.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    func cleanUp() {
        kill()
        child.removeOutputFiles()
        if ownsDataDir { try? FileManager.default.removeItem(atPath: dataDir) }
    }

    deinit { child.killAndWait() }
}

/// Starts a node, runs `body`, and always stops the node (SIGKILL if still running) and removes
/// its files, whether `body` returns or throws.
func withNode<T>(
    maxBytes: String = "256M", allowUnauthenticatedReads: Bool = false, openFilesLimit: Int? = nil,
    _ body: (TestNode) async throws -> T
) async throws -> T {
    let node = try await TestNode.start(maxBytes: maxBytes, allowUnauthenticatedReads: allowUnauthenticatedReads, openFilesLimit: openFilesLimit)
    defer { node.cleanUp() }
    return try await body(node)
}

/// Runs `body` with a connected client and closes it afterwards.
func withClient<T>(_ node: TestNode, _ who: Identity = .client, _ body: (CacheClient) async throws -> T) async throws -> T {
    let c = try await node.client(who)
    do {
        let r = try await body(c)
        await c.close()
        return r
    } catch {
        await c.close()
        throw error
    }
}

// MARK: - Raw client helpers

extension CacheClient {
    /// GET a blob fully into memory; returns (status, body bytes).
    func fetch(_ path: String, method: String = "GET") async throws -> (status: Int, body: [UInt8]) {
        let r = try await connection.request(HTTPRequestHead(method: method, path: path))
        let body = try await r.body.collect(upTo: 64 << 20)
        return (r.status, Array(body.readableBytesView))
    }

    /// The node's metrics, parsed.
    func metrics() async throws -> PrometheusText {
        let (status, body) = try await getText("/metrics")
        guard status == 200 else { throw HarnessError("/metrics answered \(status): \(body)") }
        return try PrometheusText(parsing: body)
    }
}

// MARK: - curl helpers

/// The result of a curl call made with `-w '\n%{http_code} %{http_version}'` appended.
struct CurlResult: CustomStringConvertible {
    var exitCode: Int32
    var httpCode: String
    var httpVersion: String
    var body: String
    var stderr: String
    var description: String { "curl exit \(exitCode), http \(httpCode) (HTTP/\(httpVersion)), body \(body.prefix(300).debugDescription), stderr \(stderr.prefix(500).debugDescription)" }
}

/// Runs curl with `arguments` (after the node's base arguments), printing the body then a
/// status line; parses both.
func curl(_ node: TestNode, _ who: Identity = .client, _ arguments: [String], timeout: Double = 120) async throws -> CurlResult {
    let marker = "\n@@CURL@@ "
    let r = try await run(node.curl(who) + arguments + ["-w", "\(marker)%{http_code} %{http_version}"], timeout: timeout)
    let out = r.stdout
    guard let range = out.range(of: marker, options: .backwards) else {
        return CurlResult(exitCode: r.status, httpCode: "", httpVersion: "", body: out, stderr: r.stderr)
    }
    let tail = out[range.upperBound...].split(separator: " ")
    return CurlResult(exitCode: r.status, httpCode: tail.first.map(String.init) ?? "",
                      httpVersion: tail.count > 1 ? String(tail[1]) : "", body: String(out[..<range.lowerBound]), stderr: r.stderr)
}
