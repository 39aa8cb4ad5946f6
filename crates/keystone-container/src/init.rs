//! The inside of a container sandbox: what runs between `fork` and the
//! guest's init. Everything here executes in a freshly forked child of the
//! single-threaded supervisor, on data prepared before the fork.
//!
//! Layout of processes (host view):
//!
//! ```text
//! supervisor ── C: joins the cgroup, unshares the user namespace (the
//!               │   supervisor writes its id maps), then mount, UTS, IPC,
//!               │   network and PID namespaces; waits for G
//!               └── G: PID 1 of the sandbox: mounts the overlay root,
//!                      /proc, /sys, /dev and the masks, pivot_root, then
//!                      enters the guest's nested user namespace (see
//!                      `harden`), drops capabilities, installs the
//!                      seccomp filter, exec tini → sshd
//! ```
//!
//! C and G carry PR_SET_PDEATHSIG(SIGKILL), so `kill -9` of the supervisor
//! takes the whole sandbox down: C dies, G (PID 1) dies, and the kernel
//! kills every process in its PID namespace.

use super::handshake::{Channel, Msg, Received};
use super::harden;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::unistd::{chdir, pivot_root, sethostname};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// All inputs of the in-namespace setup, prepared before fork.
#[derive(Clone)]
pub struct InitSpec {
    pub hostname: String,
    pub lower: PathBuf,
    /// Persistent upper/work dirs, or None for a volatile (tmpfs) upper.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Scratch directory in the sandbox dir (mount point for the root and
    /// for a volatile upper layer).
    pub scratch: PathBuf,
    /// The guest's `/etc/keystone`: a per-start copy (see `copy_guest_keys`).
    pub keys: PathBuf,
    /// The bounded layer's image (root only): mounted where the upper and
    /// work directories' parent would be bound (see `layer`).
    pub disk_image: Option<PathBuf>,
    /// The layer's size: the volatile tmpfs's, when nothing is kept.
    pub disk_gb: u32,
    /// Started by host root: the host ids of the sandbox's root. C binds
    /// the directories above into a staging tmpfs (see [`stage`]), then
    /// becomes these ids and creates the user namespace as them, so the
    /// namespace is owned by the range, as a rootless one is by its user
    /// (helpers such as pasta then join it as those ids, not as root).
    pub stage: Option<(u32, u32)>,
    pub kvm: bool,
    /// The guest's seccomp filter, compiled before the fork.
    pub seccomp: Vec<seccompiler::sock_filter>,
    pub hosts: String,
    pub resolv: String,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// The supervisor's pid: C's parent, checked after each arming of
    /// C's death signal (a subreaper, not pid 1, may adopt an orphan).
    pub supervisor: nix::unistd::Pid,
}

/// Body of C: never returns.
pub fn child(spec: &InitSpec, chan: Channel) -> ! {
    let fail = |msg: String| -> ! {
        let _ = chan.send(&Msg::Failed(msg));
        // SAFETY: _exit in a forked child never runs destructors of the
        // parent's state.
        unsafe { libc::_exit(1) }
    };
    // Exits at once if the supervisor is already gone.
    if let Err(e) = keystone_process::arm_death_signal(Signal::SIGKILL, spec.supervisor) {
        fail(format!("death signal: {e}"));
    }
    let _ = nix::unistd::setsid();
    let staged;
    let spec = if let Some((uid, gid)) = spec.stage {
        staged = stage(spec).unwrap_or_else(|e| fail(e));
        let (u, g) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(gid),
        );
        if let Err(e) = nix::unistd::setgroups(&[])
            .and(nix::unistd::setresgid(g, g, g))
            .and(nix::unistd::setresuid(u, u, u))
        {
            fail(format!(
                "cannot become the sandbox's host ids {uid}:{gid}: {e}"
            ));
        }
        // A change of credentials clears the death signal and makes the
        // task undumpable: set the signal again (and check the supervisor
        // did not die in between), and make it dumpable, so that helpers
        // running as these same ids (pasta) may open its namespaces
        // before the init's exec would have.
        if let Err(e) = keystone_process::arm_death_signal(Signal::SIGKILL, spec.supervisor) {
            fail(format!("death signal: {e}"));
        }
        // SAFETY: prctl with PR_SET_DUMPABLE only sets a flag on this task.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        &staged
    } else {
        spec
    };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        fail(format!("cannot create a user namespace: {e}"));
    }
    // Tell the supervisor to write our id maps, and wait until it has.
    if let Err(e) = chan.send(&Msg::UserNamespace) {
        fail(e);
    }
    if chan.recv() != Received::Msg(Msg::IdsMapped) {
        fail("supervisor did not map ids".into());
    }
    let root = nix::unistd::Uid::from_raw(0);
    let rootg = nix::unistd::Gid::from_raw(0);
    if let Err(e) =
        nix::unistd::setresgid(rootg, rootg, rootg).and(nix::unistd::setresuid(root, root, root))
    {
        fail(format!("cannot become root in the user namespace: {e}"));
    }
    let _ = nix::unistd::setgroups(&[]);
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWCGROUP;
    if let Err(e) = unshare(flags) {
        fail(format!("cannot create namespaces: {e}"));
    }
    // G's parent, C, is outside G's PID namespace: G watches it through
    // a pidfd rather than getppid.
    let me = keystone_process::pidfd_open(nix::unistd::getpid().as_raw())
        .unwrap_or_else(|e| fail(format!("pidfd_open: {e}")));
    // SAFETY: still single-threaded; G only uses prepared data.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fail(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            if let Err(msg) = pid1(spec, &me) {
                fail(msg);
            }
            unreachable_exit()
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = chan.send(&Msg::Pid1(child.as_raw()));
            drop(chan);
            let code = match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => c,
                Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
                _ => 1,
            };
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Where a root-started sandbox's directories are bound (in C's own mount
/// namespace, before the user namespace exists).
const STAGE: &str = "/tmp";

