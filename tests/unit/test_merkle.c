/* Unit tests for engine/merkle.c and engine/hash_file.c.
 *
 * Roots are checked three ways: against a plain reference implementation below (builds the
 * whole padded leaf row and reduces it), against SHA-256 for files of at most one block, and
 * against values computed once by libtorrent 2.0.8 (see known_roots[]). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "engine/hash_file.h"
#include "engine/merkle.h"
#include "engine/root_name.h"

#define HASH DG_MERKLE_HASH_SIZE
#define BLOCK DG_MERKLE_BLOCK_SIZE
#define MIB (1024u * 1024u)

/* ---- deterministic content: splitmix64 seeded with the length, 8 bytes little-endian per
 * step, truncated to the length. The generator script below produces the same bytes. */
static uint8_t *make_content(size_t len)
{
    uint8_t *buf = malloc(len ? len : 1);
    uint64_t s = len;

    assert_non_null(buf);
    for (size_t i = 0; i < len; i += 8) {
        uint64_t z;

        s += 0x9E3779B97F4A7C15ull;
        z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        for (size_t k = 0; k < 8 && i + k < len; k++)
            buf[i + k] = (uint8_t)(z >> (8 * k));
    }
    return buf;
}

/* ---- reference implementation: whole rows in memory, no streaming ---- */

static void ref_sha256(const void *data, size_t len, uint8_t out[HASH])
{
    unsigned int n = 0;

    assert_int_equal(EVP_Digest(data, len, out, &n, EVP_sha256(), NULL), 1);
    assert_int_equal(n, HASH);
}

/* Computes the root of @p len bytes and, if @p piece_size is non-zero, the piece layer for
 * that piece size (malloc'd into *layer, *count entries). */
static void ref_tree(const uint8_t *data, size_t len, uint64_t piece_size, uint8_t root[HASH],
                     uint8_t **layer, uint64_t *count)
{
    size_t nblocks = len / BLOCK + (len % BLOCK != 0);
    size_t width = 1;
    size_t bpp = piece_size ? piece_size / BLOCK : 0;
    size_t level_width = 1; /* blocks covered by one node of the current row */
    uint8_t *row;

    if (nblocks == 0)
        nblocks = 1; /* the empty file has one (empty) leaf */
    while (width < nblocks)
        width *= 2;
    row = calloc(width, HASH); /* padding leaves are all zero */
    assert_non_null(row);
    for (size_t i = 0; i < nblocks; i++) {
        size_t off = i * BLOCK;
        size_t n = len - off < BLOCK ? len - off : BLOCK;

        ref_sha256(data + off, n, row + i * HASH);
    }
    if (layer != NULL) {
        *layer = NULL;
        *count = 0;
    }
    for (;;) {
        if (layer != NULL && level_width == bpp && nblocks > bpp) {
            *count = (nblocks + bpp - 1) / bpp;
            *layer = malloc(*count * HASH);
            assert_non_null(*layer);
            memcpy(*layer, row, *count * HASH);
        }
        if (width == 1)
            break;
        for (size_t i = 0; i < width / 2; i++)
            ref_sha256(row + 2 * i * HASH, 2 * HASH, row + i * HASH);
        width /= 2;
        level_width *= 2;
    }
    memcpy(root, row, HASH);
    free(row);
    if (layer != NULL && *layer == NULL) {
        /* One piece: the layer is the root. */
        *count = 1;
        *layer = malloc(HASH);
        assert_non_null(*layer);
        memcpy(*layer, root, HASH);
    }
}

static void parse_hex(const char *hex, uint8_t out[HASH])
{
    assert_int_equal(dg_root_parse(hex, strlen(hex), out), 0);
}

static void assert_hash_equal(const uint8_t *a, const uint8_t *b)
{
    char ha[DG_ROOT_HEX_LEN + 1];
    char hb[DG_ROOT_HEX_LEN + 1];

    dg_root_format(a, ha);
    dg_root_format(b, hb);
    assert_string_equal(ha, hb);
}

