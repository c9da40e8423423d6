import Foundation

/// The mesh part of `GET /status` (`NodeStatus.mesh`), and what `GET /mesh/status` answers.
public struct MeshStatus: Codable, Sendable, Equatable {
    /// The topology's name.
    public var topology: String
    public var replication: Int
    public var writeQuorum: Int
    /// `hedged`, `immediate`, `peers-only` or `origin-only`.
    public var fetchStrategy: String
    /// Transport preferred between nodes: `quic` (TCP fallback) or `tcp`.
    public var transport: String
    /// Members in state alive or suspect, this node included.
    public var liveMembers: Int
    /// Every member this node knows, itself included. Absent for a caller without a
    /// certificate (an anonymous reader): certificate holders only.
    public var members: [Member]?
    /// Digests (and bytes) of the locality map: who holds what, as gossiped.
    public var localityEntries: Int
    public var localityBytes: Int
    public var fetch: Fetch

    public struct Member: Codable, Sendable, Equatable {
        public var name: String
        /// `origin` or `peer`.
        public var role: String
        /// `alive`, `suspect`, `dead` or `left`.
        public var status: String
        public var incarnation: UInt64
        /// Where other nodes reach it.
        public var tcp: String
        public var quic: String?
        /// How this node reaches it now: `quic`, `tcp` (no QUIC endpoint, QUIC not preferred,
        /// or its QUIC handshake failed lately), or `self`.
        public var transport: String
    }

    /// Blobs this node lacked and fetched from the mesh (the worker role).
    public struct Fetch: Codable, Sendable, Equatable {
        /// Races won by a peer's copy / by the origin's.
        public var peerWins: Int64
        public var originWins: Int64
        /// Fetches no source could serve.
        public var failures: Int64
        /// peerWins / (peerWins + originWins); absent before the first fetch.
        public var peerRatio: Double?
    }

    /// The JSON of `/status` and `/mesh/status`: snake_case keys, sorted.
    public static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.keyEncodingStrategy = .convertToSnakeCase
        e.outputFormatting = [.sortedKeys]
        return e
    }

    public static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return d
    }

    package static func ratio(_ part: Int64, of whole: Int64) -> Double? {
        whole > 0 ? Double(part) / Double(whole) : nil
    }
}
