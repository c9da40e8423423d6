import MeshHTTP
import NIOCore
import Synchronization
import Testing

@Suite struct HTTPInboundBodyTests {
    @Test func consumerCreditsExactlyWhatItTakes() async throws {
        let credited = Mutex(0)
        let body = HTTPInboundBody(onConsumed: { n in credited.withLock { $0 += n } })
        body.append(ByteBuffer(string: "abc"))
        body.append(ByteBuffer(string: "defg"))
        #expect(credited.withLock { $0 } == 0)
        #expect(body.bufferedBytes == 7)
        var it = body.makeAsyncIterator()
        // What is already buffered comes in one piece (fewer wake-ups), credited exactly.
        #expect(try await it.next().map { String(buffer: $0) } == "abcdefg")
        #expect(credited.withLock { $0 } == 7)
        body.append(ByteBuffer(string: "xy"))
        body.finish()
        #expect(try await it.next().map { String(buffer: $0) } == "xy")
        #expect(try await it.next() == nil)
        #expect(credited.withLock { $0 } == 9)
    }

    @Test func mergingStopsAtOneMebibyte() async throws {
        let body = HTTPInboundBody()
        for _ in 0..<40 { body.append(ByteBuffer(repeating: 1, count: 64 * 1024)) }   // 2.5 MiB
        body.finish()
        var sizes: [Int] = []
        for try await c in body { sizes.append(c.readableBytes) }
        #expect(sizes.allSatisfy { $0 <= HTTPInboundBody.maxMerge })
        #expect(sizes.reduce(0, +) == 40 * 64 * 1024)
        #expect(sizes.count == 3)
    }

    @Test func waitingConsumerGetsChunkAndFailure() async throws {
        let body = HTTPInboundBody()
        async let first = body.next()
        try await Task.sleep(for: .milliseconds(20))
        body.append(ByteBuffer(string: "x"))
        #expect(try await first.map { String(buffer: $0) } == "x")
        body.append(ByteBuffer(string: "dropped"))
        #expect(body.fail(HTTPTransportError.streamReset(errorCode: 8)) == 7)
        await #expect(throws: HTTPTransportError.streamReset(errorCode: 8)) { try await body.next() }
        #expect(!body.append(ByteBuffer(string: "late")))
    }

    @Test func collectRefusesOversize() async throws {
        let body = HTTPInboundBody.complete(ByteBuffer(repeating: 1, count: 100))
        await #expect(throws: HTTPTransportError.tooLarge(limit: 10)) { _ = try await body.collect(upTo: 10) }
    }

    @Test func cancellationWakesWaitingConsumer() async throws {
        let body = HTTPInboundBody()
        let t = Task { try await body.next() }
        try await Task.sleep(for: .milliseconds(20))
        t.cancel()
        await #expect(throws: CancellationError.self) { _ = try await t.value }
    }
}

@Suite("Request body idle timeout")
struct BodyIdleTimeoutTests {
    @Test("the decision: a silent sender fails the body after the timeout; a consumer that is behind (bytes buffered) does not")
    func idleDecision() async throws {
        let body = HTTPInboundBody(idleTimeout: .seconds(10))
        body.append(ByteBuffer(string: "first"))
        let t = ContinuousClock.now
        // Buffered, unread: our side is late, not the sender.
        #expect(body.checkIdle(now: t + .seconds(60)))
        #expect(try await body.next()?.readableBytes == 5)
        #expect(body.checkIdle(now: t + .seconds(5)))
        body.append(ByteBuffer(string: "more"))     // progress resets the clock
        #expect(try await body.next()?.readableBytes == 4)
        #expect(!body.checkIdle(now: ContinuousClock.now + .seconds(11)))
        await #expect(throws: HTTPTransportError.bodyIdleTimeout(.seconds(10))) { _ = try await body.next() }
        // An ended body is never failed.
        let done = HTTPInboundBody(idleTimeout: .seconds(1))
        done.finish()
        #expect(!done.checkIdle(now: ContinuousClock.now + .seconds(60)))
        #expect(try await done.next() == nil)
    }

    @Test("a trickle — bytes often enough to dodge the idle timeout, far below the minimum rate — fails too; a body our side holds back does not")
    func trickleFails() async throws {
        let body = HTTPInboundBody(idleTimeout: .seconds(10), minimumRate: 1000)   // window: 5 s, floor 5,000 bytes
        let start = ContinuousClock.now
        body.append(ByteBuffer(bytes: [UInt8](repeating: 1, count: 200)))
        #expect(try await body.next()?.readableBytes == 200)
        #expect(body.checkIdle(now: start + .seconds(4)))                 // window not over yet
        #expect(!body.checkIdle(now: ContinuousClock.now + .seconds(6)))   // 200 bytes in 5+ s < 5,000
        await #expect(throws: HTTPTransportError.bodyTooSlow(minimumRate: 1000)) { _ = try await body.next() }

        let fast = HTTPInboundBody(idleTimeout: .seconds(10), minimumRate: 1000)
        fast.append(ByteBuffer(bytes: [UInt8](repeating: 1, count: 6000)))
        #expect(try await fast.next()?.readableBytes == 6000)
        #expect(fast.checkIdle(now: ContinuousClock.now + .seconds(6)))    // 6,000 ≥ 5,000: a new window starts
        fast.finish()

        let held = HTTPInboundBody(idleTimeout: .seconds(10), minimumRate: 1000)
        held.append(ByteBuffer(bytes: [1]))                                // unread: our consumer is behind
        #expect(held.checkIdle(now: ContinuousClock.now + .seconds(6)))
    }

    @Test("the watchdog fails a stalled body on its own")
    func watchdogFailsStalledBodies() async throws {
        let stalled = HTTPInboundBody(idleTimeout: .milliseconds(300))
        stalled.append(ByteBuffer(string: "first"))
        #expect(try await stalled.next()?.readableBytes == 5)
        await #expect(throws: HTTPTransportError.bodyIdleTimeout(.milliseconds(300))) { _ = try await stalled.next() }
    }
}
