#!/usr/bin/env bash
# Swarm download throughput of digfs against libtorrent, on loopback, in the same run: N seeders
# hold one file of random bytes and one fresh peer fetches all of it from them.
#
# usage: bench/swarm_throughput.sh [-s SIZE_MIB] [-n RUNS] [-S "SEEDER COUNTS"] [--build]
#                                  [--utp] [--record] [--perf DIR]
#   -s SIZE_MIB   file size (default 256)
#   -n RUNS       timed runs per case; the median is reported (default 3)
#   -S COUNTS     the seeder counts to measure, e.g. "1 4" (default "1 4")
#   --build       run `cmake --build` on the digfs build tree first (it is built anyway when
#                 the binary is missing)
#   --utp         both sides over uTP only: libtorrent with TCP off and uTP on (lt_swarm.py
#                 --utp --set enable_outgoing_tcp=false ...), the digfs reader with
#                 prefer_utp=yes (digfs seeders accept uTP on their UDP port always)
#   --record      append the table to bench/RESULTS.md (section "Swarm throughput (issue 3)",
#                 or "uTP throughput (issue 4)" with --utp)
#   --perf DIR    see below
# Environment: DIGFS_BIN (default build-release/digfs), LT_PYTHON (a Python with
# python3-libtorrent 2.0, default /usr/bin/python3), TMPDIR (where the data lives; default
# /var/tmp, a disk, not tmpfs).
#
# Cases, for each seeder count N:
#   libtorrent  N `bench/lt_swarm.py seed` sessions (BitTorrent v2-only torrent, file checked
#               before seeding) on 127.0.0.1, and for each run a fresh `lt_swarm.py download`
#               session into an empty directory, given the seeders by address. Its time runs
#               from add_torrent to the torrent finishing (every piece in and hash-checked).
#   digfs       N digfs mounts (-o port=P,bootstrap=none), each with its own copy of the file
#               written into shared/ and hashed (user.digfs.root), and for each run a fresh
#               reader mount (empty data_dir and cache_dir, -o port=0,bootstrap=none,
#               peers=127.0.0.1:P1+127.0.0.1:P2...). Its time is one
#               `cat MNT/by-hash/<root> > /dev/null`, from the start of `cat` to its end.
# What the clocks include: libtorrent's runs from add_torrent (the session is already up and
# listening, like a mounted digfs) and so includes connecting to the seeders, the handshakes
# and the piece layers. digfs's starts on a reader that is mounted but has not looked the root
# up: it opens connections per swarm, only when a root is wanted, so the clock includes the
# lookup of by-hash/<root>, connecting to the seeders, the hello and the file's length and
# leaf hashes. The script checks this before each run (`digfs status --json`: no peer
# connected, 0 bytes in, no swarm) and stops digfs's side of the case if not. After each run
# it prints the bytes the reader received (network.bytes_in, everything on its peer sockets)
# per byte read. For each seeder count both sides' seeders are up together and the timed runs
# alternate (libtorrent first in odd runs, digfs first in even ones). The first run of each
# case checks the bytes the downloader got (sha256), outside the timed span. The digfs root is
# also checked against libtorrent's "pieces root" of the file (BEP 52: the same tree).
# libtorrent runs with the tuning in lt_swarm.py (TCP only, short tick, large send buffers:
# worth about 2x over its defaults here); MB = 10^6 bytes.
#
# --perf DIR    also record `perf record -F 999 -g` of the digfs reader and seeders during
#               each digfs `cat` (DIR/dg-N-R.data, N seeders, run R; the pids are in
#               DIR/dg-N-R.pids). perf may slow digfs down (at 999 Hz the runs took as long
#               as without it): do not record the times of such a run.
#
# Network: everything runs in a fresh network namespace whose only interface is loopback (the
# script re-executes itself under `unshare -n`, so it needs root), every session listens on
# 127.0.0.1, and no DHT, LSD, UPnP, NAT-PMP or tracker is used: peers are given by address.
#
# Exit status: 0 when both sides ran, 1 when the libtorrent side (or the setup) failed, 3 when
# only the digfs side failed (for instance a digfs without the swarm options): libtorrent's
# numbers are printed all the same.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
repo=$(pwd)
self=$repo/bench/swarm_throughput.sh

