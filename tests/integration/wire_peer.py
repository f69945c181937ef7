#!/usr/bin/env python3
"""An independent implementation of the digfs peer wire protocol, version 1
(docs/PROTOCOL.md section 3), for testing the C side against. Python 3.11, stdlib only.

Written from the spec, not from the C code: it shares no code with engine/peer_msg.c and
computes the BEP 52 tree itself with hashlib.

    Tree(data)      the BEP 52 tree of a file: root, leaves, every level, piece layer
    Seeder(data)    serves one file to any number of peers (threads), optionally lying
    Leecher(...)    fetches one file from one peer and verifies everything it gets

NETWORK SAFETY: this module only ever listens on and connects to 127.0.0.1. Any other
address is refused with ValueError.

CLI:
    python3 wire_peer.py seed FILE [--port P] [--corrupt all|I,J,...] [--lie-length N]
                                   [--bad-layer]
        prints "port P" and "root HEX", then serves until killed (SIGINT/SIGTERM).
    python3 wire_peer.py fetch 127.0.0.1:PORT ROOTHEX OUT
        downloads the file, verifies every hash and block, writes OUT.
"""

import argparse
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import time

# --------------------------------------------------------------------------- constants

HOST = "127.0.0.1"          # the only address this module talks to
BLOCK = 16384
HASH_LEN = 32
MAX_PIECES = 1024
PSTR = b"digfs/1"
HANDSHAKE_LEN = 56
MSG_MAX_LEN = (1 << 20) + 64  # largest value of a frame's length field
HASH_MAX_COUNT = 2048
HASH_MAX_PROOF = 32
REQQ_DEFAULT = 250
REQQ_MAX = 2000
HANDSHAKE_TIMEOUT = 10.0
KEEPALIVE_AFTER = 60.0
SILENT_LIMIT = 150.0
HELLO_MAX_DEPTH = 4
HELLO_MAX_TOKENS = 64
VERSION = b"wirepeer"

CHOKE, UNCHOKE, INTERESTED, NOT_INTERESTED, HAVE, BITFIELD, REQUEST, PIECE, CANCEL, REJECT, \
    HAVE_ALL, HAVE_NONE = range(12)
HELLO, HASH_REQUEST, HASHES, HASH_REJECT, PEX = 20, 21, 22, 23, 24

MSG_NAMES = {
    CHOKE: "choke", UNCHOKE: "unchoke", INTERESTED: "interested",
    NOT_INTERESTED: "not_interested", HAVE: "have", BITFIELD: "bitfield", REQUEST: "request",
    PIECE: "block", CANCEL: "cancel", REJECT: "reject", HAVE_ALL: "have_all",
    HAVE_NONE: "have_none", HELLO: "hello", HASH_REQUEST: "hash_request", HASHES: "hashes",
    HASH_REJECT: "hash_reject", PEX: "pex",
}
# Known ids whose payload has one fixed size (3.3).
FIXED_SIZE = {
    CHOKE: 0, UNCHOKE: 0, INTERESTED: 0, NOT_INTERESTED: 0, HAVE: 8, REQUEST: 4, CANCEL: 4,
    REJECT: 4, HAVE_ALL: 0, HAVE_NONE: 0, HASH_REQUEST: 10, HASH_REJECT: 10,
}


def _check_host(host):
    if host != HOST:
        raise ValueError(f"wire_peer only talks to {HOST} (network safety), not {host!r}")


# --------------------------------------------------------------------------- errors

class PeerError(Exception):
    """The exchange with a peer failed (base class)."""


class ProtocolViolation(PeerError):
    """The remote broke a rule of PROTOCOL.md section 3."""


class BadHashes(ProtocolViolation):
    """Hashes the remote sent do not verify (against the root or the piece layer)."""


class BadBlock(ProtocolViolation):
    """A block's bytes do not hash to its verified leaf hash."""

    def __init__(self, block, msg):
        super().__init__(msg)
        self.block = block


class HashRejected(PeerError):
    """The remote answered one of our hash requests with hash_reject."""


class BlockRejected(PeerError):
    """The remote refused a block it claims to hold while not choking us."""


class PeerClosed(PeerError):
    """The remote closed the connection."""


class PeerTimeout(PeerError):
    """The remote went silent."""


# --------------------------------------------------------------------------- bencode

class BencodeError(ValueError):
    pass


def bencode(v):
    if isinstance(v, bool):
        raise TypeError("bool is not bencodable")
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, (bytes, bytearray)):
        return b"%d:%s" % (len(v), bytes(v))
    if isinstance(v, str):
        return bencode(v.encode())
    if isinstance(v, list):
        return b"l" + b"".join(bencode(x) for x in v) + b"e"
    if isinstance(v, dict):
        items = sorted((k.encode() if isinstance(k, str) else bytes(k), x) for k, x in v.items())
        return b"d" + b"".join(bencode(k) + bencode(x) for k, x in items) + b"e"
    raise TypeError(f"cannot bencode {type(v).__name__}")


