import Metrics
import NIOCore
import Synchronization

/// The node-wide budget of request-body bytes held in memory.
///
/// Every server connection (HTTP/2, HTTP/3, HTTP/1.1) has a *window*: the body bytes its peer may
/// have sent and we not yet consumed (buffered in `HTTPInboundBody`s, or still in flight). The
/// transport gives consumed bytes back to the peer (WINDOW_UPDATE / MAX_DATA / reading again) only
/// up to that window, so a connection never holds more than its window in memory. Every
/// connection starts with `base` bytes the protocol gives anyway (HTTP/2's 65,535-byte initial
/// connection window; HTTP/3's `initial_max_data`; HTTP/1.1's read pause), bounded by the
/// connection cap. What a connection holds beyond its base is charged to this budget: a window
/// grows (doubling once as many bytes moved through it, up to `perConnection` more than its base)
/// only while the budget has room. So body memory is at most
/// `limit + connections × base`, however many connections send at once, and one connection
/// takes at most `perConnection` of the budget.
///
/// When the budget is used up, connections that want to grow wait in a round-robin queue and are
/// served in turn (chunks of at most `chunk` bytes) as others give bytes back; a connection that
/// stops uploading shrinks back to its base as the bytes it holds are consumed. A request whose
/// handler waits for bytes while the connection's window is full of *other* streams' bytes (those
/// waiting for a write slot, say) gets its base once more beyond the budget (`floorGrants`), so a
/// stream holding a write slot does not starve behind streams that wait for one (transports keep
/// the windows of streams nobody reads small, so those hold little). Floors are bounded as well:
/// a connection's outstanding floors by `perConnection`, all of them by the budget once more —
/// body memory stays under `2 × limit + connections × base`.
public final class RequestBodyBudget: Sendable {
    public let limit: Int
    public let perConnection: Int
    /// Largest single grant to a waiting connection (round-robin fairness).
    public let chunk: Int
    private let log: @Sendable (String) -> Void

    struct Conn {
        var base: Int
        var window: Int
        var target: Int
        var unconsumed = 0
        var moved = 0
        var bodies = 0
        /// Handlers waiting on an empty body.
        var starving = 0
        /// Bytes granted beyond the budget to starving handlers (at most `perConnection`).
        var floored = 0
        var waiting = false
        var grow: @Sendable (Int) -> Void
        var charged: Int { max(0, window - base) }
    }

    struct State {
        var used = 0
        var conns: [Int: Conn] = [:]
        var waiters = CircularBuffer<Int>()
        var nextID = 0
        var lastNotice: ContinuousClock.Instant?
        var deferred = 0
        var floorGrants = 0
    }

    private let state = Mutex(State())
    private let usedGauge = Gauge(label: "cachemesh_request_body_budget_used_bytes")
    private let waitsCounter = Counter(label: "cachemesh_request_body_budget_waits_total")
    private let floorCounter = Counter(label: "cachemesh_request_body_budget_floor_grants_total")

    /// `perConnection` defaults to an eighth of the limit (at least 1 MiB, at most the limit).
    public init(limit: Int, perConnection: Int? = nil, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.limit = max(0, limit)
        self.perConnection = min(self.limit, perConnection ?? max(1 << 20, limit / 8))
        self.chunk = max(64 * 1024, min(1 << 20, self.perConnection / 4))
        self.log = log
        usedGauge.record(0)
    }

    /// Bytes charged now (may exceed `limit` by floor grants).
    public var used: Int { state.withLock { $0.used } }
    /// Connections waiting for their window to grow.
    public var waiting: Int { state.withLock { s in s.conns.values.filter(\.waiting).count } }
    public var floorGrants: Int { state.withLock { $0.floorGrants } }

