/* Unit tests for engine/lsd.c: the BEP 14 message parser and formatter. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "engine/lsd.h"

static const char search[] = "BT-SEARCH * HTTP/1.1\r\n"
                             "Host: 239.192.152.143:6771\r\n"
                             "Port: 6881\r\n"
                             "Infohash: 0123456789abcdef0123456789abcdef01234567\r\n"
                             "cookie: c00k1e\r\n"
                             "\r\n\r\n";

static int parse(const char *s, struct dg_lsd_message *m)
{
    return dg_lsd_parse((const uint8_t *)s, strlen(s), m);
}

static void test_parse(void **state)
{
    struct dg_lsd_message m;
    static const uint8_t key[20] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23,
                                    0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67};

    (void)state;
    assert_int_equal(parse(search, &m), 0);
    assert_int_equal(m.port, 6881);
    assert_int_equal(m.nkeys, 1);
    assert_memory_equal(m.keys[0], key, 20);
    assert_string_equal(m.cookie, "c00k1e");

    /* Case-insensitive names, bare LF, upper-case hex, two keys, no cookie. */
    assert_int_equal(parse("BT-SEARCH * HTTP/1.1\nport:  1 \ninfohash: "
                           "0123456789ABCDEF0123456789abcdef01234567\nINFOHASH: "
                           "ffffffffffffffffffffffffffffffffffffffff\n\n",
                           &m),
                     0);
    assert_int_equal(m.port, 1);
    assert_int_equal(m.nkeys, 2);
    assert_memory_equal(m.keys[0], key, 20);
    assert_int_equal(m.keys[1][19], 0xff);
    assert_string_equal(m.cookie, "");

    /* A bad Infohash line is skipped; the good one counts. */
    assert_int_equal(parse("BT-SEARCH * HTTP/1.1\r\nPort: 9\r\nInfohash: xyz\r\nInfohash: "
                           "0123456789abcdef0123456789abcdef0123456g\r\nInfohash: "
                           "g123456789abcdef0123456789abcdef01234567\r\nInfohash: "
                           "0123456789abcdef0123456789abcdef01234567\r\n\r\n",
                           &m),
                     0);
    assert_int_equal(m.nkeys, 1);
}

static void test_parse_errors(void **state)
{
    struct dg_lsd_message m;
    static const char *const bad[] = {
        "",
        "BT-SEARCH * HTTP/1.0\r\nPort: 1\r\nInfohash: 0123456789abcdef0123456789abcdef01234567\r\n",
        "GET / HTTP/1.1\r\nPort: 1\r\nInfohash: 0123456789abcdef0123456789abcdef01234567\r\n",
        "BT-SEARCH * HTTP/1.1\r\nInfohash: 0123456789abcdef0123456789abcdef01234567\r\n\r\n",
        "BT-SEARCH * HTTP/1.1\r\nPort: 0\r\nInfohash: 0123456789abcdef0123456789abcdef01234567\r\n",
        "BT-SEARCH * HTTP/1.1\r\nPort: 65536\r\nInfohash: "
        "0123456789abcdef0123456789abcdef01234567\r\n",
        "BT-SEARCH * HTTP/1.1\r\nPort: 12a\r\nInfohash: "
        "0123456789abcdef0123456789abcdef01234567\r\n",
        "BT-SEARCH * HTTP/1.1\r\nPort: 1\r\n\r\n",
        "BT-SEARCH * HTTP/1.1\r\nPort: 1\r\nno colon here\r\n",
    };
    char big[DG_LSD_MAX_MESSAGE + 10];

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(parse(bad[i], &m), -EBADMSG);
    /* Over the size limit, however well formed its start. */
    memset(big, ' ', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    memcpy(big, search, sizeof(search) - 1);
    assert_int_equal(dg_lsd_parse((const uint8_t *)big, sizeof(big) - 1, &m), -EBADMSG);
}

static void test_format_round_trip(void **state)
{
    uint8_t keys[DG_LSD_MAX_KEYS][20];
    struct dg_lsd_message m;
    char out[DG_LSD_MAX_MESSAGE];
    int n;

    (void)state;
    for (size_t k = 0; k < DG_LSD_MAX_KEYS; k++)
        memset(keys[k], (int)k * 7 + 1, 20);
    n = dg_lsd_format(51413, (const uint8_t(*)[20])keys, DG_LSD_MAX_KEYS, "0123abcd", out,
                      sizeof(out));
    assert_true(n > 0 && n <= DG_LSD_MAX_MESSAGE);
    assert_int_equal(dg_lsd_parse((const uint8_t *)out, (size_t)n, &m), 0);
    assert_int_equal(m.port, 51413);
    assert_int_equal(m.nkeys, DG_LSD_MAX_KEYS);
    assert_memory_equal(m.keys, keys, sizeof(keys));
    assert_string_equal(m.cookie, "0123abcd");
    assert_memory_equal(out,
                        "BT-SEARCH * HTTP/1.1\r\nHost: 239.192.152.143:6771\r\nPort: 51413\r\n",
                        strlen("BT-SEARCH * HTTP/1.1\r\nHost: 239.192.152.143:6771\r\nPort: "
                               "51413\r\n"));

    assert_int_equal(dg_lsd_format(0, (const uint8_t(*)[20])keys, 1, "c", out, sizeof(out)),
                     -EINVAL);
    assert_int_equal(dg_lsd_format(1, (const uint8_t(*)[20])keys, 0, "c", out, sizeof(out)),
                     -EINVAL);
    assert_int_equal(
        dg_lsd_format(1, (const uint8_t(*)[20])keys, DG_LSD_MAX_KEYS + 1, "c", out, sizeof(out)),
        -EINVAL);
    assert_int_equal(dg_lsd_format(1, (const uint8_t(*)[20])keys, 1, "c", out, 40), -ENOBUFS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_format_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
