//! What goes into the guest beyond Debian's packages: the files we write and
//! the mmdebstrap customize hooks that write them.
//!
//! Every byte here is part of [`crate::Recipe::hash`], so editing any of it
//! changes the image id and the next `ensure` builds a fresh image instead of
//! reusing a stale one.
//!
//! The hooks run under `sh` on the host side of the chroot with the root
//! directory in `$1`, as root (really root in root mode, the namespace's root
//! in unshare mode). Ownership is therefore always written as numbers: the
//! host's user names mean nothing inside the guest.

use crate::agents::{self, AgentSetup};

/// The guest's unprivileged user, the one agents run as.
pub const AGENT_USER: &str = "agent";
/// Its uid and gid; the backends map the host user onto these.
pub const AGENT_UID: u32 = 1000;
/// The project checkout inside the guest.
pub const WORKSPACE: &str = "/workspace";
/// Empty in the image; the backend mounts the per-sandbox SSH host key and
/// `authorized_keys` here at run time, so one image serves every sandbox.
pub const KEYSTONE_ETC: &str = "/etc/keystone";

/// `/etc/ssh/sshd_config.d/keystone.conf`.
///
/// Debian's `sshd_config` includes `sshd_config.d/*.conf` first, and sshd
/// keeps the first value it reads, so these override Debian's defaults
/// (`UsePAM yes`, `X11Forwarding yes`).
pub const SSHD_CONFIG: &str = "\
# Written by keystone. Keys come from /etc/keystone, mounted per sandbox.
HostKey /etc/keystone/ssh_host_ed25519_key
AuthorizedKeysFile /etc/keystone/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitUserEnvironment no
AllowTcpForwarding local
MaxStartups 100:30:200
MaxSessions 100
ClientAliveInterval 30
PrintMotd no
AcceptEnv LANG LC_* COLORTERM
";

/// `/etc/sudoers.d/agent`, mode 0440 (sudo ignores group/world-writable files).
pub const SUDOERS: &str = "agent ALL=(ALL) NOPASSWD:ALL\n";

/// Appended to `/home/agent/.bashrc`.
pub const BASHRC_APPEND: &str =
    "\n# Added by keystone: load .envrc files.\neval \"$(direnv hook bash)\"\n\
# Added by keystone: the credentials the developer chose to forward.\n\
if [ -r \"$HOME/.config/keystone/env\" ]; then . \"$HOME/.config/keystone/env\"; fi\n";

/// Where `keystone agent start` writes the forwarded credentials (0600,
/// `export NAME='value'` lines); sourced by interactive shells, the
/// session, and every command `exec` runs.
pub const FORWARDED_ENV: &str = "/home/agent/.config/keystone/env";

/// `/home/agent/.config/direnv/direnv.toml`: trust `.envrc` under the
/// workspace without `direnv allow`, since the agent runs non-interactively.
pub const DIRENV_TOML: &str = "[whitelist]\nprefix = [\"/workspace\"]\n";

/// `/etc/hostname`. mmdebstrap leaves the build host's name here; the
/// backend sets each sandbox's own in its UTS namespace.
pub const HOSTNAME: &str = "keystone\n";

/// `/etc/hosts`; the image would otherwise have none. Any other host name
/// resolves through `libnss-myhostname`, so `sudo` never waits on DNS for
/// the sandbox's name.
pub const HOSTS: &str = "\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
127.0.1.1\tkeystone
";

/// `/etc/resolv.conf`. mmdebstrap leaves the build host's resolver here,
/// which is wrong on any other network; the backend writes the sandbox's.
pub const RESOLV_CONF: &str = "# Written by the keystone backend when a sandbox starts.\n";

