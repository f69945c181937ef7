/* SHA-256 merkle trees as in BitTorrent v2 (BEP 52): content identity for digfs.
 *
 * A file is cut into 16 KiB blocks (the last one unpadded); each leaf is SHA-256 of its
 * block; the leaf row is padded with all-zero 32-byte hashes to a power of two; an inner node
 * is SHA-256(left || right). The root of a file of at most one block is SHA-256 of the file
 * (the root of the empty file is SHA-256 of the empty string).
 *
 * The piece layer is the row of the tree whose nodes each cover one piece of
 * dg_merkle_piece_size(length) bytes; the last entry covers a partial piece padded with zero
 * leaves. Peers use it to verify pieces and the leaf hashes of pieces.
 *
 * Thread safety: all functions are reentrant; a hasher belongs to one thread at a time. */
#ifndef DG_MERKLE_H
#define DG_MERKLE_H

#include <stddef.h>
#include <stdint.h>

#define DG_MERKLE_HASH_SIZE 32
#define DG_MERKLE_BLOCK_SIZE 16384u
/* The piece size is the smallest power of two >= one block giving at most this many pieces. */
#define DG_MERKLE_MAX_PIECES 1024u
/* Deepest tree supported: 2^DG_MERKLE_MAX_LEVELS blocks (16 KiB << 50 is far beyond any file). */
#define DG_MERKLE_MAX_LEVELS 50

struct dg_merkle_hasher; /* opaque */

/* Number of 16 KiB blocks in a file of @p length bytes (0 for the empty file). */
uint64_t dg_merkle_block_count(uint64_t length);

/* Piece size in bytes for a file of @p length: a power of two, at least DG_MERKLE_BLOCK_SIZE,
 * the smallest for which the file has at most DG_MERKLE_MAX_PIECES pieces. */
uint64_t dg_merkle_piece_size(uint64_t length);

/* Number of piece-layer entries for a file of @p length (at least 1; 1 for the empty file). */
uint64_t dg_merkle_piece_count(uint64_t length);

/* Creates a streaming hasher. When @p piece_size is non-zero (a power of two >= one block), the
 * hasher also collects the piece layer for that piece size.
 * @param[out] out  the new hasher, freed with dg_merkle_hasher_free().
 * @return 0, -EINVAL for a bad piece size, -ENOMEM. */
int dg_merkle_hasher_new(uint64_t piece_size, struct dg_merkle_hasher **out);

/* Feeds the next @p len bytes of the file. Memory use does not grow with the data fed, apart
 * from the piece layer (32 bytes per piece).
 * @return 0, -ENOMEM, -EIO if OpenSSL fails, -EFBIG past 2^64 - 1 bytes in all, -EINVAL after
 *         dg_merkle_hasher_final(). After -ENOMEM or -EIO the hasher returns that error for
 *         good. */
int dg_merkle_hasher_update(struct dg_merkle_hasher *h, const void *data, size_t len);

/* Finishes the tree.
 * @param[out] root         the 32-byte root.
 * @param[out] length       total bytes fed (may be NULL).
 * @return 0, -ENOMEM, -EIO, -EINVAL if called again. After this the hasher only accepts
 *         dg_merkle_hasher_layer() and dg_merkle_hasher_free(). */
int dg_merkle_hasher_final(struct dg_merkle_hasher *h, uint8_t root[DG_MERKLE_HASH_SIZE],
                           uint64_t *length);

/* The piece layer collected by a finished hasher made with a non-zero piece size:
 * @p count hashes of 32 bytes each, owned by the hasher (valid until dg_merkle_hasher_free()).
 * For a file that fits in one piece the layer is the root alone. NULL and a count of 0 before
 * dg_merkle_hasher_final() or for a hasher made with piece size 0. */
const uint8_t *dg_merkle_hasher_layer(const struct dg_merkle_hasher *h, uint64_t *count);

/* Frees a hasher (NULL is allowed). */
void dg_merkle_hasher_free(struct dg_merkle_hasher *h);

/* Hashes a whole buffer: root of @p len bytes at @p data. @return 0, -ENOMEM, -EIO. */
int dg_merkle_root_of_buffer(const void *data, size_t len, uint8_t root[DG_MERKLE_HASH_SIZE]);

/* SHA-256 of one buffer (a leaf hash for a block). @return 0 or -EIO. */
int dg_merkle_sha256(const void *data, size_t len, uint8_t out[DG_MERKLE_HASH_SIZE]);

/* Root of the subtree whose bottom row is @p count hashes at @p level (0 = leaves), padded with
 * the all-zero subtree hash of that level up to @p width entries (a power of two >= count).
 * Used to check a piece layer against a root (level of the pieces, width = next power of two
 * of the piece count) and leaf hashes against a piece hash (level 0, width = blocks per piece).
 * @return 0, -EINVAL (count 0, count > width, width not a power of two, or a tree deeper than
 *         DG_MERKLE_MAX_LEVELS: level + log2(width) > DG_MERKLE_MAX_LEVELS), -ENOMEM, -EIO. */
int dg_merkle_subtree_root(const uint8_t *hashes, uint64_t count, unsigned level, uint64_t width,
                           uint8_t out[DG_MERKLE_HASH_SIZE]);

/* Checks that @p count piece-layer hashes belong to the file of @p length with root @p root,
 * for the piece size dg_merkle_piece_size(length).
 * @return 0 if they do, -EBADMSG if they do not, -EINVAL if count is wrong for the length (or
 *         @p layer is NULL), -ENOMEM, -EIO. */
int dg_merkle_verify_layer(const uint8_t root[DG_MERKLE_HASH_SIZE], uint64_t length,
                           const uint8_t *layer, uint64_t count);

#endif
