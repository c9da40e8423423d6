import BlobStore
import Foundation
import MeshHTTP
import MeshQUIC
import MeshTLS
import TOMLKit

/// Sizes: an integer with an optional unit. Units are powers of 1024, case-insensitive:
/// `K`/`KiB`/`KB` = 1024, `M`/`MiB`/`MB` = 1024², `G`/`GiB`/`GB` = 1024³, `T`/`TiB`/`TB` = 1024⁴;
/// `B` or no unit: bytes. Refused (with the reason): negative numbers, fractions (`1.5G`: write
/// `1536M`), exponents, `inf`/`nan`, other units, and anything above `Int64.max` bytes.
public enum ByteSize {
    public struct ParseError: Error, CustomStringConvertible {
        public var input: String
        public var reason: String
        public var description: String { "'\(input)' is not a size: \(reason)" }
    }

    /// What the error messages list.
    public static let unitsHelp = "an integer with an optional unit K, M, G or T (powers of 1024; KiB, MiB, GiB, TiB, KB, MB, GB, TB mean the same; B or no unit: bytes), e.g. 10G, 512M"

    static let units: [String: Int64] = [
        "": 1, "B": 1,
        "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
        "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
        "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
        "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40,
    ]

    /// The size `s` means, or nil (see `value(_:)` for why).
    public static func parse(_ s: String) -> Int64? { try? value(s) }

    /// The size `s` means; `ParseError` says why it is not one.
    public static func value(_ s: String) throws -> Int64 {
        func fail(_ reason: String) -> ParseError { ParseError(input: s, reason: reason) }
        let t = s.trimmingCharacters(in: .whitespaces)
        guard !t.isEmpty else { throw fail("it is empty; expected \(unitsHelp)") }
        if t.hasPrefix("-") { throw fail("a size cannot be negative") }
        let digits = t.prefix { $0.isASCII && $0.isNumber }
        let rest = t.dropFirst(digits.count)
        guard !digits.isEmpty else { throw fail("expected \(unitsHelp)") }
        if rest.hasPrefix(".") || rest.hasPrefix(",") {
            throw fail("use a whole number (e.g. 1536M rather than 1.5G); expected \(unitsHelp)")
        }
        let unit = rest.trimmingCharacters(in: .whitespaces)
        if let e = unit.first, e == "e" || e == "E", unit.dropFirst().first.map({ $0.isNumber || $0 == "+" || $0 == "-" }) == true {
            throw fail("exponents are not accepted; write the whole number with a unit; expected \(unitsHelp)")
        }
        guard let multiplier = units[unit.uppercased()] else {
            throw fail("unknown unit '\(unit)'; expected \(unitsHelp)")
        }
        let maxText = multiplier == 1 ? "the largest size is \(Int64.max) bytes"
            : "the largest size is \(Int64.max / multiplier)\(unit) (\(Int64.max) bytes)"
        guard let n = Int64(digits) else { throw fail("too large; \(maxText)") }
        let (product, overflow) = n.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw fail("too large; \(maxText)") }
        return product
    }

    public static func format(_ n: Int64) -> String {
        let d = Double(n)
        if n >= 1 << 40 { return String(format: "%.2f TiB", d / Double(1 << 40)) }
        if n >= 1 << 30 { return String(format: "%.2f GiB", d / Double(1 << 30)) }
        if n >= 1 << 20 { return String(format: "%.1f MiB", d / Double(1 << 20)) }
        if n >= 1 << 10 { return String(format: "%.1f KiB", d / Double(1 << 10)) }
        return "\(n) B"
    }
}

/// A configuration file, topology or flag is wrong (the CLI exits 2: nothing was started).
public struct ConfigurationError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A listener that could not be opened: `cannot listen on 127.0.0.1:8443: address already in use`.
public struct ListenFailure: Error, CustomStringConvertible {
    public var address: String
    /// "TCP", "UDP (QUIC)".
    public var transport: String
    public var reason: String
    public var description: String {
        "cannot listen on \(address)\(transport == "TCP" ? "" : " (\(transport))"): \(reason)"
    }
}

