import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// Makes a client session verify the server certificate against `serverName`: a DNS name (also
/// sent as SNI) or an IP address (matched against the certificate's IP SANs as raw bytes).
///
/// GnuTLS keeps *pointers* to the name / typed data, not copies, so this object owns them and must
/// live as long as the session (TLS over TCP and QUIC sessions both hold one).
package final class ServerNameCheck {
    private var name: UnsafeMutablePointer<CChar>?
    private var vdata: UnsafeMutablePointer<gnutls_typed_vdata_st>?
    private var raw: UnsafeMutablePointer<UInt8>?

    package init(session s: gnutls_session_t, serverName: String) {
        if let ip = Self.ipBytes(serverName) {
            let raw = UnsafeMutablePointer<UInt8>.allocate(capacity: ip.count)
            raw.initialize(from: ip, count: ip.count)
            let vdata = UnsafeMutablePointer<gnutls_typed_vdata_st>.allocate(capacity: 1)
            vdata.initialize(to: gnutls_typed_vdata_st(type: GNUTLS_DT_IP_ADDRESS, data: raw, size: UInt32(ip.count)))
            self.raw = raw
            self.vdata = vdata
            gnutls_session_set_verify_cert2(s, vdata, 1, 0)
        } else {
            _ = serverName.withCString { p in gnutls_server_name_set(s, GNUTLS_NAME_DNS, p, strlen(p)) }
            let name = strdup(serverName)!
            self.name = name
            gnutls_session_set_verify_cert(s, name, 0)
        }
    }

    deinit {
        free(name)
        vdata?.deallocate()
        raw?.deallocate()
    }

    package static func ipBytes(_ s: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, s, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, s, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }
}
