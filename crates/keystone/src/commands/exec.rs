//! `keystone agent exec`: run a command in the sandbox; its exit status
//! passes through.

use crate::cli::ExecArgs;
use crate::context::Ctx;
use crate::error::Result;
use keystone_channel::ExecOptions;
use std::io::IsTerminal;

pub fn run(args: ExecArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    let channel = ctx.channel(&sb)?;
    crate::commands::worktree::require(&channel, &sb, &args.worktree)?;
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let opts = ExecOptions {
        user: Some(args.user.clone()),
        cwd: Some(crate::session::dir(&args.worktree)),
        tty,
    };
    let status = channel.exec(&args.command, &opts)?;
    Ok(status.code().unwrap_or(255))
}
