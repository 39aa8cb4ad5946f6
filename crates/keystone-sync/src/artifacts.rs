//! `sync --artifacts`: the configured build outputs copied sandbox → host
//! with rsync over the SSH channel, pulled by the host.
//!
//! The sandbox is untrusted, so the copy never writes outside the
//! destination: a destination whose path (inside the project) passes
//! through a symlink is refused; rsync runs without `--keep-dirlinks`, so a
//! symlink already inside the destination is replaced, not followed; and
//! `--safe-links` drops symlinks from the sandbox that point outside the
//! copied tree (e.g. to the host's `/etc` or home).
//!
//! Nothing lands in a `.git` or `.keystone` directory, at any depth: a
//! path naming one is refused, and the copy of a directory leaves them
//! out. Files there are code or configuration the host acts on (hooks,
//! `core.fsmonitor`, the project file), and a nested `.git` would make a
//! subdirectory a repository with the sandbox's hooks.

use crate::SyncError;
use keystone_channel::Channel;
use serde::Serialize;
use std::path::{Component, Path};
use std::process::Command;

#[derive(Clone, Debug, Serialize)]
pub struct Copied {
    pub path: String,
    /// Whether the sandbox had it.
    pub found: bool,
}

pub fn copy_back(
    project: &Path,
    paths: &[String],
    channel: &Channel,
) -> Result<Vec<Copied>, SyncError> {
    if paths.is_empty() {
        return Err(SyncError::Refused(
            "no artifacts are configured; set `artifacts = [\"dist\"]` under [defaults] in the config".into(),
        ));
    }
    if keystone_channel::which("rsync").is_none() {
        return Err(SyncError::Refused(
            "rsync is not installed: apt-get install rsync".into(),
        ));
    }
    let config = channel.write_config()?;
    let mut copied = Vec::new();
    for p in paths {
        let rel = Path::new(p.trim_end_matches('/'));
        check_path(p, rel)?;
        // No symlink on the way to the destination, from the project down.
        let mut at = project.to_path_buf();
        for c in rel.components() {
            at.push(c);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(SyncError::Refused(format!(
                    "{} is a symlink on the host; refusing to copy artifacts through it",
                    at.display()
                )));
            }
        }
        let exists = channel
            .run(
                &format!("test -e /workspace/{}", quote(&rel.display().to_string())),
                &Default::default(),
            )?
            .status
            .success();
        if !exists {
            copied.push(Copied {
                path: p.clone(),
                found: false,
            });
            continue;
        }
        let dest = project.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| SyncError::Refused(format!("{}: {e}", parent.display())))?;
        }
        let is_dir = channel
            .run(
                &format!("test -d /workspace/{}", quote(&rel.display().to_string())),
                &Default::default(),
            )?
            .status
            .success();
        let (src, dst) = if is_dir {
            (
                format!("{}:/workspace/{}/", channel.alias, rel.display()),
                format!("{}/", dest.display()),
            )
        } else {
            (
                format!("{}:/workspace/{}", channel.alias, rel.display()),
                dest.display().to_string(),
            )
        };
        let mut cmd = Command::new("rsync");
        cmd.env_clear();
        for (k, v) in keystone_channel::passthrough_env() {
            cmd.env(k, v);
        }
        let out = cmd
            .args([
                "-rlt",
                "--safe-links",
                "--no-implied-dirs",
                "--protect-args",
            ])
            .args(PROTECTED.iter().map(|d| format!("--exclude={d}")))
            .arg("-e")
            .arg(format!("ssh -F {}", quote(&config.display().to_string())))
            .arg(&src)
            .arg(&dst)
            .output()
            .map_err(|e| SyncError::Refused(format!("rsync: {e}")))?;
        if !out.status.success() {
            return Err(SyncError::Refused(format!(
                "copying {p} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        copied.push(Copied {
            path: p.clone(),
            found: true,
        });
    }
    Ok(copied)
}

/// Directory names no artifact is ever copied into, at any depth.
const PROTECTED: &[&str] = &[".git", ".keystone"];

/// An artifact path must be relative, stay beneath the project, and pass
/// through no protected directory.
fn check_path(p: &str, rel: &Path) -> Result<(), SyncError> {
    if rel.as_os_str().is_empty()
        || rel.is_absolute()
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(SyncError::Refused(format!(
            "artifact path {p:?} must be relative, without '..'"
        )));
    }
    if let Some(dir) = rel
        .components()
        .find_map(|c| PROTECTED.iter().find(|d| c.as_os_str() == **d))
    {
        return Err(SyncError::Refused(format!(
            "artifact path {p:?} is refused: nothing is copied into a {dir} directory (files there are code and configuration the host runs)"
        )));
    }
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_into_git_or_keystone_are_refused_at_any_depth() {
        for p in [
            ".git",
            ".git/hooks",
            "sub/.git/hooks/post-checkout",
            ".keystone",
            "a/.keystone/agent.toml",
        ] {
            let err = check_path(p, Path::new(p)).expect_err(p).to_string();
            assert!(err.contains("is refused"), "{p}: {err}");
        }
        for p in ["/etc", "../x", "a/../../b", ""] {
            assert!(check_path(p, Path::new(p)).is_err(), "{p}");
        }
        for p in [
            "dist",
            "target/release/app",
            ".github-pages",
            "a/.gitignore",
        ] {
            check_path(p, Path::new(p)).expect(p);
        }
    }
}
