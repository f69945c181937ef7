/* libFuzzer target: a DHT node (engine/dht.c) fed arbitrary datagrams from a few sources.
 *
 * Input: the first byte picks the node (bit 0: IPv6, bit 1: BEP 42 enforced, bit 2: a tiny
 * rate limit), then records of [ctl][len: 2 bytes, big-endian][len bytes of payload]:
 *   ctl bits 0-1  the source: 1.2.3.4:1000 (public, BEP 42 applies), 10.0.0.2:2000,
 *                 192.168.1.1:3000, 127.0.0.1:4000 (or their IPv6 counterparts)
 *   ctl bit 2     answer the node's latest query instead: the source is the address that
 *                 query went to, every "TTTT" in the payload becomes its transaction id, and
 *                 every run of 20 'I' the id that address had in the last "nodes"/"nodes6"
 *                 entry fed to the node (so the fuzzer reaches responses, lookups, announces)
 *   ctl bits 3-5  advance the fake clock by that many times 700 ms, then tick
 *   ctl bit 6     start a get_peers lookup (announcing if bit 7 is set too)
 *   always        every "KKKKKKKK" in the payload becomes the last token the node handed out
 *                 (so announce_peer can be accepted and stored)
 * At start the node bootstraps towards the four sources and starts a lookup; at the end the
 * clock runs 130 s on so every lookup started by the input ends.
 *
 * Checked: the node never crashes; every datagram it sends parses with dg_krpc_parse(), is at
 * most DG_DHT_MAX_PACKET bytes, has at most 8 nodes and DG_DHT_MAX_VALUES values, and every
 * response or error it sends carries "ip"; lookup callbacks get peers of the node's family,
 * never after their final call; every lookup ends; the counters stay within their bounds. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dht.h"
#include "engine/krpc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NSRC 4
#define MAXLOOKUPS 8
#define MAXKNOWN 64

struct known {
    struct dg_dht_compact addr;
    uint8_t id[DG_NODE_ID_LEN];
};

struct ctx {
    uint64_t rng;
    int family;
    uint8_t last_tid[DG_KRPC_TID_MAX];
    size_t last_tid_len;
    struct sockaddr_storage last_to;
    int have_last;
    uint8_t token[DG_KRPC_TOKEN_MAX];
    size_t token_len;
    int started, done;
    uint32_t ids[MAXLOOKUPS];
    int finished[MAXLOOKUPS];
    struct known known[MAXKNOWN];
    size_t nknown, known_next;
};

/* Remembers the ids of the nodes listed in a datagram fed to the node. */
static void learn_ids(struct ctx *c, const uint8_t *buf, size_t len)
{
    static struct dg_krpc_msg m;
    size_t clen = c->family == AF_INET ? 6 : 18;

    if (dg_krpc_parse(buf, len, &m) != 0)
        return;
    const uint8_t *nodes = c->family == AF_INET ? m.nodes : m.nodes6;
    size_t n = c->family == AF_INET ? m.nnodes : m.nnodes6;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = nodes + i * (DG_NODE_ID_LEN + clen);
        struct known *k = &c->known[c->known_next];
        c->known_next = (c->known_next + 1) % MAXKNOWN;
        if (c->nknown < MAXKNOWN)
            c->nknown++;
        memcpy(k->id, p, DG_NODE_ID_LEN);
        k->addr.len = (uint8_t)clen;
        memcpy(k->addr.bytes, p + DG_NODE_ID_LEN, clen);
    }
}

static const uint8_t *known_id(const struct ctx *c, const struct sockaddr *addr)
{
    struct dg_dht_compact a;
    int len = dg_dht_addr_to_compact(addr, a.bytes);

    for (size_t i = 0; len > 0 && i < c->nknown; i++)
        if (c->known[i].addr.len == len &&
            memcmp(c->known[i].addr.bytes, a.bytes, (size_t)len) == 0)
            return c->known[i].id;
    return NULL;
}

