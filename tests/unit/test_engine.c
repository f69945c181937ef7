/* Unit tests for engine/engine.c, without FUSE: an engine on temporary data and cache
 * directories, fed through its public API the way fs/ feeds it.
 *
 * Nothing here asserts on durations. Positive outcomes are awaited on a condition variable with
 * a generous deadline; negative ones ("the callback has not run") are checked after
 * dg_engine_when_idle() has returned, which orders them after every message sent before. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tests/unit/content.h"
#include "tests/unit/tmpdir.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/hash_file.h"
#include "engine/merkle.h"
#include "engine/piece_cache.h"

#define BLOCK DG_MERKLE_BLOCK_SIZE
#define DEADLINE_S 120         /* for things that must happen: only a hang reaches it */
#define LONG_TIMEOUT_MS 600000 /* read timeout where a timeout is not under test */

/* ---- fixture ---- */

struct fixture {
    char dir[64];
    char data[128];
    char cache[128];
    char shared[160];
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));

    if (!fx)
        return -1;
    if (tmpdir_make(fx->dir, sizeof(fx->dir), "engine") < 0)
        return -1;
    snprintf(fx->data, sizeof(fx->data), "%s/data", fx->dir);
    snprintf(fx->cache, sizeof(fx->cache), "%s/cache", fx->dir);
    snprintf(fx->shared, sizeof(fx->shared), "%s/shared", fx->data);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;

    tmpdir_remove(fx->dir);
    free(fx);
    return 0;
}

static struct dg_engine *new_engine(const struct fixture *fx, uint32_t read_timeout_ms)
{
    struct dg_engine_config cfg = {
        .data_dir = fx->data,
        .cache_dir = fx->cache,
        .cache_size = 0,
        .read_timeout_ms = read_timeout_ms,
        .hash_jobs = 2,
    };
    struct dg_engine *e = NULL;

    assert_int_equal(dg_engine_new(&cfg, &e), 0);
    assert_non_null(e);
    assert_string_equal(dg_engine_shared_dir(e), fx->shared);
    return e;
}

/* ---- waiting for callbacks ---- */

struct box {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int calls;
    ssize_t status;
    uint8_t *data;
};

static void box_init(struct box *b)
{
    memset(b, 0, sizeof(*b));
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
}

static void box_destroy(struct box *b)
{
    free(b->data);
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->cond);
}

static int box_calls(struct box *b)
{
    int n;

    pthread_mutex_lock(&b->lock);
    n = b->calls;
    pthread_mutex_unlock(&b->lock);
    return n;
}

/* Waits until @p b was called at least once. Fails the test after DEADLINE_S. */
static void box_wait(struct box *b)
{
    struct timespec deadline;

    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += DEADLINE_S;
    pthread_mutex_lock(&b->lock);
    while (b->calls == 0) {
        if (pthread_cond_timedwait(&b->cond, &b->lock, &deadline) == ETIMEDOUT)
            break;
    }
    int calls = b->calls;
    pthread_mutex_unlock(&b->lock);
    if (calls == 0)
        fail_msg("callback not called within %d s", DEADLINE_S);
}

