//! Fast tests of the command line that need no guest image: help, bad
//! input and configuration. They drive the real binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{run_bounded, Dirs, Run};

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `keystone ARGS` in `dir`, with the test's own home, state, config
    /// and cache, and `env` on top.
    fn ks_in(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(support::keystone_exe());
        Dirs::under(self.tmp.path(), self.path("cache"))
            .isolate(&mut cmd)
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied());
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// `keystone agent start --no-attach --backend container EXTRA` in `dir`.
    fn start(&self, dir: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["agent", "start", "--no-attach", "--backend", "container"];
        args.extend_from_slice(extra);
        self.ks_in(dir, &args, &[])
    }

    /// A repository with one empty commit.
    fn repo(&self) -> PathBuf {
        let dir = self.path("proj");
        std::fs::create_dir_all(&dir).expect("mkdir");
        git(&dir, &["init", "-q", "-b", "main"]);
        git(
            &dir,
            &[
                "-c",
                "user.name=T",
                "-c",
                "user.email=t@example.com",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "init",
            ],
        );
        dir
    }
}

/// `git ARGS` in `dir`; fails the test unless it succeeds.
#[track_caller]
fn git(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("git");
    cmd.args(args).current_dir(dir);
    let r = run_bounded(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "git {args:?}:\n{}", r.text());
}

#[test]
fn help_lists_every_command_and_option_of_the_spec() {
    let env = Env::new();
    let out = env.ks_in(env.tmp.path(), &["agent", "--help"], &[]);
    out.ok();
    let help = out.text();
    for cmd in [
        "start", "stop", "attach", "sync", "worktree", "status", "list", "destroy", "exec", "ssh",
        "config", "image", "doctor", "allow", "deny", "egress",
    ] {
        assert!(help.contains(cmd), "agent --help lacks {cmd}:\n{help}");
    }
    let options: &[(&[&str], &[&str])] = &[
        (
            &["start"],
            &[
                "--name",
                "--memory",
                "--vcpus",
                "--no-nested",
                "--fresh",
                "--network",
                "--sync-mode",
                "--no-attach",
                "--agent",
                "--backend",
                "--strict",
                "--egress",
                "--allow",
            ],
        ),
        (&["egress", "log"], &["--follow", "--json", "--denied"]),
        (&["stop"], &["--force", "--sync"]),
        (&["attach"], &["--worktree", "--web"]),
        (&["sync"], &["--artifacts", "--dry-run", "--branch"]),
        (&["status"], &["--json", "--all"]),
        (&["list"], &["--json", "--state"]),
        (&["destroy"], &["--force", "--keep-disk"]),
        (&["exec"], &["--worktree", "--user"]),
        (&["ssh"], &["--port"]),
        (&["worktree", "add"], &["--create"]),
        (&["worktree", "remove"], &["--force"]),
        (&["image", "build"], &["--profile"]),
    ];
    for (cmd, opts) in options {
        let mut args = vec!["agent"];
        args.extend_from_slice(cmd);
        args.push("--help");
        let help = env.ks_in(env.tmp.path(), &args, &[]).text();
        for o in *opts {
            assert!(help.contains(o), "{cmd:?} --help lacks {o}:\n{help}");
        }
    }
}

#[test]
fn a_bad_egress_rule_is_refused_before_anything_is_made() {
    let env = Env::new();
    env.ks_in(
        env.tmp.path(),
        &["agent", "allow", "nosuch", "bad host!"],
        &[],
    )
    .code(2)
    .says("rule \"bad host!\"");
    env.ks_in(env.tmp.path(), &["agent", "deny", "*.com"], &[])
        .code(2)
        .says("*.com");
    env.start(&env.repo(), &["--allow", "http://example.com/"])
        .code(2)
        .says("--allow: rule \"http://example.com/\"");
    env.ks_in(env.tmp.path(), &["agent", "list", "--json"], &[])
        .ok()
        .says("[]");
}

