/* libFuzzer target: the peer wire codec (engine/peer_msg.c) on an untrusted byte stream.
 *
 * The input is read as a handshake (whatever it gives) and then as the message stream after
 * one: dg_peer_msg_frame() cuts it into frames, each copied into a buffer of exactly its size
 * (so ASan sees any read past it) and parsed. Invariants:
 *   - framing gives -EAGAIN with the bytes still missing, -EMSGSIZE only for a length over the
 *     limit, or a frame that fits in what is there;
 *   - parsing a whole frame gives 0 or -EBADMSG, nothing else;
 *   - a parsed message, encoded again with its encoder, gives the same bytes (every encoding is
 *     canonical), and the encoder needs exactly that room;
 *   - the context checks return only their documented errors, and agree with simple oracles
 *     (a block whose data fills the file's last block passes; a have range that ends the file
 *     passes, one block less fails);
 *   - hello and pex payloads (the spans, and the whole input too) parse to contents that encode
 *     and parse back to the same contents, byte for byte when no unknown key was ignored. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bencode.h"
#include "engine/peer_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Top-level keys of a payload that parsed as hello or pex (so it is a dict within limits). */
static size_t top_keys(const uint8_t *p, size_t len)
{
    struct dg_bencode_token toks[DG_PEER_HELLO_MAX_TOKENS];
    size_t n;

    if (dg_bencode_parse(p, len, toks, DG_PEER_HELLO_MAX_TOKENS, DG_PEER_HELLO_MAX_DEPTH, &n) !=
            0 ||
        toks[0].type != DG_BENCODE_DICT)
        abort();
    return toks[0].count;
}

static void check_hello(const uint8_t *p, size_t len)
{
    struct dg_peer_hello h, again;
    uint8_t out[256];
    int rc = dg_peer_hello_parse(p, len, &h);

    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        return;
    }
    int n = dg_peer_hello_encode(&h, out, sizeof(out));
    if (n <= 0 || dg_peer_hello_parse(out, (size_t)n, &again) != 0)
        abort();
    if (memcmp(&h, &again, sizeof(h)) != 0)
        abort();
    size_t known =
        1 + (size_t)(h.has_len + h.has_port + h.has_pex + h.has_reqq + h.has_v + h.has_yourip);
    if (top_keys(p, len) == known && ((size_t)n != len || memcmp(out, p, len) != 0))
        abort();
}

static void same_list(const uint8_t *a, size_t an, const uint8_t *b, size_t bn, size_t entry)
{
    if ((a == NULL) != (b == NULL) || an != bn || (an && memcmp(a, b, an * entry) != 0))
        abort();
}

static void check_pex(const uint8_t *p, size_t len)
{
    struct dg_peer_pex x, again;
    uint8_t out[2600];
    int rc = dg_peer_pex_parse(p, len, &x);

    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        return;
    }
    int n = dg_peer_pex_encode(&x, out, sizeof(out));
    if (n <= 0 || dg_peer_pex_parse(out, (size_t)n, &again) != 0)
        abort();
    same_list(x.added, x.added_n, again.added, again.added_n, DG_PEER_PEX4_LEN);
    same_list(x.added6, x.added6_n, again.added6, again.added6_n, DG_PEER_PEX6_LEN);
    same_list(x.dropped, x.dropped_n, again.dropped, again.dropped_n, DG_PEER_PEX4_LEN);
    same_list(x.dropped6, x.dropped6_n, again.dropped6, again.dropped6_n, DG_PEER_PEX6_LEN);
    size_t known =
        (size_t)(x.added != NULL) + (x.added6 != NULL) + (x.dropped != NULL) + (x.dropped6 != NULL);
    if (top_keys(p, len) == known && ((size_t)n != len || memcmp(out, p, len) != 0))
        abort();
}

/* A holepunch payload: what parses encodes back to the same bytes, and only that. */
static void check_holepunch(const uint8_t *p, size_t len)
{
    struct dg_peer_holepunch h, again;
    uint8_t out[128];
    int rc = dg_peer_holepunch_parse(p, len, &h);

    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        return;
    }
    int n = dg_peer_msg_holepunch(&h, out, sizeof(out));
    if (n != (int)(5 + len) || memcmp(out + 5, p, len) != 0 || out[4] != DG_PEER_MSG_HOLEPUNCH)
        abort();
    if (dg_peer_holepunch_parse(out + 5, len, &again) != 0 || memcmp(&h, &again, sizeof(h)) != 0)
        abort();
    if (dg_peer_msg_holepunch(&h, out, (size_t)n - 1) != -ENOBUFS)
        abort();
}

