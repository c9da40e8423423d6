/// Which namespace an entry belongs to.
enum EntryKind: UInt8, Hashable, Sendable {
    case cas
    case ac
}

/// Identifies an entry: namespace + validated 64-hex hash.
struct EntryKey: Hashable, Sendable {
    var kind: EntryKind
    var hash: String
}

/// The in-memory index: a hash map from key to a slot in `nodes`, where the slots
/// form an intrusive doubly-linked list ordered from least (`head`) to most
/// (`tail`) recently used. Lookup, touch, insert and remove are O(1).
struct LRUIndex {
    struct Node {
        var key: EntryKey
        var size: Int64
        /// Open readers / dedup uploads holding this entry; pinned entries are never evicted.
        var pins: Int
        /// The mtime (seconds) last written to disk for this entry.
        var persistedMtime: Int64
        var prev: Int
        var next: Int
    }

    static let none = -1

    private(set) var nodes: [Node] = []
    private var freeSlots: [Int] = []
    private var map: [EntryKey: Int] = [:]
    /// Least recently used.
    private(set) var head = LRUIndex.none
    /// Most recently used.
    private(set) var tail = LRUIndex.none

    var count: Int { map.count }

    func lookup(_ key: EntryKey) -> Int? { map[key] }

    subscript(slot: Int) -> Node {
        get { nodes[slot] }
        _modify { yield &nodes[slot] }
    }

    /// Inserts a new entry as most recently used. The key must not be present.
    @discardableResult
    mutating func insert(_ key: EntryKey, size: Int64, persistedMtime: Int64) -> Int {
        precondition(map[key] == nil, "duplicate key in LRU index")
        let node = Node(key: key, size: size, pins: 0, persistedMtime: persistedMtime, prev: LRUIndex.none, next: LRUIndex.none)
        let slot: Int
        if let free = freeSlots.popLast() {
            nodes[free] = node
            slot = free
        } else {
            nodes.append(node)
            slot = nodes.count - 1
        }
        map[key] = slot
        linkAtTail(slot)
        return slot
    }

    /// Marks an entry as most recently used.
    mutating func touch(_ slot: Int) {
        guard slot != tail else { return }
        unlink(slot)
        linkAtTail(slot)
    }

    /// Removes an entry and returns it.
    @discardableResult
    mutating func remove(_ slot: Int) -> Node {
        let node = nodes[slot]
        unlink(slot)
        map.removeValue(forKey: node.key)
        freeSlots.append(slot)
        return node
    }

    /// Slots from least to most recently used (for tests and diagnostics).
    func slotsInOrder() -> [Int] {
        var result: [Int] = []
        var cursor = head
        while cursor != LRUIndex.none {
            result.append(cursor)
            cursor = nodes[cursor].next
        }
        return result
    }

    private mutating func unlink(_ slot: Int) {
        let prev = nodes[slot].prev, next = nodes[slot].next
        if prev != LRUIndex.none { nodes[prev].next = next } else { head = next }
        if next != LRUIndex.none { nodes[next].prev = prev } else { tail = prev }
        nodes[slot].prev = LRUIndex.none
        nodes[slot].next = LRUIndex.none
    }

    private mutating func linkAtTail(_ slot: Int) {
        nodes[slot].prev = tail
        nodes[slot].next = LRUIndex.none
        if tail != LRUIndex.none { nodes[tail].next = slot } else { head = slot }
        tail = slot
    }
}
