import Foundation
import TOMLKit

/// A mesh described in one TOML file (`topology/*.toml`): its CA, replication, and every node.
///
/// ```toml
/// name = "lan-4"
/// ca = "../certs/out/ca.pem"       # relative paths are relative to this file
/// replication = 2                   # R: copies of every acknowledged blob
/// write_quorum = 1                  # W: copies durable before a write is acknowledged
/// [[nodes]]
/// name = "origin"
/// role = "origin"                   # or "peer"
/// tcp = "127.0.0.1:9440"
/// quic = "127.0.0.1:9440"           # UDP (HTTP/3); optional
/// advertise_tcp = "10.0.0.5:9440"   # what other nodes dial, if not `tcp` (NAT, a relay); optional
/// advertise_quic = "10.0.0.5:9440"  # likewise for `quic`; optional
/// data_dir = "/tmp/cachemesh-lan-4/origin"
/// max_bytes = "2G"
/// cert = "../certs/out/origin.pem"
/// key = "../certs/out/origin.key"
/// seeds = []
///
/// [fetch]                           # optional; these are the defaults
/// strategy = "hedged"               # hedged | immediate | peers-only | origin-only
/// transport = "quic"                # quic (TCP fallback) | tcp
/// origin_write_through = false      # also copy every write to the origin before acknowledging
///
/// [quic]                            # optional
/// max_datagram = 8952               # UDP payload QUIC sends between (and to) these nodes; default:
///                                   # 1452 with path MTU discovery. Only where every path carries
///                                   # it (9000-byte jumbo frames: 8952).
/// address_validation = "auto"       # Retry before new connections: auto (under a handshake
///                                   # flood) | always | never
/// ```
public struct Topology: Sendable {
    public enum Role: String, Sendable, Codable {
        case origin, peer
    }

    public struct Node: Sendable {
        public var name: String
        public var role: Role
        public var tcp: HostPort
        public var quic: HostPort?
        /// What other nodes dial to reach this one (default: the listen addresses).
        public var advertiseTCP: HostPort
        public var advertiseQUIC: HostPort?
        public var dataDirectory: String
        public var maxBytes: Int64
        public var certificate: String
        public var privateKey: String
        public var seeds: [String]
    }

    public var name: String
    public var ca: String
    public var replication: Int
    public var writeQuorum: Int
    public var fetch: FetchSettings
    /// `[quic] max_datagram` (nil: 1452 with path MTU discovery).
    public var quicMaxDatagram: Int?
    /// `[quic] address_validation`.
    public var quicAddressValidation: QUICAddressValidationMode = .auto
    public var nodes: [Node]

    public var origin: Node? { nodes.first { $0.role == .origin } }

    public func node(named n: String) -> Node? { nodes.first { $0.name == n } }

    private struct File: Decodable {
        var name: String
        var ca: String
        var replication: Int?
        var write_quorum: Int?
        var fetch: FetchEntry?
        var quic: QUICEntry?
        var nodes: [NodeEntry]
    }

    private struct QUICEntry: Decodable {
        var max_datagram: Int?
        var address_validation: String?
    }

    private struct FetchEntry: Decodable {
        var strategy: String?
        var transport: String?
        var origin_write_through: Bool?
    }

    private struct NodeEntry: Decodable {
        var name: String
        var role: Role?
        var tcp: String
        var quic: String?
        var advertise_tcp: String?
        var advertise_quic: String?
        var data_dir: String
        var max_bytes: String?
        var cert: String
        var key: String
        var seeds: [String]?
    }

