import Foundation

/// A strict-enough parser for the Prometheus text exposition format (0.0.4):
/// `# HELP name text`, `# TYPE name kind`, other `#` comments, and sample lines
/// `name[{label="value",...}] value [timestamp]`.
struct PrometheusText: Sendable {
    struct Sample: Sendable, CustomStringConvertible {
        var name: String
        var labels: [String: String]
        var value: Double
        var description: String { "\(name)\(labels.isEmpty ? "" : "\(labels)") \(value)" }
    }

    struct ParseError: Error, CustomStringConvertible {
        var line: Int
        var text: String
        var why: String
        var description: String { "metrics line \(line) \(text.debugDescription): \(why)" }
    }

    var samples: [Sample] = []
    var types: [String: String] = [:]
    var help: [String: String] = [:]

    init(parsing text: String) throws {
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(raw)
            let n = i + 1
            if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
            if line.hasPrefix("#") {
                let parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
                guard parts.count >= 2, parts[0] == "#", parts[1] == "HELP" || parts[1] == "TYPE" else { continue } // plain comment
                guard parts.count >= 3, Self.isMetricName(parts[2]) else {
                    throw ParseError(line: n, text: line, why: "\(parts[1]) without a valid metric name")
                }
                let name = String(parts[2])
                if parts[1] == "TYPE" {
                    guard parts.count == 4, ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else {
                        throw ParseError(line: n, text: line, why: "TYPE must be counter|gauge|histogram|summary|untyped")
                    }
                    guard types[name] == nil else { throw ParseError(line: n, text: line, why: "duplicate TYPE for \(name)") }
                    guard !samples.contains(where: { $0.name == name }) else {
                        throw ParseError(line: n, text: line, why: "TYPE after samples of \(name)")
                    }
                    types[name] = String(parts[3])
                } else {
                    guard help[name] == nil else { throw ParseError(line: n, text: line, why: "duplicate HELP for \(name)") }
                    help[name] = parts.count == 4 ? String(parts[3]) : ""
                }
                continue
            }
            samples.append(try Self.parseSample(line, lineNumber: n))
        }
    }

    static func isMetricName(_ s: Substring) -> Bool {
        guard let f = s.first, f.isASCII, f.isLetter || f == "_" || f == ":" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == ":") }
    }

    static func isLabelName(_ s: Substring) -> Bool {
        guard let f = s.first, f.isASCII, f.isLetter || f == "_" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    static func parseValue(_ s: Substring) -> Double? {
        switch s {
        case "+Inf", "Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        default: return Double(s)
        }
    }

    private static func parseSample(_ line: String, lineNumber n: Int) throws -> Sample {
        func fail(_ why: String) -> ParseError { ParseError(line: n, text: line, why: why) }
        var i = line.startIndex
        while i < line.endIndex, line[i] != "{", line[i] != " ", line[i] != "\t" { i = line.index(after: i) }
        let name = line[line.startIndex..<i]
        guard isMetricName(name) else { throw fail("invalid metric name \(name.debugDescription)") }
        var labels: [String: String] = [:]
        if i < line.endIndex, line[i] == "{" {
            i = line.index(after: i)
            while true {
                guard i < line.endIndex else { throw fail("unterminated label set") }
                if line[i] == "}" { i = line.index(after: i); break }
                let nameStart = i
                while i < line.endIndex, line[i] != "=" { i = line.index(after: i) }
                let lname = line[nameStart..<i]
                guard isLabelName(lname) else { throw fail("invalid label name \(lname.debugDescription)") }
                i = line.index(after: i)
                guard i < line.endIndex, line[i] == "\"" else { throw fail("label value must be quoted") }
                i = line.index(after: i)
                var value = ""
                var closed = false
                while i < line.endIndex {
                    let c = line[i]
                    if c == "\\" {
                        i = line.index(after: i)
                        guard i < line.endIndex else { break }
                        switch line[i] {
                        case "n": value.append("\n")
                        case "\\": value.append("\\")
                        case "\"": value.append("\"")
                        default: throw fail("bad escape in label value")
                        }
                    } else if c == "\"" {
                        closed = true
                        i = line.index(after: i)
                        break
                    } else {
                        value.append(c)
                    }
                    i = line.index(after: i)
                }
                guard closed else { throw fail("unterminated label value") }
                guard labels[String(lname)] == nil else { throw fail("duplicate label \(lname)") }
                labels[String(lname)] = value
                guard i < line.endIndex else { throw fail("unterminated label set") }
                if line[i] == "," { i = line.index(after: i) } else if line[i] != "}" { throw fail("expected , or } after label") }
            }
        }
        let rest = line[i...].split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard rest.count == 1 || rest.count == 2 else { throw fail("expected `value [timestamp]` after the name") }
        guard let value = parseValue(rest[0]) else { throw fail("value \(rest[0].debugDescription) is not a float") }
        if rest.count == 2 { guard Int64(rest[1]) != nil else { throw fail("timestamp must be an integer") } }
        return Sample(name: String(name), labels: labels, value: value)
    }

    /// The value of `name` (with exactly these labels if given; else the sum over all series).
    func value(_ name: String, labels: [String: String]? = nil) -> Double? {
        let matching = samples.filter { $0.name == name && (labels == nil || $0.labels == labels!) }
        guard !matching.isEmpty else { return nil }
        return matching.reduce(0) { $0 + $1.value }
    }
}
