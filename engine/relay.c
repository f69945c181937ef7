/* The relay: splices two TCP connections that name the same nonce; see relay.h.
 *
 * Every accepted connection is an "end". An end first reads its preamble, which names a
 * session (a registered nonce) and a role in it. A session waits for its two ends, then runs:
 * what one end reads is written to the other. Reading an end stops while the other end has
 * more than HIGH_WATER bytes of writes not yet done (back-pressure), and while its token
 * bucket is empty (the rate limit). Nothing else is buffered except the early bytes of a
 * waiting end, at most DG_RELAY_EARLY_MAX, so a relay holds at most about
 * (HIGH_WATER + READ_CHUNK) * 2 bytes per stream.
 *
 * Lifetimes: an end is freed when both its handles (the socket and the throttle timer) are
 * closed, and leaves its session then. A session is freed once it is closing and has no end
 * left. The relay is freed once stopping, with its own two handles closed and no end left. */
#include "engine/relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/log.h"

#define READ_CHUNK (64u << 10)     /* the one read buffer, shared by every end */
#define HIGH_WATER (256u << 10)    /* stop reading an end when the other has this much queued */
#define LOW_WATER (HIGH_WATER / 2) /* and start again when that queue is down to this */
#define LINGER_MS 5000u            /* a closing end may flush its queue this long */
#define SWEEP_MAX_MS 1000u         /* deadlines are checked at least this often */
#define SWEEP_MIN_MS 10u
#define RATE_MAX (1ull << 40) /* bytes/s: a higher limit is no limit anyway */
#define BURST_MIN (16u << 10) /* the smallest token bucket, bytes */
#define PENDING_SLACK 16      /* connections in their preamble: 2 per stream, plus this */
#define LISTEN_BACKLOG 128

enum state {
    WAITING, /* registered, not both ends there */
    RUNNING, /* both ends there, bytes flow */
    CLOSING, /* over: its ends are flushing or closing */
};

/* One registered nonce, and the stream it becomes. */
struct session {
    struct dg_relay *r;
    struct session *prev, *next; /* r->sessions */
    uint8_t nonce[DG_RELAY_NONCE_LEN];
    struct end *end[2]; /* by role */
    enum state state;
    uint64_t since;  /* uv_now when it entered its state */
    uint64_t active; /* uv_now when it last moved a byte */
};

/* One accepted connection. */
struct end {
    struct dg_relay *r;
    struct end *prev, *next; /* r->ends */
    struct session *s;       /* NULL until the preamble names a session */
    int role;                /* 0: initiator, 1: responder (once s is set) */
    uv_tcp_t tcp;
    uv_timer_t throttle; /* resumes reading when the bucket has tokens again */
    uv_shutdown_t shutdown;
    int handles;  /* handles not yet closed */
    int pending;  /* counted in r->npending (no session yet) */
    int closing;  /* uv_close called */
    int shutting; /* a shutdown is in flight */
    int reading;
    uint8_t pre[DG_RELAY_PREAMBLE_LEN];
    size_t prelen;
    uint8_t *early; /* read while the session waits for the other end */
    size_t early_len;
    size_t queued;     /* writes to this end not yet done: bytes plus WRITE_COST each */
    int64_t credit;    /* the bucket of what is read from this end, in 1/1000 bytes */
    uint64_t refilled; /* uv_now when credit was last refilled */
    uint64_t accepted; /* uv_now at accept */
};

/* A write to an end, with its bytes. */
struct write_req {
    uv_write_t req;
    size_t len;
    uint8_t data[];
};

/* What a write costs beyond its bytes, counted against HIGH_WATER so that many small reads
 * cannot pile up many requests. */
#define WRITE_COST sizeof(struct write_req)

struct dg_relay {
    uv_loop_t *loop;
    struct dg_relay_config cfg;
    uv_tcp_t listener;
    uv_timer_t sweep;
    uint16_t port;
    uint64_t pair_ms, idle_ms;
    int64_t burst; /* bucket size, in 1/1000 bytes */
    size_t pending_max;
    struct session *sessions;
    struct end *ends;
    size_t nends, npending, nwaiting, nrunning;
    size_t buffered;
    uint64_t streams_total, bytes, refused, expired;
    int own_handles; /* listener and sweep timer not yet closed */
    int stopping;
    void (*closed)(void *arg);
    void *closed_arg;
    uint8_t rbuf[READ_CHUNK];
};

