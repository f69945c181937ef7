"""digfs defends itself against malformed and abusive peers, and its limits hold
(docs/PROTOCOL.md 3.1 - 3.8). Also PEX (3.6): a node learns a third node's address from the
peer it knows, and connects to it.

Most tests start a digfs node A sharing a file on a port of its own and connect to that port
with a scripted raw peer (wire_peer.py's building blocks: handshake, framing, bencode), which
breaks one rule. Each then checks that
  1. A closes that connection (EOF or reset within a few seconds),
  2. `digfs status --json` network.malformed went up by exactly 1 where PROTOCOL.md says the
     connection is "counted" (3.2 wrong payload size and 3.8 "malformed message"; 3.3 "Order"),
  3. A stays healthy: a fresh, honest wire_peer.Leecher still fetches the file byte-exact,
     and that honest exchange counts nothing.
The other direction (a digfs leecher B against a scripted seeder) is covered for unrequested
blocks, and for what B itself sends first on a connection (hello, 3.3).

Limits are tested at their exact boundary where that can be made deterministic: a frame of
exactly 2^20 + 64 is fine, one byte more closes; 250 outstanding requests are fine, 251
close (A's send queue is stalled first, so no request is answered early: class Stalled);
50 peers per swarm are accepted, the 51st is refused.

Every mount runs with bootstrap=none (digfs_test.Mount adds it) and every socket here uses
127.0.0.1 only.

Not tested, and why:
  - "have/bitfield from a peer whose hello gave no length" (3.3 Order): digfs deliberately
    accepts it when it knows the length itself (swarm.c note_have: "it learned the length
    after its hello"), and digfs itself sends `have` after a hello without `len` (a node that
    learns a root's metadata announces the last block). The spec sentence is stricter than
    what digfs does and needs.
  - A handshake naming the acceptor's own node id IS tested: the acceptor's answer to an
    earlier connection tells us its id.
"""

import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
import wire_peer as W  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402
from test_swarm_lying import free_port, read_by_hash, start_mount  # noqa: E402

MIB = 1 << 20
FILE_LEN = MIB + 5            # 65 blocks, 16 KiB pieces (the piece layer is the leaf layer)
CLOSE_WAIT = 5.0              # "closes the connection": within this many seconds
OPTS = ["bootstrap=none", "lookup_timeout=30", "read_timeout=60"]


# --------------------------------------------------------------------------- helpers

