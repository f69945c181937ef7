/* Unit tests for engine/holepunch.c: the message codec, and all three roles over a simulated
 * internet.
 *
 * The simulated internet: hosts with public IPv4 addresses, each behind a NAT of one kind
 * (RFC 4787 terms):
 *   K_NONE  no NAT: a socket is reachable at the host's IP and its own port;
 *   K_EASY  endpoint-independent mapping, the internal port kept when it is free;
 *           address-and-port-dependent filtering: a datagram gets in only from an (IP, port)
 *           the internal socket has sent to;
 *   K_HARD  a new random external port for each (internal socket, destination), and only that
 *           destination gets in through it.
 * Datagrams arrive 10..30 ms after they leave (a seeded PRNG), in time order, on a fake clock.
 * Every host runs a struct dg_hp; its "paths" are its sockets (0: the main one, port 6881), and
 * open_paths opens more. D (public) is the rendezvous: announced() says yes for A's announced
 * address (A's IP, port 6881, as a DHT peer store holds it), announced_from() names where A's
 * earlier "announce" datagram came from. Raw hosts (an attacker, a victim) run no dg_hp: they
 * keep what reaches them and send anything, with any source address.
 *
 * Checked on every datagram a dg_hp sends: it parses and fits DG_HP_MAX_MESSAGE, it leaves on an
 * open socket, and D sends only to addresses that sent it a CONNECT or are announced (or
 * announced from). Checked at the end of every scenario: after dg_hp_free, every extra socket
 * is closed except those handed to the engine by punched(). */
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

#include "engine/holepunch.h"

#define NHOST 6
#define MAXSOCK 320
#define MAXMAP 8192
#define SENT_SLOTS (1u << 16)
#define MAXCAP 4096
#define MAIN_PORT 6881
#define RELAY_PORT 7000
#define T0 1000000u
#define IP4(a, b, c, d) \
    ((uint32_t)(a) << 24 | (uint32_t)(b) << 16 | (uint32_t)(c) << 8 | (uint32_t)(d))
#define D_IP IP4(203, 0, 113, 1)
#define A_IP IP4(198, 51, 100, 10)
#define B_IP IP4(198, 51, 100, 20)
#define ATT_IP IP4(203, 0, 113, 66)
#define VIC_IP IP4(203, 0, 113, 77)

static const uint8_t KEY[20] = {0xd1, 0x9f, 0x50, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                                0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11};

enum kind {
    K_NONE,
    K_EASY,
    K_HARD,
};

static const char *const kind_name[] = {"none", "easy", "hard"};

/* ---- randomness ---- */

/* splitmix64: the network's delays and the NATs' ports. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- the simulated internet ---- */

struct pkt {
    uint64_t at, seq;
    uint32_t sip, dip;
    uint16_t sport, dport;
    uint16_t len;
    uint8_t buf[DG_HP_MAX_MESSAGE + 32];
};

struct captured {
    uint32_t sip;
    uint16_t sport;
    size_t len;
    uint8_t buf[DG_HP_MAX_MESSAGE + 32];
};

struct mapping {
    int sock;
    uint32_t dip;
    uint16_t dport, ext;
};

struct net;

struct host {
    struct net *net;
    const char *name;
    enum kind kind;
    uint32_t ip;
    struct {
        int open;
        int engine; /* handed to the engine by punched() */
        uint16_t lport;
    } sock[MAXSOCK];
    int nsock;
    /* the NAT */
    int32_t rev[65536];         /* external port -> socket (none, easy) or mapping (hard) */
    uint16_t eim[MAXSOCK];      /* easy: each socket's external port */
    struct mapping map[MAXMAP]; /* hard */
    int nmap;
    uint64_t sent[SENT_SLOTS]; /* easy: (socket, IP, port) sent to; 0 empty */
    size_t nsent;
    /* behaviour */
    struct dg_hp *hp;
    uint64_t next_tick, last_wait;
    uint64_t period;   /* > 0: ticks only every period ms (a coarse timer), not after input */
    int is_rdv;        /* the rendezvous: its destinations are checked */
    int serves;        /* serves KEY */
    int relay_on;      /* relay_expect answers RELAY_PORT */
    int no_contact;    /* announced_from() says nothing */
    int drop_in;       /* everything arriving is lost */
    int drop_probes;   /* probes in both directions are lost */
    int mute_probes;   /* probes it sends are lost */
    uint32_t rdv_only; /* responder: PUNCHes only from this IP (0: any) */
    int reconnect;     /* failed() calls dg_hp_connect again, in relay mode */
    int max_paths;     /* open_paths gives at most this many (0: all asked) */
    uint32_t watch_ip; /* probes sent from path 0 to this IP are counted by port */
    uint16_t port_count[65536];
    /* what happened */
    int have_contact;
    uint32_t contact_ip;
    uint16_t contact_port;
    int opened, closed;
    uint64_t sends, sent_type[16], spoiled;
    uint64_t received, filtered;
    int punched, punched_initiator, punched_path;
    uint32_t punched_ip;
    uint16_t punched_port;
    uint64_t punched_at;
    int relayed, relay_initiator;
    uint32_t relay_ip;
    uint16_t relay_port;
    uint32_t relay_peer_ip; /* the other end, as relay() named it */
    uint8_t relay_nonce[DG_HP_NONCE_LEN];
    int relay_expects;
    uint8_t expected_nonce[DG_HP_NONCE_LEN];
    int failed;
    enum dg_hp_failure why;
    uint64_t failed_at;
    int reconnect_rc;
    int other, other_path; /* datagrams without our magic */
    char other_buf[32];
    struct captured *cap; /* raw hosts: what arrived */
    size_t ncap;
};

struct net {
    uint64_t now, seq, rng;
    struct pkt *heap;
    size_t npkt, cap;
    struct host *hosts[NHOST];
    int nhosts;
    int violations; /* datagrams D sent where it must not */
    struct {
        uint32_t ip;
        uint16_t port;
    } allowed[4096];
    size_t nallowed;
    uint8_t last_punch_nonce[DG_HP_NONCE_LEN]; /* of the last PUNCH D sent */
    uint64_t delivered;
};

/* An IPv4 socket address from host-order parts. */
static struct sockaddr_in sin4(uint32_t ip, uint16_t port)
{
    struct sockaddr_in s;

    memset(&s, 0, sizeof(s));
    s.sin_family = AF_INET;
    s.sin_addr.s_addr = htonl(ip);
    s.sin_port = htons(port);
    return s;
}

/* The host-order parts of an IPv4 socket address. */
static void sin_parts(const struct sockaddr *sa, uint32_t *ip, uint16_t *port)
{
    const struct sockaddr_in *s = (const struct sockaddr_in *)sa;

    assert_int_equal(sa->sa_family, AF_INET);
    *ip = ntohl(s->sin_addr.s_addr);
    *port = ntohs(s->sin_port);
}

/* Adds (ip, port) to where D may send. */
static void allow(struct net *n, uint32_t ip, uint16_t port)
{
    for (size_t i = 0; i < n->nallowed; i++)
        if (n->allowed[i].ip == ip && n->allowed[i].port == port)
            return;
    assert_true(n->nallowed < sizeof(n->allowed) / sizeof(n->allowed[0]));
    n->allowed[n->nallowed].ip = ip;
    n->allowed[n->nallowed++].port = port;
}

/* Whether D may send to (ip, port). */
static int allowed(const struct net *n, uint32_t ip, uint16_t port)
{
    for (size_t i = 0; i < n->nallowed; i++)
        if (n->allowed[i].ip == ip && n->allowed[i].port == port)
            return 1;
    return 0;
}

/* Delivery order: time, then sending order. */
static int pkt_before(const struct pkt *a, const struct pkt *b)
{
    return a->at < b->at || (a->at == b->at && a->seq < b->seq);
}

/* Puts a datagram in flight. */
static void heap_push(struct net *n, const struct pkt *p)
{
    size_t i;

    if (n->npkt == n->cap) {
        n->cap = n->cap ? 2 * n->cap : 1024;
        n->heap = realloc(n->heap, n->cap * sizeof(*n->heap));
        assert_non_null(n->heap);
    }
    i = n->npkt++;
    n->heap[i] = *p;
    while (i > 0 && pkt_before(&n->heap[i], &n->heap[(i - 1) / 2])) {
        struct pkt t = n->heap[i];
        n->heap[i] = n->heap[(i - 1) / 2];
        n->heap[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}

/* Takes the next datagram to arrive. */
static void heap_pop(struct net *n, struct pkt *out)
{
    size_t i = 0;

    *out = n->heap[0];
    n->heap[0] = n->heap[--n->npkt];
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n->npkt && pkt_before(&n->heap[l], &n->heap[m]))
            m = l;
        if (r < n->npkt && pkt_before(&n->heap[r], &n->heap[m]))
            m = r;
        if (m == i)
            break;
        struct pkt t = n->heap[i];
        n->heap[i] = n->heap[m];
        n->heap[m] = t;
        i = m;
    }
}

/* A free external port, at random. */
static uint16_t free_port(struct host *h)
{
    for (;;) {
        uint16_t p = (uint16_t)(1024 + rng_next(&h->net->rng) % (65536 - 1024));
        if (h->rev[p] < 0)
            return p;
    }
}

/* The key of (socket, IP, port) in an easy NAT's table of destinations. */
static uint64_t sent_key(int sock, uint32_t ip, uint16_t port)
{
    return (uint64_t)(sock + 1) << 48 | (uint64_t)ip << 16 | port;
}

/* Whether socket @p sock of @p h has sent to (ip, port). */
static int sent_has(const struct host *h, int sock, uint32_t ip, uint16_t port)
{
    uint64_t k = sent_key(sock, ip, port);

    for (uint64_t i = k * 0x9e3779b97f4a7c15ull >> 48;; i = (i + 1) % SENT_SLOTS) {
        if (h->sent[i] == k)
            return 1;
        if (h->sent[i] == 0)
            return 0;
    }
}

/* Notes that socket @p sock of @p h sent to (ip, port). */
static void sent_add(struct host *h, int sock, uint32_t ip, uint16_t port)
{
    uint64_t k = sent_key(sock, ip, port);

    for (uint64_t i = k * 0x9e3779b97f4a7c15ull >> 48;; i = (i + 1) % SENT_SLOTS) {
        if (h->sent[i] == k)
            return;
        if (h->sent[i] == 0) {
            assert_true(h->nsent < SENT_SLOTS / 2);
            h->sent[i] = k;
            h->nsent++;
            return;
        }
    }
}

