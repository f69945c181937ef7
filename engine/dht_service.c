/* The DHT node on a UDP socket and a libuv loop: see engine/dht_service.h. */
#include "engine/dht_service.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "engine/log.h"

#define MAX_HOST 253          /* longest host name (DNS) or bracketed literal */
#define MIN_TICK_MS 100       /* floor of the tick timer (see arm()) */
#define MAINT_MS (60u * 1000) /* bootstrap retry check and periodic save */
#define LOG_MODULE "dht"

/* "DG" and two bytes of version (0.1), as BEP 5 clients put in "v". */
static const uint8_t client_version[4] = {'D', 'G', 0, 1};

struct boot_entry {
    char host[MAX_HOST + 1]; /* without brackets */
    char port[6];
    int v6; /* bracketed: an IPv6 literal */
};

/* A lookup of the caller's: the node calls back through it, so that nothing reaches the
 * caller after stop. */
struct lookup {
    struct dg_dht_service *s;
    dg_dht_search_cb cb;
    void *arg;
    uint32_t id;
    int starting; /* inside dg_dht_get_peers(): the final callback may not free it */
    int finished; /* the final callback came while starting */
    struct lookup *prev, *next;
};

struct dg_dht_service {
    uv_loop_t *loop;
    uv_udp_t udp;
    uv_timer_t tick_timer;
    uv_timer_t maint_timer;
    struct dg_dht *dht;
    uint16_t port;
    char *state_path;
    char *tmp_path;
    struct boot_entry *boot;
    size_t nboot;
    size_t boot_next;     /* the entry to resolve next */
    uv_getaddrinfo_t gai; /* the resolution in flight, if resolving */
    int resolving;
    struct lookup *lookups;
    uint64_t tick_due; /* loop time the tick timer fires at, if active */
    uint64_t last_save_ms;
    dg_dht_service_other_fn other;
    void *other_arg;
    int stopping;
    unsigned handles_open;
    void (*closed)(void *arg);
    void *closed_arg;
    uint8_t rbuf[DG_DHT_SERVICE_RECV_MAX];
    uint64_t oversize; /* datagrams too long for rbuf: dropped, counted as malformed */
};

/* ---- bootstrap strings ---- */

static int host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

/* Parses one entry "HOST:PORT" or "[V6]:PORT" of @p len bytes. @return 0 or -EINVAL. */
static int parse_entry(const char *p, size_t len, struct boot_entry *out)
{
    const char *host, *colon;
    size_t hlen, plen;
    unsigned long port = 0;
    int v6 = 0;

    if (len == 0)
        return -EINVAL;
    if (p[0] == '[') {
        const char *close = memchr(p, ']', len);
        if (!close || close + 1 >= p + len || close[1] != ':')
            return -EINVAL;
        host = p + 1;
        hlen = (size_t)(close - host);
        colon = close + 1;
        v6 = 1;
    } else {
        colon = memchr(p, ':', len);
        if (!colon)
            return -EINVAL;
        host = p;
        hlen = (size_t)(colon - p);
    }
    plen = len - (size_t)(colon + 1 - p);
    if (hlen == 0 || hlen > MAX_HOST || plen == 0 || plen > 5)
        return -EINVAL;
    for (size_t i = 0; i < plen; i++) {
        char c = colon[1 + i];
        if (c < '0' || c > '9')
            return -EINVAL;
        port = port * 10 + (unsigned long)(c - '0');
    }
    if (port == 0 || port > 65535)
        return -EINVAL;

    char h[MAX_HOST + 1];
    memcpy(h, host, hlen);
    h[hlen] = '\0';
    if (v6) {
        struct in6_addr a6;
        if (inet_pton(AF_INET6, h, &a6) != 1)
            return -EINVAL;
    } else {
        for (size_t i = 0; i < hlen; i++)
            if (!host_char(h[i]))
                return -EINVAL;
    }
    if (out) {
        memcpy(out->host, h, hlen + 1);
        snprintf(out->port, sizeof(out->port), "%lu", port);
        out->v6 = v6;
    }
    return 0;
}

/* Parses a bootstrap string into @p out (DG_DHT_SERVICE_MAX_BOOTSTRAP entries, or NULL to
 * check only). @return the number of entries (0 for "none"/NULL), or -EINVAL. */
