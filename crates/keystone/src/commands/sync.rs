//! `keystone agent sync`: bring the sandbox's commits to the host.

use crate::cli::SyncArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use keystone_registry::{now, Sandbox, SyncRecord};
use keystone_sync::{Git, Report};

pub fn run(args: SyncArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    if sb.settings.is_share() {
        return Err(CliError::state(format!(
            "sandbox {} works on {} itself (live share): its commits and files are already on the host; there is nothing to sync",
            sb.name,
            sb.project_path.display()
        )));
    }
    // "No changes" to the code does not stop the artifacts from coming.
    let report = match sync_sandbox(&ctx, &sb, args.branch.as_deref(), args.dry_run) {
        Ok(r) => Some(r),
        Err(e)
            if args.artifacts
                && e.code == crate::error::Exit::InvalidState
                && e.message.starts_with("no changes") =>
        {
            crate::ui::note(&e.message);
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(r) = &report {
        print_report(r, args.json);
    }
    if args.artifacts && !args.dry_run {
        let cfg = crate::context::load_config(Some(&sb.project_path), Vec::new())?;
        let channel = ctx.channel(&sb)?;
        let copied = keystone_sync::artifacts::copy_back(
            &sb.project_path,
            &cfg.config.defaults.artifacts,
            &channel,
        )?;
        for c in copied {
            if c.found {
                println!("artifacts: copied {} from the sandbox", c.path);
            } else {
                println!("artifacts: {} does not exist in the sandbox", c.path);
            }
        }
    }
    Ok(0)
}

pub fn sync_sandbox(
    ctx: &Ctx,
    sb: &Sandbox,
    branch: Option<&str>,
    dry_run: bool,
) -> Result<Report> {
    if !sb.project_path.exists() {
        return Err(CliError::not_found(format!(
            "the project {} no longer exists on the host",
            sb.project_path.display()
        )));
    }
    let git = Git::open(&sb.project_path);
    let channel = ctx.channel(sb)?;
    if !dry_run {
        let cfg = crate::context::load_config(Some(&sb.project_path), Vec::new())?;
        let replace = crate::credentials::env_file_replacements(
            &cfg.config.guest.forward_env,
            &crate::credentials::placeholders_file(ctx, sb),
        );
        keystone_sync::env_files::copy(
            &sb.project_path,
            &cfg.config.defaults.env_files,
            &channel,
            &replace,
        )?;
    }
    let result = keystone_sync::sync(&git, &channel, &sb.name, branch, dry_run);
    // "No changes" is not an event worth recording (the automatic modes
    // would otherwise rewrite the registry every poll).
    let nothing = matches!(&result, Err(keystone_sync::SyncError::NoChanges { .. }));
    if !dry_run && !nothing {
        let outcome = match &result {
            Ok(r) => format!(
                "{} commit(s) to the host, {} to the sandbox",
                r.commits, r.pushed_commits
            ),
            Err(e) => e.to_string(),
        };
        let rec = SyncRecord {
            at: now(),
            branch: result
                .as_ref()
                .map(|r| r.branch.clone())
                .unwrap_or_default(),
            commits: result.as_ref().map(|r| r.commits).unwrap_or(0),
            outcome,
        };
        let _ = ctx.registry.update_one(&sb.name, |s| {
            s.last_sync = Some(rec);
            Ok::<_, CliError>(())
        });
    }
    Ok(result?)
}

pub fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    let short = |s: &str| s[..s.len().min(12)].to_string();
    let would = if r.dry_run { "would " } else { "" };
    if let Some(from) = &r.switched_from {
        println!(
            "{would}switch the host from {from} to {}{}",
            r.branch,
            if r.created_branch {
                " (new branch)"
            } else {
                ""
            }
        );
    }
    println!(
        "{}{} {}: {} commit(s) from the sandbox ({} file(s) changed, {} insertion(s)(+), {} deletion(s)(-)), {} commit(s) to the sandbox",
        if r.dry_run { "dry run: " } else { "" },
        if r.dry_run { "would sync" } else { "synced" },
        r.branch,
        r.commits,
        r.files_changed,
        r.insertions,
        r.deletions,
        r.pushed_commits
    );
    if let Some(m) = &r.merge_commit {
        println!("  merged both sides' new commits in {}", short(m));
    }
    println!(
        "  {}: {} -> {}",
        r.branch,
        r.from
            .as_deref()
            .map(short)
            .unwrap_or_else(|| "(new branch)".into()),
        short(&r.to)
    );
    for line in &r.submodules {
        println!("  {}", crate::ui::escape_controls(line));
    }
}
