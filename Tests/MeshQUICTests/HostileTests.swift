import CNgtcp2
import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
import Testing
import TestSupport
@testable import MeshQUIC

/// A raw UDP socket that sends whatever we like and records what comes back.
final class RawUDP: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let received = Mutex<[ByteBuffer]>([])

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = unwrapInboundIn(data)
        received.withLock { $0.append(env.data) }
    }

    static func open() async throws -> (any Channel, RawUDP) {
        let h = RawUDP()
        let ch = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { $0.pipeline.addHandler(h) }
            .bind(host: "127.0.0.1", port: 0).get()
        return (ch, h)
    }
}

enum Garbage {
    static func random(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255) } }

    /// A long-header packet: version, DCID, SCID, then filler up to `size`.
    static func longHeader(version: UInt32, size: Int, initial: Bool = true) -> [UInt8] {
        var p: [UInt8] = [initial ? 0xC3 : 0xE3]
        p += withUnsafeBytes(of: version.bigEndian) { Array($0) }
        p += [8] + random(8) + [8] + random(8)
        if initial { p += [0] }                      // token length
        let rest = size - p.count - 2
        p += [UInt8(0x40 | ((rest >> 8) & 0x3f)), UInt8(rest & 0xff)]
        p += random(rest)
        return p
    }

    static func shortHeader(size: Int) -> [UInt8] { [0x40 | UInt8.random(in: 0...0x3f)] + random(size - 1) }
}

