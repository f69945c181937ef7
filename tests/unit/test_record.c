/* Unit tests for engine/record.c: the `roots` and `files` values of the piece cache index.
 * Decoders get untrusted bytes: every field is checked and nothing past the buffer is read. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/merkle.h"
#include "engine/piece_cache.h"
#include "engine/record.h"

/* ---- roots ---- */

static struct dg_root_record make_root_record(uint64_t length, uint64_t blocks_cached)
{
    struct dg_root_record r;

    memset(&r, 0, sizeof(r));
    r.flags = DG_ROOT_PINNED;
    r.length = length;
    r.piece_size = dg_merkle_piece_size(length);
    r.blocks_cached = blocks_cached;
    r.last_access = 1700000000;
    return r;
}

static void assert_root_records_equal(const struct dg_root_record *a,
                                      const struct dg_root_record *b)
{
    assert_int_equal(a->flags, b->flags);
    assert_int_equal(a->length, b->length);
    assert_int_equal(a->piece_size, b->piece_size);
    assert_int_equal(a->blocks_cached, b->blocks_cached);
    assert_int_equal(a->last_access, b->last_access);
}

static void test_root_round_trip(void **state)
{
    static const uint64_t lengths[] = {
        0,
        1,
        16383,
        16384,
        16385,
        16ull << 20,
        (16ull << 20) + 1,
        1ull << 40,
        12345678901ull,
        1ull << 62,
    };
    uint8_t buf[DG_ROOT_RECORD_SIZE];

    (void)state;
    for (size_t i = 0; i < sizeof(lengths) / sizeof(lengths[0]); i++) {
        uint64_t blocks = dg_merkle_block_count(lengths[i]);
        uint64_t counts[] = {0, blocks / 2, blocks};
        for (size_t j = 0; j < 3; j++) {
            struct dg_root_record in = make_root_record(lengths[i], counts[j]), out;
            memset(&out, 0x5a, sizeof(out));
            dg_root_record_encode(&in, buf);
            assert_int_equal(dg_root_record_decode(buf, sizeof(buf), &out), 0);
            assert_root_records_equal(&in, &out);
        }
    }
    /* Negative access times and arbitrary flags survive. */
    struct dg_root_record in = make_root_record(100, 1), out;
    in.last_access = -5;
    in.flags = 0xdeadbeef;
    dg_root_record_encode(&in, buf);
    assert_int_equal(dg_root_record_decode(buf, sizeof(buf), &out), 0);
    assert_root_records_equal(&in, &out);
}

static void expect_root_decode_fails(const uint8_t *buf, size_t len)
{
    struct dg_root_record out, before;

    memset(&out, 0x77, sizeof(out));
    memcpy(&before, &out, sizeof(out));
    assert_int_equal(dg_root_record_decode(buf, len, &out), -EBADMSG);
    assert_memory_equal(&out, &before, sizeof(out)); /* untouched on failure */
}

static void test_root_decode_rejects(void **state)
{
    uint8_t buf[DG_ROOT_RECORD_SIZE + 8], bad[DG_ROOT_RECORD_SIZE];
    struct dg_root_record rec = make_root_record((16ull << 20) + 1, 3), tmp;

    (void)state;
    memset(buf, 0, sizeof(buf));
    dg_root_record_encode(&rec, buf);
    assert_int_equal(dg_root_record_decode(buf, DG_ROOT_RECORD_SIZE, &tmp), 0);

    /* Wrong sizes. */
    expect_root_decode_fails(buf, 0);
    expect_root_decode_fails(buf, 1);
    expect_root_decode_fails(buf, DG_ROOT_RECORD_SIZE - 1);
    expect_root_decode_fails(buf, DG_ROOT_RECORD_SIZE + 1);
    expect_root_decode_fails(buf, sizeof(buf));

    /* Wrong version. */
    static const uint8_t versions[] = {0, 2, 0xff};
    for (size_t i = 0; i < sizeof(versions); i++) {
        memcpy(bad, buf, sizeof(bad));
        bad[0] = versions[i];
        expect_root_decode_fails(bad, sizeof(bad));
    }

    /* Piece size not the one of the length: double, half, zero, odd. */
    uint64_t sizes[] = {2 * rec.piece_size, rec.piece_size / 2, 0, rec.piece_size + 1};
    for (size_t i = 0; i < 4; i++) {
        struct dg_root_record r = rec;
        r.piece_size = sizes[i];
        dg_root_record_encode(&r, bad);
        expect_root_decode_fails(bad, sizeof(bad));
    }

    /* More blocks cached than the content has. */
    struct dg_root_record r = rec;
    r.blocks_cached = dg_merkle_block_count(r.length) + 1;
    dg_root_record_encode(&r, bad);
    expect_root_decode_fails(bad, sizeof(bad));
    r = make_root_record(0, 1); /* the empty file has no block */
    dg_root_record_encode(&r, bad);
    expect_root_decode_fails(bad, sizeof(bad));
    r = make_root_record(1, UINT64_MAX);
    dg_root_record_encode(&r, bad);
    expect_root_decode_fails(bad, sizeof(bad));
}

