/* Streaming merkle hashing of a file descriptor. See hash_file.h. */
#include "engine/hash_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1u << 20)

/* Same file, same size, same modification and change times. */
static int same_version(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* Feeds the regular file behind @p fd from offset 0 to EOF; -EAGAIN as soon as more than
 * @p size bytes turn up. */
static int feed_regular(int fd, uint64_t size, struct dg_merkle_hasher *h, uint8_t *buf)
{
    uint64_t off = 0;

    for (;;) {
        ssize_t n = pread(fd, buf, CHUNK, (off_t)off);
        int rc;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break;
        off += (uint64_t)n;
        if (off > size)
            return -EAGAIN; /* grew while being read */
        rc = dg_merkle_hasher_update(h, buf, (size_t)n);
        if (rc < 0)
            return rc;
    }
    return off == size ? 0 : -EAGAIN; /* shrank while being read */
}

/* Feeds everything read() returns until EOF. */
static int feed_stream(int fd, struct dg_merkle_hasher *h, uint8_t *buf)
{
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        int rc;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return 0;
        rc = dg_merkle_hasher_update(h, buf, (size_t)n);
        if (rc < 0)
            return rc;
    }
}

/* Hashes @p fd: as a regular file (pread, layer, change check) when @p regular is set, else
 * as a stream read to EOF from the current position. */
static int hash_fd(int fd, int regular, struct dg_file_hash *out)
{
    struct dg_merkle_hasher *h = NULL;
    struct stat st;
    struct stat after;
    uint8_t *buf = NULL;
    const uint8_t *layer;
    uint64_t count;
    int rc;

    memset(out, 0, sizeof(*out));
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISDIR(st.st_mode))
        return -EISDIR;
    regular = regular && S_ISREG(st.st_mode);
    if (regular)
        out->piece_size = dg_merkle_piece_size((uint64_t)st.st_size);
    rc = dg_merkle_hasher_new(out->piece_size, &h);
    if (rc < 0)
        goto fail;
    buf = malloc(CHUNK);
    if (buf == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    if (regular) {
        /* Advice only: failure changes nothing. */
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        rc = feed_regular(fd, (uint64_t)st.st_size, h, buf);
        if (rc == 0 && fstat(fd, &after) < 0)
            rc = -errno;
        if (rc == 0 && !same_version(&st, &after))
            rc = -EAGAIN;
    } else {
        rc = feed_stream(fd, h, buf);
    }
    if (rc < 0)
        goto fail;
    rc = dg_merkle_hasher_final(h, out->root, &out->length);
    if (rc < 0)
        goto fail;
    if (regular) {
        layer = dg_merkle_hasher_layer(h, &count);
        out->layer = malloc((size_t)count * DG_MERKLE_HASH_SIZE);
        if (out->layer == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        memcpy(out->layer, layer, (size_t)count * DG_MERKLE_HASH_SIZE);
        out->layer_count = count;
        out->st = st;
    }
    free(buf);
    dg_merkle_hasher_free(h);
    return 0;

fail:
    free(buf);
    dg_merkle_hasher_free(h);
    dg_file_hash_clear(out);
    return rc;
}

int dg_hash_fd(int fd, struct dg_file_hash *out)
{
    return hash_fd(fd, 1, out);
}

int dg_hash_stream(int fd, struct dg_file_hash *out)
{
    return hash_fd(fd, 0, out);
}

void dg_file_hash_clear(struct dg_file_hash *h)
{
    free(h->layer);
    memset(h, 0, sizeof(*h));
}
