import MeshHTTP
import NIOCore
import Synchronization
import Testing
@testable import MeshHTTP2

final class ResumeLog: Sendable {
    let streams = Mutex<[Int32]>([])
}

/// Records what a session reports.
final class Recorder: NGHTTP2SessionDelegate {
    let resumes = ResumeLog()
    func makeResumeCallback(stream: Int32) -> @Sendable () -> Void {
        let log = resumes
        return { log.streams.withLock { $0.append(stream) } }
    }

    var headers: [Int32: [(name: String, value: String)]] = [:]
    var trailers: [Int32: [(name: String, value: String)]] = [:]
    var data: [Int32: Int] = [:]
    var bytes: [Int32: [UInt8]] = [:]
    var ended: Set<Int32> = []
    var closed: [Int32: UInt32] = [:]
    var goaways: [(Int32, UInt32)] = []
    var sentEnd: Set<Int32> = []

    func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool) {
        if isTrailers { trailers[stream] = headers } else { self.headers[stream] = headers }
    }
    func dataReceived(stream: Int32, data: ByteBuffer) {
        self.data[stream, default: 0] += data.readableBytes
        bytes[stream, default: []].append(contentsOf: data.readableBytesView)
    }
    func endOfStreamReceived(stream: Int32) { ended.insert(stream) }
    func streamClosed(stream: Int32, errorCode: UInt32) { closed[stream] = errorCode }
    func goawayReceived(lastStreamID: Int32, errorCode: UInt32) { goaways.append((lastStreamID, errorCode)) }
    func endOfStreamSent(stream: Int32) { sentEnd.insert(stream) }
    var tooLarge: [(stream: Int32, bytes: Int, closing: Bool)] = []
    func headerListTooLarge(stream: Int32, bytes: Int, isTrailers: Bool, endStream: Bool, closing: Bool) {
        tooLarge.append((stream, bytes, closing))
    }
}

/// A client and a server session wired back to back in memory.
final class Pair {
    let clientEvents = Recorder()
    let serverEvents = Recorder()
    let client: NGHTTP2Session
    let server: NGHTTP2Session

    init(serverWindow: UInt32 = 64 * 1024) {
        client = NGHTTP2Session(role: .client, settings: .init(initialWindowSize: 1 << 20), delegate: clientEvents)
        server = NGHTTP2Session(role: .server, settings: .init(maxConcurrentStreams: 4, initialWindowSize: serverWindow, connectionWindowSize: 1 << 24), delegate: serverEvents)
    }

    /// Move bytes both ways until neither side has anything to send.
    func pump() throws {
        for _ in 0..<10_000 {
            var a = ByteBuffer(), b = ByteBuffer()
            _ = try client.produce(into: &a, limit: 1 << 20)
            if a.readableBytes > 0 { try server.receive(a) }
            _ = try server.produce(into: &b, limit: 1 << 20)
            if b.readableBytes > 0 { try client.receive(b) }
            if a.readableBytes == 0 && b.readableBytes == 0 { return }
        }
        Issue.record("pump did not settle")
    }
}

@Suite struct NGHTTP2SessionTests {
    @Test func requestAndResponseWithBodies() throws {
        let p = Pair()
        let payload = [UInt8]((0..<10_000).map { UInt8($0 % 251) })
        let id = try p.client.submitRequest(head: HTTPRequestHead(method: "PUT", path: "/cas/x", authority: "n"), body: .bytes(ByteBuffer(bytes: payload)))
        try p.pump()
        let h = try #require(p.serverEvents.headers[id])
        #expect(h.contains { $0 == (":method", "PUT") })
        #expect(h.contains { $0 == (":path", "/cas/x") })
        #expect(p.serverEvents.bytes[id] == payload)
        #expect(p.serverEvents.ended.contains(id))

        #expect(p.server.submitResponse(stream: id, status: 201, headers: ["x-a": "b"], body: .bytes(ByteBuffer(string: "stored"))))
        try p.pump()
        let rh = try #require(p.clientEvents.headers[id])
        #expect(rh.contains { $0 == (":status", "201") })
        #expect(rh.contains { $0 == ("x-a", "b") })
        #expect(p.clientEvents.bytes[id] == Array("stored".utf8))
        #expect(p.clientEvents.closed[id] == 0)
    }

