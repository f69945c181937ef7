#include "fs/node_table.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FIRST_DYNAMIC_ID 16 /* ids below are for fixed nodes */

struct dg_node_table {
    pthread_mutex_t lock;
    struct dg_node **by_id, **by_key;
    size_t buckets, count;
    uint64_t next_id;
};

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

static uint64_t key_hash(const struct dg_node *n)
{
    uint64_t h = mix((uint64_t)n->kind);

    if (n->kind == DG_NODE_BYHASH_FILE) {
        uint64_t r;
        memcpy(&r, n->root, sizeof(r));
        return mix(h ^ r);
    }
    return mix(h ^ mix((uint64_t)n->dev) ^ (uint64_t)n->ino);
}

static int same_key(const struct dg_node *a, const struct dg_node *b)
{
    if (a->kind != b->kind)
        return 0;
    if (a->kind == DG_NODE_BYHASH_FILE)
        return memcmp(a->root, b->root, 32) == 0;
    if (a->kind == DG_NODE_ROOT || a->kind == DG_NODE_BYHASH_DIR)
        return 1;
    return a->dev == b->dev && a->ino == b->ino;
}

int dg_node_table_new(struct dg_node_table **out)
{
    struct dg_node_table *t = calloc(1, sizeof(*t));

    if (!t)
        return -ENOMEM;
    t->buckets = 1024;
    t->by_id = calloc(t->buckets, sizeof(*t->by_id));
    t->by_key = calloc(t->buckets, sizeof(*t->by_key));
    if (!t->by_id || !t->by_key) {
        free(t->by_id);
        free(t->by_key);
        free(t);
        return -ENOMEM;
    }
    pthread_mutex_init(&t->lock, NULL);
    t->next_id = FIRST_DYNAMIC_ID;
    *out = t;
    return 0;
}

static void free_node(struct dg_node *n)
{
    if (n->fd >= 0)
        close(n->fd);
    free(n);
}

void dg_node_table_free(struct dg_node_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->buckets; i++) {
        struct dg_node *n = t->by_id[i];
        while (n) {
            struct dg_node *next = n->next_by_id;
            free_node(n);
            n = next;
        }
    }
    free(t->by_id);
    free(t->by_key);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* Doubles the bucket arrays when the table gets crowded (best effort: on ENOMEM the table
 * just stays slower). */
static void grow(struct dg_node_table *t)
{
    size_t nb = t->buckets * 2;
    struct dg_node **by_id = calloc(nb, sizeof(*by_id));
    struct dg_node **by_key = calloc(nb, sizeof(*by_key));

    if (!by_id || !by_key) {
        free(by_id);
        free(by_key);
        return;
    }
    for (size_t i = 0; i < t->buckets; i++) {
        struct dg_node *n = t->by_id[i];
        while (n) {
            struct dg_node *next = n->next_by_id;
            size_t b = mix(n->id) & (nb - 1);
            n->next_by_id = by_id[b];
            by_id[b] = n;
            b = key_hash(n) & (nb - 1);
            n->next_by_key = by_key[b];
            by_key[b] = n;
            n = next;
        }
    }
    free(t->by_id);
    free(t->by_key);
    t->by_id = by_id;
    t->by_key = by_key;
    t->buckets = nb;
}

struct dg_node *dg_node_table_intern(struct dg_node_table *t, struct dg_node *fresh)
{
    struct dg_node *n;
    size_t b;

    pthread_mutex_lock(&t->lock);
    b = key_hash(fresh) & (t->buckets - 1);
    for (n = t->by_key[b]; n; n = n->next_by_key) {
        if (same_key(n, fresh)) {
            n->nlookup++;
            pthread_mutex_unlock(&t->lock);
            return n;
        }
    }
    if (t->count >= t->buckets)
        grow(t);
    if (fresh->id == 0)
        fresh->id = t->next_id++;
    fresh->nlookup = 1;
    b = key_hash(fresh) & (t->buckets - 1);
    fresh->next_by_key = t->by_key[b];
    t->by_key[b] = fresh;
    b = mix(fresh->id) & (t->buckets - 1);
    fresh->next_by_id = t->by_id[b];
    t->by_id[b] = fresh;
    t->count++;
    pthread_mutex_unlock(&t->lock);
    return fresh;
}

static struct dg_node *find_id(struct dg_node_table *t, uint64_t id)
{
    struct dg_node *n;

    for (n = t->by_id[mix(id) & (t->buckets - 1)]; n; n = n->next_by_id)
        if (n->id == id)
            return n;
    return NULL;
}

void dg_node_table_ref(struct dg_node_table *t, struct dg_node *n)
{
    pthread_mutex_lock(&t->lock);
    n->nlookup++;
    pthread_mutex_unlock(&t->lock);
}

struct dg_node *dg_node_table_get(struct dg_node_table *t, uint64_t id)
{
    struct dg_node *n;

    pthread_mutex_lock(&t->lock);
    n = find_id(t, id);
    pthread_mutex_unlock(&t->lock);
    return n;
}

static void unlink_from(struct dg_node **head, struct dg_node *n, int by_key)
{
    for (struct dg_node **pp = head; *pp; pp = by_key ? &(*pp)->next_by_key : &(*pp)->next_by_id) {
        if (*pp == n) {
            *pp = by_key ? n->next_by_key : n->next_by_id;
            return;
        }
    }
}

struct dg_node *dg_node_table_forget(struct dg_node_table *t, uint64_t id, uint64_t count)
{
    struct dg_node *n;

    pthread_mutex_lock(&t->lock);
    n = find_id(t, id);
    if (!n) {
        pthread_mutex_unlock(&t->lock);
        return NULL;
    }
    n->nlookup = count >= n->nlookup ? 0 : n->nlookup - count;
    if (n->nlookup > 0) {
        pthread_mutex_unlock(&t->lock);
        return NULL;
    }
    unlink_from(&t->by_id[mix(n->id) & (t->buckets - 1)], n, 0);
    unlink_from(&t->by_key[key_hash(n) & (t->buckets - 1)], n, 1);
    t->count--;
    pthread_mutex_unlock(&t->lock);
    return n;
}

void dg_node_table_each(struct dg_node_table *t, void (*fn)(void *arg, struct dg_node *n),
                        void *arg)
{
    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < t->buckets; i++)
        for (struct dg_node *n = t->by_id[i]; n; n = n->next_by_id)
            fn(arg, n);
    pthread_mutex_unlock(&t->lock);
}
