/* Running digfs in the background the way a user expects from a mount command: the command
 * returns only once the mount is up, with a non-zero status and the error on stderr if it
 * could not be mounted.
 *
 * Thread safety: call before any thread is started. */
#ifndef DG_DAEMON_H
#define DG_DAEMON_H

/* Forks. The parent waits for the child's report and exits with it (never returns); the child
 * starts a new session and returns the descriptor it reports on.
 * @return the report descriptor (>= 0) in the child, or -errno if fork failed (no child). */
int dg_daemon_start(void);

/* Child: reports @p status (0 = mounted) to the waiting parent and closes @p fd. On success it
 * also detaches from the terminal (stdin/stdout/stderr to /dev/null, cwd /). */
void dg_daemon_ready(int fd, int status);

#endif
