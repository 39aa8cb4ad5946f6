//! The two ways a guest's TCP reaches the host egress point, both checked
//! per connection and per HTTP request against the current policy:
//!
//! - [`serve_explicit`]: the HTTP proxy on [`crate::GATEWAY`]:[`crate::PROXY_PORT`]
//!   for clients that honour `HTTP(S)_PROXY` (CONNECT and absolute-form).
//! - [`serve_capture`]: every other connection the guest makes lands on a
//!   capture listener; the socket's local address is what the guest
//!   dialled, and a pool address names the host.
//!
//! Inside an allowed tunnel the first client bytes are looked at before
//! anything is relayed: a TLS ClientHello's SNI must be the allowed name
//! (no fronting another host through an allowed one); plain HTTP is served
//! by a hyper server whose every request's Host must be the allowed name
//! and is forwarded on its own (no second keep-alive request to another
//! host); anything else is relayed raw, except on port 443, which carries
//! TLS or nothing. Upstream connections go to the address
//! [`upstream::connect_cached`] resolved and pinned. On a captured 443 to a
//! name whose answer is already kept, the upstream is dialled while the
//! ClientHello is still on its way (the client's TLS setup takes
//! milliseconds); that connection is used only once the hello has passed
//! and is dropped, with nothing sent on it, otherwise. Without a kept
//! answer nothing is resolved before the hello has passed.
//!
//! A TLS flow to a credential's host is not relayed: once its hello has
//! passed, [`crate::intercept`] terminates it and injects the credential;
//! it connects upstream itself, so such a flow is never dialled here.

use crate::inject;
use crate::intercept;
use crate::log::DecisionLog;
use crate::policy::{normalize_name, Decision, Policy, Target};
use crate::pool::{self, FakePool};
use crate::sni::{self, Hello};
use crate::upstream;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A request head (or a ClientHello) must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// And fit in this.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Each direction of a relayed tunnel copies through a buffer this big
/// (tokio's default, 8 KiB, costs a read and a write syscall per 8 KiB of
/// a download).
pub const RELAY_BUF: usize = 64 * 1024;
/// An upstream must start answering a forwarded request within this.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

pub type Body = BoxBody<Bytes, hyper::Error>;

/// What every listener shares.
pub struct Ctx {
    /// The current policy; [`Ctx::set_policy`] swaps it on reload, and
    /// each decision takes the one current when it is made.
    pub policy: RwLock<Arc<Policy>>,
    pub pool: FakePool,
    pub log: DecisionLog,
    /// The sandbox's name, for the "how to allow it" hint.
    pub sandbox: String,
    /// Host-side answers, reused for their TTL by every path.
    pub resolutions: upstream::Resolutions,
    /// The credentials injected into requests to their hosts, once the
    /// CLI has sent them ([`crate::control`]), and their counts.
    pub credentials: inject::Slot,
    /// Upstream TLS connections of intercepted hosts, for reuse.
    pub(crate) tls_pool: intercept::Pool,
}

impl Ctx {
    pub fn new(policy: Policy, pool: FakePool, log: DecisionLog, sandbox: &str) -> Ctx {
        Ctx {
            policy: RwLock::new(Arc::new(policy)),
            pool,
            log,
            sandbox: sandbox.to_string(),
            resolutions: upstream::Resolutions::new(),
            credentials: inject::Slot::default(),
            tls_pool: intercept::Pool::default(),
        }
    }

    /// [`upstream::connect_cached`] with the current resolver and this
    /// context's [`Ctx::resolutions`].
    pub(crate) async fn connect(
        &self,
        target: &Target,
        port: u16,
        policy: &Policy,
    ) -> Result<TcpStream, upstream::Refusal> {
        upstream::connect_cached(target, port, policy, policy.resolver(), &self.resolutions)
            .await
            .map(|(s, _)| s)
    }

    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_policy(&self, policy: Policy) {
        let p = Arc::new(policy);
        match self.policy.write() {
            Ok(mut g) => *g = p,
            Err(poisoned) => *poisoned.into_inner() = p,
        }
    }

