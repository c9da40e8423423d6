/// The pure timing model of one link direction (no I/O, no clock, no global randomness: `now` is
/// passed in, in nanoseconds of any monotonic clock, and the random source is injected).
///
/// Serialization (rate): a departure-time token bucket shared by every flow of the direction.
/// A packet/chunk of `n` bytes starts when the link is free (`max(now, linkFree)`) and occupies it
/// for `n × 8 / rate`; it then propagates for `delay ± jitter` (jitter clamped so the total stays ≥ 0).
///
/// TCP (``streamDelivery(bytes:now:previous:)``): a stream keeps its order, so a chunk is delivered
/// at `max(previousDelivery, departure + delay ± jitter)`. Loss cannot drop bytes of a stream; it
/// is emulated by its cost: each ~1448-byte segment is "lost" with probability `loss`, and a chunk
/// holding a lost segment arrives one extra RTT late (`max(2 × delay, 1 ms)`, the time a fast
/// retransmit takes). Everything after it in the stream waits behind it (head-of-line blocking),
/// but later data is not shifted further than that: it is delivered at its own time once the
/// "retransmission" is through, as with a real receive buffer. The sender's congestion-window
/// reaction to the loss is not modelled.
///
/// UDP (``datagramDelivery(bytes:now:)``): each datagram is dropped with probability `loss`, else
/// delivered at `departure + delay ± jitter` (so datagrams may be reordered by jitter). When the
/// rate queue (the bytes waiting for the link) would exceed `queueLimit`, the datagram is
/// tail-dropped.
public struct LinkShaper<RNG: RandomNumberGenerator> {
    public let delayNs: Int64
    public let jitterNs: Int64
    public let loss: Double
    /// Nanoseconds per byte × 2^16 (fixed point), 0 = unlimited.
    let nsPerBytePerUnit: Int64
    public let rateBitsPerSecond: Int64?
    public let queueLimit: Int
    /// Time the link becomes free (end of the last scheduled serialization).
    public private(set) var linkFree: Int64 = .min
    public var rng: RNG

    public static var segmentSize: Int { 1448 }

    public init(profile: LinkProfile, rng: RNG) {
        delayNs = LinkProfile.nanoseconds(profile.delay)
        jitterNs = LinkProfile.nanoseconds(profile.jitter)
        loss = profile.loss
        rateBitsPerSecond = profile.rateBitsPerSecond
        if let r = profile.rateBitsPerSecond {
            nsPerBytePerUnit = Int64((8e9 * 65536 / Double(r)).rounded())
        } else {
            nsPerBytePerUnit = 0
        }
        queueLimit = profile.effectiveQueueLimit
        self.rng = rng
    }

    /// True when nothing is added at all (no delay, no jitter, no loss, no rate): callers may
    /// forward immediately without consulting the shaper.
    public var isTransparent: Bool { delayNs == 0 && jitterNs == 0 && loss == 0 && nsPerBytePerUnit == 0 }

    /// The extra hold of a "lost" TCP segment: one RTT, at least 1 ms.
    public var lossHoldNs: Int64 { max(2 * delayNs, 1_000_000) }

    /// Serialization time of `bytes` at the rate.
    public func serializationNs(_ bytes: Int) -> Int64 {
        nsPerBytePerUnit == 0 ? 0 : (Int64(bytes) * nsPerBytePerUnit) >> 16
    }

    /// Bytes waiting for the link at `now` (the rate queue), 0 without a rate.
    public func backlogBytes(now: Int64) -> Int {
        guard nsPerBytePerUnit > 0, linkFree > now else { return 0 }
        return Int(((linkFree - now) << 16) / nsPerBytePerUnit)
    }

    /// Departure (end of serialization) of `bytes` entering the link at `now`.
    mutating func depart(_ bytes: Int, now: Int64) -> Int64 {
        guard nsPerBytePerUnit > 0 else { return now }
        let start = max(now, linkFree)
        linkFree = start + serializationNs(bytes)
        return linkFree
    }

    mutating func propagation() -> Int64 {
        guard jitterNs > 0 else { return delayNs }
        return max(0, delayNs + Int64.random(in: -jitterNs...jitterNs, using: &rng))
    }

    /// Uniform in [0, 1).
    mutating func unit() -> Double {
        Double(rng.next() >> 11) * 0x1p-53
    }

    /// Delivery time of a TCP chunk of `bytes` read at `now`, given the delivery time of the
    /// previous chunk of the same stream and direction (`.min` for none). Returns the time and
    /// whether a loss hold was applied.
    public mutating func streamDelivery(bytes: Int, now: Int64, previous: Int64) -> (at: Int64, lossHold: Bool) {
        var t = depart(bytes, now: now) + propagation()
        var held = false
        if loss > 0 {
            let segments = max(1, (bytes + Self.segmentSize - 1) / Self.segmentSize)
            // P(at least one of the chunk's segments is lost) = 1 - (1 - loss)^segments.
            let pAny = loss >= 1 ? 1 : 1 - pow1m(loss, segments)
            if unit() < pAny {
                t += lossHoldNs
                held = true
            }
        }
        return (max(previous, t), held)
    }

    public enum DatagramFate: Equatable { case deliver(at: Int64), lost, queueFull }

    /// The fate of a datagram of `bytes` arriving at `now`.
    public mutating func datagramDelivery(bytes: Int, now: Int64) -> DatagramFate {
        if loss > 0, loss >= 1 || unit() < loss { return .lost }
        if nsPerBytePerUnit > 0, backlogBytes(now: now) + bytes > queueLimit { return .queueFull }
        return .deliver(at: depart(bytes, now: now) + propagation())
    }

    /// (1 - p)^n without Foundation.
    private func pow1m(_ p: Double, _ n: Int) -> Double {
        var result = 1.0, base = 1 - p, e = n
        while e > 0 {
            if e & 1 == 1 { result *= base }
            base *= base
            e >>= 1
        }
        return result
    }
}

/// A min-heap of timed items (ties in insertion order). Pushes in non-decreasing time order
/// cost O(1).
struct TimerHeap<Element> {
    private var items: [(at: Int64, seq: UInt64, value: Element)] = []
    private var seq: UInt64 = 0

    var isEmpty: Bool { items.isEmpty }
    var count: Int { items.count }
    var nextDeadline: Int64? { items.first?.at }

    mutating func push(_ at: Int64, _ value: Element) {
        seq &+= 1
        items.append((at, seq, value))
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            items.swapAt(i, parent)
            i = parent
        }
    }

    /// Removes and returns the earliest item if it is due by `now`.
    mutating func popDue(_ now: Int64) -> Element? {
        guard let first = items.first, first.at <= now else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count, less(l, m) { m = l }
                if r < items.count, less(r, m) { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return first.value
    }

    mutating func removeAll() { items.removeAll() }

    private func less(_ a: Int, _ b: Int) -> Bool {
        items[a].at < items[b].at || (items[a].at == items[b].at && items[a].seq < items[b].seq)
    }
}