/// "no such file or directory" rather than Foundation's "The file “x” couldn’t be opened…".
func describeFileError(_ error: any Error) -> String {
    let ns = error as NSError
    if let underlying = ns.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
        return String(cString: strerror(Int32(underlying.code))).lowercasedFirst
    }
    if ns.domain == NSPOSIXErrorDomain { return String(cString: strerror(Int32(ns.code))).lowercasedFirst }
    switch ns.code {
    case NSFileReadNoSuchFileError: return "no such file or directory"
    case NSFileReadNoPermissionError: return "permission denied"
    case NSFileReadInapplicableStringEncodingError: return "it is not UTF-8 text"
    default: return ns.localizedDescription
    }
}

extension String {
    var lowercasedFirst: String { prefix(1).lowercased() + dropFirst() }
}

/// When a node makes new QUIC clients prove their source address with a Retry round trip
/// (`HTTP3Server.AddressValidation`): `auto` only while more than 64 handshakes run at once (a
/// flood; ordinary clients pay nothing), `always` (one extra round trip per new connection), `never`.
public enum QUICAddressValidationMode: String, Sendable, CaseIterable {
    case auto, always, never

    public var policy: HTTP3Server.AddressValidation {
        switch self {
        case .auto: .whenHandshakesExceed(64)
        case .always: .always
        case .never: .never
        }
    }
}

/// Everything a node needs to run. Built from a TOML file and/or command-line flags.
public struct NodeConfiguration: Sendable {
    public var name = "node"
    public var listen = HostPort(host: "127.0.0.1", port: 8443)
    /// UDP address for QUIC + HTTP/3 (nil = no QUIC listener). Needs TLS.
    public var quicListen: HostPort?
    public var dataDirectory = "./cachemesh-data"
    public var maxBytes: Int64 = 10 << 30
    public var certificate: String?
    public var privateKey: String?
    public var ca: String?
    /// TLS stays on, but a connection without a client certificate gets the read-only `reader` role.
    public var allowUnauthenticatedReads = false
    /// Plaintext HTTP/2 (h2c). Local experiments only.
    public var insecure = false
    public var handshakeTimeoutSeconds = 10
    public var maxConcurrentWrites = 64
    public var maxOpenReads = 512
    public var drainSeconds = 30
    /// The largest UDP payload QUIC sends (nil: 1452 with path MTU discovery). Only for paths
    /// known to carry it, e.g. 8952 on a LAN with 9000-byte jumbo frames. See `QUICSettings`.
    public var quicMaxDatagram: Int?
    /// When a new QUIC client must first prove its address with a Retry round trip.
    public var quicAddressValidation: QUICAddressValidationMode = .auto
    /// Largest decoded request header list (HTTP/2 and HTTP/3, name + value + 32 per field);
    /// larger requests get 431, and a connection that keeps sending them is closed.
    public var maxHeaderListBytes = 64 * 1024
    /// Space that uploads not yet verified may free by evicting verified blobs (node-wide);
    /// nil: a quarter of `maxBytes`. See `BlobStoreConfiguration.maxUnverifiedBytes`.
    public var maxUnverifiedBytes: Int64?
    /// An upload from which no byte arrives for this long is abandoned (408): its write slot
    /// and reserved space are released.
    public var requestBodyTimeoutSeconds = 30
    /// An upload must also average this many bytes per second over each half of that timeout (a
    /// trickle of single bytes would dodge the timeout and hold its slot for ever). 0: no minimum.
    public var requestBodyMinRate = 16 * 1024
    /// A response the client takes nothing of (closed flow-control window) for this long is
    /// reset, giving back its read slot.
    public var responseStallTimeoutSeconds = 30
    /// Open TCP connections at once (HTTP/2). The node lowers it to fit its open-file limit
    /// with a quarter of that limit kept for the store.
    public var maxConnections = 4096
    /// Request-body bytes the node holds in memory at once, all connections together (see
    /// `RequestBodyBudget`): only streams whose handler reads get a flow-control window, charged
    /// to this budget. A connection takes at most an eighth of it. 0: off (each connection's own
    /// windows bound it).
    public var maxRequestBodyMemory: Int64 = 256 << 20
    /// The share (percent) of `maxOpenReads` and of `maxConcurrentWrites` one connection may hold
    /// at once; its further requests wait, so another connection always finds a slot.
    public var connectionSlotSharePercent = 25
    /// A request head (HTTP/1.1 head, HTTP/2 header block, HTTP/3 HEADERS frame) not complete this
    /// long after its first byte: the connection is closed (HTTP/3: the stream is reset).
    public var requestHeadersTimeoutSeconds = 20
    /// The local worker endpoint (plaintext HTTP/1.1, h2c, gRPC over h2c) for the build tools on
    /// this machine: a TCP address (loopback unless `localAllowRemote`) and/or a unix socket.
    public var localListen: HostPort?
    public var localSocket: String?
    /// The role the local endpoint's requests get (there is no certificate): client or reader.
    public var localRole: PeerRole = .client
    /// Allow a non-loopback `localListen` (anyone who reaches it gets `localRole` without a certificate).
    public var localAllowRemote = false
    /// `[origin] backend = "s3"`: this node's disk is a bounded cache in front of an S3 bucket
    /// (`S3Tier`). nil: the disk is all there is.
    public var s3Origin: S3OriginSettings?

