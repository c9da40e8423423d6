import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// One log line on stderr: `TIME LEVEL LABEL: MESSAGE key=value …` — the message first, the
/// metadata after it, sorted by key (swift-log's StreamLogHandler puts the metadata first).
struct CacheMeshLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(label: String, level: Logger.Level, metadataProvider: Logger.MetadataProvider? = nil) {
        self.label = label
        self.logLevel = level
        self.metadataProvider = metadataProvider
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?,
             source: String, file: String, function: String, line: UInt) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { $1 } }
        if let explicit { all.merge(explicit) { $1 } }
        var text = "\(Self.timestamp()) \(level) \(label): \(message)"
        for (key, value) in all.sorted(by: { $0.key < $1.key }) {
            text += " \(key)=\(Self.quoted("\(value)"))"
        }
        text += "\n"
        // One write(2) per line: lines from several threads do not interleave.
        text.utf8CString.withUnsafeBufferPointer { p in
            var offset = 0
            let count = p.count - 1
            while offset < count {
                let n = write(STDERR_FILENO, p.baseAddress! + offset, count - offset)
                if n <= 0 { if errno == EINTR { continue } else { return } }
                offset += n
            }
        }
    }

    /// A value with a space, a quote or a control character is quoted (Swift string escapes).
    static func quoted(_ s: String) -> String {
        if !s.isEmpty, !s.unicodeScalars.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.value < 0x20 || $0.value == 0x7f }) {
            return s
        }
        return s.debugDescription
    }

    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var tm = tm()
        var seconds = ts.tv_sec
        gmtime_r(&seconds, &tm)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                      tm.tm_hour, tm.tm_min, tm.tm_sec, Int(ts.tv_nsec / 1_000_000))
    }
}
