import BlobStore
import Foundation
import Logging
import MeshHTTP
import NIOCore
import Synchronization
import Testing
@testable import CacheNode
@testable import CacheRoutes

/// `FillingBlob` (an S3 read-through forwarded while it arrives) over a real BlobStore: readers
/// that keep up forward the arriving buffers from memory, late ones read the temp file; nobody
/// gets the last chunk before the blob verified; a blob that does not verify is never whole.
@Suite("FillingBlob: verify while forwarding")
struct FillingBlobTests {
    static let chunk = 64 << 10

    /// A client draining a response body: what it received so far, and how it ended.
    final class Received: Sendable {
        let state = Mutex<(chunks: [ByteBuffer], count: Int, ended: Bool, error: String?)>(([], 0, false, nil))
    }

    final class Reader: Sendable {
        private let received = Received()
        private let done: Task<Void, Never>

        init(_ stream: HTTPOutboundStream) {
            let (signals, wake) = AsyncStream.makeStream(of: Void.self)
            stream.setOnReadable { wake.yield() }
            let received = received
            done = Task {
                let state = received
                var it = signals.makeAsyncIterator()
                while true {
                    switch stream.read(max: 1 << 20) {
                    case .data(let b):
                        state.state.withLock { $0.chunks.append(b); $0.count += b.readableBytes }
                    case .wouldBlock:
                        _ = await it.next()
                    case .end:
                        state.state.withLock { $0.ended = true }
                        return
                    case .failed(let e):
                        state.state.withLock { $0.error = "\(e)" }
                        return
                    }
                }
            }
        }

        var count: Int { received.state.withLock { $0.count } }
        func finished() async -> (bytes: [UInt8], ended: Bool, error: String?) {
            await done.value
            let s = received.state.withLock { $0 }
            var all = ByteBuffer()
            for var c in s.chunks { all.writeBuffer(&c) }
            return (Array(all.readableBytesView), s.ended, s.error)
        }
    }

