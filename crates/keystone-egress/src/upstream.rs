//! Leaving the host: resolve on the host (never in the guest), drop
//! addresses no sandbox should reach, and connect to one pinned address.
//!
//! Every name is resolved once per connection and the connection goes to
//! an address from that answer, so there is no second lookup a rebinding
//! DNS server could answer differently (fullsend #265). Loopback, private,
//! link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, our
//! own 198.18.0.0/15 and the IPv4-mapped forms of all of them are dropped
//! from the answer unless a CIDR allow rule covers that address and port:
//! an allowed public name that resolves to 10.0.0.5 is an SSRF attempt,
//! not an allowed connection.

use crate::dns;
use crate::policy::{Policy, Target};
use crate::HOST_SERVICE_NAME;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpStream, UdpSocket};

/// How long the configured resolver has to answer.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting (over every candidate address) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no connection was made: for the log and the 403/502 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub reason: String,
    /// The policy (or the address filter) said no, rather than the network
    /// failing: 403 rather than 502.
    pub denied: bool,
}

impl Refusal {
    fn denied(reason: String) -> Refusal {
        Refusal {
            reason,
            denied: true,
        }
    }
    fn failed(reason: String) -> Refusal {
        Refusal {
            reason,
            denied: false,
        }
    }
}

/// Addresses no sandbox reaches unless a CIDR rule names them: see the
/// module docs.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return special_v4(v4);
            }
            let s = a.segments();
            // IPv4-compatible ::a.b.c.d (deprecated, still routed by some
            // stacks), ::, ::1 all live in ::/96.
            if s[..6] == [0; 6] {
                return true;
            }
            // NAT64 64:ff9b::/96 carries an IPv4 address too.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
                let o = a.octets();
                return special_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
                || (s[0] & 0xff00) == 0xff00 // multicast
                || a == Ipv6Addr::UNSPECIFIED
                || a == Ipv6Addr::LOCALHOST
        }
    }
}

fn special_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 0 // 0.0.0.0/8
        || o[0] == 127
        || o[0] == 10
        || (o[0] == 172 && (o[1] & 0xf0) == 16)
        || (o[0] == 192 && o[1] == 168)
        || (o[0] == 169 && o[1] == 254)
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // our pool, 198.18/15
        || o[0] >= 224 // multicast 224/4, reserved 240/4, broadcast
}

fn random_id() -> u16 {
    // RandomState is seeded from the OS per instance: enough for a query
    // ID (the socket is connected, so only the resolver can answer).
    let mut h = RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u16
}

/// Resolve `name` with `resolver` (A and AAAA over UDP, in parallel) or
/// the host's resolver. Addresses are returned A first.
pub async fn resolve(name: &str, resolver: Option<SocketAddr>) -> Result<Vec<IpAddr>, String> {
    let Some(server) = resolver else {
        let addrs = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| format!("resolving {name} timed out"))?
            .map_err(|e| format!("resolving {name}: {e}"))?;
        let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        v.sort_by_key(|a| a.is_ipv6());
        v.dedup();
        return Ok(v);
    };
    let (a, aaaa) = tokio::join!(
        query(server, name, dns::TYPE_A),
        query(server, name, dns::TYPE_AAAA)
    );
    match (a, aaaa) {
        (Err(e), Err(_)) => Err(format!("resolving {name} with {server}: {e}")),
        (a, aaaa) => Ok(a
            .unwrap_or_default()
            .into_iter()
            .chain(aaaa.unwrap_or_default())
            .collect()),
    }
}

async fn query(server: SocketAddr, name: &str, qtype: u16) -> Result<Vec<IpAddr>, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    let id = random_id();
    sock.send(&dns::build_query(id, name, qtype))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(RESOLVE_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            // A reply to another ID (a stray or a spoof): keep waiting.
            if n >= 2 && buf[..2] != id.to_be_bytes() {
                continue;
            }
            // Truncated: ask again over TCP (same ID, same question).
            if n >= 4 && buf[2] & 0x02 != 0 {
                return query_tcp(server, id, name, qtype).await;
            }
            return dns::parse_response(&buf[..n], id, name, qtype);
        }
    })
    .await
    .map_err(|_| "timed out".to_string())?
}

async fn query_tcp(
    server: SocketAddr,
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<Vec<IpAddr>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let q = dns::build_query(id, name, qtype);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let mut resp = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut resp)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    dns::parse_response(&resp, id, name, qtype)
}

