/* KRPC messages of the Mainline DHT: decoding with bounded work, canonical encoding.
 * See krpc.h for what is accepted. */
#include "engine/krpc.h"

#include <errno.h>
#include <string.h>

#include "engine/bencode.h"

/* ---- decoding ---- */

struct doc {
    const uint8_t *buf;
    const struct dg_bencode_token *toks;
    size_t ntoks;
};

static const char *const method_names[] = {
    [DG_KRPC_PING] = "ping",
    [DG_KRPC_FIND_NODE] = "find_node",
    [DG_KRPC_GET_PEERS] = "get_peers",
    [DG_KRPC_ANNOUNCE_PEER] = "announce_peer",
    [DG_KRPC_GET] = "get",
    [DG_KRPC_PUT] = "put",
};

static int bytes_eq(const uint8_t *s, size_t len, const char *lit)
{
    size_t n = strlen(lit);

    return len == n && memcmp(s, lit, n) == 0;
}

static int key_is(const struct doc *d, size_t key, const char *lit)
{
    return bytes_eq(d->buf + d->toks[key].off, d->toks[key].len, lit);
}

/* The string at token @p i, which must be a string of @p min..@p max bytes. */
static int get_str(const struct doc *d, size_t i, size_t min, size_t max, const uint8_t **s,
                   size_t *len)
{
    int rc = dg_bencode_get_str(d->buf, d->toks, d->ntoks, i, s, len);

    if (rc)
        return -EBADMSG;
    if (*len < min || *len > max)
        return -EBADMSG;
    return 0;
}

/* Copies the string at token @p i, which must be exactly @p n bytes, into @p out. */
static int get_fixed(const struct doc *d, size_t i, uint8_t *out, size_t n)
{
    const uint8_t *s;
    size_t len;
    int rc = get_str(d, i, n, n, &s, &len);

    if (rc)
        return rc;
    memcpy(out, s, n);
    return 0;
}

static int get_int(const struct doc *d, size_t i, int64_t *v)
{
    return dg_bencode_get_int(d->toks, d->ntoks, i, v) ? -EBADMSG : 0;
}

/* A string of a multiple of @p unit bytes: pointer and entry count. */
static int get_compact(const struct doc *d, size_t i, size_t unit, const uint8_t **p, size_t *count)
{
    size_t len;
    int rc = get_str(d, i, 0, SIZE_MAX, p, &len);

    if (rc)
        return rc;
    if (len % unit)
        return -EBADMSG;
    *count = len / unit;
    return 0;
}

static int get_want(const struct doc *d, size_t list, unsigned *want)
{
    if (d->toks[list].type != DG_BENCODE_LIST)
        return -EBADMSG;
    *want = 0;
    for (size_t k = 0, i = list + 1; k < d->toks[list].count; k++, i = d->toks[i].next) {
        const uint8_t *s;
        size_t len;

        if (dg_bencode_get_str(d->buf, d->toks, d->ntoks, i, &s, &len))
            continue; /* BEP 32: unknown entries are ignored */
        if (bytes_eq(s, len, "n4"))
            *want |= DG_KRPC_WANT_N4;
        else if (bytes_eq(s, len, "n6"))
            *want |= DG_KRPC_WANT_N6;
    }
    return 0;
}

static int get_values(const struct doc *d, size_t list, struct dg_krpc_msg *m)
{
    if (d->toks[list].type != DG_BENCODE_LIST)
        return -EBADMSG;
    for (size_t k = 0, i = list + 1; k < d->toks[list].count; k++, i = d->toks[i].next) {
        const struct dg_bencode_token *t = &d->toks[i];

        if (t->type != DG_BENCODE_STR ||
            (t->len != DG_KRPC_PEER_LEN && t->len != DG_KRPC_PEER6_LEN)) {
            m->values_skipped++;
        } else if (m->nvalues == DG_KRPC_MAX_VALUES) {
            m->values_dropped++;
        } else {
            m->values[m->nvalues].addr = d->buf + t->off;
            m->values[m->nvalues].len = t->len;
            m->nvalues++;
        }
    }
    return 0;
}

