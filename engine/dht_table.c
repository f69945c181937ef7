/* BEP 5 node state: routing table, write tokens, peer storage, rate limiting. See the header for
 * the rules; this file only adds how they are kept.
 *
 * Storage: the routing table is one allocation of 160 buckets of K entries plus K pending
 * replacements each (about 200 KiB); entries keep addresses in compact form (16 address bytes
 * and a port), so comparing addresses is a memcmp. Every scan is bounded by the table size
 * (160 * 16 entries). */
#include "engine/dht_table.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "engine/byteorder.h"

/* ------------------------------------------------------------------------------------------ */
/* Addresses */

/* Splits @p addr into its address bytes and port (host order). An IPv4-mapped IPv6 address
 * counts as IPv4. @return 4, 16, or 0 for another family. */
static size_t addr_split(const struct sockaddr *addr, uint8_t ip[16], uint16_t *port)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    memset(ip, 0, 16);
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
        memcpy(ip, &sin->sin_addr, 4);
        *port = ntohs(sin->sin_port);
        return 4;
    }
    if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        *port = ntohs(sin6->sin6_port);
        if (memcmp(sin6->sin6_addr.s6_addr, mapped, sizeof(mapped)) == 0) {
            memcpy(ip, sin6->sin6_addr.s6_addr + 12, 4);
            return 4;
        }
        memcpy(ip, sin6->sin6_addr.s6_addr, 16);
        return 16;
    }
    return 0;
}

/* Builds a sockaddr from address bytes (@p alen 4 or 16) and a port in host order. */
static void addr_join(const uint8_t *ip, size_t alen, uint16_t port, struct sockaddr_storage *out)
{
    memset(out, 0, sizeof(*out));
    if (alen == 4) {
        struct sockaddr_in *sin = (struct sockaddr_in *)out;
        sin->sin_family = AF_INET;
        memcpy(&sin->sin_addr, ip, 4);
        sin->sin_port = htons(port);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
        sin6->sin6_family = AF_INET6;
        memcpy(&sin6->sin6_addr, ip, 16);
        sin6->sin6_port = htons(port);
    }
}

static int ip_usable(const uint8_t *ip, size_t alen)
{
    static const uint8_t zero[16];

    if (alen == 4)
        return ip[0] != 0 && ip[0] < 224;
    if (alen == 16)
        return memcmp(ip, zero, 16) != 0 && ip[0] != 0xff;
    return 0;
}

int dg_dht_addr_to_compact(const struct sockaddr *addr, uint8_t out[DG_DHT_COMPACT6_LEN])
{
    uint8_t ip[16];
    uint16_t port;
    size_t alen = addr_split(addr, ip, &port);

    if (alen == 0)
        return -EAFNOSUPPORT;
    memcpy(out, ip, alen);
    out[alen] = (uint8_t)(port >> 8);
    out[alen + 1] = (uint8_t)port;
    return (int)alen + 2;
}

int dg_dht_addr_from_compact(const uint8_t *buf, size_t len, struct sockaddr_storage *out)
{
    if (len != DG_DHT_COMPACT4_LEN && len != DG_DHT_COMPACT6_LEN)
        return -EBADMSG;
    addr_join(buf, len - 2, (uint16_t)(buf[len - 2] << 8 | buf[len - 1]), out);
    return 0;
}

int dg_dht_addr_usable(const struct sockaddr *addr)
{
    uint8_t ip[16];
    uint16_t port;
    size_t alen = addr_split(addr, ip, &port);

    return alen != 0 && port != 0 && ip_usable(ip, alen);
}

static uint64_t elapsed(uint64_t now, uint64_t then)
{
    return now > then ? now - then : 0;
}

/* A keyed 64-bit mix of @p len bytes: hash tables keyed by what remote hosts choose (info
 * hashes, source addresses) use a random @p seed so that collisions cannot be planned. */
static uint64_t keyed_hash(uint64_t seed, const uint8_t *p, size_t len)
{
    uint64_t h = seed ^ (len * 0x9e3779b97f4a7c15ull);

    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = 0;
        for (size_t j = 0; j < 8 && i + j < len; j++)
            w |= (uint64_t)p[i + j] << (8 * j);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
    }
    h ^= h >> 30;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

/* A uniform integer in [0, n), n > 0, without modulo bias. */
static uint32_t rand_below(dg_rand_bytes_fn rand_bytes, void *arg, uint32_t n)
{
    uint32_t limit = (uint32_t)(-n) % n; /* 2^32 mod n: values below it are rejected */
    uint32_t x;

    do {
        uint8_t b[4];
        rand_bytes(arg, b, sizeof(b));
        x = dg_get32(b);
    } while (x < limit);
    return x % n;
}

/* ------------------------------------------------------------------------------------------ */
/* Routing table */

#define ENTRY_PING_ASKED 0x80 /* internal flag: handed out to ping at ping_asked */
#define KIND_LOADED 2         /* internal dg_dht_heard_kind: read from a save */

struct entry {
    uint8_t id[DG_NODE_ID_LEN];
    uint8_t ip[16];
    uint16_t port;
    uint8_t fails;
    uint8_t flags;
    uint64_t last_reply;
    uint64_t last_query;
    uint64_t ping_asked;
};

struct bucket {
    struct entry nodes[DG_DHT_K];
    struct entry repl[DG_DHT_REPLACEMENTS];
    uint8_t n, nrepl;
    uint64_t changed;   /* a node added, replaced or replying */
    uint64_t refreshed; /* handed out by next_refresh() */
};

struct dg_dht_table {
    int family;
    size_t alen; /* 4 or 16 */
    uint8_t id[DG_NODE_ID_LEN];
    unsigned flags;
    dg_rand_bytes_fn rand_bytes;
    void *rand_arg;
    unsigned nbuckets;
    uint64_t rejected_bep42, rejected_same_ip, rejected_id, rejected_invalid, load_skipped;
    struct bucket b[DG_DHT_MAX_BUCKETS];
};

int dg_dht_table_new(const struct dg_dht_table_config *cfg, uint64_t now_ms,
                     struct dg_dht_table **out)
{
    struct dg_dht_table *t;

    if (!cfg || (cfg->family != AF_INET && cfg->family != AF_INET6) || !cfg->rand_bytes)
        return -EINVAL;
    t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->family = cfg->family;
    t->alen = cfg->family == AF_INET ? 4 : 16;
    memcpy(t->id, cfg->id, DG_NODE_ID_LEN);
    t->flags = cfg->flags;
    t->rand_bytes = cfg->rand_bytes;
    t->rand_arg = cfg->rand_arg;
    t->nbuckets = 1;
    t->b[0].changed = now_ms;
    *out = t;
    return 0;
}

void dg_dht_table_free(struct dg_dht_table *t)
{
    free(t);
}

void dg_dht_table_set_flags(struct dg_dht_table *t, unsigned flags)
{
    t->flags = flags;
}

