/* SHA-256 merkle trees as in BitTorrent v2 (BEP 52). See merkle.h.
 *
 * Streaming works like a binary counter: a stack holds at most one pending (left) node per
 * level, and bit l of the number of nodes pushed says whether level l has one. Pushing a node
 * carries it upward while the level it lands on is occupied. Finishing folds the pending nodes
 * together, bottom up, padding with the hash of an all-zero subtree of the right level:
 * zero[0] = 32 zero bytes, zero[l + 1] = SHA-256(zero[l] || zero[l]). */
#include "engine/merkle.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#define HASH DG_MERKLE_HASH_SIZE
#define BLOCK DG_MERKLE_BLOCK_SIZE

/* Pending nodes of a tree being reduced from one row upward. Counts never exceed
 * 2^DG_MERKLE_MAX_LEVELS, so the levels in use are 0 .. DG_MERKLE_MAX_LEVELS. */
struct tree {
    uint8_t stack[DG_MERKLE_MAX_LEVELS + 1][HASH];
    uint64_t count; /* nodes pushed into the bottom row */
};

/* A row of the tree being collected: the nodes at one level, in order. */
struct layer {
    unsigned level; /* relative to the tree's bottom row */
    uint8_t *buf;
    uint64_t count;
    uint64_t cap;
};

struct dg_merkle_hasher {
    EVP_MD *md;        /* SHA-256, see fetch_sha256() */
    EVP_MD_CTX *block; /* SHA-256 of the block being fed */
    EVP_MD_CTX *node;  /* reused for the 64-byte inner nodes */
    uint64_t length;   /* bytes fed */
    size_t fill;       /* bytes of the current block fed into @block */
    int block_open;    /* @block has been initialised for the current block */
    int finished;
    int error;           /* sticky: a failed hasher refuses further use */
    uint64_t piece_size; /* 0 = no layer */
    struct layer layer;
    struct tree tree;
    uint8_t root[HASH];
};

/* SHA-256, fetched once per user: an implicit fetch on every EVP_DigestInit_ex (which
 * EVP_sha256() leads to in OpenSSL 3) more than doubles the cost of a 64-byte node hash.
 * NULL if OpenSSL cannot provide it (out of memory, broken provider configuration). */
static EVP_MD *fetch_sha256(void)
{
    return EVP_MD_fetch(NULL, "SHA256", NULL);
}

static int is_pow2(uint64_t x)
{
    return x != 0 && (x & (x - 1)) == 0;
}

/* log2 of a power of two. */
static unsigned log2_exact(uint64_t x)
{
    unsigned l = 0;

    while (x > 1) {
        x >>= 1;
        l++;
    }
    return l;
}

/* Smallest h with 2^h >= n, for n >= 1. */
static unsigned ceil_log2(uint64_t n)
{
    unsigned h = 0;

    while (h < 64 && ((uint64_t)1 << h) < n)
        h++;
    return h;
}

/* out = SHA-256(left || right); @p out may alias either input. */
static int hash_pair(EVP_MD_CTX *ctx, const EVP_MD *md, const uint8_t left[HASH],
                     const uint8_t right[HASH], uint8_t out[HASH])
{
    unsigned int n = 0;

    if (EVP_DigestInit_ex(ctx, md, NULL) != 1 || EVP_DigestUpdate(ctx, left, HASH) != 1 ||
        EVP_DigestUpdate(ctx, right, HASH) != 1 || EVP_DigestFinal_ex(ctx, out, &n) != 1 ||
        n != HASH)
        return -EIO;
    return 0;
}

/* Appends @p node to @p l. */
static int layer_append(struct layer *l, const uint8_t node[HASH])
{
    if (l->count == l->cap) {
        uint64_t cap = l->cap ? l->cap * 2 : 64;
        uint8_t *buf;

        if (cap > SIZE_MAX / HASH)
            return -ENOMEM;
        buf = realloc(l->buf, (size_t)cap * HASH);
        if (buf == NULL)
            return -ENOMEM;
        l->buf = buf;
        l->cap = cap;
    }
    memcpy(l->buf + l->count * HASH, node, HASH);
    l->count++;
    return 0;
}

/* Adds the next node of the bottom row and carries complete pairs upward. Every node that
 * completes at @p collect's level (the pushed node itself when that level is 0) is appended
 * to it; @p collect may be NULL. */
static int tree_push(struct tree *t, EVP_MD_CTX *ctx, const EVP_MD *md, const uint8_t node[HASH],
                     struct layer *collect)
{
    uint8_t cur[HASH];
    unsigned level = 0;
    int rc;

    if (t->count >= (uint64_t)1 << DG_MERKLE_MAX_LEVELS)
        return -EFBIG;
    memcpy(cur, node, HASH);
    for (;;) {
        if (collect != NULL && collect->level == level) {
            rc = layer_append(collect, cur);
            if (rc < 0)
                return rc;
        }
        if (!(t->count >> level & 1))
            break;
        rc = hash_pair(ctx, md, t->stack[level], cur, cur);
        if (rc < 0)
            return rc;
        level++;
    }
    memcpy(t->stack[level], cur, HASH);
    t->count++;
    return 0;
}

