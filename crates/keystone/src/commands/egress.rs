//! The CLI's side of the egress policy: the policy file each sandbox's
//! egress point reads, and `allow`, `deny` and `egress log`.
//!
//! Three files in the sandbox's `egress/` directory, all host-side and
//! written only here: `base.json`, the policy the configuration gave at
//! the last start; `changes.json`, what `allow`/`deny` added since (kept
//! across restarts); `policy.json`, the two merged, which is what the
//! egress point enforces. A change rewrites `policy.json` and, when the
//! sandbox runs, asks its egress point to reload it and waits for the
//! answer, so the command returns once the change is in effect.

use crate::cli::{EgressLogArgs, PolicyChangeArgs};
use crate::context::Ctx;
use crate::error::{CliError, Result};
use keystone_backend::egress::{paths, Paths};
use keystone_config::{AgentKind, Config, Profile};
use keystone_egress::policy::Spec;
use keystone_registry::{Sandbox, State};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// What `allow` and `deny` added to a sandbox's policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Changes {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// The policy the configuration gives, with `extra` rules from `--allow`.
pub fn spec_from_config(cfg: &Config, extra: &[String]) -> Spec {
    let agents = &cfg.guest.agents;
    let enabled = |a: AgentKind| {
        cfg.guest.profile == Profile::Full
            && match a {
                AgentKind::Claude => agents.claude.enable,
                AgentKind::Gemini => agents.gemini.enable,
                AgentKind::Codex => agents.codex.enable,
            }
    };
    let mut presets = Vec::new();
    for p in &cfg.egress.presets {
        if p == "agents" {
            presets.extend(
                AgentKind::ALL
                    .iter()
                    .filter(|a| enabled(**a))
                    .map(|a| a.as_str().to_string()),
            );
        } else {
            presets.push(p.clone());
        }
    }
    presets.dedup();
    Spec {
        presets,
        allow: cfg.egress.allow.iter().chain(extra).cloned().collect(),
        deny: cfg.egress.deny.clone(),
        host_services: cfg.egress.host_services.clone(),
        resolver: (!cfg.egress.resolver.is_empty()).then(|| cfg.egress.resolver.clone()),
    }
}

/// At start: record the configuration's policy and write the merged one
/// the egress point will read. Checked here, so a bad rule fails the
/// start before anything is made.
pub fn prepare(ctx: &Ctx, sb: &Sandbox, base: &Spec) -> Result<()> {
    base.compile()
        .map_err(|e| CliError::state(format!("the egress policy: {e}")))?;
    let p = paths(&ctx.sandbox_dir(sb));
    write_json(&p, &p.dir.join("base.json"), base)?;
    let changes = read_changes(&p)?;
    write_json(&p, &p.policy, &merge(base, &changes))
}

fn merge(base: &Spec, changes: &Changes) -> Spec {
    let mut spec = base.clone();
    for rule in &changes.allow {
        if !spec.allow.contains(rule) {
            spec.allow.push(rule.clone());
        }
    }
    for rule in &changes.deny {
        if !spec.deny.contains(rule) {
            spec.deny.push(rule.clone());
        }
    }
    spec
}

fn read_changes(p: &Paths) -> Result<Changes> {
    let file = p.dir.join("changes.json");
    match fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            CliError::failed(format!(
                "{}: {e}; remove it to drop the changes made with allow/deny",
                file.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Changes::default()),
        Err(e) => Err(CliError::failed(format!("{}: {e}", file.display()))),
    }
}

