import Testing
@testable import MeshCore

struct TestChunk: RelayChunk, Equatable {
    var bytes: [UInt8]
    var byteCount: Int { bytes.count }
    func droppingFirst(_ n: Int) -> TestChunk { TestChunk(bytes: Array(bytes.dropFirst(n))) }
}

/// How a simulated source behaves.
enum SimSource: Sendable {
    case good
    /// Serves the blob with the byte at this offset flipped.
    case corrupt(at: Int)
    /// Fails once it has served the bytes up to this absolute offset.
    case dies(after: Int)
    /// Answers a range request with 200 and the whole body.
    case ignoresRange
    /// 404.
    case missing
    /// Answers a range request with a 206 for another offset.
    case wrongOffset
    /// Fails once at this absolute offset (a lost connection); asked again from there, it serves.
    case breaksOnce(at: Int)
}

/// Runs `CutThroughRelay` against simulated sources, as the node's shell does: what the caller
/// got, whether its body finished or was reset, and what the store committed.
struct RelaySim {
    var blob: [UInt8]
    var sources: [SimSource]
    var chunkSize: Int
    var callerAttached = true

    struct Outcome {
        var caller: [UInt8] = []
        var callerFinished = false
        var callerReset = false
        /// The caller's byte count at the moment its stream was reset.
        var callerBytesAtReset: Int?
        var stored: [UInt8]?
        var failed = false
        var requests: [(source: Int, from: Int64)] = []
        /// Bytes the caller had when the store's writer held the whole body (before commit).
        var callerBytesBeforeCommit: [Int] = []
        var resumes = 0
    }

    func body(of i: Int, from: Int) -> (bytes: [UInt8], status: Int, rangeStart: Int64?, failAt: Int?) {
        switch sources[i] {
        case .good: return (Array(blob[from...]), from > 0 ? 206 : 200, Int64(from), nil)
        case .corrupt(let at):
            var b = blob
            b[at] ^= 0xFF
            return (Array(b[from...]), from > 0 ? 206 : 200, Int64(from), nil)
        case .dies(let after): return (Array(blob[from...]), from > 0 ? 206 : 200, Int64(from), max(0, after - from))
        case .ignoresRange: return (blob, 200, nil, nil)
        case .missing: return ([], 404, nil, nil)
        case .wrongOffset: return (Array(blob[max(0, from - 1)...]), from > 0 ? 206 : 200, Int64(max(0, from - 1)), nil)
        case .breaksOnce(let at): return (Array(blob[from...]), from > 0 ? 206 : 200, Int64(from), from < at ? at - from : nil)
        }
    }

    func run(first: Int) -> Outcome {
        var out = Outcome()
        var relay = CutThroughRelay<TestChunk>(sourceCount: sources.count, first: first, size: Int64(blob.count), caller: callerAttached)
        var writer: [UInt8] = []
        var todo = relay.start()
        var current = body(of: first, from: 0)
        var steps = 0
        while !todo.isEmpty {
            steps += 1
            precondition(steps < 100_000, "relay loops")
            let a = todo.removeFirst()
            switch a {
            case .readBody:
                var sent = 0
                var died = false
                while sent < current.bytes.count {
                    if let f = current.failAt, sent >= f { died = true; break }
                    var n = min(chunkSize, current.bytes.count - sent)
                    if let f = current.failAt { n = min(n, f - sent) }
                    for x in relay.chunk(TestChunk(bytes: Array(current.bytes[sent..<(sent + n)]))) {
                        switch x {
                        case .write(let c): writer += c.bytes
                        case .forward(let c): out.caller += c.bytes
                        default: Issue.record("unexpected \(x) for a chunk")
                        }
                    }
                    sent += n
                }
                todo += died ? relay.sourceFailed("died") : relay.bodyEnded()
            case .commit:
                out.callerBytesBeforeCommit.append(out.caller.count)
                todo += writer == blob ? relay.committed() : relay.corrupt("digest mismatch")
                if writer == blob { out.stored = writer }
            case .forward(let c): out.caller += c.bytes
            case .write: Issue.record("write outside a body")
            case .finishCaller: out.callerFinished = true
            case .resetCaller:
                out.callerReset = true
                out.callerBytesAtReset = out.caller.count
            case .restartWriter: writer = []
            case .request(let j, let from):
                out.requests.append((j, from))
                current = body(of: j, from: Int(from))
                todo += relay.answered(status: current.status, rangeStart: current.status == 206 ? current.rangeStart : nil, total: Int64(blob.count))
            case .done: break
            case .fail: out.failed = true
            }
        }
        out.resumes = relay.resumes
        return out
    }
}

