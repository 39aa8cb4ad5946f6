//! The egress point as one process: every listener of one sandbox, served
//! until SIGTERM or SIGINT. The sockets arrive already bound (the caller
//! binds them inside the sandbox's network namespace, where the guest's
//! connections land), so this process needs no privilege and never enters
//! a namespace itself.

use crate::control::{self, BindCapture, Reloader};
use crate::dns;
use crate::log::DecisionLog;
use crate::pool::FakePool;
use crate::proxy::{self, Ctx};
use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The listeners, already bound (possibly in another network namespace).
pub struct Sockets {
    pub dns_udp: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
    pub proxy: std::net::TcpListener,
    /// Capture listeners by port. Ports the policy needs that are missing
    /// here are bound at start through [`Options::bind_capture`].
    pub capture: Vec<(u16, std::net::TcpListener)>,
}

pub struct Options {
    /// The JSON [`crate::policy::Spec`].
    pub policy_file: PathBuf,
    /// The persisted [`FakePool`].
    pub pool_file: PathBuf,
    /// The [`DecisionLog`].
    pub log_file: PathBuf,
    /// The control socket ([`control`]).
    pub control: PathBuf,
    /// The sandbox's name, for "how to allow it" hints.
    pub sandbox: String,
    /// Binds a capture listener for a port the policy newly needs.
    pub bind_capture: BindCapture,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Policy(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Serve the sandbox's egress point until SIGTERM or SIGINT. Blocks; runs
/// its own tokio runtime (two worker threads), so call it from a process
/// (or thread) that has none.
pub fn run(sockets: Sockets, options: Options) -> Result<(), Error> {
    let policy = control::load_policy(&options.policy_file).map_err(Error::Policy)?;
    let pool = FakePool::open(&options.pool_file)
        .map_err(io_err(format!("pool file {}", options.pool_file.display())))?;
    let log = DecisionLog::open(&options.log_file)
        .map_err(io_err(format!("log file {}", options.log_file.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))?;
    let result = rt.block_on(serve(sockets, options, policy, pool, log));
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn serve(
    sockets: Sockets,
    options: Options,
    policy: crate::policy::Policy,
    pool: FakePool,
    log: DecisionLog,
) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a signal from here on stops us cleanly.
    let mut term = signal(SignalKind::terminate()).map_err(io_err("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("SIGINT handler"))?;

    let ctx = Arc::new(Ctx::new(policy, pool, log, &options.sandbox));
    let Sockets {
        dns_udp,
        dns_tcp,
        proxy: proxy_listener,
        capture,
    } = sockets;
    dns_udp.set_nonblocking(true).map_err(io_err("dns udp"))?;
    let dns_udp = tokio::net::UdpSocket::from_std(dns_udp).map_err(io_err("dns udp"))?;
    dns_tcp.set_nonblocking(true).map_err(io_err("dns tcp"))?;
    let dns_tcp = tokio::net::TcpListener::from_std(dns_tcp).map_err(io_err("dns tcp"))?;
    proxy_listener
        .set_nonblocking(true)
        .map_err(io_err("proxy"))?;
    let proxy_listener =
        tokio::net::TcpListener::from_std(proxy_listener).map_err(io_err("proxy"))?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(dns::serve_udp(dns_udp, ctx.clone()));
    tasks.spawn(dns::serve_tcp(dns_tcp, ctx.clone()));
    tasks.spawn(proxy::serve_explicit(proxy_listener, ctx.clone()));
    let mut bound = BTreeSet::new();
    for (port, l) in capture {
        let what = format!("capture port {port}");
        l.set_nonblocking(true).map_err(io_err(what.clone()))?;
        let l = tokio::net::TcpListener::from_std(l).map_err(io_err(what))?;
        tasks.spawn(proxy::serve_capture(l, ctx.clone()));
        bound.insert(port);
    }
    let reloader = Arc::new(Reloader::new(
        options.policy_file.clone(),
        ctx.clone(),
        Some(options.bind_capture),
        bound,
    ));
    let policy = ctx.policy();
    {
        let r = reloader.clone();
        tokio::task::spawn_blocking(move || r.ensure_capture(&policy))
            .await
            .map_err(|e| Error::Policy(e.to_string()))?
            .map_err(Error::Policy)?;
    }
    let control = control::bind(&options.control).map_err(io_err(format!(
        "control socket {}",
        options.control.display()
    )))?;
    control
        .set_nonblocking(true)
        .map_err(io_err("control socket"))?;
    let control = tokio::net::UnixListener::from_std(control).map_err(io_err("control socket"))?;
    tasks.spawn(control::serve(control, reloader));
    tracing::info!(sandbox = %options.sandbox, "egress point serving");

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(sandbox = %options.sandbox, "egress point stopping");
    tasks.abort_all();
    let _ = std::fs::remove_file(&options.control);
    Ok(())
}
