/* Unit tests for engine/node_id.c: XOR metric, prefixes, CRC32C and BEP 42 node ids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "engine/node_id.h"

/* A seeded PRNG (splitmix64), so every run draws the same numbers. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_bytes(void *arg, void *buf, size_t len)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)rng_next(arg);
}

static void hex_to_id(const char *hex, uint8_t id[DG_NODE_ID_LEN])
{
    assert_int_equal(strlen(hex), 2 * DG_NODE_ID_LEN);
    for (size_t i = 0; i < DG_NODE_ID_LEN; i++) {
        char byte[3] = {hex[2 * i], hex[2 * i + 1], 0};
        id[i] = (uint8_t)strtoul(byte, NULL, 16);
    }
}

static struct sockaddr_storage v4(const char *ip)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin->sin_family = AF_INET;
    sin->sin_port = htons(6881);
    assert_int_equal(inet_pton(AF_INET, ip, &sin->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage v6(const char *ip)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(6881);
    assert_int_equal(inet_pton(AF_INET6, ip, &sin6->sin6_addr), 1);
    return ss;
}

#define SA(ss) ((const struct sockaddr *)&(ss))

static void test_crc32c(void **state)
{
    uint8_t buf[32];

    (void)state;
    /* The standard check value and the iSCSI vectors of RFC 3720, B.4. */
    assert_int_equal(dg_node_id_crc32c(0, "123456789", 9), 0xe3069283u);
    assert_int_equal(dg_node_id_crc32c(0, "", 0), 0);
    memset(buf, 0, sizeof(buf));
    assert_int_equal(dg_node_id_crc32c(0, buf, 32), 0x8a9136aau);
    memset(buf, 0xff, sizeof(buf));
    assert_int_equal(dg_node_id_crc32c(0, buf, 32), 0x62a8ab43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    assert_int_equal(dg_node_id_crc32c(0, buf, 32), 0x46dd794eu);
    /* Pieces chain. */
    assert_int_equal(dg_node_id_crc32c(dg_node_id_crc32c(0, buf, 13), buf + 13, 19), 0x46dd794eu);
}

/* BEP 42's table: IP, r, example node id. */
static const struct {
    const char *ip;
    uint8_t rand;
    const char *id;
} bep42_vectors[] = {
    {"124.31.75.21", 1, "5fbfbff10c5d6a4ec8a88e4c6ab4c28b95eee401"},
    {"21.75.31.124", 86, "5a3ce9c14e7a08645677bbd1cfe7d8f956d53256"},
    {"65.23.51.170", 22, "a5d43220bc8f112a3d426c84764f8c2a1150e616"},
    {"84.124.73.14", 65, "1b0321dd1bb1fe518101ceef99462b947a01ff41"},
    {"43.213.53.83", 90, "e56f6cbf5b7c4be0237986d5243b87aa6d51305a"},
};

static void test_bep42_vectors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bep42_vectors) / sizeof(bep42_vectors[0]); i++) {
        struct sockaddr_storage a = v4(bep42_vectors[i].ip);
        uint8_t want[DG_NODE_ID_LEN], id[DG_NODE_ID_LEN];
        uint64_t seed = i;

        hex_to_id(bep42_vectors[i].id, want);
        /* The example ids are valid for their address... */
        assert_int_equal(dg_node_id_valid_for(want, SA(a)), 1);
        /* ...and a made id matches them in the bound bits: 21 leading bits and the last byte. */
        assert_int_equal(dg_node_id_make(SA(a), bep42_vectors[i].rand, rng_bytes, &seed, id), 0);
        assert_int_equal(id[0], want[0]);
        assert_int_equal(id[1], want[1]);
        assert_int_equal(id[2] & 0xf8, want[2] & 0xf8);
        assert_int_equal(id[19], want[19]);
        assert_int_equal(dg_node_id_valid_for(id, SA(a)), 1);

        /* Any of the 21 bound bits flipped breaks it; so does another r. */
        for (unsigned bit = 0; bit < 21; bit++) {
            uint8_t bad[DG_NODE_ID_LEN];
            memcpy(bad, want, sizeof(bad));
            bad[bit / 8] ^= (uint8_t)(0x80 >> (bit % 8));
            assert_int_equal(dg_node_id_valid_for(bad, SA(a)), 0);
        }
        uint8_t bad[DG_NODE_ID_LEN];
        memcpy(bad, want, sizeof(bad));
        bad[19] ^= 0x01;
        assert_int_equal(dg_node_id_valid_for(bad, SA(a)), 0);
        /* The free bits are free: bits 21..151 and the high 5 bits of the last byte. */
        memcpy(bad, want, sizeof(bad));
        bad[2] ^= 0x07;
        bad[10] ^= 0xff;
        bad[19] ^= 0xf8;
        assert_int_equal(dg_node_id_valid_for(bad, SA(a)), 1);
        /* Another address (outside the masked-out bits) rejects it. */
        struct sockaddr_storage other = v4("1.2.3.4");
        assert_int_equal(dg_node_id_valid_for(want, SA(other)), 0);
    }
}

