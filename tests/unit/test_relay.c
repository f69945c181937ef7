/* Unit tests for engine/relay.c: a real relay and its clients in one libuv loop.
 *
 * The relay listens on 0.0.0.0 with a port the kernel picks; the clients connect to
 * 127.0.0.1 only (tests/run-all.sh runs the suite in a network namespace with loopback only).
 * The loop runs with UV_RUN_ONCE until a condition holds or DEADLINE_MS pass (a 10 ms pulse
 * timer keeps it from blocking past the deadline). Timing checks are lower bounds only.
 *
 * Every byte a client sends after its preamble comes from a pattern (a PRNG keyed by a seed
 * and the offset in the stream), and the receiving client checks each byte against it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "engine/relay.h"

#define DEADLINE_MS 60000 /* safety limit of each wait; no test needs nearly as much */
#define NCLIENTS 8
#define CHUNK (64u << 10)      /* size of a client's writes */
#define SEND_WINDOW (1u << 20) /* bytes a client has in flight at most */
#define MIB (1u << 20)

struct lab;

struct client {
    struct lab *lab;
    uv_tcp_t tcp;
    uv_connect_t connect;
    int used;
    int connected; /* 1: connected, -1: failed */
    int ended;     /* a read returned EOF or an error: the relay closed it */
    int closing, closed;
    int reading;
    /* what it sends: out_target bytes of pattern out_seed */
    uint64_t out_seed, out_target, out_queued, out_done;
    size_t inflight;
    int close_when_sent;
    uint64_t last_done, done_at; /* when out_done last changed (uv_now) */
    /* what it receives: pattern in_seed */
    uint64_t in_seed, in_got;
    int in_bad;
};

struct lab {
    uv_loop_t loop;
    uv_timer_t pulse;
    struct dg_relay *relay;
    int stopped, relay_closed;
    uint16_t port;
    size_t max_buffered; /* the most the relay held at once */
    uint64_t deadline;
    struct client c[NCLIENTS];
    uint8_t rbuf[CHUNK], vbuf[CHUNK];
};

/* ---- the pattern ---- */

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Bytes [off, off + n) of the stream of @p seed. */
static void pattern(uint64_t seed, uint64_t off, uint8_t *buf, size_t n)
{
    uint64_t w = 0;

    for (size_t i = 0; i < n; i++) {
        uint64_t pos = off + i;
        if (i == 0 || (pos & 7) == 0)
            w = mix(seed * 0x9e3779b97f4a7c15ull + (pos >> 3));
        buf[i] = (uint8_t)(w >> (8 * (pos & 7)));
    }
}

static void make_nonce(uint8_t nonce[DG_RELAY_NONCE_LEN], int i)
{
    for (int k = 0; k < DG_RELAY_NONCE_LEN; k++)
        nonce[k] = (uint8_t)(i * 31 + k * 7 + 1);
}

/* ---- the loop ---- */

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000;
}

static void pulse_cb(uv_timer_t *t)
{
    (void)t;
}

static struct dg_relay_stats st(struct lab *lab)
{
    struct dg_relay_stats s;

    dg_relay_get_stats(lab->relay, &s);
    return s;
}

/* Whether @p c has sent some of its pattern, but none for 500 ms. */
static int stalled(struct lab *lab, const struct client *c)
{
    return c->out_done > 0 && c->out_done < c->out_target && uv_now(&lab->loop) - c->done_at >= 500;
}

static void lab_begin(struct lab *lab)
{
    lab->deadline = mono_ms() + DEADLINE_MS;
}

/* Runs one loop iteration and notes what the tests watch. @return 0 past the deadline. */
static int lab_step(struct lab *lab)
{
    uint64_t now;

    if (mono_ms() >= lab->deadline)
        return 0;
    uv_run(&lab->loop, UV_RUN_ONCE);
    now = uv_now(&lab->loop);
    if (lab->relay && !lab->stopped) {
        size_t b = st(lab).buffered;
        if (b > lab->max_buffered)
            lab->max_buffered = b;
    }
    for (int i = 0; i < NCLIENTS; i++) {
        struct client *c = &lab->c[i];
        if (c->used && c->out_done != c->last_done) {
            c->last_done = c->out_done;
            c->done_at = now;
        }
    }
    return 1;
}

