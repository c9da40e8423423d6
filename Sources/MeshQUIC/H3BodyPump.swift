import CGnuTLS
import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension QUICCore {
    // MARK: outbound bodies (both roles)

    static let readData: nghttp3_read_data_callback = { _, sid, vec, veccnt, pflags, ud, _ in
        QUICCore.with(ud) { $0.readData(sid, vec!, veccnt, pflags!) }
    }

    static let chunk = 256 * 1024
    /// Bytes of a mapped file per `read_data` answer (one DATA frame each; nothing is copied).
    static let mappedChunk = 4 << 20

    /// nghttp3 asks for the next piece of `sid`'s body: a pointer into a held buffer or into the
    /// file's mapping (nothing is copied), EOF (with trailers if any), or WOULDBLOCK.
    func readData(_ sid: Int64, _ vec: UnsafeMutablePointer<nghttp3_vec>, _ veccnt: Int, _ pflags: UnsafeMutablePointer<UInt32>) -> nghttp3_ssize {
        guard let s = streams[sid], veccnt > 0 else {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            return 0
        }
        func eof() {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            if isServer { stopUploadIfUnfinished(s) }
            if let t = s.pump.trailers, let h3, t.fields.count > 0 {
                let rv = withHeaderFields(t.fields, nghttp3NV) { nva, n in nghttp3_conn_submit_trailers(h3, sid, nva, n) }
                if rv == 0 { pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_NO_END_STREAM) }
            }
        }
        switch s.pump.next(max: Self.chunk, mappedMax: Self.mappedChunk, allocator: allocator) {
        case .buffer(let b, let last):
            s.held.hold(b)
            b.withUnsafeReadableBytes { p in
                vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: p.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: p.count)
            }
            if last { eof() }
            return 1
        case .mapped(let m, let last):
            // The source stays open until the stream closes (`streamClosed` closes it).
            vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: m.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: m.count)
            if last { eof() }
            return 1
        case .end:
            eof()
            return 0
        case .wouldBlock:
            return nghttp3_ssize(NGHTTP3_ERR_WOULDBLOCK)
        case .failed(let reason):
            return failBody(s, sid, reason)
        }
    }

    /// The body cannot be produced: release the source and reset the stream (after this
    /// callback returns: nghttp3 is in the middle of a write).
    func failBody(_ s: H3Stream, _ sid: Int64, _ reason: String?) -> nghttp3_ssize {
        if let reason { logger.warning("QUIC: \(reason); resetting stream", metadata: ["stream": "\(sid)"]) }
        s.closeSource()
        loop.assumeIsolated().execute { [weak self] in
            guard let self, self.isActive else { return }
            ngtcp2_conn_shutdown_stream(self.conn, sid, UInt64(NGHTTP3_H3_INTERNAL_ERROR))
            self.writePackets()
        }
        return nghttp3_ssize(NGHTTP3_ERR_WOULDBLOCK)
    }

    /// The body `s` sends; a streamed one wakes the stream when its producer has more.
    func setBody(_ s: H3Stream, _ body: HTTPOutboundBody, trailers: HTTPHeaders? = nil) {
        s.pump = OutboundBodyPump(body, trailers: trailers)
        if let st = s.pump.stream {
            let bound = NIOLoopBound(weakSelf, eventLoop: loop)
            let loop = self.loop
            let sid = s.id
            st.setOnReadable {
                loop.execute { bound.value.core?.resumeStream(sid) }
            }
        }
    }

    func resumeStream(_ sid: Int64) {
        guard isActive, let h3, streams[sid] != nil else { return }
        _ = nghttp3_conn_resume_stream(h3, sid)
        scheduleWrite()
    }
}

/// One `nghttp3_nv` for `withHeaderFields`.
@inline(__always)
func nghttp3NV(_ name: UnsafeMutablePointer<UInt8>, _ nameLength: Int, _ value: UnsafeMutablePointer<UInt8>, _ valueLength: Int) -> nghttp3_nv {
    nghttp3_nv(name: name, value: value, namelen: nameLength, valuelen: valueLength, flags: UInt8(NGHTTP3_NV_FLAG_NONE))
}
