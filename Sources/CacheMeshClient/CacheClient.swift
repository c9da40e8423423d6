import BlobStore
import Foundation
import Logging
import MeshHTTP
import MeshHTTP2
import MeshQUIC
import MeshTLS
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where and how a client reaches a node.
public struct ClientOptions: Sendable {
    public var server: HostPort
    public var certificate: String?
    public var privateKey: String?
    public var ca: String?
    public var insecure: Bool
    /// Name to check the server certificate against (default: the host).
    public var serverName: String?
    /// HTTP/2 over TLS/TCP (default) or HTTP/3 over QUIC (the node's UDP port).
    public var transport: Transport = .tcp
    /// QUIC: the largest UDP payload to send (nil: 1452 with path MTU discovery).
    public var quicMaxDatagram: Int?

    public enum Transport: String, Sendable, CaseIterable {
        case tcp, quic
    }

    public init(server: HostPort, certificate: String? = nil, privateKey: String? = nil, ca: String? = nil, insecure: Bool = false, serverName: String? = nil) {
        self.server = server
        self.certificate = certificate
        self.privateKey = privateKey
        self.ca = ca
        self.insecure = insecure
        self.serverName = serverName
    }
}

public enum CacheClientError: Error, CustomStringConvertible {
    case http(status: Int, message: String)
    case corrupt(expected: String, actual: String)
    /// The blob is not the size its digest (`HASH/SIZE`) names; `atLeast`: the body was cut off
    /// as soon as it passed `expected`, so `actual` is a lower bound.
    case sizeMismatch(expected: Int64, actual: Int64, atLeast: Bool)
    /// An output path `get` will not replace: the path and what it is.
    case refusedOutput(path: String, what: String)
    /// An output path `get` could not write: the path and why.
    case output(path: String, reason: String)
    case usage(String)

    public var description: String {
        switch self {
        case .http(let status, let message): "server answered \(status): \(message.trimmingCharacters(in: .whitespacesAndNewlines))"
        case .corrupt(let e, let a): "downloaded body hashes to \(a), expected \(e); nothing written"
        case .sizeMismatch(let e, let a, let atLeast):
            "the blob is \(atLeast ? "more than " : "")\(atLeast ? e : a) bytes, but the digest says \(e); nothing written"
        case .refusedOutput(let path, let what):
            "refusing to replace \(path): it is \(what) (get -o only creates or replaces a regular file); nothing was written"
        case .output(let path, let reason): "\(path): \(reason)"
        case .usage(let s): s
        }
    }
}

/// Where `CacheClient.get` puts a blob: a temporary file beside the destination
/// (`NAME.cachemesh-partial-XXXXXXXX`, same directory so the final rename is atomic), renamed over
/// the destination only once the whole body arrived and matched its digest.
///
/// `init` refuses (before anything is created or opened) a destination that is a directory, a
/// device, a fifo, a socket, a dangling symbolic link, or a symbolic link to anything but a regular
/// file. A symbolic link to a regular file is kept: the file it points to is replaced (the
/// temporary file goes beside that file). A regular file that is replaced keeps its permission
/// bits. `abort()` (any thread, any time, repeatable) closes and removes the temporary file; the
/// destination is then untouched.
public final class BlobOutputFile: Sendable {
    /// The path as given.
    public let path: String
    /// The file that gets replaced or created: `path`, or the regular file a symbolic link points to.
    public let destination: String
    private let replacedMode: mode_t?
    private struct State {
        var fd: Int32 = -1
        var temp: String?
        var finished = false

        mutating func removeTemporary() {
            finished = true
            if fd >= 0 {
                _ = Glibc.close(fd)
                fd = -1
            }
            if let temp {
                _ = unlink(temp)
                self.temp = nil
            }
        }
    }
    private let state = Mutex(State())

    public init(path: String) throws {
        self.path = path
        (destination, replacedMode) = try Self.check(path)
    }

    /// The temporary file while a download is being written, else nil.
    public var temporaryPath: String? { state.withLock { $0.temp } }