    /// Files the store's startup scan examines per second at most (0: no bound). The node listens
    /// before the scan; see docs/storage.md.
    public var scanRate = 250_000
    /// Threads of the startup scan (0: the CPUs the process may run on, at most 8).
    public var scanThreads = 0
    /// What an acknowledged write means on disk: `fsync` (data synced before the rename, the
    /// directory after, concurrent writers sharing the syncs) or `none`. See docs/storage.md.
    public var durability: Durability = .fsync
    /// Blobs used within this many seconds go only after every blob unused for longer, and
    /// evicting one is counted and logged (Builds without the Bytes). See docs/storage.md.
    public var minTTLSeconds = 3 * 3600

    /// The smallest store a node runs with (a size without a unit is bytes, so `10` is refused).
    public static let minimumMaxBytes: Int64 = 1 << 20

    /// The bound in effect.
    public var effectiveMaxUnverifiedBytes: Int64 { min(maxUnverifiedBytes ?? maxBytes / 4, maxBytes) }

    public init() {}

    /// Read a `[node]`-less flat TOML file:
    /// ```toml
    /// name = "a"
    /// listen = "127.0.0.1:8443"
    /// data_dir = "/var/lib/cachemesh"
    /// max_bytes = "10G"
    /// cert = "certs/out/node.pem"
    /// key = "certs/out/node.key"
    /// ca = "certs/out/ca.pem"
    /// allow_unauthenticated_reads = false
    /// ```
    public static func load(path: String) throws -> NodeConfiguration {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigurationError("cannot read config \(path): \(describeFileError(error))")
        }
        return try load(text: text, path: path)
    }

    /// The budget keys: what a client or peer may make the node hold. The same keys are valid in a
    /// node config file and in a topology's `[limits]` table.
    public static let budgetKeys = [
        "max_concurrent_writes", "max_open_reads", "max_header_list_bytes", "max_unverified_bytes",
        "request_body_timeout_seconds", "request_body_min_rate", "response_stall_timeout_seconds", "max_connections",
        "scan_rate", "scan_threads", "durability", "min_ttl_seconds",
        "max_request_body_memory", "connection_slot_share_percent", "request_headers_timeout_seconds",
    ]

    /// The keys a node config file may hold.
    public static let fileKeys = [
        "name", "listen", "data_dir", "max_bytes", "cert", "key", "ca", "allow_unauthenticated_reads",
        "insecure", "quic_listen", "handshake_timeout_seconds", "drain_seconds",
        "quic_max_datagram", "quic_address_validation",
        "local", "local_socket", "local_role", "local_allow_remote", "origin",
    ] + budgetKeys

    /// Reads the budget keys present in `t` (see `budgetKeys`).
    public mutating func applyBudgets(from t: StrictTOMLTable) throws {
        if let v = try t.int("max_concurrent_writes") { maxConcurrentWrites = v }
        if let v = try t.int("max_open_reads") { maxOpenReads = v }
        if let v = try t.int("max_header_list_bytes") { maxHeaderListBytes = v }
        if let v = try t.size("max_unverified_bytes") { maxUnverifiedBytes = v }
        if let v = try t.int("request_body_timeout_seconds") { requestBodyTimeoutSeconds = v }
        if let v = try t.size("request_body_min_rate") { requestBodyMinRate = Int(v) }
        if let v = try t.int("response_stall_timeout_seconds") { responseStallTimeoutSeconds = v }
        if let v = try t.int("max_connections") { maxConnections = v }
        if let v = try t.int("scan_rate") { scanRate = v }
        if let v = try t.int("scan_threads") { scanThreads = v }
        if let v = try t.int("min_ttl_seconds") { minTTLSeconds = v }
        if let v = try t.choice("durability", Durability.allCases.map { ($0.rawValue, $0) }) { durability = v }
        if let v = try t.size("max_request_body_memory") { maxRequestBodyMemory = v }
        if let v = try t.int("connection_slot_share_percent") { connectionSlotSharePercent = v }
        if let v = try t.int("request_headers_timeout_seconds") { requestHeadersTimeoutSeconds = v }
    }

    /// Takes the budget values of `other` (a topology's `[limits]` for one of its nodes).
    public mutating func copyBudgets(from other: NodeConfiguration) {
        maxConcurrentWrites = other.maxConcurrentWrites
        maxOpenReads = other.maxOpenReads
        maxHeaderListBytes = other.maxHeaderListBytes
        maxUnverifiedBytes = other.maxUnverifiedBytes
        requestBodyTimeoutSeconds = other.requestBodyTimeoutSeconds
        requestBodyMinRate = other.requestBodyMinRate
        responseStallTimeoutSeconds = other.responseStallTimeoutSeconds
        maxConnections = other.maxConnections
        scanRate = other.scanRate
        scanThreads = other.scanThreads
        durability = other.durability
        minTTLSeconds = other.minTTLSeconds
        maxRequestBodyMemory = other.maxRequestBodyMemory
        connectionSlotSharePercent = other.connectionSlotSharePercent
        requestHeadersTimeoutSeconds = other.requestHeadersTimeoutSeconds
    }

    /// `load(path:)` of a text already read (`path` names it in errors and anchors relative paths).
    public static func load(text: String, path: String) throws -> NodeConfiguration {
        let (_, t) = try StrictTOML.parse(text, what: "config \(path)")
        try t.only(fileKeys)
        var c = NodeConfiguration()
        if let v = try t.string("name") { c.name = v }
        if let v = try t.hostPort("listen") { c.listen = v }
        if let v = try t.hostPort("quic_listen") { c.quicListen = v }
        if let v = try t.string("data_dir") { c.dataDirectory = v }
        if let v = try t.size("max_bytes") { c.maxBytes = v }
        c.certificate = try t.string("cert")
        c.privateKey = try t.string("key")
        c.ca = try t.string("ca")
        if let v = try t.bool("allow_unauthenticated_reads") { c.allowUnauthenticatedReads = v }
        if let v = try t.bool("insecure") { c.insecure = v }
        if let v = try t.int("handshake_timeout_seconds") { c.handshakeTimeoutSeconds = v }
        if let v = try t.int("drain_seconds") { c.drainSeconds = v }
        if let v = try t.int("quic_max_datagram") { c.quicMaxDatagram = v }
        if let v = try t.hostPort("local") { c.localListen = v }
        if let v = try t.string("local_socket") { c.localSocket = v }
        if let v = try t.choice("local_role", [("client", PeerRole.client), ("reader", PeerRole.reader)]) { c.localRole = v }
        if let v = try t.bool("local_allow_remote") { c.localAllowRemote = v }
        try c.applyBudgets(from: t)
        if let v = try t.choice("quic_address_validation", QUICAddressValidationMode.allCases.map { ($0.rawValue, $0) }) {
            c.quicAddressValidation = v
        }
        // Relative paths in a config file are relative to the file.
        let base = URL(fileURLWithPath: path).absoluteURL.deletingLastPathComponent()
        func resolve(_ p: String?) -> String? {
            guard let p, !p.hasPrefix("/") else { return p }
            return base.appendingPathComponent(p).path
        }
        c.certificate = resolve(c.certificate)
        c.privateKey = resolve(c.privateKey)
        c.ca = resolve(c.ca)
        c.dataDirectory = resolve(c.dataDirectory) ?? c.dataDirectory
        c.localSocket = resolve(c.localSocket)
        c.s3Origin = try S3OriginSettings.parse(t, resolve: { resolve($0) ?? $0 })
        return c
    }

    /// Check for contradictions a user should hear about before anything starts.
    public func validate() throws {
        if maxBytes < Self.minimumMaxBytes {
            // A bare number is bytes: `--max-bytes 10` is far more likely a forgotten unit than a wish.
            throw ConfigurationError("max_bytes (--max-bytes) is \(maxBytes) bytes; a store needs at least 1 MiB (a size without a unit is bytes: write e.g. \(max(maxBytes, 1))G or \(max(maxBytes, 1))M)")
        }
        if maxConnections <= 0 { throw ConfigurationError("max_connections must be positive, got \(maxConnections)") }
        if requestHeadersTimeoutSeconds <= 0 {
            throw ConfigurationError("request_headers_timeout_seconds must be positive, got \(requestHeadersTimeoutSeconds)")
        }
        if !(1...100).contains(connectionSlotSharePercent) {
            throw ConfigurationError("connection_slot_share_percent must be 1…100, got \(connectionSlotSharePercent)")
        }
        if maxRequestBodyMemory != 0 && maxRequestBodyMemory < 1 << 20 {
            throw ConfigurationError("max_request_body_memory must be 0 (off) or at least 1M, got \(maxRequestBodyMemory)")
        }
        if responseStallTimeoutSeconds <= 0 { throw ConfigurationError("response_stall_timeout_seconds must be positive, got \(responseStallTimeoutSeconds)") }
        if requestBodyTimeoutSeconds <= 0 { throw ConfigurationError("request_body_timeout_seconds must be positive, got \(requestBodyTimeoutSeconds)") }
        if minTTLSeconds < 0 { throw ConfigurationError("min_ttl_seconds must be 0 (off) or positive, got \(minTTLSeconds)") }
        if scanRate < 0 { throw ConfigurationError("scan_rate must be 0 (no bound) or positive, got \(scanRate)") }
        if !(0...8).contains(scanThreads) { throw ConfigurationError("scan_threads must be 0 (one per CPU) to 8, got \(scanThreads)") }
        if let v = maxUnverifiedBytes, v <= 0 { throw ConfigurationError("max_unverified_bytes must be positive, got \(v)") }
        if !(1024...(16 << 20)).contains(maxHeaderListBytes) {
            throw ConfigurationError("max_header_list_bytes must be in 1024...16777216, got \(maxHeaderListBytes)")
        }
        try Self.checkDatagramSize(quicMaxDatagram)
        if let l = localListen, !localAllowRemote, !Self.isLoopback(l.host) {
            throw ConfigurationError("the local endpoint \(l) (--local-listen, local) is not a loopback address: it is plaintext and gives every connection the \(localRole.rawValue) role without a certificate; listen on 127.0.0.1 or ::1, or pass --local-allow-remote (local_allow_remote = true) if the network is trusted")
        }
        if let p = localSocket, p.isEmpty { throw ConfigurationError("--local-socket (local_socket) must be a path") }
        if insecure {
            if allowUnauthenticatedReads { throw ConfigurationError("--allow-unauthenticated-reads needs TLS; it makes no sense with --insecure") }
            return
        }
        var missing: [String] = []
        if certificate == nil { missing.append("--cert") }
        if privateKey == nil { missing.append("--key") }
        if ca == nil { missing.append("--ca") }
        if !missing.isEmpty {
            throw ConfigurationError("TLS needs \(missing.joined(separator: ", ")) (make them with certs/mkcerts.sh); plaintext only with --insecure")
        }
    }

    /// Whether `host` is a loopback address (127.0.0.0/8, ::1, localhost).
    public static func isLoopback(_ host: String) -> Bool {
        if host == "localhost" || host == "::1" { return true }
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 { return UInt32(bigEndian: v4.s_addr) >> 24 == 127 }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            let bytes = withUnsafeBytes(of: &v6) { Array($0) }
            return bytes == [UInt8](repeating: 0, count: 15) + [1]
        }
        return false
    }

    /// `quic_max_datagram` must be a UDP payload size QUIC allows.
    public static func checkDatagramSize(_ n: Int?, key: String = "quic_max_datagram") throws {
        let r = QUICSettings.datagramSizeRange
        if let n, !r.contains(n) {
            throw ConfigurationError("\(key) must be in \(r.lowerBound)...\(r.upperBound) bytes (8952 for 9000-byte jumbo frames), got \(n)")
        }
    }

    /// The QUIC settings this configuration asks for.
    public var quicSettings: QUICSettings {
        var q = QUICSettings()
        q.maxDatagramSize = quicMaxDatagram
        q.maxHeaderListSize = maxHeaderListBytes
        q.requestBodyIdleTimeout = .seconds(requestBodyTimeoutSeconds)
        q.requestBodyMinRate = requestBodyMinRate
        q.responseStallTimeout = .seconds(responseStallTimeoutSeconds)
        q.requestHeadersTimeout = .seconds(requestHeadersTimeoutSeconds)
        return q
    }

    public var tlsFiles: TLSFiles? {
        guard !insecure, let certificate, let privateKey, let ca else { return nil }
        return TLSFiles(certificateChain: certificate, privateKey: privateKey, trustedCA: ca)
    }
}

