//! The microvm backend: each sandbox is a QEMU virtual machine booting the
//! guest image's own kernel (Debian's `linux-image-cloud-amd64`) straight
//! into a small init of ours (`keystone-init`, see `keystone_image::guest`).
//!
//! Host side, per image (`<cache>/microvm/<image>/`, built once by
//! `prepare`): `vmlinuz` and `rootfs.ext4`, made with `mkfs.ext4 -d` from the
//! unpacked tarball and kept read-only. Per sandbox (`<sandbox>/`):
//! `disk/root.qcow2`, a qcow2 overlay on that ext4 (the persistent disk;
//! `--fresh` and `destroy` remove it), `run/config.tar`, `run/qmp.sock`,
//! `logs/{boot,qemu,passt}.log`.
//!
//! Choices, and why:
//! - No initrd. The cloud kernel has NVMe and ext4 built in, so the root
//!   disk is an NVMe drive the kernel mounts by itself; an initramfs-tools
//!   initrd cost 7 s under TCG (udev alone). Everything else (virtio-blk,
//!   virtio-net, virtio-rng) is a module the init loads from the root.
//! - Keys and per-boot settings enter through a read-only virtio disk
//!   holding a plain tar archive: no file system, no guest driver beyond
//!   virtio-blk, nothing writable shared with the host, and the private
//!   host key never appears on QEMU's command line (visible in `ps`).
//!   fw_cfg needs a module and 9p is not in the cloud kernel.
//! - Two links. eth0 is QEMU user networking with `restrict=on`: it
//!   carries only the host-initiated forward to sshd (from a free port on
//!   127.0.0.1, verified to be held by our QEMU), so `--network none` is
//!   just that. With `--network nat`, eth1 is passt over a socketpair
//!   (`-netdev socket,fd=`, passt `-F`: no socket file) with `--no-map-gw`,
//!   which keeps the host's loopback out of reach; QEMU's own user
//!   networking always maps 10.0.2.2 to it, so it cannot be the way out.
//!   A relay process serves the forward on the sandbox's Unix socket, as
//!   every backend does.
//! - QEMU, passt and the relay are direct children of the supervisor
//!   (`keystone_process::Supervised`: own process group, checked death
//!   signal, pidfd, killed with their group on drop); teardown checks the
//!   process groups are empty and the port is free.
//!
//! The pieces: `artifacts.rs` (per image: kernel, ext4; per sandbox: the
//! overlay), `config_disk.rs` (the per-boot configuration), `qemu.rs` (the
//! command line of descriptors), `jail.rs` and `view.rs` (QEMU's host
//! identity and mount view), `vm.rs` (one running VM: its children, its
//! teardown, its life after QEMU listens), and here the `Backend` itself,
//! whose `run` constructs the VM (retrying a lost port race) and hands it
//! to `vm::serve`.
//! - Graceful stop is ctrl-alt-del over QMP (the guest's init syncs and
//!   powers off), then a bounded wait, then QMP `quit`, then SIGKILL.
//! - `--network bridge` makes eth1 a tap on a host bridge (`bridge.rs`),
//!   and the guest takes an address there by DHCP.
//! - The opt-in live share (`--share`) is virtiofs, served by virtiofsd as
//!   one more child (`share.rs`); the cloud kernel has no 9p.
//! - qboot instead of SeaBIOS when QEMU ships it: a second less under TCG.

pub mod accel;
mod artifacts;
mod bridge;
mod config_disk;
mod jail;
mod ports;
pub mod qemu;
mod qmp;
mod share;
mod view;
mod vm;

use accel::{KvmFacts, NestedHost};
use artifacts::{check_disk_base, make_overlay, overlay, Artifacts};
use config_disk::write_config;
use keystone_backend::signals::Signals;
use keystone_backend::{disk, fault};
use keystone_backend::{
    plumbing, require_tool, Backend, BackendError, Ended, Instance, Running, Usage,
};
use keystone_process::Spawn;
use keystone_registry::NetworkMode;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qemu::VmSpec;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vm::{boot_files, kill_recorded, serve, Boot, Facts, Links, MicrovmRuntime, Vm};

