/* Hole punching through a rendezvous: see holepunch.h and docs/PROTOCOL.md section 6.
 *
 * Layout: the message codec; small helpers (addresses, a keyed hash for randomness and
 * cookies, per-IP rate windows); then the three roles (rendezvous, responder, initiator), the
 * punch sessions the last two share, and the timers.
 *
 * Sessions live in fixed arrays, one per role. A session that ends inside a call is only
 * marked S_DEAD and freed when the outermost call returns (sweep()), so callbacks may start
 * new sessions while a loop over the arrays runs and their arguments stay valid. */
#include "engine/holepunch.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_LEN (DG_HP_MAGIC_LEN + 1 + DG_HP_NONCE_LEN)
#define RATE_WINDOW_MS 10000u
#define RATE_SLOTS 256        /* source IPs (or IPv6 /64s) remembered per rate table */
#define DONE_SLOTS 64         /* records of finished sessions */
#define DONE_REPEATS 2        /* extra replies a finished session sends its peer */
#define COOKIE_EPOCH_MS 60000 /* a cookie is good in its minute and the next */
#define MAX_COOKIES 3         /* COOKIEs an initiator session takes */
#define FIRST_PORT 1024       /* sprayed ports: FIRST_PORT..65535 */

enum state {
    S_FREE = 0,
    S_DEAD,       /* ended inside the current call; freed when it returns */
    S_CONNECTING, /* initiator: asking the rendezvous */
    S_PUNCHING,   /* initiator or responder: probing */
    S_WAITING,    /* rendezvous: PUNCH sent, waiting for the responder */
    S_ANSWERED,   /* rendezvous: answer sent; kept to repeat it to a resent CONNECT */
};

/* How a punch session probes (holepunch.h, "Punching, by NAT class"). */
enum how {
    HOW_NOTHING,  /* both hard */
    HOW_DIRECT,   /* the known address, every DG_HP_PROBE_INTERVAL_MS */
    HOW_SPRAY,    /* easy facing hard: that, and random ports of the peer's IP */
    HOW_BIRTHDAY, /* hard facing easy: from many sockets to the known address */
};

/* An address as the wire carries it. */
struct addr {
    uint8_t family; /* 4 or 6; 0: none */
    uint16_t port;  /* host order */
    uint8_t ip[16]; /* IPv4 in the first 4 bytes */
};

/* An initiator (B) or responder (A) session. */
struct session {
    enum state state;
    int initiator;
    uint8_t key[20];
    uint8_t nonce[DG_HP_NONCE_LEN];
    struct addr target; /* B: A's address as asked for */
    struct addr via;    /* the rendezvous: B asks it; A got the PUNCH from it */
    struct addr peer;   /* the other side's address, once known */
    enum dg_hp_mode mode;
    enum dg_nat_class nat, peer_nat; /* ours when the session started; theirs */
    uint8_t cookie[DG_HP_COOKIE_LEN];
    int cookies;        /* COOKIEs taken */
    uint64_t started;   /* B: dg_hp_connect; A: the PUNCH */
    uint64_t next_send; /* B, connecting: the next CONNECT */
    /* punching */
    enum how how;
    uint64_t deadline;
    uint64_t next_probe; /* to the known address (birthday: a round from every socket) */
    int *paths;          /* birthday: extra sockets, owned until closed or handed over */
    size_t npaths;
    uint64_t spray_key;   /* the permutation of ports */
    uint32_t spray_index; /* next input of the permutation, 0..65536 */
    uint32_t sprayed;
    uint64_t next_spray;
};

/* A rendezvous session (D). */
struct rendezvous {
    enum state state;
    uint8_t key[20];
    uint8_t nonce[DG_HP_NONCE_LEN];
    struct addr b; /* the CONNECT's source: every answer goes there */
    struct addr a; /* where the PUNCH goes: announced */
    enum dg_nat_class b_nat;
    enum dg_hp_mode mode;
    uint16_t relay_port;
    int resent;
    uint64_t started;
    uint64_t expires; /* waiting: the responder's deadline; answered: end of the record */
    struct dg_hp_msg answer;
};

/* What is left of a finished initiator or responder session for DG_HP_LINGER_MS. */
struct done {
    int used;
    int initiator;
    uint8_t nonce[DG_HP_NONCE_LEN];
    int path;         /* the punched path; -1: none (relay, or nothing to punch) */
    struct addr peer; /* punched: where its probes come from (IP), where repeats go */
    struct addr via;  /* responder: the rendezvous, whose resent PUNCH is acked again */
    enum dg_nat_class nat;
    int repeats;
    uint64_t next_repeat, until;
};

/* Requests from one source IP in the current window. */
struct rate {
    int used;
    uint8_t family;
    uint8_t ip[16]; /* IPv6: the /64 only */
    uint32_t count;
    uint64_t start;
};

struct dg_hp {
    struct dg_hp_ops ops;
    void *arg;
    enum dg_nat_class nat;
    uint64_t rand_key[2], cookie_key[2], counter;
    int depth; /* nesting of public calls, for sweep() */
    struct session init[DG_HP_MAX_SESSIONS];
    struct session resp[DG_HP_MAX_SESSIONS];
    struct rendezvous rdv[DG_HP_MAX_SESSIONS];
    struct done done[DONE_SLOTS];
    struct rate connect_rate[RATE_SLOTS], punch_rate[RATE_SLOTS];
    struct dg_hp_stats st;
};

/* ------------------------------------------------------------------ addresses */

/* Converts @p sa; @return 0, or -EINVAL for another family. */
static int addr_from_sa(struct addr *a, const struct sockaddr *sa)
{
    memset(a, 0, sizeof(*a));
    if (sa && sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        a->family = 4;
        a->port = ntohs(sin->sin_port);
        memcpy(a->ip, &sin->sin_addr, 4);
        return 0;
    }
    if (sa && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        a->family = 6;
        a->port = ntohs(sin6->sin6_port);
        memcpy(a->ip, &sin6->sin6_addr, 16);
        return 0;
    }
    return -EINVAL;
}

/* Converts back; @p a must have a family. */
static void addr_to_ss(const struct addr *a, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (a->family == 4) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(a->port);
        memcpy(&sin->sin_addr, a->ip, 4);
    } else if (a->family == 6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(a->port);
        memcpy(&sin6->sin6_addr, a->ip, 16);
    }
}

/* Bytes of the IP that count: 4 or 16. */
static size_t ip_len(const struct addr *a)
{
    return a->family == 4 ? 4 : 16;
}

/* Same family and IP (any port). */
static int ip_eq(const struct addr *a, const struct addr *b)
{
    return a->family == b->family && a->family != 0 && memcmp(a->ip, b->ip, ip_len(a)) == 0;
}

/* Same family, IP and port. */
static int addr_eq(const struct addr *a, const struct addr *b)
{
    return ip_eq(a, b) && a->port == b->port;
}

/* Whether an IPv4 address can be a peer: not 0/8, multicast, reserved or broadcast. */
static int ip4_real(const uint8_t *ip)
{
    return ip[0] != 0 && ip[0] < 224;
}

/* Whether @p a can be sent to: a port, and an IP that is neither unspecified, multicast nor
 * broadcast (a directed broadcast cannot be told from here). */
