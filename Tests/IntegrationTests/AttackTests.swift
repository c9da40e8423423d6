import CacheNode
import Foundation
import MeshHTTP
import MeshQUIC
import NIOCore
import Testing
import TestSupport

/// Resident memory of a process in bytes (VmRSS), nil if it is gone.
func residentBytes(_ pid: Int32) -> Int? {
    guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
          let kb = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") else { return nil }
    return kb * 1024
}

/// Tests/attacks/h2attack.py with Debian's python3 (python3-h2), parsed.
struct H2Attack {
    static var script: String { "\(Paths.packageRoot)/Tests/attacks/h2attack.py" }

    struct Outcome: Decodable {
        var status: [String: Int]
        var reset: [String: Int]
        var goaway: Int?
        var closed: String?
        var wire_bytes: Int?
    }

    static func run(_ attack: String, node: TestNode, as who: Identity = .client, _ extra: [String] = [], timeout: Double = 60) async throws -> Outcome {
        var args = ["/usr/bin/python3", script, attack, "--port", String(node.port), "--ca", node.certs.ca]
        if who != .anonymous { args += ["--cert", node.certs.path("\(who.rawValue).pem"), "--key", node.certs.path("\(who.rawValue).key")] }
        let r = try await IntegrationTests.run(args + extra, timeout: timeout)
        guard r.status == 0, let line = r.stdout.split(separator: "\n").last else { throw HarnessError("\(attack): \(r)") }
        return try JSONDecoder().decode(Outcome.self, from: Data(line.utf8))
    }
}

@Suite("Attacks against a real node", .serialized)
struct AttackTests {
    /// 30,000 copies of one 4,000-byte header per request: ~33 KB of HPACK on the wire, 120 MB
    /// decoded. Before the limit was counted, 128 KB of HPACK took +432 MB of RSS per connection.
    @Test("HPACK header bombs on four HTTP/2 connections: 431, then GOAWAY ENHANCE_YOUR_CALM; RSS stays flat; a client is served during the attack",
          .timeLimit(.minutes(3)))
    func hpackBomb() async throws {
        let node = try await TestNode.start(allowUnauthenticatedReads: true)
        defer { node.cleanUp() }
        let client = try await node.client()
        let data = randomBytes(4 << 20)
        let stored = try await client.put(bytes: data)
        let before = try #require(residentBytes(node.pid))

        let attackers = [Identity.client, .client, .anonymous, .anonymous]
        async let outcomes = withThrowingTaskGroup(of: H2Attack.Outcome.self) { group in
            for who in attackers { group.addTask { try await H2Attack.run("header-bomb", node: node, as: who, ["--streams", "3"]) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        // A legitimate client during the attack: a 4 MiB GET, verified.
        var served = 0
        var peak = before
        for _ in 0..<5 {
            let out = node.dataDir + "-get"
            _ = try await client.get(hash: stored.hash, to: out)
            if try await sha256sum(out) == stored.hash { served += 1 }
            try? FileManager.default.removeItem(atPath: out)
            peak = max(peak, residentBytes(node.pid) ?? 0)
        }
        let results = try await outcomes
        peak = max(peak, residentBytes(node.pid) ?? 0)
        await client.close()

        #expect(served == 5)
        #expect(results.count == attackers.count)
        for r in results {
            // Two requests answered 431, the third closes the connection.
            #expect(r.status.values.sorted() == [431, 431], "\(r)")
            #expect(r.goaway == 0xb, "\(r)")
            #expect((r.wire_bytes ?? 0) < 200_000, "the bomb is small on the wire: \(r)")
        }
        let grown = peak - before
        #expect(grown < 64 << 20, "RSS grew by \(grown >> 20) MB (before \(before >> 20) MB, peak \(peak >> 20) MB)")
        // Still serving afterwards, and the stored blob is intact.
        try await withClient(node) { c in
            let metrics = try await c.metrics()
            #expect(metrics.value("cachemesh_http_refused_total", labels: ["reason": "header_list_too_large", "transport": "h2"]) == Double(attackers.count * 3))
            let after = try await c.fetch("/cas/\(stored.hash)")
            #expect(after.status == 200 && after.body == data)
        }
        #expect(node.child.stderr.contains("HTTP/2 request header list too large"), "\(node.logExcerpt())")
    }

    /// The same over HTTP/3 with our own client: a header list beyond the limit gets 431, the
    /// third on one connection closes it with H3_EXCESSIVE_LOAD; other connections are served.
    @Test("oversized HTTP/3 header lists: 431, then the connection is closed; another connection is served",
          .timeLimit(.minutes(2)))
    func qpackOversized() async throws {
        let node = try await TestNode.start(quic: true)
        defer { node.cleanUp() }
        var options = ClientOptions(server: HostPort(host: "127.0.0.1", port: node.quicPort!), certificate: node.certs.path("client.pem"),
                                    privateKey: node.certs.path("client.key"), ca: node.certs.ca)
        options.transport = .quic
        let attacker = try await CacheClient.connect(options)
        var head = HTTPRequestHead(method: "GET", path: "/cas/\(String(repeating: "0", count: 64))")
        for i in 0..<40 { head.headers.add("x-bomb-\(i)", String(repeating: "v", count: 2000)) }
        var statuses: [Int] = []
        var failure: (any Error)?
        for _ in 0..<3 {
            do {
                let r = try await attacker.connection.request(head)
                statuses.append(r.status)
                let text = String(buffer: try await r.body.collect(upTo: 1 << 16))
                if r.status == 431 { #expect(text.contains("max_header_list_bytes"), "\(text)") }
            } catch {
                failure = error
                break
            }
        }
        #expect(statuses.prefix(2) == [431, 431], "\(statuses)")
        // The third gets no answer: the connection closes (H3_EXCESSIVE_LOAD).
        let closed = await eventually(timeout: 5) { (attacker.connection as? HTTP3Connection)?.closeReason != nil }
        #expect(failure != nil || statuses.count < 3 || closed, "statuses \(statuses), failure \(String(describing: failure))")
        await attacker.close()

        let good = try await CacheClient.connect(options)
        let d = try await good.put(bytes: randomBytes(100_000))
        let r = try await good.connection.request(HTTPRequestHead(method: "GET", path: "/cas/\(d.hash)"))
        #expect(r.status == 200)
        _ = try await r.body.collect(upTo: 1 << 20)
        let metrics = try await good.metrics()
        await good.close()
        #expect(metrics.value("cachemesh_http_refused_total", labels: ["reason": "header_list_too_large", "transport": "h3"]) == 3)
        #expect(node.child.stderr.contains("HTTP/3 request header list too large"), "\(node.logExcerpt())")
    }
}