/* One key-value pair of "a" or "r". */
static int parse_arg(const struct doc *d, size_t key, size_t val, struct dg_krpc_msg *m)
{
    int64_t v;
    int rc;

    if (key_is(d, key, "id")) {
        m->has |= DG_KRPC_HAS_ID;
        return get_fixed(d, val, m->id, DG_KRPC_ID_LEN);
    }
    if (key_is(d, key, "target")) {
        m->has |= DG_KRPC_HAS_TARGET;
        return get_fixed(d, val, m->target, DG_KRPC_ID_LEN);
    }
    if (key_is(d, key, "info_hash")) {
        m->has |= DG_KRPC_HAS_INFO_HASH;
        return get_fixed(d, val, m->info_hash, DG_KRPC_ID_LEN);
    }
    if (key_is(d, key, "token")) {
        m->has |= DG_KRPC_HAS_TOKEN;
        return get_str(d, val, 1, DG_KRPC_TOKEN_MAX, &m->token, &m->token_len);
    }
    if (key_is(d, key, "port")) {
        m->has |= DG_KRPC_HAS_PORT;
        rc = get_int(d, val, &v);
        if (rc == 0 && (v < 0 || v > 65535))
            rc = -EBADMSG;
        m->port = rc ? 0 : (uint16_t)v;
        return rc;
    }
    if (key_is(d, key, "implied_port")) {
        m->has |= DG_KRPC_HAS_IMPLIED_PORT;
        rc = get_int(d, val, &v);
        m->implied_port = rc == 0 && v != 0;
        return rc;
    }
    if (key_is(d, key, "want")) {
        m->has |= DG_KRPC_HAS_WANT;
        return get_want(d, val, &m->want);
    }
    if (key_is(d, key, "nodes")) {
        m->has |= DG_KRPC_HAS_NODES;
        return get_compact(d, val, DG_KRPC_NODE_LEN, &m->nodes, &m->nnodes);
    }
    if (key_is(d, key, "nodes6")) {
        m->has |= DG_KRPC_HAS_NODES6;
        return get_compact(d, val, DG_KRPC_NODE6_LEN, &m->nodes6, &m->nnodes6);
    }
    if (key_is(d, key, "values")) {
        m->has |= DG_KRPC_HAS_VALUES;
        return get_values(d, val, m);
    }
    if (key_is(d, key, "v")) {
        size_t start, len;

        m->has |= DG_KRPC_HAS_VALUE;
        dg_bencode_span(d->toks, d->ntoks, val, &start, &len);
        m->value = d->buf + start;
        m->value_len = len;
        return 0;
    }
    if (key_is(d, key, "k")) {
        m->has |= DG_KRPC_HAS_KEY;
        return get_fixed(d, val, m->key, DG_KRPC_KEY_LEN);
    }
    if (key_is(d, key, "sig")) {
        m->has |= DG_KRPC_HAS_SIG;
        return get_fixed(d, val, m->sig, DG_KRPC_SIG_LEN);
    }
    if (key_is(d, key, "seq")) {
        m->has |= DG_KRPC_HAS_SEQ;
        return get_int(d, val, &m->seq);
    }
    if (key_is(d, key, "salt")) {
        m->has |= DG_KRPC_HAS_SALT;
        return get_str(d, val, 0, DG_KRPC_SALT_MAX, &m->salt, &m->salt_len);
    }
    if (key_is(d, key, "cas")) {
        m->has |= DG_KRPC_HAS_CAS;
        return get_int(d, val, &m->cas);
    }
    return 0; /* unknown keys are for extensions we do not speak */
}

/* Reads the "a" or "r" dict at @p dict; with @p id_only, every key but "id" is skipped. */
static int parse_args(const struct doc *d, size_t dict, int id_only, struct dg_krpc_msg *m)
{
    if (d->toks[dict].type != DG_BENCODE_DICT)
        return -EBADMSG;
    for (size_t k = 0, i = dict + 1; k < d->toks[dict].count; k++) {
        size_t val = i + 1;
        int rc = 0;

        if (!id_only || key_is(d, i, "id"))
            rc = parse_arg(d, i, val, m);
        if (rc)
            return rc;
        i = d->toks[val].next;
    }
    return (m->has & DG_KRPC_HAS_ID) ? 0 : -EBADMSG;
}

