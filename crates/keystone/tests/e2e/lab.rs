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
//! TLS: the lab has a CA of its own ([`Lab::ca_pem`]); [`Lab::ca_bundle`]
//! is the host's trust store with it added, what a test gives keystone as
//! `SSL_CERT_FILE`. Under the model APIs' real names ([`MODEL_NAMES`]) and
//! `*.ca.lab.test` the lab's :443 presents a certificate that CA signed,
//! so keystone's egress point, verifying upstreams against the host's
//! store, accepts it; under any other name (`rogue.lab.test`) a
//! self-signed `*.lab.test` one that no CA signed. The model names'
//! requests go on to the scripted model ([`Lab::start_model`]), which
//! runs in the lab's namespace and checks the keys they carry.
//!
//! Root only (it makes a namespace and links); [`Drop`] removes them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const LAB_V4: &str = "198.51.100.2";
pub const LAB_V6: &str = "2001:db8:77::2";
pub const HOST_V4: &str = "198.51.100.1";

/// The names the lab's DNS answers and its CA signs for the model APIs
/// (the agents' default endpoints); their requests reach the scripted
/// model. `*.ca.lab.test` is signed too, and answered by the lab itself.
pub const MODEL_NAMES: &[&str] = &[
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
];

/// The scripted model's port on the lab's loopback (plain HTTP; the lab's
/// :443 relays to it).
pub const MODEL_PORT: u16 = 18765;

/// Where the scripted model tells an agent to write its proof files
/// (a path in the sandbox; the model only names it).
pub const PROOF_DIR: &str = "/workspace/proof";

/// The host's trust store, which [`Lab::ca_bundle`] extends.
const HOST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const SERVER: &str = include_str!("../fixtures/egress-lab.py");
const MOCK_MODEL: &str = include_str!("../fixtures/mock-model.js");

