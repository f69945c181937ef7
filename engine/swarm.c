/* The swarms of one node: see swarm.h. */
#include "engine/swarm.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "engine/engine.h"
#include "engine/log.h"
#include "engine/merkle.h"
#include "engine/peer_conn.h"
#include "engine/peer_msg.h"
#include "engine/relay.h"
#include "engine/root_name.h"

#define TICK_MS 500u
#define MAX_STATIC_PEERS 16
#define MAX_CANDIDATES 200                 /* addresses known per swarm */
#define MAX_ACCEPTING 256                  /* incoming connections before their handshake */
#define MAX_TOTAL_PEERS 1000               /* connected peers over all swarms */
#define MAX_UNVERIFIED_BLOCKS (1ull << 26) /* holdings tracked for a length not verified yet */
#define META_TIMEOUT_MS 10000u             /* a metadata request unanswered: ask another peer */
#define REQUEST_TIMEOUT_MS 60000u          /* a block request unanswered: ask another peer */
#define STALL_MS 15000u     /* a peer silent this long while it owes us blocks: the path is dead */
#define URGENT_DUP_MS 1500u /* a waited-for block this late is also asked elsewhere */
#define STALE_MS 5000u      /* a silent connection a new one from the same node replaces */
#define HP_RENDEZVOUS_PER_MIN 20 /* holepunch rendezvous asks we serve per peer and minute */
#define IDLE_SWARM_MS 60000u     /* a swarm nobody uses is dropped after this */
#define DHT_FIRST_RETRY_MS 1500u /* the first repeat of a lookup that found nobody... */
#define DHT_RETRY_MS 5000u       /* DHT lookups of a wanted root without peers... */
#define DHT_REFRESH_MS 300000u   /* ...and again this often while it is wanted */
#define CHOKE_ROUND_MS 10000u
#define OPTIMISTIC_MS 30000u
#define UNCHOKE_SLOTS 4
#define PEX_INTERVAL_MS 60000u
#define PEX_FIRST_MS 3000u           /* the first pex goes soon after the hello */
#define SERVE_QUEUE_BYTES (4u << 20) /* serve while less than this waits in the socket queue */
#define MIN_PIPELINE 128u
#define STORE_PAUSE_MS 1000u /* after a block could not be stored */
#define READAHEAD_MIN (1u << 20)
#define READAHEAD_MAX (64u << 20)
#define ANNOUNCES_AT_ONCE 4
#define ANNOUNCE_RETRY_MS 2000u /* an announce the DHT could not start yet */
#define ANNOUNCE_THIN_MS 60000u /* an announce made while the table was thin */
#define CANCELLED_RING 64
#define TRAVERSE_AFTER_MS 1000u    /* a direct connection not up by then: try NAT traversal */
#define TRAVERSE_GIVE_UP_MS 40000u /* a traversal with no outcome by then has failed */

/* Metadata stages of a swarm whose root the cache does not know. */
enum meta_stage {
    META_LAYER = 1,  /* waiting for a peer's piece layer */
    META_LEAVES = 2, /* waiting for the last piece's leaf hashes */
    META_BLOCK = 3,  /* waiting for the last block */
};

struct request {
    uint32_t block;
    uint64_t sent_at;
};

struct hash_req {
    uint8_t layer;
    uint32_t index, count;
    uint64_t sent_at;
};

#define MAX_HASH_OUT 8           /* our hash_requests outstanding to one peer */
#define LEAVES_PER_REQUEST 1024u /* leaf hashes asked in one request (many pieces at once) */

struct peer {
    struct swarm *sw;
    struct dg_peer_conn *conn;
    struct peer *next;
    struct sockaddr_storage listen; /* where it accepts connections (port from hello), or 0 */
    struct sockaddr_storage cand;   /* the candidate this connection was made for, or 0 */
    int traversed;                  /* made by hole punching or through a relay */
    uint8_t node_id[20];
    int opened; /* our hello went out: other messages may follow */
    int got_hello;
    int has_len;
    uint64_t len; /* the length it claims */
    uint64_t nblocks;
    uint32_t reqq;
    int pex;
    uint8_t *have; /* its blocks (LSB-first bitmap over its claimed length), or NULL */
    int have_all;
    int choked_by;        /* it chokes us */
    int choking;          /* we choke it */
    int interested;       /* it is interested in us */
    int interesting;      /* we told it we are interested */
    int meta_failed;      /* it could not give us the metadata */
    struct request *reqs; /* our requests to it */
    size_t nreqs, reqs_cap;
    uint32_t target; /* requests to keep outstanding to it */
    uint32_t cancelled[CANCELLED_RING];
    uint64_t cancelled_at[CANCELLED_RING];
    unsigned cancelled_next;
    uint32_t *serve; /* its requests to us, FIFO */
    size_t serve_head, serve_len;
    struct hash_req hreqs[MAX_HASH_OUT]; /* our hash_requests to it */
    unsigned nhreqs;
    uint64_t accounted_in, accounted_out;
    uint64_t last_in;   /* when its last message came */
    uint64_t asked_at;  /* its first request or hash request since its last message, or 0 */
    uint8_t nat;        /* its NAT class from its hello (0: unknown) */
    uint64_t hp_window; /* start of the minute its rendezvous asks count in */
    unsigned hp_count;
    uint64_t got_recent, gave_recent; /* bytes of blocks in this choke round */
    uint64_t rate_in;                 /* bytes per second of blocks, smoothed */
    uint64_t rate_window_start, rate_window_bytes;
    uint64_t next_pex;
};

struct lookup {
    uint64_t token;
    uint64_t deadline;
    dg_swarms_lookup_cb cb;
    void *arg;
    struct lookup *next;
};

/* NAT traversal of a candidate (engine/holepunch.h), tried when a direct connection is not
 * up after TRAVERSE_AFTER_MS and the candidate came with a rendezvous. */
enum traverse_state {
    TRAVERSE_NONE = 0,
    TRAVERSE_PUNCH,  /* hole punching asked of the rendezvous */
    TRAVERSE_RELAY,  /* a relay asked of the rendezvous */
    TRAVERSE_DONE,   /* a connection made by traversal is attached */
    TRAVERSE_FAILED, /* nothing worked; tried again with the next direct attempt */
};

struct candidate {
    struct sockaddr_storage addr;
    struct sockaddr_storage via; /* the DHT node that gave it (its rendezvous), or family 0 */
    uint8_t pex_from[20];        /* node id of the peer whose pex named it (a rendezvous too) */
    int has_pex_from;
    uint64_t next_try; /* 0: never tried */
    uint64_t tried_at; /* when the last direct attempt started */
    unsigned failures;
    int connected;
    int traverse;         /* enum traverse_state */
    uint64_t traverse_at; /* when the running traversal was asked for */
};

/* The leaf hashes of one piece of more than 2048 blocks (files over 32 GiB): asked of one peer
 * in parts of at most 2048, assembled here, checked once all are in. */
struct big_leaves {
    struct peer *peer; /* NULL: none being assembled */
    uint64_t piece, first, count, next, got;
    uint8_t *buf;
};

struct swarm {
    struct dg_swarms *s;
    struct swarm *next;
    uint8_t root[32];
    int known; /* the cache has the root's metadata */
    uint64_t length, nblocks, piece_size, per_piece, npieces;
    uint8_t *held; /* LSB-first bitmap of blocks held */
    uint64_t nheld;
    uint8_t *requested;    /* outstanding requests per block (0..2) */
    uint16_t *avail;       /* peers having each block */
    uint8_t *leaves_known; /* per piece */
    uint8_t *leaves_asked; /* per piece: a hash_request for its leaves is outstanding */
    struct dg_content *content;
    int pinned;
    int dirty;   /* pick again at the next loop turn */
    int endgame; /* every missing block is asked for: late ones go to a second peer */
    /* metadata being learned */
    enum meta_stage meta;
    struct peer *meta_peer;
    uint64_t meta_len;
    uint8_t *meta_layer;
    uint64_t meta_layer_count;
    uint8_t *meta_leaves;
    uint64_t meta_leaves_count;
    uint8_t meta_leaf[32];
    struct big_leaves big;
    struct peer *peers;
    size_t npeers;
    struct candidate cands[MAX_CANDIDATES];
    size_t ncands;
    struct lookup *lookups;
    uint64_t last_used, last_dht;
    unsigned dht_lookups;     /* started for this swarm */
    uint64_t last_read;       /* a reader read or waited here */
    uint64_t pause_until;     /* storing failed: no requests until then */
    uint64_t seq_end, window; /* read-ahead: where sequential reads went, and how far ahead */
    uint64_t ra_from, ra_to;
    uint64_t bytes_in, bytes_out;
    uint64_t next_choke, next_optimistic;
    struct peer *optimistic;
};

struct announce {
    uint8_t root[32];
    uint64_t due;
    struct announce *next;
};

/* An accepted connection before its handshake names a swarm. */
struct pending {
    struct dg_peer_conn *conn;
    struct pending *next;
};

struct ban {
    struct sockaddr_storage addr;
    struct ban *next;
};

struct dg_swarms {
    struct dg_swarms_config cfg;
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_timer_t timer;
    uv_check_t check;
    int handles;
    int stopping;
    void (*closed)(void *arg);
    void *closed_arg;
    uint16_t port;
    struct sockaddr_storage statics[MAX_STATIC_PEERS];
    size_t nstatics;
    struct swarm *swarms;
    struct pending *pending;
    size_t npending;
    struct ban *bans;
    struct announce *announces;
    struct dg_swarm_stats stats;
    uint8_t *buf; /* scratch for one message */
};

#define SCRATCH (DG_PEER_FRAME_MAX + 64)

static const struct dg_peer_conn_ops peer_ops;
static void drop_peer(struct peer *p);
static void swarm_dirty(struct swarm *sw);
static void big_reset(struct swarm *sw);
static void start_traverse(struct swarm *sw, struct candidate *cand, int relay);
static int ask_pex_rendezvous(struct swarm *sw, struct candidate *cand);
static int on_holepunch(struct peer *p, const struct dg_peer_msg *m);

static int bit_get(const uint8_t *bits, uint64_t i)
{
    return bits[i / 8] >> (i % 8) & 1;
}

static void bit_set(uint8_t *bits, uint64_t i)
{
    bits[i / 8] |= (uint8_t)(1u << (i % 8));
}

static uint64_t now_ms(const struct dg_swarms *s)
{
    return uv_now(s->loop);
}

/* ------------------------------------------------------------------ addresses and bans */

static int is_loopback(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
    if (a->ss_family == AF_INET6)
        return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)a)->sin6_addr);
    return 0;
}

static uint16_t addr_port(const struct sockaddr_storage *a)
{
    return a->ss_family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)a)->sin6_port)
                                    : ntohs(((const struct sockaddr_in *)a)->sin_port);
}

static int same_ip(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
               ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                  &((const struct sockaddr_in6 *)b)->sin6_addr, 16) == 0;
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    return same_ip(a, b) && addr_port(a) == addr_port(b);
}

static size_t sockaddr_len(const struct sockaddr *a)
{
    return a->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

/* Bans are per address; on loopback, where every node shares an address, per address and
 * listen port. */
static int is_banned(const struct dg_swarms *s, const struct sockaddr_storage *a)
{
    for (const struct ban *b = s->bans; b; b = b->next)
        if (is_loopback(a) ? same_addr(&b->addr, a) : same_ip(&b->addr, a))
            return 1;
    return 0;
}

static void format_addr(const struct sockaddr_storage *a, char *out, size_t size)
{
    char ip[INET6_ADDRSTRLEN] = "?";

    if (a->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)a)->sin_addr, ip, sizeof(ip));
    else if (a->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)a)->sin6_addr, ip, sizeof(ip));
    snprintf(out, size, a->ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, addr_port(a));
}

/* The address a peer is known by: where it listens if it said, else where it came from. */
static const struct sockaddr_storage *peer_addr(const struct peer *p)
{
    return p->listen.ss_family ? &p->listen : dg_peer_conn_addr(p->conn);
}

static void ban(struct dg_swarms *s, struct peer *bad, const char *why)
{
    char name[64];
    struct ban *b = calloc(1, sizeof(*b));
    const struct sockaddr_storage *a = peer_addr(bad);

    format_addr(a, name, sizeof(name));
    dg_log(DG_LOG_WARN, "swarm", "banning %s: %s", name, why);
    if (!b)
        return;
    b->addr = *a;
    b->next = s->bans;
    s->bans = b;
    s->stats.banned++;
    /* Every other connection to that address goes too. */
    for (struct swarm *sw = s->swarms; sw; sw = sw->next) {
        struct peer *p = sw->peers, *next;
        for (; p; p = next) {
            next = p->next;
            if (p != bad && is_banned(s, peer_addr(p)))
                dg_peer_conn_close(p->conn, DG_PEER_CLOSE_BAD_DATA);
        }
    }
}

static int parse_one_peer(const char *s, size_t len, struct sockaddr_storage *out)
{
    char host[64];
    const char *colon;
    char *end;
    unsigned long port;

    if (len == 0 || len >= sizeof(host))
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    if (s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (!close || close + 1 >= s + len || close[1] != ':')
            return -EINVAL;
        memcpy(host, s + 1, (size_t)(close - s - 1));
        host[close - s - 1] = '\0';
        colon = close + 1;
    } else {
        colon = memrchr(s, ':', len);
        if (!colon)
            return -EINVAL;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = '\0';
    }
    char portbuf[8];
    size_t plen = (size_t)(s + len - colon - 1);
    if (plen == 0 || plen >= sizeof(portbuf))
        return -EINVAL;
    memcpy(portbuf, colon + 1, plen);
    portbuf[plen] = '\0';
    if (strspn(portbuf, "0123456789") != plen)
        return -EINVAL;
    port = strtoul(portbuf, &end, 10);
    if (port == 0 || port > 65535)
        return -EINVAL;
    if (s[0] == '[') {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
            return -EINVAL;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)out;
        if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
            return -EINVAL;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
    }
    return 0;
}

int dg_swarms_parse_peers(const char *s, struct sockaddr_storage *out, size_t max)
{
    int n = 0;

    if (!s || !*s)
        return -EINVAL;
    for (;;) {
        const char *plus = strchr(s, '+');
        size_t len = plus ? (size_t)(plus - s) : strlen(s);
        struct sockaddr_storage a;
        if (parse_one_peer(s, len, &a) < 0)
            return -EINVAL;
        if ((size_t)n < max)
            out[n] = a;
        n++;
        if (!plus)
            return n;
        s = plus + 1;
    }
}

