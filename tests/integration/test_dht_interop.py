"""Interoperability of digfs's DHT (engine/dht.c, a BEP 5 node) with an independent
implementation, npm's bittorrent-dht (tests/interop: package.json pins it, dht_node.mjs runs
its nodes and speaks a line protocol on stdin/stdout).

One loopback DHT of 4 bittorrent-dht nodes (J0..J3) and 3 digfs nodes (A, B, C, each with
its own FUSE mount), bootstrapped across implementations so that the graph is mixed:
    J0 (no bootstrap) <- J1;  A -> J0;  B -> J1;  J2 -> A;  J3 -> B;  C -> J3.
Before any digfs node starts, J1 announces a key (only J0, a bittorrent-dht node, stores it);
so finding that peer proves that digfs parses bittorrent-dht's get_peers values.

Skipped (exit 77) when node or tests/interop/node_modules/bittorrent-dht is missing
(tests/run-all.sh installs it with `npm ci` before the tests go offline).

Network rule: every node binds or talks to 127.0.0.1 only. digfs nodes get
bootstrap=127.0.0.1:PORT; the bittorrent-dht nodes get explicit loopback bootstrap lists or
none (never the public default), and dht_node.mjs drops any datagram addressed outside
127.0.0.0/8."""

import atexit
import errno
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402

INTEROP = os.path.join(T.REPO, "tests", "interop")
SCRIPT = os.path.join(INTEROP, "dht_node.mjs")
MODULE = os.path.join(INTEROP, "node_modules", "bittorrent-dht")
JS_COMMAND_WAIT = 30  # seconds one lookup or announce of bittorrent-dht may take
# bittorrent-dht warnings that say nothing about message formats: a reply that came after
# its query had timed out, or from another address than the one queried.
BENIGN_WARNINGS = ("Unexpected transaction id", "Out of order response")


def fail(msg, *context):
    """Fails with @msg and each item of @context on lines of its own, in full (transcripts
    are long: digfs_test.check() would cut them short)."""
    T.fail("\n".join([msg, *(str(c) for c in context)]))


def need(cond, msg, *context):
    if not cond:
        fail(msg, *context)


