//! The guest's resolver, answered on the host from the policy alone.
//!
//! Nothing is ever forwarded or recursed: an allowed name gets its
//! [`FakePool`] address, every other question gets REFUSED with a reply
//! whose shape does not depend on the name (no NXDOMAIN-vs-exists oracle),
//! so no query name (the classic exfiltration channel) leaves the host.
//!
//! The wire format is parsed by hand, strictly: one question, no
//! compression in it, labels of LDH plus `_` only (a name with a space, CR
//! or LF is REFUSED, so it can never reach a CONNECT line or a log line
//! unescaped). Hand-written rather than `hickory-proto`, which pulls `url`,
//! `idna` and its ICU tables into the build for the forty lines needed
//! here. The same module builds and parses the host-side queries that
//! [`crate::upstream`] sends to a configured resolver.

use crate::policy::{Decision, Policy};
use crate::pool::FakePool;
use crate::proxy::Ctx;
use crate::HOST_SERVICE_NAME;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NOERROR: u8 = 0;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;
/// TTL of an A answer: short, so a reload that narrows the policy is
/// soon seen by the guest's cache (the address stays the name's anyway).
pub const TTL: u32 = 60;
/// How long a TCP client may take to send each query.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed query: the header fields we echo and the one question.
struct Query<'a> {
    id: u16,
    opcode: u8,
    rd: bool,
    /// The question exactly as sent (name, type, class), echoed back.
    question: &'a [u8],
    labels: Vec<&'a [u8]>,
    qtype: u16,
    qclass: u16,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// `None` for garbage: too short, a response, not exactly one question,
/// answers or authority records in a query, compression or reserved label
/// types in the question, a name over 255 bytes.
fn parse_query(b: &[u8]) -> Option<Query<'_>> {
    if b.len() < 12 {
        return None;
    }
    let id = be16(b, 0)?;
    let flags = b[2];
    if flags & 0x80 != 0 {
        return None; // QR: a response
    }
    let (qd, an, ns) = (be16(b, 4)?, be16(b, 6)?, be16(b, 8)?);
    if qd != 1 || an != 0 || ns != 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *b.get(at)? as usize;
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None; // compression pointer or reserved label type
        }
        labels.push(b.get(at + 1..at + 1 + len)?);
        at += 1 + len;
        if at - 12 > 255 {
            return None;
        }
    }
    let qtype = be16(b, at)?;
    let qclass = be16(b, at + 2)?;
    Some(Query {
        id,
        opcode: (flags >> 3) & 0x0f,
        rd: flags & 0x01 != 0,
        question: &b[12..at + 4],
        labels,
        qtype,
        qclass,
    })
}

/// The name as a string if every byte is LDH or `_`; else `None`.
fn label_name(labels: &[&[u8]]) -> Option<String> {
    if labels.is_empty() {
        return None;
    }
    let ok = labels.iter().all(|l| {
        l.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    });
    ok.then(|| {
        labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(".")
    })
}

/// What one query was, for the log.
pub struct Outcome {
    /// The name asked for (escaped if it had bytes outside LDH/`_`).
    pub name: String,
    pub qtype: u16,
    pub decision: Decision,
}

