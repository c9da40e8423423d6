import BlobStore
import CacheRoutes
import Foundation
import Logging
import MeshHTTP
import MeshS3
import Metrics
import NIOCore
import Synchronization

/// `[origin]` in a node config or a topology: an S3 bucket as the origin's durable tier.
public struct S3OriginSettings: Sendable, Equatable {
    public var endpoint: String
    public var bucket: String
    public var region = "us-east-1"
    public var pathStyle = true
    /// An AWS-style credentials file (`aws_access_key_id`, `aws_secret_access_key`); without
    /// it, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` from the environment.
    public var credentialsFile: String?
    public var idleTimeoutSeconds = 10
    public var maxConnections = 32
    public var multipartThreshold: Int64 = 64 << 20
    public var partSize: Int64 = 16 << 20
    /// For an `https://` endpoint: a PEM file of the CAs to trust; nil: the system's trust store.
    public var caFile: String?

    public init(endpoint: String, bucket: String) {
        self.endpoint = endpoint
        self.bucket = bucket
    }

    public static let keys = ["backend", "endpoint", "bucket", "region", "path_style", "credentials_file",
                              "idle_timeout_seconds", "max_connections", "multipart_threshold", "part_size", "ca_file"]

    /// Reads `[origin]` from `t` (nil when absent or `backend = "disk"`); `resolve` anchors a
    /// relative credentials file at the config/topology file.
    static func parse(_ t: StrictTOMLTable, resolve: (String) -> String) throws -> S3OriginSettings? {
        guard let o = try t.table("origin", known: keys) else { return nil }
        let backend = try o.choice("backend", [("disk", "disk"), ("s3", "s3")]) ?? "disk"
        guard backend == "s3" else { return nil }
        let endpoint = try o.required("endpoint", "the S3 endpoint URL, e.g. \"http://127.0.0.1:7480\"", o.string)
        do { _ = try S3Endpoint.parse(endpoint) } catch { throw o.error("endpoint", "\(error)") }
        var s = S3OriginSettings(endpoint: endpoint, bucket: try o.required("bucket", "the bucket name", o.string))
        if let v = try o.string("region") { s.region = v }
        if let v = try o.bool("path_style") { s.pathStyle = v }
        s.credentialsFile = try o.string("credentials_file").map(resolve)
        s.caFile = try o.string("ca_file").map(resolve)
        if s.caFile != nil, !endpoint.lowercased().hasPrefix("https://") {
            throw o.error("ca_file", "'ca_file' is for an https:// endpoint; '\(endpoint)' is not one")
        }
        if let v = try o.int("idle_timeout_seconds") {
            guard v >= 1 else { throw o.error("idle_timeout_seconds", "'idle_timeout_seconds' must be at least 1, got \(v)") }
            s.idleTimeoutSeconds = v
        }
        if let v = try o.int("max_connections") {
            guard v >= 1 else { throw o.error("max_connections", "'max_connections' must be at least 1, got \(v)") }
            s.maxConnections = v
        }
        if let v = try o.size("part_size") {
            guard v >= 5 << 20 else { throw o.error("part_size", "'part_size' must be at least 5M (S3's smallest part), got \(v)") }
            s.partSize = v
        }
        if let v = try o.size("multipart_threshold") { s.multipartThreshold = max(v, s.partSize) }
        return s
    }

