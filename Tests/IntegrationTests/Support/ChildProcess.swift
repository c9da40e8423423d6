import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
import TestSupport
#endif

/// Errors raised by the test harness itself (not by the product).
struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A child process started by a test. Its stdout/stderr go to files (no pipe can fill up and
/// block it); it is only ever signalled by its own PID, and only while it has not exited.
final class ChildProcess: @unchecked Sendable {
    let process = Process()
    let stdoutPath: String
    let stderrPath: String
    let commandLine: String
    private let exit = Mutex<(status: Int32, signalled: Bool)?>(nil)

    /// Starts `arguments[0]` (looked up in PATH unless it contains a slash).
    init(_ arguments: [String], environment: [String: String]? = nil, outputDirectory: String? = nil) throws {
        precondition(!arguments.isEmpty)
        let dir = outputDirectory ?? NSTemporaryDirectory()
        let tag = "\(URL(fileURLWithPath: arguments[0]).lastPathComponent)-\(UUID().uuidString.prefix(8))"
        stdoutPath = (dir as NSString).appendingPathComponent("\(tag).stdout")
        stderrPath = (dir as NSString).appendingPathComponent("\(tag).stderr")
        commandLine = arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        guard FileManager.default.createFile(atPath: stdoutPath, contents: nil),
              FileManager.default.createFile(atPath: stderrPath, contents: nil) else {
            throw HarnessError("cannot create output files in \(dir)")
        }
        process.executableURL = URL(fileURLWithPath: try Self.resolve(arguments[0]))
        process.arguments = Array(arguments.dropFirst())
        if let environment {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: stdoutPath))
        let err = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        defer {
            try? out.close()
            try? err.close()
        }
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        process.terminationHandler = { [weak self] p in
            guard let self else { return }
            self.exit.withLock { $0 = (p.terminationStatus, p.terminationReason == .uncaughtSignal) }
        }
        try process.run()
    }

    static func resolve(_ name: String) throws -> String {
        if name.contains("/") { return name }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        throw HarnessError("\(name) not found in PATH")
    }

    var pid: Int32 { process.processIdentifier }

    /// `(status, signalled)` once the process has exited and was reaped.
    var exitStatus: (status: Int32, signalled: Bool)? { exit.withLock { $0 } }
    var hasExited: Bool { exitStatus != nil }

    /// Sends `sig` to this child's PID, unless it already exited.
    func signal(_ sig: Int32) {
        guard !hasExited, process.isRunning else { return }
        _ = kill(pid, sig)
    }

    /// Waits (bounded) for the exit; returns nil on timeout.
    @discardableResult
    func waitForExit(timeout: Double) async -> (status: Int32, signalled: Bool)? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let e = exitStatus { return e }
            if Date() >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// SIGKILL (if still running) and wait for it to be reaped. Safe to call repeatedly.
    func killAndWait() {
        guard !hasExited else { return }
        signal(SIGKILL)
        process.waitUntilExit()
        // terminationHandler may run slightly later; the process is reaped either way.
    }

    var stdoutData: Data { FileManager.default.contents(atPath: stdoutPath) ?? Data() }
    var stdout: String { String(decoding: stdoutData, as: UTF8.self) }
    var stderr: String { String(decoding: FileManager.default.contents(atPath: stderrPath) ?? Data(), as: UTF8.self) }

    func removeOutputFiles() {
        try? FileManager.default.removeItem(atPath: stdoutPath)
        try? FileManager.default.removeItem(atPath: stderrPath)
    }

    deinit {
        // Last line of defence: never leave a child behind.
        if exitStatus == nil && process.isRunning { _ = kill(process.processIdentifier, SIGKILL) }
    }
}

struct ProcessResult: Sendable, CustomStringConvertible {
    var command: String
    var status: Int32
    var signalled: Bool
    var stdoutData: Data
    var stderr: String
    var stdout: String { String(decoding: stdoutData, as: UTF8.self) }
    var description: String {
        "`\(command)` exited \(signalled ? "by signal " : "")\(status); stdout: \(stdout.prefix(2000)); stderr: \(stderr.prefix(2000))"
    }
}

/// Runs a command to completion (killing it after `timeout` seconds, which is an error).
func run(_ arguments: [String], timeout: Double = 120, environment: [String: String]? = nil) async throws -> ProcessResult {
    let child = try ChildProcess(arguments, environment: environment)
    defer {
        child.killAndWait()
        child.removeOutputFiles()
    }
    guard let e = await child.waitForExit(timeout: timeout) else {
        child.killAndWait()
        throw HarnessError("`\(child.commandLine)` did not finish within \(timeout) s; stderr: \(child.stderr.suffix(2000))")
    }
    return ProcessResult(command: child.commandLine, status: e.status, signalled: e.signalled, stdoutData: child.stdoutData, stderr: child.stderr)
}

/// Runs `body` but fails with `HarnessError` if it does not finish within `seconds`.
func withDeadline<T: Sendable>(_ seconds: Double, _ what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            throw HarnessError("\(what) did not finish within \(Int(seconds)) s")
        }
        return value
    }
}


// MARK: - Files

/// A fresh temporary directory, removed by `remove()`.
struct TempDir: Sendable {
    let path: String
    init(_ label: String) throws {
        path = (NSTemporaryDirectory() as NSString).appendingPathComponent("cachemesh-it-\(label)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// `n` random bytes (from /dev/urandom; fast even in debug builds).
func randomBytes(_ n: Int) -> [UInt8] {
    guard n > 0 else { return [] }
    let h = FileHandle(forReadingAtPath: "/dev/urandom")!
    defer { try? h.close() }
    var out = [UInt8]()
    out.reserveCapacity(n)
    while out.count < n {
        let d = h.readData(ofLength: n - out.count)
        out.append(contentsOf: d)
    }
    return out
}

/// Writes a random file of `size` bytes with `head -c … /dev/urandom`.
func makeRandomFile(_ path: String, size: Int) async throws {
    let r = try await run(["/bin/sh", "-c", "head -c \(size) /dev/urandom > '\(path)'"])
    guard r.status == 0 else { throw HarnessError("cannot make \(path): \(r)") }
}

/// SHA-256 of a file with the system's `sha256sum` (independent of the product's hashing).
func sha256sum(_ path: String) async throws -> String {
    let r = try await run(["sha256sum", path])
    guard r.status == 0, let h = r.stdout.split(separator: " ").first, h.count == 64 else {
        throw HarnessError("sha256sum \(path) failed: \(r)")
    }
    return String(h)
}

func fileSize(_ path: String) -> Int64 {
    ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.int64Value ?? -1
}
