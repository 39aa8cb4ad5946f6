//! User-namespace id maps, shared by the backends that unpack images.
//!
//! A container never runs on the host's own ids. Run by root, it maps its
//! ids 0..65535 onto a range of host ids of keystone's own
//! ([`container_range`]: the `keystone` entry of /etc/subuid and
//! /etc/subgid, added once if missing, as Docker's `--userns-remap=default`
//! adds `dockremap`), so the guest's root is an unprivileged host id for
//! every uid-based check (`/proc/sys`, device nodes, files it leaves on
//! the host) and its `agent` (1000) is no real host user. An unprivileged
//! user maps container root onto itself and 1..65535 onto its subordinate
//! range, through the setuid helpers newuidmap and newgidmap (package
//! uidmap), the same scheme as rootless podman.
//!
//! The identity map ([`IdMap::identity_for_root`]) is only for unpacking
//! an image that keeps the image's own ids, as the microVM's disk does:
//! its guest has a kernel of its own.

use crate::BackendError;
use std::ffi::CString;
use std::process::Command;

pub const SIZE: u32 = 65536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// The caller's own ids.
    pub uid: u32,
    pub gid: u32,
    pub mapping: Mapping,
}

/// Where the namespace's ids 0..65535 land on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Onto the same host ids (root only; never for a container).
    Identity,
    /// Onto `uid..uid+65535` and `gid..gid+65535` (root: keystone's range).
    Shifted { uid: u32, gid: u32 },
    /// Root onto the caller, 1..65535 onto its subordinate (start, count)
    /// ranges (an unprivileged caller).
    Subordinate { uids: (u32, u32), gids: (u32, u32) },
}

impl IdMap {
    /// Whether the caller is the host's root (host privileges: cgroups,
    /// bridges, devices), whatever the map.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The host uid and gid of the namespace's root.
    pub fn root_on_host(&self) -> (u32, u32) {
        match self.mapping {
            Mapping::Identity => (0, 0),
            Mapping::Shifted { uid, gid } => (uid, gid),
            Mapping::Subordinate { .. } => (self.uid, self.gid),
        }
    }

    /// The map a container runs under: keystone's own range for root, the
    /// subordinate range for a user.
    pub fn for_container() -> Result<IdMap, BackendError> {
        if nix::unistd::geteuid().is_root() {
            let (uid, gid) = container_range()?;
            return Ok(IdMap {
                uid: 0,
                gid: 0,
                mapping: Mapping::Shifted { uid, gid },
            });
        }
        Self::for_current_user()
    }

