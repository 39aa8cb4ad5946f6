//! The container sandbox's way out: pasta on its network namespace
//! (`--network nat`), or a veth pair on a host bridge with the guest's
//! DHCP client (`--network bridge`), both joined through C.

use keystone_backend::idmap::IdMap;
use keystone_backend::Instance;
use keystone_process::{Spawn, Supervised};
use nix::unistd::Pid;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// In the relay: join the sandbox's user and network namespaces through
/// C, which lives in both (G has moved on into the guest's nested user
/// namespace, where the network namespace is not its own to enter).
pub(super) fn enter_sandbox_network(c: Pid) -> Result<(), String> {
    // Both opened first: once in the sandbox's user namespace, where host
    // root is no mapped id, C's /proc entries are not ours to open.
    let open = |ns: &str| {
        let path = format!("/proc/{c}/ns/{ns}");
        fs::File::open(&path).map_err(|e| format!("{path}: {e}"))
    };
    let (user, net) = (open("user")?, open("net")?);
    nix::sched::setns(user, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("setns user: {e}"))?;
    nix::sched::setns(net, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns net: {e}"))
}

/// pasta on the sandbox's network namespace, joined through C (see
/// [`enter_sandbox_network`]).
pub(super) fn spawn_pasta(c: Pid, log: &fs::File, map: &IdMap) -> Result<Supervised, String> {
    let out = log.try_clone().map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new("pasta");
    if map.is_root() {
        // pasta drops to `nobody` when started as root, and nobody may not
        // join the sandbox's user namespace: it runs as the namespace's
        // owner, the range's first id (never host root). pasta still
        // confines itself (its own namespaces and seccomp filter). The
        // change of ids clears its death signal, so the caller puts it in
        // the sandbox's cgroup (`--runas 0` would not help: joining a user
        // namespace root does not own clears the signal as well).
        let (uid, gid) = map.root_on_host();
        cmd.args(["--runas", &format!("{uid}:{gid}")]);
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
    .arg(c.to_string())
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let mut pasta = Spawn::new("pasta", cmd)
        .start()
        .map_err(|e| e.to_string())?;
    // pasta configures the namespace before it settles; wait for the
    // interface so the guest has a network when start returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = pasta.try_wait() {
            return Err(format!(
                "pasta exited ({status:?}); see the sandbox's logs/container.log"
            ));
        }
        let routes = fs::read_to_string(format!("/proc/{c}/net/route")).unwrap_or_default();
        if routes
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pasta)
}

/// `--network bridge`: a veth pair, the host end on the bridge and the
/// other as the sandbox's eth0, then the guest's DHCP client (busybox
/// `udhcpc` from the image) inside the sandbox's namespaces, as a helper
/// that dies with the supervisor. The pair goes away with the sandbox's
/// network namespace: nothing can leak.
pub(super) fn attach_bridge(
    inst: &Instance,
    c: Pid,
    g: Pid,
    log: &fs::File,
) -> Result<Supervised, String> {
    let bridge = keystone_backend::hostbridge::named_bridge(inst).map_err(|e| e.to_string())?;
    let host_end = keystone_backend::hostbridge::link_name(&inst.id);
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
    // The guest's mount namespace (the client and the script it runs,
    // which writes the guest's /etc/resolv.conf, are the image's), PID,
    // UTS and IPC namespaces, but the sandbox's user namespace, through C:
    // only its root may configure the network (see `harden`).
    let ns = |p: Pid, n: &str| {
        format!(
            "--{n}=/proc/{p}/ns/{}",
            if n == "mount" { "mnt" } else { n }
        )
    };
    cmd.args([
        ns(c, "user"),
        ns(c, "net"),
        ns(g, "uts"),
        ns(g, "ipc"),
        ns(g, "pid"),
        ns(g, "mount"),
    ])
    .arg("--")
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
    Spawn::new("the DHCP client", cmd)
        .start()
        .map_err(|e| e.to_string())
}
