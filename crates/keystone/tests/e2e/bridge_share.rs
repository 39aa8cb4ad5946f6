//! A sandbox on a host bridge (every local backend), and the live share of
//! the project (virtiofs: microvm only).

use crate::harness::{eventually, processes_matching, Host};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A uid/gid that is nobody's on the host: files the agent writes through
/// the share must come out owned by it, the project directory's owner.
const OWNER: u32 = 4242;

fn require_virtiofsd() {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("virtiofsd").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "virtiofsd is required for the live-share test: `cargo install --root DIR virtiofsd` \
(needs apt-get install libseccomp-dev libcap-ng-dev) and put DIR/bin on PATH (scripts/test.sh does)"
    );
}

#[test]
fn live_share_microvm() {
    require_virtiofsd();
    let h = Host::new("microvm", "share-microvm");
    let name = h.name();

    // Bad combinations first; none may leave a sandbox behind.
    let r = h.ks(&["start", "--no-attach", "--share", "--backend", "container"]);
    r.code(2);
    assert!(
        r.stderr.contains("needs the microvm backend"),
        "{}",
        r.text()
    );
    let r = h.ks_env(
        &["start", "--no-attach", "--share"],
        &[("KEYSTONE_AGENT_SHARE_PROTO", "9p")],
    );
    r.code(4);
    assert!(r.stderr.contains("without 9p"), "{}", r.text());
    let r = h.ks_env(
        &["start", "--no-attach", "--share"],
        &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
    );
    r.code(4);
    assert!(
        r.stderr.contains("virtiofsd is not installed"),
        "{}",
        r.text()
    );
    let list = h.ks(&["list", "--json"]);
    list.ok();
    assert_eq!(list.stdout.trim(), "[]", "failed starts left a sandbox");

    // The project belongs to a user other than the one running keystone.
    let ok = Command::new("chown")
        .args(["-R", &format!("{OWNER}:{OWNER}")])
        .arg(&h.project)
        .status()
        .expect("chown")
        .success();
    assert!(ok);
    // Root working in another user's repository must say it trusts it.
    h.write(
        &h.tmp.path().join("home/.gitconfig"),
        "[safe]\n\tdirectory = *\n",
    );

    // A project file of the project's own (made read-only for the guest
    // with .git; one the guest creates later is only ever trusted content).
    std::fs::create_dir_all(h.project.join(".keystone")).expect(".keystone");
    std::fs::write(h.project.join(".keystone/agent.toml"), "[defaults]\n").expect("toml");
    let r = h.start(&["--share"]);
    r.ok();
    assert!(
        r.stdout.contains("shared live at /workspace"),
        "{}",
        r.text()
    );

    // The agent sees the project's files as its own, and what it writes is
    // the project owner's on the host, at once.
    let out =
        h.sh("stat -c %u:%g /workspace/README.md; mount | grep -c ' /workspace type virtiofs'");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1000:1000", "1"], "{out}");
    h.sh("echo from-agent > /workspace/from-agent.txt && mkdir -p /workspace/dir && echo x > /workspace/dir/f");
    let written = h.project.join("from-agent.txt");
    assert_eq!(
        std::fs::read_to_string(&written).expect("the agent's file on the host"),
        "from-agent\n"
    );
    for p in [
        written.clone(),
        h.project.join("dir"),
        h.project.join("dir/f"),
    ] {
        let m = std::fs::metadata(&p).expect("stat");
        assert_eq!((m.uid(), m.gid()), (OWNER, OWNER), "{}", p.display());
    }
    // Root in the guest writes as the owner too.
    h.ks(&[
        "exec",
        "--user",
        "root",
        "--",
        "touch",
        "/workspace/by-root",
    ])
    .ok();
    let m = std::fs::metadata(h.project.join("by-root")).expect("root's file");
    assert_eq!(m.uid(), OWNER);

    // The host's edits show up inside, live.
    std::fs::write(h.project.join("from-host.txt"), "from-host\n").expect("write");
    assert_eq!(h.sh("cat /workspace/from-host.txt"), "from-host\n");

    // The repository's metadata is read-only to the guest: it reads the
    // history, but neither the agent nor guest root can plant a hook, a
    // config or a ref there (the user's next git command would act on it),
    // nor touch .keystone.
    let snapshot = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let out = Command::new("find")
            .arg(dir)
            .args(["-type", "f"])
            .output()
            .expect("find");
        let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(&f).unwrap_or_default();
                (f, bytes)
            })
            .collect()
    };
    let git_before = snapshot(&h.project.join(".git"));
    let keystone_before = snapshot(&h.project.join(".keystone"));
    let canary = h.tmp.path().join("share-hook-canary");
    assert_eq!(
        h.sh("cd /workspace && git log -1 --format=%s").trim(),
        "initial commit"
    );
    let attempts = format!(
        "cd /workspace; \
         printf '#!/bin/sh\\ntouch {c}\\n' > .git/hooks/post-checkout && echo PLANTED-HOOK; \
         git config core.fsmonitor 'touch {c}' && echo PLANTED-CONFIG; \
         echo 0000000000000000000000000000000000000000 > .git/refs/heads/evil && echo PLANTED-REF; \
         echo x > .keystone/agent.toml && echo PLANTED-KEYSTONE; \
         git add from-agent.txt && git -c user.name=A -c user.email=a@x commit -qm 'agent commit' && echo COMMITTED; true",
        c = canary.display()
    );
    for user in ["agent", "root"] {
        let r = h.ks(&["exec", "--user", user, "--", "sh", "-c", &attempts]);
        assert!(
            !r.stdout.contains("PLANTED") && !r.stdout.contains("COMMITTED"),
            "{user} wrote the repository's metadata through the share:\n{}",
            r.text()
        );
        assert!(r.text().contains("Read-only file system"), "{}", r.text());
    }
    let root_remount = h.ks(&[
        "exec", "--user", "root", "--", "sh", "-c",
        "mount -o remount,rw /workspace 2>&1; echo x > /workspace/.git/hooks/post-checkout && echo PLANTED",
    ]);
    assert!(
        !root_remount.stdout.contains("PLANTED"),
        "{}",
        root_remount.text()
    );
    assert!(
        snapshot(&h.project.join(".git")) == git_before,
        "the host's .git changed"
    );
    assert!(
        snapshot(&h.project.join(".keystone")) == keystone_before,
        "the host's .keystone changed"
    );
    let checkout = Command::new("git")
        .args([
            "-c",
            "safe.directory=*",
            "checkout",
            "-q",
            "-b",
            "after-share",
        ])
        .current_dir(&h.project)
        .status()
        .expect("git checkout");
    assert!(checkout.success());
    assert!(!canary.exists(), "a hook of the guest's ran on the host");
    // The working tree stays the guest's to change.
    assert_eq!(
        h.sh("echo edit >> /workspace/README.md && echo ok").trim(),
        "ok"
    );

    // Nothing to sync, no worktrees on the share.
    let r = h.ks(&["sync"]);
    r.code(2);
    assert!(r.stderr.contains("nothing to sync"), "{}", r.text());
    let r = h.ks(&["worktree", "add", "--create", "feature"]);
    r.code(2);
    assert!(r.stderr.contains("live share"), "{}", r.text());

    // virtiofsd lives and dies with the VM.
    let project = h.project.display().to_string();
    // (In its namespace sandbox virtiofsd is a parent and a child.)
    assert!(!processes_matching(&format!("--shared-dir={project}")).is_empty());
    h.ks(&["stop", &name]).ok();
    assert!(
        eventually(Duration::from_secs(10), || processes_matching(&format!(
            "--shared-dir={project}"
        ))
        .is_empty()),
        "virtiofsd outlived the sandbox"
    );
    h.ks(&["destroy", "--force", &name]).ok();
}

