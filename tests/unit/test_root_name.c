/* Unit tests for engine/root_name.c: by-hash names, path components and relative paths. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/root_name.h"

static const char good_hex[] = "000102030405060708090a0b0c0d0e0f"
                               "f0e1d2c3b4a5968778695a4b3c2d1e0f";

static void test_root_parse_good(void **state)
{
    uint8_t root[32];
    char back[DG_ROOT_HEX_LEN + 1];

    (void)state;
    assert_int_equal(strlen(good_hex), DG_ROOT_HEX_LEN);
    assert_int_equal(dg_root_parse(good_hex, DG_ROOT_HEX_LEN, root), 0);
    for (int i = 0; i < 16; i++)
        assert_int_equal(root[i], i);
    assert_int_equal(root[16], 0xf0);
    assert_int_equal(root[31], 0x0f);
    dg_root_format(root, back);
    assert_string_equal(back, good_hex);

    /* No NUL terminator is needed: the name may sit inside a longer buffer. */
    char longer[80];
    memcpy(longer, good_hex, DG_ROOT_HEX_LEN);
    memset(longer + DG_ROOT_HEX_LEN, 'z', sizeof(longer) - DG_ROOT_HEX_LEN);
    memset(root, 0, sizeof(root));
    assert_int_equal(dg_root_parse(longer, DG_ROOT_HEX_LEN, root), 0);
    dg_root_format(root, back);
    assert_string_equal(back, good_hex);
}

/* Every failure leaves the output untouched. */
static void expect_parse_fails(const char *name, size_t len)
{
    uint8_t root[32], before[32];

    memset(root, 0xa5, sizeof(root));
    memcpy(before, root, sizeof(root));
    assert_int_equal(dg_root_parse(name, len, root), -EINVAL);
    assert_memory_equal(root, before, sizeof(root));
}

static void test_root_parse_bad(void **state)
{
    char buf[DG_ROOT_HEX_LEN + 2];

    (void)state;
    /* 63 and 65 characters, 0. */
    expect_parse_fails(good_hex, DG_ROOT_HEX_LEN - 1);
    memcpy(buf, good_hex, DG_ROOT_HEX_LEN);
    buf[DG_ROOT_HEX_LEN] = '0';
    expect_parse_fails(buf, DG_ROOT_HEX_LEN + 1);
    expect_parse_fails("", 0);

    /* Upper case anywhere, non-hex characters, embedded NUL: at the first and the last
     * position and in between, in the high and the low nibble. */
    static const char bad_chars[] = {'A', 'F',  'g',    'G', 'x', ' ', '/',
                                     '.', '\0', '\xff', ':', '`', '@', '-'};
    static const size_t positions[] = {0, 1, 30, 31, 62, 63};
    for (size_t i = 0; i < sizeof(bad_chars); i++) {
        for (size_t j = 0; j < sizeof(positions) / sizeof(positions[0]); j++) {
            memcpy(buf, good_hex, DG_ROOT_HEX_LEN);
            buf[positions[j]] = bad_chars[i];
            expect_parse_fails(buf, DG_ROOT_HEX_LEN);
        }
    }
    /* An all-uppercase copy of a valid name. */
    for (size_t i = 0; i < DG_ROOT_HEX_LEN; i++)
        buf[i] =
            (good_hex[i] >= 'a' && good_hex[i] <= 'f') ? (char)(good_hex[i] - 32) : good_hex[i];
    expect_parse_fails(buf, DG_ROOT_HEX_LEN);
}

static void test_root_format_round_trip(void **state)
{
    uint8_t root[32], back[32];
    char hex[DG_ROOT_HEX_LEN + 1];

    (void)state;
    for (int v = 0; v < 256; v++) {
        for (int i = 0; i < 32; i++)
            root[i] = (uint8_t)(v * 31 + i * 7);
        memset(hex, 'X', sizeof(hex));
        dg_root_format(root, hex);
        assert_int_equal(hex[DG_ROOT_HEX_LEN], '\0');
        assert_int_equal(strlen(hex), DG_ROOT_HEX_LEN);
        for (int i = 0; i < DG_ROOT_HEX_LEN; i++)
            assert_non_null(strchr("0123456789abcdef", hex[i]));
        assert_int_equal(dg_root_parse(hex, DG_ROOT_HEX_LEN, back), 0);
        assert_memory_equal(root, back, 32);
    }
    memset(root, 0, 32);
    dg_root_format(root, hex);
    assert_string_equal(hex, "0000000000000000000000000000000000000000000000000000000000000000");
    memset(root, 0xff, 32);
    dg_root_format(root, hex);
    assert_string_equal(hex, "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff");
}