    /// Is TLS to `target:port` terminated here (a credential's host)?
    fn intercepts(&self, target: &Target, port: u16) -> bool {
        match (target, self.credentials.get()) {
            (Target::Name(n), Some(inj)) => inj.intercepts(n, port),
            _ => false,
        }
    }

    fn record(&self, proto: &str, target: &Target, port: u16, d: &Decision) {
        self.log.record(proto, &target.to_string(), port, d);
    }
}

pub(crate) fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `host` as `keystone agent allow` takes it: the port only when it is
/// not one of the defaults.
fn allow_arg(target: &Target, port: u16) -> String {
    let default = port == 80 || port == 443;
    match target {
        Target::Addr(IpAddr::V6(a)) if !default => format!("[{a}]:{port}"),
        t if !default => format!("{t}:{port}"),
        t => t.to_string(),
    }
}

/// The 403 body: what was refused, why, and how to allow it.
pub fn denied_text(sandbox: &str, target: &Target, port: u16, rule: &str) -> String {
    let mut s = format!(
        "keystone egress: {target} port {port} is not allowed for sandbox {sandbox} ({rule}).\n\
         To allow it: keystone agent allow {sandbox} {}\n",
        allow_arg(target, port)
    );
    if rule.starts_with("deny ") {
        s.push_str("(A deny rule matches it; deny wins, so remove that rule first.)\n");
    }
    s
}

pub(crate) fn denied(ctx: &Ctx, target: &Target, port: u16, rule: &str) -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        denied_text(&ctx.sandbox, target, port, rule),
    )
}

/// Split `host[:port]` (`[v6]:port` too).
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let bad = || format!("cannot read host {s:?}");
    if s.starts_with('[') {
        let end = s.find(']').ok_or_else(bad)?;
        let (h, rest) = s.split_at(end + 1);
        return match rest {
            "" => Ok((h, None)),
            r => {
                let p = r.strip_prefix(':').ok_or_else(bad)?;
                Ok((h, Some(p.parse().map_err(|_| bad())?)))
            }
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h, Some(p.parse().map_err(|_| bad())?))),
        None => Ok((s, None)),
    }
}

/// Serve the explicit HTTP proxy until the task is dropped.
pub async fn serve_explicit(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("egress proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_explicit_conn(stream, ctx.clone()));
    }
}

/// One client connection of the explicit proxy (a TCP connection, or a
/// stream the Kubernetes relay brought).
pub async fn serve_explicit_conn<S>(io: S, ctx: Arc<Ctx>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(explicit_request(ctx, req).await) }
    });
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client may shut its write side once its request is sent.
        .half_close(true)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
    if let Err(e) = r {
        tracing::debug!("egress proxy connection: {e}");
    }
}

async fn explicit_request(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return connect_request(ctx, req).await;
    }
    let (Some(scheme), Some(auth)) = (req.uri().scheme_str(), req.uri().authority()) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "This is keystone's egress proxy for sandbox {}. It takes CONNECT host:port \
                 and absolute-form requests (GET http://host/path), not requests for itself.\n",
                ctx.sandbox
            ),
        );
    };
    if scheme != "http" {
        return text(
            StatusCode::BAD_REQUEST,
            format!("keystone egress: {scheme}:// is not proxied as absolute-form; use CONNECT for https.\n"),
        );
    }
    let uri_host = auth.host().to_string();
    let uri_port = auth.port_u16().unwrap_or(80);
    let target = match Target::parse(&uri_host) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("keystone egress: {e}\n")),
    };
    if let Some(h) = req.headers().get(header::HOST) {
        let agrees = h
            .to_str()
            .ok()
            .and_then(|h| split_host_port(h).ok())
            .and_then(|(hh, hp)| Some((Target::parse(hh).ok()?, hp.unwrap_or(80))))
            .is_some_and(|(ht, hp)| ht == target && hp == uri_port);
        if !agrees {
            let shown = String::from_utf8_lossy(h.as_bytes())
                .escape_debug()
                .to_string();
            let rule = format!("Host {shown} does not match the URI's {auth}");
            ctx.record("http", &target, uri_port, &deny(rule.clone()));
            return text(
                StatusCode::FORBIDDEN,
                format!("keystone egress: the request names {auth} in its URI but {shown} in its Host header; refused.\n"),
            );
        }
    }
    forward(&ctx, &target, uri_port, req).await
}

