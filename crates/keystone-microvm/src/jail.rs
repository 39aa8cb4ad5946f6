//! QEMU's host identity, as close to Firecracker's jailer as QEMU allows.
//!
//! Run by root, keystone never lets QEMU keep root: each sandbox's QEMU
//! is dropped, before it execs, to a host uid and gid of its own from the
//! `keystone-vm` range of /etc/subuid and /etc/subgid (reserved like the
//! containers' range, so no account or container has those ids), with no
//! supplementary groups but the one that may open /dev/kvm. It gets
//! everything it needs as descriptors opened by the supervisor (kernel,
//! disks, console, QMP listener, the virtiofs, passt and tap links; see
//! `VmSpec::args`), so it needs no path into the 0700 state directory and
//! no right on any sandbox's files: a QEMU taken over by its guest holds
//! its own sandbox's descriptors and nothing else, and a second sandbox's
//! QEMU is another uid, which can neither signal nor trace it.
//!
//! Instead of a chroot (QEMU loads its shared libraries and option ROMs
//! after exec, and `-chroot` needs a QEMU still root when its seccomp
//! filter goes on, which `elevateprivileges=deny` forbids), QEMU gets a
//! mount namespace of its own in which the places that hold people's and
//! programs' data (`/home`, `/root`, `/tmp`, `/var`, `/run`, `/srv`,
//! `/mnt`, `/media`, `/opt`, and keystone's state directory wherever it
//! is) are empty read-only file systems ([`hide_host_files`]): what it
//! can still see is the installed system (`/usr`, `/etc`), and of that
//! only what any local user may read.
//!
//! Run by a user, QEMU runs as that user, in a user namespace that maps
//! only that user, with the same places hidden: a QEMU taken over by its
//! guest does not see the user's home.

use super::accel::Accel;
use keystone_backend::BackendError;
use keystone_process::Creds;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Who QEMU runs as, and what `start` says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// None: QEMU keeps the supervisor's ids.
    pub creds: Option<Creds>,
    /// A line for `start` when a root QEMU could not be dropped.
    pub note: Option<String>,
}

/// The identity for the QEMU of the sandbox whose directory is `dir`.
pub fn for_qemu(dir: &Path, accel: Accel) -> Result<Jail, BackendError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(Jail {
            creds: None,
            note: None,
        });
    }
    let mut groups = Vec::new();
    if accel == Accel::Kvm {
        let kvm = std::fs::metadata("/dev/kvm").map_err(BackendError::io("/dev/kvm"))?;
        match kvm_access(kvm.mode(), kvm.gid()) {
            KvmAccess::World => {}
            KvmAccess::Group(gid) => groups.push(gid),
            KvmAccess::RootOnly => {
                return Ok(Jail {
                    creds: None,
                    note: Some(format!(
                        "QEMU runs as root: /dev/kvm is mode {:04o} owned by root, so no unprivileged QEMU could use KVM; \
give it to group kvm with mode 0660 (udev's default) and QEMU runs on an id of its own",
                        kvm.mode() & 0o7777
                    )),
                });
            }
        }
    }
    let (uid_start, gid_start) = keystone_backend::idmap::vm_range()?;
    let slot = free_slot(slot_of(dir), |slot| uid_in_use(uid_start + slot));
    Ok(Jail {
        creds: Some(Creds {
            uid: uid_start + slot,
            gid: gid_start + slot,
            groups,
        }),
        note: None,
    })
}

/// Where people's and programs' data live: hidden from QEMU, which needs
/// none of it (everything of the sandbox's is a descriptor).
const HIDDEN: [&str; 9] = [
    "/home", "/root", "/tmp", "/var", "/run", "/srv", "/mnt", "/media", "/opt",
];

/// QEMU's view of the host's files (see the module's comment); `dir` is
/// the sandbox's directory, whose state directory is hidden too.
pub fn hide_host_files(dir: &Path) -> Result<super::view::View, BackendError> {
    let mut view = super::view::View::default();
    for d in HIDDEN {
        view.hide(Path::new(d))?;
    }
    // The sandboxes' directory (`<state>/sandboxes`), wherever it is.
    if let Some(all) = dir
        .parent()
        .filter(|p| !HIDDEN.iter().any(|h| p.starts_with(h)))
    {
        view.hide(all)?;
    }
    Ok(view)
}

#[derive(Debug, PartialEq, Eq)]
enum KvmAccess {
    World,
    Group(u32),
    RootOnly,
}

fn kvm_access(mode: u32, gid: u32) -> KvmAccess {
    if mode & 0o006 == 0o006 {
        KvmAccess::World
    } else if mode & 0o060 == 0o060 && gid != 0 {
        KvmAccess::Group(gid)
    } else {
        KvmAccess::RootOnly
    }
}

/// A sandbox's preferred slot in the range: stable for its directory
/// (FNV-1a), so its QEMU has the same uid from one start to the next.
fn slot_of(dir: &Path) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % keystone_backend::idmap::SIZE
}

/// The first slot from `preferred` on (wrapping) that no process uses.
fn free_slot(preferred: u32, in_use: impl Fn(u32) -> bool) -> u32 {
    (0..keystone_backend::idmap::SIZE)
        .map(|i| (preferred + i) % keystone_backend::idmap::SIZE)
        .find(|s| !in_use(*s))
        .unwrap_or(preferred)
}

/// Whether any process runs with real, effective or saved uid `uid`.
fn uid_in_use(uid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| ids.split_whitespace().take(3).any(|i| i == uid.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_opened_through_its_group_or_not_at_all() {
        assert_eq!(kvm_access(0o020666, 0), KvmAccess::World);
        assert_eq!(kvm_access(0o020660, 108), KvmAccess::Group(108));
        assert_eq!(kvm_access(0o020600, 0), KvmAccess::RootOnly);
        assert_eq!(kvm_access(0o020660, 0), KvmAccess::RootOnly);
    }

    #[test]
    fn each_sandbox_has_a_stable_slot_and_moves_off_a_taken_one() {
        let a = slot_of(Path::new("/root/.local/state/keystone/sandboxes/a"));
        assert_eq!(
            a,
            slot_of(Path::new("/root/.local/state/keystone/sandboxes/a"))
        );
        assert_ne!(
            a,
            slot_of(Path::new("/root/.local/state/keystone/sandboxes/b"))
        );
        assert!(a < keystone_backend::idmap::SIZE);
        assert_eq!(free_slot(7, |s| s == 7 || s == 8), 9);
        assert_eq!(free_slot(keystone_backend::idmap::SIZE - 1, |s| s != 0), 0);
    }

    #[test]
    fn this_process_uid_is_in_use() {
        assert!(uid_in_use(nix::unistd::getuid().as_raw()));
    }
}
