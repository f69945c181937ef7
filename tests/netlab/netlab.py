#!/usr/bin/env python3
"""The digfs network lab: a small internet made of Linux network namespaces (Python 3.11
stdlib only; needs root, iproute2, util-linux's nsenter and iptables).

    with Lab() as lab:
        p1 = lab.public("p1")                   # 198.51.100.10, on the internet directly
        r1 = lab.router("r1", kind="easy")      # MASQUERADE (port-preserving)
        n1 = lab.behind(r1, "n1")               # 10.1.0.2 behind r1
        n2 = lab.behind(r1, "n2")               # a second host behind the same NAT
        h = lab.nat_host("h", kind="hard")      # router "h-r" (--random-fully) + host "h"
        lab.run(n1, ["ip", "route"])            # a command in n1's network namespace
        proc = lab.popen(p1, [...])             # started there, stopped at teardown

Topology: one namespace "inet" holds a bridge, the internet; no addresses, no routes. Every
public host and every router's WAN side is a veth into that bridge with an address in
198.51.100.0/24 or 203.0.113.0/24 (both prefixes are on-link on the one bridge). A router
namespace also holds a LAN bridge (its gateway address, e.g. 10.1.0.1/24), its hosts are
veths into it; it forwards with iptables MASQUERADE on its WAN side and a stateful firewall
that drops everything from the WAN that is not a reply (RFC 4787: endpoint-independent
mapping for "easy", a new mapping per destination for "hard" (--random-fully); filtering is
address-and-port-dependent for both, as Linux conntrack does it). No hairpinning: two hosts
behind one NAT do not reach each other through its public address.

Safety: no interface of the lab is in the calling namespace or any other namespace outside
the lab (every veth is created with both ends inside lab namespaces), and no lab namespace
has a default route: routes exist only for 198.51.100.0/24, 203.0.113.0/24, a router's own
LAN, and 224.0.0.0/4 on-link (multicast stays on its segment: no namespace routes multicast,
and the internet bridge floods multicast to no port, so only a router's LAN carries it, as
BEP 14 LAN discovery expects).
IPv6 is turned off in every lab namespace.

Names: every namespace is "digfslab-<pid>.<starttime>-<random>-<host>" (the owning process's
pid and start time, so leftovers of a dead owner are recognised). Teardown (close(), the
context manager, atexit, SIGTERM/SIGHUP when nobody else handles them) stops processes the
lab started, then every process still inside a lab namespace (found by its /proc/PID/ns/net),
by pid, and deletes the namespaces, which destroys their veths and bridges. A reaper process
(in its own session) does the same if the owner dies without tearing down (SIGKILL, os._exit).
`python3 netlab.py --cleanup` removes leftovers of dead owners (`--all`: of every lab).

Commands run through `nsenter --net=/run/netns/NAME`, which changes only the network
namespace: a FUSE mount made inside is visible to the rest of the test (`ip netns exec`
would give the command a private mount namespace; pass private_mounts=True for that).

A future router(kind="upnp") (issue 4, item 2) will need, beside what "easy" does:
  - Debian's miniupnpd-nftables (2.3.1; not the iptables build), started in the router's
    namespace in the foreground (-d) with its own config file and its own pid file (-P, under
    the lab's temporary directory: two upnp routers must not share /run/miniupnpd.pid);
  - the nftables chains it expects, loaded by us (its helper scripts are broken in that
    release): table inet filter with chain miniupnpd (jumped to from forward), and table ip
    nat with chains prerouting_miniupnpd and postrouting_miniupnpd (jumped to from
    prerouting / postrouting), next to our MASQUERADE and WAN firewall, which then must be
    expressed in nft (or iptables-nft rules that coexist with those tables);
  - config: ext_ifname=wan0, listening_ip=lan0, enable_upnp=yes, enable_natpmp=yes,
    secure_mode=yes, an allow rule for the LAN, a fixed uuid, and ext_perform_stun=yes with
    ext_stun_host/ext_stun_port pointing at a STUN responder in the lab: miniupnpd treats
    documentation/private WAN addresses as reserved and refuses to forward unless STUN tells
    it its public address, and its check (RFC 5780) needs a responder with two addresses
    (CHANGE-REQUEST / OTHER-ADDRESS): a stdlib STUN server in a public host with two IPs;
  - SSDP (239.255.255.250:1900) from the LAN hosts: the 224.0.0.0/4 on-link route the lab
    already adds; NAT-PMP (gateway:5351): libnatpmp finds the gateway from the default route,
    so that router's LAN hosts need a default route via the router (the router itself still
    has none, so nothing gets further than the router);
  - libminiupnpc 2.2.4 (API 17) reports such a gateway as "not connected" (digfs must accept
    it); teardown checks the mappings are gone (upnpc -l / miniupnpd's rules in nft).
"""

