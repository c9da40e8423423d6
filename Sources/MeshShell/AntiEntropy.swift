import Foundation
import Logging
import MeshCore
import MeshHTTP
import Metrics
import NIOCore
import Synchronization

/// Anti-entropy: the background walk that keeps the placement invariant — every blob on its R
/// owners among the live members (`Placement`).
///
/// A pass runs `settle` after a membership change (a death, a leave, a join: each moves some
/// blobs' owners) and every `interval` otherwise. It walks the local store in batches at no more
/// than `blobsPerSecond`; for each blob it takes what the locality map knows, asks the owners it
/// does not know about in one request per owner per batch (`POST /mesh/has`), and copies the blob
/// to the owners that lack it when this node is the one responsible. A change during a pass
/// starts a new pass. Metrics: blobs found under-replicated, copies made and failed, and the time
/// from a membership change to the end of the pass that left nothing under-replicated.
final class AntiEntropy: Sendable {
    struct Settings: Sendable {
        /// Between passes when membership does not change.
        var interval: Duration = .seconds(120)
        /// After a membership change, before the pass (changes often come in bursts).
        var settle: Duration = .seconds(1)
        /// Blobs examined per second at most (the walk's I/O and CPU bound).
        var blobsPerSecond = 20_000
        /// Blobs per batch (one existence request per owner per batch).
        var batch = 512
        /// Copies in flight at once.
        var parallelCopies = 4
        /// Off: no pass ever runs (`[repair] enabled = false`).
        var enabled = true
    }

    struct PassResult: Sendable, Equatable {
        var checked = 0
        var underReplicated = 0
        var copied = 0
        var failed = 0
        /// Owners that did not answer the existence check (their blobs count as under-replicated).
        var unreachable = 0
        var restarted = false
    }

    private struct State {
        var generation = 0
        var lastChange: Duration?
        var reason = "startup"
        /// The first change not yet followed by a pass that left nothing under-replicated.
        var pendingSince: Duration?
    }

    let settings: Settings
    private let state = Mutex(State())
    private let underReplicated = Gauge(label: "cachemesh_antientropy_underreplicated_blobs")
    private let copies = Counter(label: "cachemesh_antientropy_copies_total")
    private let failures = Counter(label: "cachemesh_antientropy_copy_failures_total")
    private let passes = Counter(label: "cachemesh_antientropy_passes_total")
    private let restoreTime = Gauge(label: "cachemesh_antientropy_restore_seconds")

    init(settings: Settings) { self.settings = settings }

    /// Membership changed (`reason` for the log): a pass follows after `settle`; one running now
    /// stops at its next batch and starts over.
    func membershipChanged(_ reason: String, now: Duration) {
        state.withLock { s in
            s.generation += 1
            s.lastChange = now
            s.reason = reason
            if s.pendingSince == nil { s.pendingSince = now }
        }
    }

    var generation: Int { state.withLock { $0.generation } }

    /// The loop: waits for a change (plus `settle`) or the interval, runs a pass, repeats until
    /// `isRunning` turns false.
    func run(mesh: MeshService, isRunning: @escaping @Sendable () -> Bool) async {
        guard settings.enabled else {
            mesh.logger.notice("anti-entropy is off ([repair] enabled = false): blobs stay where they were written")
            return
        }
        var nextPeriodic = mesh.now() + settings.interval
        while isRunning() {
            try? await Task.sleep(for: .milliseconds(100))
            let now = mesh.now()
            let (due, reason, generation) = state.withLock { s -> (Bool, String, Int) in
                if let c = s.lastChange, now - c >= settings.settle {
                    s.lastChange = nil
                    return (true, s.reason, s.generation)
                }
                return (now >= nextPeriodic, "periodic", s.generation)
            }
            guard due else { continue }
            let started = mesh.now()
            let r = await pass(mesh: mesh, generation: generation)
            if r.restarted { continue }
            nextPeriodic = mesh.now() + settings.interval
            passes.increment()
            underReplicated.record(r.underReplicated)
            copies.increment(by: r.copied)
            failures.increment(by: r.failed)
            let complete = r.failed == 0 && r.unreachable == 0
            let since = state.withLock { s -> Duration? in
                defer { if complete { s.pendingSince = nil } }
                return complete ? s.pendingSince : nil
            }
            if let since { restoreTime.record((mesh.now() - since).seconds) }
            if r.underReplicated > 0 || r.failed > 0 {
                let took = (mesh.now() - started).seconds
                mesh.logger.notice("anti-entropy (\(reason)): \(r.underReplicated) of \(r.checked) blob(s) under-replicated, \(r.copied) cop\(r.copied == 1 ? "y" : "ies") made, \(r.failed) failed\(r.unreachable > 0 ? ", \(r.unreachable) owner(s) unreachable" : "") in \(String(format: "%.2f", took)) s")
            }
        }
    }

