import CGnuTLS
import Logging
import Synchronization

/// TLS alerts in words, for people reading an error message.
public enum TLSAlertText {
    /// Alerts that say the receiver's certificate was refused.
    static let certificateAlerts: Set<UInt32> = [
        GNUTLS_A_BAD_CERTIFICATE.rawValue, GNUTLS_A_UNSUPPORTED_CERTIFICATE.rawValue, GNUTLS_A_CERTIFICATE_REVOKED.rawValue,
        GNUTLS_A_CERTIFICATE_EXPIRED.rawValue, GNUTLS_A_CERTIFICATE_UNKNOWN.rawValue, GNUTLS_A_UNKNOWN_CA.rawValue,
        GNUTLS_A_ACCESS_DENIED.rawValue, GNUTLS_A_CERTIFICATE_REQUIRED.rawValue,
    ]

    public static func isCertificateAlert(_ alert: UInt32) -> Bool { certificateAlerts.contains(alert) }

    /// The alert's name: "unknown CA", "certificate expired", …
    public static func name(_ alert: UInt32) -> String {
        switch alert {
        case GNUTLS_A_BAD_CERTIFICATE.rawValue: return "bad certificate"
        case GNUTLS_A_UNSUPPORTED_CERTIFICATE.rawValue: return "unsupported certificate"
        case GNUTLS_A_CERTIFICATE_REVOKED.rawValue: return "certificate revoked"
        case GNUTLS_A_CERTIFICATE_EXPIRED.rawValue: return "certificate expired"
        case GNUTLS_A_CERTIFICATE_UNKNOWN.rawValue: return "certificate unknown"
        case GNUTLS_A_UNKNOWN_CA.rawValue: return "unknown CA"
        case GNUTLS_A_ACCESS_DENIED.rawValue: return "access denied"
        case GNUTLS_A_CERTIFICATE_REQUIRED.rawValue: return "certificate required"
        default: return gnutls_alert_get_name(gnutls_alert_description_t(alert)).map { String(cString: $0) } ?? "TLS alert \(alert)"
        }
    }

    /// "unknown CA (…)", "certificate expired", … — the alert's name and what it usually means here.
    public static func words(_ alert: UInt32, peer: String = "the other side") -> String {
        switch alert {
        case GNUTLS_A_BAD_CERTIFICATE.rawValue: return "bad certificate"
        case GNUTLS_A_UNSUPPORTED_CERTIFICATE.rawValue: return "unsupported certificate (it lacks the key purpose this use needs)"
        case GNUTLS_A_CERTIFICATE_REVOKED.rawValue: return "certificate revoked"
        case GNUTLS_A_CERTIFICATE_EXPIRED.rawValue: return "certificate expired (or not yet valid)"
        case GNUTLS_A_CERTIFICATE_UNKNOWN.rawValue: return "certificate unknown"
        case GNUTLS_A_UNKNOWN_CA.rawValue: return "unknown CA (it was not issued by the CA \(peer) trusts)"
        case GNUTLS_A_ACCESS_DENIED.rawValue: return "access denied (\(peer) does not accept the certificate's role)"
        case GNUTLS_A_CERTIFICATE_REQUIRED.rawValue: return "certificate required (no certificate was sent; give --cert and --key)"
        case GNUTLS_A_HANDSHAKE_FAILURE.rawValue: return "handshake failure"
        case GNUTLS_A_PROTOCOL_VERSION.rawValue: return "protocol version not supported"
        case GNUTLS_A_NO_APPLICATION_PROTOCOL.rawValue: return "no application protocol in common (ALPN)"
        default:
            let name = gnutls_alert_get_name(gnutls_alert_description_t(alert)).map { String(cString: $0) } ?? "alert"
            return "\(name) (TLS alert \(alert))"
        }
    }
}

/// The other side ended the connection with a fatal TLS alert (over TCP, or as a QUIC
/// CRYPTO_ERROR). For a certificate alert the description says whose certificate was refused.
public struct TLSAlertReceived: Error, Sendable, CustomStringConvertible, Equatable {
    /// The TLS alert description (RFC 8446 §6), e.g. 48 for unknown_ca.
    public var alert: UInt32
    /// True when this side is the client (so the peer is the server).
    public var weAreClient: Bool

    public init(alert: UInt32, weAreClient: Bool) {
        self.alert = alert
        self.weAreClient = weAreClient
    }

    public var description: String {
        let peer = weAreClient ? "server" : "client"
        if TLSAlertText.isCertificateAlert(alert) {
            return "the \(peer) refused our certificate: \(TLSAlertText.words(alert, peer: "the \(peer)"))"
        }
        return "the \(peer) ended the TLS handshake: \(TLSAlertText.words(alert, peer: "the \(peer)"))"
    }
}

/// This side refused the peer's certificate during the handshake: it did not verify (another CA,
/// expired, not for the name we dialled) or none was sent. The alert went to the peer.
public struct PeerCertificateRejected: Error, Sendable, CustomStringConvertible {
    /// The refused certificate's subject (nil when none was sent or it could not be read).
    public var subject: String?
    /// Why, in words: "it was not issued by the mesh CA", "it expired", …
    public var reason: String
    /// The alert sent (raw description).
    public var alert: UInt32
    public var weAreClient: Bool

    public var description: String {
        let subj = subject.map { " (\"\($0)\")" } ?? ""
        return weAreClient ? "we refused the server's certificate\(subj): \(reason)" : "client certificate\(subj) refused: \(reason)"
    }

