//! The HTTP side: accepting browsers' connections (HTTP/1.1 with upgrades,
//! or HTTP/2 with prior knowledge), routing each request by its host, and
//! passing it over the sandbox's SSH channel to the dev server, with a
//! keep-alive pool of upstream connections (hyper-util's client over our
//! [`Connector`], whose "connect" is a `direct-tcpip` channel open).
//!
//! Limits, so one slow or hostile client never holds up the others: the
//! request head must arrive within [`HEADER_TIMEOUT`] and fit in
//! [`MAX_HEADER_BYTES`] (else hyper answers 431), an upstream connection
//! must open within [`CONNECT_TIMEOUT`] and answer within
//! [`RESPONSE_TIMEOUT`]. Bodies stream both ways with no size limit (large
//! uploads) and no timeout (long polls, server-sent events).

use crate::discover::Discovery;
use crate::link::{Link, LinkError};
use crate::pages::{escape, page};
use crate::route::{self, HostRoute};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A sandbox as the proxy sees it.
pub struct Entry {
    pub name: String,
    pub id: String,
    pub project: PathBuf,
    pub running: AtomicBool,
    pub link: Arc<Link>,
    pub discovery: RwLock<Found>,
}

/// The last discovery poll's outcome.
#[derive(Clone, Debug, Default)]
pub struct Found {
    pub discovery: Discovery,
    pub error: Option<String>,
    /// At least one poll succeeded since the sandbox (re)started.
    pub polled: bool,
}

impl Entry {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub fn found(&self) -> Found {
        self.discovery.read().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Every sandbox, by name; shared by the listeners, the connector and the
/// daemon's loop that refreshes it.
pub struct Table {
    pub domain: String,
    pub main_port: u16,
    pub sandboxes: RwLock<BTreeMap<String, Arc<Entry>>>,
}

impl Table {
    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.sandboxes.read().ok()?.get(name).cloned()
    }

    fn by_id(&self, id: &str) -> Option<Arc<Entry>> {
        self.sandboxes
            .read()
            .ok()?
            .values()
            .find(|e| e.id == id)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Entry>> {
        self.sandboxes
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Opens upstream connections: the URI's host is the sandbox id, its port
/// the guest port (see [`upstream_uri`]).
#[derive(Clone)]
pub struct Connector {
    table: Arc<Table>,
}

/// An upstream connection: one `direct-tcpip` channel.
pub struct Tunnel {
    io: TokioIo<russh::ChannelStream<russh::client::Msg>>,
}

impl hyper::rt::Read for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connection for Tunnel {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no sandbox with id {0}")]
    Gone(String),
    #[error("{0}")]
    Link(#[from] LinkError),
}

impl tower_service::Service<Uri> for Connector {
    type Response = Tunnel;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Tunnel, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let table = self.table.clone();
        Box::pin(async move {
            let id = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            let entry = table
                .by_id(&id)
                .ok_or_else(|| ConnectError::Gone(id.clone()))?;
            let host = entry
                .found()
                .discovery
                .server_on(port)
                .map(|s| s.connect.clone())
                .unwrap_or_else(|| "127.0.0.1".into());
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, entry.link.open_tcp(&host, port))
                .await
                .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
            Ok(Tunnel {
                io: TokioIo::new(stream),
            })
        })
    }
}

pub type UpClient = Client<Connector, Incoming>;

pub fn client(table: Arc<Table>) -> UpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .build(Connector { table })
}

/// What each listener shares.
pub struct Ctx {
    pub table: Arc<Table>,
    pub client: UpClient,
}

/// Accept connections on `listener` (the proxy's port, or a host port
/// mirroring a guest port) until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, local_port: u16) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(port = local_port, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, peer, ctx.clone(), local_port));
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>, local_port: u16) {
    // The first bytes decide HTTP/2 (prior knowledge) or HTTP/1.1; a client
    // that sends nothing is dropped after the header timeout.
    let h2 = match tokio::time::timeout(HEADER_TIMEOUT, is_h2(&stream)).await {
        Ok(Ok(h2)) => h2,
        _ => return,
    };
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, peer, local_port, req).await) }
    });
    let io = TokioIo::new(stream);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(io, svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection: {e}");
    }
}

