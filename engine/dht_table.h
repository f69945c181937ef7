/* The state a BEP 5 (Mainline DHT) node keeps, as pure logic: the routing table, write tokens,
 * the peers stored by announce_peer, and a rate limiter for incoming queries.
 *
 * Nothing here owns a socket, reads a clock or draws randomness by itself (the jech/dht
 * model): time is always passed in as milliseconds of a monotonic clock (@p now_ms), randomness
 * comes from a caller-supplied dg_rand_bytes_fn, and where a message should be sent the
 * function says so (for example a node to ping) and the caller sends it. Tests drive all of it
 * with a fake clock and a seeded PRNG.
 *
 * Threads: every object here is engine-loop state. Only the engine's loop thread may call
 * these functions (tests: any single thread); none of them locks. The stateless helpers
 * (dg_dht_addr_*, dg_dht_node_state, dg_dht_table_load_id) are reentrant.
 *
 * Routing table (BEP 5, BEP 32 for IPv6, BEP 42):
 *   - One table per address family. K = 8 nodes per bucket; only the bucket that holds our
 *     own id splits, up to 160 buckets. Bucket i < n-1 holds the ids sharing exactly i
 *     leading bits with our id; the last bucket holds those sharing n-1 or more.
 *   - A node is good if it replied to us in the last 15 minutes, or has replied at some time
 *     (this run or, for a loaded node, a previous one) and sent us a query in the last 15
 *     minutes; bad after DG_DHT_BAD_FAILS (2) failed queries in a row (BEP 5: "try once more
 *     before discarding"); questionable otherwise. A reply resets the failure count.
 *   - Full bucket: a bad node is replaced; else our own bucket splits; else the newcomer is
 *     kept as a pending replacement (up to 8 per bucket) and the least recently seen
 *     questionable node is handed back to be pinged. When that node has failed twice, the
 *     best replacement takes its place.
 *   - One entry per IP address (libtorrent's rule against Sybil floods), over the nodes and
 *     the replacements; DG_DHT_TABLE_SAME_IP relaxes it to one entry per IP and port, for
 *     tests running many nodes on 127.0.0.1.
 *   - BEP 42: a node whose id is not valid for its address (dg_node_id_valid_for(), local
 *     ranges exempt) is not inserted and is counted; DG_DHT_TABLE_NO_BEP42 turns this off.
 *   - Only nodes that have replied at least once are handed to others (closest()): a node
 *     heard only through a query may have a spoofed source address.
 */
#ifndef DG_DHT_TABLE_H
#define DG_DHT_TABLE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "engine/node_id.h"

#define DG_DHT_K 8             /* nodes per bucket */
#define DG_DHT_MAX_BUCKETS 160 /* one per bit of the id */
#define DG_DHT_REPLACEMENTS 8  /* pending replacements kept per bucket */
#define DG_DHT_MAX_NODES (DG_DHT_K * DG_DHT_MAX_BUCKETS)
#define DG_DHT_GOOD_MS (15u * 60 * 1000)    /* a reply keeps a node good this long */
#define DG_DHT_REFRESH_MS (15u * 60 * 1000) /* a bucket unchanged this long is refreshed */
#define DG_DHT_PING_HOLDOFF_MS (10u * 1000) /* one node is not handed out to ping more often */
#define DG_DHT_BAD_FAILS 2                  /* failed queries in a row that make a node bad */

/* ---- Compact addresses (BEP 5 "compact IP-address/port info", BEP 32 for IPv6) ---- */

#define DG_DHT_COMPACT4_LEN 6  /* 4-byte IPv4 address, 2-byte port, both big-endian */
#define DG_DHT_COMPACT6_LEN 18 /* 16-byte IPv6 address, 2-byte port */

struct dg_dht_compact {
    uint8_t len; /* DG_DHT_COMPACT4_LEN or DG_DHT_COMPACT6_LEN */
    uint8_t bytes[DG_DHT_COMPACT6_LEN];
};