static int addr_real(const struct addr *a)
{
    static const uint8_t zero[16], mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    if (a->port == 0)
        return 0;
    if (a->family == 4)
        return ip4_real(a->ip);
    if (a->family != 6 || memcmp(a->ip, zero, 16) == 0 || a->ip[0] == 0xff)
        return 0;
    return memcmp(a->ip, mapped, 12) != 0 || ip4_real(a->ip + 12);
}

/* ------------------------------------------------------------------ codec */

struct reader {
    const uint8_t *p;
    size_t left;
    int bad;
};

/* The next @p n bytes, or NULL (and the reader marked bad) if there are fewer. */
static const uint8_t *take(struct reader *r, size_t n)
{
    const uint8_t *q = r->p;

    if (r->bad || r->left < n) {
        r->bad = 1;
        return NULL;
    }
    r->p += n;
    r->left -= n;
    return q;
}

/* One byte (0 once the reader is bad). */
static uint8_t get_u8(struct reader *r)
{
    const uint8_t *q = take(r, 1);
    return q ? q[0] : 0;
}

/* A big-endian u16 (0 once the reader is bad). */
static uint16_t get_u16(struct reader *r)
{
    const uint8_t *q = take(r, 2);
    return q ? (uint16_t)(q[0] << 8 | q[1]) : 0;
}

/* @p n bytes into @p out (left as they are once the reader is bad). */
static void get_bytes(struct reader *r, uint8_t *out, size_t n)
{
    const uint8_t *q = take(r, n);

    if (q)
        memcpy(out, q, n);
}

/* Family byte, IP, port; checked later by msg_valid(). */
static void get_addr(struct reader *r, struct sockaddr_storage *ss)
{
    struct addr a;
    uint8_t family = get_u8(r);

    memset(&a, 0, sizeof(a));
    if (family != 4 && family != 6) {
        r->bad = 1;
        return;
    }
    a.family = family;
    get_bytes(r, a.ip, family == 4 ? 4 : 16);
    a.port = get_u16(r);
    addr_to_ss(&a, ss);
}

struct writer {
    uint8_t *p;
    size_t left;
    int full;
};

/* Appends @p n bytes, or marks the writer full. */
static void put_bytes(struct writer *w, const void *src, size_t n)
{
    if (w->full || w->left < n) {
        w->full = 1;
        return;
    }
    memcpy(w->p, src, n);
    w->p += n;
    w->left -= n;
}

/* Appends one byte. */
static void put_u8(struct writer *w, unsigned v)
{
    uint8_t b = (uint8_t)v;
    put_bytes(w, &b, 1);
}

/* Appends a big-endian u16. */
static void put_u16(struct writer *w, uint16_t v)
{
    uint8_t b[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    put_bytes(w, b, 2);
}

/* Family byte, IP, port of an address msg_valid() accepted. */
static void put_addr(struct writer *w, const struct sockaddr_storage *ss)
{
    struct addr a;

    addr_from_sa(&a, (const struct sockaddr *)ss);
    put_u8(w, a.family);
    put_bytes(w, a.ip, ip_len(&a));
    put_u16(w, a.port);
}

/* Whether @p v is an enum dg_nat_class. */
static int nat_valid(unsigned v)
{
    return v <= DG_NAT_HARD;
}

/* Whether @p v is an enum dg_hp_mode. */
static int mode_valid(unsigned v)
{
    return v == DG_HP_MODE_PUNCH || v == DG_HP_MODE_RELAY;
}

/* Whether @p ss is an address a message may carry. */
static int ss_valid(const struct sockaddr_storage *ss)
{
    struct addr a;
    return addr_from_sa(&a, (const struct sockaddr *)ss) == 0 && addr_real(&a);
}

/* The rules of holepunch.h for each field of @p m; the same for parsing and formatting. */
static int msg_valid(const struct dg_hp_msg *m)
{
    int relay = m->mode == DG_HP_MODE_RELAY;

    switch (m->type) {
    case DG_HP_CONNECT:
        return ss_valid(&m->addr) && nat_valid(m->nat) && mode_valid(m->mode);
    case DG_HP_COOKIE:
        return 1;
    case DG_HP_PUNCH:
    case DG_HP_CONNECT_ACK:
        return ss_valid(&m->addr) && nat_valid(m->nat) && mode_valid(m->mode) &&
               (m->relay_port != 0) == relay;
    case DG_HP_PUNCH_ACK:
        return nat_valid(m->nat);
    case DG_HP_PUNCH_REJECT:
        return m->reason == DG_HP_FAIL_REFUSED || m->reason == DG_HP_FAIL_BUSY;
    case DG_HP_CONNECT_REJECT:
        return m->reason == DG_HP_FAIL_UNKNOWN_PEER || m->reason == DG_HP_FAIL_REFUSED ||
               m->reason == DG_HP_FAIL_BUSY || m->reason == DG_HP_FAIL_NO_RELAY;
    case DG_HP_PROBE:
        return nat_valid(m->nat) && (m->flags & ~DG_HP_PROBE_REPLY) == 0;
    }
    return 0;
}

int dg_hp_parse(const uint8_t *buf, size_t len, struct dg_hp_msg *out)
{
    struct reader r = {buf, len, 0};
    unsigned v;

    memset(out, 0, sizeof(*out));
    if (len < HEADER_LEN || len > DG_HP_MAX_MESSAGE || !dg_hp_is_packet(buf, len))
        return -EBADMSG;
    take(&r, DG_HP_MAGIC_LEN);
    v = get_u8(&r);
    if (v < DG_HP_CONNECT || v > DG_HP_PROBE)
        return -EBADMSG;
    out->type = (enum dg_hp_type)v;
    get_bytes(&r, out->nonce, DG_HP_NONCE_LEN);
    /* Bytes that hold enums are range-checked before they are stored as one. */
    if (out->type == DG_HP_CONNECT || out->type == DG_HP_PUNCH)
        get_bytes(&r, out->key, 20);
    if (out->type == DG_HP_CONNECT || out->type == DG_HP_PUNCH || out->type == DG_HP_CONNECT_ACK)
        get_addr(&r, &out->addr);
    if (out->type != DG_HP_COOKIE && out->type != DG_HP_PUNCH_REJECT &&
        out->type != DG_HP_CONNECT_REJECT) {
        v = get_u8(&r);
        if (!nat_valid(v))
            return -EBADMSG;
        out->nat = (enum dg_nat_class)v;
    }
    if (out->type == DG_HP_CONNECT || out->type == DG_HP_PUNCH || out->type == DG_HP_CONNECT_ACK) {
        v = get_u8(&r);
        if (!mode_valid(v))
            return -EBADMSG;
        out->mode = (enum dg_hp_mode)v;
    }
    if (out->type == DG_HP_PUNCH || out->type == DG_HP_CONNECT_ACK)
        out->relay_port = get_u16(&r);
    if (out->type == DG_HP_PUNCH_REJECT || out->type == DG_HP_CONNECT_REJECT) {
        v = get_u8(&r);
        if (v < DG_HP_FAIL_NO_ANSWER || v > DG_HP_FAIL_BOTH_HARD)
            return -EBADMSG;
        out->reason = (enum dg_hp_failure)v;
    }
    if (out->type == DG_HP_PROBE)
        out->flags = get_u8(&r);
    if (out->type == DG_HP_CONNECT || out->type == DG_HP_COOKIE)
        get_bytes(&r, out->cookie, DG_HP_COOKIE_LEN);
    if (r.bad || r.left != 0 || !msg_valid(out)) {
        memset(out, 0, sizeof(*out));
        return -EBADMSG;
    }
    return 0;
}

int dg_hp_format(const struct dg_hp_msg *m, uint8_t *out, size_t cap)
{
    struct writer w = {out, cap, 0};
    enum dg_hp_type t = m->type;

    if (!msg_valid(m))
        return -EINVAL;
    put_bytes(&w, DG_HP_MAGIC, DG_HP_MAGIC_LEN);
    put_u8(&w, t);
    put_bytes(&w, m->nonce, DG_HP_NONCE_LEN);
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH)
        put_bytes(&w, m->key, 20);
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK)
        put_addr(&w, &m->addr);
    if (t != DG_HP_COOKIE && t != DG_HP_PUNCH_REJECT && t != DG_HP_CONNECT_REJECT)
        put_u8(&w, m->nat);
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK)
        put_u8(&w, m->mode);
    if (t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK)
        put_u16(&w, m->relay_port);
    if (t == DG_HP_PUNCH_REJECT || t == DG_HP_CONNECT_REJECT)
        put_u8(&w, m->reason);
    if (t == DG_HP_PROBE)
        put_u8(&w, m->flags);
    if (t == DG_HP_CONNECT || t == DG_HP_COOKIE)
        put_bytes(&w, m->cookie, DG_HP_COOKIE_LEN);
    if (w.full)
        return -ENOBUFS;
    return (int)(cap - w.left);
}

