//! `keystone agent image build|list|rm`.

use crate::cli::{Image, ProfileArg};
use crate::context::{load_config, Ctx};
use crate::error::{CliError, Result};
use crate::ui;
use keystone_config::Flag;

pub fn run(cmd: Image) -> Result<i32> {
    let ctx = Ctx::new()?;
    let store = ctx.image_store();
    match cmd {
        Image::Build { profile, update } => {
            let mut flags = Vec::new();
            if let Some(p) = profile {
                let v = if p == ProfileArg::Minimal {
                    "minimal"
                } else {
                    "full"
                };
                flags.push(Flag::new("guest.profile", "--profile", v));
            }
            let project = std::env::current_dir()
                .ok()
                .and_then(|d| keystone_sync::toplevel(&d).ok());
            let eff = load_config(project.as_deref(), flags)?;
            let recipe = crate::commands::start::recipe_for(&eff.config);
            if !update {
                if let Some(img) = store.find(&recipe)? {
                    println!(
                        "image {} is up to date ({})",
                        img.id,
                        ui::human_bytes(img.size_bytes)
                    );
                    return Ok(0);
                }
            }
            let progress = ui::Progress::new(&format!("building image {}", recipe.id()));
            let img = store.build(&recipe, &progress)?;
            progress.finish(&format!(
                "built image {} ({}) in {:.0}s",
                img.id,
                ui::human_bytes(img.size_bytes),
                img.build_seconds
            ));
            Ok(0)
        }
        Image::List { json } => {
            let images = store.list()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&images)
                        .map_err(|e| CliError::failed(e.to_string()))?
                );
                return Ok(0);
            }
            println!(
                "{:<22}  {:<8}  {:<8}  {:>10}  CREATED",
                "IMAGE", "PROFILE", "SUITE", "SIZE"
            );
            for i in images {
                println!(
                    "{:<22}  {:<8}  {:<8}  {:>10}  {} ago",
                    i.id,
                    i.profile.to_string(),
                    i.suite,
                    ui::human_bytes(i.size_bytes),
                    ui::human_duration(keystone_registry::now().saturating_sub(i.created_at))
                );
            }
            Ok(0)
        }
        Image::Rm { id } => {
            ctx.reconcile()?;
            let users: Vec<String> = ctx
                .registry
                .list()?
                .into_iter()
                .filter(|s| s.settings.image == id && s.state.is_active())
                .map(|s| s.name)
                .collect();
            if !users.is_empty() {
                return Err(CliError::state(format!(
                    "image {id} is in use by running sandbox(es) {}; stop them first",
                    users.join(", ")
                )));
            }
            let img = store.remove(&id).map_err(|e| match e {
                keystone_image::ImageError::NotFound { .. } => CliError::not_found(format!(
                    "no image {id}; `keystone agent image list` shows the images"
                )),
                other => other.into(),
            })?;
            keystone_backend::container::ContainerBackend::forget_image(&ctx.cache_dir, &id)?;
            println!("removed image {}", img.id);
            Ok(0)
        }
    }
}
