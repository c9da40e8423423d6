import Synchronization
import Testing
@testable import MeshCore

/// A store stand-in: digests in slots (a cursor = slot number), removable and addable, like the
/// store's index walked by `blobPage`. A class so the test changes it while the map reads it.
final class SlotStore: HoldingsProvider, @unchecked Sendable {
    private let slots = Mutex<[Digest?]>([])
    init(_ digests: [Digest]) { slots.withLock { $0 = digests } }
    func add(_ d: Digest) { slots.withLock { $0.append(d) } }
    func remove(_ d: Digest) { slots.withLock { s in if let i = s.firstIndex(of: d) { s[i] = nil } } }
    var heldCount: Int { slots.withLock { $0.compactMap { $0 }.count } }
    func holds(_ digest: Digest) -> Bool { slots.withLock { $0.contains(digest) } }
    func holdingsPage(from cursor: Int, limit: Int) -> (digests: [Digest], next: Int?) {
        slots.withLock { s in
            var out: [Digest] = []
            var i = cursor
            while i < s.count, out.count < limit {
                if let d = s[i] { out.append(d) }
                i += 1
            }
            return (out, i < s.count ? i : nil)
        }
    }
}

@Suite("LocalityMap reading its holdings from the store")
struct HoldingsProviderTests {
    @Test("pages rotate through the provider's holdings at the newest version; a receiver learns all of them; a loss after a page wins over a late copy of it")
    func pagesFromTheProvider() {
        let me = node("me"), other = node("other")
        var config = LocalityMap.Configuration()
        config.holdingsPageSize = 100
        var map = LocalityMap(myself: me, configuration: config)
        let held = (0..<250).map { digest($0) }
        let store = SlotStore(held)
        map.readHoldings(from: store)
        #expect(map.ownCount == 250 && map.pendingBroadcasts == 0)   // no delta per blob
        #expect(map.holdsLocally(held[7]) && !map.holdsLocally(digest(999)))
        var pages: [HoldingsPage] = []
        for _ in 0..<3 { pages.append(map.nextHoldingsPage()!) }
        #expect(pages.map(\.page) == [0, 1, 2] && pages.allSatisfy { $0.pages == 3 && $0.version == 0 })
        let seen = pages.flatMap { $0.digests()! }
        #expect(Set(seen) == Set(held) && seen.count == 250)
        #expect(map.nextHoldingsPage()!.page == 0)   // the next rotation
        var receiver = LocalityMap(myself: other)
        for p in pages { receiver.merge(p, from: me, now: .seconds(1)) }
        #expect(held.allSatisfy { receiver.holders(of: $0, now: .seconds(2)) == [me] })
        // The store evicts one and tells the mesh: a delta at a higher version than the pages.
        store.remove(held[0])
        // The map keeps no copy: it reports the store as it is, before being told of the loss.
        #expect(map.ownCount == 249 && !map.holdsLocally(held[0]))
        map.lost(held[0], now: .seconds(3))
        receiver.merge(map.takeBroadcasts(now: .seconds(3), clusterSize: 2), now: .seconds(3), rebroadcast: true)
        receiver.merge(pages[0], from: me, now: .seconds(4))
        #expect(receiver.holders(of: held[0], now: .seconds(4)).isEmpty)
        #expect(receiver.holders(of: held[1], now: .seconds(4)) == [me])
        // A blob stored after the loss is announced (delta) and paged at the newer version.
        let fresh = digest(500)
        store.add(fresh)
        map.gained(fresh, now: .seconds(5))
        let delta = map.takeBroadcasts(now: .seconds(5), clusterSize: 2).filter { $0.digest == fresh }   // (the loss is retransmitted too)
        #expect(delta.count == 1 && delta[0].present && delta[0].version == 2)
        var rotation: [Digest] = []
        var started = false
        for _ in 0..<10 {   // the rest of this rotation, then one whole rotation
            let p = map.nextHoldingsPage()!
            #expect(p.version == 2)
            if p.page == 0 { started = true }
            if started { rotation += p.digests()! }
            if started && p.page == p.pages - 1 { break }
        }
        #expect(Set(rotation) == Set(held.dropFirst() + [fresh]) && rotation.count == 250)
    }

    @Test("an empty provider pages nothing; a provider emptied mid-rotation starts over")
    func emptyProvider() {
        var config = LocalityMap.Configuration()
        config.holdingsPageSize = 2
        var map = LocalityMap(myself: node("me"), configuration: config)
        let store = SlotStore([])
        map.readHoldings(from: store)
        #expect(map.nextHoldingsPage() == nil)
        let ds = (0..<5).map { digest($0) }
        for d in ds { store.add(d) }
        #expect(map.nextHoldingsPage()?.digests() == Array(ds[0..<2]))
        for d in ds[2...] { store.remove(d) }
        #expect(map.nextHoldingsPage()?.digests() == Array(ds[0..<2]))   // rest empty: a new rotation
    }
}
