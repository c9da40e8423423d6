import CGnuTLS
import Foundation
import MeshHTTP
@testable import MeshTLS
import NIOCore
import TestSupport
import Testing

/// The role rules: exactly one OU, matched exactly; the EKUs each role needs. First as a pure
/// function, then on real certificates (certtool, signed by the test CA) in in-memory handshakes.
@Suite struct RolePolicyTests {
    static let clientAuth = KeyPurpose.clientAuth
    static let serverAuth = KeyPurpose.serverAuth

    static func role(_ ous: [String], _ ekus: [String]) -> Result<PeerRole, RoleRefusal> {
        RolePolicy.role(organizationalUnits: ous, keyPurposes: ekus)
    }

    // MARK: the pure decision

    @Test func exactlyOneExactRoleOUWithItsKeyPurposes() {
        #expect(Self.role(["reader"], [Self.clientAuth]) == .success(.reader))
        #expect(Self.role(["client"], [Self.clientAuth]) == .success(.client))
        #expect(Self.role(["node"], [Self.clientAuth, Self.serverAuth]) == .success(.node))
        #expect(Self.role(["node"], [Self.serverAuth, Self.clientAuth]) == .success(.node))
        // Extra purposes do no harm.
        #expect(Self.role(["client"], ["1.3.6.1.5.5.7.3.4", Self.clientAuth, Self.serverAuth]) == .success(.client))
    }

    @Test func severalOUsAreRefusedNotRanked() {
        // Formerly the highest role won: node + client was a node.
        #expect(Self.role(["client", "node"], [Self.clientAuth, Self.serverAuth]) == .failure(.severalOUs(["client", "node"])))
        #expect(Self.role(["node", "client"], [Self.clientAuth, Self.serverAuth]) == .failure(.severalOUs(["node", "client"])))
        #expect(Self.role(["reader", "reader"], [Self.clientAuth]) == .failure(.severalOUs(["reader", "reader"])))
        #expect(Self.role(["client", "Engineering"], [Self.clientAuth]) == .failure(.severalOUs(["client", "Engineering"])))
        #expect(Self.role(["Engineering", "reader"], [Self.clientAuth]) == .failure(.severalOUs(["Engineering", "reader"])))
    }

    @Test func roleOUsAreCaseSensitiveAndExact() {
        for ou in ["Client", "CLIENT", "cLient", "Node", "NODE", "Reader", " client", "client ", "client\0", "clients", "", "admin", "nodé"] {
            #expect(Self.role([ou], [Self.clientAuth, Self.serverAuth]) == .failure(.unknownOU(ou)), "OU \(ou.debugDescription)")
        }
        #expect(Self.role([], [Self.clientAuth, Self.serverAuth]) == .failure(.noRoleOU))
        #expect("\(RoleRefusal.unknownOU("Client"))".contains("did you mean \"client\""))
    }

    @Test func keyPurposesPerRole() {
        #expect(Self.role(["client"], []) == .failure(.missingKeyPurposes(role: .client, missing: [Self.clientAuth])))
        #expect(Self.role(["client"], [Self.serverAuth]) == .failure(.missingKeyPurposes(role: .client, missing: [Self.clientAuth])))
        #expect(Self.role(["reader"], []) == .failure(.missingKeyPurposes(role: .reader, missing: [Self.clientAuth])))
        #expect(Self.role(["reader"], [Self.serverAuth]) == .failure(.missingKeyPurposes(role: .reader, missing: [Self.clientAuth])))
        #expect(Self.role(["node"], [Self.clientAuth]) == .failure(.missingKeyPurposes(role: .node, missing: [Self.serverAuth])))
        #expect(Self.role(["node"], [Self.serverAuth]) == .failure(.missingKeyPurposes(role: .node, missing: [Self.clientAuth])))
        #expect(Self.role(["node"], []) == .failure(.missingKeyPurposes(role: .node, missing: [Self.clientAuth, Self.serverAuth])))
        // anyExtendedKeyUsage does not stand in for an explicit purpose.
        #expect(Self.role(["client"], ["2.5.29.37.0"]) == .failure(.missingKeyPurposes(role: .client, missing: [Self.clientAuth])))
        #expect(KeyPurpose.clientAuth == "1.3.6.1.5.5.7.3.2" && KeyPurpose.serverAuth == "1.3.6.1.5.5.7.3.1")
    }

