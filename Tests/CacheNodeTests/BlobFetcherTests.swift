import BlobStore
import Foundation
import Logging
import MeshHTTP
import NIOCore
import Synchronization
import Testing
@testable import CacheNode
@testable import MeshShell

final class ReplyState: Sendable {
    let value = Mutex((finished: false, cancelled: false))
}

/// An in-memory mesh: each source answers after a delay with some bytes (or an error).
final class FakeMesh: MeshRequester {
    struct Behaviour: Sendable {
        /// Before the response head.
        var headDelay: Duration = .zero
        /// Before each half of the body.
        var delay: Duration = .zero
        /// Before the second half only, instead of `delay` (a source that answers, sends part of
        /// the body, then stalls).
        var tailDelay: Duration? = nil
        var status = 200
        var bytes: [UInt8]
        /// Fail (as a dropped connection) after the first half of the body.
        var dieAfterHalf = false
        /// The `content-length` to declare instead of the body's (a lying source).
        var declaredLength: Int64? = nil
    }

    let behaviours: [String: Behaviour]
    let requests = Mutex<[String]>([])
    let cancels = Mutex<[String]>([])
    let stalls = Mutex<[String]>([])
    /// The `range` header of every request ("" if none), in order.
    let ranges = Mutex<[String]>([])

    func connectionStalled(to source: FetchSource, via transport: MeshTransportKind?) async {
        stalls.withLock { $0.append(source.name) }
    }

    init(_ behaviours: [String: Behaviour]) { self.behaviours = behaviours }

