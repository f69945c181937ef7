/* Unit tests for engine/dht.c: DHT nodes on a simulated network.
 *
 * The network is a list of datagrams in flight, each delivered after a fixed delay by a fake
 * clock, optionally lost at random (seeded PRNG). Nodes live at 10.0.x.y:6881 (exempt from
 * BEP 42, so ids are random). "Probes" are test-controlled endpoints at 10.9.0.x: what the
 * nodes send them is captured, and the test writes raw datagrams to the nodes from them. Every
 * datagram any node sends is checked: it parses with dg_krpc_parse(), is no longer than
 * DG_DHT_MAX_PACKET, carries at most 8 nodes and DG_DHT_MAX_VALUES values, and every response
 * or error carries the receiver's address as "ip". */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dht.h"
#include "engine/dht_table.h"
#include "engine/krpc.h"
#include "engine/node_id.h"

#define MAXN 64
#define MAXPROBE 128
#define DELAY_MS 5
#define T0 1000000u
#ifndef SEED_OFFSET
#define SEED_OFFSET 0 /* rebuild with -DSEED_OFFSET=n to run every scenario on other seeds */
#endif

/* ---- randomness ---- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_bytes(void *arg, void *buf, size_t len)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)rng_next(arg);
}

/* ---- the simulated network ---- */

struct pkt {
    struct sockaddr_storage from, to;
    uint64_t at;
    size_t len;
    uint8_t buf[DG_DHT_MAX_PACKET];
};

struct captured {
    int probe; /* index of the probe it went to */
    size_t len;
    uint8_t buf[DG_DHT_MAX_PACKET];
};

struct net;

struct endpoint {
    struct net *net;
    int idx;
};

enum net_mode {
    NET_LOCAL,    /* 10.0.x.y:6881 (or fd00::x), exempt from BEP 42 */
    NET_LOOPBACK, /* 127.0.0.1:(7000 + i), DG_DHT_TABLE_SAME_IP */
    NET_PUBLIC,   /* 1.x.y.z:6881 with BEP 42-valid ids, BEP 42 enforced */
};

struct net {
    int family;
    enum net_mode mode;
    uint64_t now;
    uint64_t rng;
    unsigned loss_pct;
    int n;
    struct dg_dht *node[MAXN];
    struct sockaddr_storage addr[MAXN];
    struct endpoint ep[MAXN];
    uint64_t next_tick[MAXN];
    int dead[MAXN];    /* packets to a dead node vanish */
    int hard[MAXN];    /* behind a hard NAT: another source port for every destination */
    int implied[MAXN]; /* announces with implied_port */
    struct sockaddr_storage probe[MAXPROBE];
    struct pkt *q;
    size_t nq, capq;
    struct captured *cap;
    size_t ncap, capcap;
    size_t sent, lost, max_len;
};

static struct sockaddr_storage v4n(uint32_t ip, uint16_t port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    sin->sin_addr.s_addr = htonl(ip);
    return ss;
}

/* fd00::HI:LO (a unique local address, exempt from BEP 42). */
static struct sockaddr_storage v6n(uint16_t hi, uint16_t lo, uint16_t port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    sin6->sin6_addr.s6_addr[0] = 0xfd;
    sin6->sin6_addr.s6_addr[12] = (uint8_t)(hi >> 8);
    sin6->sin6_addr.s6_addr[13] = (uint8_t)hi;
    sin6->sin6_addr.s6_addr[14] = (uint8_t)(lo >> 8);
    sin6->sin6_addr.s6_addr[15] = (uint8_t)lo;
    return ss;
}

