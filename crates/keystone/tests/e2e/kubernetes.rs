//! The Kubernetes backend against a real cluster: kube-apiserver, the
//! controller-manager, the scheduler and a kubelet on containerd, built from
//! Debian's archive and started by `scripts/test-cluster.sh up`, which also
//! imports the guest image. `KUBECONFIG` must name its admin kubeconfig
//! (`eval "$(scripts/test-cluster.sh env)"`; scripts/test.sh does all of
//! this). A missing cluster fails the tests, saying how to bring it up.

use crate::harness::*;
use std::process::Command;
use std::time::Duration;

const NAMESPACE: &str = "keystone-e2e";

fn kubeconfig() -> String {
    let k = std::env::var("KUBECONFIG").unwrap_or_default();
    assert!(
        !k.is_empty() && std::path::Path::new(&k).is_file(),
        "the Kubernetes end-to-end tests need a cluster: run `scripts/test-cluster.sh up` as root and `eval \"$(scripts/test-cluster.sh env)\"` (KUBECONFIG={k:?})"
    );
    k
}

/// `kubectl ARGS` against the test cluster; (success, stdout+stderr).
fn kubectl(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig()).args(args);
    let r = run_bounded(cmd, Duration::from_secs(60));
    (r.code == Some(0), format!("{}{}", r.stdout, r.stderr))
}

/// The names of the objects of `kind` in the test namespace.
fn objects(kind: &str) -> Vec<String> {
    let (ok, out) = kubectl(&["-n", NAMESPACE, "get", kind, "-o", "name"]);
    assert!(ok, "kubectl get {kind}: {out}");
    out.lines().map(str::to_string).collect()
}

/// A host whose sandboxes run on the test cluster, in [`NAMESPACE`], from
/// the guest image imported into the node (`pull_policy = "never"`: no
/// registry exists; a missing image must fail, not pull).
fn host(project: &str, extra_config: &str) -> Host {
    let k = kubeconfig();
    let (ok, out) = kubectl(&["get", "--raw", "/readyz"]);
    assert!(
        ok,
        "the test cluster does not answer ({out}); run `scripts/test-cluster.sh up` as root"
    );
    let mut h = Host::new("kubernetes", project);
    h.extra_env.push(("KUBECONFIG".into(), k));
    let config = h.tmp.path().join("config/keystone/agent.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text = text.replace(
        "[guest]",
        &format!(
            "[backend.kubernetes]\nnamespace = \"{NAMESPACE}\"\nstorage_class = \"standard\"\n{}{extra_config}\n[guest]",
            if extra_config.contains("pull_policy") {
                ""
            } else {
                "pull_policy = \"never\"\n"
            }
        ),
    );
    h.write(&config, &text);
    import_image(&h);
    // The cluster outlives each test: what an earlier failed run left
    // under this sandbox name (a kept claim) must not leak into this one.
    delete_sandbox_objects(&h.name(), "cleaning up earlier runs");
    h
}

/// Delete every object of sandbox `name` from the test namespace and wait
/// until they are gone; `why` names the step in the failure message.
fn delete_sandbox_objects(name: &str, why: &str) {
    let (ok, out) = kubectl(&[
        "-n",
        NAMESPACE,
        "delete",
        "pods,pvc,secrets,networkpolicies",
        "-l",
        &format!("keystone.dev/sandbox={name}"),
        "--ignore-not-found",
        "--wait=true",
    ]);
    assert!(ok, "{why}: {out}");
}

