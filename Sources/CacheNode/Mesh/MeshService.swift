import BlobStore
import Foundation
import Logging
import MeshCore
import MeshHTTP
import MeshHTTP2
import MeshTLS
import Metrics
import NIOCore
import Synchronization

/// The mesh shell of one node: runs the pure membership + locality core (`MeshNode`) on a clock,
/// carries its messages over the mesh-internal route (`POST /mesh/gossip`, node certificates only),
/// and gives the routes the worker role (racing fetches), mirroring and drain hand-off.
public final class MeshService: MeshHooks, Sendable {
    public struct Settings: Sendable {
        public var replication: Int
        public var writeQuorum: Int
        public var fetch = FetchSettings()
        public var hedge: HedgePolicy = HedgePolicy()
        public var transport = MeshTransport.Settings()
        public var tick: Duration = .milliseconds(50)
        public var membership: Membership.Configuration = .lan
        public init(replication: Int, writeQuorum: Int, fetch: FetchSettings = FetchSettings()) {
            self.replication = replication
            self.writeQuorum = writeQuorum
            self.fetch = fetch
            transport.preferred = fetch.transport
        }

        /// What a topology asks for (replication, write quorum, fetch settings).
        public init(topology: Topology) {
            self.init(replication: topology.replication, writeQuorum: topology.writeQuorum, fetch: topology.fetch)
        }
    }

    static let gossipPath = "/mesh/gossip"

    public let me: NodeID
    let node: Topology.Node
    let topology: Topology
    let settings: Settings
    let store: BlobStore
    let logger: Logger
    let transport: MeshTransport
    let fetcher: BlobFetcher
    let mirror: Mirror
    private let core: Mutex<MeshNode>
    private let latency = LatencyBox()
    /// hash → size, learned from locality gossip (HTTP GETs name only the hash).
    private let sizes = Mutex<[String: Int64]>([:])
    private let started = ContinuousClock.now
    private let running = Mutex(true)
    private let mapEntries = Gauge(label: "cachemesh_locality_entries")
    private let mapBytes = Gauge(label: "cachemesh_locality_bytes")
    private let liveMembers = Gauge(label: "cachemesh_members_live")
    /// Gossip messages refused (malformed, out of range, sender not admitted) and single updates dropped.
    private let refusedGossip = Counter(label: "cachemesh_gossip_refused_total")
    private let refusalLog = LogThrottle(interval: .seconds(1))

    public init(topology: Topology, nodeName: String, store: BlobStore, credentials: TLSCredentials, settings: Settings? = nil, logger: Logger) throws {
        guard let n = topology.node(named: nodeName) else { throw ConfigurationError("no node \(nodeName) in topology \(topology.name)") }
        self.node = n
        self.topology = topology
        self.settings = settings ?? Settings(topology: topology)
        self.store = store
        self.logger = logger
        self.me = NodeID(name: n.name, uid: UInt64.random(in: 1...UInt64.max))
        self.transport = MeshTransport(credentials: credentials, settings: self.settings.transport, logger: logger)
        let latency = self.latency
        let policy = self.settings.hedge
        let strategy = self.settings.fetch.strategy
        self.fetcher = BlobFetcher(store: store, requester: transport, logger: logger, spacing: {
            switch strategy {
            case .immediate: return .allAtOnce
            case .peersOnly, .originOnly: return .failoverOnly
            case .hedged: return latency.tracker.withLock { policy.spacing($0) }
            }
        })
        self.mirror = Mirror(store: store, requester: transport, logger: logger)
        // Only the topology's nodes may be members, each with the metadata the topology gives it.
        var membership = self.settings.membership
        membership.admission = Admission(expected: Dictionary(topology.nodes.map { ($0.name, Self.metadata(of: $0)) },
                                                              uniquingKeysWith: { first, _ in first }))
        self.core = Mutex(MeshNode(myself: me, metadata: Self.metadata(of: n), membershipConfiguration: membership,
                                   seed: UInt64.random(in: 0...UInt64.max)))
        store.onEviction { [weak self] d in self?.evicted(d) }
    }

    func now() -> Duration { ContinuousClock.now - started }

    /// What a topology node gossips about itself (and all that others accept about it).
    static func metadata(of n: Topology.Node) -> NodeMetadata {
        NodeMetadata(name: n.name, role: n.role == .origin ? .origin : .peer, tcpEndpoint: "\(n.advertiseTCP)",
                     quicEndpoint: n.advertiseQUIC.map { "\($0)" } ?? "", certificateCN: n.name)
    }

