"""The digfs command line: -h, bad options, daemon mode, signals, a second instance."""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402


def run(args, timeout=None):
    return subprocess.run([T.BIN, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout or T.WAIT)


def test_help():
    r = run(["-h"])
    out = r.stdout + r.stderr
    check_eq(r.returncode, 0, f"exit status of `digfs -h` (output: {out[:500]!r})")
    for word in ("data_dir", "cache_dir", "cache_size", "read_timeout", "log_level", "-f",
                 "allow_other"):
        check(word in out, f"`digfs -h` does not mention {word}", out)


def test_no_arguments():
    r = run([])
    check(r.returncode != 0, "`digfs` with no arguments exited 0")
    check((r.stdout + r.stderr).strip(), "`digfs` with no arguments printed nothing")


def expect_refused(m, opts, foreground=True, mnt=None):
    """digfs with @opts must exit non-zero with a message and mount nothing."""
    mnt = mnt or m.mnt
    cmd = [T.BIN, mnt] + (["-f"] if foreground else []) + ["-o", m.option_string(opts)]
    with open(m.log_path, "a") as f:
        f.write(f"\n=== {' '.join(cmd)}\n")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + T.WAIT
    try:
        while p.poll() is None:
            if T.mount_entry(mnt) is not None:
                T.fail(f"digfs mounted despite {opts} (it should refuse)")
            if time.monotonic() > deadline:
                T.fail(f"digfs with {opts} still running after {T.WAIT:.0f} s (should refuse)")
            time.sleep(0.05)
        out, err = p.communicate(timeout=T.WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode != 0, f"digfs with {opts} exited 0", out, err)
    check((out + err).strip(), f"digfs with {opts} exited {p.returncode} without a message")
    check(T.mount_entry(mnt) is None, f"something is mounted after digfs with {opts}",
          T.mount_entry(mnt))
    return out + err


def test_bad_options():
    with T.Mount("badopt", start=False) as m:
        for opts in (["bogus_option=1"], ["cache_size=12X"], ["cache_size="], ["cache_size=abc"],
                     ["cache_size=-1G"], ["read_timeout=abc"], ["read_timeout=-5"],
                     ["log_level=loud"]):
            expect_refused(m, opts)
        expect_refused(m, ["cache_size=12X"], foreground=False)
        expect_refused(m, ["bogus_option=1"], foreground=False)


def test_bad_mountpoint():
    with T.Mount("badmnt", start=False) as m:
        expect_refused(m, [], mnt=os.path.join(m.dir, "does-not-exist"))
        expect_refused(m, [], foreground=False, mnt=os.path.join(m.dir, "does-not-exist"))
        regular = os.path.join(m.dir, "a-file")
        open(regular, "w").close()
        expect_refused(m, [], foreground=False, mnt=regular)


def test_version():
    r = run(["-V"])
    check_eq(r.returncode, 0, f"exit status of `digfs -V` ({r.stderr!r})")
    check("digfs" in r.stdout + r.stderr, "`digfs -V` does not name digfs", r.stdout)


def test_good_options():
    with T.Mount("goodopt", start=False) as m:
        for opts, extra in ((["cache_size=512K", "read_timeout=5", "log_level=error"], []),
                            (["cache_size=10M", "log_level=warn"], ["-s"]),
                            (["cache_size=2T", "log_level=info"], []),
                            (["cache_size=1073741824", "read_timeout=120", "log_level=debug"],
                             ["-d"])):
            m.start(opts, extra_args=extra)
            data = f"opts {opts} {extra}".encode()
            root = T.share(m, "f.bin", data)
            check_bytes(T.read_file(m.by_hash(root)), data, f"by-hash with {opts} {extra}")
            check_eq(m.unmount(), 0, f"exit status with {opts} {extra}")


def test_debug_implies_foreground():
    """`digfs MNT -d` (no -f) stays in the foreground: the started process serves the mount."""
    with T.Mount("debugfg", start=False) as m:
        m.start(flags=["-d"])
        check(m.alive(), "digfs -d exited (daemonized?) although the mount is up")
        T.share(m, "d.bin", b"debug\n")
        check_eq(m.unmount(), 0, "exit status")


def test_daemon_mode():
    """Without -f: returns 0 once mounted (the mount is usable at return), the engine works in
    the daemon, and fusermount3 -u stops it."""
    with T.Mount("daemon", start=False) as m:
        m.start(foreground=False)  # checks the mount is ready the moment it returns
        check(m.pid is not None, "no digfs daemon process found for the mount point")
        data = T.data_of(100000, 1)
        root = T.share(m, "d.bin", data)
        check_bytes(T.read_file(m.by_hash(root)), data, "by-hash read from the daemon")
        pid = m.pid
        m.unmount()
        T.wait_until(lambda: not T._pid_alive(pid), f"daemon pid {pid} to exit after unmount")
        check(T.mount_entry(m.mnt) is None, "mount left behind")


def test_daemon_releases_stdio():
    """The daemon does not keep the caller's stdout/stderr open (so `out=$(digfs MNT ...)` or
    ssh does not hang)."""
    with T.Mount("stdio", start=False) as m:
        cmd = m.command(foreground=False)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=T.WAIT)
        except subprocess.TimeoutExpired:
            alive = p.poll() is None
            p.kill()
            p.communicate()
            m._adopt_daemon()
            T.fail("digfs without -f is still running" if alive else
                   "digfs without -f returned but its daemon still holds stdout/stderr open")
        m._adopt_daemon()
        check_eq(p.returncode, 0, f"exit status (stderr {err!r})")
        check(m.mounted_and_ready(), "not mounted after the daemon-mode command returned")
        m.unmount()


