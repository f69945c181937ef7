/* The piece cache: LMDB index of roots and shared files, and verified block storage.
 * See piece_cache.h for the layout and the durability rules. */
#include "engine/piece_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine/fsutil.h"
#include "engine/log.h"
#include "engine/merkle.h"
#include "engine/record.h"
#include "engine/root_name.h"

#define MAP_SIZE (64ull << 30) /* address space only: the file grows with use */
#define HAVE_CHUNK_BITS 32768u /* blocks per `have` record (512 MiB of content) */
#define HAVE_CHUNK_BYTES (HAVE_CHUNK_BITS / 8)
#define PENDING_BITS_MAX (1ull << 30) /* blocks a pending bitmap covers (16 TiB) */

/* Verified blocks written to block storage whose bits are not committed yet. */
struct pending_root {
    uint8_t root[32];
    uint64_t *blocks;
    size_t count, cap;
    uint8_t *bits; /* the same blocks as a bitmap, for lookups (NULL: look in the list) */
    uint64_t bits_len;
    int no_bits; /* the bitmap was given up */
    int fd;      /* write descriptor of the block file, closed at flush */
    struct pending_root *next;
};

/* Last-access times and lost roots waiting for the next flush. */
struct touched_root {
    uint8_t root[32];
    int64_t when;
    int lost; /* block storage lost bytes: forget every block of this root */
    struct touched_root *next;
};

struct dg_piece_cache {
    MDB_env *env;
    MDB_dbi roots, layers, leaves, have, files, root_files;
    char *block_dir;
    pthread_mutex_t lock; /* guards pending and touched */
    struct pending_root *pending;
    struct touched_root *touched;
    int64_t (*clock)(void *arg); /* unix seconds; injectable for tests */
    void *clock_arg;
    MDB_txn *batch; /* open write batch: writer functions nest their transactions in it */
    unsigned batch_ops;
    /* Bytes in block storage, kept by the writer once an eviction has counted them, so that
     * eviction scans the roots only when the limit is exceeded. */
    uint64_t stored;
    int stored_known;
};

static int map_mdb_error(int rc)
{
    if (rc == 0)
        return 0;
    if (rc == MDB_NOTFOUND)
        return -ENOENT;
    if (rc == MDB_MAP_FULL || rc == MDB_TXN_FULL)
        return -ENOSPC;
    if (rc > 0 && rc < MDB_KEYEXIST)
        return -rc; /* a system errno */
    dg_log(DG_LOG_ERROR, "cache", "lmdb: %s", mdb_strerror(rc));
    return -EIO;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static int64_t system_seconds(void *arg)
{
    (void)arg;
    return (int64_t)time(NULL);
}

int dg_piece_cache_open(const char *index_dir, const char *block_dir, struct dg_piece_cache **out)
{
    struct dg_piece_cache *c;
    MDB_txn *txn = NULL;
    int rc;

    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    pthread_mutex_init(&c->lock, NULL);
    c->clock = system_seconds;
    c->block_dir = strdup(block_dir);
    if (!c->block_dir) {
        rc = -ENOMEM;
        goto fail;
    }
    if ((rc = dg_mkdir_p(index_dir)) < 0 || (rc = dg_mkdir_p(block_dir)) < 0)
        goto fail;
    if ((rc = map_mdb_error(mdb_env_create(&c->env))) < 0)
        goto fail;
    mdb_env_set_maxdbs(c->env, 8);
    mdb_env_set_mapsize(c->env, MAP_SIZE);
    rc = map_mdb_error(mdb_env_open(c->env, index_dir, MDB_NOTLS, 0600));
    if (rc < 0)
        goto fail;
    if ((rc = map_mdb_error(mdb_txn_begin(c->env, NULL, 0, &txn))) < 0)
        goto fail;
    struct {
        const char *name;
        MDB_dbi *dbi;
    } dbs[] = {
        {"roots", &c->roots}, {"layers", &c->layers}, {"leaves", &c->leaves},
        {"have", &c->have},   {"files", &c->files},   {"root_files", &c->root_files},
    };
    for (size_t i = 0; i < sizeof(dbs) / sizeof(dbs[0]); i++) {
        rc = map_mdb_error(mdb_dbi_open(txn, dbs[i].name, MDB_CREATE, dbs[i].dbi));
        if (rc < 0) {
            mdb_txn_abort(txn);
            goto fail;
        }
    }
    if ((rc = map_mdb_error(mdb_txn_commit(txn))) < 0)
        goto fail;
    *out = c;
    return 0;

fail:
    if (c->env)
        mdb_env_close(c->env);
    free(c->block_dir);
    pthread_mutex_destroy(&c->lock);
    free(c);
    return rc;
}

void dg_piece_cache_close(struct dg_piece_cache *c)
{
    if (!c)
        return;
    dg_piece_cache_batch_commit(c);
    dg_piece_cache_flush(c);
    mdb_env_close(c->env);
    free(c->block_dir);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

/* --- small helpers over transactions --- */

static int read_txn(struct dg_piece_cache *c, MDB_txn **txn)
{
    return map_mdb_error(mdb_txn_begin(c->env, NULL, MDB_RDONLY, txn));
}

/* A transaction to read what the writer thread sees: a child of the open batch (aborted after
 * use, so it changes nothing), or a plain read snapshot. Writer thread only. */
static int writer_view_txn(struct dg_piece_cache *c, MDB_txn **txn)
{
    if (c->batch)
        return map_mdb_error(mdb_txn_begin(c->env, c->batch, 0, txn));
    return read_txn(c, txn);
}

/* A write transaction: a child of the open batch (committed with it) or a top-level one. */
static int write_txn(struct dg_piece_cache *c, MDB_txn **txn)
{
    if (c->batch)
        c->batch_ops++;
    return map_mdb_error(mdb_txn_begin(c->env, c->batch, 0, txn));
}

static int commit(MDB_txn *txn)
{
    return map_mdb_error(mdb_txn_commit(txn));
}

static int get_root(MDB_txn *txn, struct dg_piece_cache *c, const uint8_t root[32],
                    struct dg_root_record *rec)
{
    MDB_val key = {32, (void *)root}, val;
    int rc = map_mdb_error(mdb_get(txn, c->roots, &key, &val));

    if (rc < 0)
        return rc;
    return dg_root_record_decode(val.mv_data, val.mv_size, rec);
}

static int put_root(MDB_txn *txn, struct dg_piece_cache *c, const uint8_t root[32],
                    const struct dg_root_record *rec)
{
    uint8_t buf[DG_ROOT_RECORD_SIZE];
    MDB_val key = {32, (void *)root}, val = {sizeof(buf), buf};

    dg_root_record_encode(rec, buf);
    return map_mdb_error(mdb_put(txn, c->roots, &key, &val, 0));
}

static int get_file(MDB_txn *txn, struct dg_piece_cache *c, uint64_t ino, struct dg_shared_file *f)
{
    uint8_t k[8];
    MDB_val key = {8, k}, val;
    int rc;

    put_be64(k, ino);
    rc = map_mdb_error(mdb_get(txn, c->files, &key, &val));
    if (rc < 0)
        return rc;
    rc = dg_file_record_decode(val.mv_data, val.mv_size, f);
    if (rc == 0)
        f->ino = ino;
    return rc;
}

static int put_file(MDB_txn *txn, struct dg_piece_cache *c, const struct dg_shared_file *f)
{
    uint8_t k[8];
    uint8_t buf[DG_FILE_RECORD_MAX];
    size_t len = dg_file_record_encode(f, buf, sizeof(buf));
    MDB_val key = {8, k}, val = {len, buf};

    if (len == 0)
        return -ENAMETOOLONG;
    put_be64(k, f->ino);
    return map_mdb_error(mdb_put(txn, c->files, &key, &val, 0));
}

static void link_key(uint8_t k[40], const uint8_t root[32], uint64_t ino)
{
    memcpy(k, root, 32);
    put_be64(k + 32, ino);
}

/* Whether any entry of @p dbi starts with the 32-byte @p root. */
static int has_prefix(MDB_txn *txn, MDB_dbi dbi, const uint8_t root[32])
{
    MDB_cursor *cur;
    MDB_val key = {32, (void *)root}, val;
    int found = 0;

    if (mdb_cursor_open(txn, dbi, &cur) != 0)
        return 0;
    if (mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE) == 0)
        found = key.mv_size >= 32 && memcmp(key.mv_data, root, 32) == 0;
    mdb_cursor_close(cur);
    return found;
}

/* Deletes every entry of @p dbi whose key starts with the 32-byte @p root. */
static int delete_prefix(MDB_txn *txn, MDB_dbi dbi, const uint8_t root[32])
{
    MDB_cursor *cur;
    MDB_val key = {32, (void *)root}, val;
    int rc;

    if ((rc = map_mdb_error(mdb_cursor_open(txn, dbi, &cur))) < 0)
        return rc;
    rc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE);
    while (rc == 0 && key.mv_size >= 32 && memcmp(key.mv_data, root, 32) == 0) {
        if ((rc = mdb_cursor_del(cur, 0)) != 0)
            break;
        rc = mdb_cursor_get(cur, &key, &val, MDB_GET_CURRENT);
        if (rc == EINVAL || rc == MDB_NOTFOUND) /* deleted the last entry */
            break;
    }
    mdb_cursor_close(cur);
    return (rc == 0 || rc == MDB_NOTFOUND || rc == EINVAL) ? 0 : map_mdb_error(rc);
}

