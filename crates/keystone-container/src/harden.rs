//! The container guest's share of the kernel, reduced the way runc, crun
//! and Docker reduce a container's by default (../shared/SECURITY-NOTES.md
//! §1–3): masked and read-only paths under `/proc` and `/sys`, mounts the
//! guest cannot undo, a capability bounding set, and a seccomp filter.
//!
//! The masks only hold if guest root cannot unmount them. A user namespace
//! owns the mounts it makes, so masks made in the sandbox's namespace (A)
//! would be guest root's to lift. G therefore makes every mount in A and
//! then moves itself into a user namespace nested in A (B, the same ids)
//! with a fresh mount namespace: the kernel copies A's mounts into B
//! *locked* (they cannot be unmounted one by one, and their read-only,
//! nosuid, nodev and noexec flags cannot be cleared). The network, UTS,
//! IPC and PID namespaces stay A's, so guest root (root of B) also cannot
//! reconfigure the network, change the host name, or mount a fresh proc
//! or sysfs (both need capabilities over A's namespaces): the writes that
//! would reach a kernel-global knob are refused by the kernel itself, not
//! by a path keystone forgot to mask.

use super::init::m;
use nix::mount::MsFlags;
use std::fs;
use std::path::Path;

/// Hidden from the guest: runc's default list (`runc spec`), plus
/// powercap as newer Docker and Kubernetes mask it. A file is covered by
/// /dev/null, a directory by an empty read-only tmpfs.
pub const MASKED: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Visible but read-only: runc's and Docker's list.
pub const READ_ONLY: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Capabilities the guest's root keeps (in its own user namespace): the
/// 14 Docker grants by default, which is what package managers, sudo and
/// sshd need, and CAP_SYS_PTRACE, so root sees every guest process's
/// sockets and working directory (the dev proxy's discovery, `ss -p`) and
/// debuggers work; it reaches no process outside the guest's namespace.
/// Everything else leaves the bounding set, so no setuid program or file
/// capability can bring it back.
const KEPT_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    19, // CAP_SYS_PTRACE
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Per-network-namespace settings the guest cannot make itself once it
/// lives in B (A owns the network namespace): ports below 1024 for its
/// root (sshd listens on 22), and ICMP echo sockets for every id (ping).
/// `proc` is the guest's proc mount, before [`mask`] makes it read-only.
pub fn network_sysctls(proc: &Path) -> Result<(), String> {
    // The kernel takes only groups mapped in this namespace.
    let last_gid = fs::read_to_string("/proc/self/gid_map")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() == 3 && f[2] > 0).then(|| f[0] + f[2] - 1)
        })
        .max()
        .unwrap_or(0);
    for (key, value) in [
        ("sys/net/ipv4/ip_unprivileged_port_start", "0".to_string()),
        ("sys/net/ipv4/ping_group_range", format!("0 {last_gid}")),
    ] {
        let f = proc.join(key);
        fs::write(&f, value).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(())
}

/// Apply [`READ_ONLY`] and [`MASKED`] beneath the guest's root (proc and
/// sys already mounted there). Paths this kernel does not have are
/// skipped.
pub fn mask(root: &Path) -> Result<(), String> {
    let kept = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for p in READ_ONLY {
        let target = root.join(p);
        if fs::symlink_metadata(&target).is_err() {
            continue;
        }
        m(
            Some(&target.display().to_string()),
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        m(
            None,
            &target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept,
            None,
        )?;
    }
    let null = root.join("dev/null");
    for p in MASKED {
        let target = root.join(p);
        let Ok(meta) = fs::symlink_metadata(&target) else {
            continue;
        };
        if meta.is_dir() {
            m(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | kept,
                Some("size=4k,nr_inodes=1,mode=0555"),
            )?;
        } else {
            m(
                Some(&null.display().to_string()),
                &target,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    Ok(())
}

/// Move the calling process (G, PID 1) into a user namespace nested in
/// its own, with the same ids, and a mount namespace of its own: see the
/// module's comment. A helper forked beforehand writes the new
/// namespace's id maps (only a process in the parent namespace may write
/// more than one id), then exits; G waits for it.
pub fn enter_guest_namespace() -> Result<(), String> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use std::os::fd::AsRawFd;
    let identity = |file: &str| -> Result<String, String> {
        let text = fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3).then(|| format!("{} {} {}\n", f[0], f[0], f[2]))
            })
            .collect())
    };
    let uid_map = identity("/proc/self/uid_map")?;
    let gid_map = identity("/proc/self/gid_map")?;
    let me = nix::unistd::getpid();
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: single-threaded; the child only reads a pipe, writes two
    // files and exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            drop(w);
            if keystone_process::arm_death_signal(nix::sys::signal::Signal::SIGKILL, me).is_err() {
                // SAFETY: _exit in a forked child.
                unsafe { libc::_exit(1) }
            }
            let mut b = [0u8; 1];
            let ok = nix::unistd::read(r.as_raw_fd(), &mut b) == Ok(1)
                && fs::write(format!("/proc/{me}/uid_map"), &uid_map).is_ok()
                && fs::write(format!("/proc/{me}/gid_map"), &gid_map).is_ok();
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(r);
            let unshared = nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNS,
            );
            if unshared.is_ok() {
                let _ = nix::unistd::write(&w, b"m");
            }
            drop(w);
            let status = waitpid(child, None);
            unshared.map_err(|e| format!("cannot create the guest's user namespace: {e}"))?;
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                other => Err(format!("cannot map the guest's user namespace ({other:?})")),
            }
        }
    }
}

