"""Changes in shared/: overwrite, append, truncate, rename (files and directories), delete,
duplicates; by-hash/ and by-name/ follow."""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes, expect_errno  # noqa: E402


def assert_served(m, rel, data, root):
    """shared/rel is hashed to root, and by-hash/ and by-name/ serve exactly data."""
    check_bytes(T.read_file(m.by_hash(root)), data, f"by-hash/{root} (shared/{rel})")
    T.wait_until(lambda: os.readlink(m.by_name(rel)) == T.by_name_target(rel, root),
                 f"by-name/{rel} -> {T.by_name_target(rel, root)}")
    check_bytes(T.read_file(m.by_name(rel)), data, f"by-name/{rel}")
    check(root in os.listdir(m.by_hash()), f"by-hash/ listing lacks {root}")


def test_overwrite():
    m = T.shared_mount()
    a = T.data_of(40000, 1)
    b = T.data_of(50000, 2)
    root_a = T.share(m, "ow.bin", a)
    assert_served(m, "ow.bin", a, root_a)
    T.write_file(m.shared("ow.bin"), b)  # O_TRUNC overwrite
    root_b = T.wait_hashed(m.shared("ow.bin"))
    check_eq(root_b, T.merkle_root(b), "xattr after overwrite (the old root must not be "
             "reported once the file changed)")
    assert_served(m, "ow.bin", b, root_b)
    T.wait_enoent(m.by_hash(root_a), f"old root {root_a} to leave by-hash/ after overwrite")
    check(root_a not in os.listdir(m.by_hash()), "old root still listed in by-hash/")


def test_overwrite_same_length():
    """Same size, different bytes, rewritten in place (no truncate)."""
    m = T.shared_mount()
    a = T.data_of(3 * T.LEAF, 3)
    root_a = T.share(m, "same.bin", a)
    b = bytearray(a)
    b[T.LEAF + 5] ^= 0xFF
    b = bytes(b)
    with open(m.shared("same.bin"), "r+b", buffering=0) as f:
        f.seek(T.LEAF + 5)
        f.write(b[T.LEAF + 5:T.LEAF + 6])
    root_b = T.wait_hashed(m.shared("same.bin"))
    check_eq(root_b, T.merkle_root(b), "root after a one-byte in-place change")
    assert_served(m, "same.bin", b, root_b)
    T.wait_enoent(m.by_hash(root_a), "old root gone after an in-place change")


def test_append():
    m = T.shared_mount()
    a = T.data_of(T.LEAF - 10, 4)  # crosses the 16 KiB boundary when appended to
    root_a = T.share(m, "app.bin", a)
    extra = T.data_of(30000, 5)
    with open(m.shared("app.bin"), "ab", buffering=0) as f:
        f.write(extra)
    root_b = T.wait_hashed(m.shared("app.bin"))
    check_eq(root_b, T.merkle_root(a + extra), "root after append")
    check_eq(T.digfs_hash(m.backing("app.bin")), root_b, "`digfs hash` of the backing file")
    assert_served(m, "app.bin", a + extra, root_b)
    T.wait_enoent(m.by_hash(root_a), "old root gone after append")


def test_truncate():
    m = T.shared_mount()
    a = T.data_of(100000, 6)
    root_a = T.share(m, "tr.bin", a)
    os.truncate(m.shared("tr.bin"), 20000)
    root_b = T.wait_hashed(m.shared("tr.bin"))
    check_eq(root_b, T.merkle_root(a[:20000]), "root after truncate(20000)")
    assert_served(m, "tr.bin", a[:20000], root_b)
    T.wait_enoent(m.by_hash(root_a), "old root gone after truncate")
    os.truncate(m.shared("tr.bin"), 0)
    check_eq(T.wait_hashed(m.shared("tr.bin")), T.EMPTY_ROOT, "root after truncate(0)")
    assert_served(m, "tr.bin", b"", T.EMPTY_ROOT)


