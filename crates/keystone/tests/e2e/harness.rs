//! The end-to-end harness: a throwaway host (project repository, state,
//! config and a fake home full of canaries) driving the real binary
//! against a real backend, with the guest image built once and shared.

use crate::support::Dirs;
pub use crate::support::{run_bounded, Run};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Fail (never skip) when a host tool is missing, naming its package.
pub fn require_tools(backend: &str) {
    let mut tools = vec![
        ("git", "git"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("mmdebstrap", "mmdebstrap"),
        ("tar", "tar"),
    ];
    if backend == "container" {
        tools.push(("pasta", "passt"));
        tools.push(("newuidmap", "uidmap"));
    }
    if backend == "kubernetes" {
        tools.push(("kubectl", "kubernetes-client"));
    }
    if backend == "microvm" {
        tools.push(("qemu-system-x86_64", "qemu-system-x86"));
        tools.push(("qemu-img", "qemu-utils"));
        tools.push(("mkfs.ext4", "e2fsprogs"));
        tools.push(("passt", "passt"));
    }
    for (tool, pkg) in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is required for the {backend} end-to-end tests: apt-get install {pkg}"
        );
    }
}

/// The image cache shared by every test (built on first use; the image
/// store's lock makes concurrent first uses build once).
pub fn shared_cache(user: Option<&str>) -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYSTONE_TEST_CACHE") {
        let base = PathBuf::from(dir);
        return match user {
            Some(u) => base.join(format!("user-{u}")),
            None => base,
        };
    }
    PathBuf::from(match user {
        Some(u) => format!("/var/tmp/keystone-test-cache-{u}"),
        None => "/var/tmp/keystone-test-cache".to_string(),
    })
}

/// Tests leave the dev-server proxy off (its default port may be taken on
/// a shared machine) unless they call [`Host::enable_proxy`].
const PROXY_OFF: &str = "[proxy]\nenable = false\n";

pub struct Host {
    pub tmp: tempfile::TempDir,
    pub project: PathBuf,
    pub backend: String,
    /// Run as this unprivileged user (via runuser) instead of the caller.
    pub user: Option<String>,
    /// Environment every `keystone` run gets on top of the cleared one
    /// (e.g. KUBECONFIG for the Kubernetes backend).
    pub extra_env: Vec<(String, String)>,
    pub cache: PathBuf,
    pub exe: PathBuf,
    /// When the host was made: its lifetime is the test's time, written
    /// to `$KEYSTONE_TEST_TIMINGS` at drop (scripts/test.sh sums them up).
    started: Instant,
}

impl Host {
    pub fn new(backend: &str, project_name: &str) -> Host {
        Self::with_user(backend, project_name, None)
    }

