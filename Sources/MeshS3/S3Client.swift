import Foundation
import Logging
import MeshTLS
import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Where an S3 endpoint is: `http://host[:port]`, or `https://host[:port]` (TLS).
public struct S3Endpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var tls: Bool

    public init(host: String, port: Int, tls: Bool = false) {
        self.host = host
        self.port = port
        self.tls = tls
    }

    /// `http://host[:port]` or `https://host[:port]`; throws (with why) for anything else.
    public static func parse(_ s: String) throws -> S3Endpoint {
        guard let u = URLComponents(string: s), let scheme = u.scheme?.lowercased(), let host = u.host, !host.isEmpty else {
            throw S3ConfigError("endpoint '\(s)' is not a URL like http://127.0.0.1:7480 or https://s3.example.com")
        }
        guard scheme == "http" || scheme == "https" else {
            throw S3ConfigError("endpoint '\(s)': the scheme must be http:// or https://")
        }
        if !u.path.isEmpty && u.path != "/" { throw S3ConfigError("endpoint '\(s)' must not have a path (the bucket is set on its own)") }
        let tls = scheme == "https"
        return S3Endpoint(host: host, port: u.port ?? (tls ? 443 : 80), tls: tls)
    }

    var defaultPort: Int { tls ? 443 : 80 }

    public var description: String { "\(tls ? "https" : "http")://\(host.contains(":") ? "[\(host)]" : host):\(port)" }
}

public struct S3ConfigError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// An S3 request that failed for good (after its retries).
public struct S3Error: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The endpoint answered with this status (and S3 error code, message).
        case http(status: Int, code: String?, message: String?)
        /// No progress within the deadline.
        case timeout
        /// Could not connect, or the connection broke.
        case connection(String)
        /// The answer made no sense (a multipart upload without an id, a short body).
        case invalidResponse(String)
        /// The TLS handshake failed (e.g. the server's certificate is not trusted): not retried.
        case tls(String)
    }

    public var kind: Kind
    public var operation: String
    public var key: String
    public var attempts = 1

    public var status: Int? { if case .http(let s, _, _) = kind { s } else { nil } }

    /// Worth another attempt: timeouts, broken connections, 5xx, 429.
    public var isRetryable: Bool {
        switch kind {
        case .timeout, .connection: true
        case .http(let s, _, _): s >= 500 || s == 429
        case .invalidResponse, .tls: false
        }
    }

    public var description: String {
        let what: String
        switch kind {
        case .http(let s, let code, let message):
            what = "HTTP \(s)" + (code.map { " \($0)" } ?? "") + (message.map { ": \($0)" } ?? "")
        case .timeout: what = "no answer within the deadline"
        case .connection(let why): what = "connection failed: \(why)"
        case .invalidResponse(let why): what = "invalid response: \(why)"
        case .tls(let why): what = "TLS failed: \(why)"
        }
        return "S3 \(operation) \(key): \(what)" + (attempts > 1 ? " (after \(attempts) attempts)" : "")
    }
}

/// Bytes an upload reads (and reads again on a retry): a file.
public protocol S3UploadSource: Sendable {
    func read(at offset: Int64, count: Int) throws -> ByteBuffer
}

/// A small S3 client: SigV4-signed HTTP/1.1 (path-style or virtual-host addressing) over
/// keep-alive connections; PUT (single or multipart, streamed from a re-readable source), GET
/// (streamed, resumed with a Range after a broken connection), HEAD, DELETE. Retries with
/// exponential backoff and full jitter on 5xx, 429, timeouts and broken connections; every
/// attempt has an idle deadline (no byte in either direction for `idleTimeout` closes it) and every
/// operation an overall deadline for starting attempts. Metrics by operation:
/// `cachemesh_s3_requests_total{op,result}`, `cachemesh_s3_bytes_total{op,direction}`,
/// `cachemesh_s3_request_duration_seconds{op}`, `cachemesh_s3_retries_total{op}`,
/// `cachemesh_s3_errors_total{op,kind}`.
public final class S3Client: Sendable {
    public struct Settings: Sendable {
        public var endpoint: S3Endpoint
        public var bucket: String
        public var region = "us-east-1"
        public var pathStyle = true
        public var credentials: S3Credentials
        public var maxConnections = 32
        public var connectTimeout: Duration = .seconds(3)
        /// An attempt with no byte sent or received for this long is abandoned (and retried).
        public var idleTimeout: Duration = .seconds(10)
        /// Attempts per operation (the first included).
        public var maxAttempts = 4
        /// No new attempt starts after this long from the operation's start.
        public var operationDeadline: Duration = .seconds(30)
        public var backoffBase: Duration = .milliseconds(50)
        public var backoffMax: Duration = .seconds(2)
        /// Blobs larger than this go up in parts of `partSize`.
        public var multipartThreshold: Int64 = 64 << 20
        public var partSize: Int64 = 16 << 20
        /// Parts in flight at once in one multipart upload.
        public var partConcurrency = 4
        /// For an `https://` endpoint: trust servers chaining to the CAs in this PEM file;
        /// nil: the system's trust store.
        public var caFile: String?

