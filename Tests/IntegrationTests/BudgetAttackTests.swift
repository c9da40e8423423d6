import BlobStore
import CacheNode
import Foundation
import Testing
import TestSupport

/// The request-body memory budget, per-connection slot shares and the request-headers timeout,
/// each driven by Tests/attacks/h2attack.py against a real node while a normal client works.
@Suite("Body budget, slot shares and head timeouts against a real node", .serialized)
struct BudgetAttackTests {
    static func node(_ dir: TempDir, _ config: String, maxBytes: String = "256M") async throws -> TestNode {
        let path = dir.file("node.toml")
        try config.write(toFile: path, atomically: true, encoding: .utf8)
        return try await TestNode.start(maxBytes: maxBytes, extraArguments: ["--config", path])
    }

    /// 6 connections × 100 PUT streams that send as fast as flow control allows and never
    /// finish. One stream per connection gets a write slot (its share of 8) and streams to disk
    /// (at most its declared 8 MB); every other stream's bytes stay in memory. Without a budget
    /// each of those streams' 256 KiB windows is credited: ~150 MB held.
    @Test("600 upload streams on 6 connections that never finish: the node lets in only its body budget (plus 64 KiB a connection), RSS stays flat, a normal PUT and GET are served during the flood",
          .timeLimit(.minutes(3)))
    func bodyFlood() async throws {
        let dir = try TempDir("body-flood")
        defer { dir.remove() }
        let budget = 4 << 20
        let node = try await Self.node(dir, """
            max_request_body_memory = "4M"
            max_concurrent_writes = 8
            connection_slot_share_percent = 12
            """)
        defer { node.cleanUp() }
        let data = randomBytes(4 << 20)
        let stored = try await withClient(node) { try await $0.put(bytes: data) }
        try await Task.sleep(for: .milliseconds(500))
        let before = try #require(residentBytes(node.pid))

        async let flood = H2Attack.run("body-flood", node: node, ["--connections", "6", "--streams", "100", "--content-length", "8000000", "--hold", "12"],
                                       timeout: 90)
        try await Task.sleep(for: .seconds(4))
        // During the flood: a normal upload on its own connection is stored, a GET is served.
        let honest = randomBytes(2 << 20)
        let (put, got) = try await withClient(node) { c in
            let d = try await c.put(bytes: honest)
            return (d, try await c.fetch("/cas/\(stored.hash)"))
        }
        #expect(put.hash == SHA256.hex(honest))
        #expect(got.status == 200 && got.body == data)
        let peak = residentBytes(node.pid) ?? before
        let outcome = try await flood

        // What the node let in: what each connection may send before it sees our SETTINGS (64
        // KiB), the windows of streams being read (within the budget, or 16 KiB floors), and the
        // slot holders' bytes, which went to disk (at most 8 MB each). Streams waiting for a slot
        // get no window at all. Without the budget: another 99 × 256 KiB per connection (~150 MB).
        let sent = try #require(outcome.sent)
        let metrics = try await withClient(node) { try await $0.metrics() }
        let floors = Int(metrics.value("cachemesh_request_body_budget_floor_grants_total") ?? 0)
        let inMemoryBound = budget + 6 * 65_535 + floors * 16_384
        let bound = inMemoryBound + 6 * 8_000_000
        #expect(sent > 0)
        #expect(floors < 200, "\(floors) floor grants")
        #expect(sent < bound, "the flood got \(sent) bytes in (bound \(bound), \(floors) floor grants)")
        #expect(peak - before < max(48 << 20, inMemoryBound * 3), "RSS grew by \((peak - before) >> 20) MB (in-memory bound \(inMemoryBound >> 20) MB)")
        #expect(metrics.value("cachemesh_request_body_budget_used_bytes") ?? .infinity <= Double(budget))
        // Every stored blob is still there.
        let after = try await withClient(node) { try await $0.fetch("/cas/\(put.hash)") }
        #expect(after.status == 200 && after.body == honest)
    }

