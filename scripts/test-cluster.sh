#!/usr/bin/env bash
# A one-node Kubernetes cluster built from Debian's archive alone, for the
# Kubernetes backend's end-to-end tests (no registry, no prebuilt server
# binaries are reachable here; see /work/shared/KUBERNETES-TESTING.md).
#
#   scripts/test-cluster.sh build   build kube-apiserver + kubelet from
#                                   bookworm's `kubernetes` source package,
#                                   cached by version (slow: ~15 min, once)
#   scripts/test-cluster.sh up      start etcd, containerd, apiserver and
#                                   kubelet in a network namespace of our own;
#                                   write an admin kubeconfig
#   scripts/test-cluster.sh env     print `export KUBECONFIG=...` for the tests
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

cmd_build() {
    need_root build
    if have_binaries; then
        log "cached: $BIN_DIR"
        return 0
    fi
    # golang-go (1.19) builds 1.20.2; rsync and jq are used by its make rules;
    # dpkg-dev unpacks the source package.
    apt_install golang-go rsync jq dpkg-dev make
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

case "${1:-}" in
    build) cmd_build ;;
    *) echo "usage: $0 build|up|env|import TAR|down" >&2; exit 2 ;;
esac
