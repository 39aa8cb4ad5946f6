//! The sync state matrix: the states a developer's repository is really in
//! when they sync, each with "the sandbox has new commits" and "both have
//! new commits". Every cell ends one of two ways: the host has exactly the
//! sandbox's commits on the right ref with a consistent working tree, or
//! the documented exit code with the host's refs, index, git state files
//! and working tree byte-for-byte as they were, and the sandbox's commits
//! kept under `refs/keystone/`. One sandbox serves every cell (each on a
//! branch of its own); the shallow clone needs a repository, so a sandbox,
//! of its own. (The unborn branch is `unborn_branch`, on every backend.)

use crate::harness::{run_bounded, Host, Run};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a cell must end in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// Exit 0, the branch has the sandbox's commits, checked out in `at`.
    Synced,
    /// This exit code, the host unchanged, and the error names `because`.
    Refused(i32, &'static str),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Sandbox,
    Both,
}

#[derive(Clone)]
struct Cell {
    name: &'static str,
    /// Host state, a script run in the project with `$B` the branch (which
    /// the host has at `main`, unless `host_lacks_branch`).
    state: &'static str,
    /// Where the branch is checked out after the sync, relative to the
    /// project's parent directory (`$B` replaced); None: the project.
    tree: Option<&'static str>,
    /// `git status --porcelain` in that tree afterwards (the host's own
    /// uncommitted changes, kept).
    dirty: &'static str,
    host_lacks_branch: bool,
    sandbox: Side,
    outcome: Outcome,
    /// Puts the host back on a clean main for the next cell.
    cleanup: &'static str,
}

const CLEAN: &str = "git checkout -q -f main && git clean -fdq";

