/* Hole punching through a rendezvous (docs/PROTOCOL.md section 6): small datagrams on the
 * node's UDP port (the one the DHT and uTP use) that let two nodes behind NATs open a path to
 * each other, and fall back to a relay when they cannot.
 *
 * Three roles, all in one struct dg_hp, since every node can play each:
 *   - the initiator B wants to reach peer A, whose address it got from DHT node D (D returned
 *     A in a get_peers reply: A announced to D, and keeps its NAT mapping towards D open);
 *   - the rendezvous D forwards B's request to A, but only if A announced the key to it
 *     (ops->announced), so that D cannot be used to send datagrams to anyone else, only once
 *     B has shown that it receives at its source address (the cookie), and only
 *     DG_HP_RATE_MAX requests per source IP per 10 s, DG_HP_MAX_SESSIONS at once;
 *   - the responder A answers D and starts punching towards B.
 *
 * Exchange (every message starts with the 4 bytes DG_HP_MAGIC and carries B's 16-byte nonce):
 *   B -> D  CONNECT      key, A's address, B's NAT class, mode (punch or relay), cookie
 *   D -> B  COOKIE       the cookie B must repeat (when the CONNECT had none, or a stale one)
 *   D -> A  PUNCH        key, B's address as D sees it, B's NAT class, mode, relay port
 *   A -> D  PUNCH_ACK    A's NAT class (or PUNCH_REJECT with a reason: refused or busy)
 *   D -> B  CONNECT_ACK  A's address as D sees it, A's NAT class, mode, relay port
 *        or CONNECT_REJECT with a reason (A unknown to D, A refused or silent, busy, no relay)
 *   A <-> B PROBE        the sender's NAT class; flag "reply" when answering a probe
 * The cookie is a keyed hash of B's address and nonce: without it anyone could make D, and
 * through D, A, send datagrams (PUNCH, then thousands of probes) to a forged source address.
 * No message D sends is longer than the one it answers, except the PUNCH to A, which goes
 * only to an announced address.
 *
 * Punching, by NAT class (see enum dg_nat_class):
 *   - either side NONE, or both EASY: each side sends a PROBE to the other's address every
 *     DG_HP_PROBE_INTERVAL_MS; the first probe that gets through opens the path.
 *   - one EASY, one HARD (the birthday technique): the hard side opens DG_HP_BIRTHDAY_SOCKETS
 *     extra UDP sockets (ops->open_paths) and sends a PROBE from each (and from the main
 *     socket) to the easy side's address, again every DG_HP_RESEND_MS, so that its NAT holds
 *     that many mappings; the easy side sends PROBEs to random, never repeated ports of the
 *     hard side's IP (1024..65535), one every DG_HP_SPRAY_INTERVAL_MS (up to DG_HP_SPRAY_BURST
 *     at once when the timer ran late), at most DG_HP_SPRAY_MAX, besides a PROBE to the
 *     known address every DG_HP_PROBE_INTERVAL_MS. With 257 mappings, 2400 distinct ports hit
 *     one with probability about 1 - (1 - 257/64512)^2400, 99.99%.
 *   - both HARD: no punching; B fails with DG_HP_FAIL_BOTH_HARD and may ask D again with mode
 *     relay.
 *   - UNKNOWN is treated as EASY.
 * Whoever receives a PROBE that is not a reply answers it (flag reply) from the socket it came
 * in on. A session succeeds when a PROBE, reply or not, with its nonce arrives from the peer's
 * IP (any port) on the main socket or one of the session's own extra sockets: ops->punched
 * (path, from) tells the engine at B to open a uTP connection to that address on that path,
 * and at A to expect B's SYN there (it accepts uTP connections anyway). B also takes a PROBE
 * that overtakes D's CONNECT_ACK. The extra sockets not used are closed (ops->close_path); the
 * one used belongs to the engine from then on. For DG_HP_LINGER_MS after success a small record
 * keeps answering PROBEs with that nonce (the peer may still wait for its first answer) and
 * repeats the reply twice. A session that has not succeeded after DG_HP_PUNCH_TIMEOUT_MS fails
 * (ops->failed at B; A ends quietly). Every extra socket a failed or ended session opened is
 * closed.
 *
 * Relay mode: D registers the nonce with its relay (ops->relay_expect) and tells both sides
 * its relay's TCP port; ops->relay then makes each side connect there (engine/relay.h).
 *
 * Limits against abuse: a responder takes PUNCHes only for keys it serves (ops->serves) and,
 * if ops->rendezvous_ok is set, only from rendezvous it accepts (the nodes it announced the key
 * to); at most DG_HP_RATE_MAX PUNCHes per rendezvous IP per 10 s; at most DG_HP_MAX_BLIND of
 * its sessions spray or open birthday sockets at once (they send blindly: the peer's address
 * is only D's word). Rate limits count IPv6 sources by /64.
 *
 * Threads: one thread (the engine loop). Time, randomness and sending come from the caller,
 * so tests drive it over a simulated network. Callbacks may call dg_hp_connect (to retry in
 * relay mode from ops->failed, say), dg_hp_set_nat, dg_hp_sessions and dg_hp_get_stats; not
 * dg_hp_input, dg_hp_tick or dg_hp_free. */
