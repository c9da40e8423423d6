import Foundation
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import Synchronization
import TestSupport
@testable import MeshQUIC

/// The certificates certs/mkcerts.sh made for this test process.
enum QUICTestCerts {
    static let dir: String = try! RepositoryCertificates.directory()
    static var repoRoot: String { RepositoryCertificates.repositoryRoot }
    static var script: String { RepositoryCertificates.script }

    static func path(_ name: String) -> String { "\(dir)/\(name)" }

    static func creds(_ name: String?, ca: String = "ca.pem") throws -> TLSCredentials {
        try TLSCredentials(files: TLSFiles(certificateChain: name.map { path("\($0).pem") }, privateKey: name.map { path("\($0).key") },
                                           trustedCA: path(ca)))
    }
}

/// A deterministic byte pattern served from "disk" (pread-style), closed exactly once.
final class PatternFile: FileBodySource, @unchecked Sendable {
    static let period = 1_000_003
    static let block: [UInt8] = (0..<period).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 13)) }
    let start: Int64 = 0
    let length: Int64
    let closes = Mutex(0)
    init(length: Int64) { self.length = length }
    static func byte(at i: Int64) -> UInt8 { block[Int(i % Int64(period))] }
    func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, Int(length - position))
        var done = 0
        Self.block.withUnsafeBytes { src in
            while done < n {
                let off = Int((position + Int64(done)) % Int64(Self.period))
                let k = min(n - done, Self.period - off)
                (buffer.baseAddress! + done).copyMemory(from: src.baseAddress! + off, byteCount: k)
                done += k
            }
        }
        return n
    }
    func close() { closes.withLock { $0 += 1 } }

    /// Reads a whole body: its length and whether it is the pattern from offset 0.
    static func receive(_ body: HTTPInboundBody) async throws -> (count: Int64, matches: Bool) {
        var got: Int64 = 0
        var ok = true
        for try await chunk in body {
            if ok && !matches(chunk, at: got) { ok = false }
            got += Int64(chunk.readableBytes)
        }
        return (got, ok)
    }

    /// Whether `chunk` equals the pattern at `offset`.
    static func matches(_ chunk: ByteBuffer, at offset: Int64) -> Bool {
        chunk.withUnsafeReadableBytes { b in
            block.withUnsafeBytes { src in
                var done = 0
                while done < b.count {
                    let off = Int((offset + Int64(done)) % Int64(period))
                    let k = min(b.count - done, period - off)
                    if memcmp(b.baseAddress! + done, src.baseAddress! + off, k) != 0 { return false }
                    done += k
                }
                return true
            }
        }
    }
}

/// The pattern in memory, handed out through `mappedBytes` (as a mapped blob file is). `close()`
/// zeroes the memory: a byte sent after the transport closed the source arrives corrupted.
final class MappedPatternFile: FileBodySource, @unchecked Sendable {
    let start: Int64 = 0
    let length: Int64
    private let memory: UnsafeMutableRawBufferPointer
    let closes = Mutex(0)
    let preads = Mutex(0)
    init(length: Int64) {
        self.length = length
        memory = .allocate(byteCount: Int(length), alignment: 16)
        _ = try? PatternFile(length: length).read(at: 0, into: memory)
    }
    deinit { memory.deallocate() }
    func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        preads.withLock { $0 += 1 }
        let n = min(buffer.count, Int(length - position))
        buffer.baseAddress!.copyMemory(from: memory.baseAddress! + Int(position), byteCount: n)
        return n
    }
    func mappedBytes(at position: Int64, max: Int) -> UnsafeRawBufferPointer? {
        guard closes.withLock({ $0 }) == 0, position < length else { return nil }
        return UnsafeRawBufferPointer(start: memory.baseAddress! + Int(position), count: min(max, Int(length - position)))
    }
    func close() {
        closes.withLock { $0 += 1 }
        memset(memory.baseAddress!, 0, memory.count)
    }
}

