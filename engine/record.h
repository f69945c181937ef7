/* Binary records stored in the piece cache's LMDB index. Values read back from disk are
 * untrusted input (a damaged or foreign index): decoders check every field and never read
 * past the buffer they are given.
 *
 * Thread safety: reentrant. */
#ifndef DG_RECORD_H
#define DG_RECORD_H

#include <stddef.h>
#include <stdint.h>

struct dg_shared_file;

#define DG_ROOT_RECORD_SIZE 40
#define DG_FILE_RECORD_HEADER 72
#define DG_FILE_RECORD_MAX (DG_FILE_RECORD_HEADER + 4095)

/* Value of the `roots` table. */
struct dg_root_record {
    uint32_t flags; /* DG_ROOT_* */
    uint64_t length;
    uint64_t piece_size;
    uint64_t blocks_cached; /* committed verified blocks in block storage */
    int64_t last_access;    /* unix seconds */
};

/* Writes @p rec into @p out (DG_ROOT_RECORD_SIZE bytes). */
void dg_root_record_encode(const struct dg_root_record *rec, uint8_t out[DG_ROOT_RECORD_SIZE]);

/* Reads a `roots` value. @return 0, or -EBADMSG for a wrong size, version, piece size (not the
 * one dg_merkle_piece_size() gives for the length) or block count. */
int dg_root_record_decode(const uint8_t *buf, size_t len, struct dg_root_record *out);

/* Writes the `files` value of @p f (everything but the inode, which is the key) into @p out.
 * @return bytes written, or 0 if @p size is too small or the path is empty or too long. */
size_t dg_file_record_encode(const struct dg_shared_file *f, uint8_t *out, size_t size);

/* Reads a `files` value into @p out (out->ino is left for the caller). @return 0, or -EBADMSG
 * for a wrong size, version or state, or a path that dg_relpath_check() rejects. */
int dg_file_record_decode(const uint8_t *buf, size_t len, struct dg_shared_file *out);

#endif
