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

    func remove() {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.ip)
        p.arguments = ["netns", "delete", name]
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