/// The guest image the tests' configuration builds, exported as an OCI
/// archive and imported into the node's containerd, once per test run.
fn import_image(h: &Host) {
    static IMPORTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = IMPORTED.get_or_init(|| {
        let r = h.ks(&["image", "build", "--format", "oci"]);
        if r.code != Some(0) {
            return Err(format!("image build --format oci failed:\n{}", r.text()));
        }
        let archive = r
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("OCI image archive: "))
            .and_then(|l| l.split(' ').next())
            .ok_or_else(|| format!("no archive path in:\n{}", r.text()))?
            .to_string();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-cluster.sh");
        let mut cmd = Command::new(script);
        cmd.arg("import").arg(&archive);
        let r = run_bounded(cmd, Duration::from_secs(300));
        if r.code != Some(0) {
            return Err(format!(
                "importing {archive} into the test cluster failed:\n{}",
                r.text()
            ));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn pod_of(h: &Host) -> String {
    format!("pod/keystone-{}", h.name())
}

/// start → exec → commit inside → sync → stop (pod gone, claim kept) →
/// start with the workspace kept → --fresh → destroy leaving no object.
#[test]
fn lifecycle() {
    let h = host("life-kube", "");
    let name = h.name();
    let r = h.start(&[]);
    r.ok();
    assert!(r.stdout.contains("kubernetes backend"), "{}", r.text());
    assert!(
        r.stdout
            .contains(&format!("pod: {NAMESPACE}/keystone-{name}")),
        "{}",
        r.text()
    );

    // The pod: labelled after the sandbox, requests = limits from the
    // configuration (2048 MB, 2 vCPUs), its claim bound.
    let (ok, out) = kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        &format!("keystone.dev/sandbox={name}"),
        "-o",
        "jsonpath={.items[0].spec.containers[0].resources.limits.memory} {.items[0].spec.containers[0].resources.limits.cpu} {.items[0].spec.containers[0].resources.requests.memory}",
    ]);
    assert!(ok, "{out}");
    // The API server writes 2048Mi in its canonical form.
    assert_eq!(out.trim(), "2Gi 2 2Gi");
    let claim = format!("persistentvolumeclaim/keystone-{name}-workspace");
    assert!(objects("pvc").contains(&claim), "{:?}", objects("pvc"));

    let head = h.git(&["rev-parse", "HEAD"]);
    let r = h.ks(&["exec", "--", "git", "log", "-1", "--format=%H"]);
    r.ok();
    assert_eq!(r.stdout.trim(), head);
    assert_eq!(
        h.sh(
            "pwd; stat -c %U README.md; git config user.email; git branch --show-current; hostname"
        )
        .split_whitespace()
        .collect::<Vec<_>>(),
        [
            "/workspace",
            "agent",
            "dev@host.example",
            "main",
            name.as_str()
        ]
    );
    let theirs = crate::scenarios::exec_and_sync_home(&h);

    // stop deletes the pod and its secret, keeps the claim.
    h.sh("echo kept > /workspace/scratch.txt");
    h.ks(&["stop"]).ok();
    assert_eq!(h.status_json(&name)["state"], "stopped");
    assert!(
        !objects("pods").contains(&pod_of(&h)),
        "pod left after stop"
    );
    assert!(objects("secrets").iter().all(|s| !s.contains(&name)));
    assert!(objects("pvc").contains(&claim), "claim gone after stop");
    h.ks(&["exec", "--", "true"]).code(2);

    // start again: a new pod on the same claim.
    h.start(&[]).ok();
    assert_eq!(h.sh("cat /workspace/scratch.txt"), "kept\n");
    assert_eq!(h.sh("git log -1 --format=%H").trim(), theirs.trim());

    // --fresh replaces the claim; the workspace is pushed anew.
    h.start(&["--fresh"]).ok();
    assert_eq!(
        h.sh("ls /workspace/scratch.txt 2>/dev/null | wc -l").trim(),
        "0"
    );
    assert_eq!(h.sh("cat agent.txt"), "written by the agent\n");
    let st = h.status_json(&name);
    assert_eq!(st["state"], "running");
    assert_eq!(st["backend"], "kubernetes");

    h.ks(&["destroy", &name, "--force"]).ok();
    for kind in ["pods", "pvc", "secrets", "networkpolicies"] {
        assert!(
            eventually(Duration::from_secs(30), || objects(kind)
                .iter()
                .all(|o| !o.contains(&name))),
            "{kind} left after destroy: {:?}",
            objects(kind)
        );
    }
    // The volume itself went with the claim (reclaim policy Delete).
    assert!(
        eventually(Duration::from_secs(30), || {
            let (_, out) = kubectl(&["get", "pv", "-o", "jsonpath={.items[*].spec.claimRef.name}"]);
            !out.contains(&format!("keystone-{name}-workspace"))
        }),
        "persistent volume left after destroy"
    );
    assert!(
        processes_matching(&format!("__supervise {name}")).is_empty(),
        "supervisor left"
    );
    h.ks(&["status", &name]).code(1);
}

/// A pod that cannot start is an error with the cluster's reason, quickly,
/// and leaves nothing behind; a wrong context is exit 4.
#[test]
fn errors() {
    let h = host(
        "err-kube",
        "image = \"localhost/keystone-guest:does-not-exist\"\n",
    );
    let name = h.name();
    let t = std::time::Instant::now();
    let r = h.start(&[]);
    r.code(3);
    assert!(
        r.text().contains("ErrImageNeverPull"),
        "the cluster's reason must be shown:\n{}",
        r.text()
    );
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(30), || objects("pods")
            .iter()
            .all(|o| !o.contains(&name))),
        "a failed start left its pod"
    );
    assert!(
        h.record(&name).is_none(),
        "a failed first start left a record"
    );

    // More memory than the node has: the scheduler's reason, not a hang.
    // (Scheduling comes before the image pull.)
    let r = h.ks(&["start", "--no-attach", "--memory", "200000"]);
    r.code(3);
    assert!(
        r.text().contains("cannot be scheduled") && r.text().contains("Insufficient memory"),
        "{}",
        r.text()
    );
    assert!(
        h.record(&name).is_none(),
        "a failed first start left a record"
    );

    let r = h.ks_env(
        &["start", "--no-attach"],
        &[("KEYSTONE_AGENT_KUBE_CONTEXT", "no-such-context")],
    );
    r.code(4);
    assert!(
        r.text().contains("no-such-context") && r.text().contains("KUBECONFIG"),
        "{}",
        r.text()
    );

    // An API server that does not answer: exit 4, naming it, in bounded time.
    let dead = h.tmp.path().join("dead.kubeconfig");
    h.write(
        &dead,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dead\n  cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: x}\ncontexts:\n- name: dead\n  context: {cluster: dead, user: u}\ncurrent-context: dead\n",
    );
    let t = std::time::Instant::now();
    let r = h.ks_env(
        &["start", "--no-attach"],
        &[("KUBECONFIG", dead.to_str().expect("path"))],
    );
    r.code(4);
    assert!(
        r.text().contains("https://127.0.0.1:1") && r.text().contains("cannot be reached"),
        "{}",
        r.text()
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        h.record(&name).is_none(),
        "a failed first start left a record"
    );
}

