/* The digfs peer wire protocol, version 1 (docs/PROTOCOL.md section 3): a pure codec.
 *
 * Nothing here owns a socket, a timer or memory. The connection code reads bytes into its own
 * buffer and calls:
 *   1. dg_peer_handshake_parse() until it returns 0 (56 bytes);
 *   2. then, in a loop, dg_peer_msg_frame() to learn whether a whole message is buffered (and how
 *      long it is, so the length limit is enforced before anything is buffered), and
 *      dg_peer_msg_parse() on each whole frame. The parsed message points into the frame;
 *   3. for the checks that need the file's length (known after `hello`), dg_peer_msg_check() or
 *      one of the dg_peer_check_*() helpers;
 *   4. for `hello` and `pex`, dg_peer_hello_parse() / dg_peer_pex_parse() on the payload span.
 * Encoders write a whole message (length prefix included) into a caller buffer.
 *
 * Errors and what the caller does with them:
 *   -EAGAIN    more bytes are needed (handshake, framing);
 *   -EPROTO    not a digfs/1 handshake: close without answering;
 *   -EMSGSIZE  announced length over DG_PEER_MSG_MAX_LEN: close, count as malformed;
 *   -EBADMSG   malformed message (wrong size for its id, a bad field, or a context check that
 *              shows a lie): close, count as malformed;
 *   -ERANGE    a well-formed request the responder must refuse with a reply (a request for a
 *              block past the end is answered with `reject`; a hash_request outside the limits
 *              of 3.5 with `hash_reject`); the connection stays open;
 *   -ENOBUFS   an encoder's output buffer is too small;
 *   -EINVAL    a caller error (an encoder argument the protocol forbids, a wrong message type).
 *
 * Validation in dg_peer_msg_parse() needs no context: sizes per id, bitfield `first` a multiple
 * of 8 with 1..2^20 bytes of bits, `have` ranges non-empty and inside the u32 block space, block
 * data 1..16384 bytes, `hashes` limits (count 1..2048, proof_layers <= 32, exactly
 * count + proof_layers hashes). It cannot check, and leaves to dg_peer_msg_check() (given the
 * file's length):
 *   - that a block's data has exactly that block's size, and that a block index is in the file;
 *   - that a `have` range is inside the file;
 *   - that a bitfield stays inside the file and its bits past the last block are zero;
 *   - that a hash_request is inside the limits of 3.5 (layer <= tree height, range inside the
 *     layer, proof shape).
 * `hello` and `pex` payloads are only delimited by dg_peer_msg_parse(); their parsers do the rest.
 *
 * Files: block indices are u32, so the protocol addresses at most 2^32 blocks of 16 KiB
 * (DG_PEER_MAX_LENGTH = 64 TiB); the tree of such a file is at most 32 levels high.
 *
 * Thread safety: every function is reentrant (no global state); call them from any thread. */
#ifndef DG_PEER_MSG_H
#define DG_PEER_MSG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define DG_PEER_HANDSHAKE_LEN 56
#define DG_PEER_PSTR "digfs/1"
#define DG_PEER_PSTRLEN 7
#define DG_PEER_SWARM_KEY_LEN 20
#define DG_PEER_NODE_ID_LEN 20
#define DG_PEER_ROOT_LEN 32
#define DG_PEER_HASH_LEN 32

/* Largest value of a message's length field (1 MiB of payload plus headers). */
#define DG_PEER_MSG_MAX_LEN ((1u << 20) + 64u)
/* Largest whole frame: the 4 length bytes plus DG_PEER_MSG_MAX_LEN. */
#define DG_PEER_FRAME_MAX (4u + DG_PEER_MSG_MAX_LEN)
/* Size of a block (the last block of a file may be shorter). */
#define DG_PEER_BLOCK_SIZE 16384u
/* Header of a `block` message: length, id, block index. */
#define DG_PEER_BLOCK_HEADER_LEN 9
/* Most bytes of bits in one bitfield message (8 Mi blocks). */
#define DG_PEER_BITFIELD_MAX_BYTES (1u << 20)
/* hash_request limits (3.5). */
#define DG_PEER_HASH_MAX_COUNT 2048u
#define DG_PEER_HASH_MAX_PROOF 32u
/* Longest file the protocol can address: 2^32 blocks. */
#define DG_PEER_MAX_LENGTH ((uint64_t)1 << 46)