async fn is_h2(stream: &TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A partial preface: wait for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn full(resp: Response<http_body_util::Full<Bytes>>) -> Response<Body> {
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Route one request and pass it on, or answer it ourselves.
pub async fn handle(
    ctx: &Ctx,
    peer: SocketAddr,
    local_port: u16,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let table = &ctx.table;
    // The host: the URI's authority (HTTP/2, or an absolute-form HTTP/1.1
    // target) or the Host header; both present and different is refused,
    // so no request can name one sandbox to us and another to the server.
    let header_host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let uri_host = req.uri().authority().map(|a| a.as_str().to_string());
    let raw_host = match (uri_host, header_host) {
        (Some(u), Some(h)) if !u.eq_ignore_ascii_case(&h) => {
            return full(page(
                StatusCode::BAD_REQUEST,
                "Conflicting hosts",
                "<p>The request names one host in its target and another in its <code>Host</code> header.</p>",
            ))
        }
        (Some(u), _) => u,
        (None, Some(h)) => h,
        (None, None) => {
            return full(page(
                StatusCode::BAD_REQUEST,
                "No host",
                "<p>The request has no <code>Host</code> header, so it names no sandbox.</p>",
            ))
        }
    };
    let Some((host, _)) = route::split_host_port(&raw_host) else {
        return full(page(
            StatusCode::BAD_REQUEST,
            "Malformed host",
            &format!(
                "<p>Cannot read the host <code>{}</code>.</p>",
                escape(&raw_host)
            ),
        ));
    };
    let Some(HostRoute { sandbox, worktree }) = route::parse_host(&host, &table.domain) else {
        return full(unknown(table, &host));
    };
    let Some(entry) = table.get(&sandbox) else {
        return full(unknown(table, &host));
    };
    if !entry.is_running() {
        return full(not_running(&entry));
    }
    let found = entry.found();
    let branch = match worktree.as_deref() {
        None => "main".to_string(),
        Some(label) => match found.discovery.worktree_for_label(label) {
            Some(b) => b.to_string(),
            None if !found.polled => label.to_string(),
            None => return full(no_worktree(table, &entry, label, &found.discovery)),
        },
    };
    let port = if local_port == table.main_port {
        match found.discovery.default_server(&branch) {
            Some(s) => s.port,
            None => return full(no_server(&entry, &branch, &found)),
        }
    } else {
        local_port
    };

    let upgrade = req.version() == Version::HTTP_11 && wants_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let uri: Uri = match format!("http://{}:{port}{path}", entry.id).parse() {
        Ok(u) => u,
        Err(_) => {
            return full(page(
                StatusCode::BAD_REQUEST,
                "Malformed target",
                "<p>Cannot read the request's path.</p>",
            ))
        }
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    forwarding_headers(&mut parts.headers, &raw_host, peer, local_port);
    let mut up = Request::from_parts(parts, body);
    *up.uri_mut() = uri;
    *up.version_mut() = Version::HTTP_11;

    let mut resp = match tokio::time::timeout(RESPONSE_TIMEOUT, ctx.client.request(up)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return full(upstream_error(&entry, port, &e)),
        Err(_) => {
            return full(page(
                StatusCode::GATEWAY_TIMEOUT,
                "The dev server did not answer",
                &format!(
                    "<p>Port {port} in sandbox <b>{}</b> accepted the request but sent no response within {}s.</p>",
                    escape(&entry.name),
                    RESPONSE_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(d), Ok(u)) = tokio::join!(downstream, upstream) else {
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

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Remove the headers that describe one hop (RFC 9110 §7.6.1), keeping
/// `Connection: upgrade` + `Upgrade` for a protocol switch.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
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
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(name);
    }
    h.remove(header::CONNECTION);
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// `Host` as the browser sent it (dev servers check it and build absolute
/// URLs from it), plus the de-facto `X-Forwarded-*` set and RFC 7239's
/// `Forwarded`.
fn forwarding_headers(h: &mut HeaderMap, host: &str, peer: SocketAddr, local_port: u16) {
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(header::HOST, v.clone());
        h.insert("x-forwarded-host", v);
    }
    let ip = peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    h.insert("x-forwarded-port", HeaderValue::from(local_port));
    let fwd = if peer.is_ipv6() {
        format!("for=\"[{ip}]\";host=\"{host}\";proto=http")
    } else {
        format!("for={ip};host=\"{host}\";proto=http")
    };
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.insert(header::FORWARDED, v);
    }
}

fn sandbox_list(table: &Table) -> String {
    let all = table.all();
    if all.is_empty() {
        return "<p>There are no sandboxes. Start one in a git repository with <code>keystone agent start</code>.</p>".into();
    }
    let mut s = String::from("<p>Sandboxes:</p><ul>");
    for e in all {
        let url = route::url(&e.name, None, &table.domain, table.main_port);
        s.push_str(&format!(
            "<li><a href=\"{u}\">{u}</a> ({})</li>",
            if e.is_running() {
                "running"
            } else {
                "not running"
            },
            u = escape(&url)
        ));
    }
    s.push_str("</ul>");
    s
}

fn unknown(table: &Table, host: &str) -> Response<http_body_util::Full<Bytes>> {
    page(
        StatusCode::NOT_FOUND,
        "No such sandbox",
        &format!(
            "<p>No sandbox answers at <code>{}</code>. Sandboxes answer at <code>&lt;sandbox&gt;.{d}</code>, and a worktree's at <code>&lt;branch&gt;.&lt;sandbox&gt;.{d}</code>.</p>{}",
            escape(host),
            sandbox_list(table),
            d = escape(&table.domain)
        ),
    )
}

fn not_running(e: &Entry) -> Response<http_body_util::Full<Bytes>> {
    let cmd = format!("keystone agent start {}", e.project.display());
    let mut resp = page(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("sandbox {} is not running", e.name),
        &format!(
            "<p>Sandbox <b>{}</b> is not running, so its dev servers cannot answer.</p>\
<p>Start it with <code>{}</code> (or <code>keystone agent start</code> in the project), then reload this page.</p>",
            escape(&e.name),
            escape(&cmd)
        ),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

fn no_worktree(
    table: &Table,
    e: &Entry,
    label: &str,
    d: &Discovery,
) -> Response<http_body_util::Full<Bytes>> {
    let mut list = String::new();
    for w in &d.worktrees {
        let url = route::url(&e.name, Some(w), &table.domain, table.main_port);
        list.push_str(&format!(
            "<li>{} — <a href=\"{u}\">{u}</a></li>",
            escape(w),
            u = escape(&url)
        ));
    }
    page(
        StatusCode::NOT_FOUND,
        "No such worktree",
        &format!(
            "<p>Sandbox <b>{}</b> has no worktree whose branch is <code>{}</code>. Add one with <code>keystone agent worktree add BRANCH</code>.</p><ul>{list}</ul>",
            escape(&e.name),
            escape(label)
        ),
    )
}

fn no_server(e: &Entry, branch: &str, f: &Found) -> Response<http_body_util::Full<Bytes>> {
    let where_ = if branch == "main" {
        format!("sandbox <b>{}</b>", escape(&e.name))
    } else {
        format!(
            "worktree <b>{}</b> of sandbox <b>{}</b>",
            escape(branch),
            escape(&e.name)
        )
    };
    let seen = if f.discovery.servers.is_empty() {
        "No process listens on a TCP port in the sandbox.".to_string()
    } else {
        let ports: Vec<String> = f
            .discovery
            .servers
            .iter()
            .map(|s| {
                format!(
                    "{} ({}, {})",
                    s.port,
                    escape(&s.command),
                    escape(&s.worktree)
                )
            })
            .collect();
        format!("Listening elsewhere: {}.", ports.join(", "))
    };
    let error = f
        .error
        .as_deref()
        .map(|e| format!("<p>Discovery failed: {}</p>", escape(e)))
        .unwrap_or_default();
    page(
        StatusCode::BAD_GATEWAY,
        "No dev server is listening",
        &format!(
            "<p>No dev server is listening in {where_}. Start one (it is picked up within a second), e.g. <code>python3 -m http.server 8000</code>.</p><p>{seen}</p>{error}"
        ),
    )
}

fn upstream_error(
    e: &Entry,
    port: u16,
    err: &hyper_util::client::legacy::Error,
) -> Response<http_body_util::Full<Bytes>> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(ConnectError::Link(LinkError::Refused { .. })) =
            s.downcast_ref::<ConnectError>()
        {
            return page(
                StatusCode::BAD_GATEWAY,
                &format!("Nothing is listening on port {port}"),
                &format!(
                    "<p>Nothing is listening on port {port} inside sandbox <b>{}</b>. Start the dev server there, then reload.</p>",
                    escape(&e.name)
                ),
            );
        }
        // The relay socket is gone: the sandbox stopped in the second
        // since the registry was last read.
        if let Some(ConnectError::Link(LinkError::Socket { .. })) = s.downcast_ref::<ConnectError>()
        {
            return not_running(e);
        }
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return page(
                StatusCode::BAD_GATEWAY,
                "Cannot reach the sandbox",
                &format!(
                    "<p>Cannot reach port {port} in sandbox <b>{}</b>: {}</p>",
                    escape(&e.name),
                    escape(&c.to_string())
                ),
            );
        }
        source = s.source();
    }
    page(
        StatusCode::BAD_GATEWAY,
        "The dev server failed",
        &format!(
            "<p>Port {port} in sandbox <b>{}</b> did not give a valid response: {}</p>",
            escape(&e.name),
            escape(&err.to_string())
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::UPGRADE).is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarding_headers_name_the_client_and_host() {
        let mut h = HeaderMap::new();
        let peer: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        forwarding_headers(&mut h, "app.sandbox.localhost:8080", peer, 8080);
        assert_eq!(h[header::HOST], "app.sandbox.localhost:8080");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-port"], "8080");
    }
}
