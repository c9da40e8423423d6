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

/// Identifies a client request until it has a stream (cancellation before/after open).
final class RequestToken: Sendable {
    let cancelled = Mutex(false)
}

/// Weak reference usable from @Sendable closures (hopping back onto the loop).
final class WeakCore {
    weak var core: QUICCore?
    init(_ c: QUICCore) { core = c }
}

/// One HTTP/3 request stream (either role).
final class H3Stream {
    let id: Int64
    /// The header block and the trailer block, each counted against the header-list limit as
    /// nghttp3 decodes it (QPACK lets a small block decode to a huge one).
    var headerBlock: InboundHeaderBlock
    var trailerBlock: InboundHeaderBlock
    var headerFields: [(name: String, value: String)] { headerBlock.fields }
    var inTrailers = false
    var body: HTTPInboundBody?
    var inboundEnded = false
    /// What this side sends after its head (a response, or a client's request body).
    var pump = OutboundBodyPump(.empty)
    /// The body's source was released (read to its end, or the stream went away).
    var sourceClosed: Bool { pump.isClosed }
    var held = AckedBufferQueue()
    /// Body bytes of the current read burst, not yet handed to `body`.
    var pendingInbound: ByteBuffer?
    var isHead = false
    var responseSubmitted = false
    /// Server, under a request-body budget: the stream's window, once its handler reads.
    var credit: BodyCredit?
    /// When the peer last acknowledged response bytes (or the response began).
    var lastProgress = ContinuousClock.now
    var continuation: CheckedContinuation<HTTPClientResponse, any Error>?
    var token: RequestToken?
    /// Server side: the service handling the request, cancelled when the stream goes away first.
    var handler: Task<Void, Never>?

    init(id: Int64, maxHeaderListSize: Int) {
        self.id = id
        headerBlock = InboundHeaderBlock(limit: maxHeaderListSize)
        trailerBlock = InboundHeaderBlock(limit: maxHeaderListSize)
    }

    func closeSource() {
        pump.close(HTTPTransportError.streamReset(errorCode: UInt32(NGHTTP3_H3_REQUEST_CANCELLED)))
    }
}
