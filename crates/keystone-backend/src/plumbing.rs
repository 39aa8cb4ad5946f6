//! What every local backend needs the same way: the readiness probe of the
//! guest's sshd, the relay child that carries the sandbox's Unix socket to
//! the guest, the guest's resolv.conf, log files, and a child's standard
//! streams. One copy each, so the backends cannot drift apart.

use crate::BackendError;
use keystone_process::Supervised;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// Whether the guest's sshd answers on `socket` within `patience`: its
/// banner starts with `SSH-`. The callers poll, so a short patience only
/// costs another try, while a long one is waited out in full when the
/// connection is a dead one (QEMU's user-mode forward accepts before the
/// guest listens, and holds such a connection open): each backend passes
/// what its path to the guest needs, and says why.
pub fn sshd_answers(socket: &Path, patience: Duration) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(patience));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Bind the sandbox's socket (a stale one from a dead supervisor is
/// replaced) and fork the relay that carries each connection to `target`.
/// `enter` runs in the child first (e.g. joining the sandbox's network
/// namespace). The relay dies with the supervisor and is stopped and
/// reaped when the returned child is dropped.
pub fn start_relay(
    socket: &Path,
    log: &fs::File,
    target: SocketAddr,
    enter: impl FnOnce() -> Result<(), String>,
) -> Result<Supervised, BackendError> {
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(BackendError::io(format!("bind {}", socket.display())))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the supervisor is single-threaded when it forks; the child
    // only redirects its streams, enters namespaces and serves.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            redirect_stdio(log);
            let _ =
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
            keystone_process::unblock_all_signals();
            let served = (|| -> Result<(), String> {
                keystone_process::arm_death_signal(nix::sys::signal::Signal::SIGKILL, parent)
                    .map_err(|e| format!("death signal: {e}"))?;
                enter()?;
                // Joining a user namespace the supervisor does not own
                // clears the death signal: arm it again (and re-check the
                // parent) after whatever `enter` did.
                keystone_process::arm_death_signal(nix::sys::signal::Signal::SIGKILL, parent)
                    .map_err(|e| format!("death signal: {e}"))?;
                keystone_channel::bridge::serve_relay(listener, target).map_err(|e| e.to_string())
            })();
            if let Err(e) = served {
                eprintln!("keystone relay: {e}");
            }
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(1) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(listener);
            Ok(Supervised::adopt("relay", child)?)
        }
    }
}

/// The guest's resolv.conf: keystone's egress point with the allowlist
/// (which answers every query itself); the host's resolvers without the
/// loopback ones (unreachable from inside) for open NAT; nothing
/// otherwise (offline, or a bridge whose DHCP lease brings them).
pub fn resolv_conf(settings: &keystone_registry::Settings) -> String {
    if settings.egress_allowlist() {
        return format!("nameserver {}\n", keystone_egress::GATEWAY);
    }
    if settings.network != keystone_registry::NetworkMode::Nat {
        return String::new();
    }
    fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("nameserver")
                && l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| !a.starts_with("127.") && a != "::1")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A sandbox log file, appended to.
pub fn open_log(path: &Path) -> Result<fs::File, BackendError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(BackendError::io(path.display().to_string()))
}

/// The last `n` non-empty lines of a log, indented for an error message.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n  ")
}

/// In a forked child: stdin from /dev/null, stdout and stderr to `log`.
pub fn redirect_stdio(log: &fs::File) {
    if let Ok(null) = fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    let _ = nix::unistd::dup2(log.as_raw_fd(), 1);
    let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_drops_loopback_resolvers_and_is_empty_offline() {
        use keystone_registry::{EgressMode, NetworkMode};
        let mut s: keystone_registry::Settings = serde_json::from_str(SETTINGS).expect("settings");
        s.network = NetworkMode::None;
        assert_eq!(resolv_conf(&s), "");
        s.network = NetworkMode::Nat;
        s.egress = EgressMode::Open;
        assert!(!resolv_conf(&s).contains("127."));
        s.egress = EgressMode::Allowlist;
        assert_eq!(resolv_conf(&s), "nameserver 198.18.0.1\n");
    }

    const SETTINGS: &str = r#"{"memory_mb":1024,"vcpus":1,"nested_virt":false,"network":"nat",
        "sync_mode":"manual","persist":true,"image":"x"}"#;

    #[test]
    fn the_probe_wants_an_ssh_banner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s");
        assert!(
            !sshd_answers(&sock, Duration::from_secs(2)),
            "nothing listens"
        );
        let l = UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            use std::io::Write;
            for banner in [&b"HTTP/1.1"[..], b"SSH-2.0-x\r\n"] {
                let (mut c, _) = l.accept().expect("accept");
                let _ = c.write_all(banner);
            }
        });
        assert!(
            !sshd_answers(&sock, Duration::from_secs(2)),
            "not an SSH banner"
        );
        assert!(sshd_answers(&sock, Duration::from_secs(2)));
        t.join().expect("thread");
    }
}
