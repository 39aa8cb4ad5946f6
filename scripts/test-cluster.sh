#!/usr/bin/env bash
# A one-node Kubernetes cluster built from Debian's archive alone, for the
# Kubernetes backend's end-to-end tests (no registry, no prebuilt server
# binaries are reachable here; see /work/shared/KUBERNETES-TESTING.md).
#
#   scripts/test-cluster.sh deps    install the Debian packages build and up
#                                   need (apt: run it before anything else
#                                   that uses apt runs beside `build`)
#   scripts/test-cluster.sh build   build kube-apiserver + kubelet from
#                                   bookworm's `kubernetes` source package,
#                                   cached by version (slow: ~15 min, once)
#   scripts/test-cluster.sh up      start etcd, containerd, apiserver and
#                                   kubelet in a network namespace of our own;
#                                   write an admin kubeconfig
#   scripts/test-cluster.sh env     print `export KUBECONFIG=... KEYSTONE_TEST_REGISTRY=...`
#                                   for the tests (the registry: plain HTTP,
#                                   on the host end of the node's veth)
#   scripts/test-cluster.sh import TAR   import an OCI archive into the node
#   scripts/test-cluster.sh down    stop everything, remove every trace
#
# Run as root. Binaries are cached under
# ${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}/kubernetes/<version>/.
set -euo pipefail

K8S_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
K8S_VERSION=v1.20.2
CACHE=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
BIN_DIR=$CACHE/kubernetes/$K8S_DEB_VERSION

# kube-scheduler places pods; kube-controller-manager binds claims (with its
# test-only hostPath provisioner), creates service accounts, collects
# garbage and removes finalizers: a cluster that behaves like a real one.
SERVER_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

have_binaries() {
    local b
    for b in "${SERVER_BINARIES[@]}"; do [ -x "$BIN_DIR/$b" ] || return 1; done
}

die() { echo "test-cluster: $*" >&2; exit 4; }
log() { echo "test-cluster: $*" >&2; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
}

# apt-get install only what is missing (the lists are refreshed once).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing: ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

# --- build -----------------------------------------------------------------

# The source package is only published as source for bookworm: add deb-src
# lines for it (a file of our own, so nothing the admin wrote is edited).
ensure_deb_src() {
    local f=/etc/apt/sources.list.d/keystone-deb-src.sources
    if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
        cat >"$f" <<'EOF'
# Added by keystone scripts/test-cluster.sh: the test cluster's
# kube-apiserver and kubelet are built from bookworm's kubernetes source.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get update -q >&2
    fi
}

# golang-go (1.19) builds 1.20.2; rsync and jq are used by its make rules;
# dpkg-dev unpacks the source package.
BUILD_PACKAGES=(golang-go rsync jq dpkg-dev make)
UP_PACKAGES=(etcd-server containerd runc containernetworking-plugins busybox-static
             openssl jq iproute2 util-linux curl docker-registry skopeo)

cmd_deps() {
    need_root deps
    have_binaries || apt_install "${BUILD_PACKAGES[@]}"
    have_binaries || ensure_deb_src
    apt_install "${UP_PACKAGES[@]}"
    # kubectl: bookworm's kubernetes-client (1.20), unless one is installed.
    command -v kubectl >/dev/null || apt_install kubernetes-client
}

cmd_build() {
    need_root build
    if have_binaries; then
        log "cached: $BIN_DIR"
        return 0
    fi
    apt_install "${BUILD_PACKAGES[@]}"
    ensure_deb_src

    local work=$CACHE/kubernetes/build-$K8S_DEB_VERSION
    mkdir -p "$work"
    local tree
    tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
    if [ -z "$tree" ]; then
        (cd "$work" && apt-get source -q "kubernetes=$K8S_DEB_VERSION" >&2)
        tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
        [ -n "$tree" ] || die "apt-get source kubernetes=$K8S_DEB_VERSION unpacked nothing in $work"
    fi
    # As the package's debian/rules does: the tree must sit at
    # $GOPATH/src/k8s.io/kubernetes.
    local gopath=$work/gopath
    mkdir -p "$gopath/src/k8s.io"
    ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"

    local t0=$SECONDS
    log "building ${SERVER_BINARIES[*]} (nice -n 10; this takes 15+ minutes)"
    (
        cd "$gopath/src/k8s.io/kubernetes"
        # No .git in a source package: give the version stamp directly.
        env GOPATH="$gopath" GOCACHE="$work/gocache" CGO_ENABLED=0 \
            KUBE_GIT_VERSION=$K8S_VERSION KUBE_GIT_TREE_STATE=clean \
            KUBE_GIT_COMMIT=debian-$K8S_DEB_VERSION \
            nice -n 10 make WHAT="${SERVER_BINARIES[*]/#/cmd/}" >&2
    )
    mkdir -p "$BIN_DIR.tmp"
    local out="$tree/_output/local/bin/linux/amd64" b
    [ -d "$out" ] || out="$tree/_output/bin"
    for b in "${SERVER_BINARIES[@]}"; do cp "$out/$b" "$BIN_DIR.tmp/"; done
    rm -rf "$BIN_DIR"
    mv "$BIN_DIR.tmp" "$BIN_DIR"
    log "built in $((SECONDS - t0)) s: $BIN_DIR"
    # The tree and Go cache are ~2.5 GB; only the binaries are kept.
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}

