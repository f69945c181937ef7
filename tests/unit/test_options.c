/* Unit tests for mount/options.c: sizes, durations and the command line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/log.h"
#include "mount/options.h"

/* ---- dg_parse_size ---- */

static void expect_size(const char *s, uint64_t want)
{
    uint64_t v = 12345;

    if (dg_parse_size(s, &v) != 0)
        fail_msg("dg_parse_size(\"%s\") failed, expected %llu", s, (unsigned long long)want);
    if (v != want)
        fail_msg("dg_parse_size(\"%s\") = %llu, expected %llu", s, (unsigned long long)v,
                 (unsigned long long)want);
}

static void expect_size_fails(const char *s)
{
    uint64_t v = 12345;
    int rc = dg_parse_size(s, &v);

    if (rc != -EINVAL)
        fail_msg("dg_parse_size(\"%s\") = %d (value %llu), expected -EINVAL", s, rc,
                 (unsigned long long)v);
    assert_int_equal(v, 12345); /* untouched */
}

static void test_parse_size(void **state)
{
    (void)state;
    expect_size("0", 0);
    expect_size("10", 10);
    expect_size("1K", 1024);
    expect_size("1k", 1024);
    expect_size("2M", 2ull << 20);
    expect_size("10G", 10ull << 30);
    expect_size("1T", 1ull << 40);
    expect_size("5MiB", 5ull << 20);
    expect_size("5KB", 5ull << 10);
    expect_size("3gb", 3ull << 30);
    expect_size("7B", 7);
    expect_size("0G", 0);
    expect_size("007", 7);
    expect_size("16777215T", 16777215ull << 40); /* the largest whole number of TiB */

    expect_size_fails("");
    expect_size_fails("12X");
    expect_size_fails("-1");
    expect_size_fails("+1");
    expect_size_fails("K");
    expect_size_fails("1KK");
    expect_size_fails("1 K");
    expect_size_fails(" 1");
    expect_size_fails("1 ");
    expect_size_fails("1.5G");
    expect_size_fails("1iB"); /* "iB" only after a multiplier */
    expect_size_fails("1Bi");
    expect_size_fails("1GiBx");
    expect_size_fails("99999999999T");
    expect_size_fails("16777216T"); /* 2^64 */
    expect_size_fails("17179869184G");
    expect_size_fails("18446744073709551616");
    expect_size_fails("99999999999999999999999");
    expect_size_fails(NULL);
}

/* UINT64_MAX itself is not an overflow. */
static void test_parse_size_max(void **state)
{
    (void)state;
    expect_size("18446744073709551610", UINT64_MAX - 5);
    expect_size("18446744073709551615", UINT64_MAX);
}

/* ---- dg_parse_seconds ---- */

static void expect_seconds(const char *s, uint32_t want_ms)
{
    uint32_t ms = 4242;

    if (dg_parse_seconds(s, &ms) != 0)
        fail_msg("dg_parse_seconds(\"%s\") failed, expected %u ms", s, want_ms);
    if (ms != want_ms)
        fail_msg("dg_parse_seconds(\"%s\") = %u ms, expected %u", s, ms, want_ms);
}

static void expect_seconds_fails(const char *s)
{
    uint32_t ms = 4242;
    int rc = dg_parse_seconds(s, &ms);

    if (rc != -EINVAL)
        fail_msg("dg_parse_seconds(\"%s\") = %d (%u ms), expected -EINVAL", s, rc, ms);
    assert_int_equal(ms, 4242);
}

static void test_parse_seconds(void **state)
{
    (void)state;
    expect_seconds("30", 30000);
    expect_seconds("0.5", 500);
    expect_seconds("1.25", 1250);
    expect_seconds("0", 1); /* at least 1 ms */
    expect_seconds("0.0001", 1);
    expect_seconds("86400", 86400000);
    expect_seconds_fails("1e3"); /* plain decimal only, as documented */

    expect_seconds_fails("");
    expect_seconds_fails("-1");
    expect_seconds_fails("-0");
    expect_seconds_fails("+5");
    expect_seconds_fails("abc");
    expect_seconds_fails("5s");
    expect_seconds_fails("5 ");
    expect_seconds_fails(" 5");
    expect_seconds_fails("1e9");
    expect_seconds_fails("86401");
    expect_seconds_fails("inf");
    expect_seconds_fails("infinity");
    expect_seconds_fails("nan");
    expect_seconds_fails("NAN");
    expect_seconds_fails(NULL);
}

