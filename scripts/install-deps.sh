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
#   npm                      build time: fetches xterm.js (the web terminal) from the npm registry
#   chromium, chromium-driver   the web terminal's end-to-end test (headless, WebDriver)
#   curl, chromium           the dev-server proxy's end-to-end tests (HTTP
#                            from the host; a page screenshot in a browser)
#   caddy, wrk               bench/proxy.sh: the reverse-proxy baseline and
#                            the load generator (latency percentiles)
#   skopeo                   `image push`: the OCI image to a registry
#   iproute2                 the egress allowlist's network namespace (`ip`)
#   python3, openssl         the egress tests' lab (its servers, its
#                            self-signed certificate) and bench/egress.sh
set -euo pipefail

packages=(git openssh-client mmdebstrap passt uidmap tar rsync e2fsprogs
          qemu-system-x86 qemu-utils tmux ca-certificates procps iproute2 bubblewrap bc
          npm chromium chromium-driver curl caddy wrk skopeo python3 openssl)

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

# npm may come with a Node.js from elsewhere (NodeSource's nodejs bundles
# it and conflicts with Debian's npm package): any working npm will do.
if command -v npm >/dev/null 2>&1; then
    packages=("${packages[@]/npm}")
fi

missing_packages() {
    for p in "${packages[@]}"; do
        [ -n "$p" ] || continue
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
# Two passes: installing one package can remove another (bookworm's
# qemu-system-x86 removes a backported qemu-utils, for one).
updated=no
for pass in 1 2; do
    mapfile -t missing < <(missing_packages)
    [ "${#missing[@]}" -eq 0 ] && break
    echo "installing: ${missing[*]}"
    if [ "$updated" = no ]; then
        $SUDO apt-get update -q
        updated=yes
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
done
mapfile -t missing < <(missing_packages)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "could not install: ${missing[*]}" >&2
    exit 4
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install a Rust toolchain (https://rustup.rs) and re-run" >&2
    exit 4
fi
