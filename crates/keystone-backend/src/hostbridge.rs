//! `--network bridge`, the part every backend shares: which host bridge,
//! checked to exist, and the name of the sandbox's link on it. How the
//! link is made is the backend's (a tap for QEMU, a veth for a container).

use crate::{BackendError, Instance};
use std::path::Path;

/// The bridge named by `[backend.microvm] bridge`, checked to exist.
pub fn named_bridge(inst: &Instance) -> Result<String, BackendError> {
    let bridge = inst.settings.bridge.trim();
    if bridge.is_empty() {
        return Err(BackendError::Requirement(
            "--network bridge needs a host bridge: name it with `[backend.microvm] bridge = \"br0\"` \
in the configuration (create one with `ip link add br0 type bridge && ip link set br0 up`)"
                .into(),
        ));
    }
    if !valid_ifname(bridge) {
        return Err(BackendError::Requirement(format!(
            "{bridge:?} is not a network interface name (at most 15 characters, no '/', ':' or spaces); fix `[backend.microvm] bridge`"
        )));
    }
    if !Path::new("/sys/class/net")
        .join(bridge)
        .join("bridge")
        .is_dir()
    {
        return Err(BackendError::Requirement(format!(
            "there is no bridge {bridge} on this host: create it (`ip link add {bridge} type bridge && ip link set {bridge} up`, \
plus an uplink and DHCP for the sandbox) or name an existing one in `[backend.microvm] bridge`"
        )));
    }
    Ok(bridge.to_string())
}

/// The host side of the sandbox's link, unique to the sandbox and within
/// IFNAMSIZ (15 characters).
pub fn link_name(id: &str) -> String {
    let tail: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(11)
        .collect();
    format!("kst-{tail}")
}

/// Whether the host still has a link of that name.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_ifnamsiz() {
        let t = link_name("0123456789abcdef0123");
        assert_eq!(t, "kst-0123456789a");
        assert!(t.len() <= 15);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_ifname("br0"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("waytoolonginterface"));
        assert!(!valid_ifname("br 0"));
    }
}
