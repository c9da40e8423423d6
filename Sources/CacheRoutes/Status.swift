import Foundation
import MeshShell

/// What `GET /status` answers (JSON, snake_case keys; docs/cli.md lists every field) and what
/// `cachemesh status` shows. Built with `JSONEncoder` only: names and certificate subjects are
/// escaped like any other string.
public struct NodeStatus: Codable, Sendable, Equatable {
    /// The node's name (`--name`, or its name in the topology).
    public var name: String
    /// `standalone` (no topology), or the mesh role: `origin` or `peer`.
    public var role: String
    public var listen: Listeners
    public var uptimeSeconds: Int64
    /// True once the node got SIGTERM/SIGINT and is draining.
    public var draining: Bool
    /// Who asked, as this node sees the caller's certificate.
    public var you: Caller
    public var store: Store
    /// Present on a mesh node.
    public var mesh: MeshStatus?

    public struct Listeners: Codable, Sendable, Equatable {
        /// HTTP/2 over TLS (or h2c with --insecure), "host:port".
        public var tcp: String?
        /// QUIC + HTTP/3 (UDP), "host:port"; absent without --quic-listen.
        public var quic: String?
        /// The local worker endpoint (plaintext HTTP/1.1, h2c, gRPC): "host:port"; absent without --local-listen.
        public var local: String?
        /// The local endpoint's unix socket path; absent without --local-socket.
        public var localSocket: String?
        /// The role the local endpoint gives its callers (`client` or `reader`); absent without one.
        public var localRole: String?
        public init(tcp: String? = nil, quic: String? = nil, local: String? = nil, localSocket: String? = nil, localRole: String? = nil) {
            self.tcp = tcp
            self.quic = quic
            self.local = local
            self.localSocket = localSocket
            self.localRole = localRole
        }
    }

    public struct Caller: Codable, Sendable, Equatable {
        /// Subject CN of the caller's certificate; absent without one.
        public var commonName: String?
        /// `node`, `client` or `reader`; absent when the certificate carries no role.
        public var role: String?
        /// False without a verified certificate (anonymous reader, --insecure).
        public var authenticated: Bool

        public init(commonName: String?, role: String?, authenticated: Bool) {
            self.commonName = commonName
            self.role = role
            self.authenticated = authenticated
        }
    }

    public struct Store: Codable, Sendable, Equatable {
        public var usedBytes: Int64
        public var reservedBytes: Int64
        public var maxBytes: Int64
        public var blobs: Int
        public var actions: Int
        /// Lookups of this node's store that found the blob / did not.
        public var hits: Int64
        public var misses: Int64
        /// hits / (hits + misses); absent before the first lookup.
        public var hitRatio: Double?
        public var evictions: Int64
        public var bytesIn: Int64
        public var bytesOut: Int64
        public var rejectedWrites: Int64
        /// The startup scan of the data directory (the node serves meanwhile).
        public var index: StoreIndex?
    }

    public struct StoreIndex: Codable, Sendable, Equatable {
        /// Every file on disk is indexed.
        public var complete: Bool
        public var scannedDirectories: Int
        public var totalDirectories: Int
        /// Entries the scan has indexed so far.
        public var scannedEntries: Int
    }

    /// snake_case keys, sorted (the mesh part uses the same: `MeshStatus.encoder()`).
    public static func encoder() -> JSONEncoder { MeshStatus.encoder() }

    public static func decoder() -> JSONDecoder { MeshStatus.decoder() }
}
