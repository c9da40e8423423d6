import FoundationEssentials  // base64 of holdings pages

/// Member status in the SWIM family. Precedence for equal incarnations: left > dead > suspect > alive.
public enum MemberStatus: String, Codable, Sendable, Hashable {
    case alive
    case suspect
    case dead
    case left

    /// Alive or suspect: still a member that may be probed, gossiped to and counted.
    public var isLive: Bool { self == .alive || self == .suspect }
}

/// One membership fact, gossiped and exchanged in push-pull.
public struct MemberUpdate: Codable, Hashable, Sendable {
    public var node: NodeID
    public var incarnation: UInt64
    public var status: MemberStatus
    public var metadata: NodeMetadata

    public init(node: NodeID, incarnation: UInt64, status: MemberStatus, metadata: NodeMetadata) {
        self.node = node
        self.incarnation = incarnation
        self.status = status
        self.metadata = metadata
    }
}

/// One locality fact: `holder` has (`present`) or no longer has (`!present`) `digest`, as of the
/// holder's per-node `version` counter. `ageMs` is how long ago the holder asserted it (relayed facts
/// keep ageing; only the holder's own re-assertion resets the age), so TTLs work across nodes without
/// synchronised clocks.
public struct LocalityUpdate: Codable, Hashable, Sendable {
    public var holder: NodeID
    public var digest: Digest
    public var present: Bool
    public var version: UInt64
    public var ageMs: UInt32

    public init(holder: NodeID, digest: Digest, present: Bool, version: UInt64, ageMs: UInt32) {
        self.holder = holder
        self.digest = digest
        self.present = present
        self.version = version
        self.ageMs = ageMs
    }
}

/// The piggybacked part of every membership message.
public struct Gossip: Codable, Hashable, Sendable {
    public var members: [MemberUpdate]
    public var locality: [LocalityUpdate]

    public init(members: [MemberUpdate] = [], locality: [LocalityUpdate] = []) {
        self.members = members
        self.locality = locality
    }

    public var isEmpty: Bool { members.isEmpty && locality.isEmpty }
}

/// A full-state exchange for anti-entropy.
public struct PushPullState: Codable, Hashable, Sendable {
    public var members: [MemberUpdate]
    /// Relayed facts about other holders.
    public var locality: [LocalityUpdate]
    /// The sender's own holdings, one page of them (absent from older senders).
    public var holdings: HoldingsPage?

    public init(members: [MemberUpdate] = [], locality: [LocalityUpdate] = [], holdings: HoldingsPage? = nil) {
        self.members = members
        self.locality = locality
        self.holdings = holdings
    }
}

/// One page of the sender's own holdings, compact: 40 bytes per blob (32-byte SHA-256 and 8-byte
/// big-endian size, base64) instead of a ~200-byte locality fact, so a node can announce a large
/// store in a few messages. Every blob in the page is a `present` fact of the sender at `version`
/// — the sender's counter when it sent the page, newer than every fact it sent before, so the
/// page cannot undo a later `lost`, and a later `lost` replaces it.
public struct HoldingsPage: Codable, Hashable, Sendable {
    public var version: UInt64
    /// This page's number and how many the sender's store takes at the current page size.
    public var page: Int
    public var pages: Int
    public var records: String

    public static let recordBytes = 40

    public init(version: UInt64, page: Int, pages: Int, digests: [Digest]) {
        self.version = version
        self.page = page
        self.pages = pages
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digests.count * Self.recordBytes)
        for d in digests {
            for w in [d.w0, d.w1, d.w2, d.w3, UInt64(bitPattern: d.size)] {
                withUnsafeBytes(of: w.bigEndian) { bytes.append(contentsOf: $0) }
            }
        }
        records = Data(bytes).base64EncodedString()
    }

    /// Records in the page, from the encoded length (no decoding).
    public var count: Int { records.utf8.count / 4 * 3 / Self.recordBytes }

    /// The digests, or nil when `records` is not base64 of whole records.
    public func digests() -> [Digest]? {
        guard let data = Data(base64Encoded: records), data.count % Self.recordBytes == 0 else { return nil }
        return data.withUnsafeBytes { raw -> [Digest] in
            stride(from: 0, to: raw.count, by: Self.recordBytes).map { o in
                func word(_ i: Int) -> UInt64 { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: o + 8 * i, as: UInt64.self)) }
                return Digest(w0: word(0), w1: word(1), w2: word(2), w3: word(3), size: Int64(bitPattern: word(4)))
            }
        }
    }
}

