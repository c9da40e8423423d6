import BlobStore
import Logging
import struct MeshCore.TransportChooser
import MeshHTTP
import MeshHTTP2
import MeshQUIC
import MeshTLS
import Metrics
import NIOCore
import Synchronization

/// Requests to other nodes over long-lived multiplexed connections (one per peer and transport),
/// with the node's own certificate (role `node`).
///
/// HTTP/3 over QUIC is preferred when the target advertises a QUIC endpoint; HTTP/2 over TLS/TCP is
/// the fallback. With `adaptive`, a `TransportChooser` picks between the two per peer from the
/// latency and goodput the last requests measured (by expected size), the fallback rules unchanged. A QUIC handshake that fails (blocked UDP, nothing listening) marks that endpoint
/// down for `quicRetryAfter`, so later requests go straight to TCP instead of waiting for a
/// handshake timeout each time; a request that fails on QUIC before any body was sent is retried
/// on TCP once.
public final class MeshTransport: MeshRequester {
    public struct Settings: Sendable {
        /// Prefer QUIC (`.quic`, TCP fallback) or use TCP only.
        public var preferred: MeshTransportKind = .quic
        /// A QUIC handshake slower than this counts as failed (a LAN handshake takes ~1 ms).
        public var quicConnectTimeout: Duration = .seconds(1)
        /// How long an endpoint whose QUIC handshake failed is reached over TCP only.
        public var quicRetryAfter: Duration = .seconds(30)
        /// QUIC connection settings (e.g. the datagram size).
        public var quic = QUICSettings()
        /// Choose per peer between QUIC and TCP by measured latency and goodput (`[fetch] transport = "adaptive"`).
        public var adaptive = false
        public var chooser = TransportChooser.Configuration()
        public init() {}
    }

    let tcp: HTTP2ConnectionPool
    let quic: HTTP3ConnectionPool?
    let settings: Settings
    let logger: Logger
    private let quicDown = Mutex<[HostPort: ContinuousClock.Instant]>([:])
    private let requests: (quic: Counter, tcp: Counter)
    private let fallbacks = Counter(label: "cachemesh_mesh_quic_fallbacks_total")
    private let stalls = Counter(label: "cachemesh_mesh_stalled_requests_total")
    private let chooser: Mutex<TransportChooser>
    /// `cachemesh_mesh_transport_choices_total{transport,reason}`, made once (not per request).
    private let choices: [TransportChooser.Kind: [TransportChooser.Reason: Counter]]

    public init(credentials: TLSCredentials, settings: Settings = Settings(), logger: Logger) {
        self.settings = settings
        self.logger = logger
        tcp = HTTP2ConnectionPool(credentials: credentials, logger: logger)
        let c = settings.quicConnectTimeout.components
        quic = settings.preferred == .quic
            ? HTTP3ConnectionPool(credentials: credentials,
                                  connectTimeout: .nanoseconds(c.seconds * 1_000_000_000 + c.attoseconds / 1_000_000_000),
                                  settings: settings.quic, logger: logger)
            : nil
        requests = (Counter(label: "cachemesh_mesh_requests_total", dimensions: [("transport", "quic")]),
                    Counter(label: "cachemesh_mesh_requests_total", dimensions: [("transport", "tcp")]))
        chooser = Mutex(TransportChooser(preferred: .quic, configuration: settings.chooser))
        var choices: [TransportChooser.Kind: [TransportChooser.Reason: Counter]] = [:]
        for kind in TransportChooser.Kind.allCases {
            for reason in TransportChooser.Reason.allCases {
                choices[kind, default: [:]][reason] = Counter(label: "cachemesh_mesh_transport_choices_total",
                                                              dimensions: [("transport", kind.rawValue), ("reason", reason.rawValue)])
            }
        }
        self.choices = choices
    }

    /// Counts an adaptive choice (`cachemesh_mesh_transport_choices_total{transport,reason}`).
    private func counted(_ kind: TransportChooser.Kind, _ reason: TransportChooser.Reason) {
        choices[kind]?[reason]?.increment()
    }

    private func record(_ source: FetchSource, _ kind: MeshTransportKind, started: ContinuousClock.Instant, expectedBytes: Int64?, uploaded: Bool) {
        guard settings.adaptive else { return }
        let elapsed = ContinuousClock.now - started
        let k: TransportChooser.Kind = kind == .quic ? .quic : .tcp
        let large = (expectedBytes ?? 0) >= settings.chooser.largeBytes
        chooser.withLock { c in
            // A large upload's time to the response head is its transfer time, not a latency.
            if uploaded, large, let n = expectedBytes {
                c.record(peer: source.name, kind: k, headLatency: nil, bytes: n, transferTime: elapsed)
            } else {
                c.record(peer: source.name, kind: k, headLatency: elapsed)
            }
        }
    }

