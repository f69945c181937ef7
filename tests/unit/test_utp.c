/* Unit tests for engine/utp.c: contexts talking over a simulated network.
 *
 * The network is a priority queue of datagrams on a virtual clock. Each direction between two
 * nodes has a delay, a jitter (which reorders), a loss rate, a duplication rate and optionally a
 * bottleneck rate with a drop-tail queue, all drawn from a seeded PRNG, so every run is the
 * same. A "spy" sees every datagram and may drop or delay it. One step of the pump delivers
 * the datagrams due, lets the applications write, flushes every context and ticks them every
 * DG_UTP_TICK_US; then the clock jumps to the next event.
 *
 * Applications write streams made by a keyed PRNG (byte i of stream k is a function of k and
 * i) and check every byte they read against it. The clock starts three seconds before the
 * 32-bit microsecond timestamps wrap. Goodput figures are printed as "# ..." lines. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "engine/utp.h"

#define SEC 1000000ull
#define MS 1000ull
#define MIB (1024ull * 1024)
#define MAXNODES 3
#define NPATHS 8
#define MAXCONNS 8
#define START_US ((1ull << 32) - 3 * SEC)

enum {
    T_DATA,
    T_FIN,
    T_STATE,
    T_RESET,
    T_SYN
};

struct sim;
struct node;

struct conn {
    struct node *node;
    struct dg_utp_sock *s;
    int used, connected, ended, err, closed;
    uint64_t connected_at, end_at;
    uint64_t tx_key, rx_key; /* stream keys; rx_key 0: keep what comes in small[] */
    uint64_t to_send, written, received, received_at_end;
    size_t chunk; /* write size; 0: random */
    int writable, nwritable;
    long write_err;
    int close_when_done;    /* close once to_send is written */
    uint64_t close_at_read; /* close from on_read once this much came (0: never) */
    struct conn *close_too; /* ... and close this one too */
    int echo;               /* write back what comes in */
    int bad;                /* bytes not as expected */
    int after_close;        /* callbacks after dg_utp_close */
    int reads;
    uint32_t queued_at_close;
    uint8_t small[512];
    size_t nsmall;
};

struct node {
    struct sim *sim;
    int id;
    struct dg_utp *u;
    struct sockaddr_in addr; /* path 0; path p is port + p */
    int refuse;              /* on_accept says no */
    int anonymous;           /* accepted connections get no struct conn (flood test) */
    int naccepted, nended_anon;
    struct conn conns[MAXCONNS];
    struct conn tmpl; /* settings of accepted connections */
    int accept_paused;
    uint64_t sent_by_path[NPATHS];
};

struct dgram {
    uint64_t at, order;
    int to, path;
    struct sockaddr_in from;
    size_t len;
    uint8_t buf[];
};

struct link {
    double loss, dup;
    uint64_t delay, jitter;
    uint64_t rate, qlimit, free_at; /* bottleneck: bytes per second, most queued (us) */
    int down;
    int strip_sack; /* remove extensions from STATEs: a peer without selective ACKs */
};

/* Sees every datagram: < 0 drops it, else delays it that many more microseconds. */
typedef long (*spy_fn)(struct sim *sim, int from, int to, const uint8_t *buf, size_t len);

struct sim {
    uint64_t now, rng, order, next_tick;
    int n;
    struct node nodes[MAXNODES];
    struct link link[MAXNODES][MAXNODES];
    struct dgram **heap;
    size_t nheap, cap;
    spy_fn spy;
    void *spy_arg;
    void (*step_hook)(struct sim *sim);
    uint64_t hook_fail;
    uint64_t queue_measure_from, queue_sum, queue_n, queue_max; /* bottleneck queuing delay */
};

/* ---- helpers ---- */

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rnd(struct sim *sim)
{
    return (double)(splitmix(&sim->rng) >> 11) * (1.0 / 9007199254740992.0);
}

/* Bytes [off, off + n) of stream @p key. */
static void fill(uint64_t key, uint64_t off, uint8_t *buf, size_t n)
{
    uint64_t word = 0, widx = UINT64_MAX;

    for (size_t i = 0; i < n; i++) {
        uint64_t o = off + i;
        if (o >> 3 != widx) {
            uint64_t x = key + (o >> 3) * 0x2545f4914f6cdd1dull;
            widx = o >> 3;
            word = splitmix(&x);
        }
        buf[i] = (uint8_t)(word >> ((o & 7) * 8));
    }
}

static int matches(uint64_t key, uint64_t off, const uint8_t *buf, size_t n)
{
    uint8_t tmp[4096];

    while (n) {
        size_t k = n < sizeof(tmp) ? n : sizeof(tmp);
        fill(key, off, tmp, k);
        if (memcmp(tmp, buf, k) != 0)
            return 0;
        buf += k;
        off += k;
        n -= k;
    }
    return 1;
}

static int ptype(const uint8_t *b)
{
    return b[0] >> 4;
}

static uint16_t pconn(const uint8_t *b)
{
    return (uint16_t)(b[2] << 8 | b[3]);
}

static uint16_t pseq(const uint8_t *b)
{
    return (uint16_t)(b[16] << 8 | b[17]);
}

static uint16_t pack(const uint8_t *b)
{
    return (uint16_t)(b[18] << 8 | b[19]);
}

static uint32_t pwnd(const uint8_t *b)
{
    return (uint32_t)b[12] << 24 | (uint32_t)b[13] << 16 | (uint32_t)b[14] << 8 | b[15];
}

/* ---- the network ---- */

static void heap_push(struct sim *sim, struct dgram *d)
{
    size_t i;

    if (sim->nheap == sim->cap) {
        sim->cap = sim->cap ? 2 * sim->cap : 1024;
        sim->heap = realloc(sim->heap, sim->cap * sizeof(*sim->heap));
        assert_non_null(sim->heap);
    }
    d->order = sim->order++;
    i = sim->nheap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        struct dgram *p = sim->heap[up];
        if (p->at < d->at || (p->at == d->at && p->order < d->order))
            break;
        sim->heap[i] = p;
        i = up;
    }
    sim->heap[i] = d;
}

static struct dgram *heap_pop(struct sim *sim)
{
    struct dgram *top = sim->heap[0], *last = sim->heap[--sim->nheap];
    size_t i = 0;

    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        struct dgram *best = last;
        if (l < sim->nheap &&
            (sim->heap[l]->at < best->at ||
             (sim->heap[l]->at == best->at && sim->heap[l]->order < best->order))) {
            m = l;
            best = sim->heap[l];
        }
        if (r < sim->nheap && (sim->heap[r]->at < best->at ||
                               (sim->heap[r]->at == best->at && sim->heap[r]->order < best->order)))
            m = r;
        if (m == i)
            break;
        sim->heap[i] = sim->heap[m];
        i = m;
    }
    if (sim->nheap)
        sim->heap[i] = last;
    return top;
}

static struct node *node_at(struct sim *sim, const struct sockaddr_in *a, int *path)
{
    for (int i = 0; i < sim->n; i++) {
        struct node *n = &sim->nodes[i];
        int p = ntohs(a->sin_port) - ntohs(n->addr.sin_port);
        if (n->addr.sin_addr.s_addr == a->sin_addr.s_addr && p >= 0 && p < NPATHS) {
            *path = p;
            return n;
        }
    }
    return NULL;
}

static void enqueue(struct sim *sim, int to, int path, const struct sockaddr_in *from,
                    const uint8_t *buf, size_t len, uint64_t at)
{
    struct dgram *d = malloc(sizeof(*d) + len);

    assert_non_null(d);
    d->at = at;
    d->to = to;
    d->path = path;
    d->from = *from;
    d->len = len;
    memcpy(d->buf, buf, len);
    heap_push(sim, d);
}

