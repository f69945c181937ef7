#!/usr/bin/env python3
"""A home router with UPnP IGD and NAT-PMP for the digfs network lab: Debian's own miniupnpd
(the nftables build, 2.3.1 in Debian 12) in a network namespace, with a STUN responder on the
lab's internet so that it accepts its documentation-range WAN address (Python 3.11 stdlib;
needs root, iproute2, util-linux's nsenter, nftables, miniupnpd-nftables; the tests also use
miniupnpc and natpmpc). See UPNP.md beside this file for the traps this works around.

    with UpnpLab() as lab:                        # builds everything, starts miniupnpd
        lab.run("lan", ["natpmpc", "-a", "40000", "40000", "tcp", "3600"])
        lab.run("pub", ["nc", lab.WAN_IP, "40000"])
        print(lab.miniupnpd_log())

    python3 upnp_router.py            # build, show what the Debian clients see, tear down
    python3 upnp_router.py --hold     # build and keep it until Ctrl-C (nsenter into it)
    python3 upnp_router.py --cleanup  # remove leftovers of dead owners

Topology (every namespace is "dgupnp-<pid>.<starttime>-<random>-<host>"):

    inet   a bridge "inet0", the internet: no addresses, no routes
    pub    198.51.100.10/24 on eth0 (a public host)
    stun   203.0.113.10/24 and 203.0.113.11/24 on eth0: stun_server.py on ports 3478 and 3479
    rtr    wan0 198.51.100.20/24 (on the bridge), lan0 192.168.77.1/24; ip_forward=1;
           nftables: MASQUERADE LAN -> WAN, forward policy drop except LAN -> WAN, replies and
           what miniupnpd opens; miniupnpd -d with its own config and pid file (and a lease
           file on request)
    lan    192.168.77.10/24 on eth0, default route via 192.168.77.1 (natpmpc and libnatpmp
           find the gateway from the default route; the router itself has no default route,
           so nothing gets further than the router)

198.51.100.0/24 and 203.0.113.0/24 are both on-link on the bridge (each public namespace has
a route for the other prefix on its interface). No interface of the lab is ever in the
calling namespace: every veth is created inside a lab namespace with its peer moved into
another lab namespace. IPv6 is off in every namespace. SSDP (239.255.255.250:1900) and NAT-PMP
(192.168.77.1:5351) never leave the LAN segment (a veth pair between rtr and lan).

Teardown (close(), the context manager, atexit, SIGTERM/SIGINT/SIGHUP when nobody else handles
them) stops the processes the lab started, then every process still inside a lab namespace
(found by /proc/PID/ns/net), by pid, and deletes the namespaces (which destroys their veths,
bridges and nftables tables). A reaper process in its own session does the same if the owner
dies without tearing down (SIGKILL).
"""

import argparse
import atexit
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
THIS = os.path.abspath(__file__)
STUN_SERVER = os.path.join(HERE, "stun_server.py")
PREFIX = "dgupnp-"
NETNS_DIR = "/run/netns"
_NS_RE = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)-([0-9a-f]+)-([a-z][a-z0-9]*)\Z")

MINIUPNPD = "/usr/sbin/miniupnpd"
PACKAGES = ("miniupnpd-nftables", "miniupnpc", "natpmpc", "nftables")
# the program each package must provide
PACKAGE_TOOLS = {"miniupnpd-nftables": MINIUPNPD, "miniupnpc": "upnpc", "natpmpc": "natpmpc",
                 "nftables": "nft"}


class LabError(RuntimeError):
    """Building or using the lab failed."""


# --------------------------------------------------------------------------- environment

def _which(tool):
    return tool if os.path.isabs(tool) and os.access(tool, os.X_OK) else shutil.which(tool)


def missing_tools():
    """Programs the lab needs that are not installed."""
    need = ["ip", "nsenter"] + list(PACKAGE_TOOLS.values())
    return [t for t in need if not _which(t)]


def _miniupnpd_outside_lab():
    """pids of miniupnpd processes running in the host's network namespace (pid 1's) or in
    ours: never ours to stop, but a sign that a package install started the service."""
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


