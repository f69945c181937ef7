/* uTP (BEP 29): see utp.h.
 *
 * Sending. dg_utp_write cuts the bytes into packets of packet_size payload bytes, kept in a ring
 * indexed by sequence number:
 *
 *     snd_una               snd_next              seq_nr
 *        | sent, not acked     | queued, never sent   |
 *
 * A packet's buffer has room for its header in front, so a (re)transmission sends it in place.
 * A sent packet is acked cumulatively (ack_nr), selectively (SACK: it stays in the ring, marked),
 * or taken for lost (marked, sent again before new data). "pipe" is what is in the network:
 * sent, not acked, not sacked, not lost; the congestion window bounds it, and so does the
 * peer's advertised window for new data.
 *
 * Loss. Every transmission gets a stamp from a per-connection counter; the three highest stamps
 * ever acked are kept. A packet is lost once three packets sent after it were acked (its stamp
 * is below the third highest): this covers "three later packets selectively acked" and also
 * finds a retransmission lost again. A packet is also lost when one sent later was acked and it
 * is older than 5/4 of the RTT (RFC 8985's time rule, for short flights). Three duplicate ACKs
 * without SACK mark the oldest packet. The window is halved once per window of data (until
 * snd_una passes what was sent when it was cut). When no ACK came for two RTTs, one packet
 * goes out as a tail-loss probe (RFC 8985): its ACK shows what is missing, so a lost tail or
 * a lost ACK does not wait for the RTO. The RTO marks everything in flight lost and restarts
 * from one packet in slow start.
 *
 * RTT. Samples come from packets sent once (Karn), the most recently sent of those an ACK
 * covers, and not from a cumulative ACK that also covers a retransmission: the packets after
 * a filled hole waited in the peer's buffer, and timing them inflates the RTO for good with a
 * peer that sends no SACK. The RTO's doubling ends as soon as an ACK shows progress.
 *
 * Receiving. Packets past the last one handed to on_read (deliver_nr) are held in an array of
 * RECV_SLOTS slots indexed by sequence number; ack_nr is the last one received in order. While
 * the owner reads and nothing is held, an in-order packet goes to on_read straight from the
 * datagram. The advertised window is DG_UTP_RECV_BUFFER less what is held.
 *
 * Ends. A connection is freed only by dg_utp_tick (or dg_utp_free), never while a callback
 * runs: dg_utp_close and the protocol only mark it "freeable". */
#include "engine/utp.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "engine/byteorder.h"

enum {
    ST_DATA,
    ST_FIN,
    ST_STATE,
    ST_RESET,
    ST_SYN,
    ST_MAX = ST_SYN
};

#define VERSION 1
#define EXT_SACK 1

#define TARGET_US 100000          /* LEDBAT: queuing delay aimed at */
#define GAIN_BYTES 3000           /* LEDBAT: most the window grows per RTT (Internet packets) */
#define BASE_SLOT_US 60000000u    /* base delay: the least of this minute's and the last one's */
#define INITIAL_RTO_US 1000000u   /* before any RTT sample */
#define MIN_RTO_US 500000u        /* RFC 6298 says 1 s; BEP 29 implementations use 500 ms */
#define MAX_RTO_US 60000000u      /* RTO doubling stops here */
#define SYN_RETRY_US 1000000u     /* SYNs at 0, 1 s, 3 s; given up at DG_UTP_CONNECT_TIMEOUT_US */
#define INITIAL_CWND_PACKETS 4    /* window at start */
#define MIN_CWND_PACKETS 2        /* the least a loss or the delay brings it to */
#define DUP_ACKS 3                /* duplicate ACKs, or later packets acked, that mean a loss */
#define REORDER_MIN_US 1000       /* the time rule waits at least this long (loopback RTTs) */
#define MAX_TIMEOUTS 8            /* RTOs in a row without progress: -ETIMEDOUT */
#define CLOSE_TIMEOUTS 4          /* the same for a closing connection: freed */
#define RECV_SLOTS 1024           /* receive buffer: packets past the last one delivered */
#define SACK_MAX (RECV_SLOTS / 8) /* bytes of SACK bitmask we send at most */
#define NBUCKETS 1024             /* connection hash table */

enum conn_state {
    CS_SYN_SENT,
    CS_CONNECTED,
    CS_DEAD
};

struct pkt {
    uint64_t sent_us; /* last transmission */
    uint64_t stamp;   /* order of the last transmission */
    uint32_t len;     /* payload bytes */
    uint8_t type;     /* ST_DATA or ST_FIN */
    uint8_t tx;       /* transmissions, saturating at 255 */
    uint8_t sacked;   /* the peer holds it (selective ACK) */
    uint8_t lost;     /* taken for lost: waits to be sent again */
    uint8_t buf[];    /* DG_UTP_HEADER_LEN bytes of header, then the payload */
};

/* A packet in the receive buffer. */
struct held {
    uint32_t len;
    uint8_t data[];
};

struct dg_utp_sock {
    struct dg_utp *u;
    struct dg_utp_sock *next, *prev; /* u->socks */
    struct dg_utp_sock *hnext;       /* hash chain */
    struct dg_utp_sock *dnext;       /* u->dirty */
    void *data;
    struct sockaddr_storage addr;
    int path;
    uint16_t recv_id, send_id;
    uint8_t state;         /* enum conn_state */
    uint8_t accepted;      /* made by the remote's SYN */
    uint8_t accepting;     /* on_accept runs: writes only queue */
    uint8_t heard;         /* (accepted) the remote sent more than SYNs: it got our STATE */
    uint8_t closed;        /* dg_utp_close was called: no more callbacks */
    uint8_t ended;         /* on_end was due (and called unless closed) */
    uint8_t freeable;      /* the next tick frees it */
    uint8_t reading;       /* the owner takes on_read calls */
    uint8_t delivering;    /* deliver() is on the stack */
    uint8_t in_dirty;      /* on u->dirty */
    uint8_t ack_pending;   /* received something not acknowledged yet */
    uint8_t want_writable; /* a write was cut short */
    uint8_t got_fin;       /* eof_seq is known */
    uint8_t peer_closed;   /* everything up to the remote's FIN came: it is gone */
    uint8_t fin_acked;
    uint8_t slow_start, in_recovery, fast_rexmit, cwnd_blocked;
    uint8_t have_rtt, have_delay;
    uint8_t syn_tries;
    uint8_t tlp_sent; /* the tail-loss probe went out: none until progress */
    uint32_t packet_size;