def signal_test(sig, foreground=True):
    with T.Mount(f"sig{sig}", start=False) as m:
        m.start(foreground=foreground)
        data = T.data_of(70000, sig)
        root = T.share(m, "s.bin", data)
        m.send_signal(sig)
        rc = m.wait_exit()
        if foreground:
            check_eq(rc, 0, f"exit status after signal {sig}")
        T.wait_until(lambda: T.mount_entry(m.mnt) is None,
                     f"mount to be gone after signal {sig}")
        check(not os.path.ismount(m.mnt), "still a mount point")
        m.start()
        check_bytes(T.read_file(m.by_hash(root)), data, "root served after the restart")
        check_eq(m.unmount(), 0, "exit status")


def test_sigterm():
    signal_test(signal.SIGTERM)


def test_sigint():
    signal_test(signal.SIGINT)


def test_sigterm_daemon():
    signal_test(signal.SIGTERM, foreground=False)


def test_second_instance_on_live_mount():
    """A second digfs on a mount point where a live digfs is mounted must not unmount or break
    it (stale-mount recovery is only for dead mounts)."""
    with T.Mount("live") as m, T.Mount("second", start=False) as other:
        data = b"first instance\n"
        root = T.share(m, "live.bin", data)
        cmd = [T.BIN, m.mnt, "-f", "-o", other.option_string()]
        base = T.mount_entry(m.mnt)
        with open(other.log_path, "a") as f:
            f.write(f"\n=== {' '.join(cmd)}\n")
        with open(other.log_path, "ab") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 preexec_fn=T._child_setup)
        try:
            # it either refuses (exits non-zero) or mounts on top; wait for one of them
            T.wait_until(lambda: p.poll() is not None or T.mount_entry(m.mnt) != base,
                         "the second digfs to exit or to mount")
            if p.poll() is None:
                subprocess.run(["fusermount3", "-u", m.mnt], capture_output=True, timeout=60)
                p.wait(timeout=T.WAIT)
                T.fail("a second digfs mounted over a live digfs mount (expected a refusal)")
            check(p.returncode != 0, "the second digfs exited 0 without mounting")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        check(m.alive(), "the first digfs died when a second one started on its mount point")
        check(m.mounted_and_ready(), "the first digfs's mount is gone or broken")
        check_bytes(T.read_file(m.by_hash(root)), data, "first mount still serves its files")
        check_eq(m.unmount(), 0, "exit status of the first digfs")


def test_xdg_default_dirs():
    """Without data_dir/cache_dir, digfs uses $XDG_DATA_HOME/digfs and $XDG_CACHE_HOME/digfs."""
    with T.Mount("xdg", start=False) as m:
        env = dict(os.environ, HOME=os.path.join(m.dir, "home"),
                   XDG_DATA_HOME=os.path.join(m.dir, "xdg-data"),
                   XDG_CACHE_HOME=os.path.join(m.dir, "xdg-cache"))
        m.start(dirs=False, env=env)
        data = b"xdg defaults\n"
        T.share(m, "x.txt", data)
        backing = os.path.join(m.dir, "xdg-data", "digfs", "shared", "x.txt")
        check(os.path.isfile(backing), f"{backing} not created",
              sorted(os.path.relpath(os.path.join(d, f), m.dir)
                     for d, _, fs in os.walk(m.dir) for f in fs if "/mnt" not in d))
        check_bytes(T.read_file(backing), data, "backing file under XDG_DATA_HOME")
        check_eq(m.unmount(), 0, "exit status")


def test_data_dir_in_use():
    """A second digfs on another mount point with the same data_dir refuses (the first keeps
    working)."""
    with T.Mount("inuse") as m, T.Mount("inuse2", start=False) as other:
        root = T.share(m, "a.txt", b"in use\n")
        cmd = [T.BIN, other.mnt, "-f", "-o", m.option_string()]
        r = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=T._child_setup)
        try:
            T.wait_until(lambda: r.poll() is not None or other.mounted_and_ready(),
                         "the second digfs to exit or mount")
            if r.poll() is None:
                T.fail("a second digfs mounted with a data_dir already in use")
            out, err = r.communicate(timeout=T.WAIT)
        finally:
            if r.poll() is None:
                r.kill()
                r.wait()
        check(r.returncode != 0, "second digfs on the same data_dir exited 0")
        check((out + err).strip(), "second digfs on the same data_dir printed nothing")
        check(T.mount_entry(other.mnt) is None, "the second digfs left a mount")
        check_bytes(T.read_file(m.by_hash(root)), b"in use\n", "first mount still serves")
        check_eq(m.unmount(), 0, "exit status of the first digfs")


if __name__ == "__main__":
    T.main()