/// The microvm guest's PID 1 (`init=` on the kernel command line), in
/// place of a service manager: stock systemd takes 27 s to reach sshd
/// under TCG; this is a handful of commands after the kernel, and every
/// command counts under TCG (each exec costs tens of milliseconds).
///
/// The kernel mounts the root (NVMe, built into Debian's cloud kernel, so
/// there is no initrd). This script mounts the kernel filesystems, loads
/// the virtio modules, unpacks the per-boot configuration the backend
/// hands in as a tar archive on the read-only virtio disk (`/dev/vda`:
/// host key, authorized_keys, hostname, addresses, resolver) into a tmpfs
/// at `/etc/keystone`, brings up the network statically (eth0: the
/// host-only link sshd is reached on; eth1, with `--network nat`: the way
/// out, and the default route; with `--network bridge`, eth1 is configured
/// by DHCP), mounts the live share over `/workspace` when there is one,
/// and runs sshd under
/// tini, which reaps orphans. Shutdown: the backend sends ctrl-alt-del,
/// which the kernel turns into SIGINT for PID 1; tini passes it to this
/// script's process group, which stops sshd, syncs, remounts read-only and
/// powers off.
pub const MICROVM_INIT: &str = r#"#!/bin/sh
# Written by keystone: PID 1 of a microvm sandbox.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LANG=C.UTF-8
export PATH LANG
say() { read -r up _ < /proc/uptime; echo "keystone-init: [$up] $*" > /dev/console; }
poweroff_now() {
    trap '' INT TERM
    [ -n "${sshd:-}" ] && kill "$sshd" 2>/dev/null
    say "powering off"
    sync
    echo s > /proc/sysrq-trigger
    echo u > /proc/sysrq-trigger
    echo o > /proc/sysrq-trigger
    sleep 10
}
if [ "${1:-}" = --run ]; then
    trap poweroff_now INT TERM
    /usr/sbin/sshd -D -e &
    sshd=$!
    say "sshd started"
    wait "$sshd"
    poweroff_now
    exit 0
fi
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
# Ctrl-alt-del must reach us as SIGINT: the kernel's default is an
# immediate reboot, without syncing the disk.
echo 0 > /proc/sys/kernel/ctrl-alt-del
mount -a -T /usr/local/share/keystone/fstab
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
mkdir -p /run/sshd /run/lock
modprobe -a virtio_blk virtio_net virtio_rng virtio_balloon
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
tar -xf /dev/vda -C /etc/keystone --no-same-owner || say "cannot read the configuration disk /dev/vda"
[ -f /etc/keystone/hostname ] && read -r name < /etc/keystone/hostname && echo "$name" > /proc/sys/kernel/hostname
[ -f /etc/keystone/resolv.conf ] && cp /etc/keystone/resolv.conf /etc/resolv.conf
ADDRESS= NAT_ADDRESS= NAT_GATEWAY= BRIDGE= SHARE_TAG=
[ -f /etc/keystone/network ] && . /etc/keystone/network
[ -f /etc/keystone/workspace ] && . /etc/keystone/workspace
if [ -n "$SHARE_TAG" ]; then
    # The live share: the project itself over virtiofs, on top of the clone.
    modprobe virtiofs && mount -t virtiofs "$SHARE_TAG" /workspace || say "cannot mount the live share $SHARE_TAG"
fi
{
    echo "link set lo up"
    if [ -n "$ADDRESS" ]; then
        echo "link set eth0 up"
        echo "addr add $ADDRESS dev eth0"
    fi
    if [ -n "$NAT_ADDRESS" ]; then
        echo "link set eth1 up"
        echo "addr add $NAT_ADDRESS dev eth1"
        echo "route add default via $NAT_GATEWAY dev eth1"
    fi
    [ -n "$BRIDGE" ] && echo "link set eth1 up"
} | ip -batch -
# On a host bridge the address comes from that network's DHCP server; the
# lease may come after sshd, which is reached over eth0 anyway.
[ -n "$BRIDGE" ] && udhcpc -f -i eth1 -s /etc/udhcpc/default.script >/dev/null 2>&1 &
say "up"
exec /usr/bin/tini -g -- /usr/local/sbin/keystone-init --run
"#;

/// The file systems the microvm guest's init mounts, in one `mount -a`
/// (one exec instead of six: under TCG each costs ~0.15 s); `/dev` and
/// `/proc`, which `mount` itself needs, are mounted before it.
pub const MICROVM_FSTAB: &str = "\
sysfs /sys sysfs nosuid,nodev,noexec 0 0
devpts /dev/pts devpts gid=5,mode=0620,ptmxmode=0666,X-mount.mkdir 0 0
tmpfs /dev/shm tmpfs mode=1777,nosuid,nodev,X-mount.mkdir 0 0
tmpfs /run tmpfs mode=0755,nosuid,nodev 0 0
cgroup2 /sys/fs/cgroup cgroup2 nosuid,nodev,noexec 0 0
tmpfs /etc/keystone tmpfs mode=0755,size=1m 0 0
";

