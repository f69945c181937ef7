/* A peer wire connection over TCP, uTP or a relay: see peer_conn.h. */
#include "engine/peer_conn.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/utp.h"

#define READ_CHUNK (256u << 10) /* room offered to each read */
#define TICK_MS 2000u           /* how often the timers are checked */

struct write_buf {
    uint8_t *data;
    size_t len, cap;
};

struct dg_peer_conn {
    enum dg_peer_transport transport;
    uv_loop_t *loop;
    uv_tcp_t tcp;            /* TCP and relay */
    struct dg_utp_sock *utp; /* uTP; NULL once handed back to the uTP module */
    int punched;             /* the uTP path was opened by hole punching */
    uv_timer_t timer;
    uv_connect_t connect;
    uv_write_t write;
    const struct dg_peer_conn_ops *ops;
    void *owner, *data;
    struct sockaddr_storage addr;
    int outgoing;
    int connected;  /* the socket is open */
    int handshaken; /* the remote's handshake was accepted */
    int closing;    /* on_close ran (or is running) */
    int handles;    /* handles still to close before freeing */
    int writing;    /* a uv_write is in flight with @c inflight */
    int above_low;  /* the queue went over the low-water mark since on_drained */
    uint8_t *rbuf;
    size_t rlen, rcap;
    struct write_buf queue, inflight;
    uint64_t created_at, opened_at, last_in, last_out;
    uint64_t bytes_in, bytes_out;
};

const char *dg_peer_close_reason_name(enum dg_peer_close_reason reason)
{
    switch (reason) {
    case DG_PEER_CLOSE_LOCAL:
        return "closed here";
    case DG_PEER_CLOSE_EOF:
        return "closed by the peer";
    case DG_PEER_CLOSE_CONNECT:
        return "connection failed";
    case DG_PEER_CLOSE_MALFORMED:
        return "malformed message";
    case DG_PEER_CLOSE_HANDSHAKE:
        return "bad or missing handshake";
    case DG_PEER_CLOSE_TIMEOUT:
        return "silent too long";
    case DG_PEER_CLOSE_PROTOCOL:
        return "protocol violation";
    case DG_PEER_CLOSE_BAD_DATA:
        return "data failed verification";
    }
    return "unknown";
}

static void handle_closed(uv_handle_t *h)
{
    struct dg_peer_conn *c = h->data;

    if (--c->handles > 0)
        return;
    free(c->rbuf);
    free(c->queue.data);
    free(c->inflight.data);
    free(c);
}

static uint64_t now_us(void)
{
    return uv_hrtime() / 1000;
}

void dg_peer_conn_close(struct dg_peer_conn *c, enum dg_peer_close_reason reason)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->ops->on_close(c, reason);
    uv_close((uv_handle_t *)&c->timer, handle_closed);
    if (c->transport == DG_PEER_TRANSPORT_UTP) {
        if (c->utp) {
            dg_utp_sock_set_data(c->utp, NULL);
            dg_utp_close(c->utp, now_us()); /* what was written still goes out, then a FIN */
            c->utp = NULL;
        }
    } else {
        uv_close((uv_handle_t *)&c->tcp, handle_closed); /* cancels a pending connect or write */
    }
}

static void on_tick(uv_timer_t *t)
{
    struct dg_peer_conn *c = t->data;
    uint64_t now = uv_now(t->loop);

    if (!c->connected) {
        if (now - c->created_at >= DG_PEER_CONN_CONNECT_MS)
            dg_peer_conn_close(c, DG_PEER_CLOSE_CONNECT);
        return;
    }
    if (!c->handshaken && now - c->opened_at >= DG_PEER_CONN_HANDSHAKE_MS) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_HANDSHAKE);
        return;
    }
    if (now - c->last_in >= DG_PEER_CONN_IDLE_MS) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_TIMEOUT);
        return;
    }
    if (c->handshaken && now - c->last_out >= DG_PEER_CONN_KEEPALIVE_MS) {
        static const uint8_t keepalive[4];
        dg_peer_conn_send(c, keepalive, sizeof(keepalive));
    }
}

static void start_write(struct dg_peer_conn *c);

static void write_done(uv_write_t *req, int status)
{
    struct dg_peer_conn *c = req->data;

    c->writing = 0;
    if (status < 0) {
        if (status != UV_ECANCELED)
            dg_peer_conn_close(c, DG_PEER_CLOSE_EOF);
        return;
    }
    c->bytes_out += c->inflight.len;
    c->inflight.len = 0;
    if (c->closing)
        return;
    start_write(c);
    if (dg_peer_conn_queued(c) < DG_PEER_CONN_LOW_WATER && c->ops->on_drained)
        c->ops->on_drained(c);
}

