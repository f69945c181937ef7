/* Unit tests for engine/dht_table.c: routing table, save/load, write tokens, peer storage and
 * rate limiting. Everything is deterministic: a fake clock (plain integers passed as now_ms)
 * and a seeded PRNG. */
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

#include "engine/dht_table.h"
#include "engine/node_id.h"

#define MIN_MS (60u * 1000)
#define T0 1000000u /* the fake clock's start */

/* ---- helpers ---- */

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

static struct sockaddr_storage v4(const char *ip, uint16_t port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    assert_int_equal(inet_pton(AF_INET, ip, &sin->sin_addr), 1);
    return ss;
}

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

static struct sockaddr_storage v6(const char *ip, uint16_t port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    assert_int_equal(inet_pton(AF_INET6, ip, &sin6->sin6_addr), 1);
    return ss;
}

/* The n-th address in 10.0.0.0/8 (exempt from BEP 42), so ids can be chosen freely. */
static struct sockaddr_storage local(uint32_t n)
{
    return v4n(0x0a000000u | (n & 0xffffff), 6881);
}

#define SA(ss) ((const struct sockaddr *)&(ss))

static int addr_eq(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    uint8_t ca[DG_DHT_COMPACT6_LEN], cb[DG_DHT_COMPACT6_LEN];
    int la = dg_dht_addr_to_compact((const struct sockaddr *)a, ca);
    int lb = dg_dht_addr_to_compact((const struct sockaddr *)b, cb);
    return la > 0 && la == lb && memcmp(ca, cb, (size_t)la) == 0;
}

/* A random id sharing exactly @p cpl leading bits with @p own (cpl < 160). */
static void id_at(const uint8_t own[DG_NODE_ID_LEN], unsigned cpl, uint64_t *seed,
                  uint8_t out[DG_NODE_ID_LEN])
{
    uint8_t p[DG_NODE_ID_LEN];

    memcpy(p, own, sizeof(p));
    p[cpl / 8] ^= (uint8_t)(0x80 >> (cpl % 8));
    dg_node_id_random_prefixed(p, cpl + 1, rng_bytes, seed, out);
    assert_int_equal(dg_node_id_common_prefix(own, out), cpl);
}

static struct dg_dht_table *table_new(int family, const uint8_t id[DG_NODE_ID_LEN], unsigned flags,
                                      uint64_t *seed, uint64_t now)
{
    struct dg_dht_table_config cfg;
    struct dg_dht_table *t = NULL;

    memset(&cfg, 0, sizeof(cfg));
    cfg.family = family;
    memcpy(cfg.id, id, DG_NODE_ID_LEN);
    cfg.flags = flags;
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = seed;
    assert_int_equal(dg_dht_table_new(&cfg, now, &t), 0);
    assert_non_null(t);
    return t;
}

/* Checks the structure through the public view: nodes come in bucket order, bucket i < n-1
 * holds only ids sharing exactly i bits with ours and the last bucket those sharing n-1 or
 * more, no bucket holds more than K, and ids and (without SAME_IP) IPs are unique. */
static void check_invariants(const struct dg_dht_table *t, int same_ip_allowed)
{
    struct dg_dht_table_stats st;
    size_t n = dg_dht_table_count(t);
    unsigned per_cpl[DG_NODE_ID_BITS + 1];
    struct dg_dht_node *all = calloc(n ? n : 1, sizeof(*all));

    assert_non_null(all);
    dg_dht_table_stats(t, 0, &st);
    assert_int_equal(st.nodes, n);
    assert_true(st.buckets >= 1 && st.buckets <= DG_DHT_MAX_BUCKETS);
    memset(per_cpl, 0, sizeof(per_cpl));
    unsigned prev = 0;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(dg_dht_table_node_at(t, i, &all[i]), 0);
        unsigned cpl = dg_node_id_common_prefix(dg_dht_table_id(t), all[i].id);
        assert_true(cpl < DG_NODE_ID_BITS);
        unsigned b = cpl < st.buckets - 1 ? cpl : (unsigned)st.buckets - 1;
        assert_true(b >= prev);
        prev = b;
        per_cpl[b]++;
        assert_true(per_cpl[b] <= DG_DHT_K);
        assert_int_equal(all[i].addr.ss_family, dg_dht_table_family(t));
        for (size_t j = 0; j < i; j++) {
            assert_memory_not_equal(all[i].id, all[j].id, DG_NODE_ID_LEN);
            if (!same_ip_allowed) {
                uint8_t ci[18], cj[18];
                int li = dg_dht_addr_to_compact(SA(all[i].addr), ci);
                int lj = dg_dht_addr_to_compact(SA(all[j].addr), cj);
                assert_memory_not_equal(ci, cj, (size_t)li - 2);
                (void)lj;
            }
        }
    }
    assert_int_equal(dg_dht_table_node_at(t, n, &all[0]), -ENOENT);
    free(all);
}

/* ---- addresses ---- */

static void test_addr_helpers(void **state)
{
    uint8_t c[DG_DHT_COMPACT6_LEN];
    struct sockaddr_storage back;

    (void)state;
    struct sockaddr_storage a = v4("198.51.100.7", 6881);
    assert_int_equal(dg_dht_addr_to_compact(SA(a), c), 6);
    static const uint8_t want4[6] = {198, 51, 100, 7, 0x1a, 0xe1};
    assert_memory_equal(c, want4, 6);
    assert_int_equal(dg_dht_addr_from_compact(c, 6, &back), 0);
    assert_true(addr_eq(&a, &back));

    struct sockaddr_storage b = v6("2001:db8::1", 443);
    assert_int_equal(dg_dht_addr_to_compact(SA(b), c), 18);
    assert_int_equal(c[0], 0x20);
    assert_int_equal(c[15], 1);
    assert_int_equal(c[16], 0x01);
    assert_int_equal(c[17], 0xbb);
    assert_int_equal(dg_dht_addr_from_compact(c, 18, &back), 0);
    assert_int_equal(back.ss_family, AF_INET6);
    assert_true(addr_eq(&b, &back));
    assert_int_equal(dg_dht_addr_from_compact(c, 17, &back), -EBADMSG);
    assert_int_equal(dg_dht_addr_from_compact(c, 0, &back), -EBADMSG);

    /* IPv4-mapped IPv6 is IPv4. */
    struct sockaddr_storage m = v6("::ffff:198.51.100.7", 6881);
    assert_int_equal(dg_dht_addr_to_compact(SA(m), c), 6);
    assert_memory_equal(c, want4, 6);

    struct sockaddr_storage u;
    memset(&u, 0, sizeof(u));
    u.ss_family = AF_UNIX;
    assert_int_equal(dg_dht_addr_to_compact(SA(u), c), -EAFNOSUPPORT);
    assert_int_equal(dg_dht_addr_usable(SA(u)), 0);

    static const char *ok4[] = {"1.0.0.1", "10.0.0.1", "127.0.0.1", "223.255.255.254"};
    static const char *bad4[] = {"0.0.0.0",   "0.1.2.3",   "224.0.0.1",
                                 "239.1.1.1", "240.0.0.1", "255.255.255.255"};
    for (size_t i = 0; i < sizeof(ok4) / sizeof(ok4[0]); i++) {
        struct sockaddr_storage x = v4(ok4[i], 1);
        assert_int_equal(dg_dht_addr_usable(SA(x)), 1);
        x = v4(ok4[i], 0);
        assert_int_equal(dg_dht_addr_usable(SA(x)), 0);
    }
    for (size_t i = 0; i < sizeof(bad4) / sizeof(bad4[0]); i++) {
        struct sockaddr_storage x = v4(bad4[i], 6881);
        assert_int_equal(dg_dht_addr_usable(SA(x)), 0);
    }
    static const char *ok6[] = {"::1", "2001:db8::1", "fe80::1", "fd00::1"};
    static const char *bad6[] = {"::", "ff02::1", "ff0e::1", "::ffff:0.0.0.0", "::ffff:224.0.0.1"};
    for (size_t i = 0; i < sizeof(ok6) / sizeof(ok6[0]); i++) {
        struct sockaddr_storage x = v6(ok6[i], 1);
        assert_int_equal(dg_dht_addr_usable(SA(x)), 1);
    }
    for (size_t i = 0; i < sizeof(bad6) / sizeof(bad6[0]); i++) {
        struct sockaddr_storage x = v6(bad6[i], 6881);
        assert_int_equal(dg_dht_addr_usable(SA(x)), 0);
    }
}

/* ---- routing table ---- */

static void test_table_new_bad_config(void **state)
{
    struct dg_dht_table_config cfg;
    struct dg_dht_table *t = NULL;

    (void)state;
    memset(&cfg, 0, sizeof(cfg));
    cfg.family = AF_UNIX;
    cfg.rand_bytes = rng_bytes;
    assert_int_equal(dg_dht_table_new(&cfg, 0, &t), -EINVAL);
    cfg.family = AF_INET;
    cfg.rand_bytes = NULL;
    assert_int_equal(dg_dht_table_new(&cfg, 0, &t), -EINVAL);
    assert_int_equal(dg_dht_table_new(NULL, 0, &t), -EINVAL);
    assert_null(t);
    dg_dht_table_free(NULL);
}

/* Only the bucket holding our own id splits. */
static void test_table_split_own_bucket_only(void **state)
{
    uint64_t seed = 1;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;
    struct dg_dht_node ping;
    uint32_t ip = 1;

    (void)state;
    memset(own, 0, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);

    /* Eight nodes far from us (first bit 1) fill the single bucket. */
    for (int i = 0; i < DG_DHT_K; i++) {
        id_at(own, 0, &seed, id);
        struct sockaddr_storage a = local(ip++);
        assert_int_equal(dg_dht_table_heard(t, id, SA(a), DG_DHT_HEARD_REPLY, T0, &ping),
                         DG_DHT_HEARD_ADDED);
    }
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.buckets, 1);
    assert_int_equal(st.good, DG_DHT_K);

    /* A ninth far node: the full bucket holds our id, so it splits, but all eight go to the
     * far half, which is full of good nodes and cannot split: the newcomer waits. */
    id_at(own, 0, &seed, id);
    struct sockaddr_storage a9 = local(ip++);
    assert_int_equal(dg_dht_table_heard(t, id, SA(a9), DG_DHT_HEARD_REPLY, T0, &ping),
                     DG_DHT_HEARD_PENDING);
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.buckets, 2);
    assert_int_equal(st.nodes, DG_DHT_K);
    assert_int_equal(st.replacements, 1);
    assert_int_equal(dg_dht_table_find(t, id, NULL), -ENOENT);

    /* More far nodes never split the far bucket again. */
    for (int i = 0; i < 20; i++) {
        id_at(own, 0, &seed, id);
        struct sockaddr_storage a = local(ip++);
        assert_int_equal(dg_dht_table_heard(t, id, SA(a), DG_DHT_HEARD_REPLY, T0, &ping),
                         DG_DHT_HEARD_PENDING);
    }
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.buckets, 2);
    assert_int_equal(st.replacements, DG_DHT_REPLACEMENTS);

    /* Nodes near us go into the own bucket, which splits again as it fills. */
    for (unsigned cpl = 1; cpl < 40; cpl++) {
        for (int i = 0; i < DG_DHT_K; i++) {
            id_at(own, cpl, &seed, id);
            struct sockaddr_storage a = local(ip++);
            int rc = dg_dht_table_heard(t, id, SA(a), DG_DHT_HEARD_REPLY, T0, &ping);
            assert_int_equal(rc, DG_DHT_HEARD_ADDED);
        }
        check_invariants(t, 0);
    }
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.nodes, 40 * DG_DHT_K);
    assert_true(st.buckets >= 39 && st.buckets <= 40);
    dg_dht_table_free(t);
}

