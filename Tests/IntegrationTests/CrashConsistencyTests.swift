import BlobStore
import CacheNode
import CacheMeshClient
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Testing
import TestSupport

/// `kill -9` of a real node in the middle of ~1,000 concurrent uploads.
@Suite("Crash consistency of the store", .serialized, .timeLimit(.minutes(3)))
struct CrashConsistencyTests {
    @Test("kill -9 during 1,000 concurrent writes: after restart no partial blob is visible, the index matches the disk, every acknowledged blob is there")
    func killDuringWrites() async throws {
        let data = try TempDir("crash-data")
        defer { data.remove() }
        let blobs = (0..<1000).map { _ in randomBytes(Int.random(in: 1024...65_536)) }
        let acknowledged = Shared(Set<String>())
        let next = Shared(0)
        do {
            let node = try await TestNode.start(dataDir: data.path)
            defer { node.cleanUp() }
            try await withClient(node) { c in
                let writers = Task {
                    await withTaskGroup(of: Void.self) { group in
                        for _ in 0..<32 {
                            group.addTask {
                                while true {
                                    let i = next.withLock { n in defer { n += 1 }; return n }
                                    guard i < blobs.count, let d = try? await c.put(bytes: blobs[i]) else { return }
                                    acknowledged.withLock { _ = $0.insert(d.hash) }
                                }
                            }
                        }
                    }
                }
                // Killed once a third is acknowledged: the rest are in flight or not sent yet.
                _ = await eventually(timeout: 120) { acknowledged.withLock { $0.count } >= 330 }
                node.kill()
                await writers.value
            }
        }
        let acked = acknowledged.withLock { $0 }
        try #require(acked.count >= 330 && acked.count < blobs.count, "the node was not killed mid-run (\(acked.count) acknowledged)")

        let node = try await TestNode.start(dataDir: data.path)
        defer { node.cleanUp() }
        try await withClient(node) { c in
            let indexed = try await eventually(timeout: 60) {
                let body = try await c.getText("/status").body
                let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
                return ((json?["store"] as? [String: Any])?["index"] as? [String: Any])?["complete"] as? Bool == true
            }
            try #require(indexed, "the index never completed\n\(node.logExcerpt())")
            // Every file in cas/ is whole: it hashes to its name (nothing partial), tmp/ is empty.
            var files = 0
            var bytes = 0
            let cas = data.path + "/cas"
            for prefix in try FileManager.default.contentsOfDirectory(atPath: cas) {
                for name in try FileManager.default.contentsOfDirectory(atPath: cas + "/" + prefix) {
                    let content = try [UInt8](Data(contentsOf: URL(fileURLWithPath: "\(cas)/\(prefix)/\(name)")))
                    #expect(SHA256.hex(content) == name, "a partial or corrupt blob file \(name) (\(content.count) bytes)")
                    files += 1
                    bytes += content.count
                }
            }
            #expect(try FileManager.default.contentsOfDirectory(atPath: data.path + "/tmp").isEmpty)
            // The index matches the disk.
            let m = try await c.metrics()
            #expect(m.value("cachemesh_store_blobs") == Double(files), "index vs files on disk")
            #expect(m.value("cachemesh_store_used_bytes") == Double(bytes), "index bytes vs disk bytes")
            #expect(files >= acked.count)
            // Every acknowledged blob is served, intact.
            for b in blobs where acked.contains(SHA256.hex(b)) {
                let r = try await c.fetch("/cas/\(SHA256.hex(b))")
                #expect(r.status == 200 && r.body == b, "acknowledged blob lost or changed after kill -9")
            }
        }
    }
}

/// A value shared by the writer tasks.
private final class Shared<Value: Sendable>: Sendable {
    private let value: Mutex<Value>
    init(_ v: Value) { value = Mutex(v) }
    func withLock<R: Sendable>(_ body: (inout sending Value) -> sending R) -> R { value.withLock(body) }
}