#ifndef DG_HOLEPUNCH_H
#define DG_HOLEPUNCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define DG_HP_MAGIC "DGH1" /* first byte 'D': neither a DHT message ('d') nor uTP */
#define DG_HP_MAGIC_LEN 4
#define DG_HP_NONCE_LEN 16
#define DG_HP_COOKIE_LEN 8
#define DG_HP_MAX_MESSAGE 128
#define DG_HP_MAX_SESSIONS 64             /* sessions of each role at once */
#define DG_HP_MAX_BLIND 4                 /* responder sessions spraying or birthday at once */
#define DG_HP_RATE_MAX 10                 /* CONNECTs (PUNCHes) per source IP per 10 s */
#define DG_HP_RENDEZVOUS_TIMEOUT_MS 3000u /* D waits this long for A's PUNCH_ACK */
#define DG_HP_CONNECT_TIMEOUT_MS 5000u    /* B waits this long for D's answer */
#define DG_HP_RESEND_MS 1000u             /* CONNECT, PUNCH and birthday rounds are resent */
#define DG_HP_PROBE_INTERVAL_MS 200u
#define DG_HP_BIRTHDAY_SOCKETS 256
#define DG_HP_SPRAY_INTERVAL_MS 5u
#define DG_HP_SPRAY_BURST 20 /* sprayed probes in one tick at most */
#define DG_HP_SPRAY_MAX 2400
#define DG_HP_PUNCH_TIMEOUT_MS 15000u
#define DG_HP_LINGER_MS 5000u /* probes are still answered this long after success */

/* What we know of a NAT, in RFC 4787 terms, as several observers report our address. */
enum dg_nat_class {
    DG_NAT_UNKNOWN = 0, /* not enough observers yet */
    DG_NAT_NONE = 1,    /* reachable as is: a public address, or a port mapped on the router */
    DG_NAT_EASY = 2,    /* endpoint-independent mapping: one external port for every peer */
    DG_NAT_HARD = 3,    /* endpoint-dependent mapping: a new external port per destination */
};

/* "unknown", "none", "easy", "hard" ("?" for anything else). */
const char *dg_nat_class_name(enum dg_nat_class c);

enum dg_hp_mode {
    DG_HP_MODE_PUNCH = 1,
    DG_HP_MODE_RELAY = 2,
};

/* Why a session failed (the argument of ops->failed; on the wire, the reason of a reject). */
enum dg_hp_failure {
    DG_HP_FAIL_NO_ANSWER = 1, /* the rendezvous did not answer */
    DG_HP_FAIL_UNKNOWN_PEER,  /* the rendezvous does not know the target for that key */
    DG_HP_FAIL_REFUSED,       /* the target refused (does not serve the key) or was silent */
    DG_HP_FAIL_BUSY,          /* the rendezvous or the target is full, or rate-limited us */
    DG_HP_FAIL_NO_RELAY,      /* relay asked for, and the rendezvous has none (or it is full) */
    DG_HP_FAIL_TIMEOUT,       /* punching went on for DG_HP_PUNCH_TIMEOUT_MS without a path */
    DG_HP_FAIL_BOTH_HARD,     /* both NATs are hard: punching is not tried (ask for a relay) */
};

/* ---- the messages (docs/PROTOCOL.md section 6 has the byte layout) ---- */

enum dg_hp_type {
    DG_HP_CONNECT = 1,
    DG_HP_COOKIE = 2,
    DG_HP_PUNCH = 3,
    DG_HP_PUNCH_ACK = 4,
    DG_HP_PUNCH_REJECT = 5,
    DG_HP_CONNECT_ACK = 6,
    DG_HP_CONNECT_REJECT = 7,
    DG_HP_PROBE = 8,
};

#define DG_HP_PROBE_REPLY 1 /* flags of a PROBE: it answers one */

