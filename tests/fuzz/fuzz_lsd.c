/* libFuzzer target: the LAN discovery parser (engine/lsd.c) on an untrusted datagram.
 *
 * The input is copied into a buffer of exactly its size (so ASan sees any read past it) and
 * parsed. Invariants:
 *   - parsing gives 0 or -EBADMSG, nothing else;
 *   - a parsed message has a port in 1..65535, 1..DG_LSD_MAX_KEYS keys and a NUL-terminated
 *     cookie;
 *   - formatting it again (when its cookie is short enough to send) and parsing that gives the
 *     same port, keys and cookie. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/lsd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1);
    struct dg_lsd_message m, again;
    char out[DG_LSD_MAX_MESSAGE];
    int rc;

    if (!copy)
        return 0;
    memcpy(copy, data, size);
    rc = dg_lsd_parse(copy, size, &m);
    free(copy);
    if (rc != 0 && rc != -EBADMSG)
        abort();
    if (rc != 0)
        return 0;
    if (m.port == 0 || m.nkeys == 0 || m.nkeys > DG_LSD_MAX_KEYS ||
        strnlen(m.cookie, sizeof(m.cookie)) == sizeof(m.cookie))
        abort();
    /* A cookie with line breaks or colons would not survive a round trip; ours never has. */
    if (strpbrk(m.cookie, "\r\n") || m.cookie[0] == ' ' || m.cookie[0] == '\t')
        return 0;
    size_t clen = strlen(m.cookie);
    if (clen > 0 && (m.cookie[clen - 1] == ' ' || m.cookie[clen - 1] == '\t'))
        return 0;
    int n =
        dg_lsd_format(m.port, (const uint8_t(*)[20])m.keys, m.nkeys, m.cookie, out, sizeof(out));
    if (n < 0) {
        if (n != -ENOBUFS)
            abort();
        return 0;
    }
    if (dg_lsd_parse((const uint8_t *)out, (size_t)n, &again) != 0 || again.port != m.port ||
        again.nkeys != m.nkeys || memcmp(again.keys, m.keys, sizeof(m.keys[0]) * m.nkeys) != 0 ||
        strcmp(again.cookie, m.cookie) != 0)
        abort();
    return 0;
}