const uint8_t *dg_dht_table_id(const struct dg_dht_table *t)
{
    return t->id;
}

int dg_dht_table_family(const struct dg_dht_table *t)
{
    return t->family;
}

static enum dg_dht_node_state state_of(uint8_t fails, uint8_t flags, uint64_t last_reply,
                                       uint64_t last_query, uint64_t now)
{
    if (fails >= DG_DHT_BAD_FAILS)
        return DG_DHT_NODE_BAD;
    if ((flags & DG_DHT_NODE_REPLIED) && elapsed(now, last_reply) < DG_DHT_GOOD_MS)
        return DG_DHT_NODE_GOOD;
    if ((flags & DG_DHT_NODE_CONFIRMED) && (flags & DG_DHT_NODE_QUERIED) &&
        elapsed(now, last_query) < DG_DHT_GOOD_MS)
        return DG_DHT_NODE_GOOD;
    return DG_DHT_NODE_QUESTIONABLE;
}

enum dg_dht_node_state dg_dht_node_state(const struct dg_dht_node *n, uint64_t now_ms)
{
    return state_of(n->fails, n->flags, n->last_reply_ms, n->last_query_ms, now_ms);
}

static void entry_export(const struct dg_dht_table *t, const struct entry *e,
                         struct dg_dht_node *out)
{
    memset(out, 0, sizeof(*out)); /* padding too: copies compare equal with memcmp */
    memcpy(out->id, e->id, DG_NODE_ID_LEN);
    addr_join(e->ip, t->alen, e->port, &out->addr);
    out->last_reply_ms = e->last_reply;
    out->last_query_ms = e->last_query;
    out->fails = e->fails;
    out->flags = e->flags & (DG_DHT_NODE_REPLIED | DG_DHT_NODE_QUERIED | DG_DHT_NODE_CONFIRMED);
}

static enum dg_dht_node_state entry_state(const struct entry *e, uint64_t now)
{
    return state_of(e->fails, e->flags, e->last_reply, e->last_query, now);
}

static int entry_bad(const struct entry *e)
{
    return e->fails >= DG_DHT_BAD_FAILS;
}

/* The last time we heard from the entry at all (0 if never in this run). */
static uint64_t entry_seen(const struct entry *e)
{
    uint64_t r = (e->flags & DG_DHT_NODE_REPLIED) ? e->last_reply : 0;
    uint64_t q = (e->flags & DG_DHT_NODE_QUERIED) ? e->last_query : 0;
    return r > q ? r : q;
}

static void entry_apply(struct entry *e, int kind, uint64_t now)
{
    if (kind == DG_DHT_HEARD_REPLY) {
        e->last_reply = now;
        e->flags |= DG_DHT_NODE_REPLIED | DG_DHT_NODE_CONFIRMED;
        e->flags &= (uint8_t)~ENTRY_PING_ASKED;
        e->fails = 0;
    } else if (kind == DG_DHT_HEARD_QUERY) {
        e->last_query = now;
        e->flags |= DG_DHT_NODE_QUERIED;
    } else {
        e->flags |= DG_DHT_NODE_CONFIRMED;
    }
}

static int same_addr(const struct dg_dht_table *t, const struct entry *e, const uint8_t *ip,
                     uint16_t port)
{
    return memcmp(e->ip, ip, t->alen) == 0 && e->port == port;
}

/* The IP rule: one entry per IP, or per IP and port with DG_DHT_TABLE_SAME_IP. */
static int same_source(const struct dg_dht_table *t, const struct entry *e, const uint8_t *ip,
                       uint16_t port)
{
    return memcmp(e->ip, ip, t->alen) == 0 &&
           (!(t->flags & DG_DHT_TABLE_SAME_IP) || e->port == port);
}

static unsigned bucket_of(const struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN])
{
    unsigned cpl = dg_node_id_common_prefix(t->id, id);
    return cpl < t->nbuckets - 1 ? cpl : t->nbuckets - 1;
}

static void remove_node(struct bucket *b, unsigned i)
{
    memmove(&b->nodes[i], &b->nodes[i + 1], (size_t)(b->n - i - 1) * sizeof(b->nodes[0]));
    b->n--;
}

static void remove_repl(struct bucket *b, unsigned i)
{
    memmove(&b->repl[i], &b->repl[i + 1], (size_t)(b->nrepl - i - 1) * sizeof(b->repl[0]));
    b->nrepl--;
}

/* The replacement to promote: one that has replied before one that has not, then the most
 * recently heard. @return its index, or -1 if there is none. */
static int best_repl(const struct bucket *b)
{
    int best = -1;

    for (unsigned i = 0; i < b->nrepl; i++) {
        const struct entry *e = &b->repl[i];
        if (entry_bad(e))
            continue;
        if (best < 0) {
            best = (int)i;
            continue;
        }
        const struct entry *cur = &b->repl[best];
        int ec = !!(e->flags & DG_DHT_NODE_CONFIRMED), cc = !!(cur->flags & DG_DHT_NODE_CONFIRMED);
        if (ec > cc || (ec == cc && entry_seen(e) > entry_seen(cur)))
            best = (int)i;
    }
    return best;
}

/* Moves replacements into free slots of @p b. */
static void fill_from_repl(struct bucket *b, uint64_t now)
{
    while (b->n < DG_DHT_K) {
        int r = best_repl(b);
        if (r < 0)
            return;
        b->nodes[b->n++] = b->repl[r];
        remove_repl(b, (unsigned)r);
        b->changed = now;
    }
}

/* Adds @p e to the replacements of @p b. When they are full, the replacement to drop is one
 * that has never replied before one that has, then the least recently heard; a newcomer that
 * has never replied does not push out replacements that all have. */
static void add_repl(struct bucket *b, const struct entry *e)
{
    if (b->nrepl < DG_DHT_REPLACEMENTS) {
        b->repl[b->nrepl++] = *e;
        return;
    }
    int victim = 0;
    for (unsigned i = 1; i < b->nrepl; i++) {
        const struct entry *x = &b->repl[i], *v = &b->repl[victim];
        int xc = !!(x->flags & DG_DHT_NODE_CONFIRMED), vc = !!(v->flags & DG_DHT_NODE_CONFIRMED);
        if (xc < vc || (xc == vc && entry_seen(x) < entry_seen(v)))
            victim = (int)i;
    }
    if ((b->repl[victim].flags & DG_DHT_NODE_CONFIRMED) && !(e->flags & DG_DHT_NODE_CONFIRMED))
        return;
    remove_repl(b, (unsigned)victim);
    b->repl[b->nrepl++] = *e;
}

