/* Port mapping with NAT-PMP and UPnP IGD: see portmap.h. */
#include "engine/portmap.h"

#include <arpa/inet.h>
#include <errno.h>
#include <natpmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>

#include <miniupnpc/miniupnpc.h>
#include <miniupnpc/upnpcommands.h>
#include <miniupnpc/upnperrors.h>

#include "engine/log.h"

enum job_kind {
    JOB_MAP,
    JOB_UNMAP
};

/* One exchange with the router, run in the pool. It works on its own copy of the state. */
struct job {
    struct dg_portmap *pm;
    uv_work_t work;
    enum job_kind kind;
    struct dg_portmap_config cfg;
    struct dg_portmap_state st; /* in: the current state; out: the new one */
    char upnp_control[512];     /* the IGD that gave the mapping (for renewal and removal) */
    char upnp_service[256];
    char upnp_lan[64];
    uint32_t lifetime_s; /* lease granted */
};

struct dg_portmap {
    uv_loop_t *loop;
    uv_timer_t timer;
    uv_timer_t watch;  /* looks at the interfaces' addresses (network changes) */
    uv_udp_t announce; /* NAT-PMP announcements of a router that restarted (224.0.0.1:5350) */
    int handles;       /* open handles; the last close frees */
    int listening;     /* @c announce is bound */
    int again;         /* a change came while a job ran: map again when it ends */
    uint64_t net_hash; /* of the interfaces' addresses, 0 before the first look */
    struct dg_portmap_config cfg;
    struct dg_portmap_state st;
    char upnp_control[512], upnp_service[256], upnp_lan[64];
    uint32_t lifetime_s;
    int busy;     /* a job is running */
    int stopping; /* removal asked: free when it is done */
};

/* ---- NAT-PMP (pool thread) ---- */

/* Waits for the answer to the pending request (libnatpmp's own retry schedule, about 4 s in
 * all when nobody answers). @return 0 or a NATPMP_ERR_* code. */
static int natpmp_wait(natpmp_t *n, natpmpresp_t *resp)
{
    int rc;

    do {
        struct timeval tv;
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(n->s, &fds);
        if (getnatpmprequesttimeout(n, &tv) < 0)
            return NATPMP_ERR_GETTIMEOFDAYERR;
        if (tv.tv_sec > 1)
            tv.tv_sec = 1;
        select(n->s + 1, &fds, NULL, NULL, &tv);
        rc = readnatpmpresponseorretry(n, resp);
    } while (rc == NATPMP_TRYAGAIN);
    return rc;
}

static int natpmp_map(struct job *j, uint32_t lifetime)
{
    natpmp_t n;
    natpmpresp_t resp;
    int rc;

    if ((rc = initnatpmp(&n, 0, 0)) < 0) {
        snprintf(j->st.error, sizeof(j->st.error), "NAT-PMP: no gateway (%d)", rc);
        return -1;
    }
    if (sendpublicaddressrequest(&n) >= 0 && natpmp_wait(&n, &resp) == 0 &&
        resp.type == NATPMP_RESPTYPE_PUBLICADDRESS)
        inet_ntop(AF_INET, &resp.pnu.publicaddress.addr, j->st.external_ip,
                  sizeof(j->st.external_ip));
    static const int protos[2] = {NATPMP_PROTOCOL_TCP, NATPMP_PROTOCOL_UDP};
    for (int i = 0; i < 2; i++) {
        rc = sendnewportmappingrequest(&n, protos[i], j->cfg.port, j->cfg.port, lifetime);
        if (rc >= 0)
            rc = natpmp_wait(&n, &resp);
        if (rc < 0) {
            snprintf(j->st.error, sizeof(j->st.error), "NAT-PMP: mapping refused or no answer (%d)",
                     rc);
            closenatpmp(&n);
            return -1;
        }
        uint16_t ext = resp.pnu.newportmapping.mappedpublicport;
        if (i == 0)
            j->st.external_tcp = lifetime ? ext : 0;
        else
            j->st.external_udp = lifetime ? ext : 0;
        j->lifetime_s = resp.pnu.newportmapping.lifetime;
    }
    closenatpmp(&n);
    return 0;
}

/* ---- UPnP IGD (pool thread) ---- */

