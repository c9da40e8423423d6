import Foundation
import TestSupport
import Testing

/// certs/mkcerts.sh writes keys every TLS stack loads, and refuses a validity that is not a
/// positive number of days (certtool takes -1 for "never expires").
@Suite("certs/mkcerts.sh", .serialized, .timeLimit(.minutes(5)))
struct MkcertsTests {
    func mkcerts(_ args: [String], environment: [String: String]? = nil) async throws -> ProcessResult {
        try await run(["/bin/bash", RepositoryCertificates.script] + args, environment: environment)
    }

    /// Length of the ECPrivateKey's privateKey OCTET STRING (RFC 5915: 32 bytes for P-256), read
    /// by `openssl asn1parse` (for PKCS#8, inside the outer OCTET STRING).
    func scalarLength(_ key: String, pkcs8: Bool) async throws -> Int {
        var args = ["openssl", "asn1parse", "-in", key]
        if pkcs8 {
            // The PKCS#8 privateKey OCTET STRING wraps the ECPrivateKey: find its offset.
            let outer = try await run(["openssl", "asn1parse", "-in", key])
            let line = outer.stdout.split(separator: "\n").last { $0.contains("OCTET STRING") && $0.contains("d=1") }
            guard let line, let offset = line.split(separator: ":").first.map({ $0.trimmingCharacters(in: .whitespaces) }) else {
                throw HarnessError("no PKCS#8 privateKey in \(key): \(outer)")
            }
            args += ["-strparse", offset]
        }
        let r = try await run(args)
        guard r.status == 0,
              let line = r.stdout.split(separator: "\n").first(where: { $0.contains("OCTET STRING") }),
              let l = line.range(of: " l=") else {
            throw HarnessError("cannot read the private scalar of \(key): \(r)")
        }
        let n = line[l.upperBound...].drop { $0 == " " }.prefix { $0.isNumber }
        return Int(n) ?? -1
    }

    @Test("Every key mkcerts.sh writes has a 32-byte scalar and loads in openssl and in /usr/bin/python3's cryptography")
    func keysLoadEverywhere() async throws {
        let dir = try TempDir("mkcerts-keys")
        defer { dir.remove() }
        // A key an older mkcerts.sh (certtool) wrote with a 33-byte scalar is re-encoded in place.
        let old = dir.file("out/reader.key")
        try FileManager.default.createDirectory(atPath: dir.file("out"), withIntermediateDirectories: true)
        var oldScalar = 0
        for _ in 0..<40 {
            let g = try await run(["certtool", "--generate-privkey", "--key-type", "ecdsa", "--curve", "secp256r1", "--no-text", "--outfile", old])
            #expect(g.status == 0, "\(g)")
            oldScalar = try await scalarLength(old, pkcs8: false)
            if oldScalar == 33 { break }
        }
        #expect(oldScalar == 33, "certtool never wrote a 33-byte scalar in 40 tries; the re-encoding is untested")
        let publicBefore = try await run(["openssl", "pkey", "-in", old, "-pubout"])

        let r = try await mkcerts(["all", dir.file("out")])
        #expect(r.status == 0, "\(r)")
        let publicAfter = try await run(["openssl", "pkey", "-in", old, "-pubout"])
        #expect(publicBefore.stdout == publicAfter.stdout && !publicAfter.stdout.isEmpty, "re-encoding changed the key")

        let keys = try FileManager.default.contentsOfDirectory(atPath: dir.file("out")).filter { $0.hasSuffix(".key") }.sorted()
        #expect(keys.count == 10, "\(keys)") // ca, otherca, and node/client/reader/stranger with their .pkcs8.key
        for name in keys {
            let path = dir.file("out/\(name)")
            let pkcs8 = name.hasSuffix(".pkcs8.key")
            #expect(try await scalarLength(path, pkcs8: pkcs8) == 32, "\(name)")
            let o = try await run(["openssl", "pkey", "-in", path, "-noout"])
            #expect(o.status == 0, "openssl cannot load \(name): \(o)")
        }

        // Python's cryptography (the Debian package python3-cryptography, .ci/install-deps): its
        // absence is a failure, not a skip.
        let script = """
        import sys
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        for path in sys.argv[1:]:
            key = load_pem_private_key(open(path, "rb").read(), password=None)
            assert key.curve.name == "secp256r1", (path, key.curve.name)
            print("loaded", path)
        """
        let py = try await run(["/usr/bin/python3", "-c", script] + keys.map { dir.file("out/\($0)") })
        #expect(py.status == 0, "python3 cryptography refused a key (or is not installed: apt-get install python3-cryptography): \(py)")
        #expect(py.stdout.split(separator: "\n").count == keys.count, "\(py)")
    }

    @Test("DAYS=-1, DAYS=0 and CA_DAYS=x are refused before anything is written (exit 1, the reason)")
    func nonPositiveDaysRefused() async throws {
        let dir = try TempDir("mkcerts-days")
        defer { dir.remove() }
        for (variable, value) in [("DAYS", "-1"), ("DAYS", "0"), ("CA_DAYS", "x")] {
            let r = try await mkcerts(["-o", dir.file("out"), "client", "c"], environment: [variable: value])
            #expect(r.status == 1, "\(variable)=\(value): \(r)")
            #expect(r.stderr.contains("\(variable) must be a positive number of days"), "\(variable)=\(value): \(r)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("out/c.pem")), "\(variable)=\(value) wrote a certificate")
        }
    }
}