    /* Sending. */
    struct pkt **ring;
    uint16_t ring_mask; /* ring size - 1 */
    uint16_t isn;       /* our first sequence number */
    uint16_t snd_una, snd_next, seq_nr;
    uint16_t recovery_seq; /* in_recovery until snd_una reaches it */
    uint32_t send_queued;  /* payload bytes in the ring */
    uint32_t pipe;         /* bytes sent, not acked, not sacked, not lost */
    uint32_t lost_bytes, nlost;
    uint32_t cwnd, ssthresh, peer_wnd;
    uint32_t dup_acks;
    uint32_t timeouts_in_row;
    uint32_t nsacked;        /* packets in the ring marked sacked */
    uint64_t rack_sent_us;   /* latest transmission time of a packet acked (sent once) */
    uint64_t stamps;         /* transmissions so far */
    uint64_t acked_stamp[3]; /* the three highest stamps acked, highest first */
    uint32_t srtt, rttvar;
    uint32_t rto_base;         /* from the RTT (RFC 6298) */
    uint32_t rto;              /* rto_base, doubled per timeout since the last progress */
    uint64_t rto_at, probe_at; /* 0: not armed */
    uint64_t tlp_at;           /* tail-loss probe; 0: not armed */

    /* One-way delay (LEDBAT). */
    uint32_t reply_micro; /* for our next packet's timestamp_difference_microseconds */
    uint32_t base[2];     /* least delay seen this minute, and in the one before */
    uint64_t base_start;
    uint32_t recent[3];
    uint32_t recent_i;
    uint32_t our_delay; /* queuing delay: recent samples less the base */

    /* Receiving. */
    uint16_t ack_nr;     /* last packet received in order */
    uint16_t deliver_nr; /* last packet handed to on_read (or dropped after close) */
    uint16_t eof_seq;    /* the remote's FIN */
    struct held **rcv;   /* RECV_SLOTS, made on first need */
    uint32_t held_bytes;
    uint32_t ooo_count; /* held packets past ack_nr */

    /* Timers. */
    uint64_t connect_at, syn_sent_us, syn_next_us;
    uint64_t last_heard_us, last_sent_us, progress_us, closed_at;

    uint64_t bytes_in, bytes_out, retransmits;
};

struct dg_utp {
    struct dg_utp_ops ops;
    void *arg;
    uint64_t rng;
    uint64_t hash_key;
    struct dg_utp_sock *buckets[NBUCKETS];
    struct dg_utp_sock *socks; /* every connection */
    struct dg_utp_sock *dirty; /* connections flush has to look at */
    size_t count;
    int depth;   /* callbacks on the stack */
    int seq_set; /* dg_utp_set_next_seq */
    uint16_t next_seq;
    struct dg_utp_stats stats;
    uint8_t out[DG_UTP_HEADER_LEN + 2 + SACK_MAX]; /* STATE, SYN and RESET packets */
};

/* A parsed packet. */
struct hdr {
    uint8_t type;
    uint16_t conn_id, seq, ack;
    uint32_t ts, ts_diff, wnd;
    const uint8_t *sack; /* NULL: none */
    size_t sack_len;
    const uint8_t *payload;
    size_t len;
};

#define CALLBACK(u, call) \
    do {                  \
        (u)->depth++;     \
        call;             \
        (u)->depth--;     \
    } while (0)

/* ---- small helpers ---- */

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Whether sequence number @p a comes after @p b (16-bit wrap-around). */
static int seq_gt(uint16_t a, uint16_t b)
{
    uint16_t d = (uint16_t)(a - b);
    return d != 0 && d < 0x8000;
}

/* Whether 32-bit delay @p a is below @p b (the peer's clock may be anywhere). */
static int delay_lt(uint32_t a, uint32_t b)
{
    return (uint32_t)(a - b) >= 0x80000000u;
}

static uint32_t min32(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

static uint32_t max32(uint32_t a, uint32_t b)
{
    return a > b ? a : b;
}

/* ---- addresses and the connection table ---- */

static int addr_supported(const struct sockaddr *a)
{
    return a && (a->sa_family == AF_INET || a->sa_family == AF_INET6);
}

static void addr_copy(struct sockaddr_storage *dst, const struct sockaddr *src)
{
    memset(dst, 0, sizeof(*dst));
    if (src->sa_family == AF_INET)
        memcpy(dst, src, sizeof(struct sockaddr_in));
    else
        memcpy(dst, src, sizeof(struct sockaddr_in6));
}

static int addr_equal(const struct sockaddr_storage *a, const struct sockaddr *b)
{
    if (a->ss_family != b->sa_family)
        return 0;
    if (b->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        const struct sockaddr_in *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
    const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
    return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id &&
           memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

static int addr_is_loopback(const struct sockaddr *a)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    if (a->sa_family == AF_INET)
        return ((const uint8_t *)&((const struct sockaddr_in *)a)->sin_addr)[0] == 127;
    const uint8_t *b = ((const struct sockaddr_in6 *)a)->sin6_addr.s6_addr;
    if (memcmp(b, mapped, 12) == 0)
        return b[12] == 127;
    for (int i = 0; i < 15; i++)
        if (b[i])
            return 0;
    return b[15] == 1;
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v;
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 32);
}

static size_t bucket_of(const struct dg_utp *u, const struct sockaddr *a, int path, uint16_t id)
{
    uint64_t h = mix(u->hash_key, (uint64_t)id << 32 | (uint32_t)path);

    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        h = mix(h, (uint64_t)x->sin_addr.s_addr << 16 | x->sin_port);
    } else {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        uint64_t w[2];
        memcpy(w, &x->sin6_addr, sizeof(w));
        h = mix(mix(mix(h, w[0]), w[1]), x->sin6_port);
    }
    return (size_t)(h % NBUCKETS);
}

static struct dg_utp_sock *lookup(const struct dg_utp *u, const struct sockaddr *a, int path,
                                  uint16_t recv_id)
{
    for (struct dg_utp_sock *s = u->buckets[bucket_of(u, a, path, recv_id)]; s; s = s->hnext)
        if (s->recv_id == recv_id && s->path == path && addr_equal(&s->addr, a))
            return s;
    return NULL;
}

static void hash_insert(struct dg_utp *u, struct dg_utp_sock *s)
{
    size_t b = bucket_of(u, (const struct sockaddr *)&s->addr, s->path, s->recv_id);
    s->hnext = u->buckets[b];
    u->buckets[b] = s;
}

static void hash_remove(struct dg_utp *u, struct dg_utp_sock *s)
{
    size_t b = bucket_of(u, (const struct sockaddr *)&s->addr, s->path, s->recv_id);
    for (struct dg_utp_sock **pp = &u->buckets[b]; *pp; pp = &(*pp)->hnext)
        if (*pp == s) {
            *pp = s->hnext;
            return;
        }
}

static void mark_dirty(struct dg_utp_sock *s)
{
    if (!s->in_dirty) {
        s->in_dirty = 1;
        s->dnext = s->u->dirty;
        s->u->dirty = s;
    }
}

static void mark_ack(struct dg_utp_sock *s)
{
    s->ack_pending = 1;
    mark_dirty(s);
}

static uint16_t next_isn(struct dg_utp *u)
{
    if (u->seq_set) {
        u->seq_set = 0;
        return u->next_seq;
    }
    return (uint16_t)splitmix(&u->rng);
}

