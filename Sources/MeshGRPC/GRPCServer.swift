import MeshHTTP
import NIOCore
import SwiftProtobuf
import Synchronization

/// What a handler knows about its call.
public struct GRPCContext: Sendable {
    public var path: String
    public var peer: PeerIdentity
    public var headers: HTTPHeaders
    public var deadline: ContinuousClock.Instant?
}

/// Reads the request messages of a client-streaming call.
public struct GRPCRequestStream<M: SwiftProtobuf.Message>: AsyncSequence, Sendable {
    public typealias Element = M
    let body: HTTPInboundBody
    let maxMessageSize: Int

    public struct AsyncIterator: AsyncIteratorProtocol {
        let body: HTTPInboundBody
        var reader: GRPCMessageReader
        var done = false

        public mutating func next() async throws -> M? {
            while true {
                if let msg = try reader.next() { return try GRPCMessageReader.decode(M.self, from: msg) }
                if done { return nil }
                do {
                    guard let chunk = try await body.next() else {
                        done = true
                        try reader.checkComplete()
                        return nil
                    }
                    reader.append(chunk)
                } catch let e as GRPCStatus {
                    throw e
                } catch is CancellationError {
                    throw GRPCStatus(.cancelled, "call cancelled")
                } catch {
                    throw GRPCStatus(.cancelled, "client stream broke: \(error)")
                }
            }
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(body: body, reader: GRPCMessageReader(maxMessageSize: maxMessageSize))
    }
}

/// Writes the response messages of a server-streaming call (waits when the client is slow).
public struct GRPCStreamWriter<M: SwiftProtobuf.Message>: Sendable {
    let stream: HTTPOutboundStream

    public func write(_ message: M) async throws {
        do {
            try await stream.write(try GRPCFraming.frame(message))
        } catch let e as GRPCStatus {
            throw e
        } catch {
            throw GRPCStatus(.cancelled, "client went away: \(error)")
        }
    }
}

/// Dispatches gRPC calls (`POST /package.Service/Method`, `content-type: application/grpc`)
/// to registered handlers. Transport-neutral: it sees `HTTPServerRequest`s.
public final class GRPCRouter: Sendable {
    typealias Handler = @Sendable (HTTPServerRequest, GRPCContext) async -> HTTPResponse

    private let methods = Mutex<[String: Handler]>([:])
    public let maxMessageSize: Int
    /// Maps handler errors that are not `GRPCStatus` (e.g. storage errors) to a status.
    private let mapError: @Sendable (any Error) -> GRPCStatus

    public init(maxMessageSize: Int = GRPCFraming.defaultMaxMessageSize,
                mapError: @escaping @Sendable (any Error) -> GRPCStatus = { GRPCStatus(.internalError, "\($0)") }) {
        self.maxMessageSize = maxMessageSize
        self.mapError = mapError
    }

    public static func isGRPC(_ head: HTTPRequestHead) -> Bool {
        head.headers["content-type"]?.hasPrefix("application/grpc") == true
    }

    public func handles(_ path: String) -> Bool { methods.withLock { $0[path] != nil } }

    // MARK: registration

    public func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ f: @escaping @Sendable (Req, GRPCContext) async throws -> Resp
    ) {
        let max = maxMessageSize
        let mapError = self.mapError
        register(path) { request, ctx in
            do {
                let req: Req = try await Self.readSingle(request.body, max: max)
                let resp = try await Self.withDeadline(ctx.deadline) { try await f(req, ctx) }
                return Self.success(body: try GRPCFraming.frame(resp))
            } catch {
                return Self.trailersOnly(Self.status(error, mapError))
            }
        }
    }

