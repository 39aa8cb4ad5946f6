//! `sync --artifacts`: the configured build outputs copied sandbox → host
//! with rsync over the SSH channel, pulled by the host.
//!
//! The sandbox is untrusted, so the copy never writes outside the
//! destination: a destination whose path (inside the project) passes
//! through a symlink is refused; rsync runs without `--keep-dirlinks`, so a
//! symlink already inside the destination is replaced, not followed; and
//! `--safe-links` drops symlinks from the sandbox that point outside the
//! copied tree (e.g. to the host's `/etc` or home).

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
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(SyncError::Refused(format!(
                "artifact path {p:?} must be relative, without '..'"
            )));
        }
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
                "-e",
            ])
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

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
