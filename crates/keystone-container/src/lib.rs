//! The container backend: a sandbox made of Linux namespaces (user, mount,
//! PID, UTS, IPC, network, cgroup), an overlay of the guest image as its
//! root, cgroup limits, and pasta for `--network nat`.
//!
//! Written directly on the kernel interfaces (nix) rather than driving
//! bubblewrap or runc: Debian 12's bubblewrap has no overlay support, and
//! we need the supervisor to own every process it creates (PDEATHSIG
//! chains, verified teardown) with no daemon in between.
//!
//! Disk layout, under the sandbox directory:
//! `disk/upper`, `disk/work` (the persistent upper layer; `--fresh` and
//! `destroy` remove them), `run/root` (mount point), `logs/container.log`.
//! The image's tarball is unpacked once per user, image and id map under
//! the backend cache (`<cache>/container/<image>`, or `<image>@<uid>` for
//! root's shifted map), inside a user namespace with the sandbox's id map,
//! so file owners line up. Root's sandboxes run on keystone's own host id
//! range, never on the host's ids (see `idmap`); an upper layer made
//! before that is moved onto the range once, at its next start
//! (`shift.rs`).
//!
//! The pieces: here the `Backend` (prepare: unpack the image; run: the
//! init's specification, then fork C), `init.rs` (C and G, between fork
//! and the guest's init), `handshake.rs` (the one channel between the
//! supervisor and C), `harden.rs` (masks, capabilities, seccomp),
//! `sandbox.rs` (everything after C exists, and the `Teardown` guard),
//! `network.rs` (pasta, the bridge), `cgroup.rs`, `layer.rs` (the bounded
//! disk), `shift.rs` (moving a layer onto the id range).

mod cgroup;
mod handshake;
mod harden;
mod layer;
mod network;
mod sandbox;
pub use keystone_backend::idmap;
mod init;
mod shift;

pub use cgroup::version as cgroup_version;

use cgroup::Cgroup;
use idmap::IdMap;
use keystone_backend::disk;
use keystone_backend::signals::{Signals, StopRequest, Wake};
use keystone_backend::{
    plumbing, require_tool, Backend, BackendError, Ended, Instance, Running, Usage,
};
use keystone_process::Supervised;
use keystone_registry::{NetworkMode, ProcessId};
use sandbox::{start, ContainerRuntime, Teardown};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a graceful stop may take before the sandbox is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the guest's sshd may take to answer after start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SSH_PORT: u16 = 22;

pub struct ContainerBackend;

impl ContainerBackend {
    fn rootfs(inst: &Instance, map: &IdMap) -> PathBuf {
        let name = match map.mapping {
            idmap::Mapping::Shifted { uid, .. } => format!("{}@{uid}", inst.image_id),
            _ => inst.image_id.clone(),
        };
        inst.cache_dir.join("container").join(name)
    }

    fn upper(inst: &Instance) -> (PathBuf, PathBuf) {
        (inst.dir.join("disk/upper"), inst.dir.join("disk/work"))
    }

    /// Remove the unpacked copies of an image (on `image rm`): the one of
    /// the current map, and any of an older one.
    pub fn forget_image(cache_dir: &Path, image_id: &str) -> Result<(), BackendError> {
        let map = IdMap::for_container()?;
        let dir = cache_dir.join("container");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == image_id || name.starts_with(&format!("{image_id}@")) {
                remove_tree(&map, &e.path())?;
            }
        }
        Ok(())
    }
}

/// Delete a tree that may hold files owned by subordinate ids (root
/// deletes anything directly).
fn remove_tree(map: &IdMap, path: &Path) -> Result<(), BackendError> {
    let p = path.display().to_string();
    let map = if map.is_root() {
        IdMap::identity_for_root()
    } else {
        map.clone()
    };
    let status = idmap::run_mapped(&map, &["rm", "-rf", "--one-file-system", &p])?;
    if !status.success() || path.exists() {
        return Err(BackendError::Failed(format!("could not remove {p}")));
    }
    Ok(())
}

