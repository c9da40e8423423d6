import Metrics
import NIOCore
import Synchronization

/// The node-wide budget of request-body bytes held in memory.
///
/// Credit goes to **streams whose handler reads their body**, never to streams that merely
/// exist. A request stream starts with no window of its own beyond what the protocol forces
/// (HTTP/2: 0 once our SETTINGS are seen, HTTP/3: `QUICSettings.budgetStreamWindow`, HTTP/1.1:
/// a fixed read-ahead); when its handler first asks for body bytes (`open`), the stream is given
/// a window charged to this budget (`firstGrant`), which doubles as the body is consumed, up to
/// its cap, while the budget and the connection's share have room. Consumed bytes are credited
/// back to the peer at once (the window stays what it is), and the whole window is given back to
/// the budget when the stream's body ends or the stream goes away.
///
/// So every byte of credit is held by a stream that is being read — a stream that holds credit
/// can always progress, and credit comes back as bodies are consumed (written to the store):
/// no deadlock, however many streams wait for a write slot. Fairness:
/// - a connection holds at most `perConnection` of the budget;
/// - streams that find the budget used up wait in a round-robin queue over connections (FIFO
///   within one) and are served as others give credit back;
/// - a stream on a connection that holds no credit at all gets a `floor` window at once, beyond
///   the budget (at most `floorLimit` of floors node-wide): however many connections an attacker
///   uses to hold the budget, a client on its own connection keeps moving.
/// Body memory ≤ `limit + floorLimit` + what the protocols give each connection unasked.
public final class RequestBodyBudget: Sendable {
    public let limit: Int
    public let perConnection: Int
    /// Window given to a stream whose connection holds nothing, beyond the budget.
    public let floor: Int
    /// Floors outstanding node-wide at most.
    public let floorLimit: Int
    /// A stream's first window (when it can be charged).
    public static let firstGrant = 64 * 1024
    private let log: @Sendable (String) -> Void

    struct Credit {
        var conn: Int
        var cap: Int
        /// Window charged to the budget, and given as a floor (not charged).
        var charged = 0
        var floored = 0
        var taken = 0
        var waiting = false
        var grant: @Sendable (Int) -> Void
        var window: Int { charged + floored }
    }

    struct Conn {
        var charged = 0
        var floored = 0
        var pending = CircularBuffer<Int>()
        var queued = false
        var streams = 0
    }

    struct State {
        var used = 0
        var floorUsed = 0
        var conns: [Int: Conn] = [:]
        var credits: [Int: Credit] = [:]
        var ring = CircularBuffer<Int>()
        var nextID = 0
        var lastNotice: ContinuousClock.Instant?
        var waitsSinceNotice = 0
        var floorGrants = 0
        var waits = 0
    }

    private let state = Mutex(State())
    private let usedGauge = Gauge(label: "cachemesh_request_body_budget_used_bytes")
    private let waitingGauge = Gauge(label: "cachemesh_request_body_budget_waiting_streams")
    private let waitsCounter = Counter(label: "cachemesh_request_body_budget_waits_total")
    private let floorCounter = Counter(label: "cachemesh_request_body_budget_floor_grants_total")

    /// `perConnection` defaults to an eighth of the limit (at least 1 MiB, at most the limit);
    /// `floorLimit` to a quarter of it.
    public init(limit: Int, perConnection: Int? = nil, floor: Int = 16 * 1024, floorLimit: Int? = nil,
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.limit = max(0, limit)
        self.perConnection = min(self.limit, perConnection ?? max(1 << 20, limit / 8))
        self.floor = floor
        self.floorLimit = floorLimit ?? max(floor, limit / 4)
        self.log = log
        usedGauge.record(0)
        waitingGauge.record(0)
    }

    /// Bytes charged now (floors not included).
    public var used: Int { state.withLock { $0.used } }
    /// Floor bytes outstanding.
    public var floorUsed: Int { state.withLock { $0.floorUsed } }
    /// Streams waiting for their first window.
    public var waiting: Int { state.withLock { s in s.credits.values.filter(\.waiting).count } }
    public var floorGrants: Int { state.withLock { $0.floorGrants } }
    public var waits: Int { state.withLock { $0.waits } }

    /// A new connection.
    public func connection() -> BodyBudgetConnection {
        let id = state.withLock { s -> Int in
            s.nextID += 1
            s.conns[s.nextID] = Conn()
            return s.nextID
        }
        return BodyBudgetConnection(budget: self, id: id)
    }

