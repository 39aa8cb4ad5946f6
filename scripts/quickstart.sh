#!/usr/bin/env bash
# The main job for a newcomer: install what is needed, build keystone, and
# start a sandbox for a git repository (a demo repository if none given).
#
#   ./scripts/quickstart.sh [PATH-TO-GIT-REPO]
set -euo pipefail
# A relative repository path is the caller's, not the checkout's.
repo=${1:-}
case "$repo" in
    "" | /*) ;;
    *) repo=$PWD/$repo ;;
esac
cd "$(dirname "$0")/.."
root=$(pwd)

./scripts/install-deps.sh
cargo build --release --locked -p keystone
keystone="$root/target/release/keystone"

if [ -z "$repo" ]; then
    repo=$(mktemp -d /tmp/keystone-demo.XXXXXX)/demo
    mkdir -p "$repo"
    git -C "$repo" init -q -b main
    echo "# demo" > "$repo/README.md"
    git -C "$repo" add README.md
    git -C "$repo" -c user.name="Keystone Demo" -c user.email=demo@example.com commit -q -m "demo repository"
    echo "no repository given: using a demo repository at $repo"
fi

cd "$repo"
"$keystone" agent doctor || true
# The default backend: a microVM (QEMU; KVM when it works, else TCG).
# Attaches to the session when run on a terminal; otherwise prints how to.
"$keystone" agent start
"$keystone" agent status
echo
echo "keystone is at $keystone; try:"
echo "  cd $repo && $keystone agent exec -- git log --oneline"
echo "  $keystone agent attach      # tmux session in /workspace (detach: C-b d)"
echo "  $keystone agent sync        # bring the sandbox's commits home"
echo "  $keystone agent destroy $(basename "$repo") --force"