    @Test func refusalsNameTheSubjectAndTheReason() {
        let r = PeerCertificateRefused(subject: "CN=x,OU=node,OU=client,O=CacheMesh", reason: .severalOUs(["node", "client"]))
        #expect("\(r)" == "peer certificate \"CN=x,OU=node,OU=client,O=CacheMesh\" refused: 2 OUs in the subject (\"node\", \"client\"); exactly one role OU is allowed")
        let e = PeerCertificateRefused(subject: "CN=y", reason: .missingKeyPurposes(role: .node, missing: [Self.serverAuth]))
        #expect("\(e)".contains("OU=node needs the extended key usage serverAuth (1.3.6.1.5.5.7.3.1)"))
    }

    // MARK: real certificates

    /// The certificates mkcerts.sh makes pass; the crafted ones get exactly their refusal.
    @Test func certificatesFromDiskGetTheirRoleOrRefusal() throws {
        for role in PeerRole.allCases {
            let cert = try X509Certificate.load(pemFile: TestCerts.path("\(role.rawValue).pem"))
            #expect(cert.role() == .success(role))
            #expect(cert.commonName == role.rawValue)
        }
        let dir = try CraftedCertificates.issueAllInTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (spec, reason) in CraftedCertificates.refused {
            let cert = try X509Certificate.load(pemFile: "\(dir)/\(spec.name).pem")
            #expect(try cert.subjectValues("2.5.4.11").sorted() == spec.units.sorted(), "\(spec)")
            guard case .failure(let refusal) = cert.role() else {
                Issue.record("\(spec) was given a role: \(cert.role())")
                continue
            }
            #expect("\(refusal)".contains(reason), "\(spec): \(refusal)")
        }
        for (spec, role) in CraftedCertificates.accepted {
            let cert = try X509Certificate.load(pemFile: "\(dir)/\(spec.name).pem")
            #expect(cert.role() == .success(PeerRole(rawValue: role)!), "\(spec)")
        }
    }