/* Runs the loop until @p cond holds or the deadline passes; assert @p cond afterwards. */
#define RUN_UNTIL(lab, cond)             \
    do {                                 \
        lab_begin(lab);                  \
        while (!(cond) && lab_step(lab)) \
            ;                            \
    } while (0)

/* Runs the loop for @p ms (to let the relay read what was sent, where nothing shows it). */
static void spin(struct lab *lab, uint64_t ms)
{
    uint64_t end = mono_ms() + ms;

    RUN_UNTIL(lab, mono_ms() >= end);
}

static int lab_setup(void **state)
{
    struct lab *lab = calloc(1, sizeof(*lab));

    assert_non_null(lab);
    assert_int_equal(uv_loop_init(&lab->loop), 0);
    uv_timer_init(&lab->loop, &lab->pulse);
    uv_timer_start(&lab->pulse, pulse_cb, 10, 10);
    *state = lab;
    return 0;
}

static void relay_closed(void *arg)
{
    struct lab *lab = arg;

    lab->relay_closed = 1;
}

static void start_relay(struct lab *lab, size_t max_streams, uint64_t rate)
{
    struct dg_relay_config cfg = {.port = 0, .max_streams = max_streams, .rate = rate};

    assert_int_equal(dg_relay_start(&lab->loop, &cfg, &lab->relay), 0);
    lab->port = dg_relay_port(lab->relay);
    assert_true(lab->port != 0);
}

static void stop_relay(struct lab *lab)
{
    if (!lab->relay || lab->stopped)
        return;
    lab->stopped = 1;
    dg_relay_stop(lab->relay, relay_closed, lab);
}

static void client_close(struct client *c);

static int all_closed(struct lab *lab)
{
    if (lab->relay && !lab->relay_closed)
        return 0;
    for (int i = 0; i < NCLIENTS; i++) {
        if (lab->c[i].used && !lab->c[i].closed)
            return 0;
    }
    return 1;
}

static int lab_teardown(void **state)
{
    struct lab *lab = *state;

    stop_relay(lab);
    for (int i = 0; i < NCLIENTS; i++) {
        if (lab->c[i].used)
            client_close(&lab->c[i]);
    }
    RUN_UNTIL(lab, all_closed(lab));
    assert_true(all_closed(lab));
    uv_close((uv_handle_t *)&lab->pulse, NULL);
    uv_run(&lab->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&lab->loop), 0);
    free(lab);
    return 0;
}

/* ---- clients ---- */

struct cwrite {
    uv_write_t req;
    struct client *c;
    size_t len;
    int counted; /* pattern bytes, counted in out_done */
    uint8_t data[];
};

static void pump(struct client *c);

static void on_cclosed(uv_handle_t *h)
{
    struct client *c = h->data;

    c->closed = 1;
}

static void client_close(struct client *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, on_cclosed);
}

static void on_cwrite(uv_write_t *req, int status)
{
    struct cwrite *w = (struct cwrite *)req;
    struct client *c = w->c;

    if (w->counted) {
        c->inflight -= w->len;
        if (status == 0)
            c->out_done += w->len;
    }
    free(w);
    if (c->closing || status < 0)
        return;
    pump(c);
    if (c->close_when_sent && c->out_done == c->out_target)
        client_close(c);
}

static void client_write(struct client *c, const uint8_t *data, size_t len, int counted)
{
    struct cwrite *w = malloc(sizeof(*w) + len);
    uv_buf_t b;

    assert_non_null(w);
    w->c = c;
    w->len = len;
    w->counted = counted;
    memcpy(w->data, data, len);
    b = uv_buf_init((char *)w->data, (unsigned)len);
    assert_int_equal(uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_cwrite), 0);
    if (counted)
        c->inflight += len;
}