static int parse_error(const struct doc *d, size_t list, struct dg_krpc_msg *m)
{
    if (d->toks[list].type != DG_BENCODE_LIST || d->toks[list].count < 2)
        return -EBADMSG;
    size_t code = list + 1;
    size_t msg = d->toks[code].next;

    if (get_int(d, code, &m->error_code))
        return -EBADMSG;
    return get_str(d, msg, 0, SIZE_MAX, &m->error_msg, &m->error_msg_len);
}

static enum dg_krpc_method method_of(const uint8_t *name, size_t len)
{
    for (size_t i = 0; i < sizeof(method_names) / sizeof(method_names[0]); i++)
        if (method_names[i] && bytes_eq(name, len, method_names[i]))
            return (enum dg_krpc_method)i;
    return DG_KRPC_UNKNOWN;
}

/* Parses the message once the bencoding is known good; fills @p m. */
static int parse_msg(const struct doc *d, struct dg_krpc_msg *m)
{
    const struct dg_bencode_token *toks = d->toks;
    size_t a = 0, r = 0, e = 0; /* 0: absent (index 0 is the message itself) */
    const uint8_t *y = NULL, *t = NULL;
    size_t y_len = 0, t_len = 0;
    int have_q = 0;

    if (toks[0].type != DG_BENCODE_DICT)
        return -EBADMSG;
    for (size_t k = 0, i = 1; k < toks[0].count; k++) {
        size_t val = i + 1;
        const uint8_t *s;
        size_t len;

        if (key_is(d, i, "t")) {
            if (get_str(d, val, 1, DG_KRPC_TID_MAX, &t, &t_len))
                return -EBADMSG;
        } else if (key_is(d, i, "y")) {
            if (get_str(d, val, 1, 1, &y, &y_len))
                return -EBADMSG;
        } else if (key_is(d, i, "q")) {
            if (get_str(d, val, 0, SIZE_MAX, &m->name, &m->name_len))
                return -EBADMSG;
            have_q = 1;
        } else if (key_is(d, i, "a")) {
            a = val;
        } else if (key_is(d, i, "r")) {
            r = val;
        } else if (key_is(d, i, "e")) {
            e = val;
        } else if (key_is(d, i, "v")) {
            /* Advisory: a "v" that is not a string is ignored. */
            if (dg_bencode_get_str(d->buf, toks, d->ntoks, val, &s, &len) == 0) {
                m->has |= DG_KRPC_HAS_VERSION;
                m->version = s;
                m->version_len = len;
            }
        } else if (key_is(d, i, "ip")) {
            if (dg_bencode_get_str(d->buf, toks, d->ntoks, val, &s, &len) == 0 &&
                (len == DG_KRPC_PEER_LEN || len == DG_KRPC_PEER6_LEN)) {
                m->has |= DG_KRPC_HAS_IP;
                m->ip = s;
                m->ip_len = len;
            }
        } else if (key_is(d, i, "ro")) {
            int64_t v;

            if (dg_bencode_get_int(toks, d->ntoks, val, &v) == 0) {
                m->has |= DG_KRPC_HAS_RO;
                m->read_only = v != 0;
            }
        }
        i = toks[val].next;
    }
    if (!t || !y)
        return -EBADMSG;
    memcpy(m->tid, t, t_len);
    m->tid_len = t_len;

    switch (y[0]) {
    case 'q':
        m->type = DG_KRPC_QUERY;
        if (!have_q || !a)
            return -EBADMSG;
        m->method = method_of(m->name, m->name_len);
        return parse_args(d, a, m->method == DG_KRPC_UNKNOWN, m);
    case 'r':
        if (!r)
            return -EBADMSG;
        m->type = DG_KRPC_RESPONSE;
        return parse_args(d, r, 0, m);
    case 'e':
        if (!e)
            return -EBADMSG;
        m->type = DG_KRPC_ERROR;
        return parse_error(d, e, m);
    default:
        return -EBADMSG;
    }
}

