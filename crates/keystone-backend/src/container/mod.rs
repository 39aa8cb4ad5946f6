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
//! The image's tarball is unpacked once per user and image under the
//! backend cache (`<cache>/container/<image>`), inside a user namespace
//! with the sandbox's id map when rootless, so file owners line up.

mod cgroup;
pub use crate::idmap;
mod init;

pub use cgroup::version as cgroup_version;

use crate::disk;
use crate::signals::{Signals, StopRequest, Wake};
use crate::{require_tool, Backend, BackendError, Ended, Instance, Running, Usage};
use cgroup::Cgroup;
use idmap::IdMap;
use keystone_registry::ProcessId;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a graceful stop may take before the sandbox is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the guest's sshd may take to answer after start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SSH_PORT: u16 = 22;

pub struct ContainerBackend;

impl ContainerBackend {
    fn rootfs(inst: &Instance) -> PathBuf {
        inst.cache_dir.join("container").join(&inst.image_id)
    }

    fn upper(inst: &Instance) -> (PathBuf, PathBuf) {
        (inst.dir.join("disk/upper"), inst.dir.join("disk/work"))
    }

    /// Remove the unpacked copy of an image (on `image rm`).
    pub fn forget_image(cache_dir: &Path, image_id: &str) -> Result<(), BackendError> {
        let dir = cache_dir.join("container").join(image_id);
        if dir.exists() {
            remove_tree(&IdMap::for_current_user()?, &dir)?;
        }
        Ok(())
    }
}

/// Delete a tree that may hold files owned by subordinate ids.
fn remove_tree(map: &IdMap, path: &Path) -> Result<(), BackendError> {
    let p = path.display().to_string();
    let status = idmap::run_mapped(map, &["rm", "-rf", "--one-file-system", &p])?;
    if !status.success() || path.exists() {
        return Err(BackendError::Failed(format!("could not remove {p}")));
    }
    Ok(())
}

