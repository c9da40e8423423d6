import Synchronization

/// A clock that moves only when the test says so (`advance`): sleepers wake once it reaches their
/// deadline, or throw `CancellationError` when their task is cancelled first.
final class ManualClock: Clock, Sendable {
    struct Instant: InstantProtocol {
        var offset: Duration
        func advanced(by d: Duration) -> Instant { Instant(offset: offset + d) }
        func duration(to other: Instant) -> Duration { other.offset - offset }
        static func < (a: Instant, b: Instant) -> Bool { a.offset < b.offset }
    }

    private struct State {
        var now = Instant(offset: .zero)
        var nextID: UInt64 = 0
        var sleepers: [UInt64: (deadline: Instant, wake: CheckedContinuation<Void, any Error>)] = [:]
    }
    private let state = Mutex(State())

    var now: Instant { state.withLock { $0.now } }
    var minimumResolution: Duration { .zero }
    /// Sleepers not woken yet.
    var sleeping: Int { state.withLock { $0.sleepers.count } }

    func sleep(until deadline: Instant, tolerance: Duration?) async throws {
        let id = state.withLock { s in
            s.nextID += 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLock { s in
                    if Task.isCancelled { return .failure(CancellationError()) }
                    if deadline <= s.now { return .success(()) }
                    s.sleepers[id] = (deadline, c)
                    return nil
                }
                if let outcome { c.resume(with: outcome) }
            }
        } onCancel: {
            state.withLock { $0.sleepers.removeValue(forKey: id) }?.wake.resume(throwing: CancellationError())
        }
    }

    /// Moves the clock on and wakes every sleeper whose deadline it reached.
    func advance(by d: Duration) {
        let due = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            s.now = s.now.advanced(by: d)
            let now = s.now
            let ids = s.sleepers.filter { $0.value.deadline <= now }.map(\.key)
            return ids.compactMap { s.sleepers.removeValue(forKey: $0)?.wake }
        }
        for c in due { c.resume() }
    }
}

extension ManualClock {
    /// Moves the clock on in `step`s, only while something sleeps on it, until `done()` holds or
    /// `limit` of clock time has passed; returns the clock time moved. Then the clock stands still.
    func advance(by step: Duration = .milliseconds(250), until done: () -> Bool, limit: Duration = .seconds(60)) async throws -> Duration {
        var moved = Duration.zero
        while !done() && moved < limit {
            if sleeping > 0 {
                advance(by: step)
                moved += step
            }
            await Task.yield()
            try await Task.sleep(for: .milliseconds(2))
        }
        return moved
    }
}
