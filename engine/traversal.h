/* Everything on the node's UDP port besides the DHT, and NAT traversal around it:
 *   - uTP (engine/utp.h) on the DHT's socket and on the extra sockets hole punching opens
 *     ("paths": 0 is the main socket), demultiplexed by first bytes: 'd' goes to the DHT,
 *     DG_HP_MAGIC to hole punching, uTP headers to uTP;
 *   - hole punching (engine/holepunch.h) in all three roles: asking a rendezvous, being one,
 *     and answering one;
 *   - the relay server (engine/relay.h), when enabled;
 *   - NAT classification (RFC 4787 terms): from how the DHT nodes that reported our address saw
 *     it (dg_dht_service_mapping) and whether the router mapped our port:
 *       none: the reported IP is one of our interfaces' addresses, or the router mapped our
 *             port (UPnP / NAT-PMP);
 *       easy: at least two observers, and more than half of them, saw the same IP and port
 *             (endpoint-independent mapping; a Linux NAT gives a few peers another port when
 *             their packets reached the port first);
 *       hard: at least two observers, and no port seen by more than half of them
 *             (endpoint-dependent mapping);
 *       unknown: fewer than two observers so far.
 *     While the class is not none, the DHT keeps the mappings towards the nodes holding our
 *     announces open (DG_TRAVERSAL_KEEPALIVE_MS), so that they can act as our rendezvous.
 *
 * Threads: the engine's loop thread only. */
#ifndef DG_TRAVERSAL_H
#define DG_TRAVERSAL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "engine/holepunch.h"
#include "engine/relay.h"
#include "engine/utp.h"

struct dg_dht_service;
struct dg_swarms;

#define DG_TRAVERSAL_KEEPALIVE_MS 15000u  /* NAT mappings towards rendezvous nodes */
#define DG_TRAVERSAL_CLASSIFY_MS 5000u    /* how often the NAT class is worked out again */
#define DG_TRAVERSAL_MAX_PATHS 512        /* extra UDP sockets open at once */
#define DG_TRAVERSAL_PATH_IDLE_MS 120000u /* a handed-over path silent this long is closed */
#define DG_TRAVERSAL_PEER_REPORTS 16      /* peers' reports of our address kept */

struct dg_traversal_config {
    uv_loop_t *loop;
    struct dg_dht_service *dht; /* its socket is path 0 */
    int holepunch;              /* ask rendezvous nodes to punch holes, and answer them */
    int relay;                  /* serve as a relay for others */
    size_t relay_streams;       /* relayed streams at once */
    uint64_t relay_rate;        /* bytes per second per relayed stream and direction */
    /* Whether the router has mapped our port (engine/portmap.h); NULL: never. */
    int (*mapped)(void *arg);
    void *arg;
};

/* What `digfs status` shows. */
struct dg_traversal_info {
    enum dg_nat_class nat;
    const char *nat_reason;  /* how the class was decided (a short phrase) */
    size_t observers, ports; /* see struct dg_dht_mapping */
    char address[64];        /* our address as most observers see it, "" if unknown */
    char peers_see[64];      /* our IP as most peers report it (hello `yourip`), or "" */
    size_t peer_reports;     /* reports that name it */
    size_t paths;            /* extra UDP sockets open */
    size_t utp_connections;
    struct dg_utp_stats utp;
    struct dg_hp_stats hp;
    int relay_on;
    uint16_t relay_port;
    struct dg_relay_stats relay;
};

struct dg_traversal; /* opaque */

/* Starts uTP and hole punching on @p cfg->dht's socket (it takes its "other" handler), and the
 * relay if enabled. @return 0, -ENOMEM, or the relay's listen error. */
int dg_traversal_start(const struct dg_traversal_config *cfg, struct dg_traversal **out);

/* The uTP context (for dg_swarms_config.utp). */
struct dg_utp *dg_traversal_utp(struct dg_traversal *t);

/* The swarms that get incoming uTP connections and traversal results; NULL detaches. */
void dg_traversal_set_swarms(struct dg_traversal *t, struct dg_swarms *swarms);

/* Asks rendezvous @p via to bring @p target (a peer of @p key) to us (struct dg_swarm_host's
 * traverse). @return 0 or -errno (-ENOTSUP when hole punching is off). */
int dg_traversal_request(struct dg_traversal *t, const uint8_t key[20],
                         const struct sockaddr *target, const struct sockaddr *via, int relay);

/* Starts punching towards @p peer with @p nonce, as a peer connected to both told us to
 * (struct dg_swarm_host's punch; see dg_hp_punch()). @return 0 or -errno (-ENOTSUP when hole
 * punching is off, -EPERM when both NATs are hard). */
int dg_traversal_punch(struct dg_traversal *t, const uint8_t key[20], const uint8_t nonce[16],
                       const struct sockaddr *peer, enum dg_nat_class peer_nat, int initiator);

/* A peer at @p reporter sees us at IP @p ip (an AF_INET address; the port is not used).
 * The last DG_TRAVERSAL_PEER_REPORTS reports, one per reporter IP, are kept: the IP most of
 * them name (at least two) is what peers see (struct dg_traversal_info peers_see), and counts
 * as a public address of ours while the DHT has too few observers to tell. */
void dg_traversal_peer_observed(struct dg_traversal *t, const struct sockaddr *ip,
                                const struct sockaddr *reporter);

/* Our NAT class as last worked out. */
enum dg_nat_class dg_traversal_nat(const struct dg_traversal *t);

void dg_traversal_get_info(const struct dg_traversal *t, struct dg_traversal_info *out);

/* Closes everything (uTP connections are dropped without callbacks: close the swarms first).
 * @p closed (may be NULL) runs once every handle is closed; @p t is freed after it. */
void dg_traversal_stop(struct dg_traversal *t, void (*closed)(void *arg), void *arg);

#endif
