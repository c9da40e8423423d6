import CNgtcp2
import NIOCore
import Testing
@testable import MeshQUIC

final class FakeConn {}

@Suite struct CIDRoutingTableTests {
    @Test func routesEveryCIDOfAConnectionAndForgetsThemTogether() {
        var t = CIDRoutingTable<FakeConn>()
        let a = FakeConn(), b = FakeConn()
        let a1 = ConnectionID([1, 2, 3]), a2 = ConnectionID([4, 5, 6, 7]), b1 = ConnectionID([9])
        let r1 = t.add(a1, for: a)
        #expect(r1)
        let r2 = t.add(a2, for: a)
        #expect(r2)
        let r3 = t.add(b1, for: b)
        #expect(r3)
        #expect(t.lookup(a1) === a)
        #expect(t.lookup(a2) === a)
        #expect(t.lookup(b1) === b)
        #expect(t.lookup(ConnectionID([1, 2])) == nil)
        #expect(t.connectionCount == 2)
        let r4 = t.removeAll(for: a)
        #expect(r4 == 2)
        #expect(t.lookup(a1) == nil && t.lookup(a2) == nil)
        #expect(t.lookup(b1) === b)
        #expect(t.cidCount == 1)
    }

    @Test func aCIDBelongsToOneConnectionOnly() {
        var t = CIDRoutingTable<FakeConn>()
        let a = FakeConn(), b = FakeConn()
        let c = ConnectionID([7, 7, 7])
        let r5 = t.add(c, for: a)
        #expect(r5)
        let r6 = t.add(c, for: b)
        #expect(!r6)
        let r7 = t.add(c, for: a)
        #expect(r7)   // idempotent for the owner
        #expect(t.lookup(c) === a)
        t.remove(c, for: b)         // not b's: nothing happens
        #expect(t.lookup(c) === a)
        t.remove(c, for: a)
        #expect(t.lookup(c) == nil)
        #expect(t.connectionCount == 0)
    }

    @Test func retiringOneCIDKeepsTheOthers() {
        var t = CIDRoutingTable<FakeConn>()
        let a = FakeConn()
        let x = ConnectionID.random(), y = ConnectionID.random()
        t.add(x, for: a)
        t.add(y, for: a)
        t.remove(x, for: a)
        #expect(t.lookup(x) == nil)
        #expect(t.lookup(y) === a)
        #expect(t.cids(of: a) == [y])
    }

    @Test func connectionIDRoundTripsThroughNgtcp2() {
        let c = ConnectionID.random(length: 18)
        #expect(c.bytes.count == 18)
        #expect(ConnectionID(c.ngtcp2) == c)
        #expect(ConnectionID.random() != ConnectionID.random())
    }
}

@Suite struct ExpiryTimerTests {
    static let ms: UInt64 = 1_000_000

    @Test func reschedulesOnlyForAnEarlierDeadline() {
        let ms = Self.ms
        var t = ExpiryTimerState()
        let none = t.update(expiry: UInt64.max, now: 0)
        #expect(none == .none)
        let first = t.update(expiry: 10 * ms, now: 0)
        #expect(first == .schedule(10 * ms))
        let same = t.update(expiry: 10 * ms, now: 1 * ms)
        #expect(same == .none)
        // Later deadlines keep the pending timer (it fires early and re-arms).
        let later = t.update(expiry: 50 * ms, now: 2 * ms)
        #expect(later == .none)
        #expect(t.scheduled == 10 * ms)
        let earlier = t.update(expiry: 5 * ms, now: 2 * ms)
        #expect(earlier == .schedule(5 * ms))
        // "No deadline" does not cancel: the pending timer fires once for nothing.
        let cleared = t.update(expiry: UInt64.max, now: 3 * ms)
        #expect(cleared == .none)
        #expect(t.scheduled == 5 * ms)
    }

