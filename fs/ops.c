/* FUSE low-level operations for digfs. See ops.h for the tree and the threading rules. */
#include "fs/ops.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "engine/log.h"
#include "engine/root_name.h"
#include "fs/node_table.h"

#define ID_ROOT FUSE_ROOT_ID
#define ID_BYHASH 2
#define ID_BYNAME 3
#define ID_SHARED 4

#define XATTR_ROOT "user.digfs.root"
#define XATTR_BLOCKS "user.digfs.blocks"
#define XATTR_PINNED "user.digfs.pinned"
#define XATTR_CONTROL "user.digfs.control" /* on the mount point: the control socket's path */
#define HASHING_VALUE "hashing"

/* How long the kernel may trust what we said. by-name entries are recomputed on every
 * walk (a link's target and depth follow shared/); shared/ follows the passthrough
 * convention. A by-hash name is checked against the index on every walk (a cheap LMDB read),
 * so a root is gone the moment the unlink or rename that dropped it returns; its attributes
 * and page cache stay valid, since its bytes never change. */
#define SHARED_TIMEOUT 1.0
#define BYHASH_ENTRY_TIMEOUT 0.0
#define BYHASH_ATTR_TIMEOUT 3600.0
#define FIXED_TIMEOUT 3600.0

struct dg_fs {
    struct dg_engine *engine;
    struct dg_node_table *nodes;
    struct dg_node *root, *byhash, *byname, *shared;
    char *shared_real; /* resolved path of the backing shared/ directory */
    size_t shared_real_len;
    pthread_mutex_t lock; /* guards node state: writers, dirty, depth, root of links */
    uid_t uid;
    gid_t gid;
    struct timespec mount_time;
};

/* State of an open directory. */
struct dir_handle {
    DIR *dp; /* backing directory (shared/, by-name/) */
    off_t offset;
    struct dirent *entry;
    uint8_t *roots; /* by-hash/: snapshot of the held roots */
    size_t nroots;
};

/* A by-hash read waiting in the engine. */
struct pending_read {
    fuse_req_t req;
};

static pthread_key_t read_buf_key;
static pthread_once_t read_buf_once = PTHREAD_ONCE_INIT;

static struct dg_fs *fs_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static struct dg_node *node_of(fuse_req_t req, fuse_ino_t ino)
{
    return dg_node_table_get(fs_of(req)->nodes, ino);
}

/* ---------------------------------------------------------------- helpers */

static void make_read_buf_key(void)
{
    pthread_key_create(&read_buf_key, free);
}

/* A per-thread buffer of at least @p size bytes for by-hash reads. */
static void *read_buffer(size_t size)
{
    struct buf {
        size_t cap;
        char data[];
    } * b;

    pthread_once(&read_buf_once, make_read_buf_key);
    b = pthread_getspecific(read_buf_key);
    if (b && b->cap >= size)
        return b->data;
    free(b);
    b = malloc(sizeof(*b) + size);
    pthread_setspecific(read_buf_key, b);
    if (!b)
        return NULL;
    b->cap = size;
    return b->data;
}

/* Path of a node's O_PATH descriptor, for calls that do not take one. */
static void fd_path(int fd, char buf[64])
{
    snprintf(buf, 64, "/proc/self/fd/%d", fd);
}

/* Relative path inside shared/ of the SHARED node @p n ("" for shared/ itself).
 * @return 0, -ENOENT if it was deleted or is outside shared/, -ENAMETOOLONG. */
static int shared_relpath(struct dg_fs *fs, const struct dg_node *n, char *out, size_t size)
{
    char link[64], target[PATH_MAX + 1];
    ssize_t len;

    fd_path(n->fd, link);
    len = readlink(link, target, sizeof(target) - 1);
    if (len < 0)
        return -errno;
    target[len] = '\0';
    if ((size_t)len < fs->shared_real_len ||
        memcmp(target, fs->shared_real, fs->shared_real_len) != 0)
        return -ENOENT;
    if ((size_t)len > 10 && strcmp(target + len - 10, " (deleted)") == 0)
        return -ENOENT;
    if ((size_t)len == fs->shared_real_len) {
        out[0] = '\0';
        return 0;
    }
    if (target[fs->shared_real_len] != '/')
        return -ENOENT;
    if ((size_t)len - fs->shared_real_len >= size)
        return -ENAMETOOLONG;
    memcpy(out, target + fs->shared_real_len + 1, (size_t)len - fs->shared_real_len);
    return 0;
}

/* Relative path of @p name inside the SHARED directory @p dir. */
static int child_relpath(struct dg_fs *fs, const struct dg_node *dir, const char *name, char *out,
                         size_t size)
{
    int rc = shared_relpath(fs, dir, out, size);
    size_t len;

    if (rc < 0)
        return rc;
    len = strlen(out);
    if (len + strlen(name) + 2 > size)
        return -ENAMETOOLONG;
    if (len)
        out[len++] = '/';
    strcpy(out + len, name);
    return 0;
}

/* Asks the engine to look at a file it did not know or had a stale snapshot of. */
static void check_shared(struct dg_fs *fs, const struct dg_node *n)
{
    char rel[PATH_MAX];

    if (shared_relpath(fs, n, rel, sizeof(rel)) == 0 && rel[0])
        dg_engine_shared_check(fs->engine, rel);
}

static void notify_written(struct dg_fs *fs, const struct dg_node *n)
{
    char rel[PATH_MAX];

    if (shared_relpath(fs, n, rel, sizeof(rel)) == 0 && rel[0])
        dg_engine_shared_written(fs->engine, rel);
}

