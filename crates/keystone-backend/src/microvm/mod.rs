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
//! - QEMU, passt and the relay are direct children of the supervisor, each
//!   in its own process group with PDEATHSIG, addressed through pidfds;
//!   teardown checks the process groups are empty and the port is free.
//! - Graceful stop is ctrl-alt-del over QMP (the guest's init syncs and
//!   powers off), then a bounded wait, then QMP `quit`, then SIGKILL.
//! - `--network bridge` makes eth1 a tap on a host bridge (`bridge.rs`),
//!   and the guest takes an address there by DHCP.
//! - The opt-in live share (`--share`) is virtiofs, served by virtiofsd as
//!   one more child (`share.rs`); the cloud kernel has no 9p.
//! - qboot instead of SeaBIOS when QEMU ships it: a second less under TCG.

pub mod accel;
mod bridge;
mod jail;
mod ports;
pub mod qemu;
mod qmp;
mod share;
mod view;

use crate::disk::{self, FileIdentity};
use crate::idmap::{self, IdMap};
use crate::signals::{Signals, StopRequest, Wake};
use crate::{
    fault, plumbing, require_tool, Backend, BackendError, Ended, Instance, Running, Usage,
};
use accel::{KvmFacts, NestedHost};
use keystone_process::{Spawn, Supervised};
use keystone_registry::{NetworkMode, ProcessId};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qemu::VmSpec;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the guest may take to power off after ctrl-alt-del.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long the guest's sshd may take to answer after QEMU starts.
const READY_TIMEOUT: Duration = Duration::from_secs(110);
/// The size of the guest's root file system (sparse: only what is written
/// takes space, in the shared base or the sandbox's overlay).
const ROOT_SIZE: u64 = 16 << 30;
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

pub struct MicrovmBackend;

/// What `prepare` derives from an image, shared by its sandboxes.
struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    fn of(inst: &Instance) -> Artifacts {
        Artifacts {
            dir: inst.cache_dir.join("microvm").join(&inst.image_id),
        }
    }
    fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    fn complete(&self) -> bool {
        self.dir.join(".keystone-complete").exists()
    }
}

fn overlay(inst: &Instance) -> PathBuf {
    if inst.settings.persist {
        inst.dir.join("disk/root.qcow2")
    } else {
        inst.dir.join("run/root.qcow2")
    }
}

/// The virtiofsd the live share would use, if any.
pub fn virtiofsd() -> Option<PathBuf> {
    share::find_daemon()
}

/// The accelerator and nested-virtualization lines for this host.
pub fn host_acceleration() -> (accel::AccelChoice, NestedHost) {
    (KvmFacts::probe().choose(), NestedHost::probe())
}

impl MicrovmBackend {
    /// Remove an image's derived disk and kernel (on `image rm`).
    pub fn forget_image(cache_dir: &Path, image_id: &str) -> Result<(), BackendError> {
        let dir = cache_dir.join("microvm").join(image_id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(BackendError::io(dir.display().to_string()))?;
        }
        Ok(())
    }

