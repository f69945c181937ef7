/* uTP, hole punching, the relay and NAT classification on the node's UDP port: see
 * traversal.h. */
#include "engine/traversal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "engine/dht_service.h"
#include "engine/log.h"
#include "engine/peer_conn.h"
#include "engine/swarm.h"

#define LOG_MODULE "nat"
#define RECV_MAX 65536

/* An extra UDP socket opened for the birthday technique. */
struct path {
    uv_udp_t udp;
    struct dg_traversal *t;
    int id;
    int owned_by_hp; /* 1 while hole punching holds it; 0 once handed over to a connection */
    uint64_t last_in;
    struct path *next;
};

struct dg_traversal {
    struct dg_traversal_config cfg;
    uv_loop_t *loop;
    struct dg_dht_service *dht;
    struct dg_swarms *swarms;
    struct dg_utp *utp;
    struct dg_hp *hp;
    struct dg_relay *relay;
    uv_check_t check;     /* flushes uTP's held ACKs after each round of I/O */
    uv_timer_t utp_timer; /* uTP's timers, while it has connections */
    uv_timer_t hp_timer;  /* hole punching's timers */
    uv_timer_t nat_timer; /* classification, and idle paths */
    int handles;
    int stopping;
    void (*closed)(void *arg);
    void *closed_arg;
    struct path *paths;
    size_t npaths;
    int next_path_id;
    struct {
        uint32_t reporter, ip; /* IPv4, network order */
    } reports[DG_TRAVERSAL_PEER_REPORTS];
    size_t nreports, next_report;
    uint32_t peers_ip; /* what most of them say, 0: no majority of two */
    size_t peers_ip_count;
    enum dg_nat_class nat;
    const char *nat_reason;
    size_t observers, ports;
    char address[64];
    uint8_t rbuf[RECV_MAX];
};

static uint64_t now_us(void)
{
    return uv_hrtime() / 1000;
}

static uint64_t now_ms(const struct dg_traversal *t)
{
    return uv_now(t->loop);
}

static struct path *path_find(struct dg_traversal *t, int id)
{
    for (struct path *p = t->paths; p; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

/* ------------------------------------------------------------ timers */

static void utp_timer_cb(uv_timer_t *h)
{
    struct dg_traversal *t = h->data;

    dg_utp_tick(t->utp, now_us());
    if (dg_utp_count(t->utp) == 0)
        uv_timer_stop(&t->utp_timer);
}

/* Keeps uTP's timer running while it has connections. */
static void utp_timer_arm(struct dg_traversal *t)
{
    if (!t->stopping && dg_utp_count(t->utp) > 0 && !uv_is_active((uv_handle_t *)&t->utp_timer))
        uv_timer_start(&t->utp_timer, utp_timer_cb, DG_UTP_TICK_US / 1000, DG_UTP_TICK_US / 1000);
}

static void hp_timer_cb(uv_timer_t *h)
{
    struct dg_traversal *t = h->data;
    uint64_t next = dg_hp_tick(t->hp, now_ms(t));

    if (!t->stopping)
        uv_timer_start(&t->hp_timer, hp_timer_cb, next ? next : 1, 0);
    utp_timer_arm(t);
}

/* Runs hole punching's timers now (something changed). */
static void hp_kick(struct dg_traversal *t)
{
    if (!t->stopping)
        uv_timer_start(&t->hp_timer, hp_timer_cb, 0, 0);
}

static void check_cb(uv_check_t *h)
{
    struct dg_traversal *t = h->data;

    dg_utp_flush(t->utp, now_us());
    utp_timer_arm(t);
}

/* ------------------------------------------------------------ datagrams in */

/* One datagram that is not the DHT's, on path @p path. */
static void dispatch(struct dg_traversal *t, int path, const uint8_t *buf, size_t len,
                     const struct sockaddr *from)
{
    if (t->stopping)
        return;
    if (dg_hp_is_packet(buf, len)) {
        dg_hp_input(t->hp, path, buf, len, from, now_ms(t));
        hp_kick(t);
        return;
    }
    if (dg_utp_is_packet(buf, len)) {
        dg_utp_input(t->utp, path, buf, len, from, now_us());
        utp_timer_arm(t);
    }
}

static void on_other(void *arg, const uint8_t *buf, size_t len, const struct sockaddr *from)
{
    dispatch(arg, 0, buf, len, from);
}

static void path_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct path *p = h->data;

    (void)suggested;
    *buf = uv_buf_init((char *)p->t->rbuf, sizeof(p->t->rbuf));
}

static void path_recv(uv_udp_t *h, ssize_t n, const uv_buf_t *buf, const struct sockaddr *from,
                      unsigned flags)
{
    struct path *p = h->data;

    if (n <= 0 || !from || (flags & UV_UDP_PARTIAL))
        return;
    p->last_in = now_ms(p->t);
    if (buf->base[0] == 'd')
        return; /* DHT traffic belongs on the main socket */
    dispatch(p->t, p->id, (const uint8_t *)buf->base, (size_t)n, from);
}

/* ------------------------------------------------------------ paths */

static void release(struct dg_traversal *t);

static void path_closed(uv_handle_t *h)
{
    struct path *p = h->data;
    struct dg_traversal *t = p->t;

    free(p);
    release(t);
}

static void path_close(struct dg_traversal *t, struct path *p)
{
    for (struct path **pp = &t->paths; *pp; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    }
    t->npaths--;
    t->handles++; /* counted until its close callback */
    uv_close((uv_handle_t *)&p->udp, path_closed);
}

static void send_on(struct dg_traversal *t, int path, const uint8_t *buf, size_t len,
                    const struct sockaddr *to)
{
    if (t->stopping)
        return;
    if (path == 0) {
        dg_dht_service_send(t->dht, buf, len, to);
        return;
    }
    struct path *p = path_find(t, path);
    if (!p)
        return;
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
    uv_udp_try_send(&p->udp, &b, 1, to);
}

/* ------------------------------------------------------------ uTP callbacks */

static void utp_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    send_on(arg, path, buf, len, to);
}