static void test_bep42_make_exact(void **state)
{
    struct sockaddr_storage a = v4("124.31.75.21");
    uint8_t id[DG_NODE_ID_LEN];
    /* Without randomness the free bits are zero: CRC 5fbfbdb2, r = 1. */
    static const uint8_t want[DG_NODE_ID_LEN] = {0x5f, 0xbf, 0xb8, [19] = 0x01};

    (void)state;
    assert_int_equal(dg_node_id_make(SA(a), 1, NULL, NULL, id), 0);
    assert_memory_equal(id, want, sizeof(want));

    /* The masked-out bits of the address do not matter: 124.31.75.21 & 03.0f.3f.ff equals
     * 0.15.11.21 & 03.0f.3f.ff. */
    struct sockaddr_storage b = v4("0.15.11.21");
    assert_int_equal(dg_node_id_valid_for(id, SA(b)), 1);

    /* An unsupported family. */
    struct sockaddr_storage u;
    memset(&u, 0, sizeof(u));
    u.ss_family = AF_UNIX;
    memset(id, 0x77, sizeof(id));
    assert_int_equal(dg_node_id_make(SA(u), 1, NULL, NULL, id), -EAFNOSUPPORT);
    assert_int_equal(id[0], 0x77);
    assert_int_equal(dg_node_id_valid_for(id, SA(u)), 0);
    assert_int_equal(dg_node_id_addr_is_local(SA(u)), 0);
}

static void test_bep42_ipv6(void **state)
{
    uint8_t id[DG_NODE_ID_LEN];
    uint64_t seed = 42;

    (void)state;
    /* Computed independently (a bitwise CRC32C over the high 8 bytes masked with
     * 01.03.07.0f.1f.3f.7f.ff, r in the top 3 bits): 985f16c4 for r = 3, a212e520 for r = 6. */
    struct sockaddr_storage a = v6("2a00:1450:4001:81b::200e");
    assert_int_equal(dg_node_id_make(SA(a), 3, NULL, NULL, id), 0);
    static const uint8_t want_a[DG_NODE_ID_LEN] = {0x98, 0x5f, 0x10, [19] = 3};
    assert_memory_equal(id, want_a, sizeof(want_a));
    assert_int_equal(dg_node_id_valid_for(id, SA(a)), 1);

    struct sockaddr_storage b = v6("2001:db8:85a3:8d3:1319:8a2e:370:7348");
    assert_int_equal(dg_node_id_make(SA(b), 0xae, rng_bytes, &seed, id), 0); /* r = 6 */
    assert_int_equal(id[0], 0xa2);
    assert_int_equal(id[1], 0x12);
    assert_int_equal(id[2] & 0xf8, 0xe0);
    assert_int_equal(id[19], 0xae);
    assert_int_equal(dg_node_id_valid_for(id, SA(b)), 1);
    assert_int_equal(dg_node_id_valid_for(id, SA(a)), 0);

    /* The low 64 bits of an IPv6 address are not part of the check. */
    struct sockaddr_storage c = v6("2001:db8:85a3:8d3::1");
    assert_int_equal(dg_node_id_valid_for(id, SA(c)), 1);

    /* An IPv4-mapped address is checked as the IPv4 address. */
    struct sockaddr_storage m = v6("::ffff:124.31.75.21");
    uint8_t want[DG_NODE_ID_LEN];
    hex_to_id(bep42_vectors[0].id, want);
    assert_int_equal(dg_node_id_valid_for(want, SA(m)), 1);
    assert_int_equal(dg_node_id_make(SA(m), 1, NULL, NULL, id), 0);
    assert_int_equal(id[0], 0x5f);
}

