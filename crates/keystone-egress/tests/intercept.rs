//! Credentials injected on the way out, end to end on loopback: a guest
//! client that trusts only the keystone CA, the explicit proxy and the
//! capture path, an upstream HTTPS server whose certificate a "public" CA
//! signed (the only root this process's `SSL_CERT_FILE` holds, standing for
//! the host's trust store), and a rogue upstream signed by another CA.

mod common;

use common::*;
use http_body_util::{BodyExt, Full};
use keystone_egress::inject::{Bundle, Injector, Secret};
use keystone_egress::proxy::{handle_capture, serve_explicit, Ctx};
use keystone_egress::tls::{generate_ca, Authority};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const PLACEHOLDER: &str = "sk-test-PLACEHOLDER0123456789abcdef";
const REAL: &str = "sk-test-REALVALUE9876543210fedcba";
const API_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const ROGUE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

/// The "public" CA (this process's host trust store) and the keystone CA.
struct Cas {
    public: Authority,
    keystone: (String, String),
    _dir: tempfile::TempDir,
}

fn cas() -> &'static Cas {
    static CAS: OnceLock<Cas> = OnceLock::new();
    CAS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let (pc, pk) = generate_ca().expect("public ca");
        let bundle = dir.path().join("roots.pem");
        std::fs::write(&bundle, &pc).expect("roots");
        // Before anything in this process loads the roots.
        std::env::set_var("SSL_CERT_FILE", &bundle);
        std::env::remove_var("SSL_CERT_DIR");
        Cas {
            public: Authority::new(&pc, &pk).expect("public"),
            keystone: generate_ca().expect("keystone ca"),
            _dir: dir,
        }
    })
}

/// What an upstream HTTPS server saw: one line per request
/// (`x-api-key=… body=…`), and how many TLS connections it accepted.
#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

async fn https_upstream(ip: Ipv4Addr, name: &str, authority: &Authority) -> (u16, Seen) {
    let l = TcpListener::bind((ip, 0)).await.expect("bind upstream");
    let port = l.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(authority.server_config(name).expect("leaf"));
    let seen = Seen::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let seen = s2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let key = req
                                .headers()
                                .get("x-api-key")
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
                                .unwrap_or_default();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let line =
                                format!("x-api-key={key} body={}", String::from_utf8_lossy(&body));
                            seen.requests.lock().expect("lock").push(line.clone());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                bytes::Bytes::from(line),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

struct World {
    _dir: tempfile::TempDir,
    ctx: Arc<Ctx>,
    proxy: SocketAddr,
    api_port: u16,
    api: Seen,
    rogue_port: u16,
    rogue: Seen,
    web: Web,
    log: std::path::PathBuf,
}

async fn world() -> World {
    let cas = cas();
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("egress.log");
    let (api_port, api) = https_upstream(API_IP, "api.test", &cas.public).await;
    // The rogue server's certificate for its name comes from a CA this
    // host does not trust.
    let (rc, rk) = generate_ca().expect("rogue ca");
    let rogue_ca = Authority::new(&rc, &rk).expect("rogue");
    let (rogue_port, rogue) = https_upstream(ROGUE_IP, "rogue.test", &rogue_ca).await;
    let web = web().await;
    let resolver = resolver(&[
        ("api.test", API_IP),
        ("rogue.test", ROGUE_IP),
        ("web.test", WEB_IP),
    ])
    .await;
    let allow = [
        format!("api.test:{api_port}"),
        format!("rogue.test:{rogue_port}"),
        format!("web.test:{}", web.port),
        "127.0.0.0/8:*".to_string(),
    ];
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    let ctx = ctx(&allow, &[], resolver.addr, &log);
    let bundle = Bundle {
        ca_cert_pem: cas.keystone.0.clone(),
        ca_key_pem: cas.keystone.1.clone(),
        secrets: vec![Secret {
            name: "TEST_KEY".into(),
            placeholder: PLACEHOLDER.into(),
            value: REAL.into(),
            hosts: vec![
                format!("api.test:{api_port}"),
                format!("rogue.test:{rogue_port}"),
            ],
            headers: Vec::new(),
        }],
    };
    ctx.credentials
        .set(Injector::new(&bundle).expect("injector"));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let proxy = l.local_addr().expect("addr");
    tokio::spawn(serve_explicit(l, ctx.clone()));
    World {
        _dir: dir,
        ctx,
        proxy,
        api_port,
        api,
        rogue_port,
        rogue,
        web,
        log,
    }
}

/// The guest's TLS client: trusts the keystone CA and nothing else.
fn guest_tls() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cas().keystone.0.as_bytes());
    roots.add(der.expect("pem")).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

use rustls::pki_types::pem::PemObject;

/// CONNECT through the proxy, then TLS as the guest.
async fn tls_via_proxy(
    w: &World,
    name: &str,
    port: u16,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = TcpStream::connect(w.proxy).await.expect("connect proxy");
    let req = format!("CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    guest_tls()
        .connect(server, s)
        .await
        .expect("guest TLS with keystone's certificate")
}

/// One keep-alive request with the placeholder in a header and the body.
async fn post<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
) -> (u16, String) {
    let body = format!("token in the body: {PLACEHOLDER}");
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {PLACEHOLDER}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, body) = read_response(s).await;
    (status, body)
}