/* Writes more of the pattern, keeping at most SEND_WINDOW bytes in flight. */
static void pump(struct client *c)
{
    uint8_t *buf = c->lab->vbuf;

    while (!c->closing && c->out_queued < c->out_target && c->inflight < SEND_WINDOW) {
        size_t n =
            c->out_target - c->out_queued > CHUNK ? CHUNK : (size_t)(c->out_target - c->out_queued);
        pattern(c->out_seed, c->out_queued, buf, n);
        client_write(c, buf, n, 1);
        c->out_queued += n;
    }
}

/* Sends @p n more bytes of the client's pattern. */
static void client_send(struct client *c, uint64_t n)
{
    c->out_target += n;
    pump(c);
}

static void on_calloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct client *c = h->data;

    (void)suggested;
    *buf = uv_buf_init((char *)c->lab->rbuf, sizeof(c->lab->rbuf));
}

static void on_cread(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct client *c = s->data;

    if (nread < 0) {
        c->ended = 1;
        uv_read_stop(s);
        c->reading = 0;
        return;
    }
    if (nread == 0)
        return;
    pattern(c->in_seed, c->in_got, c->lab->vbuf, (size_t)nread);
    if (memcmp(c->lab->vbuf, buf->base, (size_t)nread) != 0)
        c->in_bad = 1;
    c->in_got += (uint64_t)nread;
}

static void client_read(struct client *c, int on)
{
    if (on && !c->reading && !c->ended)
        assert_int_equal(uv_read_start((uv_stream_t *)&c->tcp, on_calloc, on_cread), 0);
    else if (!on && c->reading)
        uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = on && !c->ended;
}

static void on_cconnect(uv_connect_t *req, int status)
{
    struct client *c = req->data;

    c->connected = status == 0 ? 1 : -1;
}

/* Connects client @p i to the relay; it reads pattern @p in_seed and sends @p out_seed. */
static struct client *client_connect(struct lab *lab, int i, uint64_t out_seed, uint64_t in_seed)
{
    struct client *c = &lab->c[i];
    struct sockaddr_in to;

    assert_false(c->used);
    memset(c, 0, sizeof(*c));
    c->lab = lab;
    c->used = 1;
    c->out_seed = out_seed;
    c->in_seed = in_seed;
    assert_int_equal(uv_tcp_init(&lab->loop, &c->tcp), 0);
    c->tcp.data = c;
    c->connect.data = c;
    uv_ip4_addr("127.0.0.1", lab->port, &to);
    assert_int_equal(
        uv_tcp_connect(&c->connect, &c->tcp, (const struct sockaddr *)&to, on_cconnect), 0);
    RUN_UNTIL(lab, c->connected != 0);
    assert_int_equal(c->connected, 1);
    client_read(c, 1);
    return c;
}

static void client_preamble(struct client *c, int role, int nonce_id)
{
    uint8_t nonce[DG_RELAY_NONCE_LEN], pre[DG_RELAY_PREAMBLE_LEN];

    make_nonce(nonce, nonce_id);
    dg_relay_preamble(role, nonce, pre);
    client_write(c, pre, sizeof(pre), 0);
}

static int expect(struct lab *lab, int nonce_id)
{
    uint8_t nonce[DG_RELAY_NONCE_LEN];

    make_nonce(nonce, nonce_id);
    return dg_relay_expect(lab->relay, nonce);
}

/* Pairs clients @p a (initiator, seed 2a+1) and @p b (responder, seed 2b+1) on @p nonce_id,
 * each reading the other's pattern. */
static void pair(struct lab *lab, int a, int b, int nonce_id)
{
    size_t before = st(lab).streams;
    struct client *ca, *cb;

    assert_int_equal(expect(lab, nonce_id), 0);
    ca = client_connect(lab, a, 2u * a + 1, 2u * b + 1);
    cb = client_connect(lab, b, 2u * b + 1, 2u * a + 1);
    client_preamble(ca, DG_RELAY_ROLE_INITIATOR, nonce_id);
    client_preamble(cb, DG_RELAY_ROLE_RESPONDER, nonce_id);
    RUN_UNTIL(lab, st(lab).streams == before + 1);
    assert_int_equal(st(lab).streams, before + 1);
}

/* ---- tests ---- */

