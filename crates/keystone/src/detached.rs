//! Keystone's own daemons (the sandbox supervisor, the dev-server proxy):
//! started detached from the CLI that needs them, they say on a pipe
//! whether they came up. Both ends of that handshake live here.
//!
//! The protocol is one line on the descriptor named by `KEYSTONE_READY_FD`:
//! `ready`, or `error: <message>`. One line and not EOF, because what the
//! daemon forks may inherit the pipe and keep it open for as long as the
//! daemon runs.

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const READY_FD_VAR: &str = "KEYSTONE_READY_FD";

/// What a daemon passes on from the CLI's environment; nothing else, so a
/// daemon does not carry the environment of whichever shell started it.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "XDG_STATE_HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_RUNTIME_DIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    // The Kubernetes backend finds the cluster as kubectl does.
    "KUBECONFIG",
    // The host's trust store, as OpenSSL and rustls-native-certs read it:
    // the egress point verifies intercepted hosts with it.
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    // The leak tests' fault points (keystone_backend::fault; read only by
    // debug builds).
    "KEYSTONE_FAULT",
    "KEYSTONE_FAULT_HOLD_MS",
];

/// What a daemon said about its start-up.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// It said `error: …`; the message without the prefix.
    Failed(String),
    /// It exited (or closed the pipe) without a word.
    Silent,
    /// No word within the timeout; it may still be running.
    TimedOut,
}

/// Run `exe args` in its own session (it outlives the CLI), with stdin
/// from /dev/null, stdout and stderr appended to `log`, and the pipe's
/// write end at descriptor 3; wait at most `timeout` for its verdict.
pub fn spawn<S: AsRef<OsStr>>(
    exe: &Path,
    args: &[S],
    log: &Path,
    timeout: Duration,
) -> std::io::Result<Verdict> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", log.display())))?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = Command::new(exe);
    cmd.args(args).env_clear();
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.env(READY_FD_VAR, "3")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let wfd = w.as_raw_fd();
    // SAFETY: runs in the forked child before exec: setsid and dup2 are
    // async-signal-safe. dup2 clears close-on-exec on descriptor 3.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::unistd::dup2(wfd, 3).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(w);
    let mut reader = std::io::BufReader::new(std::fs::File::from(r));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = reader.read_line(&mut s);
        let _ = tx.send(s);
    });
    let line = rx.recv_timeout(timeout);
    // The daemon is detached; reap our direct child if it has exited.
    let _ = child.try_wait();
    Ok(match line {
        Err(_) => Verdict::TimedOut,
        Ok(s) => parse(&s),
    })
}

fn parse(line: &str) -> Verdict {
    let line = line.trim();
    if line.is_empty() {
        Verdict::Silent
    } else if line == "ready" {
        Verdict::Ready
    } else {
        Verdict::Failed(line.trim_start_matches("error: ").to_string())
    }
}

/// The daemon's end: the pipe its starter gave it, if any.
pub struct ReadyPipe(Option<std::fs::File>);

impl ReadyPipe {
    /// Take the descriptor named by `KEYSTONE_READY_FD`, and make it
    /// close-on-exec so that what the daemon runs does not hold it.
    pub fn from_env() -> Self {
        let file = std::env::var(READY_FD_VAR)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map(|fd| {
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                // SAFETY: `spawn` placed the pipe's write end at this
                // descriptor for this process alone, and this is the one
                // place that takes it.
                unsafe { std::fs::File::from_raw_fd(fd) }
            });
        ReadyPipe(file)
    }

    /// Say the daemon is up. Only the first word counts.
    pub fn ready(&mut self) {
        self.say("ready");
    }

    /// Say why the daemon could not come up. Only the first word counts.
    pub fn failed(&mut self, why: impl std::fmt::Display) {
        self.say(&format!("error: {why}"));
    }

    fn say(&mut self, line: &str) {
        if let Some(mut f) = self.0.take() {
            // The starter reads one line; the rest of a long message is
            // in the daemon's log, which the starter points to.
            let _ = writeln!(f, "{}", line.lines().next().unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_one_line() {
        assert_eq!(parse("ready\n"), Verdict::Ready);
        assert_eq!(parse(""), Verdict::Silent);
        assert_eq!(
            parse("error: port 8080 is taken\n"),
            Verdict::Failed("port 8080 is taken".into())
        );
    }

    #[test]
    fn a_real_child_is_heard_silent_and_timed_out() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("log");
        let sh = Path::new("/bin/sh");
        let run = |script: &str, t: u64| {
            spawn(sh, &["-c", script], &log, Duration::from_secs(t)).expect("spawn sh")
        };
        assert_eq!(run("echo ready >&3", 10), Verdict::Ready);
        assert_eq!(
            run("echo 'error: no disk' >&3; echo to-the-log", 10),
            Verdict::Failed("no disk".into())
        );
        assert_eq!(run("exit 3", 10), Verdict::Silent);
        assert_eq!(run("exec sleep 5", 1), Verdict::TimedOut);
        let logged = std::fs::read_to_string(&log).expect("the log");
        assert!(logged.contains("to-the-log"), "{logged}");
    }
}
