"""A full disk under the data dir: writers get ENOSPC, nothing already shared is lost, the
mount keeps working, and files that could not be recorded are recorded once space returns
(without anyone looking at them)."""

import errno
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

EMPTY_ROOT = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def small_disk_mount(size_mib):
    if os.geteuid() != 0:
        raise T.SkipTest("needs root to mount a small tmpfs as the data dir")
    m = T.Mount("full", start=False)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", m.data],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise T.SkipTest(f"cannot mount a tmpfs: {r.stderr.strip()}")
    m.start()
    return m


def fill_behind(m, name="filler"):
    """Fills the data dir's file system completely, bypassing the mount."""
    path = os.path.join(m.data, name)
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            check_eq(e.errno, errno.ENOSPC, "filling the disk")
    return path


def test_writer_gets_enospc_and_nothing_is_lost():
    m = small_disk_mount(24)
    data = T.data_of(30000, 41)
    root = T.share(m, "keep.bin", data)
    big = m.shared("big.bin")
    err = None
    try:
        with open(big, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
    except OSError as e:
        err = e.errno
    check_eq(err, errno.ENOSPC, "writing 64 MiB into a 24 MiB data dir")
    # The mount is healthy and what was shared before is intact.
    check_eq(T.read_file(m.by_hash(root)), data, "by-hash/ of a file shared before")
    check_eq(T.read_file(m.by_name("keep.bin")), data, "by-name/ of a file shared before")
    check("keep.bin" in os.listdir(m.shared()), "shared/ lists the old file")
    os.unlink(big)
    # Once the kernel forgets the deleted file, its space is back (well under a second).
    T.wait_until(lambda: os.statvfs(m.data).f_bavail * os.statvfs(m.data).f_frsize > 8 << 20,
                 "space back after deleting the big file")
    again = T.data_of(5000, 42)
    check_eq(T.share(m, "after.bin", again), T.merkle_root(again), "root of a file written after")


def test_index_full_then_space_returns():
    m = small_disk_mount(24)
    filler = fill_behind(m)
    # An empty file needs no data blocks but its root needs index pages: recording it fails.
    open(m.shared("stuck"), "wb").close()
    time.sleep(1.5)
    check(EMPTY_ROOT not in os.listdir(m.by_hash()), "a root was recorded on a full disk?")
    os.unlink(filler)
    # Nobody looks at the file (no xattr, no lookup): the engine retries on its own.
    T.wait_until(lambda: EMPTY_ROOT in os.listdir(m.by_hash()),
                 "the empty file's root recorded after space returned")
    check_eq(T.get_root_xattr(m.shared("stuck")), EMPTY_ROOT, "root of the stuck file")


if __name__ == "__main__":
    T.main()
