//! How the supervisor is told to stop: SIGTERM asks for a graceful stop,
//! SIGUSR1 for a forced one. Backends wait for these (and for SIGCHLD)
//! through a signalfd, so the supervisor stays single-threaded: its
//! children rely on PR_SET_PDEATHSIG, which fires when the parent *thread*
//! exits.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::time::Duration;

pub const STOP_GRACEFUL: Signal = Signal::SIGTERM;
pub const STOP_FORCE: Signal = Signal::SIGUSR1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    Graceful,
    Force,
}

/// What woke the supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    Stop(StopRequest),
    Child,
    Timeout,
}

pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Block the supervisor's signals and receive them on a signalfd.
    /// Must be called before any child is forked, so none is lost.
    pub fn install() -> nix::Result<Signals> {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGUSR1,
            Signal::SIGINT,
            Signal::SIGCHLD,
            Signal::SIGHUP,
        ] {
            set.add(s);
        }
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Signals { fd })
    }

    /// Wait for a signal, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Wake {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) if n > 0 => {}
            _ => return Wake::Timeout,
        }
        let mut wake = Wake::Timeout;
        while let Ok(Some(info)) = self.fd.read_signal() {
            let next = match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) | Ok(Signal::SIGHUP) => {
                    Wake::Stop(StopRequest::Graceful)
                }
                Ok(Signal::SIGUSR1) => Wake::Stop(StopRequest::Force),
                Ok(Signal::SIGCHLD) => Wake::Child,
                _ => continue,
            };
            // A stop request outranks a child event; force outranks graceful.
            wake = match (wake, next) {
                (Wake::Stop(StopRequest::Force), _) => wake,
                (_, Wake::Stop(_)) => next,
                (Wake::Stop(_), _) => wake,
                _ => next,
            };
        }
        wake
    }
}

/// Restore the default signal mask in a child before it execs.
pub fn unblock_all() {
    keystone_process::unblock_all_signals();
}
