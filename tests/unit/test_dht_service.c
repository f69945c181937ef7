/* Unit tests for engine/dht_service.c: real DHT nodes on UDP sockets in one libuv loop.
 *
 * Every service binds 0.0.0.0 with a port the kernel picks, and talks only to 127.0.0.1:
 * service 0 has no bootstrap, the others bootstrap from 127.0.0.1:<port of 0> (so the
 * loopback lab rule applies: many nodes on one IP, random ids). No other address is ever
 * configured or resolved (the sockets still listen on every interface: tests/run-all.sh runs
 * the suite in a network namespace with loopback only). The loop is run with UV_RUN_ONCE until
 * a condition holds or a deadline passes; a 50 ms pulse timer keeps the loop from blocking past
 * the deadline. Nothing waits a fixed time for a result. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "engine/dht.h"
#include "engine/dht_service.h"
#include "engine/dht_table.h"
#include "engine/krpc.h"
#include "tmpdir.h"

#define NSVC 6
#define DEADLINE_MS 20000
#define ANNOUNCE_PORT 4321

static const uint8_t key_k[DG_NODE_ID_LEN] = {0x5a, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                                              0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                                              0xee, 0xff, 0x01, 0x02, 0x03, 0x04};

struct lab {
    uv_loop_t loop;
    uv_timer_t pulse;
    struct dg_dht_service *svc[NSVC];
    int closed[NSVC];
    char dir[64];
};

/* ---- the loop ---- */

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000;
}

static void pulse_cb(uv_timer_t *t)
{
    (void)t;
}

typedef int (*cond_fn)(struct lab *lab, void *arg);

/* Runs the loop until @p cond holds (@return 1) or DEADLINE_MS pass (@return 0). */
static int run_until(struct lab *lab, cond_fn cond, void *arg)
{
    uint64_t deadline = mono_ms() + DEADLINE_MS;
    int ok;

    uv_timer_start(&lab->pulse, pulse_cb, 50, 50);
    while (!(ok = cond(lab, arg)) && mono_ms() < deadline)
        uv_run(&lab->loop, UV_RUN_ONCE);
    uv_timer_stop(&lab->pulse);
    return ok;
}

static int cond_never(struct lab *lab, void *arg)
{
    (void)lab;
    (void)arg;
    return 0;
}

/* Runs the loop for about @p ms (used only to get past a point in time, never as a wait
 * for a result). */
static void run_for(struct lab *lab, uint64_t ms)
{
    uint64_t end = mono_ms() + ms;

    uv_timer_start(&lab->pulse, pulse_cb, 20, 20);
    while (!cond_never(lab, NULL) && mono_ms() < end)
        uv_run(&lab->loop, UV_RUN_ONCE);
    uv_timer_stop(&lab->pulse);
}

static void lab_init(struct lab *lab)
{
    memset(lab, 0, sizeof(*lab));
    assert_int_equal(uv_loop_init(&lab->loop), 0);
    assert_int_equal(uv_timer_init(&lab->loop, &lab->pulse), 0);
    assert_int_equal(tmpdir_make(lab->dir, sizeof(lab->dir), "dhtsvc"), 0);
}

static void on_closed(void *arg)
{
    (*(int *)arg)++;
}

static int cond_closed(struct lab *lab, void *arg)
{
    int i = *(int *)arg;

    return lab->closed[i] > 0;
}

/* Stops service @p i and runs the loop until it is freed. */
static void lab_stop(struct lab *lab, int i)
{
    assert_non_null(lab->svc[i]);
    lab->closed[i] = 0;
    dg_dht_service_stop(lab->svc[i], on_closed, &lab->closed[i]);
    dg_dht_service_stop(lab->svc[i], on_closed, &lab->closed[i]); /* ignored */
    lab->svc[i] = NULL;
    assert_true(run_until(lab, cond_closed, &i));
    assert_int_equal(lab->closed[i], 1);
}

/* Stops everything; the loop must then close with no handle left open. */
static void lab_free(struct lab *lab)
{
    for (int i = 0; i < NSVC; i++)
        if (lab->svc[i])
            lab_stop(lab, i);
    uv_close((uv_handle_t *)&lab->pulse, NULL);
    assert_int_equal(uv_run(&lab->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&lab->loop), 0);
    tmpdir_remove(lab->dir);
}

