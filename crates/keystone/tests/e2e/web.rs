//! `attach --web` in Debian's Chromium (headless, driven through
//! chromedriver), sharing its session with a terminal client.

use crate::harness::{eventually, Host, HostTerminal};
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails (never skips) without the browser, naming Debian's packages.
fn require_browser() {
    for (tool, pkg) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
        ("/usr/bin/tmux", "tmux"),
    ] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is required for the web terminal test: apt-get install {pkg}"
        );
    }
}

/// Where tests leave files for people to look at (screenshots).
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// `keystone agent attach --web` in the background; its URL from stdout.
struct WebServer {
    child: Child,
    /// The first link it printed.
    url: String,
    /// What it prints after that, a line at a time.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for WebServer {
    /// A failed test must not leave the server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first `http://127.0.0.1:` URL in `line`.
fn url_in(line: &str) -> Option<String> {
    let at = line.find("http://127.0.0.1:")?;
    Some(
        line[at..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
    )
}

impl WebServer {
    fn start(h: &Host, extra: &[&str]) -> WebServer {
        Self::start_env(h, extra, &[])
    }

    // The child is waited for by `interrupt` or `Drop`.
    #[allow(clippy::zombie_processes)]
    fn start_env(h: &Host, extra: &[&str], env: &[(&str, &str)]) -> WebServer {
        let mut args = vec!["attach", "--web"];
        args.extend_from_slice(extra);
        let mut child = h.ks_spawn_stdin(&args, env);
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push_str(&line);
                seen.push('\n');
                if let Some(url) = url_in(&line) {
                    return WebServer {
                        child,
                        url,
                        lines: rx,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("attach --web exited with {status} before serving:\n{seen}{err}");
            }
        }
        let _ = child.kill();
        panic!("attach --web printed no URL within 60 s:\n{seen}");
    }

    fn port(&self) -> u16 {
        self.url
            .trim_start_matches("http://127.0.0.1:")
            .split('/')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in URL")
    }

    fn token(url: &str) -> String {
        url.split("token=")
            .nth(1)
            .expect("token in URL")
            .to_string()
    }

    /// Enter on the serving terminal: the fresh link it prints.
    fn new_link(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"\n").expect("enter");
        stdin.flush().expect("flush");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                if let Some(url) = url_in(&line) {
                    return url;
                }
            }
        }
        panic!("no new link after Enter");
    }

    /// Ctrl-C, as a user would; the exit status.
    fn interrupt(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("attach --web did not stop on Ctrl-C within 15 s");
    }
}

/// A plain HTTP/1.1 GET to the server with `headers` (Host is
/// `127.0.0.1:PORT` unless given): the whole response head.
fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let upgrade = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("upgrade"));
    if !upgrade {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut head = String::new();
    let mut reader = BufReader::new(s);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push_str(&line),
        }
    }
    head
}

/// The status line of a plain HTTP/1.1 GET to the server.
fn http_status(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    http_get(port, path, headers)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A WebSocket upgrade request's status line.
fn ws_status(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    let mut all = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    all.extend_from_slice(headers);
    http_status(port, path, &all)
}

struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let up = eventually(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "chromedriver did not listen on {port} within 20 s");
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1000,640"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session through chromedriver")
}

/// The terminal's text as the page shows it.
async fn page_text(c: &Client) -> String {
    c.execute(
        "const r = document.querySelector('.xterm-rows'); return r ? r.innerText : '';",
        vec![],
    )
    .await
    .ok()
    .and_then(|v| v.as_str().map(str::to_string))
    .unwrap_or_default()
}