    // MARK: run loop

    /// Join through the seeds, then tick until `stop()`.
    public func run() async {
        let seeds = node.seeds.compactMap { topology.node(named: $0).map { "\($0.advertiseTCP)" } }
        perform(core.withLock { $0.join(seeds: seeds, now: now()) })
        var lastJoin = now()
        while running.withLock({ $0 }) {
            try? await Task.sleep(for: settings.tick)
            // A seed that was not up yet (or restarted) is asked again until it is a live member.
            if now() - lastJoin > .seconds(2) {
                lastJoin = now()
                let missing = core.withLock { c in
                    let known = Set(c.membership.allMembers.filter { $0.status.isLive }.map(\.metadata.tcpEndpoint))
                    return seeds.filter { !known.contains($0) }
                }
                if !missing.isEmpty { perform(core.withLock { $0.join(seeds: missing, now: now()) }) }
            }
            let actions = core.withLock { $0.tick(now: now()) }
            perform(actions)
            let (entries, bytes, live) = core.withLock { ($0.locality.entryCount, $0.locality.approximateBytes, $0.membership.liveMembers.count) }
            mapEntries.record(entries)
            mapBytes.record(bytes)
            liveMembers.record(live)
        }
    }

    /// Announce LEAVING and give the gossip a moment to spread.
    public func leave() async {
        perform(core.withLock { $0.leave(now: now()) })
        try? await Task.sleep(for: .milliseconds(300))
    }

    public func stop() async {
        running.withLock { $0 = false }
        await transport.closeAll()
    }

    /// How to reach a member: its advertised TCP (and QUIC) endpoints from membership metadata.
    private func target(_ id: NodeID, in c: MeshNode, isOrigin: Bool = false) -> FetchSource? {
        guard let m = c.membership.member(id), let tcp = HostPort(m.metadata.tcpEndpoint) else { return nil }
        return FetchSource(name: id.name, endpoint: tcp, quicEndpoint: HostPort(m.metadata.quicEndpoint), isOrigin: isOrigin)
    }

    private func perform(_ actions: [MeshAction]) {
        for a in actions {
            switch a {
            case .send(let m, let to):
                if let t = core.withLock({ target(to, in: $0) }) { send(m, to: t) }
            case .sendToAddress(let m, let address):
                // Joins go to a seed's TCP address (its QUIC endpoint is learnt from membership).
                if let ep = HostPort(address) { send(m, to: FetchSource(name: address, endpoint: ep, isOrigin: false)) }
            case .memberChanged(let e):
                logger.info("member \(e.node.name): \(e.previous?.rawValue ?? "new") → \(e.status.rawValue)")
                if !e.status.isLive, e.node != me {
                    latency.tracker.withLock { $0.forget(e.node) }
                    // A dead member's connections fail what is in flight to it now (a left one
                    // is draining: its in-flight requests still complete).
                    if e.status == .dead, let t = core.withLock({ target(e.node, in: $0) }) {
                        Task { await self.transport.dropConnections(to: t) }
                    }
                    Task { await self.reReplicate(after: e.node) }
                }
            case .rttMeasured(let id, let rtt):
                latency.tracker.withLock { $0.recordRTT(rtt, for: id) }
            }
        }
    }

    private func send(_ message: Message, to target: FetchSource) {
        let envelope = Envelope(from: me, message: message)
        guard let body = try? JSONEncoder().encode(envelope) else { return }
        let transport = self.transport
        let logger = self.logger
        Task {
            do {
                let r = try await transport.request(to: target,
                                                    HTTPRequestHead(method: "POST", path: Self.gossipPath, headers: ["content-type": "application/json"]),
                                                    body: .bytes(ByteBuffer(bytes: body)))
                let answer = try? await r.response.body.collect(upTo: 4096)
                // A refusal is a configuration problem (a certificate or topology that does not
                // fit): say so, once in a while, instead of never joining in silence.
                if r.response.status >= 300, self.refusalLog.allow("send \(target.name)", now: self.now()) {
                    logger.warning("gossip to \(target.name) (\(target.endpoint)) refused: \(r.response.status) \(answer.map { String(buffer: $0) } ?? "")")
                }
            } catch {
                logger.trace("gossip send failed", metadata: ["to": "\(target.endpoint)", "error": "\(error)"])
            }
        }
    }

    // MARK: MeshHooks

