import Logging
import NIOCore
import NIOPosix

/// One client source address of a UDP link: its own upstream socket, so replies of the target
/// go back to the right client. Event-loop confined.
final class UDPMapping {
    let client: SocketAddress
    var channel: (any Channel)?
    var pending: [ByteBuffer] = []
    var lastActive: Int64
    var closed = false

    init(client: SocketAddress, now: Int64) {
        self.client = client
        self.lastActive = now
    }
}

/// The UDP side of a link: the listening socket, the per-client mappings, and one delay line
/// (a timer heap with one armed timer) for the datagrams of both directions.
final class UDPLink {
    let core: LinkCore
    var listener: (any Channel)?
    private var mappings: [SocketAddress: UDPMapping] = [:]
    private var heap = TimerHeap<(mapping: UDPMapping, direction: LinkDirection, data: ByteBuffer)>()
    private var heldBytes = [0, 0]
    private var timer: Scheduled<Void>?
    private var timerAt: Int64 = .max
    private var listenerNeedsFlush = false
    private var dirtyUpstreams: [any Channel] = []
    private var sweeper: RepeatedTask?

    /// Datagrams up to 64 KiB (GRO is not enabled, so every read is one datagram as sent).
    static let maxDatagram = 65_536

    init(core: LinkCore) {
        self.core = core
    }