#[tokio::test]
async fn the_real_value_goes_in_the_header_of_its_host_only() {
    let w = world().await;
    let host = format!("api.test:{}", w.api_port);
    let mut s = tls_via_proxy(&w, "api.test", w.api_port).await;
    let (status, body) = post(&mut s, &host).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("x-api-key={REAL} body=token in the body: {PLACEHOLDER}"),
        "the header carries the real value, the body the placeholder"
    );
    // A second request on the same guest connection reuses the upstream one.
    let (status, _) = post(&mut s, &host).await;
    assert_eq!(status, 200);
    assert_eq!(w.api.connections.load(Ordering::SeqCst), 1);
    let usage = w.ctx.credentials.counters.snapshot();
    assert_eq!(usage["TEST_KEY"].used, 2);
    let log = std::fs::read_to_string(&w.log).expect("log");
    assert!(log.contains("injected TEST_KEY"), "{log}");
    assert!(!log.contains(REAL), "the log holds no value");
}

#[tokio::test]
async fn a_request_naming_another_host_inside_is_refused() {
    let w = world().await;
    let mut s = tls_via_proxy(&w, "api.test", w.api_port).await;
    let (status, _) = post(&mut s, &format!("web.test:{}", w.web.port)).await;
    assert_eq!(status, 403);
    assert!(w.api.requests.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn an_upstream_certificate_from_another_ca_is_refused_before_anything_is_sent() {
    let w = world().await;
    let mut s = tls_via_proxy(&w, "rogue.test", w.rogue_port).await;
    let (status, body) = post(&mut s, &format!("rogue.test:{}", w.rogue_port)).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("refused by this host's trust store"),
        "{body}"
    );
    assert!(w.rogue.requests.lock().expect("lock").is_empty());
    assert!(
        !w.ctx
            .credentials
            .counters
            .snapshot()
            .contains_key("TEST_KEY"),
        "nothing was put in: the upstream was refused first"
    );
}

#[tokio::test]
async fn plain_http_and_other_hosts_get_the_placeholder() {
    let w = world().await;
    let mut s = TcpStream::connect(w.proxy).await.expect("proxy");
    let body = "b";
    let req = format!(
        "POST http://web.test:{p}/ HTTP/1.1\r\nHost: web.test:{p}\r\nx-api-key: {PLACEHOLDER}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        p = w.web.port
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let heads = w.web.requests.lock().expect("lock").join("\n");
    assert!(
        heads.contains(PLACEHOLDER) && !heads.contains(REAL),
        "{heads}"
    );
    let log = std::fs::read_to_string(&w.log).expect("log");
    assert!(
        log.contains("placeholder of TEST_KEY passed unchanged"),
        "{log}"
    );
}

#[tokio::test]
async fn a_captured_connection_is_intercepted_too() {
    let w = world().await;
    // The guest dialled api.test's address directly (as its resolver gave
    // a pool address for it; here the name comes from the pool).
    let pool_ip = w.ctx.pool.assign("api.test").expect("pool");
    let dest = SocketAddr::from((pool_ip, w.api_port));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let ctx = w.ctx.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(handle_capture(s, dest, ctx.clone()));
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server = rustls::pki_types::ServerName::try_from("api.test").expect("name");
    let mut s = guest_tls().connect(server, tcp).await.expect("tls");
    let (status, body) = post(&mut s, &format!("api.test:{}", w.api_port)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(&format!("x-api-key={REAL} ")), "{body}");
}

#[tokio::test]
async fn credentials_arrive_and_are_counted_over_the_control_socket() {
    let w = world().await;
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("control.sock");
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, "{}").expect("policy");
    let reloader = Arc::new(keystone_egress::control::Reloader::new(
        policy_file,
        w.ctx.clone(),
        None,
        Default::default(),
    ));
    let l = keystone_egress::control::bind(&sock).expect("bind");
    l.set_nonblocking(true).expect("nb");
    let l = tokio::net::UnixListener::from_std(l).expect("listener");
    tokio::spawn(keystone_egress::control::serve(l, reloader));
    let rotated = "sk-test-ROTATED00000000000000000000";
    let bundle = Bundle {
        ca_cert_pem: cas().keystone.0.clone(),
        ca_key_pem: cas().keystone.1.clone(),
        secrets: vec![Secret {
            name: "TEST_KEY".into(),
            placeholder: PLACEHOLDER.into(),
            value: rotated.into(),
            hosts: vec![format!("api.test:{}", w.api_port)],
            headers: vec!["x-api-key".into()],
        }],
    };
    let s2 = sock.clone();
    tokio::task::spawn_blocking(move || {
        keystone_egress::control::send_credentials(&s2, &bundle, Duration::from_secs(5))
    })
    .await
    .expect("join")
    .expect("sent");
    // A connection opened before the rotation gets the new value.
    let mut s = tls_via_proxy(&w, "api.test", w.api_port).await;
    let (_, body) = post(&mut s, &format!("api.test:{}", w.api_port)).await;
    assert!(body.starts_with(&format!("x-api-key={rotated} ")), "{body}");
    let s2 = sock.clone();
    let usage = tokio::task::spawn_blocking(move || {
        keystone_egress::control::usage(&s2, Duration::from_secs(5))
    })
    .await
    .expect("join")
    .expect("usage");
    assert_eq!(usage["TEST_KEY"].used, 1);
    // A bad message is refused with a reason, and the old credentials stay.
    let s2 = sock.clone();
    let bad = Bundle {
        ca_cert_pem: "not a certificate".into(),
        ca_key_pem: String::new(),
        secrets: Vec::new(),
    };
    let e = tokio::task::spawn_blocking(move || {
        keystone_egress::control::send_credentials(&s2, &bad, Duration::from_secs(5))
    })
    .await
    .expect("join")
    .expect_err("refused");
    assert!(e.contains("CA"), "{e}");
    assert!(w.ctx.credentials.get().is_some());
}
