import Foundation
import Testing
import TestSupport

/// A network namespace of the test's own: its own loopback with its own MTU (a real link
/// property the kernel enforces, unlike anything loopback in the host namespace can show).
/// Removed by `remove()`; processes run in it with `exec`.
final class TestNetns: @unchecked Sendable {
    static let ip = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"
    let name: String

    init(mtu: Int) async throws {
        name = "cmtest-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let add = try await run([Self.ip, "netns", "add", name])
        guard add.status == 0 else { throw HarnessError("ip netns add \(name): \(add)") }
        let up = try await run([Self.ip, "-n", name, "link", "set", "lo", "mtu", "\(mtu)", "up"])
        guard up.status == 0 else {
            remove()
            throw HarnessError("ip -n \(name) link set lo mtu \(mtu) up: \(up)")
        }
    }

    /// `arguments` run inside the namespace (`ip netns exec` execs them: same PID).
    func exec(_ arguments: [String]) -> [String] { [Self.ip, "netns", "exec", name] + arguments }

    func remove() { Self.delete(name) }

    /// `ip netns delete NAME`, waited for; a namespace already gone is no error.
    static func delete(_ name: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ip)
        p.arguments = ["netns", "delete", name]
        p.standardError = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
    }
}

/// QUIC on links whose MTU is not loopback's 64 KiB. Before: with the default settings (1452-byte
/// datagrams with path MTU discovery) a 1400-byte link passed the handshake and then stalled every
/// transfer until the idle timeout — the kernel fragmented the 1452-byte probe, so ngtcp2 believed
/// the path carried it, and GSO batches of 1452-byte segments were refused whole.
@Suite("QUIC across links with a small MTU (network namespaces)", .serialized, .timeLimit(.minutes(5)))
struct NetnsTests {
    @Test("put and get of 4 MB over HTTP/3, IPv4 and IPv6, with the default datagram settings on a link of this MTU",
          arguments: [1280, 1400, 1500, 9000])
    func quicTransfersFitTheLink(mtu: Int) async throws {
        let ns = try await TestNetns(mtu: mtu)
        defer { ns.remove() }
        let certs = try Certs.shared()
        let bin = try Paths.cachemesh()
        let dir = try TempDir("netns")
        defer { dir.remove() }
        for (host, bracketed) in [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")] {
            let data = dir.file("data-\(host == "::1" ? 6 : 4)")
            let node = try ChildProcess(ns.exec([bin, "node", "--listen", "\(bracketed):9443", "--quic-listen", "\(bracketed):9443",
                                                 "--data-dir", data, "--max-bytes", "64M", "--cert", certs.nodeCert, "--key", certs.nodeKey,
                                                 "--ca", certs.ca]))
            defer { node.killAndWait() }
            let up = await eventually(timeout: 30) { node.stdout.contains("listening quic=") }
            try #require(up, "node in \(ns.name) did not start: \(node.stderr.suffix(1500))")
            let blob = dir.file("blob")
            try await makeRandomFile(blob, size: 4_000_000)
            let hash = try await sha256sum(blob)
            let client = ["--server", "\(bracketed):9443", "--ca", certs.ca, "--cert", certs.path("client.pem"),
                          "--key", certs.path("client.key"), "--transport", "quic"]
            // Bounded well below the 30 s idle timeout a stalled transfer would wait out.
            let put = try await run(ns.exec([bin, "put", blob] + client), timeout: 20)
            #expect(put.status == 0 && put.stdout.hasPrefix("\(hash)/4000000"), "MTU \(mtu) \(host) put: \(put)\n\(node.stderr.suffix(1500))")
            let out = dir.file("got-\(mtu)")
            let get = try await run(ns.exec([bin, "get", hash, "-o", out] + client), timeout: 20)
            #expect(get.status == 0, "MTU \(mtu) \(host) get: \(get)")
            #expect(try await sha256sum(out) == hash)
            try? FileManager.default.removeItem(atPath: out)
        }
    }
}