    /// A node (server, `require` and `optionalReadOnly`) handshaking with each crafted client
    /// certificate: the chain verifies (same CA), so only the role rules can refuse it.
    @Test func serverRefusesCraftedCertificatesAfterTheHandshake() throws {
        let dir = try CraftedCertificates.issueAllInTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func session(_ name: String, _ auth: ClientAuthentication) throws -> (server: TLSSession, client: TLSSession) {
            let server = try TLSSession(credentials: TLSSessionTests.credentials("node"), mode: .server(auth), alpn: ["h2"], allocator: .init())
            let creds = try TLSCredentials(files: TLSFiles(certificateChain: "\(dir)/\(name).pem", privateKey: "\(dir)/\(name).key", trustedCA: TestCerts.path("ca.pem")))
            let client = try TLSSession(credentials: creds, mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
            let (se, ce) = TLSSessionTests.handshake(server: server, client: client)
            #expect(se == nil && ce == nil, "\(name): the chain must verify; only the role rules refuse (\(String(describing: se ?? ce)))")
            return (server, client)
        }
        for auth in [ClientAuthentication.require, .optionalReadOnly] {
            for (spec, reason) in CraftedCertificates.refused {
                let (server, _) = try session(spec.name, auth)
                if auth == .optionalReadOnly { #expect(try server.verifyOptionalPeer() == true, "\(spec)") }
                #expect(server.peerIdentity() == nil, "\(spec) \(auth)")
                do {
                    let p = try server.authenticatedPeer()
                    Issue.record("\(spec) \(auth) accepted as \(String(describing: p))")
                } catch let refused as PeerCertificateRefused {
                    #expect("\(refused)".contains("CN=\(spec.name)"), "\(refused)")
                    #expect("\(refused)".contains(reason), "\(refused)")
                }
            }
            for (spec, role) in CraftedCertificates.accepted {
                let (server, _) = try session(spec.name, auth)
                #expect(try server.authenticatedPeer() == PeerIdentity(commonName: spec.name, role: PeerRole(rawValue: role), authenticated: true), "\(spec) \(auth)")
            }
        }
    }

    /// The refusal reaches the client as a fatal alert (access_denied for a role, unsupported
    /// certificate for a key purpose), and the client's next read fails on it.
    @Test func refusalSendsAnAlert() throws {
        let dir = try CraftedCertificates.issueAllInTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (name, alert, words) in [("two-roles", GNUTLS_A_ACCESS_DENIED, "the server refused our certificate: access denied"),
                                     ("node-client-eku", GNUTLS_A_UNSUPPORTED_CERTIFICATE, "the server refused our certificate: unsupported certificate")] {
            let server = try TLSSession(credentials: TLSSessionTests.credentials("node"), mode: .server(.require), alpn: ["h2"], allocator: .init())
            let creds = try TLSCredentials(files: TLSFiles(certificateChain: "\(dir)/\(name).pem", privateKey: "\(dir)/\(name).key", trustedCA: TestCerts.path("ca.pem")))
            let client = try TLSSession(credentials: creds, mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
            _ = TLSSessionTests.handshake(server: server, client: client)
            let refusal = try #require(throws: PeerCertificateRefused.self) { try server.authenticatedPeer() }
            server.sendFatalAlert(refusal.alert)
            var out = try #require(server.takeOutbound(), "an alert record")
            client.inbound.writeBuffer(&out)
            var plain = ByteBuffer()
            let error = try #require(throws: TLSAlertReceived.self) { _ = try client.receive(into: &plain) }
            #expect(error == TLSAlertReceived(alert: alert.rawValue, weAreClient: true), "\(error)")
            #expect("\(error)".hasPrefix(words), "\(error)")
        }
    }
}

/// `TLSSession` owns its `gnutls_session_t` alone and frees it exactly once.
@Suite struct TLSSessionLifetimeTests {
    /// gnutls_alpn_set_protocols refuses a protocol name of 32 bytes or more, so the init throws
    /// after gnutls_init succeeded. The init used to free the session in its catch and `deinit`
    /// freed it again: glibc aborts ("double free detected") or the heap is silently corrupted.
    @Test func failingInitFreesTheSessionOnce() throws {
        let creds = try TLSSessionTests.credentials("node")
        for _ in 0..<200 {
            #expect(throws: TLSError.self) {
                _ = try TLSSession(credentials: creds, mode: .server(.require), alpn: [String(repeating: "x", count: 64)], allocator: .init())
            }
            #expect(throws: TLSError.self) {
                _ = try TLSSession(credentials: creds, mode: .client(serverName: "localhost"), alpn: ["h2", String(repeating: "y", count: 300)], allocator: .init())
            }
        }
        // The allocator is still sound: sessions keep working.
        let server = try TLSSession(credentials: creds, mode: .server(.require), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: TLSSessionTests.credentials("client"), mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
        let (se, ce) = TLSSessionTests.handshake(server: server, client: client)
        #expect(se == nil && ce == nil)
    }

    @Test func closeIsIdempotentAndLaterCallsFailCleanly() throws {
        let server = try TLSSession(credentials: TLSSessionTests.credentials("node"), mode: .server(.require), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: TLSSessionTests.credentials("client"), mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
        _ = TLSSessionTests.handshake(server: server, client: client)
        #expect(server.peerIdentity()?.role == .client)
        server.close()
        server.close()
        #expect(server.isClosed)
        #expect(server.peerIdentity() == nil)
        #expect(server.negotiatedALPN == nil)
        server.bye()
        server.sendFatalAlert(GNUTLS_A_ACCESS_DENIED)
        #expect(throws: TLSError.self) { try server.send(ByteBuffer(string: "x")) }
        var plain = ByteBuffer()
        #expect(throws: TLSError.self) { _ = try server.receive(into: &plain) }
        #expect(throws: TLSError.self) { _ = try server.verifyOptionalPeer() }
        #expect(server.handshakeComplete)  // the state stays readable
    }
}
