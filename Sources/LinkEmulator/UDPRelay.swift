import Logging
import NIOCore
import NIOPosix

/// One client source address of a UDP link: its own upstream socket, so replies of the target go
/// back to the right client. The socket is not connected: a target on a wildcard address may answer
/// from another of its addresses. Event-loop confined.
final class UDPMapping {
    let client: SocketAddress
    var channel: (any Channel)?
    /// Datagrams that arrived before the upstream socket was open (bounded by the queue limit).
    var pending: [(ByteBuffer, Int?)] = []
    var pendingBytes = 0
    var lastActive: Int64
    var closed = false
    /// Written to `channel` in the current read batch, not flushed yet.
    var dirty = false

    init(client: SocketAddress, now: Int64) {
        self.client = client
        self.lastActive = now
    }
}

/// The UDP side of a link: the listening socket, the per-client mappings, and one delay line
/// (a timer heap with one armed timer) for the datagrams of both directions.
///
/// The forwarding path works like a kernel forwarder's: every socket reads in batches (vector reads,
/// `recvmmsg`, of up to ``vectorReadCount`` messages, each possibly a GRO-coalesced run of datagrams),
/// writes of one read batch are flushed once at its end (`sendmmsg`, GSO for coalesced runs), and
/// a zero-delay link forwards every read inline: no timer, no copy, no per-datagram closure, the
/// received buffer itself is sent on. Only a shaped link splits coalesced runs into datagrams
/// (each gets its own loss and time) and copies what it holds.
final class UDPLink {
    let core: LinkCore
    var listener: (any Channel)?
    private var mappings: [SocketAddress: UDPMapping] = [:]
    /// The mapping of the previous client datagram (the hot path skips the dictionary).
    private var lastMapping: UDPMapping?
    private var heap = TimerHeap<(mapping: UDPMapping, direction: LinkDirection, data: ByteBuffer)>()
    private var heldBytes = [0, 0]
    private var timer: Scheduled<Void>?
    private var timerAt: Int64 = .max
    private var listenerNeedsFlush = false
    private var dirtyUpstreams: [UDPMapping] = []
    /// Packets and bytes per direction forwarded in this read batch, added to the counters at its end.
    private var batchPackets = (0, 0)
    private var batchBytes = (0, 0)
    private var sweeper: RepeatedTask?

    /// Datagrams (or GRO-coalesced runs of them) up to 64 KiB.
    static let maxDatagram = 65_536
    /// Messages per `recvmmsg`: the receive buffer is this many 64 KiB slots.
    static let vectorReadCount = 8

    init(core: LinkCore) {
        self.core = core
    }