/* Leading white space is junk like " 5" is, whatever the kind of space. */
static void test_parse_seconds_whitespace(void **state)
{
    (void)state;
    expect_seconds_fails("\t5");
    expect_seconds_fails("\n5");
}

/* ---- dg_options_parse ---- */

struct env_saved {
    char *xdg_data, *xdg_cache, *home;
    char cwd[PATH_MAX];
    char tmp[64];
};

static char *dup_env(const char *name)
{
    const char *v = getenv(name);

    return v ? strdup(v) : NULL;
}

static void restore_env(const char *name, const char *value)
{
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
}

static int setup(void **state)
{
    struct env_saved *s = calloc(1, sizeof(*s));

    if (!s)
        return -1;
    s->xdg_data = dup_env("XDG_DATA_HOME");
    s->xdg_cache = dup_env("XDG_CACHE_HOME");
    s->home = dup_env("HOME");
    if (!getcwd(s->cwd, sizeof(s->cwd)))
        return -1;
    snprintf(s->tmp, sizeof(s->tmp), "/tmp/dg-options-XXXXXX");
    if (!mkdtemp(s->tmp) || chdir(s->tmp) < 0)
        return -1;
    setenv("XDG_DATA_HOME", "/xdg/data", 1);
    setenv("XDG_CACHE_HOME", "/xdg/cache", 1);
    setenv("HOME", "/home/tester", 1);
    *state = s;
    return 0;
}

static int teardown(void **state)
{
    struct env_saved *s = *state;

    restore_env("XDG_DATA_HOME", s->xdg_data);
    restore_env("XDG_CACHE_HOME", s->xdg_cache);
    restore_env("HOME", s->home);
    if (chdir(s->cwd) < 0)
        return -1;
    rmdir(s->tmp);
    free(s->xdg_data);
    free(s->xdg_cache);
    free(s->home);
    free(s);
    return 0;
}

#define MAX_ARGS 16

/* Parses the NULL-terminated arguments after the program name. */
static int parse(struct dg_options *o, char *err, size_t errlen, ...)
{
    char *argv[MAX_ARGS + 2];
    int argc = 0;
    va_list ap;
    const char *a;

    argv[argc++] = (char *)"digfs";
    va_start(ap, errlen);
    while ((a = va_arg(ap, const char *)) && argc <= MAX_ARGS)
        argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    memset(err, 'E', errlen);
    err[errlen - 1] = '\0';
    return dg_options_parse(argc, argv, o, err, errlen);
}

static void test_defaults(void **state)
{
    struct dg_options o;
    char err[256];

    (void)state;
    assert_int_equal(parse(&o, err, sizeof(err), "/mnt/x", NULL), 0);
    assert_string_equal(err, "");
    assert_string_equal(o.mountpoint, "/mnt/x");
    assert_string_equal(o.data_dir, "/xdg/data/digfs");
    assert_string_equal(o.cache_dir, "/xdg/cache/digfs");
    assert_int_equal(o.cache_size, DG_DEFAULT_CACHE_SIZE);
    assert_int_equal(o.read_timeout_ms, DG_DEFAULT_READ_TIMEOUT_MS);
    assert_int_equal(o.log_level, DG_LOG_INFO);
    assert_false(o.foreground);
    assert_false(o.debug);
    assert_false(o.single_thread);
    assert_false(o.show_help);
    assert_false(o.show_version);
    assert_non_null(o.fuse_opts);
    assert_string_equal(o.fuse_opts, "");
    dg_options_free(&o);

    /* A relative mount point is kept as given. */
    assert_int_equal(parse(&o, err, sizeof(err), "mnt", NULL), 0);
    assert_string_equal(o.mountpoint, "mnt");
    dg_options_free(&o);
}

