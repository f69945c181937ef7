#include "mount/options.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/dht_service.h"
#include "engine/log.h"
#include "engine/swarm.h"

int dg_parse_size(const char *s, uint64_t *out)
{
    uint64_t v = 0, mult = 1;
    const char *p = s;

    if (!s || !*s)
        return -EINVAL;
    for (; *p >= '0' && *p <= '9'; p++) {
        uint64_t digit = (uint64_t)(*p - '0');
        if (v > (UINT64_MAX - digit) / 10)
            return -EINVAL;
        v = v * 10 + digit;
    }
    if (p == s)
        return -EINVAL;
    switch (*p) {
    case 'k':
    case 'K':
        mult = 1ull << 10;
        p++;
        break;
    case 'm':
    case 'M':
        mult = 1ull << 20;
        p++;
        break;
    case 'g':
    case 'G':
        mult = 1ull << 30;
        p++;
        break;
    case 't':
    case 'T':
        mult = 1ull << 40;
        p++;
        break;
    default:
        break;
    }
    if (mult > 1 && *p == 'i')
        p++;
    if (*p == 'B' || *p == 'b')
        p++;
    if (*p != '\0' || (v != 0 && v > UINT64_MAX / mult))
        return -EINVAL;
    *out = v * mult;
    return 0;
}

int dg_parse_seconds(const char *s, uint32_t *ms)
{
    char *end;
    double v;

    /* Plain decimal only: strtod alone would also take white space, signs, hex and "inf". */
    if (!s || !*s || strspn(s, "0123456789.") != strlen(s) || strchr(s, '.') != strrchr(s, '.'))
        return -EINVAL;
    errno = 0;
    v = strtod(s, &end);
    if (errno || *end != '\0' || !isfinite(v) || v < 0 || v > 86400)
        return -EINVAL;
    *ms = (uint32_t)(v * 1000.0 + 0.5);
    if (*ms == 0)
        *ms = 1;
    return 0;
}

/* An absolute copy of @p path (relative ones are taken from the working directory). */
static char *absolute(const char *path)
{
    char cwd[PATH_MAX];
    char *out;

    if (path[0] == '/')
        return strdup(path);
    if (!getcwd(cwd, sizeof(cwd)))
        return NULL;
    out = malloc(strlen(cwd) + strlen(path) + 2);
    if (out)
        snprintf(out, strlen(cwd) + strlen(path) + 2, "%s/%s", cwd, path);
    return out;
}

/* XDG base directory: $VAR/digfs, else $HOME/fallback/digfs. */
static char *xdg_dir(const char *var, const char *fallback)
{
    const char *base = getenv(var);
    const char *home = getenv("HOME");
    char *out;
    size_t len;

    if (base && base[0] == '/') {
        len = strlen(base) + sizeof("/digfs");
        if ((out = malloc(len)))
            snprintf(out, len, "%s/digfs", base);
        return out;
    }
    if (!home || home[0] != '/')
        home = "/";
    len = strlen(home) + strlen(fallback) + sizeof("//digfs");
    if ((out = malloc(len)))
        snprintf(out, len, "%s/%s/digfs", home, fallback);
    return out;
}

static int append_fuse_opt(struct dg_options *o, const char *opt, size_t len)
{
    size_t have = o->fuse_opts ? strlen(o->fuse_opts) : 0;
    char *n = realloc(o->fuse_opts, have + len + 2);

    if (!n)
        return -ENOMEM;
    if (have)
        n[have++] = ',';
    memcpy(n + have, opt, len);
    n[have + len] = '\0';
    o->fuse_opts = n;
    return 0;
}

static int set_path(char **slot, const char *value, char *err, size_t errlen, const char *name)
{
    if (!*value) {
        snprintf(err, errlen, "option %s needs a path", name);
        return -EINVAL;
    }
    free(*slot);
    *slot = absolute(value);
    return *slot ? 0 : -ENOMEM;
}

