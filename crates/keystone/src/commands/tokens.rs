//! `keystone agent tokens`: which credentials a sandbox of this project
//! gets, where each comes from, the hosts its real value is injected for,
//! and (when the sandbox runs) how many requests used it. Never a value.
//!
//! `--refresh` re-reads the values (host environment, env files,
//! commands) and hands them to the running sandbox's egress point: a
//! rotated key takes effect at the next request, without a restart; the
//! guest keeps its placeholders.

use crate::cli::TokensArgs;
use crate::context::{load_config, Ctx};
use crate::credentials;
use crate::error::{CliError, Result};
use keystone_registry::State;
use std::time::Duration;

pub fn run(args: TokensArgs) -> Result<i32> {
    let path = match &args.project_path {
        Some(p) => p.clone(),
        None => std::env::current_dir()?,
    };
    // Outside a git repository only the host environment counts.
    let project = keystone_sync::toplevel(&path).ok();
    let eff = load_config(project.as_deref(), Vec::new())?;
    let cfg = &eff.config;
    let settings = credentials::Settings::from_config(cfg);
    let creds = credentials::resolve(
        &settings,
        project.as_deref(),
        &cfg.defaults.env_files,
        &|k| std::env::var(k).ok(),
    )?;

    // The project's running sandbox, whose egress point counts uses.
    let ctx = Ctx::new()?;
    ctx.reconcile()?;
    let running = match &project {
        Some(top) => ctx
            .registry
            .list()?
            .into_iter()
            .find(|s| &s.project_path == top && s.state == State::Running),
        None => None,
    };
    if args.refresh {
        let (Some(sb), Some(top)) = (&running, &project) else {
            return Err(CliError::state(
                "--refresh needs a running sandbox of this project; `keystone agent start` reads the values anyway",
            ));
        };
        let (plan, _) = credentials::deliver(&ctx, sb, cfg, top, true)?;
        eprintln!(
            "handed {} credential(s) to {}'s egress point: {}",
            plan.secrets.len(),
            sb.name,
            plan.forwarded().join(", ")
        );
        for n in &plan.notes {
            eprintln!("  {n}");
        }
    }
    let usage = running
        .as_ref()
        .filter(|sb| crate::commands::egress::enforced(sb))
        .and_then(|sb| {
            let control = keystone_backend::egress::paths(&ctx.sandbox_dir(sb)).control;
            keystone_egress::control::usage(&control, Duration::from_secs(5))
                .map_err(|e| tracing::warn!("cannot read the credentials' use: {e}"))
                .ok()
        });
    let used = |name: &str| {
        usage
            .as_ref()
            .map(|u| u.get(name).cloned().unwrap_or_default())
    };

    if args.json {
        let list: Vec<serde_json::Value> = creds
            .iter()
            .map(|c| {
                let u = used(&c.name);
                serde_json::json!({
                    "name": c.name,
                    "available": c.is_available(),
                    "source": c.source.to_string(),
                    "hosts": c.hosts,
                    "headers": c.headers,
                    "used": u.as_ref().map(|u| u.used),
                    "placeholder_elsewhere": u.as_ref().map(|u| u.passed),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(0);
    }
    println!("{:<26}  {:<34}  {:>5}  HOSTS", "VARIABLE", "SOURCE", "USED");
    for c in &creds {
        let hosts = if c.hosts.is_empty() {
            "(none: not forwarded)".to_string()
        } else {
            c.hosts.join(", ")
        };
        let n = used(&c.name).map_or("-".to_string(), |u| u.used.to_string());
        println!(
            "{:<26}  {:<34}  {:>5}  {hosts}",
            c.name,
            c.source.to_string(),
            n
        );
    }
    let n = creds.iter().filter(|c| c.is_available()).count();
    println!(
        "{n} of {} available; the guest holds placeholders, the egress point injects the real values into requests to their hosts",
        creds.len(),
    );
    println!(
        "the list is guest.forward_env; hosts: credentials.hosts; env files: {}{}",
        cfg.defaults.env_files.join(", "),
        match &running {
            Some(sb) => format!(
                "; USED counts requests of sandbox {} since it started",
                sb.name
            ),
            None => "; USED needs a running sandbox".into(),
        }
    );
    Ok(0)
}
