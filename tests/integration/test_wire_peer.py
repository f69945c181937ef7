"""Self-tests of wire_peer.py, the independent Python implementation of the digfs peer wire
protocol v1 (docs/PROTOCOL.md section 3) that test_swarm_lying.py uses against real digfs
mounts. Nothing here mounts FUSE: the Leecher is checked against the Seeder in-process, both
against scripted raw peers, and the BEP 52 tree code against `digfs hash`.

Only 127.0.0.1 is ever used.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
import wire_peer as W  # noqa: E402
from digfs_test import check, check_eq, check_bytes  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
SIZES = [0, 1, 16384, 16385, 5 * MIB, 40 * MIB + 123]
TIMEOUT = 20.0
_data_cache = {}


def data(n):
    if n not in _data_cache:
        _data_cache[n] = T.data_of(n, 7000 + n % 997)
    return _data_cache[n]


def expect_raise(exc_types, func, what):
    """func() must raise one of @exc_types; returns the exception."""
    try:
        func()
    except exc_types as e:
        return e
    except Exception as e:
        T.fail(f"{what}: expected {exc_types}, got {type(e).__name__}: {e}")
    T.fail(f"{what}: expected {exc_types}, but it succeeded")


def leech(seeder, **kw):
    return W.Leecher(W.HOST, seeder.port, seeder.root, timeout=TIMEOUT, **kw).fetch()


# --------------------------------------------------------------------------- tree

def test_piece_geometry():
    """Piece size / count / level and tree height for the sizes the protocol cares about
    (PROTOCOL.md 1: smallest power of two >= 16 KiB giving at most 1024 pieces)."""
    table = [
        # length,                 piece size, pieces, piece level, height
        (0,                       16 * KIB,   1,      0,           0),
        (1,                       16 * KIB,   1,      0,           0),
        (16384,                   16 * KIB,   1,      0,           0),
        (16385,                   16 * KIB,   2,      0,           1),
        (5 * MIB,                 16 * KIB,   320,    0,           9),
        (16 * MIB,                16 * KIB,   1024,   0,           10),
        (16 * MIB + 1,            32 * KIB,   513,    1,           11),
        (40 * MIB + 123,          64 * KIB,   641,    2,           12),
        (32 << 30,                32 * MIB,   1024,   11,          21),
        ((32 << 30) + 1,          64 * MIB,   513,    12,          22),
    ]
    for n, ps, pc, pl, h in table:
        got = (W.piece_size(n), W.piece_count(n), W.piece_level(n), W.tree_height(n))
        check_eq(got, (ps, pc, pl, h), f"(piece size, pieces, piece level, height) of {n}")


def _padded_levels(leaves):
    """An independent tree: leaves padded with zero hashes to a power of two, reduced level
    by level (every level keeps its padding nodes)."""
    width = 1
    while width < len(leaves):
        width *= 2
    row = list(leaves) + [b"\0" * 32] * (width - len(leaves))
    levels = [row]
    while len(row) > 1:
        row = [W.sha256(row[i] + row[i + 1]) for i in range(0, len(row), 2)]
        levels.append(row)
    return levels


def test_tree_roots_match_digfs_hash_and_oracle():
    """The root computed by wire_peer.Tree equals `digfs hash` (the C engine) and the test
    suite's own MerkleHasher; the piece layer equals the piece-level row of a fully padded
    tree, and verifies against the root (zero-subtree padding exactly as BEP 52)."""
    with tempfile.TemporaryDirectory(prefix="wirepeer-", dir="/tmp") as d:
        for n in SIZES + [16 * MIB, 16 * MIB + 1]:
            content = data(n) if n in SIZES else T.data_of(n, n)
            tree = W.Tree(content)
            path = os.path.join(d, f"f{n}")
            T.write_file(path, content)
            check_eq(tree.root.hex(), T.digfs_hash(path), f"root of {n} bytes vs digfs hash")
            check_eq(tree.root.hex(), T.merkle_root(content), f"root of {n} bytes vs oracle")
            os.unlink(path)
            layer = tree.piece_layer()
            check_eq(len(layer), W.piece_count(n), f"piece layer size for {n}")
            check(W.verify_layer(tree.root, n, layer), f"piece layer of {n} does not verify")
            if tree.blocks > 1:
                full = _padded_levels(tree.leaves)
                check_eq(full[-1][0], tree.root, f"padded-tree root of {n}")
                check(layer == full[tree.piece_level][:len(layer)],
                      f"piece layer of {n} differs from the padded tree's row")
                # the padding entries of that row are zero subtrees of the piece level
                pad = full[tree.piece_level][len(layer):]
                check(all(h == W.zero_hash(tree.piece_level) for h in pad),
                      f"layer padding of {n} is not zero subtrees")
                # every piece's leaves hash up to its layer entry (last one zero-padded)
                bpp = tree.blocks_per_piece
                for p in (0, len(layer) - 1):
                    lv = tree.leaves[p * bpp:(p + 1) * bpp]
                    check_eq(W.subtree_root(lv, 0, bpp), layer[p], f"piece {p} of {n}")
                broken = list(layer)
                broken[-1] = W._flip(broken[-1], 0)
                check(not W.verify_layer(tree.root, n, broken), "a changed layer verifies")
                check(not W.verify_layer(tree.root, n, layer[:-1]), "a short layer verifies")


# --------------------------------------------------------------------------- honest exchange

def test_leecher_fetches_from_seeder():
    """Leecher against Seeder for each size: exact bytes, the expected number of blocks and
    hash requests, and nothing the Seeder counts as malformed."""
    for n in SIZES:
        content = data(n)
        with W.Seeder(content) as s:
            got = leech(s)
            check_bytes(got, content, f"fetched {n} bytes")
            T.wait_until(lambda: s.conns and s.conns[0].t_close is not None,
                         "the seeder to see the leecher go", timeout=10)
            tree = s.tree
            want_hashreq = 0 if tree.blocks <= 1 else \
                1 + (tree.piece_count if tree.piece_level > 0 else 0)
            check_eq(s.blocks_served, W.block_count(n), f"blocks served for {n}")
            check_eq(s.hash_requests_served, want_hashreq, f"hash requests for {n}")
            check_eq(s.malformed, [], f"what the seeder found malformed ({n})")
            check_eq(s.connections, 1, "connections")


def test_several_leechers_at_once():
    """One Seeder serves four concurrent Leechers (one thread per connection)."""
    content = data(5 * MIB)
    results, errors = [], []
    with W.Seeder(content) as s:
        def one():
            try:
                results.append(leech(s))
            except Exception as e:
                errors.append(e)
        ts = [threading.Thread(target=one) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        check_eq(errors, [], "leecher errors")
        check_eq(len(results), 4, "leechers done")
        for r in results:
            check(r == content, "a concurrent fetch returned wrong bytes")
        check_eq(s.connections, 4, "connections")
        check_eq(len(s.addresses_seen), 4, "distinct addresses (ports) seen")


def test_one_seeder_serves_several_roots():
    """Seeder(more=...): one address serves several files, picked by the handshake's swarm
    key; a root it does not serve is closed unanswered."""
    a, b = data(16385), data(5 * MIB)
    with W.Seeder(a, more=[b]) as s:
        check_bytes(W.fetch(W.HOST, s.port, W.root_of(b), timeout=TIMEOUT), b, "second root")
        check_bytes(W.fetch(W.HOST, s.port, W.root_of(a), timeout=TIMEOUT), a, "first root")
        expect_raise(W.PeerClosed, lambda: W.fetch(W.HOST, s.port, W.root_of(b"nope"),
                                                   timeout=TIMEOUT), "an unserved root")
        check_eq(len(s.conns_for(W.root_of(b))), 1, "connections for the second root")
        check_eq(s.connections, 3, "connections")
        check_eq(s.malformed, [], "malformed")


def test_gate_holds_the_handshake_answer():
    """Seeder(gate=...) answers a handshake only once the gate is set (test_swarm_lying.py
    uses it to make digfs meet the lying seeder before the honest one)."""
    gate = threading.Event()
    content = data(16385)
    out = []
    with W.Seeder(content, gate=gate, gate_timeout=30) as s:
        t = threading.Thread(target=lambda: out.append(leech(s)), daemon=True)
        t.start()
        time.sleep(0.5)
        check(not out and s.handshakes == 0, "answered before the gate opened")
        gate.set()
        t.join(TIMEOUT)
        check(out and out[0] == content, "fetch after the gate opened")


# --------------------------------------------------------------------------- lying seeders

def test_corrupt_seeder_raises_bad_block():
    """corrupt='all': the first block fails its leaf hash; the Leecher raises BadBlock and
    closes, which the Seeder counts as closed_by_remote after bad data."""
    for n in (1, 16385, 5 * MIB, 40 * MIB + 123):
        with W.Seeder(data(n), corrupt="all") as s:
            e = expect_raise(W.BadBlock, lambda: leech(s), f"corrupt seeder, {n} bytes")
            check(isinstance(e.block, int), "BadBlock names the block")
            T.wait_until(lambda: s.closed_by_remote >= 1, "closed_by_remote", timeout=10)
            check(s.bad_served.is_set(), "bad_served event")


def test_corrupt_single_blocks_raise_on_that_block():
    """Only the listed blocks are corrupt: BadBlock names exactly one of them (also the short
    last block)."""
    for n, bad in ((5 * MIB, {5}), (40 * MIB + 123, {2560}), (16385, {1})):
        with W.Seeder(data(n), corrupt=bad) as s:
            e = expect_raise(W.BadBlock, lambda: leech(s), f"corrupt block {bad} of {n}")
            check(e.block in bad, f"BadBlock names block {e.block}, corrupt were {bad}")
            check_eq(s.blocks_served >= 1, True, "blocks served before the bad one")


def test_bad_layer_seeder_raises_bad_hashes():
    """bad_layer: the piece layer does not verify against the root; the Leecher raises
    BadHashes before requesting any block."""
    for n in (16385, 5 * MIB, 16 * MIB + 1, 40 * MIB + 123):
        with W.Seeder(data(n) if n in SIZES else T.data_of(n, 3), bad_layer=True) as s:
            expect_raise(W.BadHashes, lambda: leech(s), f"bad layer, {n} bytes")
            check_eq(s.blocks_served, 0, f"blocks served before the layer check ({n})")
            T.wait_until(lambda: s.closed_by_remote >= 1, "closed_by_remote", timeout=10)


def test_lying_length_raises():
    """lie_length: whatever the lie, the Leecher raises and returns no byte. Which check
    catches it depends on the lie (PROTOCOL.md 3.5: the layer ties the piece count to the
    root, the last leaf ties the exact size)."""
    L = 5 * MIB
    cases = [
        (L, L - 1, W.BadBlock),             # same blocks; last block cut by one byte
        (L, L - 16384, W.BadHashes),        # one block fewer: the layer does not verify
        (L, L + 1, W.HashRejected),         # one block more: layer request past the real tree
        (L, 2 * L, W.HashRejected),
        (L, 1, W.BadBlock),                 # "one block": root taken as the leaf
        (L, 0, W.BadHashes),                # "empty": the root is not SHA-256("")
        (40 * MIB + 123, 40 * MIB + 124, W.BadBlock),   # same blocks, bigger last block
        (40 * MIB + 123, 40 * MIB + 122, W.BadBlock),
        (40 * MIB + 123, 40 * MIB, W.BadHashes),        # 2560 blocks: layer of 640 pieces
        (16385, 16384, W.BadBlock),                     # the single-block "layer" is the root
    ]
    for n, lie, exc in cases:
        with W.Seeder(data(n), lie_length=lie) as s:
            expect_raise(exc, lambda: leech(s), f"{n}-byte file announced as {lie}")


# --------------------------------------------------------------------------- scripted peers

class ScriptedPeer:
    """Accepts one connection on 127.0.0.1, reads the initiator's 56-byte handshake, sends
    @reply (bytes, or a callable(their_handshake) -> bytes), then keeps the connection open
    until the remote closes it (or 20 s); with hold=False it closes at once."""

    def __init__(self, reply, hold=True):
        self.reply = reply
        self.hold = hold
        self.lsock = socket.socket()
        self.lsock.bind((W.HOST, 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.got = b""
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.lsock.settimeout(20)
        try:
            c, _ = self.lsock.accept()
        except OSError:
            return
        with c:
            c.settimeout(20)
            hs = b""
            try:
                while len(hs) < 56:
                    b = c.recv(56 - len(hs))
                    if not b:
                        return
                    hs += b
                r = self.reply(hs) if callable(self.reply) else self.reply
                c.sendall(r)
                while self.hold:
                    b = c.recv(65536)
                    if not b:
                        return
                    self.got += b
            except OSError:
                return

    def close(self):
        self.lsock.close()
        self.t.join(25)


def _good_prefix(root, length, hello_extra=None, holdings=W.frame(W.HAVE_ALL)):
    hello = {"len": length, "p": 1234, "pex": 0, "reqq": 250, "root": root, "v": b"scripted"}
    hello.update(hello_extra or {})
    hello = {k: v for k, v in hello.items() if v is not None}
    return lambda hs: (W.handshake_bytes(root[:20], b"S" * 20) + W.frame(W.HELLO,
                       W.bencode(hello)) + holdings)


def test_leecher_rejects_protocol_violations():
    """Each rule of PROTOCOL.md 3 the Leecher enforces, with a scripted remote that breaks
    it. The Leecher must raise (never hang, never return data)."""
    content = data(5 * MIB)
    tree = W.Tree(content)
    root, n = tree.root, len(content)
    good = _good_prefix(root, n)
    layer_reply = W.msg_hash_header(W.HASHES, 0, 0, tree.piece_count, 0,
                                    b"".join(tree.piece_layer()))
    cases = [
        ("a BitTorrent handshake", lambda hs: b"\x13BitTorrent protocol" + b"\0" * 48,
         W.ProtocolViolation, "pstrlen"),
        ("pstr digfs/2", lambda hs: b"\x07digfs/2" + b"\0" * 48, W.ProtocolViolation, "pstr"),
        ("handshake for another swarm",
         lambda hs: W.handshake_bytes(b"x" * 20, b"S" * 20), W.ProtocolViolation, "swarm"),
        ("a frame over 2^20 + 64 (only its length is sent)",
         lambda hs: good(hs) + struct.pack(">I", W.MSG_MAX_LEN + 1),
         W.ProtocolViolation, "over the limit"),
        ("unchoke with a 1-byte payload",
         lambda hs: good(hs) + struct.pack(">IBB", 2, W.UNCHOKE, 0),
         W.ProtocolViolation, "unchoke payload"),
        ("have_all with a payload",
         lambda hs: good(hs)[:-5] + struct.pack(">IBI", 5, W.HAVE_ALL, 0),
         W.ProtocolViolation, "have_all payload"),
        ("request with 5 bytes",
         lambda hs: good(hs) + struct.pack(">IBIB", 6, W.REQUEST, 0, 0),
         W.ProtocolViolation, "request payload"),
        ("hashes with one hash too few",
         lambda hs: good(hs) + W.msg_hash_header(W.HASHES, 0, 0, tree.piece_count, 0,
                                                 b"".join(tree.piece_layer()[:-1])),
         W.ProtocolViolation, "hashes payload"),
        ("an unrequested block",
         lambda hs: good(hs) + W.frame(W.UNCHOKE) + layer_reply
         + W.frame(W.PIECE, struct.pack(">I", 300) + content[300 * 16384:301 * 16384]),
         W.ProtocolViolation, "not requested"),
        ("hashes nobody asked for",
         lambda hs: good(hs) + W.msg_hash_header(W.HASHES, 0, 5, 1, 0, b"h" * 32),
         W.ProtocolViolation, "answer no request"),
        ("have_all before hello",
         lambda hs: W.handshake_bytes(root[:20], b"S" * 20) + W.frame(W.HAVE_ALL),
         W.ProtocolViolation, "not hello"),
        ("unchoke instead of holdings after hello",
         _good_prefix(root, n, holdings=W.frame(W.UNCHOKE)), W.ProtocolViolation,
         "have_all/have_none/bitfield"),
        ("hello for another root",
         _good_prefix(root, n, {"root": root[:20] + b"z" * 12}), W.ProtocolViolation,
         "is not the root"),
        ("hello with unsorted keys",
         lambda hs: W.handshake_bytes(root[:20], b"S" * 20)
         + W.frame(W.HELLO, b"d4:root32:" + root + b"3:leni5ee"), W.ProtocolViolation,
         "ascending"),
        ("hello with reqq 2001", _good_prefix(root, n, {"reqq": 2001}), W.ProtocolViolation,
         "reqq"),
        ("hello with a 33-byte v", _good_prefix(root, n, {"v": b"v" * 33}),
         W.ProtocolViolation, "hello v"),
        ("hello without len", _good_prefix(root, n, {"len": None}), W.PeerError, "no len"),
        ("bitfield bit past the last block",
         _good_prefix(W.Tree(b"x" * 16385).root, 16385,
                      holdings=W.frame(W.BITFIELD, struct.pack(">I", 0) + b"\xe0")),
         W.ProtocolViolation, "past the last block"),
        # A close with our hello still unread may arrive as a reset: both are PeerClosed.
        ("the remote closes after the handshake",
         lambda hs: W.handshake_bytes(root[:20], b"S" * 20), W.PeerClosed, ("closed", "reset")),
    ]
    for what, reply, exc, words in cases:
        peer = ScriptedPeer(reply, hold=exc is not W.PeerClosed)
        r = root
        if "bitfield" in what:
            r = W.Tree(b"x" * 16385).root
        try:
            leecher = W.Leecher(W.HOST, peer.port, r, timeout=10)
            e = expect_raise(exc, leecher.fetch, what)
            alternatives = words if isinstance(words, tuple) else (words,)
            check(any(w.lower() in str(e).lower() for w in alternatives),
                  f"{what}: the error does not say {' or '.join(alternatives)!r}: {e}")
        finally:
            peer.close()


def _raw_connect(s_port):
    c = socket.create_connection((W.HOST, s_port), timeout=10)
    return c, W._Stream(c)


def test_seeder_answers_and_checks_what_it_receives():
    """The Seeder as an acceptor: closes unanswered on a wrong pstr or another swarm; sends
    handshake, hello (sorted keys len p pex reqq root v), have_all, unchoke; answers
    hash_request inside the limits and hash_reject outside them; rejects requests past the
    end; records a wrong-size request as malformed and closes."""
    content = data(40 * MIB + 123)
    with W.Seeder(content) as s:
        tree = s.tree
        # wrong pstr: closed without a byte
        c, st = _raw_connect(s.port)
        c.sendall(b"\x07digfs/2" + b"\0" * 48)
        check_eq(c.recv(100), b"", "answer to a digfs/2 handshake")
        c.close()
        # another swarm: closed without a byte
        c, st = _raw_connect(s.port)
        c.sendall(W.handshake_bytes(b"q" * 20, b"N" * 20))
        check_eq(c.recv(100), b"", "answer to a handshake for another swarm")
        c.close()

        c, st = _raw_connect(s.port)
        c.sendall(W.handshake_bytes(tree.root[:20], b"N" * 20))
        _res, key, node = st.read_handshake()
        check_eq(key, tree.root[:20], "seeder's swarm key")
        check_eq(node, s.node_id, "seeder's node id")
        mid, payload = st.read_frame()
        check_eq(mid, W.HELLO, "first message")
        check_eq(W.bdecode(payload), {b"len": len(content), b"p": s.port, b"pex": 0,
                                      b"reqq": 250, b"root": tree.root, b"v": b"wirepeer"},
                 "seeder hello")
        check(payload.startswith(b"d3:leni"), f"hello encoding: {payload[:20]!r}")
        check_eq(st.read_frame(), (W.HAVE_ALL, b""), "holdings")
        check_eq(st.read_frame(), (W.UNCHOKE, b""), "unchoke")
        c.sendall(W.frame(W.HELLO, W.bencode({"root": tree.root})) + W.frame(W.HAVE_NONE))

        def ask(layer, index, count, proof):
            c.sendall(W.msg_hash_header(W.HASH_REQUEST, layer, index, count, proof))
            return st.read_frame()

        h = tree.height
        top = W.layer_nodes(len(content), 2)
        mid, p = ask(2, 0, top, 0)
        check_eq(mid, W.HASHES, "answer to the piece layer request")
        check_eq(p[10:], b"".join(tree.piece_layer()), "piece layer")
        mid, p = ask(0, 2556, 5, 0)
        check_eq((mid, p[10:]), (W.HASHES, b"".join(tree.leaves[2556:2561])), "last leaves")
        mid, p = ask(h, 0, 1, 0)
        check_eq((mid, p[10:]), (W.HASHES, tree.root), "the top layer is the root")
        for bad in ((h + 1, 0, 1, 0), (0, 2556, 6, 0), (2, 641, 1, 0), (0, 0, 0, 0),
                    (0, 0, 2049, 0), (0, 0, 4, 1)):
            check_eq(ask(*bad), (W.HASH_REJECT, struct.pack(">BIIB", *bad)),
                     f"answer to hash_request{bad}")
        c.sendall(W.msg_block_ref(W.REQUEST, 2561))
        check_eq(st.read_frame(), (W.REJECT, struct.pack(">I", 2561)), "request past the end")
        c.sendall(W.msg_block_ref(W.REQUEST, 2560))
        check_eq(st.read_frame(), (W.PIECE, struct.pack(">I", 2560) + content[2560 * 16384:]),
                 "the short last block")
        c.sendall(struct.pack(">IBIB", 6, W.REQUEST, 0, 0))
        expect_raise(W.PeerClosed, lambda: st.read_frame(), "after a 5-byte request")
        c.close()
        T.wait_until(lambda: len(s.malformed) >= 2, "the seeder to record the malformed")
        found = [m for _a, m in s.malformed]
        check(any("pstr" in m for m in found), f"malformed: {found}")
        check(any("request payload is 5 bytes" in m for m in found), f"malformed: {found}")
        check_eq(s.connections, 3, "connections")
        check_eq(s.handshakes, 1, "handshakes answered")


# --------------------------------------------------------------------------- CLI and safety

def test_cli_seed_and_fetch():
    """`wire_peer.py seed FILE` prints port and root and serves; `fetch` downloads and
    verifies; a fetch for a root the seeder does not serve fails with exit status 1."""
    me = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wire_peer.py")
    content = T.data_of(3 * MIB + 5, 99)
    with tempfile.TemporaryDirectory(prefix="wirepeer-cli-", dir="/tmp") as d:
        src, out = os.path.join(d, "src"), os.path.join(d, "out")
        T.write_file(src, content)
        proc = subprocess.Popen([sys.executable, me, "seed", src], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            port_line = proc.stdout.readline().split()
            root_line = proc.stdout.readline().split()
            check(port_line[:1] == ["port"] and root_line[:1] == ["root"],
                  f"seed output: {port_line} {root_line}")
            port, root = int(port_line[1]), root_line[1]
            check_eq(root, T.merkle_root(content), "root printed by seed")
            r = subprocess.run([sys.executable, me, "fetch", f"127.0.0.1:{port}", root, out],
                               capture_output=True, text=True, timeout=120)
            check_eq(r.returncode, 0, f"fetch exit status ({r.stderr})")
            check_bytes(T.read_file(out), content, "fetched file")
            other = T.merkle_root(b"something else")
            r = subprocess.run([sys.executable, me, "fetch", f"127.0.0.1:{port}", other,
                                out + "2"], capture_output=True, text=True, timeout=120)
            check_eq(r.returncode, 1, f"fetch of an unserved root ({r.stdout} {r.stderr})")
            check(not os.path.exists(out + "2"), "a failed fetch wrote its output")
        finally:
            proc.terminate()  # our own child, by its pid
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_only_loopback():
    """Network safety: the module refuses any address but 127.0.0.1, before connecting."""
    for host in ("0.0.0.0", "10.0.0.1", "localhost", "::1", "127.0.0.2"):
        expect_raise(ValueError, lambda: W.Leecher(host, 1, b"r" * 32), f"Leecher({host})")
        expect_raise(ValueError, lambda: W.main(["fetch", f"{host}:1", "00" * 32, "/dev/null"]),
                     f"fetch {host}")


def _require_binary_only():
    """These tests need no FUSE: only the digfs binary (for `digfs hash`)."""
    if not (os.path.isfile(T.BIN) and os.access(T.BIN, os.X_OK)):
        print(f"FAIL: digfs binary not found or not executable: {T.BIN} (set DIGFS_BIN)")
        sys.exit(1)


if __name__ == "__main__":
    T.require_environment = _require_binary_only  # the runner's FUSE check does not apply
    T.main()
