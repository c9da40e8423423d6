import TestSupport
import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import Synchronization
import Testing
@testable import MeshQUIC

@Suite(.serialized) struct QUICLoopbackTests {
    static func connect(_ port: Int, as name: String? = "client", ca: String = "ca.pem", serverName: String? = nil) async throws -> HTTP3Connection {
        try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds(name, ca: ca),
                                          serverName: serverName, connectTimeout: .seconds(5))
    }

    @Test func putGetHeadSmall() async throws {
        try await QUICTestServer.with { _, port, service in
            let c = try await Self.connect(port)
            #expect(c.peer.role == .node)
            #expect(c.isUsable)
            let put = try await c.request(HTTPRequestHead(method: "PUT", path: "/echo"), body: .bytes(ByteBuffer(string: "hello quic")))
            #expect(put.status == 200)
            #expect(put.headers["x-peer-role"] == "client")
            #expect(String(buffer: try await put.body.collect(upTo: 1 << 20)) == "hello quic")

            let get = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/5000"))
            #expect(get.status == 200)
            #expect(get.headers["content-length"] == "5000")
            let body = try await get.body.collect(upTo: 1 << 20)
            #expect(body.readableBytes == 5000)
            #expect(PatternFile.matches(body, at: 0))

            let head = try await c.request(HTTPRequestHead(method: "HEAD", path: "/pattern/7777"))
            #expect(head.status == 200)
            #expect(head.headers["content-length"] == "7777")
            #expect(try await head.body.collect(upTo: 1 << 20).readableBytes == 0)

            let missing = try await c.request(HTTPRequestHead(method: "GET", path: "/nope"))
            #expect(missing.status == 404)
            _ = try await missing.body.collect(upTo: 1 << 20)

            // Every file body the server opened was closed exactly once (HEAD included).
            for _ in 0..<100 where service.files.withLock({ $0.contains { $0.closes.withLock { $0 } != 1 } }) {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(service.files.withLock { $0.count } == 2)
            #expect(service.files.withLock { $0.allSatisfy { $0.closes.withLock { $0 } == 1 } })
            await c.close()
            #expect(!c.isUsable)
        }
    }

    @Test func trailersAndStreamingResponses() async throws {
        try await QUICTestServer.with { _, port, _ in
            let c = try await Self.connect(port, as: "reader")
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/trailers"))
            #expect(String(buffer: try await r.body.collect(upTo: 1 << 20)) == "body")
            #expect(r.body.trailers?["grpc-status"] == "0")
            let s = try await c.request(HTTPRequestHead(method: "GET", path: "/stream"))
            let text = String(buffer: try await s.body.collect(upTo: 1 << 20))
            #expect(text.hasPrefix("chunk0;chunk1;"))
            #expect(text.hasSuffix("chunk99;"))
            #expect(s.body.trailers?["x-count"] == "100")
            await c.close()
        }
    }

    @Test func largeDownloadAndUpload() async throws {
        let n: Int64 = 256 << 20
        try await QUICTestServer.with { server, port, service in
            let c = try await Self.connect(port)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(n)"))
            #expect(r.status == 200)
            let (got, ok) = try await PatternFile.receive(r.body)
            #expect(got == n)
            #expect(ok)

            let upN: Int64 = 64 << 20
            let up = PatternFile(length: upN)
            let u = try await c.request(HTTPRequestHead(method: "PUT", path: "/count"), body: .file(up))
            #expect(u.status == 200)
            #expect(String(buffer: try await u.body.collect(upTo: 1000)) == "\(upN) pattern\n")
            #expect(up.closes.withLock { $0 } == 1)
            #expect(service.files.withLock { $0.first?.closes.withLock { $0 } } == 1)
            #expect(server.stats.connectionsAccepted == 1)
            await c.close()
        }
    }

    @Test func mappedFileBodiesAreSentFromMemoryAndClosedOnce() async throws {
        let n: Int64 = 48 << 20
        try await QUICTestServer.with { _, port, service in
            let c = try await Self.connect(port)
            for size: Int64 in [n, 1, 5_000_000] {
                let r = try await c.request(HTTPRequestHead(method: "GET", path: "/mapped/\(size)"))
                #expect(r.status == 200)
                let (got, ok) = try await PatternFile.receive(r.body)
                #expect(got == size)
                // The memory is zeroed at close: a byte sent (or re-sent after a loss) later would break the pattern.
                #expect(ok)
            }
            let files = service.mapped.withLock { $0 }
            #expect(files.count == 3)
            // Closed once each (when the stream closed), never read with pread.
            let closed = await eventually { files.allSatisfy { $0.closes.withLock { $0 } == 1 } }
            #expect(closed)
            #expect(files.allSatisfy { $0.preads.withLock { $0 } == 0 })
            await c.close()
        }
    }

    /// Jumbo datagrams (`maxDatagramSize`) both ways, with and without GRO on the server, and
    /// from a jumbo client to a server left at the default size (which still reads any datagram
    /// whole: a client sends its first Initial at its own size, before it knows the server's).
    @Test(arguments: [(Optional(8952), true), (8952, false), (nil, false), (nil, true)])
    func jumboDatagrams(serverDatagram: Int?, serverGRO: Bool) async throws {
        var serverQUIC = QUICSettings()
        serverQUIC.maxDatagramSize = serverDatagram
        serverQUIC.gro = serverGRO
        try await QUICTestServer.with(quic: serverQUIC) { server, port, _ in
            var clientQUIC = QUICSettings()
            clientQUIC.maxDatagramSize = 8952
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"), settings: clientQUIC)
            let n: Int64 = 8 << 20
            let up = PatternFile(length: n)
            let u = try await c.request(HTTPRequestHead(method: "PUT", path: "/count"), body: .file(up))
            #expect(u.status == 200)
            #expect(String(buffer: try await u.body.collect(upTo: 1000)) == "\(n) pattern\n")
            let largest = server.stats.largestDatagramReceived
            #expect(largest > 1452, "the client should have sent datagrams larger than the default size")
            #expect(largest <= 8952)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(n)"))
            let (got, ok) = try await PatternFile.receive(r.body)
            #expect(got == n)
            #expect(ok)
            await c.close()
        }
    }

    @Test func hundredConcurrentStreams() async throws {
        try await QUICTestServer.with { _, port, service in
            let c = try await Self.connect(port)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<100 {
                    group.addTask {
                        let payload = ByteBuffer(repeating: UInt8(i % 256), count: 1000 + i * 997)
                        let r = try await c.request(HTTPRequestHead(method: "PUT", path: "/echo"), body: .bytes(payload))
                        #expect(r.status == 200)
                        #expect(try await r.body.collect(upTo: 1 << 20) == payload)
                    }
                }
                try await group.waitForAll()
            }
            #expect(service.started.withLock { $0 } == 100)
            await c.close()
        }
    }

    @Test func moreStreamsThanTheServerAllowsAtOnceAreQueued() async throws {
        try await QUICTestServer.with { _, port, _ in
            let c = try await Self.connect(port)
            try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<300 {   // > 128 concurrent streams: the rest wait for MAX_STREAMS
                    group.addTask {
                        let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/100"))
                        return try await r.body.collect(upTo: 1 << 20).readableBytes
                    }
                }
                var total = 0
                for try await n in group { total += n }
                #expect(total == 300 * 100)
            }
            await c.close()
        }
    }

    @Test func cancellingARequestResetsTheServerStream() async throws {
        try await QUICTestServer.with { _, port, service in
            let c = try await Self.connect(port)
            let out = HTTPOutboundStream()
            let t = Task { try await c.request(HTTPRequestHead(method: "PUT", path: "/hang-body"), body: .stream(out)) }
            try await out.write(ByteBuffer(string: "partial"))
            for _ in 0..<300 where service.started.withLock({ $0 }) == 0 { try await Task.sleep(for: .milliseconds(10)) }
            t.cancel()
            await #expect(throws: (any Error).self) { _ = try await t.value }
            for _ in 0..<300 where service.bodyErrors.withLock({ $0.isEmpty }) { try await Task.sleep(for: .milliseconds(10)) }
            let errs = service.bodyErrors.withLock { $0 }
            #expect(errs.count == 1)
            // RESET_STREAM with H3_REQUEST_CANCELLED (0x10c = 268) reached the server's request body.
            #expect(errs == ["\(HTTPTransportError.streamReset(errorCode: 268))"])
            let r = try await c.request(HTTPRequestHead(method: "PUT", path: "/echo"), body: .bytes(ByteBuffer(string: "ok")))
            #expect(r.status == 200)
            await c.close()
        }
    }

    @Test func cancellingAResponseMidBodyKeepsTheConnection() async throws {
        try await QUICTestServer.with { _, port, service in
            let c = try await Self.connect(port)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(32 << 20)"))
            var it = r.body.makeAsyncIterator()
            _ = try await it.next()
            r.cancel()
            await #expect(throws: HTTPTransportError.self) {
                while try await it.next() != nil {}
            }
            // The server gave up the file (STOP_SENDING → stream closed → source closed).
            for _ in 0..<300 where service.files.withLock({ $0.first?.closes.withLock { $0 } != 1 }) {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(service.files.withLock { $0.first?.closes.withLock { $0 } } == 1)
            let ok = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/10"))
            #expect(ok.status == 200)
            await c.close()
        }
    }

    @Test func goawayLetsInFlightFinishAndRefusesNewRequestsRetryably() async throws {
        try await QUICTestServer.with { server, port, _ in
            let c = try await Self.connect(port)
            let slow = Task { try await c.request(HTTPRequestHead(method: "GET", path: "/slow")) }
            try await Task.sleep(for: .milliseconds(50))
            server.goawayAllConnections()
            for _ in 0..<300 where c.isUsable { try await Task.sleep(for: .milliseconds(5)) }
            #expect(!c.isUsable)
            do {
                _ = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/1"))
                Issue.record("a request after GOAWAY must fail")
            } catch let e as HTTPTransportError {
                #expect(e.isRetryable || e == .connectionClosed)
            }
            let r = try await slow.value
            #expect(r.status == 200)
            #expect(String(buffer: try await r.body.collect(upTo: 1000)) == "slow done\n")
            // The server still accepts new connections.
            let d = try await Self.connect(port)
            let ok = try await d.request(HTTPRequestHead(method: "GET", path: "/pattern/3"))
            #expect(ok.status == 200)
            await d.close()
            await c.close()
        }
    }

    @Test func gracefulShutdownWaitsForInFlightRequests() async throws {
        try await QUICTestServer.with { server, port, _ in
            let c = try await Self.connect(port)
            let slow = Task { try await c.request(HTTPRequestHead(method: "GET", path: "/slow")) }
            try await Task.sleep(for: .milliseconds(50))
            await server.shutdownGracefully()
            let r = try await slow.value
            #expect(r.status == 200)
            #expect(String(buffer: try await r.body.collect(upTo: 1000)) == "slow done\n")
            #expect(await server.connectionCount() == 0)
            await c.close()
        }
    }

    @Test func streamedUploadWithBackpressure() async throws {
        try await QUICTestServer.with { _, port, _ in
            let c = try await Self.connect(port)
            let out = HTTPOutboundStream(highWatermark: 256 * 1024)
            let n: Int64 = 16 << 20
            let producer = Task {
                var off: Int64 = 0
                while off < n {
                    let k = Int(min(64 * 1024, n - off))
                    var chunk = ByteBuffer(repeating: 0, count: k)
                    chunk.withUnsafeMutableReadableBytes { _ = try? PatternFile(length: n).read(at: off, into: $0) }
                    try await out.write(chunk)
                    off += Int64(k)
                }
                out.finish()
            }
            let r = try await c.request(HTTPRequestHead(method: "PUT", path: "/count"), body: .stream(out))
            #expect(r.status == 200)
            #expect(String(buffer: try await r.body.collect(upTo: 1000)) == "\(n) pattern\n")
            try await producer.value
            await c.close()
        }
    }

    @Test func earlyResponseStopsTheUpload() async throws {
        try await QUICTestServer.with { _, port, _ in
            let c = try await Self.connect(port)
            let out = HTTPOutboundStream(highWatermark: 64 * 1024)
            let producer = Task { () -> Bool in
                // Never finishes on its own: only STOP_SENDING from the server ends it.
                do {
                    while true { try await out.write(ByteBuffer(repeating: 1, count: 32 * 1024)) }
                } catch {
                    return true
                }
            }
            let r = try await c.request(HTTPRequestHead(method: "PUT", path: "/nope"), body: .stream(out))
            #expect(r.status == 404)
            _ = try? await r.body.collect(upTo: 1000) as ByteBuffer
            #expect(await producer.value)
            await c.close()
        }
    }

    @Test func idleConnectionsTimeOut() async throws {
        var quic = QUICSettings()
        quic.idleTimeout = .milliseconds(300)
        try await QUICTestServer.with(quic: quic) { server, port, _ in
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"), settings: quic)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/10"))
            _ = try await r.body.collect(upTo: 100)
            #expect(c.isUsable)
            for _ in 0..<300 {
                let open = await server.connectionCount()
                if !c.isUsable && open == 0 { break }
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(!c.isUsable)
            #expect(await server.connectionCount() == 0)
            await c.close()
        }
    }

    @Test(arguments: [true, false])
    func outstandingRequestsKeepTheConnectionAliveWithPings(keepAlive: Bool) async throws {
        var quic = QUICSettings()
        // 1 s, not 300 ms: a CI run loaded by parallel suites once starved the loop past 300 ms.
        quic.idleTimeout = .seconds(1)
        quic.keepAliveWhileBusy = keepAlive ? .milliseconds(250) : .zero
        try await QUICTestServer.with(quic: quic) { server, port, _ in
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"), settings: quic)
            // The answer takes three idle timeouts: only the client's PINGs keep the connection open meanwhile.
            var answer: String?
            do {
                answer = String(buffer: try await c.request(HTTPRequestHead(method: "GET", path: "/sleep/3000")).body.collect(upTo: 100))
            } catch {
                answer = nil
            }
            if keepAlive {
                #expect(answer == "slept\n")
                // Idle again: no more PINGs, so the idle timeout closes the connection.
                let closed = await eventually(timeout: 5) { !c.isUsable }
                #expect(closed)
            } else {
                #expect(answer == nil, "without PINGs the connection should have timed out under the request")
            }
            await c.close()
        }
    }

    @Test func manyConnectionsAtOnce() async throws {
        try await QUICTestServer.with { server, port, _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<24 {
                    group.addTask {
                        let c = try await Self.connect(port, as: i % 2 == 0 ? "client" : "reader")
                        for k in 0..<5 {
                            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(1000 + i * 100 + k)"))
                            let b = try await r.body.collect(upTo: 1 << 20)
                            #expect(b.readableBytes == 1000 + i * 100 + k)
                            #expect(PatternFile.matches(b, at: 0))
                        }
                        await c.close()
                    }
                }
                try await group.waitForAll()
            }
            #expect(server.stats.connectionsAccepted == 24)
            for _ in 0..<300 where await server.connectionCount() > 0 { try await Task.sleep(for: .milliseconds(10)) }
            #expect(await server.connectionCount() == 0)
        }
    }

    @Test func connectionLimitRefusesNewHandshakes() async throws {
        let server = HTTP3Server(configuration: .init(host: "127.0.0.1", port: 0, credentials: try QUICTestCerts.creds("node"), maxConnections: 1),
                                 service: QUICTestService(), logger: Logger(label: "test.h3"))
        let port = try await server.start().port!
        let first = try await Self.connect(port)
        await #expect(throws: (any Error).self) {
            _ = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"),
                                                  connectTimeout: .milliseconds(500))
        }
        #expect(server.stats.connectionsRefused >= 1)
        // The admitted connection is undisturbed.
        let r = try await first.request(HTTPRequestHead(method: "GET", path: "/pattern/10"))
        #expect(r.status == 200)
        await first.close()
        await server.close()
    }

    // MARK: mutual TLS

    @Test func readerRoleIsVisibleToTheService() async throws {
        try await QUICTestServer.with { _, port, _ in
            let c = try await Self.connect(port, as: "reader")
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/whoami"))
            #expect(String(buffer: try await r.body.collect(upTo: 100)) == "reader reader\n")
            await c.close()
        }
    }

    @Test func clientWithoutCertificateIsRefused() async throws {
        try await QUICTestServer.with { server, port, _ in
            do {
                _ = try await Self.connect(port, as: nil)
                Issue.record("connect without a client certificate must fail")
            } catch let e as QUICError {
                guard case .handshakeFailed = e else { Issue.record("unexpected \(e)"); return }
            }
            #expect(server.stats.connectionsAccepted >= 1)
            #expect(await server.connectionCount() <= 1)
        }
    }

    /// `body` fails with a failed handshake (not a timeout, an unreachable port or anything else).
    static func expectHandshakeFailure(_ what: String, sourceLocation: SourceLocation = #_sourceLocation,
                                       _ body: () async throws -> Void) async {
        do {
            try await body()
            Issue.record("\(what): the handshake succeeded", sourceLocation: sourceLocation)
        } catch let e as QUICError {
            guard case .handshakeFailed = e else { Issue.record("\(what): \(e)", sourceLocation: sourceLocation); return }
        } catch {
            Issue.record("\(what): \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func clientFromAnotherCAIsRefused() async throws {
        try await QUICTestServer.with { server, port, service in
            // "stranger" is signed by otherca; it trusts our CA so only the server can refuse it.
            await Self.expectHandshakeFailure("stranger") { _ = try await Self.connect(port, as: "stranger") }
            let counted = await eventually(timeout: 10) { server.stats.handshakesFailed == 1 }
            #expect(counted, "\(server.stats)")
            #expect(service.started.withLock { $0 } == 0)
        }
    }

    @Test func clientRefusesAServerItCannotVerify() async throws {
        try await QUICTestServer.with { server, port, _ in
            await Self.expectHandshakeFailure("other CA") { _ = try await Self.connect(port, ca: "otherca.pem") }
            await Self.expectHandshakeFailure("wrong name") { _ = try await Self.connect(port, serverName: "not-the-node.example") }
            // Both reached the server (the refusal is the client's).
            #expect(server.stats.connectionsAccepted == 2)
        }
    }

    @Test func optionalAuthenticationAdmitsAnonymousReaders() async throws {
        try await QUICTestServer.with(auth: .optionalReadOnly) { _, port, _ in
            let c = try await Self.connect(port, as: nil)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/whoami"))
            #expect(String(buffer: try await r.body.collect(upTo: 100)) == "reader -\n")
            await c.close()
            // The server names no acceptable CAs, so a stranger's certificate (another CA) is sent,
            // and a certificate that is sent must verify: refused with unknown_ca, not taken for
            // an anonymous reader.
            do {
                _ = try await Self.connect(port, as: "stranger")
                Issue.record("a certificate from another CA must be refused in optional mode too")
            } catch let e as QUICError {
                #expect("\(e)".contains("the server refused our certificate: unknown CA"), "\(e)")
            }
        }
    }
}
