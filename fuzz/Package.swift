// swift-tools-version:6.0
//
// libFuzzer harnesses for CacheMesh (see README.md). A package of its own so the main package and
// its CI run never see it.
//
// The main package exports no library products (only the `cachemesh` executable), so this package
// cannot use its modules through a `.package(path: "..")` dependency. Instead it builds the main
// package's modules itself from the same sources: Sources/CacheMeshModules/<Module> are symlinks to
// ../Sources/<Module>. The target graph below mirrors ../Package.swift (keep them in step when a
// module's dependencies change). Being root-package modules here, they are built with
// `-enable-testing`, so harnesses may `@testable import` internal API (Route.parse).
import PackageDescription

let mods = "Sources/CacheMeshModules/"
// Internal symbols (e.g. CacheRoutes' `Route`) are reached through @testable import, also in release.
let testable: [SwiftSetting] = [.unsafeFlags(["-enable-testing"])]

let package = Package(
    name: "CacheMeshFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
    ],
    targets: [
        // ---- The main package's modules (symlinked sources, same graph as ../Package.swift) ----
        .systemLibrary(name: "CGnuTLS", path: mods + "CGnuTLS", pkgConfig: "gnutls"),
        .systemLibrary(name: "CNgtcp2", path: mods + "CNgtcp2", pkgConfig: "libngtcp2_crypto_gnutls"),
        .systemLibrary(name: "CNghttp2", path: mods + "CNghttp2", pkgConfig: "libnghttp2"),
        .systemLibrary(name: "CMeshSystem", path: mods + "CMeshSystem"),
        .target(name: "MeshTLS", dependencies: [
            "CGnuTLS", "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], path: mods + "MeshTLS", swiftSettings: testable),
        .target(name: "MeshHTTP", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Metrics", package: "swift-metrics"),
        ], path: mods + "MeshHTTP", swiftSettings: testable),
        .target(name: "MeshHTTP2", dependencies: [
            "CNghttp2", "MeshTLS", "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], path: mods + "MeshHTTP2", swiftSettings: testable),
        .target(name: "REAPI", dependencies: [
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], path: mods + "REAPI", swiftSettings: testable),
        .target(name: "MeshQUIC", dependencies: [
            "CNgtcp2", "CGnuTLS", "MeshTLS", "MeshHTTP",
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], path: mods + "MeshQUIC", swiftSettings: testable),
        .target(name: "MeshGRPC", dependencies: [
            "MeshHTTP",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], path: mods + "MeshGRPC", swiftSettings: testable),
        .target(name: "ContentDigest", path: mods + "ContentDigest", swiftSettings: testable),
        .target(name: "MeshCore", dependencies: [
            "ContentDigest",
            .product(name: "DequeModule", package: "swift-collections"),
            .product(name: "HeapModule", package: "swift-collections"),
        ], path: mods + "MeshCore", swiftSettings: testable),
        .target(name: "BlobStore", dependencies: [
            "CGnuTLS", "CMeshSystem", "ContentDigest",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ], path: mods + "BlobStore", swiftSettings: testable),
        .target(name: "MeshS3", dependencies: [
            "CGnuTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ], path: mods + "MeshS3", swiftSettings: testable),
        .target(name: "MeshShell", dependencies: [
            "BlobStore", "MeshCore", "MeshHTTP", "MeshHTTP2", "MeshQUIC", "MeshTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ], path: mods + "MeshShell", swiftSettings: testable),
        .target(name: "CacheRoutes", dependencies: [
            "BlobStore", "MeshShell", "MeshHTTP", "MeshTLS", "MeshGRPC", "REAPI",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ], path: mods + "CacheRoutes", swiftSettings: testable),

        // ---- Fuzz targets: each defines LLVMFuzzerTestOneInput and a @main that runs libFuzzer ----
        .target(name: "FuzzSupport", path: "Sources/FuzzSupport"),
        .executableTarget(name: "fuzz-gossip", dependencies: ["FuzzSupport", "MeshCore"],
                          path: "Sources/fuzz-gossip"),
        .executableTarget(name: "fuzz-route", dependencies: ["FuzzSupport", "CacheRoutes"],
                          path: "Sources/fuzz-route"),
        .executableTarget(name: "fuzz-grpc", dependencies: [
            "FuzzSupport", "MeshGRPC", "MeshHTTP", "MeshTLS", "REAPI", "CacheRoutes", "BlobStore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "Logging", package: "swift-log"),
        ], path: "Sources/fuzz-grpc"),
        .executableTarget(name: "fuzz-h2", dependencies: [
            "FuzzSupport", "MeshHTTP2", "MeshHTTP", .product(name: "NIOCore", package: "swift-nio"),
        ], path: "Sources/fuzz-h2"),
        .executableTarget(name: "fuzz-http-head", dependencies: ["FuzzSupport", "MeshHTTP", "MeshGRPC"],
                          path: "Sources/fuzz-http-head"),
        .executableTarget(name: "fuzz-qpack", dependencies: ["FuzzSupport", "CNgtcp2", "MeshHTTP"],
                          path: "Sources/fuzz-qpack"),
    ]
)
