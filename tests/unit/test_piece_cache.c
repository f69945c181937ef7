/* Unit tests for engine/piece_cache.c, driven from one thread (the writer).
 *
 * Content is generated deterministically, written to a file and hashed with dg_hash_fd(), so
 * roots and piece layers are the real ones. Shared-file records take fabricated stat snapshots:
 * the cache records them and never looks at the files. Each test gets its own temporary
 * directory (index and block storage below it), removed afterwards. */
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
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/hash_file.h"
#include "engine/merkle.h"
#include "engine/piece_cache.h"
#include "engine/root_name.h"

#define BLOCK DG_MERKLE_BLOCK_SIZE
#define MIB (1024u * 1024u)

/* ---- fixture: a temporary directory ---- */

struct fixture {
    char dir[64];
    char index[128];
    char blocks[128];
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));

    if (!fx)
        return -1;
    if (tmpdir_make(fx->dir, sizeof(fx->dir), "cache") < 0)
        return -1;
    snprintf(fx->index, sizeof(fx->index), "%s/data/index", fx->dir);
    snprintf(fx->blocks, sizeof(fx->blocks), "%s/cache/blocks", fx->dir);
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

static struct dg_piece_cache *open_cache(const struct fixture *fx)
{
    struct dg_piece_cache *c = NULL;

    assert_int_equal(dg_piece_cache_open(fx->index, fx->blocks, &c), 0);
    assert_non_null(c);
    return c;
}

/* ---- content ---- */

static uint64_t nblocks(const struct content *ct)
{
    return dg_merkle_block_count(ct->len);
}

static int put_block(struct dg_piece_cache *c, const struct content *ct, uint64_t b)
{
    return dg_piece_cache_put_block(c, ct->root, b, ct->data + b * BLOCK, content_block_len(ct, b));
}

/* The leaf hashes of piece @p piece (malloc'd, *count of them). */
static uint8_t *piece_leaves(const struct content *ct, uint64_t piece, uint64_t *count)
{
    uint64_t per = ct->piece_size / BLOCK, first = piece * per, n = nblocks(ct) - first;
    uint8_t *leaves;

    if (n > per)
        n = per;
    leaves = malloc(n * 32);
    assert_non_null(leaves);
    for (uint64_t i = 0; i < n; i++)
        assert_int_equal(dg_merkle_sha256(ct->data + (first + i) * BLOCK,
                                          content_block_len(ct, first + i), leaves + 32 * i),
                         0);
    *count = n;
    return leaves;
}

static int put_leaves(struct dg_piece_cache *c, const struct content *ct, uint64_t piece)
{
    uint64_t n;
    uint8_t *leaves = piece_leaves(ct, piece, &n);
    int rc = dg_piece_cache_put_leaves(c, ct->root, piece, leaves, n);

    free(leaves);
    return rc;
}

/* Reads [off, off+len) back and compares it with the content. */
static void assert_reads_back(struct dg_piece_cache *c, const struct content *ct, uint64_t off,
                              size_t len)
{
    uint8_t *buf = malloc(len ? len : 1);
    size_t want = off >= ct->len ? 0 : (ct->len - off < len ? ct->len - off : len);

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_has_range(c, ct->root, off, len), 1);
    assert_int_equal(dg_piece_cache_read(c, ct->root, buf, len, off), (ssize_t)want);
    if (want)
        assert_memory_equal(buf, ct->data + off, want);
    free(buf);
}

static void assert_not_held(struct dg_piece_cache *c, const struct content *ct, uint64_t off,
                            size_t len)
{
    uint8_t *buf = malloc(len ? len : 1);

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_has_range(c, ct->root, off, len), 0);
    assert_int_equal(dg_piece_cache_read(c, ct->root, buf, len, off), -EAGAIN);
    free(buf);
}

static uint64_t cached(struct dg_piece_cache *c, const struct content *ct)
{
    struct dg_root_info info;

    assert_int_equal(dg_piece_cache_root_info(c, ct->root, &info), 0);
    return info.blocks_cached;
}

/* ---- listing ---- */

static int listed(struct dg_piece_cache *c, const uint8_t root[32])
{
    uint8_t *roots = malloc(1024 * 32);
    size_t n = 0;
    int found = 0;

    assert_non_null(roots);
    assert_int_equal(dg_piece_cache_list_roots(c, NULL, roots, 1024, &n), 0);
    for (size_t i = 0; i < n; i++)
        found |= memcmp(roots + 32 * i, root, 32) == 0;
    free(roots);
    return found;
}

/* ---- shared files ---- */

static struct stat make_stat(uint64_t ino, uint64_t size, int64_t mtime)
{
    struct stat st;

    memset(&st, 0, sizeof(st));
    st.st_ino = (ino_t)ino;
    st.st_dev = 0x801;
    st.st_size = (off_t)size;
    st.st_mode = S_IFREG | 0644;
    st.st_mtim.tv_sec = mtime;
    st.st_mtim.tv_nsec = 123;
    st.st_ctim.tv_sec = mtime;
    st.st_ctim.tv_nsec = 456;
    return st;
}

static int share(struct dg_piece_cache *c, const char *path, uint64_t ino, const struct content *ct)
{
    struct stat st = make_stat(ino, ct->len, 1000);
    int rc = dg_piece_cache_shared_begin(c, path, &st);

    if (rc == 0)
        rc = dg_piece_cache_shared_done(c, path, &st, ct->root, ct->piece_size, ct->layer,
                                        ct->layer_count);
    return rc;
}

static struct dg_shared_file *get_file(struct dg_piece_cache *c, uint64_t ino, int want_rc)
{
    struct dg_shared_file *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    assert_int_equal(dg_piece_cache_shared_get(c, ino, f), want_rc);
    return f;
}

struct ino_list {
    uint64_t inos[512];
    char paths[512][64];
    size_t n;
    size_t stop_after; /* 0: never */
};

