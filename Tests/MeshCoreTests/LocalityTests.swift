import Foundation
import Testing
@testable import MeshCore

func digest(_ i: Int, size: Int64 = 1024) -> Digest {
    Digest(w0: SplitMix64.mix(UInt64(i) &+ 1), w1: UInt64(i), w2: 0xABCD, w3: 0, size: size)
}

@Suite("LocalityMap")
struct LocalityTests {
    @Test("digest hex round trip and validation")
    func digestHex() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        let d = Digest(hex: hex, size: 0)
        #expect(d?.hash == hex)
        #expect(Digest(hex: hex.uppercased(), size: 0) == d)
        #expect(Digest(hex: String(hex.dropLast()), size: 0) == nil)
        #expect(Digest(hex: String(hex.dropLast()) + "g", size: 0) == nil)
        #expect(Digest(hex: hex, size: -1) == nil)
    }

    @Test("one digest type: the store's strict lowercase parse, the gossip's either-case parse, the same JSON as before")
    func oneDigest() throws {
        let hex = "00ff0000000000010123456789abcdef0000000000000000fedcba9876543210"
        let d = try #require(Digest(hash: hex, size: 7))
        #expect(d.hash == hex && d.description == "\(hex)/7")
        #expect((d.w0, d.w1, d.w2, d.w3) == (0x00ff_0000_0000_0001, 0x0123_4567_89ab_cdef, 0, 0xfedc_ba98_7654_3210))
        #expect(Digest(hash: hex.uppercased(), size: 7) == nil, "the store and the routes take lowercase only")
        #expect(Digest(hex: hex.uppercased(), size: 7) == d, "gossip accepts either case")
        #expect(Digest(hash: hex + "0", size: 7) == nil && Digest(hash: hex, size: -1) == nil)
        #expect(Digest.empty.hash == Digest.emptyHash && Digest.empty.size == 0)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let json = String(decoding: try encoder.encode(d), as: UTF8.self)
        #expect(json == "{\"hash\":\"\(hex)\",\"size\":7}")
        #expect(try JSONDecoder().decode(Digest.self, from: Data(json.utf8)) == d)
    }

    @Test("gained and lost deltas replace each other by version, in any arrival order")
    func versionsOrderFacts() {
        let h = node("h")
        var map = LocalityMap(myself: node("me"))
        let d = digest(1)
        let gained = LocalityUpdate(holder: h, digest: d, present: true, version: 1, ageMs: 0)
        let lost = LocalityUpdate(holder: h, digest: d, present: false, version: 2, ageMs: 0)
        map.merge([lost], now: .seconds(1), rebroadcast: true)
        map.merge([gained], now: .seconds(1), rebroadcast: true)  // older fact arrives late
        #expect(map.holders(of: d, now: .seconds(1)).isEmpty)
        map.merge([LocalityUpdate(holder: h, digest: d, present: true, version: 3, ageMs: 0)], now: .seconds(2), rebroadcast: true)
        #expect(map.holders(of: d, now: .seconds(2)) == [h])
        #expect(map.entryCount == 1)
    }

    @Test("entries expire after the TTL, counting the age they arrived with")
    func ttlExpiry() {
        var config = LocalityMap.Configuration()
        config.ttl = .seconds(10)
        var map = LocalityMap(myself: node("me"), configuration: config)
        let fresh = digest(1), aged = digest(2)
        map.merge([
            LocalityUpdate(holder: node("a"), digest: fresh, present: true, version: 1, ageMs: 0),
            LocalityUpdate(holder: node("b"), digest: aged, present: true, version: 1, ageMs: 8000),
            LocalityUpdate(holder: node("c"), digest: aged, present: true, version: 1, ageMs: 12000),  // already expired
        ], now: .seconds(100), rebroadcast: true)
        #expect(map.entryCount == 2)
        #expect(map.holders(of: aged, now: .seconds(101)) == [node("b")])
        #expect(map.holders(of: aged, now: .seconds(102)).isEmpty)
        #expect(map.holders(of: fresh, now: .milliseconds(109_999)) == [node("a")])
        #expect(map.holders(of: fresh, now: .seconds(110)).isEmpty)
        map.expire(now: .seconds(105), force: true)
        #expect(map.entryCount == 1)
        map.expire(now: .seconds(110), force: true)
        #expect(map.entryCount == 0)
        #expect(map.digestCount == 0)
        #expect(map.approximateBytes == 0)
    }

    @Test("a refresh with the same version extends the TTL without being re-gossiped")
    func refreshExtendsTTL() {
        var config = LocalityMap.Configuration()
        config.ttl = .seconds(10)
        var map = LocalityMap(myself: node("me"), configuration: config)
        let d = digest(1)
        let fact = LocalityUpdate(holder: node("a"), digest: d, present: true, version: 1, ageMs: 0)
        #expect(map.merge([fact], now: .seconds(0), rebroadcast: true) == 1)
        _ = map.takeBroadcasts(now: .zero, clusterSize: 1)  // limit 4 × 1: drain
        for _ in 0..<4 { _ = map.takeBroadcasts(now: .zero, clusterSize: 1) }
        #expect(map.pendingBroadcasts == 0)
        #expect(map.merge([fact], now: .seconds(8), rebroadcast: true) == 0)
        #expect(map.pendingBroadcasts == 0)
        #expect(map.holders(of: d, now: .seconds(15)) == [node("a")])
    }

    @Test("the entry cap is never exceeded and the oldest entries are evicted")
    func entryCap() {
        var config = LocalityMap.Configuration()
        config.maxEntries = 100
        config.evictionSlack = 0.1
        var map = LocalityMap(myself: node("me"), configuration: config)
        for i in 0..<250 {
            map.merge([LocalityUpdate(holder: node("h\(i % 7)"), digest: digest(i), present: true, version: 1, ageMs: 0)],
                      now: .seconds(Int64(i)), rebroadcast: false)
            #expect(map.entryCount <= 100)
        }
        #expect(map.entryCount >= 90)
        #expect(map.evictedCount == 250 - map.entryCount)
        #expect(map.holders(of: digest(249), now: .seconds(250)) == [node("h\(249 % 7)")])
        #expect(map.holders(of: digest(0), now: .seconds(250)).isEmpty)
        #expect(map.approximateBytes > 0)
        #expect(map.approximateBytes < 100 * 1024)
    }

    @Test("own gains are piggybacked with bounded retransmits; facts about self are ignored")
    func ownDeltas() {
        let me = node("me")
        var map = LocalityMap(myself: me)
        map.gained(digest(1), now: .zero)
        map.gained(digest(1), now: .zero)  // idempotent
        #expect(map.ownCount == 1)
        var sent = 0
        for _ in 0..<20 { sent += map.takeBroadcasts(now: .zero, clusterSize: 10).count }
        #expect(sent == 8)  // 4 × ceil(log10(11))
        map.merge([LocalityUpdate(holder: me, digest: digest(2), present: true, version: 99, ageMs: 0)], now: .zero, rebroadcast: true)
        #expect(map.entryCount == 0)
        // Push-pull carries no relayed facts (none known) and a page with the one own blob.
        #expect(map.fullStateUpdates(now: .seconds(5)).isEmpty)
        let page = map.nextHoldingsPage()
        #expect(page?.digests() == [digest(1)] && page?.version == 1)
    }

    @Test("a store loaded at start is announced in pages that rotate through all of it, at the newest version; a page cannot undo a later loss")
    func holdingsPages() {
        let me = node("me"), other = node("other")
        var config = LocalityMap.Configuration()
        config.holdingsPageSize = 100
        var map = LocalityMap(myself: me, configuration: config)
        let store = (0..<250).map { digest($0) }
        map.loadOwn(store)
        #expect(map.ownCount == 250 && map.pendingBroadcasts == 0)   // no delta per blob
        var seen: [Digest] = []
        var pages: [HoldingsPage] = []
        for _ in 0..<3 {
            let p = map.nextHoldingsPage()!
            pages.append(p)
            seen += p.digests()!
        }
        #expect(pages.map(\.page) == [0, 1, 2] && pages.allSatisfy { $0.pages == 3 && $0.version == 250 })
        #expect(Set(seen) == Set(store) && seen.count == 250)
        #expect(map.nextHoldingsPage()!.page == 0)   // the next rotation
        // The receiver learns every blob from the pages.
        var receiver = LocalityMap(myself: other)
        for p in pages { receiver.merge(p, from: me, now: .seconds(1)) }
        #expect(store.allSatisfy { receiver.holders(of: $0, now: .seconds(2)) == [me] })
        // A loss after the page (a higher version) wins, and a late copy of the old page does not undo it.
        map.lost(store[0], now: .seconds(3))
        let loss = map.takeBroadcasts(now: .seconds(3), clusterSize: 2)
        receiver.merge(loss, now: .seconds(3), rebroadcast: true)
        receiver.merge(pages[0], from: me, now: .seconds(4))
        #expect(receiver.holders(of: store[0], now: .seconds(4)).isEmpty)
        #expect(receiver.holders(of: store[1], now: .seconds(4)) == [me])
    }

    @Test("a holdings page round-trips through its 40-byte records; garbage is refused by validation")
    func holdingsWire() throws {
        let ds = [digest(1), Digest(w0: .max, w1: 0, w2: 1, w3: 2, size: 1 << 40)]
        let p = HoldingsPage(version: 7, page: 0, pages: 1, digests: ds)
        #expect(p.digests() == ds && p.count == 2)
        var bad = p
        bad.records = "not base64!"
        #expect(bad.digests() == nil)
        let env = Envelope(from: node("a"), message: .pushPull(PushPullState(holdings: bad), isReply: false))
        #expect(throws: GossipRejection.self) { try env.validate(GossipLimits()) }
        var huge = HoldingsPage(version: 7, page: 0, pages: 1, digests: [Digest(w0: 1, w1: 1, w2: 1, w3: 1, size: Int64.max)])
        #expect(throws: GossipRejection.self) { try Envelope(from: node("a"), message: .pushPull(PushPullState(holdings: huge), isReply: false)).validate(GossipLimits()) }
        huge.version = 1 << 60
        #expect(throws: GossipRejection.self) { try Envelope(from: node("a"), message: .pushPull(PushPullState(holdings: huge), isReply: false)).validate(GossipLimits()) }
        try Envelope(from: node("a"), message: .pushPull(PushPullState(holdings: p), isReply: false)).validate(GossipLimits())
    }

    @Test("locality deltas converge across a simulated mesh, and so does a loss", arguments: seeds)
    func deltasConverge(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 32)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(2))
        let d = digest(77)
        mesh.gained(d, at: 5)
        mesh.run(until: .seconds(12)) { $0.nodesKnowing(d, heldBy: 5) == 31 }
        #expect(mesh.nodesKnowing(d, heldBy: 5) == 31)
        mesh.lost(d, at: 5)
        mesh.run(until: .seconds(22))
        #expect(mesh.nodesKnowing(d, heldBy: 5) == 0)
    }

    @Test("locality converges on a lossy network (5% loss), gossip plus push-pull", arguments: seeds)
    func convergesWithLoss(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 24)
        config.seed = seed
        config.lossRate = 0.05
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(1))
        let ds = (0..<5).map { digest(100 + $0) }
        for (k, d) in ds.enumerated() { mesh.gained(d, at: k * 3) }
        mesh.run(until: .seconds(65)) { m in ds.enumerated().allSatisfy { m.nodesKnowing($1, heldBy: $0 * 3) == 23 } }
        for (k, d) in ds.enumerated() { #expect(mesh.nodesKnowing(d, heldBy: k * 3) == 23) }
        for i in mesh.nodes.indices { #expect(mesh.nodes[i].membership.liveMembers.count == 24) }
    }

    @Test("push-pull repairs what gossip missed (anti-entropy)", arguments: seeds)
    func pushPullRepairs(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 8)
        config.seed = seed
        config.membership.pushPullInterval = .seconds(2)
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(1))
        // Node 6 hears nothing while the gossip about the new digest runs its course.
        for i in mesh.nodes.indices where i != 6 { mesh.block(from: i, to: 6) }
        let d = digest(5)
        mesh.gained(d, at: 2)
        mesh.run(until: .seconds(6))
        #expect(mesh.nodes[2].locality.pendingBroadcasts == 0)
        #expect(mesh.nodes[6].locality.holders(of: d, now: mesh.now).isEmpty)
        mesh.healAllLinks()
        mesh.run(until: .seconds(20)) { $0.nodes[6].locality.holders(of: d, now: $0.now) == [$0.ids[2]] }
        #expect(mesh.nodes[6].locality.holders(of: d, now: mesh.now) == [mesh.ids[2]])
    }

    @Test("a dead member's entries are dropped everywhere", arguments: seeds)
    func deadHolderDropped(seed: UInt64) {
        var config = SimulatedMesh.Configuration(nodeCount: 8)
        config.seed = seed
        var mesh = SimulatedMesh(config)
        mesh.run(until: .seconds(1))
        let d = digest(9)
        mesh.gained(d, at: 4)
        mesh.run(until: .seconds(5))
        #expect(mesh.nodesKnowing(d, heldBy: 4) == 7)
        mesh.crash(4)
        mesh.run(until: .seconds(40))
        for i in mesh.nodes.indices where i != 4 {
            #expect(mesh.status(of: 4, seenBy: i) == .dead)
            #expect(mesh.nodes[i].locality.entryCount == 0)
        }
    }
}

