//! One handler per subcommand.

pub mod attach;
pub mod autosync;
pub mod config;
pub mod destroy;
pub mod doctor;
pub mod egress;
pub mod exec;
pub mod image;
pub mod proxy;
pub mod ssh;
pub mod start;
pub mod status;
pub mod stop;
pub mod supervise;
pub mod sync;
pub mod tokens;
pub mod trust;
pub mod worktree;
