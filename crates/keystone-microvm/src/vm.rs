//! One running VM: the descriptors of a QEMU start (`Links`), everything
//! the supervisor runs for it, torn down together and verified (`Vm`),
//! the files it boots, and its life from the relay to its end (`serve`),
//! with the runtime record the registry keeps (`MicrovmRuntime`).

use super::artifacts::Artifacts;
use super::{bridge, ports, qmp, READY_TIMEOUT, STOP_GRACE};
use keystone_backend::signals::{Signals, StopRequest, Wake};
use keystone_backend::{fault, plumbing, BackendError, Ended, Instance, Running};
use keystone_process::Supervised;
use keystone_registry::ProcessId;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The descriptors of one QEMU start that are made again on a retry:
/// the QMP listener, the boot log, the virtiofs connection, the tap.
pub(super) struct Links {
    pub(super) qmp: std::os::unix::net::UnixListener,
    pub(super) console: fs::File,
    pub(super) share: Option<std::os::unix::net::UnixStream>,
    pub(super) tap: Option<std::os::fd::OwnedFd>,
}

impl Links {
    pub(super) fn open(
        qmp: &Path,
        console: &Path,
        share: Option<&Path>,
        bridge: Option<&bridge::Attach>,
    ) -> Result<Links, BackendError> {
        let _ = fs::remove_file(qmp);
        let qmp_listener = std::os::unix::net::UnixListener::bind(qmp)
            .map_err(BackendError::io(format!("bind {}", qmp.display())))?;
        let console_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(console)
            .map_err(BackendError::io(console.display().to_string()))?;
        // virtiofsd serves the one connection it accepts: this one,
        // passed on to QEMU.
        let share = share
            .map(|p| {
                std::os::unix::net::UnixStream::connect(p)
                    .map_err(BackendError::io(format!("connect {}", p.display())))
            })
            .transpose()?;
        let tap = bridge.map(bridge::open_tap).transpose()?;
        Ok(Links {
            qmp: qmp_listener,
            console: console_file,
            share,
            tap,
        })
    }
}

/// What the registry (and `run/runtime.json`, for `reap` after a
/// supervisor that died) keeps about a running microVM.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct MicrovmRuntime {
    pub(super) qemu: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) passt: Option<ProcessId>,
    /// The egress point's factory and daemon, with the allowlist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) egress: Vec<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) virtiofsd: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) relay: Option<ProcessId>,
    /// The user-mode forward of the guest's sshd on 127.0.0.1.
    pub(super) ssh_port: u16,
    /// QEMU's own uid (`jail`), when run by root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) qemu_uid: Option<u32>,
    /// "kvm" or "tcg".
    pub(super) accel: String,
    pub(super) nested: bool,
    pub(super) boot_seconds: f64,
}

impl MicrovmRuntime {
    pub(super) fn processes(&self) -> impl Iterator<Item = &ProcessId> {
        [&self.qemu, &self.passt, &self.virtiofsd, &self.relay]
            .into_iter()
            .flatten()
            .chain(&self.egress)
    }
}

/// Everything the supervisor runs for one VM, torn down together.
pub(super) struct Vm {
    pub(super) qemu: Supervised,
    pub(super) passt: Option<Supervised>,
    /// The egress point (factory, daemon), with the allowlist.
    pub(super) egress: Vec<Supervised>,
    pub(super) virtiofsd: Option<Supervised>,
    pub(super) relay: Option<Supervised>,
    /// The bridge attachment, whose tap must be gone after teardown.
    pub(super) bridge: Option<bridge::Attach>,
    pub(super) port: u16,
    pub(super) qmp: PathBuf,
    pub(super) socket: PathBuf,
    /// The egress point's control socket, with the allowlist.
    pub(super) egress_control: Option<keystone_backend::egress::ControlSocket>,
    /// Set once `teardown` has run (whatever its verdict).
    pub(super) torn_down: bool,
}

impl Drop for Vm {
    /// The backstop for a return that skipped `teardown`: the children
    /// are killed and reaped by their own drop; the sockets go here.
    fn drop(&mut self) {
        if !self.torn_down {
            for c in self.children() {
                c.kill();
            }
            for f in [&self.socket, &self.qmp] {
                let _ = fs::remove_file(f);
            }
        }
    }
}

impl Vm {
    /// Stop everything, then prove nothing is left.
    pub(super) fn teardown(
        &mut self,
        signals: &mut Signals,
        kind: StopRequest,
    ) -> Result<(), BackendError> {
        self.torn_down = true;
        self.stop(signals, kind);
        self.verify()
    }

