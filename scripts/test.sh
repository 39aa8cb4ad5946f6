#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): install what is needed,
# prepare the rootless test user, then lint and run every test. The
# end-to-end tests run one at a time: backends compete for 2 cores.
#
#   sudo ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite runs sandboxes as root and as an unprivileged user: run it as root (sudo $0)" >&2
    exit 4
fi

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

# The guest image is slow to build: keep it between runs.
export KEYSTONE_TEST_CACHE=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
mkdir -p "$KEYSTONE_TEST_CACHE"

# What only the tests need: a DHCP server for the bridge test (dnsmasq),
# and virtiofsd for the live-share test. virtiofsd is not in bookworm: it
# is built from crates.io (under a minute) into the cache, once per version.
test_packages=(dnsmasq-base libseccomp-dev libcap-ng-dev)
for p in "${test_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${test_packages[@]}"
        break
    fi
done
VIRTIOFSD_VERSION=1.14.0
virtiofsd_root="$KEYSTONE_TEST_CACHE/virtiofsd-$VIRTIOFSD_VERSION"
if [ ! -x "$virtiofsd_root/bin/virtiofsd" ]; then
    cargo install --quiet --locked --root "$virtiofsd_root" --version "$VIRTIOFSD_VERSION" virtiofsd
fi
export PATH="$virtiofsd_root/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The Kubernetes backend's end-to-end tests run against a real one-node
# cluster built from Debian's archive (scripts/test-cluster.sh: compiled
# once, ~13 min on 2 cores, cached in $KEYSTONE_TEST_CACHE; up in ~30 s),
# torn down afterwards whatever happens.
./scripts/test-cluster.sh up
trap './scripts/test-cluster.sh down' EXIT
eval "$(./scripts/test-cluster.sh env)"

log=$(mktemp /tmp/keystone-test.XXXXXX.log)
cargo test --locked --workspace --all-targets -- --test-threads=1 2>&1 | tee "$log"
# One plain closing line over every test binary.
awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