/* Every depth down to 160 buckets: no bucket overflows, nothing breaks at the bottom. */
static void test_table_split_to_the_bottom(void **state)
{
    uint64_t seed = 2;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;
    uint32_t ip = 1;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    for (unsigned cpl = 160; cpl-- > 0;) {
        for (int i = 0; i < 10; i++) {
            id_at(own, cpl, &seed, id);
            struct sockaddr_storage a = local(ip++);
            int rc = dg_dht_table_heard(t, id, SA(a), DG_DHT_HEARD_REPLY, T0, NULL);
            /* Deep down there are fewer than 10 distinct ids: repeats are updates. */
            assert_true(rc >= 0 || rc == -EEXIST);
        }
    }
    check_invariants(t, 0);
    /* A bucket splits only when full: the ids sharing at least 157 bits with ours number 7,
     * so the bucket holding them never fills and 158 buckets is as deep as a real table goes
     * (DG_DHT_MAX_BUCKETS = 160 is the bound, not a reachable depth). */
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.buckets, 158);
    assert_true(st.buckets <= DG_DHT_MAX_BUCKETS);
    /* The deepest id (only the last bit differs) is in. */
    memcpy(id, own, sizeof(id));
    id[19] ^= 1;
    assert_int_equal(dg_dht_table_find(t, id, NULL), 0);
    dg_dht_table_free(t);
}

/* Fills the far bucket (first bit differs) with K nodes replying at T0 + i. */
static void fill_far_bucket(struct dg_dht_table *t, const uint8_t own[DG_NODE_ID_LEN],
                            uint64_t *seed, uint8_t ids[DG_DHT_K][DG_NODE_ID_LEN],
                            struct sockaddr_storage addrs[DG_DHT_K])
{
    uint8_t near[DG_NODE_ID_LEN];