static int parse_list(const char *s, struct boot_entry *out)
{
    size_t n = 0;

    if (!s || strcmp(s, "none") == 0)
        return 0;
    if (strcmp(s, "default") == 0)
        s = DG_DHT_DEFAULT_BOOTSTRAP;
    for (const char *p = s;;) {
        const char *plus = strchr(p, '+');
        size_t len = plus ? (size_t)(plus - p) : strlen(p);
        if (n >= DG_DHT_SERVICE_MAX_BOOTSTRAP || parse_entry(p, len, out ? &out[n] : NULL) != 0)
            return -EINVAL;
        n++;
        if (!plus)
            break;
        p = plus + 1;
    }
    return (int)n;
}

/* @return 1 if @p e is a loopback literal (127.0.0.0/8, ::1, ::ffff:127.x.y.z), else 0. */
static int entry_is_loopback(const struct boot_entry *e)
{
    struct in_addr a;
    struct in6_addr a6;

    if (!e->v6)
        return inet_pton(AF_INET, e->host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, e->host, &a6) != 1)
        return 0;
    return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
}

int dg_dht_service_parse_bootstrap(const char *s)
{
    int n = parse_list(s, NULL);

    return n < 0 ? n : 0;
}

/* The loopback lab rule: @return the table flags for these @p n entries. */
static unsigned lab_flags(const struct boot_entry *e, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!entry_is_loopback(&e[i]))
            return 0;
    return DG_DHT_TABLE_SAME_IP | DG_DHT_TABLE_NO_BEP42;
}

int dg_dht_service_table_flags(const char *bootstrap)
{
    struct boot_entry *e = calloc(DG_DHT_SERVICE_MAX_BOOTSTRAP, sizeof(*e));
    int n;

    if (!e)
        return -ENOMEM;
    n = parse_list(bootstrap, e);
    if (n >= 0)
        n = (int)lab_flags(e, (size_t)n);
    free(e);
    return n;
}

/* ---- randomness, clock, timer ---- */

static void rand_bytes(void *arg, void *buf, size_t len)
{
    (void)arg;
    if (len <= INT_MAX && RAND_bytes(buf, (int)len) == 1)
        return;
    /* OpenSSL failed (it should not): the kernel's generator, or nothing at all. */
    for (size_t done = 0; done < len;) {
        ssize_t n = getrandom((uint8_t *)buf + done, len - done, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            dg_log(DG_LOG_ERROR, LOG_MODULE, "no randomness: RAND_bytes and getrandom failed");
            abort();
        }
        done += (size_t)n;
    }
}

static uint64_t now_ms(struct dg_dht_service *s)
{
    uv_update_time(s->loop);
    return uv_now(s->loop);
}

static void on_tick(uv_timer_t *t);

/* Makes the tick timer fire at most @p delay ms from now (an earlier due time stays). A
 * floor of MIN_TICK_MS keeps a node that keeps asking for 0 from spinning the loop; nothing
 * in the node needs finer timing than its query timeout. */
static void arm(struct dg_dht_service *s, uint64_t delay)
{
    uint64_t now = uv_now(s->loop);

    if (s->stopping)
        return;
    if (delay < MIN_TICK_MS)
        delay = MIN_TICK_MS;
    if (uv_is_active((uv_handle_t *)&s->tick_timer) && s->tick_due <= now + delay)
        return;
    s->tick_due = now + delay;
    uv_timer_start(&s->tick_timer, on_tick, delay, 0);
}

/* After a call that may have sent queries: their timeouts must be seen in time. */
static void kick(struct dg_dht_service *s)
{
    arm(s, DG_DHT_QUERY_TIMEOUT_MS);
}

static void on_tick(uv_timer_t *t)
{
    struct dg_dht_service *s = t->data;
    uint64_t next;

    if (s->stopping)
        return;
    next = dg_dht_tick(s->dht, now_ms(s));
    arm(s, next);
}

/* ---- the socket ---- */

