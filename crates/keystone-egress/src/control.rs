//! Changing the policy of a running egress point without restarting it
//! (and so without dropping the guest's open connections): the CLI writes
//! the policy file, then sends `reload\n` on this Unix socket; the daemon
//! re-reads and compiles the file, binds capture listeners for ports the
//! new policy needs, swaps the policy in, and answers `ok\n` or
//! `error: MESSAGE\n`. A file that does not compile, or a port that cannot
//! be bound, leaves the old policy in force.
//!
//! Two more commands carry credentials ([`crate::inject`]):
//! `credentials\n` followed by a JSON [`crate::inject::Bundle`] up to EOF
//! installs them (in memory only), and `usage\n` answers one JSON line of
//! per-credential counts ([`crate::inject::Usage`]).
//!
//! The socket is created mode 0600 (bound under a temporary name, chmod,
//! renamed into place, so it is never reachable with wider permissions);
//! it lives in the sandbox's host-side directory, out of the guest's reach.

use crate::inject::{Bundle, Injector, Usage};
use crate::policy::{Policy, Spec};
use crate::proxy::{self, Ctx};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Binds a capture listener for a port (in the sandbox's namespace); the
/// caller knows how.
pub type BindCapture = Box<dyn Fn(u16) -> io::Result<std::net::TcpListener> + Send + Sync>;

/// How long a control client may take to send its line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Read, parse and compile a policy file; errors name the file.
pub fn load_policy(path: &Path) -> Result<Policy, String> {
    let text = std::fs::read(path).map_err(|e| format!("policy file {}: {e}", path.display()))?;
    let spec: Spec = serde_json::from_slice(&text)
        .map_err(|e| format!("policy file {}: {e}", path.display()))?;
    spec.compile()
        .map_err(|e| format!("policy file {}: {e}", path.display()))
}

/// The daemon's side of a reload.
pub struct Reloader {
    policy_file: PathBuf,
    pub(crate) ctx: Arc<Ctx>,
    /// `None` where every port is captured already (the Kubernetes
    /// relay's redirect takes all TCP).
    bind_capture: Option<BindCapture>,
    bound: Mutex<BTreeSet<u16>>,
    runtime: tokio::runtime::Handle,
}

impl Reloader {
    /// `bound`: the capture ports already served. Must be called inside
    /// the tokio runtime that will serve new capture listeners.
    pub fn new(
        policy_file: PathBuf,
        ctx: Arc<Ctx>,
        bind_capture: Option<BindCapture>,
        bound: BTreeSet<u16>,
    ) -> Reloader {
        Reloader {
            policy_file,
            ctx,
            bind_capture,
            bound: Mutex::new(bound),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Bind and serve capture listeners for every port of `policy` not yet
    /// served. All or nothing: if one port fails, none of the new
    /// listeners is kept.
    pub fn ensure_capture(&self, policy: &Policy) -> Result<(), String> {
        let Some(bind_capture) = &self.bind_capture else {
            return Ok(());
        };
        let mut bound = self.bound.lock().map_err(|_| "lock poisoned".to_string())?;
        let mut fresh = Vec::new();
        for port in policy.ports().difference(&bound) {
            let l = bind_capture(*port)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| format!("capture port {port}: {e}"))?;
            fresh.push((*port, l));
        }
        for (port, l) in fresh {
            let _guard = self.runtime.enter();
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| format!("capture port {port}: {e}"))?;
            self.runtime
                .spawn(proxy::serve_capture(l, self.ctx.clone()));
            bound.insert(port);
        }
        Ok(())
    }

    /// Re-read the policy file and swap it in (blocking: call it off the
    /// async threads).
    pub fn reload(&self) -> Result<(), String> {
        let policy = load_policy(&self.policy_file)?;
        self.ensure_capture(&policy)?;
        self.ctx.set_policy(policy);
        tracing::info!("egress policy reloaded from {}", self.policy_file.display());
        Ok(())
    }
}

/// Bind the control socket at `path` (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(l)
}

