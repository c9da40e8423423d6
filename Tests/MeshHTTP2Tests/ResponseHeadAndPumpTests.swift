import MeshHTTP
import NIOCore
import Synchronization
import Testing

/// A file body from memory that counts its closes (and can be told to fail or to map).
final class MemoryFile: FileBodySource, @unchecked Sendable {
    let bytes: [UInt8]
    let start: Int64
    let length: Int64
    let failReads: Bool
    let mappable: Bool
    let closes = Mutex(0)

    init(_ bytes: [UInt8], start: Int64 = 0, failReads: Bool = false, mappable: Bool = false) {
        self.bytes = bytes
        self.start = start
        self.length = Int64(bytes.count) - start
        self.failReads = failReads
        self.mappable = mappable
    }

    func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        if failReads { throw HTTPTransportError.connectionClosed }
        let n = min(buffer.count, bytes.count - Int(position))
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(position)..<Int(position) + n])) }
        return n
    }

    func mappedBytes(at position: Int64, max: Int) -> UnsafeRawBufferPointer? {
        guard mappable else { return nil }
        return bytes.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[Int(position)..<Int(position) + min(max, bytes.count - Int(position))]) }
    }

    func close() { closes.withLock { $0 += 1 } }
}

@Suite struct ResponseHeadTests {
    @Test func framesPutStatusFirstDropHopByHopAndDeclareTheKnownLength() {
        let r = HTTPResponse(status: 200, headers: ["connection": "close", "x-a": "b", "transfer-encoding": "chunked"], body: .bytes(ByteBuffer(string: "hello")))
        let h = ResponseHead(r, framing: .frames)
        #expect(h.fields.map(\.name) == [":status", "x-a", "content-length"])
        #expect(h.fields.map(\.value) == ["200", "b", "5"])
        let given = ResponseHead(HTTPResponse(status: 200, headers: ["content-length": "9"], body: .stream(HTTPOutboundStream())), framing: .frames)
        #expect(given.fields.map(\.value) == ["200", "9"])
        let noContent = ResponseHead(HTTPResponse(status: 204), framing: .frames)
        #expect(noContent.fields.map(\.name) == [":status"])
    }

    @Test func http1TakesTheBodysLengthAndChunksAnUnknownOne() {
        let stream = ResponseHead(HTTPResponse(status: 200, headers: ["content-length": "9"], body: .stream(HTTPOutboundStream())), framing: .http1(isHead: false))
        #expect(stream.lengthUnknown)
        #expect(stream.fields.isEmpty)
        let head = ResponseHead(HTTPResponse(status: 200, headers: ["content-length": "9"]), framing: .http1(isHead: true))
        #expect(head.fields.map(\.value) == ["9"])
        #expect(!head.lengthUnknown)
        let bytes = ResponseHead(HTTPResponse(status: 404, headers: ["x": "y"], body: .bytes(ByteBuffer(string: "no"))), framing: .http1(isHead: false))
        #expect(bytes.fields.map(\.name) == ["x", "content-length"])
        #expect(bytes.fields.last?.value == "2")
        #expect(ResponseHead(HTTPResponse(status: 304), framing: .http1(isHead: false)).fields.isEmpty)
    }
}

@Suite struct OutboundBodyPumpTests {
    let allocator = ByteBufferAllocator()

    @Test func bytesComeInPiecesTheLastOneMarked() {
        var p = OutboundBodyPump(.bytes(ByteBuffer(string: "abcdefg")), trailers: ["t": "1"])
        guard case .buffer(let a, false) = p.next(max: 4, allocator: allocator) else { Issue.record("first"); return }
        guard case .buffer(let b, true) = p.next(max: 4, allocator: allocator) else { Issue.record("second"); return }
        #expect(String(buffer: a) + String(buffer: b) == "abcdefg")
        guard case .end = p.next(max: 4, allocator: allocator) else { Issue.record("end"); return }
        #expect(p.trailers?["t"] == "1")
        #expect(!p.isEmpty)
        #expect(OutboundBodyPump(.bytes(ByteBuffer())).isEmpty)
    }

    @Test func aFileIsCopiedFromItsStartAndClosedOnceAtItsEnd() {
        let f = MemoryFile(Array("0123456789".utf8), start: 2)
        var p = OutboundBodyPump(.file(f))
        var out = [UInt8](repeating: 0, count: 5)
        let first = out.withUnsafeMutableBytes { p.copy(into: $0) }
        guard case .bytes(5, last: false) = first else { Issue.record("\(first)"); return }
        #expect(String(decoding: out, as: UTF8.self) == "23456")
        let second = out.withUnsafeMutableBytes { p.copy(into: $0) }
        guard case .bytes(3, last: true) = second else { Issue.record("\(second)"); return }
        #expect(f.closes.withLock { $0 } == 1)
        p.close(HTTPTransportError.connectionClosed)
        #expect(f.closes.withLock { $0 } == 1)
        #expect(p.isClosed)
    }

    @Test func aFileThatMapsIsHandedOutFromTheMappingAndStaysOpen() {
        let f = MemoryFile(Array("0123456789".utf8), mappable: true)
        var p = OutboundBodyPump(.file(f))
        guard case .mapped(let m, false) = p.next(max: 4, mappedMax: 6, allocator: allocator) else { Issue.record("first"); return }
        #expect(m.count == 6)
        guard case .mapped(_, true) = p.next(max: 4, mappedMax: 6, allocator: allocator) else { Issue.record("second"); return }
        guard case .end = p.next(max: 4, mappedMax: 6, allocator: allocator) else { Issue.record("end"); return }
        #expect(f.closes.withLock { $0 } == 0)
        p.close(HTTPTransportError.connectionClosed)
        #expect(f.closes.withLock { $0 } == 1)
    }

    @Test func aFailingFileFailsTheBody() {
        var p = OutboundBodyPump(.file(MemoryFile([1, 2, 3], failReads: true)))
        guard case .failed(let why?) = p.next(max: 4, allocator: allocator) else { Issue.record("next"); return }
        #expect(why == "file body read failed")
        var q = OutboundBodyPump(.file(MemoryFile([1, 2, 3], failReads: true)))
        var out = [UInt8](repeating: 0, count: 4)
        guard case .failed = out.withUnsafeMutableBytes({ q.copy(into: $0) }) else { Issue.record("copy"); return }
    }

    @Test func aStreamsTrailersReplaceTheResponsesAndCloseCancelsItsProducer() async throws {
        let s = HTTPOutboundStream()
        var p = OutboundBodyPump(.stream(s), trailers: ["grpc-status": "2"])
        #expect(p.stream === s)
        guard case .wouldBlock = p.next(max: 4, allocator: allocator) else { Issue.record("block"); return }
        try await s.write(ByteBuffer(string: "ab"))
        s.finish(trailers: ["grpc-status": "0"])
        guard case .buffer(let b, false) = p.next(max: 4, allocator: allocator) else { Issue.record("data"); return }
        #expect(String(buffer: b) == "ab")
        guard case .end = p.next(max: 4, allocator: allocator) else { Issue.record("end"); return }
        #expect(p.trailers?["grpc-status"] == "0")
        #expect(p.isClosed)

        let t = HTTPOutboundStream()
        var q = OutboundBodyPump(.stream(t))
        q.close(HTTPTransportError.connectionClosed)
        await #expect(throws: HTTPTransportError.connectionClosed) { try await t.write(ByteBuffer(string: "x")) }
    }
}
