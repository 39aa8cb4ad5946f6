//! The guest image: its recipe, the content hash that caches it, building it
//! with mmdebstrap, and the local image store.
//!
//! An image is a Debian root filesystem as a tarball (numeric owners
//! preserved) plus a JSON manifest, kept in `<root>/<id>/{rootfs.tar,
//! image.json}`. Its id is `<profile>-<12 hex>` of a SHA-256 over everything
//! that shapes it (see [`Recipe::hash`]), so a changed recipe, package list
//! or guest file is a new image and an unchanged one is built once. What a
//! backend needs (a directory, an ext4 disk, an OCI layout) it derives from
//! the tarball itself; this crate knows nothing of backends.
//!
//! The guest (see [`guest`]): user `agent` (1000:1000, passwordless sudo),
//! an SSH server that takes its host key and `authorized_keys` from
//! `/etc/keystone`, mounted per sandbox at run time, `/workspace` owned by
//! the agent, and no per-machine state (no host keys, empty machine id).
//!
//! Why mmdebstrap: it is Debian's own tool, in Debian, and installs from the
//! one archive every machine we target can reach; it resolves dependencies
//! with apt, so package lists stay short; its output is reproducible (sorted
//! tar, clamped times, cleaned logs); and its unshare mode builds the same
//! image without root through a user namespace, so a desktop user needs no
//! sudo. It runs as a supervised child: cleared environment, own process
//! group, SIGTERM (which it handles by unmounting and cleaning up) when we
//! go away.

pub mod agents;
mod error;
pub mod guest;
mod mmdebstrap;
pub mod oci;
mod progress;
mod recipe;
mod store;
pub mod tools;

pub use agents::{Agent, AgentSetup};
pub use error::ImageError;
pub use progress::{NoProgress, Progress};
pub use recipe::{Profile, Recipe, DEFAULT_MIRROR, DEFAULT_SUITE, FORMAT_VERSION};
pub use store::{Image, ImageStore};
