import Foundation
import MeshQUIC
import MeshTLS
import TOMLKit

/// Parses sizes like `10G`, `512M`, `64k`, `1024` (binary units).
public enum ByteSize {
    public static func parse(_ s: String) -> Int64? {
        let t = s.trimmingCharacters(in: .whitespaces).uppercased()
        guard !t.isEmpty else { return nil }
        let units: [(String, Int64)] = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                                        ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10),
                                        ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)]
        for (suffix, mult) in units where t.hasSuffix(suffix) {
            guard let n = Double(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), n >= 0 else { return nil }
            return Int64(n * Double(mult))
        }
        guard let n = Int64(t), n >= 0 else { return nil }
        return n
    }

    public static func format(_ n: Int64) -> String {
        let d = Double(n)
        if n >= 1 << 30 { return String(format: "%.2f GiB", d / Double(1 << 30)) }
        if n >= 1 << 20 { return String(format: "%.1f MiB", d / Double(1 << 20)) }
        if n >= 1 << 10 { return String(format: "%.1f KiB", d / Double(1 << 10)) }
        return "\(n) B"
    }
}

/// `host:port`, `[v6]:port`.
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(_ s: String) {
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]") else { return nil }
            host = String(s[s.index(after: s.startIndex)..<close])
            let rest = s[s.index(after: close)...]
            guard rest.hasPrefix(":"), let p = Int(rest.dropFirst()), (0...65535).contains(p) else { return nil }
            port = p
        } else {
            guard let colon = s.lastIndex(of: ":"), let p = Int(s[s.index(after: colon)...]), (0...65535).contains(p) else { return nil }
            host = String(s[..<colon])
            port = p
        }
        if host.isEmpty { return nil }
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public struct ConfigurationError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
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

    static func parse(_ s: String, key: String) throws -> QUICAddressValidationMode {
        guard let m = QUICAddressValidationMode(rawValue: s) else {
            throw ConfigurationError("\(key) must be one of \(allCases.map(\.rawValue).joined(separator: ", ")), got '\(s)'")
        }
        return m
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
    /// A response the client takes nothing of (closed flow-control window) for this long is
    /// reset, giving back its read slot.
    public var responseStallTimeoutSeconds = 30

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
            throw ConfigurationError("cannot read config \(path): \(error.localizedDescription)")
        }
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch {
            throw ConfigurationError("config \(path) is not valid TOML: \(error)")
        }
        var c = NodeConfiguration()
        let known: Set<String> = ["name", "listen", "data_dir", "max_bytes", "cert", "key", "ca", "allow_unauthenticated_reads",
                                  "insecure", "quic_listen", "handshake_timeout_seconds", "max_concurrent_writes", "max_open_reads", "drain_seconds",
                                  "quic_max_datagram", "quic_address_validation", "max_header_list_bytes", "max_unverified_bytes", "request_body_timeout_seconds",
                                  "response_stall_timeout_seconds"]
        for key in table.keys where !known.contains(key) {
            throw ConfigurationError("config \(path): unknown key '\(key)' (known: \(known.sorted().joined(separator: ", ")))")
        }
        func string(_ k: String) throws -> String? {
            guard let v = table[k] else { return nil }
            guard let s = v.string else { throw ConfigurationError("config \(path): '\(k)' must be a string") }
            return s
        }
        func int(_ k: String) throws -> Int? {
            guard let v = table[k] else { return nil }
            guard let i = v.int else { throw ConfigurationError("config \(path): '\(k)' must be an integer") }
            return i
        }
        func bool(_ k: String) throws -> Bool? {
            guard let v = table[k] else { return nil }
            guard let b = v.bool else { throw ConfigurationError("config \(path): '\(k)' must be true or false") }
            return b
        }
        if let v = try string("name") { c.name = v }
        if let v = try string("listen") {
            guard let hp = HostPort(v) else { throw ConfigurationError("config \(path): listen '\(v)' is not host:port") }
            c.listen = hp
        }
        if let v = try string("quic_listen") {
            guard let hp = HostPort(v) else { throw ConfigurationError("config \(path): quic_listen '\(v)' is not host:port") }
            c.quicListen = hp
        }
        if let v = try string("data_dir") { c.dataDirectory = v }
        func size(_ k: String) throws -> Int64? {
            guard let v = table[k] else { return nil }
            if let i = v.int { return Int64(i) }
            if let s = v.string, let n = ByteSize.parse(s) { return n }
            throw ConfigurationError("config \(path): \(k) must be a number of bytes or a size like \"10G\"")
        }
        if let v = try size("max_bytes") { c.maxBytes = v }
        if let v = try size("max_unverified_bytes") { c.maxUnverifiedBytes = v }
        c.certificate = try string("cert")
        c.privateKey = try string("key")
        c.ca = try string("ca")
        if let v = try bool("allow_unauthenticated_reads") { c.allowUnauthenticatedReads = v }
        if let v = try bool("insecure") { c.insecure = v }
        if let v = try int("handshake_timeout_seconds") { c.handshakeTimeoutSeconds = v }
        if let v = try int("max_concurrent_writes") { c.maxConcurrentWrites = v }
        if let v = try int("max_open_reads") { c.maxOpenReads = v }
        if let v = try int("drain_seconds") { c.drainSeconds = v }
        if let v = try int("quic_max_datagram") { c.quicMaxDatagram = v }
        if let v = try int("max_header_list_bytes") { c.maxHeaderListBytes = v }
        if let v = try int("request_body_timeout_seconds") { c.requestBodyTimeoutSeconds = v }
        if let v = try int("response_stall_timeout_seconds") { c.responseStallTimeoutSeconds = v }
        if let v = try string("quic_address_validation") { c.quicAddressValidation = try QUICAddressValidationMode.parse(v, key: "config \(path): quic_address_validation") }
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
        return c
    }

    /// Check for contradictions a user should hear about before anything starts.
    public func validate() throws {
        if maxBytes <= 0 { throw ConfigurationError("max_bytes must be positive") }
        if responseStallTimeoutSeconds <= 0 { throw ConfigurationError("response_stall_timeout_seconds must be positive, got \(responseStallTimeoutSeconds)") }
        if requestBodyTimeoutSeconds <= 0 { throw ConfigurationError("request_body_timeout_seconds must be positive, got \(requestBodyTimeoutSeconds)") }
        if let v = maxUnverifiedBytes, v <= 0 { throw ConfigurationError("max_unverified_bytes must be positive, got \(v)") }
        if !(1024...(16 << 20)).contains(maxHeaderListBytes) {
            throw ConfigurationError("max_header_list_bytes must be in 1024...16777216, got \(maxHeaderListBytes)")
        }
        try Self.checkDatagramSize(quicMaxDatagram)
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
        q.responseStallTimeout = .seconds(responseStallTimeoutSeconds)
        return q
    }

    public var tlsFiles: TLSFiles? {
        guard !insecure, let certificate, let privateKey, let ca else { return nil }
        return TLSFiles(certificateChain: certificate, privateKey: privateKey, trustedCA: ca)
    }
}