    @Test func deadlinesUnderOneMillisecondOrPastArePushedOut() {
        let ms = Self.ms
        var t = ExpiryTimerState()
        // A pacing deadline 20 µs ahead: ngtcp2 would send anyway, so wake 1 ms from now at the earliest.
        let pacing = t.update(expiry: 100 * ms + 20_000, now: 100 * ms)
        #expect(pacing == .schedule(101 * ms))
        // Already past right after a write (the pacing deadline again): not a wake-up at once either.
        var u = ExpiryTimerState()
        let past = u.update(expiry: 99 * ms, now: 100 * ms)
        #expect(past == .schedule(101 * ms))
        // Further out than 1 ms: exact.
        var v = ExpiryTimerState()
        let far = v.update(expiry: 103 * ms, now: 100 * ms)
        #expect(far == .schedule(103 * ms))
    }

    @Test func anEarlyFiringReArmsForTheCurrentDeadline() {
        let ms = Self.ms
        var t = ExpiryTimerState()
        _ = t.update(expiry: 10 * ms, now: 0)
        _ = t.update(expiry: 90 * ms, now: 1 * ms)
        // Fired at its own time, but ngtcp2's deadline has moved to 90 ms.
        let early = t.fired(now: 10 * ms, expiry: 90 * ms)
        #expect(early == .rearm(90 * ms))
        #expect(t.scheduled == 90 * ms)
        // A deadline between now and the re-armed one replaces it.
        let sooner = t.update(expiry: 40 * ms, now: 11 * ms)
        #expect(sooner == .schedule(40 * ms))
        let due = t.fired(now: 40 * ms + 1, expiry: 40 * ms)
        #expect(due == .handleExpiry)
        #expect(t.scheduled == nil)
        // Fired just before a deadline under 1 ms away: re-armed 1 ms out, not spun on.
        _ = t.update(expiry: 60 * ms, now: 41 * ms)
        let close = t.fired(now: 60 * ms, expiry: 60 * ms + 300_000)
        #expect(close == .rearm(61 * ms))
    }

    @Test func firingWithNoDeadlineLeavesTheTimerIdle() {
        var t = ExpiryTimerState()
        _ = t.update(expiry: 42 * Self.ms, now: 0)
        let idle = t.fired(now: 50 * Self.ms, expiry: UInt64.max)
        #expect(idle == .idle)
        #expect(t.scheduled == nil)
        let next = t.update(expiry: 80 * Self.ms, now: 50 * Self.ms)
        #expect(next == .schedule(80 * Self.ms))
    }
}

@Suite struct AckedBufferQueueTests {
    @Test func releasesBuffersOnlyWhenFullyAcknowledged() {
        var q = AckedBufferQueue()
        q.hold(ByteBuffer(repeating: 1, count: 100))
        q.hold(ByteBuffer(repeating: 2, count: 50))
        q.hold(ByteBuffer())   // empty: not held
        #expect(q.heldBuffers == 2)
        #expect(q.unackedBytes == 150)
        let r16 = q.ack(60)
        #expect(r16 == 0)
        #expect(q.heldBuffers == 2)
        let r17 = q.ack(40)
        #expect(r17 == 1)
        #expect(q.heldBuffers == 1)
        #expect(q.unackedBytes == 50)
        let r18 = q.ack(1_000)
        #expect(r18 == 1)   // over-acknowledgement is clamped
        #expect(q.unackedBytes == 0)
        #expect(q.heldBuffers == 0)
    }

    @Test func ackSpanningSeveralBuffers() {
        var q = AckedBufferQueue()
        for _ in 0..<4 { q.hold(ByteBuffer(repeating: 0, count: 10)) }
        let r19 = q.ack(35)
        #expect(r19 == 3)
        #expect(q.unackedBytes == 5)
        q.removeAll()
        #expect(q.heldBuffers == 0 && q.unackedBytes == 0)
    }
}

