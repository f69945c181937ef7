/* libFuzzer target: dg_parse_size(), dg_parse_seconds() and dg_options_parse().
 *
 * The input is cut at NUL bytes into at most 32 arguments (after "digfs"); the first one is
 * also given to the size and duration parsers. Invariants: parsers fail with -EINVAL only and
 * leave their output alone then; a size is the digits times its suffix; a duration is 1 ms to
 * one day; a parsed command line has absolute data and cache directories, a mount point unless
 * help or version was asked, never one of digfs's own options (nor default_permissions) among
 * the options for libfuse, and an error message whenever it fails. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mount/options.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_ARGS 32

static void check_size(const char *s)
{
    uint64_t v = 0x0123456789abcdefull;
    int rc = dg_parse_size(s, &v);

    if (rc != 0) {
        if (rc != -EINVAL || v != 0x0123456789abcdefull)
            abort();
        return;
    }
    /* Accepted: digits, then at most a suffix from [KMGTkmgt], "i" after it, "B"/"b". */
    size_t d = strspn(s, "0123456789");
    if (d == 0)
        abort();
    const char *p = s + d;
    unsigned shift = 0;
    if (*p && strchr("KMGTkmgt", *p)) {
        shift = 10 * (unsigned)(strchr("KMGT", *p & ~0x20) - "KMGT" + 1);
        p++;
    }
    if (p > s + d && *p == 'i')
        p++;
    if (*p == 'B' || *p == 'b')
        p++;
    if (*p != '\0')
        abort();
    /* The value: the digits (leading zeros aside, at most 20 of them) times the suffix. */
    unsigned __int128 want = 0;
    for (size_t i = 0; i < d; i++) {
        want = want * 10 + (unsigned)(s[i] - '0');
        if (want > UINT64_MAX)
            abort(); /* accepted an overflow */
    }
    want <<= shift;
    if (want > UINT64_MAX || (uint64_t)want != v)
        abort();
}

static void check_seconds(const char *s)
{
    uint32_t ms = 0xdeadbeef;
    int rc = dg_parse_seconds(s, &ms);

    if (rc != 0) {
        if (rc != -EINVAL || ms != 0xdeadbeef)
            abort();
        return;
    }
    if (ms < 1 || ms > 86400u * 1000u)
        abort();
}

static int is_own_option(const char *item, size_t len)
{
    static const char *const own[] = {"data_dir",     "cache_dir", "cache_size",
                                      "read_timeout", "log_level", "default_permissions"};
    const char *eq = memchr(item, '=', len);
    size_t klen = eq ? (size_t)(eq - item) : len;

    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
        if (klen == strlen(own[i]) && memcmp(item, own[i], klen) == 0)
            return 1;
    return 0;
}

/* Splits fuse_opts at unescaped commas, unescapes each item and checks it. */
static void check_fuse_opts(const char *opts)
{
    size_t len = strlen(opts);
    char *item = malloc(len + 1);
    size_t n = 0;

    if (!item)
        return;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || opts[i] == ',') {
            if (n == 0 || is_own_option(item, n))
                abort(); /* no empty items, nothing of ours */
            n = 0;
        } else if (opts[i] == '\\') {
            if (i + 1 >= len)
                abort(); /* a dangling escape */
            item[n++] = opts[++i];
        } else {
            item[n++] = opts[i];
        }
    }
    free(item);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size + 1);
    char *argv[MAX_ARGS + 2];
    int argc = 0;
    struct dg_options o;
    char err[256];

    if (!buf)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    check_size(buf);
    check_seconds(buf);

    argv[argc++] = (char *)"digfs";
    for (size_t i = 0; i < size && argc <= MAX_ARGS;) {
        argv[argc++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    argv[argc] = NULL;

    memset(err, 'x', sizeof(err));
    int rc = dg_options_parse(argc, argv, &o, err, sizeof(err));
    if (memchr(err, '\0', sizeof(err)) == NULL)
        abort();
    if (rc == 0) {
        if (!o.data_dir || o.data_dir[0] != '/' || !o.cache_dir || o.cache_dir[0] != '/')
            abort();
        if (!o.fuse_opts || (!o.mountpoint && !o.show_help && !o.show_version))
            abort();
        if (o.debug && !o.foreground)
            abort();
        if (o.log_level < 0 || o.log_level > 3 || o.read_timeout_ms < 1)
            abort();
        if (o.fuse_opts[0])
            check_fuse_opts(o.fuse_opts);
        dg_options_free(&o);
    } else {
        if ((rc != -EINVAL && rc != -ENOMEM) || err[0] == '\0')
            abort();
        if (o.mountpoint || o.data_dir || o.cache_dir || o.fuse_opts)
            abort();
    }
    free(buf);
    return 0;
}
