/// What a node accepts from the wire. Gossip arrives from other processes — buggy ones, or ones
/// whose certificate leaked — so every number and count is bounded before it reaches the state
/// machines, and only nodes the configuration names may become members.
public struct GossipLimits: Sendable, Hashable {
    /// Incarnations grow by one per refutation, leave or metadata change: 2^53 is unreachable by
    /// an honest node (and exact in every JSON parser), so anything above is a forgery.
    public var maxIncarnation: UInt64 = 1 << 53
    /// Locality versions grow by one per store or eviction: the same reasoning.
    public var maxVersion: UInt64 = 1 << 53
    /// Member updates in one message (push-pull carries every member).
    public var maxMembers = 4096
    /// Locality facts in one message (push-pull carries 4,096 own + 4,096 relayed by default).
    public var maxLocality = 16_384
    /// Bytes of a node name (a DNS name is at most 253).
    public var maxNameBytes = 253
    /// Bytes of an advertised endpoint ("host:port").
    public var maxEndpointBytes = 300
    /// Largest blob size a locality fact may claim (1 PiB).
    public var maxBlobSize: Int64 = 1 << 50
    /// Blobs in one holdings page (65,536 × 40 bytes ≈ 3.5 MB of base64).
    public var maxHoldings = 65_536

    public init() {}
}

/// Why a received message was refused as a whole. `description` is safe to log and to answer with.
public enum GossipRejection: Error, Hashable, Sendable, CustomStringConvertible {
    /// More entries than the limit.
    case tooMany(String, count: Int, limit: Int)
    /// A number outside its range (e.g. an incarnation above `maxIncarnation`).
    case outOfRange(String, value: String)
    /// A name or endpoint that is empty, too long or holds control characters.
    case badString(String)
    /// The sender is not a node this one admits.
    case senderNotAdmitted(String)

    public var description: String {
        switch self {
        case .tooMany(let what, let count, let limit): return "\(count) \(what) in one message (at most \(limit))"
        case .outOfRange(let what, let value): return "\(what) \(value) is out of range"
        case .badString(let what): return "bad \(what)"
        case .senderNotAdmitted(let name): return "node \(String(reflecting: String(name.prefix(64)))) is not a member of this mesh"
        }
    }
}

/// Which nodes may be members, and as what. `nil` admits anyone (simulations, unit tests); a node
/// started from a topology admits exactly the topology's nodes, each only with the metadata the
/// topology gives it (role and advertised endpoints), so a member cannot claim to be the origin or
/// point others at an address that is not its own.
public struct Admission: Sendable, Hashable {
    public var expected: [String: NodeMetadata]?

    public init(expected: [String: NodeMetadata]? = nil) { self.expected = expected }

    public static let anyone = Admission()

    public func admits(name: String) -> Bool { expected.map { $0[name] != nil } ?? true }

    public func admits(_ update: MemberUpdate) -> Bool {
        guard let expected else { return true }
        return update.node.name == update.metadata.name && expected[update.node.name] == update.metadata
    }
}

extension Envelope {
    /// Checks every count, number and string against `limits`; the message is refused whole.
    public func validate(_ limits: GossipLimits) throws(GossipRejection) {
        try Self.check(name: from.name, limits)
        let members: [MemberUpdate], locality: [LocalityUpdate]
        switch message {
        case .ping(_, let target, let g), .pingReq(_, let target, let g):
            try Self.check(name: target.name, limits)
            (members, locality) = (g.members, g.locality)
        case .ack(_, let g), .gossip(let g):
            (members, locality) = (g.members, g.locality)
        case .pushPull(let s, _):
            (members, locality) = (s.members, s.locality)
            if let h = s.holdings { try Self.check(h, limits) }
        }
        guard members.count <= limits.maxMembers else { throw .tooMany("member updates", count: members.count, limit: limits.maxMembers) }
        guard locality.count <= limits.maxLocality else { throw .tooMany("locality facts", count: locality.count, limit: limits.maxLocality) }
        for u in members {
            guard u.incarnation <= limits.maxIncarnation else { throw .outOfRange("incarnation of \(u.node.name.prefix(64))", value: "\(u.incarnation)") }
            try Self.check(name: u.node.name, limits)
            try Self.check(name: u.metadata.name, limits)
            try Self.check(name: u.metadata.certificateCN, limits)
            for ep in [u.metadata.tcpEndpoint, u.metadata.quicEndpoint] where ep.utf8.count > limits.maxEndpointBytes || Self.hasControl(ep) {
                throw .badString("endpoint of \(u.node.name.prefix(64))")
            }
        }
        for u in locality {
            guard u.version <= limits.maxVersion else { throw .outOfRange("locality version", value: "\(u.version)") }
            guard u.digest.size >= 0, u.digest.size <= limits.maxBlobSize else { throw .outOfRange("blob size", value: "\(u.digest.size)") }
            try Self.check(name: u.holder.name, limits)
        }
    }

    private static func check(_ h: HoldingsPage, _ limits: GossipLimits) throws(GossipRejection) {
        guard h.count <= limits.maxHoldings else { throw .tooMany("held blobs", count: h.count, limit: limits.maxHoldings) }
        guard h.version <= limits.maxVersion else { throw .outOfRange("holdings version", value: "\(h.version)") }
        guard h.page >= 0, h.pages >= 0, h.page <= h.pages else { throw .outOfRange("holdings page", value: "\(h.page) of \(h.pages)") }
        guard let digests = h.digests() else { throw .badString("holdings records (not base64 of 40-byte records)") }
        for d in digests where d.size < 0 || d.size > limits.maxBlobSize {
            throw .outOfRange("blob size", value: "\(d.size)")
        }
    }

    private static func check(name: String, _ limits: GossipLimits) throws(GossipRejection) {
        guard !name.isEmpty, name.utf8.count <= limits.maxNameBytes, !hasControl(name) else {
            throw .badString("node name \(String(reflecting: String(name.prefix(64))))")
        }
    }

    private static func hasControl(_ s: String) -> Bool { s.utf8.contains { $0 < 0x20 || $0 == 0x7f } }
}

extension UInt64 {
    /// `self + 1`, staying at `limit` instead of passing it (or trapping at `UInt64.max`).
    func incremented(upTo limit: UInt64) -> UInt64 { self < limit ? self + 1 : limit }
}