/* Splits the last bucket (the one holding our id) in two. */
static void split_last(struct dg_dht_table *t, uint64_t now)
{
    unsigned lo = t->nbuckets - 1, hi = t->nbuckets;
    struct bucket *a = &t->b[lo], *c = &t->b[hi];

    memset(c, 0, sizeof(*c));
    t->nbuckets++;
    for (unsigned i = 0; i < a->n;) {
        if (dg_node_id_common_prefix(t->id, a->nodes[i].id) > lo) {
            c->nodes[c->n++] = a->nodes[i];
            remove_node(a, i);
        } else {
            i++;
        }
    }
    for (unsigned i = 0; i < a->nrepl;) {
        if (dg_node_id_common_prefix(t->id, a->repl[i].id) > lo) {
            c->repl[c->nrepl++] = a->repl[i];
            remove_repl(a, i);
        } else {
            i++;
        }
    }
    /* Neither half's contents changed: both keep the old bucket's times. */
    c->changed = a->changed;
    c->refreshed = a->refreshed;
    fill_from_repl(a, now);
    fill_from_repl(c, now);
}

/* Among the questionable nodes of @p b not handed out to ping in the last
 * DG_DHT_PING_HOLDOFF_MS, the least recently heard. @return its index or -1. */
static int ping_candidate(const struct bucket *b, uint64_t now)
{
    int best = -1;

    for (unsigned i = 0; i < b->n; i++) {
        const struct entry *e = &b->nodes[i];
        if (entry_state(e, now) != DG_DHT_NODE_QUESTIONABLE)
            continue;
        if ((e->flags & ENTRY_PING_ASKED) && elapsed(now, e->ping_asked) < DG_DHT_PING_HOLDOFF_MS)
            continue;
        if (best < 0 || entry_seen(e) < entry_seen(&b->nodes[best]))
            best = (int)i;
    }
    return best;
}

/* The worst bad node of @p b (most failures, then least recently heard), or -1. */
static int worst_bad(const struct bucket *b)
{
    int worst = -1;

    for (unsigned i = 0; i < b->n; i++) {
        const struct entry *e = &b->nodes[i];
        if (!entry_bad(e))
            continue;
        if (worst < 0 || e->fails > b->nodes[worst].fails ||
            (e->fails == b->nodes[worst].fails && entry_seen(e) < entry_seen(&b->nodes[worst])))
            worst = (int)i;
    }
    return worst;
}

/* Enforces the IP rule for a newcomer at @p ip/@p port: entries with that source that are bad
 * are dropped (the newcomer may take their place); any other such entry refuses it.
 * @return 0 or -EEXIST. */
static int clear_same_source(struct dg_dht_table *t, const uint8_t *ip, uint16_t port)
{
    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        struct bucket *b = &t->b[bi];
        for (unsigned i = 0; i < b->n;) {
            if (!same_source(t, &b->nodes[i], ip, port)) {
                i++;
            } else if (entry_bad(&b->nodes[i])) {
                remove_node(b, i);
            } else {
                return -EEXIST;
            }
        }
        for (unsigned i = 0; i < b->nrepl;) {
            if (!same_source(t, &b->repl[i], ip, port)) {
                i++;
            } else if (entry_bad(&b->repl[i])) {
                remove_repl(b, i);
            } else {
                return -EEXIST;
            }
        }
    }
    return 0;
}

/* The common path of heard() and load(): @p addr is already split into @p ip / @p port and
 * checked for family and usability; @p kind may be KIND_LOADED. */
static int table_insert(struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                        const struct sockaddr *addr, const uint8_t *ip, uint16_t port, int kind,
                        uint64_t now, struct dg_dht_node *ping_out)
{
    unsigned bi = bucket_of(t, id);
    struct bucket *b = &t->b[bi];
    struct entry cand;
    int have_cand = 0;

    if (memcmp(id, t->id, DG_NODE_ID_LEN) == 0) {
        t->rejected_invalid++;
        return -EINVAL;
    }
    if (!(t->flags & DG_DHT_TABLE_NO_BEP42) && !dg_node_id_valid_for(id, addr)) {
        t->rejected_bep42++;
        return -EACCES;
    }

    /* A known node? */
    for (unsigned i = 0; i < b->n; i++) {
        struct entry *e = &b->nodes[i];
        if (memcmp(e->id, id, DG_NODE_ID_LEN) != 0)
            continue;
        if (same_addr(t, e, ip, port)) {
            entry_apply(e, kind, now);
            if (kind == DG_DHT_HEARD_REPLY)
                b->changed = now;
            return DG_DHT_HEARD_UPDATED;
        }
        if (!entry_bad(e)) {
            t->rejected_id++;
            return -EEXIST;
        }
        remove_node(b, i); /* a bad node that moved: start over as a newcomer */
        break;
    }
    for (unsigned i = 0; i < b->nrepl; i++) {
        struct entry *e = &b->repl[i];
        if (memcmp(e->id, id, DG_NODE_ID_LEN) != 0)
            continue;
        if (same_addr(t, e, ip, port)) {
            /* A pending replacement heard again: it competes for a place with its history. */
            cand = *e;
            have_cand = 1;
            remove_repl(b, i);
            break;
        }
        if (!entry_bad(e)) {
            t->rejected_id++;
            return -EEXIST;
        }
        remove_repl(b, i);
        break;
    }

    if (clear_same_source(t, ip, port) < 0) {
        if (have_cand)
            add_repl(b, &cand); /* put it back untouched */
        t->rejected_same_ip++;
        return -EEXIST;
    }
    if (!have_cand) {
        memset(&cand, 0, sizeof(cand));
        memcpy(cand.id, id, DG_NODE_ID_LEN);
        memcpy(cand.ip, ip, t->alen);
        cand.port = port;
    }
    entry_apply(&cand, kind, now);

    for (;;) {
        bi = bucket_of(t, id);
        b = &t->b[bi];
        if (b->n < DG_DHT_K) {
            b->nodes[b->n++] = cand;
            b->changed = now;
            return DG_DHT_HEARD_ADDED;
        }
        int bad = worst_bad(b);
        if (bad >= 0) {
            b->nodes[bad] = cand;
            b->changed = now;
            return DG_DHT_HEARD_REPLACED_BAD;
        }
        if (bi == t->nbuckets - 1 && t->nbuckets < DG_DHT_MAX_BUCKETS) {
            split_last(t, now);
            continue;
        }
        break;
    }

    add_repl(b, &cand);
    if (!ping_out)
        return DG_DHT_HEARD_PENDING;
    int p = ping_candidate(b, now);
    if (p < 0)
        return DG_DHT_HEARD_PENDING;
    b->nodes[p].flags |= ENTRY_PING_ASKED;
    b->nodes[p].ping_asked = now;
    entry_export(t, &b->nodes[p], ping_out);
    return DG_DHT_HEARD_PENDING_PING;
}

/* Splits @p addr for this table. @return 0 or -EINVAL (wrong family or unusable). */
static int table_addr(const struct dg_dht_table *t, const struct sockaddr *addr, uint8_t ip[16],
                      uint16_t *port)
{
    size_t alen = addr_split(addr, ip, port);

    if (alen != t->alen || *port == 0 || !ip_usable(ip, alen))
        return -EINVAL;
    return 0;
}