int dg_hp_is_packet(const uint8_t *buf, size_t len)
{
    return len >= DG_HP_MAGIC_LEN && memcmp(buf, DG_HP_MAGIC, DG_HP_MAGIC_LEN) == 0;
}

const char *dg_nat_class_name(enum dg_nat_class c)
{
    switch (c) {
    case DG_NAT_UNKNOWN:
        return "unknown";
    case DG_NAT_NONE:
        return "none";
    case DG_NAT_EASY:
        return "easy";
    case DG_NAT_HARD:
        return "hard";
    }
    return "?";
}

/* ------------------------------------------------------------------ keyed hash, randomness */

/* Rotates left by @p b (0 < b < 64). */
static uint64_t rotl(uint64_t x, int b)
{
    return x << b | x >> (64 - b);
}

/* One SipRound of SipHash on the state @p v. */
static void sipround(uint64_t v[4])
{
    v[0] += v[1];
    v[1] = rotl(v[1], 13) ^ v[0];
    v[0] = rotl(v[0], 32);
    v[2] += v[3];
    v[3] = rotl(v[3], 16) ^ v[2];
    v[0] += v[3];
    v[3] = rotl(v[3], 21) ^ v[0];
    v[2] += v[1];
    v[1] = rotl(v[1], 17) ^ v[2];
    v[2] = rotl(v[2], 32);
}

/* SipHash-2-4 of @p m under @p k (a keyed hash whose outputs do not reveal the key). */
static uint64_t siphash(const uint64_t k[2], const uint8_t *m, size_t len)
{
    uint64_t v[4] = {k[0] ^ 0x736f6d6570736575ull, k[1] ^ 0x646f72616e646f6dull,
                     k[0] ^ 0x6c7967656e657261ull, k[1] ^ 0x7465646279746573ull};
    uint64_t w;
    size_t i = 0;

    for (;; i += 8) {
        w = 0;
        if (len - i < 8)
            break;
        for (int j = 0; j < 8; j++)
            w |= (uint64_t)m[i + j] << (8 * j);
        v[3] ^= w;
        sipround(v);
        sipround(v);
        v[0] ^= w;
    }
    for (size_t j = 0; i + j < len; j++)
        w |= (uint64_t)m[i + j] << (8 * j);
    w |= (uint64_t)len << 56;
    v[3] ^= w;
    sipround(v);
    sipround(v);
    v[0] ^= w;
    v[2] ^= 0xff;
    for (int j = 0; j < 4; j++)
        sipround(v);
    return v[0] ^ v[1] ^ v[2] ^ v[3];
}

/* Expands the seed into keys (splitmix64 steps). */
static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The next 64 random bits: the keyed hash of a counter. */
static uint64_t rand64(struct dg_hp *hp)
{
    uint8_t c[8];

    for (int i = 0; i < 8; i++)
        c[i] = (uint8_t)(hp->counter >> (8 * i));
    hp->counter++;
    return siphash(hp->rand_key, c, sizeof(c));
}

/* The cookie of (@p from, @p nonce) in minute @p epoch. */
static void make_cookie(const struct dg_hp *hp, const struct addr *from, const uint8_t *nonce,
                        uint64_t epoch, uint8_t out[DG_HP_COOKIE_LEN])
{
    uint8_t in[1 + 16 + 2 + DG_HP_NONCE_LEN + 8];
    uint64_t h;

    in[0] = from->family;
    memcpy(in + 1, from->ip, 16);
    in[17] = (uint8_t)(from->port >> 8);
    in[18] = (uint8_t)from->port;
    memcpy(in + 19, nonce, DG_HP_NONCE_LEN);
    for (int i = 0; i < 8; i++)
        in[19 + DG_HP_NONCE_LEN + i] = (uint8_t)(epoch >> (8 * i));
    h = siphash(hp->cookie_key, in, sizeof(in));
    for (int i = 0; i < DG_HP_COOKIE_LEN; i++)
        out[i] = (uint8_t)(h >> (8 * i));
}

/* Whether @p cookie is the one of (@p from, @p nonce) of this minute or the last. */
static int cookie_ok(const struct dg_hp *hp, const struct addr *from, const uint8_t *nonce,
                     const uint8_t *cookie, uint64_t now)
{
    uint64_t epoch = now / COOKIE_EPOCH_MS;
    uint8_t want[DG_HP_COOKIE_LEN];

    make_cookie(hp, from, nonce, epoch, want);
    if (memcmp(want, cookie, DG_HP_COOKIE_LEN) == 0)
        return 1;
    if (epoch == 0)
        return 0;
    make_cookie(hp, from, nonce, epoch - 1, want);
    return memcmp(want, cookie, DG_HP_COOKIE_LEN) == 0;
}

/* Position @p i of a keyed permutation of 0..65535: a four-round Feistel network on bytes. */
static uint16_t permute(uint64_t key, uint16_t i)
{
    uint8_t l = (uint8_t)(i >> 8), r = (uint8_t)i;

    for (int round = 0; round < 4; round++) {
        uint32_t f = (uint32_t)(r ^ (uint8_t)(key >> (8 * round))) * 0x9e3779b1u;
        uint8_t t = r;
        r = l ^ (uint8_t)(f >> 24) ^ (uint8_t)(key >> (32 + 8 * round));
        l = t;
    }
    return (uint16_t)(l << 8 | r);
}

/* ------------------------------------------------------------------ rate windows */

/* Counts one request from @p from's IP (IPv6: its /64). @return 1 if it is within
 * DG_HP_RATE_MAX per RATE_WINDOW_MS, 0 if not. A full table forgets its oldest window. */
