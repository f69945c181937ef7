"""A 1 GiB file (plus a partial 16 KiB leaf, so the tree needs padding) written through the
mount, streamed from a deterministic generator: its root, by-hash/ bytes and by-name/ link."""

import hashlib
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402

MIB = 1 << 20
SIZE = (1 << 30) + 4097
HASH_WAIT = max(T.WAIT, 400.0)  # hashing 1 GiB under a sanitizer build can take a while


class Generator:
    """Deterministic stream: chunk i is a 1 MiB pseudo-random block rotated by a per-chunk
    amount with the chunk number written at its start, so no two 16 KiB leaves repeat."""

    def __init__(self, seed=1):
        self.base = random.Random(seed).randbytes(MIB)

    def chunk(self, i):
        k = (i * 4099 + 17) % MIB
        b = bytearray(self.base[k:] + self.base[:k])
        b[0:8] = i.to_bytes(8, "little")
        return b

    def range(self, off, n):
        """Bytes [off, off+n) of the stream (clipped at SIZE)."""
        out = bytearray()
        end = min(off + n, SIZE)
        while off < end:
            i, o = divmod(off, MIB)
            c = self.chunk(i)[o:o + (end - off)]
            out += c
            off += len(c)
        return bytes(out)


def test_one_gib_file():
    gen = Generator()
    with T.Mount("large") as m:
        path = m.shared("big.bin")
        sha = hashlib.sha256()
        merkle = T.MerkleHasher()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            i = 0
            while written < SIZE:
                c = gen.chunk(i)[:SIZE - written]
                mv = memoryview(c)
                off = 0
                while off < len(mv):
                    n = os.write(fd, mv[off:])
                    check(n > 0, f"write returned {n} at offset {written + off}")
                    off += n
                sha.update(c)
                merkle.update(c)
                written += len(c)
                i += 1
        finally:
            os.close(fd)
        want_sha = sha.hexdigest()
        want_root = merkle.hexdigest()

        # while it is being hashed: never in by-name/ (check by-name first, then the xattr:
        # present-then-`hashing` is the inconsistency)
        seen_hashing = False
        deadline = time.monotonic() + HASH_WAIT
        while True:
            present = os.path.lexists(m.by_name("big.bin"))
            x = T.get_root_xattr(path)
            if x == "hashing":
                seen_hashing = True
                check(not present, "by-name/big.bin exists while the xattr says 'hashing'")
            elif x is not None:
                break
            if time.monotonic() > deadline:
                T.fail(f"big.bin not hashed after {HASH_WAIT:.0f} s (xattr {x!r})")
            time.sleep(0.05)
        root = T.wait_hashed(path, timeout=HASH_WAIT)
        print(f"    root {root} (the xattr said 'hashing' first: {seen_hashing})")
        check_eq(root, want_root, "xattr root of the 1 GiB file vs the test's own BEP 52 root")

        st = os.stat(m.backing("big.bin"))
        check_eq(st.st_size, SIZE, "size of the backing file")
        check_eq(T.digfs_hash(m.backing("big.bin")), want_root, "`digfs hash` of the backing file")

        bh = m.by_hash(root)
        T.wait_exists(bh)
        check_eq(os.stat(bh).st_size, SIZE, "st_size of by-hash/<root>")
        check_eq(T.sha256_file(bh, 4 * MIB), want_sha, "sha256 of by-hash/<root>")

        T.wait_exists(m.by_name("big.bin"))
        check_eq(os.readlink(m.by_name("big.bin")), "../by-hash/" + root, "readlink by-name")
        fd = os.open(m.by_name("big.bin"), os.O_RDONLY)
        try:
            for off, n in [(0, MIB), (SIZE - MIB, MIB + 10), ((1 << 30) - 5, 100),
                           ((1 << 30) - T.LEAF, 2 * T.LEAF), (123456789, 3 * MIB + 1),
                           (SIZE - 1, 1)]:
                check_bytes(os.pread(fd, n, off), gen.range(off, n),
                            f"pread(by-name/big.bin, {n}, {off})")
        finally:
            os.close(fd)

        check_eq(m.unmount(), 0, "exit status")
        m.start()
        check(root in os.listdir(m.by_hash()), "root of the big file not listed after remount")
        fd = os.open(m.by_hash(root), os.O_RDONLY)
        try:
            check_bytes(os.pread(fd, 2 * MIB, SIZE - 2 * MIB), gen.range(SIZE - 2 * MIB, 2 * MIB),
                        "tail of by-hash/<root> after remount")
        finally:
            os.close(fd)
        check_eq(m.unmount(), 0, "exit status")


if __name__ == "__main__":
    T.main()
