/* One Mainline DHT node (BEP 5) for one address family, as pure logic.
 *
 * The node never owns a socket, never reads a clock and never draws randomness by itself (the
 * jech/dht model): the caller hands it every datagram received (dg_dht_receive()), calls
 * dg_dht_tick() when the time it returned has passed, passes the time of a monotonic clock in
 * milliseconds (@p now_ms) to every call, and supplies a send function and a randomness
 * function in the config. Tests drive any number of nodes over a simulated network with a fake
 * clock and a seeded PRNG.
 *
 * An IPv4 node speaks "nodes" (26-byte compact node infos); an IPv6 node (family AF_INET6) is
 * the same code speaking "nodes6" (38 bytes, BEP 32). Each family has its own node, table and
 * peer store; a dual-stack engine runs two.
 *
 * Serving (queries received):
 *   - ping; find_node (the K = 8 closest nodes that have replied to us); get_peers (a write
 *     token, and up to DG_DHT_MAX_VALUES stored peers as "values", or the 8 closest nodes
 *     when there are none); announce_peer (the token must be one we gave that IP in the last
 *     5 to 10 minutes; implied_port uses the source port). Every reply carries "ip", the
 *     requester's address as we see it (BEP 42).
 *   - An unknown method, and the BEP 44 get/put this node does not implement, get error 204;
 *     a malformed query whose transaction id could be read gets error 203; an announce_peer
 *     with a wrong or expired token gets error 203 ("bad token") and nothing is stored. Any
 *     other malformed datagram is dropped and counted, never answered.
 *   - Queries (malformed ones included) go through the per-source and global rate limiter of
 *     engine/dht_table.h first; a query over the limit is dropped silently and counted.
 *   - No amplification: no reply holds more than 8 nodes or DG_DHT_MAX_VALUES values; a
 *     get_peers reply with more than DG_DHT_MIN_VALUES values is cut to at most
 *     DG_DHT_AMPLIFICATION times the length of its query (a plain ~100-byte query gets about
 *     35 IPv4 peers; the values are a random subset each time); no datagram the node sends is
 *     longer than DG_DHT_MAX_PACKET bytes. A find_node/get_peers reply with 8 nodes is about
 *     3.5 times a minimal query. Together with the rate limiter (50 queries per 10 s per
 *     source) this bounds what a spoofed source can make the node send to a victim.
 *   - A querier is fed to the routing table as heard(query), unless it set BEP 43 "ro".
 *
 * Querying:
 *   - Transaction ids are 4 random bytes; a response or error is matched to the outstanding
 *     query by transaction id AND source address; anything else is dropped and counted. A
 *     responder is fed to the table as heard(reply) if it answers with the id we expected
 *     (or, when we did not know its id, with any id); a wrong id counts as a failure.
 *   - A query unanswered after DG_DHT_QUERY_TIMEOUT_MS is a failure: the table is told
 *     (dg_dht_table_failed()), which makes a node bad after two in a row.
 *   - The "ip" field of matched responses is a vote for our external address (IP and
 *     port): the last DG_DHT_VOTES reports are kept, one per reporting IP (per IP and port
 *     with DG_DHT_TABLE_SAME_IP, for many nodes on one loopback address); an address
 *     reported by at least DG_DHT_VOTE_MIN of them and by more than half of them is taken as
 *     learned, and stays until another one wins.
 *   - Lookups (dg_dht_get_peers(), and the internal find_node lookups of bootstrap and bucket
 *     refresh) are iterative: DG_DHT_ALPHA queries in flight to the closest not yet queried
 *     candidates; the lookup ends when the K closest nodes that replied have all been queried
 *     and nothing is in flight, or after DG_DHT_SEARCH_MAX_MS.
 *
 * Timers (dg_dht_tick()): expiry of outstanding queries, the lookup time cap, pings of
 * questionable nodes the table names (when a full bucket hears a newcomer), bucket refresh
 * (a find_node lookup of a random id in a bucket unchanged for 15 minutes), the first lookup of
 * our own id once the table has a node (after dg_dht_load() or dg_dht_bootstrap()) and again
 * every DG_DHT_THIN_LOOKUP_MS while fewer than K nodes are good, a ping to every node that
 * entered the table by querying us (only nodes that replied are handed to others), rotation
 * of the token secret every 5 minutes, expiry of stored peers. Re-announcing (BEP 5: every
 * 15 minutes or so) is the caller's job: call dg_dht_get_peers() again with the port.
 *
 * Bounds: at most DG_DHT_MAX_SEARCHES lookups and DG_DHT_MAX_QUERIES outstanding queries;
 * beyond that new lookups fail with -EAGAIN and queries are not sent (counted). Memory is
 * allocated in dg_dht_new() only (plus the table's and peer store's own bounded growth).
 *
 * Threads: a node is engine-loop state. All functions taking a struct dg_dht may be called
 * only from one thread (the engine's loop thread; tests: any single thread), never at the
 * same time; none locks. Callbacks (send, rand_bytes, search callbacks) run on that thread,
 * inside the call that triggered them. */