/* hello (3.4) and pex (3.6). */
#define DG_PEER_HELLO_MAX_DEPTH 4
#define DG_PEER_HELLO_MAX_TOKENS 64
#define DG_PEER_REQQ_DEFAULT 250u
#define DG_PEER_REQQ_MAX 2000u
#define DG_PEER_VERSION_MAX 32
#define DG_PEER_PEX_MAX 50
#define DG_PEER_PEX4_LEN 6
#define DG_PEER_PEX6_LEN 18

/* What a message is. Values 0..255 are the wire ids of PROTOCOL.md 3.3; KEEPALIVE (length 0)
 * and UNKNOWN (an id this version does not know) are outside the id space. */
enum dg_peer_msg_type {
    DG_PEER_MSG_CHOKE = 0,
    DG_PEER_MSG_UNCHOKE = 1,
    DG_PEER_MSG_INTERESTED = 2,
    DG_PEER_MSG_NOT_INTERESTED = 3,
    DG_PEER_MSG_HAVE = 4,
    DG_PEER_MSG_BITFIELD = 5,
    DG_PEER_MSG_REQUEST = 6,
    DG_PEER_MSG_BLOCK = 7,
    DG_PEER_MSG_CANCEL = 8,
    DG_PEER_MSG_REJECT = 9,
    DG_PEER_MSG_HAVE_ALL = 10,
    DG_PEER_MSG_HAVE_NONE = 11,
    DG_PEER_MSG_HELLO = 20,
    DG_PEER_MSG_HASH_REQUEST = 21,
    DG_PEER_MSG_HASHES = 22,
    DG_PEER_MSG_HASH_REJECT = 23,
    DG_PEER_MSG_PEX = 24,
    DG_PEER_MSG_HOLEPUNCH = 25,
    DG_PEER_MSG_KEEPALIVE = 0x100,
    DG_PEER_MSG_UNKNOWN = 0x101,
};

/* A parsed message. Fields not used by a type are zero; `data` points into the frame given to
 * dg_peer_msg_parse() and is valid only while that frame is. */
struct dg_peer_msg {
    enum dg_peer_msg_type type;
    uint8_t id;           /* the wire id (also for UNKNOWN); 0 for KEEPALIVE */
    uint32_t block;       /* REQUEST, BLOCK, CANCEL, REJECT */
    uint32_t first;       /* HAVE, BITFIELD: first block */
    uint32_t count;       /* HAVE: blocks in the range; BITFIELD: number of bits (8 * data_len);
                           * HASH_*: hashes requested */
    uint8_t layer;        /* HASH_*: tree level, 0 = leaves */
    uint32_t index;       /* HASH_*: index of the first hash in the layer */
    uint8_t proof_layers; /* HASH_* */
    /* BITFIELD: the bits, MSB first; BLOCK: the block's bytes; HASHES: count + proof_layers
     * hashes of 32 bytes; HELLO, PEX: the bencoded dictionary; HOLEPUNCH: its payload
     * (dg_peer_holepunch_parse()); UNKNOWN: the payload after the id. NULL with data_len 0 for
     * the other types. */
    const uint8_t *data;
    size_t data_len;
};

/* ---- handshake (3.1) ---- */

struct dg_peer_handshake {
    uint8_t reserved[8]; /* feature bits; none defined in version 1, unknown ones are ignored */
    uint8_t swarm_key[DG_PEER_SWARM_KEY_LEN];
    uint8_t node_id[DG_PEER_NODE_ID_LEN];
};

/* Writes our handshake (reserved bits all zero).
 * @param[in]  swarm_key  root[0..20] of the swarm.
 * @param[in]  node_id    our DHT node id.
 * @param[out] out        the 56 bytes to send.
 * Reentrant. */
void dg_peer_handshake_encode(const uint8_t swarm_key[DG_PEER_SWARM_KEY_LEN],
                              const uint8_t node_id[DG_PEER_NODE_ID_LEN],
                              uint8_t out[DG_PEER_HANDSHAKE_LEN]);

