import MeshHTTP
import NIOCore
import SwiftProtobuf

/// A small gRPC client over any `HTTPClientTransport` (our HTTP/2 or HTTP/3 connections).
public struct GRPCClient: Sendable {
    public let transport: any HTTPClientTransport
    public let maxMessageSize: Int

    public init(transport: any HTTPClientTransport, maxMessageSize: Int = GRPCFraming.defaultMaxMessageSize) {
        self.transport = transport
        self.maxMessageSize = maxMessageSize
    }

    private func head(_ path: String, metadata: HTTPHeaders, timeout: Duration?) -> HTTPRequestHead {
        var h: HTTPHeaders = ["content-type": "application/grpc", "te": "trailers"]
        if let timeout {
            let ms = max(Int64(1), timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
            h.add("grpc-timeout", "\(ms)m")
        }
        for (n, v) in metadata { h.add(n, v) }
        return HTTPRequestHead(method: "POST", path: path, headers: h)
    }

    /// All response messages of a call whose request body is `body` (framed messages).
    public func call<Resp: SwiftProtobuf.Message>(
        _ path: String, body: HTTPOutboundBody, metadata: HTTPHeaders = [:], timeout: Duration? = nil, as: Resp.Type
    ) async throws -> [Resp] {
        let r = try await transport.request(head(path, metadata: metadata, timeout: timeout), body: body)
        guard r.status == 200 else { throw GRPCStatus(.unavailable, "HTTP status \(r.status)") }
        if let s = Self.status(from: r.headers) {   // trailers-only
            if s.code != .ok { throw s }
            return []
        }
        var reader = GRPCMessageReader(maxMessageSize: maxMessageSize)
        var out: [Resp] = []
        for try await chunk in r.body {
            reader.append(chunk)
            while let m = try reader.next() { out.append(try GRPCMessageReader.decode(Resp.self, from: m)) }
        }
        try reader.checkComplete()
        guard let t = r.body.trailers, let s = Self.status(from: t) else {
            throw GRPCStatus(.internalError, "response ended without grpc-status")
        }
        if s.code != .ok { throw s }
        return out
    }

    public func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ request: Req, metadata: HTTPHeaders = [:], timeout: Duration? = nil, as: Resp.Type = Resp.self
    ) async throws -> Resp {
        let out = try await call(path, body: .bytes(try GRPCFraming.frame(request)), metadata: metadata, timeout: timeout, as: Resp.self)
        guard out.count == 1 else { throw GRPCStatus(.internalError, "expected one response message, got \(out.count)") }
        return out[0]
    }

    public func serverStreaming<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ request: Req, metadata: HTTPHeaders = [:], as: Resp.Type = Resp.self
    ) async throws -> [Resp] {
        try await call(path, body: .bytes(try GRPCFraming.frame(request)), metadata: metadata, as: Resp.self)
    }

    public func clientStreaming<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ requests: [Req], metadata: HTTPHeaders = [:], as: Resp.Type = Resp.self
    ) async throws -> Resp {
        var body = ByteBuffer()
        for r in requests {
            var f = try GRPCFraming.frame(r)
            body.writeBuffer(&f)
        }
        let out = try await call(path, body: .bytes(body), metadata: metadata, as: Resp.self)
        guard out.count == 1 else { throw GRPCStatus(.internalError, "expected one response message, got \(out.count)") }
        return out[0]
    }

    static func status(from headers: HTTPHeaders) -> GRPCStatus? {
        guard let s = headers["grpc-status"], let v = Int(s) else { return nil }
        let code = GRPCStatus.Code(rawValue: v) ?? .unknown
        return GRPCStatus(code, GRPCStatus.percentDecode(headers["grpc-message"] ?? ""))
    }
}