int dg_dht_table_heard(struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                       const struct sockaddr *addr, enum dg_dht_heard_kind kind, uint64_t now_ms,
                       struct dg_dht_node *ping_out)
{
    uint8_t ip[16];
    uint16_t port;

    if ((kind != DG_DHT_HEARD_REPLY && kind != DG_DHT_HEARD_QUERY) ||
        table_addr(t, addr, ip, &port) < 0) {
        t->rejected_invalid++;
        return -EINVAL;
    }
    return table_insert(t, id, addr, ip, port, (int)kind, now_ms, ping_out);
}

int dg_dht_table_failed(struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                        const struct sockaddr *addr, uint64_t now_ms)
{
    struct bucket *b = &t->b[bucket_of(t, id)];
    uint8_t ip[16];
    uint16_t port = 0;

    if (addr && table_addr(t, addr, ip, &port) < 0)
        return -ENOENT;
    for (unsigned i = 0; i < b->n; i++) {
        struct entry *e = &b->nodes[i];
        if (memcmp(e->id, id, DG_NODE_ID_LEN) != 0 || (addr && !same_addr(t, e, ip, port)))
            continue;
        if (e->fails < UINT8_MAX)
            e->fails++;
        /* It may be named for a ping again at once: BEP 5 suggests a second try. */
        e->flags &= (uint8_t)~ENTRY_PING_ASKED;
        if (!entry_bad(e))
            return DG_DHT_FAILED_COUNTED;
        int r = best_repl(b);
        if (r < 0)
            return DG_DHT_FAILED_BAD;
        *e = b->repl[r];
        remove_repl(b, (unsigned)r);
        b->changed = now_ms;
        return DG_DHT_FAILED_REPLACED;
    }
    for (unsigned i = 0; i < b->nrepl; i++) {
        struct entry *e = &b->repl[i];
        if (memcmp(e->id, id, DG_NODE_ID_LEN) != 0 || (addr && !same_addr(t, e, ip, port)))
            continue;
        remove_repl(b, i);
        return DG_DHT_FAILED_DROPPED;
    }
    return -ENOENT;
}

size_t dg_dht_table_closest(const struct dg_dht_table *t, const uint8_t target[DG_NODE_ID_LEN],
                            struct dg_dht_node *out, size_t max)
{
    size_t cnt = 0;

    if (max == 0)
        return 0;
    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        const struct bucket *b = &t->b[bi];
        for (unsigned i = 0; i < b->n; i++) {
            const struct entry *e = &b->nodes[i];
            if (!(e->flags & DG_DHT_NODE_CONFIRMED) || entry_bad(e))
                continue;
            if (cnt == max && dg_node_id_closer(target, e->id, out[max - 1].id) >= 0)
                continue;
            /* Insertion into the sorted prefix; strictly closer moves ahead, so ties keep
             * their order. */
            size_t p = cnt < max ? cnt : max - 1;
            while (p > 0 && dg_node_id_closer(target, e->id, out[p - 1].id) < 0) {
                out[p] = out[p - 1];
                p--;
            }
            entry_export(t, e, &out[p]);
            if (cnt < max)
                cnt++;
        }
    }
    return cnt;
}

static uint64_t bucket_last(const struct bucket *b)
{
    return b->changed > b->refreshed ? b->changed : b->refreshed;
}

int dg_dht_table_next_refresh(struct dg_dht_table *t, uint64_t now_ms,
                              uint8_t target_out[DG_NODE_ID_LEN])
{
    int best = -1;

    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        uint64_t last = bucket_last(&t->b[bi]);
        if (elapsed(now_ms, last) < DG_DHT_REFRESH_MS)
            continue;
        if (best < 0 || last < bucket_last(&t->b[best]))
            best = (int)bi;
    }
    if (best < 0)
        return -EAGAIN;

    uint8_t prefix[DG_NODE_ID_LEN];
    unsigned bits;
    memcpy(prefix, t->id, DG_NODE_ID_LEN);
    if ((unsigned)best < t->nbuckets - 1) {
        /* Bucket i: the first i bits are ours, bit i is not. */
        prefix[best / 8] ^= (uint8_t)(0x80 >> (best % 8));
        bits = (unsigned)best + 1;
    } else {
        bits = (unsigned)best;
    }
    dg_node_id_random_prefixed(prefix, bits, t->rand_bytes, t->rand_arg, target_out);
    t->b[best].refreshed = now_ms;
    return best;
}

uint64_t dg_dht_table_refresh_due_in(const struct dg_dht_table *t, uint64_t now_ms)
{
    uint64_t soonest = DG_DHT_REFRESH_MS;

    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        uint64_t age = elapsed(now_ms, bucket_last(&t->b[bi]));
        uint64_t left = age >= DG_DHT_REFRESH_MS ? 0 : DG_DHT_REFRESH_MS - age;
        if (left < soonest)
            soonest = left;
    }
    return soonest;
}

size_t dg_dht_table_count(const struct dg_dht_table *t)
{
    size_t n = 0;

    for (unsigned bi = 0; bi < t->nbuckets; bi++)
        n += t->b[bi].n;
    return n;
}

int dg_dht_table_node_at(const struct dg_dht_table *t, size_t i, struct dg_dht_node *out)
{
    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        if (i < t->b[bi].n) {
            entry_export(t, &t->b[bi].nodes[i], out);
            return 0;
        }
        i -= t->b[bi].n;
    }
    return -ENOENT;
}

int dg_dht_table_find(const struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                      struct dg_dht_node *out)
{
    const struct bucket *b = &t->b[bucket_of(t, id)];

    for (unsigned i = 0; i < b->n; i++) {
        if (memcmp(b->nodes[i].id, id, DG_NODE_ID_LEN) == 0) {
            if (out)
                entry_export(t, &b->nodes[i], out);
            return 0;
        }
    }
    return -ENOENT;
}

void dg_dht_table_stats(const struct dg_dht_table *t, uint64_t now_ms,
                        struct dg_dht_table_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->buckets = t->nbuckets;
    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        const struct bucket *b = &t->b[bi];
        st->nodes += b->n;
        st->replacements += b->nrepl;
        for (unsigned i = 0; i < b->n; i++) {
            switch (entry_state(&b->nodes[i], now_ms)) {
            case DG_DHT_NODE_GOOD:
                st->good++;
                break;
            case DG_DHT_NODE_QUESTIONABLE:
                st->questionable++;
                break;
            case DG_DHT_NODE_BAD:
                st->bad++;
                break;
            }
        }
    }
    st->rejected_bep42 = t->rejected_bep42;
    st->rejected_same_ip = t->rejected_same_ip;
    st->rejected_id = t->rejected_id;
    st->rejected_invalid = t->rejected_invalid;
    st->load_skipped = t->load_skipped;
}

