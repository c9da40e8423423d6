import BlobStore
import Foundation
import Logging
import MeshGRPC
import MeshHTTP
import MeshTLS
import NIOCore
import REAPI
import SwiftProtobuf
import Testing
@testable import CacheNode
@testable import CacheRoutes

typealias V2 = Build_Bazel_Remote_Execution_V2_Digest

/// REAPI services driven through the gRPC router in memory, over a real BlobStore.
final class REAPIHarness: @unchecked Sendable {
    let dir: URL
    let store: BlobStore
    let service: REAPIService

    init(maxBytes: Int64 = 64 << 20) throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-reapi-\(UUID())")
        store = try BlobStore(configuration: BlobStoreConfiguration(directory: dir.path, maxBytes: maxBytes), logger: Logger(label: "t"))
        service = REAPIService(store: store, logger: Logger(label: "t"))
    }

    deinit { try? FileManager.default.removeItem(at: dir) }

    struct Result<M: Sendable>: Sendable {
        var code: Int
        var message: String
        var messages: [M]
    }

    func call<Resp: SwiftProtobuf.Message>(_ path: String, body: HTTPInboundBody, role: PeerRole? = .client, as: Resp.Type) async throws -> Result<Resp> {
        let req = HTTPServerRequest(head: HTTPRequestHead(method: "POST", path: path, headers: ["content-type": "application/grpc"]),
                                    body: body, peer: PeerIdentity(commonName: "t", role: role, authenticated: true), remoteAddress: nil)
        let r = await service.router.handle(req)
        var bytes = ByteBuffer()
        var trailers = r.trailers ?? r.headers
        switch r.body {
        case .bytes(var b): bytes.writeBuffer(&b)
        case .stream(let s):
            loop: while true {
                switch s.read(max: 1 << 20) {
                case .data(var b): bytes.writeBuffer(&b)
                case .wouldBlock: try await Task.sleep(for: .milliseconds(1))
                case .end(let t): trailers = t ?? trailers; break loop
                case .failed(let e): throw e
                }
            }
        case .empty, .file: break
        }
        var reader = GRPCMessageReader()
        reader.append(bytes)
        var out: [Resp] = []
        while let m = try reader.next() { out.append(try GRPCMessageReader.decode(Resp.self, from: m)) }
        return Result(code: Int(trailers["grpc-status"] ?? "-1") ?? -1, message: GRPCStatus.percentDecode(trailers["grpc-message"] ?? ""), messages: out)
    }

    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(_ path: String, _ reqs: [Req], role: PeerRole? = .client, as: Resp.Type) async throws -> Result<Resp> {
        var body = ByteBuffer()
        for r in reqs {
            var f = try GRPCFraming.frame(r)
            body.writeBuffer(&f)
        }
        return try await call(path, body: .complete(body), role: role, as: Resp.self)
    }

    func put(_ bytes: [UInt8]) async throws -> V2 {
        let d = try await store.put(bytes: bytes, hash: SHA256.hex(bytes))
        return V2.with { $0.hash = d.hash; $0.sizeBytes = d.size }
    }
}

func v2(_ bytes: [UInt8]) -> V2 { V2.with { $0.hash = SHA256.hex(bytes); $0.sizeBytes = Int64(bytes.count) } }

let CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
let AC = "/build.bazel.remote.execution.v2.ActionCache/"
let BS = "/google.bytestream.ByteStream/"

@Suite struct REAPIServiceTests {
    @Test func capabilitiesTellBazelWhatItNeeds() async throws {
        let h = try REAPIHarness()
        let r = try await h.call("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", [Build_Bazel_Remote_Execution_V2_GetCapabilitiesRequest()],
                                 as: Build_Bazel_Remote_Execution_V2_ServerCapabilities.self)
        let c = try #require(r.messages.first)
        #expect(c.cacheCapabilities.digestFunctions == [.sha256])
        #expect(c.cacheCapabilities.actionCacheUpdateCapabilities.updateEnabled)
        #expect(c.cacheCapabilities.maxBatchTotalSizeBytes > 0)
        #expect(c.lowApiVersion.major == 2 && c.highApiVersion.major == 2)
        let reader = try await h.call("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", [Build_Bazel_Remote_Execution_V2_GetCapabilitiesRequest()],
                                      role: .reader, as: Build_Bazel_Remote_Execution_V2_ServerCapabilities.self)
        #expect(reader.messages.first?.cacheCapabilities.actionCacheUpdateCapabilities.updateEnabled == false)
    }