    /* One node near us first, so that the table has split and the far bucket is not ours. */
    id_at(own, 100, seed, near);
    struct sockaddr_storage na = local(0xfffff0);
    assert_int_equal(dg_dht_table_heard(t, near, SA(na), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    for (int i = 0; i < DG_DHT_K; i++) {
        id_at(own, 0, seed, ids[i]);
        addrs[i] = local(100 + (uint32_t)i);
        int rc =
            dg_dht_table_heard(t, ids[i], SA(addrs[i]), DG_DHT_HEARD_REPLY, T0 + (uint64_t)i, NULL);
        assert_int_equal(rc, DG_DHT_HEARD_ADDED);
    }
    struct dg_dht_table_stats st;
    dg_dht_table_stats(t, T0 + 10, &st);
    assert_int_equal(st.nodes, DG_DHT_K + 1);
    assert_true(st.buckets >= 2);
}

static void test_table_bad_node_replaced(void **state)
{
    uint64_t seed = 3;
    uint8_t own[DG_NODE_ID_LEN], ids[DG_DHT_K][DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    struct sockaddr_storage addrs[DG_DHT_K];
    struct dg_dht_node n;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    fill_far_bucket(t, own, &seed, ids, addrs);

    /* Node 5 fails twice: bad after the second failure (DG_DHT_BAD_FAILS = 2). */
    assert_int_equal(dg_dht_table_failed(t, ids[5], SA(addrs[5]), T0 + 100), DG_DHT_FAILED_COUNTED);
    assert_int_equal(dg_dht_table_find(t, ids[5], &n), 0);
    assert_int_equal(n.fails, 1);
    assert_int_equal(dg_dht_node_state(&n, T0 + 100), DG_DHT_NODE_GOOD);
    /* A failure reported at another address is not this node's. */
    struct sockaddr_storage other = local(9999);
    assert_int_equal(dg_dht_table_failed(t, ids[5], SA(other), T0 + 100), -ENOENT);
    assert_int_equal(dg_dht_table_failed(t, ids[5], NULL, T0 + 100), DG_DHT_FAILED_BAD);
    assert_int_equal(dg_dht_table_find(t, ids[5], &n), 0);
    assert_int_equal(dg_dht_node_state(&n, T0 + 100), DG_DHT_NODE_BAD);

    /* Bad nodes are not handed out. */
    struct dg_dht_node out[DG_DHT_MAX_NODES];
    size_t cnt = dg_dht_table_closest(t, ids[5], out, DG_DHT_MAX_NODES);
    assert_int_equal(cnt, DG_DHT_K);
    for (size_t i = 0; i < cnt; i++)
        assert_memory_not_equal(out[i].id, ids[5], DG_NODE_ID_LEN);

    /* A newcomer takes the bad node's place at once. */
    id_at(own, 0, &seed, id);
    struct sockaddr_storage na = local(500);
    assert_int_equal(dg_dht_table_heard(t, id, SA(na), DG_DHT_HEARD_QUERY, T0 + 200, NULL),
                     DG_DHT_HEARD_REPLACED_BAD);
    assert_int_equal(dg_dht_table_find(t, ids[5], NULL), -ENOENT);
    assert_int_equal(dg_dht_table_find(t, id, &n), 0);
    /* Heard only through a query: questionable, and not handed to others. */
    assert_int_equal(dg_dht_node_state(&n, T0 + 200), DG_DHT_NODE_QUESTIONABLE);
    assert_int_equal(n.flags & DG_DHT_NODE_CONFIRMED, 0);
    cnt = dg_dht_table_closest(t, id, out, DG_DHT_MAX_NODES);
    assert_int_equal(cnt, DG_DHT_K);
    for (size_t i = 0; i < cnt; i++)
        assert_memory_not_equal(out[i].id, id, DG_NODE_ID_LEN);
    /* Once it replies it is good and handed out. */
    assert_int_equal(dg_dht_table_heard(t, id, SA(na), DG_DHT_HEARD_REPLY, T0 + 300, NULL),
                     DG_DHT_HEARD_UPDATED);
    assert_int_equal(dg_dht_table_closest(t, id, out, 1), 1);
    assert_memory_equal(out[0].id, id, DG_NODE_ID_LEN);
    /* A reply clears failures. */
    assert_int_equal(dg_dht_table_failed(t, id, NULL, T0 + 400), DG_DHT_FAILED_COUNTED);
    assert_int_equal(dg_dht_table_heard(t, id, SA(na), DG_DHT_HEARD_REPLY, T0 + 500, NULL),
                     DG_DHT_HEARD_UPDATED);
    assert_int_equal(dg_dht_table_find(t, id, &n), 0);
    assert_int_equal(n.fails, 0);
    check_invariants(t, 0);
    dg_dht_table_free(t);
}

static void test_table_questionable_ping_and_promotion(void **state)
{
    uint64_t seed = 4;
    uint8_t own[DG_NODE_ID_LEN], ids[DG_DHT_K][DG_NODE_ID_LEN];
    uint8_t n1[DG_NODE_ID_LEN], n2[DG_NODE_ID_LEN], n3[DG_NODE_ID_LEN];
    struct sockaddr_storage addrs[DG_DHT_K];
    struct dg_dht_node ping, n;
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    fill_far_bucket(t, own, &seed, ids, addrs);

    /* While they are good, a newcomer just waits; nothing to ping. */
    id_at(own, 0, &seed, n1);
    struct sockaddr_storage a1 = local(601);
    assert_int_equal(dg_dht_table_heard(t, n1, SA(a1), DG_DHT_HEARD_REPLY, T0 + 5 * MIN_MS, &ping),
                     DG_DHT_HEARD_PENDING);

    /* Node 3 keeps querying us, so it stays good (it has replied before). */
    uint64_t now = T0 + 16 * MIN_MS;
    assert_int_equal(dg_dht_table_heard(t, ids[3], SA(addrs[3]), DG_DHT_HEARD_QUERY, now - 1, NULL),
                     DG_DHT_HEARD_UPDATED);
    dg_dht_table_stats(t, now, &st);
    assert_int_equal(st.good, 1);
    assert_int_equal(st.questionable, DG_DHT_K); /* seven far ones and the near one */

    /* 16 minutes on, the others are questionable: a newcomer (n1 heard again) names the least
     * recently seen (node 0, seen at T0) for a ping. */
    assert_int_equal(dg_dht_table_heard(t, n1, SA(a1), DG_DHT_HEARD_REPLY, now, &ping),
                     DG_DHT_HEARD_PENDING_PING);
    assert_memory_equal(ping.id, ids[0], DG_NODE_ID_LEN);
    assert_true(addr_eq(&ping.addr, &addrs[0]));
    /* The next newcomer gets the next one: node 0 was just handed out. */
    id_at(own, 0, &seed, n2);
    struct sockaddr_storage a2 = local(602);
    assert_int_equal(dg_dht_table_heard(t, n2, SA(a2), DG_DHT_HEARD_QUERY, now + 1, &ping),
                     DG_DHT_HEARD_PENDING_PING);
    assert_memory_equal(ping.id, ids[1], DG_NODE_ID_LEN);

    /* Node 1 answers the ping: good again; n2 stays pending. */
    assert_int_equal(dg_dht_table_heard(t, ids[1], SA(addrs[1]), DG_DHT_HEARD_REPLY, now + 2, NULL),
                     DG_DHT_HEARD_UPDATED);
    assert_int_equal(dg_dht_table_find(t, ids[1], &n), 0);
    assert_int_equal(dg_dht_node_state(&n, now + 2), DG_DHT_NODE_GOOD);

    /* Node 0 fails: counted; it may be named again at once for the second try. */
    assert_int_equal(dg_dht_table_failed(t, ids[0], SA(addrs[0]), now + 3), DG_DHT_FAILED_COUNTED);
    id_at(own, 0, &seed, n3);
    struct sockaddr_storage a3 = local(603);
    assert_int_equal(dg_dht_table_heard(t, n3, SA(a3), DG_DHT_HEARD_QUERY, now + 4, &ping),
                     DG_DHT_HEARD_PENDING_PING);
    assert_memory_equal(ping.id, ids[0], DG_NODE_ID_LEN);
    dg_dht_table_stats(t, now + 4, &st);
    assert_int_equal(st.replacements, 3);

    /* Second failure: node 0 is bad and the best replacement takes its place. n1 has replied
     * (confirmed) and wins over n2 and n3, which were only heard through queries. */
    assert_int_equal(dg_dht_table_failed(t, ids[0], SA(addrs[0]), now + 5), DG_DHT_FAILED_REPLACED);
    assert_int_equal(dg_dht_table_find(t, ids[0], NULL), -ENOENT);
    assert_int_equal(dg_dht_table_find(t, n1, &n), 0);
    assert_int_equal(dg_dht_node_state(&n, now + 5), DG_DHT_NODE_GOOD);
    dg_dht_table_stats(t, now + 5, &st);
    assert_int_equal(st.replacements, 2);
    assert_int_equal(st.nodes, DG_DHT_K + 1);

    /* A replacement that fails is forgotten. */
    assert_int_equal(dg_dht_table_failed(t, n2, NULL, now + 6), DG_DHT_FAILED_DROPPED);
    assert_int_equal(dg_dht_table_failed(t, n2, NULL, now + 6), -ENOENT);

    /* The ping hold-off: with every questionable node handed out in the last 10 s, a newcomer
     * gets no ping candidate; after the hold-off it does. */
    int handed = 0;
    for (int i = 0; i < 20; i++) {
        uint8_t x[DG_NODE_ID_LEN];
        id_at(own, 0, &seed, x);
        struct sockaddr_storage ax = local(700 + (uint32_t)i);
        int rc = dg_dht_table_heard(t, x, SA(ax), DG_DHT_HEARD_QUERY, now + 10, &ping);
        assert_true(rc == DG_DHT_HEARD_PENDING_PING || rc == DG_DHT_HEARD_PENDING);
        handed += rc == DG_DHT_HEARD_PENDING_PING;
    }
    /* Questionable and not yet handed out at now+10: nodes 2, 4..7 (0 is gone, 1 and 3 good). */
    assert_int_equal(handed, 5);
    uint8_t y[DG_NODE_ID_LEN];
    id_at(own, 0, &seed, y);
    struct sockaddr_storage ay = local(800);
    assert_int_equal(dg_dht_table_heard(t, y, SA(ay), DG_DHT_HEARD_QUERY,
                                        now + 10 + DG_DHT_PING_HOLDOFF_MS, &ping),
                     DG_DHT_HEARD_PENDING_PING);
    dg_dht_table_stats(t, now, &st);
    assert_int_equal(st.replacements, DG_DHT_REPLACEMENTS);
    check_invariants(t, 0);
    dg_dht_table_free(t);
}

/* Replacements that have replied are not pushed out by nodes only heard through queries. */
static void test_table_replacements_prefer_confirmed(void **state)
{
    uint64_t seed = 5;
    uint8_t own[DG_NODE_ID_LEN], ids[DG_DHT_K][DG_NODE_ID_LEN], r[DG_DHT_REPLACEMENTS][20];
    struct sockaddr_storage addrs[DG_DHT_K];
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    fill_far_bucket(t, own, &seed, ids, addrs);
    for (int i = 0; i < DG_DHT_REPLACEMENTS; i++) {
        id_at(own, 0, &seed, r[i]);
        struct sockaddr_storage a = local(900 + (uint32_t)i);
        assert_int_equal(dg_dht_table_heard(t, r[i], SA(a), DG_DHT_HEARD_REPLY, T0 + 20, NULL),
                         DG_DHT_HEARD_PENDING);
    }
    for (int i = 0; i < 30; i++) {
        uint8_t x[DG_NODE_ID_LEN];
        id_at(own, 0, &seed, x);
        struct sockaddr_storage a = local(1000 + (uint32_t)i);
        assert_int_equal(dg_dht_table_heard(t, x, SA(a), DG_DHT_HEARD_QUERY, T0 + 30, NULL),
                         DG_DHT_HEARD_PENDING);
    }
    /* All original replacements are still there: each one can be dropped by failing. */
    for (int i = 0; i < DG_DHT_REPLACEMENTS; i++)
        assert_int_equal(dg_dht_table_failed(t, r[i], NULL, T0 + 40), DG_DHT_FAILED_DROPPED);
    dg_dht_table_stats(t, T0 + 40, &st);
    assert_int_equal(st.replacements, 0);
    dg_dht_table_free(t);
}

static void test_table_one_entry_per_ip(void **state)
{
    uint64_t seed = 6;
    uint8_t own[DG_NODE_ID_LEN], a[DG_NODE_ID_LEN], b[DG_NODE_ID_LEN], c[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;
    struct dg_dht_node n;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    id_at(own, 0, &seed, a);
    id_at(own, 1, &seed, b);
    id_at(own, 2, &seed, c);
    struct sockaddr_storage ip1 = v4("10.1.1.1", 6881), ip1p = v4("10.1.1.1", 7000);
    struct sockaddr_storage ip2 = v4("10.1.1.2", 6881);

    assert_int_equal(dg_dht_table_heard(t, a, SA(ip1), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    /* Another id from the same IP, any port: refused. */
    assert_int_equal(dg_dht_table_heard(t, b, SA(ip1), DG_DHT_HEARD_REPLY, T0, NULL), -EEXIST);
    assert_int_equal(dg_dht_table_heard(t, b, SA(ip1p), DG_DHT_HEARD_QUERY, T0, NULL), -EEXIST);
    /* The same id from another address: refused too (the first one is good). */
    assert_int_equal(dg_dht_table_heard(t, a, SA(ip2), DG_DHT_HEARD_REPLY, T0, NULL), -EEXIST);
    assert_int_equal(dg_dht_table_heard(t, a, SA(ip1p), DG_DHT_HEARD_REPLY, T0, NULL), -EEXIST);
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.nodes, 1);
    assert_int_equal(st.rejected_same_ip, 2);
    assert_int_equal(st.rejected_id, 2);

    /* Once the entry is bad, a newcomer from that IP replaces it. */
    assert_int_equal(dg_dht_table_failed(t, a, NULL, T0 + 1), DG_DHT_FAILED_COUNTED);
    assert_int_equal(dg_dht_table_failed(t, a, NULL, T0 + 2), DG_DHT_FAILED_BAD);
    assert_int_equal(dg_dht_table_heard(t, b, SA(ip1p), DG_DHT_HEARD_REPLY, T0 + 3, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_find(t, a, NULL), -ENOENT);
    assert_int_equal(dg_dht_table_find(t, b, &n), 0);
    assert_true(addr_eq(&n.addr, &ip1p));
    /* A bad node that moved: its id is accepted at the new address. */
    assert_int_equal(dg_dht_table_failed(t, b, NULL, T0 + 4), DG_DHT_FAILED_COUNTED);
    assert_int_equal(dg_dht_table_failed(t, b, NULL, T0 + 5), DG_DHT_FAILED_BAD);
    assert_int_equal(dg_dht_table_heard(t, b, SA(ip2), DG_DHT_HEARD_REPLY, T0 + 6, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_find(t, b, &n), 0);
    assert_true(addr_eq(&n.addr, &ip2));
    assert_int_equal(dg_dht_table_count(t), 1);
    dg_dht_table_free(t);

    /* DG_DHT_TABLE_SAME_IP: one entry per IP and port (many nodes on one loopback IP). */
    t = table_new(AF_INET, own, DG_DHT_TABLE_SAME_IP, &seed, T0);
    struct sockaddr_storage lo1 = v4("127.0.0.1", 7001), lo2 = v4("127.0.0.1", 7002);
    assert_int_equal(dg_dht_table_heard(t, a, SA(lo1), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_heard(t, b, SA(lo2), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_heard(t, c, SA(lo2), DG_DHT_HEARD_REPLY, T0, NULL), -EEXIST);
    assert_int_equal(dg_dht_table_count(t), 2);
    check_invariants(t, 1);
    dg_dht_table_free(t);
}

static void test_table_bep42(void **state)
{
    uint64_t seed = 7;
    uint8_t own[DG_NODE_ID_LEN], good[DG_NODE_ID_LEN], bad[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    struct sockaddr_storage pub = v4("124.31.75.21", 6881);
    assert_int_equal(dg_node_id_make(SA(pub), 1, rng_bytes, &seed, good), 0);
    memcpy(bad, good, sizeof(bad));
    bad[0] ^= 0x40;

    assert_int_equal(dg_dht_table_heard(t, bad, SA(pub), DG_DHT_HEARD_REPLY, T0, NULL), -EACCES);
    assert_int_equal(dg_dht_table_heard(t, bad, SA(pub), DG_DHT_HEARD_QUERY, T0, NULL), -EACCES);
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.rejected_bep42, 2);
    assert_int_equal(st.nodes, 0);
    assert_int_equal(dg_dht_table_heard(t, good, SA(pub), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    /* Local addresses are exempt: any id goes. */
    struct sockaddr_storage lan = v4("192.168.1.20", 6881), lo = v4("127.0.0.1", 6881);
    assert_int_equal(dg_dht_table_heard(t, bad, SA(lan), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    uint8_t other[DG_NODE_ID_LEN];
    id_at(own, 3, &seed, other);
    assert_int_equal(dg_dht_table_heard(t, other, SA(lo), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    dg_dht_table_free(t);

    /* With enforcement off, the bad id is taken. */
    t = table_new(AF_INET, own, DG_DHT_TABLE_NO_BEP42, &seed, T0);
    assert_int_equal(dg_dht_table_heard(t, bad, SA(pub), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    dg_dht_table_set_flags(t, 0);
    uint8_t bad2[DG_NODE_ID_LEN];
    memcpy(bad2, bad, sizeof(bad2));
    bad2[5] ^= 1;
    struct sockaddr_storage pub2 = v4("124.31.75.22", 6881);
    assert_int_equal(dg_dht_table_heard(t, bad2, SA(pub2), DG_DHT_HEARD_REPLY, T0, NULL), -EACCES);
    dg_dht_table_free(t);

    /* IPv6. */
    t = table_new(AF_INET6, own, 0, &seed, T0);
    struct sockaddr_storage p6 = v6("2001:db8:85a3:8d3::1", 6881);
    assert_int_equal(dg_node_id_make(SA(p6), 6, rng_bytes, &seed, good), 0);
    assert_int_equal(dg_dht_table_heard(t, good, SA(p6), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    struct sockaddr_storage p6b = v6("2001:db8:85a3:8d4::1", 6881);
    good[19] ^= 1;
    assert_int_equal(dg_dht_table_heard(t, good, SA(p6b), DG_DHT_HEARD_REPLY, T0, NULL), -EACCES);
    struct sockaddr_storage ula = v6("fd00::5", 6881);
    assert_int_equal(dg_dht_table_heard(t, good, SA(ula), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    dg_dht_table_free(t);
}

static void test_table_rejects_invalid(void **state)
{
    uint64_t seed = 8;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    id_at(own, 0, &seed, id);
    struct dg_dht_table *t = table_new(AF_INET, own, DG_DHT_TABLE_NO_BEP42, &seed, T0);
    struct sockaddr_storage bad[] = {v6("2001:db8::1", 6881), v4("10.0.0.1", 0),
                                     v4("0.0.0.0", 6881), v4("224.0.0.1", 6881),
                                     v4("255.255.255.255", 6881)};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(dg_dht_table_heard(t, id, SA(bad[i]), DG_DHT_HEARD_REPLY, T0, NULL),
                         -EINVAL);
    struct sockaddr_storage ok = v4("10.0.0.1", 6881);
    assert_int_equal(dg_dht_table_heard(t, own, SA(ok), DG_DHT_HEARD_REPLY, T0, NULL), -EINVAL);
    assert_int_equal(dg_dht_table_heard(t, id, SA(ok), (enum dg_dht_heard_kind)7, T0, NULL),
                     -EINVAL);
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.rejected_invalid, 7);
    /* An IPv4 table takes IPv4-mapped IPv6 and stores it as IPv4. */
    struct sockaddr_storage m = v6("::ffff:10.0.0.1", 6881);
    struct dg_dht_node n;
    assert_int_equal(dg_dht_table_heard(t, id, SA(m), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_heard(t, id, SA(ok), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_UPDATED);
    assert_int_equal(dg_dht_table_find(t, id, &n), 0);
    assert_int_equal(n.addr.ss_family, AF_INET);
    dg_dht_table_free(t);

    /* An IPv6 table refuses IPv4 in both forms. */
    t = table_new(AF_INET6, own, DG_DHT_TABLE_NO_BEP42, &seed, T0);
    assert_int_equal(dg_dht_table_heard(t, id, SA(m), DG_DHT_HEARD_REPLY, T0, NULL), -EINVAL);
    assert_int_equal(dg_dht_table_heard(t, id, SA(ok), DG_DHT_HEARD_REPLY, T0, NULL), -EINVAL);
    struct sockaddr_storage a6 = v6("2001:db8::2", 6881);
    assert_int_equal(dg_dht_table_heard(t, id, SA(a6), DG_DHT_HEARD_REPLY, T0, NULL),
                     DG_DHT_HEARD_ADDED);
    assert_int_equal(dg_dht_table_find(t, id, &n), 0);
    assert_int_equal(n.addr.ss_family, AF_INET6);
    assert_true(addr_eq(&n.addr, &a6));
    dg_dht_table_free(t);
}

/* Inserts @p count random BEP 42-valid nodes at random public addresses; a share of them is
 * made bad or heard only through queries. */
static void populate(struct dg_dht_table *t, int family, int count, uint64_t *seed, uint64_t now)
{
    for (int i = 0; i < count; i++) {
        struct sockaddr_storage ss;
        uint8_t id[DG_NODE_ID_LEN];
        memset(&ss, 0, sizeof(ss));
        if (family == AF_INET) {
            uint32_t ip;
            do {
                ip = (uint32_t)rng_next(seed);
            } while ((ip >> 24) == 0 || (ip >> 24) >= 224);
            ss = v4n(ip, (uint16_t)(1 + rng_next(seed) % 65535));
        } else {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
            s6->sin6_family = AF_INET6;
            rng_bytes(seed, &s6->sin6_addr, 16);
            s6->sin6_addr.s6_addr[0] = 0x20;
            s6->sin6_port = htons(6881);
        }
        assert_int_equal(dg_node_id_make(SA(ss), (uint8_t)rng_next(seed), rng_bytes, seed, id), 0);
        unsigned roll = (unsigned)(rng_next(seed) % 10);
        int rc = dg_dht_table_heard(t, id, SA(ss),
                                    roll == 0 ? DG_DHT_HEARD_QUERY : DG_DHT_HEARD_REPLY, now, NULL);
        assert_true(rc >= 0 || rc == -EEXIST);
    }
}

/* Fails every @p every-th node twice (some become bad, some are replaced by a pending node). */
static void make_some_bad(struct dg_dht_table *t, size_t every, uint64_t now)
{
    size_t n = dg_dht_table_count(t);
    uint8_t(*ids)[DG_NODE_ID_LEN] = calloc(n, DG_NODE_ID_LEN);

    assert_non_null(ids);
    for (size_t i = 0; i < n; i++) {
        struct dg_dht_node x;
        assert_int_equal(dg_dht_table_node_at(t, i, &x), 0);
        memcpy(ids[i], x.id, DG_NODE_ID_LEN);
    }
    for (size_t i = 0; i < n; i += every) {
        assert_int_equal(dg_dht_table_failed(t, ids[i], NULL, now), DG_DHT_FAILED_COUNTED);
        int rc = dg_dht_table_failed(t, ids[i], NULL, now);
        assert_true(rc == DG_DHT_FAILED_BAD || rc == DG_DHT_FAILED_REPLACED);
    }
    free(ids);
}

static void test_table_closest_vs_brute_force(void **state)
{
    uint64_t seed = 9;
    uint8_t own[DG_NODE_ID_LEN], target[DG_NODE_ID_LEN];

    (void)state;
    for (int family = 0; family < 2; family++) {
        int af = family ? AF_INET6 : AF_INET;
        rng_bytes(&seed, own, sizeof(own));
        struct dg_dht_table *t = table_new(af, own, 0, &seed, T0);
        populate(t, af, 2000, &seed, T0);
        make_some_bad(t, 5, T0);
        check_invariants(t, 0);

        size_t n = dg_dht_table_count(t);
        struct dg_dht_table_stats st;
        dg_dht_table_stats(t, T0, &st);
        assert_true(n > 50);
        assert_true(st.bad > 0);
        assert_true(st.questionable > 0);
        struct dg_dht_node *all = calloc(n, sizeof(*all));
        struct dg_dht_node *out = calloc(n + 1, sizeof(*out));
        uint8_t(*ref)[DG_NODE_ID_LEN] = calloc(n, DG_NODE_ID_LEN);
        assert_non_null(all);
        assert_non_null(out);
        assert_non_null(ref);
        size_t eligible = 0;
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(dg_dht_table_node_at(t, i, &all[i]), 0);
            if ((all[i].flags & DG_DHT_NODE_CONFIRMED) &&
                dg_dht_node_state(&all[i], T0) != DG_DHT_NODE_BAD)
                memcpy(ref[eligible++], all[i].id, DG_NODE_ID_LEN);
        }
        assert_true(eligible < n);

        for (int round = 0; round < 300; round++) {
            if (round % 3 == 0)
                memcpy(target, all[rng_next(&seed) % n].id, DG_NODE_ID_LEN);
            else if (round % 3 == 1)
                dg_node_id_random_prefixed(own, (unsigned)(rng_next(&seed) % 30), rng_bytes, &seed,
                                           target);
            else
                rng_bytes(&seed, target, sizeof(target));
            /* Reference: a selection by brute force, each place taking the closest left. */
            size_t max = round % 4 == 0 ? n + 1 : DG_DHT_K;
            size_t got = dg_dht_table_closest(t, target, out, max);
            assert_int_equal(got, eligible < max ? eligible : max);
            uint8_t used[DG_DHT_MAX_NODES];
            memset(used, 0, sizeof(used));
            for (size_t k = 0; k < got; k++) {
                size_t best = SIZE_MAX;
                for (size_t j = 0; j < eligible; j++) {
                    if (used[j])
                        continue;
                    if (best == SIZE_MAX || dg_node_id_closer(target, ref[j], ref[best]) < 0)
                        best = j;
                }
                used[best] = 1;
                assert_memory_equal(out[k].id, ref[best], DG_NODE_ID_LEN);
            }
        }
        free(all);
        free(out);
        free(ref);
        dg_dht_table_free(t);
    }
}

static void test_table_refresh(void **state)
{
    uint64_t seed = 10;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN], target[DG_NODE_ID_LEN];
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    assert_int_equal(dg_dht_table_next_refresh(t, T0 + 1, target), -EAGAIN);
    assert_int_equal(dg_dht_table_refresh_due_in(t, T0 + 1), DG_DHT_REFRESH_MS - 1);
    assert_int_equal(dg_dht_table_next_refresh(t, T0 + DG_DHT_REFRESH_MS, target), 0);
    assert_int_equal(dg_dht_table_next_refresh(t, T0 + DG_DHT_REFRESH_MS, target), -EAGAIN);
    assert_int_equal(dg_dht_table_refresh_due_in(t, T0 + DG_DHT_REFRESH_MS), DG_DHT_REFRESH_MS);

    /* Build buckets 0..4 at different times: bucket i is last changed at base + i minutes. */
    uint64_t base = T0 + 20 * MIN_MS;
    uint32_t ip = 1;
    for (unsigned cpl = 0; cpl < 5; cpl++) {
        for (int i = 0; i < DG_DHT_K; i++) {
            id_at(own, cpl, &seed, id);
            struct sockaddr_storage a = local(ip++);
            assert_int_equal(
                dg_dht_table_heard(t, id, SA(a), DG_DHT_HEARD_REPLY, base + cpl * MIN_MS, NULL),
                DG_DHT_HEARD_ADDED);
        }
    }
    /* One more near node so the last bucket changes late. */
    id_at(own, 10, &seed, id);
    struct sockaddr_storage an = local(ip++);
    assert_int_equal(dg_dht_table_heard(t, id, SA(an), DG_DHT_HEARD_REPLY, base + 9 * MIN_MS, NULL),
                     DG_DHT_HEARD_ADDED);
    dg_dht_table_stats(t, base, &st);
    unsigned nb = (unsigned)st.buckets;
    assert_true(nb >= 5);

    /* A reply from a node in bucket 2 postpones that bucket. */
    uint8_t b2[DG_NODE_ID_LEN];
    struct dg_dht_node n;
    for (size_t i = 0;; i++) {
        assert_int_equal(dg_dht_table_node_at(t, i, &n), 0);
        if (dg_node_id_common_prefix(own, n.id) == 2)
            break;
    }
    memcpy(b2, n.id, sizeof(b2));
    assert_int_equal(
        dg_dht_table_heard(t, b2, SA(n.addr), DG_DHT_HEARD_REPLY, base + 8 * MIN_MS, NULL),
        DG_DHT_HEARD_UPDATED);
    /* A query does not count as a change. */
    assert_int_equal(
        dg_dht_table_heard(t, b2, SA(n.addr), DG_DHT_HEARD_QUERY, base + 12 * MIN_MS, NULL),
        DG_DHT_HEARD_UPDATED);

    /* At base + 19 min: buckets 0, 1, 3 (changed at +0, +1, +3 minutes) are due, oldest first;
     * bucket 4 (changed at +4 min) is due at +19 min exactly. */
    uint64_t now = base + 18 * MIN_MS + 1;
    assert_int_equal(dg_dht_table_refresh_due_in(t, base), 15 * MIN_MS);
    assert_int_equal(dg_dht_table_refresh_due_in(t, now), 0);
    int want[] = {0, 1, 3};
    for (size_t k = 0; k < 3; k++) {
        int b = dg_dht_table_next_refresh(t, now, target);
        assert_int_equal(b, want[k]);
        assert_int_equal(dg_node_id_common_prefix(own, target), (unsigned)b);
    }
    assert_int_equal(dg_dht_table_next_refresh(t, now, target), -EAGAIN);
    assert_int_equal(dg_dht_table_refresh_due_in(t, now), MIN_MS - 1);
    assert_int_equal(dg_dht_table_next_refresh(t, base + 19 * MIN_MS, target), 4);
    assert_int_equal(dg_node_id_common_prefix(own, target), 4);
    /* Bucket 2 at +8 + 15 = +23 min, the last bucket at +24 min. */
    assert_int_equal(dg_dht_table_next_refresh(t, base + 23 * MIN_MS - 1, target), -EAGAIN);
    assert_int_equal(dg_dht_table_next_refresh(t, base + 23 * MIN_MS, target), 2);
    int last = dg_dht_table_next_refresh(t, base + 24 * MIN_MS, target);
    assert_int_equal(last, (int)nb - 1);
    assert_true(dg_node_id_common_prefix(own, target) >= nb - 1);
    /* Refreshed buckets come round again 15 minutes later. */
    assert_int_equal(dg_dht_table_next_refresh(t, now + DG_DHT_REFRESH_MS, target), 0);

    /* Much later all are due, the longest-waiting first: 1 and 3 (refreshed at +18 min), 4,
     * 2, the last bucket, then 0 (refreshed at +33 min). */
    uint64_t later = base + 200 * MIN_MS;
    int order[] = {1, 3, 4, 2, (int)nb - 1, 0};
    for (size_t k = 0; k < sizeof(order) / sizeof(order[0]); k++) {
        int b = dg_dht_table_next_refresh(t, later, target);
        assert_int_equal(b, order[k]);
        if (b < (int)nb - 1)
            assert_int_equal(dg_node_id_common_prefix(own, target), (unsigned)b);
    }
    assert_int_equal(dg_dht_table_next_refresh(t, later, target), -EAGAIN);
    dg_dht_table_free(t);
}

/* Random heard/failed/refresh/closest operations over small pools of ids and addresses (so
 * that updates, id conflicts, IP conflicts, replacements and promotions all happen), with the
 * invariants checked as it goes. */
static void test_table_random_ops(void **state)
{
    uint64_t seed = 30;
    uint8_t own[DG_NODE_ID_LEN], ids[300][DG_NODE_ID_LEN], target[DG_NODE_ID_LEN];
    struct dg_dht_node ping, out[DG_DHT_K];
    struct dg_dht_table_stats st;
    uint64_t now = T0;
    unsigned results[8];

    (void)state;
    memset(results, 0, sizeof(results));
    rng_bytes(&seed, own, sizeof(own));
    for (int i = 0; i < 300; i++)
        id_at(own, (unsigned)(rng_next(&seed) % 12), &seed, ids[i]);
    for (int flags = 0; flags < 2; flags++) {
        struct dg_dht_table *t =
            table_new(AF_INET, own, flags ? DG_DHT_TABLE_SAME_IP : 0, &seed, now);
        for (int op = 0; op < 30000; op++) {
            now += rng_next(&seed) % 2000;
            /* Node i lives at 10.0.0.(i % 200):6881 (so some share an IP), but one time in
             * ten it shows up elsewhere. */
            uint32_t i = (uint32_t)(rng_next(&seed) % 300);
            const uint8_t *id = ids[i];
            uint32_t host = rng_next(&seed) % 10 ? i % 200 : (uint32_t)(rng_next(&seed) % 200);
            uint16_t port = (uint16_t)(rng_next(&seed) % 10 ? 6881 : 6882);
            struct sockaddr_storage a = v4n(0x0a000000u + host, port);
            unsigned what = (unsigned)(rng_next(&seed) % 10);
            if (what < 6) {
                int rc = dg_dht_table_heard(
                    t, id, SA(a), what < 4 ? DG_DHT_HEARD_REPLY : DG_DHT_HEARD_QUERY, now, &ping);
                assert_true(rc == -EEXIST || (rc >= 0 && rc <= DG_DHT_HEARD_PENDING));
                results[rc < 0 ? 7 : rc]++;
                if (rc == DG_DHT_HEARD_PENDING_PING) {
                    assert_int_equal(dg_dht_table_find(t, ping.id, NULL), 0);
                    assert_int_equal(dg_dht_node_state(&ping, now), DG_DHT_NODE_QUESTIONABLE);
                }
            } else if (what < 9) {
                int rc = dg_dht_table_failed(t, id, (rng_next(&seed) & 1) ? SA(a) : NULL, now);
                assert_true(rc == -ENOENT || (rc >= 0 && rc <= DG_DHT_FAILED_DROPPED));
                if (rc >= 0)
                    results[5]++;
            } else {
                rng_bytes(&seed, target, sizeof(target));
                size_t n = dg_dht_table_closest(t, target, out, DG_DHT_K);
                for (size_t k = 1; k < n; k++)
                    assert_true(dg_node_id_closer(target, out[k - 1].id, out[k].id) < 0);
                if (dg_dht_table_next_refresh(t, now, target) >= 0)
                    results[6]++;
            }
            if (op % 1000 == 0)
                check_invariants(t, flags);
        }
        check_invariants(t, flags);
        dg_dht_table_stats(t, now, &st);
        assert_true(st.replacements <= st.buckets * DG_DHT_REPLACEMENTS);
        dg_dht_table_free(t);
    }
    /* Every outcome happened. */
    for (int i = 0; i < 8; i++)
        assert_true(results[i] > 0);
}

/* ---- save / load ---- */

static void fix_crc(uint8_t *buf, size_t len)
{
    uint32_t crc = dg_node_id_crc32c(0, buf, len - 4);
    buf[len - 4] = (uint8_t)(crc >> 24);
    buf[len - 3] = (uint8_t)(crc >> 16);
    buf[len - 2] = (uint8_t)(crc >> 8);
    buf[len - 1] = (uint8_t)crc;
}

static void test_save_load_round_trip(void **state)
{
    uint64_t seed = 11;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    static uint8_t buf[DG_DHT_SAVE_MAX];

    (void)state;
    for (int family = 0; family < 2; family++) {
        int af = family ? AF_INET6 : AF_INET;
        rng_bytes(&seed, own, sizeof(own));
        struct dg_dht_table *t = table_new(af, own, 0, &seed, T0);
        populate(t, af, 500, &seed, T0);
        size_t n = dg_dht_table_count(t);
        size_t eligible = 0;
        for (size_t i = 0; i < n; i++) {
            struct dg_dht_node x;
            assert_int_equal(dg_dht_table_node_at(t, i, &x), 0);
            eligible += (x.flags & DG_DHT_NODE_CONFIRMED) && x.fails < DG_DHT_BAD_FAILS;
        }
        int len = dg_dht_table_save(t, buf, sizeof(buf));
        size_t esz = DG_NODE_ID_LEN + (af == AF_INET ? 4 : 16) + 2;
        assert_int_equal(len, DG_DHT_SAVE_HEADER + eligible * esz + 4);
        assert_int_equal(dg_dht_table_save(t, buf, (size_t)len - 1), -ENOSPC);
        assert_int_equal(dg_dht_table_save(t, NULL, 0), -ENOSPC);
        assert_int_equal(dg_dht_table_save(t, buf, (size_t)len), len);
        assert_memory_equal(buf, "DGRT", 4);

        int fam;
        assert_int_equal(dg_dht_table_load_id(buf, (size_t)len, &fam, id), 0);
        assert_int_equal(fam, af);
        assert_memory_equal(id, own, sizeof(own));

        /* Into a fresh table with another id: every saved node comes back, as confirmed but
         * not replied in this run (questionable), and is handed out by closest(). */
        uint8_t own2[DG_NODE_ID_LEN];
        rng_bytes(&seed, own2, sizeof(own2));
        struct dg_dht_table *t2 = table_new(af, own2, 0, &seed, T0 + 1000);
        int loaded = dg_dht_table_load(t2, buf, (size_t)len, T0 + 1000);
        assert_true(loaded > 0);
        /* Another own id distributes the nodes differently; some may not fit. */
        struct dg_dht_table_stats st;
        dg_dht_table_stats(t2, T0 + 1000, &st);
        assert_int_equal(st.nodes, (size_t)loaded);
        assert_int_equal(st.questionable, (size_t)loaded);
        assert_int_equal(st.load_skipped, 0);
        check_invariants(t2, 0);
        for (size_t i = 0; i < (size_t)loaded; i++) {
            struct dg_dht_node x, y;
            assert_int_equal(dg_dht_table_node_at(t2, i, &x), 0);
            assert_int_equal(x.flags, DG_DHT_NODE_CONFIRMED);
            assert_int_equal(dg_dht_table_find(t, x.id, &y), 0);
            assert_true(addr_eq(&x.addr, &y.addr));
        }
        struct dg_dht_node out[DG_DHT_K];
        assert_int_equal(dg_dht_table_closest(t2, own2, out, DG_DHT_K), DG_DHT_K);
        dg_dht_table_free(t2);

        /* Into a table with the same id: exactly the saved nodes. Loading twice adds nothing. */
        t2 = table_new(af, own, 0, &seed, T0);
        assert_int_equal(dg_dht_table_load(t2, buf, (size_t)len, T0), (int)eligible);
        assert_int_equal(dg_dht_table_load(t2, buf, (size_t)len, T0), 0);
        assert_int_equal(dg_dht_table_count(t2), eligible);
        /* A save of the loaded table is the same bytes (same order). */
        static uint8_t buf2[DG_DHT_SAVE_MAX];
        assert_int_equal(dg_dht_table_save(t2, buf2, sizeof(buf2)), len);
        assert_memory_equal(buf, buf2, (size_t)len);
        dg_dht_table_free(t2);

        /* The other family's table refuses it. */
        t2 = table_new(af == AF_INET ? AF_INET6 : AF_INET, own, 0, &seed, T0);
        assert_int_equal(dg_dht_table_load(t2, buf, (size_t)len, T0), -EINVAL);
        assert_int_equal(dg_dht_table_count(t2), 0);
        dg_dht_table_free(t2);
        dg_dht_table_free(t);
    }
}

static void test_load_damaged(void **state)
{
    uint64_t seed = 12;
    uint8_t own[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
    static uint8_t buf[DG_DHT_SAVE_MAX], bad[DG_DHT_SAVE_MAX + 64];
    int fam;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    populate(t, AF_INET, 100, &seed, T0);
    int len = dg_dht_table_save(t, buf, sizeof(buf));
    assert_true(len > 100);
    dg_dht_table_free(t);

    t = table_new(AF_INET, own, 0, &seed, T0);
    /* Every truncation, and one byte too many. */
    for (int l = 0; l < len; l++) {
        memcpy(bad, buf, (size_t)l);
        assert_int_equal(dg_dht_table_load(t, bad, (size_t)l, T0), -EBADMSG);
        assert_int_equal(dg_dht_table_load_id(bad, (size_t)l, &fam, id), -EBADMSG);
    }
    memcpy(bad, buf, (size_t)len);
    bad[len] = 0;
    assert_int_equal(dg_dht_table_load(t, bad, (size_t)len + 1, T0), -EBADMSG);
    assert_int_equal(dg_dht_table_load(t, NULL, 0, T0), -EBADMSG);
    /* Every single-bit flip is caught (by the CRC where nothing else does). */
    for (int i = 0; i < len; i++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(bad, buf, (size_t)len);
            bad[i] ^= (uint8_t)(1 << bit);
            assert_int_equal(dg_dht_table_load(t, bad, (size_t)len, T0), -EBADMSG);
        }
    }
    /* Random garbage of many lengths. */
    for (int i = 0; i < 2000; i++) {
        size_t l = (size_t)(rng_next(&seed) % sizeof(bad));
        rng_bytes(&seed, bad, l);
        if (i & 1 && l >= 8)
            memcpy(bad, "DGRT\x01\x04", 6);
        assert_int_equal(dg_dht_table_load(t, bad, l, T0), -EBADMSG);
    }
    /* Header fields wrong but the CRC right. */
    memcpy(bad, buf, (size_t)len);
    bad[4] = 2; /* version */
    fix_crc(bad, (size_t)len);
    assert_int_equal(dg_dht_table_load(t, bad, (size_t)len, T0), -EBADMSG);
    memcpy(bad, buf, (size_t)len);
    bad[5] = 5; /* family */
    fix_crc(bad, (size_t)len);
    assert_int_equal(dg_dht_table_load(t, bad, (size_t)len, T0), -EBADMSG);
    memcpy(bad, buf, (size_t)len);
    bad[7]++; /* count does not match the length */
    fix_crc(bad, (size_t)len);
    assert_int_equal(dg_dht_table_load(t, bad, (size_t)len, T0), -EBADMSG);
    /* A count above the table's capacity, with a matching length. */
    size_t big = DG_DHT_MAX_NODES + 1;
    size_t blen = DG_DHT_SAVE_HEADER + big * 26 + 4;
    static uint8_t huge[DG_DHT_SAVE_HEADER + (DG_DHT_MAX_NODES + 1) * 26 + 4];
    memset(huge, 0, sizeof(huge));
    memcpy(huge, "DGRT\x01\x04", 6);
    huge[6] = (uint8_t)(big >> 8);
    huge[7] = (uint8_t)big;
    fix_crc(huge, blen);
    assert_int_equal(dg_dht_table_load(t, huge, blen, T0), -EBADMSG);
    assert_int_equal(dg_dht_table_count(t), 0);
    dg_dht_table_free(t);
}

/* A well-formed save with bad entries: they are skipped and counted, the rest loads. */
static void test_load_skips_bad_entries(void **state)
{
    uint64_t seed = 13;
    uint8_t own[DG_NODE_ID_LEN];
    uint8_t buf[DG_DHT_SAVE_HEADER + 8 * 26 + 4];
    struct dg_dht_table_stats st;

    (void)state;
    rng_bytes(&seed, own, sizeof(own));
    memset(buf, 0, sizeof(buf));
    memcpy(buf, "DGRT\x01\x04\x00\x08", 8);
    memcpy(buf + 8, own, DG_NODE_ID_LEN);
    uint8_t *e = buf + DG_DHT_SAVE_HEADER;
    struct sockaddr_storage pub = v4("124.31.75.21", 6881);
    uint8_t good[DG_NODE_ID_LEN];
    assert_int_equal(dg_node_id_make(SA(pub), 1, rng_bytes, &seed, good), 0);
    static const uint8_t pub_c[6] = {124, 31, 75, 21, 0x1a, 0xe1};
    /* 0: valid */
    memcpy(e, good, 20);
    memcpy(e + 20, pub_c, 6);
    /* 1: same IP as 0, another id: duplicate IP */
    e += 26;
    memcpy(e, good, 20);
    e[10] ^= 1;
    memcpy(e + 20, pub_c, 6);
    /* 2: BEP 42 invalid for a public address */
    e += 26;
    memcpy(e, good, 20);
    e[0] ^= 0x80;
    static const uint8_t pub2_c[6] = {8, 8, 8, 8, 0x1a, 0xe1};
    memcpy(e + 20, pub2_c, 6);
    /* 3: port 0 */
    e += 26;
    rng_bytes(&seed, e, 20);
    static const uint8_t p0[6] = {10, 0, 0, 3, 0, 0};
    memcpy(e + 20, p0, 6);
    /* 4: address 0.0.0.0 */
    e += 26;
    rng_bytes(&seed, e, 20);
    static const uint8_t z[6] = {0, 0, 0, 0, 0x1a, 0xe1};
    memcpy(e + 20, z, 6);
    /* 5: our own id */
    e += 26;
    memcpy(e, own, 20);
    static const uint8_t l5[6] = {10, 0, 0, 5, 0x1a, 0xe1};
    memcpy(e + 20, l5, 6);
    /* 6: valid local */
    e += 26;
    rng_bytes(&seed, e, 20);
    static const uint8_t l6[6] = {10, 0, 0, 6, 0x1a, 0xe1};
    memcpy(e + 20, l6, 6);
    /* 7: repeat of 6 (same id, same address): an update, not a second entry */
    memcpy(e + 26, e, 26);
    fix_crc(buf, sizeof(buf));

    struct dg_dht_table *t = table_new(AF_INET, own, 0, &seed, T0);
    assert_int_equal(dg_dht_table_load(t, buf, sizeof(buf), T0), 2);
    dg_dht_table_stats(t, T0, &st);
    assert_int_equal(st.nodes, 2);
    assert_int_equal(st.load_skipped, 5);
    assert_int_equal(st.rejected_same_ip, 1);
    assert_int_equal(st.rejected_bep42, 1);
    assert_int_equal(st.rejected_invalid, 3);
    dg_dht_table_free(t);

    /* Without BEP 42 enforcement, entry 2 loads too. */
    t = table_new(AF_INET, own, DG_DHT_TABLE_NO_BEP42, &seed, T0);
    assert_int_equal(dg_dht_table_load(t, buf, sizeof(buf), T0), 3);
    dg_dht_table_free(t);
}

/* ---- tokens ---- */

static void test_tokens(void **state)
{
    uint64_t seed = 14;
    struct dg_dht_tokens tk;
    uint8_t tok[DG_DHT_TOKEN_LEN], tok2[DG_DHT_TOKEN_LEN], tok3[DG_DHT_TOKEN_LEN];
    size_t len = 0;

    (void)state;
    dg_dht_tokens_init(&tk, rng_bytes, &seed, T0);
    struct sockaddr_storage a = v4("198.51.100.7", 6881), a_port = v4("198.51.100.7", 1234);
    struct sockaddr_storage b = v4("198.51.100.8", 6881);
    struct sockaddr_storage am = v6("::ffff:198.51.100.7", 6881);
    struct sockaddr_storage c = v6("2001:db8::7", 6881);

    assert_int_equal(dg_dht_token_make(&tk, SA(a), tok, &len), 0);
    assert_int_equal(len, DG_DHT_TOKEN_LEN);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, len), 1);
    /* The port does not matter; the IP does; IPv4-mapped is the same IP. */
    assert_int_equal(dg_dht_token_check(&tk, SA(a_port), tok, len), 1);
    assert_int_equal(dg_dht_token_check(&tk, SA(am), tok, len), 1);
    assert_int_equal(dg_dht_token_check(&tk, SA(b), tok, len), 0);
    assert_int_equal(dg_dht_token_check(&tk, SA(c), tok, len), 0);
    /* Wrong length or a changed byte. */
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, len - 1), 0);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, 0), 0);
    tok[3] ^= 1;
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, len), 0);
    tok[3] ^= 1;
    assert_int_equal(dg_dht_token_make(&tk, SA(c), tok3, &len), 0);
    assert_int_equal(dg_dht_token_check(&tk, SA(c), tok3, len), 1);

    /* No rotation before 5 minutes. */
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0 + DG_DHT_TOKEN_ROTATE_MS - 1), 0);
    /* One rotation: the old token still passes, new tokens differ. */
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0 + DG_DHT_TOKEN_ROTATE_MS), 1);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, len), 1);
    assert_int_equal(dg_dht_token_make(&tk, SA(a), tok2, &len), 0);
    assert_memory_not_equal(tok, tok2, sizeof(tok));
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok2, len), 1);
    /* Two rotations: the first token fails, the second still passes. */
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0 + 2 * DG_DHT_TOKEN_ROTATE_MS - 1), 0);
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0 + 2 * DG_DHT_TOKEN_ROTATE_MS), 1);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok, len), 0);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok2, len), 1);
    /* A long pause replaces both secrets at once. */
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0 + 4 * DG_DHT_TOKEN_ROTATE_MS), 2);
    assert_int_equal(dg_dht_token_check(&tk, SA(a), tok2, len), 0);
    /* A clock going backwards rotates nothing. */
    assert_int_equal(dg_dht_tokens_rotate_if_due(&tk, T0), 0);

    struct sockaddr_storage u;
    memset(&u, 0, sizeof(u));
    u.ss_family = AF_UNIX;
    assert_int_equal(dg_dht_token_make(&tk, SA(u), tok, &len), -EAFNOSUPPORT);
    assert_int_equal(dg_dht_token_check(&tk, SA(u), tok, DG_DHT_TOKEN_LEN), 0);
}