/// Written whole and renamed into place (0600), so the egress point never
/// reads half a file.
fn write_json<T: Serialize>(p: &Paths, file: &Path, value: &T) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&p.dir)
        .map_err(|e| CliError::failed(format!("{}: {e}", p.dir.display())))?;
    let tmp = file.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::failed(format!("{}: {e}", file.display())))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| CliError::failed(format!("{}: {e}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::failed(format!("{}: {e}", tmp.display())))?;
    fs::rename(&tmp, file).map_err(|e| CliError::failed(format!("{}: {e}", file.display())))
}

/// `[SANDBOX] RULE`.
fn split(args: &PolicyChangeArgs) -> (Option<&str>, &str) {
    match args.args.as_slice() {
        [rule] => (None, rule),
        [sandbox, rule, ..] => (Some(sandbox), rule),
        [] => unreachable!("clap requires one or two values"),
    }
}

pub fn allow(args: PolicyChangeArgs) -> Result<i32> {
    change(args, true)
}

pub fn deny(args: PolicyChangeArgs) -> Result<i32> {
    change(args, false)
}

fn change(args: PolicyChangeArgs, allow: bool) -> Result<i32> {
    let (name, rule) = split(&args);
    let rule = rule.trim().to_string();
    keystone_egress::policy::parse_rule(&rule)
        .map_err(|e| CliError::state(format!("{rule:?} is not an egress rule: {e}")))?;
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(name)?;
    let p = paths(&ctx.sandbox_dir(&sb));
    let base: Spec = match fs::read_to_string(p.dir.join("base.json")) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| CliError::failed(format!("{}: {e}", p.dir.display())))?,
        Err(_) => {
            return Err(CliError::state(format!(
                "sandbox {} has no egress policy yet (it was started before keystone had one, or never); \
start it with `keystone agent start`, then change it",
                sb.name
            )))
        }
    };
    let mut changes = read_changes(&p)?;
    let (add, remove) = if allow {
        (&mut changes.allow, &mut changes.deny)
    } else {
        (&mut changes.deny, &mut changes.allow)
    };
    remove.retain(|r| r != &rule);
    if !add.contains(&rule) {
        add.push(rule.clone());
    }
    let merged = merge(&base, &changes);
    merged
        .compile()
        .map_err(|e| CliError::state(format!("the egress policy would not hold: {e}")))?;
    write_json(&p, &p.dir.join("changes.json"), &changes)?;
    write_json(&p, &p.policy, &merged)?;
    let verb = if allow { "allowed" } else { "denied" };
    let enforced = sb.state == State::Running && enforced(&sb);
    if enforced {
        keystone_egress::control::reload(&p.control, Duration::from_secs(5)).map_err(|e| {
            CliError::failed(format!(
                "the policy file is written, but sandbox {}'s egress point did not take it: {e}; \
`keystone agent stop` and `start` apply it",
                sb.name
            ))
        })?;
        println!("{verb} {rule} for sandbox {} (in effect now)", sb.name);
    } else if sb.settings.egress_allowlist() {
        println!(
            "{verb} {rule} for sandbox {} (in effect from its next start)",
            sb.name
        );
    } else {
        println!(
            "{verb} {rule} for sandbox {}; its egress is {}, so the allowlist applies only once it runs with `--egress allowlist`",
            sb.name,
            mode_line(&sb)
        );
    }
    Ok(0)
}

/// Whether keystone's egress point fences this sandbox (on every backend:
/// a pod is fenced by its init container and relayed to this host).
pub fn enforced(sb: &Sandbox) -> bool {
    sb.settings.egress_allowlist()
}

/// The mode as `status` and `start` print it.
pub fn mode_line(sb: &Sandbox) -> String {
    use keystone_registry::NetworkMode;
    match sb.settings.network {
        NetworkMode::None => "none (no network)".into(),
        NetworkMode::Bridge => {
            "open (a bridge puts the sandbox on a host network; the allowlist needs --network nat)"
                .into()
        }
        NetworkMode::Nat if !enforced(sb) => sb.settings.egress.to_string(),
        NetworkMode::Nat if sb.backend == keystone_registry::BackendKind::Kubernetes => {
            "allowlist (enforced in the pod; its traffic leaves from this host)".into()
        }
        NetworkMode::Nat => "allowlist (enforced)".into(),
    }
}