@Suite("LocalityMap storage")
struct LocalityStorageTests {
    @Test("a (digest, holder) fact costs at most 32 bytes with two or more holders per digest, 48 with one")
    func bytesPerEntry() {
        let holders = (0..<24).map { node("n\($0)") }
        for (perDigest, bound) in [(1, 48), (2, 32), (3, 32)] {
            var config = LocalityMap.Configuration()
            config.maxEntries = 10_000_000
            var map = LocalityMap(myself: node("me"), configuration: config)
            var batch: [LocalityUpdate] = []
            for i in 0..<60_000 {
                for k in 0..<perDigest {
                    batch.append(LocalityUpdate(holder: holders[(i + k * 7) % 24], digest: digest(i), present: true, version: 1, ageMs: 0))
                }
                if batch.count >= 4096 { map.merge(batch, now: .seconds(1), rebroadcast: false); batch = [] }
            }
            map.merge(batch, now: .seconds(1), rebroadcast: false)
            #expect(map.entryCount == 60_000 * perDigest)
            #expect(map.digestCount == 60_000)
            let perEntry = Double(map.approximateBytes) / Double(map.entryCount)
            #expect(perEntry <= Double(bound), "\(perDigest) holder(s) per digest: \(perEntry) bytes per entry")
        }
    }