pub(crate) fn deny(rule: String) -> Decision {
    Decision {
        allowed: false,
        rule,
    }
}

async fn connect_request(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let Some(auth) = req.uri().authority() else {
        return text(
            StatusCode::BAD_REQUEST,
            "keystone egress: CONNECT needs host:port\n".into(),
        );
    };
    let Some(port) = auth.port_u16() else {
        return text(
            StatusCode::BAD_REQUEST,
            "keystone egress: CONNECT needs host:port\n".into(),
        );
    };
    let target = match Target::parse(auth.host()) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("keystone egress: {e}\n")),
    };
    let t0 = std::time::Instant::now();
    let policy = ctx.policy();
    let d = policy.decide(&target, port);
    ctx.record("connect", &target, port, &d);
    if !d.allowed {
        return denied(&ctx, &target, port, &d.rule);
    }
    let t1 = std::time::Instant::now();
    // A credential's host is connected by the interception itself (its
    // pooled TLS connections); every other is dialled before the 200, so
    // a failed upstream gets a 502 with the reason.
    let up = if ctx.intercepts(&target, port) {
        Upstream::Later
    } else {
        match ctx.connect(&target, port, &policy).await {
            Ok(s) => Upstream::Open(s),
            Err(r) => return refusal(&ctx, "connect", &target, port, &r),
        }
    };
    tracing::debug!(
        %target,
        decide_us = (t1 - t0).as_micros() as u64,
        connect_us = t1.elapsed().as_micros() as u64,
        "egress timing: CONNECT answered"
    );
    let flow = Flow {
        target,
        port,
        ctx: ctx.clone(),
        via: "CONNECT",
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(client) => relay(TokioIo::new(client), up, flow).await,
            Err(e) => tracing::debug!("egress CONNECT upgrade: {e}"),
        }
    });
    Response::new(Empty::new().map_err(|n| match n {}).boxed())
}

pub(crate) fn refusal(
    ctx: &Ctx,
    proto: &str,
    target: &Target,
    port: u16,
    r: &upstream::Refusal,
) -> Response<Body> {
    if r.denied {
        ctx.record(proto, target, port, &deny(r.reason.clone()));
        text(
            StatusCode::FORBIDDEN,
            format!(
                "keystone egress: {target} port {port} refused: {}\n",
                r.reason
            ),
        )
    } else {
        tracing::warn!(%target, port, "egress upstream: {}", r.reason);
        text(
            StatusCode::BAD_GATEWAY,
            format!(
                "keystone egress: could not reach {target} port {port}: {}\n",
                r.reason
            ),
        )
    }
}

/// Check, connect and send one HTTP request (already known to name
/// `target:port`), streaming the response back.
async fn forward(
    ctx: &Ctx,
    target: &Target,
    port: u16,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let policy = ctx.policy();
    let d = policy.decide(target, port);
    ctx.record("http", target, port, &d);
    if !d.allowed {
        return denied(ctx, target, port, &d.rule);
    }
    let stream = match ctx.connect(target, port, &policy).await {
        Ok(s) => s,
        Err(r) => return refusal(ctx, "http", target, port, &r),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("keystone egress: {target} port {port}: {e}\n"),
                )
            }
        };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("egress upstream connection: {e}");
        }
    });
    let upgrade = wants_upgrade(req.headers());
    let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    match path.parse::<Uri>() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "keystone egress: bad path\n".into(),
            )
        }
    }
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // Plain HTTP never carries a real value: a placeholder passes as it
    // is, and the log says so.
    if let Some(inj) = ctx.credentials.get() {
        let out = inj.apply(
            target,
            port,
            false,
            req.headers_mut(),
            &ctx.credentials.counters,
        );
        record_credentials(ctx, "http", target, port, &out);
    }
    if !req.headers().contains_key(header::HOST) {
        let host = match (target, port) {
            (Target::Addr(IpAddr::V6(a)), 80) => format!("[{a}]"),
            (Target::Addr(IpAddr::V6(a)), p) => format!("[{a}]:{p}"),
            (t, 80) => t.to_string(),
            (t, p) => format!("{t}:{p}"),
        };
        if let Ok(v) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let mut resp = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("keystone egress: {target} port {port}: {e}\n"),
            )
        }
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("keystone egress: {target} port {port} sent no response\n"),
            )
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(d), Ok(u)) = tokio::join!(downstream, up) else {
                    return;
                };
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
            });
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|b| b.boxed())
}