static void test_preamble_layout(void **state)
{
    uint8_t nonce[DG_RELAY_NONCE_LEN], out[DG_RELAY_PREAMBLE_LEN];

    (void)state;
    make_nonce(nonce, 5);
    dg_relay_preamble(DG_RELAY_ROLE_RESPONDER, nonce, out);
    assert_memory_equal(out, "dgrelay1", 8);
    assert_int_equal(out[8], 2);
    assert_memory_equal(out + 9, nonce, DG_RELAY_NONCE_LEN);
    dg_relay_preamble(DG_RELAY_ROLE_INITIATOR, nonce, out);
    assert_int_equal(out[8], 1);
}

static void test_start_errors(void **state)
{
    struct lab *lab = *state;
    struct dg_relay_config cfg = {.port = 0, .max_streams = 0, .rate = 0};
    struct dg_relay *r = NULL;

    assert_int_equal(dg_relay_start(&lab->loop, &cfg, &r), -EINVAL);
    start_relay(lab, 4, 0);
    cfg.max_streams = 4;
    cfg.port = lab->port; /* taken by the first one */
    assert_int_equal(dg_relay_start(&lab->loop, &cfg, &r), UV_EADDRINUSE);
    dg_relay_stop(NULL, relay_closed, lab); /* allowed, does nothing */
    assert_false(lab->relay_closed);
}

/* Byte-exact copying both ways, with early bytes sent before the other end came. */
static void test_relay_both_ways(void **state)
{
    struct lab *lab = *state;
    const uint64_t early = 1000, bulk = 8 * MIB;
    uint8_t nonce[DG_RELAY_NONCE_LEN], pre[DG_RELAY_PREAMBLE_LEN];
    struct client *a, *b;
    struct dg_relay_stats s;

    start_relay(lab, 4, 0);
    assert_int_equal(expect(lab, 1), 0);
    a = client_connect(lab, 0, 11, 22);
    client_preamble(a, DG_RELAY_ROLE_INITIATOR, 1);
    client_send(a, early);
    RUN_UNTIL(lab, st(lab).buffered == early);
    s = st(lab);
    assert_int_equal(s.buffered, early);
    assert_int_equal(s.waiting, 1);
    assert_int_equal(s.streams, 0);

    /* The responder's preamble in pieces, then its pattern right behind it. */
    b = client_connect(lab, 1, 22, 11);
    make_nonce(nonce, 1);
    dg_relay_preamble(DG_RELAY_ROLE_RESPONDER, nonce, pre);
    client_write(b, pre, 3, 0);
    spin(lab, 20);
    client_write(b, pre + 3, 10, 0);
    spin(lab, 20);
    assert_int_equal(st(lab).streams, 0);
    client_write(b, pre + 13, 12, 0);
    client_send(b, early);
    client_send(b, bulk);
    client_send(a, bulk);
    RUN_UNTIL(lab, (a->in_got == early + bulk && b->in_got == early + bulk) || a->in_bad ||
                       b->in_bad || a->ended || b->ended);
    assert_false(a->in_bad);
    assert_false(b->in_bad);
    assert_int_equal(a->in_got, early + bulk);
    assert_int_equal(b->in_got, early + bulk);
    RUN_UNTIL(lab, st(lab).buffered == 0);
    s = st(lab);
    assert_int_equal(s.streams, 1);
    assert_int_equal(s.waiting, 0);
    assert_int_equal(s.streams_total, 1);
    assert_int_equal(s.bytes, 2 * (early + bulk));
    assert_int_equal(s.refused, 0);
    assert_int_equal(s.buffered, 0);
    assert_false(a->ended || b->ended);
}

/* Bad magic, bad role, unknown nonce, a role taken: each connection closed and counted;
 * the stream with the good ends is not disturbed. */
