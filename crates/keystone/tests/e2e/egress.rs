//! `[egress]`: the allowlist's bypass classes (docs: EGRESS-NOTES §7),
//! each probed from inside a sandbox against the lab (lab.rs), a network
//! namespace on this host whose servers log everything that reaches them.
//!
//! First the sandbox runs with `mode = "open"` (full NAT through pasta or
//! passt) and every probe class is shown to REACH the lab: that is what
//! makes each later "blocked" assertion one that could fail. Then it
//! restarts with the allowlist and every class is asserted in its own
//! block. A class the open run could not show reachable on a backend is
//! asserted blocked anyway (it must be), but its lab-side absence proves
//! nothing there; [`OpenReach`] says which, and why.
//!
//! The probes (tests/fixtures/egress-probe.py) run through `exec -- python3
//! -c SCRIPT batch JSON` (exec hands its own stdin to the guest command, and
//! the harness gives it none), each printing one JSON line; the probes of a
//! block that do not depend on each other share one exec.

use crate::harness::Host;
use crate::lab::{Lab, HOST_V4, LAB_V4, LAB_V6};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PROBE: &str = include_str!("../fixtures/egress-probe.py");
/// keystone's resolver and explicit proxy in the guest.
const GATEWAY: &str = "198.18.0.1";
const PROXY: &str = "http://198.18.0.1:3128";
/// "Fails immediately": a refusal, never a timeout.
const IMMEDIATE_MS: u64 = 2000;

/// A fresh hex token, unique to this run (names, payloads, paths): the lab
/// log can then prove that a probe did or did not arrive.
fn token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// A probe's arguments (one of egress-probe.py's forms).
fn p(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Probes run one after another in one sandbox process, as `user` (one
/// python start for all: under TCG each costs seconds); their JSON
/// results, in order. Only probes that do not depend on each other's
/// outcome go together.
#[track_caller]
fn probes_as<const N: usize>(h: &Host, user: &str, list: [Vec<String>; N]) -> [Value; N] {
    run_probes(h, user, "batch", list)
}

/// Like [`probes_as`], the probes all started at once: for probes whose
/// timing no assertion reads, where each that must wait out its timeout
/// then does so beside the others.
#[track_caller]
fn together_as<const N: usize>(h: &Host, user: &str, list: [Vec<String>; N]) -> [Value; N] {
    run_probes(h, user, "together", list)
}

/// Guest root's probes and the agent's at once (two execs side by side,
/// each `together`): a block whose slow probes belong to both users.
fn beside<const N: usize, const M: usize>(
    h: &Host,
    root: [Vec<String>; N],
    agent: [Vec<String>; M],
) -> ([Value; N], [Value; M]) {
    std::thread::scope(|s| {
        let root = s.spawn(|| together_as(h, "root", root));
        let agent = together_as(h, "agent", agent);
        let root = root
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (root, agent)
    })
}

#[track_caller]
fn run_probes<const N: usize>(
    h: &Host,
    user: &str,
    mode: &str,
    list: [Vec<String>; N],
) -> [Value; N] {
    let batch = serde_json::to_string(&list[..]).expect("probe list");
    let r = h.ks(&[
        "exec", "--user", user, "--", "python3", "-c", PROBE, mode, &batch,
    ]);
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .collect();
    assert_eq!(
        lines.len(),
        N,
        "probes {list:?} printed {} results, not {N}:\n{}",
        lines.len(),
        r.text()
    );
    let results: Vec<Value> = lines
        .iter()
        .zip(&list)
        .map(|(line, args)| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("probe {args:?}: {e}:\n{}", r.text()));
            eprintln!(
                "probe {:<60} ok={} {}ms {}",
                args.join(" "),
                v["ok"],
                v["ms"],
                v["detail"].as_str().unwrap_or("")
            );
            v
        })
        .collect();
    results.try_into().expect("N results")
}

#[track_caller]
fn probes<const N: usize>(h: &Host, list: [Vec<String>; N]) -> [Value; N] {
    probes_as(h, "agent", list)
}

/// One probe, as the agent.
#[track_caller]
fn probe(h: &Host, args: &[&str]) -> Value {
    let [v] = probes(h, [p(args)]);
    v
}

fn ok(v: &Value) -> bool {
    v["ok"] == true
}

fn ms(v: &Value) -> u64 {
    v["ms"].as_u64().unwrap_or(u64::MAX)
}

/// The probe failed, and fast (a refusal, not a timeout).
#[track_caller]
fn refused_fast(what: &str, v: &Value) {
    assert!(!ok(v), "{what}: got through: {v}");
    assert!(
        ms(v) < IMMEDIATE_MS,
        "{what}: failed, but only after {} ms (must fail immediately): {v}",
        ms(v)
    );
}

/// Nothing the lab logged mentions `needle`.
#[track_caller]
fn lab_never_saw(lab: &Lab, what: &str, needle: &str) {
    lab_never_saw_any(lab, what, &[needle]);
}

