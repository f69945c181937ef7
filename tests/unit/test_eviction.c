/* Cache size enforcement: dg_piece_cache_evict() removes the least recently used roots held
 * only by block storage, skips roots in use, and leaves everything else readable. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/unit/tmpdir.h"

#include "engine/merkle.h"
#include "engine/piece_cache.h"
#include "engine/root_name.h"

#define BLOCK DG_MERKLE_BLOCK_SIZE
#define NROOTS 3
#define BLOCKS_EACH 4 /* 64 KiB per root */

struct content {
    uint8_t root[32];
    uint8_t *data;
    size_t len;
    uint8_t *layer;
    uint64_t layer_count;
};

struct fixture {
    char dir[64];
    char index[128], blocks[128];
    struct dg_piece_cache *cache;
    int64_t now;
    struct content c[NROOTS];
};

static int64_t fake_clock(void *arg)
{
    return ((struct fixture *)arg)->now;
}

static void make_content(struct content *ct, size_t len, unsigned seed)
{
    struct dg_merkle_hasher *h;
    const uint8_t *layer;

    ct->len = len;
    ct->data = malloc(len);
    assert_non_null(ct->data);
    for (size_t i = 0; i < len; i++)
        ct->data[i] = (uint8_t)(seed * 131 + i * 7 + (i >> 9));
    assert_int_equal(dg_merkle_hasher_new(dg_merkle_piece_size(len), &h), 0);
    assert_int_equal(dg_merkle_hasher_update(h, ct->data, len), 0);
    assert_int_equal(dg_merkle_hasher_final(h, ct->root, NULL), 0);
    layer = dg_merkle_hasher_layer(h, &ct->layer_count);
    ct->layer = malloc(ct->layer_count * 32);
    assert_non_null(ct->layer);
    memcpy(ct->layer, layer, ct->layer_count * 32);
    dg_merkle_hasher_free(h);
}

/* Registers @p ct at the fixture's current time and stores all its blocks. */
static void store(struct fixture *fx, struct content *ct)
{
    assert_int_equal(
        dg_piece_cache_add_root(fx->cache, ct->root, ct->len, ct->layer, ct->layer_count), 0);
    for (size_t b = 0; b * BLOCK < ct->len; b++) {
        size_t n = ct->len - b * BLOCK < BLOCK ? ct->len - b * BLOCK : BLOCK;
        assert_int_equal(dg_piece_cache_put_block(fx->cache, ct->root, b, ct->data + b * BLOCK, n),
                         0);
    }
    assert_int_equal(dg_piece_cache_flush(fx->cache), 0);
}

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));

    assert_non_null(fx);
    assert_int_equal(tmpdir_make(fx->dir, sizeof(fx->dir), "evict"), 0);
    snprintf(fx->index, sizeof(fx->index), "%s/index", fx->dir);
    snprintf(fx->blocks, sizeof(fx->blocks), "%s/blocks", fx->dir);
    assert_int_equal(dg_piece_cache_open(fx->index, fx->blocks, &fx->cache), 0);
    fx->now = 1000;
    dg_piece_cache_set_clock(fx->cache, fake_clock, fx);
    for (unsigned i = 0; i < NROOTS; i++) {
        make_content(&fx->c[i], BLOCKS_EACH * BLOCK - 100 * i, i + 1);
        fx->now += 10; /* c[0] is the least recently used */
        store(fx, &fx->c[i]);
    }
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    dg_piece_cache_close(fx->cache);
    for (unsigned i = 0; i < NROOTS; i++) {
        free(fx->c[i].data);
        free(fx->c[i].layer);
    }
    tmpdir_remove(fx->dir);
    free(fx);
    return 0;
}

static int held(struct fixture *fx, const struct content *ct)
{
    struct dg_root_info info;

    return dg_piece_cache_root_info(fx->cache, ct->root, &info) == 0 &&
           dg_piece_cache_has_range(fx->cache, ct->root, 0, ct->len);
}