import argparse
import atexit
import errno
import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref

PREFIX = "digfslab-"
NETNS_DIR = "/run/netns"
LAB_NETS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
MULTICAST = "224.0.0.0/4"
NAT_KINDS = ("easy", "hard")          # "upnp" to come (see the module docstring)
HERE = os.path.abspath(__file__)
_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}\Z")
_NS_RE = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)-([0-9a-f]+)-([a-z][a-z0-9-]*)\Z")


class LabError(RuntimeError):
    """Building or using the lab failed."""


# --------------------------------------------------------------------------- environment

def _proc_starttime(pid):
    """Start time (clock ticks since boot) of @pid, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    return int(st[st.rindex(")") + 2:].split()[19])


def _owner_alive(pid, start):
    return _proc_starttime(pid) == start


def unusable_reason():
    """None when the lab can run here; otherwise why not (for a test's skip message)."""
    if os.geteuid() != 0:
        return "the network lab needs root"
    for tool in ("ip", "nsenter", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install iproute2 util-linux iptables)"
    me = os.getpid()
    name = f"{PREFIX}{me}.{_proc_starttime(me)}-{random.getrandbits(32):08x}-probe"
    r = subprocess.run(["ip", "netns", "add", name], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    try:
        r = subprocess.run(["nsenter", f"--net={NETNS_DIR}/{name}", "iptables", "-w", "-t",
                            "nat", "-L", "-n"], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            return f"iptables does not work in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    return None


def ensure_tools():
    """Installs iptables with apt-get when it is missing (needs root and the package
    registry: call it before entering an isolated namespace). Returns True if present."""
    if shutil.which("iptables"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "iptables"],
                       stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=600)
    return shutil.which("iptables") is not None


def _sh(argv, what=None, input=None, timeout=60):
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if r.returncode != 0:
        raise LabError(f"{what or ' '.join(argv)} failed ({r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def _ip_batch(ns, lines):
    """Runs iproute2 commands (one per line, without the leading "ip") in namespace @ns."""
    if lines:
        _sh(["ip", "-n", ns, "-batch", "-"], f"ip -n {ns} -batch", input="\n".join(lines) + "\n")


def lab_namespaces():
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _ns_inode(name):
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except OSError:
        return None


def pids_in_namespaces(names):
    """pids of the processes whose network namespace is one of @names."""
    inodes = {i for i in (_ns_inode(n) for n in names) if i is not None}
    out = []
    if not inodes:
        return out
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                out.append(int(d))
        except OSError:
            continue
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _kill_pids(pids, grace=3.0):
    """SIGTERM, then SIGKILL after @grace seconds, to each of @pids (only these)."""
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def remove_namespaces(names, grace=3.0):
    """Stops every process inside the namespaces @names (by pid), then deletes them. Returns
    the names that could not be removed."""
    names = [n for n in names if os.path.exists(os.path.join(NETNS_DIR, n))]
    _kill_pids(pids_in_namespaces(names), grace)
    left = []
    for n in names:
        r = subprocess.run(["ip", "netns", "del", n], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, n)):
            left.append(n)
    return left


def cleanup_leftovers(everything=False, prefix=None, out=None):
    """Removes lab namespaces whose owning process is gone (with @everything: all lab
    namespaces; with @prefix: those starting with it). Returns the names removed."""
    victims = []
    for n in lab_namespaces():
        if prefix is not None:
            if n.startswith(prefix):
                victims.append(n)
            continue
        m = _NS_RE.match(n)
        if everything or (m is not None and not _owner_alive(int(m.group(1)), int(m.group(2)))):
            victims.append(n)
    # hosts before routers before inet does not matter for correctness; do inet last anyway
    victims.sort(key=lambda n: n.endswith("-inet"))
    left = remove_namespaces(victims)
    if out is not None:
        for n in victims:
            out.write(f"{'NOT removed' if n in left else 'removed'} {n}\n")
    return [n for n in victims if n not in left]


# --------------------------------------------------------------------------- hosts

class Host:
    """A namespace of the lab. kind: "public", "lan" (behind a router), "router", "inet"."""

    def __init__(self, lab, name, kind, addr=None, router=None):
        self.lab = lab
        self.name = name
        self.kind = kind
        self.ns = lab.prefix + name
        self.addr = addr            # its own IPv4 address (LAN address for "lan")
        self.router = router        # the Router in front of a "lan" host

    @property
    def path(self):
        return os.path.join(NETNS_DIR, self.ns)

    @property
    def public_addr(self):
        """The address the internet sees this host at (its router's WAN address)."""
        return self.router.addr if self.router is not None else self.addr

    def __repr__(self):
        extra = f" behind {self.router.name}" if self.router is not None else ""
        return f"<{self.kind} {self.name} {self.addr}{extra}>"


class Router(Host):
    def __init__(self, lab, name, nat, wan, lan):
        super().__init__(lab, name, "router", wan)
        self.nat = nat              # "easy" | "hard"
        self.lan = lan              # ipaddress.IPv4Network
        self.gateway = str(lan.network_address + 1)
        self.hosts = []
        self._next = 2


# --------------------------------------------------------------------------- the lab

_labs = weakref.WeakSet()
_handlers_installed = False


def _teardown_all():
    for lab in list(_labs):
        lab.close()


def _on_fatal_signal(signum, frame):
    _teardown_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers():
    """atexit always; SIGTERM/SIGHUP handlers only where nobody installed one (a test runner
    that handles them, like digfs_test.main, unwinds through Lab.__exit__ instead)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) in (signal.SIG_DFL, None):
                signal.signal(s, _on_fatal_signal)


class Lab:
    """The network lab. Use as a context manager (or call close())."""

    def __init__(self, reaper=True, clean_stale=True):
        err = unusable_reason()
        if err:
            raise LabError(err)
        if clean_stale:
            cleanup_leftovers()
        me = os.getpid()
        self.prefix = f"{PREFIX}{me}.{_proc_starttime(me)}-{random.getrandbits(32):08x}-"
        self.hosts = {}
        self.procs = []
        self.closed = False
        self._lock = threading.RLock()
        self._public_next = {str(n): 10 for n in LAB_NETS}
        self._lan_next = 1
        self._veth = 0
        self._reaper = None
        _labs.add(self)
        _install_handlers()
        try:
            if reaper:
                self._start_reaper()
            self.inet = self._namespace("inet", "inet")
            # the internet carries no multicast: no snooping, no flooding to any port
            _ip_batch(self.inet.ns, ["link add inet0 type bridge mcast_snooping 0",
                                     "link set inet0 up"])
        except BaseException:
            self.close()
            raise

    # ---- building
    def _start_reaper(self):
        """A process in its own session that removes this lab's namespaces when our end of
        its stdin pipe closes: at close(), or when this process dies in any way."""
        self._reaper = subprocess.Popen(
            [sys.executable, HERE, "--reap", self.prefix], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True)

    def _namespace(self, name, kind, addr=None, router=None, cls=Host, **kw):
        if not _NAME.match(name) or name == "inet" and kind != "inet":
            raise LabError(f"bad host name {name!r} (a-z, 0-9, '-', at most 20, not 'inet')")
        with self._lock:
            if name in self.hosts:
                raise LabError(f"host {name!r} exists already")
            h = cls(self, name, **kw) if cls is not Host else Host(self, name, kind, addr, router)
            self.hosts[name] = h
        _sh(["ip", "netns", "add", h.ns])
        # IPv6 off before any interface exists; routers forward IPv4.
        sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if h.kind == "router":
            sysctls.append("net.ipv4.ip_forward=1")
        _sh(["nsenter", f"--net={h.path}", "sysctl", "-q", "-w", *sysctls])
        _ip_batch(h.ns, ["link set lo up"])
        return h

    def _veth_name(self, tag):
        self._veth += 1
        return f"{tag}{self._veth}"

    def _plug_into_inet(self, h, ifname, addr):
        """A veth from @h (interface @ifname with @addr/24) into the internet bridge."""
        port = self._veth_name("v")
        _ip_batch(self.inet.ns, [f"link add {port} type veth peer name {ifname} netns {h.ns}",
                                 f"link set {port} master inet0",
                                 f"link set {port} type bridge_slave mcast_flood off",
                                 f"link set {port} up"])
        net = self._net_of(addr)
        lines = [f"addr add {addr}/{net.prefixlen} dev {ifname}", f"link set {ifname} up"]
        lines += [f"route add {n} dev {ifname}" for n in LAB_NETS if n != net]
        _ip_batch(h.ns, lines)

    def _net_of(self, addr):
        a = ipaddress.ip_address(addr)
        for n in LAB_NETS:
            if a in n:
                return n
        raise LabError(f"{addr} is not in the lab's public ranges "
                       f"({', '.join(map(str, LAB_NETS))})")

    def _public_ip(self, ip, default_net):
        if ip is None:
            key = str(default_net)
            with self._lock:
                n = self._public_next[key]
                self._public_next[key] += 1
            if n > 250:
                raise LabError(f"no free address left in {key}")
            ip = str(default_net.network_address + n)
        self._net_of(ip)
        if any(h.addr == ip for h in self.hosts.values() if h.kind in ("public", "router")):
            raise LabError(f"address {ip} is taken")
        return ip

    def public(self, name, ip=None):
        """A host on the internet directly (default: the next free 198.51.100.x)."""
        ip = self._public_ip(ip, LAB_NETS[0])
        h = self._namespace(name, "public", ip)
        try:
            self._plug_into_inet(h, "eth0", ip)
            _ip_batch(h.ns, [f"route add {MULTICAST} dev eth0"])
        except BaseException:
            self._drop(h)
            raise
        return h

    def router(self, name, kind="easy", wan_ip=None, lan=None):
        """A NAT router: WAN side wan0 on the internet (default: the next free 203.0.113.x),
        LAN bridge lan0 (default 10.<n>.0.0/24, gateway .1). kind "easy": MASQUERADE
        (port-preserving, endpoint-independent mapping); "hard": MASQUERADE --random-fully
        (a new external port for every destination). Both drop unsolicited traffic from the
        WAN (address-and-port-dependent filtering)."""
        if kind not in NAT_KINDS:
            raise LabError(f"router kind {kind!r}: one of {NAT_KINDS} (upnp: not yet)")
        wan_ip = self._public_ip(wan_ip, LAB_NETS[1])
        if lan is None:
            with self._lock:
                lan = f"10.{self._lan_next}.0.0/24"
                self._lan_next += 1
        lan = ipaddress.ip_network(lan)
        if not lan.is_private or any(lan.overlaps(n) for n in LAB_NETS) or lan.prefixlen > 29:
            raise LabError(f"LAN {lan}: must be a private range (10/8, 172.16/12, 192.168/16)")
        r = self._namespace(name, "router", cls=Router, nat=kind, wan=wan_ip, lan=lan)
        try:
            self._plug_into_inet(r, "wan0", wan_ip)
            _ip_batch(r.ns, ["link add lan0 type bridge",
                             f"addr add {r.gateway}/{lan.prefixlen} dev lan0",
                             "link set lan0 up"])
            masq = ["-j", "MASQUERADE"] + (["--random-fully"] if kind == "hard" else [])
            ipt = ["nsenter", f"--net={r.path}", "iptables", "-w"]
            _sh(ipt + ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0", *masq])
            _sh(ipt + ["-A", "FORWARD", "-i", "wan0", "-m", "conntrack", "--ctstate",
                       "ESTABLISHED,RELATED", "-j", "ACCEPT"])
            _sh(ipt + ["-A", "FORWARD", "-i", "wan0", "-j", "DROP"])
        except BaseException:
            self._drop(r)
            raise
        return r

    def behind(self, router, name, ip=None):
        """A host on @router's LAN (default: the next free address of the LAN)."""
        r = self._get(router)
        if not isinstance(r, Router):
            raise LabError(f"{r.name} is not a router")
        if ip is None:
            with self._lock:
                ip = str(r.lan.network_address + r._next)
                r._next += 1
        if ipaddress.ip_address(ip) not in r.lan:
            raise LabError(f"{ip} is not in {r.name}'s LAN {r.lan}")
        h = self._namespace(name, "lan", ip, r)
        try:
            port = self._veth_name("l")
            _ip_batch(r.ns, [f"link add {port} type veth peer name eth0 netns {h.ns}",
                             f"link set {port} master lan0",
                             f"link set {port} up"])
            _ip_batch(h.ns, [f"addr add {ip}/{r.lan.prefixlen} dev eth0",
                             "link set eth0 up",
                             *[f"route add {n} via {r.gateway}" for n in LAB_NETS],
                             f"route add {MULTICAST} dev eth0"])
        except BaseException:
            self._drop(h)
            raise
        r.hosts.append(h)
        return h

    def nat_host(self, name, kind="easy", lan=None):
        """A router "<name>-r" of @kind with one host @name behind it. Returns the host."""
        r = self.router(f"{name}-r", kind=kind, lan=lan)
        return self.behind(r, name)

    def _drop(self, h):
        with self._lock:
            self.hosts.pop(h.name, None)
        remove_namespaces([h.ns])

    # ---- using
    def _get(self, host):
        if isinstance(host, Host):
            if host.lab is not self:
                raise LabError(f"{host!r} belongs to another lab")
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise LabError(f"no host {host!r} in the lab") from None

    def __getitem__(self, name):
        return self._get(name)

    def addr(self, host):
        """The host's own IPv4 address (for a host behind a NAT: its LAN address)."""
        return self._get(host).addr

    def public_addr(self, host):
        """The address the internet sees @host at."""
        return self._get(host).public_addr

    def netns_path(self, host):
        return self._get(host).path

    def cmd(self, host, argv, private_mounts=False):
        """@argv wrapped to run in @host's network namespace."""
        h = self._get(host)
        if self.closed:
            raise LabError("the lab is closed")
        if private_mounts:
            return ["ip", "netns", "exec", h.ns, *argv]
        return ["nsenter", f"--net={h.path}", "--", *argv]

    def run(self, host, argv, private_mounts=False, **kw):
        """subprocess.run of @argv in @host's namespace (default: text output captured,
        stdin from /dev/null, 60 s timeout)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(host, argv, private_mounts), **kw)

    def popen(self, host, argv, private_mounts=False, **kw):
        """subprocess.Popen of @argv in @host's namespace; stopped (by pid) at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.cmd(host, argv, private_mounts), **kw)
        with self._lock:
            self.procs.append(p)
        return p

    # ---- small tools run inside hosts (this file's `tool` subcommands)
    def tool(self, host, *args, timeout=60):
        """Runs `netlab.py tool ARGS` in @host; returns its JSON answer."""
        r = self.run(host, [sys.executable, HERE, "tool", *map(str, args)], timeout=timeout)
        if r.returncode != 0:
            raise LabError(f"tool {' '.join(map(str, args))} in {self._get(host).name} "
                           f"exited {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def start_tool(self, host, *args, timeout=30):
        """Starts a long-running tool (udp-echo, tcp-echo, udp-listen) in @host and waits
        until it says it is ready. Returns the Popen (its stdout carries the tool's answer)."""
        p = self.popen(host, [sys.executable, HERE, "tool", *map(str, args)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if ready else ""
        if line.strip() != "ready":
            p.kill()
            err = p.stderr.read() if p.poll() is not None else ""
            raise LabError(f"tool {' '.join(map(str, args))} in {self._get(host).name} did not "
                           f"start: {line!r} {err.strip()}")
        return p

    def ping(self, src, dst_ip, count=1, timeout=2.0):
        """ICMP echo from @src to @dst_ip; True if a reply came (raw socket, no ping needed)."""
        return self.tool(src, "ping", dst_ip, count, timeout)["ok"]

    # ---- teardown
    def namespaces(self):
        return [h.ns for h in self.hosts.values()]

    def close(self):
        """Idempotent teardown: stops what the lab started, every process left inside its
        namespaces, deletes the namespaces."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            own = [p.pid for p in self.procs if p.poll() is None]
            _kill_pids(own)
            for p in self.procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                for f in (p.stdout, p.stderr):
                    if f is not None:
                        try:
                            f.close()
                        except OSError:
                            pass
            names = [n for n in lab_namespaces() if n.startswith(self.prefix)]
            names.sort(key=lambda n: n == self.prefix + "inet")
            left = remove_namespaces(names)
            if left:
                sys.stderr.write(f"netlab: could not remove {left}\n")
        finally:
            if self._reaper is not None:
                try:
                    self._reaper.stdin.close()
                    self._reaper.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            _labs.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def describe(self):
        lines = [f"lab {self.prefix}*: internet = bridge inet0 in {self.inet.ns}"]
        for h in self.hosts.values():
            if h.kind == "public":
                lines.append(f"  public {h.name:10} {h.addr}")
            elif h.kind == "router":
                lines.append(f"  router {h.name:10} {h.addr} ({h.nat} NAT) LAN {h.lan}")
                for c in h.hosts:
                    lines.append(f"    host {c.name:10} {c.addr}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- tools

def _ready():
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _tool_udp_echo(port):
    """Answers every datagram with "ip port" of its sender (what a STUN server tells)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    _ready()
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(f"{addr[0]} {addr[1]}".encode(), addr)


def _tool_udp_probe(local_port, timeout, *targets):
    """From one socket (bound to @local_port, 0: any), asks each ip:port target what it sees."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(local_port)))
    seen = {}
    for t in targets:
        ip, port = t.rsplit(":", 1)
        seen[t] = None
        end = time.monotonic() + float(timeout)
        while time.monotonic() < end and seen[t] is None:
            s.sendto(b"probe", (ip, int(port)))
            s.settimeout(0.2)
            try:
                data, addr = s.recvfrom(2048)
            except socket.timeout:
                continue
            if addr == (ip, int(port)):
                a, p = data.decode().split()
                seen[t] = [a, int(p)]
    print(json.dumps({"local": s.getsockname()[1], "seen": seen}))


def _tool_udp_send(local_port, target, count):
    """Sends @count datagrams "hello" from @local_port to @target (ip:port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(local_port)))
    ip, port = target.rsplit(":", 1)
    for _ in range(int(count)):
        s.sendto(b"hello", (ip, int(port)))
        time.sleep(0.02)
    print(json.dumps({"local": s.getsockname()[1]}))


def _tool_udp_listen(port, seconds, reply_first=""):
    """Collects what arrives on UDP @port for @seconds; with reply_first=ip:port, first
    sends one datagram there from the same socket (to open a NAT mapping). Prints JSON."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    if reply_first:
        ip, p = reply_first.rsplit(":", 1)
        s.sendto(b"open", (ip, int(p)))
    _ready()
    got = []
    end = time.monotonic() + float(seconds)
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        got.append([addr[0], addr[1], data.decode(errors="replace")])
    print(json.dumps({"got": got}))


def _tool_mcast_listen(group, port, seconds):
    """Joins multicast @group on eth0 and collects what arrives on @port for @seconds."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", int(port)))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    _ready()
    got = []
    end = time.monotonic() + float(seconds)
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        got.append([addr[0], addr[1], data.decode(errors="replace")])
    print(json.dumps({"got": got}))


def _tool_tcp_echo(port):
    """Accepts TCP connections; tells each peer "ip port" as it sees it, then closes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    _ready()
    while True:
        c, addr = s.accept()
        try:
            c.sendall(f"{addr[0]} {addr[1]}\n".encode())
        finally:
            c.close()


def _tool_tcp_connect(ip, port, timeout, local_port=0):
    """Connects to ip:port; prints {"ok", "seen" (what the server says), "error"}."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(local_port)))
    s.settimeout(float(timeout))
    out = {"ok": False, "seen": None, "error": None, "local": s.getsockname()[1]}
    try:
        s.connect((ip, int(port)))
        out["local"] = s.getsockname()[1]
        data = b""
        while not data.endswith(b"\n"):
            b = s.recv(256)
            if not b:
                break
            data += b
        out["ok"] = True
        if data:
            a, p = data.decode().split()
            out["seen"] = [a, int(p)]
    except socket.timeout:
        out["error"] = "timeout"
    except OSError as e:
        out["error"] = errno.errorcode.get(e.errno, str(e))
    print(json.dumps(out))


def _checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _tool_ping(ip, count, timeout):
    """ICMP echo over a raw socket; {"ok": a reply came, "replies": n}."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    replies = 0
    for seq in range(1, int(count) + 1):
        payload = b"digfs-netlab"
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload
        try:
            s.sendto(pkt, (ip, 0))
        except OSError as e:
            print(json.dumps({"ok": False, "replies": 0,
                              "error": errno.errorcode.get(e.errno, str(e))}))
            return
        end = time.monotonic() + float(timeout)
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = s.recvfrom(2048)
            except socket.timeout:
                break
            ihl = (data[0] & 0x0F) * 4
            t, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if t == 0 and rid == ident and rseq == seq and addr[0] == ip:
                replies += 1
                break
    print(json.dumps({"ok": replies > 0, "replies": replies}))


TOOLS = {"udp-echo": _tool_udp_echo, "udp-probe": _tool_udp_probe, "udp-send": _tool_udp_send,
         "udp-listen": _tool_udp_listen, "mcast-listen": _tool_mcast_listen,
         "tcp-echo": _tool_tcp_echo,
         "tcp-connect": _tool_tcp_connect, "ping": _tool_ping}


# --------------------------------------------------------------------------- command line

def _reap(prefix):
    """The reaper: waits for EOF on stdin (the lab closed or its owner died), then removes
    whatever is left of the lab @prefix."""
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    cleanup_leftovers(prefix=prefix)


def _demo():
    with Lab() as lab:
        p1 = lab.public("p1")
        p2 = lab.public("p2", ip="203.0.113.200")
        e = lab.nat_host("easy", kind="easy")
        h = lab.nat_host("hard", kind="hard")
        r = lab.router("home", kind="easy", lan="192.168.1.0/24")
        a = lab.behind(r, "home-a")
        b = lab.behind(r, "home-b")
        print(lab.describe())
        lab.start_tool(p1, "udp-echo", 3478)
        lab.start_tool(p2, "udp-echo", 3478)
        for x in (p2, e, h, a, b):
            got = lab.tool(x, "udp-probe", 40000, 2, f"{p1.addr}:3478", f"{p2.addr}:3478")
            if x is p2:
                got["seen"].pop(f"{p2.addr}:3478")
            print(f"{x.name:7} {x.addr}:40000 is seen as {got['seen']}")
        print(f"ping p1 -> p2: {lab.ping(p1, p2.addr)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="digfs network lab (see the module docstring)")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove lab namespaces left by processes that are gone")
    ap.add_argument("--all", action="store_true",
                    help="with --cleanup: remove every lab namespace, also of running labs")
    ap.add_argument("--check", action="store_true", help="say whether the lab can run here")
    ap.add_argument("--install", action="store_true",
                    help="install iptables with apt-get if it is missing (needs the network)")
    ap.add_argument("--demo", action="store_true", help="build a sample lab, probe it, remove it")
    ap.add_argument("--reap", metavar="PREFIX", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "tool":
        if len(argv) < 2 or argv[1] not in TOOLS:
            sys.exit(f"tools: {', '.join(TOOLS)}")
        TOOLS[argv[1]](*argv[2:])
        return 0
    a = ap.parse_args(argv)
    if a.reap:
        _reap(a.reap)
    elif a.cleanup:
        removed = cleanup_leftovers(everything=a.all, out=sys.stdout)
        print(f"{len(removed)} namespace(s) removed")
    elif a.install:
        ok = ensure_tools()
        print("iptables present" if ok else "iptables missing and could not be installed")
        return 0 if ok else 1
    elif a.check:
        why = unusable_reason()
        print(why or "the lab can run here")
        return 1 if why else 0
    elif a.demo:
        _demo()
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