        public init(endpoint: S3Endpoint, bucket: String, credentials: S3Credentials) {
            self.endpoint = endpoint
            self.bucket = bucket
            self.credentials = credentials
        }
    }

    public let settings: Settings
    let pool: S3ConnectionPool
    let logger: Logger
    let metrics = S3Metrics()

    /// Throws when `https://` is asked for and the CA file (or the system trust store) cannot be loaded.
    public init(settings: Settings, logger: Logger, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws {
        self.settings = settings
        self.logger = logger
        var tls: S3ConnectionPool.TLS?
        if settings.endpoint.tls {
            let credentials: TLSCredentials
            do { credentials = try TLSCredentials(clientTrusting: settings.caFile) } catch {
                throw S3ConfigError("TLS to \(settings.endpoint): \(error)")
            }
            tls = .init(credentials: credentials, serverName: settings.endpoint.host, logger: logger)
        }
        self.pool = S3ConnectionPool(host: settings.endpoint.host, port: settings.endpoint.port, max: settings.maxConnections,
                                     connectTimeout: settings.connectTimeout, tls: tls, group: group)
    }

    public func shutdown() { pool.closeAll() }

    // MARK: Operations

    /// HEAD of an object: its size, or nil when it does not exist.
    public func head(_ key: String) async throws -> Int64? {
        let r = try await retrying("HEAD", key) { _ in try await self.send(op: "HEAD", method: .HEAD, key: key) }
        if r.status == 404 { return nil }
        try r.check("HEAD", key, ok: [200])
        guard let n = r.headers.first(name: "content-length").flatMap(Int64.init) else {
            throw S3Error(kind: .invalidResponse("no content-length"), operation: "HEAD", key: key)
        }
        return n
    }

    /// HEAD of the bucket: throws a readable error when the credentials are refused or the bucket
    /// does not exist.
    public func checkBucket() async throws {
        let r = try await retrying("HEAD", "bucket") { _ in try await self.send(op: "HEAD_BUCKET", method: .HEAD, key: nil) }
        try r.check("HEAD", "bucket \(settings.bucket)", ok: [200])
    }

    /// Creates the bucket (tests, benchmarks); an existing bucket of ours is fine.
    public func createBucket() async throws {
        let r = try await retrying("PUT", "bucket") { _ in try await self.send(op: "CREATE_BUCKET", method: .PUT, key: nil, body: .bytes(ByteBuffer())) }
        if r.status == 409, r.code == "BucketAlreadyOwnedByYou" { return }
        try r.check("PUT", "bucket \(settings.bucket)", ok: [200])
    }

    /// GET an object from `offset`, streaming its bytes to `body` in order; a broken transfer is
    /// resumed where it stopped (`Range`), so `body` sees every byte once. Returns false (and
    /// calls `body` never) when the object does not exist. `size`, if given, is told the object's
    /// whole size (when the endpoint says it) once, before the first byte reaches `body`.
    public func get(_ key: String, from offset: Int64 = 0, size: (@Sendable (Int64?) -> Void)? = nil,
                    body: @escaping @Sendable (ByteBuffer) async throws -> Void) async throws -> Bool {
        let delivered = Mutex<Int64>(0)
        let told = Mutex(false)
        var onHead: (@Sendable (Int, NIOHTTP1.HTTPHeaders) -> Void)?
        if let size {
            onHead = { (status: Int, headers: NIOHTTP1.HTTPHeaders) in
                let first = told.withLock { t -> Bool in
                    defer { t = true }
                    return !t
                }
                guard first else { return }
                if status == 206 {
                    // content-range: bytes a-b/total
                    let total = headers.first(name: "content-range").flatMap { $0.split(separator: "/").last }.flatMap { Int64($0) }
                    size(total)
                } else {
                    size(headers.first(name: "content-length").flatMap { Int64($0) })
                }
            }
        }
        let headCallback = onHead
        let r = try await retrying("GET", key) { _ in
            let start = offset + delivered.withLock { $0 }
            var headers: [(String, String)] = []
            if start > 0 { headers.append(("range", "bytes=\(start)-")) }
            return try await self.send(op: "GET", method: .GET, key: key, extraHeaders: headers, onHead: headCallback, onBody: { buf in
                try await body(buf)
                delivered.withLock { $0 += Int64(buf.readableBytes) }
            })
        }
        if r.status == 404 { return false }
        // 416: a resume that starts at the end (every byte arrived, the end of the response did not).
        if r.status == 416 && delivered.withLock({ $0 }) > 0 { return true }
        try r.check("GET", key, ok: [200, 206])
        return true
    }

    /// PUT an object of `size` bytes read from `source`: one request up to `multipartThreshold`,
    /// a multipart upload above it. `sha256` (hex), when known, is sent as the payload hash, so
    /// the endpoint checks the bytes it stores.
    public func put(_ key: String, size: Int64, sha256: String?, source: any S3UploadSource) async throws {
        if size > settings.multipartThreshold {
            try await multipartPut(key, size: size, source: source)
            return
        }
        let r = try await retrying("PUT", key) { _ in
            try await self.send(op: "PUT", method: .PUT, key: key, body: .source(source, 0, size), payloadHash: sha256 ?? SigV4.unsignedPayload)
        }
        try r.check("PUT", key, ok: [200])
    }

    public func put(_ key: String, bytes: [UInt8]) async throws {
        let hash = SigV4.hex(SigV4.sha256(bytes))
        let r = try await retrying("PUT", key) { _ in
            try await self.send(op: "PUT", method: .PUT, key: key, body: .bytes(ByteBuffer(bytes: bytes)), payloadHash: hash)
        }
        try r.check("PUT", key, ok: [200])
    }

    /// GET of a small object whole (at most `limit` bytes); nil when it does not exist.
    public func getSmall(_ key: String, limit: Int) async throws -> [UInt8]? {
        let out = Mutex<[UInt8]>([])
        let found = try await get(key) { buf in
            try out.withLock { o in
                guard o.count + buf.readableBytes <= limit else {
                    throw S3Error(kind: .invalidResponse("larger than \(limit) bytes"), operation: "GET", key: key)
                }
                o.append(contentsOf: buf.readableBytesView)
            }
        }
        return found ? out.withLock { $0 } : nil
    }

    public func delete(_ key: String) async throws {
        let r = try await retrying("DELETE", key) { _ in try await self.send(op: "DELETE", method: .DELETE, key: key) }
        try r.check("DELETE", key, ok: [200, 204, 404])
    }

    // MARK: Multipart

    private func multipartPut(_ key: String, size: Int64, source: any S3UploadSource) async throws {
        let start = try await retrying("PUT", key) { _ in
            try await self.send(op: "MULTIPART_START", method: .POST, key: key, query: [("uploads", "")], body: .bytes(ByteBuffer()), collectBody: true)
        }
        try start.check("POST ?uploads", key, ok: [200])
        guard let uploadID = XMLText.first("UploadId", in: start.bodyText) else {
            throw S3Error(kind: .invalidResponse("no UploadId in \(start.bodyText.prefix(200))"), operation: "POST ?uploads", key: key)
        }
        let parts = Int((size + settings.partSize - 1) / settings.partSize)
        do {
            var etags = [String](repeating: "", count: parts)
            try await withThrowingTaskGroup(of: (Int, String).self) { group in
                var next = 0
                func launch() {
                    let i = next
                    next += 1
                    let offset = Int64(i) * settings.partSize
                    let length = min(settings.partSize, size - offset)
                    group.addTask {
                        let r = try await self.retrying("PUT part", key) { _ in
                            try await self.send(op: "MULTIPART_PART", method: .PUT, key: key,
                                                query: [("partNumber", "\(i + 1)"), ("uploadId", uploadID)],
                                                body: .source(source, offset, length), payloadHash: SigV4.unsignedPayload)
                        }
                        try r.check("PUT part \(i + 1)", key, ok: [200])
                        guard let etag = r.headers.first(name: "etag") else {
                            throw S3Error(kind: .invalidResponse("part \(i + 1) has no ETag"), operation: "PUT part", key: key)
                        }
                        return (i, etag)
                    }
                }
                for _ in 0..<min(parts, max(1, settings.partConcurrency)) { launch() }
                while let (i, etag) = try await group.next() {
                    etags[i] = etag
                    if next < parts { launch() }
                }
            }
            var xml = "<CompleteMultipartUpload>"
            for (i, e) in etags.enumerated() { xml += "<Part><PartNumber>\(i + 1)</PartNumber><ETag>\(e)</ETag></Part>" }
            xml += "</CompleteMultipartUpload>"
            let completion = xml
            let done = try await retrying("POST complete", key) { _ in
                try await self.send(op: "MULTIPART_COMPLETE", method: .POST, key: key, query: [("uploadId", uploadID)],
                                    body: .bytes(ByteBuffer(string: completion)), payloadHash: SigV4.hex(SigV4.sha256(Array(completion.utf8))), collectBody: true)
            }
            try done.check("POST ?uploadId (complete)", key, ok: [200])
            // A 200 may still carry an error (S3 answers before it knows).
            if let code = XMLText.first("Code", in: done.bodyText), done.bodyText.contains("<Error>") {
                throw S3Error(kind: .http(status: 200, code: code, message: XMLText.first("Message", in: done.bodyText)), operation: "POST complete", key: key)
            }
        } catch {
            _ = try? await send(op: "MULTIPART_ABORT", method: .DELETE, key: key, query: [("uploadId", uploadID)])
            throw error
        }
    }

    // MARK: Retries

    func retrying(_ operation: String, _ key: String, _ attempt: @Sendable (Int) async throws -> S3Response) async throws -> S3Response {
        let deadline = ContinuousClock.now + settings.operationDeadline
        var n = 0
        while true {
            n += 1
            var failure: S3Error
            do {
                let r = try await attempt(n)
                guard r.status >= 500 || r.status == 429 else { return r }
                failure = S3Error(kind: .http(status: r.status, code: r.code, message: r.message), operation: operation, key: key)
                if n >= settings.maxAttempts || ContinuousClock.now >= deadline { return r }
            } catch let e as S3Error {
                failure = e
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                failure = S3Error(kind: .connection(S3Client.describe(error)), operation: operation, key: key)
            }
            failure.attempts = n
            guard failure.isRetryable, n < settings.maxAttempts, ContinuousClock.now < deadline, !Task.isCancelled else {
                throw failure
            }
            metrics.retry(operation)
            // Full jitter: uniform in [0, min(max, base·2^(n−1))].
            let cap = min(settings.backoffMax, settings.backoffBase * (1 << min(n - 1, 20)))
            let ns = Int64(Double(cap.components.seconds) * 1e9 + Double(cap.components.attoseconds) / 1e9)
            let wait = Duration.nanoseconds(Int64.random(in: 0...max(0, ns)))
            logger.info("S3 attempt failed, retrying", metadata: ["error": "\(failure)", "attempt": "\(n)", "backoff": "\(wait)"])
            try await Task.sleep(for: wait)
        }
    }

    static func describe(_ error: any Error) -> String {
        if let e = error as? IOError { return "\(e)" }
        if let e = error as? ChannelError {
            switch e {
            case .connectTimeout: return "connect timed out"
            case .ioOnClosedChannel, .alreadyClosed, .outputClosed, .inputClosed, .eof: return "the connection closed"
            default: return "\(e)"
            }
        }
        return "\(error)"
    }

    // MARK: One exchange

    enum Body: Sendable {
        case bytes(ByteBuffer)
        case source(any S3UploadSource, Int64, Int64)
    }

    /// The bucket-and-key path as sent (and signed).
    func path(for key: String?) -> String {
        let k = key.map { SigV4.uriEncode($0, keepSlash: true) }
        if settings.pathStyle { return "/\(SigV4.uriEncode(settings.bucket, keepSlash: false))" + (k.map { "/\($0)" } ?? "") }
        return "/" + (k ?? "")
    }

    var hostHeader: String {
        let h = settings.endpoint.host.contains(":") ? "[\(settings.endpoint.host)]" : settings.endpoint.host
        let base = settings.endpoint.port == settings.endpoint.defaultPort ? h : "\(h):\(settings.endpoint.port)"
        return settings.pathStyle ? base : "\(settings.bucket).\(base)"
    }

    /// One attempt: signs and sends the request on a pooled connection, streams a 2xx body to
    /// `onBody`, and keeps up to 64 KiB of any other body (the S3 error document).
    func send(op: String, method: HTTPMethod, key: String?, query: [(String, String)] = [], extraHeaders: [(String, String)] = [],
              body: Body? = nil, payloadHash: String = SigV4.emptyPayloadHash, collectBody: Bool = false,
              onHead: (@Sendable (Int, NIOHTTP1.HTTPHeaders) -> Void)? = nil,
              onBody: (@Sendable (ByteBuffer) async throws -> Void)? = nil) async throws -> S3Response {
        let path = path(for: key)
        let amzDate = SigV4.amzDate(Date())
        var headers: [(String, String)] = [("host", hostHeader), ("x-amz-date", amzDate), ("x-amz-content-sha256", payloadHash)]
        headers += extraHeaders
        let auth = SigV4.authorization(SigV4.Request(method: method.rawValue, path: path, query: query, headers: headers, payloadHash: payloadHash),
                                       credentials: settings.credentials, amzDate: amzDate, region: settings.region)
        var uri = path
        if !query.isEmpty {
            uri += "?" + query.map { $0.1.isEmpty && $0.0 == "uploads" ? $0.0 : "\(SigV4.uriEncode($0.0, keepSlash: false))=\(SigV4.uriEncode($0.1, keepSlash: false))" }.joined(separator: "&")
        }
        var requestHead = HTTPRequestHead(version: .http1_1, method: method, uri: uri)
        for (n, v) in headers { requestHead.headers.add(name: n, value: v) }
        requestHead.headers.add(name: "authorization", value: auth)
        let length: Int64
        switch body {
        case .none: length = 0
        case .bytes(let b): length = Int64(b.readableBytes)
        case .source(_, _, let n): length = n
        }
        if length > 0 || method == .PUT || method == .POST { requestHead.headers.add(name: "content-length", value: "\(length)") }

        let head = requestHead
        let started = ContinuousClock.now
        let progress = S3Progress()
        let result = Mutex(S3Response(status: 0, headers: HTTPHeaders()))
        let idle = settings.idleTimeout
        let op = op
        let metrics = metrics
        do {
            try await pool.withConnection { conn in
                let watchdog = Task {
                    while !Task.isCancelled {
                        try await Task.sleep(for: .milliseconds(100))
                        if progress.idleFor() > idle {
                            progress.timedOut()
                            conn.close()
                            return
                        }
                    }
                }
                defer { watchdog.cancel() }
                try await conn.submit { it, out in
                    try await out.write(.head(head))
                    switch body {
                    case .none: break
                    case .bytes(let b):
                        try await out.write(.body(.byteBuffer(b)))
                        progress.touch()
                    case .source(let src, let offset, let n):
                        var pos: Int64 = 0
                        while pos < n {
                            let chunk = try src.read(at: offset + pos, count: Int(min(256 << 10, n - pos)))
                            guard chunk.readableBytes > 0 else { throw S3Error(kind: .invalidResponse("upload source ended early"), operation: op, key: key ?? "") }
                            pos += Int64(chunk.readableBytes)
                            try await out.write(.body(.byteBuffer(chunk)))
                            progress.touch()
                        }
                    }
                    try await out.write(.end(nil))
                    metrics.bytes(op, out: length)
                    var status = 0
                    var keepAlive = true
                    while let part = try await it.next() {
                        progress.touch()
                        switch part {
                        case .head(let h):
                            if h.status == .continue { continue }
                            status = Int(h.status.code)
                            keepAlive = h.isKeepAlive
                            result.withLock { $0.status = status; $0.headers = h.headers }
                            if (200..<300).contains(status), let onHead { onHead(status, h.headers) }
                        case .body(let b):
                            metrics.bytes(op, in: Int64(b.readableBytes))
                            if (200..<300).contains(status), !collectBody, let onBody {
                                try await onBody(b)
                            } else {
                                result.withLock { r in
                                    if r.body.count < 64 << 10 { r.body.append(contentsOf: b.readableBytesView.prefix(64 << 10 - r.body.count)) }
                                }
                            }
                        case .end:
                            return keepAlive
                        }
                    }
                    throw S3ConnectionClosed()
                }
            }
        } catch {
            if error is PeerCertificateRejected || error is TLSError || error is TLSAlertReceived {
                metrics.finished(op, result: "error", kind: "tls", since: started)
                throw S3Error(kind: .tls("\(error)"), operation: op, key: key ?? "")
            }
            let kind: S3Error.Kind = progress.didTimeOut ? .timeout : .connection(Self.describe(error))
            if error is S3Error, !progress.didTimeOut { metrics.finished(op, result: "error", kind: "invalid", since: started); throw error }
            metrics.finished(op, result: "error", kind: progress.didTimeOut ? "timeout" : "connection", since: started)
            throw S3Error(kind: kind, operation: op, key: key ?? "")
        }
        let r = result.withLock { $0 }
        metrics.finished(op, result: "\(r.status / 100)xx", kind: nil, since: started)
        return r
    }
}

/// A response: status, headers, and (for errors or `collectBody`) its body.
struct S3Response: Sendable {
    var status: Int
    var headers: HTTPHeaders
    var body: [UInt8] = []

