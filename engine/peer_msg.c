/* The digfs peer wire codec (docs/PROTOCOL.md section 3). See peer_msg.h. */
#include "engine/peer_msg.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>

#include "engine/bencode.h"
#include "engine/byteorder.h"

/* Bytes before a message's payload: length (4) and id (1). */
#define MSG_HEADER 5u
/* The 10-byte header of hash_request, hashes and hash_reject. */
#define HASH_HEADER 10u
/* Block indices are u32: the block space ends at 2^32. */
#define BLOCK_SPACE ((uint64_t)1 << 32)

/* ---- handshake ---- */

void dg_peer_handshake_encode(const uint8_t swarm_key[DG_PEER_SWARM_KEY_LEN],
                              const uint8_t node_id[DG_PEER_NODE_ID_LEN],
                              uint8_t out[DG_PEER_HANDSHAKE_LEN])
{
    out[0] = DG_PEER_PSTRLEN;
    memcpy(out + 1, DG_PEER_PSTR, DG_PEER_PSTRLEN);
    memset(out + 8, 0, 8);
    memcpy(out + 16, swarm_key, DG_PEER_SWARM_KEY_LEN);
    memcpy(out + 36, node_id, DG_PEER_NODE_ID_LEN);
}

int dg_peer_handshake_parse(const uint8_t *buf, size_t len, struct dg_peer_handshake *out)
{
    static const uint8_t prefix[1 + DG_PEER_PSTRLEN] = {
        DG_PEER_PSTRLEN, 'd', 'i', 'g', 'f', 's', '/', '1'};
    size_t have = len < sizeof(prefix) ? len : sizeof(prefix);

    /* Check what has arrived of pstrlen and pstr first: a stranger fails at its first byte. */
    if (have > 0 && memcmp(buf, prefix, have) != 0)
        return -EPROTO;
    if (len < DG_PEER_HANDSHAKE_LEN)
        return -EAGAIN;
    memcpy(out->reserved, buf + 8, sizeof(out->reserved));
    memcpy(out->swarm_key, buf + 16, DG_PEER_SWARM_KEY_LEN);
    memcpy(out->node_id, buf + 36, DG_PEER_NODE_ID_LEN);
    return 0;
}

/* ---- framing and parsing ---- */

int dg_peer_msg_frame(const uint8_t *buf, size_t len, size_t *frame_len)
{
    uint32_t v = 0;

    /* The smallest length the bytes there allow (missing bytes as zero): over the limit
     * already means over the limit whatever follows. */
    for (size_t i = 0; i < 4; i++)
        v = v << 8 | (i < len ? buf[i] : 0);
    if (v > DG_PEER_MSG_MAX_LEN) {
        *frame_len = 0;
        return -EMSGSIZE;
    }
    if (len < 4) {
        *frame_len = 4;
        return -EAGAIN;
    }
    *frame_len = 4 + (size_t)v;
    return len >= *frame_len ? 0 : -EAGAIN;
}

/* Parses the 10-byte header of the hash messages. */
static void parse_hash_header(const uint8_t *p, struct dg_peer_msg *out)
{
    out->layer = p[0];
    out->index = dg_get32(p + 1);
    out->count = dg_get32(p + 5);
    out->proof_layers = p[9];
}

