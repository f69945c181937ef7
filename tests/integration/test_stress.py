"""Random concurrent changes to shared/ (writes, overwrites, appends, renames of files and
directories, deletes) while other threads read through by-hash/ and by-name/. Afterwards the
index must agree with the files exactly: every file's root is the merkle root of its bytes,
by-hash/ lists exactly the roots of the files, every by-name/ link points at its file's root.
Bounded by operation count (seeded, so a failure can be replayed with DIGFS_STRESS_SEED)."""

import errno
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

WRITERS = 6
READERS = 2
OPS_PER_WRITER = int(os.environ.get("DIGFS_STRESS_OPS", "150"))
SEED = int(os.environ.get("DIGFS_STRESS_SEED", "20261121"))


def writer(m, n, errors):
    rng = random.Random(SEED * 100 + n)
    base = m.shared(f"w{n}")
    os.makedirs(base, exist_ok=True)
    names = []
    try:
        for i in range(OPS_PER_WRITER):
            op = rng.random()
            if op < 0.35 or not names:
                name = f"f{i}"
                if rng.random() < 0.3:
                    os.makedirs(os.path.join(base, "sub"), exist_ok=True)
                    name = f"sub/f{i}"
                size = rng.choice([0, 1, 100, 16384, 16385, 70000, 300000])
                T.write_file(os.path.join(base, name), rng.randbytes(size))
                names.append(name)
            elif op < 0.5:
                name = rng.choice(names)
                T.write_file(os.path.join(base, name), rng.randbytes(rng.randrange(1, 50000)))
            elif op < 0.6:
                name = rng.choice(names)
                with open(os.path.join(base, name), "ab") as f:
                    f.write(rng.randbytes(rng.randrange(1, 20000)))
            elif op < 0.72:
                old = rng.choice(names)
                new = f"r{i}"
                os.rename(os.path.join(base, old), os.path.join(base, new))
                names[names.index(old)] = new
            elif op < 0.8 and any(nm.startswith("sub/") for nm in names):
                # rename the whole subdirectory and back: paths below it move twice
                os.rename(os.path.join(base, "sub"), os.path.join(base, "sub2"))
                os.rename(os.path.join(base, "sub2"), os.path.join(base, "sub"))
            elif op < 0.9:
                name = rng.choice(names)
                os.unlink(os.path.join(base, name))
                names.remove(name)
            else:
                # duplicate content under two names
                name = rng.choice(names)
                data = T.read_file(os.path.join(base, name))
                dup = f"d{i}"
                T.write_file(os.path.join(base, dup), data)
                names.append(dup)
    except Exception as e:  # reported by the main thread
        errors.append(f"writer {n}: {e!r}")


def reader(m, stop, errors, reads):
    rng = random.Random(SEED * 1000)
    try:
        while not stop.is_set():
            try:
                roots = os.listdir(m.by_hash())
            except OSError as e:
                errors.append(f"listing by-hash/: {e!r}")
                return
            if not roots:
                continue
            root = rng.choice(roots)
            try:
                data = T.read_file(m.by_hash(root))
            except OSError as e:
                # The root may have gone since the listing (ENOENT), or its file changed while
                # we read it (EIO): both are correct answers, a wrong byte is not.
                if e.errno not in (errno.ENOENT, errno.EIO):
                    errors.append(f"reading by-hash/{root}: {e!r}")
                continue
            if T.merkle_root(data) != root:
                errors.append(f"by-hash/{root} served bytes of another root")
            reads[0] += 1
    except Exception as e:
        errors.append(f"reader: {e!r}")


def test_random_concurrent_changes_leave_a_consistent_index():
    m = T.Mount("stress")
    errors, reads = [], [0]
    stop = threading.Event()
    readers = [threading.Thread(target=reader, args=(m, stop, errors, reads))
               for _ in range(READERS)]
    writers = [threading.Thread(target=writer, args=(m, n, errors)) for n in range(WRITERS)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    check(not errors, "errors during the run (seed %d):\n  %s" % (SEED, "\n  ".join(errors[:20])))

    # A last round of deletes with no creations after them: a stale index entry could
    # otherwise be cleaned up by accident when a new file reuses the deleted inode's number.
    rng = random.Random(SEED)
    existing = sorted(os.path.join(d, n) for d, _s, ns in os.walk(m.shared()) for n in ns)
    for path in rng.sample(existing, min(10, len(existing))):
        os.unlink(path)

    # Settle: every file hashed.
    files = {}
    for dirpath, _dirs, names in os.walk(m.shared()):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, m.shared())
            files[rel] = T.wait_hashed(path)
    expected_roots = set()
    for rel, root in files.items():
        data = T.read_file(m.shared(rel))
        check_eq(root, T.merkle_root(data), f"root of shared/{rel}")
        check_eq(T.read_file(m.by_hash(root)), data, f"by-hash/ of shared/{rel}")
        check_eq(os.readlink(m.by_name(rel)), T.by_name_target(rel, root), f"by-name/{rel}")
        expected_roots.add(root)
    listed = set(os.listdir(m.by_hash()))
    check_eq(listed, expected_roots, "by-hash/ lists exactly the roots of the files")
    check(reads[0] > 0, "the readers read nothing")
    # And the same after a restart: the index on disk agrees too.
    check_eq(m.unmount(), 0, "unmount")
    m.start()
    check_eq(set(os.listdir(m.by_hash())), expected_roots, "by-hash/ after a remount")
    for rel, root in files.items():
        check_eq(T.get_root_xattr(m.shared(rel)), root, f"root of shared/{rel} after remount")


if __name__ == "__main__":
    T.main()
