//! `keystone agent image build|list|rm`.

use crate::cli::{Image, ImageFormatArg, ProfileArg};
use crate::context::{load_config, Ctx};
use crate::error::{CliError, Result};
use crate::ui;
use keystone_config::Flag;
use keystone_image::oci;

fn profile_flags(profile: Option<ProfileArg>) -> Vec<Flag> {
    profile
        .map(|p| {
            let v = if p == ProfileArg::Minimal {
                "minimal"
            } else {
                "full"
            };
            vec![Flag::new("guest.profile", "--profile", v)]
        })
        .unwrap_or_default()
}

fn current_project() -> Option<std::path::PathBuf> {
    std::env::current_dir()
        .ok()
        .and_then(|d| keystone_sync::toplevel(&d).ok())
}

pub fn run(cmd: Image) -> Result<i32> {
    let ctx = Ctx::new()?;
    let store = ctx.image_store();
    match cmd {
        Image::Build {
            profile,
            update,
            format,
            reference,
        } => {
            let eff = load_config(current_project().as_deref(), profile_flags(profile))?;
            if update {
                update_agent_versions(&store, &eff.config)?;
            }
            let recipe = crate::commands::start::recipe_for(&eff.config, &store);
            let img = match store.find(&recipe)? {
                Some(img) if !update => {
                    println!(
                        "image {} is up to date ({})",
                        img.id,
                        ui::human_bytes(img.size_bytes)
                    );
                    img
                }
                _ => {
                    let progress = ui::Progress::new(&format!("building image {}", recipe.id()));
                    let img = store.build(&recipe, &progress)?;
                    progress.finish(&format!(
                        "built image {} ({}) in {:.0}s",
                        img.id,
                        ui::human_bytes(img.size_bytes),
                        img.build_seconds
                    ));
                    img
                }
            };
            if format == Some(ImageFormatArg::Oci) {
                let reference = reference.unwrap_or_else(|| oci::default_reference(&img.id));
                let progress = ui::Progress::new("exporting the OCI image archive");
                let path = oci::export(&img, &reference)?;
                drop(progress);
                println!("OCI image archive: {} ({reference})", path.display());
            }
            Ok(0)
        }
        Image::Push {
            reference,
            profile,
            insecure,
        } => {
            if keystone_channel::which("skopeo").is_none() {
                return Err(CliError::new(
                    crate::error::Exit::Requirements,
                    "`skopeo` is not installed (it pushes the image): apt-get install skopeo",
                ));
            }
            let eff = load_config(current_project().as_deref(), profile_flags(profile))?;
            let recipe = crate::commands::start::recipe_for(&eff.config, &store);
            let img = store.find(&recipe)?.ok_or_else(|| {
                CliError::not_found(format!(
                    "image {} is not built; run `keystone agent image build` first",
                    recipe.id()
                ))
            })?;
            let progress = ui::Progress::new(&format!("pushing image {} to {reference}", img.id));
            let archive = oci::export(&img, &oci::default_reference(&img.id))?;
            oci::push(&archive, &reference, !insecure)?;
            drop(progress);
            println!(
                "pushed image {} to {reference}; use it with `[backend.kubernetes] image = \"{reference}\"`",
                img.id
            );
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
            // A stopped sandbox's disk (or one kept by `destroy
            // --keep-disk`) is a layer over the image: without it the disk
            // is lost, and a rebuild of the same id is not the same base.
            let disks =
                keystone_backend::disk::built_on(&ctx.registry.root().join("sandboxes"), &id);
            if !disks.is_empty() {
                return Err(CliError::state(format!(
                    "image {id} holds the disks of sandbox(es) {}, which are layers over it; \
                     `keystone agent destroy` them (after `sync`), or `start --fresh` them onto the current image, first",
                    disks.join(", ")
                )));
            }
            let img = store.remove(&id).map_err(|e| match e {
                keystone_image::ImageError::NotFound { .. } => CliError::not_found(format!(
                    "no image {id}; `keystone agent image list` shows the images"
                )),
                other => other.into(),
            })?;
            keystone_container::ContainerBackend::forget_image(&ctx.cache_dir, &id)?;
            keystone_microvm::MicrovmBackend::forget_image(&ctx.cache_dir, &id)?;
            println!("removed image {}", img.id);
            Ok(0)
        }
    }
}

/// `--update`: ask the npm registry for each enabled agent's latest version
/// and record it, so this build and every later `start` use it (a cached
/// start never asks the network). Without `--update` the recipe's pins, or
/// the versions the last update recorded, apply.
fn update_agent_versions(
    store: &keystone_image::ImageStore,
    cfg: &keystone_config::Config,
) -> Result<()> {
    let mut versions = store.agent_versions();
    for kind in cfg.guest.agents.enabled() {
        let Some(agent) = keystone_image::Agent::from_name(&kind.to_string()) else {
            continue;
        };
        let latest = npm_latest(agent.package())?;
        let before = versions
            .get(&agent)
            .cloned()
            .unwrap_or_else(|| agent.pinned_version().to_string());
        if latest != before {
            println!("{agent}: {before} -> {latest}");
        } else {
            println!("{agent}: {latest} (up to date)");
        }
        versions.insert(agent, latest);
    }
    store.save_agent_versions(&versions)?;
    Ok(())
}

/// The `latest` dist-tag of an npm package, from the registry's metadata
/// endpoint, with the system curl (cleared environment but for proxies).
fn npm_latest(package: &str) -> Result<String> {
    let registry = std::env::var("npm_config_registry")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "https://registry.npmjs.org".to_string());
    let url = format!(
        "{}/{}/latest",
        registry.trim_end_matches('/'),
        package.replace('/', "%2f")
    );
    let curl = keystone_channel::which("curl").ok_or_else(|| {
        CliError::new(
            crate::error::Exit::Requirements,
            "`curl` is not installed (needed by --update): apt-get install curl",
        )
    })?;
    let mut cmd = std::process::Command::new(curl);
    cmd.env_clear();
    for k in [
        "PATH",
        "HOME",
        "https_proxy",
        "HTTPS_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let out = cmd
        .args(["-fsSL", "--max-time", "30", &url])
        .output()
        .map_err(|e| CliError::failed(format!("cannot run curl: {e}")))?;
    if !out.status.success() {
        return Err(CliError::failed(format!(
            "cannot ask the npm registry for {package}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        CliError::failed(format!(
            "the npm registry answered {url} with something that is not JSON: {e}"
        ))
    })?;
    meta.get("version")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            CliError::failed(format!(
                "the npm registry's answer for {package} has no version"
            ))
        })
}