/* Hands the uTP module what it takes of the queue. */
static void utp_push(struct dg_peer_conn *c)
{
    size_t done = 0;

    while (done < c->queue.len) {
        long n = dg_utp_write(c->utp, c->queue.data + done, c->queue.len - done, now_us());
        if (n <= 0)
            break; /* full (on_writable follows), or ended (on_end follows) */
        done += (size_t)n;
    }
    if (done == 0)
        return;
    memmove(c->queue.data, c->queue.data + done, c->queue.len - done);
    c->queue.len -= done;
    c->bytes_out += done;
    c->last_out = uv_now(c->loop);
}

static void start_write(struct dg_peer_conn *c)
{
    struct write_buf tmp;
    uv_buf_t buf;
    int rc;

    if (c->writing || c->closing || !c->connected || c->queue.len == 0)
        return;
    if (c->transport == DG_PEER_TRANSPORT_UTP) {
        utp_push(c);
        return;
    }
    /* The queue becomes the buffer in flight; the old one is reused for new bytes. */
    tmp = c->inflight;
    c->inflight = c->queue;
    c->queue = tmp;
    c->queue.len = 0;
    buf = uv_buf_init((char *)c->inflight.data, (unsigned)c->inflight.len);
    c->write.data = c;
    rc = uv_write(&c->write, (uv_stream_t *)&c->tcp, &buf, 1, write_done);
    if (rc < 0) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_EOF);
        return;
    }
    c->writing = 1;
    c->last_out = uv_now(c->loop);
}

int dg_peer_conn_send(struct dg_peer_conn *c, const void *buf, size_t len)
{
    if (c->closing)
        return 0;
    if (c->queue.cap - c->queue.len < len) {
        size_t cap = c->queue.cap ? c->queue.cap : 64u << 10;
        while (cap - c->queue.len < len)
            cap *= 2;
        uint8_t *p = realloc(c->queue.data, cap);
        if (!p) {
            dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
            return -ENOMEM;
        }
        c->queue.data = p;
        c->queue.cap = cap;
    }
    memcpy(c->queue.data + c->queue.len, buf, len);
    c->queue.len += len;
    start_write(c);
    return 0;
}

size_t dg_peer_conn_queued(const struct dg_peer_conn *c)
{
    return c->queue.len + c->inflight.len;
}

static void alloc_read(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct dg_peer_conn *c = h->data;
    size_t want = READ_CHUNK;

    (void)suggested;
    if (c->rcap - c->rlen < want) {
        size_t cap = c->rlen + want;
        uint8_t *p = realloc(c->rbuf, cap);
        if (!p) {
            *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS */
            return;
        }
        c->rbuf = p;
        c->rcap = cap;
    }
    *buf = uv_buf_init((char *)c->rbuf + c->rlen, (unsigned)(c->rcap - c->rlen));
}

/* Hands every whole message in the read buffer to the owner. */
static void process(struct dg_peer_conn *c)
{
    size_t pos = 0;

    if (!c->handshaken) {
        struct dg_peer_handshake hs;
        int rc = dg_peer_handshake_parse(c->rbuf, c->rlen, &hs);
        if (rc == -EAGAIN)
            return;
        if (rc < 0) {
            dg_peer_conn_close(c, DG_PEER_CLOSE_HANDSHAKE);
            return;
        }
        pos = DG_PEER_HANDSHAKE_LEN;
        rc = c->ops->on_handshake(c, &hs);
        if (rc != 0) {
            dg_peer_conn_close(c, (enum dg_peer_close_reason)rc);
            return;
        }
        c->handshaken = 1;
    }
    while (!c->closing) {
        size_t frame_len;
        struct dg_peer_msg m;
        int rc = dg_peer_msg_frame(c->rbuf + pos, c->rlen - pos, &frame_len);
        if (rc == -EAGAIN)
            break;
        if (rc == 0)
            rc = dg_peer_msg_parse(c->rbuf + pos, frame_len, &m);
        if (rc < 0) {
            dg_peer_conn_close(c, DG_PEER_CLOSE_MALFORMED);
            return;
        }
        pos += frame_len;
        if (m.type == DG_PEER_MSG_KEEPALIVE || m.type == DG_PEER_MSG_UNKNOWN)
            continue;
        rc = c->ops->on_message(c, &m);
        if (rc != 0) {
            dg_peer_conn_close(c, (enum dg_peer_close_reason)rc);
            return;
        }
    }
    if (c->closing)
        return;
    memmove(c->rbuf, c->rbuf + pos, c->rlen - pos);
    c->rlen -= pos;
    /* A big buffer left over from a large frame is given back. */
    if (c->rcap > 4 * READ_CHUNK && c->rlen < READ_CHUNK) {
        uint8_t *p = realloc(c->rbuf, READ_CHUNK + c->rlen);
        if (p) {
            c->rbuf = p;
            c->rcap = READ_CHUNK + c->rlen;
        }
    }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct dg_peer_conn *c = s->data;

    (void)buf;
    if (c->closing)
        return;
    if (n < 0) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_EOF);
        return;
    }
    c->rlen += (size_t)n;
    c->bytes_in += (uint64_t)n;
    c->last_in = uv_now(s->loop);
    process(c);
}

