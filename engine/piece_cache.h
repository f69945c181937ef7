/* The piece cache: an LMDB index of every root this node knows, and the storage of verified
 * blocks of content that is not a shared file.
 *
 * Index (one LMDB environment in <data_dir>/index):
 *   roots       root -> length, piece size, flags, blocks verified in the cache, last access
 *   layers      root -> piece layer (verified against the root before it is stored)
 *   leaves      root | piece -> leaf hashes of one piece (verified against the piece layer)
 *   have        root | chunk -> bitmap of verified blocks held in block storage
 *   files       backing inode -> shared file record (state, root, stat snapshot, path)
 *   root_files  root | inode -> nothing: which shared files have a root
 * Block storage: <cache_dir>/<first 2 hex digits>/<64 hex digits>, sparse files written at the
 * block's own offset.
 *
 * A block is stored only after its SHA-256 matches its verified leaf hash. Its bit in `have`
 * is committed only after the block file was fdatasync'ed (dg_piece_cache_flush()), so after a
 * crash or kill -9 the index never claims a block that is not on disk; verified blocks that
 * were written but not yet committed are served from memory state until then.
 *
 * Thread safety: functions marked "any thread" use LMDB read-only snapshots and may run
 * concurrently with everything else; all other functions are for one writer thread (the
 * engine's loop thread). */
#ifndef DG_PIECE_CACHE_H
#define DG_PIECE_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#define DG_ROOT_PINNED 0x1u /* never evicted; fetched completely (issue: swarm) */

struct dg_piece_cache; /* opaque */

struct dg_root_info {
    uint64_t length;
    uint64_t piece_size;
    uint64_t blocks_total;
    uint64_t blocks_cached; /* verified blocks in block storage (committed or not) */
    uint32_t shared_files;  /* shared files recorded with this root (validated on open) */
    uint32_t flags;         /* DG_ROOT_* */
    int64_t last_access;    /* unix seconds */
};

enum dg_shared_state {
    DG_SHARED_HASHING = 1, /* written or changed; a hashing job is queued or running */
    DG_SHARED_HASHED = 2,  /* root is valid while the file's stat matches the snapshot */
    DG_SHARED_FAILED = 3,  /* could not be hashed; error holds the errno */
};

/* What the index knows of one file under shared/. */
struct dg_shared_file {
    uint64_t ino;
    uint64_t dev;
    uint64_t size;
    int64_t mtime_ns;
    int64_t ctime_ns;
    uint32_t state; /* enum dg_shared_state */
    int32_t error;
    uint8_t root[32];
    char path[4096]; /* relative to shared/, NUL-terminated */
};

/* Opens (creating when missing) the index in @p index_dir and block storage in @p block_dir.
 * @return 0, -errno from mkdir/LMDB (mapped to errno values), -ENOMEM. */
int dg_piece_cache_open(const char *index_dir, const char *block_dir, struct dg_piece_cache **out);

/* Commits pending state and closes. NULL is allowed. */
void dg_piece_cache_close(struct dg_piece_cache *c);

/* --- queries: any thread --- */

/* Looks up a root. @return 0, -ENOENT if the index does not know it, -EIO. */
int dg_piece_cache_root_info(struct dg_piece_cache *c, const uint8_t root[32],
                             struct dg_root_info *out);

/* Lists roots held completely (by a hashed shared file or by block storage), in byte order,
 * starting after @p after (NULL: from the first).
 * @param[out] roots  room for @p max roots of 32 bytes. @param[out] n  how many were written.
 * @return 0 or -EIO. */
int dg_piece_cache_list_roots(struct dg_piece_cache *c, const uint8_t *after, uint8_t *roots,
                              size_t max, size_t *n);

/* The record of the shared file with backing inode @p ino. @return 0, -ENOENT, -EIO. */
int dg_piece_cache_shared_get(struct dg_piece_cache *c, uint64_t ino, struct dg_shared_file *out);

/* Calls @p fn for each shared file recorded with @p root until it returns non-zero.
 * @return the non-zero value @p fn returned, 0 when all were visited, -EIO. */
