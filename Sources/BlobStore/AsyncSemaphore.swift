import Synchronization

/// Who a store slot is taken for: the server sets it (a task-local) around each request to a key
/// naming the request's connection, so that one connection cannot hold or queue ahead for all of
/// the store's read or write slots (see `AsyncSemaphore`). nil: the node's own work, no share.
public enum SlotShare {
    @TaskLocal public static var owner: String?
}

/// A counting semaphore for Swift concurrency, shared fairly between owners.
///
/// * Each owner (`SlotShare.owner` of the acquiring task; nil is one owner of its own, without a
///   cap) holds at most `perOwner` permits; beyond that it waits even while permits are free,
///   so others always find some.
/// * Waiters are served FIFO within an owner and round-robin between owners: a permit released
///   while tasks wait goes to the next owner in turn that is under its share, so one owner's
///   hundred queued requests do not all go before another owner's one.
/// * A waiting task that is cancelled throws `CancellationError` and never
///   consumes (or leaks) a permit.
/// * Acquiring never fails because the pool is busy: callers simply wait.
final class AsyncSemaphore: Sendable {
    private struct Waiter {
        var id: UInt64
        var continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var available: Int
        var nextID: UInt64 = 0
        var held: [String?: Int] = [:]
        /// Each owner's waiters, FIFO.
        var queues: [String?: [Waiter]] = [:]
        /// Owners with waiters, in turn order.
        var turn: [String?] = []
        var waiting = 0

        func cap(_ owner: String?, _ perOwner: Int) -> Int { owner == nil ? Int.max : perOwner }

        /// The next waiter that may take a free permit (its owner is under its share), round-robin.
        mutating func nextWaiter(perOwner: Int) -> CheckedContinuation<Void, any Error>? {
            guard available > 0 else { return nil }
            for i in turn.indices {
                let owner = turn[i]
                guard held[owner, default: 0] < cap(owner, perOwner), var q = queues[owner], !q.isEmpty else { continue }
                let w = q.removeFirst()
                turn.remove(at: i)
                if q.isEmpty { queues[owner] = nil } else { queues[owner] = q; turn.append(owner) }
                waiting -= 1
                available -= 1
                held[owner, default: 0] += 1
                return w.continuation
            }
            return nil
        }

        mutating func remove(id: UInt64, owner: String?) -> CheckedContinuation<Void, any Error>? {
            guard var q = queues[owner], let i = q.firstIndex(where: { $0.id == id }) else { return nil }
            let w = q.remove(at: i)
            waiting -= 1
            if q.isEmpty {
                queues[owner] = nil
                turn.removeAll { $0 == owner }
            } else {
                queues[owner] = q
            }
            return w.continuation
        }
    }

    private enum Registration { case acquired, cancelled, waiting }

    let capacity: Int
    /// Most permits one owner holds at once.
    let perOwner: Int
    private let state: Mutex<State>
    /// Called (outside the lock) when a request waits only because its owner holds its share.
    private let onShareLimit: (@Sendable (String) -> Void)?

    init(permits: Int, perOwner: Int? = nil, onShareLimit: (@Sendable (String) -> Void)? = nil) {
        capacity = max(1, permits)
        self.perOwner = max(1, min(perOwner ?? capacity, capacity))
        self.onShareLimit = onShareLimit
        state = Mutex(State(available: max(1, permits)))
    }

    /// Permits currently held.
    var inUse: Int { state.withLock { capacity - $0.available } }

    /// Number of tasks waiting for a permit.
    var waiting: Int { state.withLock { $0.waiting } }

    /// Permits `owner` holds.
    func held(by owner: String?) -> Int { state.withLock { $0.held[owner, default: 0] } }

    /// Takes a permit for `owner`, waiting if none is free or the owner holds its share.
    /// - Throws: `CancellationError` if the task is cancelled while waiting.
    func acquire(owner: String? = SlotShare.owner) async throws {
        let perOwner = self.perOwner
        let fast = state.withLock { s -> Bool in
            guard s.available > 0, s.held[owner, default: 0] < s.cap(owner, perOwner), s.queues[owner] == nil else { return false }
            s.available -= 1
            s.held[owner, default: 0] += 1
            return true
        }
        if fast { return }

        let id = state.withLock { s -> UInt64 in
            s.nextID &+= 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                var shareLimited = false
                let registration = state.withLock { s -> Registration in
                    // The cancellation flag is set before the cancellation handler runs, and the
                    // handler takes this lock: checking under the lock closes the race.
                    if Task.isCancelled { return .cancelled }
                    let underShare = s.held[owner, default: 0] < s.cap(owner, perOwner)
                    if s.available > 0, underShare, s.queues[owner] == nil {
                        s.available -= 1
                        s.held[owner, default: 0] += 1
                        return .acquired
                    }
                    shareLimited = s.available > 0 && !underShare
                    if s.queues[owner] == nil { s.turn.append(owner) }
                    s.queues[owner, default: []].append(Waiter(id: id, continuation: continuation))
                    s.waiting += 1
                    return .waiting
                }
                switch registration {
                case .acquired: continuation.resume()
                case .cancelled: continuation.resume(throwing: CancellationError())
                case .waiting: if shareLimited, let owner { onShareLimit?(owner) }
                }
            }
        } onCancel: {
            let continuation = state.withLock { $0.remove(id: id, owner: owner) }
            continuation?.resume(throwing: CancellationError())
        }
    }

    /// Returns `owner`'s permit, handing it to the next waiter in turn that may take it.
    func release(owner: String? = SlotShare.owner) {
        let perOwner = self.perOwner
        let next = state.withLock { s -> CheckedContinuation<Void, any Error>? in
            // An owner's count only limits it: a release from a context that lost track of its
            // owner must not stop the node, so a missing count is left alone.
            let h = s.held[owner, default: 0]
            assert(h > 0, "AsyncSemaphore released for owner \(owner ?? "-") that holds nothing")
            if h > 0 { s.held[owner] = h == 1 ? nil : h - 1 }
            s.available += 1
            precondition(s.available <= capacity, "AsyncSemaphore released more often than acquired")
            return s.nextWaiter(perOwner: perOwner)
        }
        next?.resume()
    }
}
