#!/usr/bin/env bash
# Sequential read throughput of a held file through a digfs mount, against `cat` of the same
# bytes on the native filesystem, in the same run.
#
# usage: bench/read_throughput.sh [-s SIZE_MIB] [-n RUNS] [--disk] [--no-record]
#   -s SIZE_MIB   file size (default 1024: 1 GiB)
#   -n RUNS       timed runs per case; the median is reported (default 5)
#   --disk        also the disk-bound case: drop the page cache (root; global, so off by
#                 default) before each native and each digfs read
#   --no-record   print the table only; do not append it to bench/RESULTS.md
# Environment: DIGFS_BIN (default build/digfs), TMPDIR (where the data lives; default
# /var/tmp, a disk, not tmpfs).
#
# Every read is `cat FILE > /dev/null`, timed with the shell's clock. Cases:
#   native warm  the backing file in data_dir/shared/, already in the page cache
#   digfs cold   by-hash/<root> right after a fresh mount: the backing file is in the page
#                cache but the FUSE file's page cache is empty, so every byte crosses FUSE
#                (the daemon is restarted before each run)
#   digfs warm   the same path read again in the same mount: what the kernel kept of the
#                FUSE page cache across opens
#   native disk / digfs disk (--disk): after `echo 3 > /proc/sys/vm/drop_caches`
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
repo=$(pwd)

size_mib=1024
runs=5
disk=0
record=1
while [ $# -gt 0 ]; do
    case $1 in
    -s) size_mib=$2; shift 2 ;;
    -n) runs=$2; shift 2 ;;
    --disk) disk=1; shift ;;
    --no-record) record=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "read_throughput.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

bin=$(readlink -f "${DIGFS_BIN:-$repo/build/digfs}")
if [ ! -x "$bin" ]; then
    echo "read_throughput.sh: no digfs binary at $bin (build: cmake -S . -B build && make -C build -j2)" >&2
    exit 1
