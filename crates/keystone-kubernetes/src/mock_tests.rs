//! The lifecycle and its cleanup branches against a scripted API server
//! (kube-rs's `tower_test::mock` pattern): a fake that keeps the objects
//! created, answers get, create and delete as the API server does, refuses
//! the requests a test names, and logs every request, so each test asserts
//! the exact calls made. No cluster needed.

use super::guard::Created;
use super::supervision::{self, Upstream};
use super::{cluster, Names};
use http::{Method, Request, Response};
use keystone_backend::signals::{StopRequest, Wake};
use keystone_backend::{BackendError, Ended, Instance, Running};
use keystone_registry::KubeSettings;
use kube::client::Body;
use kube::Client;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NS: &str = "ks";
const CORE: &str = "/api/v1/namespaces/ks";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/ks";
const GREETING: &[u8] = b"SSH-2.0-OpenSSH_mock\r\n";

/// What the fake API server holds and has been asked.
#[derive(Default)]
struct Fake {
    /// By path: `/api/v1/namespaces/ks/secrets/keystone-t-ssh`.
    objects: BTreeMap<String, serde_json::Value>,
    /// `METHOD path`, in order.
    log: Vec<String>,
    /// `METHOD path` → the error status to answer with, every time.
    refuse: BTreeMap<String, u16>,
    /// What a created pod reports.
    pod_status: serde_json::Value,
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

impl Fake {
    fn answer(&mut self, method: &Method, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let line = format!("{method} {path}");
        self.log.push(line.clone());
        if let Some(&code) = self.refuse.get(&line) {
            return (code, status(code, "Forbidden", "refused by the test"));
        }
        match *method {
            Method::POST => {
                let mut obj: serde_json::Value = serde_json::from_slice(body).expect("json");
                let name = obj["metadata"]["name"].as_str().expect("name").to_string();
                let key = format!("{path}/{name}");
                if self.objects.contains_key(&key) {
                    return (409, status(409, "AlreadyExists", "exists"));
                }
                if path.ends_with("/pods") {
                    obj["status"] = self.pod_status.clone();
                }
                self.objects.insert(key, obj.clone());
                (201, obj)
            }
            Method::GET => match self.objects.get(path) {
                Some(obj) => (200, obj.clone()),
                None => (404, status(404, "NotFound", "not found")),
            },
            Method::DELETE => match self.objects.remove(path) {
                Some(obj) => (200, obj),
                None => (404, status(404, "NotFound", "not found")),
            },
            _ => panic!("unexpected {line}"),
        }
    }
}

/// A runtime, a client whose every request the fake answers, the fake.
fn cluster(fake: Fake) -> (tokio::runtime::Runtime, Client, Arc<Mutex<Fake>>) {
    let rt = super::runtime(2).expect("runtime");
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let fake = Arc::new(Mutex::new(fake));
    let state = fake.clone();
    rt.spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let body = req.into_body().collect_bytes().await.expect("body");
            let (code, value) = state.lock().expect("fake").answer(&method, &path, &body);
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&value).expect("json")))
                .expect("response");
            send.send_response(response);
        }
    });
    let client = {
        let _in = rt.enter();
        Client::new(svc, "default")
    };
    (rt, client, fake)
}

fn running_pod() -> serde_json::Value {
    serde_json::json!({
        "phase": "Running",
        "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}}]
    })
}

fn fake() -> Fake {
    Fake {
        pod_status: running_pod(),
        ..Fake::default()
    }
}

/// A sandbox `t` whose keys are on disk, its socket in a temporary dir.
struct Sandbox {
    _dir: tempfile::TempDir,
    inst: Instance,
    k: KubeSettings,
}

fn sandbox() -> Sandbox {
    sandbox_with_egress("open")
}

fn sandbox_with_egress(egress: &str) -> Sandbox {
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).expect("guest dir");
    std::fs::write(guest.join("ssh_host_ed25519_key"), "KEY\n").expect("key");
    std::fs::write(guest.join("authorized_keys"), "ssh-ed25519 AAAA\n").expect("keys");
    let k = KubeSettings {
        context: String::new(),
        namespace: NS.into(),
        storage_class: String::new(),
        image: "localhost/guest:1".into(),
        pull_policy: "Never".into(),
    };
    let settings = serde_json::from_value(serde_json::json!({
        "memory_mb": 2048, "vcpus": 2, "nested_virt": false, "network": "nat",
        "sync_mode": "manual", "persist": true, "image": "img",
        "kubernetes": k, "egress": egress,
    }))
    .expect("settings");
    let inst = Instance {
        name: "t".into(),
        id: "id1".into(),
        dir: dir.path().to_path_buf(),
        settings,
        project: dir.path().to_path_buf(),
        image_tar: dir.path().join("image.tar"),
        image_id: "img".into(),
        guest_dir: guest,
        socket: dir.path().join("ssh.sock"),
        cache_dir: dir.path().to_path_buf(),
    };
    Sandbox { _dir: dir, inst, k }
}