/// `/usr/local/bin/keystone-switch BRANCH`: moves the terminal's client
/// (from inside a session) to the session of another worktree,
/// `<sandbox>-<branch>`, starting it in the worktree when it is not
/// running. Every worktree session of a sandbox lives on one tmux server
/// (or one Zellij installation), so this is the multiplexer's own switch;
/// the names match the host's (`keystone agent worktree list`).
pub const SWITCH: &str = r#"#!/bin/sh
# Written by keystone: switch this terminal to another worktree's session.
set -eu
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: keystone-switch BRANCH   (main is the main checkout; git worktree list shows the others)" >&2
    exit 2
fi
branch=$1
if [ "$branch" = main ]; then dir=/workspace; else dir=/workspace/.worktrees/$branch; fi
if [ ! -d "$dir" ]; then
    echo "keystone-switch: there is no worktree $branch; on the host: keystone agent worktree add $branch" >&2
    exit 1
fi
session="$(cat /proc/sys/kernel/hostname)-$(printf '%s' "$branch" | tr './:' '---')"
if [ -n "${ZELLIJ:-}" ]; then
    exec zellij action switch-session --cwd "$dir" "$session"
fi
if [ -n "${TMUX:-}" ]; then
    tmux has-session -t "=$session" 2>/dev/null || tmux new-session -d -s "$session" -c "$dir"
    exec tmux switch-client -t "=$session"
fi
echo "keystone-switch: run it inside a session (keystone agent attach)" >&2
exit 2
"#;

/// `~agent/.config/zellij/config.kdl`, in images that carry Zellij: no
/// first-run tips or release notes in the way of the session, and a
/// session whose last client goes away (detach, dropped connection) keeps
/// running rather than being serialized for later resurrection.
pub const ZELLIJ_CONFIG: &str = "\
// Written by keystone.
show_startup_tips false
show_release_notes false
on_force_close \"detach\"
session_serialization false
default_shell \"bash\"
";

/// Path of the Zellij binary in the hook text that the recipe hash sees:
/// the real path depends on where the host's cache is, the image does not.
pub(crate) const ZELLIJ_PLACEHOLDER: &str = "/keystone-tools/zellij";