/* One message, decoded. Fields a type does not carry are zero. */
struct dg_hp_msg {
    enum dg_hp_type type;
    uint8_t nonce[DG_HP_NONCE_LEN];
    uint8_t key[20];                  /* CONNECT, PUNCH */
    struct sockaddr_storage addr;     /* CONNECT: A; PUNCH: B as D saw it; CONNECT_ACK: A as D saw
                                         it. AF_INET or AF_INET6, port and IP never 0 */
    enum dg_nat_class nat;            /* CONNECT, PUNCH: B's; PUNCH_ACK, CONNECT_ACK: A's; PROBE:
                                         the sender's */
    enum dg_hp_mode mode;             /* CONNECT, PUNCH, CONNECT_ACK */
    uint16_t relay_port;              /* PUNCH, CONNECT_ACK: non-zero exactly in mode relay */
    enum dg_hp_failure reason;        /* CONNECT_REJECT: UNKNOWN_PEER, REFUSED, BUSY or NO_RELAY;
                                         PUNCH_REJECT: REFUSED or BUSY */
    uint8_t flags;                    /* PROBE: 0 or DG_HP_PROBE_REPLY */
    uint8_t cookie[DG_HP_COOKIE_LEN]; /* CONNECT (all zero: none yet), COOKIE */
};

/* Decodes one datagram; never reads past @p len, needs no terminator.
 * @return 0, or -EBADMSG: not our magic, an unknown type, a length other than the type's
 *         exact one, over DG_HP_MAX_MESSAGE, an address family byte other than 4 or 6, port 0,
 *         an unspecified, multicast or broadcast IP, or a field out of its range. */
int dg_hp_parse(const uint8_t *buf, size_t len, struct dg_hp_msg *out);

/* Encodes @p m into @p out (what dg_hp_parse() accepts, nothing else).
 * @return its length (at most DG_HP_MAX_MESSAGE), -EINVAL (a field dg_hp_parse() would
 *         refuse), or -ENOBUFS (@p cap too small). */
int dg_hp_format(const struct dg_hp_msg *m, uint8_t *out, size_t cap);

/* ---- the state machine ---- */

struct dg_hp; /* opaque */

/* What the engine supplies. Only send is required; NULL ops behave as described. */
struct dg_hp_ops {
    /* Sends one datagram on @p path (0: the main socket). Errors are ignored. A punched path
     * may still carry answers to late probes for DG_HP_LINGER_MS after ops->punched. */
    void (*send)(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to);
    /* Opens up to @p n extra UDP sockets for the birthday technique and writes their path
     * numbers (> 0, distinct, not in use elsewhere) to @p paths. @return how many were opened
     * (0 is allowed). NULL: none. */
    size_t (*open_paths)(void *arg, size_t n, int *paths);
    /* Closes an extra socket opened by open_paths that is no longer needed. */
    void (*close_path)(void *arg, int path);
    /* Rendezvous: whether @p peer announced @p key to us (our DHT peer store holds it).
     * NULL: we are nobody's rendezvous (CONNECTs are ignored). */
    int (*announced)(void *arg, const uint8_t key[20], const struct sockaddr *peer);
    /* Responder: whether we serve @p key (a root we share or hold whose first 20 bytes it
     * is). NULL: we serve nothing. */
    int (*serves)(void *arg, const uint8_t key[20]);
    /* Rendezvous: registers @p nonce with our relay, for one relayed stream.
     * @return our relay's TCP port, or 0 (relay off or full). May be NULL (no relay). */
    uint16_t (*relay_expect)(void *arg, const uint8_t nonce[DG_HP_NONCE_LEN]);
    /* A path is open to @p peer on @p path. @p initiator 1 at B (connect uTP there now), 0 at
     * A. @p path is the engine's from now on (an extra socket stays open). */
    void (*punched)(void *arg, const uint8_t key[20], int initiator, int path,
                    const struct sockaddr *peer);
    /* Relay mode: connect by TCP to @p relay (the rendezvous's address, with the relay port)
     * and send the relay preamble with @p nonce; @p initiator as in punched. @p peer: the other
     * end (at B the target; at A, B's address as the rendezvous saw it). */
    void (*relay)(void *arg, const uint8_t key[20], int initiator, const struct sockaddr *relay,
                  const struct sockaddr *peer, const uint8_t nonce[DG_HP_NONCE_LEN]);
    /* Initiator only: session @p target for @p key failed. */
    void (*failed)(void *arg, const uint8_t key[20], const struct sockaddr *target,
                   enum dg_hp_failure why);
    /* Rendezvous, optional: the UDP address @p peer's announce of @p key came from, written
     * to @p out (@return 1), where its NAT mapping towards us leads. The announced port is
     * the TCP port; behind a hard NAT the mapping has another one, and a PUNCH sent to the
     * announced port is lost. An address with another IP than @p peer is not used. NULL or
     * 0: the PUNCH goes to @p peer. */
    int (*announced_from)(void *arg, const uint8_t key[20], const struct sockaddr *peer,
                          struct sockaddr_storage *out);
    /* Responder, optional: whether we take PUNCHes for @p key from @p rendezvous (best: only
     * from the nodes we announced @p key to; anyone else could make us probe any address).
     * NULL: from anyone. */
    int (*rendezvous_ok)(void *arg, const uint8_t key[20], const struct sockaddr *rendezvous);
};