const CLAIM: &str = "/api/v1/namespaces/ks/persistentvolumeclaims/keystone-t-workspace";
const SECRET: &str = "/api/v1/namespaces/ks/secrets/keystone-t-ssh";
const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/ks/networkpolicies/keystone-t-isolate";
const POD: &str = "/api/v1/namespaces/ks/pods/keystone-t";

/// The requests of a start up to the running pod.
fn creates() -> Vec<String> {
    vec![
        format!("GET {CLAIM}"),
        format!("POST {CORE}/persistentvolumeclaims"),
        format!("POST {CORE}/secrets"),
        format!("POST {NET}/networkpolicies"),
        format!("POST {CORE}/pods"),
        format!("GET {POD}"),
    ]
}

/// Delete and see it gone, for each path.
fn deletes(paths: &[&str]) -> Vec<String> {
    paths
        .iter()
        .flat_map(|p| [format!("DELETE {p}"), format!("GET {p}")])
        .collect()
}

fn log(fake: &Arc<Mutex<Fake>>) -> Vec<String> {
    fake.lock().expect("fake").log.clone()
}

fn objects(fake: &Arc<Mutex<Fake>>) -> Vec<String> {
    fake.lock().expect("fake").objects.keys().cloned().collect()
}

/// Run the sandbox: `stop_when_ready` asks it to stop once `on_ready` was
/// called; `ready` answers `on_ready`.
fn run(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    s: &Sandbox,
    ready: Result<(), String>,
) -> (Result<Ended, BackendError>, Option<Running>) {
    let seen: Cell<Option<Running>> = Cell::new(None);
    let called = Cell::new(false);
    let mut on_ready = |r: &Running| {
        called.set(true);
        seen.set(Some(r.clone()));
        ready.clone()
    };
    let mut wait = |limit: Duration| {
        if called.get() {
            Wake::Stop(StopRequest::Graceful)
        } else {
            std::thread::sleep(limit.min(Duration::from_millis(5)));
            Wake::Timeout
        }
    };
    let ended = supervision::run(
        rt,
        client,
        &s.inst,
        &s.k,
        Upstream::Greeting(GREETING),
        &mut wait,
        &mut on_ready,
    );
    (ended, seen.take())
}

/// The happy path: claim, Secret, NetworkPolicy, pod, in that order; the
/// socket answers; a stop deletes the pod, Secret and policy and keeps the
/// claim (the workspace outlives a stop).
#[test]
fn a_start_creates_its_objects_and_a_stop_keeps_the_claim() {
    let s = sandbox();
    let (rt, client, fake) = cluster(fake());
    let (ended, running) = run(&rt, &client, &s, Ok(()));
    assert_eq!(ended.expect("run"), Ended::Stopped);
    let running = running.expect("on_ready was called");
    assert_eq!(running.runtime["pod"], "keystone-t");
    assert_eq!(running.notes, ["pod: ks/keystone-t"]);
    let mut expected = creates();
    expected.extend(deletes(&[POD, SECRET, POLICY]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), [CLAIM]);
    assert!(!s.inst.socket.exists(), "socket left after stop");
}

/// Each fault point in its own process: `KEYSTONE_FAULT` is read from the
/// environment, which threads of one test process share.
const FAULT_POINTS: &[(&str, &[&str])] = &[
    ("kubernetes-claim-created", &[CLAIM]),
    ("kubernetes-secret-created", &[SECRET, CLAIM]),
    ("kubernetes-policy-created", &[SECRET, POLICY, CLAIM]),
    ("kubernetes-pod-created", &[POD, SECRET, POLICY, CLAIM]),
    ("kubernetes-pod-running", &[POD, SECRET, POLICY, CLAIM]),
    ("kubernetes-socket-bound", &[POD, SECRET, POLICY, CLAIM]),
    ("kubernetes-sshd-answered", &[POD, SECRET, POLICY, CLAIM]),
];

