/* Unit tests for engine/peer_msg.c: the peer wire codec of docs/PROTOCOL.md section 3.
 * Every message round-trips through encode, frame and parse; a few encodings are checked byte
 * by byte against bytes written out here by hand; every size rule is broken once; the stream
 * framing is fed at every split point; the checks that need the file's length are exercised at
 * the edges (last block, bits past the end, hash ranges past a layer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/merkle.h"
#include "engine/peer_msg.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---- */

/* Builds a frame by hand: length = 1 + plen, id, payload. Returns the frame length. */
static size_t make_frame(uint8_t id, const uint8_t *payload, size_t plen, uint8_t *out)
{
    uint32_t v = (uint32_t)(1 + plen);

    out[0] = (uint8_t)(v >> 24);
    out[1] = (uint8_t)(v >> 16);
    out[2] = (uint8_t)(v >> 8);
    out[3] = (uint8_t)v;
    out[4] = id;
    if (plen)
        memcpy(out + 5, payload, plen);
    return 5 + plen;
}

/* Parses a frame built from (id, payload) and returns the parse result. */
static int parse_payload(uint8_t id, const uint8_t *payload, size_t plen, struct dg_peer_msg *m)
{
    uint8_t *buf = malloc(5 + plen);
    size_t n, flen;
    int rc;

    assert_non_null(buf);
    n = make_frame(id, payload, plen, buf);
    assert_int_equal(dg_peer_msg_frame(buf, n, &flen), 0);
    assert_int_equal(flen, n);
    rc = dg_peer_msg_parse(buf, n, m);
    free(buf);
    return rc;
}

/* Frames and parses an encoder's output, which must be exactly one frame of @p n bytes. */
static void frame_and_parse(const uint8_t *buf, int n, struct dg_peer_msg *m)
{
    size_t flen = 0;

    assert_true(n > 0);
    assert_int_equal(dg_peer_msg_frame(buf, (size_t)n, &flen), 0);
    assert_int_equal(flen, (size_t)n);
    assert_int_equal(dg_peer_msg_parse(buf, (size_t)n, m), 0);
}

static void fill(uint8_t *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(seed + i * 31 + (i >> 8));
}

/* ---- handshake ---- */

static void test_handshake(void **state)
{
    uint8_t key[20], id[20], hs[DG_PEER_HANDSHAKE_LEN + 3];
    struct dg_peer_handshake h;

    (void)state;
    fill(key, sizeof(key), 1);
    fill(id, sizeof(id), 100);
    dg_peer_handshake_encode(key, id, hs);
    assert_int_equal(hs[0], 7);
    assert_memory_equal(hs + 1, "digfs/1", 7);
    for (int i = 8; i < 16; i++)
        assert_int_equal(hs[i], 0);
    assert_memory_equal(hs + 16, key, 20);
    assert_memory_equal(hs + 36, id, 20);

    /* Every prefix of a good handshake asks for more. */
    for (size_t len = 0; len < DG_PEER_HANDSHAKE_LEN; len++)
        assert_int_equal(dg_peer_handshake_parse(hs, len, &h), -EAGAIN);
    /* Whole, and with the first message's bytes behind it. */
    memset(hs + DG_PEER_HANDSHAKE_LEN, 0xee, 3);
    for (size_t len = DG_PEER_HANDSHAKE_LEN; len <= sizeof(hs); len++) {
        memset(&h, 0x55, sizeof(h));
        assert_int_equal(dg_peer_handshake_parse(hs, len, &h), 0);
        assert_memory_equal(h.swarm_key, key, 20);
        assert_memory_equal(h.node_id, id, 20);
        for (int i = 0; i < 8; i++)
            assert_int_equal(h.reserved[i], 0);
    }

    /* Reserved bits come back as sent and do not fail the handshake. */
    hs[8] = 0x80;
    hs[15] = 0x01;
    assert_int_equal(dg_peer_handshake_parse(hs, DG_PEER_HANDSHAKE_LEN, &h), 0);
    assert_int_equal(h.reserved[0], 0x80);
    assert_int_equal(h.reserved[7], 0x01);
}

static void test_handshake_wrong(void **state)
{
    uint8_t key[20] = {0}, id[20] = {0}, hs[DG_PEER_HANDSHAKE_LEN], bt[DG_PEER_HANDSHAKE_LEN];
    struct dg_peer_handshake h;

    (void)state;
    dg_peer_handshake_encode(key, id, hs);
    /* A BitTorrent handshake fails at its first byte (pstrlen 19). */
    memset(bt, 0, sizeof(bt));
    bt[0] = 19;
    memcpy(bt + 1, "BitTorrent protocol", 19);
    for (size_t len = 1; len <= sizeof(bt); len++)
        assert_int_equal(dg_peer_handshake_parse(bt, len, &h), -EPROTO);

    /* A wrong byte anywhere in pstrlen or pstr fails as soon as it has arrived. */
    for (size_t at = 0; at < 8; at++) {
        uint8_t bad[DG_PEER_HANDSHAKE_LEN];
        memcpy(bad, hs, sizeof(bad));
        bad[at] ^= 0x20;
        for (size_t len = 0; len <= at; len++)
            assert_int_equal(dg_peer_handshake_parse(bad, len, &h), -EAGAIN);
        for (size_t len = at + 1; len <= sizeof(bad); len++)
            assert_int_equal(dg_peer_handshake_parse(bad, len, &h), -EPROTO);
    }
    /* "digfs/2" is another protocol. */
    hs[7] = '2';
    assert_int_equal(dg_peer_handshake_parse(hs, sizeof(hs), &h), -EPROTO);
}

/* ---- byte-exact encodings ---- */

static void test_exact_bytes(void **state)
{
    uint8_t buf[64];

    (void)state;
    {
        static const uint8_t want[] = {0, 0, 0, 1, 0};
        assert_int_equal(dg_peer_msg_choke(buf, sizeof(buf)), 5);
        assert_memory_equal(buf, want, 5);
    }
    {
        static const uint8_t want[] = {0, 0, 0, 1, 11};
        assert_int_equal(dg_peer_msg_have_none(buf, sizeof(buf)), 5);
        assert_memory_equal(buf, want, 5);
    }
    {
        static const uint8_t want[] = {0, 0, 0, 0};
        memset(buf, 0xff, 4);
        assert_int_equal(dg_peer_msg_keepalive(buf, sizeof(buf)), 4);
        assert_memory_equal(buf, want, 4);
    }
    {
        static const uint8_t want[] = {0, 0, 0, 9, 4, 0x01, 0x02, 0x03, 0x04, 0, 0, 0, 5};
        assert_int_equal(dg_peer_msg_have(0x01020304, 5, buf, sizeof(buf)), 13);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        /* 12 bits from block 8: the low nibble of the last byte is cleared. */
        static const uint8_t bits[] = {0xa5, 0xff};
        static const uint8_t want[] = {0, 0, 0, 7, 5, 0, 0, 0, 8, 0xa5, 0xf0};
        assert_int_equal(dg_peer_msg_bitfield(8, bits, 12, buf, sizeof(buf)), 11);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        static const uint8_t want[] = {0, 0, 0, 5, 6, 0x00, 0x01, 0x00, 0xff};
        assert_int_equal(dg_peer_msg_request(0x100ff, buf, sizeof(buf)), 9);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        static const uint8_t want[] = {0, 0, 0, 5, 9, 0xde, 0xad, 0xbe, 0xef};
        assert_int_equal(dg_peer_msg_reject(0xdeadbeef, buf, sizeof(buf)), 9);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        static const uint8_t want[] = {0, 0, 0x40, 0x05, 7, 0, 0, 0, 9};
        uint8_t hdr[DG_PEER_BLOCK_HEADER_LEN];
        assert_int_equal(dg_peer_msg_block_header(9, 16384, hdr), DG_PEER_BLOCK_HEADER_LEN);
        assert_memory_equal(hdr, want, sizeof(want));
    }
    {
        static const uint8_t data[] = {'a', 'b', 'c'};
        static const uint8_t want[] = {0, 0, 0, 8, 7, 0, 0, 0, 2, 'a', 'b', 'c'};
        assert_int_equal(dg_peer_msg_block(2, data, 3, buf, sizeof(buf)), 12);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        static const uint8_t want[] = {0, 0, 0, 0x0b, 21, 3, 0, 0, 0, 0x10, 0, 0, 0, 4, 2};
        assert_int_equal(dg_peer_msg_hash_request(3, 0x10, 4, 2, buf, sizeof(buf)), 15);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        static const uint8_t want[] = {0,    0,    0, 0x0b, 23, 0xff, 0xff, 0xff,
                                       0xff, 0xff, 0, 0,    0,  0,    0xff};
        assert_int_equal(dg_peer_msg_hash_reject(255, 0xffffffff, 0, 255, buf, sizeof(buf)), 15);
        assert_memory_equal(buf, want, sizeof(want));
    }
    {
        uint8_t h[32];
        uint8_t want[15 + 32] = {0, 0, 0, 0x2b, 22, 0, 0, 0, 0, 7, 0, 0, 0, 1, 0};
        fill(h, 32, 9);
        memcpy(want + 15, h, 32);
        assert_int_equal(dg_peer_msg_hashes(0, 7, 1, 0, h, 1, buf, sizeof(buf)), 47);
        assert_memory_equal(buf, want, sizeof(want));
    }
}