int dg_piece_cache_shared_by_root(struct dg_piece_cache *c, const uint8_t root[32],
                                  int (*fn)(void *arg, const struct dg_shared_file *f), void *arg);

/* Calls @p fn for every shared file record until it returns non-zero. Same returns. */
int dg_piece_cache_shared_each(struct dg_piece_cache *c,
                               int (*fn)(void *arg, const struct dg_shared_file *f), void *arg);

/* A copy of the piece layer of @p root (free() it). @return 0, -ENOENT, -ENOMEM, -EIO. */
int dg_piece_cache_layer(struct dg_piece_cache *c, const uint8_t root[32], uint8_t **layer,
                         uint64_t *count);

/* Reads @p len bytes at @p off of @p root from block storage.
 * @return bytes read (short only at end of file); -EAGAIN if a needed block is not held;
 *         -ENOENT for an unknown root; -EIO if storage lost the bytes (the blocks are then
 *         forgotten so they can be fetched again). */
ssize_t dg_piece_cache_read(struct dg_piece_cache *c, const uint8_t root[32], void *buf, size_t len,
                            uint64_t off);

/* Fills @p bits with the blocks of @p root held in block storage (committed or pending): bit b
 * is bits[b / 8] >> (b % 8) & 1. @p nblocks must be the root's block count.
 * @return 0, -ENOENT (unknown root), -EINVAL (wrong count), -EIO. Any thread. */
int dg_piece_cache_held_bits(struct dg_piece_cache *c, const uint8_t root[32], uint8_t *bits,
                             uint64_t nblocks);

/* The verified leaf hashes of piece @p piece of @p root (from the piece layer when pieces are
 * one block). @param[out] out  room for @p cap hashes; @param[out] count  how many were written.
 * @return 0; -ENOENT (unknown root); -ENODATA (not known yet); -EINVAL (no such piece);
 *         -ENOBUFS; -EIO. Any thread. */
int dg_piece_cache_leaves(struct dg_piece_cache *c, const uint8_t root[32], uint64_t piece,
                          uint8_t *out, uint64_t cap, uint64_t *count);

/* 1 if every block of [off, off+len) of @p root is held in block storage, else 0. */
int dg_piece_cache_has_range(struct dg_piece_cache *c, const uint8_t root[32], uint64_t off,
                             uint64_t len);

/* --- updates: the writer thread only --- */

/* Records that the file at @p path (inode @p st) is being (re)hashed: state HASHING, and its
 * previous root (if any) loses this file. @return 0, -EIO, -ENOSPC (index full). */
int dg_piece_cache_shared_begin(struct dg_piece_cache *c, const char *path, const struct stat *st);

/* Records a finished hash of the shared file @p path: stat snapshot @p st, root, piece layer.
 * Replaces any earlier record of the inode, links the root to the file and creates the root.
 * @return 0, -EIO, -ENOSPC. */
int dg_piece_cache_shared_done(struct dg_piece_cache *c, const char *path, const struct stat *st,
                               const uint8_t root[32], uint64_t piece_size, const uint8_t *layer,
                               uint64_t layer_count);

/* Records that hashing @p path failed with @p error (positive errno). */
int dg_piece_cache_shared_failed(struct dg_piece_cache *c, const char *path, const struct stat *st,
                                 int error);

/* Refreshes the stat snapshot and path of a hashed shared file after a change of metadata only
 * (rename, chmod: ctime moves, bytes do not). Only when @p st has the recorded inode, device,
 * size and mtime. @return 0; -ESTALE when those differ (the file must be rehashed); -ENOENT
 * when the inode is not recorded or not hashed; -EIO. */
int dg_piece_cache_shared_restat(struct dg_piece_cache *c, const char *path, const struct stat *st);

/* Forgets the shared file with inode @p ino; its root goes away unless another shared file or
 * block storage still holds it. @return 0 (also when unknown), -EIO. */
int dg_piece_cache_shared_remove(struct dg_piece_cache *c, uint64_t ino);

/* Rewrites recorded paths after a rename inside shared/: @p from itself and every path below
 * it (when it is a directory) now start with @p to. @return 0, -EIO. */