/* The NAT on the way out: the external port of socket @p sock towards (dip, dport), or -1. */
static int nat_out(struct host *h, int sock, uint32_t dip, uint16_t dport)
{
    uint16_t p;

    switch (h->kind) {
    case K_NONE:
        return h->sock[sock].lport;
    case K_EASY:
        if (!h->eim[sock]) {
            p = h->rev[h->sock[sock].lport] < 0 ? h->sock[sock].lport : free_port(h);
            h->eim[sock] = p;
            h->rev[p] = sock;
        }
        sent_add(h, sock, dip, dport);
        return h->eim[sock];
    case K_HARD:
        for (int i = 0; i < h->nmap; i++)
            if (h->map[i].sock == sock && h->map[i].dip == dip && h->map[i].dport == dport)
                return h->map[i].ext;
        if (h->nmap == MAXMAP)
            return -1;
        p = free_port(h);
        h->map[h->nmap].sock = sock;
        h->map[h->nmap].dip = dip;
        h->map[h->nmap].dport = dport;
        h->map[h->nmap].ext = p;
        h->rev[p] = h->nmap++;
        return p;
    }
    return -1;
}

/* The NAT on the way in: the socket a datagram from (sip, sport) to port @p dport reaches, or
 * -1 (no mapping, filtered, closed). */
static int nat_in(const struct host *h, uint16_t dport, uint32_t sip, uint16_t sport)
{
    int s = -1, i = h->rev[dport];

    if (i < 0)
        return -1;
    if (h->kind == K_HARD) {
        if (h->map[i].dip != sip || h->map[i].dport != sport)
            return -1;
        s = h->map[i].sock;
    } else {
        s = i;
        if (h->kind == K_EASY && !sent_has(h, s, sip, sport))
            return -1;
    }
    return h->sock[s].open ? s : -1;
}

/* Opens a socket (a path) on @p h; path numbers are never reused. */
static int sock_open(struct host *h)
{
    int s = h->nsock++;

    assert_true(s < MAXSOCK);
    h->sock[s].open = 1;
    h->sock[s].lport = s == 0 ? MAIN_PORT : (uint16_t)(40000 + s);
    if (h->kind == K_NONE)
        h->rev[h->sock[s].lport] = s;
    return s;
}

/* Sends a datagram from socket @p sock of @p h, through its NAT. */
static void net_send(struct host *h, int sock, const void *buf, size_t len, uint32_t dip,
                     uint16_t dport)
{
    struct net *n = h->net;
    struct pkt p;
    int ext;

    assert_true(sock >= 0 && sock < h->nsock && h->sock[sock].open);
    assert_true(len <= sizeof(p.buf));
    ext = nat_out(h, sock, dip, dport);
    if (ext < 0)
        return;
    memset(&p, 0, sizeof(p));
    p.at = n->now + 10 + rng_next(&n->rng) % 21;
    p.seq = n->seq++;
    p.sip = h->ip;
    p.sport = (uint16_t)ext;
    p.dip = dip;
    p.dport = dport;
    p.len = (uint16_t)len;
    memcpy(p.buf, buf, len);
    heap_push(n, &p);
}

/* Sends a datagram with any source address (raw hosts; spoofing). */
static void net_inject(struct net *n, uint32_t sip, uint16_t sport, const void *buf, size_t len,
                       uint32_t dip, uint16_t dport)
{
    struct pkt p;

    memset(&p, 0, sizeof(p));
    p.at = n->now + 10;
    p.seq = n->seq++;
    p.sip = sip;
    p.sport = sport;
    p.dip = dip;
    p.dport = dport;
    p.len = (uint16_t)len;
    memcpy(p.buf, buf, len);
    heap_push(n, &p);
}

/* Runs @p h's timers and schedules the next run. */
static void do_tick(struct host *h)
{
    uint64_t wait = dg_hp_tick(h->hp, h->net->now);

    assert_true(wait >= 1 && wait <= 1000);
    h->last_wait = wait;
    h->next_tick = h->net->now + (h->period ? h->period : wait);
}

/* Whether a datagram is a PROBE (for drop_probes). */
static int is_probe(const uint8_t *buf, size_t len)
{
    return len > DG_HP_MAGIC_LEN && dg_hp_is_packet(buf, len) &&
           buf[DG_HP_MAGIC_LEN] == DG_HP_PROBE;
}

/* The host whose public IP is @p ip, or NULL. */
static struct host *host_at(struct net *n, uint32_t ip)
{
    for (int i = 0; i < n->nhosts; i++)
        if (n->hosts[i] && n->hosts[i]->ip == ip)
            return n->hosts[i];
    return NULL;
}

/* A datagram arrives: through the NAT to a socket, then to dg_hp or the capture. */
static void deliver(struct net *n, const struct pkt *p)
{
    struct host *h = host_at(n, p->dip);
    struct sockaddr_in from = sin4(p->sip, p->sport);
    struct dg_hp_msg m;
    int s;

    if (!h || h->drop_in || (h->drop_probes && is_probe(p->buf, p->len)))
        return;
    s = nat_in(h, p->dport, p->sip, p->sport);
    if (s < 0) {
        h->filtered++;
        return;
    }
    h->received++;
    n->delivered++;
    if (!h->hp) {
        if (h->cap && h->ncap < MAXCAP) {
            struct captured *c = &h->cap[h->ncap++];
            c->sip = p->sip;
            c->sport = p->sport;
            c->len = p->len;
            memcpy(c->buf, p->buf, p->len);
        }
        return;
    }
    if (h->is_rdv && dg_hp_parse(p->buf, p->len, &m) == 0 && m.type == DG_HP_CONNECT)
        allow(n, p->sip, p->sport);
    if (!dg_hp_input(h->hp, s, p->buf, p->len, (struct sockaddr *)&from, n->now)) {
        if (h->is_rdv && p->len == 8 && memcmp(p->buf, "ANNOUNCE", 8) == 0) {
            h->have_contact = 1;
            h->contact_ip = p->sip;
            h->contact_port = p->sport;
        }
        h->other++;
        h->other_path = s;
        memcpy(h->other_buf, p->buf, p->len < sizeof(h->other_buf) ? p->len : 0);
    }
    if (!h->period)
        do_tick(h);
}

typedef int (*pred_fn)(void);

/* Runs the network for up to @p ms, or until @p done says so. */
static void run(struct net *n, uint64_t ms, pred_fn done)
{
    uint64_t until = n->now + ms;

    while (n->now < until && !(done && done())) {
        uint64_t t = until;
        struct pkt p;
        if (n->npkt && n->heap[0].at < t)
            t = n->heap[0].at;
        for (int i = 0; i < n->nhosts; i++)
            if (n->hosts[i] && n->hosts[i]->hp && n->hosts[i]->next_tick < t)
                t = n->hosts[i]->next_tick;
        if (t > n->now)
            n->now = t;
        while (n->npkt && n->heap[0].at <= n->now) {
            heap_pop(n, &p);
            deliver(n, &p);
        }
        for (int i = 0; i < n->nhosts; i++)
            if (n->hosts[i] && n->hosts[i]->hp && n->hosts[i]->next_tick <= n->now)
                do_tick(n->hosts[i]);
    }
}

/* ---- the dg_hp callbacks of a host ---- */

/* ops->send: checks the datagram and the rendezvous rule, then sends it. */
static void op_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    struct host *h = arg;
    struct dg_hp_msg m;
    uint32_t ip;
    uint16_t port;

    assert_true(len <= DG_HP_MAX_MESSAGE);
    assert_int_equal(dg_hp_parse(buf, len, &m), 0);
    sin_parts(to, &ip, &port);
    assert_true(path >= 0 && path < h->nsock);
    if (!h->sock[path].open) { /* never on a closed socket */
        h->spoiled++;
        return;
    }
    h->sends++;
    h->sent_type[m.type]++;
    if (h->is_rdv) {
        if (!allowed(h->net, ip, port))
            h->net->violations++;
        if (m.type == DG_HP_PUNCH)
            memcpy(h->net->last_punch_nonce, m.nonce, DG_HP_NONCE_LEN);
    }
    if (m.type == DG_HP_PROBE && !(m.flags & DG_HP_PROBE_REPLY) && path == 0 && ip == h->watch_ip)
        h->port_count[port]++;
    if ((h->drop_probes || h->mute_probes) && m.type == DG_HP_PROBE)
        return;
    net_send(h, path, buf, len, ip, port);
}

/* ops->open_paths: new sockets, up to max_paths. */
static size_t op_open_paths(void *arg, size_t n, int *paths)
{
    struct host *h = arg;
    size_t i;

    if (h->max_paths && n > (size_t)h->max_paths)
        n = (size_t)h->max_paths;
    for (i = 0; i < n; i++) {
        paths[i] = sock_open(h);
        h->opened++;
    }
    return i;
}

/* ops->close_path: only open extra sockets not handed to the engine. */
static void op_close_path(void *arg, int path)
{
    struct host *h = arg;

    assert_true(path > 0 && path < h->nsock);
    assert_true(h->sock[path].open);
    assert_false(h->sock[path].engine);
    h->sock[path].open = 0;
    if (h->kind == K_NONE)
        h->rev[h->sock[path].lport] = -1;
    h->closed++;
}

/* ops->announced: only A's announced address (IP, port 6881) for KEY. */
static int op_announced(void *arg, const uint8_t key[20], const struct sockaddr *peer)
{
    struct host *h = arg;
    uint32_t ip;
    uint16_t port;

    assert_true(h->is_rdv);
    sin_parts(peer, &ip, &port);
    if (memcmp(key, KEY, 20) != 0 || ip != A_IP || port != MAIN_PORT || !h->have_contact)
        return 0;
    allow(h->net, ip, port);
    return 1;
}

/* ops->announced_from: the source of A's announce, as D saw it. */
static int op_announced_from(void *arg, const uint8_t key[20], const struct sockaddr *peer,
                             struct sockaddr_storage *out)
{
    struct host *h = arg;
    struct sockaddr_in c = sin4(h->contact_ip, h->contact_port);
    uint32_t ip;
    uint16_t port;

    (void)key;
    sin_parts(peer, &ip, &port);
    if (h->no_contact || !h->have_contact || ip != h->contact_ip)
        return 0;
    allow(h->net, h->contact_ip, h->contact_port);
    memcpy(out, &c, sizeof(c));
    return 1;
}

/* ops->serves: KEY, if the host serves. */
static int op_serves(void *arg, const uint8_t key[20])
{
    struct host *h = arg;

    return h->serves && memcmp(key, KEY, 20) == 0;
}

/* ops->rendezvous_ok: any, or only rdv_only. */
static int op_rendezvous_ok(void *arg, const uint8_t key[20], const struct sockaddr *rendezvous)
{
    struct host *h = arg;
    uint32_t ip;
    uint16_t port;

    (void)key;
    sin_parts(rendezvous, &ip, &port);
    return !h->rdv_only || ip == h->rdv_only;
}