static void test_hello_exact(void **state)
{
    struct dg_peer_hello h, back;
    uint8_t out[256];
    char want[256];
    int n, wn;

    (void)state;
    memset(&h, 0, sizeof(h));
    h.has_len = 1;
    h.len = 100;
    h.has_port = 1;
    h.port = 6881;
    h.has_pex = 1;
    h.pex = 1;
    h.has_reqq = 1;
    h.reqq = 250;
    memset(h.root, 'R', 32);
    h.has_v = 1;
    memcpy(h.v, "digfs 0.1.0", 11);
    h.v_len = 11;
    h.has_yourip = 1;
    memcpy(h.yourip, "\x7f\x00\x00\x01", 4);
    h.yourip_len = 4;

    wn = snprintf(want, sizeof(want),
                  "d3:leni100e1:pi6881e3:pexi1e4:reqqi250e4:root32:%s"
                  "1:v11:digfs 0.1.06:yourip4:\x7f%c%c\x01"
                  "e",
                  "RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR", 0, 0);
    n = dg_peer_hello_encode(&h, out, sizeof(out));
    assert_int_equal(n, wn);
    assert_memory_equal(out, want, (size_t)wn);

    assert_int_equal(dg_peer_hello_parse(out, (size_t)n, &back), 0);
    assert_memory_equal(&back, &h, sizeof(h));

    /* Only the root: "d4:root32:...e". */
    memset(&h, 0, sizeof(h));
    memset(h.root, 'R', 32);
    n = dg_peer_hello_encode(&h, out, sizeof(out));
    assert_int_equal(n, 2 + 6 + 3 + 32);
    assert_memory_equal(out, "d4:root32:", 10);
    assert_int_equal(out[n - 1], 'e');
    assert_int_equal(dg_peer_hello_parse(out, (size_t)n, &back), 0);
    assert_false(back.has_len || back.has_port || back.has_pex || back.has_reqq || back.has_v ||
                 back.has_yourip);
}

/* ---- round trips ---- */

static void test_round_trip_simple(void **state)
{
    static int (*const enc[])(uint8_t *, size_t) = {
        dg_peer_msg_choke,          dg_peer_msg_unchoke,  dg_peer_msg_interested,
        dg_peer_msg_not_interested, dg_peer_msg_have_all, dg_peer_msg_have_none,
        dg_peer_msg_keepalive,
    };
    static const enum dg_peer_msg_type type[] = {
        DG_PEER_MSG_CHOKE,          DG_PEER_MSG_UNCHOKE,  DG_PEER_MSG_INTERESTED,
        DG_PEER_MSG_NOT_INTERESTED, DG_PEER_MSG_HAVE_ALL, DG_PEER_MSG_HAVE_NONE,
        DG_PEER_MSG_KEEPALIVE,
    };
    uint8_t buf[8];
    struct dg_peer_msg m;

    (void)state;
    for (size_t i = 0; i < N_ELEMS(enc); i++) {
        int n = enc[i](buf, sizeof(buf));
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, type[i]);
        assert_null(m.data);
        assert_int_equal(m.data_len, 0);
        /* One byte short: -ENOBUFS. */
        assert_int_equal(enc[i](buf, (size_t)n - 1), -ENOBUFS);
    }
}

static void test_round_trip_fields(void **state)
{
    static const uint32_t blocks[] = {0, 1, 255, 0x10000, 0xfffffffe, 0xffffffff};
    static int (*const enc[])(uint32_t, uint8_t *, size_t) = {
        dg_peer_msg_request, dg_peer_msg_cancel, dg_peer_msg_reject};
    static const enum dg_peer_msg_type type[] = {DG_PEER_MSG_REQUEST, DG_PEER_MSG_CANCEL,
                                                 DG_PEER_MSG_REJECT};
    uint8_t buf[64];
    struct dg_peer_msg m;

    (void)state;
    for (size_t i = 0; i < N_ELEMS(enc); i++) {
        for (size_t j = 0; j < N_ELEMS(blocks); j++) {
            int n = enc[i](blocks[j], buf, sizeof(buf));
            assert_int_equal(n, 9);
            frame_and_parse(buf, n, &m);
            assert_int_equal(m.type, type[i]);
            assert_int_equal(m.id, (int)type[i]);
            assert_int_equal(m.block, blocks[j]);
            assert_int_equal(enc[i](blocks[j], buf, 8), -ENOBUFS);
        }
    }

    /* have */
    {
        static const uint32_t firsts[] = {0, 7, 0xfffffff0, 0xffffffff};
        for (size_t j = 0; j < N_ELEMS(firsts); j++) {
            uint64_t room = ((uint64_t)1 << 32) - firsts[j];
            uint32_t count = room > 1000 ? 1000 : (uint32_t)room;
            int n = dg_peer_msg_have(firsts[j], count, buf, sizeof(buf));
            assert_int_equal(n, 13);
            frame_and_parse(buf, n, &m);
            assert_int_equal(m.type, DG_PEER_MSG_HAVE);
            assert_int_equal(m.first, firsts[j]);
            assert_int_equal(m.count, count);
        }
        assert_int_equal(dg_peer_msg_have(0, 1, buf, 12), -ENOBUFS);
    }

    /* hash_request, hash_reject */
    {
        int n = dg_peer_msg_hash_request(6, 0, 1024, 0, buf, sizeof(buf));
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, DG_PEER_MSG_HASH_REQUEST);
        assert_int_equal(m.layer, 6);
        assert_int_equal(m.index, 0);
        assert_int_equal(m.count, 1024);
        assert_int_equal(m.proof_layers, 0);
        n = dg_peer_msg_hash_reject(200, 0x12345678, 99999, 77, buf, sizeof(buf));
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, DG_PEER_MSG_HASH_REJECT);
        assert_int_equal(m.layer, 200);
        assert_int_equal(m.index, 0x12345678);
        assert_int_equal(m.count, 99999);
        assert_int_equal(m.proof_layers, 77);
        assert_int_equal(dg_peer_msg_hash_request(0, 0, 1, 0, buf, 14), -ENOBUFS);
        assert_int_equal(dg_peer_msg_hash_reject(0, 0, 1, 0, buf, 14), -ENOBUFS);
    }
}