/* Starts service @p i: bootstrap none for 0, else 127.0.0.1:<port of 0>. */
static void lab_start(struct lab *lab, int i, const char *state_path)
{
    char boot[64];
    struct dg_dht_service_config cfg;

    memset(&cfg, 0, sizeof(cfg));
    if (i > 0) {
        snprintf(boot, sizeof(boot), "127.0.0.1:%u", (unsigned)dg_dht_service_port(lab->svc[0]));
        cfg.bootstrap = boot;
    } else {
        cfg.bootstrap = "none";
    }
    cfg.state_path = state_path;
    lab->closed[i] = 0;
    assert_int_equal(dg_dht_service_start(&lab->loop, &cfg, &lab->svc[i]), 0);
    assert_true(dg_dht_service_port(lab->svc[i]) != 0);
}

static size_t good_of(struct lab *lab, int i)
{
    struct dg_dht_stats st;

    dg_dht_service_stats(lab->svc[i], &st);
    return st.good;
}

/* Service i knows service 0, and service 0 has every one started so far as good. */
static int cond_joined(struct lab *lab, void *arg)
{
    int i = *(int *)arg;

    return good_of(lab, i) >= 1 && good_of(lab, 0) >= (size_t)i;
}

static int cond_all_good(struct lab *lab, void *arg)
{
    size_t min = *(size_t *)arg;

    for (int i = 0; i < NSVC; i++)
        if (lab->svc[i] && good_of(lab, i) < min)
            return 0;
    return 1;
}

/* Starts the services one after the other, each once the previous one has joined (a node
 * learns of the others from service 0 only when they are known there), then waits until
 * every one has at least 3 good nodes. @p state_paths: NULL, or one path (or NULL) each. */
static void lab_fill(struct lab *lab, const char *const *state_paths)
{
    size_t min = 3;

    lab_start(lab, 0, state_paths ? state_paths[0] : NULL);
    for (int i = 1; i < NSVC; i++) {
        lab_start(lab, i, state_paths ? state_paths[i] : NULL);
        assert_true(run_until(lab, cond_joined, &i));
    }
    assert_true(run_until(lab, cond_all_good, &min));
}

/* ---- lookups ---- */

struct found {
    int done;
    int calls;
    int stop_on_peers; /* the service to stop from the first callback with peers, or -1 */
    int stop_on_done;  /* the service to stop from the final callback, or -1 */
    struct lab *lab;
    size_t npeers;
    struct dg_dht_compact peers[256];
};

static void found_init(struct found *f, struct lab *lab)
{
    memset(f, 0, sizeof(*f));
    f->lab = lab;
    f->stop_on_peers = -1;
    f->stop_on_done = -1;
}

/* Stops service @p i from inside a callback (lab_stop() waits; this cannot). */
static void stop_from_callback(struct lab *lab, int i)
{
    if (!lab->svc[i])
        return;
    lab->closed[i] = 0;
    dg_dht_service_stop(lab->svc[i], on_closed, &lab->closed[i]);
    lab->svc[i] = NULL;
}

static void found_cb(void *arg, uint32_t id, const struct dg_dht_compact *peers, size_t n,
                     const struct sockaddr *from, int done)
{
    struct found *f = arg;

    assert_true(id != 0);
    assert_int_equal(f->done, 0); /* nothing after the final callback */
    f->calls++;
    assert_true(done ? from == NULL : from != NULL);
    if (done) {
        assert_int_equal(n, 0);
        f->done = 1;
        if (f->stop_on_done >= 0)
            stop_from_callback(f->lab, f->stop_on_done);
        return;
    }
    assert_true(n > 0);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(peers[i].len, DG_DHT_COMPACT4_LEN);
        if (f->npeers < 256)
            f->peers[f->npeers++] = peers[i];
    }
    if (f->stop_on_peers >= 0) {
        int i = f->stop_on_peers;
        f->stop_on_peers = -1;
        stop_from_callback(f->lab, i);
    }
}

static int cond_found_done(struct lab *lab, void *arg)
{
    (void)lab;
    return ((struct found *)arg)->done;
}

