"""Persistence: unmount/remount, kill -9 with the stale mount recovered by digfs itself, and
files changed in data_dir while digfs was not running."""

import errno
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402


def populate(m, tag):
    """Shares a handful of files (edge sizes, a subdirectory); returns {rel: (data, root)}."""
    os.makedirs(m.shared(f"{tag}/sub"), exist_ok=True)
    files = {f"{tag}/empty": b"", f"{tag}/one": b"1", f"{tag}/leaf": T.data_of(16384, 1),
             f"{tag}/sub/two-leaves": T.data_of(16385, 2),
             f"{tag}/sub/big": T.data_of(2 * 1024 * 1024 + 3, 3)}
    for rel, data in files.items():
        T.write_file(m.shared(rel), data)
    out = {}
    for rel, data in files.items():
        root = T.wait_hashed(m.shared(rel))
        check_eq(root, T.merkle_root(data), f"root of shared/{rel}")
        T.wait_exists(m.by_name(rel))
        out[rel] = (data, root)
    return out


def check_served(m, files, what, immediately=True):
    """Every file's root is listed and read byte-exact via by-hash/ and by-name/."""
    roots = {root for _, root in files.values()}
    listed = set(os.listdir(m.by_hash()))
    if immediately and not roots <= listed:
        missing = sorted(roots - listed)
        t0 = time.monotonic()
        try:
            T.wait_until(lambda: roots <= set(os.listdir(m.by_hash())), "roots to be listed")
            late = f"they appeared {time.monotonic() - t0:.1f} s later"
        except T.TestFailure:
            late = "they never appeared"
        T.fail(f"{what}: by-hash/ lacked {len(missing)} root(s) once mounted ({late}): {missing}")
    elif not immediately:
        T.wait_until(lambda: roots <= set(os.listdir(m.by_hash())), f"{what}: roots listed")
    for rel, (data, root) in files.items():
        check_bytes(T.read_file(m.by_hash(root)), data, f"{what}: by-hash/<root of {rel}>")
        T.wait_until(lambda: os.readlink(m.by_name(rel)) == T.by_name_target(rel, root),
                     f"{what}: by-name/{rel} -> {root}")
        check_bytes(T.read_file(m.by_name(rel)), data, f"{what}: by-name/{rel}")
        check_eq(T.wait_hashed(m.shared(rel)), root, f"{what}: xattr of shared/{rel}")


def test_unmount_remount():
    with T.Mount("remount") as m:
        files = populate(m, "r")
        before = set(os.listdir(m.by_hash()))
        check_eq(m.unmount(), 0, "exit status after fusermount3 -u")
        m.start()
        check_eq(set(os.listdir(m.by_hash())), before, "by-hash/ listing after remount")
        check_served(m, files, "after remount")
        # and a second cycle, after more changes
        more = populate(m, "r2")
        os.unlink(m.shared("r/one"))
        T.wait_enoent(m.by_name("r/one"))
        del files["r/one"]
        files.update(more)
        check_eq(m.unmount(), 0, "exit status after the second fusermount3 -u")
        m.start()
        check_served(m, files, "after the second remount")
        check(not os.path.lexists(m.by_name("r/one")), "deleted file back in by-name/ after remount")
        check_eq(m.unmount(), 0, "exit status of the last unmount")


def test_kill9_stale_mount_recovered():
    with T.Mount("kill9") as m:
        files = populate(m, "k")
        m.kill9()
        check(T.mount_entry(m.mnt) is not None, "the killed digfs's mount vanished by itself")
        try:
            os.stat(m.mnt)
            stale = "stat() succeeded"
        except OSError as e:
            stale = e.errno
        check_eq(stale, errno.ENOTCONN, "stat of the mount point after kill -9 (test setup)")
        m.start()  # same mount point, nobody unmounted the stale mount
        check_served(m, files, "after kill -9 and restart")
        more = populate(m, "k2")
        check_eq(m.unmount(), 0, "exit status of the restarted digfs")
        check(T.mount_entry(m.mnt) is None, "a mount is left at the mount point",
              T.mount_entry(m.mnt))
        files.update(more)
        m.start()
        check_served(m, files, "after a clean remount")
        check_eq(m.unmount(), 0, "exit status")


def test_kill9_after_the_mount_point_was_looked_at():
    """After `ls` of the mount point the kernel has its attributes cached, so stat() still
    succeeds on the dead mount after kill -9: the restart must still see that the mount is
    stale (it asks with statfs) and recover it, not refuse it as a live digfs."""
    with T.Mount("kill9ls") as m:
        files = populate(m, "s")
        # What a user does: coreutils ls and stat fill the kernel's attribute cache.
        subprocess.run(["ls", "-la", m.mnt], capture_output=True, check=True, timeout=60)
        subprocess.run(["stat", m.mnt], capture_output=True, check=True, timeout=60)
        m.kill9()
        m.start()
        check_served(m, files, "after kill -9 of a looked-at mount and restart")
        check_eq(m.unmount(), 0, "exit status of the restarted digfs")


def test_kill9_while_hashing():
    """kill -9 right after files were written (hashing maybe half done): after restart they
    are hashed to the right roots and nothing wrong is served."""
    with T.Mount("kill9h") as m:
        files = {f"h{i}.bin": T.data_of(8 * 1024 * 1024 + i, 50 + i) for i in range(4)}
        for rel, data in files.items():
            T.write_file(m.shared(rel), data)
        m.kill9()
        m.start()
        for rel, data in files.items():
            root = T.wait_hashed(m.shared(rel))
            check_eq(root, T.merkle_root(data), f"root of shared/{rel} after kill -9 + restart")
            check_bytes(T.read_file(m.by_hash(root)), data, f"by-hash/<root of {rel}>")
            T.wait_until(lambda: os.readlink(m.by_name(rel)) == T.by_name_target(rel, root),
                         f"by-name/{rel}")
        check_eq(m.unmount(), 0, "exit status")


