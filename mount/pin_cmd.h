/* `digfs pin FILE...` / `digfs unpin FILE...`: keep content in the cache (never evicted; with
 * the swarm, fetched completely), or release it. FILE is any path of a digfs mount that has a
 * root: by-hash/<root>, by-name/<name>, or a hashed file in shared/.
 *
 * Thread safety: a command's main; call from main() only. */
#ifndef DG_PIN_CMD_H
#define DG_PIN_CMD_H

/* Runs pin (argv[0] "pin") or unpin (argv[0] "unpin").
 * @return the exit status: 0, 1 (some file could not be pinned), 2 (usage). */
int dg_pin_cmd_main(int argc, char **argv);

#endif