static void test_refused(void **state)
{
    struct lab *lab = *state;
    uint8_t nonce[DG_RELAY_NONCE_LEN], pre[DG_RELAY_PREAMBLE_LEN];
    struct client *c, *a, *b;

    start_relay(lab, 4, 0);
    assert_int_equal(expect(lab, 1), 0);
    make_nonce(nonce, 1);

    c = client_connect(lab, 0, 0, 0);
    dg_relay_preamble(DG_RELAY_ROLE_INITIATOR, nonce, pre);
    pre[7] = '2'; /* "dgrelay2" */
    client_write(c, pre, sizeof(pre), 0);
    RUN_UNTIL(lab, c->ended);
    assert_true(c->ended);
    assert_int_equal(st(lab).refused, 1);

    c = client_connect(lab, 1, 0, 0);
    dg_relay_preamble(3, nonce, pre);
    client_write(c, pre, sizeof(pre), 0);
    RUN_UNTIL(lab, c->ended);
    assert_true(c->ended);
    assert_int_equal(st(lab).refused, 2);

    c = client_connect(lab, 2, 0, 0);
    client_preamble(c, DG_RELAY_ROLE_INITIATOR, 99);
    RUN_UNTIL(lab, c->ended);
    assert_true(c->ended);
    assert_int_equal(st(lab).refused, 3);
    assert_int_equal(st(lab).waiting, 1); /* nonce 1 still waits */

    /* The initiator's role, taken while the session waits. */
    a = client_connect(lab, 3, 7, 8);
    client_preamble(a, DG_RELAY_ROLE_INITIATOR, 1);
    client_send(a, 1);
    RUN_UNTIL(lab, st(lab).buffered == 1); /* a is attached */
    c = client_connect(lab, 4, 0, 0);
    client_preamble(c, DG_RELAY_ROLE_INITIATOR, 1);
    RUN_UNTIL(lab, c->ended);
    assert_true(c->ended);
    assert_int_equal(st(lab).refused, 4);
    assert_false(a->ended);

    /* The responder completes the pair; then the responder's role is taken too. */
    b = client_connect(lab, 5, 8, 7);
    client_preamble(b, DG_RELAY_ROLE_RESPONDER, 1);
    RUN_UNTIL(lab, b->in_got == 1);
    assert_int_equal(b->in_got, 1);
    c = client_connect(lab, 6, 0, 0);
    client_preamble(c, DG_RELAY_ROLE_RESPONDER, 1);
    RUN_UNTIL(lab, c->ended);
    assert_true(c->ended);
    assert_int_equal(st(lab).refused, 5);

    /* The running stream still works both ways. */
    client_send(a, 100000);
    client_send(b, 100000);
    RUN_UNTIL(lab, (a->in_got == 100000 && b->in_got == 100001) || a->ended || b->ended);
    assert_int_equal(a->in_got, 100000);
    assert_int_equal(b->in_got, 100001);
    assert_false(a->in_bad || b->in_bad);
    for (int i = 0; i < 7; i++)
        assert_false(lab->c[i].in_bad);
    assert_int_equal(lab->c[0].in_got + lab->c[1].in_got + lab->c[2].in_got + lab->c[4].in_got +
                         lab->c[6].in_got,
                     0); /* the relay sends nothing of its own */
    assert_int_equal(st(lab).streams_total, 1);
}

/* A waiting end may send DG_RELAY_EARLY_MAX bytes; one more and it is refused, and its nonce
 * is gone. */
static void test_early_limit(void **state)
{
    struct lab *lab = *state;
    struct client *a, *b;

    start_relay(lab, 4, 0);
    assert_int_equal(expect(lab, 1), 0);
    a = client_connect(lab, 0, 1, 2);
    client_preamble(a, DG_RELAY_ROLE_INITIATOR, 1);
    client_send(a, DG_RELAY_EARLY_MAX);
    RUN_UNTIL(lab, st(lab).buffered == DG_RELAY_EARLY_MAX);
    assert_int_equal(st(lab).buffered, DG_RELAY_EARLY_MAX);
    spin(lab, 20);
    assert_false(a->ended);
    assert_int_equal(st(lab).refused, 0);
    client_send(a, 1);
    RUN_UNTIL(lab, a->ended);
    assert_true(a->ended);
    RUN_UNTIL(lab, st(lab).buffered == 0);
    assert_int_equal(st(lab).buffered, 0);
    assert_int_equal(st(lab).refused, 1);
    assert_int_equal(st(lab).waiting, 0);
    b = client_connect(lab, 1, 2, 1);
    client_preamble(b, DG_RELAY_ROLE_RESPONDER, 1);
    RUN_UNTIL(lab, b->ended);
    assert_true(b->ended);
    assert_int_equal(st(lab).refused, 2);
    assert_int_equal(b->in_got, 0);
}