static int rate_ok(struct rate *t, const struct addr *from, uint64_t now)
{
    size_t n = from->family == 4 ? 4 : 8;
    struct rate *slot = NULL;

    for (int i = 0; i < RATE_SLOTS; i++) {
        struct rate *e = &t[i];
        if (e->used && e->family == from->family && memcmp(e->ip, from->ip, n) == 0) {
            if (now - e->start >= RATE_WINDOW_MS || now < e->start) {
                e->start = now;
                e->count = 0;
            }
            if (e->count >= DG_HP_RATE_MAX)
                return 0;
            e->count++;
            return 1;
        }
        if (!slot || !e->used || (slot->used && e->start < slot->start))
            slot = e;
    }
    memset(slot, 0, sizeof(*slot));
    slot->used = 1;
    slot->family = from->family;
    memcpy(slot->ip, from->ip, n);
    slot->start = now;
    slot->count = 1;
    return 1;
}

/* ------------------------------------------------------------------ sending */

/* A zeroed message of @p type for session @p nonce. */
static void msg_init(struct dg_hp_msg *m, enum dg_hp_type type, const uint8_t *nonce)
{
    memset(m, 0, sizeof(*m));
    m->type = type;
    memcpy(m->nonce, nonce, DG_HP_NONCE_LEN);
}

/* Formats @p m and sends it on @p path to @p to. */
static void send_msg(struct dg_hp *hp, int path, const struct dg_hp_msg *m, const struct addr *to)
{
    uint8_t buf[DG_HP_MAX_MESSAGE];
    struct sockaddr_storage ss;
    int n = dg_hp_format(m, buf, sizeof(buf));

    if (n < 0)
        return;
    if (m->type == DG_HP_PROBE)
        hp->st.probes_sent++;
    addr_to_ss(to, &ss);
    hp->ops.send(hp->arg, path, buf, (size_t)n, (const struct sockaddr *)&ss);
}

/* A PROBE for session @p nonce, a reply or not. */
static void send_probe(struct dg_hp *hp, int path, const uint8_t *nonce, enum dg_nat_class nat,
                       int reply, const struct addr *to)
{
    struct dg_hp_msg m;

    msg_init(&m, DG_HP_PROBE, nonce);
    m.nat = nat;
    m.flags = reply ? DG_HP_PROBE_REPLY : 0;
    send_msg(hp, path, &m, to);
}

/* A one-byte-reason reject (PUNCH_REJECT or CONNECT_REJECT). */
static void send_reject(struct dg_hp *hp, enum dg_hp_type type, const uint8_t *nonce,
                        enum dg_hp_failure why, const struct addr *to)
{
    struct dg_hp_msg m;

    msg_init(&m, type, nonce);
    m.reason = why;
    send_msg(hp, 0, &m, to);
}

/* ------------------------------------------------------------------ session lifetime */

/* Notes that a public call runs (see leave()). */
static void enter(struct dg_hp *hp)
{
    hp->depth++;
}

/* Frees what ended during the outermost call. */
static void leave(struct dg_hp *hp)
{
    if (--hp->depth > 0)
        return;
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        if (hp->init[i].state == S_DEAD)
            memset(&hp->init[i], 0, sizeof(hp->init[i]));
        if (hp->resp[i].state == S_DEAD)
            memset(&hp->resp[i], 0, sizeof(hp->resp[i]));
    }
}

/* Ends @p s: closes its extra paths except @p keep (handed to the engine). The slot stays
 * reserved, and its fields readable, until the outermost call returns. */
static void end_session(struct dg_hp *hp, struct session *s, int keep)
{
    int *paths = s->paths;
    size_t n = s->npaths;

    s->state = S_DEAD;
    s->paths = NULL;
    s->npaths = 0;
    for (size_t i = 0; i < n; i++)
        if (paths[i] != keep && hp->ops.close_path)
            hp->ops.close_path(hp->arg, paths[i]);
    free(paths);
}

/* Ends initiator session @p s and tells the engine why. */
static void fail(struct dg_hp *hp, struct session *s, enum dg_hp_failure why)
{
    struct sockaddr_storage target;

    addr_to_ss(&s->target, &target);
    end_session(hp, s, 0);
    hp->st.failed++;
    if (hp->ops.failed)
        hp->ops.failed(hp->arg, s->key, (const struct sockaddr *)&target, why);
}

/* The running session (connecting or punching) with @p nonce in @p arr, or NULL. */
static struct session *find_session(struct session *arr, const uint8_t *nonce)
{
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if ((arr[i].state == S_CONNECTING || arr[i].state == S_PUNCHING) &&
            memcmp(arr[i].nonce, nonce, DG_HP_NONCE_LEN) == 0)
            return &arr[i];
    return NULL;
}

/* A free slot of @p arr, or NULL (ended ones are not free before leave()). */
static struct session *free_session(struct session *arr)
{
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if (arr[i].state == S_FREE)
            return &arr[i];
    return NULL;
}

/* The unexpired record of a finished session of that role with @p nonce, or NULL. */
static struct done *find_done(struct dg_hp *hp, const uint8_t *nonce, int initiator, uint64_t now)
{
    for (int i = 0; i < DONE_SLOTS; i++) {
        struct done *d = &hp->done[i];
        if (d->used && now < d->until && d->initiator == initiator &&
            memcmp(d->nonce, nonce, DG_HP_NONCE_LEN) == 0)
            return d;
    }
    return NULL;
}

/* A fresh record of finished session @p nonce, without a path yet (the oldest record makes
 * room when all are in use). */
static struct done *new_done(struct dg_hp *hp, const uint8_t *nonce, int initiator, uint64_t now)
{
    struct done *d = &hp->done[0];

    for (int i = 0; i < DONE_SLOTS; i++) {
        if (!hp->done[i].used || now >= hp->done[i].until) {
            d = &hp->done[i];
            break;
        }
        if (hp->done[i].until < d->until)
            d = &hp->done[i];
    }
    memset(d, 0, sizeof(*d));
    d->used = 1;
    d->initiator = initiator;
    memcpy(d->nonce, nonce, DG_HP_NONCE_LEN);
    d->path = -1;
    d->until = now + DG_HP_LINGER_MS;
    return d;
}

/* ------------------------------------------------------------------ punching */

/* Unknown counts as easy. */
static enum dg_nat_class effective(enum dg_nat_class c)
{
    return c == DG_NAT_UNKNOWN ? DG_NAT_EASY : c;
}

/* What a side of class @p me does facing @p them. */
static enum how pick(enum dg_nat_class me, enum dg_nat_class them)
{
    me = effective(me);
    them = effective(them);
    if (me == DG_NAT_NONE || them == DG_NAT_NONE)
        return HOW_DIRECT;
    if (me == DG_NAT_EASY && them == DG_NAT_EASY)
        return HOW_DIRECT;
    if (me == DG_NAT_EASY)
        return HOW_SPRAY;
    if (them == DG_NAT_EASY)
        return HOW_BIRTHDAY;
    return HOW_NOTHING;
}

