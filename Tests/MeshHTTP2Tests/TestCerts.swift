import Foundation
import TestSupport

/// The certificates certs/mkcerts.sh made for this test process.
enum TestCerts {
    static let dir: String = try! RepositoryCertificates.directory()

    static func path(_ name: String) -> String { "\(dir)/\(name)" }
}