/* ---- save / load ---- */

static const uint8_t save_magic[4] = {'D', 'G', 'R', 'T'};
#define SAVE_VERSION 1

static int save_eligible(const struct entry *e)
{
    return (e->flags & DG_DHT_NODE_CONFIRMED) && !entry_bad(e);
}

int dg_dht_table_save(const struct dg_dht_table *t, uint8_t *buf, size_t cap)
{
    size_t esz = DG_NODE_ID_LEN + t->alen + 2;
    size_t n = 0;

    for (unsigned bi = 0; bi < t->nbuckets; bi++)
        for (unsigned i = 0; i < t->b[bi].n; i++)
            n += save_eligible(&t->b[bi].nodes[i]);
    size_t need = DG_DHT_SAVE_HEADER + n * esz + 4;
    if (!buf || cap < need)
        return -ENOSPC;

    memcpy(buf, save_magic, 4);
    buf[4] = SAVE_VERSION;
    buf[5] = t->family == AF_INET ? 4 : 6;
    dg_put16(buf + 6, (uint16_t)n);
    memcpy(buf + 8, t->id, DG_NODE_ID_LEN);
    uint8_t *p = buf + DG_DHT_SAVE_HEADER;
    for (unsigned bi = 0; bi < t->nbuckets; bi++) {
        for (unsigned i = 0; i < t->b[bi].n; i++) {
            const struct entry *e = &t->b[bi].nodes[i];
            if (!save_eligible(e))
                continue;
            memcpy(p, e->id, DG_NODE_ID_LEN);
            memcpy(p + DG_NODE_ID_LEN, e->ip, t->alen);
            dg_put16(p + DG_NODE_ID_LEN + t->alen, e->port);
            p += esz;
        }
    }
    dg_put32(p, dg_node_id_crc32c(0, buf, (size_t)(p - buf)));
    return (int)need;
}

/* Checks everything of a save but the entries. @return 0 or -EBADMSG. */
static int save_check(const uint8_t *buf, size_t len, size_t *alen, size_t *n)
{
    if (!buf || len < DG_DHT_SAVE_HEADER + 4 || memcmp(buf, save_magic, 4) != 0 ||
        buf[4] != SAVE_VERSION || (buf[5] != 4 && buf[5] != 6))
        return -EBADMSG;
    *alen = buf[5] == 4 ? 4 : 16;
    *n = dg_get16(buf + 6);
    if (*n > DG_DHT_MAX_NODES || len != DG_DHT_SAVE_HEADER + *n * (DG_NODE_ID_LEN + *alen + 2) + 4)
        return -EBADMSG;
    if (dg_node_id_crc32c(0, buf, len - 4) != dg_get32(buf + len - 4))
        return -EBADMSG;
    return 0;
}

int dg_dht_table_load_id(const uint8_t *buf, size_t len, int *family, uint8_t id[DG_NODE_ID_LEN])
{
    size_t alen, n;

    if (save_check(buf, len, &alen, &n) < 0)
        return -EBADMSG;
    *family = alen == 4 ? AF_INET : AF_INET6;
    memcpy(id, buf + 8, DG_NODE_ID_LEN);
    return 0;
}

int dg_dht_table_load(struct dg_dht_table *t, const uint8_t *buf, size_t len, uint64_t now_ms)
{
    size_t alen, n;
    int inserted = 0;

    if (save_check(buf, len, &alen, &n) < 0)
        return -EBADMSG;
    if (alen != t->alen)
        return -EINVAL;
    const uint8_t *p = buf + DG_DHT_SAVE_HEADER;
    for (size_t k = 0; k < n; k++, p += DG_NODE_ID_LEN + alen + 2) {
        struct sockaddr_storage ss;
        uint8_t ip[16];
        uint16_t port;
        int rc;

        addr_join(p + DG_NODE_ID_LEN, alen, dg_get16(p + DG_NODE_ID_LEN + alen), &ss);
        if (table_addr(t, (const struct sockaddr *)&ss, ip, &port) < 0) {
            t->rejected_invalid++;
            rc = -EINVAL;
        } else {
            rc = table_insert(t, p, (const struct sockaddr *)&ss, ip, port, KIND_LOADED, now_ms,
                              NULL);
        }
        if (rc == DG_DHT_HEARD_ADDED || rc == DG_DHT_HEARD_REPLACED_BAD)
            inserted++;
        else if (rc < 0)
            t->load_skipped++;
    }
    return inserted;
}

/* ------------------------------------------------------------------------------------------ */
/* Write tokens */

static void draw_secret(const struct dg_dht_tokens *tk, uint8_t secret[DG_DHT_SECRET_LEN])
{
    tk->rand_bytes(tk->rand_arg, secret, DG_DHT_SECRET_LEN);
}

void dg_dht_tokens_init(struct dg_dht_tokens *tk, dg_rand_bytes_fn rand_bytes, void *rand_arg,
                        uint64_t now_ms)
{
    memset(tk, 0, sizeof(*tk));
    tk->rand_bytes = rand_bytes;
    tk->rand_arg = rand_arg;
    draw_secret(tk, tk->current);
    draw_secret(tk, tk->previous);
    tk->rotated_ms = now_ms;
}

int dg_dht_tokens_rotate_if_due(struct dg_dht_tokens *tk, uint64_t now_ms)
{
    uint64_t age = elapsed(now_ms, tk->rotated_ms);

    if (age < DG_DHT_TOKEN_ROTATE_MS)
        return 0;
    tk->rotated_ms = now_ms;
    if (age >= 2 * (uint64_t)DG_DHT_TOKEN_ROTATE_MS) {
        draw_secret(tk, tk->previous);
        draw_secret(tk, tk->current);
        return 2;
    }
    memcpy(tk->previous, tk->current, DG_DHT_SECRET_LEN);
    draw_secret(tk, tk->current);
    return 1;
}

static int token_with(const uint8_t secret[DG_DHT_SECRET_LEN], const struct sockaddr *addr,
                      uint8_t out[DG_DHT_TOKEN_LEN])
{
    uint8_t in[DG_DHT_SECRET_LEN + 16];
    uint8_t md[EVP_MAX_MD_SIZE];
    uint8_t ip[16];
    uint16_t port;
    unsigned int mdlen = 0;
    size_t alen = addr_split(addr, ip, &port);

    if (alen == 0)
        return -EAFNOSUPPORT;
    memcpy(in, secret, DG_DHT_SECRET_LEN);
    memcpy(in + DG_DHT_SECRET_LEN, ip, alen);
    int ok = EVP_Digest(in, DG_DHT_SECRET_LEN + alen, md, &mdlen, EVP_sha256(), NULL);
    OPENSSL_cleanse(in, sizeof(in));
    if (ok != 1 || mdlen < DG_DHT_TOKEN_LEN)
        return -EIO;
    memcpy(out, md, DG_DHT_TOKEN_LEN);
    return 0;
}

