import MeshHTTP
import NIOCore
import Testing

@Suite struct ConnectionDrainTests {
    @Test func goawayNoticeThenFinalThenCloseWhenTheLastRequestEnds() {
        var d = ConnectionDrain()
        #expect(!d.isDraining)
        do { let r = d.requestEnded(inFlight: 0); #expect(r == .none) }
        do { let r = d.begin(canSendGoaway: true, inFlight: 2); #expect(r == .sendNotice) }
        #expect(d.isDraining)
        do { let r = d.begin(canSendGoaway: true, inFlight: 2); #expect(r == .none) }
        // Before the final GOAWAY, no request count closes the connection.
        do { let r = d.requestEnded(inFlight: 0); #expect(r == .none) }
        do { let r = d.finalGoawayDue(); #expect(r == .sendFinalGoaway) }
        do { let r = d.finalGoawayDue(); #expect(r == .none) }
        do { let r = d.requestEnded(inFlight: 1); #expect(r == .none) }
        do { let r = d.requestEnded(inFlight: 0); #expect(r == .close) }
        #expect(d.state == .closed)
        do { let r = d.graceEnded(inFlight: 0); #expect(r == .none) }
    }

    @Test func theGracePeriodCutsWhatIsStillInFlight() {
        var d = ConnectionDrain()
        _ = d.begin(canSendGoaway: true, inFlight: 3)
        _ = d.finalGoawayDue()
        do { let r = d.graceEnded(inFlight: 3); #expect(r == .cut(inFlight: 3)) }
        do { let r = d.requestEnded(inFlight: 0); #expect(r == .none) }
        var early = ConnectionDrain()
        _ = early.begin(canSendGoaway: true, inFlight: 1)
        do { let r = early.graceEnded(inFlight: 0); #expect(r == .close) }
        do { let r = early.finalGoawayDue(); #expect(r == .none) }
    }

    @Test func withoutGoawayAnIdleConnectionClosesAndABusyOneWaits() {
        var idle = ConnectionDrain()
        do { let r = idle.begin(canSendGoaway: false, inFlight: 0); #expect(r == .close) }
        do { let r = idle.graceEnded(inFlight: 0); #expect(r == .none) }
        var busy = ConnectionDrain()
        do { let r = busy.begin(canSendGoaway: false, inFlight: 1); #expect(r == .awaitRequests) }
        do { let r = busy.finalGoawayDue(); #expect(r == .none) }
        do { let r = busy.graceEnded(inFlight: 1); #expect(r == .cut(inFlight: 1)) }
    }

    @Test func notServingIsNeverCut() {
        var d = ConnectionDrain()
        do { let r = d.graceEnded(inFlight: 5); #expect(r == .none) }
        do { let r = d.finalGoawayDue(); #expect(r == .none) }
    }

    @Test func oneGapForHTTP2AndHTTP3AndTheCutMessageTheDocsQuote() {
        #expect(ConnectionDrain.goawayGap == .milliseconds(200))
        #expect(ConnectionDrain.cutMessage(gracePeriod: .seconds(2), inFlight: 1)
            == "drain: the grace period (2.0 s) ended with 1 request(s) in flight; closing the connection under them")
    }
}
