/* libFuzzer target: hole punching (engine/holepunch.c), one node in all three roles at once,
 * fed arbitrary datagrams from a few sources on a fake clock.
 *
 * Setup: the node asks rendezvous D to bring A (initiator session); B asks the node, as a
 * rendezvous, for A, and repeats its CONNECT with the cookie it got (rendezvous session, PUNCH
 * sent to A); rendezvous D2 asks the node, as a responder, to punch towards B (responder
 * session). Input: the first byte sets the scene:
 *   bits 0-1  our NAT class          bits 2-3  B's class in the PUNCH
 *   bit 4     IPv6 instead of IPv4   bit 5     relay mode (initiator and responder)
 *   bit 6     a relay at the node    bit 7     announced_from() names A's contact address
 * then records [ctl][adv][len][len bytes of payload]:
 *   ctl bits 0-2  the source: D, A's contact, A's announced address, B, B on another port,
 *                 D2, an attacker, a private address
 *   ctl bits 3-4  the path it came in on: 0, the lowest or highest extra path open, a bogus one
 *   ctl bits 5-6  overwrite the nonce (bytes 5..20) with the initiator's, the rendezvous's or
 *                 the responder's nonce
 *   ctl bit 7     a CONNECT gets the cookie the node gave this source for this nonce, if any
 *   adv           the clock moves on adv * 16 ms, and the node ticks, after the datagram
 * At the end, for an input of even length, the clock runs 150 s on and every session must have
 * ended; then (for any input) the node is freed.
 *
 * Checked: every datagram sent parses and fits DG_HP_MAX_MESSAGE, leaves on path 0 or an extra
 * path that is open (or handed over); COOKIE and CONNECT answers go only to CONNECT sources,
 * PUNCH only to A's announced or contact address, PUNCH answers only to PUNCH sources, CONNECT
 * only to D, PROBEs only to IPs the node has heard of; paths are closed once, only if open and
 * not handed over, and all of them by the end; tick asks for 1..1000 ms; every initiator
 * session ends in exactly one outcome; any datagram that parses formats back to the same
 * bytes. Callbacks start new sessions re-entrantly (from failed() and punched()). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/holepunch.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NSRC 8
#define MAXPATH 2048 /* path ids handed out per run */
#define MAX_OPEN 600 /* extra paths open at once */
#define MAXKNOWN 256 /* IPs the node may probe */
#define MAXCOOKIES 16
#define RELAY_PORT 7000
#define SRC_D 0
#define SRC_CONTACT 1
#define SRC_TARGET 2
#define SRC_B 3
#define SRC_D2 5

static const uint8_t KEY[20] = {0x4b, 0x45, 0x59, 1,  2,  3,  4,  5,  6,  7,
                                8,    9,    10,   11, 12, 13, 14, 15, 16, 17};

enum path_state {
    P_UNUSED = 0,
    P_OPEN,
    P_ENGINE, /* handed over by punched() */
    P_CLOSED,
};

struct cookie {
    struct sockaddr_storage to;
    uint8_t nonce[DG_HP_NONCE_LEN];
    uint8_t cookie[DG_HP_COOKIE_LEN];
};

struct ctx {
    struct dg_hp *hp;
    int family;
    int relay_on, contact_on;
    uint64_t now;
    struct sockaddr_storage src[NSRC];
    uint8_t path[MAXPATH];
    int next_path, nopen;
    struct sockaddr_storage connect_src[64], punch_src[64];
    int nconnect_src, npunch_src;
    uint8_t known[MAXKNOWN][16];
    int nknown;
    struct cookie cookies[MAXCOOKIES];
    int ncookies;
    uint8_t init_nonce[DG_HP_NONCE_LEN];
    int have_init_nonce;
    int connects, outcomes, reentries, in_free;
};

