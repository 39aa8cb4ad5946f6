//! `keystone agent start`: create or restart the sandbox of a project.

use crate::cli::{AgentArg, BackendArg, EgressArg, NetworkArg, ProfileArg, StartArgs, SyncModeArg};
use crate::context::{backend_for, load_config, Ctx};
use crate::credentials;
use crate::detached::{self, Verdict};
use crate::error::{CliError, Exit, Result};
use crate::session::Scripts as _;
use crate::{commands, ui};
use keystone_config::Flag;
use keystone_registry::{derive_name, validate_name, ProcessId, Sandbox, Settings, State};
use keystone_sync::Git;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How long the supervisor may take to bring the guest up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn flags(args: &StartArgs) -> Vec<Flag> {
    let mut f = Vec::new();
    if let Some(m) = args.memory {
        f.push(Flag::new("defaults.memory", "--memory", m.to_string()));
    }
    if let Some(v) = args.vcpus {
        f.push(Flag::new("defaults.vcpus", "--vcpus", v.to_string()));
    }
    if let Some(d) = args.disk {
        f.push(Flag::new("defaults.disk", "--disk", d.to_string()));
    }
    if args.no_nested {
        f.push(Flag::new("defaults.nested_virt", "--no-nested", "false"));
    }
    if let Some(n) = args.network {
        let v = match n {
            NetworkArg::Nat => "nat",
            NetworkArg::None => "none",
            NetworkArg::Bridge => "bridge",
        };
        f.push(Flag::new("defaults.network", "--network", v));
    }
    if let Some(e) = args.egress {
        let v = match e {
            EgressArg::Allowlist => "allowlist",
            EgressArg::Open => "open",
            EgressArg::None => "none",
        };
        f.push(Flag::new("egress.mode", "--egress", v));
    }
    if let Some(s) = args.sync_mode {
        let v = match s {
            SyncModeArg::Manual => "manual",
            SyncModeArg::AutoCommit => "auto-commit",
            SyncModeArg::AutoIdle => "auto-idle",
        };
        f.push(Flag::new("defaults.sync_mode", "--sync-mode", v));
    }
    if let Some(b) = args.backend {
        let v = match b {
            BackendArg::Microvm => "microvm",
            BackendArg::Container => "container",
            BackendArg::Kubernetes => "kubernetes",
        };
        f.push(Flag::new("backend.type", "--backend", v));
    }
    if args.strict {
        f.push(Flag::new("defaults.strict", "--strict", "true"));
    }
    if args.share {
        f.push(Flag::new("backend.microvm.workspace", "--share", "share"));
    }
    if let Some(p) = args.profile {
        let v = match p {
            ProfileArg::Minimal => "minimal",
            ProfileArg::Full => "full",
        };
        f.push(Flag::new("guest.profile", "--profile", v));
    }
    f
}

