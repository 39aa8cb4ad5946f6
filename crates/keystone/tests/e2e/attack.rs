//! The attack suite: a hostile agent, guest root through sudo, tries to
//! act on the host. Each test plants a canary and fails if it arrives, and
//! each was seen to fail on a build without its defence (docs/SECURITY.md
//! names the defence and that run).

use crate::harness::Host;
use std::time::Duration;

/// Pids of the processes whose argv[0] is exactly `name` (the guest's
/// marked processes; the host's own commands only mention the name).
fn pids_named(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).next() == Some(name.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Host uid and gid (real) of the process `pid`, from /proc.
fn host_ids(pid: &str) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("id")
    };
    (field("Uid:"), field("Gid:"))
}

/// The host file `path` still holds `before`; if not, it is put back
/// before the test fails, naming `what` changed it.
#[track_caller]
fn unchanged_or_restored(path: &str, before: &str, what: &str, r: &crate::harness::Run) {
    let after = std::fs::read_to_string(path).expect(path);
    if after != before {
        let _ = std::fs::write(path, before);
    }
    assert_eq!(
        after,
        before,
        "{what} changed the host's {path}:\n{}",
        r.text()
    );
}

/// Guest root is never host root, and the guest's users are no host
/// users: a host-global sysctl cannot be written, processes run on
/// unprivileged host ids, a setuid file the guest leaves in its layer is
/// not the host's root's, and the key directory's contents are a copy the
/// host never writes through.
pub fn guest_root_is_not_host_root(h: Host) {
    let name = h.name();
    h.start(&["--network", "none"]).ok();
    assert_eq!(h.sh("sudo -n id -u").trim(), "0", "guest root through sudo");

    // 1. A host-global sysctl: the reproduced takeover (a pipe in
    //    core_pattern runs a program as host root at the next crash).
    let core_pattern = "/proc/sys/kernel/core_pattern";
    let before = std::fs::read_to_string(core_pattern).expect("core_pattern");
    let canary = "core.keystone-canary.%p";
    let r = h.ks(&[
        "exec",
        "--",
        "sh",
        "-c",
        &format!("echo '{canary}' | sudo -n tee {core_pattern}"),
    ]);
    unchanged_or_restored(core_pattern, &before, "guest root's write", &r);
    assert_ne!(r.code, Some(0), "the write was not refused:\n{}", r.text());
    // Nor by mounting a /proc or /sys of its own.
    let r = h.ks(&[
        "exec",
        "--",
        "sh",
        "-c",
        &format!(
            "sudo -n mkdir -p /mnt/p && sudo -n mount -t proc proc /mnt/p && echo '{canary}' | sudo -n tee /mnt/p/sys/kernel/core_pattern"
        ),
    ]);
    unchanged_or_restored(core_pattern, &before, "a fresh proc mount", &r);

    // 2. The guest's root and agent are unprivileged host ids, and no
    //    real host user.
    let marker = format!("keystone-attack-{}", std::process::id());
    let mut sleeper = h.ks_spawn(&[
        "exec",
        "--",
        "bash",
        "-c",
        &format!(
            "sudo -n bash -c 'exec -a {marker}-root sleep 60' & exec -a {marker}-agent sleep 60"
        ),
    ]);
    let (root_name, agent_name) = (format!("{marker}-root"), format!("{marker}-agent"));
    let found = crate::harness::eventually(Duration::from_secs(20), || {
        pids_named(&root_name).len() == 1 && pids_named(&agent_name).len() == 1
    });
    assert!(
        found,
        "the guest's marked processes did not show up on the host"
    );
    let (root_uid, root_gid) = host_ids(&pids_named(&root_name)[0]);
    let (agent_uid, _) = host_ids(&pids_named(&agent_name)[0]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_ne!(root_uid, 0, "guest root runs as host root");
    assert_ne!(root_gid, 0, "guest root runs in host group root");
    let is_host_user = |uid: u32| {
        std::fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&uid.to_string()))
    };
    assert!(
        !is_host_user(agent_uid),
        "the guest's agent is host user {agent_uid}"
    );
    if h.user.is_none() {
        assert!(
            !is_host_user(root_uid),
            "guest root is host user {root_uid}"
        );
    }

    // 3. A setuid file the guest leaves in its layer is not host root's.
    h.sh("sudo -n cp /bin/sh /usr/local/bin/rootsh && sudo -n chmod 4755 /usr/local/bin/rootsh");
    // On the host it is in the layer's image (root: a bounded disk, read
    // with debugfs, which never mounts it) or in the upper directory.
    let disk = h.state_dir().join("sandboxes").join(&name).join("disk");
    let image = disk.join("layer.img");
    let (mode, uid) = if image.exists() {
        h.sh("sync");
        let out = std::process::Command::new("debugfs")
            .args(["-R", "stat /upper/usr/local/bin/rootsh"])
            .arg(&image)
            .output()
            .expect("debugfs (apt-get install e2fsprogs)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| {
            text.split(name)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("{name} in debugfs's answer:\n{text}"))
                .to_string()
        };
        (
            u32::from_str_radix(&field("Mode:"), 8).expect("mode"),
            field("User:").parse::<u32>().expect("uid"),
        )
    } else {
        use std::os::unix::fs::MetadataExt;
        let planted = disk.join("upper/usr/local/bin/rootsh");
        let meta =
            std::fs::symlink_metadata(&planted).expect("the planted file is in the upper layer");
        (meta.mode(), meta.uid())
    };
    assert!(
        mode & 0o4000 != 0,
        "the planted file lost its setuid bit: {mode:o}"
    );
    assert_ne!(uid, 0, "a setuid-root file of the guest's is on the host");

    // 4. The key directory: guest root remounts it read-write and turns
    //    authorized_keys into a link to a host file; the next start must
    //    not write through it (the host file stays as it was).
    let host_file = h.tmp.path().join("host-keys-canary");
    h.write(&host_file, "host file canary\n");
    let link = format!(
        "sudo -n mount -o remount,rw,bind /etc/keystone 2>/dev/null || sudo -n mount -o remount,rw /etc/keystone; \
         sudo -n rm -f /etc/keystone/authorized_keys && sudo -n ln -s {} /etc/keystone/authorized_keys; true",
        host_file.display()
    );
    h.sh(&link);
    h.ks(&["stop"]).ok();
    h.start(&["--network", "none"]).ok();
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("canary"),
        "host file canary\n",
        "a start wrote through the guest's link"
    );
    let guest_dir = h
        .state_dir()
        .join("sandboxes")
        .join(&name)
        .join("ssh/guest");
    for f in ["authorized_keys", "ssh_host_ed25519_key"] {
        let m = std::fs::symlink_metadata(guest_dir.join(f)).expect("key file");
        assert!(
            m.file_type().is_file(),
            "{f} in the host's key directory is not a file"
        );
    }
    // And the sandbox still works after all of it.
    assert_eq!(h.sh("echo ok").trim(), "ok");
}