/* Whether a PROBE for @p s may come in on @p path: the main socket or one of its own. */
static int path_ok(const struct session *s, int path)
{
    if (path == 0)
        return 1;
    for (size_t i = 0; i < s->npaths; i++)
        if (s->paths[i] == path)
            return 1;
    return 0;
}

/* The next port to spray, never one sent before nor the known one. @return 0 when none is
 * left. */
static int next_spray_port(struct session *s, uint16_t *port)
{
    while (s->spray_index < 65536) {
        uint16_t p = permute(s->spray_key, (uint16_t)s->spray_index++);
        if (p >= FIRST_PORT && p != s->peer.port) {
            *port = p;
            return 1;
        }
    }
    return 0;
}

/* Sends the probes to guessed ports that are due, up to DG_HP_SPRAY_BURST. */
static void spray(struct dg_hp *hp, struct session *s, uint64_t now)
{
    int burst = 0;

    while (s->sprayed < DG_HP_SPRAY_MAX && s->next_spray <= now && burst < DG_HP_SPRAY_BURST) {
        struct addr to = s->peer;
        if (!next_spray_port(s, &to.port)) {
            s->sprayed = DG_HP_SPRAY_MAX;
            break;
        }
        send_probe(hp, 0, s->nonce, s->nat, 0, &to);
        hp->st.sprayed++;
        s->sprayed++;
        s->next_spray += DG_HP_SPRAY_INTERVAL_MS;
        burst++;
    }
    if (s->next_spray <= now) /* too far behind: the rate holds, the debt is dropped */
        s->next_spray = now + DG_HP_SPRAY_INTERVAL_MS;
}

/* Sends what is due for punching session @p s, or ends it at its deadline. */
static void run_punch(struct dg_hp *hp, struct session *s, uint64_t now)
{
    if (now >= s->deadline) {
        if (s->initiator)
            fail(hp, s, DG_HP_FAIL_TIMEOUT);
        else
            end_session(hp, s, 0);
        return;
    }
    if (now >= s->next_probe) {
        send_probe(hp, 0, s->nonce, s->nat, 0, &s->peer);
        if (s->how == HOW_BIRTHDAY) {
            for (size_t i = 0; i < s->npaths; i++)
                send_probe(hp, s->paths[i], s->nonce, s->nat, 0, &s->peer);
            s->next_probe = now + DG_HP_RESEND_MS;
        } else {
            s->next_probe = now + DG_HP_PROBE_INTERVAL_MS;
        }
    }
    if (s->how == HOW_SPRAY)
        spray(hp, s, now);
}

/* Opens up to DG_HP_BIRTHDAY_SOCKETS extra paths for @p s (fewer, or none, is fine). */
static void open_birthday_paths(struct dg_hp *hp, struct session *s)
{
    size_t n, kept = 0;

    if (!hp->ops.open_paths)
        return;
    s->paths = calloc(DG_HP_BIRTHDAY_SOCKETS, sizeof(int));
    if (!s->paths)
        return;
    n = hp->ops.open_paths(hp->arg, DG_HP_BIRTHDAY_SOCKETS, s->paths);
    if (n > DG_HP_BIRTHDAY_SOCKETS)
        n = DG_HP_BIRTHDAY_SOCKETS;
    for (size_t i = 0; i < n; i++) /* path 0 and negative numbers are not ours to keep */
        if (s->paths[i] > 0)
            s->paths[kept++] = s->paths[i];
    s->npaths = kept;
}

/* Starts probing towards @p peer (class @p peer_nat), and sends the first probes. */
static void start_punch(struct dg_hp *hp, struct session *s, const struct addr *peer,
                        enum dg_nat_class peer_nat, enum how how, uint64_t now)
{
    s->state = S_PUNCHING;
    s->peer = *peer;
    s->peer_nat = peer_nat;
    s->how = how;
    s->deadline = now + DG_HP_PUNCH_TIMEOUT_MS;
    s->next_probe = now;
    if (how == HOW_BIRTHDAY)
        open_birthday_paths(hp, s);
    if (how == HOW_SPRAY) {
        s->spray_key = rand64(hp);
        s->next_spray = now;
    }
    run_punch(hp, s, now);
}

/* A PROBE with @p s's nonce came from the peer on @p path: the path is open. */
static void succeed(struct dg_hp *hp, struct session *s, int path, const struct addr *from,
                    uint64_t now)
{
    struct done *d = new_done(hp, s->nonce, s->initiator, now);
    struct sockaddr_storage peer;

    d->path = path;
    d->peer = *from;
    d->via = s->via;
    d->nat = s->nat;
    d->repeats = DONE_REPEATS;
    d->next_repeat = now + DG_HP_PROBE_INTERVAL_MS;
    addr_to_ss(from, &peer);
    end_session(hp, s, path);
    if (s->initiator)
        hp->st.punched++;
    else
        hp->st.responder_punched++;
    if (hp->ops.punched)
        hp->ops.punched(hp->arg, s->key, s->initiator, path, (const struct sockaddr *)&peer);
}

/* A PROBE: success of a session, an answer from a finished one, or ignored. */
static void on_probe(struct dg_hp *hp, int path, const struct dg_hp_msg *m, const struct addr *from,
                     uint64_t now)
{
    int reply = m->flags & DG_HP_PROBE_REPLY;
    struct session *s = find_session(hp->init, m->nonce);
    struct done *d;

    hp->st.probes_received++;
    if (s && s->state == S_CONNECTING && s->mode != DG_HP_MODE_PUNCH)
        s = NULL;
    if (!s)
        s = find_session(hp->resp, m->nonce);
    if (s) {
        /* Connecting, B knows A's IP from the target (D's ACK is overtaken). */
        const struct addr *peer = s->state == S_CONNECTING ? &s->target : &s->peer;
        if (!ip_eq(from, peer) || !path_ok(s, path)) {
            hp->st.ignored++;
            return;
        }
        if (!reply)
            send_probe(hp, path, m->nonce, s->nat, 1, from);
        succeed(hp, s, path, from, now);
        return;
    }
    d = find_done(hp, m->nonce, 1, now);
    if (!d || d->path < 0)
        d = find_done(hp, m->nonce, 0, now);
    if (d && d->path >= 0 && ip_eq(from, &d->peer) && (path == 0 || path == d->path)) {
        if (!reply)
            send_probe(hp, path, m->nonce, d->nat, 1, from);
        return;
    }
    hp->st.ignored++;
}

/* ------------------------------------------------------------------ rendezvous (D) */

/* The rendezvous session (waiting or answered) with @p nonce, or NULL. */
static struct rendezvous *find_rdv(struct dg_hp *hp, const uint8_t *nonce)
{
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if (hp->rdv[i].state != S_FREE && memcmp(hp->rdv[i].nonce, nonce, DG_HP_NONCE_LEN) == 0)
            return &hp->rdv[i];
    return NULL;
}

/* A slot for a new rendezvous session: a free one, else the oldest answered record. */
static struct rendezvous *rdv_slot(struct dg_hp *hp)
{
    struct rendezvous *best = NULL;

    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        struct rendezvous *r = &hp->rdv[i];
        if (r->state == S_FREE)
            return r;
        if (r->state == S_ANSWERED && (!best || r->expires < best->expires))
            best = r;
    }
    return best;
}

