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
//!
//! The build is made cheaper than Zellij's own release profile (fat LTO,
//! one codegen unit: about 25 minutes on 2 cores) and leaves out the
//! web-server feature keystone never uses (its web terminal is its own):
//! see [`ZELLIJ_BUILD`].
//!
//! cargo is found the way a user's shell finds it, and keeps working when
//! keystone runs with a `HOME` that is not the account's (a test harness,
//! `sudo -H`, a service): a rustup proxy looks for its toolchains under
//! `$HOME/.rustup`, so when that holds none the account's own
//! `~/.rustup` and `~/.cargo` are passed on ([`toolchain_env`]).

use crate::{ImageError, Progress};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The Zellij release images carry (an exact crates.io version).
pub const ZELLIJ_VERSION: &str = "0.45.1";

/// How Zellij is built: `cargo install` arguments after the version, and
/// the profile overrides (cargo lets the environment override a package's
/// own `[profile.release]`). Measured on 2 cores: 8 min 12 s (13 min of
/// CPU) for this, against about 25 minutes with Zellij's own profile.
const ZELLIJ_BUILD: ZellijBuild = ZellijBuild {
    // `vendored_curl` keeps the binary free of the host's libcurl and
    // OpenSSL, which a minimal guest does not have; `web_server_capability`
    // (Zellij's own web client) is left out.
    features: &["--no-default-features", "--features", "vendored_curl"],
    profile: &[
        ("CARGO_PROFILE_RELEASE_LTO", "off"),
        ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"),
    ],
};

struct ZellijBuild {
    features: &'static [&'static str],
    profile: &'static [(&'static str, &'static str)],
}

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
    let cargo = Cargo::find(&format!("Zellij {version}"))?;
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
    let mut install = cargo.command_niced();
    install
        .args(["install", "--locked", "zellij", "--version", version])
        .args(ZELLIJ_BUILD.features)
        .arg("--root")
        .arg(&root)
        .envs(ZELLIJ_BUILD.profile.iter().copied())
        .env("CARGO_TARGET_DIR", &target);
    let status = install
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

/// The host's cargo, with the environment it needs to find its toolchain.
struct Cargo {
    path: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
}

