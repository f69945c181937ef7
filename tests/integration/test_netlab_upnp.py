"""The lab's UPnP / NAT-PMP router (`Lab.router(name, kind="upnp")` in tests/netlab/netlab.py,
see tests/netlab/UPNP.md), proven with Debian's own clients before digfs relies on it: Debian
12's miniupnpd-nftables 2.3.1 in a network namespace, learning its public (documentation-range)
address from the lab's STUN responder, with natpmpc (libnatpmp) and upnpc (libminiupnpc 2.2.4)
on a LAN host behind it, and a public host connecting through the mapped ports; then digfs
mapping its own port with each protocol.

Everything runs in namespaces the lab creates (no route out of the lab; the LAN host's default
route ends at the router, which has none). Needs root, iproute2, nsenter, iptables, nftables,
miniupnpd-nftables, miniupnpc and natpmpc: missing packages are installed with apt-get when
possible (not with DIGFS_SKIP_INSTALL=1), otherwise every test is skipped.
"""

import atexit
import ctypes.util
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "netlab"))
import digfs_test as T  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402
import netlab  # noqa: E402

LAN_NET = "192.168.77.0/24"
_lab = None
_skip = None


def lab():
    """The one lab of this file, built on first use: a public host "pub", a upnp router "rtr"
    (LAN 192.168.77.0/24, miniupnpd running) with one host "lan" behind it, and the STUN
    responder the lab starts for the router. Torn down by the last test, or at exit, or on a
    signal through digfs_test's handlers and atexit."""
    global _lab, _skip
    if _skip is not None:
        raise T.SkipTest(_skip)
    if _lab is not None:
        rtr = _lab["rtr"]
        if rtr.miniupnpd is None or rtr.miniupnpd.poll() is not None:
            T.fail(f"miniupnpd died:\n{rtr.miniupnpd_log()[-3000:]}")
        return _lab
    if os.geteuid() != 0:
        _skip = "needs root (network namespaces, nftables)"
        raise T.SkipTest(_skip)
    err = netlab.ensure_packages("upnp")
    if err is None:
        err = netlab.unusable_reason("upnp")
    if err is not None:
        _skip = err
        raise T.SkipTest(_skip)
    L = netlab.Lab()
    try:
        L.public("pub")
        L.behind(L.router("rtr", kind="upnp", lan=LAN_NET), "lan")
        L.check_isolation()
    except BaseException:
        L.close()
        raise
    _lab = L
    return L


def _close_lab():
    if _lab is not None:
        _lab.close()


atexit.register(_close_lab)


def hosts():
    """(lab, pub, rtr, lan)."""
    L = lab()
    return L, L["pub"], L["rtr"], L["lan"]


def natpmpc(*args):
    L = lab()
    r = L.run(L["lan"], ["natpmpc", *args], timeout=30)
    return r.returncode, r.stdout + r.stderr


def upnpc(*args):
    L = lab()
    r = L.run(L["lan"], ["upnpc", *args], timeout=30)
    return r.returncode, r.stdout + r.stderr


def reaches_lan(port, expect=True):
    """pub connects to the router's WAN address:@port; with @expect the LAN host's TCP server
    there must answer, telling the address it sees (pub's own: no SNAT on the way in);
    without, the connection must fail although the LAN host listens."""
    L, pub, rtr, lan = hosts()
    srv = L.start_tool(lan, "tcp-echo", port)
    try:
        r = L.tool(pub, "tcp-connect", rtr.addr, port, 4)
        if expect:
            check(r["ok"], f"pub could not reach {rtr.addr}:{port}: {r['error']}",
                  rtr.nft_list(), rtr.miniupnpd_log()[-2000:])
            check_eq(r["seen"], [pub.addr, r["local"]],
                     "what the LAN host saw of pub's connection through the mapping")
        else:
            check(not r["ok"], f"pub reached {rtr.addr}:{port} although no mapping exists ({r})",
                  rtr.nft_list())
    finally:
        srv.kill()
        srv.communicate()


def mapped_ports():
    """External ports of the router's port mappings (miniupnpd's DNAT rules in nftables)."""
    return {ext for _, ext, _, _ in lab()["rtr"].mappings()}


# --------------------------------------------------------------------------- tests