    static func bind(core: LinkCore, host: String, port: Int) async throws -> (any Channel, UDPLink) {
        let link = UDPLink(core: core)
        let ch = try await bootstrap(core.loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(UDPListenerHandler(link: link)) }
            }
            .bind(host: host, port: port).get()
        try await core.loop.submit {
            link.listener = ch
            let sweepEvery = TimeAmount.nanoseconds(max(core.udpIdleTimeout.nanoseconds / 4, 10_000_000))
            link.sweeper = core.loop.scheduleRepeatedTask(initialDelay: sweepEvery, delay: sweepEvery) { _ in
                link.sweep()
            }
        }.get()
        return (ch, link)
    }

    static func bootstrap(_ loop: any EventLoop) -> DatagramBootstrap {
        DatagramBootstrap(group: loop)
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelOption(.socketOption(.so_sndbuf), value: 4 << 20)
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: maxDatagram))
    }

    // MARK: datagrams

    func fromClient(_ env: AddressedEnvelope<ByteBuffer>) {
        let now = LinkCore.now()
        let m: UDPMapping
        if let existing = mappings[env.remoteAddress] {
            m = existing
        } else {
            m = UDPMapping(client: env.remoteAddress, now: now)
            mappings[env.remoteAddress] = m
            core.counters.udpMappings.wrappingAdd(1, ordering: .relaxed)
            openUpstream(m)
        }
        m.lastActive = now
        schedule(m, .toTarget, env.data, now: now)
    }

    func fromTarget(_ m: UDPMapping, _ env: AddressedEnvelope<ByteBuffer>) {
        guard !m.closed else { return }
        let now = LinkCore.now()
        m.lastActive = now
        schedule(m, .toClient, env.data, now: now)
    }

    func readComplete() {
        flushAll()
    }

    private func schedule(_ m: UDPMapping, _ d: LinkDirection, _ data: ByteBuffer, now: Int64) {
        if core.transparent {
            deliver(m, d, data)
            return
        }
        switch core.shapers[d.rawValue].datagramDelivery(bytes: data.readableBytes, now: now) {
        case .lost:
            core.counters.udpDroppedLoss.wrappingAdd(1, ordering: .relaxed)
        case .queueFull:
            core.counters.udpDroppedQueue.wrappingAdd(1, ordering: .relaxed)
        case .deliver(let at):
            if at <= now && heap.isEmpty {
                deliver(m, d, data)
                return
            }
            let n = data.readableBytes
            // Memory bound of the delay line itself (the rate queue is bounded by the shaper).
            guard heldBytes[d.rawValue] + n <= core.queueLimit else {
                core.counters.udpDroppedQueue.wrappingAdd(1, ordering: .relaxed)
                return
            }
            heldBytes[d.rawValue] += n
            heap.push(at, (m, d, compact(data)))
            armTimer()
        }
    }

    /// A small datagram held for a while gets its own buffer, so the 64 KiB receive buffer is reused.
    private func compact(_ data: ByteBuffer) -> ByteBuffer {
        guard data.readableBytes < data.capacity / 4 else { return data }
        var copy = ByteBufferAllocator().buffer(capacity: data.readableBytes)
        copy.writeImmutableBuffer(data)
        return copy
    }

    private func deliver(_ m: UDPMapping, _ d: LinkDirection, _ data: ByteBuffer) {
        guard !m.closed else { return }
        switch d {
        case .toTarget:
            guard let ch = m.channel else {
                m.pending.append(data)
                return
            }
            ch.write(AddressedEnvelope(remoteAddress: core.target, data: data), promise: nil)
            if !dirtyUpstreams.contains(where: { $0 === ch }) { dirtyUpstreams.append(ch) }
        case .toClient:
            guard let l = listener else { return }
            l.write(AddressedEnvelope(remoteAddress: m.client, data: data), promise: nil)
            listenerNeedsFlush = true
        }
        core.counters.udpPackets.add(d, 1)
        core.counters.udpBytes.add(d, Int64(data.readableBytes))
    }

    private func flushAll() {
        if listenerNeedsFlush {
            listenerNeedsFlush = false
            listener?.flush()
        }
        if !dirtyUpstreams.isEmpty {
            for ch in dirtyUpstreams { ch.flush() }
            dirtyUpstreams.removeAll(keepingCapacity: true)
        }
    }

    private func armTimer() {
        guard let next = heap.nextDeadline, next < timerAt else { return }
        timer?.cancel()
        timerAt = next
        timer = core.loop.assumeIsolatedUnsafeUnchecked().scheduleTask(deadline: LinkCore.deadline(next)) { [self] in
            timer = nil
            timerAt = .max
            fire()
        }
    }

    private func fire() {
        let now = LinkCore.now()
        while let e = heap.popDue(now) {
            heldBytes[e.direction.rawValue] -= e.data.readableBytes
            deliver(e.mapping, e.direction, e.data)
        }
        flushAll()
        armTimer()
    }

    // MARK: mappings

    private func openUpstream(_ m: UDPMapping) {
        let bindHost: String
        switch core.target {
        case .v6: bindHost = "::"
        default: bindHost = "0.0.0.0"
        }
        Self.bootstrap(core.loop)
            .channelInitializer { [self] ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(UDPUpstreamHandler(link: self, mapping: m))
                }
            }
            .bind(host: bindHost, port: 0)
            .assumeIsolatedUnsafeUnchecked()
            .whenComplete { [self] result in
                switch result {
                case .success(let ch):
                    if m.closed {
                        ch.close(promise: nil)
                        return
                    }
                    m.channel = ch
                    let pending = m.pending
                    m.pending = []
                    for data in pending {
                        ch.write(AddressedEnvelope(remoteAddress: core.target, data: data), promise: nil)
                    }
                    ch.flush()
                case .failure(let error):
                    core.logger.warning("udp: cannot open an upstream socket for \(m.client): \(error)")
                    close(m)
                }
            }
    }

    private func close(_ m: UDPMapping) {
        guard !m.closed else { return }
        m.closed = true
        m.pending = []
        m.channel?.close(promise: nil)
        if mappings[m.client] === m { mappings[m.client] = nil }
    }

    func sweep() {
        let cutoff = LinkCore.now() - core.udpIdleTimeout.nanoseconds
        for m in mappings.values where m.lastActive < cutoff { close(m) }
    }

    func shutdown() {
        sweeper?.cancel()
        timer?.cancel()
        heap.removeAll()
        for m in Array(mappings.values) { close(m) }
        listener?.close(promise: nil)
    }
}

extension UDPMapping: @unchecked Sendable {}

final class UDPListenerHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let link: UDPLink
    init(link: UDPLink) { self.link = link }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { link.fromClient(unwrapInboundIn(data)) }
    func channelReadComplete(context: ChannelHandlerContext) { link.readComplete() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ICMP errors (e.g. a client gone) must not close the listener.
        link.core.logger.debug("udp listener: \(error)")
    }
}

final class UDPUpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let link: UDPLink
    let mapping: UDPMapping
    init(link: UDPLink, mapping: UDPMapping) {
        self.link = link
        self.mapping = mapping
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { link.fromTarget(mapping, unwrapInboundIn(data)) }
    func channelReadComplete(context: ChannelHandlerContext) { link.readComplete() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNREFUSED from ICMP port unreachable (target not up yet) is not fatal for the mapping.
        link.core.logger.debug("udp upstream for \(mapping.client): \(error)")
    }
}

extension UDPLink: @unchecked Sendable {}