pub(crate) fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Remove the headers that describe one hop (RFC 9110 §7.6.1) and the
/// proxy's own, keeping `Connection: upgrade` + `Upgrade` for a switch.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            h.remove(name);
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
    ] {
        h.remove(name);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// An allowed tunnel: where it goes and how it was opened.
pub(crate) struct Flow {
    pub(crate) target: Target,
    pub(crate) port: u16,
    pub(crate) ctx: Arc<Ctx>,
    /// "CONNECT" or "capture", for the log.
    pub(crate) via: &'static str,
}

/// Bytes already read from the client, then the client.
struct Prefixed<S> {
    buf: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.buf.len() {
            let n = (self.buf.len() - self.pos).min(out.remaining());
            let start = self.pos;
            out.put_slice(&self.buf[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the client's first bytes are.
enum Kind {
    Undecided,
    Tls(Option<String>),
    BadTls(String),
    NotTls,
    Http,
    Raw,
}

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

fn classify(buf: &[u8], port: u16) -> Kind {
    if sni::is_tls(buf) {
        return match sni::parse(buf) {
            Hello::Complete(s) => Kind::Tls(s),
            Hello::Incomplete if buf.len() < sni::MAX_HELLO => Kind::Undecided,
            Hello::Incomplete => Kind::BadTls("ClientHello too large".into()),
            Hello::Invalid(e) => Kind::BadTls(e),
        };
    }
    if port == 443 {
        return Kind::NotTls;
    }
    if port == 80 {
        return Kind::Http;
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Kind::Http;
    }
    if METHODS
        .iter()
        .any(|m| buf.len() < m.len() && m.starts_with(buf))
    {
        return Kind::Undecided;
    }
    Kind::Raw
}

/// Wait for the client's first bytes while passing anything the server
/// says first (ssh, smtp banners) straight to the client.
async fn first_bytes_passing<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut cbuf = [0u8; 4096];
    let mut sbuf = [0u8; 8192];
    loop {
        tokio::select! {
            r = client.read(&mut cbuf) => {
                let n = r?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&cbuf[..n]);
                return Ok(());
            }
            r = up.read(&mut sbuf) => {
                let n = r?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                client.write_all(&sbuf[..n]).await?;
            }
        }
    }
}

async fn read_more<C: AsyncRead + Unpin>(
    client: &mut C,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout_at(deadline, client.read(&mut chunk))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Does the ClientHello's SNI fit the flow?
fn check_sni(flow: &Flow, sni: Option<&str>) -> Decision {
    let ok = |rule: String| Decision {
        allowed: true,
        rule,
    };
    match (&flow.target, sni) {
        (Target::Name(n), Some(s)) => match normalize_name(s) {
            Ok(s) if &s == n => ok(format!("SNI {s} matches")),
            _ => deny(format!(
                "SNI {} does not match {} {n}",
                s.escape_debug(),
                flow.via
            )),
        },
        (Target::Name(n), None) => deny(format!("ClientHello without SNI for {} {n}", flow.via)),
        (Target::Addr(a), None) => ok(format!("no SNI, to address {a}")),
        (Target::Addr(a), Some(s)) => match Target::parse(s) {
            Ok(Target::Addr(b)) if b == *a => ok(format!("SNI is the address {a}")),
            Ok(t @ Target::Name(_)) => {
                let d = flow.ctx.policy().decide(&t, flow.port);
                if d.allowed {
                    ok(format!("SNI {t} to {a}: {}", d.rule))
                } else {
                    deny(format!("SNI {t} to address {a}: {}", d.rule))
                }
            }
            _ => deny(format!("SNI {} to address {a}", s.escape_debug())),
        },
    }
}

/// The upstream side of a tunnel while its client's first bytes are
/// looked at.
enum Upstream {
    /// Connected before the client spoke (CONNECT, server-first ports).
    Open(TcpStream),
    /// Being dialled from a kept answer while the ClientHello is read
    /// (captured 443): used only once the hello passes; otherwise dropped
    /// without a byte sent to it.
    Early(EarlyDial),
    /// To be connected once the first bytes pass.
    Later,
}

type DialResult = Option<Result<(TcpStream, IpAddr), upstream::Refusal>>;

/// An [`upstream::dial_kept`] running beside the ClientHello read;
/// dropping it cancels the dial, or closes the connection it made.
struct EarlyDial(tokio::task::JoinHandle<DialResult>);

impl Drop for EarlyDial {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EarlyDial {
    fn start(ctx: &Arc<Ctx>, name: &str, port: u16, policy: Arc<Policy>) -> EarlyDial {
        let ctx = ctx.clone();
        let name = name.to_string();
        EarlyDial(tokio::spawn(async move {
            upstream::dial_kept(&name, port, &policy, policy.resolver(), &ctx.resolutions).await
        }))
    }

    /// The connection, if the dial succeeded and the current policy still
    /// lets the flow reach the address it went to.
    async fn finish(mut self, flow: &Flow) -> Option<TcpStream> {
        let (stream, ip) = (&mut self.0).await.ok()??.ok()?;
        let policy = flow.ctx.policy();
        let still = policy.decide(&flow.target, flow.port).allowed
            && upstream::may_reach(ip, flow.port, &policy);
        still.then_some(stream)
    }
}

/// Run an allowed tunnel: look at the client's first bytes (module docs),
/// then relay, serve HTTP with Host checks, or close.
async fn relay<C>(mut client: C, mut upstream: Upstream, flow: Flow)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let port = flow.port;
    let t0 = std::time::Instant::now();
    let mut buf = Vec::with_capacity(4096);
    let first = match &mut upstream {
        // Server-first protocols: no deadline until the client speaks.
        Upstream::Open(up) if port != 80 && port != 443 => {
            first_bytes_passing(&mut client, up, &mut buf).await
        }
        _ => read_more(&mut client, &mut buf, Instant::now() + HEADER_TIMEOUT).await,
    };
    if first.is_err() {
        return;
    }
    let t_first = t0.elapsed();
    let deadline = Instant::now() + HEADER_TIMEOUT;
    let kind = loop {
        match classify(&buf, port) {
            Kind::Undecided => {
                if let Err(e) = read_more(&mut client, &mut buf, deadline).await {
                    if sni::is_tls(&buf) {
                        let d = deny(format!("incomplete ClientHello: {e}"));
                        flow.ctx.record("tls", &flow.target, port, &d);
                        return;
                    }
                    break Kind::Raw;
                }
            }
            k => break k,
        }
    };
    match kind {
        Kind::Tls(name) => {
            let d = check_sni(&flow, name.as_deref());
            flow.ctx.record("tls", &flow.target, port, &d);
            if !d.allowed {
                return;
            }
            // A credential's host: terminate TLS here and inject.
            if let (Target::Name(n), Some(inj)) = (&flow.target, flow.ctx.credentials.get()) {
                if inj.intercepts(n, port) {
                    drop(upstream);
                    let client = Prefixed {
                        buf,
                        pos: 0,
                        inner: client,
                    };
                    intercept::serve(client, flow, inj).await;
                    return;
                }
            }
        }
        Kind::BadTls(e) => {
            let d = deny(format!("not a ClientHello keystone accepts: {e}"));
            flow.ctx.record("tls", &flow.target, port, &d);
            return;
        }
        Kind::NotTls => {
            let d = deny("non-TLS bytes on port 443".into());
            flow.ctx.record("tls", &flow.target, port, &d);
            return;
        }
        Kind::Http => {
            drop(upstream);
            serve_checked_http(
                Prefixed {
                    buf,
                    pos: 0,
                    inner: client,
                },
                flow,
            )
            .await;
            return;
        }
        Kind::Raw | Kind::Undecided => {}
    }
    let t_checked = t0.elapsed();
    let early = matches!(upstream, Upstream::Early(_));
    let ready = match upstream {
        Upstream::Open(u) => Some(u),
        // Anything but a usable connection: connect as if there had been
        // no early dial (which also records a refusal).
        Upstream::Early(e) => e.finish(&flow).await,
        Upstream::Later => None,
    };
    let mut up = match ready {
        Some(u) => u,
        None => {
            let policy = flow.ctx.policy();
            match flow.ctx.connect(&flow.target, port, &policy).await {
                Ok(s) => s,
                Err(r) => {
                    if r.denied {
                        flow.ctx.record("tcp", &flow.target, port, &deny(r.reason));
                    } else {
                        tracing::warn!(target = %flow.target, port, "egress upstream: {}", r.reason);
                    }
                    return;
                }
            }
        }
    };
    if up.write_all(&buf).await.is_err() {
        return;
    }
    tracing::debug!(
        target = %flow.target,
        via = flow.via,
        early,
        first_bytes_us = t_first.as_micros() as u64,
        checked_us = t_checked.as_micros() as u64,
        relaying_us = t0.elapsed().as_micros() as u64,
        "egress timing: tunnel relaying"
    );
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, RELAY_BUF, RELAY_BUF).await;
}

/// Plain HTTP inside a tunnel or a captured connection: every request's
/// host must be the flow's, and each is checked and forwarded on its own.
async fn serve_checked_http<S>(io: S, flow: Flow)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let flow = Arc::new(flow);
    let svc = hyper::service::service_fn(move |req| {
        let flow = flow.clone();
        async move { Ok::<_, Infallible>(checked_request(&flow, req).await) }
    });
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client may shut its write side once its request is sent.
        .half_close(true)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
    if let Err(e) = r {
        tracing::debug!("egress http: {e}");
    }
}

async fn checked_request(flow: &Flow, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = check_host(flow, &req) {
        return refused;
    }
    forward(&flow.ctx, &flow.target, flow.port, req).await
}

/// Does the request name the flow's host (URI authority and Host agreeing)?
/// `None` if so; otherwise the 403 to answer, already logged.
pub(crate) fn check_host(flow: &Flow, req: &Request<Incoming>) -> Option<Response<Body>> {
    let ctx = &flow.ctx;
    let uri_host = req.uri().authority().map(|a| a.as_str().to_string());
    let header_host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).to_string());
    let named = match (&uri_host, &header_host) {
        (Some(u), Some(h)) if !u.eq_ignore_ascii_case(h) => None,
        (Some(u), _) => Some(u.clone()),
        (None, Some(h)) => Some(h.clone()),
        (None, None) => None,
    };
    let matches = named.as_deref().and_then(|n| {
        let (h, p) = split_host_port(n).ok()?;
        let t = Target::parse(h).ok()?;
        Some(t == flow.target && p.is_none_or(|p| p == flow.port))
    });
    if matches != Some(true) {
        let shown = named
            .or(header_host)
            .unwrap_or_else(|| "(none)".into())
            .escape_debug()
            .to_string();
        let d = deny(format!(
            "Host {shown} does not match {} {}",
            flow.via, flow.target
        ));
        ctx.record("http", &flow.target, flow.port, &d);
        return Some(text(
            StatusCode::FORBIDDEN,
            format!(
                "keystone egress: this connection is to {} port {}, but the request names {shown}; refused.\n",
                flow.target, flow.port
            ),
        ));
    }
    None
}