    func request(to source: FetchSource, _ head: HTTPRequestHead, body: HTTPOutboundBody) async throws -> MeshReply {
        requests.withLock { $0.append(source.name) }
        #expect(head.headers[BlobFetcher.hopHeader] == "1")
        var b0 = behaviours[source.name]!
        let range = head.headers["range"]
        ranges.withLock { $0.append(range ?? "") }
        var headers: HTTPHeaders = ["content-length": String(b0.bytes.count)]
        if let range, b0.status == 200, range.hasPrefix("bytes="), range.hasSuffix("-"), let from = Int(range.dropFirst(6).dropLast()), from < b0.bytes.count {
            headers = ["content-length": String(b0.bytes.count - from), "content-range": "bytes \(from)-\(b0.bytes.count - 1)/\(b0.bytes.count)"]
            b0.status = 206
            b0.bytes = Array(b0.bytes[from...])
        }
        if let d = b0.declaredLength { headers = ["content-length": String(d)] }
        let b = b0
        let name = source.name
        do {
            try await Task.sleep(for: b.headDelay)
        } catch {
            // The fetcher gave up on this leg before it answered (its task was cancelled).
            cancels.withLock { $0.append("\(name) before head") }
            throw error
        }
        // Bytes the fetcher took from the body (a dying source fails only once its first half
        // was read: a failed body drops what is still buffered).
        let consumed = Atomic<Int>(0)
        let inbound = HTTPInboundBody(onConsumed: { consumed.add($0, ordering: .relaxed) })
        // Whether the body was sent to its end, and whether a cancel was already recorded: only
        // a cancel of a response still sending counts (the fetcher may call cancel again, or on a
        // finished winner, which a real transport ignores).
        let state = ReplyState()
        let feeder = Task {
            try await Task.sleep(for: b.delay)
            // Two chunks, so a cancelled leg can be caught halfway.
            let half = b.bytes.count / 2
            inbound.append(ByteBuffer(bytes: b.bytes[..<half]))
            try await Task.sleep(for: b.tailDelay ?? b.delay)
            if b.dieAfterHalf {
                while consumed.load(ordering: .relaxed) < half { try await Task.sleep(for: .milliseconds(5)) }
                state.value.withLock { $0.finished = true }
                inbound.fail(HTTPTransportError.connectionClosed)
                return
            }
            inbound.append(ByteBuffer(bytes: b.bytes[half...]))
            state.value.withLock { $0.finished = true }
            inbound.finish()
        }
        return MeshReply(HTTPClientResponse(status: b.status, headers: headers, body: inbound, cancel: { [self] in
            feeder.cancel()
            inbound.fail(CancellationError())
            let record = state.value.withLock { s in
                defer { s.cancelled = true }
                return !s.finished && !s.cancelled
            }
            if record { self.cancels.withLock { $0.append(name) } }
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

    /// The store's upload directory (throws if it does not exist: an empty listing must mean empty).
    func tempFiles() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: dir.path + "/tmp") }

    /// Polls `condition` (every 10 ms, up to `timeout` s); whether it held.
    func waitUntil(timeout: Double = 20, _ condition: () -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
        while ContinuousClock.now < deadline {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition()
    }

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
        // The slow leg's request itself was cancelled (not merely outvoted and left running).
        let cancelled = await waitUntil { mesh.cancels.withLock { $0 } == ["slow before head"] }
        #expect(cancelled, "cancels: \(mesh.cancels.withLock { $0 })")
    }

    @Test(.timeLimit(.minutes(1)))
    func aLegThatAnsweredAndStalledIsResumedFromTheNextSourceAndLeavesNoTempFile() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // Both legs at once. "slow" answers at once (it wins the race: the origin's leg is
        // cancelled) and sends half its body, then stalls for ten minutes; after the stall
        // timeout its stream is reset and the origin is asked for the rest from the same offset.
        let mesh = FakeMesh(["slow": .init(tailDelay: .seconds(600), bytes: blob),
                             "origin": .init(headDelay: .milliseconds(300), bytes: blob)])
        // The stall timeout runs on a clock the test moves until the stall was seen (then the
        // resumed origin leg cannot look stalled, and nobody waits the timeout out).
        let clock = ManualClock()
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), stallTimeout: .seconds(2), clock: clock,
                            spacing: { .allAtOnce })
        let fetch = Task { try await f.fetch(hash: SHA256.hex(blob), sources: [src("slow"), src("origin", origin: true)]) }
        let moved = try await clock.advance(until: { !mesh.stalls.withLock { $0 }.isEmpty })
        let r = try await fetch.value
        #expect(moved >= .seconds(2) && moved < .seconds(60), "\(moved) of clock time for a 2 s stall")
        #expect(r.source.name == "origin")
        #expect(r.legsStarted == 2)
        #expect(r.legsCancelled == 1)
        #expect(mesh.requests.withLock { $0 }.sorted() == ["origin", "origin", "slow"])
        #expect(mesh.ranges.withLock { $0 }.last == "bytes=\(blob.count / 2)-")
        // The fake saw the slow leg's response cancelled (the stream reset of a real transport).
        let cancelled = await waitUntil { mesh.cancels.withLock { $0 }.contains("slow") }
        #expect(cancelled, "cancels: \(mesh.cancels.withLock { $0 })")
        #expect(mesh.stalls.withLock { $0 } == ["slow"])
        let emptied = await waitUntil { ((try? tempFiles()) ?? ["?"]).isEmpty && s.stats.reservedBytes == 0 }
        let left = try tempFiles()
        #expect(emptied, "temp files: \(left), reserved \(s.stats.reservedBytes)")
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.stats.blobCount == 1)
        #expect(s.stats.usedBytes == Int64(blob.count))
    }

    @Test("a source that answers first but declares more bytes than the store holds is a failed leg: the blob comes from the next source")
    func aSourceDeclaringAnImpossibleSizeIsSkipped() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["liar": .init(bytes: blob, declaredLength: 1 << 50),
                             "origin": .init(headDelay: .milliseconds(50), bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), stallTimeout: .seconds(600), spacing: { .allAtOnce })
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("liar"), src("origin", origin: true)])
        #expect(r.source.name == "origin")
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.stats.reservedBytes == 0)
    }

    @Test func aSourceDyingMidBodyIsContinuedFromTheSameOffset() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        let mesh = FakeMesh(["dier": .init(bytes: blob, dieAfterHalf: true), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .failoverOnly })
        let tap = CutThroughTap(minimumSize: 0)
        async let got = Self.drain(tap)
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("dier"), src("origin", origin: true)], tap: tap)
        #expect(r.source.isOrigin)
        #expect(mesh.requests.withLock { $0 } == ["dier", "origin"])
        #expect(mesh.ranges.withLock { $0 } == ["", "bytes=\(blob.count / 2)-"])
        let (bytes, ok) = await got
        #expect(ok)
        #expect(bytes == blob)   // every byte once: the first half was not sent again
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
    }

    @Test func aCorruptSourceResetsTheCallerBeforeItsLastByteAndTheStoreGetsTheRightBlob() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        var bad = blob
        bad[99_999] ^= 1
        let mesh = FakeMesh(["liar": .init(bytes: bad), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .failoverOnly })
        let tap = CutThroughTap(minimumSize: 0)
        async let got = Self.drain(tap)
        let r = try await f.fetch(hash: SHA256.hex(blob), sources: [src("liar"), src("origin", origin: true)], tap: tap)
        let (bytes, ok) = await got
        #expect(!ok)
        #expect(bytes.count < blob.count)
        #expect(bytes == Array(bad.prefix(bytes.count)))
        // The fetch itself went on to the next source, from byte 0.
        #expect(r.source.isOrigin)
        #expect(mesh.ranges.withLock { $0 } == ["", ""])
        #expect(try await s.readAll(hash: SHA256.hex(blob)) == blob)
        #expect(s.stats.blobCount == 1)
        #expect(try tempFiles().isEmpty)
    }

    /// Reads a tap's stream as a transport would: the bytes, and whether the body ended normally.
    static func drain(_ tap: CutThroughTap) async -> ([UInt8], Bool) {
        guard case .streaming = await tap.started() else { return ([], false) }
        var out: [UInt8] = []
        while true {
            switch tap.stream.read(max: 1 << 20) {
            case .data(let b): out += b.readableBytesView
            case .wouldBlock: try? await Task.sleep(for: .milliseconds(2))
            case .end: return (out, true)
            case .failed: return (out, false)
            }
        }
    }

    @Test func anAnsweringSourceIsNotHedgedEvenIfItsBodyIsSlow() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // The peer answers at once and streams a "large" body slowly (2 × 3.5 s), well past the
        // 3 s hedge delay: a hedge would only pull the blob from the origin a second time. (The
        // delay leaves a starved 2-core CI run seconds to deliver the peer's answer: with 500 ms
        // the hedge fired before the answer was processed.)
        let mesh = FakeMesh(["peer": .init(delay: .milliseconds(3_500), bytes: blob), "origin": .init(bytes: blob)])
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), spacing: { .hedged(.seconds(3)) })
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

    @Test(.timeLimit(.minutes(1)))
    func stalledLegsFailAndTheNextSourceServes() async throws {
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = try store()
        // One source never answers; one answers and then sends no body bytes; neither may hang
        // the fetch: with one leg at a time, each fails after the stall timeout.
        let mesh = FakeMesh(["mute": .init(headDelay: .seconds(60), bytes: blob), "stuck": .init(delay: .seconds(60), bytes: blob),
                             "origin": .init(bytes: blob)])
        // The stall timeout runs on a clock the test moves: it moves until both stalls were seen,
        // then stands still, so the answering origin can never look stalled however loaded the
        // machine is, and the test does not wait the timeout out.
        let clock = ManualClock()
        let f = BlobFetcher(store: s, requester: mesh, logger: Logger(label: "t"), stallTimeout: .seconds(2), clock: clock,
                            spacing: { .failoverOnly })
        let fetch = Task { try await f.fetch(hash: SHA256.hex(blob), sources: [src("mute"), src("stuck"), src("origin", origin: true)]) }
        let moved = try await clock.advance(until: { mesh.stalls.withLock { $0.count } == 2 })
        let r = try await fetch.value
        #expect(moved >= .seconds(4) && moved < .seconds(60), "\(moved) of clock time for two 2 s stalls")
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
        // Exactly one blob of the right size is stored, and the liar's bytes left no temp file.
        // (Looking the corrupt bytes up by their own hash proves nothing: a fetch writes under the
        // hash it asked for, so that lookup is nil whatever happens.)
        #expect(s.stats.blobCount == 1)
        #expect(s.stats.usedBytes == Int64(blob.count))
        #expect(s.stats.reservedBytes == 0)
        #expect(try tempFiles().isEmpty)
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