static void sim_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    struct node *src = arg;
    struct sim *sim = src->sim;
    struct sockaddr_in from = src->addr;
    struct node *dst;
    struct link *l;
    int dpath;
    long extra = 0;
    uint64_t at = sim->now;

    assert_int_equal(to->sa_family, AF_INET);
    assert_true(path >= 0 && path < NPATHS);
    assert_true(dg_utp_is_packet(buf, len));
    assert_true(len <= DG_UTP_HEADER_LEN + DG_UTP_LOOPBACK_PACKET);
    src->sent_by_path[path]++;
    from.sin_port = htons((uint16_t)(ntohs(from.sin_port) + path));
    if (!(dst = node_at(sim, (const struct sockaddr_in *)to, &dpath)))
        return; /* into the void */
    if (sim->spy && (extra = sim->spy(sim, src->id, dst->id, buf, len)) < 0)
        return;
    l = &sim->link[src->id][dst->id];
    if (l->down || rnd(sim) < l->loss)
        return;
    if (l->strip_sack && ptype(buf) == T_STATE && buf[1]) {
        static uint8_t bare[DG_UTP_HEADER_LEN];
        memcpy(bare, buf, DG_UTP_HEADER_LEN);
        bare[1] = 0;
        buf = bare;
        len = DG_UTP_HEADER_LEN;
    }
    if (l->rate) {
        uint64_t start = l->free_at > sim->now ? l->free_at : sim->now;
        if (start - sim->now > l->qlimit)
            return; /* drop-tail */
        if (sim->now >= sim->queue_measure_from && ptype(buf) == T_DATA) {
            sim->queue_sum += start - sim->now;
            sim->queue_n++;
            if (start - sim->now > sim->queue_max)
                sim->queue_max = start - sim->now;
        }
        l->free_at = start + (len + 28) * SEC / l->rate;
        at = l->free_at;
    }
    at += l->delay + (l->jitter ? splitmix(&sim->rng) % l->jitter : 0) + (uint64_t)extra;
    if (at <= sim->now)
        at = sim->now + 1;
    enqueue(sim, dst->id, dpath, &from, buf, len, at);
    if (l->dup > 0 && rnd(sim) < l->dup)
        enqueue(sim, dst->id, dpath, &from, buf, len, at + 1 + splitmix(&sim->rng) % 5000);
}

/* ---- the applications ---- */

static struct conn *conn_new(struct node *n)
{
    for (int i = 0; i < MAXCONNS; i++)
        if (!n->conns[i].used) {
            struct conn *c = &n->conns[i];
            memset(c, 0, sizeof(*c));
            c->used = 1;
            c->node = n;
            return c;
        }
    fail_msg("too many connections on node %d", n->id);
    return NULL;
}

static void conn_close(struct conn *c)
{
    if (c->closed)
        return;
    struct dg_utp_sock_info info;
    dg_utp_sock_get_info(c->s, &info);
    c->queued_at_close = info.send_queued;
    c->closed = 1;
    dg_utp_close(c->s, c->node->sim->now);
}

static void pump_writes(struct conn *c)
{
    static uint8_t buf[65536];
    struct sim *sim = c->node->sim;

    while (c->writable && c->connected && !c->closed && !c->ended && c->written < c->to_send) {
        size_t n = c->chunk ? c->chunk : 1 + splitmix(&sim->rng) % sizeof(buf);
        long r;
        if (n > c->to_send - c->written)
            n = (size_t)(c->to_send - c->written);
        fill(c->tx_key, c->written, buf, n);
        r = dg_utp_write(c->s, buf, n, sim->now);
        if (r < 0) {
            c->write_err = r;
            break;
        }
        c->written += (uint64_t)r;
        if ((size_t)r < n)
            c->writable = 0;
    }
    if (c->close_when_done && c->connected && !c->ended && c->written == c->to_send)
        conn_close(c);
}

static int cb_accept(void *arg, struct dg_utp_sock *s)
{
    struct node *n = arg;
    struct conn *c;

    n->naccepted++;
    if (n->refuse)
        return -1;
    if (n->anonymous)
        return 0;
    c = conn_new(n);
    *c = n->tmpl;
    c->used = 1;
    c->node = n;
    c->s = s;
    c->connected = 1;
    c->writable = 1;
    c->connected_at = n->sim->now;
    dg_utp_sock_set_data(s, c);
    if (n->accept_paused)
        dg_utp_set_reading(s, 0, n->sim->now);
    pump_writes(c); /* may write before the STATE went out: only queued */
    return 0;
}

static void cb_connected(struct dg_utp_sock *s)
{
    struct conn *c = dg_utp_sock_data(s);

    if (c->closed)
        c->after_close++;
    c->connected = 1;
    c->writable = 1;
    c->connected_at = c->node->sim->now;
}

static void cb_read(struct dg_utp_sock *s, const uint8_t *buf, size_t len)
{
    struct conn *c = dg_utp_sock_data(s);

    assert_non_null(c);
    assert_true(len > 0);
    if (c->closed)
        c->after_close++;
    c->reads++;
    if (c->rx_key) {
        if (!matches(c->rx_key, c->received, buf, len))
            c->bad++;
    } else if (c->nsmall + len <= sizeof(c->small)) {
        memcpy(c->small + c->nsmall, buf, len);
        c->nsmall += len;
    } else {
        c->bad++;
    }
    c->received += len;
    if (c->echo)
        assert_int_equal(dg_utp_write(s, buf, len, c->node->sim->now), (long)len);
    if (c->close_at_read && c->received >= c->close_at_read) {
        if (c->close_too)
            conn_close(c->close_too);
        conn_close(c);
    }
}

static void cb_writable(struct dg_utp_sock *s)
{
    struct conn *c = dg_utp_sock_data(s);

    if (c->closed)
        c->after_close++;
    c->writable = 1;
    c->nwritable++;
    pump_writes(c);
}

static void cb_end(struct dg_utp_sock *s, int err)
{
    struct conn *c = dg_utp_sock_data(s);

    if (!c) { /* anonymous (flood test): close at once */
        dg_utp_close(s, 0);
        return;
    }
    if (c->closed)
        c->after_close++;
    assert_false(c->ended);
    c->ended = 1;
    c->err = err;
    c->end_at = c->node->sim->now;
    c->received_at_end = c->received;
}

static const struct dg_utp_ops ops = {
    .send = sim_send,
    .on_accept = cb_accept,
    .on_connected = cb_connected,
    .on_read = cb_read,
    .on_writable = cb_writable,
    .on_end = cb_end,
};

/* ---- the pump ---- */

static struct sim *sim_new(uint64_t seed, int n, int loopback)
{
    struct sim *sim = calloc(1, sizeof(*sim));

    assert_non_null(sim);
    sim->rng = seed;
    sim->n = n;
    sim->now = START_US;
    sim->next_tick = sim->now;
    for (int i = 0; i < n; i++) {
        struct node *nd = &sim->nodes[i];
        nd->sim = sim;
        nd->id = i;
        nd->addr.sin_family = AF_INET;
        nd->addr.sin_addr.s_addr = loopback ? htonl(0x7f000001) : htonl(0x0a000001 + (uint32_t)i);
        nd->addr.sin_port = htons((uint16_t)(6000 + 100 * i));
        assert_int_equal(dg_utp_new(&ops, nd, seed * 1000 + (uint64_t)i, &nd->u), 0);
        for (int j = 0; j < n; j++)
            sim->link[i][j].delay = 1 * MS;
    }
    return sim;
}

static void sim_free(struct sim *sim)
{
    for (int i = 0; i < sim->n; i++)
        dg_utp_free(sim->nodes[i].u);
    while (sim->nheap)
        free(heap_pop(sim));
    free(sim->heap);
    free(sim);
}

/* Every direction between different nodes. */
static void sim_links(struct sim *sim, double loss, uint64_t delay, uint64_t jitter, double dup)
{
    for (int i = 0; i < sim->n; i++)
        for (int j = 0; j < sim->n; j++) {
            struct link *l = &sim->link[i][j];
            l->loss = loss;
            l->delay = delay;
            l->jitter = jitter;
            l->dup = dup;
        }
}

static void sim_down(struct sim *sim, int down)
{
    for (int i = 0; i < sim->n; i++)
        for (int j = 0; j < sim->n; j++)
            sim->link[i][j].down = down;
}

static void sim_step(struct sim *sim)
{
    uint64_t next;

    while (sim->nheap && sim->heap[0]->at <= sim->now) {
        struct dgram *d = heap_pop(sim);
        struct node *n = &sim->nodes[d->to];
        assert_int_equal(dg_utp_input(n->u, d->path, d->buf, d->len,
                                      (const struct sockaddr *)&d->from, sim->now),
                         1);
        free(d);
    }
    for (int i = 0; i < sim->n; i++)
        for (int j = 0; j < MAXCONNS; j++)
            if (sim->nodes[i].conns[j].used)
                pump_writes(&sim->nodes[i].conns[j]);
    for (int i = 0; i < sim->n; i++)
        dg_utp_flush(sim->nodes[i].u, sim->now);
    if (sim->now >= sim->next_tick) {
        for (int i = 0; i < sim->n; i++)
            dg_utp_tick(sim->nodes[i].u, sim->now);
        sim->next_tick = sim->now + DG_UTP_TICK_US;
    }
    if (sim->step_hook)
        sim->step_hook(sim);
    next = sim->next_tick;
    if (sim->nheap && sim->heap[0]->at < next)
        next = sim->heap[0]->at;
    if (next > sim->now)
        sim->now = next;
}

