//! The proxy process (`keystone __proxy`): one per user, started detached by
//! `keystone agent start`, living on after the CLI exits.
//!
//! Once a second it re-reads the registry (which sandboxes exist, which
//! run), keeps one discovery poll per running sandbox, opens or closes the
//! host ports that mirror guest ports, and rewrites its snapshot file when
//! anything changed. It exits when the user's state directory is gone or
//! no sandbox is left (after `destroy` of the last one), or on SIGTERM.

use crate::discover::{self, Discovery};
use crate::link::Link;
use crate::route;
use crate::server::{self, Ctx, Entry, Found, Table};
use crate::state::{self, SandboxRoutes, ServerRoute, Snapshot};
use keystone_registry::{Registry, State};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the registry and each sandbox's listening ports are read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many of one sandbox's ports are mirrored on the host (the
/// lowest): a sandbox listening on thousands of ports must not make the
/// proxy squat the host's port space. The rest stay reachable through the
/// proxy's own port only if they are a worktree's default.
pub const MAX_MIRRORED_PORTS: usize = 32;
/// Bound on one discovery poll.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Options {
    /// The user's state directory (the registry's root).
    pub state_root: PathBuf,
    pub port: u16,
    pub domain: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a proxy already runs for this user (see `keystone agent proxy status`)")]
    AlreadyRunning,
    #[error("cannot listen on 127.0.0.1:{port}: {source}; free the port or set `[proxy] port` in the configuration")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Run the proxy until it has nothing left to serve. `ready` is called once
/// the port is bound (or with the reason it could not be).
pub fn run(opts: Options, ready: impl FnOnce(Result<(), String>)) -> Result<(), DaemonError> {
    let Some(lock) = state::try_lock(&opts.state_root)? else {
        ready(Err(DaemonError::AlreadyRunning.to_string()));
        return Err(DaemonError::AlreadyRunning);
    };
    let listener = match std::net::TcpListener::bind(("127.0.0.1", opts.port)) {
        Ok(l) => l,
        Err(source) => {
            let e = DaemonError::Bind {
                port: opts.port,
                source,
            };
            ready(Err(e.to_string()));
            return Err(e);
        }
    };
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    ready(Ok(()));
    let result = rt.block_on(main_loop(opts, listener));
    drop(lock);
    result
}

struct Daemon {
    opts: Options,
    ctx: Arc<Ctx>,
    polls: BTreeMap<String, JoinHandle<()>>,
    host_ports: BTreeMap<u16, JoinHandle<()>>,
    unavailable: BTreeMap<u16, String>,
    started_at: u64,
    last: Option<Snapshot>,
}

async fn main_loop(opts: Options, listener: std::net::TcpListener) -> Result<(), DaemonError> {
    let table = Arc::new(Table {
        domain: opts.domain.clone(),
        main_port: opts.port,
        sandboxes: RwLock::new(BTreeMap::new()),
    });
    let ctx = Arc::new(Ctx {
        client: server::client(table.clone()),
        table,
    });
    let main = tokio::spawn(server::serve(
        tokio::net::TcpListener::from_std(listener)?,
        ctx.clone(),
        opts.port,
    ));
    let mut d = Daemon {
        opts,
        ctx,
        polls: BTreeMap::new(),
        host_ports: BTreeMap::new(),
        unavailable: BTreeMap::new(),
        started_at: keystone_registry::now(),
        last: None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: exiting");
                break;
            }
        }
        match d.refresh() {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("no sandboxes left: exiting");
                break;
            }
            Err(e) => tracing::warn!("refresh: {e}"),
        }
    }
    main.abort();
    state::clear(&d.opts.state_root);
    Ok(())
}

