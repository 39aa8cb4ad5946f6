//! Supervised child processes: the one way keystone starts a process that
//! must not outlive whoever started it (QEMU, passt, pasta, virtiofsd, the
//! relays, the DHCP helper, the automatic sync, mmdebstrap).
//!
//! The earlier Python attempt leaked VMs by signalling stale PIDs and a
//! wrapper instead of QEMU. Every [`Supervised`] child is therefore:
//!
//! - **in its own process group**, so stopping it stops what it started;
//! - **given a death signal, checked**: armed after any change of ids
//!   (which clears it), its result checked, and followed by a re-check of
//!   the parent's pid, because a parent that died before the signal was
//!   armed would never send it (codex-rs `process_group.rs` does the same);
//! - **addressed through a pidfd**, which cannot come to mean another
//!   process once this one is gone;
//! - **stopped and reaped with its group on drop**: SIGTERM first when the
//!   child needs to clean up (mmdebstrap unmounts its chroot), SIGKILL
//!   after the grace or at once. The group is signalled while the leader
//!   is still an unreaped zombie, when its id cannot have been reused.
//!
//! A child made by `fork()` without `exec` (the container's init and
//! relays) calls [`arm_death_signal`] itself and is taken in charge with
//! [`Supervised::adopt`].

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// A child that could not be started or taken in charge.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {name}: {source}")]
pub struct SpawnError {
    pub name: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The host identity a child is dropped to before it execs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group that may open /dev/kvm).
    pub groups: Vec<u32>,
}

/// How a [`Supervised`] child is started; [`Spawn::start`] starts it.
pub struct Spawn {
    name: &'static str,
    cmd: Command,
    keep: Vec<RawFd>,
    creds: Option<Creds>,
    death_signal: Signal,
    grace: Duration,
}

impl Spawn {
    /// `cmd` as the child called `name` (in messages and teardown reports).
    pub fn new(name: &'static str, cmd: Command) -> Spawn {
        Spawn {
            name,
            cmd,
            keep: Vec::new(),
            creds: None,
            death_signal: Signal::SIGKILL,
            grace: Duration::ZERO,
        }
    }

    /// Descriptors the child inherits (their close-on-exec flag is cleared
    /// in the child only).
    pub fn keep(mut self, fds: &[RawFd]) -> Spawn {
        self.keep.extend_from_slice(fds);
        self
    }

    /// Drop the child to these ids (groups, then gid, then uid) before it
    /// execs.
    pub fn creds(mut self, creds: Option<Creds>) -> Spawn {
        self.creds = creds;
        self
    }

    /// The signal the child gets when its parent dies (default SIGKILL; a
    /// child that must clean up, like mmdebstrap, takes SIGTERM).
    pub fn death_signal(mut self, signal: Signal) -> Spawn {
        self.death_signal = signal;
        self
    }

    /// On stop or drop, SIGTERM the group and give it this long before
    /// SIGKILL (default: SIGKILL at once).
    pub fn stop_grace(mut self, grace: Duration) -> Spawn {
        self.grace = grace;
        self
    }

    pub fn start(self) -> Result<Supervised, SpawnError> {
        let Spawn {
            name,
            mut cmd,
            keep,
            creds,
            death_signal,
            grace,
        } = self;
        let parent = std::process::id() as libc::pid_t;
        let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
        let death = death_signal as libc::c_int;
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
                // After the credentials: a change of ids clears it.
                arm_death_signal_raw(death, parent)?;
                for fd in &keep {
                    libc::fcntl(*fd, libc::F_SETFD, 0);
                }
                unblock_all_signals();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SpawnError { name, source })?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child cannot be reaped before we wait for it, so this pidfd
        // is for exactly this process.
        let pidfd = match pidfd_open(pid.as_raw()) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(SpawnError { name, source });
            }
        };
        // We reap it ourselves (waitid/waitpid); `std::process::Child`
        // neither kills nor reaps on drop, so forgetting it is exact.
        std::mem::forget(child);
        Ok(Supervised {
            name,
            pid,
            pidfd,
            group: true,
            grace,
            reaped: false,
            status: None,
        })
    }
}