/* dg_dht_send_fn: never calls back into the node. */
static int send_datagram(void *arg, const struct sockaddr *to, socklen_t tolen, const uint8_t *buf,
                         size_t len)
{
    struct dg_dht_service *s = arg;
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);

    (void)tolen;
    if (s->stopping)
        return -ESHUTDOWN;
    int rc = uv_udp_try_send(&s->udp, &b, 1, to);
    if (rc < 0) {
        dg_log(DG_LOG_DEBUG, LOG_MODULE, "send of %zu bytes failed: %s", len, uv_strerror(rc));
        return rc;
    }
    return 0;
}

static void alloc_recv(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct dg_dht_service *s = h->data;

    (void)suggested;
    buf->base = (char *)s->rbuf;
    buf->len = sizeof(s->rbuf);
}

static void on_recv(uv_udp_t *h, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *from,
                    unsigned flags)
{
    struct dg_dht_service *s = h->data;
    const uint8_t *p = (const uint8_t *)buf->base;

    if (s->stopping || nread == 0 || !from)
        return; /* nothing (more) to read */
    if (nread < 0) {
        dg_log(DG_LOG_DEBUG, LOG_MODULE, "receive: %s", uv_strerror((int)nread));
        return;
    }
    if (flags & UV_UDP_PARTIAL) {
        s->oversize++;
        dg_log(DG_LOG_DEBUG, LOG_MODULE, "dropped a datagram over %zu bytes", sizeof(s->rbuf));
        return;
    }
    if (p[0] != 'd') {
        if (s->other)
            s->other(s->other_arg, p, (size_t)nread, from);
        return;
    }
    if (from->sa_family != AF_INET)
        return;
    dg_dht_receive(s->dht, p, (size_t)nread, from, sizeof(struct sockaddr_in), now_ms(s));
    kick(s);
}

/* ---- state file ---- */

/* Reads the state file into @p buf (DG_DHT_SAVE_MAX bytes). @return its length, -ENOENT
 * (no file), -EBADMSG (longer than any save) or another -errno. */
static ssize_t state_read(const char *path, uint8_t *buf)
{
    size_t len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -errno;
    for (;;) {
        uint8_t extra;
        uint8_t *dst = len < DG_DHT_SAVE_MAX ? buf + len : &extra;
        size_t cap = len < DG_DHT_SAVE_MAX ? DG_DHT_SAVE_MAX - len : 1;
        ssize_t n = read(fd, dst, cap);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int err = -errno;
            close(fd);
            return err;
        }
        if (n == 0)
            break;
        if (dst == &extra) {
            close(fd);
            return -EBADMSG;
        }
        len += (size_t)n;
    }
    close(fd);
    return (ssize_t)len;
}

