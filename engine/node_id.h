/* 160-bit DHT node ids: the XOR metric of Kademlia (BEP 5) and the binding of an id to the
 * node's external IP address (BEP 42, "DHT security extension").
 *
 * BEP 42 in brief: for an IPv4 address, the 4 bytes of (ip & 03.0f.3f.ff) with r = 0..7 in the
 * top 3 bits of the first byte are hashed with CRC32C; for IPv6 the same is done with the high
 * 8 bytes of the address and the mask 01.03.07.0f.1f.3f.7f.ff. The first 21 bits of a valid
 * id equal the first 21 bits of that CRC, and the low 3 bits of the id's last byte are r.
 *
 * Addresses exempt from the check (dg_node_id_addr_is_local()): the blocks BEP 42 lists,
 * 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16 and 127.0.0.0/8; BEP 42 names no
 * IPv6 blocks, so digfs exempts the IPv6 equivalents: ::1 (loopback), fe80::/10 (link-local)
 * and fc00::/7 (unique local). An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is treated as the
 * IPv4 address it carries, for the check and for the exemption.
 *
 * Randomness is always supplied by the caller (dg_rand_bytes_fn), so tests are deterministic.
 *
 * Thread safety: every function here is reentrant (no state); any thread may call them. */
#ifndef DG_NODE_ID_H
#define DG_NODE_ID_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define DG_NODE_ID_LEN 20
#define DG_NODE_ID_BITS 160

/* Caller-supplied randomness: fills @p buf with @p len random bytes. @p arg is the caller's.
 * Production code passes a CSPRNG (e.g. OpenSSL RAND_bytes); tests pass a seeded PRNG. */
typedef void (*dg_rand_bytes_fn)(void *arg, void *buf, size_t len);

/* Compares the XOR distances of @p a and @p b to @p target.
 * @return negative if @p a is closer to @p target than @p b, 0 if they are equally far (that
 *         is, a == b), positive if @p b is closer. */
int dg_node_id_closer(const uint8_t target[DG_NODE_ID_LEN], const uint8_t a[DG_NODE_ID_LEN],
                      const uint8_t b[DG_NODE_ID_LEN]);

/* Writes a XOR b into @p out (which may alias either input). */
void dg_node_id_xor(const uint8_t a[DG_NODE_ID_LEN], const uint8_t b[DG_NODE_ID_LEN],
                    uint8_t out[DG_NODE_ID_LEN]);

/* @return the number of leading bits @p a and @p b share, 0..160 (160: equal ids). */
unsigned dg_node_id_common_prefix(const uint8_t a[DG_NODE_ID_LEN], const uint8_t b[DG_NODE_ID_LEN]);

/* @return bit @p i (0 = most significant bit of byte 0) of @p id, 0 or 1; @p i < 160. */
int dg_node_id_bit(const uint8_t id[DG_NODE_ID_LEN], unsigned i);

/* Makes a random id whose first @p prefix_bits bits are those of @p prefix, the rest random:
 * a random id inside the range of a routing-table bucket.
 * @param[in]  prefix       the fixed leading bits (bits after @p prefix_bits are ignored).
 * @param[in]  prefix_bits  0..160.
 * @param[in]  rand_bytes   randomness; called once with @p rand_arg.
 * @param[out] out          20 bytes; may alias @p prefix. */
void dg_node_id_random_prefixed(const uint8_t prefix[DG_NODE_ID_LEN], unsigned prefix_bits,
                                dg_rand_bytes_fn rand_bytes, void *rand_arg,
                                uint8_t out[DG_NODE_ID_LEN]);

/* CRC32C (Castagnoli, reflected polynomial 0x82f63b78), as used by BEP 42 and iSCSI.
 * Start with @p crc = 0; feed successive pieces by passing the previous result.
 * CRC32C("123456789") = 0xe3069283. */
uint32_t dg_node_id_crc32c(uint32_t crc, const void *buf, size_t len);

/* @return 1 if @p addr (AF_INET, or AF_INET6 including IPv4-mapped) is in one of the ranges
 *         exempt from BEP 42 listed at the top of this file, else 0 (also for other families). */
int dg_node_id_addr_is_local(const struct sockaddr *addr);

/* Makes a BEP 42 node id for our external address @p addr.
 * @param[in]  addr        AF_INET or AF_INET6 (IPv4-mapped is treated as IPv4); port ignored.
 * @param[in]  rand_byte   becomes the id's last byte; its low 3 bits are BEP 42's r.
 * @param[in]  rand_bytes  randomness for the free bits 21..151; may be NULL, which leaves
 *                         those bits zero (only useful for tests).
 * @param[out] out         20 bytes, written only on success.
 * @return 0, or -EAFNOSUPPORT for another address family. */
int dg_node_id_make(const struct sockaddr *addr, uint8_t rand_byte, dg_rand_bytes_fn rand_bytes,
                    void *rand_arg, uint8_t out[DG_NODE_ID_LEN]);

/* Checks @p id against BEP 42 for a node seen at @p addr. Exempt (local) addresses are valid
 * for any id. The port is ignored.
 * @return 1 if valid, 0 if not (also for an address family other than AF_INET/AF_INET6). */
int dg_node_id_valid_for(const uint8_t id[DG_NODE_ID_LEN], const struct sockaddr *addr);

#endif
