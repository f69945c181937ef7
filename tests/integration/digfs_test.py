"""Shared helpers for the digfs integration tests (Python 3.11 stdlib only).

Every tests/integration/test_*.py is its own ctest test, run as
`python3 tests/integration/test_X.py` with DIGFS_BIN=<path to digfs>. A test file defines
functions named test_* and ends with `digfs_test.main()`, which runs them in source order,
prints `PASS name` / `FAIL name: reason` / `SKIP name: reason`, and exits 0 (all passed),
1 (something failed) or 77 (everything skipped: no usable /dev/fuse).

Names given on the command line run only those tests: `python3 test_X.py test_a test_b`.

Environment:
  DIGFS_BIN           the digfs binary (default: <repo>/build/digfs)
  DIGFS_TEST_WAIT     seconds a poll waits before failing (default 90)
  DIGFS_TEST_TIMEOUT  seconds a whole test file may run before the watchdog kills the digfs
                      processes it started and fails (default 540; ctest's limit is 600)
  DIGFS_TEST_KEEP     set to 1 to keep the temporary directories of failed tests

Cleanup: every Mount registers itself; on exit (normal, exception, atexit, SIGTERM, SIGINT,
SIGHUP, watchdog timeout) each one stops its own digfs process by pid, unmounts whatever is
still mounted at its mount point (lazily if needed) and removes its temporary directory.
Only processes started here are ever signalled.
"""

import atexit
import ctypes
import errno
import hashlib
import inspect
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.abspath(os.environ.get("DIGFS_BIN") or os.path.join(REPO, "build", "digfs"))
WAIT = float(os.environ.get("DIGFS_TEST_WAIT", "90"))
FILE_TIMEOUT = float(os.environ.get("DIGFS_TEST_TIMEOUT", "540"))
KEEP = os.environ.get("DIGFS_TEST_KEEP") == "1"

SKIP_CODE = 77
LEAF = 16 * 1024
XATTR = "user.digfs.root"
EMPTY_ROOT = hashlib.sha256(b"").hexdigest()
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
# errnos accepted for "you may not write here" on by-hash/ (the spec allows either)
RO_ERRNOS = (errno.EACCES, errno.EROFS)


# --------------------------------------------------------------------------- failures

class TestFailure(AssertionError):
    """A check failed; the message says what was expected and what happened."""


class SkipTest(Exception):
    """The environment cannot run this test (e.g. no usable /dev/fuse)."""


def fail(msg):
    raise TestFailure(msg)


def check(cond, msg, *context):
    """Fails with @msg (and each item of @context on its own line) unless @cond."""
    if not cond:
        lines = [msg] + ["    " + _short(c) for c in context]
        raise TestFailure("\n".join(lines))


def check_eq(actual, expected, what):
    if actual != expected:
        raise TestFailure(f"{what}: expected {_short(expected)}, got {_short(actual)}")


def check_bytes(actual, expected, what):
    """Compares two byte strings; on mismatch reports lengths and the first differing offset."""
    if actual == expected:
        return
    n = min(len(actual), len(expected))
    first = next((i for i in range(n) if actual[i] != expected[i]), n)
    raise TestFailure(
        f"{what}: bytes differ: got {len(actual)} bytes, expected {len(expected)}; "
        f"first difference at offset {first} "
        f"(got {actual[first:first + 16].hex()!r}, expected {expected[first:first + 16].hex()!r})")


def expect_errno(errnos, func, *args, what=None, **kwargs):
    """Calls func(*args); it must raise OSError with an errno in @errnos. Returns the error."""
    if isinstance(errnos, int):
        errnos = (errnos,)
    what = what or f"{getattr(func, '__name__', func)}{_short(args)}"
    names = "/".join(errno.errorcode.get(e, str(e)) for e in errnos)
    try:
        result = func(*args, **kwargs)
    except OSError as e:
        if e.errno not in errnos:
            raise TestFailure(f"{what}: expected {names}, got "
                              f"{errno.errorcode.get(e.errno, e.errno)} ({e})") from None
        return e
    if isinstance(result, int) and func in (os.open,):
        os.close(result)
    raise TestFailure(f"{what}: expected {names}, but it succeeded (returned {_short(result)})")