pub struct Lab {
    pub ns: String,
    veth: String,
    child: Option<Child>,
    /// The scripted model, once started.
    model: Option<Child>,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    ca_pem: String,
    ca_bundle: PathBuf,
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

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
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
        // An unprivileged keystone (the rootless tests) reads the CA
        // bundle in here.
        set_mode(dir.path(), 0o711);
        let mut lab = Lab {
            ns: ns.clone(),
            veth: veth.clone(),
            child: None,
            model: None,
            log: dir.path().join("events.jsonl"),
            ca_bundle: dir.path().join("ca-bundle.crt"),
            ca_pem: String::new(),
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
        let (ca_cert, ca_key) = lab.make_ca(&openssl);
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
            .arg("--ca-cert")
            .arg(&ca_cert)
            .arg("--ca-key")
            .arg(&ca_key)
            .arg("--model")
            .arg(MODEL_PORT.to_string())
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

    /// The lab's CA (a key and a self-signed CA certificate), the
    /// certificate it signs for [`MODEL_NAMES`] and `*.ca.lab.test`, and
    /// the host's bundle with the CA added; the signed certificate's and
    /// key's paths.
    fn make_ca(&mut self, openssl: &Path) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let path = |name: &str| d.join(name).display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(&ec);
        let (ca_key, ca_crt) = (path("lab-ca.key"), path("lab-ca.crt"));
        args.extend_from_slice(&[
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=keystone e2e lab CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
        ]);
        run(openssl, &args);
        let (key, csr, crt, ext) = (
            path("lab-signed.key"),
            path("lab-signed.csr"),
            path("lab-signed.crt"),
            path("lab-signed.ext"),
        );
        let sans: Vec<String> = MODEL_NAMES
            .iter()
            .chain(&["*.ca.lab.test"])
            .map(|n| format!("DNS:{n}"))
            .collect();
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
                 subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
                sans.join(",")
            ),
        )
        .expect("extensions file");
        let mut args = vec!["req"];
        args.extend_from_slice(&ec);
        args.extend_from_slice(&[
            "-nodes",
            "-subj",
            "/CN=api.anthropic.com",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        run(openssl, &args);
        let serial = path("lab-ca.srl");
        run(
            openssl,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAserial",
                &serial,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        self.ca_pem = std::fs::read_to_string(&ca_crt).expect("lab CA certificate");
        let host = std::fs::read_to_string(HOST_BUNDLE).unwrap_or_else(|e| {
            panic!("{HOST_BUNDLE}: {e}: the lab extends the host's trust store: apt-get install ca-certificates")
        });
        let mut bundle = host;
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&self.ca_pem);
        std::fs::write(&self.ca_bundle, bundle).expect("CA bundle");
        set_mode(&self.ca_bundle, 0o644);
        set_mode(Path::new(&ca_crt), 0o644);
        (PathBuf::from(crt), PathBuf::from(key))
    }

    /// The lab CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The host's trust store ([`HOST_BUNDLE`]) plus the lab CA: what a
    /// test sets as `SSL_CERT_FILE` for keystone (readable by any user).
    pub fn ca_bundle(&self) -> &Path {
        &self.ca_bundle
    }

    /// Start the scripted model (tests/fixtures/mock-model.js) in the
    /// lab's namespace on 127.0.0.1:[`MODEL_PORT`], requiring one of
    /// `expect_keys` on every request (none: no check); returns once it
    /// listens (at most 15 s). Its log: [`Lab::model_events`].
    pub fn start_model(&mut self, expect_keys: &[&str]) {
        assert!(
            self.model.is_none(),
            "the scripted model is already running"
        );
        let ip = require("ip", "iproute2");
        let node = require("node", "nodejs");
        let script = self.dir.path().join("mock-model.js");
        std::fs::write(&script, MOCK_MODEL).expect("mock model script");
        let keys = serde_json::to_string(expect_keys).expect("keys");
        let out = std::fs::File::create(self.dir.path().join("mock-model.out")).expect("model out");
        let child = Command::new(&ip)
            .args(["netns", "exec", &self.ns])
            .arg(&node)
            .arg(&script)
            .arg(MODEL_PORT.to_string())
            .arg(PROOF_DIR)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LOG", self.model_log_path())
            .env("EXPECT_KEYS", keys)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("model out"))
            .stderr(out)
            .spawn()
            .expect("start the scripted model");
        self.model = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self
            .model_events()
            .iter()
            .any(|e| e.get("listening").is_some())
        {
            if let Some(status) = self
                .model
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the scripted model exited ({status}):\n{}",
                    std::fs::read_to_string(self.dir.path().join("mock-model.out"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the scripted model did not listen in 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn model_log_path(&self) -> PathBuf {
        self.dir.path().join("mock-model.log")
    }

    /// Every line the scripted model logged so far (requests with `auth`:
    /// which header carried a key, its last 4 characters, whether it was
    /// one expected; `unauthorized` for each refused).
    pub fn model_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.model_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The request events (`http`, `https`) whose headers carried `value`
    /// in any logged header (x-api-key, authorization, x-goog-api-key).
    pub fn requests_with_header_value(&self, value: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == "http" || e["kind"] == "https")
            .filter(|e| {
                e["headers"]
                    .as_object()
                    .is_some_and(|h| h.values().any(|v| v.as_str().unwrap_or("").contains(value)))
            })
            .collect()
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
        for mut c in [self.model.take(), self.child.take()].into_iter().flatten() {
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

/// One DNS query for an A record straight to the lab (UDP, 5 s): the
/// rcode and the addresses answered.
fn lab_dns_a(name: &str) -> (u8, Vec<std::net::Ipv4Addr>) {
    let mut q = vec![0x4b, 0x53, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = std::net::UdpSocket::bind((HOST_V4, 0)).expect("udp socket");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sock.send_to(&q, (LAB_V4, 53)).expect("dns send");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("dns answer");
    let msg = &buf[..n];
    let rcode = msg[3] & 0x0f;
    let count = u16::from_be_bytes([msg[6], msg[7]]);
    // Each answer: a 2-byte name pointer, type, class, TTL, length, data.
    let mut at = q.len();
    let mut addrs = Vec::new();
    for _ in 0..count {
        let len = u16::from_be_bytes([msg[at + 10], msg[at + 11]]) as usize;
        if len == 4 {
            let d = &msg[at + 12..at + 16];
            addrs.push(std::net::Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        }
        at += 12 + len;
    }
    (rcode, addrs)
}

/// The lab by itself, from the host (no sandbox, ~1 s): the names it
/// answers, the certificate each name gets, what a request event records,
/// and the scripted model's key check behind the API names.
#[test]
fn lab_selftest() {
    let curl = require("curl", "curl");
    let mut lab = Lab::start();
    let key = "sk-ant-api03-labselftest0123456789";
    lab.start_model(&[key]);
    let ca = lab.dir.path().join("lab-ca.crt").display().to_string();
    let bundle = lab.ca_bundle().display().to_string();
    assert!(lab.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    let host_bundle = std::fs::read_to_string(HOST_BUNDLE).expect("host bundle");
    let ours = std::fs::read_to_string(lab.ca_bundle()).expect("lab bundle");
    assert!(ours.starts_with(&host_bundle) && ours.ends_with(lab.ca_pem()));

    for name in MODEL_NAMES
        .iter()
        .chain(&["api.ca.lab.test", "rogue.lab.test"])
    {
        let (rcode, addrs) = lab_dns_a(name);
        assert_eq!(
            (rcode, addrs),
            (0, vec![LAB_V4.parse().expect("v4")]),
            "DNS A {name}"
        );
    }
    assert_eq!(lab_dns_a("example.com").0, 5, "other names are REFUSED");

    // (status, body) of curl ARGS against `name` at the lab.
    let get = |name: &str, cacert: &str, args: &[&str]| -> (Option<i32>, String) {
        let mut cmd = Command::new(&curl);
        cmd.args(["-sS", "--max-time", "10", "--noproxy", "*", "--resolve"])
            .arg(format!("{name}:443:{LAB_V4}"))
            .args(["--cacert", cacert, "-w", "\n%{http_code}"])
            .args(args)
            .env_remove("SSL_CERT_FILE")
            .stdin(Stdio::null());
        let r = crate::harness::run_bounded(cmd, Duration::from_secs(20));
        (r.code, r.text())
    };
    let status = |out: &str| out.trim_end().rsplit('\n').next().unwrap_or("").to_string();

    // Anthropic: no key -> 401 in its format; a wrong one too; the key -> 200.
    let messages = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let url = "https://api.anthropic.com/v1/messages";
    let json = ["-H", "content-type: application/json", "-d", messages, url];
    let (code, out) = get("api.anthropic.com", &ca, &json);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(status(&out), "401", "{out}");
    assert!(out.contains("authentication_error"), "{out}");
    let wrong: Vec<&str> = ["-H", "x-api-key: sk-ant-api03-wrong"]
        .into_iter()
        .chain(json)
        .collect();
    assert_eq!(status(&get("api.anthropic.com", &ca, &wrong).1), "401");
    let header = format!("x-api-key: {key}");
    let right: Vec<&str> = ["-H", &header].into_iter().chain(json).collect();
    let (_, out) = get("api.anthropic.com", &bundle, &right);
    assert_eq!(status(&out), "200", "{out}");
    assert!(out.contains("\"type\":\"message\""), "{out}");
    // OpenAI (Bearer) and Gemini (x-goog-api-key), through the bundle.
    let bearer = format!("authorization: Bearer {key}");
    let (_, out) = get(
        "api.openai.com",
        &bundle,
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"model":"m","input":"hi"}"#,
            "https://api.openai.com/v1/responses",
        ],
    );
    assert_eq!(status(&out), "200", "{out}");
    let goog = format!("x-goog-api-key: {key}");
    let (_, out) = get(
        "generativelanguage.googleapis.com",
        &bundle,
        &[
            "-H",
            &goog,
            "-d",
            r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#,
            "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent",
        ],
    );
    assert_eq!(status(&out), "200", "{out}");
    let (_, out) = get(
        "generativelanguage.googleapis.com",
        &bundle,
        &[
            "-d",
            "{}",
            "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent",
        ],
    );
    assert_eq!(status(&out), "401", "{out}");
    assert!(out.contains("UNAUTHENTICATED"), "{out}");

    // The model's log names the header and never holds the key.
    let model = lab.model_events();
    let authorized: Vec<&Value> = model.iter().filter(|e| e["authorized"] == true).collect();
    let vias: Vec<&str> = authorized
        .iter()
        .filter_map(|e| e["auth"][0]["via"].as_str())
        .collect();
    assert_eq!(
        vias,
        ["x-api-key", "authorization", "x-goog-api-key"],
        "{model:?}"
    );
    assert_eq!(authorized[0]["auth"][0]["last4"], &key[key.len() - 4..]);
    assert_eq!(
        model
            .iter()
            .filter(|e| e.get("unauthorized").is_some())
            .count(),
        3,
        "{model:?}"
    );
    let model_log = std::fs::read_to_string(lab.model_log_path()).unwrap_or_default();
    assert!(!model_log.contains(key), "the model logged the key");

    // A name the lab CA signs that the lab answers itself: the event has
    // the path, the logged headers and the body's digest.
    let (_, out) = get(
        "api.ca.lab.test",
        &bundle,
        &[
            "-H",
            "x-api-key: selftest-header",
            "-H",
            "authorization: Bearer selftest-bearer",
            "-d",
            "selftest-body",
            "https://api.ca.lab.test/echo?x=1",
        ],
    );
    assert_eq!(status(&out), "200", "{out}");
    let seen = lab.requests_with_header_value("selftest-header");
    assert_eq!(seen.len(), 1, "{}", lab.dump());
    let e = &seen[0];
    assert_eq!(e["sni"], "api.ca.lab.test");
    assert_eq!(e["path"], "/echo?x=1");
    assert_eq!(e["headers"]["authorization"], "Bearer selftest-bearer");
    assert_eq!(e["body"], "selftest-body");
    assert_eq!(e["body_len"], 13);
    assert_eq!(e["model"], false);

    // A chunked body is read whole.
    let (_, out) = get(
        "api.ca.lab.test",
        &bundle,
        &[
            "-H",
            "transfer-encoding: chunked",
            "-H",
            "x-api-key: selftest-chunked",
            "-d",
            "chunked-body",
            "https://api.ca.lab.test/chunked",
        ],
    );
    assert_eq!(status(&out), "200", "{out}");
    let seen = lab.requests_with_header_value("selftest-chunked");
    assert_eq!(seen.len(), 1, "{}", lab.dump());
    assert_eq!(seen[0]["body"], "chunked-body", "{}", seen[0]);

    // Another name gets the self-signed certificate: the host's store
    // plus the lab CA does not verify it ("another CA").
    let (code, out) = get(
        "rogue.lab.test",
        &bundle,
        &["-H", "x-api-key: selftest-rogue", "https://rogue.lab.test/"],
    );
    assert_eq!(
        code,
        Some(60),
        "rogue.lab.test must fail verification: {out}"
    );
    assert!(lab.requests_with_header_value("selftest-rogue").is_empty());
    // ...and it is the *.lab.test one (it verifies against itself).
    let lab_crt = lab.dir.path().join("lab.crt").display().to_string();
    let (_, out) = get("rogue.lab.test", &lab_crt, &["https://rogue.lab.test/"]);
    assert_eq!(status(&out), "200", "{out}");
    // Plain HTTP records the same fields.
    let mut cmd = Command::new(&curl);
    cmd.args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .args(["-H", "x-goog-api-key: selftest-plain"])
        .arg(format!("http://{LAB_V4}/plain"));
    crate::harness::run_bounded(cmd, Duration::from_secs(20)).ok();
    let seen = lab.requests_with_header_value("selftest-plain");
    assert_eq!(seen.len(), 1, "{}", lab.dump());
    assert_eq!(seen[0]["path"], "/plain");
}
