import Foundation
import Logging
import MeshS3
import NIOCore
import Synchronization
import TestSupport
import Testing

/// Bytes of a file-like buffer for uploads.
struct MemorySource: S3UploadSource {
    let bytes: [UInt8]
    func read(at offset: Int64, count: Int) throws -> ByteBuffer {
        let start = Int(offset)
        return ByteBuffer(bytes: bytes[start..<min(bytes.count, start + count)])
    }
}

func pseudoRandom(_ n: Int, seed: UInt64) -> [UInt8] {
    var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    var out = [UInt8](repeating: 0, count: n)
    for i in 0..<n {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        out[i] = UInt8(truncatingIfNeeded: x)
    }
    return out
}

/// The S3 client against a real Ceph RADOS Gateway (Tests/tools/ceph/ceph.sh), checked with boto3.
@Suite("S3 client against Ceph RGW", .serialized)
struct S3ClientTests {
    func client(_ ceph: CephCluster, bucket: String, secret: String? = nil, _ tweak: (inout S3Client.Settings) -> Void = { _ in }) throws -> S3Client {
        var s = S3Client.Settings(endpoint: try S3Endpoint.parse(ceph.endpoint), bucket: bucket,
                                  credentials: S3Credentials(accessKeyID: ceph.accessKey, secretAccessKey: secret ?? ceph.secretKey))
        tweak(&s)
        return try S3Client(settings: s, logger: Logger(label: "s3-test"))
    }

    @Test func putGetHeadDeleteSeenByBoto3() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("client")
        let s3 = try client(ceph, bucket: bucket)
        try await s3.checkBucket()
        let small = pseudoRandom(10_000, seed: 1)
        let hash = SigV4.hex(SigV4.sha256(small))
        try await s3.put("cas/\(hash)", size: Int64(small.count), sha256: hash, source: MemorySource(bytes: small))
        // boto3 sees the object with its bytes.
        let (st, data, err) = ceph.s3(["get", bucket, "cas/\(hash)"])
        #expect(st == 0, "\(err)")
        #expect([UInt8](data) == small)
        #expect(try await s3.head("cas/\(hash)") == Int64(small.count))
        #expect(try await s3.head("cas/absent") == nil)
        // A ranged, streamed GET.
        let got = Mutex<[UInt8]>([])
        #expect(try await s3.get("cas/\(hash)", from: 1000) { b in got.withLock { $0 += b.readableBytesView } })
        #expect(got.withLock { $0 } == Array(small[1000...]))
        #expect(try await s3.get("cas/absent") { _ in Issue.record("body for a missing object") } == false)
        // A payload hash that does not match the bytes is refused by the gateway (S3 checks what it stores).
        await #expect(throws: S3Error.self) {
            try await s3.put("cas/wrong", size: 10, sha256: String(repeating: "0", count: 64), source: MemorySource(bytes: Array(small[0..<10])))
        }
        #expect(try ceph.list(bucket)["cas/wrong"] == nil)
        try await s3.delete("cas/\(hash)")
        #expect(try await s3.head("cas/\(hash)") == nil)
        s3.shutdown()
    }

    @Test func multipartUploadOfALargeObject() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("multipart")
        let s3 = try client(ceph, bucket: bucket) { $0.multipartThreshold = 6 << 20; $0.partSize = 5 << 20 }
        let big = pseudoRandom(13 << 20, seed: 2)
        try await s3.put("cas/big", size: Int64(big.count), sha256: nil, source: MemorySource(bytes: big))
        #expect(try ceph.list(bucket)["cas/big"] == Int64(big.count))
        let (st, data, _) = ceph.s3(["get", bucket, "cas/big"])
        #expect(st == 0)
        #expect(SigV4.sha256([UInt8](data)) == SigV4.sha256(big))
        s3.shutdown()
    }

    @Test func wrongSecretAndMissingBucketAreSaid() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("auth")
        let bad = try client(ceph, bucket: bucket, secret: "not-the-secret")
        let e1 = await #expect(throws: S3Error.self) { try await bad.checkBucket() }
        #expect(e1?.status == 403)
        let missing = try client(ceph, bucket: "no-such-bucket-\(UUID().uuidString.prefix(6).lowercased())")
        let e2 = await #expect(throws: S3Error.self) { try await missing.checkBucket() }
        #expect(e2?.status == 404)
        bad.shutdown()
        missing.shutdown()
    }

    @Test func aHungGatewayMeetsTheDeadline() async throws {
        let ceph = try CephCluster.shared()
        let bucket = try ceph.makeBucket("hang")
        let s3 = try client(ceph, bucket: bucket) {
            $0.idleTimeout = .milliseconds(500)
            $0.maxAttempts = 2
            $0.operationDeadline = .seconds(2)
        }
        try await s3.put("k", bytes: [1, 2, 3])
        ceph.pauseGateway()
        defer { ceph.resumeGateway() }
        let e = await #expect(throws: S3Error.self) { _ = try await s3.head("k") }
        #expect(e?.kind == .timeout)
        #expect(e?.attempts == 2)
        ceph.resumeGateway()
        // The client recovers once the gateway answers again.
        #expect(try await s3.head("k") == 3)
        s3.shutdown()
    }
}