/* ---- peer storage ---- */

static struct dg_dht_peer_store *store_new(size_t max_keys, size_t max_peers, size_t per_key,
                                           uint64_t *seed)
{
    struct dg_dht_peer_store_config cfg;
    struct dg_dht_peer_store *s = NULL;

    memset(&cfg, 0, sizeof(cfg));
    cfg.max_keys = max_keys;
    cfg.max_peers = max_peers;
    cfg.max_per_key = per_key;
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = seed;
    assert_int_equal(dg_dht_peer_store_new(&cfg, &s), 0);
    return s;
}

static void hash_of(uint32_t n, uint8_t h[DG_NODE_ID_LEN])
{
    memset(h, 0xab, DG_NODE_ID_LEN);
    h[0] = (uint8_t)(n >> 24);
    h[1] = (uint8_t)(n >> 16);
    h[2] = (uint8_t)(n >> 8);
    h[3] = (uint8_t)n;
}

static void test_peer_store_basic(void **state)
{
    uint64_t seed = 15;
    uint8_t h[DG_NODE_ID_LEN], h2[DG_NODE_ID_LEN];
    struct dg_dht_compact out[200];
    struct dg_dht_peer_store_stats st;

    (void)state;
    struct dg_dht_peer_store *s = store_new(0, 0, 0, &seed);
    hash_of(1, h);
    hash_of(2, h2);
    struct sockaddr_storage a = v4("198.51.100.1", 6881), a2 = v4("198.51.100.1", 7000);
    struct sockaddr_storage b = v6("2001:db8::1", 6881);
    struct sockaddr_storage m = v6("::ffff:198.51.100.2", 6882);

    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0), 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0), 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(b), T0), 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(m), T0), 0);
    /* Same IP, new port: updated in place. */
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a2), T0 + 1), 1);
    struct sockaddr_storage bad = v4("224.0.0.1", 6881), p0 = v4("1.2.3.4", 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(bad), T0), -EINVAL);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(p0), T0), -EINVAL);

    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 2), 2);
    static const uint8_t c_a2[6] = {198, 51, 100, 1, 0x1b, 0x58};
    static const uint8_t c_m[6] = {198, 51, 100, 2, 0x1a, 0xe2};
    assert_int_equal(out[0].len, 6);
    assert_memory_equal(out[0].bytes, c_a2, 6);
    assert_memory_equal(out[1].bytes, c_m, 6);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET6, out, 50, T0 + 2), 1);
    assert_int_equal(out[0].len, 18);
    assert_int_equal(out[0].bytes[0], 0x20);
    assert_int_equal(dg_dht_peer_store_get(s, h2, AF_INET, out, 50, T0 + 2), 0);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_UNIX, out, 50, T0 + 2), 0);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 0, T0 + 2), 0);

    /* Expiry: 30 minutes after the last announce. */
    uint64_t ttl = 30u * MIN_MS;
    assert_int_equal(dg_dht_peer_store_add(s, h2, SA(a), T0 + 10 * MIN_MS), 0);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + ttl - 1), 2);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + ttl), 1); /* a2 at +1 */
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 1 + ttl), 0);
    assert_int_equal(dg_dht_peer_store_expire(s, T0 + 1 + ttl), 3);
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.keys, 1);
    assert_int_equal(st.peers, 1);
    assert_int_equal(st.expired, 3);
    assert_int_equal(dg_dht_peer_store_expire(s, T0 + 10 * MIN_MS + ttl), 1);
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.keys, 0);
    assert_int_equal(st.peers, 0);
    assert_int_equal(dg_dht_peer_store_get(s, h2, AF_INET, out, 50, T0), 0);
    dg_dht_peer_store_free(s);
    dg_dht_peer_store_free(NULL);
}