    /// After `error`: tear down (unless done), keeping what the teardown
    /// left beside the error that caused it.
    pub(super) fn fail(&mut self, signals: &mut Signals, error: BackendError) -> BackendError {
        if self.torn_down {
            return error;
        }
        match self.teardown(signals, StopRequest::Force) {
            Ok(()) => error,
            Err(cleanup) => error.with_cleanup(cleanup),
        }
    }

    pub(super) fn children(&mut self) -> impl Iterator<Item = &mut Supervised> {
        std::iter::once(&mut self.qemu)
            .chain(self.passt.as_mut())
            .chain(self.egress.iter_mut())
            .chain(self.virtiofsd.as_mut())
            .chain(self.relay.as_mut())
    }

    pub(super) fn stop(&mut self, signals: &mut Signals, kind: StopRequest) {
        if kind == StopRequest::Graceful && !self.qemu.try_reap() {
            let asked = qmp::Qmp::connect(&self.qmp, Duration::from_secs(2))
                .and_then(|mut q| q.ctrl_alt_del());
            if let Err(e) = &asked {
                tracing::warn!("graceful power-down over QMP failed: {e}");
            }
            let deadline = Instant::now() + STOP_GRACE;
            while asked.is_ok() && Instant::now() < deadline {
                if self.qemu.wait_exit(Duration::from_millis(100)) {
                    break;
                }
                if let Wake::Stop(StopRequest::Force) = signals.wait(Duration::from_millis(10)) {
                    break;
                }
            }
            if !self.qemu.try_reap() {
                tracing::warn!(
                    "the guest did not power off within {}s; quitting QEMU",
                    STOP_GRACE.as_secs()
                );
                if let Ok(mut q) = qmp::Qmp::connect(&self.qmp, Duration::from_secs(2)) {
                    let _ = q.quit();
                }
                self.qemu.wait_exit(Duration::from_secs(3));
            }
        }
        for c in self.children() {
            c.kill();
        }
    }

    /// Prove nothing of the VM remains: every child reaped, every process
    /// group empty, the forwarded port free.
    pub(super) fn verify(&mut self) -> Result<(), BackendError> {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.qmp);
        if let Some(control) = &self.egress_control {
            let _ = fs::remove_file(control.path());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = Vec::new();
            for c in self.children() {
                if !c.reaped() || c.group_alive() {
                    left.push(format!("{} (process group {})", c.name(), c.pid()));
                }
            }
            if ports::loopback_listener(self.port).is_some() {
                left.push(format!("a listener on 127.0.0.1:{}", self.port));
            }
            if let Some(tap) = self.bridge.as_ref().and_then(bridge::leftover) {
                left.push(format!("the tap device {tap}"));
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BackendError::Leftovers(left));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The kernel QEMU boots (the image's, or `backend.microvm.kernel`) and
/// the optional `backend.microvm.initrd`, opened for QEMU. A user's file
/// is copied into the run directory first, world-readable: QEMU reopens
/// its descriptor through /proc/self/fd, which checks the file's own
/// mode against QEMU's id (its own, see `jail`), and the copy also
/// freezes what this boot uses.
pub(super) fn boot_files(
    inst: &Instance,
    art: &Artifacts,
    run_dir: &Path,
) -> Result<(fs::File, Option<fs::File>), BackendError> {
    let open = |user: &Option<PathBuf>, name: &str, image: Option<PathBuf>| {
        let path = match (user, image) {
            (Some(user), _) => {
                let copy = run_dir.join(name);
                let _ = fs::remove_file(&copy);
                fs::copy(user, &copy).map_err(BackendError::io(format!(
                    "copy {} to {}",
                    user.display(),
                    copy.display()
                )))?;
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o644))
                    .map_err(BackendError::io(copy.display().to_string()))?;
                copy
            }
            (None, Some(image)) => image,
            (None, None) => return Ok(None),
        };
        fs::File::open(&path)
            .map(Some)
            .map_err(BackendError::io(path.display().to_string()))
    };
    let kernel = open(&inst.settings.kernel, "kernel", Some(art.kernel()))?
        .ok_or_else(|| BackendError::Failed("no kernel to boot".into()))?;
    let initrd = open(&inst.settings.initrd, "initrd", None)?;
    Ok((kernel, initrd))
}

/// What `serve` reports and records about the boot.
pub(super) struct Boot<'a> {
    pub(super) qemu_log: &'a Path,
    pub(super) boot_log: &'a Path,
    pub(super) run_dir: &'a Path,
    pub(super) disk: &'a Path,
    pub(super) notes: Vec<String>,
    pub(super) facts: Facts,
}

