import BlobStore
import CacheNode
import CacheRoutes
import Foundation
import Testing
import TestSupport

/// Test hosts on a LAN of the test's own: one network namespace per host, each with an `eth0`
/// veth whose other end is a port of a bridge in a "switch" namespace, addresses `10.77.0.N/24`,
/// every link at `mtu`. Unlike a single namespace's loopback, packets cross real (virtual)
/// links: the MTU is that of a NIC, the bridge forwards frames, and a firewall on one host
/// drops what one other host sends while the rest of the LAN works. Removed by `remove()`.
final class TestLAN: @unchecked Sendable {
    static let ip = TestNetns.ip
    let prefix: String
    let hosts: Int

    init(hosts: Int, mtu: Int) async throws {
        prefix = "cmlan-\(getpid() % 100_000)-\(UInt16.random(in: 0...UInt16.max))"
        self.hosts = hosts
        do {
            try await Self.must([Self.ip, "netns", "add", "\(prefix)-sw"])
            try await Self.must([Self.ip, "-n", "\(prefix)-sw", "link", "add", "br0", "mtu", "\(mtu)", "type", "bridge"])
            try await Self.must([Self.ip, "-n", "\(prefix)-sw", "link", "set", "br0", "up"])
            for h in 1...hosts {
                let ns = namespace(h)
                try await Self.must([Self.ip, "netns", "add", ns])
                try await Self.must([Self.ip, "-n", ns, "link", "add", "eth0", "mtu", "\(mtu)", "type", "veth",
                                     "peer", "name", "port\(h)", "mtu", "\(mtu)", "netns", "\(prefix)-sw"])
                try await Self.must([Self.ip, "-n", "\(prefix)-sw", "link", "set", "port\(h)", "master", "br0", "up"])
                try await Self.must([Self.ip, "-n", ns, "addr", "add", "\(address(h))/24", "dev", "eth0"])
                try await Self.must([Self.ip, "-n", ns, "link", "set", "eth0", "up"])
                try await Self.must([Self.ip, "-n", ns, "link", "set", "lo", "up"])
            }
        } catch {
            remove()
            throw error
        }
    }

    func namespace(_ host: Int) -> String { "\(prefix)-h\(host)" }
    func address(_ host: Int) -> String { "10.77.0.\(host)" }

    /// `arguments` run on `host` (`ip netns exec` execs them: same PID).
    func exec(_ host: Int, _ arguments: [String]) -> [String] { [Self.ip, "netns", "exec", namespace(host)] + arguments }

    /// Drops UDP between `host` and `other`, both ways, at `host` (as a firewall or a router on the
    /// way would: the sender sees no error).
    func dropUDP(at host: Int, from other: Int) async throws {
        for rule in ["add table inet cmlan", "add chain inet cmlan in { type filter hook input priority 0 ; }",
                     "add chain inet cmlan out { type filter hook output priority 0 ; }",
                     "add rule inet cmlan in ip saddr \(address(other)) meta l4proto udp drop",
                     "add rule inet cmlan out ip daddr \(address(other)) meta l4proto udp drop"] {
            try await Self.must(exec(host, ["nft"] + rule.split(separator: " ").map(String.init)))
        }
    }

    func remove() {
        for name in (1...max(1, hosts)).map(namespace) + ["\(prefix)-sw"] { TestNetns.delete(name) }
    }

    private static func must(_ arguments: [String]) async throws {
        let r = try await run(arguments, timeout: 20)
        guard r.status == 0 else { throw HarnessError("\(arguments.joined(separator: " ")): \(r)") }
    }
}