static void test_round_trip_data(void **state)
{
    uint8_t data[DG_PEER_BLOCK_SIZE], *buf;
    size_t cap = 15 + (DG_PEER_HASH_MAX_COUNT + DG_PEER_HASH_MAX_PROOF) * 32;
    struct dg_peer_msg m;
    int n;

    (void)state;
    buf = malloc(cap);
    assert_non_null(buf);
    fill(data, sizeof(data), 3);

    /* block: 1 byte, a short last block, a whole block. */
    static const size_t sizes[] = {1, 100, DG_PEER_BLOCK_SIZE - 1, DG_PEER_BLOCK_SIZE};
    for (size_t i = 0; i < N_ELEMS(sizes); i++) {
        uint8_t hdr[DG_PEER_BLOCK_HEADER_LEN];
        n = dg_peer_msg_block(42, data, sizes[i], buf, cap);
        assert_int_equal(n, 9 + (int)sizes[i]);
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, DG_PEER_MSG_BLOCK);
        assert_int_equal(m.block, 42);
        assert_int_equal(m.data_len, sizes[i]);
        assert_ptr_equal(m.data, buf + 9);
        assert_memory_equal(m.data, data, sizes[i]);
        /* The header-only variant gives the same first 9 bytes. */
        assert_int_equal(dg_peer_msg_block_header(42, sizes[i], hdr), 9);
        assert_memory_equal(hdr, buf, 9);
        assert_int_equal(dg_peer_msg_block(42, data, sizes[i], buf, 8 + sizes[i]), -ENOBUFS);
    }

    /* bitfield: 1 bit, 8, 9, a lot. */
    static const uint64_t nbits[] = {1, 8, 9, 8 * 1000 + 3};
    for (size_t i = 0; i < N_ELEMS(nbits); i++) {
        size_t nbytes = (size_t)((nbits[i] + 7) / 8);
        n = dg_peer_msg_bitfield(16, data, nbits[i], buf, cap);
        assert_int_equal(n, 9 + (int)nbytes);
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, DG_PEER_MSG_BITFIELD);
        assert_int_equal(m.first, 16);
        assert_int_equal(m.count, nbytes * 8);
        assert_int_equal(m.data_len, nbytes);
        assert_memory_equal(m.data, data, nbytes - 1);
        /* Re-encoding what was parsed gives the same bytes. */
        uint8_t *again = malloc((size_t)n);
        assert_non_null(again);
        assert_int_equal(dg_peer_msg_bitfield(m.first, m.data, m.count, again, (size_t)n), n);
        assert_memory_equal(again, buf, (size_t)n);
        free(again);
    }

    /* hashes: one, with a proof, the most. */
    static const struct {
        uint32_t count;
        uint8_t proof;
    } hc[] = {{1, 0}, {4, 3}, {DG_PEER_HASH_MAX_COUNT, DG_PEER_HASH_MAX_PROOF}};
    uint8_t *hashes = malloc((DG_PEER_HASH_MAX_COUNT + DG_PEER_HASH_MAX_PROOF) * 32);
    assert_non_null(hashes);
    fill(hashes, (DG_PEER_HASH_MAX_COUNT + DG_PEER_HASH_MAX_PROOF) * 32, 77);
    for (size_t i = 0; i < N_ELEMS(hc); i++) {
        size_t nh = hc[i].count + hc[i].proof;
        n = dg_peer_msg_hashes(2, 8, hc[i].count, hc[i].proof, hashes, nh, buf, cap);
        assert_int_equal(n, 15 + 32 * (int)nh);
        frame_and_parse(buf, n, &m);
        assert_int_equal(m.type, DG_PEER_MSG_HASHES);
        assert_int_equal(m.layer, 2);
        assert_int_equal(m.index, 8);
        assert_int_equal(m.count, hc[i].count);
        assert_int_equal(m.proof_layers, hc[i].proof);
        assert_int_equal(m.data_len, nh * 32);
        assert_memory_equal(m.data, hashes, nh * 32);
        assert_int_equal(
            dg_peer_msg_hashes(2, 8, hc[i].count, hc[i].proof, hashes, nh, buf, (size_t)n - 1),
            -ENOBUFS);
    }
    free(hashes);
    free(buf);
}

static void test_round_trip_bencoded(void **state)
{
    struct dg_peer_hello h, back;
    struct dg_peer_pex p, pback;
    uint8_t payload[2600], buf[2700], v4[50 * 6], v6[50 * 18];
    struct dg_peer_msg m;
    int n, pn;

    (void)state;
    memset(&h, 0, sizeof(h));
    fill(h.root, 32, 5);
    h.has_len = 1;
    h.len = DG_PEER_MAX_LENGTH;
    h.has_reqq = 1;
    h.reqq = DG_PEER_REQQ_MAX;
    h.has_yourip = 1;
    fill(h.yourip, 16, 8);
    h.yourip_len = 16;
    h.has_v = 1;
    h.v_len = 0;
    pn = dg_peer_hello_encode(&h, payload, sizeof(payload));
    assert_true(pn > 0);
    n = dg_peer_msg_hello(payload, (size_t)pn, buf, sizeof(buf));
    assert_int_equal(n, 5 + pn);
    frame_and_parse(buf, n, &m);
    assert_int_equal(m.type, DG_PEER_MSG_HELLO);
    assert_int_equal(m.data_len, (size_t)pn);
    assert_int_equal(dg_peer_hello_parse(m.data, m.data_len, &back), 0);
    assert_memory_equal(&back, &h, sizeof(h));
    assert_int_equal(dg_peer_msg_hello(payload, (size_t)pn, buf, (size_t)n - 1), -ENOBUFS);

    /* The payload encoded in place, at buf + 5, is not copied. */
    memset(buf, 0, sizeof(buf));
    pn = dg_peer_hello_encode(&h, buf + 5, sizeof(buf) - 5);
    n = dg_peer_msg_hello(buf + 5, (size_t)pn, buf, sizeof(buf));
    assert_int_equal(n, 5 + pn);
    assert_memory_equal(buf + 5, payload, (size_t)pn);
    frame_and_parse(buf, n, &m);
    assert_int_equal(m.type, DG_PEER_MSG_HELLO);

    /* pex with full lists, and with one empty list present. */
    fill(v4, sizeof(v4), 11);
    fill(v6, sizeof(v6), 12);
    memset(&p, 0, sizeof(p));
    p.added = v4;
    p.added_n = 50;
    p.added6 = v6;
    p.added6_n = 50;
    p.dropped = v4;
    p.dropped_n = 50;
    p.dropped6 = v6;
    p.dropped6_n = 50;
    pn = dg_peer_pex_encode(&p, payload, sizeof(payload));
    assert_true(pn > 0 && pn <= 2500);
    n = dg_peer_msg_pex(payload, (size_t)pn, buf, sizeof(buf));
    frame_and_parse(buf, n, &m);
    assert_int_equal(m.type, DG_PEER_MSG_PEX);
    assert_int_equal(dg_peer_pex_parse(m.data, m.data_len, &pback), 0);
    assert_int_equal(pback.added_n, 50);
    assert_int_equal(pback.added6_n, 50);
    assert_int_equal(pback.dropped_n, 50);
    assert_int_equal(pback.dropped6_n, 50);
    assert_memory_equal(pback.added, v4, sizeof(v4));
    assert_memory_equal(pback.added6, v6, sizeof(v6));
    assert_memory_equal(pback.dropped, v4, sizeof(v4));
    assert_memory_equal(pback.dropped6, v6, sizeof(v6));

    memset(&p, 0, sizeof(p));
    p.added = v4;
    p.added_n = 2;
    p.dropped6 = v6; /* present, empty */
    pn = dg_peer_pex_encode(&p, payload, sizeof(payload));
    assert_int_equal(pn, (int)strlen("d5:added12:............8:dropped60:e"));
    assert_memory_equal(payload, "d5:added12:", 11);
    assert_memory_equal(payload + 23, "8:dropped60:e", 13);
    assert_int_equal(dg_peer_pex_parse(payload, (size_t)pn, &pback), 0);
    assert_int_equal(pback.added_n, 2);
    assert_null(pback.added6);
    assert_null(pback.dropped);
    assert_non_null(pback.dropped6);
    assert_int_equal(pback.dropped6_n, 0);
}

/* ---- unknown ids ---- */

/* holepunch (3.9): every type, IPv4 and IPv6, round trip and exact bytes; bad fields. */
static void test_holepunch_codec(void **state)
{
    struct dg_peer_holepunch h = {0}, back;
    struct sockaddr_in *a4 = (struct sockaddr_in *)&h.addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&h.addr;
    uint8_t out[128];
    struct dg_peer_msg m;

    (void)state;
    for (int fam = 0; fam < 2; fam++) {
        for (int type = DG_PEER_HP_RENDEZVOUS; type <= DG_PEER_HP_ERROR; type++) {
            memset(&h, 0, sizeof(h));
            if (fam == 0) {
                a4->sin_family = AF_INET;
                a4->sin_addr.s_addr = htonl(0xcb007101u);
                a4->sin_port = htons(6881);
            } else {
                a6->sin6_family = AF_INET6;
                a6->sin6_addr.s6_addr[0] = 0x20;
                a6->sin6_addr.s6_addr[15] = 7;
                a6->sin6_port = htons(51413);
            }
            h.type = (enum dg_peer_holepunch_type)type;
            if (type == DG_PEER_HP_ERROR) {
                h.error = DG_PEER_HP_ERR_NO_SUCH_PEER;
            } else {
                h.nat = 3;
                if (type == DG_PEER_HP_CONNECT) {
                    h.initiator = 1;
                    memset(h.nonce, 0xa5, sizeof(h.nonce));
                }
            }
            size_t alen = fam == 0 ? 4 : 16;
            size_t plen = 4 + alen + (type == DG_PEER_HP_CONNECT ? 18 : 1);
            int n = dg_peer_msg_holepunch(&h, out, sizeof(out));
            assert_int_equal(n, (int)(5 + plen));
            assert_int_equal(out[4], DG_PEER_MSG_HOLEPUNCH);
            assert_int_equal(out[5], type);
            assert_int_equal(out[6], fam == 0 ? 4 : 6);
            assert_int_equal(out[7 + alen], fam == 0 ? 6881 >> 8 : 51413 >> 8);
            assert_int_equal(dg_peer_msg_parse(out, (size_t)n, &m), 0);
            assert_int_equal(m.type, DG_PEER_MSG_HOLEPUNCH);
            assert_int_equal(dg_peer_holepunch_parse(m.data, m.data_len, &back), 0);
            assert_memory_equal(&back, &h, sizeof(h));
            assert_int_equal(dg_peer_holepunch_parse(m.data, m.data_len - 1, &back), -EBADMSG);
            assert_int_equal(dg_peer_msg_holepunch(&h, out, (size_t)n - 1), -ENOBUFS);
        }
    }
    /* Fields out of range: refused both ways. */
    uint8_t p[] = {DG_PEER_HP_RENDEZVOUS, 4, 1, 2, 3, 4, 0x1a, 0xe1, 2};
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), 0);
    p[8] = 4; /* NAT class */
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), -EBADMSG);
    p[8] = 2;
    p[6] = p[7] = 0; /* port 0 */
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), -EBADMSG);
    p[7] = 1;
    p[1] = 5; /* family */
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), -EBADMSG);
    p[1] = 4;
    p[0] = 3; /* type */
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), -EBADMSG);
    p[0] = DG_PEER_HP_ERROR;
    p[8] = 0; /* error code */
    assert_int_equal(dg_peer_holepunch_parse(p, sizeof(p), &back), -EBADMSG);
    memset(&h, 0, sizeof(h));
    assert_int_equal(dg_peer_msg_holepunch(&h, out, sizeof(out)), -EINVAL); /* no address */
    a4->sin_family = AF_INET;
    a4->sin_port = htons(1);
    h.type = DG_PEER_HP_CONNECT;
    h.initiator = 2;
    assert_int_equal(dg_peer_msg_holepunch(&h, out, sizeof(out)), -EINVAL);
}