/// A bridge of our own with a DHCP server on it, removed on drop.
struct TestBridge {
    name: String,
    subnet: String,
    dnsmasq: Child,
}

impl TestBridge {
    fn new() -> TestBridge {
        assert!(
            Command::new("dnsmasq").arg("--version").output().is_ok(),
            "dnsmasq is required for the bridge test (its DHCP server): apt-get install dnsmasq-base"
        );
        let n = std::process::id() % 200 + 20;
        let name = format!("kstbr{n}");
        let subnet = format!("10.77.{n}");
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        for args in [
            vec!["link", "add", &name, "type", "bridge"],
            vec!["addr", "add", &format!("{subnet}.1/24"), "dev", &name],
            vec!["link", "set", &name, "up"],
        ] {
            let ok = Command::new("ip")
                .args(&args)
                .status()
                .expect("ip")
                .success();
            assert!(ok, "ip {}", args.join(" "));
        }
        let dnsmasq = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--port=0",
                "--bind-interfaces",
                &format!("--interface={name}"),
                "--except-interface=lo",
                &format!("--dhcp-range={subnet}.10,{subnet}.50,1h"),
                "--dhcp-authoritative",
                "--no-resolv",
                "--no-hosts",
                "--leasefile-ro",
                "--pid-file=",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        TestBridge {
            name,
            subnet,
            dnsmasq,
        }
    }

