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

/// The placement invariant and how anti-entropy restores it.
///
/// Every blob belongs on its R *owners*: the R live members ranked first for it by rendezvous
/// hashing (over names, so restarts do not move it). Other copies (the writer's own when it is not
/// an owner, a reader's cached copy) are a bonus, not one of the R. Each node walks its store;
/// for every blob it asks the owners it does not already know to hold it, then `copyTargets`
/// says whether this node is the one responsible and where to copy.
public enum Placement {
    /// The blob's owners, best first: the `replicas` best-ranked of `live` (this node included
    /// when it is live).
    public static func owners(of key: Digest, live: [NodeID], replicas: Int) -> [NodeID] {
        Rendezvous.top(replicas, for: key, over: Array(Set(live)))
    }

    /// The owners this node must copy a blob it holds to — empty unless it is responsible.
    ///
    /// - `owners`: from `owners(of:live:replicas:)`.
    /// - `holding`: the members other than this node known (asked, or by the locality map) to hold it.
    ///
    /// When an owner holds it, the best-ranked such owner is responsible (this node, if it is an
    /// owner and no better-ranked owner holds it); when no owner holds it, every holder outside the
    /// owners is (each copies; a duplicate PUT is harmless, a blob left off its owners is not).
    /// The targets are the owners that do not hold it. Every holder computes this from the same
    /// facts, so one copy is made per missing owner in the common case.
    public static func copyTargets(owners: [NodeID], me: NodeID, holding: Set<NodeID>) -> [NodeID] {
        let has = holding.union([me])
        if let first = owners.first(where: { has.contains($0) }), first != me { return [] }
        return owners.filter { !has.contains($0) }
    }
}
