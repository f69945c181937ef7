/* The inode table of the FUSE layer: every inode number the kernel holds maps to one node,
 * found either by number or by identity (kind plus backing inode, or kind plus root). Lookup
 * counts follow the kernel's exactly: each entry reply adds one, forget removes n, and a node
 * is freed when its count reaches zero.
 *
 * Thread safety: every function takes the table's lock; nodes returned stay valid while the
 * kernel holds a lookup on them (that is, during any request naming their inode). */
#ifndef DG_NODE_TABLE_H
#define DG_NODE_TABLE_H

#include <stdint.h>
#include <sys/types.h>

enum dg_node_kind {
    DG_NODE_ROOT = 1,    /* the mount point */
    DG_NODE_BYHASH_DIR,  /* by-hash/ */
    DG_NODE_BYNAME_DIR,  /* by-name/ and its subdirectories (mirrors of shared/ dirs) */
    DG_NODE_BYNAME_LINK, /* by-name/<path>: symlink to ../by-hash/<root> */
    DG_NODE_SHARED,      /* shared/ and everything below it: passthrough to the backing tree */
    DG_NODE_BYHASH_FILE, /* by-hash/<root> */
};

struct dg_node {
    uint64_t id; /* the FUSE inode number */
    enum dg_node_kind kind;
    uint64_t nlookup;
    /* identity */
    dev_t dev; /* backing device and inode (SHARED, BYNAME_*) */
    ino_t ino;
    uint8_t root[32]; /* BYHASH_FILE (and the current target of a BYNAME_LINK) */
    /* state, guarded by the node's owner (fs/ops.c) */
    int fd; /* O_PATH descriptor of the backing file or directory, or -1 */
    int is_dir;
    unsigned depth;   /* BYNAME_*: directories between by-name/ and this entry */
    uint64_t length;  /* BYHASH_FILE */
    unsigned writers; /* SHARED files: handles open for writing */
    int dirty;        /* SHARED files: written since the engine was last told */
    struct dg_node *next_by_id, *next_by_key;
};

struct dg_node_table; /* opaque */

/* Creates an empty table. @return 0 or -ENOMEM. */
int dg_node_table_new(struct dg_node_table **out);

/* Frees the table and every node in it (closing their descriptors). */
void dg_node_table_free(struct dg_node_table *t);

/* Adds @p fresh (allocated by the caller, identity filled in) unless a node with the same
 * identity exists. Either way the returned node has one more lookup. When another node is
 * returned, @p fresh is untouched and stays the caller's to free. @p fresh gets a new id
 * unless its id is already set (the fixed nodes). @return the node, never NULL. */
struct dg_node *dg_node_table_intern(struct dg_node_table *t, struct dg_node *fresh);

/* Adds one lookup to @p n, a node in the table (used for the fixed nodes). */
void dg_node_table_ref(struct dg_node_table *t, struct dg_node *n);

/* The node with inode number @p id, or NULL. */
struct dg_node *dg_node_table_get(struct dg_node_table *t, uint64_t id);

/* Removes @p n lookups from node @p id. @return the node if that was its last lookup (it is
 * out of the table; the caller frees it), else NULL. */
struct dg_node *dg_node_table_forget(struct dg_node_table *t, uint64_t id, uint64_t n);

/* Runs @p fn(arg, node) on every node with the lock held (fn must not call the table). */
void dg_node_table_each(struct dg_node_table *t, void (*fn)(void *arg, struct dg_node *n),
                        void *arg);

#endif