    @Test func findMissingNeverMissesTheEmptyBlob() async throws {
        let h = try REAPIHarness()
        let present = try await h.put(Array("present".utf8))
        let absent = v2(Array("absent".utf8))
        var req = Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest()
        req.instanceName = "main"
        req.blobDigests = [present, absent, v2([])]
        let r = try await h.call(CAS + "FindMissingBlobs", [req], as: Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse.self)
        #expect(r.code == 0)
        #expect(r.messages.first?.missingBlobDigests == [absent])

        req.blobDigests = [V2.with { $0.hash = "../etc/passwd"; $0.sizeBytes = 1 }]
        let bad = try await h.call(CAS + "FindMissingBlobs", [req], as: Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse.self)
        #expect(bad.code == GRPCStatus.Code.invalidArgument.rawValue)
    }

    @Test func batchUpdateAndReadReportPerBlobStatus() async throws {
        let h = try REAPIHarness()
        let good = Array("good blob".utf8)
        var req = Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest()
        req.requests = [
            .with { $0.digest = v2(good); $0.data = Data(good) },
            .with { $0.digest = v2(Array("other".utf8)); $0.data = Data("tampered".utf8) },
        ]
        let r = try await h.call(CAS + "BatchUpdateBlobs", [req], as: Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse.self)
        #expect(r.code == 0)
        #expect(r.messages.first?.responses.map(\.status.code) == [0, Int32(GRPCStatus.Code.invalidArgument.rawValue)])
        #expect(h.store.contains(Digest(hash: SHA256.hex(good), size: Int64(good.count))!))

        let denied = try await h.call(CAS + "BatchUpdateBlobs", [req], role: .reader, as: Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse.self)
        #expect(denied.code == GRPCStatus.Code.permissionDenied.rawValue)

        var read = Build_Bazel_Remote_Execution_V2_BatchReadBlobsRequest()
        read.digests = [v2(good), v2(Array("nope".utf8))]
        let rr = try await h.call(CAS + "BatchReadBlobs", [read], role: .reader, as: Build_Bazel_Remote_Execution_V2_BatchReadBlobsResponse.self)
        let resps = try #require(rr.messages.first).responses
        #expect(resps[0].status.code == 0 && resps[0].data == Data(good))
        #expect(resps[1].status.code == Int32(GRPCStatus.Code.notFound.rawValue))
    }