    fn build_artifacts(
        inst: &Instance,
        art: &Artifacts,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        let parent = art.dir.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(BackendError::io(parent.display().to_string()))?;
        let lock_path = parent.join(format!("{}.lock", inst.image_id));
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(BackendError::io(lock_path.display().to_string()))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| BackendError::Failed(format!("lock {}: {e}", lock_path.display())))?;
        if art.complete() {
            return Ok(());
        }
        progress(&format!(
            "making the microVM disk of image {}",
            inst.image_id
        ));
        let map = IdMap::for_current_user()?;
        let tmp = parent.join(format!(".{}.tmp-{}", inst.image_id, std::process::id()));
        let root = tmp.join("root");
        if tmp.exists() {
            let _ = idmap::run_mapped(
                &map,
                &["rm", "-rf", "--one-file-system", &tmp.display().to_string()],
            );
        }
        fs::create_dir_all(&root).map_err(BackendError::io(root.display().to_string()))?;
        let cleanup = |map: &IdMap| {
            let _ = idmap::run_mapped(
                map,
                &["rm", "-rf", "--one-file-system", &tmp.display().to_string()],
            );
        };
        let tar = inst.image_tar.display().to_string();
        // Unpacked (and the ext4 made) in a user namespace with the
        // sandbox id map, so owners are the image's; the guest's init
        // mounts a devtmpfs.
        let status = idmap::unpack_image(&map, &inst.image_tar, &root)?;
        let root_s = root.display().to_string();
        if !status.success() {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "unpacking {tar} failed ({status})"
            )));
        }
        let kernel = fs::read_dir(root.join("boot")).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
                .max()
        });
        let Some(kernel) = kernel else {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "image {} has no kernel in /boot (it predates the microvm backend); rebuild it with `keystone agent image build`",
                inst.image_id
            )));
        };
        let has_init = root.join("usr/local/sbin/keystone-init").exists();
        if !has_init {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "image {} has no /usr/local/sbin/keystone-init; rebuild it with `keystone agent image build`",
                inst.image_id
            )));
        }
        fs::copy(&kernel, tmp.join("vmlinuz"))
            .map_err(BackendError::io(kernel.display().to_string()))?;
        let ext4 = tmp.join("rootfs.ext4");
        let f = fs::File::create(&ext4).map_err(BackendError::io(ext4.display().to_string()))?;
        f.set_len(ROOT_SIZE)
            .map_err(BackendError::io(ext4.display().to_string()))?;
        drop(f);
        let ext4_s = ext4.display().to_string();
        let status = idmap::run_mapped(
            &map,
            &[
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "keystone",
                "-m",
                "1",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                "-d",
                &root_s,
                &ext4_s,
            ],
        )?;
        let _ = idmap::run_mapped(&map, &["rm", "-rf", "--one-file-system", &root_s]);
        if !status.success() {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "mkfs.ext4 -d failed ({status})"
            )));
        }
        // Shared by every sandbox of the image: never written again.
        let _ = fs::set_permissions(&ext4, fs::Permissions::from_mode(0o444));
        fs::write(tmp.join(".keystone-complete"), b"")
            .map_err(BackendError::io(tmp.display().to_string()))?;
        if art.dir.exists() {
            let _ = fs::remove_dir_all(&art.dir);
        }
        fs::rename(&tmp, &art.dir).map_err(BackendError::io(art.dir.display().to_string()))?;
        Ok(())
    }
}

/// The descriptors of one QEMU start that are made again on a retry:
/// the QMP listener, the boot log, the virtiofs connection, the tap.
struct Links {
    qmp: std::os::unix::net::UnixListener,
    console: fs::File,
    share: Option<std::os::unix::net::UnixStream>,
    tap: Option<std::os::fd::OwnedFd>,
}

impl Links {
    fn open(
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

fn make_overlay(base: &Path, path: &Path) -> Result<(), BackendError> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).map_err(BackendError::io(p.display().to_string()))?;
    }
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b"],
        &[base, path],
    )?;
    Ok(())
}

/// A qcow2 overlay is only good over the very file it was made on: refuse
/// to boot it over anything else (see `crate::disk`).
fn check_disk_base(inst: &Instance, base: &Path, disk_path: &Path) -> Result<(), BackendError> {
    let Some(record) = disk::recorded_for(inst)? else {
        // A disk from before the record existed: its qcow2 header names
        // the base file; the same path is taken as the same base.
        let backing = backing_file(disk_path)?;
        if backing.as_deref() != Some(base) {
            return Err(BackendError::Failed(format!(
                "the disk of sandbox {} is built on {}, not on image {}'s {}; {}",
                inst.name,
                backing.map_or("nothing".into(), |b| b.display().to_string()),
                inst.image_id,
                base.display(),
                disk::fresh_hint(inst)
            )));
        }
        return disk::record_for(inst, Some(base));
    };
    let now = FileIdentity::of(base).map_err(BackendError::io(base.display().to_string()))?;
    if record.file != Some(now) {
        return Err(BackendError::Failed(format!(
            "the disk of sandbox {} was made over another build of image {} (it was removed and \
             built again since), and booting it over this one would corrupt it; {}",
            inst.name,
            inst.image_id,
            disk::fresh_hint(inst)
        )));
    }
    Ok(())
}

