import CNgtcp2
import NIOCore

/// `n` bytes from GnuTLS's CSPRNG (connection IDs, secrets, the random part of packets).
func randomBytes(_ n: Int) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: n)
    b.withUnsafeMutableBufferPointer { cm_gnutls_rnd($0.baseAddress, $0.count) }
    return b
}

/// A QUIC connection ID as a hashable value (routing-table key).
struct ConnectionID: Hashable, Sendable, CustomStringConvertible {
    var bytes: [UInt8]

    init(_ bytes: [UInt8]) {
        precondition(bytes.count <= Int(NGTCP2_MAX_CIDLEN))
        self.bytes = bytes
    }

    init(pointer: UnsafePointer<UInt8>?, count: Int) {
        if let pointer, count > 0 {
            self.bytes = Array(UnsafeBufferPointer(start: pointer, count: min(count, Int(NGTCP2_MAX_CIDLEN))))
        } else {
            self.bytes = []
        }
    }

    init(_ cid: ngtcp2_cid) {
        var c = cid
        let n = min(Int(c.datalen), Int(NGTCP2_MAX_CIDLEN))
        self.bytes = withUnsafeBytes(of: &c.data) { Array($0.prefix(n)) }
    }

    static func random(length: Int = 18) -> ConnectionID {
        ConnectionID(randomBytes(length))
    }

    var ngtcp2: ngtcp2_cid {
        var c = ngtcp2_cid()
        bytes.withUnsafeBufferPointer { ngtcp2_cid_init(&c, $0.baseAddress, $0.count) }
        return c
    }

    var description: String { bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
}

/// Maps every connection ID a connection uses (initial DCID chosen by the client, our SCIDs,
/// the ones issued later with NEW_CONNECTION_ID) to that connection. A CID belongs to at most
/// one connection; removing a connection removes all of its CIDs.
struct CIDRoutingTable<Connection: AnyObject> {
    private var byCID: [ConnectionID: Connection] = [:]
    private var cidsOf: [ObjectIdentifier: Set<ConnectionID>] = [:]

    init() {}

    /// Returns false (and changes nothing) if the CID already routes to another connection.
    @discardableResult
    mutating func add(_ cid: ConnectionID, for connection: Connection) -> Bool {
        if let existing = byCID[cid] { return existing === connection }
        byCID[cid] = connection
        cidsOf[ObjectIdentifier(connection), default: []].insert(cid)
        return true
    }

    /// Retire one CID (only if it belongs to `connection`).
    mutating func remove(_ cid: ConnectionID, for connection: Connection) {
        guard let existing = byCID[cid], existing === connection else { return }
        byCID[cid] = nil
        let key = ObjectIdentifier(connection)
        cidsOf[key]?.remove(cid)
        if cidsOf[key]?.isEmpty == true { cidsOf[key] = nil }
    }

    /// Forget a connection and every CID that routed to it. Returns how many CIDs were removed.
    @discardableResult
    mutating func removeAll(for connection: Connection) -> Int {
        guard let cids = cidsOf.removeValue(forKey: ObjectIdentifier(connection)) else { return 0 }
        for c in cids { byCID[c] = nil }
        return cids.count
    }

    func lookup(_ cid: ConnectionID) -> Connection? { byCID[cid] }

    func cids(of connection: Connection) -> Set<ConnectionID> { cidsOf[ObjectIdentifier(connection)] ?? [] }

    var cidCount: Int { byCID.count }
    var connectionCount: Int { cidsOf.count }
}

/// ngtcp2 timestamps are nanoseconds on the monotonic clock, the same clock as `NIODeadline`.
enum QUICClock {
    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }
}

/// The single expiry timer of a connection, armed lazily: ngtcp2 reports the next expiry
/// (`UINT64_MAX` = none) after every read and write, and most changes only move it later (the
/// idle and loss-detection deadlines slide with every packet). Cancelling and rescheduling an
/// event-loop task for each of those cost ~8% of the CPU of small requests; instead a pending
/// timer is kept when the new deadline is later (it fires early, finds nothing due and re-arms
/// for the real deadline) and replaced only when the new deadline is earlier.
struct ExpiryTimerState: Equatable {
    enum Action: Equatable {
        case none
        /// (Re)schedule at this ngtcp2 timestamp (replacing a pending timer).
        case schedule(UInt64)
    }

