import Foundation

/// Leaf certificates that `certs/mkcerts.sh` would never write — several OUs, a differently
/// cased OU, no OU, missing extended key usages — issued by certtool with the *mesh test CA*
/// (so they verify, and only the role rules can refuse them). Plus a well-formed control made
/// the same way, so a refusal is down to the one attribute that differs.
public enum CraftedCertificates {
    public struct Spec: Sendable, CustomStringConvertible {
        /// File base name and subject CN.
        public var name: String
        /// Subject OUs, in order (certtool `unit = "…"` lines).
        public var units: [String]
        /// certtool key purpose keywords: `tls_www_client`, `tls_www_server`.
        public var purposes: [String]

        /// Valid from 2020-01-01 to 2021-01-01 only: expired.
        public var expired: Bool

        public init(_ name: String, units: [String], purposes: [String], expired: Bool = false) {
            self.name = name
            self.units = units
            self.purposes = purposes
            self.expired = expired
        }

        public var description: String { "\(name) (OU \(units), EKU \(purposes))" }
    }

    public static let client = "tls_www_client"
    public static let server = "tls_www_server"

    /// Every certificate the role rules must refuse, with a word that must appear in the reason.
    public static let refused: [(spec: Spec, reason: String)] = [
        (Spec("two-roles", units: ["client", "node"], purposes: [client, server]), "2 OUs"),
        (Spec("same-role-twice", units: ["reader", "reader"], purposes: [client]), "2 OUs"),
        (Spec("role-and-other", units: ["client", "Engineering"], purposes: [client]), "2 OUs"),
        (Spec("capital-client", units: ["Client"], purposes: [client]), "case-sensitive"),
        (Spec("upper-node", units: ["NODE"], purposes: [client, server]), "case-sensitive"),
        (Spec("unknown-role", units: ["admin"], purposes: [client, server]), "is not a role"),
        (Spec("no-ou", units: [], purposes: [client, server]), "no OU"),
        (Spec("client-no-eku", units: ["client"], purposes: []), "clientAuth"),
        (Spec("client-server-eku", units: ["client"], purposes: [server]), "clientAuth"),
        (Spec("reader-no-eku", units: ["reader"], purposes: []), "clientAuth"),
        (Spec("node-client-eku", units: ["node"], purposes: [client]), "serverAuth"),
        (Spec("node-server-eku", units: ["node"], purposes: [server]), "clientAuth"),
    ]

    /// A client certificate of the mesh CA, right in every way but its dates: it expired in 2021.
    public static let expiredClient = Spec("expired-client", units: ["client"], purposes: [client], expired: true)

    /// Made exactly like the refused ones, but as mkcerts.sh writes them: these must be accepted.
    public static let accepted: [(spec: Spec, role: String)] = [
        (Spec("crafted-client", units: ["client"], purposes: [client]), "client"),
        (Spec("crafted-reader", units: ["reader"], purposes: [client]), "reader"),
        (Spec("crafted-node", units: ["node"], purposes: [client, server]), "node"),
    ]

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// Issues `name.pem` (+ `name.key`) for `spec` in `dir`, signed by the test CA
    /// (`RepositoryCertificates.directory()`'s ca.pem/ca.key). Returns (certificate, key) paths.
    @discardableResult
    public static func issue(_ spec: Spec, in dir: String) throws -> (certificate: String, key: String) {
        let ca = try RepositoryCertificates.directory()
        let key = "\(dir)/\(spec.name).key", pem = "\(dir)/\(spec.name).pem", template = "\(dir)/\(spec.name).tmpl"
        try certtool(["--generate-privkey", "--key-type", "ecdsa", "--curve", "secp256r1", "--no-text", "--outfile", key])
        var lines = ["cn = \"\(spec.name)\"", "organization = \"CacheMesh\""]
        lines += spec.units.map { "unit = \"\($0)\"" }
        lines += spec.expired ? ["activation_date = \"2020-01-01 00:00:00\"", "expiration_date = \"2021-01-01 00:00:00\""] : ["expiration_days = 2"]
        lines += ["signing_key"] + spec.purposes
        try (lines.joined(separator: "\n") + "\n").write(toFile: template, atomically: true, encoding: .utf8)
        try certtool(["--generate-certificate", "--load-privkey", key, "--load-ca-certificate", "\(ca)/ca.pem",
                      "--load-ca-privkey", "\(ca)/ca.key", "--template", template, "--no-text", "--outfile", pem])
        return (pem, key)
    }

    /// Issues every refused and accepted certificate into `dir`.
    public static func issueAll(in dir: String) throws {
        for s in refused.map(\.spec) + accepted.map(\.spec) { try issue(s, in: dir) }
    }

    /// A fresh temporary directory holding every refused and accepted certificate; the caller
    /// removes it (`FileManager.default.removeItem`).
    public static func issueAllInTemporaryDirectory() throws -> String {
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("cachemesh-crafted-certs-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        do {
            try issueAll(in: dir)
        } catch {
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
        return dir
    }

    private static func certtool(_ arguments: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["certtool"] + arguments
        p.standardOutput = FileHandle.nullDevice
        let err = Pipe()
        p.standardError = err
        try p.run()
        let message = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw Failure(description: "certtool \(arguments.joined(separator: " ")) failed (\(p.terminationStatus)): \(String(decoding: message, as: UTF8.self))")
        }
    }
}