impl Daemon {
    /// One round; `false` when there is nothing left to serve.
    fn refresh(&mut self) -> Result<bool, DaemonError> {
        let root = &self.opts.state_root;
        if !root.exists() {
            return Ok(false);
        }
        let registry = Registry::open(root).map_err(std::io::Error::other)?;
        let sandboxes = registry.list().map_err(std::io::Error::other)?;
        if sandboxes.is_empty() {
            return Ok(false);
        }
        let table = &self.ctx.table;
        {
            let mut map = table
                .sandboxes
                .write()
                .map_err(|_| std::io::Error::other("table lock poisoned"))?;
            map.retain(|name, _| sandboxes.iter().any(|s| &s.name == name));
            for sb in &sandboxes {
                // A record may say running while its supervisor is dead
                // (until a CLI reconciles): trust the process, not the word.
                let running = sb.state == State::Running && sb.owner.is_some_and(|o| o.is_alive());
                let stale = map.get(&sb.name).is_some_and(|e| e.id != sb.id);
                if stale || !map.contains_key(&sb.name) {
                    let ssh_dir = registry.sandbox_dir(&sb.name).join("ssh");
                    let socket = keystone_channel::Channel::new(
                        &sb.name,
                        &sb.id,
                        ssh_dir.clone(),
                        PathBuf::new(),
                    )
                    .map(|c| c.socket)
                    .map_err(std::io::Error::other)?;
                    map.insert(
                        sb.name.clone(),
                        Arc::new(Entry {
                            name: sb.name.clone(),
                            id: sb.id.clone(),
                            project: sb.project_path.clone(),
                            running: running.into(),
                            link: Arc::new(Link::new(socket, ssh_dir)),
                            discovery: RwLock::new(Found::default()),
                        }),
                    );
                } else if let Some(e) = map.get(&sb.name) {
                    e.running.store(running, Ordering::Relaxed);
                }
            }
        }
        self.polls.retain(|name, task| {
            let keep = !task.is_finished() && table.get(name).is_some_and(|e| e.is_running());
            if !keep {
                task.abort();
            }
            keep
        });
        for e in table
            .sandboxes
            .read()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if e.is_running() && !self.polls.contains_key(&e.name) {
                self.polls
                    .insert(e.name.clone(), tokio::spawn(poll(e.clone())));
            } else if !e.is_running() && e.found().polled {
                if let Ok(mut f) = e.discovery.write() {
                    *f = Found::default();
                }
                // Its sshd is gone: do not offer the dead connection again.
                let link = e.link.clone();
                tokio::spawn(async move { link.reset().await });
            }
        }
        self.sync_host_ports();
        self.write_snapshot();
        Ok(true)
    }

    /// Serve on the host each port a running sandbox listens on, routed
    /// by hostname; stop serving ports no sandbox uses any more.
    fn sync_host_ports(&mut self) {
        let table = self.ctx.table.clone();
        let mut wanted = BTreeSet::new();
        for e in table
            .sandboxes
            .read()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if e.is_running() {
                let servers = e.found().discovery.servers;
                let ports = servers
                    .iter()
                    .map(|s| s.port)
                    .filter(|p| *p != self.opts.port);
                wanted.extend(ports.take(MAX_MIRRORED_PORTS));
            }
        }
        self.host_ports.retain(|port, task| {
            let keep = wanted.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        self.unavailable.retain(|port, _| wanted.contains(port));
        for port in wanted {
            if self.host_ports.contains_key(&port) {
                continue;
            }
            let bound = std::net::TcpListener::bind(("127.0.0.1", port)).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            });
            match bound {
                Ok(l) => {
                    tracing::info!(port, "serving host port");
                    self.unavailable.remove(&port);
                    self.host_ports
                        .insert(port, tokio::spawn(server::serve(l, self.ctx.clone(), port)));
                }
                Err(e) => {
                    self.unavailable.insert(port, e.to_string());
                }
            }
        }
    }

    fn write_snapshot(&mut self) {
        let table = &self.ctx.table;
        let (domain, main) = (&self.opts.domain, self.opts.port);
        let mut sandboxes = Vec::new();
        for e in table
            .sandboxes
            .read()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let f = e.found();
            let mut servers = Vec::new();
            for s in &f.discovery.servers {
                let wt = (s.worktree != "main").then_some(s.worktree.as_str());
                let is_default = f
                    .discovery
                    .default_server(&s.worktree)
                    .is_some_and(|d| d.port == s.port);
                servers.push(ServerRoute {
                    url: is_default.then(|| route::url(&e.name, wt, domain, main)),
                    port_url: self
                        .host_ports
                        .contains_key(&s.port)
                        .then(|| route::url(&e.name, wt, domain, s.port)),
                    server: s.clone(),
                });
            }
            sandboxes.push(SandboxRoutes {
                name: e.name.clone(),
                running: e.is_running(),
                url: route::url(&e.name, None, domain, main),
                servers,
                worktrees: f.discovery.worktrees.clone(),
                error: f.error.clone(),
            });
        }
        let snap = Snapshot {
            pid: std::process::id(),
            port: main,
            domain: domain.clone(),
            started_at: self.started_at,
            sandboxes,
            host_ports: self.host_ports.keys().copied().collect(),
            host_ports_unavailable: self
                .unavailable
                .iter()
                .map(|(p, r)| (*p, r.clone()))
                .collect(),
        };
        if self.last.as_ref() != Some(&snap) {
            if let Err(e) = state::write(&self.opts.state_root, &snap) {
                tracing::warn!("writing the snapshot: {e}");
            }
            self.last = Some(snap);
        }
    }
}

/// Poll one running sandbox's listening ports until the task is aborted.
async fn poll(e: Arc<Entry>) {
    loop {
        let result = e.link.exec(discover::SCRIPT, DISCOVERY_TIMEOUT).await;
        if let Ok(mut f) = e.discovery.write() {
            match result {
                Ok(out) => {
                    let d: Discovery = discover::parse(&out);
                    *f = Found {
                        discovery: d,
                        error: None,
                        polled: true,
                    };
                }
                Err(err) => {
                    tracing::debug!(sandbox = %e.name, "discovery: {err}");
                    f.error = Some(err.to_string());
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
