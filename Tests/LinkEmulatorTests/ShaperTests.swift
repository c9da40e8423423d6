import Testing
@testable import LinkEmulator

/// Returns the scripted values in turn (then repeats the last).
struct ScriptedRNG: RandomNumberGenerator {
    var values: [UInt64]
    var i = 0
    mutating func next() -> UInt64 {
        defer { i += 1 }
        return values[min(i, values.count - 1)]
    }
}

struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

let ms: Int64 = 1_000_000

@Suite struct ShaperTests {
    @Test func transparentDeliversAtOnce() {
        var s = LinkShaper(profile: .transparent, rng: SplitMix(state: 1))
        #expect(s.isTransparent)
        #expect(s.streamDelivery(bytes: 65536, now: 5, previous: .min).at == 5)
        #expect(s.datagramDelivery(bytes: 1200, now: 7) == .deliver(at: 7))
    }

    @Test func delayIsAddedOneWay() {
        var s = LinkShaper(profile: LinkProfile(delay: .milliseconds(20)), rng: SplitMix(state: 1))
        #expect(!s.isTransparent)
        #expect(s.streamDelivery(bytes: 100, now: 1000, previous: .min).at == 1000 + 20 * ms)
        #expect(s.datagramDelivery(bytes: 100, now: 1000) == .deliver(at: 1000 + 20 * ms))
    }

    @Test func jitterStaysInRangeAndStreamsKeepOrder() {
        var s = LinkShaper(profile: LinkProfile(delay: .milliseconds(10), jitter: .milliseconds(3)), rng: SplitMix(state: 42))
        var previous = Int64.min
        var sawReorderable = false
        for i in 0..<2000 {
            let now = Int64(i) * 100_000  // every 0.1 ms
            let (at, held) = s.streamDelivery(bytes: 1000, now: now, previous: previous)
            #expect(!held)
            #expect(at >= previous, "TCP order")
            #expect(at >= now + 7 * ms - 0 && at <= max(previous, now + 13 * ms))
            previous = at
            if case .deliver(let d) = s.datagramDelivery(bytes: 1000, now: now) {
                #expect(d >= now + 7 * ms && d <= now + 13 * ms)
                if d < now + 10 * ms - 100_000 { sawReorderable = true }
            } else {
                Issue.record("no loss configured")
            }
        }
        #expect(sawReorderable)
    }

    @Test func jitterIsClampedAtZero() {
        var s = LinkShaper(profile: LinkProfile(delay: .milliseconds(1), jitter: .milliseconds(5)), rng: SplitMix(state: 7))
        for i in 0..<500 {
            guard case .deliver(let d) = s.datagramDelivery(bytes: 10, now: Int64(i)) else { Issue.record("lost"); return }
            #expect(d >= Int64(i))
        }
    }

    @Test func rateSerializesBackToBackChunks() {
        // 80 Mbit/s = 10 MB/s = 100 ns per byte.
        var s = LinkShaper(profile: LinkProfile(delay: .milliseconds(5), rateBitsPerSecond: 80_000_000), rng: SplitMix(state: 1))
        #expect(s.serializationNs(1000) == 100_000)
        var prev = Int64.min
        for k in 1...3 {
            let (at, _) = s.streamDelivery(bytes: 1000, now: 0, previous: prev)
            #expect(at == Int64(k) * 100_000 + 5 * ms)
            prev = at
        }
        // The link was free again at 0.3 ms: a chunk at 1 ms leaves at once.
        #expect(s.streamDelivery(bytes: 1000, now: 1 * ms, previous: prev).at == 1 * ms + 100_000 + 5 * ms)
        // The rate is shared by the datagrams of the same direction.
        #expect(s.datagramDelivery(bytes: 1000, now: 1 * ms) == .deliver(at: 1 * ms + 200_000 + 5 * ms))
        // 4 MiB at 80 Mbit/s take 0.419 s.
        var t = LinkShaper(profile: LinkProfile(rateBitsPerSecond: 80_000_000), rng: SplitMix(state: 1))
        var last = Int64.min
        for _ in 0..<64 { last = t.streamDelivery(bytes: 65536, now: 0, previous: last).at }
        #expect(last >= 419 * ms)
    }

