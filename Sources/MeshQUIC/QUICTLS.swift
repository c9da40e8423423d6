import CGnuTLS
import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// GnuTLS priorities for QUIC: TLS 1.3 only (ngtcp2_crypto_gnutls requires it), no middlebox
/// compatibility mode (forbidden by RFC 9001), AES-GCM first.
final class QUICTLSContext: @unchecked Sendable {
    static let priorityString =
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:%DISABLE_TLS13_COMPAT_MODE"
    let credentials: TLSCredentials
    let priority: gnutls_priority_t

    init(credentials: TLSCredentials) throws {
        var prio: gnutls_priority_t?
        let rc = gnutls_priority_init(&prio, Self.priorityString, nil)
        guard rc >= 0, let prio else { throw TLSError(code: rc, context: "QUIC priority string") }
        self.credentials = credentials
        self.priority = prio
    }

    deinit { gnutls_priority_deinit(priority) }

    /// A GnuTLS session for one QUIC connection, handed to ngtcp2 through `connRef` (the
    /// connection that calls this owns it and frees it with `gnutls_deinit`), and for a client the
    /// check of the server's name.
    func makeSession(role: QUICCore.Role, connRef: UnsafeMutablePointer<ngtcp2_crypto_conn_ref>) throws -> (gnutls_session_t, ServerNameCheck?) {
        let isServer: Bool
        if case .server = role { isServer = true } else { isServer = false }
        var s: gnutls_session_t?
        try tlsCheck(cm_gnutls_init_quic(&s, isServer ? 1 : 0), "gnutls_init (QUIC)")
        guard let s else { throw TLSError(code: 0, context: "gnutls_init (QUIC)") }
        var nameCheck: ServerNameCheck?
        do {
            try tlsCheck(gnutls_priority_set(s, priority), "QUIC priority")
            let rc = isServer ? ngtcp2_crypto_gnutls_configure_server_session(s) : ngtcp2_crypto_gnutls_configure_client_session(s)
            if rc != 0 { throw QUICError.internalError("ngtcp2_crypto_gnutls_configure_*_session failed") }
            gnutls_session_set_ptr(s, UnsafeMutableRawPointer(connRef))
            try tlsCheck(gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials.credentials)), "credentials")
            var h3 = Array("h3".utf8)
            try h3.withUnsafeMutableBufferPointer { b in
                var d = gnutls_datum_t(data: b.baseAddress, size: UInt32(b.count))
                try tlsCheck(gnutls_alpn_set_protocols(s, &d, 1, isServer ? UInt32(GNUTLS_ALPN_MANDATORY.rawValue) : 0), "ALPN")
            }
            switch role {
            case .server(let auth, _):
                gnutls_certificate_server_set_request(s, auth == .require ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST)
                // No acceptable-CA list: a client with a certificate from another CA sends it anyway,
                // and is told why it is refused (unknown_ca) instead of "certificate required".
                gnutls_certificate_send_x509_rdn_sequence(s, 1)
                // mTLS: the client chain is verified against the mesh CA inside the handshake.
                if auth == .require { gnutls_session_set_verify_cert(s, nil, 0) }
            case .client(let serverName):
                nameCheck = ServerNameCheck(session: s, serverName: serverName)
            }
        } catch {
            gnutls_deinit(s)
            throw error
        }
        return (s, nameCheck)
    }
}

/// The handshake's end: who the peer is, or why its certificate is refused.
extension QUICCore {

    /// Why GnuTLS failed the handshake, if it was the peer's certificate: it did not verify, or
    /// (server requiring one) none was sent.
    func certificateRefusal() -> PeerCertificateRejected? {
        guard let tls else { return nil }
        let status = gnutls_session_get_verify_cert_status(tls)
        if status != 0, status != PeerCertificateRejected.notVerified {
            return PeerCertificateRejected.verificationFailed(status: status, subject: TLSVerifyStatus.peerSubject(tls), weAreClient: !isServer)
        }
        if case .server(let auth, _) = role, auth == .require {
            var count: UInt32 = 0
            if gnutls_certificate_get_peers(tls, &count) == nil || count == 0 { return PeerCertificateRejected.noClientCertificate() }
        }
        return nil
    }

    func verifyStatusDescription() -> String {
        guard let tls else { return "" }
        let status = gnutls_session_get_verify_cert_status(tls)
        guard status != 0 else { return "" }
        var out = gnutls_datum_t()
        guard gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0, let d = out.data else {
            return " (certificate verification status \(status))"
        }
        defer { cm_gnutls_free(d) }
        return " (" + String(decoding: UnsafeRawBufferPointer(start: d, count: Int(out.size)), as: UTF8.self) + ")"
    }

    // MARK: handshake

    /// The client's identity; nil (logged, `refusalAlert` set) when its certificate is refused.
    func peerIdentityOrRefuse() -> PeerIdentity? {
        do {
            if let p = try TLSSession.authenticatedPeer(of: tls) { return p }
            let refusal = PeerCertificateRejected.noClientCertificate()
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic alert \(refusal.alert)", "\(refusal) (QUIC)")
            refusalAlert = UInt8(refusal.alert)
        } catch let refused as PeerCertificateRefused {
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic role \(refused.subject)", "\(refused) (alert: \(refused.alertName)) (QUIC)")
            refusalAlert = UInt8(refused.alert.rawValue)
        } catch {
            TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic other", "\(error) (QUIC)")
            refusalAlert = UInt8(GNUTLS_A_BAD_CERTIFICATE.rawValue)
        }
        return nil
    }

    func onHandshakeCompleted() -> Int32 {
        switch role {
        case .server(let auth, _):
            if auth == .optionalReadOnly {
                var count: UInt32 = 0
                if gnutls_certificate_get_peers(tls, &count) != nil, count > 0 {
                    var status: UInt32 = 0
                    if gnutls_certificate_verify_peers3(tls, nil, &status) < 0 || status != 0 {
                        let refusal = PeerCertificateRejected.verificationFailed(status: status, subject: TLSVerifyStatus.peerSubject(tls), weAreClient: false)
                        TLSRefusalLog.log(logger, remote: remoteAddress.endpoint, kind: "quic alert \(refusal.alert)", "\(refusal) (QUIC)")
                        refusalAlert = UInt8(refusal.alert)
                        return NGTCP2_ERR_CALLBACK_FAILURE
                    }
                    guard let p = peerIdentityOrRefuse() else { return NGTCP2_ERR_CALLBACK_FAILURE }
                    peer = p
                } else {
                    peer = .anonymousReader
                }
            } else {
                guard let p = peerIdentityOrRefuse() else { return NGTCP2_ERR_CALLBACK_FAILURE }
                peer = p
            }
        case .client:
            var d = gnutls_datum_t()
            guard gnutls_alpn_get_selected_protocol(tls, &d) == 0, let p = d.data,
                  String(decoding: UnsafeRawBufferPointer(start: p, count: Int(d.size)), as: UTF8.self) == "h3" else {
                failure = QUICError.handshakeFailed("server did not select ALPN h3")
                return NGTCP2_ERR_CALLBACK_FAILURE
            }
            peer = TLSSession.peerIdentity(of: tls)
        }
        handshakeCompleted = true
        // A client is ready only once the handshake is confirmed (HANDSHAKE_DONE): in TLS 1.3 the
        // server verifies our certificate after we finished, and may still refuse it.
        if isServer { delegate?.quicCoreHandshakeCompleted(self) }
        return 0
    }
}
