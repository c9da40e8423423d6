import Foundation
import MeshCore
import MeshHTTP
import MeshShell
import MeshTLS
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
/// local = "127.0.0.1:9080"          # plaintext endpoint for this machine's build tools; optional
/// local_socket = "/run/cachemesh.sock"  # the same on a unix socket (mode 0660); optional
/// local_role = "client"             # the role the local endpoint gives (client | reader)
///
/// [fetch]                           # optional; these are the defaults
/// strategy = "hedged"               # hedged | immediate | peers-only | origin-only
/// transport = "quic"                # quic (TCP fallback) | tcp | adaptive (per peer, by measured latency/goodput)
/// origin_write_through = false      # also copy every write to the origin before acknowledging
///
/// [limits]                          # optional: the budget keys of a node config, for every
///                                   # node (max_connections, max_header_list_bytes, …; README),
///                                   # and the store's durability, scan_rate, min_ttl_seconds
///
/// [repair]                          # optional: anti-entropy (blobs onto their R owners)
/// interval_seconds = 120            # between passes when membership does not change
/// blobs_per_second = 20000          # the walk's rate bound
/// enabled = true                    # false: blobs stay where they were written (benchmarks
///                                   # that place blobs by hand; never in production)
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
        /// The local worker endpoint (loopback TCP, unix socket) and its role; optional.
        public var local: HostPort? = nil
        public var localSocket: String? = nil
        public var localRole: PeerRole = .client
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
    /// `[repair]`: anti-entropy pacing.
    public var repair = RepairSettings()
    /// `[limits]`: the budget keys of a node config (`NodeConfiguration.budgetKeys`) for every node.
    public var limits = NodeConfiguration()
    /// `[origin] backend = "s3"`: every node with role = "origin" keeps its blobs in this bucket
    /// (several origins may then share it). Credentials never come from the topology.
    public var s3Origin: S3OriginSettings?
    public var nodes: [Node]

    public var origin: Node? { nodes.first { $0.role == .origin } }

    public func node(named n: String) -> Node? { nodes.first { $0.name == n } }

    public static func load(path: String) throws -> Topology {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigurationError("cannot read topology \(path): \(describeFileError(error))")
        }
        return try load(text: text, path: path)
    }

    /// The keys a topology may hold, per table.
    public static let fileKeys = ["name", "ca", "replication", "write_quorum", "fetch", "quic", "limits", "repair", "origin", "nodes"]
    public static let nodeKeys = ["name", "role", "tcp", "quic", "advertise_tcp", "advertise_quic", "data_dir", "max_bytes", "cert", "key", "seeds", "local", "local_socket", "local_role"]
    public static let fetchKeys = ["strategy", "transport", "origin_write_through"]
    public static let quicKeys = ["max_datagram", "address_validation"]
    public static let repairKeys = ["interval_seconds", "blobs_per_second", "enabled"]

    /// `load(path:)` of a text already read (`path` names it in errors and anchors relative paths).
    public static func load(text: String, path: String) throws -> Topology {
        let (_, file) = try StrictTOML.parse(text, what: "topology \(path)")
        try file.only(fileKeys)
        let base = URL(fileURLWithPath: path).absoluteURL.deletingLastPathComponent()
        func resolve(_ p: String) -> String { p.hasPrefix("/") ? p : base.appendingPathComponent(p).standardized.path }
        let name = try file.required("name", "a string", file.string)
        let ca = try file.required("ca", "the mesh CA certificate file, a string", file.string)
        let replication = try file.int("replication") ?? 2
        let writeQuorum = try file.int("write_quorum") ?? 1
        var fetch = FetchSettings()
        if let f = try file.table("fetch", known: fetchKeys) {
            if let v = try f.choice("strategy", FetchStrategy.allCases.map { ($0.rawValue, $0) }) { fetch.strategy = v }
            if let v = try f.choice("transport", [("quic", (MeshTransportKind.quic, false)), ("tcp", (MeshTransportKind.tcp, false)),
                                                  ("adaptive", (MeshTransportKind.quic, true))]) {
                (fetch.transport, fetch.adaptiveTransport) = v
            }
            fetch.originWriteThrough = try f.bool("origin_write_through") ?? false
        }
        var quicMaxDatagram: Int?
        var quicAddressValidation = QUICAddressValidationMode.auto
        var limits = NodeConfiguration()
        if let l = try file.table("limits", known: NodeConfiguration.budgetKeys) { try limits.applyBudgets(from: l) }
        if let q = try file.table("quic", known: quicKeys) {
            quicMaxDatagram = try q.int("max_datagram")
            if let v = try q.choice("address_validation", QUICAddressValidationMode.allCases.map { ($0.rawValue, $0) }) { quicAddressValidation = v }
        }
        var repair = RepairSettings()
        if let r = try file.table("repair", known: repairKeys) {
            if let v = try r.int("interval_seconds") {
                guard v >= 1 else { throw r.error("interval_seconds", "'interval_seconds' must be at least 1, got \(v)") }
                repair.intervalSeconds = v
            }
            repair.enabled = try r.bool("enabled") ?? true
            if let v = try r.int("blobs_per_second") {
                guard v >= 1 else { throw r.error("blobs_per_second", "'blobs_per_second' must be at least 1, got \(v)") }
                repair.blobsPerSecond = v
            }
        }
        var nodes: [Node] = []
        for n in try file.required("nodes", "at least one [[nodes]] table", { try file.tables($0, known: nodeKeys) }) {
            let tcp = try n.required("tcp", "host:port", n.hostPort)
            let quic = try n.hostPort("quic")
            let advertiseQUIC = try n.hostPort("advertise_quic") ?? quic
            if advertiseQUIC != nil && quic == nil {
                throw n.error("advertise_quic", "advertise_quic needs a quic listen address")
            }
            nodes.append(Node(name: try n.required("name", "a string", n.string),
                              role: try n.choice("role", [("origin", Role.origin), ("peer", Role.peer)]) ?? .peer,
                              tcp: tcp, quic: quic,
                              advertiseTCP: try n.hostPort("advertise_tcp") ?? tcp, advertiseQUIC: advertiseQUIC,
                              dataDirectory: resolve(try n.required("data_dir", "a directory, a string", n.string)),
                              maxBytes: try n.size("max_bytes") ?? 10 << 30,
                              certificate: resolve(try n.required("cert", "the node certificate file, a string", n.string)),
                              privateKey: resolve(try n.required("key", "the node private key file, a string", n.string)),
                              seeds: try n.strings("seeds") ?? [],
                              local: try n.hostPort("local"),
                              localSocket: try n.string("local_socket").map(resolve),
                              localRole: try n.choice("local_role", [("client", PeerRole.client), ("reader", PeerRole.reader)]) ?? .client))
        }
        var t = Topology(name: name, ca: resolve(ca), replication: replication, writeQuorum: writeQuorum,
                         fetch: fetch, quicMaxDatagram: quicMaxDatagram, nodes: nodes)
        t.quicAddressValidation = quicAddressValidation
        t.limits = limits
        t.repair = repair
        t.s3Origin = try S3OriginSettings.parse(file, resolve: resolve)
        try t.validate(path: path)
        return t
    }

    func validate(path: String) throws {
        let names = nodes.map(\.name)
        if Set(names).count != names.count { throw ConfigurationError("topology \(path): node names must be unique") }
        if nodes.filter({ $0.role == .origin }).count > 1 && s3Origin == nil {
            throw ConfigurationError("topology \(path): at most one origin (several origins need a shared durable tier: [origin] backend = \"s3\")")
        }
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
        c.copyBudgets(from: limits)
        c.localListen = n.local
        c.localSocket = n.localSocket
        c.localRole = n.localRole
        if n.role == .origin { c.s3Origin = s3Origin }
        return c
    }
}

extension MeshRoster {
    /// The mesh as topology node `name` sees it: every node with the metadata it gossips about
    /// itself (and all that others accept about it), and its seeds' endpoints.
    init(topology: Topology, node name: String) throws {
        guard let me = topology.node(named: name) else { throw ConfigurationError("no node \(name) in topology \(topology.name)") }
        func metadata(_ n: Topology.Node) -> NodeMetadata {
            NodeMetadata(name: n.name, role: n.role == .origin ? .origin : .peer, tcpEndpoint: "\(n.advertiseTCP)",
                         quicEndpoint: n.advertiseQUIC.map { "\($0)" } ?? "", certificateCN: n.name)
        }
        self.init(name: topology.name, nodes: topology.nodes.map(metadata), me: metadata(me),
                  seeds: me.seeds.compactMap { topology.node(named: $0).map { "\($0.advertiseTCP)" } })
    }
}

extension MeshService.Settings {
    /// What a topology asks for (replication, write quorum, fetch settings, repair pacing).
    init(topology: Topology) {
        self.init(replication: topology.replication, writeQuorum: topology.writeQuorum, fetch: topology.fetch)
        repair = topology.repair
    }
}