/// Facts of the VM recorded in the runtime.
pub(super) struct Facts {
    pub(super) qemu_uid: Option<u32>,
    pub(super) accel: &'static str,
    pub(super) nested: bool,
}

/// The VM from its relay to its end: wait for the guest's sshd, report
/// ready, then run until asked to stop or the VM goes down. An error
/// return leaves the teardown to the caller (`Vm::fail`).
pub(super) fn serve(
    inst: &Instance,
    vm: &mut Vm,
    signals: &mut Signals,
    on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
    boot: &Boot,
) -> Result<Ended, BackendError> {
    fault::point("microvm-relay")?;
    // The relay: the sandbox's Unix socket to the forwarded port.
    let relay_log = plumbing::open_log(&inst.log_dir().join("relay.log"))?;
    vm.relay = Some(plumbing::start_relay(
        &inst.socket,
        &relay_log,
        ([127, 0, 0, 1], vm.port).into(),
        || Ok(()),
    )?);
    fault::point("microvm-boot")?;

    let started = Instant::now();
    loop {
        if vm.qemu.try_reap() {
            return Err(BackendError::Failed(format!(
                "QEMU exited while the guest booted:\n  {}\n  boot log:\n  {}",
                plumbing::tail(boot.qemu_log, 5),
                plumbing::tail(boot.boot_log, 8)
            )));
        }
        // sshd under TCG can take over a second to send its banner on a
        // live connection; 3 s is what the boots were measured with.
        if plumbing::sshd_answers(&inst.socket, Duration::from_secs(3)) {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(BackendError::NoAnswer(format!(
                "the guest's sshd did not answer within {}s; last lines of {}:\n  {}",
                READY_TIMEOUT.as_secs(),
                boot.boot_log.display(),
                plumbing::tail(boot.boot_log, 8)
            )));
        }
        if let Wake::Stop(_) = signals.wait(Duration::from_millis(100)) {
            vm.teardown(signals, StopRequest::Force)?;
            return Ok(Ended::Stopped);
        }
    }
    tracing::info!(elapsed = ?started.elapsed(), "guest sshd answered");

    let id = |c: Option<&Supervised>| c.and_then(|c| ProcessId::of(c.pid().as_raw()));
    let record = MicrovmRuntime {
        qemu: id(Some(&vm.qemu)),
        passt: id(vm.passt.as_ref()),
        egress: vm.egress.iter().filter_map(|c| id(Some(c))).collect(),
        virtiofsd: id(vm.virtiofsd.as_ref()),
        relay: id(vm.relay.as_ref()),
        ssh_port: vm.port,
        qemu_uid: boot.facts.qemu_uid,
        accel: boot.facts.accel.to_string(),
        nested: boot.facts.nested,
        boot_seconds: started.elapsed().as_secs_f64(),
    };
    // For `reap` after a supervisor that died: it gets no registry.
    let path = boot.run_dir.join("runtime.json");
    fs::write(
        &path,
        serde_json::to_string(&record).map_err(|e| BackendError::Failed(e.to_string()))?,
    )
    .map_err(BackendError::io(path.display().to_string()))?;
    on_ready(&Running::new(&record, boot.notes.clone())?).map_err(BackendError::Failed)?;

    loop {
        match signals.wait(Duration::from_secs(5)) {
            Wake::Stop(kind) => {
                vm.teardown(signals, kind)?;
                if !inst.settings.persist {
                    if let Err(e) = fs::remove_file(boot.disk) {
                        tracing::warn!(
                            "cannot remove the discarded disk {}: {e}",
                            boot.disk.display()
                        );
                    }
                }
                return Ok(Ended::Stopped);
            }
            Wake::Child | Wake::Timeout => {
                let gone = vm.children().find_map(|c| c.try_reap().then(|| c.name()));
                if let Some(name) = gone {
                    vm.teardown(signals, StopRequest::Force)?;
                    return Ok(Ended::Exited(if name == "qemu" {
                        "the virtual machine powered off".into()
                    } else {
                        format!("helper process {name} exited")
                    }));
                }
            }
        }
    }
}

/// Kill the processes of a runtime record, if they are still the same
/// processes.
pub(super) fn kill_recorded(record: &MicrovmRuntime) {
    for id in record.processes() {
        let Ok(fd) = keystone_process::pidfd_open(id.pid) else {
            continue;
        };
        // The pidfd pins the process; check it is the recorded one.
        if id.is_alive() {
            if let Err(e) = keystone_process::pidfd_signal(&fd, nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!("cannot kill the recorded process {}: {e}", id.pid);
            }
        }
    }
}