class RawPeer:
    """A scripted peer on one TCP connection to 127.0.0.1:@port, for the file @root."""

    def __init__(self, port, root, node_id=None, rcvbuf=None, timeout=10.0):
        self.root = bytes.fromhex(root) if isinstance(root, str) else bytes(root)
        self.node_id = node_id or os.urandom(20)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # before connect(): the window we advertise stays this small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((W.HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.st = W._Stream(self.sock)
        self.sent = 0  # bytes sent on this connection
        self.remote_node_id = None
        self.remote_hello = None
        self.holdings = None

    def send(self, b):
        self.sock.sendall(b)
        self.sent += len(b)

    def send_handshake(self, swarm_key=None, node_id=None):
        self.send(W.handshake_bytes(swarm_key or self.root[:20], node_id or self.node_id))

    def read_handshake(self):
        _res, key, node = self.st.read_handshake()
        check_eq(key.hex(), self.root[:20].hex(), "swarm key of digfs's handshake answer")
        self.remote_node_id = node
        return node

    def read_msg(self):
        """The next message that is not a keep-alive: (id, payload)."""
        while True:
            msg_id, payload = self.st.read_frame()
            if msg_id is not None:
                return msg_id, payload

    def read_opening(self):
        """digfs's hello and what it holds (3.3: hello first, then the holdings)."""
        msg_id, payload = self.read_msg()
        check_eq(W.MSG_NAMES.get(msg_id, msg_id), "hello", "digfs's first message")
        self.remote_hello = W.parse_hello(payload, expect_root=self.root,
                                          swarm_key=self.root[:20])
        msg_id, _payload = self.read_msg()
        check(msg_id in (W.HAVE_ALL, W.HAVE_NONE, W.BITFIELD),
              f"digfs's second message is {W.MSG_NAMES.get(msg_id, msg_id)}, not its holdings")
        self.holdings = msg_id
        return self.remote_hello

    def hello_bytes(self, **fields):
        d = {"pex": 0, "reqq": W.REQQ_DEFAULT, "root": self.root, "v": b"limits-test"}
        d.update(fields)
        return W.frame(W.HELLO, W.bencode({k: v for k, v in d.items() if v is not None}))

    def open(self, **hello):
        """Handshake both ways, read digfs's opening, send our hello and have_none."""
        self.send_handshake()
        self.read_handshake()
        self.read_opening()
        self.send(self.hello_bytes(**hello) + W.frame(W.HAVE_NONE))
        return self

    def wait_for(self, msg_id, what, timeout=CLOSE_WAIT):
        """Reads messages until one with @msg_id arrives; returns its payload."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        seen = []
        try:
            while time.monotonic() < deadline:
                got, payload = self.read_msg()
                if got == msg_id:
                    return payload
                seen.append(W.MSG_NAMES.get(got, got))
        except W.PeerTimeout:
            pass
        except W.PeerClosed as e:
            T.fail(f"{what}: digfs closed the connection ({e}); messages before: {seen}")
        T.fail(f"{what}: no {W.MSG_NAMES.get(msg_id, msg_id)} within {timeout:.0f} s; "
               f"messages seen: {seen}")

    def expect_closed(self, what, timeout=CLOSE_WAIT):
        """digfs must close the connection within @timeout: reads (and drops) whatever it
        still sends until EOF or a reset. Returns (bytes read, seconds waited)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        n = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                T.fail(f"{what}: digfs did not close the connection within {timeout:.0f} s "
                       f"({n} bytes read meanwhile)")
            self.sock.settimeout(left)
            try:
                b = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return n, time.monotonic() - t0
            if not b:
                return n, time.monotonic() - t0
            n += len(b)

    def expect_open(self, seconds, what):
        """The connection stays open for @seconds (anything digfs sends is read and dropped)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                b = self.sock.recv(1 << 16)
            except socket.timeout:
                return
            except (ConnectionResetError, BrokenPipeError):
                b = b""
            if not b:
                T.fail(f"{what}: digfs closed the connection")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Node:
    """digfs node A: shares a file on its own port and serves it (checked once with an honest
    Leecher before any test case, so a later failure is not a slow start)."""

    def __init__(self, tag, n=FILE_LEN, seed=5101):
        self.port = free_port()
        self.m = start_mount(tag, OPTS + [f"port={self.port}"])
        self.data = T.data_of(n, seed)
        self.root = T.share(self.m, "file.bin", self.data)
        deadline = time.monotonic() + 20
        while True:
            # The listener and the node's interest in the new root may come a moment after
            # the mount and the hashing: retry a refused or unanswered connection.
            try:
                self.fetch("baseline")
                break
            except (ConnectionRefusedError, W.PeerClosed) as e:
                if time.monotonic() > deadline:
                    T.fail(f"node {tag}: no digfs/1 answer on port {self.port}: {e}")
                time.sleep(0.2)
        T.wait_until(lambda: self.swarm_peers() in (0, None),
                     "the baseline leecher's connection to be gone", timeout=CLOSE_WAIT)
        self.malformed0 = self.malformed()

    def status(self):
        return T.status_json(self.m)

    def malformed(self):
        net = self.status().get("network")
        check(isinstance(net, dict) and "malformed" in net,
              "status --json has no network.malformed", f"network: {net}")
        return net["malformed"]

    def swarm(self):
        for s in self.status().get("swarms") or []:
            if s.get("root") == self.root:
                return s
        return None

    def swarm_peers(self):
        return (self.swarm() or {}).get("peers")

    def fetch(self, what):
        """A fresh honest Leecher gets the whole file; raises on refusal (for the retry)."""
        lee = W.Leecher(W.HOST, self.port, self.root, timeout=30)
        try:
            got = lee.fetch()
        except (ConnectionRefusedError, W.PeerClosed):
            if lee.remote_handshake is None:
                raise
            T.fail(f"{what}: digfs closed an honest leecher mid-transfer; "
                   f"hello {lee.remote_hello}, notes {lee.notes}")
        except W.PeerError as e:
            T.fail(f"{what}: an honest leecher failed: {type(e).__name__}: {e}")
        check_bytes(got, self.data, f"{what}: file fetched by an honest leecher")
        check_eq(lee.notes, [], f"{what}: odd things digfs did to an honest leecher")

    def peer(self, **kw):
        return RawPeer(self.port, self.root, **kw)

    def expect_counted(self, before, n, what):
        """network.malformed reaches before + @n (and not more)."""
        want = before + n
        got = T.wait_until(lambda: (lambda v: v if v >= want else None)(self.malformed()),
                           f"{what}: network.malformed to reach {want}", timeout=CLOSE_WAIT)
        check_eq(got, want, f"{what}: network.malformed (was {before})")
        return got

    def healthy(self, what):
        """A fresh honest leecher fetches the file byte-exact, and nothing more is counted."""
        before = self.malformed()
        self.fetch(f"after {what}")
        check_eq(self.malformed(), before, f"network.malformed after an honest fetch "
                 f"(following {what})")


def counted_case(a, what, script, counted=True):
    """Runs @script(peer) on a fresh connection, then checks the close, the count and the
    node's health. @script gets a RawPeer that is connected, nothing sent yet."""
    before = a.malformed()
    p = a.peer()
    try:
        script(p)
        n, dt = p.expect_closed(what)
    finally:
        p.close()
    if counted:
        a.expect_counted(before, 1, what)
    a.healthy(what)
    return n, dt