/* Nonces without both ends expire after the pair timeout; so does a connection that never
 * completes its preamble. */
static void test_expiry(void **state)
{
    struct lab *lab = *state;
    static const uint8_t partial[] = {'d', 'g', 'r', 'e', 'l', 'a', 'y', '1', 1, 2};
    struct client *p, *a, *late;
    uint64_t t0;
    struct dg_relay_stats s;

    start_relay(lab, 4, 0);
    dg_relay_set_timeouts_for_test(lab->relay, 300, 0);
    uv_update_time(&lab->loop);
    t0 = uv_now(&lab->loop);
    assert_int_equal(expect(lab, 1), 0); /* no end ever comes */
    assert_int_equal(expect(lab, 2), 0); /* only the initiator comes */
    p = client_connect(lab, 0, 0, 0);
    client_write(p, partial, sizeof(partial), 0);
    a = client_connect(lab, 1, 5, 6);
    client_preamble(a, DG_RELAY_ROLE_INITIATOR, 2);
    client_send(a, 10);
    RUN_UNTIL(lab, st(lab).buffered == 10);
    assert_int_equal(st(lab).waiting, 2);
    RUN_UNTIL(lab, p->ended && a->ended && st(lab).expired == 2);
    uv_update_time(&lab->loop);
    assert_true(uv_now(&lab->loop) - t0 >= 300);
    s = st(lab);
    assert_true(p->ended);
    assert_true(a->ended);
    assert_int_equal(s.expired, 2);
    assert_int_equal(s.refused, 1); /* the partial preamble */
    assert_int_equal(s.waiting, 0);
    assert_int_equal(s.streams_total, 0);
    RUN_UNTIL(lab, st(lab).buffered == 0);
    assert_int_equal(st(lab).buffered, 0);

    /* The responder comes too late. */
    late = client_connect(lab, 2, 6, 5);
    client_preamble(late, DG_RELAY_ROLE_RESPONDER, 2);
    RUN_UNTIL(lab, late->ended);
    assert_true(late->ended);
    assert_int_equal(st(lab).refused, 2);
    assert_int_equal(expect(lab, 2), 0); /* may be registered again */
}

/* max_streams counts waiting nonces and running streams. */
static void test_max_streams(void **state)
{
    struct lab *lab = *state;

    start_relay(lab, 2, 0);
    assert_int_equal(expect(lab, 1), 0);
    assert_int_equal(expect(lab, 1), -EEXIST);
    assert_int_equal(expect(lab, 2), 0);
    assert_int_equal(expect(lab, 3), -EBUSY);
    assert_int_equal(st(lab).waiting, 2);
    assert_int_equal(dg_relay_expect(lab->relay, (const uint8_t *)"0123456789abcdef"), -EBUSY);

    /* Nonce 1 becomes a running stream: still counted. */
    client_connect(lab, 0, 1, 2);
    client_connect(lab, 1, 2, 1);
    client_preamble(&lab->c[0], DG_RELAY_ROLE_INITIATOR, 1);
    client_preamble(&lab->c[1], DG_RELAY_ROLE_RESPONDER, 1);
    RUN_UNTIL(lab, st(lab).streams == 1);
    assert_int_equal(st(lab).streams, 1);
    assert_int_equal(st(lab).waiting, 1);
    assert_int_equal(expect(lab, 3), -EBUSY);
    assert_int_equal(expect(lab, 1), -EEXIST);

    /* It ends: the slot is free again. */
    client_close(&lab->c[0]);
    RUN_UNTIL(lab, lab->c[1].ended && st(lab).streams == 0);
    assert_true(lab->c[1].ended);
    assert_int_equal(expect(lab, 3), 0);
    assert_int_equal(expect(lab, 1), -EBUSY);
}

