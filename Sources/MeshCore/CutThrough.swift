/// A piece of a body the relay passes on without looking inside (a `ByteBuffer` in the node).
public protocol RelayChunk: Sendable {
    var byteCount: Int { get }
    /// The chunk without its first `n` bytes (`0 < n < byteCount`).
    func droppingFirst(_ n: Int) -> Self
}

/// The body phase of a cut-through fetch, as a pure state machine: the shell feeds it what the
/// sources and the store say and performs the actions it returns, in order.
///
/// * Every chunk of the current source is written to the store writer (which hashes it) and —
///   while a caller is attached — forwarded to the caller one chunk late: the last chunk received
///   is held back, so the caller never holds the whole body before the digest verified.
/// * The body ended: `.commit` (the writer checks size and SHA-256). Verified → the held chunk
///   goes out and the caller's body ends (`.done`). Not verified → the caller's stream is reset
///   (`.resetCaller`: it has bytes but never the last one), the source is excluded, and the fetch
///   starts over from byte 0 with the next source (`.restartWriter`, then `.request(from: 0)`)
///   for the store and for later callers.
/// * The source died mid-body (connection lost, reset, stalled): the next source not yet excluded
///   is asked for the rest from the same offset (`.request(from: received)`, an HTTP `Range`);
///   what the caller already has is not sent again. A source that answers 200 (ignoring the
///   range) has the bytes already received skipped; a 206 for another offset, or a different
///   total size, is a failed source.
/// * No source left: `.resetCaller` (if attached) and `.fail`.
///
/// Each source is excluded once it failed, so a fetch makes at most one attempt per source — but
/// when every source is excluded, one that broke mid-body *after sending bytes* (a connection lost
/// or stalled under load, usually transient) is asked once more for the rest, from the same
/// offset: a blob with a single holder (an origin-only blob) then survives one lost connection.
/// A source that failed before sending body bytes, or sent a body that did not verify, is not.
public struct CutThroughRelay<Chunk: RelayChunk>: Sendable {
    public enum Action: Sendable {
        /// Read the current source's body (feed `chunk`, then `bodyEnded` or `sourceFailed`).
        case readBody(source: Int)
        /// Write into the store writer (hashed).
        case write(Chunk)
        /// Send to the caller.
        case forward(Chunk)
        /// The whole body arrived: commit the writer (verifies); report `committed` or `corrupt`.
        case commit
        /// Verified and stored: end the caller's body.
        case finishCaller
        /// Reset the caller's stream (before its last byte).
        case resetCaller(String)
        /// Drop the writer's bytes and begin a fresh writer.
        case restartWriter
        /// Ask `source` for the body from byte `from` (0: the whole body); report `answered` or `sourceFailed`.
        case request(source: Int, from: Int64)
        /// Stored and verified: the fetch succeeded from `source`.
        case done(source: Int)
        /// No source left.
        case fail(String)
    }

    public enum Caller: Sendable, Equatable {
        /// No caller takes the bytes as they arrive (they wait for the stored blob).
        case none
        case attached
        /// Was attached; its stream was reset or it went away.
        case gone
    }

    public let sourceCount: Int
    /// The body's total size, when a source declared it.
    public private(set) var size: Int64?
    public private(set) var current: Int
    public private(set) var excluded: Set<Int>
    /// Bytes of the current attempt written to the store writer.
    public private(set) var received: Int64 = 0
    /// Bytes sent to the caller.
    public private(set) var forwarded: Int64 = 0
    public private(set) var caller: Caller
    /// Bytes of the current source's body still to drop (it answered 200 to a range request).
    private var skip: Int64 = 0
    private var held: Chunk?
    /// `received` when the current source's body began.
    private var receivedAtAnswer: Int64 = 0
    /// Sources that broke mid-body after sending bytes: each may be asked once more, last.
    private var retryable: [Int] = []
    /// Sources asked a second time.
    public private(set) var retried: Set<Int> = []
    public private(set) var isDone = false
    /// Sources that died mid-body after sending bytes (the body then continued from the next
    /// source), and restarts after a body that did not verify.
    public private(set) var resumes = 0
    public private(set) var restarts = 0
    /// Why sources failed, for the final error.
    public private(set) var failures: [String] = []

    /// Source `first` of `sourceCount` answered 200 with a body of `size` bytes (if declared);
    /// `excluded`: sources already known not to serve it (failed before the body phase).
    public init(sourceCount: Int, first: Int, size: Int64?, excluded: Set<Int> = [], caller: Bool) {
        self.sourceCount = sourceCount
        self.current = first
        self.size = size
        self.excluded = excluded
        self.caller = caller ? .attached : .none
    }