int dg_krpc_parse(const uint8_t *buf, size_t len, struct dg_krpc_msg *out)
{
    struct dg_bencode_token toks[DG_KRPC_MAX_TOKENS];
    struct doc d = {.buf = buf, .toks = toks, .ntoks = 0};
    int rc;

    memset(out, 0, sizeof(*out));
    rc = dg_bencode_parse(buf, len, toks, DG_KRPC_MAX_TOKENS, DG_KRPC_MAX_DEPTH, &d.ntoks);
    if (rc)
        return -EBADMSG;
    rc = parse_msg(&d, out);
    if (rc) {
        /* Keep only what lets a query be answered with an error. */
        if (out->type != DG_KRPC_QUERY)
            out->type = DG_KRPC_INVALID;
        return -EBADMSG;
    }
    return 0;
}

int dg_krpc_check_query(const struct dg_krpc_msg *m)
{
    const unsigned mutable_bits = DG_KRPC_HAS_KEY | DG_KRPC_HAS_SIG | DG_KRPC_HAS_SEQ;

    if (m->type != DG_KRPC_QUERY)
        return -EINVAL;
    switch (m->method) {
    case DG_KRPC_PING:
        return 0;
    case DG_KRPC_FIND_NODE:
    case DG_KRPC_GET:
        return (m->has & DG_KRPC_HAS_TARGET) ? 0 : -EBADMSG;
    case DG_KRPC_GET_PEERS:
        return (m->has & DG_KRPC_HAS_INFO_HASH) ? 0 : -EBADMSG;
    case DG_KRPC_ANNOUNCE_PEER:
        if (!(m->has & DG_KRPC_HAS_INFO_HASH) || !(m->has & DG_KRPC_HAS_TOKEN))
            return -EBADMSG;
        if (!m->implied_port && (!(m->has & DG_KRPC_HAS_PORT) || m->port == 0))
            return -EBADMSG;
        return 0;
    case DG_KRPC_PUT:
        if (!(m->has & DG_KRPC_HAS_VALUE) || !(m->has & DG_KRPC_HAS_TOKEN))
            return -EBADMSG;
        if ((m->has & mutable_bits) != 0 && (m->has & mutable_bits) != mutable_bits)
            return -EBADMSG;
        if ((m->has & (DG_KRPC_HAS_SALT | DG_KRPC_HAS_CAS)) && !(m->has & DG_KRPC_HAS_KEY))
            return -EBADMSG;
        return 0;
    case DG_KRPC_UNKNOWN:
        return -ENOSYS;
    default:
        return -EINVAL;
    }
}

/* ---- encoding ---- */

static int check_hdr(const struct dg_krpc_hdr *h)
{
    if (!h || !h->tid || h->tid_len < 1 || h->tid_len > DG_KRPC_TID_MAX)
        return -EINVAL;
    if (!h->version && h->version_len)
        return -EINVAL;
    if (h->ip && h->ip_len != DG_KRPC_PEER_LEN && h->ip_len != DG_KRPC_PEER6_LEN)
        return -EINVAL;
    if (!h->ip && h->ip_len)
        return -EINVAL;
    return 0;
}

static int check_token(const uint8_t *token, size_t len)
{
    return token && len >= 1 && len <= DG_KRPC_TOKEN_MAX ? 0 : -EINVAL;
}

static int check_compact(const uint8_t *p, size_t count, size_t unit)
{
    if (!p && count)
        return -EINVAL;
    if (count > SIZE_MAX / unit)
        return -ENOBUFS;
    return 0;
}

static void put_key(struct dg_bencode_writer *w, const char *key)
{
    dg_bencode_put_cstr(w, key);
}

static void put_ip(struct dg_bencode_writer *w, const struct dg_krpc_hdr *h)
{
    if (h->ip) {
        put_key(w, "ip");
        dg_bencode_put_str(w, h->ip, h->ip_len);
    }
}

/* Writes "t", "v", "y" (the keys after "a", "e", "ip", "q" and "r") and closes the message. */
static int finish_msg(struct dg_bencode_writer *w, const struct dg_krpc_hdr *h, const char *y)
{
    put_key(w, "t");
    dg_bencode_put_str(w, h->tid, h->tid_len);
    if (h->version) {
        put_key(w, "v");
        dg_bencode_put_str(w, h->version, h->version_len);
    }
    put_key(w, "y");
    dg_bencode_put_cstr(w, y);
    dg_bencode_end(w);
    return dg_bencode_writer_finish(w);
}

