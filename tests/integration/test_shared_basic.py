"""shared/, by-hash/ and by-name/ on one mount: write, read back, names, errors."""

import errno
import hashlib
import mmap
import os
import stat
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes, expect_errno  # noqa: E402

SIZES = [0, 1, 16383, 16384, 16385, 3 * 16384 + 1, (1 << 20) + 123]


def test_layout():
    m = T.shared_mount()
    names = set(os.listdir(m.mnt))
    check({"shared", "by-hash", "by-name"} <= names, f"mount root lists {sorted(names)}")
    for d in ("shared", "by-hash", "by-name"):
        st = os.stat(os.path.join(m.mnt, d))
        check(stat.S_ISDIR(st.st_mode), f"{d} is not a directory: mode {oct(st.st_mode)}")
    check(os.path.isdir(m.backing()), f"data_dir has no shared/: {os.listdir(m.data)}")
    os.statvfs(m.mnt)  # df must work


def test_default_permissions():
    m = T.shared_mount()
    entry = T.mount_entry(m.mnt)
    check(entry is not None, "mount not in /proc/self/mountinfo")
    check("default_permissions" in entry, "mount lacks default_permissions", entry)


def test_write_read_sizes():
    """Files of edge sizes: root, xattr, by-hash bytes/size/stat, by-name link, backing file."""
    m = T.shared_mount()
    roots = {}
    for n in SIZES:
        data = T.data_of(n, n)
        rel = f"size-{n}.bin"
        T.write_file(m.shared(rel), data)
        roots[rel] = (data, T.merkle_root(data))
    for rel, (data, root) in roots.items():
        got = T.wait_hashed(m.shared(rel))
        check_eq(got, root, f"{T.XATTR} of shared/{rel} ({len(data)} bytes)")
        if len(data) <= T.LEAF:
            check_eq(root, hashlib.sha256(data).hexdigest(), "root of a <=16 KiB file (oracle)")
        check_bytes(T.read_file(m.backing(rel)), data, f"backing file data/shared/{rel}")
        check_eq(T.digfs_hash(m.backing(rel)), root, f"`digfs hash` of data/shared/{rel}")
        check_bytes(T.read_file(m.shared(rel)), data, f"shared/{rel} read back")
        check_eq(os.stat(m.shared(rel)).st_size, len(data), f"st_size of shared/{rel}")

        bh = m.by_hash(root)
        st = T.wait_exists(bh, f"by-hash/{root} for shared/{rel}")
        st = os.stat(bh)
        check(stat.S_ISREG(st.st_mode), f"by-hash/{root} is not a regular file: {oct(st.st_mode)}")
        check_eq(st.st_size, len(data), f"st_size of by-hash/{root}")
        check_eq(st.st_mode & 0o222, 0, f"write bits of read-only by-hash/{root} "
                 f"(mode {oct(st.st_mode)})")
        check_bytes(T.read_file(bh), data, f"by-hash/{root}")
        check_eq(T.get_root_xattr(bh), root, f"{T.XATTR} of by-hash/{root}")

        bn = m.by_name(rel)
        T.wait_exists(bn, f"by-name/{rel}")
        check(stat.S_ISLNK(os.lstat(bn).st_mode), f"by-name/{rel} is not a symlink")
        check_eq(os.readlink(bn), T.by_name_target(rel, root), f"readlink by-name/{rel}")
        check_bytes(T.read_file(bn), data, f"by-name/{rel} (through the link)")
    check_eq(roots["size-0.bin"][1], T.EMPTY_ROOT, "root of the empty file")
    listed = set(os.listdir(m.by_hash()))
    for rel, (data, root) in roots.items():
        check(root in listed, f"by-hash/ listing lacks {root} (shared/{rel})")
    for name in listed:
        check(T.HEX64.match(name), f"by-hash/ lists a name that is not 64 lowercase hex: {name!r}")
    bn_listed = set(os.listdir(m.by_name()))
    check(set(roots) <= bn_listed, f"by-name/ listing lacks {sorted(set(roots) - bn_listed)}")