static struct dg_utp_sock *sock_new(struct dg_utp *u, const struct sockaddr *addr, int path,
                                    uint64_t now)
{
    struct dg_utp_sock *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    s->u = u;
    addr_copy(&s->addr, addr);
    s->path = path;
    s->reading = 1;
    s->packet_size = addr_is_loopback(addr) ? DG_UTP_LOOPBACK_PACKET : DG_UTP_MAX_PACKET;
    s->cwnd = INITIAL_CWND_PACKETS * s->packet_size;
    s->ssthresh = DG_UTP_SEND_BUFFER;
    s->slow_start = 1;
    s->rto = s->rto_base = INITIAL_RTO_US;
    s->last_heard_us = s->last_sent_us = s->progress_us = now;
    return s;
}

static void sock_link(struct dg_utp *u, struct dg_utp_sock *s)
{
    hash_insert(u, s);
    s->next = u->socks;
    if (u->socks)
        u->socks->prev = s;
    u->socks = s;
    u->count++;
}

static void drop_send(struct dg_utp_sock *s)
{
    if (s->ring)
        for (size_t i = 0; i <= s->ring_mask; i++) {
            free(s->ring[i]);
            s->ring[i] = NULL;
        }
    s->snd_una = s->snd_next = s->seq_nr;
    s->send_queued = s->pipe = s->lost_bytes = s->nlost = s->nsacked = 0;
    s->rto_at = s->probe_at = s->tlp_at = 0;
}

static void sock_free(struct dg_utp *u, struct dg_utp_sock *s)
{
    hash_remove(u, s);
    if (s->prev)
        s->prev->next = s->next;
    else
        u->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->in_dirty)
        for (struct dg_utp_sock **pp = &u->dirty; *pp; pp = &(*pp)->dnext)
            if (*pp == s) {
                *pp = s->dnext;
                break;
            }
    drop_send(s);
    free(s->ring);
    if (s->rcv) {
        for (size_t i = 0; i < RECV_SLOTS; i++)
            free(s->rcv[i]);
        free(s->rcv);
    }
    u->count--;
    free(s);
}

/* ---- packets out ---- */

static uint32_t recv_window(const struct dg_utp_sock *s)
{
    if (s->closed || s->held_bytes >= DG_UTP_RECV_BUFFER)
        return s->closed ? DG_UTP_RECV_BUFFER : 0;
    return DG_UTP_RECV_BUFFER - s->held_bytes;
}

static void write_header(const struct dg_utp_sock *s, uint8_t *p, int type, uint16_t conn_id,
                         uint16_t seq, uint8_t ext, uint64_t now)
{
    p[0] = (uint8_t)(type << 4 | VERSION);
    p[1] = ext;
    dg_put16(p + 2, conn_id);
    dg_put32(p + 4, (uint32_t)now);
    dg_put32(p + 8, s->reply_micro);
    dg_put32(p + 12, recv_window(s));
    dg_put16(p + 16, seq);
    dg_put16(p + 18, s->ack_nr);
}

static void raw_send(struct dg_utp_sock *s, const uint8_t *buf, size_t len, uint64_t now)
{
    struct dg_utp *u = s->u;

    u->stats.packets_out++;
    s->last_sent_us = now;
    u->ops.send(u->arg, s->path, buf, len, (const struct sockaddr *)&s->addr);
}

/* Writes the SACK bitmask of what is held past ack_nr + 1 into @p out.
 * @return its length (a multiple of 4), or 0. */
static size_t build_sack(const struct dg_utp_sock *s, uint8_t *out)
{
    /* Bit i stands for ack_nr + 2 + i; the receive buffer reaches deliver_nr + RECV_SLOTS. */
    size_t room = RECV_SLOTS - (uint16_t)(s->ack_nr - s->deliver_nr) - 1, last = 0, n;
    int any = 0;

    if (!s->ooo_count || !s->rcv)
        return 0;
    if (room > SACK_MAX * 8)
        room = SACK_MAX * 8;
    memset(out, 0, SACK_MAX);
    for (size_t i = 0; i < room; i++)
        if (s->rcv[(uint16_t)(s->ack_nr + 2 + i) & (RECV_SLOTS - 1)]) {
            out[i >> 3] |= (uint8_t)(1u << (i & 7));
            last = i;
            any = 1;
        }
    if (!any)
        return 0;
    n = (last / 32 + 1) * 4;
    return n;
}

static void send_state(struct dg_utp_sock *s, uint64_t now)
{
    uint8_t *p = s->u->out;
    size_t mlen = build_sack(s, p + DG_UTP_HEADER_LEN + 2), n = DG_UTP_HEADER_LEN;
    /* Until the initiator shows it is connected, our STATE tells it our first number. */
    uint16_t seq = s->accepted && !s->heard ? s->isn : s->seq_nr;

    write_header(s, p, ST_STATE, s->send_id, seq, mlen ? EXT_SACK : 0, now);
    if (mlen) {
        p[n] = 0;
        p[n + 1] = (uint8_t)mlen;
        n += 2 + mlen;
    }
    s->ack_pending = 0;
    raw_send(s, p, n, now);
}

static void send_syn(struct dg_utp_sock *s, uint64_t now)
{
    write_header(s, s->u->out, ST_SYN, s->recv_id, s->isn, 0, now);
    s->syn_sent_us = now;
    raw_send(s, s->u->out, DG_UTP_HEADER_LEN, now);
}

static void send_reset(struct dg_utp_sock *s, uint64_t now)
{
    write_header(s, s->u->out, ST_RESET, s->send_id, s->seq_nr, 0, now);
    raw_send(s, s->u->out, DG_UTP_HEADER_LEN, now);
}

/* Answers a packet for no connection. */
static void reset_to(struct dg_utp *u, int path, const struct sockaddr *to, uint16_t conn_id,
                     uint16_t ack)
{
    uint8_t *p = u->out;

    memset(p, 0, DG_UTP_HEADER_LEN);
    p[0] = ST_RESET << 4 | VERSION;
    dg_put16(p + 2, conn_id);
    dg_put16(p + 16, (uint16_t)splitmix(&u->rng));
    dg_put16(p + 18, ack);
    u->stats.packets_out++;
    u->ops.send(u->arg, path, p, DG_UTP_HEADER_LEN, to);
}

static void mark_lost(struct dg_utp_sock *s, struct pkt *p)
{
    p->lost = 1;
    s->nlost++;
    s->lost_bytes += p->len;
    s->pipe -= p->len;
}

/* Sends packet @p seq (first time or again). */
static void transmit(struct dg_utp_sock *s, uint16_t seq, struct pkt *p, uint64_t now)
{
    write_header(s, p->buf, p->type, s->send_id, seq, 0, now);
    if (p->tx) {
        s->retransmits++;
        s->u->stats.retransmits++;
    } else {
        s->bytes_out += p->len;
    }
    if (p->tx < 255)
        p->tx++;
    if (p->lost) {
        p->lost = 0;
        s->nlost--;
        s->lost_bytes -= p->len;
        s->pipe += p->len;
    } else if (p->tx == 1) {
        s->pipe += p->len; /* first time; a probe sent again was already counted */
    }
    p->sent_us = now;
    p->stamp = ++s->stamps;
    if (!s->ooo_count)
        s->ack_pending = 0; /* this packet carries the ack */
    if (!s->rto_at)
        s->rto_at = now + s->rto;
    if (!s->tlp_at && !s->tlp_sent && s->have_rtt)
        s->tlp_at = now + 2 * (uint64_t)s->srtt + DG_UTP_TICK_US;
    raw_send(s, p->buf, DG_UTP_HEADER_LEN + p->len, now);
}