static socklen_t sslen(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

static int addr_eq(const struct sockaddr_storage *a, const struct sockaddr *b)
{
    uint8_t x[DG_DHT_COMPACT6_LEN], y[DG_DHT_COMPACT6_LEN];
    int lx = dg_dht_addr_to_compact((const struct sockaddr *)a, x);
    int ly = dg_dht_addr_to_compact(b, y);

    return lx > 0 && lx == ly && memcmp(x, y, (size_t)lx) == 0;
}

/* Checks every datagram a node sends. */
static void check_sent(const struct sockaddr *to, const uint8_t *buf, size_t len)
{
    struct dg_krpc_msg *m = malloc(sizeof(*m));
    uint8_t c[DG_DHT_COMPACT6_LEN];

    assert_non_null(m);
    assert_true(len <= DG_DHT_MAX_PACKET);
    assert_int_equal(dg_krpc_parse(buf, len, m), 0);
    assert_true(m->nnodes <= DG_DHT_K && m->nnodes6 <= DG_DHT_K);
    assert_true(m->nvalues <= DG_DHT_MAX_VALUES);
    if (m->type != DG_KRPC_QUERY) {
        assert_true(m->has & DG_KRPC_HAS_IP);
        int cl = dg_dht_addr_to_compact(to, c);
        assert_true(cl == 6 || cl == 18);
        assert_int_equal(m->ip_len, cl);
        assert_memory_equal(m->ip, c, (size_t)cl);
    } else {
        assert_int_equal(m->tid_len, DG_DHT_TID_LEN);
    }
    free(m);
}

static int net_send(void *arg, const struct sockaddr *to, socklen_t tolen, const uint8_t *buf,
                    size_t len)
{
    struct endpoint *ep = arg;
    struct net *net = ep->net;

    assert_int_equal(tolen, to->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                      : sizeof(struct sockaddr_in));
    check_sent(to, buf, len);
    net->sent++;
    if (len > net->max_len)
        net->max_len = len;
    for (int p = 0; p < MAXPROBE; p++) {
        if (net->probe[p].ss_family && addr_eq(&net->probe[p], to)) {
            if (net->ncap == net->capcap) {
                net->capcap = net->capcap ? 2 * net->capcap : 64;
                net->cap = realloc(net->cap, net->capcap * sizeof(*net->cap));
                assert_non_null(net->cap);
            }
            struct captured *c = &net->cap[net->ncap++];
            c->probe = p;
            c->len = len;
            memcpy(c->buf, buf, len);
            return 0;
        }
    }
    if (net->loss_pct && rng_next(&net->rng) % 100 < net->loss_pct) {
        net->lost++;
        return 0;
    }
    if (net->nq == net->capq) {
        net->capq = net->capq ? 2 * net->capq : 256;
        net->q = realloc(net->q, net->capq * sizeof(*net->q));
        assert_non_null(net->q);
    }
    struct pkt *k = &net->q[net->nq++];
    k->from = net->addr[ep->idx];
    if (net->hard[ep->idx] && to->sa_family == AF_INET) {
        const struct sockaddr_in *t4 = (const struct sockaddr_in *)to;
        uint32_t h = ntohl(t4->sin_addr.s_addr) * 2654435761u + ntohs(t4->sin_port);
        ((struct sockaddr_in *)&k->from)->sin_port = htons((uint16_t)(20000 + h % 20000));
    }
    memset(&k->to, 0, sizeof(k->to));
    memcpy(&k->to, to, tolen);
    k->at = net->now + DELAY_MS;
    k->len = len;
    memcpy(k->buf, buf, len);
    return 0;
}

static struct net *net_new_family(uint64_t seed, int family)
{
    struct net *net = calloc(1, sizeof(*net));

    assert_non_null(net);
    net->family = family;
    net->now = T0;
    net->rng = seed + SEED_OFFSET;
    for (int p = 0; p < MAXPROBE; p++)
        net->probe[p] = family == AF_INET6 ? v6n(9, (uint16_t)(p + 1), 7000)
                                           : v4n(0x0a090000u + 1 + (uint32_t)p, 7000);
    return net;
}

static struct net *net_new(uint64_t seed)
{
    return net_new_family(seed, AF_INET);
}

static const uint8_t version[4] = {'D', 'G', '0', '1'};

/* Adds a node at 10.0.(i/200).(i%200+1):6881 with a random id (or @p id). */
static int net_add_cfg(struct net *net, const uint8_t *id, const struct dg_dht_ratelimit_config *rl)
{
    int i = net->n++;
    struct dg_dht_config cfg;

    assert_true(i < MAXN);
    memset(&cfg, 0, sizeof(cfg));
    cfg.family = net->family;
    if (id) {
        cfg.have_id = 1;
        memcpy(cfg.id, id, DG_NODE_ID_LEN);
    }
    cfg.send = net_send;
    cfg.send_arg = &net->ep[i];
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = &net->rng;
    cfg.version = version;
    cfg.version_len = sizeof(version);
    cfg.ratelimit = rl;
    cfg.implied_port = net->implied[i];
    net->ep[i].net = net;
    net->ep[i].idx = i;
    if (net->family == AF_INET6)
        net->addr[i] = v6n(0, (uint16_t)(i + 1), 6881);
    else if (net->mode == NET_LOOPBACK)
        net->addr[i] = v4n(0x7f000001u, (uint16_t)(7000 + i));
    else if (net->mode == NET_PUBLIC)
        net->addr[i] = v4n(0x01000000u + (uint32_t)i * 7919u + 1, 6881);
    else
        net->addr[i] = v4n(0x0a000000u + ((uint32_t)i / 200) * 256 + (uint32_t)i % 200 + 1, 6881);
    if (net->mode == NET_LOOPBACK)
        cfg.table_flags = DG_DHT_TABLE_SAME_IP;
    if (net->mode == NET_PUBLIC && !id) {
        cfg.have_id = 1;
        assert_int_equal(dg_node_id_make((struct sockaddr *)&net->addr[i],
                                         (uint8_t)rng_next(&net->rng), rng_bytes, &net->rng,
                                         cfg.id),
                         0);
    }
    assert_int_equal(dg_dht_new(&cfg, net->now, &net->node[i]), 0);
    net->next_tick[i] = net->now;
    return i;
}

static int net_add(struct net *net)
{
    return net_add_cfg(net, NULL, NULL);
}

static void net_free(struct net *net)
{
    for (int i = 0; i < net->n; i++)
        dg_dht_free(net->node[i]);
    free(net->q);
    free(net->cap);
    free(net);
}

/* What the engine does after every call other than dg_dht_tick(): a query may have been sent,
 * so the node wants a tick within DG_DHT_QUERY_TIMEOUT_MS at the latest. */
static void rearm(struct net *net, int i)
{
    if (net->next_tick[i] > net->now + DG_DHT_QUERY_TIMEOUT_MS)
        net->next_tick[i] = net->now + DG_DHT_QUERY_TIMEOUT_MS;
}

/* Delivers what is due and ticks the nodes that asked for it, until @p until_ms. */
static void net_run(struct net *net, uint64_t ms)
{
    uint64_t until = net->now + ms;

    for (int i = 0; i < net->n; i++)
        rearm(net, i); /* after calls made by the test */
    while (net->now <= until) {
        for (;;) {
            size_t i;
            for (i = 0; i < net->nq; i++)
                if (net->q[i].at <= net->now)
                    break;
            if (i == net->nq)
                break;
            struct pkt k = net->q[i];
            memmove(&net->q[i], &net->q[i + 1], (net->nq - i - 1) * sizeof(*net->q));
            net->nq--;
            for (int j = 0; j < net->n; j++) {
                if (addr_eq(&net->addr[j], (const struct sockaddr *)&k.to) ||
                    (net->hard[j] && k.to.ss_family == AF_INET &&
                     ((struct sockaddr_in *)&net->addr[j])->sin_addr.s_addr ==
                         ((struct sockaddr_in *)&k.to)->sin_addr.s_addr)) {
                    if (!net->dead[j]) {
                        dg_dht_receive(net->node[j], k.buf, k.len, (struct sockaddr *)&k.from,
                                       sslen(&k.from), net->now);
                        rearm(net, j);
                    }
                    break;
                }
            }
        }
        for (int j = 0; j < net->n; j++) {
            if (!net->dead[j] && net->next_tick[j] <= net->now) {
                uint64_t w = dg_dht_tick(net->node[j], net->now);
                assert_true(w <= 60000);
                net->next_tick[j] = net->now + (w ? w : 1);
            }
        }
        net->now += 1;
    }
}

static void tick_all(struct net *net)
{
    for (int j = 0; j < net->n; j++)
        net->next_tick[j] = net->now;
}

/* Sends raw bytes from probe @p p to node @p i, now. */
static void probe_send(struct net *net, int p, int i, const void *buf, size_t len)
{
    dg_dht_receive(net->node[i], buf, len, (const struct sockaddr *)&net->probe[p],
                   sslen(&net->probe[p]), net->now);
}

/* The last captured response or error to probe @p p, or NULL; clears the capture list. */
static int take_reply(struct net *net, int p, struct captured *out)
{
    int found = 0;

    for (size_t i = 0; i < net->ncap; i++) {
        struct dg_krpc_msg *m = malloc(sizeof(*m));
        assert_non_null(m);
        if (net->cap[i].probe == p && dg_krpc_parse(net->cap[i].buf, net->cap[i].len, m) == 0 &&
            m->type != DG_KRPC_QUERY) {
            *out = net->cap[i];
            found = 1;
        }
        free(m);
    }
    net->ncap = 0;
    return found;
}

static struct dg_dht_stats stats_of(struct net *net, int i)
{
    struct dg_dht_stats st;
    dg_dht_stats(net->node[i], net->now, &st);
    return st;
}

/* n nodes, all bootstrapped from node 0, one every 200 ms, then run for @p ms. */
static struct net *net_swarm_mode(int n, uint64_t seed, uint64_t ms, int family, enum net_mode mode)
{
    struct net *net = net_new_family(seed, family);

    net->mode = mode;
    for (int i = 0; i < n; i++)
        net_add(net);
    for (int i = 1; i < n; i++) {
        assert_int_equal(dg_dht_bootstrap(net->node[i], (struct sockaddr *)&net->addr[0],
                                          sslen(&net->addr[0]), net->now),
                         0);
        net_run(net, 200);
    }
    net_run(net, ms);
    return net;
}

static struct net *net_swarm(int n, uint64_t seed, uint64_t ms)
{
    return net_swarm_mode(n, seed, ms, AF_INET, NET_LOCAL);
}

/* ---- search results ---- */

struct result {
    int done;
    int calls;
    size_t npeers;
    struct dg_dht_compact peers[512];
    uint64_t done_at;
    struct net *net;
    struct sockaddr_in last_from; /* the node that returned the last peers */
};

static void on_peers(void *arg, uint32_t id, const struct dg_dht_compact *peers, size_t n,
                     const struct sockaddr *from, int done)
{
    struct result *r = arg;

    assert_true(id != 0);
    assert_int_equal(r->done, 0);
    r->calls++;
    if (done) {
        assert_int_equal(n, 0);
        assert_null(from);
        r->done = 1;
        if (r->net)
            r->done_at = r->net->now;
        return;
    }
    assert_true(n > 0);
    assert_non_null(from);
    r->last_from = *(const struct sockaddr_in *)from;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < r->npeers; j++)
            assert_false(r->peers[j].len == peers[i].len &&
                         memcmp(r->peers[j].bytes, peers[i].bytes, peers[i].len) == 0);
        if (r->npeers < 512)
            r->peers[r->npeers++] = peers[i];
    }
}

