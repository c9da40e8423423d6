/// Membership + locality map of one node, composed: locality deltas ride on membership messages,
/// push-pull carries both, and dead/left members' locality entries are dropped.
public struct MeshNode: Sendable {
    public var membership: Membership
    public var locality: LocalityMap

    public var myself: NodeID { membership.myself }

    public init(
        myself: NodeID,
        metadata: NodeMetadata,
        membershipConfiguration: Membership.Configuration = .lan,
        localityConfiguration: LocalityMap.Configuration = LocalityMap.Configuration(),
        initialMembers: [MemberUpdate] = [],
        seed: UInt64
    ) {
        membership = Membership(myself: myself, metadata: metadata, configuration: membershipConfiguration,
                                initialMembers: initialMembers, seed: seed)
        locality = LocalityMap(myself: myself, configuration: localityConfiguration)
    }

    public mutating func tick(now: Duration) -> [MeshAction] {
        locality.expire(now: now)
        let actions = membership.tick(now: now, piggyback: &locality)
        observe(actions)
        return actions + welcome(actions, now: now)
    }

    /// A message as it arrives from the network: validated against the membership configuration's
    /// limits (refused whole with the reason), from an admitted sender only; updates about nodes
    /// that are not admitted, or with metadata other than theirs, are dropped (`refusedUpdates`).
    public mutating func receive(_ envelope: Envelope, now: Duration) throws(GossipRejection) -> [MeshAction] {
        try envelope.validate(membership.configuration.limits)
        let admission = membership.configuration.admission
        guard admission.admits(name: envelope.from.name) else { throw .senderNotAdmitted(envelope.from.name) }
        var message = envelope.message
        if admission.expected != nil {
            var dropped = 0
            message = message.withLocality { facts in
                let kept = facts.filter { admission.admits(name: $0.holder.name) }
                dropped += facts.count - kept.count
                return kept
            }
            refusedLocality += dropped
        }
        return receive(message, from: envelope.from, now: now)
    }

    /// Locality facts dropped because their holder is not admitted.
    public private(set) var refusedLocality = 0

    /// A message already checked (simulations and tests; the network path is `receive(_:now:)`).
    public mutating func receive(_ message: Message, from sender: NodeID, now: Duration) -> [MeshAction] {
        // Membership first, so that a holder's death in the same message is known before its facts.
        var actions = membership.receive(message, from: sender, now: now, piggyback: &locality)
        observe(actions)
        switch message {
        case .pushPull(let state, _):
            locality.merge(acceptable(state.locality), now: now, rebroadcast: false)
            if let page = state.holdings, membership.status(of: sender)?.isLive ?? true {
                locality.merge(page, from: sender, now: now)
            }
        default:
            if let g = message.gossip, !g.locality.isEmpty {
                locality.merge(acceptable(g.locality), now: now, rebroadcast: true)
            }
        }
        actions += welcome(actions, now: now)
        return actions
    }

    public mutating func join(seeds: [String], now: Duration) -> [MeshAction] {
        membership.join(seeds: seeds, now: now, piggyback: &locality)
    }

    public mutating func leave(now: Duration) -> [MeshAction] {
        let actions = membership.leave(now: now, piggyback: &locality)
        observe(actions)
        return actions
    }

    /// A member that became alive (new, or back after dead or left) gets this node's state at once:
    /// a push-pull that asks no reply, carrying a page of this node's holdings. So a (re)started
    /// node is told where blobs are, and everyone learns what its store holds, without waiting for
    /// random push-pull partners.
    private mutating func welcome(_ actions: [MeshAction], now: Duration) -> [MeshAction] {
        var out: [MeshAction] = []
        for case .memberChanged(let e) in actions where e.node != myself && e.status == .alive {
            guard e.previous == nil || e.previous == .dead || e.previous == .left else { continue }
            out.append(.send(.pushPull(membership.localState(now: now, piggyback: &locality), isReply: true), to: e.node))
        }
        return out
    }

    /// This node already holds `digests` (a store found on disk at start): announced by push-pull
    /// pages, not one delta per blob.
    public mutating func loadOwn(_ digests: [Digest]) { locality.loadOwn(digests) }

    /// This node's holdings are read from `provider` (its store's index), not kept in the map.
    public mutating func readHoldings(from provider: any HoldingsProvider) { locality.readHoldings(from: provider) }

    /// This node stored `digest` (announced by gossip).
    public mutating func gained(_ digest: Digest, now: Duration) { locality.gained(digest, now: now) }

    /// This node evicted `digest`.
    public mutating func lost(_ digest: Digest, now: Duration) { locality.lost(digest, now: now) }

    /// Live holders of `digest` other than this node.
    public func holders(of digest: Digest, now: Duration) -> [NodeID] {
        locality.holders(of: digest, now: now).filter { membership.status(of: $0)?.isLive ?? true }
    }

    /// Every other live member as a mirror target for `key`, best first: the members counted alive
    /// ranked by rendezvous, then the suspects ranked the same way; dead and departed members and
    /// this node never. The origin is an ordinary member here. A write mirrors to the first R−1;
    /// the ones after them replace failed or slow copies; a drain hands a sole copy to the first.
    public func mirrorCandidates(for key: Digest) -> [NodeID] {
        let live = membership.liveMembers.filter { $0 != myself }
        let alive = live.filter { membership.status(of: $0) == .alive }
        let suspects = live.filter { membership.status(of: $0) != .alive }
        return Rendezvous.rank(key, over: alive) + Rendezvous.rank(key, over: suspects)
    }

    private func acceptable(_ updates: [LocalityUpdate]) -> [LocalityUpdate] {
        updates.filter { u in
            guard let s = membership.status(of: u.holder) else { return true }
            return s.isLive
        }
    }

    private mutating func observe(_ actions: [MeshAction]) {
        for case .memberChanged(let event) in actions where event.node != myself {
            if event.status.isLive {
                locality.readmitHolder(event.node)
            } else {
                locality.removeHolder(event.node)
            }
        }
    }
}
