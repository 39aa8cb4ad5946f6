//! `keystone agent stop`.

use crate::cli::StopArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use crate::ui;
use keystone_backend::{STOP_FORCE, STOP_GRACEFUL};
use keystone_registry::{Sandbox, State};
use std::time::{Duration, Instant};

/// How long `stop` waits for the supervisor before killing it.
const STOP_WAIT: Duration = Duration::from_secs(30);

pub fn run(args: StopArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    if args.sync {
        match crate::commands::sync::sync_sandbox(&ctx, &sb, None, false) {
            Ok(report) => crate::commands::sync::print_report(&report, false),
            Err(e)
                if e.code == crate::error::Exit::InvalidState
                    && e.message.starts_with("no changes") =>
            {
                ui::note(&e.message)
            }
            Err(e) => {
                return Err(CliError::new(
                    e.code,
                    format!(
                        "{}\nthe sandbox was not stopped; fix this, or stop without --sync",
                        e.message
                    ),
                ))
            }
        }
    }
    stop_sandbox(&ctx, &sb, args.force)?;
    println!("sandbox {} stopped", sb.name);
    Ok(0)
}

/// Stop a running sandbox through its supervisor, and wait until the
/// registry says it is down.
pub fn stop_sandbox(ctx: &Ctx, sb: &Sandbox, force: bool) -> Result<()> {
    let owner = ctx.registry.update_one(&sb.name, |s| {
        if s.state != State::Running {
            return Err(CliError::state(format!(
                "sandbox {} is not running (it is {})",
                s.name, s.state
            )));
        }
        s.transition(State::Stopping)?;
        Ok(s.owner)
    })?;
    // Record what the sandbox holds before it goes away, so `destroy` can
    // tell later whether anything is unsynced. Best effort.
    if let Ok(channel) = ctx.channel(sb) {
        let git = keystone_sync::Git::open(&sb.project_path);
        if sb.workspace_ready && sb.project_path.exists() {
            if let Err(e) = keystone_sync::fetch(&git, &channel, &sb.name) {
                tracing::warn!("could not record the sandbox's branches before stopping: {e}");
            }
        }
        channel.close();
    }
    if let Some(owner) = owner.filter(|o| o.is_alive()) {
        let pid = nix::unistd::Pid::from_raw(owner.pid);
        let _ = nix::sys::signal::kill(pid, if force { STOP_FORCE } else { STOP_GRACEFUL });
        let deadline = Instant::now() + STOP_WAIT;
        while owner.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(25));
        }
        if owner.is_alive() {
            ui::warn(format!(
                "supervisor {} did not stop in {}s; killing it",
                owner.pid,
                STOP_WAIT.as_secs()
            ));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            while owner.is_alive() {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
    ctx.reconcile()?;
    let after = ctx.registry.get(&sb.name)?;
    if after.state != State::Stopped {
        return Err(CliError::failed(format!(
            "sandbox {} is {} after stopping: {}",
            sb.name,
            after.state,
            after.error.unwrap_or_default()
        )));
    }
    Ok(())
}