def bdecode(buf, max_depth=HELLO_MAX_DEPTH, max_tokens=HELLO_MAX_TOKENS):
    """Strict decoder: canonical integers and string lengths, dictionary keys in strictly
    ascending order, no trailing bytes. A token is every value and every dictionary key
    (string, integer, list, dictionary); an `e` ending a list/dict is not counted. The
    outermost value is at depth 1."""
    buf = bytes(buf)
    pos = 0
    tokens = 0

    def num(end_char):
        nonlocal pos
        end = buf.find(end_char, pos)
        if end < 0:
            raise BencodeError("unterminated number")
        s = buf[pos:end]
        if not s or not (s.isdigit() or (s[:1] == b"-" and s[1:].isdigit())):
            raise BencodeError(f"bad number {s!r}")
        if (s[:1] == b"0" and len(s) > 1) or s.startswith(b"-0"):
            raise BencodeError(f"non-canonical number {s!r}")
        pos = end + 1
        return int(s)

    def value(depth):
        nonlocal pos, tokens
        if depth > max_depth:
            raise BencodeError(f"nesting deeper than {max_depth}")
        tokens += 1
        if tokens > max_tokens:
            raise BencodeError(f"more than {max_tokens} tokens")
        if pos >= len(buf):
            raise BencodeError("truncated")
        c = buf[pos:pos + 1]
        if c == b"i":
            pos += 1
            return num(b"e")
        if c.isdigit():
            n = num(b":")
            if n < 0:
                raise BencodeError("negative string length")
            if pos + n > len(buf):
                raise BencodeError("string past the end")
            s = buf[pos:pos + n]
            pos += n
            return s
        if c == b"l":
            pos += 1
            out = []
            while True:
                if pos >= len(buf):
                    raise BencodeError("unterminated list")
                if buf[pos:pos + 1] == b"e":
                    pos += 1
                    return out
                out.append(value(depth + 1))
        if c == b"d":
            pos += 1
            out = {}
            last = None
            while True:
                if pos >= len(buf):
                    raise BencodeError("unterminated dict")
                if buf[pos:pos + 1] == b"e":
                    pos += 1
                    return out
                if not buf[pos:pos + 1].isdigit():
                    raise BencodeError("dict key is not a string")
                k = value(depth + 1)
                if last is not None and k <= last:
                    raise BencodeError(f"dict keys not in strictly ascending order at {k!r}")
                last = k
                out[k] = value(depth + 1)
        raise BencodeError(f"bad byte {c!r} at {pos}")

    v = value(1)
    if pos != len(buf):
        raise BencodeError(f"{len(buf) - pos} trailing bytes")
    return v


# --------------------------------------------------------------------------- merkle tree

def sha256(b):
    return hashlib.sha256(b).digest()


_ZERO = [b"\0" * HASH_LEN]


def zero_hash(level):
    """Hash of an all-zero-leaf subtree of @level: zero[0] = 32 zero bytes,
    zero[l + 1] = SHA-256(zero[l] || zero[l])."""
    while len(_ZERO) <= level:
        _ZERO.append(sha256(_ZERO[-1] + _ZERO[-1]))
    return _ZERO[level]


def ceil_log2(n):
    h = 0
    while (1 << h) < n:
        h += 1
    return h


def block_count(length):
    return (length + BLOCK - 1) // BLOCK


def block_size(length, i):
    """Size of block @i of a file of @length bytes (0 if there is no such block)."""
    if i < 0 or i * BLOCK >= length:
        return 0
    return min(BLOCK, length - i * BLOCK)


