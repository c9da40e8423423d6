import LinkEmulator
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// Records every datagram it receives: its tag (first 4 bytes) and size, in arrival order.
final class DatagramRecorder: Sendable {
    final class Log: Sendable {
        let entries = Mutex<[(tag: UInt32, size: Int)]>([])
    }
    let channel: any Channel
    private let log: Log
    var port: Int { channel.localAddress!.port! }

    private init(channel: any Channel, log: Log) {
        self.channel = channel
        self.log = log
    }

    final class Handler: ChannelInboundHandler, Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let recorder: @Sendable (UInt32, Int) -> Void
        init(_ recorder: @escaping @Sendable (UInt32, Int) -> Void) { self.recorder = recorder }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let env = unwrapInboundIn(data)
            recorder(env.data.getInteger(at: env.data.readerIndex, as: UInt32.self) ?? .max, env.data.readableBytes)
        }
    }

    static func start() async throws -> DatagramRecorder {
        let log = Log()
        let ch = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(Handler { tag, size in log.entries.withLock { $0.append((tag, size)) } })
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return DatagramRecorder(channel: ch, log: log)
    }

    var received: [(tag: UInt32, size: Int)] { log.entries.withLock { $0 } }
}

/// A client socket that sends runs of tagged datagrams with one GSO send each (the way our QUIC
/// sends), so that a relay with GRO reads each run as one coalesced buffer.
struct GSOSender {
    let channel: any Channel
    let target: SocketAddress

    static func start(to port: Int) async throws -> GSOSender {
        let ch = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
        return GSOSender(channel: ch, target: try SocketAddress(ipAddress: "127.0.0.1", port: port))
    }

    /// Sends datagrams tagged `first..<first+count`, each `size` bytes, as one GSO run.
    func sendRun(first: Int, count: Int, size: Int) async throws {
        var b = ByteBuffer()
        for i in first..<(first + count) {
            b.writeInteger(UInt32(i))
            b.writeRepeatingByte(UInt8(truncatingIfNeeded: i), count: size - 4)
        }
        let metadata = AddressedEnvelope<ByteBuffer>.Metadata(ecnState: .transportNotCapable, packetInfo: nil, segmentSize: size)
        try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: b, metadata: metadata)).get()
    }

    func close() async { try? await channel.close() }
}

/// A relay (listen port 0) in front of a datagram recorder.
func withRelayedRecorder(_ profile: LinkProfile, _ body: (GSOSender, LinkRelay, DatagramRecorder) async throws -> Void) async throws {
    let recorder = try await DatagramRecorder.start()
    let relay = try await LinkRelay.start([LinkSpec(listenHost: "127.0.0.1", listenPort: 0, targetHost: "127.0.0.1",
                                                    targetPort: recorder.port, profile: profile)])
    let sender = try await GSOSender.start(to: relay.links[0].listening.port!)
    do {
        try await body(sender, relay, recorder)
    } catch {
        await sender.close()
        await relay.close()
        try? await recorder.channel.close()
        throw error
    }
    await sender.close()
    await relay.close()
    try? await recorder.channel.close()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
func waitFor(_ timeout: Duration = .seconds(10), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return true
}

/// The relay's batched UDP path (vector reads, GRO-coalesced reads forwarded with GSO, one flush per
/// read batch): datagrams keep their boundaries and order, and a shaped link still treats every
/// datagram on its own (loss per datagram, the rate limit in bytes).
@Suite(.serialized) struct BatchedUDPRelayTests {
    static let runs = 10, perRun = 20, size = 1200

    @Test func coalescedRunsArriveAsTheSameDatagramsInOrder() async throws {
        try await withRelayedRecorder(.transparent) { sender, relay, recorder in
            for r in 0..<Self.runs {
                try await sender.sendRun(first: r * Self.perRun, count: Self.perRun, size: Self.size)
                // One run at a time: nothing is lost to a full socket buffer.
                try #require(await waitFor { recorder.received.count >= (r + 1) * Self.perRun })
            }
            let got = recorder.received
            #expect(got.map(\.tag) == (0..<UInt32(Self.runs * Self.perRun)).map { $0 }, "every datagram once, in order")
            #expect(got.allSatisfy { $0.size == Self.size }, "datagram boundaries kept: \(Set(got.map(\.size)))")
            let c = relay.counters()[0]
            #expect(c.udpPacketsToTarget == Int64(Self.runs * Self.perRun))
            #expect(c.udpBytesToTarget == Int64(Self.runs * Self.perRun * Self.size))
        }
    }

    @Test func lossIsDrawnPerDatagramInACoalescedRun() async throws {
        try await withRelayedRecorder(LinkProfile(loss: 0.5)) { sender, relay, recorder in
            for r in 0..<Self.runs {
                try await sender.sendRun(first: r * Self.perRun, count: Self.perRun, size: Self.size)
                // One run at a time (each datagram counted delivered or lost, and the delivered ones
                // received): nothing is lost to a full socket buffer.
                try #require(await waitFor {
                    let c = relay.counters()[0]
                    return c.udpPacketsToTarget + c.udpDroppedLoss == Int64((r + 1) * Self.perRun)
                        && recorder.received.count == Int(c.udpPacketsToTarget)
                })
            }
            let c = relay.counters()[0]
            #expect(c.udpDroppedLoss > 0 && c.udpPacketsToTarget > 0)
            // Per datagram, a run of 20 survives whole or is lost whole with probability 2 × 2^-20:
            // some runs must be partly delivered (all-or-nothing per read would never do that).
            let perRun = Dictionary(grouping: recorder.received, by: { Int($0.tag) / Self.perRun }).mapValues(\.count)
            #expect(perRun.values.contains { $0 > 0 && $0 < Self.perRun }, "runs delivered: \(perRun)")
            #expect(recorder.received.allSatisfy { $0.size == Self.size })
        }
    }

    @Test func rateLimitHoldsInBytesForCoalescedRuns() async throws {
        // 100 kB/s and a 16 KiB queue: 240 kB sent at once cannot all pass; what passes is bounded by
        // the queue plus what the rate carries in the time it took (measured generously, so a slow
        // machine only loosens the bound).
        let rate: Int64 = 800_000, queue = 16 << 10
        try await withRelayedRecorder(LinkProfile(rateBitsPerSecond: rate, queueLimitBytes: queue)) { sender, relay, recorder in
            let total = Self.runs * Self.perRun
            let t0 = ContinuousClock.now
            for r in 0..<Self.runs {
                try await sender.sendRun(first: r * Self.perRun, count: Self.perRun, size: Self.size)
            }
            #expect(await waitFor {
                let c = relay.counters()[0]
                return c.udpPacketsToTarget + c.udpDroppedQueue == Int64(total)
            })
            let elapsed = ContinuousClock.now - t0
            let c = relay.counters()[0]
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
            let bound = Double(queue) + Double(rate) / 8 * seconds + Double(Self.size)
            #expect(c.udpDroppedQueue > 0)
            #expect(Double(c.udpBytesToTarget) <= bound, "\(c.udpBytesToTarget) bytes passed in \(elapsed), bound \(bound)")
            #expect(await waitFor { recorder.received.count == Int(c.udpPacketsToTarget) })
            let tags = recorder.received.map(\.tag)
            #expect(tags == tags.sorted(), "no jitter: order kept")
        }
    }
}
