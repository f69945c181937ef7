/* The engine thread: a libuv loop owning the index writes, the hashing of shared files and the
 * reads that wait for data. See engine.h for the threading contract. */
#include "engine/engine.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "engine/control.h"
#include "engine/dht_service.h"
#include "engine/fsutil.h"
#include "engine/hash_file.h"
#include "engine/log.h"
#include "engine/lsd.h"
#include "engine/merkle.h"
#include "engine/portmap.h"
#include "engine/root_name.h"
#include "engine/status.h"
#include "engine/swarm.h"
#include "engine/traversal.h"

#define FLUSH_INTERVAL_MS 1000
#define HASH_RETRIES 3       /* a file that keeps changing while read is marked failed */
#define SCAN_DEPTH_LIMIT 256 /* deeper directories in shared/ are not scanned */
#define EARLY_CANCELS 64     /* cancels remembered for reads that have not arrived yet */
#define LOOKUP_TIMEOUT_MS 15000u

enum msg_kind {
    MSG_WRITTEN,
    MSG_CHECK,
    MSG_ATTR_CHANGED,
    MSG_REMOVED,
    MSG_RENAMED,
    MSG_READ,
    MSG_CANCEL,
    MSG_PUT_BLOCK,
    MSG_IDLE,
    MSG_READ_HINT,
    MSG_LOOKUP,
};

/* One unit of work handed from another thread to the loop. */
struct msg {
    enum msg_kind kind;
    struct msg *next;
    uint64_t num;       /* inode (REMOVED), token (READ, CANCEL), block (PUT_BLOCK) */
    char *path, *path2; /* WRITTEN, ATTR_CHANGED, RENAMED */
    struct dg_content *content;
    uint64_t off;
    size_t len;
    dg_engine_read_cb read_cb;
    void (*idle_fn)(void *arg); /* IDLE; also the done callback of REMOVED and RENAMED */
    void *arg;
    uint8_t root[32];
    void *data; /* PUT_BLOCK */
    dg_engine_lookup_cb lookup_cb;
};

/* A read waiting for blocks. */
struct waiter {
    struct dg_engine *e;
    uint64_t token;
    struct dg_content *content;
    uint64_t off;
    size_t len;
    dg_engine_read_cb cb;
    void *arg;
    uv_timer_t timer;
    struct waiter *prev, *next;
};

/* A shared file to (re)hash. */
struct hash_task {
    struct dg_engine *e;
    char *path; /* relative to shared/; rewritten by renames */
    int running;
    int dirty; /* changed again while running: hash again */
    int retries;
    uint64_t size;  /* at queueing time: small files share a job */
    char *job_path; /* the path the running job reads: the job's own copy (renames may
                     * replace @p path on the loop thread meanwhile) */
    /* result, filled on the pool thread */
    int status;
    struct dg_file_hash hash;
    struct hash_task *next, *prev; /* every task */
    struct hash_task *bucket_next; /* the path index */
    struct hash_task *queue_next;  /* the FIFO of tasks waiting for a job slot */
    int queued;
};

/* One thread-pool job: one large file, or up to JOB_MAX_FILES small ones (thread-pool
 * hand-offs, not hashing, are what small files cost). */
#define JOB_MAX_FILES 32
#define JOB_SMALL_FILE (1u << 20)
#define JOB_MAX_BYTES (8u << 20)

struct hash_job {
    struct dg_engine *e;
    uv_work_t work;
    size_t count;
    struct hash_task *tasks[JOB_MAX_FILES];
    struct hash_job *next; /* running jobs, for cancellation */
};

#define TASK_BUCKETS 4096
#define BATCH_DELAY_MS 50 /* index updates are committed together within this */
#define BATCH_MAX_OPS 512 /* ... or once this many are waiting */

/* A shared file to hash again later: its result could not be recorded. */
struct retry_path {
    char *path;
    struct retry_path *next;
};

#define RETRY_EVERY_TICKS 5 /* flush ticks (about a second each) between retries */

/* A waiter for dg_engine_when_idle(). */
struct idle_waiter {
    void (*fn)(void *arg);
    void *arg;
    struct idle_waiter *next;
};

/* Files found by the startup scan. */
struct scan_entry {
    char *path;
    struct stat st;
};

struct scan_result {
    struct dg_engine *e;
    uv_work_t work;
    struct scan_entry *entries;
    size_t count, cap;
    int status;
};

struct dg_engine {
    struct dg_engine_config cfg;
    char *data_dir, *cache_dir, *shared_dir, *index_dir;
    int lock_fd; /* flock on <data_dir>/lock: one engine per data directory */
    struct dg_piece_cache *cache;

    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t flush_timer;
    pthread_t thread;
    int started, stopped;

    pthread_mutex_t queue_lock; /* guards the message queue, stopping and next_token */
    struct msg *queue_head, *queue_tail;
    int stopping;
    uint64_t next_token;

    /* loop thread only */
    struct hash_task *tasks;
    struct hash_task *task_bucket[TASK_BUCKETS];
    struct hash_task *waiting_head, *waiting_tail; /* tasks waiting for a job slot */
    unsigned tasks_running;                        /* running jobs */
    struct hash_job *jobs;
    uv_timer_t batch_timer; /* commits the piece cache's write batch */
    int batch_open;
    struct retry_path *batched; /* roots recorded in the open batch (redone if it fails) */
    struct retry_path *retries; /* hashed, but the index could not record it (disk full) */
    unsigned ticks;
    struct waiter *waiters;
    uint64_t early_cancels[EARLY_CANCELS]; /* cancels that came before their read */
    unsigned early_cancel_next;
    struct idle_waiter *idle_waiters;
    int scanning;
    int shutting_down; /* the loop's own copy of stopping */

    pthread_mutex_t open_lock; /* guards open_roots: roots with open content handles */
    struct open_root *open_roots;

    /* the swarm (loop thread), when cfg.network */
    char *bootstrap, *peers;
    struct dg_swarms *swarms;
    struct dg_dht_service *dht;
    struct dg_lsd *lsd;             /* LAN discovery, or NULL */
    struct dg_portmap *portmap;     /* port mapping on the router, or NULL */
    struct dg_traversal *traversal; /* uTP, hole punching, relay, NAT class; or NULL */
    struct dht_search *searches;    /* DHT lookups running for the swarms */
    uint16_t port;

    struct dg_control *control; /* the control socket, or NULL */
    char *control_path;
    int64_t started_at;
};

/* A root that content handles have open: never evicted while they do. */
struct open_root {
    uint8_t root[32];
    unsigned count;
    struct open_root *next;
};

struct dg_content {
    atomic_int refs;
    struct dg_engine *e;
    uint8_t root[32];
    uint64_t length;
    int fd;        /* backing shared file, or -1 for block storage */
    uint64_t size; /* stat snapshot of the backing file */
    int64_t mtime_ns;
    atomic_int changed; /* backing file changed under the reader */
    int complete;       /* every block is held (no read-ahead hints needed) */
    char *path;         /* relative path of the backing file (for rehashing) */
};

static void pump_hash_tasks(struct dg_engine *e);
static void check_idle(struct dg_engine *e);
static int enforce_cache_size(struct dg_engine *e, uint64_t limit);
static void batch_open(struct dg_engine *e);
static void batch_commit(struct dg_engine *e);
static void remember_batched(struct dg_engine *e, const char *path);
static void announce_all(struct dg_engine *e);

/* ---------------------------------------------------------------- setup */

static char *join_path(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);

    if (!p)
        return NULL;
    memcpy(p, a, la);
    p[la] = '/';
    memcpy(p + la + 1, b, lb + 1);
    return p;
}

/* Takes the data directory's lock, so that two digfs never share one index and shared/. */
static int lock_data_dir(struct dg_engine *e)
{
    char *path = join_path(e->data_dir, "lock");
    int rc = 0;

    if (!path)
        return -ENOMEM;
    e->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    free(path);
    if (e->lock_fd < 0)
        return -errno;
    if (flock(e->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
        if (rc == -EBUSY)
            dg_log(DG_LOG_ERROR, "engine", "data directory %s is in use by another digfs",
                   e->data_dir);
    }
    return rc;
}

int dg_engine_new(const struct dg_engine_config *cfg, struct dg_engine **out)
{
    struct dg_engine *e;
    int rc = -ENOMEM;

    if (!cfg->data_dir || !cfg->cache_dir)
        return -EINVAL;
    e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->cfg = *cfg;
    if (e->cfg.hash_jobs == 0)
        e->cfg.hash_jobs = 2;
    if (e->cfg.read_timeout_ms == 0)
        e->cfg.read_timeout_ms = 60000;
    if (e->cfg.lookup_timeout_ms == 0)
        e->cfg.lookup_timeout_ms = LOOKUP_TIMEOUT_MS;
    e->cfg.bootstrap = e->cfg.peers = NULL;
    if ((cfg->bootstrap && !(e->bootstrap = strdup(cfg->bootstrap))) ||
        (cfg->peers && !(e->peers = strdup(cfg->peers)))) {
        free(e->bootstrap);
        free(e->peers);
        free(e);
        return -ENOMEM;
    }
    pthread_mutex_init(&e->queue_lock, NULL);
    pthread_mutex_init(&e->open_lock, NULL);
    e->next_token = 1;
    e->data_dir = strdup(cfg->data_dir);
    e->cache_dir = strdup(cfg->cache_dir);
    if (!e->data_dir || !e->cache_dir)
        goto fail;
    e->shared_dir = join_path(e->data_dir, "shared");
    e->index_dir = join_path(e->data_dir, "index");
    if (!e->shared_dir || !e->index_dir)
        goto fail;
    e->lock_fd = -1;
    /* Lock first: LMDB must never be opened twice by one process, and a refused second
     * engine must not touch the index of the running one. */
    if ((rc = dg_mkdir_p(e->data_dir)) < 0 || (rc = lock_data_dir(e)) < 0) {
        if (rc != -EBUSY)
            dg_log(DG_LOG_ERROR, "engine", "cannot use data directory %s: %s", e->data_dir,
                   strerror(-rc));
        goto fail;
    }
    if ((rc = dg_piece_cache_open(e->index_dir, e->cache_dir, &e->cache)) < 0) {
        dg_log(DG_LOG_ERROR, "engine", "cannot open the index in %s: %s", e->index_dir,
               strerror(-rc));
        goto fail;
    }
    if (mkdir(e->shared_dir, 0755) < 0 && errno != EEXIST) {
        rc = -errno;
        dg_log(DG_LOG_ERROR, "engine", "cannot create %s: %s", e->shared_dir, strerror(errno));
        goto fail;
    }
    e->cfg.data_dir = e->data_dir;
    e->cfg.cache_dir = e->cache_dir;
    *out = e;
    return 0;

fail:
    if (e->lock_fd >= 0)
        close(e->lock_fd);
    free(e->bootstrap);
    free(e->peers);
    dg_piece_cache_close(e->cache);
    free(e->data_dir);
    free(e->cache_dir);
    free(e->shared_dir);
    free(e->index_dir);
    pthread_mutex_destroy(&e->queue_lock);
    free(e);
    return rc;
}

const char *dg_engine_shared_dir(const struct dg_engine *e)
{
    return e->shared_dir;
}

struct dg_piece_cache *dg_engine_cache(struct dg_engine *e)
{
    return e->cache;
}

/* ---------------------------------------------------------------- queue */

static void free_msg(struct msg *m)
{
    free(m->path);
    free(m->path2);
    free(m->data);
    free(m);
}

/* Queues @p m for the loop. Returns -ESHUTDOWN (and frees nothing) once stopping. */
static int post(struct dg_engine *e, struct msg *m)
{
    pthread_mutex_lock(&e->queue_lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->queue_lock);
        return -ESHUTDOWN;
    }
    m->next = NULL;
    if (e->queue_tail)
        e->queue_tail->next = m;
    else
        e->queue_head = m;
    e->queue_tail = m;
    pthread_mutex_unlock(&e->queue_lock);
    if (e->started)
        uv_async_send(&e->wake);
    return 0;
}