def opened(fn):
    def run(p):
        p.open()
        fn(p)
    return run


# --------------------------------------------------------------------------- framing (3.2)

def test_frame_length_limit():
    """PROVES (3.2, 3.8): a frame length over 2^20 + 64 closes the connection as soon as the
    4 length bytes are in (the payload is never sent), and is counted as malformed; a frame of
    exactly 2^20 + 64 with an unknown id is skipped and the connection goes on (the limit is
    exactly where the spec puts it). A then serves an honest leecher byte-exact."""
    a = Node("lim-frame")
    # exactly the limit: an unknown id (99), skipped; the connection stays usable
    p = a.peer().open()
    try:
        big = struct.pack(">IB", W.MSG_MAX_LEN, 99) + b"\0" * (W.MSG_MAX_LEN - 1)
        p.send(big + W.msg_hash_header(W.HASH_REQUEST, 0, 0, 4, 0))
        payload = p.wait_for(W.HASHES, "a hash_request after a frame of exactly 2^20 + 64")
        check_eq(payload[:10], struct.pack(">BIIB", 0, 0, 4, 0), "hashes header")
    finally:
        p.close()
    check_eq(a.malformed(), a.malformed0, "network.malformed after a frame at the limit")

    # one over the limit: only the 4 length bytes are sent
    counted_case(a, "a frame length of 2^20 + 65",
                 opened(lambda p: p.send(struct.pack(">I", W.MSG_MAX_LEN + 1))))
    # the largest u32, right after the handshake (before hello)
    def huge(p):
        p.send_handshake()
        p.read_handshake()
        p.send(b"\xff\xff\xff\xff")
    counted_case(a, "a frame length of 2^32 - 1", huge)


def test_wrong_payload_size():
    """PROVES (3.2): a known id with a payload of the wrong size closes the connection and is
    counted as malformed: request with 3 bytes, interested with 1, have with 7, hash_request
    with 9, cancel with 5. A stays healthy after each."""
    a = Node("lim-size")
    cases = [("request with a 3-byte payload", W.REQUEST, b"\0\0\0"),
             ("interested with a 1-byte payload", W.INTERESTED, b"\0"),
             ("have with a 7-byte payload", W.HAVE, b"\0" * 7),
             ("hash_request with a 9-byte payload", W.HASH_REQUEST, b"\0" * 9),
             ("cancel with a 5-byte payload", W.CANCEL, b"\0" * 5)]
    for what, msg_id, payload in cases:
        counted_case(a, what, opened(lambda p, i=msg_id, b=payload: p.send(W.frame(i, b))))
    check_eq(a.malformed(), a.malformed0 + len(cases), "network.malformed after all cases")


# --------------------------------------------------------------------------- order (3.3, 3.4)

def test_message_before_hello_and_second_hello():
    """PROVES (3.3 Order): a message before hello (interested, request or have_all right after
    the handshake) and a second hello each close the connection and are counted."""
    a = Node("lim-order")

    def before_hello(msg):
        def run(p):
            p.send_handshake()
            p.read_handshake()
            p.send(msg)
        return run
    counted_case(a, "interested before hello", before_hello(W.frame(W.INTERESTED)))
    counted_case(a, "request before hello", before_hello(W.msg_block_ref(W.REQUEST, 0)))
    counted_case(a, "have_all before hello", before_hello(W.frame(W.HAVE_ALL)))
    counted_case(a, "a second hello", opened(lambda p: p.send(p.hello_bytes())))


def test_bad_hello_root():
    """PROVES (3.4): a hello whose root does not extend the handshake's swarm key closes the
    connection (digfs also counts it as malformed; the spec only says "closes")."""
    a = Node("lim-hello")
    other = W.root_of(b"some other file")
    before = a.malformed()

    def script(p):
        p.send_handshake()
        p.read_handshake()
        p.read_opening()
        p.send(p.hello_bytes(root=other))
    counted_case(a, "a hello with a root that does not extend the swarm key", script,
                 counted=False)
    delta = a.malformed() - before
    check(delta in (0, 1), f"network.malformed rose by {delta} for one bad hello")


# ------------------------------------------------------------------ answers nobody asked for

def test_unasked_hashes():
    """PROVES (3.5): a `hashes` message that answers no hash_request of A's closes the
    connection (digfs counts it as malformed, too). The hashes are even true ones."""
    a = Node("lim-hashes")
    leaves = W.Tree(a.data).leaves
    before = a.malformed()
    counted_case(a, "hashes nobody asked for",
                 opened(lambda p: p.send(W.msg_hash_header(W.HASHES, 0, 0, 2, 0,
                                                           leaves[0] + leaves[1]))),
                 counted=False)
    delta = a.malformed() - before
    check(delta in (0, 1), f"network.malformed rose by {delta} for one unasked hashes")


