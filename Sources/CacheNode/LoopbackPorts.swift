import Foundation
import Synchronization

/// Ports for nodes started on one machine (`cachemesh demo`, tests, benchmarks) that listen on
/// TCP *and* UDP with the same number.
///
/// Asking the kernel for port 0 hands out a port from the ephemeral range — the same range every
/// outgoing connection and every QUIC client socket takes its local port from, so under load the
/// UDP half of a port picked that way is often taken by the time the node binds it ("address
/// already in use"). These ports come from below the ephemeral range instead, are checked free for
/// both TCP and UDP on 127.0.0.1, and are never handed out twice by one process.
public enum LoopbackPorts {
    private static let handedOut = Mutex<Set<Int>>([])

    /// A port free for TCP and UDP on 127.0.0.1, below the ephemeral range.
    public static func pick() -> Int? {
        let (low, _) = ephemeralRange()
        let upper = max(2_000, min(low, 65_536))
        let lower = max(1_024, upper - 12_000)
        for _ in 0..<500 {
            let port = Int.random(in: lower..<upper)
            let fresh = handedOut.withLock { $0.insert(port).inserted }
            guard fresh else { continue }
            if canBind(port, udp: false) && canBind(port, udp: true) { return port }
        }
        return nil
    }

    /// `/proc/sys/net/ipv4/ip_local_port_range` (Linux's default 32768–60999 if unreadable).
    static func ephemeralRange() -> (Int, Int) {
        guard let text = try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8) else { return (32_768, 60_999) }
        let parts = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).compactMap { Int($0) }
        return parts.count == 2 ? (parts[0], parts[1]) : (32_768, 60_999)
    }

    static func canBind(_ port: Int, udp: Bool) -> Bool {
        let fd = socket(AF_INET, Int32(udp ? SOCK_DGRAM.rawValue : SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }
}
