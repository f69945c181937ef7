#!/usr/bin/env python3
"""A minimal STUN responder for the digfs network lab (RFC 5389 Binding over UDP, with the
RFC 5780 NAT-behaviour-discovery attributes; Python 3.11 stdlib only).

    python3 stun_server.py 203.0.113.10 203.0.113.11 [--port 3478] [--alt-port 3479] [-v]
    python3 stun_server.py --query 203.0.113.10:3478 [--change-ip] [--change-port]

It binds four UDP sockets on one host: (A1, P1), (A1, P2), (A2, P1), (A2, P2), where A1 / A2
are two addresses of that host and P1 / P2 two ports. A Binding request received on any of
them is answered with

  XOR-MAPPED-ADDRESS  (0x0020) the request's source address and port (RFC 5389; only when the
                      request carries the magic cookie)
  MAPPED-ADDRESS      (0x0001) the same, unobfuscated (RFC 3489 clients, and RFC 5389 allows it)
  RESPONSE-ORIGIN     (0x802B) the address and port the response is sent from (RFC 5780)
  OTHER-ADDRESS       (0x802C) the "other" address and port: (A2, P2) seen from (A1, P1) and so
                      on (RFC 5780; CHANGED-ADDRESS 0x0005 for a request without the cookie)
  SOFTWARE            (0x8022)
  FINGERPRINT         (0x8028) when the request had one

CHANGE-REQUEST (0x0003; flag 0x4 change IP, 0x2 change port) is honoured: the response leaves
from the socket with the other address and/or the other port. miniupnpd's ext_perform_stun sends
four requests (no change, change port, change IP, change both) from four local ports and calls
its WAN "unrestricted" only when all four answers arrive and each maps to the same address and
to the request's own port; this responder gives it exactly that.

A request with an unknown comprehension-required attribute (type < 0x8000) gets a 420 error
with UNKNOWN-ATTRIBUTES, as RFC 5389 section 7.3.1 says; anything that is not a well-formed
Binding request is dropped silently. No authentication (MESSAGE-INTEGRITY is not supported:
a request carrying USERNAME or MESSAGE-INTEGRITY is answered with 420 like any other unknown
required attribute).

Printed on stdout: one line "READY <A1>:<P1> <A1>:<P2> <A2>:<P1> <A2>:<P2>" once all four
sockets are bound (a lab waits for it); with -v one line per request. SIGTERM / SIGINT stop it.
Used in the lab only: it must be started inside a lab network namespace.
"""

import argparse
import binascii
import ipaddress
import os
import select
import signal
import socket
import struct
import sys
import threading

MAGIC = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_CHANGED_ADDRESS = 0x0005
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PADDING = 0x0026          # RFC 5780
ATTR_RESPONSE_PORT = 0x0027    # RFC 5780 (understood, not honoured: answered to the source)
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C

CHANGE_IP = 0x4
CHANGE_PORT = 0x2
KNOWN_REQUIRED = {ATTR_CHANGE_REQUEST, ATTR_PADDING, ATTR_RESPONSE_PORT}
SOFTWARE = b"digfs-netlab-stun"
FINGERPRINT_XOR = 0x5354554E


# --------------------------------------------------------------------------- encoding

def _pad4(b):
    return b + b"\0" * (-len(b) % 4)


def _attr(atype, value):
    return struct.pack("!HH", atype, len(value)) + _pad4(value)


def _addr_value(ip, port):
    return struct.pack("!BBH", 0, 1, port) + socket.inet_aton(ip)


def _xor_addr_value(ip, port):
    xport = port ^ (MAGIC >> 16)
    xip = struct.unpack("!I", socket.inet_aton(ip))[0] ^ MAGIC
    return struct.pack("!BBHI", 0, 1, xport, xip)


def _message(mtype, txid, attrs, fingerprint=False):
    """A STUN message of type @mtype with transaction id @txid (12 bytes; for an RFC 3489
    request the 16 bytes after the length) and the attributes already encoded in @attrs."""
    body = b"".join(attrs)
    head_id = txid if len(txid) == 16 else struct.pack("!I", MAGIC) + txid
    if fingerprint:
        length = len(body) + 8
        msg = struct.pack("!HH", mtype, length) + head_id + body
        crc = (binascii.crc32(msg) & 0xFFFFFFFF) ^ FINGERPRINT_XOR
        return msg + _attr(ATTR_FINGERPRINT, struct.pack("!I", crc))
    return struct.pack("!HH", mtype, len(body)) + head_id + body