typedef int (*cond_fn)(struct sim *sim, void *arg);

/* Runs until @p cond holds or @p limit_us passed. @return whether it holds. */
static int sim_run(struct sim *sim, uint64_t limit_us, cond_fn cond, void *arg)
{
    uint64_t end = sim->now + limit_us;

    while (sim->now < end) {
        if (cond && cond(sim, arg))
            return 1;
        sim_step(sim);
    }
    return cond ? cond(sim, arg) : 1;
}

static struct conn *sim_connect(struct sim *sim, int a, int b, int apath, int bpath)
{
    struct node *na = &sim->nodes[a];
    struct conn *c = conn_new(na);
    struct sockaddr_in to = sim->nodes[b].addr;

    to.sin_port = htons((uint16_t)(ntohs(to.sin_port) + bpath));
    assert_int_equal(dg_utp_connect(na->u, apath, (const struct sockaddr *)&to, sim->now, &c->s),
                     0);
    dg_utp_sock_set_data(c->s, c);
    return c;
}

/* The @p i-th connection node @p b accepted. */
static struct conn *accepted(struct sim *sim, int b, int i)
{
    struct conn *c = &sim->nodes[b].conns[i];
    assert_true(c->used);
    return c;
}

static int cond_connected(struct sim *sim, void *arg)
{
    (void)sim;
    return ((struct conn *)arg)->connected || ((struct conn *)arg)->ended;
}

static int cond_ended(struct sim *sim, void *arg)
{
    (void)sim;
    return ((struct conn *)arg)->ended;
}

static int cond_all_freed(struct sim *sim, void *arg)
{
    (void)arg;
    for (int i = 0; i < sim->n; i++)
        if (dg_utp_count(sim->nodes[i].u))
            return 0;
    return 1;
}

struct pair {
    struct conn *a, *b;
    uint64_t a_gets, b_gets;
};

static int cond_pair_done(struct sim *sim, void *arg)
{
    struct pair *p = arg;
    (void)sim;
    return p->a->received >= p->a_gets && p->b->received >= p->b_gets;
}

/* Connects node 0 to node 1, sends @p ab bytes one way and @p ba the other, checks them,
 * closes both ends. @return the simulated microseconds the data took. */
static uint64_t transfer(struct sim *sim, uint64_t ab, uint64_t ba, uint64_t limit_us)
{
    struct node *b = &sim->nodes[1];
    struct conn *ca, *cb;
    struct pair p;
    uint64_t t0, took;

    b->tmpl.rx_key = 0x1111;
    b->tmpl.tx_key = 0x2222;
    b->tmpl.to_send = ba;
    ca = sim_connect(sim, 0, 1, 0, 0);
    ca->tx_key = 0x1111;
    ca->rx_key = 0x2222;
    ca->to_send = ab;
    assert_true(sim_run(sim, 10 * SEC, cond_connected, ca));
    assert_true(ca->connected);
    assert_false(ca->ended);
    cb = accepted(sim, 1, 0);
    t0 = sim->now;
    p = (struct pair){ca, cb, ba, ab};
    if (!sim_run(sim, limit_us, cond_pair_done, &p))
        fail_msg("transfer incomplete: %llu/%llu and %llu/%llu bytes after %llu s",
                 (unsigned long long)cb->received, (unsigned long long)ab,
                 (unsigned long long)ca->received, (unsigned long long)ba,
                 (unsigned long long)(limit_us / SEC));
    took = sim->now - t0;
    assert_int_equal(ca->bad, 0);
    assert_int_equal(cb->bad, 0);
    assert_int_equal(ca->received, ba);
    assert_int_equal(cb->received, ab);
    assert_false(ca->ended);
    assert_false(cb->ended);
    conn_close(ca);
    conn_close(cb);
    assert_true(sim_run(sim, 120 * SEC, cond_all_freed, NULL));
    assert_int_equal(ca->after_close + cb->after_close, 0);
    return took;
}

static void report(const char *what, uint64_t bytes, uint64_t us)
{
    printf("# %s: %.2f MiB in %.3f simulated s = %.1f KiB/s\n", what, (double)bytes / MIB,
           (double)us / SEC, (double)bytes / 1024.0 / ((double)us / SEC));
}

static size_t make_packet(uint8_t *p, int type, uint16_t conn, uint16_t seq, uint16_t ack)
{
    memset(p, 0, DG_UTP_HEADER_LEN);
    p[0] = (uint8_t)(type << 4 | 1);
    p[2] = (uint8_t)(conn >> 8);
    p[3] = (uint8_t)conn;
    p[12] = 0x00;
    p[13] = 0x10; /* window 1 MiB */
    p[16] = (uint8_t)(seq >> 8);
    p[17] = (uint8_t)seq;
    p[18] = (uint8_t)(ack >> 8);
    p[19] = (uint8_t)ack;
    return DG_UTP_HEADER_LEN;
}

static int inject(struct sim *sim, int to, const struct sockaddr_in *from, const uint8_t *buf,
                  size_t len)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    uint8_t *copy = malloc(len ? len : 1);
    int rc;

    assert_non_null(copy);
    memcpy(copy, buf, len);
    rc = dg_utp_input(sim->nodes[to].u, 0, copy, len, (const struct sockaddr *)from, sim->now);
    free(copy);
    return rc;
}

/* ---- tests ---- */

static void test_connect_echo(void **state)
{
    struct sim *sim = sim_new(1, 2, 0);
    struct conn *a, *b;
    struct dg_utp_stats st;

    (void)state;
    sim->nodes[1].tmpl.echo = 1;
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"x", 1, sim->now), -ENOTCONN);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    assert_true(a->connected);
    assert_int_equal(sim->nodes[1].naccepted, 1);
    assert_int_equal(sim->nodes[0].naccepted, 0);
    b = accepted(sim, 1, 0);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"hello, ", 7, sim->now), 7);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"world", 5, sim->now), 5);
    sim_run(sim, 1 * SEC, NULL, NULL);
    assert_int_equal(b->nsmall, 12);
    assert_memory_equal(b->small, "hello, world", 12);
    assert_int_equal(a->nsmall, 12);
    assert_memory_equal(a->small, "hello, world", 12);
    /* Two writes in one turn shared one packet (the tail waits for the flush). */
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.malformed + st.unknown + st.refused, 0);
    assert_int_equal(dg_utp_count(sim->nodes[0].u), 1);
    assert_int_equal(dg_utp_count(sim->nodes[1].u), 1);
    assert_ptr_equal(dg_utp_arg(sim->nodes[0].u), &sim->nodes[0]);
    assert_int_equal(dg_utp_sock_path(b->s), 0);
    assert_int_equal(((const struct sockaddr_in *)dg_utp_sock_addr(b->s))->sin_addr.s_addr,
                     sim->nodes[0].addr.sin_addr.s_addr);
    conn_close(a);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"x", 1, sim->now), -EPIPE);
    assert_true(sim_run(sim, 5 * SEC, cond_ended, b));
    assert_int_equal(b->err, 0);
    assert_int_equal(dg_utp_write(b->s, (const uint8_t *)"x", 1, sim->now), -EPIPE);
    conn_close(b);
    assert_true(sim_run(sim, 5 * SEC, cond_all_freed, NULL));
    assert_int_equal(a->after_close, 0);
    sim_free(sim);
}

/* One small packet per write, sent at the next flush, shares packets: count DATA packets. */
static long count_data(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) == T_DATA)
        (*(int *)sim->spy_arg)++;
    return 0;
}

static void test_small_writes_coalesce(void **state)
{
    struct sim *sim = sim_new(2, 2, 0);
    struct conn *a;
    int ndata = 0;

    (void)state;
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    sim->spy = count_data;
    sim->spy_arg = &ndata;
    for (int i = 0; i < 100; i++)
        assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"0123456789", 10, sim->now), 10);
    assert_int_equal(ndata, 0);
    dg_utp_flush(sim->nodes[0].u, sim->now);
    assert_int_equal(ndata, 1);
    sim_run(sim, 1 * SEC, NULL, NULL);
    assert_int_equal(accepted(sim, 1, 0)->nsmall, 0); /* 1000 bytes did not fit small[] */
    assert_int_equal(accepted(sim, 1, 0)->received, 1000);
    sim_free(sim);
}

