#!/usr/bin/env python3
"""The digfs network lab: a small internet made of Linux network namespaces (Python 3.11
stdlib only; needs root, iproute2, util-linux's nsenter and iptables; a UPnP router also needs
nftables and miniupnpd-nftables, the conntrack knobs the conntrack tool). README.md beside
this file describes it; UPNP.md the UPnP / NAT-PMP router and the traps it works around.

    with Lab() as lab:
        p1 = lab.public("p1")                   # 198.51.100.10, on the internet directly
        r1 = lab.router("r1", kind="easy")      # MASQUERADE (port-preserving)
        n1 = lab.behind(r1, "n1")               # 10.1.0.2 behind r1
        n2 = lab.behind(r1, "n2")               # a second host behind the same NAT
        h = lab.nat_host("h", kind="hard")      # router "h-r" (--random-fully) + host "h"
        u = lab.router("home", kind="upnp")     # miniupnpd (UPnP IGD + NAT-PMP); the lab
        a = lab.behind(u, "a")                  #   starts a STUN responder "stun" for it
        lab.run(n1, ["ip", "route"])            # a command in n1's network namespace
        proc = lab.popen(p1, [...])             # started there, stopped at teardown
        lab.netem(p1, loss=30, delay_ms=50)     # impair p1's link, both directions
        lab.conntrack_timeouts(r1, udp=5)       # r1's NAT forgets idle UDP flows sooner
        lab.flush_conntrack(r1)                 # ... or all of them at once
        lab.conntrack_entries(r1)               # [CtEntry(proto, orig_src, orig_dst, ...)]

Topology: one namespace "inet" holds a bridge, the internet; no addresses, no routes. Every
public host and every router's WAN side is a veth into that bridge with an address in
198.51.100.0/24 or 203.0.113.0/24 (both prefixes are on-link on the one bridge). A router
namespace also holds a LAN bridge (its gateway address, e.g. 10.1.0.1/24), its hosts are
veths into it; it forwards with MASQUERADE on its WAN side and a stateful firewall that drops
everything from the WAN that is not a reply (RFC 4787: endpoint-independent mapping for
"easy" and "upnp", a new mapping per destination for "hard" (--random-fully); filtering is
address-and-port-dependent for all, as Linux conntrack does it), except, on a "upnp" router,
the ports miniupnpd maps. No hairpinning: two hosts behind one NAT do not reach each other
through its public address.

Safety: no interface of the lab is in the calling namespace or any other namespace outside
the lab (every veth is created with both ends inside lab namespaces), and no lab namespace
has a route out of the lab: routes exist only for 198.51.100.0/24, 203.0.113.0/24, a router's
own LAN, and 224.0.0.0/4 on-link (multicast stays on its segment: no namespace routes
multicast, and the internet bridge floods multicast to no port, so only a router's LAN carries
it, as BEP 14 LAN discovery and SSDP expect). The one default route is that of a host behind
a "upnp" router (libnatpmp finds the gateway from it); it ends at that router, which has none.
IPv6 is turned off in every lab namespace.

Names: every namespace is "digfslab-<pid>.<starttime>-<random>-<host>" (the owning process's
pid and start time, so leftovers of a dead owner are recognised); the lab's work directory
(miniupnpd's and the STUN responder's files) is <tmp>/digfslab-<pid>.<starttime>-<random>-*.
Teardown (close(), the context manager, atexit, SIGTERM/SIGHUP when nobody else handles them)
stops processes the lab started, then every process still inside a lab namespace (found by
its /proc/PID/ns/net), by pid, deletes the namespaces, which destroys their veths, bridges and
firewall tables, and removes the work directory. A reaper process (in its own session) does
the same if the owner dies without tearing down (SIGKILL, os._exit). `python3 netlab.py
--cleanup` removes leftovers of dead owners (`--all`: of every lab).

Commands run through `nsenter --net=/run/netns/NAME`, which changes only the network
namespace: a FUSE mount made inside is visible to the rest of the test (`ip netns exec`
would give the command a private mount namespace; pass private_mounts=True for that).
"""

import argparse
import atexit
import collections
import contextlib
import errno
import heapq
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
import tempfile
import threading
import time
import weakref

PREFIX = "digfslab-"
NETNS_DIR = "/run/netns"
LAB_NETS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
MULTICAST = "224.0.0.0/4"
NAT_KINDS = ("easy", "hard", "upnp")
HERE = os.path.abspath(__file__)
STUN_SERVER = os.path.join(os.path.dirname(HERE), "stun_server.py")
MINIUPNPD = "/usr/sbin/miniupnpd"
STUN_IPS = ("203.0.113.253", "203.0.113.254")   # the STUN responder's two addresses
STUN_PORTS = (3478, 3479)
NETEM_LIMIT = 10000                              # packets a netem queue holds (tc: "limit")
_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}\Z")
_NS_RE = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)-([0-9a-f]+)-([a-z][a-z0-9-]*)\Z")
_WORKDIR_RE = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)-([0-9a-f]+)-[a-z0-9_]+\Z")

# Debian packages per feature, each with the program that shows it is installed. "upnp"
# installs miniupnpd-nftables, never "miniupnpd" (see ensure_packages).
PACKAGES = {
    "base": {"iproute2": "ip", "util-linux": "nsenter", "iptables": "iptables"},
    "upnp": {"nftables": "nft", "miniupnpd-nftables": MINIUPNPD, "miniupnpc": "upnpc",
             "natpmpc": "natpmpc"},
    "conntrack": {"conntrack": "conntrack"},
}


class LabError(RuntimeError):
    """Building or using the lab failed."""


# --------------------------------------------------------------------------- environment

def _proc_stat(pid):
    """The fields of /proc/@pid/stat after the command name (state first), or None if the
    process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    return st[st.rindex(")") + 2:].split()


def _proc_starttime(pid):
    """Start time (clock ticks since boot) of @pid, or None if it does not exist."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _owner_alive(pid, start):
    return _proc_starttime(pid) == start


def _which(tool):
    return tool if os.path.isabs(tool) and os.access(tool, os.X_OK) else shutil.which(tool)


def _features(features):
    features = ("base", *features)
    for f in features:
        if f not in PACKAGES:
            raise ValueError(f"unknown lab feature {f!r} (one of {', '.join(PACKAGES)})")
    return features


def missing_packages(*features):
    """{package: program} of the Debian packages that @features ("upnp", "conntrack"; the base
    lab always) need and that are not installed (judged by their program)."""
    return {pkg: tool for f in _features(features) for pkg, tool in PACKAGES[f].items()
            if not _which(tool)}


def miniupnpd_outside_lab():
    """pids of miniupnpd processes running in the machine's network namespace (pid 1's) or
    in ours: never ours to stop, but a sign that a package install started the service."""
    host = set()
    for p in ("/proc/1/ns/net", "/proc/self/ns/net"):
        try:
            host.add(os.stat(p).st_ino)
        except OSError:
            pass
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() != "miniupnpd":
                    continue
            if os.stat(f"/proc/{d}/ns/net").st_ino in host:
                out.append(int(d))
        except OSError:
            continue
    return out


