/* One Mainline DHT node (BEP 5): see engine/dht.h for what it does and its limits. */
#include "engine/dht.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "engine/krpc.h"

enum purpose {
    Q_PING,      /* a questionable node the table wants checked */
    Q_BOOTSTRAP, /* find_node(own id) to an address of unknown id */
    Q_SEARCH,    /* a lookup step */
    Q_ANNOUNCE,  /* announce_peer at the end of a lookup */
};

struct query {
    uint8_t used;
    uint8_t purpose; /* enum purpose */
    uint8_t method;  /* enum dg_krpc_method */
    uint8_t have_id; /* 1: we know (and expect) the node's id */
    uint8_t tid[DG_DHT_TID_LEN];
    uint8_t id[DG_NODE_ID_LEN];
    struct dg_dht_compact addr;
    uint64_t sent_ms;
    int search; /* slot in searches[], or -1 */
    uint32_t search_id;
};

enum snode_state {
    SN_NEW,     /* not queried yet */
    SN_QUERIED, /* query in flight */
    SN_REPLIED,
    SN_FAILED, /* timed out, answered an error or with another id */
};

struct snode {
    uint8_t id[DG_NODE_ID_LEN];
    struct dg_dht_compact addr;
    uint8_t state; /* enum snode_state */
    uint8_t token_len;
    uint8_t token[DG_KRPC_TOKEN_MAX];
};

enum search_kind {
    S_FIND_NODE,
    S_GET_PEERS,
};

enum search_phase {
    PH_LOOKUP,
    PH_ANNOUNCE,
};

struct search {
    uint32_t id; /* 0: slot free */
    uint8_t kind;
    uint8_t phase;
    uint16_t port; /* announce port, 0 for none */
    uint8_t target[DG_NODE_ID_LEN];
    dg_dht_search_cb cb; /* NULL for internal lookups */
    void *arg;
    uint64_t started_ms;
    unsigned inflight;
    unsigned announces;
    size_t n;
    struct snode nodes[DG_DHT_SEARCH_NODES]; /* closest to target first */
    size_t npeers;
    struct dg_dht_compact peers[DG_DHT_SEARCH_PEERS];
};

struct vote {
    struct dg_dht_compact reporter; /* its IP, port zeroed */
    struct dg_dht_compact reported;
    uint64_t at_ms;
};

/* A node that stored one of our announces, pinged so that our NAT keeps its mapping towards
 * it open (it is the rendezvous others ask to reach us). */
struct keepalive {
    struct dg_dht_compact addr;
    uint64_t announced_ms, pinged_ms;
};

struct dg_dht {
    int family;
    size_t clen; /* compact address length: 6 or 18 */
    size_t nlen; /* compact node info length: 26 or 38 */
    int same_ip; /* DG_DHT_TABLE_SAME_IP: reporters are told apart by IP and port */
    int implied_port;
    uint8_t id[DG_NODE_ID_LEN];
    uint8_t version[DG_DHT_VERSION_MAX];
    size_t version_len;
    dg_dht_send_fn send;
    void *send_arg;
    dg_rand_bytes_fn rand_bytes;
    void *rand_arg;

    struct dg_dht_table *table;
    struct dg_dht_tokens tokens;
    struct dg_dht_peer_store *store;
    struct dg_dht_ratelimit *rl;

    struct query queries[DG_DHT_MAX_QUERIES];
    size_t nqueries;
    size_t qhint; /* where the search for a free query slot starts */
    struct search searches[DG_DHT_MAX_SEARCHES];
    size_t nsearches;
    uint32_t next_search_id;
    uint32_t self_search;  /* id of the running lookup of our own id, or 0 */
    int self_lookup_due;   /* start one at the next tick if the table has nodes */
    uint64_t last_self_ms; /* when the last one started */
    uint64_t last_expire_ms;

    struct vote votes[DG_DHT_VOTES];
    size_t nvotes, vote_next;

    uint64_t keepalive_ms; /* 0: off */
    struct keepalive keepalives[DG_DHT_KEEPALIVE_NODES];
    size_t nkeepalives;

    struct dg_dht_stats st; /* counters and the learned address */
};

/* ---- small helpers ---- */

static uint64_t until(uint64_t now, uint64_t when)
{
    return when > now ? when - now : 0;
}

static uint64_t elapsed(uint64_t now, uint64_t then)
{
    return now > then ? now - then : 0;
}

static socklen_t addr_len(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET ? (socklen_t)sizeof(struct sockaddr_in)
                                    : (socklen_t)sizeof(struct sockaddr_in6);
}

/* Turns a source address into the node family's compact form. @return 0, or -EINVAL if it
 * is short, of another family or unusable. */
static int source_compact(const struct dg_dht *d, const struct sockaddr *from, socklen_t fromlen,
                          struct dg_dht_compact *out)
{
    if (!from || fromlen < (socklen_t)sizeof(sa_family_t))
        return -EINVAL;
    if (from->sa_family == AF_INET && fromlen < (socklen_t)sizeof(struct sockaddr_in))
        return -EINVAL;
    if (from->sa_family == AF_INET6 && fromlen < (socklen_t)sizeof(struct sockaddr_in6))
        return -EINVAL;
    if (from->sa_family != AF_INET && from->sa_family != AF_INET6)
        return -EINVAL;
    int n = dg_dht_addr_to_compact(from, out->bytes);
    if (n < 0 || (size_t)n != d->clen || !dg_dht_addr_usable(from))
        return -EINVAL;
    out->len = (uint8_t)n;
    return 0;
}

static void compact_to_addr(const struct dg_dht_compact *c, struct sockaddr_storage *out)
{
    if (dg_dht_addr_from_compact(c->bytes, c->len, out) != 0)
        memset(out, 0, sizeof(*out));
}

static int compact_eq(const struct dg_dht_compact *a, const struct dg_dht_compact *b)
{
    return a->len == b->len && memcmp(a->bytes, b->bytes, a->len) == 0;
}