    /// A new connection whose peer may send `base` bytes unasked. `grow(n)` is called (from any
    /// thread, never under a lock of ours) when the connection's window grows by `n` bytes: the
    /// transport lets its peer send that many more.
    public func connection(base: Int, grow: @escaping @Sendable (Int) -> Void) -> BodyBudgetConnection {
        let id = state.withLock { s -> Int in
            s.nextID += 1
            s.conns[s.nextID] = Conn(base: base, window: base, target: base, grow: grow)
            return s.nextID
        }
        return BodyBudgetConnection(budget: self, id: id, base: base)
    }

    typealias Grants = [(@Sendable (Int) -> Void, Int)]

    private func run(_ body: (inout State, inout Grants) -> Void) {
        var grants: Grants = []
        let (used, notice) = state.withLock { s -> (Int, String?) in
            let before = s.used
            body(&s, &grants)
            if s.used < before { serveWaiters(&s, &grants) }
            var notice: String?
            if s.deferred > 0 {
                let now = ContinuousClock.now
                if s.lastNotice.map({ now - $0 > .seconds(10) }) ?? true {
                    s.lastNotice = now
                    let waiting = s.conns.values.filter(\.waiting).count
                    notice = "request-body budget used up (max_request_body_memory = \(limit) bytes): \(s.deferred) window growth(s) deferred, \(waiting) connection(s) waiting, \(s.floorGrants) floor grant(s) so far"
                    s.deferred = 0
                }
            }
            return (s.used, notice)
        }
        usedGauge.record(used)
        if let notice { log(notice) }
        for (grow, n) in grants { grow(n) }
    }

    /// Grow `id`'s window toward its target as far as the budget allows; queue it if short.
    private func tryGrow(_ id: Int, _ s: inout State, _ grants: inout Grants, max cap: Int = .max) {
        guard var c = s.conns[id] else { return }
        let want = min(c.target - c.window, cap)
        guard want > 0 else { return }
        let free = min(want, max(0, c.base - c.window))
        let charged = min(want - free, max(0, limit - s.used))
        let g = free + charged
        s.used += charged
        c.window += g
        if g > 0 { grants.append((c.grow, g)) }
        if c.window < c.target, !c.waiting {
            c.waiting = true
            s.waiters.append(id)
            s.deferred += 1
            waitsCounter.increment()
        }
        s.conns[id] = c
    }

    private func serveWaiters(_ s: inout State, _ grants: inout Grants) {
        var rounds = s.waiters.count * 4 + 4
        while s.used < limit, let id = s.waiters.first, rounds > 0 {
            rounds -= 1
            s.waiters.removeFirst()
            guard var c = s.conns[id], c.waiting else { continue }
            c.waiting = false
            s.conns[id] = c
            tryGrow(id, &s, &grants, max: chunk)
            // Still short: back of the queue (tryGrow re-queued it), the next one gets a turn.
        }
    }

    func received(_ id: Int, _ n: Int) {
        guard n > 0 else { return }
        let check = state.withLock { s -> Bool in
            s.conns[id]?.unconsumed += n
            return (s.conns[id]?.starving ?? 0) > 0
        }
        // The bytes went to streams nobody reads while a handler still waits: floor again.
        if check { floorIfStarved(id) }
    }

    /// `n` bytes left memory; returns how many the transport gives back to the peer now.
    func consumed(_ id: Int, _ n: Int) -> Int {
        guard n > 0 else { return 0 }
        var credit = n
        run { s, grants in
            guard var c = s.conns[id] else { return }
            c.unconsumed = max(0, c.unconsumed - n)
            c.floored = max(0, c.floored - n)
            c.moved += n
            if c.bodies > 0, c.moved >= c.target {
                c.moved = 0
                c.target = min(c.base + perConnection, c.target * 2)
            }
            if c.window > c.target {
                // Shrinking: keep back what is over the target (and give it back to the budget).
                let withheld = min(n, c.window - c.target)
                let before = c.charged
                c.window -= withheld
                s.used -= before - c.charged
                credit = n - withheld
            }
            s.conns[id] = c
            tryGrow(id, &s, &grants)
        }
        return credit
    }

