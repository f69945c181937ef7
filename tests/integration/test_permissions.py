"""Who may do what: with allow_other, other local users read by-hash/ and by-name/ but cannot
change shared/; without it they cannot enter the mount at all (default_permissions is on)."""

import errno
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

NOBODY = 65534

# Runs as another user: tries each operation and prints {name: errno or 0 or sha256}.
PROBE = r"""
import hashlib, json, os, sys
mnt, root, name = sys.argv[1:4]
out = {}
def attempt(key, fn):
    try:
        r = fn()
        out[key] = r if r is not None else 0
    except OSError as e:
        out[key] = e.errno
def read(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
def create(path):
    with open(path, "xb") as f:
        f.write(b"intruder")
def append(path):
    with open(path, "ab") as f:
        f.write(b"intruder")
attempt("list_root", lambda: len(os.listdir(mnt)))
attempt("read_by_hash", lambda: read(os.path.join(mnt, "by-hash", root)))
attempt("read_by_name", lambda: read(os.path.join(mnt, "by-name", name)))
attempt("read_shared", lambda: read(os.path.join(mnt, "shared", name)))
attempt("create_shared", lambda: create(os.path.join(mnt, "shared", "new.bin")))
attempt("append_shared", lambda: append(os.path.join(mnt, "shared", name)))
attempt("mkdir_shared", lambda: os.mkdir(os.path.join(mnt, "shared", "newdir")))
attempt("unlink_shared", lambda: os.unlink(os.path.join(mnt, "shared", name)))
attempt("rename_shared", lambda: os.rename(os.path.join(mnt, "shared", name),
                                           os.path.join(mnt, "shared", "moved.bin")))
print(json.dumps(out))
"""


def as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def probe(m, root, name):
    r = subprocess.run([sys.executable, "-c", PROBE, m.mnt, root, name], preexec_fn=as_nobody,
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, f"probe as nobody failed: {r.stderr}")
    return json.loads(r.stdout)


def require_root():
    if os.geteuid() != 0:
        raise T.SkipTest("needs root to switch to another user")


def open_up(m):
    # mkdtemp makes 0700 directories; the other user must be able to reach the mount point.
    os.chmod(m.dir, 0o755)


def test_allow_other_reads_but_cannot_write():
    require_root()
    m = T.Mount("perm", opts=["allow_other"])
    open_up(m)
    data = T.data_of(50000, 21)
    root = T.share(m, "file.bin", data)
    T.wait_exists(m.by_name("file.bin"))
    got = probe(m, root, "file.bin")
    digest = T.sha256_bytes(data)
    check_eq(got["read_by_hash"], digest, "another user reading by-hash/")
    check_eq(got["read_by_name"], digest, "another user reading by-name/")
    check_eq(got["read_shared"], digest, "another user reading shared/ (mode 0644)")
    for op in ("create_shared", "append_shared", "mkdir_shared", "unlink_shared",
               "rename_shared"):
        check_eq(got[op], errno.EACCES, f"another user: {op}")
    # Nothing changed behind the owner's back.
    check_eq(T.read_file(m.shared("file.bin")), data, "shared/file.bin after the attempts")
    check(not os.path.exists(m.backing("new.bin")), "another user created a file in shared/")
    check_eq(T.wait_hashed(m.shared("file.bin")), root, "root after the attempts")


def test_other_users_locked_out_without_allow_other():
    require_root()
    m = T.shared_mount()
    open_up(m)
    data = T.data_of(1000, 22)
    root = T.share(m, "f.bin", data)
    got = probe(m, root, "f.bin")
    check_eq(got["list_root"], errno.EACCES, "another user listing a mount without allow_other")
    check_eq(got["read_by_hash"], errno.EACCES, "another user reading without allow_other")


if __name__ == "__main__":
    T.main()