static int collect(void *arg, const struct dg_shared_file *f)
{
    struct ino_list *l = arg;

    if (l->n < 512) {
        l->inos[l->n] = f->ino;
        size_t len = strnlen(f->path, sizeof(l->paths[0]) - 1);
        memcpy(l->paths[l->n], f->path, len);
        l->paths[l->n][len] = '\0';
        l->n++;
    }
    return l->stop_after && l->n >= l->stop_after ? 99 : 0;
}

static int has_ino(const struct ino_list *l, uint64_t ino)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->inos[i] == ino)
            return 1;
    return 0;
}

static void assert_layer(struct dg_piece_cache *c, const struct content *ct)
{
    uint8_t *layer = NULL;
    uint64_t count = 0;

    assert_int_equal(dg_piece_cache_layer(c, ct->root, &layer, &count), 0);
    assert_int_equal(count, ct->layer_count);
    assert_memory_equal(layer, ct->layer, count * 32);
    free(layer);
}

/* ================================================================ tests */

static void test_open_creates_dirs(void **state)
{
    struct fixture *fx = *state;
    struct dg_piece_cache *c = open_cache(fx);
    struct stat st;

    assert_int_equal(stat(fx->index, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(stat(fx->blocks, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    dg_piece_cache_close(c);
    dg_piece_cache_close(NULL);

    /* An index path below a regular file cannot be made. */
    char bad[192];
    snprintf(bad, sizeof(bad), "%s/file", fx->dir);
    int fd = open(bad, O_WRONLY | O_CREAT, 0600);
    assert_true(fd >= 0);
    close(fd);
    snprintf(bad, sizeof(bad), "%s/file/index", fx->dir);
    c = NULL;
    assert_true(dg_piece_cache_open(bad, fx->blocks, &c) < 0);
    assert_null(c);
}

static void test_shared_lifecycle(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 3 * BLOCK + 77, 1);
    struct dg_piece_cache *c = open_cache(fx);
    struct stat st = make_stat(100, a->len, 1000);
    struct dg_root_info info;
    struct dg_shared_file *f;
    struct ino_list *l = calloc(1, sizeof(*l));

    assert_non_null(l);
    /* Hashing: a record, but no root yet. */
    assert_int_equal(dg_piece_cache_shared_begin(c, "a.txt", &st), 0);
    f = get_file(c, 100, 0);
    assert_int_equal(f->state, DG_SHARED_HASHING);
    assert_int_equal(f->ino, 100);
    assert_string_equal(f->path, "a.txt");
    assert_int_equal(f->size, a->len);
    free(f);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    assert_false(listed(c, a->root));

    /* Hashed. */
    assert_int_equal(dg_piece_cache_shared_done(c, "a.txt", &st, a->root, a->piece_size, a->layer,
                                                a->layer_count),
                     0);
    f = get_file(c, 100, 0);
    assert_int_equal(f->state, DG_SHARED_HASHED);
    assert_memory_equal(f->root, a->root, 32);
    assert_int_equal(f->mtime_ns, 1000ll * 1000000000 + 123);
    assert_int_equal(f->ctime_ns, 1000ll * 1000000000 + 456);
    assert_int_equal(f->dev, 0x801);
    free(f);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.length, a->len);
    assert_int_equal(info.piece_size, a->piece_size);
    assert_int_equal(info.blocks_total, 4);
    assert_int_equal(info.shared_files, 1);
    assert_true(listed(c, a->root));
    assert_int_equal(dg_piece_cache_shared_by_root(c, a->root, collect, l), 0);
    assert_int_equal(l->n, 1);
    assert_int_equal(l->inos[0], 100);
    assert_string_equal(l->paths[0], "a.txt");
    assert_layer(c, a);
    assert_int_equal(dg_piece_cache_shared_get(c, 101, &(struct dg_shared_file){0}), -ENOENT);

    /* Everything survives a reopen. */
    dg_piece_cache_close(c);
    c = open_cache(fx);
    f = get_file(c, 100, 0);
    assert_int_equal(f->state, DG_SHARED_HASHED);
    assert_string_equal(f->path, "a.txt");
    free(f);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.shared_files, 1);
    assert_true(listed(c, a->root));
    assert_layer(c, a);

    /* A second file with the same content. */
    assert_int_equal(share(c, "b/copy", 101, a), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.shared_files, 2);
    l->n = 0;
    assert_int_equal(dg_piece_cache_shared_by_root(c, a->root, collect, l), 0);
    assert_int_equal(l->n, 2);
    assert_true(has_ino(l, 100));
    assert_true(has_ino(l, 101));
    /* The callback's non-zero return stops the walk and is returned. */
    l->n = 0;
    l->stop_after = 1;
    assert_int_equal(dg_piece_cache_shared_by_root(c, a->root, collect, l), 99);
    assert_int_equal(l->n, 1);
    l->stop_after = 0;
    l->n = 0;
    assert_int_equal(dg_piece_cache_shared_each(c, collect, l), 0);
    assert_int_equal(l->n, 2);

    /* Removing one keeps the root; removing both drops it. */
    assert_int_equal(dg_piece_cache_shared_remove(c, 100), 0);
    f = get_file(c, 100, -ENOENT);
    free(f);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.shared_files, 1);
    assert_true(listed(c, a->root));
    assert_int_equal(dg_piece_cache_shared_remove(c, 101), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    assert_false(listed(c, a->root));
    uint8_t *layer = NULL;
    uint64_t count = 0;
    assert_int_equal(dg_piece_cache_layer(c, a->root, &layer, &count), -ENOENT);
    l->n = 0;
    assert_int_equal(dg_piece_cache_shared_by_root(c, a->root, collect, l), 0);
    assert_int_equal(l->n, 0);
    /* Unknown inodes are fine to remove. */
    assert_int_equal(dg_piece_cache_shared_remove(c, 100), 0);
    assert_int_equal(dg_piece_cache_shared_remove(c, 999999), 0);

    /* The drop is durable. */
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    assert_false(listed(c, a->root));
    dg_piece_cache_close(c);
    free(l);
    content_free(a);
}

static void test_shared_new_root(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 5000, 2), *b = content_make(fx->dir, 9000, 3);
    struct dg_piece_cache *c = open_cache(fx);
    struct stat st;
    struct dg_root_info info;
    struct dg_shared_file *f;
    uint8_t *layer;
    uint64_t count;

    assert_int_equal(share(c, "f", 200, a), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);

    /* The file was rewritten: hashed again, with another root. The old root goes. */
    st = make_stat(200, b->len, 2000);
    assert_int_equal(
        dg_piece_cache_shared_done(c, "f", &st, b->root, b->piece_size, b->layer, b->layer_count),
        0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    assert_int_equal(dg_piece_cache_layer(c, a->root, &layer, &count), -ENOENT);
    assert_false(listed(c, a->root));
    assert_int_equal(dg_piece_cache_root_info(c, b->root, &info), 0);
    assert_int_equal(info.length, b->len);
    assert_int_equal(info.shared_files, 1);
    assert_true(listed(c, b->root));
    f = get_file(c, 200, 0);
    assert_memory_equal(f->root, b->root, 32);
    assert_int_equal(f->size, b->len);
    free(f);

    /* Done again with the same root: nothing changes. */
    assert_int_equal(
        dg_piece_cache_shared_done(c, "f", &st, b->root, b->piece_size, b->layer, b->layer_count),
        0);
    assert_int_equal(dg_piece_cache_root_info(c, b->root, &info), 0);
    assert_int_equal(info.shared_files, 1);

    /* Rehashing starts: the file no longer vouches for its old root. */
    st = make_stat(200, b->len, 3000);
    assert_int_equal(dg_piece_cache_shared_begin(c, "f", &st), 0);
    assert_int_equal(dg_piece_cache_root_info(c, b->root, &info), -ENOENT);
    assert_false(listed(c, b->root));

    /* A failed hash. */
    assert_int_equal(dg_piece_cache_shared_failed(c, "f", &st, EACCES), 0);
    f = get_file(c, 200, 0);
    assert_int_equal(f->state, DG_SHARED_FAILED);
    assert_int_equal(f->error, EACCES);
    assert_string_equal(f->path, "f");
    free(f);

    /* Failing a hashed file drops its root as well. */
    assert_int_equal(share(c, "g", 201, a), 0);
    assert_true(listed(c, a->root));
    st = make_stat(201, a->len, 4000);
    assert_int_equal(dg_piece_cache_shared_failed(c, "g", &st, EIO), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    /* Removing a failed record is fine. */
    assert_int_equal(dg_piece_cache_shared_remove(c, 201), 0);
    f = get_file(c, 201, -ENOENT);
    free(f);

    dg_piece_cache_close(c);
    content_free(a);
    content_free(b);
}

static void test_shared_restat(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 100, 4);
    struct dg_piece_cache *c = open_cache(fx);
    struct stat st;
    struct dg_shared_file *f;

    assert_int_equal(share(c, "x", 300, a), 0);

    /* Metadata only: ctime moved, the path changed. */
    st = make_stat(300, a->len, 1000);
    st.st_ctim.tv_sec = 5000;
    assert_int_equal(dg_piece_cache_shared_restat(c, "y/renamed", &st), 0);
    f = get_file(c, 300, 0);
    assert_int_equal(f->state, DG_SHARED_HASHED);
    assert_string_equal(f->path, "y/renamed");
    assert_int_equal(f->ctime_ns, 5000ll * 1000000000 + 456);
    assert_memory_equal(f->root, a->root, 32);
    free(f);
    assert_true(listed(c, a->root));

    /* Bytes may have moved: mtime, size or device differ. The record stays as it was. */
    st = make_stat(300, a->len, 1001);
    assert_int_equal(dg_piece_cache_shared_restat(c, "z", &st), -ESTALE);
    st = make_stat(300, a->len, 1000);
    st.st_mtim.tv_nsec = 124;
    assert_int_equal(dg_piece_cache_shared_restat(c, "z", &st), -ESTALE);
    st = make_stat(300, a->len + 1, 1000);
    assert_int_equal(dg_piece_cache_shared_restat(c, "z", &st), -ESTALE);
    st = make_stat(300, a->len, 1000);
    st.st_dev = 0x802;
    assert_int_equal(dg_piece_cache_shared_restat(c, "z", &st), -ESTALE);
    f = get_file(c, 300, 0);
    assert_string_equal(f->path, "y/renamed");
    assert_int_equal(f->ctime_ns, 5000ll * 1000000000 + 456);
    free(f);

    /* Unknown inode, or a file that is not hashed. */
    st = make_stat(301, a->len, 1000);
    assert_int_equal(dg_piece_cache_shared_restat(c, "z", &st), -ENOENT);
    assert_int_equal(dg_piece_cache_shared_begin(c, "w", &st), 0);
    assert_int_equal(dg_piece_cache_shared_restat(c, "w", &st), -ENOENT);
    assert_int_equal(dg_piece_cache_shared_failed(c, "w", &st, EIO), 0);
    assert_int_equal(dg_piece_cache_shared_restat(c, "w", &st), -ENOENT);

    dg_piece_cache_close(c);
    content_free(a);
}

static void assert_path(struct dg_piece_cache *c, uint64_t ino, const char *want)
{
    struct dg_shared_file *f = get_file(c, ino, 0);

    if (strcmp(f->path, want) != 0)
        fail_msg("inode %llu: path '%s', expected '%s'", (unsigned long long)ino, f->path, want);
    free(f);
}

static void test_shared_rename(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 10, 5);
    struct dg_piece_cache *c = open_cache(fx);

    assert_int_equal(share(c, "p", 400, a), 0);
    assert_int_equal(share(c, "p2", 401, a), 0);
    assert_int_equal(share(c, "d/x", 402, a), 0);
    assert_int_equal(share(c, "d/sub/y", 403, a), 0);
    assert_int_equal(share(c, "dd/x", 404, a), 0);
    assert_int_equal(share(c, "d.txt", 405, a), 0);
    assert_int_equal(share(c, "e/d/x", 406, a), 0);

    /* A file: only that path. */
    assert_int_equal(dg_piece_cache_shared_rename(c, "p", "q"), 0);
    assert_path(c, 400, "q");
    assert_path(c, 401, "p2");

    /* A directory: everything below it, not siblings sharing its prefix. */
    assert_int_equal(dg_piece_cache_shared_rename(c, "d", "z"), 0);
    assert_path(c, 402, "z/x");
    assert_path(c, 403, "z/sub/y");
    assert_path(c, 404, "dd/x");
    assert_path(c, 405, "d.txt");
    assert_path(c, 406, "e/d/x");

    /* A subdirectory, to a shorter and to a deeper place. */
    assert_int_equal(dg_piece_cache_shared_rename(c, "z/sub", "s"), 0);
    assert_path(c, 403, "s/y");
    assert_path(c, 402, "z/x");
    assert_int_equal(dg_piece_cache_shared_rename(c, "s", "very/deep/place/s"), 0);
    assert_path(c, 403, "very/deep/place/s/y");

    /* Renaming something unknown changes nothing. */
    assert_int_equal(dg_piece_cache_shared_rename(c, "nothing", "else"), 0);
    assert_path(c, 400, "q");

    /* The root still has all seven files, and the paths survive a reopen. */
    struct dg_root_info info;
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.shared_files, 7);
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_path(c, 402, "z/x");
    assert_path(c, 403, "very/deep/place/s/y");
    assert_path(c, 404, "dd/x");
    dg_piece_cache_close(c);
    content_free(a);
}

