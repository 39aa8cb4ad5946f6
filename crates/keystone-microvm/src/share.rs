//! The opt-in live share (`--share`, `workspace = "share"`): the project
//! directory itself at `/workspace` in the guest, instead of the pushed
//! clone.
//!
//! virtiofs is the one protocol that works with the image's kernel: Debian's
//! cloud kernel has `virtiofs` as a module and no 9p at all
//! (`CONFIG_NET_9P` is off), so `share_proto = "9p"` is refused with that
//! reason. The host side is `virtiofsd` (not in bookworm; `cargo install
//! virtiofsd`, or Debian trixie's package at `/usr/libexec/virtiofsd`),
//! a child of the supervisor like QEMU, serving one vhost-user socket.
//!
//! Ownership: the agent (uid 1000 in the guest) must see the files as its
//! own, and what it writes must be the host user's. virtiofsd translates
//! ids itself: every host id appears as the agent's, every id the guest
//! writes becomes the owner of the project directory. Run as root,
//! virtiofsd sandboxes itself in namespaces; run as a user it cannot
//! change ids at all, so it runs without a sandbox and writes everything
//! as that user, which is the same outcome.
//!
//! The repository's metadata stays out of the guest's reach: virtiofsd
//! runs in a mount namespace of its own (for a user, inside a user
//! namespace that maps only that user) where the project's `.git` and
//! `.keystone` are bound read-only over themselves, so the guest reads the
//! history (`git log`, `diff`, `status`) but can plant no hook, config,
//! fsmonitor or ref that the user's next git command would act on. The
//! agent works on the files; commits are made on the host. (The other
//! choice, a guest-local `.git` over the host's brought home by `sync`,
//! would give back the clone's workflow the share exists to avoid.)

use super::view::View;
use keystone_backend::{BackendError, Instance};
use keystone_process::{Spawn, Supervised};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tag the guest mounts (`mount -t virtiofs workspace /workspace`).
pub const TAG: &str = "workspace";
/// The agent's uid and gid in the guest image.
const AGENT_ID: u32 = 1000;
/// Where virtiofsd is looked for after `PATH`: Debian trixie's package.
/// Not `/usr/lib/qemu/virtiofsd`: that is QEMU 7's retired C daemon, with
/// other options and no id translation.
const KNOWN_PATHS: [&str; 1] = ["/usr/libexec/virtiofsd"];

/// Whether a sandbox uses the live share; checks the protocol and finds
/// the daemon. `Ok(None)`: the sandbox works on its clone.
pub fn daemon_for(inst: &Instance) -> Result<Option<PathBuf>, BackendError> {
    if !inst.settings.is_share() {
        return Ok(None);
    }
    match inst.settings.share_proto.as_str() {
        "virtiofs" => {}
        "9p" => {
            return Err(BackendError::Requirement(
                "share_proto = \"9p\": the guest's kernel (Debian's linux-image-cloud-amd64) is built without 9p; \
set `[backend.microvm] share_proto = \"virtiofs\"`"
                    .into(),
            ))
        }
        other => {
            return Err(BackendError::Requirement(format!(
                "unknown share protocol {other:?}: use virtiofs"
            )))
        }
    }
    if !inst.project.is_dir() {
        return Err(BackendError::Failed(format!(
            "the project directory {} to share is gone",
            inst.project.display()
        )));
    }
    find_daemon().map(Some).ok_or_else(|| {
        BackendError::Requirement(
            "virtiofsd is not installed (the live share serves the project with it): \
`cargo install virtiofsd` (needs apt-get install libseccomp-dev libcap-ng-dev) and put it on PATH"
                .into(),
        )
    })
}

pub fn find_daemon() -> Option<PathBuf> {
    keystone_channel::which("virtiofsd")
        .or_else(|| KNOWN_PATHS.iter().map(PathBuf::from).find(|p| p.is_file()))
}

