import ArgumentParser
import CacheNode
import Foundation
import MeshHTTP

/// Fetch one path repeatedly over HTTP/2 or HTTP/3 and print latency percentiles and throughput
/// (the driver for bench/h3-vs-h2.sh; gtlsclient is timer-bound and not a latency baseline).
struct BenchFetchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-fetch", abstract: "Benchmark GETs of one path (latency p50/p99 and throughput).", shouldDisplay: false)

    @Option(help: "Path to GET, e.g. /cas/<sha256>.") var path: String
    @Option(help: "Requests in all.") var count: Int = 1000
    @Option(help: "Requests in flight at once (one connection).") var concurrency: Int = 1
    @Option(help: "Expected body size (checked on every response).") var size: Int64
    @OptionGroup var client: ClientFlags

    func run() async throws {
        let c = try await client.connect()
        defer { Task { await c.close() } }
        let transport = c.connection
        // Warm up (connection, windows, caches).
        for _ in 0..<min(20, count) { _ = try await fetch(transport) }
        let start = ContinuousClock.now
        var latencies: [Duration] = []
        try await withThrowingTaskGroup(of: [Duration].self) { group in
            let per = count / concurrency
            for _ in 0..<concurrency {
                group.addTask {
                    var out: [Duration] = []
                    for _ in 0..<per {
                        let t = ContinuousClock.now
                        _ = try await fetch(transport)
                        out.append(ContinuousClock.now - t)
                    }
                    return out
                }
            }
            for try await l in group { latencies += l }
        }
        let elapsed = ContinuousClock.now - start
        latencies.sort()
        func ms(_ d: Duration) -> Double { Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15 }
        let p50 = ms(latencies[latencies.count / 2]), p99 = ms(latencies[min(latencies.count - 1, latencies.count * 99 / 100)])
        let secs = ms(elapsed) / 1000
        let mbps = Double(latencies.count) * Double(size) / secs / 1_048_576
        print(String(format: "transport=%@ requests=%d concurrency=%d p50_ms=%.3f p99_ms=%.3f req_per_s=%.1f MiB_per_s=%.1f",
                     client.transport.rawValue, latencies.count, concurrency, p50, p99, Double(latencies.count) / secs, mbps))
    }

    func fetch(_ t: any HTTPClientTransport) async throws -> Int64 {
        let r = try await t.request(HTTPRequestHead(method: "GET", path: path))
        var n: Int64 = 0
        for try await chunk in r.body { n += Int64(chunk.readableBytes) }
        guard r.status == 200, n == size else { throw CLIError("GET \(path): status \(r.status), \(n) of \(size) bytes") }
        return n
    }
}
