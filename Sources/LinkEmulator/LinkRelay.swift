import Logging
import NIOCore
import NIOPosix

/// One emulated link: listen on `listen` (TCP and UDP, same port) and forward to `target`
/// (TCP and UDP on the target's port) through `profile`.
public struct LinkSpec: Sendable, Equatable, CustomStringConvertible {
    public var listenHost: String
    public var listenPort: Int
    public var targetHost: String
    public var targetPort: Int
    /// The target's UDP port when it differs from `targetPort` (e.g. a node started with
    /// `--listen 127.0.0.1:0 --quic-listen 127.0.0.1:0`); nil = `targetPort`.
    public var targetUDPPort: Int?
    public var profile: LinkProfile

    public init(listenHost: String, listenPort: Int, targetHost: String, targetPort: Int, targetUDPPort: Int? = nil,
                profile: LinkProfile = .transparent) {
        self.listenHost = listenHost
        self.listenPort = listenPort
        self.targetHost = targetHost
        self.targetPort = targetPort
        self.targetUDPPort = targetUDPPort
        self.profile = profile
    }

    public var description: String {
        "\(Self.join(listenHost, listenPort)) -> \(Self.join(targetHost, targetPort))"
    }

    static func join(_ host: String, _ port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// `LISTEN=TARGET[,udp=PORT][,delay=D][,jitter=J][,loss=L][,rate=R][,queue=Q]`, where LISTEN and
    /// TARGET are `host:port` (`[v6]:port`); `udp=PORT` sends UDP to another target port; the other
    /// options override `defaults` for this link only.
    /// Example: `127.0.0.1:19440=127.0.0.1:9440,delay=5ms`.
    public init(parsing text: String, defaults: LinkProfile = .transparent) throws {
        var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let head = parts.removeFirst()
        let sides = head.split(separator: "=", omittingEmptySubsequences: false).map(String.init)
        guard sides.count == 2 else {
            throw LinkProfileError("bad link '\(text)': expected LISTEN=TARGET, e.g. 127.0.0.1:19440=127.0.0.1:9440")
        }
        let (lh, lp) = try Self.hostPort(sides[0], what: "listen address")
        let (th, tp) = try Self.hostPort(sides[1], what: "target address")
        guard tp != 0 else { throw LinkProfileError("bad target address '\(sides[1])': port 0") }
        var profile = defaults
        var udp: Int?
        for p in parts {
            let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw LinkProfileError("bad link option '\(p)' in '\(text)': expected key=value") }
            if kv[0] == "udp" {
                guard let u = Int(kv[1]), (1...65535).contains(u) else { throw LinkProfileError("bad udp port '\(kv[1])' in '\(text)'") }
                udp = u
            } else {
                try profile.set(kv[0], kv[1])
            }
        }
        try profile.validate()
        self.init(listenHost: lh, listenPort: lp, targetHost: th, targetPort: tp, targetUDPPort: udp, profile: profile)
    }

    static func hostPort(_ s: String, what: String) throws -> (String, Int) {
        let host: Substring, port: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else {
                throw LinkProfileError("bad \(what) '\(s)': expected host:port or [v6]:port")
            }
            host = s[s.index(after: s.startIndex)..<close]
            port = s[s.index(close, offsetBy: 2)...]
        } else {
            guard let colon = s.lastIndex(of: ":"), !s[..<colon].contains(":") else {
                throw LinkProfileError("bad \(what) '\(s)': expected host:port or [v6]:port")
            }
            host = s[..<colon]
            port = s[s.index(after: colon)...]
        }
        guard !host.isEmpty, let p = Int(port), (0...65535).contains(p) else {
            throw LinkProfileError("bad \(what) '\(s)': expected host:port with a port in 0...65535")
        }
        return (String(host), p)
    }
}

