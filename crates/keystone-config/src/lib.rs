//! `keystone-config` owns the effective configuration of `keystone agent`:
//! it reads four layers — the user file (`~/.config/keystone/agent.toml`, XDG
//! rules, or `$KEYSTONE_AGENT_CONFIG`), the project file
//! (`<project>/.keystone/agent.toml`), `KEYSTONE_AGENT_*` environment
//! variables and command-line flags — merges them with the precedence
//! flag > environment > project file > user file > defaults, validates every
//! value, and remembers which layer each key came from (`config show`).
//!
//! The project file is the sandbox's words too (sync writes the project
//! tree): it applies only when the user trusted its exact content, and
//! never for the host-only keys (see [`trust`]).
//!
//! Every key is declared once, in the table in `schema.rs`; the environment
//! variable names live in [`env`](mod@env). A bad value is reported where it was
//! written: `PATH:LINE:COLUMN: …` for a file, `VAR=VALUE: …` for the
//! environment and `--flag VALUE: …` for a flag.
//!
//! Why `toml_edit` rather than `toml` + serde: serde deserialization loses the
//! position of a value once it has been read, and its unknown-field errors
//! cannot be rephrased per table. `toml_edit`'s `ImDocument` keeps the byte
//! span of every key and value, so the loader walks the document itself and
//! can point at the offending key or value for any error. It is the parser
//! `toml` 0.8 already uses, so it adds no new code to the build.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

pub mod env;
mod error;
mod file;
mod model;
mod schema;
pub mod trust;

pub use error::ConfigError;
pub use model::{
    AgentConfig, AgentKind, AgentsConfig, BackendConfig, BackendKind, Config, Credentials,
    Defaults, EgressConfig, EgressMode, GuestConfig, Hypervisor, KubernetesConfig, MicrovmConfig,
    Multiplexer, NetworkMode, ParseEnumError, Profile, ProxyConfig, PullPolicy, SessionConfig,
    ShareProto, SyncMode, TrustHostCas, WorkspaceMode, DEFAULT_EGRESS_PRESETS, DEFAULT_FORWARD_ENV,
};
pub use trust::{ProjectStatus, TrustStore};

use schema::FIELDS;

/// Splits a `[credentials]` item `VAR=VALUE` at its first `=`: `("VAR",
/// "VALUE")`; `None` without a `=`. Items of a loaded configuration always
/// have one, with a valid variable name before it.
pub fn split_assignment(item: &str) -> Option<(&str, &str)> {
    item.split_once('=')
}

/// The project file, relative to the project (git toplevel) directory.
pub const PROJECT_FILE: &str = ".keystone/agent.toml";

/// The user configuration file: `$KEYSTONE_AGENT_CONFIG` if set, else
/// `$XDG_CONFIG_HOME/keystone/agent.toml` (when absolute), else
/// `$HOME/.config/keystone/agent.toml`; `None` when none of these is set.
pub fn user_config_path() -> Option<PathBuf> {
    env::user_config_path_with(|name| std::env::var_os(name))
}

/// Everything `load` reads; the caller gathers it so `load` does no process
/// look-ups of its own and is testable.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Read if it exists; a missing file is not an error.
    pub user_file: Option<PathBuf>,
    /// The project file is `project_dir.join(PROJECT_FILE)`, read if it
    /// exists and applied only when its content hash is `project_trust`.
    pub project_dir: Option<PathBuf>,
    /// The hash the user pinned for this project file
    /// ([`TrustStore::pinned`]); `None` when it was never trusted.
    pub project_trust: Option<String>,
    /// The process environment; only the variables in [`env::VARS`] matter.
    pub env: BTreeMap<String, String>,
    /// Command-line overrides, applied in order (a later one wins).
    pub flags: Vec<Flag>,
}

impl Inputs {
    /// Inputs from this process: the user file from [`user_config_path`] and
    /// the `KEYSTONE_AGENT_*` environment.
    pub fn from_process(
        project_dir: Option<PathBuf>,
        project_trust: Option<String>,
        flags: Vec<Flag>,
    ) -> Inputs {
        Inputs {
            user_file: user_config_path(),
            project_dir,
            project_trust,
            env: env::from_process(),
            flags,
        }
    }
}

/// One command-line override.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flag {
    /// Dotted configuration key, e.g. `"defaults.memory"`.
    pub key: &'static str,
    /// The value as typed; booleans as `true`/`false`, lists comma-separated.
    pub value: String,
    /// The flag as the user wrote it, e.g. `"--memory"`, for messages.
    pub flag: &'static str,
}

impl Flag {
    pub fn new(key: &'static str, flag: &'static str, value: impl Into<String>) -> Flag {
        Flag {
            key,
            value: value.into(),
            flag,
        }
    }
}