#[test]
fn start_outside_a_git_repository_exits_1() {
    let env = Env::new();
    let dir = env.path("not-a-repo");
    std::fs::create_dir_all(&dir).expect("mkdir");
    env.start(&dir, &[])
        .code(1)
        .says("not inside a git repository");
}

#[test]
fn memory_below_1024_is_refused() {
    let env = Env::new();
    env.start(&env.repo(), &["--memory", "512"])
        .code(2)
        .says("--memory 512: memory must be at least 1024");
}

#[test]
fn invalid_name_is_refused() {
    let env = Env::new();
    env.start(&env.repo(), &["--name", "Bad_Name"])
        .code(2)
        .says("invalid sandbox name");
}

#[test]
fn unknown_sandbox_exits_1() {
    let env = Env::new();
    for args in [
        &["agent", "status", "nosuch"][..],
        &["agent", "stop", "nosuch"],
        &["agent", "exec", "nosuch", "--", "true"],
        &["agent", "destroy", "nosuch", "--force"],
        &["agent", "allow", "nosuch", "example.com"],
        &["agent", "deny", "nosuch", "example.com"],
        &["agent", "egress", "log", "nosuch"],
    ] {
        let out = env.ks_in(env.tmp.path(), args, &[]);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.text());
        out.says("no sandbox named \"nosuch\"");
    }
}

#[test]
fn malformed_config_names_path_line_and_column() {
    let env = Env::new();
    let repo = env.repo();
    let cfg = env.path("config/keystone/agent.toml");
    std::fs::create_dir_all(cfg.parent().expect("parent")).expect("mkdir");
    std::fs::write(&cfg, "[defaults]\nmemory = 4096\nvcpus = \"four\"\n").expect("write");
    let out = env.ks_in(&repo, &["agent", "config"], &[]);
    out.code(2).says(&format!("{}:3:9", cfg.display()));

    std::fs::write(&cfg, "[defaults]\nmemroy = 4096\n").expect("write");
    let out = env.ks_in(&repo, &["agent", "start", "--no-attach"], &[]);
    out.code(2).says(&format!("{}:2:1", cfg.display()));
}

#[test]
fn config_shows_each_value_and_its_origin() {
    let env = Env::new();
    let repo = env.repo();
    let cfg = env.path("config/keystone/agent.toml");
    std::fs::create_dir_all(cfg.parent().expect("parent")).expect("mkdir");
    std::fs::write(&cfg, "[defaults]\nvcpus = 2\n").expect("write");
    std::fs::create_dir_all(repo.join(".keystone")).expect("mkdir");
    std::fs::write(
        repo.join(".keystone/agent.toml"),
        "[defaults]\npersist = false\n",
    )
    .expect("write");
    let out = env.ks_in(&repo, &["agent", "trust"], &[]);
    out.ok();
    let out = env.ks_in(
        &repo,
        &["agent", "config"],
        &[("KEYSTONE_AGENT_MEMORY", "4096")],
    );
    out.ok();
    let t = out.text();
    let line = |key: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("defaults.memory").contains("4096")
            && line("defaults.memory").contains("env KEYSTONE_AGENT_MEMORY"),
        "{t}"
    );
    assert!(line("defaults.vcpus").contains("user file"), "{t}");
    assert!(
        line("defaults.persist").contains("false")
            && line("defaults.persist").contains("project file"),
        "{t}"
    );
    assert!(line("defaults.network").contains("default"), "{t}");
}

