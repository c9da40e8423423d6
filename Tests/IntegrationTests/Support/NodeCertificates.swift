import Foundation

/// Node certificates made with certs/mkcerts.sh in the shared test certificate directory, each
/// name once per test process and one mkcerts run at a time: suites running in parallel that
/// ask for the same name (TestMesh's origin and peers) would otherwise write its key and its
/// certificate at the same time and leave a pair that does not match.
actor NodeCertificates {
    static let shared = NodeCertificates()
    private var made: [String: Task<Void, any Error>] = [:]
    private var last: Task<Void, any Error>?

    func ensure(_ names: [String], in dir: String) async throws {
        for n in names {
            if let t = made[n] {
                try await t.value
                continue
            }
            let previous = last
            let t = Task {
                _ = try? await previous?.value
                let r = try await run(["/bin/bash", "\(Paths.packageRoot)/certs/mkcerts.sh", "-o", dir, "node", n])
                guard r.status == 0 else { throw HarnessError("mkcerts node \(n): \(r)") }
            }
            made[n] = t
            last = t
            try await t.value
        }
    }
}
