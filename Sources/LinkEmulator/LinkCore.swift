import Logging
import NIOCore

/// The state of one link shared by its TCP connections and UDP mappings. Created and used only on
/// `loop` (every channel of a link lives there); closures that cross a `@Sendable` boundary carry
/// it in a ``NIOLoopBound`` / ``NIOLoopBoundBox``. Only `counters` is read from other threads.
final class LinkCore {
    let loop: any EventLoop
    let profile: LinkProfile
    let target: SocketAddress
    let udpTarget: SocketAddress
    let counters: LinkCounters
    let logger: Logger
    /// Per direction ([toTarget, toClient]): the serialization/delay model, shared by all flows.
    var shapers: [LinkShaper<SystemRandomNumberGenerator>]
    let transparent: Bool
    let queueLimit: Int
    let udpIdleTimeout: TimeAmount
    /// Open TCP channels of the link (both sides), closed by ``closeAllTCP()``.
    private var tcpChannels: [ObjectIdentifier: any Channel] = [:]

    init(loop: any EventLoop, profile: LinkProfile, target: SocketAddress, udpTarget: SocketAddress, udpIdleTimeout: TimeAmount,
         counters: LinkCounters, logger: Logger) {
        self.loop = loop
        self.profile = profile
        self.target = target
        self.udpTarget = udpTarget
        self.counters = counters
        self.logger = logger
        let s = LinkShaper(profile: profile, rng: SystemRandomNumberGenerator())
        self.shapers = [s, s]
        self.transparent = s.isTransparent
        self.queueLimit = profile.effectiveQueueLimit
        self.udpIdleTimeout = udpIdleTimeout
    }

    /// Remembers `ch` until it closes. On the loop.
    func track(_ ch: any Channel) {
        let id = ObjectIdentifier(ch)
        tcpChannels[id] = ch
        ch.closeFuture.assumeIsolated().whenComplete { [self] _ in tcpChannels[id] = nil }
    }

    /// Closes every relayed TCP connection. On the loop.
    func closeAllTCP() {
        for ch in tcpChannels.values { ch.close(promise: nil) }
    }

    @inline(__always) static func now() -> Int64 {
        Int64(truncatingIfNeeded: NIODeadline.now().uptimeNanoseconds)
    }

    @inline(__always) static func deadline(_ ns: Int64) -> NIODeadline {
        .uptimeNanoseconds(UInt64(max(0, ns)))
    }
}
