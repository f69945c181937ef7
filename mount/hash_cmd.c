/* `digfs hash FILE...`. See hash_cmd.h. */
#include "mount/hash_cmd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/hash_file.h"
#include "engine/root_name.h"

/* Writes @p name with the escapes of sha256sum. */
static void print_name(const char *name)
{
    for (const char *p = name; *p; p++) {
        if (*p == '\n')
            fputs("\\n", stdout);
        else if (*p == '\r')
            fputs("\\r", stdout);
        else if (*p == '\\')
            fputs("\\\\", stdout);
        else
            putchar(*p);
    }
}

/* Hashes one file ("-" = standard input) and prints its line. @return 0 or -errno. */
static int hash_one(const char *name)
{
    struct dg_file_hash fh;
    char hex[DG_ROOT_HEX_LEN + 1];
    int is_stdin = strcmp(name, "-") == 0;
    int fd = STDIN_FILENO;
    int rc;

    if (!is_stdin) {
        do {
            fd = open(name, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        } while (fd < 0 && errno == EINTR);
        if (fd < 0)
            return -errno;
    }
    struct stat st;
    /* Pseudo-files (/proc, /sys) say size 0 but have content: read those to the end. */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
        rc = dg_hash_fd(fd, &fh);
    else
        rc = dg_hash_stream(fd, &fh);
    if (!is_stdin)
        close(fd);
    if (rc < 0)
        return rc;
    dg_root_format(fh.root, hex);
    dg_file_hash_clear(&fh);
    if (strpbrk(name, "\n\r\\") != NULL)
        putchar('\\');
    fputs(hex, stdout);
    fputs("  ", stdout);
    print_name(name);
    putchar('\n');
    return 0;
}

int dg_hash_cmd_main(int argc, char **argv)
{
    static char *const use_stdin[] = {"-"};
    char *const *files = argv + 1;
    int nfiles = argc - 1;
    int status = 0;

    if (nfiles > 0 && strcmp(files[0], "--") == 0) {
        files++;
        nfiles--;
    }
    if (nfiles <= 0) {
        files = use_stdin;
        nfiles = 1;
    }
    for (int i = 0; i < nfiles; i++) {
        int rc = hash_one(files[i]);

        if (rc < 0) {
            fflush(stdout); /* keep the lines in order when both go to one terminal */
            fprintf(stderr, "digfs hash: %s: %s\n", files[i],
                    rc == -EAGAIN ? "file changed while it was read" : strerror(-rc));
            status = 1;
        }
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "digfs hash: write error: %s\n", strerror(errno));
        status = 1;
    }
    return status;
}