fn reply(q: &Query<'_>, aa: bool, rcode: u8, answer: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + q.question.len() + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, the query's opcode, AA when we answer for the name, RD echoed;
    // RA=0: we never recurse.
    out.push(0x80 | (q.opcode << 3) | if aa { 0x04 } else { 0 } | u8::from(q.rd));
    out.push(rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(q.question);
    if let Some(ip) = answer {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// Answer one query from the policy: see the module docs. `None` means
/// drop it (malformed).
pub fn answer(query: &[u8], policy: &Policy, pool: &FakePool) -> Option<Vec<u8>> {
    answer_with_outcome(query, policy, pool).map(|(r, _)| r)
}

/// [`answer`], also saying what was decided (for the log).
pub fn answer_with_outcome(
    query: &[u8],
    policy: &Policy,
    pool: &FakePool,
) -> Option<(Vec<u8>, Outcome)> {
    let q = parse_query(query)?;
    let refused = |name: String, why: &str| {
        let r = reply(&q, false, RCODE_REFUSED, None);
        let o = Outcome {
            name,
            qtype: q.qtype,
            decision: Decision {
                allowed: false,
                rule: why.to_string(),
            },
        };
        (r, o)
    };
    let Some(name) = label_name(&q.labels) else {
        let shown = q
            .labels
            .iter()
            .map(|l| l.escape_ascii().to_string())
            .collect::<Vec<_>>()
            .join(".");
        return Some(refused(shown, "not a valid host name"));
    };
    if q.opcode != 0 {
        return Some(refused(name, "not a standard query"));
    }
    if q.qclass != CLASS_IN {
        return Some(refused(name, "class is not IN"));
    }
    let decision = if name == HOST_SERVICE_NAME && !policy.has_host_services() {
        Decision {
            allowed: false,
            rule: "no host services".into(),
        }
    } else {
        policy.name_decision(&name)
    };
    if !decision.allowed {
        let why = decision.rule.clone();
        return Some(refused(name, &why));
    }
    let r = if q.qtype == TYPE_A {
        match pool.assign(&name) {
            Some(ip) => reply(&q, true, RCODE_NOERROR, Some(ip)),
            None => reply(&q, false, RCODE_SERVFAIL, None),
        }
    } else {
        // AAAA and everything else: the name exists, with no such data.
        reply(&q, true, RCODE_NOERROR, None)
    };
    Some((
        r,
        Outcome {
            name,
            qtype: q.qtype,
            decision,
        },
    ))
}

fn record(ctx: &Ctx, o: &Outcome) {
    ctx.log.record("dns", &o.name, 53, &o.decision);
}

/// Answer queries on `sock` until the task is dropped.
pub async fn serve_udp(sock: UdpSocket, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns udp: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let t0 = std::time::Instant::now();
        let policy = ctx.policy();
        let Some((resp, outcome)) = answer_with_outcome(&buf[..n], &policy, &ctx.pool) else {
            tracing::debug!(%peer, "dns udp: dropped a malformed query");
            continue;
        };
        // Answer first, then log: the guest's lookup (A and AAAA, one
        // after the other here) does not wait on the log file.
        if let Err(e) = sock.send_to(&resp, peer).await {
            tracing::debug!(%peer, "dns udp send: {e}");
        }
        record(&ctx, &outcome);
        tracing::debug!(
            qtype = outcome.qtype,
            answer_us = t0.elapsed().as_micros() as u64,
            "egress timing: dns answered"
        );
    }
}

/// Answer queries over TCP (RFC 1035 2-byte length framing, several per
/// connection) until the task is dropped.
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_tcp_conn(stream, ctx.clone()));
    }
}

/// One DNS-over-TCP connection (or a stream the Kubernetes relay
/// brought, which frames UDP queries the same way).
pub async fn serve_tcp_conn<S>(mut stream: S, ctx: Arc<Ctx>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let mut len = [0u8; 2];
        let Ok(Ok(_)) = tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut len)).await else {
            return;
        };
        let len = u16::from_be_bytes(len) as usize;
        if len < 12 {
            return;
        }
        let mut q = vec![0u8; len];
        let Ok(Ok(_)) = tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut q)).await else {
            return;
        };
        let policy = ctx.policy();
        let Some((resp, outcome)) = answer_with_outcome(&q, &policy, &ctx.pool) else {
            return;
        };
        let mut out = (resp.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        let sent = stream.write_all(&out).await;
        record(&ctx, &outcome);
        if sent.is_err() {
            return;
        }
    }
}

/// A recursive query for `name` (host side, to the configured resolver).
pub(crate) fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// Read a (possibly compressed) name at `at`: the name, and where the
/// record continues.
fn read_name(b: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut next = None;
    let mut total = 0;
    for _ in 0..128 {
        let len = *b.get(at)? as usize;
        match len {
            0 => {
                return Some((labels.join("."), next.unwrap_or(at + 1)));
            }
            1..=63 => {
                let l = b.get(at + 1..at + 1 + len)?;
                total += len + 1;
                if total > 255 {
                    return None;
                }
                labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
                at += 1 + len;
            }
            _ if len & 0xc0 == 0xc0 => {
                let ptr = (be16(b, at)? & 0x3fff) as usize;
                next.get_or_insert(at + 2);
                at = ptr;
            }
            _ => return None,
        }
    }
    None
}

