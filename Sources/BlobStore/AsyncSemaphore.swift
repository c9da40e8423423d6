import Synchronization

/// A counting semaphore for Swift concurrency.
///
/// * Waiters are served strictly FIFO; a permit released while tasks wait is
///   handed directly to the oldest waiter.
/// * A waiting task that is cancelled throws `CancellationError` and never
///   consumes (or leaks) a permit.
/// * Acquiring never fails because the pool is busy: callers simply wait.
final class AsyncSemaphore: Sendable {
    private struct State {
        var available: Int
        var nextID: UInt64 = 0
        /// FIFO of waiter ids; ids of cancelled waiters are skipped lazily.
        var queue: [UInt64] = []
        var queueHead = 0
        var waiters: [UInt64: CheckedContinuation<Void, any Error>] = [:]

        mutating func popWaiter() -> CheckedContinuation<Void, any Error>? {
            while queueHead < queue.count {
                let id = queue[queueHead]
                queueHead += 1
                if let c = waiters.removeValue(forKey: id) {
                    compact()
                    return c
                }
            }
            compact()
            return nil
        }

        mutating func compact() {
            if queueHead == queue.count {
                queue.removeAll(keepingCapacity: true)
                queueHead = 0
            } else if queueHead > 256 && queueHead * 2 > queue.count {
                queue.removeFirst(queueHead)
                queueHead = 0
            }
        }
    }

    private enum Registration { case acquired, cancelled, waiting }

    let capacity: Int
    private let state: Mutex<State>

    init(permits: Int) {
        capacity = max(1, permits)
        state = Mutex(State(available: max(1, permits)))
    }

    /// Permits currently held.
    var inUse: Int { state.withLock { capacity - $0.available } }

    /// Number of tasks waiting for a permit.
    var waiting: Int { state.withLock { $0.waiters.count } }

    /// Takes a permit, waiting (FIFO) if none is free.
    /// - Throws: `CancellationError` if the task is cancelled while waiting.
    func acquire() async throws {
        let fast = state.withLock { s -> Bool in
            guard s.available > 0, s.waiters.isEmpty else { return false }
            s.available -= 1
            return true
        }
        if fast { return }

        let id = state.withLock { s -> UInt64 in
            s.nextID &+= 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let registration = state.withLock { s -> Registration in
                    // The cancellation flag is set before the cancellation handler runs, and the
                    // handler takes this lock: checking under the lock closes the race.
                    if Task.isCancelled { return .cancelled }
                    if s.available > 0 && s.waiters.isEmpty {
                        s.available -= 1
                        return .acquired
                    }
                    s.waiters[id] = continuation
                    s.queue.append(id)
                    return .waiting
                }
                switch registration {
                case .acquired: continuation.resume()
                case .cancelled: continuation.resume(throwing: CancellationError())
                case .waiting: break
                }
            }
        } onCancel: {
            let continuation = state.withLock { $0.waiters.removeValue(forKey: id) }
            continuation?.resume(throwing: CancellationError())
        }
    }

    /// Returns a permit, handing it to the oldest waiter if there is one.
    func release() {
        let next = state.withLock { s -> CheckedContinuation<Void, any Error>? in
            if let c = s.popWaiter() { return c }
            s.available += 1
            precondition(s.available <= capacity, "AsyncSemaphore released more often than acquired")
            return nil
        }
        next?.resume()
    }
}
