/* Names of content: the 64-character hex form of a root, and checks on names and relative
 * paths before they touch a filesystem.
 *
 * by-hash/ names are exactly 64 lowercase hex digits. Upper case is rejected (ENOENT), so
 * every root has exactly one name and the kernel's dentry cache never holds two entries for
 * one file.
 *
 * Thread safety: all functions are reentrant. */
#ifndef DG_ROOT_NAME_H
#define DG_ROOT_NAME_H

#include <stddef.h>
#include <stdint.h>

#define DG_ROOT_HEX_LEN 64

/* Parses a by-hash name.
 * @param[in]  name  @p len bytes, no NUL needed.
 * @param[out] root  32 bytes, written only on success.
 * @return 0, or -EINVAL unless the name is exactly 64 lowercase hex digits. */
int dg_root_parse(const char *name, size_t len, uint8_t root[32]);

/* Writes the 64 lowercase hex digits of @p root and a NUL into @p out (65 bytes). */
void dg_root_format(const uint8_t root[32], char out[DG_ROOT_HEX_LEN + 1]);

/* Checks one path component: non-empty, at most 255 bytes, not "." or "..", no '/' or NUL.
 * @return 0 or -EINVAL. */
int dg_name_check(const char *name, size_t len);

/* Checks a relative path of components separated by single '/': no leading or trailing '/',
 * each component passes dg_name_check(), at most 4095 bytes in all. @return 0 or -EINVAL. */
int dg_relpath_check(const char *path, size_t len);

#endif
