#!/usr/bin/env bash
# Build the guest images the end-to-end tests use into the test cache,
# ahead of the tests (scripts/test.sh runs this beside its compile and
# the first tests). keystone builds them exactly as the harness runs it:
# a cleared environment, a HOME with nothing in it, the shared cache as
# XDG_CACHE_HOME, the rootless user's own cache for its image. The order
# is the order in which the tests first need them; Zellij (a cargo build
# from crates.io) last, since only the last test uses it. A recipe that
# drifts from a test's only costs that test its own build.
#
#   scripts/test-images.sh KEYSTONE-BINARY
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (it also builds as user keystone-test)" >&2; exit 4; }
binary=${1:?usage: $0 KEYSTONE-BINARY}
cache=${KEYSTONE_TEST_CACHE:-/var/tmp/keystone-test-cache}
user=keystone-test
user_cache=$cache/user-$user

work=$(mktemp -d /tmp/keystone-test-images.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
cp "$binary" "$work/keystone"
mkdir -p "$work/home-root" "$work/home-$user" "$user_cache"
chown "$user" "$work/home-$user" "$user_cache"

# build USER CACHE [VAR=VALUE...] -- ARGS...: `keystone agent image build ARGS`.
build() {
    local who=$1 dir=$2
    shift 2
    local vars=()
    while [ "$1" != -- ]; do vars+=("$1"); shift; done
    shift
    local run=()
    [ "$who" = root ] || run=(runuser -u "$who" --)
    echo "== image build $* ${vars[*]} (as $who)"
    (cd /tmp && "${run[@]}" env -i PATH="$PATH" HOME="$work/home-$who" LANG=C.UTF-8 \
        XDG_CACHE_HOME="$dir" XDG_CONFIG_HOME="$work/home-$who/.config" \
        XDG_STATE_HOME="$work/home-$who/.state" "${vars[@]}" \
        "$work/keystone" agent image build "$@")
}

build root "$cache" -- --profile minimal
build root "$cache" -- --profile full
build "$user" "$user_cache" -- --profile minimal
build root "$cache" KEYSTONE_AGENT_MULTIPLEXER=zellij -- --profile minimal