    /// The first actions: read the first source's body.
    public func start() -> [Action] { [.readBody(source: current)] }

    /// Bytes of the current source's body arrived.
    public mutating func chunk(_ c: Chunk) -> [Action] {
        guard !isDone else { return [] }
        var c = c
        if skip > 0 {
            let n = c.byteCount
            if Int64(n) <= skip {
                skip -= Int64(n)
                return []
            }
            c = c.droppingFirst(Int(skip))
            skip = 0
        }
        guard c.byteCount > 0 else { return [] }
        received += Int64(c.byteCount)
        var actions: [Action] = [.write(c)]
        if caller == .attached {
            if let h = held {
                actions.append(.forward(h))
                forwarded += Int64(h.byteCount)
            }
            held = c
        }
        return actions
    }

    /// The current source's body ended normally.
    public mutating func bodyEnded() -> [Action] {
        guard !isDone else { return [] }
        if skip > 0 { return sourceFailed("body ended before the offset it was asked for") }
        return [.commit]
    }

    /// The writer verified and stored the blob.
    public mutating func committed() -> [Action] {
        guard !isDone else { return [] }
        isDone = true
        var actions: [Action] = []
        if caller == .attached {
            if let h = held {
                actions.append(.forward(h))
                forwarded += Int64(h.byteCount)
            }
            actions.append(.finishCaller)
        }
        held = nil
        actions.append(.done(source: current))
        return actions
    }

    /// The body did not verify (wrong digest or size): nothing of it may reach the store or
    /// complete at the caller.
    public mutating func corrupt(_ why: String) -> [Action] {
        guard !isDone else { return [] }
        failures.append("source \(current): \(why)")
        excluded.insert(current)
        var actions: [Action] = []
        if caller == .attached {
            actions.append(.resetCaller("the body from source \(current) did not verify: \(why)"))
            caller = .gone
        }
        held = nil
        received = 0
        receivedAtAnswer = 0
        skip = 0
        // Another source's size may be the right one.
        size = nil
        guard let next = nextSource() else {
            isDone = true
            actions.append(.fail(failures.joined(separator: "; ")))
            return actions
        }
        restarts += 1
        current = next
        actions.append(.restartWriter)
        actions.append(.request(source: next, from: 0))
        return actions
    }

    /// The current source failed (connection lost, stream reset, stalled, refused, answered
    /// something else than the body): the next source continues from the same offset.
    public mutating func sourceFailed(_ why: String) -> [Action] {
        guard !isDone else { return [] }
        failures.append("source \(current): \(why)")
        excluded.insert(current)
        skip = 0
        // Every byte arrived; only the end of the stream was lost: verify what we have.
        if let size, received == size, received > 0 { return [.commit] }
        if received > receivedAtAnswer, !retried.contains(current) { retryable.append(current) }
        var next = nextSource()
        if next == nil, let again = retryable.first {
            retryable.removeFirst()
            retried.insert(again)
            next = again
        }
        guard let next else {
            isDone = true
            var actions: [Action] = []
            if caller == .attached {
                actions.append(.resetCaller("no source left to continue from byte \(received)"))
                caller = .gone
            }
            held = nil
            actions.append(.fail(failures.joined(separator: "; ")))
            return actions
        }
        if received > receivedAtAnswer { resumes += 1 }
        receivedAtAnswer = received
        current = next
        return [.request(source: next, from: received)]
    }

    /// The source asked by `.request` answered `status`; for a 206, `rangeStart` and `total` from
    /// its `content-range`; for a 200, `total` is its `content-length` (if any).
    public mutating func answered(status: Int, rangeStart: Int64?, total: Int64?) -> [Action] {
        guard !isDone else { return [] }
        if let size, let total, total != size {
            return sourceFailed("it has \(total) bytes, the body so far has \(size)")
        }
        switch status {
        case 206:
            guard rangeStart == received else {
                return sourceFailed("206 for offset \(rangeStart.map(String.init) ?? "?") instead of \(received)")
            }
            skip = 0
        case 200:
            skip = received
        case 404:
            return sourceFailed("not found (HTTP 404)")
        default:
            return sourceFailed("HTTP \(status)")
        }
        if size == nil { size = total }
        return [.readBody(source: current)]
    }

    /// The caller went away (or its stream failed): keep fetching for the store only.
    public mutating func callerGone() {
        guard caller == .attached else { return }
        caller = .gone
        held = nil
    }

    private func nextSource() -> Int? {
        (0..<sourceCount).first { !excluded.contains($0) }
    }
}