    enum Firing: Equatable {
        /// A deadline has passed: `ngtcp2_conn_handle_expiry`, then write.
        case handleExpiry
        /// Fired early (the deadline moved later meanwhile): schedule for this one.
        case rearm(UInt64)
        /// Nothing is due any more.
        case idle
    }

    private(set) var scheduled: UInt64?

    /// Deadlines closer than this (or already past) are pushed out to it: the timer fires at most
    /// once per millisecond. ngtcp2 folds its pacing deadline into the expiry, and right after a
    /// write that deadline is a few microseconds ahead or already past; but ngtcp2 lets packets
    /// go up to 1 ms before it (`NGTCP2_PKT_PACING_OVERHEAD`), so it never holds a write back.
    /// Waking for it cost a timer task, an epoll wake-up, `handle_expiry` and an empty write —
    /// about 1.5 per small request. A real deadline past at this point (loss detection, ACK
    /// delay, idle) loses nothing on a LAN by firing at most 1 ms late; a due timer that fires
    /// is handled at once (`fired`).
    static let minimumDelay: UInt64 = 1_000_000

    init() {}

    mutating func update(expiry: UInt64, now: UInt64) -> Action {
        // No deadline: a pending timer may fire once for nothing, which is cheaper than cancelling it.
        guard expiry != UInt64.max else { return .none }
        let target = max(expiry, now + Self.minimumDelay)
        if let s = scheduled, s <= target { return .none }
        scheduled = target
        return .schedule(target)
    }

    /// The timer fired at `now`; `expiry` is ngtcp2's current deadline.
    mutating func fired(now: UInt64, expiry: UInt64) -> Firing {
        scheduled = nil
        if expiry == UInt64.max { return .idle }
        if expiry <= now { return .handleExpiry }
        guard case .schedule(let at) = update(expiry: expiry, now: now) else { return .idle }
        return .rearm(at)
    }
}

/// Buffers handed to nghttp3 must stay valid until the peer acknowledged them: hold them in
/// order and release from the front as acknowledgements (byte counts) arrive.
struct AckedBufferQueue {
    private var buffers = CircularBuffer<ByteBuffer>()
    /// Bytes of the first buffer already acknowledged.
    private var ackedInFirst = 0
    private(set) var unackedBytes = 0

    init() {}

    mutating func hold(_ buffer: ByteBuffer) {
        guard buffer.readableBytes > 0 else { return }
        buffers.append(buffer)
        unackedBytes += buffer.readableBytes
    }

    /// Release `count` acknowledged bytes. Returns how many buffers were freed.
    @discardableResult
    mutating func ack(_ count: Int) -> Int {
        var left = min(count, unackedBytes)
        unackedBytes -= left
        var freed = 0
        while left > 0, let first = buffers.first {
            let remaining = first.readableBytes - ackedInFirst
            if left >= remaining {
                left -= remaining
                buffers.removeFirst()
                ackedInFirst = 0
                freed += 1
            } else {
                ackedInFirst += left
                left = 0
            }
        }
        return freed
    }

    mutating func removeAll() {
        buffers.removeAll()
        ackedInFirst = 0
        unackedBytes = 0
    }

    var heldBuffers: Int { buffers.count }
}

/// Splits a run of packets written back to back into UDP sends: consecutive packets of the same
/// size form one GSO send (the last of a run may be shorter), at most `maxSegments` each (Linux: UDP_MAX_SEGMENTS >= 64).
enum GSOBatcher {
    struct Send: Equatable {
        var offset: Int
        var length: Int
        /// nil = a single datagram.
        var segmentSize: Int?
    }