size_mib=256
runs=3
counts="1 4"
build=0
record=0
utp=0
perf_dir=
args_given=("$@")
while [ $# -gt 0 ]; do
    case $1 in
    -s) size_mib=$2; shift 2 ;;
    -n) runs=$2; shift 2 ;;
    -S) counts=$2; shift 2 ;;
    --build) build=1; shift ;;
    --record) record=1; shift ;;
    --utp) utp=1; shift ;;
    --perf) perf_dir=$(mkdir -p "$2" && readlink -f "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "swarm_throughput.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
if ! [[ $size_mib =~ ^[1-9][0-9]*$ && $runs =~ ^[1-9][0-9]*$ ]]; then
    echo "swarm_throughput.sh: -s and -n take positive integers" >&2
    exit 2
fi
read -r -a counts_a <<<"$counts"
if [ "${#counts_a[@]}" -eq 0 ]; then
    echo "swarm_throughput.sh: -S needs at least one seeder count" >&2
    exit 2
fi
for c in "${counts_a[@]}"; do
    if ! [[ $c =~ ^[1-9][0-9]*$ ]] || [ "$c" -gt 50 ]; then
        echo "swarm_throughput.sh: bad seeder count '$c' (1 to 50)" >&2
        exit 2
    fi
done

# --- Loopback only: re-execute in a fresh network namespace. ---------------------------------
. "$repo/bench/loopback.sh"
loopback_only swarm_throughput.sh "$self" "${args_given[@]}"

# --- Tools. ----------------------------------------------------------------------------------
py=${LT_PYTHON:-/usr/bin/python3}
lt_swarm=$repo/bench/lt_swarm.py
lt_transport=()
dg_transport=
if [ "$utp" = 1 ]; then
    lt_transport=(--utp --set enable_outgoing_tcp=false --set enable_incoming_tcp=false)
    dg_transport=,prefer_utp=yes
fi
if ! "$py" -c 'import libtorrent' 2>/dev/null; then
    echo "swarm_throughput.sh: $py cannot import libtorrent (apt-get install -y python3-libtorrent," \
        "or set LT_PYTHON)" >&2
    exit 1
fi

bin=${DIGFS_BIN:-$repo/build-release/digfs}
if [ -z "${DIGFS_BIN:-}" ] && { [ "$build" = 1 ] || [ ! -x "$bin" ]; }; then
    echo "building digfs in build-release/"
    if [ ! -f "$repo/build-release/CMakeCache.txt" ]; then
        cmake -S "$repo" -B "$repo/build-release" -DCMAKE_BUILD_TYPE=Release >/dev/null
    fi
    cmake --build "$repo/build-release" -j2 >/dev/null
elif [ -n "${DIGFS_BIN:-}" ] && [ "$build" = 1 ]; then
    echo "swarm_throughput.sh: --build ignored: DIGFS_BIN is set" >&2
fi
bin=$(readlink -f "$bin")
if [ ! -x "$bin" ]; then
    echo "swarm_throughput.sh: no digfs binary at $bin" >&2
    exit 1
fi
for t in getfattr fusermount3 sha256sum jq ${perf_dir:+perf}; do
    if ! command -v "$t" >/dev/null; then
        echo "swarm_throughput.sh: $t is missing" >&2
        exit 1
    fi
done

# --- Temporary tree, processes, cleanup. -----------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/digfs-swarm.XXXXXX")
# Every process started and every mount made is listed in these files (phases run in
# subshells, so shell variables would not reach the cleanup).
pidfile=$tmp/pids
mntfile=$tmp/mounts
: >"$pidfile"
: >"$mntfile"

is_mounted() { grep -q " $1 fuse" /proc/self/mounts; }

# ours PID: the process is alive and is one of ours (its command line names $tmp), so a pid the
# kernel reused for someone else is never signalled.
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$tmp"; }

unmount_one()
{
    local m=$1
    is_mounted "$m" || return 0
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null ||
        true
}

# stop_pid PID: SIGTERM, up to 10 s, then SIGKILL; only if it is ours.
stop_pid()
{
    local p=$1
    ours "$p" || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do
        ours "$p" || return 0
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
}

# stop_all: unmounts every mount made and stops every process started that still runs.
stop_all()
{
    local m p
    if [ -f "$mntfile" ]; then
        while read -r m; do
            [ -n "$m" ] && unmount_one "$m"
        done < <(tac "$mntfile")
    fi
    if [ -f "$pidfile" ]; then
        while read -r p; do
            [ -n "$p" ] && stop_pid "$p"
        done < <(tac "$pidfile")
    fi
}

# The subshell running the current step (see step): stopped first on an early exit.
case_pid=

cleanup()
{
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$case_pid" ]; then
        kill -TERM "$case_pid" 2>/dev/null || true # our child, not yet waited for
    fi
    stop_all
    wait 2>/dev/null || true
    # A mount still there (both unmounts failed) must not be recursed into.
    if grep -qF " $tmp/" /proc/self/mounts; then
        echo "swarm_throughput.sh: mounts left under $tmp; not removing it" >&2
    else
        rm -rf --one-file-system "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f\n", b - a }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mbps() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }

# tracked CMD...: runs CMD (whose arguments name $tmp) as a process the cleanup can stop.
tracked()
{
    local pid
    "$@" &
    pid=$!
    echo "$pid" >>"$pidfile"
    wait "$pid"
}

# wait_for SECS CMD...: polls CMD every 0.1 s.
wait_for()
{
    local n=$(($1 * 10))
    shift
    for _ in $(seq "$n"); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

# --- The file. -------------------------------------------------------------------------------
bytes=$((size_mib * 1024 * 1024))
src=$tmp/bench.bin
results=$tmp/results
mkdir -p "$results"
echo "swarm throughput: ${size_mib} MiB file, seeders: ${counts_a[*]}, $runs runs per case, in $tmp"
echo "network: $(ip -o link show | awk -F': ' '{ print $2 }' | xargs) only (namespace)"
load0=$(cut -d' ' -f1-3 /proc/loadavg) # other work on the machine skews every number
echo "load average: $load0"
head -c "$bytes" /dev/urandom >"$src"
sha=$(sha256sum "$src" | cut -d' ' -f1)
torrent=$tmp/bench.torrent
mt=$("$py" "$lt_swarm" make-torrent "$src" "$torrent")
lt_root=$(sed -n 's/.*"pieces_root": "\([0-9a-f]*\)".*/\1/p' <<<"$mt")
lt_piece=$(sed -n 's/.*"piece_size": \([0-9]*\).*/\1/p' <<<"$mt")
echo "sha256 $sha; v2 torrent: piece size $((lt_piece / 1024)) KiB, pieces root $lt_root"

# --- libtorrent. -----------------------------------------------------------------------------
# Each step below runs in its own subshell (see step), so what later steps need is kept in
# files under $tmp/lt and $tmp/dg. A step returns non-zero on failure, with the reason on
# stderr.

# lt_setup N: starts N seeders and waits until each one seeds.
lt_setup()
{
    local n=$1 i p peers='' spids=() log
    mkdir -p "$tmp/lt"
    for i in $(seq "$n"); do
        if [ ! -f "$tmp/lt/s$i/bench.bin" ]; then
            mkdir -p "$tmp/lt/s$i"
            cp --reflink=auto "$src" "$tmp/lt/s$i/bench.bin"
        fi
        p=$((6880 + i))
        log=$tmp/lt/seed$i.log
        "$py" "$lt_swarm" seed "$torrent" "$tmp/lt/s$i" --port "$p" "${lt_transport[@]}" \
            >"$log" 2>&1 &
        echo $! >>"$pidfile"
        spids+=($!)
        peers+="${peers:+,}127.0.0.1:$p"
    done
    echo "$peers" >"$tmp/lt/peers"
    for i in $(seq "$n"); do
        log=$tmp/lt/seed$i.log
        for _ in $(seq 3000); do
            grep -qx ready "$log" && break
            kill -0 "${spids[$((i - 1))]}" 2>/dev/null || break
            sleep 0.1
        done
        if ! grep -qx ready "$log"; then
            echo "libtorrent seeder $i is not seeding; its log:" >&2
            sed 's/^/    /' "$log" >&2
            return 1
        fi
    done
}

# lt_run N R: one download by a fresh session; appends its time to $results/lt_N.
lt_run()
{
    local n=$1 r=$2 dest=$tmp/lt/dl out secs got
    rm -rf "$dest"
    out=$(tracked "$py" "$lt_swarm" download "$torrent" "$dest" --peers "$(cat "$tmp/lt/peers")" \
        --timeout 600 "${lt_transport[@]}")
    secs=$(sed -n 's/.*"seconds": \([0-9.e-]*\).*/\1/p' <<<"$out")
    got=$(sed -n 's/.*"peers": \([0-9]*\).*/\1/p' <<<"$out")
    if [ -z "$secs" ]; then
        echo "libtorrent downloader printed no time: $out" >&2
        return 1
    fi
    if [ "$got" != "$n" ]; then
        echo "warning: libtorrent run $r used $got of $n seeders" >&2
    fi
    if [ "$r" = 1 ] && [ "$(sha256sum "$dest/bench.bin" | cut -d' ' -f1)" != "$sha" ]; then
        echo "libtorrent download differs from the file (sha256)" >&2
        return 1
    fi
    echo "$secs" >>"$results/lt_$n"
    rm -rf "$dest"
    echo "  libtorrent, $n seeders, run $r/$runs: $(mbps "$secs") MB/s ($secs s)"
}

# --- digfs. ----------------------------------------------------------------------------------
# The reason the digfs side cannot run at all (a digfs without the swarm options); once set,
# the remaining cases are skipped.
dg_unsupported=$tmp/dg_unsupported

# dg_mount NAME MNT OPTIONS: starts digfs on MNT in the foreground (log $tmp/dg/NAME.log) and
# waits for it; prints its pid. Non-zero when it exited or did not mount in 30 s.
dg_mount()
{
    local name=$1 mnt=$2 opts=$3 log=$tmp/dg/$1.log pid
    mkdir -p "$mnt"
    "$bin" "$mnt" -f -o "$opts" >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >>"$pidfile"
    echo "$mnt" >>"$mntfile"
    for _ in $(seq 300); do
        if is_mounted "$mnt" && [ -d "$mnt/by-hash" ]; then
            echo "$pid"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if grep -qiE 'unknown option|bad mount option' "$log"; then
        {
            echo "digfs ($bin) does not take the swarm options yet:"
            sed 's/^/    /' "$log"
        } >"$dg_unsupported"
    fi
    echo "digfs $name did not mount (-o $opts); its log:" >&2
    sed 's/^/    /' "$log" >&2
    return 1
}

dg_unmount()
{
    local mnt=$1 pid=$2
    unmount_one "$mnt"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    stop_pid "$pid"
    wait "$pid" 2>/dev/null || true
}

# dg_json MNT FILTER: jq FILTER applied to `digfs status --json MNT`.
dg_json() { "$bin" status --json "$1" | jq -r "$2"; }

root_of() { getfattr --only-values -n user.digfs.root "$1" 2>/dev/null || true; }
has_root() { [[ $(root_of "$1") =~ ^[0-9a-f]{64}$ ]]; }

# dg_setup N: mounts N seeders, each with its own copy of the file in shared/, and waits until
# each has hashed it.
dg_setup()
{
    local n=$1 i p d peers='' spids=() smnts=() pid mnt r
    rm -rf "$tmp/dg/s"* "$tmp/dg/r"
    mkdir -p "$tmp/dg"
    for i in $(seq "$n"); do
        p=$((7880 + i))
        d=$tmp/dg/s$i
        mnt=$d/mnt
        pid=$(dg_mount "seed$i" "$mnt" "data_dir=$d/data,cache_dir=$d/cache,port=$p,bootstrap=none,lsd=no,upnp=no,natpmp=no")
        spids+=("$pid")
        smnts+=("$mnt")
        peers+="${peers:++}127.0.0.1:$p"
        cp "$src" "$mnt/shared/bench.bin"
    done
    echo "$peers" >"$tmp/dg/peers"
    echo "${spids[*]}" >"$tmp/dg/spids"
    for i in $(seq "$n"); do
        mnt=${smnts[$((i - 1))]}
        if ! wait_for 300 has_root "$mnt/shared/bench.bin"; then
            echo "digfs seeder $i: no root after 300 s (user.digfs.root='$(root_of "$mnt/shared/bench.bin")')" >&2
            return 1
        fi
        r=$(root_of "$mnt/shared/bench.bin")
        if [ "$r" != "$lt_root" ]; then
            echo "digfs seeder $i: root $r is not libtorrent's pieces root $lt_root" >&2
            return 1
        fi
    done
}

# dg_run N R: one `cat` on a fresh reader; appends its time to $results/dg_N.
dg_run()
{
    local n=$1 r=$2 root=$lt_root d=$tmp/dg/r rmnt rpid pre t0 t1 secs got size bin_in
    local perf_pid='' spids
    rm -rf "$d"
    rmnt=$d/mnt
    rpid=$(dg_mount "reader-$n-$r" "$rmnt" \
        "data_dir=$d/data,cache_dir=$d/cache,port=0,bootstrap=none,lsd=no,upnp=no,natpmp=no,peers=$(cat "$tmp/dg/peers")$dg_transport")
    # Cold: no peer connected, nothing received, no swarm (the root not looked up yet).
    pre=$(dg_json "$rmnt" '"\(.network.peers) \(.network.bytes_in) \(.swarms | length)"')
    if [ "$pre" != "0 0 0" ]; then
        echo "digfs reader: not cold before the read (peers, bytes in, swarms: $pre)" >&2
        return 1
    fi
    if [ -n "$perf_dir" ]; then
        spids=$(cat "$tmp/dg/spids")
        echo "reader $rpid seeders $spids" >"$perf_dir/dg-$n-$r.pids"
        perf record -F 999 -g -q -p "$rpid,${spids// /,}" -o "$perf_dir/dg-$n-$r.data" \
            >"$perf_dir/dg-$n-$r.log" 2>&1 &
        perf_pid=$!
        sleep 1 # perf attaches
    fi
    t0=$(now)
    if ! tracked timeout -k 5 600 cat "$rmnt/by-hash/$root" >/dev/null; then
        echo "digfs reader: cat by-hash/$root failed; reader log:" >&2
        sed 's/^/    /' "$tmp/dg/reader-$n-$r.log" >&2
        return 1
    fi
    t1=$(now)
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
    fi
    bin_in=$(dg_json "$rmnt" '.network.bytes_in')
    secs=$(elapsed "$t0" "$t1")
    size=$(stat -c %s "$rmnt/by-hash/$root")
    if [ "$size" != "$bytes" ]; then
        echo "digfs reader: by-hash/$root is $size bytes, not $bytes" >&2
        return 1
    fi
    if [ "$r" = 1 ]; then
        got=$(tracked timeout -k 5 600 sha256sum "$rmnt/by-hash/$root" | cut -d' ' -f1)
        if [ "$got" != "$sha" ]; then
            echo "digfs reader: by-hash/$root differs from the file (sha256 $got)" >&2
            return 1
        fi
    fi
    dg_unmount "$rmnt" "$rpid"
    echo "$secs" >>"$results/dg_$n"
    echo "  digfs, $n seeders, run $r/$runs: $(mbps "$secs") MB/s ($secs s)," \
        "$(awk -v i="$bin_in" -v b="$bytes" 'BEGIN { printf "%.4f", i / b }') bytes in per byte read"
}

# --- Run. ------------------------------------------------------------------------------------
# step FUNC ARGS...: runs FUNC in a subshell with errexit on (a failing command ends the step,
# not the script), in the background so that INT and TERM are handled at once; sets step_rc
# to its status. Never call it in a condition (if, !, &&, ||): bash ignores errexit in
# everything a command run there runs, even after `set -e`.
step()
{
    (set -e; "$@") &
    case_pid=$!
    wait "$case_pid" && step_rc=0 || step_rc=$?
    case_pid=
}

# For each seeder count both sides' seeders are up together and the timed runs alternate
# (libtorrent first in odd runs, digfs first in even ones), so that a burst of other work on
# the machine, or its memory being reclaimed by the host, does not land on one side only.
lt_failed=0
dg_failed=0
declare -A lt_err=() dg_err=()
for n in "${counts_a[@]}"; do
    echo "$n seeder(s): libtorrent and digfs runs alternate"
    lt_ok=1
    dg_ok=1
    step lt_setup "$n"
    [ "$step_rc" = 0 ] || lt_ok=0
    if [ -s "$dg_unsupported" ]; then
        dg_ok=0
        dg_err[$n]="n/a"
    else
        step dg_setup "$n"
        [ "$step_rc" = 0 ] || dg_ok=0
    fi
    for r in $(seq "$runs"); do
        if [ $((r % 2)) = 1 ]; then order="lt dg"; else order="dg lt"; fi
        for side in $order; do
            if [ "$side" = lt ] && [ "$lt_ok" = 1 ]; then
                step lt_run "$n" "$r"
                [ "$step_rc" = 0 ] || lt_ok=0
            elif [ "$side" = dg ] && [ "$dg_ok" = 1 ]; then
                step dg_run "$n" "$r"
                [ "$step_rc" = 0 ] || dg_ok=0
            fi
        done
    done
    if [ "$lt_ok" = 0 ]; then
        lt_failed=1
        lt_err[$n]=failed
    fi
    if [ "$dg_ok" = 0 ] && [ -z "${dg_err[$n]:-}" ]; then
        dg_failed=1
        if [ -s "$dg_unsupported" ]; then dg_err[$n]="n/a"; else dg_err[$n]=failed; fi
    fi
    stop_all
done

# --- Table. ----------------------------------------------------------------------------------
cell() # FILE ERR: "median MB/s" or the error
{
    if [ -n "$2" ]; then
        echo "$2"
    elif [ -s "$1" ]; then
        mbps "$(median <"$1")"
    else
        echo "failed"
    fi
}
runs_of() { [ -s "$1" ] && xargs <"$1" || echo "-"; }

table=$(
    echo "| seeders | libtorrent MB/s (median) | digfs MB/s (median) | digfs/libtorrent | libtorrent runs (s) | digfs runs (s) |"
    echo "| ---: | ---: | ---: | ---: | --- | --- |"
    for n in "${counts_a[@]}"; do
        l=$(cell "$results/lt_$n" "${lt_err[$n]:-}")
        g=$(cell "$results/dg_$n" "${dg_err[$n]:-}")
        ratio=
        if [[ $l =~ ^[0-9]+$ && $g =~ ^[0-9]+$ ]]; then # MB/s ratio = inverse ratio of times
            ratio=$(awk -v lt="$(median <"$results/lt_$n")" -v dg="$(median <"$results/dg_$n")" \
                'BEGIN { printf "%.0f%%", 100 * lt / dg }')
        fi
        printf '| %s | %s | %s | %s | %s | %s |\n' "$n" "$l" "$g" "${ratio:--}" \
            "$(runs_of "$results/lt_$n")" "$(runs_of "$results/dg_$n")"
    done
)

machine="$(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),"
machine+=" $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo),"
machine+=" kernel $(uname -r), $(sed -n 's/^PRETTY_NAME="\(.*\)"$/\1/p' /etc/os-release),"
machine+=" data on $(df -T "$tmp" | awk 'NR == 2 { print $2 }');"
machine+=" load average $load0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain -- engine fs mount 2>/dev/null)" ]; then
    commit+=" + uncommitted changes"