impl Cargo {
    /// cargo on `PATH`, checked to run (`cargo --version`) so that a
    /// toolchain that is not there fails in a second, not after the
    /// download, with what to do. `what` names the build, for the error.
    fn find(what: &str) -> Result<Cargo, ImageError> {
        let no_cargo = |detail: String| ImageError::ToolBuild {
            what: what.to_string(),
            detail,
            log: None,
        };
        let path = which("cargo").ok_or_else(|| no_cargo(
            "it is built from crates.io with cargo, which is not on PATH: install a Rust toolchain (https://rustup.rs), or set session.multiplexer = \"tmux\"".into(),
        ))?;
        let account_home = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.dir);
        let env = toolchain_env(&|k| std::env::var_os(k), account_home.as_deref());
        let cargo = Cargo { path, env };
        let out = cargo
            .command()
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ImageError::Spawn {
                command: format!("{} --version", cargo.path.display()),
                source,
            })?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            return Err(no_cargo(format!(
                "{} does not run ({}: {said}): with rustup, install a default toolchain (`rustup default stable`) or point RUSTUP_HOME and CARGO_HOME at the toolchain's directories; or set session.multiplexer = \"tmux\"",
                cargo.path.display(),
                out.status,
            )));
        }
        Ok(cargo)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// cargo under `nice`: the build is long and must not starve the rest
    /// of the machine.
    fn command_niced(&self) -> Command {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10"])
            .arg(&self.path)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// What to add to cargo's environment so that a rustup-installed
/// toolchain is found whatever `HOME` says: for `RUSTUP_HOME` and
/// `CARGO_HOME`, when the variable is unset and `$HOME` has no such
/// directory but the account's home (from the user database) does, that
/// directory. Nothing when the variables are set or `$HOME` is the
/// account's: cargo then finds what it always finds.
fn toolchain_env(
    var: &dyn Fn(&str) -> Option<OsString>,
    account_home: Option<&Path>,
) -> Vec<(&'static str, PathBuf)> {
    let home = var("HOME").map(PathBuf::from);
    [("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")]
        .into_iter()
        .filter(|(key, _)| var(key).is_none())
        .filter(|(_, dir)| !home.as_ref().is_some_and(|h| h.join(dir).is_dir()))
        .filter_map(|(key, dir)| {
            let candidate = account_home?.join(dir);
            candidate.is_dir().then_some((key, candidate))
        })
        .collect()
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

    fn vars(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_home_without_a_toolchain_gets_the_accounts_one() {
        let account = tempfile::tempdir().expect("tempdir");
        let other_home = tempfile::tempdir().expect("tempdir");
        fs::create_dir(account.path().join(".rustup")).expect("mkdir");
        fs::create_dir(account.path().join(".cargo")).expect("mkdir");
        let env = toolchain_env(&vars(&[("HOME", other_home.path())]), Some(account.path()));
        assert_eq!(
            env,
            vec![
                ("RUSTUP_HOME", account.path().join(".rustup")),
                ("CARGO_HOME", account.path().join(".cargo")),
            ]
        );
    }

    #[test]
    fn set_variables_and_a_home_with_its_own_toolchain_are_left_alone() {
        let account = tempfile::tempdir().expect("tempdir");
        let home = tempfile::tempdir().expect("tempdir");
        for d in [".rustup", ".cargo"] {
            fs::create_dir(account.path().join(d)).expect("mkdir");
        }
        fs::create_dir(home.path().join(".rustup")).expect("mkdir");
        let elsewhere = Path::new("/opt/cargo");
        let env = toolchain_env(
            &vars(&[("HOME", home.path()), ("CARGO_HOME", elsewhere)]),
            Some(account.path()),
        );
        assert!(env.is_empty(), "{env:?}");
        // An account without a toolchain adds nothing either.
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(toolchain_env(&vars(&[]), Some(empty.path())).is_empty());
    }

    /// The regression: the e2e harness (and `sudo -H`, services) run
    /// keystone with a `HOME` that holds no toolchain, and a rustup proxy
    /// then could not choose a cargo. This runs the real cargo on `PATH`
    /// (the one running this test) with such a `HOME`.
    #[test]
    fn cargo_runs_with_a_home_that_has_no_toolchain() {
        let empty_home = tempfile::tempdir().expect("tempdir");
        let path = which("cargo").expect("cargo on PATH (the tests run under it)");
        let account_home = nix::unistd::User::from_uid(nix::unistd::getuid())
            .expect("user database")
            .map(|u| u.dir);
        let env = toolchain_env(
            &|k| match k {
                "HOME" => Some(empty_home.path().as_os_str().to_owned()),
                // The variables cargo sets for a test are not the user's.
                "RUSTUP_HOME" | "CARGO_HOME" => None,
                _ => std::env::var_os(k),
            },
            account_home.as_deref(),
        );
        let run = |with_fix: bool| {
            let mut cmd = Command::new(&path);
            cmd.arg("--version")
                .env_remove("RUSTUP_HOME")
                .env_remove("CARGO_HOME")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env("HOME", empty_home.path());
            if with_fix {
                cmd.envs(env.iter().map(|(k, v)| (k, v)));
            }
            cmd.output().expect("run cargo")
        };
        let fixed = run(true);
        assert!(
            fixed.status.success(),
            "cargo --version with HOME={} and {env:?}: {}",
            empty_home.path().display(),
            String::from_utf8_lossy(&fixed.stderr)
        );
        // Where cargo is a rustup proxy, the same run without the fix
        // fails as it did in CI: this test reproduces the bug it guards.
        let is_rustup_proxy =
            fs::canonicalize(&path).is_ok_and(|p| p.file_name().is_some_and(|n| n == "rustup"));
        if is_rustup_proxy {
            let plain = run(false);
            assert!(
                !plain.status.success(),
                "a rustup proxy ran with an empty HOME: the test no longer reproduces the bug"
            );
        }
    }
}
