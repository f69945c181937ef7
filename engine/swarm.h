/* The swarms of one node: every root it fetches or serves over the peer wire protocol
 * (docs/PROTOCOL.md section 3), the TCP listener, the peers, the piece picker and the
 * announce schedule.
 *
 * A swarm exists for a root while someone wants it (a lookup, a reader, a pin) or a peer
 * fetches it from us. It learns the root's metadata from peers (length from a hello, the piece
 * layer verified against the root, then the last piece's leaves and last block, so the size a
 * lookup reports is verified), then fetches blocks: first those readers wait for, then a
 * read-ahead window that grows for sequential readers, then, for pinned roots only, every
 * missing block rarest-first. Requests are spread over the peers that have the blocks, each
 * kept busy with a pipeline sized by its measured speed; a block a reader waits for that is
 * late is asked of a second peer (endgame). Every block is verified by the piece cache before
 * it is stored; a peer whose data fails verification is banned for the session.
 *
 * Serving: a node answers requests for blocks it holds (shared files and cache), choking with
 * tit-for-tat: every 10 s the 4 interested peers that gave us most (or, for a root we hold
 * completely, took most) are unchoked, plus one optimistic unchoke rotated every 30 s; while
 * fewer than 5 peers are unchoked, an interested peer is unchoked at once.
 *
 * Threads: everything here runs on the engine's loop thread. */
#ifndef DG_SWARM_H
#define DG_SWARM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "engine/dht_table.h"
#include "engine/piece_cache.h"

struct dg_content;
struct dg_utp;
struct dg_utp_sock;
struct dg_swarms; /* opaque */

#define DG_SWARM_MAX_PEERS 50     /* connected peers per swarm */
#define DG_SWARM_MAX_CONNECTING 8 /* connection attempts at once per swarm */
#define DG_SWARM_REQQ 250u        /* requests we accept outstanding from one peer */
#define DG_SWARM_REANNOUNCE_MS (15u * 60 * 1000)

/* What the swarms need from the engine. Every callback runs on the loop thread. */
struct dg_swarm_host {
    void *arg;
    /* Makes what the swarm wrote to the piece cache visible to its readers (commits the
     * engine's open write batch). */
    void (*commit)(void *arg);
    /* Opens the engine's write batch (if none is open): the updates that follow are committed
     * together within 50 ms, with one sync. */
    void (*batch)(void *arg);
    /* The disk is full while storing a block of @p root: evict what may be evicted (least
     * recently used roots, after dg_swarms_release_idle()). */
    void (*make_room)(void *arg, const uint8_t root[32]);
    /* Block @p block of @p root was stored (UINT64_MAX: blocks, or the metadata): reads
     * waiting for it can be answered. */
    void (*stored)(void *arg, const uint8_t root[32], uint64_t block);
    /* Opens @p root for serving (engine.h dg_engine_open). */
    int (*open)(void *arg, const uint8_t root[32], struct dg_content **out);
    /* DHT nodes known, or in the works (a bootstrap under way, or LAN discovery, counts as
     * one): 0 means a lookup has nobody to ask. NULL: none. */
    size_t (*dht_nodes)(void *arg);
    /* Calls @p fn for each byte range a reader waits for in @p root. */
    void (*each_wanted)(void *arg, const uint8_t root[32],
                        void (*fn)(void *ctx, uint64_t off, uint64_t len), void *ctx);
    /* Starts a DHT get_peers lookup of @p key (announcing @p announce_port when not 0); the
     * engine hands what it finds to dg_swarms_found(). NULL when there is no DHT.
     * @return 0; 1 when it started but the routing table is thin (an announce should be
     *         repeated soon); -EAGAIN when the table is empty; another -errno. */
    int (*dht_lookup)(void *arg, const uint8_t key[20], uint16_t announce_port);
    /* Asks the local network for @p key (LAN discovery; it rate-limits itself). NULL: none. */
    void (*lan_search)(void *arg, const uint8_t key[20]);
    /* Asks rendezvous @p via to bring @p target (a peer of @p key it gave us) to us: hole
     * punching, or with @p relay a relayed stream (engine/holepunch.h). The engine answers with
     * dg_swarms_punched(), dg_swarms_relayed() or dg_swarms_traverse_failed().
     * @return 0, or -errno if it cannot be tried. NULL: no NAT traversal. */
    int (*traverse)(void *arg, const uint8_t key[20], const struct sockaddr *target,
                    const struct sockaddr *via, int relay);
    /* A peer connected to both brought us together with @p peer (holepunch message, 3.9):
     * punch towards it with @p nonce (engine/holepunch.h dg_hp_punch); @p initiator: we open
     * the uTP connection (dg_swarms_punched() follows). @return 0 or -errno (-EPERM: both NATs
     * hard). NULL: no hole punching. */
    int (*punch)(void *arg, const uint8_t root[32], const uint8_t nonce[16],
                 const struct sockaddr *peer, int nat, int initiator);
    /* Our NAT class (enum dg_nat_class), told to peers in the hello. NULL: unknown. */
    int (*nat_class)(void *arg);
    /* A peer at @p reporter says it sees us at IP @p ip (its hello's `yourip`). NULL: ignored. */
    void (*observed)(void *arg, const struct sockaddr *ip, const struct sockaddr *reporter);
};

