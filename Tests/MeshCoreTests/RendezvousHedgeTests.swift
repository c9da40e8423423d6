import Testing
@testable import MeshCore

@Suite("Rendezvous")
struct RendezvousTests {
    let members = (0..<10).map { NodeID(name: "node-\($0)", uid: UInt64($0) * 1000 + 17) }

    @Test("removing a node moves only the keys it owned, each to its second choice")
    func stableUnderRemoval() {
        let removed = members[3]
        let remaining = members.filter { $0 != removed }
        var moved = 0
        for i in 0..<5000 {
            let d = digest(i)
            let before = Rendezvous.rank(d, over: members)
            let after = Rendezvous.rank(d, over: remaining)
            #expect(after == before.filter { $0 != removed })
            if before[0] == removed { moved += 1 }
        }
        #expect(moved > 0)
    }

    @Test("ownership is balanced within reason")
    func balanced() {
        var counts: [NodeID: Int] = [:]
        let n = 20_000
        for i in 0..<n { counts[Rendezvous.rank(digest(i), over: members)[0], default: 0] += 1 }
        let expected = n / members.count
        for m in members {
            let c = counts[m, default: 0]
            #expect(c > expected * 85 / 100 && c < expected * 115 / 100, "\(m): \(c)")
        }
    }

    @Test("the order does not depend on the order of the input, and top(k) is its prefix")
    func orderIndependent() {
        let d = digest(42)
        #expect(Rendezvous.rank(d, over: members) == Rendezvous.rank(d, over: members.reversed()))
        #expect(Rendezvous.top(2, for: d, over: members) == Array(Rendezvous.rank(d, over: members).prefix(2)))
    }
}

@Suite("Hedging")
struct HedgeTests {
    func tracker(_ millis: ClosedRange<Int>) -> LatencyTracker {
        var t = LatencyTracker()
        var rng = SplitMix64(seed: 5)
        for ms in millis.shuffled(using: &rng) { t.recordFetchLatency(.milliseconds(ms)) }
        return t
    }

    @Test("percentiles are nearest-rank over the window")
    func percentiles() {
        let t = tracker(1...100)
        #expect(t.percentile(0.95) == .milliseconds(95))
        #expect(t.percentile(0.5) == .milliseconds(50))
        #expect(t.percentile(0.99) == .milliseconds(99))
        #expect(t.percentile(1) == .milliseconds(100))
        var windowed = LatencyTracker(configuration: { var c = LatencyTracker.Configuration(); c.windowSize = 10; return c }())
        for ms in 1...100 { windowed.recordFetchLatency(.milliseconds(ms)) }
        #expect(windowed.sampleCount == 10)
        #expect(windowed.percentile(0) == .milliseconds(91))
    }

    @Test("the hedge delay follows the configured percentile and clamps to [min, max]")
    func hedgeDelay() {
        let t = tracker(1...100)
        var policy = HedgePolicy()
        #expect(policy.hedgeDelay(t) == .milliseconds(95))
        policy.percentile = 0.5
        #expect(policy.hedgeDelay(t) == .milliseconds(50))
        policy.maximumDelay = .milliseconds(40)
        #expect(policy.hedgeDelay(t) == .milliseconds(40))
        policy.maximumDelay = .seconds(1)
        policy.minimumDelay = .milliseconds(70)
        #expect(policy.hedgeDelay(t) == .milliseconds(70))
        // Too few samples: the initial delay (clamped).
        let few = tracker(1...3)
        #expect(HedgePolicy().hedgeDelay(few) == .milliseconds(50))
        #expect(HedgePolicy(mode: .hedged, maximumDelay: .milliseconds(20)).hedgeDelay(few) == .milliseconds(20))
    }

