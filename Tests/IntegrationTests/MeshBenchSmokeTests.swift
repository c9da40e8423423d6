import Foundation
import Testing

/// The mesh benchmark (bench/mesh_bench.py + `cachemesh bench-mesh-driver` + `cachemesh relay`)
/// on the smoke scenario: every configuration runs and the CSV is sane. No plots (no matplotlib),
/// a temp output dir, and no wall-clock assertions.
@Suite struct MeshBenchSmokeTests {
    @Test func smokeScenarioWritesOneSaneRowPerConfiguration() async throws {
        let out = try TempDir("meshbench")
        defer { out.remove() }
        let r = try await run(["/usr/bin/env", "python3", "\(Paths.packageRoot)/bench/mesh_bench.py",
                               "--scenario", "\(Paths.packageRoot)/bench/scenarios/smoke.toml",
                               "--bin", try Paths.cachemesh(), "--out", out.path, "--fetch-timeout", "120"],
                              timeout: 600)
        #expect(r.status == 0, "\(r)")
        let csv = try String(contentsOfFile: out.file("mesh-bench.csv"), encoding: .utf8)
        let lines = csv.split(whereSeparator: \.isNewline).map(String.init)
        let header = lines[0].split(separator: ",").map(String.init)
        let rows = lines.dropFirst().map { line in
            Dictionary(uniqueKeysWithValues: zip(header, line.split(separator: ",", omittingEmptySubsequences: false).map(String.init)))
        }
        let expected = ["direct-quic", "direct-tcp"]
            + ["origin-only", "peers-only", "immediate", "hedged"].flatMap { s in ["quic", "tcp"].map { "\(s)/\($0)" } }
        #expect(rows.map { $0["config"] ?? "" } == expected)
        func num(_ row: [String: String], _ key: String) -> Double { Double(row[key] ?? "") ?? -1 }
        for row in rows {
            let name = row["config"] ?? "?"
            // Every fetch verified (SHA-256 and size) by the driver.
            #expect(num(row, "requests") == 19, "\(name)")
            #expect(num(row, "verified") == num(row, "requests"), "\(name): \(row["errors"] ?? "")")
            #expect(num(row, "bytes_fetched") > 0, "\(name)")
            #expect(num(row, "peer-small_p50_ms") > 0 && num(row, "origin-only_p50_ms") > 0, "\(name)")
            guard row["baseline"] == "0" else { continue }
            // Origin-only blobs can only come from the origin: its egress covers at least them.
            #expect(num(row, "origin_egress_bytes") >= num(row, "origin_only_bytes"), "\(name)")
            #expect(num(row, "origin-only_from_origin") == 6, "\(name): \(row["sources"] ?? "")")
            switch row["strategy"] {
            case "origin-only":
                #expect(num(row, "peer_hits") == 0, "\(name)")
                #expect(num(row, "origin_egress_bytes") >= num(row, "bytes_fetched"), "\(name)")
            case "peers-only":
                // Peer-held blobs from peers: the origin is asked only when every holder failed.
                #expect(num(row, "peer_hits") == 13, "\(name): \(row["sources"] ?? "")")
                #expect(num(row, "hedges_fired") == 0, "\(name)")
            default:
                #expect(num(row, "peer_hits") > 0, "\(name): \(row["sources"] ?? "")")
            }
            if row["transport"] == "quic" { #expect(num(row, "mesh_requests_quic") > 0, "\(name)") }
            if row["transport"] == "tcp" { #expect(num(row, "mesh_requests_quic") == 0, "\(name)") }
        }
    }
}