/* ---- known-good values from libtorrent 2.0.8 ----
 * Computed once with /usr/bin/python3 and python3-libtorrent: write make_content(n) to a file
 * (splitmix64 as above, reimplemented in Python), then
 *   fs = lt.file_storage(); lt.add_files(fs, path)
 *   ct = lt.create_torrent(fs, piece, lt.create_torrent.v2_only)
 *   lt.set_piece_hashes(ct, dir); t = ct.generate()
 *   root  = t[b'info'][b'file tree'][name][b''][b'pieces root']
 *   layer = t[b'piece layers'][root]   (only for files of more than one piece)
 * and print root.hex() and hashlib.sha256(layer).hexdigest(). libtorrent refuses an empty
 * file, so size 0 uses SHA-256 of the empty string (BEP 52 and merkle.h). */
struct known {
    size_t len;
    uint64_t piece_size; /* piece size given to libtorrent */
    const char *root;
    const char *layer_sha; /* SHA-256 of the concatenated piece layer; NULL for one piece */
    uint64_t layer_count;
};

static const struct known known_roots[] = {
    {0, 16384, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", NULL, 1},
    {1, 16384, "d1bbd73bb09190bfb883056771e22e997541ed20079793bf33975fe1654581c3", NULL, 1},
    {16383, 16384, "6556ec3d4c07d46d0363558b2f288cea1695526334346ba69af755789515758c", NULL, 1},
    {16384, 16384, "3c8ebaec404827a66cdb03688b528c1b086f4e051e15c90c60a26ad08d08f14b", NULL, 1},
    {16385, 16384, "c3c0609617587ef60a5bc387433aeb982aca420cabef60a5cd15f3400f31d515",
     "c3c0609617587ef60a5bc387433aeb982aca420cabef60a5cd15f3400f31d515", 2},
    {32768, 16384, "1a252a3502559b6e15ccefd7889cc66a59bc6272735b0eb5f800ea5ff579b90a",
     "1a252a3502559b6e15ccefd7889cc66a59bc6272735b0eb5f800ea5ff579b90a", 2},
    {49153, 16384, "d6dc64213fcbdbd11614c08ede199052375ea803a2b17d382acbb5f044cfc74f",
     "60a9f2750b779a6e6ed8d5f32f491b378ec6efbbf621477fc5deee3c7fb737bf", 4},
    {5 * MIB + 123, 65536, "e73ea30fe1f888bac9629e4f4fc871e8142533ba47def81c37d121810a82a02f",
     "c489425c66bac0354b94c67c8b297244242396fa52ac086f0df348e101a71126", 81},
    {16 * MIB + 1, 32768, "d6a921754cc08d671930fe1df4db3112e8caf9e4b89995c0dc2ee2c36e176b09",
     "acb769038a4058549648fc77bcdca3ebd7ebca53c7f71f1a026444030c6a4035", 513},
};

#define NKNOWN (sizeof(known_roots) / sizeof(known_roots[0]))

/* Hashes @p len bytes in chunks of @p chunk bytes with a layer of @p piece_size; returns the
 * layer (malloc'd copy) in *layer when asked. */
static void stream_hash(const uint8_t *data, size_t len, size_t chunk, uint64_t piece_size,
                        uint8_t root[HASH], uint8_t **layer, uint64_t *count)
{
    struct dg_merkle_hasher *h;
    uint64_t got_len = 0;

    assert_int_equal(dg_merkle_hasher_new(piece_size, &h), 0);
    for (size_t off = 0; off < len; off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;

        assert_int_equal(dg_merkle_hasher_update(h, data + off, n), 0);
    }
    assert_int_equal(dg_merkle_hasher_final(h, root, &got_len), 0);
    assert_true(got_len == len);
    if (layer != NULL) {
        const uint8_t *l = dg_merkle_hasher_layer(h, count);

        assert_non_null(l);
        *layer = malloc(*count * HASH);
        assert_non_null(*layer);
        memcpy(*layer, l, *count * HASH);
    }
    dg_merkle_hasher_free(h);
}

/* ---- tests ---- */

static void test_known_roots(void **state)
{
    (void)state;
    for (size_t i = 0; i < NKNOWN; i++) {
        const struct known *k = &known_roots[i];
        uint8_t *data = make_content(k->len);
        uint8_t want[HASH], got[HASH], ref[HASH];

        parse_hex(k->root, want);
        assert_int_equal(dg_merkle_root_of_buffer(data, k->len, got), 0);
        assert_hash_equal(got, want);
        ref_tree(data, k->len, 0, ref, NULL, NULL);
        assert_hash_equal(ref, want);
        free(data);
    }
}

/* The piece layers libtorrent made for the piece sizes it was given. */
static void test_known_layers(void **state)
{
    (void)state;
    for (size_t i = 0; i < NKNOWN; i++) {
        const struct known *k = &known_roots[i];
        uint8_t *data = make_content(k->len);
        uint8_t root[HASH], want[HASH], got[HASH];
        uint8_t *layer;
        uint64_t count;

        stream_hash(data, k->len, 65536, k->piece_size, root, &layer, &count);
        assert_true(count == k->layer_count);
        if (k->layer_sha != NULL) {
            parse_hex(k->layer_sha, want);
            assert_int_equal(dg_merkle_sha256(layer, count * HASH, got), 0);
            assert_hash_equal(got, want);
        } else {
            assert_hash_equal(layer, root);
        }
        free(layer);
        free(data);
    }
}

/* Many sizes around block and piece boundaries against the reference implementation. */
static void test_reference_sizes(void **state)
{
    static const size_t sizes[] = {0,
                                   1,
                                   2,
                                   100,
                                   16383,
                                   16384,
                                   16385,
                                   32767,
                                   32768,
                                   32769,
                                   49152,
                                   49153,
                                   65536,
                                   65537,
                                   81920,
                                   5 * 16384 + 3,
                                   7 * 16384,
                                   8 * 16384,
                                   9 * 16384,
                                   1 * MIB,
                                   MIB + 16384 * 3 + 1,
                                   5 * MIB + 123};

    (void)state;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint8_t *data = make_content(sizes[i]);
        uint8_t got[HASH], ref[HASH];

        assert_int_equal(dg_merkle_root_of_buffer(data, sizes[i], got), 0);
        ref_tree(data, sizes[i], 0, ref, NULL, NULL);
        assert_hash_equal(got, ref);
        free(data);
    }
}