/* Many records renamed to a longer path (values grow): none may be lost. */
static void test_shared_rename_many_longer(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 20000, 6);
    struct dg_piece_cache *c = open_cache(fx);
    struct ino_list *l = calloc(1, sizeof(*l));
    char path[128];
    enum {
        N = 200
    };

    assert_non_null(l);
    for (int i = 0; i < N; i++) {
        snprintf(path, sizeof(path), "d/file-%03d", i);
        assert_int_equal(share(c, path, 1000 + (uint64_t)i * 7919, a), 0);
    }
    assert_int_equal(share(c, "dd/x", 5, a), 0);
    assert_int_equal(share(c, "dx", 6, a), 0);
    assert_int_equal(share(c, "d0", 7, a), 0);

    assert_int_equal(dg_piece_cache_shared_rename(c, "d", "outer/much/longer/name"), 0);
    for (int i = 0; i < N; i++) {
        snprintf(path, sizeof(path), "outer/much/longer/name/file-%03d", i);
        assert_path(c, 1000 + (uint64_t)i * 7919, path);
    }
    assert_path(c, 5, "dd/x");
    assert_path(c, 6, "dx");
    assert_path(c, 7, "d0");
    assert_int_equal(dg_piece_cache_shared_each(c, collect, l), 0);
    assert_int_equal(l->n, N + 3);
    l->n = 0;
    assert_int_equal(dg_piece_cache_shared_by_root(c, a->root, collect, l), 0);
    assert_int_equal(l->n, N + 3);

    /* And back to a shorter one. */
    assert_int_equal(dg_piece_cache_shared_rename(c, "outer/much/longer/name", "n"), 0);
    for (int i = 0; i < N; i++) {
        snprintf(path, sizeof(path), "n/file-%03d", i);
        assert_path(c, 1000 + (uint64_t)i * 7919, path);
    }
    dg_piece_cache_close(c);
    c = open_cache(fx);
    l->n = 0;
    assert_int_equal(dg_piece_cache_shared_each(c, collect, l), 0);
    assert_int_equal(l->n, N + 3);
    for (int i = 0; i < N; i++) {
        snprintf(path, sizeof(path), "n/file-%03d", i);
        assert_path(c, 1000 + (uint64_t)i * 7919, path);
    }
    dg_piece_cache_close(c);
    free(l);
    content_free(a);
}

