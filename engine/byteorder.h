/* Big-endian (network order) integers in byte buffers, as every wire format here uses them.
 *
 * Threads: any (pure functions). */
#ifndef DG_BYTEORDER_H
#define DG_BYTEORDER_H

#include <stdint.h>

/* The 16-bit big-endian integer at @p p. */
static inline uint16_t dg_get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* The 32-bit big-endian integer at @p p. */
static inline uint32_t dg_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Writes @p v big-endian at @p p (2 bytes). */
static inline void dg_put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Writes @p v big-endian at @p p (4 bytes). */
static inline void dg_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

#endif