def parse_message(data):
    """(type, cookie_ok, txid, [(attr_type, value)]) or None when @data is not STUN.
    txid is the 12-byte id after the cookie (RFC 5389) or the 16 bytes (RFC 3489)."""
    if len(data) < 20 or data[0] & 0xC0:
        return None
    mtype, length = struct.unpack("!HH", data[:4])
    if length % 4 or 20 + length != len(data):
        return None
    cookie_ok = struct.unpack("!I", data[4:8])[0] == MAGIC
    txid = data[8:20] if cookie_ok else data[4:20]
    attrs = []
    off = 20
    while off < len(data):
        if off + 4 > len(data):
            return None
        atype, alen = struct.unpack("!HH", data[off:off + 4])
        if off + 4 + alen > len(data):
            return None
        attrs.append((atype, data[off + 4:off + 4 + alen]))
        off += 4 + alen + (-alen % 4)
    return mtype, cookie_ok, txid, attrs


def decode_address(atype, value, txid_cookie=True):
    """(ip, port) from a (XOR-)MAPPED-ADDRESS-like attribute value (IPv4 only)."""
    if len(value) != 8 or value[1] != 1:
        return None
    port = struct.unpack("!H", value[2:4])[0]
    ip = struct.unpack("!I", value[4:8])[0]
    if atype == ATTR_XOR_MAPPED_ADDRESS:
        port ^= MAGIC >> 16
        ip ^= MAGIC
    return socket.inet_ntoa(struct.pack("!I", ip)), port


# --------------------------------------------------------------------------- server