static uint64_t pending_count(struct dg_piece_cache *c, const uint8_t root[32])
{
    uint64_t n = 0;

    pthread_mutex_lock(&c->lock);
    for (struct pending_root *p = c->pending; p; p = p->next)
        if (memcmp(p->root, root, 32) == 0)
            n = p->count;
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* Drops @p root from the index when nothing holds it any more: no shared file, no block in
 * storage (committed or pending), not pinned. */
static int drop_root_if_unheld(struct dg_piece_cache *c, MDB_txn *txn, const uint8_t root[32])
{
    struct dg_root_record rec;
    MDB_val key = {32, (void *)root};
    int rc;

    if (has_prefix(txn, c->root_files, root))
        return 0;
    rc = get_root(txn, c, root, &rec);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    if (rec.blocks_cached > 0 || (rec.flags & DG_ROOT_PINNED) || pending_count(c, root) > 0)
        return 0;
    if ((rc = map_mdb_error(mdb_del(txn, c->roots, &key, NULL))) < 0)
        return rc;
    rc = mdb_del(txn, c->layers, &key, NULL);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return map_mdb_error(rc);
    if ((rc = delete_prefix(txn, c->leaves, root)) < 0)
        return rc;
    return delete_prefix(txn, c->have, root);
}

static int unlink_root(struct dg_piece_cache *c, MDB_txn *txn, const uint8_t root[32], uint64_t ino)
{
    uint8_t k[40];
    MDB_val key = {40, k};
    int rc;

    link_key(k, root, ino);
    rc = mdb_del(txn, c->root_files, &key, NULL);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return map_mdb_error(rc);
    return drop_root_if_unheld(c, txn, root);
}

/* --- queries --- */

int dg_piece_cache_root_info(struct dg_piece_cache *c, const uint8_t root[32],
                             struct dg_root_info *out)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key = {32, (void *)root}, val;
    uint32_t nfiles = 0;
    int rc;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    rc = get_root(txn, c, root, &rec);
    if (rc == 0 && mdb_cursor_open(txn, c->root_files, &cur) == 0) {
        int mrc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE);
        while (mrc == 0 && key.mv_size == 40 && memcmp(key.mv_data, root, 32) == 0) {
            nfiles++;
            mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT);
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    if (rc < 0)
        return rc;
    memset(out, 0, sizeof(*out));
    out->length = rec.length;
    out->piece_size = rec.piece_size;
    out->blocks_total = dg_merkle_block_count(rec.length);
    out->blocks_cached = rec.blocks_cached + pending_count(c, root);
    if (out->blocks_cached > out->blocks_total)
        out->blocks_cached = out->blocks_total;
    out->shared_files = nfiles;
    out->flags = rec.flags;
    out->last_access = rec.last_access;
    return 0;
}

int dg_piece_cache_list_roots(struct dg_piece_cache *c, const uint8_t *after, uint8_t *roots,
                              size_t max, size_t *n)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key, val;
    MDB_cursor_op op = MDB_FIRST;
    int rc, mrc;

    *n = 0;
    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->roots, &cur))) < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if (after) {
        key.mv_size = 32;
        key.mv_data = (void *)after;
        op = MDB_SET_RANGE;
    }
    for (mrc = mdb_cursor_get(cur, &key, &val, op); mrc == 0 && *n < max;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        struct dg_root_record rec;
        if (key.mv_size != 32)
            continue;
        if (after && memcmp(key.mv_data, after, 32) <= 0)
            continue;
        if (dg_root_record_decode(val.mv_data, val.mv_size, &rec) < 0)
            continue;
        int held = has_prefix(txn, c->root_files, key.mv_data);
        if (!held) {
            uint64_t total = dg_merkle_block_count(rec.length);
            held = rec.blocks_cached + pending_count(c, key.mv_data) >= total;
        }
        if (held)
            memcpy(roots + 32 * (*n)++, key.mv_data, 32);
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return 0;
}

