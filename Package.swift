// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "CacheMesh",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "cachemesh", targets: ["cachemesh"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        // C bindings (system libraries through pkg-config; shim.h wraps macros).
        .systemLibrary(name: "CGnuTLS", pkgConfig: "gnutls", providers: [.apt(["libgnutls28-dev"])]),
        .systemLibrary(name: "CMeshSystem"),
        .systemLibrary(name: "CNgtcp2", pkgConfig: "libngtcp2_crypto_gnutls",
                       providers: [.apt(["libngtcp2-crypto-gnutls-dev", "libngtcp2-dev", "libnghttp3-dev"])]),
        .systemLibrary(name: "CNghttp2", pkgConfig: "libnghttp2", providers: [.apt(["libnghttp2-dev"])]),

        // GnuTLS credentials, sessions, the peer identity + role a certificate proves, SHA-256.
        .target(name: "MeshTLS", dependencies: [
            "CGnuTLS", "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Transport-neutral HTTP (no C library): request head, response, bodies, service protocol,
        // peer identity and role, the drain state machine, response heads, outbound body pump, `HostPort`.
        .target(name: "MeshHTTP", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // nghttp2 session wrapper, NIO handlers, HTTP/2 server and client.
        .target(name: "MeshHTTP2", dependencies: [
            "CNghttp2", "MeshTLS", "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // REAPI v2 / ByteStream / google.rpc protobuf messages (generated once by protos/generate.sh, committed).
        .target(name: "REAPI", dependencies: [
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        // QUIC + HTTP/3 (ngtcp2 0.12.1 + nghttp3 0.8.0 + GnuTLS) server and client on NIO UDP.
        .target(name: "MeshQUIC", dependencies: [
            "CNgtcp2", "CGnuTLS", "MeshTLS", "MeshHTTP",
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // gRPC over our HTTP/2 (and later HTTP/3): framing, status, deadlines, method dispatch.
        .target(name: "MeshGRPC", dependencies: [
            "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        // The one content digest (SHA-256 as four words + size) of the store, the mesh and the routes.
        .target(name: "ContentDigest"),
        // The mesh's pure protocol core: SWIM membership, locality map, rendezvous, hedging (no I/O).
        .target(name: "MeshCore", dependencies: [
            "ContentDigest",
            .product(name: "DequeModule", package: "swift-collections"),
            .product(name: "HeapModule", package: "swift-collections"),
        ]),
        // Bounded on-disk CAS + AC.
        .target(name: "BlobStore", dependencies: [
            "CGnuTLS", "CMeshSystem", "ContentDigest",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // S3 client (SigV4 via GnuTLS, HTTP/1.1 keep-alive on NIO, retries, metrics) for the S3-backed origin.
        .target(name: "MeshS3", dependencies: [
            "CGnuTLS", "MeshTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // The mesh shell: runs MeshCore on a clock, gossip over HTTP, racing fetches (BlobFetcher),
        // mirroring, anti-entropy, and MeshHooks (what the routes ask of the mesh).
        .target(name: "MeshShell", dependencies: [
            "BlobStore", "MeshCore", "MeshHTTP", "MeshHTTP2", "MeshQUIC", "MeshTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // The node's routes (/cas, /ac, /mesh, /status, /metrics) and REAPI gRPC services over the store.
        .target(name: "CacheRoutes", dependencies: [
            "BlobStore", "MeshShell", "MeshHTTP", "MeshTLS", "MeshGRPC", "REAPI",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // The client library (`cachemesh get/put/status`, bench drivers): CacheClient, MeshClient, FileSource.
        .target(name: "CacheMeshClient", dependencies: [
            "BlobStore", "MeshHTTP", "MeshHTTP2", "MeshQUIC", "MeshTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The node: configuration and topology files, the S3 tier, wiring and lifecycle (`CacheNode` service).
        .target(name: "CacheNode", dependencies: [
            "BlobStore", "MeshHTTP", "MeshHTTP2", "MeshTLS", "MeshCore", "MeshQUIC", "MeshS3", "MeshShell", "CacheRoutes",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "TOMLKit", package: "TOMLKit"),
        ]),
        // Userspace link emulator (delay, jitter, loss, rate) for TCP and UDP: `cachemesh relay`.
        .target(name: "LinkEmulator", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "cachemesh", dependencies: [
            "CacheNode", "CacheRoutes", "MeshShell", "CacheMeshClient", "CMeshSystem", "MeshCore", "BlobStore", "LinkEmulator",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),

        .testTarget(name: "BlobStoreTests", dependencies: [
            "BlobStore",
            .product(name: "MetricsTestKit", package: "swift-metrics"),
        ]),
        // Shared by the test targets: repository root and the certificates certs/mkcerts.sh makes.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "MeshHTTP2Tests", dependencies: ["MeshHTTP2", "MeshHTTP", "MeshTLS", "TestSupport"]),
        .testTarget(name: "CacheNodeTests", dependencies: ["CacheNode", "CacheRoutes", "MeshShell", "CacheMeshClient", "BlobStore", "MeshGRPC", "MeshHTTP", "REAPI", "MeshS3"]),
        .testTarget(name: "MeshCoreTests", dependencies: ["MeshCore"]),
        .testTarget(name: "MeshQUICTests", dependencies: [
            "TestSupport",
            "MeshQUIC", "MeshHTTP", "MeshTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "MeshS3Tests", dependencies: ["MeshS3", "TestSupport",
            .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "MeshGRPCTests", dependencies: ["MeshGRPC", "MeshHTTP"]),
        .testTarget(name: "LinkEmulatorTests", dependencies: [
            "LinkEmulator",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "IntegrationTests", dependencies: ["CacheNode", "CacheRoutes", "MeshShell", "CacheMeshClient", "MeshCore", "MeshHTTP2", "MeshTLS", "MeshGRPC", "MeshHTTP", "MeshQUIC", "REAPI", "BlobStore", "TestSupport"]),
    ]
)
