import NIOCore

/// Where the next bytes of an outgoing body (a response, or a client's request) come from, the
/// same for every transport: HTTP/2 copies them into nghttp2's frame buffer (`copy(into:)`),
/// HTTP/3 hands nghttp3 pointers into buffers or straight into a file's mapping (`next` with
/// `mappedMax`), HTTP/1.1 writes buffers (`next`). One per stream, used on its connection's event
/// loop; the transport calls `close` when the stream ends before the body did.
public struct OutboundBodyPump {
    private enum Source {
        case none
        case bytes(ByteBuffer)
        case file(any FileBodySource, next: Int64, end: Int64)
        /// A file whose bytes are handed out straight from its memory (`mappedBytes`): the source
        /// stays open until `close`, because the transport points into it until the peer
        /// acknowledged the data.
        case mapped(any FileBodySource, next: Int64, end: Int64)
        case stream(HTTPOutboundStream)
    }

    /// What `next` gives.
    public enum Step {
        /// Bytes to send; `last`: the body ends with them.
        case buffer(ByteBuffer, last: Bool)
        /// Bytes of the source's memory, valid until `close`; `last`: the body ends with them.
        case mapped(UnsafeRawBufferPointer, last: Bool)
        /// The producer has nothing yet (a stream): its `onReadable` wakes the transport.
        case wouldBlock
        /// No more bytes (then send `trailers`, if any).
        case end
        /// The body cannot be produced: reset the stream. The reason is for the log (nil: the
        /// producer failed the stream itself).
        case failed(String?)
    }

    /// What `copy(into:)` gives.
    public enum Copied {
        /// `count` bytes copied; `last`: the body ends with them (then send `trailers`).
        case bytes(Int, last: Bool)
        case wouldBlock
        case failed(String)
    }

    private var source: Source
    /// Sent after the body: the response's, or those its stream ended with.
    public private(set) var trailers: HTTPHeaders?
    /// The source was released: a file read to its end or closed, a stream ended or cancelled.
    public private(set) var isClosed = false

    public init(_ body: HTTPOutboundBody, trailers: HTTPHeaders? = nil) {
        self.trailers = trailers
        switch body {
        case .empty: source = .none
        case .bytes(let b): source = b.readableBytes > 0 ? .bytes(b) : .none
        case .file(let f): source = .file(f, next: f.start, end: f.start + f.length)
        case .stream(let s): source = .stream(s)
        }
    }

    /// No bytes and no trailers to send.
    public var isEmpty: Bool {
        if case .none = source, trailers == nil { return true }
        return false
    }

    /// The producer of a streamed body (the transport registers its wake-up with it).
    public var stream: HTTPOutboundStream? {
        if case .stream(let s) = source { return s }
        return nil
    }

    /// The next piece of at most `max` bytes. `mappedMax`: a file that can map its bytes is
    /// handed out from the mapping, this many bytes at a time (nil: always buffers).
    public mutating func next(max: Int, mappedMax: Int? = nil, allocator: ByteBufferAllocator) -> Step {
        switch source {
        case .none:
            return .end
        case .bytes(var b):
            let slice = b.readSlice(length: min(b.readableBytes, max))!
            source = b.readableBytes > 0 ? .bytes(b) : .none
            return .buffer(slice, last: b.readableBytes == 0)
        case .mapped(let f, let next, let end):
            guard next < end else { return .end }
            guard let mappedMax, let step = nextMapped(f, next: next, end: end, max: mappedMax) else {
                return .failed("file body mapping unavailable")
            }
            return step
        case .file(let f, let next, let end):
            // A source that can map its bytes is sent from the mapping from the first chunk on.
            if let mappedMax, next == f.start, next < end, let step = nextMapped(f, next: next, end: end, max: mappedMax) { return step }
            if next >= end {
                close(HTTPTransportError.connectionClosed)
                return .end
            }
            let n = Int(min(Int64(max), end - next))
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
            if failed { return .failed("file body read failed") }
            let newNext = next + Int64(buf.readableBytes)
            source = .file(f, next: newNext, end: end)
            if newNext >= end { close(HTTPTransportError.connectionClosed) }
            return .buffer(buf, last: newNext >= end)
        case .stream(let s):
            switch s.read(max: max) {
            case .data(let b): return .buffer(b, last: false)
            case .wouldBlock: return .wouldBlock
            case .end(let t):
                if let t { trailers = t }
                isClosed = true
                source = .none
                return .end
            case .failed: return .failed(nil)
            }
        }
    }

    private mutating func nextMapped(_ f: any FileBodySource, next: Int64, end: Int64, max: Int) -> Step? {
        guard let m = f.mappedBytes(at: next, max: Int(min(Int64(max), end - next))) else { return nil }
        let newNext = next + Int64(m.count)
        source = .mapped(f, next: newNext, end: end)
        return .mapped(m, last: newNext >= end)
    }

    /// Copy up to `buffer.count` bytes into `buffer`.
    public mutating func copy(into buffer: UnsafeMutableRawBufferPointer) -> Copied {
        switch source {
        case .none:
            return .bytes(0, last: true)
        case .bytes(var b):
            let n = min(buffer.count, b.readableBytes)
            b.readWithUnsafeReadableBytes { src in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src.prefix(n)))
                return n
            }
            source = b.readableBytes > 0 ? .bytes(b) : .none
            return .bytes(n, last: b.readableBytes == 0)
        case .file(let f, let next, let end), .mapped(let f, let next, let end):
            let want = Int(min(Int64(buffer.count), end - next))
            var n = 0
            if want > 0 {
                do {
                    n = try f.read(at: next, into: UnsafeMutableRawBufferPointer(rebasing: buffer.prefix(want)))
                } catch {
                    return .failed("\(error)")
                }
                // The file is shorter than promised: never send a truncated body as complete.
                if n == 0 { return .failed("file ended early") }
            }
            let newNext = next + Int64(n)
            source = .file(f, next: newNext, end: end)
            if newNext >= end { close(HTTPTransportError.connectionClosed) }
            return .bytes(n, last: newNext >= end)
        case .stream(let s):
            switch s.read(max: buffer.count) {
            case .data(let b):
                b.withUnsafeReadableBytes { buffer.copyMemory(from: $0) }
                return .bytes(b.readableBytes, last: false)
            case .wouldBlock:
                return .wouldBlock
            case .end(let t):
                if let t { trailers = t }
                isClosed = true
                source = .none
                return .bytes(0, last: true)
            case .failed(let e):
                return .failed("\(e)")
            }
        }
    }

    /// Release the source (once): a file is closed, a stream's producer fails with `error`.
    public mutating func close(_ error: any Error) {
        guard !isClosed else { return }
        isClosed = true
        switch source {
        case .file(let f, _, _), .mapped(let f, _, _): f.close()
        case .stream(let s): s.cancel(error)
        case .none, .bytes: break
        }
        source = .none
    }
}
