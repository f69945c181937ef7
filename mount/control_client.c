#include "mount/control_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#define MAX_REPLY (4u << 20)

/* The mount point of the only digfs mount, from /proc/self/mountinfo. */
int dg_control_find_mount(char *out, size_t size)
{
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[8192], mnt[4096];
    int found = 0;

    if (!f)
        return -errno;
    while (fgets(line, sizeof(line), f)) {
        const char *sep = strstr(line, " - ");
        char fstype[64];
        if (!sep || sscanf(sep + 3, "%63s", fstype) != 1 || strcmp(fstype, "fuse.digfs") != 0)
            continue;
        if (sscanf(line, "%*u %*u %*s %*s %4095s", mnt) != 1)
            continue;
        found++;
        snprintf(out, size, "%s", mnt);
    }
    fclose(f);
    return found == 1 ? 0 : found == 0 ? -ENOENT : -EEXIST;
}

int dg_control_ask(const char *path, const char *request, char **out)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct timeval tv = {10, 0};
    size_t len = 0, cap = 65536;
    char *buf;
    int fd, rc = 0;

    if (strlen(path) >= sizeof(sa.sun_path))
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    size_t rlen = strlen(request);
    char line[300];
    if (rlen + 1 >= sizeof(line)) {
        close(fd);
        return -EINVAL;
    }
    memcpy(line, request, rlen);
    line[rlen] = '\n';
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        write(fd, line, rlen + 1) != (ssize_t)(rlen + 1)) {
        rc = -errno;
        close(fd);
        return rc;
    }
    buf = malloc(cap);
    while (buf) {
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            break;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len + 1 == cap) {
            char *nb = cap < MAX_REPLY ? realloc(buf, cap * 2) : NULL;
            if (!nb) {
                rc = -EMSGSIZE;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    close(fd);
    if (!buf)
        return -ENOMEM;
    if (rc < 0) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *out = buf;
    return 0;
}

int dg_control_socket_of(const char *mnt, char *out, size_t size)
{
    ssize_t n = getxattr(mnt, "user.digfs.control", out, size - 1);

    if (n < 0)
        return errno == ENODATA || errno == ENOTSUP ? -ENODATA : -errno;
    out[n] = '\0';
    return 0;
}

int dg_control_mount_of(const char *path, char *out, size_t size)
{
    char *dir = realpath(path, NULL);
    char sock[4096];
    int rc = -ENODATA;

    if (!dir)
        return -errno;
    /* Walk up to the directory that answers user.digfs.control: the mount point. */
    for (;;) {
        if (dg_control_socket_of(dir, sock, sizeof(sock)) == 0) {
            snprintf(out, size, "%s", dir);
            rc = 0;
            break;
        }
        char *slash = strrchr(dir, '/');
        if (!slash || slash == dir)
            break;
        *slash = '\0';
    }
    free(dir);
    return rc;
}
