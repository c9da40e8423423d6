import BlobStore
import CacheNode
import MeshShell
import CacheRoutes
import CacheMeshClient
import Foundation
import MeshGRPC
import MeshHTTP
import MeshHTTP2
import NIOCore
import REAPI
import Synchronization
import Testing
import TestSupport

/// An origin and three peers as real processes on loopback, mTLS, from a generated topology.
final class TestMesh: @unchecked Sendable {
    let dir: TempDir
    let names = ["origin", "peer1", "peer2", "peer3"]
    var ports: [String: Int] = [:]
    var children: [String: ChildProcess] = [:]
    let certs: Certs

    struct Options {
        /// `[fetch]` strategy and transport between nodes.
        var strategy = "hedged"
        var transport = "quic"
        /// Nodes that advertise a QUIC endpoint nobody listens on (UDP "blocked").
        var quicBlocked: Set<String> = []
        /// Extra TOML lines per node (e.g. advertise addresses of a relay in front of it).
        var extra: [String: String] = [:]
        /// Ports to use (e.g. chosen before a relay is started); free ports otherwise.
        var ports: [String: Int] = [:]
        var writeThrough = false
        /// R and W of the topology.
        var replication = 2
        var writeQuorum = 2
        var logLevel = "info"
        /// `[repair] interval_seconds` (nil: the default).
        var repairInterval: Int?
        /// `[repair] enabled = false`: placed blobs stay where they were put (tests of other
        /// features that place blobs off their owners on purpose).
        var repairEnabled = true
        /// Nodes with role = "origin" (more than one needs `tables` with `[origin] backend = "s3"`).
        var origins: Set<String> = ["origin"]
        /// TOML tables added to the topology before the nodes (e.g. `[origin]`).
        var tables = ""
    }

    let logLevel: String

    init(_ options: Options = Options()) async throws {
        logLevel = options.logLevel
        dir = try TempDir("mesh")
        certs = try Certs.shared()
        // Node certificates (CN = node name, OU=node) signed by the shared test CA.
        try await NodeCertificates.shared.ensure(names, in: certs.dir)
        // Distinct ports: a port freed by one freePort() call can be handed out by the next.
        for n in names {
            var port = try options.ports[n] ?? Self.freePort()
            while options.ports[n] == nil && (ports.values.contains(port) || options.ports.values.contains(port)) { port = try Self.freePort() }
            ports[n] = port
        }
        var toml = "name = \"it-mesh\"\nca = \"\(certs.ca)\"\nreplication = \(options.replication)\nwrite_quorum = \(options.writeQuorum)\n"
        if options.repairInterval != nil || !options.repairEnabled {
            toml += "[repair]\nenabled = \(options.repairEnabled)\n"
            if let i = options.repairInterval { toml += "interval_seconds = \(i)\n" }
        }
        toml += "[fetch]\nstrategy = \"\(options.strategy)\"\ntransport = \"\(options.transport)\"\norigin_write_through = \(options.writeThrough)\n"
        toml += options.tables
        for n in names {
            // Every node serves HTTP/3 on the UDP port with the TCP port's number.
            var quic = "quic = \"127.0.0.1:\(ports[n]!)\""
            if options.quicBlocked.contains(n) { quic += "\nadvertise_quic = \"127.0.0.1:\(try Self.freePort(udp: true))\"" }
            toml += """

            [[nodes]]
            name = "\(n)"
            role = "\(options.origins.contains(n) ? "origin" : "peer")"
            tcp = "127.0.0.1:\(ports[n]!)"
            \(quic)
            data_dir = "\(dir.file(n))"
            max_bytes = "256M"
            cert = "\(certs.path("\(n).pem"))"
            key = "\(certs.path("\(n).key"))"
            seeds = \(n == "origin" ? "[]" : "[\"origin\", \"peer1\"]")
            \(options.extra[n] ?? "")

            """
        }
        try toml.write(toFile: dir.file("topology.toml"), atomically: true, encoding: .utf8)
        for n in names { try start(n) }
        for n in names {
            let up = await eventually(timeout: 30) { self.children[n]!.stdout.contains("listening tcp=") }
            guard up else { throw HarnessError("\(n) did not start: \(children[n]!.stderr.suffix(2000))") }
        }
    }

    /// Wait until every node lists all four members alive; throws (with every node's view) if
    /// that does not happen within 30 s, or if a status call fails.
    func converge() async throws {
        for n in names {
            let ok = try await eventually(timeout: 30) { try await self.meshStatus(n).alive.count == self.names.count }
            guard ok else { throw HarnessError("membership did not converge at \(n): \(try await status(n))\n\(logs())") }
        }
    }

    /// `GET /mesh/status` of node `n`, decoded (throws if the call or the decoding fails).
    func meshStatus(_ n: String) async throws -> MeshStatus {
        try NodeStatus.decoder().decode(MeshStatus.self, from: Data(try await status(n).utf8))
    }

    /// Waits until every node's locality map holds exactly the entries for blobs on `holders`
    /// (one list of holders per blob): a node's map lists the other holders, not itself.
    func waitForLocality(holders: [[String]], timeout: Double = 20) async throws {
        for n in names {
            try await waitForLocality(n, entries: holders.reduce(0) { $0 + $1.filter { $0 != n }.count }, timeout: timeout)
        }
    }

