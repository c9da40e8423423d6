// libFuzzer target: gRPC framing + REAPI request decoding, and the REAPI service request path.
//
// Input: byte 0 picks the method (below), byte 1 how the rest is split into DATA chunks
// (1…16 bytes, or all at once), the rest is the request body as it arrives on a gRPC stream
// (5-byte length-prefixed messages).
//  1. The chunks go through `GRPCMessageReader` (append/next/checkComplete) with a 64 KiB limit;
//     every complete message is decoded as each REAPI / ByteStream request type with SwiftProtobuf
//     (`GRPCMessageReader.decode` → `init(serializedBytes:)`).
//  2. The same body is handed to `REAPIService.router.handle` as a POST to the chosen method, over
//     a BlobStore in a temporary directory (the path a real request takes after the transport), and
//     the response is drained (streaming responses included).
import FuzzSupport
import BlobStore
import CacheRoutes
import Dispatch
import Foundation
import Logging
import MeshGRPC
import MeshHTTP
import MeshTLS
import NIOCore
import REAPI
import SwiftProtobuf

private let methods = [
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
    "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
    "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
    "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
    "/google.bytestream.ByteStream/Read",
    "/google.bytestream.ByteStream/Write",
]

private final class Env: @unchecked Sendable {
    let directory: String
    let store: BlobStore
    let service: REAPIService

    init() {
        directory = NSTemporaryDirectory() + "cachemesh-fuzz-grpc-\(getpid())"
        try? FileManager.default.removeItem(atPath: directory)
        let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        // Default write slots (64): ByteStream uploads the fuzzer breaks off stay parked for 5
        // minutes, each holding a slot (at most 16 are parked); with fewer slots every later
        // write would wait for them.
        let config = BlobStoreConfiguration(directory: directory, maxBytes: 8 << 20)
        store = try! BlobStore(configuration: config, logger: quiet)
        service = REAPIService(store: store, logger: quiet)
        preload(store)
        atexit_dir = directory
        atexit { if let d = atexit_dir { try? FileManager.default.removeItem(atPath: d) } }
    }
}
nonisolated(unsafe) private var atexit_dir: String?

private func hex(_ bytes: [UInt8]) -> String {
    var h = SHA256Hasher()
    h.update(bytes: bytes)
    return h.finalize()
}

/// The blobs the seed corpus refers to (corpus/make-seeds.py builds the same bytes): "hello", a
/// Directory holding it as hello.txt, and a root Directory with that one as "sub" — so every
/// input can read, find or walk them, whatever ran before it.
private func preload(_ store: BlobStore) {
    let hello = Array("hello".utf8)
    var file = Build_Bazel_Remote_Execution_V2_FileNode()
    file.name = "hello.txt"
    file.digest.hash = hex(hello)
    file.digest.sizeBytes = 5
    file.isExecutable = true
    var sub = Build_Bazel_Remote_Execution_V2_Directory()
    sub.files = [file]
    let subBytes: [UInt8] = try! sub.serializedBytes()
    var node = Build_Bazel_Remote_Execution_V2_DirectoryNode()
    node.name = "sub"
    node.digest.hash = hex(subBytes)
    node.digest.sizeBytes = Int64(subBytes.count)
    var root = Build_Bazel_Remote_Execution_V2_Directory()
    root.directories = [node]
    let rootBytes: [UInt8] = try! root.serializedBytes()
    let done = DispatchSemaphore(value: 0)
    Task {
        for blob in [hello, subBytes, rootBytes] { _ = try! await store.put(bytes: blob, hash: hex(blob)) }
        done.signal()
    }
    done.wait()
}
nonisolated(unsafe) private let env = Env()

private func decodeAll(_ message: ByteBuffer) {
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_FindMissingBlobsRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_BatchUpdateBlobsRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_BatchReadBlobsRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_GetTreeRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_GetActionResultRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_UpdateActionResultRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_GetCapabilitiesRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Build_Bazel_Remote_Execution_V2_Directory.self, from: message)
    _ = try? GRPCMessageReader.decode(Google_Bytestream_ReadRequest.self, from: message)
    _ = try? GRPCMessageReader.decode(Google_Bytestream_WriteRequest.self, from: message)
}

private func drain(_ response: HTTPResponse) async {
    switch response.body {
    case .empty, .bytes: break
    case .file(let f): f.close()
    case .stream(let s):
        var spins = 0
        loop: while true {
            switch s.read(max: 1 << 20) {
            case .data: spins = 0
            case .end, .failed: break loop
            case .wouldBlock:
                spins += 1
                if spins > 200_000 { s.cancel(HTTPTransportError.connectionClosed); break loop }  // ~10 s: a hang; -timeout reports it
                try? await Task.sleep(for: .microseconds(50))
            }
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 2 else { return 0 }
    let method = methods[Int(data[0]) % methods.count]
    let split = Int(data[1] & 0x1f)
    let bodyBytes = UnsafeBufferPointer(start: data + 2, count: size - 2)

    // 1. Framing + decoding.
    var reader = GRPCMessageReader(maxMessageSize: 64 << 10)
    var chunks: [ByteBuffer] = []
    if split == 0 || split > 16 {
        chunks = [ByteBuffer(bytes: bodyBytes)]
    } else {
        var i = 0
        while i < bodyBytes.count {
            let n = min(split, bodyBytes.count - i)
            chunks.append(ByteBuffer(bytes: UnsafeBufferPointer(rebasing: bodyBytes[i..<(i + n)])))
            i += n
        }
    }
    var framed = 0
    var failed = false
    outer: for c in chunks {
        reader.append(c)
        while true {
            do {
                guard let m = try reader.next() else { break }
                precondition(m.readableBytes <= reader.maxMessageSize)
                framed += 5 + m.readableBytes
                precondition(framed <= bodyBytes.count, "reader returned more than it was given")
                decodeAll(m)
            } catch {
                failed = true
                break outer
            }
        }
    }
    if !failed {
        let leftover = (try? reader.checkComplete()) == nil
        precondition(leftover == (framed != bodyBytes.count), "checkComplete disagrees: \(framed) of \(bodyBytes.count) framed")
    }

    // 2. The REAPI service request path.
    let head = HTTPRequestHead(method: "POST", path: method, headers: ["content-type": "application/grpc", "te": "trailers"])
    let body = HTTPInboundBody()
    for c in chunks { _ = body.append(c) }
    body.finish()
    let request = HTTPServerRequest(head: head, body: body,
                                    peer: PeerIdentity(commonName: "fuzz", role: .client, authenticated: true),
                                    remoteAddress: nil)
    let done = DispatchSemaphore(value: 0)
    let service = env.service
    Task {
        let response = await service.router.handle(request)
        await drain(response)
        done.signal()
    }
    done.wait()
    return 0
}

@main
enum FuzzMain {
    static func main() {
        runLibFuzzer { data, size in
            guard let data else { return 0 }
            return fuzz(data, size)
        }
    }
}