static void test_xdg_defaults(void **state)
{
    struct dg_options o;
    char err[256];

    (void)state;
    unsetenv("XDG_DATA_HOME");
    unsetenv("XDG_CACHE_HOME");
    assert_int_equal(parse(&o, err, sizeof(err), "m", NULL), 0);
    assert_string_equal(o.data_dir, "/home/tester/.local/share/digfs");
    assert_string_equal(o.cache_dir, "/home/tester/.cache/digfs");
    dg_options_free(&o);

    /* Empty or relative XDG variables are ignored (XDG base directory spec). */
    setenv("XDG_DATA_HOME", "", 1);
    setenv("XDG_CACHE_HOME", "relative/cache", 1);
    assert_int_equal(parse(&o, err, sizeof(err), "m", NULL), 0);
    assert_string_equal(o.data_dir, "/home/tester/.local/share/digfs");
    assert_string_equal(o.cache_dir, "/home/tester/.cache/digfs");
    dg_options_free(&o);

    /* One set, the other not. */
    setenv("XDG_CACHE_HOME", "/var/cache/u", 1);
    setenv("HOME", "/root", 1);
    assert_int_equal(parse(&o, err, sizeof(err), "m", NULL), 0);
    assert_string_equal(o.data_dir, "/root/.local/share/digfs");
    assert_string_equal(o.cache_dir, "/var/cache/u/digfs");
    dg_options_free(&o);

    /* Options override the defaults. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "data_dir=/d,cache_dir=/c", NULL), 0);
    assert_string_equal(o.data_dir, "/d");
    assert_string_equal(o.cache_dir, "/c");
    dg_options_free(&o);
}

static void test_flags(void **state)
{
    struct dg_options o;
    char err[256];

    (void)state;
    assert_int_equal(parse(&o, err, sizeof(err), "-f", "m", NULL), 0);
    assert_true(o.foreground);
    assert_false(o.debug);
    assert_string_equal(o.mountpoint, "m");
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "m", "-d", NULL), 0);
    assert_true(o.debug);
    assert_true(o.foreground); /* -d implies -f */
    assert_int_equal(o.log_level, DG_LOG_DEBUG);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "m", "-odebug", NULL), 0);
    assert_true(o.debug);
    assert_true(o.foreground);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "-s", "m", NULL), 0);
    assert_true(o.single_thread);
    assert_false(o.foreground);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "-h", NULL), 0);
    assert_true(o.show_help);
    assert_null(o.mountpoint);
    assert_non_null(o.data_dir);
    assert_non_null(o.fuse_opts);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "--help", NULL), 0);
    assert_true(o.show_help);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "-V", NULL), 0);
    assert_true(o.show_version);
    assert_null(o.mountpoint);
    dg_options_free(&o);
}