/// The attack suite's pod check (attack.rs): capabilities, seccomp, no
/// service-account token.
#[test]
fn attack_pod_is_confined() {
    crate::attack::pod_is_confined(host("atk-pod-kube", ""));
}

/// A pod deleted by someone else: the sandbox is reported in error, with
/// that reason.
#[test]
fn pod_deleted_outside() {
    let h = host("gone-kube", "");
    let name = h.name();
    h.start(&["--network", "none"]).ok();
    assert!(
        objects("networkpolicies").contains(&format!(
            "networkpolicy.networking.k8s.io/keystone-{name}-isolate"
        )),
        "--network none must create the NetworkPolicy: {:?}",
        objects("networkpolicies")
    );
    let (ok, out) = kubectl(&["-n", NAMESPACE, "delete", &pod_of(&h), "--wait=true"]);
    assert!(ok, "{out}");
    assert!(
        eventually(Duration::from_secs(30), || h.status_json(&name)["state"]
            == "error"),
        "{}",
        h.status_json(&name)
    );
    let st = h.status_json(&name);
    assert!(st.to_string().contains("deleted outside keystone"), "{st}");
    h.ks(&["destroy", &name, "--force"]).ok();
    for kind in ["pods", "pvc", "secrets", "networkpolicies"] {
        assert!(
            eventually(Duration::from_secs(30), || objects(kind)
                .iter()
                .all(|o| !o.contains(&name))),
            "{kind} left after destroy: {:?}",
            objects(kind)
        );
    }
}