int dg_piece_cache_shared_rename(struct dg_piece_cache *c, const char *from, const char *to);

/* Registers content known by its root: its length and piece layer, which must verify against
 * the root. Nothing happens if the root is known already. @return 0, -EBADMSG, -EIO. */
int dg_piece_cache_add_root(struct dg_piece_cache *c, const uint8_t root[32], uint64_t length,
                            const uint8_t *layer, uint64_t layer_count);

/* Stores the leaf hashes of piece @p piece of @p root after checking them against its piece
 * layer entry. @p count must be the number of blocks of that piece.
 * @return 0, -ENOENT (unknown root), -EINVAL, -EBADMSG (they do not verify), -EIO. */
int dg_piece_cache_put_leaves(struct dg_piece_cache *c, const uint8_t root[32], uint64_t piece,
                              const uint8_t *leaves, uint64_t count);

/* Verifies block @p block of @p root against its leaf hash and stores it. Leaf hashes stored in
 * the open write batch are used already.
 * @return 0; -ENOENT (unknown root); -ENODATA (leaf hashes of its piece not known yet);
 *         -EINVAL (index or length wrong); -EBADMSG (hash mismatch: nothing stored);
 *         -ENOSPC or -EIO from storage. */
int dg_piece_cache_put_block(struct dg_piece_cache *c, const uint8_t root[32], uint64_t block,
                             const void *data, size_t len);

/* Opens a write batch: until dg_piece_cache_batch_commit(), every update of this API is
 * applied in a nested transaction of one LMDB transaction, and becomes visible to readers and
 * durable together with the others, at the cost of one sync instead of one each. An update
 * that fails is rolled back alone. No-op when a batch is open. @return 0, -EIO, -ENOSPC. */
int dg_piece_cache_batch_begin(struct dg_piece_cache *c);

/* Commits the open batch (no-op without one). On failure every update of the batch is lost;
 * the caller redoes them. @return 0, -EIO, -ENOSPC. */
int dg_piece_cache_batch_commit(struct dg_piece_cache *c);

/* Updates applied in the open batch so far (0 without one). */
unsigned dg_piece_cache_batch_size(const struct dg_piece_cache *c);

/* Makes stored blocks durable: fdatasync of the block files written since the last flush,
 * then one LMDB commit of their bits and of last-access times. @return 0, -EIO, -ENOSPC. */
int dg_piece_cache_flush(struct dg_piece_cache *c);

/* Pins or unpins @p root: a pinned root is never evicted (and, with the swarm, is fetched
 * completely). @return 0, -ENOENT (unknown root), -EIO. Writer thread. */
int dg_piece_cache_set_pinned(struct dg_piece_cache *c, const uint8_t root[32], int pinned);

/* Replaces the clock used for last-access times (unix seconds); NULL restores time().
 * Call before any other thread uses the cache. */
void dg_piece_cache_set_clock(struct dg_piece_cache *c, int64_t (*clock)(void *arg), void *arg);

/* Bytes held in block storage, from the committed index (pending blocks are not counted).
 * Any thread. @return 0 or -EIO. */
int dg_piece_cache_stored_bytes(struct dg_piece_cache *c, uint64_t *out);

/* Evicts whole roots from block storage, least recently used first, until it holds at most
 * @p limit bytes. Never evicts a root that a shared file holds, a pinned root, or one for
 * which @p in_use (may be NULL) returns non-zero: an open root is never pulled from under a
 * reader. Each root goes in one LMDB commit (its blocks, leaves and layer), and its block file
 * is deleted only after that commit, so a crash leaves either the whole entry or none.
 * Flushes pending blocks first. @p freed (may be NULL) receives the bytes freed.
 * @return 0 (also when nothing could be evicted), -EIO, -ENOMEM. Writer thread. */
int dg_piece_cache_evict(struct dg_piece_cache *c, uint64_t limit,
                         int (*in_use)(void *arg, const uint8_t root[32]), void *arg,
                         uint64_t *freed);

/* Notes that @p root was read now (written to the index by the next flush). Any thread. */
void dg_piece_cache_touch(struct dg_piece_cache *c, const uint8_t root[32]);

#endif