/* With same_ip (loopback labs), peers on one address with different ports are all kept. */
static void test_peer_store_same_ip(void **state)
{
    uint64_t seed = 16;
    uint8_t h[DG_NODE_ID_LEN];
    struct dg_dht_compact out[8];
    struct dg_dht_peer_store_config cfg;
    struct dg_dht_peer_store *s = NULL;

    (void)state;
    memset(&cfg, 0, sizeof(cfg));
    cfg.same_ip = 1;
    cfg.rand_bytes = rng_bytes;
    cfg.rand_arg = &seed;
    assert_int_equal(dg_dht_peer_store_new(&cfg, &s), 0);
    hash_of(3, h);
    struct sockaddr_storage a = v4("127.0.0.1", 6881), a2 = v4("127.0.0.1", 7000);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0), 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a2), T0), 0);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a2), T0 + 1), 1); /* refreshed */
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 8, T0 + 2), 2);
    dg_dht_peer_store_free(s);
}

static void test_peer_store_bounds(void **state)
{
    uint64_t seed = 16;
    uint8_t h[DG_NODE_ID_LEN];
    static struct dg_dht_compact out[300];
    struct dg_dht_peer_store_stats st;

    (void)state;
    /* Per key: 100, the newest replace the oldest. */
    struct dg_dht_peer_store *s = store_new(0, 0, 0, &seed);
    hash_of(7, h);
    for (uint32_t i = 0; i < 150; i++) {
        struct sockaddr_storage a = v4n(0x01000000u + i, 6881);
        assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0 + i), 0);
    }
    size_t n = dg_dht_peer_store_get(s, h, AF_INET, out, 300, T0 + 200);
    assert_int_equal(n, 100);
    for (size_t i = 0; i < n; i++) {
        uint32_t ip = (uint32_t)out[i].bytes[0] << 24 | (uint32_t)out[i].bytes[1] << 16 |
                      (uint32_t)out[i].bytes[2] << 8 | out[i].bytes[3];
        assert_true(ip >= 0x01000000u + 50 && ip < 0x01000000u + 150);
    }
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.peers, 100);
    assert_int_equal(st.evicted_peers, 50);
    dg_dht_peer_store_free(s);

    /* Keys: at most 10; the least recently announced goes. */
    s = store_new(10, 1000, 100, &seed);
    struct sockaddr_storage a = v4("198.51.100.1", 6881);
    for (uint32_t k = 0; k < 10; k++) {
        hash_of(k, h);
        assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0 + k), 0);
    }
    hash_of(0, h);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0 + 20), 1); /* key 0 refreshed */
    for (uint32_t k = 10; k < 12; k++) {
        hash_of(k, h);
        assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0 + 30 + k), 0);
    }
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.keys, 10);
    assert_int_equal(st.evicted_keys, 2);
    for (uint32_t k = 0; k < 12; k++) {
        hash_of(k, h);
        size_t got = dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 100);
        assert_int_equal(got, (k == 1 || k == 2) ? 0 : 1);
    }
    dg_dht_peer_store_free(s);

    /* Peers in all: at most 50; making room drops the oldest key. */
    s = store_new(100, 50, 20, &seed);
    for (uint32_t k = 0; k < 5; k++) {
        hash_of(k, h);
        for (uint32_t i = 0; i < 10; i++) {
            struct sockaddr_storage x = v4n(0x02000000u + k * 100 + i, 6881);
            assert_int_equal(dg_dht_peer_store_add(s, h, SA(x), T0 + k), 0);
        }
    }
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.peers, 50);
    hash_of(3, h);
    struct sockaddr_storage x = v4("198.51.100.9", 6881);
    assert_int_equal(dg_dht_peer_store_add(s, h, SA(x), T0 + 10), 0);
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.peers, 41);
    assert_int_equal(st.keys, 4);
    hash_of(0, h);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 10), 0);
    hash_of(3, h);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 10), 11);
    dg_dht_peer_store_free(s);

    /* A single key holding every peer replaces its own oldest. */
    s = store_new(10, 30, 100, &seed);
    hash_of(1, h);
    for (uint32_t i = 0; i < 40; i++) {
        struct sockaddr_storage y = v4n(0x03000000u + i, 6881);
        assert_int_equal(dg_dht_peer_store_add(s, h, SA(y), T0 + i), 0);
    }
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.peers, 30);
    assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 100), 30);
    dg_dht_peer_store_free(s);
}

