import CGnuTLS
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// One GnuTLS session driven through memory buffers (no socket): ciphertext comes in through
/// `inbound`, goes out through `outbound`. Owns its `gnutls_session_t`; not thread-safe, it
/// lives on one event loop (its handler's).
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

    let session: gnutls_session_t
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
                // mTLS: verify the client chain against the mesh CA during the handshake. In optional
                // mode GnuTLS's automatic check would also reject a client that sent no certificate,
                // so the chain is verified right after the handshake instead (`verifyOptionalPeer`).
                if auth == .require { gnutls_session_set_verify_cert(s, nil, 0) }
            case .client(let serverName):
                nameCheck = ServerNameCheck(session: s, serverName: serverName)
            }
            try Self.setALPN(s, alpn)
        } catch {
            gnutls_deinit(s)
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
                gnutls_transport_set_errno(me.session, cm_errno_eagain())
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
        gnutls_deinit(session)
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
        while true {
            let rc = gnutls_handshake(session)
            if rc == GNUTLS_E_SUCCESS {
                handshakeComplete = true
                return true
            }
            if rc == GNUTLS_E_AGAIN { return false }
            if rc == GNUTLS_E_INTERRUPTED { continue }
            if gnutls_error_is_fatal(rc) == 0 { continue }
            var context = "handshake failed"
            if rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR || rc == GNUTLS_E_CERTIFICATE_ERROR {
                context += " (\(verifyStatusDescription()))"
            }
            throw TLSError(code: rc, context: context)
        }
    }

    private func verifyStatusDescription() -> String {
        let status = gnutls_session_get_verify_cert_status(session)
        var out = gnutls_datum_t()
        guard gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0, let d = out.data else {
            return "certificate verification status \(status)"
        }
        defer { cm_gnutls_free(d) }
        return String(decoding: UnsafeRawBufferPointer(start: d, count: Int(out.size)), as: UTF8.self)
    }

    /// Decrypt as much as possible from `inbound` into `plaintext`.
    public func receive(into plaintext: inout ByteBuffer) throws -> ReadResult {
        var got = false
        while true {
            var rc = 0
            plaintext.writeWithUnsafeMutableBytes(minimumWritableBytes: 16 * 1024 + 256) { buf in
                rc = gnutls_record_recv(session, buf.baseAddress, buf.count)
                return rc > 0 ? rc : 0
            }
            if rc > 0 { got = true; continue }
            if rc == 0 { return got ? .data : .closed }
            let code = Int32(rc)
            if code == GNUTLS_E_AGAIN { return got ? .data : .wantMore }
            if code == GNUTLS_E_INTERRUPTED || code == GNUTLS_E_REHANDSHAKE { continue }
            if code == GNUTLS_E_PREMATURE_TERMINATION { return got ? .data : .closed }
            if gnutls_error_is_fatal(code) == 0 { continue }
            throw TLSError(code: code, context: "receiving")
        }
    }

    /// Encrypt `plaintext` into `outbound`.
    public func send(_ plaintext: ByteBuffer) throws {
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

    /// Queue close_notify into `outbound` (idempotent).
    public func bye() {
        guard handshakeComplete, !closed else { return }
        closed = true
        _ = gnutls_bye(session, GNUTLS_SHUT_WR)
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
        guard gnutls_alpn_get_selected_protocol(session, &d) == 0, let p = d.data else { return nil }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: Int(d.size)), as: UTF8.self)
    }

    /// Optional client authentication: if the client sent a certificate it must verify against the
    /// mesh CA (else the connection is refused); no certificate at all is allowed.
    /// Returns true if a verified certificate is present.
    public func verifyOptionalPeer() throws -> Bool {
        var count: UInt32 = 0
        guard gnutls_certificate_get_peers(session, &count) != nil, count > 0 else { return false }
        var status: UInt32 = 0
        try TLSError.check(gnutls_certificate_verify_peers3(session, nil, &status), "verifying client certificate")
        if status != 0 {
            throw TLSError(code: GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR, context: "client certificate rejected (\(verifyStatusDescription()))")
        }
        return true
    }

    /// The peer's identity from its (already verified) certificate.
    public func peerIdentity() -> PeerIdentity? {
        Self.peerIdentity(of: session)
    }

    /// Role and name from the first certificate `session`'s peer presented (any transport).
    package static func peerIdentity(of session: gnutls_session_t) -> PeerIdentity? {
        var count: UInt32 = 0
        guard let certs = gnutls_certificate_get_peers(session, &count), count > 0 else { return nil }
        var crt: gnutls_x509_crt_t?
        guard gnutls_x509_crt_init(&crt) >= 0, let crt else { return nil }
        defer { gnutls_x509_crt_deinit(crt) }
        guard gnutls_x509_crt_import(crt, certs, GNUTLS_X509_FMT_DER) >= 0 else { return nil }
        let cn = Self.dnField(crt, GNUTLS_OID_X520_COMMON_NAME)
        var role: PeerRole?
        var i: UInt32 = 0
        // Any OU naming a role counts; the highest wins if a certificate names several.
        while let ou = Self.dnField(crt, GNUTLS_OID_X520_ORGANIZATIONAL_UNIT_NAME, index: i) {
            if let r = PeerRole(rawValue: ou.lowercased()), r > (role ?? .reader) || role == nil { role = r }
            i += 1
        }
        return PeerIdentity(commonName: cn, role: role, authenticated: true)
    }

    private static func dnField(_ crt: gnutls_x509_crt_t, _ oid: String, index: UInt32 = 0) -> String? {
        var size = 0
        var rc = gnutls_x509_crt_get_dn_by_oid(crt, oid, index, 0, nil, &size)
        guard rc == GNUTLS_E_SHORT_MEMORY_BUFFER, size > 0 else { return nil }
        var buf = [UInt8](repeating: 0, count: size + 1)
        rc = gnutls_x509_crt_get_dn_by_oid(crt, oid, index, 0, &buf, &size)
        guard rc >= 0 else { return nil }
        return String(decoding: buf.prefix(size), as: UTF8.self)
    }
}
