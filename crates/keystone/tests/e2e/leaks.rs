//! A start that fails after the guest exists leaves nothing behind.
//!
//! Each backend calls `keystone_backend::fault::point` where an early
//! return could leak (after the guest's first process, the relay, the
//! network helper, QEMU); `KEYSTONE_FAULT` makes that point fail, in debug
//! builds only. For every point the test starts the sandbox with the fault
//! and then checks what a leak would leave: a live process, a cgroup, a
//! network link, a mount, a socket, a registry record.
//!
//! Two moments are checked. During the hold (`KEYSTONE_FAULT_HOLD_MS`:
//! the supervisor waits after the failed run, before it reports or exits)
//! the backend's own teardown must have removed everything: the
//! supervisor has no descendants left and the sandbox's cgroups and
//! sockets are gone. Without that teardown the death signals and the
//! CLI's clean-up would still tidy up after the supervisor exits, which
//! is why the second moment, after `start` returned, is not enough alone.
//! Then processes are caught whatever they are: the test process becomes
//! a child subreaper while it runs, so every process the failed start left
//! is re-parented to it and shows up as one of its children.

use crate::harness::{eventually, Host};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One live (not zombie) process: pid, parent pid, command line.
struct Proc {
    pid: i32,
    ppid: i32,
    cmdline: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // After the command's ")": state, ppid, ...
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let Some(ppid) = rest.get(1).and_then(|p| p.parse().ok()) else {
            continue;
        };
        if rest[0] == "Z" {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        out.push(Proc { pid, ppid, cmdline });
    }
    out
}

/// The test process's live children: pid and command line.
fn live_children() -> BTreeSet<(i32, String)> {
    let me = std::process::id() as i32;
    processes()
        .into_iter()
        .filter(|p| p.ppid == me)
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// Every live descendant of `pid`: pid and command line.
fn descendants(pid: i32) -> Vec<(i32, String)> {
    let all = processes();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            frontier.push(p.pid);
            found.push((p.pid, p.cmdline.clone()));
        }
    }
    found
}

/// The cgroups a sandbox with `id` would have (v2 and v1) that exist.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    [
        format!("/sys/fs/cgroup/keystone/keystone-{id}"),
        format!("/sys/fs/cgroup/memory/keystone/{id}"),
        format!("/sys/fs/cgroup/cpu/keystone/{id}"),
        format!("/sys/fs/cgroup/pids/keystone/{id}"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}

fn links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Unix sockets under `dir` (the sandbox's own, QMP, virtiofsd's).
fn sockets(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_socket() {
                out.push(e.path());
            }
        }
    }
    out
}

fn set_subreaper(on: bool) {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this
    // process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, libc::c_ulong::from(on)) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Start with each fault point failing; after each, nothing is left.
/// Then a clean start still works (nothing half-made stands in its way).
pub fn fault_points(h: Host, points: &[&str]) {
    // Build what start needs first, so every run reaches the fault.
    h.ks(&["image", "build"]).ok();
    let state = h.state_dir();
    set_subreaper(true);
    let children = live_children();
    let nets = links();
    for point in points {
        let child = h.ks_spawn_env(
            &["start", "--no-attach"],
            &[
                ("KEYSTONE_FAULT", point),
                ("KEYSTONE_FAULT_HOLD_MS", "4000"),
            ],
        );
        // The record exists from the claim on; its id names the cgroups,
        // its owner is the supervisor once it runs.
        let mut seen: Option<(String, i64)> = None;
        let found = eventually(Duration::from_secs(60), || {
            seen = h
                .record(&h.name())
                .and_then(|r| Some((r["id"].as_str()?.to_string(), r["owner"]["pid"].as_i64()?)));
            seen.as_ref().is_some_and(|(_, pid)| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__supervise"))
            })
        });
        let log = state
            .join("sandboxes")
            .join(h.name())
            .join("logs/supervisor.log");
        let held = found
            && eventually(Duration::from_secs(60), || {
                std::fs::read_to_string(&log)
                    .is_ok_and(|t| t.contains("supervisor: holding after an injected fault"))
            });
        let (id, supervisor) = seen.clone().unwrap_or_default();
        let during = held.then(|| {
            (
                descendants(supervisor as i32),
                cgroups_of(&id),
                sockets(&state.join("sandboxes").join(h.name())),
            )
        });
        let r: crate::harness::Run = child.wait_with_output().expect("wait").into();
        let Some((procs, cgs, socks)) = during else {
            panic!(
                "{point}: the supervisor never held after the fault:\n{}",
                r.text()
            );
        };
        assert_eq!(
            procs,
            vec![],
            "{point}: the supervisor's teardown left processes"
        );
        assert_eq!(
            cgs,
            Vec::<PathBuf>::new(),
            "{point}: the supervisor's teardown left cgroups"
        );
        assert_eq!(
            socks,
            Vec::<PathBuf>::new(),
            "{point}: the supervisor's teardown left sockets"
        );
        r.code(3);
        assert!(
            r.text().contains(&format!("fault injected at {point}")),
            "{point}: the start must fail at the fault point:\n{}",
            r.text()
        );
        let left = || -> Vec<String> {
            live_children()
                .difference(&children)
                .map(|(pid, cmd)| format!("{pid} {cmd}"))
                .collect()
        };
        assert!(
            eventually(Duration::from_secs(20), || left().is_empty()),
            "{point}: processes left: {:?}",
            left()
        );
        assert_eq!(
            cgroups_of(&id),
            Vec::<PathBuf>::new(),
            "{point}: cgroups left"
        );
        assert_eq!(links(), nets, "{point}: network links left");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let sd = state.display().to_string();
        assert!(
            !mounts.lines().any(|l| l.contains(&sd)),
            "{point}: mounts left under {sd}:\n{mounts}"
        );
        assert_eq!(
            sockets(&state),
            Vec::<PathBuf>::new(),
            "{point}: sockets left"
        );
        let list = h.ks(&["list", "--json"]);
        list.ok();
        assert!(
            !list.stdout.contains(&h.name()),
            "{point}: a half-made sandbox is left in the registry:\n{}",
            list.stdout
        );
    }
    set_subreaper(false);
    h.start(&[]).ok();
    assert_eq!(h.sh("echo alive").trim(), "alive");
    h.ks(&["destroy", "--force", &h.name()]).ok();
}

/// The fault points of each local backend (their names in the backend's
/// `fault::point` calls).
pub fn points(backend: &str) -> &'static [&'static str] {
    match backend {
        "container" => &["container-relay", "container-egress", "container-network"],
        "microvm" => &["microvm-egress", "microvm-relay", "microvm-boot"],
        other => panic!("no fault points listed for {other}"),
    }
}
