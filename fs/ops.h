/* The FUSE layer of digfs (libfuse3 low-level API): the mount's tree over an engine.
 *
 *   /            the mount point: shared/, by-hash/, by-name/
 *   shared/      passthrough to <data_dir>/shared; closing a written file tells the engine
 *   by-hash/     read-only files named by root, read through engine content handles
 *   by-name/     symlinks mirroring the hashed files of shared/
 *
 * Threads: the ops run on libfuse's worker threads; replies to reads that wait for data come
 * from the engine thread. Lock order: fs lock, then the node table's lock (the engine's queue
 * lock is never held while calling into fs/). */
#ifndef DG_FS_OPS_H
#define DG_FS_OPS_H

#include <fuse_lowlevel.h>

#include "engine/engine.h"

struct dg_fs; /* opaque */

/* Creates the FUSE layer over @p engine (which must outlive it).
 * @return 0, -errno if the backing shared/ directory cannot be opened, -ENOMEM. */
int dg_fs_new(struct dg_engine *engine, struct dg_fs **out);

/* The operations table; pass the dg_fs as userdata to fuse_session_new(). */
const struct fuse_lowlevel_ops *dg_fs_ops(void);

/* Frees the layer (after the session ended and the engine stopped). NULL is allowed. */
void dg_fs_free(struct dg_fs *fs);

#endif
