/* LAN discovery: BEP 14 "Local Service Discovery" messages on the IPv4 multicast group
 * 239.192.152.143:6771, used to find digfs peers on the same network without the DHT.
 *
 * A message (UDP, at most DG_LSD_MAX_MESSAGE bytes) is text in HTTP style:
 *
 *   BT-SEARCH * HTTP/1.1\r\n
 *   Host: 239.192.152.143:6771\r\n
 *   Port: <TCP listen port>\r\n
 *   Infohash: <40 hex digits>\r\n        (one or more; here a swarm key, root[0..20])
 *   cookie: <sender's random id>\r\n
 *   \r\n\r\n
 *
 * digfs sends one for a root it is looking for (when the lookup starts, then at most once a
 * minute while it lasts), and a holder that hears a key it holds answers with its own message
 * for that key (at most once per key every 10 s). Everyone who hears a message learns
 * "sender address, Port" as a peer of each key in it. A node ignores messages carrying its own
 * cookie (multicast loops back).
 *
 * Threads: the parser and formatter are reentrant; the service is engine-loop state. */
#ifndef DG_LSD_H
#define DG_LSD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#define DG_LSD_GROUP "239.192.152.143"
#define DG_LSD_PORT 6771
#define DG_LSD_MAX_MESSAGE 1400 /* fits one Ethernet frame */
#define DG_LSD_MAX_KEYS 16      /* Infohash lines in one message */
#define DG_LSD_COOKIE_LEN 16    /* hex digits of our cookie */

/* A parsed message. */
struct dg_lsd_message {
    uint16_t port;
    size_t nkeys;
    uint8_t keys[DG_LSD_MAX_KEYS][20];
    char cookie[64]; /* NUL-terminated; "" when absent */
};

/* Parses a datagram. Header names are case-insensitive, lines end in CRLF (a lone LF is
 * accepted), unknown headers are ignored, extra Infohash lines past DG_LSD_MAX_KEYS are
 * ignored.
 * @return 0; -EBADMSG if it is not a BT-SEARCH message, the port is missing or not 1..65535,
 *         there is no valid 40-hex Infohash, or it is longer than DG_LSD_MAX_MESSAGE. */
int dg_lsd_parse(const uint8_t *buf, size_t len, struct dg_lsd_message *out);

/* Writes a message for @p nkeys keys (1..DG_LSD_MAX_KEYS).
 * @return its length, -EINVAL, or -ENOBUFS if @p cap is too small. */
int dg_lsd_format(uint16_t port, const uint8_t (*keys)[20], size_t nkeys, const char *cookie,
                  char *out, size_t cap);

struct dg_lsd; /* opaque */

struct dg_lsd_config {
    uint16_t port; /* our TCP listen port (the Port header) */
    /* Someone at @p from (port = its Port header) has or wants @p key. */
    void (*found)(void *arg, const uint8_t key[20], const struct sockaddr_in *from);
    /* Whether we hold @p key (a root starting with it): we then answer searches for it. */
    int (*holds)(void *arg, const uint8_t key[20]);
    void *arg;
};

/* Joins the group on the default interface and listens.
 * @return 0 or a negative errno / uv error (no multicast route, for example). */
int dg_lsd_start(uv_loop_t *loop, const struct dg_lsd_config *cfg, struct dg_lsd **out);

/* Multicasts a search for @p key unless one went out less than a minute ago. */
void dg_lsd_search(struct dg_lsd *l, const uint8_t key[20]);

/* Messages sent and received, and datagrams dropped as malformed. */
void dg_lsd_counts(const struct dg_lsd *l, uint64_t *sent, uint64_t *received, uint64_t *malformed);

/* Closes the socket; the object is freed once libuv is done with it. NULL is allowed. */
void dg_lsd_stop(struct dg_lsd *l);

#endif
