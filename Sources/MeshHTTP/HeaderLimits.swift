import Metrics

/// One inbound header (or trailer) block, counted as the HPACK/QPACK decoder hands out fields.
///
/// HPACK and QPACK let a few bytes on the wire name a large dynamic-table entry again and again:
/// 128 KB of header block can decode to hundreds of megabytes. The decoders (nghttp2, nghttp3)
/// do not enforce the limit we advertise, so each field is counted here the way RFC 9113 §6.5.2
/// and RFC 9114 §4.2.2 define a header list's size (name + value + 32 per field), and once the
/// block is over the limit its fields are dropped at once: memory stays at `limit`, not at what
/// the block decodes to. The same type serves HTTP/2 and HTTP/3.
public struct InboundHeaderBlock {
    /// Per-field overhead in the header-list size (RFC 9113 §6.5.2).
    public static let fieldOverhead = 32

    public let limit: Int
    public private(set) var fields: [(name: String, value: String)] = []
    /// Decoded size so far (keeps counting after the limit, for the log line).
    public private(set) var bytes = 0

    public init(limit: Int) { self.limit = limit }

    public var isTooLarge: Bool { bytes > limit }

    public mutating func add(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        let (sum, overflow) = bytes.addingReportingOverflow(name.count + value.count + Self.fieldOverhead)
        bytes = overflow ? .max : sum
        guard bytes <= limit else {
            if !fields.isEmpty { fields = [] }
            return
        }
        fields.append((String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)))
    }
}

/// What a connection does about header blocks over the limit: the first few are answered with
/// 431 (the client may have a reason: a huge cookie), after `maxRefusals` the connection is closed
/// (HTTP/2 GOAWAY ENHANCE_YOUR_CALM, HTTP/3 H3_EXCESSIVE_LOAD): nobody legitimate does that.
public struct HeaderLimitPolicy: Sendable {
    public enum Action: Equatable, Sendable {
        case refuseRequest
        case closeConnection
    }

    public let maxRefusals: Int
    public private(set) var refusals = 0

    public init(maxRefusals: Int = 2) { self.maxRefusals = maxRefusals }

    public mutating func tooLarge() -> Action {
        refusals += 1
        return refusals > maxRefusals ? .closeConnection : .refuseRequest
    }
}

/// Counters of what the transports refused, by reason and transport
/// (`cachemesh_http_refused_total{reason,transport}`).
public enum TransportRefusals {
    public static func count(_ reason: String, transport: String) {
        Counter(label: "cachemesh_http_refused_total", dimensions: [("reason", reason), ("transport", transport)]).increment()
    }

    /// The 431 answer, the same on both transports.
    public static func headerListTooLarge(bytes: Int, limit: Int) -> HTTPResponse {
        .text(431, "request header list of \(bytes) bytes is over this node's limit of \(limit) bytes (max_header_list_bytes)\n")
    }
}
