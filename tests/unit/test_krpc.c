/* Unit tests for engine/krpc.c: KRPC messages of the Mainline DHT. The BEP 5 example messages
 * are typed in below and compared byte for byte with what the encoders write; every field's
 * checks, the decoding limits and each encoder's round trip are covered. Inputs are parsed from
 * exact-size heap copies, so ASan reports any read past the end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bencode.h"
#include "engine/krpc.h"

#define ID_A "abcdefghij0123456789"
#define ID_M "mnopqrstuvwxyz123456"
#define ID_0 "0123456789abcdefghij"
#define U8(s) ((const uint8_t *)(s))

static uint8_t *copy_buf; /* the last parsed input; pointers of the last message point here */

static int parse(const void *s, size_t len, struct dg_krpc_msg *m)
{
    free(copy_buf);
    copy_buf = malloc(len ? len : 1);
    assert_non_null(copy_buf);
    memcpy(copy_buf, s, len);
    return dg_krpc_parse(copy_buf, len, m);
}

#define PARSE(lit, m) parse((lit), sizeof(lit) - 1, (m))

static int teardown(void **state)
{
    (void)state;
    free(copy_buf);
    copy_buf = NULL;
    return 0;
}

static const struct dg_krpc_hdr hdr_aa = {.tid = U8("aa"), .tid_len = 2};

static void expect_bytes(int len, const uint8_t *buf, const char *want, size_t want_len)
{
    assert_int_equal(len, (int)want_len);
    assert_memory_equal(buf, want, want_len);
}

#define EXPECT_BYTES(len, buf, lit) expect_bytes((len), (buf), (lit), sizeof(lit) - 1)

/* ---- the examples of BEP 5 ---- */

static void test_bep5_ping(void **state)
{
    static const char query[] = "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:qe";
    static const char reply[] = "d1:rd2:id20:" ID_M "e1:t2:aa1:y1:re";
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(query, &m), 0);
    assert_int_equal(m.type, DG_KRPC_QUERY);
    assert_int_equal(m.method, DG_KRPC_PING);
    assert_int_equal(m.tid_len, 2);
    assert_memory_equal(m.tid, "aa", 2);
    assert_memory_equal(m.id, ID_A, 20);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);
    assert_int_equal(m.name_len, 4);
    assert_memory_equal(m.name, "ping", 4);
    assert_int_equal(dg_krpc_check_query(&m), 0);
    EXPECT_BYTES(dg_krpc_encode_ping(out, sizeof(out), &hdr_aa, U8(ID_A)), out, query);

    assert_int_equal(PARSE(reply, &m), 0);
    assert_int_equal(m.type, DG_KRPC_RESPONSE);
    assert_int_equal(m.method, DG_KRPC_NONE);
    assert_memory_equal(m.id, ID_M, 20);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);
    assert_int_equal(dg_krpc_check_query(&m), -EINVAL);
    EXPECT_BYTES(dg_krpc_encode_ping_response(out, sizeof(out), &hdr_aa, U8(ID_M)), out, reply);
}

static void test_bep5_find_node(void **state)
{
    static const char query[] =
        "d1:ad2:id20:" ID_A "6:target20:" ID_M "e1:q9:find_node1:t2:aa1:y1:qe";
    /* The BEP's response example has a 9-byte "def456..." as nodes: not whole nodes. */
    static const char example_reply[] = "d1:rd2:id20:" ID_0 "5:nodes9:def456...e1:t2:aa1:y1:re";
    static const char node[] = ID_M "\x7f\0\0\x01\x1a\xe1";
    static const char reply[] = "d1:rd2:id20:" ID_0 "5:nodes26:" ID_M "\x7f\0\0\x01\x1a\xe1"
                                "e1:t2:aa1:y1:re";
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(query, &m), 0);
    assert_int_equal(m.method, DG_KRPC_FIND_NODE);
    assert_int_equal(m.has, DG_KRPC_HAS_ID | DG_KRPC_HAS_TARGET);
    assert_memory_equal(m.target, ID_M, 20);
    assert_int_equal(dg_krpc_check_query(&m), 0);
    EXPECT_BYTES(dg_krpc_encode_find_node(out, sizeof(out), &hdr_aa, U8(ID_A), U8(ID_M), 0), out,
                 query);

    assert_int_equal(PARSE(example_reply, &m), -EBADMSG);

    assert_int_equal(PARSE(reply, &m), 0);
    assert_int_equal(m.nnodes, 1);
    assert_memory_equal(m.nodes, node, 26);
    assert_int_equal(m.nnodes6, 0);
    assert_int_equal(m.has, DG_KRPC_HAS_ID | DG_KRPC_HAS_NODES);
    EXPECT_BYTES(dg_krpc_encode_find_node_response(out, sizeof(out), &hdr_aa, U8(ID_0), U8(node), 1,
                                                   NULL, 0),
                 out, reply);
}

