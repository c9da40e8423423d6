import NIOCore
import SwiftProtobuf

/// Length-prefixed gRPC messages: 1 byte compressed flag, 4 bytes big-endian length, payload.
public enum GRPCFraming {
    /// Default largest message accepted (gRPC's usual 4 MiB plus room for batch overhead).
    public static let defaultMaxMessageSize = 16 << 20

    public static func frame(_ payload: [UInt8], into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(UInt32(payload.count))
        buffer.writeBytes(payload)
    }

    public static func frame(_ message: some SwiftProtobuf.Message) throws -> ByteBuffer {
        let bytes: [UInt8] = try message.serializedBytes()
        var b = ByteBuffer()
        b.reserveCapacity(bytes.count + 5)
        frame(bytes, into: &b)
        return b
    }
}

/// Reassembles messages from arbitrarily split or merged DATA chunks.
public struct GRPCMessageReader: Sendable {
    private var buffer = ByteBuffer()
    public let maxMessageSize: Int

    public init(maxMessageSize: Int = GRPCFraming.defaultMaxMessageSize) {
        self.maxMessageSize = maxMessageSize
    }

    public mutating func append(_ chunk: ByteBuffer) {
        var c = chunk
        if buffer.readableBytes == 0 {
            buffer = c
        } else {
            buffer.writeBuffer(&c)
        }
    }

    /// The next complete message, nil if more bytes are needed.
    public mutating func next() throws -> ByteBuffer? {
        guard buffer.readableBytes >= 5 else { return nil }
        let flag = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self)!
        let length = Int(buffer.getInteger(at: buffer.readerIndex + 1, as: UInt32.self)!)
        switch flag {
        case 0: break
        case 1: throw GRPCStatus(.internalError, "compressed message received, but this server accepts only identity encoding")
        default: throw GRPCStatus(.internalError, "invalid message compressed-flag \(flag)")
        }
        guard length <= maxMessageSize else {
            throw GRPCStatus(.resourceExhausted, "message of \(length) bytes exceeds the limit of \(maxMessageSize) bytes")
        }
        guard buffer.readableBytes >= 5 + length else { return nil }
        buffer.moveReaderIndex(forwardBy: 5)
        let msg = buffer.readSlice(length: length)!
        if buffer.readableBytes == 0 { buffer = ByteBuffer() }
        return msg
    }

    /// Call at end of stream: leftover bytes mean a truncated message.
    public func checkComplete() throws {
        if buffer.readableBytes > 0 {
            throw GRPCStatus(.internalError, "stream ended inside a message (\(buffer.readableBytes) bytes left over)")
        }
    }

    public static func decode<M: SwiftProtobuf.Message>(_ type: M.Type, from buffer: ByteBuffer) throws -> M {
        do {
            return try M(serializedBytes: Array(buffer.readableBytesView))
        } catch {
            throw GRPCStatus(.invalidArgument, "cannot decode \(M.protoMessageName): \(error)")
        }
    }
}
