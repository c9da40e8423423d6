import Foundation

/// Shared by every test target: the repository root, and one set of test certificates per test
/// process made by the repository's own `certs/mkcerts.sh all DIR` (CA, node, client, reader,
/// a foreign CA and a stranger), so tests exercise the same script users run.
public enum RepositoryCertificates {
    /// The package root (this file is Tests/TestSupport/RepositoryCertificates.swift; symlinks resolved).
    public static let repositoryRoot: String = {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
        let resolved = realpath(#filePath, &buf) != nil ? String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : #filePath
        var url = URL(fileURLWithPath: resolved)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// certs/mkcerts.sh of the repository.
    public static var script: String { "\(repositoryRoot)/certs/mkcerts.sh" }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    private static let made: Result<String, Failure> = {
        let dir = (NSTemporaryDirectory() as NSString).appendingPathComponent("cachemesh-test-certs-\(getpid())-\(UUID().uuidString.prefix(6))")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script, "all", dir]
        p.standardOutput = FileHandle.nullDevice
        let errPath = dir + ".err"
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: errPath)
        do { try p.run() } catch { return .failure(Failure(description: "cannot run \(script): \(error)")) }
        p.waitUntilExit()
        let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(atPath: errPath)
        guard p.terminationStatus == 0, FileManager.default.fileExists(atPath: dir + "/stranger.pem") else {
            return .failure(Failure(description: "\(script) all \(dir) failed (\(p.terminationStatus)): \(err)"))
        }
        return .success(dir)
    }()

    /// The directory holding ca.pem, node.pem/.key, client.pem/.key, reader.pem/.key, … (made once).
    public static func directory() throws -> String { try made.get() }
}

/// Polls `condition` every 50 ms until it holds or `timeout` seconds pass; returns whether it held.
public func eventually(timeout: Double = 10, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
    while true {
        if try await condition() { return true }
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: .milliseconds(50))
    }
}