// MARK: - Strict TOML reading (node config and topology)

/// One TOML document read strictly: every table says which keys it knows, so an unknown key (a
/// typo) is refused instead of ignored, and every value is checked for its type. Errors name the
/// document (`config PATH` / `topology PATH`), the line when it can be found, the table, the key
/// and what was expected, e.g.
/// `topology t.toml, line 9: [fetch] unknown key 'stratgy' (known: origin_write_through, strategy, transport)`.
/// Used by `NodeConfiguration.load` and `Topology.load`.
public struct StrictTOML: Sendable {
    /// `config PATH` or `topology PATH`: how errors start.
    public let what: String
    let lines: TOMLKeyLines

    /// Parses `text`; a syntax error is reported with its line and column.
    public static func parse(_ text: String, what: String) throws -> (StrictTOML, StrictTOMLTable) {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw ConfigurationError("\(what), line \(e.source.begin.line), column \(e.source.begin.column): not valid TOML: \(e.description)")
        } catch {
            throw ConfigurationError("\(what) is not valid TOML: \(error)")
        }
        let doc = StrictTOML(what: what, lines: TOMLKeyLines(text))
        return (doc, StrictTOMLTable(doc: doc, table: table, path: [], display: ""))
    }
}

/// A table of a `StrictTOML` document. Create it with the keys it may hold (`known`); the typed
/// accessors return nil for an absent key and throw for a value of the wrong type.
public struct StrictTOMLTable {
    let doc: StrictTOML
    let table: TOMLTable
    /// Where the table is, for finding lines: `[]` (root), `["fetch"]`, `["nodes#1"]`.
    let path: [String]
    /// How errors name the table: "" (root), "[fetch] ", "[[nodes]] #2 (peer1) ".
    let display: String

