//! The coding agents a full image carries: which npm package each is, the
//! version the recipe pins, and the files that make it run without
//! permission prompts or first-run dialogs for the `agent` user.
//!
//! Every setting below was read from the agent's own documentation or, where
//! the documentation is silent, from the shipped package, and each one was
//! checked against the pinned version with a scripted model endpoint (see
//! `crates/keystone/tests/agents.rs`):
//!
//! - Claude Code (`~/.claude/settings.json`, docs: code.claude.com/docs/en/
//!   settings and .../permission-modes): `permissions.defaultMode =
//!   "bypassPermissions"`; `skipDangerousModePermissionPrompt` (written by
//!   Claude Code itself when the bypass warning is accepted, anthropics/
//!   claude-code#26233); `env.DISABLE_AUTOUPDATER` (the version is the
//!   image's). `~/.claude.json`: `hasCompletedOnboarding` (no theme/login
//!   walkthrough), `projects["/workspace"].hasTrustDialogAccepted` (no "do
//!   you trust this folder"), `hasSeenAutoDefaultNudge` (no "make auto mode
//!   your default?" question, which 2.1.x asks when bypass is the default).
//! - Gemini CLI (`~/.gemini/settings.json`, docs: geminicli.com/docs/cli/
//!   settings and .../trusted-folders): `security.auth.selectedType =
//!   "gemini-api-key"` (no auth dialog), `general.enableAutoUpdate = false`;
//!   `~/.gemini/trustedFolders.json` `{"/workspace": "TRUST_FOLDER"}` (folder
//!   trust is on by default in 0.61: `security.folderTrust.enabled ?? true`).
//!   YOLO cannot be a settings default: the docs say "YOLO can only be
//!   enabled via the command line" and 0.61 ignores `general.
//!   defaultApprovalMode = "yolo"`. So `/usr/local/bin/gemini` becomes a
//!   wrapper adding `--approval-mode=yolo` unless the caller chose a mode.
//! - Codex (`~/.codex/config.toml`, docs: developers.openai.com/codex/
//!   config-reference and .../agent-approvals-security): `approval_policy =
//!   "never"`, `sandbox_mode = "danger-full-access"` (the sandbox is ours;
//!   Codex's own Landlock/seccomp sandbox inside it would only block the
//!   network and writes outside `/workspace`), `[projects."/workspace"]
//!   trust_level = "trusted"`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One of the agents an image can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Agent {
    Claude,
    Gemini,
    Codex,
}

impl Agent {
    pub const ALL: [Agent; 3] = [Agent::Claude, Agent::Gemini, Agent::Codex];

    pub fn name(self) -> &'static str {
        match self {
            Agent::Claude => "claude",
            Agent::Gemini => "gemini",
            Agent::Codex => "codex",
        }
    }

    /// The npm package.
    pub fn package(self) -> &'static str {
        match self {
            Agent::Claude => "@anthropic-ai/claude-code",
            Agent::Gemini => "@google/gemini-cli",
            Agent::Codex => "@openai/codex",
        }
    }

    /// The version the recipe installs unless `image build --update`
    /// recorded a newer one. Changing a pin changes every full image's id.
    pub fn pinned_version(self) -> &'static str {
        match self {
            Agent::Claude => "2.1.332",
            Agent::Gemini => "0.61.0",
            Agent::Codex => "0.171.0",
        }
    }

    /// The command it installs (`/usr/local/bin/<command>`).
    pub fn command(self) -> &'static str {
        self.name()
    }

    pub fn from_name(name: &str) -> Option<Agent> {
        Agent::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One agent as a recipe installs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSetup {
    pub agent: Agent,
    /// An exact npm version (no ranges: the hash must name what is built).
    pub version: String,
    /// Write the no-prompt settings.
    pub auto_accept: bool,
}

impl AgentSetup {
    /// The agent at its pinned version.
    pub fn pinned(agent: Agent, auto_accept: bool) -> Self {
        AgentSetup {
            agent,
            version: agent.pinned_version().to_owned(),
            auto_accept,
        }
    }

    /// `package@version`.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.agent.package(), self.version)
    }
}

/// Whether `v` is an exact semver-ish version npm will not reinterpret
/// (digits, dots, and a pre-release/build suffix of safe characters).
pub(crate) fn is_exact_version(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c))
}

/// A file a hook writes into the agent's home.
pub(crate) struct AgentFile {
    pub path: &'static str,
    pub mode: &'static str,
    pub body: &'static str,
}

pub(crate) const CLAUDE_SETTINGS: &str = r#"{
  "permissions": {
    "defaultMode": "bypassPermissions"
  },
  "skipDangerousModePermissionPrompt": true,
  "env": {
    "DISABLE_AUTOUPDATER": "1"
  }
}
"#;

/// Claude Code rewrites this file as it runs, so it must stay writable by
/// the agent (0600: it also records which API key was approved).
pub(crate) const CLAUDE_STATE: &str = r#"{
  "hasCompletedOnboarding": true,
  "hasSeenAutoDefaultNudge": true,
  "projects": {
    "/workspace": {
      "hasTrustDialogAccepted": true
    }
  }
}
"#;