static void mark_open(struct dg_peer_conn *c)
{
    c->connected = 1;
    c->opened_at = c->last_in = c->last_out = uv_now(c->loop);
}

static int start_reading(struct dg_peer_conn *c)
{
    mark_open(c);
    uv_tcp_nodelay(&c->tcp, 1);
    return uv_read_start((uv_stream_t *)&c->tcp, alloc_read, on_read);
}

static struct dg_peer_conn *conn_new(uv_loop_t *loop, enum dg_peer_transport transport,
                                     const struct dg_peer_conn_ops *ops, void *owner)
{
    struct dg_peer_conn *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->transport = transport;
    c->loop = loop;
    c->ops = ops;
    c->owner = owner;
    c->created_at = uv_now(loop);
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->handles = 1;
    if (transport != DG_PEER_TRANSPORT_UTP) {
        uv_tcp_init(loop, &c->tcp);
        c->tcp.data = c;
        c->handles = 2;
    }
    uv_timer_start(&c->timer, on_tick, TICK_MS, TICK_MS);
    return c;
}

/* Frees a connection that never got to its owner (no on_close). */
static void conn_abort(struct dg_peer_conn *c)
{
    c->closing = 1;
    uv_close((uv_handle_t *)&c->timer, handle_closed);
    if (c->transport != DG_PEER_TRANSPORT_UTP)
        uv_close((uv_handle_t *)&c->tcp, handle_closed);
}

static void on_connect(uv_connect_t *req, int status)
{
    struct dg_peer_conn *c = req->data;

    if (c->closing)
        return;
    if (status < 0 || start_reading(c) < 0) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_CONNECT);
        return;
    }
    if (c->ops->on_connected)
        c->ops->on_connected(c);
    start_write(c); /* bytes queued before the connection was open */
}

static size_t sockaddr_size(const struct sockaddr *addr)
{
    return addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

/* A TCP connection to @p to; @p addr is what the owner sees as the remote's address. */
static int tcp_connect(uv_loop_t *loop, enum dg_peer_transport transport, const struct sockaddr *to,
                       const struct sockaddr *addr, int outgoing, const void *preamble,
                       size_t preamble_len, const struct dg_peer_conn_ops *ops, void *owner,
                       struct dg_peer_conn **out)
{
    struct dg_peer_conn *c;
    int rc;

    if ((to->sa_family != AF_INET && to->sa_family != AF_INET6) ||
        (addr->sa_family != AF_INET && addr->sa_family != AF_INET6))
        return -EINVAL;
    c = conn_new(loop, transport, ops, owner);
    if (!c)
        return -ENOMEM;
    memcpy(&c->addr, addr, sockaddr_size(addr));
    c->outgoing = outgoing;
    c->connect.data = c;
    rc = uv_tcp_connect(&c->connect, &c->tcp, to, on_connect);
    if (rc == 0 && preamble_len > 0 && dg_peer_conn_send(c, preamble, preamble_len) < 0)
        rc = -ENOMEM;
    if (rc < 0) {
        conn_abort(c); /* no on_close: the caller learns from the return value */
        return rc;
    }
    *out = c;
    return 0;
}

int dg_peer_conn_connect(uv_loop_t *loop, const struct sockaddr *addr,
                         const struct dg_peer_conn_ops *ops, void *owner, struct dg_peer_conn **out)
{
    return tcp_connect(loop, DG_PEER_TRANSPORT_TCP, addr, addr, 1, NULL, 0, ops, owner, out);
}

int dg_peer_conn_connect_relay(uv_loop_t *loop, const struct sockaddr *relay,
                               const struct sockaddr *peer, int initiator, const void *preamble,
                               size_t preamble_len, const struct dg_peer_conn_ops *ops, void *owner,
                               struct dg_peer_conn **out)
{
    return tcp_connect(loop, DG_PEER_TRANSPORT_RELAY, relay, peer, initiator, preamble,
                       preamble_len, ops, owner, out);
}

int dg_peer_conn_accept(uv_stream_t *server, const struct dg_peer_conn_ops *ops, void *owner,
                        struct dg_peer_conn **out)
{
    struct dg_peer_conn *c = conn_new(server->loop, DG_PEER_TRANSPORT_TCP, ops, owner);
    int len = sizeof(c ? c->addr : (struct sockaddr_storage){0});
    int rc;

    if (!c)
        return -ENOMEM;
    rc = uv_accept(server, (uv_stream_t *)&c->tcp);
    if (rc == 0)
        rc = uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->addr, &len);
    if (rc == 0)
        rc = start_reading(c);
    if (rc < 0) {
        conn_abort(c);
        return rc;
    }
    *out = c;
    return 0;
}