void dg_relay_preamble(int role, const uint8_t nonce[DG_RELAY_NONCE_LEN],
                       uint8_t out[DG_RELAY_PREAMBLE_LEN])
{
    memcpy(out, DG_RELAY_MAGIC, 8);
    out[8] = (uint8_t)role;
    memcpy(out + 9, nonce, DG_RELAY_NONCE_LEN);
}

static void update_reading(struct end *e);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

/* ---- lifetimes ---- */

/* The other end of @p e's session (NULL when there is none yet, or no longer). */
static struct end *peer_of(const struct end *e)
{
    return e->s ? e->s->end[!e->role] : NULL;
}

/* How often deadlines are checked: a quarter of the shortest timeout, within limits. */
static uint64_t sweep_interval(const struct dg_relay *r)
{
    uint64_t t = (r->pair_ms < r->idle_ms ? r->pair_ms : r->idle_ms) / 4;

    if (t > SWEEP_MAX_MS)
        t = SWEEP_MAX_MS;
    return t < SWEEP_MIN_MS ? SWEEP_MIN_MS : t;
}

static void on_sweep(uv_timer_t *t);

/* Makes sure the sweep timer runs (it stops itself when there is nothing to watch). */
static void arm_sweep(struct dg_relay *r)
{
    uint64_t t = sweep_interval(r);

    if (!r->stopping && !uv_is_active((uv_handle_t *)&r->sweep))
        uv_timer_start(&r->sweep, on_sweep, t, t);
}

/* Frees @p r once it is stopping and every handle is closed, after the closed callback. */
static void maybe_free_relay(struct dg_relay *r)
{
    if (!r->stopping || r->own_handles > 0 || r->nends > 0)
        return;
    if (r->closed)
        r->closed(r->closed_arg);
    free(r);
}

/* Unlinks and frees a session. */
static void session_free(struct session *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        s->r->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s);
}

/* Close callback of an end's handles: frees the end after the last one. */
static void end_closed(uv_handle_t *h)
{
    struct end *e = h->data;
    struct dg_relay *r = e->r;
    struct session *s = e->s;

    if (--e->handles > 0)
        return;
    if (s) {
        s->end[e->role] = NULL;
        if (s->state == CLOSING && !s->end[0] && !s->end[1])
            session_free(s);
    }
    if (e->prev)
        e->prev->next = e->next;
    else
        r->ends = e->next;
    if (e->next)
        e->next->prev = e->prev;
    r->nends--;
    if (e->pending)
        r->npending--;
    r->buffered -= e->early_len;
    free(e->early);
    free(e);
    maybe_free_relay(r);
}

/* Closes both handles of @p e, which cancels its writes and shutdown; frees it later. */
static void end_close(struct end *e)
{
    if (e->closing)
        return;
    e->closing = 1;
    e->reading = 0;
    uv_close((uv_handle_t *)&e->tcp, end_closed);
    uv_close((uv_handle_t *)&e->throttle, end_closed);
}

/* Shutdown callback: the writes queued before it are done (or were cancelled); close. */
static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct end *e = req->handle->data;

    (void)status;
    e->shutting = 0;
    end_close(e);
}

/* Ends @p e: at once when @p now or nothing waits to be written to it, else once its queue
 * is written (the shutdown sends a FIN after the last byte; the sweep caps the wait). */
static void end_finish(struct end *e, int now)
{
    if (e->closing)
        return;
    if (e->reading) {
        uv_read_stop((uv_stream_t *)&e->tcp);
        e->reading = 0;
    }
    uv_timer_stop(&e->throttle);
    if (now || e->queued == 0) {
        end_close(e);
        return;
    }
    if (e->shutting)
        return;
    if (uv_shutdown(&e->shutdown, (uv_stream_t *)&e->tcp, on_shutdown) < 0)
        end_close(e);
    else
        e->shutting = 1;
}

/* Ends session @p s: @p broken (an end of it, or NULL) is closed at once, the other ends
 * after writing what was already read for them, or at once if @p now. A session without
 * ends is freed here; one with ends when they are freed. Safe on a closing session. */