/* Folds the pending nodes of @p t (count >= 1) into the root of a tree of 2^@p height bottom
 * nodes, where 2^height >= count; the bottom row is at absolute level @p base, which picks the
 * zero-subtree hashes used as padding. If @p collect is given and the last node at its level
 * is a partial one (padded), that node is appended to it. */
static int tree_fold(const struct tree *t, EVP_MD_CTX *ctx, const EVP_MD *md, unsigned base,
                     unsigned height, struct layer *collect, uint8_t out[HASH])
{
    uint8_t zero[HASH];
    uint8_t cur[HASH];
    int have = 0; /* cur holds the partial node of the current level */
    int rc;

    memset(zero, 0, HASH);
    for (unsigned l = 0; l < base; l++) {
        rc = hash_pair(ctx, md, zero, zero, zero);
        if (rc < 0)
            return rc;
    }
    for (unsigned l = 0; l < height; l++) {
        if (t->count >> l & 1) {
            if (have)
                rc = hash_pair(ctx, md, t->stack[l], cur, cur);
            else
                rc = hash_pair(ctx, md, t->stack[l], zero, cur);
            have = 1;
        } else if (have) {
            rc = hash_pair(ctx, md, cur, zero, cur);
        } else {
            rc = 0;
        }
        if (rc == 0 && l + 1 < height)
            rc = hash_pair(ctx, md, zero, zero, zero);
        if (rc < 0)
            return rc;
        if (have && collect != NULL && collect->level == l + 1) {
            rc = layer_append(collect, cur);
            if (rc < 0)
                return rc;
        }
    }
    /* Nothing pending below @height: count is exactly 2^height, one complete node. */
    memcpy(out, have ? cur : t->stack[height], HASH);
    return 0;
}

uint64_t dg_merkle_block_count(uint64_t length)
{
    return length / BLOCK + (length % BLOCK != 0);
}

uint64_t dg_merkle_piece_size(uint64_t length)
{
    uint64_t blocks = dg_merkle_block_count(length);
    unsigned shift = 0;

    /* pieces = ceil(blocks / 2^shift); shift <= 50 - 10 since blocks < 2^50. */
    while ((blocks >> shift) + ((blocks & (((uint64_t)1 << shift) - 1)) != 0) >
           DG_MERKLE_MAX_PIECES)
        shift++;
    return (uint64_t)BLOCK << shift;
}

uint64_t dg_merkle_piece_count(uint64_t length)
{
    uint64_t piece = dg_merkle_piece_size(length);
    uint64_t n = length / piece + (length % piece != 0);

    return n ? n : 1;
}

int dg_merkle_hasher_new(uint64_t piece_size, struct dg_merkle_hasher **out)
{
    struct dg_merkle_hasher *h;

    *out = NULL;
    if (piece_size != 0 && (!is_pow2(piece_size) || piece_size < BLOCK ||
                            log2_exact(piece_size / BLOCK) > DG_MERKLE_MAX_LEVELS))
        return -EINVAL;
    h = calloc(1, sizeof(*h));
    if (h == NULL)
        return -ENOMEM;
    h->md = fetch_sha256();
    h->block = EVP_MD_CTX_new();
    h->node = EVP_MD_CTX_new();
    if (h->md == NULL || h->block == NULL || h->node == NULL) {
        dg_merkle_hasher_free(h);
        return -ENOMEM;
    }
    h->piece_size = piece_size;
    h->layer.level = piece_size ? log2_exact(piece_size / BLOCK) : UINT_MAX;
    *out = h;
    return 0;
}

/* Closes the current block: its hash becomes the next leaf. */
static int end_block(struct dg_merkle_hasher *h)
{
    uint8_t leaf[HASH];
    unsigned int n = 0;

    if (!h->block_open && EVP_DigestInit_ex(h->block, h->md, NULL) != 1)
        return -EIO;
    h->block_open = 0;
    h->fill = 0;
    if (EVP_DigestFinal_ex(h->block, leaf, &n) != 1 || n != HASH)
        return -EIO;
    return tree_push(&h->tree, h->node, h->md, leaf, h->piece_size ? &h->layer : NULL);
}

int dg_merkle_hasher_update(struct dg_merkle_hasher *h, const void *data, size_t len)
{
    const uint8_t *p = data;
    int rc = 0;

    if (h->error)
        return h->error;
    if (h->finished)
        return -EINVAL;
    if (len > UINT64_MAX - h->length)
        return -EFBIG;
    while (len > 0) {
        size_t take = BLOCK - h->fill;

        if (take > len)
            take = len;
        if (!h->block_open) {
            if (EVP_DigestInit_ex(h->block, h->md, NULL) != 1) {
                rc = -EIO;
                break;
            }
            h->block_open = 1;
        }
        if (EVP_DigestUpdate(h->block, p, take) != 1) {
            rc = -EIO;
            break;
        }
        h->fill += take;
        h->length += take;
        p += take;
        len -= take;
        if (h->fill == BLOCK) {
            rc = end_block(h);
            if (rc < 0)
                break;
        }
    }
    if (rc < 0)
        h->error = rc;
    return rc;
}

