//! The egress lab: a network namespace on this host that stands for "the
//! outside" in the egress tests, with servers that log everything they
//! see (tests/fixtures/egress-lab.py), so that a test can prove both that
//! a probe got out and that it did not.
//!
//! Addresses (TEST-NET-2 and the IPv6 documentation range; not TEST-NET-1
//! or -3, which our CI machines use for their uplink and package mirror,
//! and which a lab route would hijack): the host side of a veth pair has 198.51.100.1/24 and
//! 2001:db8:77::1/64, the lab side 198.51.100.2/24 and 2001:db8:77::2/64.
//! The host reaches the lab through that connected route only, so any
//! probe the lab logs left through the host's own stack (pasta, passt, or
//! keystone's egress point on the host side).
//!
//! Root only (it makes a namespace and links); [`Drop`] removes them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const LAB_V4: &str = "198.51.100.2";
pub const LAB_V6: &str = "2001:db8:77::2";
pub const HOST_V4: &str = "198.51.100.1";

const SERVER: &str = include_str!("../fixtures/egress-lab.py");

pub struct Lab {
    pub ns: String,
    veth: String,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    /// The veth end in the test cluster's namespace, once made.
    cluster_link: Option<(String, String)>,
}

/// Fail (never skip) when a host tool is missing, naming its package.
fn require(tool: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{tool} is required for the egress lab: apt-get install {package}")
    })
}