fn cells() -> Vec<Cell> {
    use Outcome::*;
    let mut v = Vec::new();
    let mut both = |c: Cell| {
        v.push(Cell {
            sandbox: Side::Both,
            ..c.clone()
        });
        v.push(c);
    };
    both(Cell {
        name: "on the branch, clean",
        state: "git checkout -q $B",
        outcome: Synced,
        ..Cell::default()
    });
    both(Cell {
        name: "on the branch, dirty in files neither side changed",
        state: "git checkout -q $B && echo local >> c.txt",
        dirty: " M c.txt",
        outcome: Synced,
        ..Cell::default()
    });
    both(Cell {
        name: "on the branch, dirty in a file the sandbox changed",
        state: "git checkout -q $B && echo local >> a.txt",
        outcome: Refused(3, "uncommitted changes"),
        ..Cell::default()
    });
    both(Cell {
        name: "on another branch, clean",
        state: "git checkout -q main",
        outcome: Synced,
        ..Cell::default()
    });
    both(Cell {
        name: "on another branch, dirty",
        state: "git checkout -q main && echo local >> c.txt",
        outcome: Refused(2, "uncommitted changes"),
        ..Cell::default()
    });
    both(Cell {
        name: "detached HEAD, clean",
        state: "git checkout -q --detach main",
        outcome: Synced,
        ..Cell::default()
    });
    both(Cell {
        name: "detached HEAD, dirty",
        state: "git checkout -q --detach main && echo local >> c.txt",
        outcome: Refused(2, "uncommitted changes"),
        ..Cell::default()
    });
    both(Cell {
        name: "merge in progress on the branch (no conflict, not committed)",
        state: "git checkout -q -b mx-$B main && echo x >> c.txt && git commit -qam x && \
                git checkout -q $B && git merge -q --no-commit --no-ff mx-$B",
        outcome: Refused(2, "in the middle of a merge"),
        cleanup: "git merge --abort; git checkout -q -f main && git branch -D mx-$B",
        ..Cell::default()
    });
    both(Cell {
        name: "merge stopped in conflict on another branch",
        state: CONFLICT_SETUP_THEN_MERGE,
        outcome: Refused(2, "in the middle of a merge"),
        cleanup: "git merge --abort; git checkout -q -f main && git branch -D op-$B mx-$B",
        ..Cell::default()
    });
    both(Cell {
        name: "rebase stopped in conflict",
        state: CONFLICT_SETUP_THEN_REBASE,
        outcome: Refused(2, "in the middle of a rebase"),
        cleanup: "git rebase --abort; git checkout -q -f main && git branch -D op-$B mx-$B",
        ..Cell::default()
    });
    both(Cell {
        name: "rebase stopped at an edit on the branch (detached, clean)",
        state: "git checkout -q $B && GIT_SEQUENCE_EDITOR='sed -i 1s/^pick/edit/' git rebase -q -i HEAD~1",
        outcome: Refused(2, "in the middle of a rebase"),
        cleanup: "git rebase --abort; git checkout -q -f main",
        ..Cell::default()
    });
    both(Cell {
        name: "cherry-pick stopped in conflict",
        state: CONFLICT_SETUP_THEN_PICK,
        outcome: Refused(2, "in the middle of a cherry-pick"),
        cleanup: "git cherry-pick --abort; git checkout -q -f main && git branch -D op-$B mx-$B",
        ..Cell::default()
    });
    both(Cell {
        name: "bisect in progress (detached, clean)",
        state: "git bisect start $B main~1 >/dev/null",
        outcome: Refused(2, "in the middle of a bisect"),
        cleanup: "git bisect reset >/dev/null 2>&1; git checkout -q -f main",
        ..Cell::default()
    });
    both(Cell {
        name: "index.lock present",
        state: "git checkout -q $B && touch .git/index.lock",
        outcome: Refused(2, "index.lock"),
        cleanup: "rm -f .git/index.lock",
        ..Cell::default()
    });
    both(Cell {
        name: "the branch checked out in a linked worktree",
        state: "git checkout -q main && git worktree add -q ../wt-$B $B",
        tree: Some("wt-$B"),
        outcome: Synced,
        cleanup: "git worktree remove --force ../wt-$B",
        ..Cell::default()
    });
    both(Cell {
        name: "sparse checkout (only dir/)",
        state: "git checkout -q $B && git sparse-checkout set --no-cone /dir/",
        outcome: Synced,
        cleanup: "git sparse-checkout disable",
        ..Cell::default()
    });
    both(Cell {
        name: "tags: the sandbox moves one and makes another",
        state: "git checkout -q $B && git tag t-$B main",
        outcome: Synced,
        ..Cell::default()
    });
    both(Cell {
        name: "history rewritten in the sandbox after a sync",
        state: "git checkout -q $B",
        outcome: Refused(3, "diverged"),
        ..Cell::default()
    });
    v.push(Cell {
        name: "the sandbox on a branch the host lacks, clean",
        state: "git checkout -q main",
        host_lacks_branch: true,
        outcome: Outcome::Synced,
        ..Cell::default()
    });
    v.push(Cell {
        name: "the sandbox on a branch the host lacks, dirty",
        state: "git checkout -q main && echo local >> c.txt",
        host_lacks_branch: true,
        outcome: Outcome::Refused(2, "uncommitted changes"),
        ..Cell::default()
    });
    v
}

// A host branch `op-$B` and a side branch `mx-$B` that change `c.txt`
// differently; the host is on `op-$B` when the operation stops.
const CONFLICT_SETUP_THEN_MERGE: &str = "git checkout -q -b mx-$B main && echo side > c.txt && git commit -qam side && \
     git checkout -q -b op-$B main && echo op > c.txt && git commit -qam op && ! git merge -q mx-$B >/dev/null 2>&1";
const CONFLICT_SETUP_THEN_REBASE: &str = "git checkout -q -b mx-$B main && echo side > c.txt && git commit -qam side && \
     git checkout -q -b op-$B main && echo op > c.txt && git commit -qam op && ! git rebase -q mx-$B >/dev/null 2>&1";