/* Many keys through a small index: the hash table with backward-shift deletion stays
 * consistent through evictions and expiries. */
static void test_peer_store_churn(void **state)
{
    uint64_t seed = 17;
    uint8_t h[DG_NODE_ID_LEN];
    struct dg_dht_compact out[10];
    struct dg_dht_peer_store_stats st;

    (void)state;
    struct dg_dht_peer_store *s = store_new(64, 200, 5, &seed);
    for (uint32_t i = 0; i < 20000; i++) {
        uint32_t k = (uint32_t)(rng_next(&seed) % 300);
        hash_of(k, h);
        struct sockaddr_storage a = v4n(0x04000000u + (uint32_t)(rng_next(&seed) % 50), 6881);
        uint64_t now = T0 + i * 1000ull;
        assert_true(dg_dht_peer_store_add(s, h, SA(a), now) >= 0);
        /* The key just announced is always found. */
        assert_true(dg_dht_peer_store_get(s, h, AF_INET, out, 10, now) >= 1);
        if (i % 500 == 0)
            dg_dht_peer_store_expire(s, now);
        dg_dht_peer_store_stats(s, &st);
        assert_true(st.keys <= 64);
        assert_true(st.peers <= 200);
    }
    /* Everything expires in the end. */
    dg_dht_peer_store_expire(s, T0 + 20000 * 1000ull + 30 * MIN_MS);
    dg_dht_peer_store_stats(s, &st);
    assert_int_equal(st.keys, 0);
    assert_int_equal(st.peers, 0);
    dg_dht_peer_store_free(s);
}

