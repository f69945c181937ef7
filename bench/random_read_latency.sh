#!/usr/bin/env bash
# Latency of random 64 KiB reads on a cold digfs node, on loopback: one digfs seeder shares a
# file of random bytes; a fresh reader mount (empty data_dir and cache_dir, peers=the seeder,
# bootstrap=none) opens by-hash/<root> and reads N blocks of 64 KiB at random 64 KiB-aligned
# offsets, each offset once, timing each read.
#
# usage: bench/random_read_latency.sh [-s SIZE_MIB] [-N READS] [-r RUNS] [--seed S]
#   -s SIZE_MIB   file size (default 256)
#   -N READS      reads per run (default 200; at most SIZE_MIB * 16)
#   -r RUNS       runs, each on a new fresh reader (default 3); run R uses seed S + R - 1
#   --seed S      the first run's RNG seed (default 1)
# Environment: DIGFS_BIN (default build-release/digfs), TMPDIR (default /var/tmp).
#
# Each run, in this order:
#   reader   a reader mount that has not looked the root up (checked with `digfs status
#            --json`: no peer, 0 bytes in, no swarm). Timed apart: the open() of
#            by-hash/<root>, which looks the root up, connects to the seeder and gets the
#            file's length (the file's leaf hashes may come later, with the reads). Then N
#            `os.pread(fd, 65536, offset)` on that fd (O_RDONLY), each timed with
#            time.perf_counter_ns. Offsets: random.Random(seed).sample() of the file's
#            64 KiB blocks. After the reads: network.bytes_in of the reader (every byte on its
#            peer sockets: blocks, hashes, messages) / (N * 64 KiB) = bytes fetched per byte
#            read. It shows what read-ahead (the kernel's and digfs's) fetched and never used.
#   local    the same offsets, read from the seeder's own shared/bench.bin through its mount
#            (the backing file is in the page cache: local and warm), the reference for what
#            FUSE alone costs.
# Every block read is compared with the source file (outside the timed span).
# Latencies: median and p99 (nearest rank: the ceil(0.99 N)-th smallest) and max, in ms. The
# per-run line also lists the slow reads ("slow": [read number, 64 KiB block, ms] of reads over
# 10 times the median and over 1 ms).
#
# libtorrent has no comparable mode: it downloads whole pieces into a file and has no lazy,
# verified read of an arbitrary range through a filesystem, so there is no libtorrent column.
#
# Network: everything runs in a fresh network namespace whose only interface is loopback (the
# script re-executes itself under `unshare -n`, so it needs root); digfs runs with
# bootstrap=none and is given its peer by address.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
repo=$(pwd)
self=$repo/bench/random_read_latency.sh

size_mib=256
nreads=200
runs=3
seed=1
args_given=("$@")
while [ $# -gt 0 ]; do
    case $1 in
    -s) size_mib=$2; shift 2 ;;
    -N) nreads=$2; shift 2 ;;
    -r) runs=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "random_read_latency.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
for v in "$size_mib" "$nreads" "$runs"; do
    if ! [[ $v =~ ^[1-9][0-9]*$ ]]; then
        echo "random_read_latency.sh: -s, -N and -r take positive integers" >&2
        exit 2
    fi
done
if ! [[ $seed =~ ^[0-9]+$ ]]; then
    echo "random_read_latency.sh: --seed takes a non-negative integer" >&2
    exit 2
fi
if [ "$nreads" -gt $((size_mib * 16)) ]; then
    echo "random_read_latency.sh: -N $nreads: the file has only $((size_mib * 16)) blocks of 64 KiB" >&2
    exit 2
fi

# --- Loopback only: re-execute in a fresh network namespace. ---------------------------------
. "$repo/bench/loopback.sh"
loopback_only random_read_latency.sh "$self" "${args_given[@]}"

# --- Tools. ----------------------------------------------------------------------------------
bin=${DIGFS_BIN:-$repo/build-release/digfs}
if [ -z "${DIGFS_BIN:-}" ] && [ ! -x "$bin" ]; then
    echo "building digfs in build-release/"
    cmake -S "$repo" -B "$repo/build-release" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$repo/build-release" -j2 >/dev/null