class EvilSeeder:
    """Serves one connection of a digfs leecher honestly except for one unrequested block
    (PROTOCOL.md 3.3 "Blocks"), then listens no more. when="meta": the block comes right
    before the answer to the piece-layer hash_request (the leecher has requested no block at
    all). when="data": metadata and the last block are served honestly; the first request
    for another block is answered, followed by block nblocks - 2, which nobody asked for."""

    def __init__(self, data, when):
        self.data = data
        self.tree = W.Tree(data)
        self.when = when
        self.lied = threading.Event()
        self.closed = threading.Event()
        self.t_lie = self.t_close = None
        self.requested = set()
        self.log = []
        self.error = None
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind((W.HOST, 0))
        self.lsock.listen(4)
        self.lsock.settimeout(60)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True, name="evil-seeder")
        self.thread.start()

    @property
    def addr(self):
        return f"{W.HOST}:{self.port}"

    def _block(self, i):
        return W.frame(W.PIECE, struct.pack(">I", i)
                       + self.data[i * W.BLOCK:(i + 1) * W.BLOCK])

    def _run(self):
        try:
            s, _ = self.lsock.accept()
        except OSError as e:
            self.error = f"no connection: {e}"
            return
        finally:
            self.lsock.close()  # one connection only: a reconnect is refused
        try:
            self._serve(s)
        except (W.PeerClosed, ConnectionResetError, BrokenPipeError):
            self.t_close = time.monotonic()
            self.closed.set()
        except Exception as e:  # shows in the test's failure message
            self.error = f"{type(e).__name__}: {e}"
        finally:
            s.close()

    def _serve(self, s):
        s.settimeout(60)
        st = W._Stream(s)
        _r, key, _node = st.read_handshake()
        check_eq(key, self.tree.root[:20], "swarm key digfs asked the evil seeder for")
        hello = {"len": len(self.data), "pex": 0, "reqq": W.REQQ_DEFAULT,
                 "root": self.tree.root, "v": b"evil"}
        s.sendall(W.handshake_bytes(key, os.urandom(20)) + W.frame(W.HELLO, W.bencode(hello))
                  + W.frame(W.HAVE_ALL) + W.frame(W.UNCHOKE))
        nblocks = self.tree.blocks
        while True:
            msg_id, payload = st.read_frame()
            if msg_id is None:
                continue
            self.log.append(W.MSG_NAMES.get(msg_id, msg_id))
            if msg_id == W.HASH_REQUEST:
                hdr = struct.unpack(">BIIB", payload)
                nodes = self.tree.nodes(hdr[0], hdr[1], hdr[2]) if hdr[3] == 0 else None
                out = W.msg_hash_header(W.HASHES, *hdr, b"".join(nodes)) if nodes else \
                    W.msg_hash_header(W.HASH_REJECT, *hdr)
                if self.when == "meta" and not self.lied.is_set() and not self.requested:
                    out = self._block(0) + out
                    self._lie()
                s.sendall(out)
            elif msg_id == W.REQUEST:
                (i,) = struct.unpack(">I", payload)
                self.requested.add(i)
                out = self._block(i)
                if self.when == "data" and i != nblocks - 1 and not self.lied.is_set():
                    j = nblocks - 2
                    check(j not in self.requested, "the leecher asked for block nblocks - 2 "
                          "early: the test cannot send it unrequested")
                    out += self._block(j)
                    self._lie()
                s.sendall(out)

    def _lie(self):
        self.t_lie = time.monotonic()
        self.log.append("UNREQUESTED BLOCK SENT")
        self.lied.set()

    def summary(self):
        return (f"evil seeder {self.addr} when={self.when} lied={self.lied.is_set()} "
                f"closed={self.closed.is_set()} requested={sorted(self.requested)[:20]} "
                f"error={self.error} messages={self.log[:30]}")

    def close(self):
        try:
            self.lsock.close()
        except OSError:
            pass