static void test_small_is_sha256(void **state)
{
    static const size_t sizes[] = {0, 1, 55, 64, 1000, 16383, 16384};

    (void)state;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint8_t *data = make_content(sizes[i]);
        uint8_t got[HASH], sha[HASH];

        assert_int_equal(dg_merkle_root_of_buffer(data, sizes[i], got), 0);
        assert_int_equal(dg_merkle_sha256(data, sizes[i], sha), 0);
        assert_hash_equal(got, sha);
        free(data);
    }
}

static void test_empty(void **state)
{
    struct dg_merkle_hasher *h;
    uint8_t root[HASH], want[HASH];
    const uint8_t *layer;
    uint64_t count = 99, len = 99;

    (void)state;
    parse_hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", want);
    assert_int_equal(dg_merkle_hasher_new(BLOCK, &h), 0);
    assert_int_equal(dg_merkle_hasher_update(h, "", 0), 0);
    assert_int_equal(dg_merkle_hasher_final(h, root, &len), 0);
    assert_true(len == 0);
    assert_hash_equal(root, want);
    layer = dg_merkle_hasher_layer(h, &count);
    assert_true(count == 1);
    assert_hash_equal(layer, root);
    assert_int_equal(dg_merkle_verify_layer(root, 0, layer, count), 0);
    dg_merkle_hasher_free(h);
}