/// A failure at each fault point: the start fails with it, and the guard
/// deletes exactly what was created (the claim last: the pod holds it),
/// removes the socket, and leaves nothing in the cluster. Run once per
/// point in a child process of this test binary, with `KEYSTONE_FAULT`
/// set there only.
#[test]
fn a_fault_at_each_point_deletes_what_was_created() {
    const ME: &str = "mock_tests::a_fault_at_each_point_deletes_what_was_created";
    if let Ok(point) = std::env::var(keystone_backend::fault::VAR) {
        return fault_child(&point);
    }
    for (point, _) in FAULT_POINTS {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([ME, "--exact", "--nocapture", "--test-threads=1"])
            .env(keystone_backend::fault::VAR, point)
            .output()
            .expect("run the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "at {point}:\n{text}");
        assert!(
            text.contains("1 passed"),
            "at {point}, the test did not run:\n{text}"
        );
        assert!(text.contains(&format!("checked {point}")), "{text}");
    }
}

fn fault_child(point: &str) {
    let (_, removed) = FAULT_POINTS
        .iter()
        .find(|(p, _)| *p == point)
        .unwrap_or_else(|| panic!("unknown fault point {point}"));
    let s = sandbox();
    let (rt, client, fake) = cluster(fake());
    let (ended, running) = run(&rt, &client, &s, Ok(()));
    let err = ended.expect_err("the start must fail").to_string();
    assert!(
        err.contains(&format!("fault injected at {point}")),
        "{point}: {err}"
    );
    assert!(!err.contains("cleanup"), "{point}: {err}");
    assert!(running.is_none(), "{point}: on_ready was called");
    let log = log(&fake);
    let tail = deletes(removed);
    assert!(
        log.ends_with(&tail),
        "{point}: expected the guard's deletes {tail:#?} at the end of {log:#?}"
    );
    let all_deletes: Vec<&String> = log.iter().filter(|l| l.starts_with("DELETE")).collect();
    assert_eq!(all_deletes.len(), removed.len(), "{point}: {log:#?}");
    assert_eq!(
        objects(&fake),
        Vec::<String>::new(),
        "{point}: left in the cluster"
    );
    assert!(!s.inst.socket.exists(), "{point}: socket left");
    println!("checked {point}");
}

/// `on_ready` fails (the registry could not be written): the start is
/// undone, the claim it created included.
#[test]
fn a_failed_on_ready_undoes_the_start() {
    let s = sandbox();
    let (rt, client, fake) = cluster(fake());
    let (ended, _) = run(&rt, &client, &s, Err("registry is read-only".into()));
    let err = ended.expect_err("must fail").to_string();
    assert_eq!(err, "registry is read-only");
    let mut expected = creates();
    expected.extend(deletes(&[POD, SECRET, POLICY, CLAIM]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), Vec::<String>::new());
    assert!(!s.inst.socket.exists(), "socket left");
}

/// A pod that cannot run (the cluster's reason): everything goes, and a
/// delete that fails is reported beside that reason, not instead of it;
/// the other deletes still happen.
#[test]
fn a_failed_delete_is_reported_beside_the_cause() {
    let s = sandbox();
    let mut f = fake();
    f.pod_status = serde_json::json!({
        "phase": "Pending",
        "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull",
            "message": "not present"}}}]
    });
    f.refuse.insert(format!("DELETE {SECRET}"), 403);
    let (rt, client, fake) = cluster(f);
    let (ended, _) = run(&rt, &client, &s, Ok(()));
    let err = ended.expect_err("must fail").to_string();
    assert!(
        err.starts_with("pod ks/keystone-t cannot run: ErrImageNeverPull: not present; cleanup also failed: could not delete secret keystone-t-ssh: refused by the test (Forbidden)"),
        "{err}"
    );
    let mut expected = creates();
    expected.extend(deletes(&[POD]));
    expected.push(format!("DELETE {SECRET}"));
    expected.extend(deletes(&[POLICY, CLAIM]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), [SECRET]);
}

