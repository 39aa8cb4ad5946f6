//! The checks that prove a forwarded port on 127.0.0.1 belongs to our own
//! child (QEMU's user-mode forward): which socket listens on it, and
//! which process holds that socket. The children themselves are
//! `keystone_process::Supervised`.

use keystone_backend::BackendError;
use nix::unistd::Pid;

/// The inode of the socket listening on 127.0.0.1:`port`, if any.
pub fn loopback_listener(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!("0100007F:{port:04X}");
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == want && f[3] == "0A")
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

/// Whether process `pid` holds the socket with `inode`.
pub fn holds_socket(pid: Pid, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str()))
        })
        .unwrap_or(false)
}

/// A port on 127.0.0.1 that nothing listens on right now. Whoever binds
/// it next is checked with [`holds_socket`].
pub fn free_port() -> Result<u16, BackendError> {
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(BackendError::io("bind 127.0.0.1:0"))?;
    Ok(l.local_addr()
        .map_err(BackendError::io("local_addr"))?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_found_and_attributed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let inode = loopback_listener(port).expect("listed");
        assert!(holds_socket(Pid::this(), inode));
        drop(l);
        // Another process (or test thread) may take the freed port at
        // once; ours must be gone.
        assert_ne!(loopback_listener(port), Some(inode));
    }
}