    /// One walk over the store. Stops early (`restarted`) when membership changes under it.
    func pass(mesh: MeshService, generation: Int) async -> PassResult {
        var result = PassResult()
        guard mesh.settings.replication > 1 else { return result }
        // Paged from the store's index (a cursor walk: no list of the whole store).
        await mesh.store.forEachBlobPage(batch: settings.batch) { batch in
            if self.generation != generation {
                result.restarted = true
                return false
            }
            let started = ContinuousClock.now
            result.checked += batch.count
            await repair(batch, mesh: mesh, into: &result)
            // At most `blobsPerSecond`: a batch of n takes at least n / rate.
            let floor = Duration.seconds(Double(batch.count) / Double(max(1, settings.blobsPerSecond)))
            let spent = ContinuousClock.now - started
            if spent < floor { try? await Task.sleep(for: floor - spent) }
            return true
        }
        return result
    }

    private struct Plan {
        var digest: Digest
        var owners: [NodeID]
        var holding: Set<NodeID>
        var ask: [NodeID]
    }

    private func repair(_ batch: [Digest], mesh: MeshService, into result: inout PassResult) async {
        let me = mesh.me
        let replicas = mesh.settings.replication
        // What the locality map already knows; ask only where it matters (`copyTargets` shrinks
        // as holders are added, so a blob with nothing to do given the known holders is done).
        var (plans, endpoints) = mesh.core.withLock { c -> ([Plan], [NodeID: FetchSource]) in
            let live = Array(Set(c.membership.liveMembers + [me]))
            var plans: [Plan] = []
            var endpoints: [NodeID: FetchSource] = [:]
            let now = mesh.now()
            for d in batch {
                let key = MeshService.placementKey(d)
                let owners = Placement.owners(of: key, live: live, replicas: replicas)
                let known = Set(c.holders(of: d, now: now))
                let missing = Placement.copyTargets(owners: owners, me: me, holding: known)
                guard !missing.isEmpty else { continue }
                for o in missing where endpoints[o] == nil { endpoints[o] = mesh.target(o, in: c) }
                plans.append(Plan(digest: d, owners: owners, holding: known, ask: missing))
            }
            return (plans, endpoints)
        }
        guard !plans.isEmpty else { return }
        // One existence request per owner for the whole batch.
        var askOf: [NodeID: [String]] = [:]
        for p in plans { for o in p.ask { askOf[o, default: []].append(p.digest.hash) } }
        let (held, unreachable) = await Self.askAll(askOf, endpoints: endpoints, mesh: mesh)
        var copyJobs: [(Digest, [FetchSource])] = []
        for i in plans.indices {
            for o in plans[i].ask where held[o]?.contains(plans[i].digest.hash) == true { plans[i].holding.insert(o) }
            let targets = Placement.copyTargets(owners: plans[i].owners, me: me, holding: plans[i].holding)
            guard !targets.isEmpty else { continue }
            result.underReplicated += 1
            if targets.contains(where: unreachable.contains) { result.unreachable += 1 }
            let reachable = targets.filter { !unreachable.contains($0) }.compactMap { endpoints[$0] }
            if !reachable.isEmpty { copyJobs.append((plans[i].digest, reachable)) }
        }
        // Copies, a few at a time.
        var next = 0
        await withTaskGroup(of: (Int, Int).self) { group in
            func launch() {
                let (d, targets) = copyJobs[next]
                next += 1
                group.addTask {
                    var ok = 0
                    for t in targets where await mesh.mirror.copy(d, to: t) { ok += 1 }
                    return (ok, targets.count - ok)
                }
            }
            while next < min(settings.parallelCopies, copyJobs.count) { launch() }
            for await (ok, bad) in group {
                result.copied += ok
                result.failed += bad
                if next < copyJobs.count { launch() }
            }
        }
    }