    private static func errorText(_ e: Int32) -> String { String(cString: strerror(e)) }

    private static func kind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: "a regular file"
        case S_IFDIR: "a directory"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        case S_IFIFO: "a fifo (named pipe)"
        case S_IFSOCK: "a socket"
        case S_IFLNK: "a symbolic link"
        default: "not a regular file"
        }
    }

    private static func refuse(_ path: String, _ what: String) -> CacheClientError {
        .refusedOutput(path: path, what: what)
    }

    /// Decides what `path` may become: (the file to create or replace, the mode of a file replaced).
    private static func check(_ path: String) throws -> (String, mode_t?) {
        guard !path.isEmpty else { throw CacheClientError.usage("the output path is empty (use -o - for stdout)") }
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = errno
            guard e == ENOENT else { throw CacheClientError.output(path: path, reason: "cannot inspect it: \(errorText(e))") }
            // A new file: its directory must exist.
            let parent = (path as NSString).deletingLastPathComponent
            let dir = parent.isEmpty ? "." : parent
            var ds = stat()
            guard stat(dir, &ds) == 0 else {
                throw CacheClientError.output(path: path, reason: "its directory \(dir) cannot be used: \(errorText(errno))")
            }
            guard ds.st_mode & S_IFMT == S_IFDIR else {
                throw CacheClientError.output(path: path, reason: "\(dir) is \(kind(ds.st_mode)), not a directory")
            }
            return (path, nil)
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG:
            return (path, st.st_mode)
        case S_IFLNK:
            let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)) ?? "?"
            var target = stat()
            guard stat(path, &target) == 0 else {
                throw refuse(path, "a symbolic link to \(link), which cannot be followed (\(errorText(errno)))")
            }
            guard target.st_mode & S_IFMT == S_IFREG else {
                throw refuse(path, "a symbolic link to \(link), which is \(kind(target.st_mode))")
            }
            guard let resolved = realpath(path, nil) else {
                throw CacheClientError.output(path: path, reason: "cannot resolve the symbolic link: \(errorText(errno))")
            }
            defer { free(resolved) }
            return (String(cString: resolved), target.st_mode)
        default:
            throw refuse(path, kind(st.st_mode))
        }
    }

    /// Creates the temporary file (exclusively; a fresh random name each time).
    public func open() throws {
        try state.withLock { s in
            guard !s.finished else { throw CacheClientError.output(path: path, reason: "the download was cancelled") }
            guard s.temp == nil else { return }
            let dir = (destination as NSString).deletingLastPathComponent
            var base = (destination as NSString).lastPathComponent
            if base.utf8.count > 200 { base = String(decoding: base.utf8.prefix(200), as: UTF8.self) } // NAME_MAX is 255
            for _ in 0..<16 {
                let name = base + ".cachemesh-partial-" + String(format: "%08x", UInt32.random(in: 0...UInt32.max))
                let t = dir.isEmpty ? name : (dir as NSString).appendingPathComponent(name)
                let f = Glibc.open(t, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
                if f < 0 {
                    let e = errno
                    if e == EEXIST { continue }
                    throw CacheClientError.output(path: path, reason: "cannot create the temporary file \(t): \(Self.errorText(e)); nothing was written")
                }
                if let replacedMode { _ = fchmod(f, replacedMode & 0o777) }
                s.fd = f
                s.temp = t
                return
            }
            throw CacheClientError.output(path: path, reason: "cannot find a free temporary file name in \(dir.isEmpty ? "." : dir)")
        }
    }

    /// Appends bytes to the temporary file.
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        try state.withLock { s in
            guard !s.finished, s.fd >= 0, let temp = s.temp else { throw CacheClientError.output(path: path, reason: "the download was cancelled") }
            var off = 0
            while off < bytes.count {
                let n = Glibc.write(s.fd, bytes.baseAddress! + off, bytes.count - off)
                if n < 0 {
                    let e = errno
                    if e == EINTR { continue }
                    throw CacheClientError.output(path: path, reason: "writing \(temp) failed: \(Self.errorText(e))")
                }
                off += n
            }
        }
    }

    /// Renames the temporary file over the destination (after checking again that the destination
    /// is not something other than a regular file by now).
    public func commit() throws {
        try state.withLock { s in
            guard !s.finished, s.fd >= 0, let temp = s.temp else { throw CacheClientError.output(path: path, reason: "the download was cancelled") }
            var st = stat()
            if lstat(destination, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
                s.removeTemporary()
                throw Self.refuse(destination, Self.kind(st.st_mode) + " (it appeared during the download)")
            }
            let closed = Glibc.close(s.fd)
            let closeErrno = errno
            s.fd = -1
            guard closed == 0 else {
                s.removeTemporary()
                throw CacheClientError.output(path: path, reason: "writing \(temp) failed: \(Self.errorText(closeErrno)); nothing was written")
            }
            guard rename(temp, destination) == 0 else {
                let e = errno
                s.removeTemporary()
                throw CacheClientError.output(path: path, reason: "cannot rename \(temp) to \(destination): \(Self.errorText(e)); nothing was written")
            }
            s.temp = nil
            s.finished = true
        }
    }

    /// Closes and removes the temporary file; later writes and commits fail. Safe from any thread
    /// (e.g. a signal handler's queue) and repeatable; a no-op once committed. Returns false if the
    /// output was already committed or aborted.
    @discardableResult
    public func abort() -> Bool {
        state.withLock { s in
            guard !s.finished else { return false }
            s.removeTemporary()
            return true
        }
    }

    deinit { abort() }
}