/// Drop every capability but [`KEPT_CAPS`] from the bounding set.
pub fn bound_capabilities() -> Result<(), String> {
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if KEPT_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with PR_CAPBSET_DROP changes only this task.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(format!(
                "cannot drop capability {cap}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// System calls the guest gets EPERM for: the ones Docker's default
/// profile never allows or gates behind capabilities a container lacks,
/// chosen for the kernel attack surface they open (keyrings, eBPF, perf,
/// userfaultfd and io_uring are where container escapes have come from)
/// or the host state they touch (modules, kexec, swap, reboot, accounting,
/// the kernel log). Everything else is allowed: a denylist, unlike
/// Docker's allowlist, so new system calls work (and this comment says
/// what that costs). User namespaces stay allowed: Chromium's and
/// bubblewrap's sandboxes need them.
fn denied_syscalls() -> Vec<libc::c_long> {
    let mut calls = vec![
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_open_by_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_lookup_dcookie,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    calls
}

/// Address families the guest may not open: vsock (it reaches the host's
/// own vsock services, not a network keystone controls) and AF_ALG (the
/// kernel crypto API, a source of escapes; Docker denies both).
const DENIED_FAMILIES: &[u64] = &[libc::AF_VSOCK as u64, libc::AF_ALG as u64];

/// The filter, compiled for this machine's architecture by `seccompiler`
/// (rust-vmm's, used by Firecracker). A system call of another ABI (32-bit
/// x86 through int 0x80) kills the process, since the denylist's numbers
/// are the native ones; on x86-64, x32 calls (bit 30 set) get ENOSYS.
pub fn seccomp_program() -> Result<Vec<seccompiler::sock_filter>, String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("{e:?}"))?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|nr| (nr, vec![]))
        .collect();
    let socket_rules = DENIED_FAMILIES
        .iter()
        .map(|family| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *family)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| format!("{e:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_socket, socket_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("{e:?}"))?;
    let mut program: Vec<seccompiler::sock_filter> =
        seccompiler::BpfProgram::try_from(filter).map_err(|e| format!("{e:?}"))?;
    if cfg!(target_arch = "x86_64") {
        // Before seccompiler's program (its jumps are relative, so they
        // are unchanged): load the call number; x32 numbers have bit 30
        // set and would miss every native number above.
        const X32_BIT: u32 = 0x4000_0000;
        let stmt = |code: u16, k: u32| seccompiler::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let prefix = vec![
            stmt((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0),
            seccompiler::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: X32_BIT,
            },
            stmt(
                (libc::BPF_RET | libc::BPF_K) as u16,
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            ),
        ];
        program.splice(0..0, prefix);
    }
    Ok(program)
}

/// Install `program` on this task without no_new_privs, which would make
/// sudo refuse to run: allowed because G holds CAP_SYS_ADMIN in its own
/// user namespace (runc does the same when NNP is off). Inherited by
/// everything the guest runs; it cannot be removed.
pub fn install_seccomp(program: &[seccompiler::sock_filter]) -> Result<(), String> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, alive for the call; the kernel
    // copies it. seccompiler's sock_filter has libc's layout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot install the seccomp filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let p = seccomp_program().expect("program");
        assert!(
            p.len() > denied_syscalls().len(),
            "{} instructions",
            p.len()
        );
        assert!(p.len() < 4096, "within BPF's limit");
    }

    /// In a forked child: install the filter, then a denied call fails
    /// with EPERM and an allowed one works (the filter really filters).
    #[test]
    fn the_filter_denies_keyctl_and_vsock_and_allows_the_rest() {
        let program = seccomp_program().expect("program");
        // SAFETY: the child only makes system calls and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // Without CAP_SYS_ADMIN a filter needs no_new_privs.
                // SAFETY: prctl changes only this task.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = (|| {
                    install_seccomp(&program).map_err(|_| 10)?;
                    // SAFETY: plain system calls with valid arguments.
                    let r = unsafe { libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) };
                    let errno = std::io::Error::last_os_error().raw_os_error();
                    if r != -1 || errno != Some(libc::EPERM) {
                        return Err(11);
                    }
                    // SAFETY: as above.
                    let s = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
                    if s != -1
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
                    {
                        return Err(12);
                    }
                    // SAFETY: as above.
                    let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                    if s < 0 {
                        return Err(13);
                    }
                    if nix::unistd::getpid().as_raw() <= 0 {
                        return Err(14);
                    }
                    Ok(())
                })();
                // SAFETY: _exit in a forked child.
                unsafe { libc::_exit(code.err().unwrap_or(0)) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "10 install, 11 keyctl allowed, 12 vsock allowed, 13 unix refused"
                );
            }
        }
    }
}
