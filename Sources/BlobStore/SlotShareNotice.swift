import Logging
import Metrics
import Synchronization

extension BlobStore {
    /// What happens when a connection's request waits only because that connection holds its
    /// share of the read or write slots: a count, and a notice at most every 10 s per kind.
    static func shareLimitNotice(kind: String, logger: Logger) -> @Sendable (String) -> Void {
        let counter = Counter(label: "cachemesh_store_slot_share_waits_total", dimensions: [("kind", kind)])
        let last = Mutex<ContinuousClock.Instant?>(nil)
        return { owner in
            counter.increment()
            let now = ContinuousClock.now
            let due = last.withLock { l -> Bool in
                guard l.map({ now - $0 > .seconds(10) }) ?? true else { return false }
                l = now
                return true
            }
            if due {
                logger.notice("connection \(owner) holds its share of the \(kind) slots; its further requests wait (connection_slot_share_percent)")
            }
        }
    }
}
