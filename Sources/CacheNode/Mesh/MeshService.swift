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
        public var hedge: HedgePolicy = HedgePolicy()
        public var tick: Duration = .milliseconds(50)
        public var membership: Membership.Configuration = .lan
        public init(replication: Int, writeQuorum: Int) {
            self.replication = replication
            self.writeQuorum = writeQuorum
        }
    }

    static let gossipPath = "/mesh/gossip"

    public let me: NodeID
    let node: Topology.Node
    let topology: Topology
    let settings: Settings
    let store: BlobStore
    let logger: Logger
    let pool: HTTP2ConnectionPool
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

    public init(topology: Topology, nodeName: String, store: BlobStore, credentials: TLSCredentials, settings: Settings? = nil, logger: Logger) throws {
        guard let n = topology.node(named: nodeName) else { throw ConfigurationError("no node \(nodeName) in topology \(topology.name)") }
        self.node = n
        self.topology = topology
        self.settings = settings ?? Settings(replication: topology.replication, writeQuorum: topology.writeQuorum)
        self.store = store
        self.logger = logger
        self.me = NodeID(name: n.name, uid: UInt64.random(in: 1...UInt64.max))
        self.pool = HTTP2ConnectionPool(credentials: credentials, logger: logger)
        let requester = PoolRequester(pool: pool)
        let latency = self.latency
        let policy = self.settings.hedge
        self.fetcher = BlobFetcher(store: store, requester: requester, logger: logger, hedgeDelay: {
            policy.mode == .immediate ? nil : latency.tracker.withLock { policy.hedgeDelay($0) }
        })
        self.mirror = Mirror(store: store, requester: requester, logger: logger)
        let meta = NodeMetadata(name: n.name, role: n.role == .origin ? .origin : .peer, tcpEndpoint: "\(n.tcp)",
                                quicEndpoint: n.quic.map { "\($0)" } ?? "", certificateCN: n.name)
        self.core = Mutex(MeshNode(myself: me, metadata: meta, membershipConfiguration: self.settings.membership,
                                   seed: UInt64.random(in: 0...UInt64.max)))
    }

    func now() -> Duration { ContinuousClock.now - started }

    // MARK: run loop

    /// Join through the seeds, then tick until `stop()`.
    public func run() async {
        let seeds = node.seeds.compactMap { topology.node(named: $0).map { "\($0.tcp)" } }
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
        await pool.closeAll()
    }

    private func endpoint(of id: NodeID) -> HostPort? {
        core.withLock { $0.membership.member(id) }.flatMap { HostPort($0.metadata.tcpEndpoint) }
    }

    private func perform(_ actions: [MeshAction]) {
        for a in actions {
            switch a {
            case .send(let m, let to):
                if let ep = endpoint(of: to) { send(m, to: ep) }
            case .sendToAddress(let m, let address):
                if let ep = HostPort(address) { send(m, to: ep) }
            case .memberChanged(let e):
                logger.info("member \(e.node.name): \(e.previous?.rawValue ?? "new") → \(e.status.rawValue)")
                if !e.status.isLive, e.node != me {
                    latency.tracker.withLock { $0.forget(e.node) }
                    Task { await self.reReplicate(after: e.node) }
                }
            case .rttMeasured(let id, let rtt):
                latency.tracker.withLock { $0.recordRTT(rtt, for: id) }
            }
        }
    }

    private func send(_ message: Message, to ep: HostPort) {
        let envelope = Envelope(from: me, message: message)
        guard let body = try? JSONEncoder().encode(envelope) else { return }
        let pool = self.pool
        let logger = self.logger
        Task {
            do {
                let r = try await pool.request(host: ep.host, port: ep.port,
                                               HTTPRequestHead(method: "POST", path: Self.gossipPath, headers: ["content-type": "application/json"]),
                                               body: .bytes(ByteBuffer(bytes: body)))
                _ = try? await r.body.collect(upTo: 4096)
            } catch {
                logger.trace("gossip send failed", metadata: ["to": "\(ep)", "error": "\(error)"])
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
                return .text(400, "bad gossip message: \(error)")
            }
            // The certificate says who is talking: a node may only speak for itself.
            guard envelope.from.name == request.peer.commonName else {
                return .text(403, "gossip from \(envelope.from.name) over a connection authenticated as \(request.peer.commonName ?? "-")")
            }
            learnSizes(envelope.message)
            perform(core.withLock { $0.receive(envelope.message, from: envelope.from, now: now()) })
            return HTTPResponse(status: 204)
        case ("GET", "/mesh/status"):
            return .text(200, statusJSON())
        default:
            return .text(404, "unknown mesh route \(request.head.path.prefix(100))")
        }
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

    /// Live holders (by the locality map) of `hash`, best RTT first, as fetch sources.
    func sources(for hash: String) -> [FetchSource] {
        let size = sizes.withLock { $0[hash] }
        var out: [FetchSource] = []
        let (holders, originNode) = core.withLock { c -> ([(NodeID, String)], (NodeID, String)?) in
            var hs: [(NodeID, String)] = []
            if let size, let d = MeshCore.Digest(hex: hash, sizeBytes: size) {
                for h in c.holders(of: d, now: now()) {
                    if let m = c.membership.member(h) { hs.append((h, m.metadata.tcpEndpoint)) }
                }
            }
            let origin = c.membership.allMembers.first { $0.metadata.role == .origin && $0.status.isLive && $0.node != me }
            // Not (yet) in the map — e.g. written a moment ago elsewhere: its rendezvous owners
            // hold the mirror copies, so ask them too (after the known holders).
            if let key = Self.placementKey(hash) {
                let known = Set(hs.map(\.0))
                for id in Rendezvous.top(settings.replication, for: key, over: c.membership.liveMembers)
                where id != me && !known.contains(id) && id != origin?.node {
                    if let m = c.membership.member(id) { hs.append((id, m.metadata.tcpEndpoint)) }
                }
            }
            return (hs, origin.map { ($0.node, $0.metadata.tcpEndpoint) })
        }
        // Best measured RTT first (stable: equal RTTs keep map holders before rendezvous owners).
        let ranked = latency.tracker.withLock { t in
            holders.enumerated().sorted { a, b in
                let ra = t.rtt(of: a.element.0) ?? .seconds(1), rb = t.rtt(of: b.element.0) ?? .seconds(1)
                return ra != rb ? ra < rb : a.offset < b.offset
            }.map(\.element)
        }
        for (id, ep) in ranked.prefix(settings.hedge.maximumLegs + settings.replication) where id != originNode?.0 {
            if let hp = HostPort(ep) { out.append(FetchSource(name: id.name, endpoint: hp, isOrigin: false)) }
        }
        if let (id, ep) = originNode, let hp = HostPort(ep) {
            out.append(FetchSource(name: id.name, endpoint: hp, isOrigin: true))
        } else if node.role != .origin, let o = topology.origin, o.name != node.name {
            // Not gossiped yet: the topology still names the origin.
            out.append(FetchSource(name: o.name, endpoint: o.tcp, isOrigin: true))
        }
        return out
    }

    public func fetchMissing(hash: String) async -> String? {
        let srcs = sources(for: hash)
        guard !srcs.isEmpty else { return nil }
        let start = ContinuousClock.now
        do {
            let r = try await fetcher.fetch(hash: hash, sources: srcs)
            latency.tracker.withLock { $0.recordFetchLatency(ContinuousClock.now - start) }
            announce(r.digest)
            return r.source.description
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
    /// (this one included) are durable.
    public func stored(_ d: StoreDigest) async throws {
        announce(d)
        let targets = mirrorTargets(for: d)
        try await mirror.replicate(d, to: targets, quorum: max(0, settings.writeQuorum - 1))
    }

    func mirrorTargets(for d: StoreDigest, excluding: Set<NodeID> = []) -> [FetchSource] {
        guard settings.replication > 1, let md = Self.placementKey(d.hash) else { return [] }
        return core.withLock { c in
            let live = c.membership.liveMembers.filter { $0 != me && !excluding.contains($0) }
            return Rendezvous.top(settings.replication - 1, for: md, over: live).compactMap { id in
                c.membership.member(id).flatMap { HostPort($0.metadata.tcpEndpoint) }.map { FetchSource(name: id.name, endpoint: $0, isOrigin: false) }
            }
        }
    }

    /// A member died or left: for every local blob whose rendezvous replica set included it, this
    /// node (if it is the first live owner) copies the blob to the owner that replaces it.
    func reReplicate(after gone: NodeID) async {
        guard settings.replication > 1 else { return }
        var copied = 0
        for d in store.allDigests() {
            guard let md = Self.placementKey(d.hash) else { continue }
            let (before, after) = core.withLock { c -> ([NodeID], [NodeID]) in
                let live = c.membership.liveMembers
                return (Rendezvous.top(settings.replication, for: md, over: live + [gone, me]),
                        Rendezvous.top(settings.replication, for: md, over: live + [me]))
            }
            guard before.contains(gone), after.first(where: { $0 != gone }) == me || after.first == me else { continue }
            let targets = after.filter { $0 != me && !before.contains($0) }
            let sources = core.withLock { c in
                targets.compactMap { id in c.membership.member(id).flatMap { HostPort($0.metadata.tcpEndpoint) }.map { FetchSource(name: id.name, endpoint: $0, isOrigin: false) } }
            }
            if !sources.isEmpty {
                try? await mirror.replicate(d, to: sources, quorum: 0)
                copied += 1
            }
        }
        if copied > 0 { logger.info("re-replicating \(copied) blob(s) after \(gone.name) left the mesh") }
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