/// Run `script` as guest root; its exit code and output.
fn as_root(h: &Host, script: &str) -> crate::harness::Run {
    h.ks(&["exec", "--", "sudo", "-n", "sh", "-c", script])
}

/// The container's kernel surface: what runc and Docker mask is masked,
/// and guest root cannot unmask it, remount it writable, mount a proc or
/// sysfs of its own, write a host-global sysfs file, take the host's
/// device nodes, use the system calls and socket families the filter
/// denies, or regain a capability outside the bounding set; ordinary
/// root work (installing a package with apt) still works.
pub fn kernel_surface_is_reduced(h: Host) {
    h.start(&["--network", "none"]).ok();

    // Masked, and staying masked: each of runc's masked files this
    // host's kernel has reads empty (the host's own read is not).
    let masked: Vec<&str> = [
        "/proc/keys",
        "/proc/timer_list",
        "/proc/interrupts",
        "/proc/kcore",
        "/proc/sched_debug",
    ]
    .into_iter()
    .filter(|p| std::path::Path::new(p).exists())
    .collect();
    assert!(masked.len() >= 2, "this host has none of {masked:?}");
    let sizes = || {
        let r = as_root(
            &h,
            &masked
                .iter()
                .map(|p| format!("wc -c < {p};"))
                .collect::<String>(),
        );
        (
            r.stdout
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>(),
            r.text(),
        )
    };
    let (got, text) = sizes();
    assert_eq!(
        got,
        vec!["0"; masked.len()],
        "{masked:?} are not masked:\n{text}"
    );
    let first = masked[0];
    for (what, script) in [
        (format!("unmask {first}"), format!("umount {first}")),
        (
            format!("unmask {first} (lazily)"),
            format!("umount -l {first}"),
        ),
        (
            "remount /proc/sys writable".into(),
            "mount -o remount,rw /proc/sys".into(),
        ),
        (
            "remount /proc/sys writable (bind)".into(),
            "mount -o remount,bind,rw /proc/sys".into(),
        ),
        (
            "mount a fresh proc".into(),
            "mkdir -p /mnt/p && mount -t proc proc /mnt/p".into(),
        ),
        (
            "mount a fresh sysfs".into(),
            "mkdir -p /mnt/s && mount -t sysfs sysfs /mnt/s".into(),
        ),
        (
            "remount /etc/keystone writable".into(),
            "mount -o remount,rw /etc/keystone".into(),
        ),
    ] {
        let r = as_root(&h, &script);
        assert_ne!(r.code, Some(0), "guest root could {what}:\n{}", r.text());
    }
    let (got, text) = sizes();
    assert_eq!(
        got,
        vec!["0"; masked.len()],
        "unmasked after the attempts:\n{text}"
    );

    // A host-global sysfs file, through the guest's /sys and a fresh one.
    let thp = "/sys/kernel/mm/transparent_hugepage/enabled";
    let before = std::fs::read_to_string(thp).expect(thp);
    let current = before
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(['[', ']']).to_string())
        .expect("a selected value");
    let other = if current == "never" {
        "always"
    } else {
        "never"
    };
    let r = as_root(
        &h,
        &format!(
            "echo {other} > {thp}; mkdir -p /mnt/s2 && mount -t sysfs sysfs /mnt/s2 && echo {other} > /mnt/s2{}",
            thp.trim_start_matches("/sys")
        ),
    );
    let after = std::fs::read_to_string(thp).expect(thp);
    if after != before {
        let _ = std::fs::write(thp, &current);
    }
    assert_eq!(
        after,
        before,
        "guest root changed the host's {thp}:\n{}",
        r.text()
    );

    // The host's device nodes: the guest's /dev/null is the host's node,
    // bound; guest root must not own it.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let null_before = std::fs::metadata("/dev/null").expect("/dev/null");
    let r = as_root(&h, "chown 1000:1000 /dev/null; chmod 0600 /dev/null");
    let null_after = std::fs::metadata("/dev/null").expect("/dev/null");
    if (null_after.uid(), null_after.mode()) != (null_before.uid(), null_before.mode()) {
        let _ = std::os::unix::fs::chown("/dev/null", Some(0), Some(0));
        let _ = std::fs::set_permissions("/dev/null", std::fs::Permissions::from_mode(0o666));
    }
    assert_eq!(
        (null_after.uid(), null_after.gid(), null_after.mode()),
        (null_before.uid(), null_before.gid(), null_before.mode()),
        "guest root took the host's /dev/null:\n{}",
        r.text()
    );
    let r = as_root(&h, "ls /dev");
    let nodes: Vec<&str> = r.stdout.split_whitespace().collect();
    for n in [
        "mem", "kmem", "port", "sda", "vda", "nvme0", "loop0", "fuse", "net",
    ] {
        assert!(!nodes.contains(&n), "/dev/{n} is in the guest: {nodes:?}");
    }

    // The seccomp filter: keyctl and bpf refused, vsock and AF_ALG
    // sockets refused (as root, too); ordinary calls work.
    let probe = r#"
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *a):
    r = libc.syscall(nr, *a)
    return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