struct dg_hp_stats {
    uint64_t connects;  /* sessions started here as the initiator */
    uint64_t punched;   /* initiator sessions that opened a path */
    uint64_t relayed;   /* initiator sessions handed to a relay */
    uint64_t failed;    /* initiator sessions that failed */
    uint64_t forwarded; /* CONNECTs forwarded as a rendezvous */
    uint64_t refused;   /* CONNECTs refused as a rendezvous (unknown target, rate, full, relay) */
    uint64_t cookies;   /* COOKIEs sent as a rendezvous (CONNECTs without a valid cookie) */
    uint64_t answered;  /* PUNCHes answered with PUNCH_ACK as the responder (resends not) */
    uint64_t rejected;  /* PUNCHes answered with PUNCH_REJECT as the responder */
    uint64_t responder_punched; /* responder sessions that opened a path */
    uint64_t probes_sent, probes_received;
    uint64_t sprayed;   /* of probes_sent: to guessed ports */
    uint64_t malformed; /* datagrams with our magic that did not parse */
    uint64_t ignored;   /* messages for no session of ours, or from the wrong address or path */
};

/* Whether a datagram starts with DG_HP_MAGIC (the caller's demultiplexing test). */
int dg_hp_is_packet(const uint8_t *buf, size_t len);

/* Makes the context. @p ops and @p arg are kept; @p seed seeds nonces, cookies and spray ports
 * through a keyed hash (use real randomness outside tests: nonces must not be guessable).
 * @return 0, -EINVAL (no ops or no ops->send) or -ENOMEM. */
int dg_hp_new(const struct dg_hp_ops *ops, void *arg, uint64_t seed, struct dg_hp **out);

/* Frees everything at once: no callbacks, nothing sent; extra paths still held by sessions
 * are closed through ops->close_path. NULL is allowed. Not from a callback. */
void dg_hp_free(struct dg_hp *hp);

/* Our NAT class, as the engine has learned it; sent in CONNECT, PUNCH_ACK and PROBE. Sessions
 * keep the class they started with. */
void dg_hp_set_nat(struct dg_hp *hp, enum dg_nat_class c);

/* Initiator: asks rendezvous @p via to bring @p target (serving @p key) to us, by @p mode.
 * Call dg_hp_tick afterwards to learn when to run next.
 * @return 0 (ops->punched, ops->relay or ops->failed follows, never before this returns),
 * -EALREADY (a session with that target runs), -EAGAIN (DG_HP_MAX_SESSIONS running), -EINVAL
 * (not IPv4/IPv6, families differ, port or IP 0, bad mode). */
int dg_hp_connect(struct dg_hp *hp, const uint8_t key[20], const struct sockaddr *target,
                  const struct sockaddr *via, enum dg_hp_mode mode, uint64_t now_ms);

/* Starts punching towards @p peer at once, without a rendezvous exchange: both sides got
 * @p nonce and each other's address and NAT class from a peer connected to both (the peer
 * wire's holepunch message, docs/PROTOCOL.md section 3.9, in the spirit of BEP 55). The session
 * then runs as one started by a rendezvous: ops->punched on success (@p initiator 1: B, which
 * opens the uTP connection), ops->failed (TIMEOUT) at B after DG_HP_PUNCH_TIMEOUT_MS.
 * @return 0; -EPERM (both NATs hard: ask for a relay instead); -EALREADY (a session with
 * that peer or nonce runs); -EAGAIN (no free session, or the responder's blind sessions are
 * at DG_HP_MAX_BLIND); -EINVAL. */
int dg_hp_punch(struct dg_hp *hp, const uint8_t key[20], const uint8_t nonce[DG_HP_NONCE_LEN],
                const struct sockaddr *peer, enum dg_nat_class peer_nat, int initiator,
                uint64_t now_ms);

/* Takes one datagram that came in on @p path from @p from. Call dg_hp_tick afterwards: a new
 * session may want to run sooner than the timer the last tick asked for.
 * @return 1 if it had our magic (consumed, even if malformed), 0 if not. */
int dg_hp_input(struct dg_hp *hp, int path, const uint8_t *buf, size_t len,
                const struct sockaddr *from, uint64_t now_ms);

/* Runs timers: probes, sprays, resends, timeouts; nothing that is not due, so it may be called
 * at any time. @return ms until it wants to run again: 1..1000, at most DG_HP_SPRAY_INTERVAL_MS
 * while spraying. */
uint64_t dg_hp_tick(struct dg_hp *hp, uint64_t now_ms);

/* Sessions running, all three roles together (lingering records of finished ones not
 * counted). */
size_t dg_hp_sessions(const struct dg_hp *hp);

void dg_hp_get_stats(const struct dg_hp *hp, struct dg_hp_stats *out);

#endif
