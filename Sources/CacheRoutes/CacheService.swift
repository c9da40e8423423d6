import BlobStore
import Logging
import MeshGRPC
import MeshHTTP
import MeshShell
import MeshTLS
import Metrics
import NIOCore
import Prometheus
import Synchronization

/// A parsed request path. Nothing from the path reaches the file system unless it is a
/// validated 64-hex digest.
enum Route: Equatable {
    case cas(hash: String, instance: String?)
    case ac(hash: String, instance: String?)
    case metrics
    case healthz
    case status
    case badRequest(String)
    case notFound

    static func parse(_ rawPath: String) -> Route {
        // Fast path for the common case `/cas/{64 hex}` (every cache GET).
        if rawPath.utf8.count == 69, rawPath.hasPrefix("/cas/") {
            let key = rawPath.dropFirst(5)
            if Digest.isValidHash(key) { return .cas(hash: String(key), instance: nil) }
        }
        var path = Substring(rawPath)
        if let q = path.firstIndex(of: "?") { path = path[..<q] }
        guard path.first == "/" else { return .badRequest("path must start with /") }
        let segments = path.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
        if segments.contains(where: { $0 == "." || $0 == ".." }) {
            return .badRequest("path must not contain '.' or '..' segments")
        }
        if segments.contains(where: { $0.isEmpty }) && segments != [""] {
            return .badRequest("path must not contain empty segments")
        }
        switch segments.count {
        case 1:
            switch segments[0] {
            case "metrics": return .metrics
            case "healthz": return .healthz
            case "status": return .status
            default: return .notFound
            }
        default:
            // [instance…]/cas|ac/{hash}
            let kind = segments[segments.count - 2]
            let key = segments[segments.count - 1]
            let instanceParts = segments.dropLast(2)
            let isCAS = kind == "cas", isAC = kind == "ac"
            if !isCAS && !isAC {
                if segments.contains("cas") || segments.contains("ac") {
                    return .badRequest("expected /[instance/]cas/{sha256} or /[instance/]ac/{sha256}")
                }
                return .notFound
            }
            guard Digest.isValidHash(key) else {
                return .badRequest("invalid digest \"\(key.prefix(80))\": expected 64 lowercase hex characters (SHA-256)")
            }
            var instance: String?
            if !instanceParts.isEmpty {
                guard instanceParts.allSatisfy({ $0.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) } }) else {
                    return .badRequest("invalid instance name")
                }
                instance = instanceParts.joined(separator: "/")
            }
            return isCAS ? .cas(hash: String(key), instance: instance) : .ac(hash: String(key), instance: instance)
        }
    }
}

/// The node's routes: the Bazel HTTP cache protocol (`/cas`, `/ac`), `/metrics`, `/healthz`,
/// `/status`. One service behind every transport.
public final class CacheService: HTTPService {
    public struct Info: Sendable {
        public var name: String
        public var listen: [String: String]
        public var localRole: String?
        public init(name: String, listen: [String: String]) {
            self.name = name
            self.listen = listen
        }
    }

    /// Largest action-cache entry accepted (ActionResults are small).
    public static let maxActionBytes = MeshService.maxActionBytes

    let store: BlobStore
    let reapi: REAPIService
    let mesh: (any MeshHooks)?
    /// The origin's durable tier (S3) behind the local store, if any.
    let tier: (any DurableTier)?
    let hot = HotBlobs()
    let registry: PrometheusCollectorRegistry?
    let logger: Logger
    private let info: Mutex<Info>
    /// `cachemesh_http_requests_total{protocol}`: requests served, by protocol (http1, h2, h3).
    private let requests: [String: Metrics.Counter]
    private let startTime = ContinuousClock.now
    /// `cachemesh_http_range_requests_total`: blob GETs answered with part of a blob (206).
    private let rangeRequests = Metrics.Counter(label: "cachemesh_http_range_requests_total")

    public init(store: BlobStore, registry: PrometheusCollectorRegistry?, info: Info, mesh: (any MeshHooks)? = nil,
                tier: (any DurableTier)? = nil, logger: Logger) {
        self.store = store
        self.mesh = mesh
        self.tier = tier
        self.reapi = REAPIService(store: store, mesh: mesh, tier: tier, logger: logger)
        self.registry = registry
        self.info = Mutex(info)
        self.logger = logger
        self.requests = Dictionary(uniqueKeysWithValues: ["http1", "h2", "h3"].map {
            ($0, Metrics.Counter(label: "cachemesh_http_requests_total", dimensions: [("protocol", $0)]))
        })
    }