/// Run a host command, bounded; fail with its output unless it succeeds.
#[track_caller]
fn run(program: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let r = crate::harness::run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(
        r.code,
        Some(0),
        "{} {args:?} failed:\n{}",
        program.display(),
        r.text()
    );
    r.stdout
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

impl Lab {
    /// Make the namespace and the veth pair, the certificate, and start
    /// the servers; returns once they all listen (at most 15 s).
    pub fn start() -> Lab {
        assert!(
            is_root(),
            "the egress lab makes a network namespace and must run as root"
        );
        let ip = require("ip", "iproute2");
        let openssl = require("openssl", "openssl");
        // The system's interpreter when there is one (a version manager's
        // shim may not run under `ip netns exec`'s environment).
        let python = Some(PathBuf::from("/usr/bin/python3"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| require("python3", "python3"));
        let pid = std::process::id();
        let ns = format!("kslab-{pid}");
        let veth = format!("kslab{pid}h");
        let peer = format!("kslab{pid}l");
        assert!(veth.len() <= 15, "interface name too long: {veth}");
        // Another lab (a run killed before its Drop) would hold the
        // addresses: say so rather than fail obscurely.
        let addrs = run(&ip, &["-o", "addr", "show"]);
        if let Some(line) = addrs.lines().find(|l| l.contains(&format!("{HOST_V4}/"))) {
            panic!(
                "{HOST_V4} is already on a host interface (a stale egress lab? remove it with `ip link del` and `ip netns del`):\n{line}"
            );
        }
        let _ = Command::new(&ip).args(["netns", "del", &ns]).output();

        let dir = tempfile::Builder::new()
            .prefix("ks-lab-")
            .tempdir_in("/tmp")
            .expect("lab tempdir");
        let mut lab = Lab {
            ns: ns.clone(),
            veth: veth.clone(),
            child: None,
            log: dir.path().join("events.jsonl"),
            dir,
            cluster_link: None,
        };

        run(&ip, &["netns", "add", &ns]);
        run(
            &ip,
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        run(&ip, &["link", "set", &peer, "netns", &ns]);
        run(&ip, &["addr", "add", "198.51.100.1/24", "dev", &veth]);
        run(
            &ip,
            &["addr", "add", "2001:db8:77::1/64", "dev", &veth, "nodad"],
        );
        run(&ip, &["link", "set", &veth, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            run(&ip, &all);
        };
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["addr", "add", "198.51.100.2/24", "dev", &peer]);
        in_ns(&["addr", "add", "2001:db8:77::2/64", "dev", &peer, "nodad"]);
        in_ns(&["link", "set", &peer, "up"]);

        // A self-signed certificate for *.lab.test (and lab.test).
        let cert = lab.dir.path().join("lab.crt");
        let key = lab.dir.path().join("lab.key");
        run(
            &openssl,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=*.lab.test",
                "-addext",
                "subjectAltName=DNS:*.lab.test,DNS:lab.test",
                "-keyout",
                &key.display().to_string(),
                "-out",
                &cert.display().to_string(),
            ],
        );
        let script = lab.dir.path().join("egress-lab.py");
        std::fs::write(&script, SERVER).expect("lab script");
        let stderr = std::fs::File::create(lab.dir.path().join("server.log")).expect("server log");
        let child = Command::new(&ip)
            .args(["netns", "exec", &ns])
            .arg(&python)
            .arg(&script)
            .arg("--log")
            .arg(&lab.log)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the lab server");
        lab.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(15);
        while !lab.saw(|e| e["kind"] == "ready") {
            if let Some(status) = lab.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the lab server exited ({status}):\n{}", lab.server_log());
            }
            assert!(
                Instant::now() < deadline,
                "the lab server did not get ready in 15 s:\n{}",
                lab.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The host reaches it (both families) before any test relies on it.
        for addr in [format!("{LAB_V4}:80"), format!("[{LAB_V6}]:80")] {
            let a: std::net::SocketAddr = addr.parse().expect("addr");
            std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("the host cannot reach the lab at {addr}: {e}"));
        }
        lab
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Every event the lab logged so far, in order.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Whether any event so far satisfies `f`.
    pub fn saw(&self, f: impl Fn(&Value) -> bool) -> bool {
        self.events().iter().any(f)
    }

    /// Events whose JSON text contains `needle` anywhere (a probe's
    /// unique token: in a name, a payload, a Host or an SNI).
    pub fn mentions(&self, needle: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e.to_string().contains(needle))
            .collect()
    }

    /// Wait (at most `limit`) for an event that satisfies `f`.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&Value) -> bool) -> bool {
        crate::harness::eventually(limit, || self.saw(&f))
    }

    /// The whole log, for a failure message.
    pub fn dump(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Lab {
    /// Give the test cluster's pods a route to the lab, as the host has
    /// (the open run must show a pod reaching it): a second veth pair from
    /// the lab into the cluster's network namespace
    /// (`KEYSTONE_TEST_CLUSTER_NETNS`, which forwards), on 198.51.101.0/30,
    /// with routes for the lab's address there and for the pod network
    /// (`KEYSTONE_TEST_POD_CIDR`) back. IPv4 only: the test cluster's pods
    /// have no IPv6.
    pub fn reach_from_cluster(&mut self) {
        let var =
            |name: &str| {
                std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                panic!("{name} is not set: `eval \"$(scripts/test-cluster.sh env)\"` after `up`")
            })
            };
        let cluster = var("KEYSTONE_TEST_CLUSTER_NETNS");
        let pods = var("KEYSTONE_TEST_POD_CIDR");
        let ip = require("ip", "iproute2");
        // The lab's host end is `kslab<pid>h` (at most 15 bytes); these
        // two replace its last byte.
        let stem = &self.veth[..self.veth.len() - 1];
        let (lab_end, cluster_end) = (format!("{stem}k"), format!("{stem}c"));
        run(
            &ip,
            &[
                "link",
                "add",
                &lab_end,
                "type",
                "veth",
                "peer",
                "name",
                &cluster_end,
            ],
        );
        run(&ip, &["link", "set", &lab_end, "netns", &self.ns]);
        run(&ip, &["link", "set", &cluster_end, "netns", &cluster]);
        let lab = |args: &[&str]| {
            let mut all = vec!["netns", "exec", self.ns.as_str(), "ip"];
            all.extend_from_slice(args);
            run(&ip, &all);
        };
        lab(&["addr", "add", "198.51.101.2/30", "dev", &lab_end]);
        lab(&["link", "set", &lab_end, "up"]);
        // From the lab's own address, so a UDP answer comes from where the
        // query went.
        lab(&["route", "add", &pods, "via", "198.51.101.1", "src", LAB_V4]);
        // Not `ip netns exec` for the cluster's namespace: it would remount
        // /sys under the running kubelet's processes' feet (nsenter is
        // what scripts/test-cluster.sh uses).
        let nsenter = require("nsenter", "util-linux");
        let netns = format!("--net=/var/run/netns/{cluster}");
        let cl = |args: &[&str]| {
            let mut all = vec![netns.as_str(), "--", "ip"];
            all.extend_from_slice(args);
            run(&nsenter, &all);
        };
        cl(&["addr", "add", "198.51.101.1/30", "dev", &cluster_end]);
        cl(&["link", "set", &cluster_end, "up"]);
        cl(&[
            "route",
            "add",
            &format!("{LAB_V4}/32"),
            "via",
            "198.51.101.2",
        ]);
        self.cluster_link = Some((cluster, cluster_end));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some((cluster, link)) = self.cluster_link.take() {
            // Deleting the lab's namespace deletes the pair; this is for
            // a failure half way.
            let _ = Command::new("nsenter")
                .args([
                    &format!("--net=/var/run/netns/{cluster}"),
                    "--",
                    "ip",
                    "link",
                    "del",
                    &link,
                ])
                .stderr(Stdio::null())
                .output();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        // Deleting the namespace deletes the pair; this is for a lab whose
        // peer never moved into it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .output();
    }
}
