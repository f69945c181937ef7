/* Unit tests for engine/bencode.c: the strict token decoder, its lookup helpers and the bounded
 * writer. Inputs are copied into buffers of their exact size, so ASan reports any read past the
 * end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bencode.h"

#define MAX_TOKS 64

/* Parses @p len bytes of @p s from an exact-size heap copy. */
static int parse_n(const char *s, size_t len, struct dg_bencode_token *toks, size_t max_toks,
                   unsigned max_depth, size_t *ntoks)
{
    uint8_t *copy = malloc(len ? len : 1);

    assert_non_null(copy);
    memcpy(copy, s, len);
    int rc = dg_bencode_parse(copy, len, toks, max_toks, max_depth, ntoks);
    free(copy);
    return rc;
}

static int parse_s(const char *s)
{
    struct dg_bencode_token toks[MAX_TOKS];
    size_t n = 99;
    int rc = parse_n(s, strlen(s), toks, MAX_TOKS, 16, &n);

    if (rc)
        assert_int_equal(n, 0);
    return rc;
}

/* Decoding, then encoding the tokens again, gives the same bytes. */
static void reencode(const uint8_t *buf, const struct dg_bencode_token *toks, size_t ntoks,
                     struct dg_bencode_writer *w)
{
    size_t ends[32];
    size_t depth = 0;

    for (size_t i = 0; i < ntoks; i++) {
        while (depth > 0 && ends[depth - 1] == i) {
            dg_bencode_end(w);
            depth--;
        }
        switch (toks[i].type) {
        case DG_BENCODE_INT:
            dg_bencode_put_int(w, toks[i].ival);
            break;
        case DG_BENCODE_STR:
            dg_bencode_put_str(w, buf + toks[i].off, toks[i].len);
            break;
        case DG_BENCODE_LIST:
        case DG_BENCODE_DICT:
            if (toks[i].type == DG_BENCODE_LIST)
                dg_bencode_begin_list(w);
            else
                dg_bencode_begin_dict(w);
            assert_true(depth < 32);
            ends[depth++] = toks[i].next;
            break;
        }
    }
    while (depth-- > 0)
        dg_bencode_end(w);
}

static void expect_canonical(const char *s)
{
    struct dg_bencode_token toks[MAX_TOKS];
    size_t n;
    uint8_t out[512];
    struct dg_bencode_writer w;

    assert_int_equal(dg_bencode_parse((const uint8_t *)s, strlen(s), toks, MAX_TOKS, 16, &n), 0);
    dg_bencode_writer_init(&w, out, sizeof(out));
    reencode((const uint8_t *)s, toks, n, &w);
    assert_int_equal(dg_bencode_writer_finish(&w), (int)strlen(s));
    assert_memory_equal(out, s, strlen(s));
}

