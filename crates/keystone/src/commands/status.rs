//! `keystone agent status` and `keystone agent list`.

use crate::cli::{ListArgs, StatusArgs};
use crate::context::{backend_for, Ctx};
use crate::error::{CliError, Result};
use crate::ui;
use keystone_registry::{Sandbox, State};
use serde::Serialize;

/// One sandbox as scripts read it (`--json`); the same shape on every
/// backend.
#[derive(Serialize)]
pub struct StatusView {
    pub name: String,
    pub id: String,
    pub state: State,
    pub backend: String,
    pub project: String,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub uptime_seconds: Option<u64>,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub network: String,
    /// What the sandbox may reach, and the latest refusals.
    pub egress: EgressView,
    /// The host bridge, with `network = "bridge"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// "clone" (pushed and synced) or "share" (the project itself, live).
    pub workspace: String,
    pub sync_mode: String,
    pub image: String,
    pub memory_used_bytes: Option<u64>,
    pub disk_used_bytes: Option<u64>,
    pub ssh: Option<String>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    pub last_sync: Option<keystone_registry::SyncRecord>,
    pub pending_commits: Option<u64>,
    /// Dev servers listening inside, with their URLs through the proxy
    /// and whether each answered just now.
    pub dev_servers: Vec<crate::commands::proxy::DevServer>,
    pub worktrees: Vec<String>,
}

/// `status`'s egress part.
#[derive(Serialize)]
pub struct EgressView {
    /// allowlist, open or none.
    pub mode: String,
    /// Whether keystone's egress point fences the sandbox (the allowlist
    /// on a nat network, on a backend that enforces it).
    pub enforced: bool,
    /// What `mode` means here, in words.
    pub summary: String,
    /// The latest refusals, oldest first.
    pub denials: Vec<keystone_egress::log::Event>,
}

pub fn view(ctx: &Ctx, sb: &Sandbox) -> StatusView {
    let usage = match ctx.instance(sb) {
        Ok(inst) => Some(backend_for(sb.backend).usage(&inst, &sb.runtime)),
        _ => None,
    };
    let ssh = ctx
        .channel(sb)
        .ok()
        .filter(|_| sb.state == State::Running)
        .map(|c| format!("ssh -F {} {}", c.config_path().display(), c.alias));
    let pending = sb.project_path.exists().then(|| {
        keystone_sync::unsynced(&keystone_sync::Git::open(&sb.project_path), &sb.name)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    });
    StatusView {
        name: sb.name.clone(),
        id: sb.id.clone(),
        state: sb.state,
        backend: sb.backend.to_string(),
        project: sb.project_path.display().to_string(),
        created_at: sb.created_at,
        started_at: sb.started_at,
        uptime_seconds: sb.uptime(),
        memory_mb: sb.settings.memory_mb,
        vcpus: sb.settings.vcpus,
        network: sb.settings.network.to_string(),
        egress: EgressView {
            mode: if sb.settings.network == keystone_registry::NetworkMode::None {
                "none".to_string()
            } else {
                sb.settings.egress.to_string()
            },
            enforced: crate::commands::egress::enforced(sb),
            summary: crate::commands::egress::mode_line(sb),
            denials: crate::commands::egress::latest_denials(ctx, sb, 5),
        },
        bridge: (sb.settings.network == keystone_registry::NetworkMode::Bridge)
            .then(|| sb.settings.bridge.clone()),
        workspace: sb.settings.workspace.to_string(),
        sync_mode: sb.settings.sync_mode.to_string(),
        image: sb.settings.image.clone(),
        memory_used_bytes: usage
            .as_ref()
            .and_then(|u| u.memory_bytes)
            .filter(|_| sb.state == State::Running),
        disk_used_bytes: usage.as_ref().and_then(|u| u.disk_bytes),
        ssh,
        notes: sb
            .runtime
            .get("notes")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default(),
        error: sb.error.clone(),
        last_sync: sb.last_sync.clone(),
        pending_commits: pending,
        dev_servers: match keystone_proxy::state::read(ctx.registry.root()) {
            Some(snap) if sb.state == State::Running => {
                crate::commands::proxy::dev_servers(&snap, &sb.name)
            }
            _ => Vec::new(),
        },
        worktrees: if sb.workspace_ready {
            vec!["main /workspace".into()]
        } else {
            Vec::new()
        },
    }
}