static int has_peer(const struct result *r, const struct sockaddr_storage *addr, uint16_t port)
{
    uint8_t c[DG_DHT_COMPACT6_LEN];
    int len = dg_dht_addr_to_compact((const struct sockaddr *)addr, c);

    assert_true(len == 6 || len == 18);
    c[len - 2] = (uint8_t)(port >> 8);
    c[len - 1] = (uint8_t)port;
    for (size_t i = 0; i < r->npeers; i++)
        if (r->peers[i].len == len && memcmp(r->peers[i].bytes, c, (size_t)len) == 0)
            return 1;
    return 0;
}

static void run_until_done(struct net *net, struct result *r, uint64_t max_ms)
{
    uint64_t end = net->now + max_ms;

    while (!r->done && net->now < end)
        net_run(net, 50);
}

/* ---- tests ---- */

/* A probe pings a node: the reply is byte-exact KRPC with our id, the tid, "ip" and "v". */
static void test_ping_bytes(void **state)
{
    (void)state;
    uint8_t id[DG_NODE_ID_LEN];
    memset(id, 'A', sizeof(id));
    struct net *net = net_new(1);
    int a = net_add_cfg(net, id, NULL);
    struct captured c;

    static const char ping[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q4:ping1:t2:aa1:y1:qe";
    probe_send(net, 0, a, ping, sizeof(ping) - 1);
    assert_true(take_reply(net, 0, &c));
    /* probe 0 is 10.9.0.1:7000 = 0a 09 00 01 1b 58 */
    static const uint8_t want[] = "d2:ip6:\x0a\x09\x00\x01\x1b\x58"
                                  "1:rd2:id20:AAAAAAAAAAAAAAAAAAAAe1:t2:aa1:v4:DG011:y1:re";
    assert_int_equal(c.len, sizeof(want) - 1);
    assert_memory_equal(c.buf, want, sizeof(want) - 1);
    assert_int_equal(stats_of(net, a).queries_in[DG_KRPC_PING], 1);
    net_free(net);
}

/* Three nodes: B and C bootstrap from A; every table ends with the two others, the queries
 * on the wire are find_node(own id) with 4-byte tids, and every node has heard the others. */
static void test_three_nodes(void **state)
{
    (void)state;
    struct net *net = net_new(2);
    int a = net_add(net), b = net_add(net), c = net_add(net);

    /* Capture B's first query by making A a probe for a moment: simpler to check the
     * counters and tables. */
    assert_int_equal(dg_dht_bootstrap(net->node[b], (struct sockaddr *)&net->addr[a],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    assert_int_equal(net->nq, 1);
    struct dg_krpc_msg *m = malloc(sizeof(*m));
    assert_non_null(m);
    assert_int_equal(dg_krpc_parse(net->q[0].buf, net->q[0].len, m), 0);
    assert_int_equal(m->type, DG_KRPC_QUERY);
    assert_int_equal(m->method, DG_KRPC_FIND_NODE);
    assert_int_equal(m->tid_len, 4);
    assert_memory_equal(m->target, dg_dht_id(net->node[b]), DG_NODE_ID_LEN);
    assert_memory_equal(m->id, dg_dht_id(net->node[b]), DG_NODE_ID_LEN);
    free(m);
    net_run(net, 1000);
    assert_int_equal(dg_dht_bootstrap(net->node[c], (struct sockaddr *)&net->addr[a],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    net_run(net, 5000);
    for (int i = 0; i < 3; i++) {
        struct dg_dht_stats st = stats_of(net, i);
        assert_int_equal(st.nodes, 2);
        assert_int_equal(st.good, 2);
        assert_int_equal(st.malformed, 0);
        assert_int_equal(st.unmatched, 0);
        assert_int_equal(st.outstanding, 0);
    }
    assert_int_equal(
        dg_dht_table_find(dg_dht_get_table(net->node[b]), dg_dht_id(net->node[c]), NULL), 0);
    net_free(net);
}

static void test_bootstrap_60(void **state)
{
    (void)state;
    struct net *net = net_swarm(60, 3, 90000);

    for (int i = 0; i < 60; i++) {
        struct dg_dht_stats st = stats_of(net, i);
        assert_true(st.good >= 8);
        assert_int_equal(st.malformed, 0);
    }
    net_free(net);
}

/* A healthy node does not ask to be ticked again at once: its wait is never 0 right after a
 * tick (a node that did would spin the engine's loop). */
static void test_healthy_node_waits(void **state)
{
    (void)state;
    struct net *net = net_swarm(12, 4242, 90000);

    for (int i = 0; i < net->n; i++) {
        assert_true(stats_of(net, i).good >= DG_DHT_K);
        dg_dht_tick(net->node[i], net->now);
        assert_true(dg_dht_tick(net->node[i], net->now) > 0);
    }
    net_free(net);
}

static void test_announce_and_find(void **state)
{
    (void)state;
    struct net *net = net_swarm(30, 4, 30000);
    uint8_t key[DG_NODE_ID_LEN];
    struct result ra, rz;

    memset(&ra, 0, sizeof(ra));
    memset(&rz, 0, sizeof(rz));
    ra.net = rz.net = net;
    rng_bytes(&net->rng, key, sizeof(key));
    int a = 7;
    uint32_t sid = 0;
    assert_int_equal(dg_dht_get_peers(net->node[a], key, 4242, on_peers, &ra, net->now, &sid), 0);
    assert_true(sid != 0);
    run_until_done(net, &ra, 40000);
    assert_int_equal(ra.done, 1);
    assert_int_equal(ra.npeers, 0);
    assert_int_equal(stats_of(net, a).stored_peers, 0); /* A never stores itself */
    assert_true(stats_of(net, a).queries_out[DG_KRPC_ANNOUNCE_PEER] >= 1);

    /* A node that joins later, bootstrapped elsewhere, finds A:4242. */
    int z = net_add(net);
    assert_int_equal(dg_dht_bootstrap(net->node[z], (struct sockaddr *)&net->addr[20],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    net_run(net, 5000);
    assert_int_equal(dg_dht_get_peers(net->node[z], key, 0, on_peers, &rz, net->now, NULL), 0);
    run_until_done(net, &rz, 40000);
    assert_int_equal(rz.done, 1);
    assert_true(has_peer(&rz, &net->addr[a], 4242));
    assert_int_equal(rz.npeers, 1);
    assert_int_equal(stats_of(net, z).queries_out[DG_KRPC_ANNOUNCE_PEER], 0);
    net_free(net);
}

/* Asks node @p i for a token as probe @p p. */
static size_t get_token(struct net *net, int p, int i, const uint8_t *key, uint8_t *token)
{
    uint8_t buf[256];
    struct dg_krpc_hdr h = {.tid = (const uint8_t *)"gp", .tid_len = 2};
    uint8_t pid[DG_NODE_ID_LEN];
    struct captured c;
    struct dg_krpc_msg *m = malloc(sizeof(*m));

    memset(pid, 0x11 + p, sizeof(pid));
    int len = dg_krpc_encode_get_peers(buf, sizeof(buf), &h, pid, key, 0);
    assert_true(len > 0);
    probe_send(net, p, i, buf, (size_t)len);
    assert_true(take_reply(net, p, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->type, DG_KRPC_RESPONSE);
    assert_true(m->has & DG_KRPC_HAS_TOKEN);
    size_t n = m->token_len;
    memcpy(token, m->token, n);
    free(m);
    return n;
}

/* Announces as probe @p p; @return the error code of the reply, or 0 for a plain reply. */
static int64_t announce(struct net *net, int p, int i, const uint8_t *key, const uint8_t *token,
                        size_t token_len, uint16_t port)
{
    uint8_t buf[256];
    struct dg_krpc_hdr h = {.tid = (const uint8_t *)"an", .tid_len = 2};
    uint8_t pid[DG_NODE_ID_LEN];
    struct captured c;
    struct dg_krpc_msg *m = malloc(sizeof(*m));

    memset(pid, 0x11 + p, sizeof(pid));
    int len =
        dg_krpc_encode_announce_peer(buf, sizeof(buf), &h, pid, key, port, 0, token, token_len);
    assert_true(len > 0);
    probe_send(net, p, i, buf, (size_t)len);
    assert_true(take_reply(net, p, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    int64_t code = m->type == DG_KRPC_ERROR ? m->error_code : 0;
    free(m);
    return code;
}

static void test_tokens(void **state)
{
    (void)state;
    struct net *net = net_new(5);
    int a = net_add(net);
    uint8_t key[DG_NODE_ID_LEN], tok[DG_KRPC_TOKEN_MAX], bad[DG_KRPC_TOKEN_MAX];

    memset(key, 0x42, sizeof(key));
    size_t tl = get_token(net, 0, a, key, tok);
    assert_int_equal(tl, DG_DHT_TOKEN_LEN);

    /* Wrong token: error 203, nothing stored. */
    memcpy(bad, tok, tl);
    bad[0] ^= 1;
    assert_int_equal(announce(net, 0, a, key, bad, tl, 1234), 203);
    /* Another IP's token. */
    uint8_t tok1[DG_KRPC_TOKEN_MAX];
    size_t tl1 = get_token(net, 1, a, key, tok1);
    assert_int_equal(announce(net, 0, a, key, tok1, tl1, 1234), 203);
    assert_int_equal(stats_of(net, a).stored_peers, 0);
    assert_int_equal(stats_of(net, a).bad_tokens, 2);

    /* Right token: stored; still good after one rotation. */
    assert_int_equal(announce(net, 0, a, key, tok, tl, 1234), 0);
    assert_int_equal(stats_of(net, a).stored_peers, 1);
    net->now += DG_DHT_TOKEN_ROTATE_MS;
    dg_dht_tick(net->node[a], net->now);
    assert_int_equal(announce(net, 0, a, key, tok, tl, 1235), 0);
    /* After a second rotation the first token is refused. */
    net->now += DG_DHT_TOKEN_ROTATE_MS;
    dg_dht_tick(net->node[a], net->now);
    assert_int_equal(announce(net, 0, a, key, tok, tl, 1236), 203);
    assert_int_equal(stats_of(net, a).announces_stored, 2);

    /* The stored peer comes back with its latest port, implied_port aside. */
    uint8_t buf[256];
    struct dg_krpc_hdr h = {.tid = (const uint8_t *)"gp", .tid_len = 2};
    uint8_t pid[DG_NODE_ID_LEN];
    struct captured c;
    struct dg_krpc_msg *m = malloc(sizeof(*m));
    memset(pid, 0x77, sizeof(pid));
    int len = dg_krpc_encode_get_peers(buf, sizeof(buf), &h, pid, key, 0);
    probe_send(net, 2, a, buf, (size_t)len);
    assert_true(take_reply(net, 2, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->nvalues, 1);
    static const uint8_t want[6] = {10, 9, 0, 1, 1235 >> 8, 1235 & 0xff};
    assert_memory_equal(m->values[0].addr, want, 6);
    free(m);
    net_free(net);
}

static void test_search_with_loss(void **state)
{
    (void)state;
    struct net *net = net_swarm(30, 6, 30000);
    uint8_t key[DG_NODE_ID_LEN];
    struct result ra, rb;

    memset(&ra, 0, sizeof(ra));
    memset(&rb, 0, sizeof(rb));
    ra.net = rb.net = net;
    net->loss_pct = 20;
    rng_bytes(&net->rng, key, sizeof(key));
    assert_int_equal(dg_dht_get_peers(net->node[3], key, 5555, on_peers, &ra, net->now, NULL), 0);
    run_until_done(net, &ra, 40000);
    assert_int_equal(ra.done, 1);
    assert_int_equal(dg_dht_get_peers(net->node[17], key, 0, on_peers, &rb, net->now, NULL), 0);
    uint64_t start = net->now;
    run_until_done(net, &rb, 40000);
    assert_int_equal(rb.done, 1);
    assert_true(rb.done_at - start <= DG_DHT_SEARCH_MAX_MS + 100);
    assert_true(has_peer(&rb, &net->addr[3], 5555));
    assert_true(net->lost > 0);
    net_free(net);
}

static void test_search_unresponsive(void **state)
{
    (void)state;
    struct net *net = net_swarm(12, 7, 20000);
    uint8_t key[DG_NODE_ID_LEN];
    struct result r;

    memset(&r, 0, sizeof(r));
    r.net = net;
    for (int i = 1; i < net->n; i++)
        net->dead[i] = 1;
    memset(key, 0x99, sizeof(key));
    assert_true(stats_of(net, 0).nodes >= 8);
    uint64_t start = net->now;
    assert_int_equal(dg_dht_get_peers(net->node[0], key, 80, on_peers, &r, net->now, NULL), 0);
    run_until_done(net, &r, 60000);
    assert_int_equal(r.done, 1);
    assert_true(r.done_at - start <= DG_DHT_SEARCH_MAX_MS + 100);
    struct dg_dht_stats st = stats_of(net, 0);
    assert_true(st.timeouts >= 3);
    assert_int_equal(st.searches, 0);
    assert_int_equal(st.queries_out[DG_KRPC_ANNOUNCE_PEER], 0); /* nobody gave a token */
    /* Once the others are back, the dead ones' failures are forgotten at their next reply. */
    net_free(net);
}

static void test_empty_table_search(void **state)
{
    (void)state;
    struct net *net = net_new(8);
    int a = net_add(net);
    uint8_t key[DG_NODE_ID_LEN] = {1};
    struct result r;

    memset(&r, 0, sizeof(r));
    assert_int_equal(dg_dht_get_peers(net->node[a], key, 0, on_peers, &r, net->now, NULL), 0);
    assert_int_equal(r.done, 0); /* never called back from inside the call */
    dg_dht_tick(net->node[a], net->now);
    assert_int_equal(r.done, 1);
    assert_int_equal(r.calls, 1);
    assert_int_equal(dg_dht_get_peers(net->node[a], key, 0, NULL, NULL, net->now, NULL), -EINVAL);
    net_free(net);
}

static void test_malformed(void **state)
{
    (void)state;
    struct net *net = net_new(9);
    int a = net_add(net);
    struct captured c;
    struct dg_krpc_msg *m = malloc(sizeof(*m));

    /* Garbage, truncated bencode, a response with an unknown tid: dropped, unanswered. */
    probe_send(net, 0, a, "hello", 5);
    static const char trunc[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q4:ping1:t2:aa1:y1:q";
    probe_send(net, 0, a, trunc, sizeof(trunc) - 1);
    static const char resp[] = "d1:rd2:id20:BBBBBBBBBBBBBBBBBBBBe1:t4:zzzz1:y1:re";
    probe_send(net, 0, a, resp, sizeof(resp) - 1);
    static const char err[] = "d1:eli201e4:oopse1:t4:zzzz1:y1:ee";
    probe_send(net, 0, a, err, sizeof(err) - 1);
    probe_send(net, 0, a, "", 0);
    assert_int_equal(net->ncap, 0);
    struct dg_dht_stats st = stats_of(net, a);
    assert_int_equal(st.malformed, 3);
    assert_int_equal(st.unmatched, 2);
    assert_int_equal(st.errors_sent, 0);

    /* A query without "a": readable tid, so error 203. */
    static const char noargs[] = "d1:q4:ping1:t2:xy1:y1:qe";
    probe_send(net, 0, a, noargs, sizeof(noargs) - 1);
    assert_true(take_reply(net, 0, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->type, DG_KRPC_ERROR);
    assert_int_equal(m->error_code, 203);
    assert_memory_equal(m->tid, "xy", 2);

    /* get_peers without info_hash: 203. */
    static const char noih[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q9:get_peers1:t2:xz1:y1:qe";
    probe_send(net, 0, a, noih, sizeof(noih) - 1);
    assert_true(take_reply(net, 0, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->error_code, 203);

    /* Unknown method: 204. */
    static const char unk[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q5:fetch1:t2:uu1:y1:qe";
    probe_send(net, 0, a, unk, sizeof(unk) - 1);
    assert_true(take_reply(net, 0, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->type, DG_KRPC_ERROR);
    assert_int_equal(m->error_code, 204);
    assert_memory_equal(m->tid, "uu", 2);

    st = stats_of(net, a);
    assert_int_equal(st.errors_sent, 3);
    assert_int_equal(st.queries_in[DG_KRPC_UNKNOWN], 1);
    free(m);

    /* A source of another family or too short is dropped. */
    struct sockaddr_in6 s6;
    memset(&s6, 0, sizeof(s6));
    s6.sin6_family = AF_INET6;
    s6.sin6_port = htons(1);
    s6.sin6_addr.s6_addr[0] = 0x20;
    static const char ping[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q4:ping1:t2:aa1:y1:qe";
    dg_dht_receive(net->node[a], (const uint8_t *)ping, sizeof(ping) - 1, (struct sockaddr *)&s6,
                   sizeof(s6), net->now);
    dg_dht_receive(net->node[a], (const uint8_t *)ping, sizeof(ping) - 1,
                   (struct sockaddr *)&net->probe[0], 4, net->now);
    assert_int_equal(net->ncap, 0);
    net_free(net);
}

/* A response from the right tid but another address is not matched. */
static void test_response_needs_source(void **state)
{
    (void)state;
    struct net *net = net_new(10);
    int a = net_add(net);
    uint8_t id[DG_NODE_ID_LEN];
    struct dg_krpc_msg *m = malloc(sizeof(*m));

    /* A bootstraps towards probe 0: capture the query's tid. */
    assert_int_equal(dg_dht_bootstrap(net->node[a], (struct sockaddr *)&net->probe[0],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    assert_int_equal(net->ncap, 1);
    assert_int_equal(dg_krpc_parse(net->cap[0].buf, net->cap[0].len, m), 0);
    net->ncap = 0;
    memset(id, 0x5a, sizeof(id));
    uint8_t buf[256];
    struct dg_dht_compact ip = {.len = 6, .bytes = {10, 0, 0, 1, 0x1a, 0xe1}};
    struct dg_krpc_hdr h = {.tid = m->tid, .tid_len = m->tid_len, .ip = ip.bytes, .ip_len = 6};
    int len = dg_krpc_encode_find_node_response(buf, sizeof(buf), &h, id, NULL, 0, NULL, 0);
    assert_true(len > 0);
    probe_send(net, 1, a, buf, (size_t)len); /* wrong source */
    assert_int_equal(stats_of(net, a).unmatched, 1);
    assert_int_equal(stats_of(net, a).nodes, 0);
    probe_send(net, 0, a, buf, (size_t)len);
    struct dg_dht_stats st = stats_of(net, a);
    assert_int_equal(st.replies_in, 1);
    assert_int_equal(st.nodes, 1);
    assert_int_equal(st.have_external, 0);   /* one vote is not enough */
    probe_send(net, 0, a, buf, (size_t)len); /* a replay: the tid is used up */
    assert_int_equal(stats_of(net, a).unmatched, 2);
    free(m);
    net_free(net);
}

static void test_rate_limit(void **state)
{
    (void)state;
    struct net *net = net_new(11);
    struct dg_dht_ratelimit_config rl;
    dg_dht_ratelimit_config_default(&rl);
    rl.per_source_burst = 10;
    int a = net_add_cfg(net, NULL, &rl);
    static const char ping[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q4:ping1:t2:aa1:y1:qe";
    int replies = 0;
    struct captured c;

    for (int i = 0; i < 30; i++) {
        probe_send(net, 0, a, ping, sizeof(ping) - 1);
        replies += take_reply(net, 0, &c);
    }
    assert_true(replies <= 10);
    assert_true(replies >= 9);
    struct dg_dht_stats st = stats_of(net, a);
    assert_true(st.rate_limited >= 20);
    /* Malformed queries from the flooder are dropped too (no 203). */
    static const char noargs[] = "d1:q4:ping1:t2:xy1:y1:qe";
    probe_send(net, 0, a, noargs, sizeof(noargs) - 1);
    assert_false(take_reply(net, 0, &c));
    /* Another source is still served. */
    static const char ping2[] = "d1:ad2:id20:CCCCCCCCCCCCCCCCCCCCe1:q4:ping1:t2:bb1:y1:qe";
    probe_send(net, 1, a, ping2, sizeof(ping2) - 1);
    assert_true(take_reply(net, 1, &c));
    net_free(net);
}

/* 100 peers stored under one key: a get_peers reply carries 50; find_node at most 8 nodes. */
static void test_reply_caps(void **state)
{
    (void)state;
    struct net *net = net_swarm(20, 12, 20000);
    uint8_t key[DG_NODE_ID_LEN], tok[DG_KRPC_TOKEN_MAX];
    struct captured c;
    struct dg_krpc_msg *m = malloc(sizeof(*m));

    memset(key, 0x33, sizeof(key));
    for (int p = 0; p < 100; p++) {
        size_t tl = get_token(net, p, 0, key, tok);
        assert_int_equal(announce(net, p, 0, key, tok, tl, (uint16_t)(1000 + p)), 0);
    }
    assert_int_equal(stats_of(net, 0).stored_peers, 100);
    get_token(net, 100, 0, key, tok); /* the reply is checked by check_sent() */
    static const char gp[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBB9:info_hash20:33333333333333333333"
                             "e1:q9:get_peers1:t2:aa1:y1:qe";
    uint8_t gpk[sizeof(gp)];
    memcpy(gpk, gp, sizeof(gp));
    memset(gpk + 46, 0x33, 20);
    probe_send(net, 101, 0, gpk, sizeof(gp) - 1);
    assert_true(take_reply(net, 101, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    /* A plain query: values cut to 4 times its length. */
    assert_true(m->nvalues >= DG_DHT_MIN_VALUES && m->nvalues < DG_DHT_MAX_VALUES);
    assert_true(c.len <= DG_DHT_AMPLIFICATION * (sizeof(gp) - 1));
    assert_true(c.len + 8 > DG_DHT_AMPLIFICATION * (sizeof(gp) - 1)); /* not cut more */
    assert_int_equal(m->nnodes, 0);

    /* A query padded with an unknown key gets all 50. */
    char big[600];
    int bl = snprintf(big, sizeof(big),
                      "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBB9:info_hash20:33333333333333333333"
                      "3:pad300:%0300de1:q9:get_peers1:t2:ab1:y1:qe",
                      0);
    assert_true(bl > 300 && (size_t)bl < sizeof(big));
    probe_send(net, 101, 0, big, (size_t)bl);
    assert_true(take_reply(net, 101, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->nvalues, DG_DHT_MAX_VALUES);
    assert_true(c.len < 600);

    static const char fn[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBB6:target20:TTTTTTTTTTTTTTTTTTTT"
                             "e1:q9:find_node1:t2:ff1:y1:qe";
    probe_send(net, 102, 0, fn, sizeof(fn) - 1);
    assert_true(take_reply(net, 102, &c));
    assert_int_equal(dg_krpc_parse(c.buf, c.len, m), 0);
    assert_int_equal(m->nnodes, DG_DHT_K);
    assert_true(c.len < 300);
    assert_true(net->max_len <= 600);
    free(m);
    net_free(net);
}

static void test_external_addr(void **state)
{
    (void)state;
    struct net *net = net_swarm(10, 13, 10000);
    struct sockaddr_storage ext;

    for (int i = 0; i < net->n; i++) {
        assert_int_equal(dg_dht_external_addr(net->node[i], &ext), 0);
        assert_true(addr_eq(&net->addr[i], (struct sockaddr *)&ext));
        assert_int_equal(stats_of(net, i).have_external, 1);
    }
    /* A fresh node with no replies has not learned anything. */
    int z = net_add(net);
    assert_int_equal(dg_dht_external_addr(net->node[z], &ext), -ENOENT);
    net_free(net);
}

/* How observers see a node: one port for a plain node, one per observer behind a hard NAT. */
static void test_mapping(void **state)
{
    (void)state;
    struct net *net = net_swarm(12, 21, 10000);
    struct dg_dht_mapping m;

    dg_dht_mapping(net->node[3], net->now, &m);
    assert_true(m.observers >= 2);
    assert_int_equal(m.ports, 1);
    assert_int_equal(m.same_port, m.observers);
    assert_true(addr_eq(&net->addr[3], (struct sockaddr *)&m.addr));

    int z = net->n;
    net->hard[z] = 1;
    net_add(net);
    assert_int_equal(dg_dht_bootstrap(net->node[z], (struct sockaddr *)&net->addr[0],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    net_run(net, 10000);
    dg_dht_mapping(net->node[z], net->now, &m);
    assert_true(m.observers >= 2);
    assert_int_equal(m.ports, m.observers); /* every observer saw its own port */
    assert_int_equal(m.same_port, 1);
    /* Old reports say nothing. */
    dg_dht_mapping(net->node[z], net->now + DG_DHT_MAPPING_FRESH_MS + 1000, &m);
    assert_int_equal(m.observers, 0);
    /* A node nobody answered has no mapping. */
    int y = net_add(net);
    dg_dht_mapping(net->node[y], net->now, &m);
    assert_int_equal(m.observers, 0);
    net_free(net);
}

/* Keep-alives go to the nodes that took our announce, and only while on; those nodes know
 * the announced address (the rendezvous check); with implied_port they know the port they saw
 * the announce come from. */
static void test_keepalive_and_announced(void **state)
{
    (void)state;
    struct net *net = net_swarm(20, 22, 20000);
    uint8_t key[DG_NODE_ID_LEN], key2[DG_NODE_ID_LEN];
    struct result ra, rb;
    int a = 4, b = net->n;
    struct sockaddr_storage at4242 = net->addr[a], at4243 = net->addr[a];

    memset(&ra, 0, sizeof(ra));
    memset(&rb, 0, sizeof(rb));
    ra.net = rb.net = net;
    rng_bytes(&net->rng, key, sizeof(key));
    rng_bytes(&net->rng, key2, sizeof(key2));
    ((struct sockaddr_in *)&at4242)->sin_port = htons(4242);
    ((struct sockaddr_in *)&at4243)->sin_port = htons(4243);

    assert_int_equal(dg_dht_get_peers(net->node[a], key, 4242, on_peers, &ra, net->now, NULL), 0);
    run_until_done(net, &ra, 40000);
    int holders = 0;
    for (int j = 0; j < net->n; j++) {
        holders += dg_dht_announced(net->node[j], key, (struct sockaddr *)&at4242, net->now);
        assert_int_equal(dg_dht_announced(net->node[j], key, (struct sockaddr *)&at4243, net->now),
                         0);
        assert_int_equal(dg_dht_announced(net->node[j], key2, (struct sockaddr *)&at4242, net->now),
                         0);
    }
    assert_true(holders >= 1);
    /* A knows whom it announced to (its rendezvous nodes), and nobody else. */
    int told = 0;
    for (int j = 0; j < net->n; j++)
        told += dg_dht_announced_to(net->node[a], (struct sockaddr *)&net->addr[j], net->now);
    assert_int_equal(told, holders);
    assert_int_equal(dg_dht_announced_to(net->node[a], (struct sockaddr *)&net->addr[a], net->now),
                     0);

    /* Off by default: no keep-alives. */
    net_run(net, 60000);
    assert_int_equal(stats_of(net, a).keepalives, 0);
    dg_dht_set_keepalive(net->node[a], 15000);
    tick_all(net);
    uint64_t pings = stats_of(net, a).queries_out[DG_KRPC_PING];
    net_run(net, 60000);
    uint64_t ka = stats_of(net, a).keepalives;
    assert_true(ka >= (uint64_t)holders * 3);
    assert_true(stats_of(net, a).queries_out[DG_KRPC_PING] - pings >= ka);
    dg_dht_set_keepalive(net->node[a], 0);
    net_run(net, 60000);
    assert_int_equal(stats_of(net, a).keepalives, ka);

    /* implied_port: the holders store the source port (6881), not the port announced. */
    net->implied[b] = 1;
    net_add(net);
    assert_int_equal(dg_dht_bootstrap(net->node[b], (struct sockaddr *)&net->addr[0],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    net_run(net, 5000);
    assert_int_equal(dg_dht_get_peers(net->node[b], key2, 4242, on_peers, &rb, net->now, NULL), 0);
    run_until_done(net, &rb, 40000);
    struct sockaddr_storage b4242 = net->addr[b];
    ((struct sockaddr_in *)&b4242)->sin_port = htons(4242);
    holders = 0;
    for (int j = 0; j < net->n; j++) {
        holders += dg_dht_announced(net->node[j], key2, (struct sockaddr *)&net->addr[b], net->now);
        assert_int_equal(dg_dht_announced(net->node[j], key2, (struct sockaddr *)&b4242, net->now),
                         0);
    }
    assert_true(holders >= 1);
    net_free(net);
}

static void test_save_load(void **state)
{
    (void)state;
    struct net *net = net_swarm(20, 14, 20000);
    static uint8_t save[DG_DHT_SAVE_MAX], save2[DG_DHT_SAVE_MAX];
    int n = dg_dht_save(net->node[5], save, sizeof(save));
    assert_true(n > DG_DHT_SAVE_HEADER);
    size_t count = stats_of(net, 5).nodes;

    int family = 0;
    uint8_t id[DG_NODE_ID_LEN];
    assert_int_equal(dg_dht_table_load_id(save, (size_t)n, &family, id), 0);
    assert_int_equal(family, AF_INET);
    assert_memory_equal(id, dg_dht_id(net->node[5]), DG_NODE_ID_LEN);

    /* Node 5 restarts with its id and saved table, at the same address. */
    dg_dht_free(net->node[5]);
    struct dg_dht_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.family = AF_INET;
    cfg.have_id = 1;
    memcpy(cfg.id, id, sizeof(id));
    cfg.send = net_send;
    cfg.send_arg = &net->ep[5];
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = &net->rng;
    assert_int_equal(dg_dht_new(&cfg, net->now, &net->node[5]), 0);
    assert_int_equal(dg_dht_load(net->node[5], save, (size_t)n, net->now), (int)count);
    int n2 = dg_dht_save(net->node[5], save2, sizeof(save2));
    assert_int_equal(n2, n);
    assert_memory_equal(save, save2, (size_t)n);
    assert_int_equal(stats_of(net, 5).good, 0); /* loaded nodes are questionable */

    /* The next tick starts a lookup of our own id from the loaded nodes. */
    tick_all(net);
    net_run(net, 10000);
    struct dg_dht_stats st = stats_of(net, 5);
    assert_true(st.queries_out[DG_KRPC_FIND_NODE] > 0);
    assert_true(st.good >= 8);

    /* Damaged saves are refused. */
    save[10] ^= 1;
    assert_int_equal(dg_dht_load(net->node[5], save, (size_t)n, net->now), -EBADMSG);
    net_free(net);
}

static void test_cancel_and_cap(void **state)
{
    (void)state;
    struct net *net = net_swarm(10, 15, 10000);
    uint8_t key[DG_NODE_ID_LEN];
    struct result r;
    uint32_t ids[DG_DHT_MAX_SEARCHES];
    int started = 0;

    memset(&r, 0, sizeof(r));
    for (int i = 0; i < DG_DHT_MAX_SEARCHES + 1; i++) {
        memset(key, i, sizeof(key));
        int rc = dg_dht_get_peers(net->node[1], key, 0, on_peers, &r, net->now, &ids[started]);
        if (rc == -EAGAIN)
            break;
        assert_int_equal(rc, 0);
        started++;
    }
    assert_true(started <= DG_DHT_MAX_SEARCHES);
    assert_true(started >= DG_DHT_MAX_SEARCHES - 2); /* internal lookups may hold slots */
    for (int i = 0; i < started; i++)
        assert_int_equal(dg_dht_cancel_search(net->node[1], ids[i]), 0);
    assert_int_equal(dg_dht_cancel_search(net->node[1], ids[0]), -ENOENT);
    net_run(net, 10000);
    assert_int_equal(r.calls, 0); /* cancelled lookups never call back */
    assert_true(stats_of(net, 1).outstanding <= DG_DHT_MAX_QUERIES);
    net_free(net);
}

/* The same code as an IPv6 node: nodes6, 18-byte peers, "ip" of 18 bytes. */
static void test_ipv6(void **state)
{
    (void)state;
    struct net *net = net_swarm_mode(16, 16, 20000, AF_INET6, NET_LOCAL);
    uint8_t key[DG_NODE_ID_LEN];
    struct result ra, rb;
    struct sockaddr_storage ext;

    for (int i = 0; i < net->n; i++) {
        struct dg_dht_stats st = stats_of(net, i);
        assert_true(st.good >= 8);
        assert_int_equal(st.external.len, 18);
        assert_int_equal(dg_dht_external_addr(net->node[i], &ext), 0);
        assert_true(addr_eq(&net->addr[i], (struct sockaddr *)&ext));
    }
    memset(&ra, 0, sizeof(ra));
    memset(&rb, 0, sizeof(rb));
    ra.net = rb.net = net;
    memset(key, 0x66, sizeof(key));
    assert_int_equal(dg_dht_get_peers(net->node[2], key, 7777, on_peers, &ra, net->now, NULL), 0);
    run_until_done(net, &ra, 40000);
    assert_int_equal(dg_dht_get_peers(net->node[9], key, 0, on_peers, &rb, net->now, NULL), 0);
    run_until_done(net, &rb, 40000);
    assert_int_equal(rb.done, 1);
    assert_true(has_peer(&rb, &net->addr[2], 7777));
    assert_int_equal(rb.peers[0].len, 18);

    /* IPv4 sources are dropped by an IPv6 node. */
    struct sockaddr_storage a4 = v4n(0x0a000001u, 1);
    static const char ping[] = "d1:ad2:id20:BBBBBBBBBBBBBBBBBBBBe1:q4:ping1:t2:aa1:y1:qe";
    uint64_t before = stats_of(net, 0).malformed;
    dg_dht_receive(net->node[0], (const uint8_t *)ping, sizeof(ping) - 1, (struct sockaddr *)&a4,
                   sizeof(struct sockaddr_in), net->now);
    assert_int_equal(stats_of(net, 0).malformed, before + 1);
    net_free(net);
}

/* Many nodes on 127.0.0.1 (the loopback tests of the issue): they find each other, and the
 * external address is learned from reporters told apart by port. */
static void test_loopback(void **state)
{
    (void)state;
    struct net *net = net_swarm_mode(12, 17, 20000, AF_INET, NET_LOOPBACK);
    uint8_t key[DG_NODE_ID_LEN];
    struct result ra, rb;
    struct sockaddr_storage ext;

    for (int i = 0; i < net->n; i++) {
        assert_true(stats_of(net, i).good >= 8);
        assert_int_equal(dg_dht_external_addr(net->node[i], &ext), 0);
        assert_true(addr_eq(&net->addr[i], (struct sockaddr *)&ext));
    }
    memset(&ra, 0, sizeof(ra));
    memset(&rb, 0, sizeof(rb));
    memset(key, 0x24, sizeof(key));
    assert_int_equal(dg_dht_get_peers(net->node[4], key, 9000, on_peers, &ra, net->now, NULL), 0);
    run_until_done(net, &ra, 40000);
    assert_int_equal(dg_dht_get_peers(net->node[8], key, 0, on_peers, &rb, net->now, NULL), 0);
    run_until_done(net, &rb, 40000);
    assert_true(has_peer(&rb, &net->addr[4], 9000));
    net_free(net);
}

/* Public-looking addresses with BEP 42 enforced: nodes with valid ids fill each other's
 * tables; a node whose id does not match its address answers, but no table takes it. */
static void test_bep42(void **state)
{
    (void)state;
    struct net *net = net_swarm_mode(16, 18, 20000, AF_INET, NET_PUBLIC);
    uint8_t bad_id[DG_NODE_ID_LEN];

    for (int i = 0; i < net->n; i++)
        assert_true(stats_of(net, i).good >= 8);
    memset(bad_id, 0xee, sizeof(bad_id));
    int x = net_add_cfg(net, bad_id, NULL);
    assert_int_equal(dg_dht_bootstrap(net->node[x], (struct sockaddr *)&net->addr[0],
                                      sizeof(struct sockaddr_in), net->now),
                     0);
    net_run(net, 20000);
    uint64_t rejected = 0;
    for (int i = 0; i < x; i++) {
        struct dg_dht_table_stats ts;
        assert_int_equal(dg_dht_table_find(dg_dht_get_table(net->node[i]), bad_id, NULL), -ENOENT);
        dg_dht_table_stats(dg_dht_get_table(net->node[i]), net->now, &ts);
        rejected += ts.rejected_bep42;
    }
    assert_true(rejected > 0);
    /* It still learns the others (their ids are valid) and is served. */
    assert_true(stats_of(net, x).good >= 8);
    net_free(net);
}

static void test_new_errors(void **state)
{
    (void)state;
    struct dg_dht_config cfg;
    struct dg_dht *d = NULL;
    uint64_t rng = 1;

    memset(&cfg, 0, sizeof(cfg));
    cfg.family = AF_INET;
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = &rng;
    assert_int_equal(dg_dht_new(&cfg, 0, &d), -EINVAL); /* no send */
    cfg.send = net_send;
    cfg.family = AF_UNIX;
    assert_int_equal(dg_dht_new(&cfg, 0, &d), -EINVAL);
    cfg.family = AF_INET6;
    cfg.version = version;
    cfg.version_len = DG_DHT_VERSION_MAX + 1;
    assert_int_equal(dg_dht_new(&cfg, 0, &d), -EINVAL);
    cfg.version_len = 0;
    assert_int_equal(dg_dht_new(&cfg, 0, &d), 0);
    /* An IPv6 node refuses IPv4 bootstrap addresses. */
    struct sockaddr_storage a4 = v4n(0x0a000001u, 1);
    assert_int_equal(dg_dht_bootstrap(d, (struct sockaddr *)&a4, sizeof(struct sockaddr_in), 0),
                     -EINVAL);
    dg_dht_free(d);
    dg_dht_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ping_bytes),
        cmocka_unit_test(test_three_nodes),
        cmocka_unit_test(test_bootstrap_60),
        cmocka_unit_test(test_healthy_node_waits),
        cmocka_unit_test(test_announce_and_find),
        cmocka_unit_test(test_tokens),
        cmocka_unit_test(test_search_with_loss),
        cmocka_unit_test(test_search_unresponsive),
        cmocka_unit_test(test_empty_table_search),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_response_needs_source),
        cmocka_unit_test(test_rate_limit),
        cmocka_unit_test(test_reply_caps),
        cmocka_unit_test(test_external_addr),
        cmocka_unit_test(test_mapping),
        cmocka_unit_test(test_keepalive_and_announced),
        cmocka_unit_test(test_save_load),
        cmocka_unit_test(test_cancel_and_cap),
        cmocka_unit_test(test_ipv6),
        cmocka_unit_test(test_loopback),
        cmocka_unit_test(test_bep42),
        cmocka_unit_test(test_new_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
