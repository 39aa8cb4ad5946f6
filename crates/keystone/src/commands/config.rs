//! `keystone agent config`: the effective configuration and where each
//! value came from.

use crate::cli::ConfigArgs;
use crate::context::load_config;
use crate::error::{CliError, Result};

pub fn run(args: ConfigArgs) -> Result<i32> {
    let path = match args.project_path {
        Some(p) => p,
        None => std::env::current_dir()?,
    };
    // Outside a repository there is simply no project file.
    let project = keystone_sync::toplevel(&path).ok();
    let eff = load_config(project.as_deref(), Vec::new())?;
    let entries = eff.entries();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).map_err(|e| CliError::failed(e.to_string()))?
        );
        return Ok(0);
    }
    let w = entries
        .iter()
        .map(|e| e.key.len() + e.value.len() + 3)
        .max()
        .unwrap_or(0);
    for e in entries {
        let kv = format!("{} = {}", e.key, e.value);
        println!("{kv:<w$}  # {}", e.origin);
    }
    Ok(0)
}
