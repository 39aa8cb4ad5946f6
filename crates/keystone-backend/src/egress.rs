//! The egress point of a sandbox whose `[egress]` is the allowlist, for
//! the backends that run on this host (container, microVM).
//!
//! Two children of the supervisor, forked while it is single-threaded:
//!
//! - the **socket factory** makes the *egress namespace*, a network
//!   namespace at the other end of the guest's only link: a veth pair
//!   from the container's namespace (the egress namespace belongs to C's
//!   user namespace, whose root the guest is not), or the tap QEMU is
//!   given (a namespace of the factory's own). It routes *every* address
//!   there to loopback (`local 0.0.0.0/0`, `local ::/0`, as srt's
//!   transparent mode does), binds the DNS, proxy and capture sockets
//!   and hands them over with SCM_RIGHTS. The guest's own ports stay its
//!   own (a capture on :22 does not take its sshd's). It then waits, single-threaded, to bind the capture
//!   ports a widened policy needs (a multi-threaded process may not join
//!   a user namespace, and a rootless daemon may not enter the sandbox's
//!   network namespace at all);
//! - the **daemon** stays in the host's namespaces, serves those sockets
//!   with [`keystone_egress::daemon::run`] and is the only thing that
//!   connects anywhere.
//!
//! The egress namespace has no interface but loopback and the guest's
//! link, and forwarding is off: whatever the guest sends,
//! on any protocol and to any address, either reaches a socket the daemon
//! serves or goes nowhere. Routes, resolv.conf or hosts files the guest
//! rewrites change nothing of that (the container's guest root holds no
//! capability over either namespace; the microVM's rewrites only its own
//! kernel's tables).

use crate::{plumbing, BackendError, Instance};
use keystone_egress::policy::Spec;
use keystone_process::Supervised;
use nix::sys::socket::{
    self, recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};
use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The files of a sandbox's egress point, in its directory. The CLI
/// writes the policy; the daemon owns the rest.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
    /// The policy ([`Spec`] as JSON): host-side state only the CLI writes.
    pub policy: PathBuf,
    /// The synthetic addresses handed out, kept across restarts.
    pub pool: PathBuf,
    /// Every decision, as JSON lines.
    pub log: PathBuf,
    /// The daemon's control socket (`reload`).
    pub control: PathBuf,
}

/// Where a sandbox's egress files are.
pub fn paths(sandbox_dir: &Path) -> Paths {
    let dir = sandbox_dir.join("egress");
    Paths {
        policy: dir.join("policy.json"),
        pool: dir.join("pool.json"),
        log: dir.join("decisions.jsonl"),
        control: dir.join("control.sock"),
        dir,
    }
}

/// The policy file as the CLI wrote it.
pub fn read_policy(paths: &Paths) -> Result<Spec, BackendError> {
    let text = fs::read_to_string(&paths.policy)
        .map_err(BackendError::io(paths.policy.display().to_string()))?;
    serde_json::from_str(&text).map_err(|e| {
        BackendError::Failed(format!(
            "{}: not an egress policy ({e}); start the sandbox again to rewrite it",
            paths.policy.display()
        ))
    })
}

/// The guest's side of its link to the egress point's namespace (eth0 of
/// a container, eth1 of a microVM), and the gateway there.
pub const GUEST_LINK: &str = "10.0.3.15/24";
pub const GATEWAY_LINK: &str = "10.0.3.2/24";
pub const GATEWAY_LINK_IP: &str = "10.0.3.2";

/// Where the guest's traffic comes from.
pub enum Place {
    /// A container: C's user and network namespaces, opened by the
    /// caller. The egress namespace is made inside C's user namespace
    /// (whose root the guest is not: its own is nested below), and a
    /// veth pair joins it to C's network namespace, where its end is the
    /// guest's eth0 and default route.
    Container { user: fs::File, net: fs::File },
    /// A microVM: a network namespace of the factory's own holding the
    /// tap QEMU is given, the guest's eth1.
    Tap,
}

/// The running egress point.
pub struct Egress {
    pub factory: Supervised,
    pub daemon: Supervised,
    /// With [`Place::Tap`]: the tap, for QEMU to inherit.
    pub tap: Option<OwnedFd>,
    /// The daemon's control socket, removed when this is dropped (a
    /// daemon killed outright cannot remove it itself).
    pub control: ControlSocket,
}

