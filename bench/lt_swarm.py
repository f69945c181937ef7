#!/usr/bin/python3
"""A libtorrent swarm on loopback: the reference that bench/swarm_throughput.sh measures digfs
against.

usage:
  lt_swarm.py make-torrent FILE OUT.torrent
      a BitTorrent v2-only torrent of FILE (libtorrent picks the piece size); prints a JSON
      line with the piece size and the file's "pieces root" (the digfs root of the same bytes)
  lt_swarm.py seed OUT.torrent DIR --port P [--seed-mode] [--utp]
      seeds the torrent's file, found in DIR, from 127.0.0.1:P until killed (SIGTERM/SIGINT).
      By default the file is checked (hashed) first, so serving it costs no hashing; with
      --seed-mode libtorrent trusts it and checks each piece on its first request instead.
      Prints "ready" on stdout once it is seeding.
  lt_swarm.py download OUT.torrent DESTDIR --peers 127.0.0.1:P1,127.0.0.1:P2,...
              [--timeout SECS] [--utp]
      a fresh session downloads the file into DESTDIR from the listed seeders only, and
      prints one JSON line {"bytes": N, "seconds": S, "MBps": X, "peers": K}: the wall time
      from add_torrent to the torrent finishing (every piece in and hash-checked), MB = 10^6
      bytes, K = how many of the listed seeders it was connected to.

seed and download also take --plain (libtorrent's default settings, apart from the loopback and
no-discovery ones and uTP off) and --set KEY=VALUE (any libtorrent setting but those), to see
what the tuning is worth; -v prints every alert.

Network: loopback only. Every session has DHT, LSD, UPnP and NAT-PMP off, no trackers, listens
on 127.0.0.1 only, and learns peers only from --peers (connect_peer). Peer connections are TCP
only (digfs's peer wire runs over TCP); --utp allows uTP as well.

Needs /usr/bin/python3 with python3-libtorrent (2.0). Any libtorrent error alert (listen,
torrent, file, storage, hash failure) ends the process with status 1 and a message on stderr.
"""
import argparse
import json
import os
import select
import signal
import sys
import time

try:
    import libtorrent as lt
except ImportError as e:
    sys.exit(f"lt_swarm.py: cannot import libtorrent ({e}); use /usr/bin/python3 with "
             "python3-libtorrent (apt-get install -y python3-libtorrent)")

MiB = 1024 * 1024
PROG = "lt_swarm.py"