# --- up / down -------------------------------------------------------------

STATE=${KEYSTONE_TEST_CLUSTER_DIR:-/var/tmp/keystone-test-cluster}
NETNS=keystone-k8s
HOST_IP=10.250.0.1
NODE_IP=10.250.0.2
SERVICE_CIDR=10.252.0.0/24
SERVICE_IP=10.252.0.1
POD_CIDR=10.251.0.0/24
NODE_NAME=keystone-node
PAUSE_IMAGE=localhost/keystone-pause:1
# A plain-HTTP registry (Debian's docker-registry) on the host end of the
# veth: `keystone agent image push` targets it, the node pulls from it.
REGISTRY=$HOST_IP:5000
SOCK=$STATE/containerd/containerd.sock
KUBECONFIG_PATH=$STATE/admin.kubeconfig
# The controller-manager's test-only hostPath provisioner creates volumes
# here (a path fixed in its code); its deleter only removes under /tmp.
HOSTPATH_PV_DIR=/tmp/hostpath_pv

# Every process runs in our network namespace: the kubelet refuses a
# loopback node address, and `ip netns exec` would remount /sys and hide the
# cgroup mounts from the kubelet, so enter with nsenter.
in_ns() { nsenter --net="/var/run/netns/$NETNS" -- "$@"; }

# start NAME CMD...: detached, in the namespace, logged, pid recorded.
start() {
    local name=$1; shift
    mkdir -p "$STATE/logs" "$STATE/pids"
    setsid nsenter --net="/var/run/netns/$NETNS" -- "$@" \
        >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name.pid"
}

# start_host NAME CMD...: as start, in the host's own network namespace.
start_host() {
    local name=$1; shift
    mkdir -p "$STATE/logs" "$STATE/pids"
    setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name.pid"
}