/* Encodes @p m again with its encoder; returns the result (-1 for UNKNOWN). */
static int encode(const struct dg_peer_msg *m, uint8_t *out, size_t cap)
{
    switch (m->type) {
    case DG_PEER_MSG_CHOKE:
        return dg_peer_msg_choke(out, cap);
    case DG_PEER_MSG_UNCHOKE:
        return dg_peer_msg_unchoke(out, cap);
    case DG_PEER_MSG_INTERESTED:
        return dg_peer_msg_interested(out, cap);
    case DG_PEER_MSG_NOT_INTERESTED:
        return dg_peer_msg_not_interested(out, cap);
    case DG_PEER_MSG_HAVE_ALL:
        return dg_peer_msg_have_all(out, cap);
    case DG_PEER_MSG_HAVE_NONE:
        return dg_peer_msg_have_none(out, cap);
    case DG_PEER_MSG_KEEPALIVE:
        return dg_peer_msg_keepalive(out, cap);
    case DG_PEER_MSG_HAVE:
        return dg_peer_msg_have(m->first, m->count, out, cap);
    case DG_PEER_MSG_BITFIELD:
        return dg_peer_msg_bitfield(m->first, m->data, m->count, out, cap);
    case DG_PEER_MSG_REQUEST:
        return dg_peer_msg_request(m->block, out, cap);
    case DG_PEER_MSG_CANCEL:
        return dg_peer_msg_cancel(m->block, out, cap);
    case DG_PEER_MSG_REJECT:
        return dg_peer_msg_reject(m->block, out, cap);
    case DG_PEER_MSG_BLOCK:
        return dg_peer_msg_block(m->block, m->data, m->data_len, out, cap);
    case DG_PEER_MSG_HASH_REQUEST:
        return dg_peer_msg_hash_request(m->layer, m->index, m->count, m->proof_layers, out, cap);
    case DG_PEER_MSG_HASHES:
        return dg_peer_msg_hashes(m->layer, m->index, m->count, m->proof_layers, m->data,
                                  m->data_len / DG_PEER_HASH_LEN, out, cap);
    case DG_PEER_MSG_HASH_REJECT:
        return dg_peer_msg_hash_reject(m->layer, m->index, m->count, m->proof_layers, out, cap);
    case DG_PEER_MSG_HELLO:
        return dg_peer_msg_hello(m->data, m->data_len, out, cap);
    case DG_PEER_MSG_PEX:
        return dg_peer_msg_pex(m->data, m->data_len, out, cap);
    default:
        return -1;
    }
}

static void check_context(const struct dg_peer_msg *m)
{
    const uint64_t B = DG_PEER_BLOCK_SIZE;
    const uint64_t lengths[] = {0,
                                1,
                                B,
                                5 * B + 17,
                                (uint64_t)m->block * B + m->data_len,
                                ((uint64_t)m->first + m->count) * B,
                                m->layer < 32 ? ((uint64_t)m->index << m->layer) * B + 1 : 0,
                                DG_PEER_MAX_LENGTH};

    for (size_t i = 0; i < sizeof(lengths) / sizeof(lengths[0]); i++) {
        int rc = dg_peer_msg_check(m, lengths[i]);
        if (rc != 0 && rc != -EBADMSG && rc != -ERANGE)
            abort();
        if (rc == 0 && m->type == DG_PEER_MSG_HASH_REQUEST &&
            (uint64_t)m->index + m->count > dg_peer_layer_nodes(lengths[i], m->layer))
            abort();
    }
    /* Oracles. */
    if (m->type == DG_PEER_MSG_BLOCK) {
        /* The file that ends with this block, as long as it is: the last block fits. */
        if (dg_peer_check_block(m, (uint64_t)m->block * B + m->data_len) != 0)
            abort();
        /* A file one block longer: only a whole block fits. */
        int rc = dg_peer_check_block(m, ((uint64_t)m->block + 2) * B);
        if ((rc == 0) != (m->data_len == B))
            abort();
    }
    if (m->type == DG_PEER_MSG_HAVE) {
        uint64_t end = (uint64_t)m->first + m->count;
        if (dg_peer_check_have(m, end * B) != 0 || dg_peer_check_have(m, (end - 1) * B) == 0)
            abort();
    }
    if (m->type == DG_PEER_MSG_BITFIELD &&
        dg_peer_check_bitfield(m, ((uint64_t)m->first + m->count) * B) != 0)
        abort();
}