const CONFLICT_SETUP_THEN_PICK: &str = "git checkout -q -b mx-$B main && echo side > c.txt && git commit -qam side && \
     git checkout -q -b op-$B main && echo op > c.txt && git commit -qam op && ! git cherry-pick mx-$B >/dev/null 2>&1";

impl Default for Cell {
    fn default() -> Self {
        Cell {
            name: "",
            state: "",
            tree: None,
            dirty: "",
            host_lacks_branch: false,
            sandbox: Side::Sandbox,
            outcome: Outcome::Synced,
            cleanup: "",
        }
    }
}

/// `sh -c script` in `dir`, with `B` set; its result.
fn host_sh(dir: &Path, branch: &str, script: &str) -> Run {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("B", branch)
        .env("GIT_EDITOR", "true")
        .env("GIT_AUTHOR_NAME", "Host Dev")
        .env("GIT_AUTHOR_EMAIL", "dev@host.example")
        .env("GIT_COMMITTER_NAME", "Host Dev")
        .env("GIT_COMMITTER_EMAIL", "dev@host.example");
    run_bounded(cmd, Duration::from_secs(60))
}

#[track_caller]
fn host_ok(dir: &Path, branch: &str, script: &str) -> String {
    let r = host_sh(dir, branch, script);
    assert_eq!(r.code, Some(0), "host: {script}\n{}", r.text());
    r.stdout.trim().to_string()
}

/// Everything of the host's that a sync may change: branch and tag refs,
/// HEAD, the index, the git state files (merge, rebase, bisect, locks),
/// and every work tree's files.
fn host_state(project: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let git = project.join(".git");
    let refs = host_ok(
        project,
        "",
        "git for-each-ref --format='%(refname) %(objectname)' refs/heads refs/tags; git worktree list --porcelain",
    );
    out.push(("refs".into(), refs.into_bytes()));
    for e in std::fs::read_dir(&git).expect(".git").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // Objects and keystone's own refs are where the fetch puts the
        // sandbox's commits; logs record ref moves keystone makes in
        // refs/keystone only.
        if ["objects", "refs", "logs", "packed-refs"].contains(&name.as_str()) {
            continue;
        }
        if e.path().is_file() {
            out.push((
                format!(".git/{name}"),
                std::fs::read(e.path()).expect("read"),
            ));
        } else {
            out.push((format!(".git/{name}/"), Vec::new()));
        }
    }
    // The project and its linked work trees beside it; the project's
    // `.git` is above, a linked tree's `.git` file is kept.
    let parent = project.parent().expect("parent");
    for (rel, bytes) in crate::scenarios::tree_bytes(parent, &["state", "home", "config"]) {
        if rel.split('/').any(|c| c == ".git") && !rel.ends_with("/.git") {
            continue;
        }
        out.push((rel, bytes));
    }
    out
}

fn name_of(i: usize, c: &Cell) -> String {
    let side = match c.sandbox {
        Side::Sandbox => "s",
        Side::Both => "b",
    };
    format!("m{i:02}{side}")
}

