//! The agents (issue 6), on the full image with all three enabled: each
//! one's `--version` as `agent`; the credentials (issue 17): the guest
//! holds placeholders only (same length and prefix as the real keys, which
//! stay in the host's environment), nothing it can read holds a real key
//! or keystone's CA key, and the egress point swaps each placeholder for
//! the real key on the way to its API; auto-accept proven against the
//! scripted model (tests/fixtures/mock-model.js) in the egress lab
//! (lab.rs), reached at the APIs' real names and default endpoints
//! through the allowlist, which answers only requests that carry the REAL
//! keys (and, for Claude Code and Gemini CLI, a control run without
//! keystone's setting that must not write anything); `tokens --json`
//! counting the injections; `start --agent claude` landing in Claude
//! Code's UI; Vite installed from the npm registry and served.
//!
//! What the agents do with their settings is the image's, the same bytes
//! on every backend, so the scripted-model runs and the `--agent` session
//! run on the container backend ([`Depth::Agents`]); the microVM, under
//! software emulation minutes slower, proves what differs by backend
//! ([`Depth::Backend`]): the full image converted to its disk and booted,
//! every agent running at its pinned version, and the placeholders
//! delivered to exec and to the session's shells with no real key in the
//! guest.

/// How much of the scenario a backend runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Everything.
    Agents,
    /// Up to and including the forward list in exec and sessions.
    Backend,
}

use crate::harness::*;
use crate::lab::{Lab, LAB_V4, PROOF_DIR};
use std::time::{Duration, Instant};

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

/// The egress presets the agents' sandbox allows: each agent's vendor
/// hosts (the model APIs among them) and the package registries (npm, for
/// the Vite check).
const PRESETS: &[&str] = &["claude", "gemini", "codex", "registries"];

/// keystone's default forward list, and a variable of the user's own that
/// an env file supplies.
const FORWARD_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    ENV_FILE_VAR,
];
const ENV_FILE_VAR: &str = "KEYSTONE_ENV_FILE_TOKEN";

/// The full image with every agent enabled, behind the allowlist: the
/// agents' own hosts and the registries. With `resolver` (the lab's DNS),
/// the model APIs' names lead to the lab, whose certificate for them the
/// lab CA signed (keystone trusts it through `SSL_CERT_FILE`) and whose
/// scripted model answers them; every other name is refused at once, so
/// the agents' other start-up calls fail fast. Without, names resolve as
/// on the host (the real registries). The guest trusts the host's extra
/// CAs (`guest.trust_host_cas`, "auto" by default), which a
/// TLS-inspecting network's registry traffic needs.
fn write_config(h: &Host, backend: &str, resolver: Option<&str>) {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let resolver = resolver
        .map(|r| format!("resolver = \"{r}\"\n"))
        .unwrap_or_default();
    h.write(
        &h.tmp.path().join("config/keystone/agent.toml"),
        &format!(
            "[defaults]\nmemory = 4096\nvcpus = 2\n\n[backend]\ntype = \"{backend}\"\n\n\
[guest]\nprofile = \"full\"\nforward_env = [{forward}]\n\n\
[guest.agents.claude]\nenable = true\nauto_accept = true\n\
[guest.agents.gemini]\nenable = true\nauto_accept = true\n\
[guest.agents.codex]\nenable = true\nauto_accept = true\n\n\
[egress]\nmode = \"allowlist\"\npresets = [{presets}]\n{resolver}\n\
[proxy]\nenable = false\n",
            forward = list(FORWARD_ENV),
            presets = list(PRESETS),
        ),
    );
}

/// The host's side of the credentials: the REAL keys, in the host's
/// environment (the guest must only ever see placeholders for them); one
/// unlisted variable that must never arrive.
struct Keys {
    anthropic: String,
    openai: String,
    gemini: String,
}

impl Keys {
    fn new() -> Keys {
        use crate::harness::credentials::{random, ALNUM};
        Keys {
            anthropic: format!("sk-ant-api03-{}", random(ALNUM, 60)),
            openai: format!("sk-proj-{}", random(ALNUM, 48)),
            gemini: format!("AIza{}", random(ALNUM, 35)),
        }
    }

    /// (variable, real value, the model API's host).
    fn each(&self) -> [(&'static str, &str, &'static str); 3] {
        [
            ("ANTHROPIC_API_KEY", &self.anthropic, "api.anthropic.com"),
            ("OPENAI_API_KEY", &self.openai, "api.openai.com"),
            (
                "GEMINI_API_KEY",
                &self.gemini,
                "generativelanguage.googleapis.com",
            ),
        ]
    }
}