static void send_packet(struct dg_dht *d, const struct dg_dht_compact *to, const uint8_t *buf,
                        int len)
{
    struct sockaddr_storage ss;

    if (len <= 0 || (size_t)len > DG_DHT_MAX_PACKET)
        return; /* encoders are bounded by the buffer; never reached */
    compact_to_addr(to, &ss);
    if (d->send(d->send_arg, (const struct sockaddr *)&ss, addr_len(&ss), buf, (size_t)len) < 0)
        d->st.send_failed++;
}

static struct dg_krpc_hdr reply_hdr(const struct dg_dht *d, const struct dg_krpc_msg *m,
                                    const struct dg_dht_compact *to)
{
    struct dg_krpc_hdr h;

    memset(&h, 0, sizeof(h));
    h.tid = m->tid;
    h.tid_len = m->tid_len;
    h.version = d->version_len ? d->version : NULL;
    h.version_len = d->version_len;
    h.ip = to->bytes;
    h.ip_len = to->len;
    return h;
}

static void send_error(struct dg_dht *d, const struct dg_krpc_msg *m,
                       const struct dg_dht_compact *to, int code, const char *msg)
{
    uint8_t buf[DG_DHT_MAX_PACKET];
    struct dg_krpc_hdr h = reply_hdr(d, m, to);

    int len = dg_krpc_encode_error(buf, sizeof(buf), &h, code, msg, strlen(msg));
    if (len > 0) {
        send_packet(d, to, buf, len);
        d->st.errors_sent++;
    }
}

/* ---- outstanding queries ---- */

static struct query *query_alloc(struct dg_dht *d)
{
    if (d->nqueries >= DG_DHT_MAX_QUERIES) {
        d->st.dropped_queries++;
        return NULL;
    }
    for (size_t k = 0; k < DG_DHT_MAX_QUERIES; k++) {
        size_t i = (d->qhint + k) % DG_DHT_MAX_QUERIES;
        if (!d->queries[i].used) {
            d->qhint = (i + 1) % DG_DHT_MAX_QUERIES;
            memset(&d->queries[i], 0, sizeof(d->queries[i]));
            d->queries[i].used = 1;
            d->queries[i].search = -1;
            d->nqueries++;
            return &d->queries[i];
        }
    }
    return NULL;
}

static void query_release(struct dg_dht *d, struct query *q)
{
    q->used = 0;
    d->nqueries--;
}

static struct query *query_find(struct dg_dht *d, const uint8_t *tid, size_t tid_len,
                                const struct dg_dht_compact *from)
{
    if (tid_len != DG_DHT_TID_LEN)
        return NULL;
    for (size_t i = 0; i < DG_DHT_MAX_QUERIES; i++) {
        struct query *q = &d->queries[i];
        if (q->used && memcmp(q->tid, tid, DG_DHT_TID_LEN) == 0 && compact_eq(&q->addr, from))
            return q;
    }
    return NULL;
}

/* Draws a transaction id not in use towards q->addr. */
static void query_tid(struct dg_dht *d, struct query *q)
{
    for (int tries = 0; tries < 8; tries++) {
        d->rand_bytes(d->rand_arg, q->tid, DG_DHT_TID_LEN);
        q->used = 0; /* not matched against itself */
        struct query *other = query_find(d, q->tid, DG_DHT_TID_LEN, &q->addr);
        q->used = 1;
        if (!other)
            return;
    }
}

struct query_args {
    enum dg_krpc_method method;
    const uint8_t *target; /* find_node target or get_peers/announce info hash */
    uint16_t port;
    const uint8_t *token;
    size_t token_len;
};

/* Sends a query and records it. @return 0, or -EAGAIN (no free slot) / -EINVAL (encoding). */
static int send_query(struct dg_dht *d, const struct query_args *a, const struct dg_dht_compact *to,
                      const uint8_t *id, enum purpose purpose, int search, uint32_t search_id,
                      uint64_t now)
{
    uint8_t buf[DG_DHT_MAX_PACKET];
    struct query *q = query_alloc(d);
    struct dg_krpc_hdr h;
    int len = -EINVAL;

    if (!q)
        return -EAGAIN;
    q->purpose = (uint8_t)purpose;
    q->method = (uint8_t)a->method;
    q->addr = *to;
    if (id) {
        q->have_id = 1;
        memcpy(q->id, id, DG_NODE_ID_LEN);
    }
    q->sent_ms = now;
    q->search = search;
    q->search_id = search_id;
    query_tid(d, q);

    memset(&h, 0, sizeof(h));
    h.tid = q->tid;
    h.tid_len = DG_DHT_TID_LEN;
    h.version = d->version_len ? d->version : NULL;
    h.version_len = d->version_len;
    switch (a->method) {
    case DG_KRPC_PING:
        len = dg_krpc_encode_ping(buf, sizeof(buf), &h, d->id);
        break;
    case DG_KRPC_FIND_NODE:
        len = dg_krpc_encode_find_node(buf, sizeof(buf), &h, d->id, a->target, 0);
        break;
    case DG_KRPC_GET_PEERS:
        len = dg_krpc_encode_get_peers(buf, sizeof(buf), &h, d->id, a->target, 0);
        break;
    case DG_KRPC_ANNOUNCE_PEER:
        len = dg_krpc_encode_announce_peer(buf, sizeof(buf), &h, d->id, a->target, a->port,
                                           d->implied_port, a->token, a->token_len);
        break;
    default:
        break;
    }
    if (len < 0) {
        query_release(d, q);
        return -EINVAL;
    }
    d->st.queries_out[a->method]++;
    send_packet(d, to, buf, len);
    return 0;
}

static void send_ping(struct dg_dht *d, const struct dg_dht_node *n, uint64_t now)
{
    struct query_args a = {.method = DG_KRPC_PING};
    struct dg_dht_compact c;
    int len = dg_dht_addr_to_compact((const struct sockaddr *)&n->addr, c.bytes);

    if (len < 0 || (size_t)len != d->clen)
        return;
    c.len = (uint8_t)len;
    send_query(d, &a, &c, n->id, Q_PING, -1, 0, now);
}

/* Tells the table about a node heard from, and pings the node it names if it does. */
static void heard(struct dg_dht *d, const uint8_t *id, const struct dg_dht_compact *from,
                  enum dg_dht_heard_kind kind, uint64_t now)
{
    struct sockaddr_storage ss;
    struct dg_dht_node ping;