/* Fills @p out from the payload of a known id; returns 0 or -EBADMSG. */
static int parse_payload(uint8_t id, const uint8_t *p, size_t n, struct dg_peer_msg *out)
{
    switch (id) {
    case DG_PEER_MSG_CHOKE:
    case DG_PEER_MSG_UNCHOKE:
    case DG_PEER_MSG_INTERESTED:
    case DG_PEER_MSG_NOT_INTERESTED:
    case DG_PEER_MSG_HAVE_ALL:
    case DG_PEER_MSG_HAVE_NONE:
        return n == 0 ? 0 : -EBADMSG;
    case DG_PEER_MSG_HAVE:
        if (n != 8)
            return -EBADMSG;
        out->first = dg_get32(p);
        out->count = dg_get32(p + 4);
        if (out->count == 0 || (uint64_t)out->first + out->count > BLOCK_SPACE)
            return -EBADMSG;
        return 0;
    case DG_PEER_MSG_BITFIELD:
        if (n < 5 || n - 4 > DG_PEER_BITFIELD_MAX_BYTES)
            return -EBADMSG;
        out->first = dg_get32(p);
        out->data = p + 4;
        out->data_len = n - 4;
        out->count = (uint32_t)(out->data_len * 8);
        if (out->first % 8 != 0 || (uint64_t)out->first + out->count > BLOCK_SPACE)
            return -EBADMSG;
        return 0;
    case DG_PEER_MSG_REQUEST:
    case DG_PEER_MSG_CANCEL:
    case DG_PEER_MSG_REJECT:
        if (n != 4)
            return -EBADMSG;
        out->block = dg_get32(p);
        return 0;
    case DG_PEER_MSG_BLOCK:
        if (n < 5 || n - 4 > DG_PEER_BLOCK_SIZE)
            return -EBADMSG;
        out->block = dg_get32(p);
        out->data = p + 4;
        out->data_len = n - 4;
        return 0;
    case DG_PEER_MSG_HELLO:
    case DG_PEER_MSG_PEX:
    case DG_PEER_MSG_HOLEPUNCH:
        /* Delimited only: dg_peer_hello_parse() / dg_peer_pex_parse() judge the contents. */
        out->data = p;
        out->data_len = n;
        return 0;
    case DG_PEER_MSG_HASH_REQUEST:
    case DG_PEER_MSG_HASH_REJECT:
        /* Any header is well-formed: a request outside the limits is answered with hash_reject
         * (3.5, dg_peer_check_hash_request()), and hash_reject echoes that header. */
        if (n != HASH_HEADER)
            return -EBADMSG;
        parse_hash_header(p, out);
        return 0;
    case DG_PEER_MSG_HASHES:
        if (n < HASH_HEADER || (n - HASH_HEADER) % DG_PEER_HASH_LEN != 0)
            return -EBADMSG;
        parse_hash_header(p, out);
        out->data = p + HASH_HEADER;
        out->data_len = n - HASH_HEADER;
        /* An answer is never outside the limits: a request outside them gets hash_reject. */
        if (out->count == 0 || out->count > DG_PEER_HASH_MAX_COUNT ||
            out->proof_layers > DG_PEER_HASH_MAX_PROOF)
            return -EBADMSG;
        if (out->data_len / DG_PEER_HASH_LEN != (size_t)out->count + out->proof_layers)
            return -EBADMSG;
        return 0;
    default:
        out->type = DG_PEER_MSG_UNKNOWN;
        out->data = p;
        out->data_len = n;
        return 0;
    }
}

int dg_peer_msg_parse(const uint8_t *frame, size_t len, struct dg_peer_msg *out)
{
    uint32_t v;
    int rc;

    memset(out, 0, sizeof(*out));
    if (len < 4)
        return -EINVAL;
    v = dg_get32(frame);
    if (v > DG_PEER_MSG_MAX_LEN)
        return -EMSGSIZE;
    if (len != 4 + (size_t)v)
        return -EINVAL;
    if (v == 0) {
        out->type = DG_PEER_MSG_KEEPALIVE;
        return 0;
    }
    out->id = frame[4];
    out->type = (enum dg_peer_msg_type)frame[4];
    rc = parse_payload(frame[4], frame + MSG_HEADER, v - 1, out);
    if (rc < 0)
        memset(out, 0, sizeof(*out));
    return rc;
}

/* ---- checks with the file's length ---- */

static uint64_t block_count(uint64_t length)
{
    return length / DG_PEER_BLOCK_SIZE + (length % DG_PEER_BLOCK_SIZE != 0);
}

size_t dg_peer_block_size(uint64_t length, uint32_t block)
{
    uint64_t n = block_count(length);

    if (block >= n)
        return 0;
    if ((uint64_t)block + 1 < n)
        return DG_PEER_BLOCK_SIZE;
    return (size_t)(length - (uint64_t)block * DG_PEER_BLOCK_SIZE);
}

int dg_peer_check_block(const struct dg_peer_msg *msg, uint64_t length)
{
    size_t size = dg_peer_block_size(length, msg->block);

    switch (msg->type) {
    case DG_PEER_MSG_BLOCK:
        return size != 0 && msg->data_len == size ? 0 : -EBADMSG;
    case DG_PEER_MSG_REQUEST:
    case DG_PEER_MSG_CANCEL:
    case DG_PEER_MSG_REJECT:
        return size != 0 ? 0 : -ERANGE;
    default:
        return -EINVAL;
    }
}