/// Run `qemu-img ARGS FILES…`; its output when it succeeded. An error
/// names the last file, the disk being made or read.
fn qemu_img(args: &[&str], files: &[&Path]) -> Result<std::process::Output, BackendError> {
    let out = Command::new("qemu-img")
        .args(args)
        .args(files)
        .output()
        .map_err(BackendError::io("qemu-img"))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "qemu-img {} {} failed: {}",
            args[0],
            files
                .last()
                .map_or(String::new(), |f| f.display().to_string()),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// The backing file a qcow2 overlay names in its header.
fn backing_file(disk: &Path) -> Result<Option<PathBuf>, BackendError> {
    let out = qemu_img(&["info", "--output=json", "-U"], &[disk])?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| BackendError::Failed(format!("qemu-img info {}: {e}", disk.display())))?;
    Ok(info["backing-filename"].as_str().map(PathBuf::from))
}

/// The per-boot configuration archive the guest's init unpacks into
/// `/etc/keystone`.
fn write_config(inst: &Instance, run: &Path) -> Result<PathBuf, BackendError> {
    let stage = run.join("config");
    if stage.exists() {
        let _ = fs::remove_dir_all(&stage);
    }
    fs::create_dir_all(&stage).map_err(BackendError::io(stage.display().to_string()))?;
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o700))
        .map_err(BackendError::io(stage.display().to_string()))?;
    let copy = |name: &str, mode: u32| -> Result<(), BackendError> {
        let from = inst.guest_dir.join(name);
        let to = stage.join(name);
        fs::copy(&from, &to).map_err(BackendError::io(from.display().to_string()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode))
            .map_err(BackendError::io(to.display().to_string()))
    };
    copy("ssh_host_ed25519_key", 0o600)?;
    copy("authorized_keys", 0o644)?;
    let write = |name: &str, body: String| -> Result<(), BackendError> {
        let to = stage.join(name);
        fs::write(&to, body).map_err(BackendError::io(to.display().to_string()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))
            .map_err(BackendError::io(to.display().to_string()))
    };
    write("hostname", format!("{}\n", inst.name))?;
    let mut network = format!("ADDRESS={}\n", qemu::GUEST_ADDRESS);
    if inst.settings.network == NetworkMode::Nat {
        network.push_str(&format!(
            "NAT_ADDRESS={}\nNAT_GATEWAY={}\n",
            qemu::NAT_ADDRESS,
            qemu::NAT_GATEWAY
        ));
    }
    if inst.settings.network == NetworkMode::Bridge {
        // The address comes from the bridge's network, by DHCP.
        network.push_str("BRIDGE=1\n");
    }
    write("network", network)?;
    write(
        "workspace",
        if inst.settings.is_share() {
            format!("SHARE_TAG={}\n", share::TAG)
        } else {
            String::new()
        },
    )?;
    write(
        "resolv.conf",
        plumbing::resolv_conf(inst.settings.network == NetworkMode::Nat),
    )?;
    let tar = run.join("config.tar");
    // Files only: a "./" entry would give the guest's /etc/keystone the
    // staging directory's 0700, and sshd reads authorized_keys as the user.
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&stage)
        .args(CONFIG_FILES)
        .output()
        .map_err(BackendError::io("tar"))?;
    let _ = fs::remove_dir_all(&stage);
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "cannot write {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(tar)
}

const CONFIG_FILES: [&str; 6] = [
    "ssh_host_ed25519_key",
    "authorized_keys",
    "hostname",
    "network",
    "resolv.conf",
    "workspace",
];

/// What the registry (and `run/runtime.json`, for `reap` after a
/// supervisor that died) keeps about a running microVM.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct MicrovmRuntime {
    qemu: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passt: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    virtiofsd: Option<ProcessId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay: Option<ProcessId>,
    /// The user-mode forward of the guest's sshd on 127.0.0.1.
    ssh_port: u16,
    /// QEMU's own uid (`jail`), when run by root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qemu_uid: Option<u32>,
    /// "kvm" or "tcg".
    accel: String,
    nested: bool,
    boot_seconds: f64,
}

impl MicrovmRuntime {
    fn processes(&self) -> impl Iterator<Item = &ProcessId> {
        [&self.qemu, &self.passt, &self.virtiofsd, &self.relay]
            .into_iter()
            .flatten()
    }
}