def test_unrequested_block_to_leecher():
    """PROVES (3.3 Blocks): a digfs leecher B closes the connection of a seeder that sends a
    block B never requested, and counts it as malformed, but does not ban it (the block's
    bytes are true: it is a protocol error, not bad data). Two moments: before B requested any
    block (while it learns the metadata), and in the middle of the data, after B requested
    other blocks. B still reads the file byte-exact from an honest seeder that answers only
    after the lie (its handshake answer waits for it)."""
    data = T.data_of(8 * MIB + 11, 5102)  # 513 blocks, 16 KiB pieces
    for when in ("meta", "data"):
        evil = EvilSeeder(data, when)
        with W.Seeder(data, gate=evil.lied, gate_timeout=7.0) as honest:
            root = honest.root_hex
            b = start_mount(f"lim-unreq-{when}", OPTS + ["port=0",
                                                         f"peers={evil.addr}+{honest.addr}"])
            try:
                got = read_by_hash(b, root, f"unrequested block ({when})", [honest])
                check_bytes(got, data, f"by-hash read on B after an unrequested block ({when})")
                check(evil.lied.is_set(), f"the evil seeder never got to send its unrequested "
                      f"block ({when}): the test proves nothing", evil.summary())
                T.wait_until(evil.closed.is_set, f"B to close the evil seeder's connection "
                             f"({when})", timeout=CLOSE_WAIT)
                dt = evil.t_close - evil.t_lie
                check(dt < CLOSE_WAIT, f"B closed {dt:.1f} s after the unrequested block")
                net = T.status_json(b)["network"]
                check_eq(net["malformed"], 1, f"B's network.malformed ({when})")
                check_eq(net["banned"], 0, f"B's network.banned ({when}: true bytes, no ban)")
                # (what B sent the honest seeder is checked in test_hello_before_have: B sends
                # it `have` before its hello when the metadata came from the evil seeder)
            finally:
                evil.close()
                b.cleanup()


def test_hello_before_have():
    """PROVES (3.3 "The first message after the handshake is hello"; "a message before hello
    ... breaks the protocol"): a digfs leecher B whose outgoing connection to a peer is still
    waiting for that peer's handshake answer while B stores blocks from another peer sends
    that peer its hello first, not `have` messages. Set-up: B has peers=fast+slow; the slow
    seeder holds back its handshake answer until 0.5 s after the fast one served a block
    (under the 10 s handshake limit). A digfs acceptor in the slow seeder's place closes such a
    connection and counts it as malformed."""
    data = T.data_of(2 * MIB + 3, 5104)
    served = threading.Event()
    with W.Seeder(data) as fast, W.Seeder(data, gate=served, gate_timeout=7.0) as slow:
        stop = threading.Event()

        def watch():
            # the slow seeder answers 0.5 s after the fast one served its first block (the
            # metadata's last block): by then B has stored it and told every peer
            while not stop.is_set() and fast.blocks_served < 1:
                time.sleep(0.005)
            if not stop.wait(0.5):
                served.set()
        threading.Thread(target=watch, daemon=True).start()
        try:
            b = start_mount("lim-hello-first", OPTS + ["port=0",
                                                       f"peers={fast.addr}+{slow.addr}"])
            got = read_by_hash(b, fast.root_hex, "fast + slow seeder", [fast, slow])
            check_bytes(got, data, "by-hash read with a fast and a slow seeder")
            check(fast.blocks_served >= 1, "the fast seeder served no block (the test proves "
                  "nothing)", fast.summary())
            T.wait_until(lambda: slow.handshakes >= 1 and all(
                c.remote_hello is not None for c in slow.conns if c.handshaked),
                "B's hello to reach the slow seeder", timeout=CLOSE_WAIT)
        finally:
            stop.set()
        check_eq(fast.malformed, [], "what B sent the fast seeder that wire_peer calls "
                 "malformed")
        check_eq(slow.malformed, [], "what B sent the slow seeder (its handshake answered "
                 "late) that wire_peer calls malformed")


# --------------------------------------------------------------------------- requests (3.3, 3.8)

def _kernel_bytes(rcvbuf):
    """At most how many bytes of digfs's answers the kernel holds while we read nothing: its
    socket send buffer (autotuned up to tcp_wmem's maximum) and our receive buffer (the
    kernel doubles SO_RCVBUF)."""
    wmem = 0
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem = int(f.read().split()[2])
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem = max(wmem, int(f.read()))
    except (OSError, ValueError, IndexError):
        wmem = max(wmem, 16 * MIB)
    return wmem + 2 * rcvbuf


