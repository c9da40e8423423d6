import NIOCore
import Testing
@testable import MeshQUIC

@Suite struct QUICCloseStateTests {
    static let pto: UInt64 = 40_000_000  // 40 ms

    @Test func serverClosingRepeatsItsCloseAFewTimesThenFinalizesOnce() {
        var s = QUICCloseState(isServer: true)
        do { let r = s.packetArrived(haveClosePacket: false); #expect(r == .process) }
        do { let r = s.close(libraryClosing: false, pto: Self.pto); #expect(r == .sendClose(finalizeAfter: .milliseconds(120))) }
        #expect(s.phase == .closing)
        #expect(!s.isActive)
        // A second close (a timer, another error) does nothing more.
        do { let r = s.close(libraryClosing: false, pto: Self.pto); #expect(r == .none) }
        for _ in 0..<QUICCloseState.maxCloseResends {
            do { let r = s.packetArrived(haveClosePacket: true); #expect(r == .resendClose) }
        }
        do { let r = s.packetArrived(haveClosePacket: true); #expect(r == .drop) }
        do { let r = s.finalize(); #expect(r) }
        #expect(s.phase == .closed)
        do { let r = s.finalize(); #expect(!r) }
        do { let r = s.packetArrived(haveClosePacket: true); #expect(r == .drop) }
    }

    @Test func closingWithoutAPacketToRepeatDropsWhatArrives() {
        var s = QUICCloseState(isServer: true)
        _ = s.close(libraryClosing: false, pto: Self.pto)
        do { let r = s.packetArrived(haveClosePacket: false); #expect(r == .drop) }
    }

    @Test func clientsFinalizeAtOnceServersLingerThreePTOsAtMostThreeSeconds() {
        var c = QUICCloseState(isServer: false)
        do { let r = c.close(libraryClosing: false, pto: Self.pto); #expect(r == .sendClose(finalizeAfter: .milliseconds(1))) }
        var d = QUICCloseState(isServer: false)
        do { let r = d.peerClosed(pto: Self.pto); #expect(r == .drain(finalizeAfter: .zero)) }
        var slow = QUICCloseState(isServer: true)
        do { let r = slow.peerClosed(pto: 5_000_000_000); #expect(r == .drain(finalizeAfter: .seconds(3))) }
    }

    @Test func whenNgtcp2IsAlreadyClosingOurCloseOnlyDrains() {
        var s = QUICCloseState(isServer: true)
        do { let r = s.close(libraryClosing: true, pto: Self.pto); #expect(r == .drain(finalizeAfter: .milliseconds(120))) }
        #expect(s.phase == .draining)
        do { let r = s.packetArrived(haveClosePacket: true); #expect(r == .drop) }
    }

    @Test func thePeerClosingWhileWeAreClosingDrainsButNotTwice() {
        var s = QUICCloseState(isServer: true)
        _ = s.close(libraryClosing: false, pto: Self.pto)
        do { let r = s.peerClosed(pto: Self.pto); #expect(r == .drain(finalizeAfter: .milliseconds(120))) }
        do { let r = s.peerClosed(pto: Self.pto); #expect(r == .none) }
        do { let r = s.close(libraryClosing: false, pto: Self.pto); #expect(r == .none) }
        do { let r = s.finalize(); #expect(r) }
        do { let r = s.peerClosed(pto: Self.pto); #expect(r == .none) }
    }
}