static void read_cb(void *arg, ssize_t status, const void *data)
{
    struct box *b = arg;

    pthread_mutex_lock(&b->lock);
    b->calls++;
    b->status = status;
    if (status > 0 && data) {
        free(b->data);
        b->data = malloc((size_t)status);
        if (b->data)
            memcpy(b->data, data, (size_t)status);
    }
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

static void done_cb(void *arg)
{
    struct box *b = arg;

    pthread_mutex_lock(&b->lock);
    b->calls++;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

/* Returns once every message sent so far was applied and hashing is done. */
static void wait_idle(struct dg_engine *e)
{
    struct box b;

    box_init(&b);
    assert_int_equal(dg_engine_when_idle(e, done_cb, &b), 0);
    box_wait(&b);
    box_destroy(&b);
}

/* ---- content ---- */

/* Hashes the file at @p path with dg_hash_fd(). */
static void hash_path(const char *path, uint8_t root[32], struct content *ct)
{
    struct dg_file_hash h;
    int fd = open(path, O_RDONLY);

    assert_true(fd >= 0);
    assert_int_equal(dg_hash_fd(fd, &h), 0);
    close(fd);
    memcpy(root, h.root, 32);
    if (ct) {
        ct->layer_count = h.layer_count;
        ct->layer = malloc(h.layer_count * 32);
        assert_non_null(ct->layer);
        memcpy(ct->layer, h.layer, h.layer_count * 32);
    }
    dg_file_hash_clear(&h);
}

static void write_file(const char *path, const void *data, size_t len, int flags)
{
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
}

static void put_block(struct dg_engine *e, const struct content *ct, uint64_t b)
{
    assert_int_equal(
        dg_engine_put_block(e, ct->root, b, ct->data + b * BLOCK, content_block_len(ct, b)), 0);
}

/* An engine with @p ct registered in its cache (before start: the test is the writer). */
static struct dg_engine *engine_with(const struct fixture *fx, const struct content *ct,
                                     uint32_t timeout_ms)
{
    struct dg_engine *e = new_engine(fx, timeout_ms);

    assert_int_equal(
        dg_piece_cache_add_root(dg_engine_cache(e), ct->root, ct->len, ct->layer, ct->layer_count),
        0);
    assert_int_equal(dg_engine_start(e), 0);
    return e;
}

/* ================================================================ reads through the engine */

static void test_read_waits_for_blocks(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 6 * BLOCK + 500, 1); /* 7 blocks */
    struct dg_engine *e = engine_with(fx, ct, LONG_TIMEOUT_MS);
    struct dg_content *c = NULL;
    struct dg_root_info info;
    struct box b, b2;
    uint8_t buf[3 * BLOCK];
    uint64_t token = 0;
    const uint64_t off = BLOCK + 10;
    const size_t len = 2 * BLOCK; /* blocks 1, 2 and 3 */

    assert_int_equal(dg_engine_root_info(e, ct->root, &info), 0);
    assert_int_equal(info.length, ct->len);
    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    assert_int_equal(dg_content_length(c), ct->len);
    assert_memory_equal(dg_content_root(c), ct->root, 32);
    assert_int_equal(dg_content_read(c, buf, len, off), -EAGAIN);

    box_init(&b);
    assert_int_equal(dg_engine_read(e, c, off, len, read_cb, &b, &token), 0);
    assert_true(token != 0);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);

    /* A wrong block does not complete the read, nor do some of the blocks. */
    memcpy(buf, ct->data + BLOCK, BLOCK);
    buf[5] ^= 0x10;
    assert_int_equal(dg_engine_put_block(e, ct->root, 1, buf, BLOCK), 0);
    assert_int_equal(dg_engine_put_block(e, ct->root, 1, ct->data, BLOCK - 1), 0);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);
    put_block(e, ct, 1);
    put_block(e, ct, 3);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);
    assert_int_equal(dg_content_read(c, buf, len, off), -EAGAIN);
    memcpy(buf, ct->data + 2 * BLOCK, BLOCK);
    buf[BLOCK - 1] ^= 1;
    assert_int_equal(dg_engine_put_block(e, ct->root, 2, buf, BLOCK), 0);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);

    /* The last one. */
    put_block(e, ct, 2);
    box_wait(&b);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 1); /* exactly once */
    assert_int_equal(b.status, (ssize_t)len);
    assert_non_null(b.data);
    assert_memory_equal(b.data, ct->data + off, len);
    box_destroy(&b);

    /* Now held: read on the calling thread, and through the engine at once. */
    assert_int_equal(dg_content_read(c, buf, len, off), (ssize_t)len);
    assert_memory_equal(buf, ct->data + off, len);
    box_init(&b2);
    assert_int_equal(dg_engine_read(e, c, BLOCK, BLOCK, read_cb, &b2, NULL), 0);
    box_wait(&b2);
    assert_int_equal(b2.status, BLOCK);
    assert_memory_equal(b2.data, ct->data + BLOCK, BLOCK);
    box_destroy(&b2);

    /* Past the end: 0 bytes, at once. */
    box_init(&b2);
    assert_int_equal(dg_engine_read(e, c, ct->len + 10, 100, read_cb, &b2, NULL), 0);
    box_wait(&b2);
    assert_int_equal(b2.status, 0);
    box_destroy(&b2);
    assert_int_equal(dg_content_read(c, buf, 100, ct->len), 0);

    /* The end of the file: a short read once the last block is there. */
    box_init(&b2);
    assert_int_equal(dg_engine_read(e, c, 6 * BLOCK, BLOCK, read_cb, &b2, NULL), 0);
    put_block(e, ct, 6);
    box_wait(&b2);
    assert_int_equal(b2.status, 500);
    assert_memory_equal(b2.data, ct->data + 6 * BLOCK, 500);
    box_destroy(&b2);

    dg_content_unref(c);
    dg_engine_stop(e);
    dg_engine_free(e);

    /* The blocks were flushed at stop: a new engine has them. */
    e = new_engine(fx, LONG_TIMEOUT_MS);
    assert_int_equal(dg_engine_start(e), 0);
    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    assert_int_equal(dg_content_read(c, buf, len, off), (ssize_t)len);
    assert_memory_equal(buf, ct->data + off, len);
    assert_int_equal(dg_content_read(c, buf, 10, 0), -EAGAIN);
    dg_content_unref(c);
    dg_engine_free(e);
    content_free(ct);
}

