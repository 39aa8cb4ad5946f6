//! The scenarios every local backend must pass (issue: the first working
//! sandbox; the microVM issue runs the same ones). Each takes a fresh
//! [`Host`]; `main.rs` instantiates them per backend.

use crate::harness::*;
use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

/// Everything a sandbox leaves on the host while it runs: if destroy or a
/// crash leaves any of it, the test names it.
struct Traces {
    id: String,
    /// Every process the backend recorded (container: init; microvm:
    /// qemu, passt, relay).
    pids: Vec<(String, i64)>,
    state_dir: std::path::PathBuf,
}

impl Traces {
    fn of(h: &Host) -> Traces {
        let rec = h.record(&h.name()).expect("sandbox record");
        let pids = rec["runtime"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v["pid"].as_i64().map(|p| (k.clone(), p)))
                    .collect()
            })
            .unwrap_or_default();
        Traces {
            id: rec["id"].as_str().expect("id").to_string(),
            pids,
            state_dir: h.state_dir(),
        }
    }

    #[track_caller]
    fn assert_gone(&self, h: &Host) {
        for (what, pid) in &self.pids {
            assert!(
                eventually(Duration::from_secs(10), || !pid_alive(*pid)),
                "the sandbox's {what} {pid} survived"
            );
        }
        let vm = format!("-name keystone-{} ", h.name());
        assert!(
            eventually(Duration::from_secs(10), || processes_matching(&vm)
                .is_empty()),
            "QEMU left: {:?}",
            processes_matching(&vm)
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let sd = self.state_dir.display().to_string();
        assert!(
            !mounts.lines().any(|l| l.contains(&sd)),
            "mounts left under {sd}:\n{mounts}"
        );
        for c in ["memory", "cpu", "pids"] {
            let p = std::path::Path::new("/sys/fs/cgroup")
                .join(c)
                .join("keystone")
                .join(&self.id);
            assert!(!p.exists(), "cgroup left: {}", p.display());
        }
        let v2 =
            std::path::Path::new("/sys/fs/cgroup/keystone").join(format!("keystone-{}", self.id));
        assert!(!v2.exists(), "cgroup left: {}", v2.display());
        let left = processes_matching(&format!("__supervise {}", h.name()));
        assert!(left.is_empty(), "supervisor left: {left:?}");
    }
}

/// In a running sandbox: exec passes the exit status through and `--user`
/// works; the agent commits and sync brings commit and file home. The
/// sandbox's commit.
#[track_caller]
pub fn exec_and_sync_home(h: &Host) -> String {
    h.ks(&["exec", "--", "sh", "-c", "exit 7"]).code(7);
    let r = h.ks(&["exec", "--user", "root", "--", "id", "-u"]);
    assert_eq!(r.ok().stdout.trim(), "0");
    let theirs = h.sh("echo 'written by the agent' > agent.txt && git add agent.txt && git commit -qm 'agent work' && git rev-parse HEAD");
    let r = h.ks(&["sync"]);
    r.ok();
    assert!(
        r.stdout
            .contains("synced main: 1 commit(s) from the sandbox (1 file(s) changed"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["rev-parse", "HEAD"]), theirs.trim());
    assert_eq!(
        std::fs::read_to_string(h.project.join("agent.txt")).expect("agent.txt"),
        "written by the agent\n"
    );
    theirs
}

