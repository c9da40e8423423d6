// The client commands (`put`, `get`, `status`) and what they share: connection flags, the
// progress line, errors and the clean-up of a download cut short by a signal.

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


/// Connection options shared by the client commands (flags, or CACHEMESH_* environment variables).
struct ClientFlags: ParsableArguments {
    @Option(help: "Node address host:port (env CACHEMESH_SERVER; default: 127.0.0.1:8443).") var server: String?
    @Option(help: "Client certificate (PEM) (env CACHEMESH_CERT).") var cert: String?
    @Option(help: "Client private key (PEM) (env CACHEMESH_KEY).") var key: String?
    @Option(help: "Mesh CA certificate (PEM) (env CACHEMESH_CA).") var ca: String?
    @Flag(help: "Plaintext h2c (the node must run with --insecure; default: TLS).") var insecure = false
    @Option(help: "tcp (HTTP/2 over TLS) or quic (HTTP/3; the node's --quic-listen port).") var transport: ClientOptions.Transport = .tcp
    @Option(name: .customLong("quic-max-datagram"), help: "With --transport quic: largest UDP payload to send (default 1452 with path MTU discovery).") var quicMaxDatagram: Int?
    @Option(name: .customLong("log-level"), help: "Least severe log messages written to stderr: trace, debug, info, notice, warning, error, critical.") var logLevel: Logger.Level = .warning

    func options() throws -> ClientOptions {
        let env = ProcessInfo.processInfo.environment
        let s = server ?? env["CACHEMESH_SERVER"] ?? "127.0.0.1:8443"
        guard let hp = HostPort(s) else { throw ValidationError("--server must be host:port, got \(s)") }
        var o = ClientOptions(server: hp, certificate: cert ?? env["CACHEMESH_CERT"], privateKey: key ?? env["CACHEMESH_KEY"],
                              ca: ca ?? env["CACHEMESH_CA"], insecure: insecure)
        o.transport = transport
        do { try NodeConfiguration.checkDatagramSize(quicMaxDatagram, key: "--quic-max-datagram") } catch { throw ValidationError("\(error)") }
        o.quicMaxDatagram = quicMaxDatagram
        return o
    }

    func connect() async throws -> CacheClient {
        bootstrapLogging(logLevel)
        tuneAllocator()
        let o = try options()
        do {
            return try await CacheClient.connect(o)
        } catch let e as ConnectionFailure {
            throw CLIError(e.description) // "cannot connect to HOST:PORT: connection refused"
        } catch let e as TLSFileError {
            throw CLIError(e.description) // "cannot read CA certificate file PATH: no such file or directory"
        } catch CacheClientError.usage(let message) {
            throw ValidationError(message)
        } catch {
            throw CLIError("cannot connect to \(o.server): \(error)")
        }
    }
}

struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Progress on stderr, only when stderr is a terminal (no `\r` lines in pipes and logs) and the
/// transfer is big enough to wait for: at least 8 MiB (known total), or once 8 MiB have moved
/// (unknown total). `finish(done:)` draws a last, current line (100% on success) before the newline.
final class ProgressLine: Sendable {
    /// Smaller transfers show no progress at all.
    static let threshold: Int64 = 8 << 20

    private struct State {
        var last = Date.distantPast
        var shown = false
        var finished = false
        var total: Int64?
    }

    private let label: String
    private let terminal: Bool
    private let start = Date()
    private let state: Mutex<State>

    init(label: String, total: Int64?, terminal: Bool = isatty(STDERR_FILENO) == 1) {
        self.label = label
        self.state = Mutex(State(total: total))
        self.terminal = terminal
    }

    /// Whether a line is shown for `done` of `total` bytes.
    static func worthShowing(done: Int64, total: Int64?) -> Bool {
        if let total { return total >= threshold }
        return done >= threshold
    }

    func update(_ done: Int64, _ total: Int64?, force: Bool = false) {
        guard terminal else { return }
        state.withLock { st in
            guard !st.finished else { return }
            if let total { st.total = total }
            guard Self.worthShowing(done: done, total: st.total) else { return }
            let now = Date()
            guard force || now.timeIntervalSince(st.last) > 0.2 else { return }
            st.last = now
            st.shown = true
            draw(done, total: st.total, now: now)
        }
    }

