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

    func readData(_ sid: Int64, _ vec: UnsafeMutablePointer<nghttp3_vec>, _ veccnt: Int, _ pflags: UnsafeMutablePointer<UInt32>) -> nghttp3_ssize {
        guard let s = streams[sid], veccnt > 0 else {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            return 0
        }
        func give(_ b: ByteBuffer) -> nghttp3_ssize {
            s.held.hold(b)
            b.withUnsafeReadableBytes { p in
                vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: p.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: p.count)
            }
            return 1
        }
        func eof(_ trailers: HTTPHeaders?) -> nghttp3_ssize {
            pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_EOF)
            if isServer { stopUploadIfUnfinished(s) }
            if let t = trailers ?? s.pendingTrailers, let h3, t.fields.count > 0 {
                let rv = Self.withNV(t.fields) { nva, n in nghttp3_conn_submit_trailers(h3, sid, nva, n) }
                if rv == 0 { pflags.pointee |= UInt32(NGHTTP3_DATA_FLAG_NO_END_STREAM) }
            }
            return 0
        }
        /// The next chunk straight from the source's memory; nil if it has none to give.
        func giveMapped(_ f: any FileBodySource, next: Int64, end: Int64) -> nghttp3_ssize? {
            guard let m = f.mappedBytes(at: next, max: Int(min(Int64(Self.mappedChunk), end - next))) else { return nil }
            vec[0] = nghttp3_vec(base: UnsafeMutablePointer(mutating: m.baseAddress!.assumingMemoryBound(to: UInt8.self)), len: m.count)
            let newNext = next + Int64(m.count)
            s.source = .mapped(f, next: newNext, end: end)
            if newNext >= end { _ = eof(nil) }
            return 1
        }
        switch s.source {
        case .none:
            return eof(nil)
        case .bytes(var b):
            let n = min(b.readableBytes, Self.chunk)
            let slice = b.readSlice(length: n)!
            s.source = b.readableBytes > 0 ? .bytes(b) : .none
            let r = give(slice)
            if b.readableBytes == 0 { _ = eof(nil) }
            return r
        case .mapped(let f, let next, let end):
            // At the end the source stays open (see `Source.mapped`); `streamClosed` closes it.
            guard next < end else { return eof(nil) }
            return giveMapped(f, next: next, end: end) ?? failBody(s, sid, "file body mapping unavailable")
        case .file(let f, let next, let end):
            // A source that can map its bytes is sent from the mapping from the first chunk on.
            if next == f.start, next < end, let r = giveMapped(f, next: next, end: end) { return r }
            if next >= end {
                s.closeSource()
                return eof(nil)
            }
            let n = Int(min(Int64(Self.chunk), end - next))
            var buf = allocator.buffer(capacity: n)
            var failed = false
            buf.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { dest in
                var got = 0
                while got < n {
                    guard let r = try? f.read(at: next + Int64(got), into: UnsafeMutableRawBufferPointer(rebasing: dest[got..<n])), r > 0 else {
                        failed = true
                        break
                    }
                    got += r
                }
                return got
            }
            if failed { return failBody(s, sid, "file body read failed") }
            let newNext = next + Int64(buf.readableBytes)
            s.source = .file(f, next: newNext, end: end)
            let r = give(buf)
            if newNext >= end {
                s.closeSource()
                _ = eof(nil)
            }
            return r
        case .stream(let st):
            switch st.read(max: Self.chunk) {
            case .data(let b):
                return give(b)
            case .wouldBlock:
                return nghttp3_ssize(NGHTTP3_ERR_WOULDBLOCK)
            case .end(let trailers):
                s.sourceClosed = true
                s.source = .none
                return eof(trailers)
            case .failed:
                return failBody(s, sid, nil)
            }
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

    /// Header fields as an `nghttp3_nv` array for one call (nghttp3 copies what it keeps): the
    /// names and values share one temporary arena (the per-field copies were 5% of the CPU of
    /// small requests).
    static func withNV<R>(_ fields: [(name: String, value: String)], _ body: (UnsafePointer<nghttp3_nv>, Int) -> R) -> R {
        var total = 0
        for (n, v) in fields { total += n.utf8.count + v.utf8.count }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: max(1, total)) { arena in
            withUnsafeTemporaryAllocation(of: nghttp3_nv.self, capacity: max(1, fields.count)) { nva in
                var at = 0
                func place(_ s: String) -> (UnsafeMutablePointer<UInt8>, Int) {
                    let start = at
                    for byte in s.utf8 {
                        arena[at] = byte
                        at += 1
                    }
                    return (arena.baseAddress! + start, at - start)
                }
                for (i, (n, v)) in fields.enumerated() {
                    let (np, nl) = place(n)
                    let (vp, vl) = place(v)
                    nva.initializeElement(at: i, to: nghttp3_nv(name: np, value: vp, namelen: nl, valuelen: vl, flags: UInt8(NGHTTP3_NV_FLAG_NONE)))
                }
                return body(UnsafePointer(nva.baseAddress!), fields.count)
            }
        }
    }

    func setSource(_ s: H3Stream, _ body: HTTPOutboundBody) {
        switch body {
        case .empty: s.source = .none
        case .bytes(let b): s.source = b.readableBytes > 0 ? .bytes(b) : .none
        case .file(let f):
            s.source = .file(f, next: f.start, end: f.start + f.length)
        case .stream(let st):
            s.source = .stream(st)
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