/// A start that fails on an existing workspace leaves that claim alone:
/// it is the sandbox's disk, not this start's.
#[test]
fn a_failed_start_keeps_a_claim_it_did_not_create() {
    let s = sandbox();
    let mut f = fake();
    f.objects.insert(
        CLAIM.into(),
        serde_json::json!({"metadata": {"name": "keystone-t-workspace"}}),
    );
    f.refuse.insert(format!("POST {CORE}/pods"), 403);
    let (rt, client, fake) = cluster(f);
    let (ended, _) = run(&rt, &client, &s, Ok(()));
    let err = ended.expect_err("must fail").to_string();
    assert!(
        err.contains("cannot create keystone-t: refused by the test"),
        "{err}"
    );
    let mut expected = vec![
        format!("GET {CLAIM}"),
        format!("POST {CORE}/secrets"),
        format!("POST {NET}/networkpolicies"),
        format!("POST {CORE}/pods"),
    ];
    // The refused pod is deleted too (a create may have happened even
    // when its answer was lost); not found, it is not waited for.
    expected.push(format!("DELETE {POD}"));
    expected.extend(deletes(&[SECRET, POLICY]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), [CLAIM]);
}

/// Asked to stop while the pod is still pending: a stop, not an error,
/// and nothing left.
#[test]
fn a_stop_while_starting_removes_everything() {
    let s = sandbox();
    let mut f = fake();
    f.pod_status = serde_json::json!({"phase": "Pending"});
    let (rt, client, fake) = cluster(f);
    let mut wait = |_: Duration| Wake::Stop(StopRequest::Force);
    let mut on_ready = |_: &Running| -> Result<(), String> { panic!("not ready") };
    let ended = supervision::run(
        &rt,
        &client,
        &s.inst,
        &s.k,
        Upstream::Greeting(GREETING),
        &mut wait,
        &mut on_ready,
    );
    assert_eq!(ended.expect("a stop"), Ended::Stopped);
    let mut expected = creates();
    expected.extend(deletes(&[POD, SECRET, POLICY, CLAIM]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), Vec::<String>::new());
}

/// The backstop: a guard dropped without `fail` or `remove` (a panic
/// unwinding through the start) still deletes what it holds.
#[test]
fn a_dropped_guard_deletes_what_it_holds() {
    let s = sandbox();
    let mut f = fake();
    for p in [SECRET, POD] {
        f.objects
            .insert(p.into(), serde_json::json!({"metadata": {"name": "x"}}));
    }
    let (rt, client, fake) = cluster(f);
    let mut made = Created::new(rt.handle().clone(), client, NS, &Names::of(&s.inst));
    made.secret();
    made.pod();
    drop(made);
    assert_eq!(log(&fake), deletes(&[POD, SECRET]));
    assert_eq!(objects(&fake), Vec::<String>::new());
}

/// `reap` (after a dead supervisor): pod, Secret and policy, each tried
/// whatever the others did, the failures named; never the claim.
#[test]
fn reap_deletes_the_pod_objects_and_reports_each_failure() {
    let s = sandbox();
    let mut f = fake();
    for p in [CLAIM, SECRET, POLICY, POD] {
        f.objects
            .insert(p.into(), serde_json::json!({"metadata": {"name": "x"}}));
    }
    f.refuse.insert(format!("DELETE {POD}"), 500);
    let (rt, client, fake) = cluster(f);
    let names = Names::of(&s.inst);
    let left = rt.block_on(cluster::remove_pod_objects(&client, NS, &names, 0));
    let left: Vec<String> = left.iter().map(ToString::to_string).collect();
    assert_eq!(
        left,
        ["could not delete pod keystone-t: refused by the test (Forbidden)"]
    );
    let mut expected = vec![format!("DELETE {POD}")];
    expected.extend(deletes(&[SECRET, POLICY]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), [CLAIM, POD]);
}

/// `discard_disk` (`--fresh`, `destroy`): the claim, waited for; one
/// already gone is no error.
#[test]
fn discard_disk_deletes_the_claim() {
    let s = sandbox();
    let mut f = fake();
    f.objects
        .insert(CLAIM.into(), serde_json::json!({"metadata": {"name": "x"}}));
    let (rt, client, fake) = cluster(f);
    let names = Names::of(&s.inst);
    rt.block_on(cluster::remove_claim(&client, NS, &names))
        .expect("removed");
    assert_eq!(log(&fake), deletes(&[CLAIM]));
    assert_eq!(objects(&fake), Vec::<String>::new());
    rt.block_on(cluster::remove_claim(&client, NS, &names))
        .expect("gone already");
    let mut twice = deletes(&[CLAIM]);
    twice.push(format!("DELETE {CLAIM}"));
    assert_eq!(log(&fake), twice);
}

