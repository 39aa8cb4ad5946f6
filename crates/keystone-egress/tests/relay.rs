//! The relayed egress point (Kubernetes) on loopback: the test stands in
//! for the pod's relay, accepting the pulls [`relay::pump`] opens and
//! writing the headers a relay writes, and checks that each kind of work
//! gets the same decisions as on the other backends.

mod common;

use common::*;
use keystone_egress::log;
use keystone_egress::proxy::Ctx;
use keystone_egress::relay::{self, HELLO};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The pod's side: pulls arrive here.
struct Pod {
    pulls: TcpListener,
    opened: Arc<AtomicUsize>,
}

async fn pod(ctx: Arc<Ctx>, idle: usize) -> Pod {
    let pulls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = pulls.local_addr().expect("addr");
    let opened = Arc::new(AtomicUsize::new(0));
    let count = opened.clone();
    tokio::spawn(relay::pump(
        move || {
            count.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(addr)
        },
        ctx,
        idle,
    ));
    Pod { pulls, opened }
}

impl Pod {
    /// The next pull, its hello read, `header` written: from here on the
    /// stream (framed both ways, as the relay frames it) is the guest's
    /// connection.
    async fn work(&self, header: &str) -> tokio::io::DuplexStream {
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), self.pulls.accept())
            .await
            .expect("a pull in time")
            .expect("accept");
        let mut hello = vec![0u8; HELLO.len()];
        s.read_exact(&mut hello).await.expect("hello");
        assert_eq!(hello, HELLO);
        s.write_all(format!("{header}\n").as_bytes())
            .await
            .expect("header");
        relay::framed(s)
    }
}

/// One framed DNS exchange; the answer's A record, or the rcode.
async fn dns(s: &mut tokio::io::DuplexStream, name: &str) -> Result<std::net::Ipv4Addr, u8> {
    let q = dns_query(7, name, 1);
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out).await.expect("query");
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
        .await
        .expect("answer in time")
        .expect("length");
    let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut a).await.expect("answer");
    let rcode = a[3] & 0x0f;
    if rcode != 0 {
        return Err(rcode);
    }
    let ip = &a[a.len() - 4..];
    Ok(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
}

struct World {
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    resolver: Resolver,
    web: Web,
    ctx: Arc<Ctx>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("egress.log");
    let resolver = resolver(&[("web.test", WEB_IP), ("other.test", WEB_IP)]).await;
    let web = web().await;
    let allow = [
        format!("web.test:{}", web.port),
        "127.0.0.0/8:*".to_string(),
    ];
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    let ctx = ctx(&allow, &[], resolver.addr, &log);
    World {
        _dir: dir,
        log,
        resolver,
        web,
        ctx,
    }
}

#[tokio::test]
async fn a_relayed_query_is_answered_from_the_policy_and_never_forwarded() {
    let w = world().await;
    let p = pod(w.ctx.clone(), 2).await;
    let mut s = p.work("dns").await;
    let addr = dns(&mut s, "web.test").await.expect("an address");
    assert!(
        (addr.octets()[0], addr.octets()[1] & 0xfe) == (198, 18),
        "{addr} is not synthetic"
    );
    // Denied: REFUSED, and the resolver never asked.
    let mut s = p.work("dns").await;
    assert_eq!(dns(&mut s, "secret-data.other.test").await, Err(5));
    assert!(
        !w.resolver.names().iter().any(|n| n.contains("secret-data")),
        "{:?}",
        w.resolver.names()
    );
    // DNS over TCP to the gateway is the same DNS.
    let mut s = p.work("tcp 198.18.0.1 53").await;
    assert_eq!(dns(&mut s, "web.test").await, Ok(addr));
}

#[tokio::test]
async fn a_relayed_connection_to_a_synthetic_address_reaches_the_allowed_host() {
    let w = world().await;
    let p = pod(w.ctx.clone(), 2).await;
    let mut s = p.work("dns").await;
    let addr = dns(&mut s, "web.test").await.expect("an address");
    let mut s = p.work(&format!("tcp {addr} {}", w.web.port)).await;
    let hp = format!("web.test:{}", w.web.port);
    s.write_all(format!("GET /relayed HTTP/1.1\r\nHost: {hp}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("seen GET /relayed HTTP/1.1 host={hp}"));
    // The Host must still agree with the name the address stands for.
    let mut s = p.work(&format!("tcp {addr} {}", w.web.port)).await;
    s.write_all(
        format!(
            "GET /fronted HTTP/1.1\r\nHost: other.test:{}\r\n\r\n",
            w.web.port
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 403);
    let seen = w.web.requests.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[tokio::test]
async fn a_relay_cannot_name_its_way_past_the_policy() {
    let w = world().await;
    let p = pod(w.ctx.clone(), 2).await;
    // A synthetic address this sandbox's DNS never gave out.
    let mut s = p.work("tcp 198.18.3.3 443").await;
    assert!(
        closed(&mut s).await,
        "an unknown synthetic address was relayed"
    );
    // A literal address no rule allows.
    let mut s = p.work("tcp 192.0.2.9 443").await;
    assert!(closed(&mut s).await, "a literal address was relayed");
    let events = log::tail(&w.log, 10);
    for needle in ["198.18.3.3", "192.0.2.9"] {
        assert!(
            events
                .iter()
                .any(|e| e.host == needle && e.decision == "deny"),
            "{needle} not logged as denied: {events:?}"
        );
    }
    // The explicit proxy at the gateway refuses a name no rule allows.
    let mut s = p.work("tcp 198.18.0.1 3128").await;
    s.write_all(b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n")
        .await
        .expect("connect");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("keystone agent allow testbox evil.test"),
        "{body}"
    );
}

#[tokio::test]
async fn a_bad_header_ends_that_pull_and_the_pump_opens_another() {
    let w = world().await;
    let p = pod(w.ctx.clone(), 1).await;
    let mut s = p.work("udp 1.2.3.4 53").await;
    assert!(closed(&mut s).await);
    let mut s = p.work(&"x".repeat(300)).await;
    assert!(closed(&mut s).await);
    // Still serving: a third pull works.
    let mut s = p.work("dns").await;
    assert!(dns(&mut s, "web.test").await.is_ok());
    assert!(p.opened.load(Ordering::SeqCst) >= 3);
}

#[test]
fn the_relay_program_is_valid_python() {
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("python3 is required to check the relay program: apt-get install python3");
    let out = std::process::Command::new(python)
        .args(["-c", "import ast,sys; ast.parse(sys.stdin.read())"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(relay::SCRIPT.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run python3");
    assert!(
        out.status.success(),
        "relay.py does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