static int write_all(int fd, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* <state_path>.addr: the public IPv4 address the last run learned (text), so that the next run
 * starts with a BEP 42 id valid for it. */
static void addr_path(const struct dg_dht_service *s, char *out, size_t size)
{
    snprintf(out, size, "%s.addr", s->state_path);
}

static void address_save(struct dg_dht_service *s)
{
    struct sockaddr_storage ext;
    char path[PATH_MAX], ip[INET_ADDRSTRLEN];
    FILE *f;

    if (dg_dht_external_addr(s->dht, &ext) != 0 || ext.ss_family != AF_INET)
        return;
    inet_ntop(AF_INET, &((const struct sockaddr_in *)&ext)->sin_addr, ip, sizeof(ip));
    addr_path(s, path, sizeof(path));
    if ((f = fopen(path, "w"))) {
        fprintf(f, "%s\n", ip);
        fclose(f);
    }
}

/* The address saved by address_save(), if any. @return 0 or -ENOENT. */
static int address_load(const struct dg_dht_service *s, struct sockaddr_in *out)
{
    char path[PATH_MAX], ip[64] = "";
    FILE *f;

    addr_path(s, path, sizeof(path));
    if (!(f = fopen(path, "r")))
        return -ENOENT;
    int ok = fscanf(f, "%63s", ip) == 1;
    fclose(f);
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    if (!ok || inet_pton(AF_INET, ip, &out->sin_addr) != 1)
        return -ENOENT;
    return 0;
}

/* Saves the table: tmp file, fsync, rename, fsync of the directory (best effort). */
static int state_save(struct dg_dht_service *s)
{
    uint8_t *buf;
    int len, fd, rc;

    if (!s->state_path)
        return 0;
    address_save(s);
    buf = malloc(DG_DHT_SAVE_MAX);
    if (!buf)
        return -ENOMEM;
    len = dg_dht_save(s->dht, buf, DG_DHT_SAVE_MAX);
    if (len < 0) {
        free(buf);
        return len;
    }
    fd = open(s->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        rc = -errno;
        goto out;
    }
    rc = write_all(fd, buf, (size_t)len);
    if (rc == 0 && fsync(fd) != 0)
        rc = -errno;
    if (close(fd) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(s->tmp_path, s->state_path) != 0)
        rc = -errno;
    if (rc != 0) {
        unlink(s->tmp_path);
        goto out;
    }
    /* The rename itself is durable once the directory is synced. */
    char dir[PATH_MAX] = ".";
    const char *slash = strrchr(s->state_path, '/');
    size_t dlen = !slash ? 0 : slash == s->state_path ? 1 : (size_t)(slash - s->state_path);
    if (dlen > 0 && dlen < sizeof(dir)) {
        memcpy(dir, s->state_path, dlen);
        dir[dlen] = '\0';
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
out:
    free(buf);
    if (rc != 0)
        dg_log(DG_LOG_WARN, LOG_MODULE, "cannot save the routing table to %s: %s", s->state_path,
               strerror(-rc));
    else
        dg_log(DG_LOG_DEBUG, LOG_MODULE, "saved the routing table (%d bytes)", len);
    return rc;
}

/* Reads the state file: the saved id into @p id. @return a malloc'd copy of the save (to
 * load once the node exists), or NULL (no file, damaged: logged). */
static uint8_t *state_load_id(const char *path, uint8_t id[DG_NODE_ID_LEN], size_t *len)
{
    uint8_t *buf = malloc(DG_DHT_SAVE_MAX);
    ssize_t n;
    int family;

    if (!buf)
        return NULL;
    n = state_read(path, buf);
    if (n == -ENOENT) {
        dg_log(DG_LOG_INFO, LOG_MODULE, "no saved routing table at %s: new node id", path);
    } else if (n < 0) {
        dg_log(DG_LOG_WARN, LOG_MODULE, "cannot read the routing table %s (%s): ignored", path,
               n == -EBADMSG ? "too long" : strerror((int)-n));
    } else if (dg_dht_table_load_id(buf, (size_t)n, &family, id) != 0 || family != AF_INET) {
        dg_log(DG_LOG_WARN, LOG_MODULE, "damaged routing table %s: ignored, new node id", path);
    } else {
        *len = (size_t)n;
        return buf;
    }
    free(buf);
    return NULL;
}

/* ---- bootstrap ---- */

static void resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res);
static void maybe_free(struct dg_dht_service *s);

/* Starts resolving the entries from s->boot_next on, one at a time (a slow name server then
 * holds one thread of libuv's pool, not one per entry). @return 1 if a resolution is under
 * way, 0 if the list is done. */
static int resolve_next(struct dg_dht_service *s)
{
    struct addrinfo hints;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    while (s->boot_next < s->nboot) {
        const struct boot_entry *e = &s->boot[s->boot_next++];
        if (e->v6) {
            dg_log(DG_LOG_INFO, LOG_MODULE, "bootstrap [%s]:%s skipped: IPv6 not supported yet",
                   e->host, e->port);
            continue;
        }
        int rc = uv_getaddrinfo(s->loop, &s->gai, resolved, e->host, e->port, &hints);
        if (rc == 0) {
            s->resolving = 1;
            return 1;
        }
        dg_log(DG_LOG_WARN, LOG_MODULE, "cannot resolve %s: %s", e->host, uv_strerror(rc));
    }
    return 0;
}

/* Resolves every bootstrap entry in turn; each address found gets a find_node. */
static void bootstrap(struct dg_dht_service *s)
{
    if (s->resolving)
        return;
    s->boot_next = 0;
    resolve_next(s);
}

static void resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct dg_dht_service *s = req->data;
    const struct boot_entry *e = &s->boot[s->boot_next - 1];
    int sent = 0;

    s->resolving = 0;
    if (s->stopping) {
        uv_freeaddrinfo(res);
        maybe_free(s);
        return;
    }
    if (status < 0) {
        dg_log(DG_LOG_WARN, LOG_MODULE, "cannot resolve bootstrap %s: %s", e->host,
               uv_strerror(status));
    } else {
        uint64_t now = now_ms(s);
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            if (ai->ai_family != AF_INET)
                continue;
            if (dg_dht_bootstrap(s->dht, ai->ai_addr, ai->ai_addrlen, now) == 0)
                sent++;
        }
        uv_freeaddrinfo(res);
        dg_log(DG_LOG_INFO, LOG_MODULE, "bootstrap %s:%s: asked %d address%s", e->host, e->port,
               sent, sent == 1 ? "" : "es");
        if (sent > 0)
            kick(s);
    }
    resolve_next(s);
}

