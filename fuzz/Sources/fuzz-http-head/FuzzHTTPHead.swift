// libFuzzer target: request heads as our code sees them after HPACK/QPACK decoding.
//
// Input: a header block as a list of fields, each `name 0x00 value 0x00` (a trailing partial
// field is used as is); the first byte picks the header-list limit (x 64 bytes). The fields go
// through `InboundHeaderBlock.add` (the per-field accounting both HTTP/2 and HTTP/3 use) and then
// `HTTPRequestHead(fields:)`, and the head through what our code parses from it: content-length,
// the gRPC dispatch checks (content-type, grpc-timeout) and grpc-message percent-coding.
import FuzzSupport
import MeshGRPC
import MeshHTTP

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let raw = UnsafeRawBufferPointer(start: data, count: size)
    let limit = Int(raw[0]) * 64
    var block = InboundHeaderBlock(limit: limit)
    var expected = 0
    var pieces: [UnsafeRawBufferPointer] = []
    var start = 1
    for i in 1..<size where raw[i] == 0 {
        pieces.append(UnsafeRawBufferPointer(rebasing: raw[start..<i]))
        start = i + 1
    }
    if start < size { pieces.append(UnsafeRawBufferPointer(rebasing: raw[start..<size])) }
    var i = 0
    while i < pieces.count {
        let name = pieces[i]
        let value = i + 1 < pieces.count ? pieces[i + 1] : UnsafeRawBufferPointer(start: nil, count: 0)
        block.add(name: name, value: value)
        expected += name.count + value.count + InboundHeaderBlock.fieldOverhead
        i += 2
    }
    // The accounting the 431 decision rests on.
    precondition(block.bytes == expected, "counted \(block.bytes), expected \(expected)")
    precondition(block.isTooLarge == (expected > limit))
    if block.isTooLarge {
        precondition(block.fields.isEmpty, "fields kept over the limit")
    } else {
        precondition(block.fields.count == (pieces.count + 1) / 2)
        let kept = block.fields.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count + InboundHeaderBlock.fieldOverhead }
        // Counted on the raw bytes; String(decoding:) may widen an invalid byte to U+FFFD (3 bytes).
        precondition(kept <= 3 * limit, "kept fields larger than the limit allows")
    }

    let head = HTTPRequestHead(fields: block.fields)
    if let n = head.contentLength { precondition(n >= 0) }
    for (name, _) in head.headers { precondition(!name.utf8.contains { $0 >= 0x41 && $0 <= 0x5A }, "uppercase name kept") }
    _ = head.headers["content-type"]
    if GRPCRouter.isGRPC(head) { precondition(head.headers["content-type"]!.hasPrefix("application/grpc")) }
    if let t = head.headers["grpc-timeout"], let d = GRPCRouter.parseTimeout(t) {
        precondition(d >= .zero, "negative grpc-timeout")
        _ = ContinuousClock.now + d
    }
    for (_, v) in head.headers {
        _ = GRPCStatus.percentDecode(v)
        let enc = GRPCStatus.percentEncode(v)
        precondition(enc.utf8.allSatisfy { $0 >= 0x20 && $0 <= 0x7E }, "percentEncode left a non-printable byte")
        precondition(GRPCStatus.percentDecode(enc) == v, "percent-coding does not round-trip \(v.debugDescription)")
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
