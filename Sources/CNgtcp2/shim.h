#ifndef CACHEMESH_CNGTCP2_SHIM_H
#define CACHEMESH_CNGTCP2_SHIM_H
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <nghttp3/nghttp3.h>
#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>

// The versioned entry points are hidden behind macros that Swift cannot import: wrap them.

static inline void cm_ngtcp2_settings_default(ngtcp2_settings *s) { ngtcp2_settings_default(s); }
static inline void cm_ngtcp2_transport_params_default(ngtcp2_transport_params *p) { ngtcp2_transport_params_default(p); }

static inline int cm_ngtcp2_conn_server_new(ngtcp2_conn **pconn, const ngtcp2_cid *dcid, const ngtcp2_cid *scid,
                                            const ngtcp2_path *path, uint32_t version,
                                            const ngtcp2_callbacks *callbacks, const ngtcp2_settings *settings,
                                            const ngtcp2_transport_params *params, void *user_data) {
    return ngtcp2_conn_server_new(pconn, dcid, scid, path, version, callbacks, settings, params, NULL, user_data);
}

static inline int cm_ngtcp2_conn_client_new(ngtcp2_conn **pconn, const ngtcp2_cid *dcid, const ngtcp2_cid *scid,
                                            const ngtcp2_path *path, uint32_t version,
                                            const ngtcp2_callbacks *callbacks, const ngtcp2_settings *settings,
                                            const ngtcp2_transport_params *params, void *user_data) {
    return ngtcp2_conn_client_new(pconn, dcid, scid, path, version, callbacks, settings, params, NULL, user_data);
}

static inline int cm_ngtcp2_conn_read_pkt(ngtcp2_conn *conn, const ngtcp2_path *path,
                                          const uint8_t *pkt, size_t pktlen, ngtcp2_tstamp ts) {
    ngtcp2_pkt_info pi = {0};
    return ngtcp2_conn_read_pkt(conn, path, &pi, pkt, pktlen, ts);
}

static inline ngtcp2_ssize cm_ngtcp2_conn_writev_stream(ngtcp2_conn *conn, ngtcp2_path *path,
                                                        uint8_t *dest, size_t destlen, ngtcp2_ssize *pdatalen,
                                                        uint32_t flags, int64_t stream_id,
                                                        const ngtcp2_vec *datav, size_t datavcnt, ngtcp2_tstamp ts) {
    ngtcp2_pkt_info pi;
    return ngtcp2_conn_writev_stream(conn, path, &pi, dest, destlen, pdatalen, flags, stream_id, datav, datavcnt, ts);
}

static inline ngtcp2_ssize cm_ngtcp2_conn_write_connection_close(ngtcp2_conn *conn, ngtcp2_path *path,
                                                                 uint8_t *dest, size_t destlen,
                                                                 const ngtcp2_connection_close_error *ccerr,
                                                                 ngtcp2_tstamp ts) {
    ngtcp2_pkt_info pi;
    return ngtcp2_conn_write_connection_close(conn, path, &pi, dest, destlen, ccerr, ts);
}

static inline int cm_nghttp3_conn_server_new(nghttp3_conn **pconn, const nghttp3_callbacks *callbacks,
                                             const nghttp3_settings *settings, void *user_data) {
    return nghttp3_conn_server_new(pconn, callbacks, settings, NULL, user_data);
}

static inline int cm_nghttp3_conn_client_new(nghttp3_conn **pconn, const nghttp3_callbacks *callbacks,
                                             const nghttp3_settings *settings, void *user_data) {
    return nghttp3_conn_client_new(pconn, callbacks, settings, NULL, user_data);
}

static inline void cm_nghttp3_settings_default(nghttp3_settings *s) { nghttp3_settings_default(s); }

static inline int cm_gnutls_init_quic(gnutls_session_t *s, int server) {
    unsigned flags = (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_END_OF_EARLY_DATA;
    if (server) flags |= GNUTLS_NO_AUTO_SEND_TICKET;
    return gnutls_init(s, flags);
}

/* Macros Swift cannot import (expressions). */
static const size_t cm_max_retry_tokenlen = NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN;

static inline void cm_gnutls_rnd(uint8_t *dest, size_t len) { gnutls_rnd(GNUTLS_RND_RANDOM, dest, len); }
static inline void cm_ngtcp2_conn_get_conn_stat(ngtcp2_conn *conn, ngtcp2_conn_stat *cstat) { ngtcp2_conn_get_conn_stat(conn, cstat); }
#endif