fn print_view(v: &StatusView) {
    println!("sandbox:   {}", v.name);
    println!("state:     {}", v.state);
    if let Some(e) = &v.error {
        println!("error:     {}", ui::escape_controls(e));
    }
    println!("backend:   {}", v.backend);
    println!("project:   {}", v.project);
    if let Some(u) = v.uptime_seconds {
        println!("uptime:    {}", ui::human_duration(u));
    }
    let mem_used = v
        .memory_used_bytes
        .map(|b| format!(" ({} used)", ui::human_bytes(b)))
        .unwrap_or_default();
    println!("memory:    {} MB{mem_used}", v.memory_mb);
    println!("vCPUs:     {}", v.vcpus);
    if let Some(d) = v.disk_used_bytes {
        println!("disk:      {} used", ui::human_bytes(d));
    }
    match &v.bridge {
        Some(b) => println!("network:   bridge {b}"),
        None => println!("network:   {}", v.network),
    }
    println!("egress:    {}", v.egress.summary);
    for d in &v.egress.denials {
        println!(
            "  denied:  {} {}:{} ({}) at {}",
            d.proto,
            ui::escape_controls(&d.host),
            d.port,
            ui::escape_controls(&d.rule),
            d.time
        );
    }
    if !v.egress.denials.is_empty() {
        println!(
            "  (`keystone agent allow {} HOST` allows one; `keystone agent egress log` shows all)",
            v.name
        );
    }
    if v.workspace == "share" {
        println!("workspace: {} shared live (nothing to sync)", v.project);
    }
    println!("sync mode: {}", v.sync_mode);
    println!("image:     {}", v.image);
    if let Some(s) = &v.ssh {
        println!("ssh:       {s}");
    }
    for w in &v.worktrees {
        println!("worktree:  {w}");
    }
    for d in &v.dev_servers {
        crate::commands::proxy::print_dev_server(d);
    }
    match &v.last_sync {
        Some(s) => println!(
            "last sync: {} ago: {}",
            ui::human_duration(keystone_registry::now().saturating_sub(s.at)),
            s.outcome
        ),
        None => println!("last sync: never"),
    }
    if let Some(p) = v.pending_commits {
        println!("unsynced:  {p} commit(s) known in the sandbox and on no host branch");
    }
    for n in &v.notes {
        println!("note:      {n}");
    }
}

pub fn status(args: StatusArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sandboxes = if args.all {
        ctx.reconcile()?;
        ctx.registry.list()?
    } else {
        vec![ctx.resolve(args.sandbox.as_deref())?]
    };
    let views: Vec<StatusView> = sandboxes.iter().map(|s| view(&ctx, s)).collect();
    if args.json {
        let out = if args.all {
            serde_json::to_string_pretty(&views)
        } else {
            serde_json::to_string_pretty(&views[0])
        };
        println!("{}", out.map_err(|e| CliError::failed(e.to_string()))?);
    } else {
        for (i, v) in views.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_view(v);
        }
        if views.is_empty() {
            println!("no sandboxes");
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct ListRow {
    name: String,
    state: State,
    backend: String,
    uptime_seconds: Option<u64>,
    project: String,
}

pub fn list(args: ListArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let filter = match &args.state {
        Some(s) => Some(s.parse::<State>().map_err(CliError::state)?),
        None => None,
    };
    ctx.reconcile()?;
    let rows: Vec<ListRow> = ctx
        .registry
        .list()?
        .into_iter()
        .filter(|s| filter.is_none_or(|f| s.state == f))
        .map(|s| ListRow {
            uptime_seconds: s.uptime(),
            name: s.name,
            state: s.state,
            backend: s.backend.to_string(),
            project: s.project_path.display().to_string(),
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| CliError::failed(e.to_string()))?
        );
        return Ok(0);
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(7);
    println!(
        "{:<w$}  {:<9}  {:<10}  {:<8}  PROJECT",
        "SANDBOX", "STATE", "BACKEND", "UPTIME"
    );
    for r in rows {
        println!(
            "{:<w$}  {:<9}  {:<10}  {:<8}  {}",
            r.name,
            r.state.as_str(),
            r.backend,
            r.uptime_seconds
                .map(ui::human_duration)
                .unwrap_or_else(|| "-".into()),
            r.project
        );
    }
    Ok(0)
}