    @Test("random gains, losses, deaths and expiry agree with a plain dictionary model", arguments: [UInt64(1), 2, 3])
    func matchesModel(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var config = LocalityMap.Configuration()
        config.ttl = .seconds(50)
        var map = LocalityMap(myself: node("me"), configuration: config)
        struct Fact { var present: Bool; var version: UInt64; var at: Duration }
        var model: [NodeID: [Int: Fact]] = [:]
        let holders = (0..<6).map { node("h\($0)") }
        var dead: Set<NodeID> = []
        var versions: [NodeID: UInt64] = [:]
        var now = Duration.seconds(1)
        for step in 0..<6000 {
            now += .milliseconds(Int64(rng.next() % 40))
            let h = holders[Int(rng.next() % 6)]
            let d = Int(rng.next() % 300)
            switch rng.next() % 20 {
            case 0:
                map.removeHolder(h); dead.insert(h); model[h] = nil
            case 1:
                map.readmitHolder(h); dead.remove(h)
            case 2:
                map.expire(now: now, force: true)
            default:
                let v = versions[h, default: 0] + 1 + rng.next() % 3
                versions[h] = v
                let stale = rng.next() % 5 == 0   // an old fact arriving late
                let version = stale && v > 3 ? v - 3 : v
                let present = rng.next() % 4 != 0
                let age = UInt32(rng.next() % 3000)
                map.merge([LocalityUpdate(holder: h, digest: digest(d), present: present, version: version, ageMs: age)], now: now, rebroadcast: step % 2 == 0)
                guard !dead.contains(h) else { break }
                let at = now - .milliseconds(Int64(age))
                if let old = model[h]?[d] {
                    if version > old.version { model[h]![d] = Fact(present: present, version: version, at: at) }
                    else if version == old.version, at > old.at { model[h]![d]!.at = at }
                } else {
                    model[h, default: [:]][d] = Fact(present: present, version: version, at: at)
                }
            }
            if step % 97 == 0 {
                for d in 0..<300 {
                    let expected = holders.filter { h in
                        guard let f = model[h]?[d] else { return false }
                        return f.present && f.at + config.ttl > now
                    }.sorted()
                    #expect(map.holders(of: digest(d), now: now) == expected, "step \(step) digest \(d)")
                }
            }
        }
    }