static void test_unknown_ids(void **state)
{
    static const uint8_t ids[] = {12, 13, 19, 26, 100, 255};
    static const uint8_t payload[] = {1, 2, 3};
    struct dg_peer_msg m;

    (void)state;
    for (size_t i = 0; i < N_ELEMS(ids); i++) {
        for (size_t plen = 0; plen <= sizeof(payload); plen++) {
            assert_int_equal(parse_payload(ids[i], payload, plen, &m), 0);
            assert_int_equal(m.type, DG_PEER_MSG_UNKNOWN);
            assert_int_equal(m.id, ids[i]);
            assert_int_equal(m.data_len, plen);
            assert_int_equal(dg_peer_msg_check(&m, 12345), 0);
        }
    }
}

/* ---- size rules ---- */

static void test_sizes_fixed(void **state)
{
    static const struct {
        uint8_t id;
        size_t size;
    } fixed[] = {
        {DG_PEER_MSG_CHOKE, 0},         {DG_PEER_MSG_UNCHOKE, 0},
        {DG_PEER_MSG_INTERESTED, 0},    {DG_PEER_MSG_NOT_INTERESTED, 0},
        {DG_PEER_MSG_HAVE_ALL, 0},      {DG_PEER_MSG_HAVE_NONE, 0},
        {DG_PEER_MSG_HAVE, 8},          {DG_PEER_MSG_REQUEST, 4},
        {DG_PEER_MSG_CANCEL, 4},        {DG_PEER_MSG_REJECT, 4},
        {DG_PEER_MSG_HASH_REQUEST, 10}, {DG_PEER_MSG_HASH_REJECT, 10},
    };
    uint8_t payload[16];
    struct dg_peer_msg m;

    (void)state;
    memset(payload, 0, sizeof(payload));
    payload[7] = 1; /* have: count 1 */
    for (size_t i = 0; i < N_ELEMS(fixed); i++) {
        assert_int_equal(parse_payload(fixed[i].id, payload, fixed[i].size, &m), 0);
        assert_int_equal(m.type, fixed[i].id);
        assert_int_equal(parse_payload(fixed[i].id, payload, fixed[i].size + 1, &m), -EBADMSG);
        /* A failed parse leaves nothing behind. */
        assert_int_equal(m.type, 0);
        assert_null(m.data);
        if (fixed[i].size > 0)
            assert_int_equal(parse_payload(fixed[i].id, payload, fixed[i].size - 1, &m), -EBADMSG);
    }
    /* request with 3 and 5 bytes, by name. */
    assert_int_equal(parse_payload(DG_PEER_MSG_REQUEST, payload, 3, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_REQUEST, payload, 5, &m), -EBADMSG);
}

static void test_sizes_fields(void **state)
{
    uint8_t p[64], *big;
    struct dg_peer_msg m;

    (void)state;
    /* have: count 0, and a range past block 2^32 - 1. */
    memset(p, 0, sizeof(p));
    assert_int_equal(parse_payload(DG_PEER_MSG_HAVE, p, 8, &m), -EBADMSG);
    memcpy(p, "\xff\xff\xff\xff\x00\x00\x00\x01", 8);
    assert_int_equal(parse_payload(DG_PEER_MSG_HAVE, p, 8, &m), 0);
    memcpy(p, "\xff\xff\xff\xff\x00\x00\x00\x02", 8);
    assert_int_equal(parse_payload(DG_PEER_MSG_HAVE, p, 8, &m), -EBADMSG);

    /* bitfield: first not a multiple of 8, no bits, past 2^32. */
    memset(p, 0, sizeof(p));
    p[3] = 8;
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 5, &m), 0);
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 4, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 3, &m), -EBADMSG);
    for (uint8_t f = 1; f < 8; f++) {
        p[3] = (uint8_t)(8 + f);
        assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 5, &m), -EBADMSG);
    }
    memcpy(p, "\xff\xff\xff\xf8", 4);
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 5, &m), 0);
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, p, 6, &m), -EBADMSG);

    /* bitfield: 2^20 bytes of bits is the most. */
    big = calloc(1, 4 + DG_PEER_BITFIELD_MAX_BYTES + 1);
    assert_non_null(big);
    assert_int_equal(parse_payload(DG_PEER_MSG_BITFIELD, big, 4 + DG_PEER_BITFIELD_MAX_BYTES, &m),
                     0);
    assert_int_equal(m.count, DG_PEER_BITFIELD_MAX_BYTES * 8);
    assert_int_equal(
        parse_payload(DG_PEER_MSG_BITFIELD, big, 4 + DG_PEER_BITFIELD_MAX_BYTES + 1, &m), -EBADMSG);

    /* block: no data, one byte, 16384, 16385. */
    assert_int_equal(parse_payload(DG_PEER_MSG_BLOCK, big, 4, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_BLOCK, big, 3, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_BLOCK, big, 5, &m), 0);
    assert_int_equal(parse_payload(DG_PEER_MSG_BLOCK, big, 4 + DG_PEER_BLOCK_SIZE, &m), 0);
    assert_int_equal(parse_payload(DG_PEER_MSG_BLOCK, big, 4 + DG_PEER_BLOCK_SIZE + 1, &m),
                     -EBADMSG);

    /* hashes: header "layer 0, index 0, count 2, proof 1", then exactly 3 hashes. */
    memset(big, 0, 10 + 40 * 32);
    big[8] = 2;
    big[9] = 1;
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 3 * 32, &m), 0);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 3 * 32 - 1, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 3 * 32 + 1, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 2 * 32, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 4 * 32, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10, &m), -EBADMSG);
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 9, &m), -EBADMSG);
    /* count 0; count 2049; proof_layers 33 (sizes matching the header). */
    big[8] = 0;
    big[9] = 1;
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 1 * 32, &m), -EBADMSG);
    big[8] = 1;
    big[9] = 33;
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 34 * 32, &m), -EBADMSG);
    big[9] = 32;
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 33 * 32, &m), 0);
    free(big);
    big = calloc(1, 10 + 2049 * 32);
    assert_non_null(big);
    big[7] = 0x08;
    big[8] = 0x01; /* count 2049 */
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 2049 * 32, &m), -EBADMSG);
    big[8] = 0x00; /* count 2048 */
    assert_int_equal(parse_payload(DG_PEER_MSG_HASHES, big, 10 + 2048 * 32, &m), 0);
    free(big);

    /* hash_request outside the limits is well-formed: answered with hash_reject (3.5). */
    memset(p, 0, sizeof(p));
    assert_int_equal(parse_payload(DG_PEER_MSG_HASH_REQUEST, p, 10, &m), 0); /* count 0 */
    assert_int_equal(dg_peer_check_hash_request(&m, 1 << 20), -ERANGE);
    memcpy(p, "\x00\x00\x00\x00\x00\x00\x00\x08\x01\x00", 10); /* count 2049 */
    assert_int_equal(parse_payload(DG_PEER_MSG_HASH_REQUEST, p, 10, &m), 0);
    assert_int_equal(m.count, 2049);
    assert_int_equal(dg_peer_check_hash_request(&m, (uint64_t)1 << 40), -ERANGE);
    memcpy(p, "\x00\x00\x00\x00\x00\x00\x00\x00\x01\x21", 10); /* proof_layers 33 */
    assert_int_equal(parse_payload(DG_PEER_MSG_HASH_REQUEST, p, 10, &m), 0);
    assert_int_equal(dg_peer_check_hash_request(&m, (uint64_t)1 << 40), -ERANGE);
}