alive() {
    local f=$STATE/pids/$1.pid
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

kctl() { kubectl --kubeconfig="$KUBECONFIG_PATH" "$@"; }

# wait_for SECONDS WHAT CMD...: bounded; shows the component's log on failure.
wait_for() {
    local secs=$1 what=$2 i; shift 2
    for ((i = 0; i < secs * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$what did not come up within ${secs}s"
    local l
    for l in "$STATE"/logs/*.log; do
        echo "--- last lines of $l" >&2
        tail -n 15 "$l" >&2
    done
    return 1
}

# make_oci_archive ROOTDIR NAME OUT ENTRYPOINT...: a one-layer OCI image
# archive whose index names the image for `ctr images import`.
make_oci_archive() {
    local root=$1 name=$2 out=$3; shift 3
    local d; d=$(mktemp -d)
    mkdir -p "$d/blobs/sha256"
    tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$d/layer" .
    local ld ls cd cs md ms
    ld=$(sha256sum "$d/layer" | cut -d' ' -f1); ls=$(stat -c %s "$d/layer")
    mv "$d/layer" "$d/blobs/sha256/$ld"
    local entry; entry=$(printf '%s\n' "$@" | jq -R . | jq -sc .)
    jq -nc --arg l "sha256:$ld" --argjson e "$entry" \
        '{architecture:"amd64",os:"linux",config:{Entrypoint:$e,Env:["PATH=/bin"]},rootfs:{type:"layers",diff_ids:[$l]}}' >"$d/cfg"
    cd=$(sha256sum "$d/cfg" | cut -d' ' -f1); cs=$(stat -c %s "$d/cfg")
    mv "$d/cfg" "$d/blobs/sha256/$cd"
    jq -nc --arg c "sha256:$cd" --argjson cs "$cs" --arg l "sha256:$ld" --argjson ls "$ls" \
        '{schemaVersion:2,mediaType:"application/vnd.oci.image.manifest.v1+json",config:{mediaType:"application/vnd.oci.image.config.v1+json",digest:$c,size:$cs},layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar",digest:$l,size:$ls}]}' >"$d/m"
    md=$(sha256sum "$d/m" | cut -d' ' -f1); ms=$(stat -c %s "$d/m")
    mv "$d/m" "$d/blobs/sha256/$md"
    jq -nc --arg m "sha256:$md" --argjson ms "$ms" --arg n "$name" --arg t "${name##*:}" \
        '{schemaVersion:2,manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json",digest:$m,size:$ms,platform:{architecture:"amd64",os:"linux"},annotations:{"io.containerd.image.name":$n,"org.opencontainers.image.ref.name":$t}}]}' >"$d/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$d/oci-layout"
    tar -C "$d" -cf "$out" oci-layout index.json blobs
    rm -rf "$d"
}

cmd_import() {
    need_root import
    local tar=${1:?usage: $0 import OCI-ARCHIVE}
    [ -S "$SOCK" ] || die "the cluster is not up (no $SOCK): run $0 up"
    in_ns ctr --address "$SOCK" -n k8s.io images import "$tar" >&2
}

certs() {
    local pki=$STATE/pki
    mkdir -p "$pki"
    (
        cd "$pki"
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=keystone-test-ca \
            -keyout ca.key -out ca.crt 2>/dev/null
        cat >apiserver.ext <<EOF
subjectAltName=IP:$NODE_IP,IP:$SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EOF
        openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile apiserver.ext -out apiserver.crt 2>/dev/null
        # One admin identity (system:masters) for us, the tests and the
        # cluster's own components: this cluster lives for one test run.
        echo "extendedKeyUsage=clientAuth" >client.ext
        openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=keystone-admin" \
            -keyout admin.key -out admin.csr 2>/dev/null
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile client.ext -out admin.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
    cat >"$KUBECONFIG_PATH" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: keystone-test
  cluster:
    server: https://$NODE_IP:6443
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: keystone-admin
  user:
    client-certificate-data: $(base64 -w0 <"$pki/admin.crt")
    client-key-data: $(base64 -w0 <"$pki/admin.key")
contexts:
- name: keystone-test
  context: {cluster: keystone-test, user: keystone-admin}
current-context: keystone-test
EOF
    chmod 0644 "$KUBECONFIG_PATH"
}

cmd_up() {
    need_root up
    if alive kubelet && kctl get --raw /readyz >/dev/null 2>&1; then
        log "already up; $(cmd_env)"
        return 0
    fi
    cmd_down
    cmd_build
    apt_install "${UP_PACKAGES[@]}"
    # kubectl: bookworm's kubernetes-client (1.20), unless one is installed.
    command -v kubectl >/dev/null || apt_install kubernetes-client
    local t0=$SECONDS
    mkdir -p "$STATE"/{logs,pids,containerd,cni,kubelet,etcd}

    ip netns add "$NETNS"
    ip link add kst-host type veth peer name kst-node
    ip link set kst-node netns "$NETNS"
    ip addr add "$HOST_IP/24" dev kst-host
    ip link set kst-host up
    in_ns ip link set lo up
    in_ns ip addr add "$NODE_IP/24" dev kst-node
    in_ns ip link set kst-node up
    in_ns ip route add default via "$HOST_IP"
    # Pods reach what the namespace routes to (a test's lab; nothing else
    # routes back to the pod network): forwarding inside the namespace only.
    in_ns sysctl -q -w net.ipv4.ip_forward=1

    certs
    local pki=$STATE/pki

    mkdir -p "$STATE/registry"
    cat >"$STATE/registry/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $STATE/registry/data}
  delete: {enabled: true}
http: {addr: "$REGISTRY"}
EOF
    start_host registry docker-registry serve "$STATE/registry/config.yml"
    wait_for 30 "the registry" curl -fs "http://$REGISTRY/v2/"

    start etcd etcd --name keystone-test --data-dir "$STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster keystone-test=http://127.0.0.1:2380
    wait_for 30 etcd in_ns curl -fs http://127.0.0.1:2379/health

    # The pod network: the bridge plugin on a bridge inside the namespace.
    cat >"$STATE/cni/10-keystone.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "keystone-test", "plugins": [
  {"type": "bridge", "bridge": "kst-cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$STATE/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
    # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc
    # fails ("can't get final child's PID from pipe") without it.
    cat >"$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."$REGISTRY"]
    endpoint = ["http://$REGISTRY"]
EOF
    start containerd containerd --config "$STATE/containerd/config.toml"
    wait_for 30 containerd in_ns ctr --address "$SOCK" version

    # The sandbox ("pause") image: busybox-static sleeping; there is no
    # registry to pull Kubernetes' own from.
    local pause; pause=$(mktemp -d)
    mkdir -p "$pause/root/bin"
    cp /bin/busybox "$pause/root/bin/busybox"
    make_oci_archive "$pause/root" "$PAUSE_IMAGE" "$pause/pause.tar" /bin/busybox sleep 2147483647
    cmd_import "$pause/pause.tar" >/dev/null
    rm -rf "$pause"

    start kube-apiserver "$BIN_DIR/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 \
        --advertise-address="$NODE_IP" --secure-port=6443 --insecure-port=0 \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key" \
        --kubelet-preferred-address-types=InternalIP \
        --service-account-key-file="$pki/sa.pub" \
        --service-account-signing-key-file="$pki/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc \
        --authorization-mode=RBAC
    wait_for 90 kube-apiserver kctl get --raw /readyz

    start kube-controller-manager "$BIN_DIR/kube-controller-manager" \
        --kubeconfig="$KUBECONFIG_PATH" --leader-elect=false --port=0 \
        --bind-address=127.0.0.1 \
        --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
        --enable-hostpath-provisioner=true
    start kube-scheduler "$BIN_DIR/kube-scheduler" \
        --kubeconfig="$KUBECONFIG_PATH" --leader-elect=false --port=0 --bind-address=127.0.0.1

    cat >"$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
cgroupDriver: cgroupfs
failSwapOn: false
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
maxPods: 30
EOF
    start kubelet "$BIN_DIR/kubelet" --config="$STATE/kubelet/config.yaml" \
        --kubeconfig="$KUBECONFIG_PATH" --root-dir="$STATE/kubelet" \
        --cert-dir="$STATE/kubelet/pki" \
        --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
        --node-ip="$NODE_IP" --hostname-override="$NODE_NAME"
    wait_for 120 "the node" kctl wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
    wait_for 60 "the default service account" kctl -n default get serviceaccount default

    # Claims are bound to hostPath volumes the controller-manager provisions
    # under $HOSTPATH_PV_DIR and deletes with the claim.
    kctl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
    log "up in $((SECONDS - t0)) s; $(cmd_env)"
}

cmd_env() {
    echo "export KUBECONFIG=$KUBECONFIG_PATH KEYSTONE_TEST_REGISTRY=$REGISTRY"
    # Where the pods are, for tests that give them a route to a network of
    # their own (the egress lab, crates/keystone/tests/e2e/lab.rs).
    echo "export KEYSTONE_TEST_CLUSTER_NETNS=$NETNS KEYSTONE_TEST_POD_CIDR=$POD_CIDR"
    # The cluster is local: never through a proxy the environment names.
    local np="$HOST_IP,$NODE_IP"
    echo "export NO_PROXY=${NO_PROXY:+$NO_PROXY,}$np no_proxy=${no_proxy:+$no_proxy,}$np"
}

# Stop a recorded process: TERM, a bounded wait, then KILL.
stop_proc() {
    local f=$STATE/pids/$1.pid pid i
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

cmd_down() {
    need_root down
    # Pods first, while the kubelet can still stop them.
    if alive kube-apiserver && alive kubelet; then
        kctl delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    fi
    stop_proc kubelet
    stop_proc kube-scheduler
    stop_proc kube-controller-manager
    # Whatever the kubelet left: every task of our containerd, then its
    # shims (found by our own socket path on their command line).
    if [ -S "$SOCK" ] && alive containerd; then
        local t
        for t in $(in_ns ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
            in_ns ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
        done
    fi
    stop_proc kube-apiserver
    stop_proc containerd
    stop_proc etcd
    stop_proc registry
    local pid
    for pid in $(pgrep -f -- "-address $SOCK" || true); do
        kill -9 "$pid" 2>/dev/null || true
    done
    # Mounts under our state (pod volumes, rootfs overlays, shm), deepest
    # first.
    if [ -d "$STATE" ]; then
        local m
        findmnt -rn -o TARGET | grep -F "$STATE/" | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
    fi
    # The kubelet's cgroups (cgroupfs driver): empty once the pods are gone.
    local c
    for c in /sys/fs/cgroup/*/kubepods; do
        [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    ip netns del "$NETNS" 2>/dev/null || true
    ip link del kst-host 2>/dev/null || true
    rm -rf "$STATE" "$HOSTPATH_PV_DIR"
}

case "${1:-}" in
    deps) cmd_deps ;;
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    import) shift; cmd_import "$@" ;;
    *) echo "usage: $0 deps|build|up|env|import TAR|down" >&2; exit 2 ;;
esac