static void fuzz_rand(void *arg, void *buf, size_t len)
{
    struct ctx *c = arg;
    uint8_t *p = buf;

    for (size_t i = 0; i < len; i++) {
        c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (uint8_t)(c->rng >> 56);
    }
}

static int fuzz_send(void *arg, const struct sockaddr *to, socklen_t tolen, const uint8_t *buf,
                     size_t len)
{
    struct ctx *c = arg;
    static struct dg_krpc_msg m; /* large: keep it off the stack */

    if (len > DG_DHT_MAX_PACKET || dg_krpc_parse(buf, len, &m) != 0)
        abort();
    if (m.nnodes > DG_DHT_K || m.nnodes6 > DG_DHT_K || m.nvalues > DG_DHT_MAX_VALUES)
        abort();
    if (to->sa_family != c->family ||
        tolen != (c->family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)))
        abort();
    if (m.type != DG_KRPC_QUERY) {
        if (!(m.has & DG_KRPC_HAS_IP))
            abort();
        if (m.has & DG_KRPC_HAS_TOKEN) {
            memcpy(c->token, m.token, m.token_len);
            c->token_len = m.token_len;
        }
    } else {
        memcpy(c->last_tid, m.tid, m.tid_len);
        c->last_tid_len = m.tid_len;
        memset(&c->last_to, 0, sizeof(c->last_to));
        memcpy(&c->last_to, to, tolen);
        c->have_last = 1;
    }
    return 0;
}

static void on_peers(void *arg, uint32_t id, const struct dg_dht_compact *peers, size_t n,
                     const struct sockaddr *from, int done)
{
    struct ctx *c = arg;
    int i;

    for (i = 0; i < c->started; i++)
        if (c->ids[i] == id)
            break;
    if (i == c->started || c->finished[i])
        abort();
    if ((from == NULL) != (done != 0)) /* the replying node, on every call but the last */
        abort();
    if (done) {
        if (n != 0)
            abort();
        c->finished[i] = 1;
        c->done++;
        return;
    }
    size_t want = c->family == AF_INET ? 6 : 18;
    for (size_t k = 0; k < n; k++)
        if (peers[k].len != want)
            abort();
}

static struct sockaddr_storage source(int family, int i)
{
    static const uint8_t v4[NSRC][4] = {
        {1, 2, 3, 4}, {10, 0, 0, 2}, {192, 168, 1, 1}, {127, 0, 0, 1}};
    static const uint8_t v6[NSRC][2] = {{0x20, 0x01}, {0xfd, 0x00}, {0xfe, 0x80}, {0x24, 0x00}};
    struct sockaddr_storage ss;

    memset(&ss, 0, sizeof(ss));
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)(1000 * (i + 1)));
        memcpy(&sin->sin_addr, v4[i], 4);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)(1000 * (i + 1)));
        sin6->sin6_addr.s6_addr[0] = v6[i][0];
        sin6->sin6_addr.s6_addr[1] = v6[i][1];
        sin6->sin6_addr.s6_addr[15] = (uint8_t)(i + 1);
    }
    return ss;
}