static void fill_dir_attr(struct dg_fs *fs, struct stat *st, fuse_ino_t ino, mode_t mode)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = S_IFDIR | mode;
    st->st_nlink = 2;
    st->st_uid = fs->uid;
    st->st_gid = fs->gid;
    st->st_atim = st->st_mtim = st->st_ctim = fs->mount_time;
    st->st_blksize = 4096;
}

static int byhash_attr(struct dg_fs *fs, const struct dg_node *n, struct stat *st)
{
    struct dg_root_info info;
    int rc = dg_engine_root_info(fs->engine, n->root, &info);

    if (rc < 0)
        return rc;
    memset(st, 0, sizeof(*st));
    st->st_ino = n->id;
    st->st_mode = S_IFREG | 0444;
    st->st_nlink = 1;
    st->st_uid = fs->uid;
    st->st_gid = fs->gid;
    st->st_size = (off_t)info.length;
    st->st_blksize = 1 << 20;
    uint64_t held = info.shared_files ? info.length : info.blocks_cached * 16384;
    st->st_blocks = (blkcnt_t)((held < info.length ? held : info.length) + 511) / 512;
    st->st_atim = st->st_mtim = st->st_ctim = fs->mount_time;
    return 0;
}

static void link_target(const struct dg_node *n, char *out, size_t size)
{
    char hex[DG_ROOT_HEX_LEN + 1];
    size_t pos = 0;

    dg_root_format(n->root, hex);
    for (unsigned i = 0; i <= n->depth && pos + 3 < size; i++) {
        memcpy(out + pos, "../", 3);
        pos += 3;
    }
    snprintf(out + pos, size - pos, "by-hash/%s", hex);
}

