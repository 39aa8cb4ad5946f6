//! Exit codes (SPEC.md "Command line") and the one error type handlers
//! return. Every failure a user can see carries a code and a message that
//! says what happened and what to do next.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    NotFound = 1,
    InvalidState = 2,
    Failed = 3,
    Requirements = 4,
    Cancelled = 5,
}

#[derive(Debug)]
pub struct CliError {
    pub code: Exit,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, CliError>;

impl CliError {
    pub fn new(code: Exit, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Exit::NotFound, m)
    }
    pub fn state(m: impl Into<String>) -> Self {
        Self::new(Exit::InvalidState, m)
    }
    pub fn failed(m: impl Into<String>) -> Self {
        Self::new(Exit::Failed, m)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<keystone_registry::RegistryError> for CliError {
    fn from(e: keystone_registry::RegistryError) -> Self {
        use keystone_registry::RegistryError as R;
        let code = match &e {
            R::NotFound { .. } => Exit::NotFound,
            R::InvalidTransition { .. } => Exit::InvalidState,
            _ => Exit::Failed,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<keystone_config::ConfigError> for CliError {
    fn from(e: keystone_config::ConfigError) -> Self {
        CliError::new(Exit::InvalidState, format!("invalid configuration: {e}"))
    }
}

impl From<keystone_config::trust::TrustError> for CliError {
    fn from(e: keystone_config::trust::TrustError) -> Self {
        CliError::failed(e.to_string())
    }
}

impl From<keystone_backend::BackendError> for CliError {
    fn from(e: keystone_backend::BackendError) -> Self {
        use keystone_backend::BackendError as B;
        let code = match &e {
            B::Requirement(_) => Exit::Requirements,
            _ => Exit::Failed,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<keystone_channel::ChannelError> for CliError {
    fn from(e: keystone_channel::ChannelError) -> Self {
        use keystone_channel::ChannelError as C;
        let code = match &e {
            C::Missing { .. } => Exit::Requirements,
            _ => Exit::Failed,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<keystone_image::ImageError> for CliError {
    fn from(e: keystone_image::ImageError) -> Self {
        CliError::new(Exit::Failed, e.to_string())
    }
}

impl From<keystone_sync::GitError> for CliError {
    fn from(e: keystone_sync::GitError) -> Self {
        use keystone_sync::GitError as G;
        let code = match &e {
            G::NotARepo { .. } => Exit::NotFound,
            G::Missing => Exit::Requirements,
            _ => Exit::Failed,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<keystone_sync::SyncError> for CliError {
    fn from(e: keystone_sync::SyncError) -> Self {
        use keystone_sync::SyncError as S;
        match e {
            S::Git(g) => g.into(),
            S::Channel(c) => c.into(),
            S::NoChanges { .. } | S::Refused(_) => CliError::state(e.to_string()),
            S::Conflict(_) | S::NoSpace(_) => CliError::failed(e.to_string()),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::failed(e.to_string())
    }
}