    private func draw(_ done: Int64, total: Int64?, now: Date) {
        let secs = max(now.timeIntervalSince(start), 0.001)
        let rate = ByteSize.format(Int64(Double(done) / secs)) + "/s"
        let pct = total.map { $0 > 0 ? String(format: " %3.0f%%", Double(done) * 100 / Double($0)) : "" } ?? ""
        let tot = total.map { " / " + ByteSize.format($0) } ?? ""
        FileHandle.standardError.write("\r\(label)\(pct) \(ByteSize.format(done))\(tot) \(rate)   ".data(using: .utf8)!)
    }

    /// Ends the line. With `done` (the transfer succeeded: `done` bytes moved) the last line shown
    /// is redrawn with that figure first, so it never ends on a stale 60%.
    func finish(done: Int64? = nil) {
        state.withLock { st in
            guard terminal, !st.finished else { return }
            st.finished = true
            if let done, st.shown || Self.worthShowing(done: done, total: st.total) {
                if st.total == nil || st.total! < done { st.total = done }
                st.shown = true
                draw(done, total: st.total, now: Date())
            }
            if st.shown { FileHandle.standardError.write("\n".data(using: .utf8)!) }
        }
    }
}

struct PutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "put", abstract: "Upload a file to the CAS; prints its digest (sha256/size).")
    @Argument(help: "File to upload.") var file: String
    @OptionGroup var client: ClientFlags

    func run() async throws {
        let c = try await client.connect()
        defer { Task { await c.close() } }
        let source = try FileSource(path: file)
        let progress = ProgressLine(label: "upload", total: source.length)
        let ticker = Task {
            while !Task.isCancelled {
                progress.update(source.sent.withLock { $0 }, source.length)
                try? await Task.sleep(for: .milliseconds(200))
            }
        }
        defer { ticker.cancel() }
        do {
            let d = try await c.put(file: file, source: source)
            ticker.cancel()
            progress.finish(done: source.length)
            print(d)
        } catch {
            progress.finish()
            throw CLIError("put \(file) failed: \(error)")
        }
    }
}

struct GetCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get", abstract: "Download a blob by digest (sha256 or sha256/size), verifying it.",
        discussion: """
        With -o PATH the blob goes to a temporary file beside PATH (PATH.cachemesh-partial-XXXXXXXX) \
        and is renamed over PATH only once the whole body arrived and matched the digest (and SIZE). \
        PATH may be a new file or an existing regular file; a directory, device, fifo, socket or a \
        symbolic link to anything but a regular file is refused (a link to a regular file: that file \
        is replaced, the link kept). A failure, SIGINT or SIGTERM removes the temporary file and \
        leaves PATH as it was. Exit status: 0 ok, 1 failure (nothing written), 130/143 on SIGINT/SIGTERM.
        """)
    @Argument(help: "Digest: 64-hex SHA-256, optionally /size (a blob of another size is an error).") var digest: String
    @Option(name: .shortAndLong, help: "Output file; - or none: stdout. Replaced only once verified; never a directory or device.") var output: String?
    @OptionGroup var client: ClientFlags

    /// `HASH` or `HASH/SIZE`.
    static func parse(_ digest: String) throws -> (hash: String, size: Int64?) {
        let parts = digest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, Digest.isValidHash(parts[0]) else {
            throw ValidationError("digest must be 64 lowercase hex characters (optionally /size), got \(digest)")
        }
        guard parts.count == 2 else { return (String(parts[0]), nil) }
        guard !parts[1].isEmpty, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int64(parts[1]) else {
            throw ValidationError("the size after / must be a number of bytes, got \(parts[1]) in \(digest)")
        }
        return (String(parts[0]), n)
    }

    func run() async throws {
        let (hash, size) = try Self.parse(digest)
        // Checked before connecting: a refused path costs no download and touches nothing.
        let file: BlobOutputFile?
        do {
            file = try output.flatMap { $0 == "-" ? nil : try BlobOutputFile(path: $0) }
        } catch {
            throw CLIError("get \(hash): \(error)")
        }
        let cleanup = file.map { DownloadSignalCleanup($0) }
        defer { cleanup?.cancel() }
        let c = try await client.connect()
        defer { Task { await c.close() } }
        let progress = ProgressLine(label: "download", total: size)
        do {
            let n = try await c.get(hash: hash, size: size, into: file) { done, total in progress.update(done, total) }
            progress.finish(done: n)
            if let file { FileHandle.standardError.write("wrote \(n) bytes to \(file.path)\n".data(using: .utf8)!) }
        } catch {
            progress.finish()
            cleanup?.waitIfInterrupted()
            throw CLIError("get \(hash) failed: \(error)")
        }
    }
}