    public func transferred(from source: FetchSource, via transport: MeshTransportKind, bytes: Int64, duration: Duration) {
        guard settings.adaptive else { return }
        chooser.withLock { $0.record(peer: source.name, kind: transport == .quic ? .quic : .tcp, headLatency: nil, bytes: bytes, transferTime: duration) }
    }

    /// Drops what was measured about a member (it died: a new incarnation starts unmeasured).
    func forgetMeasurements(of name: String) {
        chooser.withLock { $0.forget(peer: name) }
    }

    /// How a request to a member with this QUIC endpoint goes now (for `/status`).
    func transport(toQUIC endpoint: HostPort?) -> MeshTransportKind {
        if quic != nil, let endpoint, isUp(endpoint) { return .quic }
        return .tcp
    }

    public func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> MeshReply {
        try await request(to: source, head, body: body, expectedBytes: nil)
    }

    public func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody, expectedBytes: Int64?) async throws -> MeshReply {
        var useQUIC = false
        if quic != nil, let q = source.quicEndpoint, isUp(q) {
            useQUIC = true
            if settings.adaptive {
                let (kind, reason) = chooser.withLock { $0.choose(peer: source.name, expectedBytes: expectedBytes) }
                counted(kind, reason)
                useQUIC = kind == .quic
            }
        }
        let uploaded: Bool
        if case .empty = body { uploaded = false } else { uploaded = true }
        if useQUIC, let quic, let q = source.quicEndpoint {
            var connected = false
            do {
                _ = try await quic.connection(host: q.host, port: q.port)
                connected = true
                let started = ContinuousClock.now
                let r = try await quic.request(host: q.host, port: q.port, head, body: body)
                requests.quic.increment()
                record(source, .quic, started: started, expectedBytes: expectedBytes, uploaded: uploaded)
                return MeshReply(r, via: .quic)
            } catch {
                try Task.checkCancellation()
                // A handshake that failed, or a path that went dark under an established
                // connection (UDP dropped on the way): TCP only for a while, one probe later.
                let dark: Bool
                if case QUICError.pathDark = error { dark = true } else { dark = false }
                if !connected || dark { markDown(q) }
                if dark { await quic.discard(host: q.host, port: q.port) }
                // Once a non-replayable body started flowing over QUIC it cannot be sent again
                // (the caller re-opens its source: `Mirror.copy` does).
                if connected && !body.isReplayable { throw error }
                fallbacks.increment()
                logger.info("QUIC to \(source.name) failed, using TCP", metadata: [
                    "endpoint": "\(q)", "stage": "\(connected ? "request" : "handshake")", "error": "\(error)"])
            }
        }
        let started = ContinuousClock.now
        let r = try await tcp.request(host: source.endpoint.host, port: source.endpoint.port, head, body: body)
        requests.tcp.increment()
        record(source, .tcp, started: started, expectedBytes: expectedBytes, uploaded: uploaded)
        return MeshReply(r, via: .tcp)
    }

    /// Closes the connections to a member that membership declared dead: requests in flight to
    /// it fail now (and go elsewhere) instead of when the connection times out.
    public func dropConnections(to source: FetchSource) async {
        await tcp.discard(host: source.endpoint.host, port: source.endpoint.port)
        if let q = source.quicEndpoint { await quic?.discard(host: q.host, port: q.port) }
    }

    public func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async {
        logger.warning("a request to \(source.name) stalled: reconnecting", metadata: ["transport": "\(transport?.rawValue ?? "any")"])
        stalls.increment()
        if transport != .quic { await tcp.discard(host: source.endpoint.host, port: source.endpoint.port) }
        if transport != .tcp, let q = source.quicEndpoint { await quic?.discard(host: q.host, port: q.port) }
    }

    private func isUp(_ q: HostPort) -> Bool {
        quicDown.withLock { m in
            guard let until = m[q] else { return true }
            if ContinuousClock.now >= until { m[q] = nil; return true }
            return false
        }
    }

    private func markDown(_ q: HostPort) {
        quicDown.withLock { $0[q] = ContinuousClock.now + settings.quicRetryAfter }
    }

    public func closeAll() async {
        await tcp.closeAll()
        await quic?.closeAll()
    }
}

