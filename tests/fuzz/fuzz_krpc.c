/* libFuzzer target: dg_krpc_parse() on untrusted UDP payloads.
 *
 * Invariants: a rejected message leaves at most a query envelope (for an error reply); an
 * accepted one has its required fields, limits respected and every pointer inside the input.
 * An accepted message is encoded again with the matching encoder (queries ping, find_node,
 * get_peers, announce_peer; responses by the fields they carry; errors); that encoding parses,
 * keeps every field it carries, and encoding the result once more gives the same bytes. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/krpc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct dg_krpc_msg first, second, third;

static void inside(const uint8_t *buf, size_t size, const uint8_t *p, size_t len)
{
    if (!p) {
        if (len)
            abort();
        return;
    }
    if (p < buf || p > buf + size || len > (size_t)(buf + size - p))
        abort();
}

static void check_msg(const uint8_t *buf, size_t size, const struct dg_krpc_msg *m)
{
    if (m->tid_len < 1 || m->tid_len > DG_KRPC_TID_MAX)
        abort();
    if ((m->type == DG_KRPC_QUERY || m->type == DG_KRPC_RESPONSE) && !(m->has & DG_KRPC_HAS_ID))
        abort();
    if ((m->type == DG_KRPC_QUERY) != (m->method != DG_KRPC_NONE))
        abort();
    if (m->type != DG_KRPC_QUERY && m->type != DG_KRPC_RESPONSE && m->type != DG_KRPC_ERROR)
        abort();
    if (m->nvalues > DG_KRPC_MAX_VALUES || (m->values_dropped && m->nvalues != DG_KRPC_MAX_VALUES))
        abort();
    if ((m->has & DG_KRPC_HAS_TOKEN) && (m->token_len < 1 || m->token_len > DG_KRPC_TOKEN_MAX))
        abort();
    if ((m->has & DG_KRPC_HAS_IP) && m->ip_len != 6 && m->ip_len != 18)
        abort();
    if (m->salt_len > DG_KRPC_SALT_MAX)
        abort();
    inside(buf, size, m->name, m->name_len);
    inside(buf, size, m->version, m->version_len);
    inside(buf, size, m->ip, m->ip_len);
    inside(buf, size, m->token, m->token_len);
    if (m->nnodes > size / DG_KRPC_NODE_LEN || m->nnodes6 > size / DG_KRPC_NODE6_LEN)
        abort();
    inside(buf, size, m->nodes, m->nnodes * DG_KRPC_NODE_LEN);
    inside(buf, size, m->nodes6, m->nnodes6 * DG_KRPC_NODE6_LEN);
    for (size_t i = 0; i < m->nvalues; i++) {
        if (m->values[i].len != 6 && m->values[i].len != 18)
            abort();
        inside(buf, size, m->values[i].addr, m->values[i].len);
    }
    inside(buf, size, m->value, m->value_len);
    inside(buf, size, m->salt, m->salt_len);
    inside(buf, size, m->error_msg, m->error_msg_len);

    int rc = dg_krpc_check_query(m);
    if (m->type == DG_KRPC_QUERY ? (rc != 0 && rc != -EBADMSG && rc != -ENOSYS) : rc != -EINVAL)
        abort();
}

/* Encodes @p m with the encoder that fits it. @return the length, 0 if none fits, or abort(). */
static int encode(const struct dg_krpc_msg *m, uint8_t *out, size_t cap)
{
    const struct dg_krpc_hdr h = {
        .tid = m->tid,
        .tid_len = m->tid_len,
        .version = (m->has & DG_KRPC_HAS_VERSION) ? m->version : NULL,
        .version_len = (m->has & DG_KRPC_HAS_VERSION) ? m->version_len : 0,
        .ip = (m->has & DG_KRPC_HAS_IP) ? m->ip : NULL,
        .ip_len = (m->has & DG_KRPC_HAS_IP) ? m->ip_len : 0,
    };
    const uint8_t *nodes = (m->has & DG_KRPC_HAS_NODES) ? m->nodes : NULL;
    const uint8_t *nodes6 = (m->has & DG_KRPC_HAS_NODES6) ? m->nodes6 : NULL;
    int len = 0;

    switch (m->type) {
    case DG_KRPC_QUERY:
        if (m->method == DG_KRPC_PING)
            len = dg_krpc_encode_ping(out, cap, &h, m->id);
        else if (m->method == DG_KRPC_FIND_NODE && (m->has & DG_KRPC_HAS_TARGET))
            len = dg_krpc_encode_find_node(out, cap, &h, m->id, m->target, m->want);
        else if (m->method == DG_KRPC_GET_PEERS && (m->has & DG_KRPC_HAS_INFO_HASH))
            len = dg_krpc_encode_get_peers(out, cap, &h, m->id, m->info_hash, m->want);
        else if (m->method == DG_KRPC_ANNOUNCE_PEER && (m->has & DG_KRPC_HAS_INFO_HASH) &&
                 (m->has & DG_KRPC_HAS_TOKEN))
            len = dg_krpc_encode_announce_peer(out, cap, &h, m->id, m->info_hash, m->port,
                                               m->implied_port, m->token, m->token_len);
        break;
    case DG_KRPC_RESPONSE:
        if (m->has & (DG_KRPC_HAS_TOKEN | DG_KRPC_HAS_VALUES))
            len = dg_krpc_encode_get_peers_response(
                out, cap, &h, m->id, (m->has & DG_KRPC_HAS_TOKEN) ? m->token : NULL,
                (m->has & DG_KRPC_HAS_TOKEN) ? m->token_len : 0,
                (m->has & DG_KRPC_HAS_VALUES) ? m->values : NULL, m->nvalues, nodes, m->nnodes,
                nodes6, m->nnodes6);
        else if (m->has & (DG_KRPC_HAS_NODES | DG_KRPC_HAS_NODES6))
            len = dg_krpc_encode_find_node_response(out, cap, &h, m->id, nodes, m->nnodes, nodes6,
                                                    m->nnodes6);
        else
            len = dg_krpc_encode_ping_response(out, cap, &h, m->id);
        break;
    case DG_KRPC_ERROR:
        len = dg_krpc_encode_error(out, cap, &h, m->error_code, m->error_msg, m->error_msg_len);
        break;
    default:
        abort();
    }
    if (len < 0)
        abort(); /* the buffers are large enough, and parsed fields are always in range */
    return len;
}