@Suite(.serialized) struct QUICHostileInputTests {
    @Test func unknownVersionGetsVersionNegotiation() async throws {
        try await QUICTestServer.with { server, port, _ in
            let (ch, raw) = try await RawUDP.open()
            let target = try SocketAddress(ipAddress: "127.0.0.1", port: port)
            // Too small to be an Initial: no answer (no amplification).
            try await ch.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(bytes: Garbage.longHeader(version: 0x1a2a_3a4a, size: 200)))).get()
            try await ch.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(bytes: Garbage.longHeader(version: 0x1a2a_3a4a, size: 1200)))).get()
            for _ in 0..<200 where raw.received.withLock({ $0.isEmpty }) { try await Task.sleep(for: .milliseconds(10)) }
            let got = raw.received.withLock { $0 }
            #expect(got.count == 1)
            if var vn = got.first {
                let first = vn.readInteger(as: UInt8.self) ?? 0
                #expect(first & 0x80 != 0)
                #expect(vn.readInteger(as: UInt32.self) == 0)    // Version Negotiation
                let dcidLen = Int(vn.readInteger(as: UInt8.self) ?? 0)
                vn.moveReaderIndex(forwardBy: dcidLen)
                let scidLen = Int(vn.readInteger(as: UInt8.self) ?? 0)
                vn.moveReaderIndex(forwardBy: scidLen)
                var versions: [UInt32] = []
                while let v = vn.readInteger(as: UInt32.self) { versions.append(v) }
                #expect(versions.contains(1))
            }
            #expect(server.stats.versionNegotiationsSent == 1)
            try await ch.close()
        }
    }

    @Test func shortHeaderPacketsOfUnknownConnectionsGetAStatelessReset() async throws {
        var quic = QUICSettings()
        let secret = StatelessResetSecret.random()
        quic.statelessResetSecret = secret
        try await QUICTestServer.with(quic: quic) { server, port, _ in
            let (ch, raw) = try await RawUDP.open()
            let target = try SocketAddress(ipAddress: "127.0.0.1", port: port)
            var dcids: [ConnectionID] = []
            for size in [100, 30, 21] {
                let dcid = ConnectionID.random(length: QUICServerHandler.scidLength)
                dcids.append(dcid)
                let packet = [UInt8(0x40 | UInt8.random(in: 0...0x3f))] + dcid.bytes + Garbage.random(size - 1 - dcid.bytes.count)
                try await ch.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(bytes: packet))).get()
                _ = await eventually(timeout: 2) { raw.received.withLock { $0.count } >= min(dcids.count, 2) }
            }
            try await Task.sleep(for: .milliseconds(200))
            let got = raw.received.withLock { $0 }.map { Array($0.readableBytesView) }
            // 43 bytes for the 100-byte packet, 29 for the 30-byte one (always shorter than the
            // trigger), nothing for the 21-byte one (a reset cannot be shorter than 21 bytes).
            #expect(got.map(\.count) == [43, 29])
            for (reset, dcid) in zip(got, dcids) {
                #expect(reset[0] & 0xC0 == 0x40, "a reset looks like a short-header packet")
                #expect(Array(reset.suffix(16)) == secret.token(for: dcid), "the token is the one derived from the CID")
            }
            #expect(server.stats.statelessResetsSent == 2)
            try await ch.close()
        }
    }

    /// Address validation: with `.always`, our client follows the Retry and gets its answer; an
    /// Initial carrying a Retry token we never made is dropped without a connection.
    @Test func retryValidatesAddressesAndForgedTokensAreRefused() async throws {
        try await QUICTestServer.with(addressValidation: .always) { server, port, _ in
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"))
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/5000"))
            #expect(try await r.body.collect(upTo: 1 << 20).readableBytes == 5000)
            // One Retry per Initial without a token: a client that re-sent its first Initial
            // before the Retry arrived (a loaded machine) draws a second, which it ignores.
            let retries = server.stats.retriesSent
            #expect(retries >= 1)
            #expect(server.stats.connectionsAccepted == 1)
            await c.close()

            // An Initial (version 1, 1200 bytes) whose token starts like a Retry token of ours.
            var p: [UInt8] = [0xC3] + withUnsafeBytes(of: UInt32(1).bigEndian) { Array($0) }
            p += [18] + Garbage.random(18) + [8] + Garbage.random(8)
            let token = [UInt8(NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY)] + Garbage.random(60)
            p += [UInt8(token.count)] + token
            let rest = 1200 - p.count - 2
            p += [UInt8(0x40 | ((rest >> 8) & 0x3f)), UInt8(rest & 0xff)] + Garbage.random(rest)
            let (ch, raw) = try await RawUDP.open()
            try await ch.writeAndFlush(AddressedEnvelope(remoteAddress: try SocketAddress(ipAddress: "127.0.0.1", port: port),
                                                         data: ByteBuffer(bytes: p))).get()
            let rejected = await eventually(timeout: 5) { server.stats.retryTokensRejected == 1 }
            #expect(rejected)
            #expect(server.stats.connectionsAccepted == 1)
            #expect(server.stats.retriesSent == retries)       // a bad token draws no Retry either
            #expect(raw.received.withLock { $0.isEmpty })
            try await ch.close()
        }
    }

    /// Bytes a download has received, and whether the flood beside it is over.
    final class FloodProgress: Sendable {
        let received = Atomic<Int64>(0)
        let floodOver = Atomic<Bool>(false)
    }

    @Test func garbageFloodDuringATransferChangesNothing() async throws {
        try await QUICTestServer.with { server, port, _ in
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"))
            let n: Int64 = 32 << 20
            let progress = FloodProgress()
            let download = Task { () -> (Int64, Bool) in
                let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(n)"))
                var got: Int64 = 0
                var ok = true
                for try await chunk in r.body {
                    if ok && !PatternFile.matches(chunk, at: got) { ok = false }
                    got += Int64(chunk.readableBytes)
                    progress.received.store(got, ordering: .relaxed)
                    // The second half waits for the flood's end: on a fast machine 32 MiB could
                    // otherwise arrive before the flood starts, and the test would prove nothing.
                    while got >= n / 2 && !progress.floodOver.load(ordering: .relaxed) {
                        try await Task.sleep(for: .milliseconds(5))
                    }
                }
                return (got, ok)
            }
            // The flood starts once the transfer is under way.
            let started = await eventually(timeout: 30) { progress.received.load(ordering: .relaxed) > 0 }
            try #require(started, "the download never started")
            let (ch, _) = try await RawUDP.open()
            let target = try SocketAddress(ipAddress: "127.0.0.1", port: port)
            for i in 0..<3000 {
                let bytes: [UInt8]
                switch i % 6 {
                case 0: bytes = Garbage.random(Int.random(in: 1...1500))
                case 1: bytes = Garbage.shortHeader(size: Int.random(in: 20...1400))       // unknown DCID
                case 2: bytes = Garbage.longHeader(version: 1, size: 1200)                  // forged Initial
                case 3: bytes = Garbage.longHeader(version: 0xbad0_0001, size: 1250)        // wrong version
                case 4: bytes = Array(Garbage.longHeader(version: 1, size: 1200).prefix(Int.random(in: 1...40)))  // truncated
                default: bytes = Garbage.longHeader(version: 1, size: 1300, initial: false) // handshake packet, unknown CID
                }
                ch.write(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(bytes: bytes)), promise: nil)
                if i % 64 == 0 {
                    ch.flush()
                    try await Task.sleep(for: .milliseconds(1))
                }
            }
            ch.flush()
            // The flood overlapped the transfer: it began after the first bytes and ended before the last.
            let atFloodEnd = progress.received.load(ordering: .relaxed)
            progress.floodOver.store(true, ordering: .relaxed)
            #expect(atFloodEnd > 0 && atFloodEnd < n, "received \(atFloodEnd) of \(n) bytes when the flood ended")
            let (got, ok) = try await download.value
            #expect(got == n)
            #expect(ok)
            let stats = server.stats
            #expect(stats.datagramsDropped >= 2000)
            #expect(stats.statelessResetsSent >= 1)        // short-header junk draws (rate-limited) resets
            #expect(stats.versionNegotiationsSent >= 1)
            // Forged Initials left nothing behind; the real connection still serves.
            for _ in 0..<200 where await server.connectionCount() != 1 { try await Task.sleep(for: .milliseconds(10)) }
            #expect(await server.connectionCount() == 1)
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/1000"))
            #expect(try await r.body.collect(upTo: 1 << 20).readableBytes == 1000)
            try await ch.close()
            await c.close()
        }
    }
}