static void test_name_check(void **state)
{
    char name[300];

    (void)state;
    assert_int_equal(dg_name_check("a", 1), 0);
    assert_int_equal(dg_name_check("file.txt", 8), 0);
    assert_int_equal(dg_name_check("...", 3), 0);
    assert_int_equal(dg_name_check(".hidden", 7), 0);
    assert_int_equal(dg_name_check("..x", 3), 0);
    assert_int_equal(dg_name_check("caf\xc3\xa9", 5), 0);

    assert_int_equal(dg_name_check("", 0), -EINVAL);
    assert_int_equal(dg_name_check(".", 1), -EINVAL);
    assert_int_equal(dg_name_check("..", 2), -EINVAL);
    assert_int_equal(dg_name_check("a/b", 3), -EINVAL);
    assert_int_equal(dg_name_check("/", 1), -EINVAL);
    assert_int_equal(dg_name_check("ab/", 3), -EINVAL);
    assert_int_equal(dg_name_check("a\0b", 3), -EINVAL);
    assert_int_equal(dg_name_check("ab\0", 3), -EINVAL);
    assert_int_equal(dg_name_check("\0", 1), -EINVAL);
    /* The length given counts, not a NUL terminator: "a" of "a/b". */
    assert_int_equal(dg_name_check("a/b", 1), 0);
    /* ".\0" is two bytes, one of them NUL. */
    assert_int_equal(dg_name_check(".\0", 2), -EINVAL);

    memset(name, 'n', sizeof(name));
    assert_int_equal(dg_name_check(name, 255), 0);
    assert_int_equal(dg_name_check(name, 256), -EINVAL);
    assert_int_equal(dg_name_check(name, sizeof(name)), -EINVAL);
}

static void test_relpath_check(void **state)
{
    char *path;

    (void)state;
    assert_int_equal(dg_relpath_check("a", 1), 0);
    assert_int_equal(dg_relpath_check("a/b", 3), 0);
    assert_int_equal(dg_relpath_check("dir/sub/file.txt", 16), 0);
    assert_int_equal(dg_relpath_check(".a/..b/...", 10), 0);

    assert_int_equal(dg_relpath_check("", 0), -EINVAL);
    assert_int_equal(dg_relpath_check("/", 1), -EINVAL);
    assert_int_equal(dg_relpath_check("/a", 2), -EINVAL);
    assert_int_equal(dg_relpath_check("a/", 2), -EINVAL);
    assert_int_equal(dg_relpath_check("a//b", 4), -EINVAL);
    assert_int_equal(dg_relpath_check("a/../b", 6), -EINVAL);
    assert_int_equal(dg_relpath_check("..", 2), -EINVAL);
    assert_int_equal(dg_relpath_check("../a", 4), -EINVAL);
    assert_int_equal(dg_relpath_check("a/..", 4), -EINVAL);
    assert_int_equal(dg_relpath_check("./a", 3), -EINVAL);
    assert_int_equal(dg_relpath_check("a/./b", 5), -EINVAL);
    assert_int_equal(dg_relpath_check("a/b\0c", 5), -EINVAL);
    assert_int_equal(dg_relpath_check("a\0", 2), -EINVAL);

    /* A component over 255 bytes inside an otherwise fine path. */
    path = malloc(5000);
    assert_non_null(path);
    memset(path, 'p', 5000);
    path[0] = 'a';
    path[1] = '/';
    assert_int_equal(dg_relpath_check(path, 2 + 255), 0);
    assert_int_equal(dg_relpath_check(path, 2 + 256), -EINVAL);

    /* 4095 bytes in all is the limit: components of 200 bytes separated by '/'. */
    for (size_t i = 200; i < 5000; i += 201)
        path[i] = '/';
    assert_int_equal(path[4095 - 1] == '/', 0); /* the cut does not leave a trailing slash */
    assert_int_equal(path[4096 - 1] == '/', 0);
    assert_int_equal(dg_relpath_check(path, 4095), 0);
    assert_int_equal(dg_relpath_check(path, 4096), -EINVAL);
    assert_int_equal(dg_relpath_check(path, 5000 - 1), -EINVAL);
    free(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_root_parse_good),        cmocka_unit_test(test_root_parse_bad),
        cmocka_unit_test(test_root_format_round_trip), cmocka_unit_test(test_name_check),
        cmocka_unit_test(test_relpath_check),
    };

    return cmocka_run_group_tests_name("root_name", tests, NULL, NULL);
}
