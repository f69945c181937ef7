#!/usr/bin/env bash
# The whole digfs test suite, from a fresh Debian 12 machine (run as root, or with sudo):
#   1. installs the Debian packages that are missing (nothing is installed when all are present),
#      and the npm packages of tests/interop (`npm ci`, while the network is still there),
#   2. makes sure /dev/fuse exists,
#   3. builds three trees with warnings as errors: build/ (RelWithDebInfo), build-asan/
#      (AddressSanitizer + UndefinedBehaviorSanitizer, clang when installed) and, with clang,
#      build-fuzz/ (the libFuzzer targets, each run for DIGFS_FUZZ_TIME seconds, default 15),
#   4. runs ctest in each,
#   5. checks the C sources against .clang-format (counted as one more test; with
#      DIGFS_FORMAT_STRICT=0 a mismatch is only a warning),
#   6. prints both ctest summaries, then one closing line "N passed, N failed, N skipped"
#      (totals over both trees and the format check).
# Exits non-zero when a build, a test or the format check failed. Works from any directory.
#
# Environment: JOBS (build and ctest parallelism, default: 2), ASAN_CC (compiler of the
# sanitizer tree), DIGFS_SKIP_INSTALL=1 (never call apt-get; `npm ci` still runs),
# DIGFS_ONLY=build|build-asan|build-fuzz (run one tree only), DIGFS_FUZZ_TIME (seconds).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
repo=$(pwd)

packages=(build-essential cmake pkg-config libfuse3-dev fuse3 libuv1-dev libssl-dev liblmdb-dev libcjson-dev
          libcmocka-dev python3 python3-libtorrent attr clang libclang-rt-14-dev clang-format
          iproute2 iptables libminiupnpc-dev libnatpmp-dev miniupnpd-nftables miniupnpc natpmpc
          nftables conntrack)

say() { printf '==> %s\n' "$*"; }

as_root()
{
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "run-all.sh: need root to run: $*" >&2
        return 1
    fi
}

install_missing()
{
    local missing=() p
    if [ "${DIGFS_SKIP_INSTALL:-0}" = 1 ]; then
        return 0
    fi
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
        say "all ${#packages[@]} packages present"
        return 0
    fi
    say "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" </dev/null
}

# The interoperability tests run against other implementations, npm packages pinned by
# tests/interop/package-lock.json. They are installed here, because the tests run without a
# network; again when package-lock.json is newer than the installed tree. Without node, npm
# or the packages those tests are skipped, and the summary says why.
install_interop()
{
    local dir="$repo/tests/interop"
    [ -f "$dir/package-lock.json" ] || return 0
    if [ -f "$dir/node_modules/.package-lock.json" ] &&
        [ ! "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "tests/interop npm packages present"
        return 0
    fi
    if { ! command -v node >/dev/null || ! command -v npm >/dev/null; } &&
        [ "${DIGFS_SKIP_INSTALL:-0}" != 1 ] && command -v dpkg-query >/dev/null; then
        say "installing: nodejs npm (for tests/interop)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            nodejs npm </dev/null || true
    fi
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        say "warning: node or npm is missing: the DHT interoperability test will be skipped"
        summaries+=("--- interop: node or npm missing, tests/interop not installed (test skipped)")
        return 0
    fi
    say "installing tests/interop npm packages (npm ci)"
    if ! (cd "$dir" && npm ci --no-audit --no-fund </dev/null); then
        say "warning: npm ci failed in tests/interop: the DHT interoperability test will be skipped"
        summaries+=("--- interop: npm ci failed in tests/interop (test skipped)")
    fi
}

ensure_fuse()
{
    if [ ! -c /dev/fuse ]; then
        as_root modprobe fuse 2>/dev/null || true
    fi
    if [ ! -c /dev/fuse ]; then
        say "warning: /dev/fuse is missing: mount tests will be skipped"
    fi
}

# Sanitizer runtimes of LLVM 14 / GCC 12 crash at start when the kernel randomizes mmap with
# more than 28 bits (newer kernels allow 32): lower it for this machine, best effort.
ensure_asan_mmap()
{
    local bits
    bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28)
    if [ "$bits" -gt 28 ]; then
        say "vm.mmap_rnd_bits=$bits breaks the sanitizer runtime: setting it to 28"
        as_root sysctl -q -w vm.mmap_rnd_bits=28 || true
    fi
}

# Tests never reach beyond this machine: each ctest run happens in a fresh network namespace
# whose only interface is loopback (the project's network rule, enforced rather than hoped
# for). Where a namespace cannot be made (not root), the tests run as they are, and the
# summary says so. DIGFS_TEST_NETNS=0 turns it off.
offline_mode="in a network namespace with loopback only"
if [ "${DIGFS_TEST_NETNS:-1}" != 1 ] || ! command -v unshare >/dev/null ||
    ! unshare -n true 2>/dev/null; then
    offline_mode="WITHOUT network isolation (cannot create a network namespace)"
