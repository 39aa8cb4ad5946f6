//! Git between the host and a sandbox, always initiated by the host.
//!
//! Code enters by a push into `/workspace`; it leaves by a fetch of the
//! sandbox's branches into a private namespace, `refs/keystone/<sandbox>/`,
//! after which we move the host's branch ourselves. The sandbox is
//! untrusted: nothing of its configuration or hooks is ever copied, and
//! every git process we run has the `GIT_*` environment cleared, hooks
//! disabled and object checking on (DESIGN.md, "Sync safety").

mod git;

pub use git::{Git, GitError};

use keystone_channel::{Channel, ExecOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Channel(#[from] keystone_channel::ChannelError),
    /// Nothing new to bring over (exit code 2).
    #[error("no changes: the host's {branch} already has every commit of the sandbox's {branch}")]
    NoChanges { branch: String },
    /// The rules refuse (exit code 2).
    #[error("{0}")]
    Refused(String),
    /// Histories cannot be reconciled (exit code 3); host untouched.
    #[error("{0}")]
    Conflict(String),
}

/// What a sync moved, for the report and `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub branch: String,
    pub from: Option<String>,
    pub to: String,
    pub commits: u64,
    pub files_changed: u64,
    pub insertions: u64,
    pub deletions: u64,
    pub dry_run: bool,
}

/// The private namespace for a sandbox's branches in the host repository.
pub fn private_prefix(sandbox: &str) -> String {
    format!("refs/keystone/{sandbox}/heads/")
}

/// First start: make `/workspace` a clone of the host repository, on the
/// host's current branch, with the host's git identity. Pushed from the
/// host; the guest never connects anywhere.
pub fn push_initial(git: &Git, channel: &Channel) -> Result<Option<String>, SyncError> {
    let agent = ExecOptions::default();
    let branch = git.current_branch()?;
    let (name, email) = git.identity();
    let mut script = String::from(
        "set -e; cd /workspace; git init -q; git config receive.denyCurrentBranch updateInstead; ",
    );
    if let Some(b) = &branch {
        script.push_str(&format!(
            "git symbolic-ref HEAD refs/heads/{}; ",
            shell_quote(b)
        ));
    }
    if let Some(n) = &name {
        script.push_str(&format!(
            "git config --global user.name {}; ",
            shell_quote(n)
        ));
    }
    if let Some(e) = &email {
        script.push_str(&format!(
            "git config --global user.email {}; ",
            shell_quote(e)
        ));
    }
    channel.run_ok(&script, &agent)?;
    if git.head()?.is_none() {
        // An empty repository: nothing to push yet.
        return Ok(branch);
    }
    let url = channel.git_url("/workspace");
    git.remote_op(
        channel,
        &[
            "push",
            "--quiet",
            "--no-verify",
            &url,
            "refs/heads/*:refs/heads/*",
        ],
    )?;
    if branch.is_none() {
        // Detached HEAD on the host: the guest checks out the same commit.
        let head = git.head()?.unwrap_or_default();
        git.remote_op(
            channel,
            &[
                "push",
                "--quiet",
                "--no-verify",
                &url,
                &format!("{head}:refs/keystone/host-head"),
            ],
        )?;
        channel.run_ok(
            "cd /workspace && git checkout -q --detach refs/keystone/host-head",
            &agent,
        )?;
    } else {
        channel.run_ok("cd /workspace && git reset -q --hard", &agent)?;
    }
    Ok(branch)
}

/// Fetch every branch of the sandbox into its private namespace; returns
/// branch → commit, and the sandbox's current branch.
pub fn fetch(
    git: &Git,
    channel: &Channel,
    sandbox: &str,
) -> Result<(BTreeMap<String, String>, Option<String>), SyncError> {
    let url = channel.git_url("/workspace");
    let prefix = private_prefix(sandbox);
    git.remote_op(
        channel,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            "--prune",
            &url,
            &format!("+refs/heads/*:{prefix}*"),
        ],
    )?;
    let refs = git.refs_under(&prefix)?;
    let current = channel
        .run(
            "cd /workspace && git symbolic-ref -q --short HEAD",
            &ExecOptions::default(),
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|b| !b.is_empty());
    Ok((refs, current))
}

/// Bring the sandbox's `branch` to the host (first version: fast-forward
/// only, host clean and on that branch). The host is untouched on error.
pub fn sync_back(
    git: &Git,
    channel: &Channel,
    sandbox: &str,
    branch: Option<&str>,
    dry_run: bool,
) -> Result<Report, SyncError> {
    let (refs, current) = fetch(git, channel, sandbox)?;
    let branch = match branch.map(str::to_string).or(current) {
        Some(b) => b,
        None => {
            return Err(SyncError::Refused(
                "the sandbox's workspace is not on a branch; pass --branch".into(),
            ))
        }
    };
    let Some(theirs) = refs.get(&branch).cloned() else {
        return Err(SyncError::Refused(format!(
            "the sandbox has no branch {branch:?}; it has: {}",
            refs.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    };
    let host_branch = git.current_branch()?;
    if host_branch.as_deref() != Some(branch.as_str()) {
        return Err(SyncError::Refused(format!(
            "the host is on {}, the sandbox's work is on {branch}; run `git switch {branch}` on the host, then sync again",
            host_branch.as_deref().unwrap_or("a detached HEAD")
        )));
    }
    let ours = git.rev_parse(&format!("refs/heads/{branch}"))?;
    if let Some(o) = &ours {
        if o == &theirs || git.is_ancestor(&theirs, o)? {
            return Err(SyncError::NoChanges { branch });
        }
        if !git.is_ancestor(o, &theirs)? {
            return Err(SyncError::Conflict(format!(
                "the host's {branch} and the sandbox's have diverged; the sandbox's commits are kept at {}{branch}; \
                 merge or rebase them on the host (e.g. `git merge {}{branch}`)",
                private_prefix(sandbox),
                private_prefix(sandbox)
            )));
        }
    }
    if git.is_dirty()? {
        return Err(SyncError::Refused(format!(
            "the host's working tree has uncommitted changes; commit or stash them, then sync again \
             (the sandbox's commits are at {}{branch})",
            private_prefix(sandbox)
        )));
    }
    let mut report = git.diff_report(ours.as_deref(), &theirs)?;
    report.branch = branch.clone();
    report.dry_run = dry_run;
    if !dry_run {
        git.fast_forward(&branch, ours.as_deref(), &theirs)?;
    }
    Ok(report)
}

/// Commits the sandbox has (as last fetched) that no host branch has:
/// branch → count.
pub fn unsynced(git: &Git, sandbox: &str) -> Result<BTreeMap<String, u64>, SyncError> {
    let mut out = BTreeMap::new();
    for (branch, sha) in git.refs_under(&private_prefix(sandbox))? {
        let n = git.count_not_on_branches(&sha)?;
        if n > 0 {
            out.insert(branch, n);
        }
    }
    Ok(out)
}

/// Forget a sandbox's private refs (on destroy).
pub fn forget(git: &Git, sandbox: &str) -> Result<(), SyncError> {
    for (branch, _) in git.refs_under(&private_prefix(sandbox))? {
        git.delete_ref(&format!("{}{branch}", private_prefix(sandbox)))?;
    }
    Ok(())
}

/// Single-quote for the guest's sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `path` is inside a git work tree; returns the top level.
pub fn toplevel(path: &Path) -> Result<std::path::PathBuf, GitError> {
    Git::toplevel(path)
}