/// The node's HTTP/2 client for the cache routes (used by the CLI and the tests).
public final class CacheClient: Sendable {
    /// The connection (HTTP/2 or HTTP/3) requests go over.
    public let connection: any HTTPClientTransport
    private let closer: @Sendable () async -> Void

    init(connection: any HTTPClientTransport, close: @escaping @Sendable () async -> Void) {
        self.connection = connection
        self.closer = close
    }

    public static func connect(_ options: ClientOptions, logger: Logger = Logger(label: "cachemesh.client")) async throws -> CacheClient {
        var credentials: TLSCredentials?
        if !options.insecure {
            guard let ca = options.ca else {
                throw CacheClientError.usage("TLS needs --ca (and --cert/--key for mTLS); plaintext only with --insecure")
            }
            if (options.certificate == nil) != (options.privateKey == nil) {
                throw CacheClientError.usage(options.certificate == nil ? "--key needs --cert (the client certificate)" : "--cert needs --key (its private key)")
            }
            credentials = try TLSCredentials(files: TLSFiles(certificateChain: options.certificate, privateKey: options.privateKey, trustedCA: ca))
        }
        if options.transport == .quic {
            guard let credentials else { throw CacheClientError.usage("QUIC always uses TLS: --insecure is for TCP only") }
            var settings = QUICSettings()
            settings.maxDatagramSize = options.quicMaxDatagram
            let conn = try await HTTP3Connection.connect(host: options.server.host, port: options.server.port, credentials: credentials,
                                                         serverName: options.serverName, settings: settings, logger: logger)
            return CacheClient(connection: conn, close: { await conn.close() })
        }
        let conn = try await HTTP2Connection.connect(
            host: options.server.host, port: options.server.port, credentials: credentials,
            serverName: options.serverName, logger: logger)
        return CacheClient(connection: conn, close: { await conn.close() })
    }

    public func close() async { await closer() }

    private func check(_ r: HTTPClientResponse, expect: Set<Int>) async throws {
        guard expect.contains(r.status) else {
            let body = (try? await r.body.collect(upTo: 64 * 1024)).map { String(buffer: $0) } ?? ""
            throw CacheClientError.http(status: r.status, message: body)
        }
    }