class JsDht:
    """The dht_node.mjs process: N bittorrent-dht nodes on 127.0.0.1."""

    def __init__(self, count, bootstrap="none"):
        node = shutil.which("node")
        self.lines = []          # every line it printed, in order
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [node, SCRIPT, "--nodes", str(count), "--bootstrap", bootstrap], cwd=INTEROP,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, preexec_fn=T._child_setup)
        threading.Thread(target=self._read, daemon=True, name="js-dht-reader").start()
        ready = self.wait_line(lambda w: w[0] == "ready" or w[0] == "error", 30, "`ready`")
        need(ready[0] == "ready", "dht_node.mjs did not start", self.transcript())
        self.ports = [int(p) for p in ready[1:]]
        self.ids = {}
        for w in self.words():
            if w[0] == "node":
                self.ids[int(w[1])] = w[3]

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("(exit)")
            self.cond.notify_all()

    def words(self, since=0):
        with self.cond:
            return [ln.split() or [""] for ln in self.lines[since:]]

    def mark(self):
        with self.cond:
            return len(self.lines)

    def transcript(self, first=15, last=30):
        """Its first and last lines (the start and stores, then the latest answers)."""
        with self.cond:
            lines = list(self.lines)
        if len(lines) > first + last:
            lines = lines[:first] + [f"... ({len(lines) - first - last} lines)"] + lines[-last:]
        return "--- dht_node.mjs output ---\n%s\n--- end ---" % "\n".join(lines)

    def send(self, cmd):
        need(self.proc.poll() is None, f"dht_node.mjs exited ({self.proc.returncode})",
             self.transcript())
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def wait_line(self, pred, timeout, what, since=0):
        """The first line (as words) from index @since on that satisfies @pred."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = since
            while True:
                while i < len(self.lines):
                    w = self.lines[i].split() or [""]
                    i += 1
                    if w == ["(exit)"]:
                        T.fail(f"dht_node.mjs exited while waiting for {what}\n"
                               + self.transcript())
                    if pred(w):
                        return w
                left = deadline - time.monotonic()
                if left <= 0:
                    T.fail(f"dht_node.mjs: no {what} within {timeout} s\n" + self.transcript())
                self.cond.wait(left)

    def add(self, bootstrap):
        """A new node bootstrapped from @bootstrap. Returns (index, port)."""
        since = self.mark()
        self.send(f"add {bootstrap}")
        w = self.wait_line(lambda w: w[0] in ("node", "error"), 30, "`node` after add", since)
        check(w[0] == "node", f"add {bootstrap} failed", " ".join(w))
        i, port = int(w[1]), int(w[2])
        self.ports.append(port)
        self.ids[i] = w[3]
        return i, port

    def lookup(self, i, key):
        """One get_peers lookup by node @i: the set of "ip:port" it reported."""
        since = self.mark()
        self.send(f"lookup {i} {key}")
        end = self.wait_line(lambda w: w[0] in ("lookup-done", "lookup-error") and
                             w[1:3] == [str(i), key], JS_COMMAND_WAIT,
                             f"end of lookup {i} {key}", since)
        peers = {w[3] for w in self.words(since) if w[0] == "peer" and w[1:3] == [str(i), key]}
        return peers, " ".join(end)

    def announce(self, i, key, port):
        since = self.mark()
        self.send(f"announce {i} {key} {port}")
        w = self.wait_line(lambda w: w[0] in ("announced", "announce-error") and
                           w[1:3] == [str(i), key], JS_COMMAND_WAIT,
                           f"end of announce {i} {key}", since)
        need(w[0] == "announced", f"bittorrent-dht node {i} could not announce {key}",
             " ".join(w), self.transcript())

    def ping(self, i, port):
        """bittorrent-dht node @i pings 127.0.0.1:@port: the id in the reply, or None."""
        since = self.mark()
        addr = f"127.0.0.1:{port}"
        self.send(f"ping {i} {addr}")
        w = self.wait_line(lambda w: w[0] in ("pong", "ping-error") and w[1:3] == [str(i), addr],
                           JS_COMMAND_WAIT, f"end of ping {i} {addr}", since)
        return w[3] if w[0] == "pong" else None

    def tables(self):
        """{node index: [(ip, port, id_hex), ...]} of every node's routing table."""
        since = self.mark()
        self.send("nodes")
        self.wait_line(lambda w: w[0] == "nodes-done", 30, "`nodes-done`", since)
        out = {}
        for w in self.words(since):
            if w[0] == "table":
                entries = []
                for e in w[4:]:
                    ip, port, nid = e.split(":")
                    entries.append((ip, int(port), nid))
                out[int(w[1])] = entries
        return out

    def stored(self, key):
        """{(node index, "ip:port")} of the announces of @key the bittorrent-dht nodes took."""
        return {(int(w[1]), w[3]) for w in self.words() if w[0] == "stored" and w[2] == key}

    def warnings(self, benign=False):
        """Its warning lines: those that may say something about a message's format, or with
        @benign, the others (late replies)."""
        return [" ".join(w) for w in self.words()
                if w[0] == "warning" and any(b in " ".join(w) for b in BENIGN_WARNINGS) == benign]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HandshakeListener:
    """A TCP listener on 127.0.0.1 that records the first 56 bytes of every connection
    (a digfs peer sends its handshake first) and never answers."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.got = queue.Queue()   # (first bytes, peer address)
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="handshake-listener").start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn, addr), daemon=True).start()

    def _read(self, conn, addr):
        data = b""
        conn.settimeout(10)
        try:
            while len(data) < 56:
                b = conn.recv(56 - len(data))
                if not b:
                    break
                data += b
        except OSError:
            pass
        finally:
            conn.close()
        self.got.put((data, addr))

    def close(self):
        self.stop.set()
        self.sock.close()


class Lab:
    pass


_lab = None
_closers = []


def _close_all():
    for c in reversed(_closers):
        try:
            c()
        except Exception as e:  # cleanup must not raise
            sys.stderr.write(f"test_dht_interop: cleanup: {e!r}\n")


atexit.register(_close_all)


def require_interop():
    if shutil.which("node") is None:
        raise T.SkipTest("node is not installed (apt-get install nodejs npm)")
    if not os.path.isdir(MODULE):
        raise T.SkipTest(f"{MODULE} is missing (run `npm ci` in {INTEROP}; "
                         "tests/run-all.sh does it)")


def digfs_node(tag, boot_port):
    """A digfs node on a port of its own with one loopback bootstrap node; persistent (it
    lives for the whole file). Returns (mount, port)."""
    port = T.free_port()
    m = T.Mount(tag, opts=[f"port={port}", f"bootstrap=127.0.0.1:{boot_port}",
                           "lookup_timeout=30"])
    m.persistent = True
    return m, port


def dht_nodes(m):
    return T.status_json(m)["network"]["dht"]


def logged_id(m, port):
    """The node id digfs logged at start ("node <id> on UDP port <port>")."""
    found = re.search(r"\bnode ([0-9a-f]{40}) on UDP port %d\b" % port, m.log_text() or "")
    need(found, f"no `node <id> on UDP port {port}` line in {m.log_path}", m.log_tail(20))
    return found.group(1)


def lab():
    """Builds the mixed DHT once (the tests of this file share it)."""
    global _lab
    require_interop()
    if _lab is not None:
        return _lab
    L = Lab()
    L.js = JsDht(2)                       # J0 (no bootstrap), J1 -> J0
    _closers.append(L.js.close)
    j0, j1 = L.js.ports
    # Before any digfs node exists: J1 announces key K0 with the port of a listener of ours,
    # so the only nodes that store it are bittorrent-dht ones.
    L.listen0 = HandshakeListener()
    _closers.append(L.listen0.close)
    L.root0 = secrets.token_hex(32)
    L.key0 = L.root0[:40]
    L.js.announce(1, L.key0, L.listen0.port)
    stored = L.js.stored(L.key0)
    need(stored, "J1's announce before digfs joined was stored by no bittorrent-dht node",
         L.js.transcript())
    L.a, L.port_a = digfs_node("interop-a", j0)     # A -> J0
    L.b, L.port_b = digfs_node("interop-b", j1)     # B -> J1
    _, L.j2 = L.js.add(f"127.0.0.1:{L.port_a}")     # J2 -> A
    _, L.j3 = L.js.add(f"127.0.0.1:{L.port_b}")     # J3 -> B
    L.c, L.port_c = digfs_node("interop-c", L.j3)   # C -> J3
    L.digfs = {"A": (L.a, L.port_a), "B": (L.b, L.port_b), "C": (L.c, L.port_c)}
    L.digfs_ids = {name: logged_id(m, port) for name, (m, port) in L.digfs.items()}
    _lab = L
    return L


def test_js_finds_digfs():
    """A (digfs) shares a file and announces its swarm key (root[:20]) with its port; J3, a
    bittorrent-dht node that reached the network only through B, finds 127.0.0.1:<A's port>
    with get_peers. At least one bittorrent-dht node took A's announce_peer (it accepted
    digfs's announce with the token it had handed out)."""
    L = lab()
    data = T.data_of(200_000, 4101)
    root = T.share(L.a, "interop.bin", data)
    key = root[:40]
    want = f"127.0.0.1:{L.port_a}"
    t0 = time.monotonic()
    deadline = t0 + 60
    attempts = []
    while True:
        peers, end = L.js.lookup(3, key)
        attempts.append((round(time.monotonic() - t0, 1), sorted(peers), end))
        if want in peers:
            break
        if time.monotonic() > deadline:
            fail(f"J3's lookups of A's swarm key {key} never reported {want} in 60 s",
                 f"attempts (time, peers, end): {attempts[-5:]}",
                 f"A's dht: {dht_nodes(L.a)}", L.js.transcript())
        time.sleep(1)
    check_eq(peers, {want}, f"peers J3 found for {key}")
    stored = L.js.stored(key)
    need(any(addr == want for _, addr in stored),
         f"no bittorrent-dht node stored A's announce of {key} (stored: {sorted(stored)})",
         L.js.transcript())
    print(f"    J3 found A after {time.monotonic() - t0:.1f} s ({len(attempts)} lookups); "
          f"A's announce stored on bittorrent-dht nodes {sorted(i for i, _ in stored)}")