static void test_bep5_get_peers(void **state)
{
    static const char query[] =
        "d1:ad2:id20:" ID_A "9:info_hash20:" ID_M "e1:q9:get_peers1:t2:aa1:y1:qe";
    static const char with_values[] =
        "d1:rd2:id20:" ID_A "5:token8:aoeusnth6:valuesl6:axje.u6:idhtnmee1:t2:aa1:y1:re";
    static const char example_nodes[] =
        "d1:rd2:id20:" ID_A "5:nodes9:def456...5:token8:aoeusnthe1:t2:aa1:y1:re";
    static const char nodes2[] = ID_M "\x0a\0\0\x01\x1a\xe1" ID_0 "\x0a\0\0\x02\x1a\xe2";
    static const char with_nodes[] =
        "d1:rd2:id20:" ID_A "5:nodes52:" ID_M "\x0a\0\0\x01\x1a\xe1" ID_0 "\x0a\0\0\x02\x1a\xe2"
        "5:token8:aoeusnthe1:t2:aa1:y1:re";
    const struct dg_krpc_peer peers[] = {{U8("axje.u"), 6}, {U8("idhtnm"), 6}};
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(query, &m), 0);
    assert_int_equal(m.method, DG_KRPC_GET_PEERS);
    assert_memory_equal(m.info_hash, ID_M, 20);
    assert_int_equal(dg_krpc_check_query(&m), 0);
    EXPECT_BYTES(dg_krpc_encode_get_peers(out, sizeof(out), &hdr_aa, U8(ID_A), U8(ID_M), 0), out,
                 query);

    assert_int_equal(PARSE(with_values, &m), 0);
    assert_int_equal(m.type, DG_KRPC_RESPONSE);
    assert_int_equal(m.token_len, 8);
    assert_memory_equal(m.token, "aoeusnth", 8);
    assert_int_equal(m.nvalues, 2);
    assert_int_equal(m.values[0].len, 6);
    assert_memory_equal(m.values[0].addr, "axje.u", 6);
    assert_memory_equal(m.values[1].addr, "idhtnm", 6);
    assert_int_equal(m.values_skipped, 0);
    assert_int_equal(m.values_dropped, 0);
    EXPECT_BYTES(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, U8(ID_A),
                                                   U8("aoeusnth"), 8, peers, 2, NULL, 0, NULL, 0),
                 out, with_values);

    assert_int_equal(PARSE(example_nodes, &m), -EBADMSG);
    assert_int_equal(PARSE(with_nodes, &m), 0);
    assert_int_equal(m.nnodes, 2);
    assert_int_equal(m.nvalues, 0);
    assert_false(m.has & DG_KRPC_HAS_VALUES);
    EXPECT_BYTES(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, U8(ID_A),
                                                   U8("aoeusnth"), 8, NULL, 0, U8(nodes2), 2, NULL,
                                                   0),
                 out, with_nodes);
}

static void test_bep5_announce_peer(void **state)
{
    /* The BEP's bencoded example leaves "implied_port" out; its dict form has it as 1. */
    static const char query[] = "d1:ad2:id20:" ID_A "9:info_hash20:" ID_M
                                "4:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe";
    static const char implied[] = "d1:ad2:id20:" ID_A "12:implied_porti1e9:info_hash20:" ID_M
                                  "4:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe";
    static const char reply[] = "d1:rd2:id20:" ID_M "e1:t2:aa1:y1:re";
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(query, &m), 0);
    assert_int_equal(m.method, DG_KRPC_ANNOUNCE_PEER);
    assert_int_equal(m.port, 6881);
    assert_int_equal(m.implied_port, 0);
    assert_int_equal(m.has,
                     DG_KRPC_HAS_ID | DG_KRPC_HAS_INFO_HASH | DG_KRPC_HAS_PORT | DG_KRPC_HAS_TOKEN);
    assert_memory_equal(m.token, "aoeusnth", 8);
    assert_int_equal(dg_krpc_check_query(&m), 0);
    EXPECT_BYTES(dg_krpc_encode_announce_peer(out, sizeof(out), &hdr_aa, U8(ID_A), U8(ID_M), 6881,
                                              0, U8("aoeusnth"), 8),
                 out, query);

    assert_int_equal(PARSE(implied, &m), 0);
    assert_int_equal(m.implied_port, 1);
    assert_true(m.has & DG_KRPC_HAS_IMPLIED_PORT);
    EXPECT_BYTES(dg_krpc_encode_announce_peer(out, sizeof(out), &hdr_aa, U8(ID_A), U8(ID_M), 6881,
                                              7, U8("aoeusnth"), 8),
                 out, implied);

    assert_int_equal(PARSE(reply, &m), 0);
    EXPECT_BYTES(dg_krpc_encode_ping_response(out, sizeof(out), &hdr_aa, U8(ID_M)), out, reply);
}

static void test_bep5_error(void **state)
{
    static const char err[] = "d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee";
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(err, &m), 0);
    assert_int_equal(m.type, DG_KRPC_ERROR);
    assert_int_equal(m.error_code, 201);
    assert_int_equal(m.error_msg_len, 23);
    assert_memory_equal(m.error_msg, "A Generic Error Ocurred", 23);
    assert_int_equal(m.has, 0);
    EXPECT_BYTES(dg_krpc_encode_error(out, sizeof(out), &hdr_aa, DG_KRPC_ERR_GENERIC,
                                      "A Generic Error Ocurred", 23),
                 out, err);

    /* Extra list items are tolerated; a non-string message or a missing one is not. */
    assert_int_equal(PARSE("d1:eli202e0:i5ee1:t1:x1:y1:ee", &m), 0);
    assert_int_equal(m.error_code, 202);
    assert_int_equal(m.error_msg_len, 0);
}

/* ---- round trips ---- */

static const uint8_t tid16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0xfe, 0xff};
static const uint8_t ip4[6] = {203, 0, 113, 7, 0x1a, 0xe1};
static const uint8_t ip6[18] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0,    0,
                                0,    0,    0,    0,    0, 0, 1, 0x1a, 0xe1};

static void check_envelope(const struct dg_krpc_msg *m, const struct dg_krpc_hdr *h)
{
    assert_int_equal(m->tid_len, h->tid_len);
    assert_memory_equal(m->tid, h->tid, h->tid_len);
    assert_int_equal(!!(m->has & DG_KRPC_HAS_VERSION), h->version != NULL);
    if (h->version) {
        assert_int_equal(m->version_len, h->version_len);
        assert_memory_equal(m->version, h->version, h->version_len);
    }
    assert_int_equal(!!(m->has & DG_KRPC_HAS_IP), h->ip != NULL);
    if (h->ip) {
        assert_int_equal(m->ip_len, h->ip_len);
        assert_memory_equal(m->ip, h->ip, h->ip_len);
    }
}