int dg_peer_check_have(const struct dg_peer_msg *msg, uint64_t length)
{
    if (msg->type != DG_PEER_MSG_HAVE)
        return -EINVAL;
    if (msg->count == 0 || (uint64_t)msg->first + msg->count > block_count(length))
        return -EBADMSG;
    return 0;
}

int dg_peer_check_bitfield(const struct dg_peer_msg *msg, uint64_t length)
{
    uint64_t n = block_count(length);
    uint64_t in_file; /* blocks of the file from `first` on */
    uint64_t nbits;

    if (msg->type != DG_PEER_MSG_BITFIELD)
        return -EINVAL;
    if (msg->data_len == 0 || msg->first >= n)
        return -EBADMSG;
    in_file = n - msg->first;
    /* Not a byte past the one that holds the last block. */
    if (msg->data_len > (in_file + 7) / 8)
        return -EBADMSG;
    nbits = (uint64_t)msg->data_len * 8;
    if (nbits > in_file) {
        /* The last byte holds blocks past the end in its low bits: they must be zero. */
        unsigned extra = (unsigned)(nbits - in_file); /* 1..7 */
        uint8_t mask = (uint8_t)((1u << extra) - 1);
        if (msg->data[msg->data_len - 1] & mask)
            return -EBADMSG;
    }
    return 0;
}

unsigned dg_peer_tree_height(uint64_t length)
{
    uint64_t n = block_count(length);
    unsigned h = 0;

    while (h < 64 && ((uint64_t)1 << h) < n)
        h++;
    return h;
}

uint64_t dg_peer_layer_nodes(uint64_t length, unsigned layer)
{
    uint64_t n = block_count(length);

    if (n == 0 || layer > dg_peer_tree_height(length))
        return 0;
    /* layer <= height <= 50: no overflow (n <= 2^50). */
    return (n + ((uint64_t)1 << layer) - 1) >> layer;
}

int dg_peer_check_hash_request(const struct dg_peer_msg *msg, uint64_t length)
{
    unsigned height, c = 0;
    uint64_t nodes;

    if (msg->type != DG_PEER_MSG_HASH_REQUEST)
        return -EINVAL;
    if (msg->count == 0 || msg->count > DG_PEER_HASH_MAX_COUNT ||
        msg->proof_layers > DG_PEER_HASH_MAX_PROOF)
        return -ERANGE;
    height = dg_peer_tree_height(length);
    nodes = dg_peer_layer_nodes(length, msg->layer);
    if (nodes == 0 || msg->layer > height)
        return -ERANGE;
    if ((uint64_t)msg->index + msg->count > nodes)
        return -ERANGE;
    if (msg->proof_layers > 0) {
        if ((msg->count & (msg->count - 1)) != 0 || msg->index % msg->count != 0)
            return -ERANGE;
        while ((1u << c) < msg->count)
            c++;
        if ((unsigned)msg->layer + c + msg->proof_layers > height)
            return -ERANGE;
    }
    return 0;
}

int dg_peer_msg_check(const struct dg_peer_msg *msg, uint64_t length)
{
    switch (msg->type) {
    case DG_PEER_MSG_BLOCK:
    case DG_PEER_MSG_REQUEST:
    case DG_PEER_MSG_CANCEL:
    case DG_PEER_MSG_REJECT:
        return dg_peer_check_block(msg, length);
    case DG_PEER_MSG_HAVE:
        return dg_peer_check_have(msg, length);
    case DG_PEER_MSG_BITFIELD:
        return dg_peer_check_bitfield(msg, length);
    case DG_PEER_MSG_HASH_REQUEST:
        return dg_peer_check_hash_request(msg, length);
    default:
        return 0;
    }
}

/* ---- encoders ---- */

/* Writes the length and id of a message with @p payload bytes of payload; checks the room. */
static int put_header(uint8_t id, size_t payload, uint8_t *out, size_t cap)
{
    if (cap < MSG_HEADER + payload)
        return -ENOBUFS;
    dg_put32(out, (uint32_t)(1 + payload));
    out[4] = id;
    return (int)(MSG_HEADER + payload);
}

