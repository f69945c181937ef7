/* Temporary directories for unit tests: made under /tmp, removed with everything in them. */
#ifndef DG_TEST_TMPDIR_H
#define DG_TEST_TMPDIR_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static inline int tmpdir_remove_entry(const char *path, const struct stat *st, int flag,
                                      struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Makes /tmp/dg-TAG-XXXXXX in @p buf. @return 0, or -1 with errno set. */
static inline int tmpdir_make(char *buf, size_t size, const char *tag)
{
    snprintf(buf, size, "/tmp/dg-%s-XXXXXX", tag);
    return mkdtemp(buf) ? 0 : -1;
}

/* Removes @p path and everything below it (best effort: tests clean up after failures too). */
static inline void tmpdir_remove(const char *path)
{
    nftw(path, tmpdir_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

#endif
