//! The egress point of a sandbox that runs where keystone cannot put a
//! network namespace of its own around it: a Kubernetes pod. The policy
//! is the same and is enforced by the same code ([`crate::proxy`],
//! [`crate::dns`]) on this host; only the way the guest's traffic gets
//! here differs.
//!
//! In the pod:
//!
//! - [`FENCE`], run by an init container holding `NET_ADMIN` (the
//!   sandbox's own container never holds it), installs an nftables table in
//!   the pod's network namespace: every TCP connection to an address that
//!   is not loopback is redirected to [`CAPTURE_PORT`] on loopback, UDP
//!   DNS to [`crate::GATEWAY`]:53 to [`DNS_PORT`], and every other packet
//!   that is not for loopback is dropped. Nothing else leaves the pod, on
//!   any protocol, whatever the cluster's network plugin does; the guest's
//!   root cannot change the table (no `CAP_NET_ADMIN` over that namespace).
//! - [`SCRIPT`] (the *relay*, Python's standard library only) listens on
//!   those ports and on [`PULL_PORT`]. It is a transport and trusted for
//!   nothing: it runs inside the sandbox, whose root may replace it.
//!
//! On this host, [`pump`] keeps `idle` *pulls* open to [`PULL_PORT`] (the
//! Kubernetes backend opens them through the API server's port-forward,
//! so, as for SSH, the cluster needs no route to this host and every
//! connection is initiated from here). A pull starts with [`HELLO`]; the
//! relay parks it and, for each captured connection or query, writes one
//! header line on a parked pull and then relays bytes:
//!
//! - `tcp ADDR PORT`: a TCP connection the guest made to `ADDR:PORT`
//!   (the relay reads it with `SO_ORIGINAL_DST`). Served as a captured
//!   connection ([`crate::proxy::handle_capture`]), except that
//!   [`crate::GATEWAY`]:53 is DNS over TCP and
//!   [`crate::GATEWAY`]:[`crate::PROXY_PORT`] the explicit proxy, as on
//!   the other backends.
//! - `dns`: one UDP query, in DNS-over-TCP framing.
//!
//! After the header both directions are *framed* (a 4-byte big-endian
//! length, then that many bytes; length 0 ends that direction), because
//! the API server's port-forward has no half-close: closing our side of
//! it sends a WebSocket Close that tears down the pod's end with data
//! still in flight. So each side says where its bytes end, and only the
//! relay closes a pull, once both directions have ended ([`framed`]).
//!
//! A relay that lies about `ADDR` gains nothing: a captured connection's
//! address is checked exactly as in a local egress namespace (a synthetic
//! address must be one this sandbox's DNS gave out, a literal address
//! needs a CIDR rule, SNI and Host must agree with the name).

use crate::control::{self, Reloader};
use crate::log::DecisionLog;
use crate::pool::FakePool;
use crate::proxy::{Ctx, GuestConn};
use crate::{dns, proxy, GATEWAY, PROXY_PORT};
use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The relay program the pod runs (as root, beside sshd).
pub const SCRIPT: &str = include_str!("relay.py");
/// Where the pod's TCP is redirected (127.0.0.1 and ::1).
pub const CAPTURE_PORT: u16 = 15001;
/// Where the host's pulls arrive (127.0.0.1).
pub const PULL_PORT: u16 = 15002;
/// Where the pod's DNS queries to [`GATEWAY`] are redirected (127.0.0.1).
pub const DNS_PORT: u16 = 15053;
/// The first bytes of every pull.
pub const HELLO: &[u8] = b"keystone-egress-pull 2\n";
/// The longest header line a relay may send.
const MAX_HEADER: usize = 128;
/// The largest frame either side sends ([`framed`]).
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a finished pull waits for the relay to close it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The init container's script: the nftables table that leaves the pod
/// no way out but the relay (module docs). `nft -f` applies it as one
/// transaction: all of it or nothing, and a failure fails the pod.
pub fn fence_script() -> String {
    format!(
        r#"set -e
nft -f - <<'EOF'
table inet keystone_egress {{
  chain to_relay {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    ip daddr {gw} udp dport 53 redirect to :{dns}
    meta l4proto tcp redirect to :{capture}
  }}
  chain loopback_only {{
    type filter hook output priority 0; policy drop;
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    fib daddr type local accept
  }}
}}
EOF
nft list table inet keystone_egress >/dev/null
"#,
        gw = GATEWAY,
        dns = DNS_PORT,
        capture = CAPTURE_PORT,
    )
}