    compact_to_addr(from, &ss);
    int rc = dg_dht_table_heard(d->table, id, (const struct sockaddr *)&ss, kind, now, &ping);
    if (rc == DG_DHT_HEARD_PENDING_PING) {
        send_ping(d, &ping, now);
    } else if (kind == DG_DHT_HEARD_QUERY &&
               (rc == DG_DHT_HEARD_ADDED || rc == DG_DHT_HEARD_REPLACED_BAD)) {
        /* A node known only from its query is not handed to others until it has replied
         * (its source may be spoofed): ask it once. */
        struct dg_dht_node n;
        if (dg_dht_table_find(d->table, id, &n) == 0 && !(n.flags & DG_DHT_NODE_CONFIRMED))
            send_ping(d, &n, now);
    }
}

static void failed(struct dg_dht *d, const uint8_t *id, const struct dg_dht_compact *addr,
                   uint64_t now)
{
    struct sockaddr_storage ss;

    compact_to_addr(addr, &ss);
    dg_dht_table_failed(d->table, id, (const struct sockaddr *)&ss, now);
}

/* ---- external address votes ---- */

static void vote(struct dg_dht *d, const struct dg_dht_compact *reporter, const uint8_t *ip,
                 size_t ip_len, uint64_t now)
{
    struct vote v;
    size_t i, best = 0, best_count = 0;

    if (ip_len != d->clen)
        return;
    v.reporter = *reporter;
    if (!d->same_ip)
        memset(v.reporter.bytes + d->clen - 2, 0, 2); /* one vote per IP address */
    v.reported.len = (uint8_t)ip_len;
    memcpy(v.reported.bytes, ip, ip_len);
    v.at_ms = now;
    for (i = 0; i < d->nvotes; i++)
        if (compact_eq(&d->votes[i].reporter, &v.reporter))
            break;
    if (i < d->nvotes) {
        d->votes[i] = v;
    } else if (d->nvotes < DG_DHT_VOTES) {
        d->votes[d->nvotes++] = v;
    } else {
        d->votes[d->vote_next] = v;
        d->vote_next = (d->vote_next + 1) % DG_DHT_VOTES;
    }
    for (i = 0; i < d->nvotes; i++) {
        size_t count = 0;
        for (size_t j = 0; j < d->nvotes; j++)
            count += compact_eq(&d->votes[i].reported, &d->votes[j].reported);
        if (count > best_count) {
            best_count = count;
            best = i;
        }
    }
    if (best_count >= DG_DHT_VOTE_MIN && 2 * best_count > d->nvotes) {
        d->st.have_external = 1;
        d->st.external = d->votes[best].reported;
    }
}

/* ---- keep-alives of the nodes holding our announces ---- */

static void keepalive_add(struct dg_dht *d, const struct dg_dht_compact *addr, uint64_t now)
{
    size_t i, oldest = 0;

    for (i = 0; i < d->nkeepalives; i++)
        if (compact_eq(&d->keepalives[i].addr, addr))
            break;
    if (i == d->nkeepalives) {
        if (d->nkeepalives < DG_DHT_KEEPALIVE_NODES) {
            d->nkeepalives++;
        } else {
            for (i = 1; i < d->nkeepalives; i++)
                if (d->keepalives[i].announced_ms < d->keepalives[oldest].announced_ms)
                    oldest = i;
            i = oldest;
        }
        d->keepalives[i].addr = *addr;
        d->keepalives[i].pinged_ms = now;
    }
    d->keepalives[i].announced_ms = now;
}

/* Pings the nodes holding our announces that are due. @return ms until the next one is due. */
static uint64_t keepalive_tick(struct dg_dht *d, uint64_t now)
{
    uint64_t next = UINT64_MAX;

    for (size_t i = 0; i < d->nkeepalives;) {
        struct keepalive *k = &d->keepalives[i];
        if (elapsed(now, k->announced_ms) >= DG_DHT_KEEPALIVE_FOR_MS) {
            *k = d->keepalives[--d->nkeepalives];
            continue;
        }
        i++;
        if (!d->keepalive_ms)
            continue;
        if (elapsed(now, k->pinged_ms) >= d->keepalive_ms) {
            struct query_args a = {.method = DG_KRPC_PING};
            if (send_query(d, &a, &k->addr, NULL, Q_PING, -1, 0, now) == 0) {
                k->pinged_ms = now;
                d->st.keepalives++;
            }
        }
        uint64_t left = until(now, k->pinged_ms + d->keepalive_ms);
        next = left < next ? left : next;
    }
    return next;
}

/* ---- lookups ---- */

static struct search *search_get(struct dg_dht *d, int slot, uint32_t id)
{
    if (slot < 0 || slot >= DG_DHT_MAX_SEARCHES || id == 0 || d->searches[slot].id != id)
        return NULL;
    return &d->searches[slot];
}

static struct search *search_by_id(struct dg_dht *d, uint32_t id)
{
    for (int i = 0; i < DG_DHT_MAX_SEARCHES; i++)
        if (id != 0 && d->searches[i].id == id)
            return &d->searches[i];
    return NULL;
}

/* Adds a candidate (kept sorted by distance to the target, at most DG_DHT_SEARCH_NODES). */
static void search_add(const struct dg_dht *d, struct search *s, const uint8_t *id,
                       const struct dg_dht_compact *addr)
{
    size_t pos = s->n;

    if (memcmp(id, d->id, DG_NODE_ID_LEN) == 0)
        return;
    for (size_t i = 0; i < s->n; i++) {
        if (memcmp(s->nodes[i].id, id, DG_NODE_ID_LEN) == 0 || compact_eq(&s->nodes[i].addr, addr))
            return;
        if (pos == s->n && dg_node_id_closer(s->target, id, s->nodes[i].id) < 0)
            pos = i;
    }
    if (pos >= DG_DHT_SEARCH_NODES)
        return;
    size_t last = s->n < DG_DHT_SEARCH_NODES ? s->n : DG_DHT_SEARCH_NODES - 1;
    memmove(&s->nodes[pos + 1], &s->nodes[pos], (last - pos) * sizeof(s->nodes[0]));
    memset(&s->nodes[pos], 0, sizeof(s->nodes[pos]));
    memcpy(s->nodes[pos].id, id, DG_NODE_ID_LEN);
    s->nodes[pos].addr = *addr;
    s->nodes[pos].state = SN_NEW;
    if (s->n < DG_DHT_SEARCH_NODES)
        s->n++;
}