/// start → exec → commit inside → sync → stop → start keeps the disk →
/// --fresh drops it → destroy leaves nothing.
pub fn lifecycle(h: Host) {
    let name = h.name();
    let r = h.start(&[]);
    r.ok();
    for field in ["memory:", "vCPUs:", "nested virtualization", "sync mode:"] {
        assert!(
            r.stdout.contains(field),
            "start must print {field}:\n{}",
            r.text()
        );
    }

    // The workspace is the host's repository at the host's HEAD, owned by
    // agent, with the host's identity.
    let head = h.git(&["rev-parse", "HEAD"]);
    let r = h.ks(&["exec", "--", "git", "log", "-1", "--format=%H"]);
    r.ok();
    assert_eq!(r.stdout.trim(), head);
    assert_eq!(
        h.sh("pwd; stat -c %U README.md; git config user.email; git branch --show-current")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["/workspace", "agent", "dev@host.example", "main"]
    );

    // --memory/--vcpus (2048 MB, 2 from the test config) are enforced by
    // the backend's cgroup where it has one.
    let rec = h.record(&name).expect("record");
    match rec["runtime"]["cgroup"]["version"].as_str() {
        Some("v1") => {
            let dirs = rec["runtime"]["cgroup"]["dirs"]
                .as_array()
                .expect("dirs")
                .clone();
            let read = |ctl: &str, file: &str| -> String {
                let d = dirs
                    .iter()
                    .filter_map(|d| d.as_str())
                    .find(|d| d.contains(&format!("/{ctl}/")))
                    .expect(ctl);
                std::fs::read_to_string(std::path::Path::new(d).join(file))
                    .expect(file)
                    .trim()
                    .to_string()
            };
            assert_eq!(
                read("memory", "memory.limit_in_bytes"),
                (2048u64 << 20).to_string()
            );
            assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        }
        Some("v2") => {
            let d =
                std::path::PathBuf::from(rec["runtime"]["cgroup"]["path"].as_str().expect("path"));
            assert_eq!(
                std::fs::read_to_string(d.join("memory.max"))
                    .expect("memory.max")
                    .trim(),
                (2048u64 << 20).to_string()
            );
            assert_eq!(
                std::fs::read_to_string(d.join("cpu.max"))
                    .expect("cpu.max")
                    .trim(),
                "200000 100000"
            );
        }
        // Without a cgroup (rootless on v1) the sandbox must say so.
        _ if h.backend == "container" => {
            assert!(
                h.status_json(&name)["notes"]
                    .to_string()
                    .contains("not enforced"),
                "{rec}"
            );
        }
        _ => {}
    }

    exec_and_sync_home(&h);
    assert_eq!(
        h.git(&["status", "--porcelain"]),
        "",
        "the host tree is clean after sync"
    );
    let r = h.ks(&["sync"]);
    r.code(2);
    assert!(r.text().contains("no changes"), "{}", r.text());

    // State persists across stop/start.
    h.sh("echo kept > /workspace/scratch.txt && echo kept > /home/agent/kept.txt");
    h.ks(&["stop"]).ok();
    assert_eq!(h.status_json(&name)["state"], "stopped");
    h.ks(&["stop"]).code(2);
    h.ks(&["exec", "--", "true"]).code(2);
    h.start(&[]).ok();
    assert_eq!(
        h.sh("cat /workspace/scratch.txt /home/agent/kept.txt"),
        "kept\nkept\n"
    );
    h.start(&[]).code(2);

    // --fresh (here on a running sandbox) discards it all; the workspace
    // is pushed anew from the host, which now has the agent's commit.
    h.start(&["--fresh"]).ok();
    assert_eq!(
        h.sh("ls /workspace/scratch.txt /home/agent/kept.txt 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
    assert_eq!(h.sh("cat agent.txt"), "written by the agent\n");
    let st = h.status_json(&name);
    assert_eq!(st["state"], "running");
    assert_eq!(st["backend"], h.backend.as_str());

    let traces = Traces::of(&h);
    h.ks(&["destroy", &name, "--force"]).ok();
    traces.assert_gone(&h);
    assert!(h.record(&name).is_none(), "registry entry left");
    assert!(
        !h.state_dir().join("sandboxes").join(&name).exists(),
        "sandbox directory left"
    );
    h.ks(&["status", &name]).code(1);
}

/// Nothing of the host reaches the sandbox: files, environment, loopback.
pub fn isolation(h: Host) {
    // The developer forwards nothing here (`guest.forward_env = []`, in
    // the harness's [guest] table), so not even a variable of the default
    // forward list may arrive; one never on any list neither.
    let config = h.tmp.path().join("config/keystone/agent.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("[guest]\nprofile = \"minimal\"\n"), "{text}");
    let text = text.replace(
        "[guest]\nprofile = \"minimal\"\n",
        "[guest]\nprofile = \"minimal\"\nforward_env = []\n",
    );
    h.write(&config, &text);
    let secret_env = [
        ("ANTHROPIC_API_KEY", "sk-host-secret-canary"),
        ("AWS_SECRET_ACCESS_KEY", "aws-host-secret-canary"),
        ("SSH_AUTH_SOCK", "/tmp/host-agent.sock"),
    ];
    // The host service exists before the sandbox starts, and the probe
    // waits past any periodic port scan a network helper might do.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = served.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((mut s, _)) = listener.accept() {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = s.write_all(b"HOST-LOOPBACK-SECRET\n");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    h.ks_env(&["start", "--no-attach"], &secret_env).ok();
    let tmp = h.tmp.path().display().to_string();
    let script = format!(
        r#"
        echo "env:$(env | grep -cE 'ANTHROPIC_API_KEY|AWS_SECRET|SSH_AUTH_SOCK|host-secret')"
        echo "path:$(test -e {tmp} && echo visible || echo absent)"
        echo "canary:$(grep -rlsE 'host-private-key-canary|host-credentials-canary' /home /root /etc /tmp /workspace /opt /srv /mnt 2>/dev/null | wc -l)"
        sleep 2.5
        echo "loopback:$(timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; cat <&3' 2>/dev/null || echo refused)"
        for gw in $(ip route | awk '/^default/ {{print $3}}') 10.0.2.2 10.0.3.2; do
            echo "gateway $gw:$(timeout 3 bash -c "exec 3<>/dev/tcp/$gw/{port}; cat <&3" 2>/dev/null || echo refused)"
        done
        "#
    );
    let r = h.ks_env(&["exec", "--", "bash", "-c", &script], &secret_env);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    let out = r.ok().stdout.clone();
    assert!(out.contains("env:0"), "host environment leaked:\n{out}");
    assert!(
        out.contains("path:absent"),
        "host filesystem visible:\n{out}"
    );
    assert!(out.contains("canary:0"), "host files visible:\n{out}");
    assert!(
        out.contains("loopback:refused") && !out.contains("HOST-LOOPBACK-SECRET"),
        "host loopback reachable:\n{out}"
    );
    assert!(
        !served.load(std::sync::atomic::Ordering::Relaxed),
        "the host's loopback server was reached"
    );
    // Sudo works inside, as the image promises.
    assert_eq!(h.sh("sudo -n id -u").trim(), "0");
}

/// `--network none`: no way out, and exec still works. The container has
/// loopback only; the microVM keeps the host-only link its sshd is
/// reached on (QEMU `restrict=on`), with no default route and no outbound
/// connection getting through even to an address the host reaches.
pub fn network_none(h: Host) {
    h.start(&["--network", "none"]).ok();
    let out = h.sh("ip -o link | awk -F': ' '{print $2}' | sort | tr '\\n' ' '; echo; ip route | grep -c default || true");
    let mut lines = out.lines();
    let links = lines.next().map(str::trim).unwrap_or_default().to_string();
    if h.backend == "container" {
        assert_eq!(links, "lo", "{out}");
    } else {
        assert_eq!(links, "eth0 lo", "only the host-only link:\n{out}");
    }
    assert_eq!(
        lines.next().map(str::trim),
        Some("0"),
        "no default route may exist:\n{out}"
    );
    // An address the host itself reaches (an outside web server, or a
    // transparent proxy answering for it): the sandbox must not.
    let target = ["deb.debian.org:80", "1.1.1.1:80"]
        .iter()
        .find_map(|a| {
            std::net::ToSocketAddrs::to_socket_addrs(a)
                .ok()
                .and_then(|mut i| i.find(|s| s.is_ipv4()))
        })
        .filter(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(5)).is_ok());
    for addr in target
        .iter()
        .map(|a| a.to_string())
        .chain(["10.0.2.2:22".to_string(), "10.0.3.2:80".to_string()])
    {
        let (ip, port) = addr.split_once(':').expect("ip:port");
        let r = h.ks(&["exec", "--", "bash", "-c", &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' && echo CONNECTED || echo blocked")]);
        assert!(
            r.stdout.contains("blocked"),
            "outbound connection to {addr} succeeded:\n{}",
            r.text()
        );
    }
    assert_eq!(h.status_json(&h.name())["network"], "none");
}

/// kill -9 of the supervisor: the next status is truthful, nothing is
/// left running, and start works again.
pub fn supervisor_killed(h: Host) {
    h.start(&[]).ok();
    let name = h.name();
    let traces = Traces::of(&h);
    let rec = h.record(&name).expect("record");
    let sup = rec["owner"]["pid"].as_i64().expect("owner pid");
    let port = rec["runtime"]["ssh_port"].as_u64();
    assert!(std::process::Command::new("kill")
        .args(["-9", &sup.to_string()])
        .status()
        .expect("kill")
        .success());
    if let Some(port) = port {
        assert!(
            eventually(Duration::from_secs(10), || TcpListener::bind((
                "127.0.0.1",
                port as u16
            ))
            .is_ok()),
            "the forwarded port {port} is still taken after the supervisor died"
        );
    }
    let st = h.status_json(&name);
    assert_eq!(st["state"], "error", "{st}");
    assert!(
        st["error"].as_str().unwrap_or("").contains("exited"),
        "{st}"
    );
    traces.assert_gone(&h);
    h.ks(&["exec", "--", "true"]).code(2);
    h.start(&[]).ok();
    assert_eq!(h.sh("echo alive").trim(), "alive");
}

/// Two starts at once: one wins, the other exits 2, the registry is intact.
pub fn concurrent_starts(h: Host) {
    // Make sure the image exists so both race on the sandbox, not the build.
    h.ks(&["image", "build"]).ok();
    let a = h.ks_spawn(&["start", "--no-attach"]);
    let b = h.ks_spawn(&["start", "--no-attach"]);
    let mut results: Vec<Run> = [a, b]
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait").into())
        .collect();
    results.sort_by_key(|r| r.code);
    assert_eq!(
        results[0].code,
        Some(0),
        "one start must win:\n{}\n---\n{}",
        results[0].text(),
        results[1].text()
    );
    assert_eq!(
        results[1].code,
        Some(2),
        "the other must exit 2:\n{}",
        results[1].text()
    );
    let loser = results[1].text();
    assert!(
        loser.contains("already running") || loser.contains("is starting"),
        "{loser}"
    );
    let r = h.ks(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&r.ok().stdout).expect("json");
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(h.sh("echo ok").trim(), "ok");
}

/// destroy knows what is unsynced and asks before dropping a sandbox.
pub fn destroy_guards(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    h.sh("echo x > unsynced.txt && git add unsynced.txt && git commit -qm 'not yet synced'");
    let r = h.ks(&["destroy", &name]);
    r.code(2);
    assert!(
        r.text().contains("not on any host branch") && r.text().contains("main (1)"),
        "{}",
        r.text()
    );
    // Stopped, it still knows (recorded at stop), and status says so.
    h.ks(&["stop"]).ok();
    h.ks(&["destroy", &name]).code(2);
    assert_eq!(h.status_json(&name)["pending_commits"], 1);
    h.start(&[]).ok();
    h.ks(&["sync"]).ok();
    // Nothing unsynced: without a terminal the confirmation cannot be
    // given, which cancels (exit 5).
    let r = h.ks(&["destroy", &name]);
    r.code(5);
    assert_eq!(h.status_json(&name)["state"], "running");
    let r = h.ks(&["destroy", &name, "--force", "--keep-disk"]);
    r.ok();
    if h.backend == "kubernetes" {
        // The disk is the workspace's PersistentVolumeClaim.
        assert!(
            r.stdout
                .contains(&format!("claim keystone-{name}-workspace is kept")),
            "{}",
            r.text()
        );
    } else {
        assert!(
            h.state_dir()
                .join("sandboxes")
                .join(&name)
                .join("disk")
                .exists(),
            "--keep-disk keeps the disk"
        );
    }
    // A new sandbox of the same name finds its disk again.
    h.start(&[]).ok();
    assert_eq!(h.sh("cat unsynced.txt").trim(), "x");
}

/// `attach` in a real terminal (a host tmux pane): lands in the sandbox's
/// `<sandbox>-main` session in /workspace, and detaching returns 0 with the
/// session still alive.
pub fn attach_session(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    let term = HostTerminal::new(&h, "attach", "attach");
    // The guest's prompt, inside its tmux (tmux's status line truncates
    // long session names, so the session is checked by name below).
    let in_session = eventually(Duration::from_secs(20), || {
        term.screen().contains(&format!("agent@{name}:/workspace"))
    });
    assert!(
        in_session,
        "the guest's tmux session never appeared:\n{}",
        term.screen()
    );
    term.keys(&["pwd; echo marker-$((6*7))", "Enter"]);
    assert!(
        eventually(Duration::from_secs(10), || term
            .screen()
            .contains("marker-42")),
        "typed command did not run:\n{}",
        term.screen()
    );
    assert!(term.screen().contains("/workspace"), "{}", term.screen());
    // Switching to another worktree's session from inside the session
    // (keystone-switch, the guest's command): it starts on demand in its
    // worktree, and the same client moves there.
    h.ks(&["worktree", "add", "other", "--create"]).ok();
    term.keys(&["keystone-switch other", "Enter"]);
    assert!(
        eventually(Duration::from_secs(15), || {
            term.screen()
                .contains(&format!("agent@{name}:/workspace/.worktrees/other"))
        }),
        "keystone-switch did not move the client:\n{}",
        term.screen()
    );
    let attached = h.sh("tmux list-sessions -F '#{session_name} #{session_attached}'");
    assert!(
        attached.contains(&format!("{name}-other 1"))
            && attached.contains(&format!("{name}-main 0")),
        "{attached}"
    );
    term.keys(&["keystone-switch nope; echo SWITCH-EXIT=$?", "Enter"]);
    assert!(
        eventually(Duration::from_secs(10), || term
            .screen()
            .contains("SWITCH-EXIT=1")),
        "{}",
        term.screen()
    );
    assert!(
        term.screen().contains("there is no worktree nope"),
        "{}",
        term.screen()
    );
    term.keys(&["keystone-switch main", "Enter"]);
    assert!(
        eventually(Duration::from_secs(15), || {
            h.sh("tmux list-sessions -F '#{session_name} #{session_attached}'")
                .contains(&format!("{name}-main 1"))
        }),
        "keystone-switch main did not move the client back"
    );
    term.keys(&["C-b", "d"]);
    let detached = eventually(Duration::from_secs(10), || {
        term.screen().contains("ATTACH-EXIT=")
    });
    let shown = term.screen();
    drop(term);
    assert!(
        detached,
        "detach did not return to the host shell:\n{shown}"
    );
    assert!(
        shown.contains("ATTACH-EXIT=0"),
        "detach must exit 0:\n{shown}"
    );
    // The session survives the detach.
    let sessions = h.sh("tmux list-sessions -F '#{session_name} #{pane_current_path}'");
    assert!(
        sessions.contains(&format!("{name}-main /workspace")),
        "{sessions}"
    );
    h.ks(&["stop", "--force"]).ok();
    h.ks(&["attach"]).code(2);
}

/// Sync both ways, branch rules, dry run, JSON, conflicts and clean
/// merges, worktree branches (the sync issue's rules).
pub fn sync_rules(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    let kept = format!("refs/keystone/{name}/heads/main");

    // Host → sandbox.
    h.write(&h.project.join("host.txt"), "from the host\n");
    h.git(&["add", "host.txt"]);
    h.git(&["commit", "-qm", "host work"]);
    let r = h.ks(&["sync"]);
    assert!(
        r.ok().stdout.contains("0 commit(s) from the sandbox")
            && r.stdout.contains("1 commit(s) to the sandbox"),
        "{}",
        r.text()
    );
    assert_eq!(
        h.sh("cat host.txt; git status --porcelain"),
        "from the host\n"
    );

    // Dry run changes nothing; --json reports.
    h.sh("echo one > one.txt && git add one.txt && git commit -qm one");
    let before = h.git(&["rev-parse", "HEAD"]);
    let r = h.ks(&["sync", "--dry-run"]);
    assert!(
        r.ok()
            .stdout
            .contains("would sync main: 1 commit(s) from the sandbox"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["rev-parse", "HEAD"]), before);
    assert!(!h.project.join("one.txt").exists());
    let r = h.ks(&["sync", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&r.ok().stdout).expect("json");
    assert_eq!(
        (
            j["branch"].as_str(),
            j["commits"].as_u64(),
            j["files_changed"].as_u64()
        ),
        (Some("main"), Some(1), Some(1)),
        "{j}"
    );
    assert!(h.project.join("one.txt").exists());

    // Both sides moved, cleanly: a merge on the host, pushed back in.
    h.write(&h.project.join("a.txt"), "host side\n");
    h.git(&["add", "a.txt"]);
    h.git(&["commit", "-qm", "host a"]);
    h.sh("echo sandbox side > b.txt && git add b.txt && git commit -qm 'sandbox b'");
    let r = h.ks(&["sync"]);
    assert!(r.ok().stdout.contains("merged both sides"), "{}", r.text());
    assert!(h.project.join("b.txt").exists());
    assert_eq!(h.sh("cat a.txt b.txt"), "host side\nsandbox side\n");
    assert_eq!(
        h.git(&["rev-parse", "HEAD"]),
        h.sh("git rev-parse HEAD").trim()
    );

    // A conflict: exit 3, the host exactly as before, the sandbox's
    // commits reachable under the named ref.
    h.write(&h.project.join("README.md"), "# host edit\n");
    h.git(&["commit", "-qam", "host edits README"]);
    h.write(&h.project.join("notes.txt"), "uncommitted host work\n");
    let head = h.git(&["rev-parse", "HEAD"]);
    let status = h.git(&["status", "--porcelain"]);
    let theirs = h.sh("echo '# sandbox edit' > README.md && git commit -qam 'sandbox edits README' && git rev-parse HEAD");
    let theirs = theirs.trim().to_string();
    let r = h.ks(&["sync"]);
    r.code(3);
    assert!(
        r.text().contains(&kept),
        "the message must name the ref: {}",
        r.text()
    );
    assert_eq!(h.git(&["rev-parse", "HEAD"]), head);
    assert_eq!(h.git(&["status", "--porcelain"]), status);
    assert_eq!(
        std::fs::read_to_string(h.project.join("README.md")).expect("readme"),
        "# host edit\n"
    );
    assert_eq!(h.git(&["rev-parse", &kept]), theirs);
    // Resolve on the host (take the sandbox's side) and go on.
    h.git(&["reset", "-q", "--hard", &theirs]);
    std::fs::remove_file(h.project.join("notes.txt")).expect("rm");

    // The sandbox on another branch: a clean host is switched to it.
    h.sh("git switch -qc feature && echo f > f.txt && git add f.txt && git commit -qm feature");
    let r = h.ks(&["sync"]);
    assert!(
        r.ok()
            .stdout
            .contains("switch the host from main to feature (new branch)"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["branch", "--show-current"]), "feature");
    assert!(h.project.join("f.txt").exists());

    // ...a dirty one is refused with what to do, and left alone.
    h.sh("git switch -qc other && echo o > o.txt && git add o.txt && git commit -qm other");
    h.write(&h.project.join("f.txt"), "dirty\n");
    let r = h.ks(&["sync"]);
    r.code(2);
    assert!(
        r.text().contains("uncommitted changes") && r.text().contains("commit or stash"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["branch", "--show-current"]), "feature");
    assert_eq!(
        std::fs::read_to_string(h.project.join("f.txt")).expect("f"),
        "dirty\n"
    );
    h.git(&["checkout", "-q", "--", "f.txt"]);

    // Any branch the sandbox has, e.g. a worktree's, by --branch.
    h.sh("git worktree add -q -b wt-branch .worktrees/wt-branch feature && cd .worktrees/wt-branch && echo w > w.txt && git add w.txt && git commit -qm 'worktree work'");
    let r = h.ks(&["sync", "--branch", "wt-branch"]);
    assert!(
        r.ok()
            .stdout
            .contains("synced wt-branch: 1 commit(s) from the sandbox"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["branch", "--show-current"]), "wt-branch");
    assert!(h.project.join("w.txt").exists());
    h.ks(&["sync", "--branch", "no-such-branch"]).code(2);

    // stop --sync brings the last commits home before stopping.
    h.sh("echo last > last.txt && git add last.txt && git commit -qm last");
    h.ks(&["stop", "--sync"]).ok();
    assert_eq!(h.git(&["branch", "--show-current"]), "other");
    assert!(h.project.join("last.txt").exists());
    assert_eq!(h.status_json(&name)["state"], "stopped");
}

/// A hostile sandbox: nothing it writes may run code on the host or
/// change the host's git configuration.
pub fn sync_hostile(h: Host) {
    h.start(&[]).ok();
    let canary = h.tmp.path().join("pwned");
    let c = canary.display().to_string();
    let config_before = std::fs::read(h.project.join(".git/config")).expect("config");
    let script = format!(
        r#"set -e
        cd /workspace
        for hk in post-merge post-checkout post-rewrite reference-transaction pre-push pre-commit post-update; do
            printf '#!/bin/sh\ntouch {c}\n' > .git/hooks/$hk; chmod +x .git/hooks/$hk
        done
        mkdir -p evilhooks && cp .git/hooks/post-merge evilhooks/ && git config core.hooksPath /workspace/evilhooks
        git config core.fsmonitor 'touch {c}; false'
        git config core.sshCommand 'touch {c}; ssh'
        git config filter.evil.smudge 'touch {c}; cat'
        git config filter.evil.clean 'touch {c}; cat'
        printf '* filter=evil\n' > .gitattributes
        ln -s .git/hooks evil-link
        mkdir -p nested.git/objects nested.git/refs
        printf 'ref: refs/heads/main\n' > nested.git/HEAD
        printf '[core]\n\tbare = true\n\tfsmonitor = touch {c}\n' > nested.git/config
        head -c 30000000 /dev/urandom > big.bin
        # Random bytes do not compress: storing them at level 0 spares
        # seconds of zlib under TCG (here and in the guest's pack for the
        # host's fetch) and the object is the same 30 MB.
        git config core.compression 0
        git add -A
        git -c core.hooksPath=/dev/null commit -qm 'hostile content'
        "#
    );
    h.sh(&script);
    let r = h.ks(&["sync"]);
    r.ok();
    assert!(
        h.project.join("big.bin").exists(),
        "the large object came through: {}",
        r.text()
    );
    // The host uses its repository as usual afterwards.
    h.git(&["status"]);
    h.git(&["log", "-1"]);
    assert!(!canary.exists(), "the sandbox ran code on the host");
    assert_eq!(
        std::fs::read(h.project.join(".git/config")).expect("config"),
        config_before,
        "host .git/config changed"
    );
    assert!(
        !h.project.join(".git/hooks/post-merge").exists(),
        "hooks were copied"
    );

    // A submodule URL carrying options, and a tree that smuggles a `.git`
    // directory, are refused by the object checks; the host is untouched.
    let head = h.git(&["rev-parse", "HEAD"]);
    h.sh(&format!(
        "printf '[submodule \"sub\"]\\n\\tpath = sub\\n\\turl = --upload-pack=touch {c}\\n' > .gitmodules && git add .gitmodules && git -c core.hooksPath=/dev/null commit -qm submodule"
    ));
    let r = h.ks(&["sync"]);
    assert_eq!(
        r.code,
        Some(3),
        "a submodule URL with options must be refused: {}",
        r.text()
    );
    assert!(
        r.text().contains("disallowed submodule url"),
        "{}",
        r.text()
    );
    assert_eq!(h.git(&["rev-parse", "HEAD"]), head);
    h.sh("git -c core.hooksPath=/dev/null reset -q --hard HEAD~1");
    let smuggle = format!(
        r#"set -e
        cd /workspace
        hook=$(printf '#!/bin/sh\ntouch {c}\n' | git hash-object -w --stdin)
        hooks=$(printf '100755 blob %s\tpost-checkout\n' $hook | git mktree)
        dotgit=$(printf '040000 tree %s\thooks\n' $hooks | git mktree)
        top=$( (git ls-tree HEAD; printf '040000 tree %s\t.git\n' $dotgit) | git mktree --missing)
        commit=$(git commit-tree $top -p HEAD -m smuggle)
        git update-ref refs/heads/main $commit
        "#
    );
    h.sh(&smuggle);
    let r = h.ks(&["sync"]);
    assert_ne!(
        r.code,
        Some(0),
        "a tree with .git must be refused: {}",
        r.text()
    );
    assert_eq!(h.git(&["rev-parse", "HEAD"]), head);
    h.git(&["status"]);
    assert!(!canary.exists(), "the sandbox ran code on the host");
    assert_eq!(
        std::fs::read(h.project.join(".git/config")).expect("config"),
        config_before
    );
}

/// The project's env files reach /workspace at start and on sync, and
/// direnv loads them for exec; host symlinks are not followed.
pub fn env_files(h: Host) {
    h.write(&h.project.join(".gitignore"), ".env*\n");
    h.git(&["add", ".gitignore"]);
    h.git(&["commit", "-qm", "ignore env files"]);
    h.write(
        &h.project.join(".env"),
        "APP_MODE=from-dotenv\nSHARED=base\n",
    );
    h.write(&h.project.join(".env.local"), "SHARED=local-wins\n");
    std::os::unix::fs::symlink(
        h.tmp.path().join("home/.ssh/id_ed25519"),
        h.project.join(".env.production"),
    )
    .expect("symlink");
    let r = h.start(&[]);
    assert!(
        r.ok().stdout.contains("env files: .env, .env.local"),
        "{}",
        r.text()
    );
    let r = h.ks(&["exec", "--", "sh", "-c", "echo $APP_MODE $SHARED"]);
    assert_eq!(r.ok().stdout.trim(), "from-dotenv local-wins");
    assert_eq!(
        h.sh("ls -a | grep -c '^.env.production$' || true").trim(),
        "0",
        "a host symlink was followed"
    );
    assert_eq!(
        h.sh("git status --porcelain"),
        "",
        "env files must not show as changes in the guest"
    );
    // The session's interactive shells load them too (direnv's hook).
    // The keys go once the shell shows its prompt, the pane is read once
    // the answer is there (each wait at most 10 s).
    let pane = h.sh(
        "tmux new-session -d -s envcheck -c /workspace && \
         for i in $(seq 100); do [ -n \"$(tmux capture-pane -p -t envcheck | tr -d '[:space:]')\" ] && break; sleep 0.1; done; \
         tmux send-keys -t envcheck 'echo VAL=$APP_MODE' Enter && \
         for i in $(seq 100); do tmux capture-pane -p -t envcheck | grep -q '^VAL=' && break; sleep 0.1; done; \
         tmux capture-pane -p -t envcheck; tmux kill-session -t envcheck",
    );
    assert!(pane.contains("VAL=from-dotenv"), "{pane}");
    // Changed on the host: the next sync carries it.
    h.write(&h.project.join(".env"), "APP_MODE=changed\nSHARED=base\n");
    h.ks(&["sync"]).code(2);
    let r = h.ks(&["exec", "--", "sh", "-c", "echo $APP_MODE"]);
    assert_eq!(r.ok().stdout.trim(), "changed");
}

/// `sync --artifacts`: build outputs come home with rsync, and nothing the
/// sandbox writes lands outside the destination.
pub fn artifacts(h: Host) {
    let cfg = h.tmp.path().join("config/keystone/agent.toml");
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "[defaults]\n",
        "[defaults]\nartifacts = [\"dist\", \"out/report.txt\"]\n",
    );
    h.write(&cfg, &text);
    h.write(&h.project.join(".gitignore"), "dist/\nout/\n");
    h.git(&["add", ".gitignore"]);
    h.git(&["commit", "-qm", "ignore outputs"]);
    // On the host, dist/escape is a symlink to a directory outside the
    // project: the copy must replace it, never write through it.
    let outside = h.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::create_dir_all(h.project.join("dist")).expect("mkdir");
    std::os::unix::fs::symlink(&outside, h.project.join("dist/escape")).expect("symlink");
    h.start(&[]).ok();
    h.sh("mkdir -p dist/sub dist/escape out && echo 'bundle' > dist/app.js && echo deep > dist/sub/x.txt \
          && echo pwned > dist/escape/pwned && ln -s /etc/passwd dist/passwd-link && ln -s app.js dist/alias.js \
          && echo report > out/report.txt");
    let r = h.ks(&["sync", "--artifacts"]);
    r.ok();
    assert!(
        r.stdout.contains("artifacts: copied dist")
            && r.stdout.contains("artifacts: copied out/report.txt"),
        "{}",
        r.text()
    );
    assert_eq!(
        std::fs::read_to_string(h.project.join("dist/app.js")).expect("app.js"),
        "bundle\n"
    );
    assert_eq!(
        std::fs::read_to_string(h.project.join("dist/sub/x.txt")).expect("x"),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_to_string(h.project.join("out/report.txt")).expect("report"),
        "report\n"
    );
    assert!(
        !outside.join("pwned").exists(),
        "rsync wrote through a host symlink"
    );
    assert!(
        std::fs::symlink_metadata(h.project.join("dist/passwd-link")).is_err(),
        "a symlink out of the tree came through"
    );
    assert!(std::fs::symlink_metadata(h.project.join("dist/alias.js"))
        .is_ok_and(|m| m.file_type().is_symlink()));
    // A destination reached through a symlink is refused.
    std::fs::remove_dir_all(h.project.join("out")).expect("rm");
    std::os::unix::fs::symlink(&outside, h.project.join("out")).expect("symlink");
    let r = h.ks(&["sync", "--artifacts"]);
    r.code(2);
    assert!(
        r.text().contains("is a symlink on the host"),
        "{}",
        r.text()
    );
    assert!(!outside.join("report.txt").exists());
    std::fs::remove_file(h.project.join("out")).expect("rm link");

    // Nothing lands in a .git or .keystone directory, at any depth: a
    // nested .git would make dist/ a repository with the sandbox's hooks.
    h.sh("mkdir -p dist/.git/hooks dist/.keystone \
          && printf '#!/bin/sh\\ntouch /tmp/hook-canary\\n' > dist/.git/hooks/post-checkout \
          && chmod +x dist/.git/hooks/post-checkout && echo '[defaults]' > dist/.keystone/agent.toml");
    h.ks(&["sync", "--artifacts"]).ok();
    assert!(h.project.join("dist/app.js").is_file());
    for planted in ["dist/.git", "dist/.keystone"] {
        assert!(
            std::fs::symlink_metadata(h.project.join(planted)).is_err(),
            "{planted} came home"
        );
    }

    // The attack the review reproduced: the agent commits a project file
    // that makes its own .git/hooks an artifact, and plants a hook there.
    // After sync brings the file home, `sync --artifacts` must not put the
    // hook into the host's .git: the file is not trusted, and even trusted
    // a project file may not choose artifacts.
    let hooks_before = dir_listing(&h.project.join(".git/hooks"));
    h.sh("mkdir -p .keystone && printf '[defaults]\\nartifacts = [\\\".git/hooks\\\", \\\".git\\\"]\\n' > .keystone/agent.toml \
          && git add .keystone/agent.toml && git commit -qm 'project settings' \
          && printf '#!/bin/sh\\ntouch /tmp/hook-canary\\n' > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout");
    h.ks(&["sync"]).ok();
    assert!(
        h.project.join(".keystone/agent.toml").is_file(),
        "the commit did not arrive"
    );
    let r = h.ks(&["sync", "--artifacts"]);
    assert!(
        !h.project.join(".git/hooks/post-checkout").exists(),
        "the sandbox's hook reached the host's .git:\n{}",
        r.text()
    );
    r.ok();
    assert!(r.text().contains("is not trusted"), "{}", r.text());
    let r = h.ks(&["trust"]);
    r.ok();
    assert!(
        r.text().contains("defaults.artifacts is ignored"),
        "{}",
        r.text()
    );
    h.ks(&["sync", "--artifacts"]).ok();
    assert!(
        !h.project.join(".git/hooks/post-checkout").exists(),
        "the sandbox's hook reached the host's .git"
    );
    assert_eq!(dir_listing(&h.project.join(".git/hooks")), hooks_before);
    // The user's own file naming .git is refused, saying why.
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "artifacts = [\"dist\", \"out/report.txt\"]",
        "artifacts = [\".git/hooks\"]",
    );
    h.write(&cfg, &text);
    let r = h.ks(&["sync", "--artifacts"]);
    r.code(2);
    assert!(r.text().contains("is refused"), "{}", r.text());
    assert_eq!(dir_listing(&h.project.join(".git/hooks")), hooks_before);
}

/// Names and contents of the files in `dir`, sorted.
fn dir_listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The paths that differ between two `tree_bytes` snapshots.
fn changed_paths(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut names: Vec<String> = a
        .iter()
        .filter(|x| !b.contains(x))
        .chain(b.iter().filter(|x| !a.contains(x)))
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// auto-commit: a commit in the sandbox reaches the host with no command;
/// a refusal is recorded and shown by status; the syncer stops with the
/// sandbox.
pub fn auto_commit(h: Host) {
    let name = h.name();
    h.start(&["--sync-mode", "auto-commit"]).ok();
    let theirs = h.sh(
        "echo auto > auto.txt && git add auto.txt && git commit -qm auto && git rev-parse HEAD",
    );
    let arrived = eventually(Duration::from_secs(60), || {
        h.git(&["rev-parse", "HEAD"]) == theirs.trim()
    });
    assert!(arrived, "the sandbox's commit did not reach the host");
    assert!(h.project.join("auto.txt").exists());
    // A dirty host on another branch: recorded, not forced.
    h.write(&h.project.join("README.md"), "dirty on the host\n");
    h.sh("git switch -qc elsewhere && echo e > e.txt && git add e.txt && git commit -qm elsewhere");
    let recorded = eventually(Duration::from_secs(20), || {
        h.status_json(&name)["last_sync"]["outcome"]
            .as_str()
            .unwrap_or("")
            .contains("uncommitted changes")
    });
    assert!(
        recorded,
        "the refusal must show in status: {}",
        h.status_json(&name)
    );
    assert_eq!(h.git(&["branch", "--show-current"]), "main");
    assert_eq!(
        std::fs::read_to_string(h.project.join("README.md")).expect("readme"),
        "dirty on the host\n"
    );
    assert!(
        !processes_matching(&format!("__autosync {name}")).is_empty(),
        "the syncer runs while the sandbox runs"
    );
    h.ks(&["stop"]).ok();
    assert!(
        eventually(Duration::from_secs(10), || processes_matching(&format!(
            "__autosync {name}"
        ))
        .is_empty()),
        "the syncer must stop with the sandbox"
    );
}

/// auto-idle: nothing moves while the workspace is busy; the commit comes
/// once it has been quiet for sync_idle_seconds.
pub fn auto_idle(h: Host) {
    let cfg = h.tmp.path().join("config/keystone/agent.toml");
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("[defaults]\n", "[defaults]\nsync_idle_seconds = 4\n");
    h.write(&cfg, &text);
    h.start(&["--sync-mode", "auto-idle"]).ok();
    let head = h.git(&["rev-parse", "HEAD"]);
    // Commit, then keep the workspace busy for ~8 s.
    let theirs = h.sh(
        "echo idle > idle.txt && git add idle.txt && git commit -qm idle && git rev-parse HEAD",
    );
    let busy = h.ks_spawn(&[
        "exec",
        "--",
        "sh",
        "-c",
        "for i in $(seq 16); do date > busy.log; sleep 0.5; done",
    ]);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        h.git(&["rev-parse", "HEAD"]),
        head,
        "synced while the workspace was busy"
    );
    let _ = busy.wait_with_output();
    let arrived = eventually(Duration::from_secs(20), || {
        h.git(&["rev-parse", "HEAD"]) == theirs.trim()
    });
    assert!(arrived, "the commit did not arrive after the quiet period");
}

/// Two sandboxes run at once, apart; `--fresh` on a running sandbox
/// replaces it, leaving exactly one of it.
pub fn two_at_once_and_fresh(h: Host) {
    let a = h.name();
    let other = h.second_project("second-project");
    h.start(&[]).ok();
    h.ks_at(&other, &["start", "--no-attach"]).ok();
    assert_eq!(h.ks(&["exec", "--", "hostname"]).ok().stdout.trim(), a);
    assert_eq!(
        h.ks_at(&other, &["exec", "--", "hostname"])
            .ok()
            .stdout
            .trim(),
        "second-project"
    );
    let count = |name: &str| {
        let vm = processes_matching(&format!("-name keystone-{name} ")).len();
        let sup = top_processes_matching(&format!("__supervise {name}")).len();
        (vm, sup)
    };
    let vm_backend = h.backend == "microvm";
    let one = if vm_backend { (1, 1) } else { (0, 1) };
    assert_eq!(count(&a), one, "{a}");
    assert_eq!(count("second-project"), one);
    h.sh("echo old > old.txt");
    h.start(&["--fresh"]).ok();
    assert_eq!(
        count(&a),
        one,
        "--fresh must leave exactly one instance of {a}"
    );
    assert_eq!(h.sh("ls old.txt 2>/dev/null | wc -l").trim(), "0");
    // The other sandbox was not disturbed.
    assert_eq!(
        h.ks_at(&other, &["exec", "--", "echo", "still-here"])
            .ok()
            .stdout
            .trim(),
        "still-here"
    );
    h.ks_at(&other, &["stop"]).ok();
    h.ks(&["stop"]).ok();
    assert_eq!(count(&a), (0, 0));
    assert_eq!(count("second-project"), (0, 0));
}

/// Worktrees: one per branch at /workspace/.worktrees/<branch>, each with
/// its own session; exec/attach pick one; bad input is refused clearly.
pub fn worktrees(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    let r = h.ks(&["worktree", "add", "feature-a", "--create"]);
    assert!(
        r.ok().stdout.contains(&format!("session {name}-feature-a")),
        "{}",
        r.text()
    );
    h.sh("git branch feature-b");
    h.ks(&["worktree", "add", "feature-b"]).ok();
    // A different command in each worktree.
    let r = h.ks(&[
        "exec",
        "--worktree",
        "feature-a",
        "--",
        "sh",
        "-c",
        "pwd; git branch --show-current; echo a > a.txt; git add a.txt; git commit -qm a",
    ]);
    assert!(
        r.ok()
            .stdout
            .starts_with("/workspace/.worktrees/feature-a\nfeature-a\n"),
        "{}",
        r.text()
    );
    let r = h.ks(&[
        "exec",
        "--worktree",
        "feature-b",
        "--",
        "git",
        "branch",
        "--show-current",
    ]);
    assert_eq!(r.ok().stdout.trim(), "feature-b");
    // Sessions are created on demand, one per worktree.
    h.sh(&format!(
        "tmux new-session -d -s {name}-feature-a -c /workspace/.worktrees/feature-a"
    ));
    let r = h.ks(&["worktree", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&r.ok().stdout).expect("json");
    let rows = rows.as_array().expect("rows").clone();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let row = |b: &str| {
        rows.iter()
            .find(|r| r["branch"] == b)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(row("main")["is_main"], true);
    assert_eq!(row("feature-a")["path"], "/workspace/.worktrees/feature-a");
    assert_eq!(row("feature-a")["session"], format!("{name}-feature-a"));
    assert_eq!(row("feature-a")["session_running"], true);
    assert_eq!(row("feature-b")["session_running"], false);
    assert_eq!(
        h.sh("git status --porcelain"),
        "",
        ".worktrees must not show as a change"
    );
    // Bad input.
    let says = |args: &[&str], code: i32, words: &str| {
        let r = h.ks(args);
        r.code(code);
        assert!(r.text().contains(words), "{args:?}: {}", r.text());
    };
    says(
        &["worktree", "add", "bad..name", "--create"],
        2,
        "is not a valid branch name",
    );
    says(
        &["worktree", "add", "feature-a"],
        2,
        "worktree feature-a already exists",
    );
    says(&["worktree", "add", "no-such-branch"], 1, "pass --create");
    says(&["worktree", "remove", "main"], 2, "cannot be removed");
    says(
        &["worktree", "remove", "nope"],
        1,
        "has no worktree \"nope\"",
    );
    says(
        &["attach", "--worktree", "nope"],
        1,
        "has no worktree \"nope\"",
    );
    says(
        &["attach", "--web", "--worktree", "nope"],
        1,
        "worktree add nope",
    );
    says(
        &["exec", "--worktree", "nope", "--", "true"],
        1,
        "has no worktree",
    );
    // Nothing half-made: the refused adds left no worktree or branch.
    assert_eq!(h.sh("git branch --list 'bad*' 'no-such*'").trim(), "");
    // remove refuses unsynced work, then takes it once synced; the other
    // worktree's session is untouched.
    let r = h.ks(&["worktree", "remove", "feature-a"]);
    r.code(2);
    assert!(
        r.text().contains("commit(s) the host does not have"),
        "{}",
        r.text()
    );
    h.ks(&["sync", "--branch", "feature-a"]).ok();
    h.git(&["checkout", "-q", "main"]);
    h.sh(&format!(
        "tmux new-session -d -s {name}-feature-b -c /workspace/.worktrees/feature-b"
    ));
    h.sh("echo dirty > .worktrees/feature-b/dirty.txt");
    h.ks(&["worktree", "remove", "feature-b"]).code(2);
    h.ks(&["worktree", "remove", "feature-a"]).ok();
    assert_eq!(
        h.sh(&format!(
            "tmux has-session -t {name}-feature-b && echo alive"
        ))
        .trim(),
        "alive"
    );
    h.ks(&["worktree", "remove", "feature-b", "--force"]).ok();
    let r = h.ks(&["worktree", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&r.ok().stdout).expect("json");
    assert_eq!(rows.as_array().map(|a| a.len()), Some(1), "{rows}");
}

/// A stopped sandbox's disk is a layer over its image: `image rm` refuses
/// that image, a start over a missing or (microVM) rebuilt base refuses
/// and keeps the disk, and with the base back the unsynced work is there.
pub fn disk_base(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    h.sh("echo kept > unsynced.txt && git add unsynced.txt && git commit -qm 'not yet synced'");
    h.ks(&["stop"]).ok();
    let image = h.status_json(&name)["image"]
        .as_str()
        .expect("status names the image")
        .to_string();
    let r = h.ks(&["image", "rm", &image]);
    r.code(2);
    assert!(
        r.stderr.contains(&format!(
            "image {image} holds the disks of sandbox(es) {name}"
        )),
        "{}",
        r.text()
    );
    let record_path = h
        .state_dir()
        .join("sandboxes")
        .join(&name)
        .join("disk/base.json");
    let record = std::fs::read_to_string(&record_path).expect("the disk records its base");
    let v: serde_json::Value = serde_json::from_str(&record).expect("base.json");
    assert_eq!(v["image"], image.as_str(), "{record}");

    // The disk names an image the store no longer has.
    let mut gone = v.clone();
    gone["image"] = "minimal-000000000000".into();
    h.write(&record_path, &gone.to_string());
    let r = h.start(&[]);
    r.code(2);
    assert!(
        r.stderr.contains(
            "is built on image minimal-000000000000, which is no longer in the image store"
        ) && r.stderr.contains("--fresh"),
        "{}",
        r.text()
    );
    assert!(record_path.exists(), "a refused start keeps the disk");

    if h.backend == "microvm" {
        // The same image id, another build of its ext4: never boot over it.
        let mut rebuilt = v.clone();
        rebuilt["file"]["ino"] = (v["file"]["ino"].as_u64().expect("ino") + 1).into();
        h.write(&record_path, &rebuilt.to_string());
        let r = h.start(&[]);
        r.code(3);
        assert!(
            r.stderr.contains("was made over another build of image")
                && r.stderr.contains("would corrupt it"),
            "{}",
            r.text()
        );
        assert!(record_path.exists(), "a refused start keeps the disk");
    }

    // The true base again: the sandbox comes back with its work.
    h.write(&record_path, &record);
    h.start(&[]).ok();
    assert_eq!(h.sh("cat unsynced.txt").trim(), "kept");
    h.ks(&["sync"]).ok();
    assert_eq!(h.git(&["log", "-1", "--format=%s"]), "not yet synced");
}

/// Memory a finished process used goes back to the host: `status` (the
/// cgroup's usage; the microVM's QEMU resident set, which free page
/// reporting through virtio-balloon shrinks) falls back after a 700 MB
/// allocation inside is freed.
pub fn memory_given_back(h: Host) {
    let name = h.name();
    h.start(&[]).ok();
    let used = || {
        h.status_json(&name)["memory_used_bytes"]
            .as_u64()
            .expect("status reports the memory used")
    };
    let before = used();
    let peak = h.sh(
        "python3 -c \"b = bytearray(700 << 20); b[::4096] = b'x' * len(b[::4096]); \
         print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\"",
    );
    assert!(
        peak.trim().parse::<u64>().expect("VmRSS kB") > 600 << 10,
        "the allocation was touched: {peak}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut now = used();
    while now > before + (300 << 20) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
        now = used();
    }
    assert!(
        now <= before + (300 << 20),
        "memory not given back: {} MB used before, {} MB a minute after 700 MB were freed",
        before >> 20,
        now >> 20
    );
}

/// A brand-new repository (no commit yet): the agent's first commit comes
/// home onto the host's unborn branch, checked out, and the report is what
/// git says afterwards.
pub fn unborn_branch(h: Host) {
    std::fs::remove_dir_all(h.project.join(".git")).expect("rm .git");
    std::fs::remove_file(h.project.join("README.md")).expect("rm README");
    h.git(&["init", "-q", "-b", "main"]);
    h.git(&["config", "user.name", "Host Dev"]);
    h.git(&["config", "user.email", "dev@host.example"]);
    h.start(&[]).ok();
    h.sh("cd /workspace && echo hello > hello.txt && git add hello.txt && git commit -qm 'first commit'");
    let r = h.ks(&["sync"]);
    r.ok();
    let head = h.git(&["rev-parse", "HEAD"]);
    assert_eq!(h.git(&["rev-parse", "refs/heads/main"]), head);
    assert_eq!(h.git(&["log", "-1", "--format=%s"]), "first commit");
    assert!(
        r.text().contains(&head[..12]),
        "the report does not name the commit the host is on ({head}):\n{}",
        r.text()
    );
    assert_eq!(
        std::fs::read_to_string(h.project.join("hello.txt")).expect("the agent's file"),
        "hello\n"
    );
    assert_eq!(
        h.git(&["status", "--porcelain"]),
        "",
        "the checkout is clean"
    );
    // Nothing is left only in keystone's refs: destroy has nothing to
    // guard (without a terminal its confirmation cancels: exit 5, not 2).
    let name = h.name();
    assert_eq!(h.status_json(&name)["pending_commits"], 0);
    h.ks(&["destroy", &name]).code(5);
}

/// Every file under `dir` (links as their targets), with its bytes,
/// skipping the subtrees named in `skip`.
pub fn tree_bytes(dir: &std::path::Path, skip: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).expect("beneath").display().to_string();
            if skip
                .iter()
                .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
            {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("meta");
            if m.is_dir() {
                stack.push(p);
            } else if m.file_type().is_symlink() {
                out.push((
                    rel,
                    std::fs::read_link(&p)
                        .expect("link")
                        .display()
                        .to_string()
                        .into_bytes(),
                ));
            } else {
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// The host runs out of disk during a sync: a clear error (exit 3), and
/// the host's branches, index and working tree as they were; with room
/// again, the same sync brings the commits. The host repository is moved
/// onto a small file system of its own (a tmpfs with a size).
pub fn sync_out_of_disk(h: Host) {
    h.start(&["--network", "none"]).ok();
    // 40 MB that does not compress.
    h.sh("cd /workspace && head -c 40000000 /dev/urandom > big.bin && git add big.bin && git commit -qm 'a big file'");
    let project = h.project.clone();
    let aside = h.tmp.path().join("project-aside");
    let run = crate::harness::run_ok;
    let (p, a) = (project.display().to_string(), aside.display().to_string());
    run(&["cp", "-a", &p, &a]);
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["-l", &self.0])
                .status();
        }
    }
    // 1. Too small for the objects: the fetch itself fails.
    run(&["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", &p]);
    let _unmount = Unmount(p.clone());
    run(&["cp", "-a", &format!("{a}/."), &p]);
    let before = tree_bytes(&project, &[]);
    let r = h.ks(&["sync"]);
    r.code(3);
    assert!(r.stderr.contains("disk is full"), "{}", r.text());
    let changed = changed_paths(&before, &tree_bytes(&project, &[]));
    assert!(
        changed.is_empty(),
        "a failed fetch changed the host repository: {changed:?}"
    );
    // 2. Room for the objects, not for the files: refused before the
    //    working tree moves.
    run(&["mount", "-o", "remount,size=60m", &p]);
    let kept = ["big.bin"];
    let before = tree_bytes(
        &project,
        &[".git/objects", ".git/refs/keystone", ".git/packed-refs"],
    );
    let r = h.ks(&["sync"]);
    r.code(3);
    assert!(r.stderr.contains("too full"), "{}", r.text());
    let skip = [".git/objects", ".git/refs/keystone", ".git/packed-refs"];
    let changed = changed_paths(&before, &tree_bytes(&project, &skip));
    assert!(
        changed.is_empty(),
        "a refused sync changed the host's branches, index or working tree: {changed:?}"
    );
    assert!(!project.join(kept[0]).exists());
    // 3. With room, the same sync works.
    run(&["mount", "-o", "remount,size=200m", &p]);
    h.ks(&["sync"]).ok();
    assert_eq!(h.git(&["log", "-1", "--format=%s"]), "a big file");
    assert_eq!(
        std::fs::metadata(project.join("big.bin"))
            .expect("big.bin")
            .len(),
        40_000_000
    );
}

/// A repository with a nested submodule: it arrives whole (the sandbox
/// builds from both levels with no network), an agent's commit inside the
/// submodule comes home and the host's checkout follows it, a host commit
/// in the submodule goes in, and the sandbox's `.gitmodules` (a URL turned
/// to a canary repository, a submodule of its own) drives nothing on the
/// host.
pub fn submodules(h: Host) {
    let tmp = h.tmp.path();
    let git_at = |dir: &std::path::Path, args: &[&str]| -> String {
        let mut cmd = std::process::Command::new("git");
        cmd.arg("-C")
            .arg(dir)
            .args(["-c", "protocol.file.allow=always"])
            .args(args)
            .env("GIT_AUTHOR_NAME", "Host Dev")
            .env("GIT_AUTHOR_EMAIL", "dev@host.example")
            .env("GIT_COMMITTER_NAME", "Host Dev")
            .env("GIT_COMMITTER_EMAIL", "dev@host.example");
        let r = crate::harness::run_bounded(cmd, Duration::from_secs(60));
        assert_eq!(
            r.code,
            Some(0),
            "git {args:?} in {}:\n{}",
            dir.display(),
            r.text()
        );
        r.stdout.trim().to_string()
    };
    let repo = |name: &str, file: &str, text: &str| -> std::path::PathBuf {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        git_at(&dir, &["init", "-q", "-b", "main"]);
        std::fs::write(dir.join(file), text).expect("write");
        git_at(&dir, &["add", "."]);
        git_at(&dir, &["commit", "-qm", &format!("{name} one")]);
        dir
    };
    let _nested = repo("nested", "n.txt", "nested\n");
    let lib = repo("lib", "l.txt", "lib\n");
    git_at(
        &lib,
        &["submodule", "add", "-q", "../nested", "deps/nested"],
    );
    git_at(&lib, &["commit", "-qm", "lib uses nested"]);
    let canary = repo("canary", "c.txt", "canary\n");
    let canary_sha = git_at(&canary, &["rev-parse", "HEAD"]);
    let p = h.project.clone();
    git_at(
        &p,
        &[
            "submodule",
            "add",
            "-q",
            &lib.display().to_string(),
            "vendor/lib",
        ],
    );
    git_at(&p, &["submodule", "update", "--init", "--recursive", "-q"]);
    h.write(
        &p.join("build.sh"),
        "cat vendor/lib/l.txt vendor/lib/deps/nested/n.txt > out.txt\n",
    );
    git_at(&p, &["add", "-A"]);
    git_at(&p, &["commit", "-qm", "vendor lib"]);
    let config_before = std::fs::read(p.join(".git/config")).expect("config");
    let modules = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let modules_before = modules(&p.join(".git/modules/vendor"));

    h.start(&["--network", "none"]).ok();
    // Whole inside, both levels, with no network: the build reads them.
    let status = h.sh("cd /workspace && git submodule status --recursive");
    assert!(
        status.lines().count() == 2 && !status.lines().any(|l| l.starts_with('-')),
        "both submodules are checked out inside:\n{status}"
    );
    assert_eq!(
        h.sh("cd /workspace && sh build.sh && cat out.txt"),
        "lib\nnested\n"
    );
    assert_eq!(
        h.sh("cd /workspace && git submodule update --init --recursive && echo ok")
            .trim(),
        "ok"
    );
    // The agent commits in the submodule and records it; the same commit
    // points `.gitmodules` at the canary and adds a submodule of its own.
    let inside = h.sh(&format!(
        "cd /workspace/vendor/lib && git checkout -q -B main && echo agent >> l.txt && \
         git commit -qam 'agent in lib' && git rev-parse HEAD && cd /workspace && \
         git config -f .gitmodules submodule.vendor/lib.url {canary} && \
         git config -f .gitmodules submodule.evil.path evil && \
         git config -f .gitmodules submodule.evil.url {canary} && \
         git update-index --add --cacheinfo 160000,{canary_sha},evil && \
         git add .gitmodules vendor/lib && git commit -qm 'bump lib'",
        canary = canary.display()
    ));
    let agent_lib = inside.trim().to_string();
    let r = h.ks(&["sync"]);
    r.ok();
    assert!(
        r.stdout.contains("submodule vendor/lib:"),
        "the report says what the submodule did:\n{}",
        r.text()
    );
    assert_eq!(h.git(&["log", "-1", "--format=%s"]), "bump lib");
    let host_lib = p.join("vendor/lib");
    assert_eq!(git_at(&host_lib, &["rev-parse", "HEAD"]), agent_lib);
    assert_eq!(
        std::fs::read_to_string(host_lib.join("l.txt")).expect("l.txt"),
        "lib\nagent\n"
    );
    assert_eq!(
        h.git(&["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
    // Nothing of the sandbox's `.gitmodules` acted on the host.
    assert_eq!(
        std::fs::read(p.join(".git/config")).expect("config"),
        config_before,
        "the host's .git/config changed"
    );
    assert_eq!(modules(&p.join(".git/modules/vendor")), modules_before);
    assert!(
        !p.join(".git/modules/evil").exists(),
        "the sandbox's submodule was cloned"
    );
    for dir in [p.clone(), host_lib.clone()] {
        let mut cmd = std::process::Command::new("git");
        cmd.arg("-C")
            .arg(&dir)
            .args(["cat-file", "-e", &canary_sha]);
        let r = crate::harness::run_bounded(cmd, Duration::from_secs(30));
        assert_ne!(
            r.code,
            Some(0),
            "the canary's commit reached {}",
            dir.display()
        );
    }
    // A host commit in the submodule goes in with the superproject's.
    std::fs::write(host_lib.join("host.txt"), "from the host\n").expect("write");
    git_at(&host_lib, &["add", "host.txt"]);
    git_at(&host_lib, &["commit", "-qm", "host in lib"]);
    git_at(&p, &["add", "vendor/lib"]);
    git_at(&p, &["commit", "-qm", "host bumps lib"]);
    h.ks(&["sync"]).ok();
    assert_eq!(
        h.sh(
            "cd /workspace && git submodule update --recursive --quiet && cat vendor/lib/host.txt"
        ),
        "from the host\n"
    );
}