static socklen_t sslen(int family)
{
    return family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

static void start_lookup(struct dg_dht *d, struct ctx *c, uint8_t salt, uint16_t port, uint64_t now)
{
    uint8_t key[DG_NODE_ID_LEN];

    if (c->started >= MAXLOOKUPS)
        return;
    memset(key, 0x5a, sizeof(key));
    key[0] = salt;
    if (dg_dht_get_peers(d, key, port, on_peers, c, now, &c->ids[c->started]) == 0)
        c->started++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ctx c;
    struct dg_dht_config cfg;
    struct dg_dht_ratelimit_config rl;
    struct dg_dht_peer_store_config ps;
    struct dg_dht *d = NULL;
    uint64_t now = 1000000;
    static uint8_t pkt[65536];

    if (size < 1)
        return 0;
    memset(&c, 0, sizeof(c));
    c.rng = 1;
    c.family = (data[0] & 1) ? AF_INET6 : AF_INET;
    memset(&cfg, 0, sizeof(cfg));
    cfg.family = c.family;
    cfg.have_id = 1;
    memset(cfg.id, 0x42, sizeof(cfg.id));
    cfg.table_flags = (data[0] & 2) ? 0 : DG_DHT_TABLE_NO_BEP42 | DG_DHT_TABLE_SAME_IP;
    cfg.send = fuzz_send;
    cfg.send_arg = &c;
    cfg.rand_bytes = fuzz_rand;
    cfg.rand_arg = &c;
    cfg.version = (const uint8_t *)"DG01";
    cfg.version_len = 4;
    dg_dht_ratelimit_config_default(&rl);
    if (data[0] & 4) {
        rl.per_source_burst = 3;
        rl.global_burst = 5;
    }
    cfg.ratelimit = &rl;
    memset(&ps, 0, sizeof(ps));
    ps.max_keys = 16;
    ps.max_peers = 256;
    ps.max_per_key = 64;
    cfg.peer_store = &ps;
    if (dg_dht_new(&cfg, now, &d) != 0)
        abort();

    for (int i = 0; i < NSRC; i++) {
        struct sockaddr_storage s = source(c.family, i);
        dg_dht_bootstrap(d, (struct sockaddr *)&s, sslen(c.family), now);
    }
    start_lookup(d, &c, 0, 0, now);

    size_t off = 1;
    while (off + 3 <= size) {
        uint8_t ctl = data[off];
        size_t len = (size_t)data[off + 1] << 8 | data[off + 2];
        off += 3;
        if (len > size - off)
            len = size - off;
        memcpy(pkt, data + off, len);
        off += len;

        struct sockaddr_storage from = source(c.family, ctl & 3);
        if ((ctl & 4) && c.have_last) {
            from = c.last_to;
            for (size_t i = 0; i + 4 <= len; i++)
                if (memcmp(pkt + i, "TTTT", 4) == 0 && c.last_tid_len == 4)
                    memcpy(pkt + i, c.last_tid, 4);
            const uint8_t *id = known_id(&c, (struct sockaddr *)&from);
            for (size_t i = 0; id && i + DG_NODE_ID_LEN <= len; i++)
                if (memcmp(pkt + i, "IIIIIIIIIIIIIIIIIIII", DG_NODE_ID_LEN) == 0)
                    memcpy(pkt + i, id, DG_NODE_ID_LEN);
        }
        for (size_t i = 0; c.token_len == 8 && i + 8 <= len; i++)
            if (memcmp(pkt + i, "KKKKKKKK", 8) == 0)
                memcpy(pkt + i, c.token, 8);
        learn_ids(&c, pkt, len);
        /* An exact-size heap copy, so ASan sees any read past the end. */
        uint8_t *buf = malloc(len ? len : 1);
        if (!buf)
            abort();
        memcpy(buf, pkt, len);
        dg_dht_receive(d, buf, len, (struct sockaddr *)&from, sslen(c.family), now);
        free(buf);

        unsigned adv = (ctl >> 3) & 7;
        if (adv) {
            now += adv * 700u;
            dg_dht_tick(d, now);
        }
        if (ctl & 0x40)
            start_lookup(d, &c, ctl, (ctl & 0x80) ? 6881 : 0, now);
    }

    /* Every lookup ends within its time cap. */
    for (int i = 0; i < 130; i++) {
        now += 1000;
        uint64_t w = dg_dht_tick(d, now);
        if (w > 60000)
            abort();
    }
    struct dg_dht_stats st;
    dg_dht_stats(d, now, &st);
    /* (internal lookups of our own id may be running again: the table is thin) */
    if (c.done != c.started || st.searches > DG_DHT_MAX_SEARCHES ||
        st.outstanding > DG_DHT_MAX_QUERIES)
        abort();
    if (st.nodes > DG_DHT_MAX_NODES || st.good > st.nodes)
        abort();
    static uint8_t save[DG_DHT_SAVE_MAX];
    if (dg_dht_save(d, save, sizeof(save)) < 0)
        abort();
    dg_dht_free(d);
    return 0;
}