/* Every MAINT_MS: bootstrap again while the table is thin; save now and then. */
static void on_maint(uv_timer_t *t)
{
    struct dg_dht_service *s = t->data;
    struct dg_dht_stats st;
    uint64_t now = now_ms(s);

    if (s->stopping)
        return;
    dg_dht_stats(s->dht, now, &st);
    if (s->nboot > 0 && !s->resolving && st.good < DG_DHT_SERVICE_GOOD_ENOUGH) {
        dg_log(DG_LOG_INFO, LOG_MODULE, "%zu good nodes: bootstrapping again", st.good);
        bootstrap(s);
    }
    if (s->state_path && now - s->last_save_ms >= DG_DHT_SERVICE_SAVE_MS) {
        state_save(s);
        s->last_save_ms = now;
    }
}

/* ---- lookups ---- */

static void lookup_unlink(struct dg_dht_service *s, struct lookup *l)
{
    if (l->prev)
        l->prev->next = l->next;
    else
        s->lookups = l->next;
    if (l->next)
        l->next->prev = l->prev;
    free(l);
}

static void lookup_cb(void *arg, uint32_t search_id, const struct dg_dht_compact *peers,
                      size_t npeers, const struct sockaddr *from, int done)
{
    struct lookup *l = arg;
    struct dg_dht_service *s = l->s;

    if (!s->stopping)
        l->cb(l->arg, search_id, peers, npeers, from, done);
    /* Only the final call owns @p l now: a cancel in a non-final callback has freed it. */
    if (!done)
        return;
    if (l->starting)
        l->finished = 1;
    else
        lookup_unlink(s, l);
}

/* ---- closing ---- */

static void maybe_free(struct dg_dht_service *s)
{
    if (s->handles_open > 0 || s->resolving)
        return;
    if (s->closed)
        s->closed(s->closed_arg);
    while (s->lookups)
        lookup_unlink(s, s->lookups);
    dg_dht_free(s->dht);
    free(s->boot);
    free(s->state_path);
    free(s->tmp_path);
    free(s);
}

static void handle_closed(uv_handle_t *h)
{
    struct dg_dht_service *s = h->data;

    s->handles_open--;
    maybe_free(s);
}

/* ---- public ---- */

int dg_dht_service_start(uv_loop_t *loop, const struct dg_dht_service_config *cfg,
                         struct dg_dht_service **out)
{
    struct dg_dht_service *s;
    struct dg_dht_config dc;
    struct sockaddr_in sin;
    struct sockaddr_storage bound;
    uint8_t *saved = NULL;
    size_t saved_len = 0;
    int n, rc, namelen;

    if (!loop || !cfg || !out)
        return -EINVAL;
    s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->loop = loop;
    s->boot = calloc(DG_DHT_SERVICE_MAX_BOOTSTRAP, sizeof(*s->boot));
    if (!s->boot) {
        rc = -ENOMEM;
        goto fail_free;
    }
    n = parse_list(cfg->bootstrap, s->boot);
    if (n < 0) {
        dg_log(DG_LOG_ERROR, LOG_MODULE, "bad bootstrap list \"%s\"", cfg->bootstrap);
        rc = n;
        goto fail_free;
    }
    s->nboot = (size_t)n;

