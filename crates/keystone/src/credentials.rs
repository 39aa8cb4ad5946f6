//! The credentials a sandbox receives: exactly the variables on the forward
//! list (`guest.forward_env`), each taken from the host environment or, when
//! the host does not set it, from the project's env files
//! (`defaults.env_files`, later files in name order overriding earlier
//! ones, as `.env.local` overrides `.env`). Nothing else of the host
//! environment reaches the guest: the ssh client runs with a cleared
//! environment, and the values travel over ssh's stdin into a 0600 file,
//! never on a command line or in a process list.

use crate::error::{CliError, Result};
use keystone_channel::{Channel, ExecOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Where a forwarded variable's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Host,
    /// An env file, relative to the project root.
    File(PathBuf),
    Missing,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Host => f.write_str("host environment"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Missing => f.write_str("not set"),
        }
    }
}

/// One variable of the forward list.
#[derive(Clone, Debug)]
pub struct Credential {
    pub name: String,
    pub source: Source,
    value: Option<String>,
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

/// Resolves the forward list against `host` (the environment) and the env
/// files of `project` matching `globs`.
pub fn resolve(
    forward: &[String],
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
    for name in forward {
        if !valid_name(name) {
            return Err(CliError::state(format!(
                "guest.forward_env has {name:?}, which is not a variable name"
            )));
        }
        if out.iter().any(|c: &Credential| &c.name == name) {
            continue;
        }
        let (source, value) = if let Some(v) = host(name).filter(|v| !v.is_empty()) {
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
        });
    }
    Ok(out)
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
pub fn render_env_file(creds: &[Credential], extra: &[(String, String)]) -> String {
    let mut s = String::from(
        "# Written by keystone on every start: the forwarded credentials, and the egress proxy.\n",
    );
    for c in creds {
        if let Some(v) = &c.value {
            s.push_str(&format!("export {}={}\n", c.name, shell_words::quote(v)));
        }
    }
    for (k, v) in extra {
        s.push_str(&format!("export {k}={}\n", shell_words::quote(v)));
    }
    s
}

/// Writes the env file into the guest over ssh's stdin (0600, replaced
/// atomically; an empty list leaves an empty file, so a variable dropped
/// from the list or the host disappears on the next start). When Claude
/// Code's API key is forwarded, its last 20 characters are also recorded
/// as approved in `~/.claude.json`, so the interactive UI does not ask
/// "use this API key?" (jq reads the key from its environment, not argv).
pub fn write_to_guest(
    channel: &Channel,
    creds: &[Credential],
    extra: &[(String, String)],
) -> Result<()> {
    let file = keystone_channel::GUEST_ENV_FILE;
    let script = format!(
        "set -e; umask 077; mkdir -p \"$(dirname {f})\"; cat > {f}.tmp; mv -f {f}.tmp {f}; \
. {f}; \
if [ -n \"${{ANTHROPIC_API_KEY:-}}\" ] && [ -f ~/.claude.json ] && command -v jq >/dev/null; then \
jq '.customApiKeyResponses.approved = (((.customApiKeyResponses.approved // []) + [env.ANTHROPIC_API_KEY[-20:]]) | unique) | .customApiKeyResponses.rejected = (.customApiKeyResponses.rejected // [])' ~/.claude.json > ~/.claude.json.tmp && mv -f ~/.claude.json.tmp ~/.claude.json; fi",
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
        stdin.write_all(render_env_file(creds, extra).as_bytes())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn host_beats_files_and_later_files_beat_earlier() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(".env"), "A=from-env\nB=from-env\nC=c\n").expect("w");
        std::fs::write(dir.path().join(".env.local"), "export B=\"from local\"\n").expect("w");
        std::fs::write(dir.path().join("notenv"), "D=d\n").expect("w");
        let host = |k: &str| (k == "A").then(|| "from-host".to_string());
        let creds = resolve(
            &list(&["A", "B", "D", "E"]),
            Some(dir.path()),
            &list(&[".env*"]),
            &host,
        )
        .expect("resolve");
        let by = |n: &str| creds.iter().find(|c| c.name == n).expect(n).clone();
        assert_eq!(by("A").source, Source::Host);
        assert_eq!(by("A").value.as_deref(), Some("from-host"));
        assert_eq!(by("B").source, Source::File(".env.local".into()));
        assert_eq!(by("B").value.as_deref(), Some("from local"));
        assert_eq!(by("D").source, Source::Missing, "not on a matching file");
        assert_eq!(by("E").source, Source::Missing);
        assert!(creds.iter().all(|c| c.name != "C"), "C is not on the list");
        let text = render_env_file(&creds, &[]);
        assert!(text.contains("export A=from-host\n"));
        assert!(text.contains("export B='from local'\n"));
        assert!(!text.contains("C="));
    }

    #[test]
    fn bad_names_are_refused() {
        let host = |_: &str| None;
        assert!(resolve(&list(&["A;rm -rf /"]), None, &[], &host).is_err());
        assert!(resolve(&list(&["1A"]), None, &[], &host).is_err());
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        let c = Credential {
            name: "K".into(),
            source: Source::Host,
            value: Some("a'b $(x) `y`".into()),
        };
        let text = render_env_file(&[c], &[]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{text}\nprintf %s \"$K\""))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a'b $(x) `y`");
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