/// Give `path` (a directory keystone just made) to the namespace's root.
fn chown_to_root_of(map: &IdMap, path: &Path) -> Result<(), BackendError> {
    if let idmap::Mapping::Shifted { .. } = map.mapping {
        let (uid, gid) = map.root_on_host();
        nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))
            .map_err(|e| BackendError::Failed(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The files of the guest's `/etc/keystone` (sshd's host key and the
/// authorized key), copied from the host's key directory into `dest`,
/// which is removed first without following anything in it, and made
/// anew, owned by the namespace's root (0755, as sshd wants it: the
/// agent reads its authorized key; the host key is root's alone).
fn copy_guest_keys(map: &IdMap, from: &Path, dest: &Path) -> Result<PathBuf, BackendError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let io = |p: &Path| BackendError::io(p.display().to_string());
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => remove_tree(map, dest)?,
        Ok(_) => fs::remove_file(dest).map_err(io(dest))?,
        Err(_) => {}
    }
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dest)
        .map_err(io(dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io(dest))?;
    let (uid, gid) = map.root_on_host();
    for (name, mode) in [
        (keystone_channel::keys::HOST_KEY, 0o600),
        ("authorized_keys", 0o644),
    ] {
        let src = from.join(name);
        let mut body = Vec::new();
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&src)
            .and_then(|mut f| f.read_to_end(&mut body))
            .map_err(io(&src))?;
        let to = dest.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&to)
            .map_err(io(&to))?;
        f.write_all(&body).map_err(io(&to))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&to))?;
        if map.is_root() {
            nix::unistd::fchown(f.as_raw_fd(), Some(uid.into()), Some(gid.into()))
                .map_err(|e| BackendError::Failed(format!("chown {}: {e}", to.display())))?;
        }
    }
    if map.is_root() {
        nix::unistd::chown(dest, Some(uid.into()), Some(gid.into()))
            .map_err(|e| BackendError::Failed(format!("chown {}: {e}", dest.display())))?;
    }
    Ok(dest.to_path_buf())
}

impl Backend for ContainerBackend {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn prepare(&self, inst: &Instance, progress: &mut dyn FnMut(&str)) -> Result<(), BackendError> {
        let map = IdMap::for_container()?;
        require_tool("tar", "tar", "it unpacks the image")?;
        if inst.settings.egress_allowlist() {
            require_tool("ip", "iproute2", "the egress allowlist needs it")?;
        } else if inst.settings.network == NetworkMode::Nat {
            require_tool(
                "pasta",
                "passt",
                "--network nat needs it; or use --network none",
            )?;
        }
        if inst.settings.network == NetworkMode::Nat
            && !inst.settings.egress_allowlist()
            && !map.is_root()
            && nix::unistd::access(
                "/dev/net/tun",
                nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
            )
            .is_err()
        {
            return Err(BackendError::Requirement(
                "--network nat for an unprivileged user needs /dev/net/tun to be usable by it \
                 (Debian's default mode is 0666: `chmod 0666 /dev/net/tun` as root), or use --network none"
                    .into(),
            ));
        }
        if inst.settings.network == NetworkMode::Bridge {
            keystone_backend::hostbridge::named_bridge(inst)?;
            if !map.is_root() {
                return Err(BackendError::Requirement(
                    "--network bridge with the container backend needs root: a veth on a host bridge needs CAP_NET_ADMIN on the host; run as root, or use the microvm backend (which can use QEMU's bridge helper)"
                        .into(),
                ));
            }
            require_tool("ip", "iproute2", "--network bridge needs it")?;
            require_tool("nsenter", "util-linux", "--network bridge needs it")?;
        }
        let rootfs = Self::rootfs(inst, &map);
        if rootfs.join(".keystone-complete").exists() {
            return Ok(());
        }
        progress(&format!(
            "unpacking image {} for the container backend",
            inst.image_id
        ));
        let parent = rootfs.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(BackendError::io(parent.display().to_string()))?;
        let tmp = parent.join(format!(".{}.tmp-{}", inst.image_id, std::process::id()));
        if tmp.exists() {
            remove_tree(&map, &tmp)?;
        }
        fs::create_dir_all(&tmp).map_err(BackendError::io(tmp.display().to_string()))?;
        // The tree's top belongs to the namespace's root, which unpacks.
        chown_to_root_of(&map, &tmp)?;
        let tar = inst.image_tar.display().to_string();
        let status = idmap::unpack_image(&map, &inst.image_tar, &tmp)?;
        let marker = tmp.join(".keystone-complete");
        if !status.success() {
            let _ = remove_tree(&map, &tmp);
            return Err(BackendError::Failed(format!(
                "unpacking {tar} failed ({status})"
            )));
        }
        // The marker is written by the host user: in the rootless case the
        // tree's root belongs to container root, which is that same user.
        fs::write(&marker, b"").map_err(BackendError::io(marker.display().to_string()))?;
        if rootfs.exists() {
            remove_tree(&map, &rootfs)?;
        }
        fs::rename(&tmp, &rootfs).map_err(BackendError::io(rootfs.display().to_string()))?;
        Ok(())
    }

