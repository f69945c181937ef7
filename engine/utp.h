/* uTP, the Micro Transport Protocol of BEP 29: reliable, ordered, congestion-controlled byte
 * streams over UDP, so that a hole punched through two NATs carries the same peer wire as TCP
 * (docs/PROTOCOL.md section 5).
 *
 * The module never owns a socket or reads a clock, as jech/dht: the caller hands in every
 * datagram that may be uTP (dg_utp_input), the current time in microseconds, and a send
 * function. One struct dg_utp serves every connection on one UDP port and on any extra sockets
 * the caller opens for hole punching: each datagram carries a caller-chosen "path" number (which
 * socket it came in on), and a connection sends on the path it was made on.
 *
 * Packets: the 20-byte BEP 29 header (version 1; ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN),
 * the selective-ACK extension, 16-bit sequence and ack numbers with wrap-around, connection ids
 * (the initiator receives on id and sends on id + 1). Congestion control is LEDBAT as BEP 29
 * describes it (100 ms target delay, base delay over the last two minutes, the window scaled
 * by how far the delay is off target), halved on a loss found by selective ACKs or three
 * duplicate ACKs (fast retransmit), and back to one packet on a timeout (RTO from the smoothed
 * RTT as in RFC 6298, at least 500 ms, doubling per timeout). The advertised receive window is
 * what is free of DG_UTP_RECV_BUFFER.
 *
 * Callbacks may call dg_utp_write, dg_utp_close and dg_utp_set_reading on any connection, and
 * dg_utp_connect; not dg_utp_input, dg_utp_flush, dg_utp_tick or dg_utp_free.
 *
 * Threads: one thread (the engine loop); nothing here blocks or allocates per byte. */
#ifndef DG_UTP_H
#define DG_UTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define DG_UTP_HEADER_LEN 20
#define DG_UTP_MAX_PACKET 1400             /* payload bytes in a packet on an Internet path */
#define DG_UTP_LOOPBACK_PACKET 16000       /* payload bytes when the remote is on 127/8 or ::1 */
#define DG_UTP_SEND_BUFFER (1u << 20)      /* bytes accepted by dg_utp_write and not yet acked */
#define DG_UTP_RECV_BUFFER (1u << 20)      /* bytes of out-of-order data held, and window offered */
#define DG_UTP_CONNECT_TIMEOUT_US 6000000u /* SYN again 1 s, 3 s after the first; given up */
#define DG_UTP_IDLE_TIMEOUT_US 60000000u   /* nothing heard for this long: the connection died */
#define DG_UTP_KEEPALIVE_US 15000000u      /* an ACK goes out after this long without sending */
#define DG_UTP_MAX_CONNS 4096              /* connections in one context; SYNs beyond get a RESET */

struct dg_utp;      /* every connection on one port; opaque */
struct dg_utp_sock; /* one connection; opaque */

struct dg_utp_ops {
    /* Sends one datagram on @p path (as given to dg_utp_input or dg_utp_connect). Errors
     * are ignored: uTP retransmits. */
    void (*send)(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to);
    /* A SYN from someone we do not know yet. @return 0 to take the connection (the owner may
     * set its data now; on_connected does not follow: it is connected), or -1 to refuse it
     * (a RESET is sent and the socket freed before this returns). */
    int (*on_accept)(void *arg, struct dg_utp_sock *s);
    /* An outgoing connection got its SYN answered. */
    void (*on_connected)(struct dg_utp_sock *s);
    /* In-order bytes from the remote; valid only during the call. */
    void (*on_read)(struct dg_utp_sock *s, const uint8_t *buf, size_t len);
    /* Room appeared in the send buffer after dg_utp_write accepted less than it was given. */
    void (*on_writable)(struct dg_utp_sock *s);
    /* The connection ended: 0 for the remote's FIN after all its data, -ECONNREFUSED (RESET
     * in answer to our SYN), -ECONNRESET (RESET later), -ETIMEDOUT (the SYN went unanswered,
     * too many retransmissions, or DG_UTP_IDLE_TIMEOUT_US of silence). At most once, and never
     * after dg_utp_close. The owner still calls dg_utp_close afterwards. */
    void (*on_end)(struct dg_utp_sock *s, int err);
};

/* Counters for status and tests. */
struct dg_utp_stats {
    uint64_t packets_in, packets_out;
    uint64_t retransmits; /* data packets sent again (timeout or fast retransmit) */
    uint64_t timeouts;    /* retransmission timeouts */
    uint64_t malformed;   /* datagrams that looked like uTP and failed to parse */
    uint64_t unknown;     /* well-formed packets for no connection (answered with RESET) */
    uint64_t refused;     /* SYNs refused by on_accept */
    uint64_t overflow;    /* SYNs refused because DG_UTP_MAX_CONNS connections exist */
    uint64_t dropped;     /* data packets dropped: receive buffer full or past its window */
};

