import MeshS3
import Testing

/// The worked examples of AWS's public Signature Version 4 documentation ("Signature Calculations
/// for the Authorization Header: Transferring Payload in a Single Chunk" for S3, and the signing-key
/// and IAM ListUsers examples of the general SigV4 pages), written out by hand.
@Suite struct SigV4Tests {
    static let s3Credentials = S3Credentials(accessKeyID: "AKIAIOSFODNN7EXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    static let date = "20130524T000000Z"

    func s3Authorization(_ method: String, _ path: String, query: [(String, String)] = [], headers: [(String, String)], payload: String) -> String {
        SigV4.authorization(.init(method: method, path: path, query: query, headers: headers, payloadHash: payload),
                            credentials: Self.s3Credentials, amzDate: Self.date, region: "us-east-1")
    }

    @Test func getObjectWithRange() {
        let auth = s3Authorization("GET", "/test.txt", headers: [
            ("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", SigV4.emptyPayloadHash), ("x-amz-date", Self.date),
        ], payload: SigV4.emptyPayloadHash)
        #expect(auth == "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    }

    @Test func getObjectCanonicalRequest() {
        let (text, signed) = SigV4.canonicalRequest(.init(method: "GET", path: "/test.txt", headers: [
            ("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", SigV4.emptyPayloadHash), ("x-amz-date", Self.date),
        ], payloadHash: SigV4.emptyPayloadHash))
        #expect(signed == "host;range;x-amz-content-sha256;x-amz-date")
        #expect(text == """
            GET
            /test.txt

            host:examplebucket.s3.amazonaws.com
            range:bytes=0-9
            x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            x-amz-date:20130524T000000Z

            host;range;x-amz-content-sha256;x-amz-date
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
            """)
        let scope = SigV4.scope(date: Self.date, region: "us-east-1", service: "s3")
        #expect(SigV4.stringToSign(canonicalRequest: text, amzDate: Self.date, scope: scope) == """
            AWS4-HMAC-SHA256
            20130524T000000Z
            20130524/us-east-1/s3/aws4_request
            7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972
            """)
    }

    @Test func putObject() {
        let payload = SigV4.hex(SigV4.sha256(Array("Welcome to Amazon S3.".utf8)))
        #expect(payload == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")
        let path = "/" + SigV4.uriEncode("test$file.text", keepSlash: true)
        #expect(path == "/test%24file.text")
        let auth = s3Authorization("PUT", path, headers: [
            ("Host", "examplebucket.s3.amazonaws.com"), ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-date", Self.date), ("x-amz-storage-class", "REDUCED_REDUNDANCY"), ("x-amz-content-sha256", payload),
        ], payload: payload)
        #expect(auth == "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
    }

    @Test func getBucketLifecycle() {
        let auth = s3Authorization("GET", "/", query: [("lifecycle", "")], headers: [
            ("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-date", Self.date), ("x-amz-content-sha256", SigV4.emptyPayloadHash),
        ], payload: SigV4.emptyPayloadHash)
        #expect(auth.hasSuffix("Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"))
    }

    @Test func listObjects() {
        let auth = s3Authorization("GET", "/", query: [("prefix", "J"), ("max-keys", "2")], headers: [
            ("Host", "examplebucket.s3.amazonaws.com"), ("x-amz-date", Self.date), ("x-amz-content-sha256", SigV4.emptyPayloadHash),
        ], payload: SigV4.emptyPayloadHash)
        #expect(SigV4.canonicalQuery([("prefix", "J"), ("max-keys", "2")]) == "max-keys=2&prefix=J")
        #expect(auth.hasSuffix("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"))
    }

    @Test func signingKeyDerivation() {
        let key = SigV4.signingKey(secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", date: "20120215", region: "us-east-1", service: "iam")
        #expect(SigV4.hex(key) == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d")
    }

    @Test func iamListUsers() {
        let creds = S3Credentials(accessKeyID: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
        let request = SigV4.Request(method: "GET", path: "/", query: [("Action", "ListUsers"), ("Version", "2010-05-08")], headers: [
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"), ("Host", "iam.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z"),
        ], payloadHash: SigV4.emptyPayloadHash)
        let (text, _) = SigV4.canonicalRequest(request)
        #expect(SigV4.hex(SigV4.sha256(Array(text.utf8))) == "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59")
        let auth = SigV4.authorization(request, credentials: creds, amzDate: "20150830T123600Z", region: "us-east-1", service: "iam")
        #expect(auth == "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")
    }

    @Test func encodingAndDates() {
        #expect(SigV4.uriEncode("a b/c~d_e.f-g+h=", keepSlash: true) == "a%20b/c~d_e.f-g%2Bh%3D")
        #expect(SigV4.uriEncode("a/b", keepSlash: false) == "a%2Fb")
        #expect(SigV4.uriEncode("é", keepSlash: false) == "%C3%A9")
        #expect(SigV4.amzDate(.init(timeIntervalSince1970: 1_369_353_600)) == "20130524T000000Z")
    }
}