/* The PUNCH of @p r, to A. */
static void send_punch(struct dg_hp *hp, const struct rendezvous *r)
{
    struct dg_hp_msg m;

    msg_init(&m, DG_HP_PUNCH, r->nonce);
    memcpy(m.key, r->key, 20);
    addr_to_ss(&r->b, &m.addr);
    m.nat = r->b_nat;
    m.mode = r->mode;
    m.relay_port = r->relay_port;
    send_msg(hp, 0, &m, &r->a);
}

/* Sends B the answer and keeps it to repeat. */
static void rdv_answer(struct dg_hp *hp, struct rendezvous *r, const struct dg_hp_msg *answer,
                       uint64_t now)
{
    r->answer = *answer;
    r->state = S_ANSWERED;
    r->expires = now + DG_HP_CONNECT_TIMEOUT_MS;
    send_msg(hp, 0, &r->answer, &r->b);
}

/* A CONNECT: the cookie, the repeats, the checks; then PUNCH to A (holepunch.h). */
static void rdv_connect(struct dg_hp *hp, const struct dg_hp_msg *m, const struct addr *from,
                        uint64_t now)
{
    struct rendezvous *r;
    struct addr target, contact;
    struct sockaddr_storage ts, cs;
    enum dg_hp_failure why = 0;
    uint16_t relay_port = 0;

    if (!hp->ops.announced) {
        hp->st.ignored++;
        return;
    }
    /* Nothing happens for a source that has not shown it receives there. */
    if (!cookie_ok(hp, from, m->nonce, m->cookie, now)) {
        struct dg_hp_msg c;
        msg_init(&c, DG_HP_COOKIE, m->nonce);
        make_cookie(hp, from, m->nonce, now / COOKIE_EPOCH_MS, c.cookie);
        hp->st.cookies++;
        send_msg(hp, 0, &c, from);
        return;
    }
    r = find_rdv(hp, m->nonce);
    if (r) { /* B resent it: repeat the answer, or wait for A */
        if (!addr_eq(&r->b, from))
            hp->st.ignored++;
        else if (r->state == S_ANSWERED)
            send_msg(hp, 0, &r->answer, &r->b);
        return;
    }
    addr_from_sa(&target, (const struct sockaddr *)&m->addr);
    addr_to_ss(&target, &ts);
    contact = target;
    if (target.family != from->family)
        why = DG_HP_FAIL_UNKNOWN_PEER;
    else if (!rate_ok(hp->connect_rate, from, now) || !(r = rdv_slot(hp)))
        why = DG_HP_FAIL_BUSY;
    else if (!hp->ops.announced(hp->arg, m->key, (const struct sockaddr *)&ts))
        why = DG_HP_FAIL_UNKNOWN_PEER;
    else if (m->mode == DG_HP_MODE_RELAY &&
             (!hp->ops.relay_expect || !(relay_port = hp->ops.relay_expect(hp->arg, m->nonce))))
        why = DG_HP_FAIL_NO_RELAY;
    if (why) {
        hp->st.refused++;
        send_reject(hp, DG_HP_CONNECT_REJECT, m->nonce, why, from);
        return;
    }
    if (hp->ops.announced_from) {
        struct addr a;
        memset(&cs, 0, sizeof(cs));
        if (hp->ops.announced_from(hp->arg, m->key, (const struct sockaddr *)&ts, &cs) == 1 &&
            addr_from_sa(&a, (const struct sockaddr *)&cs) == 0 && ip_eq(&a, &target) &&
            addr_real(&a))
            contact = a;
    }
    memset(r, 0, sizeof(*r));
    r->state = S_WAITING;
    memcpy(r->key, m->key, 20);
    memcpy(r->nonce, m->nonce, DG_HP_NONCE_LEN);
    r->b = *from;
    r->a = contact;
    r->b_nat = m->nat;
    r->mode = m->mode;
    r->relay_port = relay_port;
    r->started = now;
    r->expires = now + DG_HP_RENDEZVOUS_TIMEOUT_MS;
    hp->st.forwarded++;
    send_punch(hp, r);
}

/* PUNCH_ACK or PUNCH_REJECT from the responder. */
static void rdv_reply(struct dg_hp *hp, const struct dg_hp_msg *m, const struct addr *from,
                      uint64_t now)
{
    struct rendezvous *r = find_rdv(hp, m->nonce);
    struct dg_hp_msg answer;

    if (!r || r->state != S_WAITING || !addr_eq(from, &r->a)) {
        hp->st.ignored++;
        return;
    }
    if (m->type == DG_HP_PUNCH_ACK) {
        msg_init(&answer, DG_HP_CONNECT_ACK, r->nonce);
        addr_to_ss(from, &answer.addr);
        answer.nat = m->nat;
        answer.mode = r->mode;
        answer.relay_port = r->relay_port;
    } else {
        msg_init(&answer, DG_HP_CONNECT_REJECT, r->nonce);
        answer.reason = m->reason == DG_HP_FAIL_BUSY ? DG_HP_FAIL_BUSY : DG_HP_FAIL_REFUSED;
    }
    rdv_answer(hp, r, &answer, now);
}

/* The PUNCH's one resend, the wait for A, the end of the kept answer. */
static void rdv_tick(struct dg_hp *hp, struct rendezvous *r, uint64_t now)
{
    if (r->state == S_ANSWERED && now >= r->expires) {
        memset(r, 0, sizeof(*r));
    } else if (r->state == S_WAITING && now >= r->expires) {
        struct dg_hp_msg answer;
        msg_init(&answer, DG_HP_CONNECT_REJECT, r->nonce);
        answer.reason = DG_HP_FAIL_REFUSED;
        rdv_answer(hp, r, &answer, now);
    } else if (r->state == S_WAITING && !r->resent && now >= r->started + DG_HP_RESEND_MS) {
        r->resent = 1;
        send_punch(hp, r);
    }
}

/* ------------------------------------------------------------------ responder (A) */

/* PUNCH_ACK with our class @p nat. */
static void send_punch_ack(struct dg_hp *hp, const uint8_t *nonce, enum dg_nat_class nat,
                           const struct addr *to)
{
    struct dg_hp_msg m;

    msg_init(&m, DG_HP_PUNCH_ACK, nonce);
    m.nat = nat;
    send_msg(hp, 0, &m, to);
}

/* Responder sessions that send blindly (spray or birthday sockets). */
static int blind_sessions(const struct dg_hp *hp)
{
    int n = 0;

    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if (hp->resp[i].state == S_PUNCHING &&
            (hp->resp[i].how == HOW_SPRAY || hp->resp[i].how == HOW_BIRTHDAY))
            n++;
    return n;
}