    /// The role the local endpoint gives (nil: no local endpoint), for `/status`.
    public func setLocalRole(_ role: String?) {
        info.withLock { $0.localRole = role }
    }

    private func countRequest(_ head: HTTPRequestHead) {
        (requests[head.protocolName] ?? requests["h2"]!).increment()
    }

    /// Record a bound listener (e.g. after binding port 0) for `/status`.
    public func setListener(_ kind: String, _ address: String) {
        info.withLock { $0.listen[kind] = address }
    }

    public func handle(_ request: HTTPServerRequest) async -> HTTPResponse {
        // The store's read and write slots are shared per connection (`SlotShare`): a connection
        // is its transport and remote address (a unix socket's clients share no address: no share).
        let owner = request.remoteAddress.flatMap { $0.contains(":") ? "\(request.head.protocolName) \($0)" : nil }
        let response = await SlotShare.$owner.withValue(owner) { await route(request) }
        countRequest(request.head)
        if response.status >= 400 {
            logger.debug("request failed", metadata: [
                "method": "\(request.head.method)", "path": "\(request.head.path.prefix(200))",
                "status": "\(response.status)", "peer": "\(request.peer)",
            ])
        }
        return response
    }

    private func route(_ request: HTTPServerRequest) async -> HTTPResponse {
        if GRPCRouter.isGRPC(request.head) { return await reapi.router.handle(request) }
        if request.head.path.hasPrefix("/mesh/") {
            guard request.peer.role == .node else { return forbidden(request.peer, "mesh-internal routes need a node certificate") }
            guard let mesh else { return .text(404, "this node is not part of a mesh") }
            return await mesh.handleMeshRequest(request)
        }
        let method = request.head.method
        switch Route.parse(request.head.path) {
        case .badRequest(let why):
            return .text(400, "bad request: \(why)")
        case .notFound:
            return .text(404, "unknown route \(request.head.path.prefix(200)); try /cas/{sha256}, /ac/{sha256}, /metrics, /healthz, /status")
        case .healthz:
            return method == "GET" || method == "HEAD" ? .text(200, "ok") : methodNotAllowed("GET, HEAD")
        case .metrics:
            guard method == "GET" || method == "HEAD" else { return methodNotAllowed("GET, HEAD") }
            return metrics()
        case .status:
            guard method == "GET" || method == "HEAD" else { return methodNotAllowed("GET, HEAD") }
            return status(peer: request.peer)
        case .cas(let hash, _):
            guard let role = request.peer.role else { return forbidden(request.peer, "no role in client certificate") }
            switch method {
            case "GET": return await getBlob(hash, fromMesh: request.head.headers[BlobFetcher.hopHeader] != nil, range: request.head.headers["range"])
            case "HEAD": return await headBlob(hash)
            case "PUT":
                guard role.canWrite else { return forbidden(request.peer, "role \(role.rawValue) may not write") }
                return await putBlob(hash, request, mirror: !isNodeCopy(request))
            default: return methodNotAllowed("GET, HEAD, PUT")
            }
        case .ac(let key, _):
            guard let role = request.peer.role else { return forbidden(request.peer, "no role in client certificate") }
            switch method {
            case "GET", "HEAD": return await getAction(key, fromMesh: request.head.headers[BlobFetcher.hopHeader] != nil)
            case "PUT":
                guard role.canWrite else { return forbidden(request.peer, "role \(role.rawValue) may not write") }
                return await putAction(key, request, isCopy: isNodeCopy(request))
            case "DELETE":
                // ccache removes entries it finds stale; blobs (/cas) are immutable.
                guard role.canWrite else { return forbidden(request.peer, "role \(role.rawValue) may not delete") }
                do {
                    if let tier { try await tier.deleteAction(key: key) }
                    let deleted = try store.deleteAction(key: key)
                    // The other copies too, else the next lookup here would bring it back.
                    var elsewhere = ActionDeletion()
                    if !isNodeCopy(request), let mesh { elsewhere = await mesh.deletedAction(key: key) }
                    if !elsewhere.unconfirmed.isEmpty {
                        return .text(503, "action \(key) deleted here, but not confirmed deleted at \(elsewhere.unconfirmed.joined(separator: ", ")); try again")
                    }
                    return deleted || !elsewhere.deletedAt.isEmpty ? .text(200, "deleted action \(key)") : .text(404, "not found: action \(key)")
                } catch {
                    return errorResponse(error)
                }
            default: return methodNotAllowed("GET, HEAD, PUT, DELETE")
            }
        }
    }

