/// How a node that lacks a blob gets it.
public enum FetchStrategy: String, Sendable, CaseIterable {
    /// Best holder first, the next after an adaptive delay (a high percentile of recent fetches).
    case hedged
    /// Every holder and the origin at once; the first verified body wins.
    case immediate
    /// Holders one at a time (best RTT first); the origin only when every holder failed.
    case peersOnly = "peers-only"
    /// The origin only (the baseline without a mesh).
    case originOnly = "origin-only"
}

/// Anti-entropy pacing (`[repair]` in a topology).
public struct RepairSettings: Sendable, Hashable {
    /// Between passes when membership does not change (a change starts one after a second).
    public var intervalSeconds = 120
    /// Blobs examined per second at most.
    public var blobsPerSecond = 20_000
    /// Off: no pass runs, blobs stay where they were written (placement experiments only).
    public var enabled = true
    public init() {}
}

/// Mesh-wide fetch settings (`[fetch]` in a topology).
public struct FetchSettings: Sendable {
    public var strategy: FetchStrategy = .hedged
    /// Between nodes: HTTP/3 over QUIC with HTTP/2 fallback, or HTTP/2 only.
    public var transport: MeshTransportKind = .quic
    /// `transport = "adaptive"`: QUIC or TCP per peer by what the last requests measured
    /// (`TransportChooser`), the QUIC fallback rules unchanged.
    public var adaptiveTransport = false
    /// Every write is also copied to the origin, and acknowledged only once the origin has it.
    public var originWriteThrough = false
    public init() {}
}