static double wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_bulk_one_way(void **state)
{
    struct sim *sim = sim_new(3, 2, 0);
    uint64_t took;
    double t0 = wall();

    (void)state;
    sim_links(sim, 0, 50, 0, 0);
    took = transfer(sim, 10 * MIB, 0, 120 * SEC);
    report("10 MiB one way, 0% loss, 50 us delay, 1400-byte packets", 10 * MIB, took);
    printf("# ... %.0f ms of CPU for both ends and the simulator (information only)\n",
           (wall() - t0) * 1000);
    sim_free(sim);

    /* Slow start, then LEDBAT growth, on a long path. */
    sim = sim_new(3, 2, 0);
    sim_links(sim, 0, 50 * MS, 0, 0);
    took = transfer(sim, 10 * MIB, 0, 120 * SEC);
    report("10 MiB one way, 0% loss, 50 ms delay", 10 * MIB, took);
    assert_true(took < 10 * SEC);
    sim_free(sim);
}

static void test_bulk_both_ways(void **state)
{
    struct sim *sim = sim_new(4, 2, 0);
    uint64_t took;

    (void)state;
    sim_links(sim, 0, 5 * MS, 0, 0);
    took = transfer(sim, 10 * MIB, 10 * MIB, 300 * SEC);
    report("10 MiB each way, 0% loss, 5 ms delay", 20 * MIB, took);
    sim_free(sim);
}

struct wrap_seen {
    int high, low; /* DATA packets from node 0 with seq >= 65000, and < 1000 */
};

static long watch_wrap(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    struct wrap_seen *w = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) == T_DATA) {
        if (pseq(buf) >= 65000)
            w->high++;
        if (pseq(buf) < 1000)
            w->low++;
    }
    return 0;
}

static void test_wraparound(void **state)
{
    struct sim *sim = sim_new(5, 2, 0);
    struct wrap_seen w = {0, 0};

    (void)state;
    /* 4 MiB is about 3000 packets: both directions cross 65535 -> 0, with losses, reordering
     * and selective ACKs spanning the wrap. */
    dg_utp_set_next_seq(sim->nodes[0].u, 65000);
    dg_utp_set_next_seq(sim->nodes[1].u, 64000);
    sim_links(sim, 0.02, 10 * MS, 3 * MS, 0.01);
    sim->spy = watch_wrap;
    sim->spy_arg = &w;
    transfer(sim, 4 * MIB, 4 * MIB, 600 * SEC);
    assert_true(w.high > 0);
    assert_true(w.low > 0);
    sim_free(sim);
}

static void test_loss_5pct_50ms(void **state)
{
    struct sim *sim = sim_new(6, 2, 0);
    uint64_t took;
    struct dg_utp_stats st;

    (void)state;
    sim_links(sim, 0.05, 50 * MS, 0, 0);
    took = transfer(sim, 10 * MIB, 0, 1200 * SEC);
    report("10 MiB, 5% loss both ways, 50 ms one-way delay", 10 * MIB, took);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    printf("# ... %llu retransmits, %llu timeouts\n", (unsigned long long)st.retransmits,
           (unsigned long long)st.timeouts);
    /* Far below what this path allows, but well above a collapse: about 100 KiB/s expected. */
    assert_true(took < 400 * SEC);
    sim_free(sim);
}

static void test_loss_20pct(void **state)
{
    struct sim *sim = sim_new(7, 2, 0);
    uint64_t took;

    (void)state;
    sim_links(sim, 0.20, 20 * MS, 0, 0);
    took = transfer(sim, 1 * MIB, 256 * 1024, 1800 * SEC);
    report("1 MiB + 256 KiB, 20% loss both ways, 20 ms delay", 1 * MIB + 256 * 1024, took);
    assert_true(took < 120 * SEC); /* slow, but not stalled in RTO backoff */
    sim_free(sim);
}

static void test_reorder_duplicate(void **state)
{
    struct sim *sim = sim_new(8, 2, 0);

    (void)state;
    sim_links(sim, 0.01, 5 * MS, 20 * MS, 0.10);
    transfer(sim, 3 * MIB, 3 * MIB, 600 * SEC);
    sim_free(sim);
}

/* A lost packet followed by three more is resent on the selective ACK, before any timeout
 * (three duplicate ACKs cannot happen: one burst arrives at once and is acked once). */
static long drop_17th(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    int *n = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) == T_DATA && ++*n == 17)
        return -1;
    return 0;
}

static void test_sack_fast_retransmit(void **state)
{
    struct sim *sim = sim_new(9, 2, 0);
    struct conn *a, *b;
    struct dg_utp_stats st;
    int n = 0;
    uint64_t t0;

    (void)state;
    sim_links(sim, 0, 50 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 20 * DG_UTP_MAX_PACKET;
    a->tx_key = 77;
    sim->nodes[1].tmpl.rx_key = 77;
    sim->spy = drop_17th;
    sim->spy_arg = &n;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    t0 = sim->now;
    b = accepted(sim, 1, 0);
    while (b->received < a->to_send && sim->now - t0 < 5 * SEC)
        sim_step(sim);
    assert_int_equal(b->received, a->to_send);
    assert_int_equal(b->bad, 0);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    assert_int_equal(st.timeouts, 0);
    assert_int_equal(st.retransmits, 1);
    assert_true(sim->now - t0 < 450 * MS); /* before the 500 ms minimum RTO */
    sim_free(sim);
}

/* The last packet of a flight is lost, and nothing follows it: the tail-loss probe resends it
 * after two RTTs, long before the RTO. */
static long drop_last(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    int *n = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) == T_DATA && ++*n == 10)
        return -1;
    return 0;
}

static void test_tail_loss_probe(void **state)
{
    struct sim *sim = sim_new(28, 2, 0);
    struct conn *a, *b;
    struct dg_utp_stats st;
    int n = 0;
    uint64_t t0;

    (void)state;
    sim_links(sim, 0, 50 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 10 * DG_UTP_MAX_PACKET;
    a->chunk = DG_UTP_MAX_PACKET;
    a->tx_key = 78;
    sim->nodes[1].tmpl.rx_key = 78;
    sim->spy = drop_last;
    sim->spy_arg = &n;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    t0 = sim->now;
    b = accepted(sim, 1, 0);
    while (b->received < a->to_send && sim->now - t0 < 5 * SEC)
        sim_step(sim);
    assert_int_equal(b->received, a->to_send);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    assert_int_equal(st.timeouts, 0);
    assert_int_equal(st.retransmits, 1);
    /* Flights at 0 and 100 ms, the ACK at 200 ms, the probe two RTTs later: about 520 ms,
     * where the RTO (at least 500 ms after that ACK) would give 800 ms. */
    assert_true(sim->now - t0 < 650 * MS);
    sim_free(sim);
}

/* A peer that sends no selective ACKs: losses are found by three duplicate ACKs (and the
 * probe and the RTO); the transfer completes. */
static void test_peer_without_sack(void **state)
{
    struct sim *sim = sim_new(29, 2, 0);
    uint64_t took;
    struct dg_utp_stats st;

    (void)state;
    sim_links(sim, 0.03, 20 * MS, 0, 0);
    sim->link[1][0].strip_sack = 1;
    took = transfer(sim, 2 * MIB, 0, 600 * SEC);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    report("2 MiB to a peer without SACK, 3% loss, 20 ms delay", 2 * MIB, took);
    assert_true(st.retransmits > 0);
    /* About 14 s. An RTO inflated by RTT samples taken across a filled hole crawls for ever;
     * one that keeps its backoff after progress takes 32 s. */
    assert_true(took < 25 * SEC);
    sim_free(sim);
}

/* A peer without SACK behind a 1 MB/s bottleneck: packets arrive one by one and each gets its
 * ACK, so a lost one shows as three duplicate ACKs and is resent at once, with no timeout
 * (the tail-loss probe would only send new data, and the RTO would follow). */
static long drop_30th(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    int *n = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) == T_DATA && ++*n == 30)
        return -1;
    return 0;
}

static void test_duplicate_acks(void **state)
{
    struct sim *sim = sim_new(31, 2, 0);
    struct dg_utp_stats st;
    int n = 0;

    (void)state;
    sim_links(sim, 0, 10 * MS, 0, 0);
    sim->link[0][1].rate = 1000000;
    sim->link[0][1].qlimit = 3 * SEC;
    sim->link[1][0].strip_sack = 1;
    sim->spy = drop_30th;
    sim->spy_arg = &n;
    transfer(sim, 300000, 0, 60 * SEC);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    assert_int_equal(st.timeouts, 0);
    assert_int_equal(st.retransmits, 1);
    sim_free(sim);
}

