import Logging
import MeshHTTP
import NIOCore
import Synchronization

/// Bounds the connections of one listener, and keeps room for clients that do something.
///
/// At the cap a new connection first displaces the connection that has been idle longest (no
/// open stream — including one still in its TLS handshake), the way servers reuse idle
/// keep-alive connections under pressure: an attacker's thousand idle connections cannot lock a
/// working client out. Only when every connection is busy does the listener stop accepting
/// (the kernel's backlog holds newcomers) until one closes. `EMFILE` while accepting backs off
/// instead of spinning (NIO's `AcceptBackoffHandler`, added beside this handler).
final class ConnectionLimiter: ChannelInboundHandler, Sendable {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel

    struct Entry {
        var channel: any Channel
        /// Since when the connection has had no open stream (nil: busy).
        var idleSince: ContinuousClock.Instant?
    }

    let maxConnections: Int
    private let logger: Logger
    private let state = Mutex<(entries: [ObjectIdentifier: Entry], paused: Bool, lastLog: ContinuousClock.Instant?)>(([:], false, nil))
    private let serverChannel = Mutex<(any Channel)?>(nil)

    init(maxConnections: Int, logger: Logger) {
        self.maxConnections = maxConnections
        self.logger = logger
    }

    var count: Int { state.withLock { $0.entries.count } }

    func handlerAdded(context: ChannelHandlerContext) {
        serverChannel.withLock { $0 = context.channel }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let child = unwrapInboundIn(data)
        let id = ObjectIdentifier(child)
        let (displaced, pause) = state.withLock { s -> ((any Channel)?, Bool) in
            s.entries[id] = Entry(channel: child, idleSince: .now)
            guard s.entries.count > maxConnections else { return (nil, false) }
            // Over the cap: the longest-idle other connection makes room.
            let victim = s.entries.filter { $0.key != id && $0.value.idleSince != nil }.min { $0.value.idleSince! < $1.value.idleSince! }
            if let victim {
                s.entries[victim.key] = nil
                return (victim.value.channel, false)
            }
            s.paused = true
            return (nil, true)
        }
        child.closeFuture.whenComplete { [self] _ in closed(id) }
        if let displaced {
            TransportRefusals.count("idle_connection_displaced", transport: "h2")
            log("connection cap (\(maxConnections)) reached: closing the longest-idle connection to admit a new one")
            displaced.close(promise: nil)
        }
        if pause {
            TransportRefusals.count("accept_paused", transport: "h2")
            log("connection cap (\(maxConnections)) reached and every connection is busy: accepting paused until one closes")
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
        context.fireChannelRead(data)
    }

    /// The connection's streams: idle (none open) or busy.
    func update(_ channel: any Channel, idle: Bool) {
        let id = ObjectIdentifier(channel)
        state.withLock { s in
            guard s.entries[id] != nil else { return }
            if idle {
                if s.entries[id]!.idleSince == nil { s.entries[id]!.idleSince = .now }
            } else {
                s.entries[id]!.idleSince = nil
            }
        }
    }

    private func closed(_ id: ObjectIdentifier) {
        let resume = state.withLock { s -> Bool in
            s.entries[id] = nil
            guard s.paused, s.entries.count < maxConnections else { return false }
            s.paused = false
            return true
        }
        if resume, let server = serverChannel.withLock({ $0 }) {
            server.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        }
    }

    private func log(_ message: String) {
        let now = ContinuousClock.now
        let allowed = state.withLock { s -> Bool in
            if let last = s.lastLog, now - last < .seconds(1) { return false }
            s.lastLog = now
            return true
        }
        if allowed { logger.notice("\(message)") }
    }
}