static int has_peer(const struct found *f, uint32_t ip, uint16_t port)
{
    uint8_t c[DG_DHT_COMPACT4_LEN] = {(uint8_t)(ip >> 24), (uint8_t)(ip >> 16),  (uint8_t)(ip >> 8),
                                      (uint8_t)ip,         (uint8_t)(port >> 8), (uint8_t)port};

    for (size_t i = 0; i < f->npeers; i++)
        if (memcmp(f->peers[i].bytes, c, sizeof(c)) == 0)
            return 1;
    return 0;
}

/* Service @p i looks up key K (announcing @p port if non-zero) until its final callback. */
static void lookup(struct lab *lab, int i, uint16_t port, struct found *f)
{
    uint32_t id = 0;

    found_init(f, lab);
    assert_int_equal(dg_dht_service_get_peers(lab->svc[i], key_k, port, found_cb, f, &id), 0);
    assert_true(id != 0);
    assert_true(run_until(lab, cond_found_done, f));
    assert_int_equal(f->done, 1);
}

/* ---- tests ---- */

/* (1) Tables fill; node 0 learns its external address from the "ip" votes. */
static void test_tables_fill(void **state)
{
    struct lab lab;
    struct dg_dht_stats st;
    struct sockaddr_storage ext;

    (void)state;
    lab_init(&lab);
    lab_fill(&lab, NULL);
    for (int i = 0; i < NSVC; i++) {
        dg_dht_service_stats(lab.svc[i], &st);
        assert_true(st.good >= 3);
        assert_true(st.replies_in > 0);
        for (int j = 0; j < i; j++) {
            assert_true(dg_dht_service_port(lab.svc[i]) != dg_dht_service_port(lab.svc[j]));
            assert_memory_not_equal(dg_dht_service_id(lab.svc[i]), dg_dht_service_id(lab.svc[j]),
                                    DG_NODE_ID_LEN);
        }
    }
    assert_int_equal(dg_dht_service_external(lab.svc[0], &ext), 0);
    assert_int_equal(ext.ss_family, AF_INET);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ext;
    assert_int_equal(ntohl(sin->sin_addr.s_addr), 0x7f000001u);
    assert_int_equal(ntohs(sin->sin_port), dg_dht_service_port(lab.svc[0]));
    lab_free(&lab);
}

/* (2) Node 3 announces K with port 4321; node 5's lookup then finds 127.0.0.1:4321. */
static void test_announce_and_find(void **state)
{
    struct lab lab;
    struct found f3, f5;
    struct dg_dht_stats st;

    (void)state;
    lab_init(&lab);
    lab_fill(&lab, NULL);
    lookup(&lab, 3, ANNOUNCE_PORT, &f3);
    dg_dht_service_stats(lab.svc[3], &st);
    assert_true(st.queries_out[DG_KRPC_ANNOUNCE_PEER] >= 1);
    lookup(&lab, 5, 0, &f5);
    assert_true(has_peer(&f5, 0x7f000001u, ANNOUNCE_PORT));
    assert_true(f5.calls >= 2);

    /* Two nodes go away: node 5's next lookup still ends (their queries time out, which
     * takes the tick timer) and still finds the peer on the others. */
    lab_stop(&lab, 0);
    lab_stop(&lab, 1);
    lookup(&lab, 5, 0, &f5);
    assert_true(has_peer(&f5, 0x7f000001u, ANNOUNCE_PORT));
    dg_dht_service_stats(lab.svc[5], &st);
    assert_true(st.timeouts >= 2);
    lab_free(&lab);
}

/* A lookup with an empty table ends at the next tick, with no peers. */
static void test_empty_table(void **state)
{
    struct lab lab;
    struct found f;

    (void)state;
    lab_init(&lab);
    lab_start(&lab, 0, NULL);
    lookup(&lab, 0, ANNOUNCE_PORT, &f);
    assert_int_equal(f.calls, 1);
    assert_int_equal(f.npeers, 0);

    /* Once the first tick is over (the node then asks for its next one a minute later), a new
     * lookup still ends within the deadline: starting it brought the timer forward. */
    run_for(&lab, 300);
    lookup(&lab, 0, 0, &f);
    assert_int_equal(f.calls, 1);

    /* Two lookups end in the same tick; the first final callback stops the service: the
     * second one is not called back. */
    struct found f2;
    found_init(&f, &lab);
    found_init(&f2, &lab);
    f.stop_on_done = f2.stop_on_done = 0;
    assert_int_equal(dg_dht_service_get_peers(lab.svc[0], key_k, 0, found_cb, &f, NULL), 0);
    assert_int_equal(dg_dht_service_get_peers(lab.svc[0], key_k, 0, found_cb, &f2, NULL), 0);
    int zero = 0;
    assert_true(run_until(&lab, cond_closed, &zero));
    assert_int_equal(f.calls + f2.calls, 1);
    assert_int_equal(f.done + f2.done, 1);
    lab_free(&lab);
}