@Suite("Cut-through relay")
struct CutThroughTests {
    let blob = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }

    @Test("a good source: the caller gets every byte once, the last chunk only after the commit")
    func holdsBackTheLastChunk() {
        let out = RelaySim(blob: blob, sources: [.good], chunkSize: 1_000).run(first: 0)
        #expect(out.caller == blob)
        #expect(out.callerFinished && !out.callerReset)
        #expect(out.stored == blob)
        #expect(out.callerBytesBeforeCommit == [9_000])
    }

    @Test("a source dying mid-body: the next one continues from the same offset, nothing is sent twice")
    func resumesFromTheOffset() {
        let out = RelaySim(blob: blob, sources: [.dies(after: 4_500), .good], chunkSize: 1_000).run(first: 0)
        #expect(out.requests.map(\.source) == [1])
        #expect(out.requests.map(\.from) == [4_500])
        #expect(out.caller == blob)
        #expect(out.callerFinished)
        #expect(out.stored == blob)
    }

    @Test("a source that ignores the range (200): the bytes already received are skipped")
    func skipsWhatArrived() {
        let out = RelaySim(blob: blob, sources: [.dies(after: 3_333), .ignoresRange], chunkSize: 700).run(first: 0)
        #expect(out.caller == blob)
        #expect(out.stored == blob)
    }

    @Test("a 206 for another offset and a 404 are failed sources; the next one serves")
    func wrongAnswersAreSkipped() {
        let out = RelaySim(blob: blob, sources: [.dies(after: 5_000), .wrongOffset, .missing, .good], chunkSize: 1_000).run(first: 0)
        #expect(out.requests.map(\.source) == [1, 2, 3])
        #expect(out.requests.allSatisfy { $0.from == 5_000 })
        #expect(out.resumes == 1)   // one source died mid-body; the refusals that followed are not resumes
        #expect(out.caller == blob)
        #expect(out.stored == blob)
    }

    @Test("a corrupt body: the caller is reset before its last byte, the store starts over from the next source")
    func corruptResetsTheCaller() {
        let out = RelaySim(blob: blob, sources: [.corrupt(at: 9_999), .good], chunkSize: 1_000).run(first: 0)
        #expect(out.callerReset && !out.callerFinished)
        #expect(out.callerBytesAtReset == 9_000)
        #expect(out.caller.count < blob.count)
        #expect(out.requests.map(\.source) == [1])
        #expect(out.requests.map(\.from) == [0])
        #expect(out.stored == blob)
    }

    @Test("a source dying after its last byte (before the end of its stream): the body is verified as it is")
    func allBytesThenDeath() {
        let out = RelaySim(blob: blob, sources: [.dies(after: 10_000)], chunkSize: 1_000).run(first: 0)
        #expect(out.requests.isEmpty)
        #expect(out.caller == blob)
        #expect(out.stored == blob)
    }

    @Test("no source left: the caller is reset and the fetch fails (the source that broke mid-body was asked once more, and broke again)")
    func noSourceLeft() {
        let out = RelaySim(blob: blob, sources: [.dies(after: 2_000), .missing], chunkSize: 1_000).run(first: 0)
        #expect(out.failed)
        #expect(out.callerReset && !out.callerFinished)
        #expect(out.stored == nil)
        #expect(out.requests.map(\.source) == [1, 0])
        #expect(out.requests.map(\.from) == [2_000, 2_000])
    }

    @Test("the only source breaks mid-body once: it is asked again for the rest, and the caller gets the whole blob")
    func singleSourceRetriedOnce() {
        let out = RelaySim(blob: blob, sources: [.breaksOnce(at: 6_000)], chunkSize: 1_000).run(first: 0)
        #expect(out.requests.map(\.source) == [0])
        #expect(out.requests.map(\.from) == [6_000])
        #expect(out.caller == blob)
        #expect(out.callerFinished && !out.callerReset)
        #expect(out.stored == blob)
    }

    @Test("a second holder is preferred to asking the broken one again; a source that failed before any body byte is not asked again")
    func otherSourcesBeforeTheRetry() {
        let a = RelaySim(blob: blob, sources: [.breaksOnce(at: 3_000), .good], chunkSize: 1_000).run(first: 0)
        #expect(a.requests.map(\.source) == [1])
        #expect(a.stored == blob)
        // Source 0 answered and failed at once (no byte), then source 1 broke after sending bytes:
        // only source 1 is asked again.
        let b = RelaySim(blob: blob, sources: [.dies(after: 0), .breaksOnce(at: 5_000)], chunkSize: 1_000).run(first: 0)
        #expect(b.requests.map(\.source) == [1, 1])
        #expect(b.requests.map(\.from) == [0, 5_000])
        #expect(b.stored == blob)
    }

    /// Over many random meshes: a finished caller has exactly the blob; a reset caller never had
    /// a whole body; nothing but the blob is stored; at most one request per source.
    @Test("random meshes: never a complete wrong body, never a wrong store")
    func randomMeshes() {
        var rng = SplitMix64(seed: 0x13B)
        for round in 0..<2_000 {
            let size = Int(rng.next() % 5_000) + 1
            let blob = (0..<size).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let n = Int(rng.next() % 4) + 1
            let sources: [SimSource] = (0..<n).map { _ in
                switch rng.next() % 7 {
                case 0: .good
                case 1: .corrupt(at: Int(rng.next() % UInt64(size)))
                case 2: .dies(after: Int(rng.next() % UInt64(size + 1)))
                case 3: .ignoresRange
                case 4: .missing
                case 5: .breaksOnce(at: Int(rng.next() % UInt64(size + 1)))
                default: .wrongOffset
                }
            }
            let sim = RelaySim(blob: blob, sources: sources, chunkSize: Int(rng.next() % 2_000) + 1, callerAttached: rng.next() % 4 != 0)
            // The first source is one that answered 200.
            guard let first = sources.firstIndex(where: { if case .missing = $0 { false } else { true } }) else { continue }
            let out = sim.run(first: first)
            let context = "round \(round): \(sources), size \(size)"
            if out.callerFinished {
                #expect(out.caller == blob, "\(context)")
                #expect(!out.callerReset, "\(context)")
            }
            if out.callerReset { #expect(out.caller.count < size, "\(context)") }
            // An attached caller's body either ends (whole, verified) or is reset, never neither.
            if sim.callerAttached { #expect(out.callerFinished != out.callerReset, "\(context)") } else { #expect(out.caller.isEmpty) }
            #expect(out.stored == nil || out.stored == blob, "\(context)")
            #expect(out.failed == (out.stored == nil), "\(context)")
            // At most two requests per source; a second only for one that broke mid-body.
            for (i, source) in sources.enumerated() {
                let asked = out.requests.filter { $0.source == i }.count + (i == first ? 1 : 0)
                #expect(asked <= 2, "\(context)")
                if asked == 2 {
                    switch source {
                    case .dies, .breaksOnce: break
                    default: Issue.record("source \(i) (\(source)) asked twice: \(context)")
                    }
                }
            }
            for before in out.callerBytesBeforeCommit { #expect(before < size, "\(context)") }
        }
    }
}
