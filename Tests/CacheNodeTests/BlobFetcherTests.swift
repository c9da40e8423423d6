import BlobStore
import Foundation
import Logging
import MeshHTTP
import NIOCore
import Synchronization
import Testing
@testable import CacheNode

/// An in-memory mesh: each source answers after a delay with some bytes (or an error).
final class FakeMesh: MeshRequester {
    struct Behaviour: Sendable {
        /// Before the response head.
        var headDelay: Duration = .zero
        /// Before each half of the body.
        var delay: Duration = .zero
        var status = 200
        var bytes: [UInt8]
    }

    let behaviours: [String: Behaviour]
    let requests = Mutex<[String]>([])
    let cancels = Mutex<[String]>([])
    let stalls = Mutex<[String]>([])

    func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async {
        stalls.withLock { $0.append(source.name) }
    }

    init(_ behaviours: [String: Behaviour]) { self.behaviours = behaviours }

    func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> MeshReply {
        requests.withLock { $0.append(source.name) }
        #expect(head.headers[BlobFetcher.hopHeader] == "1")
        let b = behaviours[source.name]!
        try await Task.sleep(for: b.headDelay)
        let inbound = HTTPInboundBody()
        let feeder = Task {
            try await Task.sleep(for: b.delay)
            // Two chunks, so a cancelled leg can be caught halfway.
            let half = b.bytes.count / 2
            inbound.append(ByteBuffer(bytes: b.bytes[..<half]))
            try await Task.sleep(for: b.delay)
            inbound.append(ByteBuffer(bytes: b.bytes[half...]))
            inbound.finish()
        }
        let name = source.name
        return MeshReply(HTTPClientResponse(status: b.status, headers: ["content-length": String(b.bytes.count)], body: inbound, cancel: { [self] in
            feeder.cancel()
            inbound.fail(CancellationError())
            self.cancels.withLock { $0.append(name) }
        }), via: .tcp)
    }
}

@Suite struct BlobFetcherTests {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-fetch-\(UUID())")

    func store() throws -> BlobStore {
        try BlobStore(configuration: BlobStoreConfiguration(directory: dir.path, maxBytes: 64 << 20), logger: Logger(label: "t"))
    }

    func src(_ n: String, origin: Bool = false) -> FetchSource { FetchSource(name: n, endpoint: HostPort(host: "127.0.0.1", port: 1), isOrigin: origin) }

    let blob = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 3) }

    @Test func hedgedRaceCancelsTheSlowLeg() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // The slow source would answer only after a minute: it can win only if the hedge never
        // starts the origin (a 5 s head delay once lost to a CI machine starved for seconds).
        let mesh = FakeMesh(["slow": .init(headDelay: .seconds(60), bytes: blob), "origin": .init(delay: .milliseconds(5), bytes: blob)])
        // No stall detection within the test (10 s by default): a starved test process once took
        // longer than that, the slow leg counted as stalled, not cancelled.
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), stallTimeout: .seconds(600), spacing: { .hedged(.milliseconds(30)) })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("slow"), src("origin", origin: true)])
        #expect(r.source.name == "origin")
        #expect(r.legsStarted == 2)
        #expect(r.legsCancelled == 1)
        #expect(mesh.requests.withLock { $0 } == ["slow", "origin"])
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.stats.reservedBytes == 0)   // the loser's writer was aborted
    }

    @Test func anAnsweringSourceIsNotHedgedEvenIfItsBodyIsSlow() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // The peer answers at once and streams a "large" body slowly (2 × 700 ms), well past the
        // 500 ms hedge delay: a hedge would only pull the blob from the origin a second time.
        let mesh = FakeMesh(["peer": .init(delay: .milliseconds(700), bytes: blob), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .hedged(.milliseconds(500)) })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("peer"), src("origin", origin: true)])
        #expect(r.source.name == "peer")
        #expect(r.legsStarted == 1)
        #expect(mesh.requests.withLock { $0 } == ["peer"])
    }

    @Test func bodyFailureAfterAnAnswerFailsOverToTheNextSource() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        var bad = blob
        bad[99_999] ^= 1
        // The liar answers at once (hedging stops), then its body fails verification: the next
        // source starts at once.
        let mesh = FakeMesh(["liar": .init(delay: .milliseconds(40), bytes: bad), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .hedged(.milliseconds(10)) })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("liar"), src("origin", origin: true)])
        #expect(r.source.isOrigin)
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
    }

    @Test func stalledLegsFailAndTheNextSourceServes() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // One source never answers; one answers and then sends no body bytes; neither may hang
        // the fetch: with one leg at a time, each fails after the stall timeout.
        let mesh = FakeMesh(["mute": .init(headDelay: .seconds(60), bytes: blob), "stuck": .init(delay: .seconds(60), bytes: blob),
                             "origin": .init(bytes: blob)])
        // A stall timeout generous enough that the answering origin never looks stalled, even on a
        // loaded CI machine (the test takes ~2 × the timeout).
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), stallTimeout: .seconds(2), spacing: { .failoverOnly })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("mute"), src("stuck"), src("origin", origin: true)])
        #expect(r.source.isOrigin)
        #expect(mesh.requests.withLock { $0 } == ["mute", "stuck", "origin"])
        #expect(Set(mesh.stalls.withLock { $0 }) == ["mute", "stuck"])
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.stats.reservedBytes == 0)
    }

    @Test func corruptPeerLosesAndNothingCorruptIsStored() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        var bad = blob
        bad[500] ^= 0xFF
        let mesh = FakeMesh(["liar": .init(bytes: bad), "origin": .init(delay: .milliseconds(5), bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .hedged(.seconds(10)) })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("liar"), src("origin", origin: true)])
        #expect(r.source.name == "origin")   // failover at once after the digest check failed
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.size(of: SHA256.hex(bad)) == nil)
    }

    @Test func allAtOnceAndAllFailing() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["a": .init(status: 404, bytes: []), "b": .init(status: 404, bytes: [])])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .allAtOnce })
        await #expect(throws: BlobStoreError.self) { try await f.fetch(hash: SHA256.hex(blob), sources: [src("a"), src("b")]) }
        #expect(Set(mesh.requests.withLock { $0 }) == ["a", "b"])
    }

    @Test func failoverOnlyNeverStartsTheOriginWhileAPeerIsSlow() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["slowpeer": .init(delay: .milliseconds(150), bytes: blob), "origin": .init(delay: .zero, bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .failoverOnly })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("slowpeer"), src("origin", origin: true)])
        #expect(r.source.name == "slowpeer")
        #expect(r.legsStarted == 1)
        #expect(mesh.requests.withLock { $0 } == ["slowpeer"])
    }

    @Test func failoverOnlyFallsToTheOriginWhenPeersFail() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["a": .init(status: 404, bytes: []), "b": .init(status: 404, bytes: []), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .failoverOnly })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("a"), src("b"), src("origin", origin: true)])
        #expect(r.source.isOrigin)
        #expect(mesh.requests.withLock { $0 } == ["a", "b", "origin"])
    }

    @Test func concurrentFetchesShareOneRace() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["p": .init(delay: .milliseconds(50), bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .hedged(.seconds(1)) })
        try await withThrowingTaskGroup(of: FetchResult.self) { g in
            for _ in 0..<10 { g.addTask { try await f.fetch(hash: SHA256.hex(self.blob), sources: [self.src("p")]) } }
            for try await r in g { #expect(r.source.name == "p") }
        }
        #expect(mesh.requests.withLock { $0 } == ["p"])
    }
}