    /// A draining node's hand-off of its sole copies: for every local blob, its owners among the
    /// *other* live members and the holders the locality map names are asked (one request per
    /// node per batch: a fact in the map may be stale); a blob none of them holds goes to the
    /// best-ranked owner (the next if that copy fails). Blobs held elsewhere are left to the
    /// others' anti-entropy, which the leave wakes. Stops at `deadline` (the rest counts as unchecked). With R = 1 nothing
    /// is handed off (one copy was asked for; the blobs come back with the node).
    func handOff(mesh: MeshService, deadline: ContinuousClock.Instant) async -> (handed: Int, failed: Int, unchecked: Int) {
        let replicas = mesh.settings.replication
        guard replicas > 1 else { return (0, 0, 0) }
        let me = mesh.me
        let total = mesh.store.blobCount
        var handed = 0, failed = 0, checked = 0
        await mesh.store.forEachBlobPage(batch: settings.batch) { batch in
            guard ContinuousClock.now < deadline else { return false }
            checked += batch.count
            let (owners, asked, endpoints) = mesh.core.withLock { c -> ([String: [NodeID]], [String: [NodeID]], [NodeID: FetchSource]) in
                let others = c.membership.liveMembers.filter { $0 != me }
                var owners: [String: [NodeID]] = [:], asked: [String: [NodeID]] = [:], endpoints: [NodeID: FetchSource] = [:]
                let now = mesh.now()
                for d in batch {
                    let key = MeshService.placementKey(d)
                    let o = Placement.owners(of: key, live: others, replicas: replicas)
                    owners[d.hash] = o
                    let ask = Array(Set(o + c.holders(of: d, now: now).filter { $0 != me }))
                    asked[d.hash] = ask
                    for n in ask where endpoints[n] == nil { endpoints[n] = mesh.target(n, in: c) }
                }
                return (owners, asked, endpoints)
            }
            var askOf: [NodeID: [String]] = [:]
            for (hash, nodes) in asked { for n in nodes { askOf[n, default: []].append(hash) } }
            let (held, _) = await Self.askAll(askOf, endpoints: endpoints, mesh: mesh)
            for d in batch {
                guard let o = owners[d.hash], !(asked[d.hash] ?? []).contains(where: { held[$0]?.contains(d.hash) == true }) else { continue }
                // Nobody asked answered "held" (or could be asked): a sole copy. Copy it to the
                // best owner that can be reached, the next one if that copy fails.
                var done = false
                for n in o {
                    guard let t = endpoints[n] else { continue }
                    if await mesh.mirror.copy(d, to: t) { done = true; break }
                }
                if done { handed += 1 } else { failed += 1 }
            }
            return true
        }
        return (handed, failed, max(0, total - checked))
    }

    /// Asks every node in `askOf` which of its hashes it holds, one request per node, all at once.
    /// `unreachable`: nodes without an endpoint or without an answer.
    static func askAll(_ askOf: [NodeID: [String]], endpoints: [NodeID: FetchSource],
                       mesh: MeshService) async -> (held: [NodeID: Set<String>], unreachable: Set<NodeID>) {
        var held: [NodeID: Set<String>] = [:]
        var unreachable: Set<NodeID> = []
        await withTaskGroup(of: (NodeID, Set<String>?).self) { group in
            for (node, hashes) in askOf {
                guard let source = endpoints[node] else {
                    unreachable.insert(node)
                    continue
                }
                group.addTask { (node, await ask(source, hashes, mesh: mesh)) }
            }
            for await (node, answer) in group {
                if let answer { held[node] = answer } else { unreachable.insert(node) }
            }
        }
        return (held, unreachable)
    }

    /// Which of `hashes` `source` holds (nil: no answer).
    static func ask(_ source: FetchSource, _ hashes: [String], mesh: MeshService) async -> Set<String>? {
        guard let body = try? JSONEncoder().encode(HasRequest(hashes: hashes)) else { return nil }
        do {
            let r = try await mesh.transport.request(
                to: source, HTTPRequestHead(method: "POST", path: MeshService.hasPath, headers: ["content-type": "application/json"]),
                body: .bytes(ByteBuffer(bytes: body)))
            let answer = try await r.response.body.collect(upTo: HasRequest.maxAnswerBytes)
            guard r.response.status == 200 else {
                mesh.logger.debug("existence check at \(source.name) refused: \(r.response.status) \(String(buffer: answer))")
                return nil
            }
            return Set(try JSONDecoder().decode(HasAnswer.self, from: Data(answer.readableBytesView)).held)
        } catch {
            mesh.logger.debug("existence check at \(source.name) failed: \(error)")
            return nil
        }
    }
}

/// `POST /mesh/has`: which of these blobs does the receiver hold.
struct HasRequest: Codable, Sendable {
    var hashes: [String]
    static let maxHashes = 4096
    static let maxRequestBytes = maxHashes * 80 + 64
    static let maxAnswerBytes = maxHashes * 80 + 64
}

struct HasAnswer: Codable, Sendable {
    var held: [String]
}

extension Duration {
    /// As fractional seconds.
    var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) / 1e18
    }
}