static int utp_accept(void *arg, struct dg_utp_sock *s)
{
    struct dg_traversal *t = arg;
    int path = dg_utp_sock_path(s);

    if (t->stopping || !t->swarms)
        return -1;
    if (path != 0) {
        struct path *p = path_find(t, path);
        if (p)
            p->owned_by_hp = 0; /* the connection keeps it */
    }
    return dg_swarms_accept_utp(t->swarms, s, path != 0) < 0 ? -1 : 0;
}

static const struct dg_utp_ops utp_ops = {
    .send = utp_send,
    .on_accept = utp_accept,
    .on_connected = dg_peer_conn_utp_connected,
    .on_read = dg_peer_conn_utp_read,
    .on_writable = dg_peer_conn_utp_writable,
    .on_end = dg_peer_conn_utp_end,
};

/* ------------------------------------------------------------ hole punching callbacks */

static void hp_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    send_on(arg, path, buf, len, to);
}

static size_t hp_open_paths(void *arg, size_t n, int *paths)
{
    struct dg_traversal *t = arg;
    struct sockaddr_in any = {.sin_family = AF_INET};
    size_t opened = 0;

    while (opened < n && t->npaths < DG_TRAVERSAL_MAX_PATHS && !t->stopping) {
        struct path *p = calloc(1, sizeof(*p));
        if (!p)
            break;
        p->t = t;
        if (uv_udp_init(t->loop, &p->udp) < 0) {
            free(p);
            break;
        }
        p->udp.data = p;
        if (++t->next_path_id <= 0)
            t->next_path_id = 1;
        p->id = t->next_path_id;
        p->owned_by_hp = 1;
        p->last_in = now_ms(t);
        p->next = t->paths;
        t->paths = p;
        t->npaths++;
        if (uv_udp_bind(&p->udp, (const struct sockaddr *)&any, 0) < 0 ||
            uv_udp_recv_start(&p->udp, path_alloc, path_recv) < 0) {
            path_close(t, p);
            break;
        }
        paths[opened++] = p->id;
    }
    return opened;
}

static void hp_close_path(void *arg, int path)
{
    struct dg_traversal *t = arg;
    struct path *p = path_find(t, path);

    if (p)
        path_close(t, p);
}

static int hp_announced(void *arg, const uint8_t key[20], const struct sockaddr *peer)
{
    struct dg_traversal *t = arg;

    return dg_dht_service_announced(t->dht, key, peer);
}

static int hp_serves(void *arg, const uint8_t key[20])
{
    struct dg_traversal *t = arg;

    return t->swarms && dg_swarms_holds(t->swarms, key);
}

/* PUNCHes only from the nodes we announced to: anyone else could make us probe anything. */
static int hp_rendezvous_ok(void *arg, const uint8_t key[20], const struct sockaddr *rendezvous)
{
    struct dg_traversal *t = arg;

    (void)key;
    return dg_dht_service_announced_to(t->dht, rendezvous);
}