/// A pod deleted by someone else ends the running sandbox with that
/// reason; what then cannot be removed is said beside it, and the claim
/// stays (the sandbox still has its workspace).
#[test]
fn a_pod_deleted_outside_ends_the_sandbox_and_reports_a_failed_cleanup() {
    let s = sandbox();
    let mut f = fake();
    f.refuse.insert(format!("DELETE {SECRET}"), 403);
    let (rt, client, fake) = cluster(f);
    let outside = fake.clone();
    let mut on_ready = |_: &Running| -> Result<(), String> {
        outside.lock().expect("fake").objects.remove(POD);
        Ok(())
    };
    let mut wait = |limit: Duration| {
        std::thread::sleep(limit.min(Duration::from_millis(50)));
        Wake::Timeout
    };
    let ended = supervision::run(
        &rt,
        &client,
        &s.inst,
        &s.k,
        Upstream::Greeting(GREETING),
        &mut wait,
        &mut on_ready,
    );
    assert_eq!(
        ended.expect("an end, not an error"),
        Ended::Exited(
            "pod ks/keystone-t was deleted outside keystone; cleanup failed: could not delete secret keystone-t-ssh: refused by the test (Forbidden)"
                .into()
        )
    );
    let mut expected = creates();
    expected.push(format!("GET {POD}"));
    expected.push(format!("DELETE {POD}"));
    expected.push(format!("DELETE {SECRET}"));
    expected.extend(deletes(&[POLICY]));
    assert_eq!(log(&fake), expected);
    assert_eq!(objects(&fake), [CLAIM, SECRET]);
    assert!(!s.inst.socket.exists(), "socket left");
}

/// With the allowlist: only the init container holds NET_ADMIN and runs
/// the fence; the guest's resolver is keystone's; the Secret carries the
/// relay and START runs it; the NetworkPolicy denies all egress.
#[test]
fn the_allowlist_fences_the_pod_and_carries_the_relay() {
    use crate::objects::{pod_object, policy_object, secret_object};
    let sb = sandbox_with_egress("allowlist");
    let names = Names::of(&sb.inst);
    let pod =
        serde_json::to_value(pod_object(&sb.inst, &names, &sb.k).expect("pod")).expect("json");
    let spec = &pod["spec"];
    let init = spec["initContainers"].as_array().expect("init containers");
    assert_eq!(init.len(), 1, "{spec}");
    assert_eq!(
        init[0]["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(
        init[0]["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let script = init[0]["command"][2].as_str().expect("script");
    assert!(
        script.contains("nft -f -") && script.contains("redirect to :15001"),
        "{script}"
    );
    let sandbox_caps = spec["containers"][0]["securityContext"]["capabilities"]["add"].to_string();
    assert!(!sandbox_caps.contains("NET_ADMIN"), "{sandbox_caps}");
    assert_eq!(spec["dnsPolicy"], "None");
    assert_eq!(
        spec["dnsConfig"]["nameservers"],
        serde_json::json!(["198.18.0.1"])
    );
    let start = spec["containers"][0]["command"][2].as_str().expect("start");
    assert!(start.contains("egress-relay.py"), "{start}");

    let secret =
        serde_json::to_value(secret_object(&sb.inst, &names).expect("secret")).expect("json");
    assert_eq!(
        secret["stringData"]["egress-relay.py"].as_str(),
        Some(keystone_egress::relay::SCRIPT)
    );
    let policy =
        serde_json::to_value(policy_object(&sb.inst, &names).expect("policy")).expect("json");
    assert_eq!(policy["spec"]["egress"], serde_json::json!([]), "{policy}");

    // Open egress: none of it.
    let sb = sandbox_with_egress("open");
    let pod =
        serde_json::to_value(pod_object(&sb.inst, &names, &sb.k).expect("pod")).expect("json");
    assert!(pod["spec"].get("initContainers").is_none(), "{pod}");
    assert!(pod["spec"].get("dnsPolicy").is_none(), "{pod}");
    let secret =
        serde_json::to_value(secret_object(&sb.inst, &names).expect("secret")).expect("json");
    assert!(secret["stringData"].get("egress-relay.py").is_none());
    let policy =
        serde_json::to_value(policy_object(&sb.inst, &names).expect("policy")).expect("json");
    assert_ne!(policy["spec"]["egress"], serde_json::json!([]), "{policy}");
}