const UNLISTED: (&str, &str) = ("KEYSTONE_UNLISTED_SECRET", "unlisted-canary-value");

/// Standard base64 (for values passed into the guest without their text
/// appearing in a command line).
fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Guest root searches what it can read for any of `needles`: every file
/// outside /proc, /sys and /dev (and /usr too unless `whole`: the image's
/// own files, large, and the same on every backend), and every process's
/// environment and command line. The needles go in base64, decoded into a
/// pipe: neither the exec's command line nor any file holds their text.
/// The files and processes that hold one.
fn guest_holds(h: &Host, needles: &[&str], whole: bool) -> Vec<String> {
    let script = scan_script(needles, whole);
    let r = h.ks(&["exec", "--user", "root", "--", "bash", "-c", &script]);
    assert!(
        r.stdout.contains("KS-SCANNED"),
        "the guest scan did not finish:\n{}",
        r.text()
    );
    r.stdout
        .lines()
        .filter(|l| l.starts_with("LEAK-"))
        .map(str::to_string)
        .collect()
}

/// [`guest_holds`]'s script.
fn scan_script(needles: &[&str], whole: bool) -> String {
    assert!(needles.iter().all(|n| n.len() >= 16), "needles too short");
    let b64 = base64(needles.join("\n").as_bytes());
    let skip = if whole {
        "/proc|/sys|/dev"
    } else {
        "/proc|/sys|/dev|/usr"
    };
    format!(
        "pats() {{ printf '%s' '{b64}' | base64 -d; }}\n\
         dirs=(); for d in /*; do case \"$d\" in {skip}) ;; *) dirs+=(\"$d\");; esac; done\n\
         timeout 600 grep -rlsF -D skip -f <(pats) \"${{dirs[@]}}\" | sed 's/^/LEAK-FILE /'\n\
         grep -lasF -f <(pats) /proc/[0-9]*/environ /proc/[0-9]*/cmdline | sed 's/^/LEAK-PROC /'\n\
         echo KS-SCANNED\n"
    )
}

/// The lines of the keystone CA's private key that identify it (its
/// base64 body, long lines only).
fn ca_key_needles(h: &Host) -> Vec<String> {
    use crate::harness::credentials::{ca_key_path, KEYSTONE_CA_KEY};
    let path = ca_key_path(h);
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the keystone CA's key is not at {} ({e}): fix KEYSTONE_CA_KEY ({KEYSTONE_CA_KEY}) in harness.rs",
            path.display()
        )
    });
    let lines: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "{} holds no PEM body", path.display());
    lines
}

