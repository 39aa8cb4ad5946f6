//! User-namespace id maps, shared by the backends that unpack images.
//!
//! Root maps the container's ids 0..65535 onto the same host ids, so an
//! image unpacked by root works as is while the container's root still has
//! capabilities only inside its own namespaces. An unprivileged user maps
//! container root onto itself and 1..65535 onto its subordinate range from
//! /etc/subuid and /etc/subgid, through the setuid helpers newuidmap and
//! newgidmap (package uidmap) — the same scheme as rootless podman — so the
//! image's `agent` user (1000) is a real, distinct id.

use crate::BackendError;
use std::ffi::CString;
use std::process::Command;

pub const SIZE: u32 = 65536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub uid: u32,
    pub gid: u32,
    /// Subordinate (start, count) ranges; None for root.
    pub sub: Option<((u32, u32), (u32, u32))>,
}

impl IdMap {
    pub fn is_root(&self) -> bool {
        self.sub.is_none()
    }

    pub fn for_current_user() -> Result<IdMap, BackendError> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        if uid == 0 {
            return Ok(IdMap {
                uid,
                gid,
                sub: None,
            });
        }
        let user = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_default();
        let find = |file: &str| -> Result<(u32, u32), BackendError> {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            parse_subid(&text, &user, uid)
                .filter(|&(_, count)| count >= SIZE - 1)
                .ok_or_else(|| {
                    BackendError::Requirement(format!(
                        "no subordinate id range of at least {} for user {user:?} in {file}; \
                         add one with `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}` (as root)",
                        SIZE - 1
                    ))
                })
        };
        let sub = (find("/etc/subuid")?, find("/etc/subgid")?);
        for helper in ["newuidmap", "newgidmap"] {
            if keystone_channel::which(helper).is_none() {
                return Err(BackendError::Requirement(format!(
                    "{helper} is not installed; rootless sandboxes need it: apt-get install uidmap"
                )));
            }
        }
        Ok(IdMap {
            uid,
            gid,
            sub: Some(sub),
        })
    }

    /// Install the maps for the process `pid`, which has just unshared its
    /// user namespace.
    pub fn apply(&self, pid: i32) -> Result<(), BackendError> {
        match self.sub {
            None => {
                for (file, line) in [
                    ("uid_map", format!("0 0 {SIZE}\n")),
                    ("gid_map", format!("0 0 {SIZE}\n")),
                ] {
                    let path = format!("/proc/{pid}/{file}");
                    std::fs::write(&path, line).map_err(BackendError::io(path))?;
                }
                Ok(())
            }
            Some(((su, _), (sg, _))) => {
                for (helper, own, start) in
                    [("newuidmap", self.uid, su), ("newgidmap", self.gid, sg)]
                {
                    let out = Command::new(helper)
                        .arg(pid.to_string())
                        .args(["0", &own.to_string(), "1"])
                        .args(["1", &start.to_string(), &(SIZE - 1).to_string()])
                        .output()
                        .map_err(BackendError::io(helper))?;
                    if !out.status.success() {
                        return Err(BackendError::Failed(format!(
                            "{helper} failed: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The first range for `user` (by name or numeric uid) in a subuid file.
fn parse_subid(text: &str, user: &str, uid: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if who == user || who == uid.to_string() {
            Some((start.parse().ok()?, count.parse().ok()?))
        } else {
            None
        }
    })
}

/// Unpack the image tarball `tar` into `dest` with numeric owners, under
/// `map` (so an unprivileged user's tree is owned by the image's ids).
/// Device nodes are skipped: they cannot be made in a user namespace, and
/// every backend gives the guest a fresh /dev.
pub fn unpack_image(
    map: &IdMap,
    tar: &std::path::Path,
    dest: &std::path::Path,
) -> Result<std::process::ExitStatus, BackendError> {
    let tar = tar.display().to_string();
    let dest = dest.display().to_string();
    run_mapped(
        map,
        &[
            "tar",
            "--numeric-owner",
            "--exclude=./dev/*",
            "-xpf",
            &tar,
            "-C",
            &dest,
        ],
    )
}

/// Run `argv` as root of a fresh user namespace with `map` (for an
/// unprivileged user: to unpack or delete files owned by subordinate ids);
/// root runs it directly.
pub fn run_mapped(map: &IdMap, argv: &[&str]) -> Result<std::process::ExitStatus, BackendError> {
    use nix::unistd::{fork, ForkResult};
    use std::os::unix::process::ExitStatusExt;
    if map.is_root() {
        return Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .map_err(BackendError::io(argv[0]));
    }
    let cargs: Vec<CString> = argv
        .iter()
        .map(|a| {
            CString::new(*a).map_err(|_| BackendError::Failed(format!("NUL in argument {a:?}")))
        })
        .collect::<Result<_, _>>()?;
    let (up_r, up_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the child only makes async-signal-safe calls (unshare, read,
    // write, setresuid/gid, execvp, _exit) on memory prepared before fork.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(up_r);
            drop(go_w);
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&up_w, if ok { b"u" } else { b"x" });
            let mut b = [0u8; 1];
            if !ok || nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&go_r), &mut b) != Ok(1) {
                // SAFETY: _exit in a forked child.
                unsafe { libc::_exit(120) };
            }
            let root = nix::unistd::Uid::from_raw(0);
            let rootg = nix::unistd::Gid::from_raw(0);
            let _ = nix::unistd::setresgid(rootg, rootg, rootg);
            let _ = nix::unistd::setresuid(root, root, root);
            let _ = nix::unistd::execvp(&cargs[0], &cargs);
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(up_w);
            drop(go_r);
            let mut b = [0u8; 1];
            let n = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&up_r), &mut b);
            let mapped = if n == Ok(1) && b[0] == b'u' {
                map.apply(child.as_raw())
            } else {
                Err(BackendError::Failed(
                    "cannot create a user namespace (is kernel.unprivileged_userns_clone off?)"
                        .into(),
                ))
            };
            if mapped.is_ok() {
                let _ = nix::unistd::write(&go_w, b"g");
            }
            drop(go_w);
            let status = nix::sys::wait::waitpid(child, None)?;
            mapped?;
            Ok(match status {
                nix::sys::wait::WaitStatus::Exited(_, code) => {
                    std::process::ExitStatus::from_raw(code << 8)
                }
                nix::sys::wait::WaitStatus::Signaled(_, sig, _) => {
                    std::process::ExitStatus::from_raw(sig as i32)
                }
                _ => std::process::ExitStatus::from_raw(1 << 8),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subid_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:65536\n";
        assert_eq!(parse_subid(text, "alice", 1000), Some((100000, 65536)));
        assert_eq!(parse_subid(text, "bob", 1001), Some((200000, 65536)));
        assert_eq!(parse_subid(text, "carol", 1002), None);
    }
}