def ensure_packages(*features, log=None):
    """Installs with apt-get the Debian packages that @features need and that are missing
    (needs root and the package registry: call it before entering an isolated namespace; a
    no-op when everything is there; never with DIGFS_SKIP_INSTALL=1). Returns None on success,
    else the reason.

    For "upnp" only miniupnpd-nftables is installed, never the "miniupnpd" package: that one
    carries the init script / systemd unit, a debconf dialogue and /etc/miniupnpd/
    miniupnpd.conf, and would start a daemon on the host; miniupnpd-nftables ships only the
    binary and the (broken) helper scripts. While apt-get runs, a policy-rc.d that forbids
    starting services is put in place when none exists (removed afterwards), and a miniupnpd
    found running outside the lab afterwards is reported (not stopped: it is not ours)."""
    missing = missing_packages(*features)
    if not missing:
        return None
    names = " ".join(missing)
    if os.environ.get("DIGFS_SKIP_INSTALL") == "1":
        return f"not installed: {names} (and DIGFS_SKIP_INSTALL=1)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"not installed: {names} (apt-get install {names})"
    policy = "/usr/sbin/policy-rc.d"
    made_policy = False
    if not os.path.exists(policy):
        try:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\n# written by digfs tests/netlab/netlab.py during "
                        "apt-get install; removed afterwards\nexit 101\n")
            os.chmod(policy, 0o755)
            made_policy = True
        except OSError:
            pass
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0 and "Unable to locate" in (r.stderr + r.stdout):
            subprocess.run(["apt-get", "update", "-q"], stdin=subprocess.DEVNULL, env=env,
                           capture_output=True, timeout=300)
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, capture_output=True,
                               text=True, timeout=300)
        if log:
            log(f"apt-get install {names}: exit {r.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install {names} failed: {e}"
    finally:
        if made_policy:
            try:
                os.unlink(policy)
            except OSError:
                pass
    stray = miniupnpd_outside_lab()
    if stray:
        sys.stderr.write(f"netlab: WARNING: miniupnpd running outside the lab: pids {stray}\n")
    missing = missing_packages(*features)
    if missing:
        return f"still not installed after apt-get: {' '.join(missing)}"
    return None


@contextlib.contextmanager
def _probe_namespace():
    """A throw-away lab namespace (named like a lab's, so --cleanup knows it); yields its
    path, or raises LabError when `ip netns add` fails."""
    me = os.getpid()
    name = f"{PREFIX}{me}.{_proc_starttime(me)}-{random.getrandbits(32):08x}-probe"
    r = subprocess.run(["ip", "netns", "add", name], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LabError(f"`ip netns add` does not work here: {r.stderr.strip()}")
    try:
        yield os.path.join(NETNS_DIR, name)
    finally:
        subprocess.run(["ip", "netns", "del", name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)


def _in_ns(path, argv, input=None):
    return subprocess.run(["nsenter", f"--net={path}", "--", *argv], input=input,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


def unusable_reason(*features):
    """None when the lab (with @features: "upnp", "conntrack") can run here; otherwise why
    not (for a test's skip message). Installs nothing: see ensure_packages."""
    if os.geteuid() != 0:
        return "the network lab needs root"
    missing = missing_packages(*features)
    if missing:
        names = " ".join(missing)
        return f"not installed: {names} (apt-get install {names})"
    try:
        with _probe_namespace() as ns:
            r = _in_ns(ns, ["iptables", "-w", "-t", "nat", "-L", "-n"])
            if r.returncode != 0:
                return f"iptables does not work in a network namespace: {r.stderr.strip()}"
            if "upnp" in features:
                r = _in_ns(ns, ["nft", "list", "ruleset"])
                if r.returncode != 0:
                    return f"nft does not work in a network namespace: {r.stderr.strip()}"
    except LabError as e:
        return str(e)
    return None


def upnp_unusable_reason():
    """unusable_reason("upnp"): None when upnp routers can run here, else why not."""
    return unusable_reason("upnp")


_netem = {}


def netem_backend():
    """How Lab.netem impairs a link here: "tc" (the sch_netem qdisc) when the kernel has it,
    else "nfqueue" (this file's `nfq-netem` tool: packets go through NFQUEUE to a userspace
    process that drops and delays them), else None (netem_unusable_reason() says why).
    DIGFS_NETLAB_NETEM=tc|nfqueue forces one. Probed once per process."""
    if "backend" in _netem:
        return _netem["backend"]
    forced = os.environ.get("DIGFS_NETLAB_NETEM")
    why = []
    try:
        with _probe_namespace() as ns:
            if forced in (None, "", "tc"):
                probe = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
                r = _in_ns(ns, probe)
                if r.returncode != 0 and shutil.which("modprobe"):
                    subprocess.run(["modprobe", "-q", "sch_netem"], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=30)
                    r = _in_ns(ns, probe)
                if r.returncode == 0:
                    _netem["backend"] = "tc"
                    return "tc"
                why.append(f"tc netem: {(r.stderr or r.stdout).strip()} (kernel without "
                           f"sch_netem: CONFIG_NET_SCH_NETEM)")
            if forced in (None, "", "nfqueue"):
                r = _in_ns(ns, ["iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", "-o",
                                "lo", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"])
                if r.returncode == 0:
                    _netem["backend"] = "nfqueue"
                    return "nfqueue"
                why.append(f"iptables NFQUEUE: {(r.stderr or r.stdout).strip()}")
    except LabError as e:
        why.append(str(e))
    _netem["backend"] = None
    _netem["why"] = "; ".join(why) or f"DIGFS_NETLAB_NETEM={forced}: unknown backend"
    return None


def netem_unusable_reason():
    """None when Lab.netem works here, else why not."""
    return None if netem_backend() else _netem["why"]


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
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


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
    """Stops every process inside the namespaces @names (by pid), then deletes them ("inet"
    last). Returns the names that could not be removed."""
    names = [n for n in names if os.path.exists(os.path.join(NETNS_DIR, n))]
    _kill_pids(pids_in_namespaces(names), grace)
    left = []
    for n in sorted(names, key=lambda n: n.endswith("-inet")):
        r = subprocess.run(["ip", "netns", "del", n], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, n)):
            left.append(n)
    return left


def _lab_workdirs():
    tmp = tempfile.gettempdir()
    try:
        return sorted(os.path.join(tmp, d) for d in os.listdir(tmp) if d.startswith(PREFIX)
                      and _WORKDIR_RE.match(d) and os.path.isdir(os.path.join(tmp, d)))
    except OSError:
        return []


def cleanup_leftovers(everything=False, prefix=None, out=None):
    """Removes lab namespaces and work directories whose owning process is gone (with
    @everything: of all labs; with @prefix: those starting with it). Returns the namespace
    names removed."""
    def chosen(name):
        if prefix is not None:
            return name.startswith(prefix)
        m = _NS_RE.match(name) or _WORKDIR_RE.match(name)
        return everything or (m is not None and not _owner_alive(int(m.group(1)),
                                                                 int(m.group(2))))
    victims = [n for n in lab_namespaces() if chosen(n)]
    left = remove_namespaces(victims)
    dirs = [d for d in _lab_workdirs() if chosen(os.path.basename(d))]
    if os.environ.get("DIGFS_TEST_KEEP") != "1":
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    if out is not None:
        for n in victims:
            out.write(f"{'NOT removed' if n in left else 'removed'} {n}\n")
        for d in dirs:
            out.write(f"{'kept' if os.path.exists(d) else 'removed'} {d}\n")
    return [n for n in victims if n not in left]


# --------------------------------------------------------------------------- UPnP router

def upnp_nft_ruleset(lan_net, wan="wan0", lan="lan0"):
    """A "upnp" router's nftables ruleset. miniupnpd-nftables 2.3.1 adds its rules, by
    netlink, to chains that must already exist, with these compiled-in defaults (its config
    options upnp_table_name / upnp_nat_table_name / upnp_forward_chain / upnp_nat_chain /
    upnp_nat_postrouting_chain can rename them; 2.3.1 has no upnp_nftables_family_split):

        table inet filter   (family inet for the filter AND the nat chains)
            chain miniupnpd              accept rules for mapped ports  (from forward)
            chain prerouting_miniupnpd   dnat rules                     (from nat prerouting)
            chain postrouting_miniupnpd  snat rules ("peer" mappings)   (from nat postrouting)

    Debian ships /etc/miniupnpd/nft_init.sh to create them, but it sources
    miniupnpd_functions.sh, which the package does not ship: the scripts fail at once. So we
    load them ourselves, beside our own MASQUERADE and WAN firewall, all in that one table.
    The input chain accepts everything: miniupnpd's STUN check needs the answers that come
    from the STUN server's other address and port (new flows to conntrack), and its temporary
    accept rules go to the forward chain, which never sees packets for the router itself."""
    return f"""
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "{lan}" oifname "{wan}" ip saddr {lan_net} accept
        iifname "{wan}" oifname "{lan}" jump miniupnpd
        counter comment "dropped by the router"
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{wan}" jump prerouting_miniupnpd
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump postrouting_miniupnpd
        oifname "{wan}" ip saddr {lan_net} masquerade
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def miniupnpd_config(lan_net, stun_host, stun_port=STUN_PORTS[0], wan="wan0", lan="lan0",
                     uuid=None, http_port=0, lease_file=None, extra=()):
    """miniupnpd.conf for a "upnp" router. Without @lease_file a restarted miniupnpd has
    forgotten every mapping's lease time (see UPNP.md, trap 6)."""
    uuid = uuid or "3b1b4f8e-5d0c-4e5a-9a8e-%012x" % random.getrandbits(48)
    lines = [
        f"ext_ifname={wan}",
        f"listening_ip={lan}",
        f"http_port={http_port}",
        "enable_upnp=yes",
        "enable_natpmp=yes",
        "secure_mode=yes",
        "ipv6_disable=yes",
        "system_uptime=no",
        # the WAN address is in a documentation range, which miniupnpd calls "reserved":
        # without STUN it disables port forwarding altogether
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_host}",
        f"ext_stun_port={stun_port}",
        f"uuid={uuid}",
        "notify_interval=60",
        "clean_ruleset_interval=600",
        "min_lifetime=120",
        "max_lifetime=86400",
        f"allow 1024-65535 {lan_net} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    if lease_file:
        lines.append(f"lease_file={lease_file}")
    return "\n".join(lines + list(extra)) + "\n"


def _wait_log(path, pattern, proc, what, timeout, since=0):
    """Waits until the file @path (from offset @since) contains @pattern (a string or a
    compiled regex); returns its text. Fails early when @proc exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(since)
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            text = ""
        found = pattern in text if isinstance(pattern, str) else pattern.search(text)
        if found:
            return text
        if proc.poll() is not None:
            raise LabError(f"{what} exited with {proc.returncode}; its output:\n{text}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} not ready after {timeout} s; its output:\n{text}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- hosts

class Host:
    """A namespace of the lab. kind: "public", "lan" (behind a router), "router", "inet"."""

    def __init__(self, lab, name, kind, addr=None, router=None):
        self.lab = lab
        self.name = name
        self.kind = kind
        self.ns = lab.prefix + name
        self.addr = addr            # its own IPv4 address (LAN address for "lan")
        self.addrs = [addr] if addr else []   # all of them (a STUN host has two)
        self.router = router        # the Router in front of a "lan" host
        self.links = {}             # interface -> (Host, interface) at the veth's other end

    @property
    def path(self):
        return os.path.join(NETNS_DIR, self.ns)

    @property
    def public_addr(self):
        """The address the internet sees this host at (its router's WAN address)."""
        return self.router.addr if self.router is not None else self.addr

    @property
    def uplink(self):
        """The interface towards the internet: a router's wan0, every other host's eth0."""
        return {"router": "wan0", "inet": None}.get(self.kind, "eth0")

    def __repr__(self):
        extra = f" behind {self.router.name}" if self.router is not None else ""
        return f"<{self.kind} {self.name} {self.addr}{extra}>"


class Router(Host):
    """A NAT router (Lab.router). A "upnp" one runs miniupnpd: the methods below."""

    def __init__(self, lab, name, nat, wan, lan):
        super().__init__(lab, name, "router", wan)
        self.nat = nat              # "easy" | "hard" | "upnp"
        self.lan = lan              # ipaddress.IPv4Network
        self.gateway = str(lan.network_address + 1)
        self.hosts = []
        self._next = 2
        # "upnp" only: miniupnpd's files, in the lab's work directory
        self.workdir = os.path.join(lab.workdir, name)
        self.conf_path = os.path.join(self.workdir, "miniupnpd.conf")
        self.pid_path = os.path.join(self.workdir, "miniupnpd.pid")
        self.log_path = os.path.join(self.workdir, "miniupnpd.log")
        self.nft_path = os.path.join(self.workdir, "router.nft")
        self.lease_path = os.path.join(self.workdir, "miniupnpd.leases")
        self.lease_file = False
        self.miniupnpd = None       # its Popen while it runs
        self.stun = None            # the STUN host it asks

    def _upnp(self):
        if self.nat != "upnp":
            raise LabError(f"{self.name} is a {self.nat} router, not a upnp one")

    def _nft(self, *args, input=None):
        r = self.lab.run(self, ["nft", *args], input=input)
        if r.returncode != 0:
            raise LabError(f"{self.name}: nft {' '.join(args)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r.stdout

    def start_miniupnpd(self, extra_config=(), timeout=30):
        """Starts miniupnpd in the foreground (-d) with this router's own config (-f) and pid
        file (-P, never the shared /var/run/miniupnpd.pid); returns its Popen once it has
        learnt its public address by STUN, enabled port forwarding and opened its HTTP
        socket. @extra_config: more miniupnpd.conf lines."""
        self._upnp()
        if self.miniupnpd is not None and self.miniupnpd.poll() is None:
            raise LabError(f"miniupnpd already runs in {self.name}")
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.conf_path, "w") as f:
            f.write(miniupnpd_config(
                str(self.lan), self.stun.addr, self.stun.port, extra=extra_config,
                lease_file=self.lease_path if self.lease_file else None))
        with open(self.log_path, "ab") as log:
            start = log.tell()
            self.miniupnpd = self.lab.popen(
                self, [MINIUPNPD, "-f", self.conf_path, "-P", self.pid_path, "-d"],
                stdout=log, stderr=subprocess.STDOUT)
        text = _wait_log(self.log_path, re.compile(
            r"Port forwarding is now enabled|STUN: \.\.\. done|Port forwarding is now disabled|"
            r"Performing STUN failed|EXITING|Failed to init"), self.miniupnpd,
            f"miniupnpd in {self.name}", timeout, since=start)
        if "Port forwarding is now enabled" not in text and "STUN: ... done" not in text:
            raise LabError(f"miniupnpd in {self.name} did not enable port forwarding; its "
                           f"log:\n{text}")
        # NAT-PMP and HTTP sockets are opened after STUN
        _wait_log(self.log_path, re.compile(r"HTTP listening on port \d+"), self.miniupnpd,
                  f"miniupnpd's HTTP socket in {self.name}", timeout, since=start)
        return self.miniupnpd

    def stop_miniupnpd(self, timeout=10):
        """Stops miniupnpd with SIGTERM, repeated every half second: 2.3.1 checks its quit
        flag before select() without blocking signals, so a SIGTERM that lands while it is
        busy with a request is only seen at the next wake-up (up to notify_interval later).
        SIGKILL after @timeout seconds. Its nftables rules stay where they are (miniupnpd
        does not remove them on exit)."""
        p = self.miniupnpd
        if p is None or p.poll() is not None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(0.5)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        p.kill()
        p.wait(5)

    def flush_miniupnpd_chains(self):
        """Empties the three chains miniupnpd fills: every mapping is gone."""
        self._upnp()
        self._nft("-f", "-", input="".join(
            f"flush chain inet filter {c}\n"
            for c in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")))

    def restart_miniupnpd(self, forget=True, **kw):
        """Stops and starts miniupnpd. forget=True is a router reboot: the chains are flushed
        in between, so every mapping is lost. forget=False is a daemon restart: the rules
        stay in nftables and the new miniupnpd lists them as its own again, but without
        their lease times (they never expire any more) unless the router has a lease file
        (Lab.router(..., lease_file=True))."""
        self.stop_miniupnpd()
        if forget:
            self.flush_miniupnpd_chains()
        return self.start_miniupnpd(**kw)

    def miniupnpd_log(self, since=0):
        """What miniupnpd wrote (from byte offset @since): every run of this router."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def miniupnpd_pid(self):
        """The pid in miniupnpd's own pid file, or None."""
        try:
            with open(self.pid_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def nft_list(self):
        """`nft list table inet filter`: the router's firewall, NAT and miniupnpd's rules."""
        self._upnp()
        return self._nft("list", "table", "inet", "filter")

    _PROTO = {"6": "tcp", "0x6": "tcp", "0x06": "tcp", "17": "udp", "0x11": "udp",
              "tcp": "tcp", "udp": "udp"}

    def mappings(self):
        """The port mappings in the router's nftables now (miniupnpd's DNAT rules, whoever
        asked for them), sorted: [(proto, external port, internal ip, internal port)], e.g.
        ("tcp", 40000, "192.168.77.10", 40000). nft prints a rule like
            iif "wan0" @nh,72,8 0x6 th dport 40000 dnat ip to 192.168.77.10:40000"""
        self._upnp()
        out = []
        text = self._nft("list", "chain", "inet", "filter", "prerouting_miniupnpd")
        for line in text.splitlines():
            if "dnat" not in line:
                continue
            proto = re.search(r"@nh,72,8 (0x[0-9a-f]+|\d+)|meta l4proto (\w+)|"
                              r"\b(tcp|udp) dport", line)
            dport = re.search(r"\bdport (\d+)", line)
            to = re.search(r"dnat (?:ip )?to ([\d.]+)(?::(\d+))?", line)
            if not (proto and dport and to):
                raise LabError(f"{self.name}: cannot parse miniupnpd's rule: {line.strip()}")
            p = next(g for g in proto.groups() if g)
            ext = int(dport.group(1))
            out.append((self._PROTO.get(p.lower(), p), ext, to.group(1),
                        int(to.group(2)) if to.group(2) else ext))
        return sorted(out)


CtEntry = collections.namedtuple(
    "CtEntry", "proto orig_src orig_dst reply_src reply_dst timeout state flags")
CtEntry.__doc__ = """A conntrack entry (Lab.conntrack_entries): proto "udp" / "tcp" / "icmp";
orig_src, orig_dst, reply_src, reply_dst are (ip, port) (port None for icmp); timeout in
seconds; state the TCP state or None; flags e.g. {"UNREPLIED"} or {"ASSURED"}. Behind a NAT,
reply_dst is the mapping: the router's public address and the external port."""


def parse_conntrack(text):
    """Parses `conntrack -L` output (one entry a line) into CtEntry tuples."""
    out = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 4 or not tok[1].isdigit():
            continue
        proto, timeout = tok[0], int(tok[2])
        state = tok[3] if not tok[3].startswith(("src=", "[")) and "=" not in tok[3] else None
        tuples, cur, flags = [], None, set()
        for t in tok[3:]:
            if t.startswith("[") and t.endswith("]"):
                flags.add(t[1:-1])
                continue
            k, eq, v = t.partition("=")
            if not eq:
                continue
            if k == "src":
                cur = {}
                tuples.append(cur)
            if cur is not None and k in ("src", "dst", "sport", "dport") and k not in cur:
                cur[k] = v
        if len(tuples) < 2:
            continue

        def ends(d):
            sp, dp = d.get("sport"), d.get("dport")
            return ((d.get("src"), int(sp) if sp else None), (d.get("dst"), int(dp) if dp
                                                               else None))
        (os_, od), (rs, rd) = ends(tuples[0]), ends(tuples[1])
        out.append(CtEntry(proto, os_, od, rs, rd, timeout, state, frozenset(flags)))
    return out


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
    that handles them, like digfs_test.main, unwinds through Lab.__exit__ instead; SIGINT is
    Python's KeyboardInterrupt, which unwinds through it too)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) in (signal.SIG_DFL, None):
                signal.signal(s, _on_fatal_signal)


def _rate_bps(rate):
    """@rate as bits per second: a number, or tc's notation ("500kbit", "10mbit", "1gbit")."""
    if isinstance(rate, (int, float)):
        bps = float(rate)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit\s*", str(rate), re.I)
        if not m:
            raise LabError(f"rate {rate!r}: bits per second, or e.g. '500kbit', '10mbit'")
        bps = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if bps < 8:
        raise LabError(f"rate {rate!r} is too small")
    return int(bps)


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
        self.workdir = tempfile.mkdtemp(prefix=self.prefix)
        self.hosts = {}
        self.procs = []
        self.closed = False
        self.stun = None            # the STUN responder's Host, once a upnp router made it
        self._lock = threading.RLock()
        self._public_next = {str(n): 10 for n in LAB_NETS}
        self._lan_next = 1
        self._veth = 0
        self._queue = 0
        self._netem = {}            # (host name, interface) -> what Lab.netem set up
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
        """A process in its own session that removes this lab's namespaces and work directory
        when our end of its stdin pipe closes: at close(), or when this process dies."""
        self._reaper = subprocess.Popen(
            [sys.executable, HERE, "--reap", self.prefix], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True)

    def _namespace(self, name, kind, addr=None, router=None, cls=Host, **kw):
        if not _NAME.match(name) or name == "inet" and kind != "inet":
            raise LabError(f"bad host name {name!r} (a-z, 0-9, '-', at most 20, not 'inet')")
        with self._lock:
            if self.closed:
                raise LabError("the lab is closed")
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
        with self._lock:
            self._veth += 1
            return f"{tag}{self._veth}"

    def _plug_into_inet(self, h, ifname, addrs):
        """A veth from @h (interface @ifname with @addrs, each in its /24) into the internet
        bridge."""
        port = self._veth_name("v")
        _ip_batch(self.inet.ns, [f"link add {port} type veth peer name {ifname} netns {h.ns}",
                                 f"link set {port} master inet0",
                                 f"link set {port} type bridge_slave mcast_flood off",
                                 f"link set {port} up"])
        h.links[ifname] = (self.inet, port)
        nets = [self._net_of(a) for a in addrs]
        lines = [f"addr add {a}/{n.prefixlen} dev {ifname}" for a, n in zip(addrs, nets)]
        lines.append(f"link set {ifname} up")
        lines += [f"route add {n} dev {ifname}" for n in LAB_NETS if n not in nets]
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
        if any(ip in h.addrs for h in self.hosts.values() if h.kind in ("public", "router")):
            raise LabError(f"address {ip} is taken")
        return ip

    def public(self, name, ip=None, extra_ips=()):
        """A host on the internet directly (default: the next free 198.51.100.x); @extra_ips:
        more addresses on its eth0 (h.addrs lists them all, h.addr is the first)."""
        ip = self._public_ip(ip, LAB_NETS[0])
        extra = [self._public_ip(x, LAB_NETS[0]) for x in extra_ips]
        if len({ip, *extra}) != 1 + len(extra):
            raise LabError(f"{name}: the same address twice")
        h = self._namespace(name, "public", ip)
        h.addrs = [ip, *extra]
        try:
            self._plug_into_inet(h, "eth0", h.addrs)
            _ip_batch(h.ns, [f"route add {MULTICAST} dev eth0"])
        except BaseException:
            self._drop(h)
            raise
        return h

    def stun_server(self, name="stun", ips=STUN_IPS, ports=STUN_PORTS):
        """The lab's STUN responder (stun_server.py, RFC 5389 Binding with RFC 5780's
        CHANGE-REQUEST / OTHER-ADDRESS) in a public host of its own with two addresses, on two
        ports: what a "upnp" router's miniupnpd needs to accept its documentation-range WAN
        address (UPNP.md, trap 3). Started by the first router(kind="upnp") unless it exists;
        call it first to choose the name or addresses. Returns the Host, also lab.stun, with
        .port, .alt_port, .log_path (its -v log: one line per request) and .proc."""
        with self._lock:
            if self.stun is not None:
                return self.stun
        if len(ips) != 2 or len(ports) != 2:
            raise LabError("a STUN responder needs two addresses and two ports (RFC 5780)")
        h = self.public(name, ip=ips[0], extra_ips=ips[1:])
        h.port, h.alt_port = ports
        h.log_path = os.path.join(self.workdir, f"{name}.log")
        with open(h.log_path, "ab") as log:
            h.proc = self.popen(h, [sys.executable, STUN_SERVER, ips[0], ips[1], "--port",
                                    str(ports[0]), "--alt-port", str(ports[1]), "-v"],
                                stdout=log, stderr=subprocess.STDOUT)
        _wait_log(h.log_path, "READY", h.proc, f"the STUN responder in {name}", 15)
        self.stun = h
        return h

    def router(self, name, kind="easy", wan_ip=None, lan=None, lease_file=False,
               start_miniupnpd=True):
        """A NAT router: WAN side wan0 on the internet (default: the next free 203.0.113.x),
        LAN bridge lan0 (default 10.<n>.0.0/24, gateway .1). kind "easy": MASQUERADE
        (port-preserving, endpoint-independent mapping); "hard": MASQUERADE --random-fully
        (a new external port for every destination). Both drop unsolicited traffic from the
        WAN (address-and-port-dependent filtering); iptables rules.

        kind "upnp": a home router with UPnP IGD and NAT-PMP, nftables rules (easy's NAT and
        filtering, plus the ports miniupnpd maps) and Debian's miniupnpd-nftables 2.3.1 with
        its own config, pid and log files in <lab work dir>/<name>/ (@lease_file: also a lease
        file there, so a restarted miniupnpd keeps the lease times). Its public address comes
        from the lab's STUN responder (stun_server(), started now if needed). With
        @start_miniupnpd (default) it returns once miniupnpd forwards ports. Its LAN hosts get a
        default route via the router (libnatpmp finds the gateway from it). See UPNP.md."""
        if kind not in NAT_KINDS:
            raise LabError(f"router kind {kind!r}: one of {NAT_KINDS}")
        if kind == "upnp":
            missing = missing_packages("upnp")
            if missing:
                raise LabError(f"a upnp router needs {' '.join(missing)} "
                               f"(netlab.ensure_packages('upnp'))")
        wan_ip = self._public_ip(wan_ip, LAB_NETS[1])
        if lan is None:
            with self._lock:
                lan = f"10.{self._lan_next}.0.0/24"
                self._lan_next += 1
        lan = ipaddress.ip_network(lan)
        if not lan.is_private or any(lan.overlaps(n) for n in LAB_NETS) or lan.prefixlen > 29:
            raise LabError(f"LAN {lan}: must be a private range (10/8, 172.16/12, 192.168/16)")
        if any(lan.overlaps(r.lan) for r in self.routers()):
            raise LabError(f"LAN {lan} overlaps another router's LAN")
        r = self._namespace(name, "router", cls=Router, nat=kind, wan=wan_ip, lan=lan)
        try:
            self._plug_into_inet(r, "wan0", [wan_ip])
            upnp = kind == "upnp"
            _ip_batch(r.ns, [
                "link add lan0 type bridge" + (" mcast_snooping 0" if upnp else ""),
                f"addr add {r.gateway}/{lan.prefixlen} dev lan0",
                "link set lan0 up",
                # SSDP: miniupnpd's NOTIFYs and M-SEARCH answers stay on the LAN segment
                *([f"route add {MULTICAST} dev lan0"] if upnp else [])])
            if upnp:
                r.lease_file = lease_file
                r.stun = self.stun_server()
                os.makedirs(r.workdir, exist_ok=True)
                with open(r.nft_path, "w") as f:
                    f.write(upnp_nft_ruleset(str(lan)))
                r._nft("-f", r.nft_path)
                if start_miniupnpd:
                    r.start_miniupnpd()
            else:
                masq = ["-j", "MASQUERADE"] + (["--random-fully"] if kind == "hard" else [])
                ipt = ["nsenter", f"--net={r.path}", "iptables", "-w"]
                _sh(ipt + ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0", *masq])
                _sh(ipt + ["-A", "FORWARD", "-i", "wan0", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT"])
                _sh(ipt + ["-A", "FORWARD", "-i", "wan0", "-j", "DROP"])
                # The router itself answers nothing from the WAN but replies and pings, as home
                # routers do (OpenWrt rejects WAN input). Accepting it would also let Linux
                # confirm a conntrack entry for every unsolicited datagram to the router, which
                # holds that (peer, port) pair for 30 s: the router's own later mapping towards
                # that peer would then get another port (no hole punching could work).
                _sh(ipt + ["-A", "INPUT", "-i", "wan0", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT"])
                _sh(ipt + ["-A", "INPUT", "-i", "wan0", "-p", "icmp", "--icmp-type",
                           "echo-request", "-j", "ACCEPT"])
                _sh(ipt + ["-A", "INPUT", "-i", "wan0", "-j", "DROP"])
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
            h.links["eth0"] = (r, port)
            # natpmpc / libnatpmp take the gateway from the default route; it ends at the
            # router, which has no route beyond the lab's prefixes
            _ip_batch(h.ns, [f"addr add {ip}/{r.lan.prefixlen} dev eth0",
                             "link set eth0 up",
                             *[f"route add {n} via {r.gateway}" for n in LAB_NETS],
                             *([f"route add default via {r.gateway} dev eth0"]
                               if r.nat == "upnp" else []),
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

    def routers(self):
        return [h for h in self.hosts.values() if isinstance(h, Router)]

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
        stdin from /dev/null unless input= is given, 60 s timeout)."""
        if kw.get("input") is None:
            kw.pop("input", None)
            kw.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(host, argv, private_mounts), **kw)

    def _run_ok(self, host, argv, what=None, **kw):
        """run(), raising LabError unless it exits 0; returns its stdout."""
        r = self.run(host, argv, **kw)
        if r.returncode != 0:
            raise LabError(f"{self._get(host).name}: {what or ' '.join(map(str, argv))} "
                           f"failed ({r.returncode}): {(r.stderr or r.stdout or '').strip()}")
        return r.stdout

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
        """Starts a long-running tool (udp-echo, udp-reflect, tcp-echo, udp-listen, ...) in
        @host and waits until it says it is ready. Returns the Popen (its stdout carries the
        tool's answer)."""
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

    # ---- impairments: loss, delay, rate (netem)
    def netem(self, host, loss=None, delay_ms=None, jitter_ms=None, rate=None, iface=None):
        """Impairs @host's link to the internet, in both directions: each packet in and each
        packet out is lost with probability @loss percent, held back @delay_ms milliseconds
        (± a uniformly drawn @jitter_ms, which may reorder packets) and sent at most at @rate
        (bits per second, or "500kbit", "10mbit"). So a round trip over this link takes
        2 × delay_ms longer, and survives with probability (1 - loss/100)². @iface: default
        the uplink (a public host's or a LAN host's eth0, a router's wan0); another interface
        of the host may be named (a router's lan0, say). Replaces what an earlier call set on
        that interface; with no impairment at all it only clears. Returns the backend used.

        Backend (netem_backend()): "tc": a netem qdisc on the interface (egress) and on the
        other end of its veth (egress there is ingress here: an "inet" bridge port for eth0 of
        a public host and for wan0, the router's LAN port for a LAN host's eth0); an interface
        that is not a veth of the lab gets it on its own egress only. "nfqueue", where the
        kernel has no sch_netem: iptables sends what comes in on the interface (raw
        PREROUTING) and what goes out of it (mangle POSTROUTING, before the NAT) to an NFQUEUE
        served by this file's `nfq-netem` tool inside the host, which drops and delays
        packets in userspace (queue bypass: nothing is lost if the tool is gone)."""
        h = self._get(host)
        iface = iface or h.uplink
        if iface is None:
            raise LabError(f"{h.name} has no link of its own to impair")
        loss = float(loss) if loss else 0.0
        delay = float(delay_ms) if delay_ms else 0.0
        jitter = float(jitter_ms) if jitter_ms else 0.0
        if not 0 <= loss <= 100 or delay < 0 or jitter < 0:
            raise LabError(f"netem: loss must be 0..100 (%), delay and jitter >= 0 (ms): "
                           f"{loss!r} {delay!r} {jitter!r}")
        bps = _rate_bps(rate) if rate is not None else 0
        self.netem_clear(h, iface)
        if not (loss or delay or jitter or bps):
            return None
        backend = netem_backend()
        if backend is None:
            raise LabError(f"netem cannot work here: {netem_unusable_reason()}")
        if backend == "tc":
            args = ["limit", str(NETEM_LIMIT)]
            if delay or jitter:
                args += ["delay", f"{delay:g}ms"] + ([f"{jitter:g}ms"] if jitter else [])
            if loss:
                args += ["loss", f"{loss:g}%"]
            if bps:
                args += ["rate", f"{bps}bit"]
            ends = [(h, iface)] + ([h.links[iface]] if iface in h.links else [])
            self._netem[(h.name, iface)] = ("tc", ends)
            for x, dev in ends:
                self._run_ok(x, ["tc", "qdisc", "replace", "dev", dev, "root", "netem", *args])
            return backend
        with self._lock:
            self._queue += 1
            q = self._queue
        p = self.start_tool(h, "nfq-netem", q, f"{loss:g}", f"{delay:g}", f"{jitter:g}", bps)
        rules = []
        self._netem[(h.name, iface)] = ("nfqueue", p, rules)
        for table, chain, io in (("raw", "PREROUTING", "-i"), ("mangle", "POSTROUTING", "-o")):
            spec = [chain, io, iface, "-j", "NFQUEUE", "--queue-num", str(q), "--queue-bypass"]
            self._run_ok(h, ["iptables", "-w", "-t", table, "-I", *spec])
            rules.append((table, spec))
        return backend

    def netem_clear(self, host, iface=None):
        """Removes what netem() set on @host (on @iface only, if given). With the nfqueue
        backend, returns {interface: packet counts} of what the tool saw."""
        h = self._get(host)
        stats = {}
        for key in [k for k in self._netem if k[0] == h.name and iface in (None, k[1])]:
            rec = self._netem.pop(key)
            if rec[0] == "tc":
                for x, dev in rec[1]:
                    self.run(x, ["tc", "qdisc", "del", "dev", dev, "root"])
                continue
            _, p, rules = rec
            for table, spec in rules:
                self.run(h, ["iptables", "-w", "-t", table, "-D", *spec])
            if p.poll() is None:
                p.terminate()       # it lets go of what it still holds, then exits
            try:
                out, _ = p.communicate(timeout=10)
                stats[key[1]] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            except (subprocess.TimeoutExpired, ValueError):
                p.kill()
                p.communicate()
        return stats

    # ---- the NAT's memory: conntrack
    def _need(self, feature):
        missing = missing_packages(feature)
        if missing:
            raise LabError(f"not installed: {' '.join(missing)} "
                           f"(netlab.ensure_packages({feature!r}))")

    def conntrack_timeouts(self, router, udp=None, udp_stream=None):
        """Sets, in @router's namespace only (these sysctls are per network namespace), how
        long conntrack keeps an idle UDP flow: @udp seconds (nf_conntrack_udp_timeout: a flow
        that has seen no reply, and, since Linux 5.x, also one that has for its first 2 s)
        and @udp_stream seconds (nf_conntrack_udp_timeout_stream: one with traffic both ways
        for more than 2 s). When it expires the NAT mapping is gone: replies to it are
        dropped, the next packet out gets a new one. Applies to packets from now on: an entry
        keeps the expiry its last packet gave it. Returns the values now in force, e.g.
        {"udp": 30, "udp_stream": 120} (Linux's defaults)."""
        h = self._get(router)
        keys = {"udp": "net.netfilter.nf_conntrack_udp_timeout",
                "udp_stream": "net.netfilter.nf_conntrack_udp_timeout_stream"}
        sets = [f"{keys[k]}={int(v)}" for k, v in (("udp", udp), ("udp_stream", udp_stream))
                if v is not None]
        if sets:
            self._run_ok(h, ["sysctl", "-q", "-w", *sets])
        out = self._run_ok(h, ["sysctl", "-n", keys["udp"], keys["udp_stream"]]).split()
        return {"udp": int(out[0]), "udp_stream": int(out[1])}

    def flush_conntrack(self, router):
        """Drops every conntrack entry in @router (`conntrack -F`): the NAT forgets all its
        mappings at once (as a router that reboots, or a CGN that reassigns ports). Replies to
        an old mapping are dropped; the next packet out makes a new one."""
        self._need("conntrack")
        self._run_ok(self._get(router), ["conntrack", "-F"])

    def conntrack_entries(self, router, proto=None):
        """The conntrack entries in @router now (`conntrack -L`, expired ones excluded), as
        CtEntry tuples; @proto: only "udp", "tcp" or "icmp". A NAT mapping of a host behind
        @router is an entry with orig_src == (host ip, port) and reply_dst == (public ip,
        external port)."""
        self._need("conntrack")
        argv = ["conntrack", "-L"] + (["-p", proto] if proto else [])
        return parse_conntrack(self._run_ok(self._get(router), argv))

    # ---- checks
    def check_isolation(self):
        """Raises LabError unless every namespace of the lab routes only the lab's public
        /24s, its own LAN and on-link multicast, with no default route except a LAN host's of
        a upnp router (via that router, which has none), and `ip route get` finds no way to
        198.18.0.1 (outside the lab; nothing is sent) anywhere but through such a router."""
        allowed = {str(n) for n in LAB_NETS} | {MULTICAST} | {str(r.lan) for r in self.routers()}
        for h in self.hosts.values():
            upnp_lan = h.kind == "lan" and h.router.nat == "upnp"
            routes = self._run_ok(h, ["ip", "-4", "route", "show", "table", "all"])
            for line in routes.splitlines():
                tok = line.split()
                if not tok or tok[0] in ("local", "broadcast", "anycast", "multicast"):
                    continue
                if tok[0] in allowed:
                    continue
                if upnp_lan and line.startswith(f"default via {h.router.gateway} dev eth0"):
                    continue
                raise LabError(f"unexpected route in {h.name}: {line}")
            g = self.run(h, ["ip", "-4", "route", "get", "198.18.0.1"])
            if upnp_lan:
                if g.returncode != 0 or f"via {h.router.gateway}" not in g.stdout:
                    raise LabError(f"{h.name}: expected its default route via its router: "
                                   f"{g.stdout.strip()} {g.stderr.strip()}")
            elif g.returncode == 0:
                raise LabError(f"{h.name} can route out of the lab: {g.stdout.strip()}")

    # ---- teardown
    def namespaces(self):
        return [h.ns for h in self.hosts.values()]

    def close(self):
        """Idempotent teardown: stops miniupnpd, what the lab started, every process left
        inside its namespaces, deletes the namespaces and the work directory."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            for r in self.routers():
                try:
                    r.stop_miniupnpd(timeout=3)
                except (OSError, subprocess.SubprocessError):
                    pass
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
            left = remove_namespaces(names)
            if left:
                sys.stderr.write(f"netlab: could not remove {left}\n")
            if os.environ.get("DIGFS_TEST_KEEP") != "1":
                shutil.rmtree(self.workdir, ignore_errors=True)
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
        lines = [f"lab {self.prefix}*: internet = bridge inet0 in {self.inet.ns}; "
                 f"work dir {self.workdir}"]
        for h in self.hosts.values():
            if h.kind == "public":
                extra = " (STUN)" if h is self.stun else ""
                lines.append(f"  public {h.name:10} {' '.join(h.addrs)}{extra}")
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


def _tool_udp_send(local_port, target, count, interval_ms=20):
    """Sends @count datagrams "hello" from @local_port to @target (ip:port), one every
    @interval_ms."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(local_port)))
    ip, port = target.rsplit(":", 1)
    for _ in range(int(count)):
        s.sendto(b"hello", (ip, int(port)))
        time.sleep(float(interval_ms) / 1000)
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


def _tool_udp_reflect(port):
    """Sends every datagram back to its sender unchanged (for udp-rtt)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    _ready()
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)


def _tool_udp_rtt(local_port, target, count, interval_ms, wait):
    """Sends @count numbered datagrams to @target (ip:port, a udp-reflect), one every
    @interval_ms, and collects the echoes until @wait seconds after the last one. Prints
    {"local", "sent", "received", "rtt_ms": [sorted round-trip times of those that came back]}."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(local_port)))
    ip, port = target.rsplit(":", 1)
    dst = (ip, int(port))
    count, gap = int(count), float(interval_ms) / 1000
    tag = os.urandom(4).hex()
    sent, rtt = {}, {}

    def drain(until):
        while (left := until - time.monotonic()) > 0:
            r, _, _ = select.select([s], [], [], left)
            if not r:
                return
            data, addr = s.recvfrom(2048)
            now = time.monotonic()
            f = data.decode(errors="replace").split()
            if addr == dst and len(f) == 3 and f[0] == "rtt" and f[1] == tag:
                i = int(f[2])
                if i in sent and i not in rtt:
                    rtt[i] = now - sent[i]
    for i in range(count):
        sent[i] = time.monotonic()
        s.sendto(f"rtt {tag} {i}".encode(), dst)
        drain(sent[i] + gap)
    drain(time.monotonic() + float(wait))
    print(json.dumps({"local": s.getsockname()[1], "sent": count, "received": len(rtt),
                      "rtt_ms": sorted(round(v * 1000, 3) for v in rtt.values())}))


# nfnetlink_queue (linux/netfilter/nfnetlink_queue.h), for nfq-netem
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET, _NFQNL_MSG_VERDICT, _NFQNL_MSG_CONFIG = 0, 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS, _NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_PACKET = 2
_NFQA_PACKET_HDR, _NFQA_PAYLOAD = 1, 10
_NFQA_VERDICT_HDR = 2
_NF_DROP, _NF_ACCEPT = 0, 1
_NF_INET_PRE_ROUTING = 0
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4


def _nla(atype, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def _nfq_msg(msg, queue, attrs, flags=_NLM_F_REQUEST, seq=0):
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq,
                       0) + body


def _tool_nfq_netem(queue, loss, delay_ms, jitter_ms, rate_bps):
    """netem in userspace (Lab.netem where the kernel has no sch_netem): serves NFQUEUE
    @queue of this namespace. Each packet is dropped with probability @loss percent, else
    accepted @delay_ms ± @jitter_ms (uniform) after it arrived, and no faster than @rate_bps
    per direction (0: unlimited); at most NETEM_LIMIT packets are held (more are dropped).
    Direction = the netfilter hook it was queued from (PREROUTING: in, else out). SIGTERM:
    accepts what it holds, prints {"in", "out", "dropped"} and exits."""
    queue, loss = int(queue), float(loss) / 100
    delay, jitter = float(delay_ms) / 1000, float(jitter_ms) / 1000
    rate = float(rate_bps)
    rnd = random.Random(os.urandom(16))
    stop = []
    rpipe, wpipe = os.pipe()
    os.set_blocking(wpipe, False)
    signal.set_wakeup_fd(wpipe)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)    # SO_RCVBUFFORCE (root)
    except OSError:
        pass
    try:
        s.setsockopt(270, 5, 1)                          # SOL_NETLINK, NETLINK_NO_ENOBUFS
    except OSError:
        pass
    s.bind((0, 0))

    def config(seq, attrs):
        s.send(_nfq_msg(_NFQNL_MSG_CONFIG, queue, attrs, _NLM_F_REQUEST | _NLM_F_ACK, seq))
        data = s.recv(65536)
        if struct.unpack_from("=H", data, 4)[0] == _NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, 16)[0]
            if err:
                sys.exit(f"nfq-netem: binding queue {queue}: {os.strerror(err)}")
    config(1, [_nla(_NFQA_CFG_CMD, struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, 0))])
    config(2, [_nla(_NFQA_CFG_PARAMS, struct.pack("!IB", 20, _NFQNL_COPY_PACKET)),
               _nla(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", NETEM_LIMIT))])
    _ready()
    held = []                   # heap of (due, seq, packet id)
    free = {"in": 0.0, "out": 0.0}
    seen = {"in": 0, "out": 0, "dropped": 0}
    verdicts = []
    n = 0

    def verdict(pid, v):
        verdicts.append(_nfq_msg(_NFQNL_MSG_VERDICT, queue,
                                 [_nla(_NFQA_VERDICT_HDR, struct.pack("!II", v, pid))]))

    def packet(data, off, end, now):
        nonlocal n
        pid = hook = None
        length = 0
        a = off + 20
        while a + 4 <= end:
            alen, atype = struct.unpack_from("=HH", data, a)
            if alen < 4:
                break
            atype &= 0x3FFF
            if atype == _NFQA_PACKET_HDR:
                pid, _, hook = struct.unpack_from("!IHB", data, a + 4)
            elif atype == _NFQA_PAYLOAD and alen >= 8:
                length = struct.unpack_from("!H", data, a + 6)[0]    # IPv4 total length
            a += (alen + 3) & ~3
        if pid is None:
            return
        way = "in" if hook == _NF_INET_PRE_ROUTING else "out"
        seen[way] += 1
        if (loss and rnd.random() < loss) or len(held) >= NETEM_LIMIT:
            seen["dropped"] += 1
            verdict(pid, _NF_DROP)
            return
        due = now + max(0.0, delay + (rnd.uniform(-jitter, jitter) if jitter else 0.0))
        if rate:
            due = max(due, free[way])
            free[way] = due + length * 8 / rate
        n += 1
        heapq.heappush(held, (due, n, pid))

    def flush():
        for i in range(0, len(verdicts), 1024):    # a netlink send must fit its buffer
            s.send(b"".join(verdicts[i:i + 1024]))
        verdicts.clear()

    while not stop:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else None
        try:
            r, _, _ = select.select([s, rpipe], [], [], wait)
        except InterruptedError:
            continue
        now = time.monotonic()
        if s in r:
            while True:
                try:
                    data = s.recv(1 << 16, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        continue
                    raise
                off = 0
                while off + 16 <= len(data):
                    mlen, mtype = struct.unpack_from("=IH", data, off)
                    if mlen < 16:
                        break
                    if mtype == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                        packet(data, off, off + mlen, now)
                    off += (mlen + 3) & ~3
        while held and held[0][0] <= now:
            verdict(heapq.heappop(held)[2], _NF_ACCEPT)
        flush()
    while held:
        verdict(heapq.heappop(held)[2], _NF_ACCEPT)
    flush()
    print(json.dumps(seen), flush=True)


TOOLS = {"udp-echo": _tool_udp_echo, "udp-probe": _tool_udp_probe, "udp-send": _tool_udp_send,
         "udp-listen": _tool_udp_listen, "mcast-listen": _tool_mcast_listen,
         "tcp-echo": _tool_tcp_echo, "tcp-connect": _tool_tcp_connect, "ping": _tool_ping,
         "udp-reflect": _tool_udp_reflect, "udp-rtt": _tool_udp_rtt,
         "nfq-netem": _tool_nfq_netem}


# --------------------------------------------------------------------------- command line

def _reap(prefix):
    """The reaper: waits for EOF on stdin (the lab closed or its owner died), then removes
    whatever is left of the lab @prefix (namespaces, work directory)."""
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
        for r in (lab["easy-r"], lab["hard-r"]):
            print(f"conntrack in {r.name}:")
            for c in (lab.conntrack_entries(r, "udp") if _which("conntrack") else []):
                print(f"  {c.proto} {c.orig_src} -> {c.orig_dst}, mapped to {c.reply_dst}, "
                      f"{c.timeout} s left {sorted(c.flags)}")
        lab.start_tool(p2, "udp-reflect", 7)
        for kw in ({}, {"delay_ms": 50}, {"loss": 30}):
            backend = lab.netem(p1, **kw)
            got = lab.tool(p1, "udp-rtt", 0, f"{p2.addr}:7", 50, 10, 1)
            rtt = got["rtt_ms"]
            print(f"p1 -> p2 with netem {kw or 'off'} ({backend or '-'}): {got['received']}/50 "
                  f"echoes, median RTT {rtt[len(rtt) // 2] if rtt else '-'} ms")
        lab.netem_clear(p1)


def _demo_upnp(hold=False):
    """A upnp router with a LAN host and a public host, and what Debian's own clients say
    about it (printed); with @hold, kept until Ctrl-C."""
    with Lab() as lab:
        pub = lab.public("pub")
        rtr = lab.router("rtr", kind="upnp", lan="192.168.77.0/24")
        lan = lab.behind(rtr, "lan")
        print(lab.describe())
        if hold:
            print(f"enter with: nsenter --net={lan.path} sh   (Ctrl-C ends the lab)")
            try:
                while rtr.miniupnpd.poll() is None:
                    time.sleep(1)
                print(f"miniupnpd exited ({rtr.miniupnpd.returncode})")
            except KeyboardInterrupt:
                pass
        else:
            def show(host, argv):
                r = lab.run(host, argv, timeout=30)
                print(f"--- {host.name}$ {' '.join(argv)}  (exit {r.returncode})")
                print((r.stdout + r.stderr).rstrip())
            show(lan, ["natpmpc"])
            # libminiupnpc 2.2.4 calls this gateway "not connected" (reserved external
            # address): upnpc gives up without -i
            show(lan, ["upnpc", "-s"])
            show(lan, ["natpmpc", "-a", "40000", "40000", "tcp", "60"])
            show(lan, ["upnpc", "-i", "-e", "digfs lab", "-a", lan.addr, "40001", "40001",
                       "TCP", "60"])
            show(lan, ["upnpc", "-i", "-l"])
            print(f"--- mappings(): {rtr.mappings()}")
            lab.start_tool(lan, "tcp-echo", 40001)
            print(f"--- pub -> {rtr.addr}:40001: "
                  f"{lab.tool(pub, 'tcp-connect', rtr.addr, 40001, 3)}")
            show(lan, ["upnpc", "-i", "-d", "40001", "TCP"])
            show(lan, ["natpmpc", "-a", "40000", "40000", "tcp", "0"])
            print(f"--- mappings(): {rtr.mappings()}")
        print("--- miniupnpd log")
        print(rtr.miniupnpd_log().rstrip())


def main(argv=None):
    ap = argparse.ArgumentParser(description="digfs network lab (see the module docstring)")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove lab namespaces and work directories left by processes that "
                         "are gone")
    ap.add_argument("--all", action="store_true",
                    help="with --cleanup: remove every lab namespace, also of running labs")
    ap.add_argument("--check", action="store_true",
                    help="say whether the lab (and its upnp / conntrack / netem parts) can run "
                         "here")
    ap.add_argument("--install", action="store_true",
                    help="apt-get install the packages of every part of the lab that are "
                         "missing (needs the package registry)")
    ap.add_argument("--demo", action="store_true", help="build a sample lab, probe it, remove it")
    ap.add_argument("--demo-upnp", action="store_true",
                    help="build a upnp router, show what Debian's clients see, remove it")
    ap.add_argument("--hold", action="store_true", help="with --demo-upnp: keep it until Ctrl-C")
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
        err = ensure_packages(*[f for f in PACKAGES if f != "base"], log=print)
        print(err or "every package of the lab is installed")
        return 1 if err else 0
    elif a.check:
        why = unusable_reason()
        print(f"lab: {why or 'can run here'}")
        if why:
            return 1
        for f in PACKAGES:
            if f != "base":
                print(f"{f}: {unusable_reason(f) or 'can run here'}")
        print(f"netem: {netem_unusable_reason() or netem_backend()}")
    elif a.demo:
        _demo()
    elif a.demo_upnp:
        _demo_upnp(a.hold)
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