#ifndef DG_DHT_H
#define DG_DHT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "engine/dht_table.h"
#include "engine/node_id.h"

#define DG_DHT_ALPHA 3                /* queries in flight per lookup */
#define DG_DHT_QUERY_TIMEOUT_MS 2000u /* an unanswered query has failed after this */
#define DG_DHT_SEARCH_MAX_MS 30000u   /* a lookup ends after this at the latest */
#define DG_DHT_SEARCH_NODES 32        /* candidates a lookup keeps, closest first */
#define DG_DHT_SEARCH_PEERS 256       /* distinct peers a lookup reports at most */
#define DG_DHT_MAX_SEARCHES 64        /* lookups running at once (internal ones included) */
#define DG_DHT_MAX_QUERIES 1024       /* outstanding queries */
#define DG_DHT_MAX_VALUES 50          /* peers in one get_peers reply (jech/dht's cap) */
#define DG_DHT_MIN_VALUES 8           /* peers a reply may carry whatever its query's size */
#define DG_DHT_AMPLIFICATION 4        /* get_peers reply / query length, beyond 8 values */
#define DG_DHT_MAX_PACKET 1500        /* longest datagram the node sends */
#define DG_DHT_TID_LEN 4              /* transaction ids the node draws */
#define DG_DHT_VOTES 16               /* external address reports remembered */
#define DG_DHT_VOTE_MIN 3             /* reporters needed to learn our address */
#define DG_DHT_MAPPING_FRESH_MS (30u * 60 * 1000) /* votes older than this say nothing */
#define DG_DHT_KEEPALIVE_NODES 32                 /* nodes holding our announces kept pinged */
#define DG_DHT_KEEPALIVE_FOR_MS (20u * 60 * 1000) /* pinged this long after an announce */
#define DG_DHT_EXPIRE_MS (60u * 1000)             /* how often stored peers are expired */
#define DG_DHT_VERSION_MAX 8                      /* longest client version ("v") kept */
#define DG_DHT_THIN_LOOKUP_MS 30000u              /* own-id lookup interval while < K good nodes */

/* Sends one datagram of @p len bytes to @p to. Return 0, or a negative errno (counted in
 * send_failed; the node behaves as if the datagram was lost). The buffer is valid only during
 * the call. @p to is always of the node's family (a plain AF_INET address for an IPv4 node,
 * even if the query came from an IPv4-mapped IPv6 source: a caller with one dual-stack socket
 * maps it back). It must not call back into the node (queue the datagram instead of
 * delivering it to another node synchronously). */
typedef int (*dg_dht_send_fn)(void *arg, const struct sockaddr *to, socklen_t tolen,
                              const uint8_t *buf, size_t len);

/* Results of a dg_dht_get_peers() lookup. Called with the new, de-duplicated peers of a reply
 * (@p done 0, @p npeers > 0, compact addresses of the node's family, @p from the node that
 * returned them: it holds their announces, so it can act as their rendezvous), then exactly
 * once with @p done 1 (no peers, @p from NULL) when the lookup has ended, including its
 * announces; not called
 * after dg_dht_cancel_search(). @p peers is valid only during the call. The callback may call
 * dg_dht_get_peers(), dg_dht_cancel_search() and dg_dht_stats(), but not dg_dht_free(),
 * dg_dht_receive() or dg_dht_tick(). */
typedef void (*dg_dht_search_cb)(void *arg, uint32_t search_id, const struct dg_dht_compact *peers,
                                 size_t npeers, const struct sockaddr *from, int done);

struct dg_dht_config {
    int family;                 /* AF_INET or AF_INET6 */
    int have_id;                /* 1: use @c id; 0: draw a random id (not BEP 42-valid) */
    uint8_t id[DG_NODE_ID_LEN]; /* our node id; making it BEP 42-valid is the caller's job */
    unsigned table_flags;       /* DG_DHT_TABLE_* (0: BEP 42 enforced, one node per IP) */
    /* 1: announce with implied_port, so that storing nodes record the port our queries come
     * from (the UDP port as a NAT maps it towards them) instead of announce_port. */
    int implied_port;
    dg_dht_send_fn send; /* required */
    void *send_arg;
    dg_rand_bytes_fn rand_bytes; /* required; a CSPRNG outside tests */
    void *rand_arg;
    const uint8_t *version; /* client version for "v" (copied, at most DG_DHT_VERSION_MAX
                             * bytes), or NULL for none */
    size_t version_len;
    /* Rate limiter of incoming queries; NULL: dg_dht_ratelimit_config_default(). */
    const struct dg_dht_ratelimit_config *ratelimit;
    /* Peer store limits; NULL: the defaults of engine/dht_table.h. Its rand_bytes is ignored
     * (the node's is used). */
    const struct dg_dht_peer_store_config *peer_store;
};