static void session_close(struct session *s, struct end *broken, int now)
{
    struct dg_relay *r = s->r;

    if (s->state != CLOSING) {
        if (s->state == WAITING)
            r->nwaiting--;
        else
            r->nrunning--;
        s->state = CLOSING;
        s->since = uv_now(r->loop);
    }
    if (broken)
        end_close(broken);
    for (int i = 0; i < 2; i++) {
        if (s->end[i])
            end_finish(s->end[i], now);
    }
    if (!s->end[0] && !s->end[1])
        session_free(s);
}

/* Ends @p e after a failure of its own: its session too, if it has one. */
static void end_fail(struct end *e)
{
    if (e->s)
        session_close(e->s, e, 0);
    else
        end_close(e);
}

/* Refuses the connection @p e: closes it and counts it. */
static void refuse(struct end *e, const char *why)
{
    e->r->refused++;
    dg_log(DG_LOG_DEBUG, "relay", "connection refused: %s", why);
    end_close(e);
}

/* ---- reading and writing ---- */

/* Adds to @p e's bucket the tokens earned since the last refill. */
static void refill(struct end *e)
{
    struct dg_relay *r = e->r;
    uint64_t now = uv_now(r->loop), ms = now - e->refilled;

    e->refilled = now;
    if (ms >= 100000 || (uint64_t)(r->burst - e->credit) <= ms * r->cfg.rate)
        e->credit = r->burst; /* ms * rate cannot overflow: rate <= RATE_MAX */
    else
        e->credit += (int64_t)(ms * r->cfg.rate);
}

/* Throttle timer: @p e may have tokens again. */
static void on_throttle(uv_timer_t *t)
{
    update_reading(t->data);
}

/* Starts or stops reading @p e as its state, the other end's queue and the rate allow. When
 * the rate is what stops it, arms the throttle timer for when tokens are there again. */
static void update_reading(struct end *e)
{
    struct dg_relay *r = e->r;
    struct end *peer = peer_of(e);
    int want = !e->closing && !(e->s && e->s->state == CLOSING);
    int rc;

    if (want && e->s && e->s->state == RUNNING)
        want = peer && peer->queued <= (e->reading ? HIGH_WATER : LOW_WATER);
    if (want && r->cfg.rate) {
        refill(e);
        if (e->credit < 0) {
            uint64_t ms = (uint64_t)(-e->credit) / r->cfg.rate + 1;
            want = 0;
            if (!uv_is_active((uv_handle_t *)&e->throttle))
                uv_timer_start(&e->throttle, on_throttle, ms, 0);
        }
    }
    if (want && !e->reading) {
        rc = uv_read_start((uv_stream_t *)&e->tcp, on_alloc, on_read);
        if (rc < 0) {
            dg_log(DG_LOG_DEBUG, "relay", "cannot read: %s", uv_strerror(rc));
            end_fail(e);
            return;
        }
        e->reading = 1;
    } else if (!want && e->reading) {
        uv_read_stop((uv_stream_t *)&e->tcp);
        e->reading = 0;
    }
}

/* Write callback: the bytes are out (or the end is closing); the source may read again. */
static void on_write(uv_write_t *req, int status)
{
    struct write_req *w = (struct write_req *)req;
    struct end *dst = req->handle->data, *src;

    dst->queued -= w->len + WRITE_COST;
    dst->r->buffered -= w->len;
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED && !dst->closing) {
            dg_log(DG_LOG_DEBUG, "relay", "write failed: %s", uv_strerror(status));
            end_fail(dst);
        }
        return;
    }
    if (dst->s && dst->s->state == RUNNING)
        dst->s->active = uv_now(dst->r->loop);
    src = peer_of(dst);
    if (src)
        update_reading(src);
}

/* Queues a copy of [p, p + n) to be written to @p dst. @return 0, -ENOMEM or a uv_write
 * error. */
static int forward(struct end *dst, const uint8_t *p, size_t n)
{
    struct write_req *w = malloc(sizeof(*w) + n);
    uv_buf_t b;
    int rc;

    if (!w)
        return -ENOMEM;
    w->len = n;
    memcpy(w->data, p, n);
    b = uv_buf_init((char *)w->data, (unsigned)n);
    rc = uv_write(&w->req, (uv_stream_t *)&dst->tcp, &b, 1, on_write);
    if (rc < 0) {
        free(w);
        return rc;
    }
    dst->queued += n + WRITE_COST;
    dst->r->buffered += n;
    dst->r->bytes += n;
    return 0;
}

