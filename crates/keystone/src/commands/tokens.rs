//! `keystone agent tokens`: which credentials a sandbox of this project
//! would receive, and where each comes from. Never their values.

use crate::cli::TokensArgs;
use crate::context::load_config;
use crate::credentials;
use crate::error::Result;

pub fn run(args: TokensArgs) -> Result<i32> {
    let path = match &args.project_path {
        Some(p) => p.clone(),
        None => std::env::current_dir()?,
    };
    // Outside a git repository only the host environment counts.
    let project = keystone_sync::toplevel(&path).ok();
    let eff = load_config(project.as_deref(), Vec::new())?;
    let cfg = &eff.config;
    let creds = credentials::resolve(
        &cfg.guest.forward_env,
        project.as_deref(),
        &cfg.defaults.env_files,
        &|k| std::env::var(k).ok(),
    )?;
    if args.json {
        let list: Vec<serde_json::Value> = creds
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "available": c.is_available(),
                    "source": c.source.to_string(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(0);
    }
    println!("{:<28}  SOURCE", "VARIABLE");
    for c in &creds {
        println!("{:<28}  {}", c.name, c.source);
    }
    let n = creds.iter().filter(|c| c.is_available()).count();
    println!(
        "{n} of {} forwarded; the list is guest.forward_env, env files are {}",
        creds.len(),
        cfg.defaults.env_files.join(", ")
    );
    Ok(0)
}
