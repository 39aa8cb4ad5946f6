//! Programs the guest image needs that Debian does not package, built on
//! the host from crates.io and cached beside the images: Zellij, when the
//! sessions use it (`session.multiplexer = "zellij"`).
//!
//! `cargo install --locked` builds the exact version with the lock file
//! Zellij publishes, into `<store>/tools/zellij-<version>/bin/zellij`; the
//! build directory is kept beside it (`.target`), so an interrupted build
//! resumes instead of starting over. The host and the guest are both
//! Debian on the same architecture, and the guest's libc is never older
//! than the host's supported one, so the binary runs in the guest.

use crate::{ImageError, Progress};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The Zellij release images carry (an exact crates.io version).
pub const ZELLIJ_VERSION: &str = "0.45.1";

/// Where the binary of `version` lives once built.
pub fn zellij_binary(store_root: &Path, version: &str) -> PathBuf {
    store_root
        .join("tools")
        .join(format!("zellij-{version}"))
        .join("bin")
        .join("zellij")
}

/// The cached Zellij `version`, built first if there is none. Concurrent
/// callers build it once (a lock per version).
pub(crate) fn ensure_zellij(
    store_root: &Path,
    version: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, ImageError> {
    let binary = zellij_binary(store_root, version);
    if binary.is_file() {
        return Ok(binary);
    }
    let tools = store_root.join("tools");
    fs::create_dir_all(&tools).map_err(|e| ImageError::io("create", &tools, e))?;
    let lock_path = tools.join(format!("zellij-{version}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ImageError::io("open the lock file", &lock_path, e))?;
    let _lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((f, Errno::EWOULDBLOCK)) => {
            progress.phase(&format!(
                "waiting for another build of Zellij {version} to finish"
            ));
            let mut f = f;
            loop {
                match Flock::lock(f, FlockArg::LockExclusive) {
                    Ok(lock) => break lock,
                    Err((back, Errno::EINTR)) => f = back,
                    Err((_, e)) => return Err(ImageError::io("lock", &lock_path, e.into())),
                }
            }
        }
        Err((_, e)) => return Err(ImageError::io("lock", &lock_path, e.into())),
    };
    if binary.is_file() {
        return Ok(binary);
    }
    let cargo = which("cargo").ok_or_else(|| ImageError::ToolBuild {
        what: format!("Zellij {version}"),
        detail: "it is built from crates.io with cargo, which is not installed: install a Rust toolchain (https://rustup.rs), or set session.multiplexer = \"tmux\"".into(),
        log: None,
    })?;
    let root = tools.join(format!(".tmp-zellij-{version}"));
    let _ = fs::remove_dir_all(&root);
    let target = tools.join(format!("zellij-{version}.target"));
    let log = tools.join(format!("zellij-{version}.build.log"));
    let log_file = fs::File::create(&log).map_err(|e| ImageError::io("create", &log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| ImageError::io("open", &log, e))?;
    progress.phase(&format!(
        "building Zellij {version} from crates.io (once; it takes many minutes, log: {})",
        log.display()
    ));
    let started = Instant::now();
    // nice: the build is long and must not starve the rest of the machine.
    let status = Command::new("nice")
        .args(["-n", "10"])
        .arg(&cargo)
        .args([
            "install",
            "--locked",
            "zellij",
            "--version",
            version,
            "--root",
        ])
        .arg(&root)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .map_err(|source| ImageError::Spawn {
            command: "cargo install zellij".into(),
            source,
        })?;
    let built = root.join("bin").join("zellij");
    if !status.success() || !built.is_file() {
        return Err(ImageError::ToolBuild {
            what: format!("Zellij {version}"),
            detail: format!(
                "`cargo install --locked zellij --version {version}` failed ({status})"
            ),
            log: Some(log),
        });
    }
    let final_dir = tools.join(format!("zellij-{version}"));
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(&root, &final_dir).map_err(|e| ImageError::io("publish", &final_dir, e))?;
    // The compiled dependencies are only worth keeping for a retry.
    let _ = fs::remove_dir_all(&target);
    tracing::info!(
        version,
        seconds = started.elapsed().as_secs(),
        "built zellij"
    );
    progress.phase(&format!(
        "built Zellij {version} in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(binary)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_binary_is_used_without_building() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = zellij_binary(dir.path(), "9.9.9");
        fs::create_dir_all(bin.parent().expect("bin dir")).expect("mkdir");
        fs::write(&bin, "#!/bin/sh\n").expect("write");
        let got = ensure_zellij(dir.path(), "9.9.9", &crate::NoProgress).expect("cached");
        assert_eq!(got, bin);
    }
}