/* Adds the compact node infos of a reply as candidates. */
static void search_add_nodes(const struct dg_dht *d, struct search *s, const uint8_t *nodes,
                             size_t count)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *p = nodes + i * d->nlen;
        struct dg_dht_compact c;
        struct sockaddr_storage ss;

        c.len = (uint8_t)d->clen;
        memcpy(c.bytes, p + DG_NODE_ID_LEN, d->clen);
        compact_to_addr(&c, &ss);
        if (!dg_dht_addr_usable((const struct sockaddr *)&ss))
            continue;
        search_add(d, s, p, &c);
    }
}

static struct snode *search_node(struct search *s, const uint8_t *id,
                                 const struct dg_dht_compact *addr)
{
    for (size_t i = 0; i < s->n; i++)
        if (memcmp(s->nodes[i].id, id, DG_NODE_ID_LEN) == 0 && compact_eq(&s->nodes[i].addr, addr))
            return &s->nodes[i];
    return NULL;
}

static int search_slot(const struct dg_dht *d, const struct search *s)
{
    return (int)(s - d->searches);
}

static struct search *search_start(struct dg_dht *d, enum search_kind kind, const uint8_t *target,
                                   uint16_t port, dg_dht_search_cb cb, void *arg, uint64_t now)
{
    struct dg_dht_node seeds[DG_DHT_SEARCH_NODES / 2];
    struct search *s = NULL;

    if (d->nsearches >= DG_DHT_MAX_SEARCHES)
        return NULL;
    for (int i = 0; i < DG_DHT_MAX_SEARCHES && !s; i++)
        if (d->searches[i].id == 0)
            s = &d->searches[i];
    if (!s)
        return NULL;
    memset(s, 0, sizeof(*s));
    if (++d->next_search_id == 0)
        d->next_search_id = 1;
    s->id = d->next_search_id;
    s->kind = (uint8_t)kind;
    s->phase = PH_LOOKUP;
    s->port = port;
    memcpy(s->target, target, DG_NODE_ID_LEN);
    s->cb = cb;
    s->arg = arg;
    s->started_ms = now;
    d->nsearches++;

    size_t n = dg_dht_table_closest(d->table, target, seeds, DG_DHT_SEARCH_NODES / 2);
    for (size_t i = 0; i < n; i++) {
        struct dg_dht_compact c;
        int len = dg_dht_addr_to_compact((const struct sockaddr *)&seeds[i].addr, c.bytes);
        if (len < 0 || (size_t)len != d->clen)
            continue;
        c.len = (uint8_t)len;
        search_add(d, s, seeds[i].id, &c);
    }
    return s;
}

/* Ends a lookup: frees its slot, then makes the final callback. */
static void search_finish(struct dg_dht *d, struct search *s)
{
    dg_dht_search_cb cb = s->cb;
    void *arg = s->arg;
    uint32_t id = s->id;

    if (d->self_search == id)
        d->self_search = 0;
    s->id = 0;
    d->nsearches--;
    if (cb)
        cb(arg, id, NULL, 0, NULL, 1);
}

/* Sends announce_peer to the K closest nodes that replied with a token. */
static void search_announce(struct dg_dht *d, struct search *s, uint64_t now)
{
    size_t replied = 0;

    s->phase = PH_ANNOUNCE;
    for (size_t i = 0; i < s->n && replied < DG_DHT_K; i++) {
        struct snode *sn = &s->nodes[i];
        if (sn->state != SN_REPLIED)
            continue;
        replied++;
        if (sn->token_len == 0)
            continue;
        struct query_args a = {.method = DG_KRPC_ANNOUNCE_PEER,
                               .target = s->target,
                               .port = s->port,
                               .token = sn->token,
                               .token_len = sn->token_len};
        if (send_query(d, &a, &sn->addr, sn->id, Q_ANNOUNCE, search_slot(d, s), s->id, now) == 0)
            s->announces++;
    }
}

/* Advances a lookup: sends queries while fewer than alpha are in flight, and ends it when the
 * K closest responders have been queried. May free @p s (and call its callback). */
static void search_step(struct dg_dht *d, struct search *s, uint64_t now)
{
    if (s->phase == PH_ANNOUNCE) {
        if (s->announces == 0 ||
            elapsed(now, s->started_ms) >= DG_DHT_SEARCH_MAX_MS + 2 * DG_DHT_QUERY_TIMEOUT_MS)
            search_finish(d, s);
        return;
    }
    int pending = 0; /* a candidate not yet queried among the K closest */
    if (elapsed(now, s->started_ms) < DG_DHT_SEARCH_MAX_MS) {
        size_t replied = 0;
        for (size_t i = 0; i < s->n && replied < DG_DHT_K; i++) {
            struct snode *sn = &s->nodes[i];
            if (sn->state == SN_REPLIED) {
                replied++;
                continue;
            }
            if (sn->state != SN_NEW)
                continue;
            if (s->inflight >= DG_DHT_ALPHA) {
                pending = 1;
                break;
            }
            struct query_args a = {.method = s->kind == S_GET_PEERS ? DG_KRPC_GET_PEERS
                                                                    : DG_KRPC_FIND_NODE,
                                   .target = s->target};
            int rc = send_query(d, &a, &sn->addr, sn->id, Q_SEARCH, search_slot(d, s), s->id, now);
            if (rc == -EAGAIN) {
                pending = 1; /* no room: retried when queries time out */
                break;
            }
            if (rc < 0) {
                sn->state = SN_FAILED;
                continue;
            }
            sn->state = SN_QUERIED;
            s->inflight++;
        }
        if (s->inflight > 0 || pending)
            return;
    }
    if (s->kind == S_GET_PEERS && s->port != 0) {
        search_announce(d, s, now);
        if (s->announces > 0)
            return;
    }
    search_finish(d, s);
}