    @Test func streamWindowOpensOnlyAsConsumerTakesBytes() throws {
        let window = 64 * 1024
        let p = Pair(serverWindow: UInt32(window))
        let big = [UInt8](repeating: 7, count: 1 << 20)
        let id = try p.client.submitRequest(head: HTTPRequestHead(method: "PUT", path: "/cas/y", authority: "n"), body: .bytes(ByteBuffer(bytes: big)))
        try p.pump()
        // Nothing consumed yet: the sender is held at the initial stream window.
        #expect(p.serverEvents.data[id] == window)
        // nghttp2 sends WINDOW_UPDATE once half the window is consumed; never more than consumed + window arrives.
        var consumed = 0
        while p.serverEvents.data[id, default: 0] < big.count {
            let before = p.serverEvents.data[id, default: 0]
            p.server.consumed(stream: id, bytes: window / 2)
            consumed += window / 2
            try p.pump()
            #expect(p.serverEvents.data[id, default: 0] > before)
            #expect(p.serverEvents.data[id, default: 0] <= consumed + window)
        }
        #expect(p.serverEvents.ended.contains(id))
    }

    @Test func trailersFollowBody() throws {
        let p = Pair()
        let id = try p.client.submitRequest(head: HTTPRequestHead(method: "POST", path: "/g", authority: "n"), body: .empty)
        try p.pump()
        #expect(p.server.submitResponse(stream: id, status: 200, headers: [:], body: .bytes(ByteBuffer(string: "msg")), trailers: ["grpc-status": "0"]))
        try p.pump()
        #expect(p.clientEvents.bytes[id] == Array("msg".utf8))
        #expect(p.clientEvents.trailers[id]?.contains { $0 == ("grpc-status", "0") } == true)
        #expect(p.clientEvents.ended.contains(id))
    }

    @Test func streamingBodyDefersUntilProducerWrites() async throws {
        let p = Pair()
        let id = try p.client.submitRequest(head: HTTPRequestHead(method: "POST", path: "/s", authority: "n"), body: .empty)
        try p.pump()
        let out = HTTPOutboundStream()
        #expect(p.server.submitResponse(stream: id, status: 200, headers: [:], body: .stream(out)))
        try p.pump()
        #expect(p.clientEvents.headers[id] != nil)
        #expect(p.clientEvents.data[id] == nil)   // deferred: nothing to send yet
        try await out.write(ByteBuffer(string: "one,"))
        #expect(p.serverEvents.resumes.streams.withLock { $0 }.contains(id))
        p.server.resume(stream: id)
        try p.pump()
        #expect(p.clientEvents.bytes[id] == Array("one,".utf8))
        try await out.write(ByteBuffer(string: "two"))
        out.finish(trailers: ["grpc-status": "0"])
        p.server.resume(stream: id)
        try p.pump()
        #expect(p.clientEvents.bytes[id] == Array("one,two".utf8))
        #expect(p.clientEvents.trailers[id]?.contains { $0 == ("grpc-status", "0") } == true)
        #expect(p.clientEvents.closed[id] == 0)
    }

    @Test func streamingProducerIsHeldAtWatermarkAndFailsWhenReceiverGoes() async throws {
        let out = HTTPOutboundStream(highWatermark: 8)
        let producer = Task {
            try await out.write(ByteBuffer(repeating: 1, count: 16))   // over the watermark: waits
            return "returned"
        }
        try await Task.sleep(for: .milliseconds(30))
        guard case .data(let b) = out.read(max: 10) else { Issue.record("expected data"); return }
        #expect(b.readableBytes == 10)
        #expect(try await producer.value == "returned")   // 6 ≤ 8 buffered: released
        out.cancel(HTTPTransportError.streamReset(errorCode: 8))
        await #expect(throws: HTTPTransportError.streamReset(errorCode: 8)) { try await out.write(ByteBuffer(string: "x")) }
    }