/* Attributes of any node. */
static int node_attr(struct dg_fs *fs, struct dg_node *n, struct stat *st)
{
    char target[PATH_MAX];

    switch (n->kind) {
    case DG_NODE_ROOT:
        fill_dir_attr(fs, st, n->id, 0755);
        st->st_nlink = 5;
        return 0;
    case DG_NODE_BYHASH_DIR:
        fill_dir_attr(fs, st, n->id, 0555);
        return 0;
    case DG_NODE_BYNAME_DIR:
        if (fstatat(n->fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
            return -errno;
        fill_dir_attr(fs, st, n->id, 0555);
        return 0;
    case DG_NODE_BYNAME_LINK:
        fill_dir_attr(fs, st, n->id, 0777);
        st->st_mode = S_IFLNK | 0777;
        st->st_nlink = 1;
        pthread_mutex_lock(&fs->lock);
        link_target(n, target, sizeof(target));
        pthread_mutex_unlock(&fs->lock);
        st->st_size = (off_t)strlen(target);
        return 0;
    case DG_NODE_SHARED:
        if (fstatat(n->fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
            return -errno;
        st->st_ino = n->id;
        return 0;
    case DG_NODE_BYHASH_FILE:
        return byhash_attr(fs, n, st);
    }
    return -EIO;
}

static struct dg_node *new_node(enum dg_node_kind kind)
{
    struct dg_node *n = calloc(1, sizeof(*n));

    if (n) {
        n->kind = kind;
        n->fd = -1;
    }
    return n;
}

/* Interns @p fresh and replies with its entry; frees @p fresh when an equal node existed. */
static void reply_node(fuse_req_t req, struct dg_node *fresh, double entry_timeout,
                       double attr_timeout)
{
    struct dg_fs *fs = fs_of(req);
    struct fuse_entry_param e;
    struct dg_node *n = dg_node_table_intern(fs->nodes, fresh);
    int rc;

    if (n != fresh) {
        /* Known already: keep its descriptor, refresh what may have moved. */
        pthread_mutex_lock(&fs->lock);
        n->depth = fresh->depth;
        if (fresh->kind == DG_NODE_BYNAME_LINK)
            memcpy(n->root, fresh->root, 32);
        pthread_mutex_unlock(&fs->lock);
        if (fresh->fd >= 0)
            close(fresh->fd);
        free(fresh);
    }
    memset(&e, 0, sizeof(e));
    e.ino = n->id;
    e.entry_timeout = entry_timeout;
    e.attr_timeout = attr_timeout;
    rc = node_attr(fs, n, &e.attr);
    if (rc < 0) {
        struct dg_node *gone = dg_node_table_forget(fs->nodes, n->id, 1);
        if (gone) {
            if (gone->fd >= 0)
                close(gone->fd);
            free(gone);
        }
        fuse_reply_err(req, -rc);
        return;
    }
    if (fuse_reply_entry(req, &e) != 0) {
        /* The kernel did not take the lookup (interrupted): drop it again. */
        struct dg_node *gone = dg_node_table_forget(fs->nodes, n->id, 1);
        if (gone) {
            if (gone->fd >= 0)
                close(gone->fd);
            free(gone);
        }
    }
}

static void reply_fixed(fuse_req_t req, struct dg_node *n)
{
    struct dg_fs *fs = fs_of(req);
    struct fuse_entry_param e;

    dg_node_table_ref(fs->nodes, n);
    memset(&e, 0, sizeof(e));
    e.ino = n->id;
    e.entry_timeout = e.attr_timeout = FIXED_TIMEOUT;
    if (node_attr(fs, n, &e.attr) < 0 || fuse_reply_entry(req, &e) != 0)
        dg_node_table_forget(fs->nodes, n->id, 1); /* fixed nodes never reach zero */
}

/* ---------------------------------------------------------------- lookup */

/* Looks @p name up in the backing directory of @p parent; only regular files and directories
 * are visible. @p st receives the backing stat; @p fd an O_PATH descriptor (may be NULL). */
static int backing_lookup(const struct dg_node *parent, const char *name, struct stat *st, int *fd)
{
    int rc;

    if (fstatat(parent->fd, name, st, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    if (!S_ISREG(st->st_mode) && !S_ISDIR(st->st_mode))
        return -ENOENT;
    if (!fd)
        return 0;
    *fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (*fd < 0)
        return -errno;
    struct stat check;
    rc = fstatat(*fd, "", &check, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
    if (rc < 0 || check.st_ino != st->st_ino || check.st_dev != st->st_dev) {
        close(*fd); /* replaced between the two calls */
        return -EAGAIN;
    }
    return 0;
}

static void lookup_shared(fuse_req_t req, struct dg_node *parent, const char *name)
{
    struct dg_node *n;
    struct stat st;
    int fd = -1, rc;

    do {
        rc = backing_lookup(parent, name, &st, &fd);
    } while (rc == -EAGAIN);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    n = new_node(DG_NODE_SHARED);
    if (!n) {
        close(fd);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    n->fd = fd;
    n->dev = st.st_dev;
    n->ino = st.st_ino;
    n->is_dir = S_ISDIR(st.st_mode);
    reply_node(req, n, SHARED_TIMEOUT, SHARED_TIMEOUT);
}

static void lookup_byname(fuse_req_t req, struct dg_node *parent, const char *name)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n;
    struct stat st;
    uint8_t root[32];
    unsigned depth;
    int rc;

    rc = backing_lookup(parent, name, &st, NULL);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    pthread_mutex_lock(&fs->lock);
    depth = parent->depth; /* by-name/ itself is 0, by-name/a is 1, ... */
    pthread_mutex_unlock(&fs->lock);
    if (S_ISREG(st.st_mode)) {
        rc = dg_engine_shared_root(fs->engine, &st, root);
        if (rc < 0) {
            fuse_reply_err(req, ENOENT); /* not hashed (yet) */
            return;
        }
        n = new_node(DG_NODE_BYNAME_LINK);
        if (!n) {
            fuse_reply_err(req, ENOMEM);
            return;
        }
        memcpy(n->root, root, 32);
        n->depth = depth; /* the link climbs depth + 1 levels to the mount point */
    } else {
        n = new_node(DG_NODE_BYNAME_DIR);
        if (!n) {
            fuse_reply_err(req, ENOMEM);
            return;
        }
        n->fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC | O_DIRECTORY);
        if (n->fd < 0) {
            rc = errno;
            free(n);
            fuse_reply_err(req, rc);
            return;
        }
        n->is_dir = 1;
        n->depth = depth + 1;
    }
    n->dev = st.st_dev;
    n->ino = st.st_ino;
    reply_node(req, n, 0.0, 0.0);
}

/* Replies to a by-hash lookup of a root the index knows. */
static void reply_byhash(fuse_req_t req, const uint8_t root[32])
{
    struct dg_fs *fs = fs_of(req);
    struct dg_root_info info;
    struct dg_content *c;
    struct dg_node *n;

    if (dg_engine_root_info(fs->engine, root, &info) < 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (info.blocks_cached == 0 && info.shared_files > 0) {
        /* Held only by shared files: make sure one is still intact. */
        if (dg_engine_open(fs->engine, root, &c) < 0) {
            fuse_reply_err(req, ENOENT);
            return;
        }
        dg_content_unref(c);
    }
    n = new_node(DG_NODE_BYHASH_FILE);
    if (!n) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    memcpy(n->root, root, 32);
    n->length = info.length;
    reply_node(req, n, BYHASH_ENTRY_TIMEOUT, BYHASH_ATTR_TIMEOUT);
}

/* A lookup of a root this node does not hold, waiting on the swarm. */
struct pending_lookup {
    fuse_req_t req;
    uint8_t root[32];
};

static void lookup_done(void *arg, int status)
{
    struct pending_lookup *pl = arg;

    if (status == 0)
        reply_byhash(pl->req, pl->root);
    else
        fuse_reply_err(pl->req, status == -EINTR ? EINTR : status == -ENOMEM ? ENOMEM : ENOENT);
    free(pl);
}

static void lookup_interrupted(fuse_req_t req, void *data)
{
    dg_engine_cancel(fs_of(req)->engine, (uint64_t)(uintptr_t)data);
}

static void lookup_byhash(fuse_req_t req, const char *name)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_root_info info;
    struct pending_lookup *pl;
    uint8_t root[32];
    uint64_t token;

    if (dg_root_parse(name, strlen(name), root) < 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (dg_engine_root_info(fs->engine, root, &info) == 0 || !dg_engine_networked(fs->engine)) {
        reply_byhash(req, root);
        return;
    }
    /* Not held: the swarm is asked, and the engine answers (found, timeout or interrupt). */
    if (!(pl = malloc(sizeof(*pl)))) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    pl->req = req;
    memcpy(pl->root, root, 32);
    token = dg_engine_read_token(fs->engine);
    fuse_req_interrupt_func(req, lookup_interrupted, (void *)(uintptr_t)token);
    if (dg_engine_lookup_as(fs->engine, token, root, lookup_done, pl) < 0) {
        free(pl);
        fuse_reply_err(req, ENOMEM);
    }
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *p = node_of(req, parent);

    if (!p) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    switch (p->kind) {
    case DG_NODE_ROOT:
        if (strcmp(name, "shared") == 0)
            reply_fixed(req, fs->shared);
        else if (strcmp(name, "by-hash") == 0)
            reply_fixed(req, fs->byhash);
        else if (strcmp(name, "by-name") == 0)
            reply_fixed(req, fs->byname);
        else
            fuse_reply_err(req, ENOENT);
        return;
    case DG_NODE_BYHASH_DIR:
        lookup_byhash(req, name);
        return;
    case DG_NODE_BYNAME_DIR:
        lookup_byname(req, p, name);
        return;
    case DG_NODE_SHARED:
        if (!p->is_dir)
            fuse_reply_err(req, ENOTDIR);
        else
            lookup_shared(req, p, name);
        return;
    default:
        fuse_reply_err(req, ENOTDIR);
    }
}

static void drop_lookups(struct dg_fs *fs, fuse_ino_t ino, uint64_t n)
{
    struct dg_node *gone = dg_node_table_forget(fs->nodes, ino, n);

    if (gone) {
        if (gone->fd >= 0)
            close(gone->fd);
        free(gone);
    }
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    drop_lookups(fs_of(req), ino, nlookup);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    for (size_t i = 0; i < count; i++)
        drop_lookups(fs_of(req), forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
}

/* ---------------------------------------------------------------- attributes */

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    struct stat st;
    int rc;

    (void)fi;
    if (!n) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    rc = node_attr(fs, n, &st);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    double timeout = n->kind == DG_NODE_SHARED        ? SHARED_TIMEOUT
                     : n->kind == DG_NODE_BYHASH_FILE ? BYHASH_ATTR_TIMEOUT
                     : n->kind == DG_NODE_BYNAME_LINK || n->kind == DG_NODE_BYNAME_DIR
                         ? 0.0
                         : FIXED_TIMEOUT;
    fuse_reply_attr(req, &st, timeout);
}

static int shared_setattr(struct dg_fs *fs, struct dg_node *n, struct stat *attr, int valid,
                          struct fuse_file_info *fi)
{
    char path[64];
    int fd = fi ? (int)fi->fh : -1;

    fd_path(n->fd, path);
    if (valid & FUSE_SET_ATTR_MODE) {
        if ((fd >= 0 ? fchmod(fd, attr->st_mode) : chmod(path, attr->st_mode)) < 0)
            return -errno;
    }
    if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        uid_t uid = (valid & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
        gid_t gid = (valid & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
        if (fchownat(n->fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
            return -errno;
    }
    if (valid & FUSE_SET_ATTR_SIZE) {
        if ((fd >= 0 ? ftruncate(fd, attr->st_size) : truncate(path, attr->st_size)) < 0)
            return -errno;
    }
    if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
        struct timespec tv[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        if (valid & FUSE_SET_ATTR_ATIME_NOW)
            tv[0].tv_nsec = UTIME_NOW;
        else if (valid & FUSE_SET_ATTR_ATIME)
            tv[0] = attr->st_atim;
        if (valid & FUSE_SET_ATTR_MTIME_NOW)
            tv[1].tv_nsec = UTIME_NOW;
        else if (valid & FUSE_SET_ATTR_MTIME)
            tv[1] = attr->st_mtim;
        if ((fd >= 0 ? futimens(fd, tv) : utimensat(AT_FDCWD, path, tv, 0)) < 0)
            return -errno;
    }
    if (n->is_dir)
        return 0;
    int content = valid & (FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW);
    pthread_mutex_lock(&fs->lock);
    int open_for_write = n->writers > 0;
    if (content && open_for_write)
        n->dirty = 1;
    pthread_mutex_unlock(&fs->lock);
    if (open_for_write)
        return 0; /* the engine hears of it when the last writer closes */
    if (content) {
        notify_written(fs, n);
    } else if (valid & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        char rel[PATH_MAX];
        if (shared_relpath(fs, n, rel, sizeof(rel)) == 0 && rel[0])
            dg_engine_shared_attr_changed(fs->engine, rel);
    }
    return 0;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid,
                       struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    int rc;

    if (!n) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    if (n->kind != DG_NODE_SHARED || n->id == ID_SHARED) {
        fuse_reply_err(req, n->kind == DG_NODE_SHARED ? EPERM : EROFS);
        return;
    }
    rc = shared_setattr(fs, n, attr, valid, fi);
    if (rc < 0) {
        fuse_reply_err(req, -rc);
        return;
    }
    op_getattr(req, ino, fi);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    char target[PATH_MAX];

    if (!n || n->kind != DG_NODE_BYNAME_LINK) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    pthread_mutex_lock(&fs->lock);
    link_target(n, target, sizeof(target));
    pthread_mutex_unlock(&fs->lock);
    fuse_reply_readlink(req, target);
}

/* ---------------------------------------------------------------- changing shared/ */

/* The SHARED directory node @p parent, or NULL after replying with an error. */
static struct dg_node *shared_dir(fuse_req_t req, fuse_ino_t parent, int (*check)(const char *),
                                  const char *name)
{
    struct dg_node *p = node_of(req, parent);

    if (!p) {
        fuse_reply_err(req, ESTALE);
        return NULL;
    }
    if (p->kind != DG_NODE_SHARED) {
        fuse_reply_err(req, p->kind == DG_NODE_ROOT ? EPERM : EROFS);
        return NULL;
    }
    if (!p->is_dir) {
        fuse_reply_err(req, ENOTDIR);
        return NULL;
    }
    if (check && check(name) < 0) {
        fuse_reply_err(req, EINVAL);
        return NULL;
    }
    return p;
}

static int name_ok(const char *name)
{
    return dg_name_check(name, strlen(name));
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    struct dg_node *p = shared_dir(req, parent, name_ok, name);

    if (!p)
        return;
    if (mkdirat(p->fd, name, mode) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    lookup_shared(req, p, name);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    struct dg_node *p = shared_dir(req, parent, name_ok, name);

    if (!p)
        return;
    if (!S_ISREG(mode)) {
        fuse_reply_err(req, EPERM); /* shared/ holds regular files and directories only */
        return;
    }
    if (mknodat(p->fd, name, mode, rdev) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    char rel[PATH_MAX];
    if (child_relpath(fs_of(req), p, name, rel, sizeof(rel)) == 0)
        dg_engine_shared_written(fs_of(req)->engine, rel);
    lookup_shared(req, p, name);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    (void)link;
    (void)parent;
    (void)name;
    fuse_reply_err(req, EPERM);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char *name)
{
    (void)ino;
    (void)parent;
    (void)name;
    fuse_reply_err(req, EPERM);
}

/* Completes a request that waited for the engine to apply a change to the index. */
static void reply_ok(void *arg)
{
    fuse_reply_err((fuse_req_t)arg, 0);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct dg_node *p = shared_dir(req, parent, NULL, name);
    struct stat st;

    if (!p)
        return;
    if (fstatat(p->fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (unlinkat(p->fd, name, 0) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (S_ISREG(st.st_mode) && st.st_nlink <= 1)
        dg_engine_shared_removed(fs_of(req)->engine, (uint64_t)st.st_ino, reply_ok, req);
    else
        fuse_reply_err(req, 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct dg_node *p = shared_dir(req, parent, NULL, name);

    if (!p)
        return;
    fuse_reply_err(req, unlinkat(p->fd, name, AT_REMOVEDIR) < 0 ? errno : 0);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *p = shared_dir(req, parent, NULL, name);
    struct dg_node *np;
    char from[PATH_MAX], to[PATH_MAX];
    struct stat src, dst;
    int replaced = 0;

    if (!p || !(np = shared_dir(req, newparent, name_ok, newname)))
        return;
    if (flags & RENAME_EXCHANGE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (child_relpath(fs, p, name, from, sizeof(from)) < 0 ||
        child_relpath(fs, np, newname, to, sizeof(to)) < 0) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    if (fstatat(p->fd, name, &src, AT_SYMLINK_NOFOLLOW) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (fstatat(np->fd, newname, &dst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(dst.st_mode) &&
        dst.st_ino != src.st_ino && dst.st_nlink <= 1)
        replaced = 1;
    if (renameat2(p->fd, name, np->fd, newname, flags) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    /* Answered by the engine once the index has the new paths. */
    dg_engine_shared_renamed(fs->engine, from, to, replaced ? (uint64_t)dst.st_ino : 0, reply_ok,
                             req);
}

/* ---------------------------------------------------------------- files */

static int open_backing(const struct dg_node *n, int flags)
{
    char path[64];

    fd_path(n->fd, path);
    return open(path, (flags & ~O_NOFOLLOW) | O_CLOEXEC);
}

static int is_writer(int flags)
{
    return (flags & O_ACCMODE) != O_RDONLY;
}

static void note_open(struct dg_fs *fs, struct dg_node *n, int flags, int created)
{
    pthread_mutex_lock(&fs->lock);
    if (is_writer(flags))
        n->writers++;
    if (created || (flags & O_TRUNC))
        n->dirty = 1;
    pthread_mutex_unlock(&fs->lock);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *p = shared_dir(req, parent, name_ok, name);
    struct dg_node *n, *fresh;
    struct fuse_entry_param e;
    struct stat st;
    int fd, pfd, rc;

    if (!p)
        return;
    fd = openat(p->fd, name, (fi->flags | O_CREAT) & ~O_NOFOLLOW, mode);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    pfd = openat(p->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (pfd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = pfd < 0 ? errno : EIO;
        if (pfd >= 0)
            close(pfd);
        close(fd);
        fuse_reply_err(req, rc);
        return;
    }
    fresh = new_node(DG_NODE_SHARED);
    if (!fresh) {
        close(pfd);
        close(fd);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fresh->fd = pfd;
    fresh->dev = st.st_dev;
    fresh->ino = st.st_ino;
    n = dg_node_table_intern(fs->nodes, fresh);
    if (n != fresh) {
        close(fresh->fd);
        free(fresh);
    }
    note_open(fs, n, fi->flags, 1);
    memset(&e, 0, sizeof(e));
    e.ino = n->id;
    e.entry_timeout = e.attr_timeout = SHARED_TIMEOUT;
    e.attr = st;
    e.attr.st_ino = n->id;
    fi->fh = (uint64_t)fd;
    if (fuse_reply_create(req, &e, fi) != 0) {
        close(fd);
        pthread_mutex_lock(&fs->lock);
        if (is_writer(fi->flags))
            n->writers--;
        pthread_mutex_unlock(&fs->lock);
        drop_lookups(fs, n->id, 1);
    }
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    struct dg_content *c;
    int fd, rc;

    if (!n) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    if (n->kind == DG_NODE_BYHASH_FILE) {
        if (is_writer(fi->flags) || (fi->flags & O_TRUNC)) {
            fuse_reply_err(req, EACCES);
            return;
        }
        rc = dg_engine_open(fs->engine, n->root, &c);
        if (rc < 0) {
            fuse_reply_err(req, -rc);
            return;
        }
        fi->fh = (uintptr_t)c;
        fi->keep_cache = 1; /* the bytes of a root never change */
        fi->noflush = 1;
        if (fuse_reply_open(req, fi) != 0)
            dg_content_unref(c);
        return;
    }
    if (n->kind != DG_NODE_SHARED || n->is_dir) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fd = open_backing(n, fi->flags);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    note_open(fs, n, fi->flags, 0);
    fi->fh = (uint64_t)fd;
    if (fuse_reply_open(req, fi) != 0) {
        close(fd);
        pthread_mutex_lock(&fs->lock);
        if (is_writer(fi->flags))
            n->writers--;
        pthread_mutex_unlock(&fs->lock);
    }
}

static void read_done(void *arg, ssize_t status, const void *data)
{
    struct pending_read *pr = arg;

    if (status < 0)
        fuse_reply_err(pr->req, (int)-status);
    else
        fuse_reply_buf(pr->req, data, (size_t)status);
    free(pr);
}

static void read_interrupted(fuse_req_t req, void *data)
{
    /* @p data is the engine's token itself, not a pointer: the read may have completed and
     * its state been freed by the time libfuse calls this. */
    dg_engine_cancel(fs_of(req)->engine, (uint64_t)(uintptr_t)data);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);

    if (n && n->kind == DG_NODE_BYHASH_FILE) {
        struct dg_content *c = (struct dg_content *)(uintptr_t)fi->fh;
        void *buf = read_buffer(size);
        ssize_t got;

        if (!buf) {
            fuse_reply_err(req, ENOMEM);
            return;
        }
        got = dg_content_read(c, buf, size, (uint64_t)off);
        if (got >= 0) {
            dg_engine_read_hint(fs->engine, c, (uint64_t)off, (size_t)got);
            fuse_reply_buf(req, buf, (size_t)got);
            return;
        }
        if (got != -EAGAIN) {
            fuse_reply_err(req, (int)-got);
            return;
        }
        /* Not held yet: the engine answers when it is, or on timeout or interrupt. */
        struct pending_read *pr = malloc(sizeof(*pr));
        uint64_t token;
        if (!pr) {
            fuse_reply_err(req, ENOMEM);
            return;
        }
        pr->req = req;
        /* The interrupt handler goes in first: once the read is posted, the engine may
         * answer (and libfuse free the request) at any moment. */
        token = dg_engine_read_token(fs->engine);
        fuse_req_interrupt_func(req, read_interrupted, (void *)(uintptr_t)token);
        if (dg_engine_read_as(fs->engine, token, c, (uint64_t)off, size, read_done, pr) < 0) {
            free(pr);
            fuse_reply_err(req, ENOMEM);
        }
        return;
    }
    /* shared/: pread into this thread's buffer. (libfuse's fd buffers allocate 1 MiB per
     * request, and its splice path measured slower still: bench/RESULTS.md.) */
    char *buf = read_buffer(size);
    size_t done = 0;
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    while (done < size) {
        ssize_t r = pread((int)fi->fh, buf + done, size - done, off + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fuse_reply_err(req, errno);
            return;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    fuse_reply_buf(req, buf, done);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    ssize_t w;

    if (!n || n->kind != DG_NODE_SHARED) {
        fuse_reply_err(req, EBADF);
        return;
    }
    pthread_mutex_lock(&fs->lock);
    n->dirty = 1;
    pthread_mutex_unlock(&fs->lock);
    do {
        w = pwrite((int)fi->fh, data, size, off);
    } while (w < 0 && errno == EINTR);
    if (w < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_write(req, (size_t)w);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dg_node *n = node_of(req, ino);

    if (n && n->kind == DG_NODE_SHARED) {
        /* Like close() of a duplicate: reports delayed write errors, drops POSIX locks. */
        int fd = dup((int)fi->fh);
        fuse_reply_err(req, fd < 0 || close(fd) < 0 ? errno : 0);
        return;
    }
    fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    int tell = 0;

    if (n && n->kind == DG_NODE_BYHASH_FILE) {
        dg_content_unref((struct dg_content *)(uintptr_t)fi->fh);
        fuse_reply_err(req, 0);
        return;
    }
    close((int)fi->fh);
    if (n && n->kind == DG_NODE_SHARED) {
        pthread_mutex_lock(&fs->lock);
        if (is_writer(fi->flags) && n->writers > 0)
            n->writers--;
        if (n->writers == 0 && n->dirty) {
            n->dirty = 0;
            tell = 1;
        }
        pthread_mutex_unlock(&fs->lock);
        if (tell)
            notify_written(fs, n);
    }
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct dg_node *n = node_of(req, ino);
    int rc = 0;

    if (n && n->kind == DG_NODE_SHARED)
        rc = (datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh)) < 0 ? errno : 0;
    fuse_reply_err(req, rc);
}

/* ---------------------------------------------------------------- directories */

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    struct dir_handle *d;
    int rc = 0;

    if (!n) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    d = calloc(1, sizeof(*d));
    if (!d) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (n->kind == DG_NODE_SHARED || n->kind == DG_NODE_BYNAME_DIR) {
        if (!n->is_dir) {
            rc = ENOTDIR;
        } else {
            int fd = openat(n->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            d->dp = fd >= 0 ? fdopendir(fd) : NULL;
            if (!d->dp) {
                rc = errno;
                if (fd >= 0)
                    close(fd);
            }
        }
    } else if (n->kind == DG_NODE_BYHASH_DIR) {
        /* A snapshot taken at opendir: offsets stay stable while roots come and go. */
        size_t cap = 1024, got;
        const uint8_t *after = NULL;
        d->roots = malloc(cap * 32);
        while (d->roots && rc == 0) {
            rc = -dg_engine_list_roots(fs->engine, after, d->roots + 32 * d->nroots,
                                       cap - d->nroots, &got);
            d->nroots += got;
            if (d->nroots < cap)
                break;
            cap *= 2;
            uint8_t *nr = realloc(d->roots, cap * 32);
            if (!nr) {
                rc = ENOMEM;
                break;
            }
            d->roots = nr;
            after = d->roots + 32 * (d->nroots - 1);
        }
        if (!d->roots)
            rc = ENOMEM;
    } else if (n->kind != DG_NODE_ROOT) {
        rc = ENOTDIR;
    }
    if (rc) {
        if (d->dp)
            closedir(d->dp);
        free(d->roots);
        free(d);
        fuse_reply_err(req, rc);
        return;
    }
    fi->fh = (uintptr_t)d;
    if (n->kind == DG_NODE_BYHASH_DIR || n->kind == DG_NODE_ROOT)
        fi->cache_readdir = 0;
    if (fuse_reply_open(req, fi) != 0) {
        if (d->dp)
            closedir(d->dp);
        free(d->roots);
        free(d);
    }
}

/* Whether a backing entry shows in a listing: shared/ shows regular files and directories;
 * by-name/ shows directories and the files that are hashed and unchanged. */
static int entry_visible(struct dg_fs *fs, struct dg_node *n, DIR *dp, struct dirent *de,
                         struct stat *st)
{
    uint8_t root[32];

    if (fstatat(dirfd(dp), de->d_name, st, AT_SYMLINK_NOFOLLOW) < 0)
        return 0;
    if (S_ISDIR(st->st_mode))
        return 1;
    if (!S_ISREG(st->st_mode))
        return 0;
    if (n->kind == DG_NODE_SHARED)
        return 1;
    if (dg_engine_shared_root(fs->engine, st, root) < 0)
        return 0;
    st->st_mode = S_IFLNK | 0777;
    return 1;
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    struct dir_handle *d = (struct dir_handle *)(uintptr_t)fi->fh;
    char *buf = calloc(1, size);
    size_t used = 0;
    struct stat st;

    if (!buf || !n) {
        free(buf);
        fuse_reply_err(req, buf ? ESTALE : ENOMEM);
        return;
    }
    memset(&st, 0, sizeof(st));
    if (n->kind == DG_NODE_ROOT || n->kind == DG_NODE_BYHASH_DIR) {
        static const char *const top[] = {".", "..", "shared", "by-hash", "by-name"};
        size_t total = n->kind == DG_NODE_ROOT ? 5 : 2 + d->nroots;
        for (size_t i = (size_t)off; i < total; i++) {
            char hex[DG_ROOT_HEX_LEN + 1];
            const char *name;
            /* d_ino must not be 0: readdir(3) skips such entries. The kernel asks for the
             * real inode number with a lookup. */
            st.st_ino = i + 1;
            if (i < 2 || n->kind == DG_NODE_ROOT) {
                name = top[i];
                st.st_mode = S_IFDIR;
            } else {
                dg_root_format(d->roots + 32 * (i - 2), hex);
                name = hex;
                st.st_mode = S_IFREG;
            }
            size_t len = fuse_add_direntry(req, buf + used, size - used, name, &st, (off_t)(i + 1));
            if (len > size - used)
                break;
            used += len;
        }
        fuse_reply_buf(req, buf, used);
        free(buf);
        return;
    }
    if (off != d->offset) {
        seekdir(d->dp, off);
        d->entry = NULL;
        d->offset = off;
    }
    for (;;) {
        if (!d->entry) {
            errno = 0;
            d->entry = readdir(d->dp);
            if (!d->entry) {
                if (errno && used == 0) {
                    free(buf);
                    fuse_reply_err(req, errno);
                    return;
                }
                break;
            }
        }
        struct dirent *de = d->entry;
        off_t next = de->d_off;
        int dot = strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0;
        if (dot) {
            st.st_mode = S_IFDIR;
            st.st_ino = de->d_ino;
        } else if (!entry_visible(fs, n, d->dp, de, &st)) {
            d->entry = NULL;
            d->offset = next;
            continue;
        }
        size_t len = fuse_add_direntry(req, buf + used, size - used, de->d_name, &st, next);
        if (len > size - used)
            break; /* keep d->entry for the next call */
        used += len;
        d->entry = NULL;
        d->offset = next;
    }
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct dir_handle *d = (struct dir_handle *)(uintptr_t)fi->fh;

    (void)ino;
    if (d->dp)
        closedir(d->dp);
    free(d->roots);
    free(d);
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct dg_fs *fs = fs_of(req);
    struct statvfs sv;

    (void)ino;
    if (fstatvfs(fs->shared->fd, &sv) < 0) {
        /* O_PATH descriptors cannot be used with fstatvfs on every kernel: use the path. */
        if (statvfs(fs->shared_real, &sv) < 0) {
            fuse_reply_err(req, errno);
            return;
        }
    }
    fuse_reply_statfs(req, &sv);
}

/* ---------------------------------------------------------------- xattrs */

static void reply_xattr_value(fuse_req_t req, const char *value, size_t size)
{
    size_t len = strlen(value);

    if (size == 0)
        fuse_reply_xattr(req, len);
    else if (size < len)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, value, len);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    struct dg_fs *fs = fs_of(req);
    struct dg_node *n = node_of(req, ino);
    char value[128];
    uint8_t root[32];
    struct stat st;

    if (!n) {
        fuse_reply_err(req, ESTALE);
        return;
    }
    if (n->kind == DG_NODE_ROOT) {
        const char *path = dg_engine_control_path(fs->engine);
        if (strcmp(name, XATTR_CONTROL) != 0 || !path) {
            fuse_reply_err(req, ENODATA);
            return;
        }
        reply_xattr_value(req, path, size);
        return;
    }
    if (n->kind == DG_NODE_BYHASH_FILE) {
        struct dg_root_info info;
        if (strcmp(name, XATTR_ROOT) == 0) {
            dg_root_format(n->root, value);
        } else if (strcmp(name, XATTR_BLOCKS) == 0 &&
                   dg_engine_root_info(fs->engine, n->root, &info) == 0) {
            uint64_t held = info.shared_files ? info.blocks_total : info.blocks_cached;
            snprintf(value, sizeof(value), "%llu %llu", (unsigned long long)held,
                     (unsigned long long)info.blocks_total);
        } else if (strcmp(name, XATTR_PINNED) == 0 &&
                   dg_engine_root_info(fs->engine, n->root, &info) == 0) {
            snprintf(value, sizeof(value), "%d", (info.flags & DG_ROOT_PINNED) ? 1 : 0);
        } else {
            fuse_reply_err(req, ENODATA);
            return;
        }
        reply_xattr_value(req, value, size);
        return;
    }
    if (n->kind != DG_NODE_SHARED || n->is_dir || strcmp(name, XATTR_ROOT) != 0) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    if (fstatat(n->fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    pthread_mutex_lock(&fs->lock);
    int busy = n->writers > 0 || n->dirty;
    pthread_mutex_unlock(&fs->lock);
    int rc = busy ? -EINPROGRESS : dg_engine_shared_root(fs->engine, &st, root);
    if (!busy && (rc == -ENOENT || rc == -EINPROGRESS))
        check_shared(fs, n);
    if (rc == 0)
        dg_root_format(root, value);
    else if (rc == -EINPROGRESS || rc == -ENOENT)
        snprintf(value, sizeof(value), "%s", HASHING_VALUE);
    else
        snprintf(value, sizeof(value), "error: %s", strerror(-rc));
    reply_xattr_value(req, value, size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    struct dg_node *n = node_of(req, ino);
    static const char byhash[] = XATTR_ROOT "\0" XATTR_BLOCKS "\0" XATTR_PINNED;
    static const char shared[] = XATTR_ROOT;
    static const char top[] = XATTR_CONTROL;
    const char *list = "";
    size_t len = 0;

    if (n && n->kind == DG_NODE_ROOT && dg_engine_control_path(fs_of(req)->engine)) {
        list = top;
        len = sizeof(top);
    } else if (n && n->kind == DG_NODE_BYHASH_FILE) {
        list = byhash;
        len = sizeof(byhash);
    } else if (n && n->kind == DG_NODE_SHARED && !n->is_dir) {
        list = shared;
        len = sizeof(shared);
    }
    if (size == 0)
        fuse_reply_xattr(req, len);
    else if (size < len)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, list, len);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    (void)ino;
    (void)name;
    (void)value;
    (void)size;
    (void)flags;
    fuse_reply_err(req, ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    (void)ino;
    (void)name;
    fuse_reply_err(req, ENOTSUP);
}

/* ---------------------------------------------------------------- session */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    /* Reads of by-hash files are answered out of order from the engine thread. */
    if (conn->capable & FUSE_CAP_ASYNC_READ)
        conn->want |= FUSE_CAP_ASYNC_READ;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    /* No writeback cache: every write reaches shared/ so that closing a file can hash it. */
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    conn->max_readahead = 1u << 20;
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readlink = op_readlink,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .symlink = op_symlink,
    .rename = op_rename,
    .link = op_link,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .releasedir = op_releasedir,
    .statfs = op_statfs,
    .setxattr = op_setxattr,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .removexattr = op_removexattr,
    .create = op_create,
};

const struct fuse_lowlevel_ops *dg_fs_ops(void)
{
    return &ops;
}

static struct dg_node *add_fixed(struct dg_fs *fs, uint64_t id, enum dg_node_kind kind, int fd)
{
    struct dg_node *n = new_node(kind);
    struct stat st;

    if (!n)
        return NULL;
    n->id = id;
    n->fd = fd;
    n->is_dir = 1;
    if (fd >= 0 && fstatat(fd, "", &st, AT_EMPTY_PATH) == 0) {
        n->dev = st.st_dev;
        n->ino = st.st_ino;
    }
    if (dg_node_table_intern(fs->nodes, n) != n) {
        free(n);
        return NULL;
    }
    return n;
}

int dg_fs_new(struct dg_engine *engine, struct dg_fs **out)
{
    struct dg_fs *fs = calloc(1, sizeof(*fs));
    int shared_fd = -1, byname_fd = -1, rc;

    if (!fs)
        return -ENOMEM;
    fs->engine = engine;
    fs->uid = getuid();
    fs->gid = getgid();
    clock_gettime(CLOCK_REALTIME, &fs->mount_time);
    pthread_mutex_init(&fs->lock, NULL);
    fs->shared_real = realpath(dg_engine_shared_dir(engine), NULL);
    if (!fs->shared_real) {
        rc = -errno;
        goto fail;
    }
    fs->shared_real_len = strlen(fs->shared_real);
    if ((rc = dg_node_table_new(&fs->nodes)) < 0)
        goto fail;
    shared_fd = open(fs->shared_real, O_PATH | O_DIRECTORY | O_CLOEXEC);
    byname_fd = open(fs->shared_real, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (shared_fd < 0 || byname_fd < 0) {
        rc = -errno;
        goto fail;
    }
    fs->root = add_fixed(fs, ID_ROOT, DG_NODE_ROOT, -1);
    fs->byhash = add_fixed(fs, ID_BYHASH, DG_NODE_BYHASH_DIR, -1);
    fs->byname = add_fixed(fs, ID_BYNAME, DG_NODE_BYNAME_DIR, byname_fd);
    byname_fd = -1;
    fs->shared = add_fixed(fs, ID_SHARED, DG_NODE_SHARED, shared_fd);
    shared_fd = -1;
    if (!fs->root || !fs->byhash || !fs->byname || !fs->shared) {
        rc = -ENOMEM;
        goto fail;
    }
    *out = fs;
    return 0;

fail:
    if (shared_fd >= 0)
        close(shared_fd);
    if (byname_fd >= 0)
        close(byname_fd);
    dg_node_table_free(fs->nodes);
    free(fs->shared_real);
    pthread_mutex_destroy(&fs->lock);
    free(fs);
    return rc;
}

void dg_fs_free(struct dg_fs *fs)
{
    if (!fs)
        return;
    dg_node_table_free(fs->nodes);
    free(fs->shared_real);
    pthread_mutex_destroy(&fs->lock);
    free(fs);
}