static uint16_t hp_relay_expect(void *arg, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct dg_traversal *t = arg;

    if (!t->relay || dg_relay_expect(t->relay, nonce) < 0)
        return 0;
    return dg_relay_port(t->relay);
}

static void hp_punched(void *arg, const uint8_t key[20], int initiator, int path,
                       const struct sockaddr *peer)
{
    struct dg_traversal *t = arg;
    struct path *p = path ? path_find(t, path) : NULL;

    if (p)
        p->owned_by_hp = 0;
    char a[INET6_ADDRSTRLEN] = "?";
    if (peer->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, a, sizeof(a));
    dg_log(DG_LOG_DEBUG, LOG_MODULE, "hole to %s:%u open on path %d (%s) at %llu ms", a,
           peer->sa_family == AF_INET ? ntohs(((const struct sockaddr_in *)peer)->sin_port) : 0,
           path, initiator ? "we asked" : "they asked", (unsigned long long)now_ms(t));
    if (initiator && t->swarms)
        dg_swarms_punched(t->swarms, key, NULL, path, peer);
    utp_timer_arm(t);
}

static void hp_relay(void *arg, const uint8_t key[20], int initiator, const struct sockaddr *relay,
                     const struct sockaddr *peer, const uint8_t nonce[DG_HP_NONCE_LEN])
{
    struct dg_traversal *t = arg;

    dg_log(DG_LOG_DEBUG, LOG_MODULE, "relay ready (%s) at %llu ms",
           initiator ? "we asked" : "they asked", (unsigned long long)now_ms(t));
    if (t->swarms)
        dg_swarms_relayed(t->swarms, key, initiator, peer, relay, nonce);
}

static void hp_failed(void *arg, const uint8_t key[20], const struct sockaddr *target,
                      enum dg_hp_failure why)
{
    struct dg_traversal *t = arg;
    char a[INET6_ADDRSTRLEN] = "?";

    if (target->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)target)->sin_addr, a, sizeof(a));
    dg_log(DG_LOG_DEBUG, LOG_MODULE, "traversal to %s failed (%d) at %llu ms", a, (int)why,
           (unsigned long long)now_ms(t));
    if (t->swarms)
        dg_swarms_traverse_failed(t->swarms, key, target,
                                  why == DG_HP_FAIL_BOTH_HARD || why == DG_HP_FAIL_TIMEOUT);
}

static const struct dg_hp_ops hp_ops = {
    .send = hp_send,
    .open_paths = hp_open_paths,
    .close_path = hp_close_path,
    .announced = hp_announced,
    .serves = hp_serves,
    .relay_expect = hp_relay_expect,
    .punched = hp_punched,
    .relay = hp_relay,
    .failed = hp_failed,
    .rendezvous_ok = hp_rendezvous_ok,
};

/* ------------------------------------------------------------ NAT classification */

/* Whether @p a's IP is one of this host's interface addresses. */
static int is_local_address(const struct sockaddr_storage *a)
{
    uv_interface_address_t *ifs;
    int n, found = 0;

    if (a->ss_family != AF_INET || uv_interface_addresses(&ifs, &n) < 0)
        return 0;
    for (int i = 0; i < n && !found; i++)
        found = ifs[i].address.address4.sin_family == AF_INET &&
                ifs[i].address.address4.sin_addr.s_addr ==
                    ((const struct sockaddr_in *)a)->sin_addr.s_addr;
    uv_free_interface_addresses(ifs, n);
    return found;
}