/* The length of @p ss's family's address. */
static socklen_t ss_len(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

/* Same address (family, IP, port). */
static int ss_eq(const struct sockaddr *a, const struct sockaddr_storage *b)
{
    return a->sa_family == b->ss_family && memcmp(a, b, ss_len(b)) == 0;
}

/* The IP bytes of @p sa (4 or 16 of them), zero-padded to 16. */
static void ip_of(const struct sockaddr *sa, uint8_t out[16])
{
    memset(out, 0, 16);
    if (sa->sa_family == AF_INET)
        memcpy(out, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    else
        memcpy(out, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
}

/* Notes an IP the node may probe. */
static void know(struct ctx *c, const struct sockaddr *sa)
{
    uint8_t ip[16];

    ip_of(sa, ip);
    for (int i = 0; i < c->nknown; i++)
        if (memcmp(c->known[i], ip, 16) == 0)
            return;
    if (c->nknown < MAXKNOWN)
        memcpy(c->known[c->nknown++], ip, 16);
}

/* Whether the node may probe @p sa's IP. */
static int known(const struct ctx *c, const struct sockaddr *sa)
{
    uint8_t ip[16];

    ip_of(sa, ip);
    for (int i = 0; i < c->nknown; i++)
        if (memcmp(c->known[i], ip, 16) == 0)
            return 1;
    return c->nknown == MAXKNOWN; /* table full: cannot tell */
}

/* Whether @p to is in @p list. */
static int listed(const struct sockaddr *to, const struct sockaddr_storage *list, int n)
{
    for (int i = 0; i < n; i++)
        if (ss_eq(to, &list[i]))
            return 1;
    return 0;
}

/* Adds @p a to @p list (at most 64). */
static void add_src(struct sockaddr_storage *list, int *n, const struct sockaddr_storage *a)
{
    if (!listed((const struct sockaddr *)a, list, *n) && *n < 64)
        list[(*n)++] = *a;
}

/* Source @p i of the table in the header comment. */
static struct sockaddr_storage make_addr(int family, int i)
{
    static const uint8_t v4[NSRC][4] = {{203, 0, 113, 1},   {198, 51, 100, 10}, {198, 51, 100, 10},
                                        {198, 51, 100, 20}, {198, 51, 100, 20}, {203, 0, 113, 2},
                                        {203, 0, 113, 66},  {10, 0, 0, 1}};
    static const uint16_t port[NSRC] = {6881, 40001, 6881, 5000, 5001, 6881, 1234, 9};
    struct sockaddr_storage ss;

    memset(&ss, 0, sizeof(ss));
    if (family == AF_INET) {
        struct sockaddr_in *s = (struct sockaddr_in *)&ss;
        s->sin_family = AF_INET;
        s->sin_port = htons(port[i]);
        memcpy(&s->sin_addr, v4[i], 4);
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&ss;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons(port[i]);
        s->sin6_addr.s6_addr[0] = 0x20;
        s->sin6_addr.s6_addr[1] = 0x01;
        s->sin6_addr.s6_addr[2] = 0x0d;
        s->sin6_addr.s6_addr[3] = 0xb8;
        memcpy(s->sin6_addr.s6_addr + 12, v4[i], 4);
    }
    return ss;
}

/* ---- the callbacks ---- */

/* ops->send: every rule of the header comment. */
static void fz_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    struct ctx *c = arg;
    struct dg_hp_msg m;

    if (c->in_free || len > DG_HP_MAX_MESSAGE || dg_hp_parse(buf, len, &m) != 0)
        abort();
    if (to->sa_family != c->family)
        abort();
    if (path < 0 || path >= MAXPATH ||
        (path > 0 && c->path[path] != P_OPEN && c->path[path] != P_ENGINE))
        abort();
    switch (m.type) {
    case DG_HP_COOKIE:
    case DG_HP_CONNECT_ACK:
    case DG_HP_CONNECT_REJECT:
        if (!listed(to, c->connect_src, c->nconnect_src) || path != 0)
            abort();
        if (m.type == DG_HP_COOKIE && c->ncookies < MAXCOOKIES) {
            struct cookie *k = &c->cookies[c->ncookies++];
            memcpy(&k->to, to, ss_len(&c->src[0]));
            memcpy(k->nonce, m.nonce, DG_HP_NONCE_LEN);
            memcpy(k->cookie, m.cookie, DG_HP_COOKIE_LEN);
        }
        break;
    case DG_HP_PUNCH:
        if (!(ss_eq(to, &c->src[SRC_TARGET]) || (c->contact_on && ss_eq(to, &c->src[SRC_CONTACT]))))
            abort();
        break;
    case DG_HP_PUNCH_ACK:
    case DG_HP_PUNCH_REJECT:
        if (!listed(to, c->punch_src, c->npunch_src) || path != 0)
            abort();
        break;
    case DG_HP_CONNECT:
        if (!ss_eq(to, &c->src[SRC_D]) || path != 0)
            abort();
        if (!c->have_init_nonce) {
            memcpy(c->init_nonce, m.nonce, DG_HP_NONCE_LEN);
            c->have_init_nonce = 1;
        }
        break;
    case DG_HP_PROBE:
        if (!known(c, to))
            abort();
        break;
    }
}

/* ops->open_paths: fresh ids, at most MAX_OPEN open. */
static size_t fz_open_paths(void *arg, size_t n, int *paths)
{
    struct ctx *c = arg;
    size_t i;

    if (c->in_free)
        abort();
    for (i = 0; i < n && c->nopen < MAX_OPEN && c->next_path < MAXPATH; i++) {
        paths[i] = c->next_path++;
        c->path[paths[i]] = P_OPEN;
        c->nopen++;
    }
    return i;
}

/* ops->close_path: only open ones, once. */
static void fz_close_path(void *arg, int path)
{
    struct ctx *c = arg;

    if (path <= 0 || path >= MAXPATH || c->path[path] != P_OPEN)
        abort();
    c->path[path] = P_CLOSED;
    c->nopen--;
}

/* ops->announced: A's announced address for KEY. */
static int fz_announced(void *arg, const uint8_t key[20], const struct sockaddr *peer)
{
    struct ctx *c = arg;

    return memcmp(key, KEY, 20) == 0 && ss_eq(peer, &c->src[SRC_TARGET]);
}

/* ops->announced_from: A's contact address, when the scene says so. */
static int fz_announced_from(void *arg, const uint8_t key[20], const struct sockaddr *peer,
                             struct sockaddr_storage *out)
{
    struct ctx *c = arg;

    (void)key;
    (void)peer;
    if (!c->contact_on)
        return 0;
    *out = c->src[SRC_CONTACT];
    return 1;
}

/* ops->serves: KEY. */
static int fz_serves(void *arg, const uint8_t key[20])
{
    (void)arg;
    return memcmp(key, KEY, 20) == 0;
}

/* ops->relay_expect: RELAY_PORT when the scene has a relay. */
static uint16_t fz_relay_expect(void *arg, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct ctx *c = arg;

    (void)nonce;
    return c->relay_on ? RELAY_PORT : 0;
}

/* Starts another initiator session from inside a callback (bounded). */
static void reenter(struct ctx *c, const uint8_t key[20], const struct sockaddr *target,
                    enum dg_hp_mode mode)
{
    if (c->reentries >= 8)
        return;
    c->reentries++;
    if (dg_hp_connect(c->hp, key, target, (const struct sockaddr *)&c->src[SRC_D], mode, c->now) ==
        0)
        c->connects++;
}

/* ops->punched: the path becomes the engine's; B starts another session. */
static void fz_punched(void *arg, const uint8_t key[20], int initiator, int path,
                       const struct sockaddr *peer)
{
    struct ctx *c = arg;

    if (c->in_free || path < 0 || path >= MAXPATH || peer->sa_family != c->family)
        abort();
    if (path > 0) {
        if (c->path[path] != P_OPEN)
            abort();
        c->path[path] = P_ENGINE;
        c->nopen--;
    }
    if (initiator) {
        c->outcomes++;
        reenter(c, key, (const struct sockaddr *)&c->src[7], DG_HP_MODE_PUNCH);
    }
}

/* ops->relay: an outcome at B. */
static void fz_relay(void *arg, const uint8_t key[20], int initiator, const struct sockaddr *relay,
                     const struct sockaddr *peer, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct ctx *c = arg;

    (void)key;
    (void)peer;
    (void)nonce;
    if (c->in_free || relay->sa_family != c->family)
        abort();
    if (initiator)
        c->outcomes++;
}

/* ops->failed: an outcome; asks again in relay mode. */
static void fz_failed(void *arg, const uint8_t key[20], const struct sockaddr *target,
                      enum dg_hp_failure why)
{
    struct ctx *c = arg;

    if (c->in_free || why < DG_HP_FAIL_NO_ANSWER || why > DG_HP_FAIL_BOTH_HARD)
        abort();
    c->outcomes++;
    reenter(c, key, target, DG_HP_MODE_RELAY);
}

/* Everyone but the attacker may be our rendezvous. */
static int fz_rendezvous_ok(void *arg, const uint8_t key[20], const struct sockaddr *rendezvous)
{
    struct ctx *c = arg;

    (void)key;
    return !ss_eq(rendezvous, &c->src[6]);
}

static const struct dg_hp_ops fz_ops = {
    .send = fz_send,
    .open_paths = fz_open_paths,
    .close_path = fz_close_path,
    .announced = fz_announced,
    .serves = fz_serves,
    .relay_expect = fz_relay_expect,
    .punched = fz_punched,
    .relay = fz_relay,
    .failed = fz_failed,
    .announced_from = fz_announced_from,
    .rendezvous_ok = fz_rendezvous_ok,
};

/* ---- feeding ---- */

/* Runs the node's timers; checks what it asks for. */
static void tick(struct ctx *c)
{
    uint64_t wait = dg_hp_tick(c->hp, c->now);

    if (wait < 1 || wait > 1000)
        abort();
}

/* Feeds one datagram, as the engine would (tick afterwards), noting who sent what. */
static void feed(struct ctx *c, int src, int path, const uint8_t *buf, size_t len)
{
    struct dg_hp_msg m;
    uint8_t *copy = malloc(len ? len : 1);
    int rc;

    if (!copy)
        abort();
    memcpy(copy, buf, len);
    know(c, (const struct sockaddr *)&c->src[src]);
    rc = dg_hp_parse(copy, len, &m);
    if (rc == 0) {
        uint8_t again[DG_HP_MAX_MESSAGE];
        if (dg_hp_format(&m, again, sizeof(again)) != (int)len || memcmp(again, copy, len) != 0)
            abort();
        if (m.type == DG_HP_CONNECT)
            add_src(c->connect_src, &c->nconnect_src, &c->src[src]);
        if (m.type == DG_HP_PUNCH)
            add_src(c->punch_src, &c->npunch_src, &c->src[src]);
        if (m.type == DG_HP_PUNCH || m.type == DG_HP_CONNECT_ACK)
            know(c, (const struct sockaddr *)&m.addr);
    } else if (rc != -EBADMSG) {
        abort();
    }
    if (dg_hp_input(c->hp, path, copy, len, (const struct sockaddr *)&c->src[src], c->now) !=
        dg_hp_is_packet(buf, len))
        abort();
    free(copy);
    tick(c);
}

/* A valid message of type @p t (the setup's CONNECT and PUNCH). */
static size_t make(uint8_t *buf, enum dg_hp_type t, const uint8_t *nonce, int src,
                   const struct ctx *c, int mode, enum dg_nat_class nat)
{
    struct dg_hp_msg m;
    int n;

    memset(&m, 0, sizeof(m));
    m.type = t;
    memcpy(m.nonce, nonce, DG_HP_NONCE_LEN);
    memcpy(m.key, KEY, 20);
    m.addr = c->src[src];
    m.nat = nat;
    m.mode = (enum dg_hp_mode)mode;
    if (t == DG_HP_PUNCH && mode == DG_HP_MODE_RELAY)
        m.relay_port = RELAY_PORT;
    n = dg_hp_format(&m, buf, DG_HP_MAX_MESSAGE);
    if (n < 0)
        abort();
    return (size_t)n;
}

/* The path of a record: 0, the lowest or highest open extra path, or a bogus one. */
static int pick_path(const struct ctx *c, int sel)
{
    if (sel == 0)
        return 0;
    if (sel == 3)
        return 77777;
    for (int i = 1; i < c->next_path; i++) {
        int p = sel == 1 ? i : c->next_path - i;
        if (c->path[p] == P_OPEN)
            return p;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint8_t rdv_nonce[DG_HP_NONCE_LEN] = {0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                                                       0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                                                       0x11, 0x11, 0x11, 0x11};
    static const uint8_t resp_nonce[DG_HP_NONCE_LEN] = {0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                                                        0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
                                                        0x22, 0x22, 0x22, 0x22};
    static struct ctx c;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    size_t n, off = 1;
    int mode;

    if (size < 1)
        return 0;
    memset(&c, 0, sizeof(c));
    c.family = (data[0] & 0x10) ? AF_INET6 : AF_INET;
    c.relay_on = (data[0] >> 6) & 1;
    c.contact_on = (data[0] >> 7) & 1;
    c.now = 5000000;
    c.next_path = 1;
    mode = (data[0] & 0x20) ? DG_HP_MODE_RELAY : DG_HP_MODE_PUNCH;
    for (int i = 0; i < NSRC; i++)
        c.src[i] = make_addr(c.family, i);
    if (dg_hp_new(&fz_ops, &c, 1, &c.hp) != 0)
        abort();
    dg_hp_set_nat(c.hp, (enum dg_nat_class)(data[0] & 3));

    /* initiator: to A via D */
    know(&c, (const struct sockaddr *)&c.src[SRC_TARGET]);
    if (dg_hp_connect(c.hp, KEY, (const struct sockaddr *)&c.src[SRC_TARGET],
                      (const struct sockaddr *)&c.src[SRC_D], (enum dg_hp_mode)mode, c.now) != 0)
        abort();
    c.connects++;
    tick(&c);
    /* rendezvous: B asks for A, then again with its cookie */
    n = make(buf, DG_HP_CONNECT, rdv_nonce, SRC_TARGET, &c, mode, DG_NAT_EASY);
    feed(&c, SRC_B, 0, buf, n);
    if (c.ncookies != 1)
        abort();
    memcpy(buf + n - DG_HP_COOKIE_LEN, c.cookies[0].cookie, DG_HP_COOKIE_LEN);
    feed(&c, SRC_B, 0, buf, n);
    /* responder: D2 asks us to punch towards B */
    n = make(buf, DG_HP_PUNCH, resp_nonce, SRC_B, &c, mode,
             (enum dg_nat_class)((data[0] >> 2) & 3));
    feed(&c, SRC_D2, 0, buf, n);

    while (off + 3 <= size) {
        uint8_t ctl = data[off], adv = data[off + 1];
        size_t len = data[off + 2];
        off += 3;
        if (len > size - off)
            len = size - off;
        memcpy(buf, data + off, len > sizeof(buf) ? sizeof(buf) : len);
        off += len;
        if (len > sizeof(buf)) { /* oversized: fed as is */
            feed(&c, ctl & 7, pick_path(&c, (ctl >> 3) & 3), data + off - len, len);
        } else {
            int src = ctl & 7, sel = (ctl >> 5) & 3;
            if (sel && len >= 21) {
                const uint8_t *nonce = sel == 1 ? c.init_nonce : sel == 2 ? rdv_nonce : resp_nonce;
                memcpy(buf + 5, nonce, DG_HP_NONCE_LEN);
            }
            if ((ctl & 0x80) && len > 21 + DG_HP_COOKIE_LEN && buf[4] == DG_HP_CONNECT) {
                for (int i = 0; i < c.ncookies; i++)
                    if (ss_eq((const struct sockaddr *)&c.src[src], &c.cookies[i].to) &&
                        memcmp(c.cookies[i].nonce, buf + 5, DG_HP_NONCE_LEN) == 0)
                        memcpy(buf + len - DG_HP_COOKIE_LEN, c.cookies[i].cookie, DG_HP_COOKIE_LEN);
            }
            feed(&c, src, pick_path(&c, (ctl >> 3) & 3), buf, len);
        }
        if (adv) {
            c.now += (uint64_t)adv * 16;
            tick(&c);
        }
    }

    /* An input of even length: everything ends within its time limit (re-entered sessions
     * too). Of odd length: freed while sessions run. */
    struct dg_hp_stats st;
    dg_hp_get_stats(c.hp, &st);
    if (st.sprayed > st.probes_sent || st.punched + st.relayed + st.failed > st.connects ||
        st.connects != (uint64_t)c.connects || c.outcomes > c.connects)
        abort();
    if (size % 2 == 0) {
        for (int i = 0; i < 150; i++) {
            c.now += 1000;
            tick(&c);
        }
        dg_hp_get_stats(c.hp, &st);
        if (dg_hp_sessions(c.hp) != 0 || c.outcomes != c.connects ||
            st.punched + st.relayed + st.failed != st.connects)
            abort();
    }
    c.in_free = 1;
    dg_hp_free(c.hp);
    if (c.nopen != 0)
        abort();
    return 0;
}
