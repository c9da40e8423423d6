import CGnuTLS
import MeshHTTP

/// Extended key usage OIDs (RFC 5280 §4.2.1.12) the role rules look at.
public enum KeyPurpose {
    /// id-kp-serverAuth, GnuTLS `GNUTLS_KP_TLS_WWW_SERVER` (certtool `tls_www_server`).
    public static let serverAuth = "1.3.6.1.5.5.7.3.1"
    /// id-kp-clientAuth, GnuTLS `GNUTLS_KP_TLS_WWW_CLIENT` (certtool `tls_www_client`).
    public static let clientAuth = "1.3.6.1.5.5.7.3.2"

    static func name(_ oid: String) -> String {
        switch oid {
        case serverAuth: "serverAuth (\(oid))"
        case clientAuth: "clientAuth (\(oid))"
        default: oid
        }
    }
}

/// Why a verified certificate gets no role. A certificate refused for any of these reasons is
/// refused outright (the connection is closed), never given a lesser role.
public enum RoleRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    /// The subject has no OU at all.
    case noRoleOU
    /// The subject has more than one OU (exactly one is allowed, and it must name a role).
    case severalOUs([String])
    /// The only OU is not exactly `node`, `client` or `reader` (case-sensitive: `Client` is refused).
    case unknownOU(String)
    /// The role needs extended key usages the certificate does not list.
    case missingKeyPurposes(role: PeerRole, missing: [String])
    /// The certificate could not be read (a GnuTLS error while parsing it).
    case unreadable(String)

    public var description: String {
        let roles = PeerRole.allCases.map(\.rawValue).joined(separator: ", ")
        switch self {
        case .noRoleOU:
            return "no OU in the subject (exactly one of \(roles) is required)"
        case .severalOUs(let ous):
            return "\(ous.count) OUs in the subject (\(ous.map { "\"\($0)\"" }.joined(separator: ", "))); exactly one role OU is allowed"
        case .unknownOU(let ou):
            let hint = PeerRole.allCases.first { $0.rawValue.lowercased() == ou.lowercased() }.map { " (OUs are case-sensitive: did you mean \"\($0.rawValue)\"?)" } ?? ""
            return "OU \"\(ou)\" is not a role (one of \(roles), exactly)\(hint)"
        case .missingKeyPurposes(let role, let missing):
            return "OU=\(role.rawValue) needs the extended key usage \(missing.map(KeyPurpose.name).joined(separator: " and ")), which the certificate lacks"
        case .unreadable(let why):
            return "certificate unreadable: \(why)"
        }
    }
}

/// The role rules, as a pure function of what a certificate says (tested without TLS).
public enum RolePolicy {
    /// The extended key usages a certificate of `role` must list: every role connects as a TLS
    /// client (clientAuth); a node is also a server to its peers (serverAuth), and a node
    /// certificate needs both whichever side it is presented on. This is what
    /// `certs/mkcerts.sh` writes (`tls_www_client`, plus `tls_www_server` for nodes).
    /// A certificate without the extension at all lists nothing and is refused: no implicit
    /// "any purpose", and anyExtendedKeyUsage (2.5.29.37.0) does not stand in either.
    public static func requiredKeyPurposes(for role: PeerRole) -> [String] {
        switch role {
        case .reader, .client: [KeyPurpose.clientAuth]
        case .node: [KeyPurpose.clientAuth, KeyPurpose.serverAuth]
        }
    }

    /// The role of a certificate whose subject has the OUs `organizationalUnits` (every OU
    /// attribute, in order) and whose extended key usage lists `keyPurposes` (OIDs).
    ///
    /// Exactly one OU, equal byte for byte to a role name as `certs/mkcerts.sh` writes it
    /// (`node`, `client`, `reader`); anything else is refused — several OUs (even if all are
    /// roles: no "highest wins"), an unknown or differently-cased OU, or a missing key purpose.
    public static func role(organizationalUnits: [String], keyPurposes: [String]) -> Result<PeerRole, RoleRefusal> {
        guard let ou = organizationalUnits.first else { return .failure(.noRoleOU) }
        guard organizationalUnits.count == 1 else { return .failure(.severalOUs(organizationalUnits)) }
        guard let role = PeerRole(rawValue: ou) else { return .failure(.unknownOU(ou)) }
        let missing = requiredKeyPurposes(for: role).filter { !keyPurposes.contains($0) }
        guard missing.isEmpty else { return .failure(.missingKeyPurposes(role: role, missing: missing)) }
        return .success(role)
    }
}

/// A verified peer certificate refused by the role rules: names the subject and the reason.
public struct PeerCertificateRefused: Error, Sendable, CustomStringConvertible {
    /// The certificate subject, RFC 4514 style as GnuTLS prints it (`CN=x,OU=client,O=CacheMesh`).
    public var subject: String
    public var reason: RoleRefusal

    public init(subject: String, reason: RoleRefusal) {
        self.subject = subject
        self.reason = reason
    }

    public var description: String { "peer certificate \"\(subject)\" refused: \(reason)" }

    /// The TLS alert that tells the peer: a role problem is an access-control decision
    /// (access_denied); a missing key purpose or an unparsable certificate is a certificate
    /// this node does not accept for TLS client use (unsupported_certificate / bad_certificate).
    package var alert: gnutls_alert_description_t {
        switch reason {
        case .noRoleOU, .severalOUs, .unknownOU: GNUTLS_A_ACCESS_DENIED
        case .missingKeyPurposes: GNUTLS_A_UNSUPPORTED_CERTIFICATE
        case .unreadable: GNUTLS_A_BAD_CERTIFICATE
        }
    }

    /// GnuTLS's name for `alert` ("Access was denied", …), for the log.
    package var alertName: String {
        gnutls_alert_get_name(alert).map { String(cString: $0) } ?? "\(alert.rawValue)"
    }
}