/// The project file is the sandbox's words (sync writes the tree): it
/// counts only once trusted, only as trusted, and never for host-only keys.
#[test]
fn the_project_file_counts_only_once_trusted() {
    let env = Env::new();
    let repo = env.repo();
    std::fs::create_dir_all(repo.join(".keystone")).expect("mkdir");
    let file = repo.join(".keystone/agent.toml");
    std::fs::write(
        &file,
        "[defaults]\nvcpus = 3\nartifacts = [\".git/hooks\"]\n[guest]\nforward_env = [\"HOST_SECRET\"]\n",
    )
    .expect("write");
    let value = |t: &str, key: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or("")
            .to_string()
    };

    // Never trusted: ignored, with one line saying how to trust it.
    let out = env.ks_in(&repo, &["agent", "config"], &[]);
    let t = out.text();
    out.ok();
    assert!(value(&t, "defaults.vcpus").contains("default"), "{t}");
    assert!(
        t.contains("is not trusted") && t.contains("keystone agent trust"),
        "{t}"
    );

    // --show changes nothing.
    let out = env.ks_in(&repo, &["agent", "trust", "--show"], &[]);
    out.ok();
    out.says("not trusted");
    let t = env.ks_in(&repo, &["agent", "config"], &[]).text();
    assert!(value(&t, "defaults.vcpus").contains("default"), "{t}");

    // Trusted: applied, without the host-only keys.
    let out = env.ks_in(&repo, &["agent", "trust"], &[]);
    let t = out.text();
    out.ok();
    assert!(t.contains("defaults.artifacts is ignored"), "{t}");
    assert!(t.contains("guest.forward_env is ignored"), "{t}");
    let t = env.ks_in(&repo, &["agent", "config"], &[]).text();
    assert!(value(&t, "defaults.vcpus").contains("3"), "{t}");
    assert!(value(&t, "defaults.artifacts").contains("[]"), "{t}");
    assert!(
        !value(&t, "guest.forward_env").contains("HOST_SECRET"),
        "{t}"
    );
    let pins = std::fs::metadata(env.path("state/keystone/trust.json")).expect("trust.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(pins.permissions().mode() & 0o777, 0o600);

    // Changed (as a sync would change it): ignored again.
    std::fs::write(&file, "[defaults]\nvcpus = 64\n").expect("write");
    let t = env.ks_in(&repo, &["agent", "config"], &[]).text();
    assert!(value(&t, "defaults.vcpus").contains("default"), "{t}");
    assert!(t.contains("changed since you trusted it"), "{t}");

    // A link to a host file is never read, trusted or not.
    std::fs::remove_file(&file).expect("rm");
    std::os::unix::fs::symlink(env.path("config"), &file).expect("symlink");
    let out = env.ks_in(&repo, &["agent", "trust"], &[]);
    out.code(3).says("symbolic link");
    let out = env.ks_in(&repo, &["agent", "config"], &[]);
    out.ok().says("symbolic link");

    // Revoked: ignored.
    std::fs::remove_file(&file).expect("rm");
    std::fs::write(&file, "[defaults]\nvcpus = 5\n").expect("write");
    env.ks_in(&repo, &["agent", "trust"], &[]).ok();
    let t = env.ks_in(&repo, &["agent", "config"], &[]).text();
    assert!(value(&t, "defaults.vcpus").contains("5"), "{t}");
    let out = env.ks_in(&repo, &["agent", "trust", "--revoke"], &[]);
    out.says("no longer trusted");
    let t = env.ks_in(&repo, &["agent", "config"], &[]).text();
    assert!(value(&t, "defaults.vcpus").contains("default"), "{t}");
}

#[test]
fn web_attach_without_a_sandbox_is_not_found() {
    let env = Env::new();
    let out = env.ks_in(env.tmp.path(), &["agent", "attach", "--web"], &[]);
    out.code(1).says("no current sandbox");
    let out = env.ks_in(env.tmp.path(), &["agent", "attach", "nosuch", "--web"], &[]);
    out.code(1);
}

#[test]
fn list_of_an_empty_registry_is_empty_json() {
    let env = Env::new();
    let out = env.ks_in(env.tmp.path(), &["agent", "list", "--json"], &[]);
    out.ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v, serde_json::json!([]));
    let out = env.ks_in(env.tmp.path(), &["agent", "list", "--state", "bogus"], &[]);
    out.code(2);
}

