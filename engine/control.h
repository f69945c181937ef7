/* The control socket: a Unix stream socket, owner-only (mode 0600), served on the engine's
 * loop. A client writes one request line (at most 255 bytes, ending in '\n') and reads one
 * reply (ending in '\n'); then the server closes the connection. Requests: "status",
 * "pin <root>", "unpin <root>".
 *
 * Thread safety: every function runs on the thread of @p loop. */
#ifndef DG_CONTROL_H
#define DG_CONTROL_H

#include <uv.h>

struct dg_control; /* opaque */

/* Answers one request: returns a malloc'd reply (without the trailing newline), or NULL for
 * an unknown request (the client then gets {"error": ...}). */
typedef char *(*dg_control_handler)(void *arg, const char *request);

/* Listens on @p path (a stale socket file there is replaced: the caller holds the data
 * directory's lock, so no other digfs can be serving it). The socket is created owner-only by
 * narrowing the process umask for the bind: call it before other threads create files.
 * @return 0, -ENAMETOOLONG (path longer than a Unix socket allows), -errno of bind/listen. */
int dg_control_start(uv_loop_t *loop, const char *path, dg_control_handler handler, void *arg,
                     struct dg_control **out);

/* Stops listening, closes client connections, removes the socket file. Memory is freed in
 * libuv close callbacks, so run the loop afterwards. NULL is allowed. */
void dg_control_stop(struct dg_control *c);

#endif
