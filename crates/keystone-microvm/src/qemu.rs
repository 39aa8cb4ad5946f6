//! The QEMU command line, built without doing any I/O so it can be tested.

use super::accel::Accel;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// The guest's address on its host-only link (eth0): QEMU user networking
/// with `restrict=on`, which carries nothing but the host-initiated
/// forward to sshd. Static, so the guest's init needs no DHCP.
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
pub const GUEST_IP: &str = "10.0.2.15";
/// The guest's way out (eth1), with `--network nat` only: passt, or the
/// egress point's tap with the allowlist.
pub const NAT_ADDRESS: &str = "10.0.3.15/24";
pub const NAT_IP: &str = "10.0.3.15";
pub const NAT_GATEWAY: &str = "10.0.3.2";

#[derive(Clone, Debug)]
pub struct VmSpec {
    pub name: String,
    pub accel: Accel,
    /// `vmx`/`svm` to pass through, under KVM only.
    pub nested_flag: Option<&'static str>,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// qboot when QEMU ships it: under TCG a second faster than SeaBIOS.
    pub bios: Option<PathBuf>,
    /// Everything of the sandbox's that QEMU touches, as descriptors.
    pub fds: Fds,
    /// Host port on 127.0.0.1 forwarded to the guest's sshd.
    pub ssh_port: u16,
    /// The guest's way out (eth1), a `-netdev` value with `id=nat`:
    /// passt over a socketpair with `--network nat`, a tap on a host
    /// bridge with `--network bridge`, none with `--network none`; a
    /// descriptor either way.
    pub uplink: Option<String>,
}

/// The descriptors QEMU inherits, opened by the supervisor. QEMU never
/// opens a path of the sandbox's: dropped to an id of its own
/// (`super::jail`), it could not, and the qcow2 header's backing path is
/// overridden, so a disk cannot point QEMU at another file.
#[derive(Clone, Copy, Debug)]
pub struct Fds {
    /// The guest kernel, read-only (reopened as `/proc/self/fd/N`: QEMU
    /// reads `-kernel` with plain `fopen`).
    pub kernel: RawFd,
    /// `backend.microvm.initrd`, read-only, reopened like the kernel.
    pub initrd: Option<RawFd>,
    /// The image's ext4, read-only: the root disk's backing file.
    pub base: RawFd,
    /// The sandbox's qcow2 overlay, read-write.
    pub disk: RawFd,
    /// The per-boot configuration, a tar archive read by the guest's init.
    pub config: RawFd,
    /// The boot log, write-only.
    pub console: RawFd,
    /// A listening Unix socket for QMP.
    pub qmp: RawFd,
    /// With the live share: a connection to virtiofsd's vhost-user socket.
    pub share: Option<RawFd>,
}

impl Fds {
    /// Every descriptor, for the child to inherit.
    pub fn all(&self) -> Vec<RawFd> {
        let mut v = vec![
            self.kernel,
            self.base,
            self.disk,
            self.config,
            self.console,
            self.qmp,
        ];
        v.extend(self.initrd);
        v.extend(self.share);
        v
    }
}

/// The cap on TCG's translated-code cache, in MiB (see `VmSpec::args`).
const TCG_CODE_CACHE_MIB: u32 = 256;

/// The guest kernel's command line. The root is the NVMe drive, which the
/// cloud kernel drives without modules, so no initrd is needed. `quiet`
/// matters under TCG: every byte on the emulated UART costs time. `panic=-1` with `-no-reboot` turns a
/// dead init into an exited QEMU instead of a hung VM.
pub fn kernel_cmdline() -> String {
    [
        "console=ttyS0",
        "root=/dev/nvme0n1",
        "rootfstype=ext4",
        "rootwait",
        "rw",
        "init=/usr/local/sbin/keystone-init",
        "quiet",
        "loglevel=3",
        "panic=-1",
        "net.ifnames=0",
        "mitigations=off",
        // Each of these skips work that costs time under TCG.
        "cryptomgr.notests",
        "audit=0",
        "tsc=reliable",
        "no_timer_check",
        "i8042.nopnp",
        "i8042.noaux",
        "random.trust_cpu=on",
    ]
    .join(" ")
}

