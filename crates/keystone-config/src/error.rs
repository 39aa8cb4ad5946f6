//! The one error type of the crate. Each variant carries where the bad value
//! came from, and its `Display` starts with that place, so the CLI can print
//! it as is.

use std::path::PathBuf;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A configuration file exists but could not be read.
    #[error("cannot read config file {}: {source}; fix its permissions or remove it", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file has a syntax error, an unknown key, a value of
    /// the wrong type or an invalid value.
    #[error("{}:{line}:{column}: {message}", path.display())]
    File {
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        message: String,
    },
    /// An environment variable holds an invalid value.
    #[error("{var}={value}: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    /// A command-line flag holds an invalid value.
    #[error("{flag} {value}: {message}")]
    Flag {
        flag: String,
        value: String,
        message: String,
    },
    /// The CLI passed a flag for a key this crate does not know: a bug in the
    /// caller, not in the user's input.
    #[error("{flag} sets `{key}`, which is not a configuration key (this is a bug in keystone)")]
    UnknownFlagKey { flag: String, key: String },
    /// The project file or the trust store could not be read.
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
}

impl ConfigError {
    /// Where the bad value came from: `PATH:LINE:COLUMN`, the variable, or
    /// the flag.
    pub fn location(&self) -> Option<String> {
        match self {
            ConfigError::Read { path, .. } => Some(path.display().to_string()),
            ConfigError::File {
                path, line, column, ..
            } => Some(format!("{}:{line}:{column}", path.display())),
            ConfigError::Env { var, .. } => Some(var.clone()),
            ConfigError::Flag { flag, .. } | ConfigError::UnknownFlagKey { flag, .. } => {
                Some(flag.clone())
            }
            ConfigError::Trust(crate::trust::TrustError::Refused { path, .. })
            | ConfigError::Trust(crate::trust::TrustError::Io { path, .. }) => {
                Some(path.display().to_string())
            }
        }
    }
}
