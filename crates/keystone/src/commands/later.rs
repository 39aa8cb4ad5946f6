//! Commands whose parts are built by later work. Each answers with exit
//! code 3 and one line naming what is missing, so scripts can tell.

use crate::cli::Proxy;
use crate::error::{CliError, Result};

pub fn proxy(cmd: Proxy) -> Result<i32> {
    match cmd {
        Proxy::Status => Err(CliError::missing("the dev-server proxy (proxy status)")),
    }
}