    fn ports(&self) -> String {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.name])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

#[test]
fn bridge_network_container() {
    bridge_network("container");
}

#[test]
fn bridge_network_microvm() {
    bridge_network("microvm");
}

fn bridge_network(backend: &str) {
    let h = Host::new(backend, &format!("bridge-{backend}"));
    let name = h.name();
    let config = h.tmp.path().join("config/keystone/agent.toml");
    let base = std::fs::read_to_string(&config).expect("config");

    // No bridge named, then one that does not exist: exit 4, nothing left.
    let r = h.start(&["--network", "bridge"]);
    r.code(4);
    assert!(r.stderr.contains("needs a host bridge"), "{}", r.text());
    h.write(
        &config,
        &format!("{base}\n[backend.microvm]\nbridge = \"kstnone0\"\n"),
    );
    let r = h.start(&["--network", "bridge"]);
    r.code(4);
    assert!(
        r.stderr.contains("there is no bridge kstnone0"),
        "{}",
        r.text()
    );
    let list = h.ks(&["list", "--json"]);
    assert_eq!(list.stdout.trim(), "[]", "failed starts left a sandbox");

    let br = TestBridge::new();
    h.write(
        &config,
        &format!("{base}\n[backend.microvm]\nbridge = \"{}\"\n", br.name),
    );
    // A host service on the bridge's own address, for the guest to reach.
    let listener = std::net::TcpListener::bind(format!("{}.1:0", br.subnet)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"hello-from-the-bridge\n");
        }
    });

    h.start(&["--network", "bridge"]).ok();
    assert_eq!(h.status_json(&name)["network"], "bridge");
    assert!(
        br.ports().contains("kst-"),
        "no tap on the bridge: {}",
        br.ports()
    );
    // The microVM's eth0 is its host-only SSH link; a container has none.
    let dev = if backend == "microvm" { "eth1" } else { "eth0" };
    let mut addr = String::new();
    let leased = eventually(Duration::from_secs(60), || {
        addr = h.sh(&format!(
            "ip -4 -o addr show dev {dev} | awk '{{print $4}}'"
        ));
        addr.starts_with(&format!("{}.", br.subnet))
    });
    assert!(
        leased,
        "no DHCP lease on {dev} from the bridge's network: {addr:?}"
    );
    let got = h.sh(&format!(
        "timeout 10 bash -c 'exec 3<>/dev/tcp/{}.1/{port}; echo hi >&3; head -1 <&3'",
        br.subnet
    ));
    assert_eq!(got.trim(), "hello-from-the-bridge");

    // Stopping removes the link: QEMU's tap goes with QEMU, a veth with
    // the container's network namespace.
    h.ks(&["stop", &name]).ok();
    assert!(
        eventually(Duration::from_secs(5), || br.ports().trim().is_empty()),
        "a link outlived the sandbox: {}",
        br.ports()
    );

    // As a user (for the microVM: without the setuid helper), the missing
    // privilege is named.
    let helper = std::fs::metadata("/usr/lib/qemu/qemu-bridge-helper").map(|m| m.mode());
    if backend == "container" || helper.map(|m| m & 0o4000 == 0).unwrap_or(true) {
        let u = Host::with_user(
            backend,
            &format!("bridge-user-{backend}"),
            Some("keystone-test"),
        );
        let cfg = u.tmp.path().join("config/keystone/agent.toml");
        let ubase = std::fs::read_to_string(&cfg).expect("config");
        u.write(
            &cfg,
            &format!("{ubase}\n[backend.microvm]\nbridge = \"{}\"\n", br.name),
        );
        let r = u.start(&["--network", "bridge"]);
        r.code(4);
        let why = if backend == "container" {
            "needs root"
        } else {
            "needs privileges"
        };
        assert!(r.stderr.contains(why), "{}", r.text());
    }
    h.ks(&["destroy", "--force", &name]).ok();
}