static void assert_reads_back(struct fixture *fx, const struct content *ct)
{
    uint8_t *buf = malloc(ct->len);

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_read(fx->cache, ct->root, buf, ct->len, 0), (ssize_t)ct->len);
    assert_memory_equal(buf, ct->data, ct->len);
    free(buf);
}

static int block_file_exists(struct fixture *fx, const struct content *ct)
{
    char hex[DG_ROOT_HEX_LEN + 1], path[256];
    struct stat st;

    dg_root_format(ct->root, hex);
    snprintf(path, sizeof(path), "%s/%.2s/%s", fx->blocks, hex, hex);
    return stat(path, &st) == 0;
}

static uint64_t total_bytes(struct fixture *fx)
{
    uint64_t n = 0;

    for (unsigned i = 0; i < NROOTS; i++)
        n += fx->c[i].len;
    return n;
}

static void test_under_limit_evicts_nothing(void **state)
{
    struct fixture *fx = *state;
    uint64_t stored = 0, freed = 99;

    assert_int_equal(dg_piece_cache_stored_bytes(fx->cache, &stored), 0);
    assert_int_equal(stored, total_bytes(fx));
    assert_int_equal(dg_piece_cache_evict(fx->cache, stored, NULL, NULL, &freed), 0);
    assert_int_equal(freed, 0);
    for (unsigned i = 0; i < NROOTS; i++)
        assert_true(held(fx, &fx->c[i]));
}

static void test_least_recently_used_goes_first(void **state)
{
    struct fixture *fx = *state;
    uint64_t freed = 0, stored = 0;

    /* Room for the two newest roots only. */
    assert_int_equal(
        dg_piece_cache_evict(fx->cache, fx->c[1].len + fx->c[2].len, NULL, NULL, &freed), 0);
    assert_int_equal(freed, fx->c[0].len);
    assert_false(held(fx, &fx->c[0]));
    assert_false(block_file_exists(fx, &fx->c[0]));
    struct dg_root_info info;
    assert_int_equal(dg_piece_cache_root_info(fx->cache, fx->c[0].root, &info), -ENOENT);
    assert_reads_back(fx, &fx->c[1]);
    assert_reads_back(fx, &fx->c[2]);
    assert_int_equal(dg_piece_cache_stored_bytes(fx->cache, &stored), 0);
    assert_int_equal(stored, fx->c[1].len + fx->c[2].len);
}

static void test_reading_refreshes_recency(void **state)
{
    struct fixture *fx = *state;
    uint64_t freed = 0;
    uint8_t byte;

    /* c[0] is read now: c[1] becomes the least recently used. */
    fx->now += 100;
    assert_int_equal(dg_piece_cache_read(fx->cache, fx->c[0].root, &byte, 1, 0), 1);
    assert_int_equal(dg_piece_cache_evict(fx->cache, total_bytes(fx) - 1, NULL, NULL, &freed), 0);
    assert_int_equal(freed, fx->c[1].len);
    assert_true(held(fx, &fx->c[0]));
    assert_false(held(fx, &fx->c[1]));
    assert_true(held(fx, &fx->c[2]));
}

static int in_use_first(void *arg, const uint8_t root[32])
{
    struct fixture *fx = arg;

    return memcmp(root, fx->c[0].root, 32) == 0;
}

static void test_roots_in_use_are_kept(void **state)
{
    struct fixture *fx = *state;
    uint64_t freed = 0;

    assert_int_equal(dg_piece_cache_evict(fx->cache, total_bytes(fx) - 1, in_use_first, fx, &freed),
                     0);
    assert_true(held(fx, &fx->c[0]));
    assert_reads_back(fx, &fx->c[0]);
    assert_false(held(fx, &fx->c[1]));
    assert_int_equal(freed, fx->c[1].len);
}

static void test_limit_zero_keeps_roots_in_use_only(void **state)
{
    struct fixture *fx = *state;

    assert_int_equal(dg_piece_cache_evict(fx->cache, 0, in_use_first, fx, NULL), 0);
    assert_true(held(fx, &fx->c[0]));
    assert_false(held(fx, &fx->c[1]));
    assert_false(held(fx, &fx->c[2]));
}

