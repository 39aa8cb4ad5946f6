//! The project's env files (`.env`, `.env.local`, … per `env_files`),
//! copied host → sandbox at start and on every sync, and loaded by direnv
//! in `/workspace`.
//!
//! Only regular files are copied: a host symlink such as
//! `.env -> ~/.aws/credentials` would otherwise carry a file from outside
//! the project into the sandbox. When the project has no `.envrc` of its
//! own, the guest gets one that loads the copied files with direnv's
//! `dotenv_if_exists`; it and the env files are listed in the guest
//! repository's `.git/info/exclude`, so they never show up as changes the
//! agent might commit.
//!
//! A variable on the credentials' forward list never reaches the guest
//! through these files: its lines are rewritten on the way in to the
//! sandbox's placeholder (or to an empty value), by key, so no real value
//! is needed to do it ([`rewrite`]).

use crate::SyncError;
use keystone_channel::{Channel, ExecOptions};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

/// The first line of an `.envrc` we wrote (and may rewrite).
const MARKER: &str = "# keystone: loads the env files of the project";

/// Files in the project root (or at the relative paths the globs name)
/// matching `globs`: regular files only, sorted.
pub fn matching(project: &Path, globs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for g in globs {
        let (dir, pattern) = match g.rsplit_once('/') {
            Some((d, p)) => (project.join(d), p.to_string()),
            None => (project.to_path_buf(), g.clone()),
        };
        let prefix = g
            .rsplit_once('/')
            .map(|(d, _)| format!("{d}/"))
            .unwrap_or_default();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let regular = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if regular && glob_match(&pattern, &name) && name != ".envrc" {
                out.push(format!("{prefix}{name}"));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `*` and `?` within one path component.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// `text` (a dotenv file) with the value of every `KEY=` line whose key is
/// in `replace` set to the replacement: `KEY='placeholder'`, keeping an
/// `export ` prefix; a quoted value that spans lines is dropped whole.
pub fn rewrite(text: &str, replace: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut skipping: Option<char> = None;
    for line in text.split_inclusive('\n') {
        if let Some(q) = skipping {
            if closes(line, q) {
                skipping = None;
            }
            continue;
        }
        let trimmed = line.trim_start();
        let body = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some((key, value)) = body.split_once('=') else {
            out.push_str(line);
            continue;
        };
        let Some(new) = replace.get(key.trim()) else {
            out.push_str(line);
            continue;
        };
        let indent = &line[..line.len() - trimmed.len()];
        let export = if trimmed.starts_with("export ") {
            "export "
        } else {
            ""
        };
        out.push_str(&format!(
            "{indent}{export}{}={}\n",
            key.trim(),
            shell_words_quote(new)
        ));
        let v = value.trim_start();
        if let Some(q) = v.chars().next().filter(|c| *c == '"' || *c == '\'') {
            if !closes(&v[1..], q) {
                skipping = Some(q);
            }
        }
    }
    out
}

/// Does `s` hold an unescaped closing quote `q`?
fn closes(s: &str, q: char) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' && q == '"' {
            escaped = true;
        } else if c == q {
            return true;
        }
    }
    false
}