/* (3) A stopped service saves its table; a new one on the same state file (bootstrap none)
 * has the same id, the saved nodes, and finds what was announced. */
static void test_state_restart(void **state)
{
    struct lab lab;
    struct found f3, f4;
    struct dg_dht_stats st;
    char path[128];
    const char *paths[NSVC] = {NULL, NULL, NULL, NULL, path, NULL};
    uint8_t id4[DG_NODE_ID_LEN], saved_id[DG_NODE_ID_LEN];
    static uint8_t buf[DG_DHT_SAVE_MAX + 1];
    int family = 0;

    (void)state;
    lab_init(&lab);
    snprintf(path, sizeof(path), "%s/dht4.state", lab.dir);
    lab_fill(&lab, paths);
    lookup(&lab, 3, ANNOUNCE_PORT, &f3);

    memcpy(id4, dg_dht_service_id(lab.svc[4]), DG_NODE_ID_LEN);
    uint16_t port4 = dg_dht_service_port(lab.svc[4]);
    lab_stop(&lab, 4);

    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t len = read(fd, buf, sizeof(buf));
    close(fd);
    assert_true(len > DG_DHT_SAVE_HEADER);
    assert_int_equal(dg_dht_table_load_id(buf, (size_t)len, &family, saved_id), 0);
    assert_int_equal(family, AF_INET);
    assert_memory_equal(saved_id, id4, DG_NODE_ID_LEN);
    size_t nsaved = (size_t)buf[6] << 8 | buf[7];
    assert_true(nsaved >= 3);
    struct stat sst;
    assert_int_equal(stat(path, &sst), 0);
    assert_int_equal(sst.st_mode & 0777, 0600);
    char tmp[140];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), -1);

    /* Restart on the state file with no bootstrap, on another port: the other nodes do not
     * know this address, so only its own lookup (the first tick starts one from the loaded
     * nodes) makes them reply and turn good. */
    struct dg_dht_service_config cfg = {.bootstrap = "none", .state_path = path};
    lab.closed[4] = 0;
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &lab.svc[4]), 0);
    assert_memory_equal(dg_dht_service_id(lab.svc[4]), id4, DG_NODE_ID_LEN);
    dg_dht_service_stats(lab.svc[4], &st);
    assert_int_equal(st.nodes, nsaved);
    assert_int_equal(st.good, 0); /* loaded nodes are questionable until they reply */
    size_t min = 3;
    assert_true(run_until(&lab, cond_all_good, &min));
    lookup(&lab, 4, 0, &f4);
    assert_true(has_peer(&f4, 0x7f000001u, ANNOUNCE_PORT));

    /* Once more, on the first port: the id survives a second restart. */
    lab_stop(&lab, 4);
    cfg.port = port4;
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &lab.svc[4]), 0);
    assert_int_equal(dg_dht_service_port(lab.svc[4]), port4);
    assert_memory_equal(dg_dht_service_id(lab.svc[4]), id4, DG_NODE_ID_LEN);
    dg_dht_service_stats(lab.svc[4], &st);
    assert_true(st.nodes >= nsaved);
    lookup(&lab, 4, 0, &f4);
    assert_true(has_peer(&f4, 0x7f000001u, ANNOUNCE_PORT));
    lab_free(&lab);
}

static void write_file(const char *path, const uint8_t *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
    close(fd);
}

/* Starts a service on @p path (bootstrap none), checks it has an empty table and an id other
 * than @p old_id, stops it; @return (in @p new_id) the id it saved. */
