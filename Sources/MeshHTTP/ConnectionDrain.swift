import NIOCore

/// The graceful close of one server connection when the node drains, the same for HTTP/1.1,
/// HTTP/2 and HTTP/3: a pure state machine that returns what to do; the connection's I/O shell
/// does it on its event loop (sends the frames, schedules `finalGoawayDue` and `graceEnded`).
///
/// HTTP/2 and HTTP/3: a GOAWAY notice now (the largest stream id: "stop opening streams"), the
/// final GOAWAY with the last stream processed `goawayGap` later, and the connection closes once
/// the requests in flight finished (`requestEnded`; nghttp2 does this itself for HTTP/2) or when
/// the grace period ends, cutting those still in flight (counted in `DrainCuts`, logged).
/// HTTP/1.1 has no GOAWAY: an idle connection closes at once, a request in flight is answered
/// with `connection: close` or cut when the grace period ends.
public struct ConnectionDrain: Sendable, Equatable {
    /// Between the GOAWAY notice and the final GOAWAY, for HTTP/2 and HTTP/3 alike: a request the
    /// client sent before it saw the notice arrives within it and is still served (RFC 9113 §6.8
    /// asks for at least one round trip). HTTP/2 used 200 ms and HTTP/3 100 ms before they shared
    /// this; the longer one is kept.
    public static let goawayGap: TimeAmount = .milliseconds(200)

    public enum State: Sendable, Equatable {
        case serving
        /// HTTP/1.1: no GOAWAY to send; waiting for the request in flight or the grace period.
        case awaitingRequests
        case noticeSent
        case finalGoawaySent
        case closed
    }

    public enum Action: Sendable, Equatable {
        case none
        /// Close now.
        case close
        /// Send the GOAWAY notice; call `finalGoawayDue` after `goawayGap` and `graceEnded` after
        /// the grace period.
        case sendNotice
        /// Nothing to send (HTTP/1.1): call `graceEnded` after the grace period.
        case awaitRequests
        /// Send the final GOAWAY (the last stream processed).
        case sendFinalGoaway
        /// The grace period ended with requests in flight: count them as cut, say so, close.
        case cut(inFlight: Int)
    }

    public private(set) var state = State.serving
    public var isDraining: Bool { state != .serving }

    public init() {}

    /// The node drains. `canSendGoaway`: HTTP/2 or HTTP/3 with its session up (false for HTTP/1.1
    /// and for a connection still in its handshake, which just closes).
    public mutating func begin(canSendGoaway: Bool, inFlight: Int) -> Action {
        guard state == .serving else { return .none }
        if canSendGoaway {
            state = .noticeSent
            return .sendNotice
        }
        if inFlight > 0 {
            state = .awaitingRequests
            return .awaitRequests
        }
        state = .closed
        return .close
    }

    /// `goawayGap` after the notice.
    public mutating func finalGoawayDue() -> Action {
        guard state == .noticeSent else { return .none }
        state = .finalGoawaySent
        return .sendFinalGoaway
    }

    /// A request ended (or the final GOAWAY went out) and `inFlight` remain: once the final
    /// GOAWAY is out and none remain, close.
    public mutating func requestEnded(inFlight: Int) -> Action {
        guard state == .finalGoawaySent, inFlight == 0 else { return .none }
        state = .closed
        return .close
    }

    /// The grace period is over: close, cutting what is still in flight.
    public mutating func graceEnded(inFlight: Int) -> Action {
        guard state != .serving, state != .closed else { return .none }
        state = .closed
        return inFlight > 0 ? .cut(inFlight: inFlight) : .close
    }

    /// The warning a connection logs when it is cut (`connection`: what was closed).
    public static func cutMessage(gracePeriod: TimeAmount, inFlight: Int, connection: String = "connection") -> String {
        "drain: the grace period (\(Double(gracePeriod.nanoseconds) / 1e9) s) ended with \(inFlight) request(s) in flight; closing the \(connection) under them"
    }
}
