//! The `git` program, run on the host with a clean environment.

use keystone_channel::Channel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git is not installed: apt-get install git")]
    Missing,
    #[error("{path} is not inside a git repository; run `git init` there or pass the path of a repository")]
    NotARepo { path: PathBuf },
    #[error("`git {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

pub struct Git {
    repo: PathBuf,
}

/// Settings every git process we start gets, whatever the repository or
/// user config says: no hooks, no fsmonitor, checked objects.
const SAFE: &[&str] = &[
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "transfer.fsckObjects=true",
    "-c",
    "submodule.recurse=false",
    "-c",
    "protocol.allow=never",
    "-c",
    "protocol.ssh.allow=always",
];

fn base(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    // Cleared environment (as uv-git does): no GIT_DIR, GIT_SSH_COMMAND,
    // GIT_CONFIG_* or other GIT_* from the caller can redirect us.
    cmd.env_clear();
    for (k, v) in keystone_channel::passthrough_env() {
        cmd.env(k, v);
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0");
    // No opportunistic index refresh by `status` and the like: a sync that
    // changes nothing leaves the index's bytes alone, and never contends
    // with the user's own git for the lock.
    cmd.env("GIT_OPTIONAL_LOCKS", "0");
    cmd.arg("-C").arg(dir);
    cmd.args(SAFE);
    cmd.stdin(Stdio::null());
    cmd
}

/// `p` with `.` and `..` components resolved as text, no link followed.
pub(crate) fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

impl Git {
    pub fn toplevel(path: &Path) -> Result<PathBuf, GitError> {
        // Fast path, taken by every command that resolves "the current
        // sandbox": the nearest ancestor holding `.git` (a directory, or a
        // file for worktrees and submodules), as git itself finds it.
        if let Ok(real) = path.canonicalize() {
            if let Some(top) = real.ancestors().find(|d| d.join(".git").exists()) {
                return Ok(top.to_path_buf());
            }
        }
        let out = base(path)
            .args(["rev-parse", "--show-toplevel"])
            .output()
            .map_err(|_| GitError::Missing)?;
        if !out.status.success() {
            return Err(GitError::NotARepo { path: path.into() });
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    pub fn open(repo: &Path) -> Git {
        Git { repo: repo.into() }
    }

    fn output(&self, args: &[&str]) -> Result<Output, GitError> {
        base(&self.repo)
            .args(args)
            .output()
            .map_err(|_| GitError::Missing)
    }

    fn ok(&self, args: &[&str]) -> Result<String, GitError> {
        let out = self.output(args)?;
        if !out.status.success() {
            return Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Fetch `refspecs` from the sandbox's repository at `url`: objects and
    /// the refs named, nothing else (no tags, no FETCH_HEAD, no
    /// submodules), all refs or none (`--atomic`), stale ones pruned.
    pub fn fetch_from_sandbox(
        &self,
        channel: &Channel,
        url: &str,
        refspecs: &[String],
    ) -> Result<String, GitError> {
        let mut args = vec![
            "fetch",
            "--quiet",
            "--atomic",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            "--prune",
            url,
        ];
        args.extend(refspecs.iter().map(String::as_str));
        self.remote_op(channel, &args)
    }

    /// Run a git command that talks to the sandbox through its channel.
    pub fn remote_op(&self, channel: &Channel, args: &[&str]) -> Result<String, GitError> {
        channel.write_config().map_err(|e| GitError::Failed {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
        let out = base(&self.repo)
            .env("GIT_SSH_COMMAND", channel.git_ssh_command())
            .args(args)
            .output()
            .map_err(|_| GitError::Missing)?;
        if !out.status.success() {
            return Err(GitError::Failed {
                args: args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn current_branch(&self) -> Result<Option<String>, GitError> {
        let out = self.output(&["symbolic-ref", "-q", "--short", "HEAD"])?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|s| !s.is_empty()))
    }

    pub fn head(&self) -> Result<Option<String>, GitError> {
        self.rev_parse("HEAD")
    }

    pub fn rev_parse(&self, rev: &str) -> Result<Option<String>, GitError> {
        let out = self.output(&["rev-parse", "-q", "--verify", &format!("{rev}^{{commit}}")])?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }

    /// Tracked changes (staged or not); untracked files do not count.
    pub fn is_dirty(&self) -> Result<bool, GitError> {
        Ok(!self
            .ok(&["status", "--porcelain", "--untracked-files=no"])?
            .is_empty())
    }

    /// Any change at all, untracked files included (for `start`'s warning).
    pub fn has_local_changes(&self) -> Result<bool, GitError> {
        Ok(!self.ok(&["status", "--porcelain"])?.is_empty())
    }

    pub fn identity(&self) -> (Option<String>, Option<String>) {
        let get = |k: &str| {
            self.ok(&["config", "--get", k])
                .ok()
                .filter(|s| !s.is_empty())
        };
        (get("user.name"), get("user.email"))
    }

    pub fn is_ancestor(&self, a: &str, b: &str) -> Result<bool, GitError> {
        Ok(self
            .output(&["merge-base", "--is-ancestor", a, b])?
            .status
            .success())
    }

    pub fn refs_under(&self, prefix: &str) -> Result<BTreeMap<String, String>, GitError> {
        let text = self.ok(&["for-each-ref", "--format=%(objectname) %(refname)", prefix])?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (sha, name) = l.split_once(' ')?;
                Some((name.strip_prefix(prefix)?.to_string(), sha.to_string()))
            })
            .collect())
    }

    /// Commits in `to` but not in `from`.
    pub fn count_range(&self, from: &str, to: &str) -> Result<u64, GitError> {
        Ok(self
            .ok(&["rev-list", "--count", &format!("{from}..{to}")])?
            .parse()
            .unwrap_or(0))
    }

    pub fn merge_base_with_head(&self, rev: &str) -> Result<Option<String>, GitError> {
        let out = self.output(&["merge-base", "HEAD", rev])?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }

    /// The tree of a clean merge of `a` and `b`, or None on conflicts
    /// (`git merge-tree --write-tree`, which touches neither index nor
    /// working tree).
    pub fn merge_tree(&self, a: &str, b: &str) -> Result<Option<String>, GitError> {
        let out = self.output(&["merge-tree", "--write-tree", "--no-messages", a, b])?;
        match out.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())),
            Some(1) => Ok(None),
            _ => Err(GitError::Failed {
                args: "merge-tree --write-tree".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// A commit of `tree` with `parents`, by the host's identity.
    pub fn commit_tree(
        &self,
        tree: &str,
        parents: &[&str],
        message: &str,
    ) -> Result<String, GitError> {
        let (name, email) = self.identity();
        let name = name.unwrap_or_else(|| "keystone".into());
        let email = email.unwrap_or_else(|| "keystone@localhost".into());
        let mut args = vec![
            "-c".to_string(),
            format!("user.name={name}"),
            "-c".into(),
            format!("user.email={email}"),
        ];
        args.extend([
            "commit-tree".into(),
            tree.into(),
            "-m".into(),
            message.into(),
        ]);
        for p in parents {
            args.push("-p".into());
            args.push((*p).into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&refs)
    }

    pub fn switch(&self, branch: &str) -> Result<(), GitError> {
        self.ok(&["checkout", "-q", branch, "--"]).map(|_| ())
    }

    pub fn switch_new(&self, branch: &str, at: &str) -> Result<(), GitError> {
        self.ok(&["checkout", "-q", "-b", branch, at, "--"])
            .map(|_| ())
    }

    pub fn count_not_on_branches(&self, sha: &str) -> Result<u64, GitError> {
        Ok(self
            .ok(&["rev-list", "--count", sha, "--not", "--branches"])?
            .parse()
            .unwrap_or(0))
    }

    pub fn delete_ref(&self, name: &str) -> Result<(), GitError> {
        self.ok(&["update-ref", "-d", name]).map(|_| ())
    }

    pub fn diff_report(&self, from: Option<&str>, to: &str) -> Result<crate::Report, GitError> {
        let range = match from {
            Some(f) => format!("{f}..{to}"),
            None => to.to_string(),
        };
        let commits = self
            .ok(&["rev-list", "--count", &range])?
            .parse()
            .unwrap_or(0);
        let (mut files, mut ins, mut del) = (0, 0, 0);
        let numstat = match from {
            Some(f) => self.ok(&["diff", "--numstat", "--no-renames", f, to])?,
            None => self.ok(&["show", "--numstat", "--format=", to])?,
        };
        for line in numstat.lines() {
            let mut f = line.split('\t');
            let (a, d) = (f.next().unwrap_or("-"), f.next().unwrap_or("-"));
            files += 1;
            ins += a.parse::<u64>().unwrap_or(0);
            del += d.parse::<u64>().unwrap_or(0);
        }
        Ok(crate::Report {
            branch: String::new(),
            from: from.map(str::to_string),
            to: to.to_string(),
            commits,
            files_changed: files,
            insertions: ins,
            deletions: del,
            ..crate::Report::default()
        })
    }

    /// Move `branch` from `from` to `to` (a fast-forward) and update the
    /// working tree; all or nothing. `from: None` is the unborn branch of
    /// a repository without commits: the move starts from the empty tree,
    /// and the ref must still not exist when it is made.
    pub fn fast_forward(&self, branch: &str, from: Option<&str>, to: &str) -> Result<(), GitError> {
        // The host is on this branch (checked by the caller): a two-tree
        // read-tree -u -m refuses to clobber local changes or untracked
        // files in the way, and only then do we move the ref (guarded by
        // its old value: "" is "must not exist").
        let start = self.tree_or_empty(from)?;
        let start = start.as_str();
        self.ok(&["read-tree", "-u", "-m", start, to])?;
        let target = format!("refs/heads/{branch}");
        self.ok(&[
            "update-ref",
            "-m",
            "keystone sync",
            &target,
            to,
            from.unwrap_or(""),
        ])
        .map(|_| ())
    }

    /// A git operation this work tree is in the middle of (it would be
    /// corrupted by a branch moving under it), as the command that ends
    /// it: `git merge --abort` and the like.
    pub fn operation_in_progress(&self) -> Result<Option<(&'static str, &'static str)>, GitError> {
        const STATES: [(&str, &str, &str); 7] = [
            (
                "rebase-merge",
                "a rebase",
                "git rebase --continue or --abort",
            ),
            (
                "rebase-apply",
                "a rebase or am",
                "git rebase --abort or git am --abort",
            ),
            ("MERGE_HEAD", "a merge", "git merge --continue or --abort"),
            (
                "CHERRY_PICK_HEAD",
                "a cherry-pick",
                "git cherry-pick --continue or --abort",
            ),
            (
                "REVERT_HEAD",
                "a revert",
                "git revert --continue or --abort",
            ),
            ("BISECT_LOG", "a bisect", "git bisect reset"),
            (
                "sequencer",
                "a cherry-pick or revert series",
                "git cherry-pick --abort or git revert --abort",
            ),
        ];
        // All of them live in this work tree's own git directory: one git
        // process, not one per file (this runs on every sync).
        let dir = PathBuf::from(self.ok(&["rev-parse", "--absolute-git-dir"])?);
        for (file, what, end) in STATES {
            if dir.join(file).symlink_metadata().is_ok() {
                return Ok(Some((what, end)));
            }
        }
        Ok(None)
    }

    /// The linked work tree (not this one) that has `branch` checked out.
    pub fn worktree_on(&self, branch: &str) -> Result<Option<PathBuf>, GitError> {
        let here = Self::toplevel(&self.repo)?;
        let list = self.ok(&["worktree", "list", "--porcelain"])?;
        let want = format!("branch refs/heads/{branch}");
        let mut path = None;
        for line in list.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(PathBuf::from(p));
            } else if line == want {
                if let Some(p) = path.take().filter(|p| *p != here) {
                    return Ok(Some(p));
                }
            }
        }
        Ok(None)
    }

    /// The repository's (common) git directory, absolute.
    pub fn common_dir(&self) -> Result<PathBuf, GitError> {
        let p = PathBuf::from(self.ok(&["rev-parse", "--git-common-dir"])?);
        Ok(if p.is_absolute() {
            p
        } else {
            self.repo.join(p)
        })
    }

    /// The names `submodule.<name>.url` has in the config file `file`
    /// (the repository's own config, never `.gitmodules`).
    pub fn submodule_names(&self, file: &Path) -> Result<Vec<String>, GitError> {
        if !file.is_file() {
            return Ok(Vec::new());
        }
        let file = file.display().to_string();
        let out = self.output(&[
            "config",
            "-f",
            &file,
            "--name-only",
            "--get-regexp",
            r"^submodule\..*\.url$",
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|k| k.strip_prefix("submodule.")?.strip_suffix(".url"))
            .map(str::to_string)
            .collect())
    }

    /// Where the submodule whose git directory is `gitdir` is checked out
    /// (its `core.worktree`, relative to `gitdir`), as a lexical path.
    pub fn submodule_worktree(&self, gitdir: &Path) -> Result<Option<PathBuf>, GitError> {
        let file = gitdir.join("config").display().to_string();
        let out = self.output(&["config", "-f", &file, "--get", "core.worktree"])?;
        let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || value.is_empty() {
            return Ok(None);
        }
        Ok(Some(lexical(&gitdir.join(value))))
    }

    /// The commit a gitlink at `path` records in `commit`.
    pub fn gitlink(&self, commit: &str, path: &str) -> Result<Option<String>, GitError> {
        let line = self.ok(&["ls-tree", commit, "--", path])?;
        let mut f = line.split_whitespace();
        Ok(match (f.next(), f.next(), f.next()) {
            (Some("160000"), Some("commit"), Some(sha)) => Some(sha.to_string()),
            _ => None,
        })
    }

    /// Check out `commit` on a detached HEAD (a submodule's way).
    pub fn checkout_detached(&self, commit: &str) -> Result<(), GitError> {
        self.ok(&["checkout", "-q", "--detach", commit, "--"])
            .map(|_| ())
    }

    /// A path inside the repository's git directory (`git rev-parse
    /// --git-path`), absolute.
    pub fn git_path(&self, name: &str) -> Result<PathBuf, GitError> {
        let p = PathBuf::from(self.ok(&["rev-parse", "--git-path", name])?);
        Ok(if p.is_absolute() {
            p
        } else {
            self.repo.join(p)
        })
    }

    /// The repository's working directory.
    pub fn repo(&self) -> &Path {
        &self.repo
    }

    /// Bytes the working tree gains at most by moving from `from` (None:
    /// the empty tree) to `to`: the sizes of the files that differ, as
    /// they are in `to`.
    pub fn checkout_bytes(&self, from: Option<&str>, to: &str) -> Result<u64, GitError> {
        let start = self.tree_or_empty(from)?;
        let start = start.as_str();
        let changed: std::collections::BTreeSet<String> = self
            .ok(&["diff", "--name-only", "--no-renames", start, to])?
            .lines()
            .map(str::to_string)
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let mut total = 0u64;
        for line in self
            .ok(&["ls-tree", "-r", "-l", "--full-tree", to])?
            .lines()
        {
            // "<mode> blob <id> <size>\t<path>"
            let Some((meta, path)) = line.split_once('\t') else {
                continue;
            };
            if changed.contains(path) {
                total += meta
                    .split_whitespace()
                    .nth(3)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Bytes free for this user on the repository's file system.
    pub fn free_bytes(&self) -> Result<u64, GitError> {
        let st = nix::sys::statvfs::statvfs(&self.repo).map_err(|e| GitError::Failed {
            args: "statvfs".into(),
            stderr: e.to_string(),
        })?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// `from`, or the empty tree when there is none (an unborn branch).
    fn tree_or_empty(&self, from: Option<&str>) -> Result<String, GitError> {
        match from {
            Some(f) => Ok(f.to_string()),
            None => self.empty_tree(),
        }
    }

    /// The empty tree's id in this repository's hash.
    fn empty_tree(&self) -> Result<String, GitError> {
        self.ok(&["hash-object", "-t", "tree", "/dev/null"])
            .map(|s| s.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> (tempfile::TempDir, Git) {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@e"])
                .args(args)
                .output()
                .expect("git")
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        run(&["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("a"), "1\n").expect("write");
        run(&["add", "a"]);
        run(&["commit", "-qm", "one"]);
        run(&["checkout", "-qb", "side"]);
        std::fs::write(dir.path().join("a"), "1\n2\n").expect("write");
        std::fs::write(dir.path().join("b"), "x\n").expect("write");
        run(&["add", "a", "b"]);
        run(&["commit", "-qm", "two"]);
        run(&["checkout", "-q", "main"]);
        let git = Git::open(dir.path());
        (dir, git)
    }

    #[test]
    fn toplevel_from_a_subdirectory_matches_git() {
        let (dir, _git) = repo();
        let sub = dir.path().join("deep/er");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let ours = Git::toplevel(&sub).expect("toplevel");
        let theirs = Command::new("git")
            .arg("-C")
            .arg(&sub)
            .args(["rev-parse", "--show-toplevel"])
            .output()
            .expect("git");
        assert_eq!(
            ours,
            PathBuf::from(String::from_utf8_lossy(&theirs.stdout).trim())
        );
    }

    #[test]
    fn not_a_repo_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Git::toplevel(dir.path()),
            Err(GitError::NotARepo { .. })
        ));
    }

    #[test]
    fn fast_forward_moves_branch_and_tree() {
        let (dir, git) = repo();
        let main = git.rev_parse("main").expect("rev").expect("main");
        let side = git.rev_parse("side").expect("rev").expect("side");
        let report = git.diff_report(Some(&main), &side).expect("report");
        assert_eq!(
            (report.commits, report.files_changed, report.insertions),
            (1, 2, 2)
        );
        git.fast_forward("main", Some(&main), &side).expect("ff");
        assert_eq!(git.rev_parse("main").expect("rev"), Some(side));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).expect("b"),
            "x\n"
        );
        assert!(!git.is_dirty().expect("status"));
    }

    #[test]
    fn fast_forward_refuses_to_clobber_local_changes() {
        let (dir, git) = repo();
        let main = git.rev_parse("main").expect("rev").expect("main");
        let side = git.rev_parse("side").expect("rev").expect("side");
        std::fs::write(dir.path().join("a"), "local\n").expect("write");
        assert!(git.fast_forward("main", Some(&main), &side).is_err());
        assert_eq!(git.rev_parse("main").expect("rev"), Some(main));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a")).expect("a"),
            "local\n"
        );
    }

    /// A repository without commits, and a commit made in it without
    /// touching any ref (as a fetch into refs/keystone/ leaves it).
    fn unborn_with_a_loose_commit() -> (tempfile::TempDir, Git, String) {
        let (src, src_git) = repo();
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["init", "-q", "-b", "main"])
            .status()
            .expect("git")
            .success();
        assert!(ok);
        let side = src_git.rev_parse("side").expect("rev").expect("side");
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["fetch", "-q"])
            .arg(src.path())
            .arg("side:refs/keystone/s/heads/main")
            .status()
            .expect("git")
            .success();
        assert!(ok);
        let git = Git::open(dir.path());
        (dir, git, side)
    }

    #[test]
    fn an_unborn_branch_starts_at_the_commits() {
        let (dir, git, side) = unborn_with_a_loose_commit();
        assert_eq!(git.current_branch().expect("branch"), Some("main".into()));
        assert_eq!(git.head().expect("head"), None);
        git.fast_forward("main", None, &side).expect("ff");
        assert_eq!(
            git.rev_parse("refs/heads/main").expect("rev"),
            Some(side.clone())
        );
        assert_eq!(git.head().expect("head"), Some(side));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).expect("b"),
            "x\n"
        );
        assert!(!git.is_dirty().expect("status"), "the checkout is clean");
    }

    #[test]
    fn an_unborn_branch_keeps_an_untracked_file_in_the_way() {
        let (dir, git, side) = unborn_with_a_loose_commit();
        std::fs::write(dir.path().join("b"), "mine\n").expect("write");
        assert!(git.fast_forward("main", None, &side).is_err());
        assert_eq!(git.rev_parse("refs/heads/main").expect("rev"), None);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b")).expect("b"),
            "mine\n"
        );
        assert!(
            !dir.path().join("a").exists(),
            "nothing else was checked out"
        );
    }

    #[test]
    fn checkout_bytes_counts_the_files_that_change() {
        let (_dir, git) = repo();
        let main = git.rev_parse("main").expect("rev").expect("main");
        let side = git.rev_parse("side").expect("rev").expect("side");
        // a becomes "1\n2\n" (4 bytes), b "x\n" (2): 6.
        assert_eq!(git.checkout_bytes(Some(&main), &side).expect("bytes"), 6);
        assert_eq!(git.checkout_bytes(Some(&side), &side).expect("bytes"), 0);
        assert_eq!(git.checkout_bytes(None, &side).expect("bytes"), 6);
        assert!(git.free_bytes().expect("free") > 0);
    }

    fn git_in(dir: &Path, args: &[&str]) -> bool {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@e"])
            .args(args)
            .output()
            .expect("git")
            .status
            .success()
    }

    #[test]
    fn an_operation_in_progress_is_named_with_its_way_out() {
        let (dir, git) = repo();
        assert_eq!(git.operation_in_progress().expect("state"), None);
        // main and side both change `a`: the merge stops in conflict.
        std::fs::write(dir.path().join("a"), "1\nmain\n").expect("write");
        assert!(git_in(dir.path(), &["commit", "-qam", "main"]));
        assert!(!git_in(dir.path(), &["merge", "-q", "side"]));
        let (what, end) = git
            .operation_in_progress()
            .expect("state")
            .expect("merging");
        assert_eq!(what, "a merge");
        assert!(end.contains("--abort"));
        assert!(git_in(dir.path(), &["merge", "--abort"]));
        assert!(git_in(dir.path(), &["bisect", "start"]));
        assert_eq!(
            git.operation_in_progress().expect("state").map(|s| s.0),
            Some("a bisect")
        );
    }

    #[test]
    fn the_work_tree_of_a_branch_is_found_but_not_this_one() {
        let (dir, git) = repo();
        assert_eq!(git.worktree_on("main").expect("list"), None, "main is here");
        assert_eq!(git.worktree_on("side").expect("list"), None);
        let wt = dir.path().join("wt");
        assert!(git_in(
            dir.path(),
            &["worktree", "add", "-q", wt.to_str().expect("utf8"), "side"]
        ));
        let found = git.worktree_on("side").expect("list").expect("linked");
        assert_eq!(
            found.canonicalize().expect("c"),
            wt.canonicalize().expect("c")
        );
        assert_eq!(
            Git::open(&wt)
                .worktree_on("main")
                .expect("list")
                .map(|p| p.canonicalize().expect("c")),
            Some(dir.path().canonicalize().expect("c"))
        );
    }
}
