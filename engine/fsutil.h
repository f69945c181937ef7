/* Small filesystem helpers shared by the engine's modules.
 *
 * Thread safety: reentrant. */
#ifndef DG_FSUTIL_H
#define DG_FSUTIL_H

/* Creates directory @p path and its missing parents with mode 0700 (existing ones are kept as
 * they are). @return 0, -ENAMETOOLONG, or -errno of the failed mkdir(). */
int dg_mkdir_p(const char *path);

#endif
