//! A container sandbox once its first process C exists: the start-up that
//! follows (cgroup, id maps, G, relay, network, readiness), the guard that
//! tears it all down and verifies nothing is left (`Teardown`), and the
//! runtime record the registry keeps.

use super::cgroup::Cgroup;
use super::handshake::{self, Msg, Received};
use super::network::{attach_bridge, enter_sandbox_network, spawn_pasta};
use super::{READY_TIMEOUT, SSH_PORT, STOP_GRACE};
use keystone_backend::idmap::IdMap;
use keystone_backend::signals::{Signals, StopRequest, Wake};
use keystone_backend::{fault, plumbing, BackendError, Instance};
use keystone_process::Supervised;
use keystone_registry::{NetworkMode, ProcessId};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the registry keeps about a running container sandbox.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ContainerRuntime {
    /// G, the sandbox's PID 1.
    #[serde(default)]
    pub(super) init: Option<ProcessId>,
    pub(super) cgroup: Cgroup,
    /// The relay, pasta or the egress point, the DHCP client.
    #[serde(default)]
    pub(super) helpers: Vec<ProcessId>,
}

/// Start-up after C exists: its cgroup and id maps, G, the relay, the
/// network, and the wait for the guest's sshd. `None` when asked to stop
/// meanwhile. An error return leaves the teardown to the caller.
pub(super) fn start(
    inst: &Instance,
    map: &IdMap,
    cg: &Cgroup,
    log: &fs::File,
    guard: &mut Teardown,
    signals: &mut Signals,
) -> Result<Option<Pid>, BackendError> {
    let c = guard.c.pid();
    // Limits apply from the very first instruction of the sandbox.
    cg.add(c.as_raw())
        .map_err(|e| BackendError::Failed(format!("cannot join cgroup: {e}")))?;
    match guard.chan.recv() {
        Received::Msg(Msg::UserNamespace) => {}
        _ => {
            return Err(BackendError::Failed(
                "sandbox process exited before creating its user namespace".into(),
            ))
        }
    }
    map.apply(c.as_raw())
        .map_err(|e| BackendError::Failed(format!("cannot map ids: {e}")))?;
    guard
        .chan
        .send(&Msg::IdsMapped)
        .map_err(BackendError::Failed)?;
    let g = match guard.chan.recv() {
        Received::Msg(Msg::Pid1(pid)) => Pid::from_raw(pid),
        _ => return Err(BackendError::Failed("sandbox failed to start".into())),
    };
    guard.g = keystone_process::pidfd_open(g.as_raw()).ok();

    // The relay: bound on the host, then moved into the sandbox's
    // namespaces through C, so the host needs no port at all.
    fault::point("container-relay")?;
    guard.helpers.push(plumbing::start_relay(
        &inst.socket,
        log,
        ([127, 0, 0, 1], SSH_PORT).into(),
        || enter_sandbox_network(c),
    )?);

    if inst.settings.egress_allowlist() {
        // The allowlist: the guest's only link leads to keystone's egress
        // point. C's namespaces are opened here, as host root: once in
        // the sandbox's user namespace, C's /proc entries are not ours.
        let open = |ns: &str| {
            let path = format!("/proc/{c}/ns/{ns}");
            fs::File::open(&path).map_err(BackendError::io(path))
        };
        let place = keystone_backend::egress::Place::Container {
            user: open("user")?,
            net: open("net")?,
        };
        let log = plumbing::open_log(&inst.log_dir().join("egress.log"))?;
        let egress = keystone_backend::egress::start(inst, &log, place)?;
        guard.egress_control = Some(egress.control);
        guard.helpers.push(egress.factory);
        guard.helpers.push(egress.daemon);
        fault::point("container-egress")?;
    } else if inst.settings.network == NetworkMode::Nat {
        let p = spawn_pasta(c, log, map).map_err(BackendError::Failed)?;
        let pasta = p.pid();
        guard.helpers.push(p);
        // As root, pasta runs on the range's ids, and that change of ids
        // clears its death signal: in the sandbox's cgroup it goes with
        // the sandbox however the supervisor ends (teardown, or the reap
        // after a SIGKILL).
        if map.is_root() {
            cg.add(pasta.as_raw())
                .map_err(|e| BackendError::Failed(format!("pasta: {e}")))?;
        }
    }
    if inst.settings.network == NetworkMode::Bridge {
        guard
            .helpers
            .push(attach_bridge(inst, c, g, log).map_err(BackendError::Failed)?);
    }
    fault::point("container-network")?;

    // Ready when the guest's sshd answers through the relay.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if guard.c.try_reap() {
            return Err(BackendError::Failed(
                "the sandbox's init exited during start".into(),
            ));
        }
        // The relay connects inside the sandbox: refused at once until sshd
        // listens.
        if plumbing::sshd_answers(&inst.socket, Duration::from_secs(2)) {
            return Ok(Some(g));
        }
        if Instant::now() > deadline {
            return Err(BackendError::NoAnswer(format!(
                "the guest's sshd did not answer within {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        if let Wake::Stop(_) = signals.wait(Duration::from_millis(50)) {
            return Ok(None);
        }
    }
}

/// What the supervisor owns, torn down in order and verified.
pub(super) struct Teardown {
    /// C, the sandbox's first process (G's parent).
    pub(super) c: Supervised,
    /// G, the sandbox's PID 1 (C's child, not ours), by pidfd.
    pub(super) g: Option<OwnedFd>,
    pub(super) helpers: Vec<Supervised>,
    pub(super) cgroup: Cgroup,
    pub(super) socket: PathBuf,
    /// The egress point's control socket, with the allowlist.
    pub(super) egress_control: Option<keystone_backend::egress::ControlSocket>,
    /// The handshake with C, which also carries what failed inside.
    pub(super) chan: handshake::Channel,
    /// Set once `teardown` has run (whatever its verdict).
    pub(super) done: bool,
}

impl Teardown {
    /// After `error`: add what the sandbox said about it, tear down
    /// (unless done), and keep what the teardown left beside the error.
    pub(super) fn fail(&mut self, signals: &mut Signals, error: BackendError) -> BackendError {
        let said = self.chan.pending_failures();
        let error = if said.is_empty() {
            error
        } else {
            match error {
                BackendError::Failed(msg) => {
                    BackendError::Failed(format!("{msg}: {}", said.join("; ")))
                }
                other => other,
            }
        };
        if self.done {
            return error;
        }
        match self.teardown(signals, StopRequest::Force) {
            Ok(()) => error,
            Err(cleanup) => error.with_cleanup(cleanup),
        }
    }

    /// Stop everything, then prove nothing is left.
    pub(super) fn teardown(
        &mut self,
        signals: &mut Signals,
        kind: StopRequest,
    ) -> Result<(), BackendError> {
        self.done = true;
        self.stop(signals, kind);
        self.verify()
    }

    pub(super) fn kill_all(&mut self) {
        if let Some(g) = &self.g {
            let _ = keystone_process::pidfd_signal(g, Signal::SIGKILL);
        }
        self.c.kill();
        for mut h in self.helpers.drain(..) {
            h.kill();
        }
    }

    pub(super) fn stop(&mut self, signals: &mut Signals, kind: StopRequest) {
        if kind == StopRequest::Graceful && !self.c.reaped() {
            if let Some(g) = &self.g {
                // tini forwards this to sshd; when PID 1 exits the kernel
                // kills the rest of the PID namespace.
                let _ = keystone_process::pidfd_signal(g, Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.c.wait_exit(Duration::from_millis(100)) {
                    break;
                }
                if let Wake::Stop(StopRequest::Force) = signals.wait(Duration::from_millis(10)) {
                    break;
                }
            }
        }
        self.kill_all();
    }

    /// Check that nothing of the sandbox remains; remove the cgroup.
    pub(super) fn verify(&mut self) -> Result<(), BackendError> {
        let mut left = Vec::new();
        let control = self.egress_control.as_ref().map(|c| c.path());
        for socket in std::iter::once(self.socket.as_path()).chain(control) {
            if let Err(e) = fs::remove_file(socket) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    left.push(format!("the socket {} ({e})", socket.display()));
                }
            }
        }
        if let Some(g) = &self.g {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut fds = [PollFd::new(g.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(5000u16)) != Ok(1) {
                left.push("the sandbox's PID 1".into());
            }
        }
        if let Err(e) = self.cgroup.destroy() {
            left.push(e);
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Leftovers(left))
        }
    }
}

impl Drop for Teardown {
    /// The backstop for a return that skipped `teardown`.
    fn drop(&mut self) {
        if !self.done {
            self.kill_all();
            if let Err(e) = self.verify() {
                eprintln!("keystone: container teardown: {e}");
            }
        }
    }
}
