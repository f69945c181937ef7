#include "engine/root_name.h"

#include <errno.h>
#include <string.h>

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int dg_root_parse(const char *name, size_t len, uint8_t root[32])
{
    uint8_t tmp[32];

    if (len != DG_ROOT_HEX_LEN)
        return -EINVAL;
    for (size_t i = 0; i < 32; i++) {
        int hi = hex_value(name[2 * i]);
        int lo = hex_value(name[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -EINVAL;
        tmp[i] = (uint8_t)(hi << 4 | lo);
    }
    memcpy(root, tmp, sizeof(tmp));
    return 0;
}

void dg_root_format(const uint8_t root[32], char out[DG_ROOT_HEX_LEN + 1])
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < 32; i++) {
        out[2 * i] = digits[root[i] >> 4];
        out[2 * i + 1] = digits[root[i] & 15];
    }
    out[DG_ROOT_HEX_LEN] = '\0';
}

int dg_name_check(const char *name, size_t len)
{
    if (len == 0 || len > 255)
        return -EINVAL;
    if ((len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.'))
        return -EINVAL;
    if (memchr(name, '/', len) || memchr(name, '\0', len))
        return -EINVAL;
    return 0;
}

int dg_relpath_check(const char *path, size_t len)
{
    size_t start = 0;

    if (len == 0 || len > 4095)
        return -EINVAL;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || path[i] == '/') {
            if (dg_name_check(path + start, i - start) < 0)
                return -EINVAL;
            start = i + 1;
        }
    }
    return 0;
}