/// Mesh-internal protocol messages. Codable (JSON is fine); the shell sends them wrapped in an
/// `Envelope` over the mesh-internal routes.
public enum Message: Codable, Hashable, Sendable {
    /// Direct probe of `target`; the target answers `ack(seq)`. A node ignores pings for another
    /// `target` (e.g. an earlier process with the same name).
    case ping(seq: UInt64, target: NodeID, gossip: Gossip)
    case ack(seq: UInt64, gossip: Gossip)
    /// Ask the receiver to probe `target` on the sender's behalf and relay the ack with `seq`.
    case pingReq(seq: UInt64, target: NodeID, gossip: Gossip)
    /// Pure gossip (every gossip interval to a few random members).
    case gossip(Gossip)
    /// Full-state anti-entropy; the receiver of a non-reply answers with its own state.
    case pushPull(PushPullState, isReply: Bool)

    /// The same message with its locality facts replaced by `transform(facts)`.
    public func withLocality(_ transform: ([LocalityUpdate]) -> [LocalityUpdate]) -> Message {
        switch self {
        case .ping(let seq, let target, var g):
            g.locality = transform(g.locality)
            return .ping(seq: seq, target: target, gossip: g)
        case .ack(let seq, var g):
            g.locality = transform(g.locality)
            return .ack(seq: seq, gossip: g)
        case .pingReq(let seq, let target, var g):
            g.locality = transform(g.locality)
            return .pingReq(seq: seq, target: target, gossip: g)
        case .gossip(var g):
            g.locality = transform(g.locality)
            return .gossip(g)
        case .pushPull(var s, let isReply):
            s.locality = transform(s.locality)
            return .pushPull(s, isReply: isReply)
        }
    }

    public var gossip: Gossip? {
        switch self {
        case .ping(_, _, let g), .ack(_, let g), .pingReq(_, _, let g), .gossip(let g): return g
        case .pushPull: return nil
        }
    }
}

/// What goes on the wire: the sender's identity plus the message. The shell checks `from.name`
/// against the peer certificate before handing the message to `receive(_:from:now:)`.
public struct Envelope: Codable, Hashable, Sendable {
    public var from: NodeID
    public var message: Message

    public init(from: NodeID, message: Message) {
        self.from = from
        self.message = message
    }
}

/// A change of one member as seen by this node.
public struct MemberEvent: Hashable, Sendable {
    public var node: NodeID
    public var metadata: NodeMetadata
    /// nil when the member was unknown before.
    public var previous: MemberStatus?
    public var status: MemberStatus
    public var incarnation: UInt64

    public init(node: NodeID, metadata: NodeMetadata, previous: MemberStatus?, status: MemberStatus, incarnation: UInt64) {
        self.node = node
        self.metadata = metadata
        self.previous = previous
        self.status = status
        self.incarnation = incarnation
    }
}

/// What the shell must do.
public enum MeshAction: Hashable, Sendable {
    /// Send `message` to a known member (endpoints from its metadata; QUIC preferred, TCP fallback).
    case send(Message, to: NodeID)
    /// Send `message` to a seed address whose NodeID is not known yet (joining).
    case sendToAddress(Message, address: String)
    /// A member joined or changed status.
    case memberChanged(MemberEvent)
    /// A direct probe measured a round-trip time to this member.
    case rttMeasured(NodeID, Duration)
}