fi

offline()
{
    if [ "$offline_mode" = "in a network namespace with loopback only" ]; then
        unshare -n sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' offline "$@"
    else
        "$@"
    fi
}

jobs=${JOBS:-2}
total_passed=0
total_failed=0
total_skipped=0
summaries=()

# run_tree DIR CMAKE-ARGS...: configure, build and test one tree; adds to the totals.
run_tree()
{
    local dir=$1 log summary passed failed skipped tests
    shift
    log="$repo/$dir/ctest.log"
    say "configuring $dir: $*"
    if ! cmake -S "$repo" -B "$repo/$dir" -DDIGFS_WERROR=ON -DDIGFS_TESTS=ON "$@" ||
        ! { say "building $dir"; cmake --build "$repo/$dir" -j "$jobs"; }; then
        summaries+=("--- $dir: BUILD FAILED")
        total_failed=$((total_failed + 1))
        return 0
    fi
    say "testing $dir"
    # ctest's status is judged from its summary below, so a failure does not stop the script.
    offline ctest --test-dir "$repo/$dir" --output-on-failure --no-tests=error -j "$jobs" \
        --timeout 900 2>&1 | tee "$log" || true
    summary=$(sed -n '/tests passed, .* tests failed out of/,$p' "$log")
    if [ -z "$summary" ]; then
        summaries+=("--- $dir: ctest did not finish (see $log)")
        total_failed=$((total_failed + 1))
        return 0
    fi
    read -r failed tests < <(sed -n \
        's/.*tests passed, \([0-9]*\) tests failed out of \([0-9]*\).*/\1 \2/p' <<<"$summary")
    skipped=$(grep -cE '^[[:space:]]*[0-9]+ - .* \((Skipped|Disabled)\)$' <<<"$summary" || true)
    passed=$((tests - failed - skipped))
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
    total_skipped=$((total_skipped + skipped))
    summaries+=("--- $dir: $passed passed, $failed failed, $skipped skipped" "$summary")
}

# Checks every C file against .clang-format: one passed or failed check in the totals
# (a warning only, with DIGFS_FORMAT_STRICT=0).
check_format()
{
    local files=() bad=() f
    if ! command -v clang-format >/dev/null; then
        summaries+=("--- format: clang-format not installed, not checked")
        return 0
    fi
    mapfile -t files < <(find engine fs mount tests -name '*.[ch]' 2>/dev/null | sort)
    for f in "${files[@]}"; do
        [ -f "$f" ] || continue
        clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || bad+=("$f")
    done
    if [ "${#bad[@]}" -eq 0 ]; then
        summaries+=("--- format: passed, ${#files[@]} C files match .clang-format")
        total_passed=$((total_passed + 1))
    elif [ "${DIGFS_FORMAT_STRICT:-1}" = 1 ]; then
        summaries+=("--- format: FAILED, run clang-format -i on: ${bad[*]}")
        total_failed=$((total_failed + 1))
    else
        summaries+=("--- format: warning: clang-format would change: ${bad[*]}")
    fi
}

install_missing
install_interop
ensure_fuse

# Sanitizer failures must fail the test: stop at the first report and exit non-zero.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-}

if [ -z "${ASAN_CC:-}" ]; then
    if command -v clang >/dev/null; then ASAN_CC=clang; else ASAN_CC=gcc; fi
fi

only=${DIGFS_ONLY:-}
if [ -z "$only" ] || [ "$only" = build ]; then
    run_tree build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIGFS_SANITIZE=OFF
fi
if [ -z "$only" ] || [ "$only" = build-asan ]; then
    ensure_asan_mmap
    run_tree build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIGFS_SANITIZE=ON \
        -DCMAKE_C_COMPILER="$ASAN_CC"
fi
if [ -z "$only" ] || [ "$only" = build-fuzz ]; then
    if command -v clang >/dev/null; then
        run_tree build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIGFS_SANITIZE=ON \
            -DDIGFS_FUZZ=ON -DDIGFS_TESTS=OFF -DCMAKE_C_COMPILER=clang \
            -DDIGFS_FUZZ_TIME="${DIGFS_FUZZ_TIME:-15}"
    else
        summaries+=("--- build-fuzz: clang not installed, fuzz targets not run")
    fi
fi

check_format

echo
echo "==================== digfs test summary ===================="
echo "--- tests ran $offline_mode"
for s in "${summaries[@]}"; do
    printf '%s\n' "$s"
done
echo "============================================================"
echo "$total_passed passed, $total_failed failed, $total_skipped skipped"
[ "$total_failed" -eq 0 ]
