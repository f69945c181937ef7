/* The DHT on the network: one engine/dht.c node (IPv4, BEP 5) on a real UDP socket, driven by
 * a libuv loop (the engine's loop thread).
 *
 * What the service adds to the pure-logic node:
 *   - the socket: bound to 0.0.0.0:port with uv_udp; every datagram received goes to the node
 *     (one fixed 2 KiB receive buffer; longer datagrams are dropped), except those that are not
 *     bencoded dictionaries (first byte not 'd'): they go to the "other" handler
 *     (dg_dht_service_set_other_handler()), so that a UDP transport can share the port.
 *     Datagrams are sent with uv_udp_try_send(); one that cannot be sent at once is dropped
 *     (the node counts it in send_failed and treats it as lost).
 *   - the clock (uv_now() of the loop, in milliseconds) and randomness (OpenSSL RAND_bytes).
 *   - one timer that runs dg_dht_tick() when the node asks for it; after every datagram,
 *     lookup or bootstrap it is brought forward to at most DG_DHT_QUERY_TIMEOUT_MS.
 *   - bootstrap: each HOST:PORT of the configured list is resolved in turn (uv_getaddrinfo,
 *     IPv4; one at a time, so that a slow name server ties up one thread of libuv's pool, not
 *     all of them) and every address it yields gets a find_node (dg_dht_bootstrap()). The
 *     list is resolved again every DG_DHT_SERVICE_BOOTSTRAP_RETRY_MS while the table holds
 *     fewer than DG_DHT_SERVICE_GOOD_ENOUGH good nodes.
 *   - the saved routing table (state_path, format of dg_dht_table_save()): read at start, so
 *     that the node keeps its id and starts from the nodes it knew; written at stop and every
 *     DG_DHT_SERVICE_SAVE_MS (a temporary file, fsync, rename: a crash leaves the old or the
 *     new file, never a torn one). A missing file is normal; an unreadable or damaged one is
 *     logged and ignored (the node starts with a new id and an empty table), never fatal.
 *     Saving is a short synchronous write on the loop thread (at most DG_DHT_SAVE_MAX bytes).
 *
 * Node id: the saved id if there is a valid state file, else a random one. A BEP 42-valid id
 * cannot be made at start: it depends on our public address, which is only learned from the
 * "ip" votes of other nodes (dg_dht_service_external()). Public nodes that enforce BEP 42 may
 * therefore not keep us in their tables; they still answer our queries.
 *
 * Loopback lab rule: if every configured bootstrap address is a loopback literal (IPv4
 * 127.0.0.0/8, or [::1]), or there is no bootstrap at all ("none"/NULL), the node's table is
 * created with DG_DHT_TABLE_SAME_IP | DG_DHT_TABLE_NO_BEP42: many nodes of one test share
 * 127.0.0.1 and have random ids. Otherwise (any host name, "default", any other address) the
 * table enforces BEP 42 and one entry per IP. The rule is decided from the configured strings
 * at start: a host name never counts as loopback, even "localhost".
 *
 * The node speaks IPv4 only for now: an IPv6 bootstrap entry is accepted by the syntax but
 * skipped (logged).
 *
 * Threads: dg_dht_service_parse_bootstrap() is reentrant (any thread). Every other function
 * runs on the thread of the loop given to dg_dht_service_start(), as do all callbacks. */
#ifndef DG_DHT_SERVICE_H
#define DG_DHT_SERVICE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "engine/dht.h"

#define DG_DHT_DEFAULT_BOOTSTRAP                                                       \
    "router.bittorrent.com:6881+dht.transmissionbt.com:6881+router.utorrent.com:6881+" \
    "dht.libtorrent.org:25401"