    /// The access key and secret: the credentials file, else the environment.
    public func credentials(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> S3Credentials {
        if let path = credentialsFile {
            let text: String
            do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
                throw ConfigurationError("[origin] credentials_file \(path): \(describeFileError(error))")
            }
            var values: [String: String] = [:]
            var section = "default"
            var firstSection: String?
            var bySection: [String: [String: String]] = [:]
            for raw in text.split(separator: "\n") {
                let line = raw.trimmingCharacters(in: .whitespaces)
                if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
                if line.hasPrefix("["), line.hasSuffix("]") {
                    section = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                    if firstSection == nil { firstSection = section }
                    continue
                }
                guard let eq = line.firstIndex(of: "=") else { continue }
                let k = line[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
                let v = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
                bySection[section, default: [:]][k] = v
            }
            values = bySection["default"] ?? firstSection.flatMap { bySection[$0] } ?? [:]
            guard let a = values["aws_access_key_id"], !a.isEmpty, let s = values["aws_secret_access_key"], !s.isEmpty else {
                throw ConfigurationError("[origin] credentials_file \(path) must hold aws_access_key_id and aws_secret_access_key (in [default] or its first section)")
            }
            return S3Credentials(accessKeyID: a, secretAccessKey: s)
        }
        guard let a = environment["AWS_ACCESS_KEY_ID"], !a.isEmpty, let s = environment["AWS_SECRET_ACCESS_KEY"], !s.isEmpty else {
            throw ConfigurationError("the S3 origin tier needs credentials: set [origin] credentials_file (aws_access_key_id, aws_secret_access_key) or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (never in the topology)")
        }
        return S3Credentials(accessKeyID: a, secretAccessKey: s)
    }

    func clientSettings() throws -> S3Client.Settings {
        var s = S3Client.Settings(endpoint: try S3Endpoint.parse(endpoint), bucket: bucket, credentials: try credentials())
        s.region = region
        s.pathStyle = pathStyle
        s.idleTimeout = .seconds(idleTimeoutSeconds)
        s.maxConnections = maxConnections
        s.multipartThreshold = multipartThreshold
        s.partSize = partSize
        s.caFile = caFile
        return s
    }
}

/// A local blob as an upload source (re-readable for retries and parts).
struct BlobReaderSource: S3UploadSource {
    let reader: BlobReader
    func read(at offset: Int64, count: Int) throws -> ByteBuffer {
        var buf = ByteBufferAllocator().buffer(capacity: count)
        let n = try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { p in
            try reader.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: p.prefix(count)))
        }
        _ = n
        return buf
    }
}

/// The S3 tier: objects at `cas/<sha256>` and `ac/<sha256>` in one bucket (which several origins
/// may share). Read-through is streamed into the store's verifying writer (a body that does not
/// hash to its key is dropped, counted in `cachemesh_s3_corrupt_objects_total` and logged) and,
/// for large blobs, forwarded to the client while it arrives (`FillingBlob`: the last chunk only
/// once verified); concurrent reads of one blob share one GET.
public final class S3Tier: DurableTier {
    let client: S3Client
    let store: BlobStore
    let logger: Logger
    let bucket: String
    private let inflight = Mutex<[String: FillingBlob]>([:])
    private let corrupt = Counter(label: "cachemesh_s3_corrupt_objects_total")
    private let readThrough = Counter(label: "cachemesh_s3_read_through_total")
    private let streamed = Counter(label: "cachemesh_s3_streamed_reads_total")

    public init(settings: S3OriginSettings, store: BlobStore, logger: Logger) throws {
        do { client = try S3Client(settings: try settings.clientSettings(), logger: logger) } catch let e as S3ConfigError {
            throw ConfigurationError("[origin] \(e)")
        }
        bucket = settings.bucket
        self.store = store
        self.logger = logger
    }

    public init(client: S3Client, store: BlobStore, logger: Logger) {
        self.client = client
        self.bucket = client.settings.bucket
        self.store = store
        self.logger = logger
    }

    public func check() async throws {
        do { try await client.checkBucket() } catch let e as S3Error {
            let endpoint = "\(client.settings.endpoint)"
            if case .tls(let why) = e.kind {
                let trust = client.settings.caFile.map { "the CAs in [origin] ca_file \($0)" } ?? "the system's trust store ([origin] ca_file not set)"
                throw ConfigurationError("TLS to the S3 origin tier at \(endpoint) failed (trusting \(trust)): \(why)")
            }
            switch e.status {
            case 403: throw ConfigurationError("the S3 origin tier refused the credentials for bucket \(bucket) at \(endpoint) (HTTP 403: wrong access key or secret, or no permission on the bucket): \(e)")
            case 404: throw ConfigurationError("the S3 origin tier's bucket \(bucket) does not exist at \(endpoint) (HTTP 404); create it first")
            default: throw ConfigurationError("the S3 origin tier at \(endpoint) (bucket \(bucket)) is not usable: \(e)")
            }
        }
    }

