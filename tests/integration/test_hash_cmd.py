#!/usr/bin/python3
"""Integration test of `digfs hash FILE...`.

Runs the built binary (path in $DIGFS_BIN) on generated files and compares each root with the
BitTorrent v2 "pieces root" libtorrent computes for the same file, and files of at most 16 KiB
(whose root is their SHA-256) with hashlib and with the output of sha256sum itself.

Needs /usr/bin/python3 with python3-libtorrent (2.0). Exit status: 0 pass, 1 fail, 77 skip.
"""
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile

try:
    import libtorrent as lt
except ImportError as e:
    print(f"SKIP: cannot import libtorrent: {e}")
    sys.exit(77)

BLOCK = 16384
MIB = 1024 * 1024
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 5 * MIB + 7, 40 * MIB + 12345]
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
TIMEOUT = 300

failures = []


def check(cond, what):
    if cond:
        print(f"ok   {what}")
    else:
        print(f"FAIL {what}")
        failures.append(what)


def content(size):
    return random.Random(size * 7919 + 1).randbytes(size)


def lt_pieces_root(path):
    """The v2 pieces root libtorrent computes for the single file at path (hex)."""
    if os.path.getsize(path) == 0:
        return EMPTY_SHA256  # libtorrent makes no torrent of an empty file
    fs = lt.file_storage()
    lt.add_files(fs, path)
    ct = lt.create_torrent(fs, 0, lt.create_torrent.v2_only)  # 0 = libtorrent picks
    lt.set_piece_hashes(ct, os.path.dirname(path))
    tree = ct.generate()[b"info"][b"file tree"]
    node = tree[os.path.basename(path).encode()][b""]
    check(node[b"length"] == os.path.getsize(path), f"libtorrent length of {path}")
    return node[b"pieces root"].hex()


def run(args, **kw):
    return subprocess.run([BIN, "hash"] + args, capture_output=True, timeout=TIMEOUT, **kw)


def parse(stdout):
    """{name: root} from lines '<64 hex>  NAME'."""
    roots = {}
    for line in stdout.decode().splitlines():
        root, sep, name = line.partition("  ")
        check(sep == "  " and len(root) == 64 and all(c in "0123456789abcdef" for c in root),
              f"well-formed output line {line!r}")
        roots[name] = root
    return roots


def test_roots(tmp):
    files = []
    for size in SIZES:
        path = os.path.join(tmp, f"f{size}")
        with open(path, "wb") as f:
            f.write(content(size))
        files.append(path)
    p = run(files)
    check(p.returncode == 0, f"exit status 0 for {len(files)} files (got {p.returncode}, "
          f"stderr {p.stderr.decode()!r})")
    check(p.stderr == b"", "nothing on stderr")
    roots = parse(p.stdout)
    check(list(roots) == files, "one line per file, in order")
    for path, size in zip(files, SIZES):
        got = roots.get(path)
        check(got == lt_pieces_root(path), f"root of {size} bytes equals libtorrent's pieces root")
        if size <= BLOCK:
            with open(path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            check(got == sha, f"root of {size} bytes equals its SHA-256")

    small = [f for f, s in zip(files, SIZES) if s <= BLOCK]
    if shutil.which("sha256sum"):
        want = subprocess.run(["sha256sum"] + small, capture_output=True, timeout=TIMEOUT)
        got = run(small)
        check(got.stdout == want.stdout, "output for small files is identical to sha256sum's")
    return files


def test_escaped_names(tmp):
    """Names with a newline, a carriage return or a backslash are escaped as sha256sum does."""
    if not shutil.which("sha256sum"):
        return
    names = []
    for i, name in enumerate(["new\nline", "back\\slash", "carriage\rreturn", "plain name"]):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(content(100 + i))
        names.append(path)
    want = subprocess.run(["sha256sum"] + names, capture_output=True, timeout=TIMEOUT)
    got = run(names)
    check(got.returncode == 0 and got.stdout == want.stdout,
          f"escaped names as sha256sum: {got.stdout!r} vs {want.stdout!r}")


def test_errors(tmp, files):
    missing = os.path.join(tmp, "does-not-exist")
    p = run([files[1], missing, tmp, files[2]])
    check(p.returncode != 0, f"non-zero exit status with a missing file (got {p.returncode})")
    err = p.stderr.decode()
    check(f"digfs hash: {missing}: No such file or directory" in err,
          f"stderr names the missing file: {err!r}")
    check(f"digfs hash: {tmp}: Is a directory" in err, f"stderr names the directory: {err!r}")
    roots = parse(p.stdout)
    check(list(roots) == [files[1], files[2]], "the other files are still printed")
    check(roots.get(files[2]) == lt_pieces_root(files[2]), "and their roots are right")


def test_stdin(files):
    big = files[SIZES.index(5 * MIB + 7)]
    want = lt_pieces_root(big)
    with open(big, "rb") as f:
        data = f.read()
    # a pipe
    p = run(["-"], input=data)
    check(p.returncode == 0 and p.stdout.decode() == f"{want}  -\n",
          f"'-' reads a pipe on standard input: {p.stdout!r}")
    p = run([], input=data)
    check(p.returncode == 0 and p.stdout.decode() == f"{want}  -\n",
          f"no file argument reads standard input: {p.stdout!r}")
    # a regular file as standard input, mixed with a named file
    with open(big, "rb") as f:
        p = run([files[1], "-"], stdin=f)
    check(p.returncode == 0 and parse(p.stdout) == {files[1]: lt_pieces_root(files[1]),
                                                    "-": want},
          f"'-' reads a regular file on standard input: {p.stdout!r}")
    p = run(["-"], input=b"")
    check(p.stdout.decode() == f"{EMPTY_SHA256}  -\n", "empty standard input")


def main():
    global BIN
    BIN = os.environ.get("DIGFS_BIN")
    if not BIN:
        print("SKIP: DIGFS_BIN is not set")
        return 77
    if not os.access(BIN, os.X_OK):
        print(f"FAIL: DIGFS_BIN={BIN} is not executable")
        return 1
    with tempfile.TemporaryDirectory(prefix="digfs-hash-") as tmp:
        files = test_roots(tmp)
        test_escaped_names(tmp)
        test_errors(tmp, files)
        test_stdin(files)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
