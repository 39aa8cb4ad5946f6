//! `keystone agent attach --web`: a web terminal for a session, served from
//! the host on 127.0.0.1.
//!
//! The page is xterm.js (fetched from the npm registry at build time by
//! build.rs and compiled into the binary). Each browser tab opens one
//! WebSocket, and the server bridges it to a host PTY running the very ssh
//! command the terminal attach runs ([`crate::session::command`]),
//! so browsers and terminals are clients of one multiplexer session.
//!
//! Access (../shared/SECURITY-NOTES.md §9): the URL printed and handed to
//! the browser carries a one-time ticket (256 random bits), good for
//! [`TICKET_TTL`] and one use. The first load trades it for a session
//! cookie (`HttpOnly; SameSite=Strict`, named after the port, since cookies
//! do not tell ports apart) and redirects to `/`, so the ticket leaves the
//! address bar; after that the ticket is dead, and what is left in argv,
//! history or scrollback opens nothing. Enter in the serving terminal
//! prints a fresh link. Every request must name this server in `Host`
//! (`127.0.0.1:PORT` or `localhost:PORT`: a DNS-rebinding page cannot), a
//! WebSocket must come from this server's `Origin`, and nothing is written
//! to disk. The listener binds 127.0.0.1 only, on a port the kernel picks.

mod pty;

use crate::context::Ctx;
use crate::error::{CliError, Result};
use crate::session::Scripts as _;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keystone_channel::Channel;
use keystone_registry::Sandbox;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("index.html");
const CLIENT_JS: &str = include_str!("client.js");
const XTERM_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/xterm.js"));
const XTERM_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/xterm.css"));
const FIT_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/addon-fit.js"));

/// How long a printed link may wait for its browser.
pub const TICKET_TTL: Duration = Duration::from_secs(120);

/// 32 random bytes, hex.
fn secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CliError::failed(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The one-time tickets handed out and the sessions they opened, in
/// memory only (they die with the server).
#[derive(Default)]
struct Access {
    tickets: Mutex<Vec<(String, Instant)>>,
    sessions: Mutex<Vec<String>>,
}

impl Access {
    /// A new ticket, valid for [`TICKET_TTL`] from `now`.
    fn mint(&self, now: Instant) -> Result<String> {
        let t = secret()?;
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        tickets.retain(|(_, expires)| *expires > now);
        tickets.push((t.clone(), now + TICKET_TTL));
        Ok(t)
    }

    /// Use `ticket` up: a new session's id if it was live, else None.
    fn redeem(&self, ticket: &str, now: Instant) -> Option<String> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let at = tickets.iter().position(|(t, _)| same(t, ticket))?;
        let (_, expires) = tickets.remove(at);
        if expires <= now {
            return None;
        }
        let id = secret().ok()?;
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
        Some(id)
    }

    fn session(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .fold(false, |found, s| found | same(s, id))
    }
}

/// Constant-time, so the token cannot be guessed a byte at a time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

struct Server {
    port: u16,
    access: Access,
    title: String,
    channel: Channel,
    sandbox: Sandbox,
    worktree: String,
}

type Shared = Arc<Server>;
type Params = Query<HashMap<String, String>>;

impl Server {
    fn cookie_name(&self) -> String {
        format!("keystone-web-{}", self.port)
    }

    /// `Host` names this server: anything else is another site's page
    /// reaching it through a rebound name.
    fn host_ok(&self, headers: &HeaderMap) -> bool {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        [
            format!("127.0.0.1:{}", self.port),
            format!("localhost:{}", self.port),
        ]
        .iter()
        .any(|h| h == host)
    }

    /// `Origin` is this server's own (required for a WebSocket: browsers
    /// always send it there; optional elsewhere, but never another's).
    fn origin_ok(&self, headers: &HeaderMap, required: bool) -> bool {
        match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            None => !required,
            Some(origin) => [
                format!("http://127.0.0.1:{}", self.port),
                format!("http://localhost:{}", self.port),
            ]
            .iter()
            .any(|o| o == origin),
        }
    }

    /// The request's session cookie is one this server opened.
    fn signed_in(&self, headers: &HeaderMap) -> bool {
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == name && self.access.session(v))
    }

    /// Host, Origin and session, for everything but the ticket's own load.
    fn allowed(&self, headers: &HeaderMap, websocket: bool) -> bool {
        self.host_ok(headers) && self.origin_ok(headers, websocket) && self.signed_in(headers)
    }
}