pub fn state_matrix(h: Host) {
    let project = h.project.clone();
    for (f, text) in [
        ("a.txt", "a\n"),
        ("b.txt", "b\n"),
        ("c.txt", "c\n"),
        ("dir/d.txt", "d\n"),
    ] {
        let p = project.join(f);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    host_ok(&project, "", "git add -A && git commit -qm files");
    h.start(&["--network", "none"]).ok();
    let sandbox = h.name();
    let cells = cells();
    let mut table = Vec::new();
    let mut failed = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let b = name_of(i, c);
        let label = format!(
            "{} / {}",
            c.name,
            match c.sandbox {
                Side::Sandbox => "sandbox has new commits",
                Side::Both => "both have new commits",
            }
        );
        // A cell that fails is recorded and cleaned up; the rest still run.
        let run = || -> String {
            if !c.host_lacks_branch {
                host_ok(&project, &b, "git branch $B main");
            }
            // The sandbox's commit: a.txt and dir/d.txt.
            let script = format!(
                "cd /workspace && git checkout -q -B {b} main && echo sandbox-{b} >> a.txt && \
                 echo sandbox-{b} >> dir/d.txt && git commit -qam 'sandbox {b}' && git rev-parse HEAD"
            );
            let mut theirs = h.sh(&script).trim().to_string();
            if c.name.starts_with("tags") {
                h.sh(&format!(
                    "cd /workspace && git tag -f t-{b} HEAD >/dev/null && git tag n-{b}"
                ));
            }
            if c.name.starts_with("history rewritten") {
                // Synced once, then the sandbox amends what the host has.
                host_ok(&project, &b, "git checkout -q $B");
                h.ks(&["sync", "--branch", &b]).ok();
                host_ok(&project, &b, "git checkout -q main");
                theirs = h
                    .sh(&format!(
                        "cd /workspace && git checkout -q {b} && echo rewritten > a.txt && \
                         git commit -q --amend -am 'sandbox {b}, rewritten' && git rev-parse HEAD"
                    ))
                    .trim()
                    .to_string();
            }
            if c.sandbox == Side::Both {
                host_ok(
                    &project,
                    &b,
                    "git checkout -q $B && echo host-$B >> b.txt && git commit -qam \"host $B\" && git checkout -q main",
                );
            }
            host_ok(&project, &b, c.state);
            let before = host_state(&project);
            let ours_before = host_ok(
                &project,
                &b,
                "git rev-parse -q --verify refs/heads/$B || true",
            );
            let r = h.ks(&["sync", "--branch", &b]);
            let tree: PathBuf = match c.tree {
                Some(t) => project.parent().expect("parent").join(t.replace("$B", &b)),
                None => project.clone(),
            };
            let kept = host_ok(
                &project,
                &b,
                &format!("git rev-parse refs/keystone/{sandbox}/heads/$B"),
            );
            assert_eq!(kept, theirs, "{label}: the sandbox's commit is kept");
            let verdict = match c.outcome {
                Outcome::Synced => {
                    assert_eq!(r.code, Some(0), "{label}: expected a sync:\n{}", r.text());
                    let now = host_ok(&project, &b, "git rev-parse refs/heads/$B");
                    match c.sandbox {
                        Side::Sandbox => {
                            assert_eq!(now, theirs, "{label}: the host's {b} is the sandbox's")
                        }
                        Side::Both => {
                            let parents = host_ok(&project, &b, "git rev-parse $B^1 $B^2");
                            assert_eq!(
                                parents,
                                format!("{ours_before}\n{theirs}"),
                                "{label}: a merge of the host's and the sandbox's"
                            );
                        }
                    }
                    assert!(
                        r.text().contains(&now[..12]),
                        "{label}: the report names {now}:\n{}",
                        r.text()
                    );
                    assert_eq!(
                        host_ok(&tree, &b, "git symbolic-ref --short HEAD"),
                        b,
                        "{label}: {b} is checked out in {}",
                        tree.display()
                    );
                    let status =
                        host_sh(&tree, &b, "git status --porcelain --untracked-files=no").stdout;
                    assert_eq!(
                        status.trim_end(),
                        c.dirty,
                        "{label}: the working tree is the branch's plus the host's own changes"
                    );
                    if c.name.starts_with("sparse") {
                        assert!(
                            !tree.join("a.txt").exists(),
                            "{label}: a.txt stays out of the sparse tree"
                        );
                        assert!(
                            std::fs::read_to_string(tree.join("dir/d.txt"))
                                .expect("d.txt")
                                .contains(&format!("sandbox-{b}")),
                            "{label}: dir/d.txt has the sandbox's change"
                        );
                    } else {
                        assert!(
                            std::fs::read_to_string(tree.join("a.txt"))
                                .expect("a.txt")
                                .contains(&format!("sandbox-{b}")),
                            "{label}: a.txt has the sandbox's change"
                        );
                    }
                    if c.name.starts_with("tags") {
                        assert_eq!(
                            host_ok(&project, &b, "git rev-parse t-$B"),
                            host_ok(&project, &b, "git rev-parse main"),
                            "{label}: the sandbox cannot move a host tag"
                        );
                        assert!(
                            host_sh(&project, &b, "git rev-parse -q --verify refs/tags/n-$B").code
                                != Some(0),
                            "{label}: the sandbox's tags stay in the sandbox"
                        );
                    }
                    "synced".to_string()
                }
                Outcome::Refused(code, because) => {
                    assert_eq!(
                        r.code,
                        Some(code),
                        "{label}: expected exit {code}:\n{}",
                        r.text()
                    );
                    assert!(
                        r.text().contains(because),
                        "{label}: the error says {because:?}:\n{}",
                        r.text()
                    );
                    let after = host_state(&project);
                    for (x, y) in before.iter().zip(&after) {
                        assert_eq!(x, y, "{label}: {} changed on the host:\n{}", x.0, r.text());
                    }
                    assert_eq!(before.len(), after.len(), "{label}: files came or went");
                    format!("exit {code}, host unchanged")
                }
            };
            verdict
        };
        let verdict = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(v) => v,
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(label.clone());
                format!("FAILED: {}", why.lines().next().unwrap_or_default())
            }
        };
        table.push(format!("| {label} | {verdict} |"));
        let cleanup = if c.cleanup.is_empty() {
            CLEAN.to_string()
        } else {
            format!("{}; {CLEAN}", c.cleanup)
        };
        host_ok(&project, &b, &cleanup);
    }
    eprintln!(
        "sync state matrix ({} cells):\n{}",
        table.len(),
        table.join("\n")
    );
    assert!(
        failed.is_empty(),
        "{} cell(s) failed: {failed:#?}",
        failed.len()
    );
    // What was refused is still only in keystone's refs: destroy says so.
    let r = h.ks(&["destroy", &sandbox]);
    r.code(2);
    assert!(r.text().contains("not on any host branch"), "{}", r.text());
}