/// The addresses of type `qtype` a resolver's reply gives for `name`,
/// following CNAMEs within the answer section. NXDOMAIN and NODATA are
/// empty; a reply to another question, or garbage, is an error.
#[cfg(test)]
pub(crate) fn parse_response(
    b: &[u8],
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<Vec<IpAddr>, String> {
    parse_answer(b, id, name, qtype).map(|a| a.addrs)
}

/// What a resolver's reply gave: see [`parse_answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the records that led to `addrs` (the CNAME
    /// chain and the addresses); `None` when there are no addresses.
    pub ttl: Option<u32>,
}

/// [`parse_response`], with the TTL the answer may be reused for.
pub(crate) fn parse_answer(b: &[u8], id: u16, name: &str, qtype: u16) -> Result<Answer, String> {
    if be16(b, 0) != Some(id) || b.len() < 12 || b[2] & 0x80 == 0 {
        return Err("not a reply to our query".into());
    }
    let rcode = b[3] & 0x0f;
    if rcode == 3 {
        return Ok(Answer {
            addrs: Vec::new(),
            ttl: None,
        });
    }
    if rcode != 0 {
        return Err(format!("resolver answered rcode {rcode}"));
    }
    let (qd, an) = (be16(b, 4).unwrap_or(0), be16(b, 6).unwrap_or(0));
    if qd != 1 {
        return Err("reply without our question".into());
    }
    let (qname, mut at) = read_name(b, 12).ok_or("bad question name")?;
    if !qname.eq_ignore_ascii_case(name.trim_end_matches('.')) || be16(b, at) != Some(qtype) {
        return Err("reply to another question".into());
    }
    at += 4;
    let mut records = Vec::new();
    for _ in 0..an {
        let (owner, next) = read_name(b, at).ok_or("bad record name")?;
        let rtype = be16(b, next).ok_or("short record")?;
        let ttl = b
            .get(next + 4..next + 8)
            .and_then(|t| <[u8; 4]>::try_from(t).ok())
            .map(u32::from_be_bytes)
            .ok_or("short record")?;
        let rdlen = be16(b, next + 8).ok_or("short record")? as usize;
        let data_at = next + 10;
        let data = b.get(data_at..data_at + rdlen).ok_or("short record")?;
        let target = if rtype == TYPE_CNAME {
            read_name(b, data_at).map(|(n, _)| n)
        } else {
            None
        };
        records.push((owner, rtype, ttl, data, target));
        at = data_at + rdlen;
    }
    let mut names = vec![name.trim_end_matches('.').to_ascii_lowercase()];
    // CNAME chains, in any order, at most as long as the answer section.
    for _ in 0..records.len() {
        for (owner, rtype, _, _, target) in &records {
            if *rtype == TYPE_CNAME && names.contains(owner) {
                if let Some(t) = target {
                    if !names.contains(t) {
                        names.push(t.clone());
                    }
                }
            }
        }
    }
    let mut ttl: Option<u32> = None;
    let addrs: Vec<IpAddr> = records
        .iter()
        .filter(|(owner, rtype, _, _, _)| *rtype == qtype && names.contains(owner))
        .filter_map(|(_, _, t, data, _)| {
            let ip = match data.len() {
                4 if qtype == TYPE_A => IpAddr::from(<[u8; 4]>::try_from(*data).ok()?),
                16 if qtype == TYPE_AAAA => IpAddr::from(<[u8; 16]>::try_from(*data).ok()?),
                _ => return None,
            };
            ttl = Some(ttl.map_or(*t, |m| m.min(*t)));
            Some(ip)
        })
        .collect();
    if addrs.is_empty() {
        return Ok(Answer { addrs, ttl: None });
    }
    // A CNAME in the chain can expire before the address it led to.
    for (owner, rtype, t, _, _) in &records {
        if *rtype == TYPE_CNAME && names.contains(owner) {
            ttl = ttl.map(|m| m.min(*t));
        }
    }
    Ok(Answer { addrs, ttl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Spec;

    fn policy(allow: &[&str]) -> Policy {
        Spec {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            host_services: vec!["127.0.0.1:11434".into()],
            ..Spec::default()
        }
        .compile()
        .expect("compile")
    }

    fn query_raw(id: u16, labels: &[&[u8]], qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let labels: Vec<&[u8]> = name.split('.').map(str::as_bytes).collect();
        query_raw(id, &labels, qtype)
    }

    fn rcode(r: &[u8]) -> u8 {
        r[3] & 0x0f
    }

    fn ancount(r: &[u8]) -> u16 {
        u16::from_be_bytes([r[6], r[7]])
    }

    #[test]
    fn a_for_an_allowed_name_is_a_pool_address() {
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        let q = query(0x1234, "API.example.com", TYPE_A);
        let r = answer(&q, &p, &pool).expect("reply");
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR");
        assert_eq!(r[3] & 0x80, 0, "RA must be 0");
        assert_eq!(rcode(&r), 0);
        assert_eq!(ancount(&r), 1);
        // The question is echoed as sent (case preserved).
        assert_eq!(&r[12..q.len()], &q[12..]);
        let ip = std::net::Ipv4Addr::new(
            r[r.len() - 4],
            r[r.len() - 3],
            r[r.len() - 2],
            r[r.len() - 1],
        );
        assert_eq!(pool.lookup(ip).as_deref(), Some("api.example.com"));
        let ttl = u32::from_be_bytes(r[r.len() - 10..r.len() - 6].try_into().expect("ttl"));
        assert_eq!(ttl, TTL);
        // Our own parser reads it back.
        assert_eq!(
            parse_response(&r, 0x1234, "api.example.com", TYPE_A).expect("parse"),
            vec![IpAddr::V4(ip)]
        );
    }

    #[test]
    fn edns_queries_are_answered() {
        // dig and most stubs add an OPT record in the additional section.
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        let mut q = query(5, "api.example.com", TYPE_A);
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let r = answer(&q, &p, &pool).expect("reply");
        assert_eq!((rcode(&r), ancount(&r)), (0, 1));
        assert_eq!(
            u16::from_be_bytes([r[10], r[11]]),
            0,
            "no additional records"
        );
    }

    #[test]
    fn denied_names_are_refused_identically() {
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        let a = answer(&query(1, "secret1.evil.test", TYPE_A), &p, &pool).expect("a");
        let b = answer(&query(2, "x.example.com", TYPE_A), &p, &pool).expect("b");
        assert_eq!(rcode(&a), RCODE_REFUSED);
        assert_eq!(ancount(&a), 0);
        // Identical apart from the ID and the echoed question.
        assert_eq!(a[2..12], b[2..12]);
        assert_eq!(a.len() - query(1, "secret1.evil.test", TYPE_A).len(), 0);
        assert_eq!(b.len() - query(2, "x.example.com", TYPE_A).len(), 0);
        assert!(pool.is_empty(), "no address for a denied name");
        for t in [TYPE_AAAA, 16, 255, 65] {
            let r = answer(&query(3, "evil.test", t), &p, &pool).expect("r");
            assert_eq!(r[2..12], a[2..12], "type {t}");
        }
    }

    #[test]
    fn other_types_for_allowed_names_are_empty() {
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        for t in [
            TYPE_AAAA, 16,  /* TXT */
            255, /* ANY */
            65,  /* HTTPS */
        ] {
            let r = answer(&query(7, "api.example.com", t), &p, &pool).expect("reply");
            assert_eq!(rcode(&r), 0, "type {t}");
            assert_eq!(ancount(&r), 0, "type {t}");
        }
        assert!(pool.is_empty());
    }

    #[test]
    fn host_service_name_only_with_services() {
        let pool = FakePool::in_memory();
        let r = answer(&query(1, HOST_SERVICE_NAME, TYPE_A), &policy(&[]), &pool).expect("r");
        assert_eq!(ancount(&r), 1);
        let none = Spec::default().compile().expect("compile");
        let r = answer(&query(1, HOST_SERVICE_NAME, TYPE_A), &none, &pool).expect("r");
        assert_eq!(rcode(&r), RCODE_REFUSED);
    }

    #[test]
    fn bad_bytes_in_labels_are_refused() {
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        for bad in [
            &[&b"api\r\nX"[..], b"example", b"com"][..],
            &[b"a pi", b"example", b"com"],
            &[b"api.example", b"com"],
            &[b"\xc3\xa9", b"example", b"com"],
            &[b"-api", b"example", b"com"],
        ] {
            let r = answer(&query_raw(1, bad, TYPE_A), &p, &pool).expect("reply");
            assert_eq!(rcode(&r), RCODE_REFUSED, "{bad:?}");
        }
        // The root name, and a non-IN class.
        let r = answer(&query_raw(1, &[], TYPE_A), &p, &pool).expect("root");
        assert_eq!(rcode(&r), RCODE_REFUSED);
        let mut q = query(1, "api.example.com", TYPE_A);
        let n = q.len();
        q[n - 1] = 3; // CHAOS
        assert_eq!(rcode(&answer(&q, &p, &pool).expect("ch")), RCODE_REFUSED);
    }

    #[test]
    fn malformed_is_dropped() {
        let p = policy(&["api.example.com"]);
        let pool = FakePool::in_memory();
        let good = query(1, "api.example.com", TYPE_A);
        assert!(answer(&good[..11], &p, &pool).is_none());
        assert!(
            answer(&good[..good.len() - 1], &p, &pool).is_none(),
            "truncated"
        );
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert!(answer(&resp, &p, &pool).is_none(), "a response");
        let mut two = good.clone();
        two[5] = 2;
        assert!(answer(&two, &p, &pool).is_none(), "two questions");
        let mut ptr = good[..12].to_vec();
        ptr.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert!(
            answer(&ptr, &p, &pool).is_none(),
            "compression in the question"
        );
        assert!(answer(b"", &p, &pool).is_none());
    }

    #[test]
    fn response_parser_follows_cnames_and_rejects_others() {
        // A reply built by hand: www.example.com CNAME edge.cdn.test; A.
        let mut r = query(9, "www.example.com", TYPE_A);
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60]);
        let target: Vec<u8> = [&[4u8][..], b"edge", &[3], b"cdn", &[4], b"test", &[0]].concat();
        r.extend_from_slice(&(target.len() as u16).to_be_bytes());
        let target_at = r.len();
        r.extend_from_slice(&target);
        r.extend_from_slice(&[0xc0 | (target_at >> 8) as u8, target_at as u8]);
        r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
        let got = parse_response(&r, 9, "www.example.com", TYPE_A).expect("parse");
        assert_eq!(got, vec![IpAddr::from([192, 0, 2, 7])]);
        // Reusable for the shorter of the CNAME's and the address's TTL.
        let ttl_at = r.len() - 10;
        r[ttl_at..ttl_at + 4].copy_from_slice(&300u32.to_be_bytes());
        let a = parse_answer(&r, 9, "www.example.com", TYPE_A).expect("parse");
        assert_eq!(a.ttl, Some(60));
        r[ttl_at..ttl_at + 4].copy_from_slice(&7u32.to_be_bytes());
        let a = parse_answer(&r, 9, "www.example.com", TYPE_A).expect("parse");
        assert_eq!(a.ttl, Some(7));
        assert_eq!(
            parse_answer(&r, 9, "www.example.com", TYPE_AAAA).map(|a| a.ttl),
            Err("reply to another question".into())
        );
        assert!(parse_response(&r, 8, "www.example.com", TYPE_A).is_err());
        assert!(parse_response(&r, 9, "other.example.com", TYPE_A).is_err());
        assert!(parse_response(&r[..r.len() - 2], 9, "www.example.com", TYPE_A).is_err());
    }
}