/// How long the guest may take to power off after ctrl-alt-del.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long the guest's sshd may take to answer after QEMU starts.
const READY_TIMEOUT: Duration = Duration::from_secs(110);
/// The size of the guest's root file system (sparse: only what is written
/// takes space, in the shared base or the sandbox's overlay).
const ROOT_SIZE: u64 = 16 << 30;
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

pub struct MicrovmBackend;

/// The virtiofsd the live share would use, if any.
pub fn virtiofsd() -> Option<PathBuf> {
    share::find_daemon()
}

/// The accelerator and nested-virtualization lines for this host.
pub fn host_acceleration() -> (accel::AccelChoice, NestedHost) {
    (KvmFacts::probe().choose(), NestedHost::probe())
}

impl Backend for MicrovmBackend {
    fn kind(&self) -> &'static str {
        "microvm"
    }

    fn prepare(&self, inst: &Instance, progress: &mut dyn FnMut(&str)) -> Result<(), BackendError> {
        require_tool(
            "qemu-system-x86_64",
            "qemu-system-x86",
            "it runs the microVMs",
        )?;
        require_tool(
            "qemu-img",
            "qemu-utils",
            "it makes each sandbox's disk overlay",
        )?;
        require_tool("mkfs.ext4", "e2fsprogs", "it makes the microVM root disk")?;
        require_tool("tar", "tar", "it unpacks the image")?;
        match inst.settings.network {
            NetworkMode::Nat if inst.settings.egress_allowlist() => {
                require_tool("ip", "iproute2", "the egress allowlist needs it")?
            }
            NetworkMode::Nat => require_tool(
                "passt",
                "passt",
                "--network nat for microVMs; or use --network none",
            )?,
            NetworkMode::None => {}
            NetworkMode::Bridge => {
                bridge::plan(inst)?;
            }
        }
        share::daemon_for(inst)?;
        for (key, file) in [
            ("backend.microvm.kernel", &inst.settings.kernel),
            ("backend.microvm.initrd", &inst.settings.initrd),
        ] {
            if let Some(path) = file {
                fs::File::open(path).map_err(|e| {
                    BackendError::Failed(format!(
                        "{key} = {}: cannot read it ({e}); set a readable file or \"\" for the image's own",
                        path.display()
                    ))
                })?;
            }
        }
        let art = Artifacts::of(inst);
        if !art.complete() {
            Self::build_artifacts(inst, &art, progress)?;
        }
        let disk = overlay(inst);
        if inst.settings.persist {
            if disk.exists() {
                check_disk_base(inst, &art.rootfs(), &disk)?;
            } else {
                make_overlay(&art.rootfs(), &disk)?;
                disk::record_for(inst, Some(&art.rootfs()))?;
            }
        }
        Ok(())
    }

    fn run(
        &self,
        inst: &Instance,
        on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
    ) -> Result<Ended, BackendError> {
        let mut signals = Signals::install()?;
        let art = Artifacts::of(inst);
        if !art.complete() {
            return Err(BackendError::Failed(format!(
                "the microVM disk of image {} is not prepared at {}",
                inst.image_id,
                art.dir.display()
            )));
        }
        let run_dir = inst.dir.join("run");
        for d in [&run_dir, &inst.log_dir()] {
            fs::create_dir_all(d).map_err(BackendError::io(d.display().to_string()))?;
        }
        // QMP and virtiofsd's sockets: only this user, whatever the umask.
        fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))
            .map_err(BackendError::io(run_dir.display().to_string()))?;
        let disk = overlay(inst);
        if !inst.settings.persist {
            let _ = fs::remove_file(&disk);
            make_overlay(&art.rootfs(), &disk)?;
        } else if !disk.exists() {
            return Err(BackendError::Failed(format!(
                "the sandbox's disk {} is missing",
                disk.display()
            )));
        }
        let config = write_config(inst, &run_dir)?;
        let bridge_plan = match inst.settings.network {
            NetworkMode::Bridge => Some(bridge::plan(inst)?),
            NetworkMode::Nat | NetworkMode::None => None,
        };
        let share_daemon = share::daemon_for(inst)?;
        let share_socket = run_dir.join("virtiofs.sock");
        let (choice, host_nested) = host_acceleration();
        let (nested_flag, nested_line) =
            accel::nested_decision(inst.settings.nested_virt, choice.accel, &host_nested);
        let mut notes = vec![choice.reason.clone(), nested_line];
        let jail = jail::for_qemu(&inst.dir, choice.accel)?;
        notes.extend(jail.note.clone());

        let qmp_path = run_dir.join("qmp.sock");
        let _ = fs::remove_file(&qmp_path);
        let boot_log = inst.log_dir().join("boot.log");
        let qemu_log_path = inst.log_dir().join("qemu.log");
        let qemu_log = plumbing::open_log(&qemu_log_path)?;
        // What QEMU reads and writes, opened here (see `qemu::Fds`).
        let open_ro =
            |p: &Path| fs::File::open(p).map_err(BackendError::io(p.display().to_string()));
        let (kernel_file, initrd_file) = boot_files(inst, &art, &run_dir)?;
        let base_file = open_ro(&art.rootfs())?;
        let disk_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&disk)
            .map_err(BackendError::io(disk.display().to_string()))?;
        let config_file = open_ro(&config)?;

        // With the allowlist the way out is a tap in the egress point's
        // own namespace, made once for every attempt below.
        let mut egress: Option<keystone_backend::egress::Egress> = if inst
            .settings
            .egress_allowlist()
        {
            let log = plumbing::open_log(&inst.log_dir().join("egress.log"))?;
            let egress =
                keystone_backend::egress::start(inst, &log, keystone_backend::egress::Place::Tap)?;
            fault::point("microvm-egress")?;
            Some(egress)
        } else {
            None
        };
        // Its processes move into each attempt's Vm, and back out before
        // a failed attempt's teardown: the egress point serves them all.
        let (egress_tap, mut egress_procs, mut egress_control) = match egress.take() {
            Some(e) => (e.tap, vec![e.factory, e.daemon], Some(e.control)),
            None => (None, Vec::new(), None),
        };

        // A port that is free now; whoever binds it is checked below, and
        // a lost race is retried with another.
        let mut attempt = 0;
        let mut vm = loop {
            attempt += 1;
            let port = ports::free_port()?;
            let (nat_fd, passt) =
                if inst.settings.network == NetworkMode::Nat && egress_tap.is_none() {
                    let (a, b) = socketpair(
                        AddressFamily::Unix,
                        SockType::Stream,
                        None,
                        SockFlag::SOCK_CLOEXEC,
                    )?;
                    let log = plumbing::open_log(&inst.log_dir().join("passt.log"))?;
                    let mut cmd = Command::new("passt");
                    // Foreground, one client (the socketpair), IPv4, the
                    // guest's static address, no inbound forwards, and no
                    // mapping of the gateway to the host's loopback.
                    cmd.args(["-f", "-q", "-4", "--no-map-gw", "-t", "none", "-u", "none"])
                        .args(["-a", qemu::NAT_IP, "-n", "24", "-g", qemu::NAT_GATEWAY])
                        .args(["-F", &a.as_raw_fd().to_string()])
                        .stdin(Stdio::null())
                        .stdout(log.try_clone().map_err(BackendError::io("passt.log"))?)
                        .stderr(log)
                        .env_clear()
                        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
                    let p = Spawn::new("passt", cmd).keep(&[a.as_raw_fd()]).start()?;
                    drop(a);
                    (Some(b), Some(p))
                } else {
                    (None, None)
                };
            // Each child started here is killed and reaped if a later step
            // fails (Supervised's drop).
            let virtiofsd = match &share_daemon {
                Some(daemon) => Some(share::spawn(inst, daemon, &share_socket)?),
                None => None,
            };
            let links = Links::open(
                &qmp_path,
                &boot_log,
                virtiofsd.as_ref().map(|_| share_socket.as_path()),
                bridge_plan.as_ref(),
            )?;
            let tap = links.tap.as_ref().or(egress_tap.as_ref());
            let uplink = match (&nat_fd, tap) {
                (Some(fd), _) => Some(format!("socket,id=nat,fd={}", fd.as_raw_fd())),
                (None, Some(tap)) => Some(bridge::netdev(tap.as_raw_fd())),
                (None, None) => None,
            };
            let fds = qemu::Fds {
                kernel: kernel_file.as_raw_fd(),
                initrd: initrd_file.as_ref().map(|f| f.as_raw_fd()),
                base: base_file.as_raw_fd(),
                disk: disk_file.as_raw_fd(),
                config: config_file.as_raw_fd(),
                console: links.console.as_raw_fd(),
                qmp: links.qmp.as_raw_fd(),
                share: links.share.as_ref().map(|s| s.as_raw_fd()),
            };
            let spec = VmSpec {
                name: inst.name.clone(),
                accel: choice.accel,
                nested_flag,
                memory_mb: inst.settings.memory_mb,
                vcpus: inst.settings.vcpus,
                fds,
                ssh_port: port,
                uplink,
                bios: Path::new(QBOOT).exists().then(|| PathBuf::from(QBOOT)),
            };
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(spec.args())
                .stdin(Stdio::null())
                .stdout(qemu_log.try_clone().map_err(BackendError::io("qemu.log"))?)
                .stderr(qemu_log.try_clone().map_err(BackendError::io("qemu.log"))?)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            tracing::info!(args = ?spec.args(), "starting qemu");
            let mut keep = fds.all();
            keep.extend(nat_fd.as_ref().map(|fd| fd.as_raw_fd()));
            keep.extend(tap.map(|fd| fd.as_raw_fd()));
            jail::hide_host_files(&inst.dir)?.apply(&mut cmd);
            let qemu = Spawn::new("qemu", cmd)
                .keep(&keep)
                .creds(jail.creds.clone())
                .start()?;
            // QEMU holds its own copies: a QMP client must see the socket
            // refused once QEMU is gone, and the tap vanish with it.
            drop(nat_fd);
            drop(links);
            let mut vm = Vm {
                qemu,
                passt,
                egress: std::mem::take(&mut egress_procs),
                virtiofsd,
                relay: None,
                bridge: bridge_plan.clone(),
                port,
                qmp: qmp_path.clone(),
                socket: inst.socket.clone(),
                egress_control: None,
                torn_down: false,
            };
            // The forward must be bound by our own child, nobody else.
            let owner = vm.qemu.pid();
            let deadline = Instant::now() + Duration::from_secs(10);
            let verdict = loop {
                if let Some(inode) = ports::loopback_listener(port) {
                    if ports::holds_socket(owner, inode) {
                        break Ok(());
                    }
                    break Err(format!("port {port} was taken by another process"));
                }
                if vm.qemu.try_reap()
                    || vm.passt.as_mut().is_some_and(|p| p.try_reap())
                    || vm.virtiofsd.as_mut().is_some_and(|p| p.try_reap())
                {
                    break Err(format!(
                        "QEMU or one of its helpers exited at start: {}",
                        plumbing::tail(&qemu_log_path, 5)
                    ));
                }
                if Instant::now() > deadline {
                    break Err(format!("nothing listens on the forwarded port {port}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // QEMU has opened the tap by now: it listens only after
            // setting up every device.
            let verdict = verdict.and_then(|()| {
                bridge_plan
                    .as_ref()
                    .map_or(Ok(()), bridge::enslave)
                    .map_err(|e| e.to_string())
            });
            match verdict {
                Ok(()) => {
                    vm.egress_control = egress_control.take();
                    break vm;
                }
                Err(e) => {
                    egress_procs = std::mem::take(&mut vm.egress);
                    let e = vm.fail(&mut signals, BackendError::Failed(e));
                    if attempt >= 3 {
                        return Err(e);
                    }
                    tracing::warn!("{e}; retrying with another port");
                }
            }
        };

        // From here on every early return tears the VM down and verifies
        // it (`Vm::fail`); the VM's drop is the backstop.
        let served = serve(
            inst,
            &mut vm,
            &mut signals,
            on_ready,
            &Boot {
                qemu_log: &qemu_log_path,
                boot_log: &boot_log,
                run_dir: &run_dir,
                disk: &disk,
                notes,
                facts: Facts {
                    qemu_uid: jail.creds.as_ref().map(|c| c.uid),
                    accel: choice.accel.as_str(),
                    nested: nested_flag.is_some(),
                },
            },
        );
        served.map_err(|e| vm.fail(&mut signals, e))
    }

    fn reap(&self, inst: &Instance) {
        // PDEATHSIG has taken QEMU, passt and the relay down with the
        // supervisor; make sure through the recorded identities (PID and
        // start time, then a pidfd, so a reused PID is never signalled).
        if let Some(record) = fs::read_to_string(inst.dir.join("run/runtime.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<MicrovmRuntime>(&text).ok())
        {
            kill_recorded(&record);
        }
        let _ = fs::remove_file(&inst.socket);
        let _ = fs::remove_file(inst.dir.join("run/qmp.sock"));
        let _ = fs::remove_file(inst.dir.join("run/runtime.json"));
    }

    fn discard_disk(&self, inst: &Instance) -> Result<(), BackendError> {
        let disk = inst.dir.join("disk");
        if disk.exists() {
            fs::remove_dir_all(&disk).map_err(BackendError::io(disk.display().to_string()))?;
        }
        Ok(())
    }

    fn usage(&self, inst: &Instance, runtime: &BTreeMap<String, serde_json::Value>) -> Usage {
        use std::os::unix::fs::MetadataExt;
        // The guest's memory as the host sees it: QEMU's resident set.
        let memory_bytes = keystone_backend::record_from_map::<MicrovmRuntime>(runtime)
            .and_then(|r| r.qemu)
            .filter(|p| p.is_alive())
            .and_then(|p| {
                let status = fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
                let kb: u64 = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some(kb * 1024)
            });
        // What the sandbox's own disk really takes (the overlay's allocated
        // blocks; the shared base is the image's).
        let disk_bytes = fs::metadata(overlay(inst)).ok().map(|m| m.blocks() * 512);
        Usage {
            memory_bytes,
            disk_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::accel::Accel;
    use super::*;
    use keystone_registry::ProcessId;

    #[test]
    fn the_runtime_record_reads_back_from_the_registry_map() {
        let record = MicrovmRuntime {
            qemu: ProcessId::current(),
            ssh_port: 41000,
            accel: "tcg".into(),
            ..MicrovmRuntime::default()
        };
        let mut map = keystone_backend::record_to_map(&record).expect("map");
        assert!(
            !map.contains_key("passt"),
            "absent children are not written"
        );
        // The supervisor adds its notes beside the backend's keys.
        map.insert("notes".into(), serde_json::json!(["acceleration: tcg"]));
        let back: MicrovmRuntime = keystone_backend::record_from_map(&map).expect("record");
        assert_eq!(back.ssh_port, 41000);
        assert_eq!(back.processes().count(), 1);
        assert!(keystone_backend::record_from_map::<MicrovmRuntime>(&BTreeMap::new()).is_none());
    }

    #[test]
    fn accel_is_a_tcg_or_kvm_line() {
        let (c, _) = host_acceleration();
        assert!(c.reason.starts_with("acceleration: "));
        assert!(matches!(c.accel, Accel::Kvm | Accel::Tcg));
    }
}