/// Everything the supervisor runs for one VM, torn down together.
struct Vm {
    qemu: Supervised,
    passt: Option<Supervised>,
    virtiofsd: Option<Supervised>,
    relay: Option<Supervised>,
    /// The bridge attachment, whose tap must be gone after teardown.
    bridge: Option<bridge::Attach>,
    port: u16,
    qmp: PathBuf,
    socket: PathBuf,
    /// Set once `teardown` has run (whatever its verdict).
    torn_down: bool,
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
    fn teardown(&mut self, signals: &mut Signals, kind: StopRequest) -> Result<(), BackendError> {
        self.torn_down = true;
        self.stop(signals, kind);
        self.verify()
    }

    /// After `error`: tear down (unless done), keeping what the teardown
    /// left beside the error that caused it.
    fn fail(&mut self, signals: &mut Signals, error: BackendError) -> BackendError {
        if self.torn_down {
            return error;
        }
        match self.teardown(signals, StopRequest::Force) {
            Ok(()) => error,
            Err(cleanup) => error.with_cleanup(cleanup),
        }
    }

    fn children(&mut self) -> impl Iterator<Item = &mut Supervised> {
        std::iter::once(&mut self.qemu)
            .chain(self.passt.as_mut())
            .chain(self.virtiofsd.as_mut())
            .chain(self.relay.as_mut())
    }

    fn stop(&mut self, signals: &mut Signals, kind: StopRequest) {
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
    fn verify(&mut self) -> Result<(), BackendError> {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.qmp);
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

        // A port that is free now; whoever binds it is checked below, and
        // a lost race is retried with another.
        let mut attempt = 0;
        let mut vm = loop {
            attempt += 1;
            let port = ports::free_port()?;
            let (nat_fd, passt) = if inst.settings.network == NetworkMode::Nat {
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
            let uplink = match (&nat_fd, &links.tap) {
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
            keep.extend(links.tap.as_ref().map(|fd| fd.as_raw_fd()));
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
                virtiofsd,
                relay: None,
                bridge: bridge_plan.clone(),
                port,
                qmp: qmp_path.clone(),
                socket: inst.socket.clone(),
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
                Ok(()) => break vm,
                Err(e) => {
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
        let memory_bytes = crate::record_from_map::<MicrovmRuntime>(runtime)
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

/// The kernel QEMU boots (the image's, or `backend.microvm.kernel`) and
/// the optional `backend.microvm.initrd`, opened for QEMU. A user's file
/// is copied into the run directory first, world-readable: QEMU reopens
/// its descriptor through /proc/self/fd, which checks the file's own
/// mode against QEMU's id (its own, see `jail`), and the copy also
/// freezes what this boot uses.
fn boot_files(
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
struct Boot<'a> {
    qemu_log: &'a Path,
    boot_log: &'a Path,
    run_dir: &'a Path,
    disk: &'a Path,
    notes: Vec<String>,
    facts: Facts,
}

/// Facts of the VM recorded in the runtime.
struct Facts {
    qemu_uid: Option<u32>,
    accel: &'static str,
    nested: bool,
}

/// The VM from its relay to its end: wait for the guest's sshd, report
/// ready, then run until asked to stop or the VM goes down. An error
/// return leaves the teardown to the caller (`Vm::fail`).
fn serve(
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
        if plumbing::sshd_answers(&inst.socket) {
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
fn kill_recorded(record: &MicrovmRuntime) {
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

#[cfg(test)]
mod tests {
    use super::accel::Accel;
    use super::*;

    #[test]
    fn the_runtime_record_reads_back_from_the_registry_map() {
        let record = MicrovmRuntime {
            qemu: ProcessId::current(),
            ssh_port: 41000,
            accel: "tcg".into(),
            ..MicrovmRuntime::default()
        };
        let mut map = crate::record_to_map(&record).expect("map");
        assert!(
            !map.contains_key("passt"),
            "absent children are not written"
        );
        // The supervisor adds its notes beside the backend's keys.
        map.insert("notes".into(), serde_json::json!(["acceleration: tcg"]));
        let back: MicrovmRuntime = crate::record_from_map(&map).expect("record");
        assert_eq!(back.ssh_port, 41000);
        assert_eq!(back.processes().count(), 1);
        assert!(crate::record_from_map::<MicrovmRuntime>(&BTreeMap::new()).is_none());
    }

    #[test]
    fn accel_is_a_tcg_or_kvm_line() {
        let (c, _) = host_acceleration();
        assert!(c.reason.starts_with("acceleration: "));
        assert!(matches!(c.accel, Accel::Kvm | Accel::Tcg));
    }
}