/* The peer answers (keep-alives) but never acknowledges our data: after 8 RTOs in a row the
 * connection gives up with -ETIMEDOUT and resets, although it was never silent for the idle
 * timeout. */
struct last_from_b {
    uint8_t pkt[DG_UTP_HEADER_LEN];
    int have, resets_from_a;
};

static long watch_b(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    struct last_from_b *l = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 1) {
        memcpy(l->pkt, buf, DG_UTP_HEADER_LEN);
        l->have = 1;
    }
    if (from == 0 && ptype(buf) == T_RESET)
        l->resets_from_a++;
    return 0;
}

static void test_no_progress_gives_up(void **state)
{
    struct sim *sim = sim_new(30, 2, 0);
    struct last_from_b l;
    struct conn *a;
    uint64_t t0;
    struct dg_utp_stats st;

    (void)state;
    memset(&l, 0, sizeof(l));
    sim->spy = watch_b;
    sim->spy_arg = &l;
    sim_links(sim, 0, 10 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    sim_run(sim, 1 * SEC, NULL, NULL);
    assert_true(l.have);
    sim->link[0][1].down = 1; /* our data never arrives */
    sim->link[1][0].down = 1; /* node 1's own answers neither: we play it */
    a->to_send = 100000;
    a->tx_key = 1;
    t0 = sim->now;
    while (!a->ended && sim->now - t0 < 400 * SEC) {
        uint64_t next = sim->now + 10 * SEC;
        uint8_t p[DG_UTP_HEADER_LEN];
        memcpy(p, l.pkt, sizeof(p));
        p[0] = T_STATE << 4 | 1;
        p[1] = 0;
        assert_int_equal(inject(sim, 0, &sim->nodes[1].addr, p, sizeof(p)), 1);
        while (!a->ended && sim->now < next)
            sim_step(sim);
    }
    assert_true(a->ended);
    assert_int_equal(a->err, -ETIMEDOUT);
    assert_true(a->end_at - t0 > DG_UTP_IDLE_TIMEOUT_US);
    assert_int_equal(l.resets_from_a, 1);
    dg_utp_get_stats(sim->nodes[0].u, &st);
    assert_int_equal(st.timeouts, 9);
    sim_free(sim);
}

static void test_refused(void **state)
{
    struct sim *sim = sim_new(10, 2, 0);
    struct conn *a;
    struct dg_utp_stats st;

    (void)state;
    sim->nodes[1].refuse = 1;
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_true(sim_run(sim, 5 * SEC, cond_ended, a));
    assert_int_equal(a->err, -ECONNREFUSED);
    assert_false(a->connected);
    assert_true(a->end_at - START_US < 100 * MS);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.refused, 1);
    assert_int_equal(dg_utp_count(sim->nodes[1].u), 0);
    conn_close(a);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    sim_free(sim);
}

static void test_connect_timeout(void **state)
{
    struct sim *sim = sim_new(11, 2, 0);
    struct conn *a = conn_new(&sim->nodes[0]);
    struct sockaddr_in nowhere = sim->nodes[1].addr;
    uint64_t t0 = sim->now;

    (void)state;
    nowhere.sin_addr.s_addr = htonl(0x0a000063);
    assert_int_equal(
        dg_utp_connect(sim->nodes[0].u, 0, (const struct sockaddr *)&nowhere, sim->now, &a->s), 0);
    dg_utp_sock_set_data(a->s, a);
    assert_true(sim_run(sim, 20 * SEC, cond_ended, a));
    assert_int_equal(a->err, -ETIMEDOUT);
    assert_true(a->end_at - t0 >= DG_UTP_CONNECT_TIMEOUT_US);
    assert_true(a->end_at - t0 <= DG_UTP_CONNECT_TIMEOUT_US + 2 * DG_UTP_TICK_US);
    assert_int_equal(sim->nodes[0].sent_by_path[0], 3); /* SYN at 0, 1 s and 3 s */
    conn_close(a);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    /* Connecting to an address family uTP does not carry. */
    struct sockaddr un = {.sa_family = AF_UNIX};
    struct dg_utp_sock *s;
    assert_int_equal(dg_utp_connect(sim->nodes[0].u, 0, &un, sim->now, &s), -EAFNOSUPPORT);
    sim_free(sim);
}

static void test_remote_dies(void **state)
{
    struct sim *sim = sim_new(12, 2, 0);
    struct conn *a, *b;
    uint64_t down_at;

    (void)state;
    sim_links(sim, 0, 20 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 100 * MIB;
    a->tx_key = 5;
    sim->nodes[1].tmpl.rx_key = 5;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    sim_run(sim, 3 * SEC, NULL, NULL);
    assert_true(b->received > 100000);
    down_at = sim->now;
    sim_down(sim, 1);
    assert_true(sim_run(sim, 200 * SEC, cond_ended, a));
    assert_true(sim_run(sim, 200 * SEC, cond_ended, b));
    assert_int_equal(a->err, -ETIMEDOUT);
    assert_int_equal(b->err, -ETIMEDOUT);
    /* Silence for DG_UTP_IDLE_TIMEOUT_US ends both (the RTO alone would take longer). */
    assert_true(a->end_at - down_at >= DG_UTP_IDLE_TIMEOUT_US - SEC);
    assert_true(a->end_at - down_at <= DG_UTP_IDLE_TIMEOUT_US + SEC);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"x", 1, sim->now), -EPIPE);
    assert_int_equal(b->bad, 0);
    conn_close(a);
    conn_close(b);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    sim_free(sim);
}

/* Data from node 0 is held back 300 ms; its FIN is not. */
static long delay_data(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    (void)sim;
    (void)to;
    (void)len;
    return from == 0 && ptype(buf) == T_DATA ? (long)(300 * MS) : 0;
}

static void test_fin_after_data(void **state)
{
    struct sim *sim = sim_new(13, 2, 0);
    struct conn *a, *b;
    int saw_fin_first = 0;

    (void)state;
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 300000;
    a->tx_key = 9;
    a->close_when_done = 1;
    sim->nodes[1].tmpl.rx_key = 9;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    sim->spy = delay_data;
    b = accepted(sim, 1, 0);
    while (!b->ended && sim->now < START_US + 30 * SEC) {
        sim_step(sim);
        if (!saw_fin_first && a->closed && b->received < a->to_send)
            saw_fin_first = 1;
    }
    assert_true(saw_fin_first);
    assert_true(b->ended);
    assert_int_equal(b->err, 0);
    assert_int_equal(b->received_at_end, a->to_send);
    assert_int_equal(b->bad, 0);
    /* Node 0 frees its side once the FIN is acked; node 1 once its owner closes. */
    while (dg_utp_count(sim->nodes[0].u) && sim->now < START_US + 60 * SEC)
        sim_step(sim);
    assert_int_equal(dg_utp_count(sim->nodes[0].u), 0);
    conn_close(b);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    assert_false(a->ended); /* closed before any end: no on_end */
    sim_free(sim);
}

/* The remote sends, closes and forgets the connection while our owner does not read, for
 * longer than the keep-alive and idle times: what we hold is still delivered, then on_end(0)
 * (not -ECONNRESET from the RESET our keep-alive gets, nor -ETIMEDOUT). */
static void test_remote_closed_while_paused(void **state)
{
    struct sim *sim = sim_new(26, 2, 0);
    struct conn *a, *b;

    (void)state;
    sim_links(sim, 0, 10 * MS, 0, 0);
    sim->nodes[1].accept_paused = 1;
    sim->nodes[1].tmpl.rx_key = 27;
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 300000;
    a->tx_key = 27;
    a->close_when_done = 1;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    sim_run(sim, 150 * SEC, NULL, NULL);
    assert_int_equal(dg_utp_count(sim->nodes[0].u), 0);
    assert_false(b->ended);
    assert_int_equal(b->received, 0);
    assert_int_equal(dg_utp_write(b->s, (const uint8_t *)"x", 1, sim->now), -EPIPE);
    dg_utp_set_reading(b->s, 1, sim->now);
    assert_int_equal(b->received, 300000);
    assert_true(b->ended);
    assert_int_equal(b->err, 0);
    assert_int_equal(b->bad, 0);
    conn_close(b);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    sim_free(sim);
}