def _short(v, limit=300):
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def wait_until(pred, what, timeout=None, interval=0.02):
    """Polls pred() until it returns a truthy value, which is returned. Fails after the
    deadline with @what and the last value / exception pred gave. Exceptions other than
    OSError propagate at once."""
    deadline = time.monotonic() + (timeout or WAIT)
    last = None
    delay = interval
    while True:
        try:
            v = pred()
            if v:
                return v
            last = v
        except OSError as e:
            last = e
        if time.monotonic() > deadline:
            raise TestFailure(f"timed out after {timeout or WAIT:.0f} s waiting for {what}; "
                              f"last result: {_short(last)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def exists_no_follow(path):
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False


def wait_enoent(path, what=None):
    """Waits until lstat(path) fails with ENOENT (other errors fail at once), then checks
    that open() fails with ENOENT too."""
    what = what or f"{path} to be gone (ENOENT)"

    def gone():
        try:
            os.lstat(path)
            return False
        except FileNotFoundError:
            return True
    wait_until(gone, what)
    expect_errno(errno.ENOENT, os.open, path, os.O_RDONLY, what=f"open({path})")


def wait_exists(path, what=None):
    return wait_until(lambda: os.lstat(path), what or f"{path} to exist")


# --------------------------------------------------------------------------- content

def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, bufsize=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class MerkleHasher:
    """Streaming BEP 52 root (an independent oracle, written here from the spec): SHA-256 of
    each 16 KiB block (the last one unpadded) as leaves, leaves padded with 32 zero bytes to a
    power of two, node = SHA-256(left || right). Up to 16 KiB (including empty): SHA-256 of
    the data."""

    def __init__(self):
        self.leaves = []
        self.pending = bytearray()
        self.length = 0

    def update(self, data):
        self.length += len(data)
        mv = memoryview(data)
        if self.pending:
            need = LEAF - len(self.pending)
            self.pending += mv[:need]
            mv = mv[need:]
            if len(self.pending) == LEAF:
                self.leaves.append(hashlib.sha256(self.pending).digest())
                self.pending = bytearray()
        n = len(mv) - len(mv) % LEAF
        for off in range(0, n, LEAF):
            self.leaves.append(hashlib.sha256(mv[off:off + LEAF]).digest())
        self.pending += mv[n:]

    def hexdigest(self):
        leaves = list(self.leaves)
        if self.pending or not leaves:
            leaves.append(hashlib.sha256(self.pending).digest())
        width = 1
        while width < len(leaves):
            width *= 2
        layer = leaves + [b"\0" * 32] * (width - len(leaves))
        while len(layer) > 1:
            layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest()
                     for i in range(0, len(layer), 2)]
        return layer[0].hex()


def merkle_root(data):
    h = MerkleHasher()
    h.update(data)
    return h.hexdigest()


def merkle_root_file(path):
    h = MerkleHasher()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def digfs_hash(path):
    """Root of @path as `digfs hash` prints it (`<root>  FILE`)."""
    r = subprocess.run([BIN, "hash", path], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=max(WAIT, 300))
    check(r.returncode == 0, f"`digfs hash {path}` exited {r.returncode}",
          f"stdout: {r.stdout}", f"stderr: {r.stderr}")
    line = r.stdout.rstrip("\n")
    m = re.fullmatch(r"([0-9a-f]{64})  (.*)", line)
    check(m is not None and m.group(2) == path,
          f"`digfs hash {path}` printed an unexpected line", f"stdout: {r.stdout!r}")
    return m.group(1)


def expected_root(path):
    """Expected root of the file at @path: the Python oracle, cross-checked with `digfs hash`."""
    mine = merkle_root_file(path)
    theirs = digfs_hash(path)
    check_eq(theirs, mine, f"`digfs hash {path}` vs the test's own BEP 52 root")
    return mine