/* ops->relay_expect: RELAY_PORT when the relay is on. */
static uint16_t op_relay_expect(void *arg, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct host *h = arg;

    if (!h->relay_on)
        return 0;
    h->relay_expects++;
    memcpy(h->expected_nonce, nonce, DG_HP_NONCE_LEN);
    return RELAY_PORT;
}

/* ops->punched: records it; an extra socket becomes the engine's. */
static void op_punched(void *arg, const uint8_t key[20], int initiator, int path,
                       const struct sockaddr *peer)
{
    struct host *h = arg;

    assert_memory_equal(key, KEY, 20);
    assert_true(path >= 0 && path < h->nsock && h->sock[path].open);
    h->punched++;
    h->punched_initiator = initiator;
    h->punched_path = path;
    h->punched_at = h->net->now;
    sin_parts(peer, &h->punched_ip, &h->punched_port);
    if (path > 0)
        h->sock[path].engine = 1;
}

/* ops->relay: records it. */
static void op_relay(void *arg, const uint8_t key[20], int initiator, const struct sockaddr *relay,
                     const struct sockaddr *peer, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct host *h = arg;
    uint16_t peer_port;

    assert_memory_equal(key, KEY, 20);
    h->relayed++;
    h->relay_initiator = initiator;
    sin_parts(relay, &h->relay_ip, &h->relay_port);
    sin_parts(peer, &h->relay_peer_ip, &peer_port);
    memcpy(h->relay_nonce, nonce, DG_HP_NONCE_LEN);
}

/* ops->failed: records it, and may ask again in relay mode (re-entrantly). */
static void op_failed(void *arg, const uint8_t key[20], const struct sockaddr *target,
                      enum dg_hp_failure why)
{
    struct host *h = arg;
    struct sockaddr_in via = sin4(D_IP, MAIN_PORT);

    h->failed++;
    h->why = why;
    h->failed_at = h->net->now;
    if (h->reconnect) {
        h->reconnect = 0;
        h->reconnect_rc = dg_hp_connect(h->hp, key, target, (struct sockaddr *)&via,
                                        DG_HP_MODE_RELAY, h->net->now);
    }
}

static const struct dg_hp_ops host_ops = {
    .send = op_send,
    .open_paths = op_open_paths,
    .close_path = op_close_path,
    .announced = op_announced,
    .serves = op_serves,
    .relay_expect = op_relay_expect,
    .punched = op_punched,
    .relay = op_relay,
    .failed = op_failed,
    .announced_from = op_announced_from,
    .rendezvous_ok = op_rendezvous_ok,
};

/* The class a host behind such a NAT would learn. */
static enum dg_nat_class class_of(enum kind k)
{
    return k == K_NONE ? DG_NAT_NONE : k == K_EASY ? DG_NAT_EASY : DG_NAT_HARD;
}

/* A host at @p ip behind a NAT of kind @p k; @p with_hp 0 makes a raw host. */
static struct host *host_new(struct net *n, const char *name, enum kind k, uint32_t ip, int with_hp)
{
    struct host *h = calloc(1, sizeof(*h));

    assert_non_null(h);
    assert_true(n->nhosts < NHOST);
    n->hosts[n->nhosts++] = h;
    h->net = n;
    h->name = name;
    h->kind = k;
    h->ip = ip;
    memset(h->rev, 0xff, sizeof(h->rev));
    sock_open(h);
    if (with_hp) {
        assert_int_equal(dg_hp_new(&host_ops, h, rng_next(&n->rng), &h->hp), 0);
        dg_hp_set_nat(h->hp, class_of(k));
        h->next_tick = n->now;
    } else {
        h->cap = calloc(MAXCAP, sizeof(*h->cap));
        assert_non_null(h->cap);
    }
    return h;
}

/* Frees the host's dg_hp and checks that only the engine's sockets are left open. */
static void host_free_hp(struct host *h)
{
    int engine = 0;
    uint64_t sends = h->sends;
    int punched = h->punched, failed = h->failed, relayed = h->relayed;

    if (!h->hp)
        return;
    dg_hp_free(h->hp);
    h->hp = NULL;
    for (int s = 1; s < h->nsock; s++) {
        assert_true(!h->sock[s].open || h->sock[s].engine);
        engine += h->sock[s].engine;
    }
    assert_int_equal(h->opened - h->closed, engine);
    /* dg_hp_free sends nothing and calls nothing else */
    assert_int_equal(h->sends, sends);
    assert_int_equal(h->punched, punched);
    assert_int_equal(h->failed, failed);
    assert_int_equal(h->relayed, relayed);
}

/* An empty network at time T0. */
static struct net *net_new(uint64_t seed)
{
    struct net *n = calloc(1, sizeof(*n));

    assert_non_null(n);
    n->now = T0;
    n->rng = seed;
    return n;
}

/* Frees everything; checks the rendezvous rule and the sockets. */
static void net_free(struct net *n)
{
    assert_int_equal(n->violations, 0);
    for (int i = 0; i < n->nhosts; i++) {
        struct host *h = n->hosts[i];
        host_free_hp(h);
        assert_int_equal(h->spoiled, 0);
        free(h->cap);
        free(h);
    }
    free(n->heap);
    free(n);
}

/* ---- a world: D, A behind one NAT, B behind another ---- */

static struct world {
    struct net *n;
    struct host *d, *a, *b;
} w;

/* D, A (serving KEY, announced to D) and B on a new network. */
static void world_start(enum kind bk, enum kind ak, uint64_t seed)
{
    w.n = net_new(seed);
    w.d = host_new(w.n, "D", K_NONE, D_IP, 1);
    w.d->is_rdv = 1;
    w.d->relay_on = 1;
    w.a = host_new(w.n, "A", ak, A_IP, 1);
    w.a->serves = 1;
    w.b = host_new(w.n, "B", bk, B_IP, 1);
    /* A announces to D from its main socket (as the DHT does), which opens its mapping. */
    net_send(w.a, 0, "ANNOUNCE", 8, D_IP, MAIN_PORT);
    run(w.n, 100, NULL);
    assert_true(w.d->have_contact);
}

/* Frees the world, with net_free()'s checks. */
static void world_end(void)
{
    net_free(w.n);
    memset(&w, 0, sizeof(w));
}

/* @p h asks D to bring (ip, port); then ticks, as the engine would. */
static int connect_to(struct host *h, uint32_t ip, uint16_t port, enum dg_hp_mode mode)
{
    struct sockaddr_in target = sin4(ip, port), via = sin4(D_IP, MAIN_PORT);
    int rc = dg_hp_connect(h->hp, KEY, (struct sockaddr *)&target, (struct sockaddr *)&via, mode,
                           h->net->now);

    if (!h->period)
        do_tick(h);
    return rc;
}

/* B asks D to bring A. */
static int world_connect(enum dg_hp_mode mode)
{
    return connect_to(w.b, A_IP, MAIN_PORT, mode);
}

/* Predicates for run(). */
static int both_punched_or_failed(void)
{
    return (w.a->punched && w.b->punched) || w.b->failed;
}

static int b_finished(void)
{
    return w.b->punched || w.b->failed || w.b->relayed;
}

static int both_relayed(void)
{
    return w.a->relayed && w.b->relayed;
}

static int both_relayed_or_failed(void)
{
    return (w.a->relayed && w.b->relayed) || w.b->failed;
}

/* A datagram sent on each side's punched path to its punched peer arrives at the other side,
 * on the other side's punched path. */
static void check_reach(void)
{
    int a_other = w.a->other, b_other = w.b->other;

    net_send(w.b, w.b->punched_path, "HELLO-B", 7, w.b->punched_ip, w.b->punched_port);
    net_send(w.a, w.a->punched_path, "HELLO-A", 7, w.a->punched_ip, w.a->punched_port);
    run(w.n, 100, NULL);
    assert_int_equal(w.a->other, a_other + 1);
    assert_int_equal(w.a->other_path, w.a->punched_path);
    assert_memory_equal(w.a->other_buf, "HELLO-B", 7);
    assert_int_equal(w.b->other, b_other + 1);
    assert_int_equal(w.b->other_path, w.b->punched_path);
    assert_memory_equal(w.b->other_buf, "HELLO-A", 7);
}

/* Sessions of every host have ended. */
static void check_idle(void)
{
    for (int i = 0; i < w.n->nhosts; i++)
        if (w.n->hosts[i]->hp)
            assert_int_equal(dg_hp_sessions(w.n->hosts[i]->hp), 0);
}

/* @p h's counters. */
static struct dg_hp_stats stats(const struct host *h)
{
    struct dg_hp_stats st;

    dg_hp_get_stats(h->hp, &st);
    return st;
}

/* ---- the codec ---- */

/* A valid message of type @p t with every field it carries set. */
static void fill_msg(struct dg_hp_msg *m, enum dg_hp_type t, int v6)
{
    memset(m, 0, sizeof(*m));
    m->type = t;
    for (int i = 0; i < DG_HP_NONCE_LEN; i++)
        m->nonce[i] = (uint8_t)(0xa0 + i);
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH)
        memcpy(m->key, KEY, 20);
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK) {
        if (v6) {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&m->addr;
            s6->sin6_family = AF_INET6;
            s6->sin6_port = htons(51413);
            inet_pton(AF_INET6, "2001:db8::1:2", &s6->sin6_addr);
        } else {
            struct sockaddr_in s4 = sin4(A_IP, 51413);
            memcpy(&m->addr, &s4, sizeof(s4));
        }
    }
    if (t != DG_HP_COOKIE && t != DG_HP_PUNCH_REJECT && t != DG_HP_CONNECT_REJECT)
        m->nat = DG_NAT_HARD;
    if (t == DG_HP_CONNECT || t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK)
        m->mode = DG_HP_MODE_RELAY;
    if (t == DG_HP_PUNCH || t == DG_HP_CONNECT_ACK)
        m->relay_port = RELAY_PORT;
    if (t == DG_HP_PUNCH_REJECT || t == DG_HP_CONNECT_REJECT)
        m->reason = DG_HP_FAIL_BUSY;
    if (t == DG_HP_PROBE)
        m->flags = DG_HP_PROBE_REPLY;
    if (t == DG_HP_CONNECT || t == DG_HP_COOKIE)
        memset(m->cookie, 0x5c, DG_HP_COOKIE_LEN);
}