def test_xattr_right_after_close():
    """Right after close() the xattr already says `hashing` (or the root), never nothing."""
    m = T.shared_mount()
    for i in range(5):
        rel = f"fresh-{i}.bin"
        data = T.data_of(200000 + i, 1000 + i)
        T.write_file(m.shared(rel), data)
        v = T.get_root_xattr(m.shared(rel))
        check(v == "hashing" or v == T.merkle_root(data),
              f"{T.XATTR} of shared/{rel} right after close() is {v!r}: expected 'hashing' "
              "or the root")
        names = os.listxattr(m.shared(rel))
        check(T.XATTR in names, f"listxattr(shared/{rel}) = {names}: lacks {T.XATTR}")
        T.wait_hashed(m.shared(rel))


def test_pread_offsets():
    """Reads at assorted offsets and lengths of by-hash/ and by-name/ files."""
    m = T.shared_mount()
    n = 5 * T.LEAF + 777
    data = T.data_of(n, 42)
    root = T.share(m, "offsets.bin", data)
    for path in (m.by_hash(root), m.by_name("offsets.bin")):
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, ln in [(0, 1), (1, 16384), (16383, 2), (16384, 16384), (40000, 50000),
                            (n - 1, 10), (n, 10), (n + 5000, 10), (0, n + 100), (12345, 1)]:
                got = os.pread(fd, ln, off)
                check_bytes(got, data[off:off + ln], f"pread({path}, {ln}, {off})")
        finally:
            os.close(fd)


def test_by_hash_mmap():
    """by-hash files can be mmap()ed (players and tools do that)."""
    m = T.shared_mount()
    data = T.data_of(300001, 7)
    root = T.share(m, "mmap.bin", data)
    with open(m.by_hash(root), "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            check_eq(len(mm), len(data), "mmap length")
            check_bytes(mm[:], data, "mmap of by-hash file")


def test_malformed_and_unknown_names():
    m = T.shared_mount()
    root = T.share(m, "known.bin", b"known content\n")
    bad = [root[:63], root + "0", root[:-1] + "g", "z" * 64, root.upper(),
           root[:10] + root[10:20].upper() + root[20:], " " + root[1:], root[:32], "x",
           root[:63] + "."]
    for name in bad:
        expect_errno(errno.ENOENT, os.stat, m.by_hash(name), what=f"stat by-hash/{name!r}")
        expect_errno(errno.ENOENT, os.open, m.by_hash(name), os.O_RDONLY,
                     what=f"open by-hash/{name!r}")
    absent = hashlib.sha256(b"nobody has this " + os.urandom(16)).hexdigest()
    expect_errno(errno.ENOENT, os.stat, m.by_hash(absent), what="stat of a root nobody has")
    expect_errno(errno.ENOENT, os.open, m.by_hash(absent), os.O_RDONLY,
                 what="open of a root nobody has")
    expect_errno(errno.ENOENT, os.lstat, m.by_name("no-such-file"), what="by-name/no-such-file")
    # the good one still works
    check_bytes(T.read_file(m.by_hash(root)), b"known content\n", "by-hash/<known root>")


def test_lookup_before_share_does_not_stick():
    """A root looked up (ENOENT) before it is shared is found once it is shared."""
    m = T.shared_mount()
    data = b"looked up before it existed " + os.urandom(8)
    root = T.merkle_root(data)
    expect_errno(errno.ENOENT, os.stat, m.by_hash(root), what="by-hash/<root> before sharing")
    T.write_file(m.shared("late.bin"), data)
    check_eq(T.wait_hashed(m.shared("late.bin")), root, "root of shared/late.bin")
    T.wait_exists(m.by_hash(root), f"by-hash/{root} after it was shared (negative entry "
                  "cached?)")
    check_bytes(T.read_file(m.by_hash(root)), data, "by-hash/<late root>")


def test_by_hash_read_only():
    m = T.shared_mount()
    data = b"read-only please\n"
    root = T.share(m, "ro.bin", data)
    bh = m.by_hash(root)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND):
        expect_errno(T.RO_ERRNOS, os.open, bh, flags, what=f"open(by-hash/<root>, {flags:#o})")
    new_root = hashlib.sha256(b"new").hexdigest()
    expect_errno(T.RO_ERRNOS, os.open, m.by_hash(new_root), os.O_WRONLY | os.O_CREAT, 0o644,
                 what="create a file in by-hash/")
    expect_errno(T.RO_ERRNOS, os.open, m.by_hash("newfile"), os.O_WRONLY | os.O_CREAT, 0o644,
                 what="create by-hash/newfile")
    expect_errno(T.RO_ERRNOS, os.mkdir, m.by_hash("dir"), what="mkdir in by-hash/")
    expect_errno(T.RO_ERRNOS + (errno.EPERM,), os.unlink, bh, what="unlink by-hash/<root>")
    expect_errno(T.RO_ERRNOS + (errno.EPERM,), os.truncate, bh, 0, what="truncate by-hash/<root>")
    expect_errno(T.RO_ERRNOS + (errno.EPERM, errno.EXDEV), os.rename, bh, m.by_hash(new_root),
                 what="rename inside by-hash/")
    expect_errno(T.RO_ERRNOS + (errno.EPERM, errno.EXDEV), os.rename, m.shared("ro.bin"),
                 m.by_hash(new_root), what="rename shared/ro.bin into by-hash/")
    expect_errno(T.RO_ERRNOS + (errno.EPERM, errno.ENOTSUP), os.setxattr, bh, T.XATTR,
                 b"0" * 64, what="setxattr on by-hash/<root>")
    check_bytes(T.read_file(bh), data, "by-hash/<root> after the refused writes")
    check_eq(T.get_root_xattr(m.shared("ro.bin")), root, "xattr of shared/ro.bin afterwards")


