//! The agents (issue 6), on the full image with all three enabled: each
//! one's `--version` as `agent`; auto-accept proven against a scripted model
//! endpoint running inside the sandbox (and, for Claude Code and Gemini CLI,
//! a control run without keystone's setting that must not write anything);
//! the forward list; `start --agent claude` landing in Claude Code's UI.
//!
//! What the agents do with their settings is the image's, the same bytes
//! on every backend, so the scripted-model runs and the `--agent` session
//! run on the container backend ([`Depth::Agents`]); the microVM, under
//! software emulation minutes slower, proves what differs by backend
//! ([`Depth::Backend`]): the full image converted to its disk and booted,
//! every agent running at its pinned version, and the credentials
//! delivered to exec and to the session's shells.

/// How much of the scenario a backend runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Everything.
    Agents,
    /// Up to and including the forward list in exec and sessions.
    Backend,
}

use crate::harness::*;
use std::time::{Duration, Instant};

/// The scripted model endpoint (Anthropic Messages, OpenAI Responses,
/// Gemini generateContent), run inside the sandbox with the image's Node.js.
const MOCK_MODEL: &str = include_str!("../fixtures/mock-model.js");
const PORT: u16 = 18765;

/// The agents' pinned versions, as `--version` prints them.
const VERSIONS: &[(&str, &str)] = &[
    ("claude", "2.1.332 (Claude Code)"),
    ("gemini", "0.61.0"),
    ("codex", "codex-cli 0.171.0"),
];

/// What `keystone agent attach` draws in `limit`, escape sequences and
/// spaces (the UI positions text with cursor moves) removed.
fn attach_screen(h: &Host, limit: Duration) -> String {
    let script = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("script").is_file()))
        .unwrap_or(false);
    assert!(
        script,
        "`script` is required for the attach test: apt-get install bsdutils"
    );
    let typescript = h.tmp.path().join("attach.typescript");
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg(limit.as_secs().to_string())
        .arg("script")
        .args(["-q", "-c"])
        .arg(format!(
            "stty cols 120 rows 40; {} agent attach",
            h.exe.display()
        ))
        .arg(&typescript)
        .current_dir(&h.project)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .env("HOME", h.tmp.path().join("home"))
        .env("XDG_STATE_HOME", h.tmp.path().join("state"))
        .env("XDG_CONFIG_HOME", h.tmp.path().join("config"))
        .env("XDG_CACHE_HOME", &h.cache)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _ = cmd.status();
    let raw = std::fs::read(&typescript).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte; other escapes: skip one char.
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() || n == '~' {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_whitespace() && !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// The full image with every agent enabled. `--network none`: the scripted
/// model runs inside the sandbox, and the agents' own start-up calls to
/// their vendors' hosts then fail at once instead of each waiting out a
/// connection timeout on a network that reaches only package registries.
fn full_host(backend: &str, project: &str) -> Host {
    let h = Host::new(backend, project);
    h.write(
        &h.tmp.path().join("config/keystone/agent.toml"),
        &format!(
            "[defaults]\nmemory = 4096\nvcpus = 2\nnetwork = \"none\"\n\n[backend]\ntype = \"{backend}\"\n\n\
[guest]\nprofile = \"full\"\n\n\
[guest.agents.claude]\nenable = true\nauto_accept = true\n\
[guest.agents.gemini]\nenable = true\nauto_accept = true\n\
[guest.agents.codex]\nenable = true\nauto_accept = true\n"
        ),
    );
    h
}

/// The host's side of the forward list: one listed variable from the host
/// environment, one from an env file, one unlisted that must never arrive.
const ANTHROPIC_KEY: &str = "sk-ant-test-forwarded-0123456789abcdefghij";
const UNLISTED: (&str, &str) = ("KEYSTONE_UNLISTED_SECRET", "unlisted-canary-value");

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("ANTHROPIC_API_KEY", ANTHROPIC_KEY), UNLISTED]
}