/* Writes the compact form of @p addr (an IPv4-mapped IPv6 address becomes IPv4).
 * @param[out] out  up to 18 bytes.
 * @return its length (6 or 18), or -EAFNOSUPPORT. Reentrant. */
int dg_dht_addr_to_compact(const struct sockaddr *addr, uint8_t out[DG_DHT_COMPACT6_LEN]);

/* Parses a compact address of @p len 6 (IPv4) or 18 (IPv6) bytes into @p out (zeroed first).
 * @return 0, or -EBADMSG for another length. Reentrant. */
int dg_dht_addr_from_compact(const uint8_t *buf, size_t len, struct sockaddr_storage *out);

/* @return 1 if @p addr can be a DHT node or peer: AF_INET or AF_INET6, port not 0, and a
 *         unicast address (not 0.0.0.0/8, 224.0.0.0/3 multicast/reserved/broadcast, ::,
 *         ff00::/8 multicast, nor an IPv4-mapped form of those); else 0. Reentrant. */
int dg_dht_addr_usable(const struct sockaddr *addr);

/* ---- Routing table ---- */

struct dg_dht_table; /* opaque */

enum dg_dht_node_state {
    DG_DHT_NODE_GOOD,
    DG_DHT_NODE_QUESTIONABLE,
    DG_DHT_NODE_BAD,
};

/* dg_dht_node.flags */
#define DG_DHT_NODE_REPLIED 0x01   /* has replied in this run: last_reply_ms is valid */
#define DG_DHT_NODE_QUERIED 0x02   /* has sent us a query in this run: last_query_ms is valid */
#define DG_DHT_NODE_CONFIRMED 0x04 /* has replied at some time (also: loaded from a save) */

/* A copy of a routing entry, as handed out by the table. */
struct dg_dht_node {
    uint8_t id[DG_NODE_ID_LEN];
    struct sockaddr_storage addr; /* AF_INET or AF_INET6, port set */
    uint64_t last_reply_ms;       /* time of the last reply (if DG_DHT_NODE_REPLIED) */
    uint64_t last_query_ms;       /* time of the last query from it (if DG_DHT_NODE_QUERIED) */
    uint8_t fails;                /* failed queries in a row */
    uint8_t flags;                /* DG_DHT_NODE_* */
};

/* dg_dht_table_config.flags */
#define DG_DHT_TABLE_NO_BEP42 0x1 /* insert nodes whatever their id (loopback/LAN tests) */
#define DG_DHT_TABLE_SAME_IP 0x2  /* one entry per IP and port instead of per IP (tests) */

struct dg_dht_table_config {
    int family;                  /* AF_INET or AF_INET6 */
    uint8_t id[DG_NODE_ID_LEN];  /* our node id */
    unsigned flags;              /* DG_DHT_TABLE_* (0: BEP 42 enforced, one entry per IP) */
    dg_rand_bytes_fn rand_bytes; /* randomness for refresh targets */
    void *rand_arg;
};

/* What dg_dht_table_heard() did (non-negative results). */
enum dg_dht_heard_result {
    DG_DHT_HEARD_UPDATED = 0,  /* a known node: its times were updated */
    DG_DHT_HEARD_ADDED,        /* inserted into a bucket with room (maybe after splits) */
    DG_DHT_HEARD_REPLACED_BAD, /* took the place of a bad node */
    DG_DHT_HEARD_PENDING_PING, /* bucket full: kept as a replacement; ping *ping_out */
    DG_DHT_HEARD_PENDING,      /* bucket full, nothing to ping now: kept as a replacement, but
                                  one never replied does not displace ones that have */
};

enum dg_dht_heard_kind {
    DG_DHT_HEARD_REPLY, /* it answered one of our queries */
    DG_DHT_HEARD_QUERY, /* it sent us a query */
};

/* What dg_dht_table_failed() did (non-negative results). */
enum dg_dht_failed_result {
    DG_DHT_FAILED_COUNTED = 0, /* failure counted; the node is not bad yet */
    DG_DHT_FAILED_BAD,         /* the node is now bad; it stays until a newcomer replaces it */
    DG_DHT_FAILED_REPLACED,    /* the node was bad and a pending replacement took its place */
    DG_DHT_FAILED_DROPPED,     /* it was a pending replacement: forgotten */
};

