//! `keystone __supervise NAME`: the one process that owns a running
//! sandbox. Started detached by `start`; it records itself as the
//! sandbox's owner, runs the backend until stopped, and records how the
//! sandbox ended. `start` learns the outcome of start-up on a pipe
//! (`KEYSTONE_READY_FD`): one line, `ready` or `error: <message>`.

use crate::context::{backend_for, Ctx};
use crate::detached::ReadyPipe;
use crate::error::{CliError, Result};
use keystone_backend::Ended;
use keystone_registry::{ProcessId, State};

pub fn run(name: &str) -> Result<i32> {
    let mut ready_pipe = ReadyPipe::from_env();
    let result = supervise(name, &mut ready_pipe);
    if let Err(e) = &result {
        ready_pipe.failed(e);
        eprintln!("supervisor: {e}");
    }
    result
}

fn supervise(name: &str, ready_pipe: &mut ReadyPipe) -> Result<i32> {
    let ctx = Ctx::new()?;
    let me = ProcessId::current();
    let sandbox = ctx.registry.update_one(name, |sb| {
        if sb.state != State::Starting {
            return Err(CliError::state(format!(
                "sandbox {name} is {}, not starting",
                sb.state
            )));
        }
        sb.owner = me;
        Ok(sb.clone())
    })?;
    let backend = backend_for(sandbox.backend);
    let inst = ctx.instance(&sandbox)?;
    let registry = &ctx.registry;
    let mut autosync_child: Option<keystone_process::Supervised> = None;
    let mut on_ready = |running: &keystone_backend::Running| -> std::result::Result<(), String> {
        registry
            .update_one(name, |sb| {
                sb.transition(State::Running)?;
                sb.runtime = running.runtime.clone();
                sb.runtime
                    .insert("notes".into(), serde_json::json!(running.notes));
                Ok::<_, CliError>(())
            })
            .map_err(|e| e.to_string())?;
        if sandbox.settings.sync_mode != keystone_registry::SyncMode::Manual {
            // A sandbox whose automatic sync cannot run must not look as
            // if it had one: the start fails, saying why.
            autosync_child =
                Some(spawn_autosync(name).map_err(|e| format!("automatic sync: {e}"))?);
        }
        ready_pipe.ready();
        Ok(())
    };
    let ended = backend.run(&inst, &mut on_ready);
    if ended.is_err() {
        keystone_backend::fault::hold_after_failure();
    }
    // Stopped and reaped with its process group.
    drop(autosync_child.take());
    let (state, error) = match &ended {
        Ok(Ended::Stopped) => (State::Stopped, None),
        Ok(Ended::Exited(why)) => (State::Error, Some(why.clone())),
        Err(e) => (State::Error, Some(e.to_string())),
    };
    registry.update_one(name, |sb| {
        if sb.owner != me {
            return Ok::<_, CliError>(());
        }
        if state == State::Stopped && sb.state == State::Running {
            sb.transition(State::Stopping)?;
        }
        if sb.state.can_become(state) {
            sb.transition(state)?;
        } else {
            sb.state = state;
        }
        sb.owner = None;
        sb.error = error.clone();
        sb.runtime.clear();
        Ok(())
    })?;
    ended?;
    Ok(0)
}

/// The automatic sync runs beside the supervisor, as its child: it dies
/// with it (a checked death signal), so it runs exactly while the sandbox
/// runs, whether or not any CLI is open.
fn spawn_autosync(name: &str) -> std::io::Result<keystone_process::Supervised> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__autosync")
        .arg(name)
        .stdin(std::process::Stdio::null());
    keystone_process::Spawn::new("autosync", cmd)
        .start()
        .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
}
