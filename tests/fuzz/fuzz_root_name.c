/* libFuzzer target: dg_root_parse(), dg_name_check() and dg_relpath_check() on untrusted
 * names (they come from lookups in by-hash/ and from the network).
 *
 * Each function is checked against a plain reference written from its contract, in both
 * directions: what it accepts must be valid and what is valid must be accepted. A parsed root
 * formats back to the input, byte for byte; a failed parse leaves the output alone. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/root_name.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int ref_root_ok(const char *s, size_t len)
{
    if (len != DG_ROOT_HEX_LEN)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int ref_name_ok(const char *s, size_t len)
{
    if (len == 0 || len > 255)
        return 0;
    if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.'))
        return 0;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '/' || s[i] == '\0')
            return 0;
    return 1;
}

static int ref_relpath_ok(const char *s, size_t len)
{
    size_t start = 0;

    if (len == 0 || len > 4095)
        return 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '/') {
            if (!ref_name_ok(s + start, i - start))
                return 0;
            start = i + 1;
        }
    }
    return ref_name_ok(s + start, len - start);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy: ASan catches any read past the name (no NUL is promised). */
    char *s = malloc(size ? size : 1);
    uint8_t root[32], before[32];
    char hex[DG_ROOT_HEX_LEN + 1];

    if (!s)
        return 0;
    memcpy(s, data, size);

    memset(root, 0x5c, sizeof(root));
    memcpy(before, root, sizeof(root));
    int rc = dg_root_parse(s, size, root);
    if ((rc == 0) != ref_root_ok(s, size))
        abort();
    if (rc == 0) {
        dg_root_format(root, hex);
        if (strlen(hex) != DG_ROOT_HEX_LEN || memcmp(hex, s, DG_ROOT_HEX_LEN) != 0)
            abort();
    } else if (rc != -EINVAL || memcmp(root, before, sizeof(root)) != 0) {
        abort();
    }

    rc = dg_name_check(s, size);
    if ((rc == 0) != ref_name_ok(s, size) || (rc != 0 && rc != -EINVAL))
        abort();

    rc = dg_relpath_check(s, size);
    if ((rc == 0) != ref_relpath_ok(s, size) || (rc != 0 && rc != -EINVAL))
        abort();
    /* A valid path never escapes: no component is "..", none is empty. */
    if (rc == 0 && (s[0] == '/' || s[size - 1] == '/' || memmem(s, size, "//", 2)))
        abort();

    free(s);
    return 0;
}