    memset(&dc, 0, sizeof(dc));
    if (cfg->state_path) {
        size_t plen = strlen(cfg->state_path);
        s->state_path = strdup(cfg->state_path);
        s->tmp_path = malloc(plen + 5);
        if (!s->state_path || !s->tmp_path) {
            rc = -ENOMEM;
            goto fail_free;
        }
        memcpy(s->tmp_path, cfg->state_path, plen);
        memcpy(s->tmp_path + plen, ".tmp", 5);
        saved = state_load_id(s->state_path, dc.id, &saved_len);
        dc.have_id = saved != NULL;
        /* BEP 42: with the public address of the last run known, the id is made valid for it
         * (nodes that enforce BEP 42 keep only such ids in their tables). */
        struct sockaddr_in pub;
        if (address_load(s, &pub) == 0 &&
            (!dc.have_id || !dg_node_id_valid_for(dc.id, (const struct sockaddr *)&pub))) {
            uint8_t r;
            rand_bytes(NULL, &r, 1);
            if (dg_node_id_make((const struct sockaddr *)&pub, r, rand_bytes, NULL, dc.id) == 0) {
                char ip[INET_ADDRSTRLEN];
                inet_ntop(AF_INET, &pub.sin_addr, ip, sizeof(ip));
                dc.have_id = 1;
                dg_log(DG_LOG_INFO, LOG_MODULE, "node id made for the public address %s (BEP 42)",
                       ip);
            }
        }
    }
    dc.family = AF_INET;
    dc.table_flags = lab_flags(s->boot, s->nboot);
    dc.implied_port = cfg->implied_port;
    dc.send = send_datagram;
    dc.send_arg = s;
    dc.rand_bytes = rand_bytes;
    dc.version = client_version;
    dc.version_len = sizeof(client_version);
    uint64_t now = now_ms(s);
    rc = dg_dht_new(&dc, now, &s->dht);
    if (rc != 0) {
        free(saved);
        goto fail_free;
    }
    if (saved) {
        int loaded = dg_dht_load(s->dht, saved, saved_len, now);
        if (loaded < 0)
            dg_log(DG_LOG_WARN, LOG_MODULE, "damaged routing table %s: nodes ignored",
                   s->state_path);
        else
            dg_log(DG_LOG_INFO, LOG_MODULE, "loaded %d nodes from %s", loaded, s->state_path);
        free(saved);
    }
    s->last_save_ms = now;

    /* The socket. From here on, failure releases memory in the close callback. */
    uv_udp_init(loop, &s->udp);
    s->udp.data = s;
    s->gai.data = s;
    s->handles_open = 1;
    uv_ip4_addr("0.0.0.0", cfg->port, &sin);
    rc = uv_udp_bind(&s->udp, (const struct sockaddr *)&sin, 0);
    namelen = sizeof(bound);
    if (rc == 0)
        rc = uv_udp_getsockname(&s->udp, (struct sockaddr *)&bound, &namelen);
    if (rc == 0)
        rc = uv_udp_recv_start(&s->udp, alloc_recv, on_recv);
    if (rc < 0) {
        dg_log(DG_LOG_ERROR, LOG_MODULE, "cannot bind UDP port %u: %s", (unsigned)cfg->port,
               uv_strerror(rc));
        s->stopping = 1;
        uv_close((uv_handle_t *)&s->udp, handle_closed);
        return rc;
    }
    s->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    /* uTP shares the socket and keeps up to a MiB in flight per connection: ask for socket
     * buffers that hold a window (the kernel caps them at net.core.[rw]mem_max). */
    int bufsize = DG_DHT_SERVICE_SOCKET_BUFFER;
    uv_recv_buffer_size((uv_handle_t *)&s->udp, &bufsize);
    bufsize = DG_DHT_SERVICE_SOCKET_BUFFER;
    uv_send_buffer_size((uv_handle_t *)&s->udp, &bufsize);

    uv_timer_init(loop, &s->tick_timer);
    s->tick_timer.data = s;
    uv_timer_init(loop, &s->maint_timer);
    s->maint_timer.data = s;
    s->handles_open = 3;
    uv_timer_start(&s->maint_timer, on_maint, MAINT_MS, MAINT_MS);
    arm(s, 0); /* the first tick starts the lookup of our id from loaded nodes */

    char hex[2 * DG_NODE_ID_LEN + 1];
    for (size_t i = 0; i < DG_NODE_ID_LEN; i++)
        snprintf(hex + 2 * i, 3, "%02x", dg_dht_id(s->dht)[i]);
    dg_log(DG_LOG_INFO, LOG_MODULE, "node %s on UDP port %u (%s id%s)", hex, (unsigned)s->port,
           dc.have_id ? "saved" : "new", dc.table_flags ? ", loopback lab rules" : "");
    bootstrap(s);
    *out = s;
    return 0;

fail_free:
    dg_dht_free(s->dht);
    free(s->boot);
    free(s->state_path);
    free(s->tmp_path);
    free(s);
    return rc;
}