/* When one end closes, the other is closed, after what the first sent before closing. */
static void test_close_propagates(void **state)
{
    struct lab *lab = *state;
    struct client *a, *b;

    start_relay(lab, 4, 0);
    pair(lab, 0, 1, 1);
    a = &lab->c[0];
    b = &lab->c[1];
    a->close_when_sent = 1;
    client_send(a, 300000);
    RUN_UNTIL(lab, b->ended);
    assert_true(b->ended);
    assert_int_equal(b->in_got, 300000);
    assert_false(b->in_bad);
    RUN_UNTIL(lab, st(lab).streams == 0);
    assert_int_equal(st(lab).streams, 0);

    /* The other way round: the responder closes, having sent nothing. */
    pair(lab, 2, 3, 2);
    client_close(&lab->c[3]);
    RUN_UNTIL(lab, lab->c[2].ended);
    assert_true(lab->c[2].ended);
    assert_int_equal(lab->c[2].in_got, 0);
    RUN_UNTIL(lab, st(lab).streams == 0);
    assert_int_equal(st(lab).streams, 0);
    assert_int_equal(st(lab).streams_total, 2);
}

/* A stream closed while the relay still has bytes queued to one end (that end does not read)
 * writes them before closing that end. */
static void test_close_flushes(void **state)
{
    struct lab *lab = *state;
    struct client *a, *b;

    start_relay(lab, 4, 0);
    pair(lab, 0, 1, 1);
    a = &lab->c[0];
    b = &lab->c[1];
    client_read(b, 0);
    client_send(a, 32 * MIB);
    /* a stalls (the relay has bytes queued to b); with a short idle time the stream ends: a is
     * closed at once, b once its queue is written. */
    RUN_UNTIL(lab, stalled(lab, a));
    assert_true(stalled(lab, a));
    dg_relay_set_timeouts_for_test(lab->relay, 0, 300);
    RUN_UNTIL(lab, a->ended);
    assert_true(a->ended);
    assert_int_equal(st(lab).streams, 0);
    assert_true(st(lab).buffered > 0);
    client_read(b, 1);
    RUN_UNTIL(lab, b->ended);
    assert_true(b->ended);
    assert_false(b->in_bad);
    assert_int_equal(b->in_got, st(lab).bytes);
    RUN_UNTIL(lab, st(lab).buffered == 0);
    assert_int_equal(st(lab).buffered, 0);
}

/* A stream that moves no byte for the idle time is closed. */
static void test_idle(void **state)
{
    struct lab *lab = *state;
    uint64_t t0;

    start_relay(lab, 4, 0);
    dg_relay_set_timeouts_for_test(lab->relay, 0, 300);
    pair(lab, 0, 1, 1);
    uv_update_time(&lab->loop);
    t0 = uv_now(&lab->loop);
    client_send(&lab->c[0], 1000);
    RUN_UNTIL(lab, lab->c[0].ended && lab->c[1].ended);
    assert_true(lab->c[0].ended && lab->c[1].ended);
    uv_update_time(&lab->loop);
    assert_true(uv_now(&lab->loop) - t0 >= 300);
    assert_int_equal(lab->c[1].in_got, 1000);
    assert_int_equal(st(lab).streams, 0);
}

/* With rate 1 MiB/s, 2 MiB each way take at least 1.5 s (a lower bound only). */
static void test_rate_limit(void **state)
{
    struct lab *lab = *state;
    struct client *a, *b;
    uint64_t t0;

    start_relay(lab, 4, MIB);
    pair(lab, 0, 1, 1);
    a = &lab->c[0];
    b = &lab->c[1];
    t0 = mono_ms();
    client_send(a, 2 * MIB);
    client_send(b, 2 * MIB);
    RUN_UNTIL(lab, (a->in_got == 2 * MIB && b->in_got == 2 * MIB) || a->ended || b->ended);
    assert_int_equal(a->in_got, 2 * MIB);
    assert_int_equal(b->in_got, 2 * MIB);
    assert_false(a->in_bad || b->in_bad);
    assert_true(mono_ms() - t0 >= 1500);
}

