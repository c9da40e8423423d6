import BlobStore
import MeshCore
import MeshHTTP
import NIOCore

/// What the mesh answered for an action-cache key this node lacks.
public enum MeshActionOutcome: Sendable, Equatable {
    /// A node held it (`from`: its name); the bytes are what it stored.
    case found([UInt8], from: String)
    /// Every node asked answered 404 (or there was nobody to ask).
    case notFound
    /// Nobody had it, and some of the nodes asked could not answer (down, timed out, refused).
    case unavailable(String)
}

/// What deleting an action result elsewhere in the mesh did.
public struct ActionDeletion: Sendable, Equatable {
    /// Nodes that held a copy and deleted it.
    public var deletedAt: [String] = []
    /// Nodes that did not answer, or refused.
    public var unconfirmed: [String] = []
    public init(deletedAt: [String] = [], unconfirmed: [String] = []) {
        self.deletedAt = deletedAt
        self.unconfirmed = unconfirmed
    }
}

/// The action cache across the mesh. Action results are not content-addressed (a key names
/// whatever result was written last), so they are not in the locality map: they are placed by
/// rendezvous hashing of the key instead. A result written at any node is copied to the key's
/// owners — `max(R, 1)` of the live members, so even with R = 1 another node can find it — and to
/// the origin, which keeps every result (they are small, and behind an S3 tier they then reach
/// the bucket). A node that misses asks the owners and the origin at once; the first to answer
/// 200 wins. Copies carry the mirror header, so the receiver stores without copying again;
/// lookups carry the hop header, so the receiver answers from its own store only.
extension MeshService {
    /// The largest action-cache value a node stores or accepts from another node (16 MiB).
    public static let maxActionBytes = 16 << 20

    /// How long a lookup waits for the owners and the origin before it counts them as failed.
    static let actionLookupTimeout: Duration = .seconds(5)

    /// A client wrote an action result here: copy it to the key's owners (and the origin). Returns
    /// once W copies, this one included, are durable — with origin write-through the origin's copy
    /// is one of them and required; otherwise the origin's copy finishes in the background.
    public func storedAction(key: String, value: [UInt8]) async throws {
        let item = MirrorItem.action(key: key, value: value)
        var candidates = actionCandidates(key)
        let origin = node.role == .origin ? nil : originSource()
        if let origin { candidates.removeAll { $0.name == origin.name } }
        let required = origin != nil && settings.fetch.originWriteThrough ? 1 : 0
        let copies = max(1, settings.replication) - (isActionOwner(key) ? 1 : 0)
        let quorum = max(0, settings.writeQuorum - 1)
        async let toOrigin: Void = copy(item, toOrigin: origin, quorum: required)
        try await mirror.replicate(item, candidates: candidates, copies: copies - required, quorum: max(0, quorum - required),
                                   isAlive: isAlive)
        try await toOrigin
    }

    private func copy(_ item: MirrorItem, toOrigin origin: FetchSource?, quorum: Int) async throws {
        guard let origin else { return }
        try await mirror.replicate(item, to: [origin], quorum: quorum)
    }

    /// An action result this node lacks: ask the key's owners and the origin at once; the first
    /// 200 wins and the other requests are cancelled.
    public func fetchAction(key: String) async -> MeshActionOutcome {
        let sources = actionSources(key)
        guard !sources.isEmpty else { return .notFound }
        return await withTaskGroup(of: ActionAnswer.self) { group in
            for s in sources { group.addTask { await self.askAction(key, s) } }
            var failures: [String] = []
            for await answer in group {
                switch answer {
                case .found(let bytes, let from):
                    group.cancelAll()
                    return .found(bytes, from: from)
                case .missing: continue
                case .failed(let why): failures.append(why)
                }
            }
            return failures.isEmpty ? .notFound : .unavailable(failures.joined(separator: "; "))
        }
    }