class StunServer:
    """Four UDP sockets (A1/A2 x P1/P2) and a thread answering Binding requests on them.

        srv = StunServer("203.0.113.10", "203.0.113.11", 3478, 3479)
        srv.start()          # binds, then answers in a daemon thread
        ...
        srv.stop()
    """

    def __init__(self, addr1, addr2, port1=3478, port2=3479, verbose=False, log=None):
        for a in (addr1, addr2):
            if ipaddress.ip_address(a).version != 4:
                raise ValueError(f"IPv4 addresses only: {a}")
        if addr1 == addr2 or port1 == port2:
            raise ValueError("need two different addresses and two different ports")
        self.addrs = (addr1, addr2)
        self.ports = (port1, port2)
        self.verbose = verbose
        self.log = log or (lambda line: print(line, flush=True))
        self.socks = {}          # (ai, pi) -> socket
        self.requests = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = None

    def bind(self):
        try:
            for ai, a in enumerate(self.addrs):
                for pi, p in enumerate(self.ports):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((a, p))
                    s.setblocking(False)
                    self.socks[(ai, pi)] = s
        except OSError:
            self.close()
            raise

    def endpoints(self):
        return [f"{self.addrs[ai]}:{self.ports[pi]}" for ai in (0, 1) for pi in (0, 1)]

    def start(self):
        if not self.socks:
            self.bind()
        self._thread = threading.Thread(target=self.serve, daemon=True, name="stun")
        self._thread.start()
        return self

    def stop(self):
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def close(self):
        for s in self.socks.values():
            s.close()
        self.socks.clear()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1

    def serve(self):
        """Answers requests until stop() (or the stop pipe) says otherwise."""
        by_fd = {s.fileno(): key for key, s in self.socks.items()}
        while True:
            try:
                ready, _, _ = select.select(list(by_fd) + [self._stop_r], [], [])
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            for fd in ready:
                key = by_fd[fd]
                sock = self.socks[key]
                while True:
                    try:
                        data, src = sock.recvfrom(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break   # e.g. ICMP error queued on the socket
                    self.handle(key, data, src)

    def handle(self, key, data, src):
        msg = parse_message(data)
        if msg is None:
            return
        mtype, cookie_ok, txid, attrs = msg
        if mtype != BINDING_REQUEST:
            return      # indications and responses are not answered
        self.requests += 1
        ai, pi = key
        change = 0
        unknown = []
        fingerprint = False
        for atype, value in attrs:
            if atype == ATTR_CHANGE_REQUEST and len(value) == 4:
                change = struct.unpack("!I", value)[0]
            elif atype == ATTR_FINGERPRINT:
                fingerprint = True
            elif atype < 0x8000 and atype not in KNOWN_REQUIRED:
                unknown.append(atype)
        if unknown:
            reply_key = key
            err = struct.pack("!HBB", 0, 4, 20) + b"Unknown Attribute"
            unk = b"".join(struct.pack("!H", a) for a in unknown)
            if len(unknown) % 2:
                unk += struct.pack("!H", unknown[-1])   # RFC 3489 padding by repetition
            reply = _message(BINDING_ERROR, txid,
                             [_attr(ATTR_ERROR_CODE, err), _attr(ATTR_UNKNOWN_ATTRIBUTES, unk)],
                             fingerprint and cookie_ok)
        else:
            rai = ai ^ 1 if change & CHANGE_IP else ai
            rpi = pi ^ 1 if change & CHANGE_PORT else pi
            reply_key = (rai, rpi)
            origin = (self.addrs[rai], self.ports[rpi])
            other = (self.addrs[ai ^ 1], self.ports[pi ^ 1])
            out = []
            if cookie_ok:
                out.append(_attr(ATTR_XOR_MAPPED_ADDRESS, _xor_addr_value(*src)))
            out.append(_attr(ATTR_MAPPED_ADDRESS, _addr_value(*src)))
            out.append(_attr(ATTR_RESPONSE_ORIGIN, _addr_value(*origin)))
            out.append(_attr(ATTR_OTHER_ADDRESS if cookie_ok else ATTR_CHANGED_ADDRESS,
                             _addr_value(*other)))
            out.append(_attr(ATTR_SOFTWARE, SOFTWARE))
            reply = _message(BINDING_SUCCESS, txid, out, fingerprint and cookie_ok)
        try:
            self.socks[reply_key].sendto(reply, src)
        except OSError as e:
            if self.verbose:
                self.log(f"send to {src[0]}:{src[1]} failed: {e}")
            return
        if self.verbose:
            rk = reply_key
            self.log(f"request from {src[0]}:{src[1]} to {self.addrs[ai]}:{self.ports[pi]} "
                     f"change={change:#x} -> answered from {self.addrs[rk[0]]}:{self.ports[rk[1]]}"
                     + (f" (420: {unknown})" if unknown else ""))


# --------------------------------------------------------------------------- client

def query(server, port=3478, change_ip=False, change_port=False, timeout=2.0, tries=3,
          bind=("0.0.0.0", 0)):
    """Sends one Binding request (with CHANGE-REQUEST when asked) and returns a dict:
    mapped (ip, port), origin (ip, port) the answer came from, other (ip, port) or None.
    Raises TimeoutError when no answer arrives."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(bind)
        txid = os.urandom(12)
        flags = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
        req = _message(BINDING_REQUEST, txid,
                       [_attr(ATTR_CHANGE_REQUEST, struct.pack("!I", flags))])
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(req, (server, port))
            try:
                while True:
                    data, src = s.recvfrom(2048)
                    msg = parse_message(data)
                    if msg is None or msg[2] != txid:
                        continue
                    res = {"from": src, "type": msg[0], "mapped": None, "origin": None,
                           "other": None, "local": s.getsockname()}
                    for atype, value in msg[3]:
                        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_MAPPED_ADDRESS):
                            if res["mapped"] is None or atype == ATTR_XOR_MAPPED_ADDRESS:
                                res["mapped"] = decode_address(atype, value)
                        elif atype == ATTR_RESPONSE_ORIGIN:
                            res["origin"] = decode_address(atype, value)
                        elif atype == ATTR_OTHER_ADDRESS:
                            res["other"] = decode_address(atype, value)
                    return res
            except socket.timeout:
                continue
        raise TimeoutError(f"no STUN answer from {server}:{port}")
    finally:
        s.close()


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("addr1", nargs="?", help="first address (A1)")
    ap.add_argument("addr2", nargs="?", help="second address (A2)")
    ap.add_argument("--port", type=int, default=3478, help="primary port (P1)")
    ap.add_argument("--alt-port", type=int, default=3479, help="alternate port (P2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per request")
    ap.add_argument("--query", metavar="HOST:PORT", help="be a client: send one request")
    ap.add_argument("--change-ip", action="store_true")
    ap.add_argument("--change-port", action="store_true")
    args = ap.parse_args(argv)

    if args.query:
        host, _, port = args.query.rpartition(":")
        r = query(host, int(port), args.change_ip, args.change_port)
        fmt = lambda a: f"{a[0]}:{a[1]}" if a else "-"   # noqa: E731
        print(f"mapped {fmt(r['mapped'])} from {fmt(r['from'])} origin {fmt(r['origin'])} "
              f"other {fmt(r['other'])}")
        return 0

    if not args.addr1 or not args.addr2:
        ap.error("two addresses are needed (or --query)")
    srv = StunServer(args.addr1, args.addr2, args.port, args.alt_port, args.verbose)
    srv.bind()

    def on_signal(signum, frame):
        try:
            os.write(srv._stop_w, b"x")
        except OSError:
            pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    print("READY " + " ".join(srv.endpoints()), flush=True)
    srv.serve()
    srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