/* ------------------------------------------------------------------ sending */

/* Sends a message to @p p. Before our hello (an outgoing connection whose handshake has not
 * been answered yet) nothing goes out: the opening's holdings will say it all. */
static void send_buf(struct peer *p, const uint8_t *buf, int len)
{
    if (len > 0 && p->opened)
        dg_peer_conn_send(p->conn, buf, (size_t)len);
}

static void send_simple(struct peer *p, int (*enc)(uint8_t *, size_t))
{
    uint8_t b[8];
    send_buf(p, b, enc(b, sizeof(b)));
}

static void send_hello(struct peer *p)
{
    struct swarm *sw = p->sw;
    struct dg_peer_hello h = {0};
    uint8_t payload[256], msg[300];
    const struct sockaddr_storage *a = dg_peer_conn_addr(p->conn);
    static const char version[] = "digfs " DIGFS_VERSION;
    int n;

    memcpy(h.root, sw->root, 32);
    if (sw->known) {
        h.has_len = 1;
        h.len = sw->length;
    }
    if (sw->s->port) {
        h.has_port = 1;
        h.port = sw->s->port;
    }
    h.has_pex = 1;
    h.pex = 1;
    if (sw->s->cfg.host.nat_class) {
        h.has_nat = 1;
        h.nat = (uint8_t)sw->s->cfg.host.nat_class(sw->s->cfg.host.arg);
    }
    h.has_reqq = 1;
    h.reqq = DG_SWARM_REQQ;
    h.has_v = 1;
    h.v_len = strlen(version) < DG_PEER_VERSION_MAX ? strlen(version) : DG_PEER_VERSION_MAX;
    memcpy(h.v, version, h.v_len);
    if (a->ss_family == AF_INET) {
        h.has_yourip = 1;
        h.yourip_len = 4;
        memcpy(h.yourip, &((const struct sockaddr_in *)a)->sin_addr, 4);
    } else if (a->ss_family == AF_INET6) {
        h.has_yourip = 1;
        h.yourip_len = 16;
        memcpy(h.yourip, &((const struct sockaddr_in6 *)a)->sin6_addr, 16);
    }
    n = dg_peer_hello_encode(&h, payload, sizeof(payload));
    if (n > 0)
        send_buf(p, msg, dg_peer_msg_hello(payload, (size_t)n, msg, sizeof(msg)));
}

/* Tells @p p what we hold: have_all, have_none or bitfields. */
static void send_holdings(struct peer *p)
{
    struct swarm *sw = p->sw;
    struct dg_swarms *s = sw->s;

    if (!sw->known || sw->nheld == 0) {
        send_simple(p, dg_peer_msg_have_none);
        return;
    }
    if (sw->nheld == sw->nblocks) {
        send_simple(p, dg_peer_msg_have_all);
        return;
    }
    /* The wire is MSB first, the bitmap LSB first. */
    uint64_t per_msg = 8ull * DG_PEER_BITFIELD_MAX_BYTES;
    for (uint64_t first = 0; first < sw->nblocks; first += per_msg) {
        uint64_t n = sw->nblocks - first < per_msg ? sw->nblocks - first : per_msg;
        uint8_t *bits = calloc((size_t)((n + 7) / 8), 1);
        if (!bits)
            return;
        for (uint64_t i = 0; i < n; i++)
            if (bit_get(sw->held, first + i))
                bits[i / 8] |= (uint8_t)(0x80u >> (i % 8));
        send_buf(p, s->buf, dg_peer_msg_bitfield((uint32_t)first, bits, n, s->buf, SCRATCH));
        free(bits);
    }
}

static void send_interest(struct peer *p, int on)
{
    if (p->interesting == on)
        return;
    p->interesting = on;
    send_simple(p, on ? dg_peer_msg_interested : dg_peer_msg_not_interested);
}

static void set_choke(struct peer *p, int choke)
{
    if (p->choking == choke)
        return;
    p->choking = choke;
    send_simple(p, choke ? dg_peer_msg_choke : dg_peer_msg_unchoke);
    if (choke) {
        /* Its queued requests are refused. */
        uint8_t b[16];
        while (p->serve_len > 0) {
            send_buf(p, b, dg_peer_msg_reject(p->serve[p->serve_head], b, sizeof(b)));
            p->serve_head = (p->serve_head + 1) % DG_SWARM_REQQ;
            p->serve_len--;
        }
    }
}

/* ------------------------------------------------------------------ swarm state */

static void account(struct peer *p)
{
    uint64_t in = dg_peer_conn_bytes_in(p->conn), out = dg_peer_conn_bytes_out(p->conn);

    p->sw->bytes_in += in - p->accounted_in;
    p->sw->s->stats.bytes_in += in - p->accounted_in;
    p->sw->bytes_out += out - p->accounted_out;
    p->sw->s->stats.bytes_out += out - p->accounted_out;
    p->accounted_in = in;
    p->accounted_out = out;
}

static struct swarm *find_swarm(struct dg_swarms *s, const uint8_t *key, size_t keylen)
{
    for (struct swarm *sw = s->swarms; sw; sw = sw->next)
        if (memcmp(sw->root, key, keylen) == 0)
            return sw;
    return NULL;
}

/* Sets up the per-block state once the metadata is known. @return 0 or -ENOMEM. */
static int swarm_known(struct swarm *sw, const struct dg_root_info *info)
{
    struct dg_swarms *s = sw->s;

    sw->length = info->length;
    sw->nblocks = info->blocks_total;
    sw->piece_size = info->piece_size;
    sw->per_piece = info->piece_size / DG_MERKLE_BLOCK_SIZE;
    sw->npieces = dg_merkle_piece_count(info->length);
    size_t bits = (size_t)((sw->nblocks + 7) / 8) + 1, pbits = (size_t)((sw->npieces + 7) / 8) + 1;
    sw->held = calloc(bits, 1);
    sw->requested = calloc((size_t)sw->nblocks + 1, 1);
    sw->avail = calloc((size_t)sw->nblocks + 1, sizeof(*sw->avail));
    sw->leaves_known = calloc(pbits, 1);
    sw->leaves_asked = calloc(pbits, 1);
    if (!sw->held || !sw->requested || !sw->avail || !sw->leaves_known || !sw->leaves_asked)
        return -ENOMEM;
    sw->nheld = 0;
    if (info->shared_files > 0) {
        memset(sw->held, 0xff, bits);
        sw->nheld = sw->nblocks;
        memset(sw->leaves_known, 0xff, pbits);
    } else if (sw->nblocks > 0 &&
               dg_piece_cache_held_bits(s->cfg.cache, sw->root, sw->held, sw->nblocks) == 0) {
        for (uint64_t b = 0; b < sw->nblocks; b++)
            sw->nheld += bit_get(sw->held, b);
    }
    if (sw->per_piece == 1) {
        memset(sw->leaves_known, 0xff, pbits);
    } else if (sw->nheld < sw->nblocks) {
        uint8_t *leaves = malloc((size_t)sw->per_piece * 32);
        uint64_t n;
        for (uint64_t piece = 0; leaves && piece < sw->npieces; piece++)
            if (dg_piece_cache_leaves(s->cfg.cache, sw->root, piece, leaves, sw->per_piece, &n) ==
                0)
                bit_set(sw->leaves_known, piece);
        free(leaves);
    }
    /* What connected peers said they hold before the length was known. */
    for (struct peer *p = sw->peers; p; p = p->next) {
        for (uint64_t b = 0; b < sw->nblocks; b++)
            if ((p->have_all || (p->have && b < p->nblocks && bit_get(p->have, b))) &&
                sw->avail[b] < UINT16_MAX)
                sw->avail[b]++;
    }
    sw->known = 1;
    if (!sw->content)
        s->cfg.host.open(s->cfg.host.arg, sw->root, &sw->content);
    return 0;
}

static void finish_lookups(struct swarm *sw, int status)
{
    struct lookup *l = sw->lookups;

    sw->lookups = NULL;
    while (l) {
        struct lookup *next = l->next;
        l->cb(l->arg, status);
        free(l);
        l = next;
    }
}

static void add_candidate(struct swarm *sw, const struct sockaddr_storage *a,
                          const struct sockaddr *via, const uint8_t *pex_from)
{
    struct dg_swarms *s = sw->s;

    if (addr_port(a) == 0 || is_banned(s, a))
        return;
    if (is_loopback(a) && addr_port(a) == s->port)
        return; /* ourselves */
    for (size_t i = 0; i < sw->ncands; i++) {
        if (same_addr(&sw->cands[i].addr, a)) {
            if (via && !sw->cands[i].via.ss_family)
                memcpy(&sw->cands[i].via, via, sockaddr_len(via));
            if (pex_from) {
                memcpy(sw->cands[i].pex_from, pex_from, 20);
                sw->cands[i].has_pex_from = 1;
            }
            return;
        }
    }
    if (sw->ncands == MAX_CANDIDATES) {
        /* Forget the one that failed most. */
        size_t worst = 0;
        for (size_t i = 1; i < sw->ncands; i++)
            if (!sw->cands[i].connected && sw->cands[i].failures > sw->cands[worst].failures)
                worst = i;
        if (sw->cands[worst].connected || sw->cands[worst].failures == 0)
            return;
        sw->cands[worst] = sw->cands[--sw->ncands];
    }
    memset(&sw->cands[sw->ncands], 0, sizeof(sw->cands[0]));
    if (via)
        memcpy(&sw->cands[sw->ncands].via, via, sockaddr_len(via));
    if (pex_from) {
        memcpy(sw->cands[sw->ncands].pex_from, pex_from, 20);
        sw->cands[sw->ncands].has_pex_from = 1;
    }
    sw->cands[sw->ncands++].addr = *a;
    swarm_dirty(sw);
}

static struct candidate *candidate_of(struct swarm *sw, const struct sockaddr_storage *a)
{
    for (size_t i = 0; i < sw->ncands; i++)
        if (same_addr(&sw->cands[i].addr, a))
            return &sw->cands[i];
    return NULL;
}

static struct swarm *swarm_new(struct dg_swarms *s, const uint8_t root[32])
{
    struct swarm *sw = calloc(1, sizeof(*sw));
    struct dg_root_info info;

    if (!sw)
        return NULL;
    sw->s = s;
    memcpy(sw->root, root, 32);
    sw->last_used = now_ms(s);
    sw->next_choke = now_ms(s) + CHOKE_ROUND_MS;
    if (dg_piece_cache_root_info(s->cfg.cache, root, &info) == 0) {
        if (swarm_known(sw, &info) < 0) {
            free(sw->held);
            free(sw->requested);
            free(sw->avail);
            free(sw->leaves_known);
            free(sw->leaves_asked);
            if (sw->content)
                dg_content_unref(sw->content);
            free(sw);
            return NULL;
        }
        sw->pinned = (info.flags & DG_ROOT_PINNED) != 0;
    }
    for (size_t i = 0; i < s->nstatics; i++)
        add_candidate(sw, &s->statics[i], NULL, NULL);
    sw->next = s->swarms;
    s->swarms = sw;
    s->stats.swarms++;
    return sw;
}

static void swarm_free(struct swarm *sw)
{
    struct dg_swarms *s = sw->s;

    while (sw->peers)
        dg_peer_conn_close(sw->peers->conn, DG_PEER_CLOSE_LOCAL); /* unlinks it */
    finish_lookups(sw, -ESHUTDOWN);
    for (struct swarm **pp = &s->swarms; *pp; pp = &(*pp)->next) {
        if (*pp == sw) {
            *pp = sw->next;
            break;
        }
    }
    s->stats.swarms--;
    if (sw->content)
        dg_content_unref(sw->content);
    free(sw->held);
    free(sw->requested);
    free(sw->avail);
    free(sw->leaves_known);
    free(sw->leaves_asked);
    free(sw->meta_layer);
    free(sw->meta_leaves);
    big_reset(sw);
    free(sw);
}

static void swarm_dirty(struct swarm *sw)
{
    sw->dirty = 1;
}

/* Starts a DHT lookup for a wanted root when it is due. */
static void maybe_dht(struct swarm *sw, int urgent)
{
    struct dg_swarms *s = sw->s;
    uint64_t now = now_ms(s);
    uint64_t gap = urgent ? DHT_RETRY_MS : DHT_REFRESH_MS;

    /* The first retry comes soon: right after a file is shared, its announce may still be
     * on its way when the first lookup asks. */
    if (urgent && sw->dht_lookups == 1)
        gap = DHT_FIRST_RETRY_MS;
    if (sw->last_dht && now - sw->last_dht < gap)
        return;
    sw->last_dht = now;
    sw->dht_lookups++;
    if (s->cfg.host.lan_search)
        s->cfg.host.lan_search(s->cfg.host.arg, sw->root);
    if (!s->cfg.host.dht_lookup)
        return;
    s->cfg.host.dht_lookup(s->cfg.host.arg, sw->root, 0);
}

/* ------------------------------------------------------------------ metadata */

static void meta_reset(struct swarm *sw)
{
    if (!sw->known)
        big_reset(sw);
    sw->meta = 0;
    sw->meta_peer = NULL;
    free(sw->meta_layer);
    free(sw->meta_leaves);
    sw->meta_layer = sw->meta_leaves = NULL;
    sw->meta_layer_count = sw->meta_leaves_count = 0;
}

static void send_hash_request(struct peer *p, uint8_t layer, uint32_t index, uint32_t count)
{
    uint8_t b[32];

    if (p->nhreqs == MAX_HASH_OUT)
        return;
    p->hreqs[p->nhreqs].layer = layer;
    p->hreqs[p->nhreqs].index = index;
    p->hreqs[p->nhreqs].count = count;
    p->hreqs[p->nhreqs].sent_at = now_ms(p->sw->s);
    if (!p->asked_at)
        p->asked_at = now_ms(p->sw->s);
    p->nhreqs++;
    send_buf(p, b, dg_peer_msg_hash_request(layer, index, count, 0, b, sizeof(b)));
}

static void big_reset(struct swarm *sw)
{
    free(sw->big.buf);
    memset(&sw->big, 0, sizeof(sw->big));
}

