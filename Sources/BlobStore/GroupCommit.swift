import CMeshSystem
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What "acknowledged" means on disk (``BlobStoreConfiguration/durability``).
public enum Durability: String, Sendable, CaseIterable {
    /// The file's data is on stable storage before it is renamed into place, and the rename
    /// before the write is acknowledged. Concurrent commits share the syncs (group commit).
    case fsync
    /// Rename only: a crash of the process loses nothing acknowledged; a power loss or kernel
    /// crash may lose the newest blobs (never exposing a torn one).
    case none
}

/// Makes commits durable in groups: one thread takes every commit waiting, syncs their data with
/// one call (`fdatasync` for a lone file, `syncfs` for several), publishes them all (the renames,
/// under the store lock), then syncs the directories with one more call. However many writers
/// commit at once, a group costs two syncs.
final class GroupCommitter: Sendable {
    struct Request: Sendable {
        /// The verified temp file, still open; the committer closes it.
        var fd: Int32
        var path: String
        /// Renames into place and indexes; returns the directory to sync (nil: nothing renamed).
        var publish: @Sendable () -> Result<String?, BlobStoreError>
        var done: @Sendable (Result<Void, BlobStoreError>) -> Void
    }

    private let queue = Mutex<[Request]>([])
    private let wakeup = DispatchSemaphore(value: 0)
    /// Groups committed and syncs issued (tests, diagnostics).
    let groups = Atomic<Int>(0)
    let syncs = Atomic<Int>(0)

    /// Tests: holds the committer (before it takes a group) while closed.
    private let gate: ScanGate?

    init(gate: ScanGate? = nil) {
        self.gate = gate
        Posix.startThread { [self] in self.run() }
    }

    /// Commits waiting for the committer.
    var pending: Int { queue.withLock { $0.count } }

    func submit(_ request: Request) {
        queue.withLock { $0.append(request) }
        wakeup.signal()
    }

    /// Submits and waits (without holding a thread of the cooperative pool).
    func commit(fd: Int32, path: String, publish: @escaping @Sendable () -> Result<String?, BlobStoreError>) async -> Result<Void, BlobStoreError> {
        await withCheckedContinuation { (c: CheckedContinuation<Result<Void, BlobStoreError>, Never>) in
            submit(Request(fd: fd, path: path, publish: publish, done: { c.resume(returning: $0) }))
        }
    }

    private func run() {
        while true {
            wakeup.wait()
            while gate?.isClosed == true { Posix.sleep(seconds: 0.001) }
            let batch = queue.withLock { q -> [Request] in
                let b = q
                q.removeAll()
                return b
            }
            guard !batch.isEmpty else { continue }
            groups.add(1, ordering: .relaxed)
            commit(batch)
        }
    }

    private func sync(_ fd: Int32, whole: Bool, data: Bool) -> Int32? {
        syncs.add(1, ordering: .relaxed)
        while true {
            #if os(Linux)
            let rc = whole ? cm_syncfs(fd) : (data ? fdatasync(fd) : fsync(fd))
            #else
            let rc = fsync(fd)
            #endif
            if rc == 0 { return nil }
            if errno == EINTR { continue }
            return errno
        }
    }

    private func commit(_ batch: [Request]) {
        // 1. The data of every file in the group.
        let dataError = sync(batch[0].fd, whole: batch.count > 1, data: true)
        for r in batch { Posix.closeQuietly(r.fd) }
        if let code = dataError {
            for r in batch {
                Posix.unlinkIfPresent(r.path)
                r.done(.failure(Posix.ioError(batch.count > 1 ? "syncfs before commit of" : "fdatasync", r.path, code)))
            }
            return
        }
        // 2. Publish (rename + index).
        var results: [Result<String?, BlobStoreError>] = []
        var directories = Set<String>()
        for r in batch {
            let result = r.publish()
            if case .success(let d?) = result { directories.insert(d) }
            results.append(result)
        }
        // 3. The renames: one directory's fsync, or one syncfs for several.
        var directoryError: BlobStoreError?
        if let first = directories.first {
            let fd = open(first, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if fd < 0 {
                directoryError = Posix.ioError("open directory", first)
            } else {
                if let code = sync(fd, whole: directories.count > 1, data: false) {
                    directoryError = Posix.ioError(directories.count > 1 ? "syncfs after rename into" : "fsync directory", first, code)
                }
                Posix.closeQuietly(fd)
            }
        }
        for (r, result) in zip(batch, results) {
            switch result {
            case .failure(let e): r.done(.failure(e))
            case .success(let d):
                if d != nil, let directoryError { r.done(.failure(directoryError)) } else { r.done(.success(())) }
            }
        }
    }
}
