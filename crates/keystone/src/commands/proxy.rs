//! The dev-server proxy from the CLI's side: `keystone agent proxy status`,
//! the hidden `__proxy` subcommand that is the proxy process, and starting
//! it (detached, one per user) from `start`.

use crate::cli::ProxyStatusArgs;
use crate::context::Ctx;
use crate::detached::{self, ReadyPipe, Verdict};
use crate::error::{CliError, Result};
use crate::ui;
use keystone_proxy::state::{self, Snapshot};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `start` waits for a new proxy to bind its port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `status` waits for a dev server's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `keystone __proxy --port P --domain D`: run the proxy until nothing is
/// left to serve. Tells `start` "ready" or "error: …" on `KEYSTONE_READY_FD`.
pub fn daemon(port: u16, domain: String) -> Result<i32> {
    let ctx = Ctx::new()?;
    let mut pipe = ReadyPipe::from_env();
    let opts = keystone_proxy::daemon::Options {
        state_root: ctx.registry.root().to_path_buf(),
        port,
        domain,
    };
    let result = keystone_proxy::daemon::run(opts, |r| match r {
        Ok(()) => pipe.ready(),
        Err(e) => pipe.failed(e),
    });
    result.map_err(|e| CliError::failed(e.to_string()))?;
    Ok(0)
}

/// Make sure the user's proxy runs with this port and domain (restarting
/// one that runs with other settings); the URL of `sandbox` through it.
pub fn ensure(ctx: &Ctx, cfg: &keystone_config::ProxyConfig) -> std::result::Result<(), String> {
    let root = ctx.registry.root();
    if let Some(snap) = state::read(root) {
        if snap.port == cfg.port && snap.domain == cfg.domain {
            return Ok(());
        }
        // The configuration changed: the old one gives way.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(snap.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while state::is_running(root) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else if state::is_running(root) {
        // Just started by another `start`, not yet written its snapshot.
        return Ok(());
    }
    spawn(ctx, root, cfg)
}

fn spawn(
    ctx: &Ctx,
    root: &Path,
    cfg: &keystone_config::ProxyConfig,
) -> std::result::Result<(), String> {
    std::fs::create_dir_all(state::dir(root)).map_err(|e| e.to_string())?;
    let log_path = state::log_path(root);
    let port = cfg.port.to_string();
    let args = ["__proxy", "--port", &port, "--domain", &cfg.domain];
    let verdict = detached::spawn(&ctx.exe, &args, &log_path, READY_TIMEOUT)
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    match verdict {
        Verdict::Ready => Ok(()),
        Verdict::Silent => Err(format!(
            "the proxy exited at once; see {}",
            log_path.display()
        )),
        Verdict::Failed(why) => Err(why),
        Verdict::TimedOut => Err(format!(
            "the proxy did not start within {}s; see {}",
            READY_TIMEOUT.as_secs(),
            log_path.display()
        )),
    }
}

/// A dev server as `status` and `proxy status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct DevServer {
    pub port: u16,
    pub worktree: String,
    pub command: String,
    pub pid: u32,
    /// Through the proxy's port (each worktree's lowest port).
    pub url: Option<String>,
    /// At the same port number on the host.
    pub port_url: Option<String>,
    /// The dev server answered an HTTP request through the proxy.
    pub answers: bool,
    /// The status it answered with, or why it did not.
    pub answer: String,
}