pub fn agents_work_without_prompts(backend: &str, depth: Depth) {
    use crate::harness::credentials::{
        assert_placeholder, entry, tokens_json, used, FIELD_HOSTS, FIELD_SOURCE,
    };
    let mut lab = Lab::start();
    let keys = Keys::new();
    let mut h = Host::new(backend, &format!("agents-{backend}"));
    write_config(&h, backend, Some(LAB_V4));
    // Every keystone run gets the real keys, the unlisted canary and the
    // lab CA in its trust store (the egress point verifies the model APIs
    // against it).
    for (var, real, _) in keys.each() {
        h.extra_env.push((var.to_string(), real.to_string()));
    }
    h.extra_env
        .push((UNLISTED.0.to_string(), UNLISTED.1.to_string()));
    h.extra_env.push((
        "SSL_CERT_FILE".to_string(),
        lab.ca_bundle().display().to_string(),
    ));
    let h = h;
    let name = h.name();
    // An env file supplies a listed variable and an unlisted one; the
    // first commit carries it so the tree is clean.
    let env_file_value = format!(
        "ksf-{}",
        crate::harness::credentials::random(crate::harness::credentials::ALNUM, 32)
    );
    h.write(
        &h.project.join(".env.local"),
        &format!("{ENV_FILE_VAR}={env_file_value}\nNOT_LISTED_IN_FILE=file-canary\n"),
    );
    let reals: Vec<&str> = keys.each().iter().map(|(_, r, _)| *r).collect();

    // `tokens` names and sources, never values.
    let r = h.ks(&["tokens"]);
    r.ok();
    let out = r.stdout.clone();
    for (var, source) in [
        ("ANTHROPIC_API_KEY", "host environment"),
        ("OPENAI_API_KEY", "host environment"),
        ("GEMINI_API_KEY", "host environment"),
        (ENV_FILE_VAR, ".env.local"),
        ("CLAUDE_CODE_OAUTH_TOKEN", "not set"),
        ("GOOGLE_API_KEY", "not set"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(var) && l.contains(source)),
            "tokens should list {var} from {source}:\n{out}"
        );
    }
    let values: Vec<&str> = reals
        .iter()
        .copied()
        .chain([env_file_value.as_str(), UNLISTED.1, "file-canary"])
        .collect();
    for secret in &values {
        assert!(
            !r.text().contains(secret),
            "tokens printed a value:\n{}",
            r.text()
        );
    }
    assert!(!out.contains(UNLISTED.0) && !out.contains("NOT_LISTED_IN_FILE"));

    // Cold or cached, the first start builds or finds the full image.
    let t = Instant::now();
    let r = h.ks(&["start", "--no-attach"]);
    r.ok();
    eprintln!(
        "first start (image build if not cached): {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let credentials = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("credentials:"))
        .unwrap_or_else(|| panic!("start names no credentials:\n{}", r.text()));
    for var in ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"] {
        assert!(credentials.contains(var), "{credentials}");
    }
    for secret in &values {
        assert!(
            !r.text().contains(secret),
            "start printed a value:\n{}",
            r.text()
        );
    }

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

    // The forward list: listed variables arrive in exec as placeholders
    // (the real values stay on the host), unlisted do not arrive, and the
    // file holding them is the agent's alone.
    let printed = h.sh(
        "for v in ANTHROPIC_API_KEY OPENAI_API_KEY GEMINI_API_KEY; do echo \"@@$v=$(printenv $v)\"; done",
    );
    let mut placeholders = Vec::new();
    for (var, real, _) in keys.each() {
        let got = printed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("@@{var}=")))
            .unwrap_or_else(|| panic!("no {var} in:\n{printed}"))
            .trim()
            .to_string();
        assert_placeholder(var, real, &got);
        placeholders.push(got);
    }
    let r = h.ks(&["exec", "--", "bash", "-c", "env"]);
    r.ok();
    assert!(!r.stdout.contains(UNLISTED.0) && !r.stdout.contains(UNLISTED.1));
    for real in &reals {
        assert!(!r.stdout.contains(real), "a real key in the guest's env");
    }
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
    // ...and in the session's shells, the same placeholder (an
    // interactive shell in tmux; the keys go once it shows its prompt,
    // the pane is read once the answer is there, each wait at most 10 s).
    let session_env = h.sh(&format!(
        "tmux new-session -d -s envcheck -x 200 -y 20 'bash -i' && \
         for i in $(seq 100); do [ -n \"$(tmux capture-pane -p -t envcheck | tr -d '[:space:]')\" ] && break; sleep 0.1; done; \
         tmux send-keys -t envcheck 'echo \"K=${{ANTHROPIC_API_KEY}} U=${{{u}:-absent}}\"' Enter && \
         for i in $(seq 100); do tmux capture-pane -p -t envcheck | grep -q '^K=' && break; sleep 0.1; done; \
         tmux capture-pane -p -J -t envcheck; tmux kill-session -t envcheck",
        u = UNLISTED.0
    ));
    assert!(
        session_env.contains(&format!("K={} U=absent", placeholders[0])),
        "session env (placeholder {}):\n{session_env}",
        placeholders[0]
    );
    // The host process list never carried a value: the ssh client got a
    // cleared environment and the values went over its stdin.
    for real in &reals {
        assert!(processes_matching(real).is_empty());
    }
    // Nothing the guest can read holds a real key or the keystone CA's
    // private key (guest root looking; files outside the image's own /usr
    // here, everything once the agents have run below).
    let mut needles: Vec<String> = reals.iter().map(|r| r.to_string()).collect();
    needles.extend(ca_key_needles(&h));
    // The env file's copy in /workspace carries a placeholder in place of
    // the listed variable's value.
    needles.push(env_file_value.clone());
    let needle_refs: Vec<&str> = needles.iter().map(String::as_str).collect();
    let leaks = guest_holds(&h, &needle_refs, false);
    assert!(
        leaks.is_empty(),
        "the guest holds a real key or the CA's key:\n{}",
        leaks.join("\n")
    );
    if depth == Depth::Backend {
        return;
    }

    // The scripted model, in the lab behind the model APIs' real names:
    // it answers only requests that carry a REAL key, so a proof file
    // shows the egress point swapped the placeholder for it.
    lab.start_model(&reals);
    h.sh(&format!("mkdir -p {PROOF_DIR}"));
    let proof = |agent: &str| {
        h.sh(&format!(
            "cat {PROOF_DIR}/{agent}-file.txt {PROOF_DIR}/{agent}-cmd.txt 2>/dev/null; true"
        ))
    };
    let expect = |agent: &str| format!("written by {agent} through the scripted model\nagent\n");

    // Claude Code, at its default endpoint: control first — without
    // ~/.claude/settings.json the same scripted tool calls are refused
    // (nobody can answer a prompt in -p).
    let claude = "cd /workspace && timeout 180 claude -p 'write the proof file' </dev/null";
    h.sh(&format!(
        "mv ~/.claude/settings.json /tmp/claude-settings.json; {claude} >/tmp/claude-control.out 2>&1; \
         mv /tmp/claude-settings.json ~/.claude/settings.json"
    ));
    assert_eq!(
        proof("claude"),
        "",
        "Claude Code wrote without keystone's settings"
    );
    let r = h.ks(&["exec", "--", "bash", "-c", claude]);
    r.ok();
    assert_eq!(
        proof("claude"),
        expect("claude"),
        "claude output:\n{}\nmodel log:\n{:?}",
        r.text(),
        lab.model_events()
    );

    // Gemini CLI, at its default endpoint: the control bypasses
    // keystone's wrapper (no YOLO).
    let gemini_env = "cd /workspace && timeout 180";
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
        "gemini output:\n{}\nmodel log:\n{:?}",
        r.text(),
        lab.model_events()
    );

    // Codex believes it is logged in: keystone wrote the `auth.json` that
    // `codex login --with-api-key` writes, holding the placeholder.
    let status = h.sh("codex login status 2>&1; true");
    assert!(
        status.contains("API key") && !status.contains("Not logged in"),
        "codex login status:\n{status}"
    );
    let auth = h.sh("cat ~/.codex/auth.json");
    assert!(
        auth.contains("\"apikey\"") && auth.contains(&placeholders[1]),
        "~/.codex/auth.json holds the placeholder:\n{auth}"
    );

    // Codex: a model provider at OpenAI's real endpoint, reading
    // OPENAI_API_KEY (the built-in provider takes its key from a login
    // instead); its header shows the policy it read from
    // ~/.codex/config.toml.
    let r = h.ks(&[
        "exec",
        "--",
        "bash",
        "-c",
        "cd /workspace && timeout 180 codex exec -m gpt-5 -c model_provider='\"ks\"' \
         -c 'model_providers.ks={name=\"ks\",base_url=\"https://api.openai.com/v1\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}' \
         'write the proof file' </dev/null 2>&1",
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
        "codex output:\n{}\nmodel log:\n{:?}",
        r.text(),
        lab.model_events()
    );

    // What arrived: each API's requests carried its real key (the lab's
    // log of the headers), in the header that API uses (the model's).
    let model = lab.model_events();
    for ((var, real, host), via) in
        keys.each()
            .iter()
            .zip(["x-api-key", "authorization", "x-goog-api-key"])
    {
        let seen = lab.requests_with_header_value(real);
        assert!(
            seen.iter().any(|e| e["sni"] == *host),
            "no request to {host} carried the real {var}:\n{}",
            lab.dump()
        );
        assert!(
            seen.iter().all(|e| e["sni"] == *host),
            "the real {var} reached another name than {host}:\n{seen:?}"
        );
        let last4 = &real[real.len() - 4..];
        assert!(
            model.iter().any(|e| e["authorized"] == true
                && e["auth"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|k| k["via"] == via && k["last4"] == last4))),
            "the scripted model never got {var} in {via}: {model:?}"
        );
    }
    for p in &placeholders {
        assert!(
            lab.requests_with_header_value(p).is_empty(),
            "a placeholder reached a model API:\n{}",
            lab.dump()
        );
    }

    // `tokens --json`: each credential's source, hosts and uses; the
    // agents' three were each injected.
    let list = tokens_json(&h, &[]);
    for (var, _, host) in keys.each() {
        let e = entry(&list, var);
        assert_eq!(e[FIELD_SOURCE], "host environment", "{e}");
        assert!(
            e[FIELD_HOSTS]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == host)),
            "{var}'s hosts do not include {host}: {e}"
        );
        assert!(used(&list, var) > 0, "{var} was never injected: {e}");
    }
    let r = h.ks(&["tokens", "--json"]);
    for secret in &values {
        assert!(!r.text().contains(secret), "tokens --json printed a value");
    }
    let r = h.ks(&["tokens"]);
    r.ok();
    for secret in &values {
        assert!(
            !r.text().contains(secret),
            "tokens printed a value:\n{}",
            r.text()
        );
    }

    // After the agents ran (their logs, caches and settings written), the
    // whole guest still holds no real key and not the CA's key.
    let leaks = guest_holds(&h, &needle_refs, true);
    assert!(
        leaks.is_empty(),
        "the guest holds a real key or the CA's key:\n{}",
        leaks.join("\n")
    );

    // `start --agent claude`: the main session runs Claude Code in
    // /workspace, past every first-run question, in bypass mode. The
    // restart is cached: no image build.
    h.ks(&["stop", &name]).ok();
    let t = Instant::now();
    let r = h.ks(&["start", "--no-attach", "--agent", "claude"]);
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
    // settings) answer or fail: at once where the lab answers or refuses
    // them, ~20 s where they must time out.
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

    // Vite through the egress point, from the real npm registry: the
    // registry is tunnelled untouched (no credential's host), so on a
    // network that re-signs TLS the install passes only because the guest
    // trusts the host's extra CAs. Names resolve as on the host here.
    h.ks(&["stop", &name]).ok();
    write_config(&h, backend, None);
    h.ks(&["start", "--no-attach"]).ok();
    vite_serves(&h);

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

