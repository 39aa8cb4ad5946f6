//! The dev-server proxy end to end: servers started inside running
//! sandboxes, reached from the host by hostname with curl, a raw socket
//! (WebSocket, slow and oversized requests) and Debian's Chromium.

use crate::harness::{eventually, run_bounded, Host, Run};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A small dev server for the guest (python3 is in every image): a page
/// naming the server and its directory, `/headers` echoing the request's
/// headers, POST answering with the body's length and SHA-256, and a
/// WebSocket echo at `/ws`.
const SERVER: &str = r#"
import base64, hashlib, http.server, json, os, sys, time
NAME = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send(self, code, body, ctype="text/plain"):
        b = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            acc = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", acc)
            self.end_headers()
            self.wfile.flush()
            while True:
                h = self.rfile.read(2)
                if len(h) < 2:
                    return
                op, n = h[0] & 15, h[1] & 127
                if n == 126:
                    n = int.from_bytes(self.rfile.read(2), "big")
                mask = self.rfile.read(4) if h[1] & 128 else b"\0\0\0\0"
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
                if op == 8:
                    self.wfile.write(b"\x88\x00"); self.wfile.flush(); return
                out = b"echo:" + data
                self.wfile.write(bytes([128 | op, len(out)]) + out)
                self.wfile.flush()
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                chunk = ("tick %d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(1)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/headers":
            self.send(200, json.dumps({k.lower(): v for k, v in self.headers.items()}), "application/json")
        else:
            self.send(200, "<!doctype html><html><head><title>%s</title></head><body style='font:40px sans-serif;background:#e8f4ff'><h1>hello from %s</h1><p>cwd %s</p></body></html>" % (NAME, NAME, os.getcwd()), "text/html")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h, left = hashlib.sha256(), n
        while left:
            c = self.rfile.read(min(left, 1 << 20))
            h.update(c)
            left -= len(c)
        self.send(200, "%d %s" % (n, h.hexdigest()))
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required for the proxy end-to-end tests: apt-get install {package}"
    );
}

/// A port free on the host right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn curl(args: &[&str]) -> Run {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    run_bounded(cmd, Duration::from_secs(30))
}