/* ---- files ---- */

static struct dg_shared_file *make_file(const char *path)
{
    struct dg_shared_file *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->ino = 42;
    f->dev = 0x0102030405060708ull;
    f->size = 123456789;
    f->mtime_ns = 1700000000123456789ll;
    f->ctime_ns = -1;
    f->state = DG_SHARED_HASHED;
    f->error = 0;
    for (int i = 0; i < 32; i++)
        f->root[i] = (uint8_t)(0xc0 + i);
    strcpy(f->path, path);
    return f;
}

static void assert_files_equal(const struct dg_shared_file *a, const struct dg_shared_file *b)
{
    assert_int_equal(a->dev, b->dev);
    assert_int_equal(a->size, b->size);
    assert_int_equal(a->mtime_ns, b->mtime_ns);
    assert_int_equal(a->ctime_ns, b->ctime_ns);
    assert_int_equal(a->state, b->state);
    assert_int_equal(a->error, b->error);
    assert_memory_equal(a->root, b->root, 32);
    assert_string_equal(a->path, b->path);
}

static void test_file_round_trip(void **state)
{
    static const char *const paths[] = {"a", "file.txt", "dir/sub/x y.bin", ".hidden/...",
                                        "caf\xc3\xa9"};
    uint8_t *buf = malloc(DG_FILE_RECORD_MAX);
    struct dg_shared_file *out = calloc(1, sizeof(*out));

    (void)state;
    assert_non_null(buf);
    assert_non_null(out);
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        for (uint32_t st = DG_SHARED_HASHING; st <= DG_SHARED_FAILED; st++) {
            struct dg_shared_file *in = make_file(paths[i]);
            in->state = st;
            in->error = st == DG_SHARED_FAILED ? EACCES : 0;
            size_t n = dg_file_record_encode(in, buf, DG_FILE_RECORD_MAX);
            assert_int_equal(n, DG_FILE_RECORD_HEADER + strlen(paths[i]));
            out->ino = 777;
            assert_int_equal(dg_file_record_decode(buf, n, out), 0);
            assert_files_equal(in, out);
            assert_int_equal(out->ino, 777); /* the key is the caller's */
            /* Exactly the size needed is enough. */
            assert_int_equal(dg_file_record_encode(in, buf, n), n);
            free(in);
        }
    }

    /* The longest path: 4095 bytes (components of 100 bytes). */
    struct dg_shared_file *in = make_file("x");
    memset(in->path, 'q', 4095);
    for (size_t i = 100; i < 4095; i += 101)
        in->path[i] = '/';
    in->path[4095] = '\0';
    in->error = -3;
    size_t n = dg_file_record_encode(in, buf, DG_FILE_RECORD_MAX);
    assert_int_equal(n, DG_FILE_RECORD_MAX);
    assert_int_equal(dg_file_record_decode(buf, n, out), 0);
    assert_files_equal(in, out);
    free(in);
    free(out);
    free(buf);
}

static void test_file_encode_refuses(void **state)
{
    uint8_t *buf = malloc(DG_FILE_RECORD_MAX + 16);
    struct dg_shared_file *f = make_file("abc");

    (void)state;
    assert_non_null(buf);
    /* Too small a buffer. */
    assert_int_equal(dg_file_record_encode(f, buf, 0), 0);
    assert_int_equal(dg_file_record_encode(f, buf, DG_FILE_RECORD_HEADER), 0);
    assert_int_equal(dg_file_record_encode(f, buf, DG_FILE_RECORD_HEADER + 2), 0);
    /* Empty path. */
    f->path[0] = '\0';
    assert_int_equal(dg_file_record_encode(f, buf, DG_FILE_RECORD_MAX), 0);
    /* A path of 4096 bytes with no room for its NUL. */
    memset(f->path, 'a', sizeof(f->path));
    assert_int_equal(dg_file_record_encode(f, buf, DG_FILE_RECORD_MAX + 16), 0);
    free(f);
    free(buf);
}

static void expect_file_decode_fails(const uint8_t *buf, size_t len)
{
    struct dg_shared_file *out = malloc(sizeof(*out));

    assert_non_null(out);
    memset(out, 0x33, sizeof(*out));
    assert_int_equal(dg_file_record_decode(buf, len, out), -EBADMSG);
    free(out);
}