/* Reports the new peers of a reply. @return 0, or -1 if the callback ended the lookup. */
static int search_peers(struct search *s, const struct dg_krpc_msg *m, size_t clen,
                        const struct dg_dht_compact *from)
{
    struct sockaddr_storage ss;
    struct dg_dht_compact fresh[DG_KRPC_MAX_VALUES];
    size_t nfresh = 0;

    for (size_t i = 0; i < m->nvalues; i++) {
        if (m->values[i].len != clen || s->npeers >= DG_DHT_SEARCH_PEERS)
            continue;
        struct dg_dht_compact c;
        c.len = (uint8_t)clen;
        memcpy(c.bytes, m->values[i].addr, clen);
        size_t j;
        for (j = 0; j < s->npeers; j++)
            if (compact_eq(&s->peers[j], &c))
                break;
        if (j < s->npeers)
            continue;
        s->peers[s->npeers++] = c;
        fresh[nfresh++] = c;
    }
    if (nfresh == 0 || !s->cb)
        return 0;
    uint32_t id = s->id;
    compact_to_addr(from, &ss);
    s->cb(s->arg, id, fresh, nfresh, (const struct sockaddr *)&ss, 0);
    return s->id == id ? 0 : -1;
}

/* ---- serving ---- */

static int closest_nodes(struct dg_dht *d, const uint8_t *target, uint8_t *out)
{
    struct dg_dht_node nodes[DG_DHT_K];
    size_t n = dg_dht_table_closest(d->table, target, nodes, DG_DHT_K);
    size_t k = 0;

    for (size_t i = 0; i < n; i++) {
        uint8_t *p = out + k * d->nlen;
        int len =
            dg_dht_addr_to_compact((const struct sockaddr *)&nodes[i].addr, p + DG_NODE_ID_LEN);
        if (len < 0 || (size_t)len != d->clen)
            continue;
        memcpy(p, nodes[i].id, DG_NODE_ID_LEN);
        k++;
    }
    return (int)k;
}

static void handle_query(struct dg_dht *d, const struct dg_krpc_msg *m, size_t qlen,
                         const struct dg_dht_compact *from, uint64_t now)
{
    uint8_t buf[DG_DHT_MAX_PACKET];
    uint8_t nodes[DG_DHT_K * DG_KRPC_NODE6_LEN];
    struct dg_krpc_hdr h = reply_hdr(d, m, from);
    struct sockaddr_storage ss;
    int v6 = d->family == AF_INET6;
    int len = -EINVAL, n;

    d->st.queries_in[m->method < DG_DHT_METHODS ? m->method : DG_KRPC_UNKNOWN]++;
    if (m->method == DG_KRPC_GET || m->method == DG_KRPC_PUT || m->method == DG_KRPC_UNKNOWN) {
        send_error(d, m, from, DG_KRPC_ERR_METHOD, "Method Unknown");
        return;
    }
    int rc = dg_krpc_check_query(m);
    if (rc == -ENOSYS) {
        send_error(d, m, from, DG_KRPC_ERR_METHOD, "Method Unknown");
        return;
    }
    if (rc != 0) {
        send_error(d, m, from, DG_KRPC_ERR_PROTOCOL, "Protocol Error");
        return;
    }
    if (!m->read_only)
        heard(d, m->id, from, DG_DHT_HEARD_QUERY, now);
    compact_to_addr(from, &ss);

    switch (m->method) {
    case DG_KRPC_PING:
        len = dg_krpc_encode_ping_response(buf, sizeof(buf), &h, d->id);
        break;
    case DG_KRPC_FIND_NODE:
        n = closest_nodes(d, m->target, nodes);
        len = dg_krpc_encode_find_node_response(buf, sizeof(buf), &h, d->id, v6 ? NULL : nodes,
                                                v6 ? 0 : (size_t)n, v6 ? nodes : NULL,
                                                v6 ? (size_t)n : 0);
        break;
    case DG_KRPC_GET_PEERS: {
        uint8_t token[DG_DHT_TOKEN_LEN];
        size_t token_len = 0;
        struct dg_dht_compact peers[DG_DHT_MAX_VALUES];
        struct dg_krpc_peer values[DG_DHT_MAX_VALUES];

        if (dg_dht_token_make(&d->tokens, (const struct sockaddr *)&ss, token, &token_len) != 0)
            return;
        size_t np =
            dg_dht_peer_store_get(d->store, m->info_hash, d->family, peers, DG_DHT_MAX_VALUES, now);
        for (size_t i = 0; i < np; i++) {
            values[i].addr = peers[i].bytes;
            values[i].len = peers[i].len;
        }
        if (np > 0) {
            /* No amplification: beyond DG_DHT_MIN_VALUES values, the reply stays within
             * DG_DHT_AMPLIFICATION times the query's length. */
            size_t cost = d->clen + (d->clen < 10 ? 2 : 3); /* "6:" + 6 bytes, "18:" + 18 */
            for (;;) {
                len = dg_krpc_encode_get_peers_response(buf, sizeof(buf), &h, d->id, token,
                                                        token_len, values, np, NULL, 0, NULL, 0);
                if (len < 0 || np <= DG_DHT_MIN_VALUES ||
                    (size_t)len <= DG_DHT_AMPLIFICATION * qlen)
                    break;
                size_t drop = ((size_t)len - DG_DHT_AMPLIFICATION * qlen + cost - 1) / cost;
                np = drop < np && np - drop > DG_DHT_MIN_VALUES ? np - drop : DG_DHT_MIN_VALUES;
            }
        } else {
            n = closest_nodes(d, m->info_hash, nodes);
            len = dg_krpc_encode_get_peers_response(buf, sizeof(buf), &h, d->id, token, token_len,
                                                    NULL, 0, v6 ? NULL : nodes, v6 ? 0 : (size_t)n,
                                                    v6 ? nodes : NULL, v6 ? (size_t)n : 0);
        }
        break;
    }
    case DG_KRPC_ANNOUNCE_PEER: {
        if (!dg_dht_token_check(&d->tokens, (const struct sockaddr *)&ss, m->token, m->token_len)) {
            d->st.bad_tokens++;
            send_error(d, m, from, DG_KRPC_ERR_PROTOCOL, "bad token");
            return;
        }
        struct dg_dht_compact peer = *from;
        if (!m->implied_port) {
            peer.bytes[d->clen - 2] = (uint8_t)(m->port >> 8);
            peer.bytes[d->clen - 1] = (uint8_t)m->port;
        }
        struct sockaddr_storage ps;
        compact_to_addr(&peer, &ps);
        if (dg_dht_peer_store_add(d->store, m->info_hash, (const struct sockaddr *)&ps, now) < 0) {
            send_error(d, m, from, DG_KRPC_ERR_SERVER, "Server Error");
            return;
        }
        d->st.announces_stored++;
        len = dg_krpc_encode_ping_response(buf, sizeof(buf), &h, d->id);
        break;
    }
    default:
        return;
    }
    if (len > 0)
        send_packet(d, from, buf, len);
}