    /// The line of `key` in this table (or of the table's header, or nil).
    func line(_ key: String?) -> Int? {
        if let key {
            // `key = …`, or a `[key]` / `[[key]]` header: a table under this one.
            if let l = doc.lines.line(path: path, key: key) ?? doc.lines.line(path: path + [key], key: nil)
                ?? doc.lines.line(path: path + ["\(key)#0"], key: nil) {
                return l
            }
        }
        return doc.lines.line(path: path, key: nil)
    }

    /// An error about `key` (nil: the table itself) in this table.
    public func error(_ key: String?, _ message: String) -> ConfigurationError {
        let at = line(key).map { ", line \($0)" } ?? ""
        return ConfigurationError("\(doc.what)\(at): \(display)\(message)")
    }

    /// Refuses keys not in `known`.
    public func only(_ known: [String]) throws {
        let allowed = Set(known)
        // In source order when the lines are known, so the first typo is the one reported.
        let unknown = table.keys.filter { !allowed.contains($0) }
            .sorted { (line($0) ?? .max, $0) < (line($1) ?? .max, $1) }
        if let k = unknown.first {
            throw error(k, "unknown key '\(k)' (known: \(known.sorted().joined(separator: ", ")))")
        }
    }

    func value(_ key: String) -> TOMLValue? { table[key]?.tomlValue }

