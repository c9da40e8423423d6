import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An open, pinned blob, created by ``BlobStore/openRead(hash:offset:limit:)``.
///
/// Callers deliver the byte range `[offset, offset + length)`; positions passed
/// to ``read(at:into:)`` are absolute blob offsets (it uses `pread(2)`, so
/// there is no cursor). While the reader is open the blob cannot be evicted and
/// the reader holds one read slot; ``close()`` (or `deinit`) gives both back.
public final class BlobReader: Sendable {
    /// The blob's hash.
    public let hash: String
    /// Whose read slot this reader holds (see `SlotShare`), captured where it was opened.
    let slotOwner = SlotShare.owner
    /// First byte to deliver (absolute).
    public let offset: Int64
    /// Number of bytes to deliver: `min(limit, blobSize - offset)`.
    public let length: Int64
    /// Total size of the blob.
    public let blobSize: Int64
    /// `nil` for the virtual empty blob (which holds no slot and no pin).
    private let store: BlobStore?
    private let path: String
    /// The file descriptor (-1 once closed) and the mapping sent from, if one was asked for.
    /// `pread` and `mappedBytes` run under this lock so `close` cannot race with them.
    private let state: Mutex<State>

    private struct State {
        var fd: Int32
        var mapping: BlobMapping?
        /// No mapping to be had (small blob, mmap failed): callers use `read`.
        var unmappable = false
    }

    init(store: BlobStore?, hash: String, fd: Int32, path: String, offset: Int64, length: Int64, blobSize: Int64) {
        self.store = store
        self.hash = hash
        self.state = Mutex(State(fd: fd))
        self.path = path
        self.offset = offset
        self.length = length
        self.blobSize = blobSize
    }

    deinit {
        close()
    }

    /// End of the deliverable range (exclusive).
    public var end: Int64 { offset + length }

    /// Reads up to `buffer.count` bytes starting at absolute `position`, never past ``end``.
    /// - Returns: the number of bytes read; 0 at or after ``end``.
    /// - Throws: ``BlobStoreError/offsetOutOfRange(offset:size:)`` for a negative position,
    ///   ``BlobStoreError/closed`` after ``close()``, ``BlobStoreError/io(_:)`` on read errors
    ///   or if the file is shorter than the index says.
    public func read(at position: Int64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard position >= 0 else { throw BlobStoreError.offsetOutOfRange(offset: position, size: blobSize) }
        let wanted = Int(min(Int64(buffer.count), max(0, end - position)))
        guard let store else {
            return 0  // The empty blob has nothing to read.
        }
        return try state.withLock { state throws(BlobStoreError) -> Int in
            guard state.fd >= 0 else { throw .closed }
            guard wanted > 0 else { return 0 }
            let n: Int
            do throws(BlobStoreError) {
                n = try Posix.pread(state.fd, UnsafeMutableRawBufferPointer(rebasing: buffer[..<wanted]), offset: position, path: path)
            } catch {
                // EIO and the like: the copy here is lost; it must never be served again.
                store.dropUnreadable(hash: hash, reason: "\(error)")
                throw error
            }
            if n == 0 {
                let error = BlobStoreError.io("read \(path): file ends at \(position), expected \(blobSize) bytes")
                store.dropUnreadable(hash: hash, reason: "\(error)")
                throw error
            }
            store.recordBytesOut(Int64(n))
            return n
        }
    }

    /// Reads the whole range `[offset, offset + length)` into memory.
    public func readAll() throws -> [UInt8] {
        guard length > 0 else { return [] }
        var result = [UInt8](repeating: 0, count: Int(length))
        try result.withUnsafeMutableBytes { buffer in
            var done = 0
            while done < buffer.count {
                let n = try read(at: offset + Int64(done), into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
                if n == 0 { throw BlobStoreError.io("read \(path): unexpected end of data") }
                done += n
            }
        }
        return result
    }

    /// Bytes `[position, position + n)` with `0 < n <= max`, straight from a read-only mapping of
    /// the blob file (shared with other readers of the blob, see
    /// ``BlobStoreConfiguration/mappedCacheBytes``), valid until ``close()``; nil if the range is
    /// empty, the reader is closed, the blob is below ``BlobStoreConfiguration/mapMinimumBytes`` or
    /// cannot be mapped (use ``read(at:into:)`` then). A transport hands these pages to the
    /// encryption without copying them into a buffer first. Blob files are never modified in
    /// place (written aside, then renamed; eviction unlinks), so a mapping cannot shrink under us.
    public func mappedBytes(at position: Int64, max: Int) -> UnsafeRawBufferPointer? {
        guard let store, position >= offset, position < end, max > 0 else { return nil }
        let chunk = Swift.min(Int64(max), end - position)
        let result = state.withLock { state -> UnsafeRawBufferPointer? in
            guard state.fd >= 0, !state.unmappable else { return nil }
            if state.mapping == nil {
                state.mapping = store.mapping(hash: hash, fd: state.fd, size: blobSize)
                if state.mapping == nil {
                    state.unmappable = true
                    return nil
                }
            }
            return UnsafeRawBufferPointer(start: state.mapping!.base + Int(position), count: Int(chunk))
        }
        if result != nil { store.recordBytesOut(chunk) }
        return result
    }

    /// Closes the file (and its mapping), unpins the blob and releases the read slot. Idempotent.
    public func close() {
        let wasOpen = state.withLock { state -> Bool in
            state.mapping = nil
            guard state.fd >= 0 else { return false }
            Posix.closeQuietly(state.fd)
            state.fd = -1
            return true
        }
        if wasOpen { store?.readerClosed(hash: hash, owner: slotOwner) }
    }
}