    static func batches(sizes: [Int], maxSegments: Int = 64, enabled: Bool = true) -> [Send] {
        var out: [Send] = []
        var i = 0
        var offset = 0
        while i < sizes.count {
            let seg = sizes[i]
            var n = 1
            var len = seg
            if enabled {
                while i + n < sizes.count, n < maxSegments, len + sizes[i + n] <= 65_000 {
                    let s = sizes[i + n]
                    if s == seg {
                        len += s
                        n += 1
                    } else if s < seg {
                        // A shorter packet may end a GSO run.
                        len += s
                        n += 1
                        break
                    } else {
                        break
                    }
                }
            }
            out.append(Send(offset: offset, length: len, segmentSize: n > 1 ? seg : nil))
            offset += len
            i += n
        }
        return out
    }
}

/// Stateless resets (RFC 9000 §10.3): a server that lost a connection's state (it restarted,
/// or the connection was dropped) answers a packet for it with a Stateless Reset, so the peer
/// gives the connection up at once instead of retransmitting into silence until its idle
/// timeout. Tokens are derived from a static secret and the connection ID (HKDF inside
/// `ngtcp2_crypto_generate_stateless_reset_token`), so a restarted node with the same secret
/// produces the token the peer was given before; nobody without the secret can forge one.
public struct StatelessResetSecret: Sendable, Equatable {
    public let bytes: [UInt8]

    public init(_ bytes: [UInt8]) {
        precondition(bytes.count >= 16, "a stateless reset secret needs at least 16 bytes")
        self.bytes = bytes
    }

    /// A fresh random secret: resets then work only within this process's lifetime (a client's
    /// CIDs, or a server without a stable key).
    public static func random() -> StatelessResetSecret {
        StatelessResetSecret(randomBytes(32))
    }

    /// One per process, for endpoints that were not given a stable secret.
    static let process = StatelessResetSecret.random()

    /// The 16-byte token for `cid`.
    func token(for cid: ConnectionID) -> [UInt8] {
        var token = [UInt8](repeating: 0, count: Int(NGTCP2_STATELESS_RESET_TOKENLEN))
        write(token: &token, for: cid)
        return token
    }

    func write(token: UnsafeMutablePointer<UInt8>, for cid: ConnectionID) {
        var c = cid.ngtcp2
        let rv = bytes.withUnsafeBufferPointer { ngtcp2_crypto_generate_stateless_reset_token(token, $0.baseAddress, $0.count, &c) }
        // HKDF over a fixed-size input cannot fail short of a broken crypto backend; a random
        // token then only means this CID can never be reset.
        if rv != 0 { cm_gnutls_rnd(token, Int(NGTCP2_STATELESS_RESET_TOKENLEN)) }
    }

    func write(token: inout [UInt8], for cid: ConnectionID) {
        token.withUnsafeMutableBufferPointer { write(token: $0.baseAddress!, for: cid) }
    }
}

/// When and how large a Stateless Reset may be sent (pure; the server's I/O asks it).
///
/// A reset is always shorter than the packet that triggered it, so two endpoints that both lost
/// state cannot ping-pong resets forever and nothing is amplified (RFC 9000 §10.3.3); it is at
/// least 5 random + 16 token bytes, so packets shorter than 22 bytes get nothing. A token
/// bucket bounds how many resets per second a flood of junk short-header packets can draw.
struct StatelessResetPolicy {
    static let minimumLength = Int(NGTCP2_MIN_STATELESS_RESET_RANDLEN) + Int(NGTCP2_STATELESS_RESET_TOKENLEN)
    /// Large enough to look like an ordinary short packet (RFC 9000 suggests 41 bytes or more).
    static let preferredLength = 43

    let ratePerSecond: Double
    let burst: Double
    private var tokens: Double
    private var last: UInt64?

    init(ratePerSecond: Double = 200, burst: Double = 100) {
        self.ratePerSecond = ratePerSecond
        self.burst = burst
        self.tokens = burst
    }

    /// The length of the reset to send for a `triggerLength`-byte packet at `now` (nanoseconds),
    /// or nil to stay silent.
    mutating func resetLength(forTrigger triggerLength: Int, now: UInt64) -> Int? {
        let length = min(triggerLength - 1, Self.preferredLength)
        guard length >= Self.minimumLength else { return nil }
        if let last, now > last {
            tokens = min(burst, tokens + Double(now - last) / 1e9 * ratePerSecond)
        }
        last = now
        guard tokens >= 1 else { return nil }
        tokens -= 1
        return length
    }
}
