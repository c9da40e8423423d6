import Foundation
import Testing
@testable import CacheNode
@testable import CacheRoutes
import MeshHTTP
import BlobStore

@Suite struct RouteTests {
    let h = String(repeating: "ab", count: 32)

    @Test func validRoutes() {
        #expect(Route.parse("/cas/\(h)") == .cas(hash: h, instance: nil))
        #expect(Route.parse("/ac/\(h)") == .ac(hash: h, instance: nil))
        #expect(Route.parse("/main/cas/\(h)") == .cas(hash: h, instance: "main"))
        #expect(Route.parse("/a/b/ac/\(h)?x=1") == .ac(hash: h, instance: "a/b"))
        #expect(Route.parse("/metrics") == .metrics)
        #expect(Route.parse("/healthz") == .healthz)
        #expect(Route.parse("/status") == .status)
    }

    @Test func malformedPathsAreBadRequests() {
        let bad = ["/cas/../x", "/cas/./\(h)", "/cas/abc", "/cas/\(h.uppercased())", "/cas/\(h)0", "/cas//\(h)",
                   "/cas/\(h)/", "cas/\(h)", "/ac/\(String(repeating: "g", count: 64))", "/x%2F/cas/\(h)", "/cas/\(h)/extra"]
        for p in bad {
            if case .badRequest = Route.parse(p) { continue }
            Issue.record("\(p) parsed as \(Route.parse(p))")
        }
    }

    @Test func unknownRoutesAreNotFound() {
        #expect(Route.parse("/") == .notFound)
        #expect(Route.parse("/nope") == .notFound)
        #expect(Route.parse("/a/b") == .notFound)
    }

    @Test func sizesAndAddresses() {
        #expect(ByteSize.parse("10G") == 10 << 30)
        #expect(ByteSize.parse("512M") == 512 << 20)
        #expect(ByteSize.parse("64k") == 64 << 10)
        // Fractions are refused (exact whole numbers only): 1.5GiB is written 1536MiB.
        #expect(ByteSize.parse("1.5GiB") == nil)
        #expect(ByteSize.parse("1536MiB") == Int64(1_610_612_736))
        #expect(ByteSize.parse("123") == 123)
        #expect(ByteSize.parse("-1") == nil)
        #expect(ByteSize.parse("ten") == nil)
        #expect(HostPort("127.0.0.1:8443") == HostPort(host: "127.0.0.1", port: 8443))
        #expect(HostPort("[::1]:9") == HostPort(host: "::1", port: 9))
        #expect(HostPort("nohost") == nil)
        #expect(HostPort("h:99999") == nil)
    }

    @Test func configFileParsesAndRejectsUnknownKeys() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-cfg-\(UUID())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let good = dir.appendingPathComponent("n.toml")
        try """
        name = "a"
        listen = "127.0.0.1:9443"
        data_dir = "data"
        max_bytes = "2G"
        cert = "node.pem"
        key = "/abs/node.key"
        ca = "ca.pem"
        allow_unauthenticated_reads = true
        """.write(to: good, atomically: true, encoding: .utf8)
        let c = try NodeConfiguration.load(path: good.path)
        #expect(c.name == "a")
        #expect(c.listen == HostPort(host: "127.0.0.1", port: 9443))
        #expect(c.maxBytes == 2 << 30)
        #expect(c.certificate == dir.appendingPathComponent("node.pem").path)
        #expect(c.privateKey == "/abs/node.key")
        #expect(c.allowUnauthenticatedReads)
        try c.validate()

        let bad = dir.appendingPathComponent("bad.toml")
        try "listen = \"127.0.0.1:1\"\nmax_byte = 3\n".write(to: bad, atomically: true, encoding: .utf8)
        #expect(throws: ConfigurationError.self) { try NodeConfiguration.load(path: bad.path) }