/* Odd chunk sizes give the same root as one call. */
static void test_streaming_chunks(void **state)
{
    static const struct {
        size_t len;
        size_t chunk;
    } cases[] = {
        {200000, 1},
        {49153, 1},
        {16384, 1},
        {5 * MIB + 123, 7},
        {5 * MIB + 123, 16385},
        {5 * MIB + 123, 16383},
        {5 * MIB + 123, 1 * MIB},
        {3 * 16384, 16384},
        {100, 7},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t *data = make_content(cases[i].len);
        uint8_t whole[HASH], streamed[HASH];

        assert_int_equal(dg_merkle_root_of_buffer(data, cases[i].len, whole), 0);
        stream_hash(data, cases[i].len, cases[i].chunk, 0, streamed, NULL, NULL);
        assert_hash_equal(whole, streamed);
        free(data);
    }
}

/* Irregular chunk sizes, including zero-length updates. */
static void test_streaming_irregular(void **state)
{
    size_t len = 3 * MIB + 4097;
    uint8_t *data = make_content(len);
    struct dg_merkle_hasher *h;
    uint8_t whole[HASH], streamed[HASH];
    uint64_t x = 12345;
    size_t off = 0;

    (void)state;
    assert_int_equal(dg_merkle_root_of_buffer(data, len, whole), 0);
    assert_int_equal(dg_merkle_hasher_new(0, &h), 0);
    while (off < len) {
        size_t n;

        x = x * 6364136223846793005ull + 1442695040888963407ull;
        n = (size_t)(x >> 33) % 70000;
        if (n > len - off)
            n = len - off;
        assert_int_equal(dg_merkle_hasher_update(h, data + off, n), 0);
        off += n;
    }
    assert_int_equal(dg_merkle_hasher_final(h, streamed, NULL), 0);
    assert_hash_equal(whole, streamed);
    dg_merkle_hasher_free(h);
    free(data);
}

/* Piece layers for the piece size the file gets, against the reference; verify_layer accepts
 * them and rejects any change. */
static void test_piece_layer(void **state)
{
    static const size_t sizes[] = {0,
                                   1,
                                   16384,
                                   16385,
                                   49153,
                                   MIB,
                                   5 * MIB + 123,
                                   16 * MIB,
                                   16 * MIB + 1,
                                   16 * MIB + 3 * 16384 + 17};

    (void)state;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t len = sizes[i];
        uint64_t piece = dg_merkle_piece_size(len);
        uint8_t *data = make_content(len);
        uint8_t root[HASH], ref_root[HASH], bad_root[HASH];
        uint8_t *layer, *ref_layer;
        uint64_t count, ref_count;

        stream_hash(data, len, 1 * MIB + 5, piece, root, &layer, &count);
        ref_tree(data, len, piece, ref_root, &ref_layer, &ref_count);
        assert_hash_equal(root, ref_root);
        assert_true(count == dg_merkle_piece_count(len));
        assert_true(count == ref_count);
        assert_memory_equal(layer, ref_layer, count * HASH);

        assert_int_equal(dg_merkle_verify_layer(root, len, layer, count), 0);
        /* a flipped bit in the first, the last entry */
        layer[3] ^= 1;
        assert_int_equal(dg_merkle_verify_layer(root, len, layer, count), -EBADMSG);
        layer[3] ^= 1;
        layer[(count - 1) * HASH + 31] ^= 0x80;
        assert_int_equal(dg_merkle_verify_layer(root, len, layer, count), -EBADMSG);
        layer[(count - 1) * HASH + 31] ^= 0x80;
        /* a different root */
        memcpy(bad_root, root, HASH);
        bad_root[0] ^= 1;
        assert_int_equal(dg_merkle_verify_layer(bad_root, len, layer, count), -EBADMSG);
        /* a wrong count */
        assert_int_equal(dg_merkle_verify_layer(root, len, layer, count + 1), -EINVAL);
        if (count > 1)
            assert_int_equal(dg_merkle_verify_layer(root, len, layer, count - 1), -EINVAL);
        assert_int_equal(dg_merkle_verify_layer(root, len, NULL, count), -EINVAL);

        free(layer);
        free(ref_layer);
        free(data);
    }
}