/// Root's sandbox runs on ids that are not the host's (see `idmap`), so
/// its root may not traverse the directories its layers live in (a
/// 0700 home, a 0700 temporary directory). While still host root, C takes
/// a mount namespace of its own, opens those directories, mounts a tmpfs
/// on [`STAGE`] (anything it hides is reached through the open
/// descriptors) and binds each of them there; the user namespace and the
/// sandbox's mount namespace come after, so these binds are locked
/// beneath the sandbox, and `pivot_root` detaches them from its view.
fn stage(spec: &InitSpec) -> Result<InitSpec, String> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot create a mount namespace: {e}"))?;
    private_mounts()?;
    let mut sources: Vec<(&str, &Path)> = vec![("lower", &spec.lower), ("run", &spec.scratch)];
    // overlay wants upper and work on one mount: their common parent.
    let disk = match &spec.upper {
        Some((u, w)) if u.parent().is_some() && u.parent() == w.parent() => u.parent(),
        Some(_) => return Err("the upper and work directories must be siblings".into()),
        None => None,
    };
    if let Some(d) = disk {
        // A bounded layer: its image mounted over the disk directory, in
        // this mount namespace only, before the directory is opened (the
        // loop device holds the image, which the mount then hides).
        if let (Some(image), Some((uid, gid))) = (&spec.disk_image, spec.stage) {
            super::layer::mount(image, d)?;
            for name in ["upper", "work"] {
                let dir = d.join(name);
                if !dir.is_dir() {
                    fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                }
            }
        }
        sources.push(("disk", d));
    }
    let fds = sources
        .iter()
        .map(|(name, path)| {
            open(
                *path,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map(|fd| (*name, fd))
            .map_err(|e| format!("open {}: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stage = Path::new(STAGE);
    m(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )?;
    for (name, fd) in &fds {
        let target = stage.join(name);
        fs::create_dir(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let source = format!("/proc/self/fd/{fd}");
        m(Some(&source), &target, None, MsFlags::MS_BIND, None)?;
    }
    for (_, fd) in fds {
        let _ = nix::unistd::close(fd);
    }
    let mut staged = spec.clone();
    staged.lower = stage.join("lower");
    staged.scratch = stage.join("run");
    if let Some(name) = spec.keys.file_name() {
        staged.keys = staged.scratch.join(name);
    }
    if let Some((u, w)) = &spec.upper {
        let name = |p: &Path| p.file_name().map(|n| stage.join("disk").join(n));
        if let (Some(u), Some(w)) = (name(u), name(w)) {
            staged.upper = Some((u, w));
        }
    }
    staged.stage = None;
    Ok(staged)
}

/// Make every mount of this (new) mount namespace private, so nothing
/// done here propagates back to the host's.
fn private_mounts() -> Result<(), String> {
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
}

fn unreachable_exit() -> ! {
    // SAFETY: _exit in a forked child.
    unsafe { libc::_exit(127) }
}

/// `mount(2)`, with an error that names what was mounted where.
pub(super) fn m(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {} ({}): {e}",
            src.unwrap_or("-"),
            target.display(),
            fstype.unwrap_or("bind")
        )
    })
}

/// Body of G, PID 1 of the sandbox: set up the root and exec the init.
fn pid1(spec: &InitSpec, parent: &OwnedFd) -> Result<(), String> {
    keystone_process::arm_death_signal_on(Signal::SIGKILL, parent)
        .map_err(|e| format!("death signal: {e}"))?;
    private_mounts()?;

    let root = spec.scratch.join("root");
    let (upper, work) = match &spec.upper {
        Some((u, w)) => (u.clone(), w.clone()),
        None => {
            let vol = spec.scratch.join("volatile");
            m(
                Some("tmpfs"),
                &vol,
                Some("tmpfs"),
                MsFlags::empty(),
                Some(&format!("mode=0755,size={}g", spec.disk_gb)),
            )?;
            let (u, w) = (vol.join("upper"), vol.join("work"));
            fs::create_dir_all(&u).map_err(|e| e.to_string())?;
            fs::create_dir_all(&w).map_err(|e| e.to_string())?;
            (u, w)
        }
    };
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.lower.display(),
        upper.display(),
        work.display()
    );
    // The overlay is mounted inside the sandbox's user namespace, which
    // is never the host's: its metadata lives in user.* xattrs.
    opts.push_str(",userxattr");
    m(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )?;

    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m(Some("proc"), &root.join("proc"), Some("proc"), nosuid, None)?;
    harden::network_sysctls(&root.join("proc"))?;
    if m(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None,
    )
    .is_err()
    {
        // Without a sysfs of our own, leave /sys empty rather than show the host's.
    }
    setup_dev(&root, spec.kvm)?;
    harden::mask(&root)?;
    m(
        Some("tmpfs"),
        &root.join("run"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    fs::create_dir_all(root.join("run/sshd")).map_err(|e| format!("/run/sshd: {e}"))?;
    let keys = root.join("etc/keystone");
    fs::create_dir_all(&keys).map_err(|e| format!("/etc/keystone: {e}"))?;
    m(
        Some(&spec.keys.display().to_string()),
        &keys,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    // Read-only, so a process that is not root cannot replace the keys; a
    // guest root that remounts it changes only this start's copy.
    m(
        None,
        &keys,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )?;
    fs::write(root.join("etc/hosts"), &spec.hosts).map_err(|e| format!("/etc/hosts: {e}"))?;
    let resolv = root.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::write(&resolv, &spec.resolv).map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    fs::write(root.join("etc/hostname"), format!("{}\n", spec.hostname))
        .map_err(|e| format!("/etc/hostname: {e}"))?;

    chdir(&root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    loopback_up().map_err(|e| format!("bring up lo: {e}"))?;
    // Last, in this order: the guest's own user namespace (every mount
    // above becomes locked), the bounding set, the filter (it needs
    // CAP_SYS_ADMIN, still in the effective set until the exec).
    harden::enter_guest_namespace()?;
    harden::bound_capabilities()?;
    harden::install_seccomp(&spec.seccomp)?;
    keystone_backend::signals::unblock_all();
    let e = nix::unistd::execve(&spec.argv[0], &spec.argv, &spec.env);
    Err(format!("exec {:?}: {e:?}", spec.argv[0]))
}

fn setup_dev(root: &Path, kvm: bool) -> Result<(), String> {
    let dev = root.join("dev");
    m(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    let mut nodes = vec!["null", "zero", "full", "random", "urandom", "tty"];
    if kvm {
        nodes.push("kvm");
    }
    for node in nodes {
        let target = dev.join(node);
        fs::write(&target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
        m(
            Some(&format!("/dev/{node}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    let pts = dev.join("pts");
    fs::create_dir_all(&pts).map_err(|e| e.to_string())?;
    m(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .or_else(|_| {
        m(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
    })?;
    symlink("pts/ptmx", dev.join("ptmx")).map_err(|e| e.to_string())?;
    let shm = dev.join("shm");
    fs::create_dir_all(&shm).map_err(|e| e.to_string())?;
    fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777)).map_err(|e| e.to_string())?;
    m(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `ip link set lo up`, with one ioctl.
fn loopback_up() -> Result<(), String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialized ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: the kernel filled ifru_flags in the call above.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}