/// Nothing the lab logged mentions any of `needles` (each its own
/// assertion; one grace period for all).
#[track_caller]
fn lab_never_saw_any(lab: &Lab, what: &str, needles: &[&str]) {
    // Give a straggler (a relay still connecting) a moment to show up.
    std::thread::sleep(Duration::from_millis(300));
    for needle in needles {
        let seen = lab.mentions(needle);
        assert!(
            seen.is_empty(),
            "{what}: the lab saw {needle}:\n{}",
            seen.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// The lab logged an event of `kind` mentioning `needle` (within 5 s).
fn lab_saw(lab: &Lab, kind: &str, needle: &str) -> bool {
    let [saw] = lab_saw_each(lab, [(kind, needle)]);
    saw
}

/// For each `(kind, needle)`: whether the lab logged an event of `kind`
/// mentioning `needle`, waiting (at most 5 s in all, not each) until every
/// one has shown up.
fn lab_saw_each<const N: usize>(lab: &Lab, wanted: [(&str, &str); N]) -> [bool; N] {
    let each = |events: &[Value]| {
        wanted.map(|(kind, needle)| {
            events
                .iter()
                .any(|e| e["kind"] == kind && e.to_string().contains(needle))
        })
    };
    crate::harness::eventually(Duration::from_secs(5), || {
        each(&lab.events()).iter().all(|&s| s)
    });
    each(&lab.events())
}

/// Which probe classes reached the lab with `mode = "open"` on this
/// backend (each field is the lab's log, not the probe's word).
#[derive(Debug, Default)]
struct OpenReach {
    http: bool,
    http_7000: bool,
    https: bool,
    dns_udp: bool,
    dns_tcp: bool,
    udp: bool,
    tcp_7: bool,
    icmp: bool,
    icmp_detail: String,
    v6_tcp: bool,
    v6_dns: bool,
    v6_udp: bool,
    /// The IPv6 probes' own words.
    v6_detail: Vec<String>,
}

/// (b): the open sandbox reaches the lab by every path the allowlist will
/// have to close.
fn open_reach(h: &Host, lab: &Lab) -> OpenReach {
    let t = token();
    let mut r = OpenReach::default();

    // ICMP as guest root (a raw socket where the backend allows one) and
    // as the agent (an unprivileged ping socket).
    let icmp_root = format!("open-icmp-root-{t}");
    let icmp_agent = format!("open-icmp-agent-{t}");
    let ([root_icmp], [_, _, _, dns_udp, dns_tcp, _, _, agent_icmp, v6_tcp, v6_dns, v6_udp]) =
        beside(
            h,
            [p(&["icmp", LAB_V4, "--payload", &icmp_root])],
            [
                p(&["http", &format!("http://{LAB_V4}/open-http-{t}")]),
                p(&["http", &format!("http://{LAB_V4}:7000/open-7000-{t}")]),
                p(&[
                    "https",
                    &format!("https://{LAB_V4}/open-https-{t}"),
                    "--sni",
                    &format!("open-sni-{t}.lab.test"),
                ]),
                p(&["dns", &format!("open-udp-{t}.lab.test"), "--server", LAB_V4]),
                p(&[
                    "dns",
                    &format!("open-tcp-{t}.lab.test"),
                    "--server",
                    LAB_V4,
                    "--tcp",
                ]),
                p(&["udp", LAB_V4, "7", "--payload", &format!("open-udp-{t}")]),
                p(&["tcp", LAB_V4, "7", "--payload", &format!("open-tcp7-{t}")]),
                p(&["icmp", LAB_V4, "--payload", &icmp_agent]),
                p(&["http", &format!("http://[{LAB_V6}]/open-v6-{t}")]),
                p(&[
                    "dns",
                    &format!("open-v6dns-{t}.lab.test"),
                    "--server",
                    LAB_V6,
                ]),
                p(&["udp", LAB_V6, "7", "--payload", &format!("open-v6udp-{t}")]),
            ],
        );
    // What the lab logged (one 5 s grace for everything still missing).
    let [http, http_7000, https, https_sni, dns_udp_seen, dns_tcp_seen, udp, tcp_7, icmp_r, icmp_a, v6_tcp_seen, v6_dns_seen, v6_udp_seen] =
        lab_saw_each(
            lab,
            [
                ("http", &format!("open-http-{t}")),
                ("http", &format!("open-7000-{t}")),
                ("https", &format!("open-https-{t}")),
                ("https", &format!("open-sni-{t}.lab.test")),
                ("dns", &format!("open-udp-{t}")),
                ("dns", &format!("open-tcp-{t}")),
                ("udp", &format!("open-udp-{t}")),
                ("tcp-echo", &format!("open-tcp7-{t}")),
                ("icmp", &icmp_root),
                ("icmp", &icmp_agent),
                ("http", &format!("open-v6-{t}")),
                ("dns", &format!("open-v6dns-{t}")),
                ("udp", &format!("open-v6udp-{t}")),
            ],
        );
    r.http = http;
    r.http_7000 = http_7000;
    r.https = https && https_sni;
    r.dns_udp = ok(&dns_udp) && dns_udp_seen;
    r.dns_tcp = ok(&dns_tcp) && dns_tcp_seen;
    r.udp = udp;
    r.tcp_7 = tcp_7;
    r.icmp = icmp_r || icmp_a;
    for (user, v) in [("root", &root_icmp), ("agent", &agent_icmp)] {
        r.icmp_detail
            .push_str(&format!("{user}: {} ", v["detail"].as_str().unwrap_or("")));
    }
    for v in [&v6_tcp, &v6_dns, &v6_udp] {
        r.v6_detail.push(v["detail"].to_string());
    }
    r.v6_tcp = v6_tcp_seen;
    r.v6_dns = v6_dns_seen;
    r.v6_udp = v6_udp_seen;
    r
}

/// The host's `net.ipv4.ping_group_range` admits no group at all (the
/// kernel's default, "1 0").
fn host_ping_sockets_disabled() -> bool {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .map(|n| n.parse::<i64>().unwrap_or(0));
    matches!((it.next(), it.next()), (Some(lo), Some(hi)) if lo > hi)
}

/// What the open run must have shown, per class; a class that could not
/// be shown fails here unless the reason is one this file documents.
fn require_open_reach(h: &Host, r: &OpenReach, lab: &Lab) {
    eprintln!("open-mode reachability on {}: {r:#?}", backend(h));
    let must = [
        ("HTTP to the lab's IPv4 address", r.http),
        ("HTTP on :7000", r.http_7000),
        ("HTTPS with a chosen SNI", r.https),
        ("DNS over UDP straight to the lab", r.dns_udp),
        ("DNS over TCP straight to the lab", r.dns_tcp),
        ("UDP echo", r.udp),
        ("TCP to a port no rule names (:7)", r.tcp_7),
    ];
    for (what, reached) in must {
        assert!(
            reached,
            "{what} did not reach the lab with open egress on {}: the blocked assertion for it would prove nothing\n{}",
            h.backend,
            lab.dump()
        );
    }
    let v6 = [
        ("HTTP over IPv6", r.v6_tcp),
        ("DNS over IPv6", r.v6_dns),
        ("UDP over IPv6", r.v6_udp),
    ];
    let v4_only = match h.backend.as_str() {
        "microvm" => Some("passt runs with -4 (no IPv6 default route in the guest)"),
        // The test cluster's bridge plugin gives pods an IPv4 range only.
        "kubernetes" => {
            Some("the test cluster's pods have IPv4 only (no IPv6 default route in the pod)")
        }
        _ => None,
    };
    if let Some(why) = v4_only.filter(|_| v6.iter().all(|(_, reached)| !reached)) {
        // The microVM's NAT is IPv4 only: keystone runs passt with `-4`
        // (keystone-microvm's lib.rs) and the guest's init configures eth1
        // with a static IPv4 address, so an open microVM has no IPv6 way
        // out at all and the allowlist's IPv6 assertions there show only
        // that the probes fail. What is checked instead: the guest has no
        // IPv6 default route and each probe failed as unreachable, not by
        // a timeout (so a future passt with IPv6 fails this, on purpose).
        let routes = h.sh("ip -6 route show default");
        assert!(
            routes.trim().is_empty(),
            "the {} guest has an IPv6 default route, yet IPv6 did not reach the lab:\n{routes}",
            h.backend
        );
        for d in &r.v6_detail {
            assert!(
                d.contains("ENETUNREACH"),
                "IPv6 from the open {} guest failed otherwise than unreachable: {d}",
                h.backend
            );
        }
        eprintln!("IPv6 cannot be shown reachable on {}: {why}", h.backend);
    } else {
        for (what, reached) in v6 {
            assert!(
                reached,
                "{what} did not reach the lab with open egress on {}: the blocked assertion for it would prove nothing\n{}",
                h.backend,
                lab.dump()
            );
        }
    }
    if !r.icmp && h.backend == "kubernetes" {
        // A pod holds no CAP_NET_RAW (S12) and the pod's own
        // `net.ipv4.ping_group_range` is the kernel's default (no group):
        // neither guest root nor the agent can open an ICMP socket at all,
        // open or not. Any other reason is a failure of this test.
        assert!(
            r.icmp_detail.matches("no ICMP socket").count() == 2,
            "ICMP did not reach the lab from the open pod, but not for want of a socket: {}",
            r.icmp_detail
        );
        eprintln!(
            "ICMP cannot be shown reachable on kubernetes: the pod can open no ICMP socket ({})",
            r.icmp_detail
        );
    } else if !r.icmp {
        // pasta and passt forward a guest's echo requests only through
        // unprivileged ping sockets of their own on the host (they hold
        // no CAP_NET_RAW), which `net.ipv4.ping_group_range` grants; with
        // the kernel's default ("1 0", no group) they cannot send any, so
        // no ICMP leaves an open sandbox on this host and the lab's
        // silence under the allowlist shows nothing. Any other reason is
        // a failure of this test.
        assert!(
            host_ping_sockets_disabled(),
            "ICMP did not reach the lab with open egress on {} although this host allows ping sockets ({}): {}",
            h.backend,
            std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap_or_default().trim(),
            r.icmp_detail
        );
        eprintln!(
            "ICMP cannot be shown reachable on {}: the host's net.ipv4.ping_group_range is empty, so pasta/passt send no echo ({})",
            backend(h), r.icmp_detail
        );
    }
}

/// The backend, and whether keystone runs unprivileged.
fn backend(h: &Host) -> String {
    match &h.user {
        Some(u) => format!("{} (rootless, as {u})", h.backend),
        None => h.backend.clone(),
    }
}

/// A TCP server on the host's 127.0.0.1 that answers one HTTP response
/// (`host-service <tag>`) per connection and keeps each connection's
/// first line (empty when nothing was sent within 2 s).
struct HostService {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostService {
    fn start(tag: &str) -> HostService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let body = format!("host-service {tag}\n");
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((mut s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let first = String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    seen2.lock().expect("seen").push(first);
                    let _ = s.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        HostService {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Each connection's first line so far.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for HostService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config_path(h: &Host) -> std::path::PathBuf {
    h.tmp.path().join("config/keystone/agent.toml")
}

/// The harness's config with `table` appended (any earlier `[egress]`
/// replaced).
fn set_egress(h: &Host, table: &str) {
    let path = config_path(h);
    let text = std::fs::read_to_string(&path).expect("config");
    let base = match text.find("\n[egress]\n") {
        Some(i) => text[..=i].to_string(),
        None => text,
    };
    h.write(&path, &format!("{base}\n{table}"));
}

pub fn egress_policy(h: Host) {
    let mut lab = Lab::start();
    if h.backend == "kubernetes" {
        lab.reach_from_cluster();
    }
    let name = h.name();

    // (b) open: every class reaches the lab.
    set_egress(&h, "[egress]\nmode = \"open\"\n");
    h.start(&[]).ok();
    assert_eq!(
        h.status_json(&name)["egress"]["mode"],
        "open",
        "{}",
        h.status_json(&name)
    );
    let reach = open_reach(&h, &lab);
    require_open_reach(&h, &reach, &lab);
    h.ks(&["stop"]).ok();

    // (c) allowlist, with a credential of the user's own
    // (KEYSTONE_TEST_TOKEN) whose hosts are a name the lab CA signs and
    // one it does not, and keystone trusting the lab CA (SSL_CERT_FILE).
    let listed = HostService::start("listed");
    let unlisted = HostService::start("unlisted");
    let cred = Credential::new();
    add_to_guest_table(
        &h,
        &format!(
            "forward_env = [{}]",
            DEFAULT_FORWARD_ENV
                .iter()
                .chain(&[TEST_CREDENTIAL])
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    set_egress(
        &h,
        &format!(
            "[egress]\nmode = \"allowlist\"\npresets = []\nallow = [\"allowed.lab.test\", \"*.wild.lab.test\", \"allowed.lab.test:7000\", \"{CRED_HOST}\", \"{ROGUE_HOST}\"]\nresolver = \"{LAB_V4}\"\nhost_services = [\"127.0.0.1:{}\"]\n\n\
             [credentials]\nhosts = [\"{TEST_CREDENTIAL}={CRED_HOST}\", \"{TEST_CREDENTIAL}={ROGUE_HOST}\"]\nheaders = [\"{TEST_CREDENTIAL}=x-api-key\"]\n",
            listed.port
        ),
    );
    let mut h = h;
    h.extra_env
        .push((TEST_CREDENTIAL.to_string(), cred.real.clone()));
    h.extra_env.push((
        "SSL_CERT_FILE".to_string(),
        lab.ca_bundle().display().to_string(),
    ));
    let h = h;
    h.start(&[]).ok();
    let t = token();
    // Tokens that must never reach the lab, checked again at the end.
    let mut secrets: Vec<String> = Vec::new();

    // The policy is on and says so.
    {
        let st = h.status_json(&name);
        assert_eq!(st["egress"]["mode"], "allowlist", "{st}");
        assert_eq!(st["egress"]["enforced"], true, "{st}");
        let resolv = h.sh("cat /etc/resolv.conf");
        assert!(
            resolv.contains(&format!("nameserver {GATEWAY}")),
            "the guest's resolver is not keystone's:\n{resolv}"
        );
        let env = h
            .ks(&[
                "exec",
                "--",
                "bash",
                "-ic",
                "echo \"P=$HTTP_PROXY $HTTPS_PROXY\"",
            ])
            .stdout
            .clone();
        assert!(
            env.contains(&format!("P={PROXY} {PROXY}")),
            "HTTP_PROXY/HTTPS_PROXY are not keystone's proxy in a guest shell:\n{env}"
        );
    }

    // An allowed name, plain HTTP, no proxy: the guest's resolver gives a
    // synthetic address, the connection to it is captured and relayed, and
    // keystone resolved the name through the configured resolver (the
    // lab's DNS saw it, from the host). The same through the proxy, a
    // wildcard entry, and the extra port; the proxy is what the guest's
    // shells use by default.
    {
        let [dns, direct, proxied, wild, wild2, p7000, p7000x, envproxy] = probes(
            &h,
            [
                p(&["dns", "allowed.lab.test"]),
                p(&[
                    "http",
                    &format!("http://allowed.lab.test/direct-{t}"),
                    "--no-proxy",
                ]),
                p(&[
                    "http",
                    &format!("http://allowed.lab.test/proxied-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "http",
                    &format!("http://w-{t}.wild.lab.test/wild-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&["http", &format!("http://w2-{t}.wild.lab.test/wild2-{t}")]),
                p(&["http", &format!("http://allowed.lab.test:7000/p7000-{t}")]),
                p(&[
                    "http",
                    &format!("http://allowed.lab.test:7000/p7000x-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "http",
                    &format!("http://allowed.lab.test/envproxy-{t}"),
                    "--proxy",
                ]),
            ],
        );
        assert!(ok(&dns), "allowed.lab.test does not resolve: {dns}");
        let addr = dns["answers"][0].as_str().unwrap_or("");
        assert!(
            is_synthetic(addr),
            "allowed.lab.test resolved to {addr}, not a synthetic 198.18.0.0/15 address: {dns}"
        );
        let v = direct;
        assert!(ok(&v), "allowed name over HTTP without proxy: {v}");
        assert!(
            v["body"]
                .as_str()
                .unwrap_or("")
                .contains("host=allowed.lab.test"),
            "{v}"
        );
        assert!(
            lab_saw(&lab, "http", &format!("direct-{t}")),
            "the relayed request never reached the lab:\n{}",
            lab.dump()
        );
        assert!(
            lab.saw(|e| e["kind"] == "dns"
                && e["name"].as_str().map(str::to_lowercase).as_deref()
                    == Some("allowed.lab.test")
                && e["peer"] == HOST_V4),
            "keystone never asked the configured resolver ({LAB_V4}) for allowed.lab.test:\n{}",
            lab.dump()
        );
        let v = proxied;
        assert!(
            ok(&v) && lab_saw(&lab, "http", &format!("proxied-{t}")),
            "{v}"
        );
        let v = wild;
        assert!(
            ok(&v) && lab_saw(&lab, "http", &format!("wild-{t}")),
            "*.wild.lab.test: {v}"
        );
        let v = wild2;
        assert!(
            ok(&v) && lab_saw(&lab, "http", &format!("wild2-{t}")),
            "*.wild.lab.test without proxy: {v}"
        );
        let v = p7000;
        assert!(
            ok(&v) && lab_saw(&lab, "http", &format!("p7000-{t}")),
            "allowed.lab.test:7000: {v}"
        );
        let v = p7000x;
        assert!(
            ok(&v) && lab_saw(&lab, "http", &format!("p7000x-{t}")),
            "allowed.lab.test:7000 via proxy: {v}"
        );
        let v = envproxy;
        assert!(ok(&v), "the proxy from the environment: {v}");
    }

    // HTTPS to an allowed name, through the proxy (CONNECT) and without
    // (captured, SNI checked): the lab sees the name as SNI.
    {
        let [via_proxy, direct] = probes(
            &h,
            [
                p(&[
                    "https",
                    &format!("https://allowed.lab.test/tls-proxy-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "https",
                    &format!("https://allowed.lab.test/tls-direct-{t}"),
                    "--no-proxy",
                ]),
            ],
        );
        assert!(ok(&via_proxy), "HTTPS via proxy: {via_proxy}");
        assert!(ok(&direct), "HTTPS without proxy: {direct}");
        for tag in ["tls-proxy", "tls-direct"] {
            assert!(
                lab.wait_for(Duration::from_secs(5), |e| e["kind"] == "https"
                    && e["sni"] == "allowed.lab.test"
                    && e["request"]
                        .as_str()
                        .unwrap_or("")
                        .contains(&format!("{tag}-{t}"))),
                "{tag}: the lab saw no TLS request for allowed.lab.test:\n{}",
                lab.dump()
            );
        }
    }

    // Issue 17: the credential's placeholder is swapped for the real value
    // only in the headers of TLS requests to the credential's hosts, only
    // where keystone verified the upstream; everywhere else it passes as
    // it is.
    credential_interception(&h, &lab, &cred, &t);

    // A name not on the list: via the proxy a 403 that names the host and
    // the command that allows it; without, the guest's resolver refuses it
    // at once. keystone does not even resolve it.
    {
        let host = format!("p-{t}.denied.lab.test");
        secrets.push(format!("p-{t}"));
        let n = format!("n-{t}.denied.lab.test");
        secrets.push(format!("n-{t}"));
        let [http, connect, direct, dns, dns_tcp] = probes(
            &h,
            [
                p(&["http", &format!("http://{host}/"), "--proxy", PROXY]),
                p(&["https", &format!("https://{host}/"), "--proxy", PROXY]),
                p(&["http", &format!("http://{n}/")]),
                p(&["dns", &n]),
                p(&["dns", &n, "--tcp"]),
            ],
        );
        let v = http;
        assert!(!ok(&v), "denied name via proxy got through: {v}");
        assert_eq!(v["status"], 403, "{v}");
        let body = v["body"].as_str().unwrap_or("");
        assert!(
            body.contains(&host) && body.contains(&format!("keystone agent allow {name} {host}")),
            "the 403 must name the host and `keystone agent allow {name} {host}`:\n{body}"
        );
        let v = connect;
        assert!(!ok(&v), "CONNECT to a denied name got through: {v}");
        assert_eq!(v["status"], 403, "CONNECT to a denied name: {v}");
        refused_fast("denied name without proxy", &direct);
        let v = dns;
        refused_fast("DNS for a denied name", &v);
        assert_eq!(v["rcode"], "REFUSED", "{v}");
        let v = dns_tcp;
        assert_eq!(v["rcode"], "REFUSED", "DNS over TCP to keystone: {v}");
        lab_never_saw(&lab, "denied names", &format!("-{t}.denied"));
    }

    // IP literals, v4 and v6, direct and through the proxy. On the ports
    // keystone captures (80, 443 and every allowed port) the guest's
    // handshake completes with keystone's own listener, which then
    // refuses (no name for the address): nothing leaves, and the exchange
    // fails at once. On any other port the connection itself is refused.
    {
        let fast = [
            "HTTP to an IPv4 literal",
            "HTTPS to an IPv4 literal",
            "TCP to an IPv4 literal, another port",
            "HTTP to an IPv6 literal",
            "HTTPS to an IPv6 literal",
            "TCP to an IPv6 literal, another port",
        ];
        let [ip4, ip4s, ip4t, ip6, ip6s, ip6t, ip4p, ip6p, dns] = probes(
            &h,
            [
                p(&["http", &format!("http://{LAB_V4}/ip4-{t}")]),
                p(&["https", &format!("https://{LAB_V4}/ip4s-{t}")]),
                p(&["tcp", LAB_V4, "7", "--payload", &format!("ip4t-{t}")]),
                p(&["http", &format!("http://[{LAB_V6}]/ip6-{t}")]),
                p(&["https", &format!("https://[{LAB_V6}]/ip6s-{t}")]),
                p(&["tcp", LAB_V6, "7", "--payload", &format!("ip6t-{t}")]),
                p(&[
                    "http",
                    &format!("http://{LAB_V4}/ip4p-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "https",
                    &format!("https://[{LAB_V6}]/ip6p-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                // An allowed name's address, for the probe below.
                p(&["dns", "allowed.lab.test"]),
            ],
        );
        for (what, v) in fast.iter().zip([&ip4, &ip4s, &ip4t, &ip6, &ip6s, &ip6t]) {
            refused_fast(what, v);
        }
        let v = ip4p;
        assert!(!ok(&v), "an IPv4 literal via the proxy: {v}");
        let v = ip6p;
        assert!(!ok(&v), "an IPv6 literal via CONNECT: {v}");
        let tags = ["ip4", "ip4s", "ip4t", "ip6", "ip6s", "ip6t", "ip4p", "ip6p"]
            .map(|tag| format!("{tag}-{t}"));
        lab_never_saw_any(
            &lab,
            "IP literals",
            &tags.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // An allowed name's synthetic address on a port no rule allows.
        let synthetic = dns["answers"][0].as_str().unwrap_or("").to_string();
        refused_fast(
            "an allowed name on a port not allowed",
            &probe(
                &h,
                &["tcp", &synthetic, "7", "--payload", &format!("port7-{t}")],
            ),
        );
        lab_never_saw(
            &lab,
            "an allowed name on a port not allowed",
            &format!("port7-{t}"),
        );
    }

    // A resolver the guest picks (the lab's, over UDP and TCP, v4 and v6):
    // the lab sees nothing.
    {
        let asked = [
            (LAB_V4, false),
            (LAB_V4, true),
            (LAB_V6, false),
            (LAB_V6, true),
        ];
        let results = probes(
            &h,
            asked.map(|(server, tcp)| {
                let q = format!("r{}-{t}.lab.test", if tcp { "t" } else { "u" });
                let mut args = vec!["dns", &q, "--server", server];
                if tcp {
                    args.push("--tcp");
                }
                p(&args)
            }),
        );
        for ((server, tcp), v) in asked.iter().zip(&results) {
            assert!(
                !ok(v),
                "DNS to a guest-chosen resolver {server} (tcp={tcp}): {v}"
            );
        }
        lab_never_saw_any(
            &lab,
            "a guest-chosen resolver",
            &[&format!("ru-{t}"), &format!("rt-{t}")],
        );
    }

    // Data in DNS query names: libc's lookup and raw queries of any type
    // for a denied name never leave; the lab saw keystone's lookups of
    // allowed names above, so this path reaches it when it should.
    {
        let hex = token();
        secrets.push(format!("secret-{hex}"));
        let r = h.ks(&[
            "exec",
            "--",
            "bash",
            "-c",
            &format!("timeout 5 getent hosts secret-{hex}.denied.lab.test; echo rc=$?"),
        ]);
        assert!(
            r.stdout.contains("rc=2"),
            "getent must find nothing (rc=2):\n{}",
            r.text()
        );
        let qtypes = ["TXT", "AAAA", "A"];
        let results = probes(
            &h,
            qtypes.map(|qtype| {
                p(&[
                    "dns",
                    &format!("secret-{hex}.{qtype}.denied.lab.test"),
                    "--type",
                    qtype,
                ])
            }),
        );
        for (qtype, v) in qtypes.iter().zip(&results) {
            assert_eq!(
                v["rcode"], "REFUSED",
                "{qtype} query for a denied name: {v}"
            );
        }
        lab_never_saw(&lab, "data in DNS names", &format!("secret-{hex}"));
        assert!(
            lab.saw(|e| e["kind"] == "dns"
                && e["peer"] == HOST_V4
                && e["name"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("w-{t}.wild"))),
            "keystone's resolver never looked up the allowed wildcard name:\n{}",
            lab.dump()
        );
    }

    // SNI other than the name connected to: through the proxy (CONNECT
    // allowed, SNI denied) and captured (allowed address, SNI denied); and
    // plain HTTP to an allowed address with another Host.
    {
        let [sni1, sni2, host1] = probes(
            &h,
            [
                p(&[
                    "https",
                    &format!("https://allowed.lab.test/sni1-{t}"),
                    "--proxy",
                    PROXY,
                    "--sni",
                    &format!("sni1-{t}.denied.lab.test"),
                ]),
                p(&[
                    "https",
                    &format!("https://allowed.lab.test/sni2-{t}"),
                    "--sni",
                    &format!("sni2-{t}.denied.lab.test"),
                ]),
                p(&[
                    "http",
                    &format!("http://allowed.lab.test/host1-{t}"),
                    "--host",
                    &format!("host1-{t}.denied.lab.test"),
                ]),
            ],
        );
        assert!(!ok(&sni1), "CONNECT allowed, SNI denied: {sni1}");
        assert!(!ok(&sni2), "captured TLS, SNI denied: {sni2}");
        assert!(!ok(&host1), "captured HTTP, Host denied: {host1}");
        lab_never_saw_any(
            &lab,
            "SNI/Host other than the name",
            &[
                &format!("sni1-{t}"),
                &format!("sni2-{t}"),
                &format!("host1-{t}"),
            ],
        );
    }

    // UDP (other than DNS to keystone) and ICMP: nothing arrives.
    {
        let ([root_icmp4, root_icmp6], [udp4, udp6, dns, icmp4, icmp6]) = beside(
            &h,
            [
                p(&["icmp", LAB_V4, "--payload", &format!("icmp-root-{t}")]),
                p(&["icmp", LAB_V6, "--payload", &format!("icmp6-root-{t}")]),
            ],
            [
                p(&["udp", LAB_V4, "7", "--payload", &format!("udp4-{t}")]),
                p(&["udp", LAB_V6, "7", "--payload", &format!("udp6-{t}")]),
                p(&["dns", "allowed.lab.test"]),
                p(&["icmp", LAB_V4, "--payload", &format!("icmp-agent-{t}")]),
                p(&["icmp", LAB_V6, "--payload", &format!("icmp6-agent-{t}")]),
            ],
        );
        assert!(!ok(&udp4), "UDP to the lab: {udp4}");
        assert!(!ok(&udp6), "UDP over IPv6 to the lab: {udp6}");
        let synthetic = dns["answers"][0].as_str().unwrap_or("").to_string();
        let [udps] = probes(
            &h,
            [p(&[
                "udp",
                &synthetic,
                "7",
                "--payload",
                &format!("udps-{t}"),
            ])],
        );
        assert!(!ok(&udps), "UDP to an allowed name's address: {udps}");
        for (user, v4, v6) in [
            ("root", &root_icmp4, &root_icmp6),
            ("agent", &icmp4, &icmp6),
        ] {
            assert!(!ok(v4), "ICMP as {user}: {v4}");
            assert!(!ok(v6), "ICMPv6 as {user}: {v6}");
        }
        let tags = [
            "udp4",
            "udp6",
            "udps",
            "icmp-root",
            "icmp-agent",
            "icmp6-root",
            "icmp6-agent",
        ]
        .map(|tag| format!("{tag}-{t}"));
        lab_never_saw_any(
            &lab,
            "UDP and ICMP",
            &tags.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // Where ICMP could not be shown reachable (require_open_reach says
        // why), the lab's silence is no proof; the failed probes are.
    }

    // The host's loopback: not through any gateway address; only a listed
    // host service, and only as host.keystone.internal. (A TCP handshake
    // with keystone's own listener in the guest's namespace, which holds
    // the listed port, is not the host's service: the service's answer,
    // and the requests it logs, are what must not come.)
    {
        let mut tried = Vec::new();
        for (svc, tag) in [(&listed, "listed"), (&unlisted, "unlisted")] {
            for addr in [GATEWAY, "10.0.2.2", "10.0.3.2", "127.0.0.1"] {
                tried.push((svc.port, addr, tag));
            }
        }
        let results: [Value; 8] = probes(
            &h,
            std::array::from_fn(|i| {
                let (port, addr, tag) = tried[i];
                p(&[
                    "http",
                    &format!("http://{addr}:{port}/lo-{addr}-{t}"),
                    "--expect",
                    &format!("host-service {tag}"),
                ])
            }),
        );
        for ((port, addr, _), v) in tried.iter().zip(&results) {
            assert!(!ok(v), "host loopback :{port} via {addr}: {v}");
        }
        std::thread::sleep(Duration::from_millis(500));
        for svc in [&listed, &unlisted] {
            assert!(
                svc.seen().is_empty(),
                "the host's loopback service :{} was reached through a gateway address: {:?}",
                svc.port,
                svc.seen()
            );
        }
        let [internal, other] = probes(
            &h,
            [
                p(&[
                    "http",
                    &format!("http://host.keystone.internal:{}/internal-{t}", listed.port),
                    "--expect",
                    "host-service listed",
                ]),
                p(&[
                    "http",
                    &format!(
                        "http://host.keystone.internal:{}/unlisted-{t}",
                        unlisted.port
                    ),
                    "--expect",
                    "host-service unlisted",
                ]),
            ],
        );
        assert!(
            ok(&internal),
            "a listed host service as host.keystone.internal: {internal}"
        );
        let seen = listed.seen();
        assert_eq!(
            seen.iter()
                .filter(|l| l.contains(&format!("/internal-{t}")))
                .count(),
            1,
            "the listed service got the request once: {seen:?}"
        );
        assert!(
            seen.iter()
                .all(|l| l.is_empty() || l.contains(&format!("/internal-{t}"))),
            "the listed service got other requests: {seen:?}"
        );
        assert!(!ok(&other), "an unlisted host service: {other}");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            unlisted.seen().is_empty(),
            "the unlisted service was reached: {:?}",
            unlisted.seen()
        );
    }

    // Guest root rewrites its resolver and hosts file and changes routes
    // and links: still blocked.
    {
        let root = |script: &str| {
            let r = h.ks(&["exec", "--user", "root", "--", "bash", "-c", script]);
            eprintln!("guest root: {script}\n{}", r.text());
            r
        };
        // One exec (each costs seconds under TCG): the copies, then the
        // rewrites, then the links and routes (best effort, printed).
        root(&format!(
            "{{ cp /etc/resolv.conf /tmp/resolv.keep; cp /etc/hosts /tmp/hosts.keep; }} && \
             {{ echo 'nameserver {LAB_V4}' > /etc/resolv.conf; echo '{LAB_V4} denied.lab.test' >> /etc/hosts; }} && \
             {{ dev=$(ip -o link | awk -F': ' '$2 != \"lo\" {{print $2; exit}}' | cut -d@ -f1); \
             ip link add ksdummy0 type dummy; ip link set ksdummy0 up; ip link set \"$dev\" up; \
             ip route add 198.51.100.0/24 dev \"$dev\"; ip -6 route add 2001:db8:77::/64 dev \"$dev\"; \
             ip route add default dev \"$dev\"; ip route replace {LAB_V4}/32 dev \"$dev\"; \
             ip route; ip -6 route; true; }}"
        ))
        .ok();
        let ([udp], [hosts, resolv, route, route6]) = beside(
            &h,
            [p(&[
                "udp",
                LAB_V4,
                "7",
                "--payload",
                &format!("root-udp-{t}"),
            ])],
            [
                p(&["http", &format!("http://denied.lab.test/root-hosts-{t}")]),
                p(&["dns", &format!("root-resolv-{t}.lab.test")]),
                p(&["http", &format!("http://{LAB_V4}/root-route-{t}")]),
                p(&["http", &format!("http://[{LAB_V6}]/root-route6-{t}")]),
            ],
        );
        assert!(!ok(&hosts), "denied.lab.test from /etc/hosts: {hosts}");
        assert!(!ok(&resolv), "the rewritten resolv.conf: {resolv}");
        assert!(!ok(&route), "IPv4 after route changes: {route}");
        assert!(!ok(&route6), "IPv6 after route changes: {route6}");
        assert!(!ok(&udp), "UDP as root after route changes: {udp}");
        let tags = [
            "root-hosts",
            "root-resolv",
            "root-route",
            "root-route6",
            "root-udp",
        ]
        .map(|tag| format!("{tag}-{t}"));
        lab_never_saw_any(
            &lab,
            "guest root",
            &tags.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        root("cp /tmp/resolv.keep /etc/resolv.conf; cp /tmp/hosts.keep /etc/hosts; ip link del ksdummy0; true")
            .ok();
    }

    // The policy of the running sandbox changes without a restart.
    {
        let r = h.ks(&["allow", &name, "denied.lab.test"]);
        r.ok();
        let [now, direct, dns] = probes(
            &h,
            [
                p(&[
                    "http",
                    &format!("http://denied.lab.test/allowed-now-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "http",
                    &format!("http://denied.lab.test/allowed-direct-{t}"),
                ]),
                p(&["dns", "denied.lab.test"]),
            ],
        );
        assert!(ok(&now), "after `allow`, via proxy: {now}");
        assert!(ok(&direct), "after `allow`, without proxy: {direct}");
        assert!(
            lab_saw(&lab, "http", &format!("allowed-now-{t}")),
            "{}",
            lab.dump()
        );
        assert!(
            lab_saw(&lab, "http", &format!("allowed-direct-{t}")),
            "{}",
            lab.dump()
        );
        let synthetic = dns["answers"][0].as_str().unwrap_or("").to_string();
        assert!(is_synthetic(&synthetic), "{dns}");

        h.ks(&["deny", &name, "denied.lab.test"]).ok();
        let [again, again_direct, stale] = probes(
            &h,
            [
                p(&[
                    "http",
                    &format!("http://denied.lab.test/denied-again-{t}"),
                    "--proxy",
                    PROXY,
                ]),
                p(&[
                    "http",
                    &format!("http://denied.lab.test/denied-again-direct-{t}"),
                ]),
                // The address handed out while it was allowed no longer
                // leads there.
                p(&[
                    "http",
                    &format!("http://{synthetic}/denied-stale-{t}"),
                    "--host",
                    "denied.lab.test",
                ]),
            ],
        );
        assert_eq!(again["status"], 403, "after `deny`, via proxy: {again}");
        refused_fast("after `deny`, without proxy", &again_direct);
        assert!(!ok(&stale), "the synthetic address after `deny`: {stale}");
        let tags = ["denied-again", "denied-again-direct", "denied-stale"]
            .map(|tag| format!("/{tag}-{t}"));
        lab_never_saw_any(
            &lab,
            "after `deny`",
            &tags.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    // The denials are logged and in status.
    {
        let last = format!("last-{t}.denied.lab.test");
        probe(&h, &["http", &format!("http://{last}/"), "--proxy", PROXY]);
        let r = h.ks(&["egress", "log", &name, "--json", "-n", "100000"]);
        r.ok();
        let events: Vec<Value> = r
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("egress log line {l:?}: {e}"))
            })
            .collect();
        for e in &events {
            for k in ["time", "proto", "host", "port", "decision", "rule"] {
                assert!(e.get(k).is_some(), "egress log event without {k}: {e}");
            }
        }
        let denied = |host: &str| {
            events.iter().any(|e| {
                e["host"] == host && e["decision"].as_str().unwrap_or("").starts_with("den")
            })
        };
        for host in [
            format!("p-{t}.denied.lab.test"),
            format!("n-{t}.denied.lab.test"),
            last.clone(),
        ] {
            assert!(
                denied(&host),
                "no denial of {host} in the egress log:\n{}",
                r.stdout
            );
        }
        let st = h.status_json(&name);
        let denials = st["egress"]["denials"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            denials.iter().any(|e| e["host"] == last.as_str()),
            "status --json shows no denial of {last}: {st}"
        );
    }

    // Nothing secret ever reached the lab.
    lab_never_saw_any(
        &lab,
        "the whole run",
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// The user's own credential in the egress scenario (on the forward list
/// beside the defaults, its hosts in `[credentials]`).
const TEST_CREDENTIAL: &str = "KEYSTONE_TEST_TOKEN";
/// A credential host the lab CA signs (so keystone's upstream check
/// passes), answered by the lab itself.
const CRED_HOST: &str = "api.ca.lab.test";
/// A credential host whose certificate no CA keystone trusts signed.
const ROGUE_HOST: &str = "rogue.lab.test";
/// keystone's default forward list (keystone-config's DEFAULT_FORWARD_ENV).
const DEFAULT_FORWARD_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
];

/// The real value of [`TEST_CREDENTIAL`], in the host's environment.
struct Credential {
    real: String,
}

impl Credential {
    fn new() -> Credential {
        Credential {
            real: format!("kst-{}{}", token(), token()),
        }
    }
}

/// `line` added to the harness config's `[guest]` table.
fn add_to_guest_table(h: &Host, line: &str) {
    let path = config_path(h);
    let text = std::fs::read_to_string(&path).expect("config");
    assert!(text.contains("\n[guest]\n"), "no [guest] table:\n{text}");
    h.write(
        &path,
        &text.replacen("\n[guest]\n", &format!("\n[guest]\n{line}\n"), 1),
    );
}

/// What a curl in [`credential_interception`]'s script printed under
/// `@@name`: (`status=` code, curl's exit code, the body).
fn curl_result(out: &str, name: &str) -> (String, String, String) {
    let section = out
        .split(&format!("@@{name}\n"))
        .nth(1)
        .map(|rest| rest.split("\n@@").next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no output of {name} in:\n{out}"));
    let field = |key: &str| {
        section
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    (field("status="), field("rc="), section.to_string())
}

/// The interception checks (one exec for every curl): the placeholder
/// the guest holds is swapped for the real value in the headers of TLS
/// requests to a credential host keystone could verify, through the proxy
/// and captured; never in a body, never to another allowed host, never
/// over plain HTTP, never to a credential host presenting a certificate
/// no CA the host trusts signed. Without the defence each fails: a
/// tunnelled api.ca.lab.test shows the lab the placeholder, a swap
/// everywhere shows it the real value elsewhere.
fn credential_interception(h: &Host, lab: &Lab, cred: &Credential, t: &str) {
    use crate::harness::credentials::{assert_placeholder, sha256_hex, tokens_json, used};
    let before = used(&tokens_json(h, &[]), TEST_CREDENTIAL);
    let script = credential_script(t);
    let r = h.ks(&["exec", "--", "bash", "-c", &script]);
    let out = r.stdout.clone();
    eprintln!("credential probes:\n{}", r.text());

    let placeholder = out
        .split("@@placeholder\n")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
        .trim()
        .to_string();
    assert_placeholder(TEST_CREDENTIAL, &cred.real, &placeholder);
    assert!(
        !out.contains(&cred.real) && !r.stderr.contains(&cred.real),
        "the guest saw the real value:\n{}",
        r.text()
    );

    // The lab's request event whose path ends in `tag-t`.
    let event = |tag: &str| -> Option<Value> {
        let path = format!("/{tag}-{t}");
        let mut found = None;
        crate::harness::eventually(Duration::from_secs(5), || {
            found = lab.events().into_iter().find(|e| {
                (e["kind"] == "https" || e["kind"] == "http") && e["path"] == path.as_str()
            });
            found.is_some()
        });
        found
    };
    let dump = || lab.dump();

    // Swapped in the header, through the proxy and captured; the body
    // carries the placeholder still.
    for tag in ["proxied", "captured"] {
        let (status, rc, section) = curl_result(&out, tag);
        assert_eq!(
            (status.as_str(), rc.as_str()),
            ("200", "0"),
            "{tag}: the guest's curl to {CRED_HOST} (keystone's certificate, no -k):\n{section}"
        );
        let path = format!("echo-{tag}");
        let e = event(&path).unwrap_or_else(|| {
            panic!("{tag}: the lab saw no request for {CRED_HOST}:\n{}", dump())
        });
        assert_eq!(e["kind"], "https", "{e}");
        assert_eq!(e["sni"], CRED_HOST, "{e}");
        assert_eq!(
            e["headers"]["x-api-key"].as_str(),
            Some(cred.real.as_str()),
            "{tag}: the credential host got {} in x-api-key, not the real value (placeholder {placeholder}): {e}",
            e["headers"]["x-api-key"]
        );
        assert_eq!(
            e["body"].as_str(),
            Some(placeholder.as_str()),
            "{tag}: the body must arrive untouched: {e}"
        );
        assert_eq!(
            e["body_sha256"].as_str(),
            Some(sha256_hex(&placeholder).as_str()),
            "{e}"
        );
    }

    // Another allowed host, over TLS: the placeholder, as sent (whether
    // tunnelled or not).
    for tag in ["other", "other-captured"] {
        let (status, _, section) = curl_result(&out, tag);
        assert_eq!(status, "200", "{tag}: allowed.lab.test:\n{section}");
        let e = event(tag).unwrap_or_else(|| panic!("{tag}: the lab saw no request:\n{}", dump()));
        assert_eq!(
            e["headers"]["x-api-key"].as_str(),
            Some(placeholder.as_str()),
            "{tag}: another host must get the placeholder: {e}"
        );
    }

    // Plain HTTP to the credential host: the placeholder only.
    for tag in ["cleartext", "cleartext-proxied"] {
        let (status, _, section) = curl_result(&out, tag);
        assert_eq!(status, "200", "{tag}: http://{CRED_HOST}:\n{section}");
        let e = event(tag).unwrap_or_else(|| panic!("{tag}: the lab saw no request:\n{}", dump()));
        assert_eq!(e["kind"], "http", "{e}");
        assert_eq!(
            e["headers"]["x-api-key"].as_str(),
            Some(placeholder.as_str()),
            "{tag}: plain HTTP must carry the placeholder only: {e}"
        );
    }

    // A credential host with a certificate no trusted CA signed: refused
    // (a 502 from keystone, or a failed handshake), and no request of it
    // reached the lab, with or without the real value.
    for tag in ["rogue", "rogue-captured"] {
        let (status, rc, section) = curl_result(&out, tag);
        assert!(
            status != "200",
            "{tag}: {ROGUE_HOST} answered through keystone although its certificate is self-signed:\n{section}"
        );
        eprintln!("{tag}: status={status} rc={rc}");
    }
    std::thread::sleep(Duration::from_millis(300));
    for tag in ["rogue", "rogue-captured"] {
        let seen = lab.mentions(&format!("/{tag}-{t}"));
        assert!(
            seen.is_empty(),
            "{tag}: a request reached {ROGUE_HOST}:\n{seen:?}"
        );
    }

    // The real value reached the lab in exactly the two swapped headers.
    let carrying = lab.mentions(&cred.real);
    let paths: Vec<&str> = carrying
        .iter()
        .map(|e| e["path"].as_str().unwrap_or("?"))
        .collect();
    let mut expected = vec![format!("/echo-proxied-{t}"), format!("/echo-captured-{t}")];
    expected.sort();
    let mut got: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    got.sort();
    assert_eq!(
        got, expected,
        "the real value reached the lab elsewhere than the two swapped headers:\n{carrying:?}"
    );

    let (status, rc, section) = curl_result(&out, "pristine");
    if rc != "skipped" {
        assert!(
            status != "200" && rc != "0",
            "Debian's own CA certificates verify keystone's certificate:\n{section}"
        );
    }

    // The count: the two swapped requests (none of the others).
    let after = used(&tokens_json(h, &[]), TEST_CREDENTIAL);
    assert_eq!(
        after - before,
        2,
        "tokens --json: {TEST_CREDENTIAL} was injected {} times in these probes, not 2",
        after - before
    );

    // Rotation: a new value on the host, handed over by `tokens
    // --refresh`, goes out with the next request, without a restart; the
    // guest keeps its placeholder.
    let rotated = format!(
        "kst-{}",
        crate::harness::credentials::random(crate::harness::credentials::ALNUM, 32)
    );
    h.ks_env(&["tokens", "--refresh"], &[(TEST_CREDENTIAL, &rotated)])
        .ok();
    let out = h.sh(&format!(
        "curl -sS --max-time 10 -o /dev/null -w 'status=%{{http_code}}\\n' -x {PROXY} \
         -H \"x-api-key: ${TEST_CREDENTIAL}\" https://{CRED_HOST}/echo-rotated-{t}; printenv {TEST_CREDENTIAL}"
    ));
    assert!(out.contains("status=200"), "after the rotation:\n{out}");
    assert!(
        out.contains(&placeholder),
        "the placeholder changed:\n{out}"
    );
    let e = event("echo-rotated").unwrap_or_else(|| panic!("no rotated request:\n{}", dump()));
    assert_eq!(
        e["headers"]["x-api-key"].as_str(),
        Some(rotated.as_str()),
        "the rotated value did not go out: {e}"
    );
}

/// [`credential_interception`]'s script: the guest's placeholder, then
/// each curl's `status=`, `rc=` and body under its `@@name`.
fn credential_script(t: &str) -> String {
    let curl = |name: &str, args: &str| {
        format!(
            "echo '@@{name}'; curl -sS --max-time 10 -o /tmp/ks-cred-body -w 'status=%{{http_code}}\\n' {args} 2>&1; \
             echo \"rc=$?\"; cat /tmp/ks-cred-body 2>/dev/null; rm -f /tmp/ks-cred-body; echo; "
        )
    };
    let hdr = format!("-H \"x-api-key: ${TEST_CREDENTIAL}\"");
    let body = format!("-d \"${TEST_CREDENTIAL}\"");
    [
        format!("echo '@@placeholder'; printenv {TEST_CREDENTIAL}; "),
        curl(
            "proxied",
            &format!("-x {PROXY} {hdr} {body} https://{CRED_HOST}/echo-proxied-{t}"),
        ),
        curl(
            "captured",
            &format!("--noproxy '*' {hdr} {body} https://{CRED_HOST}/echo-captured-{t}"),
        ),
        curl(
            "other",
            &format!("-k -x {PROXY} {hdr} https://allowed.lab.test/other-{t}"),
        ),
        curl(
            "other-captured",
            &format!("-k --noproxy '*' {hdr} https://allowed.lab.test/other-captured-{t}"),
        ),
        curl(
            "cleartext",
            &format!("--noproxy '*' {hdr} http://{CRED_HOST}/cleartext-{t}"),
        ),
        curl(
            "cleartext-proxied",
            &format!("-x {PROXY} {hdr} http://{CRED_HOST}/cleartext-proxied-{t}"),
        ),
        curl(
            "rogue",
            &format!("-x {PROXY} {hdr} https://{ROGUE_HOST}/rogue-{t}"),
        ),
        curl(
            "rogue-captured",
            &format!("--noproxy '*' {hdr} https://{ROGUE_HOST}/rogue-captured-{t}"),
        ),
        // The keystone CA is in the guest's managed bundle only: Debian's
        // own certificates (ca-certificates' sources) do not verify it.
        format!(
            "if ls /usr/share/ca-certificates/mozilla/*.crt >/dev/null 2>&1; then \
             cat /usr/share/ca-certificates/mozilla/*.crt > /tmp/ks-pristine.pem; \
             {} else echo '@@pristine'; echo 'status=none'; echo 'rc=skipped'; fi",
            curl(
                "pristine",
                &format!(
                    "--cacert /tmp/ks-pristine.pem --noproxy '*' https://{CRED_HOST}/pristine-{t}"
                )
            )
        ),
    ]
    .concat()
}

/// The script's shell is sound and [`curl_result`] reads what it prints
/// (curl replaced by a stub; on the host).
#[test]
fn credential_script_parses() {
    let stub = "curl() { case \"$*\" in *rogue*) echo 'curl: (35) handshake'; return 35;; esac; \
                printf 'body-of-%s' \"${@: -1}\" > /tmp/ks-cred-body; echo 'status=200'; }; \
                printenv() { echo kst-placeholder; }; ls() { return 1; }; ";
    let script = format!("{stub}{}", credential_script("T1"));
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.starts_with("@@placeholder\nkst-placeholder\n"), "{out}");
    let (status, rc, body) = curl_result(&out, "proxied");
    assert_eq!((status.as_str(), rc.as_str()), ("200", "0"), "{out}");
    assert!(
        body.contains("body-of-https://api.ca.lab.test/echo-proxied-T1"),
        "{body}"
    );
    let (status, rc, _) = curl_result(&out, "rogue-captured");
    assert_eq!((status.as_str(), rc.as_str()), ("", "35"), "{out}");
    let (status, rc, _) = curl_result(&out, "pristine");
    assert_eq!((status.as_str(), rc.as_str()), ("none", "skipped"), "{out}");
}

/// An address in 198.18.0.0/15.
fn is_synthetic(addr: &str) -> bool {
    match addr.parse::<std::net::Ipv4Addr>() {
        Ok(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        Err(_) => false,
    }
}