static int upnp_find(struct job *j)
{
    struct UPNPDev *devs;
    struct UPNPUrls urls;
    struct IGDdatas data;
    int err = 0, rc;

    devs = upnpDiscover(DG_PORTMAP_DISCOVER_MS, NULL, NULL, UPNP_LOCAL_PORT_ANY, 0, 2, &err);
    if (!devs) {
        snprintf(j->st.error + strlen(j->st.error), sizeof(j->st.error) - strlen(j->st.error),
                 "%sUPnP: no IGD answered", j->st.error[0] ? "; " : "");
        return -1;
    }
    rc = UPNP_GetValidIGD(devs, &urls, &data, j->upnp_lan, sizeof(j->upnp_lan));
    freeUPNPDevlist(devs);
    /* 2: an IGD that says it is not connected. libminiupnpc 2.2.4 reports a router whose WAN
     * address is private or reserved this way although it maps ports fine; it is tried. */
    if (rc == 1 || rc == 2) {
        snprintf(j->upnp_control, sizeof(j->upnp_control), "%s", urls.controlURL);
        snprintf(j->upnp_service, sizeof(j->upnp_service), "%s", data.first.servicetype);
    }
    if (rc != 0)
        FreeUPNPUrls(&urls);
    if (rc != 1 && rc != 2) {
        snprintf(j->st.error + strlen(j->st.error), sizeof(j->st.error) - strlen(j->st.error),
                 "%sUPnP: no usable IGD (%d)", j->st.error[0] ? "; " : "", rc);
        return -1;
    }
    return 0;
}

static int upnp_map(struct job *j)
{
    char port[8], lease[16], ip[40] = "";
    static const char *const protos[2] = {"TCP", "UDP"};

    if (!j->upnp_control[0] && upnp_find(j) < 0)
        return -1;
    snprintf(port, sizeof(port), "%u", j->cfg.port);
    snprintf(lease, sizeof(lease), "%u", DG_PORTMAP_LEASE_S);
    for (int i = 0; i < 2; i++) {
        int rc = UPNP_AddPortMapping(j->upnp_control, j->upnp_service, port, port, j->upnp_lan,
                                     "digfs", protos[i], NULL, lease);
        if (rc == 725) /* OnlyPermanentLeasesSupported */
            rc = UPNP_AddPortMapping(j->upnp_control, j->upnp_service, port, port, j->upnp_lan,
                                     "digfs", protos[i], NULL, "0");
        if (rc != 0) {
            snprintf(j->st.error + strlen(j->st.error), sizeof(j->st.error) - strlen(j->st.error),
                     "%sUPnP: AddPortMapping %s: %s", j->st.error[0] ? "; " : "", protos[i],
                     strupnperror(rc));
            j->upnp_control[0] = '\0'; /* look for the router again next time */
            return -1;
        }
    }
    if (UPNP_GetExternalIPAddress(j->upnp_control, j->upnp_service, ip) == 0 && ip[0])
        snprintf(j->st.external_ip, sizeof(j->st.external_ip), "%s", ip);
    j->st.external_tcp = j->st.external_udp = j->cfg.port;
    j->lifetime_s = DG_PORTMAP_LEASE_S;
    return 0;
}

static void upnp_unmap(struct job *j)
{
    char port[8];

    snprintf(port, sizeof(port), "%u", j->cfg.port);
    UPNP_DeletePortMapping(j->upnp_control, j->upnp_service, port, "TCP", NULL);
    UPNP_DeletePortMapping(j->upnp_control, j->upnp_service, port, "UDP", NULL);
}

/* ---- jobs ---- */

static void job_work(uv_work_t *w)
{
    struct job *j = w->data;

    if (j->kind == JOB_UNMAP) {
        if (strcmp(j->st.method, "NAT-PMP") == 0)
            natpmp_map(j, 0);
        else if (strcmp(j->st.method, "UPnP") == 0 && j->upnp_control[0])
            upnp_unmap(j);
        return;
    }
    j->st.attempts++;
    j->st.error[0] = '\0';
    /* A mapping in place is renewed the way it was made. */
    if (j->cfg.natpmp && strcmp(j->st.method, "UPnP") != 0 &&
        natpmp_map(j, DG_PORTMAP_LEASE_S) == 0) {
        j->st.method = "NAT-PMP";
    } else if (j->cfg.upnp && upnp_map(j) == 0) {
        j->st.method = "UPnP";
    } else {
        j->st.method = "";
        j->st.mapped = 0;
        j->st.external_tcp = j->st.external_udp = 0;
        return;
    }
    j->st.mapped = 1;
    j->st.error[0] = '\0';
}

