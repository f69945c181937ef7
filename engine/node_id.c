#include "engine/node_id.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>

int dg_node_id_closer(const uint8_t target[DG_NODE_ID_LEN], const uint8_t a[DG_NODE_ID_LEN],
                      const uint8_t b[DG_NODE_ID_LEN])
{
    for (size_t i = 0; i < DG_NODE_ID_LEN; i++) {
        uint8_t da = a[i] ^ target[i];
        uint8_t db = b[i] ^ target[i];
        if (da != db)
            return da < db ? -1 : 1;
    }
    return 0;
}

void dg_node_id_xor(const uint8_t a[DG_NODE_ID_LEN], const uint8_t b[DG_NODE_ID_LEN],
                    uint8_t out[DG_NODE_ID_LEN])
{
    for (size_t i = 0; i < DG_NODE_ID_LEN; i++)
        out[i] = a[i] ^ b[i];
}

unsigned dg_node_id_common_prefix(const uint8_t a[DG_NODE_ID_LEN], const uint8_t b[DG_NODE_ID_LEN])
{
    for (unsigned i = 0; i < DG_NODE_ID_LEN; i++) {
        unsigned x = a[i] ^ b[i];
        if (x) {
            unsigned n = 0;
            while (!(x & 0x80)) {
                x <<= 1;
                n++;
            }
            return i * 8 + n;
        }
    }
    return DG_NODE_ID_BITS;
}

int dg_node_id_bit(const uint8_t id[DG_NODE_ID_LEN], unsigned i)
{
    return (id[i / 8] >> (7 - i % 8)) & 1;
}

void dg_node_id_random_prefixed(const uint8_t prefix[DG_NODE_ID_LEN], unsigned prefix_bits,
                                dg_rand_bytes_fn rand_bytes, void *rand_arg,
                                uint8_t out[DG_NODE_ID_LEN])
{
    uint8_t r[DG_NODE_ID_LEN];

    if (prefix_bits > DG_NODE_ID_BITS)
        prefix_bits = DG_NODE_ID_BITS;
    rand_bytes(rand_arg, r, sizeof(r));
    for (unsigned i = 0; i < DG_NODE_ID_LEN; i++) {
        unsigned keep; /* how many leading bits of this byte come from the prefix */
        if (prefix_bits >= (i + 1) * 8)
            keep = 8;
        else if (prefix_bits <= i * 8)
            keep = 0;
        else
            keep = prefix_bits - i * 8;
        uint8_t mask = (uint8_t)(0xff00u >> keep);
        out[i] = (uint8_t)((prefix[i] & mask) | (r[i] & ~mask));
    }
}

/* CRC32C a nibble at a time: entry n is the CRC register after shifting nibble n through the
 * reflected Castagnoli polynomial. 16 entries keep the table small; BEP 42 hashes 4 or 8
 * bytes, so speed is no concern. */
static const uint32_t crc32c_nibble[16] = {
    0x00000000, 0x105ec76f, 0x20bd8ede, 0x30e349b1, 0x417b1dbc, 0x5125dad3, 0x61c69362, 0x7198540d,
    0x82f63b78, 0x92a8fc17, 0xa24bb5a6, 0xb21572c9, 0xc38d26c4, 0xd3d3e1ab, 0xe330a81a, 0xf36e6f75,
};

uint32_t dg_node_id_crc32c(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    crc = ~crc;
    for (size_t i = 0; i < len; i++) {
        crc ^= p[i];
        crc = (crc >> 4) ^ crc32c_nibble[crc & 15];
        crc = (crc >> 4) ^ crc32c_nibble[crc & 15];
    }
    return ~crc;
}

/* The address bytes BEP 42 looks at. @return 4 (IPv4, also IPv4-mapped IPv6), 16 (IPv6) or
 * 0 (another family). */
static size_t addr_bytes(const struct sockaddr *addr, uint8_t out[16])
{
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
        memcpy(out, &sin->sin_addr, 4);
        return 4;
    }
    if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(sin6->sin6_addr.s6_addr, mapped, sizeof(mapped)) == 0) {
            memcpy(out, sin6->sin6_addr.s6_addr + 12, 4);
            return 4;
        }
        memcpy(out, sin6->sin6_addr.s6_addr, 16);
        return 16;
    }
    return 0;
}

static int ip_is_local(const uint8_t *ip, size_t len)
{
    if (len == 4) {
        return ip[0] == 10 || (ip[0] == 172 && (ip[1] & 0xf0) == 16) ||
               (ip[0] == 192 && ip[1] == 168) || (ip[0] == 169 && ip[1] == 254) || ip[0] == 127;
    }
    if (len == 16) {
        static const uint8_t loopback[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        return memcmp(ip, loopback, 16) == 0 || (ip[0] == 0xfe && (ip[1] & 0xc0) == 0x80) ||
               (ip[0] & 0xfe) == 0xfc;
    }
    return 0;
}

int dg_node_id_addr_is_local(const struct sockaddr *addr)
{
    uint8_t ip[16];
    size_t len = addr_bytes(addr, ip);

    return ip_is_local(ip, len);
}

/* The CRC32C of the masked address with r in its top 3 bits (BEP 42). @p len is 4 or 16. */
static uint32_t bep42_crc(const uint8_t *ip, size_t len, unsigned r)
{
    static const uint8_t v4_mask[4] = {0x03, 0x0f, 0x3f, 0xff};
    static const uint8_t v6_mask[8] = {0x01, 0x03, 0x07, 0x0f, 0x1f, 0x3f, 0x7f, 0xff};
    const uint8_t *mask = len == 4 ? v4_mask : v6_mask;
    size_t n = len == 4 ? 4 : 8;
    uint8_t buf[8];

    for (size_t i = 0; i < n; i++)
        buf[i] = ip[i] & mask[i];
    buf[0] |= (uint8_t)((r & 7) << 5);
    return dg_node_id_crc32c(0, buf, n);
}

int dg_node_id_make(const struct sockaddr *addr, uint8_t rand_byte, dg_rand_bytes_fn rand_bytes,
                    void *rand_arg, uint8_t out[DG_NODE_ID_LEN])
{
    uint8_t ip[16];
    uint8_t id[DG_NODE_ID_LEN];
    size_t len = addr_bytes(addr, ip);

    if (len == 0)
        return -EAFNOSUPPORT;
    memset(id, 0, sizeof(id));
    if (rand_bytes)
        rand_bytes(rand_arg, id, sizeof(id));
    uint32_t crc = bep42_crc(ip, len, rand_byte & 7);
    id[0] = (uint8_t)(crc >> 24);
    id[1] = (uint8_t)(crc >> 16);
    id[2] = (uint8_t)(((crc >> 8) & 0xf8) | (id[2] & 0x07));
    id[19] = rand_byte;
    memcpy(out, id, sizeof(id));
    return 0;
}

int dg_node_id_valid_for(const uint8_t id[DG_NODE_ID_LEN], const struct sockaddr *addr)
{
    uint8_t ip[16];
    size_t len = addr_bytes(addr, ip);

    if (len == 0)
        return 0;
    if (ip_is_local(ip, len))
        return 1;
    uint32_t crc = bep42_crc(ip, len, id[19] & 7);
    return id[0] == (uint8_t)(crc >> 24) && id[1] == (uint8_t)(crc >> 16) &&
           (id[2] & 0xf8) == ((crc >> 8) & 0xf8);
}