def test_by_name_read_only():
    """by-name/ is managed by digfs: creating, removing or replacing entries fails."""
    m = T.shared_mount()
    root = T.share(m, "bn.bin", b"by-name entry\n")
    T.wait_exists(m.by_name("bn.bin"))

    def refused(func, *args, what):
        try:
            r = func(*args)
        except OSError:
            return
        if isinstance(r, int):
            os.close(r)
        T.fail(f"{what} succeeded in by-name/")
    refused(os.open, m.by_name("new.bin"), os.O_WRONLY | os.O_CREAT, 0o644, what="create")
    refused(os.symlink, "../by-hash/" + root, m.by_name("link"), what="symlink")
    refused(os.mkdir, m.by_name("dir"), what="mkdir")
    refused(os.unlink, m.by_name("bn.bin"), what="unlink")
    check_eq(os.readlink(m.by_name("bn.bin")), T.by_name_target("bn.bin", root),
             "by-name/bn.bin afterwards")


def test_subdirectories():
    m = T.shared_mount()
    os.makedirs(m.shared("a/b"))
    check(os.path.isdir(m.backing("a/b")), "data/shared/a/b not created")
    data = T.data_of(50000, 3)
    root = T.share(m, "a/b/f.bin", data)
    check_bytes(T.read_file(m.backing("a/b/f.bin")), data, "backing data/shared/a/b/f.bin")
    T.wait_exists(m.by_name("a/b/f.bin"), "by-name/a/b/f.bin")
    for d in ("a", "a/b"):
        check(stat.S_ISDIR(os.lstat(m.by_name(d)).st_mode), f"by-name/{d} is not a directory")
    check_eq(os.readlink(m.by_name("a/b/f.bin")), "../../../by-hash/" + root,
             "readlink by-name/a/b/f.bin")
    check_bytes(T.read_file(m.by_name("a/b/f.bin")), data, "by-name/a/b/f.bin")
    check("b" in os.listdir(m.by_name("a")), f"by-name/a lists {os.listdir(m.by_name('a'))}")
    check("f.bin" in os.listdir(m.by_name("a/b")), "by-name/a/b lacks f.bin")
    # rmdir: non-empty refused, empty allowed
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rmdir, m.shared("a/b"),
                 what="rmdir of non-empty shared/a/b")
    os.mkdir(m.shared("empty"))
    check_eq(sorted(os.listdir(m.shared("empty"))), [], "listing of a new directory")
    os.rmdir(m.shared("empty"))
    check(not os.path.exists(m.backing("empty")), "data/shared/empty still exists after rmdir")
    expect_errno(errno.ENOENT, os.stat, m.shared("empty"), what="shared/empty after rmdir")
    expect_errno(errno.EEXIST, os.mkdir, m.shared("a"), what="mkdir of existing shared/a")
    expect_errno(errno.ENOENT, os.open, m.shared("nope/f"), os.O_WRONLY | os.O_CREAT, 0o644,
                 what="create in a missing directory")


