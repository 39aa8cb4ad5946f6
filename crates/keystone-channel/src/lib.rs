//! The one channel into every sandbox (DESIGN.md, "One channel into every
//! sandbox"): SSH, spoken by the system OpenSSH client, carried over a byte
//! stream that each backend opens its own way.
//!
//! This crate owns:
//! - the per-sandbox key pair and host key, made on the host with
//!   `ssh-keygen` (the guest receives only public halves and its own host
//!   key, never a key to the host) — [`keys`];
//! - the generated `ssh_config`, with `ProxyCommand` pointing at our hidden
//!   `__connect` subcommand and OpenSSH connection reuse (ControlMaster) so
//!   that a second command does not pay a handshake — [`Channel`];
//! - the stdio ⇄ socket bridge behind `__connect`, and the relay a backend
//!   runs to expose the guest's sshd on a host Unix socket — [`bridge`].
//!
//! Why system OpenSSH and not an in-process SSH library: git, rsync, scp and
//! editors' remote plugins then work unchanged through the same config, and
//! ControlMaster gives connection reuse for free.

pub mod bridge;
pub mod keys;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{program}` is not installed: apt-get install {package}")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error(
        "runtime directory {path} is not owned by this user; remove it or set XDG_RUNTIME_DIR"
    )]
    UnsafeRuntimeDir { path: PathBuf },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChannelError + '_ {
    move |source| ChannelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The guest file holding the forwarded credentials (written by `start`,
/// 0600, owned by the agent), sourced before every command.
pub const GUEST_ENV_FILE: &str = "/home/agent/.config/keystone/env";

/// A private directory for sockets (the relay, ControlMaster): Unix socket
/// paths are limited to 108 bytes, so they cannot live under a long state
/// directory. `$XDG_RUNTIME_DIR/keystone`, else `/tmp/keystone-<uid>`.
pub fn runtime_dir() -> Result<PathBuf, ChannelError> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) if Path::new(&d).is_dir() => PathBuf::from(d).join("keystone"),
        _ => PathBuf::from(format!("/tmp/keystone-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&dir)(e)),
    }
    let meta = fs::symlink_metadata(&dir).map_err(io_err(&dir))?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(ChannelError::UnsafeRuntimeDir { path: dir });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
    }
    Ok(dir)
}

/// Whether a program is on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The SSH channel to one sandbox.
#[derive(Clone, Debug)]
pub struct Channel {
    /// Host alias in the generated config: `keystone-<name>`.
    pub alias: String,
    /// The sandbox's `ssh/` directory: keys, known_hosts, config.
    pub ssh_dir: PathBuf,
    /// The Unix socket that reaches the guest's sshd.
    pub socket: PathBuf,
    /// The ControlMaster socket path (with `%r` for the user).
    pub control_path: String,
    /// This binary, for ProxyCommand.
    pub exe: PathBuf,
}

/// Options for running a command in the guest.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    pub user: Option<String>,
    /// Directory to run in (the workspace by default).
    pub cwd: Option<String>,
    /// Allocate a terminal (`ssh -tt`).
    pub tty: bool,
}

impl Channel {
    /// `sandbox_id` keeps socket names short and unique; `ssh_dir` holds
    /// the keys made by [`keys::ensure`].
    pub fn new(
        name: &str,
        sandbox_id: &str,
        ssh_dir: PathBuf,
        exe: PathBuf,
    ) -> Result<Channel, ChannelError> {
        let run = runtime_dir()?;
        Ok(Channel {
            alias: format!("keystone-{name}"),
            ssh_dir,
            socket: run.join(format!("{sandbox_id}.ssh")),
            control_path: run
                .join(format!("cm-{sandbox_id}-%r"))
                .display()
                .to_string(),
            exe,
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.ssh_dir.join("config")
    }

    /// The `ssh_config` for this sandbox. Everything the client needs is in
    /// it, so `ssh -F <config> keystone-<name>` works for any OpenSSH-based
    /// tool (git, rsync, scp, editors).
    pub fn render_config(&self) -> String {
        let q = |p: &Path| quote_config(&p.display().to_string());
        format!(
            "# Generated by keystone for sandbox {alias}; rewritten on every use.\n\
Host {alias}\n\
  HostName {alias}\n\
  User agent\n\
  ProxyCommand {exe} __connect {socket}\n\
  IdentityFile {key}\n\
  IdentitiesOnly yes\n\
  IdentityAgent none\n\
  ForwardAgent no\n\
  ForwardX11 no\n\
  ClearAllForwardings no\n\
  UserKnownHostsFile {known}\n\
  GlobalKnownHostsFile /dev/null\n\
  StrictHostKeyChecking yes\n\
  HostKeyAlias {alias}\n\
  UpdateHostKeys no\n\
  ControlMaster auto\n\
  ControlPath {control}\n\
  ControlPersist 600\n\
  ServerAliveInterval 15\n\
  ServerAliveCountMax 4\n\
  ConnectTimeout 20\n\
  LogLevel ERROR\n\
  SendEnv LANG LC_* COLORTERM\n",
            alias = self.alias,
            exe = q(&self.exe),
            socket = q(&self.socket),
            key = q(&self.ssh_dir.join(keys::CLIENT_KEY)),
            known = q(&self.ssh_dir.join(keys::KNOWN_HOSTS)),
            control = quote_config(&self.control_path),
        )
    }

    /// Write the config file (cheap; done before every use so a moved
    /// binary or runtime directory never leaves a stale ProxyCommand).
    pub fn write_config(&self) -> Result<PathBuf, ChannelError> {
        let path = self.config_path();
        let text = self.render_config();
        if fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(path);
        }
        // Atomically: concurrent ssh processes may be reading it.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// A bare `ssh -F <config>` with a cleared environment: nothing of the
    /// host's environment (API keys, SSH_AUTH_SOCK) reaches the guest.
    pub fn ssh(&self) -> Result<Command, ChannelError> {
        let ssh = which("ssh").ok_or(ChannelError::Missing {
            program: "ssh",
            package: "openssh-client",
        })?;
        let config = self.write_config()?;
        let mut cmd = Command::new(ssh);
        cmd.env_clear();
        for (k, v) in passthrough_env() {
            cmd.env(k, v);
        }
        cmd.arg("-F").arg(config);
        Ok(cmd)
    }

    /// `ssh … -- <script>` run by the user's shell in the guest.
    pub fn command(&self, script: &str, opts: &ExecOptions) -> Result<Command, ChannelError> {
        let mut cmd = self.ssh()?;
        cmd.arg(if opts.tty { "-tt" } else { "-T" });
        if let Some(user) = &opts.user {
            cmd.arg("-l").arg(user);
        }
        let cwd = opts.cwd.as_deref().unwrap_or("/workspace");
        // The forwarded credentials reach every command, as they reach the
        // agent's interactive shells through its .bashrc.
        let wrapped = format!(
            "cd {} 2>/dev/null || cd; if [ -r {env} ]; then . {env}; fi; {script}",
            shell_words::quote(cwd),
            env = GUEST_ENV_FILE
        );
        cmd.arg(&self.alias).arg("--").arg(wrapped);
        Ok(cmd)
    }

    /// Run `argv` in the guest, inheriting stdio; the command's own exit
    /// status is returned (255 means ssh itself failed).
    pub fn exec(&self, argv: &[String], opts: &ExecOptions) -> Result<ExitStatus, ChannelError> {
        // direnv loads the workspace's .envrc (the project's env files)
        // for exec as it does for the interactive shells.
        let script = format!(
            "if [ -e .envrc ] && command -v direnv >/dev/null; then eval \"$(direnv export bash 2>/dev/null)\"; fi; exec {}",
            shell_words::join(argv)
        );
        let mut cmd = self.command(&script, opts)?;
        cmd.status().map_err(|e| ChannelError::Command {
            command: "ssh".into(),
            detail: e.to_string(),
        })
    }

    /// Run a shell script in the guest and capture its output.
    pub fn run(&self, script: &str, opts: &ExecOptions) -> Result<Output, ChannelError> {
        let mut cmd = self.command(script, opts)?;
        cmd.stdin(Stdio::null());
        cmd.output().map_err(|e| ChannelError::Command {
            command: "ssh".into(),
            detail: e.to_string(),
        })
    }

    /// Like [`run`](Self::run), but a non-zero exit is an error carrying the
    /// script's stderr.
    pub fn run_ok(&self, script: &str, opts: &ExecOptions) -> Result<String, ChannelError> {
        let out = self.run(script, opts)?;
        if !out.status.success() {
            return Err(ChannelError::Command {
                command: script.lines().next().unwrap_or(script).to_string(),
                detail: format!(
                    "exit {}: {}",
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GIT_SSH_COMMAND` for git running on the host against the guest.
    pub fn git_ssh_command(&self) -> String {
        format!(
            "ssh -F {}",
            shell_words::quote(&self.config_path().display().to_string())
        )
    }

    /// The git URL of a repository in the guest.
    pub fn git_url(&self, path: &str) -> String {
        format!("ssh://agent@{}{}", self.alias, path)
    }

    /// Close the reusable master connection (on stop), ignoring errors: it
    /// may already be gone with the sandbox.
    pub fn close(&self) {
        for user in ["agent", "root"] {
            if let Ok(mut cmd) = self.ssh() {
                let _ = cmd
                    .args(["-O", "exit", "-l", user, &self.alias])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// The only host variables the ssh client gets: what it needs to run and
/// to draw a terminal. Deliberately not SSH_AUTH_SOCK or any credential.
pub fn passthrough_env() -> Vec<(OsString, OsString)> {
    [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TERM",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "COLORTERM",
    ]
    .iter()
    .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
    .collect()
}

/// Quote a value for ssh_config (double quotes; paths with spaces work).
fn quote_config(s: &str) -> String {
    if s.chars().any(|c| c.is_whitespace() || c == '"') {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> Channel {
        Channel {
            alias: "keystone-app".into(),
            ssh_dir: PathBuf::from("/state/sandboxes/app/ssh"),
            socket: PathBuf::from("/run/k/abc.ssh"),
            control_path: "/run/k/cm-abc-%r".into(),
            exe: PathBuf::from("/usr/bin/keystone"),
        }
    }

    #[test]
    fn config_pins_host_key_and_disables_agent() {
        let cfg = channel().render_config();
        assert!(cfg.contains("ProxyCommand /usr/bin/keystone __connect /run/k/abc.ssh"));
        assert!(cfg.contains("StrictHostKeyChecking yes"));
        assert!(cfg.contains("ForwardAgent no"));
        assert!(cfg.contains("IdentityAgent none"));
        assert!(cfg.contains("ControlPath /run/k/cm-abc-%r"));
        assert!(cfg.contains("UserKnownHostsFile /state/sandboxes/app/ssh/known_hosts"));
    }

    #[test]
    fn config_quotes_paths_with_spaces() {
        let mut c = channel();
        c.exe = PathBuf::from("/opt/my tools/keystone");
        assert!(c
            .render_config()
            .contains("ProxyCommand \"/opt/my tools/keystone\" __connect"));
    }

    #[test]
    fn passthrough_env_never_carries_credentials() {
        std::env::set_var("ANTHROPIC_API_KEY", "secret");
        let env = passthrough_env();
        assert!(!env
            .iter()
            .any(|(k, _)| k == "ANTHROPIC_API_KEY" || k == "SSH_AUTH_SOCK"));
    }
}