    public func serverStreaming<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ f: @escaping @Sendable (Req, GRPCStreamWriter<Resp>, GRPCContext) async throws -> Void
    ) {
        let max = maxMessageSize
        let mapError = self.mapError
        register(path) { request, ctx in
            let req: Req
            do { req = try await Self.readSingle(request.body, max: max) } catch { return Self.trailersOnly(Self.status(error, mapError)) }
            let out = HTTPOutboundStream()
            Task {
                do {
                    try await Self.withDeadline(ctx.deadline) { try await f(req, GRPCStreamWriter(stream: out), ctx) }
                    out.finish(trailers: Self.trailers(.ok))
                } catch {
                    out.finish(trailers: Self.trailers(Self.status(error, mapError)))
                }
            }
            return HTTPResponse(status: 200, headers: Self.responseHeaders, body: .stream(out))
        }
    }

    public func clientStreaming<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ f: @escaping @Sendable (GRPCRequestStream<Req>, GRPCContext) async throws -> Resp
    ) {
        let max = maxMessageSize
        let mapError = self.mapError
        register(path) { request, ctx in
            do {
                let stream = GRPCRequestStream<Req>(body: request.body, maxMessageSize: max)
                let resp = try await Self.withDeadline(ctx.deadline) { try await f(stream, ctx) }
                return Self.success(body: try GRPCFraming.frame(resp))
            } catch {
                return Self.trailersOnly(Self.status(error, mapError))
            }
        }
    }

    private func register(_ path: String, _ h: @escaping Handler) {
        methods.withLock { $0[path] = h }
    }

    // MARK: dispatch

    public func handle(_ request: HTTPServerRequest) async -> HTTPResponse {
        let head = request.head
        guard head.method == "POST" else {
            return .text(405, "gRPC calls use POST")
        }
        guard Self.isGRPC(head) else {
            return .text(415, "content-type must be application/grpc")
        }
        if let enc = head.headers["grpc-encoding"], enc != "identity" {
            var r = Self.trailersOnly(GRPCStatus(.unimplemented, "grpc-encoding \(enc) is not supported; use identity"))
            r.headers.add("grpc-accept-encoding", "identity")
            return r
        }
        guard let handler = methods.withLock({ $0[head.path] }) else {
            return Self.trailersOnly(GRPCStatus(.unimplemented, "unknown method \(head.path.prefix(200))"))
        }
        var deadline: ContinuousClock.Instant?
        if let t = head.headers["grpc-timeout"] {
            guard let d = Self.parseTimeout(t) else {
                return Self.trailersOnly(GRPCStatus(.invalidArgument, "malformed grpc-timeout \(t.prefix(20))"))
            }
            deadline = .now + d
        }
        let ctx = GRPCContext(path: head.path, peer: request.peer, headers: head.headers, deadline: deadline)
        return await handler(request, ctx)
    }

    // MARK: helpers

    static let responseHeaders: HTTPHeaders = ["content-type": "application/grpc"]

    static func trailers(_ s: GRPCStatus) -> HTTPHeaders {
        var h = HTTPHeaders()
        h.add("grpc-status", String(s.code.rawValue))
        if !s.message.isEmpty { h.add("grpc-message", GRPCStatus.percentEncode(s.message)) }
        return h
    }

    static func success(body: ByteBuffer) -> HTTPResponse {
        HTTPResponse(status: 200, headers: responseHeaders, body: .bytes(body), trailers: trailers(.ok))
    }

    /// An error before any message: status in the only HEADERS frame.
    static func trailersOnly(_ s: GRPCStatus) -> HTTPResponse {
        var h = responseHeaders
        for (n, v) in trailers(s) { h.add(n, v) }
        return HTTPResponse(status: 200, headers: h, body: .empty)
    }

    static func status(_ error: any Error, _ mapError: (any Error) -> GRPCStatus) -> GRPCStatus {
        if let s = error as? GRPCStatus { return s }
        if error is CancellationError { return GRPCStatus(.cancelled, "call cancelled") }
        return mapError(error)
    }

    static func readSingle<M: SwiftProtobuf.Message>(_ body: HTTPInboundBody, max: Int) async throws -> M {
        var reader = GRPCMessageReader(maxMessageSize: max)
        var message: ByteBuffer?
        do {
            for try await chunk in body {
                reader.append(chunk)
                while let m = try reader.next() {
                    guard message == nil else { throw GRPCStatus(.invalidArgument, "expected one request message, got more") }
                    message = m
                }
            }
        } catch let e as GRPCStatus {
            throw e
        } catch {
            throw GRPCStatus(.cancelled, "request stream broke: \(error)")
        }
        try reader.checkComplete()
        guard let message else { throw GRPCStatus(.invalidArgument, "no request message") }
        return try GRPCMessageReader.decode(M.self, from: message)
    }

    /// `grpc-timeout`: 1–8 digits and a unit (H M S m u n).
    public static func parseTimeout(_ s: String) -> Duration? {
        guard let unit = s.last, s.count >= 2, s.count <= 9, let v = Int64(s.dropLast()), v >= 0 else { return nil }
        switch unit {
        case "H": return .seconds(v * 3600)
        case "M": return .seconds(v * 60)
        case "S": return .seconds(v)
        case "m": return .milliseconds(v)
        case "u": return .microseconds(v)
        case "n": return .nanoseconds(v)
        default: return nil
        }
    }

    static func withDeadline<T: Sendable>(_ deadline: ContinuousClock.Instant?, _ op: @escaping @Sendable () async throws -> T) async throws -> T {
        guard let deadline else { return try await op() }
        return try await withThrowingTaskGroup(of: T.self) { group in
            group.addTask { try await op() }
            group.addTask {
                try await Task.sleep(until: deadline, clock: .continuous)
                throw GRPCStatus(.deadlineExceeded, "deadline exceeded")
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }
}
