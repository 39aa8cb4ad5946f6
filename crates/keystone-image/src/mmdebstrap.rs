//! Running mmdebstrap: choosing its mode, building its command line, and
//! supervising it as a child process.

use crate::guest;
use crate::recipe::VARIANT;
use crate::{ImageError, Progress, Recipe};
use keystone_process::Spawn;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How many of mmdebstrap's last lines a build failure quotes.
const TAIL_LINES: usize = 20;
/// How long mmdebstrap gets to unmount and remove its temporary chroot after
/// SIGTERM before the whole group is killed.
const TERM_GRACE: Duration = Duration::from_secs(20);

/// How mmdebstrap gets the privileges to create files owned by other users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// We are root: plain chroot and mounts.
    Root,
    /// Rootless: a user namespace mapped onto the subordinate ids.
    Unshare,
}

impl Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Mode::Root => "--mode=root",
            Mode::Unshare => "--mode=unshare",
        }
    }
}

/// Something that turns a recipe into a root filesystem tarball. The store
/// is written against this so its locking and publishing are testable
/// without mmdebstrap or a network.
pub(crate) trait Builder {
    fn build(
        &self,
        recipe: &Recipe,
        id: &str,
        rootfs_tar: &Path,
        log: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError>;
}

/// The real builder.
pub(crate) struct Mmdebstrap;

impl Builder for Mmdebstrap {
    fn build(
        &self,
        recipe: &Recipe,
        id: &str,
        rootfs_tar: &Path,
        log: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError> {
        let program = find_in_path("mmdebstrap").ok_or(ImageError::MmdebstrapMissing)?;
        let mode = detect_mode()?;
        let args = command_args(recipe, mode, rootfs_tar);
        progress.phase(&format!(
            "building image {id}: Debian {} with {} packages ({})",
            recipe.suite,
            recipe.packages().len(),
            mode.as_arg().trim_start_matches("--mode=")
        ));
        run(&program, &args, id, log, progress)?;
        match std::fs::metadata(rootfs_tar) {
            Ok(m) if m.len() > 0 => Ok(()),
            _ => Err(ImageError::MissingOutput {
                path: rootfs_tar.to_owned(),
                log: log.to_owned(),
            }),
        }
    }
}

/// Root mode when we are root, otherwise unshare mode if this user has
/// subordinate ids to map.
fn detect_mode() -> Result<Mode, ImageError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(Mode::Root);
    }
    if find_in_path("newuidmap").is_none() {
        return Err(ImageError::UidmapMissing);
    }
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    for path in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if !has_subordinate_range(&text, &name, uid.as_raw()) {
            return Err(ImageError::NoSubordinateIds {
                user: name,
                path: PathBuf::from(path),
            });
        }
    }
    Ok(Mode::Unshare)
}

/// Whether `/etc/subuid`-style `text` gives `name` (or `uid`) a range.
fn has_subordinate_range(text: &str, name: &str, uid: u32) -> bool {
    let uid = uid.to_string();
    text.lines().any(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next().unwrap_or_default();
        let count = fields.nth(1).and_then(|c| c.parse::<u64>().ok());
        (owner == name || owner == uid) && count.is_some_and(|c| c >= 65536)
    })
}

