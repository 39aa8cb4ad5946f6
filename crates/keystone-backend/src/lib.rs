//! The backend interface, and the backends behind it.
//!
//! A backend turns a guest image into a running sandbox whose SSH server is
//! reachable on a host Unix socket ([`Instance::socket`]); everything else
//! (exec, attach, git, rsync, the proxy) rides on SSH and is the same for
//! every backend (DESIGN.md). The interface is deliberately small:
//!
//! - [`Backend::prepare`] runs in the CLI, where progress can be shown
//!   (e.g. unpacking the image for this user);
//! - [`Backend::run`] runs in the sandbox's supervisor process and blocks
//!   for the sandbox's whole life, calling `on_ready` once the guest's sshd
//!   answers, and returning once the sandbox is down and its teardown has
//!   been verified. The supervisor asks it to stop with SIGTERM (graceful)
//!   or SIGUSR1 (force);
//! - [`Backend::reap`] cleans up after a supervisor that died;
//! - [`Backend::discard_disk`] implements `--fresh` and `destroy`.
//!
//! The backends are crates of their own (`keystone-container`,
//! `keystone-microvm`, `keystone-kubernetes`) that depend on this one and
//! never on each other, so the crate graph enforces it; only the
//! Kubernetes crate compiles kube-rs. What they share lives here: the id
//! maps (`idmap`), disk records (`disk`), host bridges (`hostbridge`), the
//! stop signals (`signals`), the sshd probe, relay and log files
//! (`plumbing`) and the leak tests' fault points (`fault`).

pub mod disk;
pub mod egress;
pub mod fault;
pub mod hostbridge;
pub mod idmap;
pub mod plumbing;
pub mod signals;
pub mod tap;

pub use signals::{unblock_all, StopRequest, STOP_FORCE, STOP_GRACEFUL};

use keystone_registry::Settings;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything a backend needs to know about one sandbox.
#[derive(Clone, Debug)]
pub struct Instance {
    pub name: String,
    pub id: String,
    /// The sandbox's directory (disk, logs).
    pub dir: PathBuf,
    pub settings: Settings,
    /// The project directory on the host (shared live with `--share`).
    pub project: PathBuf,
    /// The guest image's root filesystem tarball and id.
    pub image_tar: PathBuf,
    pub image_id: String,
    /// Host directory with the guest's host key and authorized_keys, to be
    /// made visible read-only at `/etc/keystone` in the guest.
    pub guest_dir: PathBuf,
    /// Host Unix socket on which the guest's sshd must be reachable.
    pub socket: PathBuf,
    /// Where backend caches live (e.g. unpacked images).
    pub cache_dir: PathBuf,
}

impl Instance {
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// Facts about a started sandbox, recorded in the registry.
#[derive(Clone, Debug, Default)]
pub struct Running {
    pub runtime: BTreeMap<String, serde_json::Value>,
    /// Lines for the user (e.g. "nested virtualization: off (...)").
    pub notes: Vec<String>,
}

impl Running {
    /// A backend's typed runtime record, as the registry keeps it.
    pub fn new<T: Serialize>(record: &T, notes: Vec<String>) -> Result<Running, BackendError> {
        Ok(Running {
            runtime: record_to_map(record)?,
            notes,
        })
    }
}

/// A typed runtime record as a JSON object.
pub fn record_to_map<T: Serialize>(
    record: &T,
) -> Result<BTreeMap<String, serde_json::Value>, BackendError> {
    match serde_json::to_value(record) {
        Ok(serde_json::Value::Object(m)) => Ok(m.into_iter().collect()),
        Ok(other) => Err(BackendError::Failed(format!(
            "a runtime record must be an object, not {other}"
        ))),
        Err(e) => Err(BackendError::Failed(format!("runtime record: {e}"))),
    }
}

/// The typed runtime record back from the registry's JSON (keys of other
/// layers, e.g. the supervisor's notes, are ignored); `None` when it is
/// not one (an older or another backend's record).
pub fn record_from_map<T: serde::de::DeserializeOwned>(
    runtime: &BTreeMap<String, serde_json::Value>,
) -> Option<T> {
    let object: serde_json::Map<String, serde_json::Value> = runtime
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(serde_json::Value::Object(object)).ok()
}

/// How a sandbox ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Stopped because it was asked to.
    Stopped,
    /// The guest went down on its own (its init exited).
    Exited(String),
}

/// Resources used right now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Something the host lacks (a tool, a permission): exit 4.
    #[error("{0}")]
    Requirement(String),
    /// The guest was started but its sshd never answered.
    #[error("{0}")]
    NoAnswer(String),
    /// Teardown could not remove everything; each item says what is left.
    #[error("teardown left {}", .0.join(", "))]
    Leftovers(Vec<String>),
    /// An error, and the teardown after it that failed too: both are
    /// kept, the cause first.
    #[error("{error}; cleanup also failed: {cleanup}")]
    WithCleanup {
        error: Box<BackendError>,
        cleanup: Box<BackendError>,
    },
    /// The cluster refused or failed a call: what was asked, what the API
    /// server said (its message and reason), and the client's error as
    /// the source, whose own causes (transport, TLS) print below it.
    #[error("{context}: {detail}")]
    Cluster {
        context: String,
        detail: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// This error, with the failure of the cleanup that followed it.
    pub fn with_cleanup(self, cleanup: BackendError) -> BackendError {
        BackendError::WithCleanup {
            error: Box::new(self),
            cleanup: Box::new(cleanup),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
        let context = context.into();
        move |source| BackendError::Io { context, source }
    }
}

impl From<keystone_process::SpawnError> for BackendError {
    fn from(e: keystone_process::SpawnError) -> Self {
        BackendError::Io {
            context: format!("cannot start {}", e.name),
            source: e.source,
        }
    }
}

impl From<nix::Error> for BackendError {
    fn from(e: nix::Error) -> Self {
        BackendError::Failed(e.desc().to_string())
    }
}

pub trait Backend {
    fn kind(&self) -> &'static str;

    /// Work done in the CLI before the supervisor starts, with progress.
    fn prepare(&self, inst: &Instance, progress: &mut dyn FnMut(&str)) -> Result<(), BackendError>;

    /// Run the sandbox (in the supervisor). See the module docs.
    fn run(
        &self,
        inst: &Instance,
        on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
    ) -> Result<Ended, BackendError>;

    /// Clean up what a dead supervisor left (processes, cgroups, sockets).
    fn reap(&self, inst: &Instance);

    /// Remove the sandbox's persistent disk.
    fn discard_disk(&self, inst: &Instance) -> Result<(), BackendError>;

    fn usage(&self, inst: &Instance, runtime: &BTreeMap<String, serde_json::Value>) -> Usage;
}

/// A host tool a backend cannot work without: a requirement error (exit 4)
/// that says what needs it and the Debian package to install.
pub fn require_tool(tool: &str, package: &str, why: &str) -> Result<(), BackendError> {
    if keystone_channel::which(tool).is_none() {
        return Err(BackendError::Requirement(format!(
            "{tool} is not installed ({why}): apt-get install {package}"
        )));
    }
    Ok(())
}

/// The size of a directory tree, not following symlinks or other mounts.
pub fn dir_size(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let dev = meta.dev();
    let mut total = meta.blocks() * 512;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}
