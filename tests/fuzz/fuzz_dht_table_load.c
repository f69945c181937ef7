/* libFuzzer target: dg_dht_table_load() and dg_dht_table_load_id() on arbitrary bytes (the
 * saved routing table is read back from the data dir, which may be damaged).
 *
 * Each input is loaded as it is into an IPv4 and an IPv6 table, then, with its last 4 bytes
 * replaced by the right CRC32C (so that the fuzzer reaches the entries instead of stopping at
 * the checksum), once with the default rules and once with BEP 42 and the one-entry-per-IP
 * rule relaxed. Checked every time: the result is -EBADMSG, -EINVAL (other family) or a node
 * count that the table agrees with; dg_dht_table_load_id() accepts exactly what load accepts;
 * the table keeps its invariants (at most K nodes per bucket, ids unique); and a save of the
 * loaded table loads back into a fresh table to the same nodes and saves to the same bytes. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dht_table.h"
#include "engine/node_id.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fixed_rand(void *arg, void *buf, size_t len)
{
    uint64_t *s = arg;
    uint8_t *p = buf;

    for (size_t i = 0; i < len; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (uint8_t)(*s >> 56);
    }
}

static const uint8_t own_id[DG_NODE_ID_LEN] = {0x5f, 0xbf, 0xbf, 0x10, 0x20, 0x30, 0x40,
                                               0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0,
                                               0xc0, 0xd0, 0xe0, 0xf0, 0x00, 0x01};

static struct dg_dht_table *make_table(int family, unsigned flags, uint64_t *seed)
{
    struct dg_dht_table_config cfg;
    struct dg_dht_table *t = NULL;

    memset(&cfg, 0, sizeof(cfg));
    cfg.family = family;
    memcpy(cfg.id, own_id, sizeof(own_id));
    cfg.flags = flags;
    cfg.rand_bytes = fixed_rand;
    cfg.rand_arg = seed;
    if (dg_dht_table_new(&cfg, 1000, &t) != 0)
        abort();
    return t;
}

static void check_table(const struct dg_dht_table *t)
{
    size_t n = dg_dht_table_count(t);
    struct dg_dht_node a, b;
    struct dg_dht_table_stats st;

    if (n > DG_DHT_MAX_NODES)
        abort();
    dg_dht_table_stats(t, 1000, &st);
    if (st.nodes != n || st.buckets < 1 || st.buckets > DG_DHT_MAX_BUCKETS || st.bad != 0)
        abort();
    unsigned last_bucket = 0, in_bucket = 0;
    for (size_t i = 0; i < n; i++) {
        if (dg_dht_table_node_at(t, i, &a) != 0)
            abort();
        if (a.addr.ss_family != dg_dht_table_family(t) ||
            !dg_dht_addr_usable((const struct sockaddr *)&a.addr))
            abort();
        if (memcmp(a.id, own_id, DG_NODE_ID_LEN) == 0)
            abort();
        unsigned cpl = dg_node_id_common_prefix(own_id, a.id);
        unsigned bucket = cpl < st.buckets - 1 ? cpl : (unsigned)st.buckets - 1;
        if (bucket < last_bucket)
            abort();
        in_bucket = bucket == last_bucket ? in_bucket + 1 : 1;
        last_bucket = bucket;
        if (in_bucket > DG_DHT_K)
            abort();
        if (dg_dht_table_find(t, a.id, &b) != 0 || memcmp(&a, &b, sizeof(a)) != 0)
            abort();
    }
    if (dg_dht_table_node_at(t, n, &a) != -ENOENT)
        abort();
}

static void one_load(const uint8_t *buf, size_t len, int family, unsigned flags)
{
    static uint8_t save1[DG_DHT_SAVE_MAX], save2[DG_DHT_SAVE_MAX];
    uint64_t seed = 1;
    struct dg_dht_table *t = make_table(family, flags, &seed);
    uint8_t id[DG_NODE_ID_LEN];
    int fam = 0;

    int rc = dg_dht_table_load(t, buf, len, 1000);
    int rc_id = dg_dht_table_load_id(buf, len, &fam, id);
    if (rc == -EBADMSG) {
        if (rc_id != -EBADMSG || dg_dht_table_count(t) != 0)
            abort();
    } else if (rc == -EINVAL) {
        if (rc_id != 0 || fam == family || dg_dht_table_count(t) != 0)
            abort();
    } else if (rc >= 0) {
        if (rc_id != 0 || fam != family || (size_t)rc != dg_dht_table_count(t))
            abort();
    } else {
        abort();
    }
    check_table(t);

    if (rc > 0) {
        int l1 = dg_dht_table_save(t, save1, sizeof(save1));
        if (l1 < DG_DHT_SAVE_HEADER + 4)
            abort();
        uint64_t seed2 = 1;
        struct dg_dht_table *t2 = make_table(family, flags, &seed2);
        if (dg_dht_table_load(t2, save1, (size_t)l1, 1000) != rc)
            abort();
        int l2 = dg_dht_table_save(t2, save2, sizeof(save2));
        if (l2 != l1 || memcmp(save1, save2, (size_t)l1) != 0)
            abort();
        dg_dht_table_free(t2);
    }
    dg_dht_table_free(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    uint8_t *buf = malloc(size ? size : 1);

    if (!buf)
        return 0;
    memcpy(buf, data, size);
    one_load(buf, size, AF_INET, 0);
    one_load(buf, size, AF_INET6, 0);

    if (size >= 4) {
        uint32_t crc = dg_node_id_crc32c(0, buf, size - 4);
        buf[size - 4] = (uint8_t)(crc >> 24);
        buf[size - 3] = (uint8_t)(crc >> 16);
        buf[size - 2] = (uint8_t)(crc >> 8);
        buf[size - 1] = (uint8_t)crc;
        for (int relaxed = 0; relaxed < 2; relaxed++) {
            unsigned flags = relaxed ? DG_DHT_TABLE_NO_BEP42 | DG_DHT_TABLE_SAME_IP : 0;
            one_load(buf, size, AF_INET, flags);
            one_load(buf, size, AF_INET6, flags);
        }
    }
    free(buf);
    return 0;
}