/// The path of an egress point's control socket, removed on drop.
#[derive(Debug)]
pub struct ControlSocket(PathBuf);

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The guest link's name inside the egress namespace (alone there).
const TAP: &str = "ks0";
/// At most this many capture ports (one SCM_RIGHTS message carries 253
/// descriptors).
const MAX_PORTS: usize = 200;

/// Start the egress point of `inst` (its policy file must exist).
pub fn start(inst: &Instance, log: &fs::File, place: Place) -> Result<Egress, BackendError> {
    let paths = paths(&inst.dir);
    let spec = read_policy(&paths)?;
    let policy = spec
        .compile()
        .map_err(|e| BackendError::Failed(format!("{}: {e}", paths.policy.display())))?;
    let ports: Vec<u16> = policy
        .ports()
        .into_iter()
        .filter(|p| *p != 53 && *p != keystone_egress::PROXY_PORT)
        .collect();
    if ports.len() > MAX_PORTS {
        return Err(BackendError::Failed(format!(
            "the egress policy allows {} ports; at most {MAX_PORTS} can be captured (use `HOST:*` rules, which go through the proxy)",
            ports.len()
        )));
    }
    let _ = fs::remove_file(&paths.control);
    let tap_wanted = matches!(place, Place::Tap);
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let parent = nix::unistd::getpid();
    // SAFETY: the supervisor is single-threaded when it forks; the child
    // enters namespaces, runs `ip`, binds sockets and serves requests.
    let factory = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            plumbing::redirect_stdio(log);
            let _ =
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
            keystone_process::unblock_all_signals();
            let r = factory_main(&theirs, place, &ports, parent);
            if let Err(e) = &r {
                eprintln!("keystone egress factory: {e}");
                let _ = send(&theirs, format!("error: {e}").as_bytes(), &[]);
            }
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => Supervised::adopt("egress factory", child)?,
    };
    drop(theirs);
    let _ = setsockopt(
        &ours,
        sockopt::ReceiveTimeout,
        &timeval(Duration::from_secs(10)),
    );
    let (data, mut fds) = recv(&ours).map_err(|e| {
        BackendError::Failed(format!(
            "the egress point's namespace was not set up ({e}); see the sandbox's logs"
        ))
    })?;
    let reply = String::from_utf8_lossy(&data).to_string();
    if let Some(e) = reply.strip_prefix("error: ") {
        return Err(BackendError::Failed(format!("egress point: {e}")));
    }
    let want = 3 + usize::from(tap_wanted) + ports.len();
    if reply != "ok" || fds.len() != want {
        return Err(BackendError::Failed(format!(
            "egress point: the factory sent {:?} with {} descriptors, not {want}",
            reply,
            fds.len()
        )));
    }
    let capture: Vec<OwnedFd> = fds.split_off(3 + usize::from(tap_wanted));
    let tap = tap_wanted.then(|| fds.pop()).flatten();
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let sockets = keystone_egress::daemon::Sockets {
        dns_udp: std::net::UdpSocket::from(next()),
        dns_tcp: std::net::TcpListener::from(next()),
        proxy: std::net::TcpListener::from(next()),
        capture: ports
            .iter()
            .copied()
            .zip(capture.into_iter().map(std::net::TcpListener::from))
            .collect(),
    };
    let daemon = spawn_daemon(inst, log, &paths, sockets, ours, parent, tap.as_ref())?;
    // The sockets already listen, so the guest may use them at once; wait
    // only for the daemon to have read its policy (its control socket),
    // so that a policy it refuses fails the start rather than every
    // connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut daemon = daemon;
    while !paths.control.exists() {
        if let Some(status) = daemon.try_wait() {
            return Err(BackendError::Failed(format!(
                "the egress point exited ({status:?}): {}",
                plumbing::tail(&inst.log_dir().join("egress.log"), 5)
            )));
        }
        if Instant::now() > deadline {
            return Err(BackendError::NoAnswer(
                "the egress point did not come up in 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Egress {
        factory,
        daemon,
        tap,
        control: ControlSocket(paths.control),
    })
}

/// Fork the daemon: host namespaces, the sockets, the factory's end for
/// later capture ports.
fn spawn_daemon(
    inst: &Instance,
    log: &fs::File,
    paths: &Paths,
    sockets: keystone_egress::daemon::Sockets,
    factory: OwnedFd,
    parent: nix::unistd::Pid,
    tap: Option<&OwnedFd>,
) -> Result<Supervised, BackendError> {
    // SAFETY: as above; the child starts its own threads only after fork.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            plumbing::redirect_stdio(log);
            let _ =
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
            keystone_process::unblock_all_signals();
            if let Some(tap) = tap {
                // QEMU's, not ours: holding it would keep the link up.
                let _ = nix::unistd::close(tap.as_raw_fd());
            }
            let r = (|| -> Result<(), String> {
                keystone_process::arm_death_signal(nix::sys::signal::Signal::SIGKILL, parent)
                    .map_err(|e| format!("death signal: {e}"))?;
                let factory = Mutex::new(factory);
                let options = keystone_egress::daemon::Options {
                    policy_file: paths.policy.clone(),
                    pool_file: paths.pool.clone(),
                    log_file: paths.log.clone(),
                    control: paths.control.clone(),
                    sandbox: inst.name.clone(),
                    bind_capture: Box::new(move |port| {
                        let factory = factory.lock().unwrap_or_else(|p| p.into_inner());
                        request_port(&factory, port)
                    }),
                };
                keystone_egress::daemon::run(sockets, options).map_err(|e| e.to_string())
            })();
            if let Err(e) = &r {
                eprintln!("keystone egress: {e}");
            }
            // SAFETY: _exit in a forked child.
            unsafe { libc::_exit(if r.is_ok() { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => Ok(Supervised::adopt("egress point", child)?),
    }
}

/// Ask the factory for one more capture listener.
fn request_port(factory: &OwnedFd, port: u16) -> std::io::Result<std::net::TcpListener> {
    send(factory, format!("bind {port}").as_bytes(), &[])?;
    let (data, mut fds) = recv(factory)?;
    match (data.as_slice(), fds.pop()) {
        (b"ok", Some(fd)) => Ok(std::net::TcpListener::from(fd)),
        (other, _) => Err(std::io::Error::other(format!(
            "capture port {port}: {}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// The factory, in its child: enter or make the namespace, set it up,
/// bind, hand over, then serve `bind PORT` until the daemon goes away.
fn factory_main(
    sock: &OwnedFd,
    place: Place,
    ports: &[u16],
    parent: nix::unistd::Pid,
) -> Result<(), String> {
    let tap = match place {
        Place::Container { user, net } => {
            nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER)
                .map_err(|e| format!("setns user: {e}"))?;
            // Become the namespace's root: host root is no id there, and
            // `ip` would lose every capability at exec. (The host's
            // supplementary groups go too, where the namespace allows it.)
            let root_gid = nix::unistd::Gid::from_raw(0);
            let _ = nix::unistd::setgroups(&[]);
            nix::unistd::setresgid(root_gid, root_gid, root_gid)
                .map_err(|e| format!("setresgid 0 in the sandbox: {e}"))?;
            let root = nix::unistd::Uid::from_raw(0);
            nix::unistd::setresuid(root, root, root)
                .map_err(|e| format!("setresuid 0 in the sandbox: {e}"))?;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare net: {e}"))?;
            let own = fs::File::open("/proc/self/ns/net")
                .map_err(|e| format!("/proc/self/ns/net: {e}"))?;
            // `ip` inherits C's namespace as its own descriptor.
            let n = net.as_raw_fd();
            nix::fcntl::fcntl(
                n,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(|e| format!("fcntl: {e}"))?;
            ip_batch(&format!(
                "link add {TAP} type veth peer name eth0 netns /proc/self/fd/{n}\n\
                 link set {TAP} up\naddr add {GATEWAY_LINK} dev {TAP}\n"
            ))?;
            nix::sched::setns(&net, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns net: {e}"))?;
            ip_batch(&format!(
                "link set lo up\nlink set eth0 up\naddr add {GUEST_LINK} dev eth0\n\
                 route add default via {GATEWAY_LINK_IP} dev eth0\n"
            ))?;
            // The guest gets no IPv6 on its link: nothing to route it to.
            let _ = fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1");
            nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns net (back): {e}"))?;
            None
        }
        Place::Tap => {
            own_namespace()?;
            let tap = crate::tap::open(TAP).map_err(|e| e.to_string())?;
            ip_batch(&format!(
                "link set {TAP} up\naddr add {GATEWAY_LINK} dev {TAP}\n"
            ))?;
            Some(tap)
        }
    };
    // Joining or making a user namespace clears the death signal: arm it
    // (and re-check the parent) after.
    keystone_process::arm_death_signal(nix::sys::signal::Signal::SIGKILL, parent)
        .map_err(|e| format!("death signal: {e}"))?;
    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"), "1");
    // Every address is this namespace's own; nothing is forwarded.
    ip_batch("link set lo up\nroute add local 0.0.0.0/0 dev lo table main\n")?;
    // A host with IPv6 off has no ::/0 to route: then no IPv6 at all.
    let _ = ip_batch("route add local ::/0 dev lo table main\n");
    // The kernel would answer every echo request itself (every address is
    // local): a ping must fail, not pretend to reach the world.
    let _ = fs::write("/proc/sys/net/ipv4/icmp_echo_ignore_all", "1");
    let _ = fs::write("/proc/sys/net/ipv4/ip_forward", "0");

    let gw = keystone_egress::GATEWAY;
    let mut fds: Vec<OwnedFd> = vec![
        bind_v4(SockType::Datagram, gw, 53)?,
        bind_v4(SockType::Stream, gw, 53)?,
        bind_v4(SockType::Stream, gw, keystone_egress::PROXY_PORT)?,
    ];
    if let Some(tap) = tap {
        fds.push(tap);
    }
    for port in ports {
        fds.push(capture(*port)?);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    send(sock, b"ok", &raw).map_err(|e| format!("hand over: {e}"))?;
    drop(fds);
    loop {
        let (data, _) = match recv(sock) {
            Ok(m) => m,
            Err(e) => return Err(format!("read a request: {e}")),
        };
        if data.is_empty() {
            return Ok(()); // the daemon is gone
        }
        let text = String::from_utf8_lossy(&data).to_string();
        let reply = text
            .strip_prefix("bind ")
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| format!("not a request: {text:?}"))
            .and_then(capture);
        match reply {
            Ok(fd) => send(sock, b"ok", &[fd.as_raw_fd()]),
            Err(e) => send(sock, e.as_bytes(), &[]),
        }
        .map_err(|e| format!("reply: {e}"))?;
    }
}

/// A network namespace of our own: as root just that; otherwise inside a
/// user namespace of our own, where we are root over it.
fn own_namespace() -> Result<(), String> {
    use nix::sched::{unshare, CloneFlags};
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    if uid.is_root() {
        return unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare net: {e}"));
    }
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare user+net: {e}"))?;
    let write = |file: &str, text: String| {
        fs::write(format!("/proc/self/{file}"), text).map_err(|e| format!("{file}: {e}"))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1"))?;
    write("gid_map", format!("0 {gid} 1"))
}

/// `ip -batch -` in the current namespaces.
fn ip_batch(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .spawn()
        .map_err(|e| format!("ip: {e} (apt-get install iproute2)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("ip: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            script.trim().replace('\n', "; "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A socket on `addr:port` whether or not `addr` is an interface's: every
/// address routes to loopback here, but only from the main table, which
/// `bind` does not consult.
fn bind_v4(kind: SockType, addr: Ipv4Addr, port: u16) -> Result<OwnedFd, String> {
    let fd = socket::socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| format!("IP_FREEBIND: {e}"))?;
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(addr, port)),
    )
    .map_err(|e| format!("bind {addr}:{port}: {e}"))?;
    if kind == SockType::Stream {
        socket::listen(&fd, socket::Backlog::new(128).expect("valid backlog"))
            .map_err(|e| format!("listen {addr}:{port}: {e}"))?;
    }
    Ok(fd)
}

/// The capture listener for `port`: every address, both families (one
/// dual-stack socket; IPv4 alone where the host has no IPv6).
fn capture(port: u16) -> Result<OwnedFd, String> {
    let listen = |fd: &OwnedFd| {
        socket::listen(fd, socket::Backlog::new(128).expect("valid backlog"))
            .map_err(|e| format!("listen :{port}: {e}"))
    };
    if let Ok(fd) = socket::socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        )
        .map_err(|e| format!("bind [::]:{port}: {e}"))?;
        listen(&fd)?;
        return Ok(fd);
    }
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .map_err(|e| format!("bind 0.0.0.0:{port}: {e}"))?;
    listen(&fd)?;
    Ok(fd)
}

fn send(sock: &OwnedFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// One message and the descriptors it carried (empty data: the peer is
/// gone).
fn recv(sock: &OwnedFd) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut space = nix::cmsg_space!([RawFd; 256]);
    let (len, raw) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut raw = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw.extend(fds);
            }
        }
        (msg.bytes, raw)
    };
    buf.truncate(len);
    // SAFETY: SCM_RIGHTS gave us new descriptors that nothing else owns.
    let fds = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((buf, fds))
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(d.as_secs() as i64, d.subsec_micros() as i64)
}