/* Reads a peer's handshake from the start of the stream. Only the first 56 bytes are looked at;
 * bytes after them are the first messages. The protocol string is checked on the bytes already
 * there, so a stream that is not digfs/1 fails at its first bytes.
 * @param[in]  buf  the bytes received so far.
 * @param[in]  len  their number.
 * @param[out] out  the handshake; written only on success.
 * @return 0 (the handshake is buf[0..56)); -EAGAIN if fewer than 56 bytes have arrived and those
 *         there are right so far; -EPROTO if pstrlen is not 7 or pstr is not "digfs/1".
 *         The caller still checks swarm_key (its interest) and node_id (not its own).
 * Reentrant. */
int dg_peer_handshake_parse(const uint8_t *buf, size_t len, struct dg_peer_handshake *out);

/* ---- framing (3.2) and parsing (3.3) ---- */

/* Tells whether @p buf starts with a whole message.
 * @param[in]  buf        buffered stream bytes, starting at a message boundary.
 * @param[in]  len        their number.
 * @param[out] frame_len  on 0: the whole frame's length (4 + the length field; 4 for a
 *                        keep-alive). On -EAGAIN: the frame's total length as far as it is known,
 *                        4 while the length field itself is incomplete, so the caller needs
 *                        *frame_len - len more bytes at least. 0 on -EMSGSIZE.
 * @return 0; -EAGAIN if more bytes are needed; -EMSGSIZE if the length field is over
 *         DG_PEER_MSG_MAX_LEN (decided from the length bytes alone, as soon as those that
 *         arrived prove it).
 * Reentrant. */
int dg_peer_msg_frame(const uint8_t *buf, size_t len, size_t *frame_len);

/* Parses one whole frame (as delimited by dg_peer_msg_frame()). Allocates nothing.
 * @param[in]  frame  the frame, length prefix included.
 * @param[in]  len    exactly the frame's length.
 * @param[out] out    the message (see struct dg_peer_msg); its spans point into @p frame.
 *                    Zeroed on failure.
 * @return 0 (also for an unknown id: type DG_PEER_MSG_UNKNOWN, to be skipped); -EBADMSG for a
 *         known id whose payload has the wrong size or a field no context makes valid (see the
 *         top of this file); -EMSGSIZE if the length field is over the limit; -EINVAL if @p len
 *         is not 4 + the length field.
 * Reentrant. */
int dg_peer_msg_parse(const uint8_t *frame, size_t len, struct dg_peer_msg *out);

/* ---- checks that need the file's length ---- */

/* Size of block @p block of a file of @p length bytes: 16384, less for the last block, 0 if the
 * file has no such block. Reentrant. */
size_t dg_peer_block_size(uint64_t length, uint32_t block);

/* Checks a block-indexed message against the file.
 * @param[in] msg     a parsed BLOCK, REQUEST, CANCEL or REJECT.
 * @param[in] length  the file's length.
 * @return 0; for BLOCK -EBADMSG if the block is past the end or its data is not exactly
 *         dg_peer_block_size() bytes; for REQUEST, CANCEL, REJECT -ERANGE if the block is past
 *         the end (a request is answered with `reject`, a cancel is ignored, a reject never
 *         matches a request we sent); -EINVAL for another type.
 * Reentrant. */
int dg_peer_check_block(const struct dg_peer_msg *msg, uint64_t length);

/* Checks a HAVE message: [first, first + count) inside the file.
 * @return 0; -EBADMSG if not; -EINVAL if @p msg is not a HAVE. Reentrant. */
int dg_peer_check_have(const struct dg_peer_msg *msg, uint64_t length);

/* Checks a BITFIELD message against the file: `first` is a block of the file, the bits do not
 * go past the byte that holds the last block, and the bits past the last block are zero.
 * @return 0; -EBADMSG if not (a file of 0 blocks has no valid bitfield: its holder sends
 *         have_all or have_none); -EINVAL if @p msg is not a BITFIELD. Reentrant. */
int dg_peer_check_bitfield(const struct dg_peer_msg *msg, uint64_t length);

/* Tree height of a file: ceil(log2(blocks)), 0 for a file of 0 or 1 block. Reentrant. */
unsigned dg_peer_tree_height(uint64_t length);

/* Number of real (not padding) nodes at tree level @p layer: ceil(blocks / 2^layer); 0 for the
 * empty file or a layer above the tree height. Reentrant. */