/// Copies the host-built Zellij `version` from `binary` into the image,
/// proves it runs there, and writes the agent's Zellij configuration.
pub(crate) fn zellij_hook(version: &str, binary: &str) -> String {
    format!(
        "set -eu\n# zellij {version}, built with cargo install --locked\n\
install -m 0755 -o 0 -g 0 {bin} \"$1/usr/local/bin/zellij\"\n\
chroot \"$1\" /usr/local/bin/zellij --version | grep -qF {version}\n\
install -d -m 0755 -o 1000 -g 1000 \"$1/home/agent/.config/zellij\"\n{config}",
        bin = shell_quote(binary),
        config = write_hook(
            "/home/agent/.config/zellij/config.kdl",
            "0644",
            AGENT_UID,
            ZELLIJ_CONFIG,
            false
        )
        .trim_start_matches("set -eu\n"),
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Terminates every here-document; no file body may contain it as a line.
pub(crate) const HEREDOC_END: &str = "KEYSTONE_EOF";

/// Creates `agent` (1000:1000, in `sudo`) and gives root and agent the
/// password field `*`: no password, but not "locked". sshd with `UsePAM no`
/// refuses public-key logins to accounts whose field starts with `!`, which
/// is what useradd writes.
const HOOK_USERS: &str = r#"set -eu
chroot "$1" groupadd --gid 1000 agent
chroot "$1" useradd --uid 1000 --gid 1000 --groups sudo --create-home --home-dir /home/agent --shell /bin/bash agent
chroot "$1" usermod --password '*' root
chroot "$1" usermod --password '*' agent
"#;

/// Drops the host keys the openssh-server package generated (each sandbox
/// brings its own), creates the empty `/etc/keystone`, and proves the drop-in
/// is a configuration sshd accepts, with a throwaway key and a temporary
/// `/run/sshd`. Nothing of that remains: `/run` is a tmpfs at run time and
/// the backend creates `/run/sshd` itself.
const HOOK_SSH_CHECK: &str = r#"set -eu
rm -f "$1"/etc/ssh/ssh_host_*
install -d -m 0755 -o 0 -g 0 "$1/etc/keystone"
chroot "$1" ssh-keygen -q -t ed25519 -N '' -C keystone-check -f /etc/keystone/ssh_host_ed25519_key
: > "$1/etc/keystone/authorized_keys"
made_run_sshd=no
if [ ! -d "$1/run/sshd" ]; then install -d -m 0755 "$1/run/sshd"; made_run_sshd=yes; fi
chroot "$1" /usr/sbin/sshd -t
rm -f "$1/etc/keystone/ssh_host_ed25519_key" "$1/etc/keystone/ssh_host_ed25519_key.pub" "$1/etc/keystone/authorized_keys"
if [ "$made_run_sshd" = yes ]; then rmdir "$1/run/sshd"; fi
rm -f "$1"/etc/ssh/ssh_host_*
"#;

/// The microvm backend boots the kernel without an initrd (its root disk
/// is NVMe, built in), so the initrd the kernel's postinst generated is
/// dead weight; the kernel stays readable to the backend that extracts it.
const HOOK_KERNEL: &str = r#"set -eu
rm -f "$1"/boot/initrd.img-* "$1"/initrd.img "$1"/initrd.img.old
chmod 0644 "$1"/boot/vmlinuz-*
"#;

/// The workspace, and the agent's ownership of the config directories the
/// file hooks created as root.
const HOOK_WORKSPACE: &str = r#"set -eu
install -d -m 0755 -o 1000 -g 1000 "$1/workspace"
chown 1000:1000 "$1/home/agent/.config" "$1/home/agent/.config/direnv"
chmod 0755 "$1/home/agent/.config" "$1/home/agent/.config/direnv"
"#;

/// Leaves no state that must differ per sandbox (machine id, host keys) and
/// nothing that only makes the image bigger. mmdebstrap's own cleanup does
/// much of this too; doing it here keeps the promise independent of its
/// defaults.
const HOOK_CLEANUP: &str = r#"set -eu
rm -f "$1"/etc/ssh/ssh_host_*
: > "$1/etc/machine-id"
rm -f "$1"/var/lib/apt/lists/*_* "$1"/var/cache/apt/*.bin
"#;

/// dpkg options written to `/etc/dpkg/dpkg.cfg.d/99mmdebstrap`, so they
/// also hold for packages installed later inside a sandbox. The exclusions
/// are those of Debian's "slim" container images: documentation, manuals
/// (there is no `man` to read them) and translations (the guest runs in
/// `C.UTF-8`) are about a quarter of a minimal image. Licences stay.
pub(crate) const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
];

/// A guest file written by a hook.
struct GuestFile {
    path: &'static str,
    mode: &'static str,
    owner: u32,
    body: &'static str,
    append: bool,
}

const FILES: &[GuestFile] = &[
    GuestFile {
        path: "/etc/hostname",
        mode: "0644",
        owner: 0,
        body: HOSTNAME,
        append: false,
    },
    GuestFile {
        path: "/etc/hosts",
        mode: "0644",
        owner: 0,
        body: HOSTS,
        append: false,
    },
    GuestFile {
        path: "/etc/resolv.conf",
        mode: "0644",
        owner: 0,
        body: RESOLV_CONF,
        append: false,
    },
    GuestFile {
        path: "/etc/sudoers.d/agent",
        mode: "0440",
        owner: 0,
        body: SUDOERS,
        append: false,
    },
    GuestFile {
        path: "/etc/ssh/sshd_config.d/keystone.conf",
        mode: "0644",
        owner: 0,
        body: SSHD_CONFIG,
        append: false,
    },
    GuestFile {
        path: "/usr/local/share/keystone/fstab",
        mode: "0644",
        owner: 0,
        body: MICROVM_FSTAB,
        append: false,
    },
    GuestFile {
        path: "/usr/local/sbin/keystone-init",
        mode: "0755",
        owner: 0,
        body: MICROVM_INIT,
        append: false,
    },
    GuestFile {
        path: "/usr/local/bin/keystone-switch",
        mode: "0755",
        owner: 0,
        body: SWITCH,
        append: false,
    },
    GuestFile {
        path: "/home/agent/.bashrc",
        mode: "0644",
        owner: AGENT_UID,
        body: BASHRC_APPEND,
        append: true,
    },
    GuestFile {
        path: "/home/agent/.config/direnv/direnv.toml",
        mode: "0644",
        owner: AGENT_UID,
        body: DIRENV_TOML,
        append: false,
    },
];

/// One hook writing `file` with a quoted here-document, so the shell expands
/// nothing in the body. A file being replaced is removed first: the hook
/// runs outside the chroot, where a symlink in the guest (an absolute
/// `/etc/resolv.conf` link, say) would point into the host.
fn file_hook(file: &GuestFile) -> String {
    write_hook(file.path, file.mode, file.owner, file.body, file.append)
}

fn write_hook(path: &str, mode: &str, owner: u32, body: &str, append: bool) -> String {
    let (remove, redirect) = if append {
        (String::new(), ">>")
    } else {
        (format!("rm -f \"$1{path}\"\n"), ">")
    };
    let dir = path.rsplit_once('/').map_or("/", |(dir, _)| dir);
    format!(
        "set -eu\nmkdir -p \"$1{dir}\"\n{remove}cat {redirect} \"$1{path}\" <<'{end}'\n{body}{end}\nchown {owner}:{owner} \"$1{path}\"\nchmod {mode} \"$1{path}\"\n",
        end = HEREDOC_END,
    )
}

/// Installs the agents from the npm registry at their exact versions, as
/// root into npm's global prefix (`/usr/local`), then proves each command
/// starts. It runs before the file hooks replace `/etc/resolv.conf`, while
/// the chroot still resolves names with the build host's resolver. npm gets
/// the build host's CA bundle for the download only (a registry mirror or a
/// TLS-inspecting proxy is trusted by the host, not by Debian's bundle in
/// the new root); it and npm's cache are removed, so none of it stays in the
/// image.
fn agents_install_hook(agents: &[AgentSetup]) -> String {
    let specs: Vec<String> = agents.iter().map(AgentSetup::spec).collect();
    let mut hook = format!(
        "set -eu\n\
ca=\n\
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then\n\
  cp /etc/ssl/certs/ca-certificates.crt \"$1/var/tmp/keystone-npm-ca.crt\"\n\
  ca=npm_config_cafile=/var/tmp/keystone-npm-ca.crt\n\
fi\n\
chroot \"$1\" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root npm_config_cache=/var/tmp/keystone-npm $ca \\\n\
  npm install --global --no-fund --no-audit --no-update-notifier --loglevel=warn --fetch-timeout=120000 {}\n\
rm -rf \"$1/var/tmp/keystone-npm\" \"$1/var/tmp/keystone-npm-ca.crt\" \"$1/root/.npm\"\n",
        specs.join(" ")
    );
    for setup in agents {
        hook.push_str(&format!(
            "chroot \"$1\" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp /usr/local/bin/{} --version\n",
            setup.agent.command()
        ));
    }
    hook
}

/// The agent's configuration directories, created as root by the file
/// hooks, handed to the agent.
const HOOK_AGENT_DIRS: &str = r#"set -eu
for d in .claude .gemini .codex; do
  if [ -d "$1/home/agent/$d" ]; then chown -R 1000:1000 "$1/home/agent/$d"; chmod 0755 "$1/home/agent/$d"; fi
done
"#;

/// The `--customize-hook` arguments, in the order mmdebstrap runs them.
pub(crate) fn customize_hooks(agents: &[AgentSetup]) -> Vec<String> {
    let mut hooks = vec![HOOK_USERS.to_owned()];
    // The users hook must run first (the agent's home), the agents' install
    // before /etc/resolv.conf is replaced, the sshd check after the drop-in
    // exists, the workspace hook after the agent's files.
    if !agents.is_empty() {
        hooks.push(agents_install_hook(agents));
    }
    hooks.extend(FILES.iter().map(file_hook));
    for setup in agents {
        for file in agents::files(setup) {
            let owner = if file.path.starts_with("/home/agent/") {
                AGENT_UID
            } else {
                0
            };
            hooks.push(write_hook(file.path, file.mode, owner, file.body, false));
        }
    }
    if !agents.is_empty() {
        hooks.push(HOOK_AGENT_DIRS.to_owned());
    }
    hooks.push(HOOK_SSH_CHECK.to_owned());
    hooks.push(HOOK_KERNEL.to_owned());
    hooks.push(HOOK_WORKSPACE.to_owned());
    hooks.push(HOOK_CLEANUP.to_owned());
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn all_agents() -> Vec<AgentSetup> {
        agents::Agent::ALL
            .iter()
            .map(|a| AgentSetup::pinned(*a, true))
            .collect()
    }

    #[test]
    fn agent_hooks_install_pins_and_write_settings() {
        let hooks = customize_hooks(&all_agents()).join("\n");
        assert!(hooks.contains("@anthropic-ai/claude-code@2.1.332"));
        assert!(hooks.contains("@google/gemini-cli@0.61.0"));
        assert!(hooks.contains("@openai/codex@0.171.0"));
        assert!(hooks.contains("\"$1/home/agent/.claude/settings.json\""));
        assert!(hooks.contains("chmod 0755 \"$1/usr/local/bin/gemini\""));
        assert!(hooks.contains("chown 0:0 \"$1/usr/local/bin/gemini\""));
        assert!(hooks.contains("chmod 0600 \"$1/home/agent/.claude.json\""));
        let none = customize_hooks(&[]).join("\n");
        assert!(!none.contains("npm install"));
        assert!(!none.contains(".claude"));
    }

    #[test]
    fn every_hook_is_valid_sh() {
        for hook in customize_hooks(&all_agents()) {
            let out = Command::new("sh")
                .args(["-n", "-c", &hook])
                .output()
                .expect("run sh");
            assert!(
                out.status.success(),
                "sh -n rejected:\n{hook}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn no_file_body_can_end_its_here_document() {
        for file in FILES {
            assert!(
                file.body.ends_with('\n'),
                "{} must end in a newline",
                file.path
            );
            assert!(
                !file.body.lines().any(|line| line == HEREDOC_END),
                "{} contains the here-document terminator",
                file.path
            );
        }
    }

    #[test]
    fn sshd_drop_in_has_every_required_setting() {
        for line in [
            "HostKey /etc/keystone/ssh_host_ed25519_key",
            "AuthorizedKeysFile /etc/keystone/authorized_keys",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "AllowAgentForwarding no",
            "AllowStreamLocalForwarding no",
            "X11Forwarding no",
            "PermitUserEnvironment no",
            "AllowTcpForwarding local",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "ClientAliveInterval 30",
            "PrintMotd no",
            "AcceptEnv LANG LC_* COLORTERM",
        ] {
            assert!(SSHD_CONFIG.lines().any(|l| l == line), "missing {line}");
        }
    }

    #[test]
    fn passwords_are_star_not_bang() {
        let hooks = customize_hooks(&[]).join("\n");
        assert!(hooks.contains("usermod --password '*' root"));
        assert!(hooks.contains("usermod --password '*' agent"));
        assert!(!hooks.contains("'!'"));
    }

    #[test]
    fn file_hook_writes_body_verbatim() {
        let sudoers = FILES
            .iter()
            .find(|f| f.path == "/etc/sudoers.d/agent")
            .expect("sudoers");
        let hook = file_hook(sudoers);
        assert!(hook.contains("cat > \"$1/etc/sudoers.d/agent\" <<'KEYSTONE_EOF'\nagent ALL=(ALL) NOPASSWD:ALL\nKEYSTONE_EOF\n"));
        assert!(hook.contains("chmod 0440 \"$1/etc/sudoers.d/agent\""));
        assert!(hook.contains("mkdir -p \"$1/etc/sudoers.d\"\nrm -f \"$1/etc/sudoers.d/agent\"\n"));
    }
}