/// Two mesh nodes in one namespace; UDP between them dropped (nftables) once QUIC carries their
/// traffic. Before: every mirror copy over the dark connection waited out the 30 s idle timeout,
/// then the PUT got 503, again and again.
@Suite("A QUIC connection that goes dark (network namespace, nftables)", .serialized, .timeLimit(.minutes(5)))
struct DarkQUICPathTests {
    @Test("UDP to a mirror target dropped mid-run: PUTs (W = 2) are still acknowledged within seconds, their copies going over TCP")
    func mirrorCopiesSurviveADarkPath() async throws {
        let ns = try await TestNetns(mtu: 1500)
        defer { ns.remove() }
        let certs = try Certs.shared()
        let bin = try Paths.cachemesh()
        let dir = try TempDir("dark")
        defer { dir.remove() }
        let names = ["dark-a", "dark-b"], ports = ["dark-a": 9501, "dark-b": 9502]
        try await NodeCertificates.shared.ensure(names, in: certs.dir)
        var toml = "name = \"dark\"\nca = \"\(certs.ca)\"\nreplication = 2\nwrite_quorum = 2\n[fetch]\ntransport = \"quic\"\n"
        for n in names {
            toml += """

            [[nodes]]
            name = "\(n)"
            tcp = "127.0.0.1:\(ports[n]!)"
            quic = "127.0.0.1:\(ports[n]!)"
            data_dir = "\(dir.file(n))"
            max_bytes = "64M"
            cert = "\(certs.path("\(n).pem"))"
            key = "\(certs.path("\(n).key"))"
            seeds = \(n == "dark-a" ? "[]" : "[\"dark-a\"]")

            """
        }
        try toml.write(toFile: dir.file("topology.toml"), atomically: true, encoding: .utf8)
        var nodes: [String: ChildProcess] = [:]
        defer { for (_, c) in nodes { c.killAndWait() } }
        for n in names {
            nodes[n] = try ChildProcess(ns.exec([bin, "node", "--topology", dir.file("topology.toml"), "--name", n, "--log-level", "info"]))
        }
        let client = ["--server", "127.0.0.1:9501", "--ca", certs.ca, "--cert", certs.path("client.pem"), "--key", certs.path("client.key")]
        func put(_ i: Int) async throws -> (ProcessResult, String) {
            let f = dir.file("blob\(i)")
            try await makeRandomFile(f, size: 1_000_000)
            let hash = try await sha256sum(f)
            // Bounded well below the 30 s idle timeout a copy over the dark path used to wait out.
            return (try await run(ns.exec([bin, "put", f] + client), timeout: 15), hash)
        }
        /// The value of one sample at dark-a (name and labels exactly; 0 if absent).
        func metric(_ name: String, _ labels: [String: String] = [:]) async throws -> Double {
            let r = try await run(ns.exec(["curl", "-sS", "--http2", "--cacert", certs.ca, "--cert", certs.path("client.pem"),
                                           "--key", certs.path("client.key"), "https://127.0.0.1:9501/metrics"]), timeout: 20)
            return try PrometheusText(parsing: r.stdout).samples.first { $0.name == name && $0.labels == labels }?.value ?? 0
        }
        // Both up and members of each other: a PUT with W = 2 succeeds only then.
        var first: (ProcessResult, String)?
        let joined = await eventually(timeout: 40) {
            first = try? await put(0)
            return first?.0.status == 0
        }
        try #require(joined, "no W = 2 PUT before the path went dark: \(String(describing: first?.0))\n\(nodes["dark-a"]!.stderr.suffix(2000))")
        // The copies went over QUIC so far.
        #expect(try await metric("cachemesh_mesh_requests_total", ["transport": "quic"]) > 0)
        #expect(FileManager.default.fileExists(atPath: dir.file("dark-b/cas/\(first!.1.prefix(2))/\(first!.1)")))
        // UDP to and from dark-b is dropped from now on, on arrival (the sender sees no error, as
        // when a router on the way drops it); TCP still works.
        for rule in ["add table inet cmtest", "add chain inet cmtest in { type filter hook input priority 0 ; }",
                     "add rule inet cmtest in udp dport 9502 drop", "add rule inet cmtest in udp sport 9502 drop"] {
            let r = try await run(ns.exec(["nft"] + rule.split(separator: " ").map(String.init)))
            try #require(r.status == 0, "nft \(rule): \(r)")
        }
        for i in 1...4 {
            let (r, hash) = try await put(i)
            #expect(r.status == 0 && r.stdout.hasPrefix(hash), "PUT \(i) over the dark path: \(r)\n\(nodes["dark-a"]!.stderr.suffix(2000))")
            #expect(FileManager.default.fileExists(atPath: dir.file("dark-b/cas/\(hash.prefix(2))/\(hash)")), "copy \(i) missing on dark-b")
        }
        // The dark connection was noticed (not waited out) and the rest went over TCP.
        #expect(nodes["dark-a"]!.stderr.contains("QUIC path went dark"), "\(nodes["dark-a"]!.stderr.suffix(2000))")
        #expect(try await metric("cachemesh_mesh_quic_fallbacks_total") >= 1)
    }
}

