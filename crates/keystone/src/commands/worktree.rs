//! `keystone agent worktree add|list|remove`, and where `--worktree`
//! leads `exec` and `attach`: one git worktree per branch at
//! `/workspace/.worktrees/<branch>`, each with its own multiplexer session
//! `<sandbox>-<branch>` (the main checkout's is `<sandbox>-main`).

use crate::cli::Worktree;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use crate::session::Scripts as _;
use keystone_channel::{Channel, ExecOptions};
use keystone_registry::Sandbox;
use serde::Serialize;

use crate::session::{dir, WORKTREES as ROOT};

/// The directory of a worktree: `main` is the main checkout.
fn q(s: &str) -> String {
    shell_words::quote(s).into_owned()
}

/// Refuse names git would refuse as branches (checked by git itself).
fn validate_branch(branch: &str) -> Result<()> {
    let ok = std::process::Command::new("git")
        .args(["check-ref-format", "--branch", branch])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok || branch.starts_with('-') {
        return Err(CliError::state(format!(
            "{branch:?} is not a valid branch name (see `git check-ref-format --branch`)"
        )));
    }
    Ok(())
}

/// Fail with exit 1 unless the worktree exists in the sandbox.
pub fn require(channel: &Channel, sb: &Sandbox, worktree: &str) -> Result<()> {
    if worktree == "main" {
        return Ok(());
    }
    let ok = channel
        .run(
            &format!("test -d {}", q(&dir(worktree))),
            &ExecOptions::default(),
        )?
        .status
        .success();
    if !ok {
        return Err(CliError::not_found(format!(
            "sandbox {} has no worktree {worktree:?}; `keystone agent worktree list` shows them, \
             `keystone agent worktree add {worktree}` makes it",
            sb.name
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct Row {
    branch: String,
    path: String,
    is_main: bool,
    session: String,
    session_running: bool,
    current: bool,
}

pub fn run(cmd: Worktree) -> Result<i32> {
    let ctx = Ctx::new()?;
    match cmd {
        Worktree::Add {
            branch,
            create,
            sandbox,
        } => {
            validate_branch(&branch)?;
            if branch == "main" {
                return Err(CliError::state(
                    "\"main\" names the main checkout; pick another branch",
                ));
            }
            let sb = ctx.resolve(sandbox.as_deref())?;
            ctx.require_running(&sb)?;
            if sb.settings.is_share() {
                // git would record guest paths in the host repository's
                // .git/worktrees, which the host cannot use.
                return Err(CliError::state(format!(
                    "sandbox {} works on the project itself (live share); worktrees need the isolated clone: \
use `git worktree` on the host, or start the sandbox without --share",
                    sb.name
                )));
            }
            let channel = ctx.channel(&sb)?;
            let path = dir(&branch);
            if channel
                .run(&format!("test -e {}", q(&path)), &ExecOptions::default())?
                .status
                .success()
            {
                return Err(CliError::state(format!(
                    "worktree {branch} already exists at {path}"
                )));
            }
            let has_branch = channel
                .run(
                    &format!("git show-ref --verify -q refs/heads/{}", q(&branch)),
                    &ExecOptions::default(),
                )?
                .status
                .success();
            if !has_branch && !create {
                return Err(CliError::not_found(format!(
                    "the sandbox has no branch {branch}; pass --create to make it from the current commit"
                )));
            }
            if has_branch && create {
                return Err(CliError::state(format!(
                    "branch {branch} already exists; drop --create to use it"
                )));
            }
            let add = if create {
                format!("git worktree add -q -b {} {}", q(&branch), q(&path))
            } else {
                format!("git worktree add -q {} {}", q(&path), q(&branch))
            };
            // .worktrees/ never shows as a change in the main checkout.
            let script = format!(
                "set -e; grep -qxF /.worktrees/ .git/info/exclude 2>/dev/null || echo /.worktrees/ >> .git/info/exclude; {add}"
            );
            channel.run_ok(&script, &ExecOptions::default())?;
            println!(
                "worktree {branch} at {path}; session {}",
                crate::session::name(&sb, &branch)
            );
            Ok(0)
        }
        Worktree::List { json, sandbox } => {
            let sb = ctx.resolve(sandbox.as_deref())?;
            ctx.require_running(&sb)?;
            let channel = ctx.channel(&sb)?;
            let mux = crate::session::of(&sb);
            let out = channel.run_ok(
                &format!(
                    "git worktree list --porcelain; echo '#sessions'; {}",
                    mux.list_script()
                ),
                &ExecOptions::default(),
            )?;
            let (trees, sessions) = out.split_once("#sessions").unwrap_or((&out, ""));
            let sessions: Vec<(String, bool)> = sessions
                .lines()
                .filter_map(|l| l.rsplit_once(' ').map(|(n, a)| (n.to_string(), a != "0")))
                .collect();
            let mut rows = Vec::new();
            for block in trees.split("\n\n").filter(|b| !b.trim().is_empty()) {
                let path = block
                    .lines()
                    .find_map(|l| l.strip_prefix("worktree "))
                    .unwrap_or("")
                    .to_string();
                let git_branch = block
                    .lines()
                    .find_map(|l| l.strip_prefix("branch refs/heads/"))
                    .unwrap_or("(detached)")
                    .to_string();
                let is_main = path == "/workspace";
                let name = if is_main {
                    "main".to_string()
                } else {
                    path.trim_start_matches(&format!("{ROOT}/")).to_string()
                };
                let s = crate::session::name(&sb, &name);
                let found = sessions.iter().find(|(n, _)| *n == s);
                rows.push(Row {
                    branch: if is_main { git_branch } else { name.clone() },
                    path,
                    is_main,
                    session: s,
                    session_running: found.is_some(),
                    current: found.is_some_and(|(_, attached)| *attached),
                });
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows)
                        .map_err(|e| CliError::failed(e.to_string()))?
                );
                return Ok(0);
            }
            println!("{:<24} {:<44} {:<32} CURRENT", "BRANCH", "PATH", "SESSION");
            for r in rows {
                println!(
                    "{:<24} {:<44} {:<32} {}",
                    r.branch,
                    r.path,
                    format!(
                        "{}{}",
                        r.session,
                        if r.session_running {
                            ""
                        } else {
                            " (not started)"
                        }
                    ),
                    if r.current { "*" } else { "" }
                );
            }
            Ok(0)
        }
        Worktree::Remove {
            branch,
            force,
            sandbox,
        } => {
            if branch == "main" {
                return Err(CliError::state(
                    "the main checkout (/workspace) cannot be removed; destroy the sandbox instead",
                ));
            }
            let sb = ctx.resolve(sandbox.as_deref())?;
            ctx.require_running(&sb)?;
            let channel = ctx.channel(&sb)?;
            require(&channel, &sb, &branch)?;
            let path = dir(&branch);
            if !force {
                let dirty = channel.run_ok(
                    &format!("git -C {} status --porcelain", q(&path)),
                    &ExecOptions::default(),
                )?;
                if !dirty.trim().is_empty() {
                    return Err(CliError::state(format!(
                        "worktree {branch} has uncommitted changes; commit them, or remove with --force to drop them"
                    )));
                }
                let git = keystone_sync::Git::open(&sb.project_path);
                keystone_sync::fetch(&git, &channel, &sb.name)?;
                if let Some(n) = keystone_sync::unsynced(&git, &sb.name)?.get(&branch) {
                    return Err(CliError::state(format!(
                        "branch {branch} has {n} commit(s) the host does not have; \
                         `keystone agent sync --branch {branch}` first, or remove with --force"
                    )));
                }
            }
            let script = format!(
                "{}; git worktree remove {} {}",
                crate::session::of(&sb).kill_script(&crate::session::name(&sb, &branch)),
                if force { "--force" } else { "" },
                q(&path)
            );
            channel.run_ok(&script, &ExecOptions::default())?;
            println!("removed worktree {branch} (the branch itself is kept)");
            Ok(0)
        }
    }
}