    public func handleMeshRequest(_ request: HTTPServerRequest) async -> HTTPResponse {
        switch (request.head.method, request.head.path) {
        case ("POST", Self.gossipPath):
            let envelope: Envelope
            do {
                let body = try await request.body.collect(upTo: 8 << 20)
                envelope = try JSONDecoder().decode(Envelope.self, from: Data(body.readableBytesView))
            } catch {
                return refuse(400, "bad gossip message: \(error)")
            }
            // The certificate says who is talking: a node may only speak for itself.
            guard envelope.from.name == request.peer.commonName else {
                return refuse(403, "gossip from \(String(reflecting: String(envelope.from.name.prefix(64)))) over a connection authenticated as \(String(reflecting: request.peer.commonName ?? "-"))")
            }
            let at = now()
            let result = core.withLock { c -> Result<([MeshAction], Int), GossipRejection> in
                let refusedBefore = c.membership.refusedUpdates + c.refusedLocality
                do throws(GossipRejection) {
                    let actions = try c.receive(envelope, now: at)
                    return .success((actions, c.membership.refusedUpdates + c.refusedLocality - refusedBefore))
                } catch { return .failure(error) }
            }
            switch result {
            case .failure(.senderNotAdmitted(let name)):
                return refuse(403, "gossip refused: \(GossipRejection.senderNotAdmitted(name)) (not in topology \(topology.name))")
            case .failure(let why):
                return refuse(400, "gossip from \(envelope.from.name) refused: \(why)")
            case .success(let (actions, dropped)):
                if dropped > 0 {
                    refusedGossip.increment(by: dropped)
                    if refusalLog.allow("drop \(envelope.from.name)", now: at) {
                        logger.warning("gossip from \(envelope.from.name): dropped \(dropped) update(s) about nodes that are not in topology \(topology.name), or with metadata the topology does not give them")
                    }
                }
                learnSizes(envelope.message)
                perform(actions)
                return HTTPResponse(status: 204)
            }
        case ("GET", "/mesh/status"):
            return .text(200, statusJSON())
        default:
            return .text(404, "unknown mesh route \(request.head.path.prefix(100))")
        }
    }

    /// Refuses a gossip request: counted, logged (at most once a second per kind), answered.
    private func refuse(_ status: Int, _ why: String) -> HTTPResponse {
        refusedGossip.increment()
        if refusalLog.allow("refuse \(status)", now: now()) { logger.warning("\(why)") }
        return .text(status, why)
    }

    private func learnSizes(_ message: Message) {
        var updates: [LocalityUpdate] = message.gossip?.locality ?? []
        if case .pushPull(let s, _) = message { updates += s.locality }
        guard !updates.isEmpty else { return }
        sizes.withLock { m in
            if m.count > 1_000_000 { m.removeAll(keepingCapacity: true) }
            for u in updates where u.present { m[u.digest.hex] = u.digest.sizeBytes }
        }
    }

    public func statusJSON() -> String {
        let (members, entries, bytes) = core.withLock { c in
            (c.membership.allMembers.map { "{\"name\": \"\($0.node.name)\", \"status\": \"\($0.status.rawValue)\", \"incarnation\": \($0.incarnation)}" },
             c.locality.entryCount, c.locality.approximateBytes)
        }
        return "{\"node\": \"\(me.name)\", \"members\": [\(members.joined(separator: ", "))], \"locality_entries\": \(entries), \"locality_bytes\": \(bytes)}"
    }

