import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import Synchronization

/// Connection-level facts readable from any thread.
final class H2ConnectionFlags: Sendable {
    let goingAway = Mutex(false)
}

/// Records the stream id of an in-flight request so cancellation can find it.
final class RequestToken: Sendable {
    let streamID = Mutex<Int32?>(nil)
    let cancelled = Mutex(false)
}

final class HTTP2ClientHandler: HTTP2ChannelHandler {
    private struct Stream {
        var continuation: CheckedContinuation<HTTPClientResponse, any Error>?
        var body: HTTPInboundBody?
        var ended = false
        var trailers: HTTPHeaders?
    }

    private var streams: [Int32: Stream] = [:]
    private(set) var goaway: (lastStreamID: Int32, errorCode: UInt32)?
    private var failure: (any Error)?
    let ready: EventLoopPromise<PeerIdentity>
    private let plaintext: Bool
    let flags = H2ConnectionFlags()

    init(plaintext: Bool, ready: EventLoopPromise<PeerIdentity>, settings: NGHTTP2Session.Settings, logger: Logger) {
        self.plaintext = plaintext
        self.ready = ready
        super.init(settings: settings, logger: logger)
    }

    override func channelActive(context: ChannelHandlerContext) {
        if plaintext {
            startSession(role: .client)
            ready.succeed(.insecure)
        }
        context.fireChannelActive()
    }

    override func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? TLSEstablishedEvent {
            if let alpn = e.alpn, alpn != "h2" {
                ready.fail(HTTPTransportError.protocolError("server selected ALPN \(alpn), not h2"))
                context.close(promise: nil)
                return
            }
            startSession(role: .client)
            ready.succeed(e.peer)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func start(head: HTTPRequestHead, body: HTTPOutboundBody, token: RequestToken, continuation: CheckedContinuation<HTTPClientResponse, any Error>) {
        if let g = goaway {
            body.discard()
            continuation.resume(throwing: HTTPTransportError.goaway(lastStreamID: g.lastStreamID, errorCode: g.errorCode))
            return
        }
        guard let session, !closing, failure == nil else {
            body.discard()
            continuation.resume(throwing: failure ?? HTTPTransportError.connectionClosed)
            return
        }
        if token.cancelled.withLock({ $0 }) {
            body.discard()
            continuation.resume(throwing: CancellationError())
            return
        }
        do {
            let id = try session.submitRequest(head: head, body: body)
            token.streamID.withLock { $0 = id }
            streams[id] = Stream(continuation: continuation)
            flushOutput()
        } catch {
            continuation.resume(throwing: error)
        }
    }

    func cancel(token: RequestToken) {
        guard let id = token.streamID.withLock({ $0 }) else { return }
        cancel(stream: id)
    }

    func cancel(stream id: Int32) {
        guard var s = streams[id] else { return }
        session?.resetStream(id, errorCode: 8) // CANCEL
        if let c = s.continuation {
            s.continuation = nil
            c.resume(throwing: CancellationError())
        }
        if !s.ended { s.body?.fail(CancellationError()) }
        streams[id] = s
        flushOutput()
    }

    override func headersReceived(stream: Int32, headers: [(name: String, value: String)], isTrailers: Bool, endStream: Bool) {
        guard var s = streams[stream] else { return }
        if isTrailers {
            // Delivered with the end of the body (END_STREAM is on this HEADERS frame).
            s.trailers = HTTPHeaders(headers.filter { !$0.name.hasPrefix(":") })
            streams[stream] = s
            return
        }
        guard let c = s.continuation else { return }
        s.continuation = nil
        var status = 0
        var fields = HTTPHeaders()
        for (n, v) in headers {
            if n == ":status" { status = Int(v) ?? 0 } else if !n.hasPrefix(":") { fields.add(n, v) }
        }
        let body = HTTPInboundBody(onConsumed: makeConsumedCallback(stream: stream))
        s.body = body
        if endStream {
            s.ended = true
            body.finish()
        }
        streams[stream] = s
        let cancel = onLoop { ($0 as! HTTP2ClientHandler).cancel(stream: stream) }
        c.resume(returning: HTTPClientResponse(status: status, headers: fields, body: body, cancel: cancel))
    }

    override func dataReceived(stream: Int32, data: ByteBuffer) {
        guard let s = streams[stream], let body = s.body, body.append(data) else {
            session?.consumed(stream: stream, bytes: data.readableBytes)
            return
        }
    }

    override func endOfStreamReceived(stream: Int32) {
        guard var s = streams[stream] else { return }
        s.ended = true
        streams[stream] = s
        s.body?.finish(trailers: s.trailers)
    }

    override func streamClosed(stream: Int32, errorCode: UInt32) {
        guard let s = streams.removeValue(forKey: stream) else { return }
        let error: any Error
        if errorCode == 7, let g = goaway {
            // Refused because the server is going away: the request was not processed.
            error = HTTPTransportError.goaway(lastStreamID: g.lastStreamID, errorCode: g.errorCode)
        } else {
            error = HTTPTransportError.streamReset(errorCode: errorCode)
        }
        s.continuation?.resume(throwing: error)
        if !s.ended { s.body?.fail(error) }
    }

    override func goawayReceived(lastStreamID: Int32, errorCode: UInt32) {
        goaway = (lastStreamID, errorCode)
        flags.goingAway.withLock { $0 = true }
        for (id, s) in streams where id > lastStreamID {
            streams[id] = nil
            let e = HTTPTransportError.goaway(lastStreamID: lastStreamID, errorCode: errorCode)
            s.continuation?.resume(throwing: e)
            if !s.ended { s.body?.fail(e) }
        }
    }

    override func connectionFailed(_ error: any Error) {
        if failure == nil { failure = error }
        ready.fail(error)
        let all = streams
        streams = [:]
        for (_, s) in all {
            s.continuation?.resume(throwing: error)
            if !s.ended { s.body?.fail(error) }
        }
    }
}
