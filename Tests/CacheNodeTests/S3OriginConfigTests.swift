import CacheNode
import Foundation
import MeshS3
import Testing

/// `[origin] backend = "s3"` in topologies and node configs, and where credentials come from.
@Suite struct S3OriginConfigTests {
    static func topology(origins: [String], origin: String) -> String {
        var t = "name = \"t\"\nca = \"ca.pem\"\n\(origin)\n"
        for (i, n) in ["a", "b", "c"].enumerated() {
            t += "[[nodes]]\nname = \"\(n)\"\nrole = \"\(origins.contains(n) ? "origin" : "peer")\"\ntcp = \"127.0.0.1:\(9000 + i)\"\ndata_dir = \"d\(n)\"\ncert = \"\(n).pem\"\nkey = \"\(n).key\"\n"
        }
        return t
    }

    static let s3 = "[origin]\nbackend = \"s3\"\nendpoint = \"http://127.0.0.1:7480\"\nbucket = \"cm\"\ncredentials_file = \"creds\"\n"

    @Test func topologyOriginsGetTheBucketPeersDoNot() throws {
        let t = try Topology.load(text: Self.topology(origins: ["a", "b"], origin: Self.s3), path: "/m/t.toml")
        let a = try t.configuration(for: "a"), b = try t.configuration(for: "b"), c = try t.configuration(for: "c")
        #expect(a.s3Origin?.bucket == "cm" && b.s3Origin?.bucket == "cm")
        #expect(a.s3Origin?.credentialsFile == "/m/creds")
        #expect(c.s3Origin == nil)
    }

    @Test func refusals() {
        func error(_ text: String) -> String {
            do { _ = try Topology.load(text: text, path: "/m/t.toml"); return "" } catch { return "\(error)" }
        }
        // Two origins need a shared durable tier.
        #expect(error(Self.topology(origins: ["a", "b"], origin: "")).contains("at most one origin"))
        // Secrets have no place in the topology.
        #expect(error(Self.topology(origins: ["a"], origin: Self.s3 + "secret_access_key = \"x\"\n")).contains("unknown key 'secret_access_key'"))
        #expect(error(Self.topology(origins: ["a"], origin: "[origin]\nbackend = \"s3\"\nendpoint = \"ftp://s3.example\"\nbucket = \"b\"\n")).contains("must be http:// or https://"))
        // A CA file is for TLS only.
        #expect(error(Self.topology(origins: ["a"], origin: Self.s3 + "ca_file = \"ca.pem\"\n")).contains("'ca_file' is for an https:// endpoint"))
        #expect(error(Self.topology(origins: ["a"], origin: "[origin]\nbackend = \"s3\"\nbucket = \"b\"\n")).contains("'endpoint' is missing"))
        #expect(error(Self.topology(origins: ["a"], origin: "[origin]\nbackend = \"nfs\"\n")).contains("must be one of disk, s3"))
    }

    @Test func credentialsFromFileOrEnvironment() throws {
        var s = S3OriginSettings(endpoint: "http://127.0.0.1:1", bucket: "b")
        #expect(try s.credentials(environment: ["AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"]) == .init(accessKeyID: "A", secretAccessKey: "S"))
        #expect(throws: ConfigurationError.self) { try s.credentials(environment: [:]) }
        let path = NSTemporaryDirectory() + "s3creds-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try "[other]\naws_access_key_id = X\n[default]\naws_access_key_id = K\naws_secret_access_key = V\n".write(toFile: path, atomically: true, encoding: .utf8)
        s.credentialsFile = path
        #expect(try s.credentials(environment: ["AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"]) == .init(accessKeyID: "K", secretAccessKey: "V"))
    }

    @Test func nodeConfigFile() throws {
        let c = try NodeConfiguration.load(text: "name = \"n\"\ninsecure = true\n" + Self.s3 + "part_size = \"8M\"\n", path: "/etc/cm/n.toml")
        #expect(c.s3Origin?.endpoint == "http://127.0.0.1:7480")
        #expect(c.s3Origin?.partSize == 8 << 20)
        #expect(c.s3Origin?.credentialsFile == "/etc/cm/creds")
        #expect(try NodeConfiguration.load(text: "name = \"n\"\n[origin]\nbackend = \"disk\"\n", path: "/n.toml").s3Origin == nil)
        // https:// with a CA file (relative to the config file); port 443 unless given.
        let t = try NodeConfiguration.load(text: "name = \"n\"\ninsecure = true\n[origin]\nbackend = \"s3\"\nendpoint = \"https://s3.example\"\nbucket = \"b\"\nca_file = \"ca.pem\"\n",
                                           path: "/etc/cm/n.toml")
        #expect(t.s3Origin?.caFile == "/etc/cm/ca.pem")
        #expect(try S3Endpoint.parse("https://s3.example") == S3Endpoint(host: "s3.example", port: 443, tls: true))
        #expect(try S3Endpoint.parse("http://127.0.0.1:7480") == S3Endpoint(host: "127.0.0.1", port: 7480, tls: false))
    }
}