    var bodyText: String { String(decoding: body, as: UTF8.self) }
    var code: String? { XMLText.first("Code", in: bodyText) }
    var message: String? { XMLText.first("Message", in: bodyText) }

    func check(_ operation: String, _ key: String, ok: Set<Int>) throws {
        guard !ok.contains(status) else { return }
        throw S3Error(kind: .http(status: status, code: code ?? Self.statusCode(status), message: message), operation: operation, key: key)
    }

    /// What a body-less error (HEAD) means.
    static func statusCode(_ s: Int) -> String? {
        switch s {
        case 403: "Forbidden (wrong access key or secret, or no permission)"
        case 404: "NotFound"
        default: nil
        }
    }
}

enum XMLText {
    /// The text of the first `<tag>…</tag>`.
    static func first(_ tag: String, in xml: String) -> String? {
        guard let a = xml.range(of: "<\(tag)>"), let b = xml.range(of: "</\(tag)>", range: a.upperBound..<xml.endIndex) else { return nil }
        return String(xml[a.upperBound..<b.lowerBound])
    }
}

/// When an attempt last moved a byte; whether its watchdog closed it.
final class S3Progress: Sendable {
    private let state = Mutex<(last: ContinuousClock.Instant, timedOut: Bool)>((ContinuousClock.now, false))
    func touch() { state.withLock { $0.last = ContinuousClock.now } }
    func idleFor() -> Duration { ContinuousClock.now - state.withLock { $0.last } }
    func timedOut() { state.withLock { $0.timedOut = true } }
    var didTimeOut: Bool { state.withLock { $0.timedOut } }
}

/// The client's metrics by operation.
final class S3Metrics: Sendable {
    private let timers: Mutex<[String: Metrics.Timer]> = Mutex([:])

