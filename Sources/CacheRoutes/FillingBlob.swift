import BlobStore
import MeshHTTP
import NIOCore
import Synchronization

/// A blob on its way into the local store (an S3 read-through) that readers forward while it
/// arrives: "verify while forwarding".
///
/// The producer appends the bytes to the store's verifying `BlobWriter` (which hashes them into
/// a temp file) and then commits it. Each reader (`body()`) reads the bytes already written back
/// from that temp file at its own client's pace — so one download feeds any number of readers,
/// nothing is held in memory beyond a reader's send buffer, and a slow client never slows the
/// download — but never past the last chunk appended: that chunk (and so the last byte) is only
/// forwarded once the blob has verified and is committed. When it does not verify, every reader's
/// stream fails before its last byte (the transport resets it), so a client never receives a
/// complete body that does not hash to its key. After the commit the rest is read from the
/// committed blob.
public final class FillingBlob: Sendable {
    public enum Outcome: Sendable {
        /// Verified and in the local store.
        case committed
        /// The source does not have it.
        case absent
        case failed(any Error)
    }

    /// What a reader learns first.
    public enum Start: Sendable {
        /// Bytes are arriving; the whole size when the source said it.
        case arriving(size: Int64?)
        case finished(Outcome)
    }

    private struct State {
        var writer: BlobWriter?
        var written: Int64 = 0
        /// The bytes of the latest chunk: not forwarded before the commit.
        var held: Int64 = 0
        var size: Int64?
        var started = false
        var outcome: Outcome?
        /// Bumped by every change; readers wait for it to move.
        var version = 0
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    public let hash: String
    let store: BlobStore
    private let state = Mutex(State())
    /// Bytes per read from the temp file or the committed blob.
    static let chunk = 256 << 10

    public init(hash: String, store: BlobStore) {
        self.hash = hash
        self.store = store
    }

    // MARK: producer

    /// The writer the bytes go to (before the first `append`).
    public func attach(_ writer: BlobWriter) {
        state.withLock { $0.writer = writer }
    }

    /// The source told the blob's whole size (before its first byte).
    public func announce(size: Int64?) {
        change { s in
            s.size = size
            s.started = true
        }
    }

    /// Appends the next chunk to the writer (throws what the writer throws).
    public func append(_ buffer: ByteBuffer) throws {
        guard let writer = state.withLock({ $0.writer }) else { throw BlobStoreError.closed }
        try buffer.withUnsafeReadableBytes { try writer.write($0) }
        let n = Int64(buffer.readableBytes)
        guard n > 0 else { return }
        change { s in
            s.written += n
            s.held = n
            s.started = true
        }
    }

    /// The end: committed (verified), absent or failed. Wakes every reader.
    public func finish(_ outcome: Outcome) {
        change { s in
            guard s.outcome == nil else { return }
            s.outcome = outcome
            s.writer = nil
        }
    }

    private func change(_ body: (inout State) -> Void) {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            body(&s)
            s.version += 1
            defer { s.waiters = [] }
            return s.waiters
        }
        for w in waiters { w.resume() }
    }

    // MARK: readers

    /// Waits for the state to move past `version`.
    private func waitChange(after version: Int) async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.version != version { return true }
                s.waiters.append(cont)
                return false
            }
            if now { cont.resume() }
        }
    }

    /// Waits until the first byte (or the size) arrives, or the fill ends.
    public func start() async -> Start {
        while true {
            let (v, started, size, outcome) = state.withLock { ($0.version, $0.started, $0.size, $0.outcome) }
            if let outcome { return .finished(outcome) }
            if started { return .arriving(size: size) }
            await waitChange(after: v)
        }
    }

    /// Waits for the end.
    public func outcome() async -> Outcome {
        while true {
            let (v, outcome) = state.withLock { ($0.version, $0.outcome) }
            if let outcome { return outcome }
            await waitChange(after: v)
        }
    }

    /// A response body that forwards the blob from its first byte as it arrives (see the type's
    /// notes); it fails (the stream is reset) if the blob does not verify.
    public func body() -> HTTPOutboundStream {
        let stream = HTTPOutboundStream()
        Task { await self.forward(to: stream) }
        return stream
    }

    private func forward(to stream: HTTPOutboundStream) async {
        var sent: Int64 = 0
        do {
            while true {
                let (v, writer, limit, outcome) = state.withLock { ($0.version, $0.writer, $0.written - $0.held, $0.outcome) }
                switch outcome {
                case .committed?:
                    try await sendCommitted(from: sent, to: stream)
                    return
                case .failed(let e)?:
                    stream.fail(e)
                    return
                case .absent?:
                    stream.fail(BlobStoreError.notFound(hash))
                    return
                case nil:
                    break
                }
                if let writer, sent < limit {
                    var buf = ByteBufferAllocator().buffer(capacity: Int(min(Int64(Self.chunk), limit - sent)))
                    let n: Int
                    do {
                        n = try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: 1) { p in
                            try writer.readWritten(at: sent, into: UnsafeMutableRawBufferPointer(rebasing: p.prefix(Int(limit - sent))))
                        }
                    } catch BlobStoreError.closed {
                        // Being committed or aborted: the outcome comes next.
                        await waitChange(after: v)
                        continue
                    }
                    if n > 0 {
                        try await stream.write(buf)
                        store.recordBytesOut(Int64(n))
                        sent += Int64(n)
                        continue
                    }
                }
                await waitChange(after: v)
            }
        } catch {
            // The client went away (the fill goes on for the store), or reading failed.
            stream.fail(error)
        }
    }

    private func sendCommitted(from start: Int64, to stream: HTTPOutboundStream) async throws {
        let reader = try await store.openRead(hash: hash)
        defer { reader.close() }
        var at = reader.offset + start
        while at < reader.end {
            var buf = ByteBufferAllocator().buffer(capacity: Int(min(Int64(Self.chunk), reader.end - at)))
            let n = try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: 1) { p in
                try reader.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: p.prefix(Int(reader.end - at))))
            }
            guard n > 0 else { throw BlobStoreError.io("\(hash): the committed blob ends at \(at - reader.offset)") }
            try await stream.write(buf)
            at += Int64(n)
        }
        stream.finish()
    }
}