/// Log what [`inject::Injector::apply`] did to one request.
pub(crate) fn record_credentials(
    ctx: &Ctx,
    proto: &str,
    target: &Target,
    port: u16,
    out: &inject::Outcome,
) {
    for name in &out.injected {
        let d = Decision {
            allowed: true,
            rule: format!("injected {name}"),
        };
        ctx.record(proto, target, port, &d);
    }
    for name in &out.passed {
        let why = if proto == "http" {
            "plain HTTP is never given a real value"
        } else {
            "not one of its hosts"
        };
        let d = Decision {
            allowed: true,
            rule: format!("placeholder of {name} passed unchanged ({why})"),
        };
        ctx.record(proto, target, port, &d);
    }
}

/// A guest connection as the egress point receives it: a TCP socket in
/// the egress namespace, or a stream the Kubernetes relay brought.
pub trait GuestConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Close at once so the guest fails fast.
    fn refuse(self);
}

impl GuestConn for TcpStream {
    /// A TCP reset (SO_LINGER 0).
    fn refuse(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(&self, nix::sys::socket::sockopt::Linger, &linger);
        drop(self);
    }
}

/// Serve captured connections until the task is dropped.
pub async fn serve_capture(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("egress capture accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(dest) = stream.local_addr() else {
            stream.refuse();
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle_capture(stream, dest, ctx.clone()));
    }
}

