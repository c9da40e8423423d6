import ArgumentParser
import BlobStore
import CacheNode
import MeshShell
import CacheMeshClient
import Foundation
import Histogram
import MeshHTTP
import Synchronization

/// The driver of bench/mesh-bench.sh: GET a list of blobs (like a build asking for its inputs),
/// verify every body's SHA-256, and record per-request latency in an HdrHistogram per blob class.
/// Prints one JSON object (latency percentiles per class, raw latencies for CDFs, source counts).
///
/// The hashes file has one blob per line: `CLASS HASH SIZE [TARGET]`, TARGET a host:port to GET
/// it from (default: --server). Lines starting with `#` are skipped.
struct BenchMeshDriverCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-mesh-driver",
        abstract: "Fetch a list of blobs from a node (or straight from holders), verify them, print latency per class as JSON.", shouldDisplay: false)

    @Option(help: "File with one blob per line: CLASS HASH SIZE [TARGET host:port].") var hashes: String
    @Option(help: "Requests in flight at once (1 = sequential, like a serial build step).") var concurrency: Int = 1
    @Flag(help: "Send x-cachemesh-hop: 1 (the node answers from its own store only: a direct fetch).") var hop = false
    @Option(help: "Label copied into the JSON output.") var label: String = ""
    @Option(help: "Warm-up GET /healthz per connection before timing.") var warmup: Int = 3
    @Option(name: .customLong("request-timeout"), help: "Seconds before a request counts as failed (and is cancelled).") var requestTimeout: Double = 30
    @Option(name: .customLong("put-from"), help: "Instead of fetching: PUT every listed blob (the file DIR/HASH) to its TARGET as a mirror copy (x-cachemesh-mirror: 1; needs a node certificate), so it lands on exactly that node.") var putFrom: String?
    @OptionGroup var client: ClientFlags

    struct Item: Sendable {
        var cls: String
        var hash: String
        var size: Int64
        var target: String?
    }

    struct Outcome: Sendable {
        var index: Int
        var nanos: UInt64
        var bytes: Int64
        var verified: Bool
        var source: String
        var error: String?
    }

    func validate() throws {
        if concurrency < 1 { throw ValidationError("--concurrency must be at least 1") }
    }

    func run() async throws {
        bootstrapLogging(client.logLevel)
        tuneAllocator()
        let items = try Self.parse(hashes)
        guard !items.isEmpty else { throw CLIError("\(hashes): no blobs listed") }
        let base = try client.options()

        // One connection per target, opened and warmed before the clock starts.
        var targets: [String: CacheClient] = [:]
        for key in Set(items.map { $0.target ?? "" }) {
            var o = base
            if !key.isEmpty {
                guard let hp = HostPort(key) else { throw CLIError("target '\(key)' is not host:port") }
                o.server = hp
            }
            let c: CacheClient
            do { c = try await CacheClient.connect(o) } catch { throw CLIError("cannot connect to \(o.server): \(error)") }
            for _ in 0..<warmup { _ = try? await c.getText("/healthz") }
            targets[key] = c
        }
        let clients = targets
        if let dir = putFrom {
            try await place(items, from: dir, clients: clients)
            return
        }
        let hop = self.hop
        let timeout = Duration.milliseconds(Int64(requestTimeout * 1000))
        let next = NextIndex()
        let start = ContinuousClock.now
        let outcomes = try await withThrowingTaskGroup(of: [Outcome].self) { group in
            for _ in 0..<min(concurrency, items.count) {
                group.addTask {
                    var out: [Outcome] = []
                    while let i = next.take(items.count) {
                        out.append(await Self.fetch(items[i], index: i, client: clients[items[i].target ?? ""]!, hop: hop, timeout: timeout))
                    }
                    return out
                }
            }
            var all: [Outcome] = []
            for try await o in group { all += o }
            return all.sorted { $0.index < $1.index }
        }
        let elapsed = ContinuousClock.now - start
        for c in clients.values { await c.close() }
        print(Self.report(items: items, outcomes: outcomes, elapsed: elapsed, label: label, concurrency: concurrency, hop: hop))
    }

    /// Placement (set-up, not measured): mirror-copy PUTs, `concurrency` at a time.
    func place(_ items: [Item], from dir: String, clients: [String: CacheClient]) async throws {
        let next = NextIndex()
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Int64.self) { group in
            for _ in 0..<min(concurrency, items.count) {
                group.addTask {
                    var n: Int64 = 0
                    while let i = next.take(items.count) {
                        let item = items[i]
                        let c = clients[item.target ?? ""]!
                        let src = try FileSource(path: "\(dir)/\(item.hash)")
                        let r = try await c.connection.request(
                            HTTPRequestHead(method: "PUT", path: "/cas/\(item.hash)",
                                            headers: ["content-length": String(src.length), Mirror.header: "1"]),
                            body: .file(src))
                        _ = try? await r.body.collect(upTo: 1 << 16)
                        guard r.status == 200 || r.status == 201 else {
                            throw CLIError("PUT \(item.hash) to \(item.target ?? "server"): HTTP \(r.status)")
                        }
                        n += src.length
                    }
                    return n
                }
            }
            var bytes: Int64 = 0
            for try await b in group { bytes += b }
            let took = ContinuousClock.now - start
            print("{\"placed\": \(items.count), \"bytes\": \(bytes), \"elapsed_s\": \(Double(took.components.seconds) + Double(took.components.attoseconds) / 1e18)}")
        }
        for c in clients.values { await c.close() }
    }

    static func parse(_ path: String) throws -> [Item] {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch { throw CLIError("cannot read \(path): \(error)") }
        var items: [Item] = []
        for (n, line) in text.split(separator: "\n").enumerated() {
            let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            if f.isEmpty || f[0].hasPrefix("#") { continue }
            guard f.count >= 3, Digest.isValidHash(f[1]), let size = Int64(f[2]) else {
                throw CLIError("\(path):\(n + 1): expected CLASS HASH SIZE [TARGET]")
            }
            items.append(Item(cls: f[0], hash: f[1], size: size, target: f.count > 3 && f[3] != "-" ? f[3] : nil))
        }
        return items
    }

    /// One GET, failed (and cancelled) after `timeout`: a stalled fetch is recorded, not waited for.
    static func fetch(_ item: Item, index: Int, client: CacheClient, hop: Bool, timeout: Duration) async -> Outcome {
        let t0 = ContinuousClock.now
        let once = Once()
        // Unstructured on purpose: a request stuck in the node may not honour cancellation, and
        // waiting for it (as a task group would) would stall the whole run.
        return await withCheckedContinuation { (c: CheckedContinuation<Outcome, Never>) in
            let work = Task {
                let o = await fetch(item, index: index, client: client, hop: hop)
                if once.claim() { c.resume(returning: o) }
            }
            Task {
                try? await Task.sleep(for: timeout)
                guard once.claim() else { return }
                work.cancel()
                let took = ContinuousClock.now - t0
                let ns = UInt64(took.components.seconds) * 1_000_000_000 + UInt64(took.components.attoseconds / 1_000_000_000)
                c.resume(returning: Outcome(index: index, nanos: ns, bytes: 0, verified: false, source: "timeout",
                                            error: "no complete response within \(timeout)"))
            }
        }
    }

    static func fetch(_ item: Item, index: Int, client: CacheClient, hop: Bool) async -> Outcome {
        var headers: HTTPHeaders = [:]
        if hop { headers.add(BlobFetcher.hopHeader, "1") }
        let t0 = ContinuousClock.now
        var hasher = SHA256Hasher()
        var n: Int64 = 0
        do {
            let r = try await client.connection.request(HTTPRequestHead(method: "GET", path: "/cas/\(item.hash)", headers: headers))
            let source = r.headers["x-cachemesh-source"] ?? "-"
            for try await chunk in r.body {
                chunk.withUnsafeReadableBytes { hasher.update($0) }
                n += Int64(chunk.readableBytes)
            }
            let took = ContinuousClock.now - t0
            let ns = UInt64(took.components.seconds) * 1_000_000_000 + UInt64(took.components.attoseconds / 1_000_000_000)
            guard r.status == 200 else {
                return Outcome(index: index, nanos: ns, bytes: n, verified: false, source: source, error: "HTTP \(r.status)")
            }
            let ok = hasher.finalize() == item.hash && n == item.size
            return Outcome(index: index, nanos: ns, bytes: n, verified: ok, source: source,
                           error: ok ? nil : "body of \(n) bytes does not hash to \(item.hash)")
        } catch {
            let took = ContinuousClock.now - t0
            let ns = UInt64(took.components.seconds) * 1_000_000_000 + UInt64(took.components.attoseconds / 1_000_000_000)
            return Outcome(index: index, nanos: ns, bytes: n, verified: false, source: "error", error: "\(error)")
        }
    }

    static func report(items: [Item], outcomes: [Outcome], elapsed: Duration, label: String, concurrency: Int, hop: Bool) -> String {
        let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        var classes: [String: [Outcome]] = [:]
        for o in outcomes { classes[items[o.index].cls, default: []].append(o) }
        var perClass: [String: Any] = [:]
        for (cls, os) in classes {
            // Microseconds, 1 µs .. 1 h, 3 significant digits.
            var h = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 3_600_000_000, numberOfSignificantValueDigits: .three)
            for o in os where o.verified { _ = h.record(max(1, o.nanos / 1000)) }
            func ms(_ p: Double) -> Double { h.totalCount == 0 ? 0 : Double(h.valueAtPercentile(p)) / 1000 }
            var sources: [String: Int] = [:]
            for o in os { sources[o.source, default: 0] += 1 }
            perClass[cls] = [
                "count": os.count,
                "verified": os.filter(\.verified).count,
                "bytes": os.reduce(Int64(0)) { $0 + $1.bytes },
                "p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99), "max_ms": h.totalCount == 0 ? 0 : Double(h.max) / 1000,
                "mean_ms": h.totalCount == 0 ? 0 : h.mean / 1000,
                "sources": sources,
                "latencies_ms": os.map { (Double($0.nanos) / 1e6 * 1000).rounded() / 1000 },
            ]
        }
        var sources: [String: Int] = [:]
        for o in outcomes { sources[o.source, default: 0] += 1 }
        let bytes = outcomes.reduce(Int64(0)) { $0 + $1.bytes }
        let errors = outcomes.compactMap { o in o.error.map { "\(items[o.index].hash.prefix(12)): \($0)" } }
        let doc: [String: Any] = [
            "label": label,
            "hop": hop,
            "concurrency": concurrency,
            "requests": outcomes.count,
            "verified": outcomes.filter(\.verified).count,
            "bytes": bytes,
            "elapsed_s": secs,
            "mib_per_s": secs > 0 ? Double(bytes) / 1_048_576 / secs : 0,
            "sources": sources,
            "classes": perClass,
            "errors": Array(errors.prefix(20)),
        ]
        let data = (try? JSONSerialization.data(withJSONObject: doc, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}

/// Hands out list indices to the workers, in order.
final class NextIndex: Sendable {
    private let next = Mutex(0)
    func take(_ count: Int) -> Int? {
        next.withLock { i in
            guard i < count else { return nil }
            defer { i += 1 }
            return i
        }
    }
}

/// True for the first caller only.
final class Once: Sendable {
    private let done = Mutex(false)
    func claim() -> Bool {
        done.withLock { done in
            if done { return false }
            done = true
            return true
        }
    }
}