/* Every type, IPv4 and IPv6: the sizes of the doc, the layout, exact round trips. */
static void test_codec_round_trip(void **state)
{
    /* The sizes docs/PROTOCOL.md section 6 gives, IPv4 and IPv6. */
    static const int size4[9] = {0, 58, 29, 52, 22, 22, 32, 22, 23};
    static const int size6[9] = {0, 70, 29, 64, 22, 22, 44, 22, 23};

    (void)state;
    for (int v6 = 0; v6 <= 1; v6++) {
        for (int t = DG_HP_CONNECT; t <= DG_HP_PROBE; t++) {
            struct dg_hp_msg m, back;
            uint8_t buf[DG_HP_MAX_MESSAGE], again[DG_HP_MAX_MESSAGE];
            fill_msg(&m, (enum dg_hp_type)t, v6);
            int n = dg_hp_format(&m, buf, sizeof(buf));
            assert_int_equal(n, v6 ? size6[t] : size4[t]);
            assert_memory_equal(buf, "DGH1", 4);
            assert_int_equal(buf[4], t);
            assert_int_equal(dg_hp_parse(buf, (size_t)n, &back), 0);
            assert_memory_equal(&back, &m, sizeof(m));
            assert_int_equal(dg_hp_format(&back, again, sizeof(again)), n);
            assert_memory_equal(again, buf, (size_t)n);
            /* every shorter buffer is too small, every truncation and extension refused */
            assert_int_equal(dg_hp_format(&m, again, (size_t)n - 1), -ENOBUFS);
            for (int k = 0; k < n; k++)
                assert_int_equal(dg_hp_parse(buf, (size_t)k, &back), -EBADMSG);
            buf[n] = 0;
            assert_int_equal(dg_hp_parse(buf, (size_t)n + 1, &back), -EBADMSG);
        }
    }
    /* The address layout: family byte, IP, port in network order. */
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    fill_msg(&m, DG_HP_CONNECT_ACK, 0);
    assert_int_equal(dg_hp_format(&m, buf, sizeof(buf)), 32);
    static const uint8_t tail[] = {4, 198, 51, 100, 10, 51413 >> 8, 51413 & 0xff, 3, 2, 0x1b, 0x58};
    assert_memory_equal(buf + 21, tail, sizeof(tail));
}

/* Parses @p buf after applying @p patch at @p off. */
static int parse_patched(const uint8_t *buf, size_t len, size_t off, uint8_t patch)
{
    uint8_t copy[DG_HP_MAX_MESSAGE + 1];
    struct dg_hp_msg m;

    memcpy(copy, buf, len);
    copy[off] = patch;
    return dg_hp_parse(copy, len, &m);
}

/* One bad field at a time is refused by the parser, and by the formatter. */
static void test_codec_rejects(void **state)
{
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE + 8];
    int n;

    (void)state;
    assert_int_equal(dg_hp_parse((const uint8_t *)"", 0, &m), -EBADMSG);
    assert_int_equal(dg_hp_parse((const uint8_t *)"DGH1", 4, &m), -EBADMSG);

    fill_msg(&m, DG_HP_PUNCH, 0);
    m.mode = DG_HP_MODE_PUNCH;
    m.relay_port = 0;
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(n, 52);
    assert_int_equal(dg_hp_parse(buf, (size_t)n, &m), 0);
    assert_int_equal(parse_patched(buf, (size_t)n, 0, 'd'), -EBADMSG);  /* magic */
    assert_int_equal(parse_patched(buf, (size_t)n, 3, '2'), -EBADMSG);  /* magic version */
    assert_int_equal(parse_patched(buf, (size_t)n, 4, 0), -EBADMSG);    /* type 0 */
    assert_int_equal(parse_patched(buf, (size_t)n, 4, 9), -EBADMSG);    /* type 9 */
    assert_int_equal(parse_patched(buf, (size_t)n, 4, 2), -EBADMSG);    /* COOKIE's length */
    assert_int_equal(parse_patched(buf, (size_t)n, 41, 5), -EBADMSG);   /* family 5 */
    assert_int_equal(parse_patched(buf, (size_t)n, 41, 6), -EBADMSG);   /* family 6, too short */
    assert_int_equal(parse_patched(buf, (size_t)n, 42, 0), -EBADMSG);   /* IP 0.x.x.x */
    assert_int_equal(parse_patched(buf, (size_t)n, 42, 224), -EBADMSG); /* multicast */
    assert_int_equal(parse_patched(buf, (size_t)n, 42, 255), -EBADMSG); /* broadcast */
    assert_int_equal(parse_patched(buf, (size_t)n, 48, 4), -EBADMSG);   /* class 4 */
    assert_int_equal(parse_patched(buf, (size_t)n, 49, 0), -EBADMSG);   /* mode 0 */
    assert_int_equal(parse_patched(buf, (size_t)n, 49, 3), -EBADMSG);   /* mode 3 */
    assert_int_equal(parse_patched(buf, (size_t)n, 51, 1), -EBADMSG);   /* relay port in punch */
    /* port 0 */
    uint8_t copy[64];
    memcpy(copy, buf, (size_t)n);
    copy[46] = copy[47] = 0;
    assert_int_equal(dg_hp_parse(copy, (size_t)n, &m), -EBADMSG);

    /* relay mode without a relay port */
    fill_msg(&m, DG_HP_CONNECT_ACK, 1);
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(n, 44);
    buf[42] = buf[43] = 0;
    assert_int_equal(dg_hp_parse(buf, (size_t)n, &m), -EBADMSG);
    /* IPv6: unspecified, multicast, v4-mapped 0.0.0.0 */
    fill_msg(&m, DG_HP_CONNECT_ACK, 1);
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(parse_patched(buf, (size_t)n, 22, 0xff), -EBADMSG);
    memset(buf + 22, 0, 16);
    assert_int_equal(dg_hp_parse(buf, (size_t)n, &m), -EBADMSG);
    buf[32] = buf[33] = 0xff;
    assert_int_equal(dg_hp_parse(buf, (size_t)n, &m), -EBADMSG);
    buf[34] = 10;
    assert_int_equal(dg_hp_parse(buf, (size_t)n, &m), 0);

    /* reasons and flags out of range */
    fill_msg(&m, DG_HP_CONNECT_REJECT, 0);
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(parse_patched(buf, (size_t)n, 21, DG_HP_FAIL_TIMEOUT), -EBADMSG);
    assert_int_equal(parse_patched(buf, (size_t)n, 21, 0), -EBADMSG);
    assert_int_equal(parse_patched(buf, (size_t)n, 21, DG_HP_FAIL_NO_RELAY), 0);
    fill_msg(&m, DG_HP_PUNCH_REJECT, 0);
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(parse_patched(buf, (size_t)n, 21, DG_HP_FAIL_UNKNOWN_PEER), -EBADMSG);
    fill_msg(&m, DG_HP_PROBE, 0);
    n = dg_hp_format(&m, buf, sizeof(buf));
    assert_int_equal(parse_patched(buf, (size_t)n, 22, 2), -EBADMSG);
    assert_int_equal(parse_patched(buf, (size_t)n, 21, 7), -EBADMSG);

    /* format refuses what parse would */
    fill_msg(&m, DG_HP_CONNECT, 0);
    m.addr.ss_family = AF_UNIX;
    assert_int_equal(dg_hp_format(&m, buf, sizeof(buf)), -EINVAL);
    fill_msg(&m, DG_HP_PUNCH, 0);
    m.relay_port = 0;
    assert_int_equal(dg_hp_format(&m, buf, sizeof(buf)), -EINVAL);
    fill_msg(&m, DG_HP_PROBE, 0);
    m.type = (enum dg_hp_type)42;
    assert_int_equal(dg_hp_format(&m, buf, sizeof(buf)), -EINVAL);

    /* over the size limit */
    memset(buf, 0, sizeof(buf));
    memcpy(buf, "DGH1", 4);
    buf[4] = DG_HP_PROBE;
    assert_int_equal(dg_hp_parse(buf, DG_HP_MAX_MESSAGE + 1, &m), -EBADMSG);

    assert_true(dg_hp_is_packet((const uint8_t *)"DGH1", 4));
    assert_false(dg_hp_is_packet((const uint8_t *)"DGH", 3));
    assert_false(dg_hp_is_packet((const uint8_t *)"d1:ad2:id20:", 12));
    assert_string_equal(dg_nat_class_name(DG_NAT_UNKNOWN), "unknown");
    assert_string_equal(dg_nat_class_name(DG_NAT_NONE), "none");
    assert_string_equal(dg_nat_class_name(DG_NAT_EASY), "easy");
    assert_string_equal(dg_nat_class_name(DG_NAT_HARD), "hard");
    assert_string_equal(dg_nat_class_name((enum dg_nat_class)9), "?");
}

/* ---- punching across every pair of NATs ---- */

/* Punching started by a peer connected to both (dg_hp_punch): both sides get the same nonce
 * and each other's address; D takes no part. Every pair but hard x hard punches. */
static void test_matrix_punch_direct(void **state)
{
    static const enum dg_nat_class cls[] = {DG_NAT_NONE, DG_NAT_EASY, DG_NAT_HARD};
    uint8_t nonce[DG_HP_NONCE_LEN];

    (void)state;
    memset(nonce, 0x5a, sizeof(nonce));
    for (int bk = K_NONE; bk <= K_HARD; bk++) {
        for (int ak = K_NONE; ak <= K_HARD; ak++) {
            world_start((enum kind)bk, (enum kind)ak, 300 + (uint64_t)(3 * bk + ak));
            struct sockaddr_in to_a = sin4(A_IP, MAIN_PORT), to_b = sin4(B_IP, MAIN_PORT);
            int rb =
                dg_hp_punch(w.b->hp, KEY, nonce, (struct sockaddr *)&to_a, cls[ak], 1, w.n->now);
            int ra =
                dg_hp_punch(w.a->hp, KEY, nonce, (struct sockaddr *)&to_b, cls[bk], 0, w.n->now);
            if (bk == K_HARD && ak == K_HARD) {
                assert_int_equal(rb, -EPERM);
                assert_int_equal(ra, -EPERM);
                world_end();
                continue;
            }
            assert_int_equal(rb, 0);
            assert_int_equal(ra, 0);
            /* the same nonce or peer twice is refused */
            assert_int_equal(
                dg_hp_punch(w.b->hp, KEY, nonce, (struct sockaddr *)&to_a, cls[ak], 1, w.n->now),
                -EALREADY);
            do_tick(w.b);
            do_tick(w.a);
            run(w.n, 20000, both_punched_or_failed);
            assert_int_equal(w.b->failed, 0);
            assert_int_equal(w.b->punched, 1);
            assert_int_equal(w.a->punched, 1);
            assert_int_equal(w.b->punched_initiator, 1);
            assert_int_equal(w.a->punched_initiator, 0);
            assert_int_equal(w.b->punched_ip, A_IP);
            assert_int_equal(w.a->punched_ip, B_IP);
            check_reach();
            assert_int_equal(w.d->sent_type[DG_HP_PUNCH], 0); /* no rendezvous involved */
            run(w.n, 30000, NULL);
            check_idle();
            world_end();
        }
    }
}