static int put_empty(uint8_t id, uint8_t *out, size_t cap)
{
    return put_header(id, 0, out, cap);
}

int dg_peer_msg_choke(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_CHOKE, out, cap);
}

int dg_peer_msg_unchoke(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_UNCHOKE, out, cap);
}

int dg_peer_msg_interested(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_INTERESTED, out, cap);
}

int dg_peer_msg_not_interested(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_NOT_INTERESTED, out, cap);
}

int dg_peer_msg_have_all(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_HAVE_ALL, out, cap);
}

int dg_peer_msg_have_none(uint8_t *out, size_t cap)
{
    return put_empty(DG_PEER_MSG_HAVE_NONE, out, cap);
}

int dg_peer_msg_keepalive(uint8_t *out, size_t cap)
{
    if (cap < 4)
        return -ENOBUFS;
    dg_put32(out, 0);
    return 4;
}

int dg_peer_msg_have(uint32_t first, uint32_t count, uint8_t *out, size_t cap)
{
    int rc;

    if (count == 0 || (uint64_t)first + count > BLOCK_SPACE)
        return -EINVAL;
    rc = put_header(DG_PEER_MSG_HAVE, 8, out, cap);
    if (rc < 0)
        return rc;
    dg_put32(out + 5, first);
    dg_put32(out + 9, count);
    return rc;
}

int dg_peer_msg_bitfield(uint32_t first, const uint8_t *bits, uint64_t nbits, uint8_t *out,
                         size_t cap)
{
    size_t nbytes;
    int rc;

    if (first % 8 != 0 || nbits == 0 || nbits > (uint64_t)DG_PEER_BITFIELD_MAX_BYTES * 8)
        return -EINVAL;
    nbytes = (size_t)((nbits + 7) / 8);
    if ((uint64_t)first + (uint64_t)nbytes * 8 > BLOCK_SPACE)
        return -EINVAL;
    rc = put_header(DG_PEER_MSG_BITFIELD, 4 + nbytes, out, cap);
    if (rc < 0)
        return rc;
    dg_put32(out + 5, first);
    memcpy(out + 9, bits, nbytes);
    if (nbits % 8 != 0)
        out[9 + nbytes - 1] &= (uint8_t)(0xffu << (8 - nbits % 8));
    return rc;
}

static int put_block_index(uint8_t id, uint32_t block, uint8_t *out, size_t cap)
{
    int rc = put_header(id, 4, out, cap);

    if (rc < 0)
        return rc;
    dg_put32(out + 5, block);
    return rc;
}

int dg_peer_msg_request(uint32_t block, uint8_t *out, size_t cap)
{
    return put_block_index(DG_PEER_MSG_REQUEST, block, out, cap);
}

int dg_peer_msg_cancel(uint32_t block, uint8_t *out, size_t cap)
{
    return put_block_index(DG_PEER_MSG_CANCEL, block, out, cap);
}

int dg_peer_msg_reject(uint32_t block, uint8_t *out, size_t cap)
{
    return put_block_index(DG_PEER_MSG_REJECT, block, out, cap);
}

int dg_peer_msg_block_header(uint32_t block, size_t len, uint8_t out[DG_PEER_BLOCK_HEADER_LEN])
{
    if (len == 0 || len > DG_PEER_BLOCK_SIZE)
        return -EINVAL;
    dg_put32(out, (uint32_t)(5 + len));
    out[4] = DG_PEER_MSG_BLOCK;
    dg_put32(out + 5, block);
    return DG_PEER_BLOCK_HEADER_LEN;
}

int dg_peer_msg_block(uint32_t block, const uint8_t *data, size_t len, uint8_t *out, size_t cap)
{
    if (len == 0 || len > DG_PEER_BLOCK_SIZE)
        return -EINVAL;
    if (cap < DG_PEER_BLOCK_HEADER_LEN + len)
        return -ENOBUFS;
    dg_peer_msg_block_header(block, len, out);
    memcpy(out + DG_PEER_BLOCK_HEADER_LEN, data, len);
    return (int)(DG_PEER_BLOCK_HEADER_LEN + len);
}