/* Several reads of one root wait together; each gets its own bytes. */
static void test_many_waiters(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 4 * BLOCK, 2);
    struct dg_engine *e = engine_with(fx, ct, LONG_TIMEOUT_MS);
    struct dg_content *c = NULL;
    enum {
        N = 8
    };
    struct box b[N];

    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    for (int i = 0; i < N; i++) {
        box_init(&b[i]);
        assert_int_equal(dg_engine_read(e, c, (uint64_t)i * 1000, 3000, read_cb, &b[i], NULL), 0);
    }
    /* The content may go while reads hold it. */
    dg_content_unref(c);
    wait_idle(e);
    for (int i = 0; i < N; i++)
        assert_int_equal(box_calls(&b[i]), 0);
    put_block(e, ct, 0);
    for (int i = 0; i < N; i++) {
        box_wait(&b[i]);
        assert_int_equal(b[i].status, 3000);
        assert_memory_equal(b[i].data, ct->data + i * 1000, 3000);
        box_destroy(&b[i]);
    }
    dg_engine_free(e);
    content_free(ct);
}

static void test_read_timeout(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 3 * BLOCK, 3);
    struct dg_engine *e = engine_with(fx, ct, 300);
    struct dg_content *c = NULL;
    struct box b;

    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    box_init(&b);
    assert_int_equal(dg_engine_read(e, c, 0, 100, read_cb, &b, NULL), 0);
    box_wait(&b);
    assert_int_equal(b.status, -ETIMEDOUT);
    assert_null(b.data);
    box_destroy(&b);
    dg_content_unref(c);
    dg_engine_stop(e);
    dg_engine_free(e);
    content_free(ct);
}

static void test_read_cancel(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 3 * BLOCK, 4);
    struct dg_engine *e = engine_with(fx, ct, LONG_TIMEOUT_MS);
    struct dg_content *c = NULL;
    struct box b, other;
    uint64_t token = 0, other_token = 0;

    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    box_init(&b);
    box_init(&other);
    assert_int_equal(dg_engine_read(e, c, 0, 100, read_cb, &b, &token), 0);
    assert_int_equal(dg_engine_read(e, c, BLOCK, 100, read_cb, &other, &other_token), 0);
    assert_true(token != other_token);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);
    dg_engine_cancel(e, token);
    box_wait(&b);
    assert_int_equal(b.status, -EINTR);
    /* Cancelling again, or a token never given, does nothing. */
    dg_engine_cancel(e, token);
    dg_engine_cancel(e, 987654321);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 1);
    assert_int_equal(box_calls(&other), 0);
    /* The other read still completes, once. */
    put_block(e, ct, 1);
    box_wait(&other);
    assert_int_equal(other.status, 100);
    dg_engine_cancel(e, other_token); /* too late: nothing happens */
    wait_idle(e);
    assert_int_equal(box_calls(&other), 1);
    box_destroy(&b);
    box_destroy(&other);
    dg_content_unref(c);
    dg_engine_free(e);
    content_free(ct);
}

/* A cancel that reaches the engine before its read (a FUSE interrupt that fired while the read
 * was being posted) must not be lost: the read completes with -EINTR, not after the timeout. */
