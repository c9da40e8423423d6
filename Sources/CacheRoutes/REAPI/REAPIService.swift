import BlobStore
import Foundation
import Logging
import MeshGRPC
import MeshHTTP
import MeshShell
import MeshTLS
import NIOCore
import REAPI
import SwiftProtobuf

/// The gRPC Remote Execution API v2 cache services (Capabilities, ContentAddressableStorage,
/// ActionCache, google.bytestream.ByteStream) over the node's BlobStore.
public final class REAPIService: Sendable {
    /// Largest BatchUpdate/BatchRead total we advertise (and accept).
    public static let maxBatchTotalSize: Int64 = 4 << 20
    /// ByteStream.Read chunk size.
    static let readChunk = 64 * 1024
    /// GetTree page size when the client asks for none (and the cap on what it asks).
    static let maxTreePage = 1000

    let store: BlobStore
    let logger: Logger
    let uploads: PartialUploads
    let mesh: (any MeshHooks)?
    let tier: (any DurableTier)?
    public let router: GRPCRouter

    public init(store: BlobStore, mesh: (any MeshHooks)? = nil, tier: (any DurableTier)? = nil, logger: Logger) {
        self.store = store
        self.mesh = mesh
        self.tier = tier
        self.logger = logger
        self.uploads = PartialUploads(logger: logger, maxParked: PartialUploads.maxParked(writeSlots: store.configuration.maxConcurrentWrites))
        self.router = GRPCRouter(maxMessageSize: Int(Self.maxBatchTotalSize) + (1 << 20), mapError: Self.status(for:))
        register()
    }

    static func status(for error: any Error) -> GRPCStatus {
        switch error {
        case let s as GRPCStatus: return s
        case let e as BlobStoreError:
            switch e {
            case .invalidHash, .digestMismatch, .sizeMismatch: return GRPCStatus(.invalidArgument, e.description)
            case .tooLarge, .insufficientStorage, .diskFull: return GRPCStatus(.resourceExhausted, e.description)
            case .unverifiedLimit, .indexing: return GRPCStatus(.unavailable, e.description)
            case .notFound: return GRPCStatus(.notFound, e.description)
            case .offsetOutOfRange: return GRPCStatus(.outOfRange, e.description)
            case .io, .closed: return GRPCStatus(.internalError, e.description)
            }
        default: return GRPCStatus(.internalError, "\(error)")
        }
    }

    static func rpcStatus(_ s: GRPCStatus) -> Google_Rpc_Status {
        var r = Google_Rpc_Status()
        r.code = Int32(s.code.rawValue)
        r.message = s.message
        return r
    }

    static func digest(_ d: Build_Bazel_Remote_Execution_V2_Digest, what: String = "digest") throws -> Digest {
        guard let v = Digest(hash: d.hash, size: d.sizeBytes) else {
            throw GRPCStatus(.invalidArgument, "invalid \(what) \"\(d.hash.prefix(80))/\(d.sizeBytes)\": expected 64 lowercase hex characters and a size >= 0")
        }
        return v
    }

    static func requireWrite(_ ctx: GRPCContext) throws {
        guard let role = ctx.peer.role, role.canWrite else {
            throw GRPCStatus(.permissionDenied, "role \(ctx.peer.role?.rawValue ?? "none") may not write (peer \(ctx.peer))")
        }
    }

    static func requireRead(_ ctx: GRPCContext) throws {
        guard ctx.peer.role != nil else {
            throw GRPCStatus(.permissionDenied, "certificate carries no role (peer \(ctx.peer))")
        }
    }