static void start_on_damaged(struct lab *lab, const char *path, const uint8_t *old_id,
                             uint8_t *new_id)
{
    struct dg_dht_service_config cfg = {.bootstrap = "none", .state_path = path};
    struct dg_dht_stats st;
    static uint8_t buf[DG_DHT_SAVE_MAX];
    int family;

    lab->closed[0] = 0;
    assert_int_equal(dg_dht_service_start(&lab->loop, &cfg, &lab->svc[0]), 0);
    assert_memory_not_equal(dg_dht_service_id(lab->svc[0]), old_id, DG_NODE_ID_LEN);
    dg_dht_service_stats(lab->svc[0], &st);
    assert_int_equal(st.nodes, 0);
    memcpy(new_id, dg_dht_service_id(lab->svc[0]), DG_NODE_ID_LEN);
    lab_stop(lab, 0);

    /* The stop replaced the damaged file with a good one. */
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t len = read(fd, buf, sizeof(buf));
    close(fd);
    uint8_t id[DG_NODE_ID_LEN];
    assert_int_equal(dg_dht_table_load_id(buf, (size_t)len, &family, id), 0);
    assert_memory_equal(id, new_id, DG_NODE_ID_LEN);
}

/* (4b) BEP 42: with the public address of the last run saved next to the state, the node
 * starts with an id valid for it (a saved id that is not is replaced), and keeps it. */
static void test_id_for_public_address(void **state)
{
    struct lab lab;
    char path[128], addr_file[160];
    struct sockaddr_in pub;
    uint8_t id[DG_NODE_ID_LEN];

    (void)state;
    lab_init(&lab);
    snprintf(path, sizeof(path), "%s/dht.state", lab.dir);
    snprintf(addr_file, sizeof(addr_file), "%s.addr", path);
    assert_int_equal(uv_ip4_addr("198.51.100.7", 0, &pub), 0);

    /* A first run without an address: a random id, saved (not valid for pub, almost surely;
     * the test makes sure by trying until it is not). */
    for (int tries = 0;; tries++) {
        assert_true(tries < 16);
        lab_start(&lab, 0, path);
        memcpy(id, dg_dht_service_id(lab.svc[0]), DG_NODE_ID_LEN);
        lab_stop(&lab, 0);
        if (!dg_node_id_valid_for(id, (const struct sockaddr *)&pub))
            break;
        unlink(path);
    }
    FILE *f = fopen(addr_file, "w");
    assert_non_null(f);
    fputs("198.51.100.7\n", f);
    fclose(f);
    lab_start(&lab, 0, path);
    assert_true(dg_node_id_valid_for(dg_dht_service_id(lab.svc[0]), (const struct sockaddr *)&pub));
    memcpy(id, dg_dht_service_id(lab.svc[0]), DG_NODE_ID_LEN);
    lab_stop(&lab, 0);
    /* The next start keeps that (valid) id. */
    lab_start(&lab, 0, path);
    assert_memory_equal(dg_dht_service_id(lab.svc[0]), id, DG_NODE_ID_LEN);
    lab_stop(&lab, 0);
    lab_free(&lab);
}

/* (4) A damaged state file is ignored: the service starts with a new random id. */
static void test_damaged_state(void **state)
{
    struct lab lab;
    char path[128];
    static uint8_t buf[DG_DHT_SAVE_MAX + 16];
    uint8_t id[DG_NODE_ID_LEN], id2[DG_NODE_ID_LEN];
    int family;

    (void)state;
    lab_init(&lab);
    snprintf(path, sizeof(path), "%s/dht.state", lab.dir);

    /* A good file first; its id is reused. */
    struct dg_dht_service_config cfg = {.bootstrap = "none", .state_path = path};
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &lab.svc[0]), 0);
    memcpy(id, dg_dht_service_id(lab.svc[0]), DG_NODE_ID_LEN);
    lab_stop(&lab, 0);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    ssize_t len = read(fd, buf, sizeof(buf));
    close(fd);
    assert_int_equal(len, DG_DHT_SAVE_HEADER + 4); /* no nodes */
    assert_int_equal(dg_dht_table_load_id(buf, (size_t)len, &family, id2), 0);
    assert_memory_equal(id2, id, DG_NODE_ID_LEN);
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &lab.svc[0]), 0);
    assert_memory_equal(dg_dht_service_id(lab.svc[0]), id, DG_NODE_ID_LEN);
    lab_stop(&lab, 0);

    /* One bit of the CRC flipped (the id is intact, but must not be reused). */
    buf[len - 1] ^= 0x40;
    write_file(path, buf, (size_t)len);
    start_on_damaged(&lab, path, id, id2);

    /* Garbage, an empty file, and a file longer than any save. */
    write_file(path, (const uint8_t *)"garbage", 7);
    start_on_damaged(&lab, path, id2, id);
    write_file(path, buf, 0);
    start_on_damaged(&lab, path, id, id2);
    memset(buf, 0, sizeof(buf));
    write_file(path, buf, sizeof(buf));
    start_on_damaged(&lab, path, id2, id);

    /* A state file that cannot be written (no such directory): logged, nothing else. */
    snprintf(path, sizeof(path), "%s/missing/dht.state", lab.dir);
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &lab.svc[0]), 0);
    lab_stop(&lab, 0);
    assert_int_equal(access(path, F_OK), -1);
    lab_free(&lab);
}

