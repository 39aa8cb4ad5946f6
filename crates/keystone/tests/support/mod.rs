//! The one way the test binaries (`cli.rs` and `e2e/`) run keystone and
//! the host tools beside it: a cleared environment whose home and XDG
//! directories are the test's own, a deadline, and the exit code and
//! output kept together.
//!
//! `cli.rs` declares it as `mod support`, `e2e/main.rs` through `#[path]`.

// Each test binary uses a part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The keystone binary cargo built for these tests.
pub fn keystone_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keystone"))
}

/// The directories a run takes for the user's own: nothing of the real
/// home, state, configuration or cache is read or written.
pub struct Dirs {
    pub home: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub cache: PathBuf,
}

impl Dirs {
    /// `home`, `state` and `config` below `root`; the cache where given
    /// (the end-to-end tests share one, for the guest images).
    pub fn under(root: &Path, cache: PathBuf) -> Dirs {
        Dirs {
            home: root.join("home"),
            state: root.join("state"),
            config: root.join("config"),
            cache,
        }
    }

    /// The whole environment a run gets: of the caller's, only `PATH`.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("PATH", std::env::var_os("PATH").unwrap_or_default()),
            ("HOME", self.home.clone().into()),
            ("XDG_STATE_HOME", self.state.clone().into()),
            ("XDG_CONFIG_HOME", self.config.clone().into()),
            ("XDG_CACHE_HOME", self.cache.clone().into()),
            ("LANG", "C.UTF-8".into()),
        ]
    }

    /// `cmd` with [`Dirs::env`] instead of the caller's environment, and
    /// no standard input.
    pub fn isolate<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env_clear().envs(self.env()).stdin(Stdio::null())
    }
}

/// A finished command: its exit code (none when a signal ended it) and
/// what it printed.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    #[track_caller]
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "expected success:\n{}", self.text());
        self
    }
    #[track_caller]
    pub fn code(&self, c: i32) -> &Run {
        assert_eq!(self.code, Some(c), "expected exit {c}:\n{}", self.text());
        self
    }
    /// Fails unless stdout or stderr contains `needle`.
    #[track_caller]
    pub fn says(&self, needle: &str) -> &Run {
        assert!(
            self.text().contains(needle),
            "expected {needle:?} in:\n{}",
            self.text()
        );
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run a command with a deadline; a hang fails the test instead of the
/// whole suite. Its output is read while it runs, so a command that prints
/// more than a pipe holds does not stall until the deadline.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let out = Output {
                status,
                stdout: stdout.join().expect("stdout reader"),
                stderr: stderr.join().expect("stderr reader"),
            };
            panic!(
                "command timed out after {}s: {cmd:?}\n{}",
                limit.as_secs(),
                Run::from(out).text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
    .into()
}

/// Everything `pipe` yields until its writers close it, on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}
