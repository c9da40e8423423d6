// `cachemesh node`: one node of the mesh, run until SIGTERM or SIGINT drains it.

import ArgumentParser
import BlobStore
import CacheNode
import MeshShell
import CacheRoutes
import CacheMeshClient
import CMeshSystem
import Foundation
import Logging
import MeshHTTP
import MeshHTTP2
import MeshTLS
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle
import Synchronization
#if canImport(Glibc)
import Glibc
#endif


struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node", abstract: "Run a cache node until SIGTERM/SIGINT (then drain with GOAWAY).",
        discussion: """
        The first SIGTERM or SIGINT drains: GOAWAY to every connection, requests in flight get up to \
        drain_seconds (default 30) to finish, a mesh node hands off its sole copies; then exit 0. A \
        second SIGTERM/SIGINT stops at once (exit 128+N: 130 for SIGINT, 143 for SIGTERM). If the \
        grace period ends with requests in flight they are cut, logged, and the node exits 3.
        """)

    @Option(help: "TOML config file; flags given on the command line override it.") var config: String?
    @Option(help: "Mesh topology file (topology/*.toml); with --name, run that node of the mesh.") var topology: String?
    @Option(help: "Node name (default: node; with --topology, required).") var name: String?
    @Option(name: .customLong("fetch-strategy"), help: "With --topology: override [fetch] strategy (hedged | immediate | peers-only | origin-only; default: the topology's, else hedged).") var fetchStrategy: String?
    @Option(name: .customLong("mesh-transport"), help: "With --topology: override [fetch] transport between nodes (quic | tcp | adaptive; default: the topology's).") var meshTransport: String?
    @Option(help: "TCP listen address host:port; port 0 picks a free port (default: 127.0.0.1:8443).") var listen: String?
    @Option(name: .customLong("quic-listen"), help: "UDP address host:port for QUIC + HTTP/3, e.g. the same as --listen (default: none, no QUIC).") var quicListen: String?
    @Option(name: .customLong("quic-max-datagram"), help: "Largest UDP payload QUIC sends (default 1452 with path MTU discovery; 8952 for 9000-byte jumbo frames, only where every path carries it).") var quicMaxDatagram: Int?
    @Option(name: .customLong("quic-address-validation"), help: "Retry before new QUIC connections: auto (only under a handshake flood), always, never (default: auto).") var quicAddressValidation: QUICAddressValidationMode?
    @Option(name: .customLong("data-dir"), help: "Directory for blobs; created if absent, must be writable (default: ./cachemesh-data).") var dataDir: String?
    // `.unconditional`: `--max-bytes -1` reaches `validate()` (and is refused as negative)
    // instead of ArgumentParser taking -1 for a flag and saying "Missing value".
    @Option(name: .customLong("max-bytes"), parsing: .unconditional,
            help: "Store capacity: an integer with K, M, G or T (powers of 1024), e.g. 10G, 512M; at least 1M. A number without a unit is bytes. (default: 10G)")
    var maxBytes: String?
    @Option(help: "Node certificate chain (PEM; required unless --insecure).") var cert: String?
    @Option(help: "Node private key (PEM; required with --cert).") var key: String?
    @Option(help: "Mesh CA certificate (PEM); client certificates must chain to it (required unless --insecure).") var ca: String?
    @Flag(name: .customLong("allow-unauthenticated-reads"), help: "TLS without a client certificate gets the read-only reader role.") var allowUnauthenticatedReads = false
    @Flag(help: "Plaintext HTTP/2 (h2c). Local experiments only.") var insecure = false
    @Option(name: .customLong("local-listen"), help: "Local worker endpoint host:port for this machine's build tools (Bazel http:// and grpc:// caches, ccache): plaintext HTTP/1.1, h2c and gRPC; loopback only unless --local-allow-remote (default: none).") var localListen: String?
    @Option(name: .customLong("local-socket"), help: "The local endpoint on a unix domain socket at PATH (mode 0660; same protocols) (default: none).") var localSocket: String?
    @Option(name: .customLong("local-role"), help: "The role the local endpoint's requests get, having no certificate: client (read and write) or reader (default: client).") var localRole: String?
    @Flag(name: .customLong("local-allow-remote"), help: "Allow a non-loopback --local-listen address: anyone who reaches it gets --local-role without a certificate.") var localAllowRemote = false
    @Option(name: .customLong("log-level"), help: "Least severe log messages written to stderr: trace, debug, info, notice, warning, error, critical.") var logLevel: Logger.Level = .info

    func validate() throws {
        if let maxBytes {
            do { _ = try ByteSize.value(maxBytes) } catch { throw ValidationError("--max-bytes: \(error)") }
        }
    }

    func run() async throws {
        bootstrapLogging(logLevel)
        tuneAllocator()
        var c = try config.map { try NodeConfiguration.load(path: $0) } ?? NodeConfiguration()
        var mesh = try topology.map { try Topology.load(path: $0) }
        if let v = fetchStrategy {
            guard let st = FetchStrategy(rawValue: v) else {
                throw ValidationError("--fetch-strategy must be one of \(FetchStrategy.allCases.map(\.rawValue).joined(separator: ", ")), got \(v)")
            }
            mesh?.fetch.strategy = st
        }
        if let v = meshTransport {
            if v == "adaptive" {
                mesh?.fetch.transport = .quic
                mesh?.fetch.adaptiveTransport = true
            } else {
                guard let tr = MeshTransportKind(rawValue: v) else { throw ValidationError("--mesh-transport must be quic, tcp or adaptive, got \(v)") }
                mesh?.fetch.transport = tr
                mesh?.fetch.adaptiveTransport = false
            }
        }
        if (fetchStrategy != nil || meshTransport != nil) && mesh == nil {
            throw ValidationError("--fetch-strategy and --mesh-transport need --topology")
        }
        if let mesh {
            guard let name else { throw ValidationError("--topology needs --name (one of: \(mesh.nodes.map(\.name).joined(separator: ", ")))") }
            c = try mesh.configuration(for: name)
        }
        if let name { c.name = name }
        if let listen {
            guard let hp = HostPort(listen) else { throw ValidationError("--listen must be host:port, got \(listen)") }
            c.listen = hp
        }
        if let quicListen {
            guard let hp = HostPort(quicListen) else { throw ValidationError("--quic-listen must be host:port, got \(quicListen)") }
            c.quicListen = hp
        }
        if let quicMaxDatagram { c.quicMaxDatagram = quicMaxDatagram }
        if let quicAddressValidation { c.quicAddressValidation = quicAddressValidation }
        if let dataDir { c.dataDirectory = dataDir }
        if let maxBytes {
            do { c.maxBytes = try ByteSize.value(maxBytes) } catch { throw ValidationError("--max-bytes: \(error)") }
        }
        if let cert { c.certificate = cert }
        if let key { c.privateKey = key }
        if let ca { c.ca = ca }
        if allowUnauthenticatedReads { c.allowUnauthenticatedReads = true }
        if insecure { c.insecure = true }
        if let localListen {
            guard let hp = HostPort(localListen) else { throw ValidationError("--local-listen must be host:port, got \(localListen)") }
            c.localListen = hp
        }
        if let localSocket { c.localSocket = localSocket }
        if let localRole {
            guard let r = PeerRole(rawValue: localRole), r != .node else { throw ValidationError("--local-role must be client or reader, got \(localRole)") }
            c.localRole = r
        }
        if localAllowRemote { c.localAllowRemote = true }
        if localRole != nil || localAllowRemote, c.localListen == nil, c.localSocket == nil {
            throw ValidationError("--local-role and --local-allow-remote need --local-listen or --local-socket")
        }
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        let logger = Logger(label: "cachemesh.node.\(c.name)")
        // Configuration mistakes (ConfigurationError) exit 2; a missing certificate, an unusable
        // data directory and the like exit 1 (see CacheMeshCommand.main).
        let node = try CacheNode(configuration: c, topology: mesh, registry: registry, logger: logger)
        // Sizes without a unit are bytes: say what the capacity turned out to be.
        logger.notice("store capacity \(ByteSize.format(c.maxBytes)) (\(c.maxBytes) bytes); unverified uploads may evict up to \(ByteSize.format(c.effectiveMaxUnverifiedBytes))")
        let group = ServiceGroup(configuration: .init(
            services: [
                .init(service: node),
                // A helper: its end (at shutdown) or failure never ends the node.
                .init(service: MemoryTrimmer(activity: { [store = node.store] in
                    let s = store.stats
                    return s.bytesIn &+ s.bytesOut
                }, logger: logger), successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        // A second SIGINT/SIGTERM (during the drain the first one started) stops at once.
        let hardStop = SecondSignalStop()
        defer { hardStop.cancel() }
        do {
            try await group.run()
        } catch let e as DrainIncomplete {
            CacheMeshCommand.printError("Error: \(e)")
            throw ExitCode(ExitStatus.drainIncomplete)
        }
    }
}

/// Counts SIGINT and SIGTERM while the node runs. The first starts the drain (ServiceLifecycle);
/// a second one ends the process at once: a message on stderr, exit status 128 + signal
/// (130 for SIGINT, 143 for SIGTERM), connections and transfers in flight cut.
final class SecondSignalStop: @unchecked Sendable {
    private var sources: [any DispatchSourceSignal] = []
    private let count = Mutex(0)

    init() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            src.setEventHandler { [self] in
                let n = self.count.withLock { n in
                    n += 1
                    return n
                }
                guard n >= 2 else { return }
                let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
                let note = "cachemesh: \(name) again during the drain: stopping now; requests in flight are cut (exit \(128 + sig))\n"
                _ = note.utf8CString.withUnsafeBufferPointer { Glibc.write(STDERR_FILENO, $0.baseAddress, $0.count - 1) }
                _exit(128 + sig)
            }
            src.resume()
            sources.append(src)
        }
    }

    func cancel() {
        for s in sources { s.cancel() }
        sources = []
    }
}
