import BlobStore
import Logging
import MeshHTTP
import Metrics
import NIOCore
import Synchronization

/// A blob on its way into the local store (an S3 read-through) that readers forward while it
/// arrives: "verify while forwarding".
///
/// The producer appends the bytes to the store's verifying `BlobWriter` (which hashes them into
/// a temp file) and then commits it. The latest chunks stay in memory as they arrived (a window
/// of `windowBytes`, at least the last chunk): a reader that keeps up forwards those very buffers
/// (no copy, no read back from the temp file); a reader that fell behind the window (a slow
/// client) reads the bytes from the temp file at its own pace — so one download feeds any number
/// of readers, memory stays bounded, and a slow client never slows the download. No reader gets
/// past the last chunk appended: that chunk (and so the last byte) is only forwarded once the
/// blob has verified and is committed. When it does not verify, every reader's stream fails
/// before its last byte (the transport resets it), so a client never receives a complete body
/// that does not hash to its key. After the commit, what is not in the window is read from the
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
        /// The bytes hashed to the key (the commit may still be syncing them to disk).
        var verified = false
        /// Bumped by every change; readers wait for it to move.
        var version = 0
        var waiters: [CheckedContinuation<Void, Never>] = []
        /// The latest chunks as appended, the first at offset `windowStart`.
        var window = CircularBuffer<ByteBuffer>()
        var windowStart: Int64 = 0
        /// Memory the window holds: each buffer's whole storage (a slice keeps all of it alive).
        var windowBytes = 0
    }

    public let hash: String
    let store: BlobStore
    let logger: Logger?
    /// Memory (the buffers' whole storage) the latest chunks may hold for readers that keep up
    /// (beyond it, only the last chunk).
    let windowBytes: Int
    private let state = Mutex(State())
    private let forwarded = Mutex<(memory: Int64, disk: Int64)>((0, 0))
    /// Bytes per read from the temp file or the committed blob, and at most this many bytes of
    /// the window handed to a stream at once.
    static let chunk = 256 << 10
    public static let defaultWindow = 4 << 20
    private static let fromMemory = Counter(label: "cachemesh_s3_forwarded_bytes_total", dimensions: [("from", "memory")])
    private static let fromDisk = Counter(label: "cachemesh_s3_forwarded_bytes_total", dimensions: [("from", "disk")])

    public init(hash: String, store: BlobStore, windowBytes: Int = FillingBlob.defaultWindow, logger: Logger? = nil) {
        self.hash = hash
        self.store = store
        self.windowBytes = windowBytes
        self.logger = logger
    }

    /// Bytes readers forwarded from the in-memory window and from disk (temp file or committed blob).
    public var forwardedBytes: (memory: Int64, disk: Int64) { forwarded.withLock { $0 } }

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

    /// Appends the next chunk to the writer (throws what the writer throws) and to the window.
    public func append(_ buffer: ByteBuffer) throws {
        guard let writer = state.withLock({ $0.writer }) else { throw BlobStoreError.closed }
        try buffer.withUnsafeReadableBytes { try writer.write($0) }
        let n = buffer.readableBytes
        guard n > 0 else { return }
        let window = windowBytes
        change { s in
            s.written += Int64(n)
            s.held = Int64(n)
            s.started = true
            s.window.append(buffer)
            s.windowBytes += buffer.storageCapacity
            while s.window.count > 1, s.windowBytes > window {
                let first = s.window.removeFirst()
                s.windowStart += Int64(first.readableBytes)
                s.windowBytes -= first.storageCapacity
            }
        }
    }

    /// Every byte is in and hashed to the key: the last chunk may go out (before the commit has
    /// synced and published the blob).
    public func verified() {
        change { $0.verified = true }
    }

    /// The end: committed (verified), absent or failed. Wakes every reader.
    public func finish(_ outcome: Outcome) {
        change { s in
            guard s.outcome == nil else { return }
            s.outcome = outcome
            s.writer = nil
            if case .committed = outcome {} else {
                s.window.removeAll()
                s.windowBytes = 0
            }
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

    /// What a reader at `sent` may do now.
    private struct Step {
        var version: Int
        var writer: BlobWriter?
        /// Bytes it may forward up to (verified, or not the last chunk).
        var limit: Int64
        var outcome: Outcome?
        /// Verified, not yet committed: a reader with every byte sent is done.
        var verifiedAll = false
        /// Window buffers from `sent` on (at most `chunk` bytes, never past `limit`).
        var slices: [ByteBuffer] = []
    }

    private func step(at sent: Int64) -> Step {
        state.withLock { s in
            var committed = s.verified
            if case .committed? = s.outcome { committed = true }
            var step = Step(version: s.version, writer: s.writer, limit: committed ? s.written : s.written - s.held, outcome: s.outcome,
                            verifiedAll: s.verified && s.outcome == nil)
            if case .failed? = s.outcome { return step }
            guard sent >= s.windowStart, sent < step.limit else { return step }
            var at = s.windowStart
            var taken = 0
            for b in s.window {
                let end = at + Int64(b.readableBytes)
                defer { at = end }
                guard end > sent else { continue }
                guard at < step.limit, taken < Self.chunk else { break }
                let from = Int(max(sent, at) - at)
                let upTo = Int(min(end, step.limit) - at)
                let n = min(upTo - from, Self.chunk - taken)
                step.slices.append(b.getSlice(at: b.readerIndex + from, length: n)!)
                taken += n
            }
            return step
        }
    }

    private func forward(to stream: HTTPOutboundStream) async {
        var sent: Int64 = 0
        var fellBehind = false
        do {
            while true {
                let step = step(at: sent)
                if !step.slices.isEmpty {
                    // From the window: the buffers as they arrived.
                    var n: Int64 = 0
                    for b in step.slices {
                        try await stream.write(b)
                        n += Int64(b.readableBytes)
                    }
                    store.recordBytesOut(n)
                    forwarded.withLock { $0.memory += n }
                    Self.fromMemory.increment(by: n)
                    sent += n
                    continue
                }
                if step.verifiedAll, sent >= step.limit {
                    stream.finish()
                    return
                }
                switch step.outcome {
                case .committed?:
                    if sent >= step.limit {
                        stream.finish()
                    } else {
                        try await sendCommitted(from: sent, to: stream)
                    }
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
                if let writer = step.writer, sent < step.limit {
                    // Behind the window: from the temp file.
                    if !fellBehind {
                        fellBehind = true
                        logger?.debug("a reader fell behind the in-memory window of a read-through; it reads from the temp file",
                                      metadata: ["hash": "\(hash)", "at": "\(sent)", "window": "\(windowBytes)"])
                    }
                    var buf = ByteBufferAllocator().buffer(capacity: Int(min(Int64(Self.chunk), step.limit - sent)))
                    let n: Int
                    do {
                        n = try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: 1) { p in
                            try writer.readWritten(at: sent, into: UnsafeMutableRawBufferPointer(rebasing: p.prefix(Int(step.limit - sent))))
                        }
                    } catch BlobStoreError.closed {
                        // Being committed or aborted: the outcome comes next.
                        await waitChange(after: step.version)
                        continue
                    }
                    if n > 0 {
                        try await stream.write(buf)
                        store.recordBytesOut(Int64(n))
                        forwarded.withLock { $0.disk += Int64(n) }
                        Self.fromDisk.increment(by: Int64(n))
                        sent += Int64(n)
                        continue
                    }
                }
                await waitChange(after: step.version)
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
            forwarded.withLock { $0.disk += Int64(n) }
            Self.fromDisk.increment(by: Int64(n))
            at += Int64(n)
        }
        stream.finish()
    }
}