fn forbidden(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CACHE_CONTROL, "no-store")],
        format!("403 Forbidden: {why}\n"),
    )
        .into_response()
}

const NOT_SIGNED_IN: &str = "this keystone web terminal opens only from the link `keystone agent attach --web` printed (each link works once; press Enter there for a new one)";

async fn index(State(s): State<Shared>, Query(q): Params, headers: HeaderMap) -> Response {
    if !s.host_ok(&headers) || !s.origin_ok(&headers, false) {
        return forbidden("this keystone web terminal answers only to its own address");
    }
    if let Some(ticket) = q.get("token") {
        return match s.access.redeem(ticket, Instant::now()) {
            Some(id) => (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_string()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                    (
                        header::SET_COOKIE,
                        format!(
                            "{}={id}; Path=/; HttpOnly; SameSite=Strict",
                            s.cookie_name()
                        ),
                    ),
                ],
            )
                .into_response(),
            None => forbidden(
                "this link was already used or has expired; press Enter in the terminal running `keystone agent attach --web` for a new one",
            ),
        };
    }
    if !s.signed_in(&headers) {
        return forbidden(NOT_SIGNED_IN);
    }
    let page = INDEX.replace("{{TITLE}}", &html_escape(&s.title));
    // Only this server's own scripts and socket; never inside a frame.
    let policy = format!(
        "default-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self' ws://127.0.0.1:{0} ws://localhost:{0}; frame-ancestors 'none'",
        s.port
    );
    (
        [
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
            (header::X_FRAME_OPTIONS, "DENY".to_string()),
            (header::CONTENT_SECURITY_POLICY, policy),
        ],
        Html(page),
    )
        .into_response()
}

