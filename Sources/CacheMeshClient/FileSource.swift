import MeshHTTP
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A local file `FileSource` cannot open, stat or read (the CLI exits 2, as for a wrong argument).
public struct LocalFileError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A local file sent as a body (e.g. `cachemesh put`), read with pread at the transport's pace.
public final class FileSource: FileBodySource {
    public let start: Int64
    public let length: Int64
    private let fd: Mutex<Int32>
    /// Bytes handed to the transport so far (progress display).
    public let sent = Mutex<Int64>(0)

    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw LocalFileError("cannot open \(path): \(String(cString: strerror(errno)))") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            Glibc.close(fd)
            throw LocalFileError("cannot stat \(path)")
        }
        self.fd = Mutex(fd)
        self.start = 0
        self.length = Int64(st.st_size)
    }

    public func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = fd.withLock { fd in fd < 0 ? -1 : pread(fd, buffer.baseAddress, buffer.count, off_t(position)) }
        guard n >= 0 else { throw LocalFileError("read failed: \(String(cString: strerror(errno)))") }
        sent.withLock { $0 += Int64(n) }
        return n
    }

    public func close() {
        fd.withLock { fd in
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }
    }

    deinit { close() }
}
