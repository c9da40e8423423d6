import CacheNode
import MeshHTTP
import Foundation
import Testing

/// The one strict TOML reader behind node config files and topologies: a TOML string in, the
/// error message out. Unknown keys (typos) at every level and values of the wrong type are refused
/// with the key, the line, the table and what was expected.
@Suite("Strict config and topology decoding")
struct ConfigDecodingTests {
    /// The message `body` throws (a failure if it does not throw).
    func message(_ body: () throws -> Any, sourceLocation: SourceLocation = #_sourceLocation) -> String {
        do {
            let v = try body()
            Issue.record("no error; got \(v)", sourceLocation: sourceLocation)
            return ""
        } catch {
            return "\(error)"
        }
    }

    func topology(_ t: String) -> String { message { try Topology.load(text: t, path: "/m/t.toml") } }
    func config(_ t: String) -> String { message { try NodeConfiguration.load(text: t, path: "/m/n.toml") } }

    static let good = """
        name = "t"
        ca = "ca.pem"
        replication = 2
        write_quorum = 1

        [fetch]
        strategy = "immediate"
        transport = "tcp"
        origin_write_through = true

        [quic]
        max_datagram = 8952
        address_validation = "always"

        [[nodes]]
        name = "origin"
        role = "origin"
        tcp = "127.0.0.1:9440"
        quic = "127.0.0.1:9440"
        advertise_tcp = "10.0.0.5:9440"
        advertise_quic = "10.0.0.5:9440"
        data_dir = "d/origin"
        max_bytes = "2G"
        cert = "origin.pem"
        key = "origin.key"
        seeds = []

        [[nodes]]
        name = "peer1"
        tcp = "127.0.0.1:9441"
        data_dir = "/abs/peer1"
        max_bytes = 1073741824
        cert = "peer1.pem"
        key = "peer1.key"
        seeds = ["origin"]
        """

    @Test("Every topology key still works")
    func topologyKeys() throws {
        let t = try Topology.load(text: Self.good, path: "/m/t.toml")
        #expect(t.name == "t" && t.ca == "/m/ca.pem" && t.replication == 2 && t.writeQuorum == 1)
        #expect(t.fetch.strategy == .immediate && t.fetch.transport == .tcp && t.fetch.originWriteThrough)
        #expect(t.quicMaxDatagram == 8952 && t.quicAddressValidation == .always)
        let o = try #require(t.node(named: "origin"))
        #expect(o.role == .origin && o.tcp == HostPort(host: "127.0.0.1", port: 9440) && o.quic == o.tcp)
        #expect(o.advertiseTCP == HostPort(host: "10.0.0.5", port: 9440) && o.advertiseQUIC == o.advertiseTCP)
        #expect(o.dataDirectory == "/m/d/origin" && o.maxBytes == 2 << 30 && o.certificate == "/m/origin.pem" && o.privateKey == "/m/origin.key")
        let p = try #require(t.node(named: "peer1"))
        #expect(p.role == .peer && p.quic == nil && p.advertiseTCP == p.tcp && p.dataDirectory == "/abs/peer1")
        #expect(p.maxBytes == 1 << 30 && p.seeds == ["origin"])
        // The repository's own topologies load.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let lan = try Topology.load(path: root.appendingPathComponent("topology/lan-4.toml").path)
        #expect(lan.nodes.count == 4)
        let single = try NodeConfiguration.load(path: root.appendingPathComponent("topology/single-node.toml").path)
        #expect(single.maxBytes == 10 << 30)
    }

    @Test("A topology's [limits] table sets the budgets of every node; its typos are refused like any other")
    func topologyLimits() throws {
        let text = Self.good.replacingOccurrences(of: "[quic]\n", with: """
            [limits]
            max_connections = 300
            max_header_list_bytes = 16384
            max_unverified_bytes = "64M"
            request_body_timeout_seconds = 5
            response_stall_timeout_seconds = 7
            max_open_reads = 99
            max_concurrent_writes = 9
            max_request_body_memory = "32M"
            connection_slot_share_percent = 10
            request_headers_timeout_seconds = 6

            [quic]

            """)
        let t = try Topology.load(text: text, path: "/m/t.toml")
        for name in ["origin", "peer1"] {
            let c = try t.configuration(for: name)
            #expect(c.maxConnections == 300 && c.maxHeaderListBytes == 16384 && c.maxUnverifiedBytes == 64 << 20)
            #expect(c.requestBodyTimeoutSeconds == 5 && c.responseStallTimeoutSeconds == 7 && c.maxOpenReads == 99 && c.maxConcurrentWrites == 9)
            #expect(c.maxRequestBodyMemory == 32 << 20 && c.connectionSlotSharePercent == 10 && c.requestHeadersTimeoutSeconds == 6)
        }
        // Without [limits], the node defaults.
        let plain = try Topology.load(text: Self.good, path: "/m/t.toml").configuration(for: "origin")
        #expect(plain.maxConnections == NodeConfiguration().maxConnections && plain.maxHeaderListBytes == 64 * 1024)
        let typo = topology(text.replacingOccurrences(of: "max_connections = 300", with: "max_conections = 300"))
        #expect(typo.contains("[limits]") && typo.contains("max_conections"), "\(typo)")
    }