    /// "a string", "an integer (3)", … for messages about a value of the wrong type.
    static func describe(_ v: TOMLValue) -> String {
        switch v.type {
        case .string:
            let s = v.string ?? ""
            return "a string (\"\(s.count > 40 ? String(s.prefix(40)) + "…" : s)\")"
        case .int: return "an integer (\(v.int.map(String.init) ?? "?"))"
        case .double: return "a floating-point number (\(v.double.map { "\($0)" } ?? "?"))"
        case .bool: return "a boolean (\(v.bool.map { "\($0)" } ?? "?"))"
        case .table: return "a table"
        case .array: return "an array"
        case .date: return "a date"
        case .time: return "a time"
        case .dateTime: return "a date-time"
        }
    }

    func wrongType(_ key: String, _ expected: String, _ v: TOMLValue) -> ConfigurationError {
        error(key, "'\(key)' must be \(expected), got \(Self.describe(v))")
    }

    public func string(_ key: String) throws -> String? {
        guard let v = value(key) else { return nil }
        guard v.type == .string, let s = v.string else { throw wrongType(key, "a string", v) }
        return s
    }

    public func int(_ key: String) throws -> Int? {
        guard let v = value(key) else { return nil }
        guard v.type == .int, let i = v.int else { throw wrongType(key, "an integer", v) }
        return i
    }

