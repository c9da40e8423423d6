import BlobStore
import CacheNode
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
import TestSupport
#endif

/// The real `cachemesh get` binary against a real node: what `-o PATH` may replace, what a failure
/// or a signal leaves behind, and the SIZE in `HASH/SIZE`.
@Suite("cachemesh get never destroys a user's files", .serialized, .timeLimit(.minutes(5)))
struct CLITests {
    /// `cachemesh ARGS…` with the node's address and the client certificate, run to completion.
    func cachemesh(_ node: TestNode, _ args: [String], timeout: Double = 120) async throws -> ProcessResult {
        try await run([try Paths.cachemesh()] + args + node.cli(), timeout: timeout)
    }

    /// `cachemesh ARGS…` pointed at a port where nothing listens: whatever it answers, it decided
    /// before any connection (and so before any download).
    func offline(_ node: TestNode, _ args: [String]) async throws -> ProcessResult {
        try await run([try Paths.cachemesh()] + args + ["--server", "127.0.0.1:1", "--ca", node.certs.ca], timeout: 30)
    }

    /// A refusal of `path` decided up front (not by the last check before the rename).
    func expectRefusedUpFront(_ r: ProcessResult, _ path: String, _ words: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 1 && !r.signalled, "\(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains("refusing to replace \(path): it is ") && r.stderr.contains(words), "\(r)", sourceLocation: sourceLocation)
        #expect(!r.stderr.contains("during the download") && !r.stderr.contains("cannot connect"), "\(r)", sourceLocation: sourceLocation)
    }