/// The arguments after `mmdebstrap`. Built without I/O so tests can read it.
pub(crate) fn command_args(recipe: &Recipe, mode: Mode, rootfs_tar: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        mode.as_arg().into(),
        format!("--variant={VARIANT}").into(),
        "--format=tar".into(),
        // Every apt and dpkg line goes to the log, so a failure shows why.
        "--verbose".into(),
        format!("--include={}", recipe.packages().join(",")).into(),
    ];
    for option in guest::DPKG_OPTIONS {
        args.push(format!("--dpkgopt={option}").into());
    }
    for hook in recipe.hooks(true) {
        args.push(format!("--customize-hook={hook}").into());
    }
    args.push("--".into());
    args.push(recipe.suite.clone().into());
    args.push(rootfs_tar.as_os_str().to_owned());
    args.push(recipe.mirror.clone().into());
    args
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs mmdebstrap, streaming its merged stdout and stderr to `progress` and
/// the log file.
fn run(
    program: &Path,
    args: &[OsString],
    id: &str,
    log_path: &Path,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let log_file =
        File::create(log_path).map_err(|e| ImageError::io("create the build log", log_path, e))?;
    let mut log = BufWriter::new(log_file);
    let mut log_ok = writeln!(log, "$ {} {}", program.display(), shell_quote(args)).is_ok();

    // One pipe for both streams keeps their lines in the order written.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| ImageError::io("create a pipe for", program, e.into()))?;
    let write_end2 = write_end
        .try_clone()
        .map_err(|e| ImageError::io("create a pipe for", program, e))?;

    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_end2));
    // mmdebstrap finds chroot, apt and its helpers through PATH; TMPDIR is
    // where it puts the temporary chroot, which a user with a small /tmp
    // points elsewhere on purpose. We do not point it into our own build
    // directory: if mmdebstrap were killed with its /proc and /dev mounts
    // still up, our recursive removal of that directory would reach
    // through them into the host.
    for key in ["PATH", "TMPDIR"] {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
    tracing::debug!(program = %program.display(), args = %shell_quote(args), "starting mmdebstrap");
    // If we die without dropping it (SIGKILL, abort), mmdebstrap is told
    // as Ctrl-C would, so it unmounts and cleans up; dropped before it
    // finishes (an error, Ctrl-C), its group gets SIGTERM, then SIGKILL
    // after TERM_GRACE.
    let mut supervised = Spawn::new("mmdebstrap", command)
        .death_signal(Signal::SIGTERM)
        .stop_grace(TERM_GRACE)
        .start()
        .map_err(|e| ImageError::Spawn {
            command: program.display().to_string(),
            source: e.source,
        })?;
    // `start` dropped the command, and with it our copies of the pipe's
    // write end: the reader sees end-of-file when the group is gone.

    let (tx, rx) = mpsc::channel::<String>();
    let reader = File::from(read_end);
    thread::Builder::new()
        .name("mmdebstrap-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']);
                        if tx.send(line.to_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .map_err(|e| ImageError::io("start a thread to read the output of", program, e))?;

    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut handle_line = |line: String| {
        if log_ok {
            log_ok = writeln!(log, "{line}").is_ok();
            if !log_ok {
                tracing::warn!(log = %log_path.display(), "could not write the build log");
            }
        }
        progress.line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let mut drain_deadline: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => handle_line(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => match drain_deadline {
                // A grandchild that outlived mmdebstrap may hold the pipe
                // open; stop waiting for end-of-file after a moment.
                Some(deadline) if Instant::now() >= deadline => break,
                Some(_) => {}
                None => {
                    // Reaping it kills what it left in its group.
                    if supervised.try_reap() {
                        drain_deadline = Some(Instant::now() + Duration::from_secs(2));
                    }
                }
            },
        }
    }
    let status = supervised.wait();
    // Lines that arrived between the last receive and the group kill.
    while let Ok(line) = rx.try_recv() {
        handle_line(line);
    }
    let _ = log.flush();

    let status = match status {
        Some(WaitStatus::Exited(_, 0)) => return Ok(()),
        Some(WaitStatus::Exited(_, code)) => format!("exit status: {code}"),
        Some(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        other => format!("{other:?}"),
    };
    Err(ImageError::BuildFailed {
        id: id.to_owned(),
        status,
        tail: Vec::from(tail).join("\n"),
        log: log_path.to_owned(),
    })
}

/// For the log's first line: the command as one could paste it in a shell.
fn shell_quote(args: &[OsString]) -> String {
    args.iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=/.,:+@%".contains(c))
            {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profile;
    use std::cell::RefCell;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn command_line_shape() {
        let recipe = Recipe::new(Profile::Minimal);
        let args: Vec<String> = command_args(&recipe, Mode::Root, Path::new("/x/rootfs.tar"))
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        assert_eq!(args[0], "--mode=root");
        assert!(args.contains(&"--variant=apt".to_owned()));
        assert!(args.contains(&"--format=tar".to_owned()));
        assert!(args.contains(&format!("--include={}", recipe.packages().join(","))));
        let hooks = args
            .iter()
            .filter(|a| a.starts_with("--customize-hook="))
            .count();
        assert_eq!(hooks, guest::customize_hooks(&[]).len());
        assert!(args.contains(&"--dpkgopt=path-exclude=/usr/share/doc/*".to_owned()));
        let n = args.len();
        assert_eq!(
            &args[n - 4..],
            [
                "--",
                "trixie",
                "/x/rootfs.tar",
                "http://deb.debian.org/debian"
            ]
        );
        let unshare = command_args(&recipe, Mode::Unshare, Path::new("/x/rootfs.tar"));
        assert_eq!(unshare[0], "--mode=unshare");
    }

    #[test]
    fn subordinate_ranges() {
        let text = "alice:100000:65536\n1001:200000:65536\nbob:300000:10\n";
        assert!(has_subordinate_range(text, "alice", 1000));
        assert!(has_subordinate_range(text, "carol", 1001));
        assert!(!has_subordinate_range(text, "bob", 1002), "too small");
        assert!(!has_subordinate_range(text, "dave", 1003));
        assert!(!has_subordinate_range("", "alice", 1000));
    }

    #[test]
    fn shell_quoting() {
        let args: Vec<OsString> = vec!["--mode=root".into(), "set -eu\necho '$1'".into()];
        assert_eq!(
            shell_quote(&args),
            "--mode=root 'set -eu\necho '\\''$1'\\'''"
        );
    }

    #[derive(Default)]
    struct Recorder {
        lines: RefCell<Vec<String>>,
    }

    impl Progress for Recorder {
        fn phase(&self, _: &str) {}
        fn line(&self, line: &str) {
            self.lines.borrow_mut().push(line.to_owned());
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-mmdebstrap");
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn run_streams_both_streams_and_logs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = script(
            dir.path(),
            "echo out; echo err >&2; echo \"LC_ALL=$LC_ALL\"; echo \"HOME=${HOME:-unset}\"\n",
        );
        let log = dir.path().join("build.log");
        let progress = Recorder::default();
        run(&program, &[], "minimal-000000000000", &log, &progress).expect("success");
        let lines = progress.lines.borrow();
        assert_eq!(
            *lines,
            ["out", "err", "LC_ALL=C.UTF-8", "HOME=unset"],
            "merged in order, environment cleared"
        );
        let logged = std::fs::read_to_string(&log).expect("log");
        assert!(logged.contains("out\nerr\n"));
    }

    #[test]
    fn failure_quotes_the_last_twenty_lines_and_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = script(
            dir.path(),
            "for i in $(seq 1 50); do echo line$i >&2; done\nexit 3\n",
        );
        let log = dir.path().join("build.log");
        let err = run(
            &program,
            &[],
            "minimal-000000000000",
            &log,
            &super::super::NoProgress,
        )
        .expect_err("failure");
        let ImageError::BuildFailed {
            tail,
            log: l,
            status,
            ..
        } = &err
        else {
            panic!("wrong error {err:?}");
        };
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.starts_with("line31\n") && tail.ends_with("line50"));
        assert_eq!(l, &log);
        assert!(status.contains('3'));
        let message = err.to_string();
        assert!(message.contains(&log.display().to_string()));
        assert_eq!(
            std::fs::read_to_string(&log).expect("log").lines().count(),
            51
        );
    }

    #[test]
    fn a_grandchild_holding_the_pipe_does_not_hang_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = script(dir.path(), "sleep 600 &\necho done\n");
        let log = dir.path().join("build.log");
        let start = Instant::now();
        run(
            &program,
            &[],
            "minimal-000000000000",
            &log,
            &super::super::NoProgress,
        )
        .expect("success");
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}