/* Opens a query: "d", "a" and its dict with "id" (the first key of every "a"). */
static void query_begin(struct dg_bencode_writer *w, const uint8_t id[DG_KRPC_ID_LEN])
{
    dg_bencode_begin_dict(w);
    put_key(w, "a");
    dg_bencode_begin_dict(w);
    put_key(w, "id");
    dg_bencode_put_str(w, id, DG_KRPC_ID_LEN);
}

/* Closes "a" and writes the rest of a query called @p method. */
static int query_end(struct dg_bencode_writer *w, const struct dg_krpc_hdr *h, const char *method)
{
    dg_bencode_end(w);
    put_ip(w, h);
    put_key(w, "q");
    dg_bencode_put_cstr(w, method);
    return finish_msg(w, h, "q");
}

/* Opens a response: "d", "ip", "r" and its dict with "id". */
static void response_begin(struct dg_bencode_writer *w, const struct dg_krpc_hdr *h,
                           const uint8_t id[DG_KRPC_ID_LEN])
{
    dg_bencode_begin_dict(w);
    put_ip(w, h);
    put_key(w, "r");
    dg_bencode_begin_dict(w);
    put_key(w, "id");
    dg_bencode_put_str(w, id, DG_KRPC_ID_LEN);
}

static int response_end(struct dg_bencode_writer *w, const struct dg_krpc_hdr *h)
{
    dg_bencode_end(w);
    return finish_msg(w, h, "r");
}

static void put_want(struct dg_bencode_writer *w, unsigned want)
{
    if (!want)
        return;
    put_key(w, "want");
    dg_bencode_begin_list(w);
    if (want & DG_KRPC_WANT_N4)
        dg_bencode_put_cstr(w, "n4");
    if (want & DG_KRPC_WANT_N6)
        dg_bencode_put_cstr(w, "n6");
    dg_bencode_end(w);
}

static void put_nodes(struct dg_bencode_writer *w, const uint8_t *nodes, size_t nnodes,
                      const uint8_t *nodes6, size_t nnodes6)
{
    if (nodes) {
        put_key(w, "nodes");
        dg_bencode_put_str(w, nodes, nnodes * DG_KRPC_NODE_LEN);
    }
    if (nodes6) {
        put_key(w, "nodes6");
        dg_bencode_put_str(w, nodes6, nnodes6 * DG_KRPC_NODE6_LEN);
    }
}

int dg_krpc_encode_ping(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                        const uint8_t id[DG_KRPC_ID_LEN])
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc)
        return rc;
    dg_bencode_writer_init(&w, buf, cap);
    query_begin(&w, id);
    return query_end(&w, h, "ping");
}

/* find_node and get_peers: the same query with a different key and method. */
static int encode_lookup(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                         const uint8_t id[DG_KRPC_ID_LEN], const char *key_name,
                         const uint8_t key[DG_KRPC_ID_LEN], unsigned want, const char *method)
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc)
        return rc;
    if (want & ~(DG_KRPC_WANT_N4 | DG_KRPC_WANT_N6))
        return -EINVAL;
    dg_bencode_writer_init(&w, buf, cap);
    query_begin(&w, id);
    put_key(&w, key_name);
    dg_bencode_put_str(&w, key, DG_KRPC_ID_LEN);
    put_want(&w, want);
    return query_end(&w, h, method);
}

int dg_krpc_encode_find_node(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                             const uint8_t id[DG_KRPC_ID_LEN], const uint8_t target[DG_KRPC_ID_LEN],
                             unsigned want)
{
    return encode_lookup(buf, cap, h, id, "target", target, want, "find_node");
}

int dg_krpc_encode_get_peers(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                             const uint8_t id[DG_KRPC_ID_LEN],
                             const uint8_t info_hash[DG_KRPC_ID_LEN], unsigned want)
{
    return encode_lookup(buf, cap, h, id, "info_hash", info_hash, want, "get_peers");
}