class Stalled:
    """A raw peer that has made A's send queue stall: it reads nothing, and asks A for its
    piece layer (hash_request, answered whether or not we are choked, and not counted against
    reqq: 3.5) until the answers exceed what the kernel can hold plus digfs's 4 MiB serve
    queue (it serves requests only while less than that waits). From then on every block
    request we send stays unanswered until we read: the outstanding count is exact."""

    RCVBUF = 4096

    def __init__(self, a):
        self.a = a
        self.nblocks = W.block_count(len(a.data))
        self.tree = W.Tree(a.data)
        T.wait_until(lambda: a.swarm_peers() in (0, None), "A to have no peers",
                     timeout=CLOSE_WAIT)
        self.base = (a.swarm() or {}).get("bytes_in", 0)
        self.p = a.peer(rcvbuf=self.RCVBUF)
        self.p.open()
        self.p.send(W.frame(W.INTERESTED))
        self.p.wait_for(W.UNCHOKE, "unchoke after interested")
        pl = self.tree.piece_level
        self.hdr = (pl, 0, self.tree.piece_count, 0)
        answer = 4 + 1 + 10 + 32 * self.tree.piece_count
        self.flood = (4 * MIB + _kernel_bytes(self.RCVBUF) + 2 * MIB) // answer + 1
        self.p.send(W.msg_hash_header(W.HASH_REQUEST, *self.hdr) * self.flood)
        self.requested = []

    def request(self, blocks):
        self.requested += list(blocks)
        self.p.send(b"".join(W.msg_block_ref(W.REQUEST, i) for i in blocks))

    def cancel(self, blocks):
        self.p.send(b"".join(W.msg_block_ref(W.CANCEL, i) for i in blocks))

    def wait_taken(self, malformed_before):
        """Waits until A has read every byte we sent (its swarm's bytes_in, accounted as it
        handles each message), or has closed us for a counted reason: only then may we read
        without A's queue draining before it saw all our requests."""
        want = self.base + self.p.sent

        def taken():
            sw = self.a.swarm() or {}
            return sw.get("bytes_in", 0) >= want or self.a.malformed() > malformed_before
        T.wait_until(taken, f"A to read all {self.p.sent} bytes we sent", timeout=10)

    def drain(self, need, what, timeout=20, cancelled=()):
        """Reads until every block in @need came (and all our hash answers). A close fails,
        and so does a block of @cancelled (cancelled while still queued: 3.3 Cancel)."""
        need, hashes, cancelled = set(need), 0, set(cancelled)
        self.p.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while (need or hashes < self.flood) and time.monotonic() < deadline:
                msg_id, payload = self.p.read_msg()
                if msg_id == W.PIECE:
                    (i,) = struct.unpack_from(">I", payload)
                    check(i in self.requested, f"{what}: block {i}, never requested")
                    check(i not in cancelled, f"{what}: block {i}, cancelled while queued")
                    check_bytes(payload[4:], self.a.data[i * W.BLOCK:(i + 1) * W.BLOCK],
                                f"{what}: block {i}")
                    need.discard(i)
                elif msg_id == W.HASHES:
                    check_eq(struct.unpack_from(">BIIB", payload), self.hdr,
                             f"{what}: hashes header")
                    hashes += 1
                elif msg_id == W.REJECT:
                    (i,) = struct.unpack(">I", payload)
                    T.fail(f"{what}: A rejected block {i} (it holds it, and does not choke us)")
        except W.PeerClosed as e:
            T.fail(f"{what}: A closed the connection ({e}); {len(need)} blocks still due; "
                   f"network.malformed {self.a.malformed()} (was {self.a.malformed0})")
        except W.PeerTimeout:
            pass
        check_eq((len(need), hashes), (0, self.flood), f"{what}: (blocks missing, hash "
                 "answers read)")

    def close(self):
        self.p.close()


def test_too_many_requests():
    """PROVES (3.3 Requests, 3.8): reqq = 250 outstanding requests are fine, the 251st closes
    the connection, and digfs counts it as malformed. Exact and deterministic: a Stalled peer
    (see there) makes A's send queue stall first, so none of our block requests is answered
    before we read, and we read only once A's status shows it has read all we sent. With 250
    requests the connection stays open, and once we read, every block and hash answer
    arrives; with 251, A closes."""
    a = Node("lim-reqq", n=8 * MIB + 1, seed=5106)   # 513 blocks, a 16 KiB piece layer
    sp = Stalled(a)
    try:
        sp.request(range(250))
        sp.wait_taken(a.malformed0)
        sp.drain(range(250), "250 outstanding requests")
        sp.p.expect_open(0.5, "after 250 outstanding requests were answered")
    finally:
        sp.close()
    check_eq(a.malformed(), a.malformed0, "network.malformed after 250 outstanding requests")

    before = a.malformed()
    sp = Stalled(a)
    try:
        sp.request(range(251))
        sp.wait_taken(before)
        _n, dt = sp.p.expect_closed("251 outstanding requests", timeout=10)
    finally:
        sp.close()
    print(f"note: {sp.flood} piece-layer requests stalled A's queue; A had closed the "
          f"connection when we read ({dt:.2f} s)")
    a.expect_counted(before, 1, "251 outstanding requests")
    a.healthy("251 outstanding requests")


