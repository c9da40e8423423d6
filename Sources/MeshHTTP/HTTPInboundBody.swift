import NIOCore
import Synchronization

/// A body arriving from the network (request body on a server, response body on a client).
///
/// Backpressure: the transport opens the flow-control window only when the consumer has taken
/// a chunk (`onConsumed`), so the sender can never run further ahead than the window.
public final class HTTPInboundBody: AsyncSequence, Sendable {
    public typealias Element = ByteBuffer

    private struct State {
        var chunks = CircularBuffer<ByteBuffer>()
        var buffered = 0
        var finished = false
        var trailers: HTTPHeaders?
        var error: (any Error)?
        var waiter: CheckedContinuation<ByteBuffer?, any Error>?
        /// When the sender last delivered a byte (or the body began).
        var lastArrival = ContinuousClock.now
        /// The current rate window: when it began and the bytes that arrived in it.
        var windowStart = ContinuousClock.now
        var windowBytes = 0
        var readStarted = false
    }

    private let state = Mutex(State())
    /// Largest piece `next()` hands out when it merges buffered chunks.
    public static let maxMerge = 1 << 20
    /// Called (from the consumer's task) with the byte count of each chunk handed to the consumer.
    private let onConsumed: @Sendable (Int) -> Void

    /// With `idleTimeout`, the body fails with `bodyIdleTimeout` when nothing arrives for that
    /// long while nothing is buffered (the sender stalled, not our consumer): a stalled upload
    /// must not hold its write slot and reserved space for as long as the connection lives.
    /// Checked by `BodyWatchdog.shared` about once a second.
    ///
    /// With `minimumRate` (bytes per second) as well, a sender that trickles — a byte now and then,
    /// just often enough to dodge the idle timeout, holding a write slot forever — fails with
    /// `bodyTooSlow` when less than that rate arrived over a window of half the idle timeout
    /// (again only while nothing is buffered: a body held back by our own flow control is exempt).
    ///
    /// With `onFirstRead`, the transport withholds the body's window until its consumer first
    /// asks for bytes (the node's `RequestBodyBudget` credits only streams being read): it is
    /// called once, from the consumer's first `next()`. Until then, and while `heldBack` says the
    /// budget keeps the stream waiting, a silent sender is not timed out (the silence is ours).
    public init(onConsumed: @escaping @Sendable (Int) -> Void = { _ in }, idleTimeout: Duration? = nil, minimumRate: Int = 0,
                onFirstRead: (@Sendable () -> Void)? = nil, heldBack: (@Sendable () -> Bool)? = nil) {
        self.onConsumed = onConsumed
        self.idleTimeout = idleTimeout
        self.minimumRate = minimumRate
        self.onFirstRead = onFirstRead
        self.heldBack = heldBack
        if idleTimeout != nil { BodyWatchdog.shared.watch(self) }
    }

    deinit {
        let left = state.withLock { $0.buffered }
        if left > 0 { onConsumed(left) }
    }

    private let onFirstRead: (@Sendable () -> Void)?
    private let heldBack: (@Sendable () -> Bool)?

    /// Whether the consumer asked for bytes yet.
    public var readStarted: Bool { state.withLock { $0.readStarted } }

    private let idleTimeout: Duration?
    private let minimumRate: Int

    /// Fails the body if the sender has been silent for longer than its idle timeout. Returns
    /// whether the body is still worth watching (not ended, not failed). `BodyWatchdog` calls it.
    @discardableResult
    public func checkIdle(now: ContinuousClock.Instant) -> Bool {
        guard let idleTimeout else { return false }
        let window = idleTimeout / 2
        // The transport withholds the window (nobody read yet, or the node's body budget keeps
        // the stream waiting for one): a slow arrival is then our doing, not the sender's.
        let held = heldBack?() ?? false
        let verdict = state.withLock { s -> HTTPTransportError?? in
            guard !s.finished, s.error == nil else { return .none }
            let withheld = held || (onFirstRead != nil && !s.readStarted)
            guard s.buffered == 0, !withheld else {
                // Our side is behind: not the sender's fault; start counting afresh.
                s.windowStart = now
                s.windowBytes = 0
                return .some(nil)
            }
            if now - s.lastArrival > idleTimeout { return .some(.bodyIdleTimeout(idleTimeout)) }
            if now - s.windowStart >= window {
                let floor = Double(minimumRate) * (Double(window.components.seconds) + Double(window.components.attoseconds) / 1e18)
                if minimumRate > 0, Double(s.windowBytes) < floor { return .some(.bodyTooSlow(minimumRate: minimumRate)) }
                s.windowStart = now
                s.windowBytes = 0
            }
            return .some(nil)
        }
        guard case .some(let error) = verdict else { return false }
        if let error { fail(error) }
        return error == nil
    }

    /// An already complete body (tests, in-memory use).
    public static func complete(_ bytes: ByteBuffer?) -> HTTPInboundBody {
        let b = HTTPInboundBody()
        if let bytes, bytes.readableBytes > 0 { b.append(bytes) }
        b.finish()
        return b
    }

    // MARK: transport side

    /// Deliver a chunk. Returns false if the body was already failed (the caller should credit the window itself).
    @discardableResult
    public func append(_ chunk: ByteBuffer) -> Bool {
        let waiter: CheckedContinuation<ByteBuffer?, any Error>? = state.withLock { s in
            guard !s.finished, s.error == nil else { return nil }
            if idleTimeout != nil {
                s.lastArrival = .now
                s.windowBytes += chunk.readableBytes
            }
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.chunks.append(chunk)
            s.buffered += chunk.readableBytes
            return nil
        }
        if let waiter {
            onConsumed(chunk.readableBytes)
            waiter.resume(returning: chunk)
            return true
        }
        return state.withLock { $0.error == nil }
    }

