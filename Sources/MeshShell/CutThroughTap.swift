import MeshCore
import MeshHTTP
import NIOCore
import Synchronization

extension ByteBuffer: RelayChunk {
    public var byteCount: Int { readableBytes }
    public func droppingFirst(_ n: Int) -> ByteBuffer {
        var b = self
        b.moveReaderIndex(forwardBy: n)
        return b
    }
}

/// The caller's side of a cut-through fetch ("verify while forwarding"): the fetch that wins a
/// race streams the body into the store writer (which hashes it) and, through this tap, to the
/// waiting caller as it arrives. The fetch `begin`s the tap when a source answered (the caller
/// then answers 200 with `stream` as its body), `forward`s the chunks `CutThroughRelay` releases
/// (always one behind what arrived), and either `finish`es the body once the blob verified and
/// is stored, or `reset`s it (the transport resets the stream: HTTP/2 RST_STREAM, HTTP/3
/// RESET_STREAM, HTTP/1.1 closes the connection) — a caller never holds a complete wrong body.
/// A fetch that ends without beginning the tap (a miss, a small blob, a shared race) `end`s it:
/// the caller then serves from the store as before.
public final class CutThroughTap: Sendable {
    public enum Start: Sendable {
        /// A source answered: serve `stream` (`size` bytes if declared) from `source`.
        case streaming(size: Int64?, source: String)
        /// The fetch is over without streaming: look at its outcome.
        case ended
    }

    /// Bodies at or below this size are not cut through: they arrive in a chunk or two, and
    /// are served from the store (and the memory tier) once stored.
    public let minimumSize: Int64
    public let stream: HTTPOutboundStream
    private let state = Mutex<(start: Start?, waiter: CheckedContinuation<Start, Never>?)>((nil, nil))

    public init(minimumSize: Int64 = 64 << 10, highWatermark: Int = 512 * 1024) {
        self.minimumSize = minimumSize
        self.stream = HTTPOutboundStream(highWatermark: highWatermark)
    }

    /// Whether a body of `size` bytes (nil: undeclared) is cut through.
    public func wants(size: Int64?) -> Bool { size.map { $0 > minimumSize } ?? true }

    /// A source answered: the caller may start its response.
    func begin(size: Int64?, source: String) { resolve(.streaming(size: size, source: source)) }

    /// Whether a source's body began streaming to the caller (its response head is committed).
    var hasBegun: Bool {
        state.withLock { st in
            if case .streaming = st.start { return true }
            return false
        }
    }

    /// The fetch ended without streaming (or after: then this does nothing).
    public func end() { resolve(.ended) }

    private func resolve(_ s: Start) {
        let w = state.withLock { st -> CheckedContinuation<Start, Never>? in
            guard st.start == nil else { return nil }
            st.start = s
            defer { st.waiter = nil }
            return st.waiter
        }
        w?.resume(returning: s)
    }

    /// Waits until the fetch began streaming or ended.
    public func started() async -> Start {
        await withCheckedContinuation { (c: CheckedContinuation<Start, Never>) in
            let now = state.withLock { st -> Start? in
                if let s = st.start { return s }
                st.waiter = c
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }

    /// Send verified-so-far bytes on; throws when the caller went away.
    func forward(_ chunk: ByteBuffer) async throws { try await stream.write(chunk) }

    func finish() { stream.finish() }

    /// The body cannot be completed correctly: the transport resets the caller's stream.
    func reset(_ why: String) { stream.fail(CutThroughReset(reason: why)) }
}

/// Why a cut-through body was reset.
public struct CutThroughReset: Error, CustomStringConvertible {
    public var reason: String
    public var description: String { "cut-through body reset: \(reason)" }
}