/// One captured connection; `dest` is the address the guest dialled (the
/// accepted socket's local address, which [`serve_capture`] passes, or
/// what the Kubernetes relay read from its socket).
pub async fn handle_capture<S: GuestConn>(stream: S, dest: SocketAddr, ctx: Arc<Ctx>) {
    let port = dest.port();
    let target = match dest.ip().to_canonical() {
        IpAddr::V4(v4) if pool::in_range(v4) => match ctx.pool.lookup(v4) {
            Some(n) => Target::Name(n),
            None => {
                let d = deny(format!(
                    "{v4} is not an address this sandbox's DNS gave out"
                ));
                ctx.record("tcp", &Target::Addr(v4.into()), port, &d);
                stream.refuse();
                return;
            }
        },
        ip => Target::Addr(ip),
    };
    let policy = ctx.policy();
    let d = policy.decide(&target, port);
    ctx.record("tcp", &target, port, &d);
    if !d.allowed {
        if port == 80 {
            refuse_http(stream, denied_text(&ctx.sandbox, &target, port, &d.rule)).await;
        } else {
            stream.refuse();
        }
        return;
    }
    // On 80 and 443 the client speaks first: look before sending it
    // anything. On 443 a name's kept answer is dialled meanwhile (the
    // client's TLS setup takes milliseconds); no resolver is asked until
    // the ClientHello has passed.
    let upstream = if port == 80 {
        Upstream::Later
    } else if port == 443 {
        match &target {
            _ if ctx.intercepts(&target, port) => Upstream::Later,
            Target::Name(n) => Upstream::Early(EarlyDial::start(&ctx, n, port, policy)),
            Target::Addr(_) => Upstream::Later,
        }
    } else {
        match ctx.connect(&target, port, &policy).await {
            Ok(s) => Upstream::Open(s),
            Err(r) => {
                if r.denied {
                    ctx.record("tcp", &target, port, &deny(r.reason));
                } else {
                    tracing::warn!(%target, port, "egress upstream: {}", r.reason);
                }
                stream.refuse();
                return;
            }
        }
    };
    let flow = Flow {
        target,
        port,
        ctx: ctx.clone(),
        via: "capture",
    };
    relay(stream, upstream, flow).await;
}