uint64_t dg_peer_layer_nodes(uint64_t length, unsigned layer);

/* Checks a HASH_REQUEST against the limits of PROTOCOL.md 3.5 for a file of @p length bytes:
 *   - 1 <= count <= 2048, proof_layers <= 32;
 *   - layer <= the tree height;
 *   - [index, index + count) inside the layer's real nodes: padding nodes (the zero hashes past
 *     ceil(blocks / 2^layer)) are never requested, the requester computes them;
 *   - with proof_layers > 0: count is a power of two 2^c, index is a multiple of count, and the
 *     proof fits the tree, layer + c + proof_layers <= height. The range is then one subtree
 *     whose root is at level layer + c, and the proof is one uncle per level from layer + c up
 *     to layer + c + proof_layers - 1 (the BEP 52 shape; uncles may be padding subtrees).
 * The empty file has no tree: every request is out of range.
 * @return 0; -ERANGE if a limit is broken (answer with hash_reject); -EINVAL if @p msg is not a
 *         HASH_REQUEST. Reentrant. */
int dg_peer_check_hash_request(const struct dg_peer_msg *msg, uint64_t length);

/* Runs the check above that fits @p msg's type (BLOCK, REQUEST, CANCEL, REJECT, HAVE, BITFIELD,
 * HASH_REQUEST); other types need no context and return 0.
 * @return as the check called. Reentrant. */
int dg_peer_msg_check(const struct dg_peer_msg *msg, uint64_t length);

/* ---- encoders ----
 * Each writes one whole message (length prefix included) into @p out of @p cap bytes and
 * returns the number of bytes written, -ENOBUFS if @p cap is too small (nothing useful is
 * written then), or -EINVAL for an argument that would make a message the parser rejects.
 * All are reentrant. */

/* choke (5 bytes). */
int dg_peer_msg_choke(uint8_t *out, size_t cap);
/* unchoke (5 bytes). */
int dg_peer_msg_unchoke(uint8_t *out, size_t cap);
/* interested (5 bytes). */
int dg_peer_msg_interested(uint8_t *out, size_t cap);
/* not_interested (5 bytes). */
int dg_peer_msg_not_interested(uint8_t *out, size_t cap);
/* have_all (5 bytes). */
int dg_peer_msg_have_all(uint8_t *out, size_t cap);
/* have_none (5 bytes). */
int dg_peer_msg_have_none(uint8_t *out, size_t cap);
/* keep-alive (4 zero bytes). */
int dg_peer_msg_keepalive(uint8_t *out, size_t cap);

/* have: blocks [first, first + count) are held (13 bytes).
 * @return bytes written; -EINVAL if count is 0 or first + count > 2^32; -ENOBUFS. */
int dg_peer_msg_have(uint32_t first, uint32_t count, uint8_t *out, size_t cap);

/* bitfield: @p nbits bits starting at block @p first.
 * @param[in] bits   the bits, MSB first; ceil(nbits / 8) bytes are read. Bits past @p nbits in
 *                   the last byte are sent as zero whatever they are in @p bits.
 * @return bytes written (9 + ceil(nbits / 8)); -EINVAL if first is not a multiple of 8, nbits
 *         is 0 or over 8 * DG_PEER_BITFIELD_MAX_BYTES, or the bits go past block 2^32 - 1;
 *         -ENOBUFS. */
int dg_peer_msg_bitfield(uint32_t first, const uint8_t *bits, uint64_t nbits, uint8_t *out,
                         size_t cap);

/* request (9 bytes). @return bytes written; -ENOBUFS. */
int dg_peer_msg_request(uint32_t block, uint8_t *out, size_t cap);
/* cancel (9 bytes). @return bytes written; -ENOBUFS. */
int dg_peer_msg_cancel(uint32_t block, uint8_t *out, size_t cap);
/* reject (9 bytes). @return bytes written; -ENOBUFS. */
int dg_peer_msg_reject(uint32_t block, uint8_t *out, size_t cap);

/* block: block @p block with its @p len bytes of @p data (9 + len bytes).
 * @return bytes written; -EINVAL if len is 0 or over 16384; -ENOBUFS. */
int dg_peer_msg_block(uint32_t block, const uint8_t *data, size_t len, uint8_t *out, size_t cap);