def test_cancel_frees_request_slot():
    """PROVES (3.3 Requests: "a cancelled one stops counting when the cancel arrives, so the
    requester may reuse the slot as soon as it sends the cancel"): with A's send queue stalled
    (a Stalled peer: none of our requests is answered before we read), we send 250 requests
    (250 outstanding), cancel the last 100 (150), and send 100 requests for other blocks (250
    again): never more than reqq, so A must not close. Reading then brings the 150 blocks not
    cancelled and the 100 new ones, and none of the cancelled ones (3.3 Cancel: dropped while
    still queued). Distinct block indices throughout, so each cancel names
    exactly one request."""
    a = Node("lim-cancel", n=8 * MIB + 1, seed=5107)   # 513 blocks
    sp = Stalled(a)
    try:
        sp.request(range(250))
        sp.cancel(range(150, 250))
        sp.request(range(250, 350))
        sp.wait_taken(a.malformed0)
        sp.drain(list(range(150)) + list(range(250, 350)),
                 "250 requests, 100 cancelled, 100 new", cancelled=range(150, 250))
        sp.p.expect_open(0.5, "after the cancels")
    finally:
        sp.close()
    check_eq(a.malformed(), a.malformed0, "network.malformed")
    a.healthy("cancels")


# --------------------------------------------------------------------------- handshake (3.1)

def test_bad_handshakes_closed_unanswered():
    """PROVES (3.1): the acceptor closes without answering a BitTorrent handshake
    ("\\x13BitTorrent protocol"), and a handshake carrying its own node id (learned from its
    answer to an earlier connection). A stays healthy."""
    a = Node("lim-hs")
    bt = b"\x13BitTorrent protocol" + b"\0" * 8 + bytes.fromhex(a.root)[:20] + os.urandom(20)
    probe = a.peer()
    try:
        probe.send_handshake()
        own = probe.read_handshake()
    finally:
        probe.close()
    for what, hs in (("a BitTorrent handshake", bt),
                     ("a handshake with digfs's own node id",
                      W.handshake_bytes(bytes.fromhex(a.root)[:20], own))):
        p = a.peer()
        try:
            p.send(hs)
            n, _dt = p.expect_closed(what)
            check_eq(n, 0, f"bytes digfs answered to {what}")
        finally:
            p.close()
        a.healthy(what)