impl VmSpec {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-name", &format!("keystone-{}", self.name)]);
        // QEMU's own seccomp filter, every deny option on (libvirt's
        // string): no set*id, no fork or exec, no scheduler changes, no
        // obsolete calls. Nothing keystone asks of QEMU needs them (passt
        // and virtiofsd are started by keystone, never by QEMU).
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
        ]);
        let cpu = match (self.accel, self.nested_flag) {
            (Accel::Kvm, Some(flag)) => format!("host,+{flag}"),
            (Accel::Kvm, None) => "host,-vmx,-svm".to_string(),
            // `max` gives the guest every feature TCG emulates.
            (Accel::Tcg, _) => "max".to_string(),
        };
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            // One host thread for all vCPUs. Multi-threaded TCG (QEMU 7.2,
            // Debian 12) does not keep cross-vCPU self-modifying code
            // coherent: the guest kernel patches its own text at boot and at
            // run time (static keys, through an int3 placed while it writes),
            // and a second vCPU can still execute the int3 after the patch
            // is done. The kernel then dies with "Oops: int3" in
            // `sched_clock_cpu` ~1-2 s into boot: 3 in 230 boots here with
            // `thread=multi`, 0 in 250 with `thread=single`, which also
            // boots faster (2.0 s vs 2.4 s to init).
            //
            // tb-size: QEMU's translated-code cache is 1 GiB by default and
            // fills up (exec-heavy or JIT-heavy guests): 1.0 GB of QEMU's
            // 1.5 GB resident after a few npm/node runs. Capped at 256 MiB
            // the same runs took 31-33 s instead of 36-39 s.
            Accel::Tcg => format!("tcg,thread=single,tb-size={TCG_CODE_CACHE_MIB}"),
        };
        push(&["-machine", "q35", "-accel", &accel, "-cpu", &cpu]);
        if let Some(bios) = &self.bios {
            push(&["-bios", &bios.display().to_string()]);
        }
        push(&[
            "-m",
            &self.memory_mb.to_string(),
            "-smp",
            &self.vcpus.to_string(),
        ]);
        if self.fds.share.is_some() {
            // vhost-user (virtiofsd) maps the guest's memory: it must be
            // shared memory, not QEMU's private anonymous mapping.
            push(&[
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mb
                ),
                "-numa",
                "node,memdev=mem",
            ]);
        }
        let f = &self.fds;
        // fd sets 1-4: base, disk, config, console (`/dev/fdset/N`).
        for (set, fd) in [(1, f.base), (2, f.disk), (3, f.config), (4, f.console)] {
            push(&["-add-fd", &format!("fd={fd},set={set}")]);
        }
        push(&["-kernel", &format!("/proc/self/fd/{}", f.kernel)]);
        if let Some(initrd) = f.initrd {
            push(&["-initrd", &format!("/proc/self/fd/{initrd}")]);
        }
        push(&["-append", &kernel_cmdline()]);
        // The root is the only NVMe drive (nvme0n1, mounted by the kernel);
        // the configuration the only virtio disk (vda, read by the init).
        // Nodes named here, the backing one too, so the overlay's header
        // names no file QEMU opens.
        push(&[
            "-blockdev",
            "driver=file,node-name=base-file,filename=/dev/fdset/1,read-only=on",
            "-blockdev",
            "driver=raw,node-name=base,file=base-file,read-only=on",
            "-blockdev",
            "driver=file,node-name=root-file,filename=/dev/fdset/2,discard=unmap,cache.direct=off",
            "-blockdev",
            "driver=qcow2,node-name=root,file=root-file,backing=base,discard=unmap",
            "-device",
            "nvme,serial=keystone-root,drive=root",
        ]);
        push(&[
            "-blockdev",
            "driver=file,node-name=config-file,filename=/dev/fdset/3,read-only=on",
            "-blockdev",
            "driver=raw,node-name=config,file=config-file,read-only=on",
            "-device",
            "virtio-blk-pci,drive=config",
        ]);
        // The SSH link first (eth0), the way out second (eth1). The SSH
        // forward never goes through passt: passt's `--no-map-gw`, which
        // keeps the host's loopback out of reach, also breaks replies to
        // connections it forwards from the host's loopback.
        let ctl = format!(
            "user,id=ctl,restrict=on,ipv6=off,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{}-{GUEST_IP}:22",
            self.ssh_port
        );
        push(&["-netdev", &ctl, "-device", "virtio-net-pci,netdev=ctl"]);
        if let Some(uplink) = &self.uplink {
            push(&["-netdev", uplink, "-device", "virtio-net-pci,netdev=nat"]);
        }
        if let Some(fd) = self.fds.share {
            push(&[
                "-chardev",
                &format!("socket,id=share,fd={fd}"),
                "-device",
                &format!("vhost-user-fs-pci,chardev=share,tag={}", super::share::TAG),
            ]);
        }
        push(&["-device", "virtio-rng-pci"]);
        // Free page reporting: the guest (the init loads virtio_balloon)
        // hands memory it freed back to the host. Without it a 700 MB
        // allocation freed inside stayed in QEMU's resident set for good.
        push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
        push(&[
            "-chardev",
            "file,id=console,path=/dev/fdset/4",
            "-serial",
            "chardev:console",
        ]);
        push(&[
            "-chardev",
            &format!("socket,id=qmp,fd={},server=on,wait=off", f.qmp),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel, nested_flag: Option<&'static str>, passt_fd: Option<i32>) -> VmSpec {
        let uplink = passt_fd.map(|fd| format!("socket,id=nat,fd={fd}"));
        VmSpec {
            name: "demo".into(),
            accel,
            nested_flag,
            memory_mb: 2048,
            vcpus: 2,
            bios: None,
            fds: Fds {
                kernel: 10,
                initrd: None,
                base: 11,
                disk: 12,
                config: 13,
                console: 14,
                qmp: 15,
                share: None,
            },
            ssh_port: 40123,
            uplink,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn qemu_confines_itself_with_every_deny_option() {
        let a = spec(Accel::Tcg, None, None).args();
        assert_eq!(
            after(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
    }

    #[test]
    fn tcg_uses_cpu_max_single_threaded_and_never_host() {
        let a = spec(Accel::Tcg, Some("vmx"), None).args();
        assert_eq!(after(&a, "-cpu"), ["max"]);
        assert_eq!(after(&a, "-accel"), ["tcg,thread=single,tb-size=256"]);
    }

    #[test]
    fn kvm_passes_nested_flag_or_masks_it() {
        let a = spec(Accel::Kvm, Some("svm"), Some(5)).args();
        assert_eq!(after(&a, "-cpu"), ["host,+svm"]);
        let a = spec(Accel::Kvm, None, Some(5)).args();
        assert_eq!(after(&a, "-cpu"), ["host,-vmx,-svm"]);
    }

    #[test]
    fn memory_vcpus_and_disks_in_order() {
        let a = spec(Accel::Tcg, None, Some(7)).args();
        assert_eq!(after(&a, "-m"), ["2048"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(
            after(&a, "-add-fd"),
            ["fd=11,set=1", "fd=12,set=2", "fd=13,set=3", "fd=14,set=4"]
        );
        assert_eq!(after(&a, "-kernel"), ["/proc/self/fd/10"]);
        let nodes = after(&a, "-blockdev");
        assert!(nodes[1].contains("node-name=base,") && nodes[1].contains("read-only=on"));
        assert!(
            nodes[3].contains("driver=qcow2") && nodes[3].contains("backing=base"),
            "the backing file is ours, never the header's: {}",
            nodes[3]
        );
        assert!(nodes[4].contains("filename=/dev/fdset/3,read-only=on"));
        assert!(after(&a, "-drive").is_empty(), "no drive opened by path");
        assert_eq!(
            after(&a, "-chardev"),
            [
                "file,id=console,path=/dev/fdset/4",
                "socket,id=qmp,fd=15,server=on,wait=off"
            ]
        );
        assert!(
            !a.iter()
                .any(|x| x.starts_with('/') && !x.starts_with("/proc/self/fd/")),
            "QEMU is given no path: {a:?}"
        );
        let nets = after(&a, "-netdev");
        assert!(
            nets[0].starts_with("user,id=ctl,restrict=on"),
            "{}",
            nets[0]
        );
        assert_eq!(nets[1], "socket,id=nat,fd=7");
    }

    #[test]
    fn restricted_net_forwards_ssh_on_loopback_only() {
        let a = spec(Accel::Tcg, None, None).args();
        let n = after(&a, "-netdev");
        assert_eq!(n.len(), 1, "no way out without passt");
        let n = n[0];
        assert!(n.contains("restrict=on"));
        assert!(
            n.contains("hostfwd=tcp:127.0.0.1:40123-10.0.2.15:22"),
            "{n}"
        );
    }

    #[test]
    fn share_needs_shared_memory_and_a_vhost_user_device() {
        let mut s = spec(Accel::Tcg, None, None);
        assert!(after(&s.args(), "-object").is_empty());
        s.fds.share = Some(16);
        let a = s.args();
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=2048M,share=on"]
        );
        assert_eq!(after(&a, "-numa"), ["node,memdev=mem"]);
        assert!(after(&a, "-chardev").contains(&"socket,id=share,fd=16"));
        assert!(s.fds.all().contains(&16));
        assert!(after(&a, "-device").contains(&"vhost-user-fs-pci,chardev=share,tag=workspace"));
    }

    #[test]
    fn cmdline_boots_our_init_quietly() {
        let c = kernel_cmdline();
        assert!(c.contains("init=/usr/local/sbin/keystone-init"));
        assert!(c.contains("root=/dev/nvme0n1"));
        assert!(c.contains("quiet"));
        assert!(c.contains("panic=-1"));
    }
}