    /// 3 connections × 32 uploads that crawl at 24 KB/s (above the minimum rate: never timed
    /// out), each holding a write slot and reading, so each wants a window: 96 × 64 KiB against a
    /// 1 MiB budget. The budget is held by the crawlers for the whole attack; a normal PUT on its
    /// own connection gets a floor window at once (its connection holds nothing) and is stored
    /// while they still hold it. With the floor removed, it waits for a crawler to end.
    @Test("96 slow uploads on 3 connections hold the whole 1 MiB body budget; a normal 2 MiB PUT on another connection is stored while they hold it",
          .timeLimit(.minutes(3)))
    func slowUploadsDoNotStarveAPut() async throws {
        let dir = try TempDir("slow-uploads")
        defer { dir.remove() }
        let node = try await Self.node(dir, """
            max_request_body_memory = "1M"
            max_concurrent_writes = 128
            """)
        defer { node.cleanUp() }
        async let attack = H2Attack.run("body-flood", node: node, ["--connections", "3", "--streams", "32", "--content-length", "8000000",
                                                                   "--rate", "24000", "--hold", "30"], timeout: 90)
        // The crawlers hold the budget and others of theirs wait for it.
        var used = -1.0
        let full = await eventually(timeout: 25) {
            guard let m = try? await withClient(node, .client, { c in try await c.metrics() }) else { return false }
            used = m.value("cachemesh_request_body_budget_used_bytes") ?? -1
            return (m.value("cachemesh_request_body_budget_used_bytes") ?? 0) >= Double(1 << 20)
                && (m.value("cachemesh_request_body_budget_waiting_streams") ?? 0) > 0
        }
        #expect(full, "the crawlers never filled the budget: \(used) used")
        let honest = randomBytes(2 << 20)
        let d = try await withClient(node) { try await $0.put(bytes: honest) }
        #expect(d.hash == SHA256.hex(honest))
        // Still held by the crawlers when the PUT was stored: it did not wait for them.
        let during = try await withClient(node) { try await $0.metrics() }
        #expect((during.value("cachemesh_request_body_budget_waiting_streams") ?? 0) > 0)
        #expect((during.value("cachemesh_request_body_budget_floor_grants_total") ?? 0) >= 1)
        let outcome = try await attack
        #expect(outcome.reset.isEmpty && outcome.status.isEmpty, "crawlers were cut: \(outcome)")
        #expect(node.child.stderr.contains("request-body budget used up"), "\(node.logExcerpt())")
        let got = try await withClient(node) { try await $0.fetch("/cas/\(d.hash)") }
        #expect(got.status == 200 && got.body == honest)
    }

    /// One connection with 64 zero-window GETs against 16 read slots and a stall timeout longer
    /// than the test: without shares it holds all 16 and a normal GET waits a minute.
    @Test("one connection with 64 zero-window GETs holds only its share of the read slots; a normal GET on another connection is served at once",
          .timeLimit(.minutes(3)))
    func readSlotShare() async throws {
        let dir = try TempDir("read-share")
        defer { dir.remove() }
        let node = try await Self.node(dir, "max_open_reads = 16\nresponse_stall_timeout_seconds = 120\n")
        defer { node.cleanUp() }
        let data = randomBytes(4 << 20)
        let d = try await withClient(node) { try await $0.put(bytes: data) }

        async let attack = H2Attack.run("zero-window", node: node, ["--path", "/cas/\(d.hash)", "--streams", "64", "--hold", "15"], timeout: 60)
        try await Task.sleep(for: .seconds(2))
        // Served while the attacker holds its share (4 of 16): the attack holds for 15 s, the stall
        // timeout is 120 s, so only free slots can serve this.
        let started = ContinuousClock.now
        let got = try await withClient(node) { try await $0.fetch("/cas/\(d.hash)") }
        let waited = ContinuousClock.now - started
        #expect(got.status == 200 && got.body == data)
        let metrics = try await withClient(node) { try await $0.metrics() }
        let outcome = try await attack
        #expect(waited < .seconds(12), "the normal GET waited \(waited)")
        #expect(outcome.reset.isEmpty, "the attack's streams were not reset by the stall timeout: \(outcome)")
        #expect((metrics.value("cachemesh_store_slot_share_waits_total", labels: ["kind": "read"]) ?? 0) >= 1)
        #expect(node.child.stderr.contains("holds its share of the read slots"), "\(node.logExcerpt())")
    }