/* The first 9 bytes of a block message, for sending the data from where it is (writev).
 * @param[in]  len  the number of data bytes that will follow.
 * @param[out] out  the header.
 * @return DG_PEER_BLOCK_HEADER_LEN; -EINVAL if len is 0 or over 16384. */
int dg_peer_msg_block_header(uint32_t block, size_t len, uint8_t out[DG_PEER_BLOCK_HEADER_LEN]);

/* hash_request (15 bytes).
 * @return bytes written; -EINVAL if count is 0 or over 2048 or proof_layers over 32 (layer and
 *         range against the file are dg_peer_check_hash_request()'s job); -ENOBUFS. */
int dg_peer_msg_hash_request(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                             uint8_t *out, size_t cap);

/* hashes: the answer to a hash_request, with its header echoed.
 * @param[in] hashes   @p nhashes hashes of 32 bytes: the count requested ones, then the
 *                     proof_layers uncles.
 * @return bytes written (15 + 32 * nhashes); -EINVAL if count is 0 or over 2048, proof_layers
 *         over 32, or nhashes != count + proof_layers; -ENOBUFS. */
int dg_peer_msg_hashes(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                       const uint8_t *hashes, size_t nhashes, uint8_t *out, size_t cap);

/* hash_reject: the header of the refused hash_request, echoed as it came (15 bytes); any values.
 * @return bytes written; -ENOBUFS. */
int dg_peer_msg_hash_reject(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                            uint8_t *out, size_t cap);

/* hello: wraps an already-bencoded payload (from dg_peer_hello_encode()). @p payload may lie at
 * out + 5, where the message puts it (it is then not copied), or anywhere else.
 * @return bytes written (5 + len); -EMSGSIZE if the message would be over the length limit;
 *         -ENOBUFS. */
int dg_peer_msg_hello(const uint8_t *payload, size_t len, uint8_t *out, size_t cap);

/* pex: as dg_peer_msg_hello(), for a payload from dg_peer_pex_encode(). */
int dg_peer_msg_pex(const uint8_t *payload, size_t len, uint8_t *out, size_t cap);

/* ---- hello (3.4) ---- */

/* A hello's contents. Optional keys have a has_* flag: a key is encoded only when its flag is
 * set, and a parsed key sets it. `root` is required. */
struct dg_peer_hello {
    int has_len;
    uint64_t len; /* the file's length, <= DG_PEER_MAX_LENGTH */
    int has_nat;
    uint8_t nat; /* the sender's NAT class, 0..3 (engine/holepunch.h enum dg_nat_class) */
    int has_port;
    uint16_t port; /* listen port, 1..65535 */
    int has_pex;
    int pex; /* 0 or 1 */
    int has_reqq;
    uint32_t reqq; /* 1..2000; the receiver uses DG_PEER_REQQ_DEFAULT when absent */
    uint8_t root[DG_PEER_ROOT_LEN];
    int has_v;
    uint8_t v[DG_PEER_VERSION_MAX]; /* client name and version; not NUL-terminated */
    size_t v_len;                   /* 0..32 */
    int has_yourip;
    uint8_t yourip[16]; /* the receiver's address as the sender sees it */
    size_t yourip_len;  /* 4 or 16 */
};

/* Reads a hello payload: a bencoded dictionary, sorted keys, depth <= 4, <= 64 tokens. Unknown
 * keys are ignored (forward compatibility); a known key of the wrong type or range is an error.
 * @param[in]  payload  the HELLO message's data span.
 * @param[in]  len      its length.
 * @param[out] out      the contents, copied (no pointers into @p payload); zeroed on failure.
 * @return 0; -EBADMSG if the payload is not such a dictionary, `root` is missing or not 32
 *         bytes, `len` is negative or over DG_PEER_MAX_LENGTH, `p` is not 1..65535, `pex` is not
 *         0 or 1, `reqq` is not 1..2000, `nat` is not 0..3, `v` is longer than 32 bytes, or
 *         `yourip` is not 4 or 16 bytes. The caller checks that `root` extends the handshake's
 * swarm_key. Reentrant. */
int dg_peer_hello_parse(const uint8_t *payload, size_t len, struct dg_peer_hello *out);