    /// The body ended normally (optionally with trailers, e.g. gRPC status).
    public func finish(trailers: HTTPHeaders? = nil) {
        let waiter = state.withLock { s -> CheckedContinuation<ByteBuffer?, any Error>? in
            s.finished = true
            if let trailers { s.trailers = trailers }
            if s.chunks.isEmpty, let w = s.waiter {
                s.waiter = nil
                return w
            }
            return nil
        }
        waiter?.resume(returning: nil)
    }

    /// The body cannot complete. Returns the number of buffered bytes that were dropped
    /// (so the transport can give the connection window back).
    @discardableResult
    public func fail(_ error: any Error) -> Int {
        let (waiter, dropped) = state.withLock { s -> (CheckedContinuation<ByteBuffer?, any Error>?, Int) in
            guard s.error == nil, !(s.finished && s.chunks.isEmpty) else { return (nil, 0) }
            s.error = error
            let dropped = s.buffered
            s.chunks.removeAll()
            s.buffered = 0
            let w = s.waiter
            s.waiter = nil
            return (w, dropped)
        }
        waiter?.resume(throwing: error)
        return dropped
    }

    /// Trailers that ended the body, if any (read after the body returned nil).
    public var trailers: HTTPHeaders? { state.withLock { $0.trailers } }

    /// Bytes received and not yet taken by the consumer.
    public var bufferedBytes: Int { state.withLock { $0.buffered } }

    // MARK: consumer side

    public func next() async throws -> ByteBuffer? {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<ByteBuffer?, any Error>) in
                enum Outcome { case chunk(ByteBuffer), end, error(any Error), wait }
                var first = false
                let outcome: Outcome = state.withLock { s in
                    if !s.readStarted {
                        s.readStarted = true
                        first = true
                    }
                    if let e = s.error { return .error(e) }
                    if !s.chunks.isEmpty {
                        var c = s.chunks.removeFirst()
                        // Take what else is already here in one go (up to 1 MiB): fewer task
                        // wake-ups and larger writes when the network is ahead of the consumer.
                        if !s.chunks.isEmpty {
                            var total = c.readableBytes
                            for x in s.chunks { if total + x.readableBytes > Self.maxMerge { break }; total += x.readableBytes }
                            if total > c.readableBytes {
                                var merged = ByteBufferAllocator().buffer(capacity: total)
                                merged.writeBuffer(&c)
                                while var next = s.chunks.first, merged.readableBytes + next.readableBytes <= total {
                                    s.chunks.removeFirst()
                                    merged.writeBuffer(&next)
                                }
                                c = merged
                            }
                        }
                        s.buffered -= c.readableBytes
                        return .chunk(c)
                    }
                    if s.finished { return .end }
                    if Task.isCancelled { return .error(CancellationError()) }
                    s.waiter = cont
                    return .wait
                }
                if first { onFirstRead?() }
                switch outcome {
                case .chunk(let c):
                    onConsumed(c.readableBytes)
                    cont.resume(returning: c)
                case .end: cont.resume(returning: nil)
                case .error(let e): cont.resume(throwing: e)
                case .wait: break
                }
            }
        } onCancel: {
            let w = state.withLock { s -> CheckedContinuation<ByteBuffer?, any Error>? in
                let w = s.waiter
                s.waiter = nil
                return w
            }
            w?.resume(throwing: CancellationError())
        }
    }

    /// Read the whole body, refusing more than `limit` bytes.
    public func collect(upTo limit: Int) async throws -> ByteBuffer {
        var all = ByteBufferAllocator().buffer(capacity: 0)
        for try await var chunk in self {
            guard all.readableBytes + chunk.readableBytes <= limit else { throw HTTPTransportError.tooLarge(limit: limit) }
            all.writeBuffer(&chunk)
        }
        return all
    }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let body: HTTPInboundBody
        public mutating func next() async throws -> ByteBuffer? { try await body.next() }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(body: self) }
}

/// Checks every request body that has an idle timeout about once a second (one task for the
/// whole process, running only while there are bodies to watch).
public final class BodyWatchdog: Sendable {
    public static let shared = BodyWatchdog()

    private struct Entry: @unchecked Sendable { weak var body: HTTPInboundBody? }
    private let state = Mutex<(bodies: [ObjectIdentifier: Entry], running: Bool)>(([:], false))
    private let interval: Duration = .seconds(1)

    func watch(_ body: HTTPInboundBody) {
        let start = state.withLock { s -> Bool in
            s.bodies[ObjectIdentifier(body)] = Entry(body: body)
            if s.running { return false }
            s.running = true
            return true
        }
        if start { Task.detached { await self.run() } }
    }

    /// Bodies being watched (tests, metrics).
    public var count: Int { state.withLock { $0.bodies.count } }

    private func run() async {
        while true {
            try? await Task.sleep(for: interval)
            let entries = state.withLock { $0.bodies.map { ($0.key, $0.value.body) } }
            let now = ContinuousClock.now
            var done: [(ObjectIdentifier, HTTPInboundBody?)] = []
            for (id, body) in entries where !(body?.checkIdle(now: now) ?? false) { done.append((id, body)) }
            let stop = state.withLock { s -> Bool in
                // Only the entry that was checked (an identifier may have been reused since).
                for (id, body) in done where s.bodies[id]?.body === body { s.bodies[id] = nil }
                if s.bodies.isEmpty { s.running = false }
                return !s.running
            }
            if stop { return }
        }
    }
}