    @Test("Typos in a topology are refused at every level, with the line, table and known keys")
    func topologyTypos() {
        let root = topology(Self.good.replacingOccurrences(of: "replication = 2", with: "replicaton = 2"))
        #expect(root == "topology /m/t.toml, line 3: unknown key 'replicaton' (known: ca, fetch, limits, name, nodes, origin, quic, repair, replication, write_quorum)", "\(root)")

        let fetch = topology(Self.good.replacingOccurrences(of: "strategy = \"immediate\"", with: "stratgy = \"immediate\""))
        #expect(fetch == "topology /m/t.toml, line 7: [fetch] unknown key 'stratgy' (known: origin_write_through, strategy, transport)", "\(fetch)")

        let quic = topology(Self.good.replacingOccurrences(of: "max_datagram = 8952", with: "max_dgram = 8952"))
        #expect(quic.hasPrefix("topology /m/t.toml, line 12: [quic] unknown key 'max_dgram' (known: address_validation, max_datagram)"), "\(quic)")

        // `seed` in the second [[nodes]] entry (line 35 of the file).
        let node = topology(Self.good.replacingOccurrences(of: "seeds = [\"origin\"]", with: "seed = [\"origin\"]"))
        #expect(node.hasPrefix("topology /m/t.toml, line 35: [[nodes]] #2 (peer1) unknown key 'seed' (known: advertise_quic, advertise_tcp, cert, data_dir, key, local, local_role, local_socket, max_bytes, name, quic, role, seeds, tcp)"), "\(node)")

        // A table nobody knows.
        let table = topology(Self.good + "\n[fech]\nstrategy = \"hedged\"\n")
        #expect(table.contains("line 36: unknown key 'fech'"), "\(table)")
    }

    @Test("Wrong types in a topology say the key, the expected type and what was there")
    func topologyTypes() {
        let replication = topology(Self.good.replacingOccurrences(of: "replication = 2", with: "replication = \"2\""))
        #expect(replication == "topology /m/t.toml, line 3: 'replication' must be an integer, got a string (\"2\")", "\(replication)")
        let through = topology(Self.good.replacingOccurrences(of: "origin_write_through = true", with: "origin_write_through = \"yes\""))
        #expect(through.contains("line 9: [fetch] 'origin_write_through' must be true or false, got a string (\"yes\")"), "\(through)")
        let seeds = topology(Self.good.replacingOccurrences(of: "seeds = [\"origin\"]", with: "seeds = [\"origin\", 3]"))
        #expect(seeds.contains("line 35: [[nodes]] #2 (peer1) 'seeds' must be an array of strings, got an integer (3) at index 1"), "\(seeds)")
        let size = topology(Self.good.replacingOccurrences(of: "max_bytes = \"2G\"", with: "max_bytes = 2.5"))
        #expect(size.contains("line 23: [[nodes]] #1 (origin) 'max_bytes' must be a size"), "\(size)")
        let badSize = topology(Self.good.replacingOccurrences(of: "max_bytes = \"2G\"", with: "max_bytes = \"2Q\""))
        #expect(badSize.contains("line 23: [[nodes]] #1 (origin) 'max_bytes': '2Q' is not a size: unknown unit 'Q'"), "\(badSize)")
        let fetch = topology(Self.good.replacingOccurrences(of: "[fetch]", with: "fetch = 3\n[fetchx]"))
        #expect(fetch.contains("unknown key 'fetchx'") || fetch.contains("'fetch' must be a table"), "\(fetch)")
        let nodes = topology("name = \"t\"\nca = \"ca.pem\"\nnodes = \"a\"\n")
        #expect(nodes == "topology /m/t.toml, line 3: 'nodes' must be an array of tables ([[nodes]]), got a string (\"a\")", "\(nodes)")
        let role = topology(Self.good.replacingOccurrences(of: "role = \"origin\"", with: "role = \"boss\""))
        #expect(role.contains("line 17: [[nodes]] #1 (origin) 'role' must be one of origin, peer, got 'boss'"), "\(role)")
        let strategy = topology(Self.good.replacingOccurrences(of: "strategy = \"immediate\"", with: "strategy = \"fastest\""))
        #expect(strategy.contains("line 7: [fetch] 'strategy' must be one of hedged, immediate, peers-only, origin-only, got 'fastest'"), "\(strategy)")
        let missing = topology(Self.good.replacingOccurrences(of: "tcp = \"127.0.0.1:9441\"", with: ""))
        #expect(missing.contains("line 28: [[nodes]] #2 (peer1) 'tcp' is missing (host:port)"), "\(missing)")
        let address = topology(Self.good.replacingOccurrences(of: "tcp = \"127.0.0.1:9441\"", with: "tcp = \"9441\""))
        #expect(address.contains("line 30: [[nodes]] #2 (peer1) 'tcp' must be host:port"), "\(address)")
        let syntax = topology("name = \"t\"\nca = \n")
        #expect(syntax.hasPrefix("topology /m/t.toml, line 2, column"), "\(syntax)")
    }

