/* libFuzzer target: dg_file_record_decode() on untrusted `files` values.
 *
 * Invariants when a value decodes: the path is NUL-terminated, as long as the length field
 * says, and passes dg_relpath_check(); the state is a known one; encoding the record gives back
 * exactly the input bytes (the format has no reserved bytes), and those decode to the same
 * record. The caller's inode is never touched. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/piece_cache.h"
#include "engine/record.h"
#include "engine/root_name.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct dg_shared_file rec, again;
static uint8_t out[DG_FILE_RECORD_MAX + 64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1);
    int rc;

    if (!copy)
        return 0;
    memcpy(copy, data, size);
    memset(&rec, 0xa5, sizeof(rec));
    rec.ino = 0x1122334455667788ull;
    rc = dg_file_record_decode(copy, size, &rec);
    free(copy);
    if (rec.ino != 0x1122334455667788ull)
        abort();
    if (rc != 0) {
        if (rc != -EBADMSG)
            abort();
        return 0;
    }
    size_t path_len = strnlen(rec.path, sizeof(rec.path));
    if (path_len == sizeof(rec.path) || size != DG_FILE_RECORD_HEADER + path_len)
        abort();
    if (dg_relpath_check(rec.path, path_len) != 0)
        abort();
    if (rec.state < DG_SHARED_HASHING || rec.state > DG_SHARED_FAILED)
        abort();

    size_t n = dg_file_record_encode(&rec, out, sizeof(out));
    if (n != size || memcmp(out, data, size) != 0)
        abort();
    /* The encoder respects the buffer size it is given. */
    if (dg_file_record_encode(&rec, out, size - 1) != 0)
        abort();
    memset(&again, 0, sizeof(again));
    if (dg_file_record_decode(out, n, &again) != 0)
        abort();
    if (again.state != rec.state || again.error != rec.error || again.dev != rec.dev ||
        again.size != rec.size || again.mtime_ns != rec.mtime_ns ||
        again.ctime_ns != rec.ctime_ns || memcmp(again.root, rec.root, 32) != 0 ||
        strcmp(again.path, rec.path) != 0)
        abort();
    return 0;
}