int dg_dht_token_make(const struct dg_dht_tokens *tk, const struct sockaddr *addr,
                      uint8_t out[DG_DHT_TOKEN_LEN], size_t *len)
{
    int rc = token_with(tk->current, addr, out);

    if (rc == 0)
        *len = DG_DHT_TOKEN_LEN;
    return rc;
}

int dg_dht_token_check(const struct dg_dht_tokens *tk, const struct sockaddr *addr,
                       const uint8_t *token, size_t len)
{
    uint8_t want[DG_DHT_TOKEN_LEN];
    int ok = 0;

    if (len != DG_DHT_TOKEN_LEN)
        return 0;
    if (token_with(tk->current, addr, want) == 0 && CRYPTO_memcmp(want, token, len) == 0)
        ok = 1;
    if (token_with(tk->previous, addr, want) == 0 && CRYPTO_memcmp(want, token, len) == 0)
        ok = 1;
    return ok;
}

/* ------------------------------------------------------------------------------------------ */
/* Peer storage */

struct speer {
    uint8_t ip[16];
    uint16_t port;
    uint8_t alen; /* 4 or 16 */
    uint64_t seen;
};

struct skey {
    uint8_t hash[DG_NODE_ID_LEN];
    uint64_t touched; /* last announce */
    struct speer *peers;
    size_t n, cap;
};

struct dg_dht_peer_store {
    size_t max_keys, max_peers, max_per_key;
    uint64_t ttl;
    int same_ip;
    dg_rand_bytes_fn rand_bytes;
    void *rand_arg;
    uint64_t seed;
    struct skey *keys; /* dense: keys[0..nkeys) */
    size_t nkeys;
    size_t *slots; /* open addressing, linear probing: key index + 1, 0 = empty */
    size_t mask;
    size_t npeers;
    struct dg_dht_peer_store_stats st;
};

int dg_dht_peer_store_new(const struct dg_dht_peer_store_config *cfg,
                          struct dg_dht_peer_store **out)
{
    struct dg_dht_peer_store *s;
    size_t nslots = 16;

    if (!cfg || !cfg->rand_bytes)
        return -EINVAL;
    s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->max_keys = cfg->max_keys ? cfg->max_keys : 2000;
    s->max_peers = cfg->max_peers ? cfg->max_peers : 20000;
    s->max_per_key = cfg->max_per_key ? cfg->max_per_key : 100;
    s->ttl = cfg->ttl_ms ? cfg->ttl_ms : 30u * 60 * 1000;
    s->same_ip = cfg->same_ip;
    s->rand_bytes = cfg->rand_bytes;
    s->rand_arg = cfg->rand_arg;
    if (s->max_keys > ((size_t)1 << 24)) {
        free(s);
        return -EINVAL;
    }
    while (nslots < 2 * s->max_keys)
        nslots *= 2;
    s->mask = nslots - 1;
    s->keys = calloc(s->max_keys, sizeof(*s->keys));
    s->slots = calloc(nslots, sizeof(*s->slots));
    if (!s->keys || !s->slots) {
        free(s->keys);
        free(s->slots);
        free(s);
        return -ENOMEM;
    }
    s->rand_bytes(s->rand_arg, &s->seed, sizeof(s->seed));
    *out = s;
    return 0;
}

void dg_dht_peer_store_free(struct dg_dht_peer_store *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nkeys; i++)
        free(s->keys[i].peers);
    free(s->keys);
    free(s->slots);
    free(s);
}

static size_t key_home(const struct dg_dht_peer_store *s, const uint8_t hash[DG_NODE_ID_LEN])
{
    return (size_t)keyed_hash(s->seed, hash, DG_NODE_ID_LEN) & s->mask;
}

/* The slot holding @p hash, or the empty slot ending its probe sequence. */
static size_t key_slot(const struct dg_dht_peer_store *s, const uint8_t hash[DG_NODE_ID_LEN])
{
    size_t i = key_home(s, hash);

    while (s->slots[i] && memcmp(s->keys[s->slots[i] - 1].hash, hash, DG_NODE_ID_LEN) != 0)
        i = (i + 1) & s->mask;
    return i;
}

static struct skey *key_find(const struct dg_dht_peer_store *s, const uint8_t *hash)
{
    size_t i = key_slot(s, hash);
    return s->slots[i] ? &s->keys[s->slots[i] - 1] : NULL;
}

/* Removes key @p k with its peers (counted as @p evicted or not). */
static void key_remove(struct dg_dht_peer_store *s, size_t k)
{
    size_t hole = key_slot(s, s->keys[k].hash);

    s->npeers -= s->keys[k].n;
    free(s->keys[k].peers);

    /* Backward-shift deletion keeps every probe sequence unbroken without tombstones. */
    s->slots[hole] = 0;
    for (size_t j = (hole + 1) & s->mask; s->slots[j]; j = (j + 1) & s->mask) {
        size_t home = key_home(s, s->keys[s->slots[j] - 1].hash);
        /* The entry at j may move into the hole unless its home lies cyclically in
         * (hole, j]. */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            s->slots[hole] = s->slots[j];
            s->slots[j] = 0;
            hole = j;
        }
    }

    /* Keep keys[] dense: the last key moves into place k. */
    size_t last = s->nkeys - 1;
    if (k != last) {
        size_t slot = key_slot(s, s->keys[last].hash);
        s->keys[k] = s->keys[last];
        s->slots[slot] = k + 1;
    }
    memset(&s->keys[last], 0, sizeof(s->keys[last]));
    s->nkeys--;
}

/* Drops the key announced least recently, other than @p keep (may be NULL).
 * @return 0, or -ENOENT if there is no other key. */
static int evict_oldest_key(struct dg_dht_peer_store *s, const uint8_t *keep)
{
    size_t victim = SIZE_MAX;

    for (size_t i = 0; i < s->nkeys; i++) {
        if (keep && memcmp(s->keys[i].hash, keep, DG_NODE_ID_LEN) == 0)
            continue;
        if (victim == SIZE_MAX || s->keys[i].touched < s->keys[victim].touched)
            victim = i;
    }
    if (victim == SIZE_MAX)
        return -ENOENT;
    s->st.evicted_keys++;
    s->st.evicted_peers += s->keys[victim].n;
    key_remove(s, victim);
    return 0;
}

static size_t oldest_peer(const struct skey *k)
{
    size_t o = 0;

    for (size_t i = 1; i < k->n; i++)
        if (k->peers[i].seen < k->peers[o].seen)
            o = i;
    return o;
}