    @Test func actionCacheHitsOnlyWhenEveryReferenceIsPresent() async throws {
        let h = try REAPIHarness()
        let out1 = Array("output one".utf8), out2 = Array("output two in a dir".utf8), stdout = Array("log".utf8)
        let d1 = try await h.put(out1)
        _ = try await h.put(stdout)
        var tree = Build_Bazel_Remote_Execution_V2_Tree()
        tree.root.files = [.with { $0.name = "f"; $0.digest = v2(out2) }]
        let treeDigest = try await h.put(try tree.serializedBytes())
        var result = Build_Bazel_Remote_Execution_V2_ActionResult()
        result.outputFiles = [.with { $0.path = "out/a"; $0.digest = d1 }]
        result.outputDirectories = [.with { $0.path = "out/d"; $0.treeDigest = treeDigest }]
        result.stdoutDigest = v2(stdout)
        let action = v2(Array("action".utf8))
        let update = Build_Bazel_Remote_Execution_V2_UpdateActionResultRequest.with { $0.actionDigest = action; $0.actionResult = result }
        let u = try await h.call(AC + "UpdateActionResult", [update], as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        #expect(u.code == 0)
        let get = Build_Bazel_Remote_Execution_V2_GetActionResultRequest.with { $0.actionDigest = action }
        // out2 (inside the output directory's tree) is missing: no hit.
        let miss = try await h.call(AC + "GetActionResult", [get], as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        #expect(miss.code == GRPCStatus.Code.notFound.rawValue)
        #expect(miss.message.contains(SHA256.hex(out2)))
        _ = try await h.put(out2)
        let hit = try await h.call(AC + "GetActionResult", [get], as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        #expect(hit.code == 0)
        #expect(hit.messages.first == result)

        let readerUpdate = try await h.call(AC + "UpdateActionResult", [update], role: .reader, as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        #expect(readerUpdate.code == GRPCStatus.Code.permissionDenied.rawValue)
        let unknown = try await h.call(AC + "GetActionResult", [Build_Bazel_Remote_Execution_V2_GetActionResultRequest.with { $0.actionDigest = v2([1]) }],
                                       as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
        #expect(unknown.code == GRPCStatus.Code.notFound.rawValue)
    }

    @Test func getTreeIsPaginated() async throws {
        let h = try REAPIHarness()
        var leaves: [Build_Bazel_Remote_Execution_V2_DirectoryNode] = []
        for i in 0..<5 {
            var d = Build_Bazel_Remote_Execution_V2_Directory()
            d.files = [.with { $0.name = "f\(i)"; $0.digest = v2([UInt8(i)]) }]
            let dd = try await h.put(try d.serializedBytes())
            leaves.append(.with { $0.name = "d\(i)"; $0.digest = dd })
        }
        var root = Build_Bazel_Remote_Execution_V2_Directory()
        root.directories = leaves
        let rootDigest = try await h.put(try root.serializedBytes())
        var all: [Build_Bazel_Remote_Execution_V2_Directory] = []
        var token = ""
        var pages = 0
        repeat {
            let req = Build_Bazel_Remote_Execution_V2_GetTreeRequest.with { $0.rootDigest = rootDigest; $0.pageSize = 2; $0.pageToken = token }
            let r = try await h.call(CAS + "GetTree", [req], as: Build_Bazel_Remote_Execution_V2_GetTreeResponse.self)
            #expect(r.code == 0)
            let page = try #require(r.messages.first)
            #expect(page.directories.count <= 2)
            all += page.directories
            token = page.nextPageToken
            pages += 1
        } while !token.isEmpty && pages < 10
        #expect(all.count == 6)
        #expect(pages == 3)
        #expect(all.first == root)
    }

    @Test("GetTree over a client-sized tree reads only what the page needs, and a 20,000-entry directory of missing children is walked once")
    func getTreeWorkIsBoundedByThePage() async throws {
        let h = try REAPIHarness()
        var children: [Build_Bazel_Remote_Execution_V2_DirectoryNode] = []
        for i in 0..<200 {
            var d = Build_Bazel_Remote_Execution_V2_Directory()
            d.files = [.with { $0.name = "f\(i)"; $0.digest = v2(Array("\(i)".utf8)) }]
            let dd = try await h.put(try d.serializedBytes())
            children.append(.with { $0.name = "d\(i)"; $0.digest = dd })
        }
        var root = Build_Bazel_Remote_Execution_V2_Directory()
        root.directories = children
        let rootDigest = try await h.put(try root.serializedBytes())
        // Page 3 of 10: offset 20 → at most offset + page + 1 directories are read (plus the root check).
        let lookups = h.store.stats.hits + h.store.stats.misses
        let req = Build_Bazel_Remote_Execution_V2_GetTreeRequest.with { $0.rootDigest = rootDigest; $0.pageSize = 10; $0.pageToken = "20" }
        let r = try await h.call(CAS + "GetTree", [req], as: Build_Bazel_Remote_Execution_V2_GetTreeResponse.self)
        #expect(r.code == 0)
        let page = try #require(r.messages.first)
        #expect(page.directories.count == 10 && page.nextPageToken == "30")
        #expect(page.directories.first?.files.first?.name == "f19")
        let read = h.store.stats.hits + h.store.stats.misses - lookups
        #expect(read <= 1 + 31, "GetTree read \(read) blobs for one page of 10 at offset 20")

        // 20,000 subdirectory entries whose blobs do not exist: every one is looked up once and
        // skipped (the walk is linear), and the answer is the root alone.
        var wide = Build_Bazel_Remote_Execution_V2_Directory()
        wide.directories = (0..<20_000).map { i in .with { $0.name = "m\(i)"; $0.digest = v2(Array("missing \(i)".utf8)) } }
        let wideDigest = try await h.put(try wide.serializedBytes())
        let before = h.store.stats.hits + h.store.stats.misses
        let w = try await h.call(CAS + "GetTree", [Build_Bazel_Remote_Execution_V2_GetTreeRequest.with { $0.rootDigest = wideDigest }],
                                 as: Build_Bazel_Remote_Execution_V2_GetTreeResponse.self)
        #expect(w.code == 0 && w.messages.first?.directories.count == 1 && w.messages.first?.nextPageToken == "")
        #expect(h.store.stats.hits + h.store.stats.misses - before == 20_002)
    }

    func writeRequests(_ data: [UInt8], resource: String, chunk: Int, from: Int = 0, finish: Bool = true) -> [Google_Bytestream_WriteRequest] {
        var out: [Google_Bytestream_WriteRequest] = []
        var off = from
        while off < data.count || out.isEmpty {
            let end = min(data.count, off + chunk)
            out.append(.with {
                $0.resourceName = out.isEmpty ? resource : ""
                $0.writeOffset = Int64(off)
                $0.data = Data(data[off..<end])
                $0.finishWrite = finish && end == data.count
            })
            off = end
            if off >= data.count { break }
        }
        return out
    }

    @Test func byteStreamWriteReadWithOffsetsAndLimits() async throws {
        let h = try REAPIHarness()
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let d = v2(data)
        let resource = "main/uploads/\(UUID())/blobs/\(d.hash)/\(d.sizeBytes)"
        let w = try await h.call(BS + "Write", writeRequests(data, resource: resource, chunk: 16 * 1024), as: Google_Bytestream_WriteResponse.self)
        #expect(w.code == 0)
        #expect(w.messages.first?.committedSize == Int64(data.count))

        let read = Google_Bytestream_ReadRequest.with { $0.resourceName = "main/blobs/\(d.hash)/\(d.sizeBytes)"; $0.readOffset = 1000; $0.readLimit = 200_000 }
        let r = try await h.call(BS + "Read", [read], role: .reader, as: Google_Bytestream_ReadResponse.self)
        #expect(r.code == 0)
        #expect(r.messages.count > 1)   // chunked
        #expect(r.messages.reduce(Data()) { $0 + $1.data } == Data(data[1000..<201_000]))

        let beyond = Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/\(d.hash)/\(d.sizeBytes)"; $0.readOffset = Int64(data.count + 1) }
        #expect(try await h.call(BS + "Read", [beyond], as: Google_Bytestream_ReadResponse.self).code == GRPCStatus.Code.outOfRange.rawValue)
        let missing = Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/\(v2([9]).hash)/1" }
        #expect(try await h.call(BS + "Read", [missing], as: Google_Bytestream_ReadResponse.self).code == GRPCStatus.Code.notFound.rawValue)
        let malformed = Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/xyz/1" }
        #expect(try await h.call(BS + "Read", [malformed], as: Google_Bytestream_ReadResponse.self).code == GRPCStatus.Code.invalidArgument.rawValue)

        // Already present: early return with the full size.
        let again = try await h.call(BS + "Write", writeRequests(data, resource: "uploads/\(UUID())/blobs/\(d.hash)/\(d.sizeBytes)", chunk: 1 << 20), as: Google_Bytestream_WriteResponse.self)
        #expect(again.messages.first?.committedSize == Int64(data.count))
        // Wrong content: INVALID_ARGUMENT and nothing stored.
        let other = Array("not what the digest says".utf8)
        let fake = V2.with { $0.hash = v2(Array("x".utf8)).hash; $0.sizeBytes = Int64(other.count) }
        let wrong = try await h.call(BS + "Write", writeRequests(other, resource: "uploads/u/blobs/\(fake.hash)/\(fake.sizeBytes)", chunk: 8), as: Google_Bytestream_WriteResponse.self)
        #expect(wrong.code == GRPCStatus.Code.invalidArgument.rawValue)
        #expect(h.store.size(of: fake.hash) == nil)
    }

    @Test func byteStreamWriteResumesAfterABrokenStream() async throws {
        let h = try REAPIHarness()
        let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let d = v2(data)
        let resource = "uploads/\(UUID())/blobs/\(d.hash)/\(d.sizeBytes)"
        // First attempt: 40,000 bytes, then the stream breaks (client went away).
        let body = HTTPInboundBody()
        for m in writeRequests(Array(data[0..<40_000]), resource: resource, chunk: 10_000, finish: false) {
            body.append(try GRPCFraming.frame(m))
        }
        let call = Task { try await h.call(BS + "Write", body: body, as: Google_Bytestream_WriteResponse.self) }
        // Let the service take what arrived, then the stream breaks (RST_STREAM from the client).
        for _ in 0..<500 where body.bufferedBytes > 0 { try await Task.sleep(for: .milliseconds(2)) }
        #expect(body.bufferedBytes == 0)
        body.fail(HTTPTransportError.streamReset(errorCode: 8))
        let broken = try await call.value
        #expect(broken.code == GRPCStatus.Code.cancelled.rawValue)
        #expect(h.store.size(of: d.hash) == nil)   // nothing partial visible

        let q = try await h.call(BS + "QueryWriteStatus", [Google_Bytestream_QueryWriteStatusRequest.with { $0.resourceName = resource }],
                                 as: Google_Bytestream_QueryWriteStatusResponse.self)
        #expect(q.messages.first?.committedSize == 40_000)
        #expect(q.messages.first?.complete == false)

        var rest = writeRequests(data, resource: resource, chunk: 10_000, from: 40_000)
        rest[0].resourceName = resource
        let done = try await h.call(BS + "Write", rest, as: Google_Bytestream_WriteResponse.self)
        #expect(done.code == 0)
        #expect(done.messages.first?.committedSize == Int64(data.count))
        #expect(try await h.store.readAll(hash: d.hash) == data)
        let q2 = try await h.call(BS + "QueryWriteStatus", [Google_Bytestream_QueryWriteStatusRequest.with { $0.resourceName = resource }],
                                  as: Google_Bytestream_QueryWriteStatusResponse.self)
        #expect(q2.messages.first?.complete == true)
    }

    @Test func storeFullIsResourceExhausted() async throws {
        let h = try REAPIHarness(maxBytes: 1000)
        let big = [UInt8](repeating: 3, count: 2000)
        let d = v2(big)
        let w = try await h.call(BS + "Write", writeRequests(big, resource: "uploads/u/blobs/\(d.hash)/\(d.sizeBytes)", chunk: 500), as: Google_Bytestream_WriteResponse.self)
        #expect(w.code == GRPCStatus.Code.resourceExhausted.rawValue)
    }
}
