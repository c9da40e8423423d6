import BlobStore
import Logging
import MeshHTTP
import MeshHTTP2
import MeshTLS
import NIOCore

/// A client of several nodes: requests go to the first node that takes them. A node that is
/// draining (GOAWAY), gone (connection refused/closed) or cannot serve (5xx) is skipped for the
/// next one, so a restart or drain of one node fails no request.
public final class MeshClient: Sendable {
    let nodes: [HostPort]
    let pool: HTTP2ConnectionPool
    let logger: Logger

    public init(nodes: [HostPort], options: ClientOptions, logger: Logger = Logger(label: "cachemesh.meshclient")) throws {
        guard let ca = options.ca else { throw CacheClientError.usage("TLS needs --ca") }
        self.nodes = nodes
        self.pool = HTTP2ConnectionPool(
            credentials: try TLSCredentials(files: TLSFiles(certificateChain: options.certificate, privateKey: options.privateKey, trustedCA: ca)),
            logger: logger)
        self.logger = logger
    }

    /// Send `head` with a replayable body to the first node that answers below 500.
    public func request(_ head: HTTPRequestHead, body: ByteBuffer? = nil) async throws -> (node: HostPort, status: Int, body: ByteBuffer) {
        var errors: [String] = []
        for node in nodes {
            do {
                let r = try await pool.request(host: node.host, port: node.port, head, body: body.map { .bytes($0) } ?? .empty)
                let b = try await r.body.collect(upTo: 256 << 20)
                if r.status >= 500 {
                    errors.append("\(node): HTTP \(r.status)")
                    continue
                }
                return (node, r.status, b)
            } catch {
                // GOAWAY, refused, reset, closed: this node cannot take it now; try the next.
                errors.append("\(node): \(error)")
            }
        }
        throw CacheClientError.http(status: 503, message: "no node took the request: \(errors.joined(separator: "; "))")
    }

    public func put(bytes: [UInt8]) async throws -> Digest {
        let h = SHA256.hex(bytes)
        let r = try await request(HTTPRequestHead(method: "PUT", path: "/cas/\(h)", headers: ["content-length": String(bytes.count)]),
                                  body: ByteBuffer(bytes: bytes))
        guard r.status == 201 || r.status == 200 else { throw CacheClientError.http(status: r.status, message: String(buffer: r.body)) }
        return Digest(hash: h, size: Int64(bytes.count))!
    }

    public func get(hash: String) async throws -> [UInt8] {
        let r = try await request(HTTPRequestHead(method: "GET", path: "/cas/\(hash)"))
        guard r.status == 200 else { throw CacheClientError.http(status: r.status, message: String(buffer: r.body)) }
        let bytes = Array(r.body.readableBytesView)
        guard SHA256.hex(bytes) == hash else { throw CacheClientError.corrupt(expected: hash, actual: SHA256.hex(bytes)) }
        return bytes
    }

    public func close() async { await pool.closeAll() }
}
