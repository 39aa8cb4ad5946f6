//! `keystone agent sync`: bring the sandbox's commits to the host.

use crate::cli::SyncArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use keystone_registry::{now, Sandbox, SyncRecord};
use keystone_sync::{Git, Report};

pub fn run(args: SyncArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    if args.artifacts {
        return Err(CliError::missing("artifact sync (sync --artifacts)"));
    }
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    let report = sync_sandbox(&ctx, &sb, args.branch.as_deref(), args.dry_run)?;
    print_report(&report, args.json);
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
    let result = keystone_sync::sync_back(&git, &channel, &sb.name, branch, dry_run);
    if !dry_run {
        let outcome = match &result {
            Ok(r) => format!("synced {} commit(s)", r.commits),
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
    let verb = if r.dry_run { "would sync" } else { "synced" };
    println!(
        "{verb} {} commit(s) on {}: {} file(s) changed, {} insertion(s)(+), {} deletion(s)(-)",
        r.commits, r.branch, r.files_changed, r.insertions, r.deletions
    );
    println!(
        "  {} -> {}",
        r.from
            .as_deref()
            .map(|s| &s[..s.len().min(12)])
            .unwrap_or("(new branch)"),
        &r.to[..r.to.len().min(12)]
    );
}