/* Every pair of NATs: punched on both sides (and reachable), or both hard. */
static void test_matrix_punch(void **state)
{
    (void)state;
    for (int bk = K_NONE; bk <= K_HARD; bk++) {
        for (int ak = K_NONE; ak <= K_HARD; ak++) {
            world_start((enum kind)bk, (enum kind)ak, 100 + (uint64_t)(3 * bk + ak));
            uint64_t start = w.n->now;
            assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
            run(w.n, 20000, both_punched_or_failed);
            if (bk == K_HARD && ak == K_HARD) {
                assert_int_equal(w.b->failed, 1);
                assert_int_equal(w.b->why, DG_HP_FAIL_BOTH_HARD);
                assert_int_equal(w.a->punched + w.b->punched, 0);
                assert_int_equal(w.a->opened + w.b->opened, 0); /* nobody punches */
            } else {
                print_message("B %s, A %s: punched after %llu ms\n", kind_name[bk], kind_name[ak],
                              (unsigned long long)(w.n->now - start));
                assert_int_equal(w.b->failed, 0);
                assert_int_equal(w.b->punched, 1);
                assert_int_equal(w.a->punched, 1);
                assert_int_equal(w.b->punched_initiator, 1);
                assert_int_equal(w.a->punched_initiator, 0);
                assert_int_equal(w.b->punched_ip, A_IP);
                assert_int_equal(w.a->punched_ip, B_IP);
                check_reach();
                /* the hard side facing an easy one punched from an extra socket */
                if (bk == K_HARD && ak == K_EASY)
                    assert_true(w.b->punched_path > 0);
                if (ak == K_HARD && bk == K_EASY)
                    assert_true(w.a->punched_path > 0);
            }
            /* every session and lingering record ends; nothing punched twice */
            run(w.n, 30000, NULL);
            check_idle();
            assert_true(w.a->punched <= 1 && w.b->punched <= 1 && w.b->failed <= 1);
            /* extra sockets: all closed but the one handed over */
            assert_int_equal(w.a->opened - w.a->closed, w.a->punched_path > 0);
            assert_int_equal(w.b->opened - w.b->closed, w.b->punched_path > 0);
            world_end();
        }
    }
}

/* Every pair of NATs in relay mode: both sides get D's relay and the same nonce. */
static void test_matrix_relay(void **state)
{
    (void)state;
    for (int bk = K_NONE; bk <= K_HARD; bk++) {
        for (int ak = K_NONE; ak <= K_HARD; ak++) {
            world_start((enum kind)bk, (enum kind)ak, 200 + (uint64_t)(3 * bk + ak));
            assert_int_equal(world_connect(DG_HP_MODE_RELAY), 0);
            run(w.n, 10000, both_relayed_or_failed);
            assert_int_equal(w.b->failed, 0);
            assert_int_equal(w.b->relayed, 1);
            assert_int_equal(w.a->relayed, 1);
            assert_int_equal(w.d->relay_expects, 1);
            assert_int_equal(w.b->relay_initiator, 1);
            assert_int_equal(w.a->relay_initiator, 0);
            assert_int_equal(w.b->relay_ip, D_IP);
            assert_int_equal(w.a->relay_ip, D_IP);
            assert_int_equal(w.b->relay_peer_ip, w.a->ip); /* public IPs: the NAT's, or own */
            assert_int_equal(w.a->relay_peer_ip, w.b->ip);
            assert_int_equal(w.b->relay_port, RELAY_PORT);
            assert_int_equal(w.a->relay_port, RELAY_PORT);
            assert_memory_equal(w.b->relay_nonce, w.d->expected_nonce, DG_HP_NONCE_LEN);
            assert_memory_equal(w.a->relay_nonce, w.d->expected_nonce, DG_HP_NONCE_LEN);
            assert_int_equal(stats(w.b).relayed, 1);
            run(w.n, 10000, NULL);
            assert_int_equal(w.a->relayed + w.b->relayed, 2); /* D's resends change nothing */
            assert_int_equal(w.a->opened + w.b->opened, 0);
            assert_int_equal(w.a->sent_type[DG_HP_PROBE] + w.b->sent_type[DG_HP_PROBE], 0);
            check_idle();
            world_end();
        }
    }
}

/* The birthday technique, 100 seeded runs each way; both sides must punch and reach. */
static void birthday_runs(enum kind bk, enum kind ak)
{
    int ok = 0;
    double sprayed = 0, probes = 0, ms = 0;

    for (uint64_t seed = 1; seed <= 100; seed++) {
        world_start(bk, ak, seed * 7919);
        struct host *easy = bk == K_EASY ? w.b : w.a, *hard = bk == K_EASY ? w.a : w.b;
        easy->watch_ip = hard->ip;
        uint64_t start = w.n->now;
        assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
        run(w.n, 20000, both_punched_or_failed);
        if (w.a->punched && w.b->punched) {
            ok++;
            check_reach();
            sprayed += (double)stats(easy).sprayed;
            probes += (double)(stats(w.a).probes_sent + stats(w.b).probes_sent);
            uint64_t last = w.a->punched_at > w.b->punched_at ? w.a->punched_at : w.b->punched_at;
            ms += (double)(last - start);
        }
        /* the sprayer never sends to the same port twice (its known port aside) */
        int repeated = 0;
        for (int p = 0; p < 65536; p++)
            repeated += easy->port_count[p] > 1;
        assert_true(repeated <= 1);
        run(w.n, 30000, NULL);
        check_idle();
        assert_int_equal(hard->opened, DG_HP_BIRTHDAY_SOCKETS);
        assert_int_equal(hard->opened - hard->closed, hard->punched_path > 0);
        world_end();
    }
    print_message("birthday B %s x A %s: %d/100 punched; mean %.0f sprayed, %.0f probes in "
                  "all, %.0f ms\n",
                  kind_name[bk], kind_name[ak], ok, ok ? sprayed / ok : 0, ok ? probes / ok : 0,
                  ok ? ms / ok : 0);
    assert_true(ok >= 95);
}

/* B easy, A hard. */
static void test_birthday_easy_hard(void **state)
{
    (void)state;
    birthday_runs(K_EASY, K_HARD);
}

/* B hard, A easy. */
static void test_birthday_hard_easy(void **state)
{
    (void)state;
    birthday_runs(K_HARD, K_EASY);
}

/* ---- failures ---- */

/* A target that did not announce to D: unknown peer, and D sends no PUNCH. */
static void test_unknown_target(void **state)
{
    (void)state;
    world_start(K_EASY, K_EASY, 301);
    assert_int_equal(connect_to(w.b, A_IP, 6882, DG_HP_MODE_PUNCH), 0); /* not announced */
    run(w.n, 10000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_UNKNOWN_PEER);
    assert_int_equal(w.d->sent_type[DG_HP_PUNCH], 0);
    assert_int_equal(stats(w.d).refused, 1);
    assert_int_equal(stats(w.b).failed, 1);
    world_end();
}

/* A that does not serve the key: refused. */
static void test_not_serving(void **state)
{
    (void)state;
    world_start(K_EASY, K_EASY, 302);
    w.a->serves = 0;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_REFUSED);
    assert_int_equal(w.a->sent_type[DG_HP_PUNCH_REJECT], 1);
    assert_int_equal(stats(w.a).rejected, 1);
    assert_int_equal(w.a->sent_type[DG_HP_PROBE], 0);
    world_end();
}

/* A silent: D resends the PUNCH once, then refuses after 3 s. */
static void test_responder_silent(void **state)
{
    (void)state;
    world_start(K_EASY, K_EASY, 303);
    w.a->drop_in = 1;
    uint64_t start = w.n->now;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_REFUSED);
    assert_true(w.b->failed_at - start >= DG_HP_RENDEZVOUS_TIMEOUT_MS);
    assert_true(w.b->failed_at - start < DG_HP_CONNECT_TIMEOUT_MS);
    assert_int_equal(w.d->sent_type[DG_HP_PUNCH], 2); /* resent once */
    world_end();
}

/* D silent: five CONNECTs, then no answer after exactly 5 s. */
static void test_rendezvous_silent(void **state)
{
    (void)state;
    world_start(K_EASY, K_EASY, 304);
    w.d->drop_in = 1;
    uint64_t start = w.n->now;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_NO_ANSWER);
    assert_int_equal(w.b->failed_at - start, DG_HP_CONNECT_TIMEOUT_MS);
    assert_int_equal(w.b->sent_type[DG_HP_CONNECT], DG_HP_CONNECT_TIMEOUT_MS / DG_HP_RESEND_MS);
    check_idle();
    world_end();
}

/* The 11th CONNECT from one IP in 10 s is refused busy; later ones pass again. */
static void test_rate_limit(void **state)
{
    (void)state;
    world_start(K_NONE, K_EASY, 305);
    for (int i = 0; i < DG_HP_RATE_MAX + 1; i++) {
        w.b->failed = 0;
        assert_int_equal(connect_to(w.b, A_IP, (uint16_t)(10000 + i), DG_HP_MODE_PUNCH), 0);
        run(w.n, 1000, b_finished);
        assert_int_equal(w.b->failed, 1);
        assert_int_equal(w.b->why, i < DG_HP_RATE_MAX ? DG_HP_FAIL_UNKNOWN_PEER : DG_HP_FAIL_BUSY);
    }
    assert_true(w.n->now - T0 < 10000);
    /* a while later it is allowed again, and works */
    run(w.n, 10000, NULL);
    w.b->failed = 0;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, both_punched_or_failed);
    assert_int_equal(w.b->failed, 0);
    assert_int_equal(w.b->punched, 1);
    assert_int_equal(stats(w.d).refused, DG_HP_RATE_MAX + 1);
    world_end();
}

/* A sends nothing to anybody D forwarded nothing for; D sends a forged source only COOKIEs,
 * smaller than what it got. */
static void test_spoofed_connect(void **state)
{
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    int n;

    (void)state;
    world_start(K_NONE, K_EASY, 306);
    struct host *vic = host_new(w.n, "victim", K_NONE, VIC_IP, 0);
    fill_msg(&m, DG_HP_CONNECT, 0);
    struct sockaddr_in target = sin4(A_IP, MAIN_PORT);
    memcpy(&m.addr, &target, sizeof(target));
    m.mode = DG_HP_MODE_PUNCH;
    for (int i = 0; i < 50; i++) {
        m.nonce[0] = (uint8_t)i;
        m.cookie[0] = (uint8_t)i; /* a guess */
        n = dg_hp_format(&m, buf, sizeof(buf));
        assert_int_equal(n, 58);
        net_inject(w.n, VIC_IP, MAIN_PORT, buf, (size_t)n, D_IP, MAIN_PORT);
        run(w.n, 20, NULL);
    }
    run(w.n, 20000, NULL);
    assert_int_equal(stats(w.d).cookies, 50);
    assert_int_equal(stats(w.d).forwarded, 0);
    assert_int_equal(w.d->sent_type[DG_HP_PUNCH], 0);
    assert_int_equal(stats(w.a).answered, 0);
    assert_int_equal(vic->ncap, 50);
    for (size_t i = 0; i < vic->ncap; i++) {
        assert_int_equal(dg_hp_parse(vic->cap[i].buf, vic->cap[i].len, &m), 0);
        assert_int_equal(m.type, DG_HP_COOKIE);
        assert_int_equal(vic->cap[i].sip, D_IP);
        assert_true(vic->cap[i].len < (size_t)n);
    }
    /* The real B, with its cookie round trip, still gets through. */
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, both_punched_or_failed);
    assert_int_equal(w.b->punched, 1);
    assert_int_equal(w.b->sent_type[DG_HP_CONNECT], 2); /* without, then with the cookie */
    world_end();
}