int dg_dht_peer_store_add(struct dg_dht_peer_store *s, const uint8_t info_hash[DG_NODE_ID_LEN],
                          const struct sockaddr *addr, uint64_t now_ms)
{
    struct speer np;
    struct skey *k;
    size_t alen = addr_split(addr, np.ip, &np.port);

    if (alen == 0 || np.port == 0 || !ip_usable(np.ip, alen))
        return -EINVAL;
    np.alen = (uint8_t)alen;
    np.seen = now_ms;

    k = key_find(s, info_hash);
    if (k) {
        k->touched = now_ms;
        for (size_t i = 0; i < k->n; i++) {
            struct speer *p = &k->peers[i];
            if (p->alen == alen && memcmp(p->ip, np.ip, alen) == 0 &&
                (!s->same_ip || p->port == np.port)) {
                p->port = np.port;
                p->seen = now_ms;
                s->st.updated++;
                return 1;
            }
        }
        if (k->n >= s->max_per_key) {
            k->peers[oldest_peer(k)] = np;
            s->st.evicted_peers++;
            s->st.added++;
            return 0;
        }
    }

    /* A new peer: make room in all, then (if needed) a place for the key. */
    while (s->npeers >= s->max_peers) {
        if (evict_oldest_key(s, info_hash) < 0) {
            /* Only this key holds peers: replace its oldest. */
            k = key_find(s, info_hash);
            if (!k || k->n == 0)
                return -ENOMEM; /* cannot happen: the peers counted are this key's */
            k->peers[oldest_peer(k)] = np;
            s->st.evicted_peers++;
            s->st.added++;
            return 0;
        }
    }
    k = key_find(s, info_hash);
    if (!k) {
        if (s->nkeys >= s->max_keys)
            evict_oldest_key(s, NULL);
        size_t slot = key_slot(s, info_hash);
        k = &s->keys[s->nkeys];
        memset(k, 0, sizeof(*k));
        memcpy(k->hash, info_hash, DG_NODE_ID_LEN);
        s->slots[slot] = ++s->nkeys;
    }
    k->touched = now_ms;
    if (k->n == k->cap) {
        size_t cap = k->cap ? 2 * k->cap : 4;
        if (cap > s->max_per_key)
            cap = s->max_per_key;
        struct speer *grown = realloc(k->peers, cap * sizeof(*grown));
        if (!grown) {
            if (k->n == 0)
                key_remove(s, (size_t)(k - s->keys));
            return -ENOMEM;
        }
        k->peers = grown;
        k->cap = cap;
    }
    k->peers[k->n++] = np;
    s->npeers++;
    s->st.added++;
    return 0;
}

static void peer_compact(const struct speer *p, struct dg_dht_compact *out)
{
    memset(out, 0, sizeof(*out));
    memcpy(out->bytes, p->ip, p->alen);
    dg_put16(out->bytes + p->alen, p->port);
    out->len = (uint8_t)(p->alen + 2);
}

size_t dg_dht_peer_store_get(struct dg_dht_peer_store *s, const uint8_t info_hash[DG_NODE_ID_LEN],
                             int family, struct dg_dht_compact *out, size_t max, uint64_t now_ms)
{
    const struct skey *k = key_find(s, info_hash);
    size_t want_alen = family == AF_INET ? 4 : family == AF_INET6 ? 16 : 0;
    size_t cnt = 0, seen = 0;

    if (!k || max == 0 || want_alen == 0)
        return 0;
    /* Reservoir sampling: after the i-th eligible peer, every one of them is in out[] with
     * the same probability max / i. */
    for (size_t i = 0; i < k->n; i++) {
        const struct speer *p = &k->peers[i];
        if (p->alen != want_alen || elapsed(now_ms, p->seen) >= s->ttl)
            continue;
        if (cnt < max) {
            peer_compact(p, &out[cnt++]);
        } else {
            uint32_t j = rand_below(s->rand_bytes, s->rand_arg, (uint32_t)(seen + 1));
            if (j < max)
                peer_compact(p, &out[j]);
        }
        seen++;
    }
    return cnt;
}

int dg_dht_peer_store_has(const struct dg_dht_peer_store *s,
                          const uint8_t info_hash[DG_NODE_ID_LEN], const struct sockaddr *addr,
                          uint64_t now_ms)
{
    const struct skey *k = key_find(s, info_hash);
    const uint8_t *ip;
    size_t alen;
    uint16_t port;

    if (!k || !addr)
        return 0;
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
        ip = (const uint8_t *)&a->sin_addr;
        alen = 4;
        port = ntohs(a->sin_port);
    } else if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        ip = (const uint8_t *)&a->sin6_addr;
        alen = 16;
        port = ntohs(a->sin6_port);
    } else {
        return 0;
    }
    for (size_t i = 0; i < k->n; i++) {
        const struct speer *p = &k->peers[i];
        if (p->alen == alen && p->port == port && memcmp(p->ip, ip, alen) == 0 &&
            elapsed(now_ms, p->seen) < s->ttl)
            return 1;
    }
    return 0;
}

size_t dg_dht_peer_store_expire(struct dg_dht_peer_store *s, uint64_t now_ms)
{
    size_t dropped = 0;

    for (size_t ki = s->nkeys; ki-- > 0;) {
        struct skey *k = &s->keys[ki];
        size_t w = 0;
        for (size_t i = 0; i < k->n; i++) {
            if (elapsed(now_ms, k->peers[i].seen) >= s->ttl)
                continue;
            k->peers[w++] = k->peers[i];
        }
        dropped += k->n - w;
        s->npeers -= k->n - w;
        k->n = w;
        if (w == 0)
            key_remove(s, ki);
    }
    s->st.expired += dropped;
    return dropped;
}

void dg_dht_peer_store_stats(const struct dg_dht_peer_store *s, struct dg_dht_peer_store_stats *st)
{
    *st = s->st;
    st->keys = s->nkeys;
    st->peers = s->npeers;
}

/* ------------------------------------------------------------------------------------------ */
/* Rate limiting */

#define NIL UINT32_MAX
#define SRC_KEY_LEN 9 /* family tag, then 4 (IPv4) or 8 (IPv6 /64) address bytes, zero-padded */

struct rl_src {
    uint8_t key[SRC_KEY_LEN];
    uint64_t tokens; /* in units of 1/per_source_window_ms of a message */
    uint64_t last;   /* last refill */
    uint64_t blocked_until;
    uint32_t hnext;      /* hash chain */
    uint32_t prev, next; /* LRU list, head = most recently heard */
};

struct dg_dht_ratelimit {
    struct dg_dht_ratelimit_config cfg;
    uint64_t seed;
    struct rl_src *src;
    uint32_t nsrc;
    uint32_t *heads;
    uint32_t hmask;
    uint32_t lru_head, lru_tail;
    uint64_t gtokens, glast; /* global bucket, in thousandths of a message */
    struct dg_dht_ratelimit_stats st;
};

void dg_dht_ratelimit_config_default(struct dg_dht_ratelimit_config *cfg)
{
    cfg->per_source_burst = 50;
    cfg->per_source_window_ms = 10000;
    cfg->block_ms = 5u * 60 * 1000;
    cfg->global_burst = 400;
    cfg->global_per_sec = 100;
    cfg->max_sources = 4096;
}