/* Per-connection figures. */
struct dg_utp_sock_info {
    uint32_t rtt_us, rto_us;
    uint32_t cwnd;                /* congestion window, bytes */
    uint32_t peer_window;         /* the remote's advertised window, bytes */
    uint32_t in_flight;           /* bytes sent and not acked */
    uint32_t send_queued;         /* bytes accepted by dg_utp_write and not yet acked */
    uint64_t bytes_in, bytes_out; /* payload */
    uint64_t retransmits;
    uint32_t recv_held;   /* bytes in the receive buffer: out of order, or not read yet */
    uint32_t packet_size; /* payload bytes per packet on this path */
};

/* Makes the context. @p ops and @p arg are kept. @p seed seeds connection ids and initial
 * sequence numbers (the caller passes real randomness; tests a fixed value).
 * @return 0, or -ENOMEM. */
int dg_utp_new(const struct dg_utp_ops *ops, void *arg, uint64_t seed, struct dg_utp **out);

/* Frees the context and every connection in it at once, without sending anything and without
 * callbacks. NULL is allowed. */
void dg_utp_free(struct dg_utp *u);

/* Whether a datagram looks like uTP (version 1, a known type, at least a header): the caller's
 * cheap demultiplexing test against DHT messages (which start with 'd'). */
int dg_utp_is_packet(const uint8_t *buf, size_t len);

/* Takes one datagram that came in on @p path from @p from at @p now_us. Callbacks may run
 * before it returns. ACKs it makes are held until dg_utp_flush, so that a burst of datagrams
 * is acknowledged once. @return 1 if it was uTP (even malformed and counted), 0 if not. */
int dg_utp_input(struct dg_utp *u, int path, const uint8_t *buf, size_t len,
                 const struct sockaddr *from, uint64_t now_us);

/* Sends the ACKs held back by dg_utp_input, and the partly filled packets dg_utp_write left
 * queued. The caller calls it once it has read everything its sockets had (libuv: from a
 * uv_check handle). */
void dg_utp_flush(struct dg_utp *u, uint64_t now_us);

/* Runs the timers: retransmissions, connect and idle timeouts, keep-alives, and the freeing of
 * closed connections whose FIN was acked (or given up). Call it at least every
 * DG_UTP_TICK_US while dg_utp_count() is non-zero. */
#define DG_UTP_TICK_US 20000u
void dg_utp_tick(struct dg_utp *u, uint64_t now_us);

/* Starts a connection to @p to on @p path (sends the SYN at once).
 * @return 0 (on_connected or on_end follows), -ENOMEM, -EAFNOSUPPORT, or -EADDRINUSE (no free
 * connection id towards that address and path). */
int dg_utp_connect(struct dg_utp *u, int path, const struct sockaddr *to, uint64_t now_us,
                   struct dg_utp_sock **out);

/* Queues up to @p len bytes (copied) and sends what the windows allow. Full packets go at once;
 * a last, partly filled one waits for the next dg_utp_flush or dg_utp_tick, so that the writes
 * of one loop turn share packets.
 * @return bytes taken (0 when the send buffer is full: on_writable follows), or -EPIPE once the
 * connection ended or is closing (or the remote closed it: it reads nothing more), -ENOTCONN
 * before it is connected, -ENOMEM. */
long dg_utp_write(struct dg_utp_sock *s, const uint8_t *buf, size_t len, uint64_t now_us);

/* The owner is done with @p s: no callback runs for it after this call, and @p s must not be
 * used again. Data already written is still delivered, then a FIN is sent; the module frees the
 * socket when the FIN is acked or after a few retransmissions. On a connection that ended it
 * just frees it. Memory is released by the next dg_utp_tick (never while a callback runs). */
void dg_utp_close(struct dg_utp_sock *s, uint64_t now_us);

/* Whether the owner wants on_read calls: while 0, incoming data stays in the receive buffer and
 * the advertised window shrinks (flow control). Starts at 1. */
void dg_utp_set_reading(struct dg_utp_sock *s, int reading, uint64_t now_us);

/* The owner's pointer, and the context's arg. */
void dg_utp_sock_set_data(struct dg_utp_sock *s, void *data);
void *dg_utp_sock_data(const struct dg_utp_sock *s);
void *dg_utp_arg(const struct dg_utp *u);

/* The remote address and the path of a connection. */
const struct sockaddr_storage *dg_utp_sock_addr(const struct dg_utp_sock *s);
int dg_utp_sock_path(const struct dg_utp_sock *s);

/* Connections alive (including closing ones, and closed ones the next tick frees). */
size_t dg_utp_count(const struct dg_utp *u);

/* For tests: the next connection made or accepted by @p u uses @p seq as its first sequence
 * number instead of a random one (to exercise wrap-around). */
void dg_utp_set_next_seq(struct dg_utp *u, uint16_t seq);

void dg_utp_get_stats(const struct dg_utp *u, struct dg_utp_stats *out);
void dg_utp_sock_get_info(const struct dg_utp_sock *s, struct dg_utp_sock_info *out);

#endif