int dg_piece_cache_shared_get(struct dg_piece_cache *c, uint64_t ino, struct dg_shared_file *out)
{
    MDB_txn *txn;
    int rc;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    rc = get_file(txn, c, ino, out);
    mdb_txn_abort(txn);
    return rc;
}

int dg_piece_cache_shared_by_root(struct dg_piece_cache *c, const uint8_t root[32],
                                  int (*fn)(void *arg, const struct dg_shared_file *f), void *arg)
{
    struct dg_shared_file *f;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key = {32, (void *)root}, val;
    int rc, mrc;

    f = malloc(sizeof(*f));
    if (!f)
        return -ENOMEM;
    if ((rc = read_txn(c, &txn)) < 0) {
        free(f);
        return rc;
    }
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->root_files, &cur))) < 0)
        goto out;
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE);
         mrc == 0 && key.mv_size == 40 && memcmp(key.mv_data, root, 32) == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        uint64_t ino = get_be64((const uint8_t *)key.mv_data + 32);
        if (get_file(txn, c, ino, f) < 0)
            continue;
        if ((rc = fn(arg, f)) != 0)
            break;
    }
    mdb_cursor_close(cur);
out:
    mdb_txn_abort(txn);
    free(f);
    return rc;
}

int dg_piece_cache_shared_each(struct dg_piece_cache *c,
                               int (*fn)(void *arg, const struct dg_shared_file *f), void *arg)
{
    struct dg_shared_file *f;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key, val;
    int rc, mrc;

    f = malloc(sizeof(*f));
    if (!f)
        return -ENOMEM;
    if ((rc = read_txn(c, &txn)) < 0) {
        free(f);
        return rc;
    }
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->files, &cur))) < 0)
        goto out;
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        if (key.mv_size != 8 || dg_file_record_decode(val.mv_data, val.mv_size, f) < 0)
            continue;
        f->ino = get_be64(key.mv_data);
        if ((rc = fn(arg, f)) != 0)
            break;
    }
    mdb_cursor_close(cur);
out:
    mdb_txn_abort(txn);
    free(f);
    return rc;
}

static int get_layer(MDB_txn *txn, struct dg_piece_cache *c, const uint8_t root[32], MDB_val *val)
{
    MDB_val key = {32, (void *)root};
    int rc = map_mdb_error(mdb_get(txn, c->layers, &key, val));

    if (rc == 0 && (val->mv_size == 0 || val->mv_size % 32 != 0))
        return -EIO;
    return rc;
}

int dg_piece_cache_layer(struct dg_piece_cache *c, const uint8_t root[32], uint8_t **layer,
                         uint64_t *count)
{
    MDB_txn *txn;
    MDB_val val;
    int rc;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    rc = get_layer(txn, c, root, &val);
    if (rc == 0) {
        *layer = malloc(val.mv_size);
        if (*layer) {
            memcpy(*layer, val.mv_data, val.mv_size);
            *count = val.mv_size / 32;
        } else {
            rc = -ENOMEM;
        }
    }
    mdb_txn_abort(txn);
    return rc;
}

static int pending_has(struct dg_piece_cache *c, const uint8_t root[32], uint64_t block)
{
    int found = 0;

    pthread_mutex_lock(&c->lock);
    for (struct pending_root *p = c->pending; p && !found; p = p->next) {
        if (memcmp(p->root, root, 32) != 0)
            continue;
        if (p->bits)
            found = block / 8 < p->bits_len && (p->bits[block / 8] >> (block % 8) & 1);
        else
            for (size_t i = 0; i < p->count && !found; i++)
                found = p->blocks[i] == block;
    }
    pthread_mutex_unlock(&c->lock);
    return found;
}

/* Whether every block in [first, last] of @p root is committed or pending. */
static int blocks_held(struct dg_piece_cache *c, MDB_txn *txn, const uint8_t root[32],
                       uint64_t first, uint64_t last)
{
    uint8_t k[40];
    MDB_val key = {40, k}, val = {0, NULL};
    uint64_t loaded_chunk = UINT64_MAX;

    for (uint64_t b = first; b <= last; b++) {
        uint64_t chunk = b / HAVE_CHUNK_BITS, bit = b % HAVE_CHUNK_BITS;
        if (chunk != loaded_chunk) {
            link_key(k, root, chunk);
            if (mdb_get(txn, c->have, &key, &val) != 0)
                val.mv_size = 0;
            loaded_chunk = chunk;
        }
        int have = val.mv_size == HAVE_CHUNK_BYTES &&
                   (((const uint8_t *)val.mv_data)[bit / 8] >> (bit % 8) & 1);
        if (!have && !pending_has(c, root, b))
            return 0;
    }
    return 1;
}

int dg_piece_cache_held_bits(struct dg_piece_cache *c, const uint8_t root[32], uint8_t *bits,
                             uint64_t nblocks)
{
    struct dg_root_record rec;
    uint8_t k[40];
    MDB_val key = {40, k}, val;
    MDB_txn *txn;
    int rc;

    memset(bits, 0, (size_t)((nblocks + 7) / 8));
    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    if ((rc = get_root(txn, c, root, &rec)) < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if (dg_merkle_block_count(rec.length) != nblocks) {
        mdb_txn_abort(txn);
        return -EINVAL;
    }
    for (uint64_t chunk = 0; chunk * HAVE_CHUNK_BITS < nblocks; chunk++) {
        link_key(k, root, chunk);
        if (mdb_get(txn, c->have, &key, &val) != 0 || val.mv_size != HAVE_CHUNK_BYTES)
            continue;
        uint64_t first = chunk * HAVE_CHUNK_BITS;
        uint64_t n = nblocks - first < HAVE_CHUNK_BITS ? nblocks - first : HAVE_CHUNK_BITS;
        const uint8_t *have = val.mv_data;
        for (uint64_t i = 0; i < n; i++)
            if (have[i / 8] >> (i % 8) & 1)
                bits[(first + i) / 8] |= (uint8_t)(1u << ((first + i) % 8));
    }
    mdb_txn_abort(txn);
    pthread_mutex_lock(&c->lock);
    for (struct pending_root *p = c->pending; p; p = p->next) {
        if (memcmp(p->root, root, 32) != 0)
            continue;
        for (size_t i = 0; i < p->count; i++)
            if (p->blocks[i] < nblocks)
                bits[p->blocks[i] / 8] |= (uint8_t)(1u << (p->blocks[i] % 8));
    }
    pthread_mutex_unlock(&c->lock);
    return 0;
}

static void block_path(struct dg_piece_cache *c, const uint8_t root[32], char *buf, size_t size)
{
    char hex[DG_ROOT_HEX_LEN + 1];

    dg_root_format(root, hex);
    snprintf(buf, size, "%s/%.2s/%s", c->block_dir, hex, hex);
}

static void note_lost(struct dg_piece_cache *c, const uint8_t root[32])
{
    struct touched_root *t = calloc(1, sizeof(*t));

    if (!t)
        return;
    memcpy(t->root, root, 32);
    t->lost = 1;
    pthread_mutex_lock(&c->lock);
    t->next = c->touched;
    c->touched = t;
    pthread_mutex_unlock(&c->lock);
}

int dg_piece_cache_has_range(struct dg_piece_cache *c, const uint8_t root[32], uint64_t off,
                             uint64_t len)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    int held = 0;

    if (read_txn(c, &txn) < 0)
        return 0;
    if (get_root(txn, c, root, &rec) == 0) {
        if (off >= rec.length || len == 0)
            held = 1;
        else {
            uint64_t end = len > rec.length - off ? rec.length : off + len; /* no wrap */
            held = blocks_held(c, txn, root, off / DG_MERKLE_BLOCK_SIZE,
                               (end - 1) / DG_MERKLE_BLOCK_SIZE);
        }
    }
    mdb_txn_abort(txn);
    return held;
}