/// Copy the env files into `/workspace` and make direnv load them, each
/// [`rewrite`]n with `replace` (credential name → its placeholder, or
/// empty); returns the files copied.
pub fn copy(
    project: &Path,
    globs: &[String],
    channel: &Channel,
    replace: &BTreeMap<String, String>,
) -> Result<Vec<String>, SyncError> {
    let files = matching(project, globs);
    if files.is_empty() {
        return Ok(files);
    }
    let mut envrc = format!("{MARKER} (written by keystone; not part of the repository)\n");
    let mut exclude = String::from(".envrc\n");
    for f in &files {
        envrc.push_str(&format!("dotenv_if_exists {}\n", shell_words_quote(f)));
        exclude.push_str(&format!("/{f}\n"));
    }
    // One round trip: a tar stream of the files on stdin, then the
    // .envrc (unless the project has its own) and the excludes.
    let script = format!(
        "set -e; cd /workspace; tar -xf - --no-same-owner --no-overwrite-dir; \
         if [ ! -e .envrc ] || head -n1 .envrc | grep -q '^{MARKER}'; then printf %s {envrc} > .envrc; fi; \
         if [ -d .git/info ] || mkdir -p .git/info; then touch .git/info/exclude; \
         printf %s {exclude} | while read -r l; do grep -qxF \"$l\" .git/info/exclude || echo \"$l\" >> .git/info/exclude; done; fi",
        envrc = shell_words_quote(&envrc),
        exclude = shell_words_quote(&exclude),
    );
    // The files as the guest may see them, in a private directory (0700):
    // never the host's bytes when a credential is in them.
    let staged = tempfile::Builder::new()
        .prefix("keystone-env-")
        .tempdir()
        .map_err(|e| SyncError::Refused(format!("cannot stage the env files: {e}")))?;
    for f in &files {
        let text = std::fs::read(project.join(f))
            .map_err(|e| SyncError::Refused(format!("cannot read the env file {f}: {e}")))?;
        let text = rewrite(&String::from_utf8_lossy(&text), replace);
        let dest = staged.path().join(f);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| SyncError::Refused(format!("cannot stage the env files: {e}")))?;
        }
        std::fs::write(&dest, text)
            .map_err(|e| SyncError::Refused(format!("cannot stage the env files: {e}")))?;
    }
    let mut tar = std::process::Command::new("tar");
    tar.arg("-cf")
        .arg("-")
        .arg("-C")
        .arg(staged.path())
        .arg("--")
        .args(&files);
    let tar_out = tar
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| SyncError::Refused(format!("cannot read the env files: {e}")))?;
    if !tar_out.status.success() {
        return Err(SyncError::Refused(format!(
            "cannot read the env files: {}",
            String::from_utf8_lossy(&tar_out.stderr).trim()
        )));
    }
    let mut cmd = channel.command(&script, &ExecOptions::default())?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SyncError::Refused(format!("cannot copy the env files: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&tar_out.stdout);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| SyncError::Refused(format!("cannot copy the env files: {e}")))?;
    if !out.status.success() {
        return Err(SyncError::Refused(format!(
            "copying the env files into the sandbox failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(files)
}

fn shell_words_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_lines_are_rewritten_by_key() {
        let replace: BTreeMap<String, String> = [
            (
                "ANTHROPIC_API_KEY".to_string(),
                "sk-ant-PLACEHOLDER".to_string(),
            ),
            ("GONE".to_string(), String::new()),
        ]
        .into();
        let text = "# c\nANTHROPIC_API_KEY=sk-ant-real\n  export GONE=\"multi\nline real\"\nKEEP=1\nexport ANTHROPIC_API_KEY='sk-ant-real2' # note\n";
        let out = rewrite(text, &replace);
        assert_eq!(
            out,
            "# c\nANTHROPIC_API_KEY='sk-ant-PLACEHOLDER'\n  export GONE=''\nKEEP=1\nexport ANTHROPIC_API_KEY='sk-ant-PLACEHOLDER'\n"
        );
        assert!(!out.contains("real"));
    }

    #[test]
    fn globs_match_within_a_component() {
        assert!(glob_match(".env*", ".env"));
        assert!(glob_match(".env*", ".env.production"));
        assert!(!glob_match(".env*", "x.env"));
        assert!(glob_match("?.txt", "a.txt"));
    }

    #[test]
    fn only_regular_files_are_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".env"), "A=1\n").expect("write");
        std::fs::write(dir.path().join(".env.local"), "B=2\n").expect("write");
        std::fs::write(dir.path().join(".envrc"), "x\n").expect("write");
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(".env.production"))
            .expect("symlink");
        std::fs::create_dir(dir.path().join(".env.d")).expect("mkdir");
        assert_eq!(
            matching(dir.path(), &[".env*".into()]),
            vec![".env", ".env.local"]
        );
    }
}