/* Both ends of @p s are there: writes each one's early bytes to the other, and lets bytes
 * flow. */
static void start_stream(struct session *s)
{
    struct dg_relay *r = s->r;
    int rc = 0;

    r->nwaiting--;
    r->nrunning++;
    r->streams_total++;
    s->state = RUNNING;
    s->since = s->active = uv_now(r->loop);
    for (int i = 0; i < 2; i++) {
        struct end *e = s->end[i];
        if (e->early_len > 0 && rc == 0)
            rc = forward(s->end[!i], e->early, e->early_len);
        r->buffered -= e->early_len;
        free(e->early);
        e->early = NULL;
        e->early_len = 0;
    }
    if (rc < 0) {
        dg_log(DG_LOG_DEBUG, "relay", "cannot start a stream: %s", uv_strerror(rc));
        session_close(s, NULL, 1);
        return;
    }
    dg_log(DG_LOG_DEBUG, "relay", "stream started (%zu running)", r->nrunning);
    update_reading(s->end[0]);
    update_reading(s->end[1]);
}

/* The registered, unexpired session of @p nonce, or NULL. A session found past its time
 * expires here rather than at the next sweep. */
static struct session *lookup(struct dg_relay *r, const uint8_t nonce[DG_RELAY_NONCE_LEN])
{
    for (struct session *s = r->sessions; s; s = s->next) {
        if (s->state == CLOSING || memcmp(s->nonce, nonce, DG_RELAY_NONCE_LEN) != 0)
            continue;
        if (s->state == WAITING && uv_now(r->loop) - s->since >= r->pair_ms) {
            r->expired++;
            session_close(s, NULL, 1);
            return NULL;
        }
        return s;
    }
    return NULL;
}

/* @p e has sent its whole preamble: joins it to its session. @return 0, or -EBADMSG (bad
 * magic or role), -ENOENT (nonce unknown or expired), -EEXIST (role taken). */
static int attach(struct end *e)
{
    struct dg_relay *r = e->r;
    struct session *s;
    int role = e->pre[8];

    if (memcmp(e->pre, DG_RELAY_MAGIC, 8) != 0 ||
        (role != DG_RELAY_ROLE_INITIATOR && role != DG_RELAY_ROLE_RESPONDER))
        return -EBADMSG;
    s = lookup(r, e->pre + 9);
    if (!s)
        return -ENOENT;
    if (s->state != WAITING || s->end[role - 1])
        return -EEXIST;
    e->pending = 0;
    r->npending--;
    e->s = s;
    e->role = role - 1;
    s->end[e->role] = e;
    if (s->end[!e->role])
        start_stream(s);
    return 0;
}

/* Bytes @p e sent after its preamble: kept while its session waits, else written to the
 * other end. */
static void take_data(struct end *e, const uint8_t *p, size_t n)
{
    struct dg_relay *r = e->r;
    struct session *s = e->s;
    uint8_t *grown;
    int rc;

    if (r->cfg.rate)
        e->credit -= (int64_t)n * 1000;
    if (s->state == WAITING) {
        if (n > DG_RELAY_EARLY_MAX - e->early_len) {
            r->refused++;
            dg_log(DG_LOG_DEBUG, "relay", "connection refused: over %u early bytes",
                   DG_RELAY_EARLY_MAX);
            session_close(s, e, 1);
            return;
        }
        grown = realloc(e->early, e->early_len + n);
        if (!grown) {
            session_close(s, e, 1);
            return;
        }
        memcpy(grown + e->early_len, p, n);
        e->early = grown;
        e->early_len += n;
        r->buffered += n;
        return;
    }
    if (s->state != RUNNING)
        return;
    s->active = uv_now(r->loop);
    rc = forward(peer_of(e), p, n);
    if (rc < 0) {
        dg_log(DG_LOG_DEBUG, "relay", "cannot forward: %s", uv_strerror(rc));
        session_close(s, NULL, 1);
    }
}

