//! Git between the host and a sandbox, always initiated by the host.
//!
//! Code enters by a push into `/workspace`; it leaves by a fetch of the
//! sandbox's branches into a private namespace, `refs/keystone/<sandbox>/`,
//! after which we move the host's branch ourselves. The sandbox is
//! untrusted: nothing of its configuration or hooks is ever copied, and
//! every git process we run has the `GIT_*` environment cleared, hooks
//! disabled and object checking on (DESIGN.md, "Sync safety").

pub mod artifacts;
pub mod env_files;
mod git;
pub mod submodules;

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
    /// The host's file system is full (exit code 3); host untouched.
    #[error("{0}")]
    NoSpace(String),
}

/// What git says when a write fails for want of space.
fn out_of_space(e: &GitError) -> bool {
    matches!(e, GitError::Failed { stderr, .. }
        if stderr.contains("No space left on device") || stderr.contains("Disk quota exceeded"))
}

/// What a sync moved, for the report and `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub branch: String,
    /// The host branch's commit before and after.
    pub from: Option<String>,
    pub to: String,
    /// Commits that came from the sandbox to the host, and their diff.
    pub commits: u64,
    pub files_changed: u64,
    pub insertions: u64,
    pub deletions: u64,
    /// Commits that went from the host into the sandbox.
    pub pushed_commits: u64,
    /// The host branch we switched away from, when we had to.
    pub switched_from: Option<String>,
    /// Whether the branch was created on the host.
    pub created_branch: bool,
    /// The merge commit made when both sides had new commits.
    pub merge_commit: Option<String>,
    pub dry_run: bool,
    /// What happened to the host's submodules (`submodules::follow`), and
    /// any that could not be fetched.
    pub submodules: Vec<String>,
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
        // shallowUpdate: a shallow host clone pushes its shallow history
        // (the workspace becomes shallow at the same commits).
        "set -e; cd /workspace; git init -q; git config receive.denyCurrentBranch updateInstead; \
         git config receive.shallowUpdate true; ",
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
    // Which branch the sandbox is on, asked over the same (multiplexed)
    // connection while the fetch runs, to save a round trip.
    let ask = channel.clone();
    let current = std::thread::spawn(move || {
        ask.run("git symbolic-ref -q --short HEAD", &ExecOptions::default())
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|b| !b.is_empty())
    });
    // --atomic: every ref of the fetch moves, or none (a fetch that runs
    // out of space part-way moves nothing). The pack it was writing is
    // left behind by git then, and removed here.
    let pack_dir = git.git_path("objects/pack")?;
    let temporary = |dir: &Path| -> std::collections::BTreeSet<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp_"))
            .map(|e| e.path())
            .collect()
    };
    let temporary_before = temporary(&pack_dir);
    git.fetch_from_sandbox(channel, &url, &[format!("+refs/heads/*:{prefix}*")])
        .map_err(|e| {
            if out_of_space(&e) {
                for left in temporary(&pack_dir).difference(&temporary_before) {
                    let _ = std::fs::remove_file(left);
                }
                SyncError::NoSpace(format!(
                    "the host's disk is full: the sandbox's commits could not be brought into {}; \
                 nothing changed on the host (branches, index and working tree are as they were); \
                 free some space and sync again",
                    git.repo().display()
                ))
            } else {
                e.into()
            }
        })?;
    let refs = git.refs_under(&prefix)?;
    let current = current.join().ok().flatten();
    Ok((refs, current))
}