/// `curl URL` → (status, body).
fn get(url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-w", "\n%{http_code}", url];
    args.extend_from_slice(extra);
    let r = curl(&args);
    let (body, code) = r.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Start the test server in the sandbox of `dir`, in `cwd`, as the agent.
fn serve(h: &Host, dir: &std::path::Path, cwd: &str, port: u16, name: &str) {
    let script = format!(
        "mkdir -p /tmp/ks && cat > /tmp/ks/srv.py <<'PYEOF'\n{SERVER}\nPYEOF\n\
cd {cwd} && (setsid nohup python3 /tmp/ks/srv.py {port} {name} >/tmp/ks/srv-{port}.log 2>&1 < /dev/null &) && echo started"
    );
    let r = h.ks_at(dir, &["exec", "--", "bash", "-c", &script]);
    assert!(r.ok().stdout.contains("started"), "{}", r.text());
}

fn wait_body(url: &str, needle: &str) -> (u16, String) {
    let mut last = (0, String::new());
    let ok = eventually(Duration::from_secs(60), || {
        last = get(url, &[]);
        last.0 == 200 && last.1.contains(needle)
    });
    assert!(ok, "{url} never served {needle:?}; last answer {last:?}");
    last
}

/// A raw HTTP/1.1 exchange on 127.0.0.1:port; the whole answer.
fn raw(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

pub fn dev_proxy(h: Host) {
    require("curl", "curl");
    require("chromium", "chromium");
    let proxy = h.enable_proxy();
    let a = h.name();
    let domain = "sandbox.localhost";
    let r = h.start(&[]);
    r.ok();
    assert!(
        r.stdout.contains(&format!("http://{a}.{domain}:{proxy}/")),
        "{}",
        r.text()
    );

    // Nothing listens yet: the proxy says so.
    let (code, body) = get(&format!("http://{a}.{domain}:{proxy}/"), &[]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("No dev server is listening"), "{body}");

    // A server started after the sandbox is up is picked up by itself.
    let inner = free_port();
    serve(&h, &h.project, "/workspace", inner, &format!("{a}-main"));
    let main_url = format!("http://{a}.{domain}:{proxy}/");
    let (_, body) = wait_body(&main_url, &format!("hello from {a}-main"));
    assert!(body.contains("cwd /workspace<"), "{body}");
    // …and at the same port number on the host, by hostname.
    wait_body(
        &format!("http://{a}.{domain}:{inner}/"),
        &format!("hello from {a}-main"),
    );

    // Host and forwarding headers as a dev server expects them.
    let (_, hdrs) = get(&format!("http://{a}.{domain}:{proxy}/headers"), &[]);
    let hdrs: serde_json::Value = serde_json::from_str(&hdrs).expect("headers json");
    assert_eq!(hdrs["host"], format!("{a}.{domain}:{proxy}"), "{hdrs}");
    assert_eq!(hdrs["x-forwarded-host"], format!("{a}.{domain}:{proxy}"));
    assert_eq!(hdrs["x-forwarded-proto"], "http");
    assert_eq!(hdrs["x-forwarded-for"], "127.0.0.1");

    // A streamed response arrives as it is written, not when it ends.
    let r = curl(&[
        "-N",
        "-w",
        "\n%{time_starttransfer} %{time_total}",
        &format!("http://{a}.{domain}:{proxy}/stream"),
    ]);
    let (body, times) = r.stdout.rsplit_once('\n').expect("times");
    assert_eq!(body.trim_end(), "tick 0\ntick 1\ntick 2", "{}", r.text());
    let t: Vec<f64> = times
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(
        t[0] < 1.0 && t[1] >= 2.0,
        "first byte {}s, end {}s",
        t[0],
        t[1]
    );

    // Keep-alive: a second request on the same connection opens none.
    let r = curl(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{num_connects} ",
        &main_url,
        &main_url,
    ]);
    assert_eq!(r.stdout.trim(), "1 0", "{}", r.text());

    // HTTP/2 (prior knowledge) and a 20 MB upload.
    let r = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &main_url,
    ]);
    assert_eq!(r.stdout.trim(), "200 2", "{}", r.text());
    let upload = h.tmp.path().join("upload.bin");
    let data: Vec<u8> = (0..20_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&upload, &data).expect("write upload");
    let r = curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        "-H",
        "Content-Type: application/octet-stream",
        &main_url,
    ]);
    let sha = {
        let out = Command::new("sha256sum")
            .arg(&upload)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(r.stdout.trim(), format!("20000000 {sha}"), "{}", r.text());

    // A WebSocket echo through the proxy.
    let mut ws = TcpStream::connect(("127.0.0.1", proxy)).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(20))).ok();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: {a}.{domain}:{proxy}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).expect("handshake answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    for msg in ["ping", "second message"] {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        ws.write_all(&frame).expect("frame");
        let mut hdr = [0u8; 2];
        ws.read_exact(&mut hdr).expect("echo header");
        let mut payload = vec![0u8; (hdr[1] & 127) as usize];
        ws.read_exact(&mut payload).expect("echo payload");
        assert_eq!(hdr[0], 0x81);
        assert_eq!(String::from_utf8_lossy(&payload), format!("echo:{msg}"));
    }
    drop(ws);

    // A worktree's own server, at <branch>.<sandbox>.<domain>.
    h.ks(&["worktree", "add", "feat/web", "--create"]).ok();
    let inner_wt = free_port();
    serve(
        &h,
        &h.project,
        "/workspace/.worktrees/feat/web",
        inner_wt,
        &format!("{a}-feat"),
    );
    let (_, body) = wait_body(
        &format!("http://feat-web.{a}.{domain}:{proxy}/"),
        &format!("hello from {a}-feat"),
    );
    assert!(
        body.contains("cwd /workspace/.worktrees/feat/web<"),
        "{body}"
    );
    // The main hostname still reaches the main checkout's server.
    wait_body(&main_url, &format!("hello from {a}-main"));
    let (code, body) = get(&format!("http://nope.{a}.{domain}:{proxy}/"), &[]);
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("No such worktree") && body.contains("feat/web"),
        "{body}"
    );

    // status and proxy status list the dev servers with URLs, answering
    // (the proxy's snapshot follows discovery within a second or two).
    let mut st = serde_json::Value::Null;
    let listed = eventually(Duration::from_secs(20), || {
        st = h.status_json(&a);
        st["dev_servers"].as_array().is_some_and(|s| s.len() >= 2)
    });
    assert!(listed, "{st}");
    let servers = st["dev_servers"].as_array().expect("dev_servers").clone();
    let main_srv = servers
        .iter()
        .find(|s| s["port"] == inner)
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(main_srv["url"], main_url.as_str());
    assert_eq!(main_srv["answers"], true, "{st}");
    let wt_srv = servers
        .iter()
        .find(|s| s["port"] == inner_wt)
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(wt_srv["worktree"], "feat/web");
    assert_eq!(
        wt_srv["url"],
        format!("http://feat-web.{a}.{domain}:{proxy}/").as_str()
    );
    let r = h.ks(&["proxy", "status"]);
    assert!(
        r.ok().stdout.contains(&format!("127.0.0.1:{proxy}"))
            && r.stdout.contains(&format!("port {inner}"))
            && r.stdout.contains("answers"),
        "{}",
        r.text()
    );

    // A second sandbox on the same inner port stays apart.
    let second = h.second_project("other");
    let r = h.ks_at(&second, &["start", "--no-attach"]);
    r.ok();
    let b =
        serde_json::from_str::<serde_json::Value>(&h.ks_at(&second, &["status", "--json"]).stdout)
            .expect("status")["name"]
            .as_str()
            .expect("name")
            .to_string();
    // Still one proxy for the user.
    let proxies = crate::harness::processes_matching(&format!("__proxy --port {proxy} "));
    assert_eq!(proxies.len(), 1, "{proxies:?}");
    serve(&h, &second, "/workspace", inner, &format!("{b}-main"));
    wait_body(
        &format!("http://{b}.{domain}:{inner}/"),
        &format!("hello from {b}-main"),
    );
    wait_body(
        &format!("http://{b}.{domain}:{proxy}/"),
        &format!("hello from {b}-main"),
    );
    let (_, body) = get(&format!("http://{a}.{domain}:{inner}/"), &[]);
    assert!(body.contains(&format!("hello from {a}-main")), "{body}");

    // Forged hosts never reach another sandbox.
    for (host, code) in [
        (format!("{b}.{domain}.evil.example"), "404"),
        (format!("x.y.{b}.{domain}"), "404"),
        (format!("{b}.{domain}@{a}.{domain}"), "400"),
    ] {
        let answer = raw(
            inner,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {code}")) && !answer.contains("hello from"),
            "{host}: {answer}"
        );
    }
    let answer = raw(
        inner,
        &format!(
            "GET http://{b}.{domain}:{inner}/ HTTP/1.1\r\nHost: {a}.{domain}:{inner}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(
        answer.starts_with("HTTP/1.1 400") && !answer.contains("hello from"),
        "{answer}"
    );

    // Abuse: a client that never finishes its headers, and one whose
    // headers are too large, are cut off; others are served meanwhile.
    let mut slow = TcpStream::connect(("127.0.0.1", proxy)).expect("connect");
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {a}.{domain}\r\nX-Slow: ").as_bytes())
        .expect("write");
    let t = Instant::now();
    for _ in 0..5 {
        let t1 = Instant::now();
        let (code, _) = get(&main_url, &[]);
        assert_eq!(code, 200);
        assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
    }
    let big = "a".repeat(100 * 1024);
    let answer = raw(
        proxy,
        &format!("GET / HTTP/1.1\r\nHost: {a}.{domain}\r\nX-Big: {big}\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    slow.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(25),
        "the slow client was not cut off ({waited:?}, read {n} bytes)"
    );
    let (code, _) = get(&main_url, &[]);
    assert_eq!(code, 200);

    // A page in Debian's Chromium at its friendly URL, with a screenshot.
    let shot = artifacts_dir().join(format!("{a}.png"));
    let _ = std::fs::remove_file(&shot);
    let profile = h.tmp.path().join("chromium-profile");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=900,500",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--screenshot={}", shot.display()))
    .arg(format!("http://feat-web.{a}.{domain}:{proxy}/"));
    let r = run_bounded(cmd, Duration::from_secs(120));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 2000, "no screenshot ({size} bytes): {}", r.text());
    let mut dom = Command::new("chromium");
    dom.args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://feat-web.{a}.{domain}:{proxy}/"));
    let r = run_bounded(dom, Duration::from_secs(120));
    assert!(
        r.stdout.contains(&format!("hello from {a}-feat")),
        "chromium did not load the page: {}",
        r.text()
    );

    // A stopped sandbox answers clearly, at once.
    h.ks(&["stop"]).ok();
    let t = Instant::now();
    let (code, body) = get(&main_url, &[]);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("sandbox {a} is not running"))
            && body.contains("keystone agent start"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // The other sandbox is unaffected.
    wait_body(
        &format!("http://{b}.{domain}:{proxy}/"),
        &format!("hello from {b}-main"),
    );
    // An unknown host lists the sandboxes that exist.
    let (code, body) = get(&format!("http://nosuch.{domain}:{proxy}/"), &[]);
    assert_eq!(code, 404);
    assert!(
        body.contains(&format!("http://{a}.{domain}:{proxy}/")) && body.contains(&b),
        "{body}"
    );
    h.ks_at(&second, &["stop"]).ok();
}