static void test_encoder_args(void **state)
{
    uint8_t buf[64], data[1] = {0xff};
    uint8_t *big;

    (void)state;
    assert_int_equal(dg_peer_msg_have(0, 0, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_have(0xffffffff, 2, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_have(0xffffffff, 1, buf, sizeof(buf)), 13);
    assert_int_equal(dg_peer_msg_bitfield(4, data, 1, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_bitfield(8, data, 0, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_bitfield(0xfffffff8, data, 8, buf, sizeof(buf)), 10);
    assert_int_equal(dg_peer_msg_bitfield(0xfffffff8, data, 9, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(
        dg_peer_msg_bitfield(0, data, (uint64_t)DG_PEER_BITFIELD_MAX_BYTES * 8 + 1, buf, 64),
        -EINVAL);
    assert_int_equal(dg_peer_msg_block(0, data, 0, buf, sizeof(buf)), -EINVAL);
    big = calloc(1, DG_PEER_BLOCK_SIZE + 32);
    assert_non_null(big);
    assert_int_equal(
        dg_peer_msg_block(0, big, DG_PEER_BLOCK_SIZE + 1, big, DG_PEER_BLOCK_SIZE + 32), -EINVAL);
    free(big);
    assert_int_equal(dg_peer_msg_block_header(0, 0, buf), -EINVAL);
    assert_int_equal(dg_peer_msg_block_header(0, DG_PEER_BLOCK_SIZE + 1, buf), -EINVAL);
    assert_int_equal(dg_peer_msg_hash_request(0, 0, 0, 0, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_hash_request(0, 0, 2049, 0, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_hash_request(0, 0, 1, 33, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_hash_request(0, 0, 2048, 32, buf, sizeof(buf)), 15);
    assert_int_equal(dg_peer_msg_hashes(0, 0, 1, 0, buf, 2, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_hashes(0, 0, 1, 1, buf, 1, buf, sizeof(buf)), -EINVAL);
    assert_int_equal(dg_peer_msg_hashes(0, 0, 0, 0, buf, 0, buf, sizeof(buf)), -EINVAL);
    /* hello/pex payloads larger than a message. */
    assert_int_equal(dg_peer_msg_hello(buf, DG_PEER_MSG_MAX_LEN, buf, sizeof(buf)), -EMSGSIZE);
    assert_int_equal(dg_peer_msg_pex(buf, DG_PEER_MSG_MAX_LEN, buf, sizeof(buf)), -EMSGSIZE);
}

/* ---- framing ---- */

/* A buffer of several messages of every shape; returns its length and the frame count. */
static size_t build_stream(uint8_t *buf, size_t cap, size_t *nframes)
{
    uint8_t data[300], hashes[3 * 32], payload[128];
    struct dg_peer_hello h;
    size_t off = 0;
    int n, pn;

    fill(data, sizeof(data), 21);
    fill(hashes, sizeof(hashes), 22);
    memset(&h, 0, sizeof(h));
    fill(h.root, 32, 23);
    h.has_reqq = 1;
    h.reqq = 250;
    pn = dg_peer_hello_encode(&h, payload, sizeof(payload));
    assert_true(pn > 0);

#define ADD(call)           \
    do {                    \
        n = (call);         \
        assert_true(n > 0); \
        off += (size_t)n;   \
        (*nframes)++;       \
    } while (0)
    *nframes = 0;
    ADD(dg_peer_msg_hello(payload, (size_t)pn, buf + off, cap - off));
    ADD(dg_peer_msg_keepalive(buf + off, cap - off));
    ADD(dg_peer_msg_bitfield(0, data, 20, buf + off, cap - off));
    ADD(dg_peer_msg_unchoke(buf + off, cap - off));
    ADD(dg_peer_msg_keepalive(buf + off, cap - off));
    ADD(dg_peer_msg_have(3, 4, buf + off, cap - off));
    ADD(dg_peer_msg_block(5, data, sizeof(data), buf + off, cap - off));
    ADD(dg_peer_msg_hashes(0, 4, 2, 1, hashes, 3, buf + off, cap - off));
    ADD(dg_peer_msg_request(6, buf + off, cap - off));
    ADD(dg_peer_msg_keepalive(buf + off, cap - off));
#undef ADD
    return off;
}

/* A stream reader: appends @p len bytes to its buffer, then takes out every whole frame. */
struct reader {
    uint8_t buf[1024];
    size_t len;
    enum dg_peer_msg_type types[32];
    uint32_t vals[32];
    size_t n;
};

static void reader_feed(struct reader *r, const uint8_t *p, size_t len)
{
    size_t flen;
    int rc;

    assert_true(r->len + len <= sizeof(r->buf));
    memcpy(r->buf + r->len, p, len);
    r->len += len;
    while ((rc = dg_peer_msg_frame(r->buf, r->len, &flen)) == 0) {
        struct dg_peer_msg m;
        assert_int_equal(dg_peer_msg_parse(r->buf, flen, &m), 0);
        assert_true(r->n < N_ELEMS(r->types));
        r->types[r->n] = m.type;
        r->vals[r->n] = m.block + m.first + m.count + (uint32_t)m.data_len;
        r->n++;
        memmove(r->buf, r->buf + flen, r->len - flen);
        r->len -= flen;
    }
    assert_int_equal(rc, -EAGAIN);
    assert_true(flen > r->len);
    assert_true(r->len >= 4 ? flen >= 4 : flen == 4);
}

static void test_frame_partial(void **state)
{
    uint8_t stream[1024];
    size_t nframes, len = build_stream(stream, sizeof(stream), &nframes);
    struct reader whole, *r;

    (void)state;
    /* Frame by frame: every prefix of each frame asks for more, and says how much. */
    for (size_t off = 0, k = 0; off < len; k++) {
        size_t flen, f;
        assert_int_equal(dg_peer_msg_frame(stream + off, len - off, &f), 0);
        for (size_t l = 0; l < f; l++) {
            assert_int_equal(dg_peer_msg_frame(stream + off, l, &flen), -EAGAIN);
            assert_int_equal(flen, l < 4 ? 4 : f);
        }
        for (size_t l = f; l <= len - off; l++) {
            assert_int_equal(dg_peer_msg_frame(stream + off, l, &flen), 0);
            assert_int_equal(flen, f);
        }
        off += f;
        assert_true(k < nframes);
    }

    /* A reader fed everything at once ... */
    memset(&whole, 0, sizeof(whole));
    reader_feed(&whole, stream, len);
    assert_int_equal(whole.n, nframes);
    assert_int_equal(whole.len, 0);
    assert_int_equal(whole.types[0], DG_PEER_MSG_HELLO);
    assert_int_equal(whole.types[1], DG_PEER_MSG_KEEPALIVE);
    assert_int_equal(whole.types[nframes - 1], DG_PEER_MSG_KEEPALIVE);

    /* ... reads the same messages when the stream is cut in two anywhere, or in three. */
    r = malloc(sizeof(*r));
    assert_non_null(r);
    for (size_t a = 0; a <= len; a++) {
        memset(r, 0, sizeof(*r));
        reader_feed(r, stream, a);
        reader_feed(r, stream + a, len - a);
        assert_int_equal(r->n, nframes);
        assert_int_equal(r->len, 0);
        assert_memory_equal(r->types, whole.types, sizeof(whole.types));
        assert_memory_equal(r->vals, whole.vals, sizeof(whole.vals));
        for (size_t b = a; b <= len; b += 7) {
            memset(r, 0, sizeof(*r));
            reader_feed(r, stream, a);
            reader_feed(r, stream + a, b - a);
            reader_feed(r, stream + b, len - b);
            assert_int_equal(r->n, nframes);
            assert_memory_equal(r->vals, whole.vals, sizeof(whole.vals));
        }
    }
    /* One byte at a time. */
    memset(r, 0, sizeof(*r));
    for (size_t i = 0; i < len; i++)
        reader_feed(r, stream + i, 1);
    assert_int_equal(r->n, nframes);
    assert_memory_equal(r->types, whole.types, sizeof(whole.types));
    free(r);
}

static void test_frame_limit(void **state)
{
    const uint32_t max = DG_PEER_MSG_MAX_LEN;
    uint8_t hdr[4];
    uint8_t *buf;
    size_t flen;
    struct dg_peer_msg m;

    (void)state;
    assert_int_equal(max, 1048576 + 64);

    /* Exactly at the limit: more is needed, then it is a frame (an unknown id here). */
    hdr[0] = 0x00;
    hdr[1] = 0x10;
    hdr[2] = 0x00;
    hdr[3] = 0x40;
    assert_int_equal(dg_peer_msg_frame(hdr, 4, &flen), -EAGAIN);
    assert_int_equal(flen, 4 + (size_t)max);
    buf = calloc(1, 4 + (size_t)max + 1);
    assert_non_null(buf);
    memcpy(buf, hdr, 4);
    buf[4] = 200;
    assert_int_equal(dg_peer_msg_frame(buf, 4 + (size_t)max - 1, &flen), -EAGAIN);
    assert_int_equal(dg_peer_msg_frame(buf, 4 + (size_t)max, &flen), 0);
    assert_int_equal(flen, 4 + (size_t)max);
    assert_int_equal(dg_peer_msg_parse(buf, flen, &m), 0);
    assert_int_equal(m.type, DG_PEER_MSG_UNKNOWN);
    assert_int_equal(m.data_len, max - 1);
    /* A hello payload that fills a message exactly. */
    assert_int_equal(dg_peer_msg_hello(buf + 5, max - 1, buf, 4 + (size_t)max), 4 + (int)max);
    assert_int_equal(dg_peer_msg_hello(buf + 5, max, buf, 4 + (size_t)max + 1), -EMSGSIZE);

    /* One over: refused from the 4 length bytes alone, or from fewer when they already tell. */
    hdr[3] = 0x41;
    assert_int_equal(dg_peer_msg_frame(hdr, 4, &flen), -EMSGSIZE);
    assert_int_equal(flen, 0);
    assert_int_equal(dg_peer_msg_frame(hdr, 3, &flen), -EAGAIN); /* 0x001000xx may be fine */
    memcpy(buf, hdr, 4);
    assert_int_equal(dg_peer_msg_parse(buf, 4 + (size_t)max + 1, &m), -EMSGSIZE);
    hdr[2] = 0x01;
    assert_int_equal(dg_peer_msg_frame(hdr, 3, &flen), -EMSGSIZE);
    hdr[1] = 0x11;
    assert_int_equal(dg_peer_msg_frame(hdr, 2, &flen), -EMSGSIZE);
    hdr[0] = 0x01;
    hdr[1] = 0x00;
    assert_int_equal(dg_peer_msg_frame(hdr, 1, &flen), -EMSGSIZE);
    memset(hdr, 0xff, 4);
    assert_int_equal(dg_peer_msg_frame(hdr, 4, &flen), -EMSGSIZE);
    free(buf);

    /* parse() takes exactly one frame. */
    {
        uint8_t f[6] = {0, 0, 0, 1, 0, 0};
        assert_int_equal(dg_peer_msg_parse(f, 5, &m), 0);
        assert_int_equal(dg_peer_msg_parse(f, 6, &m), -EINVAL);
        assert_int_equal(dg_peer_msg_parse(f, 4, &m), -EINVAL);
        assert_int_equal(dg_peer_msg_parse(f, 3, &m), -EINVAL);
        assert_int_equal(dg_peer_msg_parse(f, 0, &m), -EINVAL);
    }
}

/* ---- checks with the file's length ---- */

static void test_block_size(void **state)
{
    const uint64_t len = 3 * 16384 + 100;

    (void)state;
    assert_int_equal(dg_peer_block_size(0, 0), 0);
    assert_int_equal(dg_peer_block_size(1, 0), 1);
    assert_int_equal(dg_peer_block_size(1, 1), 0);
    assert_int_equal(dg_peer_block_size(len, 0), 16384);
    assert_int_equal(dg_peer_block_size(len, 2), 16384);
    assert_int_equal(dg_peer_block_size(len, 3), 100);
    assert_int_equal(dg_peer_block_size(len, 4), 0);
    assert_int_equal(dg_peer_block_size(4 * 16384, 3), 16384);
    assert_int_equal(dg_peer_block_size(4 * 16384, 4), 0);
    assert_int_equal(dg_peer_block_size(DG_PEER_MAX_LENGTH, 0xffffffff), 16384);
    assert_int_equal(dg_peer_block_size(DG_PEER_MAX_LENGTH - 1, 0xffffffff), 16383);
}

static void test_check_block(void **state)
{
    const uint64_t len = 3 * 16384 + 100;
    uint8_t data[DG_PEER_BLOCK_SIZE], buf[DG_PEER_BLOCK_SIZE + 16];
    struct dg_peer_msg m;

    (void)state;
    memset(data, 7, sizeof(data));
    /* The last block is shorter: exactly its size is right. */
    frame_and_parse(buf, dg_peer_msg_block(3, data, 100, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), 0);
    assert_int_equal(dg_peer_msg_check(&m, len), 0);
    frame_and_parse(buf, dg_peer_msg_block(3, data, 101, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -EBADMSG);
    frame_and_parse(buf, dg_peer_msg_block(3, data, 99, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -EBADMSG);
    frame_and_parse(buf, dg_peer_msg_block(3, data, 16384, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_msg_check(&m, len), -EBADMSG);
    /* Other blocks are whole. */
    frame_and_parse(buf, dg_peer_msg_block(2, data, 16384, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), 0);
    frame_and_parse(buf, dg_peer_msg_block(2, data, 100, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -EBADMSG);
    /* Past the end. */
    frame_and_parse(buf, dg_peer_msg_block(4, data, 100, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -EBADMSG);
    assert_int_equal(dg_peer_check_block(&m, 0), -EBADMSG);

    /* Requests past the end are refused with a reject, not malformed. */
    frame_and_parse(buf, dg_peer_msg_request(3, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), 0);
    frame_and_parse(buf, dg_peer_msg_request(4, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -ERANGE);
    assert_int_equal(dg_peer_msg_check(&m, len), -ERANGE);
    frame_and_parse(buf, dg_peer_msg_cancel(4, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -ERANGE);
    frame_and_parse(buf, dg_peer_msg_reject(0, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), 0);

    /* Wrong type. */
    frame_and_parse(buf, dg_peer_msg_choke(buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_block(&m, len), -EINVAL);
    assert_int_equal(dg_peer_check_have(&m, len), -EINVAL);
    assert_int_equal(dg_peer_check_bitfield(&m, len), -EINVAL);
    assert_int_equal(dg_peer_check_hash_request(&m, len), -EINVAL);
    assert_int_equal(dg_peer_msg_check(&m, len), 0);
}

static void test_check_have(void **state)
{
    const uint64_t len = 10 * 16384 - 1; /* 10 blocks */
    uint8_t buf[16];
    struct dg_peer_msg m;

    (void)state;
    frame_and_parse(buf, dg_peer_msg_have(0, 10, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_have(&m, len), 0);
    assert_int_equal(dg_peer_check_have(&m, len - 16383), -EBADMSG); /* 9 blocks */
    frame_and_parse(buf, dg_peer_msg_have(9, 1, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_msg_check(&m, len), 0);
    frame_and_parse(buf, dg_peer_msg_have(9, 2, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_msg_check(&m, len), -EBADMSG);
    frame_and_parse(buf, dg_peer_msg_have(10, 1, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_have(&m, len), -EBADMSG);
    assert_int_equal(dg_peer_check_have(&m, 0), -EBADMSG);
}

static void test_check_bitfield(void **state)
{
    const uint64_t len = 10 * 16384; /* blocks 0..9 */
    uint8_t buf[32], bits[4];
    struct dg_peer_msg m;

    (void)state;
    /* Two bytes for 10 blocks: bits 10..15 must be zero. */
    bits[0] = 0xff;
    bits[1] = 0xc0;
    frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 16, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, len), 0);
    assert_int_equal(dg_peer_msg_check(&m, len), 0);
    for (int bit = 10; bit < 16; bit++) {
        bits[1] = (uint8_t)(0xc0 | (0x80 >> (bit - 8)));
        frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 16, buf, sizeof(buf)), &m);
        assert_int_equal(dg_peer_check_bitfield(&m, len), -EBADMSG);
    }
    /* A third byte is past the byte of the last block, even if zero. */
    memset(bits, 0, sizeof(bits));
    frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 24, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, len), -EBADMSG);
    /* From block 8: one byte, bits for blocks 8 and 9 only. */
    bits[0] = 0xc0;
    frame_and_parse(buf, dg_peer_msg_bitfield(8, bits, 8, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, len), 0);
    bits[0] = 0xe0;
    frame_and_parse(buf, dg_peer_msg_bitfield(8, bits, 8, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, len), -EBADMSG);
    /* First past the end. */
    bits[0] = 0;
    frame_and_parse(buf, dg_peer_msg_bitfield(16, bits, 8, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, len), -EBADMSG);
    /* A whole number of bytes: 16 blocks, every bit may be set. */
    memset(bits, 0xff, 2);
    frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 16, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, 16 * 16384), 0);
    assert_int_equal(dg_peer_check_bitfield(&m, 16 * 16384 - 1), 0);
    assert_int_equal(dg_peer_check_bitfield(&m, 15 * 16384), -EBADMSG);
    /* A partial first part: several messages may cover one file. */
    frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 8, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, 16 * 16384), 0);
    /* The empty file has no blocks to announce. */
    memset(bits, 0, 1);
    frame_and_parse(buf, dg_peer_msg_bitfield(0, bits, 8, buf, sizeof(buf)), &m);
    assert_int_equal(dg_peer_check_bitfield(&m, 0), -EBADMSG);
    assert_int_equal(dg_peer_check_bitfield(&m, 1), 0);
}

static int hash_req(uint8_t layer, uint32_t index, uint32_t count, uint8_t proof, uint64_t len)
{
    uint8_t buf[16];
    struct dg_peer_msg m;

    /* Build by hand: the encoder refuses out-of-limit requests. */
    uint8_t p[10] = {layer,
                     (uint8_t)(index >> 24),
                     (uint8_t)(index >> 16),
                     (uint8_t)(index >> 8),
                     (uint8_t)index,
                     (uint8_t)(count >> 24),
                     (uint8_t)(count >> 16),
                     (uint8_t)(count >> 8),
                     (uint8_t)count,
                     proof};
    size_t n = make_frame(DG_PEER_MSG_HASH_REQUEST, p, sizeof(p), buf);
    assert_int_equal(dg_peer_msg_parse(buf, n, &m), 0);
    assert_int_equal(dg_peer_msg_check(&m, len), dg_peer_check_hash_request(&m, len));
    return dg_peer_check_hash_request(&m, len);
}

static void test_tree_shape(void **state)
{
    (void)state;
    assert_int_equal(dg_peer_tree_height(0), 0);
    assert_int_equal(dg_peer_tree_height(1), 0);
    assert_int_equal(dg_peer_tree_height(16384), 0);
    assert_int_equal(dg_peer_tree_height(16385), 1);
    assert_int_equal(dg_peer_tree_height(3 * 16384), 2);
    assert_int_equal(dg_peer_tree_height(4 * 16384), 2);
    assert_int_equal(dg_peer_tree_height(4 * 16384 + 1), 3);
    assert_int_equal(dg_peer_tree_height(DG_PEER_MAX_LENGTH), 32);
    assert_int_equal(dg_peer_layer_nodes(0, 0), 0);
    assert_int_equal(dg_peer_layer_nodes(5 * 16384, 0), 5);
    assert_int_equal(dg_peer_layer_nodes(5 * 16384, 1), 3);
    assert_int_equal(dg_peer_layer_nodes(5 * 16384, 2), 2);
    assert_int_equal(dg_peer_layer_nodes(5 * 16384, 3), 1);
    assert_int_equal(dg_peer_layer_nodes(5 * 16384, 4), 0);

    /* The piece layer of 3.5 has dg_merkle_piece_count() real nodes, and its request is inside
     * the limits whenever the file has more than one block. */
    static const uint64_t lens[] = {
        1,          16384,          16385,      5 * 16384 + 3,     16ull << 20, (16ull << 20) + 1,
        1ull << 30, 12345678901ull, 1ull << 40, DG_PEER_MAX_LENGTH};
    for (size_t i = 0; i < N_ELEMS(lens); i++) {
        uint64_t piece = dg_merkle_piece_size(lens[i]), count = dg_merkle_piece_count(lens[i]);
        unsigned level = 0;
        while (((uint64_t)DG_PEER_BLOCK_SIZE << level) < piece)
            level++;
        assert_true(level <= dg_peer_tree_height(lens[i]));
        assert_int_equal(dg_peer_layer_nodes(lens[i], level), count);
        assert_int_equal(hash_req((uint8_t)level, 0, (uint32_t)count, 0, lens[i]), 0);
    }
}

static void test_check_hash_request(void **state)
{
    const uint64_t len = 5 * 16384; /* 5 leaves, height 3: layers of 5, 3, 2, 1 nodes */

    (void)state;
    assert_int_equal(hash_req(0, 0, 5, 0, len), 0);
    assert_int_equal(hash_req(0, 4, 1, 0, len), 0);
    assert_int_equal(hash_req(0, 0, 6, 0, len), -ERANGE); /* a padding leaf */
    assert_int_equal(hash_req(0, 5, 1, 0, len), -ERANGE);
    assert_int_equal(hash_req(0, 0xffffffff, 1, 0, len), -ERANGE);
    assert_int_equal(hash_req(1, 0, 3, 0, len), 0);
    assert_int_equal(hash_req(1, 2, 2, 0, len), -ERANGE);
    assert_int_equal(hash_req(2, 0, 2, 0, len), 0);
    assert_int_equal(hash_req(2, 1, 2, 0, len), -ERANGE);
    assert_int_equal(hash_req(3, 0, 1, 0, len), 0); /* the root */
    assert_int_equal(hash_req(4, 0, 1, 0, len), -ERANGE);
    assert_int_equal(hash_req(255, 0, 1, 0, len), -ERANGE);
    /* Limits that need no length. */
    assert_int_equal(hash_req(0, 0, 0, 0, len), -ERANGE);
    assert_int_equal(hash_req(0, 0, 2049, 0, (uint64_t)1 << 40), -ERANGE);
    assert_int_equal(hash_req(0, 0, 2048, 0, (uint64_t)1 << 40), 0);
    assert_int_equal(hash_req(0, 0, 1, 33, DG_PEER_MAX_LENGTH), -ERANGE);
    assert_int_equal(hash_req(0, 0, 1, 32, DG_PEER_MAX_LENGTH), 0);
    /* Proofs: an aligned power-of-two range, uncles up to below the root. */
    assert_int_equal(hash_req(0, 4, 1, 3, len), 0);
    assert_int_equal(hash_req(0, 4, 1, 4, len), -ERANGE);
    assert_int_equal(hash_req(0, 2, 2, 2, len), 0);
    assert_int_equal(hash_req(0, 2, 2, 3, len), -ERANGE);
    assert_int_equal(hash_req(0, 1, 2, 1, len), -ERANGE); /* not aligned */
    assert_int_equal(hash_req(0, 0, 3, 1, len), -ERANGE); /* not a power of two */
    assert_int_equal(hash_req(0, 0, 4, 1, len), 0);
    assert_int_equal(hash_req(1, 2, 1, 2, len), 0);
    assert_int_equal(hash_req(2, 0, 1, 1, len), 0);
    assert_int_equal(hash_req(2, 0, 2, 1, len), -ERANGE); /* the root has no uncle */
    assert_int_equal(hash_req(3, 0, 1, 1, len), -ERANGE);
    /* The empty file has no tree; a one-block file has only its root. */
    assert_int_equal(hash_req(0, 0, 1, 0, 0), -ERANGE);
    assert_int_equal(hash_req(0, 0, 1, 0, 1), 0);
    assert_int_equal(hash_req(0, 0, 1, 1, 1), -ERANGE);
    assert_int_equal(hash_req(1, 0, 1, 0, 1), -ERANGE);
}

/* ---- hello ---- */

static int hello_str(const char *s, struct dg_peer_hello *h)
{
    return dg_peer_hello_parse((const uint8_t *)s, strlen(s), h);
}

#define ROOT "4:root32:RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRR"

static void test_hello_rules(void **state)
{
    struct dg_peer_hello h;
    char s[600];

    (void)state;
    assert_int_equal(hello_str("d" ROOT "e", &h), 0);
    assert_false(h.has_reqq);
    /* Unknown keys are ignored, whatever their type. */
    assert_int_equal(hello_str("d1:ai1e" ROOT "1:zld1:xi1eeee", &h), 0);
    /* Boundaries accepted. */
    assert_int_equal(hello_str("d3:leni0e1:pi1e3:pexi0e4:reqqi1e" ROOT "1:v0:e", &h), 0);
    assert_true(h.has_len && h.has_port && h.has_pex && h.has_reqq && h.has_v);
    assert_int_equal(h.len, 0);
    assert_int_equal(h.port, 1);
    assert_int_equal(h.reqq, 1);
    assert_int_equal(hello_str("d3:leni70368744177664e1:pi65535e3:pexi1e4:reqqi2000e" ROOT
                               "1:v32:vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv6:yourip16:yyyyyyyyyyyyyyyye",
                               &h),
                     0);
    assert_int_equal(h.len, DG_PEER_MAX_LENGTH);
    assert_int_equal(h.port, 65535);
    assert_int_equal(h.v_len, 32);
    assert_int_equal(h.yourip_len, 16);

    /* Each rule broken once. */
    static const char *const bad[] = {
        "de",                                                /* no root */
        "d4:root31:RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRe",        /* root 31 bytes */
        "d4:root33:RRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRRe",      /* root 33 bytes */
        "d4:rooti1ee",                                       /* root an int */
        "d3:leni-1e" ROOT "e",                               /* negative length */
        "d3:leni70368744177665e" ROOT "e",                   /* over 2^46 */
        "d3:len1:1" ROOT "e",                                /* len a string */
        "d1:pi0e" ROOT "e",                                  /* port 0 */
        "d1:pi65536e" ROOT "e",                              /* port over 65535 */
        "d3:pexi2e" ROOT "e",                                /* pex not 0 or 1 */
        "d3:pexi-1e" ROOT "e",                               /* */
        "d4:reqqi0e" ROOT "e",                               /* reqq 0 */
        "d4:reqqi2001e" ROOT "e",                            /* reqq over 2000 */
        "d4:reqqle" ROOT "e",                                /* reqq a list */
        "d" ROOT "1:v33:vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvve", /* v 33 bytes */
        "d" ROOT "1:vi1ee",                                  /* v an int */
        "d" ROOT "6:yourip5:yyyyye",                         /* yourip 5 bytes */
        "d" ROOT "6:yourip0:e",                              /* */
        "d" ROOT "6:yourip15:yyyyyyyyyyyyyyye",              /* */
        "d" ROOT "6:yourip17:yyyyyyyyyyyyyyyyye",            /* */
        "l" ROOT "e",                                        /* not a dict */
        "i1e",                                               /* */
        "",                                                  /* */
        "d" ROOT "e ",                                       /* trailing byte */
        "d" ROOT,                                            /* cut short */
        "d1:pi1e" ROOT "3:leni1ee",                          /* keys not sorted */
        "d" ROOT ROOT "e",                                   /* duplicate key */
        "d1:alllleeee" ROOT "e",                             /* depth 5 */
    };
    for (size_t i = 0; i < N_ELEMS(bad); i++) {
        memset(&h, 0x5a, sizeof(h));
        assert_int_equal(hello_str(bad[i], &h), -EBADMSG);
        assert_int_equal(h.has_len | h.has_port | h.has_v, 0);
    }
    /* Depth 4 is the most. */
    assert_int_equal(hello_str("d1:allleee" ROOT "e", &h), 0);

    /* 64 tokens are the most: dict (1) + root key and value (2) + key "a" (1) + a list (1)
     * of 59 integers = 64. */
    size_t off = (size_t)snprintf(s, sizeof(s), "d1:al");
    for (int i = 0; i < 59; i++)
        off += (size_t)snprintf(s + off, sizeof(s) - off, "i%de", i);
    snprintf(s + off, sizeof(s) - off, "e" ROOT "e");
    assert_int_equal(hello_str(s, &h), 0);
    off = (size_t)snprintf(s, sizeof(s), "d1:al");
    for (int i = 0; i < 60; i++)
        off += (size_t)snprintf(s + off, sizeof(s) - off, "i%de", i);
    snprintf(s + off, sizeof(s) - off, "e" ROOT "e");
    assert_int_equal(hello_str(s, &h), -EBADMSG);
}

static void test_hello_encode_args(void **state)
{
    struct dg_peer_hello h, ok;
    uint8_t out[256];
    int n;

    (void)state;
    memset(&ok, 0, sizeof(ok));
    ok.has_reqq = 1;
    ok.reqq = 250;
    n = dg_peer_hello_encode(&ok, out, sizeof(out));
    assert_true(n > 0);
    assert_int_equal(dg_peer_hello_encode(&ok, out, (size_t)n - 1), -ENOBUFS);
    assert_int_equal(dg_peer_hello_encode(&ok, NULL, 0), -ENOBUFS);

    h = ok;
    h.reqq = 0;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h.reqq = 2001;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h = ok;
    h.has_port = 1;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h = ok;
    h.has_pex = 1;
    h.pex = 2;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h = ok;
    h.has_len = 1;
    h.len = DG_PEER_MAX_LENGTH + 1;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h = ok;
    h.has_v = 1;
    h.v_len = 33;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    h = ok;
    h.has_yourip = 1;
    h.yourip_len = 6;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), -EINVAL);
    /* Fields whose flag is clear are not looked at. */
    h = ok;
    h.v_len = 1000;
    h.yourip_len = 3;
    h.len = (uint64_t)-1;
    assert_int_equal(dg_peer_hello_encode(&h, out, sizeof(out)), n);
}

/* ---- pex ---- */

static int pex_str(const char *s, size_t len, struct dg_peer_pex *p)
{
    return dg_peer_pex_parse((const uint8_t *)s, len, p);
}

static void test_pex_rules(void **state)
{
    struct dg_peer_pex p;
    uint8_t entries[51 * 18], out[3000];
    char s[1200];
    int n;

    (void)state;
    assert_int_equal(pex_str("de", 2, &p), 0);
    assert_null(p.added);
    assert_int_equal(pex_str("d5:added6:abcdef1:zi1ee", strlen("d5:added6:abcdef1:zi1ee"), &p), 0);
    assert_int_equal(p.added_n, 1);
    assert_memory_equal(p.added, "abcdef", 6);
    assert_int_equal(
        pex_str("d6:added618:abcdefghijklmnopqre", strlen("d6:added618:abcdefghijklmnopqre"), &p),
        0);
    assert_int_equal(p.added6_n, 1);

    static const char *const bad[] = {
        "d5:added5:abcdee",
        "d5:added7:abcdefge",
        "d6:added66:abcdefe",
        "d6:added619:abcdefghijklmnopqrse",
        "d7:dropped1:xe",
        "d8:dropped617:abcdefghijklmnopqe",
        "d5:addedi1ee",
        "d5:addedle",
        "le",
        "d8:dropped60:5:added0:e", /* unsorted */
    };
    for (size_t i = 0; i < N_ELEMS(bad); i++) {
        memset(&p, 0x5a, sizeof(p));
        assert_int_equal(pex_str(bad[i], strlen(bad[i]), &p), -EBADMSG);
        assert_null(p.added);
        assert_int_equal(p.added_n, 0);
    }

    /* 50 entries are the most. */
    memset(entries, 'x', sizeof(entries));
    for (size_t cnt = 50; cnt <= 51; cnt++) {
        int len = snprintf(s, sizeof(s), "d7:dropped%zu:", cnt * 6);
        memcpy(s + len, entries, cnt * 6);
        s[len + (int)cnt * 6] = 'e';
        assert_int_equal(pex_str(s, (size_t)len + cnt * 6 + 1, &p), cnt == 50 ? 0 : -EBADMSG);
        len = snprintf(s, sizeof(s), "d6:added6%zu:", cnt * 18);
        memcpy(s + len, entries, cnt * 18);
        s[len + (int)cnt * 18] = 'e';
        assert_int_equal(pex_str(s, (size_t)len + cnt * 18 + 1, &p), cnt == 50 ? 0 : -EBADMSG);
    }

    /* Encoder arguments. */
    memset(&p, 0, sizeof(p));
    assert_int_equal(dg_peer_pex_encode(&p, out, sizeof(out)), 2);
    assert_memory_equal(out, "de", 2);
    p.added = entries;
    p.added_n = 51;
    assert_int_equal(dg_peer_pex_encode(&p, out, sizeof(out)), -EINVAL);
    p.added_n = 50;
    n = dg_peer_pex_encode(&p, out, sizeof(out));
    assert_int_equal(n, (int)strlen("d5:added300:e") + 300);
    assert_int_equal(dg_peer_pex_encode(&p, out, (size_t)n - 1), -ENOBUFS);
    p.dropped = NULL;
    p.dropped_n = 1;
    assert_int_equal(dg_peer_pex_encode(&p, out, sizeof(out)), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshake),         cmocka_unit_test(test_handshake_wrong),
        cmocka_unit_test(test_exact_bytes),       cmocka_unit_test(test_hello_exact),
        cmocka_unit_test(test_round_trip_simple), cmocka_unit_test(test_round_trip_fields),
        cmocka_unit_test(test_round_trip_data),   cmocka_unit_test(test_round_trip_bencoded),
        cmocka_unit_test(test_unknown_ids),       cmocka_unit_test(test_sizes_fixed),
        cmocka_unit_test(test_sizes_fields),      cmocka_unit_test(test_encoder_args),
        cmocka_unit_test(test_frame_partial),     cmocka_unit_test(test_frame_limit),
        cmocka_unit_test(test_block_size),        cmocka_unit_test(test_check_block),
        cmocka_unit_test(test_check_have),        cmocka_unit_test(test_check_bitfield),
        cmocka_unit_test(test_tree_shape),        cmocka_unit_test(test_check_hash_request),
        cmocka_unit_test(test_hello_rules),       cmocka_unit_test(test_hello_encode_args),
        cmocka_unit_test(test_pex_rules),         cmocka_unit_test(test_holepunch_codec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