static void test_round_trip_queries(void **state)
{
    const struct dg_krpc_hdr hdrs[] = {
        {.tid = U8("x"), .tid_len = 1},
        {.tid = tid16, .tid_len = 16, .version = U8("DG\0\1"), .version_len = 4},
        {.tid = U8("ab"), .tid_len = 2, .version = U8(""), .version_len = 0},
    };
    uint8_t id[20], target[20], token[64], out[512];
    struct dg_krpc_msg m;
    int len;

    (void)state;
    for (int i = 0; i < 20; i++) {
        id[i] = (uint8_t)(0xff - i);
        target[i] = (uint8_t)i;
    }
    for (int i = 0; i < 64; i++)
        token[i] = (uint8_t)(i * 7);

    for (size_t hi = 0; hi < sizeof(hdrs) / sizeof(hdrs[0]); hi++) {
        const struct dg_krpc_hdr *h = &hdrs[hi];

        len = dg_krpc_encode_ping(out, sizeof(out), h, id);
        assert_true(len > 0);
        assert_int_equal(parse(out, (size_t)len, &m), 0);
        check_envelope(&m, h);
        assert_int_equal(m.method, DG_KRPC_PING);
        assert_memory_equal(m.id, id, 20);

        for (unsigned want = 0; want < 4; want++) {
            len = dg_krpc_encode_find_node(out, sizeof(out), h, id, target, want);
            assert_true(len > 0);
            assert_int_equal(parse(out, (size_t)len, &m), 0);
            check_envelope(&m, h);
            assert_int_equal(m.method, DG_KRPC_FIND_NODE);
            assert_memory_equal(m.target, target, 20);
            assert_int_equal(m.want, want);
            assert_int_equal(!!(m.has & DG_KRPC_HAS_WANT), want != 0);

            len = dg_krpc_encode_get_peers(out, sizeof(out), h, id, target, want);
            assert_true(len > 0);
            assert_int_equal(parse(out, (size_t)len, &m), 0);
            check_envelope(&m, h);
            assert_int_equal(m.method, DG_KRPC_GET_PEERS);
            assert_memory_equal(m.info_hash, target, 20);
            assert_int_equal(m.want, want);
        }

        static const uint16_t ports[] = {1, 6881, 65535};
        for (size_t pi = 0; pi < 3; pi++) {
            for (size_t tl = 1; tl <= 64; tl += 63) {
                len = dg_krpc_encode_announce_peer(out, sizeof(out), h, id, target, ports[pi],
                                                   (int)pi == 1, token, tl);
                assert_true(len > 0);
                assert_int_equal(parse(out, (size_t)len, &m), 0);
                check_envelope(&m, h);
                assert_int_equal(m.method, DG_KRPC_ANNOUNCE_PEER);
                assert_memory_equal(m.info_hash, target, 20);
                assert_int_equal(m.port, ports[pi]);
                assert_int_equal(m.implied_port, pi == 1);
                assert_int_equal(m.token_len, tl);
                assert_memory_equal(m.token, token, tl);
                assert_int_equal(dg_krpc_check_query(&m), 0);
            }
        }
    }
}

static void test_round_trip_responses(void **state)
{
    const struct dg_krpc_hdr hdrs[] = {
        {.tid = U8("aa"), .tid_len = 2},
        {.tid = tid16,
         .tid_len = 16,
         .version = U8("LT\x01\x02"),
         .version_len = 4,
         .ip = ip4,
         .ip_len = 6},
        {.tid = U8("z"), .tid_len = 1, .ip = ip6, .ip_len = 18},
    };
    uint8_t id[20], nodes[26 * 8], nodes6[38 * 8], out[1024];
    uint8_t peer_bytes[8][18];
    struct dg_krpc_peer peers[8];
    struct dg_krpc_msg m;
    int len;

    (void)state;
    for (int i = 0; i < 20; i++)
        id[i] = (uint8_t)(i * 13);
    for (size_t i = 0; i < sizeof(nodes); i++)
        nodes[i] = (uint8_t)(i * 3);
    for (size_t i = 0; i < sizeof(nodes6); i++)
        nodes6[i] = (uint8_t)(i * 5);
    for (int i = 0; i < 8; i++) {
        memset(peer_bytes[i], i + 1, sizeof(peer_bytes[i]));
        peers[i].addr = peer_bytes[i];
        peers[i].len = i % 3 ? 6 : 18; /* BEP 32: parsers take mixed lists */
    }

    for (size_t hi = 0; hi < sizeof(hdrs) / sizeof(hdrs[0]); hi++) {
        const struct dg_krpc_hdr *h = &hdrs[hi];

        len = dg_krpc_encode_ping_response(out, sizeof(out), h, id);
        assert_true(len > 0);
        assert_int_equal(parse(out, (size_t)len, &m), 0);
        assert_int_equal(m.type, DG_KRPC_RESPONSE);
        check_envelope(&m, h);
        assert_memory_equal(m.id, id, 20);

        for (size_t n4 = 0; n4 <= 8; n4 += 4) {
            for (size_t n6 = 0; n6 <= 8; n6 += 8) {
                len = dg_krpc_encode_find_node_response(out, sizeof(out), h, id, nodes, n4,
                                                        n6 ? nodes6 : NULL, n6);
                assert_true(len > 0);
                assert_int_equal(parse(out, (size_t)len, &m), 0);
                check_envelope(&m, h);
                assert_int_equal(m.nnodes, n4);
                assert_memory_equal(m.nodes, nodes, n4 * 26);
                assert_int_equal(!!(m.has & DG_KRPC_HAS_NODES6), n6 != 0);
                assert_int_equal(m.nnodes6, n6);
                if (n6)
                    assert_memory_equal(m.nodes6, nodes6, n6 * 38);
            }
        }

        for (size_t nv = 0; nv <= 8; nv += 4) {
            len = dg_krpc_encode_get_peers_response(out, sizeof(out), h, id, U8("tok"), 3, peers,
                                                    nv, nodes, 8, nodes6, 2);
            assert_true(len > 0);
            assert_int_equal(parse(out, (size_t)len, &m), 0);
            check_envelope(&m, h);
            assert_int_equal(m.token_len, 3);
            assert_memory_equal(m.token, "tok", 3);
            assert_int_equal(m.nvalues, nv);
            for (size_t i = 0; i < nv; i++) {
                assert_int_equal(m.values[i].len, peers[i].len);
                assert_memory_equal(m.values[i].addr, peers[i].addr, peers[i].len);
            }
            assert_int_equal(m.nnodes, 8);
            assert_int_equal(m.nnodes6, 2);
        }
        /* Without a token, values or nodes: just the id. */
        len = dg_krpc_encode_get_peers_response(out, sizeof(out), h, id, NULL, 0, NULL, 0, NULL, 0,
                                                NULL, 0);
        assert_int_equal(parse(out, (size_t)len, &m), 0);
        assert_int_equal(m.has & ~(DG_KRPC_HAS_IP | DG_KRPC_HAS_VERSION), DG_KRPC_HAS_ID);

        len = dg_krpc_encode_error(out, sizeof(out), h, DG_KRPC_ERR_METHOD, "Method Unknown", 14);
        assert_true(len > 0);
        assert_int_equal(parse(out, (size_t)len, &m), 0);
        assert_int_equal(m.type, DG_KRPC_ERROR);
        check_envelope(&m, h);
        assert_int_equal(m.error_code, 204);
        assert_int_equal(m.error_msg_len, 14);
        assert_memory_equal(m.error_msg, "Method Unknown", 14);
    }

    len = dg_krpc_encode_error(out, sizeof(out), &hdr_aa, INT64_MIN, NULL, 0);
    assert_int_equal(parse(out, (size_t)len, &m), 0);
    assert_true(m.error_code == INT64_MIN);
}