/// The dev servers of one sandbox, probed through the proxy.
pub fn dev_servers(snap: &Snapshot, sandbox: &str) -> Vec<DevServer> {
    let Some(routes) = snap.sandboxes.iter().find(|s| s.name == sandbox) else {
        return Vec::new();
    };
    routes
        .servers
        .iter()
        .map(|s| {
            let target = s
                .url
                .as_deref()
                .map(|u| (snap.port, u))
                .or(s.port_url.as_deref().map(|u| (s.server.port, u)));
            let (answers, answer) = match target {
                None => (
                    false,
                    "not reachable from the host (host port unavailable)".into(),
                ),
                Some((port, url)) => {
                    let host = url
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or("");
                    match keystone_proxy::probe(port, host, PROBE_TIMEOUT) {
                        Ok(a) if !a.from_proxy => (true, format!("HTTP {}", a.status)),
                        Ok(a) => (false, format!("proxy answered {}", a.status)),
                        Err(e) => (false, e),
                    }
                }
            };
            DevServer {
                port: s.server.port,
                worktree: s.server.worktree.clone(),
                command: s.server.command.clone(),
                pid: s.server.pid,
                url: s.url.clone(),
                port_url: s.port_url.clone(),
                answers,
                answer,
            }
        })
        .collect()
}

pub fn print_dev_server(d: &DevServer) {
    let urls: Vec<&str> = [d.url.as_deref(), d.port_url.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    println!(
        "dev server: port {} ({}, {}): {} — {}",
        d.port,
        ui::escape_controls(&d.command),
        ui::escape_controls(&d.worktree),
        if urls.is_empty() {
            "-".to_string()
        } else {
            urls.join(" , ")
        },
        if d.answers {
            format!("answers ({})", d.answer)
        } else {
            format!("does not answer ({})", d.answer)
        }
    );
}

#[derive(Serialize)]
struct StatusJson {
    running: bool,
    pid: Option<u32>,
    port: Option<u16>,
    domain: Option<String>,
    host_ports: Vec<u16>,
    host_ports_unavailable: Vec<(u16, String)>,
    sandboxes: Vec<SandboxJson>,
}

#[derive(Serialize)]
struct SandboxJson {
    name: String,
    running: bool,
    url: String,
    worktrees: Vec<String>,
    dev_servers: Vec<DevServer>,
    error: Option<String>,
}

/// `keystone agent proxy status`.
pub fn status(args: ProxyStatusArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let root = ctx.registry.root();
    let Some(snap) = state::read(root) else {
        if args.json {
            let out = StatusJson {
                running: false,
                pid: None,
                port: None,
                domain: None,
                host_ports: Vec::new(),
                host_ports_unavailable: Vec::new(),
                sandboxes: Vec::new(),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| CliError::failed(e.to_string()))?
            );
        } else {
            println!(
                "proxy: not running (`keystone agent start` starts it when `[proxy] enable = true`)"
            );
        }
        return Ok(0);
    };
    let sandboxes: Vec<SandboxJson> = snap
        .sandboxes
        .iter()
        .map(|s| SandboxJson {
            name: s.name.clone(),
            running: s.running,
            url: s.url.clone(),
            worktrees: s.worktrees.clone(),
            dev_servers: dev_servers(&snap, &s.name),
            error: s.error.clone(),
        })
        .collect();
    if args.json {
        let out = StatusJson {
            running: true,
            pid: Some(snap.pid),
            port: Some(snap.port),
            domain: Some(snap.domain.clone()),
            host_ports: snap.host_ports.clone(),
            host_ports_unavailable: snap.host_ports_unavailable.clone(),
            sandboxes,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| CliError::failed(e.to_string()))?
        );
        return Ok(0);
    }
    println!(
        "proxy: running (pid {}) on 127.0.0.1:{}, domain {}",
        snap.pid, snap.port, snap.domain
    );
    if !snap.host_ports.is_empty() {
        let ports: Vec<String> = snap.host_ports.iter().map(u16::to_string).collect();
        println!("host ports: {}", ports.join(", "));
    }
    for (p, why) in &snap.host_ports_unavailable {
        println!("host port {p}: unavailable ({why})");
    }
    for s in &sandboxes {
        println!();
        println!(
            "{}: {} {}",
            s.name,
            if s.running { "running" } else { "not running" },
            s.url
        );
        if let Some(e) = &s.error {
            println!("  discovery error: {e}");
        }
        if s.running && s.dev_servers.is_empty() {
            println!("  no dev server listening");
        }
        for d in &s.dev_servers {
            print!("  ");
            print_dev_server(d);
        }
    }
    Ok(0)
}