static void test_close_with_queued_data(void **state)
{
    struct sim *sim = sim_new(14, 2, 0);
    struct conn *a, *b;

    (void)state;
    sim_links(sim, 0.01, 30 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 3 * MIB;
    a->tx_key = 10;
    a->close_when_done = 1;
    sim->nodes[1].tmpl.rx_key = 10;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    assert_true(sim_run(sim, 600 * SEC, cond_ended, b));
    assert_true(a->closed);
    assert_true(a->queued_at_close > 100000); /* much was still queued when it closed */
    assert_true(a->nwritable > 0);
    assert_int_equal(b->err, 0);
    assert_int_equal(b->received_at_end, 3 * MIB);
    assert_int_equal(b->bad, 0);
    conn_close(b);
    assert_true(sim_run(sim, 60 * SEC, cond_all_freed, NULL));
    sim_free(sim);
}

struct bp {
    struct conn *a, *b;
    uint64_t max_in_flight, max_held;
    int check;
};

static void check_backpressure(struct sim *sim)
{
    struct bp *bp = sim->spy_arg;
    struct dg_utp_sock_info ia, ib;

    if (!bp->check || !bp->b)
        return;
    dg_utp_sock_get_info(bp->a->s, &ia);
    dg_utp_sock_get_info(bp->b->s, &ib);
    if (ia.in_flight > bp->max_in_flight)
        bp->max_in_flight = ia.in_flight;
    if (ib.recv_held > bp->max_held)
        bp->max_held = ib.recv_held;
    /* What is in flight fits the window the receiver last offered (one probe aside). */
    if (ia.in_flight > DG_UTP_RECV_BUFFER || ib.recv_held > DG_UTP_RECV_BUFFER ||
        ia.in_flight > ia.peer_window + ia.packet_size)
        sim->hook_fail++;
}

/* Drops the first STATE node 1 sends after bp->check went to 2 (the window update). */
static long drop_window_update(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    struct bp *bp = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 1 && bp->check == 2 && ptype(buf) == T_STATE && pwnd(buf) > 0) {
        bp->check = 3;
        return -1;
    }
    return 0;
}

static void test_backpressure(void **state)
{
    struct sim *sim = sim_new(15, 2, 0);
    struct bp bp;
    struct pair p;
    struct dg_utp_stats st;

    (void)state;
    memset(&bp, 0, sizeof(bp));
    sim_links(sim, 0, 10 * MS, 0, 0);
    sim->nodes[1].accept_paused = 1;
    sim->nodes[1].tmpl.rx_key = 11;
    sim->spy = drop_window_update;
    sim->spy_arg = &bp;
    sim->step_hook = check_backpressure;
    bp.a = sim_connect(sim, 0, 1, 0, 0);
    bp.a->to_send = 4 * MIB;
    bp.a->tx_key = 11;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, bp.a));
    bp.b = accepted(sim, 1, 0);
    bp.check = 1;
    /* Paused for longer than the idle timeout: the connection must stay up. */
    sim_run(sim, 90 * SEC, NULL, NULL);
    assert_int_equal(sim->hook_fail, 0);
    assert_int_equal(bp.b->received, 0);
    assert_false(bp.a->ended);
    assert_false(bp.b->ended);
    assert_true(bp.max_held >= DG_UTP_RECV_BUFFER - DG_UTP_MAX_PACKET);
    assert_true(bp.max_in_flight <= DG_UTP_RECV_BUFFER);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    printf("# paused 90 s: receiver held %llu bytes, %llu packets dropped for lack of room\n",
           (unsigned long long)bp.max_held, (unsigned long long)st.dropped);
    assert_true(st.dropped <= 90 * SEC / (500 * MS) + 2); /* window probes only */
    /* Resume; the window update is lost, so a window probe has to restart the flow. */
    bp.check = 2;
    dg_utp_set_reading(bp.b->s, 1, sim->now);
    assert_int_equal(bp.check, 3);
    assert_true(bp.b->received >= DG_UTP_RECV_BUFFER - DG_UTP_MAX_PACKET);
    /* The probe comes within a second or two, not with the next keep-alive. */
    p = (struct pair){bp.a, bp.b, 0, bp.b->received + 1};
    assert_true(sim_run(sim, 3 * SEC, cond_pair_done, &p));
    p = (struct pair){bp.a, bp.b, 0, 4 * MIB};
    assert_true(sim_run(sim, 60 * SEC, cond_pair_done, &p));
    assert_int_equal(bp.b->bad, 0);
    assert_int_equal(sim->hook_fail, 0);
    sim_free(sim);
}

/* Remembers the connection id and sequence numbers of the last packets each way. */
struct ids {
    uint16_t a_to_b_conn, b_seq, b_ack;
    int seen;
};

static long watch_ids(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    struct ids *ids = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 0 && ptype(buf) != T_SYN) {
        ids->a_to_b_conn = pconn(buf);
        ids->seen |= 1;
    }
    if (from == 1 && ptype(buf) == T_STATE) {
        ids->b_seq = pseq(buf);
        ids->b_ack = pack(buf);
        ids->seen |= 2;
    }
    return 0;
}

static void test_malformed(void **state)
{
    struct sim *sim = sim_new(16, 2, 0);
    struct ids ids;
    struct conn *a, *b;
    struct dg_utp_stats st0, st;
    uint8_t p[600];
    size_t n;
    struct pair pr;
    const struct sockaddr_in *from = &sim->nodes[0].addr;

    (void)state;
    memset(&ids, 0, sizeof(ids));
    sim->spy = watch_ids;
    sim->spy_arg = &ids;
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 2 * MIB;
    a->tx_key = 12;
    sim->nodes[1].tmpl.rx_key = 12;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    while (b->received < 500000)
        sim_step(sim);
    assert_int_equal(ids.seen, 3);
    dg_utp_get_stats(sim->nodes[1].u, &st0);

    /* Not uTP at all: the caller's demultiplexer gets 0 and nothing is counted. */
    n = make_packet(p, T_STATE, ids.a_to_b_conn, 1, ids.b_seq);
    assert_int_equal(inject(sim, 1, from, p, 10), 0); /* truncated header */
    assert_int_equal(inject(sim, 1, from, p, 0), 0);  /* empty */
    p[0] = T_STATE << 4 | 2;                          /* version 2 */
    assert_int_equal(inject(sim, 1, from, p, n), 0);
    p[0] = 7 << 4 | 1; /* type 7 */
    assert_int_equal(inject(sim, 1, from, p, n), 0);
    assert_int_equal(inject(sim, 1, from, (const uint8_t *)"d1:ad2:id20:", 12), 0); /* DHT */
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.malformed, st0.malformed);
    assert_int_equal(st.packets_in, st0.packets_in);

    /* uTP, but broken: counted, ignored. (Node 1's STATE carries the number of its next
     * packet, so b_seq - 1 is the valid ack.) */
    n = make_packet(p, T_STATE, ids.a_to_b_conn, 1, (uint16_t)(ids.b_seq - 1));
    p[1] = 1; /* SACK of 3 bytes */
    p[n] = 0;
    p[n + 1] = 3;
    memset(p + n + 2, 0xff, 3);
    assert_int_equal(inject(sim, 1, from, p, n + 5), 1);
    p[n + 1] = 0; /* SACK of 0 bytes */
    assert_int_equal(inject(sim, 1, from, p, n + 2), 1);
    p[1] = 9; /* unknown extension claiming 200 bytes of 10 */
    p[n] = 0;
    p[n + 1] = 200;
    assert_int_equal(inject(sim, 1, from, p, n + 10), 1);
    p[1] = 1; /* an extension header cut in half */
    assert_int_equal(inject(sim, 1, from, p, n + 1), 1);
    /* A long chain of empty unknown extensions running off the end. */
    p[1] = 2;
    for (size_t i = n; i < sizeof(p); i += 2) {
        p[i] = 2;
        p[i + 1] = 0;
    }
    assert_int_equal(inject(sim, 1, from, p, sizeof(p)), 1);
    /* Acks of data node 1 never sent. */
    n = make_packet(p, T_STATE, ids.a_to_b_conn, 1, (uint16_t)(ids.b_seq + 100));
    assert_int_equal(inject(sim, 1, from, p, n), 1);
    n = make_packet(p, T_DATA, ids.a_to_b_conn, 1, ids.b_seq);
    assert_int_equal(inject(sim, 1, from, p, n + 5), 1);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.malformed, st0.malformed + 7);

    /* Well formed, harmless: an unknown extension is skipped; a SACK of 252 bytes all set
     * over nothing outstanding; an old ack. */
    n = make_packet(p, T_STATE, ids.a_to_b_conn, 1, (uint16_t)(ids.b_seq - 1));
    p[1] = 42;
    p[n] = 1;
    p[n + 1] = 4;
    memset(p + n + 2, 0, 4);
    p[n + 6] = 0;
    p[n + 7] = 252;
    memset(p + n + 8, 0xff, 252);
    assert_int_equal(inject(sim, 1, from, p, n + 8 + 252), 1);
    n = make_packet(p, T_STATE, ids.a_to_b_conn, 1, (uint16_t)(ids.b_seq - 30000));
    assert_int_equal(inject(sim, 1, from, p, n), 1);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.malformed, st0.malformed + 7);
    assert_int_equal(st.unknown, st0.unknown);
    /* Data far past the receive buffer's 1024 packets: dropped (and counted), not held. */
    struct dg_utp_sock_info bi;
    dg_utp_sock_get_info(b->s, &bi);
    n = make_packet(p, T_DATA, ids.a_to_b_conn, (uint16_t)(ids.b_ack + 1500),
                    (uint16_t)(ids.b_seq - 1));
    assert_int_equal(inject(sim, 1, from, p, n + 100), 1);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.dropped, st0.dropped + 1);
    dg_utp_sock_get_info(b->s, &bi);
    assert_true(bi.recv_held < DG_UTP_RECV_BUFFER);

    /* A packet for no connection gets a RESET; a RESET for none gets nothing. */
    uint64_t sent = sim->nodes[1].sent_by_path[0];
    n = make_packet(p, T_DATA, (uint16_t)(ids.a_to_b_conn + 7), 5, 5);
    struct sockaddr_in stranger = *from;
    stranger.sin_port = htons(9);
    assert_int_equal(inject(sim, 1, &stranger, p, n + 3), 1);
    assert_int_equal(sim->nodes[1].sent_by_path[0], sent + 1);
    n = make_packet(p, T_RESET, 1234, 5, 5);
    assert_int_equal(inject(sim, 1, &stranger, p, n), 1);
    assert_int_equal(sim->nodes[1].sent_by_path[0], sent + 1);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.unknown, st0.unknown + 1);

    /* The connection is unharmed. */
    pr = (struct pair){a, b, 0, 2 * MIB};
    assert_true(sim_run(sim, 60 * SEC, cond_pair_done, &pr));
    assert_int_equal(b->bad, 0);
    assert_false(a->ended);
    assert_false(b->ended);
    sim_free(sim);
}