def die(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def warn(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def parse_peer(s):
    host, sep, port = s.strip().rpartition(":")
    if not sep or not port.isdigit():
        die(f"bad peer '{s}' (want 127.0.0.1:PORT)")
    if host != "127.0.0.1":
        die(f"peer '{s}' is not on 127.0.0.1: this tool talks to loopback only")
    return host, int(port)


# Settings that keep a session on loopback with no discovery: --set cannot change them.
SAFETY = ("listen_interfaces", "outgoing_interfaces", "listen_system_port_fallback",
          "enable_dht", "dht_bootstrap_nodes", "enable_lsd", "enable_upnp", "enable_natpmp",
          "enable_ip_notifier", "proxy_type")


def tuned_settings(utp):
    """For a fast and fair bulk transfer between processes on one machine."""
    return {
        # TCP, like digfs's peer wire (uTP on loopback is far slower; --utp allows it).
        "enable_outgoing_utp": utp,
        "enable_incoming_utp": utp,
        # No rate limits, many connections and unchoke slots, connect at once.
        "upload_rate_limit": 0,
        "download_rate_limit": 0,
        "rate_limit_ip_overhead": False,
        "connections_limit": 1000,
        "unchoke_slots_limit": -1,
        "connection_speed": 200,
        "smooth_connects": False,
        "tick_interval": 100,
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        # Deep request pipelines and large buffers.
        "max_out_request_queue": 5000,
        "max_allowed_in_request_queue": 10000,
        "request_queue_time": 10,
        "send_buffer_watermark": 64 * MiB,
        "send_buffer_low_watermark": 8 * MiB,
        "send_buffer_watermark_factor": 200,
        "max_peer_recv_buffer_size": 32 * MiB,
        "send_socket_buffer_size": 4 * MiB,
        "recv_socket_buffer_size": 4 * MiB,
        "max_queued_disk_bytes": 256 * MiB,
        "aio_threads": 8,
        "hashing_threads": 2,
        "checking_mem_usage": 1024,
        "file_pool_size": 64,
    }


def session_settings(port, utp, plain=False, extra=()):
    """Settings of every session: loopback only and no discovery; then the tuning (libtorrent's
    defaults with plain, except that uTP stays off unless asked); then the --set overrides."""
    cat = lt.alert.category_t
    s = {
        "listen_interfaces": f"127.0.0.1:{port}",
        "outgoing_interfaces": "127.0.0.1",
        "listen_system_port_fallback": False,
        "enable_dht": False,
        "dht_bootstrap_nodes": "",
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_ip_notifier": False,
        "proxy_type": 0,  # none
        # Every peer is 127.0.0.1 (on different ports).
        "allow_multiple_connections_per_ip": True,
        "alert_queue_size": 100000,
        "alert_mask": int(cat.error_notification | cat.status_notification
                          | cat.storage_notification | cat.peer_notification
                          | cat.connect_notification | cat.performance_warning),
    }
    if plain:
        s.update({"enable_outgoing_utp": utp, "enable_incoming_utp": utp})
    else:
        s.update(tuned_settings(utp))
    for k, v in extra:
        if k in SAFETY:
            die(f"--set {k} is not allowed (it keeps the session on loopback)")
        s[k] = v
    return s


def parse_set(item):
    """KEY=VALUE of --set, the value typed like libtorrent's default for KEY."""
    k, sep, v = item.partition("=")
    defaults = lt.default_settings()
    if not sep or k not in defaults:
        die(f"bad --set '{item}' (KEY=VALUE with KEY a libtorrent setting)")
    d = defaults[k]
    if isinstance(d, bool):
        if v.lower() not in ("0", "1", "true", "false"):
            die(f"--set {k} wants true or false")
        return k, v.lower() in ("1", "true")
    if isinstance(d, int):
        try:
            return k, int(v, 0)
        except ValueError:
            die(f"--set {k} wants an integer")
    return k, v


def make_session(port, args):
    want = session_settings(port, args.utp, args.plain, [parse_set(x) for x in args.set])
    ses = lt.session(want)
    # Read back: a safety setting libtorrent did not take ends the run; others are reported.
    got = ses.get_settings()
    for k, v in want.items():
        if got.get(k) != v:
            if k in SAFETY or k == "allow_multiple_connections_per_ip":
                die(f"libtorrent did not take {k}={v!r} (it has {got.get(k)!r})")
            if args.verbose:
                warn(f"libtorrent has {k}={got.get(k)!r}, not {v!r}")
    return ses


def wait_listening(ses, watch, timeout=10.0):
    """Waits for the listen socket on 127.0.0.1 (a failure is a fatal alert); returns its port."""
    end = time.monotonic() + timeout
    while not ses.is_listening():
        if time.monotonic() > end:
            die("the session is not listening after %.0f s" % timeout)
        watch.poll(20)
    return ses.listen_port()


def torrent_info(path):
    try:
        ti = lt.torrent_info(path)
    except RuntimeError as e:
        die(f"cannot load {path}: {e}")
    if ti.num_files() != 1:
        die(f"{path}: expected a single-file torrent, got {ti.num_files()} files")
    return ti


FATAL = ("torrent_error_alert", "file_error_alert", "hash_failed_alert",
         "listen_failed_alert", "metadata_failed_alert", "fastresume_rejected_alert",
         "storage_moved_failed_alert", "torrent_delete_failed_alert", "save_resume_data_failed_alert",
         "file_rename_failed_alert", "udp_error_alert", "session_error_alert")


class AlertWatch:
    """Pops alerts: dies on errors, remembers connected peers, reports performance warnings once.

    Waits on a pipe that libtorrent writes to when alerts arrive (set_alert_fd), not on
    session.wait_for_alert: the Python binding wraps the alert that wait_for_alert returns, a
    pointer into a queue the network thread may be reallocating, and that crashed the
    downloader about once in 40 runs."""

    def __init__(self, ses, verbose=False):
        self.ses = ses
        self.verbose = verbose
        self.connected = set()
        self.perf = set()
        self.finished = False
        self.peer_events = []  # shown when the download fails
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        ses.set_alert_fd(self.wfd)

    def poll(self, ms):
        select.select([self.rfd], [], [], ms / 1000.0)
        try:
            while os.read(self.rfd, 4096):
                pass
        except BlockingIOError:
            pass
        alerts = self.ses.pop_alerts()
        for a in alerts:
            self._handle(a)
        del alerts

    def _handle(self, a):
        name = type(a).__name__
        if name in FATAL:
            die(f"{name}: {a.message()}")
        if name == "add_torrent_alert" and a.error.value():
            die(f"add_torrent failed: {a.error.message()}")
        if name == "torrent_finished_alert":
            self.finished = True
        elif name == "peer_connect_alert":
            self.connected.add(str(a.endpoint))
        elif name == "performance_alert":
            if a.message() not in self.perf:
                self.perf.add(a.message())
                warn(f"performance warning: {a.message()}")
        elif name in ("peer_error_alert", "peer_disconnected_alert"):
            self.peer_events.append(f"{name}: {a.message()}")
            del self.peer_events[:-20]
            if self.verbose:
                warn(self.peer_events[-1])
        elif self.verbose:
            warn(f"{name}: {a.message()}")


def cmd_make_torrent(args):
    path = os.path.abspath(args.file)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        die(f"{path}: not a non-empty regular file")
    fs = lt.file_storage()
    lt.add_files(fs, path)
    ct = lt.create_torrent(fs, 0, lt.create_torrent.v2_only)  # 0: libtorrent picks the piece size
    ct.set_creator("digfs bench/lt_swarm.py")
    lt.set_piece_hashes(ct, os.path.dirname(path))
    t = ct.generate()
    root = t[b"info"][b"file tree"][os.path.basename(path).encode()][b""][b"pieces root"]
    with open(args.out, "wb") as f:
        f.write(lt.bencode(t))
    ti = lt.torrent_info(args.out)
    print(json.dumps({"file": os.path.basename(path), "bytes": ti.total_size(),
                      "pieces_root": root.hex(),
                      "piece_size": ti.piece_length(), "pieces": ti.num_pieces(),
                      "v2": ti.info_hashes().has_v2(), "v1": ti.info_hashes().has_v1()}),
          flush=True)


def cmd_seed(args):
    ti = torrent_info(args.torrent)
    target = os.path.join(args.dir, ti.files().file_path(0))
    if not os.path.isfile(target) or os.path.getsize(target) != ti.total_size():
        die(f"{target}: missing or not {ti.total_size()} bytes")

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    ses = make_session(args.port, args)
    watch = AlertWatch(ses, args.verbose)
    port = wait_listening(ses, watch)
    if port != args.port:
        die(f"listening on {port}, not on the asked port {args.port}")
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = os.path.abspath(args.dir)
    flags = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex
    if args.seed_mode:
        flags |= lt.torrent_flags.seed_mode
    atp.flags = flags  # neither paused nor auto-managed: starts at once
    h = ses.add_torrent(atp)

    t0 = time.monotonic()
    while not stop:
        watch.poll(200)
        st = h.status()
        if st.errc.value():
            die(f"torrent error: {st.errc.message()}")
        if st.is_seeding:
            break
        if time.monotonic() - t0 > args.timeout:
            die(f"not seeding after {args.timeout} s (state {st.state}, {st.progress:.0%} checked)")
    if stop:
        return
    if h.status().num_pieces != ti.num_pieces():
        die(f"seeding with {h.status().num_pieces} of {ti.num_pieces()} pieces")
    print("ready", flush=True)
    while not stop:
        watch.poll(500)
        st = h.status()
        if st.errc.value():
            die(f"torrent error: {st.errc.message()}")


def cmd_download(args):
    ti = torrent_info(args.torrent)
    peers = [parse_peer(p) for p in args.peers.split(",") if p.strip()]
    if not peers:
        die("no peers given")
    os.makedirs(args.destdir, exist_ok=True)
    target = os.path.join(args.destdir, ti.files().file_path(0))
    if os.path.exists(target):
        die(f"{target} exists: the downloader must start cold (use an empty DESTDIR)")

    ses = make_session(0, args)
    watch = AlertWatch(ses, args.verbose)
    wait_listening(ses, watch)
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = os.path.abspath(args.destdir)
    atp.flags = lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex

    t0 = time.monotonic()
    h = ses.add_torrent(atp)
    for p in peers:
        h.connect_peer(p)
    t_end = None
    max_peers = 0
    while True:
        watch.poll(20)
        st = h.status()
        max_peers = max(max_peers, st.num_peers)
        if st.errc.value():
            die(f"torrent error: {st.errc.message()}")
        if watch.finished or st.is_seeding or st.is_finished:
            t_end = time.monotonic()
            break
        now = time.monotonic()
        if now - t0 > args.timeout:
            die(f"not finished after {args.timeout} s: {st.total_wanted_done} of "
                f"{st.total_wanted} bytes, state {st.state}, {st.num_peers} peers"
                + "".join("\n  " + e for e in watch.peer_events))
        if now - t0 > 15 and st.num_peers == 0 and st.total_wanted_done == 0:
            die(f"no seeder connected in 15 s (asked: {args.peers})"
                + "".join("\n  " + e for e in watch.peer_events))
    secs = t_end - t0
    # The status can lag the finished alert by a few pieces: give it a moment (not timed).
    end = time.monotonic() + 10
    while True:
        st = h.status()
        if st.num_pieces == ti.num_pieces() or time.monotonic() > end:
            break
        watch.poll(20)
    if st.total_wanted_done != ti.total_size() or st.num_pieces != ti.num_pieces():
        die(f"finished with {st.total_wanted_done} of {ti.total_size()} bytes, "
            f"{st.num_pieces} of {ti.num_pieces()} pieces")
    connected = {e for e in watch.connected}
    # Let the last writes reach the file (outside the timed span), then check its size.
    h.flush_cache()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if os.path.isfile(target) and os.path.getsize(target) == ti.total_size():
            break
        watch.poll(50)
    if not os.path.isfile(target) or os.path.getsize(target) != ti.total_size():
        die(f"{target}: not {ti.total_size()} bytes after the download")
    ses.remove_torrent(h)  # closes the file
    end = time.monotonic() + 10
    while time.monotonic() < end and ses.get_torrents():
        watch.poll(50)
    print(json.dumps({"bytes": ti.total_size(), "seconds": round(secs, 6),
                      "MBps": round(ti.total_size() / secs / 1e6, 1),
                      "peers": max(len(connected), max_peers)}), flush=True)


def main():
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-torrent", help="a v2-only torrent of FILE")
    p.add_argument("file")
    p.add_argument("out")
    p.set_defaults(func=cmd_make_torrent)

    p = sub.add_parser("seed", help="seed until killed; prints 'ready'")
    p.add_argument("torrent")
    p.add_argument("dir")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seed-mode", action="store_true",
                   help="trust the file (check pieces on first request) instead of checking it first")
    p.add_argument("--timeout", type=float, default=600, help="seconds to reach seeding")
    p.add_argument("--utp", action="store_true", help="allow uTP besides TCP")
    p.add_argument("--plain", action="store_true",
                   help="libtorrent's default settings apart from the loopback/no-discovery ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more libtorrent setting (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("download", help="download from the given seeders; prints a JSON line")
    p.add_argument("torrent")
    p.add_argument("destdir")
    p.add_argument("--peers", required=True, help="127.0.0.1:P1,127.0.0.1:P2,...")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole download")
    p.add_argument("--utp", action="store_true", help="allow uTP besides TCP")
    p.add_argument("--plain", action="store_true",
                   help="libtorrent's default settings apart from the loopback/no-discovery ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more libtorrent setting (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_download)

    args = ap.parse_args()
    if args.cmd == "seed" and not 0 < args.port < 65536:
        die(f"bad port {args.port}")
    args.func(args)


if __name__ == "__main__":
    main()