/* Allocation callback: every end reads into the relay's one buffer, which on_read empties
 * before the next read. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct end *e = h->data;

    (void)suggested;
    *buf = uv_buf_init((char *)e->r->rbuf, sizeof(e->r->rbuf));
}

/* Read callback: the preamble first, then data. */
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct end *e = stream->data;
    const uint8_t *p = (const uint8_t *)buf->base;
    size_t n, take;
    int rc;

    if (nread == 0 || e->closing)
        return;
    if (nread < 0) {
        if (!e->s) {
            refuse(e, "closed before its preamble");
        } else {
            dg_log(DG_LOG_DEBUG, "relay", "an end closed: %s", uv_strerror((int)nread));
            session_close(e->s, nread == UV_EOF ? NULL : e, 0);
        }
        return;
    }
    n = (size_t)nread;
    if (!e->s) {
        take = DG_RELAY_PREAMBLE_LEN - e->prelen;
        take = take < n ? take : n;
        memcpy(e->pre + e->prelen, p, take);
        e->prelen += take;
        p += take;
        n -= take;
        if (e->prelen < DG_RELAY_PREAMBLE_LEN)
            return;
        rc = attach(e);
        if (rc < 0) {
            refuse(e, rc == -EBADMSG  ? "bad preamble"
                      : rc == -ENOENT ? "unknown nonce"
                                      : "role taken");
            return;
        }
    }
    if (n > 0 && !e->closing)
        take_data(e, p, n);
    if (!e->closing)
        update_reading(e);
}

/* ---- the listener and the deadlines ---- */

/* A new connection: accepted, and read until its preamble is complete. */
static void on_connection(uv_stream_t *server, int status)
{
    struct dg_relay *r = server->data;
    struct end *e;

    if (status < 0) {
        dg_log(DG_LOG_WARN, "relay", "accept: %s", uv_strerror(status));
        return;
    }
    e = calloc(1, sizeof(*e));
    if (!e) {
        dg_log(DG_LOG_ERROR, "relay", "accept: out of memory");
        return;
    }
    e->r = r;
    uv_tcp_init(r->loop, &e->tcp);
    uv_timer_init(r->loop, &e->throttle);
    e->tcp.data = e->throttle.data = e;
    e->handles = 2;
    e->next = r->ends;
    if (r->ends)
        r->ends->prev = e;
    r->ends = e;
    r->nends++;
    if (uv_accept(server, (uv_stream_t *)&e->tcp) < 0) {
        end_close(e);
        return;
    }
    if (r->npending >= r->pending_max) {
        refuse(e, "too many connections without a preamble");
        return;
    }
    e->pending = 1;
    r->npending++;
    e->accepted = e->refilled = uv_now(r->loop);
    e->credit = r->burst;
    uv_tcp_nodelay(&e->tcp, 1);
    update_reading(e);
    arm_sweep(r);
}

/* Sweep timer: drops connections without a preamble in time, expired nonces, idle streams
 * and ends that took too long to flush; stops when nothing is left to watch. */
static void on_sweep(uv_timer_t *t)
{
    struct dg_relay *r = t->data;
    uint64_t now = uv_now(r->loop);
    struct session *s, *snext;
    struct end *e;

    for (e = r->ends; e; e = e->next) {
        if (e->pending && !e->closing && now - e->accepted >= r->pair_ms)
            refuse(e, "no preamble in time");
    }
    for (s = r->sessions; s; s = snext) {
        snext = s->next;
        if (s->state == WAITING && now - s->since >= r->pair_ms) {
            r->expired++;
            dg_log(DG_LOG_DEBUG, "relay", "a nonce expired");
            session_close(s, NULL, 1);
        } else if (s->state == RUNNING && now - s->active >= r->idle_ms) {
            dg_log(DG_LOG_DEBUG, "relay", "a stream was idle too long");
            session_close(s, NULL, 0);
        } else if (s->state == CLOSING && now - s->since >= LINGER_MS) {
            session_close(s, NULL, 1);
        }
    }
    if (!r->sessions && r->npending == 0)
        uv_timer_stop(t);
}

/* Close callback of the listener and the sweep timer. */
static void own_closed(uv_handle_t *h)
{
    struct dg_relay *r = h->data;

    r->own_handles--;
    maybe_free_relay(r);
}