    /// Root: the identity; a user: its subordinate range. For trees whose
    /// owners are the image's own ids (the microVM's disk).
    pub fn for_current_user() -> Result<IdMap, BackendError> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        if uid == 0 {
            return Ok(Self::identity_for_root());
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
        let (uids, gids) = (find("/etc/subuid")?, find("/etc/subgid")?);
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
            mapping: Mapping::Subordinate { uids, gids },
        })
    }

    pub fn identity_for_root() -> IdMap {
        IdMap {
            uid: 0,
            gid: 0,
            mapping: Mapping::Identity,
        }
    }

    /// Whether commands must enter a user namespace to see the tree's
    /// owners as the image's ids.
    fn is_identity(&self) -> bool {
        self.mapping == Mapping::Identity
    }

    /// Install the maps for the process `pid`, which has just unshared its
    /// user namespace.
    pub fn apply(&self, pid: i32) -> Result<(), BackendError> {
        let direct = |uid: u32, gid: u32| -> Result<(), BackendError> {
            for (file, line) in [
                ("uid_map", format!("0 {uid} {SIZE}\n")),
                ("gid_map", format!("0 {gid} {SIZE}\n")),
            ] {
                let path = format!("/proc/{pid}/{file}");
                std::fs::write(&path, line).map_err(BackendError::io(path))?;
            }
            Ok(())
        };
        match self.mapping {
            Mapping::Identity => direct(0, 0),
            Mapping::Shifted { uid, gid } => direct(uid, gid),
            Mapping::Subordinate {
                uids: (su, _),
                gids: (sg, _),
            } => {
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

/// The name of keystone's entry in /etc/subuid and /etc/subgid.
pub const RANGE_OWNER: &str = "keystone";
/// The entry whose ids root's QEMU processes run as, one per sandbox.
pub const VM_RANGE_OWNER: &str = "keystone-vm";

/// Where root's containers map their ids: the `keystone` range of
/// /etc/subuid and /etc/subgid, added (the same start in both, above every
/// range already there, 65536-aligned) when either file has none.
pub fn container_range() -> Result<(u32, u32), BackendError> {
    reserved_range(RANGE_OWNER)
}

/// The host ids root's QEMU processes are dropped to: the `keystone-vm`
/// range, reserved the same way so no user or container is ever given
/// them.
pub fn vm_range() -> Result<(u32, u32), BackendError> {
    reserved_range(VM_RANGE_OWNER)
}

fn reserved_range(owner: &str) -> Result<(u32, u32), BackendError> {
    let files = ["/etc/subuid", "/etc/subgid"];
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    let found = |text: &str| {
        parse_subid(text, owner, u32::MAX).filter(|&(start, count)| start > 0 && count >= SIZE)
    };
    if let (Some((u, _)), Some((g, _))) = (found(&read(files[0])), found(&read(files[1]))) {
        return Ok((u, g));
    }
    // One writer at a time (two first starts at once).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/etc/.keystone-subid.lock")
        .map_err(BackendError::io("/etc/.keystone-subid.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| BackendError::Failed(format!("lock /etc/.keystone-subid.lock: {e}")))?;
    let texts = [read(files[0]), read(files[1])];
    let mut ids = [0u32; 2];
    let start = free_start(&texts[0], &texts[1]);
    for (i, (file, text)) in files.iter().zip(&texts).enumerate() {
        if let Some((s, _)) = found(text) {
            ids[i] = s;
            continue;
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(file)
            .or_else(|_| std::fs::OpenOptions::new().create(true).append(true).open(file))
            .map_err(|e| {
                BackendError::Requirement(format!(
                    "keystone run by root keeps its sandboxes on host ids of their own, and {file} has none for {owner:?} \
and cannot be written ({e}); add the line `{owner}:{start}:{SIZE}` to /etc/subuid and /etc/subgid"
                ))
            })?;
        let sep = if text.is_empty() || text.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        f.write_all(format!("{sep}{owner}:{start}:{SIZE}\n").as_bytes())
            .map_err(BackendError::io(*file))?;
        tracing::info!(file, owner, start, "added keystone's subordinate id range");
        ids[i] = start;
    }
    Ok((ids[0], ids[1]))
}

/// The lowest 65536-aligned start, at least 2^20, above every range in
/// both files.
fn free_start(subuid: &str, subgid: &str) -> u32 {
    let end = subuid
        .lines()
        .chain(subgid.lines())
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (_, s, c) = (f.next()?, f.next()?, f.next()?);
            s.parse::<u64>().ok()?.checked_add(c.parse::<u64>().ok()?)
        })
        .max()
        .unwrap_or(0)
        .max(1 << 20);
    let aligned = end.div_ceil(u64::from(SIZE)) * u64::from(SIZE);
    u32::try_from(aligned).unwrap_or(u32::MAX - SIZE)
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
    if map.is_identity() {
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
    fn a_new_range_starts_above_every_range_there_is() {
        assert_eq!(free_start("", ""), 1 << 20);
        let uid = "alice:100000:65536\nkeystone-test:300000:65536\n";
        let gid = "alice:100000:65536\nbig:2000000:70000\n";
        let start = free_start(uid, gid);
        assert_eq!(start % SIZE, 0);
        assert!(start >= 2_070_000, "{start}");
        assert!(start - 2_070_000 < SIZE);
    }

    #[test]
    fn a_shifted_map_puts_root_on_the_range() {
        let map = IdMap {
            uid: 0,
            gid: 0,
            mapping: Mapping::Shifted {
                uid: 1 << 20,
                gid: 1 << 20,
            },
        };
        assert!(map.is_root());
        assert_eq!(map.root_on_host(), (1 << 20, 1 << 20));
        assert!(!map.is_identity());
    }

    #[test]
    fn parses_subid_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:65536\n";
        assert_eq!(parse_subid(text, "alice", 1000), Some((100000, 65536)));
        assert_eq!(parse_subid(text, "bob", 1001), Some((200000, 65536)));
        assert_eq!(parse_subid(text, "carol", 1002), None);
    }
}
