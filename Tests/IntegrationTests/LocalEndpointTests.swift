import BlobStore
import Foundation
import Testing
import TestSupport

// MARK: - Helpers for the local endpoint (plaintext HTTP/1.1, h2c, unix socket)

extension TestNode {
    /// The local endpoint's TCP port, from the "cachemesh: listening local=…" line.
    var localPort: Int? {
        child.stdout.split(separator: "\n").first { $0.hasPrefix("cachemesh: listening local=") }
            .flatMap { $0.split(separator: " ")[2].split(separator: ":").last }.flatMap { Int($0) }
    }

    func localURL(_ path: String) -> String { "http://127.0.0.1:\(localPort ?? 0)\(path)" }

    /// A TLS node (mTLS on its own port, as always) with a local endpoint on 127.0.0.1:0 and
    /// optionally a unix socket.
    static func startWithLocal(role: String? = nil, socket: String? = nil, maxBytes: String = "256M", extra: [String] = []) async throws -> TestNode {
        var args = ["--local-listen", "127.0.0.1:0"]
        if let role { args += ["--local-role", role] }
        if let socket { args += ["--local-socket", socket] }
        let node = try await TestNode.start(maxBytes: maxBytes, extraArguments: args + extra)
        guard node.localPort != nil else {
            node.cleanUp()
            throw HarnessError("the node did not report its local endpoint: \(node.child.stdout)")
        }
        return node
    }
}

/// Plain curl (no TLS options): for http:// URLs and unix sockets.
func plainCurl(_ arguments: [String], timeout: Double = 120) async throws -> CurlResult {
    let marker = "\n@@CURL@@ "
    let r = try await run(["curl", "-sS", "--max-time", "60"] + arguments + ["-w", "\(marker)%{http_code} %{http_version}"], timeout: timeout)
    let out = r.stdout
    guard let range = out.range(of: marker, options: .backwards) else {
        return CurlResult(exitCode: r.status, httpCode: "", httpVersion: "", body: out, stderr: r.stderr)
    }
    let tail = out[range.upperBound...].split(separator: " ")
    return CurlResult(exitCode: r.status, httpCode: tail.first.map(String.init) ?? "",
                      httpVersion: tail.count > 1 ? String(tail[1]) : "", body: String(out[..<range.lowerBound]), stderr: r.stderr)
}

/// Sends `request` (raw bytes) on one TCP connection (plaintext, or TLS with a client
/// certificate when `tls` is given) and returns everything the server sent until it closed
/// the connection, plus whether it did close it (within `seconds`).
func rawHTTP(port: Int, _ request: [UInt8], tls: (ca: String, cert: String, key: String)? = nil, seconds: Double = 5) async throws -> (response: String, closed: Bool) {
    let script = """
    import socket, ssl, sys, time
    port = int(sys.argv[1]); data = open(sys.argv[2], 'rb').read(); limit = float(sys.argv[3])
    s = socket.create_connection(("127.0.0.1", port))
    if len(sys.argv) > 4:
        ctx = ssl.create_default_context(cafile=sys.argv[4]); ctx.load_cert_chain(sys.argv[5], sys.argv[6])
        ctx.check_hostname = False; ctx.set_alpn_protocols(["http/1.1"])
        s = ctx.wrap_socket(s)
    s.sendall(data)
    out = b""; closed = False; end = time.time() + limit
    s.settimeout(0.2)
    while time.time() < end:
        try:
            b = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, ssl.SSLError):
            closed = True; break
        if not b:
            closed = True; break
        out += b
    sys.stdout.write(out.decode('latin1'))
    sys.stdout.write("\\n@@CLOSED@@ %s" % closed)
    """
    let dir = try TempDir("raw")
    defer { dir.remove() }
    try Data(request).write(to: URL(fileURLWithPath: dir.file("req")))
    var argv = ["python3", "-c", script, String(port), dir.file("req"), String(seconds)]
    if let tls { argv += [tls.ca, tls.cert, tls.key] }
    let r = try await run(argv, timeout: seconds + 30)
    guard let range = r.stdout.range(of: "\n@@CLOSED@@ ", options: .backwards) else { throw HarnessError("raw client failed: \(r)") }
    return (String(r.stdout[..<range.lowerBound]), r.stdout[range.upperBound...].hasPrefix("True"))
}

