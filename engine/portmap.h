/* Port mapping on the home router: NAT-PMP (libnatpmp) and UPnP IGD (libminiupnpc), so that
 * peers outside can reach this node's TCP and UDP port.
 *
 * A mapping is asked for again (the request is idempotent) when the interfaces' addresses
 * change (looked at every DG_PORTMAP_WATCH_MS), when the router multicasts a NAT-PMP or PCP
 * announcement (it restarted or got a new public address: RFC 6886 3.2.1, RFC 6887 14.1;
 * digfs listens on 224.0.0.1:5350), and at least every DG_PORTMAP_VERIFY_MS (a router that
 * lost it silently).
 *
 * Both libraries block (UPnP discovery waits up to DG_PORTMAP_DISCOVER_MS for answers), so
 * every exchange runs in libuv's thread pool, one job at a time; results come back on the loop.
 * A mapping is asked for DG_PORTMAP_LEASE_S seconds and renewed at half its lifetime; when no
 * router answered, mapping is tried again every DG_PORTMAP_RETRY_MS (the network may have
 * changed). dg_portmap_stop() removes the mappings before the loop ends.
 *
 * Threads: the API is for the engine's loop thread. */
#ifndef DG_PORTMAP_H
#define DG_PORTMAP_H

#include <stdint.h>
#include <uv.h>

#define DG_PORTMAP_LEASE_S 3600u
#define DG_PORTMAP_RETRY_MS (5u * 60 * 1000)
#define DG_PORTMAP_DISCOVER_MS 2000
#define DG_PORTMAP_VERIFY_MS (5u * 60 * 1000) /* a mapping is asked again at least this often */
#define DG_PORTMAP_WATCH_MS 10000u            /* the interfaces' addresses are compared */

struct dg_portmap_config {
    uint16_t port; /* the TCP and UDP port to map (the same number outside, if the router
                    * agrees) */
    int natpmp;    /* try NAT-PMP */
    int upnp;      /* try UPnP IGD */
};

/* What the router said. */
struct dg_portmap_state {
    int mapped;            /* 1 while a mapping is in place */
    const char *method;    /* "NAT-PMP", "UPnP" or "" */
    char external_ip[64];  /* the router's public address, "" when unknown */
    uint16_t external_tcp; /* mapped external ports (0: none) */
    uint16_t external_udp;
    char error[160]; /* why the last attempt failed, "" after a success */
    uint64_t attempts;
};

struct dg_portmap; /* opaque */

/* Starts: the first attempt is queued at once. @return 0 or -ENOMEM. */
int dg_portmap_start(uv_loop_t *loop, const struct dg_portmap_config *cfg, struct dg_portmap **out);

/* A copy of the current state. */
void dg_portmap_get(const struct dg_portmap *pm, struct dg_portmap_state *out);

/* Tries again now (a network change), unless a job is running. */
void dg_portmap_refresh(struct dg_portmap *pm);

/* Removes the mappings (a job in the pool; the loop runs until it is done) and frees @p pm
 * afterwards. NULL is allowed. */
void dg_portmap_stop(struct dg_portmap *pm);

#endif