    /// A client deleted an action result here: delete it at every other live member and the
    /// origin too — any node that answered a lookup keeps a copy, and the next lookup would bring
    /// it back. Deletes are rare (ccache drops entries it finds stale), so this is a broadcast.
    /// Bounded by the lookup timeout; a member that is down keeps its copy.
    public func deletedAction(key: String) async -> ActionDeletion {
        var targets = Self.placementKey(key) == nil ? [] : actionCandidates(key)
        if node.role != .origin, let o = originSource(), !targets.contains(where: { $0.name == o.name }) { targets.append(o) }
        let answers = await withTaskGroup(of: (String, Int?).self) { group in
            for t in targets {
                group.addTask {
                    let status = try? await Self.within(Self.actionLookupTimeout) {
                        let r = try await self.transport.request(
                            to: t, HTTPRequestHead(method: "DELETE", path: "/ac/\(key)", headers: [Mirror.header: "1"]),
                            body: .empty).response
                        _ = try? await r.body.collect(upTo: 64 * 1024)
                        return r.status
                    }
                    return (t.name, status)
                }
            }
            var all: [(String, Int?)] = []
            for await a in group { all.append(a) }
            return all
        }
        let result = ActionDeletion(deletedAt: answers.filter { $0.1 == 200 }.map(\.0).sorted(),
                                    unconfirmed: answers.filter { $0.1 != 200 && $0.1 != 404 }.map(\.0).sorted())
        if !result.unconfirmed.isEmpty {
            logger.warning("action \(key) deleted here, but not confirmed deleted at \(result.unconfirmed.joined(separator: ", "))")
        }
        return result
    }

    /// The key's owners other than this node (alive before suspect), then the origin.
    func actionSources(_ key: String) -> [FetchSource] {
        var sources = Array(actionCandidates(key).prefix(max(1, settings.replication)))
        if node.role != .origin, let o = originSource(), !sources.contains(where: { $0.name == o.name }) { sources.append(o) }
        return sources
    }

    /// Every other live member, ranked for `key` by rendezvous hashing (alive before suspect).
    private func actionCandidates(_ key: String) -> [FetchSource] {
        guard let k = Self.placementKey(key) else { return [] }
        return core.withLock { c in c.mirrorCandidates(for: k).compactMap { target($0, in: c) } }
    }

    private func isActionOwner(_ key: String) -> Bool {
        guard let k = Self.placementKey(key) else { return true }
        return core.withLock { c in
            Placement.owners(of: k, live: c.membership.liveMembers + [me], replicas: max(1, settings.replication)).contains(me)
        }
    }

    private enum ActionAnswer: Sendable {
        case found([UInt8], String)
        case missing
        case failed(String)
    }

    private func askAction(_ key: String, _ source: FetchSource) async -> ActionAnswer {
        do {
            return try await Self.within(Self.actionLookupTimeout) {
                let r = try await self.transport.request(
                    to: source, HTTPRequestHead(method: "GET", path: "/ac/\(key)", headers: [BlobFetcher.hopHeader: "1"]),
                    body: .empty).response
                switch r.status {
                case 200:
                    let body = try await r.body.collect(upTo: Self.maxActionBytes)
                    return .found(Array(body.readableBytesView), source.name)
                case 404:
                    _ = try? await r.body.collect(upTo: 64 * 1024)
                    return .missing
                default:
                    r.cancel()
                    return .failed("\(source.name) answered \(r.status)")
                }
            }
        } catch {
            return .failed("\(source.name): \(error)")
        }
    }

    /// `op`, or `ActionLookupTimeout` once `limit` passed (the operation is cancelled).
    private static func within<T: Sendable>(_ limit: Duration, _ op: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await op() }
            group.addTask {
                try await Task.sleep(for: limit)
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let value = first else { throw ActionLookupTimeout(limit: limit) }
            return value
        }
    }
}

struct ActionLookupTimeout: Error, CustomStringConvertible {
    let limit: Duration
    var description: String { "no answer within \(limit)" }
}