    @Test("versions compare across the 32-bit wrap, and times across the 49-day epoch rebase")
    func wrapAndRebase() {
        let h = node("h")
        var map = LocalityMap(myself: node("me"))
        let d = digest(1)
        map.merge([LocalityUpdate(holder: h, digest: d, present: true, version: UInt64(UInt32.max), ageMs: 0)], now: .seconds(1), rebroadcast: false)
        map.merge([LocalityUpdate(holder: h, digest: d, present: false, version: UInt64(UInt32.max) + 2, ageMs: 0)], now: .seconds(2), rebroadcast: false)
        #expect(map.holders(of: d, now: .seconds(2)).isEmpty)   // the later version wins past the wrap
        // Sixty days later (past 2^32 ms), facts are kept and expire as before.
        let later = Duration.seconds(60 * 86_400)
        map.merge([LocalityUpdate(holder: h, digest: d, present: true, version: UInt64(UInt32.max) + 3, ageMs: 1000)], now: later, rebroadcast: false)
        #expect(map.holders(of: d, now: later) == [h])
        #expect(map.holders(of: d, now: later + .seconds(598)) == [h])
        #expect(map.holders(of: d, now: later + .seconds(599)).isEmpty)
        #expect(map.fullStateUpdates(now: later).map(\.ageMs) == [1000])
    }

    @Test("push-pull relays the freshest facts still held, from the ring of facts learned last")
    func relaysFromRing() {
        var config = LocalityMap.Configuration()
        config.pushPullRelayLimit = 3
        var map = LocalityMap(myself: node("me"), configuration: config)
        for i in 0..<5 {
            map.merge([LocalityUpdate(holder: node("a"), digest: digest(i), present: true, version: UInt64(i + 1), ageMs: 0)], now: .seconds(Int64(i + 1)), rebroadcast: false)
        }
        #expect(map.fullStateUpdates(now: .seconds(6)).map(\.digest) == [digest(4), digest(3), digest(2)])
        map.merge([LocalityUpdate(holder: node("a"), digest: digest(3), present: false, version: 9, ageMs: 0)], now: .seconds(7), rebroadcast: false)
        #expect(map.fullStateUpdates(now: .seconds(7)).map(\.digest) == [digest(4), digest(2)])
        map.removeHolder(node("a"))
        #expect(map.fullStateUpdates(now: .seconds(7)).isEmpty)
    }
}