/* ---- paths ---- */

/* Every extra socket is closed when punching times out, at B and at A. */
static void test_paths_closed_on_failure(void **state)
{
    (void)state;
    /* B hard facing an easy A that never hears a probe: B times out, closes all 256. */
    world_start(K_HARD, K_EASY, 401);
    w.a->drop_probes = 1;
    uint64_t start = w.n->now;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 30000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_TIMEOUT);
    assert_true(w.b->failed_at - start >= DG_HP_PUNCH_TIMEOUT_MS);
    assert_true(w.b->failed_at - start < DG_HP_PUNCH_TIMEOUT_MS + 1000);
    assert_int_equal(w.b->opened, DG_HP_BIRTHDAY_SOCKETS);
    assert_int_equal(w.b->closed, DG_HP_BIRTHDAY_SOCKETS);
    /* the easy A sprayed at most DG_HP_SPRAY_MAX, ended quietly */
    run(w.n, 5000, NULL);
    assert_int_equal(stats(w.a).sprayed, DG_HP_SPRAY_MAX);
    assert_int_equal(w.a->failed, 0);
    check_idle();
    world_end();

    /* A hard facing an easy B that hears nothing: A ends quietly, closes all 256. */
    world_start(K_EASY, K_HARD, 402);
    w.b->drop_probes = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 30000, b_finished);
    assert_int_equal(w.b->why, DG_HP_FAIL_TIMEOUT);
    run(w.n, 5000, NULL);
    assert_int_equal(w.a->opened, DG_HP_BIRTHDAY_SOCKETS);
    assert_int_equal(w.a->closed, DG_HP_BIRTHDAY_SOCKETS);
    assert_int_equal(w.a->punched + w.a->failed, 0);
    world_end();
}

/* dg_hp_free closes them; fewer sockets than asked for still work. */
static void test_paths_closed_on_free(void **state)
{
    (void)state;
    world_start(K_EASY, K_HARD, 403);
    w.b->drop_probes = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 2000, NULL);
    assert_int_equal(w.a->opened, DG_HP_BIRTHDAY_SOCKETS);
    assert_int_equal(w.a->closed, 0);
    assert_int_equal(dg_hp_sessions(w.a->hp), 1);
    host_free_hp(w.a); /* closes them all, calls and sends nothing else */
    assert_int_equal(w.a->closed, DG_HP_BIRTHDAY_SOCKETS);
    world_end();

    /* Fewer paths than asked: the session still runs (and succeeds) on what it got. */
    world_start(K_HARD, K_EASY, 404);
    w.b->max_paths = 200;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 20000, both_punched_or_failed);
    assert_int_equal(w.b->punched, 1);
    assert_int_equal(w.b->opened, 200);
    assert_int_equal(w.b->closed, 199);
    world_end();
}

/* ---- bad input ---- */

/* Malformed datagrams are counted and unanswered; stray ones ignored. */
static void test_malformed(void **state)
{
    static const struct {
        const char *s;
        size_t len;
    } bad[] = {
        {"DGH1", 4},                                  /* no type */
        {"DGH1\x08", 5},                              /* no nonce */
        {"DGH1\x00xxxxxxxxxxxxxxxx", 21},             /* type 0 */
        {"DGH1\x08yyyyyyyyyyyyyyyy\x02", 22},         /* a PROBE without its flags */
        {"DGH1\x63zzzzzzzzzzzzzzzz\x01\x02\x03", 24}, /* type 99 */
    };
    struct sockaddr_in from = sin4(ATT_IP, 1234);

    (void)state;
    world_start(K_NONE, K_NONE, 501);
    uint64_t sends = w.a->sends;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        net_inject(w.n, ATT_IP, 1234, bad[i].s, bad[i].len, A_IP, MAIN_PORT);
    run(w.n, 100, NULL);
    assert_int_equal(stats(w.a).malformed, 5);
    assert_int_equal(w.a->sends, sends);
    /* without our magic: not ours, not counted */
    assert_int_equal(dg_hp_input(w.a->hp, 0, (const uint8_t *)"d1:ad2:id", 9,
                                 (struct sockaddr *)&from, w.n->now),
                     0);
    assert_int_equal(
        dg_hp_input(w.a->hp, 0, (const uint8_t *)"DG", 2, (struct sockaddr *)&from, w.n->now), 0);
    assert_int_equal(stats(w.a).malformed, 5);
    /* well-formed, but for no session: ignored, unanswered */
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    for (int t = DG_HP_COOKIE; t <= DG_HP_PROBE; t++) {
        if (t == DG_HP_PUNCH)
            continue;
        fill_msg(&m, (enum dg_hp_type)t, 0);
        int n = dg_hp_format(&m, buf, sizeof(buf));
        net_inject(w.n, ATT_IP, 1234, buf, (size_t)n, A_IP, MAIN_PORT);
    }
    run(w.n, 100, NULL);
    assert_int_equal(stats(w.a).ignored, 6);
    assert_int_equal(w.a->sends, sends);
    /* and the node still works */
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 5000, both_punched_or_failed);
    assert_int_equal(w.b->punched, 1);
    world_end();
}

/* Sends @p m (its nonce replaced by @p nonce when given) from (ip, port) to (dip, dport). */
static void inject_to(struct dg_hp_msg *m, const uint8_t *nonce, uint32_t ip, uint16_t port,
                      uint32_t dip, uint16_t dport)
{
    uint8_t buf[DG_HP_MAX_MESSAGE];
    int n;

    if (nonce)
        memcpy(m->nonce, nonce, DG_HP_NONCE_LEN);
    n = dg_hp_format(m, buf, sizeof(buf));
    assert_true(n > 0);
    net_inject(w.n, ip, port, buf, (size_t)n, dip, dport);
}

/* inject_to() to the main port. */
static void inject_msg(struct dg_hp_msg *m, const uint8_t *nonce, uint32_t ip, uint16_t port,
                       uint32_t dip)
{
    inject_to(m, nonce, ip, port, dip, MAIN_PORT);
}

/* Messages with a session's nonce from the wrong address or socket change nothing. */
static void test_wrong_sources(void **state)
{
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    int n;

    (void)state;
    world_start(K_NONE, K_NONE, 502);
    struct host *att = host_new(w.n, "attacker", K_NONE, ATT_IP, 0);
    w.a->mute_probes = w.b->mute_probes = 1; /* keeps the sessions open */
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 500, NULL);
    assert_int_equal(dg_hp_sessions(w.a->hp), 1);
    assert_int_equal(dg_hp_sessions(w.b->hp), 1);
    const uint8_t *nonce = w.n->last_punch_nonce;

    /* A PROBE with the nonce from another IP: no success, no answer. */
    fill_msg(&m, DG_HP_PROBE, 0);
    m.flags = 0;
    inject_msg(&m, nonce, ATT_IP, MAIN_PORT, A_IP);
    inject_msg(&m, nonce, ATT_IP, MAIN_PORT, B_IP);
    /* A CONNECT_ACK for B's nonce, not from D. */
    fill_msg(&m, DG_HP_CONNECT_ACK, 0);
    struct sockaddr_in vic = sin4(VIC_IP, 9);
    memcpy(&m.addr, &vic, sizeof(vic));
    inject_msg(&m, nonce, ATT_IP, MAIN_PORT, B_IP);
    run(w.n, 100, NULL);
    assert_int_equal(w.a->punched + w.b->punched + w.b->failed + w.b->relayed, 0);
    assert_int_equal(att->ncap, 0);
    assert_int_equal(stats(w.a).ignored, 1);
    assert_int_equal(stats(w.b).ignored, 2);

    /* A PROBE from B's IP with the nonce, but on a socket that is not the session's. */
    fill_msg(&m, DG_HP_PROBE, 0);
    memcpy(m.nonce, nonce, DG_HP_NONCE_LEN);
    m.flags = 0;
    n = dg_hp_format(&m, buf, sizeof(buf));
    int stray = sock_open(w.a);
    struct sockaddr_in from = sin4(B_IP, MAIN_PORT);
    assert_int_equal(
        dg_hp_input(w.a->hp, stray, buf, (size_t)n, (struct sockaddr *)&from, w.n->now), 1);
    assert_int_equal(w.a->punched, 0);
    assert_int_equal(stats(w.a).ignored, 2);
    w.a->sock[stray].open = 0;

    /* The real probes get through once they are no longer lost. */
    w.a->mute_probes = w.b->mute_probes = 0;
    run(w.n, 5000, both_punched_or_failed);
    assert_int_equal(w.a->punched, 1);
    assert_int_equal(w.b->punched, 1);
    world_end();

    /* D, waiting for A, ignores a PUNCH_ACK from anyone else: B is refused, not sent on. */
    world_start(K_NONE, K_NONE, 503);
    w.a->drop_in = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 500, NULL);
    fill_msg(&m, DG_HP_PUNCH_ACK, 0);
    inject_msg(&m, w.n->last_punch_nonce, ATT_IP, MAIN_PORT, D_IP);
    inject_msg(&m, w.n->last_punch_nonce, A_IP, 6882, D_IP); /* A's IP, another port */
    run(w.n, 10000, b_finished);
    assert_int_equal(stats(w.d).ignored, 2);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_REFUSED);
    assert_int_equal(w.b->sent_type[DG_HP_PROBE], 0);
    world_end();
}

/* A PROBE is answered at once, from the socket it came in on, and only if it is no reply:
 * B is scripted by hand here, facing a hard A that opened its birthday sockets. */
