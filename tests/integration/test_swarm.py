"""The swarm on loopback: several digfs nodes, each with its own FUSE mount, find each other
through the DHT (or are given peers by address) and read each other's files by hash, fetched
lazily and verified. Every node runs with a loopback bootstrap or bootstrap=none.

What each test proves is in its docstring. Byte counts come from `digfs status --json`."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
import wire_peer as W  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

MIB = 1 << 20


def seeder(tag, data, rel="file.bin", opts=()):
    """A node sharing @data on a port of its own. Returns (mount, root, port)."""
    port = T.free_port()
    m = T.Mount(tag, opts=[f"port={port}", *opts])
    root = T.share(m, rel, data)
    return m, root, port


def test_dht_discovery_three_nodes_64mib():
    """A shares 64 MiB; B and C know only A as their DHT bootstrap node. Each finds A through
    the DHT (A announced the root's swarm key), and reads the file by hash through its own
    mount: size right on lookup, bytes exact."""
    data = T.data_of(64 * MIB, 301)
    a, root, port_a = seeder("swarm-a", data)
    boot = [f"bootstrap=127.0.0.1:{port_a}", "lookup_timeout=30"]
    b = T.Mount("swarm-b", opts=boot)
    c = T.Mount("swarm-c", opts=boot)
    # B's and C's tables fill from A; A announces once its table has nodes.
    T.wait_until(lambda: T.status_json(a)["network"]["dht"]["nodes"] >= 2,
                 "A's DHT table to learn B and C", timeout=60)
    for m in (b, c):
        path = m.by_hash(root)
        st = T.wait_until(lambda: _stat_or_none(path), f"{m.mnt}: lookup of the root",
                          timeout=90, interval=0.5)
        check_eq(st.st_size, len(data), "size of by-hash/<root> after the lookup")
        T.check_bytes(T.read_file(path), data, f"{m.mnt}: by-hash read")
    # B and C fetched it all, from A and (once B held it) from each other.
    served = sum(T.status_json(m)["network"]["bytes_out"] for m in (a, b, c))
    check(served >= 2 * len(data), f"bytes served in all: {served}")
    check(T.status_json(a)["network"]["bytes_out"] > 0, "A served")


def test_public_address_learned_from_dht_replies():
    """The "ip" field of DHT replies tells a node the address others see it at: with three
    other nodes answering, B learns 127.0.0.1 and its own port (status public_address)."""
    port_a = T.free_port()
    a = T.Mount("ip-a", opts=[f"port={port_a}"])
    boot = f"bootstrap=127.0.0.1:{port_a}"
    b, c, d = (T.Mount(f"ip-{t}", opts=[boot]) for t in "bcd")
    port_b = T.status_json(b)["network"]["port"]
    T.wait_until(lambda: T.status_json(b)["network"]["public_address"],
                 "B to learn its public address", timeout=120, interval=0.5)
    check_eq(T.status_json(b)["network"]["public_address"], f"127.0.0.1:{port_b}",
             "B's address as the other nodes see it")
    for m in (a, c, d):
        check(m.alive(), f"{m.mnt} alive")


def _stat_or_none(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def test_random_read_fetches_little():
    """A 64 KiB read at offset 40 MiB on a fresh node fetches less than 1 MiB in all
    (metadata, hashes, blocks, framing): reads are lazy."""
    data = T.data_of(64 * MIB, 302)
    a, root, port_a = seeder("lazy-a", data)
    d = T.Mount("lazy-d", opts=[f"peers=127.0.0.1:{port_a}"])
    got = T.read_range(d.by_hash(root), 40 * MIB, 64 << 10)
    T.check_bytes(got, data[40 * MIB:40 * MIB + (64 << 10)], "64 KiB at 40 MiB")
    fetched = T.status_json(d)["network"]["bytes_in"]
    check(0 < fetched < MIB, f"bytes fetched for a 64 KiB read: {fetched}")


def test_seeder_killed_mid_read():
    """Two seeders hold the same file; the reader fetches from both. One is killed (kill -9)
    halfway through the read: the read completes, byte-exact, from the other."""
    data = T.data_of(48 * MIB, 303)
    s1, root, p1 = seeder("kill-s1", data)
    s2, root2, p2 = seeder("kill-s2", data)
    check_eq(root2, root, "both seeders hash the same file to the same root")
    r = T.Mount("kill-r", opts=[f"peers=127.0.0.1:{p1}+127.0.0.1:{p2}", "read_timeout=120"])
    path = r.by_hash(root)
    half = len(data) // 2
    with open(path, "rb", buffering=0) as f:
        first = b""
        while len(first) < half:
            chunk = f.read(min(MIB, half - len(first)))
            check(chunk, "short read before the kill")
            first += chunk
        sw = T.swarm_of(r, root)
        check(sw and sw["peers"] == 2, "the reader is connected to both seeders", sw)
        s1.kill9()
        rest = b""
        while True:
            chunk = f.read(MIB)
            if not chunk:
                break
            rest += chunk
    T.check_bytes(first + rest, data, "read across the seeder's death")


def test_cache_blocks_are_served():
    """Every node serves the verified blocks in its cache: B fetches the file from A, A goes
    away, and C, given only B, reads it byte-exact."""
    data = T.data_of(5 * MIB + 77, 304)
    a, root, port_a = seeder("cache-a", data)
    port_b = T.free_port()
    b = T.Mount("cache-b", opts=[f"port={port_b}", f"peers=127.0.0.1:{port_a}"])
    T.check_bytes(T.read_file(b.by_hash(root)), data, "B's read from A")
    a.unmount()
    c = T.Mount("cache-c", opts=[f"peers=127.0.0.1:{port_b}"])
    T.check_bytes(T.read_file(c.by_hash(root)), data, "C's read from B's cache")
    check(T.status_json(b)["network"]["bytes_out"] >= len(data), "B served C")


def test_unknown_root_enoent_within_lookup_timeout():
    """A root nobody has: the lookup ends with ENOENT once the lookup timeout has passed, and
    `ls by-hash/` never waits on the network."""
    a, root, port_a = seeder("unknown-a", T.data_of(1000, 305))
    d = T.Mount("unknown-d", opts=[f"peers=127.0.0.1:{port_a}", "lookup_timeout=2"])
    missing = "%064x" % random.getrandbits(256)
    start = time.monotonic()
    T.expect_errno(2, os.stat, d.by_hash(missing))
    took = time.monotonic() - start
    check(took >= 1.5, f"ENOENT came after {took:.1f} s, before the 2 s lookup timeout")
    check(took < 30, f"ENOENT took {took:.1f} s with a 2 s lookup timeout")
    start = time.monotonic()
    os.listdir(d.by_hash())
    check(time.monotonic() - start < 30, "ls by-hash/ waited")


def test_reader_killed_while_waiting():
    """A reader waiting for blocks nobody can send (the only seeder is gone after the lookup)
    is killed with SIGKILL: it dies at once, its wait ends (the kernel's page-cache read goes
    on without it until the read timeout), no waiting read is left behind, and the mount
    stays healthy and serves the next reader with a clear ETIMEDOUT."""
    data = T.data_of(3 * MIB, 306)
    a, root, port_a = seeder("wait-a", data)
    d = T.Mount("wait-d", opts=[f"peers=127.0.0.1:{port_a}", "read_timeout=4"])
    check_eq(os.stat(d.by_hash(root)).st_size, len(data), "size after lookup")
    a.kill9()
    p = subprocess.Popen(["dd", f"if={d.by_hash(root)}", "of=/dev/null", "bs=64k", "skip=10",
                          "count=1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    T.wait_until(lambda: T.status_json(d)["reads"]["waiting"] >= 1, "the read to wait")
    p.kill()
    try:
        code = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        T.fail("a reader waiting on by-hash/ could not be killed")
    check_eq(code, -signal.SIGKILL, "exit of the killed reader")
    T.wait_until(lambda: T.status_json(d)["reads"]["waiting"] == 0,
                 "no read left waiting after the read timeout")
    check(d.alive(), "digfs still running")
    check_eq(os.stat(d.by_hash(root)).st_size, len(data), "mount healthy after the kill")
    with open(d.by_hash(root), "rb", buffering=0) as f:
        f.seek(2 * MIB)
        T.expect_errno(110, f.read, 4096, what="read of data nobody has")  # ETIMEDOUT


def test_pinned_root_is_fetched_completely():
    """Pinning a by-hash file fetches all of it in the background, without a reader."""
    data = T.data_of(6 * MIB + 5, 307)
    a, root, port_a = seeder("pin-a", data)
    d = T.Mount("pin-d", opts=[f"peers=127.0.0.1:{port_a}"])
    check_eq(os.stat(d.by_hash(root)).st_size, len(data), "size after lookup")
    r = subprocess.run([T.BIN, "pin", d.by_hash(root)], capture_output=True, text=True,
                       timeout=60)
    check_eq(r.returncode, 0, f"digfs pin ({r.stderr.strip()})")
    blocks = (len(data) + T.LEAF - 1) // T.LEAF
    T.wait_until(lambda: (T.swarm_of(d, root) or {}).get("blocks_held") == blocks,
                 "every block of the pinned root", timeout=120)
    a.kill9()
    T.check_bytes(T.read_file(d.by_hash(root)), data, "pinned root read with the seeder gone")


def test_port_kept_across_restarts():
    """Without port=, a node picks a port and keeps it: after a restart it listens on the
    same one (peers and DHT nodes that knew it still find it)."""
    m = T.Mount("port-keep")
    port = T.status_json(m)["network"]["port"]
    check(0 < port < 65536, f"port {port}")
    m.unmount()
    m.start()
    check_eq(T.status_json(m)["network"]["port"], port, "port after a restart")


def test_complete_cached_root_is_announced():
    """A root fetched completely into the cache is announced on the DHT (announce_cached
    defaults to yes): once the first seeder is gone, a node that only has the DHT finds the
    root at the node that fetched it."""
    data = T.data_of(2 * MIB + 3, 308)
    port_d = T.free_port()
    d = T.Mount("ann-d", opts=[f"port={port_d}"])  # a plain DHT node that stays
    boot = f"bootstrap=127.0.0.1:{port_d}"
    a, root, port_a = seeder("ann-a", data, opts=[boot])
    b = T.Mount("ann-b", opts=[boot, f"peers=127.0.0.1:{port_a}"])
    T.wait_until(lambda: T.status_json(b)["network"]["dht"]["nodes"] >= 2,
                 "B's DHT table to know D and A", timeout=60)
    T.check_bytes(T.read_file(b.by_hash(root)), data, "B's read from A")
    T.wait_until(lambda: T.status_json(d)["network"]["dht"]["stored_peers"] >= 2,
                 "D to store the announces of A and B", timeout=90)
    a.unmount()
    c = T.Mount("ann-c", opts=[boot, "lookup_timeout=30"])
    st = T.wait_until(lambda: _stat_or_none(c.by_hash(root)), "C's lookup through the DHT",
                      timeout=90, interval=0.5)
    check_eq(st.st_size, len(data), "size found through B's announce")
    T.check_bytes(T.read_file(c.by_hash(root)), data, "C's read from B")

def test_cache_limit_and_full_cache_disk():
    """Fetched content obeys cache_size, and a cache disk that fills up makes room by evicting
    what nobody reads: a node whose cache is an 8 MiB tmpfs reads two 6 MiB files in turn,
    both byte-exact, and a third node with cache_size=8M stays near its limit."""
    if os.geteuid() != 0:
        raise T.SkipTest("needs root to mount a small tmpfs as the cache dir")
    one, two = T.data_of(6 * MIB, 309), T.data_of(6 * MIB + 1, 310)
    a, root1, port_a = seeder("cachefull-a", one, rel="one.bin")
    root2 = T.share(a, "two.bin", two)
    r = T.Mount("cachefull-r", start=False)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", r.cache],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise T.SkipTest(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    r.start([f"peers=127.0.0.1:{port_a}", "read_timeout=20"])
    T.check_bytes(T.read_file(r.by_hash(root1)), one, "first file through an 8 MiB cache")
    T.check_bytes(T.read_file(r.by_hash(root2)), two, "second file: the first made room")
    check(r.alive(), "digfs alive after filling its cache disk")
    limited = T.Mount("cachelimit-r", opts=[f"peers=127.0.0.1:{port_a}", "cache_size=8M"])
    T.check_bytes(T.read_file(limited.by_hash(root1)), one, "first file, cache_size=8M")
    T.check_bytes(T.read_file(limited.by_hash(root2)), two, "second file, cache_size=8M")
    T.wait_until(lambda: T.status_json(limited)["cache"]["bytes"] <= 8 * MIB,
                 "the cache to shrink back under cache_size", timeout=30)


def test_endgame_routes_around_a_stalled_peer():
    """A peer that takes requests and never answers them (a stalled or overloaded peer) does
    not hold a fetch up: once every missing block is asked for, late ones go to a second peer
    (endgame), long before the 60 s request timeout."""
    data = T.data_of(4 * MIB + 9, 311)
    stalled = W.Seeder(data, stall="all")
    try:
        a, root, port_a = seeder("endgame-a", data)
        d = T.Mount("endgame-d", opts=[f"peers=127.0.0.1:{stalled.port}+127.0.0.1:{port_a}"])
        check_eq(os.stat(d.by_hash(root)).st_size, len(data), "size after lookup")
        T.wait_until(lambda: (T.swarm_of(d, root) or {}).get("peers") == 2,
                     "the reader to be connected to both peers")
        r = subprocess.run([T.BIN, "pin", d.by_hash(root)], capture_output=True, text=True,
                           timeout=60)
        check_eq(r.returncode, 0, f"digfs pin ({r.stderr.strip()})")
        blocks = (len(data) + T.LEAF - 1) // T.LEAF
        T.wait_until(lambda: (T.swarm_of(d, root) or {}).get("blocks_held") == blocks,
                     "every block despite the stalled peer", timeout=30)
        check(stalled.stalled > 0, "the stalled peer was asked for blocks (the test proves "
              "nothing otherwise)")
        T.check_bytes(T.read_file(d.by_hash(root)), data, "bytes after the endgame")
    finally:
        stalled.close()


def _interested_peer(port, root_hex, tag):
    """A raw peer that handshakes with the node at @port for @root_hex, says hello (holding
    nothing) and interested. Returns (socket, stream)."""
    import socket
    root = bytes.fromhex(root_hex)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(W.handshake_bytes(root[:20], os.urandom(20)))
    st = W._Stream(sock)
    st.read_handshake()
    hello = W.bencode({b"pex": 0, b"reqq": 250, b"root": root, b"v": tag.encode()})
    sock.sendall(W.frame(W.HELLO, hello) + W.frame(W.HAVE_NONE) + W.frame(W.INTERESTED))
    return sock, st


def test_choking_unchokes_at_most_five():
    """Choking: of 7 interested peers that never upload, a seeder unchokes 4 plus one
    optimistic at once and keeps the other 2 choked (PROTOCOL.md 3.7)."""
    data = T.data_of(MIB, 312)
    a, root, port_a = seeder("choke-a", data)
    peers = [_interested_peer(port_a, root, f"p{i}") for i in range(7)]
    results = [False] * len(peers)

    def watch(i):
        # Read for 3 s (well inside the 10 s choke round) whether an unchoke comes.
        sock, st = peers[i]
        sock.settimeout(3)
        try:
            while True:
                msg_id, _ = st.read_frame()
                if msg_id == W.UNCHOKE:
                    results[i] = True
                    return
        except (W.PeerTimeout, W.PeerClosed):
            return

    try:
        threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(peers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for sock, _ in peers:
            sock.close()
    unchoked = sum(results)
    check_eq(unchoked, 5, "peers unchoked out of 7 interested")


def test_file_over_32_gib():
    """Files over 32 GiB have pieces of more than 2048 blocks, whose leaf hashes take several
    hash requests (PROTOCOL.md 3.5): a sparse 33 GiB file is looked up (its last piece's leaves
    come in parts) and read at 20 GiB, byte-exact, fetching little."""
    size = 33 << 30
    marks = {20 << 30: b"twenty GiB in", (33 << 30) - 5: b"end!!"}
    a, port_a = None, T.free_port()
    a = T.Mount("big-a", opts=[f"port={port_a}"])
    path = a.shared("big.bin")
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in marks.items():
            f.seek(off)
            f.write(b)
    root = T.wait_hashed(path, timeout=600)
    d = T.Mount("big-d", opts=[f"peers=127.0.0.1:{port_a}", "lookup_timeout=60"])
    check_eq(os.stat(d.by_hash(root)).st_size, size, "size of a 33 GiB file after lookup")
    off = 20 << 30
    got = T.read_range(d.by_hash(root), off - 100, 64 << 10)
    want = bytearray(64 << 10)
    want[100:100 + len(marks[off])] = marks[off]
    T.check_bytes(got, bytes(want), "64 KiB around the 20 GiB mark")
    T.check_bytes(T.read_range(d.by_hash(root), size - 5, 5), b"end!!", "the last bytes")
    fetched = T.status_json(d)["network"]["bytes_in"]
    check(fetched < 4 * MIB, f"bytes fetched for two small reads of a 33 GiB file: {fetched}")


T.main()
