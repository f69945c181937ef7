/* Talking to a running digfs through its control socket (see engine/control.h).
 *
 * Thread safety: reentrant; blocking calls with a 10 s timeout. */
#ifndef DG_CONTROL_CLIENT_H
#define DG_CONTROL_CLIENT_H

#include <stddef.h>

/* The mount point of the only digfs mount, from /proc/self/mountinfo.
 * @return 0, -ENOENT (none), -EEXIST (several), -errno. */
int dg_control_find_mount(char *out, size_t size);

/* The control socket path of the digfs mounted at @p mnt (its user.digfs.control xattr).
 * @return 0, -ENODATA (not a digfs mount point), -errno. */
int dg_control_socket_of(const char *mnt, char *out, size_t size);

/* The mount point of the digfs that @p path (any path inside a mount) belongs to.
 * @return 0, -ENODATA (not inside a digfs mount), -errno. */
int dg_control_mount_of(const char *path, char *out, size_t size);

/* Sends @p request (one line, no newline) to the socket at @p path and returns the reply,
 * malloc'd and NUL-terminated, in @p out. @return 0, -EINVAL (request too long), -ENAMETOOLONG,
 * -EMSGSIZE (reply over 4 MiB), -errno of connect/read (e.g. -EACCES: not the owner). */
int dg_control_ask(const char *path, const char *request, char **out);

#endif
