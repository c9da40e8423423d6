import Testing
@testable import MeshCore

@Suite("Adaptive transport choice")
struct TransportChooserTests {
    /// Records `n` requests to `peer` over `kind` with these measurements.
    func feed(_ c: inout TransportChooser, _ kind: TransportChooser.Kind, latencyMs: Int64? = nil, goodputMBps: Int64? = nil, n: Int = 4) {
        for _ in 0..<n {
            c.record(peer: "p", kind: kind, headLatency: latencyMs.map { .milliseconds($0) },
                     bytes: goodputMBps == nil ? 0 : 8 << 20, transferTime: goodputMBps.map { .microseconds(8_000_000 / $0) })
        }
    }

    @Test("unmeasured transports are tried first, the preferred one before the other")
    func measuresBoth() {
        var c = TransportChooser(preferred: .quic)
        #expect(c.choose(peer: "p", expectedBytes: nil) == (.quic, .unmeasured))
        feed(&c, .quic, latencyMs: 1, n: 1)
        #expect(c.choose(peer: "p", expectedBytes: nil) == (.tcp, .unmeasured))
        feed(&c, .tcp, latencyMs: 1, n: 1)
        #expect(c.choose(peer: "p", expectedBytes: nil).1 == .measured)
        // Large requests are a class of their own: goodput not measured yet.
        #expect(c.choose(peer: "p", expectedBytes: 32 << 20) == (.quic, .unmeasured))
    }

    @Test("large transfers go where goodput is higher, small ones where latency is lower")
    func bySize() {
        var c = TransportChooser(preferred: .quic)
        feed(&c, .quic, latencyMs: 1, goodputMBps: 100)
        feed(&c, .tcp, latencyMs: 3, goodputMBps: 400)
        #expect(c.choose(peer: "p", expectedBytes: 32 << 20) == (.tcp, .measured))
        #expect(c.choose(peer: "p", expectedBytes: 4096) == (.quic, .measured))
        // Unknown size: goodput decides only when it differs decisively (4× here).
        #expect(c.choose(peer: "p", expectedBytes: nil) == (.tcp, .measured))
        // Other peers know nothing yet.
        #expect(c.choose(peer: "q", expectedBytes: 32 << 20) == (.quic, .unmeasured))
    }

    @Test("the current choice holds unless the other transport is better by the margin, and a better path takes over")
    func hysteresis() {
        var c = TransportChooser(preferred: .quic)
        feed(&c, .quic, goodputMBps: 100)
        feed(&c, .tcp, goodputMBps: 110)   // 10% better: within the 15% margin
        #expect(c.choose(peer: "p", expectedBytes: 1 << 30) == (.quic, .measured))
        feed(&c, .tcp, goodputMBps: 200, n: 8)
        #expect(c.choose(peer: "p", expectedBytes: 1 << 30) == (.tcp, .measured))
        // Back to QUIC only when QUIC is better by the margin (not merely equal).
        feed(&c, .quic, goodputMBps: 190, n: 12)
        #expect(c.choose(peer: "p", expectedBytes: 1 << 30) == (.tcp, .measured))
        feed(&c, .quic, goodputMBps: 400, n: 12)
        #expect(c.choose(peer: "p", expectedBytes: 1 << 30) == (.quic, .measured))
    }

    @Test("one decision in exploreEvery tries the other transport; a forgotten peer starts over")
    func exploresAndForgets() {
        var config = TransportChooser.Configuration()
        config.exploreEvery = 8
        var c = TransportChooser(preferred: .quic, configuration: config)
        feed(&c, .quic, latencyMs: 1)
        feed(&c, .tcp, latencyMs: 5)
        let choices = (0..<16).map { _ in c.choose(peer: "p", expectedBytes: 1000) }
        #expect(choices.filter { $0 == (.tcp, .explore) }.count == 2)
        #expect(choices.filter { $0 == (.quic, .measured) }.count == 14)
        c.forget(peer: "p")
        #expect(c.estimates(of: "p").isEmpty)
        #expect(c.choose(peer: "p", expectedBytes: 1000) == (.quic, .unmeasured))
    }

    @Test("a transfer below the goodput threshold gives no goodput sample")
    func smallTransfersNoGoodput() {
        var c = TransportChooser()
        c.record(peer: "p", kind: .tcp, headLatency: .milliseconds(1), bytes: 4096, transferTime: .microseconds(10))
        #expect(c.estimates(of: "p")[.tcp]?.goodput == nil)
        #expect(c.estimates(of: "p")[.tcp]?.latency == 0.001)
    }
}