static int put_hash_msg(uint8_t id, uint8_t layer, uint32_t index, uint32_t count,
                        uint8_t proof_layers, const uint8_t *hashes, size_t nhashes, uint8_t *out,
                        size_t cap)
{
    int rc = put_header(id, HASH_HEADER + nhashes * DG_PEER_HASH_LEN, out, cap);

    if (rc < 0)
        return rc;
    out[5] = layer;
    dg_put32(out + 6, index);
    dg_put32(out + 10, count);
    out[14] = proof_layers;
    if (nhashes > 0)
        memcpy(out + 15, hashes, nhashes * DG_PEER_HASH_LEN);
    return rc;
}

static int hash_limits_ok(uint32_t count, uint8_t proof_layers)
{
    return count != 0 && count <= DG_PEER_HASH_MAX_COUNT && proof_layers <= DG_PEER_HASH_MAX_PROOF;
}

int dg_peer_msg_hash_request(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                             uint8_t *out, size_t cap)
{
    if (!hash_limits_ok(count, proof_layers))
        return -EINVAL;
    return put_hash_msg(DG_PEER_MSG_HASH_REQUEST, layer, index, count, proof_layers, NULL, 0, out,
                        cap);
}

int dg_peer_msg_hashes(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                       const uint8_t *hashes, size_t nhashes, uint8_t *out, size_t cap)
{
    if (!hash_limits_ok(count, proof_layers) || nhashes != (size_t)count + proof_layers)
        return -EINVAL;
    return put_hash_msg(DG_PEER_MSG_HASHES, layer, index, count, proof_layers, hashes, nhashes, out,
                        cap);
}

int dg_peer_msg_hash_reject(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof_layers,
                            uint8_t *out, size_t cap)
{
    return put_hash_msg(DG_PEER_MSG_HASH_REJECT, layer, index, count, proof_layers, NULL, 0, out,
                        cap);
}

static int put_bencoded(uint8_t id, const uint8_t *payload, size_t len, uint8_t *out, size_t cap)
{
    if (len > DG_PEER_MSG_MAX_LEN - 1)
        return -EMSGSIZE;
    if (cap < MSG_HEADER + len)
        return -ENOBUFS;
    /* The payload may already be in place at out + 5 (or overlap it): memmove. */
    if (len > 0 && payload != out + MSG_HEADER)
        memmove(out + MSG_HEADER, payload, len);
    dg_put32(out, (uint32_t)(1 + len));
    out[4] = id;
    return (int)(MSG_HEADER + len);
}

int dg_peer_msg_hello(const uint8_t *payload, size_t len, uint8_t *out, size_t cap)
{
    return put_bencoded(DG_PEER_MSG_HELLO, payload, len, out, cap);
}

int dg_peer_msg_pex(const uint8_t *payload, size_t len, uint8_t *out, size_t cap)
{
    return put_bencoded(DG_PEER_MSG_PEX, payload, len, out, cap);
}

/* ---- holepunch ---- */

/* The payload length of a holepunch message of @p type with an address of @p alen bytes. */
static size_t holepunch_len(enum dg_peer_holepunch_type type, size_t alen)
{
    size_t head = 2 + alen + 2;

    switch (type) {
    case DG_PEER_HP_RENDEZVOUS:
        return head + 1;
    case DG_PEER_HP_CONNECT:
        return head + 2 + DG_PEER_HP_NONCE_LEN;
    case DG_PEER_HP_ERROR:
        return head + 1;
    }
    return 0;
}