/// A node on a store written straight to disk (not through the API) listens and serves before its
/// index is complete. Proven by state: the scan is slowed so far (`scan_rate = 40` for 4,000 files:
/// over a minute and a half) that `/status` must still say "incomplete" while blobs the scan has not
/// reached are served. (That the scan then indexes everything is shown by `BackgroundScanTests` and
/// the crash test above; `bench/store-scale.sh` does this with a million files and measures.)
@Suite("Start-up on a big store", .serialized, .timeLimit(.minutes(3)))
struct StoreStartupTests {
    @Test("The node serves blobs on disk while its index is incomplete")
    func servesBeforeTheIndexIsComplete() async throws {
        let data = try TempDir("startup-data")
        defer { data.remove() }
        let count = 4_000
        var samples: [(String, [UInt8])] = []
        for i in 0..<count {
            let bytes = Array("synthetic blob \(i)\n".utf8)
            let hash = SHA256.hex(bytes)
            let dir = "\(data.path)/cas/\(hash.prefix(2))"
            mkdir(data.path + "/cas", 0o755)
            mkdir(dir, 0o755)
            let fd = open("\(dir)/\(hash)", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            try #require(fd >= 0 && write(fd, bytes, bytes.count) == bytes.count)
            close(fd)
            if i % 1000 == 0 { samples.append((hash, bytes)) }
        }
        let config = data.path + ".toml"
        try "scan_rate = 40\n".write(toFile: config, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: config) }
        let node = try await TestNode.start(dataDir: data.path, extraArguments: ["--config", config])
        defer { node.cleanUp() }   // SIGKILL: the slow scan is not waited for
        func index(_ c: CacheClient) async throws -> [String: Any] {
            let body = try await c.getText("/status").body
            let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
            return ((json?["store"] as? [String: Any])?["index"] as? [String: Any]) ?? [:]
        }
        try await withClient(node) { c in
            let before = try await index(c)
            #expect(before["complete"] as? Bool == false, "index already complete: \(before)")
            #expect((before["scanned_entries"] as? Int ?? count) < count)
            for (hash, bytes) in samples {
                let r = try await c.fetch("/cas/\(hash)")
                #expect(r.status == 200 && r.body == bytes, "blob on disk not served before the scan reached it")
            }
            #expect(try await index(c)["complete"] as? Bool == false)
            // Found on disk by the lookups, they are in the index now.
            #expect((try await c.metrics().value("cachemesh_store_blobs") ?? 0) >= Double(samples.count))
        }
    }

    /// A million files written straight to disk (hard links to one small file per prefix
    /// directory, so making them takes seconds; the scan reads names and sizes, as for any store):
    /// the node listens, serves a real blob among them, and its background scan indexes every
    /// entry with the right byte count. No timing is asserted; `bench/store-scale.sh` measures.
    @Test("A store of 1,000,000 files written directly: served at once, every entry indexed", .timeLimit(.minutes(6)))
    func aMillionFiles() async throws {
        let data = try TempDir("million")
        defer { data.remove() }
        let perPrefix = 3_907   // 256 × 3,907 ≥ 1,000,000 (each source file far below ext4's 65,000 links)
        let filler = Array("filler\n".utf8)
        var rng = SystemRandomNumberGenerator()
        var made = 0
        mkdir(data.path + "/cas", 0o755)
        for p in 0..<256 where made < 1_000_000 {
            let prefix = String(format: "%02x", p)
            let dir = "\(data.path)/cas/\(prefix)"
            mkdir(dir, 0o755)
            let source = "\(data.path)/filler-\(prefix)"
            let fd = open(source, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            try #require(fd >= 0 && write(fd, filler, filler.count) == filler.count)
            close(fd)
            for _ in 0..<min(perPrefix, 1_000_000 - made) {
                let name = prefix + (0..<62).map { _ in String(UInt8.random(in: 0..<16, using: &rng), radix: 16) }.joined()
                try #require(link(source, "\(dir)/\(name)") == 0, "link: \(String(cString: strerror(errno)))")
                made += 1
            }
            unlink(source)
        }
        // One real blob among them.
        let real = Array("the one blob a client asks for\n".utf8)
        let realHash = SHA256.hex(real)
        let fd = open("\(data.path)/cas/\(realHash.prefix(2))/\(realHash)", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0 && write(fd, real, real.count) == real.count)
        close(fd)
        let node = try await TestNode.start(dataDir: data.path, maxBytes: "1G")
        defer { node.cleanUp() }
        try await withClient(node) { c in
            let r = try await c.fetch("/cas/\(realHash)")
            #expect(r.status == 200 && r.body == real)
            var last: [String: Any] = [:]
            let complete = try await eventually(timeout: 240) {
                let body = try await c.getText("/status").body
                let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
                last = ((json?["store"] as? [String: Any])?["index"] as? [String: Any]) ?? [:]
                return last["complete"] as? Bool == true
            }
            #expect(complete, "index not complete: \(last)")
            let m = try await c.metrics()
            #expect(m.value("cachemesh_store_blobs") == 1_000_001)
            #expect(m.value("cachemesh_store_used_bytes") == Double(1_000_000 * filler.count + real.count))
        }
    }
}