static struct msg *new_msg(enum msg_kind kind)
{
    struct msg *m = calloc(1, sizeof(*m));

    if (m)
        m->kind = kind;
    return m;
}

/* Queues a notification; runs @p done at once when it cannot be queued. */
static void post_path(struct dg_engine *e, enum msg_kind kind, const char *a, const char *b,
                      uint64_t num, dg_engine_done_cb done, void *arg)
{
    struct msg *m = new_msg(kind);

    if (!m || (a && !(m->path = strdup(a))) || (b && !(m->path2 = strdup(b)))) {
        dg_log(DG_LOG_ERROR, "engine", "out of memory: lost a notification for %s",
               a ? a : "a removed file");
        if (m)
            free_msg(m);
        if (done)
            done(arg);
        return;
    }
    m->num = num;
    m->idle_fn = done;
    m->arg = arg;
    if (post(e, m) < 0) {
        free_msg(m);
        if (done)
            done(arg);
    }
}

void dg_engine_shared_written(struct dg_engine *e, const char *relpath)
{
    post_path(e, MSG_WRITTEN, relpath, NULL, 0, NULL, NULL);
}

void dg_engine_shared_check(struct dg_engine *e, const char *relpath)
{
    post_path(e, MSG_CHECK, relpath, NULL, 0, NULL, NULL);
}

void dg_engine_shared_attr_changed(struct dg_engine *e, const char *relpath)
{
    post_path(e, MSG_ATTR_CHANGED, relpath, NULL, 0, NULL, NULL);
}

void dg_engine_shared_renamed(struct dg_engine *e, const char *from, const char *to,
                              uint64_t replaced, dg_engine_done_cb done, void *arg)
{
    post_path(e, MSG_RENAMED, from, to, replaced, done, arg);
}

void dg_engine_shared_removed(struct dg_engine *e, uint64_t ino, dg_engine_done_cb done, void *arg)
{
    post_path(e, MSG_REMOVED, NULL, NULL, ino, done, arg);
}

int dg_engine_when_idle(struct dg_engine *e, void (*fn)(void *arg), void *arg)
{
    struct msg *m = new_msg(MSG_IDLE);
    int rc;

    if (!m)
        return -ENOMEM;
    m->idle_fn = fn;
    m->arg = arg;
    if ((rc = post(e, m)) < 0)
        free_msg(m);
    return rc;
}

int dg_engine_put_block(struct dg_engine *e, const uint8_t root[32], uint64_t block,
                        const void *data, size_t len)
{
    struct msg *m = new_msg(MSG_PUT_BLOCK);
    int rc;

    if (!m || !(m->data = malloc(len ? len : 1))) {
        free(m);
        return -ENOMEM;
    }
    memcpy(m->root, root, 32);
    memcpy(m->data, data, len);
    m->num = block;
    m->len = len;
    if ((rc = post(e, m)) < 0)
        free_msg(m);
    return rc;
}

uint64_t dg_engine_read_token(struct dg_engine *e)
{
    uint64_t token;

    pthread_mutex_lock(&e->queue_lock);
    token = e->next_token++;
    pthread_mutex_unlock(&e->queue_lock);
    return token;
}

int dg_engine_read_as(struct dg_engine *e, uint64_t token, struct dg_content *c, uint64_t off,
                      size_t len, dg_engine_read_cb cb, void *arg)
{
    struct msg *m = new_msg(MSG_READ);

    if (!m)
        return -ENOMEM;
    dg_content_ref(c);
    m->content = c;
    m->off = off;
    m->len = len;
    m->read_cb = cb;
    m->arg = arg;
    m->num = token;
    if (post(e, m) < 0) {
        /* Stopping: the callback is still owed exactly once. */
        cb(arg, -ESHUTDOWN, NULL);
        dg_content_unref(c);
        free_msg(m);
    }
    return 0;
}

int dg_engine_read(struct dg_engine *e, struct dg_content *c, uint64_t off, size_t len,
                   dg_engine_read_cb cb, void *arg, uint64_t *token)
{
    uint64_t t = dg_engine_read_token(e);

    if (token)
        *token = t;
    return dg_engine_read_as(e, t, c, off, len, cb, arg);
}

void dg_engine_cancel(struct dg_engine *e, uint64_t token)
{
    struct msg *m = new_msg(MSG_CANCEL);

    if (!m)
        return;
    m->num = token;
    if (post(e, m) < 0)
        free_msg(m);
}

void dg_engine_read_hint(struct dg_engine *e, struct dg_content *c, uint64_t off, size_t len)
{
    struct msg *m;

    if (!e->cfg.network || c->complete || c->fd >= 0)
        return;
    if (!(m = new_msg(MSG_READ_HINT)))
        return;
    memcpy(m->root, c->root, 32);
    m->off = off;
    m->len = len;
    if (post(e, m) < 0)
        free_msg(m);
}

int dg_engine_lookup_as(struct dg_engine *e, uint64_t token, const uint8_t root[32],
                        dg_engine_lookup_cb cb, void *arg)
{
    struct msg *m = new_msg(MSG_LOOKUP);

    if (!m)
        return -ENOMEM;
    m->num = token;
    memcpy(m->root, root, 32);
    m->lookup_cb = cb;
    m->arg = arg;
    if (post(e, m) < 0) {
        free_msg(m);
        cb(arg, -ESHUTDOWN);
    }
    return 0;
}

int dg_engine_networked(const struct dg_engine *e)
{
    return e->cfg.network;
}

/* ---------------------------------------------------------------- hashing */

static size_t path_bucket(const char *path)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */

    for (; *path; path++)
        h = (h ^ (uint8_t)*path) * 1099511628211ull;
    return (size_t)(h % TASK_BUCKETS);
}

static struct hash_task *find_task(struct dg_engine *e, const char *path)
{
    for (struct hash_task *t = e->task_bucket[path_bucket(path)]; t; t = t->bucket_next)
        if (strcmp(t->path, path) == 0)
            return t;
    return NULL;
}

static void index_task(struct dg_engine *e, struct hash_task *t)
{
    size_t b = path_bucket(t->path);

    t->bucket_next = e->task_bucket[b];
    e->task_bucket[b] = t;
}

static void unindex_task(struct dg_engine *e, struct hash_task *t)
{
    for (struct hash_task **pp = &e->task_bucket[path_bucket(t->path)]; *pp;
         pp = &(*pp)->bucket_next) {
        if (*pp == t) {
            *pp = t->bucket_next;
            return;
        }
    }
}

/* Puts @p t at the end of the queue of tasks waiting for a job slot. */
static void enqueue_task(struct dg_engine *e, struct hash_task *t)
{
    if (t->queued || t->running)
        return;
    t->queued = 1;
    t->queue_next = NULL;
    if (e->waiting_tail)
        e->waiting_tail->queue_next = t;
    else
        e->waiting_head = t;
    e->waiting_tail = t;
}

static void remove_task(struct dg_engine *e, struct hash_task *task)
{
    if (task->queued) { /* only when stopping: the queue is short-lived then */
        struct hash_task *prev = NULL;
        for (struct hash_task *t = e->waiting_head; t; prev = t, t = t->queue_next) {
            if (t != task)
                continue;
            if (prev)
                prev->queue_next = t->queue_next;
            else
                e->waiting_head = t->queue_next;
            if (e->waiting_tail == t)
                e->waiting_tail = prev;
            break;
        }
    }
    unindex_task(e, task);
    if (task->prev)
        task->prev->next = task->next;
    else
        e->tasks = task->next;
    if (task->next)
        task->next->prev = task->prev;
    dg_file_hash_clear(&task->hash);
    free(task->job_path);
    free(task->path);
    free(task);
}

static void remember_retry(struct dg_engine *e, const char *path)
{
    struct retry_path *r;

    for (r = e->retries; r; r = r->next)
        if (strcmp(r->path, path) == 0)
            return;
    r = calloc(1, sizeof(*r));
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return;
    }
    r->next = e->retries;
    e->retries = r;
}

/* Notes a root recorded in the open batch, so that it is redone if the batch fails. */
static void remember_batched(struct dg_engine *e, const char *path)
{
    struct retry_path *r;

    if (!e->batch_open)
        return;
    r = calloc(1, sizeof(*r));
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return;
    }
    r->next = e->batched;
    e->batched = r;
}

/* Commits the index updates made since batch_open(). Everything that others can observe
 * (a reply to FUSE, an idle callback, a control answer) is preceded by this. */
