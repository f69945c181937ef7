"""The peer wire over uTP (engine/utp.c, docs/PROTOCOL.md section 5) between real digfs
nodes: on loopback with prefer_utp=yes, and in the network lab across a link with `tc netem`
loss and delay, where the transfer must complete (LEDBAT with selective ACKs does not collapse)
and stay byte-exact. Throughput is printed, never asserted (bench/ has the numbers).

The lab part needs root, namespaces and tc; it is skipped (not failed) where those are
missing."""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "netlab"))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

MIB = 1 << 20


def timed_read(path):
    t0 = time.monotonic()
    data = T.read_file(path)
    return data, time.monotonic() - t0


def test_loopback_prefer_utp_64mib():
    """B reads 64 MiB shared by A with prefer_utp=yes: the peer connection is uTP (no TCP
    peer), the bytes are exact, and both nodes' uTP counters show the connection."""
    data = T.data_of(64 * MIB, 611)
    port_a = T.free_port()
    a = T.Mount("utp-a", opts=[f"port={port_a}"])
    root = T.share(a, "u.bin", data)
    b = T.Mount("utp-b", opts=[f"peers=127.0.0.1:{port_a}", "prefer_utp=yes"])
    got, secs = timed_read(b.by_hash(root))
    T.check_bytes(got, data, "64 MiB read over uTP")
    sw = T.swarm_of(b, root)
    by = sw.get("peers_by", {})
    check(by.get("utp", 0) >= 1 and by.get("tcp", 0) == 0,
          "B's peer for the root is connected over uTP, not TCP", sw)
    nat = T.status_json(b)["network"]["nat"]
    check(nat["utp"]["connections"] >= 1, "B's uTP module holds the connection", nat)
    print(f"    64 MiB over uTP on loopback: {len(data) / MIB / secs:.0f} MiB/s "
          f"({nat['utp']['retransmits']} retransmits)")
    a.cleanup()
    b.cleanup()


def test_utp_refused_without_listener():
    """prefer_utp towards a port where no digfs listens: the lookup fails with ENOENT after the
    lookup timeout (the uTP SYN goes unanswered), the attempt is given up and freed (no peer
    left in the count) and the process stays responsive."""
    dead = T.free_port()
    b = T.Mount("utp-dead", opts=[f"peers=127.0.0.1:{dead}", "prefer_utp=yes",
                                  "lookup_timeout=3"])
    root = "ab" * 32
    T.expect_errno({2}, os.stat, b.by_hash(root), what="lookup through a dead uTP peer")
    T.wait_until(lambda: T.status_json(b)["network"]["peers"] == 0,
                 "the unanswered uTP connection to be given up", timeout=30, interval=0.5)
    check_eq(T.status_json(b)["network"]["nat"]["utp"]["connections"], 0,
             "uTP connections left")
    b.cleanup()


def _lab():
    import netlab
    reason = netlab.unusable_reason()
    if reason:
        raise T.SkipTest(reason)
    return netlab, netlab.Lab()


def test_lab_loss_and_delay():
    """Two public hosts in the lab; B reads from A over uTP (prefer_utp) three times: 16 MiB
    over a clean link, 8 MiB with 40 ms each way, 4 MiB with 40 ms each way and 3% loss each
    way (the lab's netem on A's link). Every read completes within the read timeout and is
    byte-exact; the lossy run shows retransmissions (the loss was real) and still moves data."""
    netlab, L = _lab()
    from test_netlab import LabMount
    with L:
        pa, pb = L.public("pa"), L.public("pb")
        common = ["port=6881", "read_timeout=120", "lookup_timeout=30", "prefer_utp=yes"]
        a = LabMount(L, pa, "utp-lab-a", common)
        b = LabMount(L, pb, "utp-lab-b", [f"peers={pa.addr}:6881", *common])
        try:
            runs = [("clean", {}, 16), ("40 ms", {"delay_ms": 40}, 8),
                    ("40 ms + 3% loss", {"delay_ms": 40, "loss": 3}, 4)]
            rates = []
            for i, (name, netem, mib) in enumerate(runs):
                if netem:
                    L.netem(pa, **netem)
                data = T.data_of(mib * MIB, 620 + i)
                root = T.share(a, f"lab{i}.bin", data)
                before = T.status_json(a)["network"]["nat"]["utp"]["retransmits"]
                got, secs = timed_read(b.by_hash(root))
                T.check_bytes(got, data, f"{mib} MiB over uTP, {name}")
                by = T.swarm_of(b, root).get("peers_by", {})
                check(by.get("utp", 0) >= 1 and by.get("tcp", 0) == 0,
                      f"{name}: connected over uTP", by)
                retr = T.status_json(a)["network"]["nat"]["utp"]["retransmits"] - before
                rates.append((name, len(data) / MIB / secs, retr))
                if "loss" in netem:
                    check(retr > 0, "the lossy link made the sender retransmit", retr)
                L.netem_clear(pa)
            for name, rate, retr in rates:
                print(f"    {name:>16}: {rate:6.1f} MiB/s, {retr} retransmits by the sender")
        finally:
            b.cleanup()
            a.cleanup()


if __name__ == "__main__":
    T.main()
