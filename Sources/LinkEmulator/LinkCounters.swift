import Synchronization

/// Counters of one link (both directions), safe to read from any thread.
public final class LinkCounters: Sendable {
    public struct Snapshot: Sendable, Equatable, CustomStringConvertible {
        public var tcpConnections: Int64 = 0
        public var tcpConnectFailures: Int64 = 0
        /// Bytes delivered towards the target (client → target) and back (target → client).
        public var tcpBytesToTarget: Int64 = 0
        public var tcpBytesToClient: Int64 = 0
        /// TCP chunks held one extra RTT for an emulated loss.
        public var tcpLossHolds: Int64 = 0
        public var udpMappings: Int64 = 0
        public var udpPacketsToTarget: Int64 = 0
        public var udpPacketsToClient: Int64 = 0
        public var udpBytesToTarget: Int64 = 0
        public var udpBytesToClient: Int64 = 0
        /// Datagrams dropped by emulated loss, and by the queue limit (tail drop).
        public var udpDroppedLoss: Int64 = 0
        public var udpDroppedQueue: Int64 = 0

        public var description: String {
            "tcp: connections=\(tcpConnections) connect_failures=\(tcpConnectFailures) bytes_to_target=\(tcpBytesToTarget) bytes_to_client=\(tcpBytesToClient) loss_holds=\(tcpLossHolds); "
                + "udp: mappings=\(udpMappings) packets_to_target=\(udpPacketsToTarget) packets_to_client=\(udpPacketsToClient) bytes_to_target=\(udpBytesToTarget) bytes_to_client=\(udpBytesToClient) dropped_loss=\(udpDroppedLoss) dropped_queue=\(udpDroppedQueue)"
        }
    }

    let tcpConnections = Atomic<Int64>(0)
    let tcpConnectFailures = Atomic<Int64>(0)
    let tcpBytes = AtomicPair()
    let tcpLossHolds = Atomic<Int64>(0)
    let udpMappings = Atomic<Int64>(0)
    let udpPackets = AtomicPair()
    let udpBytes = AtomicPair()
    let udpDroppedLoss = Atomic<Int64>(0)
    let udpDroppedQueue = Atomic<Int64>(0)

    public init() {}

    public func snapshot() -> Snapshot {
        var s = Snapshot()
        s.tcpConnections = tcpConnections.load(ordering: .relaxed)
        s.tcpConnectFailures = tcpConnectFailures.load(ordering: .relaxed)
        s.tcpBytesToTarget = tcpBytes.toTarget.load(ordering: .relaxed)
        s.tcpBytesToClient = tcpBytes.toClient.load(ordering: .relaxed)
        s.tcpLossHolds = tcpLossHolds.load(ordering: .relaxed)
        s.udpMappings = udpMappings.load(ordering: .relaxed)
        s.udpPacketsToTarget = udpPackets.toTarget.load(ordering: .relaxed)
        s.udpPacketsToClient = udpPackets.toClient.load(ordering: .relaxed)
        s.udpBytesToTarget = udpBytes.toTarget.load(ordering: .relaxed)
        s.udpBytesToClient = udpBytes.toClient.load(ordering: .relaxed)
        s.udpDroppedLoss = udpDroppedLoss.load(ordering: .relaxed)
        s.udpDroppedQueue = udpDroppedQueue.load(ordering: .relaxed)
        return s
    }
}

/// Direction of travel through a link.
public enum LinkDirection: Int, Sendable {
    case toTarget = 0, toClient = 1
}

final class AtomicPair: Sendable {
    let toTarget = Atomic<Int64>(0)
    let toClient = Atomic<Int64>(0)
    init() {}
    func add(_ d: LinkDirection, _ n: Int64) {
        if d == .toTarget {
            toTarget.wrappingAdd(n, ordering: .relaxed)
        } else {
            toClient.wrappingAdd(n, ordering: .relaxed)
        }
    }
}