static void batch_commit(struct dg_engine *e)
{
    struct retry_path *r = e->batched;
    int rc;

    if (!e->batch_open)
        return;
    e->batch_open = 0;
    e->batched = NULL;
    uv_timer_stop(&e->batch_timer);
    rc = dg_piece_cache_batch_commit(e->cache);
    if (rc < 0)
        dg_log(DG_LOG_ERROR, "engine", "index: a batch of updates was lost: %s; retrying",
               strerror(-rc));
    while (r) {
        struct retry_path *next = r->next;
        if (rc < 0)
            remember_retry(e, r->path);
        free(r->path);
        free(r);
        r = next;
    }
}

static void batch_timer_cb(uv_timer_t *timer)
{
    batch_commit(timer->data);
}

/* Makes the following index updates part of one batch, committed within BATCH_DELAY_MS or
 * at BATCH_MAX_OPS updates: one sync for many files instead of two each. */
static void batch_open(struct dg_engine *e)
{
    if (e->batch_open && dg_piece_cache_batch_size(e->cache) >= BATCH_MAX_OPS)
        batch_commit(e);
    if (e->batch_open || e->shutting_down)
        return;
    if (dg_piece_cache_batch_begin(e->cache) < 0)
        return; /* updates go one by one */
    e->batch_open = 1;
    uv_timer_start(&e->batch_timer, batch_timer_cb, BATCH_DELAY_MS, 0);
}

static int stat_shared(struct dg_engine *e, const char *relpath, struct stat *st)
{
    char *full = join_path(e->shared_dir, relpath);
    int rc;

    if (!full)
        return -ENOMEM;
    rc = lstat(full, st) < 0 ? -errno : 0;
    free(full);
    if (rc == 0 && !S_ISREG(st->st_mode))
        rc = -EISDIR;
    return rc;
}

/* Queues a (re)hash of @p relpath and marks it as being hashed in the index. */
static void queue_hash(struct dg_engine *e, const char *relpath)
{
    struct hash_task *task = find_task(e, relpath);
    struct stat st;

    if (dg_relpath_check(relpath, strlen(relpath)) < 0) {
        dg_log(DG_LOG_WARN, "engine", "not hashing a file with an invalid path");
        return;
    }
    if (task) {
        if (task->running)
            task->dirty = 1;
        task->retries = 0;
        return;
    }
    if (stat_shared(e, relpath, &st) < 0)
        return; /* gone or not a regular file: a removal notification follows */
    if (dg_piece_cache_shared_begin(e->cache, relpath, &st) < 0)
        dg_log(DG_LOG_ERROR, "engine", "index: cannot record %s", relpath);
    task = calloc(1, sizeof(*task));
    if (!task || !(task->path = strdup(relpath))) {
        free(task);
        dg_log(DG_LOG_ERROR, "engine", "out of memory: %s is not hashed", relpath);
        return;
    }
    task->e = e;
    task->size = (uint64_t)st.st_size;
    task->next = e->tasks;
    if (e->tasks)
        e->tasks->prev = task;
    e->tasks = task;
    index_task(e, task);
    enqueue_task(e, task);
    pump_hash_tasks(e);
}