    /// A copy another node placed here (mirror header): stored or deleted without copying again.
    /// Only a node may send one.
    private func isNodeCopy(_ request: HTTPServerRequest) -> Bool {
        request.head.headers[Mirror.header] != nil && request.peer.role == .node
    }

    private func methodNotAllowed(_ allow: String) -> HTTPResponse {
        var r = HTTPResponse.text(405, "method not allowed; allowed: \(allow)")
        r.headers.add("allow", allow)
        return r
    }

    private func forbidden(_ peer: PeerIdentity, _ why: String) -> HTTPResponse {
        .text(403, "forbidden: \(why) (peer \(peer))")
    }

    static func status(for error: any Error) -> Int {
        switch error {
        case let e as BlobStoreError:
            switch e {
            case .invalidHash, .digestMismatch, .sizeMismatch, .offsetOutOfRange: 400
            case .tooLarge: 413
            case .insufficientStorage, .diskFull: 507
            case .unverifiedLimit, .indexing: 503
            case .notFound: 404
            case .io, .closed: 500
            }
        case let e as HTTPTransportError:
            switch e {
            case .tooLarge: 413
            case .bodyIdleTimeout, .bodyTooSlow: 408
            default: 400
            }
        default: 500
        }
    }

    private func errorResponse(_ error: any Error) -> HTTPResponse {
        .text(Self.status(for: error), "\(error)")
    }