/// Answer a 403 on a captured port-80 connection, then close.
async fn refuse_http<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, body: String) {
    let head = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Drain what the client sends, so closing does not reset the reply away.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capture flow to `name` on 443 whose early dial went to a local
    /// listener; the client's side of the tunnel; what the listener got
    /// (and whether it was connected at all).
    async fn early_flow(
        name: &str,
    ) -> (
        tokio::task::JoinHandle<()>,
        TcpStream,
        tokio::task::JoinHandle<Option<Vec<u8>>>,
    ) {
        crate::policy::allow_loopback_rules_for_tests();
        let policy = crate::policy::Spec {
            allow: vec![name.to_string(), "127.0.0.0/8:*".into()],
            ..Default::default()
        }
        .compile()
        .expect("compile");
        let ctx = Arc::new(Ctx::new(
            policy,
            FakePool::in_memory(),
            DecisionLog::discard(),
            "testbox",
        ));
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let at = server.local_addr().expect("addr");
        let got = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.ok()?;
            let mut all = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
            Some(all)
        });
        let dial = EarlyDial(tokio::spawn(async move {
            let s = TcpStream::connect(at).await.expect("early dial");
            Some(Ok((s, at.ip())))
        }));
        let guest = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(guest.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = guest.accept().await.expect("accept");
        let flow = Flow {
            target: Target::Name(name.to_string()),
            port: 443,
            ctx,
            via: "capture",
        };
        let relayed = tokio::spawn(relay(ours, Upstream::Early(dial), flow));
        (relayed, client, got)
    }

    #[tokio::test]
    async fn an_early_dial_is_dropped_unused_when_the_sni_disagrees() {
        let (relayed, mut client, got) = early_flow("tls.test").await;
        client
            .write_all(&sni::build_client_hello(Some("evil.test")))
            .await
            .expect("hello");
        tokio::time::timeout(Duration::from_secs(5), relayed)
            .await
            .expect("relay ends")
            .expect("relay");
        let got = got.await.expect("server");
        assert_eq!(got, Some(Vec::new()), "connected early, but sent nothing");
    }

    #[tokio::test]
    async fn an_early_dial_carries_the_hello_when_the_sni_agrees() {
        let (_relayed, mut client, got) = early_flow("tls.test").await;
        let hello = sni::build_client_hello(Some("tls.test"));
        client.write_all(&hello).await.expect("hello");
        client.shutdown().await.expect("shutdown");
        let got = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .expect("in time")
            .expect("server");
        assert_eq!(got, Some(hello));
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("a.com:8080").expect("p"),
            ("a.com", Some(8080))
        );
        assert_eq!(split_host_port("a.com").expect("p"), ("a.com", None));
        assert_eq!(split_host_port("[::1]:80").expect("p"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]").expect("p"), ("[::1]", None));
        assert!(split_host_port("a.com:x").is_err());
        assert!(split_host_port("[::1]x").is_err());
    }

    #[test]
    fn classify_first_bytes() {
        assert!(matches!(classify(b"GET / HTTP/1.1\r\n", 8080), Kind::Http));
        assert!(matches!(classify(b"GE", 8080), Kind::Undecided));
        assert!(matches!(classify(b"SSH-2.0-OpenSSH\r\n", 22), Kind::Raw));
        assert!(matches!(
            classify(b"SSH-2.0-OpenSSH\r\n", 443),
            Kind::NotTls
        ));
        assert!(matches!(classify(b"xyz", 80), Kind::Http));
        assert!(matches!(classify(&[0x16, 3, 1], 22), Kind::Undecided));
        let h = sni::build_client_hello(Some("a.com"));
        assert!(matches!(classify(&h, 443), Kind::Tls(Some(n)) if n == "a.com"));
    }

    #[test]
    fn denied_text_names_the_command() {
        let t = denied_text(
            "dev",
            &Target::Name("evil.com".into()),
            443,
            "no rule allows it",
        );
        assert!(t.contains("keystone agent allow dev evil.com\n"), "{t}");
        let t = denied_text("dev", &Target::Name("git.x".into()), 22, "deny git.x");
        assert!(t.contains("keystone agent allow dev git.x:22"), "{t}");
        assert!(t.contains("deny wins"), "{t}");
        let t = denied_text(
            "dev",
            &Target::Addr("2001:db8::1".parse().expect("a")),
            22,
            "r",
        );
        assert!(t.contains("allow dev [2001:db8::1]:22"), "{t}");
    }
}