/* Sends the next parts of the big piece being assembled, as far as @p p has room. */
static void big_pump(struct swarm *sw)
{
    struct peer *p = sw->big.peer;

    while (p && sw->big.next < sw->big.count && p->nhreqs < MAX_HASH_OUT) {
        uint64_t n = sw->big.count - sw->big.next;
        if (n > DG_PEER_HASH_MAX_COUNT)
            n = DG_PEER_HASH_MAX_COUNT;
        send_hash_request(p, 0, (uint32_t)(sw->big.first + sw->big.next), (uint32_t)n);
        sw->big.next += n;
    }
}

/* Starts assembling the leaves of @p piece (of @p length's geometry) from @p p.
 * @return 0 or -ENOMEM. */
static int big_start(struct swarm *sw, struct peer *p, uint64_t length, uint64_t piece)
{
    uint64_t per_piece = dg_merkle_piece_size(length) / DG_MERKLE_BLOCK_SIZE;
    uint64_t blocks = dg_merkle_block_count(length);

    big_reset(sw);
    sw->big.first = piece * per_piece;
    sw->big.count = blocks - sw->big.first < per_piece ? blocks - sw->big.first : per_piece;
    sw->big.buf = malloc((size_t)sw->big.count * 32);
    if (!sw->big.buf)
        return -ENOMEM;
    sw->big.peer = p;
    sw->big.piece = piece;
    big_pump(sw);
    return 0;
}

/* Takes a `hashes` part of the big piece. @return 1 when every leaf is in, 0 when more are
 * coming, -1 when @p m is not a part of it. */
static int big_take(struct swarm *sw, struct peer *p, const struct dg_peer_msg *m)
{
    if (p != sw->big.peer || m->layer != 0 || m->index < sw->big.first ||
        (uint64_t)m->index + m->count > sw->big.first + sw->big.count)
        return -1;
    memcpy(sw->big.buf + 32 * (m->index - sw->big.first), m->data, 32u * m->count);
    sw->big.got += m->count;
    big_pump(sw);
    return sw->big.got == sw->big.count;
}

/* Forgets our hash request @p i to @p p; leaves it asked for can be asked of others. */
static void drop_hash_request(struct peer *p, unsigned i, int failed)
{
    struct swarm *sw = p->sw;
    struct hash_req r = p->hreqs[i];

    p->hreqs[i] = p->hreqs[--p->nhreqs];
    if (failed && p == sw->big.peer && r.layer == 0 && r.index >= sw->big.first &&
        r.index < sw->big.first + sw->big.count)
        big_reset(sw); /* a part went missing: the piece starts over, maybe elsewhere */
    if (sw->known && r.layer == 0) {
        for (uint64_t piece = r.index / sw->per_piece;
             piece * sw->per_piece < (uint64_t)r.index + r.count && piece < sw->npieces; piece++)
            sw->leaves_asked[piece / 8] &= (uint8_t) ~(1u << (piece % 8));
    }
}

static void send_request(struct peer *p, uint32_t block)
{
    uint8_t b[16];

    if (p->nreqs == p->reqs_cap) {
        size_t cap = p->reqs_cap ? 2 * p->reqs_cap : 64;
        struct request *r = realloc(p->reqs, cap * sizeof(*r));
        if (!r)
            return;
        p->reqs = r;
        p->reqs_cap = cap;
    }
    p->reqs[p->nreqs].block = block;
    p->reqs[p->nreqs].sent_at = now_ms(p->sw->s);
    p->nreqs++;
    if (!p->asked_at)
        p->asked_at = now_ms(p->sw->s);
    if (p->sw->known && block < p->sw->nblocks && p->sw->requested[block] < 255)
        p->sw->requested[block]++;
    send_buf(p, b, dg_peer_msg_request(block, b, sizeof(b)));
}

/* Removes @p block from @p p's outstanding requests. @return 1 if it was there. */
static int take_request(struct peer *p, uint32_t block)
{
    for (size_t i = 0; i < p->nreqs; i++) {
        if (p->reqs[i].block == block) {
            p->reqs[i] = p->reqs[--p->nreqs];
            if (p->sw->known && block < p->sw->nblocks && p->sw->requested[block] > 0)
                p->sw->requested[block]--;
            return 1;
        }
    }
    return 0;
}

static int peer_has(const struct peer *p, uint64_t block)
{
    if (p->have_all)
        return 1;
    return p->have && block < p->nblocks && bit_get(p->have, block);
}

/* Drives the metadata of an unknown root one step: asks the next peer that can answer. */
static void meta_step(struct swarm *sw)
{
    struct peer *p;

    if (sw->known || sw->meta)
        return;
    for (p = sw->peers; p; p = p->next)
        if (p->got_hello && p->has_len && !p->meta_failed && p->len > 0)
            break;
    if (!p)
        return;
    sw->meta_peer = p;
    sw->meta_len = p->len;
    uint64_t pieces = dg_merkle_piece_count(p->len);
    if (pieces == 1) {
        /* A one-piece file: its layer is the root itself. */
        sw->meta_layer = malloc(32);
        if (!sw->meta_layer)
            return;
        memcpy(sw->meta_layer, sw->root, 32);
        sw->meta_layer_count = 1;
        sw->meta = META_LEAVES;
        if (dg_merkle_piece_size(p->len) == DG_MERKLE_BLOCK_SIZE) {
            memcpy(sw->meta_leaf, sw->root, 32);
            sw->meta = META_BLOCK;
        } else {
            uint64_t blocks = dg_merkle_block_count(p->len);
            send_hash_request(p, 0, 0, (uint32_t)blocks);
            return;
        }
    } else {
        sw->meta = META_LAYER;
        unsigned level = 0;
        while ((DG_MERKLE_BLOCK_SIZE << level) < dg_merkle_piece_size(p->len))
            level++;
        send_hash_request(p, (uint8_t)level, 0, (uint32_t)pieces);
        return;
    }
    if (!p->choked_by)
        send_request(p, (uint32_t)(dg_merkle_block_count(p->len) - 1));
}

/* The metadata peer failed us (timeout, gone, refusal): the next one is asked. */
static void meta_failed(struct swarm *sw, struct peer *p)
{
    if (p)
        p->meta_failed = 1;
    meta_reset(sw);
    swarm_dirty(sw);
}

static void meta_commit(struct swarm *sw, const uint8_t *block, size_t len)
{
    struct dg_swarms *s = sw->s;
    struct dg_piece_cache *c = s->cfg.cache;
    struct dg_root_info info;
    uint64_t last_block = dg_merkle_block_count(sw->meta_len) - 1;
    int rc;

    rc = dg_piece_cache_add_root(c, sw->root, sw->meta_len, sw->meta_layer, sw->meta_layer_count);
    if (rc == 0 && sw->meta_leaves)
        rc = dg_piece_cache_put_leaves(c, sw->root, sw->meta_layer_count - 1, sw->meta_leaves,
                                       sw->meta_leaves_count);
    s->cfg.host.commit(s->cfg.host.arg); /* put_block reads the root's record */
    if (rc == 0)
        rc = dg_piece_cache_put_block(c, sw->root, last_block, block, len);
    if (rc == 0)
        rc = dg_piece_cache_root_info(c, sw->root, &info);
    if (rc == 0)
        rc = swarm_known(sw, &info);
    meta_reset(sw);
    if (rc < 0) {
        char hex[DG_ROOT_HEX_LEN + 1];
        dg_root_format(sw->root, hex);
        dg_log(DG_LOG_WARN, "swarm", "cannot record %s: %s", hex, strerror(-rc));
        finish_lookups(sw, rc == -ENOSPC ? -ENOSPC : -EIO);
        return;
    }
    s->stats.blocks_in++;
    finish_lookups(sw, 0);
    s->cfg.host.stored(s->cfg.host.arg, sw->root, UINT64_MAX);
    /* Tell the peers what we know now. */
    for (struct peer *p = sw->peers; p; p = p->next) {
        if (p->has_len && p->len != sw->length) {
            dg_peer_conn_close(p->conn, DG_PEER_CLOSE_PROTOCOL);
            continue;
        }
        uint8_t b[16];
        send_buf(p, b, dg_peer_msg_have((uint32_t)last_block, 1, b, sizeof(b)));
    }
    swarm_dirty(sw);
}

/* A `hashes` answer while learning the metadata. @return 0 or a close reason. */
static int meta_hashes(struct swarm *sw, struct peer *p, const struct dg_peer_msg *m)
{
    if (p != sw->meta_peer)
        return 0;
    if (sw->meta == META_LAYER) {
        if (dg_merkle_verify_layer(sw->root, sw->meta_len, m->data, m->count) != 0) {
            ban(sw->s, p, "piece layer does not match the root");
            meta_reset(sw);
            return DG_PEER_CLOSE_BAD_DATA;
        }
        sw->meta_layer = malloc(32u * m->count);
        if (!sw->meta_layer)
            return DG_PEER_CLOSE_LOCAL;
        memcpy(sw->meta_layer, m->data, 32u * m->count);
        sw->meta_layer_count = m->count;
        uint64_t blocks = dg_merkle_block_count(sw->meta_len);
        uint64_t per_piece = dg_merkle_piece_size(sw->meta_len) / DG_MERKLE_BLOCK_SIZE;
        if (per_piece == 1) {
            memcpy(sw->meta_leaf, m->data + 32u * (m->count - 1), 32);
            sw->meta = META_BLOCK;
            if (!p->choked_by)
                send_request(p, (uint32_t)(blocks - 1));
        } else {
            uint64_t first = (sw->meta_layer_count - 1) * per_piece;
            sw->meta = META_LEAVES;
            if (blocks - first > DG_PEER_HASH_MAX_COUNT) {
                if (big_start(sw, p, sw->meta_len, sw->meta_layer_count - 1) < 0)
                    return DG_PEER_CLOSE_LOCAL;
            } else {
                send_hash_request(p, 0, (uint32_t)first, (uint32_t)(blocks - first));
            }
        }
        return 0;
    }
    if (sw->meta == META_LEAVES) {
        uint64_t per_piece = dg_merkle_piece_size(sw->meta_len) / DG_MERKLE_BLOCK_SIZE;
        uint8_t top[32];
        struct dg_peer_msg whole = *m;
        if (sw->big.peer) {
            int done = big_take(sw, p, m);
            if (done < 0)
                return DG_PEER_CLOSE_PROTOCOL;
            if (done == 0)
                return 0;
            whole.data = sw->big.buf; /* all of the last piece's leaves */
            whole.count = (uint32_t)sw->big.count;
            m = &whole;
        }
        if (dg_merkle_subtree_root(m->data, m->count, 0, per_piece, top) != 0 ||
            memcmp(top, sw->meta_layer + 32 * (sw->meta_layer_count - 1), 32) != 0) {
            ban(sw->s, p, "leaf hashes do not match the piece layer");
            meta_reset(sw);
            return DG_PEER_CLOSE_BAD_DATA;
        }
        sw->meta_leaves = malloc(32u * m->count);
        if (!sw->meta_leaves)
            return DG_PEER_CLOSE_LOCAL;
        memcpy(sw->meta_leaves, m->data, 32u * m->count);
        sw->meta_leaves_count = m->count;
        memcpy(sw->meta_leaf, m->data + 32u * (m->count - 1), 32);
        big_reset(sw);
        sw->meta = META_BLOCK;
        if (!p->choked_by)
            send_request(p, (uint32_t)(dg_merkle_block_count(sw->meta_len) - 1));
    }
    return 0;
}

/* ------------------------------------------------------------------ picking */

struct pick_ctx {
    struct swarm *sw;
    uint64_t now;
};

/* The peer to ask for @p block: it has it, does not choke us, has room, and is not asked for
 * it already; the least loaded for its speed. */
static struct peer *best_peer(struct swarm *sw, uint64_t block)
{
    struct peer *best = NULL;
    uint64_t best_score = UINT64_MAX;

    for (struct peer *p = sw->peers; p; p = p->next) {
        if (!p->got_hello || p->choked_by || p->nreqs >= p->target || !peer_has(p, block))
            continue;
        int asked = 0;
        for (size_t i = 0; i < p->nreqs && !asked; i++)
            asked = p->reqs[i].block == block;
        if (asked)
            continue;
        /* Outstanding requests per unit of speed: fast peers take more. */
        uint64_t score = ((uint64_t)p->nreqs << 20) / (p->rate_in / 16384 + 1);
        if (score < best_score) {
            best = p;
            best_score = score;
        }
    }
    return best;
}

/* Makes sure the leaf hashes of @p piece are on their way, with those of the pieces after it
 * that are not known or asked yet, in one request. */
static void want_leaves(struct swarm *sw, uint64_t piece)
{
    if (bit_get(sw->leaves_asked, piece))
        return;
    uint64_t first = piece * sw->per_piece;
    if (sw->per_piece > DG_PEER_HASH_MAX_COUNT) {
        /* Over 2048 leaves: one piece at a time, in parts, from one peer. */
        if (sw->big.peer)
            return;
        for (struct peer *p = sw->peers; p; p = p->next) {
            if (p->got_hello && p->nhreqs == 0 && peer_has(p, first)) {
                if (big_start(sw, p, sw->length, piece) == 0)
                    bit_set(sw->leaves_asked, piece);
                return;
            }
        }
        return;
    }
    for (struct peer *p = sw->peers; p; p = p->next) {
        if (!p->got_hello || p->nhreqs == MAX_HASH_OUT || !peer_has(p, first))
            continue;
        uint64_t end = piece;
        while (end < sw->npieces && (end - piece + 1) * sw->per_piece <= LEAVES_PER_REQUEST &&
               !bit_get(sw->leaves_known, end) && !bit_get(sw->leaves_asked, end))
            bit_set(sw->leaves_asked, end++);
        uint64_t last = end * sw->per_piece < sw->nblocks ? end * sw->per_piece : sw->nblocks;
        uint64_t count = last - first;
        if (count > DG_PEER_HASH_MAX_COUNT)
            count = DG_PEER_HASH_MAX_COUNT; /* a piece of a file over 32 GiB: its first part */
        send_hash_request(p, 0, (uint32_t)first, (uint32_t)count);
        return;
    }
}

/* Asks for @p block if it is missing and a peer can take it. @return 0 when no peer has room
 * left at all (the caller may stop), else 1. */
