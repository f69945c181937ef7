/* digfs: mount the swarm (`digfs MOUNTPOINT ...`) or run a subcommand (`digfs hash ...`). */
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/log.h"
#include "fs/ops.h"
#include "mount/daemon.h"
#include "mount/hash_cmd.h"
#include "mount/mountpoint.h"
#include "mount/options.h"
#include "mount/pin_cmd.h"
#include "mount/status_cmd.h"

#define READAHEAD_KB 1024

/* Mounts and serves until unmounted or signalled. @return the exit status. */
static int run_mount(struct dg_options *o, int report_fd)
{
    struct dg_engine_config cfg = {
        .data_dir = o->data_dir,
        .cache_dir = o->cache_dir,
        .cache_size = o->cache_size,
        .read_timeout_ms = o->read_timeout_ms,
        .network = !o->offline,
        .port = o->port,
        .bootstrap = o->bootstrap,
        .peers = o->peers,
        .lookup_timeout_ms = o->lookup_timeout_ms,
        .announce_cached = o->announce_cached,
        .lan_discovery = o->lsd,
        .upnp = o->upnp,
        .natpmp = o->natpmp,
        .holepunch = o->holepunch,
        .relay = o->relay,
        .prefer_utp = o->prefer_utp,
        .relay_rate = o->relay_rate,
    };
    struct dg_engine *engine = NULL;
    struct dg_fs *fs = NULL;
    struct fuse_session *se = NULL;
    struct fuse_loop_config *loop_cfg = NULL;
    char *mnt = NULL, opts[8192];
    int rc, status = 1, mounted = 0, handlers = 0;

    rc = dg_mountpoint_recover(o->mountpoint);
    if (rc < 0) {
        fprintf(stderr, "digfs: %s: stale mount cannot be cleared: %s\n", o->mountpoint,
                strerror(-rc));
        goto out;
    }
    if ((rc = dg_mountpoint_resolve(o->mountpoint, &mnt)) < 0) {
        fprintf(stderr, "digfs: mount point %s: %s\n", o->mountpoint, strerror(-rc));
        goto out;
    }
    if (dg_mountpoint_is_digfs(mnt)) {
        fprintf(stderr, "digfs: %s is already a digfs mount (unmount it first)\n", mnt);
        goto out;
    }
    if ((rc = dg_engine_new(&cfg, &engine)) < 0) {
        if (rc == -EBUSY)
            fprintf(stderr, "digfs: data directory %s is in use by another digfs\n", o->data_dir);
        else
            fprintf(stderr, "digfs: cannot open data directory %s: %s\n", o->data_dir,
                    strerror(-rc));
        goto out;
    }
    if ((rc = dg_fs_new(engine, &fs)) < 0) {
        fprintf(stderr, "digfs: cannot set up the file system: %s\n", strerror(-rc));
        goto out;
    }

    snprintf(opts, sizeof(opts), "default_permissions,fsname=digfs,subtype=digfs%s%s",
             o->fuse_opts[0] ? "," : "", o->fuse_opts);
    char *fuse_argv[] = {"digfs", "-o", opts, o->debug ? "-d" : NULL, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(o->debug ? 4 : 3, fuse_argv);
    se = fuse_session_new(&args, dg_fs_ops(), sizeof(struct fuse_lowlevel_ops), fs);
    fuse_opt_free_args(&args); /* libfuse may have copied and extended them */
    if (!se) {
        fprintf(stderr, "digfs: bad mount options: %s\n", o->fuse_opts);
        goto out;
    }
    if (fuse_set_signal_handlers(se) != 0)
        goto out;
    handlers = 1;
    if (fuse_session_mount(se, mnt) != 0) {
        fprintf(stderr, "digfs: cannot mount at %s\n", mnt);
        goto out;
    }
    mounted = 1;
    if ((rc = dg_engine_start(engine)) < 0) {
        fprintf(stderr, "digfs: cannot start the engine: %s\n", strerror(-rc));
        goto out;
    }
    dg_mountpoint_tune_readahead(mnt, READAHEAD_KB);
    dg_log(DG_LOG_INFO, "mount", "mounted at %s (data %s, cache %s)", mnt, o->data_dir,
           o->cache_dir);
    if (report_fd >= 0) {
        dg_log_use_syslog(1);
        dg_daemon_ready(report_fd, 0);
        report_fd = -1;
    }

    if (o->single_thread) {
        rc = fuse_session_loop(se);
    } else {
        loop_cfg = fuse_loop_cfg_create();
        if (!loop_cfg)
            goto out;
        fuse_loop_cfg_set_clone_fd(loop_cfg, 1);
        fuse_loop_cfg_set_idle_threads(loop_cfg, 8);
        rc = fuse_session_loop_mt(se, loop_cfg);
    }
    status = rc < 0 ? 1 : 0;
    dg_log(DG_LOG_INFO, "mount", "unmounting %s", mnt);

out:
    /* Waiting reads are answered before the session goes; the index is flushed. */
    dg_engine_stop(engine);
    if (mounted)
        fuse_session_unmount(se);
    if (handlers)
        fuse_remove_signal_handlers(se);
    if (se)
        fuse_session_destroy(se);
    if (loop_cfg)
        fuse_loop_cfg_destroy(loop_cfg);
    dg_fs_free(fs);
    dg_engine_free(engine);
    free(mnt);
    if (report_fd >= 0)
        dg_daemon_ready(report_fd, status ? status : 1);
    return status;
}

int main(int argc, char **argv)
{
    struct dg_options o;
    char err[512];
    int report_fd = -1, status;

    if (argc >= 2 && strcmp(argv[1], "hash") == 0)
        return dg_hash_cmd_main(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "status") == 0)
        return dg_status_cmd_main(argc - 1, argv + 1);
    if (argc >= 2 && (strcmp(argv[1], "pin") == 0 || strcmp(argv[1], "unpin") == 0))
        return dg_pin_cmd_main(argc - 1, argv + 1);

    if (dg_options_parse(argc, argv, &o, err, sizeof(err)) < 0) {
        fprintf(stderr, "digfs: %s\nTry 'digfs --help' for more information.\n", err);
        return 2;
    }
    if (o.show_help) {
        dg_options_usage(stdout, "digfs");
        dg_options_free(&o);
        return 0;
    }
    if (o.show_version) {
        printf("digfs %s\n", DIGFS_VERSION);
        fuse_lowlevel_version();
        dg_options_free(&o);
        return 0;
    }
    dg_log_set_level((enum dg_log_level)o.log_level);
    if (!o.foreground) {
        report_fd = dg_daemon_start();
        if (report_fd < 0) {
            fprintf(stderr, "digfs: cannot start in the background: %s\n", strerror(-report_fd));
            dg_options_free(&o);
            return 1;
        }
    }
    status = run_mount(&o, report_fd);
    dg_options_free(&o);
    return status;
}
