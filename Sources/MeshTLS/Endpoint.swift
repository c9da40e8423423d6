import NIOCore

extension SocketAddress {
    /// For logs and messages: "127.0.0.1:8443", "[::1]:8443", a Unix socket's path (NIO's own
    /// description is "[IPv4]127.0.0.1/127.0.0.1:8443").
    public var endpoint: String {
        switch self {
        case .v4: return "\(ipAddress ?? "?"):\(port ?? 0)"
        case .v6: return "[\(ipAddress ?? "?")]:\(port ?? 0)"
        case .unixDomainSocket: return pathname ?? "unix socket"
        }
    }
}