static void test_o_options(void **state)
{
    struct dg_options o;
    char err[256];

    (void)state;
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o",
                           "cache_size=5G,read_timeout=2.5,log_level=warn,data_dir=/srv/d", NULL),
                     0);
    assert_int_equal(o.cache_size, 5ull << 30);
    assert_int_equal(o.read_timeout_ms, 2500);
    assert_int_equal(o.log_level, DG_LOG_WARN);
    assert_string_equal(o.data_dir, "/srv/d");
    assert_string_equal(o.fuse_opts, "");
    dg_options_free(&o);

    /* Repeated -o: all apply, the last value of an option wins. */
    assert_int_equal(parse(&o, err, sizeof(err), "-o", "cache_size=1G", "m", "-o",
                           "cache_size=2G,data_dir=/a", "-o", "data_dir=/b", NULL),
                     0);
    assert_int_equal(o.cache_size, 2ull << 30);
    assert_string_equal(o.data_dir, "/b");
    dg_options_free(&o);

    /* The glued form. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-odata_dir=/x,cache_size=1M", NULL), 0);
    assert_string_equal(o.data_dir, "/x");
    assert_int_equal(o.cache_size, 1ull << 20);
    dg_options_free(&o);

    /* Empty items between commas are ignored. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", ",,log_level=error,", NULL), 0);
    assert_int_equal(o.log_level, DG_LOG_ERROR);
    assert_string_equal(o.fuse_opts, "");
    dg_options_free(&o);
}

static void test_paths(void **state)
{
    struct env_saved *s = *state;
    struct dg_options o;
    char err[256], want[PATH_MAX + 32], cwd[PATH_MAX];

    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_string_equal(cwd, s->tmp);

    /* Relative paths are made absolute from the working directory. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "data_dir=x,cache_dir=sub/cache", NULL),
                     0);
    snprintf(want, sizeof(want), "%s/x", cwd);
    assert_string_equal(o.data_dir, want);
    snprintf(want, sizeof(want), "%s/sub/cache", cwd);
    assert_string_equal(o.cache_dir, want);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "m", "-odata_dir=x", NULL), 0);
    snprintf(want, sizeof(want), "%s/x", cwd);
    assert_string_equal(o.data_dir, want);
    dg_options_free(&o);

    /* An escaped comma is part of the value. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "data_dir=/a\\,b,cache_size=3K", NULL),
                     0);
    assert_string_equal(o.data_dir, "/a,b");
    assert_int_equal(o.cache_size, 3ull << 10);
    dg_options_free(&o);

    /* An escaped backslash. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "data_dir=/a\\\\b", NULL), 0);
    assert_string_equal(o.data_dir, "/a\\b");
    dg_options_free(&o);
}

static void test_fuse_passthrough(void **state)
{
    struct dg_options o;
    char err[256];

    (void)state;
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o",
                           "allow_other,default_permissions,cache_size=1G,ro", "-o",
                           "max_read=65536", NULL),
                     0);
    assert_string_equal(o.fuse_opts, "allow_other,ro,max_read=65536");
    assert_int_equal(o.cache_size, 1ull << 30);
    dg_options_free(&o);

    /* default_permissions alone leaves nothing for libfuse. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-odefault_permissions", NULL), 0);
    assert_string_equal(o.fuse_opts, "");
    dg_options_free(&o);

    /* A libfuse option whose value holds an escaped comma keeps its escaping. */
    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "fsname=a\\,b,allow_other", NULL), 0);
    assert_string_equal(o.fuse_opts, "fsname=a\\,b,allow_other");
    dg_options_free(&o);
}

/* A libfuse option too long to pass on is refused, never passed on cut short. */
static void test_long_fuse_option(void **state)
{
    struct dg_options o;
    char err[256];
    size_t len = 10000;
    char *opt = malloc(len + 1);
    int rc;

    (void)state;
    assert_non_null(opt);
    memcpy(opt, "fsname=", 7);
    memset(opt + 7, 'a', len - 7);
    opt[len] = '\0';
    rc = parse(&o, err, sizeof(err), "m", "-o", opt, NULL);
    if (rc == 0) {
        int same = strcmp(o.fuse_opts, opt) == 0;
        size_t got = strlen(o.fuse_opts);
        dg_options_free(&o);
        free(opt);
        if (!same)
            fail_msg("a %zu-byte option was passed to libfuse as %zu bytes", len, got);
    } else {
        free(opt);
        assert_int_equal(rc, -EINVAL);
        assert_true(err[0] != '\0');
    }
}

static void expect_usage_error(const char *what, int rc, struct dg_options *o, const char *err,
                               const char *needle)
{
    if (rc != -EINVAL)
        fail_msg("%s: rc %d, expected -EINVAL", what, rc);
    if (err[0] == '\0' || err[0] == 'E')
        fail_msg("%s: no message in err", what);
    if (needle && !strstr(err, needle))
        fail_msg("%s: message '%s' does not mention '%s'", what, err, needle);
    /* On failure the options are freed (and zeroed). */
    assert_null(o->mountpoint);
    assert_null(o->data_dir);
    assert_null(o->cache_dir);
    assert_null(o->fuse_opts);
}

