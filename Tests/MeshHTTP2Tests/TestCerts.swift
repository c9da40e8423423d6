import Foundation

/// Certificates made once per test process with the repository's own certs/mkcerts.sh.
enum TestCerts {
    static let dir: String = {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("cachemesh-unit-certs-\(getpid())").path
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("certs/mkcerts.sh").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script, "all", d]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try! p.run()
        p.waitUntilExit()
        precondition(p.terminationStatus == 0, "certs/mkcerts.sh failed")
        return d
    }()

    static func path(_ name: String) -> String { "\(dir)/\(name)" }
}
