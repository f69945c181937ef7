/* The digfs engine: one thread running a libuv loop that owns the piece cache's writes,
 * hashes shared files and answers reads that must wait for data. It knows nothing of FUSE:
 * front ends (fs/, `digfs hash`, tests) call this API and get completions through callbacks.
 *
 * Threads:
 *   - dg_engine_new/start/stop/free: the thread that owns the engine (main).
 *   - Notifications (dg_engine_shared_*), dg_engine_read and dg_engine_cancel: any thread.
 *     They copy their arguments onto a locked queue and wake the loop with uv_async_send;
 *     they never wait for engine work.
 *   - Queries and content reads (dg_engine_shared_root, dg_engine_root_info,
 *     dg_engine_list_roots, dg_engine_open, dg_content_*): any thread. They read LMDB snapshots
 *     and backing files directly, so held data is served without a thread hop.
 *   - Completion callbacks run on the engine thread and must not block.
 */
#ifndef DG_ENGINE_H
#define DG_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "engine/piece_cache.h"

struct dg_engine;  /* opaque */
struct dg_content; /* an open root: refcounted, usable from any thread */

struct dg_engine_config {
    const char *data_dir;     /* holds shared/ and index/; created if missing */
    const char *cache_dir;    /* block storage for content that is not shared */
    uint64_t cache_size;      /* bytes of block storage allowed (0: unlimited) */
    uint32_t read_timeout_ms; /* a read waiting for data fails with -ETIMEDOUT after this */
    uint32_t hash_jobs;       /* shared files hashed at once (0: 2) */
    /* The swarm. With network 0 the engine is a local store only (unit tests, tools). */
    int network;
    uint16_t port;              /* TCP and UDP port; 0: the one used last time, else any */
    const char *bootstrap;      /* DHT bootstrap "HOST:PORT[+...]", "none"; NULL: the public
                                 * routers (DG_DHT_DEFAULT_BOOTSTRAP) */
    const char *peers;          /* "HOST:PORT[+...]" asked for every root, or NULL */
    uint32_t lookup_timeout_ms; /* a lookup of an unknown root fails after this (0: 15 s) */
    int announce_cached;        /* also announce roots held completely in the cache */
    int lan_discovery;          /* BEP 14 multicast on the local network */
    int upnp;                   /* map the port on the router with UPnP IGD */
    int natpmp;                 /* ... or NAT-PMP */
    int holepunch;              /* NAT traversal through rendezvous nodes (engine/traversal.h) */
    int relay;                  /* relay streams for peers that cannot reach each other */
    int prefer_utp;             /* direct connections over uTP (the UDP port) instead of TCP */
    uint64_t relay_rate;        /* bytes/s per relayed stream and direction (0: 4 MiB/s) */
};

/* Completion of dg_engine_read(): @p status is the byte count (>= 0) with @p data valid only
 * during the call, or -ETIMEDOUT, -EINTR (cancelled), -EIO, -ESHUTDOWN (engine stopping). */
typedef void (*dg_engine_read_cb)(void *arg, ssize_t status, const void *data);

/* Creates an engine: makes the directories, opens the index, locks the data directory.
 * Starts no thread.
 * @return 0, -EBUSY (another engine uses this data directory), -errno (e.g. -EACCES for an
 *         unwritable data dir), -ENOMEM. */
int dg_engine_new(const struct dg_engine_config *cfg, struct dg_engine **out);

/* Starts the loop thread, which first reconciles the index with shared/ (new or changed files
 * are hashed, vanished ones forgotten). @return 0 or -errno. */
int dg_engine_start(struct dg_engine *e);

/* Stops the loop thread: waiting reads complete with -ESHUTDOWN, running hash jobs finish or
 * are abandoned, the index is flushed. Safe to call twice or without start. */
void dg_engine_stop(struct dg_engine *e);

/* Frees a stopped engine. NULL is allowed. */
void dg_engine_free(struct dg_engine *e);

/* Absolute path of the directory that backs shared/. Valid for the engine's lifetime. */
const char *dg_engine_shared_dir(const struct dg_engine *e);

/* Path of the control socket (`digfs status` talks to it), or NULL when there is none.
 * Valid after dg_engine_start() until dg_engine_free(). */
const char *dg_engine_control_path(const struct dg_engine *e);

/* The piece cache, for queries and tests. Writes to it belong to the engine thread. */
struct dg_piece_cache *dg_engine_cache(struct dg_engine *e);

/* --- notifications from the front end (any thread) --- */

/* The shared file at @p relpath was created, written, truncated or changed: (re)hash it. */
void dg_engine_shared_written(struct dg_engine *e, const char *relpath);

/* Someone looked at the shared file at @p relpath and the index did not know it or had a stale
 * snapshot (it was created or changed behind the mount's back): hash it unless it is being
 * hashed already or the index turns out to be current. Cheap to call repeatedly. */
void dg_engine_shared_check(struct dg_engine *e, const char *relpath);

/* Only the metadata of the shared file at @p relpath changed (chmod, chown): its snapshot is
 * refreshed without rehashing if its size and mtime did not move, else it is rehashed. */
void dg_engine_shared_attr_changed(struct dg_engine *e, const char *relpath);

/* Called on the engine thread once a notification has been applied to the index (or at
 * once, on the calling thread, if the engine is stopping). */
typedef void (*dg_engine_done_cb)(void *arg);

/* The shared file with backing inode @p ino is gone (unlinked, or replaced by a rename).
 * @p done (may be NULL) runs once the index forgot it. */
void dg_engine_shared_removed(struct dg_engine *e, uint64_t ino, dg_engine_done_cb done, void *arg);