/// A test service: echoes bodies, streams, serves a pattern, waits, reports cancellations.
final class QUICTestService: HTTPService {
    let bodyErrors = Mutex<[String]>([])
    let started = Mutex(0)
    let files = Mutex<[PatternFile]>([])
    let mapped = Mutex<[MappedPatternFile]>([])
    /// `/sleep/N` handlers whose task was cancelled (their stream went away).
    let cancelledHandlers = Mutex(0)

    func handle(_ request: HTTPServerRequest) async -> HTTPResponse {
        started.withLock { $0 += 1 }
        let path = request.head.path
        if path == "/echo" {
            do {
                let b = try await request.body.collect(upTo: 64 << 20)
                return HTTPResponse(status: 200, headers: ["x-peer-role": request.peer.role?.rawValue ?? "none"], body: .bytes(b))
            } catch {
                return .text(500, "\(error)")
            }
        } else if path == "/count" {
            // Consume a (large) upload; report its size and whether it is the pattern.
            do {
                var n: Int64 = 0
                var ok = true
                for try await chunk in request.body {
                    if ok && !PatternFile.matches(chunk, at: n) { ok = false }
                    n += Int64(chunk.readableBytes)
                }
                return .text(200, "\(n) \(ok ? "pattern" : "corrupt")")
            } catch {
                return .text(500, "\(error)")
            }
        } else if path == "/whoami" {
            return .text(200, "\(request.peer.role?.rawValue ?? "none") \(request.peer.commonName ?? "-")")
        } else if path.hasPrefix("/mapped/") {
            let f = MappedPatternFile(length: Int64(path.dropFirst("/mapped/".count)) ?? 0)
            mapped.withLock { $0.append(f) }
            return HTTPResponse(status: 200, body: .file(f))
        } else if path.hasPrefix("/pattern/") {
            let n = Int64(path.dropFirst("/pattern/".count)) ?? 0
            let f = PatternFile(length: n)
            files.withLock { $0.append(f) }
            return HTTPResponse(status: 200, body: .file(f))
        } else if path == "/hang-body" {
            do {
                for try await _ in request.body {}
                bodyErrors.withLock { $0.append("ended") }
            } catch {
                bodyErrors.withLock { $0.append("\(error)") }
            }
            return .text(200, "done")
        } else if path == "/stream" {
            let out = HTTPOutboundStream(highWatermark: 64 * 1024)
            Task {
                for i in 0..<100 { try? await out.write(ByteBuffer(string: "chunk\(i);")) }
                out.finish(trailers: ["x-count": "100"])
            }
            return HTTPResponse(status: 200, body: .stream(out))
        } else if path.hasPrefix("/sleep/") {
            do {
                try await Task.sleep(for: .milliseconds(Int(path.dropFirst("/sleep/".count)) ?? 0))
            } catch {
                cancelledHandlers.withLock { $0 += 1 }
            }
            return .text(200, "slept")
        } else if path == "/slow" {
            try? await Task.sleep(for: .milliseconds(300))
            return .text(200, "slow done")
        } else if path == "/trailers" {
            return HTTPResponse(status: 200, body: .bytes(ByteBuffer(string: "body")), trailers: ["grpc-status": "0"])
        }
        return .text(404, "no")
    }
}

enum QUICTestServer {
    static func with(auth: ClientAuthentication = .require, grace: TimeAmount = .seconds(5), quic: QUICSettings = QUICSettings(),
                     addressValidation: HTTP3Server.AddressValidation = .whenHandshakesExceed(64),
                     _ body: (HTTP3Server, Int, QUICTestService) async throws -> Void) async throws {
        let service = QUICTestService()
        let server = HTTP3Server(configuration: .init(host: "127.0.0.1", port: 0, credentials: try QUICTestCerts.creds("node"),
                                                      clientAuthentication: auth, quic: quic, drainGracePeriod: grace,
                                                      addressValidation: addressValidation),
                                 service: service, logger: { var l = Logger(label: "test.h3"); l.logLevel = .info; return l }())
        let addr = try await server.start()
        do {
            try await body(server, addr.port!, service)
        } catch {
            await server.close()
            throw error
        }
        await server.close()
    }
}