    /// Waits until node `n`'s locality map holds exactly `entries` (digest, holder) entries (other
    /// holders only: its own copies are not in its map); throws with the last count otherwise.
    func waitForLocality(_ n: String, entries: Int, timeout: Double = 20) async throws {
        var last = -1
        let ok = try await eventually(timeout: timeout) {
            last = try await self.meshStatus(n).localityEntries
            return last == entries
        }
        guard ok else { throw HarnessError("\(n) has \(last) locality entries, expected \(entries)\n\(logs())") }
    }

    /// Place a copy of `data` on exactly `nodes` (mirror copies: no further mirroring), as a node.
    func place(_ data: [UInt8], on nodes: [String]) async throws -> Digest {
        var digest = Digest.empty
        for n in nodes {
            let c = try await client(n, as: "peer1")
            let hash = SHA256.hex(data)
            let r = try await c.connection.request(.init(method: "PUT", path: "/cas/\(hash)",
                                                         headers: ["content-length": String(data.count), Mirror.header: "1"]),
                                                   body: .bytes(ByteBuffer(bytes: data)))
            // 201: a new copy (every caller places fresh bytes on nodes that lack them).
            guard r.status == 201 else { throw HarnessError("place on \(n): HTTP \(r.status)") }
            _ = try? await r.body.collect(upTo: 1 << 16)
            digest = Digest(hash: hash, size: Int64(data.count))!
            await c.close()
        }
        return digest
    }

    /// The value of one sample at node `n`, e.g. `cachemesh_fetch_wins_total{source="peer"}`:
    /// exactly that name and label set (parsed, so `x 1` never matches `x 10` and `{a="1"}` never
    /// matches `{a="1",b="2"}`); 0 if the node exports no such series (a counter never incremented).
    func metric(_ n: String, _ sample: String) async throws -> Double {
        let c = try await client(n)
        defer { Task { await c.close() } }
        let response = try await c.getText("/metrics")
        guard response.status == 200 else { throw HarnessError("GET /metrics at \(n): HTTP \(response.status)") }
        let wanted = try PrometheusText(parsing: sample + " 0").samples[0]
        return try PrometheusText(parsing: response.body).value(wanted.name, labels: wanted.labels) ?? 0
    }

    func start(_ n: String) throws {
        children[n] = try ChildProcess([try Paths.cachemesh(), "node", "--topology", dir.file("topology.toml"), "--name", n, "--log-level", logLevel])
    }

    /// A port free for both TCP and UDP, outside the ephemeral range (`LoopbackPorts`).
    static func freePort(udp: Bool = false) throws -> Int {
        guard let p = LoopbackPorts.pick() else { throw HarnessError("no free port") }
        return p
    }

    func client(_ n: String, as who: String = "client") async throws -> CacheClient {
        try await CacheClient.connect(ClientOptions(server: HostPort(host: "127.0.0.1", port: ports[n]!),
                                                    certificate: certs.path("\(who).pem"), privateKey: certs.path("\(who).key"), ca: certs.ca))
    }

    func holds(_ n: String, _ hash: String) -> Bool {
        FileManager.default.fileExists(atPath: dir.file("\(n)/cas/\(hash.prefix(2))/\(hash)"))
    }

    /// The raw `GET /mesh/status` body; throws unless it answered 200 (a failed call must not
    /// read as "no entries" or "not converged yet").
    func status(_ n: String) async throws -> String {
        let c = try await client(n, as: "peer1")
        defer { Task { await c.close() } }
        let r = try await c.getText("/mesh/status")
        guard r.status == 200 else { throw HarnessError("GET /mesh/status at \(n): HTTP \(r.status): \(r.body.prefix(300))") }
        return r.body
    }

    func stopAll() {
        for (_, c) in children { c.killAndWait() }
        dir.remove()
    }

    func logs() -> String {
        names.map { "== \($0)\n" + (children[$0]?.stderr.suffix(1500) ?? "") }.joined(separator: "\n")
    }
}