def ensure_packages(log=None):
    """Installs the Debian packages the lab needs when some are missing (needs root and the
    package registry; a no-op when everything is there). Only miniupnpd-nftables is
    installed, never the "miniupnpd" package: that one carries the init script / systemd
    unit, a debconf dialogue and /etc/miniupnpd/miniupnpd.conf, and would start a daemon on
    the host; miniupnpd-nftables ships only the binary and the (broken) helper scripts.
    While apt-get runs, a policy-rc.d that forbids starting services is put in place when
    none exists (removed afterwards). Returns None on success, else the reason."""
    if not missing_tools():
        return None
    if os.environ.get("DIGFS_SKIP_INSTALL") == "1":
        return f"missing {', '.join(missing_tools())} and DIGFS_SKIP_INSTALL=1"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"missing {', '.join(missing_tools())} (apt-get install {' '.join(PACKAGES)})"
    policy = "/usr/sbin/policy-rc.d"
    made_policy = False
    if not os.path.exists(policy):
        try:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\n# written by digfs tests/netlab/upnp_router.py during "
                        "apt-get install; removed afterwards\nexit 101\n")
            os.chmod(policy, 0o755)
            made_policy = True
        except OSError:
            pass
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0 and "Unable to locate" in (r.stderr + r.stdout):
            subprocess.run(["apt-get", "update", "-q"], stdin=subprocess.DEVNULL, env=env,
                           capture_output=True, timeout=300)
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, capture_output=True,
                               text=True, timeout=300)
        if log:
            log(f"apt-get install {' '.join(PACKAGES)}: exit {r.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install failed: {e}"
    finally:
        if made_policy:
            try:
                os.unlink(policy)
            except OSError:
                pass
    stray = _miniupnpd_outside_lab()
    if stray:
        # not ours to stop: report it loudly instead
        sys.stderr.write(f"upnp_router: WARNING: miniupnpd running outside the lab: pids "
                         f"{stray}\n")
    if missing_tools():
        return f"still missing after apt-get: {', '.join(missing_tools())}"
    return None


def unusable_reason():
    """None when the lab can run here; otherwise why not (for a test's skip message)."""
    if os.geteuid() != 0:
        return "the UPnP lab needs root"
    miss = missing_tools()
    if miss:
        return f"not installed: {', '.join(miss)} (apt-get install {' '.join(PACKAGES)})"
    me = os.getpid()
    name = f"{PREFIX}{me}.{_proc_starttime(me)}-{random.getrandbits(32):08x}-probe"
    r = subprocess.run(["ip", "netns", "add", name], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    try:
        r = subprocess.run(["nsenter", f"--net={NETNS_DIR}/{name}", "nft", "list", "ruleset"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"nft does not work in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    return None


def _proc_starttime(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    return int(st[st.rindex(")") + 2:].split()[19])


def _owner_alive(pid, start):
    return _proc_starttime(pid) == start


def _sh(argv, what=None, input=None, timeout=60):
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if r.returncode != 0:
        raise LabError(f"{what or ' '.join(argv)} failed ({r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def _ip_batch(ns, lines):
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
    """Stops every process inside the namespaces @names (by pid), then deletes them.
    Returns the names that could not be removed."""
    names = [n for n in names if os.path.exists(os.path.join(NETNS_DIR, n))]
    _kill_pids(pids_in_namespaces(names), grace)
    left = []
    for n in sorted(names, key=lambda n: n.endswith("-inet")):
        r = subprocess.run(["ip", "netns", "del", n], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, n)):
            left.append(n)
    return left


def cleanup_leftovers(everything=False, prefix=None, out=None):
    """Removes lab namespaces whose owner is gone (@everything: all; @prefix: those)."""
    victims = []
    for n in lab_namespaces():
        if prefix is not None:
            if n.startswith(prefix):
                victims.append(n)
            continue
        m = _NS_RE.match(n)
        if everything or (m is not None and not _owner_alive(int(m.group(1)), int(m.group(2)))):
            victims.append(n)
    left = remove_namespaces(victims)
    if out is not None:
        for n in victims:
            out.write(f"{'NOT removed' if n in left else 'removed'} {n}\n")
    return [n for n in victims if n not in left]


# --------------------------------------------------------------------------- router setup

def nft_ruleset(wan="wan0", lan="lan0", lan_net="192.168.77.0/24"):
    """The router's nftables ruleset. miniupnpd-nftables 2.3.1 adds its rules, by netlink, to
    chains that must already exist, with these compiled-in defaults (its config options
    upnp_table_name / upnp_nat_table_name / upnp_forward_chain / upnp_nat_chain /
    upnp_nat_postrouting_chain can rename them; 2.3.1 has no upnp_nftables_family_split):

        table inet filter   (family inet for the filter AND the nat chains)
            chain miniupnpd              accept rules for mapped ports  (from forward)
            chain prerouting_miniupnpd   dnat rules                     (from nat prerouting)
            chain postrouting_miniupnpd  snat rules ("peer" mappings)   (from nat postrouting)

    Debian ships /etc/miniupnpd/nft_init.sh to create them, but it sources
    miniupnpd_functions.sh, which the package does not ship: the scripts fail at once. So we
    load them ourselves, beside our own MASQUERADE and WAN firewall, all in that one table."""
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


def miniupnpd_config(wan="wan0", lan="lan0", lan_net="192.168.77.0/24",
                     stun_host="203.0.113.10", stun_port=3478, uuid=None, http_port=0,
                     lease_file=None, extra=()):
    """miniupnpd.conf for the lab's router. Without @lease_file a restarted miniupnpd has
    forgotten every mapping (like a home router that reboots)."""
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
        # the WAN address (198.51.100.x) is a documentation range, which miniupnpd calls
        # "reserved": without STUN it disables port forwarding altogether
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
    return "\n".join(list(lines) + list(extra)) + "\n"


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
    that handles them, like digfs_test.main, unwinds through close() instead; SIGINT is
    Python's KeyboardInterrupt, which unwinds through close() too)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) in (signal.SIG_DFL, None):
                signal.signal(s, _on_fatal_signal)


class UpnpLab:
    """The UPnP/NAT-PMP router lab. Use as a context manager (or start() / close())."""

    PUB_IP = "198.51.100.10"
    WAN_IP = "198.51.100.20"
    STUN_IP = "203.0.113.10"
    STUN_IP2 = "203.0.113.11"
    STUN_PORT = 3478
    STUN_PORT2 = 3479
    LAN_NET = "192.168.77.0/24"
    LAN_GW = "192.168.77.1"
    LAN_IP = "192.168.77.10"
    HOSTS = ("inet", "pub", "stun", "rtr", "lan")

    def __init__(self, workdir=None, reaper=True, verbose=False, clean_stale=True,
                 lease_file=False):
        """@lease_file: give miniupnpd a lease file (in the work dir), so that a restarted
        miniupnpd restores its mappings; by default it has none and a restart loses them."""
        err = unusable_reason()
        if err:
            raise LabError(err)
        if clean_stale:
            cleanup_leftovers()
        me = os.getpid()
        self.prefix = f"{PREFIX}{me}.{_proc_starttime(me)}-{random.getrandbits(32):08x}-"
        self.verbose = verbose
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="dgupnp-")
        self.conf_path = os.path.join(self.workdir, "miniupnpd.conf")
        self.pid_path = os.path.join(self.workdir, "miniupnpd.pid")
        self.log_path = os.path.join(self.workdir, "miniupnpd.log")
        self.nft_path = os.path.join(self.workdir, "router.nft")
        self.stun_log_path = os.path.join(self.workdir, "stun.log")
        self.lease_path = os.path.join(self.workdir, "miniupnpd.leases")
        self.lease_file = lease_file
        self.procs = []
        self.miniupnpd = None
        self.stun = None
        self.closed = False
        self.created = []
        self._reaper = None
        self._lock = threading.RLock()
        _labs.add(self)
        _install_handlers()
        if reaper:
            self._start_reaper()

    # ---- names
    def ns(self, host):
        if host not in self.HOSTS:
            raise LabError(f"no host {host!r} in the UPnP lab (hosts: {', '.join(self.HOSTS)})")
        return self.prefix + host

    def path(self, host):
        return os.path.join(NETNS_DIR, self.ns(host))

    def _say(self, text):
        if self.verbose:
            sys.stderr.write(f"upnp_router: {text}\n")
            sys.stderr.flush()

    # ---- running things inside
    def command(self, host, argv):
        return ["nsenter", f"--net={self.path(host)}", *argv]

    def run(self, host, argv, timeout=30, check=False, input=None):
        """Runs @argv in @host's network namespace; returns the CompletedProcess (text)."""
        r = subprocess.run(self.command(host, argv), input=input, capture_output=True,
                           text=True, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise LabError(f"{host}: {' '.join(argv)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def popen(self, host, argv, **kw):
        """Starts @argv in @host's network namespace; stopped (by pid) at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.command(host, argv), **kw)
        with self._lock:
            self.procs.append(p)
        return p

    # ---- building
    def _start_reaper(self):
        self._reaper = subprocess.Popen(
            [sys.executable, THIS, "--reap", self.prefix, self.workdir if self._own_workdir
             else ""], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)

    def _add_ns(self, host, router=False):
        name = self.ns(host)
        _sh(["ip", "netns", "add", name])
        self.created.append(name)
        sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if router:
            sysctls.append("net.ipv4.ip_forward=1")
        _sh(["nsenter", f"--net={self.path(host)}", "sysctl", "-q", "-w", *sysctls])
        _ip_batch(name, ["link set lo up"])

    def _plug(self, host, ifname, addrs, port, other_net):
        """A veth from @host (@ifname with @addrs, each /24) into the internet bridge."""
        _ip_batch(self.ns("inet"), [
            f"link add {port} type veth peer name {ifname} netns {self.ns(host)}",
            f"link set {port} master inet0",
            f"link set {port} up"])
        lines = [f"addr add {a}/24 dev {ifname}" for a in addrs]
        lines += [f"link set {ifname} up", f"route add {other_net} dev {ifname}"]
        _ip_batch(self.ns(host), lines)

    def start(self):
        try:
            self._build()
            self.start_stun()
            self._load_nft()
            self.start_miniupnpd()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self):
        for h in self.HOSTS:
            self._add_ns(h, router=(h == "rtr"))
        _ip_batch(self.ns("inet"), ["link add inet0 type bridge mcast_snooping 0",
                                    "link set inet0 up"])
        self._plug("pub", "eth0", [self.PUB_IP], "vpub", "203.0.113.0/24")
        self._plug("stun", "eth0", [self.STUN_IP, self.STUN_IP2], "vstun", "198.51.100.0/24")
        self._plug("rtr", "wan0", [self.WAN_IP], "vrtr", "203.0.113.0/24")
        # the LAN: one veth pair between the router and its host
        _ip_batch(self.ns("rtr"), [
            f"link add lan0 type veth peer name eth0 netns {self.ns('lan')}",
            f"addr add {self.LAN_GW}/24 dev lan0",
            "link set lan0 up",
            # SSDP: miniupnpd's NOTIFYs and M-SEARCH answers stay on the LAN segment
            "route add 224.0.0.0/4 dev lan0"])
        _ip_batch(self.ns("lan"), [
            f"addr add {self.LAN_IP}/24 dev eth0",
            "link set eth0 up",
            # natpmpc / libnatpmp take the gateway from the default route; the router has no
            # route beyond the lab's prefixes, so this leads nowhere else
            f"route add default via {self.LAN_GW} dev eth0",
            "route add 224.0.0.0/4 dev eth0"])
        self._check_isolation()

    def _check_isolation(self):
        """No lab namespace may have a route out of the lab except lan's default via rtr."""
        allowed = ("198.51.100.0/24", "203.0.113.0/24", "192.168.77.0/24", "224.0.0.0/4")
        for h in self.HOSTS:
            routes = self.run(h, ["ip", "-4", "route", "show"], check=True).stdout
            for line in routes.splitlines():
                dest = line.split()[0]
                if dest in allowed:
                    continue
                if h == "lan" and line.startswith(f"default via {self.LAN_GW} dev eth0"):
                    continue
                raise LabError(f"unexpected route in {h}: {line}")
        r = self.run("rtr", ["ip", "-4", "route", "get", "198.18.0.1"])
        if r.returncode == 0:
            raise LabError(f"the router can route out of the lab: {r.stdout.strip()}")

    def start_stun(self):
        log = open(self.stun_log_path, "ab")
        try:
            p = self.popen("stun", [sys.executable, STUN_SERVER, self.STUN_IP, self.STUN_IP2,
                                    "--port", str(self.STUN_PORT), "--alt-port",
                                    str(self.STUN_PORT2), "-v"],
                           stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.stun = p
        self._wait_log(self.stun_log_path, "READY", p, "the STUN responder", 15)

    def _load_nft(self):
        with open(self.nft_path, "w") as f:
            f.write(nft_ruleset(lan_net=self.LAN_NET))
        self.run("rtr", ["nft", "-f", self.nft_path], check=True)

    def write_config(self, extra=()):
        with open(self.conf_path, "w") as f:
            f.write(miniupnpd_config(lan_net=self.LAN_NET, stun_host=self.STUN_IP,
                                     stun_port=self.STUN_PORT, extra=extra,
                                     lease_file=self.lease_path if self.lease_file else None))

    def start_miniupnpd(self, extra_config=(), timeout=30):
        """Starts miniupnpd in the foreground (-d) with our config and pid file; returns once
        it has learnt its public address by STUN and enabled port forwarding."""
        if self.miniupnpd is not None and self.miniupnpd.poll() is None:
            raise LabError("miniupnpd is already running")
        self.write_config(extra_config)
        log = open(self.log_path, "ab")
        start = log.tell()
        try:
            self.miniupnpd = self.popen(
                "rtr", [MINIUPNPD, "-f", self.conf_path, "-P", self.pid_path, "-d"],
                stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        text = self._wait_log(self.log_path, re.compile(
            r"Port forwarding is now enabled|STUN: \.\.\. done|Port forwarding is now disabled|"
            r"Performing STUN failed|EXITING|Failed to init"), self.miniupnpd, "miniupnpd",
            timeout, since=start)
        if "Port forwarding is now enabled" not in text and "STUN: ... done" not in text:
            raise LabError(f"miniupnpd did not enable port forwarding; its log:\n{text}")
        # NAT-PMP and HTTP sockets are opened after STUN: wait until it answers SSDP/NAT-PMP
        self._wait_log(self.log_path, re.compile(r"HTTP listening on port \d+"),
                       self.miniupnpd, "miniupnpd's HTTP socket", timeout, since=start)
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
        self.run("rtr", ["nft", "-f", "-"], check=True, input="".join(
            f"flush chain inet filter {c}\n"
            for c in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")))

    def restart_miniupnpd(self, forget=True, **kw):
        """Stops and starts miniupnpd. forget=True is a router reboot: the chains are flushed
        in between, so every mapping is lost. forget=False is a daemon restart: the rules
        stay in nftables and the new miniupnpd lists them as its own again, but without
        their lease times (they never expire any more); without a lease file it cannot know
        them."""
        self.stop_miniupnpd()
        if forget:
            self.flush_miniupnpd_chains()
        return self.start_miniupnpd(**kw)

    def _wait_log(self, path, pattern, proc, what, timeout, since=0):
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

    # ---- looking at it
    def miniupnpd_log(self, since=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def nft_list(self):
        return self.run("rtr", ["nft", "list", "table", "inet", "filter"], check=True).stdout

    def miniupnpd_pid(self):
        try:
            with open(self.pid_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    # ---- teardown
    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.stop_miniupnpd(timeout=5)
        except (OSError, subprocess.SubprocessError):
            pass
        procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                try:
                    p.terminate()
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        remove_namespaces([n for n in self.created] + [
            n for n in lab_namespaces() if n.startswith(self.prefix)])
        if self._own_workdir and os.environ.get("DIGFS_TEST_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._reaper is not None:
            try:
                self._reaper.stdin.close()
            except OSError:
                pass
            try:
                self._reaper.wait(10)
            except subprocess.TimeoutExpired:
                pass
        _labs.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- helpers for tests

def tcp_listen_once(lab, host, port, reply=b"pong from lan\n", timeout=20):
    """Starts, in @host, a one-shot TCP server on @port: reads a line, answers @reply, exits.
    Returns the Popen; its stdout gets "READY" once listening, then the line received."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{port})); s.listen(4); s.settimeout({timeout})\n"
        "print('READY',flush=True)\n"
        "c,a=s.accept(); c.settimeout(10)\n"
        "line=c.makefile('rb').readline()\n"
        f"c.sendall({reply!r}); c.close()\n"
        "print('GOT',a[0],line.decode().strip(),flush=True)\n")
    p = lab.popen(host, [sys.executable, "-c", code], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    if first.strip() != "READY":
        raise LabError(f"TCP listener in {host} did not start: {first!r} {p.stderr.read()}")
    return p


def tcp_exchange(lab, host, addr, port, line=b"ping from pub\n", timeout=5):
    """From @host, connects to @addr:@port, sends @line, returns (ok, answer or error)."""
    code = (
        "import socket,sys\n"
        f"c=socket.create_connection(({addr!r},{port}),timeout={timeout})\n"
        f"c.sendall({line!r}); c.settimeout({timeout})\n"
        "sys.stdout.write(c.makefile('rb').readline().decode()); sys.stdout.flush()\n")
    r = lab.run(host, [sys.executable, "-c", code], timeout=timeout + 10)
    if r.returncode == 0:
        return True, r.stdout
    return False, (r.stderr.strip().splitlines() or ["?"])[-1]


# --------------------------------------------------------------------------- main

def _reap(prefix, workdir):
    """The reaper: waits until stdin closes (the owner's close() or death), then removes
    whatever is left of the lab."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    cleanup_leftovers(prefix=prefix)
    if workdir and os.path.isdir(workdir) and os.environ.get("DIGFS_TEST_KEEP") != "1":
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _demo(lab):
    """What Debian's own clients say about the router (printed)."""
    def show(host, argv):
        r = lab.run(host, argv, timeout=30)
        print(f"--- {host}$ {' '.join(argv)}  (exit {r.returncode})")
        print((r.stdout + r.stderr).rstrip())
    show("lan", ["natpmpc"])
    # libminiupnpc 2.2.4 calls this gateway "not connected" (reserved external address):
    # upnpc gives up without -i
    show("lan", ["upnpc", "-s"])
    show("lan", ["natpmpc", "-a", "40000", "40000", "tcp", "60"])
    show("lan", ["upnpc", "-i", "-e", "digfs lab", "-a", lab.LAN_IP, "40001", "40001", "TCP",
                 "60"])
    show("lan", ["upnpc", "-i", "-l"])
    show("rtr", ["nft", "list", "table", "inet", "filter"])
    show("lan", ["upnpc", "-i", "-d", "40001", "TCP"])
    show("lan", ["natpmpc", "-a", "40000", "40000", "tcp", "0"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="the digfs UPnP / NAT-PMP router lab")
    ap.add_argument("--hold", action="store_true", help="keep the lab until Ctrl-C")
    ap.add_argument("--cleanup", action="store_true", help="remove leftovers of dead owners")
    ap.add_argument("--all", action="store_true", help="with --cleanup: every UPnP lab")
    ap.add_argument("--install", action="store_true", help="apt-get install what is missing")
    ap.add_argument("--reap", nargs=2, metavar=("PREFIX", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.reap:
        return _reap(*args.reap)
    if args.cleanup:
        cleanup_leftovers(everything=args.all, out=sys.stdout)
        return 0
    if args.install:
        err = ensure_packages(log=print)
        if err:
            print(err)
            return 1
    with UpnpLab(verbose=args.verbose) as lab:
        print(f"namespaces: {lab.prefix}{{{','.join(lab.HOSTS)}}}; work dir {lab.workdir}")
        if args.hold:
            print(f"enter with: nsenter --net={lab.path('lan')} sh   (Ctrl-C ends the lab)")
            try:
                while lab.miniupnpd.poll() is None:
                    time.sleep(1)
                print(f"miniupnpd exited ({lab.miniupnpd.returncode})")
            except KeyboardInterrupt:
                pass
        else:
            _demo(lab)
        print("--- miniupnpd log")
        print(lab.miniupnpd_log().rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
