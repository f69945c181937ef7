/* The relay (docs/PROTOCOL.md section 7): when two nodes cannot reach each other (both behind
 * hard NATs, or punching failed), a third node that both can reach splices two TCP streams,
 * one from each. The peer wire runs end to end inside, so the data is verified against the
 * root as on any other connection; the relay sees the bytes but cannot change them unnoticed.
 *
 * A relay listens on a TCP port of its own (any free port; it is told to both ends by the
 * rendezvous, engine/holepunch.h). Each end connects and first sends a preamble:
 *
 *   offset 0  8 bytes  "dgrelay1"
 *   offset 8  1 byte   role: 1 = the initiator, 2 = the responder
 *   offset 9  16 bytes the session nonce the rendezvous gave both ends
 *
 * The relay accepts only nonces registered with dg_relay_expect() in the last
 * DG_RELAY_PAIR_TIMEOUT_MS, and one connection per role per nonce. Once both ends are there it
 * copies bytes both ways (what an end sent after its preamble, before the other arrived, is
 * kept, at most DG_RELAY_EARLY_MAX bytes). It sends nothing of its own: an end learns that the
 * relay failed when its connection closes. When either end closes, or a stream moves no byte
 * for DG_RELAY_IDLE_MS, both are closed. Each stream is limited to cfg.rate bytes per second
 * in each direction (reading pauses), and cfg.max_streams streams run at once; a stream of
 * more than DG_RELAY_PAIR_TIMEOUT_MS without its second end is dropped.
 *
 * Threads: the loop thread only. */
#ifndef DG_RELAY_H
#define DG_RELAY_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define DG_RELAY_MAGIC "dgrelay1"
#define DG_RELAY_PREAMBLE_LEN 25
#define DG_RELAY_NONCE_LEN 16
#define DG_RELAY_ROLE_INITIATOR 1
#define DG_RELAY_ROLE_RESPONDER 2
#define DG_RELAY_PAIR_TIMEOUT_MS 10000u
#define DG_RELAY_IDLE_MS 300000u
#define DG_RELAY_EARLY_MAX (64u << 10)

struct dg_relay_config {
    uint16_t port;      /* TCP port to listen on (0: any free one) */
    size_t max_streams; /* relayed streams at once (pairs, waiting ones included) */
    uint64_t rate;      /* bytes per second per stream and direction; 0: no limit */
};

struct dg_relay_stats {
    size_t streams;         /* streams relaying now (both ends there) */
    size_t waiting;         /* registered nonces whose ends have not both arrived */
    uint64_t streams_total; /* streams that got both ends */
    uint64_t bytes;         /* bytes copied, both directions */
    uint64_t refused;       /* connections refused: bad preamble, unknown nonce, role taken */
    uint64_t expired;       /* nonces that never got both ends in time */
    size_t buffered;        /* bytes held now: early bytes, and writes not yet done */
};

struct dg_relay; /* opaque */

/* Writes the preamble an end sends first. */
void dg_relay_preamble(int role, const uint8_t nonce[DG_RELAY_NONCE_LEN],
                       uint8_t out[DG_RELAY_PREAMBLE_LEN]);

/* Starts listening on 0.0.0.0:cfg->port. @return 0, -EINVAL (max_streams 0), -ENOMEM, or the
 * bind/listen error. */
int dg_relay_start(uv_loop_t *loop, const struct dg_relay_config *cfg, struct dg_relay **out);

/* The TCP port listened on. */
uint16_t dg_relay_port(const struct dg_relay *r);

/* Registers @p nonce for one stream (the rendezvous does this before telling both ends).
 * @return 0, -EBUSY (max_streams reached), -EEXIST (registered already), -ENOMEM. */
int dg_relay_expect(struct dg_relay *r, const uint8_t nonce[DG_RELAY_NONCE_LEN]);

void dg_relay_get_stats(const struct dg_relay *r, struct dg_relay_stats *out);

/* For tests: replaces DG_RELAY_PAIR_TIMEOUT_MS and DG_RELAY_IDLE_MS for this relay (0 keeps
 * the default). The pair timeout also bounds how long a connection may take to send its
 * preamble. Applies to the deadlines checked from now on. */
void dg_relay_set_timeouts_for_test(struct dg_relay *r, uint64_t pair_ms, uint64_t idle_ms);

/* Closes the listener and every stream; @p closed (may be NULL) runs once everything is
 * closed, and the relay is freed after it returns. NULL @p r is allowed. */
void dg_relay_stop(struct dg_relay *r, void (*closed)(void *arg), void *arg);

#endif
