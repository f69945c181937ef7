/* A peer wire connection over TCP: see peer_conn.h. */
#include "engine/peer_conn.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define READ_CHUNK (256u << 10) /* room offered to each read */
#define TICK_MS 2000u           /* how often the timers are checked */

struct write_buf {
    uint8_t *data;
    size_t len, cap;
};

struct dg_peer_conn {
    uv_tcp_t tcp;
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
    uint64_t opened_at, last_in, last_out;
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

void dg_peer_conn_close(struct dg_peer_conn *c, enum dg_peer_close_reason reason)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->ops->on_close(c, reason);
    uv_close((uv_handle_t *)&c->timer, handle_closed);
    uv_close((uv_handle_t *)&c->tcp, handle_closed); /* cancels a pending connect or write */
}

static void on_tick(uv_timer_t *t)
{
    struct dg_peer_conn *c = t->data;
    uint64_t now = uv_now(t->loop);

    if (!c->connected)
        return; /* the connect itself has the kernel's timeout */
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

static void start_write(struct dg_peer_conn *c)
{
    struct write_buf tmp;
    uv_buf_t buf;
    int rc;

    if (c->writing || c->closing || !c->connected || c->queue.len == 0)
        return;
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
    c->last_out = uv_now(c->tcp.loop);
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

static int start_reading(struct dg_peer_conn *c)
{
    c->connected = 1;
    c->opened_at = c->last_in = c->last_out = uv_now(c->tcp.loop);
    uv_tcp_nodelay(&c->tcp, 1);
    return uv_read_start((uv_stream_t *)&c->tcp, alloc_read, on_read);
}

static struct dg_peer_conn *conn_new(uv_loop_t *loop, const struct dg_peer_conn_ops *ops,
                                     void *owner)
{
    struct dg_peer_conn *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->ops = ops;
    c->owner = owner;
    uv_tcp_init(loop, &c->tcp);
    uv_timer_init(loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    uv_timer_start(&c->timer, on_tick, TICK_MS, TICK_MS);
    return c;
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

int dg_peer_conn_connect(uv_loop_t *loop, const struct sockaddr *addr,
                         const struct dg_peer_conn_ops *ops, void *owner, struct dg_peer_conn **out)
{
    struct dg_peer_conn *c;
    size_t len =
        addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    int rc;

    if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6)
        return -EINVAL;
    c = conn_new(loop, ops, owner);
    if (!c)
        return -ENOMEM;
    memcpy(&c->addr, addr, len);
    c->outgoing = 1;
    c->connect.data = c;
    rc = uv_tcp_connect(&c->connect, &c->tcp, addr, on_connect);
    if (rc < 0) {
        c->closing = 1; /* no on_close: the caller learns from the return value */
        uv_close((uv_handle_t *)&c->timer, handle_closed);
        uv_close((uv_handle_t *)&c->tcp, handle_closed);
        return rc;
    }
    *out = c;
    return 0;
}

int dg_peer_conn_accept(uv_stream_t *server, const struct dg_peer_conn_ops *ops, void *owner,
                        struct dg_peer_conn **out)
{
    struct dg_peer_conn *c = conn_new(server->loop, ops, owner);
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
        c->closing = 1;
        uv_close((uv_handle_t *)&c->timer, handle_closed);
        uv_close((uv_handle_t *)&c->tcp, handle_closed);
        return rc;
    }
    *out = c;
    return 0;
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