/* ---- responses ---- */

static void start_self_lookup(struct dg_dht *d, uint64_t now)
{
    if (search_by_id(d, d->self_search))
        return;
    struct search *s = search_start(d, S_FIND_NODE, d->id, 0, NULL, NULL, now);
    if (s)
        d->self_search = s->id;
    d->last_self_ms = now;
}

static void handle_response(struct dg_dht *d, const struct dg_krpc_msg *m,
                            const struct dg_dht_compact *from, uint64_t now)
{
    struct query *qp = query_find(d, m->tid, m->tid_len, from);
    const uint8_t *nodes = d->family == AF_INET6 ? m->nodes6 : m->nodes;
    size_t nnodes = d->family == AF_INET6 ? m->nnodes6 : m->nnodes;
    int ok = 0;

    if (!qp) {
        d->st.unmatched++;
        return;
    }
    struct query q = *qp;
    query_release(d, qp);

    if (m->type == DG_KRPC_ERROR) {
        d->st.errors_in++;
    } else if (q.have_id && memcmp(q.id, m->id, DG_NODE_ID_LEN) != 0) {
        d->st.replies_in++;
        d->st.wrong_id++;
        failed(d, q.id, from, now);
    } else {
        d->st.replies_in++;
        ok = 1;
        heard(d, m->id, from, DG_DHT_HEARD_REPLY, now);
        if (m->has & DG_KRPC_HAS_IP)
            vote(d, from, m->ip, m->ip_len, now);
    }

    if (q.purpose == Q_BOOTSTRAP && ok) {
        start_self_lookup(d, now);
        struct search *s = search_by_id(d, d->self_search);
        if (s) {
            search_add(d, s, m->id, from);
            struct snode *sn = search_node(s, m->id, from);
            if (sn && sn->state == SN_NEW)
                sn->state = SN_REPLIED;
            search_add_nodes(d, s, nodes, nnodes);
            search_step(d, s, now);
        }
        return;
    }
    struct search *s = search_get(d, q.search, q.search_id);
    if (!s)
        return;
    if (q.purpose == Q_ANNOUNCE) {
        if (ok)
            keepalive_add(d, &q.addr, now);
        if (s->announces > 0)
            s->announces--;
        search_step(d, s, now);
        return;
    }
    if (q.purpose != Q_SEARCH)
        return;
    if (s->inflight > 0)
        s->inflight--;
    struct snode *sn = search_node(s, q.id, &q.addr);
    if (sn)
        sn->state = ok ? SN_REPLIED : SN_FAILED;
    if (ok && s->phase == PH_LOOKUP) {
        if (sn && (m->has & DG_KRPC_HAS_TOKEN) && m->token_len <= DG_KRPC_TOKEN_MAX) {
            sn->token_len = (uint8_t)m->token_len;
            memcpy(sn->token, m->token, m->token_len);
        }
        search_add_nodes(d, s, nodes, nnodes);
        if (s->kind == S_GET_PEERS && search_peers(s, m, d->clen, from) < 0)
            return;
    }
    search_step(d, s, now);
}

/* ---- public ---- */

int dg_dht_new(const struct dg_dht_config *cfg, uint64_t now_ms, struct dg_dht **out)
{
    struct dg_dht_table_config tc;
    struct dg_dht_ratelimit_config rc;
    struct dg_dht_peer_store_config pc;
    struct dg_dht *d;

    if (!cfg || !out || (cfg->family != AF_INET && cfg->family != AF_INET6) || !cfg->send ||
        !cfg->rand_bytes || cfg->version_len > DG_DHT_VERSION_MAX ||
        (cfg->version_len && !cfg->version))
        return -EINVAL;
    d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->family = cfg->family;
    d->same_ip = (cfg->table_flags & DG_DHT_TABLE_SAME_IP) != 0;
    d->implied_port = cfg->implied_port != 0;
    d->clen = cfg->family == AF_INET ? DG_DHT_COMPACT4_LEN : DG_DHT_COMPACT6_LEN;
    d->nlen = cfg->family == AF_INET ? DG_KRPC_NODE_LEN : DG_KRPC_NODE6_LEN;
    d->send = cfg->send;
    d->send_arg = cfg->send_arg;
    d->rand_bytes = cfg->rand_bytes;
    d->rand_arg = cfg->rand_arg;
    if (cfg->have_id)
        memcpy(d->id, cfg->id, DG_NODE_ID_LEN);
    else
        d->rand_bytes(d->rand_arg, d->id, DG_NODE_ID_LEN);
    if (cfg->version_len)
        memcpy(d->version, cfg->version, cfg->version_len);
    d->version_len = cfg->version_len;

    memset(&tc, 0, sizeof(tc));
    tc.family = cfg->family;
    memcpy(tc.id, d->id, DG_NODE_ID_LEN);
    tc.flags = cfg->table_flags;
    tc.rand_bytes = cfg->rand_bytes;
    tc.rand_arg = cfg->rand_arg;
    int rc2 = dg_dht_table_new(&tc, now_ms, &d->table);
    if (rc2 != 0)
        goto fail;

    if (cfg->peer_store)
        pc = *cfg->peer_store;
    else
        memset(&pc, 0, sizeof(pc));
    pc.rand_bytes = cfg->rand_bytes;
    pc.rand_arg = cfg->rand_arg;
    if (cfg->table_flags & DG_DHT_TABLE_SAME_IP)
        pc.same_ip = 1; /* many nodes on one loopback address announce there */
    rc2 = dg_dht_peer_store_new(&pc, &d->store);
    if (rc2 != 0)
        goto fail;

    if (cfg->ratelimit)
        rc = *cfg->ratelimit;
    else
        dg_dht_ratelimit_config_default(&rc);
    rc2 = dg_dht_ratelimit_new(&rc, cfg->rand_bytes, cfg->rand_arg, now_ms, &d->rl);
    if (rc2 != 0)
        goto fail;

    dg_dht_tokens_init(&d->tokens, cfg->rand_bytes, cfg->rand_arg, now_ms);
    d->last_expire_ms = now_ms;
    *out = d;
    return 0;

fail:
    dg_dht_free(d);
    return rc2;
}

