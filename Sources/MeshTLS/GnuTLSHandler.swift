import CGnuTLS
import Logging
import MeshHTTP
import NIOCore

/// Fired down the pipeline once the handshake has completed and the peer is known.
public struct TLSEstablishedEvent: Sendable {
    public var peer: PeerIdentity
    public var alpn: String?
}

/// A NIO handler that runs GnuTLS over the channel: ciphertext below, plaintext above.
///
/// Server side: the handshake must finish within `handshakeTimeout`, else the connection is
/// closed. Client side: the handshake starts on `channelActive`.
public final class GnuTLSHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let credentials: TLSCredentials
    private let mode: TLSSession.Mode
    private let alpn: [String]
    private let handshakeTimeout: TimeAmount
    private let logger: Logger
    private var session: TLSSession?
    private var pendingWrites: [(ByteBuffer, EventLoopPromise<Void>?)] = []
    private var timeoutTask: Scheduled<Void>?
    private var failed = false
    private var plaintext: ByteBuffer?
    /// Small writes between two flushes are corked in GnuTLS and sealed together at the flush
    /// (`TLSSession.cork`): an HTTP/1.1 head plus a 4 KiB body is one record and one write.
    private var corked = false
    private var corkedBytes = 0
    private var corkedPromises: [EventLoopPromise<Void>] = []
    /// Writes up to this size are corked; a larger one is sealed at once (after what is corked).
    static let smallWrite = 16 * 1024
    /// At most this much plaintext waits in the cork before it is sealed without a flush.
    static let corkLimit = 64 * 1024

    public init(credentials: TLSCredentials, mode: TLSSession.Mode, alpn: [String], handshakeTimeout: TimeAmount = .seconds(10), logger: Logger) {
        self.credentials = credentials
        self.mode = mode
        self.alpn = alpn
        self.handshakeTimeout = handshakeTimeout
        self.logger = logger
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        do {
            session = try TLSSession(credentials: credentials, mode: mode, alpn: alpn, allocator: context.channel.allocator)
        } catch {
            context.fireErrorCaught(error)
            context.close(promise: nil)
            return
        }
        if context.channel.isActive { start(context: context) }
    }

    public func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    private func start(context: ChannelHandlerContext) {
        guard timeoutTask == nil else { return }
        let timeout = handshakeTimeout
        let logger = self.logger
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timeoutTask = context.eventLoop.scheduleTask(in: timeout) {
            let (handler, context) = bound.value
            guard let s = handler.session, !s.handshakeComplete else { return }
            logger.info("TLS handshake timed out", metadata: ["peer": "\(context.remoteAddress.map(\.endpoint) ?? "?")"])
            handler.fail(context: context, error: TLSError(code: 0, context: "handshake timed out after \(timeout)"))
        }
        if case .client = mode { advanceHandshake(context: context) }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let session, !failed else { return }
        var buf = unwrapInboundIn(data)
        if session.inbound.readableBytes == 0 {
            session.inbound = buf
        } else {
            session.inbound.writeBuffer(&buf)
        }
        if !session.handshakeComplete {
            advanceHandshake(context: context)
            guard session.handshakeComplete else { return }
        }
        readRecords(context: context)
    }

    private func advanceHandshake(context: ChannelHandlerContext) {
        guard let session else { return }
        do {
            let done = try session.handshake()
            flushCiphertext(context: context, promise: nil)
            guard done else { return }
            timeoutTask?.cancel()
            timeoutTask = nil
            let peer: PeerIdentity
            switch mode {
            case .server(let auth):
                do {
                    // Optional mode: no certificate is an anonymous reader, but a certificate
                    // that is sent must verify *and* pass the role rules like any other.
                    if auth == .optionalReadOnly, try !session.verifyOptionalPeer() {
                        peer = .anonymousReader
                    } else if let p = try session.authenticatedPeer() {
                        peer = p
                    } else {
                        let refusal = PeerCertificateRejected.noClientCertificate()
                        session.sendFatalAlert(gnutls_alert_description_t(refusal.alert))
                        throw refusal
                    }
                } catch let refused as PeerCertificateRefused {
                    TLSRefusalLog.log(logger, remote: context.remoteAddress.map(\.endpoint) ?? "?", kind: "role \(refused.subject)",
                                      "\(refused) (alert: \(refused.alertName))")
                    session.sendFatalAlert(refused.alert)
                    throw refused
                }
            case .client:
                peer = session.peerIdentity() ?? PeerIdentity(commonName: nil, role: nil, authenticated: false)
            }
            context.fireUserInboundEventTriggered(TLSEstablishedEvent(peer: peer, alpn: session.negotiatedALPN))
            let writes = pendingWrites
            pendingWrites = []
            for (buf, promise) in writes { encryptAndWrite(context: context, buf, promise: promise) }
            if !writes.isEmpty { context.flush() }
            if session.inbound.readableBytes > 0 { readRecords(context: context) }
        } catch {
            if case .server = mode {
                let remote = context.remoteAddress.map(\.endpoint) ?? "?"
                if let refused = error as? PeerCertificateRejected {
                    TLSRefusalLog.log(logger, remote: remote, kind: "alert \(refused.alert)", "\(refused)")
                } else if let alert = error as? TLSAlertReceived {
                    // A client that refused this node's certificate (another CA, a name it did not dial).
                    TLSRefusalLog.log(logger, remote: remote, kind: "peer alert \(alert.alert)", "\(alert)")
                }
            }
            fail(context: context, error: error)
        }
    }

    private func readRecords(context: ChannelHandlerContext) {
        guard let session else { return }
        var out = plaintext ?? context.channel.allocator.buffer(capacity: 32 * 1024)
        plaintext = nil
        do {
            let result = try session.receive(into: &out)
            flushCiphertext(context: context, promise: nil)
            if out.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(out)) }
            if case .closed = result {
                context.close(promise: nil)
            }
        } catch {
            fail(context: context, error: error)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buf = unwrapOutboundIn(data)
        guard let session, session.handshakeComplete else {
            pendingWrites.append((buf, promise))
            return
        }
        let n = buf.readableBytes
        guard n <= Self.smallWrite else {
            sealCorked(context: context)
            encryptAndWrite(context: context, buf, promise: promise)
            return
        }
        if corkedBytes + n > Self.corkLimit { sealCorked(context: context) }
        guard !failed else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        do {
            if !corked {
                try session.cork()
                corked = true
            }
            try session.send(buf)
            corkedBytes += n
            if let promise { corkedPromises.append(promise) }
        } catch {
            promise?.fail(error)
            fail(context: context, error: error)
        }
    }

    public func flush(context: ChannelHandlerContext) {
        sealCorked(context: context)
        context.flush()
    }

    /// Seal the corked writes into records and pass them down (not flushed).
    private func sealCorked(context: ChannelHandlerContext) {
        guard corked, let session, !failed else { return }
        corked = false
        corkedBytes = 0
        let promises = corkedPromises
        corkedPromises = []
        var promise: EventLoopPromise<Void>?
        if promises.count == 1 {
            promise = promises[0]
        } else if !promises.isEmpty {
            let all = context.eventLoop.makePromise(of: Void.self)
            all.futureResult.whenComplete { result in
                for p in promises { p.completeWith(result) }
            }
            promise = all
        }
        do {
            try session.uncork()
            flushCiphertext(context: context, promise: promise, flush: false)
        } catch {
            promise?.fail(error)
            fail(context: context, error: error)
        }
    }

    private func failCorked() {
        let promises = corkedPromises
        corkedPromises = []
        corked = false
        corkedBytes = 0
        for p in promises { p.fail(ChannelError.ioOnClosedChannel) }
    }

    private func encryptAndWrite(context: ChannelHandlerContext, _ buf: ByteBuffer, promise: EventLoopPromise<Void>?) {
        guard let session, !failed else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        do {
            try session.send(buf)
            flushCiphertext(context: context, promise: promise, flush: false)
        } catch {
            promise?.fail(error)
            fail(context: context, error: error)
        }
    }

    private func flushCiphertext(context: ChannelHandlerContext, promise: EventLoopPromise<Void>?, flush: Bool = true) {
        if let out = session?.takeOutbound() {
            context.write(wrapOutboundOut(out), promise: promise)
            if flush { context.flush() }
        } else {
            promise?.succeed(())
        }
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode == .all, let session, session.handshakeComplete, !failed {
            sealCorked(context: context)
            session.bye()
            flushCiphertext(context: context, promise: nil)
        }
        context.close(mode: mode, promise: promise)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        timeoutTask?.cancel()
        timeoutTask = nil
        let writes = pendingWrites
        pendingWrites = []
        for (_, p) in writes { p?.fail(ChannelError.ioOnClosedChannel) }
        failCorked()
        // Nothing more can go to or come from the peer: free the GnuTLS session now rather than
        // whenever the pipeline is released (`close()` is idempotent; later calls are no-ops).
        session?.close()
        context.fireChannelInactive()
    }

    private func fail(context: ChannelHandlerContext, error: Error) {
        guard !failed else { return }
        failed = true
        failCorked()
        timeoutTask?.cancel()
        timeoutTask = nil
        // Send whatever alert GnuTLS queued, then close.
        flushCiphertext(context: context, promise: nil)
        logger.debug("TLS failure", metadata: ["error": "\(error)", "peer": "\(context.remoteAddress.map(\.endpoint) ?? "?")"])
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }
}