    /// One connection with 40 uploads that send a little and then stall, against 8 write slots:
    /// without shares it takes all 8 and a normal PUT waits for the body timeout.
    @Test("one connection with 40 stalled uploads holds only its share of the write slots; a normal PUT on another connection is stored at once",
          .timeLimit(.minutes(3)))
    func writeSlotShare() async throws {
        let dir = try TempDir("write-share")
        defer { dir.remove() }
        let node = try await Self.node(dir, "max_concurrent_writes = 8\nrequest_body_timeout_seconds = 60\nrequest_body_min_rate = 0\n")
        defer { node.cleanUp() }
        let kept = randomBytes(1 << 20)
        let k = try await withClient(node) { try await $0.put(bytes: kept) }

        async let attack = H2Attack.run("body-flood", node: node, ["--connections", "1", "--streams", "40", "--content-length", "1000000", "--hold", "25"],
                                        timeout: 60)
        try await Task.sleep(for: .seconds(2))
        let started = ContinuousClock.now
        let honest = randomBytes(1 << 20)
        let d = try await withClient(node) { try await $0.put(bytes: honest) }
        let waited = ContinuousClock.now - started
        #expect(d.hash == SHA256.hex(honest))
        let metrics = try await withClient(node) { try await $0.metrics() }
        _ = try await attack
        #expect(waited < .seconds(12), "the normal PUT waited \(waited)")
        #expect((metrics.value("cachemesh_store_slot_share_waits_total", labels: ["kind": "write"]) ?? 0) >= 1)
        let still = try await withClient(node) { try await $0.fetch("/cas/\(k.hash)") }
        #expect(still.status == 200 && still.body == kept)
    }

    @Test("request heads that never finish: HTTP/2 HEADERS without END_HEADERS (silent, or a CONTINUATION trickle) and an HTTP/1.1 head a byte a second are cut after the headers timeout, long before the idle timeout",
          .timeLimit(.minutes(3)))
    func partialHeads() async throws {
        let dir = try TempDir("partial-heads")
        defer { dir.remove() }
        let node = try await Self.node(dir, "request_headers_timeout_seconds = 2\n")
        defer { node.cleanUp() }
        let data = randomBytes(1 << 20)
        let d = try await withClient(node) { try await $0.put(bytes: data) }

        async let silent = H2Attack.run("partial-headers", node: node, ["--hold", "15"])
        async let trickle = H2Attack.run("partial-headers", node: node, ["--hold", "15", "--trickle", "0.5"])
        async let h1 = H2Attack.run("partial-head-h1", node: node, ["--hold", "15", "--trickle", "0.5"])
        // Served meanwhile.
        let got = try await withClient(node) { try await $0.fetch("/cas/\(d.hash)") }
        #expect(got.status == 200 && got.body == data)
        for r in try await [silent, trickle] {
            #expect(r.closed != nil && (r.after ?? 99) < 8, "\(r)")
            #expect(r.goaway == nil || r.goaway == 0xb, "\(r)")
        }
        let r1 = try await h1
        #expect(r1.closed != nil && (r1.after ?? 99) < 8, "\(r1)")
        #expect(r1.status.values.first == 408, "\(r1)")
        let metrics = try await withClient(node) { try await $0.metrics() }
        #expect(metrics.value("cachemesh_http_refused_total", labels: ["reason": "request_headers_timeout", "transport": "h2"]) == 2)
        #expect(metrics.value("cachemesh_http_refused_total", labels: ["reason": "request_headers_timeout", "transport": "http1"]) == 1)
        #expect(node.child.stderr.contains("HTTP/2 request headers not complete in time"), "\(node.logExcerpt())")
    }
}