/// The latest `n` distinct refusals (what, where, why; the newest time
/// of each), oldest first, for `status`.
pub fn latest_denials(ctx: &Ctx, sb: &Sandbox, n: usize) -> Vec<keystone_egress::log::Event> {
    let p = paths(&ctx.sandbox_dir(sb));
    let mut distinct: Vec<keystone_egress::log::Event> = Vec::new();
    for e in keystone_egress::log::tail(&p.log, 500)
        .into_iter()
        .filter(|e| e.decision == "deny")
    {
        distinct.retain(|d| {
            (&d.proto, &d.host, d.port, &d.rule) != (&e.proto, &e.host, e.port, &e.rule)
        });
        distinct.push(e);
    }
    let skip = distinct.len().saturating_sub(n);
    distinct.drain(..skip);
    distinct
}

pub fn log(args: EgressLogArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    let p = paths(&ctx.sandbox_dir(&sb));
    let print = |e: &keystone_egress::log::Event| {
        if args.denied && e.decision != "deny" {
            return;
        }
        if args.json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
        } else {
            println!(
                "{}  {:<5} {:<7} {}:{}  {}",
                e.time,
                e.decision,
                e.proto,
                crate::ui::escape_controls(&e.host),
                e.port,
                crate::ui::escape_controls(&e.rule)
            );
        }
    };
    let first = keystone_egress::log::tail(&p.log, args.lines);
    if first.is_empty() && !args.follow {
        eprintln!(
            "no egress decisions for sandbox {} yet (its egress: {})",
            sb.name,
            mode_line(&sb)
        );
    }
    for e in &first {
        print(e);
    }
    if !args.follow {
        return Ok(0);
    }
    follow(&p.log, &print)
}

/// `-f`: print lines as they are appended, across the log's rotation.
fn follow(path: &Path, print: &dyn Fn(&keystone_egress::log::Event)) -> Result<i32> {
    use std::io::{BufRead, Seek};
    use std::os::unix::fs::MetadataExt;
    let open = || -> Option<(fs::File, u64)> {
        let mut f = fs::File::open(path).ok()?;
        let ino = f.metadata().ok()?.ino();
        f.seek(std::io::SeekFrom::End(0)).ok()?;
        Some((f, ino))
    };
    let mut current = open();
    let mut pending = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let rotated = match (&current, fs::metadata(path)) {
            (Some((_, ino)), Ok(m)) => m.ino() != *ino,
            (None, Ok(_)) => true,
            _ => false,
        };
        if let Some((f, _)) = &mut current {
            let mut reader = std::io::BufReader::new(&*f);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        pending.push_str(&line);
                        if pending.ends_with('\n') {
                            if let Ok(e) = serde_json::from_str(pending.trim()) {
                                print(&e);
                            }
                            pending.clear();
                        }
                    }
                }
            }
        }
        if rotated {
            // The new file from its start: nothing in it was printed yet.
            current = fs::File::open(path)
                .ok()
                .and_then(|f| Some((f.try_clone().ok()?, f.metadata().ok()?.ino())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_stands_for_the_enabled_agents_own_presets() {
        let mut cfg = Config::default();
        cfg.guest.agents.claude.enable = true;
        cfg.guest.agents.gemini.enable = false;
        cfg.guest.agents.codex.enable = true;
        let spec = spec_from_config(&cfg, &["extra.example.com".into()]);
        assert_eq!(spec.presets, ["claude", "codex", "registries", "git"]);
        assert_eq!(spec.allow, ["extra.example.com"]);
        assert!(spec.compile().is_ok());
        // The minimal image has no agents, so none of their hosts.
        cfg.guest.profile = Profile::Minimal;
        assert_eq!(spec_from_config(&cfg, &[]).presets, ["registries", "git"]);
    }

    #[test]
    fn changes_add_to_the_configuration_and_deny_wins() {
        let base = Spec {
            allow: vec!["a.example.com".into()],
            ..Spec::default()
        };
        let changes = Changes {
            allow: vec!["b.example.com".into(), "a.example.com".into()],
            deny: vec!["a.example.com".into()],
        };
        let merged = merge(&base, &changes);
        assert_eq!(merged.allow, ["a.example.com", "b.example.com"]);
        let policy = merged.compile().expect("compiles");
        let name = |n: &str| keystone_egress::policy::Target::Name(n.into());
        assert!(!policy.decide(&name("a.example.com"), 443).allowed);
        assert!(policy.decide(&name("b.example.com"), 443).allowed);
    }
}