/// Sync one branch both ways (SPEC.md "Sync"): the sandbox's new commits
/// come to the host, the host's new commits go into the sandbox, and when
/// both have new commits a merge is made on the host if it is clean.
///
/// Branch rules: if the host is on another branch, a dirty host tree is
/// refused; a clean one is switched to the sandbox's branch (created if
/// needed). Unreconcilable histories end in [`SyncError::Conflict`] with
/// the host's branch, index and working tree as they were, and the
/// sandbox's commits kept under `refs/keystone/<sandbox>/heads/<branch>`.
/// With `dry_run`, the report says what would move and nothing changes.
pub fn sync(
    git: &Git,
    channel: &Channel,
    sandbox: &str,
    branch: Option<&str>,
    dry_run: bool,
) -> Result<Report, SyncError> {
    let (refs, current) = fetch(git, channel, sandbox)?;
    let submodule_notes = submodules::fetch(git, channel, sandbox)?;
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
    let kept = format!("{}{branch}", private_prefix(sandbox));
    // The branch checked out in a linked work tree of its own: that is
    // where it moves (git would refuse to check it out here too).
    let main_tree = git;
    let linked;
    let git = match git.current_branch()? {
        Some(b) if b == branch => git,
        _ => match git.worktree_on(&branch)? {
            Some(tree) => {
                linked = Git::open(&tree);
                &linked
            }
            None => git,
        },
    };
    // Nothing moves under a git operation in progress, or beside another
    // git process (checked again by git itself as it takes the lock).
    if let Some((what, end)) = git.operation_in_progress()? {
        return Err(SyncError::Refused(format!(
            "{} is in the middle of {what}; finish it or abort it ({end}), then sync again; \
             nothing changed on the host (the sandbox's commits are at {kept})",
            git.repo().display()
        )));
    }
    let lock = git.git_path("index.lock")?;
    if lock.symlink_metadata().is_ok() {
        return Err(SyncError::Refused(format!(
            "{} exists: another git process is running in {}, or one crashed; \
             when none is running, remove the file and sync again; nothing changed on the host \
             (the sandbox's commits are at {kept})",
            lock.display(),
            git.repo().display()
        )));
    }
    let host_branch = git.current_branch()?;
    let on_branch = host_branch.as_deref() == Some(branch.as_str());
    if !on_branch && git.is_dirty()? {
        return Err(SyncError::Refused(format!(
            "the host is on {} with uncommitted changes, and the sandbox's work is on {branch}; \
             commit or stash them on the host, then sync again (the sandbox's commits are at {kept})",
            host_branch.as_deref().unwrap_or("a detached HEAD")
        )));
    }
    let ours = git.rev_parse(&format!("refs/heads/{branch}"))?;

    // Decide what moves where.
    enum Plan {
        ToHost,
        ToSandbox,
        Merge(String),
        NewBranch,
    }
    let plan = match &ours {
        None => Plan::NewBranch,
        Some(o) if o == &theirs => return Err(SyncError::NoChanges { branch }),
        Some(o) if git.is_ancestor(&theirs, o)? => Plan::ToSandbox,
        Some(o) if git.is_ancestor(o, &theirs)? => Plan::ToHost,
        Some(o) => match git.merge_tree(o, &theirs)? {
            Some(tree) => Plan::Merge(tree),
            None => {
                return Err(SyncError::Conflict(format!(
                    "the host's {branch} and the sandbox's have diverged and do not merge cleanly; \
                     the host is unchanged and the sandbox's commits are kept at {kept}: \
                     merge or rebase them on the host (`git merge {kept}`), then sync again"
                )))
            }
        },
    };

    let mut report = Report {
        branch: branch.clone(),
        from: ours.clone(),
        to: ours.clone().unwrap_or_else(|| theirs.clone()),
        switched_from: if on_branch { None } else { host_branch.clone() },
        created_branch: ours.is_none(),
        dry_run,
        submodules: submodule_notes,
        ..Report::default()
    };
    let fill_incoming =
        |report: &mut Report, base: Option<&str>, to: &str| -> Result<(), SyncError> {
            let d = git.diff_report(base, to)?;
            report.commits = d.commits;
            report.files_changed = d.files_changed;
            report.insertions = d.insertions;
            report.deletions = d.deletions;
            Ok(())
        };
    match &plan {
        Plan::NewBranch => {
            let base = git.merge_base_with_head(&theirs)?;
            fill_incoming(&mut report, base.as_deref(), &theirs)?;
            report.commits = git.count_not_on_branches(&theirs)?;
            report.to = theirs.clone();
        }
        Plan::ToHost => {
            fill_incoming(&mut report, ours.as_deref(), &theirs)?;
            report.to = theirs.clone();
        }
        Plan::ToSandbox => {
            report.pushed_commits =
                git.count_range(&theirs, ours.as_deref().unwrap_or_default())?;
        }
        Plan::Merge(_) => {
            fill_incoming(&mut report, ours.as_deref(), &theirs)?;
            report.pushed_commits =
                git.count_range(&theirs, ours.as_deref().unwrap_or_default())?;
        }
    }
    if dry_run {
        return Ok(report);
    }
    // The working tree must take the new files: checked before anything
    // moves, since a checkout that runs out of space part-way would leave
    // a half-written tree.
    let target = match &plan {
        Plan::ToSandbox => None,
        Plan::NewBranch if !on_branch => Some((None, theirs.clone())),
        Plan::NewBranch | Plan::ToHost | Plan::Merge(_) => Some((ours.clone(), theirs.clone())),
    };
    if let Some((from, to)) = target {
        let need = git.checkout_bytes(from.as_deref(), &to)?;
        let free = git.free_bytes()?;
        // Room for the files, and a margin for the index and git's own
        // temporary files.
        if need.saturating_add(need / 10).saturating_add(4 << 20) > free {
            return Err(SyncError::NoSpace(format!(
                "the host's disk is too full for the sandbox's {branch}: its files need about {} MB and {} MB are free; \
                 nothing changed on the host (the sandbox's commits are kept at {kept}); free some space and sync again",
                need >> 20,
                free >> 20
            )));
        }
    }

    // Where the checkout was, for the submodules to follow.
    let head_before = git.head()?;
    // Move the host to the branch (it is clean when we must switch).
    if !on_branch {
        match &ours {
            Some(_) => git.switch(&branch)?,
            None => git.switch_new(&branch, &theirs)?,
        }
    }
    let undo_switch = |e: SyncError| -> SyncError {
        if let (false, Some(orig)) = (on_branch, &host_branch) {
            let _ = git.switch(orig);
            if ours.is_none() {
                let _ = git.delete_ref(&format!("refs/heads/{branch}"));
            }
        }
        e
    };
    let url = channel.git_url("/workspace");
    let push_to_sandbox = |commit: &str, expect: &str| -> Result<(), SyncError> {
        // The submodule commits the host's commits record, first.
        submodules::push_host_commits(git, channel)?;
        // Only a fast-forward of what we fetched: if the agent committed
        // meanwhile, the lease fails and nothing is overwritten.
        git.remote_op(
            channel,
            &[
                "push",
                "--quiet",
                "--no-verify",
                &format!("--force-with-lease=refs/heads/{branch}:{expect}"),
                &url,
                &format!("{commit}:refs/heads/{branch}"),
            ],
        )
        .map(|_| ())
        .map_err(|e| {
            SyncError::Refused(format!(
                "could not update the sandbox's {branch} (uncommitted changes there, or new commits meanwhile?): {e}"
            ))
        })
    };
    match plan {
        // The host is on the branch, and it has no commit yet (a new
        // repository): the branch starts at the sandbox's commits.
        Plan::NewBranch if on_branch => {
            git.fast_forward(&branch, None, &theirs).map_err(|e| {
                SyncError::Refused(format!(
                    "the host's {branch} has no commits yet, and the sandbox's would overwrite files there; \
                     the host is unchanged and the sandbox's commits are kept at {kept}: \
                     move those files away (or `git checkout {kept} -- .` to take the sandbox's), then sync again ({e})"
                ))
            })?;
        }
        Plan::NewBranch => {}
        Plan::ToHost => {
            let o = ours.as_deref().unwrap_or_default();
            git.fast_forward(&branch, Some(o), &theirs).map_err(|e| {
                undo_switch(SyncError::Conflict(format!(
                    "the sandbox's commits on {branch} change files that have uncommitted changes (or untracked files in the way) on the host; \
                     the host is unchanged and the sandbox's commits are kept at {kept}: \
                     commit or stash them and sync again ({e})"
                )))
            })?;
        }
        Plan::ToSandbox => {
            push_to_sandbox(ours.as_deref().unwrap_or_default(), &theirs).map_err(undo_switch)?;
            report.to = ours.clone().unwrap_or_default();
        }
        Plan::Merge(tree) => {
            let o = ours.clone().unwrap_or_default();
            let merge = git
                .commit_tree(
                    &tree,
                    &[&o, &theirs],
                    &format!("Merge {branch} from sandbox {sandbox}"),
                )
                .map_err(|e| undo_switch(e.into()))?;
            git.fast_forward(&branch, Some(&o), &merge).map_err(|e| {
                undo_switch(SyncError::Conflict(format!(
                    "the merge of the sandbox's {branch} would overwrite uncommitted changes on the host; \
                     the host is unchanged; commit or stash them and sync again ({e})"
                )))
            })?;
            push_to_sandbox(&merge, &theirs)?;
            report.merge_commit = Some(merge.clone());
            report.to = merge;
        }
    }
    // What is reported is what the host's refs say now, not what was meant.
    let now = git.rev_parse(&format!("refs/heads/{branch}"))?;
    if now.as_deref() != Some(report.to.as_str()) {
        return Err(SyncError::Refused(format!(
            "the host's {branch} is at {} after the sync, not at {} as planned (a bug in keystone: please report it); the sandbox's commits are kept at {kept}",
            now.as_deref().unwrap_or("no commit"),
            report.to
        )));
    }
    // The host's submodule checkouts follow a checkout that moved (those of
    // the main work tree: a linked one has its own, not handled here).
    let moved = head_before.as_deref() != Some(report.to.as_str());
    if moved && std::ptr::eq(git, main_tree) {
        // The branch has moved: a failure here is reported beside it, not
        // as the sync's.
        let followed = Git::toplevel(git.repo())
            .map_err(SyncError::from)
            .and_then(|top| submodules::follow(git, &top, head_before.as_deref(), &report.to));
        match followed {
            Ok(lines) => report.submodules.extend(lines),
            Err(e) => report.submodules.push(format!(
                "the submodules' checkouts were not updated ({e}); `git submodule update` does it"
            )),
        }
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
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `path` is inside a git work tree; returns the top level.
pub fn toplevel(path: &Path) -> Result<std::path::PathBuf, GitError> {
    Git::toplevel(path)
}
