import Foundation
import Testing
@testable import BlobStore

@Suite struct HashingTests {
    @Test func knownAnswers() {
        #expect(SHA256.hex([]) == Digest.emptyHash)
        #expect(SHA256.hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hex(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }

    @Test func streamingMatchesOneShot() {
        let data = blob(7, size: 200_000)
        var h = SHA256Hasher()
        var i = 0
        while i < data.count {
            let end = min(data.count, i + 1 + (i % 9_973))
            h.update(bytes: Array(data[i..<end]))
            i = end
        }
        #expect(h.finalize() == SHA256.hex(data))
        // finalize resets to the empty message
        #expect(h.finalize() == Digest.emptyHash)

        var g = SHA256Hasher()
        g.update(bytes: data.lazy.map { $0 })  // non-contiguous sequence path
        #expect(g.finalize() == SHA256.hex(data))

        var r = SHA256Hasher()
        data.withUnsafeBytes { r.update($0) }
        #expect(r.finalize() == SHA256.hex(data))
    }

    @Test func hexOfFile() throws {
        let dir = try TempDir()
        defer { dir.remove() }
        let data = blob(3, size: 700_001)
        let path = dir.path + "/f"
        try Data(data).write(to: URL(fileURLWithPath: path))
        let (hash, size) = try SHA256.hexOfFile(path: path)
        #expect(hash == SHA256.hex(data))
        #expect(size == 700_001)
        #expect(throws: BlobStoreError.self) { try SHA256.hexOfFile(path: dir.path + "/missing") }
    }

    @Test func digestValidation() {
        let good = String(repeating: "a", count: 64)
        #expect(Digest.isValidHash(good))
        #expect(Digest.isValidHash(good[...]))
        #expect(!Digest.isValidHash(String(repeating: "A", count: 64)))
        #expect(!Digest.isValidHash(String(repeating: "a", count: 63)))
        #expect(!Digest.isValidHash(String(repeating: "a", count: 65)))
        #expect(!Digest.isValidHash(String(repeating: "g", count: 64)))
        #expect(!Digest.isValidHash("../" + String(repeating: "a", count: 61)))
        #expect(Digest(hash: good, size: -1) == nil)
        #expect(Digest(hash: "xyz", size: 1) == nil)
        #expect(Digest(hash: good, size: 5)?.description == "\(good)/5")
        #expect(Digest.empty.hash == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Digest.empty.size == 0)
    }

    @Test func errorDescriptions() {
        let e = BlobStoreError.digestMismatch(expected: "aa", actual: "bb")
        #expect(e.description == "hash mismatch: path says aa, body hashes to bb")
        let long = String(repeating: "z", count: 10_000)
        #expect(BlobStoreError.invalidHash(long).description.count < 200)
    }
}