    /// The file type bits (`S_IFMT`) of `path` itself (a link is not followed); nil if absent.
    func fileType(_ path: String) -> mode_t? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return st.st_mode & S_IFMT
    }

    func permissions(_ path: String) -> mode_t? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return st.st_mode & 0o7777
    }

    /// Temporary download files (`NAME.cachemesh-partial-…`) in `dir`.
    func partials(in dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.contains(".cachemesh-partial-") }
    }

    func contents(_ path: String) -> [UInt8]? {
        FileManager.default.contents(atPath: path).map { Array($0) }
    }

    func write(_ bytes: [UInt8], to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    @Test("-o onto a directory is refused (exit 1, path and reason named) and the directory keeps its contents")
    func refusesDirectory() async throws {
        try await withNode { node in
            let dir = try TempDir("cli-dir")
            defer { dir.remove() }
            let blob = randomBytes(6) // the issue: a working directory became a 6-byte file
            let d = try await withClient(node) { try await $0.put(bytes: blob) }
            let target = dir.file("work")
            try FileManager.default.createDirectory(atPath: target + "/sub", withIntermediateDirectories: true)
            let notes = Array("precious notes\n".utf8)
            try write(notes, to: target + "/notes.txt")

            for spelling in [target, target + "/"] {
                expectRefusedUpFront(try await cachemesh(node, ["get", d.hash, "-o", spelling]), spelling, "it is a directory")
                expectRefusedUpFront(try await offline(node, ["get", d.hash, "-o", spelling]), spelling, "it is a directory")
            }
            #expect(fileType(target) == S_IFDIR)
            #expect(contents(target + "/notes.txt") == notes)
            #expect(fileType(target + "/sub") == S_IFDIR)
            #expect(partials(in: dir.path).isEmpty && partials(in: target).isEmpty)

            // The blob itself is fine: the same command to a new file works.
            let fresh = dir.file("fresh")
            let ok = try await cachemesh(node, ["get", d.hash, "-o", fresh])
            #expect(ok.status == 0, "\(ok)")
            #expect(contents(fresh) == blob)
        }
    }

    @Test("-o onto a fifo, /dev/null or a link to a non-regular file is refused without opening or replacing it")
    func refusesSpecialFiles() async throws {
        try await withNode { node in
            let dir = try TempDir("cli-special")
            defer { dir.remove() }
            let blob = randomBytes(1000)
            let d = try await withClient(node) { try await $0.put(bytes: blob) }

            // Opening a fifo without a reader for writing blocks: a get that opened it would hang
            // (and time out here) instead of answering at once.
            let fifo = dir.file("pipe")
            try #require(mkfifo(fifo, 0o644) == 0, "mkfifo: \(String(cString: strerror(errno)))")
            expectRefusedUpFront(try await cachemesh(node, ["get", d.hash, "-o", fifo], timeout: 30), fifo, "a fifo")
            expectRefusedUpFront(try await offline(node, ["get", d.hash, "-o", fifo]), fifo, "a fifo")
            #expect(fileType(fifo) == S_IFIFO)

            // A device: refused from lstat alone, so even as root /dev/null is never opened or replaced.
            expectRefusedUpFront(try await cachemesh(node, ["get", d.hash, "-o", "/dev/null"]), "/dev/null", "a character device")
            expectRefusedUpFront(try await offline(node, ["get", d.hash, "-o", "/dev/null"]), "/dev/null", "a character device")
            #expect(fileType("/dev/null") == S_IFCHR)
            #expect(partials(in: "/dev").isEmpty)

            // Symbolic links to a directory, to the fifo, and to nothing: refused, the links stay.
            let sub = dir.file("sub")
            try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: false)
            for (name, target, words) in [("to-dir", "sub", "which is a directory"), ("to-fifo", "pipe", "which is a fifo"),
                                          ("dangling", "missing", "cannot be followed")] {
                let link = dir.file(name)
                try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: target)
                expectRefusedUpFront(try await cachemesh(node, ["get", d.hash, "-o", link], timeout: 30), link, words)
                #expect(fileType(link) == S_IFLNK, "\(name)")
                #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: link)) == target, "\(name)")
            }
            #expect(fileType(sub) == S_IFDIR)
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: sub)) ?? ["?"]).isEmpty)
            #expect(fileType(dir.file("missing")) == nil)

            // A link to a regular file: the file it points to is replaced, the link is kept.
            let real = dir.file("real")
            try write(Array("old\n".utf8), to: real)
            let link = dir.file("link")
            try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "real")
            let ok = try await cachemesh(node, ["get", d.hash, "-o", link])
            #expect(ok.status == 0, "\(ok)")
            #expect(fileType(link) == S_IFLNK)
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: link)) == "real")
            #expect(contents(real) == blob)
            #expect(partials(in: dir.path).isEmpty)
        }
    }

    @Test("An existing regular file is replaced only by a digest-verified blob, and keeps its permissions")
    func replacesRegularFileOnlyWhenVerified() async throws {
        try await withNode { node in
            let dir = try TempDir("cli-replace")
            defer { dir.remove() }
            // 1 MB: above the node's in-memory tier (64 KiB), so it is served from its file.
            let blob = randomBytes(1_000_000)
            let d = try await withClient(node) { try await $0.put(bytes: blob) }
            let target = dir.file("out.bin")
            let previous = Array("the user's previous file\n".utf8)
            try write(previous, to: target)
            try #require(chmod(target, 0o640) == 0)

            // Corrupt the node's copy in place (same size, one byte flipped): the body no longer
            // matches the digest, so the download fails and the target is not touched.
            let stored = "\(node.dataDir)/cas/\(d.hash.prefix(2))/\(d.hash)"
            try #require(fileSize(stored) == Int64(blob.count), "the node's copy is not at \(stored)")
            func setByte(_ b: UInt8) throws {
                let h = try #require(FileHandle(forUpdatingAtPath: stored))
                try h.seek(toOffset: 500_000)
                try h.write(contentsOf: [b])
                try h.close()
            }
            try setByte(blob[500_000] ^ 0xff)
            let bad = try await cachemesh(node, ["get", d.hash, "-o", target])
            #expect(bad.status == 1 && !bad.signalled, "\(bad)")
            #expect(bad.stderr.contains("hashes to"), "\(bad)")
            #expect(contents(target) == previous)
            #expect(permissions(target) == 0o640)
            #expect(partials(in: dir.path).isEmpty, "\(partials(in: dir.path))")

            // Repaired: now the verified blob replaces the file, with the file's permissions.
            try setByte(blob[500_000])
            let ok = try await cachemesh(node, ["get", d.hash, "-o", target])
            #expect(ok.status == 0, "\(ok)")
            #expect(ok.stderr.contains("wrote 1000000 bytes to \(target)"), "\(ok)")
            #expect(try await sha256sum(target) == d.hash)
            #expect(fileType(target) == S_IFREG)
            #expect(permissions(target) == 0o640)
            #expect(partials(in: dir.path).isEmpty)
        }
    }

    /// Puts a random blob of `size` bytes, then starts `cachemesh get HASH -o out` through a
    /// rate-limited relay (so the download is still running when the test acts) and waits until
    /// the temporary file beside `out` holds at least `startedBytes`. `out` holds `previous`.
    func startSlowDownload(
        _ node: TestNode, dir: TempDir, size: Int, rate: String, previous: [UInt8], startedBytes: Int64
    ) async throws -> (get: ChildProcess, relay: TestRelay, out: String) {
        let big = dir.file("big")
        try await makeRandomFile(big, size: size)
        let d = try await withClient(node) { try await $0.put(file: big) }
        try FileManager.default.removeItem(atPath: big)
        let out = dir.file("out")
        try write(previous, to: out)
        let relay = try await TestRelay.start(targetPort: node.port, profile: ["--rate", rate])
        let get = try ChildProcess([try Paths.cachemesh(), "get", d.hash, "-o", out, "--server", relay.address, "--ca", node.certs.ca]
            + node.credentialArguments(.client, cert: "--cert", key: "--key"))
        var seen: Int64 = 0
        let started = await eventually(timeout: 60) {
            seen = partials(in: dir.path).map { fileSize(dir.file($0)) }.max() ?? 0
            return seen >= startedBytes || get.hasExited
        }
        guard started, !get.hasExited else {
            get.killAndWait()
            relay.child.killAndWait()
            throw HarnessError("the download did not get going (partial file \(seen) bytes, exited: \(get.hasExited)): \(get.stderr.suffix(2000))")
        }
        return (get, relay, out)
    }

    @Test("SIGINT or SIGTERM mid-download of 300 MB removes the partial file, leaves the target as it was, exits 128+signal",
          arguments: [SIGINT, SIGTERM])
    func signalMidDownload(sig: Int32) async throws {
        try await withNode(maxBytes: "1G") { node in
            let dir = try TempDir("cli-signal")
            defer { dir.remove() }
            let previous = Array("the user's file, which a Ctrl-C must not touch\n".utf8)
            // 300 MB through a 400 Mbit/s link: ~6 s, so the signal lands mid-body.
            let (get, relay, out) = try await startSlowDownload(node, dir: dir, size: 300_000_000, rate: "400mbit",
                                                                previous: previous, startedBytes: 8 << 20)
            defer {
                get.killAndWait()
                get.removeOutputFiles()
                relay.child.killAndWait()
                relay.child.removeOutputFiles()
            }
            get.signal(sig)
            let exit = await get.waitForExit(timeout: 15)
            let e = try #require(exit, "get still running 15 s after signal \(sig): \(get.stderr.suffix(2000))")
            let shellStatus = e.signalled ? 128 + e.status : e.status
            #expect(shellStatus == 128 + sig, "exit \(e) after signal \(sig): \(get.stderr.suffix(2000))")
            #expect(partials(in: dir.path).isEmpty, "left behind: \(partials(in: dir.path))")
            #expect(contents(out) == previous)
            #expect(get.stderr.contains("partial file removed"), "\(get.stderr.suffix(2000))")
            #expect((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) == ["out"])
        }
    }

    @Test("A download cut off mid-body exits 1, leaves no partial file and the target unchanged")
    func cutOffDownload() async throws {
        try await withNode(maxBytes: "1G") { node in
            let dir = try TempDir("cli-cut")
            defer { dir.remove() }
            let previous = Array("the user's file, which a failed download must not touch\n".utf8)
            let (get, relay, out) = try await startSlowDownload(node, dir: dir, size: 64 << 20, rate: "100mbit",
                                                                previous: previous, startedBytes: 4 << 20)
            defer {
                get.killAndWait()
                get.removeOutputFiles()
                relay.child.removeOutputFiles()
            }
            relay.child.signal(SIGKILL) // the link dies mid-body
            relay.child.killAndWait()
            let exit = await get.waitForExit(timeout: 30)
            let e = try #require(exit, "get still running 30 s after its connection died: \(get.stderr.suffix(2000))")
            #expect(e.status == 1 && !e.signalled, "exit \(e): \(get.stderr.suffix(2000))")
            #expect(get.stderr.contains("failed"), "\(get.stderr.suffix(2000))")
            #expect(partials(in: dir.path).isEmpty, "left behind: \(partials(in: dir.path))")
            #expect(contents(out) == previous)
        }
    }

    @Test("get HASH/SIZE with the wrong SIZE exits 1 and writes nothing; the right SIZE works")
    func sizeIsChecked() async throws {
        try await withNode { node in
            let dir = try TempDir("cli-size")
            defer { dir.remove() }
            let blob = randomBytes(5_000_000)
            let d = try await withClient(node) { try await $0.put(bytes: blob) }
            let fresh = dir.file("fresh")
            let existing = dir.file("existing")
            let previous = Array("keep me\n".utf8)
            try write(previous, to: existing)

            for wrong in [123, 4_999_999, 5_000_001, 0] {
                for out in [fresh, existing] {
                    let r = try await cachemesh(node, ["get", "\(d.hash)/\(wrong)", "-o", out])
                    #expect(r.status == 1 && !r.signalled, "/\(wrong) -o \(out): \(r)")
                    #expect(r.stderr.contains("5000000 bytes") && r.stderr.contains("digest says \(wrong)"), "/\(wrong): \(r)")
                }
                #expect(fileType(fresh) == nil, "/\(wrong) created \(fresh)")
                #expect(contents(existing) == previous, "/\(wrong) changed \(existing)")
                #expect(partials(in: dir.path).isEmpty)
                // To stdout: refused before the first byte (the node announces the length).
                let s = try await cachemesh(node, ["get", "\(d.hash)/\(wrong)"])
                #expect(s.status == 1 && !s.signalled, "/\(wrong) to stdout: \(s)")
                #expect(s.stdoutData.isEmpty, "/\(wrong) wrote \(s.stdoutData.count) bytes to stdout")
            }

            // Not a size at all: a usage error, nothing written.
            for junk in ["12x", "-5", "", "+5", "1/2"] {
                let r = try await cachemesh(node, ["get", "\(d.hash)/\(junk)", "-o", fresh])
                #expect(r.status == 2 && !r.signalled, "/\(junk): \(r)")   // exit 2: usage error (README)
                #expect(fileType(fresh) == nil)
            }

            let ok = try await cachemesh(node, ["get", "\(d.hash)/5000000", "-o", fresh])
            #expect(ok.status == 0, "\(ok)")
            #expect(contents(fresh) == blob)
            let okExisting = try await cachemesh(node, ["get", "\(d.hash)/5000000", "-o", existing])
            #expect(okExisting.status == 0, "\(okExisting)")
            #expect(contents(existing) == blob)
            #expect(partials(in: dir.path).isEmpty)
        }
    }

    @Test("-o - and no -o write the verified blob to stdout and create no file")
    func stdoutOutput() async throws {
        try await withNode { node in
            let blob = randomBytes(300_000)
            let d = try await withClient(node) { try await $0.put(bytes: blob) }
            let dash = FileManager.default.fileExists(atPath: "-")
            for args in [["get", d.hash, "-o", "-"], ["get", d.hash], ["get", "\(d.hash)/300000", "-o", "-"]] {
                let r = try await cachemesh(node, args)
                #expect(r.status == 0, "\(args): \(r)")
                #expect(Array(r.stdoutData) == blob, "\(args): \(r.stdoutData.count) bytes on stdout")
            }
            #expect(FileManager.default.fileExists(atPath: "-") == dash, "a file named - appeared")
        }
    }
}