def test_router_learnt_public_address_by_stun():
    """miniupnpd's WAN address is in a documentation range, which it treats as reserved; it
    enables port forwarding only after STUN (all four RFC 5780 probes answered) says the WAN
    is unfiltered. natpmpc then reports that address as the public one."""
    L, pub, rtr, lan = hosts()
    log = rtr.miniupnpd_log()
    check("Port forwarding is now enabled" in log, "miniupnpd enabled port forwarding",
          log[-3000:])
    check(f"is now behind unrestricted full-cone NAT 1:1 with public IP address {rtr.addr}"
          in log, "miniupnpd learnt its address by STUN (and found the WAN unfiltered)",
          log[-3000:])
    check(rtr.stun is L.stun and L.stun.name == "stun" and len(L.stun.addrs) == 2,
          "the lab started its STUN responder, with two addresses, for the router", L.stun)
    with open(L.stun.log_path) as f:
        stun = f.read()
    for change in ("0x0", "0x2", "0x4", "0x6"):
        check(f"request from {rtr.addr}:" in stun and f"change={change}" in stun,
              f"the STUN responder got a request from the router with CHANGE-REQUEST {change}",
              stun)
    rc, out = natpmpc()
    check_eq(rc, 0, f"natpmpc exit status ({out})")
    check(f"Public IP address : {rtr.addr}" in out, "natpmpc's public address", out)
    check_eq(rtr.miniupnpd_pid(), rtr.miniupnpd.pid, "pid in miniupnpd's own pid file")
    check(rtr.pid_path.startswith(L.workdir + os.sep) and os.path.exists(rtr.conf_path),
          "miniupnpd's config and pid file are the router's own, in the lab's work dir",
          rtr.pid_path)


def test_natpmp_mapping_reaches_lan_host():
    """natpmpc -a maps WAN:40000 to lan:40000; pub exchanges a line with lan through it;
    deleting the mapping (lifetime 0) closes the port again."""
    L, pub, rtr, lan = hosts()
    reaches_lan(40000, expect=False)
    rc, out = natpmpc("-a", "40000", "40000", "tcp", "3600")
    check_eq(rc, 0, f"natpmpc -a exit status ({out})")
    check("Mapped public port 40000 protocol TCP to local port 40000" in out,
          "natpmpc got the mapping", out)
    check(("tcp", 40000, lan.addr, 40000) in rtr.mappings(), "miniupnpd's DNAT rule for 40000",
          rtr.mappings(), rtr.nft_list())
    reaches_lan(40000)
    rc, out = natpmpc("-a", "40000", "40000", "tcp", "0")
    check_eq(rc, 0, f"natpmpc delete exit status ({out})")
    check(40000 not in mapped_ports(), "the DNAT rule is gone after the delete", rtr.nft_list())
    reaches_lan(40000, expect=False)


def test_upnp_igd_mapping_reaches_lan_host():
    """upnpc (libminiupnpc 2.2.4) finds the router but calls it "not connected" (its
    UPNP_GetValidIGD returns 2 because the router's external address, in 203.0.113.0/24, is
    "reserved" to it); without -i upnpc refuses to go on, with -i the mapping works: pub
    reaches lan through WAN:40001, and upnpc -d removes it."""
    L, pub, rtr, lan = hosts()
    rc, out = upnpc("-s")
    check("Found a (not connected?) IGD" in out, "libminiupnpc 2.2.4 verdict on the lab's "
          "gateway (if this changed, update UPNP.md and digfs's port-mapping code)", out)
    check(rc != 0 and "No valid UPNP Internet Gateway Device found" in out,
          "upnpc without -i gives up on a 'not connected' IGD", out)

    rc, out = upnpc("-i", "-e", "digfs netlab", "-a", lan.addr, "40001", "40001", "TCP",
                    "3600")
    check_eq(rc, 0, f"upnpc -i -a exit status ({out})")
    check(f"ExternalIPAddress = {rtr.addr}" in out, "upnpc's external address", out)
    check(f"external {rtr.addr}:40001 TCP is redirected to internal {lan.addr}:40001" in out,
          "upnpc confirms the mapping", out)
    rc, out = upnpc("-i", "-l")
    check(f"TCP 40001->{lan.addr}:40001 'digfs netlab'" in out, "upnpc -l lists it", out)
    check(("tcp", 40001, lan.addr, 40001) in rtr.mappings(), "miniupnpd's DNAT rule for 40001",
          rtr.mappings(), rtr.nft_list())
    reaches_lan(40001)

    # secure_mode: a LAN host may not map a port to another host
    rc, out = upnpc("-i", "-a", "192.168.77.99", "40005", "40005", "TCP")
    check(rc != 0 or "is redirected" not in out, "secure_mode refuses a third-party mapping",
          out)
    check(40005 not in mapped_ports(), "no rule for the refused mapping", rtr.nft_list())

    rc, out = upnpc("-i", "-d", "40001", "TCP")
    check_eq(rc, 0, f"upnpc -i -d exit status ({out})")
    check("UPNP_DeletePortMapping() returned : 0" in out, "upnpc deleted the mapping", out)
    check(40001 not in mapped_ports(), "the DNAT rule is gone after the delete", rtr.nft_list())
    reaches_lan(40001, expect=False)


