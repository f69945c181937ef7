/* `digfs hash FILE...`: prints the content root of files, in the format of sha256sum.
 *
 * Thread safety: runs on the main thread of the `digfs` program before anything else. */
#ifndef DG_HASH_CMD_H
#define DG_HASH_CMD_H

/* Runs the subcommand. Prints "<64 lowercase hex digits of the root>  FILE" for each FILE on
 * standard output; a name containing a newline, carriage return or backslash is printed with
 * those escaped as \n, \r and \\ and the line starts with a backslash, as sha256sum does.
 * No FILE, or "-", means standard input. A first argument "--" is skipped, so the names after
 * it may start with '-'. A file that cannot be read (missing, a directory, changed while it
 * was read) gets "digfs hash: FILE: reason" on standard error and the others still run.
 * @param[in] argc  number of entries in @p argv.
 * @param[in] argv  argv[0] is "hash", argv[1..] the files.
 * @return the exit status: 0 if every file was hashed and printed, 1 otherwise. */
int dg_hash_cmd_main(int argc, char **argv);

#endif