static void pm_closed(uv_handle_t *h)
{
    struct dg_portmap *pm = h->data;

    if (--pm->handles == 0)
        free(pm);
}

static void close_all(struct dg_portmap *pm)
{
    uv_close((uv_handle_t *)&pm->timer, pm_closed);
    uv_close((uv_handle_t *)&pm->watch, pm_closed);
    uv_close((uv_handle_t *)&pm->announce, pm_closed);
}

static void schedule(struct dg_portmap *pm, uint64_t ms);

static int queue_job(struct dg_portmap *pm, enum job_kind kind);

static void job_done(uv_work_t *w, int status)
{
    struct job *j = w->data;
    struct dg_portmap *pm = j->pm;
    enum job_kind kind = j->kind;

    pm->busy = 0;
    if (status == 0 && kind == JOB_MAP) {
        int was = pm->st.mapped;
        pm->st = j->st;
        memcpy(pm->upnp_control, j->upnp_control, sizeof(pm->upnp_control));
        memcpy(pm->upnp_service, j->upnp_service, sizeof(pm->upnp_service));
        memcpy(pm->upnp_lan, j->upnp_lan, sizeof(pm->upnp_lan));
        pm->lifetime_s = j->lifetime_s;
        if (pm->st.mapped && !was)
            dg_log(DG_LOG_INFO, "portmap", "%s: port %u mapped to %s:%u (TCP) and %u (UDP)",
                   pm->st.method, pm->cfg.port, pm->st.external_ip[0] ? pm->st.external_ip : "?",
                   pm->st.external_tcp, pm->st.external_udp);
        else if (!pm->st.mapped)
            dg_log(DG_LOG_DEBUG, "portmap", "no mapping: %s", pm->st.error);
    }
    free(j);
    if (pm->stopping) {
        /* Stopping: a mapping just made or renewed is removed; then everything goes. */
        if (kind == JOB_MAP && pm->st.mapped && queue_job(pm, JOB_UNMAP) == 0)
            return;
        close_all(pm);
        return;
    }
    uint32_t life = pm->lifetime_s ? pm->lifetime_s : DG_PORTMAP_LEASE_S;
    uint64_t renew = (uint64_t)life * 1000 / 2;
    if (renew > DG_PORTMAP_VERIFY_MS)
        renew = DG_PORTMAP_VERIFY_MS; /* the router may have lost it: ask again */
    int again = pm->again;
    pm->again = 0;
    schedule(pm, again ? 0 : pm->st.mapped ? renew : DG_PORTMAP_RETRY_MS);
}

static int queue_job(struct dg_portmap *pm, enum job_kind kind)
{
    struct job *j = calloc(1, sizeof(*j));

    if (!j)
        return -ENOMEM;
    j->pm = pm;
    j->kind = kind;
    j->cfg = pm->cfg;
    j->st = pm->st;
    memcpy(j->upnp_control, pm->upnp_control, sizeof(j->upnp_control));
    memcpy(j->upnp_service, pm->upnp_service, sizeof(j->upnp_service));
    memcpy(j->upnp_lan, pm->upnp_lan, sizeof(j->upnp_lan));
    j->work.data = j;
    int rc = uv_queue_work(pm->loop, &j->work, job_work, job_done);
    if (rc < 0) {
        free(j);
        return rc;
    }
    pm->busy = 1;
    return 0;
}

static void on_timer(uv_timer_t *t)
{
    struct dg_portmap *pm = t->data;

    if (!pm->busy && !pm->stopping)
        queue_job(pm, JOB_MAP);
}

static void schedule(struct dg_portmap *pm, uint64_t ms)
{
    uv_timer_start(&pm->timer, on_timer, ms, 0);
}

/* Something changed: map again now (or as soon as the running job ends). */
static void remap(struct dg_portmap *pm, const char *why)
{
    if (pm->stopping)
        return;
    dg_log(DG_LOG_INFO, "portmap", "%s: mapping the port again", why);
    if (pm->busy)
        pm->again = 1;
    else
        schedule(pm, 0);
}