/// What a relay asked for on a pull.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// A TCP connection the guest made to this address.
    Tcp(SocketAddr),
    /// One UDP DNS query, framed as DNS over TCP.
    Dns,
}

/// Read a relay's header line.
pub fn parse_header(line: &str) -> Result<Work, String> {
    let mut it = line.split(' ');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some("dns"), None, None, None) => Ok(Work::Dns),
        (Some("tcp"), Some(a), Some(p), None) => {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("not an address: {}", a.escape_debug()))?;
            let port: u16 = p
                .parse()
                .map_err(|_| format!("not a port: {}", p.escape_debug()))?;
            Ok(Work::Tcp(SocketAddr::new(ip.to_canonical(), port)))
        }
        _ => Err(format!("unknown header {:?}", line)),
    }
}

/// A pull's guest connection ([`framed`]): refusing it ends it without a
/// byte, which the relay turns into a reset of the guest's socket.
impl GuestConn for tokio::io::DuplexStream {
    fn refuse(self) {
        drop(self);
    }
}

/// Send the hello on a fresh pull and wait (unbounded: a parked pull may
/// wait for hours) for the relay's header.
pub async fn await_work<S>(stream: &mut S) -> io::Result<Work>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(HELLO).await?;
    stream.flush().await?;
    let mut line = Vec::with_capacity(32);
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "relay header too long",
            ));
        }
        line.push(b);
    }
    let line = String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "relay header not UTF-8"))?;
    parse_header(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The guest connection a pull carries, as a stream with half-close:
/// what is written to the returned stream goes to the relay in frames
/// (its shutdown is the end frame); the relay's frames are what is read
/// (its end frame is EOF). Two tasks move the bytes; once both directions
/// have ended they wait (bounded) for the relay to close the pull, and
/// only then drop it, so nothing written is lost to an early close.
pub fn framed<S>(pull: S) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (app, inner) = tokio::io::duplex(MAX_FRAME);
    tokio::spawn(async move {
        let (mut from_app, mut to_app) = tokio::io::split(inner);
        let (mut from_pull, mut to_pull) = tokio::io::split(pull);
        let up = async move {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                let n = from_app.read(&mut buf).await?;
                to_pull.write_all(&(n as u32).to_be_bytes()).await?;
                if n == 0 {
                    to_pull.flush().await?;
                    return Ok::<_, io::Error>(());
                }
                to_pull.write_all(&buf[..n]).await?;
                to_pull.flush().await?;
            }
        };
        let down = async move {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                let n = from_pull.read_u32().await? as usize;
                if n == 0 {
                    to_app.shutdown().await?;
                    return Ok::<_, io::Error>(from_pull);
                }
                if n > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "relay frame too large",
                    ));
                }
                from_pull.read_exact(&mut buf[..n]).await?;
                to_app.write_all(&buf[..n]).await?;
            }
        };
        // The first error drops both directions, and so the guest's
        // stream: the handler sees it end.
        let mut from_pull = match tokio::try_join!(up, down) {
            Ok(((), from_pull)) => from_pull,
            Err(e) => {
                tracing::debug!("egress relay: pull: {e}");
                return;
            }
        };
        // Both ends said so: the relay closes; wait for it.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while matches!(from_pull.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
    app
}

/// Serve what a relay asked for, as the other backends' listeners would.
pub async fn serve(stream: tokio::io::DuplexStream, work: Work, ctx: Arc<Ctx>) {
    match work {
        Work::Dns => dns::serve_tcp_conn(stream, ctx).await,
        Work::Tcp(dest) if dest.ip() == IpAddr::V4(GATEWAY) && dest.port() == 53 => {
            dns::serve_tcp_conn(stream, ctx).await
        }
        Work::Tcp(dest) if dest.ip() == IpAddr::V4(GATEWAY) && dest.port() == PROXY_PORT => {
            proxy::serve_explicit_conn(stream, ctx).await
        }
        Work::Tcp(dest) => proxy::handle_capture(stream, dest, ctx).await,
    }
}

