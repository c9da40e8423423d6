import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
import TestSupport
#endif

/// Large transfers, bursts and shutdown. Serialized: each of these saturates the (small) machine.
@Suite("Large transfers, bursts and drain", .serialized)
struct LoadTests {
    @Test("A 256 MiB blob streams through curl and through the cachemesh CLI", .timeLimit(.minutes(5)))
    func largeBlob() async throws {
        let size = 256 << 20
        try await withNode(maxBytes: "1G") { node in
            let dir = try TempDir("large")
            defer { dir.remove() }

            // curl -T / curl -o
            let a = dir.file("a")
            try await makeRandomFile(a, size: size)
            let hashA = try await sha256sum(a)
            let put = try await curl(node, .client, ["-T", a, node.url("/cas/\(hashA)")], timeout: 300)
            #expect(put.exitCode == 0 && put.httpCode == "201" && put.httpVersion == "2", "\(put)\nnode log:\n\(node.logExcerpt())")
            let aOut = dir.file("a.out")
            let get = try await curl(node, .client, ["-o", aOut, node.url("/cas/\(hashA)")], timeout: 300)
            #expect(get.exitCode == 0 && get.httpCode == "200" && get.httpVersion == "2", "\(get)")
            #expect(fileSize(aOut) == Int64(size))
            #expect(try await sha256sum(aOut) == hashA, "downloaded 256 MiB blob differs")
            try? FileManager.default.removeItem(atPath: a)
            try? FileManager.default.removeItem(atPath: aOut)

            // cachemesh put / cachemesh get -o
            let b = dir.file("b")
            try await makeRandomFile(b, size: size)
            let hashB = try await sha256sum(b)
            let cliPut = try await run([node.binary, "put", b] + node.cli(), timeout: 300)
            #expect(cliPut.status == 0, "\(cliPut)")
            #expect(cliPut.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(hashB)/\(size)", "\(cliPut)")
            let bOut = dir.file("b.out")
            let cliGet = try await run([node.binary, "get", hashB, "-o", bOut] + node.cli(), timeout: 300)
            #expect(cliGet.status == 0, "\(cliGet)")
            #expect(fileSize(bOut) == Int64(size))
            #expect(try await sha256sum(bOut) == hashB, "blob downloaded by `cachemesh get` differs")

            let m = try await withClient(node) { try await $0.metrics() }
            // Exactly the two blobs (nothing else is stored on this node).
            #expect(m.value("cachemesh_store_used_bytes") == Double(2 * size))
            #expect(m.value("cachemesh_store_blobs") == 2)
            #expect(m.value("cachemesh_store_reserved_bytes") == 0)
        }
    }