print("keyctl", call(250, 0, 0, 0, 0, 0))
print("bpf", call(321, 0, 0, 0))
for name, fam in [("vsock", 40), ("alg", 38)]:
    try:
        socket.socket(fam, socket.SOCK_SEQPACKET if fam == 38 else socket.SOCK_STREAM).close()
        print(name, "ok")
    except OSError as e:
        print(name, os.strerror(e.errno))
print("getpid", "ok" if os.getpid() > 0 else "no")
"#;
    let script = format!("python3 -c '{}'", probe.replace('\'', "'\\''"));
    let r = as_root(&h, &script);
    r.ok();
    let got: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        got,
        [
            "keyctl Operation not permitted",
            "bpf Operation not permitted",
            "vsock Operation not permitted",
            "alg Operation not permitted",
            "getpid ok"
        ],
        "{}",
        r.text()
    );

    // The bounding set: no CAP_SYS_ADMIN (21), CAP_SYS_MODULE (16),
    // CAP_NET_ADMIN (12), CAP_SYS_RAWIO (17), CAP_SYS_BOOT (22).
    let r = as_root(&h, "grep CapBnd /proc/self/status");
    let bnd =
        u64::from_str_radix(r.stdout.split_whitespace().nth(1).expect("CapBnd"), 16).expect("hex");
    for cap in [12, 16, 17, 21, 22] {
        assert_eq!(
            bnd & (1 << cap),
            0,
            "capability {cap} in the bounding set: {bnd:x}"
        );
    }

    apt_still_works(&h);
}

