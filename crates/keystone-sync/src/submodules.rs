//! Submodules come in with their repository and go home with it.
//!
//! Which submodules there are is the host's own word: the
//! `submodule.<name>.url` entries that `git submodule init` wrote into the
//! host's config, whose git directory exists under the host's
//! `.git/modules/` (and, for nested ones, the same inside each of those).
//! `.gitmodules` is never read on the host: the sandbox writes it through
//! sync, so its URLs and options never drive a host-side fetch, clone or
//! checkout. A submodule the sandbox adds stays in the sandbox until the
//! user initializes it on the host.
//!
//! Each known submodule's objects are pushed into the same place in the
//! sandbox (`/workspace/.git/modules/<name>`), where `git submodule update
//! --init --recursive` finds the repository already there and fetches
//! nothing. Coming home, each is fetched, objects only, into
//! `refs/keystone/<sandbox>/` of the host's submodule repository; when the
//! superproject's branch has moved, a host submodule checkout that was at
//! the old recorded commit and clean follows it, as `git submodule update`
//! would, and any other is left as it is, with a line saying so.

use crate::git::{Git, GitError};
use crate::{shell_quote, SyncError};
use keystone_channel::{Channel, ExecOptions};
use std::path::{Path, PathBuf};

/// One submodule the host has initialized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submodule {
    /// Its name in its parent's config (`vendor/lib`).
    pub name: String,
    /// The host's git directory for it.
    pub gitdir: PathBuf,
    /// The same, below the main repository's git directory
    /// (`modules/vendor/lib/modules/deps/nested`): where it lives in the
    /// sandbox too.
    pub rel: String,
    /// Its parent, an index into the list; None: the superproject.
    pub parent: Option<usize>,
}

/// A name git itself would accept for a submodule's directory (git's
/// `check_submodule_name`): no `..` component, not absolute.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The submodules the host has initialized, parents before children.
pub fn host_submodules(git: &Git) -> Result<Vec<Submodule>, GitError> {
    let top = git.common_dir()?;
    let mut out = Vec::new();
    walk(git, &top, "", None, &mut out)?;
    Ok(out)
}

fn walk(
    git: &Git,
    gitdir: &Path,
    rel: &str,
    parent: Option<usize>,
    out: &mut Vec<Submodule>,
) -> Result<(), GitError> {
    for name in git.submodule_names(&gitdir.join("config"))? {
        if !safe_name(&name) {
            continue;
        }
        let dir = gitdir.join("modules").join(&name);
        let is_repo = dir.join("HEAD").is_file() && dir.join("objects").is_dir();
        let linked = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink());
        if !is_repo || linked {
            continue;
        }
        let here = format!("{rel}modules/{name}");
        out.push(Submodule {
            name,
            gitdir: dir.clone(),
            rel: here.clone(),
            parent,
        });
        let index = out.len() - 1;
        walk(git, &dir, &format!("{here}/"), Some(index), out)?;
    }
    Ok(())
}

fn guest_dir(s: &Submodule) -> String {
    format!("/workspace/.git/{}", s.rel)
}

/// First start: each submodule's repository in the sandbox, with the
/// host's branches, remote-tracking branches and checked-out commit, then
/// `git submodule update --init --recursive` there. Returns a line for the
/// user when that update did not complete.
pub fn push_initial(git: &Git, channel: &Channel) -> Result<Option<String>, SyncError> {
    let subs = host_submodules(git)?;
    if subs.is_empty() {
        return Ok(None);
    }
    let agent = ExecOptions::default();
    // Bare while the host pushes its branches (a non-bare repository
    // refuses a push to its HEAD's branch), then a submodule directory.
    let mut script = String::from("set -e; ");
    for s in &subs {
        let d = shell_quote(&guest_dir(s));
        script.push_str(&format!(
            "git init -q --bare {d}; git -C {d} config receive.shallowUpdate true; "
        ));
    }
    channel.run_ok(&script, &agent)?;
    for s in &subs {
        push_refs(channel, s, true)?;
    }
    let mut script = String::from("set -e; ");
    for s in &subs {
        script.push_str(&format!(
            "git -C {} config core.bare false; ",
            shell_quote(&guest_dir(s))
        ));
    }
    script.push_str("cd /workspace && git submodule update --init --recursive --quiet 2>&1");
    let out = channel.run(&script, &agent)?;
    if out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(format!(
        "the submodules were pushed in, but `git submodule update --init --recursive` in /workspace failed: {}",
        text.trim().lines().last().unwrap_or_default()
    )))
}

/// The host's commits of submodule `s` into its repository in the
/// sandbox: at the first start as its branches, later under
/// `refs/keystone/host/` (never over a branch the agent works on).
fn push_refs(channel: &Channel, s: &Submodule, initial: bool) -> Result<(), SyncError> {
    let sub = Git::open(&s.gitdir);
    let url = channel.git_url(&guest_dir(s));
    let mut args = vec!["push", "--quiet", "--no-verify", "--force", url.as_str()];
    let has_head = sub.rev_parse("HEAD")?.is_some();
    if has_head {
        args.push("HEAD:refs/keystone/host-head");
    }
    if initial {
        args.extend(["refs/heads/*:refs/heads/*", "refs/remotes/*:refs/remotes/*"]);
    } else {
        args.extend([
            "refs/heads/*:refs/keystone/host/heads/*",
            "refs/remotes/*:refs/keystone/host/remotes/*",
        ]);
    }
    sub.remote_op(channel, &args)
        .map(|_| ())
        .map_err(Into::into)
}

