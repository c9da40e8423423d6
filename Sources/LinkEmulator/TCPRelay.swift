import Logging
import NIOCore
import NIOPosix

/// One direction of one relayed TCP connection: reads from `source`, delivers into `sink` at the
/// times the link's shaper gives, in order. Event-loop confined.
final class StreamPipe {
    let core: LinkCore
    let direction: LinkDirection
    weak var sourceHandler: TCPSideHandler?
    let sink: any Channel
    private var queue = CircularBuffer<(at: Int64, data: ByteBuffer?)>(initialCapacity: 16)
    private(set) var queuedBytes = 0
    private var lastDelivery: Int64 = .min
    private var timer: Scheduled<Void>?
    private var sinkNeedsFlush = false
    private(set) var eofQueued = false
    /// EOF delivered to the sink, or the sink is gone: nothing more flows this way.
    private(set) var done = false
    var onDone: (() -> Void)?

    init(core: LinkCore, direction: LinkDirection, sink: any Channel) {
        self.core = core
        self.direction = direction
        self.sink = sink
    }

    /// Stop reading the source: the queue is full or the sink cannot take more.
    var shouldPause: Bool { queuedBytes >= core.queueLimit || !sink.isWritable }

    func enqueue(_ data: ByteBuffer) {
        guard !done else { return }
        let n = data.readableBytes
        if core.transparent && queue.isEmpty {
            deliver(data)
            return
        }
        let now = LinkCore.now()
        let (at, held) = core.shapers[direction.rawValue].streamDelivery(bytes: n, now: now, previous: lastDelivery)
        lastDelivery = at
        if held { core.counters.tcpLossHolds.wrappingAdd(1, ordering: .relaxed) }
        if at <= now && queue.isEmpty {
            deliver(data)
            return
        }
        queue.append((at, data))
        queuedBytes += n
        armTimer()
    }

    func enqueueEOF() {
        guard !eofQueued, !done else { return }
        eofQueued = true
        let now = LinkCore.now()
        let at = max(lastDelivery, now + core.shapers[direction.rawValue].delayNs)
        lastDelivery = at
        if at <= now && queue.isEmpty {
            flushSink()
            deliverEOF()
            return
        }
        queue.append((at, nil))
        armTimer()
    }

    /// The sink went away: drop everything.
    func abandon() {
        guard !done else { return }
        done = true
        timer?.cancel()
        timer = nil
        queue.removeAll()
        queuedBytes = 0
        onDone?()
    }

    func flushSink() {
        if sinkNeedsFlush {
            sinkNeedsFlush = false
            sink.flush()
        }
    }

    private func deliver(_ data: ByteBuffer) {
        core.counters.tcpBytes.add(direction, Int64(data.readableBytes))
        sink.write(data, promise: nil)
        sinkNeedsFlush = true
    }

    private func deliverEOF() {
        done = true
        let sink = self.sink
        sink.close(mode: .output).whenFailure { _ in sink.close(promise: nil) }
        onDone?()
    }

    private func armTimer() {
        guard timer == nil, let first = queue.first else { return }
        timer = core.loop.assumeIsolated().scheduleTask(deadline: LinkCore.deadline(first.at)) { [self] in
            timer = nil
            fire()
        }
    }

    private func fire() {
        guard !done else { return }
        let now = LinkCore.now()
        while let first = queue.first, first.at <= now {
            queue.removeFirst()
            if let data = first.data {
                queuedBytes -= data.readableBytes
                deliver(data)
            } else {
                flushSink()
                deliverEOF()
                return
            }
        }
        flushSink()
        armTimer()
        sourceHandler?.resumeIfPossible()
    }
}