    pub fn with_user(backend: &str, project_name: &str, user: Option<&str>) -> Host {
        require_tools(backend);
        let tmp = tempfile::Builder::new()
            .prefix("ks-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut exe = crate::support::keystone_exe();
        if let Some(u) = user {
            // The unprivileged user needs its own copy of the binary (the
            // build tree may not be readable to it) and to own the tree.
            let copy = tmp.path().join("keystone");
            std::fs::copy(&exe, &copy).expect("copy binary");
            exe = copy;
            let ok = Command::new("chown")
                .args(["-R", u])
                .arg(tmp.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown to {u}");
        }
        let cache = shared_cache(user);
        std::fs::create_dir_all(&cache).expect("cache dir");
        if let Some(u) = user {
            let _ = Command::new("chown").args([u]).arg(&cache).status();
        }
        let host = Host {
            project: tmp.path().join(project_name),
            tmp,
            backend: backend.to_string(),
            user: user.map(str::to_string),
            extra_env: Vec::new(),
            cache,
            exe,
            started: Instant::now(),
        };
        for d in ["home/.ssh", "home/.config/gcloud", "config/keystone"] {
            host.mkdir(&host.tmp.path().join(d));
        }
        host.write(
            &host.tmp.path().join("home/.ssh/id_ed25519"),
            "host-private-key-canary\n",
        );
        host.write(
            &host.tmp.path().join("home/.config/gcloud/credentials.db"),
            "host-credentials-canary\n",
        );
        host.write(
            &host.tmp.path().join("config/keystone/agent.toml"),
            &format!(
                "[defaults]\nmemory = 2048\nvcpus = 2\n\n[backend]\ntype = \"{backend}\"\n\n[guest]\nprofile = \"minimal\"\n\n{PROXY_OFF}"
            ),
        );
        host.mkdir(&host.project);
        host.git(&["init", "-q", "-b", "main"]);
        host.git(&["config", "user.name", "Host Dev"]);
        host.git(&["config", "user.email", "dev@host.example"]);
        host.write(&host.project.join("README.md"), "# project\n");
        host.git(&["add", "README.md"]);
        host.git(&["commit", "-q", "-m", "initial commit"]);
        host
    }

    fn mkdir(&self, p: &Path) {
        std::fs::create_dir_all(p).expect("mkdir");
        self.chown(p);
    }

    pub fn write(&self, p: &Path, content: &str) {
        std::fs::write(p, content).expect("write");
        self.chown(p);
    }

    fn chown(&self, p: &Path) {
        if let Some(u) = &self.user {
            let _ = Command::new("chown").args(["-R", u]).arg(p).status();
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        self.dirs().isolate(&mut cmd).current_dir(&self.project);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The host's home, state and config, and the shared image cache.
    pub fn dirs(&self) -> Dirs {
        Dirs::under(self.tmp.path(), self.cache.clone())
    }

    /// Run `keystone agent ARGS` in the project.
    pub fn ks(&self, args: &[&str]) -> Run {
        self.ks_env(args, &[])
    }

    pub fn ks_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = self.agent(args);
        cmd.envs(env.iter().copied());
        self.run_traced(cmd, args)
    }

    /// Run a `keystone agent` command (deadline 900 s), printing what it
    /// was and how long it took: where a test's time goes, with
    /// `--nocapture` or in a failure's output.
    fn run_traced(&self, cmd: Command, args: &[&str]) -> Run {
        let t0 = Instant::now();
        let r = run_bounded(cmd, Duration::from_secs(900));
        eprintln!(
            "[{:6.1}s] ks {} -> {:?} in {:.1}s",
            self.started.elapsed().as_secs_f64(),
            trace_args(args),
            r.code,
            t0.elapsed().as_secs_f64()
        );
        r
    }

    /// `keystone agent ARGS` in the project, not started.
    fn agent(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(&self.exe);
        cmd.arg("agent").args(args);
        cmd
    }

    /// Start the project's sandbox, detached.
    pub fn start(&self, extra: &[&str]) -> Run {
        let mut args = vec!["start", "--no-attach"];
        args.extend_from_slice(extra);
        self.ks(&args)
    }

    /// `exec -- bash -c SCRIPT` in the sandbox; stdout.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let r = self.ks(&["exec", "--", "bash", "-c", script]);
        r.ok();
        r.stdout
    }

    #[track_caller]
    pub fn git(&self, args: &[&str]) -> String {
        let git = PathBuf::from("git");
        let mut cmd = self.command(&git);
        cmd.args(args);
        let r = run_bounded(cmd, Duration::from_secs(60));
        r.ok();
        r.stdout.trim().to_string()
    }

    /// Turn the dev-server proxy on, on a port free right now; the port.
    pub fn enable_proxy(&self) -> u16 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let path = self.tmp.path().join("config/keystone/agent.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        self.write(
            &path,
            &text.replace(
                PROXY_OFF,
                &format!("[proxy]\nenable = true\nport = {port}\n"),
            ),
        );
        port
    }

    pub fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state/keystone")
    }