    /// Where to fetch `hash` from, best first: live holders by the locality map ranked by RTT,
    /// then its rendezvous owners (a write a moment ago may not be gossiped yet; guesses, ranked by
    /// RTT among themselves), then the origin (`origin-only`: the origin alone). `known` counts the
    /// sources the map says hold it.
    func sources(for hash: String) -> (sources: [FetchSource], known: Int) {
        let size = sizes.withLock { $0[hash] }
        let strategy = settings.fetch.strategy
        let (holders, guesses, origin) = core.withLock { c -> ([(NodeID, FetchSource)], [(NodeID, FetchSource)], FetchSource?) in
            let origin = liveOrigin(in: c)
            guard strategy != .originOnly else { return ([], [], origin?.source) }
            var seen: Set<NodeID> = [me]
            if let o = origin { seen.insert(o.id) }
            func pick(_ ids: [NodeID]) -> [(NodeID, FetchSource)] {
                ids.compactMap { id in
                    guard !seen.contains(id), let t = target(id, in: c) else { return nil }
                    seen.insert(id)
                    return (id, t)
                }
            }
            var hs: [(NodeID, FetchSource)] = []
            if let size, let d = MeshCore.Digest(hex: hash, sizeBytes: size) { hs = pick(c.holders(of: d, now: now())) }
            var gs: [(NodeID, FetchSource)] = []
            if let key = Self.placementKey(hash) { gs = pick(Rendezvous.top(settings.replication, for: key, over: c.membership.liveMembers)) }
            return (hs, gs, origin?.source)
        }
        // Best measured RTT first within each group (stable).
        func ranked(_ list: [(NodeID, FetchSource)]) -> [FetchSource] {
            latency.tracker.withLock { t in
                list.enumerated().sorted { a, b in
                    let ra = t.rtt(of: a.element.0) ?? .seconds(1), rb = t.rtt(of: b.element.0) ?? .seconds(1)
                    return ra != rb ? ra < rb : a.offset < b.offset
                }.map(\.element.1)
            }
        }
        var out = Array(ranked(holders).prefix(settings.hedge.maximumLegs))
        out += ranked(guesses)
        let known = out.count - guesses.count
        if let origin = origin ?? topologyOrigin() { out.append(origin) }
        return (out, known)
    }

    public func fetchMissing(hash: String) async -> String? {
        let (srcs, known) = sources(for: hash)
        guard !srcs.isEmpty else { return nil }
        // Hedged, but no member is known to hold it: the owners are only guesses (a write not yet
        // gossiped), so ask them and the origin at once instead of paying a 404 round trip first.
        let spacing: LegSpacing? = settings.fetch.strategy == .hedged && known == 0 ? .allAtOnce : nil
        do {
            let r = try await fetcher.fetch(hash: hash, sources: srcs, spacing: spacing)
            // The hedge delay is a percentile of time to first byte: a hedge is against a source
            // that does not answer, not against a large body.
            latency.tracker.withLock { $0.recordFetchLatency(r.timeToFirstByte) }
            announce(r.digest)
            return "\(r.source) via \(r.transport.rawValue)"
        } catch {
            logger.debug("mesh fetch failed", metadata: ["hash": "\(hash)", "error": "\(error)"])
            return nil
        }
    }

    public func received(_ d: StoreDigest) { announce(d) }

    /// Placement (rendezvous) depends on the hash only, so a node that knows just the hash (an
    /// HTTP GET) computes the same owners as the writer did.
    static func placementKey(_ hash: String) -> MeshCore.Digest? { MeshCore.Digest(hex: hash, sizeBytes: 0) }

    private func announce(_ d: StoreDigest) {
        guard let md = MeshCore.Digest(hex: d.hash, sizeBytes: d.size) else { return }
        core.withLock { $0.gained(md, now: now()) }
    }

    /// R−1 mirrors by rendezvous hashing over the other live members; acknowledged after W copies
    /// (this one included) are durable. With origin write-through the origin also gets a copy,
    /// which is required before the write is acknowledged (and counts toward W).
    public func stored(_ d: StoreDigest) async throws {
        announce(d)
        var targets = mirrorTargets(for: d, all: true)
        let quorum = max(0, settings.writeQuorum - 1)
        let copies = settings.replication - 1
        guard settings.fetch.originWriteThrough, node.role != .origin else {
            try await mirror.replicate(d, candidates: targets, copies: copies, quorum: quorum, isAlive: isAlive)
            return
        }
        guard let origin = originSource() else {
            throw BlobStoreError.io("origin write-through is on, but no origin is known")
        }
        targets.removeAll { $0.name == origin.name }
        async let toOrigin: Void = mirror.replicate(d, to: [origin], quorum: 1)
        try await mirror.replicate(d, candidates: targets, copies: copies - 1, quorum: max(0, quorum - 1), isAlive: isAlive)
        try await toOrigin
    }

    /// Whether membership counts the member behind `source` alive (not suspect, dead or gone).
    private var isAlive: @Sendable (FetchSource) -> Bool {
        { [weak self] source in
            guard let self else { return false }
            return self.core.withLock { c in
                c.membership.allMembers.contains { $0.node.name == source.name && $0.status == .alive }
            }
        }
    }

    /// The origin as a fetch/mirror target: from membership, or from the topology before gossip.
    func originSource() -> FetchSource? {
        core.withLock { liveOrigin(in: $0)?.source } ?? topologyOrigin()
    }

