/* One peer wire connection over TCP (docs/PROTOCOL.md section 3): the socket, the read buffer
 * and framing, the write queue, and the connection timers. What the messages mean is the
 * owner's business (engine/swarm.c); this module only delivers whole, parsed messages.
 *
 * Life cycle: dg_peer_conn_connect() or dg_peer_conn_accept() makes a connection. Bytes read
 * first go to the handshake parser; once 56 bytes have arrived, ops->on_handshake decides
 * whether to go on. After that every whole frame is parsed and handed to ops->on_message.
 * Anything malformed, an oversize frame, a handshake not finished within
 * DG_PEER_CONN_HANDSHAKE_MS, silence for DG_PEER_CONN_IDLE_MS, a socket error or end of stream
 * closes the connection: ops->on_close runs exactly once with the reason, and the connection is
 * freed once its handle is closed. A keep-alive goes out after DG_PEER_CONN_KEEPALIVE_MS
 * without other traffic.
 *
 * Threads: loop thread only. Callbacks run on it, never from inside dg_peer_conn_send(). */
#ifndef DG_PEER_CONN_H
#define DG_PEER_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "engine/peer_msg.h"

#define DG_PEER_CONN_HANDSHAKE_MS 10000u
#define DG_PEER_CONN_KEEPALIVE_MS 60000u
#define DG_PEER_CONN_IDLE_MS 150000u

/* Why a connection closed (the argument of on_close). */
enum dg_peer_close_reason {
    DG_PEER_CLOSE_LOCAL = 1, /* the owner closed it */
    DG_PEER_CLOSE_EOF,       /* the remote closed it, or the socket failed */
    DG_PEER_CLOSE_CONNECT,   /* the connection could not be made */
    DG_PEER_CLOSE_MALFORMED, /* a frame that did not parse, or an oversize one */
    DG_PEER_CLOSE_HANDSHAKE, /* a bad handshake, or none within the time limit */
    DG_PEER_CLOSE_TIMEOUT,   /* silent for too long */
    DG_PEER_CLOSE_PROTOCOL,  /* the owner found a message breaking the rules */
    DG_PEER_CLOSE_BAD_DATA,  /* the owner found data that failed verification */
};

struct dg_peer_conn; /* opaque */

struct dg_peer_conn_ops {
    /* The connection is open (outgoing ones only; accepted ones are open from the start). */
    void (*on_connected)(struct dg_peer_conn *c);
    /* The remote's handshake. @return 0 to go on, or a DG_PEER_CLOSE_* reason to close. */
    int (*on_handshake)(struct dg_peer_conn *c, const struct dg_peer_handshake *hs);
    /* One message, valid only during the call. @return 0, or a reason to close. */
    int (*on_message)(struct dg_peer_conn *c, const struct dg_peer_msg *m);
    /* A write finished and fewer than DG_PEER_CONN_LOW_WATER bytes wait (may be NULL). */
    void (*on_drained)(struct dg_peer_conn *c);
    /* The connection is closing; it must not be used after this returns. */
    void (*on_close)(struct dg_peer_conn *c, enum dg_peer_close_reason reason);
};

#define DG_PEER_CONN_LOW_WATER (1u << 20)

/* Opens a connection to @p addr. @p ops and @p owner are kept.
 * @return 0 (on_connected or on_close follows), -ENOMEM, -EINVAL, or a uv error. */
int dg_peer_conn_connect(uv_loop_t *loop, const struct sockaddr *addr,
                         const struct dg_peer_conn_ops *ops, void *owner,
                         struct dg_peer_conn **out);

/* Accepts a connection waiting on @p server. @return 0, -ENOMEM, or a uv error. */
int dg_peer_conn_accept(uv_stream_t *server, const struct dg_peer_conn_ops *ops, void *owner,
                        struct dg_peer_conn **out);

/* Queues @p len bytes (copied). Writing is asynchronous; a failed write closes the
 * connection. @return 0 or -ENOMEM (the connection is then closed). No-op once closing. */
int dg_peer_conn_send(struct dg_peer_conn *c, const void *buf, size_t len);

/* Bytes queued and not yet handed to the kernel. */
size_t dg_peer_conn_queued(const struct dg_peer_conn *c);

/* Closes the connection; on_close runs (now) with @p reason unless it ran already. */
void dg_peer_conn_close(struct dg_peer_conn *c, enum dg_peer_close_reason reason);

/* The owner pointer, and a second pointer the owner may set (its per-peer state). */
void *dg_peer_conn_owner(const struct dg_peer_conn *c);
void *dg_peer_conn_data(const struct dg_peer_conn *c);
void dg_peer_conn_set_data(struct dg_peer_conn *c, void *data);

/* The remote address. */
const struct sockaddr_storage *dg_peer_conn_addr(const struct dg_peer_conn *c);

/* 1 for a connection we opened, 0 for an accepted one. */
int dg_peer_conn_outgoing(const struct dg_peer_conn *c);

/* Bytes received and sent on this connection so far (handshake and framing included). */
uint64_t dg_peer_conn_bytes_in(const struct dg_peer_conn *c);
uint64_t dg_peer_conn_bytes_out(const struct dg_peer_conn *c);

/* A short name for a close reason, for logs. */
const char *dg_peer_close_reason_name(enum dg_peer_close_reason reason);

#endif