    typealias Grants = [(@Sendable (Int) -> Void, Int)]

    private func run<T>(_ body: (inout State, inout Grants) -> T) -> T {
        var grants: Grants = []
        let (result, used, waiting, notice) = state.withLock { s -> (T, Int, Int, String?) in
            let before = s.used + s.floorUsed
            let r = body(&s, &grants)
            if s.used + s.floorUsed < before { serve(&s, &grants) }
            var notice: String?
            if s.waitsSinceNotice > 0 {
                let now = ContinuousClock.now
                if s.lastNotice.map({ now - $0 > .seconds(10) }) ?? true {
                    s.lastNotice = now
                    let waiting = s.credits.values.filter(\.waiting).count
                    notice = "request-body budget used up (max_request_body_memory = \(limit) bytes): \(s.waitsSinceNotice) stream(s) waited for a window since the last notice, \(waiting) waiting now, \(s.floorGrants) floor grant(s) so far"
                    s.waitsSinceNotice = 0
                }
            }
            let waiting = s.ring.reduce(0) { $0 + (s.conns[$1]?.pending.count ?? 0) }
            return (r, s.used, waiting, notice)
        }
        usedGauge.record(used)
        waitingGauge.record(waiting)
        if let notice { log(notice) }
        for (grant, n) in grants { grant(n) }
        return result
    }

    /// Try to give `id` its first window: charged, or a floor, or nothing (it then waits).
    private func tryFirst(_ id: Int, _ s: inout State, _ grants: inout Grants) -> Bool {
        guard var c = s.credits[id], var conn = s.conns[c.conn] else { return true }
        let want = min(Self.firstGrant, c.cap)
        if s.used + want <= limit, conn.charged + want <= perConnection {
            s.used += want
            conn.charged += want
            c.charged = want
        } else if conn.charged == 0, conn.floored == 0, s.floorUsed + floor <= floorLimit {
            let f = min(floor, c.cap)
            s.floorUsed += f
            conn.floored += f
            c.floored = f
            s.floorGrants += 1
            floorCounter.increment()
        } else {
            return false
        }
        c.waiting = false
        s.credits[id] = c
        s.conns[c.conn] = conn
        grants.append((c.grant, c.window))
        return true
    }

    /// Serve waiting streams round-robin over connections while the budget has room. A
    /// connection whose turn comes while the budget is full keeps its place at the front.
    private func serve(_ s: inout State, _ grants: inout Grants) {
        var rounds = s.ring.count
        while rounds > 0, let cid = s.ring.first {
            rounds -= 1
            s.ring.removeFirst()
            guard var conn = s.conns[cid] else { continue }
            conn.queued = false
            while let id = conn.pending.first, s.credits[id]?.waiting != true { conn.pending.removeFirst() }
            s.conns[cid] = conn
            guard let id = conn.pending.first else { continue }
            let want = min(Self.firstGrant, s.credits[id]?.cap ?? 0)
            if tryFirst(id, &s, &grants) {
                s.conns[cid]?.pending.removeFirst()
                rounds = max(rounds, 1)
            } else if s.used + want > limit {
                s.conns[cid]?.queued = true
                s.ring.prepend(cid)
                return
            }
            if s.conns[cid]?.pending.isEmpty == false {
                s.conns[cid]?.queued = true
                s.ring.append(cid)
            }
        }
    }

    func open(conn cid: Int, cap: Int, grant: @escaping @Sendable (Int) -> Void) -> Int {
        run { s, grants in
            s.nextID += 1
            let id = s.nextID
            s.credits[id] = Credit(conn: cid, cap: max(1, cap), grant: grant)
            s.conns[cid]?.streams += 1
            // Streams already waiting on this connection go first.
            let queuedHere = !(s.conns[cid]?.pending.isEmpty ?? true)
            if queuedHere || !tryFirst(id, &s, &grants) {
                s.credits[id]?.waiting = true
                s.conns[cid]?.pending.append(id)
                if s.conns[cid]?.queued == false {
                    s.conns[cid]?.queued = true
                    s.ring.append(cid)
                }
                s.waits += 1
                s.waitsSinceNotice += 1
                waitsCounter.increment()
            }
            return id
        }
    }

