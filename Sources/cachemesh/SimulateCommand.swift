import ArgumentParser
import Foundation
import MeshCore

/// Gossip convergence in virtual time with the real membership + locality state machines.
struct SimulateGossipCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate-gossip",
        abstract: "Virtual-time gossip convergence: rounds until 99% of nodes know a new holder, gossip bytes, memory per entry.", shouldDisplay: false)

    @Option(help: "Mesh sizes, comma separated.") var sizes: String = "16,64,256,1000"
    @Option(help: "Seed.") var seed: UInt64 = 42
    @Option(help: "Also write the results as JSON to this file (for bench/gossip_plot.py).") var json: String?

    func run() throws {
        var results: [GossipConvergence.Result] = []
        for n in sizes.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
            var p = GossipConvergence.Parameters(nodeCount: n)
            p.seed = seed
            // Parameters.init copies its default seed into the mesh configuration; set both.
            p.mesh.seed = seed
            let r = GossipConvergence.run(p)
            print(r)
            results.append(r)
        }
        print("")
        print(GossipConvergence.markdownTable(results))
        if let json {
            let rows: [[String: Any]] = results.map { r in
                var d: [String: Any] = [
                    "nodes": r.nodeCount,
                    "bytes_per_node_per_s": r.bytesPerNodePerSecond,
                    "push_pull_bytes_per_node_per_s": r.pushPullBytesPerNodePerSecond,
                    "messages_per_node_per_s": r.messagesPerNodePerSecond,
                    "bytes_per_entry": r.bytesPerEntry,
                    "wire_bytes_per_locality_update": r.wireBytesPerLocalityUpdate,
                ]
                if let v = r.roundsTo99 { d["rounds_to_99"] = v }
                if let v = r.roundsToAll { d["rounds_to_all"] = v }
                if let t = r.timeTo99 { d["time_to_99_ms"] = Double(t.components.seconds) * 1000 + Double(t.components.attoseconds) / 1e15 }
                return d
            }
            let data = try JSONSerialization.data(withJSONObject: ["seed": seed, "results": rows], options: [.sortedKeys, .prettyPrinted])
            try data.write(to: URL(fileURLWithPath: json))
        }
    }
}
