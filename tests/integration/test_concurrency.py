"""8 writers into shared/ at once while 8 readers read other by-hash/ files: all bytes exact."""

import hashlib
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402

WRITERS = 8
READERS = 8


def run_threads(targets):
    """Starts one thread per callable, all released together; returns the errors raised."""
    barrier = threading.Barrier(len(targets))
    errors = []
    lock = threading.Lock()

    def wrap(i, fn):
        try:
            barrier.wait(timeout=T.WAIT)
            fn()
        except BaseException as e:  # collected and reported by the main thread
            with lock:
                errors.append(f"thread {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=T.FILE_TIMEOUT)
        check(not t.is_alive(), "a worker thread hung", t.name)
    return errors


def test_writers_and_readers():
    m = T.shared_mount()
    # files the readers will read, shared and hashed beforehand
    os.mkdir(m.shared("old"))
    held = []
    for i in range(READERS):
        data = T.data_of(2 * 1024 * 1024 + 4099 * i, 100 + i)
        rel = f"old/held-{i}.bin"
        T.write_file(m.shared(rel), data)
        held.append((rel, data))
    held = [(rel, data, T.wait_hashed(m.shared(rel))) for rel, data in held]
    for rel, data, root in held:
        check_eq(root, T.merkle_root(data), f"root of shared/{rel}")
        T.wait_exists(m.by_name(rel))

    os.mkdir(m.shared("new"))
    new = []
    for i in range(WRITERS):
        seed = 200 + (6 if i == 7 else i)  # writers 6 and 7 write the same bytes
        new.append((f"new/w-{i}.bin" if i % 2 else f"w-{i}.bin",
                    T.data_of(6 * 1024 * 1024 + 777 * (seed - 200), seed)))

    def writer(rel, data, chunk):
        def run():
            fd = os.open(m.shared(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                mv = memoryview(data)
                off = 0
                while off < len(mv):
                    n = os.write(fd, mv[off:off + chunk])
                    check(n > 0, f"write returned {n}")
                    off += n
            finally:
                os.close(fd)
        return run

    def reader(i, rel, data, root):
        want = hashlib.sha256(data).hexdigest()

        def run():
            rng = random.Random(i)
            for rnd in range(3):
                path = m.by_hash(root) if rnd != 1 else m.by_name(rel)
                h = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    while True:
                        b = f.read(rng.choice([4096, 65536, 131072, 1 << 20]))
                        if not b:
                            break
                        h.update(b)
                check_eq(h.hexdigest(), want, f"sha256 of {path} (round {rnd})")
                fd = os.open(m.by_hash(root), os.O_RDONLY)
                try:
                    for _ in range(20):
                        off = rng.randrange(len(data))
                        ln = rng.randrange(1, 200000)
                        check_bytes(os.pread(fd, ln, off), data[off:off + ln],
                                    f"pread by-hash/{root} at {off}+{ln}")
                finally:
                    os.close(fd)
        return run

    chunks = [4096, 16384, 65536, 131072, 1 << 20, 100000, 12345, 1 << 17]
    targets = [writer(rel, data, chunks[i]) for i, (rel, data) in enumerate(new)]
    targets += [reader(i, rel, data, root) for i, (rel, data, root) in enumerate(held)]
    errors = run_threads(targets)
    check(not errors, f"{len(errors)} worker(s) failed", *errors)

    for rel, data in new:
        check_bytes(T.read_file(m.backing(rel)), data, f"backing data/shared/{rel}")
    for rel, data in new:
        root = T.wait_hashed(m.shared(rel))
        check_eq(root, T.merkle_root(data), f"root of shared/{rel}")
        check_bytes(T.read_file(m.by_hash(root)), data, f"by-hash/<root of {rel}>")
        T.wait_until(lambda: os.readlink(m.by_name(rel)) == T.by_name_target(rel, root),
                     f"by-name/{rel} link")
        check_bytes(T.read_file(m.by_name(rel)), data, f"by-name/{rel}")
    listed = set(os.listdir(m.by_hash()))
    want = {T.merkle_root(d) for _, d in new} | {r for _, _, r in held}
    check(want <= listed, f"by-hash/ lacks {sorted(want - listed)}")

    # the duplicated content stays held after one copy goes
    dup_root = T.merkle_root(new[6][1])
    os.unlink(m.shared(new[6][0]))
    T.wait_enoent(m.by_name(new[6][0]))
    check_bytes(T.read_file(m.by_hash(dup_root)), new[7][1], "duplicate root after one unlink")


def test_concurrent_rewrites_settle():
    """8 threads each rewrite their own file 5 times (racing the background hashing); at the
    end every file's root is that of its last content and no stale root is left behind."""
    m = T.shared_mount()
    versions = {i: [T.data_of(100000 + 37 * v + i, 1000 * i + v) for v in range(5)]
                for i in range(WRITERS)}

    def rewriter(i):
        def run():
            for data in versions[i]:
                T.write_file(m.shared(f"rw-{i}.bin"), data, chunk=32768)
        return run
    errors = run_threads([rewriter(i) for i in range(WRITERS)])
    check(not errors, f"{len(errors)} worker(s) failed", *errors)
    for i in range(WRITERS):
        rel = f"rw-{i}.bin"
        final = versions[i][-1]
        root = T.wait_hashed(m.shared(rel))
        check_eq(root, T.merkle_root(final), f"root of shared/{rel} after 5 rewrites")
        check_bytes(T.read_file(m.by_hash(root)), final, f"by-hash/<final root of {rel}>")
        for old in versions[i][:-1]:
            T.wait_enoent(m.by_hash(T.merkle_root(old)),
                          f"stale root of an earlier version of {rel} to be gone")


if __name__ == "__main__":
    T.main()