/// Serve control connections until the task is dropped.
pub async fn serve(listener: tokio::net::UnixListener, reloader: Arc<Reloader>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("egress control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let reloader = reloader.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r.take(MAX_BUNDLE));
            let got = tokio::time::timeout(LINE_TIMEOUT, async {
                let n = (&mut r).take(256).read_line(&mut line).await?;
                Ok::<_, io::Error>(n)
            })
            .await;
            let reply = match got {
                Ok(Ok(_)) => match line.trim_end_matches(['\n', '\r']) {
                    "credentials" => {
                        let mut body = Vec::new();
                        match tokio::time::timeout(LINE_TIMEOUT, r.read_to_end(&mut body)).await {
                            Ok(Ok(_)) => match install_credentials(&reloader.ctx, &body) {
                                Ok(()) => "ok\n".to_string(),
                                Err(e) => format!("error: {}\n", one_line(&e)),
                            },
                            _ => "error: the credentials did not arrive in time\n".to_string(),
                        }
                    }
                    "usage" => {
                        let counts = reloader.ctx.credentials.counters.snapshot();
                        let loaded = reloader
                            .ctx
                            .credentials
                            .get()
                            .map(|i| i.names())
                            .unwrap_or_default();
                        let mut all = BTreeMap::new();
                        for n in loaded {
                            all.insert(n.clone(), counts.get(&n).cloned().unwrap_or_default());
                        }
                        for (n, u) in counts {
                            all.entry(n).or_insert(u);
                        }
                        format!("{}\n", serde_json::to_string(&all).unwrap_or_default())
                    }
                    "reload" => {
                        let rl = reloader.clone();
                        match tokio::task::spawn_blocking(move || rl.reload()).await {
                            Ok(Ok(())) => "ok\n".to_string(),
                            Ok(Err(e)) => format!("error: {}\n", one_line(&e)),
                            Err(e) => format!("error: {}\n", one_line(&e.to_string())),
                        }
                    }
                    other => format!("error: unknown command {:?}\n", other),
                },
                _ => return,
            };
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}

/// The largest credentials message accepted.
const MAX_BUNDLE: u64 = 1024 * 1024;

fn install_credentials(ctx: &Ctx, body: &[u8]) -> Result<(), String> {
    let bundle: Bundle =
        serde_json::from_slice(body).map_err(|e| format!("not a credentials message: {e}"))?;
    let injector = Injector::new(&bundle)?;
    ctx.credentials.set(injector);
    tracing::info!(count = bundle.secrets.len(), "egress credentials installed");
    Ok(())
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The CLI's side: ask the daemon listening on `socket` to reload, and
/// wait up to `timeout` for its answer.
pub fn reload(socket: &Path, timeout: Duration) -> Result<(), String> {
    let what = || format!("egress control socket {}", socket.display());
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", what()))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{}: {e}", what()))?;
    s.write_all(b"reload\n")
        .map_err(|e| format!("{}: {e}", what()))?;
    let mut line = String::new();
    BufReader::new(s.take(4096))
        .read_line(&mut line)
        .map_err(|e| format!("{}: no answer: {e}", what()))?;
    let line = line.trim_end();
    if line == "ok" {
        Ok(())
    } else if let Some(e) = line.strip_prefix("error: ") {
        Err(e.to_string())
    } else {
        Err(format!("{}: unexpected answer {line:?}", what()))
    }
}

/// One request and its one-line answer on the control socket.
fn ask(socket: &Path, message: &[u8], timeout: Duration) -> Result<String, String> {
    let what = || format!("egress control socket {}", socket.display());
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", what()))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{}: {e}", what()))?;
    s.write_all(message)
        .map_err(|e| format!("{}: {e}", what()))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("{}: {e}", what()))?;
    let mut line = String::new();
    BufReader::new(s.take(1024 * 1024))
        .read_line(&mut line)
        .map_err(|e| format!("{}: no answer: {e}", what()))?;
    Ok(line.trim_end().to_string())
}

/// The CLI's side: install `bundle` in the egress point on `socket`.
pub fn send_credentials(socket: &Path, bundle: &Bundle, timeout: Duration) -> Result<(), String> {
    let mut message = b"credentials\n".to_vec();
    message.extend(serde_json::to_vec(bundle).map_err(|e| e.to_string())?);
    let line = ask(socket, &message, timeout)?;
    match line.strip_prefix("error: ") {
        None if line == "ok" => Ok(()),
        Some(e) => Err(e.to_string()),
        None => Err(format!("unexpected answer {line:?}")),
    }
}

/// The CLI's side: each credential's counts since the egress point started.
pub fn usage(socket: &Path, timeout: Duration) -> Result<BTreeMap<String, Usage>, String> {
    let line = ask(socket, b"usage\n", timeout)?;
    if let Some(e) = line.strip_prefix("error: ") {
        return Err(e.to_string());
    }
    serde_json::from_str(&line).map_err(|e| format!("unexpected answer {line:?}: {e}"))
}