static void test_pinned_roots_are_kept(void **state)
{
    struct fixture *fx = *state;

    assert_int_equal(dg_piece_cache_set_pinned(fx->cache, fx->c[0].root, 1), 0);
    assert_int_equal(dg_piece_cache_evict(fx->cache, 0, NULL, NULL, NULL), 0);
    assert_true(held(fx, &fx->c[0]));
    assert_reads_back(fx, &fx->c[0]);
    assert_false(held(fx, &fx->c[1]));
    assert_false(held(fx, &fx->c[2]));
    struct dg_root_info info;
    assert_int_equal(dg_piece_cache_root_info(fx->cache, fx->c[0].root, &info), 0);
    assert_true(info.flags & DG_ROOT_PINNED);
    /* Unpinned, it is a candidate again. */
    assert_int_equal(dg_piece_cache_set_pinned(fx->cache, fx->c[0].root, 0), 0);
    assert_int_equal(dg_piece_cache_evict(fx->cache, 0, NULL, NULL, NULL), 0);
    assert_false(held(fx, &fx->c[0]));
    /* Unknown roots cannot be pinned. */
    assert_int_equal(dg_piece_cache_set_pinned(fx->cache, fx->c[0].root, 1), -ENOENT);
}

/* After an eviction has counted the stored bytes, the count follows new and lost blocks: a
 * later eviction still acts when the limit is exceeded (it does not rescan when it is not). */
static void test_counts_follow_changes(void **state)
{
    struct fixture *fx = *state;
    struct content extra;
    uint64_t freed = 0, total = total_bytes(fx);

    assert_int_equal(dg_piece_cache_evict(fx->cache, total, NULL, NULL, &freed), 0);
    assert_int_equal(freed, 0);
    make_content(&extra, 2 * BLOCK + 5, 9);
    fx->now += 100;
    store(fx, &extra); /* the newest: the old roots go first */
    assert_int_equal(dg_piece_cache_evict(fx->cache, total + extra.len - 1, NULL, NULL, &freed), 0);
    assert_int_equal(freed, fx->c[0].len);
    assert_true(held(fx, &extra));
    /* Lost storage leaves the count too: after c[1]'s file is gone, the remaining roots fit
     * a limit that c[1] would have broken. */
    char hex[DG_ROOT_HEX_LEN + 1], path[256];
    uint8_t byte;
    dg_root_format(fx->c[1].root, hex);
    snprintf(path, sizeof(path), "%s/%.2s/%s", fx->blocks, hex, hex);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(dg_piece_cache_read(fx->cache, fx->c[1].root, &byte, 1, 0), -EIO);
    assert_int_equal(dg_piece_cache_evict(fx->cache, fx->c[2].len + extra.len, NULL, NULL, &freed),
                     0);
    assert_int_equal(freed, 0);
    assert_true(held(fx, &fx->c[2]));
    assert_true(held(fx, &extra));
    free(extra.data);
    free(extra.layer);
}

static void test_eviction_survives_reopen(void **state)
{
    struct fixture *fx = *state;

    assert_int_equal(dg_piece_cache_evict(fx->cache, fx->c[2].len, NULL, NULL, NULL), 0);
    dg_piece_cache_close(fx->cache);
    assert_int_equal(dg_piece_cache_open(fx->index, fx->blocks, &fx->cache), 0);
    dg_piece_cache_set_clock(fx->cache, fake_clock, fx);
    assert_false(held(fx, &fx->c[0]));
    assert_false(held(fx, &fx->c[1]));
    assert_reads_back(fx, &fx->c[2]);
    /* An evicted root can be stored again. */
    store(fx, &fx->c[0]);
    assert_reads_back(fx, &fx->c[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_under_limit_evicts_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_least_recently_used_goes_first, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reading_refreshes_recency, setup, teardown),
        cmocka_unit_test_setup_teardown(test_roots_in_use_are_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limit_zero_keeps_roots_in_use_only, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pinned_roots_are_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_counts_follow_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eviction_survives_reopen, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