/* Sends what the windows allow: lost packets first, then new ones. With @p tail, a last
 * packet that is only partly filled goes too. */
static void send_pending(struct dg_utp_sock *s, uint64_t now, int tail)
{
    if (s->state != CS_CONNECTED || s->accepting || s->ended || s->peer_closed || !s->ring)
        return;
    for (uint16_t seq = s->snd_una; s->nlost && seq != s->snd_next; seq++) {
        struct pkt *p = s->ring[seq & s->ring_mask];
        if (!p->lost)
            continue;
        if (s->pipe + p->len > s->cwnd && !s->fast_rexmit) {
            s->cwnd_blocked = 1;
            return;
        }
        s->fast_rexmit = 0;
        transmit(s, seq, p, now);
    }
    s->fast_rexmit = 0;
    while (s->snd_next != s->seq_nr) {
        struct pkt *p = s->ring[s->snd_next & s->ring_mask];
        if (p->type == ST_DATA && p->len < s->packet_size &&
            (uint16_t)(s->snd_next + 1) == s->seq_nr && !tail && !s->closed)
            break; /* more may be written into it */
        if (s->pipe + p->len > s->cwnd) {
            s->cwnd_blocked = 1;
            break;
        }
        if (s->pipe + p->len > s->peer_wnd) {
            if (s->snd_una == s->snd_next && !s->probe_at)
                s->probe_at = now + max32(s->rto, MIN_RTO_US);
            break;
        }
        s->probe_at = 0;
        transmit(s, s->snd_next, p, now);
        s->snd_next++;
    }
}

/* ---- ends ---- */

static void end(struct dg_utp_sock *s, int err)
{
    if (s->ended)
        return;
    s->ended = 1;
    if (err) {
        s->state = CS_DEAD;
        drop_send(s);
    }
    if (s->closed) {
        s->freeable = 1;
        return;
    }
    if (s->u->ops.on_end)
        CALLBACK(s->u, s->u->ops.on_end(s, err));
}

/* ---- congestion control ---- */

static void rtt_sample(struct dg_utp_sock *s, uint64_t r64)
{
    uint32_t r = r64 > MAX_RTO_US ? MAX_RTO_US : (uint32_t)r64;

    if (!s->have_rtt) {
        s->srtt = r;
        s->rttvar = r / 2;
        s->have_rtt = 1;
    } else {
        uint32_t delta = s->srtt > r ? s->srtt - r : r - s->srtt;
        s->rttvar = (3 * s->rttvar + delta) / 4;
        s->srtt = (7 * s->srtt + r) / 8;
    }
    s->rto_base = min32(max32(s->srtt + max32(4 * s->rttvar, 1000), MIN_RTO_US), MAX_RTO_US);
    s->rto = s->rto_base;
}

static void delay_sample(struct dg_utp_sock *s, uint32_t d, uint64_t now)
{
    uint32_t base, cur;

    if (!s->have_delay) {
        s->base[0] = s->base[1] = d;
        s->recent[0] = s->recent[1] = s->recent[2] = d;
        s->base_start = now;
        s->have_delay = 1;
    }
    if (now - s->base_start >= BASE_SLOT_US) {
        s->base[1] = s->base[0];
        s->base[0] = d;
        s->base_start = now;
    } else if (delay_lt(d, s->base[0])) {
        s->base[0] = d;
    }
    s->recent[s->recent_i++ % 3] = d;
    base = delay_lt(s->base[0], s->base[1]) ? s->base[0] : s->base[1];
    cur = s->recent[0];
    for (int i = 1; i < 3; i++)
        if (delay_lt(s->recent[i], cur))
            cur = s->recent[i];
    s->our_delay = delay_lt(cur, base) ? 0 : cur - base;
}

/* LEDBAT (BEP 29): the window moves by GAIN * off_target / TARGET per window of data acked,
 * plus slow start (the window grows by what is acked) until the first loss or until the delay
 * reaches half the target. It grows only when it was what limited sending. */
static void cc_on_ack(struct dg_utp_sock *s, uint32_t acked, int limited)
{
    int64_t ps = s->packet_size;
    /* On loopback 3000 bytes is a fraction of a packet: grow by two packets per RTT there. */
    int64_t max_gain = ps > DG_UTP_MAX_PACKET ? 2 * ps : GAIN_BYTES;
    int64_t off = TARGET_US, gain, w;

    if (s->have_delay) {
        uint32_t d = min32(s->our_delay, 2 * TARGET_US);
        off = TARGET_US - (int64_t)d;
    }
    gain = max_gain * off * (int64_t)acked / ((int64_t)TARGET_US * s->cwnd);
    if (s->slow_start) {
        if (s->have_delay && s->our_delay > TARGET_US / 2) {
            s->slow_start = 0;
            s->ssthresh = s->cwnd;
        } else if (gain < (int64_t)acked) {
            gain = acked;
        }
    }
    if (gain > 0 && !limited)
        gain = 0;
    w = (int64_t)s->cwnd + gain;
    if (w < MIN_CWND_PACKETS * ps)
        w = MIN_CWND_PACKETS * ps;
    if (w > DG_UTP_SEND_BUFFER)
        w = DG_UTP_SEND_BUFFER;
    s->cwnd = (uint32_t)w;
    if (s->slow_start && s->cwnd >= s->ssthresh)
        s->slow_start = 0;
}

/* Remembers that a transmission with @p stamp was acked. */
static void note_stamp(struct dg_utp_sock *s, uint64_t stamp)
{
    uint64_t *a = s->acked_stamp;

    if (stamp > a[0]) {
        a[2] = a[1];
        a[1] = a[0];
        a[0] = stamp;
    } else if (stamp > a[1]) {
        a[2] = a[1];
        a[1] = stamp;
    } else if (stamp > a[2]) {
        a[2] = stamp;
    }
}

/* Packet @p p reached the peer (acked or sacked). */
static void pkt_arrived(struct dg_utp_sock *s, struct pkt *p, uint64_t now, uint64_t *rtt)
{
    if (p->lost) {
        p->lost = 0;
        s->nlost--;
        s->lost_bytes -= p->len;
    } else {
        s->pipe -= p->len;
    }
    note_stamp(s, p->stamp);
    if (p->tx == 1) { /* Karn: only packets sent once time the path */
        if (now - p->sent_us < *rtt)
            *rtt = now - p->sent_us; /* the packet sent last tells the RTT best */
        if (p->sent_us > s->rack_sent_us)
            s->rack_sent_us = p->sent_us;
    }
}