struct dg_dht_table_stats {
    size_t nodes, good, questionable, bad; /* entries in the buckets, by state */
    size_t replacements;                   /* pending replacements */
    size_t buckets;
    uint64_t rejected_bep42;   /* ids not valid for their address (BEP 42) */
    uint64_t rejected_same_ip; /* an entry with that IP (or IP and port) exists */
    uint64_t rejected_id;      /* that id is known at another address */
    uint64_t rejected_invalid; /* unusable address, wrong family, or our own id */
    uint64_t load_skipped;     /* saved entries skipped by dg_dht_table_load() */
};

/* Creates an empty table (one bucket).
 * @param[in]  cfg     copied; family must be AF_INET or AF_INET6, rand_bytes non-NULL.
 * @param[in]  now_ms  buckets count as changed at this time (first refresh due 15 min later).
 * @param[out] out     the table, to free with dg_dht_table_free().
 * @return 0, -EINVAL (bad config) or -ENOMEM. */
int dg_dht_table_new(const struct dg_dht_table_config *cfg, uint64_t now_ms,
                     struct dg_dht_table **out);

/* Frees @p t (NULL allowed). */
void dg_dht_table_free(struct dg_dht_table *t);

/* Changes the DG_DHT_TABLE_* flags. Nodes already in the table stay. */
void dg_dht_table_set_flags(struct dg_dht_table *t, unsigned flags);

/* @return our id (20 bytes, valid for the table's lifetime). */
const uint8_t *dg_dht_table_id(const struct dg_dht_table *t);

/* @return the table's address family. */
int dg_dht_table_family(const struct dg_dht_table *t);

/* @return the state of @p n at @p now_ms (rules above). Reentrant. */
enum dg_dht_node_state dg_dht_node_state(const struct dg_dht_node *n, uint64_t now_ms);

/* Records that node @p id at @p addr replied to us or queried us, inserting it if new.
 * The caller must only report a reply whose id it has checked against the transaction it
 * answers; a node that answers with another id than expected should be reported with
 * dg_dht_table_failed() under the expected id.
 * @param[in]  addr      of the table's family: an IPv4 table also takes IPv4-mapped IPv6
 *                       addresses (stored as IPv4), an IPv6 table refuses them.
 * @param[out] ping_out  may be NULL; on DG_DHT_HEARD_PENDING_PING the questionable node to
 *                       ping (the table will not name it again for DG_DHT_PING_HOLDOFF_MS).
 *                       Report the outcome with dg_dht_table_heard() (reply) or
 *                       dg_dht_table_failed() (timeout).
 * @return a dg_dht_heard_result, or
 *         -EINVAL  wrong family, unusable address (dg_dht_addr_usable()) or our own id;
 *         -EACCES  BEP 42 enforced and the id is not valid for the address;
 *         -EEXIST  another entry has this IP (or IP and port), or this id has another
 *                  address (unless that entry is bad: then the newcomer takes its place).
 *         Each rejection is counted in the stats. */
int dg_dht_table_heard(struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                       const struct sockaddr *addr, enum dg_dht_heard_kind kind, uint64_t now_ms,
                       struct dg_dht_node *ping_out);

/* Records that a query to node @p id timed out or was answered wrongly.
 * @param[in] addr  may be NULL; if given, the entry must have this address.
 * @return a dg_dht_failed_result, or -ENOENT if no such node or replacement is known. */
int dg_dht_table_failed(struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                        const struct sockaddr *addr, uint64_t now_ms);

/* The up to @p max nodes closest to @p target by XOR distance, closest first, among the nodes
 * in the buckets that have replied at some time and are not bad (good or questionable).
 * Replacements are not included. Ties (only possible for equal ids, which the table never
 * holds) keep table order.
 * @param[out] out  @p max entries.
 * @return the number written, 0..max. */
size_t dg_dht_table_closest(const struct dg_dht_table *t, const uint8_t target[DG_NODE_ID_LEN],
                            struct dg_dht_node *out, size_t max);