/* ---- encoder limits ---- */

static void test_encode_nobufs(void **state)
{
    const struct dg_krpc_hdr h = {.tid = U8("aa"),
                                  .tid_len = 2,
                                  .version = U8("DG01"),
                                  .version_len = 4,
                                  .ip = ip6,
                                  .ip_len = 18};
    const struct dg_krpc_peer peers[] = {{ip4, 6}, {ip6, 18}};
    uint8_t id[20] = {1}, nodes[52] = {2};
    uint8_t out[512];

    (void)state;
    for (int which = 0; which < 8; which++) {
        int need = -1;

        for (size_t cap = 0; cap <= 300; cap++) {
            int len = 0;

            memset(out, 0xA5, sizeof(out));
            switch (which) {
            case 0:
                len = dg_krpc_encode_ping(out, cap, &h, id);
                break;
            case 1:
                len = dg_krpc_encode_find_node(out, cap, &h, id, id, 3);
                break;
            case 2:
                len = dg_krpc_encode_get_peers(out, cap, &h, id, id, 1);
                break;
            case 3:
                len = dg_krpc_encode_announce_peer(out, cap, &h, id, id, 80, 1, U8("t"), 1);
                break;
            case 4:
                len = dg_krpc_encode_ping_response(out, cap, &h, id);
                break;
            case 5:
                len = dg_krpc_encode_find_node_response(out, cap, &h, id, nodes, 2, NULL, 0);
                break;
            case 6:
                len = dg_krpc_encode_get_peers_response(out, cap, &h, id, U8("t"), 1, peers, 2,
                                                        nodes, 2, NULL, 0);
                break;
            case 7:
                len = dg_krpc_encode_error(out, cap, &h, 203, "bad", 3);
                break;
            }
            for (size_t i = cap; i < sizeof(out); i++)
                assert_int_equal(out[i], 0xA5);
            if (len == -ENOBUFS) {
                assert_int_equal(need, -1);
                continue;
            }
            assert_true(len > 0);
            assert_int_equal((size_t)len, cap);
            need = len;
            break;
        }
        assert_true(need > 0);
    }
}

static void test_encode_einval(void **state)
{
    uint8_t id[20] = {0}, out[512];
    struct dg_krpc_hdr h = hdr_aa;
    struct dg_krpc_peer bad_peer = {ip4, 7};
    struct dg_krpc_peer many[DG_KRPC_MAX_VALUES + 1];
    uint8_t tok[65] = {0};

    (void)state;
    h.tid_len = 0;
    assert_int_equal(dg_krpc_encode_ping(out, sizeof(out), &h, id), -EINVAL);
    h.tid_len = 17;
    assert_int_equal(dg_krpc_encode_ping(out, sizeof(out), &h, id), -EINVAL);
    h = hdr_aa;
    h.tid = NULL;
    assert_int_equal(dg_krpc_encode_ping_response(out, sizeof(out), &h, id), -EINVAL);
    assert_int_equal(dg_krpc_encode_ping(out, sizeof(out), NULL, id), -EINVAL);
    h = hdr_aa;
    h.ip = ip4;
    h.ip_len = 5;
    assert_int_equal(dg_krpc_encode_ping_response(out, sizeof(out), &h, id), -EINVAL);
    h = hdr_aa;
    h.ip_len = 6;
    assert_int_equal(dg_krpc_encode_ping_response(out, sizeof(out), &h, id), -EINVAL);
    h = hdr_aa;
    h.version_len = 3;
    assert_int_equal(dg_krpc_encode_error(out, sizeof(out), &h, 201, "x", 1), -EINVAL);

    assert_int_equal(dg_krpc_encode_find_node(out, sizeof(out), &hdr_aa, id, id, 4), -EINVAL);
    assert_int_equal(dg_krpc_encode_get_peers(out, sizeof(out), &hdr_aa, id, id, 8), -EINVAL);
    assert_int_equal(dg_krpc_encode_announce_peer(out, sizeof(out), &hdr_aa, id, id, 1, 0, NULL, 0),
                     -EINVAL);
    assert_int_equal(dg_krpc_encode_announce_peer(out, sizeof(out), &hdr_aa, id, id, 1, 0, tok, 0),
                     -EINVAL);
    assert_int_equal(dg_krpc_encode_announce_peer(out, sizeof(out), &hdr_aa, id, id, 1, 0, tok, 65),
                     -EINVAL);
    assert_int_equal(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, id, tok, 65, NULL,
                                                       0, NULL, 0, NULL, 0),
                     -EINVAL);
    assert_int_equal(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, id, tok, 1,
                                                       &bad_peer, 1, NULL, 0, NULL, 0),
                     -EINVAL);
    for (size_t i = 0; i < DG_KRPC_MAX_VALUES + 1; i++)
        many[i] = (struct dg_krpc_peer){ip4, 6};
    assert_int_equal(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, id, tok, 1, many,
                                                       DG_KRPC_MAX_VALUES + 1, NULL, 0, NULL, 0),
                     -EINVAL);
    assert_int_equal(dg_krpc_encode_get_peers_response(out, sizeof(out), &hdr_aa, id, tok, 1, NULL,
                                                       1, NULL, 0, NULL, 0),
                     -EINVAL);
    assert_int_equal(
        dg_krpc_encode_find_node_response(out, sizeof(out), &hdr_aa, id, NULL, 1, NULL, 0),
        -EINVAL);
    assert_int_equal(
        dg_krpc_encode_find_node_response(out, sizeof(out), &hdr_aa, id, NULL, 0, NULL, 2),
        -EINVAL);
    assert_int_equal(dg_krpc_encode_error(out, sizeof(out), &hdr_aa, 201, NULL, 2), -EINVAL);
}