    public func bool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        guard v.type == .bool, let b = v.bool else { throw wrongType(key, "true or false", v) }
        return b
    }

    /// A size: an integer (bytes) or a string with a unit (`ByteSize`).
    public func size(_ key: String) throws -> Int64? {
        guard let v = value(key) else { return nil }
        if v.type == .int, let i = v.int {
            guard i >= 0 else { throw error(key, "'\(key)' must not be negative, got \(i)") }
            return Int64(i)
        }
        guard v.type == .string, let s = v.string else {
            throw wrongType(key, "a size (an integer number of bytes, or a string like \"10G\")", v)
        }
        do { return try ByteSize.value(s) } catch { throw self.error(key, "'\(key)': \(error)") }
    }

    public func strings(_ key: String) throws -> [String]? {
        guard let v = value(key) else { return nil }
        guard v.type == .array, let a = v.array else { throw wrongType(key, "an array of strings", v) }
        var out: [String] = []
        for (i, e) in a.enumerated() {
            let ev = e.tomlValue
            guard ev.type == .string, let s = ev.string else {
                throw error(key, "'\(key)' must be an array of strings, got \(Self.describe(ev)) at index \(i)")
            }
            out.append(s)
        }
        return out
    }

    /// One of `allowed` (given as a string).
    public func choice<T>(_ key: String, _ allowed: [(String, T)]) throws -> T? {
        guard let s = try string(key) else { return nil }
        guard let hit = allowed.first(where: { $0.0 == s }) else {
            throw error(key, "'\(key)' must be one of \(allowed.map(\.0).joined(separator: ", ")), got '\(s)'")
        }
        return hit.1
    }

    /// `host:port`.
    public func hostPort(_ key: String) throws -> HostPort? {
        guard let s = try string(key) else { return nil }
        guard let hp = HostPort(s) else { throw error(key, "'\(key)' must be host:port (or [v6]:port), got '\(s)'") }
        return hp
    }

    /// A key that must be present.
    public func required<T>(_ key: String, _ kind: String, _ get: (String) throws -> T?) throws -> T {
        guard let v = try get(key) else { throw error(nil, "'\(key)' is missing (\(kind))") }
        return v
    }

    /// A sub-table `[key]` that may hold only `known` keys.
    public func table(_ key: String, known: [String]) throws -> StrictTOMLTable? {
        guard let v = value(key) else { return nil }
        guard v.type == .table, let t = v.table else { throw wrongType(key, "a table ([\(key)])", v) }
        let sub = StrictTOMLTable(doc: doc, table: t, path: path + [key], display: "\(display)[\(key)] ")
        try sub.only(known)
        return sub
    }

    /// An array of tables `[[key]]`, each of which may hold only `known` keys.
    public func tables(_ key: String, known: [String]) throws -> [StrictTOMLTable]? {
        guard let v = value(key) else { return nil }
        guard v.type == .array, let a = v.array else { throw wrongType(key, "an array of tables ([[\(key)]])", v) }
        var out: [StrictTOMLTable] = []
        for (i, e) in a.enumerated() {
            let ev = e.tomlValue
            guard ev.type == .table, let t = ev.table else {
                throw error(key, "'\(key)' must be an array of tables ([[\(key)]]), got \(Self.describe(ev)) at index \(i)")
            }
            let name = t["name"]?.tomlValue.string.map { " (\($0))" } ?? ""
            let sub = StrictTOMLTable(doc: doc, table: t, path: path + ["\(key)#\(i)"], display: "\(display)[[\(key)]] #\(i + 1)\(name) ")
            try sub.only(known)
            out.append(sub)
        }
        return out
    }
}