    @Test("plan ranks holders by smoothed RTT, puts the origin last and staggers hedges")
    func plan() {
        var t = tracker(1...100)
        let a = node("a"), b = node("b"), c = node("c"), o = node("origin")
        t.recordRTT(.microseconds(900), for: a)
        t.recordRTT(.microseconds(300), for: b)
        t.recordRTT(.microseconds(300), for: b)
        let plan = HedgePolicy().plan(holders: [a, c, b], origin: o, tracker: t)
        #expect(plan.legs == [
            RaceLeg(source: .peer(b), startAfter: .zero),
            RaceLeg(source: .peer(a), startAfter: .milliseconds(95)),
            RaceLeg(source: .origin(o), startAfter: .milliseconds(190)),
        ])
        let all = HedgePolicy(mode: .immediate, maximumLegs: 5).plan(holders: [a, c, b], origin: o, tracker: t)
        #expect(all.legs.map(\.source) == [.peer(b), .peer(a), .peer(c), .origin(o)])
        #expect(all.legs.allSatisfy { $0.startAfter == .zero })
        let originOnly = HedgePolicy().plan(holders: [], origin: o, tracker: t)
        #expect(originOnly.legs == [RaceLeg(source: .origin(o), startAfter: .zero)])
    }

    @Test("RTT is an EWMA")
    func ewma() {
        var t = LatencyTracker()
        let a = node("a")
        t.recordRTT(.milliseconds(8), for: a)
        t.recordRTT(.milliseconds(16), for: a)
        #expect(t.rtt(of: a) == .milliseconds(9))  // 8 × 7/8 + 16 × 1/8
    }

    @Test("race: hedge fires after the delay, the first success wins and the rest are cancelled")
    func raceHedges() {
        let a = node("a"), o = node("origin")
        let plan = RacePlan(legs: [RaceLeg(source: .peer(a), startAfter: .zero),
                                   RaceLeg(source: .origin(o), startAfter: .milliseconds(30))], hedgeDelay: .milliseconds(30))
        var race = RaceDecision(plan: plan, now: .seconds(10))
        #expect(race.start(now: .seconds(10)) == [.startLeg(0, .peer(a))])
        #expect(race.nextDeadline == .seconds(10) + .milliseconds(30))
        #expect(race.tick(now: .seconds(10) + .milliseconds(29)).isEmpty)
        #expect(race.tick(now: .seconds(10) + .milliseconds(30)) == [.startLeg(1, .origin(o))])
        #expect(race.hedgesFired == 1)
        #expect(race.legSucceeded(0, now: .seconds(11)) == [.cancelLeg(1, .origin(o)), .finished(winner: 0, .peer(a))])
        #expect(race.legsCancelled == 1)
        #expect(race.isDone)
        #expect(race.legSucceeded(1, now: .seconds(11)).isEmpty)
    }

    @Test("race: an answering leg stops the hedge timer; if it then fails, the next leg starts at once")
    func raceAnswerStopsHedging() {
        let a = node("a"), o = node("origin")
        var race = RaceDecision(plan: RacePlan(sources: [.peer(a), .origin(o)], spacing: .hedged(.milliseconds(30))), now: .zero)
        #expect(race.start(now: .zero) == [.startLeg(0, .peer(a))])
        race.legResponded(0, now: .milliseconds(1))
        #expect(race.answered)
        #expect(race.nextDeadline == nil)
        #expect(race.tick(now: .seconds(5)).isEmpty)
        #expect(race.hedgesFired == 0)
        #expect(race.legFailed(0, now: .seconds(6)) == [.startLeg(1, .origin(o))])
        #expect(!race.answered)
        #expect(race.legSucceeded(1, now: .seconds(7)) == [.finished(winner: 1, .origin(o))])
    }

    @Test("race, failover only: no timer ever starts a leg; each failure starts the next; all at once is no hedge")
    func raceFailoverOnly() {
        let a = node("a"), b = node("b"), o = node("origin")
        var race = RaceDecision(plan: RacePlan(sources: [.peer(a), .peer(b), .origin(o)], spacing: .failoverOnly), now: .zero)
        #expect(race.start(now: .zero) == [.startLeg(0, .peer(a))])
        #expect(race.nextDeadline == nil)
        #expect(race.tick(now: .seconds(3600)).isEmpty)
        #expect(race.legFailed(0, now: .seconds(1)) == [.startLeg(1, .peer(b))])
        #expect(race.legFailed(1, now: .seconds(2)) == [.startLeg(2, .origin(o))])
        #expect(race.legSucceeded(2, now: .seconds(3)) == [.finished(winner: 2, .origin(o))])
        #expect(race.hedgesFired == 0 && race.legsCancelled == 0)

        var all = RaceDecision(plan: RacePlan(sources: [.peer(a), .origin(o)], spacing: .allAtOnce), now: .zero)
        #expect(all.start(now: .zero) == [.startLeg(0, .peer(a)), .startLeg(1, .origin(o))])
        #expect(all.hedgesFired == 0)
        #expect(all.legSucceeded(1, now: .milliseconds(5)) == [.cancelLeg(0, .peer(a)), .finished(winner: 1, .origin(o))])
    }

    @Test("race: a failed leg starts the next at once; all failed → failed")
    func raceFallback() {
        let a = node("a"), o = node("origin")
        let plan = RacePlan(legs: [RaceLeg(source: .peer(a), startAfter: .zero),
                                   RaceLeg(source: .origin(o), startAfter: .milliseconds(30))], hedgeDelay: .milliseconds(30))
        var race = RaceDecision(plan: plan, now: .zero)
        _ = race.start(now: .zero)
        #expect(race.legFailed(0, now: .milliseconds(1)) == [.startLeg(1, .origin(o))])
        #expect(race.hedgesFired == 0)
        #expect(race.legFailed(1, now: .milliseconds(2)) == [.failed])
        #expect(race.isDone)
    }

    @Test("race: once a leg is committed to the caller, nothing else starts or wins")
    func raceCommit() {
        let a = node("a"), b = node("b"), o = node("origin")
        let plan = RacePlan(legs: [RaceLeg(source: .peer(a), startAfter: .zero),
                                   RaceLeg(source: .peer(b), startAfter: .zero),
                                   RaceLeg(source: .origin(o), startAfter: .milliseconds(30))], hedgeDelay: .milliseconds(30))
        var race = RaceDecision(plan: plan, now: .zero)
        #expect(race.start(now: .zero) == [.startLeg(0, .peer(a)), .startLeg(1, .peer(b))])
        #expect(race.commit(1, now: .milliseconds(1)) == [.cancelLeg(0, .peer(a))])
        #expect(race.tick(now: .milliseconds(40)).isEmpty)
        #expect(race.nextDeadline == nil)
        #expect(race.legFailed(1, now: .milliseconds(50)) == [.failed])
    }
}

