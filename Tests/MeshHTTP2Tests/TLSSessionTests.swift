import MeshHTTP
import MeshTLS
import NIOCore
import Testing

/// Handshakes between two in-memory GnuTLS sessions (no sockets): bytes are moved by hand.
@Suite struct TLSSessionTests {
    static func credentials(_ name: String?, ca: String = "ca.pem") throws -> TLSCredentials {
        try TLSCredentials(files: TLSFiles(
            certificateChain: name.map { TestCerts.path("\($0).pem") },
            privateKey: name.map { TestCerts.path("\($0).key") },
            trustedCA: TestCerts.path(ca)))
    }

    /// Shuttle bytes until both sides finished or one failed. Returns the server's error, if any.
    static func handshake(server: TLSSession, client: TLSSession) -> (serverError: (any Error)?, clientError: (any Error)?) {
        var serverDone = false, clientDone = false
        var se: (any Error)?, ce: (any Error)?
        for _ in 0..<20 {
            if ce == nil && !clientDone {
                do { clientDone = try client.handshake() } catch { ce = error }
            }
            if var out = client.takeOutbound() { server.inbound.writeBuffer(&out) }
            if se == nil && !serverDone {
                do { serverDone = try server.handshake() } catch { se = error }
            }
            if var out = server.takeOutbound() { client.inbound.writeBuffer(&out) }
            if (serverDone || se != nil) && (clientDone || ce != nil) { break }
        }
        return (se, ce)
    }

    @Test func mutualTLSCarriesRoles() throws {
        for role in PeerRole.allCases {
            let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.require), alpn: ["h2"], allocator: .init())
            let client = try TLSSession(credentials: Self.credentials(role.rawValue), mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
            let (se, ce) = Self.handshake(server: server, client: client)
            #expect(se == nil)
            #expect(ce == nil)
            #expect(server.peerIdentity()?.role == role)
            #expect(server.peerIdentity()?.commonName == role.rawValue)
            #expect(client.peerIdentity()?.role == .node)
            #expect(server.negotiatedALPN == "h2")

            // Application data flows both ways once established.
            try client.send(ByteBuffer(string: "ping"))
            if var out = client.takeOutbound() { server.inbound.writeBuffer(&out) }
            var plain = ByteBuffer()
            _ = try server.receive(into: &plain)
            #expect(String(buffer: plain) == "ping")
        }
    }

    @Test func serverRejectsMissingClientCertificate() throws {
        let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.require), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: Self.credentials(nil), mode: .client(serverName: "localhost"), alpn: ["h2"], allocator: .init())
        let (se, _) = Self.handshake(server: server, client: client)
        #expect(se != nil)
    }

    @Test func optionalModeAdmitsAnonymousButNoIdentity() throws {
        let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: Self.credentials(nil), mode: .client(serverName: "localhost"), alpn: ["h2"], allocator: .init())
        let (se, ce) = Self.handshake(server: server, client: client)
        #expect(se == nil)
        #expect(ce == nil)
        #expect(try server.verifyOptionalPeer() == false)
    }

    @Test func optionalModeStillRejectsForeignCertificate() throws {
        let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: Self.credentials("stranger"), mode: .client(serverName: "localhost"), alpn: ["h2"], allocator: .init())
        let (se, _) = Self.handshake(server: server, client: client)
        // GnuTLS clients send only certificates issued by a CA the server named, so the stranger may
        // arrive with no certificate (anonymous reader) or with it (then verification throws):
        // either way it is never authenticated.
        #expect(se == nil)
        #expect((try? server.verifyOptionalPeer()) != true)

        let server2 = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client2 = try TLSSession(credentials: Self.credentials("reader"), mode: .client(serverName: "localhost"), alpn: ["h2"], allocator: .init())
        _ = Self.handshake(server: server2, client: client2)
        #expect(try server2.verifyOptionalPeer() == true)
        #expect(server2.peerIdentity()?.role == .reader)
    }

    @Test func serverRejectsCertificateFromAnotherCA() throws {
        let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.require), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: Self.credentials("stranger", ca: "ca.pem"), mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
        let (se, _) = Self.handshake(server: server, client: client)
        #expect(se != nil)
        #expect(server.peerIdentity() == nil || !server.handshakeComplete)
    }

    @Test func clientRejectsServerFromAnotherCAOrWrongName() throws {
        // The client trusts only otherca: the node's certificate must not verify.
        let server = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client = try TLSSession(credentials: Self.credentials(nil, ca: "otherca.pem"), mode: .client(serverName: "127.0.0.1"), alpn: ["h2"], allocator: .init())
        let (_, ce) = Self.handshake(server: server, client: client)
        #expect(ce != nil)

        let server2 = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client2 = try TLSSession(credentials: Self.credentials(nil), mode: .client(serverName: "10.9.9.9"), alpn: ["h2"], allocator: .init())
        let (_, ce2) = Self.handshake(server: server2, client: client2)
        #expect(ce2 != nil)

        let server3 = try TLSSession(credentials: Self.credentials("node"), mode: .server(.optionalReadOnly), alpn: ["h2"], allocator: .init())
        let client3 = try TLSSession(credentials: Self.credentials(nil), mode: .client(serverName: "not-the-node.example"), alpn: ["h2"], allocator: .init())
        let (_, ce3) = Self.handshake(server: server3, client: client3)
        #expect(ce3 != nil)
    }
}