@Suite("HTTP/3 readers that stop reading")
struct StalledReaderTests {
    @Test("a response whose flow-control window the client keeps closed is reset after the stall timeout, and its file is closed")
    func stalledReaderIsReset() async throws {
        var server = QUICSettings()
        server.responseStallTimeout = .seconds(1)
        try await QUICTestServer.with(quic: server) { _, port, service in
            var client = QUICSettings()
            client.streamWindow = 64 << 10
            client.connectionWindow = 256 << 10
            client.maxConnectionWindow = 256 << 10
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"),
                                                      settings: client, connectTimeout: .seconds(5))
            // Ask for 64 MiB and never read the body: the window closes after 64 KiB.
            let r = try await c.request(HTTPRequestHead(method: "GET", path: "/pattern/\(64 << 20)"))
            #expect(r.status == 200)
            let closed = await eventually(timeout: 10) { service.files.withLock { $0.first?.closes.withLock { $0 } } == 1 }
            #expect(closed, "the stalled response's file was not closed")
            // The body fails (the stream was reset), it does not hang.
            await #expect(throws: (any Error).self) { _ = try await r.body.collect(upTo: 128 << 20) }
            // The connection itself still works.
            let ok = try await c.request(HTTPRequestHead(method: "GET", path: "/whoami"))
            #expect(ok.status == 200)
            await c.close()
        }
    }
}

@Suite("HTTP/3 handlers follow their streams")
struct HandlerCancellationTests {
    @Test("a request the client cancels resets the stream and cancels its handler on the server")
    func resetCancelsTheHandler() async throws {
        try await QUICTestServer.with { _, port, service in
            let c = try await HTTP3Connection.connect(host: "127.0.0.1", port: port, credentials: try QUICTestCerts.creds("client"),
                                                      connectTimeout: .seconds(5))
            let t = Task { try await c.request(HTTPRequestHead(method: "GET", path: "/sleep/60000")) }
            let started = await eventually(timeout: 5) { service.started.withLock { $0 } == 1 }
            #expect(started)
            t.cancel()
            let cancelled = await eventually(timeout: 5) { service.cancelledHandlers.withLock { $0 } == 1 }
            #expect(cancelled)
            await c.close()
        }
    }
}