ssize_t dg_piece_cache_read(struct dg_piece_cache *c, const uint8_t root[32], void *buf, size_t len,
                            uint64_t off)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    char path[4200];
    ssize_t rc;
    int fd;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    rc = get_root(txn, c, root, &rec);
    if (rc == 0 && off < rec.length && len > 0) {
        if (len > rec.length - off)
            len = (size_t)(rec.length - off);
        if (!blocks_held(c, txn, root, off / DG_MERKLE_BLOCK_SIZE,
                         (off + len - 1) / DG_MERKLE_BLOCK_SIZE))
            rc = -EAGAIN;
    } else if (rc == 0) {
        len = 0;
    }
    mdb_txn_abort(txn);
    if (rc < 0 || len == 0)
        return rc;

    block_path(c, root, path, sizeof(path));
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        dg_log(DG_LOG_WARN, "cache", "block file %s: %s; forgetting its blocks", path,
               strerror(errno));
        note_lost(c, root);
        return -EIO;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            dg_log(DG_LOG_WARN, "cache", "block file %s is short; forgetting its blocks", path);
            note_lost(c, root);
            close(fd);
            return -EIO;
        }
        done += (size_t)r;
    }
    close(fd);
    dg_piece_cache_touch(c, root);
    return (ssize_t)done;
}

void dg_piece_cache_touch(struct dg_piece_cache *c, const uint8_t root[32])
{
    int64_t now = c->clock(c->clock_arg);

    pthread_mutex_lock(&c->lock);
    for (struct touched_root *t = c->touched; t; t = t->next) {
        if (memcmp(t->root, root, 32) == 0 && !t->lost) {
            t->when = now;
            pthread_mutex_unlock(&c->lock);
            return;
        }
    }
    struct touched_root *t = calloc(1, sizeof(*t));
    if (t) {
        memcpy(t->root, root, 32);
        t->when = now;
        t->next = c->touched;
        c->touched = t;
    }
    pthread_mutex_unlock(&c->lock);
}

/* --- shared files --- */

static void snapshot_stat(struct dg_shared_file *f, const char *path, const struct stat *st)
{
    memset(f, 0, offsetof(struct dg_shared_file, path));
    f->ino = (uint64_t)st->st_ino;
    f->dev = (uint64_t)st->st_dev;
    f->size = (uint64_t)st->st_size;
    f->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    f->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
    snprintf(f->path, sizeof(f->path), "%s", path);
}

/* Replaces the record of st->st_ino with @p f, unlinking the root of the old record. */
static int replace_file(struct dg_piece_cache *c, MDB_txn *txn, const struct dg_shared_file *f)
{
    struct dg_shared_file *old = malloc(sizeof(*old));
    int rc;

    if (!old)
        return -ENOMEM;
    rc = get_file(txn, c, f->ino, old);
    if (rc == 0 && old->state == DG_SHARED_HASHED &&
        (f->state != DG_SHARED_HASHED || memcmp(old->root, f->root, 32) != 0))
        rc = unlink_root(c, txn, old->root, f->ino);
    else if (rc == -ENOENT)
        rc = 0;
    free(old);
    if (rc < 0)
        return rc;
    return put_file(txn, c, f);
}

static int record_file(struct dg_piece_cache *c, struct dg_shared_file *f)
{
    MDB_txn *txn;
    int rc;

    if ((rc = write_txn(c, &txn)) < 0)
        return rc;
    if ((rc = replace_file(c, txn, f)) < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    return commit(txn);
}

int dg_piece_cache_shared_begin(struct dg_piece_cache *c, const char *path, const struct stat *st)
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    int rc;

    if (!f)
        return -ENOMEM;
    snapshot_stat(f, path, st);
    f->state = DG_SHARED_HASHING;
    rc = record_file(c, f);
    free(f);
    return rc;
}

int dg_piece_cache_shared_failed(struct dg_piece_cache *c, const char *path, const struct stat *st,
                                 int error)
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    int rc;

    if (!f)
        return -ENOMEM;
    snapshot_stat(f, path, st);
    f->state = DG_SHARED_FAILED;
    f->error = error;
    rc = record_file(c, f);
    free(f);
    return rc;
}

int dg_piece_cache_shared_done(struct dg_piece_cache *c, const char *path, const struct stat *st,
                               const uint8_t root[32], uint64_t piece_size, const uint8_t *layer,
                               uint64_t layer_count)
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    struct dg_root_record rec;
    MDB_txn *txn;
    uint8_t k[40];
    MDB_val key, val;
    int rc;

    if (!f)
        return -ENOMEM;
    snapshot_stat(f, path, st);
    f->state = DG_SHARED_HASHED;
    memcpy(f->root, root, 32);
    if ((rc = write_txn(c, &txn)) < 0)
        goto out;
    if ((rc = replace_file(c, txn, f)) < 0)
        goto abort;
    link_key(k, root, f->ino);
    key.mv_size = 40;
    key.mv_data = k;
    val.mv_size = 0;
    val.mv_data = NULL;
    if ((rc = map_mdb_error(mdb_put(txn, c->root_files, &key, &val, 0))) < 0)
        goto abort;
    rc = get_root(txn, c, root, &rec);
    if (rc == -ENOENT) {
        memset(&rec, 0, sizeof(rec));
        rec.length = f->size;
        rec.piece_size = piece_size;
        rec.last_access = c->clock(c->clock_arg);
        if ((rc = put_root(txn, c, root, &rec)) < 0)
            goto abort;
    } else if (rc < 0) {
        goto abort;
    }
    key.mv_size = 32;
    key.mv_data = (void *)root;
    val.mv_size = layer_count * 32;
    val.mv_data = (void *)layer;
    if (layer && layer_count > 0) {
        rc = mdb_put(txn, c->layers, &key, &val, MDB_NOOVERWRITE);
        if (rc != 0 && rc != MDB_KEYEXIST) {
            rc = map_mdb_error(rc);
            goto abort;
        }
    }
    rc = commit(txn);
    goto out;