/* Finds the bucket whose contents have not changed (a node added, replaced, or replying) and
 * that was not refreshed for DG_DHT_REFRESH_MS, the longest-waiting one first, and marks it
 * refreshed at @p now_ms. The caller then runs a find_node lookup for @p target_out.
 * @param[out] target_out  a random id inside that bucket's range.
 * @return the bucket's index (0 = farthest from our id), or -EAGAIN if none is due. */
int dg_dht_table_next_refresh(struct dg_dht_table *t, uint64_t now_ms,
                              uint8_t target_out[DG_NODE_ID_LEN]);

/* @return milliseconds until dg_dht_table_next_refresh() has a bucket to refresh (0: now),
 *         for arming the loop's timer. */
uint64_t dg_dht_table_refresh_due_in(const struct dg_dht_table *t, uint64_t now_ms);

/* @return the number of nodes in the buckets (replacements not counted). */
size_t dg_dht_table_count(const struct dg_dht_table *t);

/* Copies the @p i-th node (0 <= i < dg_dht_table_count(); bucket order, farthest bucket
 * first) into @p out. For iteration, e.g. to save or to re-seed a new table.
 * @return 0, or -ENOENT if @p i is out of range. */
int dg_dht_table_node_at(const struct dg_dht_table *t, size_t i, struct dg_dht_node *out);

/* Copies node @p id (from the buckets) into @p out (may be NULL).
 * @return 0 or -ENOENT. */
int dg_dht_table_find(const struct dg_dht_table *t, const uint8_t id[DG_NODE_ID_LEN],
                      struct dg_dht_node *out);

/* Fills @p st. @p now_ms classifies the nodes. */
void dg_dht_table_stats(const struct dg_dht_table *t, uint64_t now_ms,
                        struct dg_dht_table_stats *st);

/* ---- Saving the table ----
 * Format (version 1), all integers big-endian:
 *   0   4   magic "DGRT"
 *   4   1   version, 1
 *   5   1   address family: 4 or 6
 *   6   2   N, the number of nodes, at most DG_DHT_MAX_NODES
 *   8   20  our node id
 *   28  N * (20 + A + 2)  nodes: id, IP address (A = 4 or 16), port (the compact node info of
 *                          BEP 5 / BEP 32)
 *   end 4   CRC32C of all the bytes before it
 * Saved: the nodes in the buckets that have replied at some time and are not bad. */

#define DG_DHT_SAVE_HEADER 28
#define DG_DHT_SAVE_MAX (DG_DHT_SAVE_HEADER + DG_DHT_MAX_NODES * (20 + 16 + 2) + 4)

/* Writes the table into @p buf.
 * @return the number of bytes written (at most DG_DHT_SAVE_MAX), or -ENOSPC if @p cap is too
 *         small (nothing useful is written then). */
int dg_dht_table_save(const struct dg_dht_table *t, uint8_t *buf, size_t cap);

/* Reads the family and own id of a save, without loading it (to reuse the id at start).
 * The whole save is checked as dg_dht_table_load() does, except the entries themselves.
 * @return 0, or -EBADMSG. Reentrant. */
int dg_dht_table_load_id(const uint8_t *buf, size_t len, int *family, uint8_t id[DG_NODE_ID_LEN]);

/* Inserts the nodes of a save (untrusted input: it may be damaged or crafted) into @p t as
 * nodes that have replied before but not in this run (questionable, handed out by closest()).
 * The header, length and CRC must be right or nothing is loaded; then each entry goes
 * through the same checks as dg_dht_table_heard() (address, BEP 42 when enforced, one entry
 * per IP, our own id) and is skipped if it fails them (counted in load_skipped and in the
 * rejected_* counter of the reason). An entry whose bucket is full becomes a pending
 * replacement. The saved own id need not equal the table's; nodes already in the table stay.
 * @return the number of nodes inserted, -EBADMSG (damaged), or -EINVAL (another family). */
int dg_dht_table_load(struct dg_dht_table *t, const uint8_t *buf, size_t len, uint64_t now_ms);

