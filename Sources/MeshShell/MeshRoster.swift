import MeshCore

/// Who may be in the mesh and how this node joins it: all the mesh shell needs of the node's
/// topology (CacheNode builds it from the topology file).
public struct MeshRoster: Sendable {
    /// The mesh's name (the topology's), shown in `/status` and in refusals.
    public var name: String
    /// Every node, this one included: only these may be members, each with exactly this metadata.
    public var nodes: [NodeMetadata]
    /// This node.
    public var me: NodeMetadata
    /// Where to join: the TCP endpoints of this node's seeds.
    public var seeds: [String]

    public init(name: String, nodes: [NodeMetadata], me: NodeMetadata, seeds: [String]) {
        self.name = name
        self.nodes = nodes
        self.me = me
        self.seeds = seeds
    }

    /// The origin the roster names, if any.
    var origin: NodeMetadata? { nodes.first { $0.role == .origin } }
}
