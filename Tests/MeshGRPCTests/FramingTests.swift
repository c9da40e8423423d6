import MeshGRPC
import MeshHTTP
import NIOCore
import SwiftProtobuf
import Testing

@Suite struct FramingTests {
    func frame(_ payload: [UInt8], flag: UInt8 = 0) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(flag)
        b.writeInteger(UInt32(payload.count))
        b.writeBytes(payload)
        return b
    }

    @Test func splitAcrossChunks() throws {
        var all = frame([1, 2, 3, 4, 5, 6, 7])
        var r = GRPCMessageReader()
        // Feed one byte at a time: nothing until the last byte.
        while all.readableBytes > 1 {
            r.append(all.readSlice(length: 1)!)
            #expect(try r.next() == nil)
        }
        r.append(all)
        #expect(try r.next().map { Array($0.readableBytesView) } == [1, 2, 3, 4, 5, 6, 7])
        #expect(try r.next() == nil)
        try r.checkComplete()
    }

    @Test func mergedMessagesInOneChunk() throws {
        var b = frame([9])
        var second = frame([])
        var third = frame(Array(repeating: 7, count: 300))
        b.writeBuffer(&second)
        b.writeBuffer(&third)
        var r = GRPCMessageReader()
        r.append(b)
        #expect(try r.next().map { Array($0.readableBytesView) } == [9])
        #expect(try r.next()?.readableBytes == 0)
        #expect(try r.next()?.readableBytes == 300)
        #expect(try r.next() == nil)
    }

    @Test func oversizeIsResourceExhausted() throws {
        var r = GRPCMessageReader(maxMessageSize: 10)
        var b = ByteBuffer()
        b.writeInteger(UInt8(0))
        b.writeInteger(UInt32(11))
        r.append(b)
        #expect(throws: GRPCStatus(.resourceExhausted, "message of 11 bytes exceeds the limit of 10 bytes")) { try r.next() }
    }

    @Test func compressionFlagsAreRejected() {
        var r1 = GRPCMessageReader()
        r1.append(frame([1], flag: 1))
        #expect { try r1.next() } throws: { ($0 as? GRPCStatus)?.code == .internalError }
        var r2 = GRPCMessageReader()
        r2.append(frame([1], flag: 7))
        #expect { try r2.next() } throws: { ($0 as? GRPCStatus)?.code == .internalError }
    }

    @Test func truncatedStreamIsDetected() {
        var r = GRPCMessageReader()
        var b = frame([1, 2, 3])
        r.append(b.readSlice(length: 6)!)
        #expect(throws: GRPCStatus.self) { try r.checkComplete() }
    }

    @Test func timeoutsAndMessages() {
        #expect(GRPCRouter.parseTimeout("100m") == .milliseconds(100))
        #expect(GRPCRouter.parseTimeout("2S") == .seconds(2))
        #expect(GRPCRouter.parseTimeout("1H") == .seconds(3600))
        #expect(GRPCRouter.parseTimeout("5x") == nil)
        #expect(GRPCRouter.parseTimeout("123456789m") == nil)   // more than 8 digits
        let m = "not found: ä 100% /x"
        #expect(GRPCStatus.percentDecode(GRPCStatus.percentEncode(m)) == m)
        #expect(!GRPCStatus.percentEncode(m).contains("ä"))
    }
}

/// The router end to end, in memory: a request with a body, a response with trailers.
@Suite struct RouterTests {
    static func request(_ path: String, body: ByteBuffer, headers: HTTPHeaders = ["content-type": "application/grpc"], role: PeerRole = .client) -> HTTPServerRequest {
        HTTPServerRequest(head: HTTPRequestHead(method: "POST", path: path, headers: headers), body: .complete(body),
                          peer: PeerIdentity(commonName: "t", role: role, authenticated: true), remoteAddress: nil)
    }

    static func status(_ r: HTTPResponse) -> String? { r.trailers?["grpc-status"] ?? r.headers["grpc-status"] }

    @Test func unaryEchoAndErrors() async throws {
        let router = GRPCRouter()
        router.unary("/t.S/Echo") { (req: Google_Protobuf_StringValue, _) in
            if req.value == "fail" { throw GRPCStatus(.notFound, "no such thing") }
            return Google_Protobuf_StringValue(req.value + "!")
        }
        let ok = await router.handle(Self.request("/t.S/Echo", body: try GRPCFraming.frame(Google_Protobuf_StringValue("hi"))))
        #expect(ok.status == 200)
        #expect(Self.status(ok) == "0")
        guard case .bytes(let b) = ok.body else { Issue.record("expected bytes"); return }
        var r = GRPCMessageReader()
        r.append(b)
        #expect(try GRPCMessageReader.decode(Google_Protobuf_StringValue.self, from: try #require(try r.next())).value == "hi!")

        let nf = await router.handle(Self.request("/t.S/Echo", body: try GRPCFraming.frame(Google_Protobuf_StringValue("fail"))))
        #expect(Self.status(nf) == "5")
        #expect(nf.headers["grpc-message"] == "no such thing")

        let unknown = await router.handle(Self.request("/t.S/Nope", body: ByteBuffer()))
        #expect(Self.status(unknown) == "12")

        // Undecodable message: INVALID_ARGUMENT, and the router keeps working.
        var garbage = ByteBuffer()
        GRPCFraming.frame([0xFF, 0xFF, 0xFF], into: &garbage)
        let bad = await router.handle(Self.request("/t.S/Echo", body: garbage))
        #expect(Self.status(bad) == "3")

        let gz = await router.handle(Self.request("/t.S/Echo", body: ByteBuffer(), headers: ["content-type": "application/grpc", "grpc-encoding": "gzip"]))
        #expect(Self.status(gz) == "12")
        let notGRPC = await router.handle(Self.request("/t.S/Echo", body: ByteBuffer(), headers: ["content-type": "text/plain"]))
        #expect(notGRPC.status == 415)
    }

    @Test func deadlineIsHonoured() async throws {
        let router = GRPCRouter()
        router.unary("/t.S/Slow") { (req: Google_Protobuf_StringValue, _) in
            try await Task.sleep(for: .seconds(30))
            return req
        }
        let r = await router.handle(Self.request("/t.S/Slow", body: try GRPCFraming.frame(Google_Protobuf_StringValue("x")),
                                                 headers: ["content-type": "application/grpc", "grpc-timeout": "50m"]))
        #expect(Self.status(r) == "4")
    }

    @Test func clientStreamingSumsMessages() async throws {
        let router = GRPCRouter()
        router.clientStreaming("/t.S/Sum") { (stream: GRPCRequestStream<Google_Protobuf_Int64Value>, _) in
            var total: Int64 = 0
            for try await m in stream { total += m.value }
            return Google_Protobuf_Int64Value(total)
        }
        var body = ByteBuffer()
        for i in 1...10 {
            var f = try GRPCFraming.frame(Google_Protobuf_Int64Value(Int64(i)))
            body.writeBuffer(&f)
        }
        let r = await router.handle(Self.request("/t.S/Sum", body: body))
        guard case .bytes(let b) = r.body else { Issue.record("expected bytes"); return }
        var rd = GRPCMessageReader()
        rd.append(b)
        #expect(try GRPCMessageReader.decode(Google_Protobuf_Int64Value.self, from: try #require(try rd.next())).value == 55)
    }
}