pub fn run(args: StartArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let path = match &args.project_path {
        Some(p) => p.clone(),
        None => std::env::current_dir()?,
    };
    if !path.exists() {
        return Err(CliError::not_found(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let project = keystone_sync::toplevel(&path)?;
    let effective = load_config(Some(&project), flags(&args))?;
    let cfg = &effective.config;
    let backend_kind = cfg.backend.kind;
    let backend = backend_for(backend_kind);
    if cfg.backend.microvm.workspace == keystone_config::WorkspaceMode::Share {
        if backend_kind != keystone_config::BackendKind::Microvm {
            return Err(CliError::state(format!(
                "--share (a live share of the project) needs the microvm backend, not {backend_kind}; \
use --backend microvm, or drop --share to work on a synced clone"
            )));
        }
        if cfg.defaults.sync_mode != keystone_config::SyncMode::Manual {
            return Err(CliError::state(format!(
                "--sync-mode {} syncs a clone, but --share works on the project itself: there is nothing to sync; \
use one or the other",
                cfg.defaults.sync_mode
            )));
        }
    }
    if let Some(n) = &args.name {
        validate_name(n).map_err(|e| CliError::state(e.to_string()))?;
    }

    let git = Git::open(&project);
    if git.has_local_changes()? {
        if cfg.defaults.strict {
            return Err(CliError::state(format!(
                "{} has uncommitted changes and strict mode is on; commit or stash them first",
                project.display()
            )));
        }
        ui::warn(format!(
            "{} has uncommitted changes; only committed work enters the sandbox",
            project.display()
        ));
    }

    ctx.reconcile()?;
    let recipe = recipe_for(cfg, &ctx.image_store());
    let agent = args.agent.map(|a| match a {
        AgentArg::Claude => keystone_image::Agent::Claude,
        AgentArg::Gemini => keystone_image::Agent::Gemini,
        AgentArg::Codex => keystone_image::Agent::Codex,
    });
    if let Some(agent) = agent {
        if !recipe.agents.iter().any(|a| a.agent == agent) {
            let why = if recipe.profile == keystone_image::Profile::Minimal {
                "the minimal profile has no agents; use --profile full".to_string()
            } else {
                format!(
                    "enable it with `[guest.agents.{agent}] enable = true` in the configuration"
                )
            };
            return Err(CliError::state(format!(
                "{agent} is not in this sandbox's image: {why}"
            )));
        }
    }
    // `--egress none` is `--network none`: nothing to fence.
    let network = match cfg.egress.mode {
        keystone_config::EgressMode::None => keystone_config::NetworkMode::None,
        _ => cfg.defaults.network,
    };
    for rule in &args.allow {
        keystone_egress::policy::parse_rule(rule)
            .map_err(|e| CliError::state(format!("--allow: {e}")))?;
    }
    let egress_spec = commands::egress::spec_from_config(cfg, &args.allow);
    egress_spec
        .compile()
        .map_err(|e| CliError::state(format!("the egress policy: {e}")))?;
    let settings = Settings {
        memory_mb: cfg.defaults.memory,
        vcpus: cfg.defaults.vcpus,
        disk_gb: cfg.defaults.disk,
        nested_virt: cfg.defaults.nested_virt,
        network,
        egress: cfg.egress.mode,
        sync_mode: cfg.defaults.sync_mode,
        persist: cfg.defaults.persist,
        image: recipe.id(),
        workspace: cfg.backend.microvm.workspace,
        share_proto: cfg.backend.microvm.share_proto,
        bridge: cfg.backend.microvm.bridge.clone(),
        multiplexer: cfg.session.multiplexer,
        kernel: (!cfg.backend.microvm.kernel.is_empty())
            .then(|| std::path::PathBuf::from(&cfg.backend.microvm.kernel)),
        initrd: (!cfg.backend.microvm.initrd.is_empty())
            .then(|| std::path::PathBuf::from(&cfg.backend.microvm.initrd)),
        kubernetes: (backend_kind == keystone_config::BackendKind::Kubernetes)
            .then(|| kube_settings(cfg, &recipe.id())),
    };

    // Claim the sandbox: one `start` wins, any other sees `starting`.
    // `--fresh` on a running sandbox stops it and claims it again.
    let (sandbox, created, _) = loop {
        let claimed = claim(&ctx, &args, &project, backend_kind, &settings)?;
        if claimed.2 != State::Running {
            break claimed;
        }
        ui::note(format!("stopping {} to start it fresh", claimed.0.name));
        commands::stop::stop_sandbox(&ctx, &claimed.0, false)?;
    };

    // From here on a failure must leave no half-made sandbox.
    let result = commands::egress::prepare(&ctx, &sandbox, &egress_spec)
        .and_then(|()| keep_disk_image(&ctx, sandbox.clone(), &recipe, args.fresh))
        .and_then(|sb| bring_up(&ctx, &*backend, &sb, &recipe, &git, args.fresh));
    // The credentials and env files, then the agent: it must start with
    // them. All of it is part of start: a failure undoes the sandbox.
    let result = result.and_then(|sb| {
        let channel = ctx.channel(&sb)?;
        // Real values to the egress point, placeholders and the CA that
        // signs the intercepted hosts' certificates to the guest.
        let (plan, ca) = credentials::deliver(&ctx, &sb, cfg, &project, false)?;
        let trust = crate::guest_trust::install(&channel, ca.as_deref(), cfg.guest.trust_host_cas)?;
        let mut extra = guest_proxy_env(&sb);
        extra.extend(trust.env.iter().cloned());
        credentials::write_to_guest(&channel, &plan.exported, &extra)?;
        // On the live share the env files are already there.
        let env_files = if sb.settings.is_share() {
            Vec::new()
        } else {
            let replace = credentials::env_file_replacements(
                &cfg.guest.forward_env,
                &credentials::placeholders_file(&ctx, &sb),
            );
            keystone_sync::env_files::copy(&project, &cfg.defaults.env_files, &channel, &replace)?
        };
        if let Some(agent) = agent {
            start_agent(&channel, &sb, agent)?;
        }
        Ok((sb, plan, trust, env_files))
    });
    let (sandbox, plan, trust, env_files) = match result {
        Ok(done) => done,
        Err(e) => {
            rollback(&ctx, &*backend, &sandbox, created, &e);
            return Err(e);
        }
    };

    let notes = sandbox
        .runtime
        .get("notes")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    println!(
        "sandbox {} is running ({} backend)\n  project:   {}\n  memory:    {} MB\n  vCPUs:     {}\n  network:   {}\n  sync mode: {}",
        sandbox.name,
        sandbox.backend,
        sandbox.project_path.display(),
        sandbox.settings.memory_mb,
        sandbox.settings.vcpus,
        sandbox.settings.network,
        sandbox.settings.sync_mode,
    );
    println!("  egress:    {}", commands::egress::mode_line(&sandbox));
    if sandbox.settings.is_share() {
        println!(
            "  workspace: {} shared live at /workspace ({}); nothing to sync",
            sandbox.project_path.display(),
            sandbox.settings.share_proto
        );
    }
    let forwarded = plan.forwarded();
    println!(
        "  credentials: {}",
        if forwarded.is_empty() {
            "none forwarded (see `keystone agent tokens`)".to_string()
        } else {
            format!(
                "{} (placeholders inside; the egress point injects the real values)",
                forwarded.join(", ")
            )
        }
    );
    for n in &plan.notes {
        println!("    {n}");
    }
    if !trust.summary.is_empty() {
        println!("  trust:     {}", trust.summary);
    }
    if !env_files.is_empty() {
        println!(
            "  env files: {} (loaded by direnv in /workspace)",
            env_files.join(", ")
        );
    }
    if let Some(agent) = agent {
        println!(
            "  agent:     {agent} in session {}",
            crate::session::name(&sandbox, "main")
        );
    }
    for n in notes.iter().filter_map(|n| n.as_str()) {
        println!("  {n}");
    }
    if cfg.proxy.enable {
        // The proxy is a convenience: a sandbox without it still works.
        match commands::proxy::ensure(&ctx, &cfg.proxy) {
            Ok(()) => println!(
                "  dev servers: {} (any port a process listens on inside is picked up)",
                keystone_proxy::route::url(&sandbox.name, None, &cfg.proxy.domain, cfg.proxy.port)
            ),
            Err(e) => ui::warn(format!("the dev-server proxy is not running: {e}")),
        }
    }
    if args.no_attach || !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        if !args.no_attach {
            ui::note("not attaching: standard input/output is not a terminal");
        }
        println!(
            "attach with `keystone agent attach {}`; run commands with `keystone agent exec {} -- CMD`",
            sandbox.name, sandbox.name
        );
        return Ok(0);
    }
    commands::attach::attach_session(&ctx, &sandbox, "main")
}

/// `[backend.kubernetes]` for a sandbox; without an image reference, the
/// one `image build --format oci` names the local image by (for a cluster
/// into which it was imported, or a registry it was pushed to).
/// Claim the sandbox in the registry (create it, or move it to
/// `starting`): the sandbox, whether it was created, and its state before.
fn claim(
    ctx: &Ctx,
    args: &StartArgs,
    project: &std::path::Path,
    backend_kind: keystone_config::BackendKind,
    settings: &Settings,
) -> Result<(Sandbox, bool, State)> {
    let me = ProcessId::current();
    ctx.registry.update(|all| -> Result<_> {
        let existing = match &args.name {
            Some(n) => all.iter().position(|s| &s.name == n),
            None => all.iter().position(|s| s.project_path == project),
        };
        let (idx, created) = match existing {
            Some(i) => {
                if all[i].project_path != project {
                    return Err(CliError::state(format!(
                        "the name {} is taken by the sandbox of {}; pick another --name",
                        all[i].name,
                        all[i].project_path.display()
                    )));
                }
                (i, false)
            }
            None => {
                let taken: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
                let name = args.name.clone().unwrap_or_else(|| derive_name(project, &taken));
                all.push(Sandbox::new(name, project.to_path_buf(), backend_kind, settings.clone()));
                (all.len() - 1, true)
            }
        };
        let sb = &mut all[idx];
        let previous = sb.state;
        match sb.state {
            State::Running if args.fresh => {}
            State::Running => {
                return Err(CliError::state(format!(
                    "sandbox {} is already running; attach with `keystone agent attach {}` (or restart it with --fresh)",
                    sb.name, sb.name
                )))
            }
            State::Starting | State::Stopping => {
                return Err(CliError::state(format!(
                    "sandbox {} is {} (pid {}); wait for it, or check `keystone agent status {}`",
                    sb.name,
                    sb.state,
                    sb.owner.map(|o| o.pid).unwrap_or(0),
                    sb.name
                )))
            }
            _ => {
                if sb.backend != backend_kind {
                    if !args.fresh {
                        return Err(CliError::state(format!(
                            "sandbox {} uses the {} backend; pass --fresh to recreate it on {backend_kind}",
                            sb.name, sb.backend
                        )));
                    }
                    sb.backend = backend_kind;
                }
                sb.transition(State::Starting)?;
                sb.owner = me;
                sb.settings = settings.clone();
            }
        }
        Ok((sb.clone(), created, previous))
    })
}

/// The proxy variables every guest shell gets with the allowlist, for
/// the tools that honour them (the rest are captured transparently).
fn guest_proxy_env(sb: &Sandbox) -> Vec<(String, String)> {
    if !commands::egress::enforced(sb) {
        return Vec::new();
    }
    let url = format!(
        "http://{}:{}",
        keystone_egress::GATEWAY,
        keystone_egress::PROXY_PORT
    );
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    [
        ("HTTP_PROXY", &url),
        ("HTTPS_PROXY", &url),
        ("http_proxy", &url),
        ("https_proxy", &url),
        ("NO_PROXY", &no_proxy),
        ("no_proxy", &no_proxy),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect()
}

fn kube_settings(cfg: &keystone_config::Config, image_id: &str) -> keystone_registry::KubeSettings {
    let k = &cfg.backend.kubernetes;
    let pull_policy = match k.pull_policy {
        keystone_config::PullPolicy::Always => "Always",
        keystone_config::PullPolicy::Never => "Never",
        keystone_config::PullPolicy::IfNotPresent => "IfNotPresent",
    };
    keystone_registry::KubeSettings {
        context: k.context.clone(),
        namespace: k.namespace.clone(),
        storage_class: k.storage_class.clone(),
        image: if k.image.is_empty() {
            keystone_image::oci::default_reference(image_id)
        } else {
            k.image.clone()
        },
        pull_policy: pull_policy.to_string(),
    }
}

/// The image recipe for a configuration: the enabled agents at the
/// versions `image build --update` recorded, else the recipe's pins. The
/// minimal profile never carries agents (it has no Node.js).
/// Starts `agent` in `/workspace` in the main session (a new window when
/// the session already runs), so that attaching lands in it. When the agent
/// exits, the window keeps a shell.
fn start_agent(
    channel: &keystone_channel::Channel,
    sandbox: &Sandbox,
    agent: keystone_image::Agent,
) -> Result<()> {
    let session = crate::session::name(sandbox, "main");
    let command = format!("{}; exec bash", agent.command());
    let script = crate::session::of(sandbox).run_in_script(&session, "/workspace", &command);
    channel
        .run_ok(
            &script,
            &keystone_channel::ExecOptions {
                user: Some("agent".into()),
                ..Default::default()
            },
        )
        .map_err(|e| CliError::failed(format!("cannot start {agent} in session {session}: {e}")))?;
    Ok(())
}

pub fn recipe_for(
    cfg: &keystone_config::Config,
    store: &keystone_image::ImageStore,
) -> keystone_image::Recipe {
    let profile = match cfg.guest.profile {
        keystone_config::Profile::Minimal => keystone_image::Profile::Minimal,
        keystone_config::Profile::Full => keystone_image::Profile::Full,
    };
    let agents = if profile == keystone_image::Profile::Full {
        let recorded = store.agent_versions();
        cfg.guest
            .agents
            .enabled()
            .into_iter()
            .filter_map(|kind| {
                let agent = keystone_image::Agent::from_name(&kind.to_string())?;
                let auto_accept = cfg.guest.agents.get(kind).auto_accept;
                let version = recorded
                    .get(&agent)
                    .cloned()
                    .unwrap_or_else(|| agent.pinned_version().to_string());
                Some(keystone_image::AgentSetup {
                    agent,
                    version,
                    auto_accept,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    keystone_image::Recipe {
        profile,
        suite: cfg.guest.suite.clone(),
        mirror: cfg.guest.mirror.clone(),
        extra_packages: cfg.guest.packages.clone(),
        agents,
        // Debian has no Zellij: it is built from crates.io, and only
        // for the sandboxes that use it.
        zellij: (cfg.session.multiplexer == keystone_config::Multiplexer::Zellij)
            .then(|| keystone_image::tools::ZELLIJ_VERSION.to_string()),
        zellij_binary: None,
    }
}

/// A disk kept from before (a stopped sandbox's, or one kept by `destroy
/// --keep-disk`) is a layer over the image it was made on: the sandbox
/// stays on that image until `--fresh`, whatever the configuration gives
/// today (see `keystone_backend::disk`).
fn keep_disk_image(
    ctx: &Ctx,
    sandbox: Sandbox,
    recipe: &keystone_image::Recipe,
    fresh: bool,
) -> Result<Sandbox> {
    let Some(base) = keystone_backend::disk::read(&ctx.sandbox_dir(&sandbox)) else {
        return Ok(sandbox);
    };
    if fresh || base.image == sandbox.settings.image {
        return Ok(sandbox);
    }
    ui::note(format!(
        "sandbox {name} keeps image {old}, which its disk is built on; the configuration now \
         gives image {new}: `keystone agent sync` then `keystone agent start --fresh {name}` moves it there",
        name = sandbox.name,
        old = base.image,
        new = recipe.id()
    ));
    ctx.registry.update_one(&sandbox.name, |sb| {
        sb.settings.image = base.image.clone();
        Ok::<_, CliError>(sb.clone())
    })
}

fn bring_up(
    ctx: &Ctx,
    backend: &dyn keystone_backend::Backend,
    sandbox: &keystone_registry::Sandbox,
    recipe: &keystone_image::Recipe,
    git: &Git,
    fresh: bool,
) -> Result<keystone_registry::Sandbox> {
    let store = ctx.image_store();
    if sandbox.settings.image != recipe.id() {
        // Kept for the sandbox's disk; `image rm` refuses to remove it.
        if !store.list()?.iter().any(|i| i.id == sandbox.settings.image) {
            return Err(CliError::state(format!(
                "the disk of sandbox {name} is built on image {old}, which is no longer in the image store; \
                 `keystone agent start --fresh {name}` discards that disk and starts on image {new}",
                name = sandbox.name,
                old = sandbox.settings.image,
                new = recipe.id()
            )));
        }
    } else if store.find(recipe)?.is_none() {
        let progress = ui::Progress::new(&format!(
            "building guest image {} (first start only)",
            recipe.id()
        ));
        let img = store.ensure(recipe, &progress)?;
        progress.finish(&format!(
            "built image {} ({}) in {:.0}s",
            img.id,
            ui::human_bytes(img.size_bytes),
            img.build_seconds
        ));
    }
    let channel = ctx.channel(sandbox)?;
    keystone_channel::keys::ensure(&channel.ssh_dir, &channel.alias)?;
    let inst = ctx.instance(sandbox)?;
    std::fs::create_dir_all(inst.log_dir())?;
    if fresh {
        backend.discard_disk(&inst)?;
        ctx.registry.update_one(&sandbox.name, |sb| {
            sb.workspace_ready = false;
            Ok::<_, CliError>(())
        })?;
    }
    {
        let progress = ui::Progress::new("preparing the sandbox");
        backend.prepare(&inst, &mut |m| progress.phase(m))?;
    }
    spawn_supervisor(ctx, sandbox)?;
    let sb = ctx.registry.get(&sandbox.name)?;
    // The live share is the project itself: nothing to push.
    if !sb.workspace_ready && !sb.settings.is_share() {
        let t = Instant::now();
        keystone_sync::push_initial(git, &channel)?;
        if let Some(line) = keystone_sync::submodules::push_initial(git, &channel)? {
            ui::warn(&line);
        }
        tracing::info!(elapsed = ?t.elapsed(), "pushed the repository into /workspace");
        ctx.registry.update_one(&sandbox.name, |sb| {
            sb.workspace_ready = true;
            Ok::<_, CliError>(())
        })?;
    }
    Ok(ctx.registry.get(&sandbox.name)?)
}

/// Start the supervisor detached and wait for its verdict.
fn spawn_supervisor(ctx: &Ctx, sandbox: &keystone_registry::Sandbox) -> Result<()> {
    let dir = ctx.sandbox_dir(sandbox);
    let log_path = dir.join("logs/supervisor.log");
    let progress = ui::Progress::new(&format!("starting sandbox {}", sandbox.name));
    let verdict = detached::spawn(
        &ctx.exe,
        &[std::ffi::OsStr::new("__supervise"), sandbox.name.as_ref()],
        &log_path,
        READY_TIMEOUT,
    )
    .map_err(|e| CliError::failed(format!("cannot start the supervisor: {e}")))?;
    drop(progress);
    match verdict {
        Verdict::Ready => Ok(()),
        Verdict::Silent => Err(CliError::failed(format!(
            "the supervisor exited without starting the sandbox; see {}",
            log_path.display()
        ))),
        Verdict::Failed(why) => Err(CliError::failed(format!(
            "{why}{}",
            log_tail(&dir.join("logs"))
        ))),
        Verdict::TimedOut => Err(CliError::failed(format!(
            "the sandbox did not come up within {}s; see {}",
            READY_TIMEOUT.as_secs(),
            dir.join("logs").display()
        ))),
    }
}

fn rollback(
    ctx: &Ctx,
    backend: &dyn keystone_backend::Backend,
    sandbox: &keystone_registry::Sandbox,
    created: bool,
    err: &CliError,
) {
    // Stop whatever came up, then undo the record.
    if let Ok(sb) = ctx.registry.get(&sandbox.name) {
        if sb.state == State::Running {
            let _ = crate::commands::stop::stop_sandbox(ctx, &sb, true);
        } else if let Some(owner) = sb.owner.filter(|o| Some(*o) != ProcessId::current()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(owner.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Ok(inst) = ctx.instance(sandbox) {
        backend.reap(&inst);
    }
    if created {
        let dir = ctx.sandbox_dir(sandbox);
        if let Ok(inst) = ctx.instance(sandbox) {
            let _ = backend.discard_disk(&inst);
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = ctx.registry.update(|all| {
            all.retain(|s| s.name != sandbox.name);
            Ok::<_, CliError>(())
        });
    } else {
        let _ = ctx.registry.update_one(&sandbox.name, |sb| {
            sb.state = State::Error;
            sb.owner = None;
            sb.error = Some(
                err.message
                    .lines()
                    .next()
                    .unwrap_or("start failed")
                    .to_string(),
            );
            Ok::<_, CliError>(())
        });
    }
    let _ = Exit::Failed;
}

/// The last lines of the sandbox's logs, for an error message (the logs
/// themselves go away with a sandbox whose first start failed).
fn log_tail(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for name in ["container.log", "qemu.log", "boot.log", "supervisor.log"] {
        let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("\n--- last lines of {name}:"));
        for l in &lines[lines.len().saturating_sub(8)..] {
            out.push_str("\n  ");
            out.push_str(l);
        }
    }
    out
}
