#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): install what is needed,
# prepare the rootless test user, then lint and run every test. The
# end-to-end tests run one at a time: backends compete for 2 cores.
#
#   sudo ./scripts/test.sh
#
# What is slow on a new machine (the Kubernetes test cluster's Go build,
# the guest images, Zellij from crates.io) is built once into
# $KEYSTONE_TEST_CACHE and, the first time, in the background while the
# foreground compiles and the first tests run: the images are mostly
# downloads and the tests leave a core idle. A test that needs an image
# still being built waits on the image store's lock, so the order of the
# work never changes what is tested. A timing summary per phase ends the
# run (and the slowest tests, from the harness's $KEYSTONE_TEST_TIMINGS).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite runs sandboxes as root and as an unprivileged user: run it as root (sudo $0)" >&2
    exit 4
fi

# --- timing ------------------------------------------------------------------

run_started=$SECONDS
phase_log=$(mktemp /tmp/keystone-test-phases.XXXXXX)
phase_name=
phase_t0=0
phase() {
    phase_done
    phase_name=$1
    phase_t0=$SECONDS
    echo "== $phase_name" >&2
}
phase_done() {
    if [ -n "$phase_name" ]; then
        printf '%s\t%s\n' "$((SECONDS - phase_t0))" "$phase_name" >>"$phase_log"
        phase_name=
    fi
}
# Background jobs write their own lines (seconds, name) into the same file.
summary() {
    phase_done
    echo
    echo "== timing (seconds; [bg] ran beside the foreground)"
    awk -F'\t' '{printf "  %6d  %s\n", $1, $2}' "$phase_log"
    printf '  %6d  total\n' "$((SECONDS - run_started))"
    if [ -s "${KEYSTONE_TEST_TIMINGS:-/nonexistent}" ]; then
        echo "== end-to-end seconds per module, and the slowest tests"
        awk -F'\t' '{split($2, p, "::"); m[p[1]] += $1; n[p[1]]++}
                    END {for (k in m) printf "  %6.0f  %s (%d)\n", m[k], k, n[k]}' \
            "$KEYSTONE_TEST_TIMINGS" | sort -rn
        sort -rn "$KEYSTONE_TEST_TIMINGS" | head -12 | awk -F'\t' '{printf "  %6.0f  %s\n", $1, $2}'
    fi
}

# --- what runs in the background, stopped whatever happens ---------------------

bg_pids=()
cluster_up=no
finish() {
    local status=$?
    for pid in "${bg_pids[@]}"; do
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    done
    [ "$cluster_up" = yes ] && ./scripts/test-cluster.sh down || true
    summary
    rm -f "$phase_log"
    exit "$status"
}
trap finish EXIT

# Run "$@" in its own process group (so finish can stop all of it), its
# output in $logs/NAME.log, its time in the summary.
background() {
    local name=$1
    shift
    setsid -w bash -c '
        t0=$SECONDS
        if "${@:3}" >"$1" 2>&1; then r=ok; else r="FAILED (log: $1)"; fi
        printf "%s\t[bg] %s: %s\n" "$((SECONDS - t0))" "$2" "$r" >>"$0"
        [ "$r" = ok ]' "$phase_log" "$logs/$name.log" "$name" "$@" &
    bg_pids+=("$!")
    echo "== [bg] $name (log: $logs/$name.log)" >&2
}

# --- packages, users, caches ------------------------------------------------

phase "packages"
./scripts/install-deps.sh

# The rootless end-to-end tests run as this user, with subordinate ids.
if ! id -u keystone-test >/dev/null 2>&1; then
    useradd -m -s /bin/bash keystone-test
fi
grep -q '^keystone-test:' /etc/subuid || usermod --add-subuids 300000-365535 keystone-test
grep -q '^keystone-test:' /etc/subgid || usermod --add-subgids 300000-365535 keystone-test
# pasta needs /dev/net/tun for unprivileged users; 0666 is Debian's own
# default (some VM images ship it 0600).
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun

# The guest images, tools and compiled code are slow to make: keep them
# between runs.
export KEYSTONE_TEST_CACHE=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
mkdir -p "$KEYSTONE_TEST_CACHE"
# The build directory too: CI runs in a new clone each time, and the
# dependencies need not be compiled again (cargo's fingerprints decide).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$KEYSTONE_TEST_CACHE/cargo-target}
logs=$(mktemp -d /tmp/keystone-test-logs.XXXXXX)
chmod 0755 "$logs"
export KEYSTONE_TEST_TIMINGS=$logs/e2e-timings.tsv

# What only the tests need: a DHCP server for the bridge test (dnsmasq),
# the build dependencies of virtiofsd, and the test cluster's packages
# (all apt work happens here, before anything runs beside it).
test_packages=(dnsmasq-base libseccomp-dev libcap-ng-dev)
for p in "${test_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${test_packages[@]}"
        break
    fi
done
./scripts/test-cluster.sh deps

# --- the Kubernetes test cluster's binaries (Go; ~10 min once, cached) --------

background cluster-build ./scripts/test-cluster.sh build

# --- keystone itself, then the guest images beside the rest --------------------

phase "build keystone"
cargo build --locked -p keystone
keystone=$CARGO_TARGET_DIR/debug/keystone

# The guest images the end-to-end tests use (scripts/test-images.sh says
# how they match the tests'), Zellij last.
background images ./scripts/test-images.sh "$keystone"

# --- lint, unit tests' build ---------------------------------------------------

phase "virtiofsd (for the live-share test)"
# virtiofsd is not in bookworm: it is built from crates.io (under a
# minute) into the cache, once per version.
VIRTIOFSD_VERSION=1.14.0
virtiofsd_root="$KEYSTONE_TEST_CACHE/virtiofsd-$VIRTIOFSD_VERSION"
if [ ! -x "$virtiofsd_root/bin/virtiofsd" ]; then
    cargo install --quiet --locked --root "$virtiofsd_root" --version "$VIRTIOFSD_VERSION" virtiofsd
fi
export PATH="$virtiofsd_root/bin:$PATH"

phase "fmt + clippy"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

phase "build the tests"
cargo test --locked --workspace --all-targets --no-run

# --- the cluster, then every test ---------------------------------------------

phase "wait for the cluster build"
if ! wait "${bg_pids[0]}"; then
    echo "the test cluster's build failed:" >&2
    tail -40 "$logs/cluster-build.log" >&2
    exit 1
fi
phase "cluster up"
# The Kubernetes backend's end-to-end tests run against a real one-node
# cluster built from Debian's archive, torn down afterwards whatever
# happens.
cluster_up=yes
./scripts/test-cluster.sh up
eval "$(./scripts/test-cluster.sh env)"

phase "tests"
log=$logs/cargo-test.log
cargo test --locked --workspace --all-targets -- --test-threads=1 2>&1 | tee "$log"
phase_done
if ! wait "${bg_pids[1]}"; then
    echo "note: the image prebuild failed (the tests built what they needed); its log:" >&2
    tail -20 "$logs/images.log" >&2
fi
bg_pids=()
trap - EXIT
cluster_up=no
./scripts/test-cluster.sh down
summary
# One plain closing line over every test binary.
closing=$(awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed", p, f}' "$log")
rm -rf "$phase_log" "$logs"
echo "$closing"
