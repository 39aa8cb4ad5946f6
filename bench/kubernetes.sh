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
source "$(dirname "$0")/lib.sh"
N=${1:-5}
bench_require kubectl:kubernetes-client bc:bc
if [ -z "${KUBECONFIG:-}" ]; then
    eval "$(./scripts/test-cluster.sh env)"
fi
export KUBECONFIG
kubectl get --raw /readyz >/dev/null 2>&1 || {
    echo "no cluster answers at KUBECONFIG=$KUBECONFIG: run sudo scripts/test-cluster.sh up" >&2; exit 4; }
bench_build
NS=keystone-bench
bench_project bench kubernetes "" "[backend.kubernetes]\nnamespace = \"$NS\"\npull_policy = \"never\"\n"
bench_at_exit 'kubectl -n $NS delete pod bare --grace-period=0 --force >/dev/null 2>&1'
# The image into the node (built once; the import is quick when present).
built=$($K agent image build --format oci)
archive=$(sed -n 's/^OCI image archive: \([^ ]*\) .*/\1/p' <<<"$built")
image=$(sed -n 's/^OCI image archive: [^ ]* (\(.*\))$/\1/p' <<<"$built")
"$ROOT/scripts/test-cluster.sh" import "$archive" >/dev/null
$K agent start --no-attach >/dev/null 2>&1     # cold: namespace, claim, first push
$K agent stop >/dev/null

bench_warm_starts "$N"

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

m_ks=$(median_of "${warm[@]}")
m_bare=$(median_of "${bare[@]}")
echo "warm start to working exec: keystone ${m_ks} ms, bare pod to Ready ${m_bare} ms, ratio $(ratio "$m_ks" "$m_bare")x   (median of $N)"