/// The status codes of the responses in a raw HTTP/1.1 byte stream, in order.
func statusCodes(_ response: String) -> [Int] {
    // A status line may follow a binary body directly (no CRLF between them).
    response.components(separatedBy: "HTTP/1.1 ").dropFirst().compactMap { rest in Int(rest.prefix(3)) }
}

/// Requests whose framing is ambiguous or broken: each must get 400 and a closed connection.
func smugglingAttempts(hash: String) -> [(String, String)] {
    [
        ("Content-Length with Transfer-Encoding",
         "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("Transfer-Encoding then Content-Length",
         "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("a bad chunk size", "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ("a chunk size with a sign", "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
        ("obs-fold", "GET /cas/\(hash) HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n"),
        ("two different Content-Lengths", "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        ("a transfer coding other than chunked", "PUT /cas/\(hash) HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("a space before the colon", "GET /cas/\(hash) HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n"),
        ("no Host header", "GET /cas/\(hash) HTTP/1.1\r\n\r\n"),
        ("garbage", "NOT HTTP AT ALL\r\n\r\n"),
        ("a bare LF inside a header value", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n"),
    ]
}

@Suite("Local endpoint: HTTP/1.1, h2c and a unix socket against a real node", .serialized, .timeLimit(.minutes(5)))
struct LocalEndpointTests {
    @Test("curl --http1.1 on the local endpoint: PUT (100-continue), GET, HEAD, keep-alive reuse, chunked upload, large bodies")
    func http1RoundTrip() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let dir = try TempDir("local-h1")
        defer { dir.remove() }
        let file = dir.file("blob")
        try await makeRandomFile(file, size: 3_000_000)
        let hash = try await sha256sum(file)

        let miss = try await plainCurl(["--http1.1", "-I", node.localURL("/cas/\(hash)")])
        #expect(miss.httpCode == "404" && miss.httpVersion == "1.1", "\(miss)")

        // curl sends Expect: 100-continue for an upload this size and waits for the 100.
        let put = try await plainCurl(["--http1.1", "-v", "-T", file, node.localURL("/cas/\(hash)")])
        #expect(put.exitCode == 0 && put.httpCode == "201" && put.httpVersion == "1.1", "\(put)")
        #expect(put.stderr.contains("Expect: 100-continue") && put.stderr.contains("HTTP/1.1 100 Continue"), "\(put.stderr.suffix(1500))")

        // Two GETs and a HEAD in one curl call share one connection (keep-alive).
        let out1 = dir.file("o1"), out2 = dir.file("o2"), headers = dir.file("h")
        let gets = try await plainCurl(["--http1.1", "-v", node.localURL("/cas/\(hash)"), "-o", out1, node.localURL("/cas/\(hash)"), "-o", out2])
        #expect(gets.exitCode == 0 && gets.httpCode == "200", "\(gets)")
        #expect(gets.stderr.contains("Re-using existing connection"), "the second GET must reuse the connection: \(gets.stderr.suffix(1500))")
        let sum1 = try await sha256sum(out1), sum2 = try await sha256sum(out2)
        #expect(sum1 == hash && sum2 == hash, "GET bodies differ from the upload")

        let head = try await plainCurl(["--http1.1", "-I", "-D", headers, "-o", "/dev/null", node.localURL("/cas/\(hash)")])
        #expect(head.httpCode == "200", "\(head)")
        let headerText = (try? String(contentsOfFile: headers, encoding: .utf8))?.lowercased() ?? ""
        #expect(headerText.contains("content-length: 3000000"), "HEAD: \(headerText)")

        // A chunked upload (no Content-Length) streams in too.
        let file2 = dir.file("blob2")
        try await makeRandomFile(file2, size: 2_500_000)
        let hash2 = try await sha256sum(file2)
        let chunked = try await plainCurl(["--http1.1", "-H", "Transfer-Encoding: chunked", "-T", file2, node.localURL("/cas/\(hash2)")])
        #expect(chunked.httpCode == "201", "\(chunked)")
        let back = try await withClient(node) { try await $0.fetch("/cas/\(hash2)") }
        #expect(back.status == 200 && SHA256.hex(back.body) == hash2, "chunked upload read back over mTLS HTTP/2")

        // The action cache: PUT and GET.
        let key = String(repeating: "5a", count: 32)
        let ac = dir.file("ac")
        try Data("an action result".utf8).write(to: URL(fileURLWithPath: ac))
        let acPut = try await plainCurl(["--http1.1", "-T", ac, node.localURL("/ac/\(key)")])
        #expect(acPut.httpCode == "201", "\(acPut)")
        let acGet = try await plainCurl(["--http1.1", node.localURL("/ac/\(key)")])
        #expect(acGet.httpCode == "200" && acGet.body == "an action result", "\(acGet)")
    }

    @Test("Backpressure: a 64 MiB GET read slowly over HTTP/1.1 is sent as the client takes it (the node's memory does not grow by the blob)")
    func slowReaderBackpressure() async throws {
        let node = try await TestNode.startWithLocal(maxBytes: "512M")
        defer { node.cleanUp() }
        let dir = try TempDir("local-slow")
        defer { dir.remove() }
        let file = dir.file("blob")
        try await makeRandomFile(file, size: 64 << 20)
        let hash = try await sha256sum(file)
        let put = try await plainCurl(["--http1.1", "-T", file, node.localURL("/cas/\(hash)")])
        try #require(put.httpCode == "201", "\(put)")
        let baseline = try #require(residentBytes(node.pid))
        // 8 MiB/s: the download takes seconds; a server that queued the whole file would hold it all.
        let get = try ChildProcess(["curl", "-sS", "--http1.1", "--limit-rate", "8M", "-o", dir.file("out"), node.localURL("/cas/\(hash)")])
        defer { get.killAndWait() }
        var peak = baseline
        while !get.hasExited {
            peak = max(peak, residentBytes(node.pid) ?? 0)
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(await get.waitForExit(timeout: 120)?.status == 0, "\(get.stderr)")
        #expect(try await sha256sum(dir.file("out")) == hash)
        #expect(peak - baseline < 24 << 20, "the node's RSS grew by \((peak - baseline) >> 20) MiB while a slow client read a 64 MiB blob")
    }

    @Test("Backpressure: a 64 MiB upload waiting for the only write slot is not read ahead into memory; it completes once the slot frees")
    func uploadWaitingForASlotIsNotBuffered() async throws {
        let dir = try TempDir("local-slot")
        defer { dir.remove() }
        try "max_concurrent_writes = 1\n".write(toFile: dir.file("node.toml"), atomically: true, encoding: .utf8)
        let node = try await TestNode.startWithLocal(maxBytes: "512M", extra: ["--config", dir.file("node.toml")])
        defer { node.cleanUp() }
        let slow = dir.file("slow"), big = dir.file("big")
        try await makeRandomFile(slow, size: 16 << 20)
        try await makeRandomFile(big, size: 64 << 20)
        let slowHash = try await sha256sum(slow), bigHash = try await sha256sum(big)
        // The slot holder: 16 MiB at 2 MiB/s.
        let holder = try ChildProcess(["curl", "-sS", "--http1.1", "--limit-rate", "2M", "-o", "/dev/null", "-T", slow, node.localURL("/cas/\(slowHash)")])
        defer { holder.killAndWait() }
        let holding = await eventually(timeout: 30) {
            ((try? await withClient(node) { try await $0.metrics() })?.value("cachemesh_store_reserved_bytes") ?? 0) > 0
        }
        try #require(holding, "the first upload never took the write slot")
        let baseline = try #require(residentBytes(node.pid))
        let waiter = try ChildProcess(["curl", "-sS", "--http1.1", "-w", "%{http_code}", "-o", "/dev/null", "-T", big, node.localURL("/cas/\(bigHash)")])
        defer { waiter.killAndWait() }
        var peak = baseline
        while !holder.hasExited {
            peak = max(peak, residentBytes(node.pid) ?? 0)
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(peak - baseline < 24 << 20, "the node's RSS grew by \((peak - baseline) >> 20) MiB while a 64 MiB upload waited for a write slot")
        #expect(await waiter.waitForExit(timeout: 120)?.status == 0)
        #expect(waiter.stdout == "201", "the waiting upload completes: \(waiter.stdout) \(waiter.stderr)")
        #expect(try await withClient(node) { try await $0.fetch("/cas/\(bigHash)", method: "HEAD").status } == 200)
    }

    @Test("Pipelined requests are answered in order on one connection")
    func pipelining() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let bytes = randomBytes(100_000)
        let hash = try await withClient(node) { try await $0.put(bytes: bytes).hash }
        let missing = String(repeating: "0f", count: 32)
        let req = "GET /cas/\(hash) HTTP/1.1\r\nHost: x\r\n\r\nHEAD /cas/\(missing) HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        let r = try await rawHTTP(port: node.localPort!, Array(req.utf8))
        #expect(statusCodes(r.response) == [200, 404, 200], "\(r.response.prefix(300))")
        #expect(r.closed, "Connection: close must close")
        #expect(r.response.utf8.count > 100_000, "the first response carries the blob")
    }

    @Test("Smuggling attempts and malformed requests get 400 and a closed connection")
    func smugglingRefused() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let hash = String(repeating: "ab", count: 32)
        for (what, request) in smugglingAttempts(hash: hash) {
            let r = try await rawHTTP(port: node.localPort!, Array(request.utf8))
            #expect(statusCodes(r.response) == [400], "\(what): \(r.response.prefix(400).debugDescription)")
            #expect(r.closed, "\(what): the connection must be closed after the 400")
        }
        // A header list over the limit: 431, closed.
        let big = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 70_000))\r\n\r\n"
        let r = try await rawHTTP(port: node.localPort!, Array(big.utf8))
        #expect(statusCodes(r.response) == [431], "\(r.response.prefix(300))")
        #expect(r.closed)
        // Nothing was stored and the node still serves.
        #expect(try await withClient(node) { try await $0.fetch("/cas/\(hash)").status } == 404)
        let health = try await plainCurl(["--http1.1", node.localURL("/healthz")])
        #expect(health.httpCode == "200", "\(health)")
    }

    @Test("An early refusal reaches curl as its status: reader PUT → 403, PUT over the store → 413 (20 tries each)")
    func earlyRefusals() async throws {
        let node = try await TestNode.startWithLocal(role: "reader", maxBytes: "4M")
        defer { node.cleanUp() }
        let dir = try TempDir("local-early")
        defer { dir.remove() }
        let file = dir.file("big")
        try await makeRandomFile(file, size: 5_000_000)
        let hash = try await sha256sum(file)
        for i in 0..<20 {
            // With and without Expect: 100-continue.
            let expect = i % 2 == 0 ? [] : ["-H", "Expect:"]
            let r = try await plainCurl(["--http1.1", "-T", file] + expect + [node.localURL("/cas/\(hash)")])
            #expect(r.exitCode == 0 && r.httpCode == "403", "try \(i): \(r)")
            #expect(r.body.contains("role reader may not write"), "try \(i): \(r)")
        }
        let client = try await TestNode.startWithLocal(maxBytes: "4M")
        defer { client.cleanUp() }
        for i in 0..<20 {
            let expect = i % 2 == 0 ? [] : ["-H", "Expect:"]
            let r = try await plainCurl(["--http1.1", "-T", file] + expect + [client.localURL("/cas/\(hash)")])
            #expect(r.exitCode == 0 && r.httpCode == "413", "try \(i): \(r)")
            #expect(r.body.contains("too large"), "try \(i): \(r)")
        }
        // The reader still reads.
        let get = try await plainCurl(["--http1.1", node.localURL("/healthz")])
        #expect(get.httpCode == "200")
    }

    @Test("h2c with prior knowledge and a unix socket (mode 0660) speak to the same store")
    func h2cAndUnixSocket() async throws {
        let dir = try TempDir("local-sock")
        defer { dir.remove() }
        let socket = dir.file("cachemesh.sock")
        let node = try await TestNode.startWithLocal(socket: socket)
        defer { node.cleanUp() }
        let attrs = try FileManager.default.attributesOfItem(atPath: socket)
        #expect((attrs[.posixPermissions] as? NSNumber)?.intValue == 0o660, "socket mode: \(attrs)")
        #expect(attrs[.type] as? FileAttributeType == .typeSocket)

        let file = dir.file("blob")
        try await makeRandomFile(file, size: 1_000_000)
        let hash = try await sha256sum(file)
        let put = try await plainCurl(["--http2-prior-knowledge", "-T", file, node.localURL("/cas/\(hash)")])
        #expect(put.httpCode == "201" && put.httpVersion == "2", "\(put)")
        let out = dir.file("out")
        let get = try await plainCurl(["--unix-socket", socket, "--http1.1", "-o", out, "http://localhost/cas/\(hash)"])
        #expect(get.httpCode == "200" && get.httpVersion == "1.1", "\(get)")
        #expect(try await sha256sum(out) == hash)
        let h2 = try await plainCurl(["--unix-socket", socket, "--http2-prior-knowledge", "-I", "http://localhost/cas/\(hash)"])
        #expect(h2.httpCode == "200" && h2.httpVersion == "2", "\(h2)")

        // /status shows the local endpoint.
        let status = try await plainCurl(["--http1.1", node.localURL("/status")])
        #expect(status.body.contains("\"local\":\"127.0.0.1:\(node.localPort!)\""), "\(status.body)")
        #expect(status.body.contains("\"local_role\":\"client\""), "\(status.body)")
        let json = try JSONSerialization.jsonObject(with: Data(status.body.utf8)) as? [String: Any]
        let listen = json?["listen"] as? [String: Any]
        #expect(listen?["local_socket"] as? String == socket, "\(status.body)")
        // cachemesh status (over mTLS) shows it to people.
        let cli = try await run([try Paths.cachemesh(), "status"] + node.cli(.client), timeout: 60)
        #expect(cli.status == 0 && cli.stdout.contains("127.0.0.1:\(node.localPort!), unix:\(socket) (plaintext HTTP/1.1, h2c, gRPC; role client)"), "\(cli)")
    }

    @Test("DELETE /ac/{key} for a writing role (ccache needs it); /cas stays immutable (405); a reader may not delete (403)")
    func deleteAction() async throws {
        let dir = try TempDir("local-delete")
        defer { dir.remove() }
        let socket = dir.file("reader.sock")
        // The TCP endpoint gives client, a second node's socket gives reader.
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let key = String(repeating: "7c", count: 32)
        let value = dir.file("v")
        try Data("entry".utf8).write(to: URL(fileURLWithPath: value))
        #expect(try await plainCurl(["--http1.1", "-T", value, node.localURL("/ac/\(key)")]).httpCode == "201")
        #expect(try await plainCurl(["--http1.1", node.localURL("/ac/\(key)")]).httpCode == "200")
        let del = try await plainCurl(["--http1.1", "-X", "DELETE", node.localURL("/ac/\(key)")])
        #expect(del.httpCode == "200", "\(del)")
        let gone = try await plainCurl(["--http1.1", node.localURL("/ac/\(key)")])
        #expect(gone.httpCode == "404", "after DELETE: \(gone)")
        let again = try await plainCurl(["--http1.1", "-X", "DELETE", node.localURL("/ac/\(key)")])
        #expect(again.httpCode == "404", "\(again)")
        let m = try await withClient(node) { try await $0.getText("/metrics").body }
        #expect(m.contains("cachemesh_store_actions 0"), "the store no longer counts the entry")

        // A blob cannot be deleted, over HTTP/1.1 or HTTP/2 with mTLS.
        let bytes = randomBytes(10_000)
        let hash = try await withClient(node) { try await $0.put(bytes: bytes).hash }
        let casDel = try await plainCurl(["--http1.1", "-X", "DELETE", node.localURL("/cas/\(hash)")])
        #expect(casDel.httpCode == "405", "\(casDel)")
        let casDel2 = try await curl(node, .client, ["-X", "DELETE", node.url("/cas/\(hash)")])
        #expect(casDel2.httpCode == "405", "\(casDel2)")
        #expect(try await withClient(node) { try await $0.fetch("/cas/\(hash)").status } == 200)

        // A reader may not delete (over mTLS with a reader certificate, and on a reader local socket).
        #expect(try await plainCurl(["--http1.1", "-T", value, node.localURL("/ac/\(key)")]).httpCode == "201")
        let readerDel = try await curl(node, .reader, ["-X", "DELETE", node.url("/ac/\(key)")])
        #expect(readerDel.httpCode == "403", "\(readerDel)")
        let readerNode = try await TestNode.startWithLocal(role: "reader", socket: socket)
        defer { readerNode.cleanUp() }
        let sockDel = try await plainCurl(["--unix-socket", socket, "-X", "DELETE", "http://localhost/ac/\(key)"])
        #expect(sockDel.httpCode == "403", "\(sockDel)")
        #expect(try await plainCurl(["--http1.1", node.localURL("/ac/\(key)")]).httpCode == "200", "the entry survives refused deletes")
    }

    @Test("Metrics label the protocol: http1 (local and TLS), h2 (mTLS and h2c); HTTP/1.1 refusals are counted with transport http1")
    func metricsByProtocol() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        func requests(_ p: String) async throws -> Double {
            try await withClient(node) { try await $0.metrics() }.value("cachemesh_http_requests_total", labels: ["protocol": p]) ?? 0
        }
        let h1Before = try await requests("http1")
        for _ in 0..<3 { #expect(try await plainCurl(["--http1.1", node.localURL("/healthz")]).httpCode == "200") }
        #expect(try await curl(node, .client, ["--http1.1", node.url("/healthz")]).httpCode == "200")
        let h1After = try await requests("http1")
        #expect(h1After - h1Before == 4, "4 HTTP/1.1 requests (3 local, 1 over TLS): \(h1Before) → \(h1After)")
        let h2Before = try await requests("h2")
        #expect(try await plainCurl(["--http2-prior-knowledge", node.localURL("/healthz")]).httpCode == "200")
        let h2After = try await requests("h2")
        // The h2c request, and the /metrics request that read h2Before (our client speaks HTTP/2).
        #expect(h2After - h2Before == 2, "\(h2Before) → \(h2After)")
        #expect(try await requests("h3") == 0)
        _ = try await rawHTTP(port: node.localPort!, Array("GARBAGE\r\n\r\n".utf8))
        let m = try await withClient(node) { try await $0.metrics() }
        #expect((m.value("cachemesh_http_refused_total", labels: ["reason": "malformed_request", "transport": "http1"]) ?? 0) >= 1)
    }

    @Test("SIGTERM drains: an idle keep-alive HTTP/1.1 connection is closed by the node, which exits 0")
    func drainClosesIdleKeepAlive() async throws {
        let node = try await TestNode.startWithLocal()
        defer { node.cleanUp() }
        let script = """
        import socket, sys, time
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        s.settimeout(1); out = b""; end = time.time() + 120
        while time.time() < end:
            try:
                b = s.recv(4096)
            except socket.timeout:
                if b"ok" in out and not sys.stdout.closed:
                    print("ANSWERED", flush=True)
                continue
            if not b:
                print("EOF", flush=True); break
            out += b
        """
        let client = try ChildProcess(["python3", "-c", script, String(node.localPort!)])
        defer { client.killAndWait() }
        let answered = await eventually(timeout: 30) { client.stdout.contains("ANSWERED") }
        try #require(answered, "the keep-alive request was answered: \(client.stdout) \(client.stderr)")
        let exit = await node.terminate(timeout: 60)
        #expect(exit?.status == 0 && exit?.signalled == false, "\(String(describing: exit)) \(node.logExcerpt())")
        let closed = await eventually(timeout: 30) { client.stdout.contains("EOF") }
        #expect(closed, "the node closed the idle keep-alive connection: \(client.stdout)")
    }

    @Test("A non-loopback --local-listen is refused (exit 2, in words) unless --local-allow-remote")
    func nonLoopbackRefused() async throws {
        let bin = try Paths.cachemesh()
        let dir = try TempDir("local-remote")
        defer { dir.remove() }
        let r = try await run([bin, "node", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", dir.file("d"), "--local-listen", "0.0.0.0:0"], timeout: 30)
        #expect(r.status == 2, "\(r)")
        #expect(r.stderr.contains("not a loopback address") && r.stderr.contains("--local-allow-remote"), "\(r.stderr)")
        let role = try await run([bin, "node", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", dir.file("d"), "--local-listen", "127.0.0.1:0", "--local-role", "node"], timeout: 30)
        #expect(role.status == 2, "\(role)")
        #expect(role.stderr.contains("--local-role must be client or reader"), "\(role.stderr)")
    }
}

@Suite("HTTP/1.1 beside HTTP/2 on the TLS port (ALPN h2, http/1.1, none)", .serialized, .timeLimit(.minutes(5)))
struct TLSHTTP1Tests {
    @Test("curl --http1.1 over mTLS (a node without a local endpoint): PUT with 100-continue, GET, HEAD, keep-alive reuse; no ALPN is HTTP/1.1; h2 still HTTP/2")
    func http1OverMutualTLS() async throws {
        try await withNode { node in
            let dir = try TempDir("tls-h1")
            defer { dir.remove() }
            let file = dir.file("blob")
            try await makeRandomFile(file, size: 2_000_000)
            let hash = try await sha256sum(file)
            let put = try await curl(node, .client, ["--http1.1", "-v", "-T", file, node.url("/cas/\(hash)")])
            #expect(put.exitCode == 0 && put.httpCode == "201" && put.httpVersion == "1.1", "\(put)")
            #expect(put.stderr.contains("ALPN: server accepted http/1.1") || put.stderr.contains("ALPN, server accepted to use http/1.1"), "\(put.stderr.suffix(2000))")
            #expect(put.stderr.contains("HTTP/1.1 100 Continue"), "\(put.stderr.suffix(1500))")

            let o1 = dir.file("o1"), o2 = dir.file("o2")
            let gets = try await curl(node, .client, ["--http1.1", "-v", node.url("/cas/\(hash)"), "-o", o1, node.url("/cas/\(hash)"), "-o", o2])
            #expect(gets.exitCode == 0 && gets.httpCode == "200" && gets.httpVersion == "1.1", "\(gets)")
            #expect(gets.stderr.contains("Re-using existing connection"), "\(gets.stderr.suffix(1500))")
            let s1 = try await sha256sum(o1), s2 = try await sha256sum(o2)
            #expect(s1 == hash && s2 == hash)

            let head = try await curl(node, .client, ["--http1.1", "-I", node.url("/cas/\(hash)")])
            #expect(head.httpCode == "200" && head.body.lowercased().contains("content-length: 2000000"), "\(head)")

            // No ALPN at all: HTTP/1.1.
            let noALPN = try await curl(node, .client, ["--http1.1", "--no-alpn", "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(noALPN.httpCode == "200" && noALPN.httpVersion == "1.1", "\(noALPN)")
            // h2 as before.
            let h2 = try await curl(node, .client, ["-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(h2.httpCode == "200" && h2.httpVersion == "2", "\(h2)")
            // The certificate still decides: a reader reads but may not write; 20 tries, every one a 403 with its message.
            let big = dir.file("big")
            try await makeRandomFile(big, size: 5_000_000)
            let bigHash = try await sha256sum(big)
            for i in 0..<20 {
                let r = try await curl(node, .reader, ["--http1.1", "-T", big, node.url("/cas/\(bigHash)")])
                #expect(r.exitCode == 0 && r.httpCode == "403" && r.body.contains("role reader may not write"), "try \(i): \(r)")
            }
            let readerGet = try await curl(node, .reader, ["--http1.1", "-o", "/dev/null", node.url("/cas/\(hash)")])
            #expect(readerGet.httpCode == "200", "\(readerGet)")
            // No certificate: refused in the handshake, as over HTTP/2.
            let anonymous = try await curl(node, .anonymous, ["--http1.1", node.url("/cas/\(hash)")])
            #expect(anonymous.exitCode != 0 && anonymous.httpCode != "200", "\(anonymous)")
        }
    }

    @Test("Smuggling attempts over TLS + HTTP/1.1 get 400 and a closed connection")
    func smugglingOverTLS() async throws {
        try await withNode { node in
            let c = node.certs
            let tls = (ca: c.ca, cert: c.path("client.pem"), key: c.path("client.key"))
            for (what, request) in smugglingAttempts(hash: String(repeating: "ab", count: 32)) {
                let r = try await rawHTTP(port: node.port, Array(request.utf8), tls: tls)
                #expect(statusCodes(r.response) == [400], "\(what): \(r.response.prefix(400).debugDescription)")
                #expect(r.closed, "\(what): the connection must be closed after the 400")
            }
            let ok = try await rawHTTP(port: node.port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8), tls: tls)
            #expect(statusCodes(ok.response) == [200] && ok.closed, "\(ok.response.prefix(300))")
        }
    }
}

@Suite("Local endpoint of a mesh node (topology key local)", .serialized)
struct LocalEndpointMeshTests {
    @Test("A miss on a worker's local endpoint (curl --http1.1) is fetched from a peer, as on the TLS port", .timeLimit(.minutes(5)))
    func localMissFetchesFromAPeer() async throws {
        var options = TestMesh.Options()
        var localPorts: [String: Int] = [:]
        for n in ["origin", "peer1", "peer2", "peer3"] {
            localPorts[n] = try TestMesh.freePort()
            options.extra[n] = "local = \"127.0.0.1:\(localPorts[n]!)\""
        }
        let mesh = try await TestMesh(options)
        defer { mesh.stopAll() }
        try await mesh.converge()
        for n in mesh.names {
            #expect(mesh.children[n]!.stdout.contains("cachemesh: listening local=127.0.0.1:\(localPorts[n]!) role=client"), "\(n): \(mesh.children[n]!.stdout)")
        }
        // A blob written at peer1 over its local endpoint (HTTP/1.1) that peer1 owns with another
        // peer (not the origin): W = 2, so at acknowledgement exactly its two owners hold it.
        let dir = try TempDir("mesh-local")
        defer { dir.remove() }
        var bytes = randomBytes(1_000_000)
        while true {
            let owners = PlacementOracle.owners(of: SHA256.hex(bytes), among: mesh.names, replicas: 2)
            if owners.contains("peer1") && !owners.contains("origin") { break }
            bytes = randomBytes(1_000_000)
        }
        let file = dir.file("blob")
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        let hash = SHA256.hex(bytes)
        let put = try await plainCurl(["--http1.1", "-T", file, "http://127.0.0.1:\(localPorts["peer1"]!)/cas/\(hash)"])
        try #require(put.httpCode == "201", "\(put)")
        let holders = mesh.names.filter { mesh.holds($0, hash) }
        #expect(Set(holders) == Set(PlacementOracle.owners(of: hash, among: mesh.names, replicas: 2)), "W = 2 over the local endpoint too: \(holders)")
        let worker = try #require(mesh.names.first { $0 != "origin" && !holders.contains($0) })
        _ = await eventually(timeout: 20) { ((try? await mesh.meshStatus(worker))?.localityEntries ?? 0) > 0 }
        let headers = dir.file("headers"), out = dir.file("out")
        let get = try await plainCurl(["--http1.1", "-D", headers, "-o", out, "http://127.0.0.1:\(localPorts[worker]!)/cas/\(hash)"])
        #expect(get.httpCode == "200", "\(get)\n\(mesh.logs())")
        let headerText = (try? String(contentsOfFile: headers, encoding: .utf8))?.lowercased() ?? ""
        #expect(headerText.contains("x-cachemesh-source: peer:"), "the worker fetched it from a peer: \(headerText)")
        #expect(try await sha256sum(out) == hash)
        #expect(mesh.holds(worker, hash), "the worker keeps its copy")
    }
}

@Suite("Early refusals reach curl as a status over HTTP/2 too", .serialized, .timeLimit(.minutes(5)))
struct EarlyRefusalH2Tests {
    @Test("curl --http2 with mTLS: a reader PUT of 5 MB → 403 with its message, a PUT larger than the store → 413, 20 tries each")
    func earlyRefusalsOverH2() async throws {
        try await withNode(maxBytes: "4M") { node in
            let dir = try TempDir("h2-early")
            defer { dir.remove() }
            let file = dir.file("big")
            try await makeRandomFile(file, size: 5_000_000)
            let hash = try await sha256sum(file)
            for i in 0..<20 {
                let r = try await curl(node, .reader, ["-T", file, node.url("/cas/\(hash)")])
                #expect(r.exitCode == 0 && r.httpCode == "403" && r.httpVersion == "2" && r.body.contains("role reader may not write"), "try \(i): \(r)")
            }
            for i in 0..<20 {
                let r = try await curl(node, .client, ["-T", file, node.url("/cas/\(hash)")])
                #expect(r.exitCode == 0 && r.httpCode == "413" && r.httpVersion == "2" && r.body.contains("too large"), "try \(i): \(r)")
            }
        }
    }
}
