//! `keystone agent attach`: the session's terminal, through the channel,
//! or (`--web`) the same session served to a browser.

use crate::cli::AttachArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use crate::session::Scripts as _;
use keystone_channel::{Channel, ExecOptions};
use keystone_registry::Sandbox;
use std::io::IsTerminal;
use std::process::Command;

pub fn run(args: AttachArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    if args.web {
        let channel = ctx.channel(&sb)?;
        crate::commands::worktree::require(&channel, &sb, &args.worktree)?;
        return crate::webterm::serve(&ctx, &sb, &args.worktree, channel);
    }
    attach_session(&ctx, &sb, &args.worktree)
}

/// The ssh command that attaches a client to the worktree's session (and
/// creates the session first if need be), on a terminal allocated in the
/// guest. The terminal attach and every web terminal client run this same
/// command, so they all share one session.
pub fn session_command(channel: &Channel, sb: &Sandbox, worktree: &str) -> Result<Command> {
    let session = crate::commands::worktree::session(sb, worktree);
    let script =
        crate::session::of(sb).attach_script(&session, &crate::commands::worktree::dir(worktree));
    Ok(channel.command(
        &script,
        &ExecOptions {
            tty: true,
            ..Default::default()
        },
    )?)
}

pub fn attach_session(ctx: &Ctx, sb: &Sandbox, worktree: &str) -> Result<i32> {
    let channel = ctx.channel(sb)?;
    crate::commands::worktree::require(&channel, sb, worktree)?;
    if !std::io::stdin().is_terminal() {
        return Err(CliError::state(
            "attach needs a terminal; use `keystone agent exec` from scripts, or `attach --web`",
        ));
    }
    let status = session_command(&channel, sb, worktree)?.status()?;
    // Detaching ends the multiplexer's client with 0; anything else is
    // passed on.
    Ok(status.code().unwrap_or(255))
}