/// `npm install vite` in a fresh directory, then `npx vite` serving an
/// index.html that curl in the sandbox fetches; every wait bounded.
fn vite_serves(h: &Host) {
    let marker = format!(
        "vite-ok-{}",
        crate::harness::credentials::random(crate::harness::credentials::ALNUM, 12)
    );
    let r = h.ks(&[
        "exec",
        "--",
        "bash",
        "-c",
        &format!(
            "set -e; rm -rf /tmp/vite-app; mkdir /tmp/vite-app; cd /tmp/vite-app; \
             npm init -y >/dev/null; \
             timeout 600 npm install --no-audit --no-fund --no-update-notifier --fetch-timeout=120000 vite 2>&1 | tail -20; \
             test -x node_modules/.bin/vite; \
             echo '<!doctype html><h1>{marker}</h1>' > index.html; \
             setsid -f timeout 180 npx --no-install vite --port 5173 --strictPort --host 127.0.0.1 \
               >/tmp/vite.log 2>&1 </dev/null; \
             for i in $(seq 300); do curl -s --noproxy '*' --max-time 2 http://127.0.0.1:5173/ | grep -q '{marker}' && break; sleep 0.2; done; \
             echo '@@page'; curl -sS --noproxy '*' --max-time 5 http://127.0.0.1:5173/ || {{ cat /tmp/vite.log; exit 1; }}"
        ),
    ]);
    let page = r.stdout.split("@@page\n").nth(1).unwrap_or("");
    assert!(
        r.code == Some(0) && page.contains(&marker),
        "npm install vite / npx vite through the egress point:\n{}",
        r.text()
    );
}

