import MeshHTTP
import NIOCore
import Synchronization
import Testing

@Suite struct RequestBodyBudgetTests {
    final class Grants: Sendable {
        let total = Mutex(0)
        var value: Int { total.withLock { $0 } }
        func add(_ n: Int) { total.withLock { $0 += n } }
    }

    static let first = RequestBodyBudget.firstGrant

    @Test func aStreamBeingReadGetsAWindowThatGrowsWithinItsCapAndComesBackWhenItEnds() {
        let budget = RequestBodyBudget(limit: 4 << 20, perConnection: 4 << 20)
        let grants = Grants()
        let c = budget.connection()
        let s = c.open(cap: 256 << 10) { grants.add($0) }
        #expect(grants.value == Self.first)
        #expect(budget.used == Self.first)
        // The consumer takes the window's worth, again and again: 64 → 128 → 256 KiB, no further.
        var grown = 0
        for _ in 0..<20 { grown += s.consumed(Self.first) }
        #expect(grown == (256 << 10) - Self.first)
        #expect(s.window == 256 << 10)
        #expect(budget.used == 256 << 10)
        s.release()
        #expect(budget.used == 0)
        #expect(s.consumed(Self.first) == 0)
    }

    @Test func aConnectionHoldsAtMostItsShare() {
        let budget = RequestBodyBudget(limit: 4 << 20, perConnection: 1 << 20)
        let c = budget.connection()
        var streams: [BodyCredit] = []
        for _ in 0..<16 { streams.append(c.open(cap: 1 << 20) { _ in }) }
        // 16 × 64 KiB = the share: a 17th waits even though the budget has room.
        #expect(budget.used == 1 << 20)
        let grants = Grants()
        let extra = c.open(cap: 1 << 20) { grants.add($0) }
        #expect(extra.waiting)
        #expect(grants.value == 0)
        // Growth stops at the share too.
        #expect(streams[0].consumed(Self.first) == 0)
        streams.removeFirst().release()
        #expect(!extra.waiting)
        #expect(grants.value == Self.first)
        #expect(budget.used == 1 << 20)
    }

    @Test func streamsBeyondTheBudgetWaitAndAreServedRoundRobinOverConnections() {
        let budget = RequestBodyBudget(limit: 1 << 20, perConnection: 1 << 20)
        let hog = budget.connection()
        var held: [BodyCredit] = []
        for _ in 0..<16 { held.append(hog.open(cap: 64 << 10) { _ in }) }
        #expect(budget.used == 1 << 20)
        // Connection a queues three streams, then b one: b's comes second, not fourth.
        let a = budget.connection(), b = budget.connection()
        let order = Mutex<[String]>([])
        // a's first stream takes a floor (a holds nothing); its others wait.
        let a0 = a.open(cap: 64 << 10) { _ in order.withLock { $0.append("a0") } }
        let a1 = a.open(cap: 64 << 10) { _ in order.withLock { $0.append("a1") } }
        let a2 = a.open(cap: 64 << 10) { _ in order.withLock { $0.append("a2") } }
        let b0 = b.open(cap: 64 << 10) { _ in order.withLock { $0.append("b0") } }
        let b1 = b.open(cap: 64 << 10) { _ in order.withLock { $0.append("b1") } }
        #expect(order.withLock { $0 } == ["a0", "b0"])
        #expect(budget.floorGrants == 2)
        #expect(a1.waiting && a2.waiting && b1.waiting)
        #expect(budget.waiting == 3)
        for _ in 0..<3 { held.removeFirst().release() }
        #expect(order.withLock { $0 } == ["a0", "b0", "a1", "b1", "a2"])
        #expect(budget.used == 1 << 20)
        _ = (a0, b0)
    }

    @Test func floorsAreBoundedNodeWide() {
        let budget = RequestBodyBudget(limit: 1 << 20, perConnection: 1 << 20, floor: 16 << 10, floorLimit: 32 << 10)
        let hog = budget.connection()
        let held = (0..<16).map { _ in hog.open(cap: 64 << 10) { _ in } }
        let conns = (0..<3).map { _ in budget.connection() }
        let credits = conns.map { $0.open(cap: 1 << 20) { _ in } }
        #expect(credits.map(\.window) == [16 << 10, 16 << 10, 0])
        #expect(budget.floorUsed == 32 << 10)
        credits[0].release()
        #expect(credits[2].window == 16 << 10)
        _ = held
    }

    @Test func closingAConnectionGivesBackEverythingItHeld() {
        let budget = RequestBodyBudget(limit: 1 << 20)
        let c = budget.connection()
        let s = (0..<4).map { _ in c.open(cap: 64 << 10) { _ in } }
        #expect(budget.used == 4 * Self.first)
        c.close()
        #expect(budget.used == 0)
        _ = s
    }

    @Test func aBodyAsksForItsWindowOnItsFirstReadAndIsNotTimedOutBeforeIt() async throws {
        let opened = Grants()
        let body = HTTPInboundBody(idleTimeout: .seconds(1), onFirstRead: { opened.add(1) })
        // Nothing arrives, nobody reads: the silence is ours, not the sender's.
        #expect(body.checkIdle(now: .now + .seconds(10)))
        #expect(opened.value == 0)
        let reader = Task { try await body.next() }
        try await Task.sleep(for: .milliseconds(50))
        #expect(opened.value == 1)
        body.append(ByteBuffer(string: "x"))
        _ = try await reader.value
        let r2 = Task { try await body.next() }
        try await Task.sleep(for: .milliseconds(50))
        #expect(opened.value == 1)
        // Now it reads and nothing comes: timed out.
        #expect(!body.checkIdle(now: .now + .seconds(10)))
        await #expect(throws: HTTPTransportError.self) { try await r2.value }
    }
}