struct dg_swarms_config {
    uv_loop_t *loop;
    struct dg_piece_cache *cache;
    struct dg_swarm_host host;
    uint8_t node_id[20];        /* ours, named in handshakes */
    uint16_t port;              /* TCP port to listen on (0: any) */
    const char *peers;          /* "HOST:PORT[+HOST:PORT...]" added to every swarm, or NULL */
    uint32_t lookup_timeout_ms; /* a lookup of an unknown root fails after this */
    int announce_complete;      /* announce a root once the cache holds all of it */
    struct dg_utp *utp;         /* uTP on the node's UDP port (punched paths), or NULL */
    int prefer_utp;             /* direct connections over uTP instead of TCP */
};

struct dg_swarm_stats {
    uint64_t peers;      /* connected peers, all swarms */
    uint64_t swarms;     /* swarms active */
    uint64_t bytes_in;   /* peer wire bytes received */
    uint64_t bytes_out;  /* peer wire bytes sent */
    uint64_t blocks_in;  /* verified blocks stored */
    uint64_t blocks_out; /* blocks served */
    uint64_t banned;     /* addresses banned this session */
    uint64_t malformed;  /* connections closed for malformed or rule-breaking messages */
    uint64_t announces;  /* announces started */
    uint64_t traversals; /* NAT traversals asked of a rendezvous (punch or relay) */
    uint64_t rendezvous; /* holepunch asks we served as the peer connected to both (3.9) */
    uint64_t stalled;    /* connections dropped: silent 15 s while owing blocks or hashes */
    uint64_t replaced;   /* silent connections a new one from the same node replaced */
};

/* One swarm's numbers, for `digfs status`. */
struct dg_swarm_info {
    uint8_t root[32];
    uint64_t length; /* 0 while unknown */
    int known;       /* the metadata is verified */
    uint64_t blocks_total, blocks_held;
    uint64_t peers;
    /* Peers past the hello by transport (direct TCP, uTP, relayed), and how many of the uTP
     * ones came through a punched hole. */
    uint64_t peers_tcp, peers_utp, peers_relayed, peers_punched;
    uint64_t bytes_in, bytes_out;
};

/* Parses a "HOST:PORT[+HOST:PORT...]" list of numeric addresses (IPv4, or IPv6 in brackets).
 * @return the number of addresses (up to @p max written to @p out), or -EINVAL. */
int dg_swarms_parse_peers(const char *s, struct sockaddr_storage *out, size_t max);

/* Listens and starts the timers. @return 0, -EADDRINUSE, -EINVAL (bad peers list), -ENOMEM. */
int dg_swarms_start(const struct dg_swarms_config *cfg, struct dg_swarms **out);

/* The TCP port listened on. */
uint16_t dg_swarms_port(const struct dg_swarms *s);

/* Closes every connection and handle; @p closed runs on the loop once all are closed, and the
 * object is freed. Lookups waiting fail with -ESHUTDOWN first. */
void dg_swarms_stop(struct dg_swarms *s, void (*closed)(void *arg), void *arg);