/// Before the host's commits go into the sandbox: the submodule commits
/// they record, so `git submodule update` inside needs nothing else.
pub fn push_host_commits(git: &Git, channel: &Channel) -> Result<(), SyncError> {
    for s in host_submodules(git)? {
        push_refs(channel, &s, false)?;
    }
    Ok(())
}

/// Fetch the sandbox's work in each known submodule, objects only, into
/// `refs/keystone/<sandbox>/` of the host's submodule repository (its
/// branches, and its HEAD: an agent often commits on the detached HEAD a
/// submodule checkout has). Returns a line per submodule that could not be
/// fetched.
pub fn fetch(git: &Git, channel: &Channel, sandbox: &str) -> Result<Vec<String>, SyncError> {
    let mut notes = Vec::new();
    for s in host_submodules(git)? {
        let sub = Git::open(&s.gitdir);
        let url = channel.git_url(&guest_dir(&s));
        let prefix = format!("refs/keystone/{sandbox}/");
        let r = sub.fetch_from_sandbox(
            channel,
            &url,
            &[
                format!("+refs/heads/*:{prefix}heads/*"),
                format!("+HEAD:{prefix}HEAD"),
            ],
        );
        if let Err(e) = r {
            notes.push(format!("submodule {}: not fetched ({e})", s.name));
        }
    }
    Ok(notes)
}

/// After the superproject's checkout moved from `before` to `after` (both
/// commits of the repository in `top`): each host submodule checkout whose
/// recorded commit changed, and that sat clean at the old one, is checked
/// out at the new one (detached, as `git submodule update` does). Returns a
/// line for each one moved or left.
pub fn follow(
    git: &Git,
    top: &Path,
    before: Option<&str>,
    after: &str,
) -> Result<Vec<String>, SyncError> {
    let subs = host_submodules(git)?;
    let mut notes = Vec::new();
    // (worktree, head before, head after) of each parent, the
    // superproject's first.
    let mut moved: Vec<Option<(PathBuf, Option<String>, String)>> = vec![None; subs.len()];
    let top = &crate::git::lexical(top);
    let root = (
        top.to_path_buf(),
        before.map(str::to_string),
        after.to_string(),
    );
    let real_top = top
        .canonicalize()
        .map_err(|e| SyncError::Refused(format!("{}: {e}", top.display())))?;
    for (i, s) in subs.iter().enumerate() {
        let parent = match s.parent {
            None => Some(&root),
            Some(p) => moved[p].as_ref(),
        };
        let Some((parent_tree, parent_before, parent_after)) = parent.cloned() else {
            continue;
        };
        let Some(tree) = Git::open(&s.gitdir).submodule_worktree(&s.gitdir)? else {
            continue;
        };
        // Inside the project, and reached through no link inside it.
        let plain = tree
            .strip_prefix(top)
            .ok()
            .zip(tree.canonicalize().ok())
            .is_some_and(|(rel, real)| real == real_top.join(rel));
        if !plain {
            notes.push(format!(
                "submodule {}: its checkout {} is not plainly inside the project; left alone",
                s.name,
                tree.display()
            ));
            continue;
        }
        let Ok(path) = tree.strip_prefix(&parent_tree) else {
            continue;
        };
        let parent_git = Git::open(&parent_tree);
        let path = path.to_string_lossy().to_string();
        let old_link = match &parent_before {
            Some(b) => parent_git.gitlink(b, &path)?,
            None => None,
        };
        let new_link = parent_git.gitlink(&parent_after, &path)?;
        let sub_git = Git::open(&tree);
        let head = sub_git.head()?;
        let Some(new_link) = new_link else {
            continue;
        };
        if old_link.as_deref() == Some(new_link.as_str()) {
            moved[i] = head.clone().map(|h| (tree.clone(), Some(h.clone()), h));
            continue;
        }
        if head.as_deref() == Some(new_link.as_str()) {
            moved[i] = Some((tree.clone(), head.clone(), new_link));
            continue;
        }
        let short = |s: &str| s[..s.len().min(12)].to_string();
        if head != old_link || sub_git.is_dirty()? || sub_git.rev_parse(&new_link)?.is_none() {
            notes.push(format!(
                "submodule {}: left at {} (it has local changes, another commit, or lacks the new one); \
                 the superproject now records {}: `git submodule update` takes it there",
                s.name,
                head.as_deref().map(short).unwrap_or_else(|| "no commit".into()),
                short(&new_link)
            ));
            continue;
        }
        sub_git.checkout_detached(&new_link)?;
        notes.push(format!(
            "submodule {}: {} -> {}",
            s.name,
            head.as_deref().map(short).unwrap_or_default(),
            short(&new_link)
        ));
        moved[i] = Some((tree.clone(), head, new_link));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_modules_directory_are_not_used() {
        assert!(safe_name("vendor/lib"));
        assert!(safe_name("lib.v2"));
        for bad in ["", "../x", "a/../../x", "/etc", "a//b", "a/./b", "a\\b"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }
}