@Suite("Mesh of four real nodes", .serialized)
struct MeshTests {
    @Test("PUT at one peer: W = 2 copies; locality converges (exact entries); a peer fetches a blob from a holder its rendezvous guesses would not find; client certs get 403 on mesh routes; kill -9 keeps blobs fetchable (R restoration: deathRestoresR)",
          .timeLimit(.minutes(5)))
    func meshBehaviour() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }

        // Membership converges (every node lists all four alive).
        try await mesh.converge()

        // A client certificate may not use mesh-internal routes.
        let client1 = try await mesh.client("peer1")
        #expect(try await client1.getText("/mesh/status").status == 403)

        // PUT at peer1 of a blob whose two owners are peer1 and another peer (not the origin):
        // W = 2, so when it is acknowledged the other owner holds it too, and nobody else does.
        var data = randomBytes(2_000_000)
        while true {
            let owners = PlacementOracle.owners(of: SHA256.hex(data), among: mesh.names, replicas: 2)
            if owners.contains("peer1") && !owners.contains("origin") { break }
            data = randomBytes(2_000_000)
        }
        let digest = try await client1.put(bytes: data)
        let holders = mesh.names.filter { mesh.holds($0, digest.hash) }
        let placed = [holders]
        #expect(Set(holders) == Set(PlacementOracle.owners(of: digest.hash, among: mesh.names, replicas: 2)), "holders: \(holders)")
        await client1.close()

        // Locality converges: every node's map holds exactly the (blob, other holder) entries.
        try await mesh.waitForLocality(holders: placed)

        // A blob on one peer that the reader's rendezvous guesses (the R best-ranked members) do
        // not include, nor the origin: the reader finds it only through the locality map.
        let reader = try #require(mesh.names.first { $0 != "origin" && !holders.contains($0) })
        var lone: [UInt8] = []
        var holder = ""
        for _ in 0..<100 {
            lone = randomBytes(500_000)
            let ranked = PlacementOracle.rank(SHA256.hex(lone), over: mesh.names)
            if let h = ranked.dropFirst(2).first(where: { $0 != "origin" && $0 != reader }) { holder = h; break }
        }
        try #require(!holder.isEmpty)
        let loneDigest = try await mesh.place(lone, on: [holder])
        #expect(mesh.names.filter { mesh.holds($0, loneDigest.hash) } == [holder])
        try await mesh.waitForLocality(holders: placed + [[holder]])

        let c = try await mesh.client(reader)
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(loneDigest.hash)"))
        #expect(r.status == 200)
        // From that peer, over HTTP/3 (QUIC is preferred between nodes).
        #expect(r.headers["x-cachemesh-source"] == "peer:\(holder) via quic", "source: \(r.headers["x-cachemesh-source"] ?? "-")")
        #expect(Array(try await r.body.collect(upTo: 4 << 20).readableBytesView) == lone)
        await c.close()
        #expect(try await mesh.metric(reader, "cachemesh_fetch_wins_total{source=\"peer\"}") == 1)
        #expect(try await mesh.metric(reader, "cachemesh_fetch_wins_total{source=\"origin\"}") == 0)

        // kill -9 one holder of the first blob: it stays fetchable and the member is declared dead.
        // (`deathRestoresR` tests re-replication.)
        let victim = try #require(holders.first { $0 != "peer1" })
        let survivorHolder = "peer1"
        mesh.children[victim]!.signal(SIGKILL)
        _ = await mesh.children[victim]!.waitForExit(timeout: 10)
        let dead = try await eventually(timeout: 30) { try await mesh.meshStatus(survivorHolder).status(of: victim) == "dead" }
        let survivorView = try await mesh.status(survivorHolder)
        #expect(dead, "\(victim) not declared dead: \(survivorView)")
        let other = try #require(mesh.names.first { $0 != victim && $0 != survivorHolder })
        let c2 = try await mesh.client(other)
        let tmp = mesh.dir.file("got")
        _ = try await c2.get(hash: digest.hash, to: tmp)
        #expect(try await sha256sum(tmp) == digest.hash)
        await c2.close()
    }

    @Test("SIGTERM of a peer: its connections get GOAWAY, it hands off exactly its sole copy (not blobs others hold), exits 0, and the others see it leave",
          .timeLimit(.minutes(3)))
    func sigtermHandsOffSoleCopies() async throws {
        // Anti-entropy off: a pass before the SIGTERM would copy the sole blob onto its owners.
        var options = TestMesh.Options()
        options.repairEnabled = false
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        try await mesh.converge()
        let drainer = "peer2"
        // One blob only the drainer holds, one it shares with peer3 (mirror copies: nothing more).
        let sole = try await mesh.place(randomBytes(300_000), on: [drainer])
        let shared = try await mesh.place(randomBytes(200_000), on: [drainer, "peer3"])
        #expect(mesh.names.filter { mesh.holds($0, sole.hash) } == [drainer])
        #expect(mesh.names.filter { mesh.holds($0, shared.hash) } == [drainer, "peer3"])
        // Everyone knows where both blobs are before the drain (the drainer: peer3's copy).
        try await mesh.waitForLocality(holders: [[drainer], [drainer, "peer3"]])

        // An open client connection to the drainer: it must be told to go away, not cut.
        let c = try await mesh.client(drainer)
        let h2 = try #require(c.connection as? HTTP2Connection)
        #expect(try await c.getText("/healthz").status == 200)
        #expect(!h2.receivedGoaway)
        mesh.children[drainer]!.signal(SIGTERM)
        let goaway = await eventually(timeout: 20) { h2.receivedGoaway }
        #expect(goaway, "no GOAWAY on the drainer's client connection")
        await c.close()

        let exit = await mesh.children[drainer]!.waitForExit(timeout: 60)
        let log = mesh.children[drainer]!.stderr
        #expect(exit?.status == 0 && exit?.signalled == false, "drainer exit \(String(describing: exit))\n\(log.suffix(1500))")
        // Exactly one hand-off line, with exactly 1 ("off 1 sole copy" cannot match 0, 10 or 11).
        let handOffLines = log.split(separator: "\n").filter { $0.contains("drain: handed off ") }
        #expect(handOffLines.count == 1 && handOffLines[0].contains("drain: handed off 1 sole copy"), "\(log.suffix(1500))")
        // The sole copy lives on elsewhere. (The shared blob was not handed off — the count above
        // says so; peer3 may still copy it once it sees the drainer leave: that is R restoration.)
        let soleHolders = mesh.names.filter { $0 != drainer && mesh.holds($0, sole.hash) }
        #expect(!soleHolders.isEmpty, "the sole copy was lost with the drained node")
        #expect(mesh.holds("peer3", shared.hash))
        // The others see it leave (left, not dead).
        let left = try await eventually(timeout: 20) { try await mesh.meshStatus("origin").status(of: drainer) == "left" }
        let originView = try await mesh.status("origin")
        #expect(left, "origin's view after the drain: \(originView)\n\(mesh.logs())")
    }

    @Test("cachemesh status with a client certificate: a table with role, listeners, members with state and transport, fetch wins; --json for scripts",
          .timeLimit(.minutes(5)))
    func statusForPeople() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        // One blob written at peer1 and fetched at a peer without a copy: one fetch won by a peer or the origin.
        // A blob peer1 owns (with one other node), so its one mirror copy leaves peer2 or peer3
        // without it (a writer that is not an owner copies to both owners).
        var bytes = randomBytes(50_000)
        while !PlacementOracle.owners(of: SHA256.hex(bytes), among: mesh.names, replicas: 2).contains("peer1") { bytes = randomBytes(50_000) }
        let c1 = try await mesh.client("peer1")
        let d = try await c1.put(bytes: bytes)
        await c1.close()
        let target = try #require(["peer2", "peer3"].first { !mesh.holds($0, d.hash) }, "W = 2 left both peer2 and peer3 a copy")
        let ct = try await mesh.client(target)
        #expect(try await ct.fetch("/cas/\(d.hash)").status == 200)
        await ct.close()

        let port = mesh.ports[target]!
        let cli = [try Paths.cachemesh(), "status", "--server", "127.0.0.1:\(port)", "--ca", mesh.certs.ca,
                   "--cert", mesh.certs.path("client.pem"), "--key", mesh.certs.path("client.key")]
        let json = try await run(cli + ["--json"])
        #expect(json.status == 0, "\(json)")
        let s = try NodeStatus.decoder().decode(NodeStatus.self, from: Data(json.stdout.utf8))
        #expect(s.name == target && s.role == "peer" && s.you.role == "client" && s.you.commonName == "client")
        #expect(s.listen.tcp == "127.0.0.1:\(port)" && s.listen.quic == "127.0.0.1:\(port)", "\(s.listen)")
        let m = try #require(s.mesh)
        #expect(m.topology == "it-mesh" && m.replication == 2 && m.writeQuorum == 2 && m.transport == "quic" && m.liveMembers == 4)
        let members = try #require(m.members, "a client certificate sees the members")
        #expect(members.map(\.name) == mesh.names, "\(members)")
        for member in members {
            #expect(member.status == "alive", "\(member)")
            #expect(member.transport == (member.name == target ? "self" : "quic"), "\(member)")
            #expect(member.role == (member.name == "origin" ? "origin" : "peer"), "\(member)")
            #expect(member.tcp == "127.0.0.1:\(mesh.ports[member.name]!)", "\(member)")
        }
        #expect(m.fetch.peerWins + m.fetch.originWins == 1 && m.fetch.failures == 0, "\(m.fetch)")
        #expect(s.store.blobs >= 1 && s.store.hitRatio != nil, "\(s.store)")

        let table = try await run(cli)
        #expect(table.status == 0, "\(table)")
        let lines = table.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ") }
        #expect(lines.contains { $0.hasPrefix("node \(target) (peer in mesh \"it-mesh\") at 127.0.0.1:\(port), up ") && $0.hasSuffix(", healthy") }, "\(table.stdout)")
        #expect(lines.contains("listeners tcp 127.0.0.1:\(port), quic 127.0.0.1:\(port)"), "\(table.stdout)")
        #expect(lines.contains { $0.hasPrefix("fetch wins peers ") }, "\(table.stdout)")
        #expect(lines.contains("MEMBER ROLE STATE TRANSPORT TCP QUIC"), "\(table.stdout)")
        for n in mesh.names {
            let p = mesh.ports[n]!
            let row = "\(n) \(n == "origin" ? "origin" : "peer") alive \(n == target ? "self" : "quic") 127.0.0.1:\(p) 127.0.0.1:\(p)"
            #expect(lines.contains(row), "'\(row)' missing:\n\(table.stdout)")
        }
    }

    @Test("kill -9 of one of a blob's two owners: the surviving owner copies it to the next-ranked node, so its R = 2 live owners hold it again — for a blob no other node ever fetched",
          .timeLimit(.minutes(3)))
    func deathRestoresR() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        // A blob whose two owners (rendezvous over all four names) are peer2 and peer3, placed on
        // exactly them (mirror copies: nothing mirrors further, nobody reads it), so the
        // placement holds and nothing moves it before the death.
        var data = randomBytes(300_000)
        while Set(PlacementOracle.owners(of: SHA256.hex(data), among: mesh.names, replicas: 2)) != ["peer2", "peer3"] {
            data = randomBytes(300_000)
        }
        let digest = try await mesh.place(data, on: ["peer2", "peer3"])
        #expect(mesh.names.filter { mesh.holds($0, digest.hash) } == ["peer2", "peer3"])
        // Everyone learns both holders before the death.
        try await mesh.waitForLocality(holders: [["peer2", "peer3"]])
        mesh.children["peer3"]!.signal(SIGKILL)
        _ = await mesh.children["peer3"]!.waitForExit(timeout: 10)
        let dead = try await eventually(timeout: 30) { try await mesh.meshStatus("peer2").status(of: "peer3") == "dead" }
        #expect(dead)
        let survivors = mesh.names.filter { $0 != "peer3" }
        let owners = PlacementOracle.owners(of: digest.hash, among: survivors, replicas: 2)
        #expect(owners.contains("peer2") && owners.count == 2)
        let restored = await eventually(timeout: 30) { owners.allSatisfy { mesh.holds($0, digest.hash) } }
        let live = survivors.filter { mesh.holds($0, digest.hash) }
        #expect(restored, "live copies: \(live), owners \(owners)\n\(mesh.logs())")
        // peer2, the surviving owner, was responsible: it made exactly one copy and says so.
        let logged = await eventually(timeout: 10) {
            mesh.children["peer2"]!.stderr.contains("anti-entropy (peer3 dead): 1 of 1 blob(s) under-replicated, 1 copy made, 0 failed")
        }
        #expect(logged, "\(mesh.children["peer2"]!.stderr.suffix(1500))")
        #expect(live.sorted() == owners.sorted(), "a copy outside the owners: \(live)")
        #expect(try await mesh.metric("peer2", "cachemesh_antientropy_copies_total") == 1)
    }

    @Test("a frozen mirror target (SIGSTOP) does not hold writes: with W = 2 every PUT is acknowledged with a second live copy on another node",
          .timeLimit(.minutes(3)))
    func frozenMirrorTargetDoesNotHoldWrites() async throws {
        let mesh = try await TestMesh()
        defer {
            mesh.children["peer3"]?.signal(SIGCONT)
            mesh.stopAll()
        }
        try await mesh.converge()
        mesh.children["peer3"]!.signal(SIGSTOP)
        let c = try await mesh.client("peer1")
        var slowest: Duration = .zero
        for _ in 0..<20 {
            // A blob whose first mirror candidate from peer1 is peer3, so every PUT aims a copy at
            // the frozen node (until it turns suspect and ranks last).
            var data = randomBytes(50_000)
            while PlacementOracle.rank(SHA256.hex(data), over: ["origin", "peer2", "peer3"]).first != "peer3" { data = randomBytes(50_000) }
            let started = ContinuousClock.now
            let d = try await c.put(bytes: data)
            slowest = max(slowest, ContinuousClock.now - started)
            let holders = mesh.names.filter { mesh.holds($0, d.hash) }
            // Acknowledged (W = 2): a second copy exists on a node that is not frozen.
            #expect(holders.contains("peer1") && holders.contains { $0 != "peer1" && $0 != "peer3" }, "holders \(holders)")
        }
        await c.close()
        // Before: a PUT whose mirror was the frozen node hung for the whole freeze (then 503).
        #expect(slowest < .seconds(15), "slowest PUT took \(slowest)")
        let hedged = try await mesh.metric("peer1", "cachemesh_mirror_hedges_total")
        let failures = try await mesh.metric("peer1", "cachemesh_mirror_failures_total")
        // With three other members, rendezvous aims about a third of the blobs at peer3 (none of 20: p ≈ 0.03%).
        #expect(hedged + failures >= 1, "no copy was ever redirected: hedges \(hedged), failures \(failures)")
    }

    @Test("a draining node answers 503 (go elsewhere), not 404, for a blob it does not hold",
          .timeLimit(.minutes(3)))
    func drainingNodeSendsClientsElsewhere() async throws {
        // Anti-entropy off: it could copy the placed blobs onto peer2 (one of their owners).
        var options = TestMesh.Options()
        options.repairEnabled = false
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        try await mesh.converge()
        // Blobs the mesh holds, but not peer2 (each GET uses the next one: a GET served before the
        // drain began fetches its blob to peer2).
        var blobs: [Digest] = []
        for _ in 0..<40 { blobs.append(try await mesh.place(randomBytes(20_000), on: ["peer1", "origin"])) }
        let c = try await mesh.client("peer2")
        let warm = try await c.connection.request(.init(method: "HEAD", path: "/cas/\(blobs[0].hash)"))
        #expect(warm.status == 404)   // HEAD answers from the local store only
        mesh.children["peer2"]!.signal(SIGTERM)
        // Until its GOAWAY arrives the connection still takes requests: they must not get a 404
        // (HTTP) or NOT_FOUND (a gRPC ByteStream Read), but 503 / UNAVAILABLE.
        var statuses: [Int] = []
        var grpcCodes: [String] = []
        let grpc = GRPCClient(transport: c.connection)
        let deadline = ContinuousClock.now + .seconds(3)
        for (i, digest) in blobs.enumerated() where ContinuousClock.now < deadline && i % 2 == 0 && i + 1 < blobs.count {
            guard let r = try? await c.connection.request(.init(method: "GET", path: "/cas/\(digest.hash)")) else { break }
            statuses.append(r.status)
            _ = try? await r.body.collect(upTo: 1 << 20)
            let other = blobs[i + 1]
            do {
                _ = try await grpc.serverStreaming("/google.bytestream.ByteStream/Read",
                                                   Google_Bytestream_ReadRequest.with { $0.resourceName = "blobs/\(other.hash)/\(other.size)" },
                                                   as: Google_Bytestream_ReadResponse.self)
                grpcCodes.append("ok")
            } catch let s as GRPCStatus {
                grpcCodes.append("\(s.code)")
            } catch {
                break   // the connection went away (final GOAWAY)
            }
            if r.status == 503 && grpcCodes.last == "\(GRPCStatus.Code.unavailable)" { break }
        }
        await c.close()
        #expect(statuses.contains(503), "statuses while draining: \(statuses)")
        #expect(!statuses.contains(404), "statuses while draining: \(statuses)")
        #expect(grpcCodes.contains("\(GRPCStatus.Code.unavailable)"), "gRPC reads while draining: \(grpcCodes)")
        #expect(!grpcCodes.contains("\(GRPCStatus.Code.notFound)"), "gRPC reads while draining: \(grpcCodes)")
    }

    @Test("QUIC blocked to one peer (its advertised UDP port unreachable): fetches from it still succeed, over TCP",
          .timeLimit(.minutes(3)))
    func blockedQUICFallsBackToTCP() async throws {
        let mesh = try await TestMesh(.init(quicBlocked: ["peer2"]))
        defer { mesh.stopAll() }
        try await mesh.converge()
        // Held by peer2 alone; peer3 needs it.
        let blobs = [randomBytes(700_000), randomBytes(3_000)]
        var digests: [Digest] = []
        for b in blobs { digests.append(try await mesh.place(b, on: ["peer2"])) }
        // peer3 knows both (blob, peer2) entries before it asks.
        try await mesh.waitForLocality(holders: [["peer2"], ["peer2"]])
        let c = try await mesh.client("peer3")
        for (b, d) in zip(blobs, digests) {
            let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
            #expect(r.status == 200)
            #expect(r.headers["x-cachemesh-source"] == "peer:peer2 via tcp", "source: \(r.headers["x-cachemesh-source"] ?? "-")")
            #expect(Array(try await r.body.collect(upTo: 4 << 20).readableBytesView) == b)
        }
        await c.close()
        #expect(try await mesh.metric("peer3", "cachemesh_mesh_quic_fallbacks_total") >= 1)
        // Others still reach each other over QUIC.
        #expect(try await mesh.metric("peer3", "cachemesh_mesh_requests_total{transport=\"quic\"}") > 0)
    }

    @Test("kill -9 and restart of a peer on its ports: the others' stale QUIC connections to it fail at once (fallback to TCP, no stall), the first fetch succeeds, and its blobs come over QUIC again",
          .timeLimit(.minutes(3)))
    func restartedPeerIsReachedOverQUICAgain() async throws {
        // R = 1: no mirror copies and no re-replication (peer2's old incarnation is declared dead a
        // few seconds after the restart, which would copy peer2's sole blobs to peer3 and make a
        // fetch there local).
        let mesh = try await TestMesh(.init(replication: 1, writeQuorum: 1))
        defer { mesh.stopAll() }
        try await mesh.converge()
        /// One GET at peer3, no retry: it must answer 200 from peer2 the first time.
        func fetch(_ d: Digest) async throws -> (status: Int, source: String, body: [UInt8]) {
            let c = try await mesh.client("peer3")
            defer { Task { await c.close() } }
            let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
            return (r.status, r.headers["x-cachemesh-source"] ?? "-", Array(try await r.body.collect(upTo: 1 << 20).readableBytesView))
        }
        /// A blob whose rendezvous owner is peer2, so peer3 asks peer2 first without waiting for
        /// gossip to tell it where the blob is (the locality map of a restarted member churns:
        /// its old incarnation dies, its new one re-announces).
        func ownedByPeer2() -> [UInt8] {
            while true {
                let b = randomBytes(40_000)
                if PlacementOracle.rank(SHA256.hex(b), over: mesh.names).first == "peer2" { return b }
            }
        }
        // peer3 fetches a blob held by peer2 alone: it now has a QUIC connection to peer2.
        let a = ownedByPeer2()
        let da = try await mesh.place(a, on: ["peer2"])
        let first = try await fetch(da)
        #expect(first.status == 200 && first.body == a, "\(mesh.logs())")
        #expect(first.source == "peer:peer2 via quic")
        let fallbacksBefore = try await mesh.metric("peer3", "cachemesh_mesh_quic_fallbacks_total")
        func fallbackLines() -> [Substring] {
            mesh.children["peer3"]!.stderr.split(separator: "\n").filter { $0.contains("QUIC to peer2 failed, using TCP") }
        }
        let fallbackLinesBefore = fallbackLines().count
        let stallsBefore = try await mesh.metric("peer3", "cachemesh_mesh_stalled_requests_total")

        // A crash and a restart: same ports, same key, same data; the process knows no connection.
        mesh.children["peer2"]!.killAndWait()
        try mesh.start("peer2")
        let up = await eventually(timeout: 30) { mesh.children["peer2"]!.stdout.contains("listening tcp=") }
        try #require(up, "peer2 did not restart: \(mesh.children["peer2"]!.stderr.suffix(2000))")
        // The first request from peer3 that meets its stale connection (a fetch or gossip,
        // whichever comes first) draws a Stateless Reset from the restarted peer2 (same reset
        // secret, from the same key) and fails at once; it goes over TCP instead (a GET can be
        // replayed), and later requests get a fresh QUIC connection. Without the reset the stale
        // connection would only time out: a fetch on it stalls, its leg fails, the fetch 404s.
        let b = ownedByPeer2(), c = ownedByPeer2()
        let db = try await mesh.place(b, on: ["peer2"])
        let second = try await fetch(db)
        #expect(second.status == 200 && second.body == b, "HTTP \(second.status)\n\(mesh.logs())")
        #expect(second.source.hasPrefix("peer:peer2 via "), "\(second.source)")
        let dc = try await mesh.place(c, on: ["peer2"])
        let third = try await fetch(dc)
        #expect(third.status == 200 && third.body == c, "\(mesh.logs())")
        #expect(third.source == "peer:peer2 via quic", "\(mesh.logs())")
        // The stale connection was ended by a Stateless Reset from the restarted peer2 (with a
        // secret that did not survive the restart it is only dropped seconds later, and every
        // request queued on it meanwhile falls back: 17 in one run). Each request in flight on it
        // at that moment — one, or two when gossip was beside a fetch — fell back to TCP once,
        // at the request stage, and nothing else did; nothing stalled.
        let peer3Log = mesh.children["peer3"]!.stderr
        let remote = "remote=127.0.0.1:\(mesh.ports["peer2"]!)"
        let resets = peer3Log.split(separator: "\n").filter {
            $0.contains("stateless reset") && $0.split(separator: " ").contains { $0 == remote }
        }
        try #require(resets.count == 1, "peer3's connection to peer2 was not reset once: \(resets)\n\(peer3Log.suffix(3000))")
        // "QUIC connection failed with N request(s) in flight: …"
        let inFlight = resets[0].range(of: "failed with ").flatMap { r in Int(resets[0][r.upperBound...].prefix { $0.isNumber }) }
        let fallbacks = try await mesh.metric("peer3", "cachemesh_mesh_quic_fallbacks_total") - fallbacksBefore
        let lines = fallbackLines().dropFirst(fallbackLinesBefore)
        #expect(inFlight != nil && fallbacks == Double(inFlight!) && lines.count == inFlight!, "\(fallbacks) fallbacks for \(resets[0]): \(lines)")
        #expect(lines.allSatisfy { $0.contains("stage=request") }, "\(lines)")
        #expect(try await mesh.metric("peer3", "cachemesh_mesh_stalled_requests_total") - stallsBefore == 0, "\(peer3Log.suffix(2000))")
    }

    @Test("the origin behind a slow link (a 100 ms, 16 Mbit/s relay in front of it): the peer leg wins, the origin leg's stream is cancelled (the relay carries a fraction of the blob)",
          .timeLimit(.minutes(3)))
    func slowOriginLosesTheRace() async throws {
        let originPort = try TestMesh.freePort()
        let relay = try await TestRelay.start(targetPort: originPort, profile: ["--delay", "100ms", "--rate", "16mbit"])
        var relayStopped = false
        defer { if !relayStopped { relay.child.killAndWait() } }
        // Every other node reaches the origin only through the relay (TCP and QUIC).
        let mesh = try await TestMesh(.init(strategy: "immediate", extra: [
            "origin": "advertise_tcp = \"\(relay.address)\"\nadvertise_quic = \"\(relay.address)\"",
        ], ports: ["origin": originPort]))
        defer { mesh.stopAll() }
        try await mesh.converge()
        // 24 MB: at 2 MB/s the origin would need 12 s to send it all; an origin leg that is not
        // cancelled keeps its stream flowing (up to the 16 MiB QUIC stream window) after the race.
        let size = 24_000_000
        let data = randomBytes(size)
        let d = try await mesh.place(data, on: ["origin", "peer1"])
        // peer3 knows both holders (two (digest, holder) entries) before it asks.
        try await mesh.waitForLocality("peer3", entries: 2)
        let c = try await mesh.client("peer3")
        let r = try await c.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
        #expect(r.status == 200)
        #expect(r.headers["x-cachemesh-source"]?.hasPrefix("peer:peer1") == true, "source: \(r.headers["x-cachemesh-source"] ?? "-")")
        #expect(Array(try await r.body.collect(upTo: 32 << 20).readableBytesView) == data)
        await c.close()
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_wins_total{source=\"peer\"}") == 1)
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_wins_total{source=\"origin\"}") == 0)
        // All legs started at once; the origin's was still in flight when peer1's answer won the
        // race (the first response head commits it). A rendezvous guess that does not hold the
        // blob may still be in flight too and is cancelled with it: at least the origin's leg.
        #expect(try await mesh.metric("peer3", "cachemesh_fetch_legs_cancelled_total") >= 1)
        // Give an uncancelled stream time to show: 5 s more at 2 MB/s would carry 10 MB.
        try await Task.sleep(for: .seconds(5))
        let (status, counters) = await relay.stop()
        relayStopped = true
        #expect(status == 0, "relay: \(counters)")
        let tcpBytes = try #require(TestRelay.counter("bytes_to_client", section: "tcp", in: counters), "\(counters)")
        let udpBytes = try #require(TestRelay.counter("bytes_to_client", section: "udp", in: counters), "\(counters)")
        let toClient = tcpBytes + udpBytes
        #expect(toClient > 0, "relay counters: \(counters)")
        #expect(toClient < 4_000_000, "the relay carried \(toClient) bytes from the origin after a cancelled leg: \(counters)")
    }

    @Test("origin write-through: with R = 1 and W = 1 a PUT at a peer is acknowledged only once the origin — behind a 150 ms relay — holds it",
          .timeLimit(.minutes(3)))
    func originWriteThrough() async throws {
        let originPort = try TestMesh.freePort()
        let relay = try await TestRelay.start(targetPort: originPort, profile: ["--delay", "150ms"])
        defer { relay.child.killAndWait() }
        // R = 1, W = 1: no mirror copy at all, so the origin's copy can only come from write-through;
        // the relay makes that copy slower than the local write, so an acknowledgement that did
        // not wait for it comes before the origin holds the blob.
        let mesh = try await TestMesh(.init(extra: [
            "origin": "advertise_tcp = \"\(relay.address)\"\nadvertise_quic = \"\(relay.address)\"",
        ], ports: ["origin": originPort], writeThrough: true, replication: 1, writeQuorum: 1))
        defer { mesh.stopAll() }
        try await mesh.converge()
        let c = try await mesh.client("peer3")
        for size in [10_000, 1_500_000, 10_000, 300_000] {
            let d = try await c.put(bytes: randomBytes(size))
            #expect(mesh.names.filter { mesh.holds($0, d.hash) } == ["origin", "peer3"], "holders at acknowledgement of \(size) bytes")
        }
        await c.close()
    }

    @Test("SIGTERM of a peer while a client (no failover) has GETs and PUTs in flight on it: GOAWAY, every one of them completes with 2xx, exit 0, nothing lost",
          .timeLimit(.minutes(5)))
    func drainUnderLoad() async throws {
        let mesh = try await TestMesh()
        defer { mesh.stopAll() }
        try await mesh.converge()
        let drainer = "peer2"
        // Blobs to read from the drainer (its own copies).
        var reads: [(Digest, [UInt8])] = []
        for _ in 0..<4 {
            let b = randomBytes(6_000_000)
            reads.append((try await mesh.place(b, on: [drainer]), b))
        }
        // One HTTP/2 connection to the drainer, nothing else: an error or a reset reaches the test.
        let client = try await mesh.client(drainer)
        let h2 = try #require(client.connection as? HTTP2Connection)
        // GETs: the response has begun (head and first bytes here), the rest is held back by
        // flow control while the test does not read.
        var gets: [(status: Int, body: HTTPInboundBody, first: [UInt8])] = []
        for (d, _) in reads {
            let r = try await client.connection.request(.init(method: "GET", path: "/cas/\(d.hash)"))
            let first = try await r.body.next().map { Array($0.readableBytesView) } ?? []
            #expect(!first.isEmpty && first.count < 6_000_000)
            gets.append((r.status, r.body, first))
        }
        // PUTs: head and the first 1 MB sent; the node holds each upload (a temp file) before the drain.
        let puts = (0..<4).map { _ in randomBytes(3_000_000) }
        var streams: [HTTPOutboundStream] = []
        var putTasks: [Task<Int, any Error>] = []
        for p in puts {
            let out = HTTPOutboundStream()
            streams.append(out)
            let head = HTTPRequestHead(method: "PUT", path: "/cas/\(SHA256.hex(p))", headers: ["content-length": String(p.count)])
            putTasks.append(Task {
                let r = try await client.connection.request(head, body: .stream(out))
                _ = try await r.body.collect(upTo: 1 << 16)
                return r.status
            })
            try await out.write(ByteBuffer(bytes: p[..<1_000_000]))
        }
        let tmp = mesh.dir.file("\(drainer)/tmp")
        let held = await eventually(timeout: 30) { ((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? []).count == puts.count }
        try #require(held, "the drainer does not hold \(puts.count) uploads: \((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [])")

        mesh.children[drainer]!.signal(SIGTERM)
        let goaway = await eventually(timeout: 20) { h2.receivedGoaway }
        #expect(goaway, "no GOAWAY from the draining node")

        // Everything started before the drain completes on the draining node itself.
        for (p, out) in zip(puts, streams) {
            try await out.write(ByteBuffer(bytes: p[1_000_000...]))
            out.finish()
        }
        for (i, t) in putTasks.enumerated() {
            do {
                let status = try await t.value
                #expect(status == 201, "PUT \(i): HTTP \(status)")
            } catch {
                Issue.record("PUT \(i) failed during the drain: \(error)")
            }
        }
        for (i, g) in gets.enumerated() {
            #expect(g.status == 200)
            do {
                let rest = Array(try await g.body.collect(upTo: 8 << 20).readableBytesView)
                #expect(g.first + rest == reads[i].1, "GET \(i): \(g.first.count) + \(rest.count) bytes")
            } catch {
                Issue.record("GET \(i) failed during the drain: \(error)")
            }
        }
        await client.close()
        let exit = await mesh.children[drainer]!.waitForExit(timeout: 60)
        #expect(exit?.status == 0 && exit?.signalled == false, "drainer exit \(String(describing: exit))\n\(mesh.children[drainer]!.stderr.suffix(1500))")
        // Every acknowledged blob is still held by a live node.
        for p in puts {
            let h = SHA256.hex(p)
            #expect(mesh.names.contains { $0 != drainer && mesh.holds($0, h) }, "\(h) lost")
        }
        for (d, _) in reads {
            #expect(mesh.names.contains { $0 != drainer && mesh.holds($0, d.hash) }, "\(d.hash) lost")
        }
    }
}

extension MeshStatus {
    /// Names of the members this node counts alive.
    var alive: [String] { (members ?? []).filter { $0.status == "alive" }.map(\.name) }
    /// The state this node gives member `n` (nil: not listed).
    func status(of n: String) -> String? { (members ?? []).first { $0.name == n }?.status }
}

/// Thread-safe list of strings.
final class Failures: Sendable {
    private let items = Mutex<[String]>([])
    func add(_ s: String) { items.withLock { $0.append(s) } }
    var all: [String] { items.withLock { $0 } }
    var count: Int { all.count }
}
