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
    /// The error this one was made from, whose `source()` chain is printed
    /// under the message as "caused by:" lines (see [`CliError::causes`]).
    pub cause: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T> = std::result::Result<T, CliError>;

impl CliError {
    pub fn new(code: Exit, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
            cause: None,
        }
    }

    /// `error` with `code`: its message, and its chain kept for printing.
    pub fn from_error(code: Exit, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        CliError {
            code,
            message: error.to_string(),
            cause: Some(Box::new(error)),
        }
    }

    /// The causes under the message, outermost first: every `source()` of
    /// the error this came from whose text the lines before do not already
    /// say (many of our errors put their source in their own message, as
    /// `context: source`; a cause is printed once).
    pub fn causes(&self) -> Vec<String> {
        let mut said = self.message.clone();
        let mut out = Vec::new();
        let mut next = self.cause.as_deref().and_then(|e| e.source());
        while let Some(e) = next {
            let text = e.to_string();
            if !said.contains(&text) {
                said.push('\n');
                said.push_str(&text);
                out.push(text);
            }
            next = e.source();
        }
        out
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
    /// The message and its causes on one line (for the registry and the
    /// supervisor's ready pipe); the terminal gets them one per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for c in self.causes() {
            write!(f, ": {c}")?;
        }
        Ok(())
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
        CliError::from_error(code, e)
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
        CliError::from_error(backend_code(&e), e)
    }
}

/// The exit code of a backend error: the one in front for an error whose
/// teardown failed as well.
fn backend_code(e: &keystone_backend::BackendError) -> Exit {
    use keystone_backend::BackendError as B;
    match e {
        B::Requirement(_) => Exit::Requirements,
        B::WithCleanup { error, .. } => backend_code(error),
        _ => Exit::Failed,
    }
}

impl From<keystone_channel::ChannelError> for CliError {
    fn from(e: keystone_channel::ChannelError) -> Self {
        use keystone_channel::ChannelError as C;
        let code = match &e {
            C::Missing { .. } => Exit::Requirements,
            _ => Exit::Failed,
        };
        CliError::from_error(code, e)
    }
}

impl From<keystone_image::ImageError> for CliError {
    fn from(e: keystone_image::ImageError) -> Self {
        CliError::from_error(Exit::Failed, e)
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
        CliError::from_error(code, e)
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
        CliError::from_error(Exit::Failed, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(String, #[source] Option<Box<Layer>>);

    fn chain(texts: &[&str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |inner, t| {
                Some(Layer(t.to_string(), inner.map(Box::new)))
            })
            .expect("one layer")
    }

    #[test]
    fn causes_are_listed_once_outermost_first() {
        let e = CliError::from_error(
            Exit::Failed,
            chain(&["cannot start qemu", "spawn", "Permission denied"]),
        );
        assert_eq!(e.message, "cannot start qemu");
        assert_eq!(e.causes(), ["spawn", "Permission denied"]);
        assert_eq!(e.to_string(), "cannot start qemu: spawn: Permission denied");
        // A message that already says its cause does not repeat it.
        let e = CliError::from_error(
            Exit::Failed,
            chain(&["bind /x: Address in use", "Address in use"]),
        );
        assert!(e.causes().is_empty());
        assert_eq!(e.to_string(), "bind /x: Address in use");
    }

    #[test]
    fn a_failed_teardown_keeps_the_code_of_its_cause() {
        use keystone_backend::BackendError as B;
        let e = B::Requirement("apt-get install passt".into())
            .with_cleanup(B::Leftovers(vec!["the tap device ks0".into()]));
        let cli = CliError::from(e);
        assert_eq!(cli.code, Exit::Requirements);
        assert_eq!(
            cli.message,
            "apt-get install passt; cleanup also failed: teardown left the tap device ks0"
        );
    }
}
