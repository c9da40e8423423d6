import ArgumentParser
import Dispatch
import Foundation
import LinkEmulator
import Logging
import Synchronization

/// A userspace link emulator in front of nodes (this kernel has no netem): every link listens on
/// one port for TCP and UDP and forwards to its target through delay, jitter, loss and a rate.
struct RelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "relay",
        abstract: "Relay TCP and UDP (QUIC) to targets through an emulated link (delay, jitter, loss, rate).",
        discussion: """
            Each --link LISTEN=TARGET listens on LISTEN for TCP and UDP (same port) and forwards to TARGET.
            The delay applies to each direction (RTT = 2 x delay). Per-link overrides:
            --link 127.0.0.1:19441=127.0.0.1:9441,delay=5ms,loss=1%
            On TCP, loss cannot drop bytes: a "lost" ~1448-byte segment holds the stream one extra RTT
            (head-of-line blocking as after a fast retransmit). UDP datagrams are dropped.
            Prints 'relay: listening LISTEN -> TARGET' per link when ready; on SIGTERM/SIGINT prints
            the counters and exits 0.
            """, shouldDisplay: false)

    @Option(name: .customLong("link"), help: "LISTEN=TARGET[,udp=PORT,delay=D,jitter=J,loss=L,rate=R,queue=Q], host:port each (repeatable); udp=PORT: the target's UDP port if it differs.")
    var links: [String] = []
    @Option(help: "One-way delay per direction, e.g. 20ms, 250us, 0.") var delay: String = "0"
    @Option(help: "Uniform jitter ±, e.g. 1ms (the delay is clamped at 0).") var jitter: String = "0"
    @Option(help: "Loss probability, e.g. 0.01 or 1%.") var loss: String = "0"
    @Option(help: "Link rate per direction, e.g. 100mbit, 1gbit (default: unlimited).") var rate: String?
    @Option(name: .customLong("queue-limit"), help: "Per-direction queue limit, e.g. 8MiB (default: max(BDP, 4 MiB)).") var queueLimit: String?
    @Option(name: .customLong("udp-idle-timeout"), help: "Expire a UDP client mapping after this idle time.") var udpIdleTimeout: String = "60s"
    @Option(help: "Event loop threads (default: one per link, at most the number of cores).") var threads: Int?
    @Option(name: .customLong("log-level"), help: "Least severe log messages written to stderr: trace, debug, info, notice, warning, error, critical.") var logLevel: Logger.Level = .warning

    func profile() throws -> LinkProfile {
        var p = LinkProfile()
        do {
            try p.set("delay", delay)
            try p.set("jitter", jitter)
            try p.set("loss", loss)
            if let rate { try p.set("rate", rate) }
            if let queueLimit { try p.set("queue", queueLimit) }
            try p.validate()
        } catch {
            throw ValidationError("\(error)")
        }
        return p
    }

    func validate() throws {
        guard !links.isEmpty else { throw ValidationError("at least one --link LISTEN=TARGET is needed, e.g. --link 127.0.0.1:19440=127.0.0.1:9440") }
        _ = try specs()
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    func specs() throws -> [LinkSpec] {
        let p = try profile()
        return try links.map { text in
            do { return try LinkSpec(parsing: text, defaults: p) } catch { throw ValidationError("--link: \(error)") }
        }
    }

    func run() async throws {
        bootstrapLogging(logLevel)
        let idle: Duration
        do { idle = try LinkProfile.parseDuration(udpIdleTimeout, what: "--udp-idle-timeout") } catch { throw ValidationError("\(error)") }
        // Take the signals before listening, so that a signal right after the ready line is not lost.
        let stop = SignalWaiter([SIGTERM, SIGINT])
        let relay: LinkRelay
        do {
            relay = try await LinkRelay.start(try specs(), threads: threads, udpIdleTimeout: idle,
                                              logger: Logger(label: "cachemesh.relay"))
        } catch {
            throw CLIError("relay: cannot listen: \(error)")
        }
        for l in relay.links {
            print("relay: profile \(l.spec.listenHost):\(l.listening.port ?? l.spec.listenPort) \(l.spec.profile)")
        }
        for l in relay.links {
            let udp = l.spec.targetUDPPort.map { " (udp \($0))" } ?? ""
            print("relay: listening \(LinkSpecFormat.address(l.spec.listenHost, l.listening.port ?? l.spec.listenPort)) -> \(LinkSpecFormat.address(l.spec.targetHost, l.spec.targetPort))\(udp)")
        }
        fflush(nil)
        let sig = await stop.wait()
        print("relay: signal \(sig), stopping")
        for (l, c) in zip(relay.links, relay.counters()) {
            print("relay: counters \(LinkSpecFormat.address(l.spec.listenHost, l.listening.port ?? l.spec.listenPort)) \(c)")
        }
        fflush(nil)
        await relay.close()
    }
}

enum LinkSpecFormat {
    static func address(_ host: String, _ port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

/// Waits for the first of some signals (dispatch sources; the default action is disabled).
/// `@unchecked`: only because Dispatch's signal sources are not marked Sendable; they are set
/// once in `init` and never touched again, and the state is behind a `Mutex`.
final class SignalWaiter: @unchecked Sendable {
    private let sources: [any DispatchSourceSignal]
    private let state = Mutex<(fired: Int32?, waiter: CheckedContinuation<Int32, Never>?)>((nil, nil))

    init(_ signals: [Int32]) {
        var sources: [any DispatchSourceSignal] = []
        for s in signals {
            signal(s, SIG_IGN)
            sources.append(DispatchSource.makeSignalSource(signal: s, queue: .global()))
        }
        self.sources = sources
        for (s, src) in zip(signals, sources) {
            src.setEventHandler { [weak self] in self?.fire(s) }
            src.resume()
        }
    }

    private func fire(_ s: Int32) {
        let w: CheckedContinuation<Int32, Never>? = state.withLock { st in
            if st.fired == nil { st.fired = s }
            defer { st.waiter = nil }
            return st.waiter
        }
        w?.resume(returning: s)
    }

    func wait() async -> Int32 {
        await withCheckedContinuation { c in
            let done: Int32? = state.withLock { st in
                if let f = st.fired { return f }
                st.waiter = c
                return nil
            }
            if let done { c.resume(returning: done) }
        }
    }
}
