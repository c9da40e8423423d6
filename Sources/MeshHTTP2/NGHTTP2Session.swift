import CNghttp2
import MeshHTTP
import NIOCore

/// Events an `NGHTTP2Session` reports to the handler that owns it (always on the event loop).
protocol NGHTTP2SessionDelegate: AnyObject {
    /// A complete header block arrived. `isTrailers` is true for a second block on the stream.
    func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool)
    /// A header block decoded to more than `maxHeaderListSize` (its fields were dropped). With
    /// `closing`, the connection has had too many and is being closed (GOAWAY ENHANCE_YOUR_CALM).
    func headerListTooLarge(stream: Int32, bytes: Int, isTrailers: Bool, endStream: Bool, closing: Bool)
    /// DATA arrived for `stream` (connection window already credited).
    func dataReceived(stream: Int32, data: ByteBuffer)
    /// The peer ended its side of `stream`.
    func endOfStreamReceived(stream: Int32)
    /// The stream is gone (error code 0 = NO_ERROR).
    func streamClosed(stream: Int32, errorCode: UInt32)
    /// The peer sent GOAWAY.
    func goawayReceived(lastStreamID: Int32, errorCode: UInt32)
    /// We finished sending our side of `stream` (END_STREAM went out).
    func endOfStreamSent(stream: Int32)
    /// A callback (any thread) that resumes a deferred streaming body of `stream`.
    func makeResumeCallback(stream: Int32) -> @Sendable () -> Void
}

/// Owns one `nghttp2_session`. Not thread-safe: lives on its connection's event loop.
///
/// Input is fed with `receive`, output is pulled with `produce`. Window updates are manual: the
/// connection window is credited as data arrives, each stream's window only as its consumer
/// takes bytes (`consumed`), so a slow consumer pushes back on its sender without starving the
/// other streams of the connection.
final class NGHTTP2Session {
    enum Role { case server, client }

    struct Settings {
        var maxConcurrentStreams: UInt32 = 128
        var initialWindowSize: UInt32 = 256 * 1024
        var connectionWindowSize: Int32 = 16 * 1024 * 1024
        var maxHeaderListSize: UInt32 = 64 * 1024
        /// Largest window a stream being read grows to (nil: no growth, `initialWindowSize`).
        var streamWindowCap: UInt32?
    }

    /// What a stream is sending (response on server, request body on client).
    private struct Outbound {
        var pump: OutboundBodyPump
        /// When the peer last took response bytes (or the response began).
        var lastProgress = ContinuousClock.now
    }

    private struct InboundHeaders {
        var block: InboundHeaderBlock
        var isTrailers = false
        /// When the block's HEADERS frame began (CONTINUATION frames do not restart it).
        var started = ContinuousClock.now
    }

    /// When the oldest header block still being received began (nil: none is open).
    var oldestOpenHeaderBlock: ContinuousClock.Instant? { inboundHeaders.values.map(\.started).min() }

    /// GOAWAY with `errorCode`; the connection closes once it is written.
    func terminate(errorCode: UInt32) {
        nghttp2_session_terminate_session(session, errorCode)
    }

    let role: Role
    private(set) var session: OpaquePointer!
    unowned let delegate: any NGHTTP2SessionDelegate
    private var inboundHeaders: [Int32: InboundHeaders] = [:]
    private var outbound: [Int32: Outbound] = [:]
    /// Streams whose header block has been seen at least once (so a second block is trailers).
    private var headersSeen: Set<Int32> = []
    private var lastError: String?
    let maxHeaderListSize: Int
    private var headerPolicy = HeaderLimitPolicy()