void dg_dht_free(struct dg_dht *d)
{
    if (!d)
        return;
    dg_dht_table_free(d->table);
    dg_dht_peer_store_free(d->store);
    dg_dht_ratelimit_free(d->rl);
    free(d);
}

const uint8_t *dg_dht_id(const struct dg_dht *d)
{
    return d->id;
}

const struct dg_dht_table *dg_dht_get_table(const struct dg_dht *d)
{
    return d->table;
}

void dg_dht_receive(struct dg_dht *d, const uint8_t *buf, size_t len, const struct sockaddr *from,
                    socklen_t fromlen, uint64_t now_ms)
{
    struct dg_dht_compact src;
    struct sockaddr_storage ss;
    struct dg_krpc_msg m;

    if (!buf || source_compact(d, from, fromlen, &src) != 0) {
        d->st.malformed++;
        return;
    }
    compact_to_addr(&src, &ss);
    memset(&m, 0, sizeof(m));
    if (dg_krpc_parse(buf, len, &m) != 0) {
        d->st.malformed++;
        if (m.type == DG_KRPC_QUERY && m.tid_len >= 1 && m.tid_len <= DG_KRPC_TID_MAX) {
            if (!dg_dht_ratelimit_allow(d->rl, (const struct sockaddr *)&ss, now_ms)) {
                d->st.rate_limited++;
                return;
            }
            send_error(d, &m, &src, DG_KRPC_ERR_PROTOCOL, "Protocol Error");
        }
        return;
    }
    if (m.type == DG_KRPC_QUERY) {
        if (!dg_dht_ratelimit_allow(d->rl, (const struct sockaddr *)&ss, now_ms)) {
            d->st.rate_limited++;
            return;
        }
        handle_query(d, &m, len, &src, now_ms);
    } else {
        handle_response(d, &m, &src, now_ms);
    }
}

uint64_t dg_dht_tick(struct dg_dht *d, uint64_t now_ms)
{
    uint64_t next = 60000;

    uint64_t ka = keepalive_tick(d, now_ms);
    next = ka < next ? ka : next;

    /* Expired queries. */
    for (size_t i = 0; i < DG_DHT_MAX_QUERIES && d->nqueries > 0; i++) {
        struct query *qp = &d->queries[i];
        if (!qp->used)
            continue;
        if (now_ms < qp->sent_ms + DG_DHT_QUERY_TIMEOUT_MS) {
            uint64_t left = until(now_ms, qp->sent_ms + DG_DHT_QUERY_TIMEOUT_MS);
            next = left < next ? left : next;
            continue;
        }
        struct query q = *qp;
        query_release(d, qp);
        d->st.timeouts++;
        if (q.have_id)
            failed(d, q.id, &q.addr, now_ms);
        struct search *s = search_get(d, q.search, q.search_id);
        if (!s)
            continue;
        if (q.purpose == Q_ANNOUNCE) {
            if (s->announces > 0)
                s->announces--;
        } else if (q.purpose == Q_SEARCH) {
            if (s->inflight > 0)
                s->inflight--;
            struct snode *sn = search_node(s, q.id, &q.addr);
            if (sn)
                sn->state = SN_FAILED;
        }
        search_step(d, s, now_ms);
    }

    /* Lookup of our own id: the first one after a load, and again while the table is thin
     * (fewer than K good nodes). Then bucket refresh. */
    if (dg_dht_table_count(d->table) > 0 && !search_by_id(d, d->self_search)) {
        int due = d->self_lookup_due;
        if (!due && now_ms >= d->last_self_ms + DG_DHT_THIN_LOOKUP_MS) {
            struct dg_dht_table_stats ts;
            dg_dht_table_stats(d->table, now_ms, &ts);
            due = ts.good < DG_DHT_K;
            if (!due)
                d->last_self_ms = now_ms; /* healthy: look again in a while, not at once */
        }
        if (due) {
            d->self_lookup_due = 0;
            start_self_lookup(d, now_ms);
        }
        uint64_t thin = until(now_ms, d->last_self_ms + DG_DHT_THIN_LOOKUP_MS);
        next = thin < next ? thin : next;
    }
    for (int k = 0; k < 2 && d->nsearches + 8 < DG_DHT_MAX_SEARCHES; k++) {
        uint8_t target[DG_NODE_ID_LEN];
        if (dg_dht_table_next_refresh(d->table, now_ms, target) < 0)
            break;
        search_start(d, S_FIND_NODE, target, 0, NULL, NULL, now_ms);
    }
    uint64_t refresh = dg_dht_table_refresh_due_in(d->table, now_ms);
    if (refresh == 0 && d->nsearches + 8 >= DG_DHT_MAX_SEARCHES)
        refresh = DG_DHT_QUERY_TIMEOUT_MS; /* no room now: a running lookup must end first */
    next = refresh < next ? refresh : next;

    /* Drive lookups (a new one sends its first queries here). */
    for (int i = 0; i < DG_DHT_MAX_SEARCHES; i++) {
        struct search *s = &d->searches[i];
        if (s->id == 0)
            continue;
        search_step(d, s, now_ms);
        if (s->id != 0) {
            uint64_t cap = s->started_ms + DG_DHT_SEARCH_MAX_MS;
            if (s->phase == PH_ANNOUNCE)
                cap += 2 * DG_DHT_QUERY_TIMEOUT_MS;
            uint64_t left = until(now_ms, cap);
            next = left < next ? left : next;
        }
    }

    /* Tokens and stored peers. */
    dg_dht_tokens_rotate_if_due(&d->tokens, now_ms);
    uint64_t rot = until(now_ms, d->tokens.rotated_ms + DG_DHT_TOKEN_ROTATE_MS);
    next = rot < next ? rot : next;
    if (elapsed(now_ms, d->last_expire_ms) >= DG_DHT_EXPIRE_MS || now_ms < d->last_expire_ms) {
        dg_dht_peer_store_expire(d->store, now_ms);
        d->last_expire_ms = now_ms;
    }
    uint64_t exp = until(now_ms, d->last_expire_ms + DG_DHT_EXPIRE_MS);
    next = exp < next ? exp : next;
    return next;
}