struct dg_dht; /* opaque */

/* Index of the per-method counters: the values of enum dg_krpc_method (engine/krpc.h), with
 * DG_KRPC_NONE unused and DG_KRPC_UNKNOWN for everything not known. */
#define DG_DHT_METHODS 8

struct dg_dht_stats {
    size_t nodes, good;                   /* routing table entries, and the good ones among them */
    size_t replacements;                  /* pending replacements in the table */
    size_t searches;                      /* lookups running (internal ones included) */
    size_t outstanding;                   /* queries waiting for an answer */
    size_t stored_keys;                   /* info hashes in the peer store */
    size_t stored_peers;                  /* peers in the peer store */
    uint64_t queries_in[DG_DHT_METHODS];  /* answered or refused, by method */
    uint64_t queries_out[DG_DHT_METHODS]; /* sent, by method */
    uint64_t replies_in;                  /* matched responses */
    uint64_t errors_in;                   /* matched error messages */
    uint64_t errors_sent;                 /* error messages we sent (203, 204) */
    uint64_t malformed;             /* datagrams that did not parse (answered 203 or dropped) */
    uint64_t unmatched;             /* responses/errors matching no outstanding query: dropped */
    uint64_t rate_limited;          /* queries dropped by the rate limiter */
    uint64_t timeouts;              /* queries that got no answer in time */
    uint64_t wrong_id;              /* responses from another id than expected */
    uint64_t bad_tokens;            /* announce_peer refused for its token */
    uint64_t announces_stored;      /* announce_peer accepted */
    uint64_t dropped_queries;       /* queries not sent: DG_DHT_MAX_QUERIES outstanding */
    uint64_t send_failed;           /* send callback errors */
    uint64_t keepalives;            /* pings sent to keep a NAT mapping towards a node open */
    int have_external;              /* 1 when our external address has been learned */
    struct dg_dht_compact external; /* that address (6 or 18 bytes), if have_external */
};

/* Creates a node with an empty routing table.
 * @param[in]  cfg     copied (the version bytes too).
 * @param[in]  now_ms  the current time.
 * @param[out] out     the node, to free with dg_dht_free().
 * @return 0; -EINVAL (family not AF_INET/AF_INET6, send or rand_bytes NULL, version longer
 *         than DG_DHT_VERSION_MAX, a bad rate limiter or peer store config); -ENOMEM.
 * Thread: any; the node then belongs to the calling thread's loop. */
int dg_dht_new(const struct dg_dht_config *cfg, uint64_t now_ms, struct dg_dht **out);

/* Frees @p d (NULL allowed) and everything it holds. Running lookups end without a callback.
 * Not from inside a callback of @p d. */
void dg_dht_free(struct dg_dht *d);

/* @return our node id (20 bytes, valid as long as @p d). */
const uint8_t *dg_dht_id(const struct dg_dht *d);

/* @return the routing table, for inspection only (valid as long as @p d). */
const struct dg_dht_table *dg_dht_get_table(const struct dg_dht *d);

/* Handles one received datagram: answers queries, matches responses, advances lookups.
 * Never fails: anything wrong is counted (see struct dg_dht_stats) and dropped.
 * @param[in] buf   the payload, @p len bytes (need not stay valid after the call).
 * @param[in] from  the source address, @p fromlen bytes; a source of another family (an
 *                  IPv4-mapped IPv6 address counts as IPv4) or an unusable one is dropped. */
void dg_dht_receive(struct dg_dht *d, const uint8_t *buf, size_t len, const struct sockaddr *from,
                    socklen_t fromlen, uint64_t now_ms);

/* Runs the timers (see the top of this file).
 * @return milliseconds until the node wants to be ticked again (at most 60 s); calling it
 *         earlier or more often is harmless. Every other call on the node (receive,
 *         bootstrap, get_peers, load) may send queries: after one, arm the timer for at most
 *         DG_DHT_QUERY_TIMEOUT_MS later if it is set later than that. */