static int cmp_root(const void *x, const void *y)
{
    return memcmp(x, y, 32);
}

static void test_list_roots_pagination(void **state)
{
    struct fixture *fx = *state;
    struct dg_piece_cache *c = open_cache(fx);
    enum {
        N = 13
    };
    uint8_t want[N][32], got[N + 4][32], page[5 * 32];
    struct content *unheld = content_make(fx->dir, 3 * BLOCK, 99);
    size_t n, total = 0;

    for (int i = 0; i < N; i++) {
        struct content *ct = content_make(fx->dir, 100 + (size_t)i, 1000 + (uint64_t)i);
        char path[32];
        snprintf(path, sizeof(path), "f%d", i);
        assert_int_equal(share(c, path, 10 + (uint64_t)i, ct), 0);
        memcpy(want[i], ct->root, 32);
        content_free(ct);
    }
    qsort(want, N, 32, cmp_root);
    /* Known but not held: never listed. */
    assert_int_equal(
        dg_piece_cache_add_root(c, unheld->root, unheld->len, unheld->layer, unheld->layer_count),
        0);

    /* Pages of 5, then of 1. */
    const uint8_t *after = NULL;
    do {
        assert_int_equal(dg_piece_cache_list_roots(c, after, page, 5, &n), 0);
        assert_true(n <= 5);
        assert_true(total + n <= N);
        memcpy(got[total], page, n * 32);
        total += n;
        after = total ? got[total - 1] : NULL;
    } while (n == 5);
    assert_int_equal(total, N);
    assert_memory_equal(got, want, N * 32);

    total = 0;
    after = NULL;
    for (;;) {
        assert_int_equal(dg_piece_cache_list_roots(c, after, page, 1, &n), 0);
        if (n == 0)
            break;
        assert_int_equal(n, 1);
        assert_true(total < N);
        memcpy(got[total++], page, 32);
        after = got[total - 1];
    }
    assert_int_equal(total, N);
    assert_memory_equal(got, want, N * 32);

    /* `after` need not be a listed root. */
    uint8_t zero[32] = {0}, ones[32];
    memset(ones, 0xff, 32);
    assert_int_equal(dg_piece_cache_list_roots(c, zero, page, 5, &n), 0);
    assert_int_equal(n, 5);
    assert_memory_equal(page, want, 5 * 32);
    assert_int_equal(dg_piece_cache_list_roots(c, ones, page, 5, &n), 0);
    assert_int_equal(n, 0);
    uint8_t mid[32];
    memcpy(mid, want[6], 32);
    /* exactly a listed root: the next one comes first */
    assert_int_equal(dg_piece_cache_list_roots(c, mid, page, 1, &n), 0);
    assert_int_equal(n, 1);
    assert_memory_equal(page, want[7], 32);
    /* max 0 */
    assert_int_equal(dg_piece_cache_list_roots(c, NULL, page, 0, &n), 0);
    assert_int_equal(n, 0);

    dg_piece_cache_close(c);
    content_free(unheld);
}