/* Applies one -o option (@p opt, unescaped, NUL-terminated). */
static int apply_opt(struct dg_options *o, char *opt, char *err, size_t errlen)
{
    static const char *const levels[] = {"error", "warn", "info", "debug"};
    char *eq = strchr(opt, '=');
    const char *value = eq ? eq + 1 : NULL;
    size_t klen = eq ? (size_t)(eq - opt) : strlen(opt);

#define IS(name) (klen == sizeof(name) - 1 && memcmp(opt, name, klen) == 0)
    if (IS("data_dir") || IS("cache_dir") || IS("cache_size") || IS("read_timeout") ||
        IS("log_level") || IS("port") || IS("bootstrap") || IS("peers") || IS("lookup_timeout") ||
        IS("announce_cached") || IS("lsd") || IS("upnp") || IS("natpmp") || IS("holepunch") ||
        IS("relay") || IS("relay_rate") || IS("prefer_utp")) {
        if (!value) {
            snprintf(err, errlen, "option %.*s needs a value", (int)klen, opt);
            return -EINVAL;
        }
    }
    if (IS("data_dir"))
        return set_path(&o->data_dir, value, err, errlen, "data_dir");
    if (IS("cache_dir"))
        return set_path(&o->cache_dir, value, err, errlen, "cache_dir");
    if (IS("cache_size")) {
        if (dg_parse_size(value, &o->cache_size) < 0) {
            snprintf(err, errlen, "bad cache_size '%s' (use a number with K, M, G or T)", value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("read_timeout")) {
        if (dg_parse_seconds(value, &o->read_timeout_ms) < 0) {
            snprintf(err, errlen, "bad read_timeout '%s' (seconds, e.g. 30 or 0.5)", value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("lookup_timeout")) {
        if (dg_parse_seconds(value, &o->lookup_timeout_ms) < 0) {
            snprintf(err, errlen, "bad lookup_timeout '%s' (seconds, e.g. 15 or 0.5)", value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("port")) {
        char *end;
        unsigned long v = strtoul(value, &end, 10);
        if (!*value || *end || strspn(value, "0123456789") != strlen(value) || v > 65535) {
            snprintf(err, errlen, "bad port '%s' (0 to 65535; 0 picks one)", value);
            return -EINVAL;
        }
        o->port = (uint16_t)v;
        return 0;
    }
    if (IS("bootstrap")) {
        if (dg_dht_service_parse_bootstrap(value) < 0) {
            snprintf(err, errlen, "bad bootstrap '%s' (HOST:PORT[+HOST:PORT...] or none)", value);
            return -EINVAL;
        }
        free(o->bootstrap);
        return (o->bootstrap = strdup(value)) ? 0 : -ENOMEM;
    }
    if (IS("peers")) {
        struct sockaddr_storage one;
        if (dg_swarms_parse_peers(value, &one, 1) < 0) {
            snprintf(err, errlen, "bad peers '%s' (IP:PORT[+IP:PORT...], IPv6 in brackets)", value);
            return -EINVAL;
        }
        free(o->peers);
        return (o->peers = strdup(value)) ? 0 : -ENOMEM;
    }
    if (IS("announce_cached")) {
        if (strcmp(value, "yes") == 0 || strcmp(value, "1") == 0)
            o->announce_cached = 1;
        else if (strcmp(value, "no") == 0 || strcmp(value, "0") == 0)
            o->announce_cached = 0;
        else {
            snprintf(err, errlen, "bad announce_cached '%s' (yes or no)", value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("relay_rate")) {
        if (dg_parse_size(value, &o->relay_rate) < 0 || o->relay_rate == 0) {
            snprintf(err, errlen, "bad relay_rate '%s' (bytes per second, K/M/G suffixes)", value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("lsd") || IS("upnp") || IS("natpmp") || IS("holepunch") || IS("relay") ||
        IS("prefer_utp")) {
        int *slot = IS("lsd")         ? &o->lsd
                    : IS("upnp")      ? &o->upnp
                    : IS("natpmp")    ? &o->natpmp
                    : IS("holepunch") ? &o->holepunch
                    : IS("relay")     ? &o->relay
                                      : &o->prefer_utp;
        if (strcmp(value, "yes") == 0 || strcmp(value, "1") == 0)
            *slot = 1;
        else if (strcmp(value, "no") == 0 || strcmp(value, "0") == 0)
            *slot = 0;
        else {
            snprintf(err, errlen, "bad %.*s '%s' (yes or no)", (int)klen, opt, value);
            return -EINVAL;
        }
        return 0;
    }
    if (IS("offline")) {
        o->offline = 1;
        return 0;
    }
    if (IS("log_level")) {
        for (int i = 0; i < 4; i++) {
            if (strcmp(value, levels[i]) == 0) {
                o->log_level = i;
                return 0;
            }
        }
        snprintf(err, errlen, "bad log_level '%s' (error, warn, info or debug)", value);
        return -EINVAL;
    }
    if (IS("default_permissions"))
        return 0; /* always on */
#undef IS
    /* Not ours: libfuse's (it rejects what it does not know). Keep the escaping. */
    char *esc = malloc(2 * strlen(opt) + 1);
    size_t n = 0;
    int rc;
    if (!esc)
        return -ENOMEM;
    for (const char *p = opt; *p; p++) {
        if (*p == ',' || *p == '\\')
            esc[n++] = '\\';
        esc[n++] = *p;
    }
    rc = append_fuse_opt(o, esc, n);
    free(esc);
    return rc;
}

/* Splits one -o argument at unescaped commas ("\," is a comma inside a value). */
static int apply_opts(struct dg_options *o, const char *arg, char *err, size_t errlen)
{
    size_t len = strlen(arg);
    char *buf = malloc(len + 1);
    size_t n = 0;
    int rc = 0;

    if (!buf)
        return -ENOMEM;
    for (size_t i = 0; i <= len && rc == 0; i++) {
        if (i == len || arg[i] == ',') {
            buf[n] = '\0';
            if (n > 0)
                rc = apply_opt(o, buf, err, errlen);
            n = 0;
        } else if (arg[i] == '\\' && i + 1 < len) {
            buf[n++] = arg[++i];
        } else {
            buf[n++] = arg[i];
        }
    }
    free(buf);
    return rc;
}

int dg_options_parse(int argc, char **argv, struct dg_options *o, char *err, size_t errlen)
{
    int rc = 0;

    memset(o, 0, sizeof(*o));
    o->cache_size = DG_DEFAULT_CACHE_SIZE;
    o->read_timeout_ms = DG_DEFAULT_READ_TIMEOUT_MS;
    o->lookup_timeout_ms = DG_DEFAULT_LOOKUP_TIMEOUT_MS;
    o->announce_cached = 1;
    o->lsd = 1;
    o->upnp = 1;
    o->natpmp = 1;
    o->holepunch = 1;
    o->relay = 1;
    o->relay_rate = DG_DEFAULT_RELAY_RATE;
    o->log_level = DG_LOG_INFO;
    err[0] = '\0';
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            o->show_help = 1;
        } else if (strcmp(a, "-V") == 0 || strcmp(a, "--version") == 0) {
            o->show_version = 1;
        } else if (strcmp(a, "-f") == 0) {
            o->foreground = 1;
        } else if (strcmp(a, "-d") == 0 || strcmp(a, "-odebug") == 0) {
            o->debug = o->foreground = 1;
            if (o->log_level < DG_LOG_DEBUG)
                o->log_level = DG_LOG_DEBUG;
        } else if (strcmp(a, "-s") == 0) {
            o->single_thread = 1;
        } else if (strcmp(a, "-o") == 0) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "-o needs an argument");
                rc = -EINVAL;
            } else {
                rc = apply_opts(o, argv[++i], err, errlen);
            }
        } else if (strncmp(a, "-o", 2) == 0) {
            rc = apply_opts(o, a + 2, err, errlen);
        } else if (a[0] == '-') {
            snprintf(err, errlen, "unknown option %s", a);
            rc = -EINVAL;
        } else if (!o->mountpoint) {
            if (!a[0]) {
                snprintf(err, errlen, "the mount point is an empty string");
                rc = -EINVAL;
            } else if (!(o->mountpoint = strdup(a))) {
                rc = -ENOMEM;
            }
        } else {
            snprintf(err, errlen, "unexpected argument %s", a);
            rc = -EINVAL;
        }
    }
    if (rc == 0 && !o->mountpoint && !o->show_help && !o->show_version) {
        snprintf(err, errlen, "no mount point given");
        rc = -EINVAL;
    }
    if (rc == 0 && !o->data_dir && !(o->data_dir = xdg_dir("XDG_DATA_HOME", ".local/share")))
        rc = -ENOMEM;
    if (rc == 0 && !o->cache_dir && !(o->cache_dir = xdg_dir("XDG_CACHE_HOME", ".cache")))
        rc = -ENOMEM;
    if (rc == 0 && !o->fuse_opts && !(o->fuse_opts = strdup("")))
        rc = -ENOMEM;
    if (rc == -ENOMEM && !err[0])
        snprintf(err, errlen, "out of memory");
    if (rc < 0)
        dg_options_free(o);
    return rc;
}

void dg_options_free(struct dg_options *o)
{
    free(o->mountpoint);
    free(o->data_dir);
    free(o->cache_dir);
    free(o->fuse_opts);
    free(o->bootstrap);
    free(o->peers);
    memset(o, 0, sizeof(*o));
}

void dg_options_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s MOUNTPOINT [-f] [-d] [-s] [-o opt[,opt...]]\n"
            "       %s hash FILE...\n"
            "       %s status [--json] [MOUNTPOINT]\n"
            "       %s pin|unpin FILE...\n"
            "\n"
            "Mounts the digfs swarm at MOUNTPOINT:\n"
            "  shared/    files put here are hashed and shared\n"
            "  by-hash/   every file by its 64-hex root (read-only)\n"
            "  by-name/   symlinks from names to by-hash/\n"
            "Unmount with: fusermount3 -u MOUNTPOINT\n"
            "\n"
            "options:\n"
            "  -h, --help             print this help\n"
            "  -V, --version          print the version\n"
            "  -f                     stay in the foreground\n"
            "  -d                     debug output (implies -f)\n"
            "  -s                     single-threaded FUSE loop\n"
            "  -o data_dir=PATH       shared files and index (default $XDG_DATA_HOME/digfs,\n"
            "                         i.e. ~/.local/share/digfs)\n"
            "  -o cache_dir=PATH      fetched content (default $XDG_CACHE_HOME/digfs,\n"
            "                         i.e. ~/.cache/digfs)\n"
            "  -o cache_size=SIZE     limit of the cache, K/M/G/T suffixes (default 10G)\n"
            "  -o read_timeout=SECS   a read waiting for data fails with ETIMEDOUT after this\n"
            "                         (default 60)\n"
            "  -o port=N              TCP and UDP port for peers and the DHT (default 0:\n"
            "                         the one used last time, else any free one)\n"
            "  -o bootstrap=LIST      DHT nodes to start from, HOST:PORT[+HOST:PORT...], or\n"
            "                         none (default: the public BitTorrent DHT routers)\n"
            "  -o peers=LIST          peers asked for every root, IP:PORT[+IP:PORT...]\n"
            "  -o lookup_timeout=SECS a lookup of an unknown root fails with ENOENT after\n"
            "                         this (default 15)\n"
            "  -o announce_cached=no  announce only shared files, not complete cached roots\n"
            "  -o lsd=no              no LAN discovery (BEP 14 multicast on the local network)\n"
            "  -o upnp=no             no port mapping on the router with UPnP IGD\n"
            "  -o natpmp=no           no port mapping on the router with NAT-PMP\n"
            "  -o holepunch=no        no NAT traversal by hole punching (nor relays)\n"
            "  -o relay=no            do not relay streams for peers that cannot reach\n"
            "                         each other\n"
            "  -o relay_rate=RATE     bytes per second per relayed stream (default 4M)\n"
            "  -o prefer_utp=yes      connect to peers over uTP (UDP) instead of TCP\n"
            "  -o offline             no network: serve what this machine holds\n"
            "  -o log_level=LEVEL     error, warn, info (default) or debug\n"
            "  -o FUSE_OPTION         any libfuse mount option, e.g. allow_other\n"
            "                         (default_permissions is always on)\n",
            prog, prog, prog, prog);
}
