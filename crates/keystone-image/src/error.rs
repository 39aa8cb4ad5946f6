//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, finding or removing an image.
///
/// Messages are lower-case, name the path or command involved, and say what
/// to do next.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image profile {name:?}: expected \"minimal\" or \"full\"")]
    UnknownProfile { name: String },

    #[error("invalid image recipe: {reason}")]
    InvalidRecipe { reason: String },

    #[error("invalid image id {id:?}: ids look like \"minimal-0123456789ab\"")]
    InvalidId { id: String },

    #[error("no image {id} in {root}: list the images that exist, or build one")]
    NotFound { id: String, root: PathBuf },

    #[error("mmdebstrap is not installed: apt-get install mmdebstrap")]
    MmdebstrapMissing,

    #[error(
        "building an image without root uses mmdebstrap's unshare mode, which needs newuidmap: apt-get install uidmap"
    )]
    UidmapMissing,

    #[error(
        "building an image without root uses mmdebstrap's unshare mode, which needs a subordinate id range for {user} in {path}: \
         run `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}` as root, or build as root"
    )]
    NoSubordinateIds { user: String, path: PathBuf },

    #[error("could not build {what} for the guest image: {detail}{}", log.as_ref().map(|l| format!("; see the log {}", l.display())).unwrap_or_default())]
    ToolBuild {
        what: String,
        detail: String,
        log: Option<PathBuf>,
    },

    #[error("could not start {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "mmdebstrap failed ({status}) building image {id}; its last lines:\n{tail}\nthe full log is {log}; \
         check that the mirror is reachable and the package names exist in the suite"
    )]
    BuildFailed {
        id: String,
        status: String,
        tail: String,
        log: PathBuf,
    },

    #[error(
        "mmdebstrap reported success but wrote no root filesystem at {path}; see the log {log}"
    )]
    MissingOutput { path: PathBuf, log: PathBuf },

    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("pushing the image to {destination} failed: {reason}\ncheck the reference, that you are logged in (`skopeo login`), and --insecure for a plain-HTTP registry")]
    Push { destination: String, reason: String },

    #[error("could not write the image manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