/* A PUNCH from a rendezvous: ack it, and punch or relay; or refuse it. */
static void resp_punch(struct dg_hp *hp, const struct dg_hp_msg *m, const struct addr *from,
                       uint64_t now)
{
    struct session *s = find_session(hp->resp, m->nonce);
    struct done *d = find_done(hp, m->nonce, 0, now);
    enum dg_nat_class nat = hp->nat;
    enum dg_hp_failure why = 0;
    enum how how = HOW_NOTHING;
    struct addr b;

    if (s || d) { /* D resent it: ack again */
        const struct addr *via = s ? &s->via : &d->via;
        if (addr_eq(via, from))
            send_punch_ack(hp, m->nonce, s ? s->nat : d->nat, from);
        else
            hp->st.ignored++;
        return;
    }
    addr_from_sa(&b, (const struct sockaddr *)&m->addr);
    if (!hp->ops.serves || !hp->ops.serves(hp->arg, m->key) || b.family != from->family)
        why = DG_HP_FAIL_REFUSED;
    else if (hp->ops.rendezvous_ok) {
        struct sockaddr_storage fs;
        addr_to_ss(from, &fs);
        if (!hp->ops.rendezvous_ok(hp->arg, m->key, (const struct sockaddr *)&fs))
            why = DG_HP_FAIL_REFUSED;
    }
    if (!why && !rate_ok(hp->punch_rate, from, now))
        why = DG_HP_FAIL_BUSY;
    if (!why && m->mode == DG_HP_MODE_PUNCH) {
        how = pick(nat, m->nat);
        if ((how == HOW_SPRAY || how == HOW_BIRTHDAY) && blind_sessions(hp) >= DG_HP_MAX_BLIND)
            why = DG_HP_FAIL_BUSY;
        else if (how != HOW_NOTHING && !(s = free_session(hp->resp)))
            why = DG_HP_FAIL_BUSY;
    }
    if (why) {
        hp->st.rejected++;
        send_reject(hp, DG_HP_PUNCH_REJECT, m->nonce, why, from);
        return;
    }
    hp->st.answered++;
    send_punch_ack(hp, m->nonce, nat, from);
    if (s) {
        memset(s, 0, sizeof(*s));
        memcpy(s->key, m->key, 20);
        memcpy(s->nonce, m->nonce, DG_HP_NONCE_LEN);
        s->via = *from;
        s->mode = m->mode;
        s->nat = nat;
        s->started = now;
        start_punch(hp, s, &b, m->nat, how, now);
        return;
    }
    /* Relay, or both hard: nothing to punch. Remember the nonce to ack D's resend. */
    d = new_done(hp, m->nonce, 0, now);
    d->via = *from;
    d->nat = nat;
    if (m->mode == DG_HP_MODE_RELAY && hp->ops.relay) {
        struct addr relay = *from;
        struct sockaddr_storage rs;
        relay.port = m->relay_port;
        addr_to_ss(&relay, &rs);
        hp->ops.relay(hp->arg, m->key, 0, (const struct sockaddr *)&rs,
                      (const struct sockaddr *)&m->addr, m->nonce);
    }
}

/* ------------------------------------------------------------------ initiator (B) */

/* (Re)sends @p s's CONNECT, with the cookie it has. */
static void send_connect(struct dg_hp *hp, const struct session *s)
{
    struct dg_hp_msg m;

    msg_init(&m, DG_HP_CONNECT, s->nonce);
    memcpy(m.key, s->key, 20);
    addr_to_ss(&s->target, &m.addr);
    m.nat = s->nat;
    m.mode = s->mode;
    memcpy(m.cookie, s->cookie, DG_HP_COOKIE_LEN);
    send_msg(hp, 0, &m, &s->via);
}

/* COOKIE, CONNECT_ACK or CONNECT_REJECT from the rendezvous. */
static void init_answer(struct dg_hp *hp, const struct dg_hp_msg *m, const struct addr *from,
                        uint64_t now)
{
    struct session *s = find_session(hp->init, m->nonce);
    struct addr a;

    if (!s || s->state != S_CONNECTING || !addr_eq(from, &s->via)) {
        hp->st.ignored++;
        return;
    }
    if (m->type == DG_HP_COOKIE) {
        if (s->cookies >= MAX_COOKIES || memcmp(s->cookie, m->cookie, DG_HP_COOKIE_LEN) == 0) {
            hp->st.ignored++;
            return;
        }
        s->cookies++;
        memcpy(s->cookie, m->cookie, DG_HP_COOKIE_LEN);
        send_connect(hp, s);
        s->next_send = now + DG_HP_RESEND_MS;
        return;
    }
    if (m->type == DG_HP_CONNECT_REJECT) {
        fail(hp, s, m->reason);
        return;
    }
    /* CONNECT_ACK: A's IP cannot change on the way (only its port, behind a hard NAT). */
    addr_from_sa(&a, (const struct sockaddr *)&m->addr);
    if (m->mode != s->mode || !ip_eq(&a, &s->target)) {
        hp->st.ignored++;
        return;
    }
    if (m->mode == DG_HP_MODE_RELAY) {
        struct addr relay = s->via;
        struct sockaddr_storage rs;
        relay.port = m->relay_port;
        addr_to_ss(&relay, &rs);
        end_session(hp, s, 0);
        hp->st.relayed++;
        struct sockaddr_storage ts;
        addr_to_ss(&s->target, &ts);
        if (hp->ops.relay)
            hp->ops.relay(hp->arg, s->key, 1, (const struct sockaddr *)&rs,
                          (const struct sockaddr *)&ts, s->nonce);
        return;
    }
    enum how how = pick(s->nat, m->nat);
    if (how == HOW_NOTHING) {
        fail(hp, s, DG_HP_FAIL_BOTH_HARD);
        return;
    }
    start_punch(hp, s, &a, m->nat, how, now);
}

int dg_hp_connect(struct dg_hp *hp, const uint8_t key[20], const struct sockaddr *target,
                  const struct sockaddr *via, enum dg_hp_mode mode, uint64_t now_ms)
{
    struct addr t, v;
    struct session *s;
    uint64_t r;

    if (!hp || !key || addr_from_sa(&t, target) || addr_from_sa(&v, via) || !addr_real(&t) ||
        !addr_real(&v) || t.family != v.family || !mode_valid(mode))
        return -EINVAL;
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if ((hp->init[i].state == S_CONNECTING || hp->init[i].state == S_PUNCHING) &&
            addr_eq(&hp->init[i].target, &t))
            return -EALREADY;
    s = free_session(hp->init);
    if (!s)
        return -EAGAIN;
    enter(hp);
    memset(s, 0, sizeof(*s));
    s->state = S_CONNECTING;
    s->initiator = 1;
    memcpy(s->key, key, 20);
    r = rand64(hp);
    memcpy(s->nonce, &r, 8);
    r = rand64(hp);
    memcpy(s->nonce + 8, &r, 8);
    s->target = t;
    s->via = v;
    s->mode = mode;
    s->nat = hp->nat;
    s->started = now_ms;
    s->next_send = now_ms + DG_HP_RESEND_MS;
    hp->st.connects++;
    send_connect(hp, s);
    leave(hp);
    return 0;
}

