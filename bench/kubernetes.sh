#!/usr/bin/env bash
# Benchmark: the Kubernetes backend against the cluster itself, same run.
#
#   warm `keystone agent start` to a working `exec` (the guest image already
#   in the node, the workspace claim kept from the previous start: a new
#   pod, its Secret, the port-forward, sshd answering, one command over
#   SSH), vs the time the cluster takes to run a bare pod of the same image
#   to Ready (`kubectl run` + `kubectl wait`).
#
# Needs the test cluster (scripts/test-cluster.sh up) or any cluster in
# KUBECONFIG with the guest image imported. Prints absolute figures and the
# ratio. Not a test: nothing here fails on time.
#   sudo ./bench/kubernetes.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-5}
command -v kubectl >/dev/null || { echo "kubectl is required: apt-get install kubernetes-client" >&2; exit 4; }
if [ -z "${KUBECONFIG:-}" ]; then
    eval "$(./scripts/test-cluster.sh env)"
fi
export KUBECONFIG
kubectl get --raw /readyz >/dev/null 2>&1 || {
    echo "no cluster answers at KUBECONFIG=$KUBECONFIG: run sudo scripts/test-cluster.sh up" >&2; exit 4; }
cargo build --release --locked -q -p keystone
K=$PWD/target/release/keystone
NS=keystone-bench
work=$(mktemp -d /tmp/ks-bench.XXXXXX)
trap 'cd /; $K agent destroy bench --force >/dev/null 2>&1 || true; kubectl -n $NS delete pod bare --grace-period=0 --force >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export XDG_STATE_HOME=$work/state XDG_CONFIG_HOME=$work/config
export XDG_CACHE_HOME=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
mkdir -p "$XDG_CONFIG_HOME/keystone" "$work/bench"
printf '[defaults]\nmemory = 2048\nvcpus = 2\n[backend]\ntype = "kubernetes"\n[backend.kubernetes]\nnamespace = "%s"\npull_policy = "never"\n[guest]\nprofile = "minimal"\n' "$NS" \
    > "$XDG_CONFIG_HOME/keystone/agent.toml"
cd "$work/bench"
git init -q -b main && git -c user.name=b -c user.email=b@e commit -q --allow-empty -m init
# The image into the node (built once; the import is quick when present).
built=$($K agent image build --format oci)
archive=$(sed -n 's/^OCI image archive: \([^ ]*\) .*/\1/p' <<<"$built")
image=$(sed -n 's/^OCI image archive: [^ ]* (\(.*\))$/\1/p' <<<"$built")
"$ROOT/scripts/test-cluster.sh" import "$archive" >/dev/null
$K agent start --no-attach >/dev/null 2>&1     # cold: namespace, claim, first push
$K agent stop >/dev/null

now() { date +%s%N; }
ms() { echo "scale=1; ($2 - $1) / 1000000" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

ks=()
for _ in $(seq "$N"); do
    t0=$(now); $K agent start --no-attach >/dev/null 2>&1; $K agent exec -- true; t1=$(now)
    ks+=("$(ms "$t0" "$t1")")
    $K agent stop >/dev/null
done

bare=()
for _ in $(seq "$N"); do
    t0=$(now)
    kubectl -n "$NS" run bare --image="$image" --image-pull-policy=Never --restart=Never \
        --command -- /bin/sh -c 'exec sleep infinity' >/dev/null
    kubectl -n "$NS" wait --for=condition=Ready pod/bare --timeout=120s >/dev/null
    t1=$(now)
    bare+=("$(ms "$t0" "$t1")")
    kubectl -n "$NS" delete pod bare --grace-period=0 --force --wait=true >/dev/null 2>&1
done

m_ks=$(printf '%s\n' "${ks[@]}" | median)
m_bare=$(printf '%s\n' "${bare[@]}" | median)
echo "warm start to working exec: keystone ${m_ks} ms, bare pod to Ready ${m_bare} ms, ratio $(echo "scale=2; $m_ks / $m_bare" | bc)x   (median of $N)"
