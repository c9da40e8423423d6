/// The head of a response as it goes on the wire, built the same way for HTTP/1.1, HTTP/2 and
/// HTTP/3 from what the service returned: hop-by-hop fields dropped (they describe a connection,
/// not the response, and HTTP/2 and HTTP/3 forbid them), and the length declared as the
/// protocol's framing needs it.
public struct ResponseHead {
    public enum Framing: Sendable {
        /// HTTP/2 and HTTP/3: `:status` first; the service's `content-length` if it gave one,
        /// else the body's known length.
        case frames
        /// HTTP/1.1, where the declared length frames the body on the connection: the body's
        /// known length (the service's `content-length` only answers a HEAD); none known means
        /// chunked (or, for HTTP/1.0, the end of the connection).
        case http1(isHead: Bool)
    }

    public let status: Int
    /// The fields to send (with `.frames`, `:status` comes first).
    public private(set) var fields: [(name: String, value: String)]
    /// `.http1`: no length is known; the transport chunks the body (or closes after it).
    public private(set) var lengthUnknown = false

    public init(_ response: HTTPResponse, framing: Framing) {
        status = response.status
        fields = []
        fields.reserveCapacity(response.headers.fields.count + 2)
        switch framing {
        case .frames:
            fields.append((":status", String(status)))
            for (n, v) in response.headers where !Self.isHopByHop(n) { fields.append((n, v)) }
            if response.headers["content-length"] == nil, let n = response.body.knownLength, !Self.forbidsBody(status: status) {
                fields.append(("content-length", String(n)))
            }
        case .http1(let isHead):
            for (n, v) in response.headers where n != "content-length" && !Self.isHopByHop(n) { fields.append((n, v)) }
            if isHead, let given = response.headers["content-length"] {
                fields.append(("content-length", given))
            } else if let n = response.body.knownLength {
                if !Self.forbidsBody(status: status) { fields.append(("content-length", String(n))) }
            } else {
                lengthUnknown = true
            }
        }
    }

    /// Fields about the connection, not the message (RFC 9110 §7.6.1; RFC 9113 §8.2.2).
    public static func isHopByHop(_ name: String) -> Bool {
        switch name {
        case "connection", "transfer-encoding", "keep-alive", "upgrade", "proxy-connection", "host": true
        default: false
        }
    }

    /// 1xx, 204 and 304 responses have no body (and no length).
    public static func forbidsBody(status: Int) -> Bool {
        (100..<200).contains(status) || status == 204 || status == 304
    }
}

/// Header fields as a C library's name/value array (`nghttp2_nv`, `nghttp3_nv`) for one call
/// (the library copies what it keeps): names and values share one temporary arena, and `make`
/// builds each element from a name and a value in it (per-field copies were 5% of the CPU of
/// small requests).
@inlinable
public func withHeaderFields<NV, R>(_ fields: [(name: String, value: String)],
                                    _ make: (UnsafeMutablePointer<UInt8>, Int, UnsafeMutablePointer<UInt8>, Int) -> NV,
                                    _ body: (UnsafePointer<NV>, Int) -> R) -> R {
    var total = 0
    for (n, v) in fields { total += n.utf8.count + v.utf8.count }
    return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: max(1, total)) { arena in
        withUnsafeTemporaryAllocation(of: NV.self, capacity: max(1, fields.count)) { nva in
            var at = 0
            func place(_ s: String) -> (UnsafeMutablePointer<UInt8>, Int) {
                let start = at
                for byte in s.utf8 {
                    arena[at] = byte
                    at += 1
                }
                return (arena.baseAddress! + start, at - start)
            }
            for (i, (n, v)) in fields.enumerated() {
                let (np, nl) = place(n)
                let (vp, vl) = place(v)
                nva.initializeElement(at: i, to: make(np, nl, vp, vl))
            }
            return body(UnsafePointer(nva.baseAddress!), fields.count)
        }
    }
}