/// Root's ordinary work still works: a package installed by apt (from a
/// local .deb, so no network is needed), its files chowned and its
/// maintainer script run.
pub fn apt_still_works(h: &Host) {
    let r = h.ks(&[
        "exec",
        "--",
        "bash",
        "-c",
        "set -e; d=$(mktemp -d); mkdir -p $d/p/DEBIAN $d/p/usr/share/ks-probe; \
         printf 'Package: ks-probe\\nVersion: 1\\nArchitecture: all\\nMaintainer: k <k@example.org>\\nDescription: probe\\n' > $d/p/DEBIAN/control; \
         printf '#!/bin/sh\\nchown nobody:nogroup /usr/share/ks-probe/file\\n' > $d/p/DEBIAN/postinst; chmod 755 $d/p/DEBIAN/postinst; \
         echo probe > $d/p/usr/share/ks-probe/file; dpkg-deb -b $d/p $d/ks-probe.deb >/dev/null; \
         sudo -n apt-get install -y -q $d/ks-probe.deb >/dev/null 2>&1 || { sudo -n apt-get install -y $d/ks-probe.deb; exit 1; }; \
         stat -c %U /usr/share/ks-probe/file",
    ]);
    assert_eq!(
        r.stdout.trim(),
        "nobody",
        "apt as guest root failed:\n{}",
        r.text()
    );
}

/// The Kubernetes pod: the baseline capability set (no CAP_SYS_ADMIN, no
/// CAP_NET_RAW), the runtime's seccomp filter, no service-account token,
/// no service links; sudo and apt still work.
pub fn pod_is_confined(h: Host) {
    h.start(&["--network", "none"]).ok();
    let r = as_root(&h, "grep -E '^(CapBnd|Seccomp):' /proc/self/status");
    let field = |name: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("{name} in:\n{}", r.text()))
            .to_string()
    };
    let bnd = u64::from_str_radix(&field("CapBnd:"), 16).expect("hex");
    for cap in [12, 13, 16, 17, 21, 22] {
        assert_eq!(
            bnd & (1 << cap),
            0,
            "capability {cap} in the pod's bounding set: {bnd:x}"
        );
    }
    assert_eq!(
        field("Seccomp:"),
        "2",
        "the pod runs without a seccomp filter"
    );
    let r = h.ks(&[
        "exec",
        "--",
        "sh",
        "-c",
        "ls /var/run/secrets/kubernetes.io 2>&1; env | grep -c _SERVICE_HOST || true",
    ]);
    assert!(
        r.stdout.contains("No such file"),
        "a service-account token is mounted:\n{}",
        r.text()
    );
    assert_eq!(
        r.stdout.lines().last(),
        Some("0"),
        "service links are injected:\n{}",
        r.text()
    );
    apt_still_works(&h);
}