/* (5) Bootstrap string syntax. */
static void test_parse_bootstrap(void **state)
{
    static const char *const good[] = {
        "127.0.0.1:6881",
        "dht-router.invalid:6881", /* syntax only: never resolved here */
        "[::1]:6881",
        "[2001:db8::1]:1",
        "none",
        "default",
        "a:1+b:2",
        "host:65535",
        "my_host-1.example:25401",
        "a:1+b:2+c:3+d:4+e:5+f:6+g:7+h:8+i:9+j:10+k:11+l:12+m:13+n:14+o:15+p:16",
        DG_DHT_DEFAULT_BOOTSTRAP,
    };
    static const char *const bad[] = {
        "",
        "host",
        "host:0",
        "host:70000",
        "host:65536",
        "a:1+",
        ":1",
        "+a:1",
        "a:1++b:2",
        "host:",
        "host:-1",
        "host:1x",
        "host :1",
        "::1:6881",
        "[::1]",
        "[::1]6881",
        "[::1]:",
        "[zz]:1",
        "[]:1",
        "none+a:1",
        "a:1+none",
        "host:123456",
        "a:1+b:2+c:3+d:4+e:5+f:6+g:7+h:8+i:9+j:10+k:11+l:12+m:13+n:14+o:15+p:16+q:17",
    };

    (void)state;
    assert_int_equal(dg_dht_service_parse_bootstrap(NULL), 0);
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        if (dg_dht_service_parse_bootstrap(good[i]) != 0)
            fail_msg("refused \"%s\"", good[i]);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (dg_dht_service_parse_bootstrap(bad[i]) != -EINVAL)
            fail_msg("accepted \"%s\"", bad[i]);
    }
    char longhost[300];
    memset(longhost, 'a', 254);
    memcpy(longhost + 254, ":1", 3);
    assert_int_equal(dg_dht_service_parse_bootstrap(longhost), -EINVAL);
    memcpy(longhost + 253, ":1", 3);
    assert_int_equal(dg_dht_service_parse_bootstrap(longhost), 0);

    /* The loopback lab rule. */
    const unsigned lab = DG_DHT_TABLE_SAME_IP | DG_DHT_TABLE_NO_BEP42;
    assert_int_equal(dg_dht_service_table_flags(NULL), lab);
    assert_int_equal(dg_dht_service_table_flags("none"), lab);
    assert_int_equal(dg_dht_service_table_flags("127.0.0.1:6881"), lab);
    assert_int_equal(dg_dht_service_table_flags("127.0.0.1:1+127.9.8.7:2+[::1]:3"), lab);
    assert_int_equal(dg_dht_service_table_flags("127.0.0.1:1+10.0.0.1:2"), 0);
    assert_int_equal(dg_dht_service_table_flags("128.0.0.1:1"), 0);
    assert_int_equal(dg_dht_service_table_flags("localhost:6881"), 0);
    assert_int_equal(dg_dht_service_table_flags("[2001:db8::1]:6881"), 0);
    assert_int_equal(dg_dht_service_table_flags("default"), 0);
    assert_int_equal(dg_dht_service_table_flags("127.0.0.1"), -EINVAL);

    /* start refuses a bad string (nothing to close: no loop run needed, nothing leaks). */
    uv_loop_t loop;
    struct dg_dht_service *s = NULL;
    struct dg_dht_service_config cfg = {.bootstrap = "host"};
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(dg_dht_service_start(&loop, &cfg, &s), -EINVAL);
    assert_null(s);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- other datagrams ---- */

struct other {
    int calls;
    size_t len;
    uint8_t buf[64];
    struct sockaddr_in from;
};

