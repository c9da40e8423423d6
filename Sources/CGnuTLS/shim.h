#ifndef CACHEMESH_CGNUTLS_SHIM_H
#define CACHEMESH_CGNUTLS_SHIM_H
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <gnutls/crypto.h>
#include <errno.h>

// gnutls_free is a macro (a function pointer variable); Swift cannot call it directly.
static inline void cm_gnutls_free(void *p) { gnutls_free(p); }

// errno is a macro as well; push/pull callbacks need to report EAGAIN.
static inline int cm_errno_eagain(void) { return EAGAIN; }
#endif
