import LinkEmulator
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// Echoes TCP (with half-close: EOF in → output closed after the echo) and UDP, on one port.
final class EchoServer: Sendable {
    let tcp: any Channel
    let udp: any Channel
    var port: Int { tcp.localAddress!.port! }

    private init(tcp: any Channel, udp: any Channel) {
        self.tcp = tcp
        self.udp = udp
    }

    final class TCPEcho: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.write(data, promise: nil) }
        func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let e = event as? ChannelEvent, e == .inputClosed { context.close(mode: .output, promise: nil) }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    final class UDPEcho: ChannelInboundHandler {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        typealias OutboundOut = AddressedEnvelope<ByteBuffer>
        let counter: EchoServerCounter
        init(counter: EchoServerCounter) { self.counter = counter }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let env = unwrapInboundIn(data)
            counter.count.add(1, ordering: .relaxed)
            context.write(wrapOutboundOut(AddressedEnvelope(remoteAddress: env.remoteAddress, data: env.data)), promise: nil)
        }
        func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    }

    static func start() async throws -> (EchoServer, EchoServerCounter) {
        let group = MultiThreadedEventLoopGroup.singleton
        let tcp = try await ServerBootstrap(group: group)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(TCPEcho()) } }
            .bind(host: "127.0.0.1", port: 0).get()
        let counter = EchoServerCounter()
        let udp = try await DatagramBootstrap(group: group)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(UDPEcho(counter: counter)) } }
            .bind(host: "127.0.0.1", port: tcp.localAddress!.port!).get()
        return (EchoServer(tcp: tcp, udp: udp), counter)
    }

    func close() async {
        try? await tcp.close()
        try? await udp.close()
    }
}

final class EchoServerCounter: Sendable {
    let count = Atomic<Int>(0)
}

/// Starts an echo server and a relay in front of it (listen port 0), runs `body`, closes both.
func withRelayedEcho(_ profile: LinkProfile, _ body: (Int, LinkRelay, EchoServerCounter) async throws -> Void) async throws {
    let (echo, counter) = try await EchoServer.start()
    let relay = try await LinkRelay.start([LinkSpec(listenHost: "127.0.0.1", listenPort: 0, targetHost: "127.0.0.1", targetPort: echo.port, profile: profile)])
    do {
        try await body(relay.links[0].listening.port!, relay, counter)
    } catch {
        await relay.close()
        await echo.close()
        throw error
    }
    await relay.close()
    await echo.close()
}

/// Sends `payload` over TCP to 127.0.0.1:port, half-closes, and returns what came back before EOF.
func tcpEcho(port: Int, payload: ByteBuffer, chunk: Int = 64 << 10) async throws -> ByteBuffer {
    let ch = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelOption(.allowRemoteHalfClosure, value: true)
        .connect(host: "127.0.0.1", port: port) { ch in
            ch.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch,
                                                            configuration: .init(isOutboundHalfClosureEnabled: true))
            }
        }
    return try await ch.executeThenClose { inbound, outbound in
        try await withThrowingTaskGroup(of: ByteBuffer?.self) { group in
            group.addTask {
                var p = payload
                while p.readableBytes > 0 {
                    try await outbound.write(p.readSlice(length: min(chunk, p.readableBytes))!)
                }
                outbound.finish()
                return nil
            }
            group.addTask {
                var got = ByteBuffer()
                for try await b in inbound { got.writeImmutableBuffer(b) }
                return got
            }
            var result = ByteBuffer()
            for try await r in group { if let r { result = r } }
            return result
        }
    }
}

func randomBuffer(_ n: Int) -> ByteBuffer {
    var g = SystemRandomNumberGenerator()
    var b = ByteBuffer()
    b.reserveCapacity(n)
    for _ in 0..<(n / 8) { b.writeInteger(g.next()) }
    return b
}

@Suite(.serialized) struct RelayLoopbackTests {
    @Test func tcpThroughADelayedLinkKeepsDataAndAddsTheRTT() async throws {
        try await withRelayedEcho(LinkProfile(delay: .milliseconds(20))) { port, relay, _ in
            // One small round trip: request and echo each cross the link once (≥ 2 × 20 ms).
            let t0 = ContinuousClock.now
            let small = try await tcpEcho(port: port, payload: ByteBuffer(string: "ping"))
            let rtt = ContinuousClock.now - t0
            #expect(String(buffer: small) == "ping")
            #expect(rtt >= .milliseconds(40), "RTT \(rtt)")

            let payload = randomBuffer(1 << 20)
            let echoed = try await tcpEcho(port: port, payload: payload)
            #expect(echoed.readableBytes == payload.readableBytes)
            #expect(echoed == payload, "1 MiB echoed intact")
            let c = relay.counters()[0]
            #expect(c.tcpConnections == 2)
            #expect(c.tcpBytesToTarget == Int64(payload.readableBytes) + 4)
            #expect(c.tcpBytesToClient == Int64(payload.readableBytes) + 4)
        }
    }

