//! The per-user store of sandboxes.
//!
//! Owns the sandbox records (SPEC.md "Data model"), their state machine,
//! safe concurrent access, and reconciliation with reality. The store is one
//! JSON file, `registry.json`, guarded by an exclusive `flock` on
//! `registry.lock` and replaced by atomic rename, so that two commands
//! running at once see each other's changes whole or not at all (DESIGN.md
//! allows this in place of SQLite when a concurrency test proves it; see
//! `tests::concurrent_updates_are_serialized`).
//!
//! A record only says what the last command believed. Every command first
//! calls [`Registry::reconcile`], which checks that the process responsible
//! for each active sandbox (the starting CLI or the supervisor) is still the
//! same live process; a dead owner means the sandbox is not running,
//! whatever was recorded.

mod name;
mod process;
mod state;

pub use name::{derive_name, validate_name, NameError};
pub use process::ProcessId;
pub use state::State;

pub use keystone_config::{
    BackendKind, EgressMode, Multiplexer, NetworkMode, ShareProto, SyncMode, WorkspaceMode,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Settings frozen into a sandbox when it is (re)started. The modes are
/// the configuration's own enums, stored in their configuration spelling,
/// so a record reads the same as the file it came from and no backend
/// compares strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub memory_mb: u32,
    pub vcpus: u32,
    /// The container's writable disk, in GB; records written before it
    /// existed get the default.
    #[serde(default = "default_disk_gb")]
    pub disk_gb: u32,
    pub nested_virt: bool,
    pub network: NetworkMode,
    /// What the guest may reach with `network = "nat"`; records written
    /// before the egress policy existed were open.
    #[serde(default = "default_egress")]
    pub egress: EgressMode,
    pub sync_mode: SyncMode,
    pub persist: bool,
    /// Id of the guest image the sandbox runs.
    pub image: String,
    /// What `/workspace` is: the pushed copy, synced by the host, or the
    /// project directory itself, shared live.
    #[serde(default = "default_workspace")]
    pub workspace: WorkspaceMode,
    /// The live share's protocol, with `WorkspaceMode::Share`; records
    /// written before it existed have an empty string, read as virtiofs.
    #[serde(default = "default_share_proto", deserialize_with = "share_proto")]
    pub share_proto: ShareProto,
    /// The host bridge, with `network = "bridge"`.
    #[serde(default)]
    pub bridge: String,
    /// The terminal multiplexer holding its sessions; records written
    /// before it existed were tmux.
    #[serde(default = "default_multiplexer")]
    pub multiplexer: Multiplexer,
    /// `backend.microvm.kernel` and `.initrd`: host files booted in place
    /// of the image's kernel (and with an initrd), frozen at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// `[backend.kubernetes]`, frozen at start, for a sandbox on Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeSettings>,
}

fn default_egress() -> EgressMode {
    EgressMode::Open
}

fn default_disk_gb() -> u32 {
    16
}

fn default_multiplexer() -> Multiplexer {
    Multiplexer::Tmux
}

fn default_workspace() -> WorkspaceMode {
    WorkspaceMode::Clone
}

fn default_share_proto() -> ShareProto {
    ShareProto::Virtiofs
}

fn share_proto<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ShareProto, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(default_share_proto());
    }
    s.parse().map_err(serde::de::Error::custom)
}

/// Where and how a Kubernetes sandbox runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KubeSettings {
    /// kubeconfig context; empty: the current one.
    pub context: String,
    pub namespace: String,
    /// Empty: the cluster's default storage class.
    pub storage_class: String,
    /// The pod's image reference.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub pull_policy: String,
}

impl Settings {
    /// Whether `/workspace` is the project directory itself (no sync).
    pub fn is_share(&self) -> bool {
        self.workspace == WorkspaceMode::Share
    }

    /// Whether the guest's only way out is keystone's egress point: the
    /// allowlist on a NAT network (a bridge puts the guest on a host
    /// network, which no allowlist of ours can fence).
    pub fn egress_allowlist(&self) -> bool {
        self.network == NetworkMode::Nat && self.egress == EgressMode::Allowlist
    }
}