/* Marks what the ACKs so far show lost. @return how many packets that made. */
static uint32_t detect_losses(struct dg_utp_sock *s, uint64_t now)
{
    uint64_t reorder = max32(s->srtt + s->srtt / 4, REORDER_MIN_US);
    uint32_t n = 0;

    for (uint16_t seq = s->snd_una; seq != s->snd_next; seq++) {
        struct pkt *p = s->ring[seq & s->ring_mask];
        if (p->sacked || p->lost)
            continue;
        if (p->stamp < s->acked_stamp[2] ||
            (s->have_rtt && p->sent_us < s->rack_sent_us && now - p->sent_us >= reorder)) {
            mark_lost(s, p);
            n++;
        }
    }
    return n;
}

/* Losses were found: the window is halved once per window of data. */
static void on_loss(struct dg_utp_sock *s)
{
    if (s->in_recovery)
        return;
    s->cwnd = max32(s->cwnd / 2, MIN_CWND_PACKETS * s->packet_size);
    s->ssthresh = s->cwnd;
    s->slow_start = 0;
    s->in_recovery = 1;
    s->recovery_seq = s->snd_next;
    s->fast_rexmit = 1;
}

/* Takes the ack of a packet from the peer.
 * @return 0, or -1 if it acks packets never sent (the packet is dropped). */
static int process_ack(struct dg_utp_sock *s, const struct hdr *h, uint64_t now)
{
    uint16_t outstanding = (uint16_t)(s->snd_next - s->snd_una);
    uint16_t d = (uint16_t)(h->ack - (uint16_t)(s->snd_una - 1));
    uint32_t newly = 0, lost_now = 0;
    uint64_t rtt = UINT64_MAX;
    int filled = 0; /* the ack covers a retransmitted packet */
    int limited = s->cwnd_blocked || s->pipe + s->packet_size > s->cwnd;

    if (d > outstanding) {
        if (seq_gt(h->ack, (uint16_t)(s->snd_next - 1)))
            return -1;
        return 0; /* an old packet overtaken by later ones: its ack says nothing new */
    }
    s->peer_wnd = h->wnd;
    for (uint16_t i = 0; i < d; i++) {
        struct pkt *p = s->ring[s->snd_una & s->ring_mask];
        if (!p->sacked) {
            newly += p->len;
            pkt_arrived(s, p, now, &rtt);
            filled |= p->tx > 1;
        } else {
            s->nsacked--;
        }
        if (p->type == ST_FIN)
            s->fin_acked = 1;
        s->send_queued -= p->len;
        free(p);
        s->ring[s->snd_una & s->ring_mask] = NULL;
        s->snd_una++;
    }
    /* When a retransmission filled a hole, the packets after it waited in the peer's buffer:
     * their ack says nothing about the RTT (Karn's rule, extended). */
    if (filled)
        rtt = UINT64_MAX;
    if (h->sack) {
        /* Bit i: packet ack + 2 + i, which is snd_una + 1 + i now. */
        uint16_t left = (uint16_t)(s->snd_next - s->snd_una);
        for (size_t i = 0; i < h->sack_len * 8 && i + 1 < left; i++) {
            struct pkt *p;
            if (!(h->sack[i >> 3] >> (i & 7) & 1))
                continue;
            p = s->ring[(uint16_t)(s->snd_una + 1 + i) & s->ring_mask];
            if (p->sacked)
                continue;
            p->sacked = 1;
            s->nsacked++;
            newly += p->len;
            pkt_arrived(s, p, now, &rtt);
        }
    }
    if (d) {
        /* The path works again: the timer backoff ends (as Linux does; RFC 6298 would wait
         * for an RTT sample, which acks of retransmitted packets never give). */
        s->dup_acks = 0;
        s->rto = s->rto_base;
        s->rto_at = s->snd_una != s->snd_next ? now + s->rto : 0;
    } else if (!h->sack && h->type == ST_STATE && s->snd_una != s->snd_next && !newly) {
        struct pkt *p = s->ring[s->snd_una & s->ring_mask];
        if (++s->dup_acks == DUP_ACKS && !p->lost && !p->sacked) {
            mark_lost(s, p);
            lost_now++;
        }
    }
    if (rtt != UINT64_MAX)
        rtt_sample(s, rtt);
    if (d || newly) {
        s->timeouts_in_row = 0;
        s->progress_us = now;
        s->tlp_sent = 0;
        s->tlp_at = s->snd_una != s->snd_next && s->have_rtt
                        ? now + 2 * (uint64_t)s->srtt + DG_UTP_TICK_US
                        : 0;
    }
    if (s->in_recovery && !seq_gt(s->recovery_seq, s->snd_una))
        s->in_recovery = 0;
    if (s->nsacked && newly)
        lost_now += detect_losses(s, now);
    if (lost_now)
        on_loss(s);
    if (newly) {
        cc_on_ack(s, newly, limited);
        s->cwnd_blocked = 0;
    }
    return 0;
}

/* ---- receiving ---- */

/* Hands held in-order packets to on_read while the owner reads (or drops them once closed). */
static void deliver(struct dg_utp_sock *s)
{
    if (s->delivering)
        return;
    s->delivering = 1;
    while (s->deliver_nr != s->ack_nr && (s->reading || s->closed)) {
        uint16_t seq = (uint16_t)(s->deliver_nr + 1);
        struct held *hp = s->rcv[seq & (RECV_SLOTS - 1)];
        s->rcv[seq & (RECV_SLOTS - 1)] = NULL;
        s->deliver_nr = seq;
        s->held_bytes -= hp->len;
        if (!s->closed && hp->len && s->u->ops.on_read)
            CALLBACK(s->u, s->u->ops.on_read(s, hp->data, hp->len));
        free(hp);
    }
    s->delivering = 0;
}

static void check_eof(struct dg_utp_sock *s)
{
    if (!s->got_fin || s->ack_nr != s->eof_seq)
        return;
    if (!s->peer_closed) {
        /* The remote's owner closed: it reads nothing more, and frees its side once our ACK
         * of the FIN arrives. Our data is dropped, our timers stop; what we hold is still
         * delivered, then on_end(0). */
        s->peer_closed = 1;
        s->want_writable = 0;
        drop_send(s);
    }
    if (!s->ended && s->deliver_nr == s->ack_nr)
        end(s, 0);
}

/* Moves ack_nr over the held packets that follow it. */
static void advance(struct dg_utp_sock *s)
{
    while (s->rcv && !(s->got_fin && s->ack_nr == s->eof_seq)) {
        uint16_t next = (uint16_t)(s->ack_nr + 1);
        struct held *hp = s->rcv[next & (RECV_SLOTS - 1)];
        if (!hp || (uint16_t)(next - s->deliver_nr) > RECV_SLOTS)
            break;
        s->ack_nr = next;
        s->ooo_count--;
        s->bytes_in += hp->len;
    }
}