abort:
    mdb_txn_abort(txn);
out:
    free(f);
    return rc;
}

int dg_piece_cache_shared_restat(struct dg_piece_cache *c, const char *path, const struct stat *st)
{
    struct dg_shared_file *old = malloc(sizeof(*old)), *f = malloc(sizeof(*f));
    MDB_txn *txn = NULL;
    int rc;

    if (!old || !f) {
        rc = -ENOMEM;
        goto out;
    }
    snapshot_stat(f, path, st);
    if ((rc = write_txn(c, &txn)) < 0)
        goto out;
    rc = get_file(txn, c, f->ino, old);
    if (rc == 0 && old->state != DG_SHARED_HASHED)
        rc = -ENOENT;
    if (rc == 0 && (old->dev != f->dev || old->size != f->size || old->mtime_ns != f->mtime_ns))
        rc = -ESTALE;
    if (rc == 0) {
        f->state = DG_SHARED_HASHED;
        memcpy(f->root, old->root, 32);
        rc = put_file(txn, c, f);
    }
    if (rc == 0)
        rc = commit(txn);
    else
        mdb_txn_abort(txn);
out:
    free(old);
    free(f);
    return rc;
}

int dg_piece_cache_shared_remove(struct dg_piece_cache *c, uint64_t ino)
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    MDB_txn *txn;
    uint8_t k[8];
    MDB_val key = {8, k};
    int rc;

    if (!f)
        return -ENOMEM;
    if ((rc = write_txn(c, &txn)) < 0)
        goto out;
    rc = get_file(txn, c, ino, f);
    if (rc == -ENOENT) {
        mdb_txn_abort(txn);
        rc = 0;
        goto out;
    }
    if (rc < 0)
        goto abort;
    put_be64(k, ino);
    if ((rc = map_mdb_error(mdb_del(txn, c->files, &key, NULL))) < 0)
        goto abort;
    if (f->state == DG_SHARED_HASHED && (rc = unlink_root(c, txn, f->root, ino)) < 0)
        goto abort;
    rc = commit(txn);
    goto out;
abort:
    mdb_txn_abort(txn);
out:
    free(f);
    return rc;
}

int dg_piece_cache_shared_rename(struct dg_piece_cache *c, const char *from, const char *to)
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    size_t from_len = strlen(from), to_len = strlen(to);
    uint64_t *inos = NULL;
    size_t count = 0, cap = 0;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key, val;
    int rc, mrc;

    if (!f)
        return -ENOMEM;
    if ((rc = write_txn(c, &txn)) < 0)
        goto out;
    /* First collect the records under @p from, then rewrite them: values change size, and
     * a cursor is not walked while the tree under it is being rewritten. */
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->files, &cur))) < 0)
        goto abort;
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0 && rc == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        if (key.mv_size != 8 || dg_file_record_decode(val.mv_data, val.mv_size, f) < 0)
            continue;
        size_t len = strlen(f->path);
        if (len < from_len || memcmp(f->path, from, from_len) != 0 ||
            (len > from_len && f->path[from_len] != '/'))
            continue;
        if (count == cap) {
            size_t ncap = cap ? 2 * cap : 16;
            uint64_t *n = realloc(inos, ncap * sizeof(*n));
            if (!n) {
                rc = -ENOMEM;
                break;
            }
            inos = n;
            cap = ncap;
        }
        inos[count++] = get_be64(key.mv_data);
    }
    mdb_cursor_close(cur);
    for (size_t i = 0; i < count && rc == 0; i++) {
        if ((rc = get_file(txn, c, inos[i], f)) < 0)
            break;
        size_t len = strlen(f->path);
        if (to_len + (len - from_len) >= sizeof(f->path))
            continue; /* cannot happen for paths the kernel accepted */
        memmove(f->path + to_len, f->path + from_len, len - from_len + 1);
        memcpy(f->path, to, to_len);
        rc = put_file(txn, c, f);
    }
    if (rc < 0)
        goto abort;
    rc = commit(txn);
    goto out;
abort:
    mdb_txn_abort(txn);
out:
    free(inos);
    free(f);
    return rc;
}

/* --- content known by root: metadata, leaves and blocks --- */

int dg_piece_cache_add_root(struct dg_piece_cache *c, const uint8_t root[32], uint64_t length,
                            const uint8_t *layer, uint64_t layer_count)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    MDB_val key = {32, (void *)root}, val = {layer_count * 32, (void *)layer};
    int rc;

    if ((rc = dg_merkle_verify_layer(root, length, layer, layer_count)) < 0)
        return rc == -EINVAL ? -EBADMSG : rc;
    if ((rc = write_txn(c, &txn)) < 0)
        return rc;
    rc = get_root(txn, c, root, &rec);
    if (rc == 0) {
        mdb_txn_abort(txn);
        return 0;
    }
    if (rc != -ENOENT)
        goto abort;
    memset(&rec, 0, sizeof(rec));
    rec.length = length;
    rec.piece_size = dg_merkle_piece_size(length);
    rec.last_access = c->clock(c->clock_arg);
    if ((rc = put_root(txn, c, root, &rec)) < 0)
        goto abort;
    if ((rc = map_mdb_error(mdb_put(txn, c->layers, &key, &val, 0))) < 0)
        goto abort;
    return commit(txn);
abort:
    mdb_txn_abort(txn);
    return rc;
}

int dg_piece_cache_put_leaves(struct dg_piece_cache *c, const uint8_t root[32], uint64_t piece,
                              const uint8_t *leaves, uint64_t count)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    MDB_val layer;
    uint8_t k[40], hash[32];
    int rc;

    if ((rc = write_txn(c, &txn)) < 0)
        return rc;
    if ((rc = get_root(txn, c, root, &rec)) < 0 || (rc = get_layer(txn, c, root, &layer)) < 0)
        goto abort;
    uint64_t per_piece = rec.piece_size / DG_MERKLE_BLOCK_SIZE;
    uint64_t blocks = dg_merkle_block_count(rec.length);
    uint64_t first = piece * per_piece;
    if (piece >= layer.mv_size / 32 || first >= blocks || count == 0 ||
        count != (blocks - first < per_piece ? blocks - first : per_piece)) {
        rc = -EINVAL;
        goto abort;
    }
    if ((rc = dg_merkle_subtree_root(leaves, count, 0, per_piece, hash)) < 0)
        goto abort;
    if (memcmp(hash, (const uint8_t *)layer.mv_data + 32 * piece, 32) != 0) {
        rc = -EBADMSG;
        goto abort;
    }
    link_key(k, root, piece);
    MDB_val key = {40, k}, val = {count * 32, (void *)leaves};
    if ((rc = map_mdb_error(mdb_put(txn, c->leaves, &key, &val, 0))) < 0)
        goto abort;
    return commit(txn);