static void test_scalars(void **state)
{
    struct dg_bencode_token t[4];
    size_t n;

    (void)state;
    assert_int_equal(parse_n("i42e", 4, t, 4, 0, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(t[0].type, DG_BENCODE_INT);
    assert_int_equal(t[0].ival, 42);
    assert_int_equal(t[0].off, 0);
    assert_int_equal(t[0].len, 4);
    assert_int_equal(t[0].next, 1);

    assert_int_equal(parse_n("4:spam", 6, t, 4, 0, &n), 0);
    assert_int_equal(t[0].type, DG_BENCODE_STR);
    assert_int_equal(t[0].off, 2);
    assert_int_equal(t[0].len, 4);

    assert_int_equal(parse_n("0:", 2, t, 4, 0, &n), 0);
    assert_int_equal(t[0].len, 0);

    /* Binary payloads, NULs included. */
    assert_int_equal(parse_n("3:\0\xff\0", 5, t, 4, 0, &n), 0);
    assert_int_equal(t[0].len, 3);
}

static void test_int_limits(void **state)
{
    struct dg_bencode_token t[2];
    size_t n;

    (void)state;
    static const struct {
        const char *s;
        int64_t v;
    } good[] = {
        {"i0e", 0},
        {"i-1e", -1},
        {"i10e", 10},
        {"i9223372036854775807e", INT64_MAX},
        {"i-9223372036854775808e", INT64_MIN},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(parse_n(good[i].s, strlen(good[i].s), t, 2, 0, &n), 0);
        assert_true(t[0].ival == good[i].v);
        expect_canonical(good[i].s);
    }

    static const char *const bad[] = {
        "i03e",
        "i00e",
        "i-0e",
        "i-03e",
        "i-e",
        "ie",
        "i+1e",
        "i 1e",
        "i1 e",
        "i1",
        "i",
        "i-",
        "i9223372036854775808e",
        "i-9223372036854775809e",
        "i99999999999999999999999e",
        "i1.5e",
        "i0x1e",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(parse_s(bad[i]), -EBADMSG);
}

static void test_string_limits(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "03:abc",
        "00:",
        "4:abc",
        "3abc",
        ":abc",
        "-1:a",
        "3",
        "1",
        "18446744073709551616:a",
        "184467440737095516150:a",
        "99999999999999999999999999999999:x",
        "1:",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(parse_s(bad[i]), -EBADMSG);
    assert_int_equal(parse_s("3:abc"), 0);
    expect_canonical("10:0123456789");
}

static void test_containers(void **state)
{
    /* {"a": [1, "xy", {}], "b": []}, "c": "z"} */
    const char *s = "d1:ali1e2:xydee1:ble1:c1:ze";
    struct dg_bencode_token t[MAX_TOKS];
    size_t n;

    (void)state;
    assert_int_equal(dg_bencode_parse((const uint8_t *)s, strlen(s), t, MAX_TOKS, 3, &n), 0);
    assert_int_equal(n, 10);
    assert_int_equal(t[0].type, DG_BENCODE_DICT);
    assert_int_equal(t[0].count, 3);
    assert_int_equal(t[0].off, 0);
    assert_int_equal(t[0].len, strlen(s));
    assert_int_equal(t[0].next, 10);
    assert_int_equal(t[0].ival, 0);
    /* "a" */
    assert_int_equal(t[1].type, DG_BENCODE_STR);
    assert_int_equal(t[2].type, DG_BENCODE_LIST);
    assert_int_equal(t[2].count, 3);
    assert_int_equal(t[2].ival, 0);
    assert_int_equal(t[2].next, 6);
    assert_int_equal(t[2].off, 4);
    assert_int_equal(t[2].len, strlen("li1e2:xydee"));
    assert_int_equal(t[3].ival, 1);
    assert_int_equal(t[5].type, DG_BENCODE_DICT);
    assert_int_equal(t[5].count, 0);
    assert_int_equal(t[5].next, 6);
    /* "b": [] */
    assert_int_equal(t[7].type, DG_BENCODE_LIST);
    assert_int_equal(t[7].count, 0);
    assert_int_equal(t[7].next, 8);
    assert_int_equal(t[9].type, DG_BENCODE_STR);
    assert_int_equal(t[9].next, 10);
    expect_canonical(s);
    expect_canonical("le");
    expect_canonical("de");
    expect_canonical("llleee");
    expect_canonical("d0:i1e1:\x7fi2e1:\x80i3ee");
}

static void test_dict_order(void **state)
{
    (void)state;
    assert_int_equal(parse_s("d1:ai1e1:bi2ee"), 0);
    assert_int_equal(parse_s("d1:bi1e1:ai2ee"), -EBADMSG); /* unsorted */
    assert_int_equal(parse_s("d1:ai1e1:ai2ee"), -EBADMSG); /* duplicate */
    assert_int_equal(parse_s("d1:a0:2:aa0:e"), 0);         /* a prefix sorts first */
    assert_int_equal(parse_s("d2:aa0:1:a0:e"), -EBADMSG);  /* ... never after */
    assert_int_equal(parse_s("d0:0:0:0:e"), -EBADMSG);     /* two empty keys */
    /* Bytes compare unsigned (octal escapes: \177 is 0x7f, \200 is 0x80). */
    assert_int_equal(parse_s("d1:\1770:1:\2000:e"), 0);
    assert_int_equal(parse_s("d1:\2000:1:\1770:e"), -EBADMSG);
    assert_int_equal(parse_s("di1ei2ee"), -EBADMSG); /* key not a string */
    assert_int_equal(parse_s("dlei1ee"), -EBADMSG);
    assert_int_equal(parse_s("d1:ae"), -EBADMSG); /* key without a value */
    assert_int_equal(parse_s("d1:ai1e1:be"), -EBADMSG);
    /* Order is per dict: an inner dict starts afresh. */
    assert_int_equal(parse_s("d1:bd1:ai1ee1:cd1:ai1eee"), 0);
    assert_int_equal(parse_s("d1:bd1:ai1ee1:ad1:ai1eee"), -EBADMSG);
}

static void test_framing(void **state)
{
    struct dg_bencode_token t[4];
    size_t n = 7;

    (void)state;
    assert_int_equal(dg_bencode_parse((const uint8_t *)"", 0, t, 4, 4, &n), -EBADMSG);
    assert_int_equal(n, 0);
    static const char *const bad[] = {
        "i1ei2e", "dee",  "lee",     "le ", "1:ab", "e",    "x", "l", "d",
        "li1e",   "d1:a", "d1:ai1e", "lx",  "l-1e", " i1e", "L", "D",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(parse_s(bad[i]), -EBADMSG);
}

/* Every proper prefix of a valid document is rejected, and parsing reads none past it. */
static void test_prefixes(void **state)
{
    const char *s = "d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe";
    struct dg_bencode_token t[MAX_TOKS];
    size_t n;

    (void)state;
    for (size_t len = 0; len < strlen(s); len++)
        assert_int_equal(parse_n(s, len, t, MAX_TOKS, 4, &n), -EBADMSG);
    assert_int_equal(parse_n(s, strlen(s), t, MAX_TOKS, 4, &n), 0);
}

static void test_depth_limit(void **state)
{
    char s[64];
    struct dg_bencode_token t[MAX_TOKS];
    size_t n;

    (void)state;
    for (unsigned depth = 0; depth <= 20; depth++) {
        memset(s, 'l', depth);
        memset(s + depth, 'e', depth);
        s[2 * depth] = '\0';
        if (depth == 0)
            strcpy(s, "i1e");
        for (unsigned max = 0; max <= 12; max++) {
            int rc = parse_n(s, strlen(s), t, MAX_TOKS, max, &n);
            assert_int_equal(rc, depth <= max ? 0 : -EBADMSG);
        }
    }
    /* Depth counts open containers, not total containers. */
    assert_int_equal(parse_n("llelelelelelelelelelelelelelelelee", 34, t, MAX_TOKS, 2, &n), 0);
    assert_int_equal(parse_n("d1:ad1:bleee", 12, t, MAX_TOKS, 2, &n), -EBADMSG);
    assert_int_equal(parse_n("d1:ad1:bleee", 12, t, MAX_TOKS, 3, &n), 0);
}

static void test_token_limit(void **state)
{
    const char *s = "li1ei2ei3ee"; /* 4 tokens */
    struct dg_bencode_token t[8];
    size_t n;

    (void)state;
    assert_int_equal(parse_n(s, strlen(s), t, 4, 4, &n), 0);
    assert_int_equal(n, 4);
    assert_int_equal(parse_n(s, strlen(s), t, 3, 4, &n), -E2BIG);
    assert_int_equal(n, 0);
    assert_int_equal(parse_n(s, strlen(s), t, 0, 4, &n), -E2BIG);
    assert_int_equal(parse_n("i1e", 3, t, 1, 0, &n), 0);
}

static void test_lookup(void **state)
{
    const char *s = "d3:abci7e3:keyl1:xi-5eld1:zi0eeee4:name4:spame";
    const uint8_t *b = (const uint8_t *)s;
    struct dg_bencode_token t[MAX_TOKS];
    size_t n;
    const uint8_t *str;
    size_t len;
    int64_t v;

    (void)state;
    assert_int_equal(dg_bencode_parse(b, strlen(s), t, MAX_TOKS, 8, &n), 0);

    int abc = dg_bencode_dict_find(b, t, n, 0, "abc", 3);
    int key = dg_bencode_dict_find(b, t, n, 0, "key", 3);
    int name = dg_bencode_dict_find(b, t, n, 0, "name", 4);
    assert_true(abc > 0 && key > 0 && name > 0);
    assert_int_equal(dg_bencode_get_int(t, n, (size_t)abc, &v), 0);
    assert_int_equal(v, 7);
    assert_int_equal(dg_bencode_get_str(b, t, n, (size_t)name, &str, &len), 0);
    assert_int_equal(len, 4);
    assert_memory_equal(str, "spam", 4);
    assert_int_equal(dg_bencode_dict_find(b, t, n, 0, "ab", 2), -ENOENT);
    assert_int_equal(dg_bencode_dict_find(b, t, n, 0, "abcd", 4), -ENOENT);
    assert_int_equal(dg_bencode_dict_find(b, t, n, 0, "zzz", 3), -ENOENT);
    assert_int_equal(dg_bencode_dict_find(b, t, n, 0, "", 0), -ENOENT);
    assert_int_equal(dg_bencode_dict_find(b, t, n, (size_t)key, "x", 1), -EBADMSG);
    assert_int_equal(dg_bencode_dict_find(b, t, n, n, "x", 1), -EINVAL);

    /* The list: "x", -5, [{"z": 0}] — the third item's subtree is skipped over. */
    int x = dg_bencode_list_item(t, n, (size_t)key, 0);
    int m5 = dg_bencode_list_item(t, n, (size_t)key, 1);
    int inner = dg_bencode_list_item(t, n, (size_t)key, 2);
    assert_int_equal(dg_bencode_list_item(t, n, (size_t)key, 3), -ENOENT);
    assert_int_equal(dg_bencode_list_item(t, n, 0, 0), -EBADMSG);
    assert_int_equal(dg_bencode_list_item(t, n, n + 5, 0), -EINVAL);
    assert_int_equal(dg_bencode_get_str(b, t, n, (size_t)x, &str, &len), 0);
    assert_int_equal(len, 1);
    assert_int_equal(dg_bencode_get_int(t, n, (size_t)m5, &v), 0);
    assert_int_equal(v, -5);
    assert_int_equal(t[inner].type, DG_BENCODE_LIST);
    int d = dg_bencode_list_item(t, n, (size_t)inner, 0);
    int z = dg_bencode_dict_find(b, t, n, (size_t)d, "z", 1);
    assert_int_equal(dg_bencode_get_int(t, n, (size_t)z, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal((size_t)name - 1, t[key].next); /* "name" key right after the list */

    /* Type checks. */
    assert_int_equal(dg_bencode_get_int(t, n, (size_t)name, &v), -EBADMSG);
    assert_int_equal(dg_bencode_get_str(b, t, n, (size_t)abc, &str, &len), -EBADMSG);
    assert_int_equal(dg_bencode_get_int(t, n, n, &v), -EINVAL);
    assert_int_equal(dg_bencode_get_str(b, t, n, n, &str, &len), -EINVAL);
}

static void test_span(void **state)
{
    const char *s = "d1:ai-12e1:b10:01234567891:cl0:ee";
    const uint8_t *b = (const uint8_t *)s;
    struct dg_bencode_token t[MAX_TOKS];
    size_t n, start, len;

    (void)state;
    assert_int_equal(dg_bencode_parse(b, strlen(s), t, MAX_TOKS, 8, &n), 0);
    int a = dg_bencode_dict_find(b, t, n, 0, "a", 1);
    int bb = dg_bencode_dict_find(b, t, n, 0, "b", 1);
    int c = dg_bencode_dict_find(b, t, n, 0, "c", 1);
    assert_int_equal(dg_bencode_span(t, n, (size_t)a, &start, &len), 0);
    assert_int_equal(len, 5);
    assert_memory_equal(s + start, "i-12e", 5);
    assert_int_equal(dg_bencode_span(t, n, (size_t)bb, &start, &len), 0);
    assert_int_equal(len, 13);
    assert_memory_equal(s + start, "10:0123456789", 13);
    assert_int_equal(dg_bencode_span(t, n, (size_t)c, &start, &len), 0);
    assert_int_equal(len, 4);
    assert_memory_equal(s + start, "l0:e", 4);
    assert_int_equal(dg_bencode_span(t, n, (size_t)c + 1, &start, &len), 0);
    assert_int_equal(len, 2);
    assert_memory_equal(s + start, "0:", 2);
    assert_int_equal(dg_bencode_span(t, n, 0, &start, &len), 0);
    assert_int_equal(start, 0);
    assert_int_equal(len, strlen(s));
    assert_int_equal(dg_bencode_span(t, n, n, &start, &len), -EINVAL);
}

static void test_writer(void **state)
{
    uint8_t buf[128];
    struct dg_bencode_writer w;
    static const char want[] =
        "d3:agei-9223372036854775808e4:listli0ei42e0:3:\0\1\2e4:namel3:bobee";
    const size_t want_len = sizeof(want) - 1;

    (void)state;
    dg_bencode_writer_init(&w, buf, sizeof(buf));
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, "age");
    dg_bencode_put_int(&w, INT64_MIN);
    dg_bencode_put_cstr(&w, "list");
    dg_bencode_begin_list(&w);
    dg_bencode_put_int(&w, 0);
    dg_bencode_put_int(&w, 42);
    dg_bencode_put_str(&w, NULL, 0);
    dg_bencode_put_str(&w, "\0\1\2", 3);
    dg_bencode_end(&w);
    dg_bencode_put_cstr(&w, "name");
    dg_bencode_put_raw(&w, "l3:bobe", 7);
    dg_bencode_end(&w);
    assert_int_equal(dg_bencode_writer_finish(&w), (int)want_len);
    assert_memory_equal(buf, want, want_len);

    struct dg_bencode_token t[MAX_TOKS];
    size_t n;
    assert_int_equal(dg_bencode_parse(buf, want_len, t, MAX_TOKS, 4, &n), 0);

    dg_bencode_writer_init(&w, buf, sizeof(buf));
    dg_bencode_put_int(&w, INT64_MAX);
    assert_int_equal(dg_bencode_writer_finish(&w), 21);
    assert_memory_equal(buf, "i9223372036854775807e", 21);
}

static void test_writer_overflow(void **state)
{
    uint8_t buf[32];
    struct dg_bencode_writer w;

    (void)state;
    /* Every capacity short of the need fails, without writing past it; the need is reported. */
    for (size_t cap = 0; cap <= 20; cap++) {
        memset(buf, 0xAA, sizeof(buf));
        dg_bencode_writer_init(&w, buf, cap);
        dg_bencode_begin_list(&w);
        dg_bencode_put_cstr(&w, "hello");
        dg_bencode_put_int(&w, -77);
        dg_bencode_put_str(&w, "x", 1);
        dg_bencode_end(&w);
        if (cap < 17) {
            assert_int_equal(dg_bencode_writer_finish(&w), -ENOBUFS);
            assert_true(w.overflow);
        } else {
            assert_int_equal(dg_bencode_writer_finish(&w), 17);
            assert_memory_equal(buf, "l5:helloi-77e1:xe", 17);
        }
        assert_int_equal(w.len, 17);
        for (size_t i = cap; i < sizeof(buf); i++)
            assert_int_equal(buf[i], 0xAA);
    }

    /* Sticky: a small write after an overflow that would fit does not clear it. */
    dg_bencode_writer_init(&w, buf, 4);
    dg_bencode_put_cstr(&w, "toolong");
    dg_bencode_end(&w);
    assert_int_equal(dg_bencode_writer_finish(&w), -ENOBUFS);

    /* Measuring with no buffer. */
    dg_bencode_writer_init(&w, NULL, 0);
    dg_bencode_put_cstr(&w, "abc");
    assert_int_equal(w.len, 5);
    assert_int_equal(dg_bencode_writer_finish(&w), -ENOBUFS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalars),
        cmocka_unit_test(test_int_limits),
        cmocka_unit_test(test_string_limits),
        cmocka_unit_test(test_containers),
        cmocka_unit_test(test_dict_order),
        cmocka_unit_test(test_framing),
        cmocka_unit_test(test_prefixes),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_token_limit),
        cmocka_unit_test(test_lookup),
        cmocka_unit_test(test_span),
        cmocka_unit_test(test_writer),
        cmocka_unit_test(test_writer_overflow),
    };

    return cmocka_run_group_tests_name("bencode", tests, NULL, NULL);
}