/* Leaf hashes of a piece reduce to that piece's layer entry, including the padded last one. */
static void test_subtree_leaves_to_piece(void **state)
{
    size_t len = 5 * MIB + 123; /* 321 blocks: 80 pieces of 4 blocks and one of 1 block */
    uint64_t piece = 65536, bpp = piece / BLOCK;
    uint8_t *data = make_content(len);
    uint64_t nblocks = dg_merkle_block_count(len);
    uint8_t *leaves = malloc(nblocks * HASH);
    uint8_t root[HASH], got[HASH];
    uint8_t *layer;
    uint64_t count;

    (void)state;
    assert_non_null(leaves);
    for (uint64_t b = 0; b < nblocks; b++) {
        size_t off = b * BLOCK;
        size_t n = len - off < BLOCK ? len - off : BLOCK;

        assert_int_equal(dg_merkle_sha256(data + off, n, leaves + b * HASH), 0);
    }
    stream_hash(data, len, MIB, piece, root, &layer, &count);
    assert_true(count == 81);
    for (uint64_t p = 0; p < count; p++) {
        uint64_t first = p * bpp;
        uint64_t n = nblocks - first < bpp ? nblocks - first : bpp;

        assert_int_equal(dg_merkle_subtree_root(leaves + first * HASH, n, 0, bpp, got), 0);
        assert_hash_equal(got, layer + p * HASH);
    }
    /* the layer of 64 KiB pieces (level 2) padded to 128 entries gives the root */
    assert_int_equal(dg_merkle_subtree_root(layer, count, 2, 128, got), 0);
    assert_hash_equal(got, root);
    /* and the leaves padded to 512 */
    assert_int_equal(dg_merkle_subtree_root(leaves, nblocks, 0, 512, got), 0);
    assert_hash_equal(got, root);
    free(layer);
    free(leaves);
    free(data);
}

static void test_subtree_root_cases(void **state)
{
    uint8_t h[2 * HASH], zero[2 * HASH], want[HASH], got[HASH], pair[2 * HASH];

    (void)state;
    memset(h, 0x5a, sizeof(h));
    memset(zero, 0, sizeof(zero));
    /* errors */
    assert_int_equal(dg_merkle_subtree_root(h, 0, 0, 1, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 2, 0, 1, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 0, 0, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 0, 3, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 2, 0, 6, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 1, DG_MERKLE_MAX_LEVELS + 1, 1, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 1, DG_MERKLE_MAX_LEVELS, 2, got), -EINVAL);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 0, (uint64_t)1 << 63, got), -EINVAL);
    /* one entry of width 1 is itself */
    assert_int_equal(dg_merkle_subtree_root(h, 1, 7, 1, got), 0);
    assert_hash_equal(got, h);
    /* width 2 at level 0: padded with 32 zero bytes */
    memcpy(pair, h, HASH);
    memcpy(pair + HASH, zero, HASH);
    assert_int_equal(dg_merkle_sha256(pair, 2 * HASH, want), 0);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 0, 2, got), 0);
    assert_hash_equal(got, want);
    /* width 2 at level 1: padded with SHA-256(zero || zero) */
    assert_int_equal(dg_merkle_sha256(zero, 2 * HASH, pair + HASH), 0);
    assert_int_equal(dg_merkle_sha256(pair, 2 * HASH, want), 0);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 1, 2, got), 0);
    assert_hash_equal(got, want);
    /* two full entries */
    assert_int_equal(dg_merkle_sha256(h, 2 * HASH, want), 0);
    assert_int_equal(dg_merkle_subtree_root(h, 2, 3, 2, got), 0);
    assert_hash_equal(got, want);
    /* the deepest allowed */
    assert_int_equal(dg_merkle_subtree_root(h, 1, DG_MERKLE_MAX_LEVELS - 1, 2, got), 0);
    assert_int_equal(dg_merkle_subtree_root(h, 1, 0, (uint64_t)1 << DG_MERKLE_MAX_LEVELS, got), 0);
}