    private func register() {
        let r = router
        r.unary("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities") { [self] (req: Build_Bazel_Remote_Execution_V2_GetCapabilitiesRequest, ctx) in
            try Self.requireRead(ctx)
            return capabilities(instance: req.instanceName, ctx)
        }
        r.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs") { [self] (req: Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest, ctx) in
            try Self.requireRead(ctx)
            return try await findMissing(req)
        }
        r.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs") { [self] (req: Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest, ctx) in
            try Self.requireWrite(ctx)
            return try await batchUpdate(req)
        }
        r.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs") { [self] (req: Build_Bazel_Remote_Execution_V2_BatchReadBlobsRequest, ctx) in
            try Self.requireRead(ctx)
            return try await batchRead(req)
        }
        r.serverStreaming("/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree") { [self] (req: Build_Bazel_Remote_Execution_V2_GetTreeRequest, out: GRPCStreamWriter<Build_Bazel_Remote_Execution_V2_GetTreeResponse>, ctx) in
            try Self.requireRead(ctx)
            try await out.write(try await getTree(req))
        }
        r.unary("/build.bazel.remote.execution.v2.ActionCache/GetActionResult") { [self] (req: Build_Bazel_Remote_Execution_V2_GetActionResultRequest, ctx) in
            try Self.requireRead(ctx)
            return try await getActionResult(req)
        }
        r.unary("/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult") { [self] (req: Build_Bazel_Remote_Execution_V2_UpdateActionResultRequest, ctx) in
            try Self.requireWrite(ctx)
            let d = try Self.digest(req.actionDigest, what: "action digest")
            let value: [UInt8] = try req.actionResult.serializedBytes()
            try await store.putAction(key: d.hash, value: value)
            if let tier {
                do { try await tier.putAction(key: d.hash, value: value) } catch {
                    throw GRPCStatus(.unavailable, "action \(d.hash) is not durable in the origin's S3 tier: \(error)")
                }
            }
            if let mesh {
                do { try await mesh.storedAction(key: d.hash, value: value) } catch {
                    throw GRPCStatus(.unavailable, "action \(d.hash) stored locally, but the write quorum was not reached: \(error)")
                }
            }
            return req.actionResult
        }
        r.serverStreaming("/google.bytestream.ByteStream/Read") { [self] (req: Google_Bytestream_ReadRequest, out: GRPCStreamWriter<Google_Bytestream_ReadResponse>, ctx) in
            try Self.requireRead(ctx)
            try await read(req, out)
        }
        r.clientStreaming("/google.bytestream.ByteStream/Write") { [self] (stream: GRPCRequestStream<Google_Bytestream_WriteRequest>, ctx) in
            try Self.requireWrite(ctx)
            return try await write(stream)
        }
        r.unary("/google.bytestream.ByteStream/QueryWriteStatus") { [self] (req: Google_Bytestream_QueryWriteStatusRequest, ctx) in
            try Self.requireRead(ctx)
            return try queryWriteStatus(req)
        }
    }

    // MARK: Capabilities

    func capabilities(instance: String, _ ctx: GRPCContext) -> Build_Bazel_Remote_Execution_V2_ServerCapabilities {
        var caps = Build_Bazel_Remote_Execution_V2_ServerCapabilities()
        caps.cacheCapabilities.digestFunctions = [.sha256]
        caps.cacheCapabilities.actionCacheUpdateCapabilities.updateEnabled = ctx.peer.role?.canWrite ?? false
        caps.cacheCapabilities.maxBatchTotalSizeBytes = Self.maxBatchTotalSize
        caps.cacheCapabilities.symlinkAbsolutePathStrategy = .disallowed
        caps.cacheCapabilities.supportedCompressors = []
        caps.lowApiVersion.major = 2
        caps.highApiVersion.major = 2
        caps.highApiVersion.minor = 3
        logger.debug("GetCapabilities", metadata: ["instance": "\(instance)", "peer": "\(ctx.peer)"])
        return caps
    }

    // MARK: CAS

    func findMissing(_ req: Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest) async throws -> Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse {
        var resp = Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse()
        for d in req.blobDigests {
            let digest = try Self.digest(d)
            // `contains` counts as use (eviction recency); the empty blob always exists.
            if !store.contains(digest) { resp.missingBlobDigests.append(d) }
        }
        if let tier, !resp.missingBlobDigests.isEmpty {
            resp.missingBlobDigests = try await Self.missingInTier(resp.missingBlobDigests, tier)
        }
        return resp
    }

    /// Of `digests` (missing locally), those the S3 tier lacks too (HEADs at once; the client's
    /// connection pool bounds them).
    static func missingInTier(_ digests: [Build_Bazel_Remote_Execution_V2_Digest], _ tier: any DurableTier) async throws -> [Build_Bazel_Remote_Execution_V2_Digest] {
        do {
            return try await withThrowingTaskGroup(of: (Int, Bool).self) { group in
                for (i, d) in digests.enumerated() {
                    group.addTask { (i, try await tier.size(of: d.hash) == d.sizeBytes) }
                }
                var present = Set<Int>()
                for try await (i, here) in group where here { present.insert(i) }
                return digests.enumerated().filter { !present.contains($0.offset) }.map(\.element)
            }
        } catch {
            throw GRPCStatus(.unavailable, "the origin's S3 tier cannot tell which blobs it holds: \(error)")
        }
    }

    /// A client wrote a blob here: in a mesh it is acknowledged only once the write quorum holds it.
    func replicate(_ digest: Digest) async throws {
        if let tier {
            do { try await tier.persist(digest, checkFirst: false) } catch {
                throw GRPCStatus(.unavailable, "\(digest) is stored on this node's disk but not durable in the origin's S3 tier: \(error)")
            }
        }
        guard let mesh else { return }
        do {
            try await mesh.stored(digest)
        } catch {
            throw GRPCStatus(.unavailable, "stored locally, but the write quorum was not reached: \(error)")
        }
    }

    /// The worker role: a blob a client needs but this node lacks is fetched from the mesh first.
    /// Returns whether the blob (of that size) is now local; UNAVAILABLE when the mesh could
    /// not tell (a source failed, the node has not joined yet): the client retries, instead of
    /// taking NOT_FOUND for a blob the mesh may hold.
    func ensureLocal(_ d: Digest) async throws -> Bool {
        if d.size == 0 || store.size(of: d.hash) == d.size { return true }
        if let tier {
            do {
                if try await tier.fetch(hash: d.hash) { return store.size(of: d.hash) == d.size }
            } catch {
                throw GRPCStatus(.unavailable, "blob \(d) is not here and the origin's S3 tier cannot be read: \(error)")
            }
        }
        guard let mesh else { return false }
        switch await mesh.fetchMissing(hash: d.hash) {
        case .fetched: return store.size(of: d.hash) == d.size
        case .notFound: return false
        case .unavailable(let why): throw GRPCStatus(.unavailable, "blob \(d) is not here and the mesh cannot tell where it is right now: \(why)")
        }
    }

    static func checkBatchSize(_ total: Int64) throws {
        guard total <= maxBatchTotalSize else {
            throw GRPCStatus(.invalidArgument, "batch of \(total) bytes exceeds max_batch_total_size_bytes \(maxBatchTotalSize)")
        }
    }

    /// Runs `body` for one blob of a batch; its error becomes that blob's status.
    static func perBlob(_ body: () async throws -> Void) async -> Google_Rpc_Status {
        do {
            try await body()
            return rpcStatus(.ok)
        } catch {
            return rpcStatus(status(for: error))
        }
    }

    func batchUpdate(_ req: Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest) async throws -> Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse {
        try Self.checkBatchSize(req.requests.reduce(Int64(0)) { $0 + Int64($1.data.count) })
        var resp = Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse()
        for r in req.requests {
            var one = Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse.Response()
            one.digest = r.digest
            one.status = await Self.perBlob {
                let d = try Self.digest(r.digest)
                guard r.compressor == .identity else { throw GRPCStatus(.invalidArgument, "compressor \(r.compressor) not supported") }
                guard Int64(r.data.count) == d.size else {
                    throw GRPCStatus(.invalidArgument, "size mismatch for \(d.hash): digest says \(d.size), data has \(r.data.count) bytes")
                }
                let stored = try await store.put(bytes: [UInt8](r.data), hash: d.hash)
                try await replicate(stored)
            }
            resp.responses.append(one)
        }
        return resp
    }

    func batchRead(_ req: Build_Bazel_Remote_Execution_V2_BatchReadBlobsRequest) async throws -> Build_Bazel_Remote_Execution_V2_BatchReadBlobsResponse {
        // Sizes are the client's: saturate instead of trapping on two near-Int64.max digests.
        try Self.checkBatchSize(req.digests.reduce(Int64(0)) { let (t, o) = $0.addingReportingOverflow(max(0, $1.sizeBytes)); return o ? .max : t })
        var resp = Build_Bazel_Remote_Execution_V2_BatchReadBlobsResponse()
        for d in req.digests {
            var one = Build_Bazel_Remote_Execution_V2_BatchReadBlobsResponse.Response()
            one.digest = d
            var data = Data()
            one.status = await Self.perBlob {
                let digest = try Self.digest(d)
                guard try await ensureLocal(digest) else { throw GRPCStatus(.notFound, "blob \(digest) not found") }
                data = Data(try await store.readAll(hash: digest.hash))
            }
            one.data = data
            resp.responses.append(one)
        }
        return resp
    }

    func getTree(_ req: Build_Bazel_Remote_Execution_V2_GetTreeRequest) async throws -> Build_Bazel_Remote_Execution_V2_GetTreeResponse {
        let root = try Self.digest(req.rootDigest, what: "root digest")
        guard req.pageSize >= 0 else { throw GRPCStatus(.invalidArgument, "page_size must be >= 0") }
        var offset = 0
        if !req.pageToken.isEmpty {
            guard let o = Int(req.pageToken), o >= 0 else { throw GRPCStatus(.invalidArgument, "invalid page_token") }
            offset = o
        }
        guard store.contains(root) else { throw GRPCStatus(.notFound, "root directory \(root) not found") }
        // Breadth-first; parts missing from the CAS are omitted (REAPI GetTree semantics). Linear
        // in what it visits (a queue with a read index, each directory once), and a page stops the
        // walk as soon as it knows whether another page follows: a client-sized tree costs work in
        // proportion to the page asked for, never quadratic, and the walk yields to other requests.
        let page = req.pageSize == 0 ? Self.maxTreePage : min(Int(req.pageSize), Self.maxTreePage)
        // The page token is the client's: a token near Int.max must not overflow (it pages past the end).
        let (wanted, overflow) = offset.addingReportingOverflow(page + 1)
        if overflow { throw GRPCStatus(.invalidArgument, "page_token beyond the tree") }
        var all: [Build_Bazel_Remote_Execution_V2_Directory] = []
        var queue: [Digest] = [root]
        var next = 0
        var seen: Set<Digest> = [root]
        while next < queue.count, all.count < wanted {
            let d = queue[next]
            next += 1
            if next % 256 == 0 {
                try Task.checkCancellation()
                await Task.yield()
            }
            guard let bytes = try? await store.readAll(hash: d.hash) else { continue }
            let dir: Build_Bazel_Remote_Execution_V2_Directory
            do { dir = try .init(serializedBytes: bytes) } catch {
                throw GRPCStatus(.invalidArgument, "blob \(d) is not a Directory message")
            }
            all.append(dir)
            for sub in dir.directories {
                if let sd = Digest(hash: sub.digest.hash, size: sub.digest.sizeBytes), seen.insert(sd).inserted { queue.append(sd) }
            }
        }
        guard offset <= all.count else { throw GRPCStatus(.invalidArgument, "page_token beyond the tree") }
        var resp = Build_Bazel_Remote_Execution_V2_GetTreeResponse()
        let end = min(all.count, offset + page)
        resp.directories = Array(all[offset..<end])
        if end < all.count { resp.nextPageToken = String(end) }
        return resp
    }

    // MARK: Action cache

    /// A hit only if every blob the result references is present (seeds 003/004: a client must
    /// never get a hit it cannot download). Referenced blobs count as used.
    func getActionResult(_ req: Build_Bazel_Remote_Execution_V2_GetActionResultRequest) async throws -> Build_Bazel_Remote_Execution_V2_ActionResult {
        let d = try Self.digest(req.actionDigest, what: "action digest")
        var found = try await store.getAction(key: d.hash)
        if found == nil, let tier {
            do { found = try await tier.getAction(key: d.hash) } catch {
                throw GRPCStatus(.unavailable, "the origin's S3 tier cannot be read for action \(d.hash): \(error)")
            }
            if let v = found { try await store.putAction(key: d.hash, value: v) }
        }
        if found == nil, let mesh, case .found(let v, _) = await mesh.fetchAction(key: d.hash) {
            try await store.putAction(key: d.hash, value: v)
            found = v
        }
        guard let bytes = found else {
            throw GRPCStatus(.notFound, "no action result for \(d.hash)")
        }
        let result: Build_Bazel_Remote_Execution_V2_ActionResult
        do { result = try Build_Bazel_Remote_Execution_V2_ActionResult(serializedBytes: bytes) } catch {
            logger.warning("undecodable ActionResult in the action cache", metadata: ["key": "\(d.hash)"])
            throw GRPCStatus(.notFound, "action result for \(d.hash) is unreadable")
        }
        if let missing = try await firstMissingReference(result) {
            logger.info("action cache hit withheld: a referenced blob is missing", metadata: ["action": "\(d.hash)", "missing": "\(missing)"])
            throw GRPCStatus(.notFound, "action result for \(d.hash) references missing blob \(missing)")
        }
        return result
    }

    func firstMissingReference(_ result: Build_Bazel_Remote_Execution_V2_ActionResult) async throws -> Digest? {
        var refs: [Build_Bazel_Remote_Execution_V2_Digest] = result.outputFiles.map(\.digest)
        if result.hasStdoutDigest { refs.append(result.stdoutDigest) }
        if result.hasStderrDigest { refs.append(result.stderrDigest) }
        for dir in result.outputDirectories {
            guard let td = Digest(hash: dir.treeDigest.hash, size: dir.treeDigest.sizeBytes) else { return Digest.empty }
            guard try await ensureLocal(td), store.contains(td), let bytes = try? await store.readAll(hash: td.hash),
                  let tree = try? Build_Bazel_Remote_Execution_V2_Tree(serializedBytes: bytes) else { return td }
            for d in [tree.root] + tree.children {
                refs.append(contentsOf: d.files.map(\.digest))
            }
        }
        for r in refs {
            guard let d = Digest(hash: r.hash, size: r.sizeBytes) else { return Digest.empty }
            if !store.contains(d), !(try await ensureLocal(d)) { return d }
        }
        return nil
    }

    // MARK: ByteStream

    /// `[instance/]blobs/{hash}/{size}[/…]` or `[instance/]uploads/{uuid}/blobs/{hash}/{size}[/…]`.
    static func parseResource(_ name: String, upload: Bool) throws -> Digest {
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        guard let i = parts.firstIndex(of: "blobs"), i + 2 < parts.count + 0, parts.count >= i + 3 else {
            throw GRPCStatus(.invalidArgument, "malformed resource name \"\(name.prefix(200))\": expected [instance/]\(upload ? "uploads/{uuid}/" : "")blobs/{hash}/{size}")
        }
        if upload {
            guard i >= 2, parts[i - 2] == "uploads", !parts[i - 1].isEmpty else {
                throw GRPCStatus(.invalidArgument, "malformed upload resource name \"\(name.prefix(200))\": expected [instance/]uploads/{uuid}/blobs/{hash}/{size}")
            }
        }
        if i > 0, parts[i - 1] == "compressed-blobs" {
            throw GRPCStatus(.invalidArgument, "compressed blobs are not supported")
        }
        guard let size = Int64(parts[i + 2]), let d = Digest(hash: String(parts[i + 1]), size: size) else {
            throw GRPCStatus(.invalidArgument, "malformed digest in resource name \"\(name.prefix(200))\"")
        }
        return d
    }

    func read(_ req: Google_Bytestream_ReadRequest, _ out: GRPCStreamWriter<Google_Bytestream_ReadResponse>) async throws {
        let d = try Self.parseResource(req.resourceName, upload: false)
        guard req.readOffset >= 0 else { throw GRPCStatus(.outOfRange, "read_offset \(req.readOffset) is negative") }
        guard req.readLimit >= 0 else { throw GRPCStatus(.invalidArgument, "read_limit \(req.readLimit) is negative") }
        guard req.readOffset <= d.size else { throw GRPCStatus(.outOfRange, "read_offset \(req.readOffset) is beyond the blob size \(d.size)") }
        if d.size == 0 { return }
        guard try await ensureLocal(d) else { throw GRPCStatus(.notFound, "blob \(d) not found") }
        let reader = try await store.openRead(hash: d.hash, offset: req.readOffset, limit: req.readLimit == 0 ? nil : req.readLimit)
        defer { reader.close() }
        var pos = reader.offset
        var buf = [UInt8](repeating: 0, count: Self.readChunk)
        while pos < reader.end {
            let n = try buf.withUnsafeMutableBytes { try reader.read(at: pos, into: UnsafeMutableRawBufferPointer(rebasing: $0.prefix(Int(min(Int64(Self.readChunk), reader.end - pos))))) }
            guard n > 0 else { throw GRPCStatus(.dataLoss, "blob \(d) ended early") }
            var msg = Google_Bytestream_ReadResponse()
            msg.data = Data(buf[0..<n])
            try await out.write(msg)
            pos += Int64(n)
        }
    }

    func write(_ stream: GRPCRequestStream<Google_Bytestream_WriteRequest>) async throws -> Google_Bytestream_WriteResponse {
        var iterator = stream.makeAsyncIterator()
        guard let first = try await iterator.next() else { throw GRPCStatus(.invalidArgument, "empty Write stream") }
        let resource = first.resourceName
        let d = try Self.parseResource(resource, upload: true)
        var resp = Google_Bytestream_WriteResponse()
        // Already stored: return at once with the full size (the client stops sending).
        if store.contains(d) {
            uploads.discard(resource)
            if let tier {
                do { try await tier.persist(d, checkFirst: true) } catch {
                    throw GRPCStatus(.unavailable, "\(d) is stored on this node's disk but not durable in the origin's S3 tier: \(error)")
                }
            }
            resp.committedSize = d.size
            return resp
        }
        let upload = try await uploads.resume(resource, digest: d, offset: first.writeOffset, store: store)
        var message: Google_Bytestream_WriteRequest? = first
        do {
            while let m = message {
                if !m.resourceName.isEmpty && m.resourceName != resource {
                    throw GRPCStatus(.invalidArgument, "resource_name changed within one Write stream")
                }
                guard m.writeOffset == upload.writer.bytesWritten else {
                    throw GRPCStatus(.invalidArgument, "write_offset \(m.writeOffset) does not match committed size \(upload.writer.bytesWritten)")
                }
                if !m.data.isEmpty {
                    try m.data.withUnsafeBytes { try upload.writer.write($0) }
                }
                if m.finishWrite {
                    uploads.finished(resource)
                    let digest = try await upload.writer.commit()
                    try await replicate(digest)
                    resp.committedSize = digest.size
                    return resp
                }
                message = try await iterator.next()
            }
        } catch let s as GRPCStatus where s.code == .cancelled {
            // The stream broke: keep the partial upload for a resume (QueryWriteStatus + offset).
            uploads.park(resource, upload)
            throw s
        } catch {
            uploads.finished(resource)
            upload.writer.abort()
            throw error
        }
        uploads.park(resource, upload)
        throw GRPCStatus(.invalidArgument, "Write stream ended without finish_write")
    }

    func queryWriteStatus(_ req: Google_Bytestream_QueryWriteStatusRequest) throws -> Google_Bytestream_QueryWriteStatusResponse {
        let d = try Self.parseResource(req.resourceName, upload: true)
        var resp = Google_Bytestream_QueryWriteStatusResponse()
        if store.contains(d) {
            resp.committedSize = d.size
            resp.complete = true
        } else if let n = uploads.committed(req.resourceName) {
            resp.committedSize = n
        } else {
            throw GRPCStatus(.notFound, "no upload in progress for \(req.resourceName.prefix(200))")
        }
        return resp
    }
}
