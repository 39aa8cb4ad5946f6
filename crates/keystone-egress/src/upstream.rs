//! Leaving the host: resolve on the host (never in the guest), drop
//! addresses no sandbox should reach, and connect to one pinned address.
//!
//! Every connection goes to an address from one answer for its name, so
//! there is no second lookup a rebinding DNS server could answer
//! differently (fullsend #265). An answer is reused by later connections
//! for at most its own TTL and never longer than [`CACHE_MAX_TTL`]
//! ([`Resolutions`]); every address is checked again on every connection,
//! cached or not. Loopback, private,
//! link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, our
//! own 198.18.0.0/15 and the IPv4-mapped forms of all of them are dropped
//! from the answer unless a CIDR allow rule covers that address and port:
//! an allowed public name that resolves to 10.0.0.5 is an SSRF attempt,
//! not an allowed connection.

use crate::dns;
use crate::policy::{Policy, Target};
use crate::HOST_SERVICE_NAME;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpStream, UdpSocket};

/// How long the configured resolver has to answer.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting (over every candidate address) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a host-side answer is reused, whatever its TTL says: a
/// name that moves is followed within this.
pub const CACHE_MAX_TTL: Duration = Duration::from_secs(30);
/// How long an answer of the host's own resolver (which gives no TTL) is
/// reused.
pub const SYSTEM_TTL: Duration = Duration::from_secs(5);
/// At most this many names are remembered.
pub const CACHE_ENTRIES: usize = 1024;

/// Host-side answers by (name, resolver), each until its TTL (at most
/// [`CACHE_MAX_TTL`]) runs out. Only what the resolver said is kept: the
/// address filter and the policy are applied on every connection. Failed
/// and empty lookups are not kept.
pub struct Resolutions {
    /// By resolver (which changes only on a reload), then by name, so a
    /// hit is looked up by `&str` without building a key.
    map: Mutex<HashMap<Option<SocketAddr>, HashMap<String, Cached>>>,
}

#[derive(Clone)]
struct Cached {
    addrs: Arc<[IpAddr]>,
    expires: Instant,
}

impl Default for Resolutions {
    fn default() -> Self {
        Resolutions::new()
    }
}

impl Resolutions {
    pub fn new() -> Resolutions {
        Resolutions {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The unexpired answer for `name` from `resolver`, as of `now`.
    pub fn get(
        &self,
        name: &str,
        resolver: Option<SocketAddr>,
        now: Instant,
    ) -> Option<Arc<[IpAddr]>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.get(&resolver)?.get(name)?;
        (c.expires > now).then(|| c.addrs.clone())
    }

    /// Keep `addrs` for `ttl` (capped at [`CACHE_MAX_TTL`]) from `now`.
    pub fn put(
        &self,
        name: &str,
        resolver: Option<SocketAddr>,
        addrs: &[IpAddr],
        ttl: Duration,
        now: Instant,
    ) {
        let ttl = ttl.min(CACHE_MAX_TTL);
        if addrs.is_empty() || ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Answers from a resolver a reload replaced are never asked for.
        map.retain(|r, _| *r == resolver);
        let names = map.entry(resolver).or_default();
        if names.len() >= CACHE_ENTRIES {
            names.retain(|_, c| c.expires > now);
            if names.len() >= CACHE_ENTRIES {
                // Still full of live answers: start again rather than
                // track ages; the next connections resolve afresh.
                names.clear();
            }
        }
        names.insert(
            name.to_string(),
            Cached {
                addrs: addrs.into(),
                expires: now + ttl,
            },
        );
    }

    /// Drop the answer for `name` (its addresses did not connect).
    pub fn forget(&self, name: &str, resolver: Option<SocketAddr>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(names) = map.get_mut(&resolver) {
            names.remove(name);
        }
    }

    /// How many answers are held (expired ones until they are swept).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .map(|m| m.values().map(HashMap::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
    resolve_ttl(name, resolver).await.map(|(v, _)| v)
}

/// [`resolve`], and how long the answer may be reused: the smallest TTL
/// of the records used ([`SYSTEM_TTL`] for the host's resolver).
async fn resolve_ttl(
    name: &str,
    resolver: Option<SocketAddr>,
) -> Result<(Vec<IpAddr>, Duration), String> {
    let Some(server) = resolver else {
        let addrs = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| format!("resolving {name} timed out"))?
            .map_err(|e| format!("resolving {name}: {e}"))?;
        let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        v.sort_by_key(|a| a.is_ipv6());
        v.dedup();
        return Ok((v, SYSTEM_TTL));
    };
    let (a, aaaa) = tokio::join!(
        query(server, name, dns::TYPE_A),
        query(server, name, dns::TYPE_AAAA)
    );
    // A family that failed outright makes the answer one not to keep:
    // the next connection asks again rather than miss that family.
    let ttl = match (&a, &aaaa) {
        (Ok(a), Ok(b)) => [a.ttl, b.ttl].into_iter().flatten().min().unwrap_or(0),
        _ => 0,
    };
    match (a, aaaa) {
        (Err(e), Err(_)) => Err(format!("resolving {name} with {server}: {e}")),
        (a, aaaa) => Ok((
            a.map(|x| x.addrs)
                .unwrap_or_default()
                .into_iter()
                .chain(aaaa.map(|x| x.addrs).unwrap_or_default())
                .collect(),
            Duration::from_secs(ttl.into()),
        )),
    }
}

