import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// A certificate or key file that cannot be read, said in words:
/// `cannot read certificate file /x/y.pem: no such file or directory`.
public struct TLSFileError: Error, Sendable, CustomStringConvertible {
    /// "CA certificate", "certificate", "private key".
    public var kind: String
    public var path: String
    public var reason: String

    public var description: String { "cannot read \(kind) file \(path): \(reason)" }

    /// Throws unless `path` is a file this process can open for reading.
    static func checkReadable(_ path: String, _ kind: String) throws {
        func fail(_ reason: String) -> TLSFileError { TLSFileError(kind: kind, path: path, reason: reason) }
        func text(_ e: Int32) -> String {
            let s = String(cString: strerror(e))
            return s.prefix(1).lowercased() + s.dropFirst()
        }
        var st = stat()
        guard stat(path, &st) == 0 else { throw fail(text(errno)) }
        if st.st_mode & S_IFMT == S_IFDIR { throw fail("it is a directory") }
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw fail(text(errno)) }
        close(fd)
        if st.st_mode & S_IFMT == S_IFREG && st.st_size == 0 { throw fail("it is empty") }
    }
}

/// How a server treats client certificates.
public enum ClientAuthentication: Sendable {
    /// mTLS (the default): a certificate chaining to the mesh CA is required.
    case require
    /// A certificate is requested and verified when sent; connections without one get the `reader` role.
    case optionalReadOnly
}

/// PEM file locations for one TLS identity.
public struct TLSFiles: Sendable {
    /// nil for a client that presents no certificate (only useful against optional-auth servers).
    public var certificateChain: String?
    public var privateKey: String?
    public var trustedCA: String

    public init(certificateChain: String?, privateKey: String?, trustedCA: String) {
        self.certificateChain = certificateChain
        self.privateKey = privateKey
        self.trustedCA = trustedCA
    }
}

/// GnuTLS certificate credentials + priority cache, loaded once and shared by every session.
///
/// Immutable after `init`; GnuTLS documents credentials and priority caches as safe to share
/// between sessions on different threads once set up, hence `@unchecked Sendable`.
public final class TLSCredentials: @unchecked Sendable {
    /// Prefer AES-GCM (4.4 GB/s here with AES-NI) over ChaCha20 (0.5 GB/s); TLS 1.3, 1.2 allowed.
    public static let priority =
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:%SERVER_PRECEDENCE"

    /// Shared with the other transports of this package (QUIC drives its own GnuTLS sessions).
    package let credentials: gnutls_certificate_credentials_t
    package let priorityCache: gnutls_priority_t
    public let files: TLSFiles

    public init(files: TLSFiles) throws {
        var creds: gnutls_certificate_credentials_t?
        try TLSError.check(gnutls_certificate_allocate_credentials(&creds), "allocating credentials")
        guard let creds else { throw TLSError(code: 0, context: "allocating credentials") }
        do {
            // GnuTLS says only "Error while reading file. (-64)": find out what is wrong first.
            try TLSFileError.checkReadable(files.trustedCA, "CA certificate")
            if let chain = files.certificateChain { try TLSFileError.checkReadable(chain, "certificate") }
            if let key = files.privateKey { try TLSFileError.checkReadable(key, "private key") }
            let n = gnutls_certificate_set_x509_trust_file(creds, files.trustedCA, GNUTLS_X509_FMT_PEM)
            if n < 0 { throw TLSError(code: n, context: "loading CA \(files.trustedCA)") }
            if n == 0 { throw TLSError(code: 0, context: "no CA certificate in \(files.trustedCA)") }
            if let chain = files.certificateChain, let key = files.privateKey {
                try TLSError.check(
                    gnutls_certificate_set_x509_key_file2(creds, chain, key, GNUTLS_X509_FMT_PEM, nil, 0),
                    "loading certificate \(chain) with key \(key)")
            }
        } catch {
            gnutls_certificate_free_credentials(creds)
            throw error
        }
        self.priorityCache = try Self.priorityCache(freeingOnFailure: creds)
        self.credentials = creds
        self.files = files
    }

    /// For a client of a service outside the mesh (an S3 endpoint): no certificate of its own;
    /// servers are trusted when they chain to the CAs in `caFile`, or without it to the system's
    /// trust store (Debian: /etc/ssl/certs/ca-certificates.crt).
    public init(clientTrusting caFile: String?) throws {
        var creds: gnutls_certificate_credentials_t?
        try TLSError.check(gnutls_certificate_allocate_credentials(&creds), "allocating credentials")
        guard let creds else { throw TLSError(code: 0, context: "allocating credentials") }
        do {
            if let caFile {
                try TLSFileError.checkReadable(caFile, "CA certificate")
                let n = gnutls_certificate_set_x509_trust_file(creds, caFile, GNUTLS_X509_FMT_PEM)
                if n < 0 { throw TLSError(code: n, context: "loading CA \(caFile)") }
                if n == 0 { throw TLSError(code: 0, context: "no CA certificate in \(caFile)") }
            } else {
                let n = gnutls_certificate_set_x509_system_trust(creds)
                if n < 0 { throw TLSError(code: n, context: "loading the system's trusted CAs") }
                if n == 0 { throw TLSError(code: 0, context: "the system trust store has no CA certificate (install ca-certificates, or set a CA file)") }
            }
        } catch {
            gnutls_certificate_free_credentials(creds)
            throw error
        }
        self.priorityCache = try Self.priorityCache(freeingOnFailure: creds)
        self.credentials = creds
        self.files = TLSFiles(certificateChain: nil, privateKey: nil, trustedCA: caFile ?? "(system trust store)")
    }

    /// The priority cache both initialisers end with; on failure `creds` is freed (nothing owns it yet).
    private static func priorityCache(freeingOnFailure creds: gnutls_certificate_credentials_t) throws -> gnutls_priority_t {
        var prio: gnutls_priority_t?
        let rc = gnutls_priority_init(&prio, priority, nil)
        guard rc >= 0, let prio else {
            gnutls_certificate_free_credentials(creds)
            throw TLSError(code: rc, context: "priority string")
        }
        return prio
    }

    deinit {
        gnutls_priority_deinit(priorityCache)
        gnutls_certificate_free_credentials(credentials)
    }
}
