//! Trust in the project file (`.keystone/agent.toml`).
//!
//! The project file lives in the project's working tree, which `sync`
//! fills with the sandbox's commits: the agent can write it. So it is
//! honoured only once the user has trusted its exact content, the way
//! direnv's `allow` works: `keystone agent trust` pins the SHA-256 of the
//! file's bytes together with its canonical path in the user's own state
//! (`$XDG_STATE_HOME/keystone/trust.json`, 0600, outside every project).
//! Any change of content or place makes it untrusted again, and commands
//! then ignore it with one line saying so.
//!
//! Even a trusted project file may not set the keys in [`HOST_ONLY`]: they
//! name host paths, host variables, host networks or clusters, or feed the
//! image build, which runs as root on the host. A content review is easy
//! to get wrong for those, and a project has no need to choose them for
//! the user; they belong in the user's own file.
//!
//! `guest.trust_host_cas` is deliberately not host-only: it can only copy
//! public certificates the host already trusts into the guest (or leave
//! them out), never name a certificate or send anything of the host's.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Keys a project file never sets, trusted or not, and why.
pub const HOST_ONLY: &[(&str, &str)] = &[
    ("egress.mode", "it decides what the sandbox may reach"),
    ("egress.presets", "it decides what the sandbox may reach"),
    ("egress.allow", "it decides what the sandbox may reach"),
    ("egress.deny", "it decides what the sandbox may reach"),
    (
        "egress.host_services",
        "it exposes host services to the sandbox",
    ),
    ("egress.resolver", "it names a host network"),
    (
        "defaults.env_files",
        "it chooses host files to copy into the sandbox",
    ),
    (
        "defaults.artifacts",
        "it chooses where the sandbox's files land on the host",
    ),
    ("backend.microvm.bridge", "it names a host network"),
    ("backend.microvm.kernel", "it names a host file QEMU loads"),
    ("backend.microvm.initrd", "it names a host file QEMU loads"),
    (
        "backend.microvm.workspace",
        "a live share gives the sandbox the project's .git",
    ),
    (
        "backend.microvm.share_proto",
        "it belongs with the live share",
    ),
    (
        "backend.kubernetes.context",
        "it chooses a cluster with your credentials",
    ),
    (
        "backend.kubernetes.namespace",
        "it chooses where your credentials create objects",
    ),
    (
        "backend.kubernetes.image",
        "it chooses the image your cluster runs",
    ),
    (
        "backend.kubernetes.pull_policy",
        "it belongs with the image",
    ),
    (
        "backend.kubernetes.storage_class",
        "it chooses your cluster's storage",
    ),
    ("proxy.enable", "it controls a host service"),
    ("proxy.domain", "it controls a host service"),
    ("proxy.port", "it chooses a host port"),
    (
        "guest.suite",
        "the image build runs package scripts as root on the host",
    ),
    (
        "guest.mirror",
        "the image build runs package scripts as root on the host",
    ),
    (
        "guest.packages",
        "the image build runs package scripts as root on the host",
    ),
    (
        "guest.forward_env",
        "it sends host variables into the sandbox",
    ),
    (
        "credentials.hosts",
        "it chooses where your credentials are sent",
    ),
    (
        "credentials.headers",
        "it chooses where your credentials are sent",
    ),
    ("credentials.commands", "it runs a command on the host"),
];

/// Why a host-only key is refused, or `None` for a key a trusted project
/// file may set.
pub fn host_only(key: &str) -> Option<&'static str> {
    HOST_ONLY
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, why)| *why)
}

/// The project file as found, before any of it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectFile {
    pub path: PathBuf,
    /// Hex SHA-256 of its bytes.
    pub hash: String,
    pub text: String,
}

/// What became of the project file in a load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum ProjectStatus {
    /// Applied (without the host-only keys it set, listed here).
    Trusted {
        path: PathBuf,
        ignored_keys: Vec<String>,
    },
    /// Ignored: never trusted.
    Untrusted { path: PathBuf, hash: String },
    /// Ignored: trusted once, but its content changed since.
    Changed { path: PathBuf, hash: String },
    /// Ignored: not a file keystone reads (a link, another owner's, not
    /// text). Not an error: a sandbox must not be able to stop every host
    /// command by committing one.
    Refused { path: PathBuf, reason: String },
}

