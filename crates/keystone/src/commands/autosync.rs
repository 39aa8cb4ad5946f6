//! `keystone __autosync NAME`: the automatic sync modes, run on the host
//! beside the sandbox's supervisor (which starts it and whose death ends
//! it). Every connection is opened by the host, through the same channel
//! and the same rules as `keystone agent sync`.
//!
//! - `auto-commit`: every couple of seconds, sync the sandbox's current
//!   branch; each new commit reaches the host within seconds.
//! - `auto-idle`: the same, but only once nothing in the workspace has
//!   changed for `sync_idle_seconds`.
//!
//! What the rules refuse (a dirty host on another branch, a conflict) is
//! recorded as the last sync's outcome and shown by `status`, never forced.

use crate::commands::sync::sync_sandbox;
use crate::context::Ctx;
use crate::error::{Exit, Result};
use keystone_channel::ExecOptions;
use keystone_registry::State;
use std::time::Duration;

const POLL: Duration = Duration::from_secs(2);

pub fn run(name: &str) -> Result<i32> {
    let ctx = Ctx::new()?;
    let mut last_refusal: Option<String> = None;
    loop {
        std::thread::sleep(POLL);
        let Ok(sb) = ctx.registry.get(name) else {
            return Ok(0);
        };
        if sb.state != State::Running {
            return Ok(0);
        }
        if sb.settings.sync_mode == keystone_registry::SyncMode::AutoIdle {
            let idle = crate::context::load_config(Some(&sb.project_path), Vec::new())
                .map(|c| c.config.defaults.sync_idle_seconds)
                .unwrap_or(30);
            if !workspace_idle(&ctx, &sb, idle) {
                continue;
            }
        }
        match sync_sandbox(&ctx, &sb, None, false) {
            Ok(r) => {
                last_refusal = None;
                tracing::info!(branch = %r.branch, commits = r.commits, pushed = r.pushed_commits, "auto-synced");
            }
            Err(e) if e.code == Exit::InvalidState && e.message.starts_with("no changes") => {}
            Err(e) => {
                // Recorded by sync_sandbox as the last sync's outcome; log
                // a refusal once, not every poll.
                if last_refusal.as_deref() != Some(e.message.as_str()) {
                    eprintln!("auto-sync of {name}: {}", e.message);
                    last_refusal = Some(e.message);
                }
            }
        }
    }
}

/// Whether no file in /workspace (outside .git) changed in the last
/// `seconds`.
fn workspace_idle(ctx: &Ctx, sb: &keystone_registry::Sandbox, seconds: u64) -> bool {
    let Ok(channel) = ctx.channel(sb) else {
        return false;
    };
    let script = format!(
        "find /workspace -path /workspace/.git -prune -o -newermt '-{seconds} seconds' -print -quit 2>/dev/null"
    );
    match channel.run(&script, &ExecOptions::default()) {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        _ => false,
    }
}