def test_delete():
    m = T.shared_mount()
    data = T.data_of(25000, 7)
    root = T.share(m, "del.bin", data)
    assert_served(m, "del.bin", data, root)
    os.unlink(m.shared("del.bin"))
    check(not os.path.exists(m.backing("del.bin")), "backing file still there after unlink")
    T.wait_enoent(m.by_name("del.bin"), "by-name/del.bin gone after unlink")
    T.wait_enoent(m.by_hash(root), "by-hash/<root> gone after unlink")
    check(root not in os.listdir(m.by_hash()), "deleted root still listed")
    check("del.bin" not in os.listdir(m.by_name()), "deleted name still listed in by-name/")


def test_delete_takes_effect_when_unlink_returns():
    """No window where a deleted file's root still resolves: unlink is answered only after the
    index dropped the root, and by-hash names are checked on every path walk. The kernel's
    caches are filled first (stat, read through by-hash and by-name)."""
    m = T.shared_mount()
    data = T.data_of(26000, 17)
    root = T.share(m, "gone-now.bin", data)
    for _ in range(2):
        os.stat(m.by_hash(root))
        check_bytes(T.read_file(m.by_hash(root)), data, "by-hash before the unlink")
        check_bytes(T.read_file(m.by_name("gone-now.bin")), data, "by-name before the unlink")
    os.unlink(m.shared("gone-now.bin"))
    expect_errno({errno.ENOENT}, os.stat, m.by_hash(root), what="stat by-hash/ right after unlink")
    expect_errno({errno.ENOENT}, os.lstat, m.by_name("gone-now.bin"),
                 what="lstat by-name/ right after unlink")


def test_duplicates_keep_root():
    """Two files with the same bytes: the root stays while either one holds it."""
    m = T.shared_mount()
    data = T.data_of(33333, 8)
    root = T.share(m, "dup1.bin", data)
    check_eq(T.share(m, "dup2.bin", data), root, "root of the duplicate")
    T.wait_exists(m.by_name("dup2.bin"))
    os.unlink(m.shared("dup1.bin"))
    T.wait_enoent(m.by_name("dup1.bin"), "by-name/dup1.bin gone")
    check(os.path.exists(m.by_hash(root)), "root vanished although dup2.bin still has it")
    check_bytes(T.read_file(m.by_hash(root)), data, "by-hash/<root> served by the duplicate")
    check_eq(os.readlink(m.by_name("dup2.bin")), T.by_name_target("dup2.bin", root),
             "by-name/dup2.bin")
    # a third copy, then overwrite one of them: still held by the other
    check_eq(T.share(m, "dup3.bin", data), root, "root of the third copy")
    other = T.data_of(1000, 9)
    T.write_file(m.shared("dup2.bin"), other)
    check_eq(T.wait_hashed(m.shared("dup2.bin")), T.merkle_root(other), "dup2 overwritten")
    check_bytes(T.read_file(m.by_hash(root)), data, "root still served by dup3.bin")
    os.unlink(m.shared("dup3.bin"))
    T.wait_enoent(m.by_hash(root), "root gone once no file holds it")


def test_rename_file():
    m = T.shared_mount()
    data = T.data_of(45000, 10)
    root = T.share(m, "r1.bin", data)
    T.wait_exists(m.by_name("r1.bin"))
    os.rename(m.shared("r1.bin"), m.shared("r2.bin"))
    check(os.path.exists(m.backing("r2.bin")) and not os.path.exists(m.backing("r1.bin")),
          "backing files not renamed", os.listdir(m.backing()))
    T.wait_enoent(m.by_name("r1.bin"), "by-name/r1.bin gone after rename")
    T.wait_exists(m.by_name("r2.bin"), "by-name/r2.bin after rename")
    check_eq(T.wait_hashed(m.shared("r2.bin")), root, "root after rename")
    assert_served(m, "r2.bin", data, root)
    # into a subdirectory
    os.mkdir(m.shared("rsub"))
    os.rename(m.shared("r2.bin"), m.shared("rsub/r3.bin"))
    T.wait_enoent(m.by_name("r2.bin"), "by-name/r2.bin gone after move into rsub/")
    T.wait_exists(m.by_name("rsub/r3.bin"), "by-name/rsub/r3.bin")
    check_eq(os.readlink(m.by_name("rsub/r3.bin")), "../../by-hash/" + root,
             "readlink by-name/rsub/r3.bin")
    assert_served(m, "rsub/r3.bin", data, root)