impl ProjectStatus {
    /// The line a command prints when the file was not (wholly) applied.
    pub fn notice(&self) -> Option<String> {
        match self {
            ProjectStatus::Trusted { path, ignored_keys } if !ignored_keys.is_empty() => {
                Some(format!(
                    "{}: ignoring {} (only your own config file may set {}: {})",
                    path.display(),
                    ignored_keys.join(", "),
                    if ignored_keys.len() == 1 { "it" } else { "them" },
                    ignored_keys
                        .iter()
                        .filter_map(|k| host_only(k))
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            }
            ProjectStatus::Trusted { .. } => None,
            ProjectStatus::Untrusted { path, .. } => Some(format!(
                "ignoring {}: it is not trusted (the project, and so a sandbox through sync, can write it); \
                 review it, then run `keystone agent trust`",
                path.display()
            )),
            ProjectStatus::Refused { path, reason } => {
                Some(format!("ignoring {}: it {reason}", path.display()))
            }
            ProjectStatus::Changed { path, .. } => Some(format!(
                "ignoring {}: it changed since you trusted it; review it (`git log -p -- .keystone/agent.toml`), \
                 then run `keystone agent trust`",
                path.display()
            )),
        }
    }
}

/// Problems reading the project file or the trust store.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `message` completes "PATH …": "is a symbolic link; …".
    #[error("{} {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.to_path_buf();
    move |source| TrustError::Io {
        action,
        path,
        source,
    }
}

/// Hex SHA-256 of `bytes`.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the project file at `path` (`None` when there is none). It must
/// be a regular file (opened without following a link: a link could make
/// a host file the configuration) owned by the user or root, and UTF-8.
pub fn read_project_file(path: &Path) -> Result<Option<ProjectFile>, TrustError> {
    let refused = |message: String| TrustError::Refused {
        path: path.to_path_buf(),
        message,
    };
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused(
                "is a symbolic link; a project file must be a regular file (remove the link)"
                    .into(),
            ))
        }
        Err(e) => return Err(io("open", path)(e)),
    };
    let meta = file.metadata().map_err(io("read", path))?;
    if !meta.file_type().is_file() {
        return Err(refused("is not a regular file; remove it".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refused(format!(
            "is owned by uid {}, not by you (uid {me}); keystone reads only your own project files",
            meta.uid()
        )));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("read", path))?;
    let hash = content_hash(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| refused("is not UTF-8 text".into()))?;
    Ok(Some(ProjectFile {
        path: path.to_path_buf(),
        hash,
        text,
    }))
}

/// The user's pins: canonical project-file path → content hash.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Pins {
    files: BTreeMap<PathBuf, String>,
}

/// Where the pins live, `<state dir>/trust.json`.
#[derive(Clone, Debug)]
pub struct TrustStore {
    path: PathBuf,
}

impl TrustStore {
    /// The store in keystone's state directory (`$XDG_STATE_HOME/keystone`).
    pub fn in_state_dir(state_dir: &Path) -> TrustStore {
        TrustStore {
            path: state_dir.join("trust.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash pinned for the project file at `file`, if any.
    pub fn pinned(&self, file: &Path) -> Result<Option<String>, TrustError> {
        let key = canonical(file);
        Ok(self.read()?.files.get(&key).cloned())
    }

    /// Pins `file`'s current content.
    pub fn pin(&self, file: &ProjectFile) -> Result<(), TrustError> {
        let mut pins = self.read()?;
        pins.files.insert(canonical(&file.path), file.hash.clone());
        self.write(&pins)
    }

    /// Removes the pin of `file`; whether there was one.
    pub fn revoke(&self, file: &Path) -> Result<bool, TrustError> {
        let mut pins = self.read()?;
        let had = pins.files.remove(&canonical(file)).is_some();
        if had {
            self.write(&pins)?;
        }
        Ok(had)
    }

    fn read(&self) -> Result<Pins, TrustError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TrustError::Refused {
                path: self.path.clone(),
                message: format!("is not a valid trust store ({e}); remove it and trust again"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pins::default()),
            Err(e) => Err(io("read", &self.path)(e)),
        }
    }

    /// Atomically, 0600, in a directory only the user can enter.
    fn write(&self, pins: &Pins) -> Result<(), TrustError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("write in", dir))?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("set the mode of", &self.path))?;
        let json = serde_json::to_vec_pretty(pins).map_err(|e| TrustError::Refused {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        tmp.write_all(&json).map_err(io("write", &self.path))?;
        tmp.as_file().sync_all().map_err(io("write", &self.path))?;
        tmp.persist(&self.path)
            .map_err(|e| io("replace", &self.path)(e.error))?;
        Ok(())
    }
}

/// The file's canonical path (its directory resolved: the file itself is
/// never followed), so a pin follows the project, not a spelling of it.
fn canonical(file: &Path) -> PathBuf {
    match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) => fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| file.to_path_buf()),
        _ => file.to_path_buf(),
    }
}