static void test_errors(void **state)
{
    struct dg_options o;
    char err[256];
    int rc;

    (void)state;
    rc = parse(&o, err, sizeof(err), "m", "-o", "cache_size=12X", NULL);
    expect_usage_error("bad cache_size", rc, &o, err, "cache_size");
    rc = parse(&o, err, sizeof(err), "m", "-o", "cache_size=", NULL);
    expect_usage_error("empty cache_size", rc, &o, err, "cache_size");
    rc = parse(&o, err, sizeof(err), "m", "-o", "cache_size", NULL);
    expect_usage_error("cache_size without value", rc, &o, err, "cache_size");
    rc = parse(&o, err, sizeof(err), "m", "-o", "read_timeout=-3", NULL);
    expect_usage_error("bad read_timeout", rc, &o, err, "read_timeout");
    rc = parse(&o, err, sizeof(err), "m", "-o", "read_timeout=soon", NULL);
    expect_usage_error("junk read_timeout", rc, &o, err, "read_timeout");
    rc = parse(&o, err, sizeof(err), "m", "-o", "log_level=loud", NULL);
    expect_usage_error("bad log_level", rc, &o, err, "log_level");
    rc = parse(&o, err, sizeof(err), "m", "-o", "log_level=", NULL);
    expect_usage_error("empty log_level", rc, &o, err, "log_level");
    rc = parse(&o, err, sizeof(err), "m", "-o", "data_dir=", NULL);
    expect_usage_error("empty data_dir", rc, &o, err, "data_dir");
    rc = parse(&o, err, sizeof(err), "m", "-o", "data_dir", NULL);
    expect_usage_error("data_dir without value", rc, &o, err, "data_dir");
    /* A good option before the bad one is freed too (ASan checks the leak). */
    rc = parse(&o, err, sizeof(err), "m", "-o", "data_dir=/x,allow_other,cache_size=huge", NULL);
    expect_usage_error("bad after good", rc, &o, err, "cache_size");

    rc = parse(&o, err, sizeof(err), NULL);
    expect_usage_error("no mount point", rc, &o, err, NULL);
    rc = parse(&o, err, sizeof(err), "-f", "-o", "allow_other", NULL);
    expect_usage_error("only options", rc, &o, err, NULL);
    rc = parse(&o, err, sizeof(err), "m1", "m2", NULL);
    expect_usage_error("two mount points", rc, &o, err, "m2");
    rc = parse(&o, err, sizeof(err), "m", "-o", NULL);
    expect_usage_error("-o at the end", rc, &o, err, "-o");
    rc = parse(&o, err, sizeof(err), "m", "-x", NULL);
    expect_usage_error("unknown flag", rc, &o, err, "-x");
    rc = parse(&o, err, sizeof(err), "m", "--frobnicate", NULL);
    expect_usage_error("unknown long flag", rc, &o, err, "--frobnicate");

    /* A tiny error buffer is still NUL-terminated. */
    char tiny[4];
    rc = parse(&o, tiny, sizeof(tiny), "m", "-o", "log_level=loud", NULL);
    assert_int_equal(rc, -EINVAL);
    assert_int_equal(strlen(tiny), sizeof(tiny) - 1);
}