/// A child process we started and will stop. See the module docs.
#[derive(Debug)]
pub struct Supervised {
    name: &'static str,
    pid: Pid,
    pidfd: OwnedFd,
    /// Whether it leads its own process group (false for an adopted child
    /// that did not make one).
    group: bool,
    grace: Duration,
    reaped: bool,
    /// How it ended, once reaped.
    status: Option<WaitStatus>,
}

impl Supervised {
    /// Take charge of a child forked directly (not through [`Spawn`]); it
    /// armed its own death signal with [`arm_death_signal`].
    pub fn adopt(name: &'static str, pid: Pid) -> Result<Supervised, SpawnError> {
        match pidfd_open(pid.as_raw()) {
            Ok(pidfd) => Ok(Supervised {
                name,
                pid,
                pidfd,
                group: nix::unistd::getpgid(Some(pid)) == Ok(pid),
                grace: Duration::ZERO,
                reaped: false,
                status: None,
            }),
            Err(source) => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                Err(SpawnError { name, source })
            }
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether it has been reaped.
    pub fn reaped(&self) -> bool {
        self.reaped
    }

    /// Whether the leader has exited, without reaping it: while it is an
    /// unreaped zombie its pid, and so its group's id, cannot be reused.
    fn leader_exited(&self, block: bool) -> bool {
        let mut flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        if !block {
            flags |= WaitPidFlag::WNOHANG;
        }
        loop {
            match waitid(Id::Pid(self.pid), flags) {
                Ok(WaitStatus::StillAlive) => return false,
                Ok(_) => return true,
                Err(Errno::EINTR) => continue,
                // ECHILD: not ours to wait for (or already reaped).
                Err(_) => return true,
            }
        }
    }

    /// Kill what the leader left in its group, then reap the leader.
    fn reap_now(&mut self) -> Option<WaitStatus> {
        if self.group {
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
        let status = loop {
            match waitpid(self.pid, None) {
                Err(Errno::EINTR) => continue,
                other => break other.ok(),
            }
        };
        self.reaped = true;
        self.status = status;
        status
    }

    /// If it has exited: kill the rest of its group, reap it, and say how
    /// it ended. `None` while it runs.
    pub fn try_wait(&mut self) -> Option<WaitStatus> {
        if !self.reaped {
            if !self.leader_exited(false) {
                return None;
            }
            self.reap_now();
        }
        Some(self.status.unwrap_or(WaitStatus::StillAlive))
    }

    /// Whether it is gone (reaping it if it has exited).
    pub fn try_reap(&mut self) -> bool {
        self.try_wait().is_some()
    }

    /// Wait until it exits, at most `timeout`; true when it is gone.
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

    /// Wait for it to exit by itself, with no bound; kill the rest of its
    /// group and reap it.
    pub fn wait(mut self) -> Option<WaitStatus> {
        if !self.reaped {
            self.leader_exited(true);
            self.reap_now();
        }
        self.status
    }

    /// Send `signal` to it (through its pidfd: never to another process).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        pidfd_signal(&self.pidfd, signal)
    }

    /// Stop it and its group: SIGTERM and the grace when it has one, then
    /// SIGKILL; reaped when this returns.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        if !self.grace.is_zero() {
            self.signal_group(Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while !self.leader_exited(false) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.signal_group(Signal::SIGKILL);
        self.leader_exited(true);
        self.reap_now();
    }

    fn signal_group(&self, signal: Signal) {
        if self.group {
            let _ = killpg(self.pid, signal);
        }
        let _ = pidfd_signal(&self.pidfd, signal);
    }

    /// Whether anything of its process group is left.
    pub fn group_alive(&self) -> bool {
        if self.group {
            killpg(self.pid, None).is_ok()
        } else {
            !self.reaped
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In a child forked without exec: die with `signal` when the parent
/// `parent` dies, and exit at once if it already has. Async-signal-safe.
pub fn arm_death_signal(signal: Signal, parent: Pid) -> std::io::Result<()> {
    arm_death_signal_raw(signal as libc::c_int, parent.as_raw())
}

fn arm_death_signal_raw(signal: libc::c_int, parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this task;
    // getppid and _exit are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before the signal was armed: then
        // we were re-parented and nobody will ever send it.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// In a child forked without exec whose parent is not in its PID
/// namespace (so `getppid` cannot name it): die with `signal` when the
/// parent dies, and exit at once if the process behind `parent` (a pidfd
/// opened before the fork) has already exited. Async-signal-safe.
pub fn arm_death_signal_on(signal: Signal, parent: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: prctl only sets a flag on this task; poll on a descriptor
    // we hold and _exit are async-signal-safe.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            signal as libc::c_int as libc::c_ulong,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // A pidfd reads as ready once its process has exited.
        let mut p = libc::pollfd {
            fd: parent.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut p, 1, 0) > 0 {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Unblock every signal in this thread. A child forked from the supervisor
/// (whose stop signals are blocked for its signalfd) calls this so it can
/// be stopped as usual. Async-signal-safe.
pub fn unblock_all_signals() {
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset, and
    // sigprocmask with SIG_SETMASK on it only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gone_within(group: Pid, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while killpg(group, None).is_ok() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    #[test]
    fn dropping_it_kills_and_reaps_the_whole_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 600 & sleep 600"]);
        let c = Spawn::new("sh", cmd).start().expect("spawn");
        let pid = c.pid();
        std::thread::sleep(Duration::from_millis(100));
        assert!(c.group_alive());
        drop(c);
        // The leader is reaped by us; the background sleep by init.
        assert!(gone_within(pid, Duration::from_secs(5)), "no process left");
        assert_eq!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Err(Errno::ECHILD));
    }

    #[test]
    fn a_leader_that_exits_takes_its_leftovers_when_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 600 & exit 3"]);
        let mut c = Spawn::new("sh", cmd).start().expect("spawn");
        assert!(c.wait_exit(Duration::from_secs(5)));
        assert!(c.reaped());
        assert!(
            gone_within(c.pid(), Duration::from_secs(5)),
            "the sleep went too"
        );
    }

    #[test]
    fn a_grace_lets_the_child_clean_up_on_sigterm() {
        let dir = std::env::temp_dir().join(format!("ks-proc-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "trap 'echo cleaned > {}; exit 0' TERM; while :; do sleep 0.05; done",
            dir.display()
        ));
        let mut c = Spawn::new("sh", cmd)
            .stop_grace(Duration::from_secs(5))
            .start()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        c.kill();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM was enough"
        );
        assert_eq!(
            std::fs::read_to_string(&dir).expect("trap ran").trim(),
            "cleaned"
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn the_death_signal_survives_a_change_of_ids() {
        // A change of ids clears a death signal armed before it; ours is
        // armed after. PR_SET_PDEATHSIG fires when the parent *thread*
        // exits, so a thread that starts the child and ends stands in
        // for a supervisor that dies. As root only (the ids must change).
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let pid = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("600");
            let c = Spawn::new("sleep", cmd)
                .creds(Some(Creds {
                    uid: 65534,
                    gid: 65534,
                    groups: vec![],
                }))
                .start()
                .expect("spawn");
            let pid = c.pid();
            // Leave it running: only the death signal may stop it now.
            std::mem::forget(c);
            pid
        })
        .join()
        .expect("thread");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => break,
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    panic!("the child outlived its parent: {other:?}");
                }
            }
        }
    }

    #[test]
    fn an_adopted_fork_is_reaped_on_drop() {
        // SAFETY: the test's child only sleeps and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                std::thread::sleep(Duration::from_secs(600));
                // SAFETY: _exit in a forked child.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let c = Supervised::adopt("child", child).expect("adopt");
                drop(c);
                assert_eq!(
                    waitpid(child, Some(WaitPidFlag::WNOHANG)),
                    Err(Errno::ECHILD)
                );
            }
        }
    }
}