/// An origin and two peers on three hosts of a bridged LAN (issue 12): mTLS, R = 2, W = 2, the
/// mesh preferring QUIC, default datagram settings. On every MTU a write is mirrored across the
/// LAN and a host without a copy fetches it over QUIC; then UDP between the two peers' hosts is
/// dropped mid-run and writes and fetches between them still succeed within seconds.
@Suite("A mesh across hosts on a bridged LAN (network namespaces, veth, bridge)", .serialized, .timeLimit(.minutes(6)))
struct LANTests {
    @Test("writes mirrored and fetched across the LAN at this MTU, and after UDP between two hosts is dropped", arguments: [1400, 1500, 9000])
    func meshAcrossTheLAN(mtu: Int) async throws {
        let lan = try await TestLAN(hosts: 3, mtu: mtu)
        defer { lan.remove() }
        let certs = try Certs.shared()
        let bin = try Paths.cachemesh()
        let dir = try TempDir("lan")
        defer { dir.remove() }
        let names = ["lan-origin", "lan-a", "lan-b"]   // on hosts 1, 2, 3
        for (i, n) in names.enumerated() {
            let r = try await run(["/bin/bash", "\(Paths.packageRoot)/certs/mkcerts.sh", "-o", certs.dir, "node", n, "--ip", lan.address(i + 1)])
            try #require(r.status == 0, "mkcerts node \(n): \(r)")
        }
        var toml = "name = \"lan\"\nca = \"\(certs.ca)\"\nreplication = 2\nwrite_quorum = 2\n[fetch]\ntransport = \"quic\"\n"
        for (i, n) in names.enumerated() {
            toml += """

            [[nodes]]
            name = "\(n)"
            role = "\(i == 0 ? "origin" : "peer")"
            tcp = "\(lan.address(i + 1)):9443"
            quic = "\(lan.address(i + 1)):9443"
            data_dir = "\(dir.file(n))"
            max_bytes = "128M"
            cert = "\(certs.path("\(n).pem"))"
            key = "\(certs.path("\(n).key"))"
            seeds = \(i == 0 ? "[]" : "[\"lan-origin\"]")

            """
        }
        try toml.write(toFile: dir.file("topology.toml"), atomically: true, encoding: .utf8)
        var nodes: [Int: ChildProcess] = [:]
        defer { for (_, c) in nodes { c.killAndWait() } }
        for (i, n) in names.enumerated() {
            nodes[i + 1] = try ChildProcess(lan.exec(i + 1, [bin, "node", "--topology", dir.file("topology.toml"), "--name", n, "--log-level", "info"]))
        }
        func logs() -> String { nodes.keys.sorted().map { "--- \(names[$0 - 1])\n\(nodes[$0]!.stderr.suffix(1500))" }.joined(separator: "\n") }
        /// A client on `host`, talking to the node on that host.
        func client(_ host: Int) -> [String] {
            ["--server", "\(lan.address(host)):9443", "--ca", certs.ca, "--cert", certs.path("client.pem"), "--key", certs.path("client.key")]
        }
        var count = 0
        /// A fresh 3 MB blob written at the node on `host` (W = 2: acknowledged once a second copy is
        /// on another host), whose two owners are `owners` if given.
        func put(at host: Int, ownedBy owners: Set<String>? = nil) async throws -> (ProcessResult, String) {
            count += 1
            let f = dir.file("blob\(count)")
            var bytes = randomBytes(3_000_000)
            while let owners, Set(PlacementOracle.owners(of: SHA256.hex(bytes), among: names, replicas: 2)) != owners { bytes = randomBytes(3_000_000) }
            try Data(bytes).write(to: URL(fileURLWithPath: f))
            let hash = try await sha256sum(f)
            // Bounded well below the 30 s idle timeout a stalled QUIC transfer would wait out.
            return (try await run(lan.exec(host, [bin, "put", f] + client(host)), timeout: 15), hash)
        }
        /// GET of `hash` at the node on `host`; true if the bytes hash right.
        func get(_ hash: String, at host: Int) async throws -> Bool {
            let out = dir.file("got-\(hash.prefix(8))-\(host)")
            defer { try? FileManager.default.removeItem(atPath: out) }
            let r = try await run(lan.exec(host, [bin, "get", hash, "-o", out] + client(host)), timeout: 15)
            guard r.status == 0 else { Issue.record("GET \(hash) at host \(host): \(r)\n\(logs())"); return false }
            return try await sha256sum(out) == hash
        }
        func holders(_ hash: String) -> [Int] {
            (1...3).filter { FileManager.default.fileExists(atPath: dir.file("\(names[$0 - 1])/cas/\(hash.prefix(2))/\(hash)")) }
        }
        /// One sample (name and labels exactly; 0 if absent) of the node on `host`.
        func metric(_ name: String, _ labels: [String: String] = [:], at host: Int) async throws -> Double {
            let r = try await run(lan.exec(host, ["curl", "-sS", "--fail", "--http2", "--cacert", certs.ca, "--cert", certs.path("client.pem"),
                                                  "--key", certs.path("client.key"), "https://\(lan.address(host)):9443/metrics"]), timeout: 20)
            guard r.status == 0 else { throw HarnessError("metrics at host \(host): \(r)") }
            return try PrometheusText(parsing: r.stdout).samples.first { $0.name == name && $0.labels == labels }?.value ?? 0
        }

        /// Live members in the view of the node on `host` (its `/status`, asked with a client certificate).
        func alive(at host: Int) async throws -> Int {
            let r = try await run(lan.exec(host, ["curl", "-sS", "--fail", "--http2", "--cacert", certs.ca, "--cert", certs.path("client.pem"),
                                                  "--key", certs.path("client.key"), "https://\(lan.address(host)):9443/status"]), timeout: 20)
            guard r.status == 0 else { return 0 }   // not listening yet
            let status = try NodeStatus.decoder().decode(NodeStatus.self, from: Data(r.stdout.utf8))
            return status.mesh?.members?.filter { $0.status == "alive" }.count ?? 0
        }
        // Every node sees all three alive (the nodes start in any order; a node whose seed is not
        // up yet asks again).
        for host in 1...3 {
            var seen = 0
            let joined = try await eventually(timeout: 40) { seen = try await alive(at: host); return seen == 3 }
            try #require(joined, "host \(host) sees \(seen) of 3 alive (MTU \(mtu))\n\(logs())")
        }
        // A W = 2 write at host 2 is acknowledged only with a copy on another host.
        var first: (ProcessResult, String)?
        let joined = await eventually(timeout: 40) {
            first = try? await put(at: 2)
            return first?.0.status == 0
        }
        try #require(joined, "no W = 2 PUT across the LAN (MTU \(mtu)): \(String(describing: first?.0))\n\(logs())")
        #expect(holders(first!.1).count >= 2, "copies of the first blob: hosts \(holders(first!.1))")
        #expect(try await metric("cachemesh_mesh_requests_total", ["transport": "quic"], at: 2) > 0, "no mesh request went over QUIC from host 2 (MTU \(mtu))")
        // Every host reads it, fetching across the LAN where it has no copy.
        for host in 1...3 { #expect(try await get(first!.1, at: host), "MTU \(mtu): host \(host)") }
        #expect(holders(first!.1).count == 3)

        // UDP between the peers' hosts (2 and 3) dropped from now on; TCP and the origin's UDP work.
        // Blobs owned by the two peers: a write at host 2 is acknowledged only once its copy
        // crossed to host 3, which QUIC can no longer reach.
        try await lan.dropUDP(at: 3, from: 2)
        for round in 1...3 {
            let (r, hash) = try await put(at: 2, ownedBy: ["lan-a", "lan-b"])
            #expect(r.status == 0 && r.stdout.hasPrefix(hash), "MTU \(mtu), PUT \(round) after UDP 2↔3 dropped: \(r)\n\(logs())")
            #expect(holders(hash).contains(3), "MTU \(mtu): copy \(round) missing on host 3")
            #expect(try await get(hash, at: 3), "MTU \(mtu), GET \(round) at host 3 after UDP 2↔3 dropped")
        }
        #expect(try await metric("cachemesh_mesh_quic_fallbacks_total", at: 2) >= 1, "host 2 never fell back to TCP for host 3")
    }
}