def data_of(n, seed):
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def write_file(path, data, chunk=1 << 20, mode="wb"):
    with open(path, mode, buffering=0) as f:
        mv = memoryview(data)
        for off in range(0, len(mv), chunk):
            n = f.write(mv[off:off + chunk])
            check(n == len(mv[off:off + chunk]), f"short write to {path}: {n}")


def read_file(path):
    with open(path, "rb", buffering=0) as f:
        out = bytearray()
        while True:
            b = f.read(1 << 20)
            if not b:
                return bytes(out)
            out += b


def get_root_xattr(path):
    """The `user.digfs.root` value as str (None if the attribute is absent)."""
    try:
        return os.getxattr(path, XATTR).decode("ascii", "replace")
    except OSError as e:
        if e.errno in (errno.ENODATA,):
            return None
        raise


def wait_hashed(path, timeout=None):
    """Polls the xattr until it is a 64-hex root and returns it. While waiting only `hashing`
    (and, transiently, a missing attribute) is accepted; anything else fails at once."""
    deadline = time.monotonic() + (timeout or WAIT)
    seen = []
    delay = 0.01
    while True:
        v = get_root_xattr(path)
        if v is not None and HEX64.match(v):
            return v
        if v is not None and v != "hashing":
            fail(f"{XATTR} of {path} is {v!r}: expected 64 lowercase hex digits or 'hashing'")
        if not seen or seen[-1] != v:
            seen.append(v)
        if time.monotonic() > deadline:
            fail(f"{path} not hashed after {timeout or WAIT:.0f} s; xattr values seen: {seen}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# --------------------------------------------------------------------------- mounts

_registry = []           # every Mount created in this process
_registry_lock = threading.RLock()
_mounted_once = False    # some mount succeeded (so a later mount failure is not "no FUSE")
_ENV_FAILURE = re.compile(
    r"fuse: device not found|failed to open /dev/fuse|fusermount3?: .*(not permitted|"
    r"Permission denied)|fuse: mount failed: Operation not permitted", re.I)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def _child_setup():
    # digfs -f dies (SIGTERM: a clean unmount) if this test process is killed outright.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def mount_points():
    """Mount points in this namespace (from /proc/self/mountinfo, which also lists stale ones
    that stat() cannot see)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def mount_entry(path):
    """The /proc/self/mountinfo line of the topmost mount at @path, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mp == path:
                found = line.rstrip("\n")
    return found


def _pid_alive(pid):
    """True while @pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = st[st.rindex(")") + 2:].split()[0]
    return state not in ("Z", "X")


def find_digfs_pids(path, prefix=False):
    """pids of live digfs processes with @path as an argument (or, with @prefix, an argument
    inside the directory @path, e.g. in its -o value). The paths are in this test's own
    temporary directory, so nothing that belongs to anyone else matches."""
    pids = []
    me = os.path.basename(BIN).encode()
    p = path.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != me:
            continue
        if prefix:
            hit = any(p + b"/" in a for a in argv[1:])
        else:
            hit = p in argv[1:]
        if hit and _pid_alive(int(d)):
            pids.append(int(d))
    return pids


class Mount:
    """One digfs mount in its own temporary directory (mnt/, data/, cache/, digfs.log).

    The same Mount can be started, unmounted, killed and started again (same data_dir and
    cache_dir); the temporary directory lives until cleanup()."""

    def __init__(self, tag="t", opts=(), start=True, foreground=True):
        self.dir = tempfile.mkdtemp(prefix=f"digfs-{tag}-", dir="/tmp")
        self.dir = os.path.realpath(self.dir)
        self.mnt = os.path.join(self.dir, "mnt")
        self.data = os.path.join(self.dir, "data")
        self.cache = os.path.join(self.dir, "cache")
        for d in (self.mnt, self.data, self.cache):
            os.mkdir(d)
        self.log_path = os.path.join(self.dir, "digfs.log")
        open(self.log_path, "w").close()
        self.proc = None        # Popen of a foreground digfs
        self.pid = None         # pid of the running digfs (foreground or daemon)
        self.starts = 0
        self.persistent = False
        self.cleaned = False
        self._final_log = None
        self.log_size_at_cleanup = 0
        self._lock = threading.RLock()
        with _registry_lock:
            _registry.append(self)
        if start:
            self.start(opts, foreground=foreground)

    # ---- paths
    def shared(self, rel=""):
        return os.path.join(self.mnt, "shared", rel) if rel else os.path.join(self.mnt, "shared")

    def by_hash(self, root=""):
        return os.path.join(self.mnt, "by-hash", root) if root else os.path.join(self.mnt, "by-hash")

    def by_name(self, rel=""):
        return os.path.join(self.mnt, "by-name", rel) if rel else os.path.join(self.mnt, "by-name")

    def backing(self, rel=""):
        return os.path.join(self.data, "shared", rel) if rel else os.path.join(self.data, "shared")

    # ---- lifecycle
    def option_string(self, opts=(), dirs=True):
        """The -o string: our directories (unless dirs=False), @opts, and, unless @opts names
        a bootstrap or offline, bootstrap=none, lsd=no, upnp=no and natpmp=no: no test ever lets digfs reach the public DHT
        routers (the network-safety rule), even inside run-all.sh's isolated namespace."""
        own = [f"data_dir={self.data}", f"cache_dir={self.cache}"] if dirs else []
        if not any(o.startswith("bootstrap=") or o == "offline" for o in opts):
            own.append("bootstrap=none")
        for name in ("lsd", "upnp", "natpmp"):
            if not any(o.startswith(name + "=") or o == "offline" for o in opts):
                own.append(name + "=no")
        return ",".join([*own, *opts])

    def command(self, opts=(), foreground=True, extra_args=(), dirs=True, flags=None):
        cmd = [BIN, self.mnt]
        if flags is not None:
            cmd += flags
        elif foreground:
            cmd.append("-f")
        o = self.option_string(opts, dirs)
        return cmd + (["-o", o] if o else []) + list(extra_args)

    def _log(self, text):
        with open(self.log_path, "a") as f:
            f.write(text)

    def start(self, opts=(), foreground=True, wait=True, extra_args=(), dirs=True, env=None,
              flags=None):
        """Starts digfs (and by default waits until it is mounted). dirs=False leaves out
        data_dir/cache_dir (digfs uses its defaults: pass @env with XDG_* inside self.dir).
        flags replaces the "-f" after the mount point (the process is still treated as one
        that stays in the foreground)."""
        global _mounted_once
        check(not self.alive(), "start(): digfs is already running for this Mount")
        cmd = self.command(opts, foreground, extra_args, dirs, flags)
        self.starts += 1
        self._log(f"\n=== start {self.starts}: {' '.join(cmd)}\n")
        logf = open(self.log_path, "ab")
        try:
            if foreground:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=logf, preexec_fn=_child_setup, env=env)
                self.pid = self.proc.pid
            else:
                self.proc = None
                self.pid = None
                launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=logf, env=env)
                try:
                    rc = launcher.wait(timeout=WAIT)
                except subprocess.TimeoutExpired:
                    launcher.kill()
                    launcher.wait()
                    self._adopt_daemon()
                    fail(f"`digfs` without -f did not return within {WAIT:.0f} s")
                self._adopt_daemon()
                if rc != 0:
                    self._maybe_skip()
                    fail(f"`digfs` (daemon mode) exited {rc}")
                if wait:
                    # it returned: the mount must be there now, without polling
                    check(self.mounted_and_ready(),
                          "daemon-mode digfs returned 0 but the mount is not ready",
                          f"mountinfo: {mount_entry(self.mnt)}")
                    _mounted_once = True
                return None
        finally:
            logf.close()
        if wait:
            self.wait_mounted()
        return self.proc

    def _adopt_daemon(self):
        pids = find_digfs_pids(self.mnt)
        if len(pids) == 1:
            self.pid = pids[0]
        elif pids:
            self.pid = max(pids)

    def _probe(self):
        try:
            return os.path.ismount(self.mnt) and "shared" in os.listdir(self.mnt)
        except OSError:
            return False

    def mounted_and_ready(self, timeout=None):
        """True once the mount answers and lists shared/. The probe runs in a helper thread:
        if digfs hangs (a FUSE request nobody answers), this fails after @timeout with the
        kernel stacks of digfs's threads instead of blocking the test forever."""
        if mount_entry(self.mnt) is None:
            return False
        result = []
        t = threading.Thread(target=lambda: result.append(self._probe()), daemon=True)
        t.start()
        t.join(timeout or WAIT)
        if t.is_alive():
            fail(f"{self.mnt} is mounted but does not answer within {timeout or WAIT:.0f} s "
                 f"(digfs hangs)\n{self.kernel_stacks()}")
        return result[0]

    def kernel_stacks(self):
        """Where each thread of our digfs process waits in the kernel (root only)."""
        pids = {self.pid} if self.pid else set()
        pids.update(find_digfs_pids(self.dir, prefix=True))
        out = []
        for pid in sorted(p for p in pids if p):
            try:
                for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                    try:
                        with open(f"/proc/{pid}/task/{tid}/stack") as f:
                            frames = [ln.split("] ")[-1].split("+")[0]
                                      for ln in f.read().split("\n") if ln]
                    except OSError:
                        frames = ["(stack unreadable)"]
                    out.append(f"  pid {pid} tid {tid}: {' <- '.join(frames[:6])}")
            except OSError:
                continue
        return "kernel stacks of digfs:\n" + ("\n".join(out) if out else "  (none)")

    def wait_mounted(self, timeout=None):
        global _mounted_once
        deadline = time.monotonic() + (timeout or WAIT)
        delay = 0.01
        while not self.mounted_and_ready(timeout=max(1.0, deadline - time.monotonic())):
            if self.proc is not None and self.proc.poll() is not None:
                rc = self.proc.returncode
                self._maybe_skip()
                fail(f"digfs exited with {rc} before the mount was ready")
            if time.monotonic() > deadline:
                fail(f"mount not ready after {timeout or WAIT:.0f} s "
                     f"(mountinfo: {mount_entry(self.mnt)})")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        _mounted_once = True

    def _maybe_skip(self):
        if not _mounted_once:
            with open(self.log_path, errors="replace") as f:
                log = f.read()
            if _ENV_FAILURE.search(log):
                raise SkipTest("cannot mount FUSE here: " + _ENV_FAILURE.search(log).group(0))

    def alive(self):
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def wait_exit(self, timeout=None):
        """Waits for the digfs process to exit; returns its exit code (None for a daemon,
        whose status only its parent can see). Fails after the deadline."""
        timeout = timeout or WAIT
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                fail(f"digfs (pid {self.pid}) still running {timeout:.0f} s later\n"
                     + self.kernel_stacks())
        if self.pid is not None:
            wait_until(lambda: not _pid_alive(self.pid), f"daemon digfs pid {self.pid} to exit",
                       timeout)
        return None

    def unmount(self, timeout=None):
        """fusermount3 -u, then waits for digfs to exit. Returns its exit code."""
        deadline = time.monotonic() + (timeout or WAIT)
        while True:
            r = subprocess.run(["fusermount3", "-u", self.mnt], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout or WAIT)
            if r.returncode == 0:
                break
            if "busy" not in r.stderr.lower() or time.monotonic() > deadline:
                fail(f"fusermount3 -u {self.mnt} failed ({r.returncode}): {r.stderr.strip()}")
            time.sleep(0.2)
        rc = self.wait_exit(max(1.0, deadline - time.monotonic()))
        check(mount_entry(self.mnt) is None, "mount still listed after unmount",
              mount_entry(self.mnt))
        return rc

    def send_signal(self, sig):
        check(self.pid is not None and self.alive(), "send_signal: digfs is not running")
        os.kill(self.pid, sig)

    def kill9(self):
        """SIGKILL to our digfs process; leaves the (now stale) mount in place."""
        check(self.pid is not None and self.alive(), "kill9: digfs is not running")
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=WAIT)
        else:
            wait_until(lambda: not _pid_alive(self.pid), f"pid {self.pid} to die")
        self._log(f"=== killed pid {self.pid} with SIGKILL\n")

    def _stop_hard(self):
        """Kills our digfs process (if still alive) without waiting for a clean exit."""
        pids = set()
        if self.pid is not None and self.alive():
            pids.add(self.pid)
        pids.update(find_digfs_pids(self.dir, prefix=True))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self):
        """Idempotent: stop digfs, unmount anything at mnt, remove the temporary directory."""
        global _in_cleanup
        with self._lock:
            if self.cleaned:
                return
            self.cleaned = True
            _in_cleanup += 1
            try:
                pids = set(find_digfs_pids(self.dir, prefix=True))
                if self.pid is not None and self.alive():
                    pids.add(self.pid)
                if pids and mount_entry(self.mnt) is not None:
                    # polite first: a clean unmount lets digfs exit on its own
                    r = subprocess.run(["fusermount3", "-u", self.mnt],
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
                    end = time.monotonic() + (10 if r.returncode == 0 else 0)
                    while time.monotonic() < end and any(_pid_alive(p) for p in pids):
                        time.sleep(0.05)
                for pid in pids:
                    if _pid_alive(pid):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                if self.proc is not None:
                    try:
                        self.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
                for _ in range(5):
                    ours = sorted((mp for mp in mount_points()
                                   if mp == self.dir or mp.startswith(self.dir + "/")),
                                  key=len, reverse=True)
                    if not ours:
                        break
                    for mp in ours:
                        r = subprocess.run(["fusermount3", "-u", "-z", mp],
                                           stdin=subprocess.DEVNULL, capture_output=True,
                                           timeout=30)
                        if r.returncode != 0:
                            subprocess.run(["umount", "-l", mp], stdin=subprocess.DEVNULL,
                                           capture_output=True, timeout=30)
                try:  # keep the log for failure reports; the directory goes below
                    with open(self.log_path, "rb") as f:
                        f.seek(max(0, os.path.getsize(self.log_path) - (1 << 20)))
                        self._final_log = f.read()
                    self.log_size_at_cleanup = os.path.getsize(self.log_path)
                except OSError:
                    pass
                leftover = [mp for mp in mount_points()
                            if mp == self.dir or mp.startswith(self.dir + "/")]
                if leftover:
                    sys.stderr.write(f"digfs_test: NOT removing {self.dir}: still mounted "
                                     f"{leftover}\n")
                elif KEEP and getattr(self, "failed", False):
                    sys.stderr.write(f"digfs_test: kept {self.dir}\n")
                else:
                    shutil.rmtree(self.dir, ignore_errors=True)
            except Exception as e:  # cleanup must never raise
                sys.stderr.write(f"digfs_test: cleanup of {self.dir} failed: {e!r}\n")
            finally:
                _in_cleanup -= 1

    def log_text(self, since=0):
        """The log from byte @since (also after cleanup removed the file)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            pass
        if self._final_log is not None:
            full = self._final_log
            return full[max(0, since - (self.log_size_at_cleanup - len(full))):].decode(
                "utf-8", "replace")
        return None

    def log_tail(self, lines=60, since=0):
        text = self.log_text(since)
        if text is None:
            return f"(no log at {self.log_path})"
        tail = text.splitlines()[-lines:]
        return f"--- digfs log {self.log_path} (last {len(tail)} lines) ---\n" + \
            "\n".join(tail) + "\n--- end of log ---"

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return self.log_size_at_cleanup

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


def cleanup_all(force=False):
    with _registry_lock:
        mounts = list(_registry)
    for m in mounts:
        if force:
            m._stop_hard()
        m.cleanup()


atexit.register(cleanup_all)

_shared = {}


def shared_mount(opts=()):
    """A mount shared by the tests of one file (restarted if a test left it dead)."""
    key = tuple(opts)
    m = _shared.get(key)
    if m is not None and m.alive() and m.mounted_and_ready():
        return m
    if m is not None:
        sys.stdout.write("note: the shared mount died; starting a fresh one\n")
        m.cleanup()
    m = Mount("shared", opts)
    m.persistent = True
    _shared[key] = m
    return m


def share(m, rel, data):
    """Writes @data to shared/@rel through the mount, waits for the root and checks it
    against the oracle. Returns the root."""
    path = m.shared(rel)
    write_file(path, data)
    root = wait_hashed(path)
    check_eq(root, merkle_root(data), f"root of shared/{rel} ({len(data)} bytes)")
    return root


def status_json(m):
    """`digfs status --json` of mount @m, parsed."""
    import json
    r = subprocess.run([BIN, "status", "--json", m.mnt], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    check_eq(r.returncode, 0, f"digfs status --json {m.mnt} exit status ({r.stderr.strip()})")
    return json.loads(r.stdout)


def swarm_of(m, root):
    """The swarm of @root (hex) in mount @m's `digfs status --json`, or {} if it has none."""
    for s in status_json(m)["swarms"]:
        if s["root"] == root:
            return s
    return {}


def read_range(path, off, length):
    """@length bytes of @path from @off (fewer at the end of the file), unbuffered."""
    with open(path, "rb", buffering=0) as f:
        f.seek(off)
        out = b""
        while len(out) < length:
            chunk = f.read(length - len(out))
            if not chunk:
                break
            out += chunk
        return out


def free_port():
    """A port number free for both TCP and UDP on this machine right now (for port=)."""
    import socket
    for _ in range(50):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("0.0.0.0", 0))
            port = t.getsockname()[1]
            u.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    fail("no free port for TCP and UDP")