    /// `n` bytes of stream `id` were consumed: returns how much to grow its window by (charged).
    func consumed(_ id: Int, _ n: Int) -> Int {
        guard n > 0 else { return 0 }
        return run { s, grants in
            guard var c = s.credits[id], !c.waiting, var conn = s.conns[c.conn] else { return 0 }
            c.taken += n
            var grow = 0
            if c.taken >= c.window, c.window < c.cap {
                let want = min(c.cap, c.window * 2) - c.window
                grow = min(want, max(0, limit - s.used), max(0, perConnection - conn.charged))
                if grow > 0 {
                    s.used += grow
                    conn.charged += grow
                    c.charged += grow
                    c.taken = 0
                }
            }
            s.credits[id] = c
            s.conns[c.conn] = conn
            return grow
        }
    }

    func release(_ id: Int) {
        run { s, _ in
            guard let c = s.credits.removeValue(forKey: id) else { return }
            s.used -= c.charged
            s.floorUsed -= c.floored
            if var conn = s.conns[c.conn] {
                conn.charged -= c.charged
                conn.floored -= c.floored
                conn.streams -= 1
                s.conns[c.conn] = conn
            }
        }
    }

    func isWaiting(_ id: Int) -> Bool { state.withLock { $0.credits[id]?.waiting ?? false } }
    func windowOf(_ id: Int) -> Int { state.withLock { $0.credits[id]?.window ?? 0 } }

    func close(_ cid: Int) {
        run { s, _ in
            guard s.conns.removeValue(forKey: cid) != nil else { return }
            for (id, c) in s.credits where c.conn == cid {
                s.credits[id] = nil
                s.used -= c.charged
                s.floorUsed -= c.floored
            }
        }
    }
}

/// One connection of a `RequestBodyBudget` (see there). Closed on deinit.
public final class BodyBudgetConnection: Sendable {
    let budget: RequestBodyBudget
    let id: Int

    init(budget: RequestBodyBudget, id: Int) {
        self.budget = budget
        self.id = id
    }

    deinit { budget.close(id) }

    /// A stream's handler began reading its body: the stream asks for a window of at most `cap`
    /// bytes. `grant(n)` is called (from any thread, never under a lock of ours; at once or once
    /// the budget has room) with the bytes its window grows by.
    public func open(cap: Int, grant: @escaping @Sendable (Int) -> Void) -> BodyCredit {
        BodyCredit(budget: budget, id: budget.open(conn: id, cap: cap, grant: grant))
    }

    public func close() { budget.close(id) }
}

/// One stream's window under a `RequestBodyBudget`. Given back on `release()` or deinit.
public final class BodyCredit: Sendable {
    let budget: RequestBodyBudget
    let id: Int

    init(budget: RequestBodyBudget, id: Int) {
        self.budget = budget
        self.id = id
    }

    deinit { budget.release(id) }

    /// `n` body bytes were consumed (the transport credits them back to the peer): returns how
    /// many more the window grows by (credit them too).
    public func consumed(_ n: Int) -> Int { budget.consumed(id, n) }
    /// The stream waits for its first window (the budget is used up).
    public var waiting: Bool { budget.isWaiting(id) }
    /// The stream's window now (charged + floor).
    public var window: Int { budget.windowOf(id) }
    /// The body ended or the stream went away: give the window back.
    public func release() { budget.release(id) }
}

/// Where a body's watchdog finds the stream's credit (set on the loop once the handler reads).
public final class BodyCreditSlot: Sendable {
    private let credit = Mutex<BodyCredit?>(nil)
    public init() {}
    public func set(_ c: BodyCredit?) { credit.withLock { $0 = c } }
    /// The budget keeps the stream waiting for its first window.
    public var waiting: Bool { credit.withLock { $0?.waiting ?? false } }
}

/// A body's credit for transports that count it from any thread (HTTP/1.1): empty until set.
public final class BodyCreditHolder: Sendable {
    private let credit = Mutex<BodyCredit?>(nil)
    public init() {}
    public func set(_ c: BodyCredit) { credit.withLock { $0 = c } }
    public func consumed(_ n: Int) -> Int { credit.withLock { $0 }?.consumed(n) ?? 0 }
    public var window: Int { credit.withLock { $0 }?.window ?? 0 }
    public func release() { credit.withLock { c in c?.release(); c = nil } }
}
