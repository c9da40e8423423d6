import CGnuTLS
import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Tunables of a QUIC connection (both roles). Defaults are sized for a LAN.
public struct QUICSettings: Sendable {
    /// Counts requests cut when a server's drain grace period ends (nil: not counted).
    public var drainCuts: DrainCuts?
    /// Initial (and auto-tuning maximum) per-stream receive window.
    public var streamWindow: UInt64 = 16 << 20
    /// Initial connection receive window; auto-tuning may grow it to `maxConnectionWindow`.
    public var connectionWindow: UInt64 = 64 << 20
    public var maxConnectionWindow: UInt64 = 128 << 20
    /// Concurrent request streams a client may open (server side).
    public var maxConcurrentStreams: UInt64 = 128
    public var idleTimeout: TimeAmount = .seconds(30)
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// A client whose requests are outstanding PINGs a server it has not heard from for this
    /// long (zero: never). The ACK proves the path alive and makes both sides write whatever
    /// they hold (a response or flow-control credit) instead of waiting out the idle timeout.
    public var keepAliveWhileBusy: TimeAmount = .seconds(2)
    /// A client whose requests are outstanding and that has heard nothing from the server for
    /// this long (at least 3 PTOs, with at least two probe timeouts in a row) closes the
    /// connection with `QUICError.pathDark` instead of waiting out the idle timeout: with
    /// keep-alive PINGs every `keepAliveWhileBusy`, any live peer on a working path answers well
    /// within it, so silence means the path (UDP dropped somewhere) or the peer is gone. Time
    /// the client's own event loop did not run does not count. nil: never.
    public var darkPathTimeout: TimeAmount? = .seconds(3)
    /// RTT assumed before the first sample: a LAN, not the Internet's 333 ms.
    public var initialRTT: TimeAmount = .milliseconds(1)
    /// Advertised max_ack_delay (not below ~5 ms: fewer ACK-only packets under load).
    public var maxAckDelay: TimeAmount = .milliseconds(5)
    /// Send runs of equal-size packets with UDP GSO (one syscall per up to 64 packets).
    public var gso: Bool = true
    /// Receive coalesced datagrams (UDP GRO) where the kernel supports it.
    public var gro: Bool = true
    /// Congestion control.
    public var congestionControl: CongestionControl = .cubic
    /// The largest UDP payload this side sends, for paths known to carry it (a LAN with jumbo
    /// frames: 8952 for a 9000-byte MTU; loopback). nil: start at 1200 bytes and let path MTU
    /// discovery grow it to at most 1452 (ngtcp2 0.12.1 probes no further). When set, every
    /// packet may be this large from the handshake on, as with `gtlsserver
    /// --max-udp-payload-size` (the peer's max_udp_payload_size still bounds it): on a path with
    /// a smaller MTU the kernel fragments them, so set it only where the path takes it.
    public var maxDatagramSize: Int?
    /// Largest decoded request (or response) header list, RFC 9114 §4.2.2 size; a larger request
    /// gets 431, repeated ones close the connection with H3_EXCESSIVE_LOAD.
    public var maxHeaderListSize: Int = 64 * 1024
    /// A request body from which nothing arrives for this long fails (server side; 408, the
    /// stream is stopped). nil: never.
    public var requestBodyIdleTimeout: Duration? = .seconds(30)
    /// With the idle timeout: a request body slower than this (bytes/s) fails too. 0: no minimum.
    public var requestBodyMinRate: Int = 16 * 1024
    /// A response whose flow-control window the client keeps closed for this long is reset
    /// (server side), giving back its read slot. nil: never.
    public var responseStallTimeout: Duration? = .seconds(30)
    /// The node's request-body budget (server side; see `RequestBodyBudget`): a request stream
    /// has `budgetStreamWindow` until its handler reads, then a window charged to the budget.
    public var requestBodyBudget: RequestBodyBudget?
    /// A request stream whose header section is not complete this long after its first byte is
    /// reset (H3_REQUEST_INCOMPLETE; server side). nil: never.
    public var requestHeadersTimeout: Duration? = .seconds(20)
    /// With a budget, request streams start with this window (room for the request's HEADERS,
    /// whose bytes are credited back at once) and get more only once their handler reads (growing
    /// within the budget up to `streamWindow`): a stream waiting for a write slot holds ≤ 16 KiB.
    public static let budgetStreamWindow = 16 * 1024

    /// The secret stateless-reset tokens are derived from (nil: one random secret per process).
    /// A server should be given a stable one (the node derives it from its private key), so that
    /// after a restart it can reset the connections its previous run had.
    public var statelessResetSecret: StatelessResetSecret?

    /// The secret in use: the one given, else the process's.
    var resetSecret: StatelessResetSecret { statelessResetSecret ?? .process }

    /// Values `maxDatagramSize` may take (RFC 9000: at least 1200; a UDP payload at most 65527).
    public static let datagramSizeRange = 1200...65_527

    public enum CongestionControl: Sendable {
        case cubic, bbr, bbr2, reno
    }

    public init() {}
}

/// Errors of a QUIC connection as a whole (handshake, timeouts).
public enum QUICError: Error, Sendable, CustomStringConvertible, Equatable {
    case handshakeFailed(String)
    case closedByPeer
    case timeout
    /// The peer sent a Stateless Reset: it no longer knows this connection (it restarted).
    case statelessReset
    /// Nothing arrived from the peer for the dark-path timeout while requests were outstanding.
    case pathDark(String)
    case internalError(String)

    public var description: String {
        switch self {
        case .handshakeFailed(let s): "QUIC handshake failed: \(s)"
        case .closedByPeer: "QUIC connection closed by peer"
        case .timeout: "QUIC connection timed out"
        case .statelessReset: "QUIC connection reset by the peer (stateless reset: it lost the connection, e.g. restarted)"
        case .pathDark(let s): "QUIC path went dark: \(s)"
        case .internalError(let s): "QUIC internal error: \(s)"
        }
    }
}

func tlsCheck(_ rc: Int32, _ context: @autoclosure () -> String) throws {
    if rc < 0 { throw TLSError(code: rc, context: context()) }
}

/// Connection state readable from any thread.
final class QUICConnectionFlags: Sendable {
    let goingAway = Mutex(false)
    let closed = Mutex(false)
    let closeReason = Mutex<QUICError?>(nil)
}