abort:
    mdb_txn_abort(txn);
    return rc;
}

/* The verified leaf hash of @p block, from the piece layer (16 KiB pieces) or stored leaves. */
static int leaf_hash(struct dg_piece_cache *c, MDB_txn *txn, const uint8_t root[32],
                     const struct dg_root_record *rec, uint64_t block, uint8_t out[32])
{
    uint64_t per_piece = rec->piece_size / DG_MERKLE_BLOCK_SIZE;
    MDB_val val;
    int rc;

    if (per_piece == 1) {
        if ((rc = get_layer(txn, c, root, &val)) < 0)
            return rc;
        if (block >= val.mv_size / 32)
            return -EIO;
        memcpy(out, (const uint8_t *)val.mv_data + 32 * block, 32);
        return 0;
    }
    uint8_t k[40];
    MDB_val key = {40, k};
    link_key(k, root, block / per_piece);
    rc = mdb_get(txn, c->leaves, &key, &val);
    if (rc == MDB_NOTFOUND)
        return -ENODATA;
    if (rc != 0)
        return map_mdb_error(rc);
    uint64_t i = block % per_piece;
    if (i >= val.mv_size / 32)
        return -EIO;
    memcpy(out, (const uint8_t *)val.mv_data + 32 * i, 32);
    return 0;
}

int dg_piece_cache_leaves(struct dg_piece_cache *c, const uint8_t root[32], uint64_t piece,
                          uint8_t *out, uint64_t cap, uint64_t *count)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    MDB_val val;
    int rc;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    if ((rc = get_root(txn, c, root, &rec)) < 0)
        goto done;
    uint64_t per_piece = rec.piece_size / DG_MERKLE_BLOCK_SIZE;
    uint64_t blocks = dg_merkle_block_count(rec.length);
    if (piece * per_piece >= blocks) {
        rc = -EINVAL;
        goto done;
    }
    uint64_t n = blocks - piece * per_piece < per_piece ? blocks - piece * per_piece : per_piece;
    if (n > cap) {
        rc = -ENOBUFS;
        goto done;
    }
    if (per_piece == 1) {
        if ((rc = get_layer(txn, c, root, &val)) < 0)
            goto done;
        if (piece >= val.mv_size / 32) {
            rc = -EIO;
            goto done;
        }
        memcpy(out, (const uint8_t *)val.mv_data + 32 * piece, 32);
    } else {
        uint8_t k[40];
        MDB_val key = {40, k};
        link_key(k, root, piece);
        rc = mdb_get(txn, c->leaves, &key, &val);
        if (rc == MDB_NOTFOUND) {
            rc = -ENODATA;
            goto done;
        }
        if ((rc = map_mdb_error(rc)) < 0)
            goto done;
        if (val.mv_size != n * 32) {
            rc = -EIO;
            goto done;
        }
        memcpy(out, val.mv_data, val.mv_size);
    }
    *count = n;
    rc = 0;
done:
    mdb_txn_abort(txn);
    return rc;
}

static struct pending_root *pending_for(struct dg_piece_cache *c, const uint8_t root[32])
{
    struct pending_root *p;

    for (p = c->pending; p; p = p->next)
        if (memcmp(p->root, root, 32) == 0)
            return p;
    p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    memcpy(p->root, root, 32);
    p->fd = -1;
    p->next = c->pending;
    c->pending = p;
    return p;
}

