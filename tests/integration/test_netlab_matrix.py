"""The NAT traversal matrix (issue 4): for every ordered pair of host kinds in the network lab,
B reads by hash, through its FUSE mount, a file shared by A. Kinds: a public host, a host
behind an easy NAT (endpoint-independent mapping), behind a hard NAT (a new port per
destination), behind a router with UPnP IGD and NAT-PMP (miniupnpd), and two hosts behind the
same NAT. Three digfs nodes on public hosts are the DHT (bootstrap nodes, rendezvous and
relays); nobody else holds the files.

The test prints a table: pair, how the connection was made (direct, mapped, punched, relayed,
LAN), the NAT classes digfs worked out, and the time to the first byte. It fails on any pair
that did not read the file byte-exact, on a NAT class that is wrong, and on a relay used
between anything but two hard NATs.

Then the failure cases of the issue: idle connections across NATs whose UDP mappings expire
quickly (keep-alives must hold them), and a NAT that forgets every mapping under a reader (the
connection is made again and the reader sees no error).

Needs root, namespaces, iptables and miniupnpd-nftables; skipped (exit 77) otherwise.
"""

import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "netlab"))
import digfs_test as T  # noqa: E402
import netlab  # noqa: E402
from digfs_test import check, check_eq  # noqa: E402
from test_netlab import LabMount  # noqa: E402

PORT = 6881
KINDS = ["public", "easy", "hard", "upnp"]
FILE_SIZE = 2 * (1 << 20) + 4321
RESULTS = os.environ.get("DIGFS_MATRIX_RESULTS")  # where to write the table (optional)

_reason = []


def lab():
    if not _reason:
        _reason.append(netlab.unusable_reason() or netlab.upnp_unusable_reason())
    if _reason[0]:
        raise T.SkipTest(_reason[0])
    return netlab.Lab()


class World:
    """The lab with its digfs nodes: three public DHT nodes, two hosts of each kind ("<kind>-a"
    shares, "<kind>-b" reads) and two hosts behind one NAT."""

    def __init__(self, L):
        self.L = L
        self.mounts = []
        self.hosts = {}
        self.kind_of = {}
        dht = [L.public(f"dht{i}") for i in range(3)]
        self.dht_hosts = dht
        for kind in KINDS:
            for side in "ab":
                name = f"{kind}-{side}"
                if kind == "public":
                    h = L.public(name)
                else:
                    r = L.router(f"{name}-r", kind=kind)
                    h = L.behind(r, name)
                self.hosts[name] = h
                self.kind_of[name] = kind
        home = L.router("home-r", kind="easy")
        for side in "ab":
            name = f"lan-{side}"
            self.hosts[name] = L.behind(home, name)
            self.kind_of[name] = "same-nat"
        boot = "+".join(f"{h.addr}:{PORT}" for h in dht)
        common = [f"port={PORT}", "lookup_timeout=40", "read_timeout=60", "announce_cached=no"]
        self.dht = []
        for i, h in enumerate(dht):
            others = "+".join(f"{o.addr}:{PORT}" for o in dht if o is not h)
            self.dht.append(self.mount(h, f"mx-dht{i}", [f"bootstrap={others}", *common]))
        self.m = {}
        for name, h in self.hosts.items():
            kind = self.kind_of[name]
            opts = [f"bootstrap={boot}", *common]
            if kind == "upnp":
                opts += ["upnp=yes", "natpmp=yes"]
            if kind == "same-nat":
                opts += ["lsd=yes"]
            self.m[name] = self.mount(h, f"mx-{name}", opts)

    def mount(self, host, tag, opts):
        m = LabMount(self.L, host, tag, opts)
        self.mounts.append(m)
        return m

    def close(self):
        for m in self.mounts:
            m.cleanup()

    def nat_class(self, name):
        nat = T.status_json(self.m[name])["network"].get("nat") or {}
        return nat.get("class")

    def wait_classified(self):
        """Every node behind a NAT knows its class, and the UPnP hosts have their mapping."""
        want = {"public": "none", "easy": "easy", "hard": "hard", "upnp": "none",
                "same-nat": "easy"}
        for name in self.m:
            T.wait_until(lambda: self.nat_class(name) == want[self.kind_of[name]],
                         f"{name} to classify its NAT as {want[self.kind_of[name]]} "
                         f"(status: {T.status_json(self.m[name])['network'].get('nat')})",
                         timeout=90, interval=0.5)


