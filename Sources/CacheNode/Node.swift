import BlobStore
import MeshShell
import CacheRoutes
import Foundation
import Logging
import MeshHTTP
import MeshHTTP2
import MeshQUIC
import MeshTLS
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle

/// One CacheMesh node: the store and the HTTP/2 server in front of it, run as a `Service`
/// (SIGTERM/SIGINT → GOAWAY drain → exit).
public final class CacheNode: Service {
    public let configuration: NodeConfiguration
    public let store: BlobStore
    let server: HTTP2Server
    let quicServer: HTTP3Server?
    /// The local worker endpoint(s): loopback TCP and/or a unix socket.
    let localServers: [LocalServer]
    let service: CacheService
    /// The origin's S3 tier (`[origin] backend = "s3"`).
    let tier: S3Tier?
    let logger: Logger
    /// Set when the node runs as a member of a mesh (`--topology`).
    public let mesh: MeshService?
    /// Requests cut by the end of the drain grace period (both transports).
    public let drainCuts = DrainCuts()

    public init(configuration: NodeConfiguration, topology: Topology? = nil, registry: PrometheusCollectorRegistry?, logger: Logger) throws {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        // TLS first: a certificate problem stops the node before it touches the data directory.
        let credentials = try configuration.tlsFiles.map { try TLSCredentials(files: $0) }
        if let cert = configuration.certificate, credentials != nil {
            try Self.checkOwnCertificate(cert, name: topology == nil ? nil : configuration.name)
        }
        var storeConfig = BlobStoreConfiguration(directory: configuration.dataDirectory, maxBytes: configuration.maxBytes)
        storeConfig.maxConcurrentWrites = configuration.maxConcurrentWrites
        storeConfig.maxOpenReads = configuration.maxOpenReads
        storeConfig.connectionSlotSharePercent = configuration.connectionSlotSharePercent
        storeConfig.maxUnverifiedBytes = configuration.effectiveMaxUnverifiedBytes
        // Listen first: the index is built on a background thread (lookups meanwhile ask the disk).
        storeConfig.scanInBackground = true
        storeConfig.scanRate = configuration.scanRate
        storeConfig.scanThreads = configuration.scanThreads
        storeConfig.durability = configuration.durability
        storeConfig.minTTLSeconds = Int64(configuration.minTTLSeconds)
        self.store = try BlobStore(configuration: storeConfig, logger: logger)
        let store = self.store
        tier = try configuration.s3Origin.map { try S3Tier(settings: $0, store: store, logger: logger) }
        if let topology {
            guard let credentials else { throw ConfigurationError("a mesh node needs TLS (node certificates)") }
            var settings = MeshService.Settings(topology: topology)
            settings.transport.quic = configuration.quicSettings
            mesh = MeshService(roster: try MeshRoster(topology: topology, node: configuration.name), store: store,
                               credentials: credentials, settings: settings, logger: logger)
        } else {
            mesh = nil
        }
        service = CacheService(store: store, registry: registry,
                               info: .init(name: configuration.name, listen: ["tcp": "\(configuration.listen)"]), mesh: mesh, tier: tier, logger: logger)
        var h2 = HTTP2Server.Configuration(
            host: configuration.listen.host, port: configuration.listen.port, credentials: credentials,
            clientAuthentication: configuration.allowUnauthenticatedReads ? .optionalReadOnly : .require,
            handshakeTimeout: .seconds(Int64(configuration.handshakeTimeoutSeconds)),
            drainGracePeriod: .seconds(Int64(configuration.drainSeconds)))
        h2.maxHeaderListBytes = configuration.maxHeaderListBytes
        h2.requestBodyIdleTimeout = .seconds(configuration.requestBodyTimeoutSeconds)
        h2.requestBodyMinRate = configuration.requestBodyMinRate
        h2.responseStallTimeout = .seconds(configuration.responseStallTimeoutSeconds)
        h2.maxConnections = Self.connectionCap(configuration.maxConnections, logger: logger)
        h2.drainCuts = drainCuts
        let bodyLogger = logger
        let bodyBudget = configuration.maxRequestBodyMemory == 0 ? nil
            : RequestBodyBudget(limit: Int(clamping: configuration.maxRequestBodyMemory)) { bodyLogger.notice("\($0)") }
        h2.requestBodyBudget = bodyBudget
        h2.requestHeadersTimeout = .seconds(configuration.requestHeadersTimeoutSeconds)
        self.server = HTTP2Server(configuration: h2, service: service, logger: logger)
        var locals: [LocalServer] = []
        let localPeer = LocalServer.peer(role: configuration.localRole)
        if let l = configuration.localListen {
            locals.append(LocalServer(configuration: .init(address: .tcp(host: l.host, port: l.port), peer: localPeer, base: h2), service: service, logger: logger))
        }
        if let p = configuration.localSocket {
            locals.append(LocalServer(configuration: .init(address: .unix(path: p), peer: localPeer, base: h2), service: service, logger: logger))
        }
        localServers = locals
        if let q = configuration.quicListen {
            guard let credentials else { throw ConfigurationError("QUIC needs TLS: --quic-listen cannot be used with --insecure") }
            var quic = configuration.quicSettings
            quic.statelessResetSecret = Self.statelessResetSecret(keyFile: configuration.privateKey)
            quic.drainCuts = drainCuts
            quic.requestBodyBudget = bodyBudget
            quicServer = HTTP3Server(
                configuration: .init(host: q.host, port: q.port, credentials: credentials,
                                     clientAuthentication: configuration.allowUnauthenticatedReads ? .optionalReadOnly : .require,
                                     quic: quic, drainGracePeriod: .seconds(Int64(configuration.drainSeconds)),
                                     addressValidation: configuration.quicAddressValidation.policy),
                service: service, logger: logger)
        } else {
            quicServer = nil
        }
    }