/// A shallow clone (`git clone --depth 1`): the sandbox gets its history
/// as far as it goes, and a commit comes back.
pub fn shallow_clone(h: Host) {
    let project = h.project.clone();
    for i in 1..=3 {
        host_ok(
            &project,
            "",
            &format!("echo {i} > f{i}.txt && git add f{i}.txt && git commit -qm c{i}"),
        );
    }
    let shallow = h.tmp.path().join("shallow");
    host_ok(
        h.tmp.path(),
        "",
        &format!(
            "git clone -q --depth 1 file://{} shallow && git -C shallow config user.name 'Host Dev' && \
             git -C shallow config user.email dev@host.example",
            project.display()
        ),
    );
    assert_eq!(
        host_ok(&shallow, "", "git rev-parse --is-shallow-repository"),
        "true"
    );
    let r = h.ks(&[
        "start",
        "--no-attach",
        "--network",
        "none",
        shallow.to_str().expect("utf8"),
    ]);
    r.ok();
    let name = "shallow";
    let out = h.ks(&[
        "exec",
        name,
        "--",
        "bash",
        "-c",
        "cd /workspace && git log --format=%s && echo agent > agent.txt && git add agent.txt && git commit -qm agent && echo ok",
    ]);
    out.ok();
    assert!(
        out.stdout.contains("c3") && out.stdout.trim_end().ends_with("ok"),
        "{}",
        out.text()
    );
    h.ks(&["sync", name]).ok();
    assert_eq!(host_ok(&shallow, "", "git log -1 --format=%s"), "agent");
    assert_eq!(host_ok(&shallow, "", "git status --porcelain"), "");
    assert_eq!(
        std::fs::read_to_string(shallow.join("agent.txt")).expect("agent.txt"),
        "agent\n"
    );
    h.ks(&["destroy", name, "--force"]).ok();
}