/* Encodes a record with @p path written raw (any bytes, @p len of them). */
static size_t encode_raw_path(uint8_t *buf, const char *path, size_t len)
{
    struct dg_shared_file *f = make_file("x");
    size_t n = dg_file_record_encode(f, buf, DG_FILE_RECORD_MAX);

    assert_int_equal(n, DG_FILE_RECORD_HEADER + 1);
    buf[2] = (uint8_t)len;
    buf[3] = (uint8_t)(len >> 8);
    memcpy(buf + DG_FILE_RECORD_HEADER, path, len);
    free(f);
    return DG_FILE_RECORD_HEADER + len;
}

static void test_file_decode_rejects(void **state)
{
    uint8_t *buf = malloc(DG_FILE_RECORD_MAX + 64), *bad = malloc(DG_FILE_RECORD_MAX + 64);
    struct dg_shared_file *f = make_file("dir/file");
    struct dg_shared_file *out = malloc(sizeof(*out));
    size_t n;

    (void)state;
    assert_non_null(buf);
    assert_non_null(bad);
    assert_non_null(out);
    n = dg_file_record_encode(f, buf, DG_FILE_RECORD_MAX);
    assert_int_equal(dg_file_record_decode(buf, n, out), 0);

    /* Sizes: nothing, a bare header, one byte short of the header. */
    expect_file_decode_fails(buf, 0);
    expect_file_decode_fails(buf, 1);
    expect_file_decode_fails(buf, DG_FILE_RECORD_HEADER - 1);

    /* Version. */
    memcpy(bad, buf, n);
    bad[0] = 0;
    expect_file_decode_fails(bad, n);
    bad[0] = 2;
    expect_file_decode_fails(bad, n);

    /* State outside HASHING..FAILED. */
    static const uint8_t states[] = {0, DG_SHARED_FAILED + 1, 0xff};
    for (size_t i = 0; i < sizeof(states); i++) {
        memcpy(bad, buf, n);
        bad[1] = states[i];
        expect_file_decode_fails(bad, n);
    }

    /* Path length field inconsistent with the buffer: one more, one less, zero, huge. */
    memcpy(bad, buf, n);
    bad[2] = (uint8_t)(strlen(f->path) + 1);
    expect_file_decode_fails(bad, n);
    bad[2] = (uint8_t)(strlen(f->path) - 1);
    expect_file_decode_fails(bad, n);
    bad[2] = 0;
    expect_file_decode_fails(bad, n);
    bad[2] = 0xff;
    bad[3] = 0xff;
    expect_file_decode_fails(bad, n);
    /* The field matches, but the buffer has trailing bytes, or is cut short. */
    memcpy(bad, buf, n);
    bad[n] = 'z';
    expect_file_decode_fails(bad, n + 1);
    expect_file_decode_fails(bad, n - 1);
    /* A bare header with a zero path length: an empty path. */
    memcpy(bad, buf, DG_FILE_RECORD_HEADER);
    bad[2] = bad[3] = 0;
    expect_file_decode_fails(bad, DG_FILE_RECORD_HEADER);

    /* Paths dg_relpath_check() rejects. */
    static const struct {
        const char *p;
        size_t len;
    } paths[] = {
        {"/abs", 4},   {"trail/", 6}, {"a//b", 4}, {"..", 2}, {".", 1},
        {"a/../b", 6}, {"a\0b", 3},   {"x/.", 3},  {"/", 1},
    };
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        size_t len = encode_raw_path(bad, paths[i].p, paths[i].len);
        expect_file_decode_fails(bad, len);
    }
    /* A path of 4096 bytes (one over) whose length field matches. */
    char *longp = malloc(4096);
    assert_non_null(longp);
    memset(longp, 'q', 4096);
    for (size_t i = 100; i < 4096; i += 101)
        longp[i] = '/';
    size_t len = encode_raw_path(bad, longp, 4095);
    assert_int_equal(dg_file_record_decode(bad, len, out), 0);
    len = encode_raw_path(bad, longp, 4096);
    expect_file_decode_fails(bad, len);
    /* A 256-byte component. */
    memset(longp, 'c', 256);
    len = encode_raw_path(bad, longp, 255);
    assert_int_equal(dg_file_record_decode(bad, len, out), 0);
    len = encode_raw_path(bad, longp, 256);
    expect_file_decode_fails(bad, len);

    free(longp);
    free(out);
    free(f);
    free(bad);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_root_round_trip),     cmocka_unit_test(test_root_decode_rejects),
        cmocka_unit_test(test_file_round_trip),     cmocka_unit_test(test_file_encode_refuses),
        cmocka_unit_test(test_file_decode_rejects),
    };

    return cmocka_run_group_tests_name("record", tests, NULL, NULL);
}
