// libFuzzer target: HTTP/3 request heads as our server sees them — nghttp3's QPACK decoder fed an
// encoder stream and a request's field section (no connection needed), every field it emits
// through `InboundHeaderBlock.add` (the header-list accounting and its limit, as QUICCore's
// recv_header callback does), then `HTTPRequestHead(fields:)` once the section is complete.
//
// Input: byte 0: header-list limit ÷ 64; byte 1: how much of the rest is encoder stream
// (byte × rest ÷ 255); byte 2: the size of the pieces the field section arrives in (1…63, 0 = all
// at once); then the encoder-stream instructions, then the field section (prefix + lines).
import CNgtcp2
import FuzzSupport
import MeshHTTP

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let limit = Int(data[0]) * 64
    let rest = size - 3
    let encoderLength = Int(data[1]) * rest / 255
    let piece = Int(data[2] & 63)
    let encoder = data + 3
    let section = encoder + encoderLength
    let sectionLength = rest - encoderLength

    var decoder: OpaquePointer?
    // The same capacity our server advertises (nghttp3 defaults: 4096 bytes, 100 blocked streams).
    guard nghttp3_qpack_decoder_new(&decoder, 4096, 100, nghttp3_mem_default()) == 0, let decoder else { return 0 }
    defer { nghttp3_qpack_decoder_del(decoder) }
    nghttp3_qpack_decoder_set_max_dtable_capacity(decoder, 4096)
    if encoderLength > 0, nghttp3_qpack_decoder_read_encoder(decoder, encoder, encoderLength) < 0 { return 0 }

    var sctx: OpaquePointer?
    guard nghttp3_qpack_stream_context_new(&sctx, 0, nghttp3_mem_default()) == 0, let sctx else { return 0 }
    defer { nghttp3_qpack_stream_context_del(sctx) }

    var block = InboundHeaderBlock(limit: limit)
    var expected = 0
    var offset = 0
    var complete = false
    outer: while offset < sectionLength || (offset == sectionLength && !complete) {
        let n = piece == 0 ? sectionLength - offset : min(piece, sectionLength - offset)
        let fin: Int32 = offset + n == sectionLength ? 1 : 0
        var src = section + offset
        var left = n
        repeat {
            var nv = nghttp3_qpack_nv()
            var flags: UInt8 = 0
            let used = nghttp3_qpack_decoder_read_request(decoder, sctx, &nv, &flags, src, left, fin)
            if used < 0 { break outer }  // the server resets the stream (QPACK_DECOMPRESSION_FAILED)
            src += Int(used)
            left -= Int(used)
            if flags & UInt8(NGHTTP3_QPACK_DECODE_FLAG_EMIT) != 0 {
                let name = nghttp3_rcbuf_get_buf(nv.name)
                let value = nghttp3_rcbuf_get_buf(nv.value)
                block.add(name: UnsafeRawBufferPointer(start: name.base, count: name.len),
                          value: UnsafeRawBufferPointer(start: value.base, count: value.len))
                expected += name.len + value.len + InboundHeaderBlock.fieldOverhead
                nghttp3_rcbuf_decref(nv.name)
                nghttp3_rcbuf_decref(nv.value)
            }
            if flags & UInt8(NGHTTP3_QPACK_DECODE_FLAG_FINAL) != 0 { complete = true; break outer }
            if flags & UInt8(NGHTTP3_QPACK_DECODE_FLAG_BLOCKED) != 0 { break outer }  // waits for the encoder stream
            if used == 0 && flags == 0 { break }
        } while left > 0
        offset += n
        if n == 0 { break }
    }
    // The accounting the 431 / H3_EXCESSIVE_LOAD decision rests on.
    precondition(block.bytes == expected, "counted \(block.bytes), expected \(expected)")
    precondition(block.isTooLarge == (expected > limit))
    if block.isTooLarge { precondition(block.fields.isEmpty, "fields kept over the limit") }
    if complete, !block.isTooLarge {
        var head = HTTPRequestHead(fields: block.fields)
        head.protocolName = "h3"
        if let n = head.contentLength { precondition(n >= 0) }
        for (name, _) in head.headers { precondition(!name.utf8.contains { $0 >= 0x41 && $0 <= 0x5A }, "uppercase name kept") }
        _ = head.path
        _ = head.method
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