/* ---- field checks ---- */

/* A value written into a test message: a string of n bytes, an integer, or raw bencoding. */
struct val {
    char kind; /* 's', 'i', 'r' */
    int64_t n;
    const char *raw;
};

#define S(n) ((struct val){'s', (n), NULL})
#define I(n) ((struct val){'i', (n), NULL})
#define R(r) ((struct val){'r', 0, (r)})

static void put_val(struct dg_bencode_writer *w, struct val v)
{
    static const uint8_t fill[128] = {0};

    if (v.kind == 's')
        dg_bencode_put_str(w, fill, (size_t)v.n);
    else if (v.kind == 'i')
        dg_bencode_put_int(w, v.n);
    else
        dg_bencode_put_raw(w, v.raw, strlen(v.raw));
}

/* A get_peers query, or a response, whose "a"/"r" holds "id" and @p key (in sorted order). */
static size_t build(uint8_t *out, size_t cap, int response, const char *key, struct val v)
{
    struct dg_bencode_writer w;

    dg_bencode_writer_init(&w, out, cap);
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, response ? "r" : "a");
    dg_bencode_begin_dict(&w);
    if (strcmp(key, "id") < 0) {
        dg_bencode_put_cstr(&w, key);
        put_val(&w, v);
    }
    dg_bencode_put_cstr(&w, "id");
    dg_bencode_put_str(&w, ID_A, 20);
    if (strcmp(key, "id") > 0) {
        dg_bencode_put_cstr(&w, key);
        put_val(&w, v);
    }
    dg_bencode_end(&w);
    if (!response) {
        dg_bencode_put_cstr(&w, "q");
        dg_bencode_put_cstr(&w, "get_peers");
    }
    dg_bencode_put_cstr(&w, "t");
    dg_bencode_put_cstr(&w, "aa");
    dg_bencode_put_cstr(&w, "y");
    dg_bencode_put_cstr(&w, response ? "r" : "q");
    dg_bencode_end(&w);
    int len = dg_bencode_writer_finish(&w);
    assert_true(len > 0);
    return (size_t)len;
}

static void test_field_checks(void **state)
{
    static const struct {
        const char *key;
        struct val good, bad;
    } cases[] = {
        {"target", S(20), S(19)},
        {"target", S(20), S(21)},
        {"target", S(20), I(1)},
        {"info_hash", S(20), S(0)},
        {"info_hash", S(20), R("le")},
        {"token", S(1), S(0)},
        {"token", S(64), S(65)},
        {"token", S(8), I(8)},
        {"port", I(0), I(-1)},
        {"port", I(65535), I(65536)},
        {"port", I(6881), S(4)},
        {"implied_port", I(1), S(1)},
        {"want", R("l2:n4e"), S(2)},
        {"want", R("l2:n62:n4i1ele2:xxe"), R("de")},
        {"nodes", S(0), S(1)},
        {"nodes", S(26), S(27)},
        {"nodes", S(104), S(25)},
        {"nodes", S(26), R("l26:aaaaaaaaaaaaaaaaaaaaaaaaaae")},
        {"nodes6", S(38), S(26)},
        {"nodes6", S(76), S(39)},
        {"values", R("le"), S(6)},
        {"values", R("l6:abcdefe"), I(0)},
        {"k", S(32), S(31)},
        {"sig", S(64), S(63)},
        {"sig", S(64), S(65)},
        {"seq", I(-1), S(1)},
        {"salt", S(64), S(65)},
        {"salt", S(0), I(0)},
        {"cas", I(5), R("le")},
        {"v", R("d1:ai1ee"), R("d1:ai1ee")}, /* any type: never bad */
        {"zzz", I(1), R("d1:bi1e1:ai1ee")},  /* unknown keys are ignored, but must be canonical */
    };
    uint8_t buf[512];
    struct dg_krpc_msg m;

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int response = 0; response < 2; response++) {
            size_t len = build(buf, sizeof(buf), response, cases[i].key, cases[i].good);
            if (parse(buf, len, &m) != 0)
                fail_msg("case %zu (%s) good value rejected", i, cases[i].key);
            len = build(buf, sizeof(buf), response, cases[i].key, cases[i].bad);
            int rc = parse(buf, len, &m);
            int expect = strcmp(cases[i].key, "v") == 0 ? 0 : -EBADMSG;
            if (rc != expect)
                fail_msg("case %zu (%s) bad value gave %d", i, cases[i].key, rc);
            if (rc && strcmp(cases[i].key, "zzz") != 0) {
                /* A query with a bad argument can still be answered with error 203 (not so
                 * when the bencoding itself is bad, as in the "zzz" case). */
                assert_int_equal(m.type, response ? DG_KRPC_INVALID : DG_KRPC_QUERY);
                if (!response) {
                    assert_int_equal(m.tid_len, 2);
                    assert_memory_equal(m.tid, "aa", 2);
                }
            }
        }
    }

    /* The values of the good cases. */
    size_t len = build(buf, sizeof(buf), 0, "want", R("l2:n62:n4i1ele2:xxe"));
    assert_int_equal(parse(buf, len, &m), 0);
    assert_int_equal(m.want, DG_KRPC_WANT_N4 | DG_KRPC_WANT_N6);
    len = build(buf, sizeof(buf), 0, "want", R("l2:xxe"));
    assert_int_equal(parse(buf, len, &m), 0);
    assert_int_equal(m.want, 0);
    assert_true(m.has & DG_KRPC_HAS_WANT);
    len = build(buf, sizeof(buf), 0, "implied_port", I(-3));
    assert_int_equal(parse(buf, len, &m), 0);
    assert_int_equal(m.implied_port, 1);
    len = build(buf, sizeof(buf), 1, "nodes6", S(76));
    assert_int_equal(parse(buf, len, &m), 0);
    assert_int_equal(m.nnodes6, 2);
    len = build(buf, sizeof(buf), 1, "seq", I(INT64_MIN));
    assert_int_equal(parse(buf, len, &m), 0);
    assert_true(m.seq == INT64_MIN);
}