    /// Upload a file to `/cas/{sha256}` (hashing it first). Returns its digest.
    public func put(file path: String, source: FileSource? = nil) async throws -> Digest {
        let (hash, size) = try SHA256.hexOfFile(path: path)
        let src = try source ?? FileSource(path: path)
        guard src.length == size else { throw CacheClientError.usage("\(path) changed while reading") }
        let r = try await connection.request(
            HTTPRequestHead(method: "PUT", path: "/cas/\(hash)", headers: ["content-length": String(size)]), body: .file(src))
        try await check(r, expect: [200, 201])
        _ = try? await r.body.collect(upTo: 64 * 1024)
        return Digest(hash: hash, size: size)!
    }

    /// Upload bytes to `/cas/{sha256}` or, with `hash` given, under that (possibly wrong) hash.
    public func put(bytes: [UInt8], hash: String? = nil) async throws -> Digest {
        let h = hash ?? SHA256.hex(bytes)
        let r = try await connection.request(
            HTTPRequestHead(method: "PUT", path: "/cas/\(h)", headers: ["content-length": String(bytes.count)]),
            body: .bytes(ByteBuffer(bytes: bytes)))
        try await check(r, expect: [200, 201])
        _ = try? await r.body.collect(upTo: 64 * 1024)
        return Digest(hash: h, size: Int64(bytes.count))!
    }

    /// Download `/cas/{hash}`, verifying the SHA-256 (and, with `size`, the length) as it streams.
    /// With `path` (see `BlobOutputFile` for what it refuses), the blob goes to a temporary file
    /// beside it, renamed into place only once verified; without, to stdout. `progress` gets (done, total).
    public func get(hash: String, size: Int64? = nil, to path: String?, progress: (@Sendable (Int64, Int64?) -> Void)? = nil) async throws -> Int64 {
        let output = try path.map { try BlobOutputFile(path: $0) }
        return try await get(hash: hash, size: size, into: output, progress: progress)
    }

    /// `get` into a prepared output (nil: stdout). On any failure the output is aborted: its
    /// temporary file is removed and the destination left as it was.
    public func get(hash: String, size: Int64? = nil, into output: BlobOutputFile?, progress: (@Sendable (Int64, Int64?) -> Void)? = nil) async throws -> Int64 {
        do {
            guard Digest.isValidHash(hash) else { throw CacheClientError.usage("invalid digest \(hash): expected 64 lowercase hex characters") }
            if let size, size < 0 { throw CacheClientError.usage("invalid size \(size): expected a number of bytes >= 0") }
            let r = try await connection.request(HTTPRequestHead(method: "GET", path: "/cas/\(hash)"))
            try await check(r, expect: [200])
            let total = r.headers["content-length"].flatMap { Int64($0) }
            var ended = false
            do {
                if let size, let total, total != size { throw CacheClientError.sizeMismatch(expected: size, actual: total, atLeast: false) }
                try output?.open()
                var hasher = SHA256Hasher()
                var done: Int64 = 0
                for try await chunk in r.body {
                    done += Int64(chunk.readableBytes)
                    if let size, done > size { throw CacheClientError.sizeMismatch(expected: size, actual: done, atLeast: true) }
                    try chunk.withUnsafeReadableBytes { bytes in
                        hasher.update(bytes)
                        if let output { try output.write(bytes) } else { try Self.writeAll(STDOUT_FILENO, bytes) }
                    }
                    progress?(done, total)
                }
                ended = true
                if let size, done != size { throw CacheClientError.sizeMismatch(expected: size, actual: done, atLeast: false) }
                let actual = hasher.finalize()
                guard actual == hash else { throw CacheClientError.corrupt(expected: hash, actual: actual) }
                try output?.commit()
                return done
            } catch {
                if !ended { r.cancel() }
                throw error
            }
        } catch {
            output?.abort()
            throw error
        }
    }

    private static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
        var off = 0
        while off < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw CacheClientError.output(path: "stdout", reason: String(cString: strerror(e)))
            }
            off += n
        }
    }

    /// GET a small resource as text.
    public func getText(_ path: String) async throws -> (status: Int, body: String) {
        let r = try await connection.request(HTTPRequestHead(method: "GET", path: path))
        let body = try await r.body.collect(upTo: 16 << 20)
        return (r.status, String(buffer: body))
    }
}