async fn wait_text(c: &Client, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if page_text(c).await.contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn type_keys(c: &Client, text: &str) {
    let input = c
        .find(Locator::Css(".xterm-helper-textarea"))
        .await
        .expect("xterm's input element");
    input.send_keys(text).await.expect("type");
}

/// The whole web flow: a browser and a terminal on one session, typing
/// both ways, colours and Unicode, resize, a refused wrong token, a
/// screenshot; Ctrl-C ends the server with 0; a stopped sandbox is exit 2.
pub fn web_terminal(h: Host) {
    require_browser();
    let name = h.name();
    h.start(&[]).ok();
    let mut web = WebServer::start(&h, &[]);
    let port = web.port();
    assert!(web.url.starts_with("http://127.0.0.1:"), "{}", web.url);
    let ticket = WebServer::token(&web.url);
    assert_eq!(ticket.len(), 64, "{}", web.url);
    // No secret on disk: the ticket lives in the server only.
    let sandbox_dir = h.state_dir().join(format!("sandboxes/{name}"));
    let on_disk = std::fs::read_dir(&sandbox_dir)
        .expect("sandbox dir")
        .flatten()
        .filter(|e| e.path().is_file())
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(&ticket)
        });
    assert!(
        !on_disk,
        "the ticket is written in {}",
        sandbox_dir.display()
    );

    // Host is checked first: a rebinding page's request is refused and
    // does not use the ticket up.
    let link = format!("/?token={ticket}");
    for host in [
        "evil.example:80",
        &format!("evil.example:{port}"),
        "127.0.0.1",
    ] {
        let status = http_status(port, &link, &[("Host", host)]);
        assert!(status.contains(" 403"), "Host {host}: {status}");
    }
    let status = http_status(port, &link, &[("Origin", "http://evil.example")]);
    assert!(status.contains(" 403"), "another Origin: {status}");
    // The link works once: a session cookie, HttpOnly and SameSite=Strict,
    // and a redirect that takes the ticket out of the address bar.
    let head = http_get(port, &link, &[]);
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie:\n{head}"));
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"),
        "{cookie_line}"
    );
    assert!(
        head.to_ascii_lowercase().contains("location: /\r"),
        "{head}"
    );
    let cookie = cookie_line
        .split_once(':')
        .map(|(_, v)| v.trim())
        .and_then(|v| v.split(';').next())
        .expect("cookie")
        .to_string();
    let status = http_status(port, &link, &[]);
    assert!(
        status.contains(" 403"),
        "a used link opened again: {status}"
    );
    // The cookie opens the page and its assets, nothing else does.
    let with = [("Cookie", cookie.as_str())];
    assert!(http_status(port, "/", &with).contains(" 200"));
    assert!(http_status(port, "/assets/xterm.js", &with).contains(" 200"));
    for path in [
        "/",
        "/?token=wrong",
        "/assets/xterm.js",
        &format!("/assets/xterm.js?token={ticket}"),
    ] {
        let status = http_status(port, path, &[]);
        assert!(status.contains(" 403"), "{path}: {status}");
    }
    let status = http_status(port, "/", &[("Cookie", "keystone-web-1=forged")]);
    assert!(status.contains(" 403"), "a forged cookie: {status}");
    let status = http_status(
        port,
        "/",
        &[("Cookie", cookie.as_str()), ("Host", "evil.example")],
    );
    assert!(
        status.contains(" 403"),
        "the cookie under another Host: {status}"
    );
    // The WebSocket: the cookie and this server's Origin, both required.
    let origin = format!("http://127.0.0.1:{port}");
    let status = ws_status(port, "/ws", &[("Origin", origin.as_str())]);
    assert!(
        status.contains(" 403"),
        "websocket without the cookie: {status}"
    );
    let status = ws_status(port, "/ws", &[("Cookie", cookie.as_str())]);
    assert!(
        status.contains(" 403"),
        "websocket without an Origin: {status}"
    );
    let status = ws_status(
        port,
        "/ws",
        &[
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
        ],
    );
    assert!(
        status.contains(" 403"),
        "websocket from another Origin: {status}"
    );
    let status = ws_status(
        port,
        "/ws",
        &[("Cookie", cookie.as_str()), ("Origin", origin.as_str())],
    );
    assert!(
        status.contains(" 101"),
        "websocket with cookie and Origin: {status}"
    );
    // The browser gets a link of its own (Enter on the serving terminal).
    let browser_link = web.new_link();
    assert_ne!(WebServer::token(&browser_link), ticket);

    let driver = Driver::start();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let shot = artifacts_dir().join(format!("web-terminal-{}.png", h.backend));
    let terminal = rt.block_on(async {
        let c = browser(&driver).await;
        // A wrong token gets the refusal page, not a terminal.
        c.goto(&format!("http://127.0.0.1:{port}/?token=wrong"))
            .await
            .expect("goto");
        let body = c.source().await.unwrap_or_default();
        assert!(body.contains("403 Forbidden"), "{body}");

        c.goto(&browser_link).await.expect("goto");
        let landed = c.current_url().await.expect("url").to_string();
        assert!(!landed.contains("token="), "the ticket stayed in the address bar: {landed}");
        let prompt = format!("agent@{name}:/workspace");
        assert!(
            wait_text(&c, &prompt, Duration::from_secs(30)).await,
            "no shell prompt in the page:\n{}",
            page_text(&c).await
        );
        // Typed in the browser, run in the session: output, Unicode, colour.
        type_keys(&c, "echo web-$((6*7)) ünïcødé ✓; printf '\\033[31mRED\\033[0m-done\\n'\n").await;
        assert!(
            wait_text(&c, "web-42 ünïcødé ✓", Duration::from_secs(15)).await,
            "the command's output never showed:\n{}",
            page_text(&c).await
        );
        assert!(wait_text(&c, "RED-done", Duration::from_secs(10)).await);
        let red = c
            .execute(
                "return [...document.querySelectorAll('.xterm-rows span')].some(s => s.textContent.includes('RED') && (s.className.includes('xterm-fg-1') || getComputedStyle(s).color === 'rgb(205, 49, 49)'));",
                vec![],
            )
            .await
            .expect("js");
        assert_eq!(red, serde_json::Value::Bool(true), "RED is not drawn in red");

        // A terminal client on the same session sees it, and what it types
        // shows in the browser.
        let terminal = HostTerminal::new(&h, "web", "attach");
        assert!(
            eventually(Duration::from_secs(30), || terminal.screen().contains("web-42")),
            "the terminal client does not see the browser's command:\n{}",
            terminal.screen()
        );
        terminal.keys(&["echo from-terminal-$((7*6))", "Enter"]);
        assert!(
            wait_text(&c, "from-terminal-42", Duration::from_secs(15)).await,
            "the browser does not see the terminal's command:\n{}",
            page_text(&c).await
        );

        // Resizing the browser window resizes the session's terminal.
        type_keys(&c, "clear; echo COLS=$(tput cols)=\n").await;
        assert!(wait_text(&c, "COLS=", Duration::from_secs(10)).await);
        let cols = |t: String| {
            t.split("COLS=")
                .filter_map(|s| s.split('=').next()?.trim().parse::<u32>().ok())
                .last()
        };
        // "COLS=" shows first in the echoed command line: wait for the
        // number itself.
        let mut before = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && before.is_none() {
            before = cols(page_text(&c).await);
            if before.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        c.set_window_size(1400, 800).await.expect("resize");
        tokio::time::sleep(Duration::from_millis(700)).await;
        type_keys(&c, "clear; echo COLS=$(tput cols)=\n").await;
        // The cleared screen first shows only the echoed command line (no
        // number yet): wait for a number that differs from the first.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut after = before;
        while Instant::now() < deadline && (after.is_none() || after == before) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            after = cols(page_text(&c).await);
        }
        assert!(
            matches!((before, after), (Some(b), Some(a)) if a > b),
            "resize did not reach the session: {before:?} -> {after:?}"
        );
        type_keys(&c, "clear; printf '\\033[1;32mkeystone\\033[0m web terminal: ünïcødé ✓\\n'; ls -la --color=always /workspace\n").await;
        assert!(wait_text(&c, "web terminal: ünïcødé", Duration::from_secs(10)).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = c.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(&shot, png).expect("write screenshot");
        let _ = c.close().await;
        terminal
    });
    eprintln!("screenshot: {}", shot.display());
    // The terminal client is still attached to the session the browser left.
    terminal.keys(&["echo still-$((1+1))", "Enter"]);
    assert!(
        eventually(Duration::from_secs(10), || terminal
            .screen()
            .contains("still-2")),
        "{}",
        terminal.screen()
    );
    drop(terminal);
    drop(driver);
    assert_eq!(
        web.interrupt(),
        Some(0),
        "Ctrl-C must stop the server with 0"
    );
    let sessions = h.sh("tmux list-sessions -F '#{session_name}'");
    assert!(sessions.contains(&format!("{name}-main")), "{sessions}");

    // Stopped sandbox: exit 2 and a clear message, as for the terminal.
    h.ks(&["stop", "--force"]).ok();
    let r = h.ks(&["attach", "--web"]);
    r.code(2);
    assert!(r.text().contains("is not running"), "{}", r.text());
}