static void test_nodes_not_whole(void **state)
{
    uint8_t buf[512];
    struct dg_krpc_msg m;

    (void)state;
    for (int64_t n = 0; n <= 3 * 26 + 1; n++) {
        size_t len = build(buf, sizeof(buf), 1, "nodes", S(n));
        assert_int_equal(parse(buf, len, &m), n % 26 ? -EBADMSG : 0);
        if (n % 26 == 0)
            assert_int_equal(m.nnodes, (size_t)n / 26);
    }
}

static void test_envelope_rejects(void **state)
{
    static const char *const bad[] = {
        /* not a dict, not canonical, truncated, trailing */
        "le",
        "i1e",
        "4:spam",
        "d1:t2:aa1:ad2:id20:" ID_A "e1:q4:ping1:y1:qe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:q",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:qee",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:qei0e",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:qe ",
        /* t */
        "d1:ad2:id20:" ID_A "e1:q4:ping1:y1:qe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t0:1:y1:qe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t17:aaaaaaaaaaaaaaaaa1:y1:qe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:ti1e1:y1:qe",
        /* y */
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aae",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:xe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y2:qqe",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:y0:e",
        "d1:ad2:id20:" ID_A "e1:q4:ping1:t2:aa1:yi1ee",
        /* queries: q, a, id */
        "d1:ad2:id20:" ID_A "e1:t2:aa1:y1:qe",
        "d1:ad2:id20:" ID_A "e1:qi1e1:t2:aa1:y1:qe",
        "d1:q4:ping1:t2:aa1:y1:qe",
        "d1:al2:id20:" ID_A "e1:q4:ping1:t2:aa1:y1:qe",
        "d1:ade1:q4:ping1:t2:aa1:y1:qe",
        "d1:ad2:id19:abcdefghij012345678e1:q4:ping1:t2:aa1:y1:qe",
        "d1:ad2:id21:abcdefghij0123456789xe1:q4:ping1:t2:aa1:y1:qe",
        "d1:ad2:idi1ee1:q4:ping1:t2:aa1:y1:qe",
        /* a query's arguments do not come from "r" */
        "d1:q4:ping1:rd2:id20:" ID_A "e1:t2:aa1:y1:qe",
        /* responses: r, id */
        "d1:t2:aa1:y1:re",
        "d1:ad2:id20:" ID_A "e1:t2:aa1:y1:re",
        "d1:rl2:id20:" ID_A "e1:t2:aa1:y1:re",
        "d1:rde1:t2:aa1:y1:re",
        "d1:rd2:id3:abce1:t2:aa1:y1:re",
        /* errors: e */
        "d1:t2:aa1:y1:ee",
        "d1:ed1:ai1ee1:t2:aa1:y1:ee",
        "d1:elee1:t2:aa1:y1:ee",
        "d1:eli201ee1:t2:aa1:y1:ee",
        "d1:el3:msgi201ee1:t2:aa1:y1:ee",
        "d1:eli201ei202ee1:t2:aa1:y1:ee",
        "d1:e3:abc1:t2:aa1:y1:ee",
    };
    struct dg_krpc_msg m;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (parse(bad[i], strlen(bad[i]), &m) != -EBADMSG)
            fail_msg("message %zu accepted: %s", i, bad[i]);
    }
    /* Bad id in a query: the envelope survives for an error 203. */
    assert_int_equal(parse(bad[22], strlen(bad[22]), &m), -EBADMSG);
    assert_int_equal(m.type, DG_KRPC_QUERY);
    assert_int_equal(m.tid_len, 2);
    /* A malformed response keeps nothing. */
    assert_int_equal(parse(bad[30], strlen(bad[30]), &m), -EBADMSG);
    assert_int_equal(m.type, DG_KRPC_INVALID);
}

static void test_unknown_method(void **state)
{
    /* Arguments of an unknown method are not checked (only "id"), so it is answered with 204. */
    static const char q[] = "d1:ad2:id20:" ID_A "4:porti99999e6:target3:abc5:token0:e"
                            "1:q17:sample_infohashes1:t2:xy1:y1:qe";
    static const char no_id[] = "d1:ad6:target20:" ID_M "e1:q17:sample_infohashes1:t2:xy1:y1:qe";
    struct dg_krpc_msg m;

    (void)state;
    assert_int_equal(PARSE(q, &m), 0);
    assert_int_equal(m.type, DG_KRPC_QUERY);
    assert_int_equal(m.method, DG_KRPC_UNKNOWN);
    assert_int_equal(m.name_len, 17);
    assert_memory_equal(m.name, "sample_infohashes", 17);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);
    assert_memory_equal(m.id, ID_A, 20);
    assert_int_equal(dg_krpc_check_query(&m), -ENOSYS);

    assert_int_equal(PARSE(no_id, &m), -EBADMSG);
    assert_int_equal(m.type, DG_KRPC_QUERY);
    assert_memory_equal(m.tid, "xy", 2);

    /* Near misses of real names are unknown too. */
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q5:pings1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(m.method, DG_KRPC_UNKNOWN);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q0:1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(m.method, DG_KRPC_UNKNOWN);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q3:get1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(m.method, DG_KRPC_GET);
}

/* ---- limits ---- */

/* A ping whose "a" has a key "x" holding @p lists nested lists, the innermost holding @p ints
 * integers. */
static size_t build_nested(uint8_t *out, size_t cap, unsigned lists, unsigned ints)
{
    struct dg_bencode_writer w;

    dg_bencode_writer_init(&w, out, cap);
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, "a");
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, "id");
    dg_bencode_put_str(&w, ID_A, 20);
    dg_bencode_put_cstr(&w, "x");
    for (unsigned i = 0; i < lists; i++)
        dg_bencode_begin_list(&w);
    for (unsigned i = 0; i < ints; i++)
        dg_bencode_put_int(&w, i);
    for (unsigned i = 0; i < lists; i++)
        dg_bencode_end(&w);
    dg_bencode_end(&w);
    dg_bencode_put_cstr(&w, "q");
    dg_bencode_put_cstr(&w, "ping");
    dg_bencode_put_cstr(&w, "t");
    dg_bencode_put_cstr(&w, "aa");
    dg_bencode_put_cstr(&w, "y");
    dg_bencode_put_cstr(&w, "q");
    dg_bencode_end(&w);
    int len = dg_bencode_writer_finish(&w);
    assert_true(len > 0);
    return (size_t)len;
}