static void test_add_root(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 20 * BLOCK + 5, 7);
    struct content *big = content_make(fx->dir, 16 * MIB + 1, 8);
    struct content *empty = content_make(fx->dir, 0, 9);
    struct dg_piece_cache *c = open_cache(fx);
    struct dg_root_info info;
    uint8_t *bad = malloc(a->layer_count * 32 + 32);

    assert_non_null(bad);
    /* A wrong layer: a flipped bit anywhere. */
    memcpy(bad, a->layer, a->layer_count * 32);
    bad[32 * 7 + 3] ^= 1;
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, bad, a->layer_count), -EBADMSG);
    /* A wrong count, for this length. */
    memcpy(bad, a->layer, a->layer_count * 32);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, bad, a->layer_count - 1),
                     -EBADMSG);
    memset(bad + a->layer_count * 32, 0, 32);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, bad, a->layer_count + 1),
                     -EBADMSG);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, NULL, 0), -EBADMSG);
    /* Another root. */
    uint8_t other[32];
    memcpy(other, a->root, 32);
    other[0] ^= 0x80;
    assert_int_equal(dg_piece_cache_add_root(c, other, a->len, a->layer, a->layer_count), -EBADMSG);
    /* Nothing was recorded. */
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), -ENOENT);
    assert_int_equal(dg_piece_cache_root_info(c, other, &info), -ENOENT);

    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.length, a->len);
    assert_int_equal(info.piece_size, BLOCK);
    assert_int_equal(info.blocks_total, 21);
    assert_int_equal(info.blocks_cached, 0);
    assert_int_equal(info.shared_files, 0);
    assert_false(listed(c, a->root));
    assert_layer(c, a);
    /* Known already: fine. */
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);

    assert_int_equal(dg_piece_cache_add_root(c, big->root, big->len, big->layer, big->layer_count),
                     0);
    assert_int_equal(dg_piece_cache_root_info(c, big->root, &info), 0);
    assert_int_equal(info.piece_size, 2 * BLOCK);
    assert_int_equal(info.blocks_total, 1025);
    assert_int_equal(big->layer_count, 513);
    assert_layer(c, big);

    /* The empty file: held at once, reads nothing. */
    assert_int_equal(dg_piece_cache_add_root(c, empty->root, 0, empty->layer, empty->layer_count),
                     0);
    assert_int_equal(dg_piece_cache_root_info(c, empty->root, &info), 0);
    assert_int_equal(info.blocks_total, 0);
    assert_true(listed(c, empty->root));
    char byte;
    assert_int_equal(dg_piece_cache_read(c, empty->root, &byte, 1, 0), 0);
    assert_int_equal(dg_piece_cache_put_block(c, empty->root, 0, "", 0), -EINVAL);

    /* Survives a reopen. */
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_int_equal(info.length, a->len);
    assert_layer(c, a);
    assert_layer(c, big);

    dg_piece_cache_close(c);
    free(bad);
    content_free(a);
    content_free(big);
    content_free(empty);
}

/* Content of at most 1024 blocks: 16 KiB pieces, the layer is the leaves. */
static void test_blocks_small(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 5 * BLOCK + 100, 10); /* 6 blocks */
    struct content *one = content_make(fx->dir, 777, 11);           /* 1 block: layer = root */
    struct dg_piece_cache *c = open_cache(fx);
    uint8_t *buf = malloc(a->len + BLOCK);
    uint8_t unknown[32] = {1, 2, 3};

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    assert_not_held(c, a, 0, a->len);
    assert_not_held(c, a, 0, 1);

    /* Rejected blocks store nothing. */
    memcpy(buf, a->data + BLOCK, BLOCK);
    buf[100] ^= 0x40;
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 1, buf, BLOCK), -EBADMSG);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 2, a->data + BLOCK, BLOCK), -EBADMSG);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 0, a->data, BLOCK - 1), -EINVAL);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 0, a->data, BLOCK + 1), -EINVAL);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 5, a->data + 5 * BLOCK, BLOCK),
                     -EINVAL); /* the last block is short */
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 5, a->data + 5 * BLOCK, 99), -EINVAL);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, 6, a->data, 100), -EINVAL);
    assert_int_equal(dg_piece_cache_put_block(c, a->root, UINT64_MAX, a->data, 100), -EINVAL);
    assert_int_equal(dg_piece_cache_put_block(c, unknown, 0, a->data, BLOCK), -ENOENT);
    assert_int_equal(cached(c, a), 0);
    assert_not_held(c, a, BLOCK, 1);

    /* Good blocks, one by one: a range is held only once all its blocks are. */
    assert_int_equal(put_block(c, a, 1), 0);
    assert_reads_back(c, a, BLOCK, BLOCK);
    assert_reads_back(c, a, BLOCK + 10, 20);
    assert_not_held(c, a, BLOCK - 1, 2);
    assert_not_held(c, a, BLOCK, BLOCK + 1);
    assert_int_equal(cached(c, a), 1);
    assert_int_equal(put_block(c, a, 1), 0); /* again: no change */
    assert_int_equal(cached(c, a), 1);
    assert_int_equal(put_block(c, a, 5), 0); /* the short last block */
    assert_reads_back(c, a, 5 * BLOCK, 100);
    assert_reads_back(c, a, 5 * BLOCK + 50, 4096); /* short read at the end */
    assert_false(listed(c, a->root));
    assert_int_equal(put_block(c, a, 0), 0);
    assert_int_equal(put_block(c, a, 2), 0);
    assert_int_equal(put_block(c, a, 3), 0);
    assert_not_held(c, a, 0, a->len);
    assert_int_equal(put_block(c, a, 4), 0);
    assert_int_equal(cached(c, a), 6);
    assert_reads_back(c, a, 0, a->len);
    assert_reads_back(c, a, 0, a->len + 1000);
    assert_reads_back(c, a, 3 * BLOCK - 7, BLOCK + 14);
    assert_true(listed(c, a->root));
    /* At and past the end. */
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, 10, a->len), 0);
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, 10, a->len + 5 * BLOCK), 0);
    assert_int_equal(dg_piece_cache_read(c, unknown, buf, 10, 0), -ENOENT);
    assert_int_equal(dg_piece_cache_has_range(c, unknown, 0, 10), 0);

    /* Flushed, closed, reopened: still held, byte for byte. */
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(cached(c, a), 6);
    assert_int_equal(dg_piece_cache_flush(c), 0); /* nothing to do */
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(cached(c, a), 6);
    assert_reads_back(c, a, 0, a->len);
    assert_true(listed(c, a->root));

    /* A one-block file verifies against its root. */
    assert_int_equal(dg_piece_cache_add_root(c, one->root, one->len, one->layer, one->layer_count),
                     0);
    assert_memory_equal(one->layer, one->root, 32);
    memcpy(buf, one->data, one->len);
    buf[0] ^= 1;
    assert_int_equal(dg_piece_cache_put_block(c, one->root, 0, buf, one->len), -EBADMSG);
    assert_not_held(c, one, 0, one->len);
    assert_int_equal(put_block(c, one, 0), 0);
    assert_reads_back(c, one, 0, one->len);
    assert_true(listed(c, one->root));

    /* Blocks not flushed are committed at close. */
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_reads_back(c, one, 0, one->len);
    assert_int_equal(cached(c, one), 1);

    dg_piece_cache_close(c);
    free(buf);
    content_free(a);
    content_free(one);
}