/// The daemon's arguments (no I/O, so it can be tested).
pub fn daemon_args(project: &Path, socket: &Path, owner: (u32, u32), as_root: bool) -> Vec<String> {
    let mut a = vec![
        format!("--shared-dir={}", project.display()),
        format!("--socket-path={}", socket.display()),
        // The host edits the same files: let the guest see them change.
        "--cache=auto".to_string(),
        format!("--sandbox={}", if as_root { "namespace" } else { "none" }),
    ];
    let all = u32::MAX;
    a.push(format!("--translate-uid=squash-host:0:{AGENT_ID}:{all}"));
    a.push(format!("--translate-gid=squash-host:0:{AGENT_ID}:{all}"));
    a.push(format!("--translate-uid=squash-guest:0:{}:{all}", owner.0));
    a.push(format!("--translate-gid=squash-guest:0:{}:{all}", owner.1));
    a
}

/// Start virtiofsd for the project and wait for its socket, which must
/// exist before QEMU connects to it.
pub fn spawn(inst: &Instance, daemon: &Path, socket: &Path) -> Result<Supervised, BackendError> {
    let _ = fs::remove_file(socket);
    let meta = fs::metadata(&inst.project)
        .map_err(BackendError::io(inst.project.display().to_string()))?;
    let log_path = inst.log_dir().join("virtiofsd.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(BackendError::io(log_path.display().to_string()))?;
    let as_root = nix::unistd::geteuid().is_root();
    let protect = protected_paths(&inst.project)?;
    let mut cmd = Command::new(daemon);
    cmd.args(daemon_args(
        &inst.project,
        socket,
        (meta.uid(), meta.gid()),
        as_root,
    ))
    .stdin(Stdio::null())
    .stdout(log.try_clone().map_err(BackendError::io("virtiofsd.log"))?)
    .stderr(log)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    // Read-only `.git` and `.keystone`: in a mount namespace of its own
    // (root), in a user namespace mapping only the user (a user).
    protect.apply(&mut cmd);
    let mut child = Spawn::new("virtiofsd", cmd).start()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if child.try_reap() || Instant::now() > deadline {
            child.kill();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(BackendError::Failed(format!(
                "virtiofsd did not start serving {}: {}",
                inst.project.display(),
                last.into_iter().rev().collect::<Vec<_>>().join("\n  ")
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// The project's `.git` and `.keystone`, as they are: a link would be
/// followed by the bind (and points where the share does not reach), so
/// it is refused.
fn protected_paths(project: &Path) -> Result<View, BackendError> {
    let mut out = View::default();
    for name in [".git", ".keystone"] {
        let p = project.join(name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(BackendError::Requirement(format!(
                    "{} is a symbolic link: the live share keeps the repository's metadata read-only for the guest and cannot do that through a link; use the default clone workspace",
                    p.display()
                )))
            }
            Ok(_) => {
                // A remount inside a user namespace must keep the flags the
                // file system is mounted with.
                use nix::sys::statvfs::FsFlags;
                let f = nix::sys::statvfs::statvfs(&p)
                    .map_err(|e| BackendError::Failed(format!("statvfs {}: {e}", p.display())))?
                    .flags();
                let mut keep = libc::MS_NOSUID | libc::MS_NODEV;
                for (st, ms) in [
                    (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
                    (FsFlags::ST_NOATIME, libc::MS_NOATIME),
                    (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
                    (FsFlags::ST_RELATIME, libc::MS_RELATIME),
                ] {
                    if f.contains(st) {
                        keep |= ms;
                    }
                }
                out.read_only(&p, keep)?;
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_squashed_both_ways() {
        let a = daemon_args(Path::new("/p"), Path::new("/s"), (1234, 1235), true);
        assert!(a.contains(&"--shared-dir=/p".to_string()));
        assert!(a.contains(&"--sandbox=namespace".to_string()));
        assert!(a.contains(&format!("--translate-uid=squash-guest:0:1234:{}", u32::MAX)));
        assert!(a.contains(&format!("--translate-gid=squash-guest:0:1235:{}", u32::MAX)));
        assert!(a.contains(&format!("--translate-uid=squash-host:0:1000:{}", u32::MAX)));
        let user = daemon_args(Path::new("/p"), Path::new("/s"), (1, 1), false);
        assert!(user.contains(&"--sandbox=none".to_string()));
    }
}
