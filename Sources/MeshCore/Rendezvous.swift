/// Highest-random-weight (rendezvous) hashing of digests over members.
///
/// The weight of (digest, node) is a stable 64-bit mix of the digest and the node's *name* (no
/// per-process hash seeds, no uid), so every node computes the same order and a restarted node keeps
/// its place. Removing a node only moves the digests for which it ranked first
/// (their next-ranked node takes over); adding one only takes the digests it now wins.
public enum Rendezvous {
    public static func weight(of digest: Digest, on node: NodeID) -> UInt64 {
        SplitMix64.mix(digest.stableHash ^ SplitMix64.mix(SplitMix64.mix(node.nameHash) &+ 0x632B_E59B_D9B4_E019))
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

/// Restoring R after a member died or left, decided the same way on every holder.
public enum Repair {
    /// The members this node should copy a blob to so that it has `replicas` live copies again —
    /// empty unless this node is the one responsible.
    ///
    /// - `holders`: the live members other than this node known to hold the blob (locality map).
    /// - `live`: every live member (this node included or not).
    ///
    /// Among the live holders (this node included) the one ranked first by rendezvous hashing
    /// copies, so one copy is made per missing replica, not one per holder; every holder computes
    /// the same answer from the same map. The targets are the best-ranked live members that do
    /// not hold it. This works wherever the copies are — the writer is often not one of the blob's
    /// rendezvous owners (it keeps its own copy and mirrors to the R−1 best *other* members).
    public static func targets(for key: Digest, me: NodeID, holders: [NodeID], live: [NodeID], replicas: Int) -> [NodeID] {
        let liveSet = Set(live).union([me])
        let holding = Set(holders).intersection(liveSet).union([me])
        guard holding.count < replicas else { return [] }
        guard Rendezvous.top(1, for: key, over: holding.sorted()).first == me else { return [] }
        let candidates = liveSet.subtracting(holding).sorted()
        return Rendezvous.top(replicas - holding.count, for: key, over: candidates)
    }
}