static void other_cb(void *arg, const uint8_t *buf, size_t len, const struct sockaddr *from)
{
    struct other *o = arg;

    o->calls++;
    o->len = len < sizeof(o->buf) ? len : sizeof(o->buf);
    memcpy(o->buf, buf, o->len);
    assert_int_equal(from->sa_family, AF_INET);
    memcpy(&o->from, from, sizeof(o->from));
}

static int cond_other(struct lab *lab, void *arg)
{
    (void)lab;
    return ((struct other *)arg)->calls > 0;
}

static int cond_malformed(struct lab *lab, void *arg)
{
    struct dg_dht_stats st;

    (void)arg;
    dg_dht_service_stats(lab->svc[0], &st);
    return st.malformed > 0;
}

/* (6) A datagram that is not a bencoded dictionary goes to the other handler; one that is
 * goes to the DHT. */
static void test_other_handler(void **state)
{
    struct lab lab;
    struct other o;
    uv_udp_t sock;
    struct sockaddr_in sin, to, me;
    int namelen = sizeof(me);

    (void)state;
    memset(&o, 0, sizeof(o));
    lab_init(&lab);
    lab_start(&lab, 0, NULL);
    dg_dht_service_set_other_handler(lab.svc[0], other_cb, &o);

    assert_int_equal(uv_udp_init(&lab.loop, &sock), 0);
    assert_int_equal(uv_ip4_addr("127.0.0.1", 0, &sin), 0);
    assert_int_equal(uv_udp_bind(&sock, (const struct sockaddr *)&sin, 0), 0);
    assert_int_equal(uv_udp_getsockname(&sock, (struct sockaddr *)&me, &namelen), 0);
    assert_int_equal(uv_ip4_addr("127.0.0.1", dg_dht_service_port(lab.svc[0]), &to), 0);

    /* A bencoded dictionary that is no KRPC message: the DHT counts it as malformed. */
    uv_buf_t b = uv_buf_init((char *)"d1:ai0ee", 8);
    assert_int_equal(uv_udp_try_send(&sock, &b, 1, (const struct sockaddr *)&to), 8);
    assert_true(run_until(&lab, cond_malformed, NULL));
    assert_int_equal(o.calls, 0);

    b = uv_buf_init((char *)"hello", 5);
    assert_int_equal(uv_udp_try_send(&sock, &b, 1, (const struct sockaddr *)&to), 5);
    assert_true(run_until(&lab, cond_other, &o));
    assert_int_equal(o.calls, 1);
    assert_int_equal(o.len, 5);
    assert_memory_equal(o.buf, "hello", 5);
    assert_int_equal(ntohl(o.from.sin_addr.s_addr), 0x7f000001u);
    assert_int_equal(o.from.sin_port, me.sin_port);

    /* Without a handler they are dropped. */
    dg_dht_service_set_other_handler(lab.svc[0], NULL, NULL);
    assert_int_equal(uv_udp_try_send(&sock, &b, 1, (const struct sockaddr *)&to), 5);
    uv_close((uv_handle_t *)&sock, NULL);
    lab_free(&lab);
    assert_int_equal(o.calls, 1);
}

static int cond_pinged(struct lab *lab, void *arg)
{
    struct dg_dht_stats st;

    (void)arg;
    dg_dht_service_stats(lab->svc[0], &st);
    return st.queries_in[DG_KRPC_PING] > 0;
}

/* (7) A datagram of several KiB (bittorrent-dht nodes answer find_node with their whole
 * table) is received whole and handled, not dropped. */
static void test_large_datagram(void **state)
{
    struct lab lab;
    uv_udp_t sock;
    struct sockaddr_in sin, to;
    static char ping[4200];
    int n;

    (void)state;
    lab_init(&lab);
    lab_start(&lab, 0, NULL);
    assert_int_equal(uv_udp_init(&lab.loop, &sock), 0);
    assert_int_equal(uv_ip4_addr("127.0.0.1", 0, &sin), 0);
    assert_int_equal(uv_udp_bind(&sock, (const struct sockaddr *)&sin, 0), 0);
    assert_int_equal(uv_ip4_addr("127.0.0.1", dg_dht_service_port(lab.svc[0]), &to), 0);
    /* A ping whose arguments carry an unknown 4000-byte key (ignored by the node). */
    n = snprintf(ping, sizeof(ping), "d1:ad2:id20:%s2:zz4000:", "abcdefghij0123456789");
    memset(ping + n, 'z', 4000);
    n += 4000;
    n += snprintf(ping + n, sizeof(ping) - (size_t)n, "e1:q4:ping1:t2:aa1:y1:qe");
    uv_buf_t b = uv_buf_init(ping, (unsigned)n);
    assert_int_equal(uv_udp_try_send(&sock, &b, 1, (const struct sockaddr *)&to), n);
    assert_true(run_until(&lab, cond_pinged, NULL));
    uv_close((uv_handle_t *)&sock, NULL);
    lab_free(&lab);
}

