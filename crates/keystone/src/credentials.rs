//! The credentials a sandbox stands for: exactly the variables on the
//! forward list (`guest.forward_env`), each taken from a command the user
//! configured (`credentials.commands`, run on the host at start), the host
//! environment, or, when the host does not set it, the project's env files
//! (`defaults.env_files`, later files in name order overriding earlier
//! ones, as `.env.local` overrides `.env`).
//!
//! The guest never gets a real value. It gets a per-sandbox random
//! placeholder of the same shape ([`placeholder_for`]), and the egress
//! point puts the real value into requests to the credential's hosts
//! ([`DEFAULT_HOSTS`], or `credentials.hosts`) over TLS it terminates
//! (`keystone_egress::inject`). So a credential is forwarded only when
//! there is an egress point (`[egress] mode = "allowlist"`) and it has
//! hosts; otherwise `start` says why it is not.
//!
//! Nothing else of the host environment reaches the guest: the ssh client
//! runs with a cleared environment, and the guest's env file travels over
//! ssh's stdin into a 0600 file, never on a command line.

use crate::error::{CliError, Result};
use keystone_channel::{Channel, ExecOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Where a forwarded variable's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `credentials.commands`, run on the host.
    Command(String),
    Host,
    /// An env file, relative to the project root.
    File(PathBuf),
    Missing,
    /// The command failed; why.
    Failed(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Command(c) => write!(f, "command `{c}`"),
            Source::Host => f.write_str("host environment"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Missing => f.write_str("not set"),
            Source::Failed(why) => write!(f, "command failed: {why}"),
        }
    }
}

/// The hosts each well-known credential is injected for, unless
/// `credentials.hosts` lists its own: the agents' APIs, and GitHub's for
/// the `gh` CLI's tokens.
pub const DEFAULT_HOSTS: &[(&str, &[&str])] = &[
    ("ANTHROPIC_API_KEY", &["api.anthropic.com"]),
    ("CLAUDE_CODE_OAUTH_TOKEN", &["api.anthropic.com"]),
    ("OPENAI_API_KEY", &["api.openai.com"]),
    ("GEMINI_API_KEY", &["generativelanguage.googleapis.com"]),
    ("GOOGLE_API_KEY", &["generativelanguage.googleapis.com"]),
    ("GH_TOKEN", &["api.github.com", "github.com"]),
    ("GITHUB_TOKEN", &["api.github.com", "github.com"]),
];

/// How long a `credentials.commands` command may take.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The `[credentials]` settings and the forward list, as the
/// configuration gives them.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub forward: Vec<String>,
    /// `VAR=HOST` items.
    pub hosts: Vec<String>,
    /// `VAR=Header-Name` items.
    pub headers: Vec<String>,
    /// `VAR=command` items.
    pub commands: Vec<String>,
}

impl Settings {
    pub fn from_config(cfg: &keystone_config::Config) -> Settings {
        Settings {
            forward: cfg.guest.forward_env.clone(),
            hosts: cfg.credentials.hosts.clone(),
            headers: cfg.credentials.headers.clone(),
            commands: cfg.credentials.commands.clone(),
        }
    }

    fn items<'a>(list: &'a [String], name: &str) -> Vec<&'a str> {
        list.iter()
            .filter_map(|i| i.split_once('='))
            .filter(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim())
            .collect()
    }

    /// A variable's hosts: its own list, else the default, else none.
    pub fn hosts_of(&self, name: &str) -> Vec<String> {
        let own = Self::items(&self.hosts, name);
        if !own.is_empty() {
            return own.into_iter().map(str::to_string).collect();
        }
        DEFAULT_HOSTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| h.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }
}

