//! Tap devices for QEMU (`-netdev tap,fd=N`): on a host bridge
//! (`--network bridge`) or in the egress point's own network namespace.

use crate::BackendError;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};

/// TUNSETIFF on /dev/net/tun, as QEMU's `tap_open` does: a tap without
/// packet information, with virtio-net headers.
pub fn open(name: &str) -> Result<OwnedFd, BackendError> {
    let tun = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(BackendError::io("/dev/net/tun"))?;
    // SAFETY: ifreq is plain old data, valid when zeroed.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(BackendError::Failed(format!("bad tap name {name:?}")));
    }
    for (d, b) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the
    // call, on a descriptor we own.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r != 0 {
        return Err(BackendError::Failed(format!(
            "cannot create tap {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(tun.into())
}
