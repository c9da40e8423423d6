import Foundation
import Testing
import Logging
import MetricsTestKit
@testable import BlobStore

/// A fresh directory under the system temp dir, deleted by `remove()`.
struct TempDir {
    let path: String

    init() throws {
        let url = FileManager.default.temporaryDirectory
            .appendingPathComponent("blobstore-tests-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        path = url.path
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }

    func casPath(_ hash: String) -> String { "\(path)/cas/\(hash.prefix(2))/\(hash)" }
    func acPath(_ key: String) -> String { "\(path)/ac/\(key.prefix(2))/\(key)" }
    func exists(_ p: String) -> Bool { FileManager.default.fileExists(atPath: p) }
    func tmpContents() -> [String] { (try? FileManager.default.contentsOfDirectory(atPath: path + "/tmp")) ?? [] }

    /// All regular files below cas/ with their sizes.
    func casFiles() -> [String: Int64] {
        var result: [String: Int64] = [:]
        let fm = FileManager.default
        for prefix in (try? fm.contentsOfDirectory(atPath: path + "/cas")) ?? [] {
            for name in (try? fm.contentsOfDirectory(atPath: "\(path)/cas/\(prefix)")) ?? [] {
                let attrs = try? fm.attributesOfItem(atPath: "\(path)/cas/\(prefix)/\(name)")
                result[name] = (attrs?[.size] as? NSNumber)?.int64Value ?? -1
            }
        }
        return result
    }

    func setMTime(_ p: String, secondsAgo: Double) throws {
        try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSinceNow: -secondsAgo)], ofItemAtPath: p)
    }
}

/// Runs `body` with a fresh temp directory that is deleted afterwards.
func withTempDir<T>(_ body: (TempDir) async throws -> T) async throws -> T {
    let dir = try TempDir()
    defer { dir.remove() }
    return try await body(dir)
}

func makeStore(_ dir: TempDir, maxBytes: Int64, metrics: TestMetrics? = nil,
               configure: (inout BlobStoreConfiguration) -> Void = { _ in }) throws -> BlobStore {
    var config = BlobStoreConfiguration(directory: dir.path, maxBytes: maxBytes)
    configure(&config)
    var logger = Logger(label: "test.blobstore")
    logger.logLevel = .critical
    return try BlobStore(configuration: config, logger: logger, metricsFactory: metrics ?? TestMetrics())
}

/// Deterministic pseudo-random bytes (distinct per seed).
func blob(_ seed: UInt64, size: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 &+ 0xD1B5_4A32_D192_ED03
    var out = [UInt8]()
    out.reserveCapacity(size)
    for _ in 0..<size {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        out.append(UInt8(truncatingIfNeeded: state))
    }
    return out
}

func hashOf(_ bytes: [UInt8]) -> String { SHA256.hex(bytes) }

struct TimeoutError: Error {}

/// Fails with `TimeoutError` if `body` does not finish within `seconds`.
func withTimeout<T: Sendable>(_ seconds: Double, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(nanoseconds: UInt64(seconds * 1_000_000_000))
            throw TimeoutError()
        }
        let result = try await group.next()!
        group.cancelAll()
        return result
    }
}

/// Asserts that `body` throws a `BlobStoreError` matching `matches`.
func expectStoreError(_ matches: (BlobStoreError) -> Bool, sourceLocation: SourceLocation = #_sourceLocation,
                      _ body: () async throws -> Void) async {
    do {
        try await body()
        Issue.record("expected an error, none was thrown", sourceLocation: sourceLocation)
    } catch let error as BlobStoreError {
        #expect(matches(error), "unexpected error \(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected error type \(error)", sourceLocation: sourceLocation)
    }
}