    /// The raw registry record of a sandbox.
    pub fn record(&self, name: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.state_dir().join("registry.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["sandboxes"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    pub fn status_json(&self, name: &str) -> serde_json::Value {
        let r = self.ks(&["status", name, "--json"]);
        r.ok();
        serde_json::from_str(&r.stdout).expect("status json")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A failed test shows what its supervisors logged (the sandbox's
        // directory goes with the host's temporary directory).
        if std::thread::panicking() {
            let dir = self.state_dir().join("sandboxes");
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let log = entry.path().join("logs/supervisor.log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- the last lines of {}:", log.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // Never leave a sandbox running after a test, pass or fail.
        let r = self.ks(&["list", "--json"]);
        if let Ok(serde_json::Value::Array(all)) =
            serde_json::from_str::<serde_json::Value>(&r.stdout)
        {
            for s in all {
                if let Some(name) = s["name"].as_str() {
                    let _ = self.ks(&["destroy", name, "--force"]);
                }
            }
        }
        record_timing(&self.name(), self.started.elapsed());
    }
}

/// One line per host, `seconds<TAB>test<TAB>project`, appended to the file
/// `$KEYSTONE_TEST_TIMINGS` names (nothing when unset). libtest names each
/// test's thread after the test.
fn record_timing(project: &str, took: Duration) {
    use std::io::Write;
    let Some(path) = std::env::var_os("KEYSTONE_TEST_TIMINGS") else {
        return;
    };
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let line = format!("{:.1}\t{test}\t{project}\n", took.as_secs_f64());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A command line for the trace: long arguments (scripts) cut short.
fn trace_args(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            let a = a.replace('\n', " ");
            match a.char_indices().nth(60) {
                Some((i, _)) => format!("{}…", &a[..i]),
                None => a,
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Processes whose command line mentions `needle` (zombies excluded).
pub fn processes_matching(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Wait until `f` holds, at most `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

impl Host {
    /// Start `keystone agent ARGS` without waiting.
    pub fn ks_spawn(&self, args: &[&str]) -> std::process::Child {
        self.ks_spawn_env(args, &[])
    }

    /// Start `keystone agent ARGS` with extra environment, without waiting.
    pub fn ks_spawn_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        self.spawn(args, env, Stdio::null())
    }

    /// Like [`Host::ks_spawn_env`], with a pipe for its standard input.
    pub fn ks_spawn_stdin(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        self.spawn(args, env, Stdio::piped())
    }

    fn spawn(&self, args: &[&str], env: &[(&str, &str)], stdin: Stdio) -> std::process::Child {
        self.agent(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keystone")
    }

    pub fn name(&self) -> String {
        self.project
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned()
    }
}

pub fn pid_alive(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
}

impl Host {
    /// A second project of the same host (same state, config and cache),
    /// with one commit.
    pub fn second_project(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        self.mkdir(&dir);
        for args in [
            &["init", "-q", "-b", "main"][..],
            &[
                "-c",
                "user.name=H",
                "-c",
                "user.email=h@example.com",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "second",
            ],
        ] {
            let mut cmd = self.command(Path::new("git"));
            cmd.current_dir(&dir).args(args);
            run_bounded(cmd, Duration::from_secs(60)).ok();
        }
        dir
    }

    /// `keystone agent ARGS` run in another directory.
    pub fn ks_at(&self, dir: &Path, args: &[&str]) -> Run {
        let mut cmd = self.agent(args);
        cmd.current_dir(dir);
        self.run_traced(cmd, args)
    }
}

/// Like [`processes_matching`], but only those whose parent does not match
/// too (a supervisor's forked children share its command line).
pub fn top_processes_matching(needle: &str) -> Vec<String> {
    let matches = processes_matching(needle);
    let pids: Vec<String> = matches
        .iter()
        .filter_map(|m| m.split(':').next().map(str::to_string))
        .collect();
    matches
        .into_iter()
        .filter(|m| {
            let pid = m.split(':').next().unwrap_or("");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .unwrap_or("");
            !pids.iter().any(|p| p == ppid)
        })
        .collect()
}

/// Run a host command (`args[0]` and its arguments); fail the test with
/// its stderr unless it succeeds.
#[track_caller]
pub fn run_ok(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A terminal on the host (a pane of a private tmux server, 120×30) running
/// `keystone agent ARGS` in the project, with the environment a run of
/// [`Host::ks`] gets plus `TERM`; the server goes with the value.
pub struct HostTerminal {
    socket: String,
}

impl HostTerminal {
    pub fn new(h: &Host, label: &str, keystone_args: &str) -> HostTerminal {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is required to drive a terminal: apt-get install tmux"
        );
        let socket = format!("ks-e2e-{label}-{}", std::process::id());
        let mut env = String::from("env -i");
        for (k, v) in h.dirs().env() {
            env.push_str(&format!(" {k}={}", v.to_string_lossy()));
        }
        env.push_str(" TERM=xterm-256color");
        let cmd = format!(
            "cd {} && {env} {} agent {keystone_args}; echo ATTACH-EXIT=$?; sleep 60",
            h.project.display(),
            h.exe.display()
        );
        let t = HostTerminal { socket };
        t.tmux(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "30",
            "-s",
            "host",
            &cmd,
        ]);
        t
    }

    pub fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the pane shows now.
    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "host"])
    }

    /// `tmux send-keys` to the pane.
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "host"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }
}

impl Drop for HostTerminal {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// Issue 17's interface, as the tests assume it (one place to adjust).
pub mod credentials {
    use super::Host;
    use serde_json::Value;

    /// Where the keystone CA's private key lives on the host, relative
    /// to the harness's root (`Host::tmp`): `$XDG_STATE_HOME/keystone/ca/
    /// ca.key` (credentials.rs `ca_dir`), XDG_STATE_HOME being
    /// `<tmp>/state`.
    pub const KEYSTONE_CA_KEY: &str = "state/keystone/ca/ca.key";

    /// `keystone agent tokens --json`: an array of objects with these
    /// fields, one per credential.
    pub const TOKENS_ARGS: &[&str] = &["tokens", "--json"];
    pub const FIELD_NAME: &str = "name";
    pub const FIELD_SOURCE: &str = "source";
    pub const FIELD_HOSTS: &str = "hosts";
    /// Requests the egress point injected the credential into since the
    /// sandbox started.
    pub const FIELD_USED: &str = "used";

    /// The host path of the keystone CA's key.
    pub fn ca_key_path(h: &Host) -> std::path::PathBuf {
        h.tmp.path().join(KEYSTONE_CA_KEY)
    }

    /// `tokens --json` in the project, with `env`; the entries by name.
    /// Fails on anything but an array of objects with a string `name`.
    #[track_caller]
    pub fn tokens_json(h: &Host, env: &[(&str, &str)]) -> Vec<Value> {
        let r = h.ks_env(TOKENS_ARGS, env);
        r.ok();
        let v: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("tokens --json is not JSON ({e}):\n{}", r.text()));
        // An array, or an object holding one (`{"credentials": [...]}`).
        let list = match &v {
            Value::Array(a) => a.clone(),
            Value::Object(o) => o
                .values()
                .find_map(|x| x.as_array().cloned())
                .unwrap_or_else(|| panic!("tokens --json has no list:\n{v}")),
            _ => panic!("tokens --json is not a list:\n{v}"),
        };
        for e in &list {
            assert!(
                e[FIELD_NAME].is_string(),
                "a tokens --json entry without a {FIELD_NAME}: {e}"
            );
        }
        list
    }

    /// The entry for `var` in [`tokens_json`]'s list.
    #[track_caller]
    pub fn entry<'a>(list: &'a [Value], var: &str) -> &'a Value {
        list.iter()
            .find(|e| e[FIELD_NAME] == var)
            .unwrap_or_else(|| panic!("tokens --json lists no {var}: {list:?}"))
    }

    /// How many requests `var` was injected into.
    #[track_caller]
    pub fn used(list: &[Value], var: &str) -> u64 {
        let e = entry(list, var);
        e[FIELD_USED]
            .as_u64()
            .unwrap_or_else(|| panic!("{var}: no numeric {FIELD_USED}: {e}"))
    }

    /// The part of a real value a placeholder keeps: up to and including
    /// the last '-' or '_' in its first 16 characters (`sk-ant-api03-`,
    /// `sk-proj-`, `kst-`); else `AIza` for a Google key; else nothing
    /// (credentials.rs `placeholder_for`).
    pub fn kept_prefix(real: &str) -> &str {
        let head: String = real.chars().take(16).collect();
        match head.rfind(['-', '_']) {
            Some(i) => &real[..=i],
            None if real.starts_with("AIza") => &real[..4],
            None => "",
        }
    }

    /// `placeholder` is what the guest got for `var` instead of `real`:
    /// another value of the same length and shape.
    #[track_caller]
    pub fn assert_placeholder(var: &str, real: &str, placeholder: &str) {
        assert_ne!(
            placeholder, real,
            "{var}: the guest got the real value, not a placeholder"
        );
        assert!(!placeholder.is_empty(), "{var}: the guest got nothing");
        assert!(
            !placeholder.contains(real) && !real.contains(placeholder),
            "{var}: the placeholder {placeholder:?} holds the real value or is part of it"
        );
        assert_eq!(
            placeholder.len(),
            real.len(),
            "{var}: the placeholder {placeholder:?} is not as long as the real value"
        );
        let prefix = kept_prefix(real);
        assert!(
            placeholder.starts_with(prefix),
            "{var}: the placeholder {placeholder:?} does not keep the prefix {prefix:?}"
        );
        let rest = &placeholder[prefix.len()..];
        assert!(
            rest.len() >= 8 && rest != &real[prefix.len()..],
            "{var}: the placeholder {placeholder:?} keeps too much"
        );
    }

    /// A fresh random string of `n` characters from `alphabet` (a key's
    /// body).
    pub fn random(alphabet: &[u8], n: usize) -> String {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        (0..n)
            .map(|i| {
                let mut h = state.build_hasher();
                h.write_usize(i);
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0),
                );
                alphabet[(h.finish() % alphabet.len() as u64) as usize] as char
            })
            .collect()
    }

    pub const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

    /// The SHA-256 of `data`, hex (what the lab logs of a body), by
    /// `sha256sum` (coreutils).
    pub fn sha256_hex(data: &str) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum (coreutils)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(data.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    }
}