/* Completion of a lookup: 0 once the root's length and piece layer are verified and stored in
 * the piece cache, -ENOENT when nothing was found in time, -EINTR (cancelled), -ESHUTDOWN. */
typedef void (*dg_swarms_lookup_cb)(void *arg, int status);

/* Looks up @p root in the swarm. @p cb runs exactly once (maybe before this returns, when the
 * cache knows the root already). @p token identifies it for dg_swarms_cancel_lookup(). */
void dg_swarms_lookup(struct dg_swarms *s, const uint8_t root[32], uint64_t token,
                      dg_swarms_lookup_cb cb, void *arg);

/* Cancels a lookup: its callback gets -EINTR. @return 1 if it was waiting, else 0. */
int dg_swarms_cancel_lookup(struct dg_swarms *s, uint64_t token);

/* A reader wants [off, off + len) of @p root (held or not: the read-ahead follows readers). */
void dg_swarms_read(struct dg_swarms *s, const uint8_t root[32], uint64_t off, uint64_t len);

/* Readers of @p root are waiting on blocks: fetch them now. */
void dg_swarms_want(struct dg_swarms *s, const uint8_t root[32]);

/* @p root was pinned or unpinned: pinned roots are fetched completely in the background. */
void dg_swarms_set_pinned(struct dg_swarms *s, const uint8_t root[32], int pinned);

/* Blocks of @p root were stored from outside the swarm (dg_engine_put_block). */
void dg_swarms_block_stored(struct dg_swarms *s, const uint8_t root[32], uint64_t block);

/* Peers the DHT found for @p key (compact IPv4/IPv6 addresses). @p via: the DHT node that
 * returned them (their rendezvous for NAT traversal), or NULL. */
void dg_swarms_found(struct dg_swarms *s, const uint8_t key[20], const struct dg_dht_compact *peers,
                     size_t n, const struct sockaddr *via);

/* NAT traversal results (see host.traverse). A hole to @p peer (the address the punch came
 * from) is open on UDP path @p path, for the candidate @p target (may be NULL: matched by IP):
 * a uTP connection is opened there. */
void dg_swarms_punched(struct dg_swarms *s, const uint8_t key[20], const struct sockaddr *target,
                       int path, const struct sockaddr *peer);

/* A relay is ready at @p relay for session @p nonce: connect there. @p initiator 1: we asked
 * (for the candidate at @p peer's IP); 0: the other end asked for us, and @p peer is its
 * address as the rendezvous saw it. */
void dg_swarms_relayed(struct dg_swarms *s, const uint8_t key[20], int initiator,
                       const struct sockaddr *peer, const struct sockaddr *relay,
                       const uint8_t nonce[16]);

/* The traversal of @p target failed; @p try_relay: punching cannot work or did not, so a
 * relay is asked for next. */
void dg_swarms_traverse_failed(struct dg_swarms *s, const uint8_t key[20],
                               const struct sockaddr *target, int try_relay);

/* A uTP connection the uTP module accepted (@p punched: on a hole-punching path). @return 0
 * (the connection owns the socket now), or -errno (the caller refuses the socket). */
int dg_swarms_accept_utp(struct dg_swarms *s, struct dg_utp_sock *sock, int punched);

/* Announces @p root on the DHT now and every DG_SWARM_REANNOUNCE_MS (a root we hold
 * completely), or stops announcing it (@p on 0). */
void dg_swarms_announce(struct dg_swarms *s, const uint8_t root[32], int on);

/* Drops the swarms nobody waits on (no reader waiting, no lookup, not pinned), except the one
 * of @p keep (may be NULL), so that their roots can be evicted. Their peers are disconnected.
 * @return how many were dropped. */
size_t dg_swarms_release_idle(struct dg_swarms *s, const uint8_t *keep);

/* Whether this node holds a root whose first 20 bytes are @p key (it can serve it). */
int dg_swarms_holds(struct dg_swarms *s, const uint8_t key[20]);

/* Totals. */
void dg_swarms_stats(const struct dg_swarms *s, struct dg_swarm_stats *out);

/* Up to @p max active swarms. @return how many were written. */
size_t dg_swarms_list(const struct dg_swarms *s, struct dg_swarm_info *out, size_t max);

#endif
