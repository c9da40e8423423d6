import NIOCore

/// An ordered list of header fields; names are lowercase (HTTP/2 and HTTP/3 require it).
public struct HTTPHeaders: Sendable, Sequence, ExpressibleByDictionaryLiteral {
    public private(set) var fields: [(name: String, value: String)]

    public init(_ fields: [(name: String, value: String)] = []) {
        self.fields = fields.map { (Self.lower($0.name), $0.value) }
    }

    public init(dictionaryLiteral elements: (String, String)...) {
        self.fields = elements.map { (Self.lower($0.0), $0.1) }
    }

    public mutating func add(_ name: String, _ value: String) {
        fields.append((Self.lower(name), value))
    }

    /// The first value of `name`, if present.
    public subscript(_ name: String) -> String? {
        let n = Self.lower(name)
        return fields.first { $0.name == n }?.value
    }

    /// Lowercase only when needed: HTTP/2 and HTTP/3 names already are (hot path).
    @inline(__always)
    static func lower(_ s: String) -> String {
        s.utf8.contains { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") } ? s.lowercased() : s
    }

    public func makeIterator() -> IndexingIterator<[(name: String, value: String)]> { fields.makeIterator() }
}

/// The head of a request: pseudo-headers plus regular fields.
public struct HTTPRequestHead: Sendable {
    public var method: String
    public var path: String
    public var scheme: String
    public var authority: String
    public var headers: HTTPHeaders
    /// The protocol the request came over: `http1`, `h2` or `h3` (metrics label it).
    public var protocolName: String = "h2"

    public init(method: String, path: String, scheme: String = "https", authority: String = "", headers: HTTPHeaders = HTTPHeaders()) {
        self.method = method
        self.path = path
        self.scheme = scheme
        self.authority = authority
        self.headers = headers
    }

    /// From a received header block (HTTP/2 or HTTP/3): pseudo-headers become the fields above.
    public init(fields: some Sequence<(name: String, value: String)>) {
        self.init(method: "", path: "")
        var rest = HTTPHeaders()
        for (n, v) in fields {
            switch n {
            case ":method": method = v
            case ":path": path = v
            case ":scheme": scheme = v
            case ":authority": authority = v
            default: rest.add(n, v)
            }
        }
        headers = rest
    }

    /// `content-length`, if present and well formed.
    public var contentLength: Int64? { headers["content-length"].flatMap { Int64($0) }.flatMap { $0 >= 0 ? $0 : nil } }
}

/// A body read from disk at the transport's pace (e.g. an open blob).
/// `read` is called on the connection's event loop with positions in `[start, start+length)`.
public protocol FileBodySource: Sendable {
    var start: Int64 { get }
    var length: Int64 { get }
    func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Bytes `[position, position + n)` with `0 < n <= max` as memory that stays valid until
    /// `close()` (e.g. a read-only mapping of the file), or nil: then the transport uses `read`.
    /// Lets a transport hand file pages to the encryption without copying them into a buffer.
    func mappedBytes(at position: Int64, max: Int) -> UnsafeRawBufferPointer?
    /// Called exactly once by the transport when it is done (or the stream died).
    func close()
}

extension FileBodySource {
    public func mappedBytes(at position: Int64, max: Int) -> UnsafeRawBufferPointer? { nil }
}

/// An outgoing body (a response on the server, a request on the client).
public enum HTTPOutboundBody: Sendable {
    case empty
    case bytes(ByteBuffer)
    case file(any FileBodySource)
    /// Produced while sent; trailers (if any) come with `finish(trailers:)`.
    case stream(HTTPOutboundStream)

    /// Release what the body holds when it will never be sent.
    public func discard() {
        switch self {
        case .file(let f): f.close()
        case .stream(let s): s.cancel(HTTPTransportError.connectionClosed)
        case .empty, .bytes: break
        }
    }

    /// The length if known up front.
    public var knownLength: Int64? {
        switch self {
        case .empty: 0
        case .bytes(let b): Int64(b.readableBytes)
        case .file(let f): f.length
        case .stream: nil
        }
    }
}

public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: HTTPOutboundBody
    /// Trailers sent after a `.empty`/`.bytes`/`.file` body (a `.stream` brings its own).
    public var trailers: HTTPHeaders?