    func store() throws -> (BlobStore, URL) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cm-filling-\(UUID())")
        return (try BlobStore(configuration: BlobStoreConfiguration(directory: dir.path, maxBytes: 64 << 20), logger: Logger(label: "t")), dir)
    }

    func waitFor(_ what: @autoclosure () -> Bool) async throws {
        let deadline = ContinuousClock.now + .seconds(120)   // a bound against hanging, not a timing check
        while !what() {
            guard ContinuousClock.now < deadline else { throw CancellationError() }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    @Test("A reader that keeps up is handed the arriving buffers (nothing read back from disk) and never the last chunk before the commit; a reader that starts late reads what left the window from the temp file; both get the whole blob")
    func keepUpAndLate() async throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = (0..<(3 << 20)).map { _ in UInt8.random(in: 0...255) }
        let hash = SHA256.hex(data)
        let fill = FillingBlob(hash: hash, store: store, windowBytes: 512 << 10)
        let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
        fill.attach(writer)
        fill.announce(size: Int64(data.count))
        let fast = Reader(fill.body())
        var late: Reader?
        var appended = 0
        while appended < data.count {
            let n = min(Self.chunk, data.count - appended)
            try fill.append(ByteBuffer(bytes: data[appended..<(appended + n)]))
            appended += n
            // Lockstep: the fast reader gets everything but the latest chunk.
            let upTo = appended - n
            try await waitFor(fast.count >= upTo)
            #expect(fast.count == upTo)
            if late == nil, appended >= data.count / 2 { late = Reader(fill.body()) }
        }
        try await waitFor((late?.count ?? 0) >= data.count - Self.chunk)
        // Before the commit: the last chunk is held back from every reader.
        try await Task.sleep(for: .milliseconds(50))
        #expect(fast.count == data.count - Self.chunk)
        #expect(late?.count == data.count - Self.chunk)
        let memoryBeforeLate = fill.forwardedBytes.memory
        _ = try await writer.commit()
        fill.finish(.committed)
        let f = await fast.finished()
        let l = try #require(await late?.finished())
        #expect(f.ended && f.error == nil && f.bytes == data)
        #expect(l.ended && l.error == nil && l.bytes == data)
        let forwarded = fill.forwardedBytes
        #expect(forwarded.disk > 0, "the late reader read from the temp file")
        #expect(forwarded.disk <= Int64(data.count) - Int64(512 << 10), "and from memory once it caught up with the window")
        #expect(forwarded.memory + forwarded.disk == 2 * Int64(data.count))
        #expect(memoryBeforeLate >= Int64(data.count - Self.chunk), "the fast reader forwarded the arriving buffers")
        #expect(store.size(of: hash) == Int64(data.count))
    }

    @Test("The window is bounded by the memory its buffers keep alive: slices of one large buffer count whole, so only the last stays and a late reader reads the rest from disk")
    func windowCountsStorage() async throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255) }
        let hash = SHA256.hex(data)
        let fill = FillingBlob(hash: hash, store: store, windowBytes: 512 << 10)
        let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
        fill.attach(writer)
        fill.announce(size: Int64(data.count))
        // As a socket read arrives: body parts that are slices of one 1 MiB buffer.
        let whole = ByteBuffer(bytes: data)
        for at in stride(from: 0, to: data.count, by: Self.chunk) {
            try fill.append(whole.getSlice(at: at, length: Self.chunk)!)
        }
        let late = Reader(fill.body())
        try await waitFor(late.count >= data.count - Self.chunk)
        _ = try await writer.commit()
        fill.finish(.committed)
        let got = await late.finished()
        #expect(got.ended && got.bytes == data)
        #expect(fill.forwardedBytes.memory <= Int64(Self.chunk), "only the last slice stayed in memory")
    }

    @Test("Once the bytes hashed to the key, the last chunk goes out and the response ends, before the commit has synced and published the blob")
    func lastChunkOnceVerified() async throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = (0..<(512 << 10)).map { _ in UInt8.random(in: 0...255) }
        let hash = SHA256.hex(data)
        let fill = FillingBlob(hash: hash, store: store)
        let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
        fill.attach(writer)
        fill.announce(size: Int64(data.count))
        let reader = Reader(fill.body())
        for at in stride(from: 0, to: data.count, by: Self.chunk) {
            try fill.append(ByteBuffer(bytes: data[at..<(at + Self.chunk)]))
        }
        try await waitFor(reader.count >= data.count - Self.chunk)
        #expect(reader.count == data.count - Self.chunk)
        fill.verified()
        let got = await reader.finished()
        #expect(got.ended && got.bytes == data)
        #expect(store.size(of: hash) == nil, "the commit has not happened yet")
        _ = try await writer.commit()
        fill.finish(.committed)
    }

    @Test("Bytes that do not hash to the key: every reader's stream fails before its last byte, nothing is stored")
    func mismatchNeverWhole() async throws {
        let (store, dir) = try store()
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255) }
        let hash = SHA256.hex(Array(data.reversed()))
        let fill = FillingBlob(hash: hash, store: store, windowBytes: 256 << 10)
        let writer = try await store.beginWrite(hash: hash, expectedSize: nil)
        fill.attach(writer)
        fill.announce(size: Int64(data.count))
        let fast = Reader(fill.body())
        var appended = 0
        while appended < data.count {
            let n = min(Self.chunk, data.count - appended)
            try fill.append(ByteBuffer(bytes: data[appended..<(appended + n)]))
            appended += n
        }
        let late = Reader(fill.body())
        try await waitFor(fast.count >= data.count - Self.chunk && late.count >= data.count - Self.chunk)
        do {
            _ = try await writer.commit()
            Issue.record("the writer verified bytes that do not hash to the key")
        } catch {
            fill.finish(.failed(error))
        }
        for r in [fast, late] {
            let got = await r.finished()
            #expect(!got.ended && got.error != nil)
            #expect(got.bytes.count == data.count - Self.chunk, "never the last chunk")
        }
        #expect(store.size(of: hash) == nil)
    }
}