    public static func load(path: String) throws -> Topology {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigurationError("cannot read topology \(path): \(error.localizedDescription)")
        }
        let file: File
        do { file = try TOMLDecoder().decode(File.self, from: text) } catch {
            throw ConfigurationError("topology \(path) is not valid: \(error)")
        }
        let base = URL(fileURLWithPath: path).absoluteURL.deletingLastPathComponent()
        func resolve(_ p: String) -> String { p.hasPrefix("/") ? p : base.appendingPathComponent(p).standardized.path }
        var nodes: [Node] = []
        for n in file.nodes {
            guard let tcp = HostPort(n.tcp) else { throw ConfigurationError("topology \(path): node \(n.name): tcp '\(n.tcp)' is not host:port") }
            func address(_ key: String, _ value: String?) throws -> HostPort? {
                guard let value else { return nil }
                guard let hp = HostPort(value) else { throw ConfigurationError("topology \(path): node \(n.name): \(key) '\(value)' is not host:port") }
                return hp
            }
            let quic = try address("quic", n.quic)
            let advertiseTCP = try address("advertise_tcp", n.advertise_tcp) ?? tcp
            let advertiseQUIC = try address("advertise_quic", n.advertise_quic) ?? quic
            if advertiseQUIC != nil && quic == nil {
                throw ConfigurationError("topology \(path): node \(n.name): advertise_quic needs a quic listen address")
            }
            var maxBytes: Int64 = 10 << 30
            if let m = n.max_bytes {
                guard let v = ByteSize.parse(m) else { throw ConfigurationError("topology \(path): node \(n.name): max_bytes '\(m)' is not a size") }
                maxBytes = v
            }
            nodes.append(Node(name: n.name, role: n.role ?? .peer, tcp: tcp, quic: quic, advertiseTCP: advertiseTCP, advertiseQUIC: advertiseQUIC,
                              dataDirectory: resolve(n.data_dir),
                              maxBytes: maxBytes, certificate: resolve(n.cert), privateKey: resolve(n.key), seeds: n.seeds ?? []))
        }
        var fetch = FetchSettings()
        if let f = file.fetch {
            if let v = f.strategy {
                guard let st = FetchStrategy(rawValue: v) else {
                    throw ConfigurationError("topology \(path): fetch.strategy '\(v)' is not one of \(FetchStrategy.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                fetch.strategy = st
            }
            if let v = f.transport {
                guard let tr = MeshTransportKind(rawValue: v) else { throw ConfigurationError("topology \(path): fetch.transport '\(v)' is not quic or tcp") }
                fetch.transport = tr
            }
            fetch.originWriteThrough = f.origin_write_through ?? false
        }
        var t = Topology(name: file.name, ca: resolve(file.ca), replication: file.replication ?? 2, writeQuorum: file.write_quorum ?? 1,
                         fetch: fetch, quicMaxDatagram: file.quic?.max_datagram, nodes: nodes)
        if let v = file.quic?.address_validation {
            t.quicAddressValidation = try QUICAddressValidationMode.parse(v, key: "topology \(path): [quic] address_validation")
        }
        try t.validate(path: path)
        return t
    }

    func validate(path: String) throws {
        let names = nodes.map(\.name)
        if Set(names).count != names.count { throw ConfigurationError("topology \(path): node names must be unique") }
        if nodes.filter({ $0.role == .origin }).count > 1 { throw ConfigurationError("topology \(path): at most one origin") }
        if replication < 1 { throw ConfigurationError("topology \(path): replication must be >= 1") }
        if writeQuorum < 1 || writeQuorum > replication { throw ConfigurationError("topology \(path): write_quorum must be in 1...replication") }
        for n in nodes {
            for s in n.seeds where !names.contains(s) {
                throw ConfigurationError("topology \(path): node \(n.name) has unknown seed '\(s)'")
            }
        }
        let tcp = nodes.map { "\($0.advertiseTCP)" }
        if Set(tcp).count != tcp.count { throw ConfigurationError("topology \(path): two nodes share a tcp address") }
        do { try NodeConfiguration.checkDatagramSize(quicMaxDatagram, key: "[quic] max_datagram") } catch { throw ConfigurationError("topology \(path): \(error)") }
        if fetch.originWriteThrough && origin == nil {
            throw ConfigurationError("topology \(path): fetch.origin_write_through needs a node with role = \"origin\"")
        }
    }

    /// The node configuration for `name` (TLS on, mTLS required: mesh-internal routes need node certificates).
    public func configuration(for name: String) throws -> NodeConfiguration {
        guard let n = node(named: name) else {
            throw ConfigurationError("no node '\(name)' in topology \(self.name) (nodes: \(nodes.map(\.name).joined(separator: ", ")))")
        }
        var c = NodeConfiguration()
        c.name = n.name
        c.listen = n.tcp
        c.quicListen = n.quic
        c.dataDirectory = n.dataDirectory
        c.maxBytes = n.maxBytes
        c.certificate = n.certificate
        c.privateKey = n.privateKey
        c.ca = ca
        c.quicMaxDatagram = quicMaxDatagram
        c.quicAddressValidation = quicAddressValidation
        return c
    }
}

/// How a node that lacks a blob gets it.
public enum FetchStrategy: String, Sendable, CaseIterable {
    /// Best holder first, the next after an adaptive delay (a high percentile of recent fetches).
    case hedged
    /// Every holder and the origin at once; the first verified body wins.
    case immediate
    /// Holders one at a time (best RTT first); the origin only when every holder failed.
    case peersOnly = "peers-only"
    /// The origin only (the baseline without a mesh).
    case originOnly = "origin-only"
}

/// Mesh-wide fetch settings (`[fetch]` in a topology).
public struct FetchSettings: Sendable {
    public var strategy: FetchStrategy = .hedged
    /// Between nodes: HTTP/3 over QUIC with HTTP/2 fallback, or HTTP/2 only.
    public var transport: MeshTransportKind = .quic
    /// Every write is also copied to the origin, and acknowledged only once the origin has it.
    public var originWriteThrough = false
    public init() {}
}
