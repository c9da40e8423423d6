import Foundation
import Testing
@testable import BlobStore

/// The startup scan on several threads builds the same index as on one: the same entries, sizes,
/// mtimes and accounting, the same LRU order (mtime, then hash, then kind — whichever thread found
/// an entry first), and the same stray files removed. The store is written directly, not through
/// the API, with few distinct mtimes so that most entries tie on mtime.
@Suite struct ParallelScanTests {
    static let baseMtime: Int64 = 1_700_000_000

    /// What the test wrote that the scan must index: (kind, hash, size, mtime).
    struct Entry: Equatable, CustomStringConvertible {
        var kind: EntryKind
        var hash: String
        var size: Int64
        var mtime: Int64
        var description: String { "\(kind) \(hash.prefix(12)) \(size) \(mtime)" }
    }

    struct WriteFailed: Error { var path: String }

    private func write(_ path: String, _ bytes: [UInt8], mtime: Int64) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw WriteFailed(path: path) }
        defer { close(fd) }
        let written = bytes.withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
        var times = [timespec(tv_sec: Int(mtime), tv_nsec: 0), timespec(tv_sec: Int(mtime), tv_nsec: 0)]
        guard written == bytes.count, futimens(fd, &times) == 0 else { throw WriteFailed(path: path) }
    }

    /// 3,000 blobs and 200 action entries over all prefix directories with 7 distinct mtimes, and
    /// stray files of every kind the scan removes. Returns the valid entries.
    private func writeStore(_ root: String) throws -> [Entry] {
        let fm = FileManager.default
        for base in ["cas", "ac"] {
            for p in 0..<256 { try fm.createDirectory(atPath: "\(root)/\(base)/\(BlobStore.hexPrefix(p))", withIntermediateDirectories: true) }
        }
        var entries: [Entry] = []
        for i in 0..<3_000 {
            let bytes = blob(UInt64(50_000 + i), size: 16 + i % 97)
            let hash = hashOf(bytes)
            let mtime = Self.baseMtime + Int64(i % 7)
            try write("\(root)/cas/\(hash.prefix(2))/\(hash)", bytes, mtime: mtime)
            entries.append(Entry(kind: .cas, hash: hash, size: Int64(bytes.count), mtime: mtime))
        }
        for i in 0..<200 {
            let key = hashOf(Array("action \(i)".utf8))
            let value = blob(UInt64(90_000 + i), size: 10 + i % 5)
            let mtime = Self.baseMtime + Int64(i % 3)
            try write("\(root)/ac/\(key.prefix(2))/\(key)", value, mtime: mtime)
            entries.append(Entry(kind: .ac, hash: key, size: Int64(value.count), mtime: mtime))
        }
        // An action entry and a blob under the same hash: told apart by kind.
        let shared = entries[0].hash
        try write("\(root)/ac/\(shared.prefix(2))/\(shared)", [1, 2, 3], mtime: entries[0].mtime)
        entries.append(Entry(kind: .ac, hash: shared, size: 3, mtime: entries[0].mtime))
        // Strays: a zero-length blob, a bad name, a hash in the wrong prefix directory, a directory.
        let zero = hashOf(blob(1, size: 10))
        try write("\(root)/cas/\(zero.prefix(2))/\(zero)", [], mtime: Self.baseMtime)
        try write("\(root)/cas/00/not-a-hash", [1], mtime: Self.baseMtime)
        let misplaced = hashOf(blob(2, size: 10))
        let wrong = misplaced.hasPrefix("ff") ? "fe" : "ff"
        try write("\(root)/cas/\(wrong)/\(misplaced)", [1], mtime: Self.baseMtime)
        try fm.createDirectory(atPath: "\(root)/ac/17/\(String(repeating: "1", count: 64))", withIntermediateDirectories: true)
        return entries
    }

    private func indexed(_ store: BlobStore) -> [Entry] {
        store.state.withLock { s in
            s.index.slotsInOrder().map { slot in
                let key = s.index.key(slot)
                return Entry(kind: key.kind, hash: key.hash, size: s.index.size(slot), mtime: s.index.persistedMtime(slot))
            }
        }
    }

    private func files(_ root: String) -> Set<String> {
        Set(FileManager.default.enumerator(atPath: root)?.compactMap { $0 as? String } ?? [])
    }

    @Test func severalThreadsIndexLikeOne() throws {
        let one = try TempDir(), four = try TempDir()
        defer { one.remove(); four.remove() }
        let written = try writeStore(one.path)
        #expect(Set(written.map { "\($0.kind) \($0.hash)" }).count == written.count)
        #expect(try writeStore(four.path) == written)
        let serial = try makeStore(one, maxBytes: 1 << 40) { $0.scanThreads = 1 }
        let parallel = try makeStore(four, maxBytes: 1 << 40) { $0.scanThreads = 4 }

        // What was written, oldest first; equal mtimes by hash, a blob before an action entry.
        let expected = written.sorted { a, b in
            if a.mtime != b.mtime { return a.mtime < b.mtime }
            if a.hash != b.hash { return a.hash < b.hash }
            return a.kind == .cas && b.kind == .ac
        }
        let serialIndex = indexed(serial), parallelIndex = indexed(parallel)
        #expect(serialIndex.count == expected.count && parallelIndex.count == expected.count)
        #expect(serialIndex == expected)
        #expect(parallelIndex == expected)
        if let i = serialIndex.indices.first(where: { $0 < parallelIndex.count && serialIndex[$0] != parallelIndex[$0] }) {
            Issue.record("first difference at \(i): serial \(serialIndex[i]), parallel \(parallelIndex[i])")
        }
        for store in [serial, parallel] {
            let stats = store.stats
            #expect(stats.blobCount == 3_000 && stats.actionCount == 201)
            #expect(stats.usedBytes == written.reduce(0) { $0 + $1.size })
            let progress = store.indexProgress
            #expect(progress.complete && progress.scannedDirectories == 512 && progress.scannedEntries == expected.count)
        }
        // The same strays removed, the same files left.
        #expect(files(one.path) == files(four.path))
        #expect(!one.exists("\(one.path)/cas/00/not-a-hash") && !four.exists("\(four.path)/cas/00/not-a-hash"))
        #expect(!four.exists("\(four.path)/ac/17/\(String(repeating: "1", count: 64))"))
    }

    @Test func threadCountIsBounded() {
        #expect(BlobStore.scanThreadCount(1) == 1)
        #expect(BlobStore.scanThreadCount(3) == 3)
        #expect(BlobStore.scanThreadCount(100) == 8)
        #expect((1...8).contains(BlobStore.scanThreadCount(0)))
    }
}