        var noTLS = NodeConfiguration()
        noTLS.certificate = nil
        #expect(throws: ConfigurationError.self) { try noTLS.validate() }
        noTLS.insecure = true
        try noTLS.validate()
    }

    @Test func quicSettingsFromConfigAndTopology() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-dgram-\(UUID())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func write(_ name: String, _ text: String) throws -> String {
            let url = dir.appendingPathComponent(name)
            try text.write(to: url, atomically: true, encoding: .utf8)
            return url.path
        }
        let base = "cert = \"n.pem\"\nkey = \"n.key\"\nca = \"ca.pem\"\n"
        let c = try NodeConfiguration.load(path: try write("ok.toml", base + "quic_max_datagram = 8952\n"))
        #expect(c.quicMaxDatagram == 8952)
        #expect(c.quicSettings.maxDatagramSize == 8952)
        try c.validate()
        #expect(NodeConfiguration().quicSettings.maxDatagramSize == nil)
        #expect(c.quicAddressValidation == .auto)
        #expect(c.quicAddressValidation.policy == .whenHandshakesExceed(64))
        let always = try NodeConfiguration.load(path: try write("always.toml", base + "quic_address_validation = \"always\"\n"))
        #expect(always.quicAddressValidation.policy == .always)
        #expect { try NodeConfiguration.load(path: try write("sometimes.toml", base + "quic_address_validation = \"sometimes\"\n")) } throws: {
            "\($0)".contains("'quic_address_validation' must be one of auto, always, never, got 'sometimes'")
        }
        for bad in [1199, 65_528] {
            let b = try NodeConfiguration.load(path: try write("bad\(bad).toml", base + "quic_max_datagram = \(bad)\n"))
            #expect { try b.validate() } throws: { "\($0)".contains("quic_max_datagram must be in 1200...65527") }
        }

        func topology(_ quic: String) -> String {
            """
            name = "t"
            ca = "ca.pem"
            \(quic)
            [[nodes]]
            name = "a"
            tcp = "127.0.0.1:9001"
            quic = "127.0.0.1:9001"
            data_dir = "a"
            cert = "a.pem"
            key = "a.key"
            """
        }
        let t = try Topology.load(path: try write("t.toml", topology("[quic]\nmax_datagram = 8952\naddress_validation = \"never\"")))
        #expect(t.quicMaxDatagram == 8952)
        #expect(try t.configuration(for: "a").quicMaxDatagram == 8952)
        #expect(try t.configuration(for: "a").quicAddressValidation == .never)
        #expect(try Topology.load(path: try write("t0.toml", topology(""))).quicMaxDatagram == nil)
        #expect { try Topology.load(path: try write("t1.toml", topology("[quic]\nmax_datagram = 100"))) } throws: {
            "\($0)".contains("[quic] max_datagram must be in 1200...65527")
        }
    }

    @Test func errorStatusMapping() {
        #expect(CacheService.status(for: BlobStoreError.digestMismatch(expected: "a", actual: "b")) == 400)
        #expect(CacheService.status(for: BlobStoreError.tooLarge(size: 2, limit: 1)) == 413)
        #expect(CacheService.status(for: BlobStoreError.insufficientStorage(needed: 2, available: 1)) == 507)
        #expect(CacheService.status(for: BlobStoreError.notFound("x")) == 404)
    }

    @Test func byteRanges() {
        typealias R = CacheService.ByteRange
        #expect(CacheService.parseRange("bytes=100-", size: 1_000) == R.part(from: 100, to: 999))
        #expect(CacheService.parseRange("bytes=0-0", size: 1_000) == R.part(from: 0, to: 0))
        #expect(CacheService.parseRange("bytes=10-5000", size: 1_000) == R.part(from: 10, to: 999))
        #expect(CacheService.parseRange("bytes=-100", size: 1_000) == R.part(from: 900, to: 999))
        #expect(CacheService.parseRange("bytes=-5000", size: 1_000) == R.part(from: 0, to: 999))
        #expect(CacheService.parseRange(" bytes=5- ", size: 10) == R.part(from: 5, to: 9))
        #expect(CacheService.parseRange("bytes=1000-", size: 1_000) == R.unsatisfiable)
        #expect(CacheService.parseRange("bytes=-0", size: 1_000) == R.unsatisfiable)
        // Not a single byte range: ignored (the whole blob, 200).
        #expect(CacheService.parseRange("bytes=0-1,5-6", size: 1_000) == R.whole)
        #expect(CacheService.parseRange("items=0-1", size: 1_000) == R.whole)
        #expect(CacheService.parseRange("bytes=5-1", size: 1_000) == R.whole)
        #expect(CacheService.parseRange("bytes=a-", size: 1_000) == R.whole)
        #expect(CacheService.parseRange("bytes=-", size: 1_000) == R.whole)
        #expect(CacheService.parseRange("bytes=99999999999999999999-", size: 1_000) == R.whole)
    }
}