static void test_sizes_and_counts(void **state)
{
    (void)state;
    assert_true(dg_merkle_block_count(0) == 0);
    assert_true(dg_merkle_block_count(1) == 1);
    assert_true(dg_merkle_block_count(16384) == 1);
    assert_true(dg_merkle_block_count(16385) == 2);
    assert_true(dg_merkle_block_count(UINT64_MAX) == (uint64_t)1 << 50);

    assert_true(dg_merkle_piece_size(0) == 16384);
    assert_true(dg_merkle_piece_size(1) == 16384);
    assert_true(dg_merkle_piece_size(16 * MIB - 1) == 16384);
    assert_true(dg_merkle_piece_size(16 * MIB) == 16384); /* 1024 blocks */
    assert_true(dg_merkle_piece_size(16 * MIB + 1) == 32768);
    assert_true(dg_merkle_piece_size(32 * MIB) == 32768);
    assert_true(dg_merkle_piece_size(32 * MIB + 1) == 65536);
    assert_true(dg_merkle_piece_size((uint64_t)1 << 40) == (uint64_t)1 << 30);
    assert_true(dg_merkle_piece_size(((uint64_t)1 << 40) + 1) == (uint64_t)1 << 31);
    assert_true(dg_merkle_piece_size(UINT64_MAX) == (uint64_t)1 << 54);

    assert_true(dg_merkle_piece_count(0) == 1);
    assert_true(dg_merkle_piece_count(1) == 1);
    assert_true(dg_merkle_piece_count(16384) == 1);
    assert_true(dg_merkle_piece_count(16385) == 2);
    assert_true(dg_merkle_piece_count(16 * MIB) == 1024);
    assert_true(dg_merkle_piece_count(16 * MIB + 1) == 513);
    assert_true(dg_merkle_piece_count(32 * MIB) == 1024);
    assert_true(dg_merkle_piece_count(UINT64_MAX) == 1024);
}

static void test_hasher_misuse(void **state)
{
    static const uint64_t bad[] = {1, 8192, 16383, 16385, 3 * 16384, ((uint64_t)1 << 63) + 1};
    struct dg_merkle_hasher *h = (struct dg_merkle_hasher *)&h;
    uint8_t root[HASH];
    uint64_t count = 7;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(dg_merkle_hasher_new(bad[i], &h), -EINVAL);
        assert_null(h);
    }
    dg_merkle_hasher_free(NULL);

    assert_int_equal(dg_merkle_hasher_new(0, &h), 0);
    assert_int_equal(dg_merkle_hasher_update(h, "abc", 3), 0);
    assert_null(dg_merkle_hasher_layer(h, &count)); /* not finished */
    assert_true(count == 0);
    assert_int_equal(dg_merkle_hasher_final(h, root, NULL), 0);
    assert_null(dg_merkle_hasher_layer(h, &count)); /* no layer asked for */
    assert_int_equal(dg_merkle_hasher_update(h, "abc", 3), -EINVAL);
    assert_int_equal(dg_merkle_hasher_final(h, root, NULL), -EINVAL);
    dg_merkle_hasher_free(h);
}

/* ---- dg_hash_fd ---- */

static int write_temp(const uint8_t *data, size_t len, char path[64])
{
    const char *dir = getenv("TMPDIR");
    int fd;

    snprintf(path, 64, "%.40s/dgmerkleXXXXXX", dir && *dir && strlen(dir) < 40 ? dir : "/tmp");
    fd = mkstemp(path);
    assert_true(fd >= 0);
    for (size_t off = 0; off < len;) {
        ssize_t n = write(fd, data + off, len - off);

        assert_true(n > 0);
        off += (size_t)n;
    }
    return fd;
}