fn runtime_pid(runtime: &BTreeMap<String, serde_json::Value>, key: &str) -> Option<ProcessId> {
    runtime
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

impl Backend for ContainerBackend {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn prepare(&self, inst: &Instance, progress: &mut dyn FnMut(&str)) -> Result<(), BackendError> {
        let map = IdMap::for_current_user()?;
        require_tool("tar", "tar", "it unpacks the image")?;
        if inst.settings.network == "nat" {
            require_tool(
                "pasta",
                "passt",
                "--network nat needs it; or use --network none",
            )?;
        }
        if inst.settings.network == "nat"
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
        if inst.settings.network == "bridge" {
            crate::hostbridge::named_bridge(inst)?;
            if !map.is_root() {
                return Err(BackendError::Requirement(
                    "--network bridge with the container backend needs root: a veth on a host bridge needs CAP_NET_ADMIN on the host; run as root, or use the microvm backend (which can use QEMU's bridge helper)"
                        .into(),
                ));
            }
            require_tool("ip", "iproute2", "--network bridge needs it")?;
            require_tool("nsenter", "util-linux", "--network bridge needs it")?;
        }
        let rootfs = Self::rootfs(inst);
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
        let map = IdMap::for_current_user()?;
        let lower = Self::rootfs(inst);
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
        let upper = if inst.settings.persist {
            let (u, w) = Self::upper(inst);
            // The upper layer belongs over the tree it was made on (see
            // `crate::disk`); a layer without a record predates it. File
            // level: the same recipe's tree is the same files by path,
            // whichever build it is, so the image id is the whole base.
            if disk::recorded_for(inst)?.is_none() {
                disk::record_for(inst, None)?;
            }
            for d in [&u, &w] {
                fs::create_dir_all(d).map_err(BackendError::io(d.display().to_string()))?;
            }
            Some((u, w))
        } else {
            None
        };

        let mut notes = Vec::new();
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
            guest_dir: inst.guest_dir.clone(),
            rootless: !map.is_root(),
            kvm,
            hosts: format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                inst.name
            ),
            resolv: resolv_conf(&inst.settings.network),
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

        let log = open_log(&inst.log_dir().join("container.log"))?;
        let (up_r, up_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (down_r, down_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (pid_r, pid_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

        // SAFETY: the supervisor is single-threaded here; the child only
        // uses data prepared above.
        let c = match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                drop((up_r, down_w, pid_r, err_r));
                redirect_stdio(&log);
                init::child(&spec, up_w, down_r, pid_w, err_w)
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop((up_w, down_r, pid_w, err_w));
        let mut guard = Teardown {
            c,
            g: None,
            helpers: Vec::new(),
            cgroup: cg.clone(),
            socket: inst.socket.clone(),
        };

        // Limits apply from the very first instruction of the sandbox.
        if let Err(e) = cg.add(c.as_raw()) {
            return Err(guard.fail(format!("cannot join cgroup: {e}"), &err_r));
        }
        let mut b = [0u8; 1];
        if nix::unistd::read(up_r.as_raw_fd(), &mut b) != Ok(1) {
            return Err(guard.fail(
                "sandbox process exited before creating its user namespace".into(),
                &err_r,
            ));
        }
        if let Err(e) = map.apply(c.as_raw()) {
            return Err(guard.fail(format!("cannot map ids: {e}"), &err_r));
        }
        let _ = nix::unistd::write(&down_w, b"g");
        drop(down_w);
        let mut pidbuf = [0u8; 4];
        if read_exact_fd(&pid_r, &mut pidbuf).is_err() {
            return Err(guard.fail("sandbox failed to start".into(), &err_r));
        }
        let g = Pid::from_raw(i32::from_ne_bytes(pidbuf));
        guard.g = Some(g);
        let g_id = ProcessId::of(g.as_raw());

        // The relay: bound on the host, then moved into the sandbox's
        // namespaces, so the host needs no port at all.
        let _ = fs::remove_file(&inst.socket);
        let listener = std::os::unix::net::UnixListener::bind(&inst.socket)
            .map_err(BackendError::io(format!("bind {}", inst.socket.display())))?;
        // SAFETY: single-threaded; the child only setns()es and serves.
        let relay = match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                redirect_stdio(&log);
                relay_child(g, listener)
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(listener);
        guard.helpers.push(relay);

        if inst.settings.network == "nat" {
            match spawn_pasta(g, &log) {
                Ok(p) => guard.helpers.push(p),
                Err(e) => return Err(guard.fail(e, &err_r)),
            }
        }
        if inst.settings.network == "bridge" {
            match attach_bridge(inst, g, &log) {
                Ok(p) => guard.helpers.push(p),
                Err(e) => return Err(guard.fail(e, &err_r)),
            }
        }

        // Ready when the guest's sshd answers through the relay.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                waitpid(c, Some(WaitPidFlag::WNOHANG))
            {
                guard.c_reaped();
                return Err(guard.fail("the sandbox's init exited during start".into(), &err_r));
            }
            if probe(&inst.socket) {
                break;
            }
            if Instant::now() > deadline {
                return Err(guard.fail(
                    format!(
                        "the guest's sshd did not answer within {}s",
                        READY_TIMEOUT.as_secs()
                    ),
                    &err_r,
                ));
            }
            if let Wake::Stop(_) = signals.wait(Duration::from_millis(50)) {
                guard.stop(&mut signals, StopRequest::Force);
                return Ok(Ended::Stopped);
            }
        }

        let mut runtime = BTreeMap::new();
        if let Some(id) = g_id {
            runtime.insert("init".into(), serde_json::json!(id));
        }
        runtime.insert("cgroup".into(), serde_json::json!(cg));
        let helpers: Vec<_> = guard
            .helpers
            .iter()
            .filter_map(|p| ProcessId::of(p.as_raw()))
            .collect();
        runtime.insert("helpers".into(), serde_json::json!(helpers));
        if let Err(e) = on_ready(&Running { runtime, notes }) {
            guard.stop(&mut signals, StopRequest::Force);
            return Err(BackendError::Failed(e));
        }

        // Run until asked to stop or the guest goes down by itself.
        loop {
            match signals.wait(Duration::from_secs(5)) {
                Wake::Stop(kind) => {
                    guard.stop(&mut signals, kind);
                    return guard.verify().map(|_| Ended::Stopped);
                }
                Wake::Child | Wake::Timeout => {
                    if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                        waitpid(c, Some(WaitPidFlag::WNOHANG))
                    {
                        guard.c_reaped();
                        guard.stop(&mut signals, StopRequest::Force);
                        guard.verify()?;
                        return Ok(Ended::Exited("the guest's init exited".into()));
                    }
                    // A helper (relay, pasta) that dies makes the sandbox
                    // unreachable or offline: stop rather than limp on.
                    for h in guard.helpers.clone() {
                        if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                            waitpid(h, Some(WaitPidFlag::WNOHANG))
                        {
                            guard.helpers.retain(|p| *p != h);
                            guard.stop(&mut signals, StopRequest::Force);
                            guard.verify()?;
                            return Ok(Ended::Exited(format!("helper process {h} exited")));
                        }
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
            remove_tree(&IdMap::for_current_user()?, &disk)?;
        }
        Ok(())
    }

    fn usage(&self, inst: &Instance, runtime: &BTreeMap<String, serde_json::Value>) -> Usage {
        let memory_bytes = runtime
            .get("cgroup")
            .and_then(|v| serde_json::from_value::<Cgroup>(v.clone()).ok())
            .and_then(|cg| cg.memory_bytes());
        let disk = inst.dir.join("disk/upper");
        Usage {
            memory_bytes,
            disk_bytes: disk.exists().then(|| crate::dir_size(&disk)),
        }
    }
}

/// Whether a process's init is still alive, from the recorded runtime.
pub fn init_alive(runtime: &BTreeMap<String, serde_json::Value>) -> bool {
    runtime_pid(runtime, "init").is_some_and(|p| p.is_alive())
}

/// What the supervisor owns, torn down in order and verified.
struct Teardown {
    c: Pid,
    g: Option<Pid>,
    helpers: Vec<Pid>,
    cgroup: Cgroup,
    socket: PathBuf,
}

impl Teardown {
    fn c_reaped(&mut self) {
        self.c = Pid::from_raw(0);
    }

    fn c_alive(&self) -> bool {
        self.c.as_raw() != 0
    }

    /// Stop everything after a failed start; the error carries what the
    /// sandbox's init reported.
    fn fail(&mut self, msg: String, err_r: &OwnedFd) -> BackendError {
        let mut detail = String::new();
        let mut f = fs::File::from(err_r.try_clone().unwrap_or_else(|_| unreachable_fd()));
        let _ = nix::fcntl::fcntl(
            f.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let _ = f.read_to_string(&mut detail);
        self.kill_all();
        let _ = self.verify();
        if detail.trim().is_empty() {
            BackendError::Failed(msg)
        } else {
            BackendError::Failed(format!("{msg}: {}", detail.trim()))
        }
    }

    fn kill_all(&mut self) {
        if let Some(g) = self.g {
            let _ = kill(g, Signal::SIGKILL);
        }
        if self.c_alive() {
            let _ = kill(self.c, Signal::SIGKILL);
            let _ = waitpid(self.c, None);
            self.c_reaped();
        }
        for h in self.helpers.drain(..) {
            let _ = kill(h, Signal::SIGKILL);
            let _ = waitpid(h, None);
        }
    }

    fn stop(&mut self, signals: &mut Signals, kind: StopRequest) {
        if kind == StopRequest::Graceful && self.c_alive() {
            if let Some(g) = self.g {
                // tini forwards this to sshd; when PID 1 exits the kernel
                // kills the rest of the PID namespace.
                let _ = kill(g, Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
                    waitpid(self.c, Some(WaitPidFlag::WNOHANG))
                {
                    self.c_reaped();
                    break;
                }
                if let Wake::Stop(StopRequest::Force) = signals.wait(Duration::from_millis(100)) {
                    break;
                }
            }
        }
        self.kill_all();
    }

    /// Check that nothing of the sandbox remains; remove the cgroup.
    fn verify(&mut self) -> Result<(), BackendError> {
        let _ = fs::remove_file(&self.socket);
        if let Some(g) = self.g {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{g}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.cgroup.destroy().map_err(BackendError::Failed)
    }
}

fn unreachable_fd() -> OwnedFd {
    // Only used if dup() of a pipe fails, which it does not in practice.
    fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .unwrap_or_else(|_| std::process::abort())
}

fn read_exact_fd(fd: &OwnedFd, buf: &mut [u8]) -> Result<(), ()> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Err(()),
        }
    }
    Ok(())
}

fn probe(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

fn relay_child(g: Pid, listener: std::os::unix::net::UnixListener) -> ! {
    // SAFETY: prctl only sets a flag on this task.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    crate::signals::unblock_all();
    let code = (|| -> Result<(), String> {
        for ns in ["user", "net"] {
            let path = format!("/proc/{g}/ns/{ns}");
            let f = fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            let kind = if ns == "user" {
                nix::sched::CloneFlags::CLONE_NEWUSER
            } else {
                nix::sched::CloneFlags::CLONE_NEWNET
            };
            nix::sched::setns(f, kind).map_err(|e| format!("setns {ns}: {e}"))?;
        }
        keystone_channel::bridge::serve_relay(listener, ([127, 0, 0, 1], SSH_PORT).into())
            .map_err(|e| e.to_string())
    })();
    if let Err(e) = code {
        eprintln!("keystone relay: {e}");
    }
    // SAFETY: _exit in a forked child.
    unsafe { libc::_exit(1) }
}

fn spawn_pasta(g: Pid, log: &fs::File) -> Result<Pid, String> {
    let out = log.try_clone().map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new("pasta");
    if nix::unistd::geteuid().is_root() {
        // pasta drops to `nobody` when started as root, and nobody may not
        // join a user namespace owned by root. pasta still confines itself
        // (its own namespaces and seccomp filter).
        cmd.args(["--runas", "0"]);
    }
    // No inbound port forwarding (-t/-u none), no namespace-to-host
    // forwarding (-T/-U none), and no mapping of the gateway address to
    // the host's loopback (--no-map-gw): the host's 127.0.0.1 services
    // stay unreachable from inside.
    cmd.args([
        "--config-net",
        "-f",
        "-q",
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
    ])
    .arg(g.to_string())
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let pid = spawn_helper(cmd, "pasta")?;
    // pasta configures the namespace before it settles; wait for the
    // interface so the guest has a network when start returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(WaitStatus::Exited(_, code)) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            return Err(format!(
                "pasta exited with status {code}; see the sandbox's logs/container.log"
            ));
        }
        let routes = fs::read_to_string(format!("/proc/{g}/net/route")).unwrap_or_default();
        if routes
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pid)
}

/// `--network bridge`: a veth pair, the host end on the bridge and the
/// other as the sandbox's eth0, then the guest's DHCP client (busybox
/// `udhcpc` from the image) inside the sandbox's namespaces, as a helper
/// that dies with the supervisor. The pair goes away with the sandbox's
/// network namespace: nothing can leak.
fn attach_bridge(inst: &Instance, g: Pid, log: &fs::File) -> Result<Pid, String> {
    let bridge = crate::hostbridge::named_bridge(inst).map_err(|e| e.to_string())?;
    let host_end = crate::hostbridge::link_name(&inst.id);
    let g_s = g.to_string();
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &g_s,
    ])?;
    ip(&["link", "set", "dev", &host_end, "master", &bridge, "up"])?;
    let mut cmd = Command::new("nsenter");
    // Every namespace of the sandbox (its root too): the client and the
    // script it runs, which writes the guest's /etc/resolv.conf, are the
    // image's.
    cmd.args(["--target", &g_s, "--all", "--"])
        .args([
            "udhcpc",
            "-f",
            "-i",
            "eth0",
            "-s",
            "/etc/udhcpc/default.script",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log.try_clone().map_err(|e| e.to_string())?)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    spawn_helper(cmd, "the DHCP client")
}

/// Start a helper of the sandbox (pasta, the DHCP client) that dies with
/// the supervisor; the supervisor reaps it by PID like its other helpers.
fn spawn_helper(mut cmd: Command, what: &str) -> Result<Pid, String> {
    // SAFETY: pre_exec runs in the forked child before exec; prctl and
    // sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            crate::signals::unblock_all();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    // The PID is what the supervisor tracks; dropping a Child never kills.
    std::mem::forget(child);
    Ok(pid)
}

fn resolv_conf(network: &str) -> String {
    if network != "nat" {
        return String::new();
    }
    let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    host.lines()
        .filter(|l| {
            l.split_whitespace().nth(1).is_some_and(|addr| {
                l.starts_with("nameserver") && !addr.starts_with("127.") && addr != "::1"
            })
        })
        .map(|l| format!("{l}\n"))
        .collect()
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

fn open_log(path: &Path) -> Result<fs::File, BackendError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(BackendError::io(path.display().to_string()))
}

fn redirect_stdio(log: &fs::File) {
    if let Ok(null) = fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    let _ = nix::unistd::dup2(log.as_raw_fd(), 1);
    let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
}