/// While `get -o` runs, SIGINT and SIGTERM remove the temporary file (the destination stays as it
/// was) and then end the process by that signal (exit status 130 / 143 in a shell).
final class DownloadSignalCleanup: @unchecked Sendable {
    private var sources: [any DispatchSourceSignal] = []
    private let interrupted = Mutex(false)

    init(_ file: BlobOutputFile) {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            src.setEventHandler { [self] in
                interrupted.withLock { $0 = true }
                let stopped = file.abort()
                let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
                let note = stopped
                    ? "\ncachemesh: \(name): download stopped, partial file removed, \(file.path) left as it was\n"
                    : "\ncachemesh: \(name)\n"
                _ = note.utf8CString.withUnsafeBufferPointer { Glibc.write(STDERR_FILENO, $0.baseAddress, $0.count - 1) }
                // Die by the signal itself, as an interrupted program should (the shell sees 128+N).
                signal(sig, SIG_DFL)
                kill(getpid(), sig)
                usleep(500_000)
                _exit(128 + sig)
            }
            src.resume()
            sources.append(src)
        }
    }

    /// The download failed: if that is because a signal aborted it, let the signal handler end the
    /// process (by the signal) instead of exiting 1 with a "cancelled" error first.
    func waitIfInterrupted() {
        guard interrupted.withLock({ $0 }) else { return }
        while true { sleep(1) }
    }

    /// Back to the default actions (the download is over).
    func cancel() {
        for s in sources { s.cancel() }
        sources = []
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
    }
}

/// "2.17 s", "850 ms", "3 min 5 s": durations for people.
func formatSeconds(_ d: Duration) -> String {
    let c = d.components
    let seconds = Double(c.seconds) + Double(c.attoseconds) / 1e18
    return formatSeconds(seconds)
}