/// SwiftNIO closes a UDP socket on most send errors; the node must not lose HTTP/3 for everyone
/// because one destination is refused.
@Suite("HTTP/3 survives a send error on its socket (network namespace, nftables)", .serialized, .timeLimit(.minutes(3)))
struct QUICSendErrorTests {
    @Test("a local firewall refusing the node's answer to one sender (EPERM) does not end HTTP/3: the socket is opened again and put/get over QUIC work")
    func socketReopensAfterASendError() async throws {
        let ns = try await TestNetns(mtu: 1500)
        defer { ns.remove() }
        let certs = try Certs.shared()
        let bin = try Paths.cachemesh()
        let dir = try TempDir("senderr")
        defer { dir.remove() }
        let node = try ChildProcess(ns.exec([bin, "node", "--listen", "127.0.0.1:9443", "--quic-listen", "127.0.0.1:9443",
                                             "--data-dir", dir.file("data"), "--max-bytes", "64M", "--cert", certs.nodeCert,
                                             "--key", certs.nodeKey, "--ca", certs.ca]))
        defer { node.killAndWait() }
        let up = await eventually(timeout: 30) { node.stdout.contains("listening quic=") }
        try #require(up, "\(node.stderr.suffix(1500))")
        // Anything the node sends to UDP port 9999 is refused locally (sendmsg fails with EPERM).
        for rule in ["add table inet cmtest", "add chain inet cmtest out { type filter hook output priority 0 ; }",
                     "add rule inet cmtest out udp dport 9999 drop"] {
            let r = try await run(ns.exec(["nft"] + rule.split(separator: " ").map(String.init)))
            try #require(r.status == 0, "nft \(rule): \(r)")
        }
        // A long-header packet of an unknown version from port 9999: the node answers with
        // Version Negotiation — to port 9999.
        let probe = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 9999))
            pkt = bytes([0xC0]) + bytes.fromhex("1a2a3a4a") + bytes([8]) + b"D" * 8 + bytes([8]) + b"S" * 8
            s.sendto(pkt + b"\\0" * (1200 - len(pkt)), ("127.0.0.1", 9443))
            """
        let sent = try await run(ns.exec(["/usr/bin/python3", "-c", probe]))
        try #require(sent.status == 0, "\(sent)")
        let reopened = await eventually(timeout: 20) { node.stderr.contains("HTTP/3 listening again") }
        #expect(reopened, "\(node.stderr.suffix(2000))")
        #expect(node.stderr.contains("closed by a send error"))
        // HTTP/3 works for everyone else.
        let blob = dir.file("blob")
        try await makeRandomFile(blob, size: 1_000_000)
        let hash = try await sha256sum(blob)
        let client = ["--server", "127.0.0.1:9443", "--ca", certs.ca, "--cert", certs.path("client.pem"),
                      "--key", certs.path("client.key"), "--transport", "quic"]
        let put = try await run(ns.exec([bin, "put", blob] + client), timeout: 20)
        #expect(put.status == 0 && put.stdout.hasPrefix(hash), "\(put)\n\(node.stderr.suffix(1500))")
        let get = try await run(ns.exec([bin, "get", hash, "-o", dir.file("got")] + client), timeout: 20)
        #expect(get.status == 0, "\(get)")
        #expect(try await sha256sum(dir.file("got")) == hash)
    }
}