    fn run(
        &self,
        inst: &Instance,
        on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
    ) -> Result<Ended, BackendError> {
        let mut signals = Signals::install()?;
        let map = IdMap::for_container()?;
        let lower = Self::rootfs(inst, &map);
        if !lower.join(".keystone-complete").exists() {
            return Err(BackendError::Failed(format!(
                "image {} is not unpacked at {}",
                inst.image_id,
                lower.display()
            )));
        }
        for p in [&lower, &inst.dir] {
            let s = p.display().to_string();
            if s.contains(',') || s.contains(':') {
                return Err(BackendError::Requirement(format!(
                    "path {s} contains ',' or ':', which overlayfs cannot take; set XDG_STATE_HOME/XDG_CACHE_HOME elsewhere"
                )));
            }
        }
        let scratch = inst.dir.join("run");
        for d in [
            scratch.join("root"),
            scratch.join("volatile"),
            inst.log_dir(),
        ] {
            fs::create_dir_all(&d).map_err(BackendError::io(d.display().to_string()))?;
        }
        // The guest's /etc/keystone: a copy made afresh for this start,
        // never the host's key directory (guest root could remount a bind
        // of it read-write and plant links the host then writes through).
        let keys = copy_guest_keys(&map, &inst.guest_dir, &scratch.join("keys"))?;
        let mut notes = Vec::new();
        let mut disk_image = None;
        let upper = if inst.settings.persist {
            let (u, w) = Self::upper(inst);
            // The upper layer belongs over the tree it was made on (see
            // `keystone_backend::disk`); a layer without a record predates it. File
            // level: the same recipe's tree is the same files by path,
            // whichever build it is, so the image id is the whole base.
            if disk::recorded_for(inst)?.is_none() {
                disk::record_for(inst, None)?;
            }
            match layer::prepare(inst, map.is_root(), map.root_on_host())? {
                layer::Layer::Bounded { image, gb } => {
                    // upper/ and work/ are made inside the image once it
                    // is mounted (init::stage).
                    notes.push(format!("disk: {gb} GB"));
                    disk_image = Some(image);
                }
                layer::Layer::Unbounded { reason } => {
                    notes.push(format!("disk: not bounded ({reason})"));
                    for d in [&u, &w] {
                        fs::create_dir_all(d).map_err(BackendError::io(d.display().to_string()))?;
                    }
                    // A layer made on other host ids (before root's
                    // sandboxes had a range of their own) is moved onto
                    // this map's, once.
                    shift::ensure_layer_on(&map, &inst.dir.join("disk"), &u, &w)?;
                }
            }
            Some((u, w))
        } else {
            notes.push(format!(
                "disk: {} GB in memory, not kept",
                inst.settings.disk_gb
            ));
            None
        };

        let kvm = inst.settings.nested_virt && kvm_usable();
        notes.push(if kvm {
            "nested virtualization: on (/dev/kvm passed through)".to_string()
        } else if inst.settings.nested_virt {
            "nested virtualization: off (/dev/kvm is not usable by this user)".to_string()
        } else {
            "nested virtualization: off (disabled)".to_string()
        });

        let cg = Cgroup::create(&inst.id, inst.settings.memory_mb, inst.settings.vcpus);
        if let Cgroup::None { reason } = &cg {
            notes.push(reason.clone());
        }

        let spec = init::InitSpec {
            hostname: inst.name.clone(),
            lower,
            upper,
            scratch: scratch.clone(),
            keys: keys.clone(),
            disk_image,
            disk_gb: inst.settings.disk_gb,
            stage: map.is_root().then(|| map.root_on_host()),
            kvm,
            seccomp: harden::seccomp_program().map_err(BackendError::Failed)?,
            hosts: format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                inst.name
            ),
            resolv: plumbing::resolv_conf(&inst.settings),
            supervisor: nix::unistd::getpid(),
            argv: cstrings(&[
                "/usr/bin/tini",
                "-s",
                "-g",
                "--",
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-o",
                "ListenAddress=127.0.0.1",
            ]),
            env: cstrings(&[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "container=keystone",
                "LANG=C.UTF-8",
            ]),
        };