static int pick_block(struct swarm *sw, uint64_t block, int urgent, uint64_t now)
{
    if (block >= sw->nblocks || bit_get(sw->held, block))
        return 1;
    uint64_t piece = block / sw->per_piece;
    if (!bit_get(sw->leaves_known, piece)) {
        want_leaves(sw, piece);
        return 1;
    }
    if (sw->requested[block] > 0) {
        /* Endgame: a late block a reader waits for, or any late block once every missing
         * block is asked for, is also asked of another peer. */
        if (!(urgent || sw->endgame) || sw->requested[block] >= 2)
            return 1;
        int late = 1;
        for (struct peer *p = sw->peers; p && late; p = p->next)
            for (size_t i = 0; i < p->nreqs; i++)
                if (p->reqs[i].block == block && now - p->reqs[i].sent_at < URGENT_DUP_MS)
                    late = 0;
        if (!late)
            return 1;
    }
    struct peer *p = best_peer(sw, block);
    if (p)
        send_request(p, (uint32_t)block);
    return 1;
}

static void pick_range(struct swarm *sw, uint64_t off, uint64_t len, int urgent, uint64_t now)
{
    if (len == 0 || off >= sw->length)
        return;
    uint64_t end = off + len > sw->length ? sw->length : off + len;
    for (uint64_t b = off / DG_MERKLE_BLOCK_SIZE; b <= (end - 1) / DG_MERKLE_BLOCK_SIZE; b++)
        pick_block(sw, b, urgent, now);
}

static void pick_wanted(void *ctx, uint64_t off, uint64_t len)
{
    struct pick_ctx *pc = ctx;
    pick_range(pc->sw, off, len, 1, pc->now);
}

/* Whether any peer could take another request. */
static int room_left(const struct swarm *sw)
{
    for (const struct peer *p = sw->peers; p; p = p->next)
        if (p->got_hello && !p->choked_by && p->nreqs < p->target)
            return 1;
    return 0;
}

/* Background fetching of a pinned root: missing blocks, rarest first. */
static void pick_rarest(struct swarm *sw, uint64_t now)
{
    unsigned rarest = UINT16_MAX + 1u, commonest = 0;

    if (sw->endgame) {
        /* Everything missing is asked for: late blocks go to a second peer. */
        for (uint64_t b = 0; b < sw->nblocks && room_left(sw); b++)
            if (!bit_get(sw->held, b) && sw->requested[b] == 1)
                pick_block(sw, b, 0, now);
        return;
    }

    for (uint64_t b = 0; b < sw->nblocks; b++) {
        if (bit_get(sw->held, b) || sw->requested[b] || sw->avail[b] == 0)
            continue;
        if (sw->avail[b] < rarest)
            rarest = sw->avail[b];
        if (sw->avail[b] > commonest)
            commonest = sw->avail[b];
    }
    /* Blocks held by fewest peers first, then the next level, while peers have room. */
    for (unsigned level = rarest; level <= commonest && room_left(sw); level++)
        for (uint64_t b = 0; b < sw->nblocks && room_left(sw); b++)
            if (sw->avail[b] == level && !sw->requested[b])
                pick_block(sw, b, 0, now);
}

static void pick(struct swarm *sw)
{
    struct dg_swarms *s = sw->s;
    struct pick_ctx pc = {sw, now_ms(s)};

    sw->dirty = 0;
    if (pc.now < sw->pause_until)
        return; /* the tick marks it dirty again */
    if (!sw->known) {
        meta_step(sw);
        return;
    }
    if (sw->nheld == sw->nblocks)
        return;
    uint64_t outstanding = 0;
    for (struct peer *p = sw->peers; p; p = p->next)
        outstanding += p->nreqs;
    sw->endgame = sw->nblocks - sw->nheld <= outstanding;
    s->cfg.host.each_wanted(s->cfg.host.arg, sw->root, pick_wanted, &pc);
    if (sw->ra_to > sw->ra_from && room_left(sw))
        pick_range(sw, sw->ra_from, sw->ra_to - sw->ra_from, 0, pc.now);
    if (sw->pinned && room_left(sw))
        pick_rarest(sw, pc.now);
}

static void on_check(uv_check_t *h)
{
    struct dg_swarms *s = h->data;

    for (struct swarm *sw = s->swarms; sw; sw = sw->next)
        if (sw->dirty)
            pick(sw);
}

/* ------------------------------------------------------------------ serving */

static void serve(struct peer *p)
{
    struct swarm *sw = p->sw;
    struct dg_swarms *s = sw->s;

    while (p->serve_len > 0 && dg_peer_conn_queued(p->conn) < SERVE_QUEUE_BYTES) {
        uint32_t block = p->serve[p->serve_head];
        p->serve_head = (p->serve_head + 1) % DG_SWARM_REQQ;
        p->serve_len--;
        size_t len = dg_peer_block_size(sw->length, block);
        uint8_t *out = s->buf;
        ssize_t got = -EAGAIN;
        if (sw->content && len > 0 && block < sw->nblocks && bit_get(sw->held, block))
            got = dg_content_read(sw->content, out + DG_PEER_BLOCK_HEADER_LEN, len,
                                  (uint64_t)block * DG_MERKLE_BLOCK_SIZE);
        if (got != (ssize_t)len) {
            uint8_t b[16];
            send_buf(p, b, dg_peer_msg_reject(block, b, sizeof(b)));
            continue;
        }
        dg_peer_msg_block_header(block, len, out);
        send_buf(p, out, (int)(DG_PEER_BLOCK_HEADER_LEN + len));
        p->gave_recent += len;
        s->stats.blocks_out++;
    }
    account(p);
}

/* The leaf hashes of blocks [first, first + count): from the cache, or hashed from the
 * content (a shared file keeps only its piece layer). @return 0 or -errno. */
static int leaf_range(struct swarm *sw, uint64_t first, uint64_t count, uint8_t *out)
{
    struct dg_swarms *s = sw->s;
    uint8_t *leaves = malloc(32u * sw->per_piece);
    int rc = 0;

    if (!leaves)
        return -ENOMEM;
    for (uint64_t piece = first / sw->per_piece; rc == 0 && piece * sw->per_piece < first + count;
         piece++) {
        uint64_t start = piece * sw->per_piece, got = 0;
        uint64_t in_piece =
            sw->nblocks - start < sw->per_piece ? sw->nblocks - start : sw->per_piece;
        rc = dg_piece_cache_leaves(s->cfg.cache, sw->root, piece, leaves, in_piece, &got);
        if (rc == -ENODATA && sw->content) {
            rc = 0;
            for (got = 0; got < in_piece && rc == 0; got++) {
                size_t len = dg_peer_block_size(sw->length, (uint32_t)(start + got));
                if (dg_content_read(sw->content, s->buf, len,
                                    (start + got) * DG_MERKLE_BLOCK_SIZE) != (ssize_t)len)
                    rc = -EIO;
                else
                    rc = dg_merkle_sha256(s->buf, len, leaves + 32 * got);
            }
            /* Kept (checked against the piece layer), so the next request costs nothing. */
            if (rc == 0) {
                s->cfg.host.batch(s->cfg.host.arg);
                dg_piece_cache_put_leaves(s->cfg.cache, sw->root, piece, leaves, in_piece);
            }
        }
        if (rc == 0 && got != in_piece)
            rc = -EIO;
        /* The part of this piece inside the range. */
        uint64_t from = first > start ? first : start;
        uint64_t to = first + count < start + in_piece ? first + count : start + in_piece;
        if (rc == 0)
            memcpy(out + 32 * (from - first), leaves + 32 * (from - start), 32 * (to - from));
    }
    free(leaves);
    return rc;
}

/* Answers a hash_request: the piece layer, or leaves of any blocks. */
static void serve_hashes(struct peer *p, const struct dg_peer_msg *m)
{
    struct swarm *sw = p->sw;
    struct dg_swarms *s = sw->s;
    unsigned piece_level = 0;
    uint8_t *hashes = NULL;
    uint64_t n = 0;
    int ok = 0;

    if (sw->known && m->proof_layers == 0 && dg_peer_check_hash_request(m, sw->length) == 0) {
        while ((DG_MERKLE_BLOCK_SIZE << piece_level) < sw->piece_size)
            piece_level++;
        if (m->layer == piece_level && sw->npieces > 1) {
            uint8_t *layer;
            uint64_t count;
            if (dg_piece_cache_layer(s->cfg.cache, sw->root, &layer, &count) == 0) {
                if ((uint64_t)m->index + m->count <= count) {
                    hashes = malloc(32u * m->count);
                    if (hashes) {
                        memcpy(hashes, layer + 32u * m->index, 32u * m->count);
                        n = m->count;
                        ok = 1;
                    }
                }
                free(layer);
            }
        } else if (m->layer == 0) {
            hashes = malloc(32u * m->count);
            ok = hashes && leaf_range(sw, m->index, m->count, hashes) == 0;
            n = m->count;
        }
    }
    if (ok)
        send_buf(p, s->buf,
                 dg_peer_msg_hashes(m->layer, m->index, m->count, 0, hashes, n, s->buf, SCRATCH));
    else
        send_buf(p, s->buf,
                 dg_peer_msg_hash_reject(m->layer, m->index, m->count, m->proof_layers, s->buf,
                                         SCRATCH));
    free(hashes);
}

/* Unchokes an interested peer at once while slots are free. */
static void maybe_unchoke(struct peer *p)
{
    size_t unchoked = 0;

    for (struct peer *q = p->sw->peers; q; q = q->next)
        unchoked += !q->choking;
    if (p->interested && p->choking && unchoked < UNCHOKE_SLOTS + 1)
        set_choke(p, 0);
}

static void choke_round(struct swarm *sw, uint64_t now)
{
    struct peer *best[UNCHOKE_SLOTS] = {0};
    int complete = sw->known && sw->nheld == sw->nblocks;

    for (struct peer *p = sw->peers; p; p = p->next) {
        if (!p->interested)
            continue;
        uint64_t score = complete ? p->gave_recent : p->got_recent;
        for (int i = 0; i < UNCHOKE_SLOTS; i++) {
            if (!best[i] || score > (complete ? best[i]->gave_recent : best[i]->got_recent)) {
                memmove(&best[i + 1], &best[i], sizeof(best[0]) * (size_t)(UNCHOKE_SLOTS - 1 - i));
                best[i] = p;
                break;
            }
        }
    }
    if (now >= sw->next_optimistic) {
        /* A random interested peer outside the best gets a chance. */
        size_t n = 0;
        for (struct peer *p = sw->peers; p; p = p->next)
            n += p->interested;
        sw->optimistic = NULL;
        if (n > 0) {
            size_t pick = (size_t)rand() % n;
            for (struct peer *p = sw->peers; p; p = p->next)
                if (p->interested && pick-- == 0)
                    sw->optimistic = p;
        }
        sw->next_optimistic = now + OPTIMISTIC_MS;
    }
    for (struct peer *p = sw->peers; p; p = p->next) {
        int keep = p == sw->optimistic;
        for (int i = 0; i < UNCHOKE_SLOTS && !keep; i++)
            keep = best[i] == p;
        set_choke(p, !keep);
        p->got_recent = p->gave_recent = 0;
    }
}

/* ------------------------------------------------------------------ PEX */

static void send_pex(struct peer *to)
{
    struct swarm *sw = to->sw;
    uint8_t added[DG_PEER_PEX_MAX * 6], added6[DG_PEER_PEX_MAX * 18];
    size_t n4 = 0, n6 = 0;
    uint8_t payload[3000];

    for (struct peer *p = sw->peers; p; p = p->next) {
        if (p == to || !p->listen.ss_family)
            continue;
        if (p->listen.ss_family == AF_INET && n4 < DG_PEER_PEX_MAX) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)&p->listen;
            memcpy(added + 6 * n4, &a->sin_addr, 4);
            memcpy(added + 6 * n4 + 4, &a->sin_port, 2);
            n4++;
        } else if (p->listen.ss_family == AF_INET6 && n6 < DG_PEER_PEX_MAX) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&p->listen;
            memcpy(added6 + 18 * n6, &a->sin6_addr, 16);
            memcpy(added6 + 18 * n6 + 16, &a->sin6_port, 2);
            n6++;
        }
    }
    if (n4 + n6 == 0)
        return;
    struct dg_peer_pex pex = {0};
    pex.added = added;
    pex.added_n = n4;
    if (n6) {
        pex.added6 = added6;
        pex.added6_n = n6;
    }
    int len = dg_peer_pex_encode(&pex, payload, sizeof(payload));
    if (len > 0)
        send_buf(to, sw->s->buf, dg_peer_msg_pex(payload, (size_t)len, sw->s->buf, SCRATCH));
}

static void on_pex(struct peer *p, const struct dg_peer_msg *m)
{
    struct dg_peer_pex pex;

    if (dg_peer_pex_parse(m->data, m->data_len, &pex) < 0)
        return;
    for (size_t i = 0; pex.added && i < pex.added_n; i++) {
        struct sockaddr_storage a = {0};
        struct sockaddr_in *a4 = (struct sockaddr_in *)&a;
        a4->sin_family = AF_INET;
        memcpy(&a4->sin_addr, pex.added + 6 * i, 4);
        memcpy(&a4->sin_port, pex.added + 6 * i + 4, 2);
        add_candidate(p->sw, &a, NULL, p->got_hello ? p->node_id : NULL);
    }
    for (size_t i = 0; pex.added6 && i < pex.added6_n; i++) {
        struct sockaddr_storage a = {0};
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&a;
        a6->sin6_family = AF_INET6;
        memcpy(&a6->sin6_addr, pex.added6 + 18 * i, 16);
        memcpy(&a6->sin6_port, pex.added6 + 18 * i + 16, 2);
        add_candidate(p->sw, &a, NULL, p->got_hello ? p->node_id : NULL);
    }
}

/* ------------------------------------------------------------------ messages */

