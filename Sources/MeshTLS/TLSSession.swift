import CGnuTLS
import Logging
import MeshHTTP
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// One GnuTLS session driven through memory buffers (no socket): ciphertext comes in through
/// `inbound`, goes out through `outbound`. Sole owner of its `gnutls_session_t`: `close()` frees
/// it (idempotent; `deinit` calls it), nothing else does. Not thread-safe: it lives on one event
/// loop (its handler's).
public final class TLSSession {
    public enum Mode {
        case server(ClientAuthentication)
        /// `serverName` is checked against the server certificate (DNS name or IP address SAN).
        case client(serverName: String)
    }

    public enum ReadResult {
        case data
        case wantMore
        case closed
    }

    /// nil once closed.
    private var session: gnutls_session_t?
    let credentials: TLSCredentials
    let mode: Mode
    /// Ciphertext received and not yet consumed by GnuTLS.
    public var inbound: ByteBuffer
    /// Ciphertext produced by GnuTLS, to be written to the socket.
    public var outbound: ByteBuffer
    public private(set) var handshakeComplete = false
    private var closed = false

    public init(credentials: TLSCredentials, mode: Mode, alpn: [String], allocator: ByteBufferAllocator) throws {
        var s: gnutls_session_t?
        let flags: UInt32
        switch mode {
        case .server: flags = UInt32(GNUTLS_SERVER) | UInt32(GNUTLS_NONBLOCK) | UInt32(GNUTLS_NO_SIGNAL)
        case .client: flags = UInt32(GNUTLS_CLIENT) | UInt32(GNUTLS_NONBLOCK) | UInt32(GNUTLS_NO_SIGNAL)
        }
        try TLSError.check(gnutls_init(&s, flags), "gnutls_init")
        guard let s else { throw TLSError(code: 0, context: "gnutls_init") }
        // From here every stored property is set, so `deinit` runs (and frees `s`) if this init
        // throws: the catch below must not free it itself (it did, and `deinit` freed it again).
        self.session = s
        self.credentials = credentials
        self.mode = mode
        self.inbound = allocator.buffer(capacity: 16 * 1024)
        self.outbound = allocator.buffer(capacity: 16 * 1024)
        do {
            try TLSError.check(gnutls_priority_set(s, credentials.priorityCache), "priority")
            try TLSError.check(gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials.credentials)), "credentials")
            switch mode {
            case .server(let auth):
                gnutls_certificate_server_set_request(s, auth == .require ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST)
                // No list of acceptable CAs in the CertificateRequest: a GnuTLS client would send
                // no certificate at all when its own is from another CA, and then neither side
                // could say which certificate was refused and why (unknown_ca, with its subject).
                gnutls_certificate_send_x509_rdn_sequence(s, 1)
                // mTLS: verify the client chain against the mesh CA during the handshake. In optional
                // mode GnuTLS's automatic check would also reject a client that sent no certificate,
                // so the chain is verified right after the handshake instead (`verifyOptionalPeer`).
                if auth == .require { gnutls_session_set_verify_cert(s, nil, 0) }
            case .client(let serverName):
                nameCheck = ServerNameCheck(session: s, serverName: serverName)
            }
            try Self.setALPN(s, alpn)
        } catch {
            close()
            throw error
        }
        gnutls_transport_set_ptr(s, Unmanaged.passUnretained(self).toOpaque())
        gnutls_transport_set_push_function(s) { ptr, data, len in
            let me = Unmanaged<TLSSession>.fromOpaque(ptr!).takeUnretainedValue()
            if len > 0, let data {
                me.outbound.writeBytes(UnsafeRawBufferPointer(start: data, count: len))
            }
            return len
        }
        gnutls_transport_set_pull_function(s) { ptr, data, len in
            let me = Unmanaged<TLSSession>.fromOpaque(ptr!).takeUnretainedValue()
            let n = min(len, me.inbound.readableBytes)
            if n == 0 {
                if let s = me.session { gnutls_transport_set_errno(s, cm_errno_eagain()) }
                return -1
            }
            me.inbound.withUnsafeReadableBytes { src in
                data!.copyMemory(from: src.baseAddress!, byteCount: n)
            }
            me.inbound.moveReaderIndex(forwardBy: n)
            return n
        }
    }

    deinit {
        close()
    }

    /// Free the GnuTLS session now (idempotent). Every later call fails or does nothing; the
    /// owner may call this as soon as the connection is gone instead of waiting for `deinit`.
    public func close() {
        guard let s = session else { return }
        session = nil
        gnutls_deinit(s)
    }

    public var isClosed: Bool { session == nil }

    private func live(_ what: @autoclosure () -> String) throws -> gnutls_session_t {
        guard let session else { throw TLSError(code: 0, context: "\(what()): session closed") }
        return session
    }

    /// GnuTLS keeps a pointer to typed verification data (not a copy): it lives as long as the session.
    private var nameCheck: ServerNameCheck?

    private static func setALPN(_ s: gnutls_session_t, _ protocols: [String]) throws {
        guard !protocols.isEmpty else { return }
        let cstrings = protocols.map { strdup($0)! }
        defer { cstrings.forEach { free($0) } }
        var datums = cstrings.map { gnutls_datum_t(data: UnsafeMutableRawPointer($0).assumingMemoryBound(to: UInt8.self), size: UInt32(strlen($0))) }
        try TLSError.check(gnutls_alpn_set_protocols(s, &datums, UInt32(datums.count), 0), "ALPN")
    }


    /// Advance the handshake. Returns true once complete; throws on a fatal error (the alert,
    /// if any, is left in `outbound`).
    public func handshake() throws -> Bool {
        if handshakeComplete { return true }
        let session = try live("handshake")
        while true {
            let rc = gnutls_handshake(session)
            if rc == GNUTLS_E_SUCCESS {
                handshakeComplete = true
                return true
            }
            if rc == GNUTLS_E_AGAIN { return false }
            if rc == GNUTLS_E_INTERRUPTED { continue }
            if gnutls_error_is_fatal(rc) == 0 { continue }
            throw handshakeFailure(session, rc)
        }
    }

    private var isClient: Bool {
        if case .client = mode { return true }
        return false
    }

    /// The error for a fatal handshake result, after queueing the alert that tells the peer why
    /// (GnuTLS sends none by itself): the alert the peer sent us, our refusal of its certificate
    /// (unknown_ca, certificate_expired, certificate_required, …), or GnuTLS's own error.
    private func handshakeFailure(_ session: gnutls_session_t, _ rc: Int32) -> any Error {
        if rc == GNUTLS_E_FATAL_ALERT_RECEIVED {
            closed = true
            return TLSAlertReceived(alert: gnutls_alert_get(session).rawValue, weAreClient: isClient)
        }
        let status = gnutls_session_get_verify_cert_status(session)
        if rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR || rc == GNUTLS_E_CERTIFICATE_ERROR, status != 0, status != PeerCertificateRejected.notVerified {
            let refusal = PeerCertificateRejected.verificationFailed(
                status: status, subject: TLSVerifyStatus.peerSubject(session), weAreClient: isClient)
            sendFatalAlert(gnutls_alert_description_t(refusal.alert))
            return refusal
        }
        if !isClient, rc == GNUTLS_E_CERTIFICATE_REQUIRED || rc == GNUTLS_E_NO_CERTIFICATE_FOUND {
            let refusal = PeerCertificateRejected.noClientCertificate()
            sendFatalAlert(gnutls_alert_description_t(refusal.alert))
            return refusal
        }
        if !closed {
            closed = true
            _ = gnutls_alert_send_appropriate(session, rc)
        }
        return TLSError(code: rc, context: "handshake failed")
    }

    /// For an error that is a fatal alert from the peer: which alert (e.g. the node's
    /// "Access was denied" when it refused our certificate's role).
    private func receivedAlert(_ code: Int32) -> String {
        guard code == GNUTLS_E_FATAL_ALERT_RECEIVED, let session, let name = gnutls_alert_get_name(gnutls_alert_get(session)) else { return "" }
        return " (peer sent alert: \(String(cString: name)))"
    }

    /// Decrypt as much as possible from `inbound` into `plaintext`.
    public func receive(into plaintext: inout ByteBuffer) throws -> ReadResult {
        let session = try live("receiving")
        var got = false
        var left = -1
        while true {
            var rc = 0
            plaintext.writeWithUnsafeMutableBytes(minimumWritableBytes: 16 * 1024 + 256) { buf in
                rc = gnutls_record_recv(session, buf.baseAddress, buf.count)
                return rc > 0 ? rc : 0
            }
            if rc > 0 { got = true; continue }
            if rc == 0 { return got ? .data : .closed }
            let code = Int32(rc)
            if code == GNUTLS_E_AGAIN {
                // A post-handshake message (TLS 1.3 session tickets: OpenSSL servers such as Ceph's
                // radosgw send two) is consumed with E_AGAIN although more records may wait in
                // `inbound`; stopping there left an HTTP response undelivered until more bytes came.
                // Go on while `inbound` shrinks.
                if inbound.readableBytes > 0, inbound.readableBytes != left {
                    left = inbound.readableBytes
                    continue
                }
                return got ? .data : .wantMore
            }
            if code == GNUTLS_E_INTERRUPTED || code == GNUTLS_E_REHANDSHAKE { continue }
            if code == GNUTLS_E_PREMATURE_TERMINATION { return got ? .data : .closed }
            if gnutls_error_is_fatal(code) == 0 { continue }
            if code == GNUTLS_E_FATAL_ALERT_RECEIVED {
                // TLS 1.3: a client's handshake is over before the server checked its certificate;
                // the server's refusal arrives as the first record.
                throw TLSAlertReceived(alert: gnutls_alert_get(session).rawValue, weAreClient: isClient)
            }
            throw TLSError(code: code, context: "receiving" + receivedAlert(code))
        }
    }

    /// Encrypt `plaintext` into `outbound`.
    public func send(_ plaintext: ByteBuffer) throws {
        let session = try live("sending")
        // Room for every record's header and tag up front: no regrowth while encrypting.
        let records = plaintext.readableBytes / 16384 + 1
        outbound.reserveCapacity(minimumWritableBytes: plaintext.readableBytes + records * 64)
        try plaintext.withUnsafeReadableBytes { buf in
            var offset = 0
            while offset < buf.count {
                let rc = gnutls_record_send(session, buf.baseAddress! + offset, buf.count - offset)
                if rc > 0 { offset += rc; continue }
                let code = Int32(rc)
                if code == GNUTLS_E_AGAIN || code == GNUTLS_E_INTERRUPTED { continue }
                throw TLSError(code: code, context: "sending")
            }
        }
    }

    /// From now until `uncork`, `send` only hands GnuTLS the plaintext: it is sealed at `uncork`,
    /// into as few records as it fills (a response head and a small body become one record, one
    /// seal, one header instead of two).
    public func cork() throws {
        gnutls_record_cork(try live("sending"))
    }

    /// Seal what `cork` held into `outbound`.
    public func uncork() throws {
        let session = try live("sending")
        outbound.reserveCapacity(minimumWritableBytes: gnutls_record_check_corked(session) + 64)
        while true {
            let rc = gnutls_record_uncork(session, 0)
            if rc >= 0 { return }
            let code = Int32(rc)
            if code == GNUTLS_E_AGAIN || code == GNUTLS_E_INTERRUPTED { continue }
            throw TLSError(code: code, context: "sending")
        }
    }

    /// Queue close_notify into `outbound` (idempotent).
    public func bye() {
        guard handshakeComplete, !closed, let session else { return }
        closed = true
        _ = gnutls_bye(session, GNUTLS_SHUT_WR)
    }

    /// Queue a fatal alert into `outbound` (e.g. after refusing the peer's certificate); the
    /// caller flushes it and closes the connection.
    public func sendFatalAlert(_ description: gnutls_alert_description_t) {
        guard !closed, let session else { return }
        closed = true
        _ = gnutls_alert_send(session, GNUTLS_AL_FATAL, description)
    }

    /// Take what GnuTLS produced for the wire, if anything.
    public func takeOutbound() -> ByteBuffer? {
        guard outbound.readableBytes > 0 else { return nil }
        let out = outbound
        outbound.clear()
        // Do not share storage with the buffer we hand out.
        outbound = ByteBufferAllocator().buffer(capacity: 16 * 1024)
        return out
    }

    /// The negotiated ALPN protocol, if any.
    public var negotiatedALPN: String? {
        var d = gnutls_datum_t()
        guard let session, gnutls_alpn_get_selected_protocol(session, &d) == 0, let p = d.data else { return nil }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: Int(d.size)), as: UTF8.self)
    }

    /// Optional client authentication: if the client sent a certificate it must verify against the
    /// mesh CA (else the connection is refused); no certificate at all is allowed.
    /// Returns true if a verified certificate is present.
    public func verifyOptionalPeer() throws -> Bool {
        let session = try live("verifying client certificate")
        var count: UInt32 = 0
        guard gnutls_certificate_get_peers(session, &count) != nil, count > 0 else { return false }
        var status: UInt32 = 0
        try TLSError.check(gnutls_certificate_verify_peers3(session, nil, &status), "verifying client certificate")
        if status != 0 {
            let refusal = PeerCertificateRejected.verificationFailed(status: status, subject: TLSVerifyStatus.peerSubject(session), weAreClient: isClient)
            sendFatalAlert(gnutls_alert_description_t(refusal.alert))
            throw refusal
        }
        return true
    }

    /// The peer's identity from its (already verified) certificate; nil when it sent none, or
    /// when `RolePolicy` refuses it (`authenticatedPeer()` says why).
    public func peerIdentity() -> PeerIdentity? {
        try? authenticatedPeer()
    }

    /// The peer's identity from its (already verified) certificate: nil when the peer sent no
    /// certificate; throws `PeerCertificateRefused` (subject + reason) when the certificate
    /// carries no valid role under `RolePolicy` — the caller must then refuse the connection.
    public func authenticatedPeer() throws -> PeerIdentity? {
        guard let session else { return nil }
        return try Self.authenticatedPeer(of: session)
    }

    /// `authenticatedPeer()` for any transport's session (QUIC drives its own).
    package static func authenticatedPeer(of session: gnutls_session_t) throws -> PeerIdentity? {
        var count: UInt32 = 0
        guard let certs = gnutls_certificate_get_peers(session, &count), count > 0 else { return nil }
        let cert: X509Certificate
        do {
            cert = try X509Certificate.importDER(certs)
        } catch {
            throw PeerCertificateRefused(subject: "(unparsable certificate)", reason: .unreadable("\(error)"))
        }
        switch cert.role() {
        case .success(let role):
            return PeerIdentity(commonName: cert.commonName, role: role, authenticated: true)
        case .failure(let reason):
            throw PeerCertificateRefused(subject: cert.subject, reason: reason)
        }
    }

    /// Where refusals are logged when the caller has no logger of its own (QUIC).
    package static let logger = Logger(label: "cachemesh.tls")

    /// Role and name from the first certificate `session`'s peer presented (any transport); nil
    /// when there is none or `RolePolicy` refuses it — a refusal is logged (subject and reason),
    /// and a server must then refuse the connection.
    package static func peerIdentity(of session: gnutls_session_t, logger: Logger = TLSSession.logger) -> PeerIdentity? {
        do {
            return try authenticatedPeer(of: session)
        } catch {
            logger.warning("TLS: \(error); connection closed")
            return nil
        }
    }
}
