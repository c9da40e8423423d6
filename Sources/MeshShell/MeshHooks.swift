import BlobStore
import MeshHTTP

/// How a fetch of a blob this node lacks ended.
public enum MeshFetchOutcome: Sendable, Equatable {
    /// Stored here; the source that won (e.g. `peer:peer2 via quic`, `origin:origin via tcp`).
    case fetched(String)
    /// Every source asked answered 404 (or the mesh knows no source): a final miss.
    case notFound
    /// The mesh could not tell (a source failed, this node has not joined yet): the client
    /// should ask again or ask another node — never a 404 for a blob the mesh may hold.
    case unavailable(String)
}

/// What the mesh layer offers the routes (the worker role, mirroring, mesh-internal routes).
public protocol MeshHooks: Sendable {
    /// Fetch a blob this node lacks into the local store.
    func fetchMissing(hash: String) async -> MeshFetchOutcome
    /// The same, with `tap` taking the body as it arrives (cut-through; see `CutThroughTap`).
    /// The tap is always begun or ended by the time this returns.
    func fetchMissing(hash: String, tap: CutThroughTap?) async -> MeshFetchOutcome
    /// A client stored a blob here: announce it and copy it to the mirrors (returns once the
    /// write quorum is durable).
    func stored(_ digest: Digest) async throws
    /// Another node placed a copy here (mirror / hand-off): announce it only.
    func received(_ digest: Digest)
    /// `/mesh/...` requests (node certificates only; checked before this is called).
    func handleMeshRequest(_ request: HTTPServerRequest) async -> HTTPResponse
    /// This node's role in the mesh (`origin`, `peer`) and the mesh part of `/status`;
    /// `members`: whether the member list is included.
    func status(members: Bool) -> (role: String, mesh: MeshStatus)
    /// A client wrote an action result here: copy it where other nodes look for it (returns once
    /// the write quorum is durable). See `ActionMesh.swift`.
    func storedAction(key: String, value: [UInt8]) async throws
    /// An action result this node lacks: ask the nodes that would hold it.
    func fetchAction(key: String) async -> MeshActionOutcome
    /// A client deleted an action result here: delete the other copies too (best effort).
    func deletedAction(key: String) async -> ActionDeletion
}

extension MeshHooks {
    public func fetchMissing(hash: String, tap: CutThroughTap?) async -> MeshFetchOutcome {
        defer { tap?.end() }
        return await fetchMissing(hash: hash)
    }
}