static void test_max_conns(void **state)
{
    struct sim *sim = sim_new(17, 2, 0);
    struct node *b = &sim->nodes[1];
    struct dg_utp_stats st;
    uint8_t p[DG_UTP_HEADER_LEN];
    struct sockaddr_in from = sim->nodes[0].addr;
    uint64_t sent;

    (void)state;
    b->anonymous = 1;
    for (uint32_t i = 0; i < DG_UTP_MAX_CONNS + 5; i++) {
        from.sin_addr.s_addr = htonl(0x0a010000 + i / 16);
        from.sin_port = htons((uint16_t)(1000 + i % 16));
        make_packet(p, T_SYN, (uint16_t)(i * 7), (uint16_t)i, 0);
        assert_int_equal(inject(sim, 1, &from, p, sizeof(p)), 1);
    }
    assert_int_equal(dg_utp_count(b->u), DG_UTP_MAX_CONNS);
    dg_utp_get_stats(b->u, &st);
    assert_int_equal(st.overflow, 5);
    assert_int_equal(b->naccepted, DG_UTP_MAX_CONNS);
    /* Every SYN was answered: a STATE, or a RESET for the last five. */
    assert_int_equal(b->sent_by_path[0], DG_UTP_MAX_CONNS + 5);

    /* The first SYN again: answered again, not accepted twice. */
    sent = b->sent_by_path[0];
    from.sin_addr.s_addr = htonl(0x0a010000);
    from.sin_port = htons(1000);
    make_packet(p, T_SYN, 0, 0, 0);
    assert_int_equal(inject(sim, 1, &from, p, sizeof(p)), 1);
    assert_int_equal(b->naccepted, DG_UTP_MAX_CONNS);
    assert_int_equal(b->sent_by_path[0], sent + 1);

    /* Nobody follows up: after the idle timeout they all end (and close at once). */
    sim->now += DG_UTP_IDLE_TIMEOUT_US;
    dg_utp_tick(b->u, sim->now);
    dg_utp_tick(b->u, sim->now);
    assert_int_equal(dg_utp_count(b->u), 0);
    make_packet(p, T_SYN, 99, 99, 0);
    assert_int_equal(inject(sim, 1, &from, p, sizeof(p)), 1);
    assert_int_equal(dg_utp_count(b->u), 1);
    sim_free(sim);
}

static void test_paths(void **state)
{
    struct sim *sim = sim_new(18, 2, 0);
    struct conn *a, *a2, *b, *b2;
    struct pair p;

    (void)state;
    sim->nodes[1].tmpl.echo = 1;
    a = sim_connect(sim, 0, 1, 2, 3); /* from node 0's path 2 to node 1's path 3 */
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    assert_int_equal(dg_utp_sock_path(a->s), 2);
    assert_int_equal(dg_utp_sock_path(b->s), 3);
    a2 = sim_connect(sim, 0, 1, 0, 0);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a2));
    b2 = accepted(sim, 1, 1);
    assert_int_equal(dg_utp_sock_path(b2->s), 0);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"on path three", 13, sim->now), 13);
    assert_int_equal(dg_utp_write(a2->s, (const uint8_t *)"on path zero", 12, sim->now), 12);
    p = (struct pair){a, b, 13, 13};
    assert_true(sim_run(sim, 5 * SEC, cond_pair_done, &p));
    sim_run(sim, 1 * SEC, NULL, NULL);
    assert_memory_equal(a->small, "on path three", 13);
    assert_memory_equal(a2->small, "on path zero", 12);
    /* Node 1 used path 3 and path 0 only; node 0 paths 2 and 0 only. */
    for (int i = 0; i < NPATHS; i++) {
        if (i != 0 && i != 3)
            assert_int_equal(sim->nodes[1].sent_by_path[i], 0);
        if (i != 0 && i != 2)
            assert_int_equal(sim->nodes[0].sent_by_path[i], 0);
    }
    assert_true(sim->nodes[1].sent_by_path[3] > 0);
    assert_true(sim->nodes[0].sent_by_path[2] > 0);
    sim_free(sim);
}

/* on_read closes its own connection (and another one) while more data is due in the same
 * delivery run: no more callbacks, no use after free. */
static void test_close_from_read(void **state)
{
    struct sim *sim = sim_new(19, 2, 0);
    struct conn *a, *a2, *b, *b2;
    struct dg_utp_stats st;

    (void)state;
    sim->nodes[1].accept_paused = 1;
    sim->nodes[1].tmpl.rx_key = 13;
    a = sim_connect(sim, 0, 1, 0, 0);
    a2 = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = a2->to_send = 200000;
    a->tx_key = a2->tx_key = 13;
    a->chunk = a2->chunk = 1000; /* many small packets */
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a2));
    sim_run(sim, 2 * SEC, NULL, NULL);
    b = accepted(sim, 1, 0);
    b2 = accepted(sim, 1, 1);
    assert_int_equal(b->received, 0);
    b->close_at_read = 1;
    b->close_too = b2;
    dg_utp_set_reading(b->s, 1, sim->now);
    assert_int_equal(b->reads, 1);
    assert_true(b->closed);
    assert_true(b2->closed);
    assert_int_equal(b->after_close + b2->after_close, 0);
    /* Both remote ends see the end of the stream (FIN), the rest is discarded. */
    assert_true(sim_run(sim, 30 * SEC, cond_ended, a));
    assert_true(sim_run(sim, 30 * SEC, cond_ended, a2));
    assert_int_equal(a->err, 0);
    assert_int_equal(a2->err, 0);
    conn_close(a);
    conn_close(a2);
    assert_true(sim_run(sim, 30 * SEC, cond_all_freed, NULL));
    assert_int_equal(b->after_close + b2->after_close, 0);
    dg_utp_get_stats(sim->nodes[1].u, &st);
    assert_int_equal(st.malformed, 0);
    sim_free(sim);
}

