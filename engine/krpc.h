/* KRPC, the message format of the BitTorrent Mainline DHT: bencoded dicts over UDP (BEP 5),
 * with the IPv6 extensions of BEP 32 (`nodes6`, `want`), the `ip` field of BEP 42, the
 * read-only flag of BEP 43 (`ro`) and the get/put messages of BEP 44 (`k`, `sig`, `seq`,
 * `salt`, `cas`, and `v` as a value).
 *
 * Decoding is bounded, as the leading implementations do it: at most DG_KRPC_MAX_DEPTH nested
 * lists and dicts and DG_KRPC_MAX_TOKENS values per message; anything beyond is rejected, and
 * no message costs more than one pass over its bytes. The bencoding must be canonical (see
 * engine/bencode.h): in particular a message whose dict keys are not sorted is rejected.
 *
 * Parsed fields that are pointers (token, nodes, values, ...) point into the buffer that was
 * parsed and are valid only while that buffer is; fixed-size ids and the transaction id are
 * copied.
 *
 * Encoders write into a caller buffer and return the length or -ENOBUFS; keys come out sorted,
 * so every encoded message is canonical and parses back.
 *
 * Thread safety: every function is reentrant and keeps no state. */
#ifndef DG_KRPC_H
#define DG_KRPC_H

#include <stddef.h>
#include <stdint.h>

#define DG_KRPC_ID_LEN 20      /* node ids, info hashes, targets */
#define DG_KRPC_TID_MAX 16     /* longest transaction id accepted */
#define DG_KRPC_TOKEN_MAX 64   /* longest write token accepted (at least 1 byte) */
#define DG_KRPC_NODE_LEN 26    /* compact IPv4 node info: id, address, port */
#define DG_KRPC_NODE6_LEN 38   /* compact IPv6 node info */
#define DG_KRPC_PEER_LEN 6     /* compact IPv4 peer: address, port (network byte order) */
#define DG_KRPC_PEER6_LEN 18   /* compact IPv6 peer */
#define DG_KRPC_MAX_VALUES 100 /* peers kept from one `values` list (libtorrent's cap) */
#define DG_KRPC_MAX_DEPTH 10   /* most lists and dicts open at once, the message included */
#define DG_KRPC_MAX_TOKENS 500 /* most bencoded values in one message */
#define DG_KRPC_KEY_LEN 32     /* BEP 44 ed25519 public key */
#define DG_KRPC_SIG_LEN 64     /* BEP 44 ed25519 signature */
#define DG_KRPC_SALT_MAX 64    /* BEP 44 longest salt */

/* Error codes (BEP 5, BEP 44). */
#define DG_KRPC_ERR_GENERIC 201
#define DG_KRPC_ERR_SERVER 202
#define DG_KRPC_ERR_PROTOCOL 203
#define DG_KRPC_ERR_METHOD 204
#define DG_KRPC_ERR_VALUE_TOO_BIG 205
#define DG_KRPC_ERR_BAD_SIGNATURE 206
#define DG_KRPC_ERR_SALT_TOO_BIG 207
#define DG_KRPC_ERR_CAS_MISMATCH 301
#define DG_KRPC_ERR_SEQ_TOO_LOW 302

/* BEP 32 `want` flags. */
#define DG_KRPC_WANT_N4 0x1u
#define DG_KRPC_WANT_N6 0x2u

enum dg_krpc_type {
    DG_KRPC_INVALID = 0, /* not (yet) known: see dg_krpc_parse() */
    DG_KRPC_QUERY,       /* "y": "q" */
    DG_KRPC_RESPONSE,    /* "y": "r" */
    DG_KRPC_ERROR,       /* "y": "e" */
};

enum dg_krpc_method {
    DG_KRPC_NONE = 0, /* not a query */
    DG_KRPC_PING,
    DG_KRPC_FIND_NODE,
    DG_KRPC_GET_PEERS,
    DG_KRPC_ANNOUNCE_PEER,
    DG_KRPC_GET, /* BEP 44 */
    DG_KRPC_PUT, /* BEP 44 */
    DG_KRPC_UNKNOWN,
};

/* Bits of dg_krpc_msg.has: which optional fields the message carried. */
#define DG_KRPC_HAS_ID (1u << 0)
#define DG_KRPC_HAS_TARGET (1u << 1)
#define DG_KRPC_HAS_INFO_HASH (1u << 2)
#define DG_KRPC_HAS_TOKEN (1u << 3)
#define DG_KRPC_HAS_PORT (1u << 4)
#define DG_KRPC_HAS_IMPLIED_PORT (1u << 5)
#define DG_KRPC_HAS_WANT (1u << 6)
#define DG_KRPC_HAS_NODES (1u << 7)
#define DG_KRPC_HAS_NODES6 (1u << 8)
#define DG_KRPC_HAS_VALUES (1u << 9)
#define DG_KRPC_HAS_IP (1u << 10)
#define DG_KRPC_HAS_VERSION (1u << 11)
#define DG_KRPC_HAS_RO (1u << 12)
#define DG_KRPC_HAS_VALUE (1u << 13) /* BEP 44 `v` inside "a" or "r" */
#define DG_KRPC_HAS_KEY (1u << 14)
#define DG_KRPC_HAS_SIG (1u << 15)
#define DG_KRPC_HAS_SEQ (1u << 16)
#define DG_KRPC_HAS_SALT (1u << 17)
#define DG_KRPC_HAS_CAS (1u << 18)

