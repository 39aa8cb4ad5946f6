#!/usr/bin/env bash
# Benchmark: `keystone agent sync` of a one-file commit, against a raw
# `git fetch` of a one-file commit over the same reused SSH connection,
# in the same run. Prints absolute figures and the ratio; not a test.
#   sudo ./bench/sync.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
cargo build --release --locked -q -p keystone
K=$PWD/target/release/keystone
work=$(mktemp -d /tmp/ks-bench-sync.XXXXXX)
trap 'cd /; $K agent destroy syncbench --force >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export XDG_STATE_HOME=$work/state XDG_CONFIG_HOME=$work/config
export XDG_CACHE_HOME=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
mkdir -p "$XDG_CONFIG_HOME/keystone" "$work/syncbench"
printf '[defaults]\nmemory = 2048\nvcpus = 2\n[backend]\ntype = "%s"\n[guest]\nprofile = "minimal"\n' "${BACKEND:-container}" > "$XDG_CONFIG_HOME/keystone/agent.toml"
cd "$work/syncbench"
git init -q -b main && git config user.name b && git config user.email b@e && git commit -q --allow-empty -m init
$K agent start --no-attach >/dev/null 2>&1
cfg=$XDG_STATE_HOME/keystone/sandboxes/syncbench/ssh/config
now() { date +%s%N; }
ms() { echo "scale=1; ($2 - $1) / 1000000" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ks=(); raw=()
for i in $(seq "$N"); do
    $K agent exec -- sh -c "echo $i > f$i.txt && git add f$i.txt && git commit -qm f$i"
    t0=$(now); $K agent sync >/dev/null; t1=$(now); ks+=("$(ms "$t0" "$t1")")
    $K agent exec -- sh -c "echo r$i > r$i.txt && git add r$i.txt && git commit -qm r$i"
    t0=$(now)
    GIT_SSH_COMMAND="ssh -F $cfg" git fetch -q ssh://agent@keystone-syncbench/workspace "+refs/heads/main:refs/bench/main"
    t1=$(now); raw+=("$(ms "$t0" "$t1")")
    git merge -q --ff-only refs/bench/main   # keep the host in step for the next round
done
m_ks=$(printf '%s\n' "${ks[@]}" | median)
m_raw=$(printf '%s\n' "${raw[@]}" | median)
echo "sync of a one-file commit: keystone ${m_ks} ms, raw git fetch ${m_raw} ms, ratio $(echo "scale=2; $m_ks / $m_raw" | bc)x   (median of $N, ${BACKEND:-container})"
