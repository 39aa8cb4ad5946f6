//! Supervised child processes held by pidfd, and the checks that prove a
//! forwarded port belongs to one of them.
//!
//! The earlier Python attempt leaked VMs by signalling stale PIDs and a
//! wrapper instead of QEMU. Here every child is our direct child, in its
//! own process group, with a parent-death signal, and is addressed through
//! a pidfd, which cannot come to mean another process.

use crate::BackendError;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Child {
    pub name: &'static str,
    pub pid: Pid,
    pidfd: OwnedFd,
    reaped: bool,
}

pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; on success it returns
    // a new file descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn pidfd_signal(fd: &OwnedFd, sig: Signal) -> std::io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own; a null siginfo is
    // allowed and means "as kill(2) would send it".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The host identity a child is dropped to before it execs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group that may open /dev/kvm).
    pub groups: Vec<u32>,
}

/// Spawn `cmd` as a supervised child: own process group, SIGKILL when the
/// supervisor dies, default signal mask, `keep` descriptors inherited.
pub fn spawn(name: &'static str, cmd: Command, keep: &[RawFd]) -> Result<Child, BackendError> {
    spawn_as(name, cmd, keep, None)
}

/// [`spawn`], with the child dropped to `creds` (groups, then gid, then
/// uid) before it execs.
pub fn spawn_as(
    name: &'static str,
    mut cmd: Command,
    keep: &[RawFd],
    creds: Option<Creds>,
) -> Result<Child, BackendError> {
    let keep = keep.to_vec();
    let parent = std::process::id() as libc::pid_t;
    let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
    // SAFETY: pre_exec runs in the forked child before exec; setpgid,
    // setgroups, setresgid, setresuid, prctl, getppid, fcntl and
    // sigprocmask are async-signal-safe, and `groups` was allocated
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(c) = &creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setresgid(c.gid, c.gid, c.gid) != 0
                    || libc::setresuid(c.uid, c.uid, c.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the credentials: a change of ids clears the death
            // signal. Then the parent check, for a supervisor that died
            // before the signal was armed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            for fd in &keep {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            crate::signals::unblock_all();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| BackendError::Failed(format!("cannot start {name}: {e}")))?;
    let pid = Pid::from_raw(child.id() as i32);
    // The child cannot be reaped before we wait for it, so this pidfd is
    // for exactly this process.
    let pidfd =
        pidfd_open(pid.as_raw()).map_err(BackendError::io(format!("pidfd_open({name})")))?;
    // We reap it ourselves through waitpid.
    std::mem::forget(child);
    Ok(Child {
        name,
        pid,
        pidfd,
        reaped: false,
    })
}

/// Take charge of a child forked directly (not through `spawn`).
pub fn adopt(name: &'static str, pid: Pid) -> Result<Child, BackendError> {
    match pidfd_open(pid.as_raw()) {
        Ok(pidfd) => Ok(Child {
            name,
            pid,
            pidfd,
            reaped: false,
        }),
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            Err(BackendError::Failed(format!("pidfd_open({name}): {e}")))
        }
    }
}

impl Child {
    /// Reap it if it has exited; true when it is gone.
    pub fn try_reap(&mut self) -> bool {
        if self.reaped {
            return true;
        }
        if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(self.pid, Some(WaitPidFlag::WNOHANG))
        {
            self.reaped = true;
        }
        self.reaped
    }

    /// Wait until it exits, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_reap() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let ms = left.as_millis().min(1000) as u16;
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
    }

    /// SIGKILL its whole process group, then reap it.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let _ = nix::sys::signal::killpg(self.pid, Signal::SIGKILL);
        let _ = pidfd_signal(&self.pidfd, Signal::SIGKILL);
        if !self.wait_exit(Duration::from_secs(5)) {
            let _ = waitpid(self.pid, None);
            self.reaped = true;
        }
    }

    /// Whether anything of its process group is left.
    pub fn group_alive(&self) -> bool {
        nix::sys::signal::killpg(self.pid, None).is_ok()
    }

    pub fn reaped(&self) -> bool {
        self.reaped
    }
}

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

    #[test]
    fn spawned_child_is_killed_with_its_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let mut c = spawn("sh", cmd, &[]).expect("spawn");
        assert!(!c.try_reap());
        assert!(c.group_alive());
        c.kill();
        assert!(c.reaped());
        let deadline = Instant::now() + Duration::from_secs(2);
        while c.group_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!c.group_alive(), "the background sleep is gone too");
    }
}
