#include "mount/mountpoint.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/log.h"

/* Runs fusermount3 -u -z PATH (for users who may not call umount2). */
static int run_fusermount_lazy(const char *path)
{
    pid_t pid = fork();
    int status;

    if (pid < 0)
        return -errno;
    if (pid == 0) {
        execlp("fusermount3", "fusermount3", "-u", "-z", "--", path, (char *)NULL);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EBUSY;
}

int dg_mountpoint_recover(const char *path)
{
    struct statvfs sv;
    int rc;

    /* statfs, not stat: the kernel may answer stat from cached attributes after the daemon
     * died, while a statfs always goes to the daemon. */
    if (statvfs(path, &sv) == 0 || errno != ENOTCONN)
        return 0;
    dg_log(DG_LOG_INFO, "mount", "%s is a stale mount; unmounting it", path);
    if (umount2(path, MNT_DETACH) == 0)
        return 1;
    if ((rc = run_fusermount_lazy(path)) < 0) {
        dg_log(DG_LOG_ERROR, "mount", "cannot clear the stale mount at %s", path);
        return rc;
    }
    return 1;
}

int dg_mountpoint_resolve(const char *path, char **out)
{
    struct stat st;

    if (stat(path, &st) < 0)
        return -errno;
    if (!S_ISDIR(st.st_mode))
        return -ENOTDIR;
    *out = realpath(path, NULL);
    return *out ? 0 : -errno;
}

/* The device number and file system type of the top mount at @p path, from
 * /proc/self/mountinfo (stat() on a FUSE mount would wait for its daemon). Mount points with
 * spaces or other escaped characters are compared in their escaped form. @return 0 or
 * -ENOENT. */
static int mount_info(const char *path, unsigned *maj, unsigned *min, char fstype[64])
{
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[8192];
    int found = -ENOENT;

    if (!f)
        return -errno;
    while (fgets(line, sizeof(line), f)) {
        unsigned a, b;
        char mnt[4096];
        const char *sep = strstr(line, " - ");
        /* id parent major:minor root mountpoint ... - fstype source options */
        if (sep && sscanf(line, "%*u %*u %u:%u %*s %4095s", &a, &b, mnt) == 3 &&
            strcmp(mnt, path) == 0 && sscanf(sep + 3, "%63s", fstype) == 1) {
            *maj = a; /* the last match is the mount on top */
            *min = b;
            found = 0;
        }
    }
    fclose(f);
    return found;
}

int dg_mountpoint_is_digfs(const char *path)
{
    unsigned maj, min;
    char fstype[64];

    return mount_info(path, &maj, &min, fstype) == 0 && strcmp(fstype, "fuse.digfs") == 0;
}

void dg_mountpoint_tune_readahead(const char *path, unsigned kb)
{
    char sysfs[128];
    unsigned maj, min;
    FILE *f;

    char fstype[64];

    if (mount_info(path, &maj, &min, fstype) < 0)
        return;
    snprintf(sysfs, sizeof(sysfs), "/sys/class/bdi/%u:%u/read_ahead_kb", maj, min);
    f = fopen(sysfs, "w");
    if (!f) {
        dg_log(DG_LOG_DEBUG, "mount", "cannot set read-ahead (%s): %s", sysfs, strerror(errno));
        return;
    }
    fprintf(f, "%u\n", kb);
    if (fclose(f) != 0)
        dg_log(DG_LOG_DEBUG, "mount", "cannot set read-ahead: %s", strerror(errno));
}