def test_rename_over_existing():
    """rename(a, b) replacing b: b's old root goes, a's root is now named b."""
    m = T.shared_mount()
    da, db = T.data_of(20000, 11), T.data_of(21000, 12)
    root_a = T.share(m, "ra.bin", da)
    root_b = T.share(m, "rb.bin", db)
    T.wait_exists(m.by_name("rb.bin"))
    os.rename(m.shared("ra.bin"), m.shared("rb.bin"))
    T.wait_enoent(m.by_name("ra.bin"), "by-name/ra.bin gone")
    T.wait_enoent(m.by_hash(root_b), "replaced file's root gone")
    check_eq(T.wait_hashed(m.shared("rb.bin")), root_a, "root of rb.bin after the replace")
    assert_served(m, "rb.bin", da, root_a)


def test_rename_directory():
    m = T.shared_mount()
    files = {"x.bin": T.data_of(1234, 13), "e/y.bin": T.data_of(70000, 14),
             "e/f/z.bin": T.data_of(16384, 15)}
    os.makedirs(m.shared("d1/e/f"))
    roots = {rel: T.share(m, "d1/" + rel, data) for rel, data in files.items()}
    for rel in files:
        T.wait_exists(m.by_name("d1/" + rel))
    os.rename(m.shared("d1"), m.shared("d2"))
    T.wait_enoent(m.by_name("d1"), "by-name/d1 gone after renaming the directory")
    for rel, data in files.items():
        new = "d2/" + rel
        T.wait_exists(m.by_name(new), f"by-name/{new}")
        check_eq(T.wait_hashed(m.shared(new)), roots[rel], f"root of shared/{new}")
        check_eq(os.readlink(m.by_name(new)), T.by_name_target(new, roots[rel]),
                 f"readlink by-name/{new}")
        assert_served(m, new, data, roots[rel])
    # and once more, into another directory
    os.mkdir(m.shared("outer"))
    os.rename(m.shared("d2"), m.shared("outer/d3"))
    T.wait_enoent(m.by_name("d2"), "by-name/d2 gone")
    for rel, data in files.items():
        new = "outer/d3/" + rel
        T.wait_exists(m.by_name(new), f"by-name/{new}")
        check_eq(os.readlink(m.by_name(new)), T.by_name_target(new, roots[rel]),
                 f"readlink by-name/{new}")
        check_bytes(T.read_file(m.by_name(new)), data, f"by-name/{new}")


def test_delete_directory_tree():
    m = T.shared_mount()
    os.makedirs(m.shared("gone/sub"))
    r1 = T.share(m, "gone/sub/a.bin", T.data_of(5000, 16))
    r2 = T.share(m, "gone/b.bin", T.data_of(6000, 17))
    T.wait_exists(m.by_name("gone/sub/a.bin"))
    os.unlink(m.shared("gone/sub/a.bin"))
    os.rmdir(m.shared("gone/sub"))
    os.unlink(m.shared("gone/b.bin"))
    os.rmdir(m.shared("gone"))
    T.wait_enoent(m.by_name("gone"), "by-name/gone after removing the tree")
    T.wait_enoent(m.by_hash(r1))
    T.wait_enoent(m.by_hash(r2))