static void test_cancel_before_read(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 3 * BLOCK, 5);
    struct dg_engine *e = engine_with(fx, ct, LONG_TIMEOUT_MS);
    struct dg_content *c = NULL;
    struct box b, other;
    uint64_t token, other_token;

    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    box_init(&b);
    box_init(&other);
    token = dg_engine_read_token(e);
    other_token = dg_engine_read_token(e);
    assert_true(token != other_token);
    dg_engine_cancel(e, token);
    wait_idle(e);
    assert_int_equal(dg_engine_read_as(e, token, c, 0, 100, read_cb, &b), 0);
    box_wait(&b);
    assert_int_equal(b.status, -EINTR);
    /* Another read, not cancelled, still waits for its block and completes once. */
    assert_int_equal(dg_engine_read_as(e, other_token, c, BLOCK, 100, read_cb, &other), 0);
    wait_idle(e);
    assert_int_equal(box_calls(&other), 0);
    put_block(e, ct, 1);
    box_wait(&other);
    assert_int_equal(other.status, 100);
    assert_int_equal(box_calls(&b), 1);
    box_destroy(&b);
    box_destroy(&other);
    dg_content_unref(c);
    dg_engine_free(e);
    content_free(ct);
}

/* With cache_size set, the engine's flush timer evicts roots nobody has open, and keeps the
 * ones with an open content handle (a reader is never robbed of its blocks). */
static void test_cache_size_evicts_unopened_roots(void **state)
{
    struct fixture *fx = *state;
    struct content *kept = content_make(fx->dir, 3 * BLOCK, 6);
    struct content *gone = content_make(fx->dir, 3 * BLOCK, 7);
    struct dg_engine_config cfg = {
        .data_dir = fx->data,
        .cache_dir = fx->cache,
        .cache_size = BLOCK, /* far less than either root */
        .read_timeout_ms = LONG_TIMEOUT_MS,
    };
    struct dg_engine *e = NULL;
    struct dg_content *c = NULL;
    struct dg_root_info info;
    uint8_t buf[3 * BLOCK];

    assert_int_equal(dg_engine_new(&cfg, &e), 0);
    struct dg_piece_cache *cache = dg_engine_cache(e);
    assert_int_equal(
        dg_piece_cache_add_root(cache, kept->root, kept->len, kept->layer, kept->layer_count), 0);
    assert_int_equal(
        dg_piece_cache_add_root(cache, gone->root, gone->len, gone->layer, gone->layer_count), 0);
    assert_int_equal(dg_engine_start(e), 0);
    assert_int_equal(dg_engine_open(e, kept->root, &c), 0);
    for (uint64_t b = 0; b < 3; b++) {
        put_block(e, kept, b);
        put_block(e, gone, b);
    }
    wait_idle(e);
    /* The flush timer runs about once a second: wait (with a generous deadline) for the
     * unopened root to go. */
    int evicted = 0;
    for (int i = 0; i < 1200 && !evicted; i++) {
        evicted = dg_engine_root_info(e, gone->root, &info) == -ENOENT;
        if (!evicted)
            usleep(100 * 1000);
    }
    assert_true(evicted);
    assert_int_equal(dg_content_read(c, buf, sizeof(buf), 0), (ssize_t)kept->len);
    assert_memory_equal(buf, kept->data, kept->len);
    dg_content_unref(c);
    dg_engine_free(e);
    content_free(kept);
    content_free(gone);
}

static void test_stop_with_waiting_read(void **state)
{
    struct fixture *fx = *state;
    struct content *ct = content_make(fx->dir, 3 * BLOCK, 5);
    struct dg_engine *e = engine_with(fx, ct, LONG_TIMEOUT_MS);
    struct dg_content *c = NULL;
    struct box b, late;

    assert_int_equal(dg_engine_open(e, ct->root, &c), 0);
    box_init(&b);
    assert_int_equal(dg_engine_read(e, c, 0, 100, read_cb, &b, NULL), 0);
    wait_idle(e);
    assert_int_equal(box_calls(&b), 0);
    dg_engine_stop(e);
    assert_int_equal(box_calls(&b), 1); /* answered before stop returned */
    assert_int_equal(b.status, -ESHUTDOWN);
    dg_engine_stop(e); /* twice is fine */

    /* After stop: a read is still answered, exactly once. */
    box_init(&late);
    assert_int_equal(dg_engine_read(e, c, 0, 100, read_cb, &late, NULL), 0);
    assert_int_equal(box_calls(&late), 1);
    assert_int_equal(late.status, -ESHUTDOWN);
    /* Notifications after stop run their done callback at once. */
    struct box done;
    box_init(&done);
    dg_engine_shared_removed(e, 12345, done_cb, &done);
    assert_int_equal(box_calls(&done), 1);
    box_destroy(&done);

    box_destroy(&b);
    box_destroy(&late);
    dg_content_unref(c);
    dg_engine_free(e);
    content_free(ct);
}