fi
bin=$(readlink -f "$bin")
if [ ! -x "$bin" ]; then
    echo "random_read_latency.sh: no digfs binary at $bin" >&2
    exit 1
fi
py=${PYTHON:-python3}
for t in getfattr fusermount3 jq "$py"; do
    if ! command -v "$t" >/dev/null; then
        echo "random_read_latency.sh: $t is missing" >&2
        exit 1
    fi
done

# --- Temporary tree, processes, cleanup. -----------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/digfs-randread.XXXXXX")
pids=()
mnts=()

is_mounted() { grep -q " $1 fuse" /proc/self/mounts; }

unmount_one()
{
    is_mounted "$1" || return 0
    fusermount3 -u "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || fusermount3 -uz "$1" 2>/dev/null ||
        true
}

# stop_pid PID: waits up to 10 s for it to exit (after its unmount), then TERM, then KILL.
stop_pid()
{
    local p=$1
    for _ in $(seq 100); do
        kill -0 "$p" 2>/dev/null || { wait "$p" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -TERM "$p" 2>/dev/null || true
    sleep 1
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

cleanup()
{
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#mnts[@]} - 1; i >= 0; i--)); do
        unmount_one "${mnts[$i]}"
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[$i]}"
    done
    if grep -qF " $tmp/" /proc/self/mounts; then
        echo "random_read_latency.sh: mounts left under $tmp; not removing it" >&2
    else
        rm -rf --one-file-system "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# dg_mount NAME MNT OPTIONS: starts digfs on MNT (log $tmp/NAME.log) and waits for it; sets
# mounted_pid.
dg_mount()
{
    local name=$1 mnt=$2 opts=$3 log=$tmp/$1.log
    mkdir -p "$mnt"
    "$bin" "$mnt" -f -o "$opts" >>"$log" 2>&1 &
    mounted_pid=$!
    pids+=("$mounted_pid")
    mnts+=("$mnt")
    for _ in $(seq 300); do
        if is_mounted "$mnt" && [ -d "$mnt/by-hash" ]; then
            return 0
        fi
        kill -0 "$mounted_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "random_read_latency.sh: digfs $name did not mount (-o $opts); its log:" >&2
    sed 's/^/    /' "$log" >&2
    exit 1
}

dg_json() { "$bin" status --json "$1" | jq -r "$2"; }
root_of() { getfattr --only-values -n user.digfs.root "$1" 2>/dev/null || true; }

# reads.py FILE SRC N SEED OPEN_TIMED: the timed reads; prints one JSON line.
cat >"$tmp/reads.py" <<'EOF'
import json, math, os, random, statistics, sys, time

path, src, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
B = 65536
size = os.path.getsize(src)
offsets = [i * B for i in random.Random(seed).sample(range(size // B), n)]

t0 = time.perf_counter_ns()
fd = os.open(path, os.O_RDONLY)
open_ms = (time.perf_counter_ns() - t0) / 1e6
lat, got = [], []
for off in offsets:
    t = time.perf_counter_ns()
    b = os.pread(fd, B, off)
    lat.append((time.perf_counter_ns() - t) / 1e6)
    got.append(b)
os.close(fd)

# Outside the timed span: every block is the source's.
sfd = os.open(src, os.O_RDONLY)
bad = sum(1 for off, b in zip(offsets, got) if b != os.pread(sfd, B, off))
os.close(sfd)
if bad:
    sys.exit(f"reads.py: {bad} of {n} blocks of {path} differ from the source")

s = sorted(lat)
med = statistics.median(lat)
slow = [[i, offsets[i] // B, round(v, 3)] for i, v in enumerate(lat) if v > max(10 * med, 1.0)]
print(json.dumps({"open_ms": round(open_ms, 3), "first_ms": round(lat[0], 3),
                  "median_ms": round(statistics.median(lat), 3),
                  "p99_ms": round(s[math.ceil(0.99 * n) - 1], 3), "max_ms": round(s[-1], 3),
                  "mean_ms": round(statistics.fmean(lat), 3),
                  "slow": slow}))
EOF

bytes=$((size_mib * 1024 * 1024))
src=$tmp/bench.bin
echo "random 64 KiB reads: ${size_mib} MiB file, $nreads reads per run, $runs runs, seed $seed, in $tmp"
echo "network: $(ip -o link show | awk -F': ' '{ print $2 }' | xargs) only (namespace)"
load0=$(cut -d' ' -f1-3 /proc/loadavg) # other work on the machine skews every number
echo "load average: $load0"
head -c "$bytes" /dev/urandom >"$src"

# The seeder.
sport=7881
smnt=$tmp/seed/mnt
dg_mount seed "$smnt" "data_dir=$tmp/seed/data,cache_dir=$tmp/seed/cache,port=$sport,bootstrap=none,lsd=no,upnp=no,natpmp=no"
cp "$src" "$smnt/shared/bench.bin"
root=
for _ in $(seq 3000); do
    root=$(root_of "$smnt/shared/bench.bin")
    [[ $root =~ ^[0-9a-f]{64}$ ]] && break
    sleep 0.1
done
if ! [[ $root =~ ^[0-9a-f]{64}$ ]]; then
    echo "random_read_latency.sh: the seeder has no root after 300 s" >&2
    exit 1
fi
echo "root $root"

field() { jq -r ".$2" <<<"$1"; }
results=()
for r in $(seq "$runs"); do
    s=$((seed + r - 1))
    rdir=$tmp/reader$r
    dg_mount "reader$r" "$rdir/mnt" \
        "data_dir=$rdir/data,cache_dir=$rdir/cache,port=0,bootstrap=none,lsd=no,upnp=no,natpmp=no,peers=127.0.0.1:$sport"
    rpid=$mounted_pid
    pre=$(dg_json "$rdir/mnt" '"\(.network.peers) \(.network.bytes_in) \(.swarms | length)"')
    if [ "$pre" != "0 0 0" ]; then
        echo "random_read_latency.sh: reader not cold before the reads (peers, bytes in, swarms: $pre)" >&2
        exit 1
    fi
    rj=$("$py" "$tmp/reads.py" "$rdir/mnt/by-hash/$root" "$src" "$nreads" "$s")
    bin_in=$(dg_json "$rdir/mnt" '.network.bytes_in')
    lj=$("$py" "$tmp/reads.py" "$smnt/shared/bench.bin" "$src" "$nreads" "$s")
    unmount_one "$rdir/mnt"
    stop_pid "$rpid"
    ratio=$(awk -v i="$bin_in" -v b="$((nreads * 65536))" 'BEGIN { printf "%.2f", i / b }')
    echo "  run $r (seed $s): reader $rj, bytes_in $bin_in ($ratio per byte read); local $lj"
    results+=("$r|$s|$(field "$rj" open_ms)|$(field "$rj" first_ms)|$(field "$rj" median_ms)|$(field "$rj" p99_ms)|$(field "$rj" max_ms)|$ratio|$(field "$lj" median_ms)|$(field "$lj" p99_ms)")
done

machine="$(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),"
machine+=" $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo),"
machine+=" kernel $(uname -r), data on $(df -T "$tmp" | awk 'NR == 2 { print $2 }');"
machine+=" load average $load0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain -- engine fs mount 2>/dev/null)" ]; then
    commit+=" + uncommitted changes"
fi
# The tree is what the commit names; the binary may be older (DIGFS_BIN, or not rebuilt).
commit+=" (digfs binary $bin, built $(date -u -r "$bin" '+%Y-%m-%d %H:%M UTC'))"
echo
echo "### $(date -u '+%Y-%m-%d %H:%M UTC'), ${size_mib} MiB, $nreads reads of 64 KiB, commit $commit"
echo
echo "Command: \`bench/random_read_latency.sh -s $size_mib -N $nreads -r $runs --seed $seed\`  "
echo "Machine: $machine"
echo
echo "| run | seed | reader open ms | reader 1st read ms | reader median ms | reader p99 ms | reader max ms | bytes fetched / byte read | local median ms | local p99 ms |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for row in "${results[@]}"; do
    echo "| ${row//|/ | } |"
done
