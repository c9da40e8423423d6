/// The emulated properties of one link, applied to each direction separately.
///
/// - `delay`: one-way propagation delay (so a request/response sees 2 × delay of RTT).
/// - `jitter`: each packet/chunk gets `delay + U(-jitter, +jitter)`, clamped at 0.
/// - `loss`: probability in 0...1. UDP datagrams are dropped; TCP cannot lose bytes, so a
///   "lost" ~1448-byte segment instead holds the stream for one extra RTT (see ``LinkShaper``).
/// - `rateBitsPerSecond`: serialization rate of the link direction (nil = unlimited). All flows
///   of a link (TCP connections and UDP mappings) share it, like a real link.
/// - `queueLimitBytes`: per-direction queue limit: TCP stops reading above it, UDP tail-drops.
public struct LinkProfile: Sendable, Equatable, CustomStringConvertible {
    public var delay: Duration
    public var jitter: Duration
    public var loss: Double
    public var rateBitsPerSecond: Int64?
    /// nil = ``defaultQueueLimit``.
    public var queueLimitBytes: Int?

    public init(delay: Duration = .zero, jitter: Duration = .zero, loss: Double = 0,
                rateBitsPerSecond: Int64? = nil, queueLimitBytes: Int? = nil) {
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.rateBitsPerSecond = rateBitsPerSecond
        self.queueLimitBytes = queueLimitBytes
    }

    /// A link that adds nothing (but still relays).
    public static let transparent = LinkProfile()

    /// The queue limit in effect: the given one, else max(bandwidth-delay product over an RTT, 4 MiB)
    /// (with no rate, the BDP is taken at 10 Gbit/s so that the relay does not cap throughput).
    public var effectiveQueueLimit: Int {
        if let q = queueLimitBytes { return q }
        let rate = Double(rateBitsPerSecond ?? 10_000_000_000)
        let rtt = 2 * Self.seconds(delay + jitter)
        let bdp = rate / 8 * rtt
        return max(4 << 20, Int(min(bdp, Double(1 << 30))))
    }

    public var description: String {
        var s = "delay=\(Self.format(delay)) jitter=\(Self.format(jitter)) loss=\(Self.formatLoss(loss)) rate=\(rateBitsPerSecond.map(Self.formatRate) ?? "unlimited")"
        s += " queue=\(effectiveQueueLimit)B"
        return s
    }

    /// Throws unless every value is in range.
    public func validate() throws {
        guard delay >= .zero else { throw LinkProfileError("delay must not be negative") }
        guard jitter >= .zero else { throw LinkProfileError("jitter must not be negative") }
        guard loss >= 0, loss <= 1, !loss.isNaN else { throw LinkProfileError("loss must be within 0...1 (or 0%...100%), got \(loss)") }
        if let r = rateBitsPerSecond, r <= 0 { throw LinkProfileError("rate must be positive, got \(r) bit/s") }
        if let q = queueLimitBytes, q < 1500 { throw LinkProfileError("queue limit must be at least 1500 bytes, got \(q)") }
    }

    // MARK: parsing

    /// Applies one option (`delay`, `jitter`, `loss`, `rate`, `queue`/`queue-limit`) given as text.
    public mutating func set(_ key: String, _ value: String) throws {
        switch key {
        case "delay": delay = try Self.parseDuration(value, what: "delay")
        case "jitter": jitter = try Self.parseDuration(value, what: "jitter")
        case "loss": loss = try Self.parseLoss(value)
        case "rate": rateBitsPerSecond = try Self.parseRate(value)
        case "queue", "queue-limit": queueLimitBytes = try Self.parseSize(value, what: "queue limit")
        default: throw LinkProfileError("unknown link option '\(key)' (expected delay, jitter, loss, rate or queue)")
        }
    }