    /// GnuTLS's status when no verification ran (e.g. no certificate was sent).
    package static let notVerified = UInt32.max

    /// Builds the refusal for a failed verification (`status`: GnuTLS verify status bits).
    package static func verificationFailed(status: UInt32, subject: String?, weAreClient: Bool) -> PeerCertificateRejected {
        var reasons: [String] = []
        var alert = GNUTLS_A_BAD_CERTIFICATE
        let trusted = weAreClient ? "the CA we trust (--ca)" : "the mesh CA this node trusts"
        func has(_ flag: gnutls_certificate_status_t) -> Bool { status & flag.rawValue != 0 }
        if has(GNUTLS_CERT_SIGNER_NOT_FOUND) || has(GNUTLS_CERT_SIGNER_NOT_CA) {
            reasons.append("it was not issued by \(trusted)")
            alert = GNUTLS_A_UNKNOWN_CA
        }
        if has(GNUTLS_CERT_EXPIRED) {
            reasons.append("it has expired")
            if alert == GNUTLS_A_BAD_CERTIFICATE { alert = GNUTLS_A_CERTIFICATE_EXPIRED }
        }
        if has(GNUTLS_CERT_NOT_ACTIVATED) {
            reasons.append("it is not valid yet")
            if alert == GNUTLS_A_BAD_CERTIFICATE { alert = GNUTLS_A_CERTIFICATE_EXPIRED }
        }
        if has(GNUTLS_CERT_REVOKED) {
            reasons.append("it was revoked")
            alert = GNUTLS_A_CERTIFICATE_REVOKED
        }
        if has(GNUTLS_CERT_UNEXPECTED_OWNER) { reasons.append("it is not for the name or address we connected to") }
        if has(GNUTLS_CERT_SIGNATURE_FAILURE) { reasons.append("its signature does not verify") }
        if has(GNUTLS_CERT_INSECURE_ALGORITHM) { reasons.append("it is signed with an insecure algorithm") }
        if has(GNUTLS_CERT_PURPOSE_MISMATCH) {
            reasons.append("it lacks the key purpose for this use")
            if alert == GNUTLS_A_BAD_CERTIFICATE { alert = GNUTLS_A_UNSUPPORTED_CERTIFICATE }
        }
        if reasons.isEmpty { reasons.append(TLSVerifyStatus.describe(status)) }
        return PeerCertificateRejected(subject: subject, reason: reasons.joined(separator: "; ") + " (alert sent: \(TLSAlertText.name(alert.rawValue)))",
                                       alert: alert.rawValue, weAreClient: weAreClient)
    }

    /// A server that requires a client certificate got none.
    package static func noClientCertificate() -> PeerCertificateRejected {
        PeerCertificateRejected(subject: nil, reason: "no client certificate was sent and this node requires one (alert sent: certificate required)",
                                alert: GNUTLS_A_CERTIFICATE_REQUIRED.rawValue, weAreClient: false)
    }
}

package enum TLSVerifyStatus {
    /// GnuTLS's own text for verify status bits.
    package static func describe(_ status: UInt32) -> String {
        var out = gnutls_datum_t()
        guard gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0, let d = out.data else {
            return "certificate verification status \(status)"
        }
        defer { cm_gnutls_free(d) }
        return String(decoding: UnsafeRawBufferPointer(start: d, count: Int(out.size)), as: UTF8.self)
    }

    /// Subject of the first certificate the peer presented, if any (readable).
    package static func peerSubject(_ session: gnutls_session_t) -> String? {
        var count: UInt32 = 0
        guard let certs = gnutls_certificate_get_peers(session, &count), count > 0,
              let cert = try? X509Certificate.importDER(certs) else { return nil }
        return cert.subject
    }
}

/// At most one log line per key per `interval` (a flood of bad connections or messages must not
/// flood the log); counts what it held back, so the next line can say so.
public final class LogThrottle: Sendable {
    private let interval: Duration
    private let state = Mutex<(last: [String: Duration], suppressed: [String: Int])>(([:], [:]))

    public init(interval: Duration) { self.interval = interval }

    /// Whether to log now for `key`.
    public func allow(_ key: String, now: Duration) -> Bool { allowCounting(key, now: now) != nil }

    /// nil: stay quiet; else how many lines for `key` were held back since the last one.
    public func allowCounting(_ key: String, now: Duration) -> Int? {
        state.withLock { s in
            if let t = s.last[key], now - t < interval {
                s.suppressed[key, default: 0] += 1
                return nil
            }
            if s.last.count > 1024 { s.last.removeAll(); s.suppressed.removeAll() }
            s.last[key] = now
            return s.suppressed.removeValue(forKey: key) ?? 0
        }
    }
}

/// Where refused TLS peers are logged: warning level, the peer's address, the certificate's
/// subject and the reason; at most one line a second per kind of refusal.
package enum TLSRefusalLog {
    static let throttle = LogThrottle(interval: .seconds(1))
    static let start = ContinuousClock.now

    package static func log(_ logger: Logger, remote: String, kind: String, _ message: String) {
        guard let held = throttle.allowCounting(kind, now: ContinuousClock.now - start) else { return }
        let more = held > 0 ? " (\(held) more like it in the last second not logged)" : ""
        logger.warning("TLS: connection from \(remote) closed: \(message)\(more)")
    }
}