/* The swarm options: port, bootstrap, peers, lookup_timeout, announce_cached, offline. */
static void test_network_options(void **state)
{
    struct dg_options o;
    char err[256];
    int rc;

    (void)state;
    assert_int_equal(parse(&o, err, sizeof(err), "m", NULL), 0);
    assert_int_equal(o.port, 0);
    assert_null(o.bootstrap); /* the public routers */
    assert_null(o.peers);
    assert_int_equal(o.lookup_timeout_ms, DG_DEFAULT_LOOKUP_TIMEOUT_MS);
    assert_int_equal(o.announce_cached, 1);
    assert_int_equal(o.offline, 0);
    assert_int_equal(o.lsd, 1);
    assert_int_equal(o.upnp, 1);
    assert_int_equal(o.natpmp, 1);
    assert_int_equal(o.holepunch, 1);
    assert_int_equal(o.relay, 1);
    assert_int_equal(o.relay_rate, DG_DEFAULT_RELAY_RATE);
    assert_int_equal(o.prefer_utp, 0);
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o",
                           "port=6881,bootstrap=127.0.0.1:7000+[::1]:7001,lookup_timeout=2.5,"
                           "peers=127.0.0.1:1+[::1]:2,announce_cached=no,offline,lsd=no,"
                           "upnp=no,natpmp=0,holepunch=no,relay=0,relay_rate=512K,"
                           "prefer_utp=yes",
                           NULL),
                     0);
    assert_int_equal(o.port, 6881);
    assert_string_equal(o.bootstrap, "127.0.0.1:7000+[::1]:7001");
    assert_string_equal(o.peers, "127.0.0.1:1+[::1]:2");
    assert_int_equal(o.lookup_timeout_ms, 2500);
    assert_int_equal(o.announce_cached, 0);
    assert_int_equal(o.offline, 1);
    assert_int_equal(o.lsd, 0);
    assert_int_equal(o.upnp, 0);
    assert_int_equal(o.natpmp, 0);
    assert_int_equal(o.holepunch, 0);
    assert_int_equal(o.relay, 0);
    assert_int_equal(o.relay_rate, 512u << 10);
    assert_int_equal(o.prefer_utp, 1);
    assert_string_equal(o.fuse_opts, ""); /* none of them reaches libfuse */
    dg_options_free(&o);

    assert_int_equal(parse(&o, err, sizeof(err), "m", "-o", "bootstrap=none", NULL), 0);
    assert_string_equal(o.bootstrap, "none");
    dg_options_free(&o);

    static const char *const bad[][2] = {
        {"port=65536", "port"},
        {"port=-1", "port"},
        {"port=", "port"},
        {"port=12ab", "port"},
        {"bootstrap=host", "bootstrap"},
        {"bootstrap=h:0", "bootstrap"},
        {"bootstrap=", "bootstrap"},
        {"peers=example.org:1", "peers"},
        {"peers=1.2.3.4", "peers"},
        {"peers=1.2.3.4:1+", "peers"},
        {"peers=[::1]:0", "peers"},
        {"lookup_timeout=x", "lookup_timeout"},
        {"announce_cached=maybe", "announce_cached"},
        {"lsd=sometimes", "lsd"},
        {"upnp=", "upnp"},
        {"natpmp=2", "natpmp"},
        {"holepunch=perhaps", "holepunch"},
        {"relay=", "relay"},
        {"relay_rate=0", "relay_rate"},
        {"relay_rate=fast", "relay_rate"},
        {"prefer_utp=1x", "prefer_utp"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        rc = parse(&o, err, sizeof(err), "m", "-o", bad[i][0], NULL);
        expect_usage_error(bad[i][0], rc, &o, err, bad[i][1]);
    }
}

static void test_usage(void **state)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    (void)state;
    assert_non_null(f);
    dg_options_usage(f, "digfs");
    fclose(f);
    assert_non_null(strstr(text, "usage: digfs MOUNTPOINT"));
    assert_non_null(strstr(text, "cache_size"));
    assert_non_null(strstr(text, "read_timeout"));
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_parse_size_max),
        cmocka_unit_test(test_parse_seconds),
        cmocka_unit_test(test_parse_seconds_whitespace),
        cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_xdg_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flags, setup, teardown),
        cmocka_unit_test_setup_teardown(test_o_options, setup, teardown),
        cmocka_unit_test_setup_teardown(test_paths, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fuse_passthrough, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_fuse_option, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_network_options, setup, teardown),
        cmocka_unit_test(test_usage),
    };

    return cmocka_run_group_tests_name("options", tests, NULL, NULL);
}
