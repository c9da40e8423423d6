import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix

/// HTTP/2 connections over TLS/TCP (or h2c without credentials), one per peer.
public typealias HTTP2ConnectionPool = HTTPConnectionPool<HTTP2Connection>

extension HTTP2Connection: PooledHTTPConnection {}

extension HTTPConnectionPool where Connection == HTTP2Connection {
    public init(credentials: TLSCredentials?, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                logger: Logger = Logger(label: "cachemesh.h2pool")) {
        self.init { host, port in
            try await HTTP2Connection.connect(host: host, port: port, credentials: credentials, group: group, logger: logger)
        }
    }
}