static void classify(struct dg_traversal *t)
{
    struct dg_dht_mapping m;
    enum dg_nat_class c;
    const char *why;

    dg_dht_service_mapping(t->dht, &m);
    t->observers = m.observers;
    t->ports = m.ports;
    t->address[0] = 0;
    if (m.observers > 0 && m.addr.ss_family == AF_INET) {
        char ip[INET_ADDRSTRLEN];
        const struct sockaddr_in *a4 = (const struct sockaddr_in *)&m.addr;
        inet_ntop(AF_INET, &a4->sin_addr, ip, sizeof(ip));
        snprintf(t->address, sizeof(t->address), "%s:%u", ip, ntohs(a4->sin_port));
    }
    struct sockaddr_storage by_peers = {0};
    if (t->peers_ip) {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&by_peers;
        a4->sin_family = AF_INET;
        a4->sin_addr.s_addr = t->peers_ip;
    }
    if (m.observers > 0 && is_local_address(&m.addr)) {
        c = DG_NAT_NONE;
        why = "public address";
    } else if (m.observers < 2 && t->peers_ip && is_local_address(&by_peers)) {
        c = DG_NAT_NONE;
        why = "public address (as peers report it)";
    } else if (t->cfg.mapped && t->cfg.mapped(t->cfg.arg)) {
        c = DG_NAT_NONE;
        why = "port mapped on the router";
    } else if (m.observers >= 2 && m.same_port >= 2 && 2 * m.same_port > m.observers) {
        /* Most observers see one port. A few may not: a Linux NAT gives another port towards
         * a peer whose packets reached that port before ours left (conntrack holds it). */
        c = DG_NAT_EASY;
        why = "endpoint-independent mapping";
    } else if (m.observers >= 2) {
        c = DG_NAT_HARD;
        why = "endpoint-dependent mapping";
    } else {
        c = DG_NAT_UNKNOWN;
        why = "too few observers";
    }
    if (c != t->nat)
        dg_log(DG_LOG_INFO, LOG_MODULE, "NAT: %s (%s; %zu observers, %zu ports, %s)",
               dg_nat_class_name(c), why, m.observers, m.ports,
               t->address[0] ? t->address : "address unknown");
    t->nat = c;
    t->nat_reason = why;
    dg_hp_set_nat(t->hp, c);
    /* Behind a NAT (or not knowing yet), keep the way open for rendezvous requests. */
    dg_dht_service_set_keepalive(t->dht, c == DG_NAT_NONE ? 0 : DG_TRAVERSAL_KEEPALIVE_MS);
}

static void nat_timer_cb(uv_timer_t *h)
{
    struct dg_traversal *t = h->data;
    uint64_t now = now_ms(t);

    classify(t);
    for (struct path *p = t->paths, *next; p; p = next) {
        next = p->next;
        if (!p->owned_by_hp && now - p->last_in >= DG_TRAVERSAL_PATH_IDLE_MS)
            path_close(t, p);
    }
}

/* ------------------------------------------------------------ public */

int dg_traversal_start(const struct dg_traversal_config *cfg, struct dg_traversal **out)
{
    struct dg_traversal *t = calloc(1, sizeof(*t));
    uint64_t seed;
    int rc;

    if (!t)
        return -ENOMEM;
    t->cfg = *cfg;
    t->loop = cfg->loop;
    t->dht = cfg->dht;
    t->nat_reason = "too few observers";
    if (RAND_bytes((unsigned char *)&seed, sizeof(seed)) != 1)
        seed = uv_hrtime();
    rc = dg_utp_new(&utp_ops, t, seed, &t->utp);
    if (rc == 0)
        rc = dg_hp_new(&hp_ops, t, seed ^ 0x9e3779b97f4a7c15ull, &t->hp);
    if (rc == 0 && cfg->relay) {
        struct dg_relay_config rcfg = {
            .port = 0, .max_streams = cfg->relay_streams, .rate = cfg->relay_rate};
        rc = dg_relay_start(t->loop, &rcfg, &t->relay);
        if (rc < 0)
            t->relay = NULL;
    }
    if (rc < 0) {
        dg_hp_free(t->hp);
        dg_utp_free(t->utp);
        free(t);
        return rc;
    }
    uv_check_init(t->loop, &t->check);
    uv_timer_init(t->loop, &t->utp_timer);
    uv_timer_init(t->loop, &t->hp_timer);
    uv_timer_init(t->loop, &t->nat_timer);
    t->check.data = t->utp_timer.data = t->hp_timer.data = t->nat_timer.data = t;
    t->handles = 4;
    uv_check_start(&t->check, check_cb);
    uv_timer_start(&t->nat_timer, nat_timer_cb, 1000, DG_TRAVERSAL_CLASSIFY_MS);
    hp_kick(t);
    dg_dht_service_set_other_handler(t->dht, on_other, t);
    *out = t;
    return 0;
}

struct dg_utp *dg_traversal_utp(struct dg_traversal *t)
{
    return t->utp;
}

void dg_traversal_set_swarms(struct dg_traversal *t, struct dg_swarms *swarms)
{
    t->swarms = swarms;
}

int dg_traversal_request(struct dg_traversal *t, const uint8_t key[20],
                         const struct sockaddr *target, const struct sockaddr *via, int relay)
{
    int rc;

    if (!t->cfg.holepunch)
        return -ENOTSUP;
    if (t->stopping)
        return -ESHUTDOWN;
    rc = dg_hp_connect(t->hp, key, target, via, relay ? DG_HP_MODE_RELAY : DG_HP_MODE_PUNCH,
                       now_ms(t));
    dg_log(DG_LOG_DEBUG, LOG_MODULE, "asked for %s at %llu ms: %d", relay ? "a relay" : "a hole",
           (unsigned long long)now_ms(t), rc);
    hp_kick(t);
    return rc;
}

