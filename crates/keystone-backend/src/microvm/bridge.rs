//! `--network bridge`: the guest's way out (eth1) is a tap device on a host
//! bridge the user names (`[backend.microvm] bridge`), so the sandbox is a
//! machine on that network and takes its address by DHCP there.
//!
//! A tap on a bridge needs CAP_NET_ADMIN. As root, QEMU opens the tap
//! itself (`-netdev tap`, a non-persistent device that disappears with the
//! QEMU process, so nothing can leak) and the supervisor enslaves it to the
//! bridge. As a user, the one standard way is QEMU's setuid
//! `qemu-bridge-helper` with the bridge allowed in `/etc/qemu/bridge.conf`;
//! where that is not set up, `start` says exactly what is missing.

use crate::{BackendError, Instance};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";
const HELPER_ACL: &str = "/etc/qemu/bridge.conf";

/// How eth1 reaches the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Root: QEMU opens the tap `tap`; we add it to `bridge`.
    Tap { tap: String, bridge: String },
    /// A user: QEMU runs the setuid helper, which does both.
    Helper { bridge: String, helper: PathBuf },
}

/// What `--network bridge` needs on this host, checked before anything
/// starts.
pub fn plan(inst: &Instance) -> Result<Attach, BackendError> {
    let bridge = crate::hostbridge::named_bridge(inst)?;
    if nix::unistd::geteuid().is_root() {
        return Ok(Attach::Tap {
            tap: crate::hostbridge::link_name(&inst.id),
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
pub fn netdev(attach: &Attach) -> String {
    match attach {
        Attach::Tap { tap, .. } => {
            format!("tap,id=nat,ifname={tap},script=no,downscript=no")
        }
        Attach::Helper { bridge, helper } => {
            format!("bridge,id=nat,br={bridge},helper={}", helper.display())
        }
    }
}

/// After QEMU has created the tap: put it on the bridge and bring it up.
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

/// The tap QEMU opened, if it still exists (it must not after teardown).
pub fn leftover(attach: &Attach) -> Option<String> {
    match attach {
        Attach::Tap { tap, .. } => crate::hostbridge::link_exists(tap).then(|| tap.clone()),
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
        let tap = Attach::Tap {
            tap: "kst-1".into(),
            bridge: "br0".into(),
        };
        assert_eq!(
            netdev(&tap),
            "tap,id=nat,ifname=kst-1,script=no,downscript=no"
        );
        let h = Attach::Helper {
            bridge: "br0".into(),
            helper: PathBuf::from(HELPER),
        };
        assert!(netdev(&h).starts_with("bridge,id=nat,br=br0,helper="));
    }
}