/* Drops the uncommitted blocks of @p root: they went to a block file that was lost. */
static void drop_pending(struct dg_piece_cache *c, const uint8_t root[32])
{
    struct pending_root *gone = NULL;

    pthread_mutex_lock(&c->lock);
    for (struct pending_root **pp = &c->pending; *pp; pp = &(*pp)->next) {
        if (memcmp((*pp)->root, root, 32) == 0) {
            gone = *pp;
            *pp = gone->next;
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (gone) {
        if (gone->fd >= 0)
            close(gone->fd);
        free(gone->blocks);
        free(gone->bits);
        free(gone);
    }
}

/* Whether a reader found the block storage of @p root lost since the last flush. */
static int marked_lost(struct dg_piece_cache *c, const uint8_t root[32])
{
    int lost = 0;

    pthread_mutex_lock(&c->lock);
    for (struct touched_root *t = c->touched; t && !lost; t = t->next)
        lost = t->lost && memcmp(t->root, root, 32) == 0;
    pthread_mutex_unlock(&c->lock);
    return lost;
}

int dg_piece_cache_put_block(struct dg_piece_cache *c, const uint8_t root[32], uint64_t block,
                             const void *data, size_t len)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    uint8_t leaf[32], hash[32];
    int rc;

    /* A reader found this root's block file gone: forget its blocks before adding new ones,
     * or the new block would be taken as held and then forgotten with the rest. */
    if (marked_lost(c, root) && (rc = dg_piece_cache_flush(c)) < 0)
        return rc;
    /* The writer's view: leaf hashes stored in the open batch count already. */
    if ((rc = writer_view_txn(c, &txn)) < 0)
        return rc;
    rc = get_root(txn, c, root, &rec);
    if (rc == 0) {
        uint64_t blocks = dg_merkle_block_count(rec.length);
        uint64_t want =
            block + 1 < blocks ? DG_MERKLE_BLOCK_SIZE : rec.length - block * DG_MERKLE_BLOCK_SIZE;
        if (block >= blocks || len != want)
            rc = -EINVAL;
        else if (blocks_held(c, txn, root, block, block))
            rc = 1; /* already held */
        else
            rc = leaf_hash(c, txn, root, &rec, block, leaf);
    }
    mdb_txn_abort(txn);
    if (rc != 0)
        return rc > 0 ? 0 : rc;
    if ((rc = dg_merkle_sha256(data, len, hash)) < 0)
        return rc;
    if (memcmp(hash, leaf, 32) != 0)
        return -EBADMSG;

    pthread_mutex_lock(&c->lock);
    struct pending_root *p = pending_for(c, root);
    pthread_mutex_unlock(&c->lock);
    if (!p)
        return -ENOMEM;
    if (p->fd < 0) {
        char path[4200], hex[DG_ROOT_HEX_LEN + 1];
        dg_root_format(root, hex);
        snprintf(path, sizeof(path), "%s/%.2s", c->block_dir, hex);
        /* The whole cache directory may have been removed (it is a cache): make it again. */
        if ((rc = dg_mkdir_p(path)) < 0)
            return rc;
        block_path(c, root, path, sizeof(path));
        p->fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (p->fd < 0)
            return -errno;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(p->fd, (const char *)data + done, len - done,
                           (off_t)(block * DG_MERKLE_BLOCK_SIZE + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        done += (size_t)w;
    }
    pthread_mutex_lock(&c->lock);
    if (p->count == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        uint64_t *nb = realloc(p->blocks, cap * sizeof(*nb));
        if (!nb) {
            pthread_mutex_unlock(&c->lock);
            return -ENOMEM;
        }
        p->blocks = nb;
        p->cap = cap;
    }
    p->blocks[p->count++] = block;
    if (!p->no_bits && (block >= PENDING_BITS_MAX || block / 8 >= p->bits_len)) {
        /* Grown in steps. A block out of its reach, or no memory: the list alone is used. */
        uint64_t bits_len = (block / 8 + 1) * 2;
        uint8_t *nb = block < PENDING_BITS_MAX ? realloc(p->bits, (size_t)bits_len) : NULL;
        if (nb) {
            memset(nb + p->bits_len, 0, (size_t)(bits_len - p->bits_len));
            p->bits = nb;
            p->bits_len = bits_len;
        } else {
            free(p->bits);
            p->bits = NULL;
            p->bits_len = 0;
            p->no_bits = 1;
        }
    }
    if (p->bits)
        p->bits[block / 8] |= (uint8_t)(1u << (block % 8));
    pthread_mutex_unlock(&c->lock);
    return 0;
}

/* Sets the bits of @p p's blocks in `have` and adds them to the root's count. */
static uint64_t stored_bytes(const struct dg_root_record *rec);

static int commit_pending(struct dg_piece_cache *c, MDB_txn *txn, const struct pending_root *p,
                          int64_t *delta)
{
    struct dg_root_record rec;
    uint8_t k[40], chunk_buf[HAVE_CHUNK_BYTES];
    uint64_t added = 0;
    int rc;

    if ((rc = get_root(txn, c, p->root, &rec)) < 0)
        return rc == -ENOENT ? 0 : rc; /* root dropped meanwhile: nothing to record */
    for (size_t i = 0; i < p->count; i++) {
        uint64_t chunk = p->blocks[i] / HAVE_CHUNK_BITS, bit = p->blocks[i] % HAVE_CHUNK_BITS;
        MDB_val key = {40, k}, val;
        link_key(k, p->root, chunk);
        if (mdb_get(txn, c->have, &key, &val) == 0 && val.mv_size == HAVE_CHUNK_BYTES)
            memcpy(chunk_buf, val.mv_data, HAVE_CHUNK_BYTES);
        else
            memset(chunk_buf, 0, HAVE_CHUNK_BYTES);
        if (chunk_buf[bit / 8] >> (bit % 8) & 1)
            continue;
        chunk_buf[bit / 8] |= (uint8_t)(1u << (bit % 8));
        added++;
        val.mv_size = HAVE_CHUNK_BYTES;
        val.mv_data = chunk_buf;
        if ((rc = map_mdb_error(mdb_put(txn, c->have, &key, &val, 0))) < 0)
            return rc;
    }
    uint64_t before = stored_bytes(&rec);
    rec.blocks_cached += added;
    *delta += (int64_t)(stored_bytes(&rec) - before);
    return put_root(txn, c, p->root, &rec);
}

static int apply_touched(struct dg_piece_cache *c, MDB_txn *txn, const struct touched_root *t,
                         int64_t *delta)
{
    struct dg_root_record rec;
    int rc = get_root(txn, c, t->root, &rec);

    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    if (t->lost) {
        if ((rc = delete_prefix(txn, c->have, t->root)) < 0)
            return rc;
        *delta -= (int64_t)stored_bytes(&rec);
        rec.blocks_cached = 0;
    } else {
        if (t->when <= rec.last_access)
            return 0;
        rec.last_access = t->when;
    }
    return put_root(txn, c, t->root, &rec);
}

int dg_piece_cache_flush(struct dg_piece_cache *c)
{
    struct pending_root *pending, *p;
    struct touched_root *touched, *t;
    MDB_txn *txn;
    int64_t delta = 0;
    int rc = 0;

    /* Block bits are published by their own commit: readers must see them the moment the
     * pending list is dropped, so no batch may hold them back. */
    if ((rc = dg_piece_cache_batch_commit(c)) < 0)
        return rc;

    pthread_mutex_lock(&c->lock);
    touched = c->touched;
    c->touched = NULL;
    pthread_mutex_unlock(&c->lock);
    for (t = touched; t; t = t->next)
        if (t->lost)
            drop_pending(c, t->root);
    pthread_mutex_lock(&c->lock);
    pending = c->pending;
    pthread_mutex_unlock(&c->lock);
    if (!pending && !touched)
        return 0;

    /* Bytes first: a bit is committed only for a block that is on disk. */
    for (p = pending; p; p = p->next) {
        if (p->fd >= 0 && fdatasync(p->fd) < 0) {
            rc = -errno;
            dg_log(DG_LOG_ERROR, "cache", "fdatasync: %s", strerror(errno));
        }
    }
    if (rc == 0 && (rc = write_txn(c, &txn)) == 0) {
        for (p = pending; p && rc == 0; p = p->next)
            rc = commit_pending(c, txn, p, &delta);
        for (t = touched; t && rc == 0; t = t->next)
            rc = apply_touched(c, txn, t, &delta);
        if (rc == 0)
            rc = commit(txn);
        else
            mdb_txn_abort(txn);
        if (rc == 0 && c->stored_known)
            c->stored = (int64_t)c->stored + delta < 0 ? 0 : (uint64_t)((int64_t)c->stored + delta);
    }
    if (rc == 0) {
        /* Committed: the pending list can go. Blocks added by put_block meanwhile were added
         * on this thread (the writer), so the list is the one we flushed. */
        pthread_mutex_lock(&c->lock);
        c->pending = NULL;
        pthread_mutex_unlock(&c->lock);
        while (pending) {
            p = pending->next;
            if (pending->fd >= 0)
                close(pending->fd);
            free(pending->blocks);
            free(pending->bits);
            free(pending);
            pending = p;
        }
    } else {
        /* Keep the pending blocks for the next flush; put the access times back too. */
        pthread_mutex_lock(&c->lock);
        for (t = touched; t && t->next; t = t->next)
            ;
        if (t) {
            t->next = c->touched;
            c->touched = touched;
        }
        pthread_mutex_unlock(&c->lock);
        return rc;
    }
    while (touched) {
        t = touched->next;
        free(touched);
        touched = t;
    }
    return rc;
}

void dg_piece_cache_set_clock(struct dg_piece_cache *c, int64_t (*clock)(void *arg), void *arg)
{
    c->clock = clock ? clock : system_seconds;
    c->clock_arg = clock ? arg : NULL;
}

/* A root that only block storage holds, as an eviction candidate. */
struct evict_candidate {
    uint8_t root[32];
    int64_t last_access;
    uint64_t bytes;
};

static int by_last_access(const void *a, const void *b)
{
    const struct evict_candidate *x = a, *y = b;

    if (x->last_access != y->last_access)
        return x->last_access < y->last_access ? -1 : 1;
    return memcmp(x->root, y->root, 32);
}

/* Bytes of block storage a record stands for (the last block may be short). */
static uint64_t stored_bytes(const struct dg_root_record *rec)
{
    uint64_t bytes = rec->blocks_cached * DG_MERKLE_BLOCK_SIZE;

    return bytes > rec->length ? rec->length : bytes;
}

int dg_piece_cache_stored_bytes(struct dg_piece_cache *c, uint64_t *out)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key, val;
    uint64_t total = 0;
    int rc, mrc;

    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->roots, &cur))) == 0) {
        for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0;
             mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
            struct dg_root_record rec;
            if (dg_root_record_decode(val.mv_data, val.mv_size, &rec) == 0)
                total += stored_bytes(&rec);
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    *out = total;
    return rc;
}

