//! The dev-server proxy (SPEC.md "Proxy", DESIGN.md: the SSH channel
//! carries the traffic).
//!
//! One proxy per user, on 127.0.0.1 only: `<sandbox>.<domain>` reaches the
//! sandbox's dev server, `<branch>.<sandbox>.<domain>` the one in that
//! worktree, and each port a sandbox listens on is also served at the same
//! port number on the host, routed by hostname so two sandboxes on 3000
//! stay apart. Every byte to a sandbox goes through its SSH connection
//! (`direct-tcpip` channels); there is no route into the guest.
//!
//! - [`route`]: hostnames to routes (pure);
//! - [`discover`]: what listens inside a sandbox, and in which worktree;
//! - [`link`]: the in-process SSH connection per sandbox;
//! - [`server`]: HTTP in, routing, limits, upstream pool, error pages;
//! - [`daemon`]: the long-lived process and its loop;
//! - [`state`]: the lock and snapshot files the CLI reads.

pub mod daemon;
pub mod discover;
pub mod link;
pub mod pages;
pub mod route;
pub mod server;
pub mod state;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Ask the proxy on `127.0.0.1:port` for `/` at `host`, as a browser would
/// (GET, not HEAD: not every dev server implements HEAD; only the head of
/// the answer is read);
/// the status code, or why there was none. For `status`' "answers" column:
/// a code from the dev server (any but the proxy's own error pages) means
/// it answers.
pub fn probe(port: u16, host: &str, limit: Duration) -> Result<Answer, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keystone-status\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no HTTP response".to_string())?;
    let from_proxy = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("x-keystone-proxy:"));
    Ok(Answer { status, from_proxy })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The proxy answered itself (an error page), not the dev server.
    pub from_proxy: bool,
}
