//! Test fixtures: a recording resolver, an HTTP upstream and an echo
//! upstream on 127.0.0.x, and small raw-socket clients.
#![allow(dead_code)]

use keystone_egress::log::DecisionLog;
use keystone_egress::policy::Spec;
use keystone_egress::pool::FakePool;
use keystone_egress::proxy::Ctx;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub const ECHO_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A DNS server that answers A from a map (NXDOMAIN otherwise), AAAA with
/// nothing, and records every name it is asked about.
pub struct Resolver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Resolver {
    pub fn names(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

pub async fn resolver(map: &[(&str, Ipv4Addr)]) -> Resolver {
    resolver_ttl(map, 5).await
}

/// [`resolver`], its A records with TTL `ttl`.
pub async fn resolver_ttl(map: &[(&str, Ipv4Addr)], ttl: u32) -> Resolver {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind resolver");
    let addr = sock.local_addr().expect("addr");
    let map: HashMap<String, Ipv4Addr> = map.iter().map(|(n, a)| (n.to_string(), *a)).collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let q = &buf[..n];
            let mut at = 12;
            let mut labels = Vec::new();
            while at < n && q[at] != 0 {
                let l = q[at] as usize;
                labels.push(String::from_utf8_lossy(&q[at + 1..at + 1 + l]).to_string());
                at += 1 + l;
            }
            let name = labels.join(".");
            let qtype = u16::from_be_bytes([q[at + 1], q[at + 2]]);
            rec.lock().expect("lock").push(name.clone());
            let mut r = q[..at + 5].to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            match (qtype, map.get(&name)) {
                (1, Some(ip)) => {
                    r[7] = 1;
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                    r.extend_from_slice(&ttl.to_be_bytes());
                    r.extend_from_slice(&[0, 4]);
                    r.extend_from_slice(&ip.octets());
                }
                (_, Some(_)) => {}
                (_, None) => r[3] = 0x83,
            }
            let _ = sock.send_to(&r, peer).await;
        }
    });
    Resolver { addr, seen }
}

/// An HTTP/1.1 server (keep-alive, no bodies) whose body echoes the
/// request line and Host; counts requests.
pub struct Web {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
}

pub async fn web() -> Web {
    let l = TcpListener::bind((WEB_IP, 0)).await.expect("bind web");
    let port = l.local_addr().expect("addr").port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let rec = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                loop {
                    let Some(head) = read_head(&mut s).await else {
                        return;
                    };
                    let line = head.lines().next().unwrap_or_default().to_string();
                    let host = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("host: ")
                                .or_else(|| l.strip_prefix("Host: "))
                        })
                        .unwrap_or("-")
                        .to_string();
                    rec.lock().expect("lock").push(head.clone());
                    let body = format!("seen {line} host={host}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Web { port, requests }
}

/// Echoes every byte back, and keeps them all.
pub struct Echo {
    pub port: u16,
    pub got: Arc<Mutex<Vec<u8>>>,
}

pub async fn echo() -> Echo {
    let l = TcpListener::bind((ECHO_IP, 0)).await.expect("bind echo");
    let port = l.local_addr().expect("addr").port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let rec = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    rec.lock().expect("lock").extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Echo { port, got }
}

/// Read up to the end of a head (`\r\n\r\n`), byte by byte so nothing
/// after it is consumed.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// A response: status, head, body (by Content-Length).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String, String) {
    let head = read_head(s).await.expect("response head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (status, head, String::from_utf8_lossy(&body).to_string())
}

/// A spec with test loopback rules allowed, compiled.
pub fn ctx(allow: &[&str], deny: &[&str], resolver: SocketAddr, log: &Path) -> Arc<Ctx> {
    keystone_egress::policy::allow_loopback_rules_for_tests();
    let spec = Spec {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
        resolver: Some(resolver.to_string()),
        ..Spec::default()
    };
    let policy = spec.compile().expect("compile");
    Arc::new(Ctx::new(
        policy,
        FakePool::in_memory(),
        DecisionLog::open(log).expect("log"),
        "testbox",
    ))
}

/// A DNS query for `name` (type `qtype`).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// Does the peer close (EOF) or reset within a few seconds?
pub async fn closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}
