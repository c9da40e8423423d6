import NIOCore
import Synchronization

/// A bounded in-memory tier for small hot blobs in front of the disk store (NativeLink's
/// fast/slow pattern): it saves an open/pread/close and a task hop per request. Blobs are
/// immutable and content-addressed, so a copy can never be stale; the disk store stays the
/// source of truth (a blob is served from here only while the store still holds it).
///
/// Two generations give O(1) approximate LRU: lookups promote into `current`; when `current`
/// reaches half the budget it becomes `previous` and the old `previous` is dropped.
final class HotBlobs: Sendable {
    private struct State {
        var current: [String: ByteBuffer] = [:]
        var previous: [String: ByteBuffer] = [:]
        var currentBytes = 0
    }

    private let state = Mutex(State())
    let maxBlobSize: Int
    let budget: Int

    init(budget: Int = 64 << 20, maxBlobSize: Int = 64 << 10) {
        self.budget = budget
        self.maxBlobSize = maxBlobSize
    }

    func get(_ hash: String) -> ByteBuffer? {
        state.withLock { s in
            if let b = s.current[hash] { return b }
            guard let b = s.previous.removeValue(forKey: hash) else { return nil }
            Self.insert(&s, hash, b, budget: budget)
            return b
        }
    }

    func put(_ hash: String, _ bytes: ByteBuffer) {
        guard bytes.readableBytes <= maxBlobSize, budget > 0 else { return }
        state.withLock { s in
            guard s.current[hash] == nil else { return }
            Self.insert(&s, hash, bytes, budget: budget)
        }
    }

    private static func insert(_ s: inout State, _ hash: String, _ b: ByteBuffer, budget: Int) {
        if s.currentBytes + b.readableBytes > budget / 2 {
            s.previous = s.current
            s.current = [:]
            s.currentBytes = 0
        }
        s.current[hash] = b
        s.currentBytes += b.readableBytes
    }
}
