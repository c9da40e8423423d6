import Testing
@testable import LinkEmulator

@Suite struct ProfileParsingTests {
    @Test func parsesAFullProfile() throws {
        let p = try LinkProfile(arguments: ["--delay", "20ms", "--jitter", "1ms", "--loss", "0.5%", "--rate", "1gbit"])
        #expect(p.delay == .milliseconds(20))
        #expect(p.jitter == .milliseconds(1))
        #expect(abs(p.loss - 0.005) < 1e-12)
        #expect(p.rateBitsPerSecond == 1_000_000_000)
        #expect(p.queueLimitBytes == nil)
        // BDP at 1 Gbit/s over a 42 ms RTT is 5.25 MB > 4 MiB.
        #expect(p.effectiveQueueLimit == 5_250_000)
    }

    @Test func unitsAndForms() throws {
        #expect(try LinkProfile.parseDuration("250us") == .microseconds(250))
        #expect(try LinkProfile.parseDuration("1.5s") == .milliseconds(1500))
        #expect(try LinkProfile.parseDuration("0") == .zero)
        #expect(try LinkProfile.parseDuration(" 3MS ") == .milliseconds(3))
        #expect(try LinkProfile.parseRate("80mbit") == 80_000_000)
        #expect(try LinkProfile.parseRate("512kbit") == 512_000)
        #expect(try LinkProfile.parseRate("2.5gbit") == 2_500_000_000)
        #expect(try LinkProfile.parseRate("unlimited") == nil)
        #expect(try LinkProfile.parseLoss("0.01") == 0.01)
        #expect(try LinkProfile.parseLoss("1%") == 0.01)
        #expect(try LinkProfile.parseLoss("100%") == 1)
        #expect(try LinkProfile.parseSize("8MiB") == 8 << 20)
        #expect(try LinkProfile.parseSize("64k") == 65536)
        let eq = try LinkProfile(arguments: ["--delay=5ms", "--queue-limit=1MiB"])
        #expect(eq.delay == .milliseconds(5))
        #expect(eq.effectiveQueueLimit == 1 << 20)
        #expect(LinkProfile().effectiveQueueLimit == 4 << 20)
    }

    @Test(arguments: [
        (["--delay", "20"], "unit"),
        (["--delay", "-5ms"], "negative"),
        (["--delay", "fast"], "bad delay"),
        (["--jitter", "1h"], "bad jitter"),
        (["--loss", "2"], "out of range"),
        (["--loss", "150%"], "out of range"),
        (["--loss", "-0.1"], "out of range"),
        (["--loss", "some"], "bad loss"),
        (["--rate", "10"], "bad rate"),
        (["--rate", "0mbit"], "positive"),
        (["--rate", "1tbit"], "bad rate"),
        (["--queue-limit", "100"], "at least 1500"),
        (["--speed", "1gbit"], "unknown link option"),
        (["--delay"], "needs a value"),
        (["20ms"], "unexpected argument"),
    ])
    func rejectsBadValues(args: [String], message: String) {
        do {
            _ = try LinkProfile(arguments: args)
            Issue.record("\(args) was accepted")
        } catch {
            #expect("\(error)".contains(message), "\(args): \(error)")
        }
    }

    @Test func linkSpecs() throws {
        let s = try LinkSpec(parsing: "127.0.0.1:19440=127.0.0.1:9440", defaults: LinkProfile(delay: .milliseconds(20)))
        #expect(s.listenHost == "127.0.0.1" && s.listenPort == 19440)
        #expect(s.targetHost == "127.0.0.1" && s.targetPort == 9440)
        #expect(s.profile.delay == .milliseconds(20))
        let o = try LinkSpec(parsing: "[::1]:0=localhost:9441,delay=5ms,loss=1%,rate=100mbit")
        #expect(o.listenHost == "::1" && o.listenPort == 0)
        #expect(o.targetHost == "localhost" && o.targetPort == 9441)
        #expect(o.profile == LinkProfile(delay: .milliseconds(5), loss: 0.01, rateBitsPerSecond: 100_000_000))
        #expect(o.description == "[::1]:0 -> localhost:9441")
        for bad in ["127.0.0.1:1", "127.0.0.1:1=127.0.0.1", "a:1=b:0", "a:99999=b:1", "a:1=b:2,delay", "a:1=b:2,color=red", "::1:5=b:2"] {
            #expect(throws: LinkProfileError.self, "\(bad)") { try LinkSpec(parsing: bad) }
        }
    }
}