uint64_t dg_dht_tick(struct dg_dht *d, uint64_t now_ms);

/* Sends find_node(our id) to a node known only by address (a bootstrap router, a
 * configured peer). When it answers, the node enters the table and a lookup of our own id
 * starts from it (unless one is running), which fills the table.
 * @return 0; -EINVAL (address of another family or unusable); -EAGAIN (too many outstanding
 *         queries). A send failure is not an error here (counted in send_failed). */
int dg_dht_bootstrap(struct dg_dht *d, const struct sockaddr *addr, socklen_t addrlen,
                     uint64_t now_ms);

/* Starts an iterative get_peers lookup of @p key, seeded from the routing table.
 * @param[in]  announce_port  0: only look; else, when the lookup has ended, send announce_peer
 *                            (port @p announce_port, implied_port 0) to the K closest nodes
 *                            that gave us a token; the final callback comes after their
 *                            answers or timeouts.
 * @param[in]  cb             see dg_dht_search_cb; required.
 * @param[out] search_id      may be NULL; a non-zero id for dg_dht_cancel_search().
 * @return 0; -EINVAL (cb NULL); -EAGAIN (DG_DHT_MAX_SEARCHES running). With an empty
 *         routing table the lookup ends at the next dg_dht_tick() with done = 1. */
int dg_dht_get_peers(struct dg_dht *d, const uint8_t key[DG_NODE_ID_LEN], uint16_t announce_port,
                     dg_dht_search_cb cb, void *arg, uint64_t now_ms, uint32_t *search_id);

/* Ends lookup @p search_id at once, without a further callback. Answers to its queries still
 * feed the routing table.
 * @return 0, or -ENOENT if no such lookup is running. */
int dg_dht_cancel_search(struct dg_dht *d, uint32_t search_id);

/* Fills @p st at @p now_ms (which classifies the table's nodes). */
void dg_dht_stats(const struct dg_dht *d, uint64_t now_ms, struct dg_dht_stats *st);

/* The external address learned from "ip" votes.
 * @param[out] out  the address (port as reported) if learned.
 * @return 0, or -ENOENT if not learned yet. */
int dg_dht_external_addr(const struct dg_dht *d, struct sockaddr_storage *out);

/* Keep-alives: while @p interval_ms is not 0, every node that accepted one of our announces in
 * the last DG_DHT_KEEPALIVE_FOR_MS (at most DG_DHT_KEEPALIVE_NODES of them, the latest) is
 * pinged every @p interval_ms, so that a NAT in front of us keeps its mapping towards that node
 * open and the node can pass us a hole-punching request (engine/holepunch.h). Off at start. */
void dg_dht_set_keepalive(struct dg_dht *d, uint64_t interval_ms);

/* Whether @p node took one of our announces in the last DG_DHT_KEEPALIVE_FOR_MS (it is one of
 * the latest DG_DHT_KEEPALIVE_NODES such nodes): only those may act as our rendezvous.
 * @return 1 or 0. */
int dg_dht_announced_to(const struct dg_dht *d, const struct sockaddr *node, uint64_t now_ms);

/* How our address looks to the nodes that reported it (the "ip" of their replies, the last
 * DG_DHT_MAPPING_FRESH_MS): the basis of NAT classification (RFC 4787). */
struct dg_dht_mapping {
    size_t observers;             /* reporters (one per IP) of the most reported IP; 0: none */
    size_t ports;                 /* distinct ports they saw for it */
    size_t same_port;             /* how many of them saw the most common port */
    struct sockaddr_storage addr; /* that IP with that port */
};
void dg_dht_mapping(const struct dg_dht *d, uint64_t now_ms, struct dg_dht_mapping *out);

/* Whether @p peer (address and port) announced @p key to us and has not expired: the check a
 * rendezvous makes before passing anything to it. @return 1 or 0. */
int dg_dht_announced(struct dg_dht *d, const uint8_t key[DG_NODE_ID_LEN],
                     const struct sockaddr *peer, uint64_t now_ms);

/* Saves the routing table (format and contents: dg_dht_table_save()).
 * @return the length written, or -ENOSPC (DG_DHT_SAVE_MAX bytes always suffice). */
int dg_dht_save(const struct dg_dht *d, uint8_t *buf, size_t cap);

/* Loads a save into the routing table (untrusted input: see dg_dht_table_load()); the next
 * dg_dht_tick() starts a lookup of our own id from the loaded nodes.
 * @return the number of nodes inserted, -EBADMSG (damaged) or -EINVAL (another family). */
int dg_dht_load(struct dg_dht *d, const uint8_t *buf, size_t len, uint64_t now_ms);

#endif