fi
# The tree is what the commit names; the binary may be older (DIGFS_BIN, or not rebuilt).
commit+=" (digfs binary $bin, built $(date -u -r "$bin" '+%Y-%m-%d %H:%M UTC'))"
ltver=$("$py" -c 'import libtorrent; print(libtorrent.__version__)')

report=$(
    echo "### $(date -u '+%Y-%m-%d %H:%M UTC'), ${size_mib} MiB, commit $commit"
    echo
    echo "Command: \`bench/swarm_throughput.sh -s $size_mib -n $runs -S \"${counts_a[*]}\"$([ "$utp" = 1 ] && echo " --utp")\`  "
    echo "Machine: $machine; libtorrent $ltver ($([ "$utp" = 1 ] && echo "uTP only" || echo TCP), v2 torrent, ${lt_piece:-?}-byte pieces)"
    echo
    echo "$table"
)
echo
if [ -s "$dg_unsupported" ]; then
    echo "digfs side not measured:"
    cat "$dg_unsupported"
    echo
fi
echo "$report"

if [ "$record" = 1 ]; then
    results_md=$repo/bench/RESULTS.md
    heading='## Swarm throughput (issue 3)'
    [ "$utp" = 1 ] && heading='## uTP throughput (issue 4)'
    [ -f "$results_md" ] || printf '# digfs benchmark results\n' >"$results_md"
    grep -qxF "$heading" "$results_md" || printf '\n%s\n' "$heading" >>"$results_md"
    REPORT=$report awk -v h="$heading" '
        function emit() { print ""; print ENVIRON["REPORT"]; done = 1 }
        $0 == h { insec = 1; print; next }
        insec && /^## / { emit(); print ""; insec = 0 }
        { print }
        END { if (!done) emit() }' "$results_md" | cat -s >"$results_md.new"
    mv "$results_md.new" "$results_md"
    echo
    echo "recorded in bench/RESULTS.md"
fi

if [ "$lt_failed" = 1 ]; then
    exit 1
elif [ "$dg_failed" = 1 ]; then
    exit 3
fi
exit 0
