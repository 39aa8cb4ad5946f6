//! `keystone agent attach --web`: a web terminal for a session, served from
//! the host on 127.0.0.1.
//!
//! The page is xterm.js (fetched from the npm registry at build time by
//! build.rs and compiled into the binary). Each browser tab opens one
//! WebSocket, and the server bridges it to a host PTY running the very ssh
//! command the terminal attach runs ([`crate::commands::attach::session_command`]),
//! so browsers and terminals are clients of one multiplexer session.
//!
//! Every request must carry the sandbox's token (`?token=`), kept 0600 in
//! the sandbox's state directory; anything else gets 403. The listener
//! binds 127.0.0.1 only, on a port the kernel picks.

mod pty;

use crate::context::Ctx;
use crate::error::{CliError, Result};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keystone_channel::Channel;
use keystone_registry::Sandbox;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

const INDEX: &str = include_str!("index.html");
const CLIENT_JS: &str = include_str!("client.js");
const XTERM_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/xterm.js"));
const XTERM_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/xterm.css"));
const FIT_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/webterm/addon-fit.js"));

/// The token file in the sandbox's state directory.
pub const TOKEN_FILE: &str = "web-token";

/// The sandbox's web token: made once (32 random bytes, hex), then reused
/// so a bookmarked URL keeps working; the file is (re)set to 0600.
pub fn token(sandbox_dir: &Path) -> Result<String> {
    let path = sandbox_dir.join(TOKEN_FILE);
    let io = |e: std::io::Error| CliError::failed(format!("{}: {e}", path.display()));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim().to_string();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            return Ok(text);
        }
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| CliError::failed(format!("cannot read /dev/urandom: {e}")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(sandbox_dir).map_err(io)?;
    let tmp = sandbox_dir.join(format!(".{TOKEN_FILE}.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(token.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(token)
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
    token: String,
    title: String,
    channel: Channel,
    sandbox: Sandbox,
    worktree: String,
}

type Shared = Arc<Server>;
type Params = Query<HashMap<String, String>>;

impl Server {
    fn authorized(&self, q: &HashMap<String, String>) -> bool {
        q.get("token").is_some_and(|t| same(t, &self.token))
    }
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "403 Forbidden: this keystone web terminal needs its token; open the URL `keystone agent attach --web` printed\n",
    )
        .into_response()
}

async fn index(State(s): State<Shared>, Query(q): Params) -> Response {
    if !s.authorized(&q) {
        return forbidden();
    }
    let page = INDEX
        .replace("{{TOKEN}}", &s.token)
        .replace("{{TITLE}}", &html_escape(&s.title));
    ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

async fn asset(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(q): Params,
) -> Response {
    if !s.authorized(&q) {
        return forbidden();
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

async fn ws(State(s): State<Shared>, Query(q): Params, upgrade: WebSocketUpgrade) -> Response {
    if !s.authorized(&q) {
        return forbidden();
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
    let spawned = crate::commands::attach::session_command(&s.channel, &s.sandbox, &s.worktree)
        .map_err(|e| e.message)
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
pub fn serve(ctx: &Ctx, sb: &Sandbox, worktree: &str, channel: Channel) -> Result<i32> {
    let token = token(&ctx.sandbox_dir(sb))?;
    let session = crate::commands::worktree::session(sb, worktree);
    let mux = crate::session::Multiplexer::of(sb).name();
    let mux_keys = crate::session::Multiplexer::of(sb);
    let server = Arc::new(Server {
        token: token.clone(),
        title: session.clone(),
        channel,
        sandbox: sb.clone(),
        worktree: worktree.to_string(),
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/ws", get(ws))
        .with_state(server);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the web server: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| CliError::failed(format!("cannot listen on 127.0.0.1: {e}")))?;
        let port = listener.local_addr()?.port();
        let url = format!("http://127.0.0.1:{port}/?token={token}");
        let how = if open_browser(&url) {
            "opened in your browser"
        } else {
            "open it in a browser"
        };
        println!("web terminal for {mux} session {session}: {url}");
        println!(
            "({how}; {keys} in the page detaches it; Ctrl-C stops serving, the session goes on)",
            keys = mux_keys.detach_keys()
        );
        let _ = std::io::stdout().flush();
        tokio::select! {
            served = axum::serve(listener, app) => {
                served.map_err(|e| CliError::failed(format!("web server: {e}")))?;
            }
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, CliError>(())
    })?;
    // Open browser clients' ssh processes end with their tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = token(dir.path()).expect("token");
        assert_eq!(t.len(), 64);
        let meta = std::fs::metadata(dir.path().join(TOKEN_FILE)).expect("file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(token(dir.path()).expect("again"), t);
        std::fs::set_permissions(
            dir.path().join(TOKEN_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        token(dir.path()).expect("again");
        let meta = std::fs::metadata(dir.path().join(TOKEN_FILE)).expect("file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
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
