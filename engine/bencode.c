/* Bencoding: strict non-recursive decoder into a flat token array, bounded encoder.
 * See bencode.h for the accepted format. */
#include "engine/bencode.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

/* While a list or dict is open its token's fields hold parser state: `next` is the index of the
 * enclosing container (NO_PARENT at the top), `count` the number of direct children so far
 * (keys and values both, for a dict) and, for a dict, `ival` the index of its last key (-1
 * before the first). Closing the container puts the documented values in place. */
#define NO_PARENT SIZE_MAX

static int is_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

/* Parses "i<int>e" starting at buf[*pos] == 'i'; moves *pos past the 'e'. */
static int parse_int(const uint8_t *buf, size_t len, size_t *pos, int64_t *out)
{
    size_t p = *pos + 1;
    int neg = 0;
    uint64_t mag = 0;

    if (p < len && buf[p] == '-') {
        neg = 1;
        p++;
    }
    if (p >= len || !is_digit(buf[p]))
        return -EBADMSG; /* "ie", "i-e", "i-xe", truncated */
    if (buf[p] == '0') {
        if (neg)
            return -EBADMSG; /* "i-0e" and "i-01e" */
        p++;
    } else {
        const uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;

        while (p < len && is_digit(buf[p])) {
            unsigned d = (unsigned)(buf[p] - '0');

            if (mag > (limit - d) / 10)
                return -EBADMSG; /* outside int64 */
            mag = mag * 10 + d;
            p++;
        }
    }
    if (p >= len || buf[p] != 'e')
        return -EBADMSG; /* leading zero ("i03e"), junk, or truncated */
    if (!neg)
        *out = (int64_t)mag;
    else if (mag == (uint64_t)INT64_MAX + 1)
        *out = INT64_MIN;
    else
        *out = -(int64_t)mag;
    *pos = p + 1;
    return 0;
}

/* Parses "<len>:<bytes>" starting at a digit at buf[*pos]; sets the payload offset and length
 * and moves *pos past the payload. */
static int parse_str(const uint8_t *buf, size_t len, size_t *pos, size_t *off, size_t *slen)
{
    size_t p = *pos;
    size_t v = 0;

    if (buf[p] == '0') {
        p++; /* only "0:" may start with 0 */
    } else {
        while (p < len && is_digit(buf[p])) {
            unsigned d = (unsigned)(buf[p] - '0');

            if (v > (SIZE_MAX - d) / 10)
                return -EBADMSG;
            v = v * 10 + d;
            if (v > len)
                return -EBADMSG;
            p++;
        }
    }
    if (p >= len || buf[p] != ':')
        return -EBADMSG;
    p++;
    if (v > len - p)
        return -EBADMSG; /* runs past the buffer */
    *off = p;
    *slen = v;
    *pos = p + v;
    return 0;
}

/* Whether key token b sorts strictly after key token a. */
static int key_after(const uint8_t *buf, const struct dg_bencode_token *a,
                     const struct dg_bencode_token *b)
{
    size_t n = a->len < b->len ? a->len : b->len;
    int c = n ? memcmp(buf + a->off, buf + b->off, n) : 0;

    return c < 0 || (c == 0 && a->len < b->len);
}

int dg_bencode_parse(const uint8_t *buf, size_t len, struct dg_bencode_token *toks, size_t max_toks,
                     unsigned max_depth, size_t *ntoks)
{
    size_t pos = 0, n = 0, cur = NO_PARENT;
    unsigned depth = 0;
    int rc;

    *ntoks = 0;
    if (max_toks > INT_MAX)
        max_toks = INT_MAX;
    for (;;) {
        if (cur == NO_PARENT && n > 0)
            break; /* the top-level value is complete */
        if (pos >= len)
            return -EBADMSG;
        uint8_t c = buf[pos];

        if (c == 'e') {
            if (cur == NO_PARENT)
                return -EBADMSG;
            struct dg_bencode_token *t = &toks[cur];
            size_t parent = t->next;

            if (t->type == DG_BENCODE_DICT) {
                if (t->count % 2)
                    return -EBADMSG; /* a key without a value */
                t->count /= 2;
            }
            t->ival = 0;
            pos++;
            t->len = pos - t->off;
            t->next = n;
            cur = parent;
            depth--;
            continue;
        }

        size_t parent = cur;
        int is_key = parent != NO_PARENT && toks[parent].type == DG_BENCODE_DICT &&
                     toks[parent].count % 2 == 0;

        if (is_key && !is_digit(c))
            return -EBADMSG; /* dict keys are strings */
        if (n >= max_toks)
            return -E2BIG;
        size_t idx = n++;
        struct dg_bencode_token *t = &toks[idx];

        t->ival = 0;
        t->count = 0;
        t->next = idx + 1;
        if (c == 'i') {
            t->type = DG_BENCODE_INT;
            t->off = pos;
            rc = parse_int(buf, len, &pos, &t->ival);
            if (rc)
                return rc;
            t->len = pos - t->off;
        } else if (is_digit(c)) {
            t->type = DG_BENCODE_STR;
            rc = parse_str(buf, len, &pos, &t->off, &t->len);
            if (rc)
                return rc;
        } else if (c == 'l' || c == 'd') {
            if (depth >= max_depth)
                return -EBADMSG;
            depth++;
            t->type = c == 'l' ? DG_BENCODE_LIST : DG_BENCODE_DICT;
            t->off = pos;
            t->len = 0;
            t->ival = -1;
            t->next = parent;
            cur = idx;
            pos++;
        } else {
            return -EBADMSG;
        }

        if (is_key) {
            struct dg_bencode_token *d = &toks[parent];

            if (d->ival >= 0 && !key_after(buf, &toks[d->ival], t))
                return -EBADMSG; /* unsorted or duplicate key */
            d->ival = (int64_t)idx;
        }
        if (parent != NO_PARENT)
            toks[parent].count++;
    }
    if (pos != len)
        return -EBADMSG; /* trailing bytes */
    *ntoks = n;
    return 0;
}

