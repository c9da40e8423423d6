import BlobStore
import CacheNode
import Foundation
import MeshGRPC
import MeshHTTP
import NIOCore
import REAPI
import Testing

/// Our gRPC client against the real node process over HTTP/2 + mTLS: trailers, streaming,
/// error statuses, and a connection that survives a bad message.
@Suite("gRPC REAPI over HTTP/2 with the real node", .serialized)
struct GRPCTests {
    typealias D = Build_Bazel_Remote_Execution_V2_Digest

    @Test func byteStreamAndCASThroughTheWire() async throws {
        try await withNode(maxBytes: "256M") { node in
            try await withClient(node) { client in
                let grpc = GRPCClient(transport: client.connection)
                let data = (0..<(10 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
                let hash = SHA256.hex(data)
                let digest = D.with { $0.hash = hash; $0.sizeBytes = Int64(data.count) }

                var fm = Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest()
                fm.blobDigests = [digest, D.with { $0.hash = Digest.emptyHash }]
                let missing = try await grpc.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs", fm,
                                                   as: Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse.self)
                #expect(missing.missingBlobDigests == [digest])

                // Client-streaming Write in 16 KiB chunks, as Bazel does.
                let resource = "uploads/\(UUID())/blobs/\(hash)/\(data.count)"
                var writes: [Google_Bytestream_WriteRequest] = []
                var off = 0
                while off < data.count {
                    let end = min(data.count, off + 16 * 1024)
                    writes.append(.with {
                        $0.resourceName = off == 0 ? resource : ""
                        $0.writeOffset = Int64(off)
                        $0.data = Data(data[off..<end])
                        $0.finishWrite = end == data.count
                    })
                    off = end
                }
                let w = try await grpc.clientStreaming("/google.bytestream.ByteStream/Write", writes, as: Google_Bytestream_WriteResponse.self)
                #expect(w.committedSize == Int64(data.count))

                // Server-streaming Read from an offset; the trailers carry grpc-status 0.
                let reads = try await grpc.serverStreaming("/google.bytestream.ByteStream/Read",
                                                           Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/\(hash)/\(data.count)"; $0.readOffset = 12345 },
                                                           as: Google_Bytestream_ReadResponse.self)
                #expect(reads.reduce(Data()) { $0 + $1.data } == Data(data[12345...]))

                // Errors arrive as statuses a client can act on: a cache miss is NOT_FOUND (Bazel
                // treats it as a miss; any other status would fail the build).
                do {
                    _ = try await grpc.unary("/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                                             Build_Bazel_Remote_Execution_V2_GetActionResultRequest.with { $0.actionDigest = digest },
                                             as: Build_Bazel_Remote_Execution_V2_ActionResult.self)
                    Issue.record("expected NOT_FOUND for an action never stored")
                } catch let s as GRPCStatus {
                    #expect(s.code == .notFound, "\(s)")
                }
                do {
                    _ = try await grpc.serverStreaming("/google.bytestream.ByteStream/Read",
                                                       Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/\(hash)/\(data.count)"; $0.readOffset = Int64(data.count + 1) },
                                                       as: Google_Bytestream_ReadResponse.self)
                    Issue.record("expected OUT_OF_RANGE")
                } catch let s as GRPCStatus {
                    #expect(s.code == .outOfRange)
                }

                // An undecodable message: INVALID_ARGUMENT, and the same connection keeps working.
                var garbage = ByteBuffer()
                GRPCFraming.frame([0x0A, 0xFF, 0xFF, 0xFF], into: &garbage)
                do {
                    _ = try await grpc.call("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs", body: .bytes(garbage),
                                            as: Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse.self)
                    Issue.record("expected INVALID_ARGUMENT")
                } catch let s as GRPCStatus {
                    #expect(s.code == .invalidArgument)
                }
                let again = try await grpc.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs", fm,
                                                 as: Build_Bazel_Remote_Execution_V2_FindMissingBlobsResponse.self)
                #expect(again.missingBlobDigests.isEmpty)
            }

            // A reader may not write over gRPC either.
            try await withClient(node, .reader) { reader in
                let grpc = GRPCClient(transport: reader.connection)
                do {
                    _ = try await grpc.unary("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
                                             Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest(), as: Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsResponse.self)
                    Issue.record("expected PERMISSION_DENIED")
                } catch let s as GRPCStatus {
                    #expect(s.code == .permissionDenied)
                }
            }
        }
    }
}