/* A hash of the interfaces' IPv4 addresses and names: it changes when the network does. */
static uint64_t network_hash(void)
{
    uv_interface_address_t *ifs;
    int n;
    uint64_t h = 1469598103934665603ull;

    if (uv_interface_addresses(&ifs, &n) < 0)
        return 0;
    for (int i = 0; i < n; i++) {
        if (ifs[i].address.address4.sin_family != AF_INET || ifs[i].is_internal)
            continue;
        const uint8_t *p = (const uint8_t *)&ifs[i].address.address4.sin_addr;
        for (int k = 0; k < 4; k++)
            h = (h ^ p[k]) * 1099511628211ull;
        for (const char *c = ifs[i].name; *c; c++)
            h = (h ^ (uint8_t)*c) * 1099511628211ull;
    }
    uv_free_interface_addresses(ifs, n);
    return h ? h : 1;
}

static void on_watch(uv_timer_t *t)
{
    struct dg_portmap *pm = t->data;
    uint64_t h = network_hash();

    if (pm->net_hash && h != pm->net_hash)
        remap(pm, "the network changed");
    pm->net_hash = h;
}

static void announce_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char space[64]; /* loop thread only; read at once */

    (void)h;
    (void)suggested;
    *buf = uv_buf_init(space, sizeof(space));
}

/* A router that restarts or gets a new public address multicasts to 224.0.0.1:5350 a NAT-PMP
 * public address response (RFC 6886 3.2.1: version 0, opcode 128) or a PCP ANNOUNCE response
 * (RFC 6887 14.1: version 2, R bit set, opcode 0; what miniupnpd sends). Our mapping may be
 * gone then. */
static void on_announce(uv_udp_t *h, ssize_t n, const uv_buf_t *buf, const struct sockaddr *from,
                        unsigned flags)
{
    struct dg_portmap *pm = h->data;
    const uint8_t *p = (const uint8_t *)buf->base;

    (void)flags;
    if (n < 12 || !from || !((p[0] == 0 && p[1] == 128) || (p[0] == 2 && p[1] == 0x80)))
        return;
    remap(pm, "the router announced a restart or a new address (NAT-PMP)");
}

/* Listens for NAT-PMP announcements; without them (port taken, no multicast route) the
 * periodic check still finds a lost mapping. */
static void listen_announcements(struct dg_portmap *pm)
{
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(5350)};

    if (uv_udp_bind(&pm->announce, (const struct sockaddr *)&any, UV_UDP_REUSEADDR) < 0 ||
        uv_udp_set_membership(&pm->announce, "224.0.0.1", NULL, UV_JOIN_GROUP) < 0 ||
        uv_udp_recv_start(&pm->announce, announce_alloc, on_announce) < 0) {
        dg_log(DG_LOG_DEBUG, "portmap", "not listening for NAT-PMP announcements");
        return;
    }
    pm->listening = 1;
}

int dg_portmap_start(uv_loop_t *loop, const struct dg_portmap_config *cfg, struct dg_portmap **out)
{
    struct dg_portmap *pm = calloc(1, sizeof(*pm));

    if (!pm)
        return -ENOMEM;
    pm->loop = loop;
    pm->cfg = *cfg;
    pm->st.method = "";
    uv_timer_init(loop, &pm->timer);
    uv_timer_init(loop, &pm->watch);
    uv_udp_init(loop, &pm->announce);
    pm->timer.data = pm->watch.data = pm->announce.data = pm;
    pm->handles = 3;
    pm->net_hash = network_hash();
    uv_timer_start(&pm->watch, on_watch, DG_PORTMAP_WATCH_MS, DG_PORTMAP_WATCH_MS);
    if (cfg->natpmp)
        listen_announcements(pm);
    schedule(pm, 0);
    *out = pm;
    return 0;
}

void dg_portmap_get(const struct dg_portmap *pm, struct dg_portmap_state *out)
{
    *out = pm->st;
}

void dg_portmap_refresh(struct dg_portmap *pm)
{
    if (pm && !pm->busy && !pm->stopping)
        schedule(pm, 0);
}

void dg_portmap_stop(struct dg_portmap *pm)
{
    if (!pm)
        return;
    pm->stopping = 1;
    uv_timer_stop(&pm->timer);
    uv_timer_stop(&pm->watch);
    uv_udp_recv_stop(&pm->announce);
    if (pm->busy)
        return; /* the running job's completion goes on with the removal */
    if (pm->st.mapped && queue_job(pm, JOB_UNMAP) == 0)
        return;
    close_all(pm);
}