/* A reader that does not read: the relay stops reading the writer instead of buffering. */
static void test_back_pressure(void **state)
{
    struct lab *lab = *state;
    const uint64_t total = 64 * MIB;
    struct client *a, *b;

    start_relay(lab, 4, 0);
    pair(lab, 0, 1, 1);
    a = &lab->c[0];
    b = &lab->c[1];
    client_read(b, 0);
    client_send(a, total);
    RUN_UNTIL(lab, a->out_done == total || stalled(lab, a));
    assert_true(a->out_done < total);
    assert_true(lab->max_buffered < MIB);
    assert_false(a->ended || b->ended);

    client_read(b, 1);
    RUN_UNTIL(lab, b->in_got == total || b->in_bad || b->ended);
    assert_int_equal(b->in_got, total);
    assert_false(b->in_bad);
    assert_true(lab->max_buffered < MIB);
    assert_int_equal(st(lab).bytes, total);
}

/* dg_relay_stop with every kind of state open frees everything (ASan checks) and closes
 * every connection. */
static void test_stop_with_streams(void **state)
{
    struct lab *lab = *state;
    static const uint8_t partial[] = {'d', 'g', 'r', 'e', 'l'};
    uint64_t bytes;
    size_t queued;

    start_relay(lab, 8, 0);

    /* A closing stream whose end still has bytes queued: the writer stalls, the stream goes
     * idle, the relay shuts the reader's end down behind its queue. */
    pair(lab, 0, 1, 1);
    client_read(&lab->c[1], 0);
    client_send(&lab->c[0], 32 * MIB);
    RUN_UNTIL(lab, stalled(lab, &lab->c[0]));
    assert_true(stalled(lab, &lab->c[0]));
    dg_relay_set_timeouts_for_test(lab->relay, 0, 300);
    RUN_UNTIL(lab, lab->c[0].ended);
    assert_true(lab->c[0].ended);
    assert_true(st(lab).buffered > 0);
    dg_relay_set_timeouts_for_test(lab->relay, 0, 0);

    /* A running stream with writes queued. */
    queued = st(lab).buffered;
    pair(lab, 2, 3, 2);
    client_read(&lab->c[3], 0);
    bytes = st(lab).bytes;
    client_send(&lab->c[2], 32 * MIB);
    RUN_UNTIL(lab, stalled(lab, &lab->c[2]));
    assert_true(stalled(lab, &lab->c[2]));
    assert_true(st(lab).bytes > bytes);
    assert_true(st(lab).buffered > queued); /* writes to c[3] are queued */

    /* A waiting session with early bytes, a nonce without ends, a partial preamble. */
    assert_int_equal(expect(lab, 3), 0);
    client_connect(lab, 4, 1, 2);
    client_preamble(&lab->c[4], DG_RELAY_ROLE_INITIATOR, 3);
    client_send(&lab->c[4], 100);
    assert_int_equal(expect(lab, 4), 0);
    client_connect(lab, 5, 0, 0);
    client_write(&lab->c[5], partial, sizeof(partial), 0);
    spin(lab, 50);
    assert_int_equal(st(lab).waiting, 2);
    assert_int_equal(st(lab).streams, 1);

    stop_relay(lab);
    dg_relay_stop(lab->relay, NULL, NULL); /* a second call is ignored */
    client_read(&lab->c[1], 1);
    client_read(&lab->c[3], 1);
    RUN_UNTIL(lab, lab->relay_closed);
    assert_true(lab->relay_closed);
    for (int i = 0; i < 6; i++) {
        RUN_UNTIL(lab, lab->c[i].ended);
        assert_true(lab->c[i].ended);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_preamble_layout),
        cmocka_unit_test_setup_teardown(test_start_errors, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_relay_both_ways, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_refused, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_early_limit, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_expiry, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_max_streams, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_close_propagates, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_close_flushes, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_idle, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_rate_limit, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_back_pressure, lab_setup, lab_teardown),
        cmocka_unit_test_setup_teardown(test_stop_with_streams, lab_setup, lab_teardown),
    };
    signal(SIGPIPE, SIG_IGN); /* writes to ends the relay closed */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