/* A compact peer address: 6 bytes (IPv4) or 18 (IPv6), address then port, big-endian. */
struct dg_krpc_peer {
    const uint8_t *addr;
    size_t len;
};

/* A decoded message. Fields not carried by the message are zero (test `has`). */
struct dg_krpc_msg {
    enum dg_krpc_type type;
    enum dg_krpc_method method; /* DG_KRPC_NONE unless type is DG_KRPC_QUERY */
    uint8_t tid[DG_KRPC_TID_MAX];
    size_t tid_len;      /* 1..DG_KRPC_TID_MAX */
    unsigned has;        /* DG_KRPC_HAS_* */
    const uint8_t *name; /* the query's "q" as sent (for logs), name_len bytes */
    size_t name_len;

    /* Top level. */
    const uint8_t *version; /* "v": client version, any length (usually 4 bytes) */
    size_t version_len;
    const uint8_t *ip; /* BEP 42 "ip": our address as the sender sees it, 6 or 18 bytes; a
                        * wrong-sized "ip" is ignored, not an error */
    size_t ip_len;
    int read_only; /* BEP 43 "ro": 1 when non-zero */

    /* From "a" (queries) or "r" (responses). For a query of an unknown method only `id` is
     * read, so that it can still be answered with error 204. */
    uint8_t id[DG_KRPC_ID_LEN]; /* sender's node id: always present in queries, responses */
    uint8_t target[DG_KRPC_ID_LEN];
    uint8_t info_hash[DG_KRPC_ID_LEN];
    const uint8_t *token;
    size_t token_len; /* 1..DG_KRPC_TOKEN_MAX */
    uint16_t port;
    int implied_port;     /* 1 when "implied_port" is non-zero */
    unsigned want;        /* DG_KRPC_WANT_*; other strings in "want" are ignored (BEP 32) */
    const uint8_t *nodes; /* nnodes compact node infos of DG_KRPC_NODE_LEN bytes */
    size_t nnodes;
    const uint8_t *nodes6; /* nnodes6 entries of DG_KRPC_NODE6_LEN bytes */
    size_t nnodes6;
    struct dg_krpc_peer values[DG_KRPC_MAX_VALUES]; /* "values", in order, nvalues of them */
    size_t nvalues;
    size_t values_skipped; /* entries of "values" not a 6- or 18-byte string */
    size_t values_dropped; /* well-formed entries beyond DG_KRPC_MAX_VALUES */

    /* BEP 44. */
    const uint8_t *value; /* "v" inside "a"/"r": the whole bencoded value, verbatim */
    size_t value_len;
    uint8_t key[DG_KRPC_KEY_LEN]; /* "k" */
    uint8_t sig[DG_KRPC_SIG_LEN]; /* "sig" */
    int64_t seq;
    const uint8_t *salt;
    size_t salt_len; /* 0..DG_KRPC_SALT_MAX */
    int64_t cas;

    /* Errors ("e": [code, message]). */
    int64_t error_code;
    const uint8_t *error_msg;
    size_t error_msg_len;
};

/* Decodes one KRPC message (one UDP payload), with at most DG_KRPC_MAX_DEPTH levels of nesting
 * and DG_KRPC_MAX_TOKENS bencoded values. Unknown keys are ignored; a known key with the wrong
 * type or size makes the message malformed. Required: "t" (1..16 bytes) and "y" ("q", "r" or
 * "e"); for a query "q" (a string) and an "a" dict with a 20-byte "id"; for a response an "r"
 * dict with a 20-byte "id"; for an error an "e" list starting with an integer and a string.
 * Checked when present: target, info_hash (20 bytes), token (1..64), port (0..65535), nodes
 * (a multiple of 26 bytes), nodes6 (of 38), want and values (lists), k (32), sig (64), salt
 * (0..64), seq and cas (integers). At most DG_KRPC_MAX_VALUES peers of "values" are kept.
 * Which arguments a method needs is checked by dg_krpc_check_query(), not here.
 * Uses about 24 KiB of stack.
 * @param[in]  buf  the message; pointers in @p out point into it (valid only while it is).
 * @param[out] out  the message. On -EBADMSG, if the envelope was readable, out->type is
 *                  DG_KRPC_QUERY and out->tid is set for a query (so the caller may answer
 *                  with error 203); every other field is then unspecified.
 * @return 0 or -EBADMSG (malformed bencoding, a limit exceeded, a field missing or wrong). */