    init(role: Role, settings: Settings, delegate: any NGHTTP2SessionDelegate) {
        self.role = role
        self.delegate = delegate
        self.maxHeaderListSize = Int(settings.maxHeaderListSize)
        streamWindowCap = Int(settings.streamWindowCap ?? settings.initialWindowSize)
        initialStreamWindow = Int(settings.initialWindowSize)
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        defer { nghttp2_session_callbacks_del(callbacks) }
        Self.install(callbacks!)
        var option: OpaquePointer?
        nghttp2_option_new(&option)
        defer { nghttp2_option_del(option) }
        nghttp2_option_set_no_auto_window_update(option, 1)
        nghttp2_option_set_max_send_header_block_length(option, 256 * 1024)
        var s: OpaquePointer?
        let me = Unmanaged.passUnretained(self).toOpaque()
        switch role {
        case .server: nghttp2_session_server_new2(&s, callbacks, me, option)
        case .client: nghttp2_session_client_new2(&s, callbacks, me, option)
        }
        self.session = s
        var iv = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue), value: settings.maxConcurrentStreams),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: settings.initialWindowSize),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue), value: settings.maxHeaderListSize),
        ]
        nghttp2_submit_settings(s, UInt8(NGHTTP2_FLAG_NONE.rawValue), &iv, iv.count)
        nghttp2_session_set_local_window_size(s, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, settings.connectionWindowSize)
    }

    /// With a body budget: the window a stream being read grows to (doubling as its consumer
    /// takes a window's worth, while the budget has room).
    private let streamWindowCap: Int
    private let initialStreamWindow: Int

    /// The connection's share of the node's request-body budget (server side). With it, request
    /// streams have no window (SETTINGS_INITIAL_WINDOW_SIZE 0) until their handler reads
    /// (`openStream`); the connection window is credited as bytes arrive (the streams' windows,
    /// all charged to the budget, bound what may arrive).
    var bodyBudget: BodyBudgetConnection?
    private var credits: [Int32: BodyCredit] = [:]

    /// The handler of `stream` began reading its body: ask the budget for a window. `grant` runs
    /// `grantStream` on the loop when it is given.
    @discardableResult
    func openStream(_ stream: Int32, grant: @escaping @Sendable (Int) -> Void) -> BodyCredit? {
        guard let b = bodyBudget, credits[stream] == nil, nghttp2_session_find_stream(session, stream) != nil else { return nil }
        let c = b.open(cap: streamWindowCap, grant: grant)
        credits[stream] = c
        return c
    }

    /// The budget gave `stream` `bytes` more window.
    func grantStream(_ stream: Int32, bytes: Int) {
        guard bytes > 0, credits[stream] != nil, nghttp2_session_find_stream(session, stream) != nil else { return }
        nghttp2_submit_window_update(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, Int32(clamping: bytes))
    }

    /// The stream's body ended or the stream went away: its window goes back to the budget.
    func releaseStream(_ stream: Int32) {
        credits.removeValue(forKey: stream)?.release()
    }

    /// Whether the budget keeps `stream` waiting for its first window.
    func streamWaitsForBudget(_ stream: Int32) -> Bool { credits[stream]?.waiting ?? false }

    deinit {
        for (_, var o) in outbound { o.pump.close(HTTPTransportError.connectionClosed) }
        nghttp2_session_del(session)
    }

    // MARK: - input / output

    /// Feed received bytes. Throws on a connection-level protocol error.
    func receive(_ buffer: ByteBuffer) throws {
        let rc = buffer.withUnsafeReadableBytes { buf in
            nghttp2_session_mem_recv(session, buf.baseAddress?.assumingMemoryBound(to: UInt8.self), buf.count)
        }
        if rc < 0 {
            throw HTTPTransportError.protocolError(String(cString: nghttp2_strerror(Int32(rc))) + (lastError.map { ": \($0)" } ?? ""))
        }
    }

    /// Append frames ready to go out to `buffer`, up to about `limit` bytes. Returns true if
    /// nghttp2 may have more to send.
    func produce(into buffer: inout ByteBuffer, limit: Int) throws -> Bool {
        while buffer.readableBytes < limit {
            var data: UnsafePointer<UInt8>?
            let n = nghttp2_session_mem_send(session, &data)
            if n < 0 { throw HTTPTransportError.protocolError(String(cString: nghttp2_strerror(Int32(n)))) }
            if n == 0 { return false }
            buffer.writeBytes(UnsafeRawBufferPointer(start: data, count: n))
        }
        return true
    }

    var wantsRead: Bool { nghttp2_session_want_read(session) != 0 }
    var wantsWrite: Bool { nghttp2_session_want_write(session) != 0 }

    /// The consumer of `stream` took `bytes`: open the stream window by as much (under a budget,
    /// plus what the window grows by).
    func consumed(stream: Int32, bytes: Int) {
        guard bytes > 0 else { return }
        guard bodyBudget != nil else {
            nghttp2_session_consume_stream(session, stream, bytes)
            return
        }
        guard nghttp2_session_find_stream(session, stream) != nil else { return }
        let grow = credits[stream]?.consumed(bytes) ?? 0
        nghttp2_submit_window_update(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, Int32(clamping: bytes + grow))
    }

    // MARK: - submitting

    /// A response: `head` is its fields (`ResponseHead`, `:status` first).
    func submitResponse(stream: Int32, head: ResponseHead, body: HTTPOutboundBody, trailers: HTTPHeaders? = nil, headOnly: Bool = false) -> Bool {
        if headOnly { body.discard() }
        let provider = headOnly ? nil : prepareOutbound(stream: stream, body: body, trailers: trailers)
        let rc = withHeaderFields(head.fields, Self.nv) { nva, count in
            if var p = provider {
                return nghttp2_submit_response(session, stream, nva, count, &p)
            }
            return nghttp2_submit_response(session, stream, nva, count, nil)
        }
        if rc != 0 { dropOutbound(stream: stream) }
        return rc == 0
    }

    /// Informational response (e.g. 100 Continue).
    func submitInformational(stream: Int32, status: Int) {
        _ = withHeaderFields([(":status", String(status))], Self.nv) { nva, count in
            nghttp2_submit_headers(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, nil, nva, count, nil)
        }
    }

    /// Submit a request; returns the stream id or throws.
    func submitRequest(head: HTTPRequestHead, body: HTTPOutboundBody) throws -> Int32 {
        var fields: [(name: String, value: String)] = [(":method", head.method), (":scheme", head.scheme), (":authority", head.authority), (":path", head.path)]
        fields.append(contentsOf: head.headers.fields)
        let hasBody: Bool
        if case .empty = body { hasBody = false } else { hasBody = true }
        // The provider for a request is registered after the id is known: use a placeholder stream id 0
        // then move it. nghttp2 calls read_callback only after submit returns.
        var provider = nghttp2_data_provider()
        provider.read_callback = Self.readCallback
        let id = withHeaderFields(fields, Self.nv) { nva, count in
            hasBody
                ? nghttp2_submit_request(session, nil, nva, count, &provider, nil)
                : nghttp2_submit_request(session, nil, nva, count, nil, nil)
        }
        guard id > 0 else {
            body.discard()
            throw HTTPTransportError.protocolError("cannot submit request: \(String(cString: nghttp2_strerror(id)))")
        }
        if hasBody { _ = prepareOutbound(stream: id, body: body, trailers: nil) }
        return id
    }

    func resetStream(_ stream: Int32, errorCode: UInt32) {
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, errorCode)
    }

    /// First phase of a graceful shutdown: a GOAWAY with last-stream-id 2^31-1.
    func submitShutdownNotice() {
        nghttp2_submit_shutdown_notice(session)
    }

    /// Final GOAWAY with the last stream id actually processed.
    func submitGoaway(errorCode: UInt32 = 0) {
        nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nghttp2_session_get_last_proc_stream_id(session), errorCode, nil, 0)
    }

    /// Tell nghttp2 a deferred stream has data again.
    func resume(stream: Int32) {
        nghttp2_session_resume_data(session, stream)
    }

    private func prepareOutbound(stream: Int32, body: HTTPOutboundBody, trailers: HTTPHeaders?) -> nghttp2_data_provider? {
        if case .empty = body, trailers == nil { return nil }
        let o = Outbound(pump: OutboundBodyPump(body, trailers: trailers))
        o.pump.stream?.setOnReadable(delegate.makeResumeCallback(stream: stream))
        outbound[stream] = o
        var provider = nghttp2_data_provider()
        provider.read_callback = Self.readCallback
        return provider
    }

    /// Streams whose response has not moved for longer than `timeout` because the peer does not
    /// take it: its flow-control window (stream or connection) is closed, or — `socketBlocked` —
    /// the socket itself stopped accepting bytes. A body waiting for its own producer (a mesh
    /// fetch still arriving) with open windows is not stalled.
    func stalledResponses(now: ContinuousClock.Instant, timeout: Duration, socketBlocked: Bool) -> [Int32] {
        let connectionClosed = nghttp2_session_get_remote_window_size(session) <= 0
        return outbound.compactMap { id, o in
            guard now - o.lastProgress > timeout else { return nil }
            let blocked = socketBlocked || connectionClosed || nghttp2_session_get_stream_remote_window_size(session, id) <= 0
            return blocked ? id : nil
        }
    }

    private func dropOutbound(stream: Int32) {
        guard var o = outbound.removeValue(forKey: stream) else { return }
        o.pump.close(HTTPTransportError.streamReset(errorCode: 8))
    }

    /// One `nghttp2_nv` for `withHeaderFields`.
    private static func nv(_ name: UnsafeMutablePointer<UInt8>, _ nameLength: Int, _ value: UnsafeMutablePointer<UInt8>, _ valueLength: Int) -> nghttp2_nv {
        nghttp2_nv(name: name, value: value, namelen: nameLength, valuelen: valueLength, flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
    }

    // MARK: - callbacks

    private static func from(_ p: UnsafeMutableRawPointer?) -> NGHTTP2Session {
        Unmanaged<NGHTTP2Session>.fromOpaque(p!).takeUnretainedValue()
    }

    private static let readCallback: nghttp2_data_source_read_callback = { _, streamID, buf, length, flags, _, user in
        let me = NGHTTP2Session.from(user)
        return me.read(stream: streamID, into: UnsafeMutableRawBufferPointer(start: buf, count: length), flags: flags!)
    }

    private func read(stream: Int32, into buf: UnsafeMutableRawBufferPointer, flags: UnsafeMutablePointer<UInt32>) -> Int {
        guard var o = outbound[stream] else {
            flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
            return 0
        }
        let n: Int
        switch o.pump.copy(into: buf) {
        case .wouldBlock:
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        case .failed(let why):
            lastError = why
            return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue)
        case .bytes(let count, let last):
            n = count
            if last {
                flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
                if let t = o.pump.trailers {
                    flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
                    _ = withHeaderFields(t.fields, Self.nv) { nva, count in nghttp2_submit_trailer(session, stream, nva, count) }
                }
            }
        }
        if n > 0 { o.lastProgress = .now }
        outbound[stream] = o
        return n
    }

    private static func install(_ cb: OpaquePointer) {
        nghttp2_session_callbacks_set_on_begin_headers_callback(cb) { _, frame, user in
            let me = NGHTTP2Session.from(user)
            let id = frame!.pointee.hd.stream_id
            var h = InboundHeaders(block: InboundHeaderBlock(limit: me.maxHeaderListSize))
            h.isTrailers = me.headersSeen.contains(id)
            me.headersSeen.insert(id)
            me.inboundHeaders[id] = h
            return 0
        }
        nghttp2_session_callbacks_set_on_header_callback(cb) { _, frame, name, namelen, value, valuelen, _, user in
            let me = NGHTTP2Session.from(user)
            let id = frame!.pointee.hd.stream_id
            me.inboundHeaders[id]?.block.add(name: UnsafeRawBufferPointer(start: name, count: namelen),
                                             value: UnsafeRawBufferPointer(start: value, count: valuelen))
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(cb) { _, frame, user in
            let me = NGHTTP2Session.from(user)
            let hd = frame!.pointee.hd
            let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
            switch Int(hd.type) {
            case Int(NGHTTP2_HEADERS.rawValue):
                if let h = me.inboundHeaders.removeValue(forKey: hd.stream_id) {
                    if h.block.isTooLarge {
                        let closing = me.headerPolicy.tooLarge() == .closeConnection
                        if closing { nghttp2_session_terminate_session(me.session, UInt32(NGHTTP2_ENHANCE_YOUR_CALM.rawValue)) }
                        me.delegate.headerListTooLarge(stream: hd.stream_id, bytes: h.block.bytes, isTrailers: h.isTrailers,
                                                       endStream: endStream, closing: closing)
                        return 0
                    }
                    // Skip informational (1xx) responses.
                    if me.role == .client, let s = h.block.fields.first(where: { $0.name == ":status" }), s.value.hasPrefix("1") {
                        me.headersSeen.remove(hd.stream_id)
                        return 0
                    }
                    me.delegate.headersReceived(stream: hd.stream_id, headers: h.block.fields, isTrailers: h.isTrailers, endStream: endStream)
                }
                if endStream { me.delegate.endOfStreamReceived(stream: hd.stream_id) }
            case Int(NGHTTP2_DATA.rawValue):
                if endStream { me.delegate.endOfStreamReceived(stream: hd.stream_id) }
            case Int(NGHTTP2_GOAWAY.rawValue):
                let g = frame!.pointee.goaway
                me.delegate.goawayReceived(lastStreamID: g.last_stream_id, errorCode: g.error_code)
            default:
                break
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb) { session, _, stream, data, len, user in
            let me = NGHTTP2Session.from(user)
            nghttp2_session_consume_connection(session, len)
            var buf = ByteBufferAllocator().buffer(capacity: len)
            buf.writeBytes(UnsafeRawBufferPointer(start: data, count: len))
            me.delegate.dataReceived(stream: stream, data: buf)
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_send_callback(cb) { _, frame, user in
            let me = NGHTTP2Session.from(user)
            let hd = frame!.pointee.hd
            if hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0,
               Int(hd.type) == Int(NGHTTP2_DATA.rawValue) || Int(hd.type) == Int(NGHTTP2_HEADERS.rawValue) {
                me.delegate.endOfStreamSent(stream: hd.stream_id)
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_stream_close_callback(cb) { _, stream, code, user in
            let me = NGHTTP2Session.from(user)
            me.inboundHeaders.removeValue(forKey: stream)
            me.releaseStream(stream)
            me.headersSeen.remove(stream)
            me.dropOutbound(stream: stream)
            me.delegate.streamClosed(stream: stream, errorCode: code)
            return 0
        }
        nghttp2_session_callbacks_set_error_callback2(cb) { _, _, msg, len, user in
            let me = NGHTTP2Session.from(user)
            me.lastError = String(decoding: UnsafeRawBufferPointer(start: msg, count: len), as: UTF8.self)
            return 0
        }
    }
}