static void receive(struct dg_utp_sock *s, const struct hdr *h)
{
    uint16_t off = (uint16_t)(h->seq - s->ack_nr);
    uint16_t doff = (uint16_t)(h->seq - s->deliver_nr);
    struct held **slot, *hp;

    mark_ack(s);
    if (off == 0 || off >= 0x8000)
        return; /* had it */
    if (s->got_fin && seq_gt(h->seq, s->eof_seq))
        return; /* past the end */
    if (h->type == ST_FIN && !s->got_fin) {
        s->got_fin = 1;
        s->eof_seq = h->seq;
    }
    if (off == 1 && s->deliver_nr == s->ack_nr && !s->delivering && (s->reading || s->closed)) {
        s->ack_nr = s->deliver_nr = h->seq;
        s->bytes_in += h->len;
        if (!s->closed && h->len && s->u->ops.on_read)
            CALLBACK(s->u, s->u->ops.on_read(s, h->payload, h->len));
    } else {
        if (doff > RECV_SLOTS) {
            s->u->stats.dropped++;
            return;
        }
        if (!s->rcv && !(s->rcv = calloc(RECV_SLOTS, sizeof(*s->rcv))))
            return;
        slot = &s->rcv[h->seq & (RECV_SLOTS - 1)];
        if (*slot)
            return; /* a duplicate */
        if (s->held_bytes + h->len > DG_UTP_RECV_BUFFER) {
            s->u->stats.dropped++;
            return;
        }
        if (!(hp = malloc(sizeof(*hp) + h->len)))
            return;
        hp->len = (uint32_t)h->len;
        if (h->len)
            memcpy(hp->data, h->payload, h->len);
        *slot = hp;
        s->held_bytes += hp->len;
        s->ooo_count++;
    }
    advance(s);
    deliver(s);
    check_eof(s);
}

static void maybe_writable(struct dg_utp_sock *s)
{
    if (!s->want_writable || s->closed || s->ended || s->state != CS_CONNECTED || !s->ring)
        return;
    if (s->send_queued > DG_UTP_SEND_BUFFER / 2 ||
        (uint16_t)(s->seq_nr - s->snd_una) > (s->ring_mask + 1u) / 2)
        return;
    s->want_writable = 0;
    if (s->u->ops.on_writable)
        CALLBACK(s->u, s->u->ops.on_writable(s));
}

/* A packet for connection @p s (not a SYN, not a RESET). */
static void process(struct dg_utp_sock *s, const struct hdr *h, uint64_t now)
{
    if (s->freeable || s->state == CS_DEAD)
        return;
    if (s->state == CS_SYN_SENT) {
        if (h->type != ST_STATE || h->ack != s->isn)
            return; /* only the STATE answering our SYN tells us their first number */
        s->state = CS_CONNECTED;
        s->ack_nr = s->deliver_nr = (uint16_t)(h->seq - 1);
        s->peer_wnd = h->wnd;
        s->last_heard_us = s->progress_us = now;
        s->reply_micro = (uint32_t)now - h->ts;
        if (s->syn_tries == 1)
            rtt_sample(s, now - s->syn_sent_us);
        if (!s->closed && s->u->ops.on_connected)
            CALLBACK(s->u, s->u->ops.on_connected(s));
        return;
    }
    if (process_ack(s, h, now) < 0) {
        s->u->stats.malformed++;
        return;
    }
    s->last_heard_us = now;
    s->reply_micro = (uint32_t)now - h->ts;
    s->heard = 1;
    if (h->ts_diff)
        delay_sample(s, h->ts_diff, now);
    if (h->type == ST_DATA || h->type == ST_FIN)
        receive(s, h);
    if (s->closed && s->fin_acked)
        s->freeable = 1;
    send_pending(s, now, 0);
    maybe_writable(s);
}

static void handle_reset(struct dg_utp *u, int path, const struct sockaddr *from,
                         const struct hdr *h)
{
    /* A RESET carries our receive id when the remote knows the connection, or our send id
     * when it answers a packet it does not know. */
    struct dg_utp_sock *s = lookup(u, from, path, h->conn_id);

    if (!s) {
        s = lookup(u, from, path, (uint16_t)(h->conn_id - 1));
        if (s && s->send_id != h->conn_id)
            s = NULL;
    }
    if (!s) {
        s = lookup(u, from, path, (uint16_t)(h->conn_id + 1));
        if (s && s->send_id != h->conn_id)
            s = NULL;
    }
    if (!s || s->freeable || s->state == CS_DEAD || s->peer_closed)
        return; /* (the remote that closed may have forgotten us already) */
    if (s->closed) {
        s->state = CS_DEAD;
        drop_send(s);
        s->freeable = 1;
    } else if (s->ended) {
        s->state = CS_DEAD;
        drop_send(s);
    } else {
        end(s, s->state == CS_SYN_SENT ? -ECONNREFUSED : -ECONNRESET);
    }
}

static void handle_syn(struct dg_utp *u, int path, const struct sockaddr *from, const struct hdr *h,
                       uint64_t now)
{
    uint16_t rid = (uint16_t)(h->conn_id + 1);
    struct dg_utp_sock *s = lookup(u, from, path, rid);
    int rc = -1;

    if (s) {
        if (!s->accepted || s->send_id != h->conn_id || s->freeable)
            return; /* an id of one of our own connections: let its SYN time out */
        if (s->state == CS_DEAD)
            reset_to(u, path, from, h->conn_id, h->seq);
        else
            send_state(s, now); /* the remote did not get our answer */
        return;
    }
    if (u->count >= DG_UTP_MAX_CONNS) {
        u->stats.overflow++;
        reset_to(u, path, from, h->conn_id, h->seq);
        return;
    }
    if (!(s = sock_new(u, from, path, now)))
        return;
    s->accepted = 1;
    s->recv_id = rid;
    s->send_id = h->conn_id;
    s->isn = s->seq_nr = s->snd_una = s->snd_next = next_isn(u);
    s->ack_nr = s->deliver_nr = h->seq;
    s->state = CS_CONNECTED;
    s->peer_wnd = h->wnd;
    s->reply_micro = (uint32_t)now - h->ts;
    sock_link(u, s);
    s->accepting = 1;
    if (u->ops.on_accept)
        CALLBACK(u, rc = u->ops.on_accept(u->arg, s));
    s->accepting = 0;
    if (rc != 0) {
        u->stats.refused++;
        send_reset(s, now);
        sock_free(u, s);
        return;
    }
    send_state(s, now);
    send_pending(s, now, 0);
}

/* Parses a datagram that passed dg_utp_is_packet. @return 0 or -EBADMSG. */
static int parse(const uint8_t *buf, size_t len, struct hdr *h)
{
    size_t pos = DG_UTP_HEADER_LEN;
    uint8_t ext = buf[1];

    memset(h, 0, sizeof(*h));
    h->type = buf[0] >> 4;
    h->conn_id = dg_get16(buf + 2);
    h->ts = dg_get32(buf + 4);
    h->ts_diff = dg_get32(buf + 8);
    h->wnd = dg_get32(buf + 12);
    h->seq = dg_get16(buf + 16);
    h->ack = dg_get16(buf + 18);
    /* Each extension takes at least two bytes, so the chain ends within the datagram. */
    while (ext) {
        uint8_t next, elen;
        if (len - pos < 2)
            return -EBADMSG;
        next = buf[pos];
        elen = buf[pos + 1];
        pos += 2;
        if (len - pos < elen)
            return -EBADMSG;
        if (ext == EXT_SACK) {
            if (elen == 0 || elen % 4)
                return -EBADMSG;
            if (!h->sack) {
                h->sack = buf + pos;
                h->sack_len = elen;
            }
        }
        pos += elen;
        ext = next;
    }
    h->payload = buf + pos;
    h->len = len - pos;
    return 0;
}