static int on_hello(struct peer *p, const struct dg_peer_msg *m)
{
    struct swarm *sw = p->sw;
    struct dg_peer_hello h;

    if (p->got_hello || dg_peer_hello_parse(m->data, m->data_len, &h) < 0 ||
        memcmp(h.root, sw->root, 32) != 0)
        return DG_PEER_CLOSE_PROTOCOL;
    p->got_hello = 1;
    if (h.has_len) {
        if (sw->known && h.len != sw->length)
            return DG_PEER_CLOSE_PROTOCOL; /* it lies about the length */
        p->has_len = 1;
        p->len = h.len;
        p->nblocks = dg_merkle_block_count(h.len);
    }
    p->reqq = h.has_reqq ? h.reqq : DG_PEER_REQQ_DEFAULT;
    p->target = p->reqq < MIN_PIPELINE ? p->reqq : MIN_PIPELINE;
    p->pex = h.has_pex && h.pex;
    p->nat = h.has_nat ? h.nat : 0;
    if (h.has_yourip && h.yourip_len == 4 && sw->s->cfg.host.observed &&
        dg_peer_conn_transport(p->conn) != DG_PEER_TRANSPORT_RELAY) {
        struct sockaddr_in seen = {.sin_family = AF_INET};
        memcpy(&seen.sin_addr, h.yourip, 4);
        sw->s->cfg.host.observed(sw->s->cfg.host.arg, (const struct sockaddr *)&seen,
                                 (const struct sockaddr *)dg_peer_conn_addr(p->conn));
    }
    if (h.has_port) {
        p->listen = *dg_peer_conn_addr(p->conn);
        if (p->listen.ss_family == AF_INET)
            ((struct sockaddr_in *)&p->listen)->sin_port = htons(h.port);
        else
            ((struct sockaddr_in6 *)&p->listen)->sin6_port = htons(h.port);
        if (is_banned(sw->s, &p->listen))
            return DG_PEER_CLOSE_BAD_DATA;
        struct candidate *c = candidate_of(sw, &p->listen);
        if (c)
            c->connected = 1;
    }
    swarm_dirty(sw);
    return 0;
}

/* Notes that @p p has blocks [first, first + count) (its claimed length bounds them). */
static int note_have(struct peer *p, uint64_t first, uint64_t count)
{
    struct swarm *sw = p->sw;

    if (!p->has_len && sw->known) {
        /* It learned the length after its hello (from us or others): it is ours. */
        p->has_len = 1;
        p->len = sw->length;
        p->nblocks = sw->nblocks;
    }
    if (!p->has_len)
        return DG_PEER_CLOSE_PROTOCOL; /* a block count needs a length */
    if (!sw->known && p->nblocks > MAX_UNVERIFIED_BLOCKS)
        return 0; /* a claimed length over 1 TiB gets no bitmap before it is verified */
    if (!p->have && !p->have_all) {
        p->have = calloc((size_t)((p->nblocks + 7) / 8) + 1, 1);
        if (!p->have)
            return DG_PEER_CLOSE_LOCAL;
    }
    for (uint64_t b = first; b < first + count && b < p->nblocks; b++) {
        if (p->have_all || bit_get(p->have, b))
            continue;
        bit_set(p->have, b);
        if (sw->known && b < sw->nblocks && sw->avail[b] < UINT16_MAX)
            sw->avail[b]++;
    }
    return 0;
}

static void update_interest(struct peer *p)
{
    struct swarm *sw = p->sw;

    if (!sw->known) {
        send_interest(p, 1); /* the metadata's last block comes from it */
        return;
    }
    send_interest(p, sw->nheld < sw->nblocks);
}

static int on_block(struct peer *p, const struct dg_peer_msg *m)
{
    struct swarm *sw = p->sw;
    struct dg_swarms *s = sw->s;
    uint64_t now = now_ms(s);

    if (!take_request(p, m->block)) {
        for (unsigned i = 0; i < CANCELLED_RING; i++)
            if (p->cancelled[i] == m->block && now - p->cancelled_at[i] < 30000)
                return 0; /* a cancel crossed it on the way */
        return DG_PEER_CLOSE_PROTOCOL;
    }
    p->got_recent += m->data_len;
    /* Speed: bytes per second over windows of 500 ms, smoothed. */
    if (!p->rate_window_start)
        p->rate_window_start = now;
    p->rate_window_bytes += m->data_len;
    if (now - p->rate_window_start >= 500) {
        uint64_t rate = p->rate_window_bytes * 1000 / (now - p->rate_window_start);
        p->rate_in = p->rate_in ? (p->rate_in * 3 + rate) / 4 : rate;
        p->rate_window_start = now;
        p->rate_window_bytes = 0;
        /* Keep about half a second of its speed in flight. */
        uint64_t t = p->rate_in / 2 / DG_MERKLE_BLOCK_SIZE;
        p->target = (uint32_t)(t < MIN_PIPELINE ? MIN_PIPELINE : t > p->reqq ? p->reqq : t);
        if (p->target > p->reqq)
            p->target = p->reqq;
    }

    if (!sw->known) {
        if (sw->meta != META_BLOCK || p != sw->meta_peer ||
            m->block != dg_merkle_block_count(sw->meta_len) - 1)
            return 0;
        uint8_t hash[32];
        if (m->data_len != dg_peer_block_size(sw->meta_len, m->block) ||
            dg_merkle_sha256(m->data, m->data_len, hash) != 0 ||
            memcmp(hash, sw->meta_leaf, 32) != 0) {
            ban(s, p, "last block does not match its hash (or the length is a lie)");
            meta_reset(sw);
            return DG_PEER_CLOSE_BAD_DATA;
        }
        meta_commit(sw, m->data, m->data_len);
        return 0;
    }
    if (dg_peer_check_block(m, sw->length) != 0)
        return DG_PEER_CLOSE_PROTOCOL;
    if (bit_get(sw->held, m->block))
        return 0; /* a duplicate of the endgame */
    int rc = dg_piece_cache_put_block(s->cfg.cache, sw->root, m->block, m->data, m->data_len);
    if (rc == -ENOSPC && s->cfg.host.make_room) {
        s->cfg.host.make_room(s->cfg.host.arg, sw->root);
        rc = dg_piece_cache_put_block(s->cfg.cache, sw->root, m->block, m->data, m->data_len);
    }
    if (rc == -EBADMSG) {
        ban(s, p, "a block does not match its leaf hash");
        return DG_PEER_CLOSE_BAD_DATA;
    }
    if (rc == -ENODATA) {
        /* The leaves of its piece are not in the index after all (a write batch that failed):
         * they are asked again. */
        uint64_t piece = m->block / sw->per_piece;
        sw->leaves_known[piece / 8] &= (uint8_t) ~(1u << (piece % 8));
        swarm_dirty(sw);
        return 0;
    }
    if (rc < 0) {
        /* Storage failed (disk full, I/O error): the block is asked again after a pause,
         * not at network speed. */
        if (now >= sw->pause_until) {
            char hex[DG_ROOT_HEX_LEN + 1];
            dg_root_format(sw->root, hex);
            dg_log(DG_LOG_WARN, "swarm", "block %u of %s not stored: %s; pausing", m->block, hex,
                   strerror(-rc));
        }
        sw->pause_until = now + STORE_PAUSE_MS;
        return 0;
    }
    bit_set(sw->held, m->block);
    sw->nheld++;
    s->stats.blocks_in++;
    /* The same block asked of others is cancelled; everyone hears we have it. */
    for (struct peer *q = sw->peers; q; q = q->next) {
        uint8_t b[16];
        if (q != p && take_request(q, m->block)) {
            q->cancelled[q->cancelled_next % CANCELLED_RING] = m->block;
            q->cancelled_at[q->cancelled_next++ % CANCELLED_RING] = now;
            send_buf(q, b, dg_peer_msg_cancel(m->block, b, sizeof(b)));
        }
        if (!peer_has(q, m->block))
            send_buf(q, b, dg_peer_msg_have(m->block, 1, b, sizeof(b)));
    }
    s->cfg.host.stored(s->cfg.host.arg, sw->root, m->block);
    if (sw->nheld == sw->nblocks) {
        for (struct peer *q = sw->peers; q; q = q->next)
            update_interest(q);
        if (s->cfg.announce_complete)
            dg_swarms_announce(s, sw->root, 1);
    }
    swarm_dirty(sw);
    return 0;
}

static int on_hashes(struct peer *p, const struct dg_peer_msg *m)
{
    struct swarm *sw = p->sw;
    unsigned i;
    int rc = 0;

    for (i = 0; i < p->nhreqs; i++)
        if (m->layer == p->hreqs[i].layer && m->index == p->hreqs[i].index &&
            m->count == p->hreqs[i].count && m->proof_layers == 0)
            break;
    if (i == p->nhreqs)
        return DG_PEER_CLOSE_PROTOCOL; /* not what we asked */
    drop_hash_request(p, i, 0);
    if (!sw->known)
        return meta_hashes(sw, p, m);
    if (sw->big.peer == p && m->layer == 0) {
        int done = big_take(sw, p, m);
        if (done <= 0)
            return done < 0 ? DG_PEER_CLOSE_PROTOCOL : 0;
        uint64_t piece = sw->big.piece;
        int stored = dg_piece_cache_put_leaves(sw->s->cfg.cache, sw->root, piece, sw->big.buf,
                                               sw->big.count);
        big_reset(sw);
        sw->leaves_asked[piece / 8] &= (uint8_t) ~(1u << (piece % 8));
        if (stored == -EBADMSG) {
            ban(sw->s, p, "leaf hashes do not match the piece layer");
            return DG_PEER_CLOSE_BAD_DATA;
        }
        if (stored == 0) {
            bit_set(sw->leaves_known, piece);
            sw->s->cfg.host.commit(sw->s->cfg.host.arg); /* a big piece: worth its own sync */
        }
        swarm_dirty(sw);
        return 0;
    }
    if (m->layer != 0 || m->index % sw->per_piece != 0)
        return 0;
    /* One piece after another: each is checked against its piece-layer hash. */
    /* The leaves join the engine's write batch: one sync for many pieces, and put_block sees
     * them at once. */
    sw->s->cfg.host.batch(sw->s->cfg.host.arg);
    for (uint64_t off = 0; off < m->count; off += sw->per_piece) {
        uint64_t piece = (m->index + off) / sw->per_piece;
        uint64_t in_piece = sw->nblocks - piece * sw->per_piece < sw->per_piece
                                ? sw->nblocks - piece * sw->per_piece
                                : sw->per_piece;
        if (m->count - off < in_piece)
            break; /* a partial piece (files over 32 GiB): not usable alone */
        if (bit_get(sw->leaves_known, piece))
            continue;
        rc = dg_piece_cache_put_leaves(sw->s->cfg.cache, sw->root, piece, m->data + 32 * off,
                                       in_piece);
        if (rc == -EBADMSG) {
            ban(sw->s, p, "leaf hashes do not match the piece layer");
            return DG_PEER_CLOSE_BAD_DATA;
        }
        if (rc == 0)
            bit_set(sw->leaves_known, piece);
    }
    swarm_dirty(sw);
    return 0;
}

static int on_message(struct dg_peer_conn *c, const struct dg_peer_msg *m)
{
    struct peer *p = dg_peer_conn_data(c);
    struct swarm *sw = p->sw;
    int rc = 0;

    account(p);
    p->last_in = now_ms(sw->s);
    p->asked_at = 0;
    sw->last_used = now_ms(sw->s);
    if (!p->got_hello && m->type != DG_PEER_MSG_HELLO)
        return DG_PEER_CLOSE_PROTOCOL; /* hello comes first */
    if (p->has_len && dg_peer_msg_check(m, p->len) == -EBADMSG)
        return DG_PEER_CLOSE_MALFORMED;
    switch (m->type) {
    case DG_PEER_MSG_HELLO:
        rc = on_hello(p, m);
        if (rc == 0)
            update_interest(p);
        break;
    case DG_PEER_MSG_CHOKE:
        p->choked_by = 1;
        /* Our requests are void: they go elsewhere. */
        while (p->nreqs > 0)
            take_request(p, p->reqs[p->nreqs - 1].block);
        swarm_dirty(sw);
        break;
    case DG_PEER_MSG_UNCHOKE:
        p->choked_by = 0;
        if (sw->meta == META_BLOCK && sw->meta_peer == p && p->nreqs == 0)
            send_request(p, (uint32_t)(dg_merkle_block_count(sw->meta_len) - 1));
        swarm_dirty(sw);
        break;
    case DG_PEER_MSG_INTERESTED:
        p->interested = 1;
        maybe_unchoke(p);
        break;
    case DG_PEER_MSG_NOT_INTERESTED:
        p->interested = 0;
        set_choke(p, 1);
        break;
    case DG_PEER_MSG_HAVE:
        rc = note_have(p, m->first, m->count);
        swarm_dirty(sw);
        break;
    case DG_PEER_MSG_HAVE_ALL:
        if (p->have_all)
            break;
        p->have_all = 1;
        if (sw->known)
            for (uint64_t b = 0; b < sw->nblocks; b++)
                if (!(p->have && b < p->nblocks && bit_get(p->have, b)) &&
                    sw->avail[b] < UINT16_MAX)
                    sw->avail[b]++;
        swarm_dirty(sw);
        break;
    case DG_PEER_MSG_HAVE_NONE:
        break;
    case DG_PEER_MSG_BITFIELD:
        for (uint32_t i = 0; i < m->count && rc == 0; i++)
            if (m->data[i / 8] & (0x80u >> (i % 8)))
                rc = note_have(p, (uint64_t)m->first + i, 1);
        swarm_dirty(sw);
        break;
    case DG_PEER_MSG_REQUEST:
        if (p->serve_len >= DG_SWARM_REQQ)
            return DG_PEER_CLOSE_PROTOCOL; /* over the reqq we announced */
        if (p->choking || !sw->known || m->block >= sw->nblocks || !bit_get(sw->held, m->block)) {
            uint8_t b[16];
            send_buf(p, b, dg_peer_msg_reject(m->block, b, sizeof(b)));
            break;
        }
        p->serve[(p->serve_head + p->serve_len) % DG_SWARM_REQQ] = m->block;
        p->serve_len++;
        serve(p);
        break;
    case DG_PEER_MSG_CANCEL:
        /* A cancelled request stops counting against reqq at once: it leaves the queue. */
        for (size_t i = 0; i < p->serve_len; i++) {
            if (p->serve[(p->serve_head + i) % DG_SWARM_REQQ] != m->block)
                continue;
            for (size_t j = i; j + 1 < p->serve_len; j++)
                p->serve[(p->serve_head + j) % DG_SWARM_REQQ] =
                    p->serve[(p->serve_head + j + 1) % DG_SWARM_REQQ];
            p->serve_len--;
            break;
        }
        break;
    case DG_PEER_MSG_REJECT:
        if (take_request(p, m->block)) {
            /* It does not have it after all. */
            if (p->have && m->block < p->nblocks && bit_get(p->have, m->block))
                p->have[m->block / 8] &= (uint8_t) ~(1u << (m->block % 8));
            swarm_dirty(sw);
        }
        break;
    case DG_PEER_MSG_BLOCK:
        rc = on_block(p, m);
        break;
    case DG_PEER_MSG_HASH_REQUEST:
        serve_hashes(p, m);
        break;
    case DG_PEER_MSG_HASHES:
        rc = on_hashes(p, m);
        break;
    case DG_PEER_MSG_HASH_REJECT:
        for (unsigned i = 0; i < p->nhreqs; i++) {
            if (p->hreqs[i].layer == m->layer && p->hreqs[i].index == m->index &&
                p->hreqs[i].count == m->count) {
                drop_hash_request(p, i, 1);
                if (!sw->known && sw->meta_peer == p)
                    meta_failed(sw, p);
                swarm_dirty(sw);
                break;
            }
        }
        break;
    case DG_PEER_MSG_PEX:
        on_pex(p, m);
        break;
    case DG_PEER_MSG_HOLEPUNCH:
        rc = on_holepunch(p, m);
        break;
    default:
        break;
    }
    return rc;
}