def test_silent_peer_closed_after_handshake_limit():
    """PROVES (3.1): a connection whose handshake is not complete within 10 s is closed, and
    digfs sends nothing to it: one peer stays silent, another sends half a handshake. Both are
    closed 10 s (+ digfs's 2 s timer tick) after they connected, not earlier."""
    a = Node("lim-silent")
    silent = a.peer(timeout=30)
    half = a.peer(timeout=30)
    t0 = time.monotonic()
    try:
        half.send(W.handshake_bytes(bytes.fromhex(a.root)[:20], os.urandom(20))[:30])
        results = {}

        def watch(name, p):
            try:
                results[name] = p.expect_closed(name, timeout=25)
            except BaseException as e:
                results[name] = e
        ts = [threading.Thread(target=watch, args=(n, p), daemon=True)
              for n, p in (("silent peer", silent), ("half a handshake", half))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    finally:
        silent.close()
        half.close()
    for name in ("silent peer", "half a handshake"):
        r = results.get(name)
        if isinstance(r, BaseException):
            raise r
        check(r is not None, f"{name}: no result")
        n, dt = r
        check_eq(n, 0, f"bytes digfs sent to the {name}")
        print(f"note: the {name} was closed after {dt:.2f} s")
        check(9.5 <= dt <= 14.5, f"the {name} was closed after {dt:.1f} s; expected 10 s "
              "(the handshake limit) + at most digfs's 2 s tick")
    check(time.monotonic() - t0 < 30, "took too long")
    a.healthy("silent peers")


# --------------------------------------------------------------------------- peers per swarm (3.8)

def test_peers_per_swarm_limit():
    """PROVES (3.8): at most 50 peers are connected per swarm. 55 raw peers (distinct node
    ids) handshake for A's root: exactly 50 get an answer and stay connected, 5 are closed
    without an answer; status shows 50 peers. When 10 leave, 10 newcomers are accepted (the
    slots are given back) and the 11th is refused again. With slots free again, an honest
    leecher fetches the file."""
    a = Node("lim-peers")
    key = bytes.fromhex(a.root)[:20]

    def connect(k):
        ps = []
        for _ in range(k):
            p = a.peer()
            p.send_handshake(key)
            ps.append(p)
        return ps

    def sort(ps):
        """(answered, refused): a handshake answer, or closed without a byte."""
        ok, refused = [], []
        for p in ps:
            p.sock.settimeout(CLOSE_WAIT)
            try:
                p.read_handshake()
                ok.append(p)
            except W.PeerClosed as e:
                check("partial" not in str(e), f"closed after a partial answer: {e}")
                refused.append(p)
            except W.PeerTimeout:
                T.fail("a peer got neither a handshake answer nor a close within "
                       f"{CLOSE_WAIT:.0f} s")
        return ok, refused

    peers = connect(55)
    try:
        ok, refused = sort(peers)
        check_eq((len(ok), len(refused)), (50, 5), "(answered, refused) of 55 handshakes")
        T.wait_until(lambda: a.swarm_peers() == 50, "A's swarm to show 50 peers", timeout=5)
        for p in ok:
            p.read_opening()
        ok[0].expect_open(1.0, "an accepted peer (1 s later)")
        for p in ok[:10]:
            p.close()
        T.wait_until(lambda: a.swarm_peers() == 40, "A's swarm to show 40 peers after 10 left",
                     timeout=CLOSE_WAIT)
        more = connect(11)
        peers += more
        ok2, refused2 = sort(more)
        check_eq((len(ok2), len(refused2)), (10, 1), "(answered, refused) of 11 newcomers")
        check_eq(a.swarm_peers(), 50, "A's swarm peers")
    finally:
        for p in peers:
            p.close()
    T.wait_until(lambda: a.swarm_peers() in (0, None), "A's peers to leave", timeout=CLOSE_WAIT)
    a.healthy("55 + 11 peers")


# --------------------------------------------------------------------------- PEX (3.6)

def _pex_added(payload):
    d = W.bdecode(payload, max_depth=4, max_tokens=1000)
    check(isinstance(d, dict), f"pex is not a dictionary: {d!r}")
    added = d.get(b"added", b"")
    check(len(added) % 6 == 0 and len(added) // 6 <= 50, f"pex added of {len(added)} bytes")
    return [(socket.inet_ntoa(added[i:i + 6][:4]), struct.unpack(">H", added[i + 4:i + 6])[0])
            for i in range(0, len(added), 6)]


def _read_head(m, root, n=4096):
    """Reads the first @n bytes of by-hash/@root (the swarm stays incomplete and wanted)."""
    out = []

    def run():
        with open(m.by_hash(root), "rb", buffering=0) as f:
            out.append(f.read(n))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    check(out, f"{m.mnt}: reading {n} bytes of by-hash/{root[:16]}… did not finish")
    return out[0]


def test_pex():
    """PROVES (3.6): digfs nodes A (seeder), B (peers=A) and C (peers=A) with bootstrap=none:
    C learns B's address from A's pex and connects to B. First a raw peer that said pex=1
    gets a pex from A soon after its hello (digfs sends its first one 3 s after the hello),
    listing B's listen address (its hello's p), within the spec's limits; a raw peer that
    said pex=0 gets none. Then C, which read the start of the file (so it still wants the
    rest), ends up with 2 peers, and B with 2 (A and C)."""
    data = T.data_of(8 * MIB, 5103)
    pa, pb, pc = free_port(), free_port(), free_port()
    a = start_mount("lim-pex-a", OPTS + [f"port={pa}"])
    root = T.share(a, "file.bin", data)
    b = start_mount("lim-pex-b", OPTS + [f"port={pb}", f"peers=127.0.0.1:{pa}"])
    check_bytes(_read_head(b, root), data[:4096], "B's first 4 KiB")

    def peers_of(m):
        for s in T.status_json(m).get("swarms") or []:
            if s.get("root") == root:
                return s.get("peers")
        return None
    T.wait_until(lambda: peers_of(a) == 1, "A to show B as its one peer", timeout=10)

    yes, no = RawPeer(pa, root), RawPeer(pa, root)
    try:
        yes.open(pex=1)
        no.open(pex=0)
        t0 = time.monotonic()
        payload = yes.wait_for(W.PEX, "A's pex to a peer that said pex=1", timeout=10)
        dt = time.monotonic() - t0
        added = _pex_added(payload)
        check(("127.0.0.1", pb) in added, f"A's pex lists {added}, not B at 127.0.0.1:{pb}")
        check(dt <= 6, f"A's first pex came {dt:.1f} s after the hello")
        # at most one pex per minute: none more in the next 2 s
        yes.sock.settimeout(0.2)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                msg_id, _ = yes.read_msg()
            except W.PeerTimeout:
                continue
            check(msg_id != W.PEX, "A sent a second pex within seconds of the first")
        # pex=0: nothing in the same time
        no.sock.settimeout(0.2)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                msg_id, _ = no.read_msg()
            except W.PeerTimeout:
                continue
            check(msg_id != W.PEX, "A sent pex to a peer whose hello said pex=0")
    finally:
        yes.close()
        no.close()

    t_c = time.monotonic()
    c = start_mount("lim-pex-c", OPTS + [f"port={pc}", f"peers=127.0.0.1:{pa}"])
    check_bytes(_read_head(c, root), data[:4096], "C's first 4 KiB")
    T.wait_until(lambda: (peers_of(c) or 0) >= 2,
                 "C to connect to B as well (learned from A's pex)", timeout=20)
    T.wait_until(lambda: (peers_of(b) or 0) >= 2, "B to show C as a peer", timeout=10)
    check_eq(peers_of(a), 2, "A's peers (B and C)")
    print(f"note: A's first pex came {dt:.2f} s after the hello; C had 2 peers "
          f"{time.monotonic() - t_c:.1f} s after it started")


if __name__ == "__main__":
    T.main()