static void test_bep42_exempt(void **state)
{
    static const char *local4[] = {"10.0.0.1",    "10.255.255.255", "172.16.0.1", "172.31.255.254",
                                   "192.168.1.1", "169.254.10.10",  "127.0.0.1",  "127.1.2.3"};
    static const char *public4[] = {"9.255.255.255", "11.0.0.0",    "172.15.255.255", "172.32.0.0",
                                    "192.167.1.1",   "192.169.0.1", "169.253.1.1",    "128.0.0.1",
                                    "198.51.100.7",  "203.0.113.9", "124.31.75.21",   "5.6.7.8"};
    static const char *local6[] = {"::1",      "fe80::1",         "febf:ffff::1",    "fc00::1",
                                   "fd12::34", "::ffff:10.1.2.3", "::ffff:127.0.0.1"};
    static const char *public6[] = {"2001:db8::1", "fec0::1", "fe7f::1",
                                    "fbff::1",     "::2",     "::ffff:5.6.7.8"};
    uint8_t zero[DG_NODE_ID_LEN];

    (void)state;
    /* An all-zero id is invalid for every public address tested (their CRC prefixes are not
     * zero) and valid for every exempt one. */
    memset(zero, 0, sizeof(zero));
    for (size_t i = 0; i < sizeof(local4) / sizeof(local4[0]); i++) {
        struct sockaddr_storage a = v4(local4[i]);
        assert_int_equal(dg_node_id_addr_is_local(SA(a)), 1);
        assert_int_equal(dg_node_id_valid_for(zero, SA(a)), 1);
    }
    for (size_t i = 0; i < sizeof(public4) / sizeof(public4[0]); i++) {
        struct sockaddr_storage a = v4(public4[i]);
        assert_int_equal(dg_node_id_addr_is_local(SA(a)), 0);
        assert_int_equal(dg_node_id_valid_for(zero, SA(a)), 0);
    }
    for (size_t i = 0; i < sizeof(local6) / sizeof(local6[0]); i++) {
        struct sockaddr_storage a = v6(local6[i]);
        assert_int_equal(dg_node_id_addr_is_local(SA(a)), 1);
        assert_int_equal(dg_node_id_valid_for(zero, SA(a)), 1);
    }
    for (size_t i = 0; i < sizeof(public6) / sizeof(public6[0]); i++) {
        struct sockaddr_storage a = v6(public6[i]);
        assert_int_equal(dg_node_id_addr_is_local(SA(a)), 0);
        assert_int_equal(dg_node_id_valid_for(zero, SA(a)), 0);
    }
}

/* Made ids are valid for random public addresses, for every r. */
static void test_bep42_random_round_trip(void **state)
{
    uint64_t seed = 7;

    (void)state;
    for (int i = 0; i < 2000; i++) {
        struct sockaddr_storage ss;
        uint8_t id[DG_NODE_ID_LEN];
        memset(&ss, 0, sizeof(ss));
        if (i & 1) {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
            s6->sin6_family = AF_INET6;
            rng_bytes(&seed, &s6->sin6_addr, 16);
        } else {
            struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
            s4->sin_family = AF_INET;
            rng_bytes(&seed, &s4->sin_addr, 4);
        }
        assert_int_equal(dg_node_id_make(SA(ss), (uint8_t)i, rng_bytes, &seed, id), 0);
        assert_int_equal(dg_node_id_valid_for(id, SA(ss)), 1);
        assert_int_equal(id[19], (uint8_t)i);
    }
}