/// What a mirror copy carries: a blob from the local store (`PUT /cas/{hash}`, streamed from its
/// file) or an action-cache entry (`PUT /ac/{key}`, its bytes; at most 16 MiB).
public enum MirrorItem: Sendable, CustomStringConvertible {
    case blob(Digest)
    case action(key: String, value: [UInt8])

    var size: Int64 {
        switch self {
        case .blob(let d): d.size
        case .action(_, let value): Int64(value.count)
        }
    }

    public var description: String {
        switch self {
        case .blob(let d): "\(d)"
        case .action(let key, _): "action \(key)"
        }
    }
}

/// Copies blobs and action-cache entries written here to other nodes (`PUT /cas/{hash}` or
/// `PUT /ac/{key}` with the mirror header, so the receiver does not mirror again). `replicate` returns once `quorum` copies elsewhere are durable;
/// the remaining copies finish in the background and are tracked until `flush()`.
public final class Mirror: Sendable {
    /// Marks a `PUT /cas/{hash}` as a copy placed by another node (the receiver announces it
    /// but does not mirror it again).
    public static let header = "x-cachemesh-mirror"
    let store: BlobStore
    let requester: any MeshRequester
    let logger: Logger
    private let pending = PendingCounter()
    private let copies = Counter(label: "cachemesh_mirror_copies_total")
    private let failures = Counter(label: "cachemesh_mirror_failures_total")
    private let hedges = Counter(label: "cachemesh_mirror_hedges_total")

    public init(store: BlobStore, requester: any MeshRequester, logger: Logger) {
        self.store = store
        self.requester = requester
        self.logger = logger
    }

    /// Copy `digest` to `targets`; wait for `quorum` successes (0 = do not wait).
    public func replicate(_ digest: Digest, to targets: [FetchSource], quorum: Int) async throws {
        try await replicate(.blob(digest), to: targets, quorum: quorum)
    }

    /// Copy `item` to `targets`; wait for `quorum` successes (0 = do not wait).
    public func replicate(_ item: MirrorItem, to targets: [FetchSource], quorum: Int) async throws {
        guard !targets.isEmpty else {
            if quorum > 0 { throw BlobStoreError.io("no live mirror target for \(item) (need \(quorum))") }
            return
        }
        let (stream, continuation) = AsyncStream<Bool>.makeStream()
        for t in targets {
            pending.add(1)
            Task {
                defer { pending.add(-1) }
                let ok = await copy(item, to: t)
                continuation.yield(ok)
            }
        }
        guard quorum > 0 else { return }
        var ok = 0, done = 0
        for await success in stream {
            done += 1
            if success { ok += 1 }
            if ok >= quorum { return }
            if done == targets.count { break }
        }
        throw BlobStoreError.io("only \(ok) of \(quorum) required mirror copies of \(item) succeeded")
    }

    /// Copy `item` to `copies` of `candidates` (best first) and wait until `quorum` of them are
    /// durable. A copy that fails is replaced by the next candidate at once. A copy still running
    /// after `hedgeDelay(size)` is backed by the next candidate when membership no longer counts its
    /// target alive (`isAlive`: a frozen node turns suspect within a couple of probe intervals),
    /// and unconditionally after `slowDelay(size)` — so a dead or frozen target does not hold the
    /// write, while a target that is merely slow under load gets no extra copy. Copies still
    /// running when the quorum is met finish in the background (`flush`). Throws when the
    /// candidates run out.
    public func replicate(_ digest: Digest, candidates: [FetchSource], copies: Int, quorum: Int,
                          isAlive: @escaping @Sendable (FetchSource) -> Bool = { _ in true }) async throws {
        try await replicate(.blob(digest), candidates: candidates, copies: copies, quorum: quorum, isAlive: isAlive)
    }