async fn query(server: SocketAddr, name: &str, qtype: u16) -> Result<dns::Answer, String> {
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
            return dns::parse_answer(&buf[..n], id, name, qtype);
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
) -> Result<dns::Answer, String> {
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
    dns::parse_answer(&resp, id, name, qtype)
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
    connect_with(target, port, policy, resolver, None).await
}

/// [`connect`], reusing an unexpired answer `cache` holds for the name
/// (filtered again, as a fresh one would be) and keeping a new one there.
/// When no address of a kept answer connects, the name is resolved again
/// once.
pub async fn connect_cached(
    target: &Target,
    port: u16,
    policy: &Policy,
    resolver: Option<SocketAddr>,
    cache: &Resolutions,
) -> Result<(TcpStream, IpAddr), Refusal> {
    connect_with(target, port, policy, resolver, Some(cache)).await
}

async fn connect_with(
    target: &Target,
    port: u16,
    policy: &Policy,
    resolver: Option<SocketAddr>,
    cache: Option<&Resolutions>,
) -> Result<(TcpStream, IpAddr), Refusal> {
    let decision = policy.decide(target, port);
    if !decision.allowed {
        return Err(Refusal::denied(format!(
            "{target}:{port}: {}",
            decision.rule
        )));
    }
    match target {
        Target::Name(n) if n == HOST_SERVICE_NAME => {
            let Some(addr) = policy.host_service(port) else {
                return Err(Refusal::denied(format!("no host service on port {port}")));
            };
            dial(&[addr.ip()], port).await
        }
        Target::Name(n) => {
            if let Some(all) = cache.and_then(|c| c.get(n, resolver, Instant::now())) {
                match dial(&filtered(n, &all, port, policy)?, port).await {
                    Ok(x) => return Ok(x),
                    Err(r) => {
                        tracing::debug!(name = %n, "egress upstream: kept answer did not connect ({r}); resolving again");
                        if let Some(c) = cache {
                            c.forget(n, resolver);
                        }
                    }
                }
            }
            let t0 = Instant::now();
            let (all, ttl) = resolve_ttl(n, resolver).await.map_err(Refusal::failed)?;
            tracing::debug!(
                name = %n,
                resolve_us = t0.elapsed().as_micros() as u64,
                ttl_s = ttl.as_secs(),
                "egress timing: resolved"
            );
            if let Some(c) = cache {
                c.put(n, resolver, &all, ttl, Instant::now());
            }
            dial(&filtered(n, &all, port, policy)?, port).await
        }
        Target::Addr(a) => {
            if !usable(*a, port, policy) {
                return Err(Refusal::denied(format!("{a} may not be reached")));
            }
            dial(&[*a], port).await
        }
    }
}

