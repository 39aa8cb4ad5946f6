//! `keystone agent destroy`.

use crate::cli::DestroyArgs;
use crate::context::{backend_for, Ctx};
use crate::error::{CliError, Exit, Result};
use crate::ui;
use keystone_registry::State;
use keystone_sync::Git;

pub fn run(args: DestroyArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(Some(&args.sandbox))?;
    if matches!(sb.state, State::Starting | State::Stopping) {
        return Err(CliError::state(format!(
            "sandbox {} is {}; wait for it to finish",
            sb.name, sb.state
        )));
    }
    let git = sb
        .project_path
        .exists()
        .then(|| Git::open(&sb.project_path));
    // Know what would be lost: fetch the sandbox's branches if it runs;
    // otherwise what was recorded when it stopped.
    if let (State::Running, Some(git)) = (sb.state, &git) {
        if sb.workspace_ready {
            let channel = ctx.channel(&sb)?;
            if let Err(e) = keystone_sync::fetch(git, &channel, &sb.name) {
                ui::warn(format!("could not read the sandbox's branches: {e}"));
            }
        }
    }
    let unsynced = match &git {
        Some(g) => keystone_sync::unsynced(g, &sb.name)?,
        None => Default::default(),
    };
    if !unsynced.is_empty() && !args.force {
        let list: Vec<String> = unsynced.iter().map(|(b, n)| format!("{b} ({n})")).collect();
        return Err(CliError::state(format!(
            "sandbox {} has commits not on any host branch: {}; run `keystone agent sync {}` first, or destroy with --force to drop them",
            sb.name,
            list.join(", "),
            sb.name
        )));
    }
    if !args.force {
        let question = format!(
            "destroy sandbox {} of {}{}?",
            sb.name,
            sb.project_path.display(),
            if args.keep_disk {
                " (keeping its disk)"
            } else {
                " and its disk"
            }
        );
        if !ui::confirm(&question) {
            return Err(CliError::new(
                Exit::Cancelled,
                "not destroyed (confirm on a terminal, or pass --force)",
            ));
        }
    }
    if sb.state == State::Running {
        crate::commands::stop::stop_sandbox(&ctx, &sb, true)?;
    }
    let backend = Some(backend_for(sb.backend));
    let inst = ctx.instance(&sb)?;
    if let Some(b) = &backend {
        b.reap(&inst);
        if !args.keep_disk {
            b.discard_disk(&inst)?;
        }
    }
    ctx.registry.update(|all| {
        let s = all
            .iter_mut()
            .find(|s| s.name == sb.name)
            .ok_or_else(|| CliError::not_found(format!("sandbox {} vanished", sb.name)))?;
        s.transition(State::Destroyed)?;
        all.retain(|s| s.name != sb.name);
        Ok::<_, CliError>(())
    })?;
    let dir = ctx.sandbox_dir(&sb);
    if args.keep_disk {
        // Keep disk/; drop keys, logs and scratch.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name() != "disk" {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        }
    } else if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    if let Some(g) = &git {
        let _ = keystone_sync::forget(g, &sb.name);
    }
    if args.keep_disk && sb.backend == keystone_registry::BackendKind::Kubernetes {
        let ns = sb
            .settings
            .kubernetes
            .as_ref()
            .map(|k| k.namespace.as_str())
            .unwrap_or("?");
        println!(
            "sandbox {} destroyed; its workspace volume claim keystone-{}-workspace is kept (namespace {ns}) and a new sandbox named {} will use it",
            sb.name, sb.name, sb.name
        );
    } else if args.keep_disk {
        println!(
            "sandbox {} destroyed; its disk is kept at {} and a new sandbox named {} will use it",
            sb.name,
            dir.join("disk").display(),
            sb.name
        );
    } else {
        println!("sandbox {} destroyed", sb.name);
    }
    Ok(0)
}
