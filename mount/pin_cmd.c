#include "mount/pin_cmd.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>

#include "engine/root_name.h"
#include "mount/control_client.h"

/* Pins or unpins one file. @return 0, or 1 after printing why not. */
static int pin_one(const char *cmd, const char *file)
{
    char hex[DG_ROOT_HEX_LEN + 8], mnt[4096], sock[4096], request[80];
    uint8_t root[32];
    char *reply = NULL;
    ssize_t n;
    int rc;

    n = getxattr(file, "user.digfs.root", hex, sizeof(hex) - 1);
    if (n < 0) {
        fprintf(stderr, "digfs %s: %s: %s\n", cmd, file,
                errno == ENODATA || errno == ENOTSUP ? "not a file of a digfs mount"
                                                     : strerror(errno));
        return 1;
    }
    hex[n] = '\0';
    if (dg_root_parse(hex, (size_t)n, root) < 0) {
        fprintf(stderr, "digfs %s: %s: no root yet (%s)\n", cmd, file, hex);
        return 1;
    }
    if ((rc = dg_control_mount_of(file, mnt, sizeof(mnt))) < 0 ||
        (rc = dg_control_socket_of(mnt, sock, sizeof(sock))) < 0) {
        fprintf(stderr, "digfs %s: %s: cannot find its digfs mount: %s\n", cmd, file,
                strerror(-rc));
        return 1;
    }
    snprintf(request, sizeof(request), "%s %s", cmd, hex);
    if ((rc = dg_control_ask(sock, request, &reply)) < 0) {
        fprintf(stderr, "digfs %s: %s: %s\n", cmd, sock, strerror(-rc));
        return 1;
    }
    cJSON *r = cJSON_Parse(reply);
    const cJSON *ok = cJSON_GetObjectItemCaseSensitive(r, "ok");
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(r, "error");
    rc = cJSON_IsTrue(ok) ? 0 : 1;
    if (rc)
        fprintf(stderr, "digfs %s: %s: %s\n", cmd, file,
                cJSON_IsString(err) ? err->valuestring : "unexpected answer");
    cJSON_Delete(r);
    free(reply);
    return rc;
}

int dg_pin_cmd_main(int argc, char **argv)
{
    int status = 0;

    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: digfs %s FILE...\n"
                "FILE: by-hash/<root>, by-name/<name> or a hashed file in shared/.\n",
                argv[0]);
        return argc < 2 ? 2 : 0;
    }
    for (int i = 1; i < argc; i++)
        status |= pin_one(argv[0], argv[i]);
    return status;
}
