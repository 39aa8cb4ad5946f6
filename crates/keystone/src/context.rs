//! What every handler needs: where state lives, the registry (reconciled),
//! the configuration, and how to reach a sandbox's backend and channel.

use crate::error::{CliError, Exit, Result};
use keystone_backend::{Backend, Instance};
use keystone_channel::{keys, Channel};
use keystone_config::{Effective, Flag, Inputs};
use keystone_container::ContainerBackend;
use keystone_kubernetes::KubernetesBackend;
use keystone_microvm::MicrovmBackend;
use keystone_registry::{Registry, Sandbox, State};
use std::path::{Path, PathBuf};

pub struct Ctx {
    pub registry: Registry,
    pub cache_dir: PathBuf,
    pub exe: PathBuf,
}

impl Ctx {
    pub fn new() -> Result<Ctx> {
        let state = Registry::default_dir().ok_or_else(|| {
            CliError::new(
                Exit::Requirements,
                "neither XDG_STATE_HOME nor HOME is set; set HOME",
            )
        })?;
        let cache = cache_root().ok_or_else(|| {
            CliError::new(
                Exit::Requirements,
                "neither XDG_CACHE_HOME nor HOME is set; set HOME",
            )
        })?;
        let exe = std::env::current_exe()
            .map_err(|e| CliError::failed(format!("cannot find this program's path: {e}")))?;
        Ok(Ctx {
            registry: Registry::open(&state)?,
            cache_dir: cache,
            exe,
        })
    }

    /// Reconcile the registry with reality and clean up after any
    /// supervisor that died. Every command starts with this.
    pub fn reconcile(&self) -> Result<()> {
        for reaped in self.registry.reconcile()? {
            if let Ok(inst) = self.instance(&reaped.sandbox) {
                backend_for(reaped.sandbox.backend).reap(&inst);
            }
            tracing::info!(sandbox = %reaped.sandbox.name, previous = %reaped.previous, "reconciled a sandbox whose owner died");
        }
        Ok(())
    }

    /// The sandbox named, or the current project's.
    pub fn resolve(&self, name: Option<&str>) -> Result<Sandbox> {
        self.reconcile()?;
        if let Some(n) = name {
            return Ok(self.registry.get(n)?);
        }
        let cwd = std::env::current_dir()?;
        let top = keystone_sync::toplevel(&cwd).map_err(|_| {
            CliError::not_found(format!(
                "{} is not inside a git repository, so there is no current sandbox; name one (`keystone agent list`)",
                cwd.display()
            ))
        })?;
        self.registry
            .list()?
            .into_iter()
            .find(|s| s.project_path == top)
            .ok_or_else(|| {
                CliError::not_found(format!(
                    "no sandbox for {}; start one with `keystone agent start`",
                    top.display()
                ))
            })
    }

    pub fn require_running(&self, sb: &Sandbox) -> Result<()> {
        if sb.state != State::Running {
            let hint = match sb.state {
                State::Error => format!(
                    " ({}); `keystone agent start` restarts it",
                    sb.error.as_deref().unwrap_or("error")
                ),
                State::Starting | State::Stopping => String::new(),
                _ => "; start it with `keystone agent start`".to_string(),
            };
            return Err(CliError::state(format!(
                "sandbox {} is not running (it is {}){hint}",
                sb.name, sb.state
            )));
        }
        Ok(())
    }

    pub fn sandbox_dir(&self, sb: &Sandbox) -> PathBuf {
        self.registry.sandbox_dir(&sb.name)
    }

    pub fn channel(&self, sb: &Sandbox) -> Result<Channel> {
        let dir = self.sandbox_dir(sb).join("ssh");
        Ok(Channel::new(&sb.name, &sb.id, dir, self.exe.clone())?)
    }

    pub fn instance(&self, sb: &Sandbox) -> Result<Instance> {
        let channel = self.channel(sb)?;
        let image_dir = self.cache_dir.join("images").join(&sb.settings.image);
        Ok(Instance {
            name: sb.name.clone(),
            id: sb.id.clone(),
            dir: self.sandbox_dir(sb),
            settings: sb.settings.clone(),
            project: sb.project_path.clone(),
            image_tar: image_dir.join("rootfs.tar"),
            image_id: sb.settings.image.clone(),
            guest_dir: channel.ssh_dir.join(keys::GUEST_DIR),
            socket: channel.socket.clone(),
            cache_dir: self.cache_dir.clone(),
        })
    }

    pub fn image_store(&self) -> keystone_image::ImageStore {
        keystone_image::ImageStore::new(self.cache_dir.join("images"))
    }
}

/// `$XDG_CACHE_HOME/keystone`, else `$HOME/.cache/keystone`.
pub fn cache_root() -> Option<PathBuf> {
    keystone_image::ImageStore::default_root().and_then(|p| p.parent().map(Path::to_path_buf))
}

pub fn backend_for(kind: keystone_registry::BackendKind) -> Box<dyn Backend> {
    use keystone_registry::BackendKind;
    match kind {
        BackendKind::Container => Box::new(ContainerBackend),
        BackendKind::Microvm => Box::new(MicrovmBackend),
        BackendKind::Kubernetes => Box::new(KubernetesBackend),
    }
}

/// Load the configuration for a project with command-line overrides. The
/// project file counts only as far as the user trusted it; when it does
/// not (wholly) count, one line says why and what to do.
pub fn load_config(project: Option<&Path>, flags: Vec<Flag>) -> Result<Effective> {
    let trust = match project {
        Some(dir) => trust_store()?.pinned(&dir.join(keystone_config::PROJECT_FILE))?,
        None => None,
    };
    let inputs = Inputs::from_process(project.map(Path::to_path_buf), trust, flags);
    let effective = keystone_config::load(&inputs)?;
    if let Some(notice) = effective.project.as_ref().and_then(|p| p.notice()) {
        crate::ui::warn(notice);
    }
    Ok(effective)
}

/// The user's pins of trusted project files, in keystone's state directory.
pub fn trust_store() -> Result<keystone_config::TrustStore> {
    let state = Registry::default_dir().ok_or_else(|| {
        CliError::new(
            Exit::Requirements,
            "neither XDG_STATE_HOME nor HOME is set; set HOME",
        )
    })?;
    Ok(keystone_config::TrustStore::in_state_dir(&state))
}