/* ------------------------------------------------------------------ connections */

/* Makes @p c a peer of @p sw and sends our side of the opening. */
static int attach(struct swarm *sw, struct dg_peer_conn *c)
{
    struct peer *p = calloc(1, sizeof(*p));

    if (!p)
        return -ENOMEM;
    p->serve = calloc(DG_SWARM_REQQ, sizeof(*p->serve));
    if (!p->serve) {
        free(p);
        return -ENOMEM;
    }
    p->sw = sw;
    p->conn = c;
    p->choked_by = 1;
    p->choking = 1;
    p->target = MIN_PIPELINE;
    p->next_pex = now_ms(sw->s) + PEX_FIRST_MS;
    p->last_in = now_ms(sw->s);
    p->next = sw->peers;
    sw->peers = p;
    sw->npeers++;
    sw->s->stats.peers++;
    dg_peer_conn_set_data(c, p);
    return 0;
}

/* A second connection with node @p id in @p sw (other than @p self): the first one wins,
 * unless it has been silent for STALE_MS: then the remote has most likely lost it (a NAT on
 * the way forgot its mapping) and dialled again, and the old one is dropped.
 * @return 1 if the new connection may go on, 0 if it must close. */
static int replace_stale(struct swarm *sw, const uint8_t id[20], const struct peer *self)
{
    for (struct peer *q = sw->peers; q; q = q->next) {
        if (q == self || memcmp(q->node_id, id, 20) != 0 || (self && !q->got_hello))
            continue;
        if (now_ms(sw->s) - q->last_in < STALE_MS)
            return 0;
        sw->s->stats.replaced++;
        dg_peer_conn_close(q->conn, DG_PEER_CLOSE_TIMEOUT); /* frees q */
        return 1;
    }
    return 1;
}

static void send_opening(struct peer *p)
{
    p->opened = 1;
    send_hello(p);
    send_holdings(p);
}

static void on_connected(struct dg_peer_conn *c)
{
    (void)c; /* the handshake was queued with the connect */
}

static int on_handshake(struct dg_peer_conn *c, const struct dg_peer_handshake *hs)
{
    struct dg_swarms *s = dg_peer_conn_owner(c);
    struct peer *p = dg_peer_conn_data(c);
    struct swarm *sw;

    if (memcmp(hs->node_id, s->cfg.node_id, 20) == 0)
        return DG_PEER_CLOSE_HANDSHAKE; /* ourselves */
    if (p) {
        /* Ours: the answer must name our swarm. */
        if (memcmp(hs->swarm_key, p->sw->root, 20) != 0)
            return DG_PEER_CLOSE_HANDSHAKE;
        if (!replace_stale(p->sw, hs->node_id, p))
            return DG_PEER_CLOSE_HANDSHAKE; /* connected already, another way */
        memcpy(p->node_id, hs->node_id, 20);
        send_opening(p);
        return 0;
    }
    /* Accepted: it names the swarm. */
    for (struct pending **pp = &s->pending; *pp; pp = &(*pp)->next) {
        if ((*pp)->conn == c) {
            struct pending *gone = *pp;
            *pp = gone->next;
            free(gone);
            s->npending--;
            break;
        }
    }
    sw = find_swarm(s, hs->swarm_key, 20);
    if (!sw) {
        /* A root we hold completely is served without anyone here wanting it. */
        uint8_t after[32] = {0}, roots[32 * 4];
        size_t n = 0;
        struct dg_root_info info;
        memcpy(after, hs->swarm_key, 20);
        if (dg_piece_cache_root_info(s->cfg.cache, after, &info) == 0) {
            sw = swarm_new(s, after);
        } else if (dg_piece_cache_list_roots(s->cfg.cache, after, roots, 4, &n) == 0 && n > 0 &&
                   memcmp(roots, hs->swarm_key, 20) == 0) {
            sw = swarm_new(s, roots);
        }
        if (!sw)
            return DG_PEER_CLOSE_HANDSHAKE; /* nothing we hold or want */
    }
    if (sw->npeers >= DG_SWARM_MAX_PEERS || s->stats.peers >= MAX_TOTAL_PEERS)
        return DG_PEER_CLOSE_LOCAL;
    if (!replace_stale(sw, hs->node_id, NULL))
        return DG_PEER_CLOSE_HANDSHAKE; /* connected already */
    if (attach(sw, c) < 0)
        return DG_PEER_CLOSE_LOCAL;
    p = dg_peer_conn_data(c);
    memcpy(p->node_id, hs->node_id, 20);
    uint8_t hsbuf[DG_PEER_HANDSHAKE_LEN];
    dg_peer_handshake_encode(sw->root, s->cfg.node_id, hsbuf);
    dg_peer_conn_send(c, hsbuf, sizeof(hsbuf));
    send_opening(p);
    return 0;
}

static void on_drained(struct dg_peer_conn *c)
{
    struct peer *p = dg_peer_conn_data(c);

    if (p)
        serve(p);
}

static void drop_peer(struct peer *p)
{
    struct swarm *sw = p->sw;

    account(p);
    while (p->nreqs > 0)
        take_request(p, p->reqs[p->nreqs - 1].block);
    if (sw->known) {
        for (uint64_t b = 0; b < sw->nblocks; b++)
            if (peer_has(p, b) && sw->avail[b] > 0)
                sw->avail[b]--;
    }
    while (p->nhreqs > 0)
        drop_hash_request(p, p->nhreqs - 1, 1);
    if (sw->big.peer == p) {
        if (sw->known)
            sw->leaves_asked[sw->big.piece / 8] &= (uint8_t) ~(1u << (sw->big.piece % 8));
        big_reset(sw);
    }
    if (sw->meta_peer == p)
        meta_failed(sw, NULL);
    if (sw->optimistic == p)
        sw->optimistic = NULL;
    for (struct peer **pp = &sw->peers; *pp; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    }
    sw->npeers--;
    sw->s->stats.peers--;
    free(p->have);
    free(p->reqs);
    free(p->serve);
    free(p);
    swarm_dirty(sw);
}

static void on_close(struct dg_peer_conn *c, enum dg_peer_close_reason reason)
{
    struct dg_swarms *s = dg_peer_conn_owner(c);
    struct peer *p = dg_peer_conn_data(c);
    char name[64];

    if (reason == DG_PEER_CLOSE_MALFORMED || reason == DG_PEER_CLOSE_PROTOCOL ||
        reason == DG_PEER_CLOSE_BAD_DATA)
        s->stats.malformed++;
    format_addr(dg_peer_conn_addr(c), name, sizeof(name));
    if (!p) {
        for (struct pending **pp = &s->pending; *pp; pp = &(*pp)->next) {
            if ((*pp)->conn == c) {
                struct pending *gone = *pp;
                *pp = gone->next;
                free(gone);
                s->npending--;
                break;
            }
        }
        dg_log(DG_LOG_DEBUG, "swarm", "incoming %s: %s", name, dg_peer_close_reason_name(reason));
        return;
    }
    struct swarm *sw = p->sw;
    if (p->traversed) {
        struct candidate *cand = p->cand.ss_family ? candidate_of(sw, &p->cand) : NULL;
        if (cand && cand->traverse == TRAVERSE_DONE) {
            cand->traverse = TRAVERSE_NONE;
            cand->connected = 0;
            cand->next_try = now_ms(s) + 5000;
        }
    } else if (dg_peer_conn_outgoing(c)) {
        struct candidate *cand = candidate_of(sw, dg_peer_conn_addr(c));
        if (cand) {
            cand->connected = cand->traverse == TRAVERSE_DONE;
            if (reason == DG_PEER_CLOSE_CONNECT || !p->got_hello) {
                cand->failures++;
                cand->next_try =
                    now_ms(s) + 5000ull * (1ull << (cand->failures < 8 ? cand->failures : 8));
            } else {
                cand->failures = 0;
                cand->next_try = now_ms(s) + 5000;
            }
            if (reason == DG_PEER_CLOSE_CONNECT && !s->stopping)
                start_traverse(sw, cand, 0);
        }
    } else if (p->listen.ss_family) {
        struct candidate *cand = candidate_of(sw, &p->listen);
        if (cand)
            cand->connected = 0;
    }
    dg_log(reason >= DG_PEER_CLOSE_MALFORMED && reason != DG_PEER_CLOSE_TIMEOUT ? DG_LOG_INFO
                                                                                : DG_LOG_DEBUG,
           "swarm", "peer %s: %s", name, dg_peer_close_reason_name(reason));
    drop_peer(p);
    if (sw->npeers == 0 && !sw->known && !s->stopping)
        maybe_dht(sw, 1);
}

/* ------------------------------------------------------------ NAT traversal */

/* Asks the engine to reach @p cand through its rendezvous: hole punching, or (@p relay) a
 * relay. Only for candidates that came with a rendezvous, one traversal at a time. */
static void start_traverse(struct swarm *sw, struct candidate *cand, int relay)
{
    struct dg_swarms *s = sw->s;

    if (cand->traverse == TRAVERSE_DONE ||
        (!relay && cand->traverse != TRAVERSE_NONE && cand->traverse != TRAVERSE_FAILED))
        return;
    if (!cand->via.ss_family || !s->cfg.host.traverse) {
        /* No DHT node to ask: a peer that told us of it (pex) may bring us together. */
        if (!relay && ask_pex_rendezvous(sw, cand))
            return;
        if (relay)
            cand->traverse = TRAVERSE_FAILED;
        return;
    }
    if (s->cfg.host.traverse(s->cfg.host.arg, sw->root, (const struct sockaddr *)&cand->addr,
                             (const struct sockaddr *)&cand->via, relay) < 0) {
        cand->traverse = TRAVERSE_FAILED;
        return;
    }
    cand->traverse = relay ? TRAVERSE_RELAY : TRAVERSE_PUNCH;
    cand->traverse_at = now_ms(s);
    s->stats.traversals++;
    char name[64], via[64];
    format_addr(&cand->addr, name, sizeof(name));
    format_addr(&cand->via, via, sizeof(via));
    dg_log(DG_LOG_DEBUG, "swarm", "%s to %s through %s", relay ? "relay" : "hole punching", name,
           via);
}

/* Fills @p buf with random bytes (OpenSSL's CSPRNG; a nonce that must not be guessed). */
static void random_bytes(uint8_t *buf, size_t len)
{
    if (RAND_bytes(buf, (int)len) != 1) {
        uint64_t t = uv_hrtime();
        for (size_t i = 0; i < len; i++)
            buf[i] = (uint8_t)(t >> (8 * (i % 8))) ^ (uint8_t)(i * 151);
    }
}

/* The peer of @p sw with node id @p id past its hello, or NULL. */
static struct peer *peer_by_id(struct swarm *sw, const uint8_t id[20])
{
    for (struct peer *p = sw->peers; p; p = p->next)
        if (p->got_hello && memcmp(p->node_id, id, 20) == 0)
            return p;
    return NULL;
}

/* The peer of @p sw past its hello that listens at @p a, or NULL. */
static struct peer *peer_by_listen(struct swarm *sw, const struct sockaddr_storage *a)
{
    for (struct peer *p = sw->peers; p; p = p->next)
        if (p->got_hello && p->listen.ss_family && same_addr(&p->listen, a))
            return p;
    return NULL;
}

static void send_holepunch(struct peer *p, const struct dg_peer_holepunch *h)
{
    uint8_t msg[96];

    send_buf(p, msg, dg_peer_msg_holepunch(h, msg, sizeof(msg)));
}

/* Asks the peer whose pex named @p cand to bring us together (3.9). @return 1 if asked. */
static int ask_pex_rendezvous(struct swarm *sw, struct candidate *cand)
{
    struct dg_swarms *s = sw->s;
    struct peer *via = cand->has_pex_from ? peer_by_id(sw, cand->pex_from) : NULL;
    struct dg_peer_holepunch h = {.type = DG_PEER_HP_RENDEZVOUS};

    if (!via || !s->cfg.host.punch)
        return 0;
    h.addr = cand->addr;
    h.nat = s->cfg.host.nat_class ? (uint8_t)s->cfg.host.nat_class(s->cfg.host.arg) : 0;
    send_holepunch(via, &h);
    cand->traverse = TRAVERSE_PUNCH;
    cand->traverse_at = now_ms(s);
    s->stats.traversals++;
    char name[64];
    format_addr(&cand->addr, name, sizeof(name));
    dg_log(DG_LOG_DEBUG, "swarm", "hole punching to %s through a peer connected to both", name);
    return 1;
}

/* holepunch (3.9): a peer asks us to bring it together with another one of ours, or one of
 * ours does so for us. */
