#include "engine/record.h"

#include <errno.h>
#include <string.h>

#include "engine/merkle.h"
#include "engine/piece_cache.h"
#include "engine/root_name.h"

#define RECORD_VERSION 1

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

void dg_root_record_encode(const struct dg_root_record *rec, uint8_t out[DG_ROOT_RECORD_SIZE])
{
    memset(out, 0, DG_ROOT_RECORD_SIZE);
    out[0] = RECORD_VERSION;
    put_le32(out + 4, rec->flags);
    put_le64(out + 8, rec->length);
    put_le64(out + 16, rec->piece_size);
    put_le64(out + 24, rec->blocks_cached);
    put_le64(out + 32, (uint64_t)rec->last_access);
}

int dg_root_record_decode(const uint8_t *buf, size_t len, struct dg_root_record *out)
{
    struct dg_root_record rec;

    if (len != DG_ROOT_RECORD_SIZE || buf[0] != RECORD_VERSION)
        return -EBADMSG;
    rec.flags = get_le32(buf + 4);
    rec.length = get_le64(buf + 8);
    rec.piece_size = get_le64(buf + 16);
    rec.blocks_cached = get_le64(buf + 24);
    rec.last_access = (int64_t)get_le64(buf + 32);
    if (rec.length > (UINT64_C(1) << 62) || rec.piece_size != dg_merkle_piece_size(rec.length) ||
        rec.blocks_cached > dg_merkle_block_count(rec.length))
        return -EBADMSG;
    *out = rec;
    return 0;
}

size_t dg_file_record_encode(const struct dg_shared_file *f, uint8_t *out, size_t size)
{
    size_t path_len = strnlen(f->path, sizeof(f->path));

    if (path_len == 0 || path_len > 4095 || size < DG_FILE_RECORD_HEADER + path_len)
        return 0;
    memset(out, 0, DG_FILE_RECORD_HEADER);
    out[0] = RECORD_VERSION;
    out[1] = (uint8_t)f->state;
    out[2] = (uint8_t)path_len;
    out[3] = (uint8_t)(path_len >> 8);
    put_le32(out + 4, (uint32_t)f->error);
    put_le64(out + 8, f->dev);
    put_le64(out + 16, f->size);
    put_le64(out + 24, (uint64_t)f->mtime_ns);
    put_le64(out + 32, (uint64_t)f->ctime_ns);
    memcpy(out + 40, f->root, 32);
    memcpy(out + DG_FILE_RECORD_HEADER, f->path, path_len);
    return DG_FILE_RECORD_HEADER + path_len;
}

int dg_file_record_decode(const uint8_t *buf, size_t len, struct dg_shared_file *out)
{
    size_t path_len;

    if (len < DG_FILE_RECORD_HEADER || buf[0] != RECORD_VERSION)
        return -EBADMSG;
    if (buf[1] < DG_SHARED_HASHING || buf[1] > DG_SHARED_FAILED)
        return -EBADMSG;
    path_len = (size_t)buf[2] | (size_t)buf[3] << 8;
    if (path_len != len - DG_FILE_RECORD_HEADER ||
        dg_relpath_check((const char *)buf + DG_FILE_RECORD_HEADER, path_len) < 0)
        return -EBADMSG;
    out->state = buf[1];
    out->error = (int32_t)get_le32(buf + 4);
    out->dev = get_le64(buf + 8);
    out->size = get_le64(buf + 16);
    out->mtime_ns = (int64_t)get_le64(buf + 24);
    out->ctime_ns = (int64_t)get_le64(buf + 32);
    memcpy(out->root, buf + 40, 32);
    memcpy(out->path, buf + DG_FILE_RECORD_HEADER, path_len);
    out->path[path_len] = '\0';
    return 0;
}
