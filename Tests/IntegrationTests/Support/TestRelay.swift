import Foundation
import TestSupport

/// `cachemesh relay` in front of a target (a link emulator: delay, jitter, loss, rate), started on
/// 127.0.0.1:0; ready once it printed `relay: listening 127.0.0.1:PORT -> …`.
final class TestRelay: @unchecked Sendable {
    let child: ChildProcess
    let port: Int
    var address: String { "127.0.0.1:\(port)" }

    private init(child: ChildProcess, port: Int) {
        self.child = child
        self.port = port
    }

    /// `profile` are relay flags, e.g. `["--delay", "20ms"]`; `udpPort` when the target's QUIC port
    /// differs from its TCP port.
    static func start(targetPort: Int, udpPort: Int? = nil, profile: [String] = [], startupTimeout: Double = 30) async throws -> TestRelay {
        let link = "127.0.0.1:0=127.0.0.1:\(targetPort)" + (udpPort.map { ",udp=\($0)" } ?? "")
        let child = try ChildProcess([try Paths.cachemesh(), "relay", "--link", link] + profile)
        let prefix = "relay: listening 127.0.0.1:"
        var port: Int?
        _ = await eventually(timeout: startupTimeout) {
            if let line = child.stdout.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }),
               let p = Int(line.dropFirst(prefix.count).prefix(while: \.isNumber)) {
                port = p
                return true
            }
            return child.hasExited
        }
        guard let port else {
            child.killAndWait()
            throw HarnessError("relay did not start: `\(child.commandLine)`\nstdout: \(child.stdout)\nstderr: \(child.stderr.suffix(2000))")
        }
        return TestRelay(child: child, port: port)
    }

    /// The value of `key` in one section ("tcp" or "udp") of a counters line
    /// (`relay: counters … tcp: connections=1 … bytes_to_client=…; udp: mappings=1 …`), parsed
    /// as a number (a substring match would take `connections=1` for `connections=10`); nil if absent.
    static func counter(_ key: String, section: String, in line: String) -> Int64? {
        guard let part = line.components(separatedBy: "\(section): ").dropFirst().first else { return nil }
        for field in part.split(whereSeparator: { $0 == " " || $0 == ";" }) {
            let kv = field.split(separator: "=")
            if kv.count == 2 && kv[0] == key { return Int64(kv[1]) }
        }
        return nil
    }

    /// SIGTERM, wait; returns the exit status and the counters line(s) it printed.
    func stop() async -> (status: Int32?, counters: String) {
        child.signal(SIGTERM)
        let exit = await child.waitForExit(timeout: 10)
        if exit == nil { child.killAndWait() }
        return (exit?.status, child.stdout.split(separator: "\n").filter { $0.hasPrefix("relay: counters") }.joined(separator: "\n"))
    }
}
