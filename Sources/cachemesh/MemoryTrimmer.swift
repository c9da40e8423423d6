import CMeshSystem
import Logging
import ServiceLifecycle

/// Gives freed heap memory back to the kernel once the node goes quiet.
///
/// `tuneAllocator` keeps transfer buffers on the heap (no mmap per buffer, no automatic trim
/// below 256 MiB) because that is much faster under load, but then a burst's memory stayed with
/// the process for good: 10,000 concurrent 64 KiB uploads left an idle node at 365 MB. Every
/// `interval`, if nothing moved through the store since the last look, `malloc_trim(0)` returns
/// the free pages of every arena; during traffic nothing is trimmed.
struct MemoryTrimmer: Service {
    /// A counter that moves with traffic (bytes in + out of the store).
    let activity: @Sendable () -> Int64
    var interval: Duration = .seconds(5)
    let logger: Logger

    func run() async throws {
        // Ends quietly at shutdown (the sleep is cancelled): not an error of the node.
        try? await cancelWhenGracefulShutdown {
            var last = activity()
            var trimmedAt: Int64 = -1
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                let now = activity()
                if now == last, now != trimmedAt {
                    let released = cm_trim_malloc()
                    trimmedAt = now
                    logger.debug("quiet: heap trimmed", metadata: ["released": "\(released != 0)"])
                }
                last = now
            }
        }
    }
}