def by_name_target(rel, root):
    """Expected symlink target of by-name/@rel."""
    depth = rel.count("/")
    return "../" * (depth + 1) + "by-hash/" + root


# --------------------------------------------------------------------------- runner

class _Interrupted(KeyboardInterrupt):
    pass


_main_done = threading.Event()
_timed_out = threading.Event()


_in_cleanup = 0
_in_test = False
_pending_signal = None


def _on_signal(signum, frame):
    global _pending_signal
    if _in_cleanup or not _in_test:
        _pending_signal = signum  # finish reporting/cleaning up first; main() exits 1
        return
    raise _Interrupted(f"signal {signum}")


def _watchdog(wake_r, deadline):
    """Runs beside the tests. If the file's deadline passes, or a signal arrives and the main
    thread does not finish soon (it may be blocked in a syscall on a hung mount), kills our
    digfs processes, which aborts their FUSE connections and unblocks the main thread; if
    the main thread still does not finish, cleans up and exits."""
    kill_at = None   # when to SIGKILL our digfs processes
    exit_at = None   # when to give up on the main thread
    killed = False
    while not _main_done.is_set():
        now = time.monotonic()
        if kill_at is None and now > deadline:
            sys.stdout.write(f"WATCHDOG: test file exceeded {FILE_TIMEOUT:.0f} s; killing "
                             "its digfs processes\n")
            sys.stdout.flush()
            kill_at, exit_at = now, now + 30
            _timed_out.set()
        if not killed and kill_at is not None and now >= kill_at:
            killed = True
            for m in list(_registry):
                m._stop_hard()
            if _timed_out.is_set():
                # wake the main thread (EINTR) so that it fails the running test and cleans up
                try:
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                except (OSError, ValueError):
                    pass
        if exit_at is not None and now >= exit_at:
            sys.stdout.write("WATCHDOG: main thread stuck; cleaning up and exiting\n")
            sys.stdout.flush()
            cleanup_all(force=True)
            os._exit(1)
        try:
            ready, _, _ = select.select([wake_r], [], [], 0.5)
        except (OSError, ValueError):
            ready = []
        if ready:
            try:
                os.read(wake_r, 64)
            except OSError:
                pass
            if kill_at is None:  # a signal: the main thread gets 5 s to clean up by itself
                kill_at, exit_at = time.monotonic() + 5, time.monotonic() + 40