int dg_hp_punch(struct dg_hp *hp, const uint8_t key[20], const uint8_t nonce[DG_HP_NONCE_LEN],
                const struct sockaddr *peer, enum dg_nat_class peer_nat, int initiator,
                uint64_t now_ms)
{
    struct session *arr;
    struct addr p;
    struct session *s;

    if (!hp || !key || !nonce || addr_from_sa(&p, peer) || !addr_real(&p) ||
        (unsigned)peer_nat > DG_NAT_HARD)
        return -EINVAL;
    arr = initiator ? hp->init : hp->resp;
    enum how how = pick(hp->nat, peer_nat);
    if (how == HOW_NOTHING)
        return -EPERM;
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++)
        if ((arr[i].state == S_CONNECTING || arr[i].state == S_PUNCHING) &&
            (addr_eq(&arr[i].target, &p) || memcmp(arr[i].nonce, nonce, DG_HP_NONCE_LEN) == 0))
            return -EALREADY;
    if (!initiator && (how == HOW_SPRAY || how == HOW_BIRTHDAY) &&
        blind_sessions(hp) >= DG_HP_MAX_BLIND)
        return -EAGAIN;
    s = free_session(arr);
    if (!s)
        return -EAGAIN;
    enter(hp);
    memset(s, 0, sizeof(*s));
    s->initiator = initiator;
    memcpy(s->key, key, 20);
    memcpy(s->nonce, nonce, DG_HP_NONCE_LEN);
    s->target = p;
    s->mode = DG_HP_MODE_PUNCH;
    s->nat = hp->nat;
    s->started = now_ms;
    if (initiator)
        hp->st.connects++;
    else
        hp->st.answered++;
    start_punch(hp, s, &p, peer_nat, how, now_ms);
    leave(hp);
    return 0;
}

/* ------------------------------------------------------------------ input, timers */

int dg_hp_input(struct dg_hp *hp, int path, const uint8_t *buf, size_t len,
                const struct sockaddr *from, uint64_t now_ms)
{
    struct dg_hp_msg m;
    struct addr src;

    if (!dg_hp_is_packet(buf, len))
        return 0;
    if (dg_hp_parse(buf, len, &m) != 0) {
        hp->st.malformed++;
        return 1;
    }
    /* Only probes belong on the extra sockets. */
    if (addr_from_sa(&src, from) != 0 || (path != 0 && m.type != DG_HP_PROBE)) {
        hp->st.ignored++;
        return 1;
    }
    enter(hp);
    switch (m.type) {
    case DG_HP_CONNECT:
        rdv_connect(hp, &m, &src, now_ms);
        break;
    case DG_HP_PUNCH_ACK:
    case DG_HP_PUNCH_REJECT:
        rdv_reply(hp, &m, &src, now_ms);
        break;
    case DG_HP_PUNCH:
        resp_punch(hp, &m, &src, now_ms);
        break;
    case DG_HP_COOKIE:
    case DG_HP_CONNECT_ACK:
    case DG_HP_CONNECT_REJECT:
        init_answer(hp, &m, &src, now_ms);
        break;
    case DG_HP_PROBE:
        on_probe(hp, path, &m, &src, now_ms);
        break;
    }
    leave(hp);
    return 1;
}

/* The earlier of @p *t and @p when. */
static void earliest(uint64_t *t, uint64_t when)
{
    if (when < *t)
        *t = when;
}

/* When the next timer of @p s is due. */
static uint64_t session_due(const struct session *s)
{
    uint64_t t = UINT64_MAX;

    if (s->state == S_CONNECTING) {
        earliest(&t, s->next_send);
        earliest(&t, s->started + DG_HP_CONNECT_TIMEOUT_MS);
    } else if (s->state == S_PUNCHING) {
        earliest(&t, s->deadline);
        earliest(&t, s->next_probe);
        if (s->how == HOW_SPRAY && s->sprayed < DG_HP_SPRAY_MAX)
            earliest(&t, s->next_spray);
    }
    return t;
}

uint64_t dg_hp_tick(struct dg_hp *hp, uint64_t now_ms)
{
    uint64_t now = now_ms, next = now + 1000;

    enter(hp);
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        struct session *s = &hp->init[i];
        if (s->state == S_CONNECTING) {
            if (now >= s->started + DG_HP_CONNECT_TIMEOUT_MS) {
                fail(hp, s, DG_HP_FAIL_NO_ANSWER);
            } else if (now >= s->next_send) {
                send_connect(hp, s);
                s->next_send = now + DG_HP_RESEND_MS;
            }
        } else if (s->state == S_PUNCHING) {
            run_punch(hp, s, now);
        }
        if (hp->resp[i].state == S_PUNCHING)
            run_punch(hp, &hp->resp[i], now);
        rdv_tick(hp, &hp->rdv[i], now);
    }
    for (int i = 0; i < DONE_SLOTS; i++) {
        struct done *d = &hp->done[i];
        if (!d->used)
            continue;
        if (now >= d->until) {
            memset(d, 0, sizeof(*d));
        } else if (d->repeats > 0 && now >= d->next_repeat) {
            send_probe(hp, d->path, d->nonce, d->nat, 1, &d->peer);
            d->repeats--;
            d->next_repeat = now + DG_HP_PROBE_INTERVAL_MS;
        }
    }
    leave(hp);

    /* Everything due has run; what comes next? (Sessions callbacks started count too.) */
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        const struct rendezvous *r = &hp->rdv[i];
        earliest(&next, session_due(&hp->init[i]));
        earliest(&next, session_due(&hp->resp[i]));
        if (r->state == S_WAITING || r->state == S_ANSWERED)
            earliest(&next, r->expires);
        if (r->state == S_WAITING && !r->resent)
            earliest(&next, r->started + DG_HP_RESEND_MS);
    }
    for (int i = 0; i < DONE_SLOTS; i++)
        if (hp->done[i].used && hp->done[i].repeats > 0)
            earliest(&next, hp->done[i].next_repeat);
    return next > now ? next - now : 1;
}

/* ------------------------------------------------------------------ the rest */

int dg_hp_new(const struct dg_hp_ops *ops, void *arg, uint64_t seed, struct dg_hp **out)
{
    struct dg_hp *hp;

    *out = NULL;
    if (!ops || !ops->send)
        return -EINVAL;
    hp = calloc(1, sizeof(*hp));
    if (!hp)
        return -ENOMEM;
    hp->ops = *ops;
    hp->arg = arg;
    hp->rand_key[0] = splitmix(&seed);
    hp->rand_key[1] = splitmix(&seed);
    hp->cookie_key[0] = rand64(hp);
    hp->cookie_key[1] = rand64(hp);
    *out = hp;
    return 0;
}

void dg_hp_free(struct dg_hp *hp)
{
    if (!hp)
        return;
    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        struct session *s[2] = {&hp->init[i], &hp->resp[i]};
        for (int k = 0; k < 2; k++) {
            for (size_t j = 0; j < s[k]->npaths && hp->ops.close_path; j++)
                hp->ops.close_path(hp->arg, s[k]->paths[j]);
            free(s[k]->paths);
        }
    }
    free(hp);
}

void dg_hp_set_nat(struct dg_hp *hp, enum dg_nat_class c)
{
    hp->nat = nat_valid(c) ? c : DG_NAT_UNKNOWN;
}

size_t dg_hp_sessions(const struct dg_hp *hp)
{
    size_t n = 0;

    for (int i = 0; i < DG_HP_MAX_SESSIONS; i++) {
        n += hp->init[i].state == S_CONNECTING || hp->init[i].state == S_PUNCHING;
        n += hp->resp[i].state == S_PUNCHING;
        n += hp->rdv[i].state == S_WAITING;
    }
    return n;
}

void dg_hp_get_stats(const struct dg_hp *hp, struct dg_hp_stats *out)
{
    *out = hp->st;
}