#define DG_DHT_SERVICE_MAX_BOOTSTRAP 16                /* entries in a bootstrap string */
#define DG_DHT_SERVICE_BOOTSTRAP_RETRY_MS (60u * 1000) /* resolve again while thin */
#define DG_DHT_SERVICE_GOOD_ENOUGH 8                   /* good nodes that end the retries */
#define DG_DHT_SERVICE_SAVE_MS (10u * 60 * 1000)       /* periodic save of the table */
/* Longest datagram received (bittorrent-dht nodes answer with their whole table: KiBs). */
#define DG_DHT_SERVICE_RECV_MAX 65536
/* Socket buffers asked for (the socket carries uTP too). */
#define DG_DHT_SERVICE_SOCKET_BUFFER (4 << 20)

struct dg_dht_service_config {
    uint16_t port; /* UDP port to bind on 0.0.0.0 (0: the kernel picks one) */
    /* "HOST:PORT[+HOST:PORT...]", "none" or NULL (no bootstrap); "default" stands for
     * DG_DHT_DEFAULT_BOOTSTRAP (the public routers). */
    const char *bootstrap;
    /* File holding the saved routing table (and thus our id); NULL: nothing is saved. Its
     * directory must exist; the temporary file is "<state_path>.tmp". */
    const char *state_path;
    /* Announce with implied_port (see struct dg_dht_config): the engine does, because its UDP
     * and TCP ports are the same number, and a node that stores our announce must know the
     * port a NAT gives us towards it to pass us hole punching requests. */
    int implied_port;
};

struct dg_dht_service; /* opaque */

/* Handler of datagrams that are not bencoded dictionaries (see the top of this file).
 * @p buf (@p len bytes, at least 1) and @p from (an AF_INET address) are valid only during
 * the call. It may call any dg_dht_service_* function, dg_dht_service_stop() included. */
typedef void (*dg_dht_service_other_fn)(void *arg, const uint8_t *buf, size_t len,
                                        const struct sockaddr *from);

/* Checks the syntax of a bootstrap string; nothing is resolved.
 * Accepted: "none"; "default"; or 1 to DG_DHT_SERVICE_MAX_BOOTSTRAP entries joined by '+',
 * each HOST:PORT where PORT is a decimal 1..65535 and HOST is a host name or IPv4 literal
 * (letters, digits, '-', '.', '_'; at most 253 characters) or an IPv6 literal in brackets
 * ("[::1]:6881").
 * @param[in] s  the string (NUL-terminated); NULL counts as "none".
 * @return 0, or -EINVAL (empty, an empty entry, no port, port 0 or over 65535, a bad host,
 *         too many entries). Reentrant. */
int dg_dht_service_parse_bootstrap(const char *s);

/* The routing table flags the loopback lab rule (top of this file) gives @p bootstrap.
 * @return DG_DHT_TABLE_SAME_IP | DG_DHT_TABLE_NO_BEP42 (no bootstrap, or loopback literals
 *         only), 0 (anything else), -EINVAL (bad syntax) or -ENOMEM. Reentrant. */
int dg_dht_service_table_flags(const char *bootstrap);

/* Creates the node and binds its socket, then starts bootstrapping in the background.
 * @param[in]  loop  the loop that will own the service (the engine's loop).
 * @param[in]  cfg   copied (the strings too).
 * @param[out] out   the service, to end with dg_dht_service_stop().
 * @return 0; -EINVAL (bad bootstrap string); -ENOMEM; the -errno of the bind (-EADDRINUSE,
 *         -EACCES, ...). On failure no callback follows, but memory is released in a close
 *         callback: run the loop afterwards as usual. */
int dg_dht_service_start(uv_loop_t *loop, const struct dg_dht_service_config *cfg,
                         struct dg_dht_service **out);

/* @return the UDP port the socket is bound to (the kernel's pick if the config said 0). */
uint16_t dg_dht_service_port(const struct dg_dht_service *s);

/* @return our node id (DG_NODE_ID_LEN bytes, valid as long as @p s). */
const uint8_t *dg_dht_service_id(const struct dg_dht_service *s);

