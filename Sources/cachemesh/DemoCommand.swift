import ArgumentParser
import BlobStore
import CacheNode
import MeshShell
import CacheRoutes
import CacheMeshClient
import Foundation
import MeshHTTP

/// `cachemesh demo`: an origin and three peers on loopback with fresh certificates, a short
/// workload showing gossip, race winners, mirroring and a drain, and a readable summary.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "demo", abstract: "Run a local mesh (origin + 3 peers) and show what it does.")

    @Option(help: "certs/mkcerts.sh (default: ./certs/mkcerts.sh or next to the binary's checkout).") var mkcerts: String?
    @Option(help: "Blobs in the workload.") var blobs: Int = 20
    @Flag(help: "Leave the mesh running at the end (stop it with Ctrl-C).") var keep = false

    final class Mesh: @unchecked Sendable {
        let dir: String
        var procs: [String: Process] = [:]
        var ports: [String: Int] = [:]
        let names = ["origin", "peer1", "peer2", "peer3"]
        init(dir: String) { self.dir = dir }
        func stopAll() {
            for (_, p) in procs where p.isRunning { kill(p.processIdentifier, SIGTERM) }
            for (_, p) in procs { p.waitUntilExit() }
        }
    }

    func say(_ s: String) { print(s); fflush(nil) }

    static func freePort() -> Int {
        LoopbackPorts.pick() ?? 0
    }

    func run() async throws {
        let fm = FileManager.default
        let script = mkcerts ?? ["certs/mkcerts.sh", URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            .appendingPathComponent("../../../certs/mkcerts.sh").standardized.path].first { fm.fileExists(atPath: $0) }
        guard let script, fm.fileExists(atPath: script) else { throw ValidationError("cannot find certs/mkcerts.sh: run from the repository root or pass --mkcerts") }
        let dir = fm.temporaryDirectory.appendingPathComponent("cachemesh-demo-\(UUID().uuidString.prefix(6))").path
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let mesh = Mesh(dir: dir)
        let sigint = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        signal(SIGINT, SIG_IGN)
        sigint.setEventHandler { mesh.stopAll(); Foundation.exit(130) }
        sigint.resume()
        defer { if !keep { mesh.stopAll(); try? fm.removeItem(atPath: dir) } }

        say("== 1. certificates (mesh CA, a node certificate per node, a client) in \(dir)/certs")
        let certRuns = [["all", "\(dir)/certs"]] + mesh.names.map { ["-o", "\(dir)/certs", "node", $0] }
        for args in certRuns {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/bash")
            p.arguments = [script] + args
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            guard p.terminationStatus == 0 else { throw ValidationError("\(script) \(args.joined(separator: " ")) failed") }
        }
        var toml = "name = \"demo\"\nca = \"certs/ca.pem\"\nreplication = 2\nwrite_quorum = 2\n"
        for n in mesh.names {
            mesh.ports[n] = Self.freePort()
            toml += "\n[[nodes]]\nname = \"\(n)\"\nrole = \"\(n == "origin" ? "origin" : "peer")\"\ntcp = \"127.0.0.1:\(mesh.ports[n]!)\"\n"
            toml += "quic = \"127.0.0.1:\(mesh.ports[n]!)\"\n"
            toml += "data_dir = \"data/\(n)\"\nmax_bytes = \"512M\"\ncert = \"certs/\(n).pem\"\nkey = \"certs/\(n).key\"\n"
            toml += "seeds = \(n == "origin" ? "[]" : "[\"origin\", \"peer1\"]")\n"
        }
        try toml.write(toFile: "\(dir)/topology.toml", atomically: true, encoding: .utf8)

        say("== 2. starting origin + 3 peers (topology \(dir)/topology.toml; logs in \(dir)/*.log)")
        let exe = try fm.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        for n in mesh.names {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: exe)
            p.arguments = ["node", "--topology", "\(dir)/topology.toml", "--name", n]
            _ = fm.createFile(atPath: "\(dir)/\(n).log", contents: nil)
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle(forWritingAtPath: "\(dir)/\(n).log")
            try p.run()
            mesh.procs[n] = p
            say("   \(n) pid \(p.processIdentifier) tcp+udp(quic) 127.0.0.1:\(mesh.ports[n]!)")
        }
        func client(_ n: String, _ who: String = "client") async throws -> CacheClient {
            try await CacheClient.connect(ClientOptions(server: HostPort(host: "127.0.0.1", port: mesh.ports[n]!),
                                                        certificate: "\(dir)/certs/\(who).pem", privateKey: "\(dir)/certs/\(who).key", ca: "\(dir)/certs/ca.pem"))
        }
        func meshStatus(_ n: String) async -> MeshStatus? {
            guard let c = try? await client(n, "origin") else { return nil }
            defer { Task { await c.close() } }
            guard let body = try? await c.getText("/mesh/status").body else { return nil }
            return try? NodeStatus.decoder().decode(MeshStatus.self, from: Data(body.utf8))
        }
        func aliveMembers(_ n: String) async -> Int {
            await meshStatus(n)?.members?.filter { $0.status == "alive" }.count ?? 0
        }

        say("== 3. gossip: waiting until every node sees four live members")
        // Lines redrawn with \r only on a terminal; a pipe or a log gets the final line alone.
        let terminal = isatty(STDOUT_FILENO) == 1
        let t0 = ContinuousClock.now
        var counts: [String] = []
        var converged = false
        for _ in 0..<300 {
            counts = []
            for n in mesh.names { counts.append("\(n)=\(await aliveMembers(n))") }
            converged = counts.allSatisfy({ $0.hasSuffix("=\(mesh.names.count)") })
            if terminal {
                print("\r   alive members seen: \(counts.joined(separator: " "))   ", terminator: "")
                fflush(nil)
            }
            if converged { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        if terminal { print("") } else { say("   alive members seen: \(counts.joined(separator: " "))") }
        say("   \(converged ? "converged" : "NOT converged") after \(formatSeconds(ContinuousClock.now - t0))")

        say("== 4. \(blobs) blobs PUT at peer1 (R=2, W=2: acknowledged once a mirror holds a copy)")
        let c1 = try await client("peer1")
        var digests: [Digest] = []
        for i in 0..<blobs {
            let size = i % 5 == 0 ? 4 << 20 : 4096 + i * 1000
            digests.append(try await c1.put(bytes: (0..<size).map { _ in UInt8.random(in: 0...255) }))
            if terminal {
                print("\r   \(i + 1)/\(blobs)", terminator: "")
                fflush(nil)
            }
        }
        if terminal { print("") } else { say("   \(blobs)/\(blobs)") }
        await c1.close()
        func holders(_ d: Digest) -> [String] {
            mesh.names.filter { fm.fileExists(atPath: "\(dir)/data/\($0)/cas/\(d.hash.prefix(2))/\(d.hash)") }
        }
        var perNode: [String: Int] = [:]
        for d in digests { for h in holders(d) { perNode[h, default: 0] += 1 } }
        say("   copies per node (rendezvous hashing picks the mirror): \(mesh.names.map { "\($0)=\(perNode[$0] ?? 0)" }.joined(separator: " "))")

        say("== 5. locality gossip: every node learns who holds what")
        try await Task.sleep(for: .seconds(1))
        for n in mesh.names {
            let e = await meshStatus(n).map { "\($0.localityEntries)" } ?? "?"
            say("   \(n): \(e) locality entries")
        }

        say("== 6. GET every blob at peer3 (the worker role races holders against the origin, over QUIC between nodes)")
        let c3 = try await client("peer3")
        var sources: [String: Int] = [:]
        for d in digests {
            let r = try await c3.connection.request(HTTPRequestHead(method: "GET", path: "/cas/\(d.hash)"))
            _ = try await r.body.collect(upTo: 64 << 20)
            sources[r.headers["x-cachemesh-source"] ?? "status \(r.status)", default: 0] += 1
        }
        say("   served from: " + sources.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", "))
        let m = try await c3.getText("/metrics").body
        for line in m.split(separator: "\n") where line.hasPrefix("cachemesh_fetch_") && !line.contains("_bucket") {
            say("   \(line)")
        }
        await c3.close()

        say("== 7. drain: SIGTERM to peer2 (LEAVING → GOAWAY → in-flight finish → hand-off → exit)")
        let before = digests.filter { holders($0).contains("peer2") }
        let p2 = mesh.procs["peer2"]!
        kill(p2.processIdentifier, SIGTERM)
        p2.waitUntilExit()
        let lost = before.filter { holders($0).filter { $0 != "peer2" }.isEmpty }
        say("   peer2 exited with status \(p2.terminationStatus); it held \(before.count) blobs, \(lost.count) of them now held nowhere else")
        try await Task.sleep(for: .seconds(1))
        let os = await meshStatus("origin")
        say("   origin sees peer2 as: \(os?.members?.first { $0.name == "peer2" }?.status ?? "(no answer from the origin)")")

        say("== summary")
        say("   membership converged, \(blobs) blobs stored with 2 copies each, peer3 served \(sources.filter { $0.key.hasPrefix("peer:") }.values.reduce(0, +)) from peers and \(sources.filter { $0.key.hasPrefix("origin:") }.values.reduce(0, +)) from the origin,")
        say("   peer2 drained with exit \(p2.terminationStatus) and \(lost.isEmpty ? "nothing lost" : "\(lost.count) blobs LOST").")
        if keep {
            say("mesh left running (Ctrl-C stops it): \(dir)")
            while true { try await Task.sleep(for: .seconds(3600)) }
        }
    }
}