int dg_relay_start(uv_loop_t *loop, const struct dg_relay_config *cfg, struct dg_relay **out)
{
    struct dg_relay *r;
    struct sockaddr_in any;
    struct sockaddr_storage bound;
    int len = sizeof(bound), rc;

    if (cfg->max_streams == 0)
        return -EINVAL;
    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->loop = loop;
    r->cfg = *cfg;
    if (r->cfg.rate > RATE_MAX)
        r->cfg.rate = RATE_MAX;
    r->burst = (int64_t)(r->cfg.rate / 4 > BURST_MIN ? r->cfg.rate / 4 : BURST_MIN) * 1000;
    r->pair_ms = DG_RELAY_PAIR_TIMEOUT_MS;
    r->idle_ms = DG_RELAY_IDLE_MS;
    r->pending_max = cfg->max_streams > (SIZE_MAX - PENDING_SLACK) / 2
                         ? SIZE_MAX
                         : cfg->max_streams * 2 + PENDING_SLACK;
    uv_tcp_init(loop, &r->listener);
    uv_timer_init(loop, &r->sweep);
    r->listener.data = r->sweep.data = r;
    r->own_handles = 2;
    uv_ip4_addr("0.0.0.0", cfg->port, &any);
    rc = uv_tcp_bind(&r->listener, (const struct sockaddr *)&any, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&r->listener, LISTEN_BACKLOG, on_connection);
    if (rc == 0)
        rc = uv_tcp_getsockname(&r->listener, (struct sockaddr *)&bound, &len);
    if (rc < 0) {
        dg_log(DG_LOG_WARN, "relay", "cannot listen on TCP port %u: %s", cfg->port,
               uv_strerror(rc));
        r->stopping = 1;
        uv_close((uv_handle_t *)&r->listener, own_closed);
        uv_close((uv_handle_t *)&r->sweep, own_closed);
        return rc;
    }
    r->port = ntohs(((const struct sockaddr_in *)&bound)->sin_port);
    dg_log(DG_LOG_INFO, "relay", "relay on TCP port %u (%zu streams at most)", r->port,
           cfg->max_streams);
    *out = r;
    return 0;
}

uint16_t dg_relay_port(const struct dg_relay *r)
{
    return r->port;
}

int dg_relay_expect(struct dg_relay *r, const uint8_t nonce[DG_RELAY_NONCE_LEN])
{
    struct session *s;

    if (r->stopping)
        return -EBUSY;
    if (lookup(r, nonce))
        return -EEXIST;
    if (r->nwaiting + r->nrunning >= r->cfg.max_streams)
        return -EBUSY;
    s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->r = r;
    memcpy(s->nonce, nonce, DG_RELAY_NONCE_LEN);
    s->state = WAITING;
    s->since = uv_now(r->loop);
    s->next = r->sessions;
    if (r->sessions)
        r->sessions->prev = s;
    r->sessions = s;
    r->nwaiting++;
    arm_sweep(r);
    return 0;
}

void dg_relay_get_stats(const struct dg_relay *r, struct dg_relay_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->streams = r->nrunning;
    out->waiting = r->nwaiting;
    out->streams_total = r->streams_total;
    out->bytes = r->bytes;
    out->refused = r->refused;
    out->expired = r->expired;
    out->buffered = r->buffered;
}

void dg_relay_set_timeouts_for_test(struct dg_relay *r, uint64_t pair_ms, uint64_t idle_ms)
{
    r->pair_ms = pair_ms ? pair_ms : DG_RELAY_PAIR_TIMEOUT_MS;
    r->idle_ms = idle_ms ? idle_ms : DG_RELAY_IDLE_MS;
    if (uv_is_active((uv_handle_t *)&r->sweep)) {
        uv_timer_stop(&r->sweep);
        arm_sweep(r);
    }
}

void dg_relay_stop(struct dg_relay *r, void (*closed)(void *arg), void *arg)
{
    struct session *s, *snext;

    if (!r || r->stopping)
        return;
    r->stopping = 1;
    r->closed = closed;
    r->closed_arg = arg;
    for (s = r->sessions; s; s = snext) {
        snext = s->next;
        session_close(s, NULL, 1);
    }
    for (struct end *e = r->ends; e; e = e->next)
        end_close(e);
    uv_close((uv_handle_t *)&r->listener, own_closed);
    uv_close((uv_handle_t *)&r->sweep, own_closed);
}