int dg_peer_holepunch_parse(const uint8_t *p, size_t len, struct dg_peer_holepunch *out)
{
    size_t alen;
    uint16_t port;

    memset(out, 0, sizeof(*out));
    if (len < 2 || p[0] > DG_PEER_HP_ERROR || (p[1] != 4 && p[1] != 6))
        goto bad;
    out->type = (enum dg_peer_holepunch_type)p[0];
    alen = p[1] == 4 ? 4 : 16;
    if (len != holepunch_len(out->type, alen))
        goto bad;
    port = (uint16_t)(p[2 + alen] << 8 | p[3 + alen]);
    if (port == 0)
        goto bad;
    if (alen == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)&out->addr;
        a->sin_family = AF_INET;
        memcpy(&a->sin_addr, p + 2, 4);
        a->sin_port = htons(port);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&out->addr;
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_addr, p + 2, 16);
        a->sin6_port = htons(port);
    }
    const uint8_t *q = p + 4 + alen;
    switch (out->type) {
    case DG_PEER_HP_RENDEZVOUS:
        out->nat = q[0];
        if (out->nat > 3)
            goto bad;
        return 0;
    case DG_PEER_HP_CONNECT:
        out->nat = q[0];
        out->initiator = q[1];
        if (out->nat > 3 || out->initiator > 1)
            goto bad;
        memcpy(out->nonce, q + 2, DG_PEER_HP_NONCE_LEN);
        return 0;
    case DG_PEER_HP_ERROR:
        out->error = q[0];
        if (out->error < DG_PEER_HP_ERR_NO_SUCH_PEER || out->error > DG_PEER_HP_ERR_BUSY)
            goto bad;
        return 0;
    }
bad:
    memset(out, 0, sizeof(*out));
    return -EBADMSG;
}

int dg_peer_msg_holepunch(const struct dg_peer_holepunch *h, uint8_t *out, size_t cap)
{
    uint8_t payload[64];
    size_t alen, n;
    uint16_t port;
    const uint8_t *ip;

    if (h->addr.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&h->addr;
        alen = 4;
        ip = (const uint8_t *)&a->sin_addr;
        port = ntohs(a->sin_port);
    } else if (h->addr.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&h->addr;
        alen = 16;
        ip = (const uint8_t *)&a->sin6_addr;
        port = ntohs(a->sin6_port);
    } else {
        return -EINVAL;
    }
    if ((unsigned)h->type > DG_PEER_HP_ERROR || port == 0 || h->nat > 3 || h->initiator > 1 ||
        (h->type == DG_PEER_HP_ERROR &&
         (h->error < DG_PEER_HP_ERR_NO_SUCH_PEER || h->error > DG_PEER_HP_ERR_BUSY)))
        return -EINVAL;
    n = holepunch_len(h->type, alen);
    payload[0] = (uint8_t)h->type;
    payload[1] = alen == 4 ? 4 : 6;
    memcpy(payload + 2, ip, alen);
    payload[2 + alen] = (uint8_t)(port >> 8);
    payload[3 + alen] = (uint8_t)port;
    uint8_t *q = payload + 4 + alen;
    if (h->type == DG_PEER_HP_ERROR) {
        q[0] = h->error;
    } else {
        q[0] = h->nat;
        if (h->type == DG_PEER_HP_CONNECT) {
            q[1] = h->initiator;
            memcpy(q + 2, h->nonce, DG_PEER_HP_NONCE_LEN);
        }
    }
    return put_bencoded(DG_PEER_MSG_HOLEPUNCH, payload, n, out, cap);
}

/* ---- hello ---- */

/* Looks a key up in the top-level dict: 1 with its token index in *at, 0 if absent. */
static int find_key(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                    const char *key, size_t *at)
{
    int i = dg_bencode_dict_find(buf, toks, ntoks, 0, key, strlen(key));

    if (i < 0)
        return 0;
    *at = (size_t)i;
    return 1;
}

/* Reads an optional integer key in [lo, hi]: 1 if present, 0 if absent, -EBADMSG. */
static int get_int_key(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                       const char *key, int64_t lo, int64_t hi, int64_t *v)
{
    size_t at;

    if (!find_key(buf, toks, ntoks, key, &at))
        return 0;
    if (dg_bencode_get_int(toks, ntoks, at, v) != 0 || *v < lo || *v > hi)
        return -EBADMSG;
    return 1;
}

/* Reads an optional string key: 1 if present, 0 if absent, -EBADMSG if not a string. */
static int get_str_key(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                       const char *key, const uint8_t **s, size_t *len)
{
    size_t at;

    if (!find_key(buf, toks, ntoks, key, &at))
        return 0;
    if (dg_bencode_get_str(buf, toks, ntoks, at, s, len) != 0)
        return -EBADMSG;
    return 1;
}