/// The outcome of the last sync, for `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub at: u64,
    pub branch: String,
    pub commits: u64,
    pub outcome: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub project_path: PathBuf,
    pub state: State,
    pub backend: BackendKind,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub stopped_at: Option<u64>,
    pub settings: Settings,
    /// Named host ports (e.g. an SSH forward), for backends that have them.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// The process responsible for the sandbox while it is active.
    pub owner: Option<ProcessId>,
    /// Backend facts about the running instance (e.g. the init PID), which
    /// the backend alone interprets.
    #[serde(default)]
    pub runtime: BTreeMap<String, serde_json::Value>,
    /// Whether the repository has been pushed into `/workspace`.
    #[serde(default)]
    pub workspace_ready: bool,
    /// Why the sandbox is in `error`, or what went wrong last.
    pub error: Option<String>,
    #[serde(default)]
    pub last_sync: Option<SyncRecord>,
}

impl Sandbox {
    pub fn new(
        name: String,
        project_path: PathBuf,
        backend: BackendKind,
        settings: Settings,
    ) -> Self {
        Sandbox {
            id: new_id(),
            name,
            project_path,
            state: State::Created,
            backend,
            created_at: now(),
            started_at: None,
            stopped_at: None,
            settings,
            ports: BTreeMap::new(),
            owner: None,
            runtime: BTreeMap::new(),
            workspace_ready: false,
            error: None,
            last_sync: None,
        }
    }