    /// `replicate(_:candidates:copies:quorum:isAlive:)` for any `MirrorItem`.
    public func replicate(_ item: MirrorItem, candidates: [FetchSource], copies: Int, quorum: Int,
                          isAlive: @escaping @Sendable (FetchSource) -> Bool = { _ in true }) async throws {
        let first = Array(candidates.prefix(max(0, copies)))
        guard quorum > 0 else { return try await replicate(item, to: first, quorum: 0) }
        guard !candidates.isEmpty else { throw BlobStoreError.io("no live mirror target for \(item) (need \(quorum))") }
        let (results, sink) = AsyncStream<(Int, Bool)?>.makeStream()   // nil: time to look at the running copies
        var next = 0, ok = 0, errors = 0
        var running: [Int: (started: ContinuousClock.Instant, backed: Bool)] = [:]
        func launch() {
            let i = next
            let target = candidates[i]
            next += 1
            running[i] = (.now, false)
            pending.add(1)
            Task {
                defer { pending.add(-1) }
                sink.yield((i, await copy(item, to: target)))
            }
        }
        while next < max(1, min(copies, candidates.count)) { launch() }
        let hedge = Self.hedgeDelay(size: item.size), slow = Self.slowDelay(size: item.size)
        let ticker = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                sink.yield(nil)
            }
        }
        defer {
            ticker.cancel()
            sink.finish()
        }
        for await result in results {
            switch result {
            case nil:
                let now = ContinuousClock.now
                for (i, r) in running.sorted(by: { $0.key < $1.key }) where !r.backed && next < candidates.count {
                    let age = now - r.started
                    guard age > slow || (age > hedge && !isAlive(candidates[i])) else { continue }
                    running[i]?.backed = true
                    hedges.increment()
                    logger.info("mirror copy of \(item) to \(candidates[i].name) is not finishing: also copying to \(candidates[next].name)")
                    launch()
                }
            case (let i, true)?:
                running[i] = nil
                ok += 1
                if ok >= quorum { return }
            case (let i, false)?:
                let backed = running[i]?.backed ?? false
                running[i] = nil
                errors += 1
                if !backed, next < candidates.count { launch() }
            }
            if running.isEmpty && next >= candidates.count { break }
        }
        throw BlobStoreError.io("only \(ok) of \(quorum) required mirror copies of \(item) succeeded (\(errors) failed, \(candidates.count) candidates)")
    }

    /// How long a mirror copy to a target membership no longer counts alive may run before another
    /// candidate backs it: 1 s plus the time the body takes at 100 MB/s.
    static func hedgeDelay(size: Int64) -> Duration { .seconds(1) + .milliseconds(size / 100_000) }

    /// How long any mirror copy may run before another candidate backs it: 10 s plus the time
    /// the body takes at 10 MB/s (a live target that slow is as good as gone).
    static func slowDelay(size: Int64) -> Duration { .seconds(10) + .milliseconds(size / 10_000) }

    /// One copy; a copy whose connection failed under it (a QUIC path gone dark, a reset) is
    /// tried once more — its bytes are on local disk, and the transport has by then moved that
    /// target to TCP if QUIC was at fault. A refusal (an HTTP status) is not retried.
    func copy(_ digest: Digest, to target: FetchSource) async -> Bool {
        await copy(.blob(digest), to: target)
    }

    func copy(_ item: MirrorItem, to target: FetchSource) async -> Bool {
        for attempt in 1...2 {
            switch await copyOnce(item, to: target) {
            case .copied: return true
            case .refused: return false
            case .failed where attempt == 2 || Task.isCancelled: return false
            case .failed: logger.info("mirror copy of \(item) to \(target.name) failed in transit: trying once more")
            }
        }
        return false
    }

    private enum CopyOutcome { case copied, refused, failed }

    private func copyOnce(_ item: MirrorItem, to target: FetchSource) async -> CopyOutcome {
        do {
            let path: String, body: HTTPOutboundBody
            switch item {
            case .blob(let d):
                path = "/cas/\(d.hash)"
                body = .file(try await store.openRead(hash: d.hash))
            case .action(let key, let value):
                path = "/ac/\(key)"
                body = .bytes(ByteBuffer(bytes: value))
            }
            let r = try await requester.request(
                to: target,
                HTTPRequestHead(method: "PUT", path: path,
                                headers: ["content-length": String(item.size), Mirror.header: "1"]),
                body: body, expectedBytes: item.size).response
            _ = try? await r.body.collect(upTo: 64 * 1024)
            guard r.status == 201 || r.status == 200 else {
                failures.increment()
                logger.warning("mirror copy refused", metadata: ["item": "\(item)", "to": "\(target)", "status": "\(r.status)"])
                return .refused
            }
            copies.increment()
            return .copied
        } catch {
            failures.increment()
            logger.warning("mirror copy failed", metadata: ["item": "\(item)", "to": "\(target)", "error": "\(error)"])
            return .failed
        }
    }

    /// Copies still in flight.
    public var inFlight: Int { pending.value }

    /// Wait (bounded) until every background copy finished.
    public func flush(timeout: Duration) async {
        let deadline = ContinuousClock.now + timeout
        while pending.value > 0 && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }
}

final class PendingCounter: Sendable {
    private let count = Synchronization.Mutex(0)
    func add(_ n: Int) { count.withLock { $0 += n } }
    var value: Int { count.withLock { $0 } }
}