/// One variable of the forward list.
#[derive(Clone)]
pub struct Credential {
    pub name: String,
    pub source: Source,
    value: Option<String>,
    /// Where the egress point injects it (rules in the policy's syntax).
    pub hosts: Vec<String>,
    /// Only into these headers (`credentials.headers`); empty: any.
    pub headers: Vec<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Credential {
    pub fn is_available(&self) -> bool {
        self.value.is_some()
    }
}

/// A name a shell accepts as a variable (no injection through the list).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Run a `credentials.commands` command on the host (`sh -c`, stdin
/// closed, at most [`COMMAND_TIMEOUT`]); its trimmed standard output.
fn run_command(command: &str) -> std::result::Result<String, String> {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run sh: {e}"))?;
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot read its output: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        return Err(format!("{} ({first})", out.status));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| "its output is not UTF-8".to_string())?;
    let v = text.trim();
    if v.is_empty() {
        return Err("it printed nothing".into());
    }
    Ok(v.to_string())
}

/// Resolves the forward list against `host` (the environment), the
/// configured commands, and the env files of `project` matching `globs`.
pub fn resolve(
    settings: &Settings,
    project: Option<&Path>,
    globs: &[String],
    host: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Credential>> {
    let files = match project {
        Some(p) => env_files(p, globs),
        None => Vec::new(),
    };
    let mut parsed = Vec::new();
    for (rel, path) in &files {
        match std::fs::read_to_string(path) {
            Ok(text) => parsed.push((rel.clone(), parse_dotenv(&text))),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable env file")
            }
        }
    }
    let mut out = Vec::new();
    for name in &settings.forward {
        if !valid_name(name) {
            return Err(CliError::state(format!(
                "guest.forward_env has {name:?}, which is not a variable name"
            )));
        }
        if out.iter().any(|c: &Credential| &c.name == name) {
            continue;
        }
        let command = Settings::items(&settings.commands, name)
            .first()
            .map(|c| c.to_string());
        let (source, value) = if let Some(c) = command {
            match run_command(&c) {
                Ok(v) => (Source::Command(c), Some(v)),
                Err(why) => (Source::Failed(format!("`{c}`: {why}")), None),
            }
        } else if let Some(v) = host(name).filter(|v| !v.is_empty()) {
            (Source::Host, Some(v))
        } else {
            parsed
                .iter()
                .rev()
                .find_map(|(rel, vars)| {
                    vars.iter()
                        .rev()
                        .find(|(k, v)| k == name && !v.is_empty())
                        .map(|(_, v)| (Source::File(rel.clone()), Some(v.clone())))
                })
                .unwrap_or((Source::Missing, None))
        };
        out.push(Credential {
            name: name.clone(),
            source,
            value,
            hosts: settings.hosts_of(name),
            headers: Settings::items(&settings.headers, name)
                .into_iter()
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(out)
}

/// The shortest value a placeholder stands for (a shorter one would be
/// too easy to find by accident in unrelated headers).
pub const MIN_VALUE_LEN: usize = 16;

/// A random placeholder of `real`'s shape: the same length, the same
/// prefix up to its last `-` or `_` within the first 16 characters
/// (`sk-ant-api03-`, `sk-proj-`, `github_pat_`; for Google's keys `AIza`),
/// and every later character replaced by a random one of its class
/// (lowercase, uppercase, digit; anything else kept), so an agent that
/// checks a key's form accepts it. Nothing of the secret part is kept.
pub fn placeholder_for(real: &str, random: &mut dyn FnMut() -> u8) -> String {
    let chars: Vec<char> = real.chars().collect();
    let head: String = chars.iter().take(16).collect();
    let keep = match head.rfind(['-', '_']) {
        Some(i) => head[..=i].chars().count(),
        None if real.starts_with("AIza") => 4,
        None => 0,
    };
    let mut out: String = chars[..keep].iter().collect();
    for c in &chars[keep..] {
        let pick = |set: &[u8], r: &mut dyn FnMut() -> u8| set[(r() as usize) % set.len()] as char;
        out.push(match c {
            'a'..='z' => pick(b"abcdefghijklmnopqrstuvwxyz", random),
            'A'..='Z' => pick(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", random),
            '0'..='9' => pick(b"0123456789", random),
            o => *o,
        });
    }
    out
}

/// Does `placeholder` still have `real`'s shape (after a rotation)?
fn same_shape(placeholder: &str, real: &str) -> bool {
    let fixed = placeholder_for(real, &mut || 0);
    placeholder.len() == real.len()
        && placeholder.chars().zip(fixed.chars()).all(|(p, f)| {
            let class = |c: char| {
                if c.is_ascii_lowercase() {
                    'a'
                } else if c.is_ascii_uppercase() {
                    'A'
                } else if c.is_ascii_digit() {
                    '0'
                } else {
                    c
                }
            };
            class(p) == class(f)
        })
        && {
            let keep = fixed.chars().take_while(|c| !"aA0".contains(*c)).count();
            placeholder.chars().take(keep).eq(real.chars().take(keep))
        }
}

/// Bytes from the kernel's CSPRNG.
fn urandom() -> impl FnMut() -> u8 {
    let mut buf = [0u8; 256];
    let mut at = buf.len();
    let mut file = std::fs::File::open("/dev/urandom").ok();
    move || {
        if at == buf.len() {
            if let Some(f) = file.as_mut() {
                let _ = std::io::Read::read_exact(f, &mut buf);
            }
            at = 0;
        }
        at += 1;
        // Rejection-free modulo bias is irrelevant here: the classes are
        // 10 and 26 long and a placeholder is not a secret.
        buf[at - 1]
    }
}

/// What a sandbox gets: the guest's variables (placeholders), the egress
/// point's secrets (real values), and a line for each credential that is
/// not forwarded, saying why.
#[derive(Default)]
pub struct Plan {
    pub exported: Vec<(String, String)>,
    pub secrets: Vec<keystone_egress::inject::Secret>,
    pub notes: Vec<String>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("forwarded", &self.forwarded())
            .field("notes", &self.notes)
            .finish_non_exhaustive()
    }
}

impl Plan {
    pub fn forwarded(&self) -> Vec<String> {
        self.exported.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Plan a sandbox's credentials. `placeholders` is the sandbox's file of
/// them (kept across starts, so the guest's configuration stays valid; a
/// new one is made for a value whose shape changed, unless `keep`: a
/// running guest knows only the placeholders it has). `egress_point`: the
/// sandbox has one to inject with.
pub fn plan(
    creds: &[Credential],
    placeholders: &Path,
    egress_point: bool,
    keep: bool,
) -> Result<Plan> {
    let mut kept: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(placeholders)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
    let mut random = urandom();
    let mut plan = Plan::default();
    for c in creds {
        let Some(value) = &c.value else {
            if let Source::Failed(why) = &c.source {
                plan.notes.push(format!("{}: not forwarded: {why}", c.name));
            }
            continue;
        };
        // Every available value long enough gets a placeholder, exported
        // or not: the env files copied into the guest carry it in place
        // of the value.
        let long_enough = value.chars().count() >= MIN_VALUE_LEN;
        let placeholder = long_enough.then(|| match kept.get(&c.name) {
            Some(p) if (keep || same_shape(p, value)) && p != value => p.clone(),
            _ => {
                let mut p = placeholder_for(value, &mut random);
                while p == *value {
                    p = placeholder_for(value, &mut random);
                }
                kept.insert(c.name.clone(), p.clone());
                p
            }
        });
        if !egress_point {
            plan.notes.push(format!(
                "{}: not forwarded: only keystone's egress point can put it into requests, and this sandbox has none (egress mode allowlist has one)",
                c.name
            ));
            continue;
        }
        if c.hosts.is_empty() {
            plan.notes.push(format!(
                "{}: not forwarded: it has no hosts to be injected for; add credentials.hosts = [\"{}=api.example.com\"]",
                c.name, c.name
            ));
            continue;
        }
        let Some(placeholder) = placeholder else {
            plan.notes.push(format!(
                "{}: not forwarded: its value is shorter than {MIN_VALUE_LEN} characters, too short to stand for by a placeholder",
                c.name
            ));
            continue;
        };
        plan.exported.push((c.name.clone(), placeholder.clone()));
        plan.secrets.push(keystone_egress::inject::Secret {
            name: c.name.clone(),
            placeholder,
            value: value.clone(),
            hosts: c.hosts.clone(),
            headers: c.headers.clone(),
        });
    }
    if let Some(dir) = placeholders.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&kept).map_err(|e| CliError::failed(e.to_string()))?;
    let tmp = placeholders.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, placeholders)?;
    Ok(plan)
}

/// The project's env files: `(relative path, full path)`, sorted by name.
/// A glob is a file name pattern with `*` and `?` in one directory of the
/// project (`.env*`, `config/*.env`); directories are never followed out of
/// the project.
fn env_files(project: &Path, globs: &[String]) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    for glob in globs {
        let (dir, pattern) = match glob.rsplit_once('/') {
            Some((d, p)) => (d, p),
            None => ("", glob.as_str()),
        };
        if Path::new(dir)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(project.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wildcard(pattern, &name) || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let rel = Path::new(dir).join(&name);
            if !found.iter().any(|(r, _)| r == &rel) {
                found.push((rel, entry.path()));
            }
        }
    }
    found.sort();
    found
}

/// `*` and `?` matching over a whole name.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `KEY=VALUE` lines as dotenv files write them: `export ` allowed,
/// single quotes literal, double quotes with `\n`, `\"` and `\\` escapes,
/// unquoted values trimmed and cut at ` #`.
pub fn parse_dotenv(text: &str) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !valid_name(key) {
            continue;
        }
        let raw = raw.trim();
        let value = if let Some(rest) = raw.strip_prefix('\'') {
            rest.split_once('\'').map_or(rest, |(v, _)| v).to_string()
        } else if let Some(rest) = raw.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => v.push('\n'),
                        Some(o) => v.push(o),
                        None => {}
                    },
                    o => v.push(o),
                }
            }
            v
        } else {
            raw.split_once(" #")
                .map_or(raw, |(v, _)| v)
                .trim()
                .to_string()
        };
        vars.push((key.to_string(), value));
    }
    vars
}