/// Which layer a key's value came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "source", rename_all = "kebab-case")]
pub enum Origin {
    Default,
    UserFile(PathBuf),
    ProjectFile(PathBuf),
    /// The variable's name.
    Env(String),
    /// The flag, e.g. `--memory`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::UserFile(path) => write!(f, "user file {}", path.display()),
            Origin::ProjectFile(path) => write!(f, "project file {}", path.display()),
            Origin::Env(var) => write!(f, "env {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One leaf key of the effective configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Dotted key, e.g. `"defaults.memory"`.
    pub key: String,
    /// The value rendered as TOML, e.g. `8192`, `"nat"`, `[".env*"]`.
    pub value: String,
    pub origin: Origin,
}

/// The merged, validated configuration and where each value came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub config: Config,
    /// Parallel to `schema::FIELDS`.
    origins: Vec<Origin>,
    /// What became of the project file, when there is one.
    pub project: Option<ProjectStatus>,
}

impl Default for Effective {
    /// The built-in defaults, every key of origin [`Origin::Default`].
    fn default() -> Self {
        Effective {
            config: Config::default(),
            origins: vec![Origin::Default; FIELDS.len()],
            project: None,
        }
    }
}

impl Effective {
    /// Where `key` (dotted, e.g. `"defaults.memory"`) got its value; `None`
    /// for a key that does not exist.
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        schema::index(key).and_then(|i| self.origins.get(i))
    }

    /// The value of `key` rendered as TOML; `None` for a key that does not exist.
    pub fn value(&self, key: &str) -> Option<String> {
        schema::index(key).map(|i| (FIELDS[i].render)(&self.config))
    }

    /// Every leaf key (dotted), its value rendered as TOML, and its origin,
    /// in the order of the configuration file's layout.
    pub fn entries(&self) -> Vec<Entry> {
        FIELDS
            .iter()
            .zip(&self.origins)
            .map(|(field, origin)| Entry {
                key: field.key.to_string(),
                value: (field.render)(&self.config),
                origin: origin.clone(),
            })
            .collect()
    }
}

/// Every leaf key (dotted), in the order of the configuration file's layout.
pub fn keys() -> Vec<&'static str> {
    FIELDS.iter().map(|f| f.key).collect()
}

/// Loads the effective configuration: defaults, then the user file, the
/// project file, the environment and the flags, each overriding the last.
/// Every value of every layer is validated, including ones a higher layer
/// overrides: a broken file is reported rather than silently masked.
pub fn load(inputs: &Inputs) -> Result<Effective, ConfigError> {
    let mut effective = Effective::default();

    if let Some(path) = &inputs.user_file {
        file::apply(path, &Origin::UserFile(path.clone()), &mut effective)?;
    }
    if let Some(dir) = &inputs.project_dir {
        let path = dir.join(PROJECT_FILE);
        effective.project = match trust::read_project_file(&path) {
            Ok(None) => None,
            Ok(Some(found)) if inputs.project_trust.as_deref() == Some(found.hash.as_str()) => {
                let ignored_keys = file::apply_text(
                    &path,
                    &found.text,
                    &Origin::ProjectFile(path.clone()),
                    file::Layer::Project,
                    &mut effective,
                )?;
                Some(ProjectStatus::Trusted { path, ignored_keys })
            }
            Ok(Some(found)) if inputs.project_trust.is_some() => Some(ProjectStatus::Changed {
                path,
                hash: found.hash,
            }),
            Ok(Some(found)) => Some(ProjectStatus::Untrusted {
                path,
                hash: found.hash,
            }),
            Err(trust::TrustError::Refused { message, .. }) => Some(ProjectStatus::Refused {
                path,
                reason: message,
            }),
            Err(e) => return Err(e.into()),
        };
    }

    for (key, var) in env::VARS {
        let Some(value) = inputs.env.get(*var) else {
            continue;
        };
        // env::VARS and FIELDS are checked against each other by a test.
        let Some(index) = schema::index(key) else {
            continue;
        };
        (FIELDS[index].set_text)(&mut effective.config, value).map_err(|message| {
            ConfigError::Env {
                var: (*var).to_string(),
                value: value.clone(),
                message,
            }
        })?;
        effective.origins[index] = Origin::Env((*var).to_string());
    }

    for flag in &inputs.flags {
        let index = schema::index(flag.key).ok_or_else(|| ConfigError::UnknownFlagKey {
            flag: flag.flag.to_string(),
            key: flag.key.to_string(),
        })?;
        (FIELDS[index].set_text)(&mut effective.config, &flag.value).map_err(|message| {
            ConfigError::Flag {
                flag: flag.flag.to_string(),
                value: flag.value.clone(),
                message,
            }
        })?;
        effective.origins[index] = Origin::Flag(flag.flag.to_string());
    }

    Ok(effective)
}

#[cfg(test)]
mod tests;