/* A range whose end overflows 64 bits is not "held" when nothing is. */
static void test_has_range_overflow(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 5 * BLOCK + 100, 12);
    struct dg_piece_cache *c = open_cache(fx);

    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    int whole = dg_piece_cache_has_range(c, a->root, 0, a->len);
    int to_max = dg_piece_cache_has_range(c, a->root, 0, UINT64_MAX);
    int wrap1 = dg_piece_cache_has_range(c, a->root, BLOCK, UINT64_MAX);
    int wrap2 = dg_piece_cache_has_range(c, a->root, 2 * BLOCK, UINT64_MAX - BLOCK);
    dg_piece_cache_close(c);
    content_free(a);
    assert_int_equal(whole, 0);
    assert_int_equal(to_max, 0);
    assert_int_equal(wrap1, 0);
    assert_int_equal(wrap2, 0);
}

/* Content over 1024 blocks: 32 KiB pieces, blocks need the leaves of their piece first. */
static void test_blocks_large(void **state)
{
    struct fixture *fx = *state;
    struct content *big = content_make(fx->dir, 16 * MIB + 1, 13); /* 1025 blocks, 513 pieces */
    struct dg_piece_cache *c = open_cache(fx);
    uint8_t unknown[32] = {9};
    uint64_t n;
    uint8_t *leaves;

    assert_int_equal(big->piece_size, 2 * BLOCK);
    assert_int_equal(dg_piece_cache_add_root(c, big->root, big->len, big->layer, big->layer_count),
                     0);
    assert_int_equal(put_block(c, big, 0), -ENODATA);
    assert_int_equal(put_block(c, big, 1024), -ENODATA);

    /* Leaves are checked against the piece layer. */
    leaves = piece_leaves(big, 0, &n);
    assert_int_equal(n, 2);
    leaves[40] ^= 1;
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 0, leaves, 2), -EBADMSG);
    leaves[40] ^= 1;
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 1, leaves, 2), -EBADMSG);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 0, leaves, 1), -EINVAL);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 0, leaves, 0), -EINVAL);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 513, leaves, 2), -EINVAL);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, UINT64_MAX, leaves, 2), -EINVAL);
    assert_int_equal(dg_piece_cache_put_leaves(c, unknown, 0, leaves, 2), -ENOENT);
    assert_int_equal(put_block(c, big, 0), -ENODATA);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 0, leaves, 2), 0);
    free(leaves);
    /* The last piece has one block. */
    leaves = piece_leaves(big, 512, &n);
    assert_int_equal(n, 1);
    uint8_t two[64];
    memcpy(two, leaves, 32);
    memset(two + 32, 0, 32);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 512, two, 2), -EINVAL);
    assert_int_equal(dg_piece_cache_put_leaves(c, big->root, 512, leaves, 1), 0);
    free(leaves);

    /* Blocks of pieces with leaves verify; others still wait. */
    uint8_t *bad = malloc(BLOCK);
    assert_non_null(bad);
    memcpy(bad, big->data, BLOCK);
    bad[BLOCK - 1] ^= 0x80;
    assert_int_equal(dg_piece_cache_put_block(c, big->root, 0, bad, BLOCK), -EBADMSG);
    assert_int_equal(put_block(c, big, 0), 0);
    assert_not_held(c, big, 0, 2 * BLOCK);
    assert_int_equal(put_block(c, big, 1), 0);
    assert_reads_back(c, big, 0, 2 * BLOCK);
    assert_int_equal(put_block(c, big, 2), -ENODATA);
    assert_int_equal(put_block(c, big, 1024), 0);
    assert_reads_back(c, big, 1024 * BLOCK, 1);
    assert_reads_back(c, big, 1024 * BLOCK, 100);
    assert_int_equal(cached(c, big), 3);
    assert_not_held(c, big, 0, big->len);
    assert_false(listed(c, big->root));

    /* The rest, with a flush half way. */
    for (uint64_t p = 1; p < 512; p++) {
        assert_int_equal(put_leaves(c, big, p), 0);
        assert_int_equal(put_block(c, big, 2 * p), 0);
        assert_int_equal(put_block(c, big, 2 * p + 1), 0);
        if (p == 200)
            assert_int_equal(dg_piece_cache_flush(c), 0);
    }
    assert_int_equal(cached(c, big), 1025);
    assert_true(listed(c, big->root));
    assert_reads_back(c, big, 0, big->len);

    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(cached(c, big), 1025);
    assert_true(listed(c, big->root));
    assert_reads_back(c, big, 0, big->len);
    assert_reads_back(c, big, 7 * MIB + 3, MIB);
    dg_piece_cache_close(c);
    free(bad);
    content_free(big);
}