/* ---- Write tokens (BEP 5: get_peers hands one out, announce_peer must bring it back) ----
 * token = the first DG_DHT_TOKEN_LEN bytes of SHA-256(secret || IP address bytes), the IP as
 * 4 or 16 bytes (IPv4-mapped counts as IPv4; the port is not included, as BEP 5 says). The
 * secret rotates every 5 minutes and the previous one is still accepted, so a token is good
 * for 5 to 10 minutes. */

#define DG_DHT_TOKEN_LEN 8
#define DG_DHT_SECRET_LEN 32
#define DG_DHT_TOKEN_ROTATE_MS (5u * 60 * 1000)

struct dg_dht_tokens {
    uint8_t current[DG_DHT_SECRET_LEN];
    uint8_t previous[DG_DHT_SECRET_LEN];
    uint64_t rotated_ms; /* when current was drawn */
    dg_rand_bytes_fn rand_bytes;
    void *rand_arg;
};

/* Draws both secrets. @p rand_bytes must be non-NULL (and should be a CSPRNG outside tests). */
void dg_dht_tokens_init(struct dg_dht_tokens *tk, dg_rand_bytes_fn rand_bytes, void *rand_arg,
                        uint64_t now_ms);

/* Rotates if DG_DHT_TOKEN_ROTATE_MS have passed: previous = current, current = new. If two
 * periods have passed, both are drawn anew (tokens older than 10 minutes never pass).
 * @return the number of secrets replaced: 0, 1 or 2. */
int dg_dht_tokens_rotate_if_due(struct dg_dht_tokens *tk, uint64_t now_ms);

/* Makes the token for a node at @p addr with the current secret.
 * @param[out] out  DG_DHT_TOKEN_LEN bytes.
 * @param[out] len  set to DG_DHT_TOKEN_LEN.
 * @return 0, -EAFNOSUPPORT, or -EIO if OpenSSL's digest fails. */
int dg_dht_token_make(const struct dg_dht_tokens *tk, const struct sockaddr *addr,
                      uint8_t out[DG_DHT_TOKEN_LEN], size_t *len);

/* @return 1 if @p token (of @p len bytes) is the token of @p addr under the current or the
 *         previous secret (compared in constant time), else 0. */
int dg_dht_token_check(const struct dg_dht_tokens *tk, const struct sockaddr *addr,
                       const uint8_t *token, size_t len);

/* ---- Peer storage (announce_peer / get_peers) ----
 * Peers are kept per 20-byte info hash, one entry per IP address (a new port replaces the
 * old). Bounds: max_per_key peers per info hash (a newcomer replaces the oldest), max_peers in
 * all and max_keys info hashes (the info hash announced least recently is dropped to make
 * room). Entries expire ttl_ms after their last announce. */

struct dg_dht_peer_store; /* opaque */

struct dg_dht_peer_store_config {
    size_t max_keys;    /* 0: 2000 */
    size_t max_peers;   /* 0: 20000 */
    size_t max_per_key; /* 0: 100 */
    uint64_t ttl_ms;    /* 0: 30 minutes */
    int same_ip;        /* one peer per IP and port instead of per IP (loopback tests) */
    dg_rand_bytes_fn rand_bytes;
    void *rand_arg;
};

struct dg_dht_peer_store_stats {
    size_t keys, peers;
    uint64_t added, updated;
    uint64_t evicted_keys;  /* info hashes dropped for room */
    uint64_t evicted_peers; /* peers dropped for room (per-key limit or with their key) */
    uint64_t expired;       /* peers dropped by age */
};

/* Creates an empty store. Zero limits in @p cfg take the defaults.
 * @return 0, -EINVAL (no rand_bytes, or max_keys over 2^24) or -ENOMEM. */
int dg_dht_peer_store_new(const struct dg_dht_peer_store_config *cfg,
                          struct dg_dht_peer_store **out);

/* Frees @p s (NULL allowed). */
void dg_dht_peer_store_free(struct dg_dht_peer_store *s);