    /// The origin as a live member other than this node.
    private func liveOrigin(in c: MeshNode) -> (id: NodeID, source: FetchSource)? {
        guard let m = c.membership.allMembers.first(where: { $0.metadata.role == .origin && $0.status.isLive && $0.node != me }),
              let t = target(m.node, in: c, isOrigin: true) else { return nil }
        return (m.node, t)
    }

    /// The origin the topology names (before gossip made it a member), unless this node is it.
    private func topologyOrigin() -> FetchSource? {
        guard node.role != .origin, let o = topology.origin, o.name != node.name else { return nil }
        return FetchSource(name: o.name, endpoint: o.advertiseTCP, quicEndpoint: o.advertiseQUIC, isOrigin: true)
    }

    /// The R−1 mirror targets (`MeshNode.mirrorCandidates`: rendezvous over the other live
    /// members, suspects last); with `all`, every candidate in that order (the ones after the first
    /// R−1 replace failed or slow copies).
    func mirrorTargets(for d: StoreDigest, all: Bool = false) -> [FetchSource] {
        guard settings.replication > 1, let md = Self.placementKey(d.hash) else { return [] }
        return core.withLock { c in
            let ranked = c.mirrorCandidates(for: md)
            return (all ? ranked : Array(ranked.prefix(settings.replication - 1))).compactMap { target($0, in: c) }
        }
    }

    /// The store evicted a blob: tell the mesh this node no longer holds it.
    func evicted(_ d: StoreDigest) {
        guard let md = MeshCore.Digest(hex: d.hash, sizeBytes: d.size) else { return }
        core.withLock { $0.lost(md, now: now()) }
    }

    /// A member died or left: every local blob that now has fewer than R live copies (by the
    /// locality map) is copied to the best-ranked members that lack it, by the one live holder
    /// `Repair.targets` makes responsible (see there). Logged with the count.
    func reReplicate(after gone: NodeID) async {
        guard settings.replication > 1 else { return }
        var copied = 0, failed = 0
        for d in store.allDigests() where d.size > 0 {
            guard let key = Self.placementKey(d.hash), let md = MeshCore.Digest(hex: d.hash, sizeBytes: d.size) else { continue }
            let sources = core.withLock { c -> [FetchSource] in
                let holders = c.holders(of: md, now: now()).filter { $0 != gone }
                let targets = Repair.targets(for: key, me: me, holders: holders, live: c.membership.liveMembers.filter { $0 != gone },
                                             replicas: settings.replication)
                return targets.compactMap { target($0, in: c) }
            }
            guard !sources.isEmpty else { continue }
            do {
                try await mirror.replicate(d, to: sources, quorum: sources.count)
                copied += 1
            } catch {
                failed += 1
                logger.warning("re-replication of \(d.hash) after \(gone.name) left failed: \(error)")
            }
        }
        if copied + failed > 0 {
            logger.notice("re-replicated \(copied) blob(s) after \(gone.name) left the mesh\(failed > 0 ? " (\(failed) failed)" : "")")
        }
    }

    /// Drain hand-off: every local blob no other live member is known to hold goes to its
    /// rendezvous owner among the remaining members (waits for the copies, bounded).
    public func handOff(timeout: Duration) async {
        var handed = 0
        for d in store.allDigests() where d.size > 0 {
            guard let md = MeshCore.Digest(hex: d.hash, sizeBytes: d.size) else { continue }
            let others = core.withLock { $0.holders(of: md, now: now()) }
            if !others.isEmpty { continue }
            let targets = mirrorTargets(for: d)
            guard let first = targets.first else { continue }
            try? await mirror.replicate(d, to: [first], quorum: 0)
            handed += 1
        }
        await mirror.flush(timeout: timeout)
        logger.notice("drain: handed off \(handed) sole cop\(handed == 1 ? "y" : "ies")")
    }
}

/// RTTs per member and recent fetch latencies (the hedge delay is a percentile of them).
final class LatencyBox: Sendable {
    let tracker = Mutex(LatencyTracker())
}

/// At most one log line per key per `interval` (a flood of bad messages must not flood the log).
final class LogThrottle: Sendable {
    private let interval: Duration
    private let last = Mutex<[String: Duration]>([:])

    init(interval: Duration) { self.interval = interval }

    func allow(_ key: String, now: Duration) -> Bool {
        last.withLock { last in
            if let t = last[key], now - t < interval { return false }
            if last.count > 1024 { last.removeAll() }
            last[key] = now
            return true
        }
    }
}