/* A root dropped with its last shared file loses its leaves too: re-added, its blocks wait for
 * leaves again. */
static void test_drop_forgets_leaves(void **state)
{
    struct fixture *fx = *state;
    struct content *big = content_make(fx->dir, 16 * MIB + 1, 14);
    struct dg_piece_cache *c = open_cache(fx);
    struct dg_root_info info;

    assert_int_equal(dg_piece_cache_add_root(c, big->root, big->len, big->layer, big->layer_count),
                     0);
    for (uint64_t p = 0; p < 40; p++)
        assert_int_equal(put_leaves(c, big, p), 0);
    assert_int_equal(share(c, "big", 77, big), 0);
    assert_int_equal(dg_piece_cache_root_info(c, big->root, &info), 0);
    assert_int_equal(info.shared_files, 1);
    assert_int_equal(dg_piece_cache_shared_remove(c, 77), 0);
    assert_int_equal(dg_piece_cache_root_info(c, big->root, &info), -ENOENT);

    assert_int_equal(dg_piece_cache_add_root(c, big->root, big->len, big->layer, big->layer_count),
                     0);
    for (uint64_t p = 0; p < 40; p++)
        assert_int_equal(put_block(c, big, 2 * p), -ENODATA);
    assert_int_equal(put_leaves(c, big, 3), 0);
    assert_int_equal(put_block(c, big, 6), 0);

    /* A root with blocks stays when its shared file goes. */
    assert_int_equal(share(c, "big", 78, big), 0);
    assert_int_equal(dg_piece_cache_shared_remove(c, 78), 0);
    assert_int_equal(dg_piece_cache_root_info(c, big->root, &info), 0);
    assert_int_equal(info.blocks_cached, 1);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(share(c, "big", 79, big), 0);
    assert_int_equal(dg_piece_cache_shared_remove(c, 79), 0);
    assert_int_equal(dg_piece_cache_root_info(c, big->root, &info), 0);
    assert_int_equal(info.blocks_cached, 1);
    assert_reads_back(c, big, 6 * BLOCK, BLOCK);

    dg_piece_cache_close(c);
    content_free(big);
}

/* kill -9 after a flush and more unflushed blocks: what was flushed is held, nothing else is
 * claimed, and everything claimed reads back exactly. */
static void test_crash_safety(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 40 * BLOCK + 1234, 15); /* 41 blocks */
    struct dg_piece_cache *c;
    pid_t pid;
    int status;

    c = open_cache(fx);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    dg_piece_cache_close(c);

    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct dg_piece_cache *cc = NULL;
        int bad = 0;
        if (dg_piece_cache_open(fx->index, fx->blocks, &cc) < 0)
            _exit(10);
        for (uint64_t b = 0; b < 10; b++)
            bad |= put_block(cc, a, b) != 0;
        bad |= dg_piece_cache_flush(cc) != 0;
        for (uint64_t b = 10; b < 25; b++)
            bad |= put_block(cc, a, b) != 0;
        bad |= put_block(cc, a, 40) != 0;
        /* Dies without flushing or closing, as with kill -9. */
        _exit(bad ? 11 : 0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);

    c = open_cache(fx);
    assert_int_equal(cached(c, a), 10);
    assert_reads_back(c, a, 0, 10 * BLOCK);
    for (uint64_t b = 10; b < 41; b++)
        assert_int_equal(dg_piece_cache_has_range(c, a->root, b * BLOCK, 1), 0);
    for (uint64_t b = 0; b < 41; b++) {
        if (dg_piece_cache_has_range(c, a->root, b * BLOCK, content_block_len(a, b)))
            assert_reads_back(c, a, b * BLOCK, content_block_len(a, b));
    }
    assert_false(listed(c, a->root));
    /* The missing blocks can be stored now, and then all is held. */
    for (uint64_t b = 10; b < 41; b++)
        assert_int_equal(put_block(c, a, b), 0);
    assert_reads_back(c, a, 0, a->len);
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(cached(c, a), 41);
    assert_reads_back(c, a, 0, a->len);
    dg_piece_cache_close(c);

    /* The same with a child killed by SIGKILL while it has pending blocks. */
    struct content *b2 = content_make(fx->dir, 8 * BLOCK, 16);
    int pipefd[2];
    char ready;
    c = open_cache(fx);
    assert_int_equal(dg_piece_cache_add_root(c, b2->root, b2->len, b2->layer, b2->layer_count), 0);
    dg_piece_cache_close(c);
    assert_int_equal(pipe(pipefd), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct dg_piece_cache *cc = NULL;
        close(pipefd[0]);
        if (dg_piece_cache_open(fx->index, fx->blocks, &cc) < 0)
            _exit(10);
        for (uint64_t b = 0; b < 4; b++)
            if (put_block(cc, b2, b) != 0)
                _exit(11);
        if (dg_piece_cache_flush(cc) != 0)
            _exit(12);
        for (uint64_t b = 4; b < 8; b++)
            if (put_block(cc, b2, b) != 0)
                _exit(13);
        if (write(pipefd[1], "r", 1) != 1)
            _exit(14);
        for (;;)
            pause();
    }
    close(pipefd[1]);
    assert_int_equal(read(pipefd[0], &ready, 1), 1);
    close(pipefd[0]);
    kill(pid, SIGKILL);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    c = open_cache(fx);
    assert_int_equal(cached(c, b2), 4);
    assert_reads_back(c, b2, 0, 4 * BLOCK);
    for (uint64_t b = 4; b < 8; b++)
        assert_int_equal(dg_piece_cache_has_range(c, b2->root, b * BLOCK, 1), 0);
    dg_piece_cache_close(c);

    content_free(a);
    content_free(b2);
}