static int on_holepunch(struct peer *p, const struct dg_peer_msg *m)
{
    struct swarm *sw = p->sw;
    struct dg_swarms *s = sw->s;
    struct dg_peer_holepunch h, out = {0};
    uint64_t now = now_ms(s);

    if (dg_peer_holepunch_parse(m->data, m->data_len, &h) < 0)
        return DG_PEER_CLOSE_MALFORMED;
    switch (h.type) {
    case DG_PEER_HP_RENDEZVOUS: {
        struct peer *target = peer_by_listen(sw, &h.addr);
        if (now - p->hp_window >= 60000) {
            p->hp_window = now;
            p->hp_count = 0;
        }
        out.type = DG_PEER_HP_ERROR;
        out.addr = h.addr;
        if (++p->hp_count > HP_RENDEZVOUS_PER_MIN)
            out.error = DG_PEER_HP_ERR_BUSY;
        else if (!p->listen.ss_family || p->listen.ss_family != h.addr.ss_family)
            out.error = DG_PEER_HP_ERR_NO_SELF;
        else if (!target || target == p)
            out.error = DG_PEER_HP_ERR_NO_SUCH_PEER;
        if (out.error) {
            send_holepunch(p, &out);
            return 0;
        }
        out.type = DG_PEER_HP_CONNECT;
        random_bytes(out.nonce, sizeof(out.nonce));
        out.addr = p->listen; /* to the target: punch towards the asker */
        out.nat = h.nat;
        out.initiator = 0;
        send_holepunch(target, &out);
        out.addr = target->listen; /* to the asker: punch towards the target, then connect */
        out.nat = target->nat;
        out.initiator = 1;
        send_holepunch(p, &out);
        s->stats.rendezvous++;
        return 0;
    }
    case DG_PEER_HP_CONNECT: {
        struct candidate *cand = candidate_of(sw, &h.addr);
        if (h.initiator && (!cand || cand->traverse != TRAVERSE_PUNCH))
            return 0; /* we asked for nothing of the kind */
        if (now - p->hp_window >= 60000) {
            p->hp_window = now;
            p->hp_count = 0;
        }
        if (++p->hp_count > HP_RENDEZVOUS_PER_MIN)
            return 0; /* a peer making us probe address after address */
        int rc = s->cfg.host.punch
                     ? s->cfg.host.punch(s->cfg.host.arg, sw->root, h.nonce,
                                         (const struct sockaddr *)&h.addr, h.nat, h.initiator)
                     : -ENOTSUP;
        if (rc < 0 && h.initiator && cand) {
            cand->traverse = TRAVERSE_NONE;
            if (rc == -EPERM && cand->via.ss_family)
                start_traverse(sw, cand, 1); /* both NATs hard: a relay, if a DHT node has one */
            else
                cand->traverse = TRAVERSE_FAILED;
        }
        return 0;
    }
    case DG_PEER_HP_ERROR: {
        struct candidate *cand = candidate_of(sw, &h.addr);
        if (cand && cand->traverse == TRAVERSE_PUNCH)
            cand->traverse = TRAVERSE_FAILED;
        return 0;
    }
    }
    return 0;
}

/* Whether a connection to @p cand got past the hello. */
static int cand_connected(const struct swarm *sw, const struct candidate *cand)
{
    for (const struct peer *p = sw->peers; p; p = p->next)
        if (p->got_hello && ((p->cand.ss_family && same_addr(&p->cand, &cand->addr)) ||
                             (p->listen.ss_family && same_addr(&p->listen, &cand->addr))))
            return 1;
    return 0;
}

/* Direct attempts that are slow to come up are joined by a traversal. */
static void traverse_slow(struct swarm *sw, uint64_t now)
{
    for (size_t i = 0; i < sw->ncands; i++) {
        struct candidate *cand = &sw->cands[i];
        /* An answer that never came (a peer that does not know holepunch, a lost datagram). */
        if ((cand->traverse == TRAVERSE_PUNCH || cand->traverse == TRAVERSE_RELAY) &&
            now - cand->traverse_at >= TRAVERSE_GIVE_UP_MS)
            cand->traverse = TRAVERSE_FAILED;
        if (cand->connected && cand->traverse == TRAVERSE_NONE &&
            (cand->via.ss_family || cand->has_pex_from) &&
            now - cand->tried_at >= TRAVERSE_AFTER_MS && !cand_connected(sw, cand))
            start_traverse(sw, cand, 0);
    }
}

/* The traversing candidate of @p sw that @p peer (an address the traversal produced) stands
 * for: the one with @p target's address, else one with the same IP. */
static struct candidate *traversing(struct swarm *sw, const struct sockaddr *target,
                                    const struct sockaddr *peer, int state)
{
    struct sockaddr_storage t = {0}, a = {0};

    if (target)
        memcpy(&t, target, sockaddr_len(target));
    memcpy(&a, peer, sockaddr_len(peer));
    for (size_t i = 0; i < sw->ncands; i++)
        if (sw->cands[i].traverse == state && target && same_addr(&sw->cands[i].addr, &t))
            return &sw->cands[i];
    for (size_t i = 0; i < sw->ncands; i++)
        if (sw->cands[i].traverse == state && same_ip(&sw->cands[i].addr, &a))
            return &sw->cands[i];
    return NULL;
}

/* Attaches an outgoing connection made by traversal for @p cand and sends our handshake. */
static void attach_traversed(struct swarm *sw, struct candidate *cand, struct dg_peer_conn *c)
{
    uint8_t hs[DG_PEER_HANDSHAKE_LEN];

    if (attach(sw, c) < 0) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
        if (cand)
            cand->traverse = TRAVERSE_FAILED;
        return;
    }
    struct peer *p = dg_peer_conn_data(c);
    p->traversed = 1;
    if (cand) {
        p->cand = cand->addr;
        cand->traverse = TRAVERSE_DONE;
        cand->connected = 1;
    }
    dg_peer_handshake_encode(sw->root, sw->s->cfg.node_id, hs);
    dg_peer_conn_send(c, hs, sizeof(hs));
}

void dg_swarms_punched(struct dg_swarms *s, const uint8_t key[20], const struct sockaddr *target,
                       int path, const struct sockaddr *peer)
{
    struct swarm *sw = find_swarm(s, key, 20);
    struct dg_peer_conn *c;

    if (!sw || s->stopping || !s->cfg.utp)
        return;
    struct candidate *cand = traversing(sw, target, peer, TRAVERSE_PUNCH);
    if (sw->npeers >= DG_SWARM_MAX_PEERS || s->stats.peers >= MAX_TOTAL_PEERS ||
        dg_peer_conn_connect_utp(s->loop, s->cfg.utp, path, peer, 1, &peer_ops, s, &c) < 0) {
        if (cand)
            cand->traverse = TRAVERSE_FAILED;
        return;
    }
    attach_traversed(sw, cand, c);
}

void dg_swarms_relayed(struct dg_swarms *s, const uint8_t key[20], int initiator,
                       const struct sockaddr *peer, const struct sockaddr *relay,
                       const uint8_t nonce[DG_RELAY_NONCE_LEN])
{
    uint8_t pre[DG_RELAY_PREAMBLE_LEN];
    struct dg_peer_conn *c;
    struct pending *pd;

    if (s->stopping)
        return;
    dg_relay_preamble(initiator ? DG_RELAY_ROLE_INITIATOR : DG_RELAY_ROLE_RESPONDER, nonce, pre);
    if (initiator) {
        struct swarm *sw = find_swarm(s, key, 20);
        if (!sw)
            return;
        struct candidate *cand = traversing(sw, NULL, peer, TRAVERSE_RELAY);
        if (sw->npeers >= DG_SWARM_MAX_PEERS || s->stats.peers >= MAX_TOTAL_PEERS ||
            dg_peer_conn_connect_relay(s->loop, relay, peer, 1, pre, sizeof(pre), &peer_ops, s,
                                       &c) < 0) {
            if (cand)
                cand->traverse = TRAVERSE_FAILED;
            return;
        }
        attach_traversed(sw, cand, c);
        return;
    }
    /* The responder answers the initiator's handshake, as on an accepted connection. */
    if (s->npending >= MAX_ACCEPTING || !(pd = calloc(1, sizeof(*pd))))
        return;
    if (dg_peer_conn_connect_relay(s->loop, relay, peer, 0, pre, sizeof(pre), &peer_ops, s, &c) <
        0) {
        free(pd);
        return;
    }
    pd->conn = c;
    pd->next = s->pending;
    s->pending = pd;
    s->npending++;
}

void dg_swarms_traverse_failed(struct dg_swarms *s, const uint8_t key[20],
                               const struct sockaddr *target, int try_relay)
{
    struct swarm *sw = find_swarm(s, key, 20);
    struct candidate *cand;

    if (!sw)
        return;
    cand = traversing(sw, target, target, TRAVERSE_PUNCH);
    if (cand && try_relay && !s->stopping) {
        cand->traverse = TRAVERSE_NONE;
        start_traverse(sw, cand, 1);
        return;
    }
    if (!cand)
        cand = traversing(sw, target, target, TRAVERSE_RELAY);
    if (cand)
        cand->traverse = TRAVERSE_FAILED;
}

int dg_swarms_accept_utp(struct dg_swarms *s, struct dg_utp_sock *sock, int punched)
{
    struct dg_peer_conn *c;
    struct pending *pd;

    if (s->stopping || s->npending >= MAX_ACCEPTING)
        return -EBUSY;
    if (!(pd = calloc(1, sizeof(*pd))))
        return -ENOMEM;
    if (dg_peer_conn_accept_utp(s->loop, sock, punched, &peer_ops, s, &c) < 0) {
        free(pd);
        return -ENOMEM;
    }
    if (is_banned(s, dg_peer_conn_addr(c))) {
        free(pd);
        dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
        return 0; /* the connection is closed; the socket is the connection's to end */
    }
    pd->conn = c;
    pd->next = s->pending;
    s->pending = pd;
    s->npending++;
    return 0;
}

static const struct dg_peer_conn_ops peer_ops = {
    .on_connected = on_connected,
    .on_handshake = on_handshake,
    .on_message = on_message,
    .on_drained = on_drained,
    .on_close = on_close,
};

static void connect_candidate(struct swarm *sw, struct candidate *cand)
{
    struct dg_swarms *s = sw->s;
    struct dg_peer_conn *c;
    uint8_t hs[DG_PEER_HANDSHAKE_LEN];

    int rc =
        s->cfg.prefer_utp && s->cfg.utp
            ? dg_peer_conn_connect_utp(s->loop, s->cfg.utp, 0, (const struct sockaddr *)&cand->addr,
                                       0, &peer_ops, s, &c)
            : dg_peer_conn_connect(s->loop, (const struct sockaddr *)&cand->addr, &peer_ops, s, &c);
    if (rc < 0) {
        cand->failures++;
        cand->next_try = now_ms(s) + 30000;
        return;
    }
    cand->connected = 1;
    cand->tried_at = now_ms(s);
    cand->next_try = now_ms(s) + 5000;
    if (cand->traverse == TRAVERSE_FAILED)
        cand->traverse = TRAVERSE_NONE;
    if (attach(sw, c) < 0) {
        dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
        return;
    }
    dg_peer_handshake_encode(sw->root, s->cfg.node_id, hs);
    dg_peer_conn_send(c, hs, sizeof(hs));
}

/* Whether anyone here wants @p sw (so that it should look for peers). */
static int swarm_wanted(const struct swarm *sw)
{
    if (sw->known && sw->nheld == sw->nblocks)
        return 0;
    return sw->lookups || sw->pinned ||
           (sw->last_read && now_ms(sw->s) - sw->last_read < IDLE_SWARM_MS);
}

static void connect_more(struct swarm *sw, uint64_t now)
{
    size_t opening = 0; /* connections not past the hello yet */

    if (!swarm_wanted(sw))
        return;
    for (struct peer *p = sw->peers; p; p = p->next)
        opening += !p->got_hello;
    for (size_t i = 0; i < sw->ncands && sw->npeers < DG_SWARM_MAX_PEERS &&
                       sw->s->stats.peers < MAX_TOTAL_PEERS && opening < DG_SWARM_MAX_CONNECTING;
         i++) {
        struct candidate *cand = &sw->cands[i];
        if (cand->connected || (cand->next_try && now < cand->next_try) ||
            is_banned(sw->s, &cand->addr) || cand->traverse == TRAVERSE_PUNCH ||
            cand->traverse == TRAVERSE_RELAY || cand->traverse == TRAVERSE_DONE)
            continue;
        int dup = 0;
        for (struct peer *p = sw->peers; p && !dup; p = p->next)
            dup = p->listen.ss_family && same_addr(&p->listen, &cand->addr);
        if (dup) {
            cand->connected = 1;
            continue;
        }
        connect_candidate(sw, cand);
        opening++;
    }
}

static void on_accept(uv_stream_t *server, int status)
{
    struct dg_swarms *s = server->data;
    struct dg_peer_conn *c;
    struct pending *pd;

    if (status < 0 || s->stopping)
        return;
    if (dg_peer_conn_accept(server, &peer_ops, s, &c) < 0)
        return;
    if (s->npending >= MAX_ACCEPTING || is_banned(s, dg_peer_conn_addr(c)) ||
        !(pd = calloc(1, sizeof(*pd)))) {
        /* Banned addresses are refused whatever their port (their listen port is not known
         * yet: this checks the source address, on loopback the source port). */
        dg_peer_conn_close(c, DG_PEER_CLOSE_LOCAL);
        return;
    }
    pd->conn = c;
    pd->next = s->pending;
    s->pending = pd;
    s->npending++;
}

/* ------------------------------------------------------------------ timers */

static void expire(struct swarm *sw, uint64_t now)
{
    struct lookup **lp = &sw->lookups;

    while (*lp) {
        struct lookup *l = *lp;
        if (now >= l->deadline) {
            *lp = l->next;
            l->cb(l->arg, -ENOENT);
            free(l);
        } else {
            lp = &l->next;
        }
    }
    for (struct peer *p = sw->peers, *next; p; p = next) {
        next = p->next;
        /* Blocks or hashes asked for, and not a message since the first of those asks for
         * STALL_MS (a NAT on the way forgot the mapping, a relay died): drop the connection so
         * that it can be made again, or the blocks asked elsewhere. */
        if (p->got_hello && (p->nreqs > 0 || p->nhreqs > 0) && p->asked_at &&
            now - p->asked_at >= STALL_MS) {
            sw->s->stats.stalled++;
            dg_peer_conn_close(p->conn, DG_PEER_CLOSE_TIMEOUT);
            continue;
        }
        for (unsigned i = 0; i < p->nhreqs;) {
            if (now - p->hreqs[i].sent_at < META_TIMEOUT_MS) {
                i++;
                continue;
            }
            drop_hash_request(p, i, 1);
            if (!sw->known && sw->meta_peer == p)
                meta_failed(sw, p);
        }
        if (!sw->known && sw->meta == META_BLOCK && sw->meta_peer == p && p->nreqs > 0 &&
            now - p->reqs[0].sent_at >= META_TIMEOUT_MS) {
            take_request(p, p->reqs[0].block);
            meta_failed(sw, p);
        }
        for (size_t i = 0; i < p->nreqs;) {
            if (now - p->reqs[i].sent_at >= REQUEST_TIMEOUT_MS) {
                uint8_t b[16];
                send_buf(p, b, dg_peer_msg_cancel(p->reqs[i].block, b, sizeof(b)));
                take_request(p, p->reqs[i].block);
            } else {
                i++;
            }
        }
    }
}

