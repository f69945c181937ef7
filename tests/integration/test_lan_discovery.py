"""LAN discovery (BEP 14): two digfs nodes on one network, with no DHT bootstrap and no peers
given, find each other by multicast: B looks up a root A shares and reads it.

The nodes run in a network namespace this test creates (only its loopback, with multicast on),
entered with nsenter so that their FUSE mounts stay visible here. Nothing is sent outside it.
"""

import os
import shutil
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

NS = f"dg-lsd-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class NsMount(T.Mount):
    """A Mount whose digfs runs inside the test's network namespace."""

    def command(self, *args, **kw):
        return ["nsenter", f"--net=/run/netns/{NS}", *super().command(*args, **kw)]


def setup_namespace():
    if os.geteuid() != 0:
        raise T.SkipTest("needs root to create a network namespace")
    if not shutil.which("ip") or not shutil.which("nsenter"):
        raise T.SkipTest("needs ip (iproute2) and nsenter (util-linux)")
    r = subprocess.run(["ip", "netns", "add", NS], capture_output=True, text=True)
    if r.returncode != 0:
        raise T.SkipTest(f"cannot create a network namespace: {r.stderr.strip()}")
    for cmd in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                ["route", "add", "224.0.0.0/4", "dev", "lo"]):
        r = subprocess.run(["ip", "-n", NS, *cmd], capture_output=True, text=True)
        check_eq(r.returncode, 0, f"ip -n {NS} {' '.join(cmd)} ({r.stderr.strip()})")


def teardown_namespace():
    T.cleanup_all()
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def test_lan_discovery_finds_a_peer():
    """B knows no peer and no DHT node; its lookup of A's root goes out by multicast, A
    answers, and B reads the file from A byte-exact. Without lsd the same lookup fails."""
    setup_namespace()
    try:
        data = T.data_of(3 * T.LEAF * 64 + 7, 401)
        a = NsMount("lsd-a", opts=["lsd=yes"])
        root = T.share(a, "f.bin", data)
        quiet = NsMount("lsd-off", opts=["lsd=no", "lookup_timeout=2"])
        T.expect_errno(2, os.stat, quiet.by_hash(root), what="lookup without LAN discovery")
        b = NsMount("lsd-b", opts=["lsd=yes", "lookup_timeout=20"])
        st = os.stat(b.by_hash(root))
        check_eq(st.st_size, len(data), "size found through LAN discovery")
        T.check_bytes(T.read_file(b.by_hash(root)), data, "bytes from the peer found on the LAN")
        check(T.status_json(a)["network"]["bytes_out"] >= len(data), "A served B")
    finally:
        teardown_namespace()


T.main()