int dg_traversal_punch(struct dg_traversal *t, const uint8_t key[20], const uint8_t nonce[16],
                       const struct sockaddr *peer, enum dg_nat_class peer_nat, int initiator)
{
    int rc;

    if (!t->cfg.holepunch)
        return -ENOTSUP;
    if (t->stopping)
        return -ESHUTDOWN;
    rc = dg_hp_punch(t->hp, key, nonce, peer, peer_nat, initiator, now_ms(t));
    dg_log(DG_LOG_DEBUG, LOG_MODULE, "punching for a peer connected to both (%s): %d",
           initiator ? "we connect" : "they connect", rc);
    hp_kick(t);
    return rc;
}

void dg_traversal_peer_observed(struct dg_traversal *t, const struct sockaddr *ip,
                                const struct sockaddr *reporter)
{
    size_t i;

    if (ip->sa_family != AF_INET || reporter->sa_family != AF_INET)
        return;
    uint32_t who = ((const struct sockaddr_in *)reporter)->sin_addr.s_addr;
    uint32_t what = ((const struct sockaddr_in *)ip)->sin_addr.s_addr;
    for (i = 0; i < t->nreports; i++)
        if (t->reports[i].reporter == who)
            break;
    if (i == t->nreports) {
        if (t->nreports < DG_TRAVERSAL_PEER_REPORTS) {
            t->nreports++;
        } else {
            i = t->next_report;
            t->next_report = (t->next_report + 1) % DG_TRAVERSAL_PEER_REPORTS;
        }
    }
    t->reports[i].reporter = who;
    t->reports[i].ip = what;
    t->peers_ip = 0;
    t->peers_ip_count = 0;
    for (size_t a = 0; a < t->nreports; a++) {
        size_t n = 0;
        for (size_t b = 0; b < t->nreports; b++)
            n += t->reports[b].ip == t->reports[a].ip;
        if (n > t->peers_ip_count) {
            t->peers_ip_count = n;
            t->peers_ip = t->reports[a].ip;
        }
    }
    if (t->peers_ip_count < 2)
        t->peers_ip = 0;
}

enum dg_nat_class dg_traversal_nat(const struct dg_traversal *t)
{
    return t->nat;
}

void dg_traversal_get_info(const struct dg_traversal *t, struct dg_traversal_info *out)
{
    memset(out, 0, sizeof(*out));
    out->nat = t->nat;
    out->nat_reason = t->nat_reason;
    out->observers = t->observers;
    out->ports = t->ports;
    memcpy(out->address, t->address, sizeof(out->address));
    if (t->peers_ip)
        inet_ntop(AF_INET, &t->peers_ip, out->peers_see, sizeof(out->peers_see));
    out->peer_reports = t->peers_ip ? t->peers_ip_count : 0;
    out->paths = t->npaths;
    out->utp_connections = dg_utp_count(t->utp);
    dg_utp_get_stats(t->utp, &out->utp);
    dg_hp_get_stats(t->hp, &out->hp);
    out->relay_on = t->relay != NULL;
    if (t->relay) {
        out->relay_port = dg_relay_port(t->relay);
        dg_relay_get_stats(t->relay, &out->relay);
    }
}

/* One handle of @p t is closed; the last one frees it. */
static void release(struct dg_traversal *t)
{
    if (--t->handles > 0)
        return;
    if (t->closed)
        t->closed(t->closed_arg);
    free(t);
}

static void handle_closed(uv_handle_t *h)
{
    release(h->data);
}

void dg_traversal_stop(struct dg_traversal *t, void (*closed)(void *arg), void *arg)
{
    if (!t || t->stopping)
        return;
    t->stopping = 1;
    t->closed = closed;
    t->closed_arg = arg;
    t->swarms = NULL;
    dg_dht_service_set_other_handler(t->dht, NULL, NULL);
    dg_hp_free(t->hp); /* closes its paths through hp_close_path */
    t->hp = NULL;
    dg_utp_free(t->utp);
    t->utp = NULL;
    while (t->paths)
        path_close(t, t->paths);
    if (t->relay)
        dg_relay_stop(t->relay, NULL, NULL);
    t->relay = NULL;
    uv_close((uv_handle_t *)&t->check, handle_closed);
    uv_close((uv_handle_t *)&t->utp_timer, handle_closed);
    uv_close((uv_handle_t *)&t->hp_timer, handle_closed);
    uv_close((uv_handle_t *)&t->nat_timer, handle_closed);
}
