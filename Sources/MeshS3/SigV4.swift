import CGnuTLS
import Foundation

/// Access key and secret for an S3 endpoint.
public struct S3Credentials: Sendable, Equatable {
    public var accessKeyID: String
    public var secretAccessKey: String
    public init(accessKeyID: String, secretAccessKey: String) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
    }
}

/// AWS Signature Version 4 (`AWS4-HMAC-SHA256`): the canonical request, the string to sign, the
/// signing key and the `Authorization` header. Pure functions (no clock, no I/O): the caller passes
/// the time; HMAC-SHA256 and SHA-256 come from GnuTLS.
public enum SigV4 {
    public static let algorithm = "AWS4-HMAC-SHA256"
    /// `x-amz-content-sha256` of an empty body.
    public static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    /// `x-amz-content-sha256` when the body is not signed (multipart parts: TCP and the ETag check it).
    public static let unsignedPayload = "UNSIGNED-PAYLOAD"

    public struct Request: Sendable {
        public var method: String
        /// The path as sent, already percent-encoded (`S3Path.encode`).
        public var path: String
        /// Query parameters, not encoded (a parameter without a value has "").
        public var query: [(String, String)]
        /// Headers to sign (names in any case); `host` and `x-amz-date` must be among them.
        public var headers: [(String, String)]
        public var payloadHash: String
        public init(method: String, path: String, query: [(String, String)] = [], headers: [(String, String)], payloadHash: String) {
            self.method = method
            self.path = path
            self.query = query
            self.headers = headers
            self.payloadHash = payloadHash
        }
    }

    /// `20130524T000000Z` for a time.
    public static func amzDate(_ date: Date) -> String {
        var t = time_t(date.timeIntervalSince1970.rounded(.down))
        var tm = tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(tm.tm_year + 1900)\(two(tm.tm_mon + 1))\(two(tm.tm_mday))T\(two(tm.tm_hour))\(two(tm.tm_min))\(two(tm.tm_sec))Z"
    }

    /// RFC 3986 unreserved characters stay; everything else is %XX (uppercase). `/` stays when
    /// `keepSlash` (object key paths).
    public static func uriEncode(_ s: String, keepSlash: Bool) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.unicodeScalars.append(UnicodeScalar(b))
            case UInt8(ascii: "/") where keepSlash:
                out.append("/")
            default:
                out += "%" + hexDigit(b >> 4) + hexDigit(b & 15)
            }
        }
        return out
    }

    private static func hexDigit(_ v: UInt8) -> String { String(UnicodeScalar(v < 10 ? 48 + v : 55 + v)) }

    public static func canonicalQuery(_ query: [(String, String)]) -> String {
        query.map { (uriEncode($0.0, keepSlash: false), uriEncode($0.1, keepSlash: false)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }.joined(separator: "&")
    }

    /// Lowercased names, values trimmed with inner runs of spaces collapsed, sorted by name.
    static func canonicalHeaders(_ headers: [(String, String)]) -> [(String, String)] {
        var merged: [String: [String]] = [:]
        for (n, v) in headers {
            let value = v.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
            merged[n.lowercased(), default: []].append(value)
        }
        return merged.map { ($0.key, $0.value.joined(separator: ",")) }.sorted { $0.0 < $1.0 }
    }

    public static func canonicalRequest(_ r: Request) -> (text: String, signedHeaders: String) {
        let headers = canonicalHeaders(r.headers)
        let signed = headers.map(\.0).joined(separator: ";")
        let text = [
            r.method,
            r.path.isEmpty ? "/" : r.path,
            canonicalQuery(r.query),
            headers.map { "\($0.0):\($0.1)\n" }.joined(),
            signed,
            r.payloadHash,
        ].joined(separator: "\n")
        return (text, signed)
    }

    public static func scope(date: String, region: String, service: String) -> String {
        "\(date.prefix(8))/\(region)/\(service)/aws4_request"
    }

    public static func stringToSign(canonicalRequest: String, amzDate: String, scope: String) -> String {
        "\(algorithm)\n\(amzDate)\n\(scope)\n\(hex(sha256(Array(canonicalRequest.utf8))))"
    }

    public static func signingKey(secret: String, date: String, region: String, service: String) -> [UInt8] {
        let kDate = hmac(key: Array("AWS4\(secret)".utf8), Array(date.prefix(8).utf8))
        let kRegion = hmac(key: kDate, Array(region.utf8))
        let kService = hmac(key: kRegion, Array(service.utf8))
        return hmac(key: kService, Array("aws4_request".utf8))
    }

    /// The `Authorization` header value for `r` (whose headers include `x-amz-date: amzDate`).
    public static func authorization(_ r: Request, credentials: S3Credentials, amzDate: String, region: String, service: String = "s3") -> String {
        let (canonical, signed) = canonicalRequest(r)
        let scope = scope(date: amzDate, region: region, service: service)
        let toSign = stringToSign(canonicalRequest: canonical, amzDate: amzDate, scope: scope)
        let key = signingKey(secret: credentials.secretAccessKey, date: amzDate, region: region, service: service)
        let signature = hex(hmac(key: key, Array(toSign.utf8)))
        return "\(algorithm) Credential=\(credentials.accessKeyID)/\(scope), SignedHeaders=\(signed), Signature=\(signature)"
    }

    // MARK: GnuTLS primitives

    public static func hmac(key: [UInt8], _ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let rc = key.withUnsafeBytes { k in
            data.withUnsafeBytes { d in
                out.withUnsafeMutableBytes { o in
                    gnutls_hmac_fast(GNUTLS_MAC_SHA256, k.baseAddress, k.count, d.baseAddress, d.count, o.baseAddress)
                }
            }
        }
        precondition(rc == 0, "gnutls_hmac_fast(SHA-256) failed: \(rc)")
        return out
    }

    public static func sha256(_ data: [UInt8]) -> [UInt8] {
        data.withUnsafeBytes { sha256($0) }
    }

    public static func sha256(_ data: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        let rc = out.withUnsafeMutableBytes { o in gnutls_hash_fast(GNUTLS_DIG_SHA256, data.baseAddress, data.count, o.baseAddress) }
        precondition(rc == 0, "gnutls_hash_fast(SHA-256) failed: \(rc)")
        return out
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
