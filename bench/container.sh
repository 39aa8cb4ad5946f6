#!/usr/bin/env bash
# Benchmark: the container backend against baselines measured in the same run.
#
#  1. warm `keystone agent start` to a working `exec`, vs a bare
#     `bwrap --unshare-all` on the same root filesystem starting sshd and
#     running one command over ssh inside it;
#  2. `keystone agent exec -- true` round trip, vs plain `ssh` reusing the
#     same master connection.
#
# Prints absolute figures and ratios. Not a test: nothing here fails on time.
#   sudo ./bench/container.sh [ITERATIONS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-5}
bench_require bwrap:bubblewrap python3:python3 bc:bc
bench_build
bench_project bench container
$K agent start --no-attach >/dev/null 2>&1     # cold: builds/unpacks the image once
$K agent stop >/dev/null

# 1. keystone warm start → exec
bench_warm_starts "$N"

# Baseline: bwrap --unshare-all on the same unpacked rootfs, sshd, one ssh.
image=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sandboxes"][0]["settings"]["image"])' "$XDG_STATE_HOME/keystone/registry.json")
rootfs=$XDG_CACHE_HOME/keystone/container/$image
guest=$XDG_STATE_HOME/keystone/sandboxes/bench/ssh/guest
key=$XDG_STATE_HOME/keystone/sandboxes/bench/ssh/id_ed25519
cp "$key" "$work/client_key"; chmod 600 "$work/client_key"
base=()
for _ in $(seq "$N"); do
    t0=$(now)
    # All namespaces but the user namespace: in bwrap's single-id user
    # namespace sshd's privilege separation cannot call setgroups().
    bwrap --unshare-ipc --unshare-pid --unshare-net --unshare-uts --unshare-cgroup-try --cap-add ALL --die-with-parent \
        --ro-bind "$rootfs" / --proc /proc --dev /dev --tmpfs /run --tmpfs /tmp \
        --ro-bind "$guest" /etc/keystone --ro-bind "$work/client_key" /tmp/key \
        sh -c 'ip link set lo up; mkdir -p /run/sshd; /usr/sbin/sshd -o ListenAddress=127.0.0.1 -p 2222;
               until ssh -q -i /tmp/key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p 2222 agent@127.0.0.1 true 2>/dev/null; do sleep 0.01; done'
    t1=$(now)
    base+=("$(ms "$t0" "$t1")")
done

# 2. exec round trip vs plain reused ssh
$K agent start --no-attach >/dev/null 2>&1
$K agent exec -- true
cfg=$XDG_STATE_HOME/keystone/sandboxes/bench/ssh/config
ks_exec=(); ssh_exec=()
for _ in $(seq $((N * 4))); do
    t0=$(now); $K agent exec -- true; t1=$(now); ks_exec+=("$(ms "$t0" "$t1")")
    t0=$(now); ssh -F "$cfg" keystone-bench -- true; t1=$(now); ssh_exec+=("$(ms "$t0" "$t1")")
done

m_start=$(median_of "${warm[@]}")
m_base=$(median_of "${base[@]}")
m_exec=$(median_of "${ks_exec[@]}")
m_ssh=$(median_of "${ssh_exec[@]}")
echo "warm start to working exec: keystone ${m_start} ms, bwrap+sshd baseline ${m_base} ms, ratio $(ratio "$m_start" "$m_base")x   (median of $N)"
echo "exec -- true round trip:    keystone ${m_exec} ms, plain reused ssh ${m_ssh} ms, ratio $(ratio "$m_exec" "$m_ssh")x   (median of $((N * 4)))"