/* ---- timers ---- */

static void on_rto(struct dg_utp_sock *s, uint64_t now)
{
    struct pkt *first;

    if (s->snd_una == s->snd_next) {
        s->rto_at = 0;
        return;
    }
    first = s->ring[s->snd_una & s->ring_mask];
    if (s->last_heard_us > first->sent_us && s->peer_wnd < first->len && !first->sacked) {
        /* The peer answers but has no room for it: a window probe, not a loss. */
        if (!first->lost)
            mark_lost(s, first);
        transmit(s, s->snd_una, first, now);
        s->timeouts_in_row = 0;
        s->rto_at = now + s->rto;
        return;
    }
    s->u->stats.timeouts++;
    if (++s->timeouts_in_row > (s->closed ? CLOSE_TIMEOUTS : MAX_TIMEOUTS)) {
        if (s->closed) {
            s->freeable = 1;
        } else {
            send_reset(s, now);
            end(s, -ETIMEDOUT);
        }
        return;
    }
    s->rto = min32(2 * s->rto, MAX_RTO_US);
    s->ssthresh = max32(s->cwnd / 2, MIN_CWND_PACKETS * s->packet_size);
    s->cwnd = s->packet_size;
    s->slow_start = 1;
    s->in_recovery = 0;
    s->dup_acks = 0;
    for (uint16_t seq = s->snd_una; seq != s->snd_next; seq++) {
        struct pkt *p = s->ring[seq & s->ring_mask];
        if (!p->sacked && !p->lost)
            mark_lost(s, p);
    }
    s->rto_at = now + s->rto;
    s->tlp_at = 0;
    s->tlp_sent = 1; /* no probe before the next progress */
    s->fast_rexmit = 1;
    send_pending(s, now, 1);
}

/* No ACK for two RTTs: sends one packet, new if the peer has room, else the last one not
 * sacked, so that its ACK (with SACK) tells what was lost. */
static void tail_probe(struct dg_utp_sock *s, uint64_t now)
{
    s->tlp_at = 0;
    if (s->snd_una == s->snd_next || s->tlp_sent)
        return;
    s->tlp_sent = 1;
    if (s->snd_next != s->seq_nr) {
        struct pkt *p = s->ring[s->snd_next & s->ring_mask];
        if (s->pipe + p->len <= s->peer_wnd) {
            transmit(s, s->snd_next, p, now);
            s->snd_next++;
            return;
        }
    }
    for (uint16_t seq = (uint16_t)(s->snd_next - 1);; seq--) {
        struct pkt *p = s->ring[seq & s->ring_mask];
        if (!p->sacked) {
            transmit(s, seq, p, now);
            return;
        }
        if (seq == s->snd_una)
            return;
    }
}

static void conn_timers(struct dg_utp_sock *s, uint64_t now)
{
    /* A closing connection lingers at most this long without progress (a peer that answers
     * but never takes our data, e.g. its window stays shut). */
    uint64_t since = s->closed_at > s->progress_us ? s->closed_at : s->progress_us;

    if (s->ended || s->peer_closed)
        return;
    if (now - s->last_heard_us >= DG_UTP_IDLE_TIMEOUT_US ||
        (s->closed && now - since >= DG_UTP_IDLE_TIMEOUT_US)) {
        if (s->closed)
            s->freeable = 1;
        else
            end(s, -ETIMEDOUT);
        return;
    }
    if (s->rto_at && now >= s->rto_at) {
        on_rto(s, now);
        if (s->freeable || s->ended)
            return;
    }
    if (s->nsacked && detect_losses(s, now)) {
        on_loss(s);
        send_pending(s, now, 1);
    }
    if (s->tlp_at && now >= s->tlp_at) {
        tail_probe(s, now);
    }
    if (s->probe_at && now >= s->probe_at) {
        s->probe_at = 0;
        if (s->snd_una == s->snd_next && s->snd_next != s->seq_nr) {
            transmit(s, s->snd_next, s->ring[s->snd_next & s->ring_mask], now);
            s->snd_next++;
        }
    }
    send_pending(s, now, 1);
    if (now - s->last_sent_us >= DG_UTP_KEEPALIVE_US)
        send_state(s, now);
}

static void timers(struct dg_utp_sock *s, uint64_t now)
{
    if (s->freeable)
        return;
    if (s->state == CS_SYN_SENT) {
        if (now - s->connect_at >= DG_UTP_CONNECT_TIMEOUT_US) {
            end(s, -ETIMEDOUT);
        } else if (now >= s->syn_next_us) {
            send_syn(s, now);
            s->syn_tries++;
            s->syn_next_us = s->connect_at + ((1ull << s->syn_tries) - 1) * SYN_RETRY_US;
        }
    } else if (s->state == CS_CONNECTED) {
        conn_timers(s, now);
    }
}

/* ---- the API ---- */

int dg_utp_new(const struct dg_utp_ops *ops, void *arg, uint64_t seed, struct dg_utp **out)
{
    struct dg_utp *u = calloc(1, sizeof(*u));

    if (!u)
        return -ENOMEM;
    u->ops = *ops;
    u->arg = arg;
    u->rng = seed;
    u->hash_key = splitmix(&u->rng);
    *out = u;
    return 0;
}

void dg_utp_free(struct dg_utp *u)
{
    if (!u)
        return;
    while (u->socks)
        sock_free(u, u->socks);
    free(u);
}

int dg_utp_is_packet(const uint8_t *buf, size_t len)
{
    return buf && len >= DG_UTP_HEADER_LEN && (buf[0] & 15) == VERSION && buf[0] >> 4 <= ST_MAX;
}

int dg_utp_input(struct dg_utp *u, int path, const uint8_t *buf, size_t len,
                 const struct sockaddr *from, uint64_t now_us)
{
    struct dg_utp_sock *s;
    struct hdr h;

    if (!dg_utp_is_packet(buf, len))
        return 0;
    if (!addr_supported(from) || parse(buf, len, &h) < 0) {
        u->stats.malformed++;
        return 1;
    }
    u->stats.packets_in++;
    if (h.type == ST_SYN) {
        handle_syn(u, path, from, &h, now_us);
    } else if (h.type == ST_RESET) {
        handle_reset(u, path, from, &h);
    } else if ((s = lookup(u, from, path, h.conn_id))) {
        process(s, &h, now_us);
    } else {
        u->stats.unknown++;
        reset_to(u, path, from, h.conn_id, h.seq);
    }
    return 1;
}

void dg_utp_flush(struct dg_utp *u, uint64_t now_us)
{
    struct dg_utp_sock *s;

    while ((s = u->dirty)) {
        u->dirty = s->dnext;
        s->dnext = NULL;
        s->in_dirty = 0;
        if (s->state != CS_CONNECTED)
            continue;
        if (!s->freeable)
            send_pending(s, now_us, 1);
        if (s->ack_pending)
            send_state(s, now_us);
    }
}