/* Hashes one task's file (pool thread): reads only task->job_path and writes the result. */
static void hash_one(const char *shared_dir, struct hash_task *task)
{
    char *full = join_path(shared_dir, task->job_path);
    struct stat st;
    int fd;

    memset(&task->hash, 0, sizeof(task->hash));
    if (!full) {
        task->status = -ENOMEM;
        return;
    }
    fd = open(full, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    free(full);
    if (fd < 0) {
        task->status = -errno;
        return;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        task->status = -EISDIR;
    else
        task->status = dg_hash_fd(fd, &task->hash);
    close(fd);
}

static void hash_work(uv_work_t *req)
{
    struct hash_job *job = req->data;

    for (size_t i = 0; i < job->count; i++)
        hash_one(job->e->shared_dir, job->tasks[i]);
}

static int same_content_stat(const struct stat *a, const struct stat *b)
{
    return a->st_ino == b->st_ino && a->st_dev == b->st_dev && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* Settles one task whose job ended (loop thread). */
static void task_finished(struct dg_engine *e, struct hash_task *task, int cancelled)
{
    struct stat now;
    char hex[DG_ROOT_HEX_LEN + 1];

    task->running = 0;
    free(task->job_path);
    task->job_path = NULL;
    if (cancelled || e->shutting_down) {
        remove_task(e, task);
        return;
    }
    int st_rc = stat_shared(e, task->path, &now);
    batch_open(e);
    if (task->dirty) {
        /* Written again while we read it: start over. */
        task->dirty = 0;
        dg_file_hash_clear(&task->hash);
        if (st_rc == 0)
            dg_piece_cache_shared_begin(e->cache, task->path, &now);
        enqueue_task(e, task);
        return;
    }
    if (task->status == 0 && st_rc == 0 && !same_content_stat(&now, &task->hash.st))
        task->status = -EAGAIN; /* changed after the last read, or replaced */
    if (task->status == -EAGAIN && st_rc == 0 && ++task->retries <= HASH_RETRIES) {
        dg_file_hash_clear(&task->hash);
        enqueue_task(e, task);
        return;
    }
    if (st_rc < 0 || task->status == -ENOENT) {
        /* Gone (or renamed away and the rename not seen yet): nothing to record under this
         * path; the removal or rename notification settles the index. */
    } else if (task->status == 0) {
        dg_root_format(task->hash.root, hex);
        int rc = dg_piece_cache_shared_done(e->cache, task->path, &task->hash.st, task->hash.root,
                                            task->hash.piece_size, task->hash.layer,
                                            task->hash.layer_count);
        if (rc < 0) {
            dg_log(DG_LOG_ERROR, "engine", "index: cannot record the root of %s: %s; retrying",
                   task->path, strerror(-rc));
            remember_retry(e, task->path);
        } else {
            dg_log(DG_LOG_DEBUG, "engine", "hashed %s: %s", task->path, hex);
            remember_batched(e, task->path);
            if (e->swarms)
                dg_swarms_announce(e->swarms, task->hash.root, 1);
        }
    } else {
        int err = task->status == -EAGAIN ? EBUSY : -task->status;
        dg_log(DG_LOG_WARN, "engine", "cannot hash %s: %s", task->path, strerror(err));
        dg_piece_cache_shared_failed(e->cache, task->path, &now, err);
    }
    remove_task(e, task);
}

static void job_done(uv_work_t *req, int status)
{
    struct hash_job *job = req->data;
    struct dg_engine *e = job->e;

    for (struct hash_job **pp = &e->jobs; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            break;
        }
    }
    e->tasks_running--;
    for (size_t i = 0; i < job->count; i++)
        task_finished(e, job->tasks[i], status == UV_ECANCELED);
    free(job);
    if (e->shutting_down)
        return;
    pump_hash_tasks(e);
    check_idle(e);
}

/* Takes the next queued task off the FIFO, or NULL. */
static struct hash_task *dequeue_task(struct dg_engine *e)
{
    struct hash_task *t = e->waiting_head;

    if (!t)
        return NULL;
    e->waiting_head = t->queue_next;
    if (!e->waiting_head)
        e->waiting_tail = NULL;
    t->queued = 0;
    return t;
}

static void pump_hash_tasks(struct dg_engine *e)
{
    if (e->shutting_down)
        return;
    while (e->waiting_head && e->tasks_running < e->cfg.hash_jobs) {
        struct hash_job *job = calloc(1, sizeof(*job));
        uint64_t bytes = 0;

        if (!job)
            return; /* tried again when another job ends or a file is written */
        job->e = e;
        job->work.data = job;
        /* A large file alone; small files together, up to a file and byte budget. */
        while (e->waiting_head && job->count < JOB_MAX_FILES) {
            struct hash_task *t = e->waiting_head;
            int small = t->size < JOB_SMALL_FILE;
            if (job->count > 0 && (!small || bytes + t->size > JOB_MAX_BYTES))
                break;
            char *copy = strdup(t->path);
            if (!copy)
                break;
            dequeue_task(e);
            t->job_path = copy;
            t->running = 1;
            t->status = 0;
            job->tasks[job->count++] = t;
            bytes += t->size;
            if (!small)
                break;
        }
        if (job->count == 0) {
            free(job);
            return;
        }
        e->tasks_running++;
        job->next = e->jobs;
        e->jobs = job;
        if (uv_queue_work(&e->loop, &job->work, hash_work, job_done) < 0) {
            e->jobs = job->next;
            e->tasks_running--;
            for (size_t i = 0; i < job->count; i++) {
                job->tasks[i]->running = 0;
                free(job->tasks[i]->job_path);
                job->tasks[i]->job_path = NULL;
                enqueue_task(e, job->tasks[i]);
            }
            free(job);
            return;
        }
    }
}

/* ---------------------------------------------------------------- startup scan */

static int scan_add(struct scan_result *r, const char *path, const struct stat *st)
{
    if (r->count == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        struct scan_entry *n = realloc(r->entries, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        r->entries = n;
        r->cap = cap;
    }
    if (!(r->entries[r->count].path = strdup(path)))
        return -ENOMEM;
    r->entries[r->count++].st = *st;
    return 0;
}

/* Walks directory @p dirfd (at relative path @p rel, "" for shared/ itself). */
static int scan_dir(struct scan_result *r, int fd, const char *rel, int depth)
{
    DIR *dir;
    struct dirent *de;
    int rc = 0;

    if (depth > SCAN_DEPTH_LIMIT) {
        close(fd);
        return 0;
    }
    dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return -errno;
    }
    while (rc == 0 && (de = readdir(dir))) {
        struct stat st;
        char path[PATH_MAX];

        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (fstatat(dirfd(dir), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;
        int n = rel[0] ? snprintf(path, sizeof(path), "%s/%s", rel, de->d_name)
                       : snprintf(path, sizeof(path), "%s", de->d_name);
        if (n < 0 || (size_t)n >= sizeof(path))
            continue;
        if (S_ISREG(st.st_mode)) {
            rc = scan_add(r, path, &st);
        } else if (S_ISDIR(st.st_mode)) {
            int sub =
                openat(dirfd(dir), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub >= 0)
                rc = scan_dir(r, sub, path, depth + 1);
        }
    }
    closedir(dir);
    return rc;
}

static void scan_work(uv_work_t *req)
{
    struct scan_result *r = req->data;
    int fd = open(r->e->shared_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    r->status = fd < 0 ? -errno : scan_dir(r, fd, "", 0);
}

static int compare_ino(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

struct stale_list {
    const uint64_t *seen;
    size_t seen_count;
    uint64_t *gone;
    size_t count, cap;
};

static int collect_gone(void *arg, const struct dg_shared_file *f)
{
    struct stale_list *s = arg;

    if (bsearch(&f->ino, s->seen, s->seen_count, sizeof(uint64_t), compare_ino))
        return 0;
    if (s->count == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        uint64_t *n = realloc(s->gone, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        s->gone = n;
        s->cap = cap;
    }
    s->gone[s->count++] = f->ino;
    return 0;
}

static int snapshot_matches(const struct dg_shared_file *f, const struct stat *st)
{
    return f->dev == (uint64_t)st->st_dev && f->size == (uint64_t)st->st_size &&
           f->mtime_ns == (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec &&
           f->ctime_ns == (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
}

/* Reconciles the index with what the scan found: unchanged files keep their root (their path
 * is refreshed), new or changed ones are rehashed, vanished ones are forgotten. */
static void scan_done(uv_work_t *req, int status)
{
    struct scan_result *r = req->data;
    struct dg_engine *e = r->e;
    struct stale_list stale = {0};
    struct dg_shared_file *f = malloc(sizeof(*f));
    uint64_t *inos = NULL;
    size_t rehash = 0;

    e->scanning = 0;
    batch_open(e);
    if (status == 0 && r->status == 0 && f && !e->shutting_down) {
        inos = malloc((r->count ? r->count : 1) * sizeof(*inos));
        for (size_t i = 0; inos && i < r->count; i++)
            inos[i] = (uint64_t)r->entries[i].st.st_ino;
        if (inos) {
            qsort(inos, r->count, sizeof(*inos), compare_ino);
            stale.seen = inos;
            stale.seen_count = r->count;
            if (dg_piece_cache_shared_each(e->cache, collect_gone, &stale) == 0) {
                for (size_t i = 0; i < stale.count; i++)
                    dg_piece_cache_shared_remove(e->cache, stale.gone[i]);
            }
        }
        for (size_t i = 0; i < r->count; i++) {
            const struct scan_entry *s = &r->entries[i];
            int rc = dg_piece_cache_shared_get(e->cache, (uint64_t)s->st.st_ino, f);
            if (rc == 0 && f->state == DG_SHARED_HASHED && snapshot_matches(f, &s->st)) {
                if (strcmp(f->path, s->path) != 0)
                    dg_piece_cache_shared_restat(e->cache, s->path, &s->st);
                continue;
            }
            queue_hash(e, s->path);
            rehash++;
        }
        dg_log(DG_LOG_INFO, "engine", "shared/: %zu files, %zu to hash, %zu gone", r->count, rehash,
               stale.count);
    } else if (r->status < 0) {
        dg_log(DG_LOG_ERROR, "engine", "cannot scan %s: %s", e->shared_dir, strerror(-r->status));
    }
    for (size_t i = 0; i < r->count; i++)
        free(r->entries[i].path);
    free(r->entries);
    free(r);
    free(f);
    free(inos);
    free(stale.gone);
    batch_commit(e);
    announce_all(e);
    check_idle(e);
}

/* ---------------------------------------------------------------- waiting reads */

static void waiter_unlink(struct dg_engine *e, struct waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        e->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
}

static void waiter_closed(uv_handle_t *h)
{
    struct waiter *w = h->data;

    dg_content_unref(w->content);
    free(w);
}

/* Completes @p w with @p status (a byte count when @p data is given) and frees it. */
static void waiter_finish(struct waiter *w, ssize_t status, const void *data)
{
    waiter_unlink(w->e, w);
    uv_timer_stop(&w->timer);
    w->cb(w->arg, status, data);
    uv_close((uv_handle_t *)&w->timer, waiter_closed);
}

static void waiter_timeout(uv_timer_t *timer)
{
    struct waiter *w = timer->data;

    dg_log(DG_LOG_DEBUG, "engine", "read of %zu bytes at %llu timed out", w->len,
           (unsigned long long)w->off);
    waiter_finish(w, -ETIMEDOUT, NULL);
}

/* Tries to answer @p w from held data. Returns 1 when it was answered (and freed). */
static int waiter_try(struct waiter *w)
{
    struct dg_content *c = w->content;
    void *buf;
    ssize_t n;

    /* Cheap test first: blocks arrive one by one, most wake-ups find the range incomplete. */
    if (c->fd < 0 && w->off < c->length &&
        !dg_piece_cache_has_range(c->e->cache, c->root, w->off, w->len))
        return 0;
    buf = malloc(w->len ? w->len : 1);

    if (!buf) {
        waiter_finish(w, -ENOMEM, NULL);
        return 1;
    }
    n = dg_content_read(w->content, buf, w->len, w->off);
    if (n == -EAGAIN) {
        free(buf);
        return 0;
    }
    waiter_finish(w, n, n >= 0 ? buf : NULL);
    free(buf);
    return 1;
}

/* Whether @p token was cancelled before its read arrived (forgets it if so). */
static int cancelled_early(struct dg_engine *e, uint64_t token)
{
    for (unsigned i = 0; i < EARLY_CANCELS; i++) {
        if (e->early_cancels[i] == token) {
            e->early_cancels[i] = 0;
            return 1;
        }
    }
    return 0;
}

static void start_read(struct dg_engine *e, struct msg *m)
{
    struct waiter *w;

    if (cancelled_early(e, m->num)) {
        m->read_cb(m->arg, -EINTR, NULL);
        dg_content_unref(m->content);
        return;
    }
    w = calloc(1, sizeof(*w));
    if (!w) {
        m->read_cb(m->arg, -ENOMEM, NULL);
        dg_content_unref(m->content);
        return;
    }
    w->e = e;
    w->token = m->num;
    w->content = m->content; /* the message's reference moves to the waiter */
    w->off = m->off;
    w->len = m->len;
    w->cb = m->read_cb;
    w->arg = m->arg;
    uv_timer_init(&e->loop, &w->timer);
    w->timer.data = w;
    w->next = e->waiters;
    if (e->waiters)
        e->waiters->prev = w;
    e->waiters = w;
    if (waiter_try(w))
        return;
    uv_timer_start(&w->timer, waiter_timeout, e->cfg.read_timeout_ms, 0);
    if (e->swarms) {
        dg_swarms_read(e->swarms, w->content->root, w->off, w->len);
        dg_swarms_want(e->swarms, w->content->root);
    }
}

static void cancel_read(struct dg_engine *e, uint64_t token)
{
    for (struct waiter *w = e->waiters; w; w = w->next) {
        if (w->token == token) {
            waiter_finish(w, -EINTR, NULL);
            return;
        }
    }
    if (e->swarms && dg_swarms_cancel_lookup(e->swarms, token))
        return;
    /* Its read (or lookup) may still be on its way (or done already: then this entry is never
     * used). */
    e->early_cancels[e->early_cancel_next++ % EARLY_CANCELS] = token;
}

/* Answers the waiters of @p root that can be answered now. */
static void wake_waiters(struct dg_engine *e, const uint8_t root[32])
{
    struct waiter *w = e->waiters, *next;

    for (; w; w = next) {
        next = w->next;
        if (memcmp(w->content->root, root, 32) == 0)
            waiter_try(w); /* may free w; next was taken before */
    }
}

static void put_block(struct dg_engine *e, struct msg *m)
{
    char hex[DG_ROOT_HEX_LEN + 1];
    int rc = dg_piece_cache_put_block(e->cache, m->root, m->num, m->data, m->len);

    if (rc == -ENOSPC) {
        /* The disk is full: make room from the least recently used roots, then retry. */
        uint64_t stored = 0;
        if (dg_piece_cache_stored_bytes(e->cache, &stored) == 0 &&
            enforce_cache_size(e, stored - stored / 10) == 0)
            rc = dg_piece_cache_put_block(e->cache, m->root, m->num, m->data, m->len);
    }

    if (rc < 0) {
        dg_root_format(m->root, hex);
        dg_log(DG_LOG_WARN, "engine", "block %llu of %s rejected: %s", (unsigned long long)m->num,
               hex, strerror(-rc));
        return;
    }
    if (e->swarms)
        dg_swarms_block_stored(e->swarms, m->root, m->num);
    wake_waiters(e, m->root);
}

/* ---------------------------------------------------------------- the swarm */

/* A DHT lookup run for the swarms: its results go to the swarm of @c key. */
struct dht_search {
    struct dg_engine *e;
    uint8_t key[20];
    struct dht_search *prev, *next;
};

static void dht_search_unlink(struct dg_engine *e, struct dht_search *ds)
{
    if (ds->prev)
        ds->prev->next = ds->next;
    else
        e->searches = ds->next;
    if (ds->next)
        ds->next->prev = ds->prev;
}

static void dht_found(void *arg, uint32_t id, const struct dg_dht_compact *peers, size_t n,
                      const struct sockaddr *from, int done)
{
    struct dht_search *ds = arg;

    (void)id;
    if (n > 0 && ds->e->swarms)
        dg_swarms_found(ds->e->swarms, ds->key, peers, n, from);
    if (done) {
        dht_search_unlink(ds->e, ds);
        free(ds);
    }
}

static int host_dht_lookup(void *arg, const uint8_t key[20], uint16_t announce_port)
{
    struct dg_engine *e = arg;
    struct dht_search *ds;
    int rc;

    if (!e->dht)
        return -ENOTCONN;
    struct dg_dht_stats st;
    dg_dht_service_stats(e->dht, &st);
    if (st.nodes == 0)
        return -EAGAIN;
    if (!(ds = calloc(1, sizeof(*ds))))
        return -ENOMEM;
    ds->e = e;
    memcpy(ds->key, key, 20);
    ds->next = e->searches;
    if (e->searches)
        e->searches->prev = ds;
    e->searches = ds;
    rc = dg_dht_service_get_peers(e->dht, key, announce_port, dht_found, ds, NULL);
    if (rc < 0) {
        dht_search_unlink(e, ds);
        free(ds);
        return rc;
    }
    return st.good < DG_DHT_K ? 1 : 0;
}

static size_t host_dht_nodes(void *arg)
{
    struct dg_engine *e = arg;
    struct dg_dht_stats st;

    if (e->lsd)
        return 1; /* the local network may answer */
    if (!e->dht)
        return 0;
    dg_dht_service_stats(e->dht, &st);
    /* While bootstrap nodes are configured, the table may simply not be filled yet. */
    if (st.nodes == 0 && e->bootstrap && strcmp(e->bootstrap, "none") != 0)
        return 1;
    if (st.nodes == 0 && !e->bootstrap)
        return 1; /* the default routers */
    return st.nodes;
}

static void host_make_room(void *arg, const uint8_t root[32])
{
    struct dg_engine *e = arg;
    uint64_t stored = 0;

    /* Swarms keep their roots open (never evicted): idle ones let go first. */
    dg_swarms_release_idle(e->swarms, root);
    if (dg_piece_cache_stored_bytes(e->cache, &stored) == 0)
        enforce_cache_size(e, stored - stored / 10);
}

static void host_lan_search(void *arg, const uint8_t key[20])
{
    dg_lsd_search(((struct dg_engine *)arg)->lsd, key);
}

static void lsd_found(void *arg, const uint8_t key[20], const struct sockaddr_in *from)
{
    struct dg_engine *e = arg;
    struct dg_dht_compact peer = {.len = DG_DHT_COMPACT4_LEN};

    if (!e->swarms)
        return;
    memcpy(peer.bytes, &from->sin_addr, 4);
    memcpy(peer.bytes + 4, &from->sin_port, 2);
    dg_swarms_found(e->swarms, key, &peer, 1, NULL);
}

static int lsd_holds(void *arg, const uint8_t key[20])
{
    struct dg_engine *e = arg;

    return e->swarms && dg_swarms_holds(e->swarms, key);
}

static void host_commit(void *arg)
{
    batch_commit(arg);
}

static void host_batch(void *arg)
{
    batch_open(arg);
}

static void host_stored(void *arg, const uint8_t root[32], uint64_t block)
{
    struct dg_engine *e = arg;
    struct waiter *w = e->waiters, *next;

    batch_commit(e); /* what the swarm recorded becomes visible to readers first */
    if (block == UINT64_MAX) {
        wake_waiters(e, root);
        return;
    }
    /* Only the reads that cover the block can have become complete. */
    uint64_t start = block * DG_MERKLE_BLOCK_SIZE;
    for (; w; w = next) {
        next = w->next;
        if (memcmp(w->content->root, root, 32) == 0 && w->off < start + DG_MERKLE_BLOCK_SIZE &&
            w->off + w->len > start)
            waiter_try(w);
    }
}

static int host_open(void *arg, const uint8_t root[32], struct dg_content **out)
{
    return dg_engine_open(arg, root, out);
}

static void host_each_wanted(void *arg, const uint8_t root[32],
                             void (*fn)(void *ctx, uint64_t off, uint64_t len), void *ctx)
{
    struct dg_engine *e = arg;

    for (struct waiter *w = e->waiters; w; w = w->next)
        if (memcmp(w->content->root, root, 32) == 0)
            fn(ctx, w->off, w->len);
}

/* Checks that TCP and UDP @p port (0: any) can both be bound. @return the port or -errno. */
static int probe_port(uint16_t port)
{
    struct sockaddr_in a = {0};
    socklen_t len = sizeof(a);
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int one = 1, rc = 0;

    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (t < 0 || u < 0)
        rc = -errno;
    if (rc == 0)
        setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (rc == 0 && bind(t, (struct sockaddr *)&a, sizeof(a)) < 0)
        rc = -errno;
    if (rc == 0 && getsockname(t, (struct sockaddr *)&a, &len) < 0)
        rc = -errno;
    if (rc == 0 && bind(u, (struct sockaddr *)&a, sizeof(a)) < 0)
        rc = -errno;
    if (rc == 0)
        rc = ntohs(a.sin_port);
    if (t >= 0)
        close(t);
    if (u >= 0)
        close(u);
    return rc;
}

/* The port: the configured one, else the one kept in <data_dir>/port if it is free, else a
 * new one (kept there for next time). @return the port or -errno. */
static int choose_port(struct dg_engine *e)
{
    char *path = join_path(e->data_dir, "port");
    int rc;

    if (!path)
        return -ENOMEM;
    if (e->cfg.port) {
        rc = probe_port(e->cfg.port);
    } else {
        FILE *f = fopen(path, "r");
        unsigned saved = 0;
        rc = -ENOENT;
        if (f) {
            if (fscanf(f, "%u", &saved) == 1 && saved > 0 && saved < 65536)
                rc = probe_port((uint16_t)saved);
            fclose(f);
        }
        for (int tries = 0; rc < 0 && tries < 10; tries++)
            rc = probe_port(0);
        if (rc > 0 && (unsigned)rc != saved) {
            char tmp[4200];
            snprintf(tmp, sizeof(tmp), "%s.tmp", path);
            f = fopen(tmp, "w");
            if (f) {
                fprintf(f, "%d\n", rc);
                if (fclose(f) == 0)
                    rename(tmp, path);
                else
                    unlink(tmp);
            }
        }
    }
    free(path);
    return rc;
}

static int host_traverse(void *arg, const uint8_t key[20], const struct sockaddr *target,
                         const struct sockaddr *via, int relay)
{
    struct dg_engine *e = arg;

    if (!e->traversal)
        return -ENOTSUP;
    return dg_traversal_request(e->traversal, key, target, via, relay);
}

static int host_punch(void *arg, const uint8_t root[32], const uint8_t nonce[16],
                      const struct sockaddr *peer, int nat, int initiator)
{
    struct dg_engine *e = arg;

    if (!e->traversal)
        return -ENOTSUP;
    return dg_traversal_punch(e->traversal, root, nonce, peer, (enum dg_nat_class)nat, initiator);
}

static int host_nat_class(void *arg)
{
    struct dg_engine *e = arg;

    return e->traversal ? (int)dg_traversal_nat(e->traversal) : 0;
}

static void host_observed(void *arg, const struct sockaddr *ip, const struct sockaddr *reporter)
{
    struct dg_engine *e = arg;

    if (e->traversal)
        dg_traversal_peer_observed(e->traversal, ip, reporter);
}

static int traversal_mapped(void *arg)
{
    struct dg_engine *e = arg;
    struct dg_portmap_state ps;

    if (!e->portmap)
        return 0;
    dg_portmap_get(e->portmap, &ps);
    return ps.mapped;
}

/* Starts the DHT and the peer listener on the loop (before the loop thread runs).
 * @return 0 or -errno. */
static int start_network(struct dg_engine *e)
{
    struct dg_dht_service_config dc = {0};
    struct dg_swarms_config sc = {0};
    char *state;
    int rc = -EADDRINUSE;

    for (int tries = 0; tries < 5 && rc == -EADDRINUSE; tries++) {
        int port = choose_port(e);
        if (port < 0)
            return port;
        dc.port = (uint16_t)port;
        dc.bootstrap = e->bootstrap ? e->bootstrap : DG_DHT_DEFAULT_BOOTSTRAP;
        state = join_path(e->data_dir, "dht.state");
        if (!state)
            return -ENOMEM;
        dc.state_path = state;
        dc.implied_port = 1;
        rc = dg_dht_service_start(&e->loop, &dc, &e->dht);
        free(state);
        if (rc < 0)
            continue;
        struct dg_traversal_config tc = {
            .loop = &e->loop,
            .dht = e->dht,
            .holepunch = e->cfg.holepunch,
            .relay = e->cfg.relay,
            .relay_streams = 16,
            .relay_rate = e->cfg.relay_rate ? e->cfg.relay_rate : 4ull << 20,
            .mapped = traversal_mapped,
            .arg = e,
        };
        rc = dg_traversal_start(&tc, &e->traversal);
        if (rc < 0) {
            dg_dht_service_stop(e->dht, NULL, NULL);
            e->dht = NULL;
            e->traversal = NULL;
            return rc;
        }
        sc.loop = &e->loop;
        sc.cache = e->cache;
        sc.host.arg = e;
        sc.host.commit = host_commit;
        sc.host.lan_search = host_lan_search;
        sc.host.batch = host_batch;
        sc.host.make_room = host_make_room;
        sc.host.dht_nodes = host_dht_nodes;
        sc.host.stored = host_stored;
        sc.host.open = host_open;
        sc.host.each_wanted = host_each_wanted;
        sc.host.dht_lookup = host_dht_lookup;
        sc.host.traverse = host_traverse;
        sc.host.punch = host_punch;
        sc.host.nat_class = host_nat_class;
        sc.host.observed = host_observed;
        sc.utp = dg_traversal_utp(e->traversal);
        sc.prefer_utp = e->cfg.prefer_utp;
        memcpy(sc.node_id, dg_dht_service_id(e->dht), 20);
        sc.port = (uint16_t)port;
        sc.peers = e->peers;
        sc.lookup_timeout_ms = e->cfg.lookup_timeout_ms;
        sc.announce_complete = e->cfg.announce_cached;
        rc = dg_swarms_start(&sc, &e->swarms);
        if (rc < 0) {
            dg_traversal_stop(e->traversal, NULL, NULL);
            e->traversal = NULL;
            dg_dht_service_stop(e->dht, NULL, NULL);
            e->dht = NULL;
            if (e->cfg.port)
                break;
        }
    }
    if (rc < 0)
        return rc;
    e->port = dg_swarms_port(e->swarms);
    dg_traversal_set_swarms(e->traversal, e->swarms);
    if (e->cfg.upnp || e->cfg.natpmp) {
        struct dg_portmap_config pc = {
            .port = e->port, .natpmp = e->cfg.natpmp, .upnp = e->cfg.upnp};
        if (dg_portmap_start(&e->loop, &pc, &e->portmap) < 0)
            dg_log(DG_LOG_WARN, "engine", "no port mapping: out of memory");
    }
    if (e->cfg.lan_discovery) {
        struct dg_lsd_config lc = {
            .port = e->port, .found = lsd_found, .holds = lsd_holds, .arg = e};
        int lrc = dg_lsd_start(&e->loop, &lc, &e->lsd);
        if (lrc < 0)
            dg_log(DG_LOG_WARN, "engine", "no LAN discovery: %s", strerror(-lrc));
    }
    dg_log(DG_LOG_INFO, "engine", "listening on port %u (TCP and UDP)", e->port);
    return 0;
}

static void stop_network(struct dg_engine *e)
{
    dg_lsd_stop(e->lsd);
    e->lsd = NULL;
    dg_portmap_stop(e->portmap); /* removes the mapping; the loop runs until it is done */
    e->portmap = NULL;
    if (e->swarms)
        dg_swarms_stop(e->swarms, NULL, NULL);
    e->swarms = NULL;
    dg_traversal_stop(e->traversal, NULL, NULL); /* after the swarms: their uTP sockets */
    e->traversal = NULL;
    if (e->dht)
        dg_dht_service_stop(e->dht, NULL, NULL);
    e->dht = NULL;
    while (e->searches) {
        struct dht_search *ds = e->searches;
        e->searches = ds->next;
        free(ds);
    }
}

/* Announces @p root if it is held completely (by a shared file, or by the cache when
 * announce_cached is set), and stops announcing it when it is not held any more. */
static void announce_root(struct dg_engine *e, const uint8_t root[32])
{
    struct dg_root_info info;
    int on = 0;

    if (!e->swarms)
        return;
    if (dg_piece_cache_root_info(e->cache, root, &info) == 0)
        on = info.shared_files > 0 ||
             (e->cfg.announce_cached && info.blocks_cached == info.blocks_total);
    dg_swarms_announce(e->swarms, root, on);
}

/* Announces every root held completely (at start). */
static void announce_all(struct dg_engine *e)
{
    uint8_t roots[32 * 256], last[32];
    const uint8_t *after = NULL;
    size_t n;

    if (!e->swarms)
        return;
    do {
        if (dg_piece_cache_list_roots(e->cache, after, roots, 256, &n) < 0)
            break;
        for (size_t i = 0; i < n; i++)
            announce_root(e, roots + 32 * i);
        if (n > 0) {
            memcpy(last, roots + 32 * (n - 1), 32);
            after = last;
        }
    } while (n == 256);
}

/* A lookup handed to the swarm. */
struct lookup_req {
    struct dg_engine *e;
    dg_engine_lookup_cb cb;
    void *arg;
};

static void lookup_done(void *arg, int status)
{
    struct lookup_req *l = arg;

    batch_commit(l->e); /* the root's record is visible before the answer */
    l->cb(l->arg, status);
    free(l);
}

static void start_lookup(struct dg_engine *e, struct msg *m)
{
    struct dg_root_info info;
    struct lookup_req *l;

    if (cancelled_early(e, m->num)) {
        m->lookup_cb(m->arg, -EINTR);
        return;
    }
    batch_commit(e);
    if (dg_piece_cache_root_info(e->cache, m->root, &info) == 0) {
        m->lookup_cb(m->arg, 0);
        return;
    }
    if (!e->swarms) {
        m->lookup_cb(m->arg, -ENOENT);
        return;
    }
    if (!(l = malloc(sizeof(*l)))) {
        m->lookup_cb(m->arg, -ENOMEM);
        return;
    }
    l->e = e;
    l->cb = m->lookup_cb;
    l->arg = m->arg;
    dg_swarms_lookup(e->swarms, m->root, m->num, lookup_done, l);
}

/* ---------------------------------------------------------------- loop */

static int engine_idle(const struct dg_engine *e)
{
    return !e->scanning && e->tasks == NULL;
}

static void check_idle(struct dg_engine *e)
{
    if (!engine_idle(e))
        return;
    if (e->idle_waiters)
        batch_commit(e);
    while (e->idle_waiters) {
        struct idle_waiter *w = e->idle_waiters;
        e->idle_waiters = w->next;
        w->fn(w->arg);
        free(w);
    }
}

static void handle_msg(struct dg_engine *e, struct msg *m)
{
    struct stat st;
    int rc;

    switch (m->kind) {
    case MSG_WRITTEN:
        queue_hash(e, m->path);
        break;
    case MSG_CHECK: {
        uint8_t root[32];
        if (find_task(e, m->path) || stat_shared(e, m->path, &st) < 0)
            break;
        rc = dg_engine_shared_root(e, &st, root);
        if (rc == -ENOENT || rc == -EINPROGRESS)
            queue_hash(e, m->path);
        break;
    }
    case MSG_ATTR_CHANGED:
        if (stat_shared(e, m->path, &st) < 0)
            break;
        rc = dg_piece_cache_shared_restat(e->cache, m->path, &st);
        if (rc == -ESTALE || (rc == -ENOENT && !find_task(e, m->path)))
            queue_hash(e, m->path);
        break;
    case MSG_REMOVED: {
        struct dg_shared_file *f = malloc(sizeof(*f));
        int had = f && dg_piece_cache_shared_get(e->cache, m->num, f) == 0 &&
                  f->state == DG_SHARED_HASHED;
        dg_piece_cache_shared_remove(e->cache, m->num);
        if (had)
            announce_root(e, f->root);
        free(f);
        if (m->idle_fn) {
            batch_commit(e);
            m->idle_fn(m->arg);
        }
        break;
    }
    case MSG_RENAMED: {
        size_t from_len = strlen(m->path);
        if (m->num)
            dg_piece_cache_shared_remove(e->cache, m->num);
        dg_piece_cache_shared_rename(e->cache, m->path, m->path2);
        for (struct hash_task *t = e->tasks; t; t = t->next) {
            size_t len = strlen(t->path);
            if (len < from_len || memcmp(t->path, m->path, from_len) != 0 ||
                (len > from_len && t->path[from_len] != '/'))
                continue;
            char *np = malloc(strlen(m->path2) + len - from_len + 1);
            if (!np)
                continue;
            snprintf(np, strlen(m->path2) + len - from_len + 1, "%s%s", m->path2,
                     t->path + from_len);
            unindex_task(e, t);
            free(t->path);
            t->path = np;
            index_task(e, t);
        }
        /* A renamed file's ctime moved: refresh its snapshot. */
        if (stat_shared(e, m->path2, &st) == 0 &&
            dg_piece_cache_shared_restat(e->cache, m->path2, &st) == -ESTALE)
            queue_hash(e, m->path2);
        if (m->idle_fn) {
            batch_commit(e); /* the rename is answered only once readers see it */
            m->idle_fn(m->arg);
        }
        break;
    }
    case MSG_READ:
        start_read(e, m);
        m->content = NULL;
        break;
    case MSG_CANCEL:
        cancel_read(e, m->num);
        break;
    case MSG_PUT_BLOCK:
        batch_commit(e); /* block bits are published by the cache's own commits */
        put_block(e, m);
        break;
    case MSG_READ_HINT:
        if (e->swarms)
            dg_swarms_read(e->swarms, m->root, m->off, m->len);
        break;
    case MSG_LOOKUP:
        start_lookup(e, m);
        break;
    case MSG_IDLE: {
        struct idle_waiter *w = malloc(sizeof(*w));
        if (!w) {
            m->idle_fn(m->arg);
            break;
        }
        w->fn = m->idle_fn;
        w->arg = m->arg;
        w->next = e->idle_waiters;
        e->idle_waiters = w;
        break;
    }
    }
}

/* Winds the loop down: reads waiting are answered, hash jobs cancelled (a running one
 * finishes and is discarded), handles closed so that uv_run() returns. */
static void shut_down(struct dg_engine *e)
{
    batch_commit(e);
    e->shutting_down = 1;
    uv_close((uv_handle_t *)&e->batch_timer, NULL);
    dg_control_stop(e->control);
    e->control = NULL;
    stop_network(e);
    while (e->waiters)
        waiter_finish(e->waiters, -ESHUTDOWN, NULL);
    while (e->idle_waiters) {
        struct idle_waiter *w = e->idle_waiters;
        e->idle_waiters = w->next;
        w->fn(w->arg);
        free(w);
    }
    for (struct hash_job *j = e->jobs; j; j = j->next)
        uv_cancel((uv_req_t *)&j->work);
    uv_close((uv_handle_t *)&e->wake, NULL);
    uv_close((uv_handle_t *)&e->flush_timer, NULL);
}

static void drain_queue(uv_async_t *async)
{
    struct dg_engine *e = async->data;
    struct msg *m;
    int stopping;

    if (e->shutting_down)
        return;
    pthread_mutex_lock(&e->queue_lock);
    m = e->queue_head;
    e->queue_head = e->queue_tail = NULL;
    stopping = e->stopping;
    pthread_mutex_unlock(&e->queue_lock);
    if (m)
        batch_open(e);
    while (m) {
        struct msg *next = m->next;
        handle_msg(e, m);
        free_msg(m);
        m = next;
    }
    if (stopping)
        shut_down(e);
    else
        check_idle(e);
}

static int root_in_use(void *arg, const uint8_t root[32])
{
    struct dg_engine *e = arg;
    int used = 0;

    pthread_mutex_lock(&e->open_lock);
    for (struct open_root *o = e->open_roots; o && !used; o = o->next)
        used = memcmp(o->root, root, 32) == 0;
    pthread_mutex_unlock(&e->open_lock);
    return used;
}

/* Keeps block storage under @p limit bytes (no limit when cache_size is 0). */
static int enforce_cache_size(struct dg_engine *e, uint64_t limit)
{
    uint64_t freed = 0;
    int rc;

    if (e->cfg.cache_size == 0)
        return 0;
    batch_commit(e);
    rc = dg_piece_cache_evict(e->cache, limit, root_in_use, e, &freed);
    if (rc < 0)
        dg_log(DG_LOG_ERROR, "engine", "evicting from the cache: %s", strerror(-rc));
    else if (freed)
        dg_log(DG_LOG_DEBUG, "engine", "evicted %llu bytes", (unsigned long long)freed);
    return rc;
}

static void flush_tick(uv_timer_t *timer)
{
    struct dg_engine *e = timer->data;
    int rc;

    batch_commit(e);
    rc = dg_piece_cache_flush(e->cache);

    if (rc < 0)
        dg_log(DG_LOG_ERROR, "engine", "flushing the piece cache: %s", strerror(-rc));
    if (e->swarms && e->cfg.cache_size) {
        uint64_t stored = 0;
        /* Over the limit: swarms nobody waits on let go of their roots so they can go. */
        if (dg_piece_cache_stored_bytes(e->cache, &stored) == 0 && stored > e->cfg.cache_size)
            dg_swarms_release_idle(e->swarms, NULL);
    }
    enforce_cache_size(e, e->cfg.cache_size);
    if (e->retries && ++e->ticks % RETRY_EVERY_TICKS == 0) {
        struct retry_path *r = e->retries;
        e->retries = NULL;
        while (r) {
            struct retry_path *next = r->next;
            queue_hash(e, r->path); /* fails again into the list while the disk is full */
            free(r->path);
            free(r);
            r = next;
        }
    }
}

static void *engine_thread(void *arg)
{
    struct dg_engine *e = arg;

    uv_run(&e->loop, UV_RUN_DEFAULT);
    return NULL;
}

static int count_shared(void *arg, const struct dg_shared_file *f)
{
    struct dg_status *s = arg;

    s->shared_files++;
    s->shared_hashed += f->state == DG_SHARED_HASHED;
    s->shared_failed += f->state == DG_SHARED_FAILED;
    return 0;
}

/* Takes a status snapshot. Loop thread (it reads the loop's task and waiter lists). */
static int collect_status(struct dg_engine *e, struct dg_status *s)
{
    uint8_t roots[32 * 256];
    const uint8_t *after = NULL;
    uint8_t last[32];
    size_t n;

    memset(s, 0, sizeof(*s));
    s->version = DIGFS_VERSION;
    s->data_dir = e->data_dir;
    s->cache_dir = e->cache_dir;
    s->uptime_s = (int64_t)time(NULL) - e->started_at;
    s->cache_limit = e->cfg.cache_size;
    dg_piece_cache_shared_each(e->cache, count_shared, s);
    for (struct hash_task *t = e->tasks; t; t = t->next)
        s->hash_queue++;
    for (struct waiter *w = e->waiters; w; w = w->next)
        s->reads_waiting++;
    do {
        if (dg_piece_cache_list_roots(e->cache, after, roots, 256, &n) < 0)
            break;
        s->roots_held += n;
        if (n > 0) {
            memcpy(last, roots + 32 * (n - 1), 32);
            after = last;
        }
    } while (n == 256);
    dg_piece_cache_stored_bytes(e->cache, &s->cache_bytes);

    pthread_mutex_lock(&e->open_lock);
    for (struct open_root *o = e->open_roots; o; o = o->next)
        s->open_count++;
    s->open = calloc(s->open_count ? s->open_count : 1, sizeof(*s->open));
    size_t i = 0;
    for (struct open_root *o = e->open_roots; o && s->open && i < s->open_count; o = o->next) {
        memcpy(s->open[i].root, o->root, 32);
        s->open[i].readers = o->count;
        i++;
    }
    pthread_mutex_unlock(&e->open_lock);
    if (!s->open) {
        s->open_count = 0;
        return -ENOMEM;
    }
    if (e->swarms) {
        struct dg_swarm_stats st;
        struct dg_dht_stats ds;
        struct sockaddr_storage ext;
        struct dg_status_network *net = &s->network;
        s->has_network = 1;
        net->port = e->port;
        dg_swarms_stats(e->swarms, &st);
        net->peers = st.peers;
        net->bytes_in = st.bytes_in;
        net->bytes_out = st.bytes_out;
        net->blocks_in = st.blocks_in;
        net->blocks_out = st.blocks_out;
        net->banned = st.banned;
        net->malformed = st.malformed;
        net->announces = st.announces;
        net->stalled = st.stalled;
        net->replaced = st.replaced;
        if (e->dht) {
            dg_dht_service_stats(e->dht, &ds);
            net->dht_nodes = ds.nodes;
            net->dht_good = ds.good;
            net->dht_searches = ds.searches;
            net->dht_stored = ds.stored_peers;
            net->dht_malformed = ds.malformed;
            if (dg_dht_service_external(e->dht, &ext) == 0 && ext.ss_family == AF_INET) {
                char ip[INET_ADDRSTRLEN];
                const struct sockaddr_in *a = (const struct sockaddr_in *)&ext;
                inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
                snprintf(net->public_address, sizeof(net->public_address), "%s:%u", ip,
                         ntohs(a->sin_port));
            }
        }
        if (e->traversal) {
            struct dg_traversal_info ti;
            dg_traversal_get_info(e->traversal, &ti);
            net->has_nat = 1;
            snprintf(net->nat_class, sizeof(net->nat_class), "%s", dg_nat_class_name(ti.nat));
            snprintf(net->nat_reason, sizeof(net->nat_reason), "%s", ti.nat_reason);
            net->nat_observers = ti.observers;
            net->nat_ports = ti.ports;
            snprintf(net->nat_address, sizeof(net->nat_address), "%s", ti.address);
            snprintf(net->nat_peers_see, sizeof(net->nat_peers_see), "%s", ti.peers_see);
            net->nat_peer_reports = ti.peer_reports;
            net->utp_connections = ti.utp_connections;
            net->utp_retransmits = ti.utp.retransmits;
            net->utp_malformed = ti.utp.malformed;
            net->hp_connects = ti.hp.connects;
            net->hp_punched = ti.hp.punched;
            net->hp_relayed = ti.hp.relayed;
            net->hp_failed = ti.hp.failed;
            net->hp_forwarded = ti.hp.forwarded;
            net->hp_answered = ti.hp.answered;
            net->hp_peer_rendezvous = st.rendezvous;
            net->relay_on = ti.relay_on;
            net->relay_port = ti.relay_port;
            net->relay_streams = ti.relay.streams;
            net->relay_streams_total = ti.relay.streams_total;
            net->relay_bytes = ti.relay.bytes;
        }
        if (e->portmap) {
            struct dg_portmap_state ps;
            dg_portmap_get(e->portmap, &ps);
            net->has_portmap = 1;
            net->portmap_mapped = ps.mapped;
            snprintf(net->portmap_method, sizeof(net->portmap_method), "%s", ps.method);
            snprintf(net->portmap_ip, sizeof(net->portmap_ip), "%s", ps.external_ip);
            net->portmap_tcp = ps.external_tcp;
            net->portmap_udp = ps.external_udp;
            snprintf(net->portmap_error, sizeof(net->portmap_error), "%s", ps.error);
        }
        struct dg_swarm_info *list = calloc(st.swarms ? st.swarms : 1, sizeof(*list));
        if (list) {
            size_t count = dg_swarms_list(e->swarms, list, st.swarms);
            s->swarms = calloc(count ? count : 1, sizeof(*s->swarms));
            if (s->swarms) {
                s->swarm_count = count;
                for (size_t k = 0; k < count; k++) {
                    struct dg_status_swarm *w = &s->swarms[k];
                    memcpy(w->root, list[k].root, 32);
                    w->known = list[k].known;
                    w->length = list[k].length;
                    w->blocks_held = list[k].blocks_held;
                    w->blocks_total = list[k].blocks_total;
                    w->peers = list[k].peers;
                    w->peers_tcp = list[k].peers_tcp;
                    w->peers_utp = list[k].peers_utp;
                    w->peers_relayed = list[k].peers_relayed;
                    w->peers_punched = list[k].peers_punched;
                    w->bytes_in = list[k].bytes_in;
                    w->bytes_out = list[k].bytes_out;
                }
            }
            free(list);
        }
    }
    for (i = 0; i < s->open_count; i++) {
        struct dg_root_info info;
        if (dg_piece_cache_root_info(e->cache, s->open[i].root, &info) < 0)
            continue;
        s->open[i].length = info.length;
        s->open[i].blocks_total = info.blocks_total;
        s->open[i].blocks_held = info.shared_files ? info.blocks_total : info.blocks_cached;
    }
    return 0;
}

/* "pin <root>" / "unpin <root>": the reply is {"ok":true} or {"error":"..."}. */
static char *pin_request(struct dg_engine *e, const char *hex, int pinned)
{
    uint8_t root[32];
    char reply[128];
    int rc;

    if (dg_root_parse(hex, strlen(hex), root) < 0)
        return strdup("{\"error\":\"not a root\"}");
    rc = dg_piece_cache_set_pinned(e->cache, root, pinned);
    if (rc == 0 && e->swarms)
        dg_swarms_set_pinned(e->swarms, root, pinned);
    if (rc == 0)
        return strdup("{\"ok\":true}");
    snprintf(reply, sizeof(reply), "{\"error\":\"%s\"}",
             rc == -ENOENT ? "unknown root" : strerror(-rc));
    return strdup(reply);
}

static char *control_request(void *arg, const char *request)
{
    struct dg_engine *e = arg;
    struct dg_status s;
    char *json;

    batch_commit(e); /* answers describe, and change, what readers see */
    if (strncmp(request, "pin ", 4) == 0)
        return pin_request(e, request + 4, 1);
    if (strncmp(request, "unpin ", 6) == 0)
        return pin_request(e, request + 6, 0);
    if (strcmp(request, "status") != 0)
        return NULL;
    collect_status(e, &s);
    json = dg_status_to_json(&s);
    dg_status_clear(&s);
    return json;
}

/* Serves the control socket in the data directory (best effort: digfs works without it). */
static void start_control(struct dg_engine *e)
{
    int rc;

    e->control_path = join_path(e->data_dir, "control.sock");
    if (!e->control_path)
        return;
    rc = dg_control_start(&e->loop, e->control_path, control_request, e, &e->control);
    if (rc < 0) {
        dg_log(DG_LOG_WARN, "engine", "no control socket at %s: %s", e->control_path,
               strerror(-rc));
        free(e->control_path);
        e->control_path = NULL;
    }
}

const char *dg_engine_control_path(const struct dg_engine *e)
{
    return e->control_path;
}

int dg_engine_start(struct dg_engine *e)
{
    struct scan_result *scan;
    int rc;

    if (e->started)
        return 0;
    scan = calloc(1, sizeof(*scan));
    if (!scan)
        return -ENOMEM;
    if ((rc = uv_loop_init(&e->loop)) < 0) {
        free(scan);
        return rc;
    }
    uv_async_init(&e->loop, &e->wake, drain_queue);
    e->wake.data = e;
    uv_timer_init(&e->loop, &e->flush_timer);
    e->flush_timer.data = e;
    uv_timer_init(&e->loop, &e->batch_timer);
    e->batch_timer.data = e;
    uv_timer_start(&e->flush_timer, flush_tick, FLUSH_INTERVAL_MS, FLUSH_INTERVAL_MS);
    scan->e = e;
    scan->work.data = scan;
    e->scanning = 1;
    e->started_at = (int64_t)time(NULL);
    if (e->cfg.network && (rc = start_network(e)) < 0) {
        dg_log(DG_LOG_ERROR, "engine", "cannot listen on port %u: %s", e->cfg.port, strerror(-rc));
        free(scan);
        uv_close((uv_handle_t *)&e->wake, NULL);
        uv_close((uv_handle_t *)&e->flush_timer, NULL);
        uv_close((uv_handle_t *)&e->batch_timer, NULL);
        stop_network(e);
        uv_run(&e->loop, UV_RUN_DEFAULT);
        uv_loop_close(&e->loop);
        return rc;
    }
    start_control(e);
    /* Queued now, run by the pool once the loop thread is up. */
    rc = uv_queue_work(&e->loop, &scan->work, scan_work, scan_done);
    int queued = rc == 0;
    if (rc == 0 && (rc = -pthread_create(&e->thread, NULL, engine_thread, e)) == 0) {
        e->started = 1;
        uv_async_send(&e->wake); /* messages posted before start */
        return 0;
    }
    dg_log(DG_LOG_ERROR, "engine", "cannot start the engine thread: %s", strerror(-rc));
    if (!queued)
        free(scan);
    e->shutting_down = 1;
    dg_control_stop(e->control);
    e->control = NULL;
    stop_network(e);
    uv_close((uv_handle_t *)&e->wake, NULL);
    uv_close((uv_handle_t *)&e->flush_timer, NULL);
    uv_close((uv_handle_t *)&e->batch_timer, NULL);
    uv_run(&e->loop, UV_RUN_DEFAULT); /* lets a queued scan finish and free itself */
    uv_loop_close(&e->loop);
    return rc;
}

void dg_engine_stop(struct dg_engine *e)
{
    if (!e || !e->started || e->stopped)
        return;
    pthread_mutex_lock(&e->queue_lock);
    e->stopping = 1;
    pthread_mutex_unlock(&e->queue_lock);
    uv_async_send(&e->wake);
    pthread_join(e->thread, NULL);
    e->stopped = 1;
    /* Tasks whose jobs never started were not freed by the loop. */
    while (e->tasks)
        remove_task(e, e->tasks);
    while (e->retries) {
        struct retry_path *r = e->retries;
        e->retries = r->next;
        free(r->path);
        free(r);
    }
    uv_loop_close(&e->loop);
    dg_piece_cache_flush(e->cache);
}

void dg_engine_free(struct dg_engine *e)
{
    if (!e)
        return;
    dg_engine_stop(e);
    /* Messages posted after the loop ended (none once stopping is set) or never drained. */
    while (e->queue_head) {
        struct msg *m = e->queue_head;
        e->queue_head = m->next;
        if (m->kind == MSG_READ) {
            m->read_cb(m->arg, -ESHUTDOWN, NULL);
            dg_content_unref(m->content);
        } else if (m->kind == MSG_LOOKUP) {
            m->lookup_cb(m->arg, -ESHUTDOWN);
        }
        free_msg(m);
    }
    dg_piece_cache_close(e->cache);
    if (e->lock_fd >= 0)
        close(e->lock_fd);
    free(e->data_dir);
    free(e->cache_dir);
    free(e->shared_dir);
    free(e->index_dir);
    free(e->control_path);
    free(e->bootstrap);
    free(e->peers);
    pthread_mutex_destroy(&e->queue_lock);
    pthread_mutex_destroy(&e->open_lock);
    free(e);
}

/* ---------------------------------------------------------------- queries */

int dg_engine_shared_root(struct dg_engine *e, const struct stat *st, uint8_t root[32])
{
    struct dg_shared_file *f = malloc(sizeof(*f));
    int rc;

    if (!f)
        return -ENOMEM;
    rc = dg_piece_cache_shared_get(e->cache, (uint64_t)st->st_ino, f);
    if (rc == 0) {
        if (f->state == DG_SHARED_FAILED && snapshot_matches(f, st))
            rc = -(f->error ? f->error : EIO);
        else if (f->state != DG_SHARED_HASHED || !snapshot_matches(f, st))
            rc = -EINPROGRESS;
        else
            memcpy(root, f->root, 32);
    }
    free(f);
    return rc;
}

int dg_engine_root_info(struct dg_engine *e, const uint8_t root[32], struct dg_root_info *out)
{
    return dg_piece_cache_root_info(e->cache, root, out);
}

int dg_engine_list_roots(struct dg_engine *e, const uint8_t *after, uint8_t *roots, size_t max,
                         size_t *n)
{
    return dg_piece_cache_list_roots(e->cache, after, roots, max, n);
}

/* ---------------------------------------------------------------- content */

struct open_search {
    struct dg_engine *e;
    struct dg_content *c;
    int changed;
};

/* Tries one shared file as the source of a root: it must be the recorded inode, unchanged. */
static int try_shared_source(void *arg, const struct dg_shared_file *f)
{
    struct open_search *s = arg;
    struct stat st;
    char *full;
    int fd;

    if (f->state != DG_SHARED_HASHED)
        return 0;
    full = join_path(s->e->shared_dir, f->path);
    if (!full)
        return -ENOMEM;
    fd = open(full, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    free(full);
    if (fd < 0)
        return 0;
    if (fstat(fd, &st) < 0 || st.st_ino != (ino_t)f->ino) {
        close(fd);
        return 0;
    }
    if (!snapshot_matches(f, &st)) {
        /* Changed behind our back: never served under the old root. */
        close(fd);
        dg_engine_shared_written(s->e, f->path);
        s->changed = 1;
        return 0;
    }
    s->c->fd = fd;
    s->c->size = (uint64_t)st.st_size;
    s->c->mtime_ns = f->mtime_ns;
    s->c->path = strdup(f->path);
    return 1;
}

/* Counts open content handles of @p root up (+1) or down (-1). @return 0 or -ENOMEM. */
static int note_open_root(struct dg_engine *e, const uint8_t root[32], int delta)
{
    struct open_root **pp, *o;
    int rc = 0;

    pthread_mutex_lock(&e->open_lock);
    for (pp = &e->open_roots; *pp; pp = &(*pp)->next)
        if (memcmp((*pp)->root, root, 32) == 0)
            break;
    o = *pp;
    if (delta > 0) {
        if (!o && (o = calloc(1, sizeof(*o)))) {
            memcpy(o->root, root, 32);
            o->next = e->open_roots;
            e->open_roots = o;
        }
        if (o)
            o->count++;
        else
            rc = -ENOMEM;
    } else if (o && --o->count == 0) {
        *pp = o->next;
        free(o);
    }
    pthread_mutex_unlock(&e->open_lock);
    return rc;
}

int dg_engine_open(struct dg_engine *e, const uint8_t root[32], struct dg_content **out)
{
    struct dg_root_info info;
    struct open_search search = {e, NULL, 0};
    struct dg_content *c;
    int rc;

    if ((rc = dg_piece_cache_root_info(e->cache, root, &info)) < 0)
        return rc;
    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    atomic_init(&c->refs, 1);
    atomic_init(&c->changed, 0);
    c->e = e;
    memcpy(c->root, root, 32);
    c->length = info.length;
    c->fd = -1;
    search.c = c;
    if (info.shared_files > 0) {
        rc = dg_piece_cache_shared_by_root(e->cache, root, try_shared_source, &search);
        if (rc < 0) {
            free(c);
            return rc;
        }
    }
    if (c->fd < 0 && info.blocks_cached == 0 && info.shared_files > 0) {
        /* Only shared copies, and none is usable: the root is not held any more. */
        free(c);
        return -ENOENT;
    }
    if (note_open_root(e, root, 1) < 0) {
        if (c->fd >= 0)
            close(c->fd);
        free(c->path);
        free(c);
        return -ENOMEM;
    }
    dg_piece_cache_touch(e->cache, root);
    c->complete = info.shared_files > 0 || info.blocks_cached == info.blocks_total;
    *out = c;
    return 0;
}

uint64_t dg_content_length(const struct dg_content *c)
{
    return c->length;
}

const uint8_t *dg_content_root(const struct dg_content *c)
{
    return c->root;
}

ssize_t dg_content_read(struct dg_content *c, void *buf, size_t len, uint64_t off)
{
    struct stat st;
    size_t done = 0;

    if (off >= c->length || len == 0)
        return 0;
    if (len > c->length - off)
        len = (size_t)(c->length - off);
    if (c->fd < 0)
        return dg_piece_cache_read(c->e->cache, c->root, buf, len, off);
    if (atomic_load(&c->changed))
        return -EIO;
    while (done < len) {
        ssize_t r = pread(c->fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        done += (size_t)r;
    }
    /* The bytes count only if the file did not change while (or before) we read them. A
     * writer updates mtime before it changes data, so checking after the read is enough. */
    if (fstat(c->fd, &st) < 0)
        memset(&st, 0, sizeof(st));
    if ((uint64_t)st.st_size != c->size ||
        (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec != c->mtime_ns ||
        done != len) {
        if (!atomic_exchange(&c->changed, 1)) {
            dg_log(DG_LOG_WARN, "engine", "shared/%s changed while being read by hash",
                   c->path ? c->path : "?");
            if (c->path && st.st_nlink > 0)
                dg_engine_shared_written(c->e, c->path);
        }
        return -EIO;
    }
    return (ssize_t)done;
}

void dg_content_ref(struct dg_content *c)
{
    atomic_fetch_add(&c->refs, 1);
}

void dg_content_unref(struct dg_content *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    note_open_root(c->e, c->root, -1);
    if (c->fd >= 0)
        close(c->fd);
    free(c->path);
    free(c);
}