/* Decodes a hello or pex payload: a dictionary within the hello limits. */
static int parse_dict(const uint8_t *payload, size_t len, struct dg_bencode_token *toks,
                      size_t *ntoks)
{
    if (dg_bencode_parse(payload, len, toks, DG_PEER_HELLO_MAX_TOKENS, DG_PEER_HELLO_MAX_DEPTH,
                         ntoks) != 0)
        return -EBADMSG;
    return toks[0].type == DG_BENCODE_DICT ? 0 : -EBADMSG;
}

static int hello_fields(const uint8_t *payload, const struct dg_bencode_token *toks, size_t n,
                        struct dg_peer_hello *out)
{
    const uint8_t *s;
    size_t slen;
    int64_t v;
    int rc;

    if ((rc = get_int_key(payload, toks, n, "len", 0, (int64_t)DG_PEER_MAX_LENGTH, &v)) < 0)
        return rc;
    out->has_len = rc;
    out->len = rc ? (uint64_t)v : 0;
    if ((rc = get_int_key(payload, toks, n, "nat", 0, 3, &v)) < 0)
        return rc;
    out->has_nat = rc;
    out->nat = rc ? (uint8_t)v : 0;
    if ((rc = get_int_key(payload, toks, n, "p", 1, 65535, &v)) < 0)
        return rc;
    out->has_port = rc;
    out->port = rc ? (uint16_t)v : 0;
    if ((rc = get_int_key(payload, toks, n, "pex", 0, 1, &v)) < 0)
        return rc;
    out->has_pex = rc;
    out->pex = rc ? (int)v : 0;
    if ((rc = get_int_key(payload, toks, n, "reqq", 1, DG_PEER_REQQ_MAX, &v)) < 0)
        return rc;
    out->has_reqq = rc;
    out->reqq = rc ? (uint32_t)v : 0;

    rc = get_str_key(payload, toks, n, "root", &s, &slen);
    if (rc <= 0 || slen != DG_PEER_ROOT_LEN)
        return -EBADMSG;
    memcpy(out->root, s, DG_PEER_ROOT_LEN);

    if ((rc = get_str_key(payload, toks, n, "v", &s, &slen)) < 0)
        return rc;
    if (rc) {
        if (slen > DG_PEER_VERSION_MAX)
            return -EBADMSG;
        out->has_v = 1;
        if (slen > 0)
            memcpy(out->v, s, slen);
        out->v_len = slen;
    }
    if ((rc = get_str_key(payload, toks, n, "yourip", &s, &slen)) < 0)
        return rc;
    if (rc) {
        if (slen != 4 && slen != 16)
            return -EBADMSG;
        out->has_yourip = 1;
        memcpy(out->yourip, s, slen);
        out->yourip_len = slen;
    }
    return 0;
}

int dg_peer_hello_parse(const uint8_t *payload, size_t len, struct dg_peer_hello *out)
{
    struct dg_bencode_token toks[DG_PEER_HELLO_MAX_TOKENS];
    size_t n;
    int rc;

    memset(out, 0, sizeof(*out));
    rc = parse_dict(payload, len, toks, &n);
    if (rc == 0)
        rc = hello_fields(payload, toks, n, out);
    if (rc < 0)
        memset(out, 0, sizeof(*out));
    return rc;
}

int dg_peer_hello_encode(const struct dg_peer_hello *h, uint8_t *out, size_t cap)
{
    struct dg_bencode_writer w;

    if ((h->has_len && h->len > DG_PEER_MAX_LENGTH) || (h->has_port && h->port == 0) ||
        (h->has_nat && h->nat > 3) || (h->has_pex && h->pex != 0 && h->pex != 1) ||
        (h->has_reqq && (h->reqq == 0 || h->reqq > DG_PEER_REQQ_MAX)) ||
        (h->has_v && h->v_len > DG_PEER_VERSION_MAX) ||
        (h->has_yourip && h->yourip_len != 4 && h->yourip_len != 16))
        return -EINVAL;

    /* Keys in byte order: len, nat, p, pex, reqq, root, v, yourip. */
    dg_bencode_writer_init(&w, out, cap);
    dg_bencode_begin_dict(&w);
    if (h->has_len) {
        dg_bencode_put_cstr(&w, "len");
        dg_bencode_put_int(&w, (int64_t)h->len);
    }
    if (h->has_nat) {
        dg_bencode_put_cstr(&w, "nat");
        dg_bencode_put_int(&w, h->nat);
    }
    if (h->has_port) {
        dg_bencode_put_cstr(&w, "p");
        dg_bencode_put_int(&w, h->port);
    }
    if (h->has_pex) {
        dg_bencode_put_cstr(&w, "pex");
        dg_bencode_put_int(&w, h->pex);
    }
    if (h->has_reqq) {
        dg_bencode_put_cstr(&w, "reqq");
        dg_bencode_put_int(&w, h->reqq);
    }
    dg_bencode_put_cstr(&w, "root");
    dg_bencode_put_str(&w, h->root, DG_PEER_ROOT_LEN);
    if (h->has_v) {
        dg_bencode_put_cstr(&w, "v");
        dg_bencode_put_str(&w, h->v, h->v_len);
    }
    if (h->has_yourip) {
        dg_bencode_put_cstr(&w, "yourip");
        dg_bencode_put_str(&w, h->yourip, h->yourip_len);
    }
    dg_bencode_end(&w);
    return dg_bencode_writer_finish(&w);
}