    /// Hot small blobs straight from memory, on the event loop (no task, no file open).
    public func immediateResponse(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse? {
        guard head.method == "GET" || head.method == "HEAD", peer.role != nil,
              case .cas(let hash, _) = Route.parse(head.path), head.headers["range"] == nil, let bytes = hot.get(hash),
              store.size(of: hash) == Int64(bytes.readableBytes) else { return nil }
        countRequest(head)
        if head.method == "GET" { store.recordBytesOut(Int64(bytes.readableBytes)) }
        return HTTPResponse(status: 200, headers: ["content-type": "application/octet-stream", "x-cachemesh-source": "local"],
                            body: .bytes(bytes))
    }

    /// A PUT the node will refuse whatever its body: a role that may not write, a declared length
    /// over what the store (or the action cache) takes. HTTP/1.1 answers it before reading the
    /// body (instead of `100 Continue`).
    public func earlyRefusal(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse? {
        guard let r = refusalFromHead(head, peer: peer) else { return nil }
        countRequest(head)
        return r
    }

    private func refusalFromHead(_ head: HTTPRequestHead, peer: PeerIdentity) -> HTTPResponse? {
        guard head.method == "PUT", !GRPCRouter.isGRPC(head), !head.path.hasPrefix("/mesh/") else { return nil }
        let route = Route.parse(head.path)
        switch route {
        case .cas, .ac:
            guard let role = peer.role else { return forbidden(peer, "no role in client certificate") }
            guard role.canWrite else { return forbidden(peer, "role \(role.rawValue) may not write") }
            guard let n = head.contentLength else { return nil }
            if case .ac = route, n > Self.maxActionBytes {
                return .text(413, "action cache entry too large: \(n) bytes (limit \(Self.maxActionBytes))")
            }
            let max = store.stats.maxBytes
            if n > max { return .text(413, "\(BlobStoreError.tooLarge(size: n, limit: max))") }
            return nil
        default:
            return nil
        }
    }

    /// A miss is fetched from the mesh (worker role) unless the request itself comes from the mesh:
    /// a node asked by another node answers from its own store only (no re-race, no loops).
    /// Set when the node drains (SIGTERM): a blob it does not hold is then answered 503, so a
    /// client (or a racing peer) goes to another node instead of taking a 404 for a blob the mesh
    /// holds.
    private let draining = Mutex(false)

    public func beginDrain() { draining.withLock { $0 = true } }

    enum ByteRange: Equatable {
        /// No usable single range (absent, malformed, or several): the whole blob, 200.
        case whole
        case unsatisfiable
        /// Bytes `from...to` (inclusive), 206.
        case part(from: Int64, to: Int64)
    }

    /// One `Range: bytes=…` (RFC 9110 §14.1.2: `N-`, `N-M`, `-K`) against a blob of `size` bytes.
    /// Anything else (other units, several ranges, malformed) is ignored: the whole blob.
    static func parseRange(_ value: String, size: Int64) -> ByteRange {
        let v = value.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed()
        let text = String(v)
        guard text.hasPrefix("bytes="), !text.contains(",") else { return .whole }
        let spec = text.dropFirst(6)
        guard let dash = spec.firstIndex(of: "-") else { return .whole }
        func isDigit(_ c: Character) -> Bool { c >= "0" && c <= "9" }
        let a = spec[..<dash], b = spec[spec.index(after: dash)...]
        guard a.allSatisfy(isDigit), b.allSatisfy(isDigit), !(a.isEmpty && b.isEmpty) else { return .whole }
        if a.isEmpty {
            guard let k = Int64(b) else { return .whole }
            guard k > 0, size > 0 else { return .unsatisfiable }
            return .part(from: max(0, size - k), to: size - 1)
        }
        guard let from = Int64(a) else { return .whole }
        guard from < size else { return .unsatisfiable }
        var to = size - 1
        if !b.isEmpty {
            guard let m = Int64(b) else { return .whole }
            guard m >= from else { return .whole }
            to = min(m, size - 1)
        }
        return .part(from: from, to: to)
    }

    private func getBlob(_ hash: String, fromMesh: Bool, range: String? = nil) async -> HTTPResponse {
        if draining.withLock({ $0 }), store.size(of: hash) == nil {
            return HTTPResponse(status: 503, headers: ["content-type": "text/plain; charset=utf-8", "retry-after": "0"],
                                body: .bytes(ByteBuffer(string: "this node is draining and does not hold \(hash); ask another node\n")))
        }
        var source = "local"
        if store.size(of: hash) == nil, let tier {
            do {
                switch try await tier.read(hash: hash, streamAbove: Int64(hot.maxBlobSize)) {
                case .local: source = "s3"
                case .absent: break
                case .arriving(let body, let size):
                    // Forwarded while it arrives and verifies (FillingBlob): reset before its last byte if it does not.
                    var headers: HTTPHeaders = ["content-type": "application/octet-stream", "x-cachemesh-source": "s3"]
                    if let size { headers.add("content-length", String(size)) }
                    return HTTPResponse(status: 200, headers: headers, body: .stream(body))
                }
            } catch {
                return Self.tierUnavailable(error, "cannot read \(hash) from it")
            }
        }
        if store.size(of: hash) == nil, !fromMesh, let mesh {
            // Cut-through: the body streams to this caller as it arrives from the winning source
            // (verified before its last bytes go out; see `CutThroughTap`). A range request waits
            // for the stored blob.
            let tap = range == nil ? CutThroughTap() : nil
            let fetch = Task { await mesh.fetchMissing(hash: hash, tap: tap) }
            if let tap, case .streaming(let size, let from) = await tap.started() {
                var headers: HTTPHeaders = ["content-type": "application/octet-stream", "x-cachemesh-source": from]
                if let size { headers.add("content-length", String(size)) }
                return HTTPResponse(status: 200, headers: headers, body: .stream(tap.stream))
            }
            switch await fetch.value {
            case .fetched(let s): source = s
            case .notFound: break
            case .unavailable(let why):
                return HTTPResponse(status: 503, headers: ["content-type": "text/plain; charset=utf-8", "retry-after": "1"],
                                    body: .bytes(ByteBuffer(string: "\(hash) is not here and the mesh cannot tell where it is right now (\(why)); ask again or ask another node\n")))
            }
        }
        do {
            if let range, let size = store.size(of: hash) {
                switch Self.parseRange(range, size: size) {
                case .whole: break
                case .unsatisfiable:
                    return HTTPResponse(status: 416, headers: ["content-type": "text/plain; charset=utf-8", "content-range": "bytes */\(size)"],
                                        body: .bytes(ByteBuffer(string: "range \(range.prefix(100)) is outside the blob's \(size) bytes\n")))
                case .part(let from, let to):
                    let reader = try await store.openRead(hash: hash, offset: from, limit: to - from + 1)
                    rangeRequests.increment()
                    return HTTPResponse(status: 206, headers: ["content-type": "application/octet-stream", "x-cachemesh-source": source,
                                                               "content-range": "bytes \(from)-\(to)/\(size)"], body: .file(reader))
                }
            }
            let reader = try await store.openRead(hash: hash)
            if reader.length <= Int64(hot.maxBlobSize) {
                // Small: read it whole once and keep it in the memory tier.
                defer { reader.close() }
                let bytes = ByteBuffer(bytes: try reader.readAll())
                hot.put(hash, bytes)
                return HTTPResponse(status: 200, headers: ["content-type": "application/octet-stream", "x-cachemesh-source": source], body: .bytes(bytes))
            }
            return HTTPResponse(status: 200, headers: ["content-type": "application/octet-stream", "x-cachemesh-source": source], body: .file(reader))
        } catch {
            return errorResponse(error)
        }
    }

    private func headBlob(_ hash: String) async -> HTTPResponse {
        var size = store.size(of: hash)
        if size == nil, let tier {
            do { size = try await tier.size(of: hash) } catch { return Self.tierUnavailable(error, "cannot tell whether it holds \(hash)") }
        }
        guard let size else { return .text(404, "not found: \(hash)") }
        return HTTPResponse(status: 200, headers: ["content-type": "application/octet-stream", "content-length": String(size)])
    }

    private func putBlob(_ hash: String, _ request: HTTPServerRequest, mirror: Bool) async -> HTTPResponse {
        let expected = request.head.contentLength
        if request.head.headers["content-length"] != nil && expected == nil {
            return .text(400, "bad request: invalid content-length")
        }
        let writer: BlobWriter
        do {
            writer = try await store.beginWrite(hash: hash, expectedSize: expected)
        } catch {
            return errorResponse(error)
        }
        do {
            for try await chunk in request.body {
                try chunk.withUnsafeReadableBytes { try writer.write($0) }
            }
            let digest = try await writer.commit()
            if let tier {
                // The origin's copy counts only once it is durable in S3.
                do { try await tier.persist(digest, checkFirst: false) } catch {
                    return Self.tierUnavailable(error, "\(digest) is stored on this node's disk but not durable in S3, so the write is not acknowledged; try again")
                }
            }
            if !mirror { mesh?.received(digest) }
            if mirror, let mesh {
                do {
                    try await mesh.stored(digest)
                } catch {
                    // Stored here, but fewer than W copies are durable: do not acknowledge.
                    return .text(503, "stored locally, but the write quorum was not reached: \(error)")
                }
            }
            return .text(201, "stored \(digest)")
        } catch let e as HTTPTransportError {
            writer.abort()
            // The client stalled (408) or went away mid-upload (the response goes nowhere):
            // nothing is stored, and the slot and reserved space are released.
            return .text(Self.status(for: e), "upload incomplete: \(e)")
        } catch {
            writer.abort()
            return errorResponse(error)
        }
    }

    /// An action result from the local store, the S3 tier, or (unless another node asks: `fromMesh`)
    /// the nodes that would hold it; one found elsewhere is kept here too.
    private func getAction(_ key: String, fromMesh: Bool) async -> HTTPResponse {
        do {
            var found = try await store.getAction(key: key)
            var source = "local"
            if found == nil, let tier {
                do { found = try await tier.getAction(key: key) } catch { return Self.tierUnavailable(error, "cannot read action \(key)") }
                if let v = found { try await store.putAction(key: key, value: v) }
                source = "s3"
            }
            var note = ""
            if found == nil, !fromMesh, let mesh {
                switch await mesh.fetchAction(key: key) {
                case .found(let v, let from):
                    try await store.putAction(key: key, value: v)
                    (found, source) = (v, "peer:\(from)")
                case .notFound: break
                case .unavailable(let why):
                    // A miss is safe for an action result (the client runs the action), so it stays a 404.
                    note = " (some nodes could not answer: \(why))"
                }
            }
            guard let bytes = found else { return .text(404, "not found: action \(key)\(note)") }
            return HTTPResponse(status: 200, headers: ["content-type": "application/octet-stream", "x-cachemesh-source": source],
                                body: .bytes(ByteBuffer(bytes: bytes)))
        } catch {
            return errorResponse(error)
        }
    }

    /// `isCopy`: another node placed this copy (mirror header): stored, not copied again.
    private func putAction(_ key: String, _ request: HTTPServerRequest, isCopy: Bool) async -> HTTPResponse {
        if let n = request.head.contentLength, n > Self.maxActionBytes {
            return .text(413, "action cache entry too large: \(n) bytes (limit \(Self.maxActionBytes))")
        }
        do {
            let body = try await request.body.collect(upTo: Self.maxActionBytes)
            let value = Array(body.readableBytesView)
            try await store.putAction(key: key, value: value)
            if let tier {
                do { try await tier.putAction(key: key, value: value) } catch {
                    return Self.tierUnavailable(error, "action \(key) is not durable in S3, so the write is not acknowledged; try again")
                }
            }
            if !isCopy, let mesh {
                do { try await mesh.storedAction(key: key, value: value) } catch {
                    return .text(503, "action \(key) stored locally, but the write quorum was not reached: \(error)")
                }
            }
            return .text(201, "stored action \(key)")
        } catch {
            return errorResponse(error)
        }
    }

    /// 503 (502 for an object that does not hash to its key) when the S3 tier cannot answer.
    static func tierUnavailable(_ error: any Error, _ what: String) -> HTTPResponse {
        let status = error is S3CorruptObject ? 502 : 503
        return HTTPResponse(status: status, headers: ["content-type": "text/plain; charset=utf-8", "retry-after": "1"],
                            body: .bytes(ByteBuffer(string: "the origin's S3 tier is unavailable: \(what): \(error)\n")))
    }

    private func metrics() -> HTTPResponse {
        guard let registry else { return .text(503, "metrics are not enabled in this process") }
        let bytes = registry.emitToBuffer()
        return HTTPResponse(status: 200, headers: ["content-type": "text/plain; version=0.0.4; charset=utf-8"], body: .bytes(ByteBuffer(bytes: bytes)))
    }

    /// `/status` for `peer`. Any caller may read it (the client's `cachemesh status`, load
    /// balancers); the member list only a caller with a verified certificate (node, client,
    /// reader). Nothing secret is in it: no key, no file path, no locality map contents.
    public func nodeStatus(peer: PeerIdentity) -> NodeStatus {
        let s = store.stats
        let index = store.indexProgress
        let info = self.info.withLock { $0 }
        let mesh = self.mesh?.status(members: peer.authenticated && peer.role != nil)
        return NodeStatus(
            name: info.name, role: mesh?.role ?? "standalone",
            listen: .init(tcp: info.listen["tcp"], quic: info.listen["quic"], local: info.listen["local"],
                          localSocket: info.listen["local_socket"], localRole: info.localRole),
            uptimeSeconds: (ContinuousClock.now - startTime).components.seconds,
            draining: draining.withLock { $0 },
            you: .init(commonName: peer.commonName, role: peer.role?.rawValue, authenticated: peer.authenticated),
            store: .init(usedBytes: s.usedBytes, reservedBytes: s.reservedBytes, maxBytes: s.maxBytes,
                         blobs: s.blobCount, actions: s.actionCount, hits: s.hits, misses: s.misses,
                         hitRatio: MeshStatus.ratio(s.hits, of: s.hits + s.misses), evictions: s.evictions,
                         bytesIn: s.bytesIn, bytesOut: s.bytesOut, rejectedWrites: s.rejectedWrites,
                         index: .init(complete: index.complete, scannedDirectories: index.scannedDirectories,
                                      totalDirectories: index.totalDirectories, scannedEntries: index.scannedEntries)),
            mesh: mesh?.mesh)
    }

    private func status(peer: PeerIdentity) -> HTTPResponse {
        do {
            var data = try NodeStatus.encoder().encode(nodeStatus(peer: peer))
            data.append(UInt8(ascii: "\n"))
            return HTTPResponse(status: 200, headers: ["content-type": "application/json"], body: .bytes(ByteBuffer(bytes: data)))
        } catch {
            return .text(500, "cannot encode the status: \(error)")
        }
    }
}
