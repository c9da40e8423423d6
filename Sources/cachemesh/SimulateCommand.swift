import ArgumentParser
import MeshCore

/// Gossip convergence in virtual time with the real membership + locality state machines.
struct SimulateGossipCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate-gossip",
        abstract: "Virtual-time gossip convergence: rounds until 99% of nodes know a new holder, gossip bytes, memory per entry.")

    @Option(help: "Mesh sizes, comma separated.") var sizes: String = "16,64,256,1000"
    @Option(help: "Seed.") var seed: UInt64 = 42

    func run() throws {
        var results: [GossipConvergence.Result] = []
        for n in sizes.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
            var p = GossipConvergence.Parameters(nodeCount: n)
            p.seed = seed
            let r = GossipConvergence.run(p)
            print(r)
            results.append(r)
        }
        print("")
        print(GossipConvergence.markdownTable(results))
    }
}