static void test_xor_metric(void **state)
{
    uint8_t t[DG_NODE_ID_LEN], a[DG_NODE_ID_LEN], b[DG_NODE_ID_LEN], x[DG_NODE_ID_LEN];
    uint64_t seed = 1;

    (void)state;
    memset(t, 0, sizeof(t));
    memset(a, 0, sizeof(a));
    memset(b, 0, sizeof(b));
    a[19] = 1;
    b[0] = 0x80;
    assert_true(dg_node_id_closer(t, a, b) < 0);
    assert_true(dg_node_id_closer(t, b, a) > 0);
    assert_int_equal(dg_node_id_closer(t, a, a), 0);
    /* Relative to b, b itself is closest. */
    assert_true(dg_node_id_closer(b, b, a) < 0);

    assert_int_equal(dg_node_id_common_prefix(a, a), 160);
    assert_int_equal(dg_node_id_common_prefix(t, b), 0);
    assert_int_equal(dg_node_id_common_prefix(t, a), 159);
    b[0] = 0x01;
    assert_int_equal(dg_node_id_common_prefix(t, b), 7);
    b[0] = 0;
    b[1] = 0x20;
    assert_int_equal(dg_node_id_common_prefix(t, b), 10);
    assert_int_equal(dg_node_id_bit(b, 10), 1);
    assert_int_equal(dg_node_id_bit(b, 9), 0);
    assert_int_equal(dg_node_id_bit(a, 159), 1);

    /* Random cases against the definition: compare a^t and b^t as big-endian numbers. */
    for (int i = 0; i < 1000; i++) {
        uint8_t da[DG_NODE_ID_LEN], db[DG_NODE_ID_LEN];
        rng_bytes(&seed, t, sizeof(t));
        rng_bytes(&seed, a, sizeof(a));
        memcpy(b, a, sizeof(b));
        /* Share a random-length prefix so that deep comparisons are exercised. */
        unsigned from = (unsigned)(rng_next(&seed) % DG_NODE_ID_LEN);
        rng_bytes(&seed, b + from, sizeof(b) - from);
        dg_node_id_xor(a, t, da);
        dg_node_id_xor(b, t, db);
        int want = memcmp(da, db, sizeof(da));
        int got = dg_node_id_closer(t, a, b);
        assert_true((want < 0 && got < 0) || (want == 0 && got == 0) || (want > 0 && got > 0));
        dg_node_id_xor(a, b, x);
        unsigned cpl = dg_node_id_common_prefix(a, b);
        for (unsigned k = 0; k < cpl; k++)
            assert_int_equal(dg_node_id_bit(x, k), 0);
        if (cpl < 160)
            assert_int_equal(dg_node_id_bit(x, cpl), 1);
    }
}

static void test_random_prefixed(void **state)
{
    uint8_t p[DG_NODE_ID_LEN], out[DG_NODE_ID_LEN];
    uint64_t seed = 99;

    (void)state;
    for (unsigned bits = 0; bits <= 160; bits++) {
        int differs = 0;
        for (int i = 0; i < 8; i++) {
            rng_bytes(&seed, p, sizeof(p));
            dg_node_id_random_prefixed(p, bits, rng_bytes, &seed, out);
            assert_true(dg_node_id_common_prefix(p, out) >= bits);
            if (bits < 150 && dg_node_id_common_prefix(p, out) < 160)
                differs = 1;
        }
        if (bits < 150)
            assert_true(differs);
    }
    /* In place. */
    rng_bytes(&seed, p, sizeof(p));
    memcpy(out, p, sizeof(p));
    dg_node_id_random_prefixed(out, 12, rng_bytes, &seed, out);
    assert_true(dg_node_id_common_prefix(p, out) >= 12);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c),           cmocka_unit_test(test_bep42_vectors),
        cmocka_unit_test(test_bep42_make_exact), cmocka_unit_test(test_bep42_ipv6),
        cmocka_unit_test(test_bep42_exempt),     cmocka_unit_test(test_bep42_random_round_trip),
        cmocka_unit_test(test_xor_metric),       cmocka_unit_test(test_random_prefixed),
    };

    return cmocka_run_group_tests_name("node_id", tests, NULL, NULL);
}