#[test]
fn tokens_name_sources_never_values() {
    let env = Env::new();
    let project = env.tmp.path().join("proj");
    std::fs::create_dir_all(&project).expect("mkdir");
    git(&project, &["init", "-q"]);
    std::fs::write(
        project.join(".env"),
        "OPENAI_API_KEY=file-secret-1\nGEMINI_API_KEY=file-secret-2\nUNLISTED=file-secret-3\n",
    )
    .expect("write");
    std::fs::write(project.join(".env.local"), "GEMINI_API_KEY=file-secret-4\n").expect("write");
    let out = env.ks_in(
        &project,
        &["agent", "tokens"],
        // Empty counts as unset: the files' values stand.
        &[
            ("ANTHROPIC_API_KEY", "host-secret"),
            ("UNLISTED_HOST", "host-secret-2"),
            ("OPENAI_API_KEY", ""),
            ("GEMINI_API_KEY", ""),
            ("CLAUDE_CODE_OAUTH_TOKEN", ""),
        ],
    );
    out.ok();
    let t = out.text();
    for (var, source, host) in [
        ("ANTHROPIC_API_KEY", "host environment", "api.anthropic.com"),
        ("OPENAI_API_KEY", ".env ", "api.openai.com"),
        (
            "GEMINI_API_KEY",
            ".env.local",
            "generativelanguage.googleapis.com",
        ),
        ("CLAUDE_CODE_OAUTH_TOKEN", "not set", "api.anthropic.com"),
    ] {
        assert!(
            t.lines()
                .any(|l| l.starts_with(var) && l.contains(source) && l.trim_end().ends_with(host)),
            "{var} from {source}, injected for {host}:\n{t}"
        );
    }
    assert!(!t.contains("secret") && !t.contains("UNLISTED"), "{t}");
    let out = env.ks_in(
        &project,
        &["agent", "tokens", "--json"],
        &[("ANTHROPIC_API_KEY", "host-secret")],
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v[0]["name"], "ANTHROPIC_API_KEY");
    assert_eq!(v[0]["available"], true);
    assert!(!out.stdout.contains("secret"));
}

/// doctor tells the truth about acceleration on whatever machine runs the
/// suite: on a PVM host (like this project's CI) KVM is present but
/// unusable and TCG is used; without /dev/kvm, TCG.
#[test]
fn doctor_reports_acceleration_truthfully() {
    let env = Env::new();
    let out = env.ks_in(env.tmp.path(), &["agent", "doctor"], &[]);
    let t = out.text();
    let line = t
        .lines()
        .find(|l| l.contains("acceleration"))
        .unwrap_or_default()
        .to_string();
    if std::path::Path::new("/sys/module/kvm_pvm").exists()
        && std::path::Path::new("/dev/kvm").exists()
    {
        assert!(line.contains("TCG") && line.contains("PVM"), "{t}");
        assert!(line.starts_with("warn"), "{t}");
    } else if !std::path::Path::new("/dev/kvm").exists() {
        assert!(line.contains("TCG"), "{t}");
    }
    for check in [
        "user namespaces",
        "cgroups",
        "nested virtualization",
        "rootless",
        "tool qemu-system-x86_64",
    ] {
        assert!(t.contains(check), "doctor must report {check}:\n{t}");
    }
    let json = env.ks_in(env.tmp.path(), &["agent", "doctor", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("doctor --json");
    assert!(v.as_array().is_some_and(|a| a.len() > 5), "{v}");
}

#[test]
fn proxy_status_without_a_proxy_says_how_it_starts() {
    let env = Env::new();
    let out = env.ks_in(env.tmp.path(), &["agent", "proxy", "status"], &[]);
    out.ok();
    out.says("not running");
    let out = env.ks_in(env.tmp.path(), &["agent", "proxy", "status", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["running"], false);
}

#[test]
fn a_command_line_that_does_not_parse_exits_2_and_help_says_so() {
    let env = Env::new();
    env.ks_in(env.tmp.path(), &["agent", "start", "--no-such-option"], &[])
        .code(2)
        .says("Usage:");
    env.ks_in(env.tmp.path(), &["--help"], &[])
        .ok()
        .says("2 invalid state, or a command line that does not parse");
}