@Suite("Mirror targets")
struct MirrorTargetTests {
    /// `MeshNode.mirrorCandidates` is what `MeshService` mirrors to (writes take the first R−1,
    /// failed copies the next ones, a drain's hand-off the first).
    @Test("mirror candidates: alive members by rendezvous, then suspects; never self or the dead; the origin is an ordinary member")
    func mirrorCandidates() throws {
        var config = SimulatedMesh.Configuration(nodeCount: 7)  // node 0 is the origin
        config.seed = 2
        var mesh = SimulatedMesh(config)
        mesh.crash(4)
        mesh.run(until: .seconds(60)) { $0.status(of: 4, seenBy: 1) == .dead }
        try #require(mesh.status(of: 4, seenBy: 1) == .dead)
        // Several digests, so that an order that ignored rendezvous (or put the origin last)
        // would be caught on some of them.
        var originFirst = 0
        for k in 0..<40 {
            let d = digest(k)
            let alive = [0, 2, 3, 5, 6].map { mesh.ids[$0] }
            let expected = Rendezvous.rank(d, over: alive)
            #expect(mesh.nodes[1].mirrorCandidates(for: d) == expected, "digest \(k)")
            if expected.first == mesh.ids[0] { originFirst += 1 }
        }
        #expect(originFirst > 0, "the origin never ranked first: the test would not see it excluded")

        // A member that stops answering is suspect for a while before it is dead: it stays a
        // candidate, but only after every member counted alive.
        mesh.crash(6)
        mesh.run(until: mesh.now + .seconds(60)) { $0.status(of: 6, seenBy: 1) == .suspect }
        try #require(mesh.status(of: 6, seenBy: 1) == .suspect)
        for k in 0..<40 {
            let d = digest(k)
            let expected = Rendezvous.rank(d, over: [0, 2, 3, 5].map { mesh.ids[$0] }) + [mesh.ids[6]]
            #expect(mesh.nodes[1].mirrorCandidates(for: d) == expected, "digest \(k)")
        }
        mesh.run(until: mesh.now + .seconds(60)) { $0.status(of: 6, seenBy: 1) == .dead }
        try #require(mesh.status(of: 6, seenBy: 1) == .dead)
        #expect(mesh.nodes[1].mirrorCandidates(for: digest(0)) == Rendezvous.rank(digest(0), over: [0, 2, 3, 5].map { mesh.ids[$0] }))
    }
}