    public init(status: Int, headers: HTTPHeaders = HTTPHeaders(), body: HTTPOutboundBody = .empty, trailers: HTTPHeaders? = nil) {
        self.status = status
        self.headers = headers
        self.body = body
        self.trailers = trailers
    }

    /// A plain-text response with a message a human (and a script) can act on.
    public static func text(_ status: Int, _ message: String) -> HTTPResponse {
        var buf = ByteBufferAllocator().buffer(capacity: message.utf8.count + 1)
        buf.writeString(message)
        buf.writeString("\n")
        return HTTPResponse(status: status, headers: ["content-type": "text/plain; charset=utf-8"], body: .bytes(buf))
    }
}

/// A request as a service sees it.
public struct HTTPServerRequest: Sendable {
    public var head: HTTPRequestHead
    public var body: HTTPInboundBody
    public var peer: PeerIdentity
    public var remoteAddress: String?

    public init(head: HTTPRequestHead, body: HTTPInboundBody, peer: PeerIdentity, remoteAddress: String?) {
        self.head = head
        self.body = body
        self.peer = peer
        self.remoteAddress = remoteAddress
    }
}

/// What both transports (HTTP/2, HTTP/3) call for every request: one router, one set of handlers.
public protocol HTTPService: Sendable {
    func handle(_ request: HTTPServerRequest) async -> HTTPResponse
    /// A response that can be given at once, on the connection's event loop, without a task and
    /// without a body (hot GET/HEAD). nil = go through `handle`.
    func immediateResponse(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse?
    /// A refusal known from the head alone of a request with a body (a role that may not write,
    /// a declared length over a limit): HTTP/1.1 answers it instead of `100 Continue` and before
    /// reading the body. nil = read the body and go through `handle`.
    func earlyRefusal(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse?
}

extension HTTPService {
    public func immediateResponse(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse? { nil }
    public func earlyRefusal(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse? { nil }
}

/// Errors surfaced by transports to callers.
public enum HTTPTransportError: Error, Sendable, CustomStringConvertible, Equatable {
    /// The peer sent GOAWAY and will not process this request: retry it on another connection/node.
    case goaway(lastStreamID: Int32, errorCode: UInt32)
    /// The stream was reset (RST_STREAM / RESET_STREAM) with this error code.
    case streamReset(errorCode: UInt32)
    case connectionClosed
    case protocolError(String)
    case tooLarge(limit: Int)
    /// No byte of the request body arrived for this long (a stalled upload).
    case bodyIdleTimeout(Duration)
    /// The request body arrived slower than this many bytes per second (a trickling upload).
    case bodyTooSlow(minimumRate: Int)

    public var description: String {
        switch self {
        case .goaway(let last, let code): "peer is going away (GOAWAY last-stream-id \(last), error \(code)); retry elsewhere"
        case .streamReset(let code): "stream reset by peer (error code \(code))"
        case .connectionClosed: "connection closed"
        case .protocolError(let s): "protocol error: \(s)"
        case .tooLarge(let limit): "body larger than \(limit) bytes"
        case .bodyIdleTimeout(let d): "no request body bytes arrived for \(d); upload abandoned"
        case .bodyTooSlow(let rate): "the request body arrived slower than \(rate) bytes/s (request_body_min_rate); upload abandoned"
        }
    }

    /// Whether a caller may safely retry on another connection or node (the request was not processed).
    public var isRetryable: Bool {
        switch self {
        case .goaway: true
        case .streamReset(let code): code == 7 // REFUSED_STREAM
        default: false
        }
    }
}

/// A response as a client sees it: the body streams in as the caller reads it; trailers (if
/// any) are on `body.trailers` once the body ended.
public struct HTTPClientResponse: Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: HTTPInboundBody
    /// Reset the stream (RST_STREAM / STOP_SENDING CANCEL), e.g. for a losing race leg.
    public var cancel: @Sendable () -> Void

    public init(status: Int, headers: HTTPHeaders, body: HTTPInboundBody, cancel: @escaping @Sendable () -> Void) {
        self.status = status
        self.headers = headers
        self.body = body
        self.cancel = cancel
    }
}

/// Something that sends requests to one peer (an HTTP/2 or HTTP/3 connection).
public protocol HTTPClientTransport: Sendable {
    func request(_ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> HTTPClientResponse
}

extension HTTPClientTransport {
    public func request(_ head: HTTPRequestHead) async throws -> HTTPClientResponse {
        try await request(head, body: .empty)
    }
}
