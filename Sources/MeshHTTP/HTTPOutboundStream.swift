import NIOCore
import Synchronization

/// A body produced while it is being sent (gRPC server streaming, proxied blobs).
///
/// The producer `write`s chunks and is suspended while more than `highWatermark` bytes wait for
/// the transport, so a slow receiver (flow control) slows the producer down. The transport pulls
/// with `read(max:)` on its event loop and is woken through `onReadable` when data arrives.
public final class HTTPOutboundStream: Sendable {
    public enum ReadResult {
        case data(ByteBuffer)
        case wouldBlock
        case end(trailers: HTTPHeaders?)
        case failed(any Error)
    }

    private struct State {
        var chunks = CircularBuffer<ByteBuffer>()
        var buffered = 0
        var finished = false
        var trailers: HTTPHeaders?
        var error: (any Error)?
        var cancelled: (any Error)?
        var writers: [CheckedContinuation<Void, any Error>] = []
        var onReadable: (@Sendable () -> Void)?
    }

    private let state = Mutex(State())
    public let highWatermark: Int

    public init(highWatermark: Int = 512 * 1024) {
        self.highWatermark = highWatermark
    }

    // MARK: producer side

    /// Queue a chunk; waits while the transport is behind. Throws if the receiver went away.
    public func write(_ chunk: ByteBuffer) async throws {
        let wake: (@Sendable () -> Void)? = try state.withLock { s in
            if let c = s.cancelled { throw c }
            precondition(!s.finished, "write after finish")
            s.chunks.append(chunk)
            s.buffered += chunk.readableBytes
            return s.onReadable
        }
        wake?()
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Void, any Error>) in
            let resume: Result<Void, any Error>? = state.withLock { s in
                if let c = s.cancelled { return .failure(c) }
                if s.buffered <= highWatermark { return .success(()) }
                s.writers.append(cont)
                return nil
            }
            if let resume { cont.resume(with: resume) }
        }
    }

    /// End the body, optionally with trailers (e.g. `grpc-status`).
    public func finish(trailers: HTTPHeaders? = nil) {
        let wake = state.withLock { s -> (@Sendable () -> Void)? in
            guard !s.finished else { return nil }
            s.finished = true
            s.trailers = trailers
            return s.onReadable
        }
        wake?()
    }

    /// Abort the body: the transport resets the stream.
    public func fail(_ error: any Error) {
        let wake = state.withLock { s -> (@Sendable () -> Void)? in
            guard !s.finished else { return nil }
            s.finished = true
            s.error = error
            return s.onReadable
        }
        wake?()
    }

    // MARK: transport side

    /// Register the wake-up callback (called from any thread when data or the end arrives).
    public func setOnReadable(_ f: @escaping @Sendable () -> Void) {
        state.withLock { $0.onReadable = f }
    }

    /// Take up to `max` bytes.
    public func read(max: Int) -> ReadResult {
        let (result, wake) = state.withLock { s -> (ReadResult, [CheckedContinuation<Void, any Error>]) in
            if let e = s.error { return (.failed(e), []) }
            guard var first = s.chunks.first else {
                return (s.finished ? .end(trailers: s.trailers) : .wouldBlock, [])
            }
            let n = min(max, first.readableBytes)
            let out = first.readSlice(length: n)!
            if first.readableBytes == 0 { s.chunks.removeFirst() } else { s.chunks[s.chunks.startIndex] = first }
            s.buffered -= n
            var wake: [CheckedContinuation<Void, any Error>] = []
            if s.buffered <= highWatermark {
                wake = s.writers
                s.writers = []
            }
            return (.data(out), wake)
        }
        for w in wake { w.resume() }
        return result
    }

    /// The receiver is gone: wake and fail the producer, drop what is buffered.
    public func cancel(_ error: any Error) {
        let writers = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            s.cancelled = error
            s.chunks.removeAll()
            s.buffered = 0
            s.onReadable = nil
            let w = s.writers
            s.writers = []
            return w
        }
        for w in writers { w.resume(throwing: error) }
    }
}