    @Test func lossHoldsTheStreamOneRTTHeadOfLine() {
        // First draw: lost (0 < p); later draws: not lost (≈1).
        var s = LinkShaper(profile: LinkProfile(delay: .milliseconds(10), loss: 0.1), rng: ScriptedRNG(values: [0, .max]))
        #expect(s.lossHoldNs == 20 * ms)
        let a = s.streamDelivery(bytes: 1448, now: 0, previous: .min)
        #expect(a.lossHold && a.at == 30 * ms)  // 10 ms delay + one RTT
        let b = s.streamDelivery(bytes: 1448, now: 1 * ms, previous: a.at)
        #expect(!b.lossHold && b.at == 30 * ms)  // waits behind the "retransmission"
        let c = s.streamDelivery(bytes: 1448, now: 40 * ms, previous: b.at)
        #expect(!c.lossHold && c.at == 50 * ms)  // later data is not shifted
        // Without delay the hold is 1 ms.
        var z = LinkShaper(profile: LinkProfile(loss: 1), rng: SplitMix(state: 3))
        #expect(z.streamDelivery(bytes: 10, now: 0, previous: .min) == (at: 1 * ms, lossHold: true))
    }

    @Test func lossProbabilityGrowsWithSegments() {
        // 1% per segment: a 64 KiB chunk (46 segments) is held with p = 1 - 0.99^46 ≈ 37%.
        var s = LinkShaper(profile: LinkProfile(loss: 0.01), rng: SplitMix(state: 9))
        var held = 0
        for _ in 0..<4000 where s.streamDelivery(bytes: 65536, now: 0, previous: .min).lossHold { held += 1 }
        #expect(held > 1200 && held < 1750)
        var small = 0
        for _ in 0..<4000 where s.streamDelivery(bytes: 100, now: 0, previous: .min).lossHold { small += 1 }
        #expect(small > 10 && small < 90)
    }

    @Test func datagramLossAndTailDrop() {
        var all = LinkShaper(profile: LinkProfile(loss: 1), rng: SplitMix(state: 1))
        for _ in 0..<100 { #expect(all.datagramDelivery(bytes: 100, now: 0) == .lost) }
        var none = LinkShaper(profile: LinkProfile(loss: 0.5), rng: ScriptedRNG(values: [.max]))
        #expect(none.datagramDelivery(bytes: 100, now: 0) == .deliver(at: 0))
        // 8 kbit/s = 1000 B/s; queue 3000 B: three 1000-byte datagrams fit, the fourth is dropped.
        var q = LinkShaper(profile: LinkProfile(rateBitsPerSecond: 8000, queueLimitBytes: 3000), rng: SplitMix(state: 1))
        #expect(q.datagramDelivery(bytes: 1000, now: 0) == .deliver(at: 1_000 * ms))
        #expect(q.datagramDelivery(bytes: 1000, now: 0) == .deliver(at: 2_000 * ms))
        #expect(q.datagramDelivery(bytes: 1000, now: 0) == .deliver(at: 3_000 * ms))
        #expect(q.datagramDelivery(bytes: 1000, now: 0) == .queueFull)
        #expect(q.backlogBytes(now: 0) == 3000)
        // Once a second of it has drained, one more fits.
        #expect(q.datagramDelivery(bytes: 1000, now: 1_000 * ms) == .deliver(at: 4_000 * ms))
    }

    @Test func timerHeapOrdersByDeadlineThenInsertion() {
        var h = TimerHeap<Int>()
        for (i, t) in [50, 10, 30, 10, 70, 20].enumerated() { h.push(Int64(t), i) }
        #expect(h.popDue(5) == nil)
        var out: [Int] = []
        while let v = h.popDue(100) { out.append(v) }
        #expect(out == [1, 3, 5, 2, 0, 4])
        #expect(h.isEmpty)
    }
}
