#include "mount/status_cmd.h"

#include "mount/control_client.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BAR_WIDTH 24

static void usage(FILE *f)
{
    fprintf(f, "usage: digfs status [--json] [MOUNTPOINT]\n"
               "Shows what the digfs mounted at MOUNTPOINT is doing (default: the only digfs\n"
               "mount). --json prints the machine-readable form.\n");
}

static double num(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static const char *str(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

    return cJSON_IsString(v) && v->valuestring ? v->valuestring : "?";
}

static void human_size(double bytes, char *out, size_t size)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    unsigned u = 0;

    while (bytes >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
        bytes /= 1024;
        u++;
    }
    snprintf(out, size, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
}

static void bar(double part, double whole, char out[BAR_WIDTH + 16])
{
    double frac = whole > 0 ? part / whole : 0;
    int fill;

    if (frac > 1)
        frac = 1;
    fill = (int)(frac * BAR_WIDTH + 0.5);
    out[0] = '[';
    for (int i = 0; i < BAR_WIDTH; i++)
        out[1 + i] = i < fill ? '#' : '-';
    snprintf(out + 1 + BAR_WIDTH, 16, "] %3.0f%%", frac * 100);
}

static void render(const cJSON *s, const char *mnt)
{
    const cJSON *shared = cJSON_GetObjectItemCaseSensitive(s, "shared");
    const cJSON *cache = cJSON_GetObjectItemCaseSensitive(s, "cache");
    const cJSON *open = cJSON_GetObjectItemCaseSensitive(s, "open");
    const cJSON *item;
    char a[32], b[32], gauge[BAR_WIDTH + 16];
    long long up = (long long)num(s, "uptime_s");

    printf("digfs %s at %s, up %lldh %02lldm\n", str(s, "version"), mnt, up / 3600, up % 3600 / 60);
    printf("  data     %s\n", str(s, "data_dir"));
    printf("  shared   %.0f files (%.0f hashed, %.0f failed), %.0f to hash\n", num(shared, "files"),
           num(shared, "hashed"), num(shared, "failed"), num(shared, "hash_queue"));
    printf("  by-hash  %.0f roots held\n",
           num(cJSON_GetObjectItemCaseSensitive(s, "roots"), "held"));
    human_size(num(cache, "bytes"), a, sizeof(a));
    if (num(cache, "limit") > 0) {
        human_size(num(cache, "limit"), b, sizeof(b));
        bar(num(cache, "bytes"), num(cache, "limit"), gauge);
        printf("  cache    %s of %s  %s\n", a, b, gauge);
    } else {
        printf("  cache    %s (no limit)\n", a);
    }
    printf("  reads    %.0f waiting for data\n",
           num(cJSON_GetObjectItemCaseSensitive(s, "reads"), "waiting"));
    cJSON_ArrayForEach(item, open)
    {
        human_size(num(item, "length"), a, sizeof(a));
        bar(num(item, "blocks_held"), num(item, "blocks_total"), gauge);
        printf("  open     %.12s…  %10s  %s  %.0f reader(s)\n", str(item, "root"), a, gauge,
               num(item, "readers"));
    }
    const cJSON *net = cJSON_GetObjectItemCaseSensitive(s, "network");
    if (!cJSON_IsObject(net)) {
        printf("  network  off\n");
        return;
    }
    const cJSON *dht = cJSON_GetObjectItemCaseSensitive(net, "dht");
    const cJSON *pub = cJSON_GetObjectItemCaseSensitive(net, "public_address");
    printf("  network  port %.0f, public address %s\n", num(net, "port"),
           cJSON_IsString(pub) ? pub->valuestring : "not learned yet");
    printf("  dht      %.0f nodes (%.0f good), %.0f lookups running, %.0f peers stored\n",
           num(dht, "nodes"), num(dht, "good"), num(dht, "searches"), num(dht, "stored_peers"));
    human_size(num(net, "bytes_in"), a, sizeof(a));
    human_size(num(net, "bytes_out"), b, sizeof(b));
    printf("  peers    %.0f connected, %s in, %s out, %.0f banned\n", num(net, "peers"), a, b,
           num(net, "banned"));
    const cJSON *pm = cJSON_GetObjectItemCaseSensitive(net, "portmap");
    if (!cJSON_IsObject(pm))
        printf("  router   port mapping off\n");
    else if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pm, "mapped")))
        printf("  router   %s: mapped to %s:%.0f (TCP), %.0f (UDP)\n", str(pm, "method"),
               str(pm, "external_ip"), num(pm, "tcp"), num(pm, "udp"));
    else
        printf("  router   no mapping (%s)\n", str(pm, "error"));
    const cJSON *nat = cJSON_GetObjectItemCaseSensitive(net, "nat");
    if (cJSON_IsObject(nat)) {
        const cJSON *hp = cJSON_GetObjectItemCaseSensitive(nat, "holepunch");
        const cJSON *relay = cJSON_GetObjectItemCaseSensitive(nat, "relay");
        const cJSON *seen = cJSON_GetObjectItemCaseSensitive(nat, "peers_see");
        printf("  nat      %s (%s; %.0f observers); peers see us at %s\n", str(nat, "class"),
               str(nat, "reason"), num(nat, "observers"),
               cJSON_IsString(seen) ? seen->valuestring : "-");
        printf("  punch    %.0f asked, %.0f punched, %.0f relayed, %.0f failed; "
               "%.0f forwarded for others\n",
               num(hp, "asked"), num(hp, "punched"), num(hp, "relayed"), num(hp, "failed"),
               num(hp, "forwarded"));
        if (cJSON_IsObject(relay))
            printf("  relay    port %.0f, %.0f streams now, %.0f in all\n", num(relay, "port"),
                   num(relay, "streams"), num(relay, "streams_total"));
        else
            printf("  relay    off\n");
    }
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(s, "swarms"))
    {
        if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "known"))) {
            printf("  swarm    %.12s…  looking up, %.0f peer(s)\n", str(item, "root"),
                   num(item, "peers"));
            continue;
        }
        human_size(num(item, "length"), a, sizeof(a));
        bar(num(item, "blocks_held"), num(item, "blocks_total"), gauge);
        const cJSON *by = cJSON_GetObjectItemCaseSensitive(item, "peers_by");
        printf("  swarm    %.12s…  %10s  %s  %.0f peer(s) (tcp %.0f, utp %.0f of which "
               "punched %.0f, relayed %.0f)\n",
               str(item, "root"), a, gauge, num(item, "peers"), num(by, "tcp"), num(by, "utp"),
               num(by, "punched"), num(by, "relayed"));
    }
}