static void run_announces(struct dg_swarms *s, uint64_t now)
{
    unsigned started = 0;

    if (!s->cfg.host.dht_lookup || !s->port)
        return;
    /* A few a second: the DHT bounds the lookups running at once. */
    for (struct announce *a = s->announces; a && started < ANNOUNCES_AT_ONCE; a = a->next) {
        if (now < a->due)
            continue;
        int rc = s->cfg.host.dht_lookup(s->cfg.host.arg, a->root, s->port);
        if (rc == -EAGAIN) {
            a->due = now + ANNOUNCE_RETRY_MS; /* the DHT knows no node yet */
            continue;
        }
        /* An announce into a thin table reached few nodes: again soon. */
        a->due = now + (rc == 1 ? ANNOUNCE_THIN_MS : DG_SWARM_REANNOUNCE_MS);
        if (rc >= 0) {
            s->stats.announces++;
            started++;
        }
    }
}

static void on_tick(uv_timer_t *t)
{
    struct dg_swarms *s = t->data;
    uint64_t now = now_ms(s);
    struct swarm *sw = s->swarms, *next;

    for (; sw; sw = next) {
        next = sw->next;
        expire(sw, now);
        if (swarm_wanted(sw))
            traverse_slow(sw, now);
        if (sw->known && sw->content == NULL)
            s->cfg.host.open(s->cfg.host.arg, sw->root, &sw->content);
        if (now >= sw->next_choke) {
            choke_round(sw, now);
            sw->next_choke = now + CHOKE_ROUND_MS;
        }
        for (struct peer *p = sw->peers; p; p = p->next) {
            if (p->pex && p->got_hello && now >= p->next_pex) {
                p->next_pex = now + PEX_INTERVAL_MS;
                send_pex(p);
            }
        }
        if (swarm_wanted(sw)) {
            sw->last_used = now;
            maybe_dht(sw, sw->npeers == 0);
            connect_more(sw, now);
        }
        swarm_dirty(sw);
        /* A swarm nobody wants, fetches from us or waits on is dropped. */
        int busy = swarm_wanted(sw);
        for (struct peer *p = sw->peers; p && !busy; p = p->next)
            busy = p->interested;
        if (!busy && now - sw->last_used >= IDLE_SWARM_MS)
            swarm_free(sw);
    }
    run_announces(s, now);
}

/* ------------------------------------------------------------------ API */

static struct swarm *get_swarm(struct dg_swarms *s, const uint8_t root[32])
{
    struct swarm *sw = find_swarm(s, root, 32);

    return sw ? sw : swarm_new(s, root);
}

int dg_swarms_start(const struct dg_swarms_config *cfg, struct dg_swarms **out)
{
    struct dg_swarms *s = calloc(1, sizeof(*s));
    struct sockaddr_in any = {0};
    struct sockaddr_storage bound;
    int len = sizeof(bound), rc;

    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    s->cfg.peers = NULL;
    s->loop = cfg->loop;
    s->buf = malloc(SCRATCH);
    if (!s->buf) {
        free(s);
        return -ENOMEM;
    }
    if (cfg->peers && *cfg->peers) {
        rc = dg_swarms_parse_peers(cfg->peers, s->statics, MAX_STATIC_PEERS);
        if (rc < 0) {
            free(s->buf);
            free(s);
            return rc;
        }
        s->nstatics = (size_t)rc < MAX_STATIC_PEERS ? (size_t)rc : MAX_STATIC_PEERS;
    }
    uv_tcp_init(s->loop, &s->listener);
    uv_timer_init(s->loop, &s->timer);
    uv_check_init(s->loop, &s->check);
    s->listener.data = s->timer.data = s->check.data = s;
    s->handles = 3;
    any.sin_family = AF_INET;
    any.sin_port = htons(cfg->port);
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&any, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, 128, on_accept);
    if (rc == 0)
        rc = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
    if (rc < 0) {
        dg_swarms_stop(s, NULL, NULL);
        return rc;
    }
    s->port = addr_port(&bound);
    uv_timer_start(&s->timer, on_tick, TICK_MS, TICK_MS);
    uv_check_start(&s->check, on_check);
    *out = s;
    return 0;
}

uint16_t dg_swarms_port(const struct dg_swarms *s)
{
    return s->port;
}

static void swarms_handle_closed(uv_handle_t *h)
{
    struct dg_swarms *s = h->data;

    if (--s->handles > 0)
        return;
    if (s->closed)
        s->closed(s->closed_arg);
    free(s->buf);
    free(s);
}

void dg_swarms_stop(struct dg_swarms *s, void (*closed)(void *arg), void *arg)
{
    s->stopping = 1;
    s->closed = closed;
    s->closed_arg = arg;
    while (s->swarms)
        swarm_free(s->swarms);
    while (s->pending)
        dg_peer_conn_close(s->pending->conn, DG_PEER_CLOSE_LOCAL); /* unlinks it */
    while (s->bans) {
        struct ban *b = s->bans;
        s->bans = b->next;
        free(b);
    }
    while (s->announces) {
        struct announce *a = s->announces;
        s->announces = a->next;
        free(a);
    }
    uv_close((uv_handle_t *)&s->listener, swarms_handle_closed);
    uv_close((uv_handle_t *)&s->timer, swarms_handle_closed);
    uv_close((uv_handle_t *)&s->check, swarms_handle_closed);
}

void dg_swarms_lookup(struct dg_swarms *s, const uint8_t root[32], uint64_t token,
                      dg_swarms_lookup_cb cb, void *arg)
{
    struct swarm *sw;
    struct lookup *l;

    if (s->stopping) {
        cb(arg, -ESHUTDOWN);
        return;
    }
    sw = get_swarm(s, root);
    if (!sw) {
        cb(arg, -ENOMEM);
        return;
    }
    if (sw->known) {
        cb(arg, 0);
        return;
    }
    if (s->nstatics == 0 && sw->npeers == 0 && sw->ncands == 0 &&
        (!s->cfg.host.dht_nodes || s->cfg.host.dht_nodes(s->cfg.host.arg) == 0)) {
        /* Nobody to ask (no peers given, no DHT nodes, none bootstrapping): no waiting. */
        cb(arg, -ENOENT);
        return;
    }
    l = calloc(1, sizeof(*l));
    if (!l) {
        cb(arg, -ENOMEM);
        return;
    }
    l->token = token;
    l->deadline = now_ms(s) + s->cfg.lookup_timeout_ms;
    l->cb = cb;
    l->arg = arg;
    l->next = sw->lookups;
    sw->lookups = l;
    sw->last_used = now_ms(s);
    maybe_dht(sw, 1);
    connect_more(sw, now_ms(s));
    swarm_dirty(sw);
}

int dg_swarms_cancel_lookup(struct dg_swarms *s, uint64_t token)
{
    for (struct swarm *sw = s->swarms; sw; sw = sw->next) {
        for (struct lookup **lp = &sw->lookups; *lp; lp = &(*lp)->next) {
            if ((*lp)->token == token) {
                struct lookup *l = *lp;
                *lp = l->next;
                l->cb(l->arg, -EINTR);
                free(l);
                return 1;
            }
        }
    }
    return 0;
}

void dg_swarms_read(struct dg_swarms *s, const uint8_t root[32], uint64_t off, uint64_t len)
{
    struct swarm *sw = find_swarm(s, root, 32);

    if (!sw) {
        struct dg_root_info info;
        /* Only roots still being fetched need a swarm for reading. */
        if (dg_piece_cache_root_info(s->cfg.cache, root, &info) < 0 || info.shared_files > 0 ||
            info.blocks_cached == info.blocks_total)
            return;
        if (!(sw = swarm_new(s, root)))
            return;
    }
    sw->last_used = sw->last_read = now_ms(s);
    if (!sw->known || sw->nheld == sw->nblocks)
        return;
    /* Sequential readers get a read-ahead window that doubles with each read; the kernel's
     * own read-ahead sends reads in parallel and out of order, so a read a little behind the
     * furthest one is still sequential. Any other read starts over without read-ahead. */
    uint64_t end = off + len, slack = sw->window > (4u << 20) ? sw->window : (4u << 20);
    if (sw->seq_end && end <= sw->seq_end && end + slack >= sw->seq_end) {
        /* late, from inside the window: nothing changes */
    } else if (sw->seq_end && off <= sw->seq_end + slack && end + slack >= sw->seq_end) {
        sw->window = sw->window ? (sw->window * 2 > READAHEAD_MAX ? READAHEAD_MAX : sw->window * 2)
                                : READAHEAD_MIN;
        sw->seq_end = end > sw->seq_end ? end : sw->seq_end;
    } else {
        sw->window = 0;
        sw->seq_end = end;
    }
    sw->ra_from = sw->seq_end;
    sw->ra_to = sw->seq_end + sw->window;
    connect_more(sw, now_ms(s));
    swarm_dirty(sw);
}

void dg_swarms_want(struct dg_swarms *s, const uint8_t root[32])
{
    struct swarm *sw = get_swarm(s, root);

    if (!sw)
        return;
    sw->last_used = sw->last_read = now_ms(s);
    if (sw->npeers == 0)
        maybe_dht(sw, 1);
    connect_more(sw, now_ms(s));
    swarm_dirty(sw);
}

void dg_swarms_set_pinned(struct dg_swarms *s, const uint8_t root[32], int pinned)
{
    struct swarm *sw = pinned ? get_swarm(s, root) : find_swarm(s, root, 32);

    if (!sw)
        return;
    sw->pinned = pinned;
    swarm_dirty(sw);
}

void dg_swarms_block_stored(struct dg_swarms *s, const uint8_t root[32], uint64_t block)
{
    struct swarm *sw = find_swarm(s, root, 32);

    if (!sw || !sw->known || block >= sw->nblocks || bit_get(sw->held, block))
        return;
    bit_set(sw->held, block);
    sw->nheld++;
    for (struct peer *p = sw->peers; p; p = p->next) {
        uint8_t b[16];
        send_buf(p, b, dg_peer_msg_have((uint32_t)block, 1, b, sizeof(b)));
    }
}

void dg_swarms_found(struct dg_swarms *s, const uint8_t key[20], const struct dg_dht_compact *peers,
                     size_t n, const struct sockaddr *via)
{
    struct swarm *sw = find_swarm(s, key, 20);

    if (!sw)
        return;
    for (size_t i = 0; i < n; i++) {
        struct sockaddr_storage a = {0};
        if (peers[i].len == DG_DHT_COMPACT4_LEN) {
            struct sockaddr_in *a4 = (struct sockaddr_in *)&a;
            a4->sin_family = AF_INET;
            memcpy(&a4->sin_addr, peers[i].bytes, 4);
            memcpy(&a4->sin_port, peers[i].bytes + 4, 2);
        } else if (peers[i].len == DG_DHT_COMPACT6_LEN) {
            struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&a;
            a6->sin6_family = AF_INET6;
            memcpy(&a6->sin6_addr, peers[i].bytes, 16);
            memcpy(&a6->sin6_port, peers[i].bytes + 16, 2);
        } else {
            continue;
        }
        add_candidate(sw, &a, via, NULL);
    }
    connect_more(sw, now_ms(s));
}

void dg_swarms_announce(struct dg_swarms *s, const uint8_t root[32], int on)
{
    for (struct announce **ap = &s->announces; *ap; ap = &(*ap)->next) {
        if (memcmp((*ap)->root, root, 32) == 0) {
            if (!on) {
                struct announce *a = *ap;
                *ap = a->next;
                free(a);
            }
            return;
        }
    }
    if (!on)
        return;
    struct announce *a = calloc(1, sizeof(*a));
    if (!a)
        return;
    memcpy(a->root, root, 32);
    a->due = 0; /* now */
    a->next = s->announces;
    s->announces = a;
}

static void count_wanted(void *ctx, uint64_t off, uint64_t len)
{
    (void)off;
    (void)len;
    (*(int *)ctx)++;
}

size_t dg_swarms_release_idle(struct dg_swarms *s, const uint8_t *keep)
{
    struct swarm *sw = s->swarms, *next;
    size_t n = 0;

    for (; sw; sw = next) {
        int waiting = 0;
        next = sw->next;
        if ((keep && memcmp(sw->root, keep, 32) == 0) || sw->lookups || sw->pinned)
            continue;
        s->cfg.host.each_wanted(s->cfg.host.arg, sw->root, count_wanted, &waiting);
        if (waiting)
            continue;
        swarm_free(sw);
        n++;
    }
    return n;
}

int dg_swarms_holds(struct dg_swarms *s, const uint8_t key[20])
{
    uint8_t after[32] = {0}, roots[32];
    struct dg_root_info info;
    size_t n = 0;

    memcpy(after, key, 20);
    if (dg_piece_cache_root_info(s->cfg.cache, after, &info) == 0)
        return info.shared_files > 0 || info.blocks_cached == info.blocks_total;
    return dg_piece_cache_list_roots(s->cfg.cache, after, roots, 1, &n) == 0 && n == 1 &&
           memcmp(roots, key, 20) == 0;
}

void dg_swarms_stats(const struct dg_swarms *s, struct dg_swarm_stats *out)
{
    *out = s->stats;
}

size_t dg_swarms_list(const struct dg_swarms *s, struct dg_swarm_info *out, size_t max)
{
    size_t n = 0;

    for (const struct swarm *sw = s->swarms; sw && n < max; sw = sw->next, n++) {
        memset(&out[n], 0, sizeof(out[n]));
        memcpy(out[n].root, sw->root, 32);
        out[n].known = sw->known;
        out[n].length = sw->known ? sw->length : 0;
        out[n].blocks_total = sw->known ? sw->nblocks : 0;
        out[n].blocks_held = sw->nheld;
        out[n].peers = sw->npeers;
        out[n].bytes_in = sw->bytes_in;
        out[n].bytes_out = sw->bytes_out;
        for (const struct peer *p = sw->peers; p; p = p->next) {
            if (!p->got_hello)
                continue;
            switch (dg_peer_conn_transport(p->conn)) {
            case DG_PEER_TRANSPORT_TCP:
                out[n].peers_tcp++;
                break;
            case DG_PEER_TRANSPORT_UTP:
                out[n].peers_utp++;
                break;
            case DG_PEER_TRANSPORT_RELAY:
                out[n].peers_relayed++;
                break;
            }
            out[n].peers_punched += dg_peer_conn_punched(p->conn) != 0;
        }
    }
    return n;
}
