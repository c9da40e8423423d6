import CGnuTLS

/// A TLS failure with the GnuTLS error code and a readable message.
public struct TLSError: Error, Sendable, CustomStringConvertible {
    public var code: Int32
    public var context: String

    public init(code: Int32, context: String) {
        self.code = code
        self.context = context
    }

    public var message: String {
        guard code != 0, let s = gnutls_strerror(code) else { return "" }
        return String(cString: s)
    }

    public var description: String {
        code == 0 ? "TLS: \(context)" : "TLS: \(context): \(message) (\(code))"
    }

    static func check(_ rc: Int32, _ context: @autoclosure () -> String) throws {
        if rc < 0 { throw TLSError(code: rc, context: context()) }
    }
}