static void test_probe_answered(void **state)
{
    struct dg_hp_msg m, r;
    struct sockaddr_in target = sin4(A_IP, MAIN_PORT);
    uint16_t port = 0;
    int probes = 0;

    (void)state;
    world_start(K_NONE, K_HARD, 1201);
    struct host *vic = host_new(w.n, "scripted B", K_NONE, VIC_IP, 0);
    fill_msg(&m, DG_HP_CONNECT, 0);
    memcpy(&m.addr, &target, sizeof(target));
    m.mode = DG_HP_MODE_PUNCH;
    m.nat = DG_NAT_EASY;
    memset(m.cookie, 0, sizeof(m.cookie));
    inject_msg(&m, NULL, VIC_IP, MAIN_PORT, D_IP);
    run(w.n, 100, NULL);
    assert_int_equal(vic->ncap, 1);
    assert_int_equal(dg_hp_parse(vic->cap[0].buf, vic->cap[0].len, &r), 0);
    assert_int_equal(r.type, DG_HP_COOKIE);
    memcpy(m.cookie, r.cookie, DG_HP_COOKIE_LEN);
    inject_msg(&m, NULL, VIC_IP, MAIN_PORT, D_IP);
    run(w.n, 200, NULL);
    /* D's CONNECT_ACK, and A's first round: one probe from each socket */
    for (size_t i = 1; i < vic->ncap; i++) {
        assert_int_equal(dg_hp_parse(vic->cap[i].buf, vic->cap[i].len, &r), 0);
        if (r.type != DG_HP_PROBE)
            continue;
        assert_int_equal(vic->cap[i].sip, A_IP);
        assert_int_equal(r.flags, 0);
        if (++probes == 100)
            port = vic->cap[i].sport;
    }
    assert_int_equal(probes, DG_HP_BIRTHDAY_SOCKETS + 1);
    int sock = w.a->map[w.a->rev[port]].sock;
    assert_true(sock > 0);

    /* B's probe reaches A through one of those mappings: answered from it, at once. */
    size_t before = vic->ncap;
    fill_msg(&m, DG_HP_PROBE, 0);
    m.flags = 0;
    inject_to(&m, NULL, VIC_IP, MAIN_PORT, A_IP, port);
    run(w.n, 50, NULL);
    assert_int_equal(vic->ncap, before + 1);
    assert_int_equal(dg_hp_parse(vic->cap[before].buf, vic->cap[before].len, &r), 0);
    assert_int_equal(r.type, DG_HP_PROBE);
    assert_int_equal(r.flags, DG_HP_PROBE_REPLY);
    assert_int_equal(r.nat, DG_NAT_HARD);
    assert_int_equal(vic->cap[before].sip, A_IP);
    assert_int_equal(vic->cap[before].sport, port);
    assert_int_equal(w.a->punched, 1);
    assert_int_equal(w.a->punched_path, sock);
    assert_int_equal(w.a->punched_ip, VIC_IP);
    assert_int_equal(w.a->punched_port, MAIN_PORT);
    assert_int_equal(w.a->closed, DG_HP_BIRTHDAY_SOCKETS - 1);

    /* A reply is not answered; a late probe is, from the same socket. */
    m.flags = DG_HP_PROBE_REPLY;
    inject_to(&m, NULL, VIC_IP, MAIN_PORT, A_IP, port);
    run(w.n, 50, NULL);
    assert_int_equal(vic->ncap, before + 1);
    m.flags = 0;
    inject_to(&m, NULL, VIC_IP, MAIN_PORT, A_IP, port);
    run(w.n, 50, NULL);
    assert_int_equal(vic->ncap, before + 2);
    assert_int_equal(vic->cap[before + 1].sport, port);
    /* ...but not on a socket that is neither the main one nor the punched one. */
    uint8_t buf[DG_HP_MAX_MESSAGE];
    int n = dg_hp_format(&m, buf, sizeof(buf));
    int stray = sock_open(w.a);
    uint64_t sends = w.a->sends, ignored = stats(w.a).ignored;
    struct sockaddr_in from = sin4(VIC_IP, MAIN_PORT);
    assert_int_equal(
        dg_hp_input(w.a->hp, stray, buf, (size_t)n, (struct sockaddr *)&from, w.n->now), 1);
    assert_int_equal(w.a->sends, sends);
    assert_int_equal(stats(w.a).ignored, ignored + 1);
    w.a->sock[stray].open = 0;
    world_end();
}

/* ---- callbacks ---- */

/* failed() asks again, from inside dg_hp_input and from inside dg_hp_tick. */
static void test_reentrant_connect(void **state)
{
    (void)state;
    world_start(K_HARD, K_HARD, 601);
    w.b->reconnect = 1; /* failed() asks again, same target, relay mode */
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, both_relayed_or_failed);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_BOTH_HARD);
    assert_int_equal(w.b->reconnect_rc, 0);
    run(w.n, 10000, both_relayed);
    assert_int_equal(w.b->relayed, 1);
    assert_int_equal(w.a->relayed, 1);
    assert_memory_equal(w.a->relay_nonce, w.b->relay_nonce, DG_HP_NONCE_LEN);
    struct dg_hp_stats st = stats(w.b);
    assert_int_equal(st.connects, 2);
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.relayed, 1);
    world_end();

    /* Re-entrant from a timeout inside dg_hp_tick, with 256 sockets to close first. */
    world_start(K_HARD, K_EASY, 602);
    w.a->drop_probes = 1;
    w.b->reconnect = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 30000, both_relayed_or_failed);
    assert_int_equal(w.b->why, DG_HP_FAIL_TIMEOUT);
    assert_int_equal(w.b->reconnect_rc, 0);
    run(w.n, 10000, both_relayed);
    assert_int_equal(w.b->relayed, 1);
    assert_int_equal(w.b->closed, DG_HP_BIRTHDAY_SOCKETS);
    world_end();
}

/* dg_hp_connect's errors, and the session limit. */
static void test_connect_errors(void **state)
{
    struct sockaddr_in t = sin4(A_IP, MAIN_PORT), v = sin4(D_IP, MAIN_PORT), zero = sin4(A_IP, 0);
    struct sockaddr_in6 v6;
    struct sockaddr un = {.sa_family = AF_UNIX};

    (void)state;
    world_start(K_EASY, K_EASY, 701);
    w.d->drop_in = 1;
    memset(&v6, 0, sizeof(v6));
    v6.sin6_family = AF_INET6;
    v6.sin6_port = htons(1);
    inet_pton(AF_INET6, "2001:db8::1", &v6.sin6_addr);
    struct dg_hp *hp = w.b->hp;
    uint64_t now = w.n->now;
    assert_int_equal(dg_hp_connect(hp, KEY, &un, (struct sockaddr *)&v, DG_HP_MODE_PUNCH, now),
                     -EINVAL);
    assert_int_equal(dg_hp_connect(hp, KEY, (struct sockaddr *)&zero, (struct sockaddr *)&v,
                                   DG_HP_MODE_PUNCH, now),
                     -EINVAL);
    assert_int_equal(dg_hp_connect(hp, KEY, (struct sockaddr *)&t, (struct sockaddr *)&v6,
                                   DG_HP_MODE_PUNCH, now),
                     -EINVAL);
    assert_int_equal(dg_hp_connect(hp, KEY, (struct sockaddr *)&t, (struct sockaddr *)&v,
                                   (enum dg_hp_mode)3, now),
                     -EINVAL);
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    assert_int_equal(world_connect(DG_HP_MODE_RELAY), -EALREADY);
    for (int i = 1; i < DG_HP_MAX_SESSIONS; i++)
        assert_int_equal(connect_to(w.b, A_IP, (uint16_t)(20000 + i), DG_HP_MODE_PUNCH), 0);
    assert_int_equal(connect_to(w.b, A_IP, 30000, DG_HP_MODE_PUNCH), -EAGAIN);
    assert_int_equal(dg_hp_sessions(hp), DG_HP_MAX_SESSIONS);
    run(w.n, 6000, NULL);
    assert_int_equal(w.b->failed, DG_HP_MAX_SESSIONS);
    assert_int_equal(dg_hp_sessions(hp), 0);
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    world_end();
}

/* ---- timing ---- */

/* With a coarse timer the spray keeps its rate, up to DG_HP_SPRAY_BURST per tick. */
static void test_coarse_timer(void **state)
{
    (void)state;
    for (int period = 50; period <= 250; period += 200) {
        world_start(K_HARD, K_EASY, 801);
        w.b->drop_probes = 1; /* the spray never hits */
        w.a->period = (uint64_t)period;
        w.a->next_tick = w.n->now;
        assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
        run(w.n, 500, NULL);
        uint64_t before = stats(w.a).sprayed;
        assert_true(before > 0);
        for (int i = 0; i < 8; i++) {
            run(w.n, (uint64_t)period, NULL);
            uint64_t now = stats(w.a).sprayed;
            uint64_t want = (uint64_t)period / DG_HP_SPRAY_INTERVAL_MS;
            if (want > DG_HP_SPRAY_BURST)
                want = DG_HP_SPRAY_BURST;
            assert_int_equal(now - before, want);
            before = now;
            /* while spraying, the tick asks to run again soon */
            assert_true(w.a->last_wait <= DG_HP_SPRAY_INTERVAL_MS);
        }
        world_end();
    }

    /* Idle, or only probing: at most a second. */
    world_start(K_NONE, K_NONE, 802);
    assert_int_equal(dg_hp_tick(w.a->hp, w.n->now), 1000);
    w.b->drop_probes = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 300, NULL);
    assert_true(dg_hp_tick(w.a->hp, w.n->now) <= DG_HP_PROBE_INTERVAL_MS);
    world_end();
}

/* After success, the finished session answers late probes for DG_HP_LINGER_MS. */
static void test_linger(void **state)
{
    struct dg_hp_msg m;
    uint8_t buf[DG_HP_MAX_MESSAGE];

    (void)state;
    world_start(K_NONE, K_NONE, 901);
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 5000, both_punched_or_failed);
    assert_int_equal(w.a->punched, 1);
    run(w.n, 1000, NULL);
    fill_msg(&m, DG_HP_PROBE, 0);
    memcpy(m.nonce, w.n->last_punch_nonce, DG_HP_NONCE_LEN);
    m.flags = 0;
    int n = dg_hp_format(&m, buf, sizeof(buf));
    uint64_t replies = w.a->sent_type[DG_HP_PROBE], b_probes = w.b->sent_type[DG_HP_PROBE];
    net_send(w.b, w.b->punched_path, buf, (size_t)n, w.b->punched_ip, w.b->punched_port);
    run(w.n, 100, NULL);
    assert_int_equal(w.a->sent_type[DG_HP_PROBE], replies + 1);
    assert_int_equal(w.a->punched, 1);
    /* and the reply is not answered by B */
    assert_int_equal(w.b->sent_type[DG_HP_PROBE], b_probes);
    run(w.n, DG_HP_LINGER_MS, NULL);
    replies = w.a->sent_type[DG_HP_PROBE];
    uint64_t ignored = stats(w.a).ignored;
    net_send(w.b, w.b->punched_path, buf, (size_t)n, w.b->punched_ip, w.b->punched_port);
    run(w.n, 100, NULL);
    assert_int_equal(w.a->sent_type[DG_HP_PROBE], replies);
    assert_int_equal(stats(w.a).ignored, ignored + 1);
    world_end();
}

/* ---- the responder's limits ---- */

