// libFuzzer target: CacheNode's request-path parser (`Route.parse`, internal: @testable).
//
// Input: the raw `:path` bytes (decoded as transports do, String(decoding:as: UTF8.self)).
// Besides "does not crash", checks what the routes promise: nothing from the path reaches the
// file system unless it is a validated 64-hex digest, and instance names are plain segments.
@testable import CacheRoutes
import FuzzSupport
import BlobStore

private func isLowerHex64(_ s: String) -> Bool {
    let u = Array(s.utf8)
    return u.count == 64 && u.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
}

private func checkInstance(_ instance: String?, _ path: String) {
    guard let instance else { return }
    // Checked on bytes, not Characters: a "/" followed by a combining mark is one Character to
    // Swift but still a "/" to a file system or a key scheme.
    let bytes = Array(instance.utf8)
    precondition(!bytes.isEmpty, "empty instance from \(path.debugDescription)")
    for seg in bytes.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false) {
        precondition(!seg.isEmpty && !seg.elementsEqual([0x2e]) && !seg.elementsEqual([0x2e, 0x2e]),
                     "bad instance segment from \(path.debugDescription)")
    }
    precondition(!bytes.contains { $0 < 0x20 || $0 == 0x7f || $0 == UInt8(ascii: "\\") || $0 == UInt8(ascii: "?") },
                 "control, backslash or '?' in instance from \(path.debugDescription)")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    switch Route.parse(path) {
    case .cas(let hash, let instance), .ac(let hash, let instance):
        precondition(isLowerHex64(hash), "non-digest key \(hash.debugDescription) from \(path.debugDescription)")
        precondition(Digest.isValidHash(hash))
        checkInstance(instance, path)
    case .badRequest(let why):
        precondition(why.utf8.count < 400, "unbounded error message")
    case .metrics, .healthz, .status, .notFound:
        break
    }
    return 0
}

@main
enum FuzzMain {
    static func main() {
        runLibFuzzer { data, size in
            guard let data else { return 0 }
            return fuzz(data, size)
        }
    }
}
