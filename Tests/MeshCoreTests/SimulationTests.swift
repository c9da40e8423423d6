import Testing
@testable import MeshCore

@Suite("Gossip convergence simulation")
struct SimulationTests {
    @Test("convergence happens, with traffic and memory reported", arguments: [16, 64])
    func converges(nodeCount: Int) {
        var p = GossipConvergence.Parameters(nodeCount: nodeCount)
        p.warmUp = .seconds(2)
        p.measureWindow = .seconds(3)
        p.maximumWait = .seconds(20)
        p.scaleDigests = 1000
        let r = GossipConvergence.run(p)
        #expect(r.nodeCount == nodeCount)
        let r99 = try! #require(r.roundsTo99)
        let rAll = try! #require(r.roundsToAll)
        #expect(r99 >= 1)
        #expect(rAll >= r99)
        #expect(r.bytesPerNodePerSecond > 0)
        #expect(r.pushPullBytesPerNodePerSecond <= r.bytesPerNodePerSecond)
        #expect(r.messagesPerNodePerSecond > 0)
        #expect(r.bytesPerEntry > 0)
        #expect(r.wireBytesPerLocalityUpdate > 0)
    }

    @Test("the simulation is deterministic for a seed")
    func deterministic() {
        var config = SimulatedMesh.Configuration(nodeCount: 10)
        config.seed = 4
        config.lossRate = 0.05
        var a = SimulatedMesh(config)
        var b = SimulatedMesh(config)
        a.gained(digest(1), at: 3)
        b.gained(digest(1), at: 3)
        a.run(until: .seconds(5))
        b.run(until: .seconds(5))
        #expect(a.bytesSent == b.bytesSent)
        #expect(a.events.map(\.event) == b.events.map(\.event))
    }
}
