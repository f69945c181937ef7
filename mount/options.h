/* Command line of `digfs MOUNTPOINT [-f] [-d] [-s] [-o opt[,opt...]]`.
 *
 * digfs's own -o options are taken out; every other -o option is kept for libfuse, which
 * rejects the ones it does not know. Parsing never touches the filesystem except to make
 * relative paths absolute (the daemon changes directory to /).
 *
 * Thread safety: not reentrant (reads the environment). */
#ifndef DG_OPTIONS_H
#define DG_OPTIONS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define DG_DEFAULT_CACHE_SIZE (10ull << 30)
#define DG_DEFAULT_READ_TIMEOUT_MS 60000u
#define DG_DEFAULT_LOOKUP_TIMEOUT_MS 15000u
#define DG_DEFAULT_RELAY_RATE (4ull << 20) /* bytes/s per relayed stream and direction */

struct dg_options {
    char *mountpoint;    /* as given (made absolute later, after stale-mount recovery) */
    char *data_dir;      /* absolute */
    char *cache_dir;     /* absolute */
    uint64_t cache_size; /* bytes */
    uint32_t read_timeout_ms;
    uint32_t lookup_timeout_ms;
    int offline;         /* no network at all */
    uint16_t port;       /* 0: the one used last time, else any */
    char *bootstrap;     /* NULL: the public routers */
    char *peers;         /* NULL: none */
    int announce_cached; /* announce roots held completely in the cache (default 1) */
    int lsd;             /* LAN discovery (default 1) */
    int upnp;            /* UPnP IGD port mapping (default 1) */
    int natpmp;          /* NAT-PMP port mapping (default 1) */
    int holepunch;       /* NAT traversal by hole punching, through rendezvous (default 1) */
    int relay;           /* relay streams for peers that cannot reach each other (default 1) */
    int prefer_utp;      /* direct connections over uTP instead of TCP (default 0) */
    uint64_t relay_rate; /* bytes per second per relayed stream and direction */
    int log_level;       /* enum dg_log_level */
    int foreground;
    int debug;         /* -d: libfuse debug output, implies foreground */
    int single_thread; /* -s */
    int show_help;
    int show_version;
    char *fuse_opts; /* comma-separated options for libfuse, never NULL after parse */
};

/* Parses a size: digits with an optional K, M, G or T suffix (powers of 1024; an optional
 * trailing "B" or "iB" is accepted). @return 0, or -EINVAL (empty, junk, overflow). */
int dg_parse_size(const char *s, uint64_t *out);

/* Parses a duration in seconds ("30", "0.5") into milliseconds, at least 1 ms.
 * @return 0, or -EINVAL (empty, junk, negative, over a day). */
int dg_parse_seconds(const char *s, uint32_t *ms);

/* Parses @p argc/@p argv (argv[0] is the program) into @p o.
 * @param[out] err  a message for the user on failure.
 * @return 0, -EINVAL (bad usage; @p err says why), -ENOMEM. On failure @p o is freed. */
int dg_options_parse(int argc, char **argv, struct dg_options *o, char *err, size_t errlen);

/* Frees what dg_options_parse() allocated. */
void dg_options_free(struct dg_options *o);

/* Prints digfs's usage and options to @p f. */
void dg_options_usage(FILE *f, const char *prog);

#endif