/// The handler on each of the two channels of a relayed connection. `outbound` is the pipe that
/// reads this channel; `inbound` the pipe that writes into it.
final class TCPSideHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    var outbound: StreamPipe?
    var inbound: StreamPipe?
    private var context: ChannelHandlerContext?
    private var readHeld = false
    /// The other channel of the connection (closed together with this one on errors).
    var partner: (any Channel)?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        outbound?.enqueue(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        outbound?.flushSink()
    }

    // Backpressure: autoRead asks for a read after each read cycle; hold it while the pipe is full.
    func read(context: ChannelHandlerContext) {
        if let o = outbound, !o.shouldPause {
            context.read()
        } else {
            readHeld = true
        }
    }

    func resumeIfPossible() {
        guard readHeld, let context, let o = outbound, !o.shouldPause else { return }
        readHeld = false
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { inbound?.sourceHandler?.resumeIfPossible() }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            outbound?.enqueueEOF()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Data already read still goes to the other side (then its FIN); nothing can come back.
        outbound?.enqueueEOF()
        inbound?.abandon()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Close both sides at once (queued data is dropped).
        context.close(promise: nil)
        partner?.close(promise: nil)
        inbound?.abandon()
        outbound?.abandon()
    }
}

enum TCPRelay {
    /// Reads grow up to 256 KiB: a bulk transfer costs fewer syscalls and wake-ups per byte.
    static var readAllocator: AdaptiveRecvByteBufferAllocator {
        AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 << 10)
    }

    static func bind(core: NIOLoopBound<LinkCore>, loop: any EventLoop, host: String, port: Int) async throws -> any Channel {
        try try await ServerBootstrap(group: loop, childGroup: loop)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.recvAllocator, value: readAllocator)
            .childChannelInitializer { child in
                // Accepted connections live on the link's loop (childGroup), where `core` is.
                child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.addHandler(TCPSideHandler())
                    core.value.track(child)
                    connect(core: core.value, client: child)
                }
            }
            .bind(host: host, port: port).get()
    }

    /// Connects to the target for an accepted client; reads of the client are held until then. On the loop.
    static func connect(core: LinkCore, client: any Channel) {
        ClientBootstrap(group: client.eventLoop)
            .connectTimeout(.seconds(10))
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.recvAllocator, value: readAllocator)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(TCPSideHandler()) }
            }
            .connect(to: core.target)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    core.counters.tcpConnectFailures.wrappingAdd(1, ordering: .relaxed)
                    core.logger.debug("connect to \(core.target) failed: \(error)")
                    client.close(promise: nil)
                case .success(let server):
                    core.track(server)
                    core.counters.tcpConnections.wrappingAdd(1, ordering: .relaxed)
                    guard let ch = try? client.pipeline.syncOperations.handler(type: TCPSideHandler.self),
                          let sh = try? server.pipeline.syncOperations.handler(type: TCPSideHandler.self) else {
                        client.close(promise: nil)
                        server.close(promise: nil)
                        return
                    }
                    link(core: core, client: client, clientHandler: ch, server: server, serverHandler: sh)
                }
            }
    }

    static func link(core: LinkCore, client: any Channel, clientHandler: TCPSideHandler, server: any Channel, serverHandler: TCPSideHandler) {
        let up = StreamPipe(core: core, direction: .toTarget, sink: server)
        let down = StreamPipe(core: core, direction: .toClient, sink: client)
        up.sourceHandler = clientHandler
        down.sourceHandler = serverHandler
        clientHandler.outbound = up
        clientHandler.inbound = down
        clientHandler.partner = server
        serverHandler.outbound = down
        serverHandler.inbound = up
        serverHandler.partner = client
        // Both directions finished (FIN delivered or the sink gone): close both sockets.
        let closeIfBothDone: () -> Void = { [weak up, weak down] in
            guard up?.done ?? true, down?.done ?? true else { return }
            client.close(promise: nil)
            server.close(promise: nil)
        }
        up.onDone = closeIfBothDone
        down.onDone = closeIfBothDone
        if !client.isActive { clientHandler.channelInactiveLate() }
        if !server.isActive { serverHandler.channelInactiveLate() }
        clientHandler.resumeIfPossible()
        serverHandler.resumeIfPossible()
    }
}

extension TCPSideHandler {
    /// The channel closed before the pipes were linked.
    func channelInactiveLate() {
        outbound?.enqueueEOF()
        inbound?.abandon()
    }
}