    /// Binds the listener on the link's loop; the link object lives there only.
    static func bind(core: NIOLoopBound<LinkCore>, loop: any EventLoop, host: String, port: Int)
        async throws -> (any Channel, NIOLoopBound<UDPLink>) {
        let box = NIOLoopBoundBox.makeEmptyBox(valueType: UDPLink.self, eventLoop: loop)
        let ch = try await bootstrap(loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let link = UDPLink(core: core.value)
                    box.value = link
                    try ch.pipeline.syncOperations.addHandler(UDPListenerHandler(link: link))
                }
            }
            .bind(host: host, port: port).get()
        return (ch, try await loop.submit {
            let link = box.value!
            link.started(listener: ch)
            return NIOLoopBound(link, eventLoop: loop)
        }.get())
    }

    private func started(listener ch: any Channel) {
        listener = ch
        let sweepEvery = TimeAmount.nanoseconds(max(core.udpIdleTimeout.nanoseconds / 4, 10_000_000))
        let bound = NIOLoopBound(self, eventLoop: core.loop)
        sweeper = core.loop.scheduleRepeatedTask(initialDelay: sweepEvery, delay: sweepEvery) { _ in
            bound.value.sweep()
        }
    }

    /// UDP GRO on receive and GSO on send: a coalesced read (up to 64 KiB of equal-size datagrams)
    /// is forwarded with one GSO send of the same segment size, so the receiver gets exactly the
    /// datagrams that were sent, for a fraction of the syscalls. Shaped links split it per datagram.
    static let offload = System.supportsUDPReceiveOffload && System.supportsUDPSegmentationOffload

    static func bootstrap(_ loop: any EventLoop) -> DatagramBootstrap {
        var b = DatagramBootstrap(group: loop)
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelOption(.socketOption(.so_sndbuf), value: 4 << 20)
            .channelOption(.datagramVectorReadMessageCount, value: vectorReadCount)
            .channelOption(.maxMessagesPerRead, value: 4)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: vectorReadCount * maxDatagram))
        if offload {
            b = b.channelOption(.datagramReceiveOffload, value: true)
                .channelOption(.datagramReceiveSegmentSize, value: true)
        }
        return b
    }

    // MARK: datagrams

    func fromClient(_ env: AddressedEnvelope<ByteBuffer>) {
        let now = LinkCore.now()
        let m: UDPMapping
        if let last = lastMapping, !last.closed, last.client == env.remoteAddress {
            m = last
        } else if let existing = mappings[env.remoteAddress] {
            m = existing
        } else {
            m = UDPMapping(client: env.remoteAddress, now: now)
            mappings[env.remoteAddress] = m
            core.counters.udpMappings.wrappingAdd(1, ordering: .relaxed)
            openUpstream(m)
        }
        lastMapping = m
        m.lastActive = now
        if core.transparent {
            deliver(m, .toTarget, env.data, segment: env.metadata?.segmentSize)
        } else {
            schedule(m, .toTarget, env.data, segment: env.metadata?.segmentSize, now: now)
        }
    }

    func fromTarget(_ m: UDPMapping, _ env: AddressedEnvelope<ByteBuffer>) {
        guard !m.closed else { return }
        let now = LinkCore.now()
        m.lastActive = now
        if core.transparent {
            deliver(m, .toClient, env.data, segment: env.metadata?.segmentSize)
        } else {
            schedule(m, .toClient, env.data, segment: env.metadata?.segmentSize, now: now)
        }
    }

    /// End of a read batch: one flush per socket written to, counters updated once.
    func readComplete() {
        flushAll()
    }

    /// A shaped link: each datagram (also each of a coalesced run) gets its own fate and time.
    private func schedule(_ m: UDPMapping, _ d: LinkDirection, _ data: ByteBuffer, segment: Int?, now: Int64) {
        if let seg = segment, seg > 0, data.readableBytes > seg {
            var rest = data
            while rest.readableBytes > 0, let one = rest.readSlice(length: min(seg, rest.readableBytes)) {
                schedule(m, d, one, segment: nil, now: now)
            }
            return
        }
        switch core.shapers[d.rawValue].datagramDelivery(bytes: data.readableBytes, now: now) {
        case .lost:
            core.counters.udpDroppedLoss.wrappingAdd(1, ordering: .relaxed)
        case .queueFull:
            core.counters.udpDroppedQueue.wrappingAdd(1, ordering: .relaxed)
        case .deliver(let at):
            if at <= now && heap.isEmpty {
                deliver(m, d, data, segment: nil)
                return
            }
            let n = data.readableBytes
            // Memory bound of the delay line itself (the rate queue is bounded by the shaper).
            guard heldBytes[d.rawValue] + n <= core.queueLimit else {
                core.counters.udpDroppedQueue.wrappingAdd(1, ordering: .relaxed)
                return
            }
            heldBytes[d.rawValue] += n
            // A held datagram gets a buffer of its own size: it must not pin the (up to 512 KiB)
            // receive buffer it was read into, and the held bytes are then what the bound counts.
            var copy = ByteBufferAllocator().buffer(capacity: n)
            copy.writeImmutableBuffer(data)
            heap.push(at, (m, d, copy))
            armTimer()
        }
    }

    /// Writes `data` (a coalesced run of `segment`-sized datagrams when `segment` is smaller) on; the
    /// flush comes at the end of the read batch or timer round.
    private func deliver(_ m: UDPMapping, _ d: LinkDirection, _ data: ByteBuffer, segment: Int?) {
        guard !m.closed else { return }
        let n = data.readableBytes
        let gso = segment.flatMap { $0 > 0 && n > $0 ? $0 : nil }
        switch d {
        case .toTarget:
            guard let ch = m.channel else {
                // Upstream socket still opening: hold (bounded), sent when it is open.
                guard m.pendingBytes + n <= core.queueLimit else {
                    core.counters.udpDroppedQueue.wrappingAdd(1, ordering: .relaxed)
                    return
                }
                m.pendingBytes += n
                m.pending.append((data, gso))
                return
            }
            Self.write(ch, data, gso: gso, to: core.udpTarget)
            if !m.dirty {
                m.dirty = true
                dirtyUpstreams.append(m)
            }
            batchPackets.0 += gso.map { (n + $0 - 1) / $0 } ?? 1
            batchBytes.0 += n
        case .toClient:
            guard let l = listener else { return }
            Self.write(l, data, gso: gso, to: m.client)
            listenerNeedsFlush = true
            batchPackets.1 += gso.map { (n + $0 - 1) / $0 } ?? 1
            batchBytes.1 += n
        }
    }

    /// A GSO run carries its segment size in the envelope's metadata.
    @inline(__always)
    private static func write(_ ch: any Channel, _ data: ByteBuffer, gso: Int?, to address: SocketAddress) {
        if let seg = gso {
            let metadata = AddressedEnvelope<ByteBuffer>.Metadata(ecnState: .transportNotCapable, packetInfo: nil, segmentSize: seg)
            ch.write(AddressedEnvelope(remoteAddress: address, data: data, metadata: metadata), promise: nil)
        } else {
            ch.write(AddressedEnvelope(remoteAddress: address, data: data), promise: nil)
        }
    }

    private func flushAll() {
        if listenerNeedsFlush {
            listenerNeedsFlush = false
            listener?.flush()
        }
        if !dirtyUpstreams.isEmpty {
            for m in dirtyUpstreams {
                m.dirty = false
                m.channel?.flush()
            }
            dirtyUpstreams.removeAll(keepingCapacity: true)
        }
        let c = core.counters
        if batchPackets.0 > 0 {
            c.udpPackets.add(.toTarget, Int64(batchPackets.0))
            c.udpBytes.add(.toTarget, Int64(batchBytes.0))
        }
        if batchPackets.1 > 0 {
            c.udpPackets.add(.toClient, Int64(batchPackets.1))
            c.udpBytes.add(.toClient, Int64(batchBytes.1))
        }
        batchPackets = (0, 0)
        batchBytes = (0, 0)
    }

    private func armTimer() {
        guard let next = heap.nextDeadline, next < timerAt else { return }
        timer?.cancel()
        timerAt = next
        timer = core.loop.assumeIsolated().scheduleTask(deadline: LinkCore.deadline(next)) { [self] in
            timer = nil
            timerAt = .max
            fire()
        }
    }

    private func fire() {
        let now = LinkCore.now()
        while let e = heap.popDue(now) {
            heldBytes[e.direction.rawValue] -= e.data.readableBytes
            deliver(e.mapping, e.direction, e.data, segment: nil)
        }
        flushAll()
        armTimer()
    }

    // MARK: mappings

    private func openUpstream(_ m: UDPMapping) {
        let bindHost: String
        switch core.udpTarget {
        case .v6: bindHost = "::"
        default: bindHost = "0.0.0.0"
        }
        let bound = NIOLoopBound((link: self, mapping: m), eventLoop: core.loop)
        Self.bootstrap(core.loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(UDPUpstreamHandler(link: bound.value.link, mapping: bound.value.mapping))
                }
            }
            .bind(host: bindHost, port: 0)
            .assumeIsolated()
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
                    m.pendingBytes = 0
                    for (data, gso) in pending {
                        Self.write(ch, data, gso: gso, to: core.udpTarget)
                        core.counters.udpPackets.add(.toTarget, Int64(gso.map { (data.readableBytes + $0 - 1) / $0 } ?? 1))
                        core.counters.udpBytes.add(.toTarget, Int64(data.readableBytes))
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
        m.pendingBytes = 0
        m.channel?.close(promise: nil)
        if mappings[m.client] === m { mappings[m.client] = nil }
        if lastMapping === m { lastMapping = nil }
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