fi
if [ "$disk" = 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "read_throughput.sh: --disk needs root (it writes /proc/sys/vm/drop_caches)" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/digfs-bench.XXXXXX")
mnt=$tmp/mnt
data=$tmp/data
log=$tmp/digfs.log
pid=
mkdir -p "$mnt"

is_mounted() { grep -q " $mnt fuse" /proc/self/mounts; }

unmount()
{
    if is_mounted; then
        fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    fi
    if [ -n "$pid" ]; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}

cleanup()
{
    local rc=$?
    trap - EXIT INT TERM
    unmount
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mount_digfs()
{
    "$bin" "$mnt" -f -o "data_dir=$data,cache_dir=$tmp/cache,bootstrap=none,lsd=no,upnp=no,natpmp=no" >>"$log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do
        if is_mounted && [ -d "$mnt/shared" ]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "read_throughput.sh: digfs did not mount; its log:" >&2
    cat "$log" >&2
    exit 1
}

remount()
{
    unmount
    mount_digfs
}

# Prints the seconds one `cat FILE > /dev/null` takes.
time_cat()
{
    local t0 t1
    t0=$EPOCHREALTIME
    cat "$1" >/dev/null
    t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }'
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

mbps() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }

bytes=$((size_mib * 1024 * 1024))
echo "digfs read throughput: ${size_mib} MiB file, $runs runs per case, in $tmp"

mount_digfs
echo "writing ${size_mib} MiB of random bytes into shared/ through the mount"
head -c "$bytes" /dev/urandom >"$mnt/shared/bench.bin"

root=
for _ in $(seq 1200); do
    root=$(getfattr --only-values -n user.digfs.root "$mnt/shared/bench.bin" 2>/dev/null || true)
    [[ $root =~ ^[0-9a-f]{64}$ ]] && break
    sleep 0.1
done
if ! [[ $root =~ ^[0-9a-f]{64}$ ]]; then
    echo "read_throughput.sh: no root after 120 s (user.digfs.root='$root')" >&2
    exit 1
fi
echo "root: $root"

native=$data/shared/bench.bin
if [ ! -f "$native" ]; then
    native=$(find "$data" -type f -name bench.bin -print -quit)
fi
if [ -z "$native" ] || [ "$(stat -c %s "$native")" != "$bytes" ]; then
    echo "read_throughput.sh: cannot find the backing file of shared/bench.bin under $data" >&2
    exit 1
fi
byhash=$mnt/by-hash/$root

# Same bytes on both sides.
if ! cmp -s "$native" "$byhash"; then
    echo "read_throughput.sh: by-hash/$root differs from the backing file" >&2
    exit 1
fi

declare -A samples=()
cases=(native_warm digfs_cold digfs_warm)
[ "$disk" = 1 ] && cases+=(native_disk digfs_disk)

cat "$native" >/dev/null # warm the backing file's page cache
for r in $(seq "$runs"); do
    samples[native_warm]+="$(time_cat "$native") "
    remount
    samples[digfs_cold]+="$(time_cat "$byhash") "
    samples[digfs_warm]+="$(time_cat "$byhash") "
    if [ "$disk" = 1 ]; then
        drop_caches
        samples[native_disk]+="$(time_cat "$native") "
        remount
        drop_caches
        samples[digfs_disk]+="$(time_cat "$byhash") "
        cat "$native" >/dev/null
    fi
    echo "run $r/$runs done"
done

declare -A med=()
for c in "${cases[@]}"; do
    med[$c]=$(tr ' ' '\n' <<<"${samples[$c]}" | grep . | median)
done

ratio()
{
    awk -v n="${med[$1]}" -v d="${med[$2]}" 'BEGIN { printf "%.0f%%", 100 * n / d }'
}

table=$(
    echo "| case | median MB/s | median s | runs (s) | digfs/native |"
    echo "| --- | ---: | ---: | --- | ---: |"
    for c in "${cases[@]}"; do
        case $c in
        digfs_cold | digfs_warm) vs=$(ratio native_warm "$c") ;;
        digfs_disk) vs=$(ratio native_disk "$c") ;;
        *) vs="" ;;
        esac
        printf '| %s | %s | %s | %s | %s |\n' "${c/_/ }" "$(mbps "${med[$c]}")" \
            "${med[$c]}" "$(xargs <<<"${samples[$c]}")" "$vs"
    done
)

machine="$(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),"
machine+=" $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo),"
machine+=" kernel $(uname -r), $(sed -n 's/^PRETTY_NAME="\(.*\)"$/\1/p' /etc/os-release),"
machine+=" data on $(df -T "$tmp" | awk 'NR == 2 { print $2 }')"
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain -- engine fs mount 2>/dev/null)" ]; then
    commit+=" + uncommitted changes"
fi
args="-s $size_mib -n $runs"
[ "$disk" = 1 ] && args+=" --disk"

report=$(
    echo "### $(date -u '+%Y-%m-%d %H:%M UTC'), ${size_mib} MiB, commit $commit"
    echo
    echo "Command: \`bench/read_throughput.sh $args\`  "
    echo "Machine: $machine"
    echo
    echo "$table"
)
echo
echo "$report"

# Inserts the report at the end of the "## Sequential read throughput" section of RESULTS.md
# (created when missing), so later sections stay where they are.
if [ "$record" = 1 ]; then
    results=$repo/bench/RESULTS.md
    heading='## Sequential read throughput (bench/read_throughput.sh)'
    [ -f "$results" ] || printf '# digfs benchmark results\n' >"$results"
    grep -qxF "$heading" "$results" || printf '\n%s\n' "$heading" >>"$results"
    REPORT=$report awk -v h="$heading" '
        function emit() { print ""; print ENVIRON["REPORT"]; done = 1 }
        $0 == h { insec = 1; print; next }
        insec && /^## / { emit(); print ""; insec = 0 }
        { print }
        END { if (!done) emit() }' "$results" | cat -s >"$results.new"
    mv "$results.new" "$results"
    echo
    echo "recorded in bench/RESULTS.md"
fi
