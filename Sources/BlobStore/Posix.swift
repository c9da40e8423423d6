#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Thin wrappers around the POSIX calls the store needs. All of them report
/// failures as ``BlobStoreError/io(_:)`` with the `errno` text included.
enum Posix {
    /// Human readable text for an `errno` value, e.g. `"No such file or directory (errno 2)"`.
    static func errnoText(_ code: Int32) -> String {
        "\(String(cString: strerror(code))) (errno \(code))"
    }

    /// "operation not permitted", "read-only file system": strerror in lower case, no number.
    static func errnoWords(_ code: Int32) -> String {
        let s = String(cString: strerror(code))
        guard let first = s.first else { return "errno \(code)" }
        return first.lowercased() + s.dropFirst()
    }

    /// Builds an I/O error for `operation` on `path` from the current `errno`.
    static func ioError(_ operation: String, _ path: String, _ code: Int32 = errno) -> BlobStoreError {
        .io("\(operation) \(path): \(errnoText(code))")
    }

    /// Current wall clock time in whole seconds since the epoch.
    static func nowSeconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec)
    }

    /// Opens `path` read-only (close-on-exec).
    static func openForReading(_ path: String) throws(BlobStoreError) -> Int32 {
        while true {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd >= 0 { return fd }
            if errno == EINTR { continue }
            throw ioError("open", path)
        }
    }

    /// Creates a new, uniquely named file in `directory` (`O_EXCL`), returning its descriptor and path.
    static func createTempFile(in directory: String) throws(BlobStoreError) -> (fd: Int32, path: String) {
        var attempts = 0
        while true {
            let name = "\(randomHex())\(randomHex()).tmp"
            let path = directory + "/" + name
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)   // RDWR: BlobWriter.readWritten
            if fd >= 0 { return (fd, path) }
            let code = errno
            attempts += 1
            if (code == EEXIST || code == EINTR) && attempts < 16 { continue }
            throw ioError("create temp file", path, code)
        }
    }

    /// Writes the whole buffer, retrying on short writes and `EINTR`.
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws(BlobStoreError) {
        guard var base = bytes.baseAddress else { return }
        var remaining = bytes.count
        while remaining > 0 {
            let n = write(fd, base, remaining)
            if n < 0 {
                if errno == EINTR { continue }
                throw writeError("write", path)
            }
            if n == 0 { throw .io("write \(path): wrote 0 bytes") }
            remaining -= n
            base += n
        }
    }

    /// Reads up to `buffer.count` bytes at `offset`, retrying on `EINTR`.
    static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: Int64, path: String) throws(BlobStoreError) -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        while true {
            #if canImport(Glibc) || canImport(Musl)
            let n = Glibc.pread(fd, base, buffer.count, off_t(offset))
            #else
            let n = Darwin.pread(fd, base, buffer.count, off_t(offset))
            #endif
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw ioError("pread", path)
        }
    }

    /// Reads a whole file (opened as `fd`) of `size` bytes into an array.
    static func readFully(_ fd: Int32, size: Int64, path: String) throws(BlobStoreError) -> [UInt8] {
        guard size > 0 else { return [] }
        var result = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        var failure: BlobStoreError?
        result.withUnsafeMutableBytes { buf in
            while done < buf.count {
                do throws(BlobStoreError) {
                    let n = try Posix.pread(fd, UnsafeMutableRawBufferPointer(rebasing: buf[done...]), offset: Int64(done), path: path)
                    if n == 0 {
                        failure = .io("read \(path): file is shorter than expected (\(done) of \(size) bytes)")
                        return
                    }
                    done += n
                } catch {
                    failure = error
                    return
                }
            }
        }
        if let failure { throw failure }
        return result
    }

    /// Closes a descriptor, ignoring errors (used on cleanup paths).
    static func closeQuietly(_ fd: Int32) {
        if fd >= 0 { _ = close(fd) }
    }

    /// Removes a file. Returns `nil` on success or if it did not exist, else the `errno`.
    @discardableResult
    static func unlinkIfPresent(_ path: String) -> Int32? {
        if unlink(path) == 0 { return nil }
        let code = errno
        return code == ENOENT ? nil : code
    }

    /// Creates a directory if it does not exist yet.
    static func makeDirectory(_ path: String) throws(BlobStoreError) {
        if mkdir(path, 0o755) == 0 { return }
        let code = errno
        if code == EEXIST {
            var st = stat()
            if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR { return }
            throw .io("\(path) exists and is not a directory")
        }
        throw .io("cannot create the directory \(path): \(errnoWords(code))")
    }

    /// Creates `path` and all missing parents.
    static func makeDirectories(_ path: String) throws(BlobStoreError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/", omittingEmptySubsequences: true) {
            prefix += "/" + component
            try makeDirectory(prefix)
        }
    }

    /// Sets the modification (and access) time of `path` to now. Errors are ignored: it is only a hint.
    static func touch(_ path: String) {
        _ = utimensat(AT_FDCWD, path, nil, 0)
    }

    struct FileInfo {
        var isRegularFile: Bool
        var isDirectory: Bool
        var size: Int64
        var mtimeSeconds: Int64
        var mtimeNanoseconds: Int64
    }

    /// `lstat(2)`; `nil` if the path does not exist or cannot be examined.
    static func fileInfo(_ path: String) -> FileInfo? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        #if os(Linux)
        let sec = Int64(st.st_mtim.tv_sec), nsec = Int64(st.st_mtim.tv_nsec)
        #else
        let sec = Int64(st.st_mtimespec.tv_sec), nsec = Int64(st.st_mtimespec.tv_nsec)
        #endif
        return FileInfo(isRegularFile: (st.st_mode & S_IFMT) == S_IFREG,
                        isDirectory: (st.st_mode & S_IFMT) == S_IFDIR,
                        size: Int64(st.st_size), mtimeSeconds: sec, mtimeNanoseconds: nsec)
    }

    /// Seconds on the monotonic clock.
    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Blocks the calling thread (a scan thread, never a task of the cooperative pool).
    static func sleep(seconds: Double) {
        var ts = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
        var remaining = timespec()
        while nanosleep(&ts, &remaining) != 0 && errno == EINTR { ts = remaining }
    }

    /// Calls `body(directoryFD, name, nameLength)` for every entry of `path` but `.` and `..`
    /// (nothing if it cannot be opened). The name is valid only during the call.
    static func forEachDirectoryEntry(_ path: String, _ body: (Int32, UnsafePointer<CChar>, Int) -> Void) {
        guard let dir = opendir(path) else { return }
        defer { closedir(dir) }
        let dfd = dirfd(dir)
        while let entry = readdir(dir) {
            withUnsafePointer(to: &entry.pointee.d_name) { tuple in
                tuple.withMemoryRebound(to: CChar.self, capacity: 256) { name in
                    let length = strlen(name)
                    if length == 1 && name[0] == 0x2E { return }
                    if length == 2 && name[0] == 0x2E && name[1] == 0x2E { return }
                    body(dfd, name, length)
                }
            }
        }
    }

    private final class ThreadBody {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Runs `body` on a new detached thread (blocking file system work off the cooperative pool).
    static func startThread(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { argument in
            #if os(Linux)
            let body = Unmanaged<ThreadBody>.fromOpaque(argument!).takeRetainedValue()
            #else
            let body = Unmanaged<ThreadBody>.fromOpaque(argument).takeRetainedValue()
            #endif
            body.run()
            return nil
        }, box)
        if rc != 0 {
            // No thread to be had: run it here rather than not at all.
            Unmanaged<ThreadBody>.fromOpaque(box).takeRetainedValue().run()
            return
        }
        pthread_detach(thread)
    }

    /// Runs `body(0)` … `body(count - 1)` at once, each on its own thread (`body(0)` on the calling
    /// one), and returns when all have returned. Threads that cannot be created run here, after.
    static func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        var threads: [pthread_t] = []
        var inline: [Int] = []
        for index in 1..<max(1, count) {
            let box = Unmanaged.passRetained(ThreadBody { body(index) }).toOpaque()
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { argument in
                #if os(Linux)
                Unmanaged<ThreadBody>.fromOpaque(argument!).takeRetainedValue().run()
                #else
                Unmanaged<ThreadBody>.fromOpaque(argument).takeRetainedValue().run()
                #endif
                return nil
            }, box)
            if rc == 0 {
                threads.append(thread)
            } else {
                Unmanaged<ThreadBody>.fromOpaque(box).release()
                inline.append(index)
            }
        }
        body(0)
        for index in inline { body(index) }
        for thread in threads { pthread_join(thread, nil) }
    }

    /// Size and free bytes (for unprivileged users) of the file system holding `path`.
    static func fileSystemSpace(_ path: String) -> (total: Int64, free: Int64)? {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { return nil }
        let unit = Int64(st.f_frsize)
        return (Int64(st.f_blocks) * unit, Int64(st.f_bavail) * unit)
    }

    /// Like `ioError`, but a full file system (ENOSPC, EDQUOT) is ``BlobStoreError/diskFull(_:)``.
    static func writeError(_ operation: String, _ path: String, _ code: Int32 = errno) -> BlobStoreError {
        if code == ENOSPC || code == EDQUOT { return .diskFull("\(operation) \(path): \(errnoText(code))") }
        return ioError(operation, path, code)
    }

    /// `fsync` of a directory (after a rename into it); nil on success.
    static func syncDirectory(_ path: String) -> BlobStoreError? {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return ioError("open directory", path) }
        defer { closeQuietly(fd) }
        while fsync(fd) != 0 {
            if errno != EINTR { return ioError("fsync directory", path) }
        }
        return nil
    }

    private static func randomHex() -> String {
        let value = UInt64.random(in: .min ... .max)
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}