/* Stop and free of an engine that never started. */
static void test_no_start(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, 0);
    struct stat st;

    assert_int_equal(stat(fx->shared, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    dg_engine_stop(e);
    dg_engine_free(e);
    dg_engine_free(NULL);

    struct dg_engine_config cfg = {.data_dir = NULL, .cache_dir = fx->cache};
    e = NULL;
    assert_int_equal(dg_engine_new(&cfg, &e), -EINVAL);
}

/* ================================================================ shared files */

static void shared_path(const struct fixture *fx, const char *rel, char *out, size_t size)
{
    snprintf(out, size, "%s/%s", fx->shared, rel);
}

static void expect_shared_root(struct dg_engine *e, const char *path, const uint8_t want[32])
{
    struct stat st;
    uint8_t root[32];

    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(dg_engine_shared_root(e, &st, root), 0);
    assert_memory_equal(root, want, 32);
}

static int root_listed(struct dg_engine *e, const uint8_t root[32])
{
    uint8_t roots[64 * 32];
    size_t n = 0;

    assert_int_equal(dg_engine_list_roots(e, NULL, roots, 64, &n), 0);
    for (size_t i = 0; i < n; i++)
        if (memcmp(roots + 32 * i, root, 32) == 0)
            return 1;
    return 0;
}

static void expect_content(struct dg_engine *e, const uint8_t root[32], const uint8_t *data,
                           size_t len)
{
    struct dg_content *c = NULL;
    uint8_t *buf = malloc(len + 100);

    assert_non_null(buf);
    assert_int_equal(dg_engine_open(e, root, &c), 0);
    assert_int_equal(dg_content_length(c), len);
    assert_int_equal(dg_content_read(c, buf, len + 100, 0), (ssize_t)len);
    assert_memory_equal(buf, data, len);
    dg_content_unref(c);
    free(buf);
}

static void test_shared_files(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, LONG_TIMEOUT_MS);
    size_t len = 3 * BLOCK + 99, more = 5000;
    uint8_t *data = malloc(len + more);
    uint8_t root[32], root2[32], sub_root[32];
    char path[256], sub[256], subdir[256];
    struct dg_root_info info;
    struct dg_content *c = NULL;
    struct stat st;

    assert_non_null(data);
    content_fill(data, len + more, 6);
    /* Files written before start are found by the startup scan. */
    shared_path(fx, "a.bin", path, sizeof(path));
    write_file(path, data, len, O_TRUNC);
    shared_path(fx, "dir", subdir, sizeof(subdir));
    assert_int_equal(mkdir(subdir, 0755), 0);
    shared_path(fx, "dir/b.bin", sub, sizeof(sub));
    write_file(sub, data + 1, 100, O_TRUNC);
    hash_path(path, root, NULL);
    hash_path(sub, sub_root, NULL);

    assert_int_equal(dg_engine_start(e), 0);
    wait_idle(e);
    expect_shared_root(e, path, root);
    expect_shared_root(e, sub, sub_root);
    assert_int_equal(dg_engine_root_info(e, root, &info), 0);
    assert_int_equal(info.length, len);
    assert_int_equal(info.shared_files, 1);
    assert_true(root_listed(e, root));
    assert_true(root_listed(e, sub_root));
    expect_content(e, root, data, len);
    expect_content(e, sub_root, data + 1, 100);
    /* An unknown stat. */
    memset(&st, 0, sizeof(st));
    st.st_ino = 999999999;
    assert_int_equal(dg_engine_shared_root(e, &st, root2), -ENOENT);

    /* Appended behind the engine's back: the old root is never served. */
    write_file(path, data + len, more, O_APPEND);
    assert_int_equal(dg_engine_open(e, root, &c), -ENOENT);
    assert_int_equal(stat(path, &st), 0);
    assert_int_not_equal(dg_engine_shared_root(e, &st, root2), 0);
    /* Told (fs/ would say so), the file is hashed again under its new root. */
    dg_engine_shared_written(e, "a.bin");
    wait_idle(e);
    hash_path(path, root2, NULL);
    assert_memory_not_equal(root, root2, 32);
    expect_shared_root(e, path, root2);
    expect_content(e, root2, data, len + more);
    assert_int_equal(dg_engine_root_info(e, root, &info), -ENOENT);
    assert_false(root_listed(e, root));
    assert_true(root_listed(e, root2));

    /* Removed: the root goes. */
    struct box done;
    box_init(&done);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(unlink(path), 0);
    dg_engine_shared_removed(e, (uint64_t)st.st_ino, done_cb, &done);
    box_wait(&done);
    box_destroy(&done);
    assert_int_equal(dg_engine_root_info(e, root2, &info), -ENOENT);
    assert_int_equal(dg_engine_open(e, root2, &c), -ENOENT);
    assert_false(root_listed(e, root2));
    assert_int_equal(dg_engine_shared_root(e, &st, root2), -ENOENT);
    /* The other file is untouched. */
    expect_shared_root(e, sub, sub_root);

    dg_engine_stop(e);
    dg_engine_free(e);
    free(data);
}

