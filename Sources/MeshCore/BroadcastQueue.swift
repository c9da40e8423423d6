/// A transmit-limited broadcast queue (the idea of memberlist's TransmitLimitedQueue).
///
/// Each key holds at most one pending value (a newer value for the same key replaces the older one and
/// resets its transmit count). `take` returns the values transmitted least often so far (newest first
/// among equals), counts one transmission for each, and drops a value once it has been transmitted
/// `limit` times.
public struct BroadcastQueue<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    struct Item: Sendable {
        var value: Value
        var transmits: Int
        var order: UInt64
    }

    private var items: [Key: Item] = [:]
    private var counter: UInt64 = 0

    public init() {}

    public var count: Int { items.count }
    public var isEmpty: Bool { items.isEmpty }

    public mutating func enqueue(_ value: Value, for key: Key) {
        counter &+= 1
        items[key] = Item(value: value, transmits: 0, order: counter)
    }

    public mutating func remove(_ key: Key) {
        items[key] = nil
    }

    public mutating func removeAll(where shouldRemove: (Key, Value) -> Bool) {
        items = items.filter { !shouldRemove($0.key, $0.value.value) }
    }

    /// Up to `max` values for one outgoing message; each counts as one transmission.
    public mutating func take(max: Int, limit: Int) -> [Value] {
        guard max > 0, !items.isEmpty else { return [] }
        var chosen: [(key: Key, item: Item)]
        if items.count <= max {
            chosen = items.map { ($0.key, $0.value) }
        } else {
            chosen = items.map { ($0.key, $0.value) }
            chosen.sort { a, b in
                a.item.transmits != b.item.transmits ? a.item.transmits < b.item.transmits : a.item.order > b.item.order
            }
            chosen.removeLast(chosen.count - max)
        }
        // Deterministic output order (dictionary iteration order is per-process random).
        chosen.sort { $0.item.order > $1.item.order }
        var out: [Value] = []
        out.reserveCapacity(chosen.count)
        for (key, item) in chosen {
            out.append(item.value)
            let t = item.transmits + 1
            if t >= limit {
                items[key] = nil
            } else {
                items[key]?.transmits = t
            }
        }
        return out
    }

    /// memberlist's retransmit limit: `mult × ceil(log10(n + 1))`.
    public static func retransmitLimit(multiplier: Int, clusterSize n: Int) -> Int {
        let scale = Int((log10Approx(Double(Swift.max(n, 0) + 1))).rounded(.up))
        return Swift.max(1, multiplier * Swift.max(1, scale))
    }
}

/// log10 without Foundation (exact enough for the scaling factors used here).
@inlinable
func log10Approx(_ x: Double) -> Double {
    guard x > 0 else { return 0 }
    // Use the natural log via the bit representation + series refinement.
    return naturalLog(x) / 2.302585092994046
}

@inlinable
func naturalLog(_ x: Double) -> Double {
    guard x > 0 else { return -.infinity }
    // x = m × 2^e with m in [1, 2)
    let e = Double(x.exponent)
    let m = x.significand
    // ln(m) via atanh series: ln(m) = 2 atanh((m-1)/(m+1))
    let t = (m - 1) / (m + 1)
    let t2 = t * t
    var term = t
    var sum = 0.0
    var k = 1.0
    for _ in 0..<30 {
        sum += term / k
        term *= t2
        k += 2
    }
    return 2 * sum + e * 0.6931471805599453
}