/// An upgrade keeps a root sandbox's disk and unsynced work: a layer left
/// by a build that ran root's sandboxes on the host's own ids (owners
/// 0..65535, no `disk/idmap.json`) is moved onto the range at the next
/// start, and the agent's commit, its files' owners and a setuid bit are
/// all still there.
pub fn legacy_layer_survives_the_upgrade(h: Host) {
    use std::os::unix::fs::MetadataExt;
    let name = h.name();
    h.start(&["--network", "none"]).ok();
    h.sh("echo kept > unsynced.txt && git add unsynced.txt && git commit -qm 'not yet synced' && sudo -n install -m 4755 /bin/true /usr/local/bin/suid-probe");
    h.ks(&["stop"]).ok();
    let disk = h.state_dir().join("sandboxes").join(&name).join("disk");
    // The layer as the old build kept it: a directory beside the disk's
    // records, not an image.
    let image = disk.join("layer.img");
    let mnt = h.tmp.path().join("layer-mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    let run = crate::harness::run_ok;
    let (image_s, mnt_s, disk_s) = (
        image.display().to_string(),
        mnt.display().to_string(),
        disk.display().to_string(),
    );
    run(&["mount", "-o", "loop,ro", &image_s, &mnt_s]);
    run(&[
        "cp",
        "-a",
        &format!("{mnt_s}/upper"),
        &format!("{mnt_s}/work"),
        &disk_s,
    ]);
    run(&["umount", &mnt_s]);
    std::fs::remove_file(&image).expect("rm image");
    let root = std::fs::symlink_metadata(disk.join("upper")).expect("upper");
    let (uid0, gid0) = (root.uid(), root.gid());
    assert!(
        uid0 > 65535 && gid0 > 65535,
        "the layer is on host ids {uid0}:{gid0}"
    );
    let _ = std::fs::remove_file(disk.join("idmap.json"));
    // Put the layer back on the host's ids, as the old build left it.
    fn back(p: &std::path::Path, uid0: u32, gid0: u32) {
        let m = std::fs::symlink_metadata(p).expect("meta");
        let mode = m.mode();
        std::os::unix::fs::lchown(p, Some(m.uid() - uid0), Some(m.gid() - gid0)).expect("lchown");
        if !m.file_type().is_symlink() && mode & 0o6000 != 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777))
                .expect("chmod");
        }
        if m.is_dir() {
            for e in std::fs::read_dir(p).expect("dir").flatten() {
                back(&e.path(), uid0, gid0);
            }
        }
    }
    back(&disk.join("upper"), uid0, gid0);
    let probe = disk.join("upper/usr/local/bin/suid-probe");
    assert_eq!(
        std::fs::metadata(&probe).expect("probe").uid(),
        0,
        "the layer is on host ids"
    );

    let r = h.start(&["--network", "none"]);
    r.ok();
    assert!(r.text().contains("disk: not bounded"), "{}", r.text());
    assert_eq!(h.sh("git log -1 --format=%s").trim(), "not yet synced");
    assert_eq!(
        h.sh("cat unsynced.txt; stat -c %U:%G unsynced.txt")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["kept", "agent:agent"]
    );
    assert_eq!(
        h.sh("stat -c %a:%U /usr/local/bin/suid-probe").trim(),
        "4755:root"
    );
    let m = std::fs::metadata(&probe).expect("probe");
    assert_eq!(m.uid(), uid0, "the layer did not move onto the range");
    assert!(disk.join("idmap.json").exists());
    h.ks(&["sync"]).ok();
    assert_eq!(h.git(&["log", "-1", "--format=%s"]), "not yet synced");
}

/// Free bytes of the file system holding `path`, as `df` says.
fn host_free(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's figure")
}

/// The container's writable layer is bounded (root: an ext4 image of
/// `--disk` GB): filling it fails inside with ENOSPC, the host loses at
/// most that much space, keystone and the sandbox keep working, and what
/// was written survives a restart.
pub fn disk_is_bounded(h: Host) {
    let r = h.start(&["--network", "none", "--disk", "1"]);
    r.ok();
    assert!(r.text().contains("disk: 1 GB"), "{}", r.text());
    let size_mb: u64 = h
        .sh("df -B1M --output=size / | tail -1")
        .trim()
        .parse()
        .expect("df inside");
    assert!(
        (800..=1024).contains(&size_mb),
        "the guest's / is {size_mb} MB"
    );
    h.sh("echo kept > /home/agent/kept.txt");
    let state = h.state_dir();
    let before = host_free(&state);
    let r = h.ks(&[
        "exec",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/home/agent/fill bs=1M count=1500 2>&1; sync",
    ]);
    assert!(
        r.text().contains("No space left on device"),
        "filling the disk did not fail inside:\n{}",
        r.text()
    );
    let after = host_free(&state);
    assert!(
        before.saturating_sub(after) < 1_200_000_000,
        "the host lost {} bytes",
        before.saturating_sub(after)
    );
    // keystone and the sandbox still work, and the space comes back.
    h.ks(&["list"]).ok();
    assert_eq!(h.sh("rm /home/agent/fill && echo ok").trim(), "ok");
    h.ks(&["stop"]).ok();
    h.start(&["--network", "none", "--disk", "1"]).ok();
    assert_eq!(h.sh("cat /home/agent/kept.txt").trim(), "kept");
}