def test_only_regular_files():
    m = T.shared_mount()
    T.write_file(m.shared("target.bin"), b"target")
    T.wait_hashed(m.shared("target.bin"))
    expect_errno(errno.EPERM, os.symlink, "target.bin", m.shared("sym"), what="symlink in shared/")
    expect_errno(errno.EPERM, os.link, m.shared("target.bin"), m.shared("hard"),
                 what="hard link in shared/")
    expect_errno(errno.EPERM, os.mknod, m.shared("null"), stat.S_IFCHR | 0o600, os.makedev(1, 3),
                 what="mknod char device in shared/")
    expect_errno(errno.EPERM, os.mknod, m.shared("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 0),
                 what="mknod block device in shared/")
    for n in ("sym", "hard", "null", "blk"):
        check(not os.path.lexists(m.backing(n)), f"data/shared/{n} was created anyway")


def test_modes_and_owner():
    m = T.shared_mount()
    fd = os.open(m.shared("mode.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"x")
    os.close(fd)
    st = os.stat(m.shared("mode.bin"))
    check_eq(st.st_uid, os.getuid(), "owner of a file created in shared/")
    check_eq(stat.S_IMODE(st.st_mode) & ~0o022, 0o640 & ~0o022, "mode of a new file")
    os.chmod(m.shared("mode.bin"), 0o600)
    check_eq(stat.S_IMODE(os.stat(m.shared("mode.bin")).st_mode), 0o600, "mode after chmod")
    T.wait_hashed(m.shared("mode.bin"))
    expect_errno(errno.EEXIST, os.open, m.shared("mode.bin"),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, what="O_EXCL on an existing file")


def test_cp_then_sha256sum():
    """The issue's "done when": cp a file in, sha256sum of by-hash/ and by-name/ match."""
    m = T.shared_mount()
    src = os.path.join(m.dir, "src.bin")
    T.write_file(src, T.data_of(3 * 1024 * 1024 + 5, 99))
    want = T.sha256_file(src)
    r = subprocess.run(["cp", src, m.shared("copied.bin")], capture_output=True, text=True,
                       timeout=T.WAIT)
    check(r.returncode == 0, f"cp failed: {r.stderr}")
    root = T.wait_hashed(m.shared("copied.bin"))
    check_eq(root, T.expected_root(src), "root of the copied file")
    T.wait_exists(m.by_name("copied.bin"))
    for p in (m.by_hash(root), m.by_name("copied.bin")):
        r = subprocess.run(["sha256sum", p], capture_output=True, text=True, timeout=T.WAIT)
        check(r.returncode == 0, f"sha256sum {p} failed: {r.stderr}")
        check_eq(r.stdout.split()[0], want, f"sha256sum of {p}")


def test_tar_extract_into_shared():
    """`tar -x` into shared/ (directories, mtimes, modes) and every file shows up by name."""
    m = T.shared_mount()
    tar_path = os.path.join(m.dir, "t.tar")
    files = {"proj/README": b"hello\n", "proj/src/main.c": T.data_of(20000, 5),
             "proj/src/empty": b"", "proj/doc/x/y.txt": T.data_of(70000, 6)}
    import io
    with tarfile.open(tar_path, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    r = subprocess.run(["tar", "-xf", tar_path, "-C", m.shared()], capture_output=True,
                       text=True, timeout=T.WAIT)
    check(r.returncode == 0, f"tar -x into shared/ failed ({r.returncode}): {r.stderr}")
    for name, data in files.items():
        root = T.wait_hashed(m.shared(name))
        check_eq(root, T.merkle_root(data), f"root of shared/{name}")
        check_eq(int(os.stat(m.shared(name)).st_mtime), 1_600_000_000, f"mtime of {name}")
        T.wait_exists(m.by_name(name))
        check_eq(os.readlink(m.by_name(name)), T.by_name_target(name, root),
                 f"readlink by-name/{name}")
        check_bytes(T.read_file(m.by_name(name)), data, f"by-name/{name}")


def test_many_entries_listed():
    """Listings longer than one readdir buffer: every root and name, each exactly once."""
    m = T.shared_mount()
    os.mkdir(m.shared("many"))
    files = {f"many/file-{i:04d}-{'x' * 40}.txt": f"content {i}\n".encode() for i in range(400)}
    for rel, data in files.items():
        T.write_file(m.shared(rel), data)
    roots = {rel: T.wait_hashed(m.shared(rel)) for rel in files}
    for rel, data in files.items():
        check_eq(roots[rel], T.merkle_root(data), f"root of shared/{rel}")
    listed = os.listdir(m.by_hash())
    check_eq(len(listed), len(set(listed)), "by-hash/ listing has duplicates")
    missing = set(roots.values()) - set(listed)
    check(not missing, f"by-hash/ listing lacks {len(missing)} of {len(roots)} roots")
    names = T.wait_until(lambda: (lambda l: l if len(l) >= len(files) else None)(
        os.listdir(m.by_name("many"))), "by-name/many to list every file")
    check_eq(len(names), len(set(names)), "by-name/many listing has duplicates")
    check_eq(sorted(names), sorted(os.path.basename(r) for r in files), "by-name/many listing")
    check_eq(sorted(os.listdir(m.shared("many"))), sorted(os.path.basename(r) for r in files),
             "shared/many listing")


def test_unusual_names():
    """Spaces, UTF-8, a 255-byte name, leading dot, shell metacharacters."""
    m = T.shared_mount()
    names = ["with space.txt", "ünïcødé-名前.bin", "n" * 251 + ".bin", ".hidden",
             "a'b\"c$d;e&f|g*h?i[j]k(l)m{n}o<p>q~r#s%t.txt", "-leading-dash"]
    for i, rel in enumerate(names):
        data = f"name test {i}\n".encode()
        root = T.share(m, rel, data)
        check_bytes(T.read_file(m.backing(rel)), data, f"backing file {rel!r}")
        T.wait_exists(m.by_name(rel), f"by-name/{rel!r}")
        check_eq(os.readlink(m.by_name(rel)), T.by_name_target(rel, root), f"by-name/{rel!r}")
        check_bytes(T.read_file(m.by_name(rel)), data, f"by-name/{rel!r}")
    expect_errno(errno.ENAMETOOLONG, os.open, m.shared("n" * 256), os.O_WRONLY | os.O_CREAT,
                 0o644, what="create a 256-byte name")


def test_clean_unmount_exit_code():
    """Last: unmounting the shared mount with fusermount3 -u exits 0."""
    m = T.shared_mount()
    rc = m.unmount()
    check_eq(rc, 0, "digfs exit status after fusermount3 -u")
    check(not os.path.ismount(m.mnt), "still mounted")


if __name__ == "__main__":
    T.main()
