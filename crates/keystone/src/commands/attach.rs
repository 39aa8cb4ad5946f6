//! `keystone agent attach`: the session's terminal, through the channel,
//! or (`--web`) the same session served to a browser.

use crate::cli::AttachArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use keystone_registry::Sandbox;
use std::io::IsTerminal;

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

/// Attach this terminal to the worktree's session (`start` attaches too).
pub fn attach_session(ctx: &Ctx, sb: &Sandbox, worktree: &str) -> Result<i32> {
    let channel = ctx.channel(sb)?;
    crate::commands::worktree::require(&channel, sb, worktree)?;
    if !std::io::stdin().is_terminal() {
        return Err(CliError::state(
            "attach needs a terminal; use `keystone agent exec` from scripts, or `attach --web`",
        ));
    }
    let status = crate::session::command(&channel, sb, worktree)?.status()?;
    // Detaching ends the multiplexer's client with 0; anything else is
    // passed on.
    Ok(status.code().unwrap_or(255))
}