int dg_merkle_hasher_final(struct dg_merkle_hasher *h, uint8_t root[DG_MERKLE_HASH_SIZE],
                           uint64_t *length)
{
    uint64_t blocks_per_piece;
    int rc;

    if (h->error)
        return h->error;
    if (h->finished)
        return -EINVAL;
    /* The last, partial block; or the empty file, whose single leaf is SHA-256(""). */
    if (h->fill > 0 || h->tree.count == 0) {
        rc = end_block(h);
        if (rc < 0)
            goto fail;
    }
    rc = tree_fold(&h->tree, h->node, h->md, 0, ceil_log2(h->tree.count),
                   h->piece_size ? &h->layer : NULL, h->root);
    if (rc < 0)
        goto fail;
    if (h->piece_size) {
        blocks_per_piece = h->piece_size / BLOCK;
        if (h->tree.count <= blocks_per_piece) {
            /* One piece: the layer is the root alone (whatever was collected on the way). */
            h->layer.count = 0;
            rc = layer_append(&h->layer, h->root);
            if (rc < 0)
                goto fail;
        }
    }
    h->finished = 1;
    memcpy(root, h->root, HASH);
    if (length != NULL)
        *length = h->length;
    return 0;

fail:
    h->error = rc;
    return rc;
}

const uint8_t *dg_merkle_hasher_layer(const struct dg_merkle_hasher *h, uint64_t *count)
{
    if (!h->finished || h->piece_size == 0) {
        *count = 0;
        return NULL;
    }
    *count = h->layer.count;
    return h->layer.buf;
}

void dg_merkle_hasher_free(struct dg_merkle_hasher *h)
{
    if (h == NULL)
        return;
    EVP_MD_CTX_free(h->block);
    EVP_MD_CTX_free(h->node);
    EVP_MD_free(h->md);
    free(h->layer.buf);
    free(h);
}

int dg_merkle_root_of_buffer(const void *data, size_t len, uint8_t root[DG_MERKLE_HASH_SIZE])
{
    struct dg_merkle_hasher *h;
    int rc = dg_merkle_hasher_new(0, &h);

    if (rc < 0)
        return rc;
    rc = dg_merkle_hasher_update(h, data, len);
    if (rc == 0)
        rc = dg_merkle_hasher_final(h, root, NULL);
    dg_merkle_hasher_free(h);
    return rc;
}

int dg_merkle_sha256(const void *data, size_t len, uint8_t out[DG_MERKLE_HASH_SIZE])
{
    unsigned int n = 0;

    if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) != 1 || n != HASH)
        return -EIO;
    return 0;
}

int dg_merkle_subtree_root(const uint8_t *hashes, uint64_t count, unsigned level, uint64_t width,
                           uint8_t out[DG_MERKLE_HASH_SIZE])
{
    struct tree t; /* 1.6 KiB */
    EVP_MD *md;
    EVP_MD_CTX *ctx;
    unsigned height;
    int rc = 0;

    if (count == 0 || count > width || !is_pow2(width) || level > DG_MERKLE_MAX_LEVELS)
        return -EINVAL;
    height = log2_exact(width);
    if (height > DG_MERKLE_MAX_LEVELS - level)
        return -EINVAL;
    if (width == 1) {
        memcpy(out, hashes, HASH);
        return 0;
    }
    memset(&t, 0, sizeof(t));
    md = fetch_sha256();
    ctx = EVP_MD_CTX_new();
    if (md == NULL || ctx == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint64_t i = 0; i < count && rc == 0; i++)
        rc = tree_push(&t, ctx, md, hashes + i * HASH, NULL);
    if (rc == 0)
        rc = tree_fold(&t, ctx, md, level, height, NULL, out);
out:
    EVP_MD_CTX_free(ctx);
    EVP_MD_free(md);
    return rc;
}

int dg_merkle_verify_layer(const uint8_t root[DG_MERKLE_HASH_SIZE], uint64_t length,
                           const uint8_t *layer, uint64_t count)
{
    uint8_t got[HASH];
    unsigned level;
    int rc;

    if (layer == NULL || count != dg_merkle_piece_count(length))
        return -EINVAL;
    if (count == 1)
        return memcmp(layer, root, HASH) == 0 ? 0 : -EBADMSG;
    level = log2_exact(dg_merkle_piece_size(length) / BLOCK);
    rc = dg_merkle_subtree_root(layer, count, level, (uint64_t)1 << ceil_log2(count), got);
    if (rc < 0)
        return rc;
    return memcmp(got, root, HASH) == 0 ? 0 : -EBADMSG;
}
