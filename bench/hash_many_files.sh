#!/usr/bin/env bash
# How fast digfs takes in many small files: N files appear in data_dir/shared while digfs is
# down (a restore, an rsync); digfs is started and we time until `digfs status` reports them
# all hashed. Reference in the same run: sha256sum over the same files (one process, as
# `find | xargs sha256sum`).
#
# usage: bench/hash_many_files.sh [-n FILES] [-s BYTES] [--no-record]
# Environment: DIGFS_BIN (default build/digfs), TMPDIR (default /var/tmp).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

files=20000
size=100
record=1
while [ $# -gt 0 ]; do
    case $1 in
    -n) files=$2; shift 2 ;;
    -s) size=$2; shift 2 ;;
    --no-record) record=0; shift ;;
    *) echo "usage: $0 [-n FILES] [-s BYTES] [--no-record]" >&2; exit 2 ;;
    esac
done
bin=${DIGFS_BIN:-build/digfs}
[ -x "$bin" ] || { echo "no digfs at $bin (build it first)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/var/tmp}/digfs-bench-XXXXXX")
mnt=$work/mnt
cleanup()
{
    if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -u "$mnt" || umount -l "$mnt"; fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$mnt" "$work/data/shared"

python3 - "$work/data/shared" "$files" "$size" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, f"d{i // 200}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(i.to_bytes(8, "little") * (size // 8 + 1))
PY
sync
cat "$work"/data/shared/*/* > /dev/null # both runs read from the page cache

now() { date +%s.%N; }
t0=$(now)
find "$work/data/shared" -type f -print0 | xargs -0 sha256sum > /dev/null
t1=$(now)
ref=$(echo "$t1 - $t0" | bc -l)

t0=$(now)
"$bin" "$mnt" -o "data_dir=$work/data,cache_dir=$work/cache,log_level=error,bootstrap=none,lsd=no,upnp=no,natpmp=no"
while :; do
    done_count=$("$bin" status --json "$mnt" | python3 -c \
        'import json,sys; s=json.load(sys.stdin)["shared"]; print(s["hashed"] if s["hash_queue"] == 0 else -1)')
    [ "$done_count" = "$files" ] && break
    sleep 0.05
done
t1=$(now)
ours=$(echo "$t1 - $t0" | bc -l)

line=$(printf '| %d files of %d bytes | %.2f s (%.0f files/s) | %.2f s (%.0f files/s) |' \
    "$files" "$size" "$ours" "$(echo "$files / $ours" | bc -l)" "$ref" "$(echo "$files / $ref" | bc -l)")
echo "| what | digfs (mount, scan, hash, index) | sha256sum |"
echo "| --- | ---: | ---: |"
echo "$line"
if [ "$record" = 1 ]; then
    {
        echo
        echo "### $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)"
        echo
        echo "Command: \`bench/hash_many_files.sh -n $files -s $size\`"
        echo
        echo "| what | digfs (mount, scan, hash, index) | sha256sum |"
        echo "| --- | ---: | ---: |"
        echo "$line"
    } >> bench/RESULTS.md
    echo "recorded in bench/RESULTS.md"
fi