/* Writes a hello payload (keys in sorted order, only those whose has_* flag is set, and root).
 * @return bytes written; -EINVAL if a field is out of the ranges dg_peer_hello_parse() accepts;
 *         -ENOBUFS if @p cap is too small (at most 200 bytes are ever needed). Reentrant. */
int dg_peer_hello_encode(const struct dg_peer_hello *h, uint8_t *out, size_t cap);

/* ---- pex (3.6) ---- */

/* A pex's lists, as spans of compact entries (IPv4: 4 address bytes + 2 port bytes; IPv6: 16 + 2,
 * big-endian). A NULL list is absent; a non-NULL one with 0 entries is present and empty. */
struct dg_peer_pex {
    const uint8_t *added;
    size_t added_n; /* entries, not bytes */
    const uint8_t *added6;
    size_t added6_n;
    const uint8_t *dropped;
    size_t dropped_n;
    const uint8_t *dropped6;
    size_t dropped6_n;
};

/* Reads a pex payload: a bencoded dictionary (depth <= 4, <= 64 tokens, as hello) whose keys
 * `added`, `added6`, `dropped`, `dropped6` are optional strings of 6- or 18-byte entries, at most
 * 50 per list. Unknown keys are ignored. The entries are not judged (port 0, own address, ...):
 * the caller's connection policy does that.
 * @param[out] out  spans into @p payload, valid only while it is; zeroed on failure.
 * @return 0; -EBADMSG if malformed, a list has a length that is not a multiple of its entry size,
 *         or more than 50 entries. Reentrant. */
int dg_peer_pex_parse(const uint8_t *payload, size_t len, struct dg_peer_pex *out);

/* Writes a pex payload with the non-NULL lists of @p p.
 * @return bytes written; -EINVAL if a list has more than 50 entries (or is NULL with a non-zero
 *         count); -ENOBUFS if @p cap is too small (at most 2500 bytes are ever needed).
 * Reentrant. */
int dg_peer_pex_encode(const struct dg_peer_pex *p, uint8_t *out, size_t cap);

/* ---- holepunch (3.9) ---- */

enum dg_peer_holepunch_type {
    DG_PEER_HP_RENDEZVOUS = 0, /* to a peer connected to both: bring me @c addr */
    DG_PEER_HP_CONNECT = 1,    /* from that peer: punch towards @c addr with @c nonce */
    DG_PEER_HP_ERROR = 2,      /* from that peer: it cannot (@c error) */
};

enum dg_peer_holepunch_error {
    DG_PEER_HP_ERR_NO_SUCH_PEER = 1, /* not connected to @c addr in this swarm */
    DG_PEER_HP_ERR_NO_SELF = 2,      /* the asker's own address is not known (no `p` in hello) */
    DG_PEER_HP_ERR_BUSY = 3,         /* too many requests */
};

#define DG_PEER_HP_NONCE_LEN 16

struct dg_peer_holepunch {
    enum dg_peer_holepunch_type type;
    struct sockaddr_storage addr; /* AF_INET or AF_INET6, port not 0 */
    uint8_t nat;                  /* RENDEZVOUS: the asker's NAT class; CONNECT: addr's (0..3) */
    uint8_t initiator;            /* CONNECT: 1 = the receiver opens the uTP connection */
    uint8_t nonce[DG_PEER_HP_NONCE_LEN]; /* CONNECT */
    uint8_t error;                       /* ERROR: enum dg_peer_holepunch_error */
};

/* Reads a holepunch payload:
 *   type u8, family u8 (4 or 6), ip (4 or 16 bytes), port u16, then
 *   RENDEZVOUS: nat u8;  CONNECT: nat u8, initiator u8 (0/1), nonce (16 bytes);  ERROR: error u8.
 * @return 0, or -EBADMSG (unknown type or family, a length other than the type's, port 0, a
 *         NAT class over 3, an unknown error code). Reentrant. */
int dg_peer_holepunch_parse(const uint8_t *payload, size_t len, struct dg_peer_holepunch *out);

/* Writes a whole holepunch message (length, id 25, payload) for @p h.
 * @return bytes written; -EINVAL (what dg_peer_holepunch_parse() would refuse); -ENOBUFS. */
int dg_peer_msg_holepunch(const struct dg_peer_holepunch *h, uint8_t *out, size_t cap);

#endif