async fn asset(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if !s.allowed(&headers, false) {
        return forbidden(NOT_SIGNED_IN);
    }
    let (body, kind): (&'static [u8], &str) = match name.as_str() {
        "xterm.js" => (XTERM_JS, "text/javascript; charset=utf-8"),
        "addon-fit.js" => (FIT_JS, "text/javascript; charset=utf-8"),
        "client.js" => (CLIENT_JS.as_bytes(), "text/javascript; charset=utf-8"),
        "xterm.css" => (XTERM_CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn ws(
    State(s): State<Shared>,
    Query(q): Params,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !s.allowed(&headers, true) {
        return forbidden(NOT_SIGNED_IN);
    }
    let size = |k: &str, default: u16| {
        q.get(k)
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|n| (1..=1000).contains(n))
            .unwrap_or(default)
    };
    let (cols, rows) = (size("cols", 80), size("rows", 24));
    upgrade.on_upgrade(move |socket| bridge(socket, s, cols, rows))
}

/// One browser client: WebSocket ⇄ PTY until either side ends.
async fn bridge(mut socket: WebSocket, s: Shared, cols: u16, rows: u16) {
    let spawned = crate::session::command(&s.channel, &s.sandbox, &s.worktree)
        .map_err(|e| e.to_string())
        .and_then(|mut cmd| {
            // The browser is an xterm with colours and UTF-8, whatever
            // terminal the server was started from.
            cmd.env("TERM", "xterm-256color")
                .env("COLORTERM", "truecolor")
                .env("LANG", "C.UTF-8")
                .env_remove("LC_ALL")
                .env_remove("LC_CTYPE");
            pty::Pty::spawn(cmd, cols, rows)
                .map_err(|e| format!("cannot start the session client: {e}"))
        });
    let (pty, mut output) = match spawned {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("web terminal: {e}");
            let _ = socket
                .send(Message::Text(format!("keystone: {e}\r\n").into()))
                .await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    };
    loop {
        tokio::select! {
            out = output.recv() => match out {
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
                None => {
                    // The client detached or the connection dropped.
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => pty.write(bytes.to_vec()),
                Some(Ok(Message::Text(text))) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) {
                        let dim = |k: &str| v[k].as_u64().and_then(|n| u16::try_from(n).ok());
                        if let (Some(c), Some(r)) = (dim("cols"), dim("rows")) {
                            pty.resize(c, r);
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Opens `url` in the user's browser: `$BROWSER` if set, else `xdg-open`
/// when there is a graphical session. Returns whether one was started.
fn open_browser(url: &str) -> bool {
    let quiet = |cmd: &mut std::process::Command| {
        cmd.arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
    };
    if let Some(browser) = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.trim().is_empty())
    {
        // $BROWSER may list several, separated by ':'; the first is used.
        let first = browser.split(':').next().unwrap_or_default();
        let words = shell_words::split(first).unwrap_or_default();
        if let Some((program, args)) = words.split_first() {
            return quiet(std::process::Command::new(program).args(args));
        }
    }
    let graphical = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    if graphical {
        if let Some(xdg) = keystone_channel::which("xdg-open") {
            return quiet(&mut std::process::Command::new(xdg));
        }
    }
    false
}

/// Serves the worktree's session until Ctrl-C.
pub fn serve(_ctx: &Ctx, sb: &Sandbox, worktree: &str, channel: Channel) -> Result<i32> {
    let session = crate::session::name(sb, worktree);
    let mux = crate::session::of(sb).name();
    let mux_keys = crate::session::of(sb);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the web server: {e}")))?;
    let sandbox = sb.clone();
    let worktree = worktree.to_string();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| CliError::failed(format!("cannot listen on 127.0.0.1: {e}")))?;
        let port = listener.local_addr()?.port();
        let server = Arc::new(Server {
            port,
            access: Access::default(),
            title: session.clone(),
            channel,
            sandbox,
            worktree,
        });
        let link = move |s: &Server| -> Result<String> {
            Ok(format!(
                "http://127.0.0.1:{port}/?token={}",
                s.access.mint(Instant::now())?
            ))
        };
        let url = link(&server)?;
        let how = if open_browser(&url) {
            "opened in your browser"
        } else {
            "open it in a browser"
        };
        println!("web terminal for {mux} session {session}: {url}");
        println!(
            "({how}; the link works once, within {} s; Enter here prints a new one; {keys} in the page detaches it; Ctrl-C stops serving, the session goes on)",
            TICKET_TTL.as_secs(),
            keys = mux_keys.detach_keys()
        );
        let _ = std::io::stdout().flush();
        // Enter on the serving terminal: a fresh link for another browser.
        let again = server.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            while stdin.read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
                match link(&again) {
                    Ok(url) => println!("new link (works once): {url}"),
                    Err(e) => eprintln!("{}", e.message),
                }
                let _ = std::io::stdout().flush();
            }
        });
        let app = Router::new()
            .route("/", get(index))
            .route("/assets/{name}", get(asset))
            .route("/ws", get(ws))
            .with_state(server);
        tokio::select! {
            served = axum::serve(listener, app) => {
                served.map_err(|e| CliError::failed(format!("web server: {e}")))?;
            }
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, CliError>(())
    })?;
    // Open browser clients' ssh processes end with their tasks; the thread
    // reading stdin ends with the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_one_session_once_and_only_in_time() {
        let a = Access::default();
        let now = Instant::now();
        let t = a.mint(now).expect("ticket");
        assert_eq!(t.len(), 64);
        let id = a.redeem(&t, now).expect("a live ticket opens a session");
        assert!(a.session(&id));
        assert!(a.redeem(&t, now).is_none(), "a ticket works once");
        assert!(!a.session(&t), "the ticket is no session");
        assert!(!a.session("nope"));
        let late = a.mint(now).expect("ticket");
        assert!(
            a.redeem(&late, now + TICKET_TTL).is_none(),
            "an expired ticket opens nothing"
        );
        assert!(a.redeem(&late, now).is_none(), "and is gone");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }

    #[test]
    fn the_front_end_is_inside() {
        assert!(XTERM_JS.len() > 100_000);
        assert!(FIT_JS.len() > 1_000);
        assert!(String::from_utf8_lossy(XTERM_CSS).contains(".xterm"));
    }
}