def test_rename_and_delete_while_hashing():
    """Renamed or deleted right after close (hashing still running): the root lands under the
    new name only; the deleted file leaves no root and no name behind."""
    m = T.shared_mount()
    big = T.data_of(48 * 1024 * 1024 + 11, 30)
    big2 = T.data_of(48 * 1024 * 1024 + 12, 31)
    os.mkdir(m.shared("hd"))
    T.write_file(m.shared("moving.bin"), big)
    os.rename(m.shared("moving.bin"), m.shared("hd/moved.bin"))
    T.write_file(m.shared("hd/doomed.bin"), big2)
    os.unlink(m.shared("hd/doomed.bin"))
    T.write_file(m.shared("hd/dir-moved.bin"), big2[:1000000])
    os.rename(m.shared("hd"), m.shared("hd2"))
    root = T.wait_hashed(m.shared("hd2/moved.bin"))
    check_eq(root, T.merkle_root(big), "root of the file renamed while being hashed")
    check_eq(T.wait_hashed(m.shared("hd2/dir-moved.bin")), T.merkle_root(big2[:1000000]),
             "root of a file whose directory was renamed while it was being hashed")
    T.wait_exists(m.by_name("hd2/moved.bin"))
    T.wait_exists(m.by_name("hd2/dir-moved.bin"))
    for gone in ("moving.bin", "hd", "hd2/doomed.bin"):
        T.wait_enoent(m.by_name(gone), f"by-name/{gone} (renamed away or deleted)")
    T.wait_enoent(m.by_hash(T.merkle_root(big2)), "root of the file deleted while hashing")
    check_bytes(T.read_file(m.by_name("hd2/moved.bin")), big, "by-name/hd2/moved.bin")


def test_extend_and_holes():
    """truncate() upwards and a pwrite() past the end leave zero-filled holes; roots match."""
    m = T.shared_mount()
    head = T.data_of(100, 32)
    T.share(m, "holes.bin", head)
    os.truncate(m.shared("holes.bin"), 100000)
    want = head + bytes(100000 - 100)
    check_eq(T.wait_hashed(m.shared("holes.bin")), T.merkle_root(want), "root after extending")
    fd = os.open(m.shared("holes.bin"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"tail", 200000)
    finally:
        os.close(fd)
    want = want + bytes(200000 - len(want)) + b"tail"
    root = T.wait_hashed(m.shared("holes.bin"))
    check_eq(root, T.merkle_root(want), "root after a write past the end")
    assert_served(m, "holes.bin", want, root)


def test_mmap_write():
    """A file changed through a shared writable mmap is rehashed once written back/closed."""
    import mmap
    m = T.shared_mount()
    data = T.data_of(64 * 1024, 33)
    root_a = T.share(m, "mm.bin", data)
    with open(m.shared("mm.bin"), "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as mm:
            mm[20000:20005] = b"MMAP!"
            mm.flush()
    want = data[:20000] + b"MMAP!" + data[20005:]
    check_bytes(T.read_file(m.backing("mm.bin")), want, "backing file after the mmap write")
    root = T.wait_hashed(m.shared("mm.bin"))
    check_eq(root, T.merkle_root(want), "root after an mmap write")
    assert_served(m, "mm.bin", want, root)
    T.wait_enoent(m.by_hash(root_a), "old root gone after the mmap write")


def test_backing_changed_while_mounted():
    """Bytes changed in data/shared behind digfs's back are never served under the old root:
    reading by-hash/<old root> gives the old bytes (cached, verified) or an error."""
    m = T.shared_mount()
    old = T.data_of(200000, 18)
    root = T.share(m, "behind.bin", old)
    with open(m.backing("behind.bin"), "r+b") as f:
        f.seek(100000)
        f.write(b"0123456789")
    for attempt in range(3):
        try:
            got = T.read_file(m.by_hash(root))
        except OSError as e:
            check(e.errno in (errno.ENOENT, errno.EIO, errno.ESTALE),
                  f"by-hash/<old root> after a change behind digfs's back failed with {e}")
            continue
        check_bytes(got, old, "by-hash/<old root> after the backing file changed (must be the "
                    "old bytes or an error, never the new ones)")


if __name__ == "__main__":
    T.main()