int dg_krpc_encode_announce_peer(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                 const uint8_t id[DG_KRPC_ID_LEN],
                                 const uint8_t info_hash[DG_KRPC_ID_LEN], uint16_t port,
                                 int implied_port, const uint8_t *token, size_t token_len)
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc == 0)
        rc = check_token(token, token_len);
    if (rc)
        return rc;
    dg_bencode_writer_init(&w, buf, cap);
    query_begin(&w, id);
    if (implied_port) {
        put_key(&w, "implied_port");
        dg_bencode_put_int(&w, 1);
    }
    put_key(&w, "info_hash");
    dg_bencode_put_str(&w, info_hash, DG_KRPC_ID_LEN);
    put_key(&w, "port");
    dg_bencode_put_int(&w, port);
    put_key(&w, "token");
    dg_bencode_put_str(&w, token, token_len);
    return query_end(&w, h, "announce_peer");
}

int dg_krpc_encode_ping_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                 const uint8_t id[DG_KRPC_ID_LEN])
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc)
        return rc;
    dg_bencode_writer_init(&w, buf, cap);
    response_begin(&w, h, id);
    return response_end(&w, h);
}

int dg_krpc_encode_find_node_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                      const uint8_t id[DG_KRPC_ID_LEN], const uint8_t *nodes,
                                      size_t nnodes, const uint8_t *nodes6, size_t nnodes6)
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc == 0)
        rc = check_compact(nodes, nnodes, DG_KRPC_NODE_LEN);
    if (rc == 0)
        rc = check_compact(nodes6, nnodes6, DG_KRPC_NODE6_LEN);
    if (rc)
        return rc;
    dg_bencode_writer_init(&w, buf, cap);
    response_begin(&w, h, id);
    put_nodes(&w, nodes, nnodes, nodes6, nnodes6);
    return response_end(&w, h);
}

int dg_krpc_encode_get_peers_response(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h,
                                      const uint8_t id[DG_KRPC_ID_LEN], const uint8_t *token,
                                      size_t token_len, const struct dg_krpc_peer *values,
                                      size_t nvalues, const uint8_t *nodes, size_t nnodes,
                                      const uint8_t *nodes6, size_t nnodes6)
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc == 0 && (token || token_len))
        rc = check_token(token, token_len);
    if (rc == 0)
        rc = check_compact(nodes, nnodes, DG_KRPC_NODE_LEN);
    if (rc == 0)
        rc = check_compact(nodes6, nnodes6, DG_KRPC_NODE6_LEN);
    if (rc == 0 && ((!values && nvalues) || nvalues > DG_KRPC_MAX_VALUES))
        rc = -EINVAL;
    for (size_t i = 0; rc == 0 && i < nvalues; i++)
        if (!values[i].addr ||
            (values[i].len != DG_KRPC_PEER_LEN && values[i].len != DG_KRPC_PEER6_LEN))
            rc = -EINVAL;
    if (rc)
        return rc;

    dg_bencode_writer_init(&w, buf, cap);
    response_begin(&w, h, id);
    put_nodes(&w, nodes, nnodes, nodes6, nnodes6);
    if (token) {
        put_key(&w, "token");
        dg_bencode_put_str(&w, token, token_len);
    }
    if (values) {
        put_key(&w, "values");
        dg_bencode_begin_list(&w);
        for (size_t i = 0; i < nvalues; i++)
            dg_bencode_put_str(&w, values[i].addr, values[i].len);
        dg_bencode_end(&w);
    }
    return response_end(&w, h);
}

int dg_krpc_encode_error(uint8_t *buf, size_t cap, const struct dg_krpc_hdr *h, int64_t code,
                         const void *msg, size_t msg_len)
{
    struct dg_bencode_writer w;
    int rc = check_hdr(h);

    if (rc)
        return rc;
    if (!msg && msg_len)
        return -EINVAL;
    dg_bencode_writer_init(&w, buf, cap);
    dg_bencode_begin_dict(&w);
    put_key(&w, "e");
    dg_bencode_begin_list(&w);
    dg_bencode_put_int(&w, code);
    dg_bencode_put_str(&w, msg, msg_len);
    dg_bencode_end(&w);
    put_ip(&w, h);
    return finish_msg(&w, h, "e");
}