static void test_depth_limit(void **state)
{
    uint8_t buf[1024];
    struct dg_krpc_msg m;
    size_t len;

    (void)state;
    /* The message and "a" are two levels: 8 more lists make 10, 9 make 11. */
    len = build_nested(buf, sizeof(buf), 8, 1);
    assert_int_equal(parse(buf, len, &m), 0);
    assert_int_equal(m.method, DG_KRPC_PING);
    len = build_nested(buf, sizeof(buf), 9, 1);
    assert_int_equal(parse(buf, len, &m), -EBADMSG);
    len = build_nested(buf, sizeof(buf), 200, 0);
    assert_int_equal(parse(buf, len, &m), -EBADMSG);
}

static void test_token_limit(void **state)
{
    static uint8_t buf[8192];
    struct dg_bencode_token *toks = malloc(1000 * sizeof(*toks));
    struct dg_krpc_msg m;
    size_t len, n;

    (void)state;
    assert_non_null(toks);
    /* 13 tokens around the list's items. */
    len = build_nested(buf, sizeof(buf), 1, 487);
    assert_int_equal(dg_bencode_parse(buf, len, toks, 1000, 16, &n), 0);
    assert_int_equal(n, DG_KRPC_MAX_TOKENS);
    assert_int_equal(parse(buf, len, &m), 0);
    len = build_nested(buf, sizeof(buf), 1, 488);
    assert_int_equal(dg_bencode_parse(buf, len, toks, 1000, 16, &n), 0);
    assert_int_equal(n, DG_KRPC_MAX_TOKENS + 1);
    assert_int_equal(parse(buf, len, &m), -EBADMSG);
    free(toks);
}

static void test_values_cap(void **state)
{
    static uint8_t buf[4096];
    struct dg_bencode_writer w;
    struct dg_krpc_msg m;
    uint8_t peer[18];

    (void)state;
    dg_bencode_writer_init(&w, buf, sizeof(buf));
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, "r");
    dg_bencode_begin_dict(&w);
    dg_bencode_put_cstr(&w, "id");
    dg_bencode_put_str(&w, ID_A, 20);
    dg_bencode_put_cstr(&w, "token");
    dg_bencode_put_cstr(&w, "tk");
    dg_bencode_put_cstr(&w, "values");
    dg_bencode_begin_list(&w);
    for (int i = 0; i < 150; i++) {
        memset(peer, i, sizeof(peer));
        dg_bencode_put_str(&w, peer, i % 10 == 9 ? 18 : 6);
    }
    dg_bencode_end(&w);
    dg_bencode_end(&w);
    dg_bencode_put_cstr(&w, "t");
    dg_bencode_put_cstr(&w, "aa");
    dg_bencode_put_cstr(&w, "y");
    dg_bencode_put_cstr(&w, "r");
    dg_bencode_end(&w);
    int len = dg_bencode_writer_finish(&w);
    assert_true(len > 0);

    assert_int_equal(parse(buf, (size_t)len, &m), 0);
    assert_int_equal(m.nvalues, DG_KRPC_MAX_VALUES);
    assert_int_equal(m.values_dropped, 50);
    assert_int_equal(m.values_skipped, 0);
    for (int i = 0; i < DG_KRPC_MAX_VALUES; i++) {
        assert_int_equal(m.values[i].len, i % 10 == 9 ? 18 : 6);
        assert_int_equal(m.values[i].addr[0], i);
        assert_true(m.values[i].addr >= copy_buf && m.values[i].addr < copy_buf + len);
    }

    /* Malformed entries are skipped and counted, the rest kept in order. */
    static const char mixed[] = "d1:rd2:id20:" ID_A "6:valuesl6:abcdef3:abci6e7:abcdefgle"
                                "18:0123456789abcdefgh0:6:ghijklee1:t2:aa1:y1:re";
    assert_int_equal(PARSE(mixed, &m), 0);
    assert_int_equal(m.nvalues, 3);
    assert_int_equal(m.values_skipped, 5);
    assert_int_equal(m.values_dropped, 0);
    assert_memory_equal(m.values[0].addr, "abcdef", 6);
    assert_int_equal(m.values[1].len, 18);
    assert_memory_equal(m.values[2].addr, "ghijkl", 6);
}

/* ---- top-level extras and BEP 44 ---- */

static void test_top_level_extras(void **state)
{
    static const char with_ip[] = "d2:ip6:\xcb\0\x71\x07\x1a\xe1"
                                  "1:rd2:id20:" ID_M "e1:t2:aa1:v4:LT\x01\x02"
                                  "1:y1:re";
    static const char ip6_reply[] = "d2:ip18:\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\x1a\xe1"
                                    "1:rd2:id20:" ID_M "e1:t2:aa1:y1:re";
    static const char bad_ip[] = "d2:ip5:abcde1:rd2:id20:" ID_M "e1:t2:aa1:y1:re";
    static const char int_ip[] = "d2:ipi5e1:rd2:id20:" ID_M "e1:t2:aa1:vi1e1:y1:re";
    static const char ro[] = "d1:ad2:id20:" ID_A "e1:q4:ping2:roi1e1:t2:aa1:y1:qe";
    static const char extra[] = "d1:ad2:id20:" ID_A "4:xtrad1:xleee1:q4:ping1:t2:aa"
                                "3:unkli1ee1:y1:q1:zi0ee";
    struct dg_krpc_msg m;
    uint8_t out[256];

    (void)state;
    assert_int_equal(PARSE(with_ip, &m), 0);
    assert_int_equal(m.ip_len, 6);
    assert_memory_equal(m.ip, ip4, 6);
    assert_int_equal(m.version_len, 4);
    assert_memory_equal(m.version, "LT\x01\x02", 4);
    assert_int_equal(m.has, DG_KRPC_HAS_ID | DG_KRPC_HAS_IP | DG_KRPC_HAS_VERSION);
    const struct dg_krpc_hdr h = {.tid = U8("aa"),
                                  .tid_len = 2,
                                  .version = U8("LT\x01\x02"),
                                  .version_len = 4,
                                  .ip = ip4,
                                  .ip_len = 6};
    EXPECT_BYTES(dg_krpc_encode_ping_response(out, sizeof(out), &h, U8(ID_M)), out, with_ip);

    assert_int_equal(PARSE(ip6_reply, &m), 0);
    assert_int_equal(m.ip_len, 18);
    assert_memory_equal(m.ip, ip6, 18);

    /* A wrong "ip" or "v" is ignored: the rest of the reply is still good. */
    assert_int_equal(PARSE(bad_ip, &m), 0);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);
    assert_null(m.ip);
    assert_int_equal(PARSE(int_ip, &m), 0);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);

    assert_int_equal(PARSE(ro, &m), 0);
    assert_int_equal(m.read_only, 1);
    assert_true(m.has & DG_KRPC_HAS_RO);

    assert_int_equal(PARSE(extra, &m), 0);
    assert_int_equal(m.method, DG_KRPC_PING);
    assert_int_equal(m.has, DG_KRPC_HAS_ID);
}

