#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target into corpus/<target>/ (run from anywhere).

The seeds are committed; rerun this only to change them. Formats: engine/record.c (roots:
40 bytes, files: 72-byte header + path), engine/root_name.h, mount/options.h.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 16384


def piece_size(length):
    blocks = (length + BLOCK - 1) // BLOCK
    shift = 0
    while (blocks + (1 << shift) - 1) >> shift > 1024:
        shift += 1
    return BLOCK << shift


def root_record(length, blocks_cached=0, flags=0, last_access=1700000000, version=1, piece=None):
    body = struct.pack("<IQQQq", flags, length, piece_size(length) if piece is None else piece,
                       blocks_cached, last_access)
    rec = bytes([version, 0, 0, 0]) + body
    assert len(rec) == 40
    return rec


def file_record(path, state=2, error=0, dev=0x801, size=12345, mtime=1700000000123456789,
                ctime=1700000000987654321, root=bytes(range(32)), version=1):
    p = path.encode() if isinstance(path, str) else path
    head = bytes([version, state, len(p) & 0xff, len(p) >> 8])
    head += struct.pack("<iQQqq", error, dev, size, mtime, ctime) + root
    assert len(head) == 72
    return head + p


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    t = "fuzz_root_record"
    write(t, "empty-file", root_record(0))
    write(t, "one-byte", root_record(1, 1))
    write(t, "one-block", root_record(BLOCK, 1, flags=1))
    write(t, "16MiB-plus-1", root_record(16 * 1024 * 1024 + 1, 1025))
    write(t, "10GiB-partial", root_record(10 << 30, 12345))
    write(t, "bad-piece-size", root_record(BLOCK * 3, 0, piece=2 * BLOCK))
    write(t, "bad-version", root_record(100, version=2))
    write(t, "short", root_record(100)[:39])

    t = "fuzz_file_record"
    write(t, "hashed", file_record("music/song.flac"))
    write(t, "hashing", file_record("a", state=1, root=bytes(32)))
    write(t, "failed", file_record("dir/x", state=3, error=13))
    write(t, "long-path", file_record("/".join(["c" * 200] * 20)))
    write(t, "bad-dotdot", file_record("a/../b"))
    write(t, "bad-len", file_record("abc")[:-1])
    write(t, "bad-state", file_record("abc", state=4))

    t = "fuzz_root_name"
    hexroot = bytes(range(32)).hex()
    write(t, "root", hexroot.encode())
    write(t, "root-upper", hexroot.upper().encode())
    write(t, "root-short", hexroot[:63].encode())
    write(t, "name", b"file.txt")
    write(t, "dotdot", b"..")
    write(t, "path", b"dir/sub/file")
    write(t, "path-escape", b"a/../../etc/passwd")
    write(t, "nul", b"a\x00b")
    write(t, "long-name", b"n" * 256)

    t = "fuzz_options"
    write(t, "size", b"10G")
    write(t, "size-mib", b"5MiB\x00/mnt")
    write(t, "seconds", b"0.5")
    write(t, "mount", b"/mnt/digfs\x00-f\x00-o\x00data_dir=/srv/d,cache_size=10G,allow_other")
    write(t, "glued", b"m\x00-odata_dir=rel,read_timeout=30,log_level=debug\x00-s")
    write(t, "escaped", b"m\x00-o\x00data_dir=/a\\,b,fsname=x\\,y,default_permissions")
    write(t, "debug", b"-d\x00mnt\x00-odebug")
    write(t, "help", b"-h")
    write(t, "bad", b"m\x00-o\x00cache_size=12X\x00extra")


if __name__ == "__main__":
    main()
