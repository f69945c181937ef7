/* `digfs status [--json] [MOUNTPOINT]`: what a running digfs is doing, from its control
 * socket (found through the mount point's user.digfs.control xattr).
 *
 * Thread safety: a command's main; call from main() only. */
#ifndef DG_STATUS_CMD_H
#define DG_STATUS_CMD_H

/* Runs the status subcommand; argv[0] is "status". Without MOUNTPOINT it uses the only digfs
 * mount of this user. @return the exit status: 0, 1 (no such mount or no answer), 2 (usage). */
int dg_status_cmd_main(int argc, char **argv);

#endif