    func finished(_ op: String, result: String, kind: String?, since: ContinuousClock.Instant) {
        Counter(label: "cachemesh_s3_requests_total", dimensions: [("op", op), ("result", result)]).increment()
        if let kind { Counter(label: "cachemesh_s3_errors_total", dimensions: [("op", op), ("kind", kind)]).increment() }
        let d = ContinuousClock.now - since
        let timer = timers.withLock { t in
            if let x = t[op] { return x }
            let x = Metrics.Timer(label: "cachemesh_s3_request_duration_seconds", dimensions: [("op", op)])
            t[op] = x
            return x
        }
        timer.recordNanoseconds(d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000)
    }

    func bytes(_ op: String, out: Int64) {
        guard out > 0 else { return }
        byteCounter(op, "out").increment(by: out)
    }

    func bytes(_ op: String, in n: Int64) {
        byteCounter(op, "in").increment(by: n)
    }

    /// Made once per operation and direction (a body arrives in many parts).
    private let byteCounters: Mutex<[String: Counter]> = Mutex([:])
    private func byteCounter(_ op: String, _ direction: String) -> Counter {
        byteCounters.withLock { c in
            let key = op + " " + direction
            if let x = c[key] { return x }
            let x = Counter(label: "cachemesh_s3_bytes_total", dimensions: [("op", op), ("direction", direction)])
            c[key] = x
            return x
        }
    }

    func retry(_ op: String) {
        Counter(label: "cachemesh_s3_retries_total", dimensions: [("op", op)]).increment()
    }
}