    @Test func tcpTransparentRelayAndManyConnections() async throws {
        try await withRelayedEcho(.transparent) { port, relay, _ in
            try await withThrowingTaskGroup(of: Bool.self) { group in
                for i in 0..<8 {
                    group.addTask {
                        let p = randomBuffer(256 << 10 + i * 8)
                        return try await tcpEcho(port: port, payload: p) == p
                    }
                }
                for try await ok in group { #expect(ok) }
            }
            #expect(relay.counters()[0].tcpConnections == 8)
        }
    }

    @Test func tcpRateLimitSerializes() async throws {
        // 4 MiB at 80 Mbit/s need ≥ 0.419 s on the link (each direction; they overlap).
        try await withRelayedEcho(LinkProfile(rateBitsPerSecond: 80_000_000)) { port, _, _ in
            let payload = randomBuffer(4 << 20)
            let t0 = ContinuousClock.now
            let echoed = try await tcpEcho(port: port, payload: payload)
            let took = ContinuousClock.now - t0
            #expect(echoed == payload)
            #expect(took >= .milliseconds(400), "took \(took)")
        }
    }

    @Test func tcpLossHoldsButDeliversEverything() async throws {
        try await withRelayedEcho(LinkProfile(delay: .milliseconds(1), loss: 0.02)) { port, relay, _ in
            let payload = randomBuffer(1 << 20)
            let echoed = try await tcpEcho(port: port, payload: payload, chunk: 8192)
            #expect(echoed == payload)
            #expect(relay.counters()[0].tcpLossHolds > 0)
        }
    }

    @Test func tcpConnectFailureClosesTheClient() async throws {
        // A target port with nothing listening: the client sees EOF, the counter counts it.
        let probe = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
        let deadPort = probe.localAddress!.port!
        try await probe.close()
        let relay = try await LinkRelay.start([LinkSpec(listenHost: "127.0.0.1", listenPort: 0, targetHost: "127.0.0.1", targetPort: deadPort)])
        let got = try? await tcpEcho(port: relay.links[0].listening.port!, payload: ByteBuffer(string: "x"))
        #expect((got?.readableBytes ?? 0) == 0)
        #expect(relay.counters()[0].tcpConnectFailures == 1)
        await relay.close()
    }

    /// Sends `datagrams` to the relay from one socket and collects replies until `count` arrived
    /// or `wait` passed; returns each reply's payload and arrival time after its send.
    func udpExchange(port: Int, datagrams: [ByteBuffer], expect count: Int, wait: Duration) async throws -> [(ByteBuffer, Duration)] {
        let ch = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
            .bind(host: "127.0.0.1", port: 0) { ch in
                ch.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>(wrappingChannelSynchronously: ch)
                }
            }
        let target = try SocketAddress(ipAddress: "127.0.0.1", port: port)
        return try await ch.executeThenClose { inbound, outbound in
            let start = ContinuousClock.now
            var sentAt: [Int: ContinuousClock.Instant] = [:]
            for (i, d) in datagrams.enumerated() {
                var tagged = ByteBuffer()
                tagged.writeInteger(UInt32(i))
                tagged.writeImmutableBuffer(d)
                sentAt[i] = ContinuousClock.now
                try await outbound.write(AddressedEnvelope(remoteAddress: target, data: tagged))
            }
            let sent = sentAt
            return try await withThrowingTaskGroup(of: [(ByteBuffer, Duration)]?.self) { group in
                group.addTask {
                    var out: [(ByteBuffer, Duration)] = []
                    for try await env in inbound {
                        var b = env.data
                        let i = Int(b.readInteger(as: UInt32.self)!)
                        out.append((b, ContinuousClock.now - sent[i]!))
                        if out.count >= count { break }
                    }
                    return out
                }
                group.addTask {
                    try await Task.sleep(until: start + wait)
                    return nil
                }
                let first = try await group.next()!
                group.cancelAll()
                return first ?? []
            }
        }
    }

    @Test func udpEchoThroughADelayedLink() async throws {
        try await withRelayedEcho(LinkProfile(delay: .milliseconds(20))) { port, relay, _ in
            var datagrams = (0..<10).map { ByteBuffer(string: "datagram \($0)") }
            datagrams.append(randomBuffer(60_000))  // a large datagram is forwarded whole
            let replies = try await udpExchange(port: port, datagrams: datagrams, expect: datagrams.count, wait: .seconds(10))
            #expect(replies.count == datagrams.count)
            for (data, rtt) in replies {
                #expect(rtt >= .milliseconds(40), "RTT \(rtt)")
                #expect(datagrams.contains(data))
            }
            let c = relay.counters()[0]
            #expect(c.udpMappings == 1)
            #expect(c.udpPacketsToTarget == 11 && c.udpPacketsToClient == 11)
            #expect(c.udpDroppedLoss == 0)
        }
    }

    @Test func udpTotalLossDeliversNothing() async throws {
        try await withRelayedEcho(LinkProfile(loss: 1)) { port, relay, counter in
            let datagrams = (0..<20).map { ByteBuffer(string: "lost \($0)") }
            let replies = try await udpExchange(port: port, datagrams: datagrams, expect: 1, wait: .milliseconds(500))
            #expect(replies.isEmpty)
            #expect(counter.count.load(ordering: .relaxed) == 0)
            let c = relay.counters()[0]
            #expect(c.udpDroppedLoss == 20)
            #expect(c.udpPacketsToTarget == 0)
        }
    }

    @Test func udpTransparent() async throws {
        try await withRelayedEcho(.transparent) { port, _, _ in
            let datagrams = (0..<50).map { ByteBuffer(string: "d\($0)") }
            let replies = try await udpExchange(port: port, datagrams: datagrams, expect: 50, wait: .seconds(10))
            #expect(replies.count == 50)
        }
    }
}