    @Test("The local endpoint's keys: node config (local, local_socket, local_role, local_allow_remote) and per topology node; non-loopback refused unless allowed")
    func localEndpointKeys() throws {
        let c = try NodeConfiguration.load(text: """
            insecure = true
            local = "127.0.0.1:9080"
            local_socket = "run/cm.sock"
            local_role = "reader"
            """, path: "/m/n.toml")
        #expect(c.localListen == HostPort(host: "127.0.0.1", port: 9080) && c.localSocket == "/m/run/cm.sock" && c.localRole == .reader && !c.localAllowRemote)
        try c.validate()
        let role = config("local_role = \"node\"\n")
        #expect(role.contains("'local_role' must be one of client, reader, got 'node'"), "\(role)")
        var remote = c
        remote.localListen = HostPort(host: "0.0.0.0", port: 9080)
        #expect(throws: ConfigurationError.self) { try remote.validate() }
        remote.localAllowRemote = true
        try remote.validate()
        for host in ["127.0.0.1", "127.1.2.3", "::1", "localhost"] { #expect(NodeConfiguration.isLoopback(host), "\(host)") }
        for host in ["0.0.0.0", "10.0.0.5", "::", "example.org"] { #expect(!NodeConfiguration.isLoopback(host), "\(host)") }

        let text = Self.good.replacingOccurrences(of: "seeds = [\"origin\"]", with: "seeds = [\"origin\"]\nlocal = \"127.0.0.1:9080\"\nlocal_socket = \"peer1.sock\"")
        let t = try Topology.load(text: text, path: "/m/t.toml")
        let p = try t.configuration(for: "peer1")
        #expect(p.localListen == HostPort(host: "127.0.0.1", port: 9080) && p.localSocket == "/m/peer1.sock" && p.localRole == .client)
        #expect(try t.configuration(for: "origin").localListen == nil)
    }

    @Test("Node config: unknown keys and wrong types with line and expected type; every key still works")
    func nodeConfig() throws {
        let all = """
            name = "a"
            listen = "127.0.0.1:9443"
            quic_listen = "127.0.0.1:9443"
            data_dir = "data"
            max_bytes = "2G"
            cert = "node.pem"
            key = "node.key"
            ca = "ca.pem"
            allow_unauthenticated_reads = true
            insecure = false
            handshake_timeout_seconds = 5
            max_concurrent_writes = 8
            max_open_reads = 16
            drain_seconds = 3
            quic_max_datagram = 8952
            quic_address_validation = "never"
            max_header_list_bytes = 32768
            max_unverified_bytes = "256M"
            request_body_timeout_seconds = 7
            response_stall_timeout_seconds = 9
            max_request_body_memory = "8M"
            connection_slot_share_percent = 50
            request_headers_timeout_seconds = 4
            """
        let c = try NodeConfiguration.load(text: all, path: "/m/n.toml")
        #expect(c.name == "a" && c.listen == HostPort(host: "127.0.0.1", port: 9443) && c.quicListen == c.listen)
        #expect(c.dataDirectory == "/m/data" && c.maxBytes == 2 << 30 && c.certificate == "/m/node.pem" && c.ca == "/m/ca.pem")
        #expect(c.allowUnauthenticatedReads && !c.insecure && c.handshakeTimeoutSeconds == 5 && c.maxConcurrentWrites == 8)
        #expect(c.maxOpenReads == 16 && c.drainSeconds == 3 && c.quicMaxDatagram == 8952 && c.quicAddressValidation == .never)
        #expect(c.maxHeaderListBytes == 32768 && c.maxUnverifiedBytes == 256 << 20 && c.requestBodyTimeoutSeconds == 7)
        #expect(c.responseStallTimeoutSeconds == 9)
        #expect(c.maxRequestBodyMemory == 8 << 20 && c.connectionSlotSharePercent == 50 && c.requestHeadersTimeoutSeconds == 4)

        let typo = config(all.replacingOccurrences(of: "max_open_reads", with: "max_open_read"))
        #expect(typo.hasPrefix("config /m/n.toml, line 13: unknown key 'max_open_read' (known: allow_unauthenticated_reads, ca, cert, connection_slot_share_percent, data_dir"), "\(typo)")
        let table = config(all + "\n[tls]\ncert = \"x\"\n")
        #expect(table.hasPrefix("config /m/n.toml, line 24: unknown key 'tls'"), "\(table)")
        let type = config(all.replacingOccurrences(of: "drain_seconds = 3", with: "drain_seconds = \"3\""))
        #expect(type == "config /m/n.toml, line 14: 'drain_seconds' must be an integer, got a string (\"3\")", "\(type)")
        let bool = config(all.replacingOccurrences(of: "insecure = false", with: "insecure = 0"))
        #expect(bool == "config /m/n.toml, line 10: 'insecure' must be true or false, got an integer (0)", "\(bool)")
        let size = config(all.replacingOccurrences(of: "max_bytes = \"2G\"", with: "max_bytes = \"1e30K\""))
        #expect(size.contains("line 5: 'max_bytes': '1e30K' is not a size"), "\(size)")
        let listen = config(all.replacingOccurrences(of: "listen = \"127.0.0.1:9443\"\nquic", with: "listen = \"nowhere\"\nquic"))
        #expect(listen == "config /m/n.toml, line 2: 'listen' must be host:port (or [v6]:port), got 'nowhere'", "\(listen)")
        let mode = config(all.replacingOccurrences(of: "\"never\"", with: "\"sometimes\""))
        #expect(mode.contains("line 16: 'quic_address_validation' must be one of auto, always, never, got 'sometimes'"), "\(mode)")
        let negative = config("max_bytes = -5\n")
        #expect(negative.contains("line 1: 'max_bytes' must not be negative"), "\(negative)")
    }

    @Test("Sizes: integers with K/M/G/T (powers of 1024), refused with the reason otherwise")
    func sizes() {
        #expect(ByteSize.parse("10G") == 10 << 30)
        #expect(ByteSize.parse("512M") == 512 << 20)
        #expect(ByteSize.parse("64k") == 64 << 10)
        #expect(ByteSize.parse("3GiB") == 3 << 30 && ByteSize.parse("3gb") == 3 << 30 && ByteSize.parse("3 G") == 3 << 30)
        #expect(ByteSize.parse("2T") == 2 << 40 && ByteSize.parse("8388607T") == 8_388_607 << 40)
        #expect(ByteSize.parse("123") == 123 && ByteSize.parse("123B") == 123 && ByteSize.parse("0") == 0)
        #expect(ByteSize.parse("9223372036854775807") == Int64.max)
        func why(_ s: String) -> String {
            do { return "parsed as \(try ByteSize.value(s))" } catch { return "\(error)" }
        }
        #expect(why("99999999999T") == "'99999999999T' is not a size: too large; the largest size is 8388607T (9223372036854775807 bytes)")
        #expect(why("8388608T").contains("too large"))
        #expect(why("9223372036854775808").contains("too large; the largest size is 9223372036854775807 bytes"))
        #expect(why("-1") == "'-1' is not a size: a size cannot be negative")
        #expect(why("1.5G").contains("use a whole number (e.g. 1536M rather than 1.5G)"))
        #expect(why("1e30K").contains("exponents are not accepted"))
        for junk in ["infG", "nanM", "inf", "1e30K", "1e3", "ten", "", "0x10", "10Q", "10 G B", "+5"] {
            let w = why(junk)
            #expect(w.contains("is not a size") && w.contains("K, M, G or T"), "\(junk): \(w)")
        }
    }
}
