// libFuzzer target: our nghttp2 server session (MeshHTTP2's internal NGHTTP2Session, @testable)
// fed raw bytes from a client, with our header-block accounting (InboundHeaderBlock, 431 policy)
// and HTTPRequestHead(fields:) on every block it delivers.
//
// Input: byte 0 picks how the rest is split into reads (1…64 bytes, or all at once) and the
// header-list limit (small or the default 64 KiB); the rest follows the client connection
// preface, which the harness sends itself. Every request gets a small response (so HPACK
// encoding, flow control and stream closing run too); DATA is consumed at once.
@testable import MeshHTTP2
import FuzzSupport
import MeshHTTP
import NIOCore

private final class Delegate: NGHTTP2SessionDelegate {
    weak var session: NGHTTP2Session?
    var open: Set<Int32> = []

    func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool) {
        let head = HTTPRequestHead(fields: headers)
        _ = head.contentLength
        guard !isTrailers, let session else { return }
        var body = ByteBuffer()
        body.writeString(head.path.prefix(32) + "\n")
        open.insert(stream)
        let response = HTTPResponse(status: head.method == "HEAD" ? 204 : 200,
                                    headers: ["content-type": "text/plain"], body: .bytes(body),
                                    trailers: head.method == "POST" ? ["grpc-status": "0"] : nil)
        _ = session.submitResponse(stream: stream, head: ResponseHead(response, framing: .frames), body: response.body,
                                   trailers: response.trailers, headOnly: head.method == "HEAD")
    }
    func headerListTooLarge(stream: Int32, bytes: Int, isTrailers: Bool, endStream: Bool, closing: Bool) {
        guard let session else { return }
        if closing { session.submitGoaway(errorCode: 11); return }
        if isTrailers { session.resetStream(stream, errorCode: 8); return }
        let response = HTTPResponse(status: 431)
        _ = session.submitResponse(stream: stream, head: ResponseHead(response, framing: .frames), body: response.body)
    }
    func dataReceived(stream: Int32, data: ByteBuffer) { session?.consumed(stream: stream, bytes: data.readableBytes) }
    func endOfStreamReceived(stream: Int32) {}
    func streamClosed(stream: Int32, errorCode: UInt32) { open.remove(stream) }
    func goawayReceived(lastStreamID: Int32, errorCode: UInt32) {}
    func endOfStreamSent(stream: Int32) {}
    func makeResumeCallback(stream: Int32) -> @Sendable () -> Void { {} }
}

private let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let split = Int(data[0] & 0x3f)
    var settings = NGHTTP2Session.Settings()
    if data[0] & 0x40 != 0 { settings.maxHeaderListSize = 256 }
    let delegate = Delegate()
    let session = NGHTTP2Session(role: .server, settings: settings, delegate: delegate)
    delegate.session = session
    var input = preface
    input.append(contentsOf: UnsafeBufferPointer(start: data + 1, count: size - 1))
    var out = ByteBuffer()
    var i = 0
    while i < input.count {
        let n = split == 0 ? input.count - i : min(split, input.count - i)
        do {
            try session.receive(ByteBuffer(bytes: input[i..<(i + n)]))
        } catch {
            _ = try? session.produce(into: &out, limit: 1 << 20)  // the GOAWAY
            return 0
        }
        i += n
        out.clear()
        _ = try? session.produce(into: &out, limit: 1 << 20)
        if !session.wantsRead && !session.wantsWrite { break }
    }
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