_SANITIZER = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                        r"WARNING: ThreadSanitizer|ERROR: UndefinedBehaviorSanitizer")


def _sanitizer_report(before, offsets):
    """A TestFailure if a digfs log written during the test holds a sanitizer report (a
    process that was killed, or that kept running, never shows it in its exit status)."""
    with _registry_lock:
        mounts = list(_registry)
    for i, m in enumerate(mounts):
        if i < before and not m.persistent:
            continue
        text = m.log_text(offsets.get(id(m), 0))
        if text is None:
            continue
        hit = _SANITIZER.search(text)
        if hit:
            return TestFailure(f"sanitizer report in {m.log_path}: {hit.group(0)!r}")
    return None


def require_environment():
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        print(f"FAIL: digfs binary not found or not executable: {BIN} (set DIGFS_BIN)")
        sys.exit(1)
    if shutil.which("fusermount3") is None:
        print("SKIP: fusermount3 not installed")
        sys.exit(SKIP_CODE)
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        print(f"SKIP: /dev/fuse unusable: {e}")
        sys.exit(SKIP_CODE)


def main(namespace=None):
    """Runs the test_* functions of the calling module in source order and exits."""
    if namespace is None:
        namespace = inspect.stack()[1].frame.f_globals
    tests = [f for n, f in namespace.items()
             if n.startswith("test_") and inspect.isfunction(f)
             and f.__module__ == namespace.get("__name__")]
    tests.sort(key=lambda f: f.__code__.co_firstlineno)
    wanted = sys.argv[1:]
    if wanted:
        unknown = set(wanted) - {f.__name__ for f in tests}
        if unknown:
            print(f"unknown tests: {sorted(unknown)}")
            sys.exit(2)
        tests = [f for f in tests if f.__name__ in wanted]

    sys.stdout.reconfigure(line_buffering=True)
    require_environment()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)
    threading.Thread(target=_watchdog, args=(wake_r, time.monotonic() + FILE_TIMEOUT),
                     daemon=True, name="watchdog").start()

    global _in_test
    passed, failed, skipped = [], [], []
    t_file = time.monotonic()
    stop = None
    try:
        for t in tests:
            name = t.__name__
            if stop is not None:
                print(f"NOT RUN {name} ({stop})")
                failed.append(name)
                continue
            with _registry_lock:
                before = len(_registry)
                offsets = {id(m): m.log_size() for m in _registry}
            t0 = time.monotonic()
            error = None
            try:
                _in_test = True
                try:
                    t()
                finally:
                    _in_test = False  # from here on a signal is only recorded
            except SkipTest as e:
                skipped.append(name)
                print(f"SKIP {name}: {e}")
            except BaseException as e:  # report everything, keep going
                error = e
                tb = traceback.format_exc()
            else:
                tb = ""
                if _timed_out.is_set():
                    error = TestFailure("finished only after the watchdog fired")
                else:
                    error = _sanitizer_report(before, offsets)
                if error is None:
                    passed.append(name)
                    print(f"PASS {name} ({time.monotonic() - t0:.1f} s)")
            if error is not None:
                failed.append(name)
                if _timed_out.is_set():
                    reason = (f"WATCHDOG: the test file exceeded {FILE_TIMEOUT:.0f} s "
                              f"(DIGFS_TEST_TIMEOUT); its digfs processes were killed "
                              f"[{type(error).__name__}: {error}]")
                    stop = "stopped after the watchdog fired"
                elif isinstance(error, _Interrupted):
                    reason = f"interrupted by {error}"
                    stop = f"interrupted by {error}"
                elif isinstance(error, TestFailure):
                    reason = str(error)
                else:
                    reason = f"{type(error).__name__}: {error}"
                print(f"FAIL {name}: {reason}")
                print("    " + tb.replace("\n", "\n    "))
                with _registry_lock:
                    involved = list(_registry[before:]) + \
                        [m for m in _registry[:before] if m.persistent and not m.cleaned]
                for m in involved:
                    m.failed = True
                    print(m.log_tail(80, since=offsets.get(id(m), 0)))
            with _registry_lock:
                created = [m for m in _registry[before:] if not m.persistent]
            for m in created:
                m.cleanup()
            if stop is None and _pending_signal is not None:
                stop = f"signal {_pending_signal}"
    finally:
        cleanup_all()
        _main_done.set()

    total = time.monotonic() - t_file
    print(f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"in {total:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed or stop is not None or _pending_signal is not None:
        sys.exit(1)
    if skipped and not passed:
        sys.exit(SKIP_CODE)
    sys.exit(0)
