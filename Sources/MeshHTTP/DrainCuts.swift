import Synchronization

/// Requests still in flight when a drain's grace period ran out and their connection was closed
/// under them (HTTP/2 and HTTP/3 servers add to it; the node exits non-zero when it is not 0).
public final class DrainCuts: Sendable {
    private let requests = Mutex(0)

    public init() {}

    public func add(_ n: Int) { requests.withLock { $0 += n } }

    public var count: Int { requests.withLock { $0 } }
}