/* @p from (a file or directory inside shared/) was renamed to @p to; @p replaced is the inode
 * of a file the rename replaced, or 0. @p done (may be NULL) runs once the index has the new
 * paths, so a front end can answer the rename only then and by-hash/ never sees a stale
 * path. */
void dg_engine_shared_renamed(struct dg_engine *e, const char *from, const char *to,
                              uint64_t replaced, dg_engine_done_cb done, void *arg);

/* Supplies block @p block of @p root from outside the swarm (an import, a test). It is verified
 * against the root's leaf hashes before it is stored, and reads waiting for it are answered.
 * @p data is copied. @return 0 or -ENOMEM (the result of verification is logged). */
int dg_engine_put_block(struct dg_engine *e, const uint8_t root[32], uint64_t block,
                        const void *data, size_t len);

/* Calls @p fn on the engine thread once every notification sent before this call has been
 * applied and every hashing job they caused has finished (tests and `digfs` subcommands use
 * it to wait for a quiet index). @return 0 or -ENOMEM. */
int dg_engine_when_idle(struct dg_engine *e, void (*fn)(void *arg), void *arg);

/* --- queries (any thread) --- */

/* The root of the shared file whose current stat is @p st.
 * @return 0 and @p root when it is hashed and unchanged since; -EINPROGRESS while it is being
 *         hashed or changed since; -ENOENT if unknown; -errno of a failed hash. */
int dg_engine_shared_root(struct dg_engine *e, const struct stat *st, uint8_t root[32]);

/* What the index knows of @p root. @return 0, -ENOENT, -EIO. */
int dg_engine_root_info(struct dg_engine *e, const uint8_t root[32], struct dg_root_info *out);

/* Lists held roots; see dg_piece_cache_list_roots(). */
int dg_engine_list_roots(struct dg_engine *e, const uint8_t *after, uint8_t *roots, size_t max,
                         size_t *n);

/* --- content (any thread) --- */

/* Opens @p root for reading from a verified source: an unchanged shared file, or block
 * storage when the index has the root's metadata.
 * @return 0, -ENOENT (no such root, or every shared copy changed behind our back: those are
 *         queued for rehashing), -EMFILE, -ENOMEM. */
int dg_engine_open(struct dg_engine *e, const uint8_t root[32], struct dg_content **out);

/* Length in bytes of open content. */
uint64_t dg_content_length(const struct dg_content *c);

/* The root of open content (32 bytes, valid while @p c is). */
const uint8_t *dg_content_root(const struct dg_content *c);

/* Reads held bytes on the calling thread.
 * @return bytes read (short only at end of file, 0 at or past it); -EAGAIN when some of the
 *         range is not held yet (use dg_engine_read()); -EIO if the backing file changed under
 *         the reader (it is queued for rehashing and never served under the old root). */
ssize_t dg_content_read(struct dg_content *c, void *buf, size_t len, uint64_t off);

/* Reads through the engine: @p cb runs on the engine thread when the bytes are held and
 * verified, on timeout, on cancel or at shutdown. @p token (may be NULL) receives an id for
 * dg_engine_cancel(). @return 0 (cb will be called exactly once) or -ENOMEM (it will not). */
int dg_engine_read(struct dg_engine *e, struct dg_content *c, uint64_t off, size_t len,
                   dg_engine_read_cb cb, void *arg, uint64_t *token);

/* A fresh token for dg_engine_read_as(). Any thread. */
uint64_t dg_engine_read_token(struct dg_engine *e);

/* Like dg_engine_read(), with a token taken beforehand by dg_engine_read_token(). A front end
 * registers its cancellation (a FUSE interrupt handler) with the token first and only then
 * starts the read, so the read can never complete before the handler is in place. A cancel
 * that arrives before its read is remembered and the read completes with -EINTR. */
int dg_engine_read_as(struct dg_engine *e, uint64_t token, struct dg_content *c, uint64_t off,
                      size_t len, dg_engine_read_cb cb, void *arg);

/* Cancels a read started by dg_engine_read(), or a lookup started by dg_engine_lookup_as(): its
 * callback gets -EINTR unless it ran already. */
void dg_engine_cancel(struct dg_engine *e, uint64_t token);

/* Tells the engine that a reader read [off, off + len) of @p c from held data, so that the
 * read-ahead of a root still being fetched follows it. Cheap: nothing is posted for content
 * held completely. Any thread. */
void dg_engine_read_hint(struct dg_engine *e, struct dg_content *c, uint64_t off, size_t len);

/* Completion of dg_engine_lookup_as(): 0 when the root is known (dg_engine_root_info() answers
 * for it), -ENOENT (not found within the lookup timeout, or no network), -EINTR (cancelled),
 * -ESHUTDOWN, -ENOMEM. Runs on the engine thread. */
typedef void (*dg_engine_lookup_cb)(void *arg, int status);

/* Looks @p root up in the swarm: its length and piece layer are fetched from peers and
 * verified. @p token (from dg_engine_read_token()) lets dg_engine_cancel() end it.
 * @return 0 (cb will be called exactly once) or -ENOMEM (it will not). Any thread. */
int dg_engine_lookup_as(struct dg_engine *e, uint64_t token, const uint8_t root[32],
                        dg_engine_lookup_cb cb, void *arg);

/* Whether the engine runs the swarm (lookups can find unknown roots). */
int dg_engine_networked(const struct dg_engine *e);

/* Takes another reference to @p c. */
void dg_content_ref(struct dg_content *c);

/* Drops a reference; the last one closes the source. */
void dg_content_unref(struct dg_content *c);

#endif
