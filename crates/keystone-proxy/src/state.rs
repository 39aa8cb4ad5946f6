//! The proxy's files in the user's state directory (`<state>/proxy/`):
//! - `proxy.lock`: held (`flock`) by the running proxy for its whole life,
//!   so there is one per user and a crashed one never blocks the next;
//! - `proxy.json`: what it serves right now (rewritten atomically when it
//!   changes), read by `keystone agent proxy status` and `status`;
//! - `proxy.log`: its log.

use crate::discover::Server;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the running proxy serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub port: u16,
    pub domain: String,
    pub started_at: u64,
    pub sandboxes: Vec<SandboxRoutes>,
    /// Host ports (besides `port`) being served, each routed by hostname.
    pub host_ports: Vec<u16>,
    /// Ports seen in a sandbox that could not be opened on the host (taken
    /// by another program, or privileged), with the reason.
    pub host_ports_unavailable: Vec<(u16, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxRoutes {
    pub name: String,
    pub running: bool,
    /// `http://<sandbox>.<domain>:<port>/`
    pub url: String,
    pub servers: Vec<ServerRoute>,
    pub worktrees: Vec<String>,
    /// Why discovery failed, if it did.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerRoute {
    #[serde(flatten)]
    pub server: Server,
    /// Through the proxy's port (present for each worktree's default server).
    pub url: Option<String>,
    /// At the same port number on the host, when that port is served.
    pub port_url: Option<String>,
}

pub fn dir(state_root: &Path) -> PathBuf {
    state_root.join("proxy")
}

pub fn lock_path(state_root: &Path) -> PathBuf {
    dir(state_root).join("proxy.lock")
}

pub fn snapshot_path(state_root: &Path) -> PathBuf {
    dir(state_root).join("proxy.json")
}

pub fn log_path(state_root: &Path) -> PathBuf {
    dir(state_root).join("proxy.log")
}

/// Take the single-instance lock without waiting; `None` if another proxy
/// holds it.
pub fn try_lock(state_root: &Path) -> std::io::Result<Option<nix::fcntl::Flock<File>>> {
    fs::create_dir_all(dir(state_root))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(lock_path(state_root))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Whether a proxy runs for this state directory (its lock is held).
pub fn is_running(state_root: &Path) -> bool {
    matches!(try_lock(state_root), Ok(None))
}

/// The running proxy's snapshot, if one runs.
pub fn read(state_root: &Path) -> Option<Snapshot> {
    if !is_running(state_root) {
        return None;
    }
    let text = fs::read_to_string(snapshot_path(state_root)).ok()?;
    serde_json::from_str(&text).ok()
}

pub(crate) fn write(state_root: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let path = snapshot_path(state_root);
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?)?;
    fs::rename(&tmp, &path)
}

/// Remove the snapshot when the proxy ends (the lock goes with the process).
pub(crate) fn clear(state_root: &Path) {
    let _ = fs::remove_file(snapshot_path(state_root));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_proxy_per_state_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_running(dir.path()));
        let held = try_lock(dir.path()).expect("lock").expect("free");
        assert!(is_running(dir.path()));
        assert!(try_lock(dir.path()).expect("lock").is_none());
        drop(held);
        assert!(!is_running(dir.path()));
        assert!(read(dir.path()).is_none());
    }
}
