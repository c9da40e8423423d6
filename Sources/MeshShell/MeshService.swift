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
        /// Anti-entropy pacing (`[repair]` in a topology).
        public var repair = RepairSettings()
        /// The anti-entropy settings `repair` asks for.
        var antiEntropy: AntiEntropy.Settings {
            var a = AntiEntropy.Settings()
            a.interval = .seconds(repair.intervalSeconds)
            a.blobsPerSecond = repair.blobsPerSecond
            a.enabled = repair.enabled
            return a
        }
        public init(replication: Int, writeQuorum: Int, fetch: FetchSettings = FetchSettings()) {
            self.replication = replication
            self.writeQuorum = writeQuorum
            self.fetch = fetch
            transport.preferred = fetch.transport
            transport.adaptive = fetch.adaptiveTransport
        }
    }

    static let gossipPath = "/mesh/gossip"
    static let hasPath = "/mesh/has"

    public let me: NodeID
    /// This node as the roster describes it.
    let node: NodeMetadata
    let roster: MeshRoster
    let settings: Settings
    let store: BlobStore
    let logger: Logger
    let transport: MeshTransport
    let fetcher: BlobFetcher
    let mirror: Mirror
    let antiEntropy: AntiEntropy
    let core: Mutex<MeshNode>
    private let latency = LatencyBox()
    private let started = ContinuousClock.now
    private let running = Mutex(true)
    private let leaving = Mutex(false)
    private let mapEntries = Gauge(label: "cachemesh_locality_entries")
    private let mapBytes = Gauge(label: "cachemesh_locality_bytes")
    private let liveMembers = Gauge(label: "cachemesh_members_live")
    /// Gossip messages refused (malformed, out of range, sender not admitted) and single updates dropped.
    private let refusedGossip = Counter(label: "cachemesh_gossip_refused_total")
    /// Gossip message bytes (JSON bodies of `POST /mesh/gossip`) this node sent and received.
    private let gossipBytes = (sent: Counter(label: "cachemesh_gossip_bytes_total", dimensions: [("direction", "sent")]),
                               received: Counter(label: "cachemesh_gossip_bytes_total", dimensions: [("direction", "received")]))
    private let refusalLog = LogThrottle(interval: .seconds(1))
    /// Fetches that no source served (not all said 404) and were raced once more.
    private let fetchRetries = Counter(label: "cachemesh_fetch_retries_total")

    public init(roster: MeshRoster, store: BlobStore, credentials: TLSCredentials, settings: Settings, logger: Logger) {
        self.node = roster.me
        self.roster = roster
        self.settings = settings
        self.store = store
        self.logger = logger
        self.me = NodeID(name: roster.me.name, uid: UInt64.random(in: 1...UInt64.max))
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
        self.antiEntropy = AntiEntropy(settings: self.settings.antiEntropy)
        // Only the roster's nodes may be members, each with the metadata the roster gives it.
        var membership = self.settings.membership
        membership.admission = Admission(expected: Dictionary(roster.nodes.map { ($0.name, $0) },
                                                              uniquingKeysWith: { first, _ in first }))
        self.core = Mutex(MeshNode(myself: me, metadata: roster.me, membershipConfiguration: membership,
                                   seed: UInt64.random(in: 0...UInt64.max)))
        store.onEviction { [weak self] d in self?.evicted(d) }
        // What the store holds (a restart on an old data dir too, as its startup scan indexes it)
        // is announced by the holdings pages of push-pull and of the welcome each new member gets,
        // read page by page from the store's index: the mesh keeps no copy of it.
        core.withLock { $0.readHoldings(from: StoreHoldings(store: store)) }
    }

    func now() -> Duration { ContinuousClock.now - started }

    // MARK: run loop

    /// Join through the seeds, then tick until `stop()`.
    public func run() async {
        let seeds = roster.seeds
        perform(core.withLock { $0.join(seeds: seeds, now: now()) })
        async let repairs: Void = antiEntropy.run(mesh: self, isRunning: { [weak self] in self?.isRunning ?? false })
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
        await repairs
    }

    /// Announce LEAVING and give the gossip a moment to spread. From here on a miss is not
    /// fetched: the node is going, clients should ask another (`fetchMissing` → unavailable).
    public func leave() async {
        leaving.withLock { $0 = true }
        perform(core.withLock { $0.leave(now: now()) })
        try? await Task.sleep(for: .milliseconds(300))
    }

    var isRunning: Bool { running.withLock { $0 } }

    public func stop() async {
        running.withLock { $0 = false }
        await transport.closeAll()
    }

    /// How to reach a member: its advertised TCP (and QUIC) endpoints from membership metadata.
    func target(_ id: NodeID, in c: MeshNode, isOrigin: Bool = false) -> FetchSource? {
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
                // Any change moves some blobs' owners: anti-entropy restores the placement.
                if e.node != me { antiEntropy.membershipChanged("\(e.node.name) \(e.status.rawValue)", now: now()) }
                if !e.status.isLive, e.node != me {
                    latency.tracker.withLock { $0.forget(e.node) }
                    transport.forgetMeasurements(of: e.node.name)
                    // A dead member's connections fail what is in flight to it now (a left one
                    // is draining: its in-flight requests still complete).
                    if e.status == .dead, let t = core.withLock({ target(e.node, in: $0) }) {
                        Task { await self.transport.dropConnections(to: t) }
                    }
                }
            case .rttMeasured(let id, let rtt):
                latency.tracker.withLock { $0.recordRTT(rtt, for: id) }
            }
        }
    }

    private func send(_ message: Message, to target: FetchSource) {
        let envelope = Envelope(from: me, message: message)
        guard let body = try? JSONEncoder().encode(envelope) else { return }
        gossipBytes.sent.increment(by: Int64(body.count))
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
                gossipBytes.received.increment(by: Int64(body.readableBytes))
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
                return refuse(403, "gossip refused: \(GossipRejection.senderNotAdmitted(name)) (not in topology \(roster.name))")
            case .failure(let why):
                return refuse(400, "gossip from \(envelope.from.name) refused: \(why)")
            case .success(let (actions, dropped)):
                if dropped > 0 {
                    refusedGossip.increment(by: dropped)
                    if refusalLog.allow("drop \(envelope.from.name)", now: at) {
                        logger.warning("gossip from \(envelope.from.name): dropped \(dropped) update(s) about nodes that are not in topology \(roster.name), or with metadata the topology does not give them")
                    }
                }
                perform(actions)
                return HTTPResponse(status: 204)
            }
        case ("POST", Self.hasPath):
            return await answerHas(request)
        case ("GET", "/mesh/status"):
            do {
                var data = try MeshStatus.encoder().encode(status(members: true).mesh)
                data.append(UInt8(ascii: "\n"))
                return HTTPResponse(status: 200, headers: ["content-type": "application/json"], body: .bytes(ByteBuffer(bytes: data)))
            } catch {
                return .text(500, "cannot encode the status: \(error)")
            }
        default:
            return .text(404, "unknown mesh route \(request.head.path.prefix(100))")
        }
    }

    /// `POST /mesh/has`: which of the listed blobs this node holds (anti-entropy's batched
    /// existence check; recency and hit counts untouched).
    private func answerHas(_ request: HTTPServerRequest) async -> HTTPResponse {
        let asked: HasRequest
        do {
            let body = try await request.body.collect(upTo: HasRequest.maxRequestBytes)
            asked = try JSONDecoder().decode(HasRequest.self, from: Data(body.readableBytesView))
        } catch {
            return .text(400, "bad existence check: \(error)")
        }
        guard asked.hashes.count <= HasRequest.maxHashes else {
            return .text(400, "existence check lists \(asked.hashes.count) blobs (at most \(HasRequest.maxHashes))")
        }
        let held = asked.hashes.filter { store.peekSize(of: $0) != nil }
        guard let body = try? JSONEncoder().encode(HasAnswer(held: held)) else { return .text(500, "encoding failed") }
        return HTTPResponse(status: 200, headers: ["content-type": "application/json"], body: .bytes(ByteBuffer(bytes: body)))
    }

    /// Refuses a gossip request: counted, logged (at most once a second per kind), answered.
    private func refuse(_ status: Int, _ why: String) -> HTTPResponse {
        refusedGossip.increment()
        if refusalLog.allow("refuse \(status)", now: now()) { logger.warning("\(why)") }
        return .text(status, why)
    }

    public func status(members withMembers: Bool) -> (role: String, mesh: MeshStatus) {
        let (members, entries, bytes) = core.withLock { c in (c.membership.allMembers, c.locality.entryCount, c.locality.approximateBytes) }
        let list = members.sorted { $0.metadata.name < $1.metadata.name }.map { m in
            MeshStatus.Member(name: m.metadata.name, role: m.metadata.role.rawValue, status: m.status.rawValue, incarnation: m.incarnation,
                              tcp: m.metadata.tcpEndpoint, quic: m.metadata.quicEndpoint.isEmpty ? nil : m.metadata.quicEndpoint,
                              transport: m.node == me ? "self" : transport.transport(toQUIC: HostPort(m.metadata.quicEndpoint)).rawValue)
        }
        let f = fetcher.counts
        let mesh = MeshStatus(
            topology: roster.name, replication: settings.replication, writeQuorum: settings.writeQuorum,
            fetchStrategy: settings.fetch.strategy.rawValue, transport: settings.transport.adaptive ? "adaptive" : settings.transport.preferred.rawValue,
            liveMembers: members.filter { $0.status.isLive }.count, members: withMembers ? list : nil,
            localityEntries: entries, localityBytes: bytes,
            fetch: .init(peerWins: f.peerWins, originWins: f.originWins, failures: f.failures,
                         peerRatio: MeshStatus.ratio(f.peerWins, of: f.peerWins + f.originWins)))
        return (node.role == .origin ? "origin" : "peer", mesh)
    }

    /// Where to fetch `hash` from, best first: live holders by the locality map ranked by RTT,
    /// then its rendezvous owners (a write a moment ago may not be gossiped yet; guesses, ranked by
    /// RTT among themselves), then the origin (`origin-only`: the origin alone). `known` counts the
    /// sources the map says hold it.
    func sources(for hash: String) -> (sources: [FetchSource], known: Int) {
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
            if let d = Digest(hex: hash, size: 0) { hs = pick(c.holders(of: d, now: now())) }   // matched by hash
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

    public func fetchMissing(hash: String) async -> MeshFetchOutcome {
        await fetchMissing(hash: hash, tap: nil)
    }

    public func fetchMissing(hash: String, tap: CutThroughTap?) async -> MeshFetchOutcome {
        defer { tap?.end() }
        if leaving.withLock({ $0 }) { return .unavailable("this node is draining; ask another node") }
        // Before this node has met any other member (just started, or cut off) a miss says
        // nothing about the mesh: the client should ask again or ask another node.
        let alone = core.withLock { c in !c.membership.liveMembers.contains { $0 != me } }
        if alone && roster.nodes.count > 1 {
            return .unavailable("this node has not met another member of mesh \(roster.name) yet")
        }
        let (srcs, known) = sources(for: hash)
        guard !srcs.isEmpty else { return .notFound }
        // Hedged, but no member is known to hold it: the owners are only guesses (a write not yet
        // gossiped), so ask them and the origin at once instead of paying a 404 round trip first.
        let spacing: LegSpacing? = settings.fetch.strategy == .hedged && known == 0 ? .allAtOnce : nil
        for attempt in 1...2 {
            do {
                // The first attempt's end resolved the tap (`ended`: the caller serves the stored
                // blob), so a second attempt must not stream into it.
                let r = try await fetcher.fetch(hash: hash, sources: srcs, spacing: spacing, tap: attempt == 1 ? tap : nil)
                // The hedge delay is a percentile of time to first byte: a hedge is against a source
                // that does not answer, not against a large body.
                latency.tracker.withLock { $0.recordFetchLatency(r.timeToFirstByte) }
                announce(r.digest)
                return .fetched("\(r.source) via \(r.transport.rawValue)")
            } catch let e as FetchUnavailable {
                // No source served it and not all said 404: a connection that failed (refused,
                // reset, a handshake cut by a relay) is usually gone a moment later. Once more, on
                // fresh connections, unless the caller already has a response head (cut-through).
                if attempt == 1, !(tap?.hasBegun ?? false), !leaving.withLock({ $0 }) {
                    fetchRetries.increment()
                    logger.info("mesh fetch: no source served it; trying once more", metadata: ["hash": "\(hash)", "error": "\(e)"])
                    continue
                }
                logger.notice("mesh fetch failed: the client gets 503 (ask again)", metadata: ["hash": "\(hash)", "error": "\(e)"])
                return .unavailable("not every source answered: \(e.tried.joined(separator: "; ").prefix(300))")
            } catch {
                logger.debug("mesh fetch failed", metadata: ["hash": "\(hash)", "error": "\(error)"])
                if case BlobStoreError.notFound = error { return .notFound }
                return .unavailable("\(error)".prefix(300).description)
            }
        }
        return .unavailable("no source served it")
    }

    public func received(_ d: Digest) { announce(d) }

    /// Placement (rendezvous) depends on the hash only, so a node that knows just the hash (an
    /// HTTP GET) computes the same owners as the writer did.
    static func placementKey(_ hash: String) -> Digest? { Digest(hex: hash, size: 0) }
    static func placementKey(_ d: Digest) -> Digest { Digest(w0: d.w0, w1: d.w1, w2: d.w2, w3: d.w3, size: 0) }

    private func announce(_ d: Digest) {
        core.withLock { $0.gained(d, now: now()) }
    }

    /// Mirrors by rendezvous hashing over the other live members — R − 1 when this node is one of
    /// the blob's owners, R when it is not, so the owners hold it without waiting for
    /// anti-entropy; acknowledged after W copies (this one included) are durable. With origin write-through the origin also gets a copy,
    /// which is required before the write is acknowledged (and counts toward W).
    public func stored(_ d: Digest) async throws {
        announce(d)
        var targets = mirrorTargets(for: d, all: true)
        let quorum = max(0, settings.writeQuorum - 1)
        // R − 1 others when this node is one of the blob's R owners; R when it is not (its own copy
        // is then a bonus, and every owner is owed one — the copies beyond W finish in the
        // background, so the acknowledgement does not wait for them).
        let copies = settings.replication - (isOwner(of: d) ? 1 : 0)
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

    /// Whether this node is one of `d`'s R owners among the live members (`Placement`).
    func isOwner(of d: Digest) -> Bool {
        guard let key = Self.placementKey(d.hash) else { return true }
        return core.withLock { c in
            Placement.owners(of: key, live: c.membership.liveMembers + [me], replicas: settings.replication).contains(me)
        }
    }

    /// Whether membership counts the member behind `source` alive (not suspect, dead or gone).
    var isAlive: @Sendable (FetchSource) -> Bool {
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
        guard node.role != .origin, let o = roster.origin, o.name != node.name, let tcp = HostPort(o.tcpEndpoint) else { return nil }
        return FetchSource(name: o.name, endpoint: tcp, quicEndpoint: HostPort(o.quicEndpoint), isOrigin: true)
    }

    /// The R−1 mirror targets (`MeshNode.mirrorCandidates`: rendezvous over the other live
    /// members, suspects last); with `all`, every candidate in that order (the ones after the first
    /// R−1 replace failed or slow copies).
    func mirrorTargets(for d: Digest, all: Bool = false) -> [FetchSource] {
        guard settings.replication > 1, let md = Self.placementKey(d.hash) else { return [] }
        return core.withLock { c in
            let ranked = c.mirrorCandidates(for: md)
            return (all ? ranked : Array(ranked.prefix(settings.replication - 1))).compactMap { target($0, in: c) }
        }
    }

    /// The store evicted a blob: tell the mesh this node no longer holds it.
    func evicted(_ d: Digest) {
        core.withLock { $0.lost(d, now: now()) }
    }

    /// Drain hand-off (`AntiEntropy.handOff`): every local blob that none of its owners among the
    /// remaining members holds — asked, not taken from the locality map — goes to the best of
    /// them (waits for the copies, bounded); their anti-entropy completes R after the leave.
    public func handOff(timeout: Duration) async {
        let r = await antiEntropy.handOff(mesh: self, deadline: ContinuousClock.now + timeout)
        await mirror.flush(timeout: timeout)
        let extra = [r.failed > 0 ? "\(r.failed) failed" : nil, r.unchecked > 0 ? "\(r.unchecked) not checked before the deadline" : nil]
            .compactMap { $0 }
        logger.notice("drain: handed off \(r.handed) sole cop\(r.handed == 1 ? "y" : "ies")\(extra.isEmpty ? "" : " (\(extra.joined(separator: ", ")))")")
    }
}

/// RTTs per member and recent fetch latencies (the hedge delay is a percentile of them).
final class LatencyBox: Sendable {
    let tracker = Mutex(LatencyTracker())
}