/* The responder's caps: blind sessions, PUNCHes per rendezvous, rendezvous_ok. */
static void test_responder_limits(void **state)
{
    struct dg_hp_msg m, r;
    uint8_t buf[DG_HP_MAX_MESSAGE];

    (void)state;
    world_start(K_NONE, K_NONE, 1001);
    struct host *att = host_new(w.n, "attacker", K_NONE, ATT_IP, 0);
    dg_hp_set_nat(w.a->hp, DG_NAT_EASY);
    /* PUNCHes from a rendezvous that A takes them from, for hard peers: spraying ones. */
    for (int i = 0; i < DG_HP_RATE_MAX + 1; i++) {
        fill_msg(&m, DG_HP_PUNCH, 0);
        m.nonce[0] = (uint8_t)i;
        struct sockaddr_in b = sin4(VIC_IP + (uint32_t)i, 5000);
        memcpy(&m.addr, &b, sizeof(b));
        m.mode = i < 6 ? DG_HP_MODE_PUNCH : DG_HP_MODE_RELAY;
        m.relay_port = i < 6 ? 0 : RELAY_PORT;
        int n = dg_hp_format(&m, buf, sizeof(buf));
        net_inject(w.n, ATT_IP, MAIN_PORT, buf, (size_t)n, A_IP, MAIN_PORT);
        run(w.n, 50, NULL);
        assert_int_equal(att->ncap, (size_t)i + 1);
        assert_int_equal(dg_hp_parse(att->cap[i].buf, att->cap[i].len, &r), 0);
        if (i < DG_HP_MAX_BLIND || (i >= 6 && i < DG_HP_RATE_MAX)) {
            assert_int_equal(r.type, DG_HP_PUNCH_ACK);
        } else {
            /* blind sessions full (4, 5), then the rendezvous's rate (10) */
            assert_int_equal(r.type, DG_HP_PUNCH_REJECT);
            assert_int_equal(r.reason, DG_HP_FAIL_BUSY);
        }
    }
    assert_int_equal(w.a->relayed, DG_HP_RATE_MAX - 6);
    assert_int_equal(dg_hp_sessions(w.a->hp), DG_HP_MAX_BLIND);

    /* A that takes PUNCHes only from D refuses the attacker. */
    w.a->rdv_only = D_IP;
    run(w.n, 10000, NULL);
    fill_msg(&m, DG_HP_PUNCH, 0);
    m.nonce[0] = 0x77;
    int n = dg_hp_format(&m, buf, sizeof(buf));
    net_inject(w.n, ATT_IP, MAIN_PORT, buf, (size_t)n, A_IP, MAIN_PORT);
    run(w.n, 50, NULL);
    assert_int_equal(dg_hp_parse(att->cap[att->ncap - 1].buf, att->cap[att->ncap - 1].len, &r), 0);
    assert_int_equal(r.type, DG_HP_PUNCH_REJECT);
    assert_int_equal(r.reason, DG_HP_FAIL_REFUSED);
    /* while B, through D, still gets through */
    w.b->failed = 0;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 5000, both_punched_or_failed);
    assert_int_equal(w.b->punched, 1);
    world_end();
}

/* A behind a hard NAT is reachable only at the port its announce came from, not at the
 * announced one: without announced_from, D's PUNCH is lost. */
static void test_hard_responder_contact(void **state)
{
    (void)state;
    world_start(K_EASY, K_HARD, 1101);
    w.d->no_contact = 1;
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 10000, b_finished);
    assert_int_equal(w.b->failed, 1);
    assert_int_equal(w.b->why, DG_HP_FAIL_REFUSED);
    assert_int_equal(stats(w.a).answered, 0);
    world_end();

    world_start(K_EASY, K_HARD, 1101);
    assert_int_equal(world_connect(DG_HP_MODE_PUNCH), 0);
    run(w.n, 20000, both_punched_or_failed);
    assert_int_equal(w.b->punched, 1);
    world_end();
}

/* ---- without a network: IPv6 rate limiting, NULL ops ---- */

struct solo {
    struct captured out[64];
    int n;
};

/* A dg_hp without a network: keeps what it sends. */
static void solo_send(void *arg, int path, const uint8_t *buf, size_t len,
                      const struct sockaddr *to)
{
    struct solo *s = arg;

    (void)to;
    assert_int_equal(path, 0);
    assert_true(s->n < 64);
    memcpy(s->out[s->n].buf, buf, len);
    s->out[s->n++].len = len;
}

/* Nobody announced anything. */
static int solo_announced(void *arg, const uint8_t key[20], const struct sockaddr *peer)
{
    (void)arg;
    (void)key;
    (void)peer;
    return 0;
}

/* Feeds @p m from @p src (IPv6, port 4000) at @p now; @return the answer's type, with the
 * answer in @p r (0 if nothing was sent). */
static int solo_in(struct dg_hp *hp, struct solo *s, const struct dg_hp_msg *m, const char *src,
                   uint64_t now, struct dg_hp_msg *r)
{
    struct sockaddr_in6 from;
    uint8_t buf[DG_HP_MAX_MESSAGE];
    int n, before = s->n;

    memset(&from, 0, sizeof(from));
    from.sin6_family = AF_INET6;
    from.sin6_port = htons(4000);
    assert_int_equal(inet_pton(AF_INET6, src, &from.sin6_addr), 1);
    n = dg_hp_format(m, buf, sizeof(buf));
    assert_true(n > 0);
    assert_int_equal(dg_hp_input(hp, 0, buf, (size_t)n, (struct sockaddr *)&from, now), 1);
    if (s->n == before)
        return 0;
    assert_int_equal(dg_hp_parse(s->out[s->n - 1].buf, s->out[s->n - 1].len, r), 0);
    return r->type;
}

/* A CONNECT from @p src, then again with the cookie it got. @return the reject's reason. */
static enum dg_hp_failure solo_connect(struct dg_hp *hp, struct solo *s, const char *src,
                                       uint8_t nonce, uint64_t now)
{
    struct dg_hp_msg m, r;

    fill_msg(&m, DG_HP_CONNECT, 1);
    m.nonce[0] = nonce;
    memset(m.cookie, 0, sizeof(m.cookie));
    assert_int_equal(solo_in(hp, s, &m, src, now, &r), DG_HP_COOKIE);
    memcpy(m.cookie, r.cookie, DG_HP_COOKIE_LEN);
    assert_int_equal(solo_in(hp, s, &m, src, now + 1, &r), DG_HP_CONNECT_REJECT);
    s->n = 0;
    return r.reason;
}

/* Rate limits by /64, cookie binding and lifetime, and NULL ops. */
static void test_ipv6_rate_and_cookies(void **state)
{
    static const struct dg_hp_ops ops = {.send = solo_send, .announced = solo_announced};
    struct solo s;
    struct dg_hp *hp;
    struct dg_hp_msg m, r;
    uint64_t now = T0;
    char src[64];

    (void)state;
    memset(&s, 0, sizeof(s));
    assert_int_equal(dg_hp_new(&ops, &s, 42, &hp), 0);
    for (int i = 0; i < DG_HP_RATE_MAX; i++) {
        snprintf(src, sizeof(src), "2001:db8:1:2::%x", i + 1); /* one /64 */
        assert_int_equal(solo_connect(hp, &s, src, (uint8_t)i, now), DG_HP_FAIL_UNKNOWN_PEER);
    }
    assert_int_equal(solo_connect(hp, &s, "2001:db8:1:2:ffff::1", 99, now), DG_HP_FAIL_BUSY);
    assert_int_equal(solo_connect(hp, &s, "2001:db8:1:3::1", 98, now), DG_HP_FAIL_UNKNOWN_PEER);

    /* A cookie is bound to the address and the nonce, and good for one to two minutes. */
    fill_msg(&m, DG_HP_CONNECT, 1);
    m.nonce[0] = 50;
    memset(m.cookie, 0, sizeof(m.cookie));
    now += 20000;
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8:9::1", now, &r), DG_HP_COOKIE);
    memcpy(m.cookie, r.cookie, DG_HP_COOKIE_LEN);
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8:9::2", now, &r), DG_HP_COOKIE);
    m.nonce[0] = 51;
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8:9::1", now, &r), DG_HP_COOKIE);
    m.nonce[0] = 50;
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8:9::1", now + 60000, &r), DG_HP_CONNECT_REJECT);
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8:9::1", now + 130000, &r), DG_HP_COOKIE);
    assert_int_equal(s.n, 5);
    struct dg_hp_stats st;
    dg_hp_get_stats(hp, &st);
    assert_int_equal(st.cookies, 12 + 4);
    assert_int_equal(st.refused, 12 + 1);
    dg_hp_free(hp);

    /* NULL ops: no rendezvous (CONNECTs ignored), no responder (PUNCHes refused). */
    static const struct dg_hp_ops bare = {.send = solo_send};
    memset(&s, 0, sizeof(s));
    assert_int_equal(dg_hp_new(&bare, &s, 43, &hp), 0);
    fill_msg(&m, DG_HP_CONNECT, 1);
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8::5", now, &r), 0);
    fill_msg(&m, DG_HP_PUNCH, 1);
    assert_int_equal(solo_in(hp, &s, &m, "2001:db8::5", now, &r), DG_HP_PUNCH_REJECT);
    assert_int_equal(r.reason, DG_HP_FAIL_REFUSED);
    dg_hp_free(hp);
    dg_hp_free(NULL);
    assert_int_equal(dg_hp_new(NULL, &s, 1, &hp), -EINVAL);
    static const struct dg_hp_ops none = {.send = NULL};
    assert_int_equal(dg_hp_new(&none, &s, 1, &hp), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_codec_round_trip),
        cmocka_unit_test(test_codec_rejects),
        cmocka_unit_test(test_matrix_punch),
        cmocka_unit_test(test_matrix_punch_direct),
        cmocka_unit_test(test_matrix_relay),
        cmocka_unit_test(test_birthday_easy_hard),
        cmocka_unit_test(test_birthday_hard_easy),
        cmocka_unit_test(test_unknown_target),
        cmocka_unit_test(test_not_serving),
        cmocka_unit_test(test_responder_silent),
        cmocka_unit_test(test_rendezvous_silent),
        cmocka_unit_test(test_rate_limit),
        cmocka_unit_test(test_spoofed_connect),
        cmocka_unit_test(test_paths_closed_on_failure),
        cmocka_unit_test(test_paths_closed_on_free),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_wrong_sources),
        cmocka_unit_test(test_probe_answered),
        cmocka_unit_test(test_reentrant_connect),
        cmocka_unit_test(test_connect_errors),
        cmocka_unit_test(test_coarse_timer),
        cmocka_unit_test(test_linger),
        cmocka_unit_test(test_responder_limits),
        cmocka_unit_test(test_hard_responder_contact),
        cmocka_unit_test(test_ipv6_rate_and_cookies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
