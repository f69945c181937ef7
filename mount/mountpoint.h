/* Preparing a mount point and tuning a mount.
 *
 * Thread safety: call from the main thread before the FUSE loop starts. */
#ifndef DG_MOUNTPOINT_H
#define DG_MOUNTPOINT_H

/* Clears a stale FUSE mount at @p path (left by a digfs killed with SIGKILL: "Transport
 * endpoint is not connected") with a lazy unmount. @return 1 if one was cleared, 0 if there was
 * none, -errno if it could not be cleared. */
int dg_mountpoint_recover(const char *path);

/* 1 if a live digfs is mounted at the resolved path @p path, else 0. */
int dg_mountpoint_is_digfs(const char *path);

/* Checks that @p path is a directory and returns its resolved absolute path (malloc'd) in
 * @p out. @return 0 or -errno. */
int dg_mountpoint_resolve(const char *path, char **out);

/* Raises the kernel read-ahead of the FUSE mount at @p path to @p kb KiB, so that sequential
 * reads arrive in large requests. Needs root; failures are ignored (logged at debug). */
void dg_mountpoint_tune_readahead(const char *path, unsigned kb);

#endif