def piece_size(length):
    """Smallest power of two >= 16 KiB giving at most 1024 pieces."""
    blocks = block_count(length)
    shift = 0
    while -(-blocks // (1 << shift)) > MAX_PIECES:
        shift += 1
    return BLOCK << shift


def piece_level(length):
    return ceil_log2(piece_size(length) // BLOCK)


def piece_count(length):
    return max(1, -(-length // piece_size(length)))


def tree_height(length):
    """ceil(log2(blocks)); 0 for files of 0 or 1 block."""
    return ceil_log2(max(1, block_count(length)))


def layer_nodes(length, level):
    """Real (non-padding) nodes at tree level @level: ceil(blocks / 2^level); 0 for the empty
    file (it has no tree to ask about) and above the tree height."""
    blocks = block_count(length)
    if blocks == 0 or level > tree_height(length):
        return 0
    return -(-blocks // (1 << level))


def subtree_root(hashes, level, width):
    """Root of the subtree whose bottom row is @hashes at tree @level, padded with
    zero_hash(level) up to @width (a power of two >= len(hashes))."""
    if not hashes or len(hashes) > width or width & (width - 1):
        raise ValueError("bad subtree shape")
    row = list(hashes) + [zero_hash(level)] * (width - len(hashes))
    while len(row) > 1:
        row = [sha256(row[i] + row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


def verify_layer(root, length, layer):
    """True if @layer is the piece layer of the file of @length with @root."""
    if len(layer) != piece_count(length):
        return False
    if len(layer) == 1:
        return layer[0] == root
    return subtree_root(layer, piece_level(length), 1 << ceil_log2(len(layer))) == root


class Tree:
    """The BEP 52 tree of an in-memory file. levels[l] holds the real nodes of level l
    (ceil(blocks / 2^l) of them); a missing right sibling is zero_hash(l)."""

    def __init__(self, data):
        mv = memoryview(data)
        self.length = len(mv)
        self.blocks = block_count(self.length)
        if self.blocks == 0:
            leaves = [sha256(b"")]
        else:
            leaves = [sha256(mv[i * BLOCK:(i + 1) * BLOCK]) for i in range(self.blocks)]
        self.levels = [leaves]
        level = 0
        while len(self.levels[-1]) > 1:
            row = self.levels[-1]
            z = zero_hash(level)
            self.levels.append([sha256(row[i] + (row[i + 1] if i + 1 < len(row) else z))
                                for i in range(0, len(row), 2)])
            level += 1
        self.height = len(self.levels) - 1
        assert self.height == tree_height(self.length)
        self.root = self.levels[-1][0]
        self.piece_size = piece_size(self.length)
        self.piece_level = piece_level(self.length)
        self.piece_count = piece_count(self.length)
        self.blocks_per_piece = self.piece_size // BLOCK

    @property
    def leaves(self):
        return self.levels[0]

    def piece_layer(self):
        """Piece-layer hashes; a file of at most one block has its root as the layer."""
        if self.blocks <= 1:
            return [self.root]
        layer = self.levels[self.piece_level]
        assert len(layer) == self.piece_count
        return list(layer)

    def nodes(self, level, index, count):
        """Real nodes [index, index + count) of @level, or None if outside the layer."""
        if self.blocks == 0 or level > self.height or count < 1 or \
                index + count > len(self.levels[level]):
            return None
        return self.levels[level][index:index + count]


def root_of(data):
    return Tree(data).root


# --------------------------------------------------------------------------- framing

def frame(msg_id, payload=b""):
    return struct.pack(">IB", 1 + len(payload), msg_id) + payload


def handshake_bytes(swarm_key, node_id):
    assert len(swarm_key) == 20 and len(node_id) == 20
    return bytes([len(PSTR)]) + PSTR + b"\0" * 8 + swarm_key + node_id


def msg_block_ref(msg_id, block):
    return frame(msg_id, struct.pack(">I", block))


def msg_hash_header(msg_id, layer, index, count, proof, hashes=b""):
    return frame(msg_id, struct.pack(">BIIB", layer, index, count, proof) + hashes)


KEEPALIVE = b"\0\0\0\0"


class _Stream:
    """Buffered exact reads from a socket. EOF and resets become PeerClosed, socket timeouts
    PeerTimeout."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.last_rx = time.monotonic()

    def read(self, n):
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except socket.timeout:
                raise PeerTimeout("the remote was silent too long") from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise PeerClosed(f"connection reset by the remote ({e})") from None
            if not chunk:
                raise PeerClosed("the remote closed the connection"
                                 + (f" ({len(self.buf)} bytes of a partial read pending)"
                                    if self.buf else ""))
            self.last_rx = time.monotonic()
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_handshake(self):
        """Reads 56 bytes, checking pstrlen and pstr as soon as they arrive. Returns
        (reserved, swarm_key, node_id); raises ProtocolViolation on a wrong pstr."""
        b = self.read(1)
        if b[0] != len(PSTR):
            raise ProtocolViolation(f"handshake pstrlen is {b[0]}, expected {len(PSTR)}")
        p = self.read(len(PSTR))
        if p != PSTR:
            raise ProtocolViolation(f"handshake pstr is {p!r}, expected {PSTR!r}")
        rest = self.read(HANDSHAKE_LEN - 1 - len(PSTR))
        return rest[:8], rest[8:28], rest[28:48]

    def read_frame(self):
        """Returns (msg_id, payload) or (None, b"") for a keep-alive. Raises
        ProtocolViolation for a length over the limit, before reading the payload."""
        (n,) = struct.unpack(">I", self.read(4))
        if n == 0:
            return None, b""
        if n > MSG_MAX_LEN:
            raise ProtocolViolation(f"frame length {n} over the limit {MSG_MAX_LEN}")
        body = self.read(n)
        return body[0], body[1:]


def payload_problem(msg_id, payload):
    """Why @payload is the wrong size for known id @msg_id (None if it is fine, or the id is
    unknown). Context-free checks only."""
    n = len(payload)
    if msg_id in FIXED_SIZE:
        if n != FIXED_SIZE[msg_id]:
            return f"{MSG_NAMES[msg_id]} payload is {n} bytes, expected {FIXED_SIZE[msg_id]}"
        return None
    if msg_id == BITFIELD:
        if n < 5 or n - 4 > (1 << 20):
            return f"bitfield payload of {n} bytes (needs 4 + 1..2^20)"
        (first,) = struct.unpack_from(">I", payload)
        if first % 8:
            return f"bitfield first {first} is not a multiple of 8"
        return None
    if msg_id == PIECE:
        if n < 5 or n > 4 + BLOCK:
            return f"block payload of {n} bytes (needs 4 + 1..16384)"
        return None
    if msg_id == HASHES:
        if n < 10:
            return f"hashes payload of {n} bytes (needs at least the 10-byte header)"
        _layer, _index, count, proof = struct.unpack_from(">BIIB", payload)
        if count < 1 or count > HASH_MAX_COUNT or proof > HASH_MAX_PROOF:
            return f"hashes header count={count} proof_layers={proof} out of limits"
        if n != 10 + HASH_LEN * (count + proof):
            return (f"hashes payload of {n} bytes, expected {10 + HASH_LEN * (count + proof)} "
                    f"for count={count} proof_layers={proof}")
        return None
    if msg_id in (HELLO, PEX):
        if n < 2:
            return f"{MSG_NAMES[msg_id]} payload of {n} bytes is not a dictionary"
        return None
    return None


def parse_hello(payload, expect_root=None, swarm_key=None):
    """Decodes and validates a hello (3.4). Returns a dict with str keys. Raises
    ProtocolViolation when it breaks the spec."""
    try:
        d = bdecode(payload)
    except BencodeError as e:
        raise ProtocolViolation(f"hello is not valid bencode within the limits: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolViolation("hello is not a dictionary")
    out = {}
    for k, v in d.items():
        out[k.decode("latin-1")] = v
    root = out.get("root")
    if not isinstance(root, bytes) or len(root) != 32:
        raise ProtocolViolation(f"hello root missing or not 32 bytes: {root!r}")
    if swarm_key is not None and root[:20] != swarm_key:
        raise ProtocolViolation("hello root does not extend the handshake's swarm_key")
    if expect_root is not None and root != expect_root:
        raise ProtocolViolation(f"hello root {root.hex()} is not the root {expect_root.hex()}")
    if "len" in out and (not isinstance(out["len"], int) or out["len"] < 0
                         or out["len"] > (1 << 46)):
        raise ProtocolViolation(f"hello len out of range: {out['len']!r}")
    if "p" in out and (not isinstance(out["p"], int) or not 1 <= out["p"] <= 65535):
        raise ProtocolViolation(f"hello p is not a port: {out['p']!r}")
    if "pex" in out and out["pex"] not in (0, 1):
        raise ProtocolViolation(f"hello pex is not 0 or 1: {out['pex']!r}")
    if "reqq" in out and (not isinstance(out["reqq"], int) or not 1 <= out["reqq"] <= REQQ_MAX):
        raise ProtocolViolation(f"hello reqq out of 1..{REQQ_MAX}: {out['reqq']!r}")
    if "v" in out and (not isinstance(out["v"], bytes) or len(out["v"]) > 32):
        raise ProtocolViolation(f"hello v is not a string of at most 32 bytes: {out['v']!r}")
    if "yourip" in out and (not isinstance(out["yourip"], bytes)
                            or len(out["yourip"]) not in (4, 16)):
        raise ProtocolViolation(f"hello yourip is not 4 or 16 bytes: {out['yourip']!r}")
    return out


def _flip(b, pos=None):
    """@b with one byte changed."""
    b = bytearray(b)
    pos = len(b) // 2 if pos is None else pos
    b[pos] ^= 0x01
    return bytes(b)


# --------------------------------------------------------------------------- seeder

class ConnInfo:
    """What one incoming connection did."""

    def __init__(self, addr):
        self.addr = addr
        self.t_open = time.monotonic()
        self.t_close = None
        self.handshaked = False
        self.root = None               # the file the handshake named
        self.remote_node_id = None
        self.remote_hello = None
        self.blocks_served = 0
        self.hash_requests_served = 0
        self.hash_rejects_sent = 0
        self.requests_rejected = 0
        self.bad_sent = 0              # corrupt blocks / wrong layers we sent
        self.closed_by_remote = False  # EOF / reset from the remote
        self.malformed = []            # rule breaks by the remote (PROTOCOL.md 3)
        self.notes = []                # odd but allowed things
        self.messages = {}             # id -> count received

    def __repr__(self):
        return (f"<conn {self.addr} blocks={self.blocks_served} "
                f"hashreq={self.hash_requests_served} bad_sent={self.bad_sent} "
                f"closed_by_remote={self.closed_by_remote} malformed={self.malformed}>")


class _File:
    """One file a Seeder serves; @lie_length replaces the announced length."""

    def __init__(self, data, lie_length=None):
        self.data = bytes(data)
        self.tree = Tree(self.data)
        self.root = self.tree.root
        self.swarm_key = self.root[:20]
        self.lie = lie_length is not None
        self.length = self.tree.length if lie_length is None else lie_length


class _TxState:
    """Serialised writes to one connection, with the time of the last one."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def send(self, b):
        with self.lock:
            self.sock.sendall(b)
            self.last = time.monotonic()


class Seeder:
    """Serves in-memory files on 127.0.0.1 to any number of peers, one thread each. The
    first file is @data; @more adds files served on the same address (a connection picks
    its file by the handshake's swarm key, as a digfs node sharing several roots does).

    corrupt      "all", or a set of block indices: those blocks are served with one byte
                 flipped (the leaf hashes stay true, so the receiver must catch it).
    lie_length   (first file only) announce this length in hello; blocks are served
                 cut/zero-padded to match the lie (so only the hashes can tell); hashes come
                 from the real tree.
    bad_layer    answers to hash requests for the piece layer have one hash changed.
    corrupt and bad_layer apply to every file served.
    stall        "all", or a set of block indices: requests for those are never answered
                 (a stalled peer: the receiver must get them elsewhere).
    gate         a threading.Event: each connection waits (at most gate_timeout seconds) for
                 it after reading the initiator's handshake and before answering, to force
                 the order in which a client meets several seeders.
    Stats: connections (TCP accepts), handshakes, blocks_served, closed_by_remote
    (connections the remote closed after we sent it bad data), addresses_seen, conns
    (ConnInfo list), malformed (all ConnInfo.malformed, with the address).
    Events: bad_served (we sent something bad), closed_after_bad."""

    def __init__(self, data, port=0, corrupt=None, lie_length=None, bad_layer=False,
                 gate=None, gate_timeout=8.0, node_id=None, reqq=REQQ_DEFAULT, more=(),
                 stall=None):
        self.files = {}
        for d in [data, *more]:
            f = _File(d, lie_length if not self.files else None)
            self.files[f.swarm_key] = f
        first = next(iter(self.files.values()))
        self.data, self.tree, self.root = first.data, first.tree, first.root
        self.swarm_key, self.length = first.swarm_key, first.length
        self.corrupt = corrupt
        self.lie_length = lie_length
        self.bad_layer = bad_layer
        self.stall = stall
        self.stalled = 0  # requests left unanswered
        self.gate = gate
        self.gate_timeout = gate_timeout
        self.node_id = node_id or os.urandom(20)
        self.reqq = reqq
        self.lock = threading.Lock()
        self.conns = []
        self.connections = 0
        self.handshakes = 0
        self.addresses_seen = set()
        self.bad_served = threading.Event()
        self.closed_after_bad = threading.Event()
        self._socks = {}  # socket -> _TxState (None until the handshake is answered)
        self._threads = []
        self._stop = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, port))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._spawn(self._accept_loop, "seeder-accept")
        self._spawn(self._keepalive_loop, "seeder-keepalive")

    # ---- public
    @property
    def root_hex(self):
        return self.root.hex()

    @property
    def addr(self):
        return f"{HOST}:{self.port}"

    @property
    def blocks_served(self):
        with self.lock:
            return sum(c.blocks_served for c in self.conns)

    def conns_for(self, root):
        """Connections whose handshake named @root (bytes or hex)."""
        root = bytes.fromhex(root) if isinstance(root, str) else root
        with self.lock:
            return [c for c in self.conns if c.root == root]

    @property
    def hash_requests_served(self):
        with self.lock:
            return sum(c.hash_requests_served for c in self.conns)

    @property
    def closed_by_remote(self):
        with self.lock:
            return sum(1 for c in self.conns if c.closed_by_remote and c.bad_sent)

    @property
    def malformed(self):
        with self.lock:
            return [(c.addr, m) for c in self.conns for m in c.malformed]

    def summary(self):
        with self.lock:
            conns = list(self.conns)
        served = sum(c.blocks_served for c in conns)
        return (f"seeder {self.addr} root={self.root_hex[:16]}… "
                f"connections={self.connections} handshakes={self.handshakes} "
                f"blocks_served={served} closed_by_remote={self.closed_by_remote} "
                f"conns={conns}")

    def close(self):
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- internals
    def _spawn(self, fn, name, *args):
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                s, addr = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            info = ConnInfo(addr)
            with self.lock:
                self.connections += 1
                self.addresses_seen.add(addr)
                self.conns.append(info)
                self._socks[s] = None
            self._spawn(self._serve, f"seeder-conn-{addr[1]}", s, info)

    def _keepalive_loop(self):
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                live = [tx for tx in self._socks.values() if tx is not None]
            for tx in live:
                if now - tx.last > KEEPALIVE_AFTER:
                    try:
                        tx.send(KEEPALIVE)
                    except OSError:
                        pass

    @staticmethod
    def _block_bytes(f, i):
        """What we send for block i of file @f (under the announced length)."""
        n = block_size(f.length, i)
        chunk = f.data[i * BLOCK:i * BLOCK + n]
        if len(chunk) < n:
            chunk += b"\0" * (n - len(chunk))
        return chunk

    def _serve(self, s, info):
        tx = _TxState(s)
        send = tx.send
        st = _Stream(s)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(HANDSHAKE_TIMEOUT)
            try:
                _res, key, node = st.read_handshake()
            except ProtocolViolation as e:
                info.malformed.append(f"handshake: {e}")
                return  # close without answering
            f = self.files.get(key)
            if f is None:
                info.notes.append(f"handshake for another swarm {key.hex()}: closed unanswered")
                return
            if node == self.node_id:
                info.notes.append("connection to ourselves: closed unanswered")
                return
            info.remote_node_id = node
            info.root = f.root
            if self.gate is not None:
                end = time.monotonic() + self.gate_timeout
                while not self.gate.wait(0.1) and time.monotonic() < end:
                    if self._stop.is_set():
                        return
            with self.lock:
                self._socks[s] = tx
            hello = {"len": f.length, "p": self.port, "pex": 0, "reqq": self.reqq,
                     "root": f.root, "v": VERSION}
            send(handshake_bytes(f.swarm_key, self.node_id) + frame(HELLO, bencode(hello))
                 + frame(HAVE_ALL) + frame(UNCHOKE))
            info.handshaked = True
            with self.lock:
                self.handshakes += 1
            s.settimeout(SILENT_LIMIT)
            self._message_loop(f, st, send, info)
        except (PeerClosed, ConnectionResetError, BrokenPipeError):
            info.closed_by_remote = not self._stop.is_set()  # not our own close()
        except PeerTimeout:
            info.notes.append("remote silent: closed")
        except ProtocolViolation as e:
            info.malformed.append(str(e))
        except OSError as e:
            if not self._stop.is_set():
                info.notes.append(f"socket error: {e}")
        except Exception as e:  # a bug here must show up in the stats, not kill silently
            info.malformed.append(f"seeder internal error: {type(e).__name__}: {e}")
        finally:
            info.t_close = time.monotonic()
            if info.closed_by_remote and info.bad_sent:
                self.closed_after_bad.set()
            with self.lock:
                self._socks.pop(s, None)
            try:
                s.close()
            except OSError:
                pass

    def _message_loop(self, f, st, send, info):
        nblocks = block_count(f.length)
        seen_hello = False
        n_msgs = 0
        while not self._stop.is_set():
            msg_id, payload = st.read_frame()
            if msg_id is None:
                continue  # keep-alive
            info.messages[msg_id] = info.messages.get(msg_id, 0) + 1
            name = MSG_NAMES.get(msg_id)
            if name is None:
                info.notes.append(f"unknown id {msg_id} skipped")
                continue
            n_msgs += 1
            problem = payload_problem(msg_id, payload)
            if problem:
                info.malformed.append(problem)
                return  # close (3.2)
            if n_msgs == 1 and msg_id != HELLO:
                info.malformed.append(f"first message after the handshake is {name}, not hello")
            if n_msgs == 2 and msg_id not in (HAVE_ALL, HAVE_NONE, BITFIELD):
                info.malformed.append(f"second message is {name}, not have_all/have_none/"
                                      "bitfield (what the sender holds)")
            if msg_id == HELLO:
                if seen_hello:
                    info.notes.append("a second hello")
                seen_hello = True
                try:
                    info.remote_hello = parse_hello(payload, swarm_key=f.swarm_key)
                except ProtocolViolation as e:
                    info.malformed.append(str(e))
                    return
                r = info.remote_hello
                if r["root"] != f.root:
                    info.notes.append("hello root differs from ours past the swarm key")
                    return
                if "len" in r and r["len"] != f.length:
                    info.notes.append(f"remote hello says len {r['len']}, we say {f.length}")
            elif msg_id in (HAVE_ALL, HAVE_NONE, BITFIELD):
                if msg_id == BITFIELD:
                    self._check_bitfield(payload, nblocks, info)
            elif msg_id == HAVE:
                first, count = struct.unpack(">II", payload)
                if count == 0 or first + count > nblocks:
                    info.malformed.append(f"have [{first}, +{count}) outside the file "
                                          f"of {nblocks} blocks")
            elif msg_id == REQUEST:
                (i,) = struct.unpack(">I", payload)
                if i >= nblocks:
                    info.requests_rejected += 1
                    send(msg_block_ref(REJECT, i))
                    continue
                if self.stall == "all" or (self.stall is not None and self.stall != "all"
                                           and i in self.stall):
                    with self.lock:
                        self.stalled += 1
                    continue
                chunk = self._block_bytes(f, i)
                if self.corrupt == "all" or (isinstance(self.corrupt, (set, frozenset, list,
                                                                       tuple))
                                             and i in self.corrupt):
                    chunk = _flip(chunk)
                    info.bad_sent += 1
                    self.bad_served.set()
                elif f.lie and chunk != f.data[i * BLOCK:i * BLOCK + BLOCK]:
                    info.bad_sent += 1
                    self.bad_served.set()
                send(frame(PIECE, struct.pack(">I", i) + chunk))
                info.blocks_served += 1
            elif msg_id == CANCEL:
                pass  # everything is answered at once; nothing is ever queued
            elif msg_id == HASH_REQUEST:
                self._answer_hashes(f, payload, send, info)
            elif msg_id == PIECE:
                info.malformed.append("a block we never requested (we request nothing)")
                return
            elif msg_id in (HASHES, HASH_REJECT):
                info.malformed.append(f"{name} without a hash_request from us")
            elif msg_id == REJECT:
                info.notes.append("a reject, but we requested nothing")
            elif msg_id == PEX:
                info.notes.append("pex although our hello said pex=0")

    def _check_bitfield(self, payload, nblocks, info):
        (first,) = struct.unpack_from(">I", payload)
        bits = payload[4:]
        if first >= nblocks:
            info.malformed.append(f"bitfield first {first} outside the file")
            return
        nbits = len(bits) * 8
        if (first + nbits - 1) // 8 > (nblocks - 1) // 8:
            info.malformed.append("bitfield goes past the byte holding the last block")
            return
        for k in range(max(0, nblocks - first), nbits):
            if bits[k // 8] & (0x80 >> (k % 8)):
                info.malformed.append(f"bitfield bit set past the last block (block {first + k})")
                return

    def _answer_hashes(self, f, payload, send, info):
        layer, index, count, proof = struct.unpack(">BIIB", payload)
        hdr = (layer, index, count, proof)
        nodes = None
        if 1 <= count <= HASH_MAX_COUNT and proof == 0:
            nodes = f.tree.nodes(layer, index, count)
        if nodes is None:
            info.hash_rejects_sent += 1
            send(msg_hash_header(HASH_REJECT, *hdr))
            return
        if self.bad_layer and layer == f.tree.piece_level:
            nodes = [_flip(nodes[0], 0)] + nodes[1:]
            info.bad_sent += 1
            self.bad_served.set()
        info.hash_requests_served += 1
        send(msg_hash_header(HASHES, *hdr, b"".join(nodes)))


# --------------------------------------------------------------------------- leecher

class Leecher:
    """Fetches one file from one peer at 127.0.0.1:port and verifies everything.

    fetch() returns the bytes or raises a PeerError subclass: ProtocolViolation (BadHashes,
    BadBlock, ...) for anything the remote did against the spec, HashRejected,
    BlockRejected, PeerClosed, PeerTimeout. After fetch(): remote_hello, remote_handshake,
    stats, notes (odd but allowed things the remote did)."""

    def __init__(self, host, port, root, timeout=60.0, pipeline=64, hash_pipeline=8,
                 node_id=None):
        _check_host(host)
        self.host, self.port = host, int(port)
        self.root = bytes.fromhex(root) if isinstance(root, str) else bytes(root)
        if len(self.root) != 32:
            raise ValueError("root must be 32 bytes")
        self.timeout = timeout
        self.pipeline = pipeline
        self.hash_pipeline = hash_pipeline
        self.node_id = node_id or os.urandom(20)
        self.remote_hello = None
        self.remote_handshake = None
        self.notes = []
        self.stats = {"blocks": 0, "hash_requests": 0, "bytes_in": 0, "rejects": 0}

    def fetch(self):
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self._run(s)
        finally:
            try:
                s.close()
            except OSError:
                pass

    # ---- the exchange
    def _run(self, s):
        st = _Stream(s)
        key = self.root[:20]
        s.sendall(handshake_bytes(key, self.node_id))
        reserved, rkey, rnode = st.read_handshake()
        self.remote_handshake = (reserved, rkey, rnode)
        if rkey != key:
            raise ProtocolViolation(f"acceptor's handshake names swarm {rkey.hex()}, "
                                    f"we asked for {key.hex()}")
        if rnode == self.node_id:
            raise ProtocolViolation("the acceptor's node id is ours")
        s.sendall(frame(HELLO, bencode({"pex": 0, "reqq": REQQ_DEFAULT, "root": self.root,
                                        "v": VERSION}))
                  + frame(HAVE_NONE) + frame(INTERESTED))

        msg_id, payload = self._next(st)
        if msg_id != HELLO:
            raise ProtocolViolation(f"first message after the handshake is "
                                    f"{MSG_NAMES.get(msg_id, msg_id)}, not hello")
        hello = parse_hello(payload, expect_root=self.root, swarm_key=key)
        self.remote_hello = hello
        if "len" not in hello:
            raise PeerError("the peer's hello has no len: it does not know the file's length")
        length = hello["len"]
        self.length = length
        self.remote_reqq = hello.get("reqq", REQQ_DEFAULT)
        nblocks = block_count(length)
        if nblocks > (1 << 32):
            raise ProtocolViolation(f"hello len {length} needs more than 2^32 blocks")

        # holdings (3.3): the message right after hello
        msg_id, payload = self._next(st)
        self.held = None  # None = all; else a bytearray of 0/1 per block
        if msg_id == HAVE_ALL:
            pass
        elif msg_id == HAVE_NONE:
            self.held = bytearray(nblocks)
        elif msg_id == BITFIELD:
            self.held = bytearray(nblocks)
            self._apply_bitfield(payload, nblocks)
        else:
            raise ProtocolViolation(f"message after hello is {MSG_NAMES.get(msg_id, msg_id)}, "
                                    "not have_all/have_none/bitfield")

        if length == 0:
            if self.root != sha256(b""):
                raise BadHashes("the peer says the file is empty, but the root is not "
                                "SHA-256 of nothing")
            return b""
        return self._transfer(s, st, length, nblocks)

    def _next(self, st):
        """Next message that is not a keep-alive or an unknown id; size-checked."""
        while True:
            msg_id, payload = st.read_frame()
            if msg_id is None:
                continue
            if msg_id not in MSG_NAMES:
                self.notes.append(f"unknown id {msg_id} skipped")
                continue
            problem = payload_problem(msg_id, payload)
            if problem:
                raise ProtocolViolation(problem)
            return msg_id, payload

    def _apply_bitfield(self, payload, nblocks):
        (first,) = struct.unpack_from(">I", payload)
        bits = payload[4:]
        if first >= nblocks or (first + len(bits) * 8 - 1) // 8 > (nblocks - 1) // 8:
            raise ProtocolViolation(f"bitfield [{first}, +{len(bits) * 8} bits) outside the "
                                    f"file of {nblocks} blocks")
        for k in range(len(bits) * 8):
            if bits[k // 8] & (0x80 >> (k % 8)):
                if first + k >= nblocks:
                    raise ProtocolViolation(f"bitfield bit set past the last block "
                                            f"({first + k})")
                self.held[first + k] = 1

    def _transfer(self, s, st, length, nblocks):
        pl = piece_level(length)
        pc = piece_count(length)
        bpp = piece_size(length) // BLOCK
        leaves = [None] * nblocks
        out = bytearray(length)
        have = bytearray(nblocks)
        missing = nblocks
        ready = []                 # blocks with a verified leaf, not requested yet (a stack)
        hash_queue = []             # (layer, index, count, piece) still to request
        hash_out = {}              # header -> piece (None for the piece layer)
        piece_leaves = {}          # piece -> {index: [hashes]} collected
        block_out = set()
        layer = None
        unchoked = False
        waiting_for_have = []      # verified blocks the remote does not hold (yet)

        def piece_blocks(p):
            return range(p * bpp, min((p + 1) * bpp, nblocks))

        if nblocks == 1:
            layer = [self.root]
            leaves[0] = self.root
            ready.append(0)
        else:
            hash_queue.append((pl, 0, pc, None))

        def send_requests():
            nonlocal ready
            buf = []
            while hash_queue and len(hash_out) < self.hash_pipeline:
                lyr, idx, cnt, p = hash_queue.pop(0)
                hash_out[(lyr, idx, cnt, 0)] = p
                buf.append(msg_hash_header(HASH_REQUEST, lyr, idx, cnt, 0))
                self.stats["hash_requests"] += 1
            if unchoked:
                limit = min(self.pipeline, self.remote_reqq)
                while ready and len(block_out) < limit:
                    i = ready.pop()
                    if self.held is not None and not self.held[i]:
                        waiting_for_have.append(i)
                        continue
                    block_out.add(i)
                    buf.append(msg_block_ref(REQUEST, i))
            if buf:
                s.sendall(b"".join(buf))

        def leaves_ready(p, hashes):
            # hashes: the piece's leaves, checked against layer[p]
            got = subtree_root(hashes, 0, bpp)
            if got != layer[p]:
                raise BadHashes(f"leaf hashes of piece {p} do not match the piece layer")
            blocks = piece_blocks(p)
            for i, h in zip(blocks, hashes):
                leaves[i] = h
            ready.extend(reversed(blocks))

        while missing:
            send_requests()
            if not (hash_out or block_out or hash_queue or ready or waiting_for_have):
                raise PeerError("nothing to ask for but blocks are missing (internal error)")
            msg_id, payload = self._next(st)
            if msg_id == PIECE:
                (i,) = struct.unpack_from(">I", payload)
                data = payload[4:]
                if i not in block_out:
                    raise ProtocolViolation(f"block {i} was not requested")
                block_out.discard(i)
                if len(data) != block_size(length, i):
                    raise ProtocolViolation(f"block {i} has {len(data)} bytes, expected "
                                            f"{block_size(length, i)} for length {length}")
                if sha256(data) != leaves[i]:
                    raise BadBlock(i, f"block {i} does not hash to its verified leaf hash")
                out[i * BLOCK:i * BLOCK + len(data)] = data
                have[i] = 1
                missing -= 1
                self.stats["blocks"] += 1
                self.stats["bytes_in"] += len(data)
            elif msg_id == HASHES:
                lyr, idx, cnt, proof = struct.unpack_from(">BIIB", payload)
                hdr = (lyr, idx, cnt, proof)
                if hdr not in hash_out:
                    raise ProtocolViolation(f"hashes {hdr} answer no request of ours")
                p = hash_out.pop(hdr)
                hashes = [payload[10 + k * 32:10 + (k + 1) * 32] for k in range(cnt)]
                if p is None:
                    if not verify_layer(self.root, length, hashes):
                        raise BadHashes("the piece layer does not verify against the root "
                                        f"(length {length}: a lie in len or in the hashes)")
                    layer = hashes
                    if pl == 0:
                        for i in range(nblocks):
                            leaves[i] = layer[i]
                        ready.extend(reversed(range(nblocks)))
                    else:
                        for p2 in range(pc):
                            blocks = piece_blocks(p2)
                            for start in range(blocks.start, blocks.stop, HASH_MAX_COUNT):
                                n = min(HASH_MAX_COUNT, blocks.stop - start)
                                hash_queue.append((0, start, n, p2))
                else:
                    parts = piece_leaves.setdefault(p, {})
                    parts[idx] = hashes
                    blocks = piece_blocks(p)
                    if sum(len(v) for v in parts.values()) == len(blocks):
                        allh = [h for k in sorted(parts) for h in parts[k]]
                        del piece_leaves[p]
                        leaves_ready(p, allh)
            elif msg_id == HASH_REJECT:
                hdr = struct.unpack(">BIIB", payload)
                if hdr not in hash_out:
                    raise ProtocolViolation(f"hash_reject {hdr} answers no request of ours")
                raise HashRejected(f"the peer rejected hash_request(layer={hdr[0]}, "
                                   f"index={hdr[1]}, count={hdr[2]}, proof_layers={hdr[3]}) "
                                   f"for length {length}")
            elif msg_id == UNCHOKE:
                unchoked = True
            elif msg_id == CHOKE:
                unchoked = False
            elif msg_id == REJECT:
                (i,) = struct.unpack(">I", payload)
                if i not in block_out:
                    raise ProtocolViolation(f"reject for block {i}, which we did not request")
                block_out.discard(i)
                self.stats["rejects"] += 1
                if unchoked and (self.held is None or self.held[i]):
                    raise BlockRejected(f"the peer rejected block {i} though it holds it and "
                                        "does not choke us")
                ready.append(i)
            elif msg_id == HAVE:
                first, count = struct.unpack(">II", payload)
                if count == 0 or first + count > nblocks:
                    raise ProtocolViolation(f"have [{first}, +{count}) outside the file")
                if self.held is not None:
                    for i in range(first, first + count):
                        self.held[i] = 1
                    ready.extend(waiting_for_have)
                    waiting_for_have.clear()
            elif msg_id == HAVE_ALL:
                self.held = None
                ready.extend(waiting_for_have)
                waiting_for_have.clear()
            elif msg_id == BITFIELD:
                if self.held is None:
                    self.notes.append("bitfield after have_all")
                    self.held = bytearray(nblocks)
                self._apply_bitfield(payload, nblocks)
                ready.extend(waiting_for_have)
                waiting_for_have.clear()
            elif msg_id == HELLO:
                self.notes.append("a second hello")
            elif msg_id == REQUEST:
                (i,) = struct.unpack(">I", payload)
                s.sendall(msg_block_ref(REJECT, i))  # we hold nothing to serve
            elif msg_id == HASH_REQUEST:
                s.sendall(msg_hash_header(HASH_REJECT, *struct.unpack(">BIIB", payload)))
            elif msg_id == PEX:
                self.notes.append("pex although our hello said pex=0")
            # interested / not_interested / cancel / have_none: nothing to do
        return bytes(out)


def fetch(host, port, root, **kw):
    return Leecher(host, port, root, **kw).fetch()


# --------------------------------------------------------------------------- CLI

def _parse_hostport(s):
    host, _, port = s.rpartition(":")
    _check_host(host)
    return host, int(port)


def main(argv=None):
    ap = argparse.ArgumentParser(description="digfs peer wire protocol v1 test peer "
                                 "(127.0.0.1 only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("seed", help="serve FILE until killed")
    sp.add_argument("file")
    sp.add_argument("--port", type=int, default=0)
    sp.add_argument("--corrupt", help="'all' or comma-separated block indices")
    sp.add_argument("--lie-length", type=int)
    sp.add_argument("--bad-layer", action="store_true")
    fp = sub.add_parser("fetch", help="download ROOTHEX from 127.0.0.1:PORT into OUT")
    fp.add_argument("hostport")
    fp.add_argument("root")
    fp.add_argument("out")
    fp.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)

    if a.cmd == "seed":
        with open(a.file, "rb") as f:
            data = f.read()
        corrupt = None
        if a.corrupt == "all":
            corrupt = "all"
        elif a.corrupt:
            corrupt = {int(x) for x in a.corrupt.split(",")}
        seeder = Seeder(data, port=a.port, corrupt=corrupt, lie_length=a.lie_length,
                        bad_layer=a.bad_layer)
        print(f"port {seeder.port}", flush=True)
        print(f"root {seeder.root_hex}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        seeder.close()
        print(seeder.summary(), file=sys.stderr)
        return 0

    host, port = _parse_hostport(a.hostport)
    try:
        data = Leecher(host, port, a.root, timeout=a.timeout).fetch()
    except PeerError as e:
        print(f"fetch failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    with open(a.out, "wb") as f:
        f.write(data)
    print(f"fetched {len(data)} bytes, root {a.root} verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
