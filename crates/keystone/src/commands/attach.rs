//! `keystone agent attach`: the session's terminal, through the channel.

use crate::cli::AttachArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use keystone_channel::ExecOptions;
use keystone_registry::Sandbox;
use std::io::IsTerminal;

pub fn run(args: AttachArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    if args.web {
        return Err(CliError::missing("the web terminal (attach --web)"));
    }
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    attach_session(&ctx, &sb, &args.worktree)
}

pub fn attach_session(ctx: &Ctx, sb: &Sandbox, worktree: &str) -> Result<i32> {
    let channel = ctx.channel(sb)?;
    crate::commands::worktree::require(&channel, sb, worktree)?;
    if !std::io::stdin().is_terminal() {
        return Err(CliError::state(
            "attach needs a terminal; use `keystone agent exec` from scripts",
        ));
    }
    let session = crate::commands::worktree::session(sb, worktree);
    let script = format!(
        "exec tmux new-session -A -s {s} -c {d}",
        s = shell_words::quote(&session),
        d = shell_words::quote(&crate::commands::worktree::dir(worktree))
    );
    let status = channel
        .command(
            &script,
            &ExecOptions {
                tty: true,
                ..Default::default()
            },
        )?
        .status()?;
    // Detaching ends tmux's client with 0; anything else is passed on.
    Ok(status.code().unwrap_or(255))
}