/// The scan finds a needle in a file and in a process's environment, and
/// nothing else (run on the host, over a temporary directory).
#[test]
fn scan_script_finds_needles() {
    let dir = tempfile::tempdir().expect("tmp");
    let needle = "sk-ant-api03-scan-selftest-0123456789";
    std::fs::write(dir.path().join("has"), format!("x{needle}y")).expect("write");
    std::fs::write(dir.path().join("hasnt"), "nothing here").expect("write");
    assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
    assert_eq!(base64(b"any carnal pleasu"), "YW55IGNhcm5hbCBwbGVhc3U=");
    let script = scan_script(&[needle, "another-needle-0123456789"], true)
        .replace("/*; do", &format!("{}/*; do", dir.path().display()));
    assert!(!script.contains(needle));
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .env("KS_SCAN_SELFTEST", needle)
        .spawn()
        .expect("sleep");
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.contains("KS-SCANNED"), "{out}");
    let files: Vec<&str> = out.lines().filter(|l| l.starts_with("LEAK-FILE")).collect();
    assert_eq!(
        files,
        [format!("LEAK-FILE {}/has", dir.path().display())],
        "{out}"
    );
    assert!(
        out.contains(&format!("LEAK-PROC /proc/{}/environ", sleeper.id())),
        "{out}"
    );
}