_PROBE = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.upnpDiscover.restype = ctypes.c_void_p
lib.upnpDiscover.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                             ctypes.c_int, ctypes.c_ubyte, ctypes.POINTER(ctypes.c_int)]
lib.UPNP_GetValidIGD.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_char_p, ctypes.c_int]
lib.addr_is_reserved.argtypes = [ctypes.c_char_p]
err = ctypes.c_int(0)
devs = lib.upnpDiscover(2000, None, None, 0, 0, 2, ctypes.byref(err))
urls = ctypes.create_string_buffer(256)       # struct UPNPUrls: 5 pointers
data = ctypes.create_string_buffer(1 << 16)   # struct IGDdatas (about 3.5 KiB in API 17)
lan = ctypes.create_string_buffer(64)
r = lib.UPNP_GetValidIGD(devs, urls, data, lan, 64)
ctl = ctypes.cast(ctypes.c_void_p.from_buffer(urls, 0).value, ctypes.c_char_p).value
print("devices", bool(devs), "error", err.value)
print("GetValidIGD", r, "lanaddr", lan.value.decode(), "controlURL", (ctl or b"").decode())
print("reserved", lib.addr_is_reserved(sys.argv[2].encode()))
if r:
    lib.FreeUPNPUrls(urls)
if devs:
    lib.freeUPNPDevlist(ctypes.c_void_p(devs))