/* A shared file changed after it was opened is never served under its old root. */
static void test_shared_changed_while_open(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, LONG_TIMEOUT_MS);
    uint8_t data[3000], buf[3000], root[32], root2[32];
    char path[256];
    struct dg_content *c = NULL, *c2 = NULL;
    struct timespec times[2];
    int fd;

    content_fill(data, sizeof(data), 7);
    shared_path(fx, "f", path, sizeof(path));
    write_file(path, data, sizeof(data), O_TRUNC);
    hash_path(path, root, NULL);
    assert_int_equal(dg_engine_start(e), 0);
    wait_idle(e);
    expect_shared_root(e, path, root);

    /* Appended after open. */
    assert_int_equal(dg_engine_open(e, root, &c), 0);
    assert_int_equal(dg_content_read(c, buf, 100, 0), 100);
    assert_memory_equal(buf, data, 100);
    write_file(path, "tail", 4, O_APPEND);
    assert_int_equal(dg_content_read(c, buf, 100, 0), -EIO);
    assert_int_equal(dg_content_read(c, buf, 100, 500), -EIO);
    dg_content_unref(c);
    /* The read told the engine: the file gets its new root. */
    wait_idle(e);
    hash_path(path, root2, NULL);
    expect_shared_root(e, path, root2);
    assert_int_equal(dg_engine_open(e, root, &c), -ENOENT);

    /* Overwritten in place (same size, another mtime) after open. */
    assert_int_equal(dg_engine_open(e, root2, &c2), 0);
    assert_int_equal(dg_content_read(c2, buf, 10, 0), 10);
    fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    uint8_t other = (uint8_t)(data[0] ^ 0xff);
    assert_int_equal(pwrite(fd, &other, 1, 0), 1);
    times[0].tv_sec = 0;
    times[0].tv_nsec = UTIME_OMIT;
    times[1].tv_sec = 1000000000;
    times[1].tv_nsec = 0;
    assert_int_equal(futimens(fd, times), 0);
    close(fd);
    assert_int_equal(dg_content_read(c2, buf, 10, 0), -EIO);
    dg_content_unref(c2);
    wait_idle(e);
    assert_int_equal(dg_engine_open(e, root2, &c), -ENOENT);

    dg_engine_free(e);
}

