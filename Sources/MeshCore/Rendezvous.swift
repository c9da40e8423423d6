/// Highest-random-weight (rendezvous) hashing of digests over members.
///
/// The weight of (digest, node) is a stable 64-bit mix of both (no per-process hash seeds), so every
/// node computes the same order. Removing a node only moves the digests for which it ranked first
/// (their next-ranked node takes over); adding one only takes the digests it now wins.
public enum Rendezvous {
    public static func weight(of digest: Digest, on node: NodeID) -> UInt64 {
        SplitMix64.mix(digest.stableHash ^ SplitMix64.mix(node.stableHash &+ 0x632B_E59B_D9B4_E019))
    }

    /// All `members` ordered by decreasing weight for `digest` (ties broken by NodeID).
    public static func rank(_ digest: Digest, over members: [NodeID]) -> [NodeID] {
        members
            .map { (weight(of: digest, on: $0), $0) }
            .sorted { $0.0 != $1.0 ? $0.0 > $1.0 : $0.1 < $1.1 }
            .map(\.1)
    }

    /// The `count` highest-ranked members, e.g. the R−1 mirror targets (pass the members except self).
    public static func top(_ count: Int, for digest: Digest, over members: [NodeID]) -> [NodeID] {
        Array(rank(digest, over: members).prefix(Swift.max(0, count)))
    }
}