    func bodyOpened(_ id: Int) {
        state.withLock { s in s.conns[id]?.bodies += 1 }
    }

    func bodyClosed(_ id: Int) {
        state.withLock { s in
            guard var c = s.conns[id] else { return }
            c.bodies = max(0, c.bodies - 1)
            if c.bodies == 0 {
                c.target = c.base
                c.moved = 0
            }
            s.conns[id] = c
        }
    }

    /// A handler waits for body bytes that cannot come because the connection's window is (at
    /// least half) full of bytes nobody is reading yet: give it its base once more, beyond the budget.
    func starving(_ id: Int) {
        state.withLock { s in s.conns[id]?.starving += 1 }
        floorIfStarved(id)
    }

    /// A waiting handler got bytes (or stopped waiting).
    func fed(_ id: Int) {
        state.withLock { s in
            guard let n = s.conns[id]?.starving, n > 0 else { return }
            s.conns[id]?.starving = n - 1
        }
    }

    private func floorIfStarved(_ id: Int) {
        run { s, grants in
            // The peer may not yet have been told of up to half the window (HTTP/2 and QUIC
            // announce credit in batches), so half a window of room counts as none.
            guard var c = s.conns[id], c.starving > 0, c.window - c.unconsumed <= c.window / 2 else { return }
            // Floors are bounded too: per connection by its share, node-wide by the budget once
            // more (beyond that a starving handler waits for its body timeout).
            guard c.floored + c.base <= perConnection, s.used + c.base <= 2 * limit else { return }
            c.floored += c.base
            let before = c.charged
            c.window += c.base
            s.used += c.charged - before
            s.floorGrants += 1
            s.deferred += 1
            floorCounter.increment()
            grants.append((c.grow, c.base))
            s.conns[id] = c
        }
    }

    func holdsBack(_ id: Int) -> Bool {
        state.withLock { s in s.conns[id].map { $0.waiting || $0.window - $0.unconsumed <= $0.window / 2 } ?? false }
    }

    func window(_ id: Int) -> (window: Int, unconsumed: Int) {
        state.withLock { s in s.conns[id].map { ($0.window, $0.unconsumed) } ?? (0, 0) }
    }

    func close(_ id: Int) {
        run { s, _ in
            guard let c = s.conns.removeValue(forKey: id) else { return }
            s.used -= c.charged
        }
    }
}

/// One connection's share of a `RequestBodyBudget` (see there). Closed on deinit.
public final class BodyBudgetConnection: Sendable {
    let budget: RequestBodyBudget
    let id: Int
    public let base: Int

    init(budget: RequestBodyBudget, id: Int, base: Int) {
        self.budget = budget
        self.id = id
        self.base = base
    }

    deinit { budget.close(id) }

    /// Body bytes arrived from the peer.
    public func received(_ n: Int) { budget.received(id, n) }
    /// Body bytes left memory (taken by a handler, or dropped). Returns how many of them to give
    /// back to the peer now (fewer while the window shrinks back toward its base).
    @discardableResult
    public func consumed(_ n: Int) -> Int { budget.consumed(id, n) }
    /// The window (bytes the peer may have outstanding) and the bytes received, not yet consumed.
    public var window: (window: Int, unconsumed: Int) { budget.window(id) }
    /// Whether more may be read (HTTP/1.1: reading pauses while the window is full).
    public var mayReceive: Bool { let w = budget.window(id); return w.unconsumed < w.window }
    /// Whether the budget holds this connection's peer back: at least half its window is bytes
    /// not yet consumed, or it waits for its window to grow.
    public var holdsBack: Bool { budget.holdsBack(id) }
    public func close() { budget.close(id) }

    func bodyOpened() { budget.bodyOpened(id) }
    func bodyClosed() { budget.bodyClosed(id) }
    func starving() { budget.starving(id) }
    func fed() { budget.fed(id) }
}