/// Keep `idle` pulls waiting in the pod, opening a new one as soon as one
/// is taken, until the task is dropped. `open` makes one stream to the
/// relay's [`PULL_PORT`]; while it fails (the pod not there yet, or gone)
/// each worker retries with a growing pause.
pub async fn pump<S, F, Fut>(open: F, ctx: Arc<Ctx>, idle: usize)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<S>> + Send,
{
    let open = Arc::new(open);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..idle.max(1) {
        let open = open.clone();
        let ctx = ctx.clone();
        workers.spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let mut stream = match open().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!("egress relay: open a pull: {e}");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                match await_work(&mut stream).await {
                    Ok(work) => {
                        pause = Duration::from_millis(100);
                        tokio::spawn(serve(framed(stream), work, ctx.clone()));
                    }
                    Err(e) => {
                        // The pull closed (the pod restarting, an idle
                        // timeout) or the relay misbehaved: open another.
                        tracing::debug!("egress relay: pull ended: {e}");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// The files of a relayed egress point (as [`crate::daemon::Options`]).
pub struct Files {
    pub policy: PathBuf,
    pub pool: PathBuf,
    pub log: PathBuf,
    pub control: PathBuf,
}

/// Start a relayed egress point on the current tokio runtime: the policy,
/// pool and log loaded, the control socket bound (reloads work as on the
/// other backends), `idle` pulls kept open with `open`. Abort the task to
/// stop it; the caller removes the control socket.
pub fn spawn<S, F, Fut>(
    files: &Files,
    sandbox: &str,
    open: F,
    idle: usize,
) -> Result<tokio::task::JoinHandle<()>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<S>> + Send,
{
    let policy = control::load_policy(&files.policy)?;
    let pool = FakePool::open(&files.pool)
        .map_err(|e| format!("pool file {}: {e}", files.pool.display()))?;
    let log = DecisionLog::open(&files.log)
        .map_err(|e| format!("log file {}: {e}", files.log.display()))?;
    let ctx = Arc::new(Ctx::new(policy, pool, log, sandbox));
    let listener = control::bind(&files.control)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .and_then(tokio::net::UnixListener::from_std)
        .map_err(|e| format!("control socket {}: {e}", files.control.display()))?;
    let reloader = Arc::new(Reloader::new(
        files.policy.clone(),
        ctx.clone(),
        None,
        BTreeSet::new(),
    ));
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = control::serve(listener, reloader) => {}
            _ = pump(open, ctx, idle) => {}
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header("dns"), Ok(Work::Dns));
        assert_eq!(
            parse_header("tcp 198.18.0.5 443"),
            Ok(Work::Tcp("198.18.0.5:443".parse().expect("a")))
        );
        assert_eq!(
            parse_header("tcp 2001:db8::1 22"),
            Ok(Work::Tcp("[2001:db8::1]:22".parse().expect("a")))
        );
        // A v4-mapped address is the v4 address (as a dual-stack capture
        // listener reports it).
        assert_eq!(
            parse_header("tcp ::ffff:10.0.0.1 80"),
            Ok(Work::Tcp("10.0.0.1:80".parse().expect("a")))
        );
        for bad in [
            "",
            "tcp",
            "tcp 1.2.3.4",
            "tcp 1.2.3.4 99999",
            "tcp host.com 443",
            "tcp 1.2.3.4 443 extra",
            "dns x",
            "udp 1.2.3.4 53",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_fence_redirects_tcp_and_dns_and_drops_the_rest() {
        let f = fence_script();
        assert!(f.contains("udp dport 53 redirect to :15053"), "{f}");
        assert!(f.contains("meta l4proto tcp redirect to :15001"), "{f}");
        assert!(f.contains("policy drop;"), "{f}");
        assert!(f.contains("ip daddr 198.18.0.1 udp dport 53"), "{f}");
    }

    #[test]
    fn the_relay_program_uses_the_same_ports_and_hello() {
        for line in [
            format!("CAPTURE_PORT = {CAPTURE_PORT}\n"),
            format!("PULL_PORT = {PULL_PORT}\n"),
            format!("DNS_PORT = {DNS_PORT}\n"),
            format!("HELLO = b{:?}\n", String::from_utf8_lossy(HELLO)),
        ] {
            assert!(SCRIPT.contains(&line), "relay.py lacks {line:?}");
        }
    }
}