/// Connect to `name:port` only if `cache` holds an unexpired answer for
/// it: `None` when it does not (nothing is sent to any resolver). For a
/// connection made before the client's first bytes are checked, which
/// must not put the name on the wire when those bytes are then refused.
/// A kept answer that does not connect is forgotten.
pub async fn dial_kept(
    name: &str,
    port: u16,
    policy: &Policy,
    resolver: Option<SocketAddr>,
    cache: &Resolutions,
) -> Option<Result<(TcpStream, IpAddr), Refusal>> {
    let target = Target::Name(name.to_string());
    if name == HOST_SERVICE_NAME || !policy.decide(&target, port).allowed {
        return None;
    }
    let all = cache.get(name, resolver, Instant::now())?;
    let r = match filtered(name, &all, port, policy) {
        Ok(ok) => dial(&ok, port).await,
        Err(r) => Err(r),
    };
    if matches!(&r, Err(e) if !e.denied) {
        cache.forget(name, resolver);
    }
    Some(r)
}

/// May a sandbox reach `ip` on `port` under `policy` (the address filter
/// of the module docs)?
pub fn may_reach(ip: IpAddr, port: u16, policy: &Policy) -> bool {
    usable(ip, port, policy)
}

/// The addresses of `n`'s answer `all` a sandbox may reach on `port`.
fn filtered(n: &str, all: &[IpAddr], port: u16, policy: &Policy) -> Result<Vec<IpAddr>, Refusal> {
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
    Ok(ok)
}

fn usable(ip: IpAddr, port: u16, policy: &Policy) -> bool {
    !is_special(ip) || policy.decide(&Target::Addr(ip), port).allowed
}

async fn dial(candidates: &[IpAddr], port: u16) -> Result<(TcpStream, IpAddr), Refusal> {
    let t0 = Instant::now();
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
    fn kept_answers_expire_and_are_bounded() {
        let c = Resolutions::new();
        let r = Some(SocketAddr::from(([192, 0, 2, 53], 53)));
        let a = [IpAddr::from([192, 0, 2, 7])];
        let t = Instant::now();
        c.put("a.test", r, &a, Duration::from_secs(1), t);
        assert_eq!(c.get("a.test", r, t).as_deref(), Some(&a[..]));
        let almost = t + Duration::from_millis(999);
        assert_eq!(c.get("a.test", r, almost).as_deref(), Some(&a[..]));
        assert_eq!(c.get("a.test", r, t + Duration::from_secs(1)), None);
        // Per resolver: another resolver's answer is not this one's.
        assert_eq!(c.get("a.test", None, t), None);
        // A TTL over the cap is cut to it.
        c.put("b.test", r, &a, Duration::from_secs(86400), t);
        assert!(c
            .get("b.test", r, t + CACHE_MAX_TTL - Duration::from_millis(1))
            .is_some());
        assert_eq!(c.get("b.test", r, t + CACHE_MAX_TTL), None);
        // TTL 0 and empty answers are not kept; forget drops one.
        c.put("c.test", r, &a, Duration::ZERO, t);
        c.put("d.test", r, &[], Duration::from_secs(5), t);
        assert_eq!((c.get("c.test", r, t), c.get("d.test", r, t)), (None, None));
        c.forget("a.test", r);
        assert_eq!(c.get("a.test", r, t), None);
        // Bounded: full of live answers, it starts again.
        for i in 0..CACHE_ENTRIES + 1 {
            c.put(&format!("n{i}.test"), r, &a, Duration::from_secs(5), t);
        }
        assert!(c.len() <= CACHE_ENTRIES, "{}", c.len());
        // A reload to another resolver drops the old one's answers.
        c.put("a.test", None, &a, Duration::from_secs(5), t);
        assert_eq!(c.len(), 1);
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