int dg_krpc_parse(const uint8_t *buf, size_t len, struct dg_krpc_msg *out);

/* Checks that a parsed query carries the arguments its method needs: find_node and get a
 * "target"; get_peers an "info_hash"; announce_peer an "info_hash", a "token" and a "port"
 * (1..65535) unless "implied_port" is set; put a "v" and a "token", and for a mutable item
 * "k", "sig" and "seq" together ("salt" and "cas" only with them). ping needs nothing.
 * @return 0; -EBADMSG if an argument is missing (answer with error 203); -ENOSYS for an
 *         unknown method (answer with error 204); -EINVAL if @p m is not a query. */
int dg_krpc_check_query(const struct dg_krpc_msg *m);

/* The envelope written in every message. */
struct dg_krpc_hdr {
    const uint8_t *tid; /* transaction id, 1..DG_KRPC_TID_MAX bytes */
    size_t tid_len;
    const uint8_t *version; /* "v" (client version), or NULL for none */
    size_t version_len;
    const uint8_t *ip; /* BEP 42 "ip": the receiver's address as we see it (6 or 18 bytes),
                        * for responses; NULL for none */
    size_t ip_len;
};

/* Common to all encoders below:
 * @param[out] buf  where the message goes, @p cap bytes.
 * @param[in]  h    transaction id, optional version and optional ip.
 * @param[in]  id   our 20-byte node id.
 * @return the message length; -ENOBUFS if it does not fit in @p cap bytes; -EINVAL for an
 *         argument out of range (transaction id not 1..16 bytes, ip not 6 or 18 bytes, token
 *         not 1..64 bytes, want not a combination of DG_KRPC_WANT_*, a values entry not 6 or
 *         18 bytes, more than DG_KRPC_MAX_VALUES values, a NULL pointer with a count). */

/* Query {"id"} with "q": "ping". */
int dg_krpc_encode_ping(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                        const uint8_t id[DG_KRPC_ID_LEN]);

/* Query "find_node" {"id", "target", "want" (written only if @p want is non-zero)}. */
int dg_krpc_encode_find_node(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                             const uint8_t id[DG_KRPC_ID_LEN], const uint8_t target[DG_KRPC_ID_LEN],
                             unsigned want);

/* Query "get_peers" {"id", "info_hash", "want" (only if non-zero)}. */
int dg_krpc_encode_get_peers(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                             const uint8_t id[DG_KRPC_ID_LEN],
                             const uint8_t info_hash[DG_KRPC_ID_LEN], unsigned want);

/* Query "announce_peer" {"id", "implied_port" (written as 1 only if @p implied_port is
 * non-zero), "info_hash", "port", "token"}. */
int dg_krpc_encode_announce_peer(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                 const uint8_t id[DG_KRPC_ID_LEN],
                                 const uint8_t info_hash[DG_KRPC_ID_LEN], uint16_t port,
                                 int implied_port, const uint8_t *token, size_t token_len);

/* Response {"id"}: the answer to ping, announce_peer and put. */
int dg_krpc_encode_ping_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                 const uint8_t id[DG_KRPC_ID_LEN]);

/* Response to find_node {"id", "nodes", "nodes6"}: @p nnodes entries of 26 bytes at @p nodes
 * and @p nnodes6 of 38 bytes at @p nodes6; a NULL pointer leaves its key out (an empty
 * non-NULL one writes an empty string). */
int dg_krpc_encode_find_node_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                      const uint8_t id[DG_KRPC_ID_LEN], const uint8_t *nodes,
                                      size_t nnodes, const uint8_t *nodes6, size_t nnodes6);

/* Response to get_peers {"id", "nodes", "nodes6", "token", "values"}. "values" is written when
 * @p values is non-NULL (a list of @p nvalues compact peers), "nodes"/"nodes6" when their
 * pointers are non-NULL; BEP 5 sends values or nodes, BEP 32 allows both. @p token (NULL for
 * none) should always be given: it is what lets the querier announce. */
int dg_krpc_encode_get_peers_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                      const uint8_t id[DG_KRPC_ID_LEN], const uint8_t *token,
                                      size_t token_len, const struct dg_krpc_peer *values,
                                      size_t nvalues, const uint8_t *nodes, size_t nnodes,
                                      const uint8_t *nodes6, size_t nnodes6);

/* Error {"e": [code, message]} (no node id: BEP 5 errors carry none). @p msg may be NULL when
 * @p msg_len is 0. */
int dg_krpc_encode_error(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h, int64_t code,
                         const void *msg, size_t msg_len);

#endif