    @Test("2,000 concurrent uploads over 8 connections plus 300 parallel curl uploads, under ulimit -n 1024",
          .timeLimit(.minutes(5)))
    func burst() async throws {
        let clientCount = 2000, curlCount = 300, connections = 8
        try await withNode(maxBytes: "1G", openFilesLimit: 1024) { node in
            let dir = try TempDir("burst")
            defer { dir.remove() }

            // The limit really applies to the node process.
            let limits = (try? String(contentsOfFile: "/proc/\(node.pid)/limits", encoding: .utf8)) ?? ""
            let openFiles = limits.split(separator: "\n").first { $0.hasPrefix("Max open files") }
            #expect(openFiles?.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first == "1024",
                    "node limits: \(openFiles ?? "?")")

            // Distinct blobs of 1–16 KiB.
            let total = clientCount + curlCount
            let sizes = (0..<total).map { _ in Int.random(in: 1024...16 * 1024) }
            let pool = randomBytes(sizes.reduce(0, +))
            var blobs: [[UInt8]] = []
            var offset = 0
            for s in sizes {
                blobs.append(Array(pool[offset..<offset + s]))
                offset += s
            }
            let hashes = blobs.map { SHA256.hex($0) }
            try #require(Set(hashes).count == total, "test data must be distinct")

            // curl: a -K config of upload-file/url pairs, one status line per transfer.
            var config = ""
            for i in clientCount..<total {
                let f = dir.file("c\(i)")
                try Data(blobs[i]).write(to: URL(fileURLWithPath: f))
                config += "upload-file = \"\(f)\"\nurl = \"\(node.url("/cas/\(hashes[i])"))\"\noutput = \"/dev/null\"\n"
            }
            let configFile = dir.file("curl.cfg")
            try config.write(toFile: configFile, atomically: true, encoding: .utf8)

            var clients: [CacheClient] = []
            defer { for c in clients { Task { await c.close() } } }
            for _ in 0..<connections { clients.append(try await node.client()) }

            let deadline = ContinuousClock.now + .seconds(180)
            let curlRun = try ChildProcess(node.curl(.client) + [
                "--parallel", "--parallel-max", String(curlCount), "-K", configFile,
                "-w", "%{http_code} %{url_effective}\\n",
            ])
            defer {
                curlRun.killAndWait()
                curlRun.removeOutputFiles()
            }

            let clientBlobs = Array(blobs[0..<clientCount])
            let clientHashes = Array(hashes[0..<clientCount])
            let pool8 = clients
            let failures: [String] = try await withDeadline(180, "\(clientCount) concurrent uploads") {
                await withTaskGroup(of: String?.self) { group in
                    for i in 0..<clientCount {
                        let c = pool8[i % connections]
                        group.addTask {
                            do {
                                let d = try await c.put(bytes: clientBlobs[i])
                                return d.hash == clientHashes[i] ? nil : "upload \(i): digest \(d)"
                            } catch {
                                return "upload \(i) (\(clientBlobs[i].count) bytes): \(error)"
                            }
                        }
                    }
                    var failed: [String] = []
                    for await r in group { if let r { failed.append(r) } }
                    return failed
                }
            }
            #expect(failures.isEmpty, "\(failures.count) of \(clientCount) client uploads failed, e.g. \(failures.prefix(5))\nnode log:\n\(node.logExcerpt())")

            let left = max(5, Double((deadline - ContinuousClock.now).components.seconds))
            let curlExit = await curlRun.waitForExit(timeout: left)
            try #require(curlExit != nil, "curl --parallel did not finish within the 180 s deadline; stderr: \(curlRun.stderr.suffix(1000))")
            #expect(curlExit?.status == 0 && curlExit?.signalled == false, "curl exit \(String(describing: curlExit)); stderr: \(curlRun.stderr.suffix(1000))")
            let lines = curlRun.stdout.split(separator: "\n")
            #expect(lines.count == curlCount, "curl reported \(lines.count) transfers, expected \(curlCount)")
            let notCreated = lines.filter { !$0.hasPrefix("201 ") }
            #expect(notCreated.isEmpty, "\(notCreated.count) curl uploads did not get 201, e.g. \(notCreated.prefix(5))")

            // Every blob (client and curl) reads back intact.
            let allBlobs = blobs, allHashes = hashes
            let bad: [String] = try await withDeadline(120, "reading back \(total) blobs") {
                await withTaskGroup(of: String?.self) { group in
                    for i in 0..<total {
                        let c = pool8[i % connections]
                        group.addTask {
                            do {
                                let r = try await c.fetch("/cas/\(allHashes[i])")
                                guard r.status == 200 else { return "GET \(i): status \(r.status)" }
                                guard r.body.count == allBlobs[i].count, SHA256.hex(r.body) == allHashes[i] else {
                                    return "GET \(i): body differs (\(r.body.count) bytes)"
                                }
                                return nil
                            } catch {
                                return "GET \(i): \(error)"
                            }
                        }
                    }
                    var failed: [String] = []
                    for await r in group { if let r { failed.append(r) } }
                    return failed
                }
            }
            #expect(bad.isEmpty, "\(bad.count) of \(total) blobs unreadable, e.g. \(bad.prefix(5))")

            let m = try await pool8[0].metrics()
            #expect(m.value("cachemesh_store_blobs") == Double(total))
            #expect(m.value("cachemesh_store_reserved_bytes") == 0)
            #expect(try await pool8[0].getText("/healthz").status == 200)
        }
    }

    @Test("SIGTERM while a large GET is in flight: the transfer completes intact and the node exits 0",
          .timeLimit(.minutes(3)))
    func drainOnSIGTERM() async throws {
        let size = 16 << 20
        let node = try await TestNode.start(maxBytes: "512M")
        defer { node.cleanUp() }
        let dir = try TempDir("drain")
        defer { dir.remove() }
        let file = dir.file("blob")
        try await makeRandomFile(file, size: size)
        let hash = try await sha256sum(file)
        let put = try await curl(node, .client, ["-T", file, node.url("/cas/\(hash)")])
        try #require(put.httpCode == "201", "\(put)")

        // ~4 s at 4 MiB/s, well inside the node's 30 s drain grace period.
        let out = dir.file("out")
        let get = try ChildProcess(node.curl(.client) + ["--limit-rate", "4M", "-o", out, "-w", "%{http_code}", node.url("/cas/\(hash)")])
        defer {
            get.killAndWait()
            get.removeOutputFiles()
        }
        let inFlight = await eventually(timeout: 30) { fileSize(out) > 0 || get.hasExited }
        try #require(inFlight && !get.hasExited, "the GET did not start streaming: \(get.stderr)")
        try #require(fileSize(out) < Int64(size), "the GET finished before SIGTERM could be sent")

        node.child.signal(SIGTERM)

        let getExit = await get.waitForExit(timeout: 120)
        try #require(getExit != nil, "curl did not finish within 120 s of SIGTERM")
        #expect(get.stdout == "200", "curl status \(get.stdout)")
        // Regression: the node used to close the connection while the response's last DATA was
        // still queued in NIO (curl exit 18, file 512 KiB short).
        let received = try await sha256sum(out)
        #expect(getExit?.status == 0 && getExit?.signalled == false, "curl exit \(String(describing: getExit)): \(get.stderr)\nnode log:\n\(node.logExcerpt())")
        #expect(fileSize(out) == Int64(size), "received \(fileSize(out)) of \(size) bytes")
        #expect(received == hash, "the drained transfer is not intact")

        let nodeExit = await node.child.waitForExit(timeout: 60)
        #expect(nodeExit != nil, "node did not exit within 60 s of SIGTERM\nnode log:\n\(node.logExcerpt())")
        if let nodeExit {
            #expect(nodeExit.status == 0 && !nodeExit.signalled, "node exit \(nodeExit)\nnode log:\n\(node.logExcerpt())")
        }
    }
}