uint16_t dg_dht_service_port(const struct dg_dht_service *s)
{
    return s->port;
}

const uint8_t *dg_dht_service_id(const struct dg_dht_service *s)
{
    return dg_dht_id(s->dht);
}

int dg_dht_service_get_peers(struct dg_dht_service *s, const uint8_t key[DG_NODE_ID_LEN],
                             uint16_t announce_port, dg_dht_search_cb cb, void *arg,
                             uint32_t *search_id)
{
    struct lookup *l;
    uint32_t id = 0;
    int rc;

    if (!cb || !key)
        return -EINVAL;
    if (s->stopping)
        return -ESHUTDOWN;
    l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->s = s;
    l->cb = cb;
    l->arg = arg;
    l->starting = 1;
    l->next = s->lookups;
    if (s->lookups)
        s->lookups->prev = l;
    s->lookups = l;
    rc = dg_dht_get_peers(s->dht, key, announce_port, lookup_cb, l, now_ms(s), &id);
    if (rc != 0 || l->finished) {
        lookup_unlink(s, l);
    } else {
        l->starting = 0;
        l->id = id;
    }
    if (rc != 0)
        return rc;
    if (search_id)
        *search_id = id;
    kick(s);
    return 0;
}

void dg_dht_service_cancel(struct dg_dht_service *s, uint32_t search_id)
{
    if (dg_dht_cancel_search(s->dht, search_id) != 0)
        return; /* not running: its record is freed by its final callback */
    for (struct lookup *l = s->lookups; l; l = l->next) {
        if (l->id == search_id && !l->starting) {
            lookup_unlink(s, l);
            return;
        }
    }
}

void dg_dht_service_stats(const struct dg_dht_service *s, struct dg_dht_stats *st)
{
    dg_dht_stats(s->dht, uv_now(s->loop), st);
    st->malformed += s->oversize;
}

int dg_dht_service_external(const struct dg_dht_service *s, struct sockaddr_storage *out)
{
    return dg_dht_external_addr(s->dht, out);
}

int dg_dht_service_send(struct dg_dht_service *s, const uint8_t *buf, size_t len,
                        const struct sockaddr *to)
{
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);

    if (s->stopping)
        return -ESHUTDOWN;
    int rc = uv_udp_try_send(&s->udp, &b, 1, to);
    return rc < 0 ? rc : 0;
}

void dg_dht_service_set_keepalive(struct dg_dht_service *s, uint64_t interval_ms)
{
    dg_dht_set_keepalive(s->dht, interval_ms);
    kick(s);
}

int dg_dht_service_announced_to(struct dg_dht_service *s, const struct sockaddr *node)
{
    return dg_dht_announced_to(s->dht, node, now_ms(s));
}

void dg_dht_service_mapping(struct dg_dht_service *s, struct dg_dht_mapping *out)
{
    dg_dht_mapping(s->dht, now_ms(s), out);
}

int dg_dht_service_announced(struct dg_dht_service *s, const uint8_t key[DG_NODE_ID_LEN],
                             const struct sockaddr *peer)
{
    return dg_dht_announced(s->dht, key, peer, now_ms(s));
}

void dg_dht_service_set_other_handler(struct dg_dht_service *s, dg_dht_service_other_fn fn,
                                      void *arg)
{
    s->other = fn;
    s->other_arg = arg;
}

void dg_dht_service_stop(struct dg_dht_service *s, void (*closed)(void *arg), void *arg)
{
    if (!s || s->stopping)
        return;
    state_save(s);
    s->stopping = 1;
    s->closed = closed;
    s->closed_arg = arg;
    if (s->resolving)
        uv_cancel((uv_req_t *)&s->gai); /* a running one just returns later */
    uv_udp_recv_stop(&s->udp);
    uv_close((uv_handle_t *)&s->udp, handle_closed);
    uv_close((uv_handle_t *)&s->tick_timer, handle_closed);
    uv_close((uv_handle_t *)&s->maint_timer, handle_closed);
}
