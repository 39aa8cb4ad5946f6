//! `keystone agent trust [--show|--revoke]`: pin the project file's current
//! content, so that commands honour it (see `keystone_config::trust`).
//!
//! Running the command is the consent, as with `direnv allow`: it shows
//! what it pins (the text, control characters escaped, and the keys a
//! project file may never set), checks that the file is valid, and pins
//! its hash. A later change of the file, through sync or otherwise,
//! undoes the trust until it is run again.

use crate::cli::TrustArgs;
use crate::context::trust_store;
use crate::error::{CliError, Exit, Result};
use crate::ui;
use keystone_config::trust;
use keystone_config::{Inputs, ProjectStatus, PROJECT_FILE};

pub fn run(args: TrustArgs) -> Result<i32> {
    let start = match args.project_path {
        Some(p) => p,
        None => std::env::current_dir()?,
    };
    let top = keystone_sync::toplevel(&start).map_err(|_| {
        CliError::not_found(format!(
            "{} is not inside a git repository, so it has no project file",
            start.display()
        ))
    })?;
    let path = top.join(PROJECT_FILE);
    let store = trust_store()?;
    if args.revoke {
        if store.revoke(&path)? {
            println!("{}: no longer trusted; commands ignore it", path.display());
        } else {
            println!("{}: was not trusted", path.display());
        }
        return Ok(0);
    }
    let file = match trust::read_project_file(&path) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(CliError::not_found(format!(
                "there is no project file {}",
                path.display()
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let pinned = store.pinned(&path)?;
    let state = match &pinned {
        Some(h) if *h == file.hash => "trusted",
        Some(_) => "changed since you trusted it",
        None => "not trusted",
    };
    println!("{} ({state}; sha256 {}):", path.display(), file.hash);
    for line in file.text.lines() {
        println!("  | {}", ui::escape_controls(line));
    }
    // Load it as trusted, to refuse an invalid file and name the keys that
    // would be ignored, before pinning anything.
    let mut inputs = Inputs::from_process(Some(top.clone()), Some(file.hash.clone()), Vec::new());
    inputs.user_file = None;
    let checked = keystone_config::load(&inputs).map_err(|e| {
        CliError::new(
            Exit::Failed,
            format!("not trusting an invalid project file: {e}"),
        )
    })?;
    if let Some(ProjectStatus::Trusted { ignored_keys, .. }) = &checked.project {
        for key in ignored_keys {
            ui::warn(format!(
                "{key} is ignored even when trusted: {} (set it in your own config file)",
                trust::host_only(key).unwrap_or("host-only")
            ));
        }
    }
    if args.show {
        return Ok(0);
    }
    store.pin(&file)?;
    println!(
        "trusted: commands in {} now apply it (until it changes)",
        top.display()
    );
    Ok(0)
}
