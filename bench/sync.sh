#!/usr/bin/env bash
# Benchmark: `keystone agent sync` of a one-file commit, against a raw
# `git fetch` of a one-file commit over the same reused SSH connection,
# in the same run. Prints absolute figures and the ratio; not a test.
#   sudo ./bench/sync.sh [ITERATIONS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-10}
bench_require bc:bc
bench_build
bench_project syncbench "${BACKEND:-container}"
$K agent start --no-attach >/dev/null 2>&1
cfg=$XDG_STATE_HOME/keystone/sandboxes/syncbench/ssh/config
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
m_ks=$(median_of "${ks[@]}")
m_raw=$(median_of "${raw[@]}")
echo "sync of a one-file commit: keystone ${m_ks} ms, raw git fetch ${m_raw} ms, ratio $(ratio "$m_ks" "$m_raw")x   (median of $N, ${BACKEND:-container})"