    /// Move to `to`, refusing transitions the state machine does not allow.
    pub fn transition(&mut self, to: State) -> Result<(), RegistryError> {
        if !self.state.can_become(to) {
            return Err(RegistryError::InvalidTransition {
                name: self.name.clone(),
                from: self.state,
                to,
            });
        }
        self.state = to;
        match to {
            State::Starting => {
                self.error = None;
                self.started_at = None;
            }
            State::Running => self.started_at = Some(now()),
            State::Stopped | State::Error => {
                self.stopped_at = Some(now());
                self.owner = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// Seconds since the sandbox entered `running`, while it is running.
    pub fn uptime(&self) -> Option<u64> {
        match (self.state, self.started_at) {
            (State::Running, Some(t)) => Some(now().saturating_sub(t)),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid registry ({source}); move it aside to start afresh")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no sandbox named {name:?}; `keystone agent list` shows the sandboxes that exist")]
    NotFound { name: String },
    #[error("sandbox {name} is {from}; it cannot become {to}")]
    InvalidTransition {
        name: String,
        from: State,
        to: State,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File_ {
    version: u32,
    sandboxes: Vec<Sandbox>,
}

/// What reconciliation changed: sandboxes whose owner had died.
#[derive(Debug)]
pub struct Reaped {
    pub sandbox: Sandbox,
    pub previous: State,
}

pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// The registry under `state_dir` (e.g. `~/.local/state/keystone`).
    pub fn open(state_dir: &Path) -> Result<Registry, RegistryError> {
        let root = state_dir.to_path_buf();
        fs::create_dir_all(root.join("sandboxes")).map_err(|source| RegistryError::Io {
            path: root.clone(),
            source,
        })?;
        // Keys, tokens and control sockets (QMP, virtiofs, the relay) live
        // beneath: no other local user may look inside, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(|source| {
            RegistryError::Io {
                path: root.clone(),
                source,
            }
        })?;
        Ok(Registry { root })
    }

    /// `$XDG_STATE_HOME/keystone`, else `$HOME/.local/state/keystone`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(d).join("keystone"));
        }
        std::env::var_os("HOME")
            .filter(|d| !d.is_empty())
            .map(|h| PathBuf::from(h).join(".local/state/keystone"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a sandbox keeps its keys, disk and logs.
    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.root.join("sandboxes").join(name)
    }

    fn file_path(&self) -> PathBuf {
        self.root.join("registry.json")
    }

    fn lock(&self, exclusive: bool) -> Result<nix::fcntl::Flock<File>, RegistryError> {
        let path = self.root.join("registry.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| RegistryError::Io {
                path: path.clone(),
                source,
            })?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(file, arg).map_err(|(_, errno)| RegistryError::Io {
            path,
            source: errno.into(),
        })
    }

    fn load(&self) -> Result<File_, RegistryError> {
        let path = self.file_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| RegistryError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File_ {
                version: 1,
                sandboxes: Vec::new(),
            }),
            Err(source) => Err(RegistryError::Io { path, source }),
        }
    }

    fn store(&self, file: &File_) -> Result<(), RegistryError> {
        let path = self.file_path();
        let tmp = self
            .root
            .join(format!(".registry.json.{}", std::process::id()));
        let io = |source| RegistryError::Io {
            path: tmp.clone(),
            source,
        };
        let mut bytes =
            serde_json::to_vec_pretty(file).map_err(|source| RegistryError::Corrupt {
                path: path.clone(),
                source,
            })?;
        bytes.push(b'\n');
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(|source| RegistryError::Io { path, source })
    }

    /// All sandboxes, as last recorded (call [`reconcile`](Self::reconcile) first).
    pub fn list(&self) -> Result<Vec<Sandbox>, RegistryError> {
        let _lock = self.lock(false)?;
        Ok(self.load()?.sandboxes)
    }

    pub fn get(&self, name: &str) -> Result<Sandbox, RegistryError> {
        self.list()?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })
    }

    /// Run `f` on the whole registry under the exclusive lock and write the
    /// result back atomically if `f` succeeds. Keep `f` short: every other
    /// command waits for it.
    pub fn update<T, E>(&self, f: impl FnOnce(&mut Vec<Sandbox>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<RegistryError>,
    {
        let _lock = self.lock(true)?;
        let mut file = self.load()?;
        let before = file.sandboxes.clone();
        let out = f(&mut file.sandboxes)?;
        if file.sandboxes != before {
            file.version = 1;
            self.store(&file)?;
        }
        Ok(out)
    }

    /// Update one sandbox by name.
    pub fn update_one<T, E>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Sandbox) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<RegistryError>,
    {
        self.update(|all| {
            let sb = all
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
            f(sb)
        })
    }

    /// Correct records whose responsible process has died: `starting` and
    /// `running` become `error`, `stopping` becomes `stopped`. Returns the
    /// sandboxes changed, so the caller can have their backend clean up what
    /// the dead process left behind.
    pub fn reconcile(&self) -> Result<Vec<Reaped>, RegistryError> {
        self.update(|all| {
            let mut reaped = Vec::new();
            for sb in all.iter_mut() {
                if !sb.state.is_active() {
                    continue;
                }
                if sb.owner.is_some_and(|o| o.is_alive()) {
                    continue;
                }
                let previous = sb.state;
                let who = sb
                    .owner
                    .map(|o| format!("pid {}", o.pid))
                    .unwrap_or_else(|| "no process".into());
                if previous == State::Stopping {
                    sb.state = State::Stopped;
                } else {
                    sb.state = State::Error;
                    sb.error = Some(format!(
                        "the process responsible for the sandbox ({who}) exited while it was {previous}"
                    ));
                }
                sb.owner = None;
                sb.stopped_at = Some(now());
                reaped.push(Reaped {
                    sandbox: sb.clone(),
                    previous,
                });
            }
            Ok::<_, RegistryError>(reaped)
        })
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            kubernetes: None,
            memory_mb: 2048,
            disk_gb: 16,
            vcpus: 1,
            nested_virt: false,
            network: NetworkMode::Nat,
            egress: EgressMode::Allowlist,
            sync_mode: SyncMode::Manual,
            persist: true,
            image: "minimal-x".into(),
            workspace: WorkspaceMode::Clone,
            share_proto: ShareProto::Virtiofs,
            bridge: String::new(),
            multiplexer: Multiplexer::Tmux,
            kernel: None,
            initrd: None,
        }
    }

    #[test]
    fn records_of_earlier_versions_read_as_typed_settings() {
        // As written before the workspace, share protocol and multiplexer
        // existed, and with the empty protocol of a clone workspace.
        let old: Settings = serde_json::from_str(
            r#"{"memory_mb":2048,"vcpus":1,"nested_virt":false,"network":"bridge",
                "sync_mode":"auto-idle","persist":true,"image":"minimal-x"}"#,
        )
        .expect("old record");
        assert_eq!(old.network, NetworkMode::Bridge);
        assert_eq!(old.sync_mode, SyncMode::AutoIdle);
        assert_eq!(old.workspace, WorkspaceMode::Clone);
        assert_eq!(old.share_proto, ShareProto::Virtiofs);
        assert_eq!(old.multiplexer, Multiplexer::Tmux);
        let empty: Settings = serde_json::from_str(
            r#"{"memory_mb":2048,"vcpus":1,"nested_virt":false,"network":"nat",
                "sync_mode":"manual","persist":true,"image":"x","workspace":"share",
                "share_proto":"","multiplexer":"zellij"}"#,
        )
        .expect("empty protocol");
        assert!(empty.is_share());
        assert_eq!(empty.share_proto, ShareProto::Virtiofs);
        assert_eq!(empty.multiplexer, Multiplexer::Zellij);
        // Written in the configuration's spelling, as before.
        let text = serde_json::to_string(&empty).expect("serialize");
        assert!(
            text.contains(r#""sync_mode":"manual""#)
                && text.contains(r#""share_proto":"virtiofs""#),
            "{text}"
        );
        // A value no version wrote is an error, not a silent default.
        let bad = serde_json::from_str::<Settings>(
            r#"{"memory_mb":1,"vcpus":1,"nested_virt":false,"network":"wifi",
                "sync_mode":"manual","persist":true,"image":"x"}"#,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn round_trips_and_finds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        reg.update(|all| {
            all.push(Sandbox::new(
                "a".into(),
                "/p".into(),
                BackendKind::Container,
                settings(),
            ));
            Ok::<_, RegistryError>(())
        })
        .expect("update");
        assert_eq!(reg.get("a").expect("get").name, "a");
        assert!(matches!(reg.get("b"), Err(RegistryError::NotFound { .. })));
    }

    #[test]
    fn refused_transition_leaves_record_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        reg.update(|all| {
            all.push(Sandbox::new(
                "a".into(),
                "/p".into(),
                BackendKind::Container,
                settings(),
            ));
            Ok::<_, RegistryError>(())
        })
        .expect("update");
        let err = reg.update_one("a", |sb| sb.transition(State::Running));
        assert!(matches!(err, Err(RegistryError::InvalidTransition { .. })));
        assert_eq!(reg.get("a").expect("get").state, State::Created);
    }

    #[test]
    fn dead_owner_is_reconciled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("open");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let owner = ProcessId::of(child.id() as i32);
        child.wait().expect("wait");
        reg.update(|all| {
            let mut sb = Sandbox::new("a".into(), "/p".into(), BackendKind::Container, settings());
            sb.state = State::Running;
            sb.owner = owner.or(Some(ProcessId {
                pid: i32::MAX,
                start_time: 1,
            }));
            all.push(sb);
            let mut live =
                Sandbox::new("b".into(), "/q".into(), BackendKind::Container, settings());
            live.state = State::Running;
            live.owner = ProcessId::current();
            all.push(live);
            Ok::<_, RegistryError>(())
        })
        .expect("update");
        let reaped = reg.reconcile().expect("reconcile");
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].previous, State::Running);
        let a = reg.get("a").expect("a");
        assert_eq!(a.state, State::Error);
        assert!(a.error.expect("reason").contains("exited"));
        assert_eq!(reg.get("b").expect("b").state, State::Running);
    }

    /// Many processes' worth of read-modify-write cycles at once must not
    /// lose an update: each thread takes its own lock file descriptor, as
    /// separate commands would.
    #[test]
    fn concurrent_updates_are_serialized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        Registry::open(&root).expect("open");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let root = root.clone();
                std::thread::spawn(move || {
                    let reg = Registry::open(&root).expect("open");
                    for i in 0..25 {
                        reg.update(|all| {
                            all.push(Sandbox::new(
                                format!("s{t}-{i}"),
                                "/p".into(),
                                BackendKind::Container,
                                settings(),
                            ));
                            Ok::<_, RegistryError>(())
                        })
                        .expect("update");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        let reg = Registry::open(&root).expect("open");
        assert_eq!(reg.list().expect("list").len(), 200);
    }
}