/// Where keys sit in a TOML text: TOMLKit keeps no source positions for values, so the text is
/// scanned for table headers (`[a]`, `[[a]]`) and `key =` lines (dotted keys included). A key it
/// cannot place (inline tables, unusual quoting) has no line; errors then name the table only.
struct TOMLKeyLines: Sendable {
    private var lines: [String: Int] = [:]

    private static func id(_ path: [String], _ key: String?) -> String {
        (path + [key ?? "\u{0}"]).joined(separator: "\u{1}")
    }

    func line(path: [String], key: String?) -> Int? { lines[Self.id(path, key)] }

    /// Splits a dotted key (`a."b.c".d`) into its parts; nil if it is not a plain key.
    static func keyParts(_ s: Substring) -> [String]? {
        var parts: [String] = []
        var cur = ""
        var quote: Character?
        for ch in s {
            if let q = quote {
                if ch == q { quote = nil } else { cur.append(ch) }
            } else if ch == "\"" || ch == "'" {
                quote = ch
            } else if ch == "." {
                parts.append(cur.trimmingCharacters(in: .whitespaces))
                cur = ""
            } else if ch.isLetter || ch.isNumber || ch == "_" || ch == "-" || ch == " " || ch == "\t" {
                cur.append(ch)
            } else {
                return nil
            }
        }
        if quote != nil { return nil }
        parts.append(cur.trimmingCharacters(in: .whitespaces))
        return parts.contains(where: \.isEmpty) ? nil : parts
    }

    init(_ text: String) {
        var current: [String] = []
        var arrayCounts: [String: Int] = [:]
        var multiline: String? // inside a """ or ''' string
        func record(_ path: [String], _ key: String?, _ line: Int) {
            let k = Self.id(path, key)
            if lines[k] == nil { lines[k] = line }
        }
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let n = i + 1
            if let m = multiline {
                if raw.components(separatedBy: m).count % 2 == 0 { multiline = nil }
                continue
            }
            let t = raw.trimmingCharacters(in: .whitespaces)
            if t.isEmpty || t.hasPrefix("#") { continue }
            if t.hasPrefix("[[") {
                guard let close = t.range(of: "]]"), let parts = Self.keyParts(t[t.index(t.startIndex, offsetBy: 2)..<close.lowerBound]) else { continue }
                let name = parts.joined(separator: ".")
                let index = arrayCounts[name, default: 0]
                arrayCounts[name] = index + 1
                current = Array(parts.dropLast()) + ["\(parts.last!)#\(index)"]
                record(current, nil, n)
                continue
            }
            if t.hasPrefix("[") {
                guard let close = t.firstIndex(of: "]"), let parts = Self.keyParts(t[t.index(after: t.startIndex)..<close]) else { continue }
                current = parts
                record(current, nil, n)
                continue
            }
            guard let eq = t.firstIndex(of: "="), let parts = Self.keyParts(t[..<eq]) else { continue }
            record(current + parts.dropLast(), parts.last!, n)
            // A multi-line string starting on this line and not closed on it.
            let value = t[t.index(after: eq)...]
            for m in ["\"\"\"", "'''"] where value.components(separatedBy: m).count == 2 {
                multiline = m
            }
        }
    }
}