static void test_peer_store_sampling(void **state)
{
    uint64_t seed = 18;
    uint8_t h[DG_NODE_ID_LEN];
    struct dg_dht_compact out[50];
    unsigned hits[100];

    (void)state;
    struct dg_dht_peer_store *s = store_new(0, 0, 0, &seed);
    hash_of(9, h);
    for (uint32_t i = 0; i < 100; i++) {
        struct sockaddr_storage a = v4n(0x05000000u + i, 6881);
        assert_int_equal(dg_dht_peer_store_add(s, h, SA(a), T0), 0);
    }
    memset(hits, 0, sizeof(hits));
    const int rounds = 2000;
    int same_as_first = 0;
    uint8_t first[50];
    for (int r = 0; r < rounds; r++) {
        assert_int_equal(dg_dht_peer_store_get(s, h, AF_INET, out, 50, T0 + 1), 50);
        uint8_t seen[100];
        memset(seen, 0, sizeof(seen));
        for (int i = 0; i < 50; i++) {
            assert_int_equal(out[i].len, 6);
            unsigned idx = out[i].bytes[3];
            assert_true(idx < 100);
            assert_int_equal(seen[idx], 0); /* no duplicates */
            seen[idx] = 1;
            hits[idx]++;
        }
        if (r == 0)
            for (int i = 0; i < 50; i++)
                first[i] = out[i].bytes[3];
        else {
            int same = 1;
            for (int i = 0; i < 50; i++)
                same &= first[i] == out[i].bytes[3];
            same_as_first += same;
        }
    }
    assert_true(same_as_first < 5);
    /* Each peer is in about half of the answers: 1000 +- 6 sigma (sigma ~ 22). */
    for (int i = 0; i < 100; i++)
        assert_true(hits[i] > 860 && hits[i] < 1140);
    dg_dht_peer_store_free(s);
}