        let log = plumbing::open_log(&inst.log_dir().join("container.log"))?;
        let (ours, theirs) = handshake::pair()?;

        // SAFETY: the supervisor is single-threaded here; the child only
        // uses data prepared above.
        let c = match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                plumbing::redirect_stdio(&log);
                init::child(&spec, theirs)
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(theirs);
        let mut guard = Teardown {
            c: Supervised::adopt("init", c)?,
            g: None,
            helpers: Vec::new(),
            cgroup: cg.clone(),
            socket: inst.socket.clone(),
            egress_control: None,
            chan: ours,
            done: false,
        };
        // From here on every early return tears the sandbox down and
        // verifies it (`Teardown::fail`); the guard's drop is the backstop.
        let started = start(inst, &map, &cg, &log, &mut guard, &mut signals);
        let g = match started {
            Ok(Some(g)) => g,
            Ok(None) => {
                guard.teardown(&mut signals, StopRequest::Force)?;
                return Ok(Ended::Stopped);
            }
            Err(e) => return Err(guard.fail(&mut signals, e)),
        };

        let record = ContainerRuntime {
            init: ProcessId::of(g.as_raw()),
            cgroup: cg.clone(),
            helpers: guard
                .helpers
                .iter()
                .filter_map(|p| ProcessId::of(p.pid().as_raw()))
                .collect(),
        };
        let running = match Running::new(&record, notes) {
            Ok(r) => r,
            Err(e) => return Err(guard.fail(&mut signals, e)),
        };
        if let Err(e) = on_ready(&running) {
            return Err(guard.fail(&mut signals, BackendError::Failed(e)));
        }

        // Run until asked to stop or the guest goes down by itself.
        loop {
            match signals.wait(Duration::from_secs(5)) {
                Wake::Stop(kind) => {
                    guard.teardown(&mut signals, kind)?;
                    return Ok(Ended::Stopped);
                }
                Wake::Child | Wake::Timeout => {
                    if guard.c.try_reap() {
                        guard.teardown(&mut signals, StopRequest::Force)?;
                        return Ok(Ended::Exited("the guest's init exited".into()));
                    }
                    // A helper (relay, pasta) that dies makes the sandbox
                    // unreachable or offline: stop rather than limp on.
                    if let Some(name) = guard
                        .helpers
                        .iter_mut()
                        .find_map(|h| h.try_reap().then(|| h.name()))
                    {
                        guard.teardown(&mut signals, StopRequest::Force)?;
                        return Ok(Ended::Exited(format!("helper process {name} exited")));
                    }
                }
            }
        }
    }

    fn reap(&self, inst: &Instance) {
        // The PDEATHSIG chain has taken the processes down; leftovers are
        // the cgroup directories and the relay socket.
        let id = &inst.id;
        for cg in [
            Cgroup::V1 {
                dirs: ["memory", "cpu", "pids"]
                    .iter()
                    .map(|c| {
                        Path::new("/sys/fs/cgroup")
                            .join(c)
                            .join("keystone")
                            .join(id)
                    })
                    .collect(),
            },
            Cgroup::V2 {
                path: Path::new("/sys/fs/cgroup/keystone").join(format!("keystone-{id}")),
            },
        ] {
            if cg.exists() {
                let _ = cg.destroy();
            }
        }
        let _ = fs::remove_file(&inst.socket);
    }

    fn discard_disk(&self, inst: &Instance) -> Result<(), BackendError> {
        let disk = inst.dir.join("disk");
        if disk.exists() {
            remove_tree(&IdMap::for_container()?, &disk)?;
        }
        Ok(())
    }

    fn usage(&self, inst: &Instance, runtime: &BTreeMap<String, serde_json::Value>) -> Usage {
        let memory_bytes = keystone_backend::record_from_map::<ContainerRuntime>(runtime)
            .and_then(|r| r.cgroup.memory_bytes());
        Usage {
            memory_bytes,
            disk_bytes: layer::used_bytes(inst),
        }
    }
}

fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn cstrings(args: &[&str]) -> Vec<CString> {
    args.iter().filter_map(|a| CString::new(*a).ok()).collect()
}