static void same_bytes(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    if (alen != blen || (alen && memcmp(a, b, alen) != 0))
        abort();
}

/* The fields the encoders carry survive. */
static void same_msg(const struct dg_krpc_msg *a, const struct dg_krpc_msg *b)
{
    const unsigned carried = DG_KRPC_HAS_VERSION | DG_KRPC_HAS_IP | DG_KRPC_HAS_ID;

    if (a->type != b->type || a->method != b->method || (a->has & carried) != (b->has & carried))
        abort();
    same_bytes(a->tid, a->tid_len, b->tid, b->tid_len);
    same_bytes(a->version, a->version_len, b->version, b->version_len);
    same_bytes(a->ip, a->ip_len, b->ip, b->ip_len);
    if (memcmp(a->id, b->id, DG_KRPC_ID_LEN) != 0)
        abort();
    switch (a->type) {
    case DG_KRPC_QUERY:
        same_bytes(a->name, a->name_len, b->name, b->name_len);
        if (a->method == DG_KRPC_FIND_NODE &&
            (memcmp(a->target, b->target, DG_KRPC_ID_LEN) != 0 || a->want != b->want))
            abort();
        if ((a->method == DG_KRPC_GET_PEERS || a->method == DG_KRPC_ANNOUNCE_PEER) &&
            memcmp(a->info_hash, b->info_hash, DG_KRPC_ID_LEN) != 0)
            abort();
        if (a->method == DG_KRPC_GET_PEERS && a->want != b->want)
            abort();
        if (a->method == DG_KRPC_ANNOUNCE_PEER) {
            if (a->port != b->port || a->implied_port != b->implied_port)
                abort();
            same_bytes(a->token, a->token_len, b->token, b->token_len);
        }
        break;
    case DG_KRPC_RESPONSE: {
        const unsigned fields =
            DG_KRPC_HAS_TOKEN | DG_KRPC_HAS_VALUES | DG_KRPC_HAS_NODES | DG_KRPC_HAS_NODES6;

        if ((a->has & fields) != (b->has & fields))
            abort();
        same_bytes(a->token, a->token_len, b->token, b->token_len);
        same_bytes(a->nodes, a->nnodes * DG_KRPC_NODE_LEN, b->nodes, b->nnodes * DG_KRPC_NODE_LEN);
        same_bytes(a->nodes6, a->nnodes6 * DG_KRPC_NODE6_LEN, b->nodes6,
                   b->nnodes6 * DG_KRPC_NODE6_LEN);
        if (a->nvalues != b->nvalues || b->values_skipped || b->values_dropped)
            abort();
        for (size_t i = 0; i < a->nvalues; i++)
            same_bytes(a->values[i].addr, a->values[i].len, b->values[i].addr, b->values[i].len);
        break;
    }
    case DG_KRPC_ERROR:
        if (a->error_code != b->error_code)
            abort();
        same_bytes(a->error_msg, a->error_msg_len, b->error_msg, b->error_msg_len);
        break;
    default:
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly `size` bytes, so ASan sees any read past the input. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    int rc = dg_krpc_parse(copy, size, &first);
    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        if (first.type != DG_KRPC_INVALID &&
            (first.type != DG_KRPC_QUERY || first.tid_len < 1 || first.tid_len > 16))
            abort();
        free(copy);
        return 0;
    }
    check_msg(copy, size, &first);

    /* Re-encoding can add a little (a missing announce port, "1" for implied_port). */
    size_t cap = size + 64;
    uint8_t *out1 = malloc(cap), *out2 = malloc(cap);
    if (!out1 || !out2)
        abort();
    int len1 = encode(&first, out1, cap);
    if (len1 > 0) {
        if (dg_krpc_parse(out1, (size_t)len1, &second) != 0)
            abort();
        check_msg(out1, (size_t)len1, &second);
        same_msg(&first, &second);
        int len2 = encode(&second, out2, cap);
        same_bytes(out1, (size_t)len1, out2, (size_t)len2);
        if (dg_krpc_parse(out2, (size_t)len2, &third) != 0)
            abort();
        same_msg(&second, &third);
    }
    free(out2);
    free(out1);
    free(copy);
    return 0;
}