func formatSeconds(_ seconds: Double) -> String {
    if seconds < 1 { return "\(Int((seconds * 1000).rounded())) ms" }
    if seconds < 60 { return String(format: "%.2f s", seconds) }
    let whole = Int(seconds.rounded())
    if whole < 3600 { return "\(whole / 60) min \(whole % 60) s" }
    if whole < 86400 { return "\(whole / 3600) h \(whole % 3600 / 60) min" }
    return "\(whole / 86400) d \(whole % 86400 / 3600) h"
}

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show a node: role, listeners, store usage, hit ratio, mesh members and fetch wins.",
        discussion: """
        Prints a table; --json prints the node's /status document instead (fields: docs/cli.md). \
        Any certificate (node, client, reader) sees the mesh members; a caller without one sees \
        the counts only.
        """)
    @Flag(help: "Print the /status JSON document (for scripts) instead of the table.") var json = false
    @OptionGroup var client: ClientFlags

    func run() async throws {
        let c = try await client.connect()
        defer { Task { await c.close() } }
        let (hs, hb) = try await c.getText("/healthz")
        let (ss, sb) = try await c.getText("/status")
        guard ss == 200 else { throw CLIError("status failed: the node answered \(ss): \(CacheMeshCommand.oneLine(sb))") }
        let status: NodeStatus
        do {
            status = try NodeStatus.decoder().decode(NodeStatus.self, from: Data(sb.utf8))
        } catch {
            throw CLIError("status failed: the node's /status is not a status document (\(error))")
        }
        if json {
            print(sb, terminator: sb.hasSuffix("\n") ? "" : "\n")
            return
        }
        let health = hs == 200 ? "healthy" : "unhealthy (\(hs) \(CacheMeshCommand.oneLine(hb)))"
        print(Self.table(status, server: "\(try client.options().server)", health: health), terminator: "")
    }

    static func percent(_ r: Double?) -> String { r.map { String(format: "%.1f%%", $0 * 100) } ?? "n/a" }

    /// The status for people: labelled lines, then one row per member.
    static func table(_ s: NodeStatus, server: String, health: String) -> String {
        var lines: [(String, String)] = []
        let role = s.mesh.map { "\(s.role) in mesh \"\($0.topology)\"" } ?? "standalone node"
        lines.append(("node", "\(s.name) (\(role)) at \(server), up \(formatSeconds(Double(s.uptimeSeconds))), \(health)\(s.draining ? ", DRAINING" : "")"))
        lines.append(("listeners", [("tcp", s.listen.tcp), ("quic", s.listen.quic)].map { "\($0.0) \($0.1 ?? "-")" }.joined(separator: ", ")))
        if s.listen.local != nil || s.listen.localSocket != nil {
            let at = [s.listen.local, s.listen.localSocket.map { "unix:\($0)" }].compactMap { $0 }.joined(separator: ", ")
            lines.append(("local", "\(at) (plaintext HTTP/1.1, h2c, gRPC; role \(s.listen.localRole ?? "client"))"))
        }
        let st = s.store
        let usedPct = st.maxBytes > 0 ? String(format: " (%.1f%%)", Double(st.usedBytes) * 100 / Double(st.maxBytes)) : ""
        lines.append(("store", "\(ByteSize.format(st.usedBytes)) of \(ByteSize.format(st.maxBytes)) used\(usedPct), \(st.blobs) blobs, \(st.actions) actions, \(st.evictions) evictions"))
        if let index = st.index, !index.complete {
            lines.append(("index", "rebuilding after a restart: \(index.scannedDirectories) of \(index.totalDirectories) directories, \(index.scannedEntries) entries so far (served meanwhile)"))
        }
        lines.append(("hits", "\(st.hits) hits, \(st.misses) misses: hit ratio \(percent(st.hitRatio))"))
        if let m = s.mesh {
            lines.append(("mesh", "replication \(m.replication), write quorum \(m.writeQuorum), fetch \(m.fetchStrategy) over \(m.transport); \(m.liveMembers) live member(s); \(m.localityEntries) locality entries"))
            lines.append(("fetch wins", "peers \(m.fetch.peerWins), origin \(m.fetch.originWins) (\(percent(m.fetch.peerRatio)) from peers), \(m.fetch.failures) failed"))
        }
        let you = [s.you.role.map { "role \($0)" }, s.you.commonName.map { "CN \($0)" }].compactMap { $0 }.joined(separator: ", ")
        lines.append(("you", you.isEmpty ? "no certificate" : you))
        let width = lines.map(\.0.count).max() ?? 0
        var out = lines.map { $0.0.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + $0.1 }.joined(separator: "\n") + "\n"
        if let m = s.mesh {
            if let members = m.members {
                let header = ["MEMBER", "ROLE", "STATE", "TRANSPORT", "TCP", "QUIC"]
                let rows = members.map { [$0.name, $0.role, $0.status, $0.transport, $0.tcp, $0.quic ?? "-"] }
                out += "\n" + columns([header] + rows)
            } else {
                out += "\n(members: shown to callers with a certificate)\n"
            }
        }
        // Names and certificate subjects come from the node: no control characters reach the terminal.
        return String(String.UnicodeScalarView(out.unicodeScalars.map { ($0.value < 0x20 && $0 != "\n") || $0.value == 0x7f ? "?" : $0 }))
    }

    /// Left-aligned columns two spaces apart.
    static func columns(_ rows: [[String]]) -> String {
        let widths = (0..<(rows.first?.count ?? 0)).map { i in rows.map { $0[i].count }.max() ?? 0 }
        return rows.map { row in
            zip(row, widths).enumerated().map { i, cell in
                i == row.count - 1 ? cell.0 : cell.0.padding(toLength: cell.1, withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }
}