/// The guest file's text: `export NAME='value'` lines, shell-quoted.
pub fn render_env_file(vars: &[(String, String)], extra: &[(String, String)]) -> String {
    let mut s = String::from(
        "# Written by keystone on every start: placeholders for the forwarded credentials (the\n\
         # real values never enter the sandbox), the egress proxy, and the trust stores.\n",
    );
    for (k, v) in vars.iter().chain(extra) {
        s.push_str(&format!("export {k}={}\n", shell_words::quote(v)));
    }
    s
}

/// Writes the env file into the guest over ssh's stdin (0600, replaced
/// atomically; an empty list leaves an empty file, so a variable dropped
/// from the list or the host disappears on the next start). When Claude
/// Code's API key is forwarded, its placeholder's last 20 characters are also recorded
/// as approved in `~/.claude.json`, so the interactive UI does not ask
/// "use this API key?" (jq reads the key from its environment, not argv);
/// and Codex, which does not log in from `OPENAI_API_KEY` alone (only
/// `codex login --with-api-key` does, openai/codex#7323), gets the
/// `~/.codex/auth.json` that command writes, holding the placeholder (an
/// `auth.json` of another login mode is left alone).
pub fn write_to_guest(
    channel: &Channel,
    vars: &[(String, String)],
    extra: &[(String, String)],
) -> Result<()> {
    let file = keystone_channel::GUEST_ENV_FILE;
    let script = format!(
        "set -e; umask 077; mkdir -p \"$(dirname {f})\"; cat > {f}.tmp; mv -f {f}.tmp {f}; \
. {f}; \
if [ -n \"${{ANTHROPIC_API_KEY:-}}\" ] && [ -f ~/.claude.json ] && command -v jq >/dev/null; then \
jq '.customApiKeyResponses.approved = (((.customApiKeyResponses.approved // []) + [env.ANTHROPIC_API_KEY[-20:]]) | unique) | .customApiKeyResponses.rejected = (.customApiKeyResponses.rejected // [])' ~/.claude.json > ~/.claude.json.tmp && mv -f ~/.claude.json.tmp ~/.claude.json; fi; \
if command -v codex >/dev/null && command -v jq >/dev/null && {{ [ ! -f ~/.codex/auth.json ] || jq -e '.auth_mode == \"apikey\"' ~/.codex/auth.json >/dev/null 2>&1; }}; then \
if [ -n \"${{OPENAI_API_KEY:-}}\" ]; then mkdir -p ~/.codex && jq -n '{{auth_mode: \"apikey\", OPENAI_API_KEY: env.OPENAI_API_KEY}}' > ~/.codex/auth.json.tmp && mv -f ~/.codex/auth.json.tmp ~/.codex/auth.json; \
else rm -f ~/.codex/auth.json; fi; fi",
        f = file
    );
    let mut cmd = channel.command(
        &script,
        &ExecOptions {
            user: Some("agent".into()),
            ..Default::default()
        },
    )?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::failed(format!("cannot run ssh: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(render_env_file(vars, extra).as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(CliError::failed(format!(
            "cannot write the forwarded credentials into the sandbox: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The user's keystone CA: `$XDG_STATE_HOME/keystone/ca` (`ca.crt`
/// public, `ca.key` 0600). One per user: every sandbox trusts the same
/// certificate, and no sandbox can reach the key.
pub fn ca_dir() -> Result<PathBuf> {
    keystone_registry::Registry::default_dir()
        .map(|d| d.join("ca"))
        .ok_or_else(|| CliError::failed("neither XDG_STATE_HOME nor HOME is set; set HOME"))
}

/// Where a sandbox's placeholders are kept (host side; not secret).
pub fn placeholders_file(ctx: &crate::context::Ctx, sb: &keystone_registry::Sandbox) -> PathBuf {
    ctx.sandbox_dir(sb)
        .join("credentials")
        .join("placeholders.json")
}

/// What the env files copied into the guest say for each variable of the
/// forward list: the sandbox's placeholder, or nothing (a value that has
/// none, e.g. too short, is blanked). Read from the placeholders file, so
/// `sync` needs no real value to do it.
pub fn env_file_replacements(
    forward: &[String],
    placeholders: &Path,
) -> std::collections::BTreeMap<String, String> {
    let kept: std::collections::BTreeMap<String, String> = std::fs::read_to_string(placeholders)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    forward
        .iter()
        .map(|n| (n.clone(), kept.get(n).cloned().unwrap_or_default()))
        .collect()
}

/// How long the egress point may take to take the credentials.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolve and plan `sb`'s credentials and hand the real values to its
/// egress point (`running`: the guest is up and keeps its placeholders;
/// this is a rotation). Returns the plan (what the guest gets) and the CA
/// certificate the guest must trust, if anything is injected.
pub fn deliver(
    ctx: &crate::context::Ctx,
    sb: &keystone_registry::Sandbox,
    cfg: &keystone_config::Config,
    project: &Path,
    running: bool,
) -> Result<(Plan, Option<String>)> {
    let settings = Settings::from_config(cfg);
    let creds = resolve(&settings, Some(project), &cfg.defaults.env_files, &|k| {
        std::env::var(k).ok()
    })?;
    let egress_point = crate::commands::egress::enforced(sb);
    let plan = plan(&creds, &placeholders_file(ctx, sb), egress_point, running)?;
    if plan.secrets.is_empty() {
        return Ok((plan, None));
    }
    let dir = ca_dir()?;
    let (cert, key) = keystone_egress::tls::load_or_create_ca(&dir)
        .map_err(|e| CliError::failed(format!("the keystone CA: {e}")))?;
    let bundle = keystone_egress::inject::Bundle {
        ca_cert_pem: cert.clone(),
        ca_key_pem: key,
        secrets: plan.secrets.clone(),
    };
    let control = keystone_backend::egress::paths(&ctx.sandbox_dir(sb)).control;
    // The egress point may still be binding its socket just after start.
    let deadline = std::time::Instant::now() + SEND_TIMEOUT;
    loop {
        match keystone_egress::control::send_credentials(&control, &bundle, SEND_TIMEOUT) {
            Ok(()) => break,
            Err(e) if !control.exists() && std::time::Instant::now() < deadline => {
                tracing::debug!("egress control socket not there yet: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                return Err(CliError::failed(format!(
                    "cannot hand the credentials to the sandbox's egress point: {e}"
                )))
            }
        }
    }
    Ok((plan, Some(cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn forward(names: &[&str]) -> Settings {
        Settings {
            forward: list(names),
            ..Settings::default()
        }
    }

    #[test]
    fn commands_beat_host_beats_files_and_later_files_beat_earlier() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(".env"), "A=from-env\nB=from-env\nC=c\n").expect("w");
        std::fs::write(dir.path().join(".env.local"), "export B=\"from local\"\n").expect("w");
        std::fs::write(dir.path().join("notenv"), "D=d\n").expect("w");
        let host = |k: &str| (k == "A" || k == "F").then(|| "from-host".to_string());
        let settings = Settings {
            forward: list(&["A", "B", "D", "E", "F", "G"]),
            commands: list(&["F=printf ' from-command\\n'", "G=echo oops >&2; exit 3"]),
            ..Settings::default()
        };
        let creds =
            resolve(&settings, Some(dir.path()), &list(&[".env*"]), &host).expect("resolve");
        let by = |n: &str| creds.iter().find(|c| c.name == n).expect(n).clone();
        assert_eq!(by("A").source, Source::Host);
        assert_eq!(by("A").value.as_deref(), Some("from-host"));
        assert_eq!(by("B").source, Source::File(".env.local".into()));
        assert_eq!(by("B").value.as_deref(), Some("from local"));
        assert_eq!(by("D").source, Source::Missing, "not on a matching file");
        assert_eq!(by("E").source, Source::Missing);
        assert!(matches!(by("F").source, Source::Command(_)));
        assert_eq!(by("F").value.as_deref(), Some("from-command"));
        match by("G").source {
            Source::Failed(why) => assert!(why.contains("oops"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(creds.iter().all(|c| c.name != "C"), "C is not on the list");
    }

    #[test]
    fn bad_names_are_refused() {
        let host = |_: &str| None;
        assert!(resolve(&forward(&["A;rm -rf /"]), None, &[], &host).is_err());
        assert!(resolve(&forward(&["1A"]), None, &[], &host).is_err());
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        let text = render_env_file(&[("K".into(), "a'b $(x) `y`".into())], &[]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{text}\nprintf %s \"$K\""))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a'b $(x) `y`");
    }

    #[test]
    fn placeholders_keep_the_shape_and_nothing_of_the_secret() {
        let mut r = urandom();
        for real in [
            "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcdefAA",
            "sk-proj-ABCdef0123456789xyzXYZ",
            "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
            "0123456789abcdef0123456789abcdef",
        ] {
            let p = placeholder_for(real, &mut r);
            assert_eq!(p.len(), real.len(), "{real}");
            assert_ne!(p, real);
            assert!(same_shape(&p, real), "{p} for {real}");
            // The secret part shares (almost) nothing position by position.
            let keep = p
                .chars()
                .zip(real.chars())
                .take_while(|(a, b)| a == b)
                .count();
            assert!(keep <= 16, "{p} keeps {keep} characters of {real}");
        }
        let p = placeholder_for("sk-ant-api03-AbCdEf0123456789abcdef", &mut r);
        assert!(p.starts_with("sk-ant-api03-"), "{p}");
        assert!(placeholder_for("AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOp", &mut r).starts_with("AIza"));
        // A rotated value of another shape needs a new placeholder.
        assert!(!same_shape(&p, "sk-proj-AbCdEf0123456789abcdef"));
    }

    fn cred(name: &str, value: Option<&str>, hosts: &[&str]) -> Credential {
        Credential {
            name: name.into(),
            source: Source::Host,
            value: value.map(str::to_string),
            hosts: list(hosts),
            headers: Vec::new(),
        }
    }

    #[test]
    fn the_plan_forwards_placeholders_only_where_they_can_be_injected() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("credentials/placeholders.json");
        let real = "sk-ant-api03-REALREALREALREAL0123456789";
        let creds = vec![
            cred("ANTHROPIC_API_KEY", Some(real), &["api.anthropic.com"]),
            cred("NO_HOSTS", Some("0123456789abcdef0123"), &[]),
            cred("SHORT", Some("abc"), &["x.example"]),
            cred("MISSING", None, &["x.example"]),
        ];
        let p = plan(&creds, &file, true, false).expect("plan");
        assert_eq!(p.forwarded(), vec!["ANTHROPIC_API_KEY"]);
        assert_ne!(p.exported[0].1, real);
        assert_eq!(p.secrets[0].value, real);
        assert_eq!(p.secrets[0].placeholder, p.exported[0].1);
        assert!(
            p.notes.iter().any(
                |n| n.starts_with("NO_HOSTS: not forwarded") && n.contains("credentials.hosts")
            ),
            "{:?}",
            p.notes
        );
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("SHORT: not forwarded")),
            "{:?}",
            p.notes
        );
        assert!(!format!("{p:?}").contains(real));
        // The same placeholder at the next start; none of the real value
        // on disk.
        let again = plan(&creds, &file, true, false).expect("again");
        assert_eq!(again.exported, p.exported);
        assert!(!std::fs::read_to_string(&file).expect("file").contains(real));
        // Without an egress point nothing is forwarded, and it says why.
        let none = plan(&creds, &file, false, false).expect("none");
        assert!(none.exported.is_empty() && none.secrets.is_empty());
        assert!(
            none.notes[0].contains("egress mode allowlist"),
            "{:?}",
            none.notes
        );
    }

    #[test]
    fn default_hosts_and_own_hosts() {
        let s = Settings {
            hosts: list(&["GH_TOKEN=ghe.example.com", "MINE=api.mine.example:8443"]),
            headers: list(&["MINE=X-Mine-Key"]),
            forward: list(&["ANTHROPIC_API_KEY", "GH_TOKEN", "MINE", "OTHER"]),
            ..Settings::default()
        };
        assert_eq!(s.hosts_of("ANTHROPIC_API_KEY"), vec!["api.anthropic.com"]);
        assert_eq!(
            s.hosts_of("GH_TOKEN"),
            vec!["ghe.example.com"],
            "own hosts replace the default"
        );
        assert_eq!(s.hosts_of("MINE"), vec!["api.mine.example:8443"]);
        assert!(s.hosts_of("OTHER").is_empty());
        let creds = resolve(&s, None, &[], &|_| None).expect("resolve");
        assert_eq!(creds[2].headers, vec!["X-Mine-Key"]);
    }

    #[test]
    fn image_and_channel_agree_on_the_env_file() {
        assert_eq!(
            keystone_channel::GUEST_ENV_FILE,
            keystone_image::guest::FORWARDED_ENV
        );
        assert!(keystone_image::guest::BASHRC_APPEND.contains("$HOME/.config/keystone/env"));
    }

    #[test]
    fn dotenv_forms() {
        let vars =
            parse_dotenv("# c\nA=1 # note\nexport B='x # y'\nC=\"l1\\nl2\"\n bad line\nD=\n");
        assert_eq!(
            vars,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x # y".into()),
                ("C".into(), "l1\nl2".into()),
                ("D".into(), String::new()),
            ]
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard(".env*", ".env"));
        assert!(wildcard(".env*", ".env.production"));
        assert!(!wildcard(".env*", "x.env"));
        assert!(wildcard("*.env", "a.env"));
        assert!(wildcard("?.env", "a.env"));
        assert!(!wildcard("?.env", "ab.env"));
    }
}
