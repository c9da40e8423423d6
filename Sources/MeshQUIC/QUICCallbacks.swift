import CGnuTLS
import CNgtcp2
import Logging
import MeshHTTP
import MeshTLS
import NIOCore
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension QUICCore {
    // MARK: ngtcp2 callbacks

    static func makeCallbacks(server: Bool) -> ngtcp2_callbacks {
        var cb = ngtcp2_callbacks()
        if server {
            cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb
        } else {
            cb.client_initial = ngtcp2_crypto_client_initial_cb
            cb.recv_retry = ngtcp2_crypto_recv_retry_cb
            cb.handshake_confirmed = { _, ud in
                QUICCore.with(ud) { core in
                    core.handshakeConfirmed = true
                    core.delegate?.quicCoreHandshakeCompleted(core)
                }
                return 0
            }
            cb.extend_max_local_streams_bidi = { _, _, ud in
                QUICCore.with(ud) { $0.scheduleStartPending() }
                return 0
            }
        }
        cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb
        cb.encrypt = ngtcp2_crypto_encrypt_cb
        cb.decrypt = ngtcp2_crypto_decrypt_cb
        cb.hp_mask = ngtcp2_crypto_hp_mask_cb
        cb.update_key = ngtcp2_crypto_update_key_cb
        cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb
        cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb
        cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb
        cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb
        cb.rand = { dest, len, _ in cm_gnutls_rnd(dest, len) }
        cb.get_new_connection_id = { _, cid, token, cidlen, ud in
            withUnsafeMutableBytes(of: &cid!.pointee.data) { cm_gnutls_rnd($0.baseAddress!.assumingMemoryBound(to: UInt8.self), min(cidlen, $0.count)) }
            cid!.pointee.datalen = cidlen
            let id = ConnectionID(cid!.pointee)
            QUICCore.with(ud) { core in
                core.settings.resetSecret.write(token: token!, for: id)
                core.delegate?.quicCore(core, didIssue: id)
            }
            return 0
        }
        cb.recv_stateless_reset = { _, _, ud in
            // ngtcp2 checked the token; read_pkt now returns NGTCP2_ERR_DRAINING.
            QUICCore.with(ud) { $0.statelessResetReceived = true }
            return 0
        }
        cb.remove_connection_id = { _, cid, ud in
            QUICCore.with(ud) { core in core.delegate?.quicCore(core, didRetire: ConnectionID(cid!.pointee)) }
            return 0
        }
        cb.handshake_completed = { _, ud in QUICCore.with(ud) { $0.onHandshakeCompleted() } }
        cb.recv_rx_key = { _, level, ud in
            guard level == NGTCP2_CRYPTO_LEVEL_APPLICATION else { return 0 }
            return QUICCore.with(ud) { $0.setupHTTP3() }
        }
        cb.recv_stream_data = { _, flags, sid, _, data, len, ud, _ in
            QUICCore.with(ud) { $0.recvStreamData(sid, data, len, fin: flags & UInt32(NGTCP2_STREAM_DATA_FLAG_FIN) != 0) }
        }
        cb.acked_stream_data_offset = { _, sid, _, len, ud, _ in
            guard let h3 = QUICCore.with(ud, { $0.h3 }) else { return 0 }
            return nghttp3_conn_add_ack_offset(h3, sid, len) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE
        }
        cb.stream_close = { _, flags, sid, code, ud, _ in
            let appCode = flags & UInt32(NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET) != 0 ? code : UInt64(NGHTTP3_H3_NO_ERROR)
            return QUICCore.with(ud) { core in
                if let h3 = core.h3 {
                    let rv = nghttp3_conn_close_stream(h3, sid, appCode)
                    if rv != 0 && rv != NGHTTP3_ERR_STREAM_NOT_FOUND { return NGTCP2_ERR_CALLBACK_FAILURE }
                }
                core.streamClosed(sid, code: appCode)
                return 0
            }
        }
        cb.stream_reset = { _, sid, _, code, ud, _ in
            QUICCore.with(ud) { $0.peerReset(sid, code: code) }
            return 0
        }
        cb.stream_stop_sending = { _, sid, code, ud, _ in
            QUICCore.with(ud) { $0.peerStopSending(sid, code: code) }
            return 0
        }
        cb.extend_max_remote_streams_bidi = { _, maxStreams, ud in
            if let h3 = QUICCore.with(ud, { $0.h3 }) { nghttp3_conn_set_max_client_streams_bidi(h3, maxStreams) }
            return 0
        }
        cb.extend_max_stream_data = { _, sid, _, ud, _ in
            if let h3 = QUICCore.with(ud, { $0.h3 }) { _ = nghttp3_conn_unblock_stream(h3, sid) }
            return 0
        }
        return cb
    }

    // MARK: nghttp3 callbacks

    static func makeH3Callbacks() -> nghttp3_callbacks {
        var cb = nghttp3_callbacks()
        cb.acked_stream_data = { _, sid, len, ud, _ in
            QUICCore.with(ud) { core in
                guard let s = core.streams[sid] else { return }
                _ = s.held.ack(Int(len))
                s.lastProgress = .now
            }
            return 0
        }
        cb.stream_close = { _, sid, code, ud, _ in
            QUICCore.with(ud) { $0.streamClosed(sid, code: code) }
            return 0
        }
        cb.recv_data = { _, sid, data, len, ud, _ in
            QUICCore.with(ud) { $0.recvData(sid, data, len) }
            return 0
        }
        cb.deferred_consume = { _, sid, n, ud, _ in
            let conn = QUICCore.with(ud) { $0.conn }
            ngtcp2_conn_extend_max_stream_offset(conn, sid, UInt64(n))
            ngtcp2_conn_extend_max_offset(conn, UInt64(n))
            return 0
        }
        cb.begin_headers = { _, sid, ud, _ in
            QUICCore.with(ud) { core in
                if core.isServer, core.streams[sid] == nil { core.streams[sid] = H3Stream(id: sid, maxHeaderListSize: core.settings.maxHeaderListSize) }
                core.streams[sid]?.headerBlock = InboundHeaderBlock(limit: core.settings.maxHeaderListSize)
            }
            return 0
        }
        cb.recv_header = { _, sid, _, name, value, _, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.headerBlock.add(name: QUICCore.bytes(name), value: QUICCore.bytes(value)) }
            return 0
        }
        cb.end_headers = { _, sid, fin, ud, _ in
            QUICCore.with(ud) { $0.endHeaders(sid, fin: fin != 0) }
        }
        cb.begin_trailers = { _, sid, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.inTrailers = true }
            return 0
        }
        cb.recv_trailer = { _, sid, _, name, value, _, ud, _ in
            QUICCore.with(ud) { $0.streams[sid]?.trailerBlock.add(name: QUICCore.bytes(name), value: QUICCore.bytes(value)) }
            return 0
        }
        cb.end_trailers = { _, sid, _, ud, _ in
            QUICCore.with(ud) { core in
                if let s = core.streams[sid], s.trailerBlock.isTooLarge { core.headerListTooLarge(s, bytes: s.trailerBlock.bytes, isTrailers: true, fin: true) }
            }
            return 0
        }
        cb.stop_sending = { _, sid, code, ud, _ in
            ngtcp2_conn_shutdown_stream_read(QUICCore.with(ud) { $0.conn }, sid, code)
            return 0
        }
        cb.end_stream = { _, sid, ud, _ in
            QUICCore.with(ud) { $0.endStream(sid) }
            return 0
        }
        cb.reset_stream = { _, sid, code, ud, _ in
            ngtcp2_conn_shutdown_stream_write(QUICCore.with(ud) { $0.conn }, sid, code)
            return 0
        }
        cb.shutdown = { _, id, ud in
            QUICCore.with(ud) { $0.goawayReceived(id) }
            return 0
        }
        return cb
    }

    /// The bytes of an nghttp3 buffer (valid for the callback's duration).
    static func bytes(_ rc: OpaquePointer?) -> UnsafeRawBufferPointer {
        let v = nghttp3_rcbuf_get_buf(rc)
        return UnsafeRawBufferPointer(start: v.base, count: v.base == nil ? 0 : v.len)
    }

    static func string(_ rc: OpaquePointer?) -> String {
        let v = nghttp3_rcbuf_get_buf(rc)
        guard let base = v.base, v.len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: base, count: v.len), as: UTF8.self)
    }
}