static void test_hash_fd_file(void **state)
{
    static const size_t sizes[] = {0, 16384, 5 * MIB + 123, 16 * MIB + 1};

    (void)state;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t len = sizes[i];
        uint8_t *data = make_content(len);
        uint8_t ref_root[HASH];
        uint8_t *ref_layer;
        uint64_t ref_count;
        struct dg_file_hash fh;
        char path[64];
        int fd = write_temp(data, len, path);

        assert_true(lseek(fd, 100, SEEK_SET) == 100);
        assert_int_equal(dg_hash_fd(fd, &fh), 0);
        assert_true(lseek(fd, 0, SEEK_CUR) == 100); /* offset untouched */
        ref_tree(data, len, dg_merkle_piece_size(len), ref_root, &ref_layer, &ref_count);
        assert_hash_equal(fh.root, ref_root);
        assert_true(fh.length == len);
        assert_true(fh.piece_size == dg_merkle_piece_size(len));
        assert_true(fh.layer_count == dg_merkle_piece_count(len));
        assert_true(fh.layer_count == ref_count);
        assert_non_null(fh.layer);
        assert_memory_equal(fh.layer, ref_layer, ref_count * HASH);
        assert_true(fh.st.st_size == (off_t)len);
        assert_true(S_ISREG(fh.st.st_mode));
        assert_int_equal(dg_merkle_verify_layer(fh.root, fh.length, fh.layer, fh.layer_count), 0);
        dg_file_hash_clear(&fh);
        assert_null(fh.layer);
        close(fd);
        unlink(path);
        free(ref_layer);
        free(data);
    }
}

static void test_hash_fd_pipe(void **state)
{
    size_t len = 3 * MIB + 777; /* more than a pipe buffer: needs a writer */
    uint8_t *data = make_content(len);
    uint8_t ref_root[HASH];
    struct dg_file_hash fh;
    int p[2];
    int status;
    pid_t pid;

    (void)state;
    assert_int_equal(pipe(p), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        for (size_t off = 0; off < len;) {
            size_t want = len - off < 12345 ? len - off : 12345;
            ssize_t n = write(p[1], data + off, want);

            if (n <= 0)
                _exit(1);
            off += (size_t)n;
        }
        _exit(0);
    }
    close(p[1]);
    assert_int_equal(dg_hash_fd(p[0], &fh), 0);
    close(p[0]);
    assert_true(waitpid(pid, &status, 0) == pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ref_tree(data, len, 0, ref_root, NULL, NULL);
    assert_hash_equal(fh.root, ref_root);
    assert_true(fh.length == len);
    assert_true(fh.piece_size == 0);
    assert_null(fh.layer);
    assert_true(fh.layer_count == 0);
    dg_file_hash_clear(&fh);
    free(data);
}

static void test_hash_fd_errors(void **state)
{
    struct dg_file_hash fh;
    int fd;

    (void)state;
    fd = open("/", O_RDONLY | O_DIRECTORY);
    assert_true(fd >= 0);
    assert_int_equal(dg_hash_fd(fd, &fh), -EISDIR);
    assert_null(fh.layer);
    close(fd);
    assert_int_equal(dg_hash_fd(-1, &fh), -EBADF);
    /* /proc files are regular with st_size 0 but have content: the size check catches it
     * the same way as a file that grows while it is read. */
    fd = open("/proc/self/status", O_RDONLY);
    if (fd >= 0) {
        assert_int_equal(dg_hash_fd(fd, &fh), -EAGAIN);
        assert_null(fh.layer);
        close(fd);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_roots),
        cmocka_unit_test(test_known_layers),
        cmocka_unit_test(test_reference_sizes),
        cmocka_unit_test(test_small_is_sha256),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_streaming_chunks),
        cmocka_unit_test(test_streaming_irregular),
        cmocka_unit_test(test_piece_layer),
        cmocka_unit_test(test_subtree_leaves_to_piece),
        cmocka_unit_test(test_subtree_root_cases),
        cmocka_unit_test(test_sizes_and_counts),
        cmocka_unit_test(test_hasher_misuse),
        cmocka_unit_test(test_hash_fd_file),
        cmocka_unit_test(test_hash_fd_pipe),
        cmocka_unit_test(test_hash_fd_errors),
    };

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests_name("merkle", tests, NULL, NULL);
}
