import CGnuTLS
#if canImport(Glibc)
import Glibc
import MeshHTTP
#endif

/// One parsed X.509 certificate. Sole owner of its `gnutls_x509_crt_t`, freed once in `deinit`:
/// the factories wrap the handle right after `gnutls_x509_crt_init` and free nothing themselves.
package final class X509Certificate {
    private let crt: gnutls_x509_crt_t

    private init(initialized crt: gnutls_x509_crt_t) {
        self.crt = crt
    }

    deinit { gnutls_x509_crt_deinit(crt) }

    private static func make(_ what: String, _ load: (gnutls_x509_crt_t) -> Int32) throws -> X509Certificate {
        var raw: gnutls_x509_crt_t?
        try TLSError.check(gnutls_x509_crt_init(&raw), "gnutls_x509_crt_init")
        guard let raw else { throw TLSError(code: 0, context: "gnutls_x509_crt_init") }
        let cert = X509Certificate(initialized: raw)  // owns `raw` from here on, whatever happens
        try TLSError.check(load(raw), what)
        return cert
    }

    /// A DER certificate, as GnuTLS hands out the peer's chain.
    package static func importDER(_ der: UnsafePointer<gnutls_datum_t>) throws -> X509Certificate {
        try make("importing the peer certificate") { gnutls_x509_crt_import($0, der, GNUTLS_X509_FMT_DER) }
    }

    /// The first certificate of a PEM file (tests, tools).
    package static func load(pemFile path: String) throws -> X509Certificate {
        var datum = gnutls_datum_t()
        try TLSError.check(gnutls_load_file(path, &datum), "reading \(path)")
        defer { cm_gnutls_free(datum.data) }
        return try make("parsing \(path)") { gnutls_x509_crt_import($0, &datum, GNUTLS_X509_FMT_PEM) }
    }

    /// The subject DN, RFC 4514 style (`CN=node,OU=node,O=CacheMesh`).
    package var subject: String {
        var d = gnutls_datum_t()
        guard gnutls_x509_crt_get_dn3(crt, &d, 0) >= 0, let p = d.data else { return "(unreadable subject)" }
        defer { cm_gnutls_free(p) }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: Int(d.size)), as: UTF8.self)
    }

    /// Every value of the subject attribute `oid`, in order (all of them: GnuTLS indexes the
    /// attribute across every RDN). Empty values are kept, so they count.
    package func subjectValues(_ oid: String) throws -> [String] {
        var values: [String] = []
        var index: UInt32 = 0
        while true {
            var size = 0
            var rc = gnutls_x509_crt_get_dn_by_oid(crt, oid, index, 0, nil, &size)
            if rc == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE { return values }
            if rc == GNUTLS_E_SHORT_MEMORY_BUFFER {
                var buf = [UInt8](repeating: 0, count: size + 1)
                rc = gnutls_x509_crt_get_dn_by_oid(crt, oid, index, 0, &buf, &size)
                try TLSError.check(rc, "reading subject attribute \(oid) #\(index)")
                values.append(String(decoding: buf.prefix(size), as: UTF8.self))
            } else {
                try TLSError.check(rc, "reading subject attribute \(oid) #\(index)")
                values.append("")  // an empty value fits in no buffer at all
            }
            index += 1
        }
    }

    /// The extended key usage OIDs; empty when the certificate has no such extension.
    package func keyPurposes() throws -> [String] {
        var oids: [String] = []
        var index: UInt32 = 0
        while true {
            var buf = [CChar](repeating: 0, count: 128)
            var size = buf.count
            var rc = gnutls_x509_crt_get_key_purpose_oid(crt, index, &buf, &size, nil)
            if rc == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE { return oids }
            if rc == GNUTLS_E_SHORT_MEMORY_BUFFER {
                buf = [CChar](repeating: 0, count: size + 1)
                size = buf.count
                rc = gnutls_x509_crt_get_key_purpose_oid(crt, index, &buf, &size, nil)
            }
            try TLSError.check(rc, "reading extended key usage #\(index)")
            oids.append(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
            index += 1
        }
    }

    /// The subject common name, if any.
    package var commonName: String? {
        (try? subjectValues(GNUTLS_OID_X520_COMMON_NAME))?.first
    }

    /// The role this certificate carries under `RolePolicy`, or why it carries none.
    package func role() -> Result<PeerRole, RoleRefusal> {
        do {
            return RolePolicy.role(organizationalUnits: try subjectValues(GNUTLS_OID_X520_ORGANIZATIONAL_UNIT_NAME),
                                   keyPurposes: try keyPurposes())
        } catch {
            return .failure(.unreadable("\(error)"))
        }
    }
}