/* ---- uTP ---- */

int dg_peer_conn_connect_utp(uv_loop_t *loop, struct dg_utp *utp, int path,
                             const struct sockaddr *addr, int punched,
                             const struct dg_peer_conn_ops *ops, void *owner,
                             struct dg_peer_conn **out)
{
    struct dg_peer_conn *c;
    int rc;

    if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6)
        return -EINVAL;
    c = conn_new(loop, DG_PEER_TRANSPORT_UTP, ops, owner);
    if (!c)
        return -ENOMEM;
    memcpy(&c->addr, addr, sockaddr_size(addr));
    c->outgoing = 1;
    c->punched = punched;
    rc = dg_utp_connect(utp, path, addr, now_us(), &c->utp);
    if (rc < 0) {
        c->utp = NULL;
        conn_abort(c);
        return rc;
    }
    dg_utp_sock_set_data(c->utp, c);
    *out = c;
    return 0;
}

int dg_peer_conn_accept_utp(uv_loop_t *loop, struct dg_utp_sock *sock, int punched,
                            const struct dg_peer_conn_ops *ops, void *owner,
                            struct dg_peer_conn **out)
{
    struct dg_peer_conn *c = conn_new(loop, DG_PEER_TRANSPORT_UTP, ops, owner);
    const struct sockaddr_storage *a = dg_utp_sock_addr(sock);

    if (!c)
        return -ENOMEM;
    memcpy(&c->addr, a, sockaddr_size((const struct sockaddr *)a));
    c->utp = sock;
    c->punched = punched;
    dg_utp_sock_set_data(sock, c);
    mark_open(c);
    *out = c;
    return 0;
}

void dg_peer_conn_utp_connected(struct dg_utp_sock *s)
{
    struct dg_peer_conn *c = dg_utp_sock_data(s);

    if (!c || c->closing)
        return;
    mark_open(c);
    if (c->ops->on_connected)
        c->ops->on_connected(c);
    start_write(c);
}

void dg_peer_conn_utp_read(struct dg_utp_sock *s, const uint8_t *buf, size_t len)
{
    struct dg_peer_conn *c = dg_utp_sock_data(s);

    if (!c || c->closing)
        return;
    if (c->rcap - c->rlen < len) {
        size_t cap = c->rcap ? c->rcap : READ_CHUNK;
        while (cap - c->rlen < len)
            cap *= 2;
        uint8_t *p = realloc(c->rbuf, cap);
        if (!p) {
            dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
            return;
        }
        c->rbuf = p;
        c->rcap = cap;
    }
    memcpy(c->rbuf + c->rlen, buf, len);
    c->rlen += len;
    c->bytes_in += len;
    c->last_in = uv_now(c->loop);
    process(c);
}

void dg_peer_conn_utp_writable(struct dg_utp_sock *s)
{
    struct dg_peer_conn *c = dg_utp_sock_data(s);

    if (!c || c->closing)
        return;
    start_write(c);
    if (!c->closing && dg_peer_conn_queued(c) < DG_PEER_CONN_LOW_WATER && c->ops->on_drained)
        c->ops->on_drained(c);
}

void dg_peer_conn_utp_end(struct dg_utp_sock *s, int err)
{
    struct dg_peer_conn *c = dg_utp_sock_data(s);

    if (!c || c->closing)
        return;
    dg_peer_conn_close(c, c->connected || err == 0 ? DG_PEER_CLOSE_EOF : DG_PEER_CLOSE_CONNECT);
}

enum dg_peer_transport dg_peer_conn_transport(const struct dg_peer_conn *c)
{
    return c->transport;
}

int dg_peer_conn_punched(const struct dg_peer_conn *c)
{
    return c->punched;
}

void *dg_peer_conn_owner(const struct dg_peer_conn *c)
{
    return c->owner;
}

void *dg_peer_conn_data(const struct dg_peer_conn *c)
{
    return c->data;
}

void dg_peer_conn_set_data(struct dg_peer_conn *c, void *data)
{
    c->data = data;
}

const struct sockaddr_storage *dg_peer_conn_addr(const struct dg_peer_conn *c)
{
    return &c->addr;
}

int dg_peer_conn_outgoing(const struct dg_peer_conn *c)
{
    return c->outgoing;
}

uint64_t dg_peer_conn_bytes_in(const struct dg_peer_conn *c)
{
    return c->bytes_in;
}

uint64_t dg_peer_conn_bytes_out(const struct dg_peer_conn *c)
{
    return c->bytes_out;
}