/* Removes @p root and its blocks from the index; the block file goes after the commit. */
static int evict_root(struct dg_piece_cache *c, const uint8_t root[32])
{
    MDB_txn *txn;
    MDB_val key = {32, (void *)root};
    char path[4200];
    int rc;

    if ((rc = write_txn(c, &txn)) < 0)
        return rc;
    if (has_prefix(txn, c->root_files, root)) {
        mdb_txn_abort(txn); /* became a shared file's root meanwhile */
        return 0;
    }
    rc = map_mdb_error(mdb_del(txn, c->roots, &key, NULL));
    if (rc == 0) {
        int lrc = mdb_del(txn, c->layers, &key, NULL);
        if (lrc != 0 && lrc != MDB_NOTFOUND)
            rc = map_mdb_error(lrc);
    }
    if (rc == 0)
        rc = delete_prefix(txn, c->leaves, root);
    if (rc == 0)
        rc = delete_prefix(txn, c->have, root);
    if (rc < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if ((rc = commit(txn)) < 0)
        return rc;
    block_path(c, root, path, sizeof(path));
    if (unlink(path) < 0 && errno != ENOENT)
        dg_log(DG_LOG_WARN, "cache", "cannot remove %s: %s", path, strerror(errno));
    return 0;
}

int dg_piece_cache_evict(struct dg_piece_cache *c, uint64_t limit,
                         int (*in_use)(void *arg, const uint8_t root[32]), void *arg,
                         uint64_t *freed)
{
    struct evict_candidate *cand = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val key, val;
    int rc, mrc;

    if (freed)
        *freed = 0;
    /* A block file is deleted only after its entry left the index for good: no batch. */
    if ((rc = dg_piece_cache_batch_commit(c)) < 0)
        return rc;
    /* Counts must include every stored block: commit the pending ones first. */
    if ((rc = dg_piece_cache_flush(c)) < 0)
        return rc;
    if (c->stored_known && c->stored <= limit)
        return 0; /* nothing to do: no need to look at every root */
    if ((rc = read_txn(c, &txn)) < 0)
        return rc;
    if ((rc = map_mdb_error(mdb_cursor_open(txn, c->roots, &cur))) < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    for (mrc = mdb_cursor_get(cur, &key, &val, MDB_FIRST); mrc == 0 && rc == 0;
         mrc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        struct dg_root_record rec;
        if (key.mv_size != 32 || dg_root_record_decode(val.mv_data, val.mv_size, &rec) < 0)
            continue;
        total += stored_bytes(&rec);
        if (rec.blocks_cached == 0 || (rec.flags & DG_ROOT_PINNED) ||
            has_prefix(txn, c->root_files, key.mv_data))
            continue;
        if (n == cap) {
            size_t ncap = cap ? 2 * cap : 64;
            struct evict_candidate *nc = realloc(cand, ncap * sizeof(*nc));
            if (!nc) {
                rc = -ENOMEM;
                break;
            }
            cand = nc;
            cap = ncap;
        }
        memcpy(cand[n].root, key.mv_data, 32);
        cand[n].last_access = rec.last_access;
        cand[n].bytes = stored_bytes(&rec);
        n++;
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    if (rc == 0) {
        c->stored = total;
        c->stored_known = 1;
    }
    if (rc == 0 && total > limit) {
        qsort(cand, n, sizeof(*cand), by_last_access);
        for (size_t i = 0; i < n && total > limit && rc == 0; i++) {
            if (in_use && in_use(arg, cand[i].root))
                continue;
            if ((rc = evict_root(c, cand[i].root)) == 0) {
                total -= cand[i].bytes;
                c->stored -= cand[i].bytes;
                if (freed)
                    *freed += cand[i].bytes;
            }
        }
    }
    free(cand);
    return rc;
}

int dg_piece_cache_set_pinned(struct dg_piece_cache *c, const uint8_t root[32], int pinned)
{
    struct dg_root_record rec;
    MDB_txn *txn;
    int rc;

    if ((rc = write_txn(c, &txn)) < 0)
        return rc;
    if ((rc = get_root(txn, c, root, &rec)) == 0) {
        if (pinned)
            rec.flags |= DG_ROOT_PINNED;
        else
            rec.flags &= ~DG_ROOT_PINNED;
        rc = put_root(txn, c, root, &rec);
    }
    if (rc == 0 && !pinned)
        rc = drop_root_if_unheld(c, txn, root); /* pinned metadata alone kept it */
    if (rc < 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    return commit(txn);
}

int dg_piece_cache_batch_begin(struct dg_piece_cache *c)
{
    if (c->batch)
        return 0;
    c->batch_ops = 0;
    return map_mdb_error(mdb_txn_begin(c->env, NULL, 0, &c->batch));
}

int dg_piece_cache_batch_commit(struct dg_piece_cache *c)
{
    MDB_txn *txn = c->batch;

    if (!txn)
        return 0;
    c->batch = NULL;
    c->batch_ops = 0;
    return commit(txn);
}

unsigned dg_piece_cache_batch_size(const struct dg_piece_cache *c)
{
    return c->batch ? c->batch_ops : 0;
}
