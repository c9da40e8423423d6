// MeshCore: the pure protocol core of CacheMesh's mesh layer.
//
// Everything in this module is a value type with no I/O, no clocks and no global randomness:
//
// * Time is injected. Every entry point takes `now: Duration`, the time elapsed since an arbitrary
//   epoch of a monotonic clock chosen by the caller. The I/O shell typically records
//   `let start = ContinuousClock.now` once and passes `start.duration(to: .now)`; simulations and
//   tests pass virtual time. Only differences between `now` values are ever used.
// * Randomness is injected: every randomised component owns a `SplitMix64` seeded by the caller, so
//   a run is a pure function of its inputs and seeds.
// * Components return actions (`MeshAction`, `RaceAction`) that the shell carries out.

// The one digest type (SHA-256 + size) is ContentDigest's; importers of MeshCore get it too.
@_exported import ContentDigest

/// A deterministic, seedable 64-bit generator (SplitMix64, Steele/Lea/Flood 2014).
public struct SplitMix64: RandomNumberGenerator, Sendable, Hashable {
    public private(set) var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return SplitMix64.mix(state)
    }

    /// The SplitMix64 finaliser: a strong 64-bit mixing function (also used for hashing).
    @inlinable
    public static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Identity of one running node process: the configured node name plus a random per-process `uid`
/// so that a restarted node is a new member (its old incarnation is probed, suspected and declared
/// dead instead of being confused with the new process).
public struct NodeID: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public var name: String
    public var uid: UInt64

    public init(name: String, uid: UInt64) {
        self.name = name
        self.uid = uid
    }

    public static func < (lhs: NodeID, rhs: NodeID) -> Bool {
        lhs.name != rhs.name ? lhs.name < rhs.name : lhs.uid < rhs.uid
    }

    public var description: String { "\(name)#\(String(uid, radix: 16))" }

    /// A stable (process-independent) 64-bit hash of name and uid.
    public var stableHash: UInt64 { SplitMix64.mix(nameHash ^ SplitMix64.mix(uid)) }

    /// A stable hash of the name alone, used by rendezvous hashing: placement follows the node's
    /// name, so a restarted node (a new uid) owns the same blobs as before it restarted.
    public var nameHash: UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a over the UTF-8 name
        for byte in name.utf8 {
            h = (h ^ UInt64(byte)) &* 0x0000_0100_0000_01B3
        }
        return h
    }
}

public enum NodeRole: String, Codable, Sendable, Hashable {
    case origin
    case peer
}

/// What membership carries about each node.
public struct NodeMetadata: Codable, Hashable, Sendable {
    public var name: String
    public var role: NodeRole
    /// TLS+HTTP/2 endpoint, "host:port".
    public var tcpEndpoint: String
    /// QUIC+HTTP/3 endpoint, "host:port" (UDP).
    public var quicEndpoint: String
    /// The subject CN of the node's certificate.
    public var certificateCN: String

    public init(name: String, role: NodeRole, tcpEndpoint: String, quicEndpoint: String, certificateCN: String) {
        self.name = name
        self.role = role
        self.tcpEndpoint = tcpEndpoint
        self.quicEndpoint = quicEndpoint
        self.certificateCN = certificateCN
    }
}

extension Digest {
    /// A stable 64-bit hash of the digest (its hash words already are uniformly distributed).
    public var stableHash: UInt64 {
        SplitMix64.mix(w0 ^ SplitMix64.mix(w1 ^ SplitMix64.mix(w2 ^ SplitMix64.mix(w3 ^ UInt64(bitPattern: size)))))
    }
}

extension Duration {
    /// Duration as fractional seconds.
    @inlinable
    var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) * 1e-18
    }

    /// Whole milliseconds (truncated, clamped to >= 0).
    @inlinable
    var clampedMilliseconds: UInt32 {
        let ms = self.seconds * 1000
        if ms <= 0 { return 0 }
        if ms >= Double(UInt32.max) { return UInt32.max }
        return UInt32(ms)
    }
}

/// A small partial Fisher–Yates: `k` distinct random elements of `array`.
func randomSample<T>(_ array: [T], count k: Int, using rng: inout SplitMix64) -> [T] {
    if k <= 0 || array.isEmpty { return [] }
    if k >= array.count {
        var copy = array
        copy.shuffle(using: &rng)
        return copy
    }
    if k * 4 <= array.count {
        // Few picks from a large array: rejection-sample distinct indices (no copy of the array).
        var picked: [Int] = []
        picked.reserveCapacity(k)
        while picked.count < k {
            let j = Int.random(in: 0..<array.count, using: &rng)
            if !picked.contains(j) { picked.append(j) }
        }
        return picked.map { array[$0] }
    }
    var copy = array
    for i in 0..<k {
        let j = Int.random(in: i..<copy.count, using: &rng)
        copy.swapAt(i, j)
    }
    return Array(copy[0..<k])
}