    /// The fill of `hash` under way, or a new one (with its download started).
    private func fill(_ hash: String) -> FillingBlob {
        inflight.withLock { m -> FillingBlob in
            if let f = m[hash] { return f }
            let f = FillingBlob(hash: hash, store: store, logger: logger)
            m[hash] = f
            Task { await self.download(f) }
            return f
        }
    }

    public func fetch(hash: String) async throws -> Bool {
        switch await fill(hash).outcome() {
        case .committed: return true
        case .absent: return false
        case .failed(let e): throw e
        }
    }

    /// A local miss: blobs over `streamAbove` bytes are answered while they arrive from S3 (and
    /// are stored, verified); smaller ones (and any whose size S3 does not say) once stored.
    public func read(hash: String, streamAbove: Int64) async throws -> TierRead {
        let f = fill(hash)
        let outcome: FillingBlob.Outcome
        switch await f.start() {
        case .arriving(let size?) where size > streamAbove:
            streamed.increment()
            return .arriving(f.body(), size: size)
        case .arriving:
            outcome = await f.outcome()
        case .finished(let o):
            outcome = o
        }
        switch outcome {
        case .committed: return .local
        case .absent: return .absent
        case .failed(let e): throw e
        }
    }

    private func download(_ fill: FillingBlob) async {
        let outcome: FillingBlob.Outcome
        do {
            outcome = try await download(fill.hash, into: fill) ? .committed : .absent
        } catch {
            outcome = .failed(error)
        }
        _ = inflight.withLock { $0.removeValue(forKey: fill.hash) }
        fill.finish(outcome)
    }

    private func download(_ hash: String, into fill: FillingBlob) async throws -> Bool {
        if store.size(of: hash) != nil { return true }
        let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
        fill.attach(writer)
        let found: Bool
        do {
            found = try await client.get("cas/\(hash)", size: { fill.announce(size: $0) }) { buf in
                try fill.append(buf)
            }
        } catch {
            writer.abort()
            throw error
        }
        guard found else {
            writer.abort()
            return false
        }
        do {
            // The held last chunk goes out once the hash checked out, not after the sync to disk.
            _ = try await writer.commit(verified: { fill.verified() })
        } catch let e as BlobStoreError {
            if case .digestMismatch = e {
                corrupt.increment()
                logger.error("S3 object does not hash to its key: not stored, not served (streamed readers reset before the last byte)",
                             metadata: ["key": "cas/\(hash)", "bucket": "\(bucket)", "error": "\(e)"])
                throw S3CorruptObject(hash: hash, reason: "\(e)")
            }
            throw e
        }
        readThrough.increment()
        return true
    }

    public func size(of hash: String) async throws -> Int64? {
        try await client.head("cas/\(hash)")
    }

    public func persist(_ digest: Digest, checkFirst: Bool) async throws {
        if digest.size == 0 { return }
        if checkFirst, try await client.head("cas/\(digest.hash)") == digest.size { return }
        let reader = try await store.openRead(hash: digest.hash)
        defer { reader.close() }
        try await client.put("cas/\(digest.hash)", size: reader.length, sha256: digest.hash, source: BlobReaderSource(reader: reader))
    }

    public func getAction(key: String) async throws -> [UInt8]? {
        try await client.getSmall("ac/\(key)", limit: CacheService.maxActionBytes)
    }

    public func putAction(key: String, value: [UInt8]) async throws {
        try await client.put("ac/\(key)", bytes: value)
    }

    public func deleteAction(key: String) async throws {
        try await client.delete("ac/\(key)")
    }
}
