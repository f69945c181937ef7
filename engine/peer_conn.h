/* One peer wire connection (docs/PROTOCOL.md section 3) over TCP, over uTP (engine/utp.h: a
 * direct or hole-punched UDP path), or over a relay (a TCP stream to a third node that splices
 * it with the other end's, engine/relay.h): the transport, the read buffer and framing, the
 * write queue, and the connection timers. What the messages mean is the
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

#define DG_PEER_CONN_CONNECT_MS 5000u /* a TCP connect not done by then fails */
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
struct dg_utp;
struct dg_utp_sock;

/* How the bytes travel. */
enum dg_peer_transport {
    DG_PEER_TRANSPORT_TCP = 0,
    DG_PEER_TRANSPORT_UTP = 1,
    DG_PEER_TRANSPORT_RELAY = 2,
};

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

/* Opens a TCP connection to the relay at @p relay and sends @p preamble (copied; the relay's
 * preamble, engine/relay.h) before anything else. @p peer is the remote end's address as far
 * as it is known (dg_peer_conn_addr returns it). @p initiator: 1 if we speak first (we send the
 * handshake, dg_peer_conn_outgoing is 1), 0 if we wait for the other end's handshake as if we
 * had accepted the connection. @return as dg_peer_conn_connect. */
int dg_peer_conn_connect_relay(uv_loop_t *loop, const struct sockaddr *relay,
                               const struct sockaddr *peer, int initiator, const void *preamble,
                               size_t preamble_len, const struct dg_peer_conn_ops *ops, void *owner,
                               struct dg_peer_conn **out);

/* Opens a uTP connection to @p addr on @p path of @p utp (0: the main UDP socket).
 * @p punched: the path was opened by hole punching (reported by dg_peer_conn_punched).
 * @return 0 (on_connected or on_close follows), -ENOMEM, -EINVAL. */
int dg_peer_conn_connect_utp(uv_loop_t *loop, struct dg_utp *utp, int path,
                             const struct sockaddr *addr, int punched,
                             const struct dg_peer_conn_ops *ops, void *owner,
                             struct dg_peer_conn **out);

/* Makes a connection of a uTP socket the uTP module just accepted (the caller's on_accept).
 * @return 0 or -ENOMEM (the caller then refuses the socket). */
int dg_peer_conn_accept_utp(uv_loop_t *loop, struct dg_utp_sock *sock, int punched,
                            const struct dg_peer_conn_ops *ops, void *owner,
                            struct dg_peer_conn **out);

/* The uTP module's per-socket callbacks (struct dg_utp_ops): the owner of the struct dg_utp
 * points its ops at these. Sockets whose data is not a connection are ignored. */
void dg_peer_conn_utp_connected(struct dg_utp_sock *s);
void dg_peer_conn_utp_read(struct dg_utp_sock *s, const uint8_t *buf, size_t len);
void dg_peer_conn_utp_writable(struct dg_utp_sock *s);
void dg_peer_conn_utp_end(struct dg_utp_sock *s, int err);

/* The transport, and whether its path was opened by hole punching. */
enum dg_peer_transport dg_peer_conn_transport(const struct dg_peer_conn *c);
int dg_peer_conn_punched(const struct dg_peer_conn *c);

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

/* 1 for a connection we opened (or a relayed one where we speak first), 0 for an accepted one
 * (or a relayed one where we answer). */
int dg_peer_conn_outgoing(const struct dg_peer_conn *c);

/* Bytes received and sent on this connection so far (handshake and framing included). */
uint64_t dg_peer_conn_bytes_in(const struct dg_peer_conn *c);
uint64_t dg_peer_conn_bytes_out(const struct dg_peer_conn *c);

/* A short name for a close reason, for logs. */
const char *dg_peer_close_reason_name(enum dg_peer_close_reason reason);

#endif