"""


def test_libminiupnpc_calls_the_gateway_not_connected():
    """What digfs's C code will see from libminiupnpc 2.2.4 (API 17) in this lab:
    UPNP_GetValidIGD() == 2 ("valid IGD, not connected"), with urls and lanaddr filled in,
    because its addr_is_reserved() is true for the external address the router reports."""
    L, pub, rtr, lan = hosts()
    so = "libminiupnpc.so.17"
    if not os.path.exists(f"/usr/lib/x86_64-linux-gnu/{so}") and not ctypes.util.find_library(
            "miniupnpc"):
        raise T.SkipTest("libminiupnpc17 not installed")
    r = L.run(lan, [sys.executable, "-c", _PROBE, so, rtr.addr], timeout=30)
    check_eq(r.returncode, 0, f"libminiupnpc probe exit status ({r.stderr})")
    out = r.stdout
    check(f"GetValidIGD 2 lanaddr {lan.addr} controlURL http://{rtr.gateway}:" in out,
          "UPNP_GetValidIGD returns 2 with lanaddr and the control URL set", out)
    check("reserved 1" in out, f"libminiupnpc's addr_is_reserved({rtr.addr})", out)


def _epoch():
    rc, out = natpmpc()
    check_eq(rc, 0, f"natpmpc exit status ({out})")
    return int(out.split("epoch = ", 1)[1].split()[0])


def test_miniupnpd_restart():
    """A daemon restart (SIGTERM, start again) leaves miniupnpd's rules in nftables: the
    mapping still works, and the new daemon lists it again, but with lease time 0 (it has
    no lease file: the expiry is lost). A router reboot (restart with the chains flushed)
    loses every mapping; the NAT-PMP epoch starts again from 0 (what a client must watch,
    RFC 6886 section 3.6) and new mappings work."""
    L, pub, rtr, lan = hosts()
    rc, out = upnpc("-i", "-e", "before restart", "-a", lan.addr, "40002", "40002", "TCP",
                    "3600")
    check_eq(rc, 0, f"upnpc -i -a exit status ({out})")
    time.sleep(1.5)
    before = _epoch()
    old_pid = rtr.miniupnpd.pid
    rtr.restart_miniupnpd(forget=False)
    check(rtr.miniupnpd.pid != old_pid and rtr.miniupnpd_pid() == rtr.miniupnpd.pid,
          "a new miniupnpd runs, with its pid in the router's pid file")
    after = _epoch()
    check(after < before, f"NAT-PMP epoch went back after the restart ({before} -> {after})")
    check(("tcp", 40002, lan.addr, 40002) in rtr.mappings(), "the rule survives a daemon "
          "restart", rtr.nft_list())
    rc, out = upnpc("-i", "-l")
    check(f"TCP 40002->{lan.addr}:40002 'before restart' '' 0" in out,
          "the restarted daemon lists the old rule, with lease time 0", out)
    reaches_lan(40002)

    rtr.restart_miniupnpd(forget=True)
    check_eq(rtr.mappings(), [], "mappings left after a reboot")
    reaches_lan(40002, expect=False)
    rc, out = natpmpc("-a", "40003", "40003", "tcp", "3600")
    check_eq(rc, 0, f"natpmpc -a after the reboot ({out})")
    reaches_lan(40003)
    natpmpc("-a", "40003", "40003", "tcp", "0")


# --------------------------------------------------------------------------- digfs itself

class LabMount(T.Mount):
    """A digfs mount whose process runs in a lab host's network namespace (nsenter keeps the
    mount namespace, so its FUSE mount is visible here)."""

    def __init__(self, host, tag, opts):
        self.host = host
        super().__init__(tag, opts=opts)

    def command(self, *args, **kw):
        return lab().cmd(self.host, super().command(*args, **kw))


def _portmap(m):
    return T.status_json(m)["network"]["portmap"]


def _digfs_maps_and_serves(method_opts, method, port):
    """A digfs node on the LAN host maps its port with @method; a digfs node on the public host,
    given only the router's public address and that port, reads a file the LAN node shares;
    after a clean unmount the mapping is gone."""
    L, pub_host, rtr, lan_host = hosts()
    wan = rtr.addr
    lan = LabMount(lan_host, f"pm-lan-{method}", [f"port={port}", *method_opts])
    st = T.wait_until(lambda: (_portmap(lan) or {}).get("mapped") and _portmap(lan),
                      f"digfs on the LAN host to map its port with {method}", timeout=60,
                      interval=0.5)
    check_eq(st["method"], method, "mapping method")
    check_eq(st["external_ip"], wan, "public address the router reported")
    check_eq((st["tcp"], st["udp"]), (port, port), "mapped external ports")
    got = rtr.mappings()
    check(("tcp", port, lan_host.addr, port) in got and ("udp", port, lan_host.addr, port) in got,
          f"the router maps TCP and UDP {port} to the LAN host", got)
    human = subprocess.run([T.BIN, "status", lan.mnt], capture_output=True, text=True,
                           timeout=60).stdout
    check(f"{method}: mapped to {wan}:{port}" in human, "digfs status shows the mapping", human)
    data = T.data_of(2 * T.LEAF * 64 + 11, 500 + port % 100)
    root = T.share(lan, "behind-nat.bin", data)
    pub = LabMount(pub_host, f"pm-pub-{method}", [f"peers={wan}:{port}", "lookup_timeout=30"])
    T.check_bytes(T.read_file(pub.by_hash(root)), data,
                  "a public node reading from the node behind the NAT through the mapping")
    pub.unmount()
    lan.unmount()
    T.wait_until(lambda: port not in mapped_ports(), "the mapping to be removed at unmount",
                 timeout=30)


def test_digfs_maps_its_port_with_natpmp():
    """digfs behind the router maps its TCP and UDP port with NAT-PMP (upnp=no), learns the
    public address, is reached from outside, and removes the mapping on a clean exit."""
    _digfs_maps_and_serves(["natpmp=yes", "upnp=no"], "NAT-PMP", 41000)


def test_digfs_maps_its_port_with_upnp():
    """The same with UPnP IGD (natpmp=no): libminiupnpc 2.2.4 calls this router 'not
    connected' (its public address is in a documentation range); digfs uses it anyway."""
    _digfs_maps_and_serves(["natpmp=no", "upnp=yes"], "UPnP", 41001)


def test_teardown_leaves_nothing():
    """close() stops miniupnpd and the STUN responder, removes every namespace and the work
    directory (miniupnpd's config, pid, log; the STUN log)."""
    global _lab
    L, pub, rtr, lan = hosts()
    pids = [p.pid for p in L.procs] + [rtr.miniupnpd_pid() or 0]
    names = L.namespaces()
    check(len(names) == 5 and L.stun.ns in names, "inet, pub, stun, rtr, lan", names)
    L.close()
    _lab = None
    left = [n for n in names if os.path.exists(os.path.join(netlab.NETNS_DIR, n))]
    check(not left, "namespaces removed", left)
    alive = [p for p in pids if p and netlab._alive(p)]
    check(not alive, "lab processes stopped", alive)
    check(not os.path.exists(L.workdir), "the lab's work directory removed", L.workdir)
    check(not netlab.miniupnpd_outside_lab(), "no miniupnpd runs outside a lab",
          subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout)


T.main()