/* Stores (or refreshes) peer @p addr for @p info_hash, seen at @p now_ms. One peer is kept per
 * IP (per IP and port with same_ip).
 * @return 0 (added), 1 (known IP: port and time updated), -EINVAL (unusable address), or
 *         -ENOMEM. */
int dg_dht_peer_store_add(struct dg_dht_peer_store *s, const uint8_t info_hash[DG_NODE_ID_LEN],
                          const struct sockaddr *addr, uint64_t now_ms);

/* Up to @p max unexpired peers of @p family (AF_INET or AF_INET6) for @p info_hash: all of
 * them if there are no more than @p max, else a uniformly random subset (so that every stored
 * peer gets handed out, not always the same ones).
 * @return the number written into @p out. */
size_t dg_dht_peer_store_get(struct dg_dht_peer_store *s, const uint8_t info_hash[DG_NODE_ID_LEN],
                             int family, struct dg_dht_compact *out, size_t max, uint64_t now_ms);

/* Whether @p addr (IP and port) is stored, unexpired, for @p info_hash. @return 1 or 0. */
int dg_dht_peer_store_has(const struct dg_dht_peer_store *s,
                          const uint8_t info_hash[DG_NODE_ID_LEN], const struct sockaddr *addr,
                          uint64_t now_ms);

/* Drops expired peers and empty info hashes. Call it every minute or so.
 * @return the number of peers dropped. */
size_t dg_dht_peer_store_expire(struct dg_dht_peer_store *s, uint64_t now_ms);

void dg_dht_peer_store_stats(const struct dg_dht_peer_store *s, struct dg_dht_peer_store_stats *st);

/* ---- Rate limiting of incoming queries ----
 * A token bucket per source (IPv4 address; IPv6 /64 prefix, since one host usually holds a
 * whole /64): per_source_burst messages, refilled at that many per per_source_window_ms; a
 * source that runs dry is ignored for block_ms. Sources are tracked in a table of max_sources
 * entries; when it is full the least recently heard source is forgotten. A global token bucket
 * (global_burst, refilled at global_per_sec per second) caps the total. A source that is
 * blocked does not use global tokens. */

struct dg_dht_ratelimit; /* opaque */

struct dg_dht_ratelimit_config {
    uint32_t per_source_burst;     /* 50; 0: no per-source limit */
    uint32_t per_source_window_ms; /* 10000 */
    uint32_t block_ms;             /* 300000 (5 minutes) */
    uint32_t global_burst;         /* 400; 0: no global limit */
    uint32_t global_per_sec;       /* 100 */
    uint32_t max_sources;          /* 4096 */
};

struct dg_dht_ratelimit_stats {
    uint64_t allowed;
    uint64_t dropped_source; /* from a source over its limit or blocked */
    uint64_t dropped_global; /* global bucket empty */
    uint64_t blocks;         /* times a source was put on the block list */
    uint64_t evictions;      /* sources forgotten to make room */
    size_t sources;          /* sources tracked now */
};

/* Fills @p cfg with the defaults above. */
void dg_dht_ratelimit_config_default(struct dg_dht_ratelimit_config *cfg);

/* @param[in] rand_bytes  seeds the source hash (so that collisions cannot be planned).
 * @return 0, -EINVAL (max_sources 0 while per-source limiting is on, or a zero window or
 *         rate) or -ENOMEM. */
int dg_dht_ratelimit_new(const struct dg_dht_ratelimit_config *cfg, dg_rand_bytes_fn rand_bytes,
                         void *rand_arg, uint64_t now_ms, struct dg_dht_ratelimit **out);

/* Frees @p rl (NULL allowed). */
void dg_dht_ratelimit_free(struct dg_dht_ratelimit *rl);

/* Accounts one incoming message from @p addr.
 * @return 1 to process it, 0 to drop it silently. */
int dg_dht_ratelimit_allow(struct dg_dht_ratelimit *rl, const struct sockaddr *addr,
                           uint64_t now_ms);

void dg_dht_ratelimit_stats(const struct dg_dht_ratelimit *rl, struct dg_dht_ratelimit_stats *st);

#endif