int dg_bencode_dict_find(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                         size_t dict, const void *key, size_t keylen)
{
    if (dict >= ntoks)
        return -EINVAL;
    if (toks[dict].type != DG_BENCODE_DICT)
        return -EBADMSG;

    size_t i = dict + 1;

    for (size_t k = 0; k < toks[dict].count && i + 1 < ntoks; k++) {
        const struct dg_bencode_token *kt = &toks[i];
        size_t m = kt->len < keylen ? kt->len : keylen;
        int c = m ? memcmp(buf + kt->off, key, m) : 0;

        if (c == 0 && kt->len == keylen)
            return (int)(i + 1);
        if (c > 0 || (c == 0 && kt->len > keylen))
            break; /* keys are sorted: every later key is greater still */
        i = toks[i + 1].next;
    }
    return -ENOENT;
}

int dg_bencode_list_item(const struct dg_bencode_token *toks, size_t ntoks, size_t list, size_t n)
{
    if (list >= ntoks)
        return -EINVAL;
    if (toks[list].type != DG_BENCODE_LIST)
        return -EBADMSG;
    if (n >= toks[list].count)
        return -ENOENT;

    size_t i = list + 1;

    while (n-- > 0 && i < ntoks)
        i = toks[i].next;
    if (i >= ntoks)
        return -ENOENT; /* only with tokens not made by dg_bencode_parse() */
    return (int)i;
}

int dg_bencode_get_int(const struct dg_bencode_token *toks, size_t ntoks, size_t i, int64_t *out)
{
    if (i >= ntoks)
        return -EINVAL;
    if (toks[i].type != DG_BENCODE_INT)
        return -EBADMSG;
    *out = toks[i].ival;
    return 0;
}

int dg_bencode_get_str(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                       size_t i, const uint8_t **str, size_t *len)
{
    if (i >= ntoks)
        return -EINVAL;
    if (toks[i].type != DG_BENCODE_STR)
        return -EBADMSG;
    *str = buf + toks[i].off;
    *len = toks[i].len;
    return 0;
}

/* Number of decimal digits of @p v (1 for 0). */
static size_t decimal_digits(size_t v)
{
    size_t n = 1;

    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

int dg_bencode_span(const struct dg_bencode_token *toks, size_t ntoks, size_t i, size_t *start,
                    size_t *len)
{
    if (i >= ntoks)
        return -EINVAL;
    if (toks[i].type == DG_BENCODE_STR) {
        /* The length prefix is canonical (no leading zeros), so its size follows from len. */
        size_t head = decimal_digits(toks[i].len) + 1;

        *start = toks[i].off - head;
        *len = toks[i].len + head;
    } else {
        *start = toks[i].off;
        *len = toks[i].len;
    }
    return 0;
}

/* ---- writer ---- */

void dg_bencode_writer_init(struct dg_bencode_writer *w, uint8_t *buf, size_t cap)
{
    w->buf = buf;
    w->cap = buf ? cap : 0;
    w->len = 0;
    w->overflow = 0;
}

static void append(struct dg_bencode_writer *w, const void *p, size_t n)
{
    if (!w->overflow && n <= w->cap - w->len) {
        if (n)
            memcpy(w->buf + w->len, p, n);
    } else {
        w->overflow = 1;
    }
    w->len = n > SIZE_MAX - w->len ? SIZE_MAX : w->len + n;
}

/* Writes the decimal digits of @p v, with a leading '-' if @p neg, then @p tail. */
static void put_decimal(struct dg_bencode_writer *w, uint64_t v, int neg, char tail)
{
    char tmp[24];
    size_t i = sizeof(tmp);

    tmp[--i] = tail;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (neg)
        tmp[--i] = '-';
    append(w, tmp + i, sizeof(tmp) - i);
}

void dg_bencode_put_int(struct dg_bencode_writer *w, int64_t v)
{
    uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;

    append(w, "i", 1);
    put_decimal(w, mag, v < 0, 'e');
}

void dg_bencode_put_str(struct dg_bencode_writer *w, const void *s, size_t len)
{
    put_decimal(w, len, 0, ':');
    append(w, s, len);
}

void dg_bencode_put_cstr(struct dg_bencode_writer *w, const char *s)
{
    dg_bencode_put_str(w, s, strlen(s));
}

void dg_bencode_put_raw(struct dg_bencode_writer *w, const void *raw, size_t len)
{
    append(w, raw, len);
}

void dg_bencode_begin_list(struct dg_bencode_writer *w)
{
    append(w, "l", 1);
}

void dg_bencode_begin_dict(struct dg_bencode_writer *w)
{
    append(w, "d", 1);
}

void dg_bencode_end(struct dg_bencode_writer *w)
{
    append(w, "e", 1);
}

int dg_bencode_writer_finish(const struct dg_bencode_writer *w)
{
    if (w->overflow || w->len > INT_MAX)
        return -ENOBUFS;
    return (int)w->len;
}