    /// A node serves with its certificate and, in a mesh, speaks for its name with it: one that
    /// clients or peers would refuse (a `client` certificate, another node's) is refused at start,
    /// with the reason, instead of a node that says "ready" and then fails everyone (or never joins).
    static func checkOwnCertificate(_ path: String, name: String?) throws {
        let cert: X509Certificate
        do { cert = try X509Certificate.load(pemFile: path) } catch {
            throw ConfigurationError("cannot read the node certificate \(path): \(error)")
        }
        let subject = cert.subject
        switch cert.role() {
        case .failure(let why):
            throw ConfigurationError("the node certificate \(path) (\"\(subject)\") cannot serve: \(why); make one with certs/mkcerts.sh node NAME")
        case .success(let role) where role != .node:
            throw ConfigurationError("the node certificate \(path) (\"\(subject)\") has the role \(role.rawValue), not node: clients and peers would refuse it; make one with certs/mkcerts.sh node NAME")
        case .success:
            break
        }
        if let name, let cn = cert.commonName, cn != name {
            throw ConfigurationError("the node certificate \(path) is for \"\(cn)\", but this node is \"\(name)\" in the topology: peers would refuse its gossip; use certs/mkcerts.sh node \(name)")
        }
    }

    /// The connection cap that fits the open-file limit: a quarter of the descriptors (at least
    /// 64) stay for the store's files, QUIC and the mesh's own connections.
    static func connectionCap(_ configured: Int, logger: Logger) -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < rlim_t(Int32.max) else { return configured }
        let descriptors = Int(clamping: limit.rlim_cur)
        let fits = max(1, descriptors - max(64, descriptors / 4))
        if fits < configured {
            logger.notice("max_connections lowered to \(fits) to fit the open-file limit of \(descriptors) (ulimit -n)")
        }
        return min(configured, fits)
    }

    /// Stateless-reset tokens must outlive the process (after a restart the node resets the QUIC
    /// connections its previous run had, and peers fail over at once instead of waiting out their
    /// idle timeout), and must be unguessable: derived from the node's private key, which only
    /// it holds. nil (a random secret per process) if the key cannot be read.
    static func statelessResetSecret(keyFile: String?) -> StatelessResetSecret? {
        guard let keyFile, let key = FileManager.default.contents(atPath: keyFile), !key.isEmpty else { return nil }
        var h = SHA256Hasher()
        h.update(bytes: Array("cachemesh QUIC stateless reset secret v1\n".utf8))
        h.update(bytes: [UInt8](key))
        return StatelessResetSecret(Array(h.finalize().utf8))
    }

    /// Bind the listener; returns the bound address.
    @discardableResult
    public func start() async throws -> SocketAddress {
        // A bucket the node cannot use (wrong credentials, no such bucket, unreachable) stops it
        // before it listens: it would acknowledge nothing and serve only what its disk holds.
        if let tier { try await tier.check() }
        let addr: SocketAddress
        do { addr = try await server.start() } catch {
            throw ListenFailure(address: "\(configuration.listen)", transport: "TCP", reason: SocketErrorText.describe(error))
        }
        service.setListener("tcp", "\(HostPort(host: configuration.listen.host, port: addr.port ?? configuration.listen.port))")
        if let quicServer, let q = configuration.quicListen {
            let qa: SocketAddress
            do { qa = try await quicServer.start() } catch {
                await server.close()
                throw ListenFailure(address: "\(q)", transport: "UDP (QUIC)", reason: SocketErrorText.describe(error))
            }
            let bound = HostPort(host: q.host, port: qa.port ?? q.port)
            service.setListener("quic", "\(bound)")
            print("cachemesh: listening quic=\(bound)")
        }
        for local in localServers {
            let bound: String
            do {
                let a = try await local.start()
                switch local.configuration.address {
                case .tcp(let host, let port):
                    bound = "\(HostPort(host: host, port: a.port ?? port))"
                    service.setListener("local", bound)
                    print("cachemesh: listening local=\(bound) role=\(configuration.localRole.rawValue)")
                case .unix(let path):
                    bound = path
                    service.setListener("local_socket", bound)
                    print("cachemesh: listening local_socket=\(bound) role=\(configuration.localRole.rawValue)")
                }
            } catch {
                for l in localServers { await l.close() }
                await quicServer?.close()
                await server.close()
                throw ListenFailure(address: "\(local.configuration.address)", transport: "local endpoint", reason: SocketErrorText.describe(error))
            }
        }
        service.setLocalRole(localServers.isEmpty ? nil : configuration.localRole.rawValue)
        return addr
    }

    public func run() async throws {
        let addr = try await start()
        // A machine-readable line for scripts and tests (port 0 picks a free port).
        print("cachemesh: listening tcp=\(HostPort(host: configuration.listen.host, port: addr.port ?? configuration.listen.port))")
        fflush(nil)
        logger.notice("cachemesh node ready", metadata: [
            "name": "\(configuration.name)", "tcp": "\(addr.endpoint)", "data_dir": "\(configuration.dataDirectory)",
            "max_bytes": "\(configuration.maxBytes)", "tls": "\(!configuration.insecure)",
            "durability": "\(configuration.durability.rawValue)", "index_complete": "\(store.indexProgress.complete)",
        ])
        let meshTask = mesh.map { m in Task { await m.run() } }
        try? await gracefulShutdown()
        // Drain: LEAVING in gossip → GOAWAY (notice, final) → in-flight streams finish →
        // mirror queue flushed and sole copies handed off → exit.
        service.beginDrain()
        if let mesh { await mesh.leave() }
        logger.notice("draining: GOAWAY to \(server.connectionCount) connection(s); requests in flight get up to \(configuration.drainSeconds) s (a second SIGINT/SIGTERM stops at once)")
        async let h3: Void = { await quicServer?.shutdownGracefully() }()
        let locals = localServers
        async let local: Void = { for l in locals { await l.shutdownGracefully() } }()
        await server.shutdownGracefully()
        await h3
        await local
        if let mesh {
            await mesh.handOff(timeout: .seconds(Int64(configuration.drainSeconds)))
            await mesh.stop()
        }
        meshTask?.cancel()
        let cut = drainCuts.count
        if cut > 0 {
            logger.error("stopped: the drain grace period (\(configuration.drainSeconds) s) ended with \(cut) request(s) in flight; they were cut")
            throw DrainIncomplete(requests: cut, graceSeconds: configuration.drainSeconds)
        }
        logger.notice("stopped")
    }

    public func stop() async {
        for l in localServers { await l.close() }
        await quicServer?.close()
        await server.close()
    }
}

/// The drain's grace period ended with requests still in flight, and they were cut: the node
/// stopped, but not cleanly (`cachemesh node` exits 3).
public struct DrainIncomplete: Error, CustomStringConvertible {
    public var requests: Int
    public var graceSeconds: Int
    public var description: String {
        "the drain grace period (\(graceSeconds) s, drain_seconds) ended with \(requests) request(s) still in flight; they were cut"
    }
}