/// `session.multiplexer = "zellij"`: the same worktree sessions, terminal
/// attach and detach, web terminal, switching and removal, with Zellij
/// (built from crates.io into the image cache) instead of tmux.
pub fn zellij_sessions(h: Host) {
    require_browser();
    let name = h.name();
    let config = h.tmp.path().join("config/keystone/agent.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("\n[session]\nmultiplexer = \"zellij\"\n");
    h.write(&config, &text);
    h.start(&[]).ok();
    assert!(
        h.sh("zellij --version")
            .contains(keystone_image::tools::ZELLIJ_VERSION),
        "zellij is not in the image"
    );
    h.ks(&["worktree", "add", "feature-z", "--create"]).ok();

    // Terminal attach to the worktree's session.
    let term = HostTerminal::new(&h, "zj", "attach --worktree feature-z");
    let prompt = format!("agent@{name}:/workspace/.worktrees/feature-z");
    assert!(
        eventually(Duration::from_secs(60), || term.screen().contains(&prompt)),
        "no shell in the zellij session:\n{}",
        term.screen()
    );
    term.keys(&["echo zz-$((5*5))", "Enter"]);
    assert!(
        eventually(Duration::from_secs(15), || term.screen().contains("zz-25")),
        "{}",
        term.screen()
    );
    let rows = |h: &Host| -> serde_json::Value {
        let r = h.ks(&["worktree", "list", "--json"]);
        serde_json::from_str(&r.ok().stdout).expect("json")
    };
    let list = rows(&h);
    let row = list
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["branch"] == "feature-z")
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["session"], format!("{name}-feature-z"), "{list}");
    assert_eq!(row["session_running"], true, "{list}");
    assert_eq!(row["current"], true, "{list}");

    // The browser joins the same Zellij session.
    let web = WebServer::start(&h, &["--worktree", "feature-z"]);
    let driver = Driver::start();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let shot = artifacts_dir().join("web-terminal-zellij.png");
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&web.url).await.expect("goto");
        assert!(
            wait_text(&c, "zz-25", Duration::from_secs(60)).await,
            "the browser does not show the session:\n{}",
            page_text(&c).await
        );
        type_keys(&c, "echo from-browser-$((8*8)) ✓\n").await;
        assert!(
            wait_text(&c, "from-browser-64 ✓", Duration::from_secs(20)).await,
            "{}",
            page_text(&c).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = c.screenshot().await.expect("screenshot");
        std::fs::write(&shot, png).expect("write screenshot");
        let _ = c.close().await;
    });
    eprintln!("screenshot: {}", shot.display());
    assert!(
        eventually(Duration::from_secs(15), || term
            .screen()
            .contains("from-browser-64")),
        "the terminal does not see the browser's command:\n{}",
        term.screen()
    );
    drop(driver);
    assert_eq!(web.interrupt(), Some(0));

    // Switch to the main checkout's session from inside, then detach.
    term.keys(&["keystone-switch main", "Enter"]);
    assert!(
        eventually(Duration::from_secs(60), || term
            .screen()
            .contains(&format!("agent@{name}:/workspace$"))),
        "keystone-switch did not move the zellij client:\n{}",
        term.screen()
    );
    term.keys(&["C-o"]);
    std::thread::sleep(Duration::from_millis(300));
    term.keys(&["d"]);
    assert!(
        eventually(Duration::from_secs(15), || term
            .screen()
            .contains("ATTACH-EXIT=")),
        "detach did not return to the host shell:\n{}",
        term.screen()
    );
    assert!(term.screen().contains("ATTACH-EXIT=0"), "{}", term.screen());
    drop(term);
    let sessions = h.sh("zellij list-sessions --no-formatting --short");
    assert!(
        sessions.contains(&format!("{name}-feature-z")),
        "{sessions}"
    );
    assert!(sessions.contains(&format!("{name}-main")), "{sessions}");

    // Removing the worktree ends its session; the other one is untouched.
    h.ks(&["worktree", "remove", "feature-z", "--force"]).ok();
    let sessions = h.sh("zellij list-sessions --no-formatting --short; true");
    assert!(
        !sessions.contains(&format!("{name}-feature-z")),
        "{sessions}"
    );
    assert!(sessions.contains(&format!("{name}-main")), "{sessions}");
    h.ks(&["attach", "--worktree", "feature-z"]).code(1);
}
