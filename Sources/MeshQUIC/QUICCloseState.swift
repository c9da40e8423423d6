import NIOCore

/// The life of a QUIC connection from the first packet to the end (RFC 9000 §10): a pure state
/// machine that returns actions; `QUICCore` writes the CONNECTION_CLOSE, fails the streams and
/// schedules `finalize` as they say. (A server's HTTP/3 drain before that is `ConnectionDrain`.)
///
/// - active: packets are read and written.
/// - closing: we sent CONNECTION_CLOSE; a packet from the peer is answered with it again (a
///   few times: stragglers that did not see it), nothing else is read or written.
/// - draining: the peer closed (or reset); nothing is read or written.
/// - closed: gone; the owner drops its routes and its reference.
///
/// A server lingers in closing/draining for three PTOs (at most 3 s); a client has nothing more
/// to say and finalizes at once.
struct QUICCloseState: Equatable {
    enum Phase: Equatable { case active, closing, draining, closed }

    /// What to do with a packet that arrived.
    enum Inbound: Equatable {
        case process
        case drop
        /// Send the CONNECTION_CLOSE we already sent again.
        case resendClose
    }

    /// What to do when the connection is to end.
    enum Close: Equatable {
        /// Already ending.
        case none
        /// Write CONNECTION_CLOSE and send it, fail every stream, finalize after this long.
        case sendClose(finalizeAfter: TimeAmount)
        /// Fail every stream (no packet: the peer is gone or closed), finalize after this long.
        case drain(finalizeAfter: TimeAmount)
    }

    /// CONNECTION_CLOSE answers to a peer's packets in the closing period, at most.
    static let maxCloseResends = 8
    /// The closing period's upper bound.
    static let maxClosingPeriod: UInt64 = 3_000_000_000

    let isServer: Bool
    private(set) var phase = Phase.active
    private var closeResends = 0

    init(isServer: Bool) {
        self.isServer = isServer
    }

    var isActive: Bool { phase == .active }

    /// A datagram for this connection. `haveClosePacket`: we wrote a CONNECTION_CLOSE to repeat.
    mutating func packetArrived(haveClosePacket: Bool) -> Inbound {
        switch phase {
        case .active: return .process
        case .draining, .closed: return .drop
        case .closing:
            guard haveClosePacket, closeResends < Self.maxCloseResends else { return .drop }
            closeResends += 1
            return .resendClose
        }
    }

    /// We end the connection (an error, a drain's end, a dark path). `libraryClosing`: ngtcp2 is
    /// already in its closing or draining period (it wrote or received a close itself), so there
    /// is nothing to write. `pto` is ngtcp2's probe timeout in nanoseconds.
    mutating func close(libraryClosing: Bool, pto: UInt64) -> Close {
        guard phase == .active else { return .none }
        if libraryClosing { return peerClosed(pto: pto) }
        phase = .closing
        return .sendClose(finalizeAfter: isServer ? Self.closingPeriod(pto: pto) : .milliseconds(1))
    }

    /// The peer closed (CONNECTION_CLOSE, a Stateless Reset): the draining period.
    mutating func peerClosed(pto: UInt64) -> Close {
        guard phase == .active || phase == .closing else { return .none }
        phase = .draining
        return .drain(finalizeAfter: isServer ? Self.closingPeriod(pto: pto) : .zero)
    }

    /// The end: true the first time (then the owner is told), false after.
    mutating func finalize() -> Bool {
        guard phase != .closed else { return false }
        phase = .closed
        return true
    }

    /// Three PTOs, at most 3 s (RFC 9000 §10.2).
    static func closingPeriod(pto: UInt64) -> TimeAmount {
        .nanoseconds(Int64(min(pto, maxClosingPeriod / 3) * 3))
    }
}