static void check_frame(const uint8_t *frame, size_t len)
{
    struct dg_peer_msg m;
    int rc = dg_peer_msg_parse(frame, len, &m);

    if (rc != 0) {
        if (rc != -EBADMSG || m.type != 0 || m.data != NULL)
            abort();
        return;
    }
    if (m.data && (m.data < frame || m.data + m.data_len > frame + len))
        abort();

    uint8_t *out = malloc(len);
    if (!out)
        return;
    int n = encode(&m, out, len);
    if (m.type == DG_PEER_MSG_UNKNOWN) {
        if (m.id <= DG_PEER_MSG_HAVE_NONE ||
            (m.id >= DG_PEER_MSG_HELLO && m.id <= DG_PEER_MSG_HOLEPUNCH))
            abort();
    } else if (m.type == DG_PEER_MSG_HOLEPUNCH) {
        /* delimited only here; check_holepunch() judges the payload */
    } else if (m.type == DG_PEER_MSG_HASH_REQUEST &&
               (m.count == 0 || m.count > DG_PEER_HASH_MAX_COUNT ||
                m.proof_layers > DG_PEER_HASH_MAX_PROOF)) {
        /* Well-formed but outside the limits: we never send such a request. */
        if (n != -EINVAL || dg_peer_check_hash_request(&m, DG_PEER_MAX_LENGTH) != -ERANGE)
            abort();
    } else {
        if (n != (int)len || memcmp(out, frame, len) != 0)
            abort();
        if (encode(&m, out, len - 1) != -ENOBUFS)
            abort();
    }
    free(out);

    check_context(&m);
    if (m.type == DG_PEER_MSG_HELLO)
        check_hello(m.data, m.data_len);
    if (m.type == DG_PEER_MSG_PEX)
        check_pex(m.data, m.data_len);
    if (m.type == DG_PEER_MSG_HOLEPUNCH)
        check_holepunch(m.data, m.data_len);
    if (m.type == DG_PEER_MSG_BLOCK) {
        uint8_t hdr[DG_PEER_BLOCK_HEADER_LEN];
        if (dg_peer_msg_block_header(m.block, m.data_len, hdr) != DG_PEER_BLOCK_HEADER_LEN ||
            memcmp(hdr, frame, sizeof(hdr)) != 0)
            abort();
    }
}

static void check_handshake(const uint8_t *data, size_t size)
{
    struct dg_peer_handshake h;
    uint8_t out[DG_PEER_HANDSHAKE_LEN];
    int rc = dg_peer_handshake_parse(data, size, &h);

    if (rc == -EAGAIN) {
        if (size >= DG_PEER_HANDSHAKE_LEN)
            abort();
        return;
    }
    if (rc == -EPROTO)
        return;
    if (rc != 0 || size < DG_PEER_HANDSHAKE_LEN)
        abort();
    dg_peer_handshake_encode(h.swarm_key, h.node_id, out);
    if (memcmp(out, data, 8) != 0 || memcmp(out + 16, data + 16, 40) != 0 ||
        memcmp(h.reserved, data + 8, 8) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly `size` bytes, so ASan sees any read past the input. */
    uint8_t *copy = malloc(size ? size : 1);
    size_t off = 0;

    if (!copy)
        return 0;
    memcpy(copy, data, size);
    check_handshake(copy, size);
    check_hello(copy, size);
    check_pex(copy, size);
    check_holepunch(copy, size);

    while (off < size) {
        size_t left = size - off, flen = 12345;
        int rc = dg_peer_msg_frame(copy + off, left, &flen);

        if (rc == -EAGAIN) {
            if (flen <= left || (left < 4 && flen != 4) || flen > DG_PEER_FRAME_MAX)
                abort();
            break;
        }
        if (rc == -EMSGSIZE) {
            if (flen != 0)
                abort();
            break;
        }
        if (rc != 0 || flen < 4 || flen > left || flen > DG_PEER_FRAME_MAX)
            abort();
        uint8_t *frame = malloc(flen);
        if (!frame)
            break;
        memcpy(frame, copy + off, flen);
        check_frame(frame, flen);
        free(frame);
        off += flen;
    }
    free(copy);
    return 0;
}
