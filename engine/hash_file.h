/* Streaming merkle hashing of an open file descriptor, in constant memory (apart from the
 * piece layer). Used by the engine's hashing jobs and by `digfs hash`.
 *
 * Thread safety: reentrant; blocking I/O, so the engine calls it from libuv's thread pool. */
#ifndef DG_HASH_FILE_H
#define DG_HASH_FILE_H

#include <stdint.h>
#include <sys/stat.h>

#include "engine/merkle.h"

struct dg_file_hash {
    uint8_t root[DG_MERKLE_HASH_SIZE];
    uint64_t length;
    uint64_t piece_size; /* 0 when no layer was collected */
    uint8_t *layer;      /* layer_count * 32 bytes, malloc'd; NULL when none */
    uint64_t layer_count;
    struct stat st; /* fstat() taken before reading (regular files only) */
};

/* Hashes everything readable from @p fd, starting at offset 0 for regular files (read with
 * pread, so the file offset is untouched) or at the current position otherwise (pipes).
 * For a regular file the piece layer is collected with dg_merkle_piece_size(st_size), and the
 * file is checked not to have changed while it was read (size, mtime and ctime before and after).
 * @param[out] out  filled on success; release with dg_file_hash_clear().
 * @return 0; -EAGAIN if a regular file changed while it was read (also for files such as those
 *         in /proc that report size 0 but have content); -errno of a failed fstat or read
 *         (-EISDIR for a directory); -ENOMEM; -EIO if OpenSSL fails. */
int dg_hash_fd(int fd, struct dg_file_hash *out);

/* Hashes whatever read() returns from @p fd until end of file, from its current position,
 * whatever the file type (pipes, and pseudo-files such as /proc entries that report size 0).
 * No piece layer, no change check. @return 0, -EISDIR, -errno of a failed read, -ENOMEM,
 * -EIO. */
int dg_hash_stream(int fd, struct dg_file_hash *out);

/* Frees what dg_hash_fd() allocated in @p h (the struct itself is the caller's). */
void dg_file_hash_clear(struct dg_file_hash *h);

#endif