/* ---- stopping ---- */

static int cond_two_closed(struct lab *lab, void *arg)
{
    (void)arg;
    return lab->closed[0] > 0 && lab->closed[1] > 0;
}

/* A port in use fails with -EADDRINUSE; stop with a resolution in flight, with lookups
 * running, and from inside a lookup callback: no callback after stop, everything freed. */
static void test_stop(void **state)
{
    struct lab lab;
    struct found fa, fb, fc;
    uint32_t id = 0;

    (void)state;
    lab_init(&lab);
    lab_start(&lab, 0, NULL);
    struct dg_dht_service *s = NULL;
    struct dg_dht_service_config cfg = {.port = dg_dht_service_port(lab.svc[0])};
    assert_int_equal(dg_dht_service_start(&lab.loop, &cfg, &s), -EADDRINUSE);
    assert_null(s);

    /* Stopped before its bootstrap address is resolved: nothing is sent. */
    lab_start(&lab, 1, NULL);
    struct dg_dht_stats st;
    dg_dht_service_stop(lab.svc[1], on_closed, &lab.closed[1]);
    dg_dht_service_stats(lab.svc[1], &st); /* still valid until closed */
    assert_int_equal(st.queries_out[DG_KRPC_FIND_NODE], 0);
    lab.svc[1] = NULL;
    int one = 1;
    assert_true(run_until(&lab, cond_closed, &one));
    lab_stop(&lab, 0);

    /* A filled lab with a peer announced. */
    lab_fill(&lab, NULL);
    lookup(&lab, 3, ANNOUNCE_PORT, &fa);

    /* A cancelled lookup never calls back; a lookup running at stop neither. */
    found_init(&fa, &lab);
    assert_int_equal(dg_dht_service_get_peers(lab.svc[1], key_k, 0, found_cb, &fa, &id), 0);
    dg_dht_service_cancel(lab.svc[1], id);
    dg_dht_service_cancel(lab.svc[1], id);     /* ignored */
    dg_dht_service_cancel(lab.svc[1], 999999); /* ignored */
    found_init(&fb, &lab);
    assert_int_equal(dg_dht_service_get_peers(lab.svc[0], key_k, 0, found_cb, &fb, NULL), 0);
    dg_dht_service_stop(lab.svc[0], on_closed, &lab.closed[0]);
    assert_int_equal(dg_dht_service_get_peers(lab.svc[0], key_k, 0, found_cb, &fb, NULL),
                     -ESHUTDOWN);
    lab.svc[0] = NULL;

    /* Stopped from inside its own callback (the first peers of a lookup). */
    found_init(&fc, &lab);
    fc.stop_on_peers = 1;
    assert_int_equal(dg_dht_service_get_peers(lab.svc[1], key_k, 0, found_cb, &fc, NULL), 0);
    assert_true(run_until(&lab, cond_two_closed, NULL));
    assert_int_equal(fa.calls, 0);
    assert_int_equal(fb.calls, 0);
    assert_int_equal(fc.calls, 1);
    assert_int_equal(fc.done, 0);
    assert_true(has_peer(&fc, 0x7f000001u, ANNOUNCE_PORT));
    lab_free(&lab);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_bootstrap),   cmocka_unit_test(test_tables_fill),
        cmocka_unit_test(test_announce_and_find), cmocka_unit_test(test_empty_table),
        cmocka_unit_test(test_state_restart),     cmocka_unit_test(test_damaged_state),
        cmocka_unit_test(test_other_handler),     cmocka_unit_test(test_stop),
        cmocka_unit_test(test_large_datagram),    cmocka_unit_test(test_id_for_public_address),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
