//! The whole daemon in this process: sockets bound here, `daemon::run` in
//! a thread, driven over DNS, the proxy and the control socket, then
//! stopped with SIGTERM.

mod common;

use common::*;
use keystone_egress::daemon::{self, Options, Sockets};
use keystone_egress::{control, log};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn get(proxy: SocketAddr, hostport: &str) -> u16 {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req =
        format!("GET http://{hostport}/ HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status")
}

/// The rcode and, if any, the A address of the reply.
fn dns_udp(server: SocketAddr, name: &str) -> (u8, Option<Ipv4Addr>) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.send_to(&dns_query(0x4242, name, 1), server)
        .expect("send");
    let mut b = [0u8; 512];
    let n = s.recv(&mut b).expect("reply");
    parse_a(&b[..n])
}

fn dns_tcp(server: SocketAddr, name: &str) -> (u8, Option<Ipv4Addr>) {
    let mut s = TcpStream::connect(server).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let q = dns_query(0x4343, name, 1);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).expect("write");
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("len");
    let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut b).expect("reply");
    parse_a(&b)
}

fn parse_a(b: &[u8]) -> (u8, Option<Ipv4Addr>) {
    let an = u16::from_be_bytes([b[6], b[7]]);
    let ip = (an == 1).then(|| {
        let n = b.len();
        Ipv4Addr::new(b[n - 4], b[n - 3], b[n - 2], b[n - 1])
    });
    (b[3] & 0x0f, ip)
}

fn write_policy(path: &Path, allow: &[String], resolver: SocketAddr) {
    let spec = serde_json::json!({ "allow": allow, "resolver": resolver.to_string() });
    std::fs::write(path, spec.to_string()).expect("write policy");
}

#[test]
fn reload_widens_the_policy_without_a_restart() {
    keystone_egress::policy::allow_loopback_rules_for_tests();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let resolver = rt.block_on(resolver(&[("web.test", WEB_IP)]));
    let web = rt.block_on(web());
    let dir = tempfile::tempdir().expect("tmp");
    let policy_file = dir.path().join("policy.json");
    let log_file = dir.path().join("egress.log");
    let control_path = dir.path().join("control.sock");
    write_policy(&policy_file, &["127.0.0.0/8:*".into()], resolver.addr);

    let dns_udp_sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let dns_addr = dns_udp_sock.local_addr().expect("addr");
    let dns_tcp_l = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let dns_tcp_addr = dns_tcp_l.local_addr().expect("addr");
    let proxy_l = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy");
    let proxy = proxy_l.local_addr().expect("addr");
    let asked: Arc<Mutex<Vec<u16>>> = Arc::default();
    let rec = asked.clone();
    let options = Options {
        policy_file: policy_file.clone(),
        pool_file: dir.path().join("pool.json"),
        log_file: log_file.clone(),
        control: control_path.clone(),
        sandbox: "testbox".into(),
        bind_capture: Box::new(move |port| {
            rec.lock().expect("lock").push(port);
            std::net::TcpListener::bind("127.0.0.1:0")
        }),
    };
    let sockets = Sockets {
        dns_udp: dns_udp_sock,
        dns_tcp: dns_tcp_l,
        proxy: proxy_l,
        capture: Vec::new(),
    };
    let daemon = std::thread::spawn(move || daemon::run(sockets, options));
    let start = Instant::now();
    while !control_path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&control_path)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(*asked.lock().expect("lock"), vec![80, 443]);

    let hp = format!("web.test:{}", web.port);
    assert_eq!(dns_udp(dns_addr, "web.test"), (5, None));
    assert_eq!(get(proxy, &hp), 403);

    write_policy(
        &policy_file,
        &["127.0.0.0/8:*".into(), hp.clone()],
        resolver.addr,
    );
    control::reload(&control_path, Duration::from_secs(5)).expect("reload");
    assert_eq!(get(proxy, &hp), 200);
    let (rcode, ip) = dns_udp(dns_addr, "web.test");
    assert_eq!(rcode, 0);
    let ip = ip.expect("an A record");
    assert!(keystone_egress::pool::in_range(ip), "{ip}");
    assert_eq!(dns_tcp(dns_tcp_addr, "web.test"), (0, Some(ip)));
    assert_eq!(*asked.lock().expect("lock"), vec![80, 443, web.port]);

    // A bad file is an error and keeps the policy in force.
    std::fs::write(&policy_file, r#"{"allow":["bad rule"]}"#).expect("write");
    let e = control::reload(&control_path, Duration::from_secs(5)).expect_err("bad file");
    assert!(e.contains("policy file") && e.contains("bad rule"), "{e}");
    assert_eq!(get(proxy, &hp), 200);

    let events = log::tail(&log_file, 100);
    let dns: Vec<&str> = events
        .iter()
        .filter(|e| e.proto == "dns")
        .map(|e| e.decision.as_str())
        .collect();
    assert_eq!(dns, vec!["deny", "allow", "allow"]);

    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM)
        .expect("kill");
    daemon.join().expect("join").expect("run returns Ok");
    assert!(!control_path.exists());
    // The pool survived: the same name, the same address.
    let pool = keystone_egress::pool::FakePool::open(&dir.path().join("pool.json")).expect("pool");
    assert_eq!(pool.lookup(ip).as_deref(), Some("web.test"));
}

#[test]
fn a_bad_policy_file_at_start_names_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, r#"{"presets":["nope"]}"#).expect("write");
    let options = Options {
        policy_file: policy_file.clone(),
        pool_file: dir.path().join("pool.json"),
        log_file: dir.path().join("log"),
        control: dir.path().join("control.sock"),
        sandbox: "x".into(),
        bind_capture: Box::new(|_| std::net::TcpListener::bind("127.0.0.1:0")),
    };
    let sockets = Sockets {
        dns_udp: UdpSocket::bind("127.0.0.1:0").expect("udp"),
        dns_tcp: std::net::TcpListener::bind("127.0.0.1:0").expect("tcp"),
        proxy: std::net::TcpListener::bind("127.0.0.1:0").expect("proxy"),
        capture: Vec::new(),
    };
    let e = daemon::run(sockets, options).expect_err("bad policy");
    let msg = e.to_string();
    assert!(
        msg.contains(&policy_file.display().to_string()) && msg.contains("nope"),
        "{msg}"
    );
    assert!(control::reload(&dir.path().join("control.sock"), Duration::from_secs(1)).is_err());
}