/// The first `keystone-vm` entry of a subordinate id file: (start, count).
fn vm_range(file: &str) -> (u32, u32) {
    let text = std::fs::read_to_string(file).expect(file);
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == "keystone-vm").then_some(())?;
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .unwrap_or_else(|| panic!("{file} has no keystone-vm range:\n{text}"))
}

/// QEMU is the host process a guest that escapes its kernel takes over;
/// run by root, it holds no host power: its ids are one sandbox's own
/// from the `keystone-vm` range, with no capabilities and no groups, and
/// with those ids a root canary, the sandbox's disk, the project's `.git`
/// and the supervisor are out of reach; in its own view of the file
/// system, a world-readable canary in /tmp and the sandboxes' directory
/// are not there. (On a build that leaves QEMU root, its uid is 0 and the
/// canary is read; without the view, the /tmp canary is.)
pub fn qemu_holds_no_host_powers(h: Host) {
    h.start(&[]).ok();
    assert_eq!(h.sh("echo up").trim(), "up", "the guest booted");
    let sandbox_dir = h.state_dir().join("sandboxes").join(h.name());
    let rec = h.record(&h.name()).expect("record");
    let runtime = &rec["runtime"];
    let pid = runtime["qemu"]["pid"]
        .as_i64()
        .expect("qemu pid")
        .to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let (uid_start, uid_count) = vm_range("/etc/subuid");
    let (gid_start, gid_count) = vm_range("/etc/subgid");
    let uids: Vec<u32> = field("Uid:")
        .iter()
        .map(|v| v.parse().expect("uid"))
        .collect();
    let gids: Vec<u32> = field("Gid:")
        .iter()
        .map(|v| v.parse().expect("gid"))
        .collect();
    let uid = uids[0];
    let gid = gids[0];
    assert!(
        uids.iter().all(|u| *u == uid) && (uid_start..uid_start + uid_count).contains(&uid),
        "QEMU's uids {uids:?} are not one id of the keystone-vm range {uid_start}+{uid_count}"
    );
    assert!(
        gids.iter().all(|g| *g == gid) && (gid_start..gid_start + gid_count).contains(&gid),
        "QEMU's gids {gids:?} are not one id of the keystone-vm range {gid_start}+{gid_count}"
    );
    assert_eq!(runtime["qemu_uid"].as_u64(), Some(u64::from(uid)));
    assert!(field("Groups:").is_empty(), "groups {:?}", field("Groups:"));
    for cap in ["CapEff:", "CapPrm:"] {
        assert_eq!(field(cap), ["0000000000000000"], "{cap} of QEMU");
    }
    // With QEMU's ids, what a guest that took QEMU over could reach.
    let canary = h.state_dir().join("canary-for-qemu");
    std::fs::write(&canary, "CANARY-QEMU").expect("canary");
    let disk = sandbox_dir.join("disk");
    let hook = h.project.join(".git/hooks/post-checkout");
    let supervisor = rec["owner"]["pid"].as_i64().expect("supervisor pid");
    let script = format!(
        "cat {canary} 2>&1; ls {disk} 2>&1; echo '#!/bin/sh' > {hook} 2>&1; kill -0 {supervisor} 2>&1; \
         kill -0 1 2>&1; cat /proc/{supervisor}/environ 2>&1 | head -c 64; echo; echo done",
        canary = canary.display(),
        disk = disk.display(),
        hook = hook.display(),
    );
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        "sh",
        "-c",
        &script,
    ]);
    let r = crate::harness::run_bounded(cmd, Duration::from_secs(20));
    let out = r.text();
    assert!(out.contains("done"), "{out}");
    assert!(
        !out.contains("CANARY-QEMU"),
        "QEMU's ids read a root file:\n{out}"
    );
    assert!(
        !hook.exists(),
        "QEMU's ids wrote a hook into the project:\n{out}"
    );
    assert_eq!(
        out.matches("Permission denied").count() + out.matches("Operation not permitted").count(),
        6,
        "every reach is refused:\n{out}"
    );
    let _ = std::fs::remove_file(&canary);
    // What any local user may read is hidden too: a world-readable canary
    // in /tmp and the sandboxes' directory are not in QEMU's view.
    let open_canary = tempfile::Builder::new()
        .prefix("ks-canary-qemu-")
        .tempfile_in("/tmp")
        .expect("canary");
    std::fs::write(open_canary.path(), "CANARY-QEMU-TMP").expect("write");
    std::fs::set_permissions(
        open_canary.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let mut cmd = std::process::Command::new("nsenter");
    cmd.args([
        &format!("--target={pid}"),
        "--mount",
        &format!("--setuid={uid}"),
        &format!("--setgid={gid}"),
        "sh",
        "-c",
        &format!(
            "cat {} 2>&1; ls -A /home /root /tmp {} 2>&1; echo done",
            open_canary.path().display(),
            sandbox_dir.parent().expect("sandboxes").display()
        ),
    ]);
    let r = crate::harness::run_bounded(cmd, Duration::from_secs(20));
    let out = r.text();
    assert!(out.trim_end().ends_with("done"), "{out}");
    assert!(
        !out.contains("CANARY-QEMU-TMP") && out.contains("No such file"),
        "QEMU's view has the host's /tmp:\n{out}"
    );
    assert!(
        !out.contains(&h.name()),
        "QEMU's view lists the sandboxes:\n{out}"
    );
    // A kernel and initrd of the user's own (backend.microvm.kernel,
    // .initrd), readable by root alone: QEMU, on its own id, boots them
    // from copies the supervisor made, by descriptor.
    h.ks(&["stop"]).ok();
    let image = rec["settings"]["image"].as_str().expect("image id");
    let own = h.tmp.path().join("own-boot");
    std::fs::create_dir_all(&own).expect("mkdir");
    let kernel = own.join("vmlinuz");
    std::fs::copy(
        h.cache.join(format!("keystone/microvm/{image}/vmlinuz")),
        &kernel,
    )
    .expect("copy the image's kernel");
    // An initramfs with nothing in it (the newc trailer alone): the
    // kernel unpacks it, finds no /init and mounts root= as before.
    let initrd = own.join("initrd.cpio");
    std::fs::write(&initrd, empty_newc_archive()).expect("initrd");
    for f in [&kernel, &initrd] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }
    let config = h.tmp.path().join("config/keystone/agent.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    h.write(
        &config,
        &text.replace(
            "[backend]\n",
            &format!(
                "[backend.microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n[backend]\n",
                kernel.display(),
                initrd.display()
            ),
        ),
    );
    h.start(&[]).ok();
    let rec = h.record(&h.name()).expect("record");
    let pid = rec["runtime"]["qemu"]["pid"].as_i64().expect("qemu pid");
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("qemu fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    let run = sandbox_dir.join("run");
    for name in ["kernel", "initrd"] {
        let want = run.join(name).display().to_string();
        assert!(targets.contains(&want), "QEMU holds no {want}: {targets:?}");
    }
    let dmesg = h.sh("sudo -n dmesg | grep -ci 'initrd' || true");
    assert_ne!(dmesg.trim(), "0", "the guest kernel saw no initrd");

    // The sandbox works under the drop: a commit comes home.
    h.sh(
        "cd /workspace && echo jailed > jailed.txt && git add jailed.txt && git commit -qm jailed",
    );
    h.ks(&["sync"]).ok();
    assert_eq!(
        std::fs::read_to_string(h.project.join("jailed.txt")).expect("synced"),
        "jailed\n"
    );
}

/// A cpio archive in the kernel's "newc" format holding no file: its
/// trailer entry alone, padded to a multiple of 4 bytes.
fn empty_newc_archive() -> Vec<u8> {
    let name = b"TRAILER!!!\0";
    let mut out = b"070701".to_vec();
    // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    for field in [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, name.len(), 0] {
        out.extend(format!("{field:08X}").bytes());
    }
    out.extend_from_slice(name);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    // Block-align like cpio does (the kernel does not need it).
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
    out
}