/* ---- pex ---- */

/* Reads one optional pex list into (*list, *n). */
static int pex_list(const uint8_t *payload, const struct dg_bencode_token *toks, size_t ntoks,
                    const char *key, size_t entry, const uint8_t **list, size_t *n)
{
    const uint8_t *s;
    size_t slen;
    int rc = get_str_key(payload, toks, ntoks, key, &s, &slen);

    if (rc <= 0)
        return rc;
    if (slen % entry != 0 || slen / entry > DG_PEER_PEX_MAX)
        return -EBADMSG;
    *list = s;
    *n = slen / entry;
    return 0;
}

int dg_peer_pex_parse(const uint8_t *payload, size_t len, struct dg_peer_pex *out)
{
    struct dg_bencode_token toks[DG_PEER_HELLO_MAX_TOKENS];
    size_t n;
    int rc;

    memset(out, 0, sizeof(*out));
    rc = parse_dict(payload, len, toks, &n);
    if (rc == 0)
        rc = pex_list(payload, toks, n, "added", DG_PEER_PEX4_LEN, &out->added, &out->added_n);
    if (rc == 0)
        rc = pex_list(payload, toks, n, "added6", DG_PEER_PEX6_LEN, &out->added6, &out->added6_n);
    if (rc == 0)
        rc =
            pex_list(payload, toks, n, "dropped", DG_PEER_PEX4_LEN, &out->dropped, &out->dropped_n);
    if (rc == 0)
        rc = pex_list(payload, toks, n, "dropped6", DG_PEER_PEX6_LEN, &out->dropped6,
                      &out->dropped6_n);
    if (rc < 0)
        memset(out, 0, sizeof(*out));
    return rc;
}

static int pex_list_ok(const uint8_t *list, size_t n)
{
    return n <= DG_PEER_PEX_MAX && (list != NULL || n == 0);
}

static void put_pex_list(struct dg_bencode_writer *w, const char *key, const uint8_t *list,
                         size_t n, size_t entry)
{
    if (!list)
        return;
    dg_bencode_put_cstr(w, key);
    dg_bencode_put_str(w, list, n * entry);
}

int dg_peer_pex_encode(const struct dg_peer_pex *p, uint8_t *out, size_t cap)
{
    struct dg_bencode_writer w;

    if (!pex_list_ok(p->added, p->added_n) || !pex_list_ok(p->added6, p->added6_n) ||
        !pex_list_ok(p->dropped, p->dropped_n) || !pex_list_ok(p->dropped6, p->dropped6_n))
        return -EINVAL;
    /* Keys in byte order: added, added6, dropped, dropped6. */
    dg_bencode_writer_init(&w, out, cap);
    dg_bencode_begin_dict(&w);
    put_pex_list(&w, "added", p->added, p->added_n, DG_PEER_PEX4_LEN);
    put_pex_list(&w, "added6", p->added6, p->added6_n, DG_PEER_PEX6_LEN);
    put_pex_list(&w, "dropped", p->dropped, p->dropped_n, DG_PEER_PEX4_LEN);
    put_pex_list(&w, "dropped6", p->dropped6, p->dropped6_n, DG_PEER_PEX6_LEN);
    dg_bencode_end(&w);
    return dg_bencode_writer_finish(&w);
}
