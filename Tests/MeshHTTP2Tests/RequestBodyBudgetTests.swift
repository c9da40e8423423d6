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

    /// A peer that sends as fast as the window allows and a consumer that keeps up.
    static func traffic(_ c: BodyBudgetConnection, rounds: Int) {
        for _ in 0..<rounds {
            c.received(65_536)
            _ = c.consumed(65_536)
        }
    }

    @Test func aWindowGrowsWithTrafficUpToItsShareAndNoFurther() {
        let budget = RequestBodyBudget(limit: 1 << 20, perConnection: 512 << 10)
        let grants = Grants()
        let c = budget.connection(base: 65_536) { grants.add($0) }
        let body = HTTPInboundBody(budget: c)
        Self.traffic(c, rounds: 100)
        #expect(c.window.window == 65_536 + (512 << 10))
        #expect(grants.value == 512 << 10)
        #expect(budget.used == 512 << 10)
        body.finish()
        // The upload is over: what the connection holds beyond its base goes back as it drains.
        Self.traffic(c, rounds: 20)
        #expect(c.window.window == 65_536)
        #expect(budget.used == 0)
    }

    @Test func connectionsBeyondTheBudgetWaitAndAreServedWhenItFrees() {
        let budget = RequestBodyBudget(limit: 1 << 20, perConnection: 1 << 20)
        let a = budget.connection(base: 65_536) { _ in }
        let bodyA = HTTPInboundBody(budget: a)
        Self.traffic(a, rounds: 100)
        #expect(budget.used == 1 << 20)
        let grantsB = Grants()
        let b = budget.connection(base: 65_536) { grantsB.add($0) }
        let bodyB = HTTPInboundBody(budget: b)
        Self.traffic(b, rounds: 10)
        // Nothing left: b keeps its base and waits.
        #expect(grantsB.value == 0)
        #expect(budget.waiting == 1)
        #expect(budget.used == 1 << 20)
        a.close()
        #expect(grantsB.value > 0)
        #expect(budget.used <= 1 << 20)
        _ = (bodyA, bodyB)
    }

    @Test func aHandlerWaitingOnAWindowFullOfOthersBytesGetsAFloorGrant() async throws {
        let budget = RequestBodyBudget(limit: 1 << 20)
        let grants = Grants()
        let c = budget.connection(base: 65_536) { grants.add($0) }
        // Another stream's 64 KiB fill the window and nobody reads them.
        let parked = HTTPInboundBody(budget: c)
        c.received(65_536)
        parked.append(ByteBuffer(repeating: 1, count: 65_536))
        let waiting = HTTPInboundBody(budget: c)
        let reader = Task { try await waiting.next() }
        try await Task.sleep(for: .milliseconds(100))
        #expect(grants.value == 65_536)
        #expect(budget.floorGrants == 1)
        waiting.append(ByteBuffer(string: "x"))
        _ = try await reader.value
        // A window with room left gets nothing extra.
        let idle = budget.connection(base: 65_536) { grants.add($0) }
        let other = HTTPInboundBody(budget: idle)
        let r2 = Task { try await other.next() }
        try await Task.sleep(for: .milliseconds(100))
        #expect(budget.floorGrants == 1)
        other.finish()
        _ = try await r2.value
    }
}
