import Logging
import NIOCore

/// The state of one link shared by its TCP connections and UDP mappings. Everything but the
/// immutable fields and `counters` is touched only on `loop` (every channel of a link lives there).
final class LinkCore: @unchecked Sendable {
    let loop: any EventLoop
    let profile: LinkProfile
    let target: SocketAddress
    let counters: LinkCounters
    let logger: Logger
    /// Per direction ([toTarget, toClient]): the serialization/delay model, shared by all flows.
    var shapers: [LinkShaper<SystemRandomNumberGenerator>]
    let transparent: Bool
    let queueLimit: Int
    let udpIdleTimeout: TimeAmount

    init(loop: any EventLoop, profile: LinkProfile, target: SocketAddress, udpIdleTimeout: TimeAmount, logger: Logger) {
        self.loop = loop
        self.profile = profile
        self.target = target
        self.counters = LinkCounters()
        self.logger = logger
        let s = LinkShaper(profile: profile, rng: SystemRandomNumberGenerator())
        self.shapers = [s, s]
        self.transparent = s.isTransparent
        self.queueLimit = profile.effectiveQueueLimit
        self.udpIdleTimeout = udpIdleTimeout
    }

    @inline(__always) static func now() -> Int64 {
        Int64(truncatingIfNeeded: NIODeadline.now().uptimeNanoseconds)
    }

    @inline(__always) static func deadline(_ ns: Int64) -> NIODeadline {
        .uptimeNanoseconds(UInt64(max(0, ns)))
    }
}