    /// Parses `--delay 20ms --jitter 1ms --loss 0.5% --rate 1gbit --queue-limit 8MiB`
    /// (also `--delay=20ms`). Throws on unknown options or bad values.
    public init(arguments: [String]) throws {
        self.init()
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            guard a.hasPrefix("--") else { throw LinkProfileError("unexpected argument '\(a)'") }
            var key = String(a.dropFirst(2)), value: String
            if let eq = key.firstIndex(of: "=") {
                value = String(key[key.index(after: eq)...])
                key = String(key[..<eq])
                i += 1
            } else {
                guard i + 1 < arguments.count else { throw LinkProfileError("--\(key) needs a value") }
                value = arguments[i + 1]
                i += 2
            }
            try set(key, value)
        }
        try validate()
    }

    /// `250us`, `20ms`, `1.5s`, `0` (a bare number other than 0 is rejected: the unit matters).
    public static func parseDuration(_ text: String, what: String = "duration") throws -> Duration {
        let s = text.linkTrimmed.lowercased()
        let units: [(String, Double)] = [("us", 1e3), ("µs", 1e3), ("ns", 1), ("ms", 1e6), ("s", 1e9)]
        if let n = Double(s), n == 0 { return .zero }
        for (suffix, ns) in units where s.hasSuffix(suffix) {
            let num = String(s.dropLast(suffix.count))
            guard let v = Double(num), v.isFinite else { break }
            guard v >= 0 else { throw LinkProfileError("\(what) must not be negative, got '\(text)'") }
            guard v * ns <= 86_400e9 else { throw LinkProfileError("\(what) '\(text)' is too large") }
            return .nanoseconds(Int64((v * ns).rounded()))
        }
        throw LinkProfileError("bad \(what) '\(text)': expected a number with a unit us, ms or s (e.g. 20ms)")
    }

    /// `1gbit`, `80mbit`, `512kbit`, `1000bit` (also `bps`, `kbps`, `mbps`, `gbps`): bits per second.
    public static func parseRate(_ text: String) throws -> Int64? {
        let s = text.linkTrimmed.lowercased()
        if s == "unlimited" || s == "none" || s == "0" { return nil }
        let units: [(String, Double)] = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("gbps", 1e9), ("mbps", 1e6),
                                         ("kbps", 1e3), ("bit", 1), ("bps", 1)]
        for (suffix, mult) in units where s.hasSuffix(suffix) {
            guard let v = Double(s.dropLast(suffix.count)), v.isFinite else { break }
            guard v > 0 else { throw LinkProfileError("rate must be positive, got '\(text)'") }
            let bps = v * mult
            guard bps >= 8, bps <= 1e13 else { throw LinkProfileError("rate '\(text)' is out of range (8bit...10000gbit)") }
            return Int64(bps.rounded())
        }
        throw LinkProfileError("bad rate '\(text)': expected a number with a unit kbit, mbit or gbit (e.g. 100mbit)")
    }

    /// `0.01` or `1%` → 0.01.
    public static func parseLoss(_ text: String) throws -> Double {
        let s = text.linkTrimmed
        let v: Double
        if s.hasSuffix("%") {
            guard let p = Double(s.dropLast()), p.isFinite else { throw LinkProfileError("bad loss '\(text)': expected e.g. 0.01 or 1%") }
            v = p / 100
        } else {
            guard let p = Double(s), p.isFinite else { throw LinkProfileError("bad loss '\(text)': expected e.g. 0.01 or 1%") }
            v = p
        }
        guard v >= 0, v <= 1 else { throw LinkProfileError("loss '\(text)' is out of range: must be within 0...1 (or 0%...100%)") }
        return v
    }

    /// `65536`, `64k`, `64KiB`, `4M`, `4MiB`, `1G` (binary multiples).
    public static func parseSize(_ text: String, what: String = "size") throws -> Int {
        let s = text.linkTrimmed.lowercased()
        let units: [(String, Double)] = [("kib", 1024), ("mib", 1_048_576), ("gib", 1_073_741_824), ("kb", 1024), ("mb", 1_048_576), ("gb", 1_073_741_824),
                                         ("k", 1024), ("m", 1_048_576), ("g", 1_073_741_824), ("b", 1), ("", 1)]
        for (suffix, mult) in units where s.hasSuffix(suffix) {
            guard let v = Double(s.dropLast(suffix.count)), v.isFinite else { continue }
            guard v > 0, v * mult <= Double(Int.max / 2) else { throw LinkProfileError("\(what) '\(text)' is out of range") }
            return Int(v * mult)
        }
        throw LinkProfileError("bad \(what) '\(text)': expected bytes, e.g. 4MiB or 65536")
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    static func nanoseconds(_ d: Duration) -> Int64 {
        d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000
    }

    static func format(_ d: Duration) -> String {
        let ns = nanoseconds(d)
        if ns == 0 { return "0" }
        if ns % 1_000_000_000 == 0 { return "\(ns / 1_000_000_000)s" }
        if ns % 1_000_000 == 0 { return "\(ns / 1_000_000)ms" }
        if ns % 1000 == 0 { return "\(ns / 1000)us" }
        return "\(ns)ns"
    }

    static func formatRate(_ r: Int64) -> String {
        if r % 1_000_000_000 == 0 { return "\(r / 1_000_000_000)gbit" }
        if r % 1_000_000 == 0 { return "\(r / 1_000_000)mbit" }
        if r % 1000 == 0 { return "\(r / 1000)kbit" }
        return "\(r)bit"
    }

    static func formatLoss(_ l: Double) -> String {
        l == 0 ? "0" : "\((l * 100 * 1000).rounded() / 1000)%"
    }
}

public struct LinkProfileError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ d: String) { description = d }
}

extension String {
    var linkTrimmed: String {
        String(self.drop(while: { $0 == " " || $0 == "\t" }).reversed().drop(while: { $0 == " " || $0 == "\t" }).reversed())
    }
}