static void test_bep44(void **state)
{
    /* Field names of BEP 44; the key, signature and token are made up. */
    static const char put[] =
        "d1:ad3:casi3e2:id20:" ID_A "1:k32:kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
        "4:salt6:foobar3:seqi4e"
        "3:sig64:ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss"
        "5:token8:aoeusnth1:v12:Hello world!e1:q3:put1:t2:aa1:y1:qe";
    static const char immutable[] = "d1:ad2:id20:" ID_A "5:token2:tk1:vli1ei2eee"
                                    "1:q3:put1:t2:aa1:y1:qe";
    static const char no_sig[] = "d1:ad2:id20:" ID_A "1:k32:kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
                                 "3:seqi1e5:token2:tk1:v1:xe1:q3:put1:t2:aa1:y1:qe";
    static const char salt_only[] = "d1:ad2:id20:" ID_A "4:salt1:s5:token2:tk1:v1:xe"
                                    "1:q3:put1:t2:aa1:y1:qe";
    static const char get[] = "d1:ad2:id20:" ID_A "3:seqi7e6:target20:" ID_M "e"
                              "1:q3:get1:t2:aa1:y1:qe";
    static const char get_reply[] =
        "d1:rd2:id20:" ID_M "1:k32:kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
        "5:nodes0:6:nodes60:3:seqi9e"
        "3:sig64:ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss"
        "5:token2:tk1:vd1:ai1eee1:t2:aa1:y1:re";
    struct dg_krpc_msg m;

    (void)state;
    assert_int_equal(PARSE(put, &m), 0);
    assert_int_equal(m.method, DG_KRPC_PUT);
    assert_int_equal(m.cas, 3);
    assert_int_equal(m.seq, 4);
    assert_memory_equal(m.key, "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk", 32);
    assert_int_equal(m.sig[63], 's');
    assert_int_equal(m.salt_len, 6);
    assert_memory_equal(m.salt, "foobar", 6);
    assert_int_equal(m.value_len, 15);
    assert_memory_equal(m.value, "12:Hello world!", 15);
    assert_false(m.has & DG_KRPC_HAS_VERSION);
    assert_int_equal(dg_krpc_check_query(&m), 0);

    assert_int_equal(PARSE(immutable, &m), 0);
    assert_int_equal(m.value_len, 8);
    assert_memory_equal(m.value, "li1ei2ee", 8);
    assert_int_equal(dg_krpc_check_query(&m), 0);
    assert_int_equal(PARSE(no_sig, &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);
    assert_int_equal(PARSE(salt_only, &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);

    assert_int_equal(PARSE(get, &m), 0);
    assert_int_equal(m.method, DG_KRPC_GET);
    assert_int_equal(m.seq, 7);
    assert_int_equal(dg_krpc_check_query(&m), 0);

    assert_int_equal(PARSE(get_reply, &m), 0);
    assert_int_equal(m.type, DG_KRPC_RESPONSE);
    assert_int_equal(m.seq, 9);
    assert_int_equal(m.value_len, 8);
    assert_memory_equal(m.value, "d1:ai1ee", 8);
    assert_true(m.has & DG_KRPC_HAS_NODES);
    assert_int_equal(m.nnodes, 0);
}

static void test_check_query(void **state)
{
    struct dg_krpc_msg m;

    (void)state;
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q9:find_node1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q9:get_peers1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "e1:q3:get1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "9:info_hash20:" ID_M "4:porti1ee"
                           "1:q13:announce_peer1:t2:aa1:y1:qe",
                           &m),
                     0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG); /* no token */
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "9:info_hash20:" ID_M "5:token1:te"
                           "1:q13:announce_peer1:t2:aa1:y1:qe",
                           &m),
                     0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG); /* no port */
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "9:info_hash20:" ID_M "4:porti0e5:token1:te"
                           "1:q13:announce_peer1:t2:aa1:y1:qe",
                           &m),
                     0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG); /* port 0 */
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "12:implied_porti1e9:info_hash20:" ID_M
                           "5:token1:te1:q13:announce_peer1:t2:aa1:y1:qe",
                           &m),
                     0);
    assert_int_equal(dg_krpc_check_query(&m), 0); /* implied port, no port */
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "9:info_hash20:" ID_M "e"
                           "1:q13:announce_peer1:t2:aa1:y1:qe",
                           &m),
                     0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG);
    assert_int_equal(PARSE("d1:ad2:id20:" ID_A "5:token2:tke1:q3:put1:t2:aa1:y1:qe", &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EBADMSG); /* no v */
    assert_int_equal(PARSE("d1:eli201e0:e1:t2:aa1:y1:ee", &m), 0);
    assert_int_equal(dg_krpc_check_query(&m), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bep5_ping),
        cmocka_unit_test(test_bep5_find_node),
        cmocka_unit_test(test_bep5_get_peers),
        cmocka_unit_test(test_bep5_announce_peer),
        cmocka_unit_test(test_bep5_error),
        cmocka_unit_test(test_round_trip_queries),
        cmocka_unit_test(test_round_trip_responses),
        cmocka_unit_test(test_encode_nobufs),
        cmocka_unit_test(test_encode_einval),
        cmocka_unit_test(test_field_checks),
        cmocka_unit_test(test_nodes_not_whole),
        cmocka_unit_test(test_envelope_rejects),
        cmocka_unit_test(test_unknown_method),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_token_limit),
        cmocka_unit_test(test_values_cap),
        cmocka_unit_test(test_top_level_extras),
        cmocka_unit_test(test_bep44),
        cmocka_unit_test(test_check_query),
    };

    return cmocka_run_group_tests_name("krpc", tests, NULL, teardown);
}
