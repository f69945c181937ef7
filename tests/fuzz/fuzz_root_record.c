/* libFuzzer target: dg_root_record_decode() on untrusted `roots` values.
 *
 * Invariants when a value decodes: the record is self-consistent (piece size of its length,
 * no more blocks cached than it has), and encoding it gives bytes that decode to the same
 * record and equal the input in every field the format defines (bytes 1-3 are reserved and
 * written as zero). */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/merkle.h"
#include "engine/record.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void same_record(const struct dg_root_record *a, const struct dg_root_record *b)
{
    if (a->flags != b->flags || a->length != b->length || a->piece_size != b->piece_size ||
        a->blocks_cached != b->blocks_cached || a->last_access != b->last_access)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct dg_root_record rec, again;
    uint8_t buf[DG_ROOT_RECORD_SIZE];

    /* A copy of exactly `size` bytes, so ASan sees any read past the value. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    int rc = dg_root_record_decode(copy, size, &rec);
    free(copy);
    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        return 0;
    }
    if (size != DG_ROOT_RECORD_SIZE)
        abort();
    if (rec.piece_size != dg_merkle_piece_size(rec.length) ||
        rec.blocks_cached > dg_merkle_block_count(rec.length))
        abort();

    dg_root_record_encode(&rec, buf);
    if (dg_root_record_decode(buf, sizeof(buf), &again) != 0)
        abort();
    same_record(&rec, &again);
    if (buf[0] != data[0] || memcmp(buf + 4, data + 4, DG_ROOT_RECORD_SIZE - 4) != 0)
        abort();
    if (buf[1] || buf[2] || buf[3])
        abort();
    return 0;
}
