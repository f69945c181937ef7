# Sourced by the bench scripts: makes sure the caller runs in a network namespace of its own
# whose only interface is loopback, re-executing it under `unshare -n` if need be (it needs
# root). Usage, after the arguments are parsed:
#   . "$repo/bench/loopback.sh"
#   loopback_only NAME SELF ARGS...   # NAME for messages, SELF the script, ARGS its arguments
# Returns only inside such a namespace; exits 1 when it cannot get there.

# Whether the only interface here is loopback, and it is up.
only_loopback()
{
    local ifs
    ifs=$(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | xargs)
    [ "$ifs" = lo ] && ip -o link show lo | grep -q '[<,]UP[,>]'
}

loopback_only()
{
    local name=$1 self=$2
    shift 2
    if [ "${DIGFS_BENCH_NETNS:-}" != 1 ]; then
        if ! command -v unshare >/dev/null || ! unshare -n true 2>/dev/null; then
            echo "$name: cannot create a network namespace (needs root and unshare):" \
                "refusing to run outside one" >&2
            exit 1
        fi
        # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
        exec unshare -n env DIGFS_BENCH_NETNS=1 \
            bash -c 'ip link set lo up && exec "$0" "$@"' "$self" "$@"
    fi
    if ! only_loopback; then
        echo "$name: not in a loopback-only network namespace (interfaces:" \
            "$(ip -o link show | awk -F': ' '{ print $2 }' | xargs)): refusing to run" >&2
        exit 1
    fi
}