@Suite struct GSOBatcherTests {
    @Test func equalSizedRunsBecomeOneSendAndAShortPacketEndsARun() {
        let b = GSOBatcher.batches(sizes: [1452, 1452, 1452, 900, 1452, 1200])
        #expect(b == [
            .init(offset: 0, length: 1452 * 3 + 900, segmentSize: 1452),
            .init(offset: 1452 * 3 + 900, length: 1452 + 1200, segmentSize: 1452),
        ])
    }

    @Test func aLargerPacketStartsANewSend() {
        let b = GSOBatcher.batches(sizes: [100, 1452, 1452])
        #expect(b == [.init(offset: 0, length: 100, segmentSize: nil), .init(offset: 100, length: 2904, segmentSize: 1452)])
    }

    @Test func segmentLimitAndDisabled() {
        let sizes = Array(repeating: 1000, count: 45)
        let b = GSOBatcher.batches(sizes: sizes, maxSegments: 40)
        #expect(b.count == 2)
        #expect(b[0].length == 40_000 && b[1].length == 5_000)
        let off = GSOBatcher.batches(sizes: [1452, 1452], enabled: false)
        #expect(off == [.init(offset: 0, length: 1452, segmentSize: nil), .init(offset: 1452, length: 1452, segmentSize: nil)])
    }
}

@Suite struct StatelessResetTests {
    @Test func tokensDependOnSecretAndConnectionIDOnly() {
        let cid = ConnectionID.random()
        let a = StatelessResetSecret(Array(repeating: 7, count: 32))
        let sameBytes = StatelessResetSecret(Array(repeating: 7, count: 32))
        let other = StatelessResetSecret(Array(repeating: 8, count: 32))
        #expect(a.token(for: cid).count == 16)
        // A restarted node with the same secret derives the token its previous run gave out.
        #expect(a.token(for: cid) == sameBytes.token(for: cid))
        #expect(a.token(for: cid) != other.token(for: cid))
        #expect(a.token(for: cid) != a.token(for: ConnectionID.random()))
        #expect(StatelessResetSecret.random() != StatelessResetSecret.random())
    }

    @Test func resetsAreShorterThanTheirTriggerAndRateLimited() {
        var p = StatelessResetPolicy(ratePerSecond: 10, burst: 3)
        let t0: UInt64 = 1_000_000_000
        #expect(p.resetLength(forTrigger: 1200, now: t0) == StatelessResetPolicy.preferredLength)
        #expect(p.resetLength(forTrigger: 30, now: t0) == 29)
        // 21 bytes is the smallest reset: a 21-byte trigger would need a 20-byte answer.
        #expect(p.resetLength(forTrigger: 21, now: t0) == nil)
        #expect(p.resetLength(forTrigger: 22, now: t0) == 21)
        // The burst (3) is spent; the refused 21-byte trigger did not cost a token.
        #expect(p.resetLength(forTrigger: 1200, now: t0) == nil)
        // 10 per second: one more after 100 ms, not before.
        #expect(p.resetLength(forTrigger: 1200, now: t0 + 50_000_000) == nil)
        #expect(p.resetLength(forTrigger: 1200, now: t0 + 110_000_000) != nil)
        #expect(p.resetLength(forTrigger: 1200, now: t0 + 120_000_000) == nil)
        // Refilled up to the burst, no further.
        let later = t0 + 60_000_000_000
        #expect((0..<5).compactMap { _ in p.resetLength(forTrigger: 100, now: later) }.count == 3)
    }
}

@Suite struct AddressValidationTests {
    @Test func retryIsAskedForAsConfigured() {
        #expect(!HTTP3Server.AddressValidation.never.requiresRetry(handshaking: 10_000))
        #expect(HTTP3Server.AddressValidation.always.requiresRetry(handshaking: 0))
        #expect(!HTTP3Server.AddressValidation.whenHandshakesExceed(64).requiresRetry(handshaking: 64))
        #expect(HTTP3Server.AddressValidation.whenHandshakesExceed(64).requiresRetry(handshaking: 65))
    }
}