void dg_utp_tick(struct dg_utp *u, uint64_t now_us)
{
    struct dg_utp_sock *s, *next;

    /* Callbacks may close or open connections meanwhile; nothing is freed in this pass. */
    for (s = u->socks; s; s = next) {
        next = s->next;
        timers(s, now_us);
    }
    if (u->depth)
        return;
    for (s = u->socks; s; s = next) {
        next = s->next;
        if (!s->freeable)
            continue;
        if (s->state == CS_CONNECTED && s->ack_pending)
            send_state(s, now_us);
        sock_free(u, s);
    }
}

int dg_utp_connect(struct dg_utp *u, int path, const struct sockaddr *to, uint64_t now_us,
                   struct dg_utp_sock **out)
{
    struct dg_utp_sock *s;
    uint16_t id = 0;
    int tries;

    if (!addr_supported(to))
        return -EAFNOSUPPORT;
    for (tries = 0; tries < 64; tries++) {
        id = (uint16_t)splitmix(&u->rng);
        if (!lookup(u, to, path, id))
            break;
    }
    if (tries == 64)
        return -EADDRINUSE;
    if (!(s = sock_new(u, to, path, now_us)))
        return -ENOMEM;
    s->recv_id = id;
    s->send_id = (uint16_t)(id + 1);
    s->isn = next_isn(u);
    s->seq_nr = s->snd_una = s->snd_next = (uint16_t)(s->isn + 1);
    s->state = CS_SYN_SENT;
    s->connect_at = now_us;
    sock_link(u, s);
    send_syn(s, now_us);
    s->syn_tries = 1;
    s->syn_next_us = now_us + SYN_RETRY_US;
    *out = s;
    return 0;
}

static int ensure_ring(struct dg_utp_sock *s)
{
    uint32_t need = DG_UTP_SEND_BUFFER / s->packet_size + 2, cap = 16;

    if (s->ring)
        return 1;
    while (cap < need)
        cap <<= 1;
    if (!(s->ring = calloc(cap, sizeof(*s->ring))))
        return 0;
    s->ring_mask = (uint16_t)(cap - 1);
    return 1;
}

static struct pkt *pkt_new(const struct dg_utp_sock *s, uint8_t type)
{
    size_t room = type == ST_DATA ? s->packet_size : 0;
    struct pkt *p = malloc(sizeof(*p) + DG_UTP_HEADER_LEN + room);

    if (!p)
        return NULL;
    memset(p, 0, sizeof(*p));
    p->type = type;
    return p;
}

long dg_utp_write(struct dg_utp_sock *s, const uint8_t *buf, size_t len, uint64_t now_us)
{
    size_t taken = 0;

    if (s->closed || s->ended || s->peer_closed || s->state == CS_DEAD)
        return -EPIPE;
    if (s->state == CS_SYN_SENT)
        return -ENOTCONN;
    if (!ensure_ring(s))
        return -ENOMEM;
    while (taken < len && s->send_queued < DG_UTP_SEND_BUFFER) {
        struct pkt *t = NULL;
        size_t n;
        if (s->seq_nr != s->snd_next) {
            t = s->ring[(uint16_t)(s->seq_nr - 1) & s->ring_mask];
            if (t->type != ST_DATA || t->len >= s->packet_size)
                t = NULL;
        }
        if (!t) {
            /* One slot stays free for the FIN. */
            if ((uint16_t)(s->seq_nr - s->snd_una) >= s->ring_mask)
                break;
            if (!(t = pkt_new(s, ST_DATA))) {
                if (!taken)
                    return -ENOMEM;
                break;
            }
            s->ring[s->seq_nr & s->ring_mask] = t;
            s->seq_nr++;
        }
        n = s->packet_size - t->len;
        if (n > len - taken)
            n = len - taken;
        if (n > DG_UTP_SEND_BUFFER - s->send_queued)
            n = DG_UTP_SEND_BUFFER - s->send_queued;
        memcpy(t->buf + DG_UTP_HEADER_LEN + t->len, buf + taken, n);
        t->len += (uint32_t)n;
        s->send_queued += (uint32_t)n;
        taken += n;
    }
    if (taken < len)
        s->want_writable = 1;
    send_pending(s, now_us, 0);
    if (s->snd_next != s->seq_nr)
        mark_dirty(s);
    return (long)taken;
}

void dg_utp_close(struct dg_utp_sock *s, uint64_t now_us)
{
    struct pkt *fin;

    if (s->closed)
        return;
    s->closed = 1;
    s->closed_at = now_us;
    s->want_writable = 0;
    if (s->state != CS_CONNECTED || s->ended || s->peer_closed) {
        s->freeable = 1;
        return;
    }
    deliver(s); /* drops what is held */
    if (!ensure_ring(s) || !(fin = pkt_new(s, ST_FIN))) {
        send_reset(s, now_us);
        s->state = CS_DEAD;
        drop_send(s);
        s->freeable = 1;
        return;
    }
    s->ring[s->seq_nr & s->ring_mask] = fin;
    s->seq_nr++;
    send_pending(s, now_us, 1);
}

void dg_utp_set_reading(struct dg_utp_sock *s, int reading, uint64_t now_us)
{
    reading = reading != 0;
    if (s->closed || s->reading == reading)
        return;
    s->reading = (uint8_t)reading;
    if (!reading)
        return;
    deliver(s);
    check_eof(s);
    if (s->state == CS_CONNECTED && !s->freeable)
        send_state(s, now_us); /* the window opened */
}

void dg_utp_sock_set_data(struct dg_utp_sock *s, void *data)
{
    s->data = data;
}

void *dg_utp_sock_data(const struct dg_utp_sock *s)
{
    return s->data;
}

void *dg_utp_arg(const struct dg_utp *u)
{
    return u->arg;
}

const struct sockaddr_storage *dg_utp_sock_addr(const struct dg_utp_sock *s)
{
    return &s->addr;
}

int dg_utp_sock_path(const struct dg_utp_sock *s)
{
    return s->path;
}

size_t dg_utp_count(const struct dg_utp *u)
{
    return u->count;
}

void dg_utp_set_next_seq(struct dg_utp *u, uint16_t seq)
{
    u->seq_set = 1;
    u->next_seq = seq;
}

void dg_utp_get_stats(const struct dg_utp *u, struct dg_utp_stats *out)
{
    *out = u->stats;
}

void dg_utp_sock_get_info(const struct dg_utp_sock *s, struct dg_utp_sock_info *out)
{
    memset(out, 0, sizeof(*out));
    out->rtt_us = s->srtt;
    out->rto_us = s->rto;
    out->cwnd = s->cwnd;
    out->peer_window = s->peer_wnd;
    out->in_flight = s->pipe + s->lost_bytes;
    out->send_queued = s->send_queued;
    out->bytes_in = s->bytes_in;
    out->bytes_out = s->bytes_out;
    out->retransmits = s->retransmits;
    out->recv_held = s->held_bytes;
    out->packet_size = s->packet_size;
}
