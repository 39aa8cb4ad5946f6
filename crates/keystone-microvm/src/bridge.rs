//! `--network bridge`: the guest's way out (eth1) is a tap device on a host
//! bridge the user names (`[backend.microvm] bridge`), so the sandbox is a
//! machine on that network and takes its address by DHCP there.
//!
//! A tap on a bridge needs CAP_NET_ADMIN, which QEMU never has (it runs
//! on an id of its own, `super::jail`, and may not spawn a helper under
//! its seccomp filter). So the supervisor opens the tap and hands QEMU the
//! descriptor (`-netdev tap,fd=N`). As root it opens a non-persistent
//! device, which disappears when the last descriptor closes, so nothing
//! can leak, and enslaves it to the bridge. As a user, the one standard
//! way is QEMU's setuid `qemu-bridge-helper` with the bridge allowed in
//! `/etc/qemu/bridge.conf`: the supervisor runs it, as QEMU would, and
//! receives the tap over a socketpair; where that is not set up, `start`
//! says exactly what is missing.

use keystone_backend::{BackendError, Instance};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";
const HELPER_ACL: &str = "/etc/qemu/bridge.conf";

/// How eth1 reaches the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Root: we open the tap `tap` and add it to `bridge`.
    Tap { tap: String, bridge: String },
    /// A user: the setuid helper does both and sends us the tap.
    Helper { bridge: String, helper: PathBuf },
}

/// What `--network bridge` needs on this host, checked before anything
/// starts.
pub fn plan(inst: &Instance) -> Result<Attach, BackendError> {
    let bridge = keystone_backend::hostbridge::named_bridge(inst)?;
    if nix::unistd::geteuid().is_root() {
        return Ok(Attach::Tap {
            tap: keystone_backend::hostbridge::link_name(&inst.id),
            bridge: bridge.to_string(),
        });
    }
    let helper = Path::new(HELPER);
    let setuid_root = fs::metadata(helper)
        .map(|m| m.uid() == 0 && m.mode() & 0o4000 != 0)
        .unwrap_or(false);
    if !setuid_root {
        return Err(BackendError::Requirement(format!(
            "--network bridge as a user needs privileges to put a tap on {bridge}: run as root, or let QEMU's helper do it \
(`chmod u+s {HELPER}` and `allow {bridge}` in {HELPER_ACL})"
        )));
    }
    if !acl_allows(&fs::read_to_string(HELPER_ACL).unwrap_or_default(), &bridge) {
        return Err(BackendError::Requirement(format!(
            "{HELPER_ACL} does not allow bridge {bridge}: add the line `allow {bridge}`"
        )));
    }
    Ok(Attach::Helper {
        bridge: bridge.to_string(),
        helper: helper.to_path_buf(),
    })
}

/// QEMU's `-netdev` for eth1.
pub fn netdev(tap: RawFd) -> String {
    format!("tap,id=nat,fd={tap}")
}

/// The tap for eth1, for QEMU to inherit.
pub fn open_tap(attach: &Attach) -> Result<OwnedFd, BackendError> {
    match attach {
        Attach::Tap { tap, .. } => keystone_backend::tap::open(tap),
        Attach::Helper { bridge, helper } => tap_from_helper(helper, bridge),
    }
}

/// Run `qemu-bridge-helper --use-vnet --br=BRIDGE --fd=N` and take the tap
/// it sends back over the socketpair (one byte with SCM_RIGHTS).
fn tap_from_helper(helper: &Path, bridge: &str) -> Result<OwnedFd, BackendError> {
    use nix::sys::socket::{
        recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let mut cmd = Command::new(helper);
    cmd.arg("--use-vnet")
        .arg(format!("--br={bridge}"))
        .arg(format!("--fd={}", theirs.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let mut child = keystone_process::Spawn::new("qemu-bridge-helper", cmd)
        .keep(&[theirs.as_raw_fd()])
        .start()?;
    drop(theirs);
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let received = recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| BackendError::Failed(format!("{}: {e}", helper.display())))
    .and_then(|msg| {
        msg.cmsgs()
            .map_err(|e| BackendError::Failed(format!("{}: {e}", helper.display())))?
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .ok_or_else(|| {
                BackendError::Failed(format!(
                    "{} sent no tap for bridge {bridge} (is it allowed in {HELPER_ACL}?)",
                    helper.display()
                ))
            })
    });
    if !child.wait_exit(Duration::from_secs(10)) {
        child.kill();
    }
    // SAFETY: SCM_RIGHTS gave us a new descriptor that nothing else owns.
    received.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// After the tap is open: put it on the bridge and bring it up.
pub fn enslave(attach: &Attach) -> Result<(), BackendError> {
    let Attach::Tap { tap, bridge } = attach else {
        return Ok(());
    };
    let out = Command::new("ip")
        .args(["link", "set", "dev", tap, "master", bridge, "up"])
        .output()
        .map_err(BackendError::io("ip link set"))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "cannot put {tap} on bridge {bridge}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The tap we opened, if it still exists (it must not after teardown).
pub fn leftover(attach: &Attach) -> Option<String> {
    match attach {
        Attach::Tap { tap, .. } => {
            keystone_backend::hostbridge::link_exists(tap).then(|| tap.clone())
        }
        Attach::Helper { .. } => None,
    }
}

/// `qemu-bridge-helper`'s ACL: `allow NAME` or `allow all`, last match wins
/// against `deny`.
fn acl_allows(acl: &str, bridge: &str) -> bool {
    let mut allowed = false;
    for line in acl.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("allow"), Some(b)) if b == bridge || b == "all" => allowed = true,
            (Some("deny"), Some(b)) if b == bridge || b == "all" => allowed = false,
            _ => {}
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_acl() {
        assert!(acl_allows("allow br0\n", "br0"));
        assert!(acl_allows("allow all\n", "br0"));
        assert!(!acl_allows("allow virbr0\n", "br0"));
        assert!(!acl_allows("allow all\ndeny br0\n", "br0"));
    }

    #[test]
    fn netdevs() {
        assert_eq!(netdev(9), "tap,id=nat,fd=9");
    }
}