static void block_file(const struct fixture *fx, const uint8_t root[32], char *out, size_t size)
{
    char hex[DG_ROOT_HEX_LEN + 1];

    dg_root_format(root, hex);
    snprintf(out, size, "%s/%.2s/%s", fx->blocks, hex, hex);
}

/* Block storage lost bytes behind the cache's back: -EIO, then the blocks are forgotten and can
 * be fetched again. */
static void test_lost_storage(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 6 * BLOCK, 17);
    struct content *b = content_make(fx->dir, 6 * BLOCK, 18);
    struct dg_piece_cache *c = open_cache(fx);
    uint8_t *buf = malloc(a->len);
    char path[256];

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    assert_int_equal(dg_piece_cache_add_root(c, b->root, b->len, b->layer, b->layer_count), 0);
    for (uint64_t i = 0; i < 6; i++) {
        assert_int_equal(put_block(c, a, i), 0);
        assert_int_equal(put_block(c, b, i), 0);
    }
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_reads_back(c, a, 0, a->len);
    assert_true(listed(c, a->root));

    /* Deleted. */
    block_file(fx, a->root, path, sizeof(path));
    assert_int_equal(unlink(path), 0);
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, BLOCK, 0), -EIO);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(dg_piece_cache_has_range(c, a->root, 0, 1), 0);
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, BLOCK, 0), -EAGAIN);
    assert_int_equal(cached(c, a), 0);
    assert_false(listed(c, a->root));
    /* The other root is untouched. */
    assert_reads_back(c, b, 0, b->len);

    /* Truncated: the blocks past the cut are lost. */
    block_file(fx, b->root, path, sizeof(path));
    assert_int_equal(truncate(path, 2 * BLOCK), 0);
    assert_int_equal(dg_piece_cache_read(c, b->root, buf, BLOCK, 4 * BLOCK), -EIO);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(cached(c, b), 0);
    assert_int_equal(dg_piece_cache_has_range(c, b->root, 4 * BLOCK, 1), 0);

    /* Fetched again. */
    for (uint64_t i = 0; i < 6; i++)
        assert_int_equal(put_block(c, a, i), 0);
    assert_reads_back(c, a, 0, a->len);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    dg_piece_cache_close(c);
    c = open_cache(fx);
    assert_int_equal(cached(c, a), 6);
    assert_reads_back(c, a, 0, a->len);
    dg_piece_cache_close(c);
    free(buf);
    content_free(a);
    content_free(b);
}

/* A verified block handed in after storage lost its file, but before the loss was flushed, is
 * stored (put_block said 0): it must not be dropped with the lost ones. */
static void test_put_after_loss(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 4 * BLOCK, 20);
    struct dg_piece_cache *c = open_cache(fx);
    uint8_t *buf = malloc(BLOCK);
    char path[256];

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    for (uint64_t i = 0; i < 4; i++)
        assert_int_equal(put_block(c, a, i), 0);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    block_file(fx, a->root, path, sizeof(path));
    assert_int_equal(unlink(path), 0);
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, BLOCK, 0), -EIO);

    /* Fetched again at once, before the next flush. */
    assert_int_equal(put_block(c, a, 0), 0);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    int held = dg_piece_cache_has_range(c, a->root, 0, BLOCK);
    ssize_t n = dg_piece_cache_read(c, a->root, buf, BLOCK, 0);
    int same = n == BLOCK && memcmp(buf, a->data, BLOCK) == 0;
    /* Whatever is claimed must read back exactly. */
    int claimed_ok = !held || same;
    dg_piece_cache_close(c);
    free(buf);
    content_free(a);
    assert_true(claimed_ok);
    assert_int_equal(held, 1);
    assert_true(same);
}

/* The user removes the whole block directory (it is a cache): reads of what it held fail
 * and are forgotten, and new blocks are stored again. */
static void test_block_dir_removed(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 3 * BLOCK, 21);
    struct dg_piece_cache *c = open_cache(fx);
    uint8_t *buf = malloc(a->len);

    assert_non_null(buf);
    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    for (uint64_t i = 0; i < 3; i++)
        assert_int_equal(put_block(c, a, i), 0);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    tmpdir_remove(fx->blocks);
    assert_int_equal(dg_piece_cache_read(c, a->root, buf, BLOCK, 0), -EIO);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(dg_piece_cache_has_range(c, a->root, 0, a->len), 0);
    for (uint64_t i = 0; i < 3; i++)
        assert_int_equal(put_block(c, a, i), 0);
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_reads_back(c, a, 0, a->len);
    dg_piece_cache_close(c);
    free(buf);
    content_free(a);
}

static void test_touch_and_access_time(void **state)
{
    struct fixture *fx = *state;
    struct content *a = content_make(fx->dir, 2 * BLOCK, 19);
    struct dg_piece_cache *c = open_cache(fx);
    struct dg_root_info info;
    uint8_t unknown[32] = {7};

    assert_int_equal(dg_piece_cache_add_root(c, a->root, a->len, a->layer, a->layer_count), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_true(info.last_access > 0);
    int64_t before = info.last_access;
    dg_piece_cache_touch(c, a->root);
    dg_piece_cache_touch(c, unknown); /* unknown roots are ignored at flush */
    assert_int_equal(dg_piece_cache_flush(c), 0);
    assert_int_equal(dg_piece_cache_root_info(c, a->root, &info), 0);
    assert_true(info.last_access >= before);
    assert_int_equal(dg_piece_cache_root_info(c, unknown, &info), -ENOENT);
    dg_piece_cache_close(c);
    content_free(a);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_open_creates_dirs),     T(test_shared_lifecycle),
        T(test_shared_new_root),       T(test_shared_restat),
        T(test_shared_rename),         T(test_shared_rename_many_longer),
        T(test_list_roots_pagination), T(test_add_root),
        T(test_blocks_small),          T(test_has_range_overflow),
        T(test_blocks_large),          T(test_drop_forgets_leaves),
        T(test_crash_safety),          T(test_lost_storage),
        T(test_put_after_loss),        T(test_block_dir_removed),
        T(test_touch_and_access_time),
    };
#undef T

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests_name("piece_cache", tests, NULL, NULL);
}