int dg_dht_ratelimit_new(const struct dg_dht_ratelimit_config *cfg, dg_rand_bytes_fn rand_bytes,
                         void *rand_arg, uint64_t now_ms, struct dg_dht_ratelimit **out)
{
    struct dg_dht_ratelimit *rl;
    uint32_t nheads = 16;

    if (!cfg || !rand_bytes)
        return -EINVAL;
    if (cfg->per_source_burst &&
        (cfg->max_sources == 0 || cfg->max_sources > (1u << 24) || cfg->per_source_window_ms == 0))
        return -EINVAL;
    if (cfg->global_burst && cfg->global_per_sec == 0)
        return -EINVAL;
    rl = calloc(1, sizeof(*rl));
    if (!rl)
        return -ENOMEM;
    rl->cfg = *cfg;
    if (cfg->per_source_burst) {
        while (nheads < cfg->max_sources)
            nheads *= 2;
        rl->src = calloc(cfg->max_sources, sizeof(*rl->src));
        rl->heads = malloc(nheads * sizeof(*rl->heads));
        if (!rl->src || !rl->heads) {
            free(rl->src);
            free(rl->heads);
            free(rl);
            return -ENOMEM;
        }
        for (uint32_t i = 0; i < nheads; i++)
            rl->heads[i] = NIL;
        rl->hmask = nheads - 1;
    }
    rl->lru_head = rl->lru_tail = NIL;
    rl->gtokens = (uint64_t)cfg->global_burst * 1000;
    rl->glast = now_ms;
    rand_bytes(rand_arg, &rl->seed, sizeof(rl->seed));
    *out = rl;
    return 0;
}

void dg_dht_ratelimit_free(struct dg_dht_ratelimit *rl)
{
    if (!rl)
        return;
    free(rl->src);
    free(rl->heads);
    free(rl);
}

/* Token bucket refill: @p rate units per millisecond, at most @p cap. */
static void refill(uint64_t *tokens, uint64_t *last, uint64_t now, uint64_t rate, uint64_t cap)
{
    uint64_t el = elapsed(now, *last);

    if (el > 0) {
        if (el >= (cap - *tokens) / rate + 1)
            *tokens = cap;
        else
            *tokens += el * rate;
        *last = now;
    }
}

static uint32_t src_home(const struct dg_dht_ratelimit *rl, const uint8_t key[SRC_KEY_LEN])
{
    return (uint32_t)keyed_hash(rl->seed, key, SRC_KEY_LEN) & rl->hmask;
}

static void lru_unlink(struct dg_dht_ratelimit *rl, uint32_t i)
{
    struct rl_src *e = &rl->src[i];

    if (e->prev != NIL)
        rl->src[e->prev].next = e->next;
    else
        rl->lru_head = e->next;
    if (e->next != NIL)
        rl->src[e->next].prev = e->prev;
    else
        rl->lru_tail = e->prev;
}

static void lru_push_front(struct dg_dht_ratelimit *rl, uint32_t i)
{
    struct rl_src *e = &rl->src[i];

    e->prev = NIL;
    e->next = rl->lru_head;
    if (rl->lru_head != NIL)
        rl->src[rl->lru_head].prev = i;
    rl->lru_head = i;
    if (rl->lru_tail == NIL)
        rl->lru_tail = i;
}

/* The source entry for @p key, created (evicting the least recently heard) if new. */
static struct rl_src *src_get(struct dg_dht_ratelimit *rl, const uint8_t key[SRC_KEY_LEN],
                              uint64_t now)
{
    uint32_t h = src_home(rl, key);
    uint32_t i;

    for (i = rl->heads[h]; i != NIL; i = rl->src[i].hnext) {
        if (memcmp(rl->src[i].key, key, SRC_KEY_LEN) == 0) {
            lru_unlink(rl, i);
            lru_push_front(rl, i);
            return &rl->src[i];
        }
    }
    if (rl->nsrc < rl->cfg.max_sources) {
        i = rl->nsrc++;
    } else {
        i = rl->lru_tail;
        lru_unlink(rl, i);
        uint32_t *pp = &rl->heads[src_home(rl, rl->src[i].key)];
        while (*pp != i)
            pp = &rl->src[*pp].hnext;
        *pp = rl->src[i].hnext;
        rl->st.evictions++;
    }
    struct rl_src *e = &rl->src[i];
    memcpy(e->key, key, SRC_KEY_LEN);
    e->tokens = (uint64_t)rl->cfg.per_source_burst * rl->cfg.per_source_window_ms;
    e->last = now;
    e->blocked_until = 0;
    e->hnext = rl->heads[h];
    rl->heads[h] = i;
    lru_push_front(rl, i);
    return e;
}

int dg_dht_ratelimit_allow(struct dg_dht_ratelimit *rl, const struct sockaddr *addr,
                           uint64_t now_ms)
{
    uint8_t ip[16];
    uint16_t port;
    size_t alen = addr_split(addr, ip, &port);

    if (alen == 0) {
        rl->st.dropped_source++;
        return 0;
    }
    if (rl->cfg.per_source_burst) {
        uint8_t key[SRC_KEY_LEN];
        memset(key, 0, sizeof(key));
        key[0] = (uint8_t)alen;
        memcpy(key + 1, ip, alen == 4 ? 4 : 8);
        struct rl_src *e = src_get(rl, key, now_ms);
        uint64_t cost = rl->cfg.per_source_window_ms;
        uint64_t cap = (uint64_t)rl->cfg.per_source_burst * cost;

        if (e->blocked_until) {
            if (now_ms < e->blocked_until) {
                rl->st.dropped_source++;
                return 0;
            }
            e->blocked_until = 0;
            e->tokens = cap;
            e->last = now_ms;
        }
        refill(&e->tokens, &e->last, now_ms, rl->cfg.per_source_burst, cap);
        if (e->tokens < cost) {
            if (rl->cfg.block_ms) {
                e->blocked_until = now_ms + rl->cfg.block_ms;
                rl->st.blocks++;
            }
            rl->st.dropped_source++;
            return 0;
        }
        e->tokens -= cost;
    }
    if (rl->cfg.global_burst) {
        refill(&rl->gtokens, &rl->glast, now_ms, rl->cfg.global_per_sec,
               (uint64_t)rl->cfg.global_burst * 1000);
        if (rl->gtokens < 1000) {
            rl->st.dropped_global++;
            return 0;
        }
        rl->gtokens -= 1000;
    }
    rl->st.allowed++;
    return 1;
}

void dg_dht_ratelimit_stats(const struct dg_dht_ratelimit *rl, struct dg_dht_ratelimit_stats *st)
{
    *st = rl->st;
    st->sources = rl->nsrc;
}
