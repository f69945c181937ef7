"""digfs status: the control socket answers with what the node holds and serves; it is owner-only
and goes away with the mount."""

import json
import os
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

NOBODY = 65534


def status(mnt, *args, **kw):
    return subprocess.run([T.BIN, "status", *args, mnt], capture_output=True, text=True,
                          timeout=60, **kw)


def test_status_reports_shared_files_roots_cache_and_open_files():
    m = T.Mount("status", opts=["cache_size=2G"])
    data = T.data_of(3 << 20, 51)
    root = T.share(m, "big.bin", data)
    T.share(m, "small.bin", T.data_of(100, 52))
    with open(m.by_hash(root), "rb") as reader:
        reader.read(10)
        r = status(m.mnt, "--json")
        check_eq(r.returncode, 0, f"digfs status --json exit status ({r.stderr})")
        s = json.loads(r.stdout)
        check_eq(s["shared"]["files"], 2, "shared files")
        check_eq(s["shared"]["hashed"], 2, "hashed files")
        check_eq(s["roots"]["held"], 2, "roots held")
        check_eq(s["cache"]["limit"], 2 << 30, "cache limit from cache_size=2G")
        check_eq(s["data_dir"], m.data, "data dir")
        opened = [o for o in s["open"] if o["root"] == root]
        check_eq(len(opened), 1, f"open roots: {s['open']}")
        check_eq(opened[0]["readers"], 1, "readers of the open root")
        check_eq(opened[0]["length"], len(data), "length of the open root")
        check_eq(opened[0]["blocks_held"], opened[0]["blocks_total"], "a shared root is whole")
        net = s["network"]
        check(isinstance(net, dict) and 0 < net["port"] < 65536, "network.port", net)
        check_eq((net["peers"], net["banned"], net["bytes_in"]), (0, 0, 0),
                 "network peers, bans and bytes of a node alone")
        check_eq(net["dht"]["nodes"], 0, "DHT nodes with bootstrap=none")
        check_eq(s["swarms"], [], "swarms of a node nobody talks to")
        nat = net["nat"]
        check_eq(nat["class"], "unknown", "NAT class with no DHT node to report our address")
        check_eq((nat["observers"], nat["address"], nat["peers_see"]), (0, None, None),
                 "what observers and peers reported")
        check_eq(nat["holepunch"]["asked"], 0, "hole punching asked")
        check(isinstance(nat["relay"], dict) and 0 < nat["relay"]["port"] < 65536,
              "the relay (on by default) listens", nat)
        check_eq((net["stalled"], net["replaced"]), (0, 0), "stalled and replaced connections")
    # Closed: the root is no longer open.
    s = json.loads(status(m.mnt, "--json").stdout)
    check(all(o["root"] != root for o in s["open"]), f"still open after close: {s['open']}")
    human = status(m.mnt)
    check_eq(human.returncode, 0, "digfs status exit status")
    check("2 roots held" in human.stdout, f"human view: {human.stdout}")
    check("2 files (2 hashed" in human.stdout, f"human view: {human.stdout}")
    check("  nat      unknown (too few observers; 0 observers)" in human.stdout,
          f"human view: {human.stdout}")
    check("  relay    port " in human.stdout, f"human view: {human.stdout}")


def test_control_socket_is_owner_only_and_removed_at_unmount():
    m = T.Mount("status-perm", opts=["allow_other"])
    path = os.getxattr(m.mnt, "user.digfs.control").decode()
    st = os.stat(path)
    check(stat.S_ISSOCK(st.st_mode), f"{path} is not a socket")
    check_eq(stat.S_IMODE(st.st_mode), 0o600, "control socket mode")
    check_eq(st.st_uid, os.geteuid(), "control socket owner")
    if os.geteuid() == 0:
        os.chmod(m.dir, 0o755)  # the other user can reach the mount (allow_other) ...

        def as_nobody():
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        r = status(m.mnt, "--json", preexec_fn=as_nobody)
        check(r.returncode != 0, f"another user read the status: {r.stdout}")
        check("Permission denied" in r.stderr, f"another user's error: {r.stderr}")
    check_eq(m.unmount(), 0, "exit status after unmount")
    check(not os.path.exists(path), "control socket left behind after unmount")


def pin(cmd, path):
    return subprocess.run([T.BIN, cmd, path], capture_output=True, text=True, timeout=60)


def test_pin_and_unpin_survive_remount():
    m = T.Mount("pin")
    data = T.data_of(40000, 53)
    root = T.share(m, "p.bin", data)
    check_eq(os.getxattr(m.by_hash(root), "user.digfs.pinned"), b"0", "pinned before")
    r = pin("pin", m.by_name("p.bin"))
    check_eq(r.returncode, 0, f"digfs pin by-name/p.bin ({r.stderr})")
    check_eq(os.getxattr(m.by_hash(root), "user.digfs.pinned"), b"1", "pinned after pin")
    check_eq(m.unmount(), 0, "unmount")
    m.start()
    check_eq(os.getxattr(m.by_hash(root), "user.digfs.pinned"), b"1", "pinned after remount")
    r = pin("unpin", m.shared("p.bin"))
    check_eq(r.returncode, 0, f"digfs unpin shared/p.bin ({r.stderr})")
    check_eq(os.getxattr(m.by_hash(root), "user.digfs.pinned"), b"0", "pinned after unpin")
    check_eq(T.read_file(m.by_hash(root)), data, "bytes after unpin (a shared root stays)")
    r = pin("pin", "/etc/hostname")
    check(r.returncode == 1 and "not a file of a digfs mount" in r.stderr,
          f"pin outside digfs: {r.returncode} {r.stderr}")


def test_status_of_something_else_fails_clearly():
    r = status("/tmp")
    check(r.returncode == 1, f"exit status for a non-digfs path: {r.returncode}")
    check("not a digfs mount" in r.stderr, f"message: {r.stderr}")


if __name__ == "__main__":
    T.main()