/// Connect to `target:port` for a sandbox: host services to their
/// loopback address, names resolved here and filtered, IP literals as they
/// are. The policy is checked again (deny wins). Returns the stream
/// (TCP_NODELAY set) and the address it went to.
pub async fn connect(
    target: &Target,
    port: u16,
    policy: &Policy,
    resolver: Option<SocketAddr>,
) -> Result<(TcpStream, IpAddr), Refusal> {
    let decision = policy.decide(target, port);
    if !decision.allowed {
        return Err(Refusal::denied(format!(
            "{target}:{port}: {}",
            decision.rule
        )));
    }
    let candidates: Vec<IpAddr> = match target {
        Target::Name(n) if n == HOST_SERVICE_NAME => {
            let Some(addr) = policy.host_service(port) else {
                return Err(Refusal::denied(format!("no host service on port {port}")));
            };
            return dial(&[addr.ip()], port).await;
        }
        Target::Name(n) => {
            let t0 = std::time::Instant::now();
            let all = resolve(n, resolver).await.map_err(Refusal::failed)?;
            tracing::debug!(name = %n, resolve_us = t0.elapsed().as_micros() as u64, "egress timing: resolved");
            if all.is_empty() {
                return Err(Refusal::failed(format!("{n} has no address")));
            }
            let ok: Vec<IpAddr> = all
                .iter()
                .copied()
                .filter(|ip| usable(*ip, port, policy))
                .collect();
            if ok.is_empty() {
                let shown: Vec<String> = all.iter().map(|a| a.to_string()).collect();
                return Err(Refusal::denied(format!(
                    "{n} resolves only to addresses a sandbox may not reach ({}); allow them with a CIDR rule if that is intended",
                    shown.join(", ")
                )));
            }
            ok
        }
        Target::Addr(a) => {
            if !usable(*a, port, policy) {
                return Err(Refusal::denied(format!("{a} may not be reached")));
            }
            vec![*a]
        }
    };
    dial(&candidates, port).await
}

fn usable(ip: IpAddr, port: u16, policy: &Policy) -> bool {
    !is_special(ip) || policy.decide(&Target::Addr(ip), port).allowed
}

async fn dial(candidates: &[IpAddr], port: u16) -> Result<(TcpStream, IpAddr), Refusal> {
    let t0 = std::time::Instant::now();
    let attempt = async {
        let mut last = String::from("no address");
        for ip in candidates {
            match TcpStream::connect((*ip, port)).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, *ip));
                }
                Err(e) => last = format!("{ip}:{port}: {e}"),
            }
        }
        Err(Refusal::failed(format!("connect {last}")))
    };
    let r = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| Refusal::failed(format!("connect to port {port} timed out")))?;
    tracing::debug!(
        port,
        dial_us = t0.elapsed().as_micros() as u64,
        "egress timing: dialled"
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The reply to `q`: TC set and no answer, or one A 192.0.2.7.
    fn reply(q: &[u8], truncated: bool) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] = if truncated { 0x83 } else { 0x81 };
        r[3] = 0x80;
        if !truncated && u16::from_be_bytes([q[q.len() - 4], q[q.len() - 3]]) == dns::TYPE_A {
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 9, 0, 4, 192, 0, 2, 7]);
        }
        r
    }

    #[tokio::test]
    async fn configured_resolver_and_tcp_retry_on_truncation() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let addr = udp.local_addr().expect("addr");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("tcp");
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, peer)) = udp.recv_from(&mut b).await {
                let _ = udp.send_to(&reply(&b[..n], true), peer).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if s.read_exact(&mut q).await.is_err() {
                    continue;
                }
                let r = reply(&q, false);
                let mut out = (r.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&r);
                let _ = s.write_all(&out).await;
            }
        });
        let got = resolve("big.example.com", Some(addr))
            .await
            .expect("resolve");
        assert_eq!(got, vec![IpAddr::from([192, 0, 2, 7])]);
    }

    #[tokio::test]
    async fn silent_resolver_times_out() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let addr = udp.local_addr().expect("addr");
        let start = std::time::Instant::now();
        assert!(resolve("a.example.com", Some(addr)).await.is_err());
        assert!(start.elapsed() < RESOLVE_TIMEOUT + Duration::from_secs(1));
        drop(udp);
    }

    #[test]
    fn special_ranges() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "198.18.0.5",
            "198.19.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
        ] {
            assert!(is_special(a.parse().expect(a)), "{a}");
        }
        for a in [
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "198.20.0.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
        ] {
            assert!(!is_special(a.parse().expect(a)), "{a}");
        }
    }
}