def _stat_in_background(path):
    result = []

    def run():
        try:
            result.append(os.stat(path))
        except OSError as e:
            result.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _check_handshake(listener, key, who, timeout):
    """Waits for a connection to @listener whose first 56 bytes are a digfs handshake for
    swarm key @key; returns the node id it carries."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(f"{who}: no digfs handshake for {key} reached 127.0.0.1:{listener.port} "
                 f"within {timeout} s", f"connections seen: {seen}")
        try:
            data, addr = listener.got.get(timeout=left)
        except queue.Empty:
            continue
        seen.append((data.hex(), addr))
        if len(data) == 56 and data[0] == 7 and data[1:8] == b"digfs/1" and \
                data[16:36].hex() == key:
            return data[36:56].hex()
        fail(f"{who}: a connection to 127.0.0.1:{listener.port} did not start with a digfs "
             f"handshake for {key}", f"first bytes: {data.hex()} from {addr}")


def test_digfs_finds_js():
    """digfs's get_peers finds peers that bittorrent-dht nodes announced:
    - key K0, announced by J1 before any digfs node existed (stored on bittorrent-dht nodes
      only): B looks up a root starting with K0 and connects to the announced port, sending a
      digfs handshake for K0 with the node id B logged;
    - key K1, announced now by J3 (its announce_peer reaches digfs nodes too): C finds it
      the same way.
    Each stat ends in ENOENT (the listener never answers) after lookup_timeout."""
    L = lab()
    T.wait_until(lambda: dht_nodes(L.b)["nodes"] >= 2 and dht_nodes(L.c)["nodes"] >= 2,
                 "B's and C's DHT tables to have nodes", timeout=60, interval=0.5)
    listen1 = HandshakeListener()
    _closers.append(listen1.close)
    root1 = secrets.token_hex(32)
    key1 = root1[:40]
    L.js.announce(3, key1, listen1.port)
    t0 = time.monotonic()
    tb, rb = _stat_in_background(L.b.by_hash(L.root0))
    tc, rc = _stat_in_background(L.c.by_hash(root1))
    id_b = _check_handshake(L.listen0, L.key0, "B", 45)
    took_b = time.monotonic() - t0
    id_c = _check_handshake(listen1, key1, "C", 45)
    took_c = time.monotonic() - t0
    check_eq(id_b, L.digfs_ids["B"], "node id in B's handshake vs the one B logged")
    check_eq(id_c, L.digfs_ids["C"], "node id in C's handshake vs the one C logged")
    for t, r, who in ((tb, rb, "B"), (tc, rc, "C")):
        t.join(T.WAIT)
        check(not t.is_alive(), f"{who}: stat of by-hash/<root> still running after "
              f"{T.WAIT:.0f} s")
        check(isinstance(r[0], OSError) and r[0].errno == errno.ENOENT,
              f"{who}: stat of a root whose only peer never answers: expected ENOENT",
              f"got {r[0]!r}")
    print(f"    handshakes: B (K0, stored by bittorrent-dht only) after {took_b:.1f} s, "
          f"C (K1) after {took_c:.1f} s; stats ended with ENOENT after "
          f"{time.monotonic() - t0:.1f} s")


def test_tables_mix():
    """The routing tables mix: each digfs node holds at least 3 nodes; each digfs node is in
    some bittorrent-dht node's table, under the node id it logged at start; J0
    (bittorrent-dht) pings each digfs node and gets that id back; and neither side dropped
    a message as malformed (digfs's `malformed` counter is 0 on every digfs node: its
    canonical-only bencode decoder took everything bittorrent-dht sent; bittorrent-dht
    logged no decode warning)."""
    L = lab()
    for name, (m, _) in L.digfs.items():
        T.wait_until(lambda: dht_nodes(m)["nodes"] >= 3, f"{name}'s DHT table to hold 3 nodes",
                     timeout=60, interval=0.5)

    def js_knows_all():
        tables = L.js.tables()
        missing = []
        for name, (_, port) in L.digfs.items():
            hits = [(i, e) for i, entries in tables.items() for e in entries if e[1] == port]
            if not hits:
                missing.append(name)
        return (not missing, tables, missing)

    t0 = time.monotonic()
    while True:
        ok, tables, missing = js_knows_all()
        if ok:
            break
        if time.monotonic() - t0 > 60:
            fail(f"digfs nodes {missing} are in no bittorrent-dht node's table after 60 s",
                 f"tables: {tables}")
        time.sleep(1)
    for name, (_, port) in L.digfs.items():
        nid = L.digfs_ids[name]
        ids = {e[2] for entries in tables.values() for e in entries if e[1] == port}
        check_eq(ids, {nid}, f"ids the bittorrent-dht tables hold for {name} (port {port})")
        pong = L.js.ping(0, port)
        need(pong is not None, f"J0's ping of {name} (127.0.0.1:{port}) got no reply",
             L.js.transcript())
        check_eq(pong, nid, f"id in {name}'s reply to J0's ping")
    for name, (m, _) in L.digfs.items():
        d = dht_nodes(m)
        check_eq(d["malformed"], 0, f"{name}'s DHT malformed counter (datagrams its decoder "
                 f"refused) after the interop traffic; dht: {d}")
    check_eq(L.js.warnings(), [], "bittorrent-dht warnings other than late replies")
    summary = {name: dht_nodes(m) for name, (m, _) in L.digfs.items()}
    sizes = {i: len(e) for i, e in tables.items()}
    print(f"    digfs dht: {summary}; bittorrent-dht table sizes: {sizes}; "
          f"late replies bittorrent-dht dropped: {len(L.js.warnings(benign=True))}")


T.main()
