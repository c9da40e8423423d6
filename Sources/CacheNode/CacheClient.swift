import BlobStore
import Foundation
import Logging
import MeshHTTP
import MeshHTTP2
import MeshQUIC
import MeshTLS
import NIOCore

/// Where and how a client reaches a node.
public struct ClientOptions: Sendable {
    public var server: HostPort
    public var certificate: String?
    public var privateKey: String?
    public var ca: String?
    public var insecure: Bool
    /// Name to check the server certificate against (default: the host).
    public var serverName: String?
    /// HTTP/2 over TLS/TCP (default) or HTTP/3 over QUIC (the node's UDP port).
    public var transport: Transport = .tcp
    /// QUIC: the largest UDP payload to send (nil: 1452 with path MTU discovery).
    public var quicMaxDatagram: Int?

    public enum Transport: String, Sendable, CaseIterable {
        case tcp, quic
    }

    public init(server: HostPort, certificate: String? = nil, privateKey: String? = nil, ca: String? = nil, insecure: Bool = false, serverName: String? = nil) {
        self.server = server
        self.certificate = certificate
        self.privateKey = privateKey
        self.ca = ca
        self.insecure = insecure
        self.serverName = serverName
    }
}

public enum CacheClientError: Error, CustomStringConvertible {
    case http(status: Int, message: String)
    case corrupt(expected: String, actual: String)
    case usage(String)

    public var description: String {
        switch self {
        case .http(let status, let message): "server answered \(status): \(message.trimmingCharacters(in: .whitespacesAndNewlines))"
        case .corrupt(let e, let a): "downloaded body hashes to \(a), expected \(e); nothing written"
        case .usage(let s): s
        }
    }
}

/// The node's HTTP/2 client for the cache routes (used by the CLI and the tests).
public final class CacheClient: Sendable {
    /// The connection (HTTP/2 or HTTP/3) requests go over.
    public let connection: any HTTPClientTransport
    private let closer: @Sendable () async -> Void

    init(connection: any HTTPClientTransport, close: @escaping @Sendable () async -> Void) {
        self.connection = connection
        self.closer = close
    }

    public static func connect(_ options: ClientOptions, logger: Logger = Logger(label: "cachemesh.client")) async throws -> CacheClient {
        var credentials: TLSCredentials?
        if !options.insecure {
            guard let ca = options.ca else {
                throw CacheClientError.usage("TLS needs --ca (and --cert/--key for mTLS); plaintext only with --insecure")
            }
            credentials = try TLSCredentials(files: TLSFiles(certificateChain: options.certificate, privateKey: options.privateKey, trustedCA: ca))
        }
        if options.transport == .quic {
            guard let credentials else { throw CacheClientError.usage("QUIC always uses TLS: --insecure is for TCP only") }
            var settings = QUICSettings()
            settings.maxDatagramSize = options.quicMaxDatagram
            let conn = try await HTTP3Connection.connect(host: options.server.host, port: options.server.port, credentials: credentials,
                                                         serverName: options.serverName, settings: settings, logger: logger)
            return CacheClient(connection: conn, close: { await conn.close() })
        }
        let conn = try await HTTP2Connection.connect(
            host: options.server.host, port: options.server.port, credentials: credentials,
            serverName: options.serverName, logger: logger)
        return CacheClient(connection: conn, close: { await conn.close() })
    }

    public func close() async { await closer() }

    private func check(_ r: HTTPClientResponse, expect: Set<Int>) async throws {
        guard expect.contains(r.status) else {
            let body = (try? await r.body.collect(upTo: 64 * 1024)).map { String(buffer: $0) } ?? ""
            throw CacheClientError.http(status: r.status, message: body)
        }
    }

    /// Upload a file to `/cas/{sha256}` (hashing it first). Returns its digest.
    public func put(file path: String, source: FileSource? = nil) async throws -> Digest {
        let (hash, size) = try SHA256.hexOfFile(path: path)
        let src = try source ?? FileSource(path: path)
        guard src.length == size else { throw CacheClientError.usage("\(path) changed while reading") }
        let r = try await connection.request(
            HTTPRequestHead(method: "PUT", path: "/cas/\(hash)", headers: ["content-length": String(size)]), body: .file(src))
        try await check(r, expect: [200, 201])
        _ = try? await r.body.collect(upTo: 64 * 1024)
        return Digest(hash: hash, size: size)!
    }

    /// Upload bytes to `/cas/{sha256}` or, with `hash` given, under that (possibly wrong) hash.
    public func put(bytes: [UInt8], hash: String? = nil) async throws -> Digest {
        let h = hash ?? SHA256.hex(bytes)
        let r = try await connection.request(
            HTTPRequestHead(method: "PUT", path: "/cas/\(h)", headers: ["content-length": String(bytes.count)]),
            body: .bytes(ByteBuffer(bytes: bytes)))
        try await check(r, expect: [200, 201])
        _ = try? await r.body.collect(upTo: 64 * 1024)
        return Digest(hash: h, size: Int64(bytes.count))!
    }

    /// Download `/cas/{hash}`, verifying the SHA-256 as it streams. With `path`, the file is
    /// written to a temporary name and renamed only once verified. `progress` gets (done, total).
    public func get(hash: String, to path: String?, progress: (@Sendable (Int64, Int64?) -> Void)? = nil) async throws -> Int64 {
        guard Digest.isValidHash(hash) else { throw CacheClientError.usage("invalid digest \(hash): expected 64 lowercase hex characters") }
        let r = try await connection.request(HTTPRequestHead(method: "GET", path: "/cas/\(hash)"))
        try await check(r, expect: [200])
        let total = r.headers["content-length"].flatMap { Int64($0) }
        let tmp = path.map { $0 + ".cachemesh-partial-\(UInt32.random(in: 0...UInt32.max))" }
        let out: FileHandle
        if let tmp {
            guard FileManager.default.createFile(atPath: tmp, contents: nil) else { throw CacheClientError.usage("cannot create \(tmp)") }
            out = try FileHandle(forWritingTo: URL(fileURLWithPath: tmp))
        } else {
            out = FileHandle.standardOutput
        }
        var hasher = SHA256Hasher()
        var done: Int64 = 0
        do {
            for try await chunk in r.body {
                chunk.withUnsafeReadableBytes { hasher.update($0) }
                try out.write(contentsOf: Data(chunk.readableBytesView))
                done += Int64(chunk.readableBytes)
                progress?(done, total)
            }
            let actual = hasher.finalize()
            guard actual == hash else { throw CacheClientError.corrupt(expected: hash, actual: actual) }
            if let tmp, let path {
                try out.close()
                if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
                try FileManager.default.moveItem(atPath: tmp, toPath: path)
            }
        } catch {
            if let tmp {
                try? out.close()
                try? FileManager.default.removeItem(atPath: tmp)
            }
            throw error
        }
        return done
    }

    /// GET a small resource as text.
    public func getText(_ path: String) async throws -> (status: Int, body: String) {
        let r = try await connection.request(HTTPRequestHead(method: "GET", path: path))
        let body = try await r.body.collect(upTo: 16 << 20)
        return (r.status, String(buffer: body))
    }
}