def _first_byte_and_all(path, size, timeout):
    """(seconds to the first 64 KiB, the whole content) of @path, read in a thread so that a
    hang fails the test instead of blocking it."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            with open(path, "rb") as f:
                first = f.read(65536)
                out["ttfb"] = time.monotonic() - t0
                rest = f.read()
            out["data"] = first + rest
        except OSError as e:
            out["error"] = e
        out["total"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        T.fail(f"reading {path} still blocked after {timeout} s")
    if "error" in out:
        T.fail(f"reading {path}: {out['error']}")
    check_eq(len(out["data"]), size, f"bytes read from {path}")
    return out


def _method(swarm, kind_a, kind_b):
    by = swarm.get("peers_by") or {}
    if by.get("relayed"):
        return "relayed"
    if by.get("punched"):
        return "punched"
    if kind_a == "same-nat" and kind_b == "same-nat":
        return "LAN"
    if by.get("tcp") or by.get("utp"):
        return "mapped" if kind_a == "upnp" else "direct"
    return "failed"


def test_matrix():
    with lab() as L:
        w = World(L)
        try:
            w.wait_classified()
            pairs = [(f"{a}-a", f"{b}-b") for a in KINDS for b in KINDS]
            pairs += [("lan-a", "lan-b"), ("lan-b", "lan-a")]
            files = {}
            for i, (a, b) in enumerate(pairs):
                data = T.data_of(FILE_SIZE, 7000 + i)
                files[(a, b)] = (T.share(w.m[a], f"for-{b}.bin", data), data)
            rows, failures = [], []
            for a, b in pairs:
                root, data = files[(a, b)]
                ka, kb = w.kind_of[a], w.kind_of[b]
                try:
                    got = _first_byte_and_all(w.m[b].by_hash(root), len(data), 150)
                    T.check_bytes(got["data"], data, f"{b} reading {a}'s file")
                    how = _method(T.swarm_of(w.m[b], root), ka, kb)
                    rows.append((ka, kb, how, f"{got['ttfb']:.2f}", f"{got['total']:.2f}"))
                    if how == "relayed" and not (ka == "hard" and kb == "hard"):
                        failures.append(f"{ka} -> {kb} used a relay")
                    if how == "failed":
                        failures.append(f"{ka} -> {kb}: no peer connection recorded")
                except T.TestFailure as e:
                    rows.append((ka, kb, "failed", "-", "-"))
                    failures.append(f"{ka} -> {kb}: {e}")
            classes = {n: w.nat_class(n) for n in w.m}
            table = ["| A (shares) | B (reads) | connection | first byte (s) | 2 MiB read (s) |",
                     "| --- | --- | --- | ---: | ---: |"]
            table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows]
            text = "\n".join(table)
            print("\n" + text)
            print("NAT classes: " + ", ".join(f"{n}={c}" for n, c in sorted(classes.items())))
            if RESULTS:
                with open(RESULTS, "w") as f:
                    f.write(text + "\n")
            ok = sum(1 for r in rows if r[2] != "failed")
            print(f"{ok} of {len(rows)} pairs read the file")
            check(not failures, "every pair reads its file, a relay only between hard NATs",
                  failures)
        finally:
            w.close()


def _small_world(L, kinds, extra=()):
    """Three public DHT nodes and one host of each kind in @kinds ({name: kind}), with digfs."""
    dht = [L.public(f"dht{i}") for i in range(3)]
    hosts = {}
    for name, kind in kinds.items():
        if kind == "public":
            hosts[name] = L.public(name)
        else:
            r = L.router(f"{name}-r", kind=kind)
            hosts[name] = L.behind(r, name)
    boot = "+".join(f"{h.addr}:{PORT}" for h in dht)
    common = [f"port={PORT}", "lookup_timeout=40", "read_timeout=90", "announce_cached=no",
              *extra]
    mounts, m = [], {}
    for i, h in enumerate(dht):
        others = "+".join(f"{o.addr}:{PORT}" for o in dht if o is not h)
        mounts.append(LabMount(L, h, f"fx-dht{i}", [f"bootstrap={others}", *common]))
    for name, h in hosts.items():
        opts = [f"bootstrap={boot}", *common]
        if kinds[name] == "upnp":
            opts += ["upnp=yes", "natpmp=yes"]
        m[name] = LabMount(L, h, f"fx-{name}", opts)
        mounts.append(m[name])
    return hosts, m, mounts


def _punched_peers(m, root):
    by = T.swarm_of(m, root).get("peers_by") or {}
    return by.get("punched", 0)


def test_idle_connection_survives_short_nat_timeouts():
    """Both NATs forget idle UDP mappings after 20 s (conntrack timeouts; Linux defaults are
    30 s and 120 s). B reads the first MiB of A's 64 MiB file over a punched hole, stays idle
    for 50 s, then reads 4 MiB at 48 MiB (not fetched yet). Keep-alives (uTP's every 15 s, and
    the DHT's on the same port) held both NAT mappings open: they are still in the routers'
    conntrack tables after the idle time, and the read needs no new connection."""
    with lab() as L:
        hosts, m, mounts = _small_world(L, {"a": "easy", "b": "easy"})
        try:
            for h in hosts.values():
                L.conntrack_timeouts(h.router, udp=20, udp_stream=20)
            data = T.data_of(64 * (1 << 20) + 99, 8101)
            root = T.share(m["a"], "idle.bin", data)
            T.wait_until(lambda: all((T.status_json(x)["network"].get("nat") or {})
                                     .get("class") == "easy" for x in m.values()),
                         "both NATs classified easy", timeout=90, interval=0.5)
            first = T.read_range(m["b"].by_hash(root), 0, 1 << 20)
            T.check_bytes(first, data[:1 << 20], "the first MiB")
            check(_punched_peers(m["b"], root) == 1, "B reads over a punched hole",
                  T.swarm_of(m["b"], root))
            asked = T.status_json(m["b"])["network"]["nat"]["holepunch"]["asked"]
            time.sleep(50)
            # The hole is still there: each router still maps its host's UDP port towards the
            # other router (idle for 50 s, it would have expired after 20).
            for me, other in (("a", "b"), ("b", "a")):
                live = [e for e in L.conntrack_entries(hosts[me].router, "udp")
                        if e.orig_src == (hosts[me].addr, PORT) and
                        e.orig_dst[0] == hosts[other].router.addr]
                check(live, f"{me}'s router still maps its port towards {other}'s router",
                      L.conntrack_entries(hosts[me].router, "udp"))
            held = T.swarm_of(m["b"], root).get("blocks_held", 0)
            t0 = time.monotonic()
            off = 48 * (1 << 20)
            later = T.read_range(m["b"].by_hash(root), off, 4 * (1 << 20))
            T.check_bytes(later, data[off:off + 4 * (1 << 20)], "4 MiB at 48 MiB after 50 s idle")
            again = T.status_json(m["b"])["network"]["nat"]["holepunch"]["asked"] - asked
            print(f"    after 50 s idle behind 20 s NAT timeouts ({held} blocks held): 4 MiB at "
                  f"48 MiB read in {time.monotonic() - t0:.2f} s; holes asked again: {again}")
            check(held < (48 << 20) // 16384, "the range read after the idle time was not "
                  "fetched before it", held)
            check_eq(again, 0, "new hole punching needed after the idle time")
            check_eq(T.status_json(m["b"])["network"]["stalled"], 0,
                     "connections dropped for silence")
        finally:
            for x in mounts:
                x.cleanup()


def test_nat_forgets_mappings_under_a_reader():
    """B, behind a hard NAT, reads from A (easy NAT) through a punched hole; then B's router
    forgets every mapping at once (conntrack flushed, as after a reboot): B's packets now leave
    from new ports that A's NAT does not let in. B reads further on (a range not fetched yet):
    the dead connection is dropped (nothing heard while blocks are owed), a new hole is punched
    through the rendezvous, and the read completes, byte-exact, with no error."""
    with lab() as L:
        hosts, m, mounts = _small_world(L, {"a": "easy", "b": "hard"})
        try:
            data = T.data_of(64 * (1 << 20) + 5, 8102)
            root = T.share(m["a"], "flush.bin", data)
            T.wait_until(lambda: (T.status_json(m["b"])["network"].get("nat") or {})
                         .get("class") == "hard", "B's NAT classified hard", timeout=90,
                         interval=0.5)
            first = T.read_range(m["b"].by_hash(root), 0, 1 << 20)
            T.check_bytes(first, data[:1 << 20], "the first MiB")
            check(_punched_peers(m["b"], root) == 1, "B reads over a punched hole",
                  T.swarm_of(m["b"], root))
            asked = T.status_json(m["b"])["network"]["nat"]["holepunch"]["asked"]
            L.flush_conntrack(hosts["b"].router)
            t0 = time.monotonic()
            off = 48 * (1 << 20)
            later = T.read_range(m["b"].by_hash(root), off, 4 * (1 << 20))
            T.check_bytes(later, data[off:off + 4 * (1 << 20)],
                          "4 MiB at 48 MiB after B's NAT forgot everything")
            again = T.status_json(m["b"])["network"]["nat"]["holepunch"]["asked"] - asked
            print(f"    B's NAT flushed: 4 MiB further on read in {time.monotonic() - t0:.1f} s; "
                  f"holes asked again: {again}")
            check(again >= 1, "a new hole was punched", again)
            check(T.status_json(m["b"])["network"]["stalled"] >= 1,
                  "B dropped the silent connection (nothing heard while blocks were owed)",
                  T.status_json(m["b"])["network"])
            check(T.status_json(m["a"])["network"]["replaced"] >= 1,
                  "A let B's new connection replace the silent old one",
                  T.status_json(m["a"])["network"])
        finally:
            for x in mounts:
                x.cleanup()


def test_router_restart_loses_mapping():
    """A behind a UPnP/NAT-PMP router has its port mapped. The router restarts and forgets
    every mapping (miniupnpd restarted, chains flushed). digfs notices (the router's NAT-PMP
    restart announcement, RFC 6886 3.2.1) and maps the port again; a public node then reads
    a new file from A over the mapped port. Then the host gets another address (the network
    changed): digfs notices within its 10 s look at the interfaces and asks again."""
    with lab() as L:
        hosts, m, mounts = _small_world(L, {"a": "upnp", "p": "public"})
        r = hosts["a"].router
        try:
            def mapped():
                return [x for x in r.mappings() if x[1] == PORT]
            T.wait_until(lambda: len(mapped()) == 2, "A's TCP and UDP port mapped",
                         timeout=60, interval=0.5)
            log_at = len(m["a"].log_text())
            t0 = time.monotonic()
            r.restart_miniupnpd(forget=True)  # the chains are flushed before it starts again
            T.wait_until(lambda: len(mapped()) == 2, "A's port mapped again", timeout=60,
                         interval=0.2)
            print(f"    mapped again {time.monotonic() - t0:.1f} s after the router restart "
                  f"began")
            check("the router announced a restart" in m["a"].log_text(log_at),
                  "digfs mapped again because of the router's announcement",
                  m["a"].log_text(log_at)[-2000:])
            data = T.data_of(1 << 20, 8103)
            root = T.share(m["a"], "after-restart.bin", data)
            got = _first_byte_and_all(m["p"].by_hash(root), len(data), 120)
            T.check_bytes(got["data"], data, "P reads A's file after the restart")
            by = T.swarm_of(m["p"], root).get("peers_by") or {}
            check(by.get("tcp", 0) >= 1 and not by.get("punched") and not by.get("relayed"),
                  "P reached A directly, through the mapping", by)
            # The network changes (the host gets another address): digfs asks again.
            log_at = len(m["a"].log_text())
            spare = str(r.lan.network_address + 200)
            L.run(hosts["a"], ["ip", "addr", "add", f"{spare}/{r.lan.prefixlen}", "dev", "eth0"],
                  check=True)
            T.wait_until(lambda: "the network changed" in m["a"].log_text(log_at),
                         "digfs to notice the new address and map again", timeout=40,
                         interval=0.5)
            T.wait_until(lambda: len(mapped()) == 2, "the mapping after the change", timeout=30,
                         interval=0.5)
        finally:
            for x in mounts:
                x.cleanup()


def test_punch_through_a_peer():
    """Hole punching through a peer connected to both (docs/PROTOCOL.md 3.9, in the spirit of
    BEP 55), with no DHT on the reader's side. A (easy NAT) shares a 64 MiB file; P (public)
    reads its first MiB through the DHT, so P is connected to A. B (another easy NAT) has no
    DHT at all (bootstrap=none), only P's address (peers=). B reads the first MiB from P, and
    P's pex names A; B cannot reach A directly, so it asks P, which sends both a holepunch
    connect: B ends up with a uTP connection to A over a punched hole, and reads from it. Both
    peers tell B (hello yourip) that they see it at its router's address."""
    with lab() as L:
        hosts, m, mounts = _small_world(L, {"a": "easy", "p": "public"})
        rb = L.router("b-r", kind="easy")
        hb = L.behind(rb, "b")
        try:
            b = LabMount(L, hb, "fx-b", [f"port={PORT}", "bootstrap=none",
                                         f"peers={hosts['p'].addr}:{PORT}", "read_timeout=90",
                                         "lookup_timeout=40", "announce_cached=no"])
            mounts.append(b)
            data = T.data_of(64 * (1 << 20) + 77, 8104)
            root = T.share(m["a"], "via-peer.bin", data)
            T.check_bytes(T.read_range(m["p"].by_hash(root), 0, 1 << 20), data[:1 << 20],
                          "P reads A's first MiB")
            T.check_bytes(T.read_range(b.by_hash(root), 0, 1 << 20), data[:1 << 20],
                          "B reads the first MiB (from P)")
            T.wait_until(lambda: _punched_peers(b, root) >= 1,
                         "B to reach A over a hole punched through P", timeout=60, interval=0.5)
            served = T.status_json(m["p"])["network"]["nat"]["holepunch"]["rendezvous_for_peers"]
            check(served >= 1, "P served the rendezvous", served)
            check_eq(T.status_json(b)["network"]["dht"]["nodes"], 0,
                     "DHT nodes B knows (none could be its rendezvous)")
            off = 40 * (1 << 20)
            T.check_bytes(T.read_range(b.by_hash(root), off, 2 * (1 << 20)),
                          data[off:off + 2 * (1 << 20)], "B reads further on")
            # Both its peers told B where they see it (hello yourip): its router's address.
            T.wait_until(lambda: T.status_json(b)["network"]["nat"]["peers_see"] == rb.addr,
                         f"B's peers to report it at {rb.addr}", timeout=20, interval=0.5)
            print(f"    B: {T.swarm_of(b, root).get('peers_by')}; P served {served} rendezvous; "
                  f"peers see B at {T.status_json(b)['network']['nat']['peers_see']}")
        finally:
            for x in mounts:
                x.cleanup()


if __name__ == "__main__":
    T.main()
