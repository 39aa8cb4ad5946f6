# The preamble every bench script shares, sourced after `set -euo pipefail`:
#
#   source "$(dirname "$0")/lib.sh"      # cd to the checkout; ROOT is it
#   bench_require TOOL:PACKAGE ...       # exit 4 naming the package
#   bench_build                          # K: the release keystone binary
#   bench_project NAME BACKEND [DEFAULTS] [TABLES]
#       # a throwaway state, config and project repository (cd into it),
#       # the shared image cache, and a trap that destroys sandbox NAME and
#       # removes it all on exit; DEFAULTS are extra lines of [defaults],
#       # TABLES extra tables of the configuration (both printf %b: \n)
#   bench_at_exit 'COMMAND'              # run COMMAND too on exit (first)
#   bench_warm_starts N                  # warm: N start → exec -- true, ms
#   now; ms T0 T1; median; median_of X...; calc EXPR [SCALE]; ratio A B
#
# Not a test library: nothing here fails on time.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

bench_require() {
    local t
    for t in "$@"; do
        command -v "${t%%:*}" >/dev/null || { echo "${t%%:*} is required: apt-get install ${t##*:}" >&2; exit 4; }
    done
}

bench_build() {
    cargo build --release --locked -q -p keystone
    K=${CARGO_TARGET_DIR:-$ROOT/target}/release/keystone
}

bench_cleanups=()
bench_at_exit() {
    bench_cleanups+=("$1")
}

bench_cleanup() {
    local c
    cd /
    for c in "${bench_cleanups[@]}"; do
        eval "$c" || true
    done
    if [ -n "${BENCH_SANDBOX:-}" ]; then
        "$K" agent destroy "$BENCH_SANDBOX" --force >/dev/null 2>&1 || true
    fi
    if [ -n "${work:-}" ]; then
        rm -rf "$work"
    fi
}

bench_project() {
    local name=$1 backend=$2 defaults=${3:-} tables=${4:-}
    BENCH_SANDBOX=$name
    work=$(mktemp -d "/tmp/ks-bench-$name.XXXXXX")
    trap bench_cleanup EXIT
    export XDG_STATE_HOME=$work/state XDG_CONFIG_HOME=$work/config
    export XDG_CACHE_HOME=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
    mkdir -p "$XDG_CONFIG_HOME/keystone" "$work/$name"
    printf '[defaults]\nmemory = 2048\nvcpus = 2\n%b[backend]\ntype = "%s"\n[guest]\nprofile = "minimal"\n%b' \
        "$defaults" "$backend" "$tables" > "$XDG_CONFIG_HOME/keystone/agent.toml"
    cd "$work/$name"
    git init -q -b main
    git config user.name b
    git config user.email b@e
    git commit -q --allow-empty -m init
}

now() { date +%s%N; }
ms() { echo "scale=1; ($2 - $1) / 1000000" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
median_of() { printf '%s\n' "$@" | median; }
calc() { echo "scale=${2:-0}; $1" | bc; }
ratio() { calc "$1 / $2" 2; }

# Sets `warm` to N warm start → working exec times (ms), stopping after each.
bench_warm_starts() {
    local t0 t1
    warm=()
    for _ in $(seq "$1"); do
        t0=$(now); "$K" agent start --no-attach >/dev/null 2>&1; "$K" agent exec -- true; t1=$(now)
        warm+=("$(ms "$t0" "$t1")")
        "$K" agent stop >/dev/null
    done
}
