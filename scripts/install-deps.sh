#!/usr/bin/env bash
# Install the Debian packages keystone needs on the host, and check for a
# Rust toolchain. Idempotent; run as root (or with sudo).
#
#   git, openssh-client      the channel (ssh + ProxyCommand) and sync
#   mmdebstrap               builds the guest image from Debian's archive
#   passt                    pasta: --network nat for the container backend
#   uidmap                   newuidmap/newgidmap: rootless containers
#   tar, rsync, e2fsprogs    image unpacking, artifacts, microVM disks
#   qemu-system-x86, qemu-utils   the microvm backend
#   tmux                     driving terminals in tests
#   skopeo                   `image push`: the OCI image to a registry
set -euo pipefail

packages=(git openssh-client mmdebstrap passt uidmap tar rsync e2fsprogs
          qemu-system-x86 qemu-utils tmux ca-certificates procps iproute2 bubblewrap bc skopeo)

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install a Rust toolchain (https://rustup.rs) and re-run" >&2
    exit 4
fi