/* The STATE answering the SYN is lost: the retransmitted SYN gets another, not a second
 * accept; data the acceptor wrote in on_accept (dropped by the initiator before it was
 * connected) still arrives. */
static long drop_first_state(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    int *dropped = sim->spy_arg;
    (void)to;
    (void)len;
    if (from == 1 && ptype(buf) == T_STATE && !*dropped) {
        *dropped = 1;
        return -1;
    }
    return 0;
}

static void test_syn_retransmit(void **state)
{
    struct sim *sim = sim_new(20, 2, 0);
    struct conn *a, *b;
    struct pair p;
    int dropped = 0;

    (void)state;
    sim_links(sim, 0, 20 * MS, 0, 0);
    sim->spy = drop_first_state;
    sim->spy_arg = &dropped;
    sim->nodes[1].tmpl.to_send = 100000;
    sim->nodes[1].tmpl.tx_key = 14;
    a = sim_connect(sim, 0, 1, 0, 0);
    a->rx_key = 14;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    assert_true(dropped);
    assert_true(a->connected_at - START_US >= SEC); /* on the second SYN */
    assert_int_equal(sim->nodes[1].naccepted, 1);
    b = accepted(sim, 1, 0);
    p = (struct pair){a, b, 100000, 0};
    assert_true(sim_run(sim, 30 * SEC, cond_pair_done, &p));
    assert_int_equal(a->bad, 0);
    sim_free(sim);
}

static void test_keepalive_idle(void **state)
{
    struct sim *sim = sim_new(21, 2, 0);
    struct conn *a, *b;
    uint64_t down_at;

    (void)state;
    sim_links(sim, 0, 40 * MS, 0, 0);
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    sim_run(sim, 300 * SEC, NULL, NULL);
    assert_false(a->ended);
    assert_false(b->ended);
    /* A keep-alive each way every DG_UTP_KEEPALIVE_US, not more. */
    assert_true(sim->nodes[0].sent_by_path[0] >= 300 * SEC / DG_UTP_KEEPALIVE_US);
    assert_true(sim->nodes[0].sent_by_path[0] <= 300 * SEC / DG_UTP_KEEPALIVE_US + 3);
    down_at = sim->now;
    sim_down(sim, 1);
    assert_true(sim_run(sim, 100 * SEC, cond_ended, a));
    assert_true(sim_run(sim, 100 * SEC, cond_ended, b));
    assert_int_equal(a->err, -ETIMEDOUT);
    assert_int_equal(b->err, -ETIMEDOUT);
    assert_true(a->end_at - down_at <= DG_UTP_IDLE_TIMEOUT_US + SEC);
    sim_free(sim);
}

/* A 1 MB/s bottleneck with a deep queue: LEDBAT keeps the queue near its 100 ms target
 * instead of filling it, and still uses the link. */
static void test_ledbat_bottleneck(void **state)
{
    struct sim *sim = sim_new(22, 2, 0);
    struct conn *a, *b;
    uint64_t t0, at10;
    double avg;

    (void)state;
    sim_links(sim, 0, 10 * MS, 0, 0);
    sim->link[0][1].rate = 1000000;
    sim->link[0][1].qlimit = 3 * SEC;
    a = sim_connect(sim, 0, 1, 0, 0);
    a->to_send = 40 * MIB;
    a->tx_key = 15;
    sim->nodes[1].tmpl.rx_key = 15;
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    b = accepted(sim, 1, 0);
    t0 = sim->now;
    sim->queue_measure_from = t0 + 10 * SEC;
    sim_run(sim, 10 * SEC, NULL, NULL);
    at10 = b->received;
    sim_run(sim, 20 * SEC, NULL, NULL);
    avg = (double)sim->queue_sum / (double)sim->queue_n;
    printf("# 1 MB/s bottleneck: %.0f KB/s, queuing delay avg %.1f ms, max %.1f ms\n",
           (double)(b->received - at10) / 20.0 / 1000.0, avg / 1000.0,
           (double)sim->queue_max / 1000.0);
    assert_int_equal(b->bad, 0);
    assert_true(avg < 150 * MS);
    assert_true(sim->queue_max < 400 * MS);
    assert_true(b->received - at10 > 20 * 800000); /* over 80% of the link */
    sim_free(sim);
}

struct sizes {
    size_t max_from_a;
};

static long watch_sizes(struct sim *sim, int from, int to, const uint8_t *buf, size_t len)
{
    struct sizes *sz = sim->spy_arg;
    (void)to;
    (void)buf;
    if (from == 0 && len > sz->max_from_a)
        sz->max_from_a = len;
    return 0;
}

static void test_packet_sizes(void **state)
{
    struct sizes sz = {0};
    struct sim *sim = sim_new(23, 2, 1); /* 127.0.0.1 */
    uint64_t took;

    (void)state;
    sim->spy = watch_sizes;
    sim->spy_arg = &sz;
    sim_links(sim, 0, 20, 0, 0);
    took = transfer(sim, 10 * MIB, 0, 60 * SEC);
    report("10 MiB on loopback (16000-byte packets), 20 us delay", 10 * MIB, took);
    assert_int_equal(sz.max_from_a, DG_UTP_HEADER_LEN + DG_UTP_LOOPBACK_PACKET);
    sim_free(sim);

    sz.max_from_a = 0;
    sim = sim_new(24, 2, 0); /* 10.0.0.x */
    sim->spy = watch_sizes;
    sim->spy_arg = &sz;
    transfer(sim, 1 * MIB, 0, 60 * SEC);
    assert_int_equal(sz.max_from_a, DG_UTP_HEADER_LEN + DG_UTP_MAX_PACKET);
    sim_free(sim);
}

/* The remote resets an established connection. */
static void test_reset(void **state)
{
    struct sim *sim = sim_new(25, 2, 0);
    struct conn *a, *b;
    struct ids ids;
    uint8_t p[DG_UTP_HEADER_LEN];

    (void)state;
    memset(&ids, 0, sizeof(ids));
    sim->spy = watch_ids;
    sim->spy_arg = &ids;
    a = sim_connect(sim, 0, 1, 0, 0);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"x", 1, sim->now), -ENOTCONN);
    assert_true(sim_run(sim, 5 * SEC, cond_connected, a));
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"x", 1, sim->now), 1);
    sim_run(sim, 1 * SEC, NULL, NULL);
    b = accepted(sim, 1, 0);
    /* A RESET from node 0 as node 1 knows it (our send id == its receive id). */
    make_packet(p, T_RESET, ids.a_to_b_conn, 0, 0);
    assert_int_equal(inject(sim, 1, &sim->nodes[0].addr, p, sizeof(p)), 1);
    assert_true(b->ended);
    assert_int_equal(b->err, -ECONNRESET);
    conn_close(b);
    /* Node 0 keeps sending; node 1 answers with RESET once it forgot the connection. */
    sim_run(sim, 1 * SEC, NULL, NULL);
    assert_int_equal(dg_utp_write(a->s, (const uint8_t *)"y", 1, sim->now), 1);
    assert_true(sim_run(sim, 5 * SEC, cond_ended, a));
    assert_int_equal(a->err, -ECONNRESET);
    conn_close(a);
    assert_true(sim_run(sim, 1 * SEC, cond_all_freed, NULL));
    sim_free(sim);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connect_echo),
        cmocka_unit_test(test_small_writes_coalesce),
        cmocka_unit_test(test_bulk_one_way),
        cmocka_unit_test(test_bulk_both_ways),
        cmocka_unit_test(test_wraparound),
        cmocka_unit_test(test_loss_5pct_50ms),
        cmocka_unit_test(test_loss_20pct),
        cmocka_unit_test(test_reorder_duplicate),
        cmocka_unit_test(test_sack_fast_retransmit),
        cmocka_unit_test(test_tail_loss_probe),
        cmocka_unit_test(test_peer_without_sack),
        cmocka_unit_test(test_duplicate_acks),
        cmocka_unit_test(test_no_progress_gives_up),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_connect_timeout),
        cmocka_unit_test(test_remote_dies),
        cmocka_unit_test(test_fin_after_data),
        cmocka_unit_test(test_close_with_queued_data),
        cmocka_unit_test(test_remote_closed_while_paused),
        cmocka_unit_test(test_backpressure),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_max_conns),
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_close_from_read),
        cmocka_unit_test(test_syn_retransmit),
        cmocka_unit_test(test_keepalive_idle),
        cmocka_unit_test(test_ledbat_bottleneck),
        cmocka_unit_test(test_packet_sizes),
        cmocka_unit_test(test_reset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