int dg_dht_bootstrap(struct dg_dht *d, const struct sockaddr *addr, socklen_t addrlen,
                     uint64_t now_ms)
{
    struct dg_dht_compact c;
    struct query_args a = {.method = DG_KRPC_FIND_NODE, .target = d->id};

    if (source_compact(d, addr, addrlen, &c) != 0)
        return -EINVAL;
    int rc = send_query(d, &a, &c, NULL, Q_BOOTSTRAP, -1, 0, now_ms);
    return rc == -EAGAIN ? -EAGAIN : 0;
}

int dg_dht_get_peers(struct dg_dht *d, const uint8_t key[DG_NODE_ID_LEN], uint16_t announce_port,
                     dg_dht_search_cb cb, void *arg, uint64_t now_ms, uint32_t *search_id)
{
    if (!cb || !key)
        return -EINVAL;
    struct search *s = search_start(d, S_GET_PEERS, key, announce_port, cb, arg, now_ms);
    if (!s)
        return -EAGAIN;
    if (search_id)
        *search_id = s->id;
    if (s->n > 0)
        search_step(d, s, now_ms);
    return 0;
}

int dg_dht_cancel_search(struct dg_dht *d, uint32_t search_id)
{
    struct search *s = search_by_id(d, search_id);

    if (!s)
        return -ENOENT;
    if (d->self_search == search_id)
        d->self_search = 0;
    s->id = 0;
    d->nsearches--;
    return 0;
}

void dg_dht_stats(const struct dg_dht *d, uint64_t now_ms, struct dg_dht_stats *st)
{
    struct dg_dht_table_stats ts;
    struct dg_dht_peer_store_stats ps;

    *st = d->st;
    dg_dht_table_stats(d->table, now_ms, &ts);
    dg_dht_peer_store_stats(d->store, &ps);
    st->nodes = ts.nodes;
    st->good = ts.good;
    st->replacements = ts.replacements;
    st->searches = d->nsearches;
    st->outstanding = d->nqueries;
    st->stored_keys = ps.keys;
    st->stored_peers = ps.peers;
}

int dg_dht_external_addr(const struct dg_dht *d, struct sockaddr_storage *out)
{
    if (!d->st.have_external)
        return -ENOENT;
    compact_to_addr(&d->st.external, out);
    return 0;
}

int dg_dht_announced_to(const struct dg_dht *d, const struct sockaddr *node, uint64_t now_ms)
{
    struct dg_dht_compact c;
    int len = dg_dht_addr_to_compact(node, c.bytes);

    if (len < 0 || (size_t)len != d->clen)
        return 0;
    c.len = (uint8_t)len;
    for (size_t i = 0; i < d->nkeepalives; i++)
        if (compact_eq(&d->keepalives[i].addr, &c) &&
            elapsed(now_ms, d->keepalives[i].announced_ms) < DG_DHT_KEEPALIVE_FOR_MS)
            return 1;
    return 0;
}

void dg_dht_set_keepalive(struct dg_dht *d, uint64_t interval_ms)
{
    d->keepalive_ms = interval_ms;
}

void dg_dht_mapping(const struct dg_dht *d, uint64_t now_ms, struct dg_dht_mapping *out)
{
    size_t best = 0, best_count = 0;
    const struct vote *fresh[DG_DHT_VOTES];
    size_t n = 0;
    size_t alen = d->clen - 2;

    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < d->nvotes; i++)
        if (elapsed(now_ms, d->votes[i].at_ms) < DG_DHT_MAPPING_FRESH_MS)
            fresh[n++] = &d->votes[i];
    /* The IP most observers report, whatever the port. */
    for (size_t i = 0; i < n; i++) {
        size_t count = 0;
        for (size_t j = 0; j < n; j++)
            count += memcmp(fresh[i]->reported.bytes, fresh[j]->reported.bytes, alen) == 0;
        if (count > best_count) {
            best_count = count;
            best = i;
        }
    }
    if (best_count == 0)
        return;
    compact_to_addr(&fresh[best]->reported, &out->addr);
    out->observers = best_count;
    /* The distinct ports they saw for it, and how many saw the most common one. */
    for (size_t i = 0; i < n; i++) {
        if (memcmp(fresh[i]->reported.bytes, fresh[best]->reported.bytes, alen) != 0)
            continue;
        size_t same = 0, first = 1;
        for (size_t j = 0; j < n; j++) {
            if (memcmp(fresh[j]->reported.bytes, fresh[best]->reported.bytes, alen) != 0)
                continue;
            if (memcmp(fresh[j]->reported.bytes + alen, fresh[i]->reported.bytes + alen, 2) == 0) {
                same++;
                if (j < i)
                    first = 0;
            }
        }
        out->ports += first;
        if (same > out->same_port) {
            out->same_port = same;
            compact_to_addr(&fresh[i]->reported, &out->addr);
        }
    }
}

int dg_dht_announced(struct dg_dht *d, const uint8_t key[DG_NODE_ID_LEN],
                     const struct sockaddr *peer, uint64_t now_ms)
{
    return dg_dht_peer_store_has(d->store, key, peer, now_ms);
}

int dg_dht_save(const struct dg_dht *d, uint8_t *buf, size_t cap)
{
    return dg_dht_table_save(d->table, buf, cap);
}

int dg_dht_load(struct dg_dht *d, const uint8_t *buf, size_t len, uint64_t now_ms)
{
    int rc = dg_dht_table_load(d->table, buf, len, now_ms);

    if (rc > 0)
        d->self_lookup_due = 1;
    return rc;
}