int dg_status_cmd_main(int argc, char **argv)
{
    const char *mnt = NULL;
    char found[4096], sock[4096], *reply = NULL;
    int json = 0, rc;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' || mnt) {
            usage(stderr);
            return 2;
        } else {
            mnt = argv[i];
        }
    }
    if (!mnt) {
        rc = dg_control_find_mount(found, sizeof(found));
        if (rc < 0) {
            fprintf(stderr, "digfs status: %s; name the mount point\n",
                    rc == -EEXIST ? "there are several digfs mounts" : "no digfs mount found");
            return 1;
        }
        mnt = found;
    }
    if ((rc = dg_control_socket_of(mnt, sock, sizeof(sock))) < 0) {
        fprintf(stderr, "digfs status: %s: %s\n", mnt,
                rc == -ENODATA ? "not a digfs mount (or no control socket)" : strerror(-rc));
        return 1;
    }
    if ((rc = dg_control_ask(sock, "status", &reply)) < 0) {
        fprintf(stderr, "digfs status: %s: %s\n", sock, strerror(-rc));
        return 1;
    }
    if (json) {
        fputs(reply, stdout);
        free(reply);
        return 0;
    }
    cJSON *s = cJSON_Parse(reply);
    free(reply);
    if (!cJSON_IsObject(s)) {
        cJSON_Delete(s);
        fprintf(stderr, "digfs status: the daemon's answer is not a status\n");
        return 1;
    }
    render(s, mnt);
    cJSON_Delete(s);
    return 0;
}
