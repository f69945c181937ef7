#!/usr/bin/env bash
# Sets up digfs on a Debian 12 machine and mounts it in the foreground:
#   1. installs the Debian packages that are missing (build and runtime only),
#   2. builds build-release/digfs (Release),
#   3. creates MOUNTPOINT if it does not exist,
#   4. runs `build-release/digfs MOUNTPOINT -f [OPTIONS...]` in place of this script.
# Stop it with Ctrl-C, or `fusermount3 -u MOUNTPOINT` from another terminal.
# Works from any directory; needs root (or sudo) only when packages are missing.
set -euo pipefail

usage()
{
    cat <<'EOF'
usage: contrib/setup-and-mount.sh MOUNTPOINT [digfs options...]

Installs what digfs needs (Debian 12), builds it and mounts it at MOUNTPOINT in the
foreground. Options are passed to digfs, for example:
    contrib/setup-and-mount.sh /mnt/dig -o cache_size=20G,read_timeout=30
Unmount with Ctrl-C or `fusermount3 -u MOUNTPOINT`.
EOF
}

case "${1:-}" in
"")
    usage >&2
    exit 2
    ;;
-h | --help)
    usage
    exit 0
    ;;
-*)
    echo "setup-and-mount.sh: the first argument must be the mount point" >&2
    usage >&2
    exit 2
    ;;
esac

mountpoint=$1
shift
# Relative mount points are taken from the caller's directory, before the cd below.
case "$mountpoint" in
/*) ;;
*) mountpoint="$PWD/$mountpoint" ;;
esac
while [ "${#mountpoint}" -gt 1 ] && [ "${mountpoint%/}" != "$mountpoint" ]; do
    mountpoint=${mountpoint%/}
done

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

packages=(build-essential cmake pkg-config libfuse3-dev fuse3 libuv1-dev libssl-dev liblmdb-dev
          libcjson-dev libminiupnpc-dev libnatpmp-dev)

say() { printf '==> %s\n' "$*"; }

as_root()
{
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "setup-and-mount.sh: need root to run: $*" >&2
        return 1
    fi
}

install_missing()
{
    local missing=() p
    if ! command -v dpkg-query >/dev/null; then
        say "not a Debian system: install these yourself: ${packages[*]}"
        return 0
    fi
    for p in "${packages[@]}"; do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    say "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" </dev/null
}

# True when MOUNTPOINT is listed in the mount table: also a stale FUSE mount, whose stat fails
# with ENOTCONN (digfs recovers those itself).
is_mounted()
{
    local dst rest
    while read -r _ dst rest; do
        # /proc/self/mounts escapes spaces and a few other characters in octal.
        if [ "$(printf '%b' "$dst")" = "$1" ]; then
            return 0
        fi
    done </proc/self/mounts
    return 1
}

install_missing
if [ ! -c /dev/fuse ]; then
    as_root modprobe fuse 2>/dev/null || true
fi
[ -c /dev/fuse ] || say "warning: /dev/fuse is missing: the mount will fail"

say "building build-release/digfs"
cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DDIGFS_TESTS=OFF >/dev/null
cmake --build build-release -j "$(nproc)"

if [ ! -d "$mountpoint" ] && ! is_mounted "$mountpoint"; then
    say "creating $mountpoint"
    mkdir -p -- "$mountpoint"
fi

say "mounting digfs at $mountpoint (foreground; Ctrl-C or 'fusermount3 -u $mountpoint' to stop)"
exec build-release/digfs "$mountpoint" -f "$@"
