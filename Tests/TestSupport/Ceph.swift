import Foundation

/// A real single-node Ceph with an S3 endpoint (RADOS Gateway), started once per test process by
/// the repository's `Tests/tools/ceph/ceph.sh` and stopped (by PID) when the process exits.
/// Tests that use it make their own buckets, so they never see each other's objects.
public final class CephCluster: Sendable {
    public let directory: String
    public let endpoint: String
    /// The same gateway over TLS (`https://127.0.0.1:PORT`), its certificate issued by `caFile`.
    public let tlsEndpoint: String
    public let caFile: String
    public let accessKey = "cachemesh-test"
    public let secretKey = "cachemesh-test-secret"

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public static var script: String { "\(RepositoryCertificates.repositoryRoot)/Tests/tools/ceph/ceph.sh" }
    public static var s3py: String { "\(RepositoryCertificates.repositoryRoot)/Tests/tools/ceph/s3.py" }

    private init(directory: String, endpoint: String, tlsEndpoint: String = "", caFile: String = "") {
        self.directory = directory
        self.endpoint = endpoint
        self.tlsEndpoint = tlsEndpoint
        self.caFile = caFile
    }

    private static let started: Result<CephCluster, Failure> = {
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("cachemesh-test-ceph-\(getpid())")
        let c = CephCluster(directory: dir, endpoint: "")
        let (status, out, err) = run("/bin/bash", [script, "start", dir, c.accessKey, c.secretKey])
        guard status == 0, let line = out.split(separator: "\n").first(where: { $0.hasPrefix("endpoint=") }) else {
            _ = run("/bin/bash", [script, "stop", dir])
            return .failure(Failure(description: "ceph.sh start failed (\(status)): \(err.suffix(2000))"))
        }
        stopDirectory = dir
        atexit { if let d = CephCluster.stopDirectory { _ = CephCluster.run("/bin/bash", [CephCluster.script, "stop", d]) } }
        func value(_ key: String) -> String {
            out.split(separator: "\n").first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) } ?? ""
        }
        return .success(CephCluster(directory: dir, endpoint: String(line.dropFirst("endpoint=".count)),
                                    tlsEndpoint: value("tls_endpoint"), caFile: value("ca")))
    }()

    nonisolated(unsafe) static var stopDirectory: String?

    /// The process's Ceph (started on first use; a failure to start fails every test that needs it).
    public static func shared() throws -> CephCluster { try started.get() }

    /// `s3.py ENDPOINT ACCESS SECRET args…` with Debian's python3 and boto3: (status, stdout bytes, stderr).
    public func s3(_ args: [String]) -> (Int32, Data, String) {
        Self.runData("/usr/bin/python3", [Self.s3py, endpoint, accessKey, secretKey] + args)
    }

    /// A new bucket with a unique name.
    public func makeBucket(_ prefix: String = "t") throws -> String {
        let name = "\(prefix)-\(UUID().uuidString.prefix(8).lowercased())"
        let (st, _, err) = s3(["mb", name])
        guard st == 0 else { throw Failure(description: "s3.py mb \(name) failed: \(err.suffix(500))") }
        return name
    }

    /// Keys in a bucket (boto3's list_objects_v2).
    public func list(_ bucket: String, prefix: String = "") throws -> [String: Int64] {
        let (st, out, err) = s3(["ls", bucket, prefix])
        guard st == 0 else { throw Failure(description: "s3.py ls \(bucket) failed: \(err.suffix(500))") }
        var r: [String: Int64] = [:]
        for line in String(decoding: out, as: UTF8.self).split(separator: "\n") {
            let p = line.split(separator: " ")
            if p.count == 2, let n = Int64(p[1]) { r[String(p[0])] = n }
        }
        return r
    }

    /// The radosgw process: SIGKILL (S3 down), restart on the same port, SIGSTOP/SIGCONT (S3 hangs).
    public func stopGateway() { _ = Self.run("/bin/bash", [Self.script, "stop-rgw", directory]) }
    public func startGateway() throws {
        let (st, _, err) = Self.run("/bin/bash", [Self.script, "start-rgw", directory])
        guard st == 0 else { throw Failure(description: "ceph.sh start-rgw failed: \(err.suffix(1000))") }
    }
    public func pauseGateway() { signalGateway(SIGSTOP) }
    public func resumeGateway() { signalGateway(SIGCONT) }
    private func signalGateway(_ sig: Int32) {
        if let text = try? String(contentsOfFile: "\(directory)/rgw.pid", encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(pid, sig)
        }
    }

    @discardableResult
    static func run(_ exe: String, _ args: [String]) -> (Int32, String, String) {
        let (st, out, err) = runData(exe, args)
        return (st, String(decoding: out, as: UTF8.self), err)
    }

    /// Runs `exe` with posix_spawn and waits for it with waitpid. Not Foundation's Process: it
    /// notices the end of a child by a descriptor the child inherits, which ceph.sh's daemons keep
    /// open, so it would wait for them. Output goes to files (the daemons would hold a pipe open).
    static func runData(_ exe: String, _ args: [String]) -> (Int32, Data, String) {
        let tmp = NSTemporaryDirectory() + "cachemesh-ceph-\(UUID().uuidString)"
        defer {
            unlink(tmp + ".out")
            unlink(tmp + ".err")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, tmp + ".out", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, tmp + ".err", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv = ([exe] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, argv, environ)
        guard rc == 0 else { return (-1, Data(), "posix_spawn \(exe): \(String(cString: strerror(rc)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        let o = FileManager.default.contents(atPath: tmp + ".out") ?? Data()
        let e = String(decoding: FileManager.default.contents(atPath: tmp + ".err") ?? Data(), as: UTF8.self)
        return (code, o, e)
    }
}