pub(crate) const GEMINI_SETTINGS: &str = r#"{
  "security": {
    "auth": {
      "selectedType": "gemini-api-key"
    }
  },
  "general": {
    "enableAutoUpdate": false,
    "enableAutoUpdateNotification": false
  }
}
"#;

pub(crate) const GEMINI_TRUSTED_FOLDERS: &str = "{\n  \"/workspace\": \"TRUST_FOLDER\"\n}\n";

/// Replaces npm's `/usr/local/bin/gemini` symlink.
pub(crate) const GEMINI_YOLO_WRAPPER: &str = r#"#!/bin/sh
# Written by keystone: Gemini CLI takes YOLO (no approval prompts) only from
# its command line, so this adds --approval-mode=yolo unless one was given.
real=/usr/local/lib/node_modules/@google/gemini-cli/bundle/gemini.js
for arg in "$@"; do
  case "$arg" in
    --approval-mode|--approval-mode=*|--yolo|-y) exec "$real" "$@" ;;
  esac
done
exec "$real" --approval-mode=yolo "$@"
"#;

pub(crate) const CODEX_CONFIG_AUTO: &str = r#"# Written by keystone: the sandbox is the isolation, so Codex neither asks
# nor sandboxes again inside it.
approval_policy = "never"
sandbox_mode = "danger-full-access"

[projects."/workspace"]
trust_level = "trusted"
"#;

pub(crate) const CODEX_CONFIG_TRUST_ONLY: &str = r#"# Written by keystone.
[projects."/workspace"]
trust_level = "trusted"
"#;

/// The files for one agent: trust and first-run state always, the
/// no-prompt settings when `auto_accept`.
pub(crate) fn files(setup: &AgentSetup) -> Vec<AgentFile> {
    let f = |path, mode, body| AgentFile { path, mode, body };
    match (setup.agent, setup.auto_accept) {
        (Agent::Claude, auto) => {
            let mut v = vec![f("/home/agent/.claude.json", "0600", CLAUDE_STATE)];
            if auto {
                v.push(f(
                    "/home/agent/.claude/settings.json",
                    "0644",
                    CLAUDE_SETTINGS,
                ));
            }
            v
        }
        (Agent::Gemini, auto) => {
            let mut v = vec![
                f("/home/agent/.gemini/settings.json", "0644", GEMINI_SETTINGS),
                f(
                    "/home/agent/.gemini/trustedFolders.json",
                    "0644",
                    GEMINI_TRUSTED_FOLDERS,
                ),
            ];
            if auto {
                v.push(f("/usr/local/bin/gemini", "0755", GEMINI_YOLO_WRAPPER));
            }
            v
        }
        (Agent::Codex, true) => vec![f(
            "/home/agent/.codex/config.toml",
            "0644",
            CODEX_CONFIG_AUTO,
        )],
        (Agent::Codex, false) => vec![f(
            "/home/agent/.codex/config.toml",
            "0644",
            CODEX_CONFIG_TRUST_ONLY,
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_exact_versions() {
        for a in Agent::ALL {
            assert!(is_exact_version(a.pinned_version()), "{a}");
        }
        for bad in [
            "latest",
            "^1.2.3",
            "1.2",
            "1.2.x",
            "1.2.3 || 2",
            ">=1.0.0",
            "",
        ] {
            assert!(!is_exact_version(bad), "{bad:?}");
        }
        assert!(is_exact_version("0.1.0-nightly.20250101"));
    }

    #[test]
    fn json_settings_parse() {
        for body in [
            CLAUDE_SETTINGS,
            CLAUDE_STATE,
            GEMINI_SETTINGS,
            GEMINI_TRUSTED_FOLDERS,
        ] {
            serde_json::from_str::<serde_json::Value>(body).expect(body);
        }
        let s: serde_json::Value = serde_json::from_str(CLAUDE_SETTINGS).expect("json");
        assert_eq!(s["permissions"]["defaultMode"], "bypassPermissions");
        let st: serde_json::Value = serde_json::from_str(CLAUDE_STATE).expect("json");
        assert_eq!(st["projects"]["/workspace"]["hasTrustDialogAccepted"], true);
    }

    #[test]
    fn auto_accept_off_writes_only_trust() {
        let claude = files(&AgentSetup::pinned(Agent::Claude, false));
        assert!(claude.iter().all(|f| !f.body.contains("bypassPermissions")));
        let gemini = files(&AgentSetup::pinned(Agent::Gemini, false));
        assert!(gemini.iter().all(|f| !f.body.contains("yolo")));
        let codex = files(&AgentSetup::pinned(Agent::Codex, false));
        assert!(codex.iter().all(|f| !f.body.contains("approval_policy")));
        assert!(codex[0].body.contains("trust_level = \"trusted\""));
    }
}