// The backend-independent scenarios (main.rs lists them, and why some are
// left out here), on a pod: the channel (port-forward) must make them work
// unchanged.
crate::backend_suite!(kubernetes shared, |project| super::host(project, ""), {
    #[test]
    fn two_at_once_and_fresh() {
        // Requests equal limits: two 2-vCPU sandboxes do not fit the test
        // node's 2 cores (the second start fails "Insufficient cpu"), so
        // these two ask for one each.
        let h = super::host("two-kube", "");
        let config = h.tmp.path().join("config/keystone/agent.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        assert!(text.contains("vcpus = 2"), "{text}");
        h.write(&config, &text.replace("vcpus = 2", "vcpus = 1"));
        scenarios::two_at_once_and_fresh(h);
    }
});

/// `image push` to a registry (the test cluster's plain-HTTP one), and a
/// sandbox whose pod pulls the image from there (`pull_policy = "always"`).
#[test]
fn push_and_pull() {
    let registry = std::env::var("KEYSTONE_TEST_REGISTRY").unwrap_or_default();
    assert!(
        !registry.is_empty(),
        "KEYSTONE_TEST_REGISTRY must name the test cluster's registry: `eval \"$(scripts/test-cluster.sh env)\"`"
    );
    let reference = format!("{registry}/keystone/guest:e2e");
    let h = host(
        "pull-kube",
        &format!("image = \"{reference}\"\npull_policy = \"always\"\n"),
    );
    let r = h.ks(&["image", "push", &reference, "--insecure"]);
    r.ok();
    assert!(
        r.stdout.contains(&format!("to {reference}")),
        "{}",
        r.text()
    );
    let r = h.start(&[]);
    r.ok();
    let (ok, out) = kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        &pod_of(&h),
        "-o",
        "jsonpath={.spec.containers[0].image} {.spec.containers[0].imagePullPolicy}",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("{reference} Always"));
    assert_eq!(h.sh("id -un").trim(), "agent");
    h.ks(&["destroy", &h.name(), "--force"]).ok();
}

/// The Kubernetes backend's fault points (keystone_backend::fault), in the
/// order a start reaches them: after each object is created, once the pod
/// runs, once the socket is bound, once the egress point is up (the
/// harness's default egress is the allowlist), once sshd answers through
/// it.
const FAULT_POINTS: &[&str] = &[
    "kubernetes-claim-created",
    "kubernetes-secret-created",
    "kubernetes-policy-created",
    "kubernetes-pod-created",
    "kubernetes-pod-running",
    "kubernetes-socket-bound",
    "kubernetes-egress-started",
    "kubernetes-sshd-answered",
];

/// A kubeconfig for the test cluster whose credential comes from a plugin
/// (a script in `dir`) that serves the supervisor, but refuses the CLI
/// (`KEYSTONE_E2E_CLI` set: the supervisor's environment is cleared, so
/// only the CLI has it) once a supervisor has connected. So whatever is
/// removed from the cluster after a failed start, the supervisor removed:
/// the CLI's rollback, which reaps as well, cannot hide a leak. `dir/calls`
/// logs who asked: `cli`, `supervisor`, `cli-refused`.
fn supervisor_only_kubeconfig(h: &Host, dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("plugin dir");
    let view = |path: &str| -> String {
        let (ok, out) = kubectl(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            &format!("jsonpath={{{path}}}"),
        ]);
        assert!(ok, "kubectl config view {path}: {out}");
        out.trim().to_string()
    };
    let pem = |path: &str| -> String {
        let file = dir.join("b64");
        h.write(&file, &view(path));
        let out = Command::new("base64")
            .arg("-d")
            .arg(&file)
            .output()
            .expect("base64");
        assert!(out.status.success(), "base64 -d {path}");
        String::from_utf8(out.stdout).expect("PEM")
    };
    let credential = serde_json::json!({
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {
            "clientCertificateData": pem(".users[0].user.client-certificate-data"),
            "clientKeyData": pem(".users[0].user.client-key-data"),
        }
    });
    h.write(&dir.join("credential.json"), &credential.to_string());
    let plugin = dir.join("credential.sh");
    h.write(
        &plugin,
        r#"#!/bin/sh
dir=$1
if [ -n "$KEYSTONE_E2E_CLI" ]; then
    if [ -e "$dir/supervisor-connected" ]; then
        echo cli-refused >>"$dir/calls"
        echo "the test refuses the CLI once the supervisor has connected" >&2
        exit 1
    fi
    echo cli >>"$dir/calls"
else
    : >"$dir/supervisor-connected"
    echo supervisor >>"$dir/calls"
fi
cat "$dir/credential.json"
"#,
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": view(".clusters[0].cluster.server"),
            "certificate-authority-data": view(".clusters[0].cluster.certificate-authority-data"),
        }}],
        "users": [{"name": "supervisor-only", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": plugin.to_str().expect("path"),
            "args": [dir.to_str().expect("path")],
            "interactiveMode": "Never",
        }}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "supervisor-only"}}],
        "current-context": "test",
    });
    let path = dir.join("kubeconfig");
    h.write(&path, &config.to_string());
    path
}

