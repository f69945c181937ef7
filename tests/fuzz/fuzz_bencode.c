/* libFuzzer target: dg_bencode_parse() on untrusted bytes.
 *
 * Invariants when the input decodes: the tokens form a well-nested tree covering the whole
 * input (each token's bytes inside its parent's, `next` skipping exactly its subtree); the
 * lookup helpers find every key and item where the tree says they are; and encoding the token
 * tree again with the writer gives the input byte for byte (the accepted format is canonical),
 * needing exactly that many bytes. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bencode.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_TOKS 8192
#define MAX_DEPTH 64

static struct dg_bencode_token toks[MAX_TOKS];

static void check_tree(const uint8_t *buf, size_t size, size_t n)
{
    size_t ends[MAX_DEPTH + 1], stop[MAX_DEPTH + 1];
    size_t depth = 0;

    if (n == 0 || toks[0].next != n)
        abort();
    for (size_t i = 0; i < n; i++) {
        const struct dg_bencode_token *t = &toks[i];
        size_t start, len;

        while (depth > 0 && ends[depth - 1] == i)
            depth--;
        if (t->next <= i || t->next > n || (depth > 0 && t->next > ends[depth - 1]))
            abort();
        if (dg_bencode_span(toks, n, i, &start, &len) != 0 || start > size || len > size - start)
            abort();
        if (depth > 0 && start + len > stop[depth - 1])
            abort();
        switch (t->type) {
        case DG_BENCODE_INT:
        case DG_BENCODE_STR:
            if (t->next != i + 1 || t->count != 0)
                abort();
            break;
        case DG_BENCODE_LIST:
        case DG_BENCODE_DICT:
            if (buf[start] != (t->type == DG_BENCODE_LIST ? 'l' : 'd') ||
                buf[start + len - 1] != 'e' || t->ival != 0)
                abort();
            if (depth >= MAX_DEPTH)
                abort();
            ends[depth] = t->next;
            stop[depth] = start + len;
            depth++;
            break;
        default:
            abort();
        }
    }
}

/* Every key of every dict is found by dg_bencode_dict_find(), every item by
 * dg_bencode_list_item(), and the children counts agree with `next`. */
static void check_lookups(const uint8_t *buf, size_t n)
{
    for (size_t d = 0; d < n; d++) {
        const struct dg_bencode_token *t = &toks[d];
        size_t i = d + 1, items = 0;

        if (t->type != DG_BENCODE_LIST && t->type != DG_BENCODE_DICT)
            continue;
        while (i < t->next) {
            if (t->type == DG_BENCODE_LIST) {
                if (items < 64 && dg_bencode_list_item(toks, n, d, items) != (int)i)
                    abort();
                i = toks[i].next;
            } else {
                if (toks[i].type != DG_BENCODE_STR || i + 1 >= t->next)
                    abort();
                if (items < 64 && dg_bencode_dict_find(buf, toks, n, d, buf + toks[i].off,
                                                       toks[i].len) != (int)(i + 1))
                    abort();
                i = toks[i + 1].next;
            }
            items++;
        }
        if (i != t->next || items != t->count)
            abort();
        if (t->type == DG_BENCODE_LIST && dg_bencode_list_item(toks, n, d, items) != -ENOENT)
            abort();
    }
}

static int reencode(const uint8_t *buf, size_t n, uint8_t *out, size_t cap)
{
    struct dg_bencode_writer w;
    size_t ends[MAX_DEPTH];
    size_t depth = 0;

    dg_bencode_writer_init(&w, out, cap);
    for (size_t i = 0; i < n; i++) {
        while (depth > 0 && ends[depth - 1] == i) {
            dg_bencode_end(&w);
            depth--;
        }
        switch (toks[i].type) {
        case DG_BENCODE_INT:
            dg_bencode_put_int(&w, toks[i].ival);
            break;
        case DG_BENCODE_STR:
            dg_bencode_put_str(&w, buf + toks[i].off, toks[i].len);
            break;
        case DG_BENCODE_LIST:
        case DG_BENCODE_DICT:
            if (toks[i].type == DG_BENCODE_LIST)
                dg_bencode_begin_list(&w);
            else
                dg_bencode_begin_dict(&w);
            ends[depth++] = toks[i].next;
            break;
        }
    }
    while (depth-- > 0)
        dg_bencode_end(&w);
    return dg_bencode_writer_finish(&w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t n = 0;

    /* A copy of exactly `size` bytes, so ASan sees any read past the input. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    int rc = dg_bencode_parse(copy, size, toks, MAX_TOKS, MAX_DEPTH, &n);
    if (rc != 0) {
        if ((rc != -EBADMSG && rc != -E2BIG) || n != 0)
            abort();
        free(copy);
        return 0;
    }
    check_tree(copy, size, n);
    check_lookups(copy, n);

    uint8_t *out = malloc(size);
    if (!out)
        abort(); /* size > 0: the empty input never decodes */
    if (reencode(copy, n, out, size) != (int)size || memcmp(out, copy, size) != 0)
        abort();
    if (reencode(copy, n, out, size - 1) != -ENOBUFS)
        abort();
    free(out);
    free(copy);
    return 0;
}