pub fn agents_work_without_prompts(backend: &str, depth: Depth) {
    let h = full_host(backend, &format!("agents-{backend}"));
    let name = h.name();
    // An env file supplies a listed variable (OPENAI_API_KEY) and an
    // unlisted one; the first commit carries it so the tree is clean.
    h.write(
        &h.project.join(".env.local"),
        "OPENAI_API_KEY=sk-openai-from-env-file\nNOT_LISTED_IN_FILE=file-canary\n",
    );

    // `tokens` names and sources, never values.
    let r = h.ks_env(&["tokens"], &env());
    r.ok();
    let out = r.stdout.clone();
    for (var, source) in [
        ("ANTHROPIC_API_KEY", "host environment"),
        ("OPENAI_API_KEY", ".env.local"),
        ("GEMINI_API_KEY", "not set"),
        ("CLAUDE_CODE_OAUTH_TOKEN", "not set"),
        ("GOOGLE_API_KEY", "not set"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(var) && l.trim_end().ends_with(source)),
            "tokens should list {var} from {source}:\n{out}"
        );
    }
    for secret in [
        ANTHROPIC_KEY,
        "sk-openai-from-env-file",
        UNLISTED.1,
        "file-canary",
    ] {
        assert!(
            !r.text().contains(secret),
            "tokens printed a value:\n{}",
            r.text()
        );
    }
    assert!(!out.contains(UNLISTED.0) && !out.contains("NOT_LISTED_IN_FILE"));

    // Cold or cached, the first start builds or finds the full image.
    let t = Instant::now();
    let r = h.ks_env(&["start", "--no-attach"], &env());
    r.ok();
    eprintln!(
        "first start (image build if not cached): {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        r.stdout
            .contains("credentials: ANTHROPIC_API_KEY, OPENAI_API_KEY"),
        "{}",
        r.text()
    );

    // Each agent runs as `agent` at its pinned version.
    assert_eq!(h.sh("id -un").trim(), "agent");
    // (One exec for the three, each output after a marker line.)
    let script: String = VERSIONS
        .iter()
        .map(|(cmd, _)| format!("echo '@@{cmd}'; {cmd} --version 2>/dev/null; "))
        .collect();
    let out = h.sh(&format!("set -e; {script}"));
    for (cmd, version) in VERSIONS {
        let got = out
            .split(&format!("@@{cmd}\n"))
            .nth(1)
            .map(|rest| rest.split("@@").next().unwrap_or(""))
            .unwrap_or_else(|| panic!("no output of {cmd} --version in:\n{out}"));
        assert_eq!(got.trim(), *version, "{cmd} --version");
    }

    // The forward list: listed variables arrive in exec, unlisted do not,
    // and the file holding them is the agent's alone.
    assert_eq!(h.sh("printenv ANTHROPIC_API_KEY").trim(), ANTHROPIC_KEY);
    assert_eq!(
        h.sh("printenv OPENAI_API_KEY").trim(),
        "sk-openai-from-env-file"
    );
    let r = h.ks(&["exec", "--", "bash", "-c", "env"]);
    r.ok();
    assert!(!r.stdout.contains(UNLISTED.0) && !r.stdout.contains(UNLISTED.1));
    // The env files themselves are project configuration that SPEC.md
    // has copied into /workspace and loaded by direnv, so a variable in
    // them is there even off the forward list (env_files decides).
    assert!(
        r.stdout.contains("NOT_LISTED_IN_FILE=file-canary"),
        "{}",
        r.stdout
    );
    assert_eq!(
        h.sh("stat -c '%a %U' /home/agent/.config/keystone/env")
            .trim(),
        "600 agent"
    );
    // ...and in the session's shells (an interactive shell in tmux; the
    // keys go once it shows its prompt, the pane is read once the answer
    // is there, each wait at most 10 s).
    let session_env = h.sh(&format!(
        "tmux new-session -d -s envcheck -x 100 -y 20 'bash -i' && \
         for i in $(seq 100); do [ -n \"$(tmux capture-pane -p -t envcheck | tr -d '[:space:]')\" ] && break; sleep 0.1; done; \
         tmux send-keys -t envcheck 'echo \"K=${{ANTHROPIC_API_KEY}} U=${{{u}:-absent}}\"' Enter && \
         for i in $(seq 100); do tmux capture-pane -p -t envcheck | grep -q '^K=' && break; sleep 0.1; done; \
         tmux capture-pane -p -t envcheck; tmux kill-session -t envcheck",
        u = UNLISTED.0
    ));
    assert!(
        session_env.contains(&format!("K={ANTHROPIC_KEY} U=absent")),
        "session env:\n{session_env}"
    );
    // The host process list never carried a value: the ssh client got a
    // cleared environment and the values went over its stdin.
    assert!(processes_matching(ANTHROPIC_KEY).is_empty());
    if depth == Depth::Backend {
        return;
    }

    // The scripted model endpoint, inside the sandbox.
    h.sh(&format!(
        "cat > /tmp/mock-model.js <<'KEYSTONE_MOCK_EOF'\n{MOCK_MODEL}\nKEYSTONE_MOCK_EOF\n\
         mkdir -p /workspace/proof && LOG=/tmp/mock-model.log setsid -f node /tmp/mock-model.js {PORT} /workspace/proof \
         >/tmp/mock-model.out 2>&1 </dev/null; \
         for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:{PORT}/ && exit 0; sleep 0.2; done; cat /tmp/mock-model.out; exit 1"
    ));
    let proof = |agent: &str| {
        h.sh(&format!(
            "cat /workspace/proof/{agent}-file.txt /workspace/proof/{agent}-cmd.txt 2>/dev/null; true"
        ))
    };
    let expect = |agent: &str| format!("written by {agent} through the scripted model\nagent\n");

    // Claude Code: control first — without ~/.claude/settings.json the same
    // scripted tool calls are refused (nobody can answer a prompt in -p).
    let claude = format!(
        "cd /workspace && ANTHROPIC_BASE_URL=http://127.0.0.1:{PORT} timeout 180 claude -p 'write the proof file' </dev/null"
    );
    h.sh(&format!(
        "mv ~/.claude/settings.json /tmp/claude-settings.json; {claude} >/tmp/claude-control.out 2>&1; \
         mv /tmp/claude-settings.json ~/.claude/settings.json"
    ));
    assert_eq!(
        proof("claude"),
        "",
        "Claude Code wrote without keystone's settings"
    );
    let r = h.ks(&["exec", "--", "bash", "-c", &claude]);
    r.ok();
    assert_eq!(
        proof("claude"),
        expect("claude"),
        "claude output:\n{}",
        r.text()
    );

    // Gemini CLI: the control bypasses keystone's wrapper (no YOLO).
    let gemini_env = format!(
        "cd /workspace && GEMINI_API_KEY=test-key GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:{PORT} timeout 180"
    );
    h.sh(&format!(
        "{gemini_env} /usr/local/lib/node_modules/@google/gemini-cli/bundle/gemini.js -p 'write the proof file' \
         </dev/null >/tmp/gemini-control.out 2>&1; true"
    ));
    assert_eq!(proof("gemini"), "", "Gemini CLI wrote without YOLO");
    let r = h.ks(&[
        "exec",
        "--",
        "bash",
        "-c",
        &format!("{gemini_env} gemini -p 'write the proof file' </dev/null"),
    ]);
    r.ok();
    assert_eq!(
        proof("gemini"),
        expect("gemini"),
        "gemini output:\n{}",
        r.text()
    );

    // Codex: a model provider pointed at the endpoint; its header shows the
    // policy it read from ~/.codex/config.toml.
    let r = h.ks(&[
        "exec",
        "--",
        "bash",
        "-c",
        &format!(
            "cd /workspace && timeout 180 codex exec -m gpt-5 -c model_provider='\"mock\"' \
             -c 'model_providers.mock={{name=\"mock\",base_url=\"http://127.0.0.1:{PORT}/v1\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}' \
             'write the proof file' </dev/null 2>&1"
        ),
    ]);
    r.ok();
    assert!(r.stdout.contains("approval: never"), "{}", r.text());
    assert!(
        r.stdout.contains("sandbox: danger-full-access"),
        "{}",
        r.text()
    );
    assert_eq!(
        proof("codex"),
        expect("codex"),
        "codex output:\n{}",
        r.text()
    );

    // `start --agent claude`: the main session runs Claude Code in
    // /workspace, past every first-run question, in bypass mode. The
    // restart is cached: no image build.
    h.ks(&["stop", &name]).ok();
    let t = Instant::now();
    let r = h.ks_env(&["start", "--no-attach", "--agent", "claude"], &env());
    r.ok();
    eprintln!(
        "cached start with --agent claude: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        !r.text().contains("building"),
        "a cached start rebuilt:\n{}",
        r.text()
    );
    let session = format!("{name}-main");
    let mut pane = String::new();
    // Claude Code draws its UI once its start-up requests (remote managed
    // settings) answer or fail: at once with --network none, ~20 s where
    // they must time out.
    let shown = eventually(Duration::from_secs(120), || {
        pane = h.sh(&format!("tmux capture-pane -p -t {session}: 2>&1; true"));
        pane.contains("Claude Code") && pane.contains("bypass permissions on")
    });
    eprintln!("--- pane of {session}:\n{pane}");
    assert!(
        shown,
        "Claude Code's UI did not appear in {session}:\n{pane}"
    );
    for question in [
        "Do you trust",
        "Detected a custom API key",
        "Make auto mode your default",
        "Choose the text style",
        "Yes, I accept",
    ] {
        assert!(
            !pane.contains(question),
            "a first-run question ({question}) is showing:\n{pane}"
        );
    }
    assert!(pane.contains("/workspace"), "{pane}");
    // And `attach` itself, on a terminal (util-linux `script` gives it one),
    // lands in that UI; the client is cut off after a few seconds.
    let screen = attach_screen(&h, Duration::from_secs(8));
    assert!(
        screen.contains("bypasspermissionson"),
        "attach showed:\n{screen}"
    );

    // An agent not in the image is refused with a way out.
    let r = h.ks(&[
        "start",
        "--no-attach",
        "--agent",
        "gemini",
        "--profile",
        "minimal",
        "--fresh",
    ]);
    r.code(2);
    assert!(
        r.text().contains("minimal profile has no agents"),
        "{}",
        r.text()
    );

    h.ks(&["destroy", &name, "--force"]).ok();
}