/// A userspace link emulator: per link, a TCP and a UDP listener on the same port that forward
/// to a target through delay, jitter, loss and a rate limit (see ``LinkShaper`` for the model).
public final class LinkRelay: Sendable {
    public struct Link: Sendable {
        public let spec: LinkSpec
        /// The address actually bound (the port is the real one when 0 was asked for).
        public let listening: SocketAddress
        public let counters: LinkCounters
        let tcp: any Channel
        let udp: any Channel
        let core: NIOLoopBound<LinkCore>
        let udpLink: NIOLoopBound<UDPLink>
    }

    public let links: [Link]
    private let group: MultiThreadedEventLoopGroup?

    private init(links: [Link], group: MultiThreadedEventLoopGroup?) {
        self.links = links
        self.group = group
    }

    /// Starts every link. Each link's channels live on one event loop of `group` (links are spread
    /// over its loops); without a group, one is made with `threads` (default: one per link, at
    /// most the number of cores) and shut down by ``close()``.
    public static func start(_ specs: [LinkSpec], group: (any EventLoopGroup)? = nil, threads: Int? = nil,
                             udpIdleTimeout: Duration = .seconds(60),
                             logger: Logger = Logger(label: "cachemesh.relay")) async throws -> LinkRelay {
        for s in specs { try s.profile.validate() }
        let own: MultiThreadedEventLoopGroup? = group == nil
            ? MultiThreadedEventLoopGroup(numberOfThreads: threads ?? max(1, min(specs.count, System.coreCount))) : nil
        let g: any EventLoopGroup = group ?? own!
        var links: [Link] = []
        do {
            for spec in specs {
                let target = try SocketAddress.makeAddressResolvingHost(spec.targetHost, port: spec.targetPort)
                let udpTarget = try SocketAddress.makeAddressResolvingHost(spec.targetHost, port: spec.targetUDPPort ?? spec.targetPort)
                let loop = g.next()
                let idle = TimeAmount.nanoseconds(LinkProfile.nanoseconds(udpIdleTimeout))
                let counters = LinkCounters()
                // The link's state is made on its loop and used only there.
                let core = try await loop.submit {
                    NIOLoopBound(LinkCore(loop: loop, profile: spec.profile, target: target, udpTarget: udpTarget,
                                          udpIdleTimeout: idle, counters: counters, logger: logger), eventLoop: loop)
                }.get()
                let (tcp, udp, udpLink) = try await bindBoth(core: core, loop: loop, host: spec.listenHost, port: spec.listenPort)
                links.append(Link(spec: spec, listening: tcp.localAddress!, counters: counters, tcp: tcp, udp: udp,
                                  core: core, udpLink: udpLink))
            }
        } catch {
            for l in links { await l.shutdown() }
            try? await own?.shutdownGracefully()
            throw error
        }
        return LinkRelay(links: links, group: own)
    }

    /// TCP first; with port 0 its port is then taken for UDP too (retried if that UDP port is busy).
    private static func bindBoth(core: NIOLoopBound<LinkCore>, loop: any EventLoop, host: String, port: Int)
        async throws -> (any Channel, any Channel, NIOLoopBound<UDPLink>) {
        var attempt = 0
        while true {
            attempt += 1
            let tcp = try await TCPRelay.bind(core: core, loop: loop, host: host, port: port)
            let bound = tcp.localAddress?.port ?? port
            do {
                let (udp, link) = try await UDPLink.bind(core: core, loop: loop, host: host, port: bound)
                return (tcp, udp, link)
            } catch {
                try? await tcp.close()
                if port != 0 || attempt >= 20 { throw error }
            }
        }
    }

    public func counters() -> [LinkCounters.Snapshot] { links.map { $0.counters.snapshot() } }

    /// Closes the listeners and every relayed connection and mapping.
    public func close() async {
        for l in links { await l.shutdown() }
        try? await group?.shutdownGracefully()
    }
}

extension LinkRelay.Link {
    func shutdown() async {
        let u = udpLink
        try? await udp.eventLoop.submit { u.value.shutdown() }.get()
        try? await tcp.close()
        let core = self.core
        try? await udp.eventLoop.submit { core.value.closeAllTCP() }.get()
        try? await udp.close()
    }
}
