//! Commands whose parts are built by later work. Each answers with exit
//! code 3 and one line naming what is missing, so scripts can tell.

use crate::cli::{Proxy, Worktree};
use crate::error::{CliError, Result};

pub fn worktree(cmd: Worktree) -> Result<i32> {
    let what = match cmd {
        Worktree::Add { .. } => "worktree add",
        Worktree::List { .. } => "worktree list",
        Worktree::Remove { .. } => "worktree remove",
    };
    Err(CliError::missing(format!("worktrees ({what})")))
}

pub fn proxy(cmd: Proxy) -> Result<i32> {
    match cmd {
        Proxy::Status => Err(CliError::missing("the dev-server proxy (proxy status)")),
    }
}