/* ---- rate limiting ---- */

static struct dg_dht_ratelimit *rl_new(const struct dg_dht_ratelimit_config *cfg, uint64_t *seed)
{
    struct dg_dht_ratelimit *rl = NULL;
    assert_int_equal(dg_dht_ratelimit_new(cfg, rng_bytes, seed, T0, &rl), 0);
    return rl;
}

static void test_ratelimit_source(void **state)
{
    uint64_t seed = 19;
    struct dg_dht_ratelimit_config cfg;
    struct dg_dht_ratelimit_stats st;

    (void)state;
    dg_dht_ratelimit_config_default(&cfg);
    assert_int_equal(cfg.per_source_burst, 50);
    assert_int_equal(cfg.global_burst, 400);
    struct dg_dht_ratelimit *rl = rl_new(&cfg, &seed);
    struct sockaddr_storage a = v4("198.51.100.1", 6881), a2 = v4("198.51.100.1", 9999);
    struct sockaddr_storage b = v4("198.51.100.2", 6881);

    /* A burst of 50 passes; the 51st blocks the source (any port) for 5 minutes. */
    for (int i = 0; i < 50; i++)
        assert_int_equal(dg_dht_ratelimit_allow(rl, (i & 1) ? SA(a2) : SA(a), T0 + 10), 1);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0 + 10), 0);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(b), T0 + 10), 1);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0 + 20 * 1000), 0);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a2), T0 + 10 + 5 * MIN_MS - 1), 0);
    dg_dht_ratelimit_stats(rl, &st);
    assert_int_equal(st.blocks, 1);
    assert_int_equal(st.dropped_source, 3);
    /* The block ends, with a full bucket. */
    for (int i = 0; i < 50; i++)
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0 + 10 + 5 * MIN_MS + (uint64_t)i), 1);
    dg_dht_ratelimit_stats(rl, &st);
    assert_int_equal(st.allowed, 101);
    dg_dht_ratelimit_free(rl);

    /* A steady 5 per second (the refill rate) never blocks, for 20 minutes. */
    rl = rl_new(&cfg, &seed);
    for (uint64_t ms = 0; ms < 20 * MIN_MS; ms += 200)
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0 + ms), 1);
    /* 10 per second does: after the burst is used up (50 / (10 - 5) = 10 s). */
    uint64_t start = T0 + 20 * MIN_MS, ms = 0;
    while (dg_dht_ratelimit_allow(rl, SA(b), start + ms))
        ms += 100;
    assert_true(ms >= 9000 && ms <= 11000);
    dg_dht_ratelimit_free(rl);

    /* IPv6 sources are counted per /64. */
    rl = rl_new(&cfg, &seed);
    for (int i = 0; i < 50; i++) {
        char ip[64];
        snprintf(ip, sizeof(ip), "2001:db8:1:2::%x", i + 1);
        struct sockaddr_storage x = v6(ip, 6881);
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(x), T0), 1);
    }
    struct sockaddr_storage same64 = v6("2001:db8:1:2:ffff::1", 6881);
    struct sockaddr_storage other64 = v6("2001:db8:1:3::1", 6881);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(same64), T0), 0);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(other64), T0), 1);
    dg_dht_ratelimit_free(rl);
}

static void test_ratelimit_global(void **state)
{
    uint64_t seed = 20;
    struct dg_dht_ratelimit_config cfg;
    struct dg_dht_ratelimit_stats st;

    (void)state;
    dg_dht_ratelimit_config_default(&cfg);
    struct dg_dht_ratelimit *rl = rl_new(&cfg, &seed);
    /* 400 sources, one message each: all pass; the 401st is dropped globally. */
    for (uint32_t i = 0; i < 400; i++) {
        struct sockaddr_storage a = v4n(0x06000000u + i, 6881);
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0), 1);
    }
    struct sockaddr_storage x = v4("198.51.100.50", 6881);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(x), T0), 0);
    dg_dht_ratelimit_stats(rl, &st);
    assert_int_equal(st.dropped_global, 1);
    assert_int_equal(st.blocks, 0);
    /* One second later, 100 more. */
    int passed = 0;
    for (uint32_t i = 0; i < 200; i++) {
        struct sockaddr_storage a = v4n(0x07000000u + i, 6881);
        passed += dg_dht_ratelimit_allow(rl, SA(a), T0 + 1000);
    }
    assert_int_equal(passed, 100);
    /* 10 ms later: 1 more. */
    passed = 0;
    for (uint32_t i = 0; i < 10; i++) {
        struct sockaddr_storage a = v4n(0x08000000u + i, 6881);
        passed += dg_dht_ratelimit_allow(rl, SA(a), T0 + 1010);
    }
    assert_int_equal(passed, 1);
    dg_dht_ratelimit_free(rl);

    /* Limits can be turned off. */
    cfg.global_burst = 0;
    cfg.per_source_burst = 0;
    rl = rl_new(&cfg, &seed);
    for (int i = 0; i < 10000; i++)
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(x), T0), 1);
    dg_dht_ratelimit_stats(rl, &st);
    assert_int_equal(st.sources, 0);
    dg_dht_ratelimit_free(rl);

    /* Bad configurations. */
    struct dg_dht_ratelimit *bad = NULL;
    dg_dht_ratelimit_config_default(&cfg);
    cfg.max_sources = 0;
    assert_int_equal(dg_dht_ratelimit_new(&cfg, rng_bytes, &seed, T0, &bad), -EINVAL);
    dg_dht_ratelimit_config_default(&cfg);
    cfg.global_per_sec = 0;
    assert_int_equal(dg_dht_ratelimit_new(&cfg, rng_bytes, &seed, T0, &bad), -EINVAL);
    dg_dht_ratelimit_config_default(&cfg);
    assert_int_equal(dg_dht_ratelimit_new(&cfg, NULL, NULL, T0, &bad), -EINVAL);
    assert_null(bad);
    dg_dht_ratelimit_free(NULL);
}

static void test_ratelimit_memory_bound(void **state)
{
    uint64_t seed = 21;
    struct dg_dht_ratelimit_config cfg;
    struct dg_dht_ratelimit_stats st;

    (void)state;
    dg_dht_ratelimit_config_default(&cfg);
    cfg.max_sources = 64;
    cfg.global_burst = 0;
    struct dg_dht_ratelimit *rl = rl_new(&cfg, &seed);
    struct sockaddr_storage hot = v4("198.51.100.1", 6881);

    /* A flooding source gets blocked... */
    for (int i = 0; i < 60; i++)
        dg_dht_ratelimit_allow(rl, SA(hot), T0);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(hot), T0), 0);
    /* ...and stays tracked while it keeps sending, among 100000 other sources. */
    for (uint32_t i = 0; i < 100000; i++) {
        struct sockaddr_storage a = v4n(0x09000000u + i, 6881);
        assert_int_equal(dg_dht_ratelimit_allow(rl, SA(a), T0 + 1 + i / 1000), 1);
        if (i % 16 == 0)
            assert_int_equal(dg_dht_ratelimit_allow(rl, SA(hot), T0 + 1 + i / 1000), 0);
    }
    dg_dht_ratelimit_stats(rl, &st);
    assert_int_equal(st.sources, 64);
    assert_int_equal(st.evictions, 100000 + 1 - 64);
    /* Sources that come back after eviction start fresh. */
    struct sockaddr_storage first = v4n(0x09000000u, 6881);
    assert_int_equal(dg_dht_ratelimit_allow(rl, SA(first), T0 + 200), 1);
    dg_dht_ratelimit_free(rl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_addr_helpers),
        cmocka_unit_test(test_table_new_bad_config),
        cmocka_unit_test(test_table_split_own_bucket_only),
        cmocka_unit_test(test_table_split_to_the_bottom),
        cmocka_unit_test(test_table_bad_node_replaced),
        cmocka_unit_test(test_table_questionable_ping_and_promotion),
        cmocka_unit_test(test_table_replacements_prefer_confirmed),
        cmocka_unit_test(test_table_one_entry_per_ip),
        cmocka_unit_test(test_table_bep42),
        cmocka_unit_test(test_table_rejects_invalid),
        cmocka_unit_test(test_table_closest_vs_brute_force),
        cmocka_unit_test(test_table_refresh),
        cmocka_unit_test(test_table_random_ops),
        cmocka_unit_test(test_save_load_round_trip),
        cmocka_unit_test(test_load_damaged),
        cmocka_unit_test(test_load_skips_bad_entries),
        cmocka_unit_test(test_tokens),
        cmocka_unit_test(test_peer_store_basic),
        cmocka_unit_test(test_peer_store_same_ip),
        cmocka_unit_test(test_peer_store_bounds),
        cmocka_unit_test(test_peer_store_churn),
        cmocka_unit_test(test_peer_store_sampling),
        cmocka_unit_test(test_ratelimit_source),
        cmocka_unit_test(test_ratelimit_global),
        cmocka_unit_test(test_ratelimit_memory_bound),
    };

    return cmocka_run_group_tests_name("dht_table", tests, NULL, NULL);
}