    @Test func gracefulGoawayTwoPhases() throws {
        let p = Pair()
        let first = try p.client.submitRequest(head: HTTPRequestHead(method: "GET", path: "/a", authority: "n"), body: .empty)
        try p.pump()
        p.server.submitShutdownNotice()
        try p.pump()
        #expect(p.clientEvents.goaways.first?.0 == Int32.max)
        p.server.submitGoaway()
        try p.pump()
        #expect(p.clientEvents.goaways.last?.0 == first)
        // The in-flight stream still completes after the final GOAWAY.
        #expect(p.server.submitResponse(stream: first, status: 200, headers: [:], body: .bytes(ByteBuffer(string: "done"))))
        try p.pump()
        #expect(p.clientEvents.bytes[first] == Array("done".utf8))
        #expect(p.clientEvents.closed[first] == 0)
    }

    @Test func cancelResetsStream() throws {
        let p = Pair()
        let id = try p.client.submitRequest(head: HTTPRequestHead(method: "GET", path: "/slow", authority: "n"), body: .empty)
        try p.pump()
        p.client.resetStream(id, errorCode: 8)
        try p.pump()
        #expect(p.serverEvents.closed[id] == 8)
    }

    @Test func garbageInputIsAConnectionError() throws {
        let server = NGHTTP2Session(role: .server, settings: .init(), delegate: Recorder())
        #expect(throws: HTTPTransportError.self) {
            try server.receive(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        }
    }
}

@Suite("HTTP/2 header-list limit")
struct HeaderListLimitTests {
    /// 100 copies of one 2,000-byte header: HPACK indexes it once and then names it with one byte
    /// each, so the block on the wire is a few KB while it decodes to ~200 KB.
    static func bomb(_ i: Int) -> HTTPRequestHead {
        var head = HTTPRequestHead(method: "GET", path: "/cas/\(i)", authority: "n")
        let big = String(repeating: "x", count: 2000)
        for _ in 0..<100 { head.headers.add("x-bomb", big) }
        return head
    }

    @Test("a header block over the limit is counted while it decodes, its fields dropped, and reported; the third closes the connection")
    func bombIsRefused() throws {
        let p = Pair()
        var ids: [Int32] = []
        for i in 0..<2 {
            ids.append(try p.client.submitRequest(head: Self.bomb(i), body: .empty))
            try p.pump()
        }
        #expect(p.serverEvents.headers.isEmpty)
        #expect(p.serverEvents.tooLarge.map(\.stream) == ids)
        #expect(p.serverEvents.tooLarge.allSatisfy { $0.bytes > 200_000 && !$0.closing })
        #expect(p.clientEvents.goaways.isEmpty)
        // An ordinary request on the same connection still gets through.
        let ok = try p.client.submitRequest(head: HTTPRequestHead(method: "GET", path: "/cas/ok", authority: "n"), body: .empty)
        try p.pump()
        #expect(p.serverEvents.headers[ok] != nil)
        // The third oversized block: GOAWAY ENHANCE_YOUR_CALM.
        _ = try p.client.submitRequest(head: Self.bomb(3), body: .empty)
        try p.pump()
        #expect(p.serverEvents.tooLarge.last?.closing == true)
        #expect(p.clientEvents.goaways.contains { $0.1 == 0xb })
    }

    @Test("the size is counted as RFC 9113 does (name + value + 32) and memory stops at the limit")
    func blockAccounting() {
        var block = InboundHeaderBlock(limit: 100)
        let name = Array("ab".utf8), value = Array("0123456789".utf8)
        for _ in 0..<2 {
            name.withUnsafeBytes { n in value.withUnsafeBytes { v in block.add(name: n, value: v) } }
        }
        #expect(block.bytes == 88 && block.fields.count == 2 && !block.isTooLarge)
        name.withUnsafeBytes { n in value.withUnsafeBytes { v in block.add(name: n, value: v) } }
        #expect(block.bytes == 132 && block.isTooLarge && block.fields.isEmpty)
        var policy = HeaderLimitPolicy(maxRefusals: 2)
        #expect([policy.tooLarge(), policy.tooLarge(), policy.tooLarge()] == [.refuseRequest, .refuseRequest, .closeConnection])
    }
}

extension NGHTTP2Session {
    /// A response from its parts, its head built as the server handler builds it.
    func submitResponse(stream: Int32, status: Int, headers: HTTPHeaders, body: HTTPOutboundBody, trailers: HTTPHeaders? = nil) -> Bool {
        let head = ResponseHead(HTTPResponse(status: status, headers: headers, body: body, trailers: trailers), framing: .frames)
        return submitResponse(stream: stream, head: head, body: body, trailers: trailers)
    }
}