/* Starts an iterative get_peers lookup of @p key (see dg_dht_get_peers()).
 * @param[in]  announce_port  0: only look; else announce_peer with this port (implied_port 0)
 *                            to the closest nodes once the lookup has ended.
 * @param[in]  cb             called exactly as a dg_dht_search_cb: with the new peers of each
 *                            reply (compact IPv4, 6 bytes each), then once with done = 1 (after
 *                            the announces); never after dg_dht_service_cancel() of the lookup
 *                            nor after dg_dht_service_stop(). The callback may call any
 *                            dg_dht_service_* function (stop included).
 * @param[out] search_id      may be NULL; the lookup's id for dg_dht_service_cancel().
 * @return 0; -EINVAL (cb or key NULL); -EAGAIN (DG_DHT_MAX_SEARCHES running); -ENOMEM;
 *         -ESHUTDOWN (stop was called). With an empty table the lookup ends (done = 1) within
 *         DG_DHT_QUERY_TIMEOUT_MS. */
int dg_dht_service_get_peers(struct dg_dht_service *s, const uint8_t key[DG_NODE_ID_LEN],
                             uint16_t announce_port, dg_dht_search_cb cb, void *arg,
                             uint32_t *search_id);

/* Ends lookup @p search_id at once, without a further callback. An id that is not running
 * (ended, cancelled, unknown) is ignored. */
void dg_dht_service_cancel(struct dg_dht_service *s, uint32_t search_id);

/* Fills @p st with the node's counters and table summary (see struct dg_dht_stats). */
void dg_dht_service_stats(const struct dg_dht_service *s, struct dg_dht_stats *st);

/* Our external address as other nodes report it (BEP 42 "ip" votes).
 * @param[out] out  an AF_INET address with the port they see, if learned.
 * @return 0, or -ENOENT until enough nodes agree. */
int dg_dht_service_external(const struct dg_dht_service *s, struct sockaddr_storage *out);

/* Sets (or with @p fn NULL, removes) the handler of non-DHT datagrams; without one they are
 * dropped. */
void dg_dht_service_set_other_handler(struct dg_dht_service *s, dg_dht_service_other_fn fn,
                                      void *arg);

/* Sends a datagram that is not the DHT's (uTP, hole punching) on the service's socket, at once
 * (uv_udp_try_send). @return 0, -ESHUTDOWN after stop, or a uv error (-EAGAIN when the socket
 * buffer is full: the caller treats it as a lost datagram). */
int dg_dht_service_send(struct dg_dht_service *s, const uint8_t *buf, size_t len,
                        const struct sockaddr *to);

/* See dg_dht_set_keepalive(): pings that keep our NAT's mappings towards the nodes holding
 * our announces open. 0: off. */
void dg_dht_service_set_keepalive(struct dg_dht_service *s, uint64_t interval_ms);

/* Whether @p node took one of our announces lately (see dg_dht_announced_to()). */
int dg_dht_service_announced_to(struct dg_dht_service *s, const struct sockaddr *node);

/* How our address looks to the nodes that reported it (see dg_dht_mapping()). */
void dg_dht_service_mapping(struct dg_dht_service *s, struct dg_dht_mapping *out);

/* Whether @p peer announced @p key to this node (see dg_dht_announced()). */
int dg_dht_service_announced(struct dg_dht_service *s, const uint8_t key[DG_NODE_ID_LEN],
                             const struct sockaddr *peer);

/* Stops the service: saves the table (if state_path), ends every lookup without a callback,
 * stops pending bootstrap resolutions and closes the socket and timers. Nothing is sent or
 * called back afterwards except @p closed, which runs on the loop once every handle is closed
 * and every resolution has returned; the service is freed right after @p closed returns.
 * Until then the accessors (port, id, stats, external) still work; get_peers fails with
 * -ESHUTDOWN. Call it once (later calls are ignored); NULL @p s is allowed. May be called
 * from any callback of the service.
 * @param[in] closed  may be NULL. */
void dg_dht_service_stop(struct dg_dht_service *s, void (*closed)(void *arg), void *arg);

#endif
