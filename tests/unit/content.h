/* Test content for unit tests: deterministic bytes (splitmix64) with their root and piece
 * layer, hashed through a file with dg_hash_fd() as the engine does. */
#ifndef DG_TEST_CONTENT_H
#define DG_TEST_CONTENT_H

#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/hash_file.h"
#include "engine/merkle.h"

struct content {
    uint8_t *data;
    size_t len;
    uint8_t root[32];
    uint64_t piece_size;
    uint8_t *layer;
    uint64_t layer_count;
};

/* Fills @p len bytes at @p p from splitmix64 seeded with @p seed. */
static inline void content_fill(uint8_t *p, size_t len, uint64_t seed)
{
    uint64_t s = seed;

    for (size_t i = 0; i < len; i += 8) {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        for (size_t k = 0; k < 8 && i + k < len; k++)
            p[i + k] = (uint8_t)(z >> (8 * k));
    }
}

/* @p len bytes of content from @p seed, hashed through a scratch file in @p dir. */
static inline struct content *content_make(const char *dir, size_t len, uint64_t seed)
{
    struct content *ct = calloc(1, sizeof(*ct));
    struct dg_file_hash h;
    char path[256];
    int fd;

    assert_non_null(ct);
    ct->data = malloc(len ? len : 1);
    assert_non_null(ct->data);
    ct->len = len;
    content_fill(ct->data, len, seed);
    snprintf(path, sizeof(path), "%s/content.tmp", dir);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, ct->data, len), (ssize_t)len);
    assert_int_equal(dg_hash_fd(fd, &h), 0);
    close(fd);
    unlink(path);
    assert_int_equal(h.length, len);
    assert_int_equal(h.piece_size, dg_merkle_piece_size(len));
    assert_int_equal(h.layer_count, dg_merkle_piece_count(len));
    memcpy(ct->root, h.root, 32);
    ct->piece_size = h.piece_size;
    ct->layer_count = h.layer_count;
    ct->layer = malloc(h.layer_count * 32);
    assert_non_null(ct->layer);
    memcpy(ct->layer, h.layer, h.layer_count * 32);
    dg_file_hash_clear(&h);
    return ct;
}

static inline void content_free(struct content *ct)
{
    if (!ct)
        return;
    free(ct->data);
    free(ct->layer);
    free(ct);
}

/* Length of block @p b of @p ct (the last one may be short). */
static inline size_t content_block_len(const struct content *ct, uint64_t b)
{
    size_t off = (size_t)b * DG_MERKLE_BLOCK_SIZE;

    return ct->len - off < DG_MERKLE_BLOCK_SIZE ? ct->len - off : DG_MERKLE_BLOCK_SIZE;
}

#endif