/// A failure at each of the backend's fault points fails `start` with
/// that fault named and leaves nothing of the sandbox: no pod, Secret,
/// claim or NetworkPolicy, no socket, no record, no supervisor. The
/// supervisor's own teardown guard must do it (see
/// [`supervisor_only_kubeconfig`]). Every point is tried and what each
/// left is reported together; what one leaves is removed before the next.
#[test]
fn fault_points_leave_nothing() {
    let h = host("fault-kube", "");
    let name = h.name();
    let dir = h.tmp.path().join("credential");
    let kubeconfig = supervisor_only_kubeconfig(&h, &dir);
    let kubeconfig = kubeconfig.to_str().expect("path");
    // The sockets of this test's sandboxes only.
    let run_dir = h.tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("runtime dir");
    let mut failures = Vec::new();
    for point in FAULT_POINTS {
        for f in ["calls", "supervisor-connected"] {
            match std::fs::remove_file(dir.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{f}: {e}"),
                _ => {}
            }
        }
        let r = h.ks_env(
            &["start", "--no-attach"],
            &[
                ("KUBECONFIG", kubeconfig),
                ("KEYSTONE_FAULT", point),
                ("KEYSTONE_E2E_CLI", "1"),
                ("XDG_RUNTIME_DIR", run_dir.to_str().expect("path")),
            ],
        );
        let mut fail = |what: String| failures.push(format!("{point}: {what}"));
        if r.code != Some(3) || !r.text().contains(&format!("fault injected at {point}")) {
            fail(format!(
                "expected exit 3 naming the fault, got {:?}:\n{}",
                r.code,
                r.text()
            ));
        }
        if r.text().contains("cleanup also failed") {
            fail(format!("cleanup failed:\n{}", r.text()));
        }
        // The CLI's rollback was refused the cluster: only the
        // supervisor can have removed anything.
        let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
        if !(calls.lines().any(|l| l == "supervisor") && calls.lines().any(|l| l == "cli-refused"))
        {
            fail(format!(
                "the CLI must have been refused after the supervisor connected: {calls:?}"
            ));
        }
        // The guard waits for each deletion: nothing may be left now.
        for kind in ["pods", "secrets", "pvc", "networkpolicies"] {
            let left: Vec<String> = objects(kind)
                .into_iter()
                .filter(|o| o.contains(&format!("keystone-{name}")))
                .collect();
            if !left.is_empty() {
                fail(format!("{kind} left: {left:?}"));
            }
        }
        let sockets: Vec<_> = std::fs::read_dir(run_dir.join("keystone"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let sockets: Vec<_> = sockets
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "ssh"))
            .collect();
        if !sockets.is_empty() {
            fail(format!("socket left: {sockets:?}"));
        }
        if h.record(&name).is_some() {
            fail("a failed first start left a record".into());
        }
        let control = h
            .state_dir()
            .join("sandboxes")
            .join(&name)
            .join("egress/control.sock");
        if control.exists() {
            fail(format!("egress control socket left: {}", control.display()));
        }
        if !eventually(Duration::from_secs(10), || {
            processes_matching(&format!("__supervise {name}")).is_empty()
        }) {
            fail("supervisor left".into());
        }
        // So that the next point starts from nothing, whatever this left.
        delete_sandbox_objects(&name, &format!("cleaning up after {point}"));
        for s in sockets {
            std::fs::remove_file(&s).expect("remove socket");
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