static void test_shared_rename_and_restart(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, LONG_TIMEOUT_MS);
    uint8_t data[20000], root[32], root_gone[32];
    char from[256], to[256], gone[256], moved[256];
    struct stat st;
    struct dg_shared_file *f = calloc(1, sizeof(*f));
    struct box done;

    assert_non_null(f);
    content_fill(data, sizeof(data), 8);
    shared_path(fx, "x", from, sizeof(from));
    shared_path(fx, "y", to, sizeof(to));
    shared_path(fx, "gone", gone, sizeof(gone));
    shared_path(fx, "moved", moved, sizeof(moved));
    write_file(from, data, sizeof(data), O_TRUNC);
    write_file(gone, data, 1000, O_TRUNC);
    hash_path(from, root, NULL);
    hash_path(gone, root_gone, NULL);
    assert_int_equal(dg_engine_start(e), 0);
    wait_idle(e);
    expect_shared_root(e, from, root);
    expect_shared_root(e, gone, root_gone);

    /* Renamed: the done callback runs once the index has the new path. */
    assert_int_equal(rename(from, to), 0);
    box_init(&done);
    dg_engine_shared_renamed(e, "x", "y", 0, done_cb, &done);
    box_wait(&done);
    box_destroy(&done);
    assert_int_equal(stat(to, &st), 0);
    assert_int_equal(dg_piece_cache_shared_get(dg_engine_cache(e), (uint64_t)st.st_ino, f), 0);
    assert_string_equal(f->path, "y");
    expect_shared_root(e, to, root);
    expect_content(e, root, data, sizeof(data));

    /* While the engine is down: one file goes, one is renamed. */
    dg_engine_free(e);
    assert_int_equal(unlink(gone), 0);
    assert_int_equal(rename(to, moved), 0);
    e = new_engine(fx, LONG_TIMEOUT_MS);
    assert_int_equal(dg_engine_start(e), 0);
    wait_idle(e);
    expect_shared_root(e, moved, root);
    expect_content(e, root, data, sizeof(data));
    assert_int_equal(stat(moved, &st), 0);
    assert_int_equal(dg_piece_cache_shared_get(dg_engine_cache(e), (uint64_t)st.st_ino, f), 0);
    assert_string_equal(f->path, "moved");
    struct dg_root_info info;
    assert_int_equal(dg_engine_root_info(e, root_gone, &info), -ENOENT);
    dg_engine_free(e);
    free(f);
}

/* ================================================================ the data directory lock */

static void test_data_dir_lock(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, 0), *e2 = NULL;
    struct dg_engine_config cfg = {.data_dir = fx->data, .cache_dir = fx->cache};

    assert_int_equal(dg_engine_new(&cfg, &e2), -EBUSY);
    assert_null(e2);
    assert_int_equal(dg_engine_start(e), 0);
    assert_int_equal(dg_engine_new(&cfg, &e2), -EBUSY);
    assert_null(e2);
    /* The first engine still works. */
    wait_idle(e);
    dg_engine_free(e);
    /* Free again: a new engine can use the directory. */
    e = new_engine(fx, 0);
    dg_engine_free(e);
}

/* Whether another process sees a lock on byte 0 of @p path (LMDB's liveness lock). */
static int other_process_sees_lock(const char *path)
{
    pid_t pid = fork();
    int status;

    assert_true(pid >= 0);
    if (pid == 0) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
        int fd = open(path, O_RDWR);
        if (fd < 0 || fcntl(fd, F_GETLK, &fl) < 0)
            _exit(2);
        _exit(fl.l_type == F_UNLCK ? 0 : 1);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_not_equal(WEXITSTATUS(status), 2);
    return WEXITSTATUS(status) == 1;
}

/* A refused second engine must leave the first one's index alone. LMDB forbids opening one
 * environment twice in a process ("close()ing it breaks fcntl() advisory locking"), so the data
 * directory lock has to be taken before the index is opened. */
static void test_refused_engine_keeps_index_lock(void **state)
{
    struct fixture *fx = *state;
    struct dg_engine *e = new_engine(fx, 0), *e2 = NULL;
    struct dg_engine_config cfg = {.data_dir = fx->data, .cache_dir = fx->cache};
    char lockfile[256];

    snprintf(lockfile, sizeof(lockfile), "%s/index/lock.mdb", fx->data);
    if (!other_process_sees_lock(lockfile)) {
        dg_engine_free(e);
        skip(); /* this LMDB build does not lock that way: nothing to check */
    }
    int rc = dg_engine_new(&cfg, &e2);
    int still_locked = other_process_sees_lock(lockfile);
    dg_engine_free(e);
    assert_int_equal(rc, -EBUSY);
    assert_true(still_locked);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_read_waits_for_blocks),
        T(test_many_waiters),
        T(test_read_timeout),
        T(test_read_cancel),
        T(test_cancel_before_read),
        T(test_cache_size_evicts_unopened_roots),
        T(test_stop_with_waiting_read),
        T(test_no_start),
        T(test_shared_files),
        T(test_shared_changed_while_open),
        T(test_shared_rename_and_restart),
        T(test_data_dir_lock),
        T(test_refused_engine_keeps_index_lock),
    };
#undef T

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests_name("engine", tests, NULL, NULL);
}