def must_not_serve(m, root, old, what):
    """by-hash/<root> must be ENOENT: the bytes behind it changed."""
    try:
        fd = os.open(m.by_hash(root), os.O_RDONLY)
    except OSError as e:
        check_eq(errno.errorcode.get(e.errno), "ENOENT", f"{what}: open of the stale root")
        return
    try:
        got = b""
        try:
            got = os.pread(fd, len(old) + 1, 0)
        except OSError as e:
            T.fail(f"{what}: by-hash/<stale root> opened (then read failed with {e}); "
                   "expected ENOENT at lookup")
        check(got == old, f"{what}: by-hash/<stale root> SERVED WRONG BYTES "
              f"({len(got)} bytes, expected ENOENT)")
        T.fail(f"{what}: by-hash/<stale root> still opened and read; expected ENOENT")
    finally:
        os.close(fd)


def test_changed_while_stopped():
    with T.Mount("offline") as m:
        d_app = T.data_of(100000, 60)
        d_same = T.data_of(3 * T.LEAF, 61)
        d_keep = T.data_of(5000, 62)
        d_del = T.data_of(7000, 63)
        r_app = T.share(m, "app.bin", d_app)
        r_same = T.share(m, "same.bin", d_same)
        r_keep = T.share(m, "keep.bin", d_keep)
        r_del = T.share(m, "del.bin", d_del)
        check_eq(m.unmount(), 0, "exit status")

        extra = b"appended while digfs was down\n"
        with open(m.backing("app.bin"), "ab") as f:
            f.write(extra)
        new_same = bytearray(d_same)
        new_same[2 * T.LEAF + 100] ^= 0x55
        with open(m.backing("same.bin"), "r+b") as f:
            f.seek(2 * T.LEAF + 100)
            f.write(new_same[2 * T.LEAF + 100:2 * T.LEAF + 101])
        os.unlink(m.backing("del.bin"))
        d_new = T.data_of(40000, 64)
        with open(m.backing("added.bin"), "wb") as f:
            f.write(d_new)

        m.start()
        must_not_serve(m, r_app, d_app, "appended behind digfs's back")
        must_not_serve(m, r_same, d_same, "changed in place behind digfs's back")
        want = {"app.bin": d_app + extra, "same.bin": bytes(new_same), "added.bin": d_new,
                "keep.bin": d_keep}
        for rel, data in want.items():
            root = T.wait_hashed(m.shared(rel))
            check_eq(root, T.merkle_root(data), f"root of shared/{rel} after restart")
            check_eq(T.digfs_hash(m.backing(rel)), root, f"`digfs hash` of data/shared/{rel}")
            check_bytes(T.read_file(m.by_hash(root)), data, f"by-hash/<new root of {rel}>")
            T.wait_until(lambda: os.readlink(m.by_name(rel)) == T.by_name_target(rel, root),
                         f"by-name/{rel} -> new root")
        check_eq(T.wait_hashed(m.shared("keep.bin")), r_keep, "unchanged file keeps its root")
        for root, what in ((r_app, "app.bin"), (r_same, "same.bin"), (r_del, "del.bin")):
            T.wait_enoent(m.by_hash(root), f"old root of {what} to be gone")
            check(root not in os.listdir(m.by_hash()), f"old root of {what} still listed")
        T.wait_enoent(m.by_name("del.bin"), "by-name/del.bin (deleted while down)")
        check_eq(m.unmount(), 0, "exit status")


def test_changed_while_stopped_same_mtime():
    """Changes that keep size and mtime (touch -r after an in-place edit; rsync -t replacing
    the file by a new inode) are detected too: never served under the old root."""
    with T.Mount("offline2") as m:
        d_a = T.data_of(50000, 70)
        d_b = T.data_of(50000, 71)
        r_a = T.share(m, "a.bin", d_a)
        r_b = T.share(m, "b.bin", d_b)
        check_eq(m.unmount(), 0, "exit status")
        st_a = os.stat(m.backing("a.bin"))
        st_b = os.stat(m.backing("b.bin"))
        new_a = bytearray(d_a)
        new_a[10] ^= 1
        with open(m.backing("a.bin"), "r+b") as f:
            f.seek(10)
            f.write(new_a[10:11])
        os.utime(m.backing("a.bin"), ns=(st_a.st_atime_ns, st_a.st_mtime_ns))
        new_b = bytearray(d_b)
        new_b[-1] ^= 1
        tmp = m.backing(".b.bin.tmp")
        with open(tmp, "wb") as f:
            f.write(new_b)
        os.utime(tmp, ns=(st_b.st_atime_ns, st_b.st_mtime_ns))
        os.rename(tmp, m.backing("b.bin"))
        m.start()
        must_not_serve(m, r_a, d_a, "in-place edit with mtime restored")
        must_not_serve(m, r_b, d_b, "replaced by a new inode with the same size and mtime")
        for rel, data in (("a.bin", bytes(new_a)), ("b.bin", bytes(new_b))):
            check_eq(T.wait_hashed(m.shared(rel)), T.merkle_root(data), f"root of {rel}")
        check_eq(m.unmount(), 0, "exit status")


if __name__ == "__main__":
    T.main()
